//! A harness that drives one operator by hand, for tests: push records and watermarks, advance
//! processing time, take a snapshot and restore it into a fresh operator instance, and read
//! the main and side outputs. It uses a real [`StateStore`] in a directory the test provides,
//! so what it tests is what the runtime runs. A snapshot holds the operator state too
//! ([`crate::operator_state`]), which the restored instance reads at its `open`.

use std::any::Any;
use std::path::{Path, PathBuf};

use weir_state::keygroup::KeyGroupRange;
use weir_state::store::{CheckpointHandle, RestoreOptions};
use weir_state::{StateStore, StoreConfig};

use crate::error::Result;
use crate::operator::{Operator, OperatorContext, OutputTag, Timestamp};
use crate::operator_state::{OperatorState, OperatorStateSnapshot, WrittenList, restore_lists};

/// Drives a single operator instance (shard 0 of 1) over a real state store.
pub struct OperatorHarness<O: Operator> {
    dir: PathBuf,
    config: StoreConfig,
    store: StateStore,
    timer_store: StateStore,
    operator: O,
    uid: String,
    watermark: Timestamp,
    processing_time: Timestamp,
    output: Vec<(O::Out, Timestamp)>,
    side: Vec<(&'static str, Box<dyn Any + Send>)>,
    next_checkpoint: u64,
}

impl<O: Operator> std::fmt::Debug for OperatorHarness<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorHarness").field("uid", &self.uid).field("watermark", &self.watermark).finish()
    }
}

/// A snapshot of a harnessed operator: its state store, its timer store and its operator
/// state.
#[derive(Debug, Clone)]
pub struct HarnessSnapshot {
    /// The state store's checkpoint.
    pub state: CheckpointHandle,
    /// The timer store's checkpoint.
    pub timers: CheckpointHandle,
    /// The lists the operator wrote ([`Operator::snapshot_state`]).
    pub operator_state: OperatorStateSnapshot,
}

fn context<'a>(
    store: &'a mut StateStore,
    timer_store: &'a mut StateStore,
    uid: &'a str,
    now: Timestamp,
    watermark: Timestamp,
) -> OperatorContext<'a> {
    OperatorContext {
        store,
        timer_store,
        shard: 0,
        parallelism: 1,
        max_parallelism: HARNESS_MAX_PARALLELISM,
        uid,
        processing_time: now,
        watermark,
        operator_state: OperatorState::empty(),
    }
}

/// Key groups used by harnesses.
pub const HARNESS_MAX_PARALLELISM: u16 = 128;

fn harness_config() -> StoreConfig {
    StoreConfig {
        segment_bytes: 1 << 20,
        max_parallelism: HARNESS_MAX_PARALLELISM,
        key_groups: KeyGroupRange::all(HARNESS_MAX_PARALLELISM),
        ..StoreConfig::default()
    }
}

impl<O: Operator> OperatorHarness<O> {
    /// A harness over fresh stores in `dir` (`state/` and `timers/`), with the operator opened
    /// under `uid`.
    pub fn new(dir: &Path, uid: &str, operator: O) -> Result<Self> {
        let config = harness_config();
        let store = StateStore::create(&dir.join("state"), config.clone())?;
        let timer_store = StateStore::create(&dir.join("timers"), config.clone())?;
        Self::with_stores(dir, config, (store, timer_store), uid, (operator, OperatorState::empty()), 1)
    }

    fn with_stores(
        dir: &Path,
        config: StoreConfig,
        (store, timer_store): (StateStore, StateStore),
        uid: &str,
        (operator, operator_state): (O, &OperatorState),
        next: u64,
    ) -> Result<Self> {
        let mut h = OperatorHarness {
            dir: dir.to_owned(),
            config,
            store,
            timer_store,
            operator,
            uid: uid.to_owned(),
            watermark: Timestamp::MIN,
            processing_time: 0,
            output: Vec::new(),
            side: Vec::new(),
            next_checkpoint: next,
        };
        let mut ctx = context(&mut h.store, &mut h.timer_store, &h.uid, h.processing_time, h.watermark);
        ctx.operator_state = operator_state;
        h.operator.open(&mut ctx)?;
        Ok(h)
    }

