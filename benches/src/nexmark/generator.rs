//! The event generator: the reference's `NexmarkGenerator`, `PersonGenerator`,
//! `AuctionGenerator`, `BidGenerator`, `PriceGenerator` and `LongGenerator`, as pure functions
//! of an event's offset.

use std::iter::FusedIterator;
use std::sync::Arc;

use super::channels::{CHANNELS_NUMBER, ChannelTable, HOT_CHANNELS};
use super::config::{ConfigError, NexmarkConfig};
use super::java_random::JavaRandom;
use super::model::{Auction, Bid, Event, Person};
use super::strings::{build_extra_pool, java_round, next_extra, next_string, push_next_string};

/// Person ids start here (`GeneratorConfig.FIRST_PERSON_ID`).
const FIRST_PERSON_ID: i64 = 1000;
/// Auction ids start here (`GeneratorConfig.FIRST_AUCTION_ID`).
const FIRST_AUCTION_ID: i64 = 1000;
/// Category ids start here (`GeneratorConfig.FIRST_CATEGORY_ID`).
const FIRST_CATEGORY_ID: i64 = 10;
/// Categories are `FIRST_CATEGORY_ID..FIRST_CATEGORY_ID + NUM_CATEGORIES`.
const NUM_CATEGORIES: i32 = 5;
/// Cold picks may name up to this many persons not generated yet.
const PERSON_ID_LEAD: i64 = 10;
/// Cold picks may name up to this many auctions not generated yet.
const AUCTION_ID_LEAD: i64 = 10;
/// Hot sellers, auctions and bidders are the first (bidders: second) of each block of this many.
const HOT_SELLER_RATIO: i64 = 100;
/// See [`HOT_SELLER_RATIO`].
const HOT_AUCTION_RATIO: i64 = 100;
/// See [`HOT_SELLER_RATIO`].
const HOT_BIDDER_RATIO: i64 = 100;
/// A bid comes through a hot channel with probability `1 - 1 / HOT_CHANNELS_RATIO`.
const HOT_CHANNELS_RATIO: i32 = 2;
/// What the reference counts toward an event's size besides its texts: 8 bytes for each
/// fixed-width field it thinks of (one for a person, six for an auction, four for a bid).
const PERSON_FIXED_BYTES: i32 = 8;
/// See [`PERSON_FIXED_BYTES`].
const AUCTION_FIXED_BYTES: i32 = 8 * 6;
/// See [`PERSON_FIXED_BYTES`].
const BID_FIXED_BYTES: i32 = 8 * 4;
/// Out-of-order shuffling multiplies the event number by this (`nextAdjustedEventNumber`).
const OUT_OF_ORDER_MULTIPLIER: i64 = 953;

const US_STATES: [&str; 6] = ["AZ", "CA", "ID", "OR", "WA", "WY"];
const US_CITIES: [&str; 10] =
    ["Phoenix", "Los Angeles", "San Francisco", "Boise", "Portland", "Bend", "Redmond", "Seattle", "Kent", "Cheyenne"];
const FIRST_NAMES: [&str; 11] =
    ["Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter"];
const LAST_NAMES: [&str; 9] = ["Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones", "Noris"];

/// The tables every generator draws from, built once and shared by clones.
#[derive(Debug)]
struct Pools {
    /// The reusable extra-string pool (ASCII, [`super::strings::EXTRA_POOL_CHARS`] long).
    extra: String,
    /// Hot and cold channel urls.
    channels: ChannelTable,
}

