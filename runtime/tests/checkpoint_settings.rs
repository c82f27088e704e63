//! The coordinator's settings in a running job (the protocol tests check them as pure logic):
//! a timeout aborts a checkpoint and the job runs on, at most `max_concurrent` are in flight,
//! the minimum pause separates one checkpoint's completion from the next trigger, the directory
//! keeps `retained` checkpoints. The committed
//! output stays exact throughout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use weir::checkpoint::CheckpointConfig;
use weir::checkpointing::{CheckpointSettings, CheckpointStat, CheckpointStats};
use weir::prelude::*;
use weir::twophase::ExactlyOnceCollectSink;

const N: u64 = 300_000;
const KEYS: u64 = 200;

fn key(offset: u64) -> u64 {
    (offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) % KEYS
}

struct Keys;

impl Generator for Keys {
    type Out = u64;
    fn generate(&self, offset: u64) -> Option<u64> {
        (offset < N).then(|| key(offset))
    }
}

/// A keyed count over `N` records whose shard `stall` stops for `stall_for` once, at the
/// record numbered `N / 2` of its input, then its committed output and checkpoint stats.
fn run(protocol: CheckpointConfig, stall_for: Duration) -> (CheckpointStats, Vec<(u64, u64)>) {
    let dir = tempfile::tempdir().unwrap();
    let out = ExactlyOnceCollectSink::new();
    let stalled = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let job = Job::new("settings");
    job.source("numbers", GeneratorSource::new(Keys))
        .map("stall", move |k: u64| {
            if seen.fetch_add(1, Ordering::Relaxed) == N / 4 && !stalled.swap(true, Ordering::SeqCst) {
                std::thread::sleep(stall_for);
            }
            k
        })
        .key_by("by-key", |k: &u64| *k)
        .reduce("count", |k: &u64| (*k, 0u64), |(k, c): (u64, u64), _| (k, c + 1))
        .sink("out", out.clone());
    let settings = CheckpointSettings { protocol, ..CheckpointSettings::new(dir.path(), 0) };
    let report = job.run(JobConfig::default().with_parallelism(2).with_checkpointing(settings)).unwrap().wait();
    let report = report.unwrap();
    let retained = weir::state::manifest::CheckpointDirectory::open(dir.path()).unwrap().list().unwrap();
    let completed: Vec<u64> = report.checkpoints.completed.iter().map(|c| c.id).collect();
    let expected_retained =
        completed[completed.len().saturating_sub(protocol_retained(&report.checkpoints))..].to_vec();
    assert_eq!(retained, expected_retained, "the directory keeps the newest retained checkpoints");
    (report.checkpoints, out.take().into_iter().map(|(v, _)| v).collect())
}

/// How many checkpoints the run retained (the setting; at most how many completed).
fn protocol_retained(stats: &CheckpointStats) -> usize {
    RETAINED.min(stats.completed.len())
}

const RETAINED: usize = 3;

fn protocol(interval_ms: i64) -> CheckpointConfig {
    CheckpointConfig { interval_ms, retained: RETAINED, ..CheckpointConfig::default() }
}

fn assert_exact(output: Vec<(u64, u64)>) {
    let mut per_key: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (k, c) in output {
        per_key.entry(k).or_default().push(c);
    }
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    for i in 0..N {
        *expected.entry(key(i)).or_default() += 1;
    }
    assert_eq!(per_key.len(), expected.len());
    for (k, mut counts) in per_key {
        counts.sort_unstable();
        assert_eq!(counts, (1..=expected[&k]).collect::<Vec<_>>(), "key {k}");
    }
}

/// Pairs of checkpoints that completed one after the other, with no abort between them.
fn consecutive(stats: &CheckpointStats) -> Vec<(&CheckpointStat, &CheckpointStat)> {
    let aborted: Vec<u64> = stats.aborted.iter().map(|(id, _)| *id).collect();
    stats
        .completed
        .windows(2)
        .filter(|w| !aborted.iter().any(|a| *a > w[0].id && *a < w[1].id))
        .map(|w| (&w[0], &w[1]))
        .collect()
}

