//! Keyed process functions: per-key logic with keyed state and timers, Flink's
//! `KeyedProcessFunction`.
//!
//! The function gets each record with its key and a [`ProcessContext`] through which it reads
//! and writes keyed state (scoped to the current key), registers event-time and
//! processing-time timers for the current key, and emits output. Timers come back through
//! [`KeyedProcessFunction::on_timer`] with the key they were registered for.

use weir_state::keygroup::{KeyEncode, key_group_of_encoded};
use weir_state::states::{ListState, MapState, StateValue, ValueState};
use weir_state::store::Key;
use weir_state::{StateError, StateStore};

use crate::error::Result;
use crate::operator::{Collector, CurrentKey, Keyed, Operator, OperatorContext, OutputTag, Timestamp};
use crate::timers::{TimeDomain, TimerService};

/// Registers an operator's named states under its uid.
#[derive(Debug)]
pub struct StateRegistry<'a> {
    store: &'a mut StateStore,
    uid: &'a str,
}

impl<'a> StateRegistry<'a> {
    /// A registry for operator `uid`.
    pub fn new(store: &'a mut StateStore, uid: &'a str) -> Self {
        StateRegistry { store, uid }
    }

    /// A value state named `name` (stored as `<uid>/<name>`).
    pub fn value<V: StateValue>(&mut self, name: &str) -> Result<ValueState<V>> {
        Ok(ValueState::register(self.store, &format!("{}/{name}", self.uid))?)
    }

    /// A list state named `name`.
    pub fn list<V: StateValue>(&mut self, name: &str) -> Result<ListState<V>> {
        Ok(ListState::register(self.store, &format!("{}/{name}", self.uid))?)
    }

    /// A map state named `name`.
    pub fn map<UK: KeyEncode, V: StateValue>(&mut self, name: &str) -> Result<MapState<UK, V>> {
        Ok(MapState::register(self.store, &format!("{}/{name}", self.uid))?)
    }
}

/// Buffered side output records, drained by the runtime.
#[derive(Default)]
pub struct SideOutputs {
    records: Vec<(&'static str, Box<dyn std::any::Any + Send>)>,
}

impl std::fmt::Debug for SideOutputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideOutputs").field("pending", &self.records.len()).finish()
    }
}

impl SideOutputs {
    /// Emits `value` to the side output `tag`.
    pub fn emit<T: Send + 'static>(&mut self, tag: OutputTag<T>, value: T, timestamp: Timestamp) {
        self.records.push((tag.name(), Box::new((value, timestamp))));
    }

    /// Hands every buffered record to `sink` (as `Box<(T, Timestamp)>`).
    pub fn drain(&mut self, sink: &mut dyn FnMut(&'static str, Box<dyn std::any::Any + Send>)) {
        for (name, record) in self.records.drain(..) {
            sink(name, record);
        }
    }
}

/// What a process function sees while handling a record or a timer.
pub struct ProcessContext<'a, K, Out> {
    store: &'a mut StateStore,
    timer_store: &'a mut StateStore,
    timers: &'a mut TimerService,
    key: CurrentKey<'a>,
    typed_key: &'a K,
    timestamp: Option<Timestamp>,
    watermark: Timestamp,
    processing_time: Timestamp,
    out: &'a mut Vec<(Out, Timestamp)>,
    side: &'a mut SideOutputs,
}

impl<'a, K, Out> ProcessContext<'a, K, Out> {
    /// A context over the given parts (for operators built on process functions).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: &'a mut StateStore,
        timer_store: &'a mut StateStore,
        timers: &'a mut TimerService,
        key: CurrentKey<'a>,
        typed_key: &'a K,
        timestamp: Option<Timestamp>,
        watermark: Timestamp,
        processing_time: Timestamp,
        out: &'a mut Vec<(Out, Timestamp)>,
        side: &'a mut SideOutputs,
    ) -> Self {
        ProcessContext { store, timer_store, timers, key, typed_key, timestamp, watermark, processing_time, out, side }
    }
}

impl<'a, K: StateValue, Out> ProcessContext<'a, K, Out> {
    /// The current key.
    pub fn key(&self) -> &K {
        self.typed_key
    }

