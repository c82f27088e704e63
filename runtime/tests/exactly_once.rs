//! Exactly-once under failures, in the manner of Flink's fault-tolerance ITCases: jobs run with
//! checkpoints every few milliseconds, fail at a random point, restart in-process from their
//! latest complete checkpoint, and their committed output must equal a failure-free run's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use weir::checkpointing::{CheckpointSettings, RestartStrategy};
use weir::prelude::*;
use weir::twophase::ExactlyOnceCollectSink;

/// A seed from the clock, printed so that a failing run can be repeated with `WEIR_SEED`.
fn seed() -> u64 {
    let seed = std::env::var("WEIR_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64)
    });
    eprintln!("WEIR_SEED={seed}");
    seed
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

fn records() -> u64 {
    std::env::var("WEIR_RECORDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2_000_000)
}

struct Keys {
    n: u64,
    keys: u64,
}

impl Generator for Keys {
    type Out = u64;
    fn generate(&self, offset: u64) -> Option<u64> {
        (offset < self.n).then(|| mix(offset) % self.keys)
    }
}

fn settings(dir: &std::path::Path, interval_ms: i64) -> CheckpointSettings {
    CheckpointSettings::new(dir, interval_ms)
        .with_restart(RestartStrategy::FixedDelay { attempts: 3, delay: Duration::from_millis(10) })
}

/// Records whose keys a function of their offset gives.
struct KeysBy {
    n: u64,
    key: fn(u64) -> u64,
}

impl Generator for KeysBy {
    type Out = u64;
    fn generate(&self, offset: u64) -> Option<u64> {
        (offset < self.n).then(|| (self.key)(offset))
    }
}

/// Each key's true count among the first `n` records of [`Keys`].
fn expected_counts(n: u64, keys: u64) -> BTreeMap<u64, u64> {
    expected_counts_by(n, |i| mix(i) % keys)
}

/// Each key's true count among the first `n` records of [`KeysBy`].
fn expected_counts_by(n: u64, key: impl Fn(u64) -> u64) -> BTreeMap<u64, u64> {
    let mut expected = BTreeMap::new();
    for i in 0..n {
        *expected.entry(key(i)).or_default() += 1;
    }
    expected
}

/// The committed rolling counts `(key, count)`: every key of `expected` got exactly the counts
/// 1..=n, nothing lost, nothing twice.
fn assert_every_count_once(committed: impl IntoIterator<Item = (u64, u64)>, expected: &BTreeMap<u64, u64>) {
    let mut per_key: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (k, c) in committed {
        per_key.entry(k).or_default().push(c);
    }
    assert_eq!(per_key.len(), expected.len());
    for (k, mut counts) in per_key {
        counts.sort_unstable();
        assert_eq!(counts, (1..=expected[&k]).collect::<Vec<_>>(), "key {k}: every count committed exactly once");
    }
}

/// The injected failure happened once and the restart restored a checkpoint.
fn assert_one_restart_from_a_checkpoint(fired: &AtomicBool, stats: &weir::checkpointing::CheckpointStats) {
    assert!(fired.load(Ordering::SeqCst), "the failure was injected");
    assert_eq!(stats.restarts, 1, "one restart: {stats:?}");
    assert!(stats.restored.get(1).copied().flatten().is_some(), "the restart restored a checkpoint: {stats:?}");
}

/// A rolling count's step that panics once, when the shared record counter `seen` reaches
/// `panic_at` (`fired` records that it did).
fn count_with_one_panic(
    seen: Arc<AtomicU64>,
    fired: Arc<AtomicBool>,
    panic_at: u64,
) -> impl Fn((u64, u64), u64) -> (u64, u64) + Clone + Send + Sync + 'static {
    move |(k, c): (u64, u64), _| {
        if seen.fetch_add(1, Ordering::Relaxed) == panic_at && !fired.swap(true, Ordering::SeqCst) {
            panic!("injected failure at record {panic_at}");
        }
        (k, c + 1)
    }
}

/// Keyed counting over many keys with a user function that panics once, somewhere between 40%
/// and 70% of the input: every key's committed counts are exactly 1, 2, ..., n (nothing lost,
/// nothing twice) and n is the key's true count.
fn keyed_count_with_a_panic(parallelism: usize) {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeysBy { n: records(), key: |i| mix(i) % 10_000 };
    keyed_count_in(parallelism, keys, JobConfig::default(), |s| s, &dir);
}

