//! The keyed window operator: incremental aggregation per (key, window), fired by timers.
//!
//! Each record of key `k` is assigned its windows; each window's accumulator lives in the
//! shard's store under the state key `encode(k) ++ start ++ end` (in `k`'s key group, so
//! windows move with their keys when a job is rescaled). A timer at the window's last
//! timestamp fires it: the aggregate's result (passed through the optional window function) is
//! emitted with the window's `max_timestamp` as its event time. With allowed lateness `L`, the
//! window's state is kept until `max_timestamp + L`, and a record arriving in that time updates
//! the window and fires it again at once (a late firing). A record whose windows are all past
//! that point goes to the [`LATE`] side output, and is counted, never silently dropped.
//!
//! Session windows merge: the key's [`MergingWindowSet`] is persisted with its state, and when
//! windows merge their accumulators are merged (`AggregateFunction::merge`) into the surviving
//! state window and their timers are deleted.

use std::marker::PhantomData;

use weir_state::keygroup::{KeyEncode, key_group_of_encoded};
use weir_state::states::{StateValue, ValueState};
use weir_state::store::Key;

use crate::error::{OperatorError, Result};
use crate::operator::{Collector, CurrentKey, Keyed, Operator, OperatorContext, OutputTag, Timestamp};
use crate::time::TimeDomain;
use crate::timers::TimerService;
use crate::window::assigner::WindowAssigner;
use crate::window::lateness::{AllowedLateness, cleanup_time};
use crate::window::merging::MergingWindowSet;
use crate::window::{TimeWindow, Window};

/// The side output of records that arrived after their windows were complete and cleaned up.
pub const LATE: OutputTag<LateRecord> = OutputTag::new("late");

/// A record that was too late for every window it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateRecord {
    /// The operator that dropped it.
    pub operator: &'static str,
    /// Its event time.
    pub timestamp: Timestamp,
    /// The watermark when it arrived.
    pub watermark: Timestamp,
}

/// Incremental aggregation: Flink's `AggregateFunction`.
pub trait AggregateFunction: Send + Sync + 'static {
    /// Input records.
    type In;
    /// The accumulator kept in state.
    type Acc: StateValue;
    /// The result.
    type Out;
    /// A fresh accumulator.
    fn create(&self) -> Self::Acc;
    /// Folds one record in.
    fn add(&self, acc: Self::Acc, value: Self::In) -> Self::Acc;
    /// The result of an accumulator.
    fn result(&self, acc: &Self::Acc) -> Self::Out;
    /// Combines two accumulators (session windows merging).
    fn merge(&self, a: Self::Acc, b: Self::Acc) -> Self::Acc;
}

/// `reduce` as an aggregate: the accumulator is the running reduced value.
#[derive(Debug, Clone, Copy)]
pub struct Reduce<T, F> {
    f: F,
    _t: PhantomData<fn(T)>,
}

impl<T, F> Reduce<T, F> {
    /// Reduces with `f(acc, next)`.
    pub fn new(f: F) -> Self {
        Reduce { f, _t: PhantomData }
    }
}

impl<T, F> AggregateFunction for Reduce<T, F>
where
    T: StateValue + Clone,
    F: Fn(T, T) -> T + Send + Sync + 'static,
{
    type In = T;
    type Acc = Option<T>;
    type Out = T;
    fn create(&self) -> Option<T> {
        None
    }
    fn add(&self, acc: Option<T>, value: T) -> Option<T> {
        Some(match acc {
            Some(a) => (self.f)(a, value),
            None => value,
        })
    }
    fn result(&self, acc: &Option<T>) -> T {
        // A window is only fired once it received a record, so the accumulator is set.
        acc.clone().expect("a fired window has at least one record")
    }
    fn merge(&self, a: Option<T>, b: Option<T>) -> Option<T> {
        match (a, b) {
            (Some(a), Some(b)) => Some((self.f)(a, b)),
            (a, b) => a.or(b),
        }
    }
}

/// Counts records.
#[derive(Debug, Default)]
pub struct Count<T>(PhantomData<fn(T)>);

impl<T> Clone for Count<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Count<T> {}

impl<T> Count<T> {
    /// A counter.
    pub fn new() -> Self {
        Count(PhantomData)
    }
}

impl<T: 'static> AggregateFunction for Count<T> {
    type In = T;
    type Acc = u64;
    type Out = u64;
    fn create(&self) -> u64 {
        0
    }
    fn add(&self, acc: u64, _: T) -> u64 {
        acc + 1
    }
    fn result(&self, acc: &u64) -> u64 {
        *acc
    }
    fn merge(&self, a: u64, b: u64) -> u64 {
        a + b
    }
}

