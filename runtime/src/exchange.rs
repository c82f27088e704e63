//! The keyed exchange: how records cross from one shard to another.
//!
//! Every exchange is a full mesh: for each ordered pair of distinct shards a bounded
//! single-producer, single-consumer glommio `shared_channel`, plus, for each shard, a local
//! queue to itself, so that the records a shard keeps never cross a core. Channels carry
//! [`Batch`]es of [`StreamElement`]s, not single records: one channel slot, one atomic hand-off
//! and at most one wake-up of a parked peer (an `eventfd` write, tens of microseconds) per batch.
//!
//! # Ordering
//! Elements from one source shard to one target shard arrive in the order they were sent,
//! whatever their kind, so watermarks and barriers keep their meaning. There is no order
//! between different source shards.
//!
//! # Backpressure and deadlock
//! Channels are bounded ([`ExchangeConfig::channel_capacity`] batches); a full channel makes
//! [`ExchangeSender::send`] wait. Nothing is ever dropped. Every shard both sends into and
//! receives from the same mesh, so a shard that waited for room while not draining its own
//! inputs could deadlock with a peer doing the same. The rule that prevents it: **on each shard,
//! the sender and the receiver of an exchange are driven by different tasks** (or the receiving
//! side otherwise keeps being polled while a send waits). A receiving task never waits on the
//! sender of the same exchange, only on the next exchange downstream, so in an acyclic job every
//! wait ends.
//!
//! # Failure
//! A channel closes when either end is dropped. A receiver reports an input that closes before
//! it delivered [`StreamElement::EndOfInput`] as [`RuntimeError::InputClosed`]; a sender reports
//! a vanished target as [`RuntimeError::TargetClosed`]. Both wake the peer, so a failed shard
//! cannot leave another one waiting on it.
//!
//! # glommio notes
//! - glommio keeps one waker per pending poll of a shared channel until data (or room) arrives.
//!   A receiver that polls several inputs in turn would pile wakers onto its quiet inputs
//!   without bound, so each channel end here owns a small `Signal` and is polled again only
//!   after glommio fired it.
//! - glommio's `ConnectedSender::send` never completes if the receiver is dropped while the
//!   channel is full (it waits for room, not for closure; measured: it busy-polls a core
//!   forever). Sends here use `try_send` and a wake-up registration instead, so a dead receiver
//!   is noticed.
//! - glommio's `channel_mesh::MeshBuilder` is not used: it numbers peers by glommio's executor
//!   id rather than by shard, and its `join` waits until every peer has joined, so a shard that
//!   fails before joining leaves the others polling forever. The mesh here is built from
//!   `shared_channel`s before the shards start, and a shard that dies drops its unconnected
//!   ends, which releases the peers waiting to connect.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use futures_lite::Stream;
use futures_lite::future::poll_fn;
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};
use glommio::{GlommioError, ResourceType};

use crate::element::{Marker, StreamElement};
use crate::error::{ExchangeUnavailable, Result, RuntimeError};

/// The unit that crosses a channel: elements in send order.
pub type Batch<T> = Vec<StreamElement<T>>;

/// Default [`ExchangeConfig::batch_len`].
pub const DEFAULT_BATCH_LEN: usize = 256;

/// Default [`ExchangeConfig::channel_capacity`].
pub const DEFAULT_CHANNEL_CAPACITY: usize = 8;

/// A task that ran this many batches through an exchange without waiting yields once, so that
/// other tasks of its shard (the other side of the exchange, above all) are not starved:
/// glommio schedules cooperatively and a channel that always has data never returns `Pending`.
const BATCHES_PER_YIELD: u32 = 16;

/// Sizes of one exchange.
///
/// Memory bound per shard and exchange: about `parallelism * (channel_capacity + 2)` batches of
/// `batch_len` elements (the channels into the shard, the batches being filled for each
/// target, the batch being drained from each input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeConfig {
    /// Elements per batch: a batch is sent when it holds this many, or on
    /// [`ExchangeSender::flush`]. Larger batches cost latency, smaller ones throughput.
    pub batch_len: usize,
    /// Batches each channel holds before a sender waits. glommio rounds it up to a power of
    /// two (see [`ExchangeConfig::effective_channel_capacity`]).
    pub channel_capacity: usize,
}

impl Default for ExchangeConfig {
    fn default() -> Self {
        ExchangeConfig { batch_len: DEFAULT_BATCH_LEN, channel_capacity: DEFAULT_CHANNEL_CAPACITY }
    }
}

impl ExchangeConfig {
    /// The capacity a channel really has: glommio's ring buffer is a power of two.
    pub fn effective_channel_capacity(&self) -> usize {
        self.channel_capacity.next_power_of_two()
    }

    fn validate(&self) -> Result<()> {
        if self.batch_len == 0 {
            return Err(RuntimeError::InvalidShardConfig("exchange batch_len must be > 0".into()));
        }
        if self.channel_capacity == 0 {
            return Err(RuntimeError::InvalidShardConfig("exchange channel_capacity must be > 0".into()));
        }
        Ok(())
    }
}

/// An element and the input it arrived on, as [`ExchangeReceiver::next`] hands it out.
pub type Received<T> = (InputId, StreamElement<T>);

/// One input of an [`ExchangeReceiver`]: the shard the elements came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InputId(usize);

impl InputId {
    /// The input fed by `shard` (the local queue when `shard` is the receiving shard).
    pub const fn from_shard(shard: usize) -> Self {
        InputId(shard)
    }

