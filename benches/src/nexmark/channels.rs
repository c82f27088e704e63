//! The bid channels and their urls, built once as the reference's `BidGenerator` does.

use super::java_random::JavaRandom;
use super::strings::push_next_string;

/// Names of the hot channels; a bid picks one of them with probability 1/2.
pub(super) const HOT_CHANNELS: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];

/// Number of cold channels, `channel-0` to `channel-9999`.
pub(super) const CHANNELS_NUMBER: i32 = 10_000;

/// Seed of the `java.util.Random` that draws every url (the reproducibility convention).
const CHANNEL_URLS_SEED: i64 = 1;

/// A cold channel and its url.
#[derive(Clone, Debug)]
pub(super) struct Channel {
    /// `channel-<number>`.
    pub(super) name: String,
    /// The channel's url: a random base url, in nine cases out of ten with a `channel_id`.
    pub(super) url: String,
}

/// Every channel url, drawn in the reference's order from one `java.util.Random(1)`: the four
/// hot urls, then for each cold channel its base url followed by the `nextInt(10)` that decides
/// whether it gets a `channel_id` parameter.
#[derive(Clone, Debug)]
pub(super) struct ChannelTable {
    /// Urls of [`HOT_CHANNELS`], index for index.
    pub(super) hot_urls: [String; 4],
    /// Cold channels, indexed by channel number.
    pub(super) channels: Vec<Channel>,
}

impl ChannelTable {
    pub(super) fn build() -> Self {
        let mut random = JavaRandom::new(CHANNEL_URLS_SEED);
        let hot_urls = std::array::from_fn(|_| base_url(&mut random));
        let channels = (0..CHANNELS_NUMBER)
            .map(|number| {
                let mut url = base_url(&mut random);
                if random.next_int_bounded(10) > 0 {
                    url.push_str("&channel_id=");
                    url.push_str(&channel_id(number).to_string());
                }
                Channel { name: format!("channel-{number}"), url }
            })
            .collect();
        Self { hot_urls, channels }
    }
}

/// `Math.abs(Integer.reverse(number))`. Java's `abs` leaves `Integer.MIN_VALUE` as it is, so
/// channel 1 (bit 0 reversed into the sign bit) gets the id -2147483648; kept as a quirk.
fn channel_id(number: i32) -> i32 {
    number.reverse_bits().wrapping_abs()
}

/// `https://www.nexmark.com/<a>/<b>/<c>/item.htm?query=1`, each part 3 or 4 random characters
/// with `_` as the special character.
fn base_url(random: &mut JavaRandom) -> String {
    let mut url = String::with_capacity(80);
    url.push_str("https://www.nexmark.com/");
    for _ in 0..3 {
        push_next_string(&mut url, random, 5, '_');
        url.push('/');
    }
    url.push_str("item.htm?query=1");
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_ids_reverse_bits_and_keep_the_min_int_quirk() {
        assert_eq!(channel_id(0), 0);
        assert_eq!(channel_id(1), i32::MIN);
        // 2 reversed is bit 30.
        assert_eq!(channel_id(2), 1 << 30);
        // 3 reversed is bits 31 and 30: negative, so abs applies.
        assert_eq!(channel_id(3), (3i32 << 30).wrapping_neg());
    }

    #[test]
    fn table_is_complete_and_deterministic() {
        let table = ChannelTable::build();
        assert_eq!(table.channels.len(), CHANNELS_NUMBER as usize);
        assert_eq!(table.channels[6254].name, "channel-6254");
        let again = ChannelTable::build();
        assert_eq!(table.hot_urls, again.hot_urls);
        for url in table.hot_urls.iter().chain(table.channels.iter().map(|c| &c.url)) {
            assert!(url.starts_with("https://www.nexmark.com/"), "{url}");
            assert!(url.contains("/item.htm?query=1"), "{url}");
        }
    }
}
