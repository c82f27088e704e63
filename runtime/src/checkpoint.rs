//! The checkpoint protocol's decisions, as pure logic over messages.
//!
//! Nothing here touches a thread, a channel, a clock or a file: time comes in as an argument
//! and every decision comes out as data, so every order in which barriers, records,
//! acknowledgements and failures can arrive is testable on its own (`tests` below, and
//! `runtime/tests/protocol.rs`). The runtime drives these machines and performs the I/O they ask
//! for.
//!
//! - [`BarrierAligner`] (one per stage instance with several inputs): Chandy-Lamport with
//!   aligned barriers. In exactly-once mode, once barrier `n` arrived on an input, that input is
//!   blocked until barrier `n` has arrived on every input that has not ended; then the operator
//!   snapshots and forwards `n`. In at-least-once mode nothing is blocked: the snapshot is taken
//!   when the last barrier arrives, and records that overtook it are replayed after a failure.
//! - [`Coordinator`] (one per job): triggers checkpoints at an interval (at most
//!   `max_concurrent` in flight, at least `min_pause_ms` after the last one completed), collects
//!   each shard's acknowledgement, asks for the manifest to be written, and only then declares
//!   the checkpoint complete (sinks commit) and releases checkpoints beyond the retained count.
//!   A checkpoint that times out or fails is aborted; the job keeps running.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Identifies a checkpoint; ids only grow.
pub type CheckpointId = u64;

/// Whether barriers are aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Aligned barriers: snapshot n reflects exactly the records before barrier n.
    ExactlyOnce,
    /// No alignment: lower latency under backpressure; records may be replayed after a failure.
    AtLeastOnce,
}

/// What an aligner asks of the stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlignAction {
    /// Stop reading `input` until it is unblocked.
    Block(usize),
    /// Read `input` again.
    Unblock(usize),
    /// Snapshot the operators now and forward barrier `id` downstream.
    Snapshot(CheckpointId),
    /// Checkpoint `id` was superseded before it aligned: drop it (the coordinator times it out).
    Abort(CheckpointId),
}

/// Barrier alignment of one stage instance with `inputs` inputs.
#[derive(Debug, Clone)]
pub struct BarrierAligner {
    mode: DeliveryMode,
    inputs: usize,
    ended: BTreeSet<usize>,
    /// Checkpoints whose barrier arrived on some inputs, with those inputs. Exactly-once holds
    /// at most one (its inputs are blocked); at-least-once may track several at once.
    pending: BTreeMap<CheckpointId, BTreeSet<usize>>,
    /// The last checkpoint snapshotted or aborted here: older barriers are stale.
    last: Option<CheckpointId>,
}

impl BarrierAligner {
    /// An aligner over `inputs` inputs.
    pub fn new(inputs: usize, mode: DeliveryMode) -> Self {
        BarrierAligner { mode, inputs, ended: BTreeSet::new(), pending: BTreeMap::new(), last: None }
    }

    /// Whether records from `input` may be read now.
    pub fn is_blocked(&self, input: usize) -> bool {
        self.mode == DeliveryMode::ExactlyOnce && self.pending.values().any(|got| got.contains(&input))
    }

    fn unblock(&self, got: &BTreeSet<usize>, out: &mut Vec<AlignAction>) {
        if self.mode == DeliveryMode::ExactlyOnce {
            out.extend(got.iter().map(|&i| AlignAction::Unblock(i)));
        }
    }

    /// Snapshots, in order, every pending checkpoint whose barrier reached every live input (an
    /// input ending can complete several at once). Pending checkpoints older than the newest
    /// aligned one that are not aligned can never be (barriers are ordered per input): aborted.
    fn complete_if_aligned(&mut self, out: &mut Vec<AlignAction>) {
        let aligned = |got: &BTreeSet<usize>| (0..self.inputs).all(|i| got.contains(&i) || self.ended.contains(&i));
        let Some(newest) = self.pending.iter().rev().find(|(_, got)| aligned(got)).map(|(id, _)| *id) else {
            return;
        };
        let settled: Vec<(CheckpointId, bool)> =
            self.pending.range(..=newest).map(|(id, got)| (*id, aligned(got))).collect();
        for (id, is_aligned) in settled {
            if let Some(got) = self.pending.remove(&id) {
                out.push(if is_aligned { AlignAction::Snapshot(id) } else { AlignAction::Abort(id) });
                self.unblock(&got, out);
            }
        }
        self.last = Some(newest);
    }

