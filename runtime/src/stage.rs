//! Stages: a chain between two exchanges, run as one task on every shard.
//!
//! A stage has an *input pump* (a source reader, or the receiving end of one or more
//! exchange connections), a chain (statically composed, see [`crate::chain`]) and a
//! *terminal* (an exchange sender or a sink). The loop takes a batch of elements from the pump,
//! pushes them down the chain synchronously with the shard's state store borrowed, and then
//! awaits the terminal's sends (where backpressure applies). Type erasure happens once per
//! stage and once per batch, never per record.

use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::rc::Rc;

use weir_operators::operator::{END_OF_TIME, Keyed, Timestamp};
use weir_operators::time::{
    TimestampAssigner, Watermark, WatermarkEvent, WatermarkGenerator, WatermarkOutput, WatermarkStatus,
    WatermarkStrategy, WatermarkValve,
};
use weir_state::keygroup::{KeyEncode, KeyGroupRange, key_group_of_encoded};

use crate::chain::{ChainSpec, Env, Node};
use crate::error::{Result, RuntimeError};
use crate::runner::ShardRuntime;
use crate::sink::{Sink, SinkWriter};
use crate::source::{ReadStatus, Source, SourceReader};

/// A boxed, shard-local future.
pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Identifies one exchange connection (one producing stage to one consuming stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub usize);

/// What travels between stages, and out of input pumps.
#[derive(Debug, Clone, PartialEq)]
pub enum Element<T> {
    /// A record with its event time.
    Record(T, Timestamp),
    /// Event time advanced.
    Watermark(Timestamp),
    /// The stream became idle (true) or active again (false).
    Idle(bool),
    /// The stream ended.
    End,
}

/// Whether an input pump has more right away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    /// More input is (or may be) available at once.
    More,
    /// Nothing is available now: the stage flushes its output and waits.
    Drained,
}

/// Produces a stage's input elements on one shard, a batch at a time.
pub trait InputPump<T> {
    /// Appends the elements available now to `out`, without waiting for more.
    fn next<'a>(&'a mut self, out: &'a mut Vec<Element<T>>, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<Pumped>>;
    /// Waits until input may be available, or at most one tick interval.
    fn wait<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, ()>;
}

/// Makes a stage's input pump on each shard.
pub trait StageInput<T>: Send + Sync + 'static {
    /// The uid of the source, or of the step that created the exchange.
    fn uid(&self) -> &'static str;
    /// The connections the input reads (empty for sources).
    fn connections(&self) -> Vec<ConnectionId>;
    /// This shard's pump.
    fn pump(&self, rt: &ShardRuntime) -> Result<Box<dyn InputPump<T>>>;
}

// ---------------------------------------------------------------------------------------
// Source input
// ---------------------------------------------------------------------------------------

/// A source with its watermark strategy.
pub struct SourceInput<S, G, A> {
    uid: &'static str,
    source: S,
    strategy: WatermarkStrategy<G, A>,
}

impl<S, G, A> SourceInput<S, G, A> {
    /// Wraps `source`.
    pub fn new(uid: &'static str, source: S, strategy: WatermarkStrategy<G, A>) -> Self {
        SourceInput { uid, source, strategy }
    }
}

struct SourcePump<R: SourceReader, G, A> {
    uid: &'static str,
    reader: R,
    generator: weir_operators::time::WithIdleness<G>,
    assigner: A,
    output: WatermarkOutput,
    buf: Vec<R::Out>,
    dead: Vec<crate::source::DeadLetter>,
    last_emit_ms: i64,
    ended: bool,
}

impl<S, G, A> StageInput<S::Out> for SourceInput<S, G, A>
where
    S: Source,
    G: WatermarkGenerator<S::Out> + Clone + Send + Sync + 'static,
    A: TimestampAssigner<S::Out> + Clone + Send + Sync + 'static,
{
    fn uid(&self) -> &'static str {
        self.uid
    }
    fn connections(&self) -> Vec<ConnectionId> {
        Vec::new()
    }
    fn pump(&self, rt: &ShardRuntime) -> Result<Box<dyn InputPump<S::Out>>> {
        let reader = self.source.reader(rt.shard, rt.parallelism)?;
        Ok(Box::new(SourcePump {
            uid: self.uid,
            reader,
            generator: self.strategy.create_generator(),
            assigner: self.strategy.create_timestamp_assigner(),
            output: WatermarkOutput::new(),
            buf: Vec::new(),
            dead: Vec::new(),
            last_emit_ms: i64::MIN,
            ended: false,
        }))
    }
}