    /// The shard this input's elements were sent by.
    pub const fn source_shard(self) -> usize {
        self.0
    }
}

impl fmt::Display for InputId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "input from shard {}", self.0)
    }
}

static NEXT_EXCHANGES_ID: AtomicU64 = AtomicU64::new(1);

/// The exchanges of a job, created before the shards start (each channel needs both of its
/// ends handed to two shards) and given to [`run_shards`](crate::shard::run_shards), which
/// hands every shard its ends through its [`ShardContext`](crate::shard::ShardContext).
///
/// ```no_run
/// # use weir::exchange::{ExchangeConfig, Exchanges};
/// # use weir::shard::{ShardConfig, run_shards};
/// let config = ShardConfig::with_parallelism(2);
/// let mut exchanges = Exchanges::new(config.parallelism);
/// let words = exchanges.add::<String>(ExchangeConfig::default())?;
/// run_shards(&config, exchanges, |mut ctx| async move {
///     let (sender, receiver) = ctx.exchange(words).await?;
///     // drive `sender` and `receiver` from two tasks
///     # drop((sender, receiver));
///     Ok(())
/// })?;
/// # Ok::<(), weir::error::RuntimeError>(())
/// ```
pub struct Exchanges {
    id: u64,
    parallelism: usize,
    /// `[shard][exchange]`: that shard's ends of that exchange (an `Endpoints<T>`).
    per_shard: Vec<Vec<Option<Box<dyn Any + Send>>>>,
    count: usize,
}

impl fmt::Debug for Exchanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchanges").field("parallelism", &self.parallelism).field("count", &self.count).finish()
    }
}

impl Exchanges {
    /// No exchanges yet, for a job of `parallelism` shards.
    pub fn new(parallelism: usize) -> Self {
        Exchanges {
            id: NEXT_EXCHANGES_ID.fetch_add(1, Ordering::Relaxed),
            parallelism,
            per_shard: (0..parallelism).map(|_| Vec::new()).collect(),
            count: 0,
        }
    }

    /// The number of shards these exchanges connect.
    pub fn parallelism(&self) -> usize {
        self.parallelism
    }

    /// The number of exchanges.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no exchanges.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds an exchange carrying elements of type `T`: creates its `parallelism *
    /// (parallelism - 1)` channels. The handle names it on every shard.
    pub fn add<T: Send + 'static>(&mut self, config: ExchangeConfig) -> Result<ExchangeHandle<T>> {
        config.validate()?;
        if self.parallelism == 0 {
            return Err(RuntimeError::InvalidShardConfig("parallelism must be > 0".into()));
        }
        let p = self.parallelism;
        let mut ends: Vec<Endpoints<T>> = (0..p)
            .map(|shard| Endpoints {
                shard,
                config,
                senders: (0..p).map(|_| None).collect(),
                receivers: (0..p).map(|_| None).collect(),
            })
            .collect();
        for from in 0..p {
            for to in (0..p).filter(|&to| to != from) {
                let (sender, receiver) = shared_channel::new_bounded(config.effective_channel_capacity());
                ends[from].senders[to] = Some(sender);
                ends[to].receivers[from] = Some(receiver);
            }
        }
        for (shard, end) in ends.into_iter().enumerate() {
            self.per_shard[shard].push(Some(Box::new(end)));
        }
        let handle = ExchangeHandle { registry: self.id, index: self.count, _type: PhantomData };
        self.count += 1;
        Ok(handle)
    }

    /// Splits into each shard's ends, in shard order.
    pub(crate) fn into_shards(self) -> Vec<ShardExchanges> {
        let registry = self.id;
        self.per_shard.into_iter().map(|endpoints| ShardExchanges { registry, endpoints }).collect()
    }
}

/// Names one exchange of an [`Exchanges`] set, with its element type, on any shard.
pub struct ExchangeHandle<T> {
    registry: u64,
    index: usize,
    // `fn() -> T`: the handle is `Send`, `Sync` and `Copy` whatever `T` is; it holds no `T`.
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for ExchangeHandle<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for ExchangeHandle<T> {}

impl<T> fmt::Debug for ExchangeHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExchangeHandle").field("index", &self.index).finish()
    }
}

/// One shard's ends of every exchange, before it connects them.
pub(crate) struct ShardExchanges {
    registry: u64,
    endpoints: Vec<Option<Box<dyn Any + Send>>>,
}

impl ShardExchanges {
    /// Takes and connects this shard's ends of `handle`'s exchange. Waits until every peer
    /// connected its ends (or dropped them: then the channel is closed).
    pub(crate) async fn connect<T: Send + 'static>(
        &mut self,
        handle: ExchangeHandle<T>,
    ) -> Result<(ExchangeSender<T>, ExchangeReceiver<T>)> {
        let unavailable = |reason| RuntimeError::ExchangeUnavailable { index: handle.index, reason };
        if handle.registry != self.registry {
            return Err(unavailable(ExchangeUnavailable::ForeignHandle));
        }
        let slot = self.endpoints.get_mut(handle.index).ok_or(unavailable(ExchangeUnavailable::ForeignHandle))?;
        let any = slot.take().ok_or(unavailable(ExchangeUnavailable::AlreadyTaken))?;
        let endpoints = any.downcast::<Endpoints<T>>().map_err(|_| unavailable(ExchangeUnavailable::ForeignHandle))?;
        Ok(endpoints.connect().await)
    }
}