/// A deterministic, random-access Nexmark event generator.
///
/// Event `offset` (0-based) is a pure function of the config and the offset, so a source can
/// start at, or seek back to, any offset and reproduce the stream exactly. Cloning is cheap:
/// the string pools are shared.
///
/// ```
/// use weir_bench::nexmark::{Event, NexmarkConfig, NexmarkGenerator};
///
/// let generator = NexmarkGenerator::new(NexmarkConfig::default());
/// let Event::Auction(auction) = generator.event(0) else { panic!("event 0 is an auction") };
/// assert_eq!(auction.id, 1001);
/// assert_eq!(generator.event_time_ms(0), 1_436_918_400_000);
/// // Random access agrees with iteration.
/// assert_eq!(generator.events_from(7).next(), Some(generator.event(7)));
/// ```
#[derive(Clone, Debug)]
pub struct NexmarkGenerator {
    config: NexmarkConfig,
    max_events: u64,
    inter_event_delay_us: f64,
    total_proportion: i64,
    pools: Arc<Pools>,
}

impl NexmarkGenerator {
    /// Creates a generator, building its string pools (about 1 MiB of extra text and 10,004
    /// urls, a few milliseconds of work).
    ///
    /// # Panics
    ///
    /// If `config` is invalid; see [`NexmarkGenerator::try_new`] for configs from outside.
    pub fn new(config: NexmarkConfig) -> Self {
        match Self::try_new(config) {
            Ok(generator) => generator,
            Err(error) => panic!("{error}"),
        }
    }

    /// Creates a generator, or says which knob of `config` is out of range.
    pub fn try_new(config: NexmarkConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let pools = Pools { extra: build_extra_pool(), channels: ChannelTable::build() };
        Ok(Self {
            max_events: config.effective_max_events(),
            inter_event_delay_us: config.inter_event_delay_us(),
            total_proportion: config.total_proportion(),
            config,
            pools: Arc::new(pools),
        })
    }

    /// The config this generator was built with.
    pub fn config(&self) -> &NexmarkConfig {
        &self.config
    }

    /// How many events this generator yields: valid offsets are `0..max_events()`.
    pub fn max_events(&self) -> u64 {
        self.max_events
    }

    /// The event at `offset` (0-based).
    ///
    /// # Panics
    ///
    /// If `offset >= self.max_events()`.
    pub fn event(&self, offset: u64) -> Event {
        let events_so_far = self.events_so_far(offset);
        let event_number = self.adjusted_event_number(events_so_far);
        let event_id = self.config.first_event_id.wrapping_add(event_number);
        let timestamp_ms = self.timestamp_ms(event_number);
        // The reproducibility convention: each event draws from its own generator, seeded
        // with its id.
        let mut random = JavaRandom::new(event_id);
        let person = i64::from(self.config.person_proportion);
        let auction = i64::from(self.config.auction_proportion);
        let kind = event_id % self.total_proportion;
        if kind < person {
            Event::Person(self.next_person(event_id, &mut random, timestamp_ms))
        } else if kind < person + auction {
            Event::Auction(self.next_auction(events_so_far, event_id, &mut random, timestamp_ms))
        } else {
            Event::Bid(self.next_bid(event_id, &mut random, timestamp_ms))
        }
    }

    /// The event time of the event at `offset`, epoch milliseconds, without generating it.
    ///
    /// # Panics
    ///
    /// If `offset >= self.max_events()`.
    pub fn event_time_ms(&self, offset: u64) -> i64 {
        self.timestamp_ms(self.adjusted_event_number(self.events_so_far(offset)))
    }

    /// The reference's id of the event at `offset`: it seeds the event's draws and decides
    /// whether it is a person, an auction or a bid. The default config's first id is 2.
    ///
    /// # Panics
    ///
    /// If `offset >= self.max_events()`.
    pub fn event_id(&self, offset: u64) -> i64 {
        let event_number = self.adjusted_event_number(self.events_so_far(offset));
        self.config.first_event_id.wrapping_add(event_number)
    }

    /// The events from `offset` on, in order, up to [`NexmarkGenerator::max_events`].
    pub fn events_from(&self, offset: u64) -> Events {
        Events { generator: self.clone(), next_offset: offset }
    }

