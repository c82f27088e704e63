//! Savepoints: stop with and without drain, resume, rescale (P=2 -> 4 -> 1), and a removed
//! operator. Sources here are gated: they hand out records up to a limit the test raises, and
//! idle (or end) after it, so a job is still running when the test stops it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use weir::checkpointing::CheckpointSettings;
use weir::prelude::*;
use weir::source::{DeadLetter, ReadStatus};
use weir::state::keygroup::{KeyEncode, KeyGroupRange, key_group_of_encoded};
use weir::twophase::{ExactlyOnceCallbackSink, ExactlyOnceCollectSink};

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// Records `(key, timestamp)` for offsets `0..n`, shard `s` of `P` taking `s, s + P, ...`,
/// each only once `allowed` exceeds it. After `n` (or the gate) the source idles, or ends
/// when `end` is set.
#[derive(Clone)]
struct Gated {
    n: u64,
    keys: u64,
    salt: u64,
    allowed: Arc<AtomicU64>,
    end: Arc<AtomicBool>,
}

impl Gated {
    fn new(n: u64, keys: u64, salt: u64) -> Gated {
        Gated { n, keys, salt, allowed: Arc::new(AtomicU64::new(0)), end: Arc::new(AtomicBool::new(false)) }
    }
    fn record(&self, i: u64) -> (u64, i64) {
        (mix(i ^ self.salt) % self.keys, i as i64)
    }
    fn open(&self, upto: u64, end: bool) {
        self.allowed.store(upto, Ordering::SeqCst);
        self.end.store(end, Ordering::SeqCst);
    }
}

struct GatedReader {
    source: Gated,
    next: u64,
    stride: u64,
    start: u64,
}

impl Source for Gated {
    type Out = (u64, i64);
    type Reader = GatedReader;
    /// Eight splits (split `s` reads records `s, s + 8, ...`), so a job reads the same input at
    /// any parallelism up to eight, and resumes it at another.
    fn splits(&self) -> u32 {
        8
    }
    fn reader(&self, split: u32) -> weir::Result<GatedReader> {
        let split = u64::from(split);
        Ok(GatedReader { source: self.clone(), next: split, stride: 8, start: split })
    }
}

impl SourceReader for GatedReader {
    type Out = (u64, i64);
    fn read(&mut self, out: &mut Vec<(u64, i64)>, _: &mut Vec<DeadLetter>, max: usize) -> weir::Result<ReadStatus> {
        let limit = self.source.allowed.load(Ordering::SeqCst).min(self.source.n);
        let mut produced = 0;
        while produced < max && self.next < limit {
            out.push(self.source.record(self.next));
            self.next += self.stride;
            produced += 1;
        }
        if produced == max {
            return Ok(ReadStatus::More);
        }
        // Opened with `end`, the input ends at the records let in so far.
        if self.next >= limit && self.source.end.load(Ordering::SeqCst) {
            return Ok(ReadStatus::End);
        }
        Ok(if produced > 0 { ReadStatus::More } else { ReadStatus::Idle })
    }
    fn offset(&self) -> u64 {
        (self.next - self.start) / self.stride
    }
    fn seek(&mut self, offset: u64) -> weir::Result<()> {
        self.next = self.start + offset * self.stride;
        Ok(())
    }
}

fn config(parallelism: usize, dir: &std::path::Path, savepoint: Option<&std::path::Path>) -> JobConfig {
    let mut settings = CheckpointSettings::new(dir, 20);
    settings.savepoint = savepoint.map(Into::into);
    JobConfig::default().with_parallelism(parallelism).with_checkpointing(settings)
}

type WindowOut = (u64, i64, u64);

