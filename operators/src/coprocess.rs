//! Two keyed streams connected into one operator: Flink's `KeyedCoProcessFunction`, and the
//! window join and interval join built on it.
//!
//! Both inputs are partitioned by the same key, so a key's records from both sides meet on the
//! shard that owns its key group, where they share keyed state and timers. The runtime merges
//! the two inputs into one stream of [`CoInput`]; the operator's watermark is the minimum of
//! both inputs' watermarks.

use weir_state::StateError;
use weir_state::keygroup::{KeyEncode, key_group_of_encoded};

use crate::error::Result;
use crate::operator::{Collector, CurrentKey, Keyed, Operator, OperatorContext, Timestamp};
use crate::process::{ProcessContext, SideOutputs, StateRegistry};
use crate::timers::{TimeDomain, TimerService};

/// A record of either input of a connected stream.
#[derive(Debug, Clone, PartialEq)]
pub enum CoInput<K, A, B> {
    /// From the first input.
    First(Keyed<K, A>),
    /// From the second input.
    Second(Keyed<K, B>),
}

/// Per-key logic over two inputs with shared state and timers.
pub trait KeyedCoProcessFunction: 'static {
    /// The key both inputs are partitioned by.
    type Key: KeyEncode + weir_state::states::StateValue + Clone;
    /// First input.
    type In1: 'static;
    /// Second input.
    type In2: 'static;
    /// Output.
    type Out: 'static;

    /// Registers states; called once per shard.
    fn open(&mut self, _states: &mut StateRegistry<'_>) -> Result<()> {
        Ok(())
    }
    /// A record of the first input.
    fn process1(&mut self, value: Self::In1, ctx: &mut ProcessContext<'_, Self::Key, Self::Out>) -> Result<()>;
    /// A record of the second input.
    fn process2(&mut self, value: Self::In2, ctx: &mut ProcessContext<'_, Self::Key, Self::Out>) -> Result<()>;
    /// A timer of the current key fired.
    fn on_timer(
        &mut self,
        _timestamp: Timestamp,
        _domain: TimeDomain,
        _ctx: &mut ProcessContext<'_, Self::Key, Self::Out>,
    ) -> Result<()> {
        Ok(())
    }
}

/// Runs a [`KeyedCoProcessFunction`] as an [`Operator`] over [`CoInput`].
pub struct KeyedCoProcessOperator<F: KeyedCoProcessFunction> {
    function: F,
    timers: Option<TimerService>,
    max_parallelism: u16,
    key_buf: Vec<u8>,
    out: Vec<(F::Out, Timestamp)>,
    side: SideOutputs,
}

impl<F: KeyedCoProcessFunction> std::fmt::Debug for KeyedCoProcessOperator<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyedCoProcessOperator")
    }
}

impl<F: KeyedCoProcessFunction> KeyedCoProcessOperator<F> {
    /// Wraps `function`.
    pub fn new(function: F) -> Self {
        KeyedCoProcessOperator {
            function,
            timers: None,
            max_parallelism: weir_state::keygroup::DEFAULT_MAX_PARALLELISM,
            key_buf: Vec::new(),
            out: Vec::new(),
            side: SideOutputs::default(),
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
        crate::process::fire_timers(
            &mut self.timers,
            domain,
            upto,
            ctx,
            &mut self.out,
            &mut self.side,
            out,
            |ts, pctx| function.on_timer(ts, domain, pctx),
        )
    }
}

impl<F: KeyedCoProcessFunction> Operator for KeyedCoProcessOperator<F> {
    type In = CoInput<F::Key, F::In1, F::In2>;
    type Out = F::Out;

    fn open(&mut self, ctx: &mut OperatorContext<'_>) -> Result<()> {
        self.max_parallelism = ctx.max_parallelism;
        self.timers = Some(TimerService::open(ctx.timer_store, ctx.uid)?);
        self.function.open(&mut StateRegistry::new(ctx.store, ctx.uid))
    }

    fn process<C: Collector<F::Out>>(
        &mut self,
        record: Self::In,
        timestamp: Timestamp,
        ctx: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> Result<()> {
        let timers = self.timers.as_mut().ok_or_else(|| StateError::Misuse("co-process used before open".into()))?;
        let key = match &record {
            CoInput::First(k) => &k.key,
            CoInput::Second(k) => &k.key,
        };
        self.key_buf.clear();
        key.encode_key(&mut self.key_buf);
        let group = key_group_of_encoded(&self.key_buf, self.max_parallelism);
        let typed_key = key.clone();
        let mut pctx = ProcessContext::new(
            ctx.store,
            ctx.timer_store,
            timers,
            CurrentKey { bytes: &self.key_buf, group },
            &typed_key,
            Some(timestamp),
            ctx.watermark,
            ctx.processing_time,
            &mut self.out,
            &mut self.side,
        );
        match record {
            CoInput::First(k) => self.function.process1(k.value, &mut pctx)?,
            CoInput::Second(k) => self.function.process2(k.value, &mut pctx)?,
        }
        for (v, ts) in self.out.drain(..) {
            out.collect(v, ts);
        }
        Ok(())
    }

    fn on_watermark<C: Collector<F::Out>>(
        &mut self,
        wm: Timestamp,
        ctx: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> Result<()> {
        self.fire(TimeDomain::EventTime, wm, ctx, out)
    }

    fn on_processing_time<C: Collector<F::Out>>(&mut self, ctx: &mut OperatorContext<'_>, out: &mut C) -> Result<()> {
        let now = ctx.processing_time;
        self.fire(TimeDomain::ProcessingTime, now, ctx, out)
    }

    fn drain_side_outputs(&mut self, sink: &mut dyn FnMut(&'static str, Box<dyn std::any::Any + Send>)) {
        self.side.drain(sink)
    }
}
