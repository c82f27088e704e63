//! Work a store hands to other threads between and beside checkpoints: write-behind of the
//! mutable region, index snapshots written apart from their checkpoint (detached), and
//! garbage deleted by the caller. None of it may change what a restore gives.

use weir_state::fence::Fence;

use weir_state::keygroup::KeyGroupRange;
use weir_state::states::ValueState;
use weir_state::store::{CheckpointHandle, Key, RestoreOptions, index_file_name};
use weir_state::{StateStore, StoreConfig};

fn config() -> StoreConfig {
    StoreConfig {
        segment_bytes: 64 * 1024,
        max_parallelism: 16,
        key_groups: KeyGroupRange::all(16),
        index_snapshot_every: 1,
        ..StoreConfig::default()
    }
}

const KEYS: u64 = 2000;

/// A new store in `dir` with one value state registered.
fn new_store(dir: &std::path::Path) -> (StateStore, ValueState<u64>) {
    let mut store = StateStore::create(dir, config()).unwrap();
    let v = ValueState::register(&mut store, "op/v").unwrap();
    (store, v)
}

fn fill(store: &mut StateStore, v: ValueState<u64>, base: u64) {
    for k in 0..KEYS {
        v.put(store, Key::new(&k.to_be_bytes(), 16), &(base + k)).unwrap();
    }
}

fn assert_restores(dir: &std::path::Path, handle: &CheckpointHandle, v: ValueState<u64>, base: u64) {
    let restored = StateStore::restore(dir, handle, config(), RestoreOptions { verify_all: true }).unwrap();
    for k in 0..KEYS {
        assert_eq!(v.get_owned(&restored, Key::new(&k.to_be_bytes(), 16)).unwrap(), Some(base + k), "key {k}");
    }
}

/// For each round `r`: fills with values from `r * 10_000` and takes checkpoint `r + 1`
/// (durable). Returns the last handle.
fn fill_and_checkpoint(store: &mut StateStore, v: ValueState<u64>, rounds: std::ops::Range<u64>) -> CheckpointHandle {
    let mut last = None;
    for round in rounds {
        fill(store, v, round * 10_000);
        let pending = store.checkpoint(round + 1).unwrap();
        pending.task.run().unwrap();
        last = Some(pending.handle);
    }
    last.expect("at least one round")
}

fn exists(dir: &std::path::Path, name: &str) -> bool {
    dir.join(name).exists()
}

#[test]
fn write_behind_hands_out_each_page_once_and_never_changes_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, v) = new_store(dir.path());
    assert!(store.write_behind(4096).is_none(), "nothing written yet");
    fill(&mut store, v, 0);
    let task = store.write_behind(4096).expect("whole pages to write back");
    assert!(store.write_behind(4096).is_none(), "the same pages are not handed out twice");
    assert!(task.run().unwrap() >= 4096);
    store.checkpoint(1).unwrap().task.run().unwrap();
    // Sealed records are not updated in place: these updates append.
    fill(&mut store, v, 10_000);
    let second = store.write_behind(4096).expect("the new pages");
    // A checkpoint taken while write-behind is pending still syncs everything itself.
    let pending = store.checkpoint(2).unwrap();
    pending.task.run().unwrap();
    second.run().unwrap();
    assert_restores(dir.path(), &pending.handle, v, 10_000);
}

#[test]
fn a_detached_index_snapshot_is_referred_to_only_once_it_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, v) = new_store(dir.path());
    fill(&mut store, v, 0);
    // Checkpoint 1 starts an index snapshot (copy-on-write); checkpoint 2 finishes it.
    let mut first = store.checkpoint(1).unwrap();
    assert!(first.detach_index().is_none(), "no snapshot is finished at the first checkpoint");
    first.task.run().unwrap();
    fill(&mut store, v, 1000);
    let mut second = store.checkpoint(2).unwrap();
    let index = second.detach_index().expect("the snapshot started at checkpoint 1");
    assert!(index.bytes() > 0);
    assert!(second.handle.index_snapshot.is_none(), "not confirmed yet: the handle replays the log");
    second.task.run().unwrap();
    assert_restores(dir.path(), &second.handle, v, 1000);

    // Checkpoint 2 started another copy before the first was detached; checkpoint 3 finishes
    // it. While either is being written, no other snapshot starts, and garbage collection
    // keeps them.
    fill(&mut store, v, 2000);
    let mut third = store.checkpoint(3).unwrap();
    let index2 = third.detach_index().expect("the snapshot started at checkpoint 2");
    third.task.run().unwrap();
    fill(&mut store, v, 2500);
    let mut between = store.checkpoint(4).unwrap();
    assert!(between.detach_index().is_none(), "snapshots are still being written");
    between.task.run().unwrap();
    store.collect_garbage(&[&between.handle]).unwrap();
    let cancel = Fence::new();
    let written = index.run(&cancel).unwrap();
    assert!(written > 0);
    assert!(exists(dir.path(), &index_file_name(1)));
    store.collect_garbage(&[&between.handle]).unwrap();
    assert!(exists(dir.path(), &index_file_name(1)), "the confirmed snapshot is kept");

    // From now on checkpoints restore from it; then from the second, once that is durable.
    fill(&mut store, v, 2800);
    let after_first = store.checkpoint(5).unwrap();
    assert_eq!(after_first.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id), Some(1));
    after_first.task.run().unwrap();
    assert_restores(dir.path(), &after_first.handle, v, 2800);
    index2.run(&cancel).unwrap();
    fill(&mut store, v, 3000);
    let fourth = store.checkpoint(6).unwrap();
    assert_eq!(fourth.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id), Some(2));
    fourth.task.run().unwrap();
    assert_restores(dir.path(), &fourth.handle, v, 3000);
    assert_restores(dir.path(), &second.handle, v, 1000);
}

