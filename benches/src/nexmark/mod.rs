//! A faithful, deterministic Nexmark event generator.
//!
//! Nexmark models an online auction house as three event streams: persons register, persons
//! open auctions, persons bid on auctions. Its queries (joins, windows, top-k) are the common
//! yardstick of stream processors, and its numbers only compare across systems when the input
//! is the same. This module produces the *reference's* events, value for value: the generator
//! of the Nexmark Flink port (`nexmark/nexmark`, `nexmark-flink`), which descends from Apache
//! Beam's Nexmark and adds the bid `channel` and `url`.
//!
//! ```
//! use weir_bench::nexmark::{Event, NexmarkConfig, NexmarkGenerator};
//!
//! let generator = NexmarkGenerator::new(NexmarkConfig::default());
//! let first_line = generator.event(0).to_json();
//! assert!(first_line.starts_with(r#"{"type":"auction","id":1001,"itemName":"z ck w""#));
//! let bids = generator.events_from(0).take(500).filter(|e| matches!(e, Event::Bid(_))).count();
//! assert_eq!(bids, 460);
//! ```
//!
//! # Reproducibility
//!
//! Upstream draws from unseeded random generators, so no two runs agree. The convention used
//! here (Beam's own, and the first Flink port's) makes the stream a pure function of the
//! config:
//!
//! - the event at offset `k` has event number `first_event_number + k` (shuffled within
//!   out-of-order groups when those are enabled) and id `first_event_id + number`; it draws
//!   everything from a fresh [`JavaRandom`] (a bit-exact `java.util.Random`) seeded with its
//!   id. With the defaults, numbers start at 1 and ids at 2, as in the Flink source;
//! - the reusable extra-string pool (1 MiB that `extra` fields are cut from) is drawn from
//!   `java.util.Random(0)`; the four hot-channel urls and then the 10,000 channel urls, in the
//!   reference's order, from one `java.util.Random(1)`;
//! - event time is `base_time_ms + (number * 1e6 / events_per_second) µs`, truncated to
//!   milliseconds as the reference does; the default base time is 1436918400000
//!   (2015-07-15T00:00:00Z) and the default rate 10,000 events per second.
//!
//! Because an event depends on its offset alone, [`NexmarkGenerator::event`] is random access:
//! a source can resume from any offset after a restart and replay exactly what it emitted.
//! The golden test (`benches/tests/nexmark_golden.rs`) holds the first 500 events to
//! `shared/nexmark/events-default-500.jsonl` byte for byte.
//!
//! # Quirks kept
//!
//! The point is the reference's stream, so its oddities stay:
//!
//! - every bidder id has the first person id (1000) added twice, so bidders are 2000 and up
//!   while persons are 1000 and up;
//! - a channel's `channel_id` url parameter is `Math.abs(Integer.reverse(n))`, and Java's
//!   `abs` leaves `i32::MIN` alone: channel 1's id is -2147483648;
//! - `extra` text holds `H`..`z` (including `[`, `\`, `^`, `` ` ``), not just letters:
//!   `'a' + rnd % 26` with Java's signed remainder;
//! - cold picks of persons and auctions may name ids not generated yet (a lead of 10), and
//!   wide random ranges fall back to the skewed `|nextLong() % n|`;
//! - `Math.round` rounds ties up and `String.trim` trims only the ends, so an email's local
//!   part may hold inner spaces.
//!
//! One dependence is outside this code: prices are `round(10^(6u) * 100)` with `u` from
//! `nextDouble`, and Rust's `powf` (the platform libm) and the JVM's `Math.pow` are both
//! within an ulp of the exact power but are not promised to agree on every input. A
//! disagreement changes a price only when `10^(6u) * 100` lies within an ulp of a `.5`; none
//! occurs in the golden events.
//!
//! # Layout
//!
//! | file             | owns                                                          |
//! |------------------|---------------------------------------------------------------|
//! | `java_random.rs` | [`JavaRandom`], the `java.util.Random` port                   |
//! | `config.rs`      | [`NexmarkConfig`] (the reference's knobs and defaults), [`ConfigError`] |
//! | `model.rs`       | [`Event`], [`Person`], [`Auction`], [`Bid`] and their JSON form |
//! | `strings.rs`     | random texts and the extra-string pool                        |
//! | `channels.rs`    | the channel and url table                                     |
//! | `generator.rs`   | [`NexmarkGenerator`] and its iterator [`Events`]              |
//!
//! The generator knows nothing of clocks or threads: pacing events to wall-clock time, and
//! splitting offsets among cores, belong to the runtime's source that wraps it.

mod channels;
mod config;
mod generator;
mod java_random;
mod model;
mod strings;

pub use config::{ConfigError, NexmarkConfig};
pub use generator::{Events, NexmarkGenerator};
pub use java_random::JavaRandom;
pub use model::{Auction, Bid, Event, Person};