fn push_watermark_events<T>(output: &mut WatermarkOutput, out: &mut Vec<Element<T>>) {
    for event in output.take_update().events() {
        match event {
            WatermarkEvent::Watermark(Watermark(w)) => out.push(Element::Watermark(w)),
            WatermarkEvent::Status(status) => out.push(Element::Idle(status == WatermarkStatus::Idle)),
        }
    }
}

impl<R, G, A> InputPump<R::Out> for SourcePump<R, G, A>
where
    R: SourceReader,
    G: WatermarkGenerator<R::Out> + 'static,
    A: TimestampAssigner<R::Out> + 'static,
{
    fn wait<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, ()> {
        Box::pin(rt.idle_wait())
    }

    fn next<'a>(
        &'a mut self,
        out: &'a mut Vec<Element<R::Out>>,
        rt: &'a ShardRuntime,
    ) -> LocalFuture<'a, Result<Pumped>> {
        Box::pin(async move {
            if self.ended || rt.cancelled() {
                self.ended = true;
                out.push(Element::End);
                return Ok(Pumped::More);
            }
            self.buf.clear();
            let status =
                self.reader.read(&mut self.buf, &mut self.dead, rt.config.source_batch).map_err(|e| match e {
                    RuntimeError::Source { reason, .. } => {
                        RuntimeError::Source { source_name: self.uid.to_owned(), reason }
                    }
                    other => other,
                })?;
            if !self.dead.is_empty() {
                rt.dead_letters(self.uid, &mut self.dead);
            }
            let (assigner, generator, output) = (&mut self.assigner, &mut self.generator, &mut self.output);
            out.extend(self.buf.drain(..).map(|value| {
                let ts = assigner.timestamp(&value, None);
                generator.on_event(&value, ts, output);
                Element::Record(value, ts)
            }));
            let now = rt.now();
            if status != ReadStatus::More || now.saturating_sub(self.last_emit_ms) >= rt.config.tick_interval_ms {
                self.generator.on_periodic_emit(now, &mut self.output);
                self.last_emit_ms = now;
            }
            push_watermark_events(&mut self.output, out);
            Ok(match status {
                ReadStatus::End => {
                    self.ended = true;
                    out.push(Element::End);
                    Pumped::More
                }
                ReadStatus::Idle => Pumped::Drained,
                ReadStatus::More => {
                    rt.note_busy();
                    rt.yield_now().await;
                    Pumped::More
                }
            })
        })
    }
}

// ---------------------------------------------------------------------------------------
// Exchange input
// ---------------------------------------------------------------------------------------

/// The receiving end of one or more connections (several for `union`).
pub struct ExchangeInput<T> {
    uid: &'static str,
    conns: Vec<ConnectionId>,
    _t: PhantomData<fn() -> T>,
}

impl<T> ExchangeInput<T> {
    /// Reads `conns`.
    pub fn new(uid: &'static str, conns: Vec<ConnectionId>) -> Self {
        ExchangeInput { uid, conns, _t: PhantomData }
    }
}

/// One shard's receiving side of its connections.
pub trait ExchangeRx<T> {
    /// Number of inputs (connections x producing shards).
    fn inputs(&self) -> usize;
    /// Appends up to `max` elements that are there now, each with its input, without
    /// waiting. Returns `false` once every input has ended.
    fn try_recv<'a>(
        &'a mut self,
        out: &'a mut Vec<(usize, Element<T>)>,
        max: usize,
        rt: &'a ShardRuntime,
    ) -> LocalFuture<'a, Result<bool>>;
    /// Waits until an element is there (or every input ended), at most `timeout`.
    fn wait<'a>(&'a mut self, rt: &'a ShardRuntime, timeout: std::time::Duration) -> LocalFuture<'a, Result<()>>;
}

