//! Benchmarks of the dataflow engine, each against a baseline measured in the same run.
//!
//! - `chain`: a chained stateless pipeline (map, filter, map) on the sharded engine against a
//!   hand-written Rust loop doing the same work.
//! - `keyed`: a keyed count (key_by to the owning shard, count in the mapped state) at
//!   parallelism 1 and 2: events/s and the scaling ratio.
//! - `latency`: source-to-sink latency percentiles at a fixed input rate (half the measured
//!   peak), through a keyed exchange and a stateful operator.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use weir::prelude::*;
use weir::source::{DeadLetter, ReadStatus};

/// Numbers `0..count` by offset (deterministic, replayable).
#[derive(Debug, Clone, Copy)]
pub struct Numbers {
    /// How many.
    pub count: u64,
}

impl Generator for Numbers {
    type Out = u64;
    #[inline]
    fn generate(&self, offset: u64) -> Option<u64> {
        (offset < self.count).then_some(offset)
    }
}

/// A sink that sums what it sees (so nothing is optimised away) and counts records.
#[derive(Debug, Clone, Default)]
pub struct SumSink {
    /// Sum of all records.
    pub sum: Arc<AtomicU64>,
    /// Records seen.
    pub count: Arc<AtomicU64>,
}

/// The writer of a [`SumSink`].
#[derive(Debug)]
pub struct SumWriter {
    sink: SumSink,
    sum: u64,
    count: u64,
}

impl Sink for SumSink {
    type In = u64;
    type Writer = SumWriter;
    fn writer(&self, _: usize, _: usize) -> weir::Result<SumWriter> {
        Ok(SumWriter { sink: self.clone(), sum: 0, count: 0 })
    }
}

impl SinkWriter for SumWriter {
    type In = u64;
    #[inline]
    fn write(&mut self, value: u64, _: i64) -> weir::Result<()> {
        self.sum = self.sum.wrapping_add(value);
        self.count += 1;
        Ok(())
    }
    fn flush(&mut self) -> weir::Result<()> {
        self.sink.sum.fetch_add(std::mem::take(&mut self.sum), Ordering::Relaxed);
        self.sink.count.fetch_add(std::mem::take(&mut self.count), Ordering::Relaxed);
        Ok(())
    }
}

#[inline]
fn step1(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}
#[inline]
fn keep(x: &u64) -> bool {
    !x.is_multiple_of(5)
}
#[inline]
fn step2(x: u64) -> u64 {
    x ^ (x >> 3)
}

fn config(parallelism: usize, data_dir: &std::path::Path) -> JobConfig {
    JobConfig { data_dir: data_dir.to_owned(), ..JobConfig::default() }.with_parallelism(parallelism)
}

/// Result of the chain benchmark.
#[derive(Debug, Clone, Copy)]
pub struct ChainResult {
    /// Records.
    pub records: u64,
    /// Records/s through the engine (P = 1).
    pub engine_per_s: f64,
    /// Records/s of the hand-written loop.
    pub loop_per_s: f64,
}

/// Rounds of the chain benchmark: the engine and the loop alternate, and each keeps its best
/// round, so a burst of noise on the machine hits neither side alone.
const CHAIN_ROUNDS: usize = 3;

/// The chained stateless pipeline against a hand-written loop, `records` each, best of
/// [`CHAIN_ROUNDS`] alternating rounds.
pub fn chain(records: u64, data_dir: &std::path::Path) -> weir::Result<ChainResult> {
    let (mut loop_time, mut engine_time) = (Duration::MAX, Duration::MAX);
    for _ in 0..CHAIN_ROUNDS {
        let started = Instant::now();
        let mut sum = 0u64;
        for i in 0..black_box(records) {
            let x = step1(i);
            if keep(&x) {
                sum = sum.wrapping_add(step2(x));
            }
        }
        black_box(sum);
        loop_time = loop_time.min(started.elapsed());

        let job = Job::new("chain-bench");
        let sink = SumSink::default();
        job.source("numbers", GeneratorSource::new(Numbers { count: records }))
            .map("step1", step1)
            .filter("keep", keep)
            .map("step2", step2)
            .sink("sum", sink.clone());
        let started = Instant::now();
        job.run(config(1, data_dir))?.wait()?;
        engine_time = engine_time.min(started.elapsed());
        assert_eq!(sink.sum.load(Ordering::Relaxed), sum, "the engine and the loop must agree");
    }
    Ok(ChainResult {
        records,
        engine_per_s: records as f64 / engine_time.as_secs_f64(),
        loop_per_s: records as f64 / loop_time.as_secs_f64(),
    })
}

/// Events/s of a keyed count over `keys` keys at `parallelism`.
pub fn keyed(records: u64, keys: u64, parallelism: usize, data_dir: &std::path::Path) -> weir::Result<f64> {
    let job = Job::new("keyed-bench");
    let sink = SumSink::default();
    job.source("numbers", GeneratorSource::new(Numbers { count: records }))
        .key_by("by-key", move |n: &u64| n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys)
        .reduce("count", |_: &u64| 0u64, |n: u64, _: u64| n + 1)
        .sink("sum", sink.clone());
    let started = Instant::now();
    job.run(config(parallelism, data_dir))?.wait()?;
    let elapsed = started.elapsed();
    assert_eq!(sink.count.load(Ordering::Relaxed), records, "every record counted once");
    Ok(records as f64 / elapsed.as_secs_f64())
}