/// Event-time tumbling-window counts per key.
fn window_job(source: &Gated, out: &ExactlyOnceCollectSink<WindowOut>) -> Job {
    let job = Job::new("windows");
    job.source_with_watermarks(
        "input",
        source.clone(),
        WatermarkStrategy::bounded_out_of_orderness(5).with_timestamp_assigner(|r: &(u64, i64), _: Option<i64>| r.1),
    )
    .key_by("by-key", |r: &(u64, i64)| r.0)
    .window("per-second", TumblingWindows::event_time(1_000))
    .aggregate(Count::new(), |k: &u64, w: TimeWindow, n: u64| (*k, w.start(), n))
    .sink("out", out.clone());
    job
}

fn values<T: Ord>(records: Vec<(T, i64)>) -> Vec<T> {
    let mut v: Vec<T> = records.into_iter().map(|(t, _)| t).collect();
    v.sort();
    v
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

const N: u64 = 200_000;

fn uninterrupted_windows() -> Vec<WindowOut> {
    let dir = tempfile::tempdir().unwrap();
    let source = Gated::new(N, 20, 0);
    source.open(N, true);
    let out = ExactlyOnceCollectSink::new();
    window_job(&source, &out).run(config(2, dir.path(), None)).unwrap().wait().unwrap();
    values(out.take())
}

#[test]
fn stop_without_drain_then_resume_gives_the_uninterrupted_output() {
    let expected = uninterrupted_windows();
    let tmp = tempfile::tempdir().unwrap();
    let savepoint = tmp.path().join("savepoint");
    // Run 1: half of the input, then stop with a savepoint, without drain.
    let source = Gated::new(N, 20, 0);
    source.open(N / 2, false);
    let out1 = ExactlyOnceCollectSink::new();
    let handle = window_job(&source, &out1).run(config(2, &tmp.path().join("run-1"), None)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (info, _) = handle.stop_with_savepoint(&savepoint, false).unwrap();
    assert!(info.summary.operators.iter().any(|o| o.uid == "per-second"), "{info:?}");
    let first = values(out1.take());
    assert!(first.len() < expected.len(), "pending windows stayed in the savepoint");
    // Run 2: resume with the whole input.
    let source = Gated::new(N, 20, 0);
    source.open(N, true);
    let out2 = ExactlyOnceCollectSink::new();
    let report =
        window_job(&source, &out2).run(config(2, &tmp.path().join("run-2"), Some(&savepoint))).unwrap().wait().unwrap();
    assert_eq!(report.checkpoints.restored.first().copied().flatten(), Some(info.id));
    let mut all = first;
    all.extend(values(out2.take()));
    all.sort();
    assert_eq!(all, expected, "windows before and after the stop are exactly the uninterrupted ones");
}

#[test]
fn stop_with_drain_fires_every_pending_window() {
    let tmp = tempfile::tempdir().unwrap();
    let savepoint = tmp.path().join("savepoint");
    let source = Gated::new(N, 20, 0);
    source.open(N / 2, false);
    let out = ExactlyOnceCollectSink::new();
    let handle = window_job(&source, &out).run(config(2, &tmp.path().join("run"), None)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (info, _) = handle.stop_with_savepoint(&savepoint, true).unwrap();
    let fired = values(out.take());
    // Every record consumed before the stop is counted in a fired window, once.
    let consumed: u64 = {
        let manifest = weir::state::manifest::CheckpointDirectory::open(&savepoint).unwrap().latest().unwrap();
        let meta = weir::checkpointing::JobMetadata::decode(&manifest.manifest.unwrap().metadata).unwrap();
        meta.sources.iter().map(|s| s.offset).sum()
    };
    assert!(consumed > 0);
    assert_eq!(fired.iter().map(|w| w.2).sum::<u64>(), consumed);
    let mut windows: Vec<(u64, i64)> = fired.iter().map(|w| (w.0, w.1)).collect();
    windows.dedup();
    assert_eq!(windows.len(), fired.len(), "no window fired twice");
    // Nothing is left pending in the savepoint's window state.
    let pending = info.summary.operators.iter().find(|o| o.uid == "per-second").map_or(0, |o| o.entries);
    assert_eq!(pending, 0, "{info:?}");
}

/// A rolling count per key whose output names the shard it ran on.
fn count_job(
    source_uid: &'static str,
    source: &Gated,
    extra: bool,
    out: &ExactlyOnceCallbackSink<(u64, u64), SinkFn>,
) -> Job {
    let job = Job::new("counts");
    let counted = job.source(source_uid, source.clone()).key_by("by-key", |r: &(u64, i64)| r.0).reduce(
        "count",
        |k: &u64| (*k, 0u64),
        |(k, c): (u64, u64), _| (k, c + 1),
    );
    if extra {
        counted
            .key_by("by-key-again", |r: &(u64, u64)| r.0)
            .reduce("extra", |k: &u64| (*k, 0u64), |(k, c): (u64, u64), r: (u64, u64)| (k, c.max(r.1)))
            .sink("out", out.clone());
    } else {
        counted.sink("out", out.clone());
    }
    job
}

type SinkFn = Box<dyn Fn((u64, u64), i64, usize) + Send + Sync>;

/// Latest count per key, and every (key, shard) seen.
#[derive(Debug, Default)]
struct Seen {
    counts: BTreeMap<u64, u64>,
    shards: Vec<(u64, usize)>,
    records: u64,
}

fn counting_sink(seen: &Arc<std::sync::Mutex<Seen>>) -> ExactlyOnceCallbackSink<(u64, u64), SinkFn> {
    let seen = Arc::clone(seen);
    ExactlyOnceCallbackSink::new(Box::new(move |(k, c): (u64, u64), _, shard| {
        let mut s = seen.lock().unwrap();
        let e = s.counts.entry(k).or_default();
        *e = (*e).max(c);
        s.shards.push((k, shard));
        s.records += 1;
    }) as SinkFn)
}

fn owner(key: u64, parallelism: usize) -> usize {
    let mut buf = Vec::new();
    key.encode_key(&mut buf);
    let group = key_group_of_encoded(&buf, weir::state::keygroup::DEFAULT_MAX_PARALLELISM);
    KeyGroupRange::shard_for(group, parallelism, weir::state::keygroup::DEFAULT_MAX_PARALLELISM)
}

/// Runs `source` to its end gate at `parallelism`, from `resume` if given, and stops with a
/// savepoint into `savepoint` once every record reached the sink.
fn count_phase(
    phase: &str,
    parallelism: usize,
    source: &Gated,
    upto: u64,
    tmp: &std::path::Path,
    resume: Option<&std::path::Path>,
    savepoint: &std::path::Path,
) -> Seen {
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let job = count_job("input", source, false, &counting_sink(&seen));
    let before = source.allowed.load(Ordering::SeqCst);
    source.open(upto, false);
    let handle = job.run(config(parallelism, &tmp.join(format!("run-{phase}")), resume)).unwrap();
    wait_until("every new record is committed", || seen.lock().unwrap().records >= upto - before);
    handle.stop_with_savepoint(savepoint, false).unwrap();
    std::mem::take(&mut *seen.lock().unwrap())
}

/// One input, read by the same source (uid "input") in every phase, with more of it let in
/// each time: each phase resumes the source's offsets (eight splits, dealt anew at each
/// parallelism) and the counts from the previous phase's savepoint.
#[test]
fn rescaling_two_to_four_to_one_keeps_every_count_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let source = Gated::new(60_000, 500, 11);
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    let phases = [(2usize, 30_000u64), (4, 50_000), (1, 60_000)];
    let (mut previous, mut read): (Option<std::path::PathBuf>, u64) = (None, 0);
    for (i, (parallelism, upto)) in phases.into_iter().enumerate() {
        let phase = (i + 1).to_string();
        for r in read..upto {
            *expected.entry(source.record(r).0).or_default() += 1;
        }
        let savepoint = tmp.path().join(format!("savepoint-{phase}"));
        let seen = count_phase(&phase, parallelism, &source, upto, tmp.path(), previous.as_deref(), &savepoint);
        assert_eq!(seen.records, upto - read, "phase {phase}: each new record counted once, none replayed");
        for (key, shard) in &seen.shards {
            assert_eq!(*shard, owner(*key, parallelism), "key {key} ran on the shard its key group says");
        }
        for (key, count) in &seen.counts {
            assert_eq!(count, &expected[key], "phase {phase}: key {key}'s count continues exactly");
        }
        (previous, read) = (Some(savepoint), upto);
    }
}

/// Rescaling from a retained checkpoint, without a savepoint: each phase runs its input to the
/// end in one checkpoint directory, and the next phase, at another parallelism, resumes from
/// the latest checkpoint there (its state is redistributed by key group).
#[test]
fn rescaling_from_retained_checkpoints_keeps_every_count_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("checkpoints");
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    // One input under one source uid, more of it let in each phase; back to 4 at the end: a
    // parallelism whose store directory an older checkpoint used.
    let source = Gated::new(70_000, 500, 11);
    let phases = [(2usize, 30_000u64), (4, 50_000), (1, 60_000), (4, 70_000)];
    let mut read = 0;
    for (phase, (parallelism, upto)) in phases.into_iter().enumerate() {
        for r in read..upto {
            *expected.entry(source.record(r).0).or_default() += 1;
        }
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let job = count_job("input", &source, false, &counting_sink(&seen));
        source.open(upto, true);
        let report = job.run(config(parallelism, &dir, None)).unwrap().wait().unwrap();
        if phase > 0 {
            assert!(report.checkpoints.restored.first().copied().flatten().is_some(), "phase {phase} resumed");
        }
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        assert_eq!(seen.records, upto - read, "phase {phase}: each new record's count committed once");
        for (key, shard) in &seen.shards {
            assert_eq!(*shard, owner(*key, parallelism), "key {key} ran on the shard its key group says");
        }
        for (key, count) in &seen.counts {
            assert_eq!(count, &expected[key], "phase {phase}: key {key}'s count continues exactly");
        }
        read = upto;
    }
    // Only the last parallelism's stores are left once a checkpoint at it was restored.
    let source = Gated::new(0, 500, 55);
    source.open(0, true);
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    count_job("input-5", &source, false, &counting_sink(&seen)).run(config(4, &dir, None)).unwrap().wait().unwrap();
    // The reaper removes them off the restart path: give it a moment.
    wait_until("stale stores are removed", || {
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != "manifests")
            .collect();
        left == ["p4"]
    });
    // Every manifest left is restorable: no older one names stores that were cleared.
    let directory = weir::state::manifest::CheckpointDirectory::open(&dir).unwrap();
    wait_until("older manifests are removed", || {
        directory.list().unwrap().into_iter().all(|id| {
            let manifest = directory.read(id).unwrap();
            manifest.shards.iter().all(|store| dir.join(&store.store_dir).is_dir())
        })
    });
}