/// The key and window a window timer belongs to (stored with the timer).
pub type WindowTimerKey<K> = (K, i64, i64);

/// Keyed windows with incremental aggregation and a window function.
pub struct WindowOperator<K, A: AggregateFunction, W, F> {
    assigner: W,
    aggregate: A,
    window_fn: F,
    lateness: AllowedLateness,
    uid: &'static str,
    acc: Option<ValueState<A::Acc>>,
    sessions: Option<ValueState<Vec<u8>>>,
    timers: Option<TimerService>,
    max_parallelism: u16,
    key_buf: Vec<u8>,
    state_buf: Vec<u8>,
    windows: Vec<TimeWindow>,
    /// Late records waiting to be drained, with their tag.
    late: Vec<(&'static str, Box<dyn std::any::Any + Send>)>,
    late_count: u64,
    /// Where late records themselves go (Flink's `sideOutputLateData`), instead of a
    /// [`LateRecord`] under [`LATE`].
    late_data: Option<LateData<K, A::In>>,
    _k: PhantomData<fn(K)>,
}

/// The tag of a window's late-data side output, and how a record is boxed for it.
type LateData<K, T> = (&'static str, fn(Keyed<K, T>, Timestamp) -> Box<dyn std::any::Any + Send>);

impl<K, A: AggregateFunction, W, F> std::fmt::Debug for WindowOperator<K, A, W, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowOperator").field("uid", &self.uid).field("late", &self.late_count).finish()
    }
}

impl<K, A: AggregateFunction, W, F> WindowOperator<K, A, W, F> {
    /// Windows from `assigner`, aggregated by `aggregate`, emitted through `window_fn(key,
    /// window, result)`, with `lateness` allowed.
    pub fn new(uid: &'static str, assigner: W, aggregate: A, window_fn: F, lateness: AllowedLateness) -> Self {
        WindowOperator {
            assigner,
            aggregate,
            window_fn,
            lateness,
            uid,
            acc: None,
            sessions: None,
            timers: None,
            max_parallelism: 0,
            key_buf: Vec::new(),
            state_buf: Vec::new(),
            windows: Vec::new(),
            late: Vec::new(),
            late_count: 0,
            late_data: None,
            _k: PhantomData,
        }
    }

    /// Sends each late record itself (key and value, with its timestamp) to the side output
    /// `tag` instead of a [`LateRecord`] under [`LATE`]: nothing of it is lost, and a side
    /// stream can process it (Flink's `sideOutputLateData`).
    pub fn with_late_data(mut self, tag: OutputTag<Keyed<K, A::In>>) -> Self
    where
        K: Send + 'static,
        A::In: Send + 'static,
    {
        fn boxed<K: Send + 'static, T: Send + 'static>(
            record: Keyed<K, T>,
            timestamp: Timestamp,
        ) -> Box<dyn std::any::Any + Send> {
            Box::new((record, timestamp))
        }
        self.late_data = Some((tag.name(), boxed::<K, A::In>));
        self
    }

    /// Records sent to the late side output so far.
    pub fn late_records(&self) -> u64 {
        self.late_count
    }
}

fn window_state_key(buf: &mut Vec<u8>, key: &[u8], w: &TimeWindow) {
    buf.clear();
    buf.extend_from_slice(key);
    w.start().encode_key(buf);
    w.end().encode_key(buf);
}

fn not_open() -> OperatorError {
    OperatorError::State(weir_state::StateError::Misuse("window operator used before open".into()))
}

