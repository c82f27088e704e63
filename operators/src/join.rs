//! Joins of two keyed streams, as [`KeyedCoProcessFunction`]s.
//!
//! - [`WindowJoin`]: records of both sides with the same key in the same event-time window
//!   (tumbling or sliding) are paired when the window completes.
//! - [`IntervalJoin`]: a left record at `t` pairs with every right record of its key at
//!   `t + lower ..= t + upper` (Flink's interval join), as soon as both are there.
//!
//! Both keep their buffers in keyed list state (checkpointed and rescaled with the key) and
//! clear them by event-time timers. A record that arrives when nothing it could still join with
//! is kept (its windows are complete, or the watermark is past its interval) goes to the
//! [`LATE`] side output: never silently dropped.

use std::marker::PhantomData;

use weir_state::keygroup::KeyEncode;
use weir_state::states::{ListState, StateValue};
use weir_state::store::Key;

use crate::coprocess::KeyedCoProcessFunction;
use crate::error::Result;
use crate::operator::Timestamp;
use crate::process::{ProcessContext, StateRegistry};
use crate::timers::TimeDomain;
use crate::window::assigner::{SlidingWindows, WindowAssigner};
use crate::window::operator::{LATE, LateRecord};
use crate::window::{TimeWindow, Window};

fn not_open() -> crate::OperatorError {
    weir_state::StateError::Misuse("join used before open".into()).into()
}

fn composite(buf: &mut Vec<u8>, key: &[u8], tag: u8, a: i64, b: i64) {
    buf.clear();
    buf.extend_from_slice(key);
    buf.push(tag);
    a.encode_key(buf);
    b.encode_key(buf);
}

/// Joins both sides per key and event-time window; emits `f(key, left, right)` for every pair
/// with the window's last timestamp as event time.
pub struct WindowJoin<K, A, B, F> {
    uid: &'static str,
    windows: SlidingWindows,
    size_ms: i64,
    f: F,
    left: Option<ListState<A>>,
    right: Option<ListState<B>>,
    buf: Vec<u8>,
    assigned: Vec<TimeWindow>,
    _k: PhantomData<fn(K)>,
}

impl<K, A, B, F> WindowJoin<K, A, B, F> {
    /// Windows of `size_ms` starting every `slide_ms` (`slide_ms == size_ms`: tumbling).
    pub fn new(uid: &'static str, size_ms: i64, slide_ms: i64, f: F) -> Self {
        WindowJoin {
            uid,
            windows: SlidingWindows::event_time(size_ms, slide_ms),
            size_ms,
            f,
            left: None,
            right: None,
            buf: Vec::new(),
            assigned: Vec::new(),
            _k: PhantomData,
        }
    }
}

impl<K, A, B, F, R> WindowJoin<K, A, B, F>
where
    K: KeyEncode + StateValue + Clone,
    A: StateValue + Clone,
    B: StateValue + Clone,
    F: Fn(&K, &A, &B) -> R + 'static,
    R: 'static,
{
    fn add<V: StateValue + Clone>(
        &mut self,
        list: Option<ListState<V>>,
        tag: u8,
        value: V,
        ctx: &mut ProcessContext<'_, K, R>,
    ) -> Result<()> {
        let list = list.ok_or_else(not_open)?;
        let ts = ctx.timestamp().unwrap_or(Timestamp::MIN);
        self.assigned.clear();
        self.windows.assign_windows(ts, ctx.processing_time(), &mut self.assigned);
        let watermark = ctx.watermark();
        let key = ctx.state_key();
        let mut added = false;
        for w in std::mem::take(&mut self.assigned) {
            if w.max_timestamp() <= watermark {
                continue;
            }
            composite(&mut self.buf, key.bytes, tag, w.start(), w.end());
            list.add(ctx.store_mut(), Key { group: key.group, bytes: &self.buf }, &value)?;
            ctx.register_event_timer(w.max_timestamp())?;
            added = true;
        }
        if !added {
            ctx.side_output(LATE, LateRecord { operator: self.uid, timestamp: ts, watermark });
        }
        Ok(())
    }
}