#[test]
fn a_timed_out_checkpoint_is_aborted_and_the_job_runs_on() {
    // The stall holds a barrier for 600 ms: the checkpoint in flight then times out at 150.
    let config = CheckpointConfig { timeout_ms: 150, ..protocol(10) };
    let (stats, output) = run(config, Duration::from_millis(600));
    let timed_out: Vec<_> = stats.aborted.iter().filter(|(_, reason)| reason.contains("timed out")).collect();
    assert!(!timed_out.is_empty(), "a checkpoint timed out: {:?}", stats.aborted);
    assert_eq!(stats.restarts, 0, "no restart: {:?}", stats.restart_causes);
    let last_timeout = timed_out.iter().map(|(id, _)| *id).max().unwrap();
    assert!(stats.completed.iter().any(|c| c.id > last_timeout), "checkpoints completed after the timeout");
    assert_exact(output);
}

#[test]
fn checkpoints_in_flight_never_exceed_max_concurrent() {
    // One at a time (the default): each is triggered after the previous one completed.
    let (stats, output) = run(protocol(5), Duration::from_millis(200));
    assert!(stats.aborted.is_empty(), "{:?}", stats.aborted);
    for (a, b) in stats.completed.windows(2).map(|w| (&w[0], &w[1])) {
        assert_eq!(b.id, a.id + 1);
        assert!(b.triggered_at >= a.completed_at, "{} triggered before {} completed", b.id, a.id);
    }
    assert_exact(output);
    // Three: while the stall holds a barrier back, two more are triggered; the stalled source
    // then injects only the newest, whose completion supersedes the other two. Between two
    // complete checkpoints `a` and `b`, every id in between was in flight with `b` when `b`
    // was triggered (only a completion aborts one here), so `b - a` is at most three.
    let config = CheckpointConfig { max_concurrent: 3, ..protocol(5) };
    let (stats, output) = run(config, Duration::from_millis(200));
    assert!(stats.aborted.iter().all(|(_, reason)| reason.contains("superseded")), "{:?}", stats.aborted);
    let gaps: Vec<u64> = stats.completed.windows(2).map(|w| w[1].id - w[0].id).collect();
    assert!(gaps.iter().all(|g| *g <= 3), "{gaps:?}");
    assert!(gaps.iter().any(|g| *g > 1), "checkpoints were in flight together: {gaps:?}");
    assert_exact(output);
}

#[test]
fn the_minimum_pause_separates_a_completion_from_the_next_trigger() {
    let config = CheckpointConfig { min_pause_ms: 25, ..protocol(1) };
    let (stats, output) = run(config, Duration::from_millis(100));
    let pairs = consecutive(&stats);
    assert!(pairs.len() >= 2, "{:?}", stats.completed);
    for (a, b) in pairs {
        // The coordinator's clock counts whole milliseconds.
        let pause = b.triggered_at.saturating_duration_since(a.completed_at);
        assert!(pause >= Duration::from_millis(24), "{} triggered {pause:?} after {} completed", b.id, a.id);
    }
    assert_exact(output);
}

/// A job without checkpoints refuses a checkpoint on demand at once (on-demand checkpoints
/// themselves are tested with a chosen-checkpoint resume, in `savepoints.rs`).
#[test]
fn a_job_without_checkpoints_refuses_one_on_demand() {
    let plain = Job::new("plain");
    plain.source("n", VecSource::new(vec![1u64])).sink("out", CollectSink::new());
    let handle = plain.run(JobConfig::default().with_parallelism(1)).unwrap();
    let started = std::time::Instant::now();
    let message = handle.checkpoint().unwrap_err().to_string();
    assert!(message.contains("without checkpoints"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once");
    handle.wait().unwrap();
}