    /// The reference's `eventsCountSoFar` for the event at `offset`.
    fn events_so_far(&self, offset: u64) -> i64 {
        assert!(
            offset < self.max_events,
            "Nexmark event offset {offset} is beyond the last event ({} events)",
            self.max_events
        );
        // `max_events <= i64::MAX` (validated), so the offset fits.
        offset as i64
    }

    // Event numbers and times. Java `long` arithmetic wraps; the `wrapping_*` calls keep that
    // (it only matters for offsets and configs far beyond any real run).

    /// `GeneratorConfig.nextAdjustedEventNumber`: the event number, shuffled within its
    /// out-of-order group.
    fn adjusted_event_number(&self, events_so_far: i64) -> i64 {
        let group = self.config.out_of_order_group_size as i64;
        let event_number = self.config.first_event_number.wrapping_add(events_so_far);
        let base = (event_number / group) * group;
        let offset = event_number.wrapping_mul(OUT_OF_ORDER_MULTIPLIER) % group;
        base.wrapping_add(offset)
    }

    /// `GeneratorConfig.timestampForEvent`: the base time plus `number * delay` µs, the product
    /// taken in `double` and truncated before the division to milliseconds, as the reference
    /// does.
    fn timestamp_ms(&self, event_number: i64) -> i64 {
        let offset_us = (event_number as f64 * self.inter_event_delay_us) as i64;
        self.config.base_time_ms.wrapping_add(offset_us / 1000)
    }

    // Ids. An event id decomposes into an epoch (of `total_proportion` ids) and an offset in
    // it; persons come first in each epoch, then auctions, then bids.

    /// `PersonGenerator.lastBase0PersonId`: the newest person at `event_id` (this event's own
    /// id if it is a person).
    fn last_base0_person_id(&self, event_id: i64) -> i64 {
        let person = i64::from(self.config.person_proportion);
        let epoch = event_id / self.total_proportion;
        let mut offset = event_id % self.total_proportion;
        if offset >= person {
            offset = person - 1;
        }
        epoch * person + offset
    }

    /// `AuctionGenerator.lastBase0AuctionId`: the newest auction at `event_id` (this event's
    /// own id if it is an auction).
    fn last_base0_auction_id(&self, event_id: i64) -> i64 {
        let person = i64::from(self.config.person_proportion);
        let auction = i64::from(self.config.auction_proportion);
        let mut epoch = event_id / self.total_proportion;
        let mut offset = event_id % self.total_proportion;
        if offset < person {
            // A person: the last auction of the previous epoch.
            epoch -= 1;
            offset = auction - 1;
        } else if offset >= person + auction {
            // A bid: the last auction of this epoch.
            offset = auction - 1;
        } else {
            offset -= person;
        }
        epoch * auction + offset
    }

    /// `PersonGenerator.nextBase0PersonId`: one of the `num_active_people` newest persons, or
    /// one of the next few not generated yet.
    fn next_base0_person_id(&self, event_id: i64, random: &mut JavaRandom) -> i64 {
        let num_people = self.last_base0_person_id(event_id) + 1;
        let active_people = num_people.min(i64::from(self.config.num_active_people));
        let pick = next_long(random, active_people + PERSON_ID_LEAD);
        num_people - active_people + pick
    }

    /// `AuctionGenerator.nextBase0AuctionId`: one of the auctions likely still open, or one of
    /// the next few not generated yet.
    fn next_base0_auction_id(&self, event_id: i64, random: &mut JavaRandom) -> i64 {
        let max_auction = self.last_base0_auction_id(event_id);
        let min_auction = (max_auction - i64::from(self.config.num_in_flight_auctions)).max(0);
        min_auction + next_long(random, max_auction - min_auction + 1 + AUCTION_ID_LEAD)
    }