/// One shard's unconnected ends of one exchange: `senders[t]` to shard `t`, `receivers[s]` from
/// shard `s`, `None` at the shard's own index (the local queue replaces that channel).
struct Endpoints<T: Send + 'static> {
    shard: usize,
    config: ExchangeConfig,
    senders: Vec<Option<SharedSender<Batch<T>>>>,
    receivers: Vec<Option<SharedReceiver<Batch<T>>>>,
}

impl<T: Send + 'static> Endpoints<T> {
    async fn connect(self) -> (ExchangeSender<T>, ExchangeReceiver<T>) {
        // Each `connect` waits for the peer's; starting them all before awaiting any is what
        // keeps two shards from waiting on each other's second channel.
        let senders: Vec<_> =
            self.senders.into_iter().map(|end| end.map(|end| glommio::spawn_local(end.connect()))).collect();
        let receivers: Vec<_> =
            self.receivers.into_iter().map(|end| end.map(|end| glommio::spawn_local(end.connect()))).collect();
        let mut connected_senders = Vec::with_capacity(senders.len());
        for task in senders {
            connected_senders.push(match task {
                Some(task) => Some(task.await),
                None => None,
            });
        }
        let mut connected_receivers = Vec::with_capacity(receivers.len());
        for task in receivers {
            connected_receivers.push(match task {
                Some(task) => Some(task.await),
                None => None,
            });
        }

        let parallelism = connected_senders.len();
        let capacity = self.config.effective_channel_capacity();
        let local = Rc::new(LocalQueue::new(capacity));
        let pool = Rc::new(BatchPool::new(self.config.batch_len, parallelism + capacity));
        let sender = ExchangeSender::new(
            self.shard,
            self.config.batch_len,
            connected_senders,
            LocalTx(local.clone()),
            pool.clone(),
        );
        let receiver = ExchangeReceiver::new(self.shard, connected_receivers, local, pool);
        (sender, receiver)
    }
}

/// Where a task's waker is kept while it waits on several channel ends.
type TaskSlot = Arc<Mutex<Option<Waker>>>;

fn park_task(slot: &TaskSlot, waker: &Waker) {
    let mut task = slot.lock().unwrap_or_else(PoisonError::into_inner);
    match task.as_ref() {
        Some(current) if current.will_wake(waker) => {}
        _ => *task = Some(waker.clone()),
    }
}

/// The waker one channel end registers with glommio. `armed` is true from registration until
/// glommio fires it; while armed, the end is not polled again, so glommio holds at most one of
/// its wakers at a time.
struct Signal {
    armed: AtomicBool,
    task: TaskSlot,
}

impl Signal {
    fn new(task: TaskSlot) -> (Arc<Signal>, Waker) {
        let signal = Arc::new(Signal { armed: AtomicBool::new(false), task });
        let waker = Waker::from(signal.clone());
        (signal, waker)
    }

    fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::Release);
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.armed.store(false, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(task) = task {
            task.wake();
        }
    }
}

/// The bounded queue from a shard to itself: its own records never cross a core, but are
/// bounded like any channel.
struct LocalQueue<T> {
    state: std::cell::RefCell<LocalQueueState<T>>,
}

struct LocalQueueState<T> {
    batches: VecDeque<Batch<T>>,
    capacity: usize,
    sender_open: bool,
    receiver_open: bool,
    sender_waker: Option<Waker>,
    receiver_waker: Option<Waker>,
}

impl<T> LocalQueue<T> {
    fn new(capacity: usize) -> Self {
        LocalQueue {
            state: std::cell::RefCell::new(LocalQueueState {
                batches: VecDeque::with_capacity(capacity),
                capacity,
                sender_open: true,
                receiver_open: true,
                sender_waker: None,
                receiver_waker: None,
            }),
        }
    }