/// [`keyed_count_with_a_panic`] of the records of `keys` with `base` settings, checkpoint
/// settings as `tune` makes them, and its checkpoint directory in `dir`.
fn keyed_count_in(
    parallelism: usize,
    keys: KeysBy,
    base: JobConfig,
    tune: impl FnOnce(CheckpointSettings) -> CheckpointSettings,
    dir: &tempfile::TempDir,
) -> weir::checkpointing::CheckpointStats {
    let (n, key) = (keys.n, keys.key);
    let panic_at = n * 4 / 10 + mix(seed()) % (n * 3 / 10);
    let seen = Arc::new(AtomicU64::new(0));
    let fired = Arc::new(AtomicBool::new(false));
    let (seen2, fired2) = (Arc::clone(&seen), Arc::clone(&fired));
    let job = Job::new("exactly-once-count");
    let out = ExactlyOnceCollectSink::new();
    job.source("numbers", GeneratorSource::new(keys))
        .key_by("by-key", |k: &u64| *k)
        .reduce("count", |k: &u64| (*k, 0u64), count_with_one_panic(seen2, fired2, panic_at))
        .sink("out", out.clone());
    let config = base.with_parallelism(parallelism).with_checkpointing(tune(settings(dir.path(), 5)));
    let handle = job.run(config).unwrap();
    let stats = handle.wait().unwrap().checkpoints;
    assert_one_restart_from_a_checkpoint(&fired, &stats);
    assert_every_count_once(out.take().into_iter().map(|(kc, _)| kc), &expected_counts_by(n, key));
    stats
}

/// Bytes of the segment files under `dir`, and their number.
fn segment_files(dir: &std::path::Path) -> (u64, usize) {
    let (mut bytes, mut files) = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().unwrap().is_dir() {
            let (b, f) = segment_files(&entry.path());
            (bytes, files) = (bytes + b, files + f);
        } else if name.starts_with("seg-") && name.ends_with(".log") {
            (bytes, files) = (bytes + entry.metadata().unwrap().len(), files + 1);
        }
    }
    (bytes, files)
}

#[test]
fn compaction_keeps_a_long_jobs_log_bounded_and_its_counts_exact() {
    // 1,000 hot keys, and every 512th record a key seen once (sessions that go idle): without
    // compaction nearly every segment keeps a live record and none is ever deleted (the log
    // grows with the input: 13 MB here in 64 KiB segments, 2.8-4.1 MB with it); compaction moves those records
    // and lets the segments go. The log a restore replays (after the last index snapshot)
    // is kept too: a replay bound of 1 MiB keeps that short. (Under the default bound it is
    // as long as the index snapshots written in the background lag behind: with the tests of
    // this file running beside each other on two cores, 2.8-8.2 MB were left in all.)
    let dir = tempfile::tempdir().unwrap();
    let config = JobConfig { segment_bytes: 64 << 10, ..JobConfig::default() };
    let key = |i: u64| if i.is_multiple_of(512) { 1_000 + i } else { mix(i) % 1_000 };
    let tune = |s| CheckpointSettings { max_replay_bytes: 1 << 20, ..s };
    let stats = keyed_count_in(2, KeysBy { n: 6_000_000, key }, config, tune, &dir);
    // Garbage is deleted asynchronously (on the reaper thread, 250 ms after the store let it
    // go): what the last checkpoints freed may still be on its way out when the job returns.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let (mut bytes, mut files) = segment_files(dir.path());
    while bytes >= 6 << 20 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        (bytes, files) = segment_files(dir.path());
    }
    assert!(
        bytes < 6 << 20,
        "{files} segment files of {bytes} bytes remain; {} checkpoints, {} index snapshots, background errors {:?}",
        stats.completed.len(),
        stats.index_snapshots,
        stats.background_errors
    );
}