#[test]
fn a_cancelled_or_dropped_index_snapshot_is_abandoned_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, v) = new_store(dir.path());
    fill(&mut store, v, 0);
    store.checkpoint(1).unwrap().task.run().unwrap();
    fill(&mut store, v, 1000);
    let mut second = store.checkpoint(2).unwrap();
    let index = second.detach_index().unwrap();
    second.task.run().unwrap();
    let cancel = Fence::new();
    cancel.close();
    assert!(index.run(&cancel).is_err(), "a cancelled write reports it");
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp") || n == &index_file_name(1)), "{names:?}");
    // What was written is left under a trash name (no slow unlink on a cancelled write) and is
    // garbage the store lets go of.
    let trash: Vec<&String> = names.iter().filter(|n| n.ends_with(weir_state::store::TRASH_SUFFIX)).collect();
    let garbage = store.garbage(&[&second.handle]).unwrap();
    for name in &trash {
        assert!(garbage.iter().any(|g| g.file_name().is_some_and(|f| f == name.as_str())), "{name} not in {garbage:?}");
    }

    // The next due snapshot starts again; dropping its task unrun abandons it too.
    fill(&mut store, v, 2000);
    let third = store.checkpoint(3).unwrap();
    third.task.run().unwrap();
    fill(&mut store, v, 3000);
    let mut fourth = store.checkpoint(4).unwrap();
    let dropped = fourth.detach_index().expect("a new snapshot was started at checkpoint 3");
    drop(dropped);
    fourth.task.run().unwrap();
    assert_restores(dir.path(), &fourth.handle, v, 3000);
    // Snapshots go on: checkpoint 5 writes one (inline), which checkpoint 6 refers to.
    fill(&mut store, v, 4000);
    let fifth = store.checkpoint(5).unwrap();
    fifth.task.run().unwrap();
    fill(&mut store, v, 5000);
    let sixth = store.checkpoint(6).unwrap();
    sixth.task.run().unwrap();
    let used = sixth.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id);
    assert!(used.is_some_and(|id| id != 3), "{used:?}");
    assert!(!exists(dir.path(), &index_file_name(3)), "the abandoned snapshot was never written");
    assert_restores(dir.path(), &sixth.handle, v, 5000);
}

#[test]
fn garbage_is_let_go_by_the_store_and_deleted_by_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, v) = new_store(dir.path());
    let last = fill_and_checkpoint(&mut store, v, 0..8);
    let garbage = store.garbage(&[&last]).unwrap();
    assert!(!garbage.is_empty(), "eight rounds over 2000 keys leave dead segments");
    assert!(garbage.iter().all(|p| p.exists()), "the store does not delete them itself");
    for path in &garbage {
        std::fs::remove_file(path).unwrap();
    }
    assert!(store.garbage(&[&last]).unwrap().is_empty());
    assert_restores(dir.path(), &last, v, 70_000);
    fill(&mut store, v, 80_000);
    let next = store.checkpoint(9).unwrap();
    next.task.run().unwrap();
    assert_restores(dir.path(), &next.handle, v, 80_000);
}

#[test]
fn a_restored_store_counts_its_replayed_tail_towards_the_next_index_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { index_snapshot_every: 1000, index_snapshot_tail_bytes: 16 * 1024, ..config() };
    let mut store = StateStore::create(dir.path(), config.clone()).unwrap();
    let v: ValueState<u64> = ValueState::register(&mut store, "op/v").unwrap();
    fill(&mut store, v, 0);
    // No index snapshot is confirmed yet: a restore replays the whole log (far over 16 KiB).
    let first = store.checkpoint(1).unwrap();
    first.task.run().unwrap();
    drop(store);
    let mut restored = StateStore::restore(dir.path(), &first.handle, config, RestoreOptions::default()).unwrap();
    while restored.maintain(usize::MAX).unwrap() {}
    // One small write: by itself far under the bound, yet the next checkpoint starts a
    // snapshot (finished, and handed out, by the one after it).
    v.put(&mut restored, Key::new(&0u64.to_be_bytes(), 16), &7).unwrap();
    restored.checkpoint(2).unwrap().task.run().unwrap();
    let mut third = restored.checkpoint(3).unwrap();
    assert!(third.detach_index().is_some(), "the replayed tail counts towards the snapshot bound");
    third.task.run().unwrap();
}

