//! A bit-exact port of `java.util.Random`.
//!
//! The Nexmark reference generator is Java, and every value it produces is a function of the
//! sequence `java.util.Random` yields for a seed. Reproducing its events therefore means
//! reproducing that sequence exactly: the 48-bit linear congruential generator of Knuth (TAOCP
//! vol. 2, §3.2.1), the seed scrambling done by the constructor, and the derived draws
//! (`nextInt(bound)` with its power-of-two shortcut and its rejection loop, `nextLong` with its
//! sign-extending addition, `nextDouble` from 53 random bits).
//!
//! Only the methods the generator uses are ported. The algorithms are the ones the Java SE API
//! specification prescribes for `java.util.Random`, so every conforming JVM agrees with them;
//! the unit tests pin values printed by OpenJDK 17.

/// Multiplier of the LCG, `0x5DEECE66D`, as the Java specification gives it.
const MULTIPLIER: u64 = 0x5_DEEC_E66D;
/// Increment of the LCG.
const ADDEND: u64 = 0xB;
/// The state is 48 bits wide.
const STATE_MASK: u64 = (1 << 48) - 1;
/// `2^-53`: scales a 53-bit integer into `[0, 1)`.
const DOUBLE_UNIT: f64 = 1.0 / (1u64 << 53) as f64;

/// A pseudo-random generator that yields exactly what `java.util.Random` yields for the same
/// seed and the same sequence of calls.
///
/// ```
/// use weir_bench::nexmark::JavaRandom;
///
/// // `new java.util.Random(42).nextInt()` in Java.
/// assert_eq!(JavaRandom::new(42).next_int(), -1_170_105_035);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JavaRandom {
    /// The 48-bit LCG state; the bits above 48 are always zero.
    state: u64,
}

impl JavaRandom {
    /// Creates a generator as `new java.util.Random(seed)` does: the seed is XORed with the
    /// multiplier and truncated to 48 bits (so seeds that agree in their low 48 bits agree).
    pub const fn new(seed: i64) -> Self {
        Self { state: (seed as u64 ^ MULTIPLIER) & STATE_MASK }
    }

    /// Advances the state and returns its `bits` high-order bits, as Java's protected
    /// `next(bits)`: the result is the state shifted right by `48 - bits` and then truncated to
    /// an `int` (so `next(32)` can be negative).
    fn next_bits(&mut self, bits: u32) -> i32 {
        debug_assert!((1..=32).contains(&bits), "next(bits) takes 1..=32 bits, got {bits}");
        self.state = self.state.wrapping_mul(MULTIPLIER).wrapping_add(ADDEND) & STATE_MASK;
        // Java's `(int)` cast of a long keeps the low 32 bits; so does `as i32` on the `u64`.
        (self.state >> (48 - bits)) as i32
    }

    /// `nextInt()`: a uniformly distributed `i32` over its whole range.
    pub fn next_int(&mut self) -> i32 {
        self.next_bits(32)
    }

    /// `nextInt(bound)`: a value in `[0, bound)`.
    ///
    /// A power-of-two bound takes the high bits of one 31-bit draw. Any other bound takes
    /// `draw % bound`, rejecting (and drawing again) the draws from the incomplete last block of
    /// `bound` values; Java detects that block through `int` overflow, which is reproduced here
    /// with wrapping arithmetic.
    ///
    /// # Panics
    ///
    /// If `bound <= 0`, where Java throws `IllegalArgumentException`.
    pub fn next_int_bounded(&mut self, bound: i32) -> i32 {
        assert!(bound > 0, "JavaRandom::next_int_bounded: bound must be positive, got {bound}");
        let max = bound - 1;
        let mut draw = self.next_bits(31);
        if (bound & max) == 0 {
            // Power of two: `bound * draw < 2^62`, and shifting by 31 leaves `< bound`.
            return ((i64::from(bound) * i64::from(draw)) >> 31) as i32;
        }
        loop {
            let value = draw % bound;
            // Java: `u - r + m < 0` in `int` arithmetic, true iff the block is incomplete.
            if draw.wrapping_sub(value).wrapping_add(max) >= 0 {
                return value;
            }
            draw = self.next_bits(31);
        }
    }

