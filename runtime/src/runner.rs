//! Running a job: one glommio executor per shard, the exchange connections between them, and
//! the handle a service holds while the job runs.
//!
//! This module and [`crate::stage`] are the only places that touch glommio (the seam the
//! design asks for). Every connection is a full mesh of bounded single-producer channels:
//! `glommio::channels::shared_channel` between shards, a local channel from a shard to itself
//! (its own records never cross cores). Channels carry batches of elements, so the cost of a
//! cross-core hand-off (and of waking a parked peer) is paid per batch, not per record.
//! Receiving: one small task per input forwards batches, tagged with the input, into one
//! bounded local queue, so a stage sees all its inputs fairly and backpressure still reaches
//! the senders.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement};
use weir_state::keygroup::KeyGroupRange;
use weir_state::{StateStore, StoreConfig};

use crate::error::{Result, RuntimeError};
use crate::job::JobConfig;
use crate::source::DeadLetter;
use crate::stage::{ConnectionId, Element, ExchangeRx, ExchangeTx, LocalFuture, Received, StageFactory};

/// io_uring memory registered per executor. glommio registers it against the locked-memory
/// limit (`ulimit -l`); 1 MiB each keeps parallelism 4 well inside an 8 MiB limit.
pub const IO_MEMORY_BYTES_PER_SHARD: usize = 1 << 20;

type Batch<T> = Vec<Element<T>>;

/// The channel halves of one connection, before the shards connect them: for each
/// (producer, consumer) pair with producer != consumer a shared channel.
struct Mesh<T: Send + 'static> {
    senders: Vec<Vec<Option<SharedSender<Batch<T>>>>>,
    receivers: Vec<Vec<Option<SharedReceiver<Batch<T>>>>>,
}

/// Type-erased meshes, handed out by connection id.
struct Meshes {
    meshes: Mutex<HashMap<ConnectionId, Box<dyn Any + Send>>>,
}

/// Job-wide state shared by all shards: cancellation, dead letters, counters.
#[derive(Debug, Default)]
pub struct JobShared {
    cancelled: AtomicBool,
    failed: AtomicBool,
    dead_letters: Mutex<Vec<DeadLetter>>,
    batches: AtomicU64,
    side_outputs: Mutex<HashMap<&'static str, Vec<Box<dyn Any + Send>>>>,
    stages: Mutex<HashMap<&'static str, StageMetrics>>,
}

/// Counters of one stage, summed over its shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageMetrics {
    /// Records that entered the stage's chain.
    pub records: u64,
    /// Batches the stage processed.
    pub batches: u64,
}

/// A snapshot of a running job's counters.
#[derive(Debug, Clone, Default)]
pub struct JobMetrics {
    /// Time since the job started.
    pub uptime: Duration,
    /// Per stage (named by the uid of its input: source or exchange), records and batches.
    pub stages: Vec<(&'static str, StageMetrics)>,
    /// Records emitted to each side output (for example `late`).
    pub side_outputs: Vec<(&'static str, u64)>,
    /// Undecodable records sent to the dead-letter output.
    pub dead_letters: u64,
}

/// What a stage sees of its shard.
pub struct ShardRuntime {
    /// This shard.
    pub shard: usize,
    /// Number of shards.
    pub parallelism: usize,
    /// The job's configuration.
    pub config: JobConfig,
    /// The shard's state store (borrowed by a stage only while it processes a batch).
    pub store: RefCell<StateStore>,
    shared: Arc<JobShared>,
    meshes: Arc<Meshes>,
    local: RefCell<HashMap<ConnectionId, Box<dyn Any>>>,
    forward_only: HashMap<ConnectionId, bool>,
    idle_polls: Cell<u32>,
}

impl std::fmt::Debug for ShardRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardRuntime").field("shard", &self.shard).field("parallelism", &self.parallelism).finish()
    }
}

impl ShardRuntime {
    /// Processing time now.
    pub fn now(&self) -> i64 {
        self.config.clock.now_ms()
    }

    /// Whether the job was cancelled or another shard failed.
    pub fn cancelled(&self) -> bool {
        self.shared.cancelled.load(Ordering::Relaxed) || self.shared.failed.load(Ordering::Relaxed)
    }

    /// Yields to other tasks of the shard if this one ran long enough.
    pub async fn yield_now(&self) {
        glommio::yield_if_needed().await;
    }