    /// `AuctionGenerator.nextAuctionLengthMs`: uniform in `1..=2 * horizon`, where the horizon
    /// is how long until `num_in_flight_auctions` more auctions have been generated (so about
    /// that many are open at a time).
    fn next_auction_length_ms(&self, events_so_far: i64, random: &mut JavaRandom, timestamp_ms: i64) -> i64 {
        let current_event_number = self.adjusted_event_number(events_so_far);
        let events_for_auctions = i64::from(self.config.num_in_flight_auctions) * self.total_proportion
            / i64::from(self.config.auction_proportion);
        let future_auction_ms = self.timestamp_ms(current_event_number.wrapping_add(events_for_auctions));
        let horizon_ms = future_auction_ms.wrapping_sub(timestamp_ms);
        1 + next_long(random, horizon_ms.wrapping_mul(2).max(1))
    }

    // The three event kinds. Each draws in exactly the reference's order.

    fn next_person(&self, event_id: i64, random: &mut JavaRandom, timestamp_ms: i64) -> Person {
        let id = self.last_base0_person_id(event_id) + FIRST_PERSON_ID;
        let first_name = pick(random, &FIRST_NAMES);
        let last_name = pick(random, &LAST_NAMES);
        let name = format!("{first_name} {last_name}");
        let mut email_address = String::with_capacity(20);
        push_next_string(&mut email_address, random, 7, ' ');
        email_address.push('@');
        push_next_string(&mut email_address, random, 5, ' ');
        email_address.push_str(".com");
        let groups: [i32; 4] = std::array::from_fn(|_| random.next_int_bounded(10_000));
        let credit_card = format!("{:04} {:04} {:04} {:04}", groups[0], groups[1], groups[2], groups[3]);
        let city = pick(random, &US_CITIES);
        let state = pick(random, &US_STATES);
        let current_size = PERSON_FIXED_BYTES
            + text_size(&name)
            + text_size(&email_address)
            + text_size(&credit_card)
            + text_size(city)
            + text_size(state);
        let extra = next_extra(random, &self.pools.extra, current_size, self.config.person_bytes_avg as i32);
        Person {
            id,
            name,
            email_address,
            credit_card,
            city: city.to_owned(),
            state: state.to_owned(),
            date_time_ms: timestamp_ms,
            extra,
        }
    }

    fn next_auction(&self, events_so_far: i64, event_id: i64, random: &mut JavaRandom, timestamp_ms: i64) -> Auction {
        let id = self.last_base0_auction_id(event_id) + FIRST_AUCTION_ID;
        let base0_seller = if random.next_int_bounded(self.config.hot_sellers_ratio as i32) > 0 {
            // A hot seller: the first person of the newest block.
            (self.last_base0_person_id(event_id) / HOT_SELLER_RATIO) * HOT_SELLER_RATIO
        } else {
            self.next_base0_person_id(event_id, random)
        };
        let seller = base0_seller + FIRST_PERSON_ID;
        let category = FIRST_CATEGORY_ID + i64::from(random.next_int_bounded(NUM_CATEGORIES));
        let initial_bid = next_price(random);
        let expires_ms = timestamp_ms.wrapping_add(self.next_auction_length_ms(events_so_far, random, timestamp_ms));
        let item_name = next_string(random, 20, ' ');
        let description = next_string(random, 100, ' ');
        let reserve = initial_bid + next_price(random);
        let current_size = AUCTION_FIXED_BYTES + text_size(&item_name) + text_size(&description);
        let extra = next_extra(random, &self.pools.extra, current_size, self.config.auction_bytes_avg as i32);
        Auction {
            id,
            item_name,
            description,
            initial_bid,
            reserve,
            date_time_ms: timestamp_ms,
            expires_ms,
            seller,
            category,
            extra,
        }
    }