    /// `nextLong()`: two 32-bit draws, the high one shifted left by 32 and the low one *added*
    /// after sign extension, exactly as Java does (so the high half is sometimes one less than
    /// the first draw).
    pub fn next_long(&mut self) -> i64 {
        let high = i64::from(self.next_bits(32));
        let low = i64::from(self.next_bits(32));
        (high << 32).wrapping_add(low)
    }

    /// `nextDouble()`: a value in `[0, 1)` from 26 + 27 random bits.
    pub fn next_double(&mut self) -> f64 {
        let high = i64::from(self.next_bits(26));
        let low = i64::from(self.next_bits(27));
        ((high << 27) + low) as f64 * DOUBLE_UNIT
    }
}

#[cfg(test)]
mod tests {
    //! Every expected value below was printed by OpenJDK 17.0.15 (`java.util.Random`).
    use super::JavaRandom;

    #[test]
    fn next_int_matches_java() {
        assert_eq!(JavaRandom::new(42).next_int(), -1_170_105_035);
        assert_eq!(JavaRandom::new(0).next_int(), -1_155_484_576);
        assert_eq!(JavaRandom::new(-1).next_int(), 1_155_099_827);
    }

    #[test]
    fn seed_is_truncated_to_48_bits() {
        // `Long.MIN_VALUE` and 0 agree in their low 48 bits.
        assert_eq!(JavaRandom::new(i64::MIN), JavaRandom::new(0));
        assert_eq!(JavaRandom::new(i64::MIN).next_long(), -4_962_768_465_676_381_896);
    }

    #[test]
    fn next_int_bounded_general_path_matches_java() {
        assert_eq!(JavaRandom::new(42).next_int_bounded(10), 0);
    }

    #[test]
    fn next_int_bounded_power_of_two_path_matches_java() {
        let mut random = JavaRandom::new(42);
        let draws: Vec<i32> = (0..5).map(|_| random.next_int_bounded(16)).collect();
        assert_eq!(draws, [11, 0, 10, 0, 4]);

        let mut random = JavaRandom::new(7);
        let draws: Vec<i32> = (0..3).map(|_| random.next_int_bounded(1 << 30)).collect();
        assert_eq!(draws, [784_582_118, 685_624_582, 804_414_742]);
    }

    #[test]
    fn next_int_bounded_rejection_path_matches_java() {
        // With bound 2^30 + 1 every 31-bit draw >= bound lies in the incomplete block. Seed 0
        // first draws 1_569_741_360 (rejected), and Java returns 516_548_029 from the next draw.
        let bound = (1 << 30) + 1;
        let mut probe = JavaRandom::new(0);
        let first_draw = (probe.next_int() as u32) >> 1;
        assert_eq!(first_draw, 1_569_741_360);
        assert!(first_draw >= bound as u32);
        assert_eq!(JavaRandom::new(0).next_int_bounded(bound), 516_548_029);
    }

    #[test]
    #[should_panic(expected = "bound must be positive")]
    fn next_int_bounded_rejects_zero_bound() {
        JavaRandom::new(0).next_int_bounded(0);
    }

    #[test]
    fn next_long_matches_java() {
        assert_eq!(JavaRandom::new(0).next_long(), -4_962_768_465_676_381_896);
        assert_eq!(JavaRandom::new(42).next_long(), -5_025_562_857_975_149_833);
    }

    #[test]
    fn next_double_matches_java() {
        assert_eq!(JavaRandom::new(0).next_double(), 0.730_967_787_376_657);
        assert_eq!(JavaRandom::new(42).next_double(), 0.727_563_680_032_868_1);
    }
}