    /// Barrier `id` arrived on `input`.
    pub fn on_barrier(&mut self, input: usize, id: CheckpointId) -> Vec<AlignAction> {
        let mut out = Vec::new();
        if self.last.is_some_and(|last| id <= last) || input >= self.inputs {
            return out; // stale: that checkpoint was snapshotted or aborted here already
        }
        if self.mode == DeliveryMode::ExactlyOnce {
            // An unblocked input carrying a newer barrier means upstream gave the older one up.
            if self.pending.keys().next_back().is_some_and(|newest| *newest > id) {
                return out;
            }
            let older: Vec<CheckpointId> = self.pending.range(..id).map(|(k, _)| *k).collect();
            for old in older {
                if let Some(got) = self.pending.remove(&old) {
                    out.push(AlignAction::Abort(old));
                    self.unblock(&got, &mut out);
                }
            }
        }
        if self.pending.entry(id).or_default().insert(input) && self.mode == DeliveryMode::ExactlyOnce {
            out.push(AlignAction::Block(input));
        }
        self.complete_if_aligned(&mut out);
        out
    }

    /// `input` ended: it no longer holds up alignment.
    pub fn on_end_of_input(&mut self, input: usize) -> Vec<AlignAction> {
        let mut out = Vec::new();
        self.ended.insert(input);
        self.complete_if_aligned(&mut out);
        out
    }
}

/// Settings of the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointConfig {
    /// Interval between triggers, milliseconds (0: only on demand).
    pub interval_ms: i64,
    /// A checkpoint not complete after this long is aborted.
    pub timeout_ms: i64,
    /// Checkpoints in flight at once (default 1).
    pub max_concurrent: usize,
    /// Minimum time between the completion of one checkpoint and the trigger of the next.
    pub min_pause_ms: i64,
    /// Complete checkpoints kept restorable; older ones are released.
    pub retained: usize,
    /// Aligned (exactly-once) or not (at-least-once).
    pub mode: DeliveryMode,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            interval_ms: 1_000,
            timeout_ms: 60_000,
            max_concurrent: 1,
            min_pause_ms: 0,
            retained: 2,
            mode: DeliveryMode::ExactlyOnce,
        }
    }
}

/// What the coordinator asks the runtime to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<H> {
    /// Sources: record offsets and inject barrier `id`.
    Trigger(CheckpointId),
    /// Every shard acknowledged `id`: write its manifest (atomically) with these handles.
    WriteManifest(CheckpointId, Vec<(usize, H)>),
    /// `id` is complete (its manifest is durable): sinks commit its output.
    Complete(CheckpointId),
    /// These checkpoints are no longer retained: their files may be released.
    Release(Vec<CheckpointId>),
    /// `id` failed or timed out: drop it everywhere; sinks discard its pre-committed output.
    Abort(CheckpointId, String),
}

#[derive(Debug)]
struct InFlight<H> {
    started_ms: i64,
    acks: BTreeMap<usize, H>,
    manifest_requested: bool,
}

/// The job's checkpoint coordinator.
#[derive(Debug)]
pub struct Coordinator<H> {
    config: CheckpointConfig,
    shards: usize,
    next_id: CheckpointId,
    in_flight: BTreeMap<CheckpointId, InFlight<H>>,
    completed: VecDeque<CheckpointId>,
    last_trigger_ms: Option<i64>,
    last_complete_ms: Option<i64>,
}