impl<K, A, W, F, R> WindowOperator<K, A, W, F>
where
    K: KeyEncode + StateValue + Clone,
    A: AggregateFunction,
    A::Acc: Clone,
    W: WindowAssigner<Window = TimeWindow> + 'static,
    F: Fn(&K, TimeWindow, A::Out) -> R + 'static,
    R: 'static,
{
    fn domain(&self) -> TimeDomain {
        if self.assigner.is_event_time() { TimeDomain::EventTime } else { TimeDomain::ProcessingTime }
    }

    fn current_time(&self, ctx: &OperatorContext<'_>) -> Timestamp {
        match self.domain() {
            TimeDomain::EventTime => ctx.watermark,
            TimeDomain::ProcessingTime => ctx.processing_time,
        }
    }

    /// Registers the window's timers: its end (unless that already passed: a late firing
    /// happens at once instead) and, with lateness, its cleanup.
    fn register(
        &mut self,
        ctx: &mut OperatorContext<'_>,
        key: &K,
        group: weir_state::keygroup::KeyGroup,
        w: &TimeWindow,
    ) -> Result<()> {
        let domain = self.domain();
        let now = self.current_time(ctx);
        let timers = self.timers.as_mut().ok_or_else(not_open)?;
        window_state_key(&mut self.state_buf, &self.key_buf, w);
        let current = CurrentKey { bytes: &self.state_buf, group };
        let typed: WindowTimerKey<K> = (key.clone(), w.start(), w.end());
        // In event time a window already past fires at once instead (a late firing); in
        // processing time its timer fires at the next tick.
        if w.max_timestamp() > now || domain == TimeDomain::ProcessingTime {
            timers.register(ctx.timer_store, domain, current, &typed, w.max_timestamp())?;
        }
        if self.lateness.ms() > 0 {
            timers.register(ctx.timer_store, domain, current, &typed, cleanup_time(w, self.lateness))?;
        }
        Ok(())
    }

    fn delete_timers(
        &mut self,
        ctx: &mut OperatorContext<'_>,
        group: weir_state::keygroup::KeyGroup,
        w: &TimeWindow,
    ) -> Result<()> {
        let domain = self.domain();
        let timers = self.timers.as_mut().ok_or_else(not_open)?;
        window_state_key(&mut self.state_buf, &self.key_buf, w);
        let current = CurrentKey { bytes: &self.state_buf, group };
        timers.delete(ctx.timer_store, domain, current, w.max_timestamp())?;
        if self.lateness.ms() > 0 {
            timers.delete(ctx.timer_store, domain, current, cleanup_time(w, self.lateness))?;
        }
        Ok(())
    }

    fn load_acc(
        &mut self,
        ctx: &OperatorContext<'_>,
        group: weir_state::keygroup::KeyGroup,
        state_window: &TimeWindow,
    ) -> Result<Option<A::Acc>> {
        let acc = self.acc.ok_or_else(not_open)?;
        window_state_key(&mut self.state_buf, &self.key_buf, state_window);
        Ok(acc.get_owned(ctx.store, Key { group, bytes: &self.state_buf })?)
    }

    fn store_acc(
        &mut self,
        ctx: &mut OperatorContext<'_>,
        group: weir_state::keygroup::KeyGroup,
        state_window: &TimeWindow,
        value: Option<&A::Acc>,
    ) -> Result<()> {
        let acc = self.acc.ok_or_else(not_open)?;
        window_state_key(&mut self.state_buf, &self.key_buf, state_window);
        let key = Key { group, bytes: &self.state_buf };
        match value {
            Some(v) => acc.put(ctx.store, key, v)?,
            None => {
                acc.delete(ctx.store, key)?;
            }
        }
        Ok(())
    }

    fn load_sessions(
        &self,
        ctx: &OperatorContext<'_>,
        group: weir_state::keygroup::KeyGroup,
    ) -> Result<MergingWindowSet> {
        let sessions = self.sessions.ok_or_else(not_open)?;
        match sessions.get(ctx.store, Key { group, bytes: &self.key_buf })? {
            None => Ok(MergingWindowSet::new()),
            Some(bytes) => MergingWindowSet::from_bytes(bytes.as_slice()).map_err(|e| {
                OperatorError::State(weir_state::StateError::corrupt(
                    ctx.store.dir(),
                    0,
                    format!("session windows of {}: {e}", self.uid),
                ))
            }),
        }
    }

    fn store_sessions(
        &self,
        ctx: &mut OperatorContext<'_>,
        group: weir_state::keygroup::KeyGroup,
        set: &MergingWindowSet,
    ) -> Result<()> {
        let sessions = self.sessions.ok_or_else(not_open)?;
        let key = Key { group, bytes: &self.key_buf };
        if set.is_empty() {
            sessions.delete(ctx.store, key)?;
        } else {
            sessions.put(ctx.store, key, &set.to_bytes())?;
        }
        Ok(())
    }

    fn emit<C: Collector<R>>(&self, key: &K, w: TimeWindow, acc: &A::Acc, out: &mut C) {
        out.collect((self.window_fn)(key, w, self.aggregate.result(acc)), w.max_timestamp());
    }

    fn on_time<C: Collector<R>>(&mut self, ctx: &mut OperatorContext<'_>, upto: Timestamp, out: &mut C) -> Result<()> {
        let domain = self.domain();
        loop {
            let timers = self.timers.as_mut().ok_or_else(not_open)?;
            let Some((timer, (key, start, end))) =
                timers.pop_due::<WindowTimerKey<K>>(ctx.timer_store, domain, upto)?
            else {
                return Ok(());
            };
            let w = TimeWindow::new(start, end);
            self.key_buf.clear();
            key.encode_key(&mut self.key_buf);
            let group = timer.group;
            let merging = self.assigner.is_merging();
            let mut set = if merging { Some(self.load_sessions(ctx, group)?) } else { None };
            let state_window = match &set {
                Some(s) => match s.state_window(&w) {
                    Some(sw) => sw,
                    None => continue, // merged away: its timers were deleted, nothing to do
                },
                None => w,
            };
            let is_fire = timer.timestamp == w.max_timestamp();
            let is_cleanup = timer.timestamp == cleanup_time(&w, self.lateness);
            if is_fire && let Some(acc) = self.load_acc(ctx, group, &state_window)? {
                self.emit(&key, w, &acc, out);
            }
            if is_cleanup {
                self.store_acc(ctx, group, &state_window, None)?;
                if let Some(s) = set.as_mut() {
                    s.retire_window(&w);
                    self.store_sessions(ctx, group, s)?;
                }
            }
        }
    }
}