    /// The current key as a state-store key (for direct state access).
    pub fn state_key(&self) -> Key<'a> {
        self.key.as_key()
    }

    /// The state store (read).
    pub fn store(&self) -> &StateStore {
        self.store
    }

    /// The state store (write).
    pub fn store_mut(&mut self) -> &mut StateStore {
        self.store
    }

    /// The event time of the record being processed, or of the timer firing.
    pub fn timestamp(&self) -> Option<Timestamp> {
        self.timestamp
    }

    /// The operator's current watermark.
    pub fn watermark(&self) -> Timestamp {
        self.watermark
    }

    /// Processing time now.
    pub fn processing_time(&self) -> Timestamp {
        self.processing_time
    }

    /// The current key's value in `state`, deserialised.
    pub fn value<V: StateValue>(&self, state: &ValueState<V>) -> Result<Option<V>> {
        Ok(state.get_owned(self.store, self.key.as_key())?)
    }

    /// The current key's value in `state`, read in place (zero-copy).
    pub fn value_ref<V: StateValue>(&self, state: &ValueState<V>) -> Result<Option<&V::Archived>> {
        Ok(state.get(self.store, self.key.as_key())?)
    }

    /// Sets the current key's value in `state`.
    pub fn set<V: StateValue>(&mut self, state: &ValueState<V>, value: &V) -> Result<()> {
        Ok(state.put(self.store, self.key.as_key(), value)?)
    }

    /// Clears the current key's value in `state`.
    pub fn clear<V: StateValue>(&mut self, state: &ValueState<V>) -> Result<()> {
        state.delete(self.store, self.key.as_key())?;
        Ok(())
    }

    /// Emits `value` with the current timestamp (the record's, or the timer's).
    pub fn output(&mut self, value: Out) {
        let ts = self.timestamp.unwrap_or(self.watermark);
        self.out.push((value, ts));
    }

    /// Emits `value` with event time `timestamp`.
    pub fn output_at(&mut self, value: Out, timestamp: Timestamp) {
        self.out.push((value, timestamp));
    }

    /// Emits `value` to the side output `tag`.
    pub fn side_output<T: Send + 'static>(&mut self, tag: OutputTag<T>, value: T) {
        let ts = self.timestamp.unwrap_or(self.watermark);
        self.side.emit(tag, value, ts);
    }

    /// Registers an event-time timer for the current key.
    pub fn register_event_timer(&mut self, timestamp: Timestamp) -> Result<()> {
        self.timers.register(self.timer_store, TimeDomain::EventTime, self.key, self.typed_key, timestamp)
    }

    /// Registers a processing-time timer for the current key.
    pub fn register_processing_timer(&mut self, timestamp: Timestamp) -> Result<()> {
        self.timers.register(self.timer_store, TimeDomain::ProcessingTime, self.key, self.typed_key, timestamp)
    }

    /// Deletes the current key's event-time timer at `timestamp`.
    pub fn delete_event_timer(&mut self, timestamp: Timestamp) -> Result<()> {
        self.timers.delete(self.timer_store, TimeDomain::EventTime, self.key, timestamp)
    }

    /// Deletes the current key's processing-time timer at `timestamp`.
    pub fn delete_processing_timer(&mut self, timestamp: Timestamp) -> Result<()> {
        self.timers.delete(self.timer_store, TimeDomain::ProcessingTime, self.key, timestamp)
    }
}

/// Per-key logic with state and timers.
pub trait KeyedProcessFunction: 'static {
    /// The key type (its stable encoding partitions the state; it is stored with timers).
    type Key: KeyEncode + StateValue + Clone;
    /// Input record type.
    type In: 'static;
    /// Output record type.
    type Out: 'static;

    /// Registers states; called once per shard (again after a restore).
    fn open(&mut self, _states: &mut StateRegistry<'_>) -> Result<()> {
        Ok(())
    }

    /// Handles one record of the current key.
    fn process(&mut self, value: Self::In, ctx: &mut ProcessContext<'_, Self::Key, Self::Out>) -> Result<()>;

    /// A timer registered for the current key fired.
    fn on_timer(
        &mut self,
        _timestamp: Timestamp,
        _domain: TimeDomain,
        _ctx: &mut ProcessContext<'_, Self::Key, Self::Out>,
    ) -> Result<()> {
        Ok(())
    }
}

/// Runs a [`KeyedProcessFunction`] as an [`Operator`] over a keyed stream.
pub struct KeyedProcessOperator<F: KeyedProcessFunction> {
    function: F,
    timers: Option<TimerService>,
    max_parallelism: u16,
    key_buf: Vec<u8>,
    out: Vec<(F::Out, Timestamp)>,
    side: SideOutputs,
}

impl<F: KeyedProcessFunction> std::fmt::Debug for KeyedProcessOperator<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedProcessOperator").finish_non_exhaustive()
    }
}

