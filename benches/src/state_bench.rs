//! Benchmarks of the state crate: plain programs that print numbers, each against a baseline
//! measured in the same run.
//!
//! - `ops`: put/get throughput of a [`ValueState<u64>`] with 8-byte keys, against
//!   `std::collections::HashMap<u64, u64>` doing the same operations.
//! - `checkpoint`: checkpoint duration with a given state size when 1% of the keys changed.
//! - `restore`: time from "process starts restoring" until the store answers a read, across
//!   state sizes (the claim: flat, because files are mapped, not read); and, for comparison,
//!   a restore that replays the whole log (no index snapshot) and the fold after it.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use weir_state::keygroup::KeyGroupRange;
use weir_state::states::ValueState;
use weir_state::store::{CheckpointHandle, Key, RestoreOptions};
use weir_state::{StateStore, StoreConfig};

const MAX_PARALLELISM: u16 = 4096;

/// Value of the checkpoint and restore benchmarks: 80 bytes, so a record is 128 bytes.
pub type Payload = [u8; 80];

/// A deterministic pseudo-random sequence (splitmix64): benchmarks must be repeatable.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn store_config() -> StoreConfig {
    StoreConfig {
        segment_bytes: 64 << 20,
        max_parallelism: MAX_PARALLELISM,
        key_groups: KeyGroupRange::all(MAX_PARALLELISM),
        ..StoreConfig::default()
    }
}

fn mops(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64() / 1e6
}

/// Result of the put/get benchmark at one size.
#[derive(Debug, Clone, Copy)]
pub struct OpsResult {
    /// Keys.
    pub keys: u64,
    /// Million inserts/s: weir, HashMap.
    pub insert_mops: (f64, f64),
    /// Million random gets/s.
    pub get_mops: (f64, f64),
    /// Million random updates/s.
    pub update_mops: (f64, f64),
}

/// Put/get throughput with 8-byte keys and values, weir against `HashMap<u64, u64>`.
pub fn ops(dir: &Path, keys: u64) -> weir_state::Result<OpsResult> {
    let order: Vec<u64> = {
        let mut rng = SplitMix(7);
        (0..keys).map(|_| rng.next_u64() % keys).collect()
    };
    // weir
    let mut store = StateStore::create(dir, store_config())?;
    let v: ValueState<u64> = ValueState::register(&mut store, "bench/v")?;
    let started = Instant::now();
    for k in 0..keys {
        v.put(&mut store, Key::new(&k.to_be_bytes(), MAX_PARALLELISM), &k)?;
    }
    let w_insert = started.elapsed();
    // Seal, so that updates below append (the worst case), as after a checkpoint.
    let pending = store.checkpoint(1)?;
    pending.task.run()?;
    let started = Instant::now();
    let mut sum = 0u64;
    for k in &order {
        sum =
            sum.wrapping_add(v.get(&store, Key::new(&k.to_be_bytes(), MAX_PARALLELISM))?.map_or(0, |x| x.to_native()));
    }
    black_box(sum);
    let w_get = started.elapsed();
    let started = Instant::now();
    for k in &order {
        v.put(&mut store, Key::new(&k.to_be_bytes(), MAX_PARALLELISM), &(k + 1))?;
    }
    let w_update = started.elapsed();
    drop(store);
    // HashMap, same operations.
    let mut map: HashMap<u64, u64> = HashMap::new();
    let started = Instant::now();
    for k in 0..keys {
        map.insert(black_box(k), k);
    }
    let h_insert = started.elapsed();
    let started = Instant::now();
    let mut sum = 0u64;
    for k in &order {
        sum = sum.wrapping_add(map.get(black_box(k)).copied().unwrap_or(0));
    }
    black_box(sum);
    let h_get = started.elapsed();
    let started = Instant::now();
    for k in &order {
        map.insert(black_box(*k), k + 1);
    }
    let h_update = started.elapsed();
    Ok(OpsResult {
        keys,
        insert_mops: (mops(keys, w_insert), mops(keys, h_insert)),
        get_mops: (mops(keys, w_get), mops(keys, h_get)),
        update_mops: (mops(keys, w_update), mops(keys, h_update)),
    })
}

/// Fills a store with `keys` keys of [`Payload`] values.
fn fill(store: &mut StateStore, v: ValueState<Payload>, keys: u64) -> weir_state::Result<()> {
    let mut value = [0u8; 80];
    for k in 0..keys {
        value[..8].copy_from_slice(&k.to_le_bytes());
        v.put(store, Key::new(&k.to_be_bytes(), MAX_PARALLELISM), &value)?;
    }
    Ok(())
}

