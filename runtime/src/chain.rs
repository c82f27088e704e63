//! Operator chains: the operators between two exchanges, composed at compile time.
//!
//! A chain is a stack of [`Node`]s, each holding the next one by value, so a record passes
//! down the chain by direct (inlinable) calls: no queue, no allocation, no dynamic dispatch.
//! Stateless steps (`map`, `filter`, `flat_map`) are fused nodes that never touch the store.
//! A stateful operator borrows the shard's store only for its own call, emits into a reused
//! buffer, and then hands the buffered records to the next node, so every operator of the
//! chain can borrow the one store in turn.
//!
//! [`ChainSpec`] describes a chain in the job builder (`Clone + Send + Sync`), and
//! [`ChainSpec::build`] instantiates it on each shard in front of the chain's terminal node
//! (an exchange, a sink). The stage processes each batch inside one `catch_unwind`; each node
//! holds a [`PanicSite`] around its user code, so a panic is reported with the operator and
//! shard that raised it, at no cost when nothing panics.

use std::cell::Cell;

use weir_operators::operator::{Collector, Operator, OperatorContext, Timestamp};
use weir_operators::operator_state::{OperatorState, OperatorStateSnapshot};
use weir_state::StateStore;

use crate::checkpointing::OperatorStateEntry;
use crate::error::{Result, RuntimeError};

/// What a node sees of its shard while handling one element.
pub struct Env<'a> {
    /// The stage's state store.
    pub store: &'a mut StateStore,
    /// The stage's timer store (kept apart so a restore rebuilds timers from timers only).
    pub timer_store: &'a mut StateStore,
    /// This shard.
    pub shard: usize,
    /// Number of shards.
    pub parallelism: usize,
    /// Number of key groups of the job.
    pub max_parallelism: u16,
    /// Processing time now, epoch milliseconds.
    pub now: Timestamp,
    /// Side outputs emitted by operators of this chain, by tag name.
    pub side: &'a mut dyn FnMut(&'static str, Box<dyn std::any::Any + Send>),
    /// The uid of the operator whose code panicked, set while unwinding (see [`PanicSite`]).
    pub current: &'a Cell<Option<&'static str>>,
    /// Work that makes what sinks pre-committed at the current barrier durable (see
    /// [`crate::sink::SinkWriter::take_sync`]), collected by the stage with its snapshot.
    pub syncs: &'a mut Vec<crate::sink::SyncWork>,
    /// The operator state restored for the chain's operators; each takes its own when it
    /// opens.
    pub restored: &'a mut RestoredOperatorState,
    /// The operator state the chain's operators wrote at the current barrier (see
    /// [`Operator::snapshot_state`]), collected by the stage with its snapshot.
    pub operator_state: &'a mut Vec<OperatorStateEntry>,
}

/// The operator state a stage instance restored, by operator uid, until each operator takes
/// its own at its `open` (it is not kept after: an operator holds what it restored itself).
#[derive(Debug, Default)]
pub struct RestoredOperatorState {
    by_uid: Vec<(&'static str, OperatorState)>,
}

impl RestoredOperatorState {
    /// Operator `uid`'s restored state (replacing any given before).
    pub fn insert(&mut self, uid: &'static str, state: OperatorState) {
        self.by_uid.retain(|(u, _)| *u != uid);
        self.by_uid.push((uid, state));
    }

    /// Takes operator `uid`'s restored state (empty if there is none, or it was taken).
    pub fn take(&mut self, uid: &str) -> OperatorState {
        match self.by_uid.iter().position(|(u, _)| *u == uid) {
            Some(i) => self.by_uid.swap_remove(i).1,
            None => OperatorState::new(),
        }
    }
}

/// Names the operator a panic came from, at no cost when nothing panics: [`PanicSite::run`]
/// runs user code with a guard that is forgotten when the code returns, and dropped (recording
/// its uid, unless a node closer to the panic already did) only while unwinding. So the normal
/// path neither stores the running operator nor asks whether the thread is panicking.
pub struct PanicSite<'a> {
    cell: &'a Cell<Option<&'static str>>,
    uid: &'static str,
}