impl<K, A, W, F, R> Operator for WindowOperator<K, A, W, F>
where
    K: KeyEncode + StateValue + Clone,
    A: AggregateFunction,
    A::Acc: Clone,
    A::In: Clone,
    W: WindowAssigner<Window = TimeWindow> + 'static,
    F: Fn(&K, TimeWindow, A::Out) -> R + 'static,
    R: 'static,
{
    type In = Keyed<K, A::In>;
    type Out = R;

    fn open(&mut self, ctx: &mut OperatorContext<'_>) -> Result<()> {
        self.max_parallelism = ctx.max_parallelism;
        self.acc = Some(ValueState::register(ctx.store, &ctx.state_name("window-acc"))?);
        self.sessions = Some(ValueState::register(ctx.store, &ctx.state_name("window-sessions"))?);
        self.timers = Some(TimerService::open(ctx.timer_store, ctx.uid)?);
        Ok(())
    }

    fn process<C: Collector<R>>(
        &mut self,
        record: Keyed<K, A::In>,
        ts: Timestamp,
        ctx: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> Result<()> {
        self.key_buf.clear();
        record.key.encode_key(&mut self.key_buf);
        let group = key_group_of_encoded(&self.key_buf, self.max_parallelism);
        let now = self.current_time(ctx);
        let mut windows = std::mem::take(&mut self.windows);
        windows.clear();
        self.assigner.assign_windows(ts, ctx.processing_time, &mut windows);
        // Windows still accepting records: their cleanup time is ahead of the current time. In
        // processing time a record always falls in the window of now, which is never late (as
        // in Flink), even in the last millisecond of the window (its timer fires next tick).
        let lateness = self.lateness;
        let event_time = self.domain() == TimeDomain::EventTime;
        let live: Vec<TimeWindow> =
            windows.iter().copied().filter(|w| !event_time || cleanup_time(w, lateness) > now).collect();
        self.windows = windows;
        if live.is_empty() {
            if !self.windows.is_empty() {
                self.late_count += 1;
                self.late.push(match self.late_data {
                    Some((tag, boxed)) => (tag, boxed(record, ts)),
                    None => {
                        let late = LateRecord { operator: self.uid, timestamp: ts, watermark: ctx.watermark };
                        (LATE.name(), Box::new((late, ts)))
                    }
                });
            }
            return Ok(());
        }
        let Keyed { key, value } = record;
        let mut value = Some(value);
        let last = live.len() - 1;
        if self.assigner.is_merging() {
            let mut set = self.load_sessions(ctx, group)?;
            for (i, w) in live.into_iter().enumerate() {
                let added = set.add_window(w);
                let mut acc = self.load_acc(ctx, group, &added.state_window)?;
                if let Some(merge) = &added.merge {
                    for merged in &merge.merged_windows {
                        self.delete_timers(ctx, group, merged)?;
                    }
                    for sw in &merge.merged_state_windows {
                        if let Some(other) = self.load_acc(ctx, group, sw)? {
                            acc = Some(match acc {
                                Some(a) => self.aggregate.merge(a, other),
                                None => other,
                            });
                        }
                        self.store_acc(ctx, group, sw, None)?;
                    }
                }
                let acc = acc.unwrap_or_else(|| self.aggregate.create());
                let Some(v) = (if i == last { value.take() } else { None }) else {
                    continue;
                };
                let acc = self.aggregate.add(acc, v);
                self.store_acc(ctx, group, &added.state_window, Some(&acc))?;
                self.register(ctx, &key, group, &added.window)?;
                if event_time && added.window.max_timestamp() <= now {
                    self.emit(&key, added.window, &acc, out);
                }
            }
            self.store_sessions(ctx, group, &set)?;
        } else {
            for (i, w) in live.iter().enumerate() {
                let acc = self.load_acc(ctx, group, w)?.unwrap_or_else(|| self.aggregate.create());
                // Non-merging assigners may put one record in several windows: each gets a copy.
                let v = if i == last { value.take() } else { value.clone() };
                let Some(v) = v else { continue };
                let acc = self.aggregate.add(acc, v);
                self.store_acc(ctx, group, w, Some(&acc))?;
                self.register(ctx, &key, group, w)?;
                if event_time && w.max_timestamp() <= now {
                    // Late but within the allowed lateness: fire again with the update.
                    self.emit(&key, *w, &acc, out);
                }
            }
        }
        Ok(())
    }

    fn on_watermark<C: Collector<R>>(
        &mut self,
        watermark: Timestamp,
        ctx: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> Result<()> {
        if self.domain() == TimeDomain::EventTime {
            self.on_time(ctx, watermark, out)?;
        }
        Ok(())
    }

    fn on_processing_time<C: Collector<R>>(&mut self, ctx: &mut OperatorContext<'_>, out: &mut C) -> Result<()> {
        if self.domain() == TimeDomain::ProcessingTime {
            // A window fires once the clock is past its last millisecond (as Flink delays a
            // processing-time timer by 1 ms): a record arriving during that millisecond still
            // falls in it, and must not start a second firing of the same window.
            let upto = ctx.processing_time.saturating_sub(1);
            self.on_time(ctx, upto, out)?;
        }
        Ok(())
    }

    fn drain_side_outputs(&mut self, sink: &mut dyn FnMut(&'static str, Box<dyn std::any::Any + Send>)) {
        for (tag, record) in self.late.drain(..) {
            sink(tag, record);
        }
    }
}

/// Global windows with a count trigger: every `size` records of a key fire (and purge) one
/// window with their aggregate. A key's incomplete window at the end of input never fires, as
/// in Flink (a global window has no end).
pub struct CountWindowOperator<K, A: AggregateFunction, F> {
    size: u64,
    aggregate: A,
    window_fn: F,
    state: Option<ValueState<(u64, A::Acc)>>,
    max_parallelism: u16,
    key_buf: Vec<u8>,
    _k: PhantomData<fn(K)>,
}

impl<K, A: AggregateFunction, F> std::fmt::Debug for CountWindowOperator<K, A, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountWindowOperator").field("size", &self.size).finish()
    }
}

impl<K, A: AggregateFunction, F> CountWindowOperator<K, A, F> {
    /// Windows of `size` records per key.
    pub fn new(size: u64, aggregate: A, window_fn: F) -> Self {
        CountWindowOperator {
            size: size.max(1),
            aggregate,
            window_fn,
            state: None,
            max_parallelism: 0,
            key_buf: Vec::new(),
            _k: PhantomData,
        }
    }
}

impl<K, A, F, R> Operator for CountWindowOperator<K, A, F>
where
    K: KeyEncode + 'static,
    A: AggregateFunction,
    (u64, A::Acc): StateValue,
    F: Fn(&K, A::Out) -> R + 'static,
    R: 'static,
{
    type In = Keyed<K, A::In>;
    type Out = R;

    fn open(&mut self, ctx: &mut OperatorContext<'_>) -> Result<()> {
        self.max_parallelism = ctx.max_parallelism;
        self.state = Some(ValueState::register(ctx.store, &ctx.state_name("count-window"))?);
        Ok(())
    }

    fn process<C: Collector<R>>(
        &mut self,
        record: Keyed<K, A::In>,
        ts: Timestamp,
        ctx: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> Result<()> {
        let state = self.state.ok_or_else(not_open)?;
        self.key_buf.clear();
        record.key.encode_key(&mut self.key_buf);
        let key = Key { group: key_group_of_encoded(&self.key_buf, self.max_parallelism), bytes: &self.key_buf };
        let (n, acc) = state.get_owned(ctx.store, key)?.unwrap_or_else(|| (0, self.aggregate.create()));
        let acc = self.aggregate.add(acc, record.value);
        if n + 1 >= self.size {
            out.collect((self.window_fn)(&record.key, self.aggregate.result(&acc)), ts);
            state.delete(ctx.store, key)?;
        } else {
            state.put(ctx.store, key, &(n + 1, acc))?;
        }
        Ok(())
    }
}