/// Checkpoint durations.
#[derive(Debug)]
pub struct CheckpointResult {
    /// Keys in the state.
    pub keys: u64,
    /// Live state bytes.
    pub state_bytes: u64,
    /// Time on the caller's thread (seal, handle, index copy when due), microseconds.
    pub seal_us: Histogram<u64>,
    /// Time of the durability task (msync, index snapshot write), microseconds.
    pub sync_us: Histogram<u64>,
    /// Total (seal + sync) of checkpoints that wrote no index snapshot, microseconds.
    pub total_us_incremental: Histogram<u64>,
    /// Total of checkpoints that wrote an index snapshot, microseconds.
    pub total_us_with_index: Histogram<u64>,
    /// Mean bytes synced per checkpoint.
    pub bytes_synced_mean: u64,
}

/// Checkpoint duration with `state_bytes` of state and `changed_percent`% of keys changed
/// between checkpoints, over `rounds` checkpoints.
pub fn checkpoint(
    dir: &Path,
    state_bytes: u64,
    changed_percent: f64,
    rounds: u32,
) -> weir_state::Result<CheckpointResult> {
    let keys = state_bytes / 128;
    let mut store = StateStore::create(dir, store_config())?;
    let v: ValueState<Payload> = ValueState::register(&mut store, "bench/payload")?;
    fill(&mut store, v, keys)?;
    store.checkpoint(1)?.task.run()?;
    let mut rng = SplitMix(11);
    let changed = ((keys as f64) * changed_percent / 100.0) as u64;
    let hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let mut result = CheckpointResult {
        keys,
        state_bytes: store.stats().live_bytes,
        seal_us: hist(),
        sync_us: hist(),
        total_us_incremental: hist(),
        total_us_with_index: hist(),
        bytes_synced_mean: 0,
    };
    let mut synced = 0u64;
    let mut value = [7u8; 80];
    for round in 0..rounds {
        for _ in 0..changed {
            let k = rng.next_u64() % keys;
            value[..8].copy_from_slice(&(k + u64::from(round)).to_le_bytes());
            v.put(&mut store, Key::new(&k.to_be_bytes(), MAX_PARALLELISM), &value)?;
        }
        let started = Instant::now();
        let pending = store.checkpoint(u64::from(round) + 2)?;
        let sealed = started.elapsed();
        let durable = pending.task.run()?;
        let total = started.elapsed();
        synced += durable.bytes_synced;
        let us = |d: Duration| (d.as_micros() as u64).max(1);
        result.seal_us.saturating_record(us(sealed));
        result.sync_us.saturating_record(us(durable.duration));
        if durable.index_bytes > 0 {
            result.total_us_with_index.saturating_record(us(total));
        } else {
            result.total_us_incremental.saturating_record(us(total));
        }
        let retained = [&pending.handle];
        store.collect_garbage(&retained)?;
    }
    result.bytes_synced_mean = synced / u64::from(rounds.max(1));
    Ok(result)
}

/// Restore timings at one state size.
#[derive(Debug, Clone, Copy)]
pub struct RestoreResult {
    /// Live state bytes.
    pub state_bytes: u64,
    /// Keys.
    pub keys: u64,
    /// From calling restore until the first read answered (lazy checks).
    pub until_first_read: Duration,
    /// Mean time of the first 1000 random reads after restore (they fault pages in and check
    /// index chunks and records on first touch).
    pub first_reads_mean: Duration,
    /// Restore with every CRC checked up front, for comparison.
    pub verify_all: Duration,
    /// Restore of a checkpoint with no index snapshot: the whole log is the tail it replays.
    pub replay_all: Duration,
    /// Folding that replay's index delta into the table afterwards (between batches, in a job).
    pub fold_all: Duration,
    /// Index entries of the delta a restore left after [`FOLD_UPDATES_PER_MILLE`] of the keys
    /// were rewritten past the index snapshot (what a job restored after a failure folds).
    pub fold_updates_entries: usize,
    /// Folding those entries into the restored table: each one finds its key there (a key
    /// compare with an old record somewhere in the log).
    pub fold_updates: Duration,
}

/// Keys rewritten (per thousand, chosen at random) past the index snapshot for the fold of
/// updates: about what the log tail of the 1 GiB `checkpoint-scale --recover` job holds after
/// its failure (8% of the state replayed).
pub const FOLD_UPDATES_PER_MILLE: u64 = 80;