#[test]
fn a_removed_operator_fails_the_resume_unless_dropping_state_is_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let savepoint = tmp.path().join("savepoint");
    let source = Gated::new(1_000, 10, 1);
    source.open(1_000, false);
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let handle = count_job("input-1", &source, true, &counting_sink(&seen))
        .run(config(2, &tmp.path().join("run-1"), None))
        .unwrap();
    wait_until("every record is committed", || seen.lock().unwrap().records == 1_000);
    handle.stop_with_savepoint(&savepoint, false).unwrap();
    // Without the "extra" operator.
    let source = Gated::new(10, 10, 2);
    source.open(10, true);
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let job = count_job("input-2", &source, false, &counting_sink(&seen));
    let error = job.run(config(2, &tmp.path().join("run-2"), Some(&savepoint))).unwrap().wait().unwrap_err();
    let message = error.to_string();
    assert!(message.contains("extra") && message.contains("allow_unmatched_state"), "{message}");
    let mut settings = CheckpointSettings::new(tmp.path().join("run-3"), 20);
    settings.savepoint = Some(savepoint.clone());
    settings.allow_unmatched_state = true;
    let report =
        job.run(JobConfig::default().with_parallelism(2).with_checkpointing(settings)).unwrap().wait().unwrap();
    assert!(report.checkpoints.restored.first().copied().flatten().is_some());
    assert_eq!(seen.lock().unwrap().records, 10);
}