    fn try_push(&self, batch: Batch<T>) -> Push<T> {
        let waker = {
            let mut state = self.state.borrow_mut();
            if !state.receiver_open {
                return Push::Closed;
            }
            if state.batches.len() >= state.capacity {
                return Push::Full(batch);
            }
            state.batches.push_back(batch);
            state.receiver_waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Push::Sent
    }

    /// Ready once a batch fits or the receiver is gone.
    fn poll_room(&self, cx: &Context<'_>) -> Poll<()> {
        let mut state = self.state.borrow_mut();
        if !state.receiver_open || state.batches.len() < state.capacity {
            Poll::Ready(())
        } else {
            state.sender_waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Ready(None) once the sender is gone and the queue is drained.
    fn poll_pop(&self, cx: &Context<'_>) -> Poll<Option<Batch<T>>> {
        let (batch, waker) = {
            let mut state = self.state.borrow_mut();
            match state.batches.pop_front() {
                Some(batch) => (batch, state.sender_waker.take()),
                None if !state.sender_open => return Poll::Ready(None),
                None => {
                    state.receiver_waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Poll::Ready(Some(batch))
    }

    fn close(&self, sender_side: bool) {
        let waker = {
            let mut state = self.state.borrow_mut();
            if sender_side {
                state.sender_open = false;
                state.receiver_waker.take()
            } else {
                state.receiver_open = false;
                state.batches.clear();
                state.sender_waker.take()
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The sending end of the local queue; closes it when dropped.
struct LocalTx<T>(Rc<LocalQueue<T>>);

impl<T> Drop for LocalTx<T> {
    fn drop(&mut self) {
        self.0.close(true);
    }
}

/// The receiving end of the local queue; closes it when dropped.
struct LocalRx<T>(Rc<LocalQueue<T>>);

impl<T> Drop for LocalRx<T> {
    fn drop(&mut self) {
        self.0.close(false);
    }
}

/// Emptied batches of one shard and exchange, for reuse: batches arrive from peers and leave
/// to peers, so under even traffic a shard sends in the vectors it received and allocates
/// nothing per batch. Bounded; beyond the bound batches are freed.
struct BatchPool<T> {
    free: std::cell::RefCell<Vec<Batch<T>>>,
    batch_len: usize,
    max_free: usize,
}

impl<T> BatchPool<T> {
    fn new(batch_len: usize, max_free: usize) -> Self {
        BatchPool { free: std::cell::RefCell::new(Vec::with_capacity(max_free)), batch_len, max_free }
    }

    fn take(&self) -> Batch<T> {
        self.free.borrow_mut().pop().unwrap_or_else(|| Vec::with_capacity(self.batch_len))
    }

    fn give(&self, mut batch: Batch<T>) {
        if batch.capacity() < self.batch_len {
            return;
        }
        batch.clear();
        let mut free = self.free.borrow_mut();
        if free.len() < self.max_free {
            free.push(batch);
        }
    }
}

/// What became of a batch offered to a channel or the local queue.
enum Push<T> {
    Sent,
    /// No room; the batch is handed back.
    Full(Batch<T>),
    /// The receiving end is gone.
    Closed,
}

/// A channel to another shard, with its wake-up registration.
struct RemoteOutput<T: Send + 'static> {
    channel: ConnectedSender<Batch<T>>,
    signal: Arc<Signal>,
    waker: Waker,
}

impl<T: Send + 'static> RemoteOutput<T> {
    fn try_push(&self, batch: Batch<T>) -> Push<T> {
        match self.channel.try_send(batch) {
            Ok(()) => Push::Sent,
            Err(GlommioError::WouldBlock(ResourceType::Channel(batch))) => Push::Full(batch),
            // Closed, or anything a later glommio adds: the batch cannot be delivered.
            Err(_) => Push::Closed,
        }
    }

    /// Returns after glommio saw room in the channel or its receiver closing (or at once when
    /// registering found room). glommio has no "wait until writable" call; its `send` waits for
    /// room, so it is polled with an empty batch to register the wake-up and then dropped. If
    /// room appears in that instant the empty batch is sent; receivers skip empty batches.
    async fn wait_for_room(&self, task: &TaskSlot) {
        let mut registered = false;
        poll_fn(|cx| {
            if registered && !self.signal.is_armed() {
                return Poll::Ready(());
            }
            if !self.signal.is_armed() {
                self.signal.arm();
                let probe = pin!(self.channel.send(Vec::new()));
                if probe.poll(&mut Context::from_waker(&self.waker)).is_ready() {
                    self.signal.armed.store(false, Ordering::Release);
                    return Poll::Ready(());
                }
            }
            registered = true;
            park_task(task, cx.waker());
            Poll::Pending
        })
        .await
    }
}

/// The sending side of an exchange on one shard.
///
/// [`send`](Self::send) appends to a per-target batch and ships the batch once it holds
/// `batch_len` elements; [`flush`](Self::flush) ships partial batches and belongs before any
/// point where the shard might go idle (end of a source poll, before awaiting input), since a
/// partial batch is otherwise held back indefinitely. Shipping waits while the target's
/// channel is full. Dropping the sender closes its channels; receivers treat that as a
/// failure unless end-of-input was sent first.
pub struct ExchangeSender<T: Send + 'static> {
    shard: usize,
    batch_len: usize,
    /// The batch being filled for each target.
    buffers: Vec<Batch<T>>,
    /// A batch taken from `buffers` that its channel has not accepted yet. It stays here while
    /// the send waits for room, so a send future dropped mid-wait loses nothing: the next
    /// send, flush or broadcast to that target delivers it first.
    in_flight: Vec<Option<Batch<T>>>,
    /// Targets that were sent end-of-input.
    ended: Vec<bool>,
    /// `None` at the shard's own index.
    remotes: Vec<Option<RemoteOutput<T>>>,
    local: LocalTx<T>,
    pool: Rc<BatchPool<T>>,
    task: TaskSlot,
    shipped_since_yield: u32,
}

impl<T: Send + 'static> fmt::Debug for ExchangeSender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExchangeSender")
            .field("shard", &self.shard)
            .field("parallelism", &self.buffers.len())
            .field("batch_len", &self.batch_len)
            .finish()
    }
}

impl<T: Send + 'static> ExchangeSender<T> {
    fn new(
        shard: usize,
        batch_len: usize,
        channels: Vec<Option<ConnectedSender<Batch<T>>>>,
        local: LocalTx<T>,
        pool: Rc<BatchPool<T>>,
    ) -> Self {
        let task = TaskSlot::default();
        let parallelism = channels.len();
        let remotes = channels
            .into_iter()
            .map(|channel| {
                channel.map(|channel| {
                    let (signal, waker) = Signal::new(task.clone());
                    RemoteOutput { channel, signal, waker }
                })
            })
            .collect();
        ExchangeSender {
            shard,
            batch_len,
            buffers: (0..parallelism).map(|_| pool.take()).collect(),
            in_flight: (0..parallelism).map(|_| None).collect(),
            ended: vec![false; parallelism],
            remotes,
            local,
            pool,
            task,
            shipped_since_yield: 0,
        }
    }

    /// The shard this sender runs on.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The number of targets (shards).
    pub fn parallelism(&self) -> usize {
        self.buffers.len()
    }

    /// Sends `element` to shard `target`: buffers it, and ships the target's batch when it is
    /// full, or at once when `element` is end-of-input (nothing may follow it to `target`).
    pub async fn send(&mut self, target: usize, element: StreamElement<T>) -> Result<()> {
        self.check_target(target)?;
        let ends = matches!(element, StreamElement::EndOfInput);
        self.buffers[target].push(element);
        if ends {
            self.ended[target] = true;
            self.ship(target).await
        } else if self.buffers[target].len() >= self.batch_len {
            self.ship(target).await
        } else {
            Ok(())
        }
    }

    /// Sends a record with its event timestamp to shard `target`.
    pub async fn send_record(&mut self, target: usize, value: T, timestamp: i64) -> Result<()> {
        self.send(target, StreamElement::Record { value, timestamp }).await
    }

    /// Sends `marker` to every shard, this one included, after the elements already buffered
    /// for each, then flushes: a marker is a promise about what came before it, so it is not
    /// left waiting in a partial batch.
    pub async fn broadcast(&mut self, marker: Marker) -> Result<()> {
        for target in 0..self.parallelism() {
            self.check_target(target)?;
        }
        for target in 0..self.parallelism() {
            self.buffers[target].push(marker.into());
            if marker == Marker::EndOfInput {
                self.ended[target] = true;
            }
        }
        self.flush().await
    }

    /// Ships every partial batch. Call before the shard may go idle.
    pub async fn flush(&mut self) -> Result<()> {
        for target in 0..self.parallelism() {
            if !self.buffers[target].is_empty() || self.in_flight[target].is_some() {
                self.ship(target).await?;
            }
        }
        Ok(())
    }

    fn check_target(&self, target: usize) -> Result<()> {
        match self.ended.get(target) {
            None => Err(RuntimeError::InvalidTarget { target, parallelism: self.parallelism() }),
            Some(true) => Err(RuntimeError::SendAfterEndOfInput { target }),
            Some(false) => Ok(()),
        }
    }

    /// Delivers `target`'s in-flight batch, if any, then its current batch (if not empty).
    async fn ship(&mut self, target: usize) -> Result<()> {
        self.deliver(target).await?;
        if self.buffers[target].is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.buffers[target], self.pool.take());
        self.in_flight[target] = Some(batch);
        self.deliver(target).await?;
        self.shipped_since_yield += 1;
        if self.shipped_since_yield >= BATCHES_PER_YIELD {
            self.shipped_since_yield = 0;
            futures_lite::future::yield_now().await;
        }
        Ok(())
    }

    /// Hands `target`'s in-flight batch to its channel (or the local queue), waiting for room.
    async fn deliver(&mut self, target: usize) -> Result<()> {
        let closed = RuntimeError::TargetClosed { target };
        while let Some(batch) = self.in_flight[target].take() {
            let remote = self.remotes.get(target).and_then(Option::as_ref);
            debug_assert!(remote.is_some() || target == self.shard, "no channel to {target}");
            let pushed = match remote {
                Some(remote) => remote.try_push(batch),
                None => self.local.0.try_push(batch),
            };
            match pushed {
                Push::Sent => {}
                Push::Closed => return Err(closed),
                Push::Full(batch) => {
                    self.in_flight[target] = Some(batch);
                    match remote {
                        Some(remote) => remote.wait_for_room(&self.task).await,
                        None => poll_fn(|cx| self.local.0.poll_room(cx)).await,
                    }
                }
            }
        }
        Ok(())
    }
}

/// A channel from another shard, with its wake-up registration.
struct RemoteInput<T: Send + 'static> {
    channel: ConnectedReceiver<Batch<T>>,
    signal: Arc<Signal>,
    waker: Waker,
}

enum InputSource<T: Send + 'static> {
    Remote(RemoteInput<T>),
    Local(LocalRx<T>),
}

impl<T: Send + 'static> InputSource<T> {
    /// The next batch; `Ready(None)` when the input closed.
    fn poll_batch(&mut self, cx: &Context<'_>) -> Poll<Option<Batch<T>>> {
        match self {
            InputSource::Local(local) => local.0.poll_pop(cx),
            InputSource::Remote(remote) => {
                if remote.signal.is_armed() {
                    return Poll::Pending;
                }
                let mut channel_cx = Context::from_waker(&remote.waker);
                loop {
                    remote.signal.arm();
                    let polled = std::pin::Pin::new(&mut remote.channel).poll_next(&mut channel_cx);
                    if polled.is_pending() {
                        return Poll::Pending; // armed: glommio holds `remote.waker`
                    }
                    // Not registered with glommio; more batches may be waiting.
                    remote.signal.armed.store(false, Ordering::Release);
                    match polled {
                        // An empty batch (left by `wait_for_room`) carries nothing; returning
                        // it would leave this input neither armed nor drained.
                        Poll::Ready(Some(batch)) if batch.is_empty() => continue,
                        polled => return polled,
                    }
                }
            }
        }
    }
}

