//! A small checkpoint directory committed under `tests/golden/` must keep restoring to known
//! contents: it pins the segment, record, index snapshot and manifest formats together.
//! Regenerate (only with a deliberate format change, and a format version bump) with
//! `WEIR_REGENERATE_GOLDEN=1 cargo test -p weir-state --test golden`.

use std::path::{Path, PathBuf};

use weir_state::keygroup::{KeyEncode, KeyGroupRange};
use weir_state::manifest::{CheckpointDirectory, Manifest, ShardSnapshot, SnapshotKind};
use weir_state::states::{ListState, MapState, ValueState};
use weir_state::store::{Key, RestoreOptions};
use weir_state::{StateStore, StoreConfig};

const MAX: u16 = 32;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn config() -> StoreConfig {
    StoreConfig {
        segment_bytes: 8192,
        max_parallelism: MAX,
        key_groups: KeyGroupRange::all(MAX),
        index_snapshot_every: 2,
        index_snapshot_tail_bytes: u64::MAX,
        ..StoreConfig::default()
    }
}

fn enc<K: KeyEncode + ?Sized>(k: &K) -> Vec<u8> {
    let mut v = Vec::new();
    k.encode_key(&mut v);
    v
}

struct States {
    count: ValueState<u64>,
    list: ListState<String>,
    map: MapState<u32, String>,
}

fn states(store: &mut StateStore) -> States {
    States {
        count: ValueState::register(store, "golden/count").unwrap(),
        list: ListState::register(store, "golden/list").unwrap(),
        map: MapState::register(store, "golden/map").unwrap(),
    }
}

fn regenerate(root: &Path) {
    let _ = std::fs::remove_dir_all(root);
    let store_dir = root.join("shard-0");
    let mut store = StateStore::create(&store_dir, config()).unwrap();
    let s = states(&mut store);
    let checkpoints = CheckpointDirectory::open(root).unwrap();
    for round in 1..=3u64 {
        for k in 0..60u64 {
            s.count.put(&mut store, Key::new(&enc(&k), MAX), &(k * k + round)).unwrap();
        }
        s.list.add(&mut store, Key::new(&enc("a"), MAX), &format!("item-{round}")).unwrap();
        s.map.put(&mut store, Key::new(&enc("m"), MAX), &(round as u32), &"x".repeat(round as usize)).unwrap();
        let pending = store.checkpoint(round).unwrap();
        pending.task.run().unwrap();
        let manifest = Manifest {
            checkpoint_id: round,
            kind: SnapshotKind::Checkpoint,
            created_ms: 1_436_918_400_000,
            parallelism: 1,
            max_parallelism: MAX,
            shards: vec![ShardSnapshot { shard: 0, store_dir: "shard-0".into(), handle: pending.handle }],
            metadata: b"golden".to_vec(),
        };
        checkpoints.commit(&manifest).unwrap();
    }
    // Nothing after the last checkpoint: the directory is exactly what checkpoint 3 needs.
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn golden_checkpoint_directory_restores_to_known_contents() {
    if std::env::var_os("WEIR_REGENERATE_GOLDEN").is_some() {
        regenerate(&golden_dir());
    }
    // Restore from a copy: the committed files stay untouched.
    let work = tempfile::tempdir().unwrap();
    copy_dir(&golden_dir(), work.path());
    let checkpoints = CheckpointDirectory::open(work.path()).unwrap();
    let latest = checkpoints.latest().unwrap();
    assert!(latest.skipped.is_empty());
    let manifest = latest.manifest.expect("the golden directory has a manifest");
    assert_eq!((manifest.checkpoint_id, manifest.metadata.as_slice()), (3, &b"golden"[..]));
    let shard = &manifest.shards[0];
    assert_eq!(shard.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id), Some(2));
    let mut store = StateStore::restore(
        &work.path().join(&shard.store_dir),
        &shard.handle,
        config(),
        RestoreOptions { verify_all: true },
    )
    .unwrap();
    let s = states(&mut store);
    for k in 0..60u64 {
        assert_eq!(s.count.get_owned(&store, Key::new(&enc(&k), MAX)).unwrap(), Some(k * k + 3), "key {k}");
    }
    let list: Vec<String> =
        s.list.iter(&store, Key::new(&enc("a"), MAX)).unwrap().map(|v| v.unwrap().as_str().to_owned()).collect();
    assert_eq!(list, ["item-1", "item-2", "item-3"]);
    for round in 1..=3u32 {
        let v = s.map.get(&store, Key::new(&enc("m"), MAX), &round).unwrap().map(|v| v.as_str().to_owned());
        assert_eq!(v, Some("x".repeat(round as usize)));
    }
    // Checkpoint 1 is still restorable too: retained checkpoints share segments.
    let first = checkpoints.read(1).unwrap();
    let mut store = StateStore::restore(
        &work.path().join("shard-0"),
        &first.shards[0].handle,
        config(),
        RestoreOptions { verify_all: true },
    )
    .unwrap();
    let s = states(&mut store);
    for k in 0..60u64 {
        assert_eq!(s.count.get_owned(&store, Key::new(&enc(&k), MAX)).unwrap(), Some(k * k + 1), "key {k}");
    }
    assert_eq!(s.list.len(&store, Key::new(&enc("a"), MAX)).unwrap(), 1);
}