    /// Waits a little when a source has nothing to read: longer the longer it stays idle, at
    /// most one tick interval.
    pub async fn idle_wait(&self) {
        let polls = self.idle_polls.get().saturating_add(1);
        self.idle_polls.set(polls);
        let cap = self.config.tick_interval_ms.clamp(1, 10) as u64;
        glommio::timer::sleep(Duration::from_millis(u64::from(polls).min(cap))).await;
    }

    /// A source produced records: the next idle wait starts short again.
    pub fn note_busy(&self) {
        self.idle_polls.set(0);
    }

    /// Records undecodable input.
    pub fn dead_letters(&self, _uid: &'static str, letters: &mut Vec<DeadLetter>) {
        if let Ok(mut all) = self.shared.dead_letters.lock() {
            all.append(letters);
        }
        letters.clear();
    }

    /// Records a side-output record.
    pub fn side_output(&self, tag: &'static str, record: Box<dyn Any + Send>) {
        if let Ok(mut all) = self.shared.side_outputs.lock() {
            all.entry(tag).or_default().push(record);
        }
    }

    /// Counts a processed batch of `records` records (metrics; once per batch, not per record).
    pub fn count_batch(&self, stage: &'static str, records: u64) {
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut stages) = self.shared.stages.lock() {
            let m = stages.entry(stage).or_default();
            m.records += records;
            m.batches += 1;
        }
    }

    /// This shard's sending side of `conn`.
    pub fn sender<T: Send + 'static>(&self, conn: ConnectionId) -> Result<Box<dyn ExchangeTx<T>>> {
        let remote = {
            let mut meshes = self.meshes.meshes.lock().map_err(|_| self.poisoned())?;
            let mesh = meshes
                .get_mut(&conn)
                .and_then(|m| m.downcast_mut::<Mesh<T>>())
                .ok_or_else(|| RuntimeError::InvalidJob(format!("connection {conn:?} has no channels of this type")))?;
            let forward = self.forward_only.get(&conn).copied().unwrap_or(false);
            // A forward-only connection (union) never sends to another shard: its remote
            // channels are dropped unconnected (connecting waits for a peer that never comes).
            let remote: Vec<Option<SharedSender<Batch<T>>>> = mesh.senders[self.shard]
                .iter_mut()
                .map(|tx| if forward { tx.take().and(None) } else { tx.take() })
                .collect();
            remote
        };
        let (ltx, lrx) = local_channel::new_bounded::<Batch<T>>(self.config.channel_capacity);
        self.local.borrow_mut().insert(conn, Box::new(Some(lrx)));
        Ok(Box::new(MeshSender {
            shard: self.shard,
            pending: (0..self.parallelism).map(|_| Vec::new()).collect(),
            batch_len: self.config.batch_len,
            unconnected: remote,
            remote: Vec::new(),
            local: ltx,
        }))
    }

    /// This shard's receiving side of `conns` (inputs: every producing shard of each).
    pub fn receiver<T: Send + 'static>(&self, conns: &[ConnectionId]) -> Result<Box<dyn ExchangeRx<T>>> {
        let mut unconnected = Vec::new();
        for conn in conns {
            let mut meshes = self.meshes.meshes.lock().map_err(|_| self.poisoned())?;
            let mesh = meshes
                .get_mut(conn)
                .and_then(|m| m.downcast_mut::<Mesh<T>>())
                .ok_or_else(|| RuntimeError::InvalidJob(format!("connection {conn:?} has no channels of this type")))?;
            let forward = self.forward_only.get(conn).copied().unwrap_or(false);
            for producer in 0..self.parallelism {
                if producer == self.shard {
                    unconnected.push(Input::Local(*conn));
                } else if !forward {
                    match mesh.receivers[producer][self.shard].take() {
                        Some(rx) => unconnected.push(Input::Remote(rx)),
                        None => return Err(RuntimeError::InvalidJob(format!("connection {conn:?} read twice"))),
                    }
                }
            }
        }
        let inputs = unconnected.len();
        Ok(Box::new(MeshReceiver {
            unconnected: Some(unconnected),
            queue: None,
            stashed: None,
            closed: false,
            inputs,
            open: inputs,
        }))
    }

    fn take_local<T: 'static>(&self, conn: ConnectionId) -> Option<LocalReceiver<Batch<T>>> {
        let mut local = self.local.borrow_mut();
        local.get_mut(&conn).and_then(|b| b.downcast_mut::<Option<LocalReceiver<Batch<T>>>>()).and_then(Option::take)
    }

    fn poisoned(&self) -> RuntimeError {
        RuntimeError::Shard { shard: self.shard, reason: "exchange registry poisoned by a panic".into() }
    }
}

