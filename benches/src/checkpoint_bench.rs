//! Benchmarks of checkpoints in running jobs, each against a baseline measured in the same run.
//!
//! - `overhead`: the keyed count of [`crate::pipeline_bench::keyed`] without checkpoints (the
//!   baseline) and with aligned checkpoints at a given interval: events/s, and the checkpoints'
//!   durations (trigger to manifest durable), alignments and durability syncs.
//! - `recovery`: a job builds keyed state of a given size (a `[u8; 96]` value per key, so a
//!   record is a 144-byte slot) and a user function panics; the job restarts in-process from
//!   its latest checkpoint. Recovery time runs from the panic to the first record that reaches
//!   a sink after the restart. The job fails twice: right after its state was written and a
//!   checkpoint covered it (the restore replays what the log gained since the store's last
//!   index snapshot), and again once an index snapshot covers the state (the restore replays
//!   almost nothing). The claim under test: recovery does not grow with the state, because a
//!   restore maps the store's files instead of rebuilding them.
//! - `at_scale` (`checkpoint-scale`): checkpoint durations of a job holding a large state of
//!   which a share is rewritten per interval; the baselines ([`sync_floor`]) sync the same bytes
//!   per interval without the runtime, written each of the ways [`FloorVia`] names.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use weir::checkpointing::{CheckpointSettings, CheckpointStats, RestartStrategy};
use weir::prelude::*;
use weir::source::{DeadLetter, ReadStatus};
use weir_state::manifest::CheckpointDirectory;
use weir_state::record::slot_bytes;
use weir_state::segment::SEGMENT_HEADER_BYTES;

use crate::pipeline_bench::{Numbers, SumSink};

/// A fresh directory under `base` for one run; removed when dropped.
fn run_dir(base: &Path, prefix: &str) -> weir::Result<tempfile::TempDir> {
    let io = |what: &str, e: std::io::Error| RuntimeError::Checkpoint(format!("cannot create {what}: {e}"));
    std::fs::create_dir_all(base).map_err(|e| io(&base.display().to_string(), e))?;
    tempfile::Builder::new().prefix(prefix).tempdir_in(base).map_err(|e| io("a run directory", e))
}

/// p50 and p99 of some durations, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    /// Median, microseconds.
    pub p50_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
}

impl Percentiles {
    /// Percentiles of `durations` (zero when there are none).
    pub fn of(durations: impl Iterator<Item = Duration>) -> Percentiles {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        for d in durations {
            h.saturating_record((d.as_micros() as u64).max(1));
        }
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles { p50_us: h.value_at_quantile(0.5), p99_us: h.value_at_quantile(0.99) }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |us: u64| us as f64 / 1000.0;
        write!(f, "p50={:.2}ms p99={:.2}ms", ms(self.p50_us), ms(self.p99_us))
    }
}

/// What the coordinator measured of a job's complete checkpoints.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckpointSummary {
    /// Complete checkpoints (the final one, taken after the last record, included).
    pub completed: usize,
    /// Aborted checkpoints.
    pub aborted: usize,
    /// Trigger to complete (manifest durable).
    pub duration: Percentiles,
    /// The longest barrier alignment of any stage instance, per checkpoint.
    pub alignment: Percentiles,
    /// The longest durability task (fsync, msync, index snapshot), per checkpoint.
    pub sync: Percentiles,
    /// Checkpoints past the replay bound (they wrote, or waited for, an index snapshot).
    pub bounded: usize,
}

impl CheckpointSummary {
    /// Summarises `stats`.
    pub fn of(stats: &CheckpointStats) -> CheckpointSummary {
        let completed = &stats.completed;
        CheckpointSummary {
            completed: completed.len(),
            aborted: stats.aborted.len(),
            duration: Percentiles::of(completed.iter().map(|c| c.duration)),
            alignment: Percentiles::of(completed.iter().map(|c| c.alignment)),
            sync: Percentiles::of(completed.iter().map(|c| c.sync)),
            bounded: completed.iter().filter(|c| c.past_replay_bound).count(),
        }
    }
}

/// One run of the keyed count.
#[derive(Debug, Clone, Copy)]
pub struct OverheadRun {
    /// Records/s from `run` until the job finished (with checkpoints: including the final
    /// checkpoint, which commits the last output).
    pub events_per_s: f64,
    /// The job's checkpoints (`None` without checkpointing).
    pub checkpoints: Option<CheckpointSummary>,
}