struct ExchangePump<T> {
    rx: Box<dyn ExchangeRx<T>>,
    valve: WatermarkValve,
    idle: bool,
    ended: bool,
    received: Vec<(usize, Element<T>)>,
}

impl<T: Send + 'static> StageInput<T> for ExchangeInput<T> {
    fn uid(&self) -> &'static str {
        self.uid
    }
    fn connections(&self) -> Vec<ConnectionId> {
        self.conns.clone()
    }
    fn pump(&self, rt: &ShardRuntime) -> Result<Box<dyn InputPump<T>>> {
        let rx = rt.receiver::<T>(&self.conns)?;
        let valve = WatermarkValve::new(rx.inputs());
        Ok(Box::new(ExchangePump { rx, valve, idle: false, ended: false, received: Vec::new() }))
    }
}

impl<T: 'static> ExchangePump<T> {
    fn apply(&mut self, update: weir_operators::time::WatermarkUpdate, out: &mut Vec<Element<T>>) {
        for event in update.events() {
            match event {
                WatermarkEvent::Watermark(Watermark(w)) => out.push(Element::Watermark(w)),
                WatermarkEvent::Status(status) => {
                    let idle = status == WatermarkStatus::Idle;
                    if idle != self.idle {
                        self.idle = idle;
                        out.push(Element::Idle(idle));
                    }
                }
            }
        }
    }
}

impl<T: 'static> InputPump<T> for ExchangePump<T> {
    fn wait<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, ()> {
        let timeout = std::time::Duration::from_millis(rt.config.tick_interval_ms.max(1) as u64);
        Box::pin(async move {
            // An error surfaces again from the next `try_recv`.
            let _ = self.rx.wait(rt, timeout).await;
        })
    }

    fn next<'a>(&'a mut self, out: &'a mut Vec<Element<T>>, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<Pumped>> {
        Box::pin(async move {
            if self.ended {
                out.push(Element::End);
                return Ok(Pumped::More);
            }
            self.received.clear();
            let open = self.rx.try_recv(&mut self.received, rt.config.batch_len.max(1), rt).await?;
            if self.received.is_empty() {
                if open {
                    return Ok(Pumped::Drained);
                }
                if !self.valve.is_ended() {
                    // A consequence of a failure upstream (reported as such, not as the cause).
                    return Err(RuntimeError::InputClosed { source_shard: rt.shard });
                }
                self.ended = true;
                out.push(Element::End);
                return Ok(Pumped::More);
            }
            let received = std::mem::take(&mut self.received);
            for (input, element) in received.into_iter() {
                match element {
                    Element::Record(v, ts) => out.push(Element::Record(v, ts)),
                    Element::Watermark(w) => {
                        let update = self.valve.on_watermark(input, Watermark(w));
                        self.apply(update, out);
                    }
                    Element::Idle(true) => {
                        let update = self.valve.on_idle(input);
                        self.apply(update, out);
                    }
                    Element::Idle(false) => {
                        let update = self.valve.on_active(input);
                        self.apply(update, out);
                    }
                    Element::End => {
                        let update = self.valve.on_end_of_input(input);
                        self.apply(update, out);
                        if self.valve.is_ended() {
                            self.ended = true;
                            out.push(Element::End);
                        }
                    }
                }
            }
            Ok(Pumped::More)
        })
    }
}

// ---------------------------------------------------------------------------------------
// Terminals
// ---------------------------------------------------------------------------------------

/// One shard's sending side of a connection: batches per target shard.
pub trait ExchangeTx<T> {
    /// Queues `element` for `target` (never waits).
    fn push(&mut self, target: usize, element: Element<T>);
    /// Sends full batches, waiting while channels are full (backpressure).
    fn send_full<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<()>>;
    /// Sends every queued element (before the shard would idle, and at the end).
    fn flush<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<()>>;
}

/// A keyed exchange terminal: routes each record to the shard owning the key group of
/// `key(record)`; it travels as `wrap(Keyed { key, value })` (the wire type `E`: a [`Keyed`],
/// or one side of a connected stream).
pub struct Partitioner<T, K, F, W, E> {
    uid: &'static str,
    key: F,
    wrap: W,
    _t: PhantomData<fn(T) -> (K, E)>,
}

