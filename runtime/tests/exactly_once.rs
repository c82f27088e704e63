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

/// Keyed counting over many keys with a user function that panics once, somewhere between 40%
/// and 70% of the input: every key's committed counts are exactly 1, 2, ..., n (nothing lost,
/// nothing twice) and n is the key's true count.
fn keyed_count_with_a_panic(parallelism: usize) {
    let n = records();
    let keys = 10_000;
    let panic_at = n * 4 / 10 + mix(seed()) % (n * 3 / 10);
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let fired = Arc::new(AtomicBool::new(false));
    let (seen2, fired2) = (Arc::clone(&seen), Arc::clone(&fired));
    let job = Job::new("exactly-once-count");
    let out = ExactlyOnceCollectSink::new();
    job.source("numbers", GeneratorSource::new(Keys { n, keys }))
        .key_by("by-key", |k: &u64| *k)
        .reduce(
            "count",
            |k: &u64| (*k, 0u64),
            move |(k, c): (u64, u64), _| {
                if seen2.fetch_add(1, Ordering::Relaxed) == panic_at && !fired2.swap(true, Ordering::SeqCst) {
                    panic!("injected failure at record {panic_at}");
                }
                (k, c + 1)
            },
        )
        .sink("out", out.clone());
    let config = JobConfig::default().with_parallelism(parallelism).with_checkpointing(settings(dir.path(), 5));
    let handle = job.run(config).unwrap();
    let stats = handle.wait().unwrap().checkpoints;
    assert!(fired.load(Ordering::SeqCst), "the failure was injected");
    assert_eq!(stats.restarts, 1, "one restart: {stats:?}");
    assert!(stats.restored.get(1).copied().flatten().is_some(), "the restart restored a checkpoint: {stats:?}");
    let mut per_key: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for ((k, c), _) in out.take() {
        per_key.entry(k).or_default().push(c);
    }
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    for i in 0..n {
        *expected.entry(mix(i) % keys).or_default() += 1;
    }
    assert_eq!(per_key.len(), expected.len());
    for (k, mut counts) in per_key {
        counts.sort_unstable();
        let want: Vec<u64> = (1..=expected[&k]).collect();
        assert_eq!(counts, want, "key {k}: every count committed exactly once");
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