#[test]
fn a_replay_bound_holds_for_every_checkpoint_and_counts_stay_exact() {
    // 200,000 keys (about 5 MB of state a shard): with a bound of 1 MiB, checkpoints past it
    // write an index snapshot themselves or name a detached one still being written, and the
    // restart after the panic restores a checkpoint within the bound like any other.
    const BOUND: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let keys = KeysBy { n: records(), key: |i| mix(i) % 200_000 };
    let tune = |s| CheckpointSettings { max_replay_bytes: BOUND, ..s };
    let stats = keyed_count_in(2, keys, JobConfig::default(), tune, &dir);
    let bounded = stats.completed.iter().filter(|c| c.past_replay_bound).count();
    assert!(bounded > 0, "no checkpoint was past the bound: {stats:?}");
    let directory = weir::state::manifest::CheckpointDirectory::open(dir.path()).unwrap();
    let ids = directory.list().unwrap();
    assert!(!ids.is_empty());
    for id in ids {
        for shard in directory.read(id).unwrap().shards {
            let replay = shard.handle.replay_bytes();
            assert!(replay <= BOUND, "checkpoint {id} replays {replay} bytes of {}", shard.store_dir);
        }
    }
}

#[test]
fn keyed_count_is_exact_after_a_panic_p2() {
    keyed_count_with_a_panic(2);
}

#[test]
fn keyed_count_is_exact_after_a_panic_p4_unpinned() {
    keyed_count_with_a_panic(4);
}

/// Records `(key, timestamp, value)` by offset; the reader fails once (an I/O error of the
/// source, which kills the shard) when it first passes offset `fail_at`.
struct FlakySource {
    n: u64,
    fail_at: u64,
    failed: Arc<AtomicBool>,
}

struct FlakyReader {
    n: u64,
    fail_at: u64,
    failed: Arc<AtomicBool>,
    next: u64,
    stride: u64,
    start: u64,
}

fn event(i: u64) -> (u64, i64, u64) {
    (mix(i) % 37, (i / 3) as i64, i % 1000)
}

impl Source for FlakySource {
    type Out = (u64, i64, u64);
    type Reader = FlakyReader;
    fn splits(&self) -> u32 {
        8
    }
    fn reader(&self, split: u32) -> weir::Result<FlakyReader> {
        Ok(FlakyReader {
            n: self.n,
            fail_at: self.fail_at,
            failed: Arc::clone(&self.failed),
            next: u64::from(split),
            stride: 8,
            start: u64::from(split),
        })
    }
}

impl SourceReader for FlakyReader {
    type Out = (u64, i64, u64);
    fn read(
        &mut self,
        out: &mut Vec<(u64, i64, u64)>,
        _: &mut Vec<weir::source::DeadLetter>,
        max: usize,
    ) -> weir::Result<weir::source::ReadStatus> {
        for _ in 0..max {
            if self.next >= self.n {
                return Ok(weir::source::ReadStatus::End);
            }
            if self.next >= self.fail_at && !self.failed.swap(true, Ordering::SeqCst) {
                return Err(RuntimeError::Source { source_name: "flaky".into(), reason: "injected read error".into() });
            }
            out.push(event(self.next));
            self.next += self.stride;
        }
        Ok(weir::source::ReadStatus::More)
    }
    fn offset(&self) -> u64 {
        (self.next - self.start) / self.stride
    }
    fn seek(&mut self, offset: u64) -> weir::Result<()> {
        self.next = self.start + offset * self.stride;
        Ok(())
    }
}