impl<H: Clone> Coordinator<H> {
    /// A coordinator for `shards` shards whose next checkpoint id is `next_id` (one past the
    /// checkpoint the job restored from, or 1).
    pub fn new(config: CheckpointConfig, shards: usize, next_id: CheckpointId) -> Self {
        Coordinator {
            config,
            shards,
            next_id: next_id.max(1),
            in_flight: BTreeMap::new(),
            completed: VecDeque::new(),
            last_trigger_ms: None,
            last_complete_ms: None,
        }
    }

    /// Counts the first interval from `now_ms` (the job started or restarted), so that the
    /// first checkpoint is due one interval later rather than at once: a restarted job's first
    /// checkpoint then does not wait on the slowest store's restore.
    pub fn start_interval_at(&mut self, now_ms: i64) {
        self.last_trigger_ms = Some(now_ms);
    }

    /// Checkpoints in flight.
    pub fn in_flight(&self) -> Vec<CheckpointId> {
        self.in_flight.keys().copied().collect()
    }

    /// Complete checkpoints still retained, oldest first.
    pub fn retained(&self) -> Vec<CheckpointId> {
        self.completed.iter().copied().collect()
    }

    fn can_trigger(&self, now_ms: i64) -> bool {
        self.in_flight.len() < self.config.max_concurrent.max(1)
            && self.last_complete_ms.is_none_or(|t| now_ms - t >= self.config.min_pause_ms)
    }

    fn start(&mut self, now_ms: i64) -> CheckpointId {
        let id = self.next_id;
        self.next_id += 1;
        self.last_trigger_ms = Some(now_ms);
        self.in_flight.insert(id, InFlight { started_ms: now_ms, acks: BTreeMap::new(), manifest_requested: false });
        id
    }

    /// Time passed: triggers a due checkpoint, aborts timed-out ones.
    pub fn tick(&mut self, now_ms: i64) -> Vec<Command<H>> {
        let mut out = Vec::new();
        let timed_out: Vec<CheckpointId> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now_ms - f.started_ms >= self.config.timeout_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in timed_out {
            self.in_flight.remove(&id);
            out.push(Command::Abort(id, format!("timed out after {} ms", self.config.timeout_ms)));
        }
        let due =
            self.config.interval_ms > 0 && self.last_trigger_ms.is_none_or(|t| now_ms - t >= self.config.interval_ms);
        if due && self.can_trigger(now_ms) {
            out.push(Command::Trigger(self.start(now_ms)));
        }
        out
    }

    /// When the next checkpoint is due by the interval and the minimum pause (`None`: never,
    /// interval 0). It triggers at the first tick from then on at which the in-flight limit
    /// allows.
    pub fn next_due_ms(&self) -> Option<i64> {
        if self.config.interval_ms <= 0 {
            return None;
        }
        let by_interval = self.last_trigger_ms.map_or(i64::MIN, |t| t.saturating_add(self.config.interval_ms));
        let by_pause = self.last_complete_ms.map_or(i64::MIN, |t| t.saturating_add(self.config.min_pause_ms));
        Some(by_interval.max(by_pause))
    }

    /// A checkpoint on demand (a savepoint, a test): triggered now if the in-flight limit
    /// allows, else `None`.
    pub fn trigger_now(&mut self, now_ms: i64) -> Option<CheckpointId> {
        (self.in_flight.len() < self.config.max_concurrent.max(1)).then(|| self.start(now_ms))
    }

    /// A checkpoint before the interval is due (sources that ended want a final one):
    /// triggered now if the in-flight limit and the minimum pause allow, else `None`. Unlike
    /// [`Coordinator::trigger_now`], which a caller's explicit request uses, it keeps the pause.
    pub fn trigger_early(&mut self, now_ms: i64) -> Option<CheckpointId> {
        self.can_trigger(now_ms).then(|| self.start(now_ms))
    }