/// A job resumed from its own checkpoint directory (a new process, same parallelism) matches
/// state to operators by uid too: without the "extra" operator the resume fails naming it,
/// and succeeds when dropping its state is allowed.
#[test]
fn a_removed_operator_fails_a_resume_from_a_retained_checkpoint_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("checkpoints");
    let source = Gated::new(1_000, 10, 1);
    source.open(1_000, true);
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    count_job("input-1", &source, true, &counting_sink(&seen)).run(config(2, &dir, None)).unwrap().wait().unwrap();
    assert_eq!(seen.lock().unwrap().records, 1_000);
    let source = Gated::new(10, 10, 2);
    source.open(10, true);
    let job = count_job("input-2", &source, false, &counting_sink(&seen));
    let resume = |allow: bool| {
        let mut settings = CheckpointSettings::new(&dir, 20);
        settings.resume = true;
        settings.allow_unmatched_state = allow;
        job.run(JobConfig::default().with_parallelism(2).with_checkpointing(settings)).unwrap().wait()
    };
    let message = resume(false).unwrap_err().to_string();
    assert!(message.contains("checkpoint") && message.contains("extra"), "{message}");
    assert!(message.contains("allow_unmatched_state"), "{message}");
    let report = resume(true).unwrap();
    assert!(report.checkpoints.restored.first().copied().flatten().is_some(), "it resumed the checkpoint");
    assert_eq!(seen.lock().unwrap().records, 1_010);
}