/// Event-time windows with a source failure after checkpoints completed: each window's sum is
/// exact and no window fires twice.
#[test]
fn event_time_windows_are_exact_after_a_source_failure() {
    let n = records() / 4;
    let dir = tempfile::tempdir().unwrap();
    let failed = Arc::new(AtomicBool::new(false));
    let source = FlakySource { n, fail_at: n / 2 + mix(seed()) % (n / 4), failed: Arc::clone(&failed) };
    let out = ExactlyOnceCollectSink::new();
    let job = Job::new("windows-after-failure");
    job.source_with_watermarks(
        "events",
        source,
        WatermarkStrategy::bounded_out_of_orderness(100)
            .with_timestamp_assigner(|e: &(u64, i64, u64), _: Option<i64>| e.1),
    )
    .key_by("by-key", |e: &(u64, i64, u64)| e.0)
    .window("sums", TumblingWindows::event_time(5_000))
    .reduce(|a: (u64, i64, u64), b: (u64, i64, u64)| (a.0, a.1.max(b.1), a.2 + b.2))
    .sink("out", out.clone());
    let config = JobConfig::default().with_parallelism(2).with_checkpointing(settings(dir.path(), 5));
    let stats = job.run(config).unwrap().wait().unwrap().checkpoints;
    assert!(failed.load(Ordering::SeqCst));
    assert_eq!(stats.restarts, 1, "{stats:?}");
    assert_eq!(stats.restart_causes.len(), 1, "{stats:?}");
    assert!(stats.restart_causes[0].contains("injected read error"), "the cause is reported: {stats:?}");
    assert!(stats.restored.get(1).copied().flatten().is_some(), "restarted from a checkpoint: {stats:?}");
    let mut expected: BTreeMap<(u64, i64), u64> = BTreeMap::new();
    for i in 0..n {
        let (k, ts, v) = event(i);
        *expected.entry((k, ts - ts.rem_euclid(5_000))).or_default() += v;
    }
    let mut fired: BTreeMap<(u64, i64), u64> = BTreeMap::new();
    for ((k, window, (_, _, sum)), _) in out.take() {
        assert!(fired.insert((k, window.start()), sum).is_none(), "window ({k}, {window:?}) fired twice");
    }
    assert_eq!(fired, expected);
}

/// At-least-once mode (no alignment) over a union of two sources with a panic, into a
/// callback sink that delivers at once: nothing is lost (every count 1..=n of every key is
/// delivered), and what the restart replayed is delivered again.
#[test]
fn at_least_once_loses_nothing_after_a_panic() {
    let n = records() / 4;
    let keys = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let fired = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let (fired2, seen2) = (Arc::clone(&fired), Arc::clone(&seen));
    let panic_at = n / 2 + mix(seed()) % (n / 2);
    let job = Job::new("at-least-once");
    let delivered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = {
        let delivered = Arc::clone(&delivered);
        weir::sink::CallbackSink::new(move |kc: (u64, u64), _, _| delivered.lock().unwrap().push(kc))
    };
    let a = job.source("a", GeneratorSource::new(Keys { n, keys }));
    let b = job.source("b", GeneratorSource::new(Keys { n, keys }));
    a.union("both", b)
        .key_by("by-key", |k: &u64| *k)
        .reduce("count", |k: &u64| (*k, 0u64), count_with_one_panic(seen2, fired2, panic_at))
        .sink("out", out);
    let mut settings = settings(dir.path(), 5);
    settings.protocol.mode = weir::checkpoint::DeliveryMode::AtLeastOnce;
    let stats = job.run(JobConfig::default().with_parallelism(2).with_checkpointing(settings)).unwrap().wait().unwrap();
    assert!(fired.load(Ordering::SeqCst));
    assert_eq!(stats.checkpoints.restarts, 1);
    let mut per_key: BTreeMap<u64, std::collections::BTreeSet<u64>> = BTreeMap::new();
    let delivered = std::mem::take(&mut *delivered.lock().unwrap());
    let total = delivered.len();
    for (k, c) in delivered {
        per_key.entry(k).or_default().insert(c);
    }
    let distinct: usize = per_key.values().map(|c| c.len()).sum();
    assert!(
        total > distinct,
        "the replay after the restart delivered counts again ({total} delivered, {distinct} distinct)"
    );
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    for i in 0..n {
        *expected.entry(mix(i) % keys).or_default() += 2;
    }
    for (k, want) in expected {
        let counts = &per_key[&k];
        assert!((1..=want).all(|c| counts.contains(&c)), "key {k}: every count up to {want} committed");
    }
}

/// Counts per key in keyed state; counts of odd keys go to a side output. Panics once, at
/// record `panic_at`.
struct CountAndSplit {
    count: Option<ValueState<u64>>,
    seen: Arc<AtomicU64>,
    fired: Arc<AtomicBool>,
    panic_at: u64,
}

const ODD: OutputTag<(u64, u64)> = OutputTag::new("odd-keys");