    /// `shard` acknowledged `id` with its (durable) handle.
    pub fn on_ack(&mut self, shard: usize, id: CheckpointId, handle: H) -> Vec<Command<H>> {
        let Some(flight) = self.in_flight.get_mut(&id) else {
            return Vec::new(); // aborted or unknown: a late ack is ignored
        };
        if shard >= self.shards || flight.manifest_requested {
            return Vec::new();
        }
        flight.acks.insert(shard, handle);
        if flight.acks.len() == self.shards {
            flight.manifest_requested = true;
            let handles = flight.acks.iter().map(|(s, h)| (*s, h.clone())).collect();
            return vec![Command::WriteManifest(id, handles)];
        }
        Vec::new()
    }

    /// `shard` failed checkpoint `id` (an fsync error, a full disk): abort it.
    pub fn on_decline(&mut self, shard: usize, id: CheckpointId, reason: &str) -> Vec<Command<H>> {
        match self.in_flight.remove(&id) {
            Some(_) => vec![Command::Abort(id, format!("shard {shard}: {reason}"))],
            None => Vec::new(),
        }
    }

    /// The manifest of `id` was written (`Ok`) or failed to be written (`Err`).
    pub fn on_manifest(&mut self, id: CheckpointId, result: Result<(), String>, now_ms: i64) -> Vec<Command<H>> {
        let Some(flight) = self.in_flight.remove(&id) else { return Vec::new() };
        if !flight.manifest_requested {
            return vec![Command::Abort(id, "manifest written before every shard acknowledged".into())];
        }
        if let Err(reason) = result {
            return vec![Command::Abort(id, format!("manifest: {reason}"))];
        }
        let mut out = vec![Command::Complete(id)];
        self.last_complete_ms = Some(now_ms);
        self.completed.push_back(id);
        // A complete checkpoint supersedes older ones still in flight.
        let older: Vec<CheckpointId> = self.in_flight.range(..id).map(|(k, _)| *k).collect();
        for old in older {
            self.in_flight.remove(&old);
            out.push(Command::Abort(old, format!("superseded by {id}")));
        }
        let mut released = Vec::new();
        while self.completed.len() > self.config.retained.max(1) {
            if let Some(old) = self.completed.pop_front() {
                released.push(old);
            }
        }
        if !released.is_empty() {
            out.push(Command::Release(released));
        }
        out
    }

