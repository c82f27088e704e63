//! Nexmark queries on the engine, over the deterministic generator (a replayable source: event
//! `n` is computed from its offset).
//!
//! - Q1 currency conversion: every bid's price in euros (a chained `filter` + `map`).
//! - Q2 selection: bids on every 123rd auction.
//! - Q5 hot items: bids counted per auction in sliding event-time windows (10 s, every 2 s), then
//!   per window the auction with the most bids (two keyed exchanges, windows and a reduce).

use std::sync::Arc;
use std::time::Instant;

use weir::prelude::*;

use crate::nexmark::{Event, NexmarkConfig, NexmarkGenerator};
use crate::pipeline_bench::SumSink;

/// The first `count` Nexmark events as a replayable source.
#[derive(Debug, Clone)]
pub struct NexmarkEvents {
    generator: Arc<NexmarkGenerator>,
    count: u64,
}

impl NexmarkEvents {
    /// The first `count` events of the default configuration.
    pub fn new(count: u64) -> Self {
        NexmarkEvents { generator: Arc::new(NexmarkGenerator::new(NexmarkConfig::default())), count }
    }
}

impl Generator for NexmarkEvents {
    type Out = Event;
    fn generate(&self, offset: u64) -> Option<Event> {
        (offset < self.count && offset < self.generator.max_events()).then(|| self.generator.event(offset))
    }
}

type EventTime = fn(&Event, Option<i64>) -> i64;

fn event_time() -> WatermarkStrategy<weir::operators::time::BoundedOutOfOrderness, EventTime> {
    WatermarkStrategy::bounded_out_of_orderness(0).with_timestamp_assigner(|e: &Event, _| e.date_time_ms())
}

fn bid(e: Event) -> Option<crate::nexmark::Bid> {
    match e {
        Event::Bid(b) => Some(b),
        _ => None,
    }
}

/// Which query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// Currency conversion.
    Q1,
    /// Selection.
    Q2,
    /// Hot items.
    Q5,
}

/// Runs `query` over `events` events at `parallelism`; returns (events/s, result records).
pub fn run(query: Query, events: u64, parallelism: usize, data_dir: &std::path::Path) -> weir::Result<(f64, u64)> {
    let job = Job::new("nexmark");
    let source = job.source_with_watermarks("events", GeneratorSource::new(NexmarkEvents::new(events)), event_time());
    let sink = SumSink::default();
    match query {
        Query::Q1 => {
            source
                .flat_map("bids", bid)
                .map("to-euro", |b: crate::nexmark::Bid| (b.price as f64 * 0.908) as u64)
                .sink("out", sink.clone());
        }
        Query::Q2 => {
            source
                .flat_map("bids", bid)
                .filter("every-123rd", |b: &crate::nexmark::Bid| b.auction % 123 == 0)
                .map("price", |b: crate::nexmark::Bid| b.price as u64)
                .sink("out", sink.clone());
        }
        Query::Q5 => {
            source
                .flat_map("bids", |e: Event| bid(e).map(|b| b.auction))
                .key_by("by-auction", |a: &i64| *a)
                .window("sliding", SlidingWindows::event_time(10_000, 2_000))
                .aggregate(Count::new(), |a: &i64, w: TimeWindow, n: u64| (w.start(), *a, n))
                .key_by("by-window", |r: &(i64, i64, u64)| r.0)
                .reduce(
                    "hottest",
                    |w: &i64| (*w, 0i64, 0u64),
                    |best: (i64, i64, u64), r: (i64, i64, u64)| {
                        if r.2 > best.2 || (r.2 == best.2 && r.1 < best.1) { r } else { best }
                    },
                )
                .map("count", |best: (i64, i64, u64)| best.2)
                .sink("out", sink.clone());
        }
    }
    let config = JobConfig { data_dir: data_dir.to_owned(), ..JobConfig::default() }.with_parallelism(parallelism);
    let started = Instant::now();
    job.run(config)?.wait()?;
    let elapsed = started.elapsed();
    Ok((events as f64 / elapsed.as_secs_f64(), sink.count.load(std::sync::atomic::Ordering::Relaxed)))
}