struct Input<T: Send + 'static> {
    source: InputSource<T>,
    /// The batch being handed out, front first.
    batch: VecDeque<StreamElement<T>>,
    blocked: bool,
    ended: bool,
}

/// The receiving side of an exchange on one shard: one input per shard (the peers' channels
/// and the local queue), each element tagged with the [`InputId`] it came from.
///
/// Inputs are served round-robin, a batch at a time. An input can be
/// [`block`](Self::block)ed — its elements stay queued (and its channel fills, pushing back on
/// its sender) until [`unblock`](Self::unblock) — which is what barrier alignment needs. Each
/// input's end-of-input is delivered; after the last one, [`next`](Self::next) returns
/// `Ok(None)`.
pub struct ExchangeReceiver<T: Send + 'static> {
    shard: usize,
    inputs: Vec<Input<T>>,
    /// The input being served.
    cursor: usize,
    open_inputs: usize,
    pool: Rc<BatchPool<T>>,
    task: TaskSlot,
    batches_since_yield: u32,
}

impl<T: Send + 'static> fmt::Debug for ExchangeReceiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExchangeReceiver")
            .field("shard", &self.shard)
            .field("inputs", &self.inputs.len())
            .field("open_inputs", &self.open_inputs)
            .finish()
    }
}

impl<T: Send + 'static> ExchangeReceiver<T> {
    fn new(
        shard: usize,
        channels: Vec<Option<ConnectedReceiver<Batch<T>>>>,
        local: Rc<LocalQueue<T>>,
        pool: Rc<BatchPool<T>>,
    ) -> Self {
        let task = TaskSlot::default();
        // `Endpoints` hold exactly one `None`: the shard's own index, served by the local queue.
        debug_assert_eq!(channels.iter().filter(|c| c.is_none()).count(), 1);
        let inputs: Vec<Input<T>> = channels
            .into_iter()
            .map(|channel| {
                let source = match channel {
                    Some(channel) => {
                        let (signal, waker) = Signal::new(task.clone());
                        InputSource::Remote(RemoteInput { channel, signal, waker })
                    }
                    None => InputSource::Local(LocalRx(local.clone())),
                };
                Input { source, batch: VecDeque::new(), blocked: false, ended: false }
            })
            .collect();
        ExchangeReceiver { shard, open_inputs: inputs.len(), inputs, cursor: shard, pool, task, batches_since_yield: 0 }
    }

    /// The shard this receiver runs on.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Every input, in shard order.
    pub fn inputs(&self) -> impl Iterator<Item = InputId> + use<T> {
        (0..self.inputs.len()).map(InputId)
    }

    /// Inputs that have not delivered end-of-input.
    pub fn open_inputs(&self) -> usize {
        self.open_inputs
    }

    /// Whether `input` delivered end-of-input (or closed).
    pub fn is_ended(&self, input: InputId) -> bool {
        self.inputs.get(input.0).is_some_and(|i| i.ended)
    }

    /// Whether `input` is blocked.
    pub fn is_blocked(&self, input: InputId) -> bool {
        self.inputs.get(input.0).is_some_and(|i| i.blocked)
    }

    /// Stops delivering elements from `input` until [`unblock`](Self::unblock); its elements
    /// wait, in order, and its sender is eventually held back by the full channel.
    pub fn block(&mut self, input: InputId) -> Result<()> {
        self.set_blocked(input, true)
    }

    /// Resumes delivering elements from `input`.
    pub fn unblock(&mut self, input: InputId) -> Result<()> {
        self.set_blocked(input, false)
    }

    fn set_blocked(&mut self, input: InputId, blocked: bool) -> Result<()> {
        let inputs = self.inputs.len();
        let entry =
            self.inputs.get_mut(input.0).ok_or(RuntimeError::InvalidTarget { target: input.0, parallelism: inputs })?;
        entry.blocked = blocked;
        Ok(())
    }

    /// The next element and the input it came from; `Ok(None)` once every input delivered
    /// end-of-input. Waits while every unblocked input is empty.
    ///
    /// Errors: [`RuntimeError::InputClosed`] when an input closed without end-of-input (its
    /// shard failed; the input then counts as ended), [`RuntimeError::AllInputsBlocked`] when
    /// every open input is blocked.
    pub async fn next(&mut self) -> Result<Option<Received<T>>> {
        poll_fn(|cx| self.poll_next_element(cx)).await
    }

    /// Poll form of [`next`](Self::next).
    pub fn poll_next_element(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Received<T>>>> {
        let n = self.inputs.len();
        let mut any_unblocked = false;
        for _ in 0..n {
            let index = self.cursor;
            let input = &mut self.inputs[index];
            if !input.ended && !input.blocked {
                any_unblocked = true;
                if input.batch.is_empty() {
                    if self.batches_since_yield >= BATCHES_PER_YIELD {
                        self.batches_since_yield = 0;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    match input.source.poll_batch(cx) {
                        Poll::Ready(Some(batch)) => {
                            self.batches_since_yield += 1;
                            input.batch = VecDeque::from(batch);
                        }
                        Poll::Ready(None) => {
                            input.ended = true;
                            self.open_inputs -= 1;
                            return Poll::Ready(Err(RuntimeError::InputClosed { source_shard: index }));
                        }
                        Poll::Pending => {}
                    }
                }
                if let Some(element) = input.batch.pop_front() {
                    if matches!(element, StreamElement::EndOfInput) {
                        input.ended = true;
                        self.open_inputs -= 1;
                        input.batch.clear();
                    }
                    if input.batch.is_empty() {
                        // Batch done: recycle its vector and serve the next input.
                        self.pool.give(Vec::from(std::mem::take(&mut input.batch)));
                        self.cursor = (index + 1) % n;
                    }
                    return Poll::Ready(Ok(Some((InputId(index), element))));
                }
            }
            self.cursor = (index + 1) % n;
        }
        if self.open_inputs == 0 {
            return Poll::Ready(Ok(None));
        }
        if !any_unblocked {
            return Poll::Ready(Err(RuntimeError::AllInputsBlocked));
        }
        self.batches_since_yield = 0;
        park_task(&self.task, cx.waker());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::{Barrier, BarrierKind};
    use glommio::{LocalExecutorBuilder, Placement};

    /// Runs `f` on a one-off executor with little io memory (see `shard.rs` on memlock).
    fn on_executor<R>(f: impl Future<Output = R>) -> R {
        let executor =
            LocalExecutorBuilder::new(Placement::Unbound).io_memory(64 << 10).make().expect("test executor starts");
        executor.run(f)
    }

    fn config(batch_len: usize, channel_capacity: usize) -> ExchangeConfig {
        ExchangeConfig { batch_len, channel_capacity }
    }

    /// Both shards' ends of a two-shard exchange, connected inside one executor: the channels
    /// are single-producer single-consumer and do not care that both ends share a thread.
    async fn two_shards(config: ExchangeConfig) -> Vec<(ExchangeSender<u32>, ExchangeReceiver<u32>)> {
        let mut exchanges = Exchanges::new(2);
        let handle = exchanges.add::<u32>(config).expect("valid config");
        let shards = exchanges.into_shards();
        let connecting: Vec<_> = shards
            .into_iter()
            .map(|mut ends| glommio::spawn_local(async move { ends.connect(handle).await.expect("connects") }))
            .collect();
        let mut out = Vec::new();
        for task in connecting {
            out.push(task.await);
        }
        out
    }

    #[test]
    fn local_records_come_back_in_order_and_end() {
        on_executor(async {
            let mut exchanges = Exchanges::new(1);
            let handle = exchanges.add::<u32>(config(4, 2)).expect("valid config");
            let mut ends = exchanges.into_shards().pop().expect("one shard");
            let (mut tx, mut rx) = ends.connect(handle).await.expect("connects");
            let producer = glommio::spawn_local(async move {
                for i in 0..100 {
                    tx.send_record(0, i, i64::from(i)).await?;
                }
                tx.broadcast(Marker::EndOfInput).await
            });
            let mut seen = Vec::new();
            while let Some((input, element)) = rx.next().await.expect("no failure") {
                assert_eq!(input, InputId::from_shard(0));
                if let StreamElement::Record { value, .. } = element {
                    seen.push(value);
                }
            }
            producer.await.expect("producer succeeds");
            assert_eq!(seen, (0..100).collect::<Vec<_>>());
        });
    }

    #[test]
    fn rejects_zero_sizes_and_reuse() {
        let mut exchanges = Exchanges::new(2);
        assert!(exchanges.add::<u8>(config(0, 1)).is_err());
        assert!(exchanges.add::<u8>(config(1, 0)).is_err());
        let handle = exchanges.add::<u8>(config(1, 1)).expect("valid");
        let foreign = Exchanges::new(2).add::<u8>(config(1, 1)).expect("valid");
        on_executor(async move {
            let mut shards = exchanges.into_shards();
            let mut first = shards.remove(0);
            drop(shards); // the peer's ends close: connect still returns
            assert!(matches!(
                first.connect(foreign).await,
                Err(RuntimeError::ExchangeUnavailable { reason: ExchangeUnavailable::ForeignHandle, .. })
            ));
            let (mut tx, mut rx) = first.connect(handle).await.expect("connects");
            assert!(matches!(
                first.connect(handle).await,
                Err(RuntimeError::ExchangeUnavailable { reason: ExchangeUnavailable::AlreadyTaken, .. })
            ));
            // The peer never connected: sending to it fails, its input reads as closed.
            assert!(matches!(tx.send_record(1, 5, 0).await, Err(RuntimeError::TargetClosed { target: 1 })));
            assert!(matches!(
                tx.send_record(2, 5, 0).await,
                Err(RuntimeError::InvalidTarget { target: 2, parallelism: 2 })
            ));
            assert!(matches!(rx.next().await, Err(RuntimeError::InputClosed { source_shard: 1 })));
        });
    }

    #[test]
    fn blocked_input_waits_while_others_flow() {
        on_executor(async {
            let mut shards = two_shards(config(2, 4)).await;
            let (mut tx1, rx1) = shards.pop().expect("shard 1");
            let (mut tx0, mut rx0) = shards.pop().expect("shard 0");
            drop(rx1);
            // Shard 1 sends 1..=4 to shard 0; shard 0 sends 100..=103 to itself.
            for i in 1..=4 {
                tx1.send_record(0, i, 0).await.expect("send");
                tx0.send_record(0, 99 + i, 0).await.expect("send");
            }
            tx1.flush().await.expect("flush");
            tx0.flush().await.expect("flush");
            let remote = InputId::from_shard(1);
            rx0.block(remote).expect("valid input");
            for expected in 100..=103 {
                let (input, element) = rx0.next().await.expect("ok").expect("element");
                assert_eq!((input, element), (InputId::from_shard(0), StreamElement::record(expected, 0)));
            }
            // Only the blocked input has data: receiving must not hand it out.
            let pending = futures_lite::future::poll_once(rx0.next()).await;
            assert!(pending.is_none(), "blocked input delivered {pending:?}");
            rx0.unblock(remote).expect("valid input");
            for expected in 1..=4 {
                let (input, element) = rx0.next().await.expect("ok").expect("element");
                assert_eq!((input, element), (remote, StreamElement::record(expected, 0)));
            }
            rx0.block(InputId::from_shard(0)).expect("valid");
            rx0.block(remote).expect("valid");
            assert!(matches!(rx0.next().await, Err(RuntimeError::AllInputsBlocked)));
        });
    }

    #[test]
    fn markers_keep_their_place_among_records() {
        on_executor(async {
            let mut shards = two_shards(config(3, 1)).await;
            let (mut tx1, rx1) = shards.pop().expect("shard 1");
            let (tx0, mut rx0) = shards.pop().expect("shard 0");
            let barrier = Barrier { checkpoint_id: 1, kind: BarrierKind::Checkpoint };
            // Shard 1's own input must be drained too: its sender broadcasts to itself.
            let drainer = glommio::spawn_local(async move {
                let mut rx1 = rx1;
                while rx1.next().await?.is_some() {}
                Ok::<_, RuntimeError>(())
            });
            let sender = glommio::spawn_local(async move {
                tx1.send_record(0, 1, 10).await?;
                tx1.broadcast(Marker::Watermark(10)).await?;
                tx1.send_record(0, 2, 11).await?;
                tx1.broadcast(Marker::Barrier(barrier)).await?;
                tx1.send_record(0, 3, 12).await?;
                tx1.broadcast(Marker::EndOfInput).await?;
                assert!(matches!(
                    tx1.send_record(0, 4, 13).await,
                    Err(RuntimeError::SendAfterEndOfInput { target: 0 })
                ));
                Ok::<_, RuntimeError>(())
            });
            let mut tx0 = tx0;
            tx0.broadcast(Marker::EndOfInput).await.expect("local end");
            let mut from_peer = Vec::new();
            while let Some((input, element)) = rx0.next().await.expect("ok") {
                if input == InputId::from_shard(1) {
                    from_peer.push(element);
                }
            }
            sender.await.expect("sender ok");
            drainer.await.expect("drainer ok");
            assert_eq!(
                from_peer,
                vec![
                    StreamElement::record(1, 10),
                    StreamElement::Watermark(10),
                    StreamElement::record(2, 11),
                    StreamElement::Barrier(barrier),
                    StreamElement::record(3, 12),
                    StreamElement::EndOfInput,
                ]
            );
        });
    }

    #[test]
    fn a_cancelled_send_loses_nothing() {
        on_executor(async {
            let mut shards = two_shards(config(1, 1)).await;
            let (_tx1, mut rx1) = shards.pop().expect("shard 1");
            let (mut tx0, _rx0) = shards.pop().expect("shard 0");
            tx0.send_record(1, 1, 0).await.expect("fits");
            // The channel is full: this send waits, and is dropped while waiting.
            let cancelled = futures_lite::future::poll_once(tx0.send_record(1, 2, 0)).await;
            assert!(cancelled.is_none(), "send into a full channel completed");
            let first = rx1.next().await.expect("ok").expect("element");
            assert_eq!(first, (InputId::from_shard(0), StreamElement::record(1, 0)));
            let sending = glommio::spawn_local(async move {
                tx0.send_record(1, 3, 0).await?;
                tx0.flush().await?;
                Ok::<_, RuntimeError>(tx0)
            });
            for expected in [2, 3] {
                let (_, element) = rx1.next().await.expect("ok").expect("element");
                assert_eq!(element, StreamElement::record(expected, 0));
            }
            sending.await.expect("sends");
        });
    }

    #[test]
    fn a_send_waiting_on_a_full_channel_fails_when_the_receiver_goes() {
        // glommio's own `send` would wait forever here (it waits for room, not for closure).
        on_executor(async {
            let mut shards = two_shards(config(1, 1)).await;
            let (_tx1, rx1) = shards.pop().expect("shard 1");
            let (mut tx0, _rx0) = shards.pop().expect("shard 0");
            tx0.send_record(1, 1, 0).await.expect("fits");
            let waiting = glommio::spawn_local(async move { tx0.send_record(1, 2, 0).await });
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
            drop(rx1);
            assert!(matches!(waiting.await, Err(RuntimeError::TargetClosed { target: 1 })));
        });
    }

    #[test]
    fn an_empty_batch_does_not_lose_the_wake_up() {
        // The empty batch `wait_for_room` may leave behind must not leave the input unwatched.
        on_executor(async {
            let mut shards = two_shards(config(4, 4)).await;
            let (mut tx1, _rx1) = shards.pop().expect("shard 1");
            let (mut tx0, mut rx0) = shards.pop().expect("shard 0");
            tx0.broadcast(Marker::EndOfInput).await.expect("local end");
            let channel = &tx1.remotes[0].as_ref().expect("channel to shard 0").channel;
            assert!(channel.try_send(Vec::new()).is_ok());
            let receiving = glommio::spawn_local(async move {
                loop {
                    match rx0.next().await {
                        Ok(Some((input, element))) if input == InputId::from_shard(1) => {
                            return element;
                        }
                        Ok(Some(_)) => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
            });
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
            tx1.send_record(0, 9, 0).await.expect("send");
            tx1.flush().await.expect("flush");
            let timeout = async {
                glommio::timer::sleep(std::time::Duration::from_secs(2)).await;
                panic!("receiver never woke up");
            };
            assert_eq!(futures_lite::future::or(receiving, timeout).await, StreamElement::record(9, 0));
        });
    }

    #[test]
    fn batches_are_recycled() {
        let pool = BatchPool::<u8>::new(4, 1);
        let mut batch = pool.take();
        assert!(batch.capacity() >= 4);
        batch.push(StreamElement::EndOfInput);
        let ptr = batch.as_ptr();
        pool.give(batch);
        pool.give(Vec::new()); // too small: dropped
        pool.give(Vec::with_capacity(8)); // over the bound: dropped
        let again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr);
    }
}
