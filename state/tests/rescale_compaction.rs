//! Rescaling by key groups, compaction, and garbage collection of files that no retained
//! checkpoint needs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use weir_state::keygroup::{KeyEncode, KeyGroupRange, key_group_of};
use weir_state::states::{MapState, ValueState};
use weir_state::store::{CheckpointHandle, Key, RestoreOptions};
use weir_state::{StateStore, StoreConfig};

const MAX: u16 = 128;

fn config(shard: usize, parallelism: usize) -> StoreConfig {
    StoreConfig {
        shard: shard as u32,
        segment_bytes: 16 * 1024,
        max_parallelism: MAX,
        key_groups: KeyGroupRange::for_shard(shard, parallelism, MAX),
        index_snapshot_every: 2,
        index_snapshot_tail_bytes: 8 * 1024,
        compact_above_percent: 200,
        ..StoreConfig::default()
    }
}

fn key_bytes(k: u32) -> Vec<u8> {
    let mut v = Vec::new();
    format!("user-{k}").encode_key(&mut v);
    v
}

/// Writes `keys` into stores at parallelism `p` (each key into the shard owning its group).
fn write_at(
    root: &std::path::Path,
    p: usize,
    generation: u32,
    restore_from: &[(PathBuf, CheckpointHandle)],
    values: &BTreeMap<u32, u64>,
) -> Vec<(PathBuf, CheckpointHandle)> {
    let mut out = Vec::new();
    for shard in 0..p {
        let dir = root.join(format!("g{generation}-shard-{shard}"));
        let mut store = if restore_from.is_empty() {
            StateStore::create(&dir, config(shard, p)).unwrap()
        } else {
            StateStore::restore_key_groups(&dir, restore_from, config(shard, p)).unwrap()
        };
        let v: ValueState<u64> = ValueState::register(&mut store, "count/v").unwrap();
        let m: MapState<u32, u64> = MapState::register(&mut store, "count/m").unwrap();
        for (&k, &value) in values {
            let kb = key_bytes(k);
            let key = Key::new(&kb, MAX);
            if !config(shard, p).key_groups.contains(key.group) {
                continue;
            }
            let old = v.get_owned(&store, key).unwrap().unwrap_or(0);
            v.put(&mut store, key, &(old + value)).unwrap();
            m.put(&mut store, key, &generation, &value).unwrap();
        }
        let pending = store.checkpoint(u64::from(generation) * 10 + 1).unwrap();
        pending.task.run().unwrap();
        out.push((dir, pending.handle));
    }
    out
}

#[test]
fn state_moves_between_parallelisms_by_key_group() {
    let root = tempfile::tempdir().unwrap();
    let input: BTreeMap<u32, u64> = (0..500).map(|k| (k, u64::from(k) * 3)).collect();
    let g1 = write_at(root.path(), 2, 1, &[], &input);
    let g2 = write_at(root.path(), 3, 2, &g1, &input);
    let g3 = write_at(root.path(), 1, 3, &g2, &input);
    let (dir, handle) = &g3[0];
    let mut store = StateStore::restore(dir, handle, config(0, 1), RestoreOptions { verify_all: true }).unwrap();
    let v: ValueState<u64> = ValueState::register(&mut store, "count/v").unwrap();
    let m: MapState<u32, u64> = MapState::register(&mut store, "count/m").unwrap();
    for (&k, &value) in &input {
        let kb = key_bytes(k);
        let key = Key::new(&kb, MAX);
        assert_eq!(v.get_owned(&store, key).unwrap(), Some(value * 3), "key {k}");
        for generation in 1..=3u32 {
            assert_eq!(m.get(&store, key, &generation).unwrap().map(|x| x.to_native()), Some(value));
        }
        let mut keys = m.keys_encoded(&mut store, key).unwrap();
        keys.sort();
        assert_eq!(keys.len(), 3);
    }
    // Every shard of generation 2 held exactly its own key groups.
    for (shard, (dir, handle)) in g2.iter().enumerate() {
        let mut store = StateStore::restore(dir, handle, config(shard, 3), RestoreOptions::default()).unwrap();
        let range = KeyGroupRange::for_shard(shard, 3, MAX);
        let mut n = 0;
        store
            .for_each(|_, group, _, _, _| {
                assert!(range.contains(group));
                n += 1;
            })
            .unwrap();
        assert!(n > 0);
    }
    assert!(key_group_of("user-1", MAX).0 < MAX);
}

