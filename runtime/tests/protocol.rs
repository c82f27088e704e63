//! The checkpoint protocol under every interleaving a random scheduler can produce: barrier
//! alignment (exactly-once snapshots hold exactly the records before the barrier on every
//! input; nothing deadlocks) and the coordinator's invariants.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use weir::checkpoint::{AlignAction, BarrierAligner, CheckpointConfig, Command, Coordinator, DeliveryMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum El {
    Record(usize, usize),
    Barrier(u64),
    End,
}

/// Input `i`: `records[i][b]` records before barrier `b + 1`, then records, then maybe its end
/// (an input that ends early carries only the first `barriers_seen[i]` barriers).
fn inputs(records: &[Vec<usize>], barriers: u64, ends_after: &[Option<u64>]) -> Vec<Vec<El>> {
    records
        .iter()
        .enumerate()
        .map(|(i, per_barrier)| {
            let mut v = Vec::new();
            let mut n = 0;
            for b in 1..=barriers + 1 {
                let count = per_barrier.get(b as usize - 1).copied().unwrap_or(1);
                for _ in 0..count {
                    v.push(El::Record(i, n));
                    n += 1;
                }
                if ends_after[i] == Some(b - 1) {
                    v.push(El::End);
                    return v;
                }
                if b <= barriers {
                    v.push(El::Barrier(b));
                }
            }
            v.push(El::End);
            v
        })
        .collect()
}

fn run(mode: DeliveryMode, streams: Vec<Vec<El>>, schedule: &[usize]) -> BTreeMap<u64, BTreeSet<(usize, usize)>> {
    let n = streams.len();
    let mut aligner = BarrierAligner::new(n, mode);
    let mut pos = vec![0usize; n];
    let mut blocked = vec![false; n];
    let mut processed = BTreeSet::new();
    let mut snapshots = BTreeMap::new();
    let mut step = 0;
    loop {
        let runnable: Vec<usize> = (0..n).filter(|&i| pos[i] < streams[i].len() && !blocked[i]).collect();
        if runnable.is_empty() {
            assert!((0..n).all(|i| pos[i] == streams[i].len()), "deadlock: inputs blocked with elements left");
            return snapshots;
        }
        let pick = schedule.get(step).copied().unwrap_or(0);
        step += 1;
        let i = runnable[pick % runnable.len()];
        let element = streams[i][pos[i]];
        pos[i] += 1;
        let actions = match element {
            El::Record(a, b) => {
                assert!(!aligner.is_blocked(i));
                processed.insert((a, b));
                Vec::new()
            }
            El::Barrier(id) => aligner.on_barrier(i, id),
            El::End => aligner.on_end_of_input(i),
        };
        for action in actions {
            match action {
                AlignAction::Block(j) => blocked[j] = true,
                AlignAction::Unblock(j) => blocked[j] = false,
                AlignAction::Snapshot(id) => {
                    assert!(snapshots.insert(id, processed.clone()).is_none(), "snapshot {id} taken twice");
                }
                AlignAction::Abort(id) => panic!("checkpoint {id} aborted although every input carried it"),
            }
        }
    }
}

fn expected(streams: &[Vec<El>], id: u64) -> BTreeSet<(usize, usize)> {
    let mut out = BTreeSet::new();
    for s in streams {
        for e in s {
            match e {
                El::Barrier(b) if *b == id => break,
                El::Record(a, b) => {
                    out.insert((*a, *b));
                }
                _ => {}
            }
        }
    }
    out
}

/// Records per barrier for each input, the number of barriers, where inputs end, the schedule.
type Scenario = (Vec<Vec<usize>>, u64, Vec<Option<u64>>, Vec<usize>);

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..5, 1u64..5).prop_flat_map(|(n, barriers)| {
        (
            proptest::collection::vec(proptest::collection::vec(0usize..4, barriers as usize + 1), n),
            Just(barriers),
            proptest::collection::vec(proptest::option::weighted(0.3, 0..=barriers), n),
            proptest::collection::vec(0usize..8, 0..200),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn exactly_once_snapshots_hold_exactly_the_records_before_the_barrier((records, barriers, ends, schedule) in scenario()) {
        let streams = inputs(&records, barriers, &ends);
        let snapshots = run(DeliveryMode::ExactlyOnce, streams.clone(), &schedule);
        // Every barrier that some input still carried is snapshotted once, with exactly the
        // records before it on every input.
        let carried: BTreeSet<u64> = streams.iter().flatten().filter_map(|e| match e { El::Barrier(b) => Some(*b), _ => None }).collect();
        prop_assert_eq!(snapshots.keys().copied().collect::<BTreeSet<_>>(), carried);
        for (id, content) in &snapshots {
            prop_assert_eq!(content, &expected(&streams, *id), "checkpoint {}", id);
        }
    }

    #[test]
    fn at_least_once_snapshots_hold_at_least_the_records_before_the_barrier((records, barriers, ends, schedule) in scenario()) {
        let streams = inputs(&records, barriers, &ends);
        let snapshots = run(DeliveryMode::AtLeastOnce, streams.clone(), &schedule);
        for (id, content) in &snapshots {
            prop_assert!(content.is_superset(&expected(&streams, *id)), "checkpoint {}", id);
        }
    }

    #[test]
    fn coordinator_invariants_hold_under_any_event_order(
        events in proptest::collection::vec((0u8..6, 0usize..3, 0u64..8, any::<bool>()), 1..300),
        max_concurrent in 1usize..3,
        retained in 1usize..3,
    ) {
        let config = CheckpointConfig { interval_ms: 10, timeout_ms: 200, max_concurrent, min_pause_ms: 5, retained, mode: DeliveryMode::ExactlyOnce };
        let mut c: Coordinator<u64> = Coordinator::new(config, 3, 1);
        let mut now = 0i64;
        let mut manifest_asked = BTreeSet::new();
        let mut completed: Vec<u64> = Vec::new();
        let mut released = BTreeSet::new();
        let mut triggered = Vec::new();
        for (kind, shard, id, ok) in events {
            let commands = match kind {
                0 => { now += 7; c.tick(now) }
                1 | 2 => c.on_ack(shard, id, id * 10 + shard as u64),
                3 => c.on_manifest(id, if ok { Ok(()) } else { Err("EIO".into()) }, now),
                4 => c.on_decline(shard, id, "ENOSPC"),
                _ => if ok { c.trigger_now(now).map(Command::Trigger).into_iter().collect() } else { c.on_failure("crash") },
            };
            for command in commands {
                match command {
                    Command::Trigger(id) => {
                        prop_assert!(triggered.last().is_none_or(|l| *l < id));
                        triggered.push(id);
                    }
                    Command::WriteManifest(id, handles) => {
                        prop_assert_eq!(handles.len(), 3);
                        prop_assert!(handles.iter().all(|(s, h)| *h == id * 10 + *s as u64));
                        manifest_asked.insert(id);
                    }
                    Command::Complete(id) => {
                        prop_assert!(manifest_asked.contains(&id), "complete without a manifest");
                        prop_assert!(completed.last().is_none_or(|l| *l < id), "completions in order");
                        completed.push(id);
                    }
                    Command::Release(ids) => {
                        for id in ids {
                            prop_assert!(completed.contains(&id));
                            prop_assert!(released.insert(id));
                        }
                    }
                    Command::Abort(id, _) => prop_assert!(!completed.contains(&id)),
                }
            }
            prop_assert!(c.in_flight().len() <= max_concurrent);
            prop_assert!(c.retained().len() <= retained);
            prop_assert!(c.retained().iter().all(|id| !released.contains(id)));
        }
    }
}