impl<T, K, F, W, E> Partitioner<T, K, F, W, E> {
    /// Routes by `key`, sending `wrap(keyed)`.
    pub fn by_key(uid: &'static str, key: F, wrap: W) -> Self {
        Partitioner { uid, key, wrap, _t: PhantomData }
    }
}

/// Routing of a non-keyed exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Round-robin over all shards.
    RoundRobin,
    /// Every record to every shard.
    Broadcast,
    /// Each shard to itself (union).
    Forward,
}

/// What ends a stage: describes the last node of the chain.
pub trait TerminalSpec<T>: Send + Sync + 'static {
    /// The node type.
    type Node: Node<T>;
    /// What crosses the connection (for sinks: what they consume).
    type Out: 'static;
    /// This shard's node, and the sender it queues into (for exchanges), over connection `conn`.
    fn build(&self, rt: &ShardRuntime, conn: Option<ConnectionId>) -> Result<BuiltTerminal<Self::Node, Self::Out>>;
}

/// A terminal's node and, for exchanges, the sender it queues into.
pub type BuiltTerminal<N, T> = (N, Option<SharedTx<T>>);

/// A sender shared by a terminal node (which queues) and the stage loop (which sends).
pub type SharedTx<T> = Rc<RefCell<Box<dyn ExchangeTx<T>>>>;

fn sender_for<T: Send + 'static>(rt: &ShardRuntime, conn: Option<ConnectionId>) -> Result<SharedTx<T>> {
    let conn = conn.ok_or_else(|| RuntimeError::InvalidJob("an exchange terminal without a connection".into()))?;
    Ok(Rc::new(RefCell::new(rt.sender::<T>(conn)?)))
}

fn broadcast<T: Clone>(tx: &SharedTx<T>, parallelism: usize, element: Element<T>) {
    let mut tx = tx.borrow_mut();
    for target in 0..parallelism {
        tx.push(target, element.clone());
    }
}

fn control<T>(element: &Element<T>) -> Option<Element<()>> {
    match element {
        Element::Record(..) => None,
        Element::Watermark(w) => Some(Element::Watermark(*w)),
        Element::Idle(b) => Some(Element::Idle(*b)),
        Element::End => Some(Element::End),
    }
}

fn to_typed<T>(control: &Element<()>) -> Element<T> {
    match control {
        Element::Watermark(w) => Element::Watermark(*w),
        Element::Idle(b) => Element::Idle(*b),
        _ => Element::End,
    }
}

/// The last node of a `key_by` stage.
pub struct KeyByNode<T, K, F, W, E> {
    key: F,
    wrap: W,
    uid: &'static str,
    max_parallelism: u16,
    parallelism: usize,
    buf: Vec<u8>,
    tx: SharedTx<E>,
    _t: PhantomData<fn(T, K)>,
}

impl<T, K, F, W, E: 'static> KeyByNode<T, K, F, W, E> {
    fn send_control(&mut self, element: Element<()>) {
        let mut tx = self.tx.borrow_mut();
        for target in 0..self.parallelism {
            tx.push(target, to_typed(&element));
        }
    }
}

impl<T, K, F, W, E> Node<T> for KeyByNode<T, K, F, W, E>
where
    T: 'static,
    K: KeyEncode + 'static,
    F: Fn(&T) -> K + 'static,
    W: Fn(Keyed<K, T>) -> E + 'static,
    E: 'static,
{
    #[inline]
    fn record(&mut self, env: &mut Env<'_>, value: T, ts: Timestamp) -> Result<()> {
        let key = {
            let _site = crate::chain::PanicSite::new(env.current, self.uid);
            (self.key)(&value)
        };
        self.buf.clear();
        key.encode_key(&mut self.buf);
        let group = key_group_of_encoded(&self.buf, self.max_parallelism);
        let target = KeyGroupRange::shard_for(group, self.parallelism, self.max_parallelism);
        self.tx.borrow_mut().push(target, Element::Record((self.wrap)(Keyed { key, value }), ts));
        Ok(())
    }
    fn watermark(&mut self, _: &mut Env<'_>, wm: Timestamp) -> Result<()> {
        self.send_control(Element::Watermark(wm));
        Ok(())
    }
    fn idle(&mut self, _: &mut Env<'_>, idle: bool) -> Result<()> {
        self.send_control(Element::Idle(idle));
        Ok(())
    }
    fn tick(&mut self, _: &mut Env<'_>) -> Result<()> {
        Ok(())
    }
    fn end(&mut self, _: &mut Env<'_>) -> Result<()> {
        self.send_control(Element::End);
        Ok(())
    }
}

