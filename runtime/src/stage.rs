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
    /// Checkpoint barrier: everything before it belongs to checkpoint `id`, nothing after it.
    Barrier(u64),
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

/// A stage's input for one pass: `records` (with their `timestamps`) first, then `elements`.
///
/// A source reads straight into `records`, so its records reach the chain without being
/// wrapped in an [`Element`] and copied again; an exchange hands out `elements` only.
#[derive(Debug)]
pub struct Batch<T> {
    /// Leading records.
    pub records: Vec<T>,
    /// The event time of each of `records`.
    pub timestamps: Vec<Timestamp>,
    /// What follows the records, in order.
    pub elements: Vec<Element<T>>,
}

impl<T> Batch<T> {
    /// An empty batch with room for `capacity` records or elements.
    pub fn with_capacity(capacity: usize) -> Self {
        Batch {
            records: Vec::with_capacity(capacity),
            timestamps: Vec::with_capacity(capacity),
            elements: Vec::with_capacity(capacity),
        }
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.records.clear();
        self.timestamps.clear();
        self.elements.clear();
    }
}

/// Produces a stage's input elements on one shard, a batch at a time.
pub trait InputPump<T> {
    /// Appends the input available now to `out`, without waiting for more.
    fn next<'a>(&'a mut self, out: &'a mut Batch<T>, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<Pumped>>;
    /// Waits until input may be available, or at most one tick interval.
    fn wait<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, ()>;
    /// A source's offsets after the elements handed out so far, by split: `(split, splits,
    /// offset)` (a source pump hands out a barrier in a batch of its own, so at a barrier these
    /// are the barrier's position in every split this shard reads).
    fn offsets(&self) -> Vec<(u32, u32, u64)> {
        Vec::new()
    }
    /// How long the last aligned barrier waited for the other inputs.
    fn alignment(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
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

/// One split a source pump reads, with its own watermark generator: records of different
/// splits are read in turns, a batch at a time, so only within a split are their timestamps
/// in the order the generator assumes; the shard's watermark is the splits' combined one.
struct SplitInput<R, G> {
    split: u32,
    reader: R,
    generator: weir_operators::time::WithIdleness<G>,
    output: WatermarkOutput,
    ended: bool,
}

struct SourcePump<R: SourceReader, G, A> {
    uid: &'static str,
    splits: Vec<SplitInput<R, G>>,
    /// The source's number of splits (all shards).
    total_splits: u32,
    /// Combines the splits' watermarks (`None` without splits).
    valve: Option<WatermarkValve>,
    /// The split read next.
    cursor: usize,
    assigner: A,
    dead: Vec<crate::source::DeadLetter>,
    last_emit_ms: i64,
    ended: bool,
    /// The last barrier injected.
    last_barrier: u64,
    /// The input is exhausted; with checkpoints, end-of-input waits for a barrier after the
    /// last record (the final checkpoint, which commits the last output) and its completion.
    end_pending: bool,
    /// The newest barrier injected after the last record: once its checkpoint (or a later
    /// one) completes, the source ends. If it is aborted, another is asked for.
    final_barrier: Option<u64>,
    /// Checkpoints aborted in the attempt when the input ended (see
    /// [`crate::checkpointing::CheckpointShared::aborts`]).
    aborts_at_end: u64,
}

/// Checkpoints aborted after a source's input ended, with none after its last record complete,
/// before the attempt fails (the job then restarts from its last complete checkpoint, as for
/// any failure). Until then a failed final checkpoint is retried, as any checkpoint's failure
/// leaves the job running.
const FINAL_CHECKPOINT_ATTEMPTS: u64 = 5;

impl<R: SourceReader, G: WatermarkGenerator<R::Out>, A> SourcePump<R, G, A> {
    /// Reads a batch from the next split that has records (trying each split once), and
    /// passes every split's watermark changes through the valve into `out`.
    fn read(&mut self, batch: &mut Batch<R::Out>, rt: &ShardRuntime) -> Result<ReadStatus>
    where
        A: TimestampAssigner<R::Out>,
    {
        let Some(valve) = &mut self.valve else { return Ok(ReadStatus::End) };
        let n = self.splits.len();
        let mut read = false;
        for _ in 0..n {
            let i = self.cursor;
            self.cursor = (i + 1) % n;
            let split = &mut self.splits[i];
            if split.ended {
                continue;
            }
            let before = batch.records.len();
            let status =
                split.reader.read(&mut batch.records, &mut self.dead, rt.config.source_batch).map_err(|e| match e {
                    RuntimeError::Source { reason, .. } => {
                        RuntimeError::Source { source_name: format!("{} (split {})", self.uid, split.split), reason }
                    }
                    other => other,
                })?;
            let assigner = &mut self.assigner;
            batch.timestamps.extend(batch.records[before..].iter().map(|value| assigner.timestamp(value, None)));
            let events = batch.records[before..].iter().zip(batch.timestamps[before..].iter().copied());
            split.generator.on_events(events, &mut split.output);
            if status == ReadStatus::End {
                split.ended = true;
            }
            read |= batch.records.len() > before;
            if status == ReadStatus::More || read {
                read = true;
                break;
            }
        }
        let now = rt.now();
        let tick = now.saturating_sub(self.last_emit_ms) >= rt.config.tick_interval_ms;
        let all_ended = self.splits.iter().all(|s| s.ended);
        for (i, split) in self.splits.iter_mut().enumerate() {
            if !split.ended && (tick || !read) {
                split.generator.on_periodic_emit(now, &mut split.output);
            }
            for event in split.output.take_update().events() {
                let update = match event {
                    WatermarkEvent::Watermark(w) => valve.on_watermark(i, w),
                    WatermarkEvent::Status(WatermarkStatus::Idle) => valve.on_idle(i),
                    WatermarkEvent::Status(WatermarkStatus::Active) => valve.on_active(i),
                };
                push_update(update, &mut batch.elements);
            }
            if split.ended && valve.input_status(i) != weir_operators::time::InputStatus::Ended && !all_ended {
                // The last split's end is the source's: the caller ends event time itself.
                push_update(valve.on_end_of_input(i), &mut batch.elements);
            }
        }
        if tick || !read {
            self.last_emit_ms = now;
        }
        Ok(if all_ended {
            ReadStatus::End
        } else if read {
            ReadStatus::More
        } else {
            ReadStatus::Idle
        })
    }
}

/// Appends what a watermark update changed to a batch's elements.
fn push_update<T>(update: weir_operators::time::WatermarkUpdate, out: &mut Vec<Element<T>>) {
    for event in update.events() {
        match event {
            WatermarkEvent::Watermark(Watermark(w)) => out.push(Element::Watermark(w)),
            WatermarkEvent::Status(status) => out.push(Element::Idle(status == WatermarkStatus::Idle)),
        }
    }
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
        let total_splits = self.source.splits();
        let ids = crate::source::splits_of(rt.shard, rt.parallelism, total_splits);
        let offsets = rt.restored_offsets(self.uid, &ids, total_splits)?;
        let mut splits = Vec::with_capacity(ids.len());
        for (split, offset) in ids.into_iter().zip(offsets) {
            let mut reader = self.source.reader(split)?;
            if offset > 0 {
                reader.seek(offset)?;
            }
            splits.push(SplitInput {
                split,
                reader,
                generator: self.strategy.create_generator(),
                output: WatermarkOutput::new(),
                ended: false,
            });
        }
        Ok(Box::new(SourcePump {
            uid: self.uid,
            valve: (!splits.is_empty()).then(|| WatermarkValve::new(splits.len())),
            splits,
            total_splits,
            cursor: 0,
            assigner: self.strategy.create_timestamp_assigner(),
            dead: Vec::new(),
            last_emit_ms: i64::MIN,
            ended: false,
            // Ids of this run attempt start after the restored checkpoint's: inject any.
            last_barrier: 0,
            end_pending: false,
            final_barrier: None,
            aborts_at_end: 0,
        }))
    }
}

impl<R, G, A> InputPump<R::Out> for SourcePump<R, G, A>
where
    R: SourceReader,
    G: WatermarkGenerator<R::Out> + 'static,
    A: TimestampAssigner<R::Out> + 'static,
{
    fn wait<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, ()> {
        let last = self.last_barrier;
        let final_barrier = self.final_barrier;
        Box::pin(rt.idle_wait_unless(move || {
            rt.checkpoints().is_some_and(|c| {
                c.requested() > last || final_barrier.is_some_and(|id| c.completed() >= id || c.final_aborted(id))
            })
        }))
    }

    fn offsets(&self) -> Vec<(u32, u32, u64)> {
        self.splits.iter().map(|s| (s.split, self.total_splits, s.reader.offset())).collect()
    }

    fn next<'a>(&'a mut self, batch: &'a mut Batch<R::Out>, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<Pumped>> {
        Box::pin(async move {
            let out = &mut batch.elements;
            if self.ended || rt.cancelled() {
                self.ended = true;
                out.push(Element::End);
                return Ok(Pumped::More);
            }
            if let Some(checkpoints) = rt.checkpoints() {
                let requested = checkpoints.requested();
                if requested > self.last_barrier {
                    // A barrier travels in a batch of its own, so the reader's offset now is
                    // exactly the barrier's position in the input.
                    self.last_barrier = requested;
                    let stop = checkpoints.stop_at(requested);
                    if stop == Some(true) && !self.end_pending {
                        out.push(Element::Watermark(END_OF_TIME));
                    }
                    out.push(Element::Barrier(requested));
                    if stop.is_some() {
                        self.ended = true;
                        out.push(Element::End);
                    } else if self.end_pending {
                        self.final_barrier = Some(requested);
                    }
                    return Ok(Pumped::More);
                }
                if let Some(id) = self.final_barrier {
                    // Ends once a checkpoint after the last record is complete, so the job
                    // finishes with all its output committed. An aborted one (a full disk at
                    // its manifest, a timeout) is retried, as any failed checkpoint is: the job
                    // does not restart for it.
                    if checkpoints.completed() >= id {
                        self.ended = true;
                        out.push(Element::End);
                        return Ok(Pumped::More);
                    }
                    if checkpoints.final_aborted(id) {
                        let failed = checkpoints.aborts().saturating_sub(self.aborts_at_end);
                        if failed >= FINAL_CHECKPOINT_ATTEMPTS {
                            return Err(RuntimeError::Checkpoint(format!(
                                "{failed} final checkpoints failed in a row (the last: {id})"
                            )));
                        }
                        self.final_barrier = None;
                        checkpoints.request_final();
                    }
                    return Ok(Pumped::Drained);
                }
                if self.end_pending {
                    return Ok(Pumped::Drained);
                }
            }
            let status = self.read(batch, rt)?;
            if !self.dead.is_empty() {
                rt.dead_letters(self.uid, &mut self.dead);
            }
            let out = &mut batch.elements;
            Ok(match status {
                ReadStatus::End => match rt.checkpoints() {
                    Some(checkpoints) => {
                        // Drain event time before the final checkpoint, so that what the last
                        // windows and timers emit is covered by it (and committed).
                        out.push(Element::Watermark(END_OF_TIME));
                        self.end_pending = true;
                        self.aborts_at_end = checkpoints.aborts();
                        checkpoints.request_final();
                        Pumped::More
                    }
                    None => {
                        self.ended = true;
                        out.push(Element::End);
                        Pumped::More
                    }
                },
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
    /// Stops (or resumes) reading `input`: its elements wait in its channel (barrier
    /// alignment).
    fn set_blocked(&mut self, input: usize, blocked: bool) -> Result<()>;
}

struct ExchangePump<T> {
    rx: Box<dyn ExchangeRx<T>>,
    valve: WatermarkValve,
    idle: bool,
    ended: bool,
    received: Vec<(usize, Element<T>)>,
    /// Barrier alignment (checkpointed jobs only).
    aligner: Option<crate::checkpoint::BarrierAligner>,
    /// When the pending checkpoint's first barrier arrived.
    align_started: Option<std::time::Instant>,
    last_alignment: std::time::Duration,
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
        let aligner = rt.checkpoints().map(|c| crate::checkpoint::BarrierAligner::new(rx.inputs(), c.mode));
        Ok(Box::new(ExchangePump {
            rx,
            valve,
            idle: false,
            ended: false,
            received: Vec::new(),
            aligner,
            align_started: None,
            last_alignment: std::time::Duration::ZERO,
        }))
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

impl<T: 'static> ExchangePump<T> {
    /// Carries out what the aligner decided: blocks and unblocks inputs, and hands out an
    /// aligned barrier (the stage snapshots and forwards it).
    fn align(&mut self, actions: Vec<crate::checkpoint::AlignAction>, out: &mut Vec<Element<T>>) -> Result<()> {
        use crate::checkpoint::AlignAction;
        for action in actions {
            match action {
                AlignAction::Block(input) => {
                    self.align_started.get_or_insert_with(std::time::Instant::now);
                    self.rx.set_blocked(input, true)?;
                }
                AlignAction::Unblock(input) => self.rx.set_blocked(input, false)?,
                AlignAction::Snapshot(id) => {
                    self.last_alignment = self.align_started.take().map(|t| t.elapsed()).unwrap_or_default();
                    out.push(Element::Barrier(id));
                }
                AlignAction::Abort(_) => self.align_started = None,
            }
        }
        Ok(())
    }
}

impl<T: 'static> InputPump<T> for ExchangePump<T> {
    fn alignment(&self) -> std::time::Duration {
        self.last_alignment
    }

    fn wait<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, ()> {
        let timeout = std::time::Duration::from_millis(rt.config.tick_interval_ms.max(1) as u64);
        Box::pin(async move {
            // An error surfaces again from the next `try_recv`.
            let _ = self.rx.wait(rt, timeout).await;
        })
    }

    fn next<'a>(&'a mut self, batch: &'a mut Batch<T>, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<Pumped>> {
        Box::pin(async move {
            let out = &mut batch.elements;
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
                    Element::Barrier(id) => {
                        if let Some(aligner) = self.aligner.as_mut() {
                            let actions = aligner.on_barrier(input, id);
                            self.align(actions, out)?;
                        }
                    }
                    Element::End => {
                        let update = self.valve.on_end_of_input(input);
                        self.apply(update, out);
                        if let Some(aligner) = self.aligner.as_mut() {
                            let actions = aligner.on_end_of_input(input);
                            self.align(actions, out)?;
                        }
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
        Element::Barrier(id) => Some(Element::Barrier(*id)),
        Element::End => Some(Element::End),
    }
}

fn to_typed<T>(control: &Element<()>) -> Element<T> {
    match control {
        Element::Watermark(w) => Element::Watermark(*w),
        Element::Idle(b) => Element::Idle(*b),
        Element::Barrier(id) => Element::Barrier(*id),
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
        let key = crate::chain::PanicSite::run(env.current, self.uid, || (self.key)(&value));
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
    fn barrier(&mut self, _: &mut Env<'_>, id: u64) -> Result<()> {
        self.send_control(Element::Barrier(id));
        Ok(())
    }
    fn committed(&mut self, _: &mut Env<'_>, _: u64) -> Result<()> {
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
    fn barrier(&mut self, _: &mut Env<'_>, id: u64) -> Result<()> {
        self.control(Element::Barrier(id));
        Ok(())
    }
    fn committed(&mut self, _: &mut Env<'_>, _: u64) -> Result<()> {
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
    /// With checkpoints, the final checkpoint commits the last output, not the end of input.
    checkpointed: bool,
}

impl<W: SinkWriter> Node<W::In> for SinkNode<W> {
    #[inline]
    fn record(&mut self, env: &mut Env<'_>, value: W::In, ts: Timestamp) -> Result<()> {
        crate::chain::PanicSite::run(env.current, self.uid, || self.writer.write(value, ts))
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
    fn barrier(&mut self, env: &mut Env<'_>, id: u64) -> Result<()> {
        crate::chain::PanicSite::run(env.current, self.uid, || self.writer.pre_commit(id))?;
        env.syncs.extend(self.writer.take_sync());
        Ok(())
    }
    fn committed(&mut self, env: &mut Env<'_>, id: u64) -> Result<()> {
        crate::chain::PanicSite::run(env.current, self.uid, || self.writer.commit(id))
    }
    fn end(&mut self, env: &mut Env<'_>) -> Result<()> {
        crate::chain::PanicSite::run(env.current, self.uid, || self.writer.end_of_input(self.checkpointed))
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
        let mut writer = self.sink.writer(rt.shard, rt.parallelism)?;
        writer.recover(rt.restored_checkpoint())?;
        Ok((SinkNode { uid: self.uid, writer, checkpointed: rt.checkpoints().is_some() }, None))
    }
}

// ---------------------------------------------------------------------------------------
// Side outputs
// ---------------------------------------------------------------------------------------

/// A side output of a stage that a stream reads: the records its operators emit under one
/// tag travel over a forward connection to the same shard of the reading stage, and every
/// marker of the stage's input (watermarks, idleness, barriers, end of input) follows them
/// there, so the side stream has event time, takes part in checkpoints and ends.
pub trait SideOutputSpec: Send + Sync + 'static {
    /// The tag's name.
    fn tag(&self) -> &'static str;
    /// This shard's sending side.
    fn build(&self, rt: &ShardRuntime) -> Result<Box<dyn SideOutputTx>>;
}

/// One shard's sending side of a side output, type-erased (a stage may have several).
pub trait SideOutputTx {
    /// The tag's name.
    fn tag(&self) -> &'static str;
    /// Queues a record an operator emitted (a `Box<(T, Timestamp)>`); hands it back when it
    /// is of another type than the tag's reader expects.
    fn record(
        &mut self,
        record: Box<dyn std::any::Any + Send>,
    ) -> std::result::Result<(), Box<dyn std::any::Any + Send>>;
    /// Queues a marker for every shard.
    fn control(&mut self, marker: &Element<()>);
    /// Sends full batches (waits while channels are full).
    fn send_full<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<()>>;
    /// Sends everything queued.
    fn flush<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<()>>;
}

/// The side output `tag` of type `T`, read over `conn`.
pub struct SideOutput<T> {
    tag: &'static str,
    conn: ConnectionId,
    _t: PhantomData<fn(T)>,
}

impl<T> SideOutput<T> {
    /// Side output `tag`, sent over `conn`.
    pub fn new(tag: &'static str, conn: ConnectionId) -> Self {
        SideOutput { tag, conn, _t: PhantomData }
    }
}

impl<T: Send + 'static> SideOutputSpec for SideOutput<T> {
    fn tag(&self) -> &'static str {
        self.tag
    }
    fn build(&self, rt: &ShardRuntime) -> Result<Box<dyn SideOutputTx>> {
        Ok(Box::new(SideSender::<T> {
            tag: self.tag,
            shard: rt.shard,
            parallelism: rt.parallelism,
            tx: rt.sender::<T>(self.conn)?,
        }))
    }
}

struct SideSender<T> {
    tag: &'static str,
    shard: usize,
    parallelism: usize,
    tx: Box<dyn ExchangeTx<T>>,
}

impl<T: Send + 'static> SideOutputTx for SideSender<T> {
    fn tag(&self) -> &'static str {
        self.tag
    }
    fn record(
        &mut self,
        record: Box<dyn std::any::Any + Send>,
    ) -> std::result::Result<(), Box<dyn std::any::Any + Send>> {
        let (value, ts) = *record.downcast::<(T, Timestamp)>()?;
        self.tx.push(self.shard, Element::Record(value, ts));
        Ok(())
    }
    fn control(&mut self, marker: &Element<()>) {
        for target in 0..self.parallelism {
            self.tx.push(target, to_typed(marker));
        }
    }
    fn send_full<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<()>> {
        self.tx.send_full(rt)
    }
    fn flush<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<()>> {
        self.tx.flush(rt)
    }
}

/// A stage's side outputs on one shard.
type SideTxs = RefCell<Vec<Box<dyn SideOutputTx>>>;

/// Sends a marker that the chain has just handled down every side output.
fn side_control(sides: &SideTxs, marker: Element<()>) {
    for side in sides.borrow_mut().iter_mut() {
        side.control(&marker);
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
    /// The uids of the stateful operators whose state lives in this stage's stores.
    fn operator_uids(&self) -> Vec<&'static str>;
    /// This shard's task; `index` is the stage's position in the job.
    fn spawn(&self, rt: Rc<ShardRuntime>, index: usize) -> Result<LocalFuture<'static, Result<()>>>;
}

/// A stage: input, chain, terminal.
pub struct StageSpec<In: 'static, C, Term> {
    input: Box<dyn StageInput<In>>,
    chain: C,
    terminal: Term,
    output: Option<ConnectionId>,
    forward: bool,
    sides: Vec<Box<dyn SideOutputSpec>>,
}

impl<In: 'static, C, Term> StageSpec<In, C, Term> {
    /// Assembles a stage.
    pub fn new(
        input: Box<dyn StageInput<In>>,
        chain: C,
        terminal: Term,
        output: Option<ConnectionId>,
        forward: bool,
        sides: Vec<Box<dyn SideOutputSpec>>,
    ) -> Self {
        StageSpec { input, chain, terminal, output, forward, sides }
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
    fn operator_uids(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        self.chain.operator_uids(&mut out);
        out
    }
    fn spawn(&self, rt: Rc<ShardRuntime>, index: usize) -> Result<LocalFuture<'static, Result<()>>> {
        let pump = self.input.pump(&rt)?;
        let (node, tx) = self.terminal.build(&rt, self.output)?;
        let chain = self.chain.build(node);
        let operators = self.operator_uids();
        let mut restored = crate::chain::RestoredOperatorState::default();
        for uid in &operators {
            restored.insert(uid, rt.restored_operator_state(uid)?);
        }
        let stores = StageStores {
            state: rt.stage_store(self.name(), crate::checkpointing::SPACE_STATE, &operators)?,
            timers: rt.stage_store(&timer_store_name(self.name()), crate::checkpointing::SPACE_TIMERS, &operators)?,
            retained: std::collections::BTreeMap::new(),
            last: None,
            writing_behind: std::sync::Arc::default(),
            operator_state: restored,
        };
        // The checkpoint this run restored stays restorable until a newer one completes: its
        // files are kept by garbage collection like those of checkpoints taken in this run.
        let mut stores = stores;
        if let (Some(id), Some(state), Some(timers)) = (
            rt.restored_checkpoint(),
            rt.restored_handle(self.name()),
            rt.restored_handle(&timer_store_name(self.name())),
        ) {
            stores.retained.insert(id, [state, timers]);
        }
        let sides = self.sides.iter().map(|side| side.build(&rt)).collect::<Result<Vec<_>>>()?;
        let task = index * rt.parallelism + rt.shard;
        let io = StageIo { tx, sides: RefCell::new(sides) };
        Ok(Box::pin(run_stage(pump, chain, io, stores, rt, self.name(), task)))
    }
}

/// The name of a stage's timer store.
pub fn timer_store_name(stage: &str) -> String {
    format!("{stage}.timers")
}

/// A stage instance's two stores, the handles of its checkpoints that may still be restored
/// (their files are kept by garbage collection), and the operator state it restored until its
/// operators take it.
struct StageStores {
    state: weir_state::StateStore,
    timers: weir_state::StateStore,
    retained: std::collections::BTreeMap<u64, [weir_state::store::CheckpointHandle; 2]>,
    /// The last snapshot handed over: it stands for this instance once it finished.
    last: Option<(u64, crate::checkpointing::TaskSnapshot)>,
    /// Whether a write-behind task of the state store is queued or running.
    writing_behind: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Operator state restored for the chain's operators, taken by each when it opens.
    operator_state: crate::chain::RestoredOperatorState,
}

/// Owns a stage instance's stores while it runs and, when it ends (a failure included), hands
/// them to a reaper thread: unmapping a store of hundreds of MiB takes tens of milliseconds,
/// which a restart would otherwise wait for on the shard's thread. Their large anonymous
/// buffers go to the warm pool first ([`weir_state::warm`]): a restart restores the same
/// stores at once, and memory already touched is far cheaper to reuse than new memory.
struct ReapOnDrop(Option<StageStores>);

impl std::ops::Deref for ReapOnDrop {
    type Target = StageStores;
    fn deref(&self) -> &StageStores {
        self.0.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for ReapOnDrop {
    fn deref_mut(&mut self) -> &mut StageStores {
        self.0.as_mut().expect("present until dropped")
    }
}

impl Drop for ReapOnDrop {
    fn drop(&mut self) {
        if let Some(StageStores { state, timers, retained, last, writing_behind, .. }) = self.0.take() {
            let retired = (state.retire(), timers.retire());
            crate::runner::reap(Box::new((retired, retained, last, writing_behind)));
        }
    }
}

/// Full pages of a state store's log written back in the background once this many bytes
/// accumulated since the last write-behind: the checkpoint then syncs at most about this much
/// (plus the last partial page) itself.
const WRITE_BEHIND_BYTES: u32 = 256 << 10;

/// Index entries a restored store folds per pass of its stage loop (see
/// [`weir_state::StateStore::maintain`]): about a quarter of a millisecond at 1 GiB of state
/// (430 ns an entry with the fold's prefetching, `weir-bench state-restore`).
const FOLD_PER_PASS: usize = 512;

/// Bytes of log an idle stage's compaction step may scan per pass (a busy stage's steps scan
/// twice what it appended; see [`weir_state::StateStore::compact_step`]).
const IDLE_COMPACTION_BYTES: u32 = 256 << 10;

impl StageStores {
    /// A slice of the stores' upkeep: the index fold after a restore, or the copy of an index
    /// snapshot a checkpoint past its replay bound waits for; then incremental compaction.
    /// Returns whether more remains (an idle stage comes back for it).
    fn maintain(&mut self, idle: bool) -> Result<bool> {
        let min_bytes = if idle { IDLE_COMPACTION_BYTES } else { 0 };
        let mut more = false;
        for store in [&mut self.state, &mut self.timers] {
            more |= store.maintain(FOLD_PER_PASS)? || store.compact_step(min_bytes)?;
        }
        Ok(more)
    }

    /// Hands the state store's full unsynced pages to the background worker, if there are
    /// enough and none is being written back.
    fn write_behind(&mut self, checkpoints: &crate::checkpointing::CheckpointShared) {
        use std::sync::atomic::Ordering;
        if self.writing_behind.load(Ordering::Acquire) {
            return;
        }
        if let Some(task) = self.state.write_behind(WRITE_BEHIND_BYTES) {
            self.writing_behind.store(true, Ordering::Release);
            checkpoints.background(crate::checkpointing::Background::WriteBehind(
                task,
                std::sync::Arc::clone(&self.writing_behind),
            ));
        }
    }
}

/// What a stage does between elements: push a batch down the chain, or tell it a checkpoint
/// completed.
enum ChainCall<'b, In> {
    Batch(&'b mut Batch<In>),
    Committed(u64),
}

/// What one pass over a batch found.
#[derive(Default)]
struct Pass {
    done: bool,
    /// Records pushed down the chain.
    records: u64,
    snapshots: Vec<Snapshot>,
}

/// What a stage took at a barrier: its stores' pending checkpoints (state, timers), the
/// syncs of what its sinks pre-committed, and its operators' operator state.
struct Snapshot {
    id: u64,
    state: weir_state::store::PendingCheckpoint,
    timers: weir_state::store::PendingCheckpoint,
    sinks: Vec<crate::sink::SyncWork>,
    operator_state: Vec<crate::checkpointing::OperatorStateEntry>,
}

/// A stage's processing time: the clock's until its input is drained (event time reached its
/// end), and from then on the end of time, so that every pending processing-time timer and
/// window fires (as in Flink's batch execution mode) before the final checkpoint, which then
/// covers (and commits) what they emit.
struct StageTime {
    /// When the chain was last told that processing time advanced.
    last_tick: i64,
    /// The input is drained.
    drained: bool,
}

impl StageTime {
    /// Event time ended: fires every processing-time timer (once).
    fn drain<In, N: Node<In>>(&mut self, chain: &mut N, env: &mut Env<'_>) -> Result<()> {
        if self.drained {
            return Ok(());
        }
        self.drained = true;
        self.last_tick = END_OF_TIME;
        env.now = END_OF_TIME;
        chain.tick(env)
    }
}

/// Runs `call` on the chain with the stage's environment, inside one unwind guard: a panic
/// becomes [`RuntimeError::Panic`] naming the operator.
fn run_chain<In: 'static, N: Node<In>>(
    chain: &mut N,
    stores: &mut StageStores,
    rt: &ShardRuntime,
    name: &'static str,
    time: &mut StageTime,
    sides: &SideTxs,
    call: ChainCall<'_, In>,
) -> Result<Pass> {
    let current = std::cell::Cell::new(None);
    let now = if time.drained { END_OF_TIME } else { rt.now() };
    // Records under a tag that a stream reads go down its connection; others (and records of
    // another type than the reader's) are kept for the job's report.
    let mut side = |tag: &'static str, record: Box<dyn std::any::Any + Send>| {
        let unrouted = match sides.borrow_mut().iter_mut().find(|side| side.tag() == tag) {
            Some(side) => side.record(record).err(),
            None => Some(record),
        };
        if let Some(record) = unrouted {
            rt.side_output(tag, record);
        }
    };
    let mut env = Env {
        store: &mut stores.state,
        timer_store: &mut stores.timers,
        shard: rt.shard,
        parallelism: rt.parallelism,
        max_parallelism: rt.config.max_parallelism,
        now,
        side: &mut side,
        current: &current,
        syncs: &mut Vec::new(),
        restored: &mut stores.operator_state,
        operator_state: &mut Vec::new(),
    };
    let mut pass = Pass::default();
    let processed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
        let batch = match call {
            ChainCall::Committed(id) => return chain.committed(&mut env, id),
            ChainCall::Batch(batch) => batch,
        };
        pass.records = batch.records.len() as u64;
        for (v, ts) in batch.records.drain(..).zip(batch.timestamps.drain(..)) {
            chain.record(&mut env, v, ts)?;
        }
        for element in batch.elements.drain(..) {
            match element {
                Element::Record(v, ts) => {
                    pass.records += 1;
                    chain.record(&mut env, v, ts)?;
                }
                Element::Watermark(w) => {
                    chain.watermark(&mut env, w)?;
                    if w == END_OF_TIME {
                        time.drain(chain, &mut env)?;
                    }
                    side_control(sides, Element::Watermark(w));
                }
                Element::Idle(idle) => {
                    chain.idle(&mut env, idle)?;
                    side_control(sides, Element::Idle(idle));
                }
                Element::Barrier(id) => {
                    // Every record before the barrier is in the stores now (operators emit
                    // synchronously): the chain takes its operators' operator state and
                    // forwards the barrier, then both stores are sealed.
                    chain.barrier(&mut env, id)?;
                    side_control(sides, Element::Barrier(id));
                    let state = env.store.checkpoint(id)?;
                    let timers = env.timer_store.checkpoint(id)?;
                    let sinks = std::mem::take(env.syncs);
                    let operator_state = std::mem::take(env.operator_state);
                    pass.snapshots.push(Snapshot { id, state, timers, sinks, operator_state });
                }
                Element::End => {
                    // Stopped without drain: pending windows and timers stay in the savepoint.
                    if !rt.checkpoints().is_some_and(|c| c.stopping_without_drain()) {
                        chain.watermark(&mut env, END_OF_TIME)?;
                        time.drain(chain, &mut env)?;
                    }
                    chain.end(&mut env)?;
                    side_control(sides, Element::End);
                    pass.done = true;
                    break;
                }
            }
        }
        if !pass.done && now.saturating_sub(time.last_tick) >= rt.config.tick_interval_ms {
            time.last_tick = now;
            chain.tick(&mut env)?;
        }
        Ok(())
    }));
    match processed {
        Ok(result) => result.map(|()| pass),
        Err(payload) => Err(RuntimeError::Panic {
            operator: current.get().unwrap_or(name).to_owned(),
            shard: rt.shard,
            message: crate::chain::panic_message(payload.as_ref()),
        }),
    }
}

/// Hands the snapshots a pass took to the checkpoint workers, and lets the stores delete files
/// no restorable checkpoint needs.
fn hand_over_snapshots<In>(
    pass: &mut Pass,
    stores: &mut StageStores,
    pump: &dyn InputPump<In>,
    rt: &ShardRuntime,
    name: &'static str,
    task: usize,
) -> Result<()> {
    let Some(checkpoints) = rt.checkpoints() else { return Ok(()) };
    if pass.snapshots.is_empty() {
        stores.write_behind(checkpoints);
        return Ok(());
    }
    for Snapshot { id, mut state, mut timers, sinks, operator_state } in pass.snapshots.drain(..) {
        // An index snapshot is written apart from the checkpoint: writing a file the size of
        // the index would otherwise be most of the checkpoint's duration.
        for index in [state.detach_index(), timers.detach_index()].into_iter().flatten() {
            checkpoints.background(crate::checkpointing::Background::IndexSnapshot(index));
        }
        // Freeing closed open tails (tens of MiB of touched pages) takes milliseconds.
        for released in [state.take_released(), timers.take_released()].into_iter().flatten() {
            crate::runner::reap(Box::new(released));
        }
        let offsets = pump
            .offsets()
            .into_iter()
            .map(|(split, splits, offset)| crate::checkpointing::SourceOffset {
                uid: name.to_owned(),
                split,
                splits,
                shard: rt.shard as u32,
                offset,
            })
            .collect();
        let snapshot = crate::checkpointing::TaskSnapshot {
            stores: vec![
                (rt.store_dir(name), state.handle.clone()),
                (rt.store_dir(&timer_store_name(name)), timers.handle.clone()),
            ],
            offsets,
            operator_state,
            alignment: pump.alignment(),
        };
        stores.retained.insert(id, [state.handle, timers.handle]);
        stores.last = Some((id, snapshot.clone()));
        checkpoints.snapshot_taken(task, id, snapshot, vec![state.task, timers.task], sinks);
    }
    // Keep the handles of retained complete checkpoints and of those still in flight (newer
    // than the newest complete one); older ones were released or aborted.
    let retained = checkpoints.retained();
    let newest = retained.iter().max().copied().or(checkpoints.restored).unwrap_or(0);
    stores.retained.retain(|id, _| *id > newest || retained.contains(id));
    let states: Vec<_> = stores.retained.values().map(|[s, _]| s).collect();
    let mut garbage = stores.state.garbage(&states)?;
    let timers: Vec<_> = stores.retained.values().map(|[_, t]| t).collect();
    garbage.extend(stores.timers.garbage(&timers)?);
    if !garbage.is_empty() {
        checkpoints.background(crate::checkpointing::Background::Delete(garbage));
    }
    Ok(())
}

/// Where a stage's output goes: its terminal's sender (for exchanges) and its side outputs.
struct StageIo<Out> {
    tx: Option<SharedTx<Out>>,
    sides: SideTxs,
}

impl<Out: 'static> StageIo<Out> {
    /// Sends what the last pass queued: everything when `flush`, else full batches only.
    /// The terminal node only queues; sends (and backpressure) happen here, between batches,
    /// so no borrow of the store or the chain is held across an await.
    async fn send(&self, rt: &ShardRuntime, flush: bool) -> Result<()> {
        if let Some(tx) = &self.tx {
            let mut sender = take_sender(tx);
            let sent = if flush { sender.flush(rt).await } else { sender.send_full(rt).await };
            restore_sender(tx, sender);
            sent?;
        }
        if self.sides.borrow().is_empty() {
            return Ok(());
        }
        let mut sides = self.sides.take();
        let mut sent = Ok(());
        for side in sides.iter_mut() {
            sent = if flush { side.flush(rt).await } else { side.send_full(rt).await };
            if sent.is_err() {
                break;
            }
        }
        *self.sides.borrow_mut() = sides;
        sent
    }
}