impl<K, A, B, F, R> KeyedCoProcessFunction for WindowJoin<K, A, B, F>
where
    K: KeyEncode + StateValue + Clone,
    A: StateValue + Clone,
    B: StateValue + Clone,
    F: Fn(&K, &A, &B) -> R + 'static,
    R: 'static,
{
    type Key = K;
    type In1 = A;
    type In2 = B;
    type Out = R;

    fn open(&mut self, states: &mut StateRegistry<'_>) -> Result<()> {
        self.left = Some(states.list("join-left")?);
        self.right = Some(states.list("join-right")?);
        Ok(())
    }

    fn process1(&mut self, value: A, ctx: &mut ProcessContext<'_, K, R>) -> Result<()> {
        self.add(self.left, 0, value, ctx)
    }

    fn process2(&mut self, value: B, ctx: &mut ProcessContext<'_, K, R>) -> Result<()> {
        self.add(self.right, 1, value, ctx)
    }

    fn on_timer(&mut self, ts: Timestamp, _: TimeDomain, ctx: &mut ProcessContext<'_, K, R>) -> Result<()> {
        let (left, right) = (self.left.ok_or_else(not_open)?, self.right.ok_or_else(not_open)?);
        // Every window of this assigner has the same size, so its end identifies it.
        let w = TimeWindow::new(ts + 1 - self.size_ms, ts + 1);
        let key = ctx.state_key();
        composite(&mut self.buf, key.bytes, 0, w.start(), w.end());
        let left_key = self.buf.clone();
        composite(&mut self.buf, key.bytes, 1, w.start(), w.end());
        let right_key = self.buf.clone();
        let lk = Key { group: key.group, bytes: &left_key };
        let rk = Key { group: key.group, bytes: &right_key };
        let lefts: Vec<A> = left
            .iter(ctx.store(), lk)?
            .map(|v| {
                v.and_then(|a| {
                    rkyv::deserialize::<A, rkyv::rancor::Error>(a)
                        .map_err(|e| weir_state::StateError::Misuse(e.to_string()))
                })
            })
            .collect::<std::result::Result<_, _>>()?;
        let rights: Vec<B> = right
            .iter(ctx.store(), rk)?
            .map(|v| {
                v.and_then(|b| {
                    rkyv::deserialize::<B, rkyv::rancor::Error>(b)
                        .map_err(|e| weir_state::StateError::Misuse(e.to_string()))
                })
            })
            .collect::<std::result::Result<_, _>>()?;
        let k = ctx.key().clone();
        for a in &lefts {
            for b in &rights {
                ctx.output_at((self.f)(&k, a, b), w.max_timestamp());
            }
        }
        left.clear(ctx.store_mut(), lk)?;
        right.clear(ctx.store_mut(), rk)?;
        Ok(())
    }
}

/// Joins a left record at `t` with every right record of its key at `t + lower ..= t + upper`;
/// emits `f(key, left, right)` at event time `max(t_left, t_right)`.
pub struct IntervalJoin<K, A, B, F> {
    uid: &'static str,
    lower_ms: i64,
    upper_ms: i64,
    bucket_ms: i64,
    f: F,
    left: Option<ListState<(i64, A)>>,
    right: Option<ListState<(i64, B)>>,
    buf: Vec<u8>,
    _k: PhantomData<fn(K)>,
}

impl<K, A, B, F> IntervalJoin<K, A, B, F> {
    /// Pairs with right records in `[t + lower_ms, t + upper_ms]` (`lower_ms <= upper_ms`).
    pub fn new(uid: &'static str, lower_ms: i64, upper_ms: i64, f: F) -> Self {
        let (lower_ms, upper_ms) = (lower_ms.min(upper_ms), lower_ms.max(upper_ms));
        IntervalJoin {
            uid,
            lower_ms,
            upper_ms,
            bucket_ms: (upper_ms - lower_ms).max(1),
            f,
            left: None,
            right: None,
            buf: Vec::new(),
            _k: PhantomData,
        }
    }

    fn bucket(&self, ts: i64) -> i64 {
        ts.div_euclid(self.bucket_ms)
    }
}

/// A record of one side arrives at the interval join: it is paired with the buffered records of
/// the other side whose time lies in `[t + range.0, t + range.1]`, then buffered itself until
/// the watermark passes its bucket's end plus `keep_ms`. Late records go to the side output.
#[allow(clippy::too_many_arguments)]
fn arrive<K, V, O, R>(
    buf: &mut Vec<u8>,
    bucket_ms: i64,
    uid: &'static str,
    ctx: &mut ProcessContext<'_, K, R>,
    value: V,
    (own, own_tag): (ListState<(i64, V)>, u8),
    (other, other_tag): (ListState<(i64, O)>, u8),
    range: (i64, i64),
    keep_ms: i64,
    emit: impl Fn(&K, &V, &O) -> R,
) -> Result<()>
where
    K: KeyEncode + StateValue + Clone,
    V: StateValue,
    O: StateValue,
    (i64, V): StateValue,
    (i64, O): StateValue,
{
    let t = ctx.timestamp().unwrap_or(Timestamp::MIN);
    let watermark = ctx.watermark();
    if t.saturating_add(keep_ms) <= watermark {
        ctx.side_output(LATE, LateRecord { operator: uid, timestamp: t, watermark });
        return Ok(());
    }
    let key = ctx.state_key();
    let k = ctx.key().clone();
    let (from, to) = (t.saturating_add(range.0), t.saturating_add(range.1));
    for bucket in from.div_euclid(bucket_ms)..=to.div_euclid(bucket_ms) {
        composite(buf, key.bytes, other_tag, bucket, 0);
        for (ts, o) in load(other, ctx.store(), Key { group: key.group, bytes: buf })? {
            if (from..=to).contains(&ts) {
                ctx.output_at(emit(&k, &value, &o), t.max(ts));
            }
        }
    }
    let bucket = t.div_euclid(bucket_ms);
    composite(buf, key.bytes, own_tag, bucket, 0);
    own.add(ctx.store_mut(), Key { group: key.group, bytes: buf }, &(t, value))?;
    let bucket_end = bucket.saturating_mul(bucket_ms).saturating_add(bucket_ms - 1);
    ctx.register_event_timer(bucket_end.saturating_add(keep_ms))
}