/// The keyed count (`records` over `keys` keys, rolling count per key, a summing sink) at
/// `parallelism`, checkpointed every `interval_ms` (`None`: without checkpoints), with its
/// state in a fresh directory under `base`. With `durable_sink` every count goes to an
/// exactly-once [`weir::twophase::DurableCallbackSink`] (a file per shard and checkpoint)
/// instead.
pub fn overhead(
    records: u64,
    keys: u64,
    parallelism: usize,
    interval_ms: Option<i64>,
    durable_sink: bool,
    base: &Path,
) -> weir::Result<OverheadRun> {
    let dir = run_dir(base, "checkpoint-overhead")?;
    let job = Job::new("checkpoint-overhead");
    let sink = SumSink::default();
    let counts = job
        .source("numbers", GeneratorSource::new(Numbers { count: records }))
        .key_by("by-key", move |n: &u64| n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys)
        .reduce("count", |_: &u64| 0u64, |n: u64, _: u64| n + 1);
    if durable_sink {
        let delivered = Arc::clone(&sink.count);
        let deliver = move |c: weir::twophase::Committed<u64>| {
            delivered.fetch_add(c.records.len() as u64, Ordering::Relaxed);
        };
        counts.sink("sum", weir::twophase::DurableCallbackSink::new(dir.path().join("out"), deliver));
    } else {
        counts.sink("sum", sink.clone());
    }
    let mut config =
        JobConfig { data_dir: dir.path().to_owned(), ..JobConfig::default() }.with_parallelism(parallelism);
    if let Some(interval_ms) = interval_ms {
        config = config.with_checkpointing(CheckpointSettings::new(dir.path().join("checkpoints"), interval_ms));
    }
    let started = Instant::now();
    let report = job.run(config)?.wait()?;
    let elapsed = started.elapsed();
    assert_eq!(sink.count.load(Ordering::Relaxed), records, "every record counted once");
    dir.close().map_err(|e| RuntimeError::Checkpoint(format!("cannot remove the run directory: {e}")))?;
    Ok(OverheadRun {
        events_per_s: records as f64 / elapsed.as_secs_f64(),
        checkpoints: interval_ms.map(|_| CheckpointSummary::of(&report.checkpoints)),
    })
}

/// The value kept per key by the recovery benchmark: with an 8-byte key its record fills a
/// 144-byte slot.
pub type Payload = [u8; 96];

/// Bytes one key of the recovery benchmark's state takes in the log.
pub const RECORD_BYTES: u64 = slot_bytes(8, std::mem::size_of::<Payload>() as u32) as u64;

/// Records per second the source emits once every key was written (updates of existing keys),
/// summed over shards: the job keeps producing output, at little cost, while the benchmark
/// waits for checkpoints and after each restart.
const TRICKLE_PER_S: f64 = 20_000.0;

/// Checkpoint interval of the recovery benchmark.
const RECOVERY_INTERVAL_MS: i64 = 200;

/// What the second failure of the recovery benchmark waits for: a checkpoint whose restore
/// replays less than this.
const SMALL_REPLAY: u64 = 8 << 20;

/// Failures the recovery benchmark injects into one job (see [`recovery`]).
const FAILURES: usize = 2;

/// When things happened around one injected failure.
#[derive(Debug, Clone, Copy)]
struct FailureMarks {
    /// Just before the panic.
    failed_at: Instant,
    /// The first source reader made after it (the new attempt's shards run).
    restarted_at: Option<Instant>,
    /// The first operator opened after it (its stage's stores were restored).
    reopened_at: Option<Instant>,
    /// The last operator opened after it (every shard's stores were restored).
    all_reopened_at: Option<Instant>,
    /// Operators opened after it (one per shard).
    reopened: usize,
    /// The first record a sink wrote after it.
    first_output_at: Option<Instant>,
}

/// What the recovery benchmark's job and the benchmark thread share.
#[derive(Debug, Default)]
struct RecoveryProbe {
    /// Keys the operator created (first writes), summed over shards.
    inserted: AtomicU64,
    /// The benchmark asks for a failure: the next record panics.
    fail: AtomicBool,
    /// One entry per failure injected so far; a run attempt is number `failures.len()` when it
    /// starts (its readers, operators and writers are made after the panic that ended the
    /// previous one).
    failures: Mutex<Vec<FailureMarks>>,
    /// The source ends its input.
    stop: AtomicBool,
    /// Records the sinks wrote (added at each flush).
    outputs: AtomicU64,
}

impl RecoveryProbe {
    /// The run attempt starting now (0: the first).
    fn attempt(&self) -> usize {
        lock(&self.failures).len()
    }

    /// Notes `now` in the field `mark` selects of the failure before `attempt`, if it is the
    /// first such event.
    fn note(&self, attempt: usize, mark: impl FnOnce(&mut FailureMarks) -> &mut Option<Instant>) {
        let mut failures = lock(&self.failures);
        if let Some(marks) = attempt.checked_sub(1).and_then(|i| failures.get_mut(i)) {
            mark(marks).get_or_insert_with(Instant::now);
        }
    }

    /// Notes `now` in the field `mark` selects of the failure before `attempt`, over any
    /// earlier event.
    fn note_again(&self, attempt: usize, mark: impl FnOnce(&mut FailureMarks) -> &mut Option<Instant>) {
        let mut failures = lock(&self.failures);
        if let Some(marks) = attempt.checked_sub(1).and_then(|i| failures.get_mut(i)) {
            *mark(marks) = Some(Instant::now());
        }
    }

