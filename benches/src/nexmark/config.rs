//! The generator's knobs, with the reference's defaults.

use std::error::Error;
use std::fmt;

/// The largest value a Java `int` holds; knobs that the reference keeps in an `int` stay below.
const JAVA_INT_MAX: u32 = i32::MAX as u32;

/// What the generator produces, as the reference's `NexmarkConfiguration` and
/// `GeneratorConfig` describe it. [`Default`] is the reference's default configuration with
/// the golden files' base time; two generators with equal configs produce equal events.
///
/// The knobs the reference keeps in a Java `int` must stay at most `i32::MAX`;
/// [`NexmarkConfig::validate`] checks this and every other precondition.
#[derive(Clone, Debug, PartialEq)]
pub struct NexmarkConfig {
    /// Added to an event's (adjusted) number to form its id, which seeds its random draws and
    /// decides its kind. The reference's Flink source uses 1.
    pub first_event_id: i64,
    /// The number of the event at offset 0; numbers place events in time. The reference's Flink
    /// source uses 1, so the first event has id 2 and lies 100 µs after the base time.
    pub first_event_number: i64,
    /// Event time of event number 0, epoch milliseconds. Default 1436918400000
    /// (2015-07-15T00:00:00Z), the golden files' base time; upstream takes the wall clock.
    pub base_time_ms: i64,
    /// Event-time rate: event number `n` lies `n * 1e6 / events_per_second` µs after the base
    /// time. Default 10,000. (The reference's square and sine rate shapes are not modelled;
    /// its Flink port only uses the first rate too.)
    pub events_per_second: u32,
    /// Out of every `person + auction + bid` consecutive event ids, this many are persons.
    /// Default 1.
    pub person_proportion: u32,
    /// Auctions per proportion period. Default 3.
    pub auction_proportion: u32,
    /// Bids per proportion period. Default 46.
    pub bid_proportion: u32,
    /// Average size a person event is padded to (the `extra` field), in the reference's
    /// idealised bytes. Default 200.
    pub person_bytes_avg: u32,
    /// Average size an auction event is padded to. Default 500.
    pub auction_bytes_avg: u32,
    /// Average size a bid event is padded to. Default 100.
    pub bid_bytes_avg: u32,
    /// A bid goes to a hot auction with probability `1 - 1 / hot_auction_ratio`. Default 2.
    pub hot_auction_ratio: u32,
    /// An auction has a hot seller with probability `1 - 1 / hot_sellers_ratio`. Default 4.
    pub hot_sellers_ratio: u32,
    /// A bid comes from a hot bidder with probability `1 - 1 / hot_bidders_ratio`. Default 4.
    pub hot_bidders_ratio: u32,
    /// About how many auctions are open at a time; sets auction lengths and the range that
    /// cold bids pick auctions from. Default 100.
    pub num_in_flight_auctions: u32,
    /// How many of the most recent persons cold bids and auctions pick from. Default 1000.
    pub num_active_people: u32,
    /// Events are shuffled within groups of this many consecutive numbers; 1 keeps them in
    /// order. Default 1.
    pub out_of_order_group_size: u64,
    /// How many events the generator yields; 0 means the reference's maximum,
    /// `i64::MAX / (total proportion * largest average size)`. Default 0.
    pub max_events: u64,
}

impl Default for NexmarkConfig {
    fn default() -> Self {
        Self {
            first_event_id: 1,
            first_event_number: 1,
            base_time_ms: 1_436_918_400_000,
            events_per_second: 10_000,
            person_proportion: 1,
            auction_proportion: 3,
            bid_proportion: 46,
            person_bytes_avg: 200,
            auction_bytes_avg: 500,
            bid_bytes_avg: 100,
            hot_auction_ratio: 2,
            hot_sellers_ratio: 4,
            hot_bidders_ratio: 4,
            num_in_flight_auctions: 100,
            num_active_people: 1000,
            out_of_order_group_size: 1,
            max_events: 0,
        }
    }
}