/// A savepoint taken while the job runs on: the job goes on counting, and a job resumed from
/// the savepoint later continues from exactly what it held (its counts and offsets), so it
/// ends with the same counts as the job that never stopped.
#[test]
fn a_savepoint_of_a_running_job_resumes_where_it_was_taken() {
    let tmp = tempfile::tempdir().unwrap();
    let savepoint = tmp.path().join("savepoint");
    let source = Gated::new(2_000, 50, 3);
    let expected = |upto: u64| {
        let mut counts: BTreeMap<u64, u64> = BTreeMap::new();
        for r in 0..upto {
            *counts.entry(source.record(r).0).or_default() += 1;
        }
        counts
    };
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    source.open(1_000, false);
    let handle = count_job("input", &source, false, &counting_sink(&seen))
        .run(config(2, &tmp.path().join("run-1"), None))
        .unwrap();
    wait_until("the first 1,000 records are committed", || seen.lock().unwrap().records == 1_000);
    let info = handle.savepoint(&savepoint).unwrap();
    assert!(info.id > 0);
    // The job runs on after it.
    source.open(2_000, false);
    wait_until("the next 1,000 records are committed", || seen.lock().unwrap().records == 2_000);
    assert_eq!(seen.lock().unwrap().counts, expected(2_000));
    handle.cancel();
    let _ = handle.wait();
    // Resumed from the savepoint, the same input is read from the savepoint's offsets.
    let resumed = Arc::new(std::sync::Mutex::new(Seen::default()));
    let handle = count_job("input", &source, false, &counting_sink(&resumed))
        .run(config(2, &tmp.path().join("run-2"), Some(&savepoint)))
        .unwrap();
    wait_until("the resumed job caught up", || resumed.lock().unwrap().counts == expected(2_000));
    handle.cancel();
    let _ = handle.wait();
    assert_eq!(resumed.lock().unwrap().records, 1_000, "only what followed the savepoint was read again");
}

/// Records a checkpoint of `dir` says its source read (the sum of its split offsets).
fn records_read(dir: &std::path::Path, id: u64) -> u64 {
    let point = weir::checkpointing::restore_point_at(dir, id).unwrap();
    point.offsets("input").iter().map(|o| o.offset).sum()
}