async fn run_stage<In: 'static, N: Node<In>, Out: 'static>(
    mut pump: Box<dyn InputPump<In>>,
    mut chain: N,
    io: StageIo<Out>,
    stores: StageStores,
    rt: Rc<ShardRuntime>,
    name: &'static str,
    task: usize,
) -> Result<()> {
    let mut stores = ReapOnDrop(Some(stores));
    let mut batch = Batch::with_capacity(rt.config.source_batch.max(rt.config.batch_len) + 8);
    let mut time = StageTime { last_tick: i64::MIN, drained: false };
    let mut last_barrier = 0;
    let mut last_committed = rt.restored_checkpoint().unwrap_or(0);
    loop {
        if let Some(checkpoints) = rt.checkpoints() {
            let completed = checkpoints.completed();
            if completed > last_committed {
                last_committed = completed;
                let call = ChainCall::Committed(completed);
                run_chain(&mut chain, &mut stores, &rt, name, &mut time, &io.sides, call)?;
            }
        }
        batch.clear();
        let pumped = pump.next(&mut batch, &rt).await?;
        let call = ChainCall::Batch(&mut batch);
        let mut pass = run_chain(&mut chain, &mut stores, &rt, name, &mut time, &io.sides, call)?;
        let barrier = pass.snapshots.last().map(|s| s.id);
        last_barrier = barrier.unwrap_or(last_barrier);
        hand_over_snapshots(&mut pass, &mut stores, pump.as_ref(), &rt, name, task)?;
        let done = pass.done;
        rt.count_batch(name, pass.records);
        // Partial batches go out when the input is drained (records never wait for a batch
        // to fill while this stage waits for input) and after a barrier: a barrier held back in
        // a partial batch while this stage waits on a full channel whose reader is aligning
        // (and so waits for that very barrier) would deadlock the two.
        io.send(&rt, done || pumped == Pumped::Drained || barrier.is_some()).await?;
        // After the send: a slice of upkeep may wait for the disk (the fold after a restore
        // reads the mapped index snapshot), and the batch's output need not wait with it.
        let upkeep = stores.maintain(pumped == Pumped::Drained)?;
        if done {
            // A durability task of the last checkpoint may wait for an index snapshot the
            // stores copy between batches (a store past its replay bound): there are no more.
            stores.state.finish_copies();
            stores.timers.finish_copies();
            if let (Some(checkpoints), Some((id, snapshot))) = (rt.checkpoints(), stores.last.take()) {
                checkpoints.task_finished(task, id, snapshot);
            }
            if io.tx.is_none() && last_barrier > last_committed {
                // A sink stage: its last output is committed by the final checkpoint.
                let committed = wait_for_completion(&rt, last_barrier).await?;
                if committed > last_committed {
                    let call = ChainCall::Committed(committed);
                    run_chain(&mut chain, &mut stores, &rt, name, &mut time, &io.sides, call)?;
                }
            }
            return Ok(());
        }
        if pumped == Pumped::Drained {
            if upkeep {
                // Idle input is time for the upkeep; other tasks of the shard run first.
                rt.yield_now().await;
            } else {
                pump.wait(&rt).await;
            }
        }
    }
}

/// Waits until checkpoint `id` (or a later one) completed; fails when it was aborted (the job
/// restarts from the last complete checkpoint). Returns the completed id, or 0 when the job
/// was cancelled.
async fn wait_for_completion(rt: &ShardRuntime, id: u64) -> Result<u64> {
    let Some(checkpoints) = rt.checkpoints() else { return Ok(0) };
    loop {
        let completed = checkpoints.completed();
        if completed >= id {
            return Ok(completed);
        }
        if checkpoints.final_aborted(id) {
            return Err(RuntimeError::Checkpoint(format!("the final checkpoint {id} failed")));
        }
        if rt.cancelled() {
            return Ok(0);
        }
        rt.sleep(std::time::Duration::from_millis(1)).await;
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
