//! Corruption is detected with a typed error naming the file, and never loaded; the previous
//! checkpoint still restores.

use std::path::Path;

use weir_state::keygroup::KeyGroupRange;
use weir_state::manifest::{CheckpointDirectory, Manifest, ShardSnapshot, SnapshotKind};
use weir_state::states::ValueState;
use weir_state::store::{CheckpointHandle, Key, RestoreOptions, address_offset, address_segment, index_file_name};
use weir_state::{ErrorClass, StateStore, StoreConfig, segment::segment_file_name};

fn config(index_every: u32) -> StoreConfig {
    StoreConfig {
        segment_bytes: 64 * 1024,
        max_parallelism: 64,
        key_groups: KeyGroupRange::all(64),
        index_snapshot_every: index_every,
        index_snapshot_tail_bytes: 16 * 1024,
        ..StoreConfig::default()
    }
}

fn key(k: u64) -> Vec<u8> {
    k.to_be_bytes().to_vec()
}

/// Checkpoint 1: keys 0..1000 = k. Checkpoint 2: keys 0..20 = k + 1_000_000.
fn two_checkpoints(dir: &Path, index_every: u32) -> (CheckpointHandle, CheckpointHandle) {
    let mut store = StateStore::create(dir, config(index_every)).unwrap();
    let v: ValueState<u64> = ValueState::register(&mut store, "op/v").unwrap();
    for k in 0..1000 {
        v.put(&mut store, Key::new(&key(k), 64), &k).unwrap();
    }
    let c1 = store.checkpoint(1).unwrap();
    c1.task.run().unwrap();
    for k in 0..20 {
        v.put(&mut store, Key::new(&key(k), 64), &(k + 1_000_000)).unwrap();
    }
    let c2 = store.checkpoint(2).unwrap();
    c2.task.run().unwrap();
    (c1.handle, c2.handle)
}

fn check_contents(dir: &Path, handle: &CheckpointHandle, bumped: bool) {
    let mut store = StateStore::restore(dir, handle, config(2), RestoreOptions { verify_all: true }).unwrap();
    let v: ValueState<u64> = ValueState::register(&mut store, "op/v").unwrap();
    for k in 0..1000 {
        let expected = if bumped && k < 20 { k + 1_000_000 } else { k };
        assert_eq!(v.get_owned(&store, Key::new(&key(k), 64)).unwrap(), Some(expected), "key {k}");
    }
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn flipped_byte_in_replayed_tail_fails_restore_and_previous_checkpoint_restores() {
    let dir = tempfile::tempdir().unwrap();
    let (c1, c2) = two_checkpoints(dir.path(), 1000);
    // The tail-bytes bound starts a snapshot at 1; checkpoint 2 writes it and replays the tail
    // after checkpoint 1's seal on top of it.
    assert!(c1.index_snapshot.is_none());
    assert_eq!(c2.index_snapshot.as_ref().map(|r| (r.checkpoint_id, r.seal)), Some((1, c1.seal)));
    // A byte inside the first record after checkpoint 1's seal.
    let at = c1.seal;
    let path = dir.path().join(segment_file_name(address_segment(at)));
    flip(&path, u64::from(address_offset(at)) + 40);
    let err = StateStore::restore(dir.path(), &c2, config(1000), RestoreOptions::default()).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Corruption, "{err}");
    let text = err.to_string();
    assert!(text.contains(&segment_file_name(address_segment(at))), "{text}");
    assert!(text.contains(&format!(":{}", address_offset(at))), "names the offset: {text}");
    check_contents(dir.path(), &c1, false);
}

#[test]
fn flipped_byte_in_sealed_data_is_caught_on_read_and_by_full_verification() {
    let dir = tempfile::tempdir().unwrap();
    let (_, c2) = two_checkpoints(dir.path(), 1000);
    // Corrupt the record of key 500 (written before checkpoint 1, covered by its index snapshot).
    let store = StateStore::restore(dir.path(), &c2, config(1000), RestoreOptions::default()).unwrap();
    let raw = store.get_raw(weir_state::store::state_id_of("op/v"), Key::new(&key(500), 64)).unwrap().unwrap();
    let addr = raw.addr;
    drop(store);
    let path = dir.path().join(segment_file_name(address_segment(addr)));
    flip(&path, u64::from(address_offset(addr)) + 50);
    // Lazy restore succeeds (it does not read every record) ...
    let mut store = StateStore::restore(dir.path(), &c2, config(1000), RestoreOptions::default()).unwrap();
    let v: ValueState<u64> = ValueState::register(&mut store, "op/v").unwrap();
    assert_eq!(v.get_owned(&store, Key::new(&key(499), 64)).unwrap(), Some(499));
    // ... but the corrupt record is never handed out: its read is a typed error.
    let err = v.get(&store, Key::new(&key(500), 64)).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Corruption, "{err}");
    assert_eq!(store.verify_all().unwrap_err().class(), ErrorClass::Corruption);
    drop(store);
    let err = StateStore::restore(dir.path(), &c2, config(1000), RestoreOptions { verify_all: true }).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Corruption);
}

