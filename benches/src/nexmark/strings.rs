//! Random texts, as the reference's `StringsGenerator` draws them, and its reusable extra pool.

use super::java_random::JavaRandom;

/// Shortest string [`next_string`] draws (before trimming).
const MIN_STRING_LENGTH: i32 = 3;

/// Length of the reusable extra-string pool: 1 MiB of characters, as in the reference.
pub(super) const EXTRA_POOL_CHARS: usize = 1024 * 1024;

/// Seed of the `java.util.Random` that fills the extra pool (the reproducibility convention;
/// upstream seeds it differently, see the module docs of `nexmark`).
const EXTRA_POOL_SEED: i64 = 0;

/// `StringsGenerator.nextString(random, maxLength, special)`: `3 + nextInt(max_length - 3)`
/// characters, each `special` with probability 1/13 and otherwise a random lower-case letter,
/// then trimmed as Java's `String.trim` does (so a `' '` special can shorten the string).
///
/// `max_length` must exceed 3 (callers pass constants).
pub(super) fn next_string(random: &mut JavaRandom, max_length: i32, special: char) -> String {
    let mut text = String::new();
    push_next_string(&mut text, random, max_length, special);
    text
}

/// [`next_string`], appended to `out`, so that a text made of several random parts (an email
/// address, a url) takes one allocation. Only the appended part is trimmed.
pub(super) fn push_next_string(out: &mut String, random: &mut JavaRandom, max_length: i32, special: char) {
    debug_assert!(max_length > MIN_STRING_LENGTH);
    let length = MIN_STRING_LENGTH + random.next_int_bounded(max_length - MIN_STRING_LENGTH);
    let start = out.len();
    out.reserve(length as usize);
    for _ in 0..length {
        if random.next_int_bounded(13) == 0 {
            out.push(special);
        } else {
            out.push(lowercase_letter(random.next_int_bounded(26)));
        }
    }
    java_trim_from(out, start);
}

/// `StringsGenerator.nextExtra`: padding such that `current_size + padding` averages
/// `desired_average_size`. Empty if the event is already larger; otherwise a length drawn
/// uniformly from `average ± 20%` (rounded as Java's `Math.round`), cut from `pool`.
pub(super) fn next_extra(random: &mut JavaRandom, pool: &str, current_size: i32, desired_average_size: i32) -> String {
    if current_size > desired_average_size {
        return String::new();
    }
    let desired = desired_average_size - current_size;
    let delta = java_round(f64::from(desired) * 0.2) as i32;
    let min_size = desired - delta;
    let size = if delta == 0 { min_size } else { min_size + random.next_int_bounded(2 * delta) };
    next_exact_string(random, pool, size)
}

/// `StringsGenerator.nextExactString`: exactly `length` characters. Lengths under half the
/// pool are a substring of the pool at a random offset; longer ones are drawn character by
/// character like the pool itself.
fn next_exact_string(random: &mut JavaRandom, pool: &str, length: i32) -> String {
    let length_chars = length as usize;
    if length_chars < pool.len() / 2 {
        // `pool.len() - length` < 2^20 fits an `int`; `pool` is ASCII, so any byte range is a
        // char range.
        let start = random.next_int_bounded((pool.len() - length_chars) as i32) as usize;
        return pool[start..start + length_chars].to_owned();
    }
    draw_exact_string(random, length_chars)
}

/// The reference's fallback for `nextExactString`, also how it fills the pool: one `nextInt()`
/// yields up to six characters, `'a' + rnd % 26` each, with `rnd /= 26` between them. Java's
/// `%` keeps the dividend's sign, so negative draws give the characters `'H'..='a'` (which is
/// why extras hold `[`, `\`, `^` and upper-case letters).
fn draw_exact_string(random: &mut JavaRandom, length: usize) -> String {
    let mut text = String::with_capacity(length);
    let mut draw = 0i32;
    let mut left_in_draw = 0;
    for _ in 0..length {
        if left_in_draw == 0 {
            draw = random.next_int();
            left_in_draw = 6; // log_26(2^31)
        }
        // `i32` `%` and `/` truncate toward zero, as Java's do.
        text.push(char::from((i32::from(b'a') + draw % 26) as u8));
        draw /= 26;
        left_in_draw -= 1;
    }
    text
}

