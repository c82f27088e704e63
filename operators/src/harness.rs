//! A harness that drives one operator by hand, for tests: push records and watermarks, advance
//! processing time, take a snapshot and restore it into a fresh operator instance, and read
//! the main and side outputs. It uses a real [`StateStore`] in a directory the test provides,
//! so what it tests is what the runtime runs.

use std::any::Any;
use std::path::{Path, PathBuf};

use weir_state::keygroup::KeyGroupRange;
use weir_state::store::{CheckpointHandle, RestoreOptions};
use weir_state::{StateStore, StoreConfig};

use crate::error::Result;
use crate::operator::{Operator, OperatorContext, OutputTag, Timestamp};

/// Drives a single operator instance (shard 0 of 1) over a real state store.
pub struct OperatorHarness<O: Operator> {
    dir: PathBuf,
    config: StoreConfig,
    store: StateStore,
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

fn context<'a>(store: &'a mut StateStore, uid: &'a str, now: Timestamp, watermark: Timestamp) -> OperatorContext<'a> {
    OperatorContext {
        store,
        shard: 0,
        parallelism: 1,
        max_parallelism: HARNESS_MAX_PARALLELISM,
        uid,
        processing_time: now,
        watermark,
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
    /// A harness over a fresh store in `dir`, with the operator opened under `uid`.
    pub fn new(dir: &Path, uid: &str, operator: O) -> Result<Self> {
        let config = harness_config();
        let store = StateStore::create(dir, config.clone())?;
        Self::with_store(dir, config, store, uid, operator, 1)
    }

    fn with_store(
        dir: &Path,
        config: StoreConfig,
        store: StateStore,
        uid: &str,
        operator: O,
        next: u64,
    ) -> Result<Self> {
        let mut h = OperatorHarness {
            dir: dir.to_owned(),
            config,
            store,
            operator,
            uid: uid.to_owned(),
            watermark: Timestamp::MIN,
            processing_time: 0,
            output: Vec::new(),
            side: Vec::new(),
            next_checkpoint: next,
        };
        h.operator.open(&mut context(&mut h.store, &h.uid, h.processing_time, h.watermark))?;
        Ok(h)
    }

    fn collect_side(&mut self) {
        let side = &mut self.side;
        self.operator.drain_side_outputs(&mut |name, record| side.push((name, record)));
    }

    /// Pushes one record with event time `timestamp`.
    pub fn process(&mut self, value: O::In, timestamp: Timestamp) -> Result<()> {
        let mut ctx = context(&mut self.store, &self.uid, self.processing_time, self.watermark);
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
        let mut ctx = context(&mut self.store, &self.uid, self.processing_time, watermark);
        self.operator.on_watermark(watermark, &mut ctx, &mut self.output)?;
        self.collect_side();
        Ok(())
    }

    /// Advances processing time to `now`.
    pub fn set_processing_time(&mut self, now: Timestamp) -> Result<()> {
        self.processing_time = now;
        let mut ctx = context(&mut self.store, &self.uid, now, self.watermark);
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

    /// The state store.
    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// Takes a checkpoint of the operator's state and waits until it is durable.
    pub fn snapshot(&mut self) -> Result<CheckpointHandle> {
        let id = self.next_checkpoint;
        self.next_checkpoint += 1;
        let pending = self.store.checkpoint(id)?;
        pending.task.run()?;
        Ok(pending.handle)
    }

    /// Discards this instance (as a crash would) and restores `handle` into `operator`, a
    /// fresh instance. Event time starts over (as after a restart), processing time is kept.
    pub fn restore(self, handle: &CheckpointHandle, operator: O) -> Result<Self> {
        let OperatorHarness { dir, config, store, uid, processing_time, .. } = self;
        drop(store);
        let store = StateStore::restore(&dir, handle, config.clone(), RestoreOptions { verify_all: true })?;
        let mut h = Self::with_store(&dir, config, store, &uid, operator, handle.checkpoint_id + 1)?;
        h.processing_time = processing_time;
        Ok(h)
    }
}