    /// The job is restarting: everything in flight is aborted.
    pub fn on_failure(&mut self, reason: &str) -> Vec<Command<H>> {
        let ids: Vec<CheckpointId> = self.in_flight.keys().copied().collect();
        self.in_flight.clear();
        ids.into_iter().map(|id| Command::Abort(id, format!("job failure: {reason}"))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_due_is_where_tick_triggers() {
        let config = CheckpointConfig { interval_ms: 100, min_pause_ms: 30, ..CheckpointConfig::default() };
        let mut c: Coordinator<u64> = Coordinator::new(config, 1, 1);
        c.start_interval_at(1000);
        assert_eq!(c.next_due_ms(), Some(1100));
        assert!(c.tick(1099).is_empty());
        assert_eq!(c.tick(1100), vec![Command::Trigger(1)]);
        assert_eq!(c.next_due_ms(), Some(1200));
        // Completed late: the minimum pause pushes the next one back.
        c.on_ack(0, 1, 7);
        c.on_manifest(1, Ok(()), 1190);
        assert_eq!(c.next_due_ms(), Some(1220));
        assert!(c.tick(1219).is_empty());
        assert_eq!(c.tick(1220), vec![Command::Trigger(2)]);
        let never: Coordinator<u64> =
            Coordinator::new(CheckpointConfig { interval_ms: 0, ..CheckpointConfig::default() }, 1, 1);
        assert_eq!(never.next_due_ms(), None);
    }

    #[test]
    fn an_early_trigger_keeps_the_pause_and_one_on_demand_does_not() {
        let config = CheckpointConfig { interval_ms: 1_000, min_pause_ms: 30, ..CheckpointConfig::default() };
        let mut c: Coordinator<u64> = Coordinator::new(config, 1, 1);
        assert_eq!(c.trigger_early(0), Some(1));
        assert_eq!(c.trigger_early(1), None, "one in flight");
        c.on_ack(0, 1, 7);
        c.on_manifest(1, Ok(()), 10);
        assert_eq!(c.trigger_early(39), None, "within the pause");
        assert_eq!(c.trigger_now(39), Some(2), "a request on demand does not wait for the pause");
        c.on_ack(0, 2, 7);
        c.on_manifest(2, Ok(()), 45);
        assert_eq!(c.trigger_early(75), Some(3));
    }

    #[test]
    fn the_first_checkpoint_is_due_one_interval_after_a_start() {
        let config = CheckpointConfig { interval_ms: 100, ..CheckpointConfig::default() };
        let mut fresh: Coordinator<u64> = Coordinator::new(config.clone(), 1, 1);
        assert_eq!(fresh.tick(1000), vec![Command::Trigger(1)], "without a start time: at once");
        let mut restarted: Coordinator<u64> = Coordinator::new(config, 1, 8);
        restarted.start_interval_at(1000);
        assert!(restarted.tick(1050).is_empty(), "a restarted job does not checkpoint at once");
        assert_eq!(restarted.tick(1100), vec![Command::Trigger(8)]);
    }

    #[test]
    fn aligner_blocks_until_every_input_delivered_the_barrier() {
        let mut a = BarrierAligner::new(3, DeliveryMode::ExactlyOnce);
        assert_eq!(a.on_barrier(1, 5), vec![AlignAction::Block(1)]);
        assert!(a.is_blocked(1) && !a.is_blocked(0));
        assert_eq!(a.on_barrier(0, 5), vec![AlignAction::Block(0)]);
        assert_eq!(
            a.on_end_of_input(2),
            vec![AlignAction::Snapshot(5), AlignAction::Unblock(0), AlignAction::Unblock(1)]
        );
        assert!(!a.is_blocked(0));
        assert_eq!(a.on_barrier(0, 5), vec![], "a stale barrier is ignored");
        assert_eq!(a.on_barrier(0, 6), vec![AlignAction::Block(0)]);
        assert_eq!(a.on_barrier(1, 7), vec![AlignAction::Abort(6), AlignAction::Unblock(0), AlignAction::Block(1)]);
    }

    #[test]
    fn at_least_once_never_blocks() {
        let mut a = BarrierAligner::new(2, DeliveryMode::AtLeastOnce);
        assert_eq!(a.on_barrier(0, 1), vec![]);
        assert!(!a.is_blocked(0));
        assert_eq!(a.on_barrier(1, 1), vec![AlignAction::Snapshot(1)]);
    }

    #[test]
    fn coordinator_completes_only_after_all_acks_and_the_manifest() {
        let config =
            CheckpointConfig { interval_ms: 100, timeout_ms: 1_000, retained: 1, ..CheckpointConfig::default() };
        let mut c: Coordinator<&str> = Coordinator::new(config, 2, 1);
        assert_eq!(c.tick(0), vec![Command::Trigger(1)]);
        assert_eq!(c.tick(150), vec![], "one in flight at most");
        assert_eq!(c.on_ack(1, 1, "b"), vec![]);
        assert_eq!(c.on_ack(0, 1, "a"), vec![Command::WriteManifest(1, vec![(0, "a"), (1, "b")])]);
        assert_eq!(c.on_manifest(1, Ok(()), 200), vec![Command::Complete(1)]);
        assert_eq!(c.tick(210), vec![Command::Trigger(2)]);
        assert_eq!(c.on_decline(0, 2, "ENOSPC"), vec![Command::Abort(2, "shard 0: ENOSPC".into())]);
        assert_eq!(c.tick(400), vec![Command::Trigger(3)]);
        assert_eq!(c.tick(1_400), vec![Command::Abort(3, "timed out after 1000 ms".into()), Command::Trigger(4)]);
        c.on_ack(0, 4, "a");
        c.on_ack(1, 4, "b");
        assert_eq!(c.on_manifest(4, Ok(()), 1_500), vec![Command::Complete(4), Command::Release(vec![1])]);
        assert_eq!(c.retained(), vec![4]);
    }
}