enum Input<T: Send + 'static> {
    Local(ConnectionId),
    Remote(SharedReceiver<Batch<T>>),
}

struct MeshSender<T: Send + 'static> {
    shard: usize,
    pending: Vec<Batch<T>>,
    batch_len: usize,
    unconnected: Vec<Option<SharedSender<Batch<T>>>>,
    remote: Vec<Option<ConnectedSender<Batch<T>>>>,
    local: LocalSender<Batch<T>>,
}

impl<T: Send + 'static> MeshSender<T> {
    async fn connect(&mut self) {
        if self.remote.is_empty() {
            for tx in self.unconnected.drain(..) {
                self.remote.push(match tx {
                    Some(tx) => Some(tx.connect().await),
                    None => None,
                });
            }
        }
    }

    async fn send_to(&mut self, target: usize, batch: Batch<T>, shard: usize) -> Result<()> {
        let failed = || RuntimeError::Shard { shard, reason: format!("shard {target} stopped receiving") };
        if target == self.shard {
            return self.local.send(batch).await.map_err(|_| failed());
        }
        match self.remote.get(target).and_then(Option::as_ref) {
            Some(tx) => tx.send(batch).await.map_err(|_| failed()),
            None => Err(failed()),
        }
    }

    async fn send(&mut self, rt: &ShardRuntime, all: bool) -> Result<()> {
        self.connect().await;
        for target in 0..self.pending.len() {
            let ready =
                if all { !self.pending[target].is_empty() } else { self.pending[target].len() >= self.batch_len };
            if ready {
                let batch = std::mem::replace(&mut self.pending[target], Vec::with_capacity(self.batch_len));
                self.send_to(target, batch, rt.shard).await?;
            }
        }
        Ok(())
    }
}

impl<T: Send + 'static> ExchangeTx<T> for MeshSender<T> {
    #[inline]
    fn push(&mut self, target: usize, element: Element<T>) {
        self.pending[target].push(element);
    }
    fn send_full<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<()>> {
        Box::pin(self.send(rt, false))
    }
    fn flush<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, Result<()>> {
        Box::pin(self.send(rt, true))
    }
}

/// A batch tagged with its input; `None` when that input closed.
type Tagged<T> = (usize, Option<Batch<T>>);

struct MeshReceiver<T: Send + 'static> {
    unconnected: Option<Vec<Input<T>>>,
    queue: Option<Rc<LocalReceiver<Tagged<T>>>>,
    stashed: Option<Tagged<T>>,
    closed: bool,
    inputs: usize,
    open: usize,
}