impl KeyedProcessFunction for CountAndSplit {
    type Key = u64;
    type In = u64;
    type Out = (u64, u64);
    fn open(&mut self, states: &mut StateRegistry<'_>) -> weir::operators::Result<()> {
        self.count = Some(states.value("count")?);
        Ok(())
    }
    fn process(&mut self, key: u64, ctx: &mut ProcessContext<'_, u64, (u64, u64)>) -> weir::operators::Result<()> {
        if self.seen.fetch_add(1, Ordering::Relaxed) == self.panic_at && !self.fired.swap(true, Ordering::SeqCst) {
            panic!("injected failure at record {}", self.panic_at);
        }
        let state = self.count.expect("opened");
        let n = ctx.value(&state)?.unwrap_or(0) + 1;
        ctx.set(&state, &n)?;
        if key % 2 == 1 {
            ctx.side_output(ODD, (key, n));
        } else {
            ctx.output((key, n));
        }
        Ok(())
    }
}

/// A side output read as a stream into a two-phase sink is exactly-once like the main output:
/// after a panic and a restart, every key's committed counts are 1..=n on its own side.
#[test]
fn a_side_stream_is_exactly_once_after_a_panic() {
    let n = records() / 4;
    let keys = 1_000;
    let panic_at = n * 4 / 10 + mix(seed()) % (n * 3 / 10);
    let dir = tempfile::tempdir().unwrap();
    let (seen, fired) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let (even_out, odd_out) = (ExactlyOnceCollectSink::new(), ExactlyOnceCollectSink::new());
    let job = Job::new("exactly-once-side-stream");
    let fired2 = Arc::clone(&fired);
    let counts = job.source("numbers", GeneratorSource::new(Keys { n, keys })).key_by("by-key", |k: &u64| *k).process(
        "count",
        move || CountAndSplit { count: None, seen: Arc::clone(&seen), fired: Arc::clone(&fired2), panic_at },
    );
    counts.side_output("odd", ODD).sink("odd-out", odd_out.clone());
    counts.sink("even-out", even_out.clone());
    let config = JobConfig::default().with_parallelism(2).with_checkpointing(settings(dir.path(), 5));
    let stats = job.run(config).unwrap().wait().unwrap().checkpoints;
    assert_one_restart_from_a_checkpoint(&fired, &stats);
    let expected = expected_counts(n, keys);
    for (odd, sink) in [(false, even_out), (true, odd_out)] {
        let committed: Vec<(u64, u64)> = sink.take().into_iter().map(|(kc, _)| kc).collect();
        assert!(committed.iter().all(|(k, _)| (k % 2 == 1) == odd), "a key on the wrong output");
        let want = expected.iter().filter(|(k, _)| (*k % 2 == 1) == odd).map(|(k, n)| (*k, *n)).collect();
        assert_every_count_once(committed, &want);
    }
}

/// Aligning stages behind a skewed keyed exchange with tiny channels and large batches: a
/// barrier left in a partial batch while its stage waits on a full channel whose reader is
/// aligning (waiting for that barrier) would stall both for good. Checkpoints every
/// millisecond must all the same complete, and the job must finish with exact counts.
#[test]
fn barriers_are_never_held_back_in_partial_batches() {
    let n = records() / 4;
    let dir = tempfile::tempdir().unwrap();
    let out = ExactlyOnceCollectSink::new();
    let job = Job::new("skewed-barriers");
    // Nine records in ten go to key 0; the rest spread over 1000 keys.
    job.source("numbers", GeneratorSource::new(Keys { n, keys: 10_000 }))
        .map("skew", |k: u64| if k.is_multiple_of(10) { k % 1_000 } else { 0 })
        .key_by("by-key", |k: &u64| *k)
        .reduce("count", |k: &u64| (*k, 0u64), |(k, c): (u64, u64), _| (k, c + 1))
        .rebalance("spread")
        .map("again", |(k, c): (u64, u64)| (k, c))
        .sink("out", out.clone());
    let mut config = JobConfig::default().with_parallelism(4).with_checkpointing(settings(dir.path(), 1));
    config.batch_len = 4_096;
    config.channel_capacity = 1;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = job.run(config).unwrap();
    std::thread::spawn(move || {
        let _ = tx.send(handle.wait());
    });
    let report = rx.recv_timeout(Duration::from_secs(60)).expect("the job finishes (no barrier deadlock)").unwrap();
    assert_eq!(report.checkpoints.restarts, 0);
    assert!(report.checkpoints.completed.len() > 1, "{:?}", report.checkpoints.aborted);
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for ((k, c), _) in out.take() {
        let e = last.entry(k).or_default();
        *e = (*e).max(c);
    }
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    for i in 0..n {
        let k = mix(i) % 10_000;
        *expected.entry(if k.is_multiple_of(10) { k % 1_000 } else { 0 }).or_default() += 1;
    }
    assert_eq!(last, expected);
}