impl NexmarkConfig {
    /// Checks every precondition the generator relies on (each mirrors a place where the
    /// reference would throw or overflow an `int`), naming the first knob that breaks one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("first_event_id", self.first_event_id, 0, i64::MAX)?;
        check_range("first_event_number", self.first_event_number, 0, i64::MAX)?;
        check_range("events_per_second", self.events_per_second, 1, u32::MAX)?;
        check_range("person_proportion", self.person_proportion, 0, JAVA_INT_MAX)?;
        check_range("auction_proportion", self.auction_proportion, 0, JAVA_INT_MAX)?;
        check_range("bid_proportion", self.bid_proportion, 0, JAVA_INT_MAX)?;
        check_range("total proportion", self.total_proportion(), 1, i64::from(JAVA_INT_MAX))?;
        check_range("person_bytes_avg", self.person_bytes_avg, 0, JAVA_INT_MAX)?;
        check_range("auction_bytes_avg", self.auction_bytes_avg, 0, JAVA_INT_MAX)?;
        check_range("bid_bytes_avg", self.bid_bytes_avg, 0, JAVA_INT_MAX)?;
        check_range("hot_auction_ratio", self.hot_auction_ratio, 1, JAVA_INT_MAX)?;
        check_range("hot_sellers_ratio", self.hot_sellers_ratio, 1, JAVA_INT_MAX)?;
        check_range("hot_bidders_ratio", self.hot_bidders_ratio, 1, JAVA_INT_MAX)?;
        check_range("num_in_flight_auctions", self.num_in_flight_auctions, 0, JAVA_INT_MAX)?;
        check_range("num_active_people", self.num_active_people, 0, JAVA_INT_MAX)?;
        check_range("out_of_order_group_size", self.out_of_order_group_size, 1, i64::MAX as u64)?;
        check_range("max_events", self.max_events, 0, i64::MAX as u64)?;
        Ok(())
    }

    /// `person_proportion + auction_proportion + bid_proportion`: the period, in event ids, of
    /// the person/auction/bid pattern.
    pub fn total_proportion(&self) -> i64 {
        i64::from(self.person_proportion) + i64::from(self.auction_proportion) + i64::from(self.bid_proportion)
    }

    /// The number of events a generator with this config yields: [`NexmarkConfig::max_events`]
    /// if set, else the reference's maximum.
    pub fn effective_max_events(&self) -> u64 {
        if self.max_events != 0 {
            return self.max_events;
        }
        let bytes_avg_max = self.person_bytes_avg.max(self.auction_bytes_avg).max(self.bid_bytes_avg);
        // The reference divides by this product unguarded; a zero (all sizes zero) would throw
        // there, and is read as 1 here.
        let divisor = (self.total_proportion() * i64::from(bytes_avg_max)).max(1);
        (i64::MAX / divisor) as u64
    }

    /// Microseconds between consecutive event numbers, `1e6 / events_per_second`, as a `double`
    /// like the reference's (which makes timestamps of fractional delays round the same way).
    pub fn inter_event_delay_us(&self) -> f64 {
        1_000_000.0 / f64::from(self.events_per_second)
    }
}

fn check_range<T>(knob: &'static str, value: T, min: T, max: T) -> Result<(), ConfigError>
where
    T: PartialOrd + fmt::Display,
{
    if value < min || value > max {
        return Err(ConfigError { knob, value: value.to_string(), allowed: format!("{min}..={max}") });
    }
    Ok(())
}

/// A [`NexmarkConfig`] knob is out of its allowed range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The knob (field name) at fault.
    pub knob: &'static str,
    /// Its value.
    pub value: String,
    /// The allowed range, inclusive.
    pub allowed: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid Nexmark config: {} = {} is outside {}", self.knob, self.value, self.allowed)
    }
}

impl Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_matches_the_reference() {
        let config = NexmarkConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.total_proportion(), 50);
        assert_eq!(config.inter_event_delay_us(), 100.0);
        // Long.MAX_VALUE / (50 * 500), as the reference computes its maxEvents.
        assert_eq!(config.effective_max_events(), 368_934_881_474_191);
    }

    #[test]
    fn invalid_knobs_are_named() {
        let config = NexmarkConfig { hot_bidders_ratio: 0, ..NexmarkConfig::default() };
        let error = config.validate().unwrap_err();
        assert_eq!(error.knob, "hot_bidders_ratio");
        assert_eq!(error.to_string(), "invalid Nexmark config: hot_bidders_ratio = 0 is outside 1..=2147483647");

        let config = NexmarkConfig {
            person_proportion: 0,
            auction_proportion: 0,
            bid_proportion: 0,
            ..NexmarkConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().knob, "total proportion");
    }
}