/// A new process resumes from a chosen retained checkpoint, not the latest. The first run
/// takes checkpoints only on demand (interval 0): one once 20,000 records were read, one at
/// 40,000; it then reads all 60,000 and ends. A resume from the first (at `parallelism`) reads
/// the input again from its offsets and continues its counts: 40,000 records counted once
/// each, ending at the full counts. A checkpoint not in the directory, or a damaged one, fails
/// the resume (it never falls back to another).
fn resume_from_a_chosen_checkpoint(parallelism: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("checkpoints");
    let source = Gated::new(60_000, 300, 21);
    let mut settings = CheckpointSettings::new(&dir, 0);
    settings.protocol.retained = 100;
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let handle = count_job("input", &source, false, &counting_sink(&seen))
        .run(JobConfig::default().with_parallelism(2).with_checkpointing(settings.clone()))
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(handle.checkpoint_stats().completed.is_empty(), "none before one is asked for");
    let (mut marks, mut asked) = (Vec::new(), 0);
    for upto in [20_000, 40_000] {
        source.open(upto, false);
        // Each checkpoint on demand completes with what was read when it was triggered.
        let id = loop {
            let id = handle.checkpoint().unwrap();
            asked += 1;
            if records_read(&dir, id) == upto {
                break id;
            }
            assert!(records_read(&dir, id) < upto);
        };
        wait_until("its output is committed", || seen.lock().unwrap().records == upto);
        marks.push(id);
    }
    source.open(60_000, true);
    let report = handle.wait().unwrap();
    let ids: Vec<u64> = report.checkpoints.completed.iter().map(|c| c.id).collect();
    // With interval 0, only the checkpoints asked for, and a final one after each shard's
    // source ended (when the two end apart).
    assert!((asked + 1..=asked + 2).contains(&ids.len()), "{asked} asked for: {ids:?}");
    assert!(marks.iter().all(|m| ids.contains(m)), "{marks:?} in {ids:?}");

    let resume = |id: u64| {
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let settings = CheckpointSettings::new(&dir, 20).from_checkpoint(id);
        let job = count_job("input", &source, false, &counting_sink(&seen));
        let report =
            job.run(JobConfig::default().with_parallelism(parallelism).with_checkpointing(settings))?.wait()?;
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        Ok::<_, weir::RuntimeError>((report, seen))
    };
    let message = resume(9_999).unwrap_err().to_string();
    assert!(message.contains("checkpoint 9999 is not in"), "{message}");
    // A damaged chosen checkpoint is refused, not replaced by another.
    let manifest = dir.join("manifests").join(format!("chk-{:010}.manifest", marks[0]));
    let intact = std::fs::read(&manifest).unwrap();
    let mut damaged = intact.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x5a;
    std::fs::write(&manifest, &damaged).unwrap();
    let message = resume(marks[0]).unwrap_err().to_string();
    assert!(message.contains(&format!("checkpoint {}", marks[0])) && message.contains("CRC"), "{message}");
    std::fs::write(&manifest, &intact).unwrap();

    let (report, seen) = resume(marks[0]).unwrap();
    assert_eq!(report.checkpoints.restored, vec![Some(marks[0])]);
    assert_eq!(seen.records, 40_000, "the records after the chosen checkpoint, each counted once");
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    for r in 0..60_000 {
        *expected.entry(source.record(r).0).or_default() += 1;
    }
    assert_eq!(seen.counts, expected, "counts continue from the chosen checkpoint's");
    for (key, shard) in &seen.shards {
        assert_eq!(*shard, owner(*key, parallelism), "key {key} ran on the shard its key group says");
    }
}

#[test]
fn a_new_process_resumes_from_a_chosen_retained_checkpoint() {
    resume_from_a_chosen_checkpoint(2);
}

#[test]
fn a_chosen_retained_checkpoint_resumes_at_another_parallelism() {
    resume_from_a_chosen_checkpoint(3);
}
