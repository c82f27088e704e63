//! Model-based property test of the state store: random sequences of put, get, delete, list
//! appends, checkpoint, restore (of any retained checkpoint), crash (everything after the last
//! durable point is lost, including a torn partial record), compaction (at once, and in
//! incremental steps with any budget), garbage collection and
//! steps of background upkeep (folding a restore's index delta, with any budget), checked
//! against a `BTreeMap` model. After every restore the store equals the model as it was
//! at that checkpoint. Checkpoints write their index snapshot themselves, or detach it (as the
//! runtime does) and write or abandon it, or leave it for a later `WriteDetached` step (so that
//! a checkpoint past the bound may name it unwritten); whichever, no checkpoint's restore
//! replays more than the store's replay bound. A checkpoint's task runs later, as the runtime's does: before
//! the next checkpoint, restore, crash or collection, with any operations in between (a store
//! past the bound copies its snapshot for the task in `maintain` steps meanwhile).

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};

use proptest::prelude::*;
use weir_state::states::{ListState, ValueState};
use weir_state::store::{CheckpointHandle, Key, RestoreOptions, address_offset, address_segment};
use weir_state::{StateStore, StoreConfig, segment::segment_file_name};

/// What a checkpoint does with an index snapshot it may detach.
#[derive(Debug, Clone, Copy)]
enum Detach {
    /// Leaves it in the checkpoint's task.
    No,
    /// Detaches it and writes it once the checkpoint's task ran.
    AndWrite,
    /// Detaches it and drops it unwritten.
    AndAbandon,
    /// Detaches it and leaves it for a later [`Op::WriteDetached`] (dropped unwritten at a
    /// restore or crash, as a restart does).
    AndDefer,
}

#[derive(Debug, Clone)]
enum Op {
    PutText(u8, String),
    PutNumber(u8, u64),
    Delete(u8),
    ListAdd(u8, u32),
    ListClear(u8),
    Get(u8),
    Checkpoint(Detach),
    Restore(usize),
    Crash(Vec<u8>),
    Compact,
    CompactStep(u32),
    CollectGarbage,
    Maintain(usize),
    WriteBehind(u32),
    /// Writes the oldest deferred detached snapshot (nothing, if a checkpoint wrote it), if it
    /// is older than this many operations: so that the log often grows past the bound first.
    WriteDetached(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..40, "[a-z]{0,40}").prop_map(|(k, v)| Op::PutText(k, v)),
        6 => (0u8..40, any::<u64>()).prop_map(|(k, v)| Op::PutNumber(k, v)),
        2 => (0u8..40).prop_map(Op::Delete),
        3 => (0u8..8, any::<u32>()).prop_map(|(k, v)| Op::ListAdd(k, v)),
        1 => (0u8..8).prop_map(Op::ListClear),
        3 => (0u8..40).prop_map(Op::Get),
        2 => prop_oneof![
            1 => Just(Detach::No),
            1 => Just(Detach::AndWrite),
            1 => Just(Detach::AndAbandon),
            3 => Just(Detach::AndDefer)
        ]
        .prop_map(Op::Checkpoint),
        1 => (0usize..200).prop_map(Op::WriteDetached),
        1 => (0usize..4).prop_map(Op::Restore),
        1 => proptest::collection::vec(any::<u8>(), 1..60).prop_map(Op::Crash),
        1 => Just(Op::Compact),
        3 => prop_oneof![Just(0u32), 1u32..300, Just(4096u32), Just(u32::MAX)].prop_map(Op::CompactStep),
        1 => Just(Op::CollectGarbage),
        2 => prop_oneof![Just(0usize), 1usize..4, 4usize..64, Just(usize::MAX)].prop_map(Op::Maintain),
        2 => prop_oneof![Just(0u32), Just(4096u32)].prop_map(Op::WriteBehind),
    ]
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    text: BTreeMap<u8, String>,
    number: BTreeMap<u8, u64>,
    lists: BTreeMap<u8, Vec<u32>>,
}

struct States {
    text: ValueState<String>,
    number: ValueState<u64>,
    list: ListState<u32>,
}