impl<T, K, F, W, E> TerminalSpec<T> for Partitioner<T, K, F, W, E>
where
    T: 'static,
    K: KeyEncode + 'static,
    F: Fn(&T) -> K + Clone + Send + Sync + 'static,
    W: Fn(Keyed<K, T>) -> E + Clone + Send + Sync + 'static,
    E: Send + 'static,
{
    type Node = KeyByNode<T, K, F, W, E>;
    type Out = E;
    fn build(&self, rt: &ShardRuntime, conn: Option<ConnectionId>) -> Result<BuiltTerminal<Self::Node, E>> {
        let tx = sender_for::<E>(rt, conn)?;
        let node = KeyByNode {
            key: self.key.clone(),
            wrap: self.wrap.clone(),
            uid: self.uid,
            max_parallelism: rt.config.max_parallelism,
            parallelism: rt.parallelism,
            buf: Vec::new(),
            tx: Rc::clone(&tx),
            _t: PhantomData,
        };
        Ok((node, Some(tx)))
    }
}

/// The last node of a round-robin, broadcast or forward stage.
pub struct RouteNode<T> {
    route: Route,
    next: usize,
    shard: usize,
    parallelism: usize,
    tx: SharedTx<T>,
}

impl<T: Clone + 'static> Node<T> for RouteNode<T> {
    #[inline]
    fn record(&mut self, _: &mut Env<'_>, value: T, ts: Timestamp) -> Result<()> {
        match self.route {
            Route::RoundRobin => {
                self.next = (self.next + 1) % self.parallelism;
                self.tx.borrow_mut().push(self.next, Element::Record(value, ts));
            }
            Route::Forward => self.tx.borrow_mut().push(self.shard, Element::Record(value, ts)),
            Route::Broadcast => broadcast(&self.tx, self.parallelism, Element::Record(value, ts)),
        }
        Ok(())
    }
    fn watermark(&mut self, _: &mut Env<'_>, wm: Timestamp) -> Result<()> {
        self.control(Element::Watermark(wm));
        Ok(())
    }
    fn idle(&mut self, _: &mut Env<'_>, idle: bool) -> Result<()> {
        self.control(Element::Idle(idle));
        Ok(())
    }
    fn tick(&mut self, _: &mut Env<'_>) -> Result<()> {
        Ok(())
    }
    fn end(&mut self, _: &mut Env<'_>) -> Result<()> {
        self.control(Element::End);
        Ok(())
    }
}

impl<T: 'static> RouteNode<T> {
    /// Control elements go to every shard, whatever the route: each receiver tracks the
    /// watermark and the end of every input (a forward route's other inputs carry no records).
    fn control(&mut self, element: Element<T>) {
        let Some(c) = control(&element) else { return };
        let mut tx = self.tx.borrow_mut();
        for target in 0..self.parallelism {
            tx.push(target, to_typed(&c));
        }
    }
}

/// A non-keyed exchange terminal.
pub struct RouteSpec<T> {
    route: Route,
    _t: PhantomData<fn(T)>,
}

impl<T> RouteSpec<T> {
    /// Routes by `route`.
    pub fn new(route: Route) -> Self {
        RouteSpec { route, _t: PhantomData }
    }
}

impl<T: Clone + Send + 'static> TerminalSpec<T> for RouteSpec<T> {
    type Node = RouteNode<T>;
    type Out = T;
    fn build(&self, rt: &ShardRuntime, conn: Option<ConnectionId>) -> Result<BuiltTerminal<RouteNode<T>, T>> {
        let tx = sender_for::<T>(rt, conn)?;
        let node = RouteNode {
            route: self.route,
            next: rt.shard,
            shard: rt.shard,
            parallelism: rt.parallelism,
            tx: Rc::clone(&tx),
        };
        Ok((node, Some(tx)))
    }
}