/// A source emitting `rate` records per second (per shard: `rate / P`), each stamped with its
/// creation time in nanoseconds since `epoch`.
#[derive(Debug, Clone)]
struct Paced {
    rate_per_s: f64,
    total: u64,
    epoch: Instant,
    /// Splits (the job's parallelism: a split a shard), each `rate / splits` per second.
    splits: u32,
}

struct PacedReader {
    rate_per_s: f64,
    per_shard: u64,
    produced: u64,
    started: Option<Instant>,
    epoch: Instant,
    key: u64,
}

impl Source for Paced {
    type Out = (u64, u64);
    type Reader = PacedReader;
    fn splits(&self) -> u32 {
        self.splits
    }
    fn reader(&self, split: u32) -> weir::Result<PacedReader> {
        let p = self.splits.max(1);
        Ok(PacedReader {
            rate_per_s: self.rate_per_s / f64::from(p),
            per_shard: self.total / u64::from(p),
            produced: 0,
            started: None,
            epoch: self.epoch,
            key: u64::from(split),
        })
    }
}

impl SourceReader for PacedReader {
    type Out = (u64, u64);
    fn read(&mut self, out: &mut Vec<(u64, u64)>, _: &mut Vec<DeadLetter>, max: usize) -> weir::Result<ReadStatus> {
        let started = *self.started.get_or_insert_with(Instant::now);
        if self.produced >= self.per_shard {
            return Ok(ReadStatus::End);
        }
        let due = ((started.elapsed().as_secs_f64() * self.rate_per_s) as u64).min(self.per_shard);
        if due <= self.produced {
            return Ok(ReadStatus::Idle);
        }
        let n = (due - self.produced).min(max as u64);
        for _ in 0..n {
            self.key = self.key.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            out.push((self.key >> 40, self.epoch.elapsed().as_nanos() as u64));
        }
        self.produced += n;
        Ok(ReadStatus::More)
    }
    fn offset(&self) -> u64 {
        self.produced
    }
    fn seek(&mut self, offset: u64) -> weir::Result<()> {
        self.produced = offset;
        Ok(())
    }
}

/// Latency percentiles (microseconds) at `rate_per_s` for `seconds`.
pub fn latency(
    rate_per_s: f64,
    seconds: f64,
    parallelism: usize,
    data_dir: &std::path::Path,
) -> weir::Result<Histogram<u64>> {
    let epoch = Instant::now();
    let total = (rate_per_s * seconds) as u64;
    let merged = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")));
    let job = Job::new("latency-bench");
    let sink_hist = Arc::clone(&merged);
    job.source("paced", Paced { rate_per_s, total, epoch, splits: parallelism as u32 })
        .key_by("by-key", |e: &(u64, u64)| e.0 % 10_000)
        .process("stamp", || Stamp { count: None })
        .sink("latency", LatencySink { merged: sink_hist, epoch });
    let mut cfg = config(parallelism, data_dir);
    cfg.source_batch = 64;
    job.run(cfg)?.wait()?;
    let h = merged.lock().map(|h| h.clone()).unwrap_or_else(|p| p.into_inner().clone());
    Ok(h)
}

/// Records end-to-end latency into a per-shard histogram, merged into the shared one on flush
/// (so the measurement itself takes no lock per record).
struct LatencySink {
    merged: Arc<Mutex<Histogram<u64>>>,
    epoch: Instant,
}

struct LatencyWriter {
    merged: Arc<Mutex<Histogram<u64>>>,
    local: Histogram<u64>,
    epoch: Instant,
}

impl Sink for LatencySink {
    type In = u64;
    type Writer = LatencyWriter;
    fn writer(&self, _: usize, _: usize) -> weir::Result<LatencyWriter> {
        Ok(LatencyWriter {
            merged: Arc::clone(&self.merged),
            local: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            epoch: self.epoch,
        })
    }
}

impl SinkWriter for LatencyWriter {
    type In = u64;
    fn write(&mut self, created_ns: u64, _: i64) -> weir::Result<()> {
        let latency_us = (self.epoch.elapsed().as_nanos() as u64).saturating_sub(created_ns) / 1_000;
        self.local.saturating_record(latency_us.max(1));
        Ok(())
    }
    fn flush(&mut self) -> weir::Result<()> {
        if let Ok(mut merged) = self.merged.lock() {
            let _ = merged.add(&self.local);
        }
        self.local.reset();
        Ok(())
    }
}

/// A stateful step on the latency path: counts per key, passes the creation stamp on.
struct Stamp {
    count: Option<ValueState<u64>>,
}

impl KeyedProcessFunction for Stamp {
    type Key = u64;
    type In = (u64, u64);
    type Out = u64;
    fn open(&mut self, states: &mut StateRegistry<'_>) -> weir::operators::Result<()> {
        self.count = Some(states.value("count")?);
        Ok(())
    }
    fn process(
        &mut self,
        (_, created): (u64, u64),
        ctx: &mut ProcessContext<'_, u64, u64>,
    ) -> weir::operators::Result<()> {
        let count = self.count.expect("opened");
        let n = ctx.value_ref(&count)?.map_or(0, |n| n.to_native());
        ctx.set(&count, &(n + 1))?;
        ctx.output(created);
        Ok(())
    }
}

/// Formats latency percentiles.
pub fn latency_percentiles(h: &Histogram<u64>) -> String {
    format!(
        "n={} p50={}us p99={}us p99.9={}us max={}us",
        h.len(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    )
}

/// Sleeps a little between benchmark phases so the previous job's threads are gone.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(100));
}