    fn marks(&self, failure: usize) -> Option<FailureMarks> {
        lock(&self.failures).get(failure).copied()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every key `0..keys` once (shard `s` of `P` writes keys `s, s + P, ...`), as fast as the job
/// takes them; then updates of existing keys at `rate_per_s` until told to stop. Records
/// are `(key, is_update)`; offsets count records, so a restarted reader replays exactly.
#[derive(Debug, Clone)]
struct FillThenTrickle {
    keys: u64,
    /// Updates per second once every key was written, summed over shards.
    rate_per_s: f64,
    probe: Arc<RecoveryProbe>,
    /// Splits: split `s` of `n` writes keys `s, s + n, ...` (the job's parallelism, so each
    /// shard reads one).
    splits: u32,
}

struct FillReader {
    probe: Arc<RecoveryProbe>,
    shard: u64,
    stride: u64,
    /// Keys this shard writes.
    fill: u64,
    produced: u64,
    /// Offset and time at which this reader began trickling.
    trickle_from: Option<(u64, Instant)>,
    rate_per_s: f64,
}

impl Source for FillThenTrickle {
    type Out = (u64, bool);
    type Reader = FillReader;
    fn splits(&self) -> u32 {
        self.splits
    }
    fn reader(&self, split: u32) -> weir::Result<FillReader> {
        self.probe.note(self.probe.attempt(), |m| &mut m.restarted_at);
        let (shard, stride) = (u64::from(split), u64::from(self.splits.max(1)));
        Ok(FillReader {
            probe: Arc::clone(&self.probe),
            shard,
            stride,
            fill: self.keys.saturating_sub(shard).div_ceil(stride),
            produced: 0,
            trickle_from: None,
            rate_per_s: self.rate_per_s / stride as f64,
        })
    }
}

impl SourceReader for FillReader {
    type Out = (u64, bool);
    fn read(&mut self, out: &mut Vec<(u64, bool)>, _: &mut Vec<DeadLetter>, max: usize) -> weir::Result<ReadStatus> {
        if self.produced < self.fill {
            let n = (self.fill - self.produced).min(max as u64);
            out.extend((self.produced..self.produced + n).map(|i| (self.shard + i * self.stride, false)));
            self.produced += n;
            return Ok(ReadStatus::More);
        }
        if self.probe.stop.load(Ordering::Relaxed) {
            return Ok(ReadStatus::End);
        }
        // The first update is due at once, so a restarted job has output without waiting.
        let (from, since) = *self.trickle_from.get_or_insert_with(|| (self.produced, Instant::now()));
        let due = from + 1 + (since.elapsed().as_secs_f64() * self.rate_per_s) as u64;
        if due <= self.produced {
            return Ok(ReadStatus::Idle);
        }
        let n = (due - self.produced).min(max as u64);
        let fill = self.fill.max(1);
        out.extend((self.produced..self.produced + n).map(|i| (self.shard + (i % fill) * self.stride, true)));
        self.produced += n;
        Ok(ReadStatus::More)
    }
    fn offset(&self) -> u64 {
        self.produced
    }
    fn seek(&mut self, offset: u64) -> weir::Result<()> {
        self.produced = offset;
        self.trickle_from = None;
        Ok(())
    }
}

/// Marks the panic the recovery benchmark injects; the panic hook keeps it off stderr.
const INJECTED: &str = "weir-bench: injected failure";

/// Writes a [`Payload`] per key; panics when the probe asks for it.
struct Fill {
    probe: Arc<RecoveryProbe>,
    payload: Option<ValueState<Payload>>,
    /// Keys created since they were last added to the probe (one atomic add per batch of keys,
    /// not per key).
    inserted: u64,
}

impl KeyedProcessFunction for Fill {
    type Key = u64;
    type In = (u64, bool);
    type Out = u64;
    fn open(&mut self, states: &mut StateRegistry<'_>) -> weir::operators::Result<()> {
        let attempt = self.probe.attempt();
        self.probe.note(attempt, |m| &mut m.reopened_at);
        self.probe.note_again(attempt, |m| {
            m.reopened += 1;
            &mut m.all_reopened_at
        });
        self.payload = Some(states.value("payload")?);
        Ok(())
    }
    fn process(
        &mut self,
        (key, update): (u64, bool),
        ctx: &mut ProcessContext<'_, u64, u64>,
    ) -> weir::operators::Result<()> {
        if self.probe.fail.swap(false, Ordering::SeqCst) {
            let failed_at = Instant::now();
            lock(&self.probe.failures).push(FailureMarks {
                failed_at,
                restarted_at: None,
                reopened_at: None,
                all_reopened_at: None,
                reopened: 0,
                first_output_at: None,
            });
            panic!("{INJECTED}");
        }
        let payload = self.payload.expect("opened");
        let mut value = [0u8; 96];
        value[..8].copy_from_slice(&key.to_le_bytes());
        value[8] = u8::from(update);
        ctx.set(&payload, &value)?;
        if !update {
            self.inserted += 1;
        }
        // Updates only come once this shard's source wrote its keys, and keep coming: the
        // remainder reaches the probe with the first of them.
        if self.inserted >= 4096 || (update && self.inserted > 0) {
            self.probe.inserted.fetch_add(std::mem::take(&mut self.inserted), Ordering::Relaxed);
        }
        ctx.output(key);
        Ok(())
    }
}

/// Notes the first record written after each failure.
#[derive(Debug, Clone)]
struct FirstOutputSink {
    probe: Arc<RecoveryProbe>,
}

struct FirstOutputWriter {
    probe: Arc<RecoveryProbe>,
    /// The run attempt that made it.
    attempt: usize,
    noted: bool,
    /// Records written since the last flush.
    written: u64,
}

impl Sink for FirstOutputSink {
    type In = u64;
    type Writer = FirstOutputWriter;
    fn writer(&self, _: usize, _: usize) -> weir::Result<FirstOutputWriter> {
        let attempt = self.probe.attempt();
        Ok(FirstOutputWriter { probe: Arc::clone(&self.probe), attempt, noted: attempt == 0, written: 0 })
    }
}

impl SinkWriter for FirstOutputWriter {
    type In = u64;
    #[inline]
    fn write(&mut self, _: u64, _: i64) -> weir::Result<()> {
        self.written += 1;
        if !self.noted {
            self.noted = true;
            self.probe.note(self.attempt, |m| &mut m.first_output_at);
        }
        Ok(())
    }
    fn flush(&mut self) -> weir::Result<()> {
        self.probe.outputs.fetch_add(std::mem::take(&mut self.written), Ordering::Relaxed);
        Ok(())
    }
    fn pre_commit(&mut self, _: u64) -> weir::Result<()> {
        self.flush()
    }
}

/// Keeps the injected panic's message off stderr (it is expected); other panics print as usual.
fn quiet_injected_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let injected = info.payload().downcast_ref::<String>().is_some_and(|m| m == INJECTED);
            if !injected {
                previous(info);
            }
        }));
    });
}