    fn collect_side(&mut self) {
        let side = &mut self.side;
        self.operator.drain_side_outputs(&mut |name, record| side.push((name, record)));
    }

    /// Pushes one record with event time `timestamp`.
    pub fn process(&mut self, value: O::In, timestamp: Timestamp) -> Result<()> {
        let mut ctx = context(&mut self.store, &mut self.timer_store, &self.uid, self.processing_time, self.watermark);
        self.operator.process(value, timestamp, &mut ctx, &mut self.output)?;
        self.collect_side();
        Ok(())
    }

    /// Advances event time to `watermark` (ignored if not ahead of the current one).
    pub fn watermark(&mut self, watermark: Timestamp) -> Result<()> {
        if watermark <= self.watermark {
            return Ok(());
        }
        self.watermark = watermark;
        let mut ctx = context(&mut self.store, &mut self.timer_store, &self.uid, self.processing_time, watermark);
        self.operator.on_watermark(watermark, &mut ctx, &mut self.output)?;
        self.collect_side();
        Ok(())
    }

    /// Advances processing time to `now`.
    pub fn set_processing_time(&mut self, now: Timestamp) -> Result<()> {
        self.processing_time = now;
        let mut ctx = context(&mut self.store, &mut self.timer_store, &self.uid, now, self.watermark);
        self.operator.on_processing_time(&mut ctx, &mut self.output)?;
        self.collect_side();
        Ok(())
    }

    /// Takes the main output so far.
    pub fn take_output(&mut self) -> Vec<(O::Out, Timestamp)> {
        std::mem::take(&mut self.output)
    }

    /// Takes the records emitted so far to side output `tag`.
    pub fn take_side_output<T: 'static>(&mut self, tag: OutputTag<T>) -> Vec<(T, Timestamp)> {
        let mut taken = Vec::new();
        let mut kept = Vec::new();
        for (name, record) in self.side.drain(..) {
            if name == tag.name() {
                match record.downcast::<(T, Timestamp)>() {
                    Ok(r) => taken.push(*r),
                    Err(other) => kept.push((name, other)),
                }
            } else {
                kept.push((name, record));
            }
        }
        self.side = kept;
        taken
    }

    /// The operator instance (to look at what it keeps in memory).
    pub fn operator(&self) -> &O {
        &self.operator
    }

    /// The state store.
    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// The timer store.
    pub fn timer_store(&self) -> &StateStore {
        &self.timer_store
    }

    /// Takes a checkpoint of the operator's state, timers and operator state (as at a barrier:
    /// [`Operator::snapshot_state`] first) and waits until it is durable.
    pub fn snapshot(&mut self) -> Result<HarnessSnapshot> {
        let id = self.next_checkpoint;
        self.next_checkpoint += 1;
        let mut operator_state = OperatorStateSnapshot::new();
        self.operator.snapshot_state(&mut operator_state)?;
        let state = self.store.checkpoint(id)?;
        let timers = self.timer_store.checkpoint(id)?;
        state.task.run()?;
        timers.task.run()?;
        Ok(HarnessSnapshot { state: state.handle, timers: timers.handle, operator_state })
    }

    /// Discards this instance (as a crash would) and restores `snapshot` into `operator`, a
    /// fresh instance, whose `open` sees the operator state of the snapshot (one instance
    /// before and after: every list comes back whole, whatever its redistribution). Event time
    /// starts over (as after a restart), processing time is kept.
    pub fn restore(self, snapshot: &HarnessSnapshot, operator: O) -> Result<Self> {
        let OperatorHarness { dir, config, store, timer_store, uid, processing_time, .. } = self;
        drop((store, timer_store));
        let verify = RestoreOptions { verify_all: true };
        let store = StateStore::restore(&dir.join("state"), &snapshot.state, config.clone(), verify)?;
        let timer_store = StateStore::restore(&dir.join("timers"), &snapshot.timers, config.clone(), verify)?;
        let next = snapshot.state.checkpoint_id + 1;
        let lists = snapshot.operator_state.lists().iter().map(|list| WrittenList::of(0, list));
        let operator_state = restore_lists(lists, 1, 1, 0)?;
        let mut h = Self::with_stores(&dir, config, (store, timer_store), &uid, (operator, &operator_state), next)?;
        h.processing_time = processing_time;
        Ok(h)
    }
}