/// Restore time of a store with `state_bytes` of state, until it answers reads.
pub fn restore(dir: &Path, state_bytes: u64) -> weir_state::Result<RestoreResult> {
    let keys = state_bytes / 128;
    // No replay bound: checkpoint 1 is to name no index snapshot however large the state, for
    // the replay of the whole log below.
    let config = StoreConfig { index_snapshot_every: 1, max_replay_bytes: u64::MAX, ..store_config() };
    let handle = {
        let mut store = StateStore::create(dir, config.clone())?;
        let v: ValueState<Payload> = ValueState::register(&mut store, "bench/payload")?;
        fill(&mut store, v, keys)?;
        // Checkpoint 1 starts an index snapshot (copy-on-write); checkpoint 2 writes it, so
        // restoring 2 maps the snapshot and replays nothing, as after periodic checkpoints.
        let first = store.checkpoint(1)?;
        first.task.run()?;
        let pending = store.checkpoint(2)?;
        pending.task.run()?;
        (first.handle, pending.handle)
    };
    let (no_snapshot, handle) = handle;
    let started = Instant::now();
    let mut store = StateStore::restore(dir, &handle, config.clone(), RestoreOptions::default())?;
    let v: ValueState<Payload> = ValueState::register(&mut store, "bench/payload")?;
    let probe = (keys / 2).to_be_bytes();
    let first = v.get(&store, Key::new(&probe, MAX_PARALLELISM))?.map(|p| p[0]);
    let until_first_read = started.elapsed();
    black_box(first);
    let mut rng = SplitMix(3);
    let started = Instant::now();
    for _ in 0..1000 {
        let k = (rng.next_u64() % keys.max(1)).to_be_bytes();
        black_box(v.get(&store, Key::new(&k, MAX_PARALLELISM))?.map(|p| p[1]));
    }
    let first_reads_mean = started.elapsed() / 1000;
    drop(store);
    let started = Instant::now();
    let store = StateStore::restore(dir, &handle, config.clone(), RestoreOptions { verify_all: true })?;
    let verify_all = started.elapsed();
    drop(store);
    // Checkpoint 1 names no index snapshot yet (its copy was written by checkpoint 2's task).
    let started = Instant::now();
    let mut store = StateStore::restore(dir, &no_snapshot, config, RestoreOptions::default())?;
    let replay_all = started.elapsed();
    let started = Instant::now();
    while store.maintain(100_000)? {}
    let fold_all = started.elapsed();
    drop(store);
    let (fold_updates_entries, fold_updates) = fold_updates(dir, &handle, keys)?;
    Ok(RestoreResult {
        state_bytes: handle.live_bytes(),
        keys,
        until_first_read,
        first_reads_mean,
        verify_all,
        replay_all,
        fold_all,
        fold_updates_entries,
        fold_updates,
    })
}

/// Restores `handle` (which names an index snapshot and replays nothing), rewrites
/// [`FOLD_UPDATES_PER_MILLE`] of the keys at random, checkpoints without a new index snapshot,
/// restores that checkpoint (its replay leaves those keys in the index delta) and times the
/// fold. Returns the delta's entries and the fold's time.
fn fold_updates(dir: &Path, handle: &CheckpointHandle, keys: u64) -> weir_state::Result<(usize, Duration)> {
    let config = StoreConfig {
        index_snapshot_every: u32::MAX,
        index_snapshot_tail_bytes: u64::MAX,
        max_replay_bytes: u64::MAX,
        ..store_config()
    };
    let updated = {
        let mut store = StateStore::restore(dir, handle, config.clone(), RestoreOptions::default())?;
        let v: ValueState<Payload> = ValueState::register(&mut store, "bench/payload")?;
        let mut rng = SplitMix(11);
        let mut value = [7u8; 80];
        for _ in 0..keys * FOLD_UPDATES_PER_MILLE / 1000 {
            let k = rng.next_u64() % keys.max(1);
            value[..8].copy_from_slice(&k.to_le_bytes());
            v.put(&mut store, Key::new(&k.to_be_bytes(), MAX_PARALLELISM), &value)?;
        }
        let pending = store.checkpoint(handle.checkpoint_id + 1)?;
        pending.task.run()?;
        pending.handle
    };
    let mut store = StateStore::restore(dir, &updated, config, RestoreOptions::default())?;
    let entries = store.stats().index_delta as usize;
    let started = Instant::now();
    while store.maintain(100_000)? {}
    Ok((entries, started.elapsed()))
}

/// Formats microsecond percentiles of a histogram.
pub fn percentiles_us(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "n=0".into();
    }
    format!(
        "n={} p50={:.2}ms p99={:.2}ms max={:.2}ms",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    )
}