fn inode(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

/// Files no checkpoint needs become the store's spares (one segment file, one index snapshot
/// file), and the next new segment and background index snapshot are written over them (the
/// same inode: no blocks freed, none allocated). The index snapshot a restored store's table is
/// mapped from is never recycled (it is deleted): writing over it would show through the
/// private mapping.
#[test]
fn garbage_files_are_recycled_as_the_next_segment_and_index_snapshot() {
    use weir_state::segment::{SPARE_SEGMENT_FILE, segment_file_name};
    use weir_state::store::{SPARE_INDEX_FILE, address_segment};
    let dir = tempfile::tempdir().unwrap();
    let (mut store, v) = new_store(dir.path());
    let last = fill_and_checkpoint(&mut store, v, 0..8);
    let garbage = store.garbage(&[&last]).unwrap();
    let (spare_segment, spare_index) = (dir.path().join(SPARE_SEGMENT_FILE), dir.path().join(SPARE_INDEX_FILE));
    assert!(spare_segment.exists() && spare_index.exists(), "{garbage:?}");
    assert!(!garbage.contains(&spare_segment) && !garbage.contains(&spare_index));
    for path in &garbage {
        std::fs::remove_file(path).unwrap();
    }
    let (segment_inode, index_inode) = (inode(&spare_segment), inode(&spare_index));

    // The next segment is the spare segment file.
    let segment = address_segment(store.tail());
    let mut base = 100_000;
    while address_segment(store.tail()) == segment {
        fill(&mut store, v, base);
        base += 10_000;
    }
    let new_segment = dir.path().join(segment_file_name(segment + 1));
    assert_eq!(inode(&new_segment), segment_inode);
    assert!(!spare_segment.exists());

    // The next index snapshot written in the background goes over the spare index file.
    let mut pending = store.checkpoint(9).unwrap();
    let index = pending.detach_index().expect("the snapshot started at checkpoint 8");
    pending.task.run().unwrap();
    index.run(&Fence::new()).unwrap();
    assert!(!spare_index.exists());
    let written: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).filter(|p| inode(p) == index_inode).collect();
    assert_eq!(written, [dir.path().join(index_file_name(8))]);
    fill(&mut store, v, base);
    let next = store.checkpoint(10).unwrap();
    next.task.run().unwrap();
    let mapped = next.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id).expect("a confirmed snapshot");
    drop(store);
    assert_restores(dir.path(), &next.handle, v, base);

    // A store restored from that snapshot maps its file: once newer snapshots replace it, the
    // file is garbage to delete, not a spare, even with no spare present.
    let mut restored = StateStore::restore(dir.path(), &next.handle, config(), RestoreOptions::default()).unwrap();
    // Snapshots start again once the replayed delta is folded into the mapped table.
    while restored.maintain(usize::MAX).unwrap() {}
    let last = fill_and_checkpoint(&mut restored, v, 10..15);
    let _ = std::fs::remove_file(&spare_index);
    let mapped_file = dir.path().join(index_file_name(mapped));
    let mapped_inode = inode(&mapped_file);
    let garbage = restored.garbage(&[&last]).unwrap();
    // Unlinked by the store itself (never shrunk: its table is mapped from it), not recycled.
    assert!(!garbage.contains(&mapped_file) && !mapped_file.exists(), "{garbage:?}");
    assert!(!spare_index.exists() || inode(&spare_index) != mapped_inode);
    // What the caller deletes it may shrink first, as the runtime does; every key still reads.
    for path in &garbage {
        weir_state::priority::delete_in_steps(path).unwrap();
    }
    for k in 0..KEYS {
        assert_eq!(v.get_owned(&restored, Key::new(&k.to_be_bytes(), 16)).unwrap(), Some(14 * 10_000 + k), "key {k}");
    }
}

/// A full segment's open tail (tens of MiB at the default size) is handed out with the next
/// checkpoint, to be freed off the store's thread; the checkpoint is the same either way.
#[test]
fn memory_the_store_lets_go_of_is_handed_out_with_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, v) = new_store(dir.path());
    fill(&mut store, v, 0);
    assert!(weir_state::store::address_segment(store.tail()) > 1, "the fill spans segments");
    let mut first = store.checkpoint(1).unwrap();
    assert!(first.take_released().is_some(), "the full segment's tail");
    assert!(first.take_released().is_none(), "handed out once");
    first.task.run().unwrap();
    assert_restores(dir.path(), &first.handle, v, 0);
}