/// The last node of a sink stage: the shard's sink writer, called directly.
pub struct SinkNode<W> {
    uid: &'static str,
    writer: W,
}

impl<W: SinkWriter> Node<W::In> for SinkNode<W> {
    #[inline]
    fn record(&mut self, env: &mut Env<'_>, value: W::In, ts: Timestamp) -> Result<()> {
        let _site = crate::chain::PanicSite::new(env.current, self.uid);
        self.writer.write(value, ts)
    }
    fn watermark(&mut self, _: &mut Env<'_>, _: Timestamp) -> Result<()> {
        Ok(())
    }
    fn idle(&mut self, _: &mut Env<'_>, _: bool) -> Result<()> {
        Ok(())
    }
    fn tick(&mut self, _: &mut Env<'_>) -> Result<()> {
        Ok(())
    }
    fn end(&mut self, env: &mut Env<'_>) -> Result<()> {
        let _site = crate::chain::PanicSite::new(env.current, self.uid);
        self.writer.flush()
    }
}

/// A sink terminal.
pub struct SinkSpec<S> {
    uid: &'static str,
    sink: S,
}

impl<S> SinkSpec<S> {
    /// Ends a stage in `sink`.
    pub fn new(uid: &'static str, sink: S) -> Self {
        SinkSpec { uid, sink }
    }
}

impl<S: Sink> TerminalSpec<S::In> for SinkSpec<S> {
    type Node = SinkNode<S::Writer>;
    type Out = S::In;
    fn build(&self, rt: &ShardRuntime, _: Option<ConnectionId>) -> Result<BuiltTerminal<Self::Node, S::In>> {
        Ok((SinkNode { uid: self.uid, writer: self.sink.writer(rt.shard, rt.parallelism)? }, None))
    }
}

// ---------------------------------------------------------------------------------------
// Stage
// ---------------------------------------------------------------------------------------

/// A stage, type-erased for the runner.
pub trait StageFactory: Send + Sync + 'static {
    /// A name for errors (the input's uid).
    fn name(&self) -> &'static str;
    /// Connections this stage reads.
    fn inputs(&self) -> Vec<ConnectionId>;
    /// The connection this stage writes, if it ends in an exchange.
    fn output(&self) -> Option<ConnectionId>;
    /// Whether the output connection only ever goes shard-to-itself.
    fn output_is_forward(&self) -> bool;
    /// This shard's task.
    fn spawn(&self, rt: Rc<ShardRuntime>) -> Result<LocalFuture<'static, Result<()>>>;
}

/// A stage: input, chain, terminal.
pub struct StageSpec<In: 'static, C, Term> {
    input: Box<dyn StageInput<In>>,
    chain: C,
    terminal: Term,
    output: Option<ConnectionId>,
    forward: bool,
}

impl<In: 'static, C, Term> StageSpec<In, C, Term> {
    /// Assembles a stage.
    pub fn new(
        input: Box<dyn StageInput<In>>,
        chain: C,
        terminal: Term,
        output: Option<ConnectionId>,
        forward: bool,
    ) -> Self {
        StageSpec { input, chain, terminal, output, forward }
    }
}

impl<In, C, Term> StageFactory for StageSpec<In, C, Term>
where
    In: 'static,
    C: ChainSpec<In>,
    Term: TerminalSpec<C::Out>,
{
    fn name(&self) -> &'static str {
        self.input.uid()
    }
    fn inputs(&self) -> Vec<ConnectionId> {
        self.input.connections()
    }
    fn output(&self) -> Option<ConnectionId> {
        self.output
    }
    fn output_is_forward(&self) -> bool {
        self.forward
    }
    fn spawn(&self, rt: Rc<ShardRuntime>) -> Result<LocalFuture<'static, Result<()>>> {
        let pump = self.input.pump(&rt)?;
        let (node, tx) = self.terminal.build(&rt, self.output)?;
        let chain = self.chain.build(node);
        let store = rt.stage_store(self.name())?;
        let timer_store = rt.stage_store(&format!("{}.timers", self.name()))?;
        Ok(Box::pin(run_stage(pump, chain, tx, (store, timer_store), rt, self.name())))
    }
}

