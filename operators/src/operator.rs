//! The operator contract: what the runtime drives and what every built-in operator implements.
//!
//! An operator is single-threaded logic. It receives records (with event timestamps) and
//! event-time progress (watermarks), may keep keyed state in the shard's [`StateStore`] (and
//! state of its own instance as lists, see [`crate::operator_state`]), and emits into a
//! [`Collector`]. The collector is a generic parameter, so a chain of operators
//! compiles into direct calls: a record passes down a chain with no queue, no allocation and
//! no dynamic dispatch. It never sees a thread, a channel or a file; the runtime owns those.

use weir_state::StateStore;
use weir_state::keygroup::KeyGroup;
use weir_state::store::Key;

use crate::error::Result;
use crate::operator_state::{OperatorState, OperatorStateSnapshot};

/// Event time in epoch milliseconds.
pub type Timestamp = i64;

/// The watermark that ends a stream: every timer and window fires.
pub const END_OF_TIME: Timestamp = i64::MAX;

/// Where an operator emits records. Implemented by the next operator of a chain, by the
/// runtime's exchange and sink ends, and by [`Vec`] (for tests).
pub trait Collector<T> {
    /// Emits `value` with event time `timestamp`.
    fn collect(&mut self, value: T, timestamp: Timestamp);
}

impl<T> Collector<T> for Vec<(T, Timestamp)> {
    fn collect(&mut self, value: T, timestamp: Timestamp) {
        self.push((value, timestamp));
    }
}

/// A typed side output (for example late records): its name identifies it in the job.
#[derive(Debug)]
pub struct OutputTag<T> {
    name: &'static str,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T> Clone for OutputTag<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutputTag<T> {}

impl<T> OutputTag<T> {
    /// A side output named `name`.
    pub const fn new(name: &'static str) -> Self {
        OutputTag { name, _type: std::marker::PhantomData }
    }

    /// The side output's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// What an operator sees of its shard besides records: the state store, the shard, time.
#[derive(Debug)]
pub struct OperatorContext<'a> {
    /// The shard's state store (keyed state lives here, under the operator's uid).
    pub store: &'a mut StateStore,
    /// The store timers live in: kept apart from the state so that rebuilding the timer queue
    /// after a restore reads only timers, whatever the size of the state.
    pub timer_store: &'a mut StateStore,
    /// This shard's index.
    pub shard: usize,
    /// Number of shards.
    pub parallelism: usize,
    /// Number of key groups of the job.
    pub max_parallelism: u16,
    /// The operator's stable id; state names start with it.
    pub uid: &'a str,
    /// Processing time now, epoch milliseconds (from the runtime's clock seam).
    pub processing_time: Timestamp,
    /// The operator's current input watermark.
    pub watermark: Timestamp,
    /// The operator state restored for this instance (its non-keyed lists, see
    /// [`crate::operator_state`]), already redistributed to this shard: read it in
    /// [`Operator::open`]. Empty in every other call, and when nothing was restored.
    pub operator_state: &'a OperatorState,
}

impl OperatorContext<'_> {
    /// The state name `<uid>/<name>`.
    pub fn state_name(&self, name: &str) -> String {
        format!("{}/{name}", self.uid)
    }
}

/// A record of a keyed stream: the key travels with the value, so the receiving shard does not
/// run the key selector again.
#[derive(Debug, Clone, PartialEq)]
pub struct Keyed<K, T> {
    /// The key.
    pub key: K,
    /// The value.
    pub value: T,
}

/// The key of the record being processed, encoded, with its key group.
#[derive(Debug, Clone, Copy)]
pub struct CurrentKey<'a> {
    /// Stable encoding of the key.
    pub bytes: &'a [u8],
    /// Its key group.
    pub group: KeyGroup,
}

impl<'a> CurrentKey<'a> {
    /// As a state-store key.
    pub fn as_key(&self) -> Key<'a> {
        Key { group: self.group, bytes: self.bytes }
    }
}

/// A single-input operator as the runtime drives it.
pub trait Operator: 'static {
    /// Input record type.
    type In;
    /// Output record type.
    type Out;

    /// Called once per shard before the first record, and again after a restore: register
    /// states, rebuild in-memory indexes (timers) from the store, take back operator state
    /// ([`OperatorContext::operator_state`]).
    fn open(&mut self, _ctx: &mut OperatorContext<'_>) -> Result<()> {
        Ok(())
    }

    /// Processes one record.
    fn process<C: Collector<Self::Out>>(
        &mut self,
        value: Self::In,
        timestamp: Timestamp,
        ctx: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> Result<()>;

    /// Event time advanced to `watermark` (already combined over the inputs). Fire what is due.
    /// The runtime forwards the watermark downstream after this returns.
    fn on_watermark<C: Collector<Self::Out>>(
        &mut self,
        _watermark: Timestamp,
        _ctx: &mut OperatorContext<'_>,
        _out: &mut C,
    ) -> Result<()> {
        Ok(())
    }

    /// Processing time advanced to `ctx.processing_time`. Fire due processing-time timers.
    fn on_processing_time<C: Collector<Self::Out>>(
        &mut self,
        _ctx: &mut OperatorContext<'_>,
        _out: &mut C,
    ) -> Result<()> {
        Ok(())
    }

    /// A checkpoint barrier: every record before it was processed, none after it. Writes this
    /// instance's non-keyed state into `state` as lists ([`OperatorStateSnapshot::set_list`]);
    /// after a restore, [`OperatorContext::operator_state`] holds them at [`Operator::open`],
    /// dealt to the new instances by each list's [`Redistribution`]. Keyed state and timers
    /// need nothing here: they are in the stores already.
    ///
    /// [`Redistribution`]: crate::operator_state::Redistribution
    fn snapshot_state(&mut self, _state: &mut OperatorStateSnapshot) -> Result<()> {
        Ok(())
    }

    /// Side outputs produced since the last call, drained by the runtime.
    fn drain_side_outputs(&mut self, _sink: &mut dyn FnMut(&'static str, Box<dyn std::any::Any + Send>)) {}
}