#[test]
fn corrupt_index_snapshot_is_detected_and_previous_checkpoint_restores() {
    let dir = tempfile::tempdir().unwrap();
    let (c1, c2) = two_checkpoints(dir.path(), 1);
    // A snapshot started at checkpoint 1 is written by checkpoint 2, which restores from it;
    // checkpoint 1 has none and replays its log from the start.
    let idx2 = dir.path().join(index_file_name(1));
    assert!(c1.index_snapshot.is_none());
    assert_eq!(c2.index_snapshot.as_ref().unwrap().checkpoint_id, 1);
    let len = std::fs::metadata(&idx2).unwrap().len();
    // In the slots: found by full verification (or by the first probe of that chunk).
    let original = std::fs::read(&idx2).unwrap();
    flip(&idx2, len - 8);
    let err = StateStore::restore(dir.path(), &c2, config(1), RestoreOptions { verify_all: true }).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Corruption, "{err}");
    assert!(err.to_string().contains(&index_file_name(1)), "{err}");
    // In the header: found at once.
    std::fs::write(&idx2, &original).unwrap();
    flip(&idx2, 20);
    let err = StateStore::restore(dir.path(), &c2, config(1), RestoreOptions::default()).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Corruption, "{err}");
    check_contents(dir.path(), &c1, false);
    // Restored intact, checkpoint 2 is good again.
    std::fs::write(&idx2, &original).unwrap();
    check_contents(dir.path(), &c2, true);
}

#[test]
fn corrupt_manifest_is_skipped_and_the_previous_one_used() {
    let dir = tempfile::tempdir().unwrap();
    let stores = dir.path().join("shard-0");
    let (c1, c2) = two_checkpoints(&stores, 1000);
    let checkpoints = CheckpointDirectory::open(dir.path()).unwrap();
    for handle in [&c1, &c2] {
        let manifest = Manifest {
            checkpoint_id: handle.checkpoint_id,
            kind: SnapshotKind::Checkpoint,
            created_ms: 0,
            parallelism: 1,
            max_parallelism: 64,
            shards: vec![ShardSnapshot { shard: 0, store_dir: "shard-0".into(), handle: handle.clone() }],
            metadata: Vec::new(),
        };
        checkpoints.commit(&manifest).unwrap();
    }
    let path = checkpoints.manifest_path(2);
    let len = std::fs::metadata(&path).unwrap().len();
    for at in [5, 30, len / 2, len - 1] {
        let original = std::fs::read(&path).unwrap();
        flip(&path, at);
        let latest = checkpoints.latest().unwrap();
        assert_eq!(latest.skipped.len(), 1, "flip at {at}");
        assert_eq!(latest.skipped[0].class(), ErrorClass::Corruption);
        let manifest = latest.manifest.unwrap();
        assert_eq!(manifest.checkpoint_id, 1);
        check_contents(&dir.path().join(&manifest.shards[0].store_dir), &manifest.shards[0].handle, false);
        std::fs::write(&path, original).unwrap();
    }
    assert_eq!(checkpoints.latest().unwrap().manifest.unwrap().checkpoint_id, 2);
}

#[test]
fn truncated_or_missing_segment_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, c2) = two_checkpoints(dir.path(), 1000);
    let path = dir.path().join(segment_file_name(c2.segments[0].id));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    // The replayed tail lies in a later segment, and a restore opens a segment on first use:
    // the damage is found by the first read of it (here the fold of the restore's index delta,
    // which compares the tail's keys with older records), or by a full verification.
    assert!(address_segment(c2.index_snapshot.as_ref().unwrap().seal) > c2.segments[0].id);
    let mut store = StateStore::restore(dir.path(), &c2, config(1000), RestoreOptions::default()).unwrap();
    let err = store.maintain(usize::MAX).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Corruption, "{err}");
    drop(store);
    let err = StateStore::restore(dir.path(), &c2, config(1000), RestoreOptions { verify_all: true }).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Corruption, "{err}");
    std::fs::remove_file(&path).unwrap();
    let err = StateStore::restore(dir.path(), &c2, config(1000), RestoreOptions { verify_all: true }).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Io, "{err}");
}

#[test]
fn values_stored_raw_are_validated_before_typed_access() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = StateStore::create(dir.path(), config(1000)).unwrap();
    let v: ValueState<String> = ValueState::register(&mut store, "op/s").unwrap();
    let k = key(1);
    // The root of an out-of-line string without the string: its relative pointer points before
    // the buffer. A raw put of it must not lead to an out-of-bounds zero-copy read.
    let valid = rkyv::to_bytes::<rkyv::rancor::Error>(&"a string too long to be stored inline".to_string()).unwrap();
    let root = &valid[valid.len() - 8..];
    store.put_raw(v.id(), Key::new(&k, 64), root).unwrap();
    let err = v.get(&store, Key::new(&k, 64)).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Corruption, "{err}");
    // A typed put replaces it and is read without validation.
    v.put(&mut store, Key::new(&k, 64), &"ok".to_string()).unwrap();
    assert_eq!(v.get(&store, Key::new(&k, 64)).unwrap().map(|s| s.as_str()), Some("ok"));
    // Registering the same name with another value type is refused.
    let err = ValueState::<u64>::register(&mut store, "op/s").unwrap_err();
    assert_eq!(err.class(), ErrorClass::Misuse);
}