/// One failure and the recovery from it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovery {
    /// From the panic to the first record at a sink after the restart.
    pub until_output: Duration,
    /// From the panic until the restarted attempt made its first source reader (the failed
    /// attempt stopped, the coordinator restarted, new shards started).
    pub until_restarted: Duration,
    /// From the panic until the first operator of the new attempt opened (its stage's stores
    /// were restored).
    pub until_reopened: Duration,
    /// From the panic until the last operator of the new attempt opened (every shard's stores
    /// were restored).
    pub until_all_reopened: Duration,
    /// The checkpoint restored.
    pub restored: u64,
    /// The most log bytes a restored store replayed on top of its index snapshot (`None`: the
    /// manifest was gone before it could be read).
    pub replayed_bytes: Option<u64>,
}

/// Result of the recovery benchmark at one state size.
#[derive(Debug, Clone, Copy)]
pub struct RecoveryResult {
    /// Keys in the state.
    pub keys: u64,
    /// Bytes of the log records holding them (`keys * RECORD_BYTES`).
    pub state_bytes: u64,
    /// Time to write every key (from `run`).
    pub fill: Duration,
    /// Failure right after the state was written and a checkpoint covered it: the restore
    /// replays the log written since the last index snapshot.
    pub after_fill: Recovery,
    /// Failure once an index snapshot was taken after the first restart: the restore replays
    /// (almost) nothing.
    pub after_index_snapshot: Recovery,
    /// The job's checkpoints, over all its run attempts.
    pub checkpoints: CheckpointSummary,
}