    fn next_bid(&self, event_id: i64, random: &mut JavaRandom, timestamp_ms: i64) -> Bid {
        let base0_auction = if random.next_int_bounded(self.config.hot_auction_ratio as i32) > 0 {
            // A hot auction: the first of the newest block.
            (self.last_base0_auction_id(event_id) / HOT_AUCTION_RATIO) * HOT_AUCTION_RATIO
        } else {
            self.next_base0_auction_id(event_id, random)
        };
        let auction = base0_auction + FIRST_AUCTION_ID;
        let base0_bidder = if random.next_int_bounded(self.config.hot_bidders_ratio as i32) > 0 {
            // A hot bidder: the second person of the newest block, so that hot bidders and hot
            // sellers differ.
            (self.last_base0_person_id(event_id) / HOT_BIDDER_RATIO) * HOT_BIDDER_RATIO + 1
        } else {
            self.next_base0_person_id(event_id, random)
        };
        let price = next_price(random);
        let (channel, url) = if random.next_int_bounded(HOT_CHANNELS_RATIO) > 0 {
            let index = random.next_int_bounded(HOT_CHANNELS.len() as i32) as usize;
            (HOT_CHANNELS[index], self.pools.channels.hot_urls[index].as_str())
        } else {
            let number = random.next_int_bounded(CHANNELS_NUMBER) as usize;
            let channel = &self.pools.channels.channels[number];
            (channel.name.as_str(), channel.url.as_str())
        };
        // Quirk kept: the reference adds the first person id to the bidder twice (the second
        // time after drawing the channel, which leaves the draws unchanged).
        let bidder = base0_bidder + 2 * FIRST_PERSON_ID;
        let extra = next_extra(random, &self.pools.extra, BID_FIXED_BYTES, self.config.bid_bytes_avg as i32);
        Bid {
            auction,
            bidder,
            price,
            channel: channel.to_owned(),
            url: url.to_owned(),
            date_time_ms: timestamp_ms,
            extra,
        }
    }
}

/// `LongGenerator.nextLong`: a value in `[0, bound)` (`bound > 0`), through `nextInt` when the
/// bound fits an `int`, else (skewed, as the reference warns) `|nextLong() % bound|`.
fn next_long(random: &mut JavaRandom, bound: i64) -> i64 {
    debug_assert!(bound > 0);
    if bound < i64::from(i32::MAX) {
        i64::from(random.next_int_bounded(bound as i32))
    } else {
        (random.next_long() % bound).wrapping_abs()
    }
}

/// `PriceGenerator.nextPrice`: `round(10^(6u) * 100)` for a uniform `u`, so prices (in cents)
/// spread log-uniformly over 1.00 to 1,000,000.00.
fn next_price(random: &mut JavaRandom) -> i64 {
    java_round(10f64.powf(random.next_double() * 6.0) * 100.0)
}

