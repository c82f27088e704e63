//! Storage faults in a running job (fail points of `weir-state`, active when the workspace is
//! tested with `--features weir-state/failpoints`, as CI does): a full disk while writing a
//! checkpoint's files fails that checkpoint, not the job; a failed msync is never retried and
//! then trusted: the store is suspect, so the job restarts from the last complete checkpoint.
//! Either way the committed output is exact. One test function: fail points are process-wide.

use std::collections::BTreeMap;
use std::time::Duration;

use weir::checkpointing::{CheckpointSettings, RestartStrategy};
use weir::prelude::*;
use weir::twophase::ExactlyOnceCollectSink;

const N: u64 = 600_000;

struct Keys;

impl Generator for Keys {
    type Out = u64;
    fn generate(&self, offset: u64) -> Option<u64> {
        (offset < N).then(|| offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) % 500)
    }
}

/// Whether the fail points are compiled in (the `failpoints` feature of `weir-state`).
fn fail_points_active() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let mut store = weir::state::StateStore::create(dir.path(), weir::state::StoreConfig::default()).unwrap();
    fail::cfg("state::sync_segment", "1*return(eio)").unwrap();
    let failed = store.checkpoint(1).unwrap().task.run().is_err();
    fail::remove("state::sync_segment");
    failed
}

fn run(dir: &std::path::Path, inject: impl FnOnce()) -> (weir::checkpointing::CheckpointStats, Vec<(u64, u64)>) {
    run_with(dir, 5, 2, inject)
}

/// [`run`] with checkpoints every `interval_ms`, injecting the fault once `before` of them
/// completed.
fn run_with(
    dir: &std::path::Path,
    interval_ms: i64,
    before: usize,
    inject: impl FnOnce(),
) -> (weir::checkpointing::CheckpointStats, Vec<(u64, u64)>) {
    let out = ExactlyOnceCollectSink::new();
    let job = Job::new("faults");
    job.source("numbers", GeneratorSource::new(Keys))
        .key_by("by-key", |k: &u64| *k)
        .reduce("count", |k: &u64| (*k, 0u64), |(k, c): (u64, u64), _| (k, c + 1))
        .sink("out", out.clone());
    let settings = CheckpointSettings::new(dir, interval_ms)
        .with_restart(RestartStrategy::FixedDelay { attempts: 2, delay: Duration::from_millis(5) });
    // Small segments: new ones are created (and fsynced early by write-behind) all the time.
    let config = JobConfig { segment_bytes: 64 << 10, ..JobConfig::default() };
    let handle = job.run(config.with_parallelism(2).with_checkpointing(settings)).unwrap();
    // Let a checkpoint or two complete before the fault.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while handle.checkpoint_stats().completed.len() < before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    inject();
    (handle.wait().unwrap().checkpoints, out.take().into_iter().map(|(v, _)| v).collect())
}

fn assert_exact(output: Vec<(u64, u64)>) {
    let mut per_key: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (k, c) in output {
        per_key.entry(k).or_default().push(c);
    }
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    for i in 0..N {
        *expected.entry(Keys.generate(i).unwrap()).or_default() += 1;
    }
    assert_eq!(per_key.len(), expected.len());
    for (k, mut counts) in per_key {
        counts.sort_unstable();
        assert_eq!(counts, (1..=expected[&k]).collect::<Vec<_>>(), "key {k}");
    }
}

#[test]
fn storage_faults_fail_checkpoints_and_recovery_keeps_the_output_exact() {
    let scenario = fail::FailScenario::setup();
    if !fail_points_active() {
        eprintln!("fail points are not compiled in (test with --features weir-state/failpoints); skipped");
        return;
    }
    // A full disk while committing a checkpoint's manifest (its commit slot): that checkpoint
    // is aborted; the job keeps running without a restart.
    let dir = tempfile::tempdir().unwrap();
    let (stats, output) = run(dir.path(), || fail::cfg("state::write_slot", "1*return(enospc)").unwrap());
    assert!(!stats.aborted.is_empty(), "a checkpoint failed: {stats:?}");
    assert_eq!(stats.restarts, 0, "the job did not fail: {stats:?}");
    assert!(!stats.completed.is_empty());
    assert_exact(output);
    fail::remove("state::write_slot");

    // The same at the final checkpoint (the only ones: the interval is a minute), twice: the
    // sources end only once a checkpoint after their last record completed, so it is retried,
    // and the job finishes without a restart, every output committed.
    let dir = tempfile::tempdir().unwrap();
    let (stats, output) =
        run_with(dir.path(), 60_000, 0, || fail::cfg("state::write_slot", "2*return(enospc)").unwrap());
    assert_eq!(stats.aborted.len(), 2, "two final checkpoints failed: {stats:?}");
    assert_eq!(stats.restarts, 0, "the job did not fail: {stats:?}");
    assert!(stats.completed.iter().all(|c| stats.aborted.iter().all(|(a, _)| c.id > *a)), "{stats:?}");
    assert_exact(output);
    fail::remove("state::write_slot");

    // Five in a row: the attempt gives up (a restart, from nothing here), and the next one's
    // final checkpoint completes.
    let dir = tempfile::tempdir().unwrap();
    let (stats, output) =
        run_with(dir.path(), 60_000, 0, || fail::cfg("state::write_slot", "5*return(enospc)").unwrap());
    assert_eq!(stats.restarts, 1, "{stats:?}");
    assert!(stats.restart_causes[0].contains("5 final checkpoints failed in a row"), "{stats:?}");
    assert_exact(output);
    fail::remove("state::write_slot");

    // A full disk while writing any other file of a checkpoint (an index snapshot, a
    // manifest under its name after completion) fails that write only: the job keeps running
    // and its output is exact.
    let dir = tempfile::tempdir().unwrap();
    let (stats, output) = run(dir.path(), || fail::cfg("state::write_file", "3*return(enospc)").unwrap());
    assert_eq!(stats.restarts, 0, "the job did not fail: {stats:?}");
    assert!(!stats.completed.is_empty());
    assert_exact(output);
    fail::remove("state::write_file");

    // An msync error: the checkpoint fails, the store is suspect (never synced again and
    // trusted), so the job restarts from the last complete checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let (stats, output) = run(dir.path(), || fail::cfg("state::sync_segment", "1*return(eio)").unwrap());
    assert!(!stats.aborted.is_empty(), "the checkpoint failed: {stats:?}");
    assert_eq!(stats.restarts, 1, "the job restarted: {stats:?}");
    assert!(stats.restored.get(1).copied().flatten().is_some(), "from a complete checkpoint: {stats:?}");
    assert_exact(output);
    fail::remove("state::sync_segment");

    // An fsync error on a new segment file, in write-behind: the store is suspect, its next
    // seal fails the stage, and the job restarts from the last complete checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let (stats, output) = run(dir.path(), || fail::cfg("state::presync_segment", "1*return(eio)").unwrap());
    assert_eq!(stats.restarts, 1, "the job restarted: {stats:?}");
    assert!(stats.restored.get(1).copied().flatten().is_some(), "from a complete checkpoint: {stats:?}");
    assert_exact(output);
    fail::remove("state::presync_segment");
    scenario.teardown();
}