impl<T: Send + 'static> MeshReceiver<T> {
    async fn start(&mut self, rt: &ShardRuntime) {
        let Some(inputs) = self.unconnected.take() else { return };
        let (tx, rx) = local_channel::new_bounded::<(usize, Option<Batch<T>>)>(rt.config.channel_capacity * 2);
        let tx = Rc::new(tx);
        for (i, input) in inputs.into_iter().enumerate() {
            let tx = Rc::clone(&tx);
            match input {
                Input::Remote(rx) => {
                    glommio::spawn_local(async move {
                        let rx: ConnectedReceiver<Batch<T>> = rx.connect().await;
                        while let Some(batch) = rx.recv().await {
                            if tx.send((i, Some(batch))).await.is_err() {
                                return;
                            }
                        }
                        let _ = tx.send((i, None)).await;
                    })
                    .detach();
                }
                Input::Local(conn) => {
                    let local = rt.take_local::<T>(conn);
                    glommio::spawn_local(async move {
                        if let Some(rx) = local {
                            while let Some(batch) = rx.recv().await {
                                if tx.send((i, Some(batch))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        let _ = tx.send((i, None)).await;
                    })
                    .detach();
                }
            }
        }
        self.queue = Some(Rc::new(rx));
    }
}

impl<T: Send + 'static> ExchangeRx<T> for MeshReceiver<T> {
    fn inputs(&self) -> usize {
        self.inputs
    }
    fn try_recv<'a>(&'a mut self, rt: &'a ShardRuntime) -> LocalFuture<'a, Received<T>> {
        Box::pin(async move {
            self.start(rt).await;
            loop {
                if self.open == 0 || self.closed {
                    return Received::Closed;
                }
                let item = match self.stashed.take() {
                    Some(item) => item,
                    None => {
                        let Some(queue) = self.queue.clone() else { return Received::Closed };
                        match futures_lite::future::poll_once(queue.recv()).await {
                            None => return Received::Empty,
                            Some(None) => {
                                self.closed = true;
                                return Received::Closed;
                            }
                            Some(Some(item)) => item,
                        }
                    }
                };
                match item {
                    (i, Some(batch)) => return Received::Batch(i, batch),
                    (_, None) => self.open -= 1,
                }
            }
        })
    }

    fn wait<'a>(&'a mut self, rt: &'a ShardRuntime, timeout: Duration) -> LocalFuture<'a, ()> {
        Box::pin(async move {
            self.start(rt).await;
            if self.stashed.is_some() || self.closed || self.open == 0 {
                return;
            }
            let Some(queue) = self.queue.clone() else { return };
            let received = async { Some(queue.recv().await) };
            let timed_out = async {
                glommio::timer::sleep(timeout).await;
                None
            };
            match futures_lite::future::or(received, timed_out).await {
                Some(Some(item)) => self.stashed = Some(item),
                Some(None) => self.closed = true,
                None => {}
            }
        })
    }
}

/// A running job.
pub struct JobHandle {
    started: std::time::Instant,
    name: String,
    threads: Vec<(usize, glommio::ExecutorJoinHandle<Result<()>>)>,
    shared: Arc<JobShared>,
    run_dir: PathBuf,
    keep_state: bool,
}

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobHandle").field("name", &self.name).finish()
    }
}

/// What a finished job reports.
#[derive(Debug, Default)]
pub struct JobReport {
    /// Records that could not be decoded, with their source offsets.
    pub dead_letters: Vec<DeadLetter>,
    /// Batches processed across all stages and shards.
    pub batches: u64,
    side_outputs: HashMap<&'static str, Vec<Box<dyn Any + Send>>>,
}

impl JobReport {
    /// The records emitted to side output `tag` (for example late records of a window).
    pub fn side_output<T: 'static>(&mut self, tag: weir_operators::operator::OutputTag<T>) -> Vec<(T, i64)> {
        self.side_outputs
            .remove(tag.name())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|b| b.downcast::<(T, i64)>().ok().map(|b| *b))
            .collect()
    }
}

impl JobHandle {
    /// The job's counters now.
    pub fn metrics(&self) -> JobMetrics {
        let mut stages: Vec<_> =
            self.shared.stages.lock().map(|s| s.iter().map(|(k, v)| (*k, *v)).collect()).unwrap_or_default();
        stages.sort_by_key(|s| s.0);
        let mut side_outputs: Vec<_> = self
            .shared
            .side_outputs
            .lock()
            .map(|s| s.iter().map(|(k, v)| (*k, v.len() as u64)).collect())
            .unwrap_or_default();
        side_outputs.sort();
        JobMetrics {
            uptime: self.started.elapsed(),
            stages,
            side_outputs,
            dead_letters: self.shared.dead_letters.lock().map_or(0, |d| d.len() as u64),
        }
    }

    /// Asks the job to stop: sources end their input early, and the job completes.
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::SeqCst);
    }

    /// Waits for every shard to finish. The first failure is returned (a panic names the
    /// operator and shard); the other shards are stopped, never left hanging.
    pub fn wait(self) -> Result<JobReport> {
        let mut first_error = None;
        for (shard, handle) in self.threads {
            let result = match handle.join() {
                Ok(r) => r,
                Err(e) => Err(RuntimeError::Shard { shard, reason: format!("executor failed: {e}") }),
            };
            if let Err(e) = result {
                self.shared.failed.store(true, Ordering::SeqCst);
                first_error.get_or_insert(e);
            }
        }
        if !self.keep_state {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let dead_letters = self.shared.dead_letters.lock().map(|mut d| std::mem::take(&mut *d)).unwrap_or_default();
        let side_outputs = self.shared.side_outputs.lock().map(|mut d| std::mem::take(&mut *d)).unwrap_or_default();
        Ok(JobReport { dead_letters, batches: self.shared.batches.load(Ordering::Relaxed), side_outputs })
    }
}