/// One of `choices`, by `nextInt(choices.len())`.
fn pick(random: &mut JavaRandom, choices: &[&'static str]) -> &'static str {
    choices[random.next_int_bounded(choices.len() as i32) as usize]
}

/// Java's `String.length()` for the generator's texts, which are all ASCII (so UTF-16 units
/// and bytes agree). Texts are short (pool-bounded), far below `i32::MAX`.
fn text_size(text: &str) -> i32 {
    debug_assert!(text.is_ascii());
    text.len() as i32
}

/// The events of a [`NexmarkGenerator`] from some offset on, in order; made by
/// [`NexmarkGenerator::events_from`]. Owns a (cheap) clone of the generator, so it can move to
/// another thread.
#[derive(Clone, Debug)]
pub struct Events {
    generator: NexmarkGenerator,
    next_offset: u64,
}

impl Events {
    /// The offset of the event the next call to `next` yields: where to resume after a
    /// restart.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }
}

impl Iterator for Events {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if self.next_offset >= self.generator.max_events {
            return None;
        }
        let event = self.generator.event(self.next_offset);
        self.next_offset += 1;
        Some(event)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.generator.max_events.saturating_sub(self.next_offset);
        match usize::try_from(left) {
            Ok(left) => (left, Some(left)),
            Err(_) => (usize::MAX, None),
        }
    }
}

impl FusedIterator for Events {}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_generator() -> NexmarkGenerator {
        NexmarkGenerator::new(NexmarkConfig::default())
    }

    #[test]
    fn ids_follow_the_one_three_forty_six_pattern() {
        let generator = default_generator();
        assert_eq!(generator.event_id(0), 2);
        // Ids 2, 3 are auctions, 4..=49 bids, 50 a person, 51..=53 auctions.
        let kinds: String = (0..52)
            .map(|offset| match generator.event(offset) {
                Event::Person(_) => 'p',
                Event::Auction(_) => 'a',
                Event::Bid(_) => 'b',
            })
            .collect();
        assert_eq!(kinds, format!("aa{}paaa", "b".repeat(46)));
    }

    #[test]
    fn timestamps_advance_100_us_per_event() {
        let generator = default_generator();
        // Event number = offset + 1, so offsets 0..=8 fall in the first millisecond.
        assert_eq!(generator.event_time_ms(8), 1_436_918_400_000);
        assert_eq!(generator.event_time_ms(9), 1_436_918_400_001);
        assert_eq!(generator.event_time_ms(9_999), 1_436_918_401_000);
        for offset in [0, 1, 49, 50, 12_345] {
            assert_eq!(generator.event(offset).date_time_ms(), generator.event_time_ms(offset));
        }
    }

    #[test]
    fn out_of_order_groups_permute_event_numbers() {
        let config = NexmarkConfig { out_of_order_group_size: 10, ..NexmarkConfig::default() };
        let generator = NexmarkGenerator::new(config);
        // Offsets 9..19 are event numbers 10..20, one whole group: 953 is coprime to 10, so
        // the adjusted numbers are a permutation of the group.
        let mut ids: Vec<i64> = (9..19).map(|offset| generator.event_id(offset)).collect();
        assert_ne!(ids, (11..21).collect::<Vec<_>>());
        ids.sort_unstable();
        assert_eq!(ids, (11..21).collect::<Vec<_>>());
    }

    #[test]
    fn auctions_expire_after_they_open_and_prices_are_ordered() {
        let generator = default_generator();
        for event in generator.events_from(0).take(5_000) {
            if let Event::Auction(auction) = event {
                assert!(auction.expires_ms > auction.date_time_ms);
                assert!(auction.reserve >= auction.initial_bid);
                assert!((10..15).contains(&auction.category));
            }
        }
    }

    #[test]
    fn iteration_stops_at_max_events() {
        let config = NexmarkConfig { max_events: 3, ..NexmarkConfig::default() };
        let generator = NexmarkGenerator::new(config);
        let mut events = generator.events_from(1);
        assert_eq!(events.size_hint(), (2, Some(2)));
        assert_eq!(events.by_ref().count(), 2);
        assert_eq!(events.next_offset(), 3);
        assert_eq!(events.next(), None);
    }

    #[test]
    #[should_panic(expected = "beyond the last event")]
    fn offsets_beyond_max_events_panic() {
        let config = NexmarkConfig { max_events: 3, ..NexmarkConfig::default() };
        NexmarkGenerator::new(config).event(3);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let config = NexmarkConfig { events_per_second: 0, ..NexmarkConfig::default() };
        let error = NexmarkGenerator::try_new(config).map(|_| ()).unwrap_err();
        assert_eq!(error.knob, "events_per_second");
    }

    #[test]
    fn next_long_matches_java_on_both_paths() {
        // OpenJDK 17: `Math.abs(new Random(5).nextLong() % (1L << 40))`.
        assert_eq!(next_long(&mut JavaRandom::new(5), 1 << 40), 278_414_374_056);
        // Narrow bounds go through `nextInt(bound)`; `new Random(42).nextInt(10)` is 0.
        assert_eq!(next_long(&mut JavaRandom::new(42), 10), 0);
    }
}