impl<'a> PanicSite<'a> {
    /// Runs `f` as operator `uid`: a panic out of `f` records `uid` in `cell` (if it is empty).
    #[inline(always)]
    pub fn run<R>(cell: &'a Cell<Option<&'static str>>, uid: &'static str, f: impl FnOnce() -> R) -> R {
        let site = PanicSite { cell, uid };
        let out = f();
        std::mem::forget(site);
        out
    }
}

impl Drop for PanicSite<'_> {
    /// Runs only while unwinding out of [`PanicSite::run`].
    #[cold]
    fn drop(&mut self) {
        if self.cell.get().is_none() {
            self.cell.set(Some(self.uid));
        }
    }
}

/// One step of a chain, receiving the elements of a stream.
pub trait Node<T>: 'static {
    /// One record.
    fn record(&mut self, env: &mut Env<'_>, value: T, timestamp: Timestamp) -> Result<()>;
    /// Event time advanced to `watermark`.
    fn watermark(&mut self, env: &mut Env<'_>, watermark: Timestamp) -> Result<()>;
    /// The input became idle (true: leave it out of event time downstream) or active again.
    fn idle(&mut self, env: &mut Env<'_>, idle: bool) -> Result<()>;
    /// Processing time advanced to `env.now`.
    fn tick(&mut self, env: &mut Env<'_>) -> Result<()>;
    /// Checkpoint barrier `id`: every record before it has been handed to this node. Operators
    /// keep their keyed state in the stage's stores and write their operator state into
    /// [`Env::operator_state`]; then a node forwards the barrier, and the terminal sends it
    /// downstream (or a two-phase sink pre-commits).
    fn barrier(&mut self, env: &mut Env<'_>, id: u64) -> Result<()>;
    /// Checkpoint `id` is complete (its manifest is durable): two-phase sinks commit.
    fn committed(&mut self, env: &mut Env<'_>, id: u64) -> Result<()>;
    /// The input ended (after the final watermark): flush.
    fn end(&mut self, env: &mut Env<'_>) -> Result<()>;
}

/// Turns a caught panic payload into a message.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// The control elements a stateless node passes straight to the next node.
macro_rules! forward_control {
    () => {
        fn watermark(&mut self, env: &mut Env<'_>, wm: Timestamp) -> Result<()> {
            self.next.watermark(env, wm)
        }
        fn idle(&mut self, env: &mut Env<'_>, idle: bool) -> Result<()> {
            self.next.idle(env, idle)
        }
        fn tick(&mut self, env: &mut Env<'_>) -> Result<()> {
            self.next.tick(env)
        }
        fn barrier(&mut self, env: &mut Env<'_>, id: u64) -> Result<()> {
            self.next.barrier(env, id)
        }
        fn committed(&mut self, env: &mut Env<'_>, id: u64) -> Result<()> {
            self.next.committed(env, id)
        }
        fn end(&mut self, env: &mut Env<'_>) -> Result<()> {
            self.next.end(env)
        }
    };
}

/// A fused `map`.
pub struct MapNode<F, N> {
    pub(crate) uid: &'static str,
    pub(crate) f: F,
    pub(crate) next: N,
}

impl<In, Out, F, N> Node<In> for MapNode<F, N>
where
    F: FnMut(In) -> Out + 'static,
    N: Node<Out>,
{
    #[inline]
    fn record(&mut self, env: &mut Env<'_>, value: In, ts: Timestamp) -> Result<()> {
        let out = PanicSite::run(env.current, self.uid, || (self.f)(value));
        self.next.record(env, out, ts)
    }
    forward_control!();
}

/// A fused `filter`.
pub struct FilterNode<F, N> {
    pub(crate) uid: &'static str,
    pub(crate) f: F,
    pub(crate) next: N,
}

impl<T, F, N> Node<T> for FilterNode<F, N>
where
    F: FnMut(&T) -> bool + 'static,
    N: Node<T>,
{
    #[inline]
    fn record(&mut self, env: &mut Env<'_>, value: T, ts: Timestamp) -> Result<()> {
        let keep = PanicSite::run(env.current, self.uid, || (self.f)(&value));
        if keep {
            self.next.record(env, value, ts)?;
        }
        Ok(())
    }
    forward_control!();
}

/// A fused `flat_map`: the function returns an iterator of outputs.
pub struct FlatMapNode<F, N> {
    pub(crate) uid: &'static str,
    pub(crate) f: F,
    pub(crate) next: N,
}

impl<In, I, F, N> Node<In> for FlatMapNode<F, N>
where
    F: FnMut(In) -> I + 'static,
    I: IntoIterator,
    N: Node<I::Item>,
{
    #[inline]
    fn record(&mut self, env: &mut Env<'_>, value: In, ts: Timestamp) -> Result<()> {
        let current = env.current;
        let mut outputs = PanicSite::run(current, self.uid, || (self.f)(value).into_iter());
        loop {
            let next = PanicSite::run(current, self.uid, || outputs.next());
            match next {
                Some(v) => self.next.record(env, v, ts)?,
                None => return Ok(()),
            }
        }
    }
    forward_control!();
}

/// Buffers an operator's output for the next node.
struct Buffer<T>(Vec<(T, Timestamp)>);

impl<T> Collector<T> for Buffer<T> {
    #[inline]
    fn collect(&mut self, value: T, timestamp: Timestamp) {
        self.0.push((value, timestamp));
    }
}

/// A stateful [`Operator`] in a chain.
pub struct OpNode<O: Operator, N> {
    pub(crate) uid: &'static str,
    pub(crate) op: O,
    pub(crate) next: N,
    pub(crate) watermark: Timestamp,
    pub(crate) opened: bool,
    buf: Buffer<O::Out>,
}

impl<O: Operator, N> OpNode<O, N> {
    /// `op` in front of `next`.
    pub fn new(uid: &'static str, op: O, next: N) -> Self {
        OpNode { uid, op, next, watermark: Timestamp::MIN, opened: false, buf: Buffer(Vec::new()) }
    }
}

impl<O: Operator, N: Node<O::Out>> OpNode<O, N> {
    /// Opens the operator (once, before its first call), handing it the operator state
    /// restored for it. Kept off the per-record path.
    #[cold]
    #[inline(never)]
    fn open(&mut self, env: &mut Env<'_>) -> Result<()> {
        let (uid, shard) = (self.uid, env.shard);
        let restored = env.restored.take(uid);
        let mut ctx = OperatorContext {
            store: env.store,
            timer_store: env.timer_store,
            shard,
            parallelism: env.parallelism,
            max_parallelism: env.max_parallelism,
            uid,
            processing_time: env.now,
            watermark: self.watermark,
            operator_state: &restored,
        };
        let op = &mut self.op;
        PanicSite::run(env.current, uid, || op.open(&mut ctx)).map_err(|source| RuntimeError::Operator {
            operator: uid.to_owned(),
            shard,
            source,
        })?;
        self.opened = true;
        Ok(())
    }

    fn call(
        &mut self,
        env: &mut Env<'_>,
        f: impl FnOnce(&mut O, &mut OperatorContext<'_>, &mut Buffer<O::Out>) -> weir_operators::Result<()>,
    ) -> Result<()> {
        if !self.opened {
            self.open(env)?;
        }
        let (uid, shard) = (self.uid, env.shard);
        let mut ctx = OperatorContext {
            store: env.store,
            timer_store: env.timer_store,
            shard,
            parallelism: env.parallelism,
            max_parallelism: env.max_parallelism,
            uid,
            processing_time: env.now,
            watermark: self.watermark,
            // What was restored is handed over once, to `open`.
            operator_state: OperatorState::empty(),
        };
        let (op, buf) = (&mut self.op, &mut self.buf);
        let side = &mut *env.side;
        PanicSite::run(env.current, uid, || {
            f(op, &mut ctx, buf).map_err(|source| RuntimeError::Operator {
                operator: uid.to_owned(),
                shard,
                source,
            })?;
            op.drain_side_outputs(&mut |name, record| side(name, record));
            Ok::<(), RuntimeError>(())
        })?;
        for (v, ts) in self.buf.0.drain(..) {
            self.next.record(env, v, ts)?;
        }
        Ok(())
    }
}

impl<O: Operator, N: Node<O::Out>> Node<O::In> for OpNode<O, N> {
    #[inline]
    fn record(&mut self, env: &mut Env<'_>, value: O::In, ts: Timestamp) -> Result<()> {
        self.call(env, |op, ctx, out| op.process(value, ts, ctx, out))
    }
    fn watermark(&mut self, env: &mut Env<'_>, wm: Timestamp) -> Result<()> {
        if wm <= self.watermark {
            return Ok(());
        }
        self.watermark = wm;
        self.call(env, |op, ctx, out| op.on_watermark(wm, ctx, out))?;
        self.next.watermark(env, wm)
    }
    fn idle(&mut self, env: &mut Env<'_>, idle: bool) -> Result<()> {
        self.next.idle(env, idle)
    }
    fn tick(&mut self, env: &mut Env<'_>) -> Result<()> {
        self.call(env, |op, ctx, out| op.on_processing_time(ctx, out))?;
        self.next.tick(env)
    }
    fn barrier(&mut self, env: &mut Env<'_>, id: u64) -> Result<()> {
        if !self.opened {
            // An operator that saw nothing yet still holds what it restored.
            self.open(env)?;
        }
        let (uid, shard) = (self.uid, env.shard);
        let mut snapshot = OperatorStateSnapshot::new();
        let op = &mut self.op;
        PanicSite::run(env.current, uid, || op.snapshot_state(&mut snapshot))
            .map_err(|source| RuntimeError::Operator { operator: uid.to_owned(), shard, source })?;
        env.operator_state.extend(snapshot.into_lists().into_iter().map(|list| OperatorStateEntry {
            uid: uid.to_owned(),
            name: list.name,
            mode: list.mode,
            shard: shard as u32,
            items: list.items,
        }));
        self.next.barrier(env, id)
    }
    fn committed(&mut self, env: &mut Env<'_>, id: u64) -> Result<()> {
        self.next.committed(env, id)
    }
    fn end(&mut self, env: &mut Env<'_>) -> Result<()> {
        self.call(env, |_, _, _| Ok(()))?;
        self.next.end(env)
    }
}

/// Describes a chain in the job builder; instantiated per shard by [`ChainSpec::build`].
pub trait ChainSpec<In>: Clone + Send + Sync + 'static {
    /// The type the chain emits.
    type Out: 'static;
    /// Builds this shard's instance of the chain in front of `next`.
    fn build<N: Node<Self::Out>>(&self, next: N) -> impl Node<In>;
    /// The uids of the stateful operators of the chain, in order (their state lives in the
    /// stage's stores; savepoints map it back by these uids).
    fn operator_uids(&self, out: &mut Vec<&'static str>) {
        let _ = out;
    }
}

/// The empty chain.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity;

impl<T: 'static> ChainSpec<T> for Identity {
    type Out = T;
    fn build<N: Node<T>>(&self, next: N) -> impl Node<T> {
        next
    }
}

/// `map` appended to a chain.
#[derive(Clone)]
pub struct MapSpec<C, F> {
    pub(crate) chain: C,
    pub(crate) uid: &'static str,
    pub(crate) f: F,
}

impl<In, C, F, U> ChainSpec<In> for MapSpec<C, F>
where
    C: ChainSpec<In>,
    F: Fn(C::Out) -> U + Clone + Send + Sync + 'static,
    U: 'static,
{
    type Out = U;
    fn build<N: Node<U>>(&self, next: N) -> impl Node<In> {
        self.chain.build(MapNode { uid: self.uid, f: self.f.clone(), next })
    }
    fn operator_uids(&self, out: &mut Vec<&'static str>) {
        self.chain.operator_uids(out);
    }
}

/// `filter` appended to a chain.
#[derive(Clone)]
pub struct FilterSpec<C, F> {
    pub(crate) chain: C,
    pub(crate) uid: &'static str,
    pub(crate) f: F,
}

impl<In, C, F> ChainSpec<In> for FilterSpec<C, F>
where
    C: ChainSpec<In>,
    F: Fn(&C::Out) -> bool + Clone + Send + Sync + 'static,
{
    type Out = C::Out;
    fn build<N: Node<C::Out>>(&self, next: N) -> impl Node<In> {
        self.chain.build(FilterNode { uid: self.uid, f: self.f.clone(), next })
    }
    fn operator_uids(&self, out: &mut Vec<&'static str>) {
        self.chain.operator_uids(out);
    }
}

/// `flat_map` appended to a chain.
#[derive(Clone)]
pub struct FlatMapSpec<C, F> {
    pub(crate) chain: C,
    pub(crate) uid: &'static str,
    pub(crate) f: F,
}

impl<In, C, F, I> ChainSpec<In> for FlatMapSpec<C, F>
where
    C: ChainSpec<In>,
    F: Fn(C::Out) -> I + Clone + Send + Sync + 'static,
    I: IntoIterator + 'static,
    I::Item: 'static,
{
    type Out = I::Item;
    fn build<N: Node<I::Item>>(&self, next: N) -> impl Node<In> {
        self.chain.build(FlatMapNode { uid: self.uid, f: self.f.clone(), next })
    }
    fn operator_uids(&self, out: &mut Vec<&'static str>) {
        self.chain.operator_uids(out);
    }
}

/// A stateful operator appended to a chain; `factory` makes one instance per shard.
pub struct OperatorSpec<C, F> {
    pub(crate) chain: C,
    pub(crate) uid: &'static str,
    pub(crate) factory: std::sync::Arc<F>,
}

impl<C: Clone, F> Clone for OperatorSpec<C, F> {
    fn clone(&self) -> Self {
        OperatorSpec { chain: self.chain.clone(), uid: self.uid, factory: std::sync::Arc::clone(&self.factory) }
    }
}

impl<In, C, F, O> ChainSpec<In> for OperatorSpec<C, F>
where
    C: ChainSpec<In>,
    F: Fn() -> O + Send + Sync + 'static,
    O: Operator<In = C::Out>,
{
    type Out = O::Out;
    fn build<N: Node<O::Out>>(&self, next: N) -> impl Node<In> {
        self.chain.build(OpNode::new(self.uid, (self.factory)(), next))
    }
    fn operator_uids(&self, out: &mut Vec<&'static str>) {
        self.chain.operator_uids(out);
        out.push(self.uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_site_names_the_innermost_operator_and_only_while_unwinding() {
        let cell = Cell::new(None);
        assert_eq!(PanicSite::run(&cell, "outer", || PanicSite::run(&cell, "inner", || 7)), 7);
        assert_eq!(cell.get(), None, "a normal return records nothing");

        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            PanicSite::run(&cell, "outer", || PanicSite::run(&cell, "inner", || panic!("boom")))
        }));
        assert!(caught.is_err());
        assert_eq!(cell.get(), Some("inner"), "the site closest to the panic wins");

        let cell = Cell::new(None);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            PanicSite::run(&cell, "outer", || {
                PanicSite::run(&cell, "inner", || ());
                panic!("after inner returned")
            })
        }));
        assert!(caught.is_err());
        assert_eq!(cell.get(), Some("outer"), "a site that returned does not claim a later panic");
    }
}