fn load<V: StateValue>(
    list: ListState<(i64, V)>,
    store: &weir_state::StateStore,
    key: Key<'_>,
) -> Result<Vec<(i64, V)>> {
    list.iter(store, key)?
        .map(|v| {
            v.and_then(|x| {
                rkyv::deserialize::<(i64, V), rkyv::rancor::Error>(x)
                    .map_err(|e| weir_state::StateError::Misuse(e.to_string()))
            })
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(Into::into)
}

impl<K, A, B, F, R> KeyedCoProcessFunction for IntervalJoin<K, A, B, F>
where
    K: KeyEncode + StateValue + Clone,
    A: StateValue + Clone,
    B: StateValue + Clone,
    (i64, A): StateValue,
    (i64, B): StateValue,
    F: Fn(&K, &A, &B) -> R + 'static,
    R: 'static,
{
    type Key = K;
    type In1 = A;
    type In2 = B;
    type Out = R;

    fn open(&mut self, states: &mut StateRegistry<'_>) -> Result<()> {
        self.left = Some(states.list("interval-left")?);
        self.right = Some(states.list("interval-right")?);
        Ok(())
    }

    fn process1(&mut self, a: A, ctx: &mut ProcessContext<'_, K, R>) -> Result<()> {
        let (left, right) = (self.left.ok_or_else(not_open)?, self.right.ok_or_else(not_open)?);
        let (lower, upper) = (self.lower_ms, self.upper_ms);
        let f = &self.f;
        // A left record at t pairs with right records in [t + lower, t + upper]; no right record
        // that can still arrive pairs with it once the watermark passes t + upper.
        arrive(
            &mut self.buf,
            self.bucket_ms,
            self.uid,
            ctx,
            a,
            (left, 0),
            (right, 1),
            (lower, upper),
            upper,
            |k, a, b| f(k, a, b),
        )
    }

    fn process2(&mut self, b: B, ctx: &mut ProcessContext<'_, K, R>) -> Result<()> {
        let (left, right) = (self.left.ok_or_else(not_open)?, self.right.ok_or_else(not_open)?);
        let (lower, upper) = (self.lower_ms, self.upper_ms);
        let f = &self.f;
        // A right record at s pairs with left records in [s - upper, s - lower]; no left record
        // that can still arrive pairs with it once the watermark passes s - lower.
        arrive(
            &mut self.buf,
            self.bucket_ms,
            self.uid,
            ctx,
            b,
            (right, 1),
            (left, 0),
            (-upper, -lower),
            -lower,
            |k, b, a| f(k, a, b),
        )
    }

    fn on_timer(&mut self, ts: Timestamp, _: TimeDomain, ctx: &mut ProcessContext<'_, K, R>) -> Result<()> {
        let (left, right) = (self.left.ok_or_else(not_open)?, self.right.ok_or_else(not_open)?);
        let key = ctx.state_key();
        // The timer is a left bucket's end + upper, or a right bucket's end - lower (or both).
        let left_end = ts.saturating_sub(self.upper_ms);
        if (left_end + 1).rem_euclid(self.bucket_ms) == 0 {
            let bucket = self.bucket(left_end);
            composite(&mut self.buf, key.bytes, 0, bucket, 0);
            left.clear(ctx.store_mut(), Key { group: key.group, bytes: &self.buf })?;
        }
        let right_end = ts.saturating_add(self.lower_ms);
        if (right_end + 1).rem_euclid(self.bucket_ms) == 0 {
            let bucket = self.bucket(right_end);
            composite(&mut self.buf, key.bytes, 1, bucket, 0);
            right.clear(ctx.store_mut(), Key { group: key.group, bytes: &self.buf })?;
        }
        Ok(())
    }
}