#[test]
fn compaction_reclaims_segments_once_no_checkpoint_needs_them() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let mut store = StateStore::create(&dir, config(0, 1)).unwrap();
    let v: ValueState<u64> = ValueState::register(&mut store, "count/v").unwrap();
    let keys: Vec<Vec<u8>> = (0..200).map(key_bytes).collect();
    let mut retained: Vec<CheckpointHandle> = Vec::new();
    let mut id = 0;
    // Many rounds of overwriting every key: old segments fill with dead records.
    for round in 0..30u64 {
        for kb in &keys {
            v.put(&mut store, Key::new(kb, MAX), &round).unwrap();
        }
        id += 1;
        let pending = store.checkpoint(id).unwrap();
        pending.task.run().unwrap();
        retained.push(pending.handle);
        if retained.len() > 2 {
            retained.remove(0);
        }
        store.compact(0.5).unwrap();
        let refs: Vec<&CheckpointHandle> = retained.iter().collect();
        store.collect_garbage(&refs).unwrap();
    }
    let segment_files = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("seg-"))
        .count();
    // 30 rounds x 200 records x 48 bytes = 288 KB of log = ~18 segments of 16 KiB without GC.
    assert!(segment_files <= 8, "{segment_files} segment files remain");
    // Every retained checkpoint still restores, fully verified, to its round's values.
    for handle in &retained {
        let round = handle.checkpoint_id - 1;
        let mut restored =
            StateStore::restore(&dir, handle, config(0, 1), RestoreOptions { verify_all: true }).unwrap();
        let v: ValueState<u64> = ValueState::register(&mut restored, "count/v").unwrap();
        for kb in &keys {
            assert_eq!(v.get_owned(&restored, Key::new(kb, MAX)).unwrap(), Some(round));
        }
    }
}

#[test]
fn compaction_steps_keep_the_log_within_its_bound_under_random_updates() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let mut store = StateStore::create(&dir, config(0, 1)).unwrap();
    let v: ValueState<u64> = ValueState::register(&mut store, "count/v").unwrap();
    let keys: Vec<Vec<u8>> = (0..2000).map(key_bytes).collect();
    let mut model = vec![0u64; keys.len()];
    let mut retained: Vec<CheckpointHandle> = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut worst = 0.0f64;
    for id in 1..=400u64 {
        // 200 random updates per interval, a compaction step after every 10 (a stage's batch).
        for i in 0..200 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let k = (rng >> 33) as usize % keys.len();
            model[k] += 1;
            v.put(&mut store, Key::new(&keys[k], MAX), &model[k]).unwrap();
            if i % 10 == 9 {
                store.compact_step(0).unwrap();
            }
        }
        let pending = store.checkpoint(id).unwrap();
        pending.task.run().unwrap();
        retained.push(pending.handle);
        if retained.len() > 2 {
            retained.remove(0);
        }
        let refs: Vec<&CheckpointHandle> = retained.iter().collect();
        store.collect_garbage(&refs).unwrap();
        let stats = store.stats();
        if id > 100 {
            worst = worst.max(stats.log_bytes as f64 / stats.live_bytes as f64);
        }
    }
    let stats = store.stats();
    // 80,000 updates of 48-byte records: 3.8 MB of log without compaction, ~100 KB live.
    assert!(stats.compaction_moves > 0);
    assert!(worst < 3.0, "the log grew to {worst:.2} times the live bytes");
    let files = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("seg-"))
        .count();
    assert!(files < 40, "{files} segment files remain");
    for (k, kb) in keys.iter().enumerate() {
        let expected = (model[k] > 0).then_some(model[k]);
        assert_eq!(v.get_owned(&store, Key::new(kb, MAX)).unwrap(), expected);
    }
    let handle = retained.last().unwrap().clone();
    drop(store);
    let mut restored = StateStore::restore(&dir, &handle, config(0, 1), RestoreOptions { verify_all: true }).unwrap();
    let v: ValueState<u64> = ValueState::register(&mut restored, "count/v").unwrap();
    for (k, kb) in keys.iter().enumerate() {
        let expected = (model[k] > 0).then_some(model[k]);
        assert_eq!(v.get_owned(&restored, Key::new(kb, MAX)).unwrap(), expected);
    }
}

#[test]
fn hot_key_costs_one_record_per_checkpoint_interval() {
    let root = tempfile::tempdir().unwrap();
    let mut store = StateStore::create(root.path(), config(0, 1)).unwrap();
    let v: ValueState<u64> = ValueState::register(&mut store, "count/v").unwrap();
    let kb = key_bytes(7);
    for i in 0..10_000u64 {
        v.put(&mut store, Key::new(&kb, MAX), &i).unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.appends, 1);
    assert_eq!(stats.in_place_updates, 9_999);
    let pending = store.checkpoint(1).unwrap();
    pending.task.run().unwrap();
    v.put(&mut store, Key::new(&kb, MAX), &1).unwrap();
    assert_eq!(store.stats().appends, 2, "a sealed record is never modified");
    let restored = StateStore::restore(root.path(), &pending.handle, config(0, 1), RestoreOptions::default()).unwrap();
    assert_eq!(v.get_owned(&restored, Key::new(&kb, MAX)).unwrap(), Some(9_999));
}