/// Polls `ready` every millisecond until it returns `Some`, for at most `limit`.
fn wait_for<T>(limit: Duration, what: &str, mut ready: impl FnMut() -> Option<T>) -> weir::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = ready() {
            return Ok(t);
        }
        if Instant::now() > deadline {
            return Err(RuntimeError::Checkpoint(format!("recovery bench: no {what} after {limit:?}")));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The id of the newest complete checkpoint of the job (0: none).
fn newest_checkpoint(handle: &JobHandle) -> u64 {
    handle.checkpoint_stats().completed.last().map_or(0, |c| c.id)
}

/// Waits until `n` checkpoints triggered after now completed.
fn wait_for_checkpoints(handle: &JobHandle, n: u64, limit: Duration) -> weir::Result<()> {
    // At most `max_concurrent` (1) checkpoint is in flight now, triggered before now: ids
    // from `newest + 2` on are triggered later.
    let target = newest_checkpoint(handle) + 1 + n;
    wait_for(limit, "checkpoint", || (newest_checkpoint(handle) >= target).then_some(()))
}

/// Has the job fail once and waits for the first output after its restart and for the
/// operators of all `parallelism` shards to open (every store restored).
fn fail_and_recover(
    handle: &JobHandle,
    probe: &RecoveryProbe,
    parallelism: usize,
    dir: &Path,
    limit: Duration,
) -> weir::Result<Recovery> {
    let failure = probe.attempt();
    probe.fail.store(true, Ordering::SeqCst);
    let marks = wait_for(limit, "output after the restart on every shard", || {
        probe.marks(failure).filter(|m| m.first_output_at.is_some() && m.reopened >= parallelism)
    })?;
    let restored = handle.checkpoint_stats().restored.get(failure + 1).copied().flatten().unwrap_or(0);
    let since = |t: Option<Instant>| t.map(|t| t - marks.failed_at).unwrap_or_default();
    Ok(Recovery {
        until_output: since(marks.first_output_at),
        until_restarted: since(marks.restarted_at),
        until_reopened: since(marks.reopened_at),
        until_all_reopened: since(marks.all_reopened_at),
        restored,
        replayed_bytes: replayed_bytes(dir, restored),
    })
}

/// The most log bytes any store of checkpoint `id` replays on top of its index snapshot when
/// restored, if the checkpoint's manifest is still there.
fn replayed_bytes(dir: &Path, id: u64) -> Option<u64> {
    let manifest = CheckpointDirectory::open(dir).ok()?.read(id).ok()?;
    manifest.shards.iter().map(|s| s.handle.replay_bytes()).max()
}

/// Recovery time of a job holding `state_bytes` of keyed state at `parallelism`, checkpointed
/// every 200 ms into a fresh directory under `base`. The job fails twice: once right after
/// its state was written and a checkpoint covered it, and once more after an index snapshot
/// was taken (so that the two restores differ in what they replay).
pub fn recovery(state_bytes: u64, parallelism: usize, base: &Path) -> weir::Result<RecoveryResult> {
    quiet_injected_panics();
    let dir = run_dir(base, "recovery")?;
    let keys = (state_bytes / RECORD_BYTES).max(1);
    let probe = Arc::new(RecoveryProbe::default());
    let job = Job::new("recovery");
    let fill_probe = Arc::clone(&probe);
    job.source(
        "fill",
        FillThenTrickle { keys, rate_per_s: TRICKLE_PER_S, probe: Arc::clone(&probe), splits: parallelism as u32 },
    )
    .key_by("by-key", |r: &(u64, bool)| r.0)
    .process("payload", move || Fill { probe: Arc::clone(&fill_probe), payload: None, inserted: 0 })
    .sink("first-output", FirstOutputSink { probe: Arc::clone(&probe) });
    let settings = CheckpointSettings::new(dir.path(), RECOVERY_INTERVAL_MS)
        .with_restart(RestartStrategy::FixedDelay { attempts: FAILURES as u32, delay: Duration::ZERO });
    let config = JobConfig { data_dir: dir.path().to_owned(), ..JobConfig::default() }
        .with_parallelism(parallelism)
        .with_checkpointing(settings);
    let started = Instant::now();
    let handle = job.run(config)?;
    // Generous bounds: a stuck job fails the benchmark rather than hanging it.
    let limit = Duration::from_secs(60) + Duration::from_secs(state_bytes >> 26);
    let measured = (|| -> weir::Result<(Duration, Recovery, Recovery)> {
        wait_for(limit, "complete state", || (probe.inserted.load(Ordering::Relaxed) >= keys).then_some(()))?;
        let fill = started.elapsed();
        wait_for_checkpoints(&handle, 1, limit)?;
        let after_fill = fail_and_recover(&handle, &probe, parallelism, dir.path(), limit)?;
        // A restored store takes its next index snapshot soon (its replayed tail counts
        // towards the bound); it is written in the background, and named by the checkpoints
        // after it is durable. Wait for a checkpoint whose restore replays little.
        wait_for(limit, "checkpoint on a fresh index snapshot", || {
            let newest = newest_checkpoint(&handle);
            replayed_bytes(dir.path(), newest).is_some_and(|b| b < SMALL_REPLAY).then_some(())
        })?;
        let after_index_snapshot = fail_and_recover(&handle, &probe, parallelism, dir.path(), limit)?;
        Ok((fill, after_fill, after_index_snapshot))
    })();
    probe.stop.store(true, Ordering::SeqCst);
    if measured.is_err() {
        handle.cancel();
    }
    let report = handle.wait();
    let (fill, after_fill, after_index_snapshot) = measured?;
    let stats = report?.checkpoints;
    if std::env::var_os("WEIR_BENCH_VERBOSE").is_some() {
        for (id, reason) in &stats.aborted {
            eprintln!("aborted checkpoint {id}: {reason}");
        }
    }
    if stats.restarts != FAILURES as u32 || stats.restored.iter().skip(1).any(Option::is_none) {
        return Err(RuntimeError::Checkpoint(format!(
            "recovery bench: expected {FAILURES} restarts from checkpoints: {stats:?}"
        )));
    }
    dir.close().map_err(|e| RuntimeError::Checkpoint(format!("cannot remove the run directory: {e}")))?;
    Ok(RecoveryResult {
        keys,
        state_bytes: keys * RECORD_BYTES,
        fill,
        after_fill,
        after_index_snapshot,
        checkpoints: CheckpointSummary::of(&stats),
    })
}

/// Checkpoints of a job holding a large state of which a fixed share changes per interval.
#[derive(Debug, Clone, Copy)]
pub struct ScaleRun {
    /// Keys in the state.
    pub keys: u64,
    /// Bytes of the log records holding them (`keys * RECORD_BYTES`).
    pub state_bytes: u64,
    /// Time to write every key.
    pub fill: Duration,
    /// Updates per second the job took while measured (the source asks for `keys * share /
    /// interval`).
    pub updates_per_s: f64,
    /// Checkpoints in the measured window: from when index snapshots caught up with the fill
    /// (its replay tail under half the bound) until the end.
    pub checkpoints: CheckpointSummary,
    /// The longest checkpoint in the window.
    pub max: Duration,
    /// Index snapshots the job wrote in the background, in all.
    pub index_snapshots: u64,
    /// Bytes a keyed store appends per interval at the asked update rate (a record per
    /// update), which the baselines sync.
    pub synced_per_store: u64,
    /// The baselines: what syncing that much takes on this disk without the runtime (see
    /// [`sync_floor`]), written as [`FloorVia::Write`].
    pub floor_write: Percentiles,
    /// The baseline written as [`FloorVia::Segment`].
    pub floor_segment: Percentiles,
    /// With [`ScaleSpec::recover`]: the failure after the window, and what followed it.
    pub under_load: Option<UnderLoad>,
}

/// A failure of the job at full load (after the measured window) and the checkpoints of the
/// same length of time after it.
#[derive(Debug, Clone, Copy)]
pub struct UnderLoad {
    /// The recovery from it.
    pub recovery: Recovery,
    /// The checkpoints that completed after the failure, for as long as the window lasted.
    pub after: CheckpointSummary,
    /// The longest of them.
    pub max_after: Duration,
}

/// What [`at_scale`] runs.
#[derive(Debug, Clone, Copy)]
pub struct ScaleSpec {
    /// Bytes of keyed state.
    pub state_bytes: u64,
    /// Percent of the keys rewritten per checkpoint interval.
    pub changed_percent: f64,
    /// Checkpoint interval.
    pub interval_ms: i64,
    /// Parallelism.
    pub parallelism: usize,
    /// Seconds measured once the state is complete.
    pub seconds: f64,
    /// How the threads a checkpoint waits for are scheduled.
    pub helpers: weir::checkpointing::HelperScheduling,
    /// Whether the job then fails once at full load, for a recovery and the checkpoints after
    /// it ([`ScaleRun::under_load`]).
    pub recover: bool,
}

/// Checkpoint durations with `state_bytes` of keyed state (a [`Payload`] per key) of which
/// `changed_percent` is rewritten per checkpoint interval (updates spread evenly in time),
/// checkpointed every `interval_ms` at `parallelism`, measured over `seconds` once the state
/// is complete; with `recover`, the job then fails once at that load, and the recovery and the
/// checkpoints of as many seconds after it are measured too.
pub fn at_scale(spec: ScaleSpec, base: &Path) -> weir::Result<ScaleRun> {
    let ScaleSpec { state_bytes, changed_percent, interval_ms, parallelism, seconds, helpers, recover } = spec;
    if recover {
        quiet_injected_panics();
    }
    let dir = run_dir(base, "checkpoint-scale")?;
    let keys = (state_bytes / RECORD_BYTES).max(1);
    let rate_per_s = keys as f64 * changed_percent / 100.0 * 1000.0 / interval_ms.max(1) as f64;
    // The baselines first, on an idle disk (after the job, its files are being deleted).
    // What the keyed stores append per interval: the updates, one record each (an update of
    // a key already rewritten in this interval costs none; at 1% of the keys nearly none is).
    let synced_per_store = (rate_per_s * interval_ms as f64 / 1000.0 / parallelism.max(1) as f64) as u64 * RECORD_BYTES;
    let rounds = ((seconds * 1000.0 / interval_ms.max(1) as f64) as usize).max(10);
    let every = Duration::from_millis(interval_ms.max(1) as u64);
    let floor = |via| sync_floor(dir.path(), parallelism.max(1), synced_per_store, every, rounds, via);
    let (floor_write, floor_segment) = (floor(FloorVia::Write)?, floor(FloorVia::Segment)?);
    let probe = Arc::new(RecoveryProbe::default());
    let job = Job::new("checkpoint-scale");
    let fill_probe = Arc::clone(&probe);
    job.source("fill", FillThenTrickle { keys, rate_per_s, probe: Arc::clone(&probe), splits: parallelism as u32 })
        .key_by("by-key", |r: &(u64, bool)| r.0)
        .process("payload", move || Fill { probe: Arc::clone(&fill_probe), payload: None, inserted: 0 })
        .sink("first-output", FirstOutputSink { probe: Arc::clone(&probe) });
    let settings = CheckpointSettings { helpers, ..CheckpointSettings::new(dir.path(), interval_ms) };
    let config = JobConfig { data_dir: dir.path().to_owned(), ..JobConfig::default() }
        .with_parallelism(parallelism)
        .with_checkpointing(if recover {
            settings.with_restart(RestartStrategy::FixedDelay { attempts: 1, delay: Duration::ZERO })
        } else {
            settings
        });
    let started = Instant::now();
    let handle = job.run(config)?;
    let limit = Duration::from_secs(60) + Duration::from_secs(state_bytes >> 26);
    type Measured = (Duration, u64, u64, f64, Option<(Recovery, usize)>);
    let measured = (|| -> weir::Result<Measured> {
        wait_for(limit, "complete state", || (probe.inserted.load(Ordering::Relaxed) >= keys).then_some(()))?;
        let fill = started.elapsed();
        // The checkpoint covering the fill, and one more, are not part of the steady state;
        // nor are those that still catch up with the fill's index snapshots (a checkpoint past
        // the replay bound writes one itself, see `CheckpointSettings::max_replay_bytes`).
        wait_for_checkpoints(&handle, 2, limit)?;
        let caught_up = weir_state::store::DEFAULT_MAX_REPLAY_BYTES / 2;
        wait_for(limit, "index snapshots caught up with the fill", || {
            replayed_bytes(dir.path(), newest_checkpoint(&handle)).is_some_and(|b| b < caught_up).then_some(())
        })?;
        let first = newest_checkpoint(&handle);
        let (window, outputs) = (Instant::now(), probe.outputs.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let updates = probe.outputs.load(Ordering::Relaxed) - outputs;
        let (last, updates_per_s) = (newest_checkpoint(&handle), updates as f64 / window.elapsed().as_secs_f64());
        let under_load = if recover {
            // Checkpoints that complete from here on are the new attempt's (but for one of the
            // failed attempt's, at most, completing before the panic).
            let before = handle.checkpoint_stats().completed.len();
            let recovery = fail_and_recover(&handle, &probe, parallelism, dir.path(), limit)?;
            std::thread::sleep(Duration::from_secs_f64(seconds));
            Some((recovery, before))
        } else {
            None
        };
        Ok((fill, first, last, updates_per_s, under_load))
    })();
    probe.stop.store(true, Ordering::SeqCst);
    if measured.is_err() {
        handle.cancel();
    }
    let report = handle.wait();
    let (fill, first, last, updates_per_s, under_load) = measured?;
    let stats = report?.checkpoints;
    let mut in_window = stats.clone();
    in_window.completed.retain(|c| c.id > first && c.id <= last);
    if recover && stats.restarts != 1 {
        return Err(RuntimeError::Checkpoint(format!("checkpoint-scale: expected one restart: {stats:?}")));
    }
    let under_load = under_load.map(|(recovery, before)| {
        let mut after = stats.clone();
        after.completed.drain(..before.min(after.completed.len()));
        // The job's final checkpoint (after its input ended) is not part of the load.
        after.completed.pop();
        after.aborted.clear();
        if std::env::var_os("WEIR_BENCH_VERBOSE").is_some() {
            for c in &after.completed {
                eprintln!(
                    "after the failure: checkpoint {} duration={:?} alignment={:?} sync={:?} manifest={:?} past-bound={}",
                    c.id, c.duration, c.alignment, c.sync, c.manifest, c.past_replay_bound
                );
            }
        }
        let max_after = after.completed.iter().map(|c| c.duration).max().unwrap_or_default();
        UnderLoad { recovery, after: CheckpointSummary::of(&after), max_after }
    });
    let max = in_window.completed.iter().map(|c| c.duration).max().unwrap_or_default();
    if std::env::var_os("WEIR_BENCH_VERBOSE").is_some() {
        for c in &in_window.completed {
            eprintln!(
                "checkpoint {} duration={:?} alignment={:?} sync={:?} manifest={:?} index-bytes={} past-bound={}",
                c.id, c.duration, c.alignment, c.sync, c.manifest, c.index_bytes, c.past_replay_bound
            );
        }
    }
    dir.close().map_err(|e| RuntimeError::Checkpoint(format!("cannot remove the run directory: {e}")))?;
    Ok(ScaleRun {
        keys,
        state_bytes: keys * RECORD_BYTES,
        fill,
        updates_per_s,
        checkpoints: CheckpointSummary::of(&in_window),
        max,
        index_snapshots: stats.index_snapshots,
        synced_per_store,
        floor_write,
        floor_segment,
        under_load,
    })
}

/// Write-behind steps of the baselines, as the runtime's (`WRITE_BEHIND_BYTES`).
const FLOOR_STEP: usize = 256 << 10;

/// How a [`sync_floor`] baseline writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloorVia {
    /// `pwrite` into a file allocated up front, `posix_fadvise(DONTNEED)` to start writeback,
    /// `fdatasync`.
    Write,
    /// Through a weir segment (`weir_state::segment::Segment`) as a store writes one: into its
    /// open tail, `Segment::write_ahead` (`pwrite`) and `SegmentFlusher::start_writeback` per
    /// step; at the tick `Segment::seal`, then `SegmentFlusher::flush_range` (`msync` of the
    /// read-only mapping).
    Segment,
}

/// One baseline writer: a file, or a weir segment. In a segment, offsets count from the end
/// of its header.
enum FloorFile {
    Write(std::fs::File),
    Segment(weir_state::segment::Segment, weir_state::segment::SegmentFlusher),
}

/// The error of a baseline step.
fn floor_err(what: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Checkpoint(format!("sync floor: {what}: {e}"))
}

impl FloorFile {
    fn create(dir: &Path, store: usize, via: FloorVia, bytes: u64) -> weir::Result<FloorFile> {
        let dir = dir.join(format!("sync-floor-{store}"));
        std::fs::create_dir_all(&dir).map_err(|e| floor_err("mkdir", e))?;
        if via == FloorVia::Write {
            let path = dir.join("file");
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| floor_err("create", e))?;
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, bytes)
                .map_err(|e| floor_err("fallocate", e))?;
            file.sync_all().map_err(|e| floor_err("fsync", e))?;
            return Ok(FloorFile::Write(file));
        }
        let segment_bytes = u32::try_from(bytes.div_ceil(4096) * 4096 + u64::from(SEGMENT_HEADER_BYTES))
            .map_err(|_| floor_err("segment", format!("{bytes} bytes is over a segment's size")))?;
        let header = weir_state::segment::SegmentHeader { shard: 0, id: 1, first_seq: 0, segment_bytes };
        let segment = weir_state::segment::Segment::create(&dir, header).map_err(|e| floor_err("segment", e))?;
        let flusher = segment.flusher();
        flusher.sync_file().map_err(|e| floor_err("fsync", e))?;
        Ok(FloorFile::Segment(segment, flusher))
    }

    /// Writes `chunk` at `offset` and starts its writeback.
    fn write(&mut self, offset: u64, chunk: &[u8]) -> weir::Result<()> {
        match self {
            FloorFile::Write(file) => {
                use std::os::unix::fs::FileExt;
                file.write_all_at(chunk, offset).map_err(|e| floor_err("write", e))?;
                let len = std::num::NonZeroU64::new(chunk.len() as u64);
                rustix::fs::fadvise(&*file, offset, len, rustix::fs::Advice::DontNeed)
                    .map_err(|e| floor_err("fadvise", e))
            }
            FloorFile::Segment(segment, flusher) => {
                let at = (offset + u64::from(SEGMENT_HEADER_BYTES)) as u32;
                segment.write(at, chunk);
                segment.write_ahead(at + chunk.len() as u32).map_err(|e| floor_err("write", e))?;
                flusher.start_writeback(at, chunk.len() as u32).map_err(|e| floor_err("fadvise", e))
            }
        }
    }

    /// Makes `[from, to)` durable.
    fn sync(&mut self, from: u64, to: u64) -> weir::Result<()> {
        match self {
            FloorFile::Write(file) => file.sync_data().map_err(|e| floor_err("fdatasync", e)),
            FloorFile::Segment(segment, flusher) => {
                segment.seal().map_err(|e| floor_err("write", e))?;
                flusher
                    .flush_range(from as u32 + SEGMENT_HEADER_BYTES, (to - from) as u32)
                    .map_err(|e| floor_err("msync", e))
            }
        }
    }
}