impl<F: KeyedProcessFunction> KeyedProcessOperator<F> {
    /// Wraps `function`.
    pub fn new(function: F) -> Self {
        KeyedProcessOperator {
            function,
            timers: None,
            max_parallelism: weir_state::keygroup::DEFAULT_MAX_PARALLELISM,
            key_buf: Vec::new(),
            out: Vec::new(),
            side: SideOutputs::default(),
        }
    }

    fn drain<C: Collector<F::Out>>(&mut self, out: &mut C) {
        for (v, ts) in self.out.drain(..) {
            out.collect(v, ts);
        }
    }

    fn fire<C: Collector<F::Out>>(
        &mut self,
        domain: TimeDomain,
        upto: Timestamp,
        ctx: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> Result<()> {
        let function = &mut self.function;
        fire_timers(&mut self.timers, domain, upto, ctx, &mut self.out, &mut self.side, out, |ts, pctx| {
            function.on_timer(ts, domain, pctx)
        })
    }
}

/// Fires every timer of `domain` due at `upto`: for each, builds the [`ProcessContext`] of
/// its key and calls `on_timer`, then hands the buffered output to `out`. Shared by the keyed
/// process and co-process operators.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fire_timers<K: StateValue, Out, C: Collector<Out>>(
    timers: &mut Option<TimerService>,
    domain: TimeDomain,
    upto: Timestamp,
    ctx: &mut OperatorContext<'_>,
    buffer: &mut Vec<(Out, Timestamp)>,
    side: &mut SideOutputs,
    out: &mut C,
    mut on_timer: impl FnMut(Timestamp, &mut ProcessContext<'_, K, Out>) -> Result<()>,
) -> Result<()> {
    let Some(timers) = timers.as_mut() else {
        return Err(StateError::Misuse("operator used before open".into()).into());
    };
    while let Some((timer, key)) = timers.pop_due::<K>(ctx.timer_store, domain, upto)? {
        let mut pctx = ProcessContext {
            store: ctx.store,
            timer_store: ctx.timer_store,
            timers,
            key: CurrentKey { bytes: &timer.key_bytes, group: timer.group },
            typed_key: &key,
            timestamp: Some(timer.timestamp),
            watermark: ctx.watermark,
            processing_time: ctx.processing_time,
            out: buffer,
            side,
        };
        on_timer(timer.timestamp, &mut pctx)?;
        for (v, ts) in buffer.drain(..) {
            out.collect(v, ts);
        }
    }
    Ok(())
}

impl<F: KeyedProcessFunction> Operator for KeyedProcessOperator<F> {
    type In = Keyed<F::Key, F::In>;
    type Out = F::Out;

    fn open(&mut self, ctx: &mut OperatorContext<'_>) -> Result<()> {
        self.max_parallelism = ctx.max_parallelism;
        self.timers = Some(TimerService::open(ctx.timer_store, ctx.uid)?);
        self.function.open(&mut StateRegistry::new(ctx.store, ctx.uid))
    }

    fn process<C: Collector<F::Out>>(
        &mut self,
        record: Keyed<F::Key, F::In>,
        timestamp: Timestamp,
        ctx: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> Result<()> {
        let Some(timers) = self.timers.as_mut() else {
            return Err(StateError::Misuse("operator used before open".into()).into());
        };
        self.key_buf.clear();
        record.key.encode_key(&mut self.key_buf);
        let group = key_group_of_encoded(&self.key_buf, self.max_parallelism);
        let mut pctx = ProcessContext {
            store: ctx.store,
            timer_store: ctx.timer_store,
            timers,
            key: CurrentKey { bytes: &self.key_buf, group },
            typed_key: &record.key,
            timestamp: Some(timestamp),
            watermark: ctx.watermark,
            processing_time: ctx.processing_time,
            out: &mut self.out,
            side: &mut self.side,
        };
        self.function.process(record.value, &mut pctx)?;
        self.drain(out);
        Ok(())
    }

    fn on_watermark<C: Collector<F::Out>>(
        &mut self,
        watermark: Timestamp,
        ctx: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> Result<()> {
        self.fire(TimeDomain::EventTime, watermark, ctx, out)
    }

    fn on_processing_time<C: Collector<F::Out>>(&mut self, ctx: &mut OperatorContext<'_>, out: &mut C) -> Result<()> {
        self.fire(TimeDomain::ProcessingTime, ctx.processing_time, ctx, out)
    }

    fn drain_side_outputs(&mut self, sink: &mut dyn FnMut(&'static str, Box<dyn std::any::Any + Send>)) {
        self.side.drain(sink)
    }
}