/// Fills the reusable extra pool: [`EXTRA_POOL_CHARS`] characters drawn from
/// `java.util.Random(0)`. (Upstream draws it while the pool itself is still unset, so it takes
/// the character-by-character path.)
pub(super) fn build_extra_pool() -> String {
    draw_exact_string(&mut JavaRandom::new(EXTRA_POOL_SEED), EXTRA_POOL_CHARS)
}

/// `(char) ('a' + index)` for `index` in `0..26`.
fn lowercase_letter(index: i32) -> char {
    debug_assert!((0..26).contains(&index));
    char::from(b'a' + index as u8)
}

/// Java's `String.trim` applied to `text[start..]`: drops every leading and trailing character
/// at or below `' '` of that part.
fn java_trim_from(text: &mut String, start: usize) {
    let is_trimmed = |c: char| c <= ' ';
    let end = start + text[start..].trim_end_matches(is_trimmed).len();
    text.truncate(end);
    let leading = text[start..].len() - text[start..].trim_start_matches(is_trimmed).len();
    text.drain(start..start + leading);
}

/// Java's `Math.round(double)`: the closest `long`, ties toward positive infinity; NaN gives 0
/// and out-of-range values saturate (as Rust's `as` cast does).
pub(super) fn java_round(value: f64) -> i64 {
    let floor = value.floor();
    // `value - floor` is exact: the fraction bits of `value` are representable on their own.
    let rounded = if value - floor >= 0.5 { floor + 1.0 } else { floor };
    rounded as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_round_matches_java_semantics() {
        // Values and results from Java's `Math.round` specification and OpenJDK 17.
        assert_eq!(java_round(2.5), 3);
        assert_eq!(java_round(-2.5), -2);
        assert_eq!(java_round(-0.5), 0);
        assert_eq!(java_round(0.499_999_999_999_999_94), 0);
        assert_eq!(java_round(13.6), 14);
        assert_eq!(java_round(f64::NAN), 0);
        assert_eq!(java_round(f64::INFINITY), i64::MAX);
        assert_eq!(java_round(f64::NEG_INFINITY), i64::MIN);
        assert_eq!(java_round(1e300), i64::MAX);
    }

    #[test]
    fn java_trim_drops_outer_spaces_of_the_appended_part_only() {
        let mut text = String::from("  a b  ");
        java_trim_from(&mut text, 0);
        assert_eq!(text, "a b");
        let mut text = String::from("   ");
        java_trim_from(&mut text, 0);
        assert_eq!(text, "");
        let mut text = String::from("_a_");
        java_trim_from(&mut text, 0);
        assert_eq!(text, "_a_");
        let mut text = String::from(" x@  y z ");
        java_trim_from(&mut text, 3);
        assert_eq!(text, " x@y z");
    }

    #[test]
    fn exact_strings_use_the_characters_h_to_z() {
        let text = draw_exact_string(&mut JavaRandom::new(3), 10_000);
        assert!(text.bytes().all(|b| (b'H'..=b'z').contains(&b)));
        assert!(text.bytes().any(|b| b < b'a'), "negative draws give characters below 'a'");
    }

    #[test]
    fn extra_pool_is_ascii_and_full_length() {
        let pool = build_extra_pool();
        assert_eq!(pool.len(), EXTRA_POOL_CHARS);
        assert!(pool.is_ascii());
    }

    #[test]
    fn extra_lengths_stay_within_twenty_percent() {
        let pool = build_extra_pool();
        for seed in 0..200 {
            let extra = next_extra(&mut JavaRandom::new(seed), &pool, 32, 100);
            // desired 68, delta round(13.6) = 14: lengths 54..=81.
            assert!((54..82).contains(&extra.len()), "length {}", extra.len());
        }
        assert_eq!(next_extra(&mut JavaRandom::new(0), &pool, 101, 100), "");
    }
}