/// The disk's share of a checkpoint, measured without the runtime in the same run and
/// directory: `stores` threads each append `bytes` per `interval` (in 256 KiB writes spread
/// over the interval, each followed by the start of its writeback, as write-behind does) to a
/// file allocated up front, written as `via` says; at every
/// tick all of them sync what they wrote since the last one. Returns the time from the tick
/// until the last sync returns, over `rounds` ticks.
pub fn sync_floor(
    dir: &Path,
    stores: usize,
    bytes: u64,
    interval: Duration,
    rounds: usize,
    via: FloorVia,
) -> weir::Result<Percentiles> {
    let steps = (bytes as usize).div_ceil(FLOOR_STEP).max(1);
    let file_bytes = (steps * FLOOR_STEP * rounds) as u64;
    let mut files = Vec::new();
    for store in 0..stores {
        files.push(FloorFile::create(dir, store, via, file_bytes)?);
    }
    let start = Instant::now();
    let tick = |round: usize| start + interval * (round as u32 + 1);
    let ran: weir::Result<Vec<Vec<Instant>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (files.iter_mut())
            .map(|file| {
                scope.spawn(move || -> weir::Result<Vec<Instant>> {
                    let chunk = vec![0x5au8; FLOOR_STEP];
                    let mut offset = 0u64;
                    let mut ends = Vec::with_capacity(rounds);
                    for round in 0..rounds {
                        let (from, synced) = (tick(round) - interval, offset);
                        for step in 0..steps {
                            let at = from + interval.mul_f64(step as f64 / steps as f64);
                            std::thread::sleep(at.saturating_duration_since(Instant::now()));
                            file.write(offset, &chunk)?;
                            offset += FLOOR_STEP as u64;
                        }
                        std::thread::sleep(tick(round).saturating_duration_since(Instant::now()));
                        file.sync(synced, offset)?;
                        ends.push(Instant::now());
                    }
                    Ok(ends)
                })
            })
            .collect();
        let joined = workers.into_iter().map(|w| w.join());
        joined.map(|r| r.unwrap_or_else(|_| Err(floor_err("writer", "panicked")))).collect()
    });
    drop(files);
    for store in 0..stores {
        let _ = std::fs::remove_dir_all(dir.join(format!("sync-floor-{store}")));
    }
    let ends = ran?;
    Ok(Percentiles::of((0..rounds).map(|round| {
        let last = ends.iter().map(|e| e[round]).max().unwrap_or_else(|| tick(round));
        last.saturating_duration_since(tick(round))
    })))
}