/// Processing-time windows far longer than the job: nothing fires until the input ends, and
/// then the drained end fires them before the final checkpoint, so their output is committed.
#[test]
fn processing_time_windows_pending_at_the_end_are_fired_and_committed() {
    let n = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let out = ExactlyOnceCollectSink::new();
    let job = Job::new("processing-time-at-end");
    job.source("numbers", GeneratorSource::new(Keys { n, keys: 100 }))
        .key_by("by-key", |k: &u64| *k)
        .window("hourly", TumblingWindows::processing_time(3_600_000))
        .aggregate(Count::new(), |k: &u64, _: TimeWindow, c: u64| (*k, c))
        .sink("out", out.clone());
    let config = JobConfig::default().with_parallelism(2).with_checkpointing(settings(dir.path(), 5));
    job.run(config).unwrap().wait().unwrap();
    let mut got: BTreeMap<u64, u64> = BTreeMap::new();
    for ((k, c), _) in out.take() {
        *got.entry(k).or_default() += c;
    }
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    for i in 0..n {
        *expected.entry(mix(i) % 100).or_default() += 1;
    }
    assert_eq!(got, expected);
}

/// A service appends to five durable ingest logs (more logs than shards: each shard reads
/// several, a split each) in batches, waiting for each batch to be durable; the job counts
/// by key with checkpoints every 5 ms and a user function that panics once between 40% and
/// 70% of the events. After the restart every log resumes at its own recorded offset: every
/// key's committed counts are exactly 1..=n.
#[test]
fn ingest_logs_are_read_exactly_once_across_a_restart() {
    use weir::source::IngestSource;
    use weir::state::ingest::IngestLog;
    const LOGS: u64 = 5;
    const EVENTS: u64 = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let logs: Vec<_> =
        (0..LOGS).map(|i| IngestLog::open(&dir.path().join(format!("events-{i}.ingest"))).unwrap()).collect();
    let panic_at = EVENTS * 4 / 10 + mix(seed()) % (EVENTS * 3 / 10);
    let (seen, fired) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let job = Job::new("ingest-count");
    let out = ExactlyOnceCollectSink::new();
    let decode = |bytes: &[u8]| bytes.try_into().map(u64::from_le_bytes).map_err(|_| "not 8 bytes".to_owned());
    job.source("events", IngestSource::new(logs.clone(), decode))
        .key_by("by-key", |k: &u64| *k)
        .reduce("count", |k: &u64| (*k, 0u64), count_with_one_panic(Arc::clone(&seen), Arc::clone(&fired), panic_at))
        .sink("out", out.clone());
    let config = JobConfig::default().with_parallelism(2).with_checkpointing(settings(&dir.path().join("cp"), 5));
    let handle = job.run(config).unwrap();
    let key = |i: u64| mix(i) % 1_000;
    for batch in 0..EVENTS / 1_000 {
        let mut last = vec![None; LOGS as usize];
        for i in batch * 1_000..(batch + 1) * 1_000 {
            let log = (mix(i ^ 0x5eed) % LOGS) as usize;
            last[log] = Some(logs[log].append(&key(i).to_le_bytes()).unwrap());
        }
        // Group commit: the batch is durable once every log it went to synced past it (one
        // sync a log covers all of the batch's appends there).
        for (log, offset) in logs.iter().zip(&last) {
            if let Some(offset) = *offset {
                log.wait_durable(offset).unwrap();
                assert!(log.durable_offset() > offset);
            }
        }
    }
    for log in &logs {
        log.close().unwrap();
    }
    let stats = handle.wait().unwrap().checkpoints;
    assert_one_restart_from_a_checkpoint(&fired, &stats);
    assert_every_count_once(out.take().into_iter().map(|(kc, _)| kc), &expected_counts_by(EVENTS, key));
}