fn make_meshes<T: Send + 'static>(parallelism: usize, capacity: usize) -> Mesh<T> {
    let mut senders: Vec<Vec<Option<SharedSender<Batch<T>>>>> =
        (0..parallelism).map(|_| (0..parallelism).map(|_| None).collect()).collect();
    let mut receivers: Vec<Vec<Option<SharedReceiver<Batch<T>>>>> =
        (0..parallelism).map(|_| (0..parallelism).map(|_| None).collect()).collect();
    for p in 0..parallelism {
        for c in 0..parallelism {
            if p != c {
                let (tx, rx) = shared_channel::new_bounded(capacity);
                senders[p][c] = Some(tx);
                receivers[p][c] = Some(rx);
            }
        }
    }
    Mesh { senders, receivers }
}

/// Creates the typed channel mesh of a connection (called by the stage that produces into it).
pub(crate) type MeshMaker = Box<dyn Fn(usize, usize) -> Box<dyn Any + Send> + Send + Sync>;

/// A mesh maker for elements of type `T`.
pub(crate) fn mesh_maker<T: Send + 'static>() -> MeshMaker {
    Box::new(|parallelism, capacity| Box::new(make_meshes::<T>(parallelism, capacity)))
}

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Starts `stages` on `config.parallelism` shards.
pub(crate) fn start(
    name: &str,
    stages: Vec<Arc<dyn StageFactory>>,
    connections: Vec<(ConnectionId, bool)>,
    makers: &[(ConnectionId, MeshMaker, bool)],
    config: JobConfig,
) -> Result<JobHandle> {
    let parallelism = config.parallelism.max(1);
    let run = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
    let run_dir = config.data_dir.join(format!("{name}-{}-{run}", std::process::id()));
    let mut meshes = HashMap::new();
    let forward_only: HashMap<ConnectionId, bool> = connections.into_iter().collect();
    for (conn, maker, _) in makers {
        meshes.insert(*conn, maker(parallelism, config.channel_capacity));
    }
    let meshes = Arc::new(Meshes { meshes: Mutex::new(meshes) });
    let shared = Arc::new(JobShared::default());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = Vec::new();
    for shard in 0..parallelism {
        let placement = if parallelism <= cores { Placement::Fixed(shard) } else { Placement::Unbound };
        let (stages, config, meshes, shared, forward_only) =
            (stages.clone(), config.clone(), Arc::clone(&meshes), Arc::clone(&shared), forward_only.clone());
        let store_dir = run_dir.join(format!("shard-{shard}"));
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("weir-{shard}"))
            .io_memory(IO_MEMORY_BYTES_PER_SHARD)
            .spawn(move || async move {
                run_shard(shard, parallelism, stages, config, meshes, shared, forward_only, store_dir).await
            })
            .map_err(|e| RuntimeError::Shard { shard, reason: format!("cannot start executor: {e}") })?;
        threads.push((shard, handle));
    }
    Ok(JobHandle {
        started: std::time::Instant::now(),
        name: name.to_owned(),
        threads,
        shared,
        run_dir,
        keep_state: config.keep_state,
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_shard(
    shard: usize,
    parallelism: usize,
    stages: Vec<Arc<dyn StageFactory>>,
    config: JobConfig,
    meshes: Arc<Meshes>,
    shared: Arc<JobShared>,
    forward_only: HashMap<ConnectionId, bool>,
    store_dir: PathBuf,
) -> Result<()> {
    let store_config = StoreConfig {
        shard: shard as u32,
        segment_bytes: config.segment_bytes,
        max_parallelism: config.max_parallelism,
        key_groups: KeyGroupRange::for_shard(shard, parallelism, config.max_parallelism),
        ..StoreConfig::default()
    };
    let store = StateStore::create(&store_dir, store_config)?;
    let rt = Rc::new(ShardRuntime {
        shard,
        parallelism,
        config,
        store: RefCell::new(store),
        shared: Arc::clone(&shared),
        meshes,
        local: RefCell::new(HashMap::new()),
        forward_only,
        idle_polls: Cell::new(0),
    });
    // Every stage is created before any runs: a receiver takes its local channel (made with its
    // producer's sender) only when it first receives.
    let mut tasks = Vec::new();
    for stage in &stages {
        let future = stage.spawn(Rc::clone(&rt))?;
        tasks.push((stage.name(), glommio::spawn_local(future)));
    }
    let mut first_error = None;
    for (_, task) in tasks {
        if let Err(e) = task.await {
            shared.failed.store(true, Ordering::SeqCst);
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