fn states(store: &mut StateStore) -> States {
    States {
        text: ValueState::register(store, "op/text").unwrap(),
        number: ValueState::register(store, "op/number").unwrap(),
        list: ListState::register(store, "op/list").unwrap(),
    }
}

fn config() -> StoreConfig {
    StoreConfig {
        segment_bytes: SEGMENT_BYTES as u32,
        index_snapshot_every: 3,
        index_snapshot_tail_bytes: 6000,
        max_parallelism: 128,
        key_groups: weir_state::keygroup::KeyGroupRange::all(128),
        // Compaction is due at the least garbage, so the steps run often.
        compact_above_percent: 110,
        // Under the snapshots' own cadence (`index_snapshot_tail_bytes`), so often reached.
        max_replay_bytes: MAX_REPLAY,
        ..StoreConfig::default()
    }
}

const SEGMENT_BYTES: u64 = 8192;
const MAX_REPLAY: u64 = 1_500;

fn key(k: u8) -> Vec<u8> {
    vec![b'k', k]
}

fn check(store: &StateStore, s: &States, model: &Model) {
    for k in 0..40u8 {
        let kb = key(k);
        let key = Key::new(&kb, 128);
        let text = s.text.get(store, key).unwrap().map(|v| v.as_str().to_owned());
        assert_eq!(text.as_ref(), model.text.get(&k), "text of key {k}");
        let number = s.number.get_owned(store, key).unwrap();
        assert_eq!(number.as_ref(), model.number.get(&k), "number of key {k}");
        if k < 8 {
            let list: Vec<u32> = s.list.iter(store, key).unwrap().map(|v| v.unwrap().to_native()).collect();
            assert_eq!(&list, model.lists.get(&k).map_or(&[][..], |l| &l[..]), "list of key {k}");
        }
    }
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = StateStore::create(dir.path(), config()).unwrap();
    let mut s = states(&mut store);
    let mut model = Model::default();
    // Retained checkpoints: (handle, model at that checkpoint), oldest first.
    let mut retained: Vec<(CheckpointHandle, Model)> = Vec::new();
    let mut next_id = 1u64;
    // The checkpoint taken and not run yet, with its detached snapshot and the model as of it.
    type InFlight = (weir_state::store::PendingCheckpoint, Option<weir_state::store::IndexSnapshotTask>, Model);
    let mut in_flight: Option<InFlight> = None;
    // Detached snapshots left for later, oldest first.
    let mut deferred: Vec<(weir_state::store::IndexSnapshotTask, usize)> = Vec::new();
    // Runs the checkpoint in flight (and writes its detached snapshot, if kept) and retains it.
    let complete =
        |store: &mut StateStore, in_flight: &mut Option<InFlight>, retained: &mut Vec<(CheckpointHandle, Model)>| {
            let Some((pending, index, at)) = in_flight.take() else { return };
            store.finish_copies();
            pending.task.run().unwrap();
            if let Some(index) = index {
                index.run(&weir_state::fence::Fence::new()).unwrap();
            }
            retained.push((pending.handle, at));
            if retained.len() > 4 {
                retained.remove(0);
            }
        };
    for (step, op) in ops.into_iter().enumerate() {
        if matches!(op, Op::Checkpoint(_) | Op::Restore(_) | Op::Crash(_) | Op::CollectGarbage) {
            complete(&mut store, &mut in_flight, &mut retained);
        }
        match op {
            Op::PutText(k, v) => {
                s.text.put(&mut store, Key::new(&key(k), 128), &v).unwrap();
                model.text.insert(k, v);
            }
            Op::PutNumber(k, v) => {
                s.number.put(&mut store, Key::new(&key(k), 128), &v).unwrap();
                model.number.insert(k, v);
            }
            Op::Delete(k) => {
                let kb = key(k);
                let was = s.text.delete(&mut store, Key::new(&kb, 128)).unwrap();
                assert_eq!(was, model.text.remove(&k).is_some());
                s.number.delete(&mut store, Key::new(&kb, 128)).unwrap();
                model.number.remove(&k);
            }
            Op::ListAdd(k, v) => {
                s.list.add(&mut store, Key::new(&key(k), 128), &v).unwrap();
                model.lists.entry(k).or_default().push(v);
            }
            Op::ListClear(k) => {
                s.list.clear(&mut store, Key::new(&key(k), 128)).unwrap();
                model.lists.remove(&k);
            }
            Op::Get(k) => {
                let kb = key(k);
                let got = s.text.get(&store, Key::new(&kb, 128)).unwrap().map(|v| v.as_str().to_owned());
                assert_eq!(got.as_ref(), model.text.get(&k));
            }
            Op::Checkpoint(detach) => {
                let mut pending = store.checkpoint(next_id).unwrap();
                next_id += 1;
                let index = match detach {
                    Detach::No => None,
                    Detach::AndWrite => pending.detach_index(),
                    Detach::AndAbandon => {
                        drop(pending.detach_index());
                        None
                    }
                    Detach::AndDefer => {
                        deferred.extend(pending.detach_index().map(|task| (task, step)));
                        None
                    }
                };
                let replay = pending.handle.replay_bytes();
                assert!(replay <= MAX_REPLAY, "checkpoint {} replays {replay} bytes", pending.handle.checkpoint_id);
                in_flight = Some((pending, index, model.clone()));
            }
            Op::Restore(i) => {
                if retained.is_empty() {
                    continue;
                }
                let i = i % retained.len();
                deferred.clear();
                drop(store);
                // As the coordinator does: checkpoints after the restored one are discarded.
                retained.truncate(i + 1);
                let (handle, at) = retained[i].clone();
                store = StateStore::restore(dir.path(), &handle, config(), RestoreOptions::default()).unwrap();
                s = states(&mut store);
                model = at;
                next_id = handle.checkpoint_id + 1;
                check(&store, &s, &model);
            }
            Op::Crash(garbage) => {
                let Some((handle, at)) = retained.last().cloned() else { continue };
                let tail = store.tail();
                deferred.clear();
                drop(store);
                // A torn write: a partial record at the tail of the log, after the seal.
                let path = dir.path().join(segment_file_name(address_segment(tail)));
                let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                let room = 8192u64.saturating_sub(u64::from(address_offset(tail)));
                let n = (garbage.len() as u64).min(room) as usize;
                f.seek(SeekFrom::Start(u64::from(address_offset(tail)))).unwrap();
                f.write_all(&garbage[..n]).unwrap();
                drop(f);
                store =
                    StateStore::restore(dir.path(), &handle, config(), RestoreOptions { verify_all: true }).unwrap();
                s = states(&mut store);
                model = at;
                next_id = handle.checkpoint_id + 1;
                check(&store, &s, &model);
            }
            Op::Compact => {
                store.compact(0.5).unwrap();
            }
            Op::CompactStep(min_bytes) => {
                store.compact_step(min_bytes).unwrap();
                check(&store, &s, &model);
            }
            Op::CollectGarbage => {
                let handles: Vec<&CheckpointHandle> = retained.iter().map(|(h, _)| h).collect();
                store.collect_garbage(&handles).unwrap();
            }
            Op::WriteBehind(min_bytes) => {
                // Writes whole pages of the open tail into the file early; values rewritten in
                // place afterwards must still reach the file at the next seal.
                if let Some(task) = store.write_behind(min_bytes) {
                    task.run().unwrap();
                }
                check(&store, &s, &model);
            }
            Op::WriteDetached(age) => {
                if deferred.first().is_some_and(|(_, at)| step - at >= age) {
                    deferred.remove(0).0.run(&weir_state::fence::Fence::new()).unwrap();
                }
            }
            Op::Maintain(budget) => {
                let more = store.maintain(budget).unwrap();
                assert!(!more || budget != usize::MAX, "an unbounded budget finishes the upkeep");
                check(&store, &s, &model);
            }
        }
    }
    check(&store, &s, &model);
    complete(&mut store, &mut in_flight, &mut retained);
    // Every retained checkpoint still restores to its model, newest first, each fully verified.
    drop(store);
    for (handle, at) in retained.iter().rev().take(1) {
        let mut store = StateStore::restore(dir.path(), handle, config(), RestoreOptions::default()).unwrap();
        store.verify_all().unwrap();
        let s = states(&mut store);
        check(&store, &s, at);
    }
}

proptest! {
    // PROPTEST_CASES=5000 for a soak run; CI runs the default.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(96),
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..400)) {
        run(ops);
    }
}