async fn run_stage<In: 'static, N: Node<In>, Out: 'static>(
    mut pump: Box<dyn InputPump<In>>,
    mut chain: N,
    tx: Option<SharedTx<Out>>,
    (mut store, mut timer_store): (weir_state::StateStore, weir_state::StateStore),
    rt: Rc<ShardRuntime>,
    name: &'static str,
) -> Result<()> {
    let mut batch = Vec::with_capacity(rt.config.source_batch.max(rt.config.batch_len) + 8);
    let mut last_tick = i64::MIN;
    loop {
        batch.clear();
        let pumped = pump.next(&mut batch, &rt).await?;
        let mut done = false;
        let records = batch.iter().filter(|e| matches!(e, Element::Record(..))).count() as u64;
        let current = std::cell::Cell::new(None);
        {
            let now = rt.now();
            let mut side = |tag: &'static str, record: Box<dyn std::any::Any + Send>| rt.side_output(tag, record);
            let mut env = Env {
                store: &mut store,
                timer_store: &mut timer_store,
                shard: rt.shard,
                parallelism: rt.parallelism,
                max_parallelism: rt.config.max_parallelism,
                now,
                side: &mut side,
                current: &current,
            };
            // One unwind guard per batch; the chain records which operator is running.
            let processed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
                for element in batch.drain(..) {
                    match element {
                        Element::Record(v, ts) => chain.record(&mut env, v, ts)?,
                        Element::Watermark(w) => chain.watermark(&mut env, w)?,
                        Element::Idle(idle) => chain.idle(&mut env, idle)?,
                        Element::End => {
                            chain.watermark(&mut env, END_OF_TIME)?;
                            chain.tick(&mut env)?;
                            chain.end(&mut env)?;
                            done = true;
                            break;
                        }
                    }
                }
                if !done && now.saturating_sub(last_tick) >= rt.config.tick_interval_ms {
                    last_tick = now;
                    chain.tick(&mut env)?;
                }
                Ok(())
            }));
            match processed {
                Ok(result) => result?,
                Err(payload) => {
                    return Err(RuntimeError::Panic {
                        operator: current.get().unwrap_or(name).to_owned(),
                        shard: rt.shard,
                        message: crate::chain::panic_message(payload.as_ref()),
                    });
                }
            }
        }
        rt.count_batch(name, records);
        if let Some(tx) = &tx {
            // The terminal node only queues; sends (and backpressure) happen here, between
            // batches, so no borrow of the store or the chain is held across an await.
            // Partial batches go out when the input is drained: records never wait for a
            // batch to fill while this stage waits for input.
            let mut sender = take_sender(tx);
            let flush = done || pumped == Pumped::Drained;
            let sent = if flush { sender.flush(&rt).await } else { sender.send_full(&rt).await };
            restore_sender(tx, sender);
            sent?;
        }
        if done {
            return Ok(());
        }
        if pumped == Pumped::Drained {
            pump.wait(&rt).await;
        }
    }
}

/// Moves the sender out of its cell for the duration of an await.
fn take_sender<T: 'static>(tx: &SharedTx<T>) -> Box<dyn ExchangeTx<T>> {
    std::mem::replace(&mut *tx.borrow_mut(), Box::new(Detached(PhantomData)))
}

fn restore_sender<T: 'static>(tx: &SharedTx<T>, sender: Box<dyn ExchangeTx<T>>) {
    *tx.borrow_mut() = sender;
}

/// Stands in for a sender while it is being awaited; nothing pushes then (the chain is idle).
struct Detached<T>(PhantomData<fn(T)>);

impl<T> ExchangeTx<T> for Detached<T> {
    fn push(&mut self, _: usize, _: Element<T>) {
        debug_assert!(false, "a record was pushed while the stage awaited its sends");
    }
    fn send_full<'a>(&'a mut self, _: &'a ShardRuntime) -> LocalFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn flush<'a>(&'a mut self, _: &'a ShardRuntime) -> LocalFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}
