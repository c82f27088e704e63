//! Running a job: one glommio executor per shard (through [`crate::shard::run_shards`]), the
//! exchange connections between them (through [`crate::exchange`]), and the handle a service
//! holds while the job runs.
//!
//! Every connection of the job graph is one exchange: a full mesh of bounded channels
//! carrying batches, a shard's records to itself through a local queue. Every shard connects
//! every exchange before any stage runs. A stage's terminal node queues elements
//! synchronously ([`ExchangeTx::push`]); between input batches the stage hands them to the
//! exchange sender (where backpressure applies), and flushes partial batches before it waits.
//! Receivers hand a stage whatever elements are there now, with their inputs, without waiting.
//! Only this module, `shard` and `exchange` touch glommio.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use weir_state::keygroup::KeyGroupRange;
use weir_state::{StateStore, StoreConfig};

use crate::checkpointing::{CheckpointDriver, CheckpointShared, JobLayout, RestorePoint};
use crate::element::{BarrierKind, StreamElement};
use crate::error::{Result, RuntimeError};
use crate::exchange::{ExchangeConfig, ExchangeHandle, ExchangeReceiver, ExchangeSender, Exchanges};
use crate::job::JobConfig;
use crate::shard::{ShardConfig, ShardContext, run_shards};
use crate::source::DeadLetter;
use crate::stage::{ConnectionId, Element, ExchangeRx, ExchangeTx, LocalFuture, StageFactory};

/// Job-wide state shared by all shards: cancellation, dead letters, counters.
#[derive(Debug, Default)]
pub struct JobShared {
    /// Checkpointing of the run attempt in progress.
    current: Mutex<Option<Arc<CheckpointShared>>>,
    checkpoint_stats: Arc<Mutex<crate::checkpointing::CheckpointStats>>,
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
    /// Where this shard's stages keep their state stores (one directory per stage).
    pub state_dir: PathBuf,
    shared: Arc<JobShared>,
    endpoints: RefCell<HashMap<ConnectionId, Box<dyn Any>>>,
    idle_polls: Cell<u32>,
    /// Checkpointing of this run attempt (`None`: the job runs without checkpoints).
    checkpoints: Option<Arc<CheckpointShared>>,
    /// The checkpoint this attempt starts from.
    restore: Option<Arc<RestorePoint>>,
    /// The checkpoint root (checkpointed jobs), where `state_dir` lies.
    root: Option<PathBuf>,
}

impl std::fmt::Debug for ShardRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardRuntime").field("shard", &self.shard).field("parallelism", &self.parallelism).finish()
    }
}

impl ShardRuntime {
    /// A state store of its own for the stage `stage` on this shard: stages snapshot at
    /// different moments (when a barrier reaches each), so each keeps its state apart.
    ///
    /// A job resuming from a checkpoint maps the store of that checkpoint back in place (its
    /// files are not copied or rebuilt: only the log tail after the last index snapshot is
    /// replayed); a stage the checkpoint does not know starts empty.
    ///
    /// A job starting from a savepoint gets a new store holding, of the savepoint's `space`
    /// (keyed state or timers), the entries of `operators` in this shard's key groups.
    pub fn stage_store(&self, stage: &str, space: &str, operators: &[&'static str]) -> Result<StateStore> {
        let config = StoreConfig {
            shard: self.shard as u32,
            segment_bytes: self.config.segment_bytes,
            max_parallelism: self.config.max_parallelism,
            key_groups: KeyGroupRange::for_shard(self.shard, self.parallelism, self.config.max_parallelism),
            max_replay_bytes: self
                .config
                .checkpointing
                .as_ref()
                .map_or(weir_state::store::DEFAULT_MAX_REPLAY_BYTES, |c| c.max_replay_bytes),
            ..StoreConfig::default()
        };
        let dir = self.state_dir.join(stage);
        if let Some(savepoint) = self.restore.as_ref().and_then(|r| r.savepoint.as_ref()) {
            let mut store = StateStore::create(&dir, config)?;
            savepoint.restore_into(space, &|uid| operators.contains(&uid), &mut store)?;
            return Ok(store);
        }
        if let (Some(restore), Some(root)) = (&self.restore, &self.root)
            && let Some(handle) = restore.handle(&self.store_dir(stage))
        {
            let store = StateStore::restore(&root.join(self.store_dir(stage)), handle, config, Default::default())?;
            return Ok(store);
        }
        Ok(StateStore::create(&dir, config)?)
    }

    /// The directory of stage `stage`'s store on this shard, relative to the checkpoint root.
    pub fn store_dir(&self, stage: &str) -> String {
        crate::checkpointing::store_dir(self.parallelism, self.shard, stage)
    }

    /// Checkpointing of this run (`None` when the job runs without checkpoints).
    pub fn checkpoints(&self) -> Option<&CheckpointShared> {
        self.checkpoints.as_deref()
    }

    /// The checkpoint this run started from.
    pub fn restored_checkpoint(&self) -> Option<u64> {
        self.restore.as_ref().map(|r| r.manifest.checkpoint_id)
    }

    /// The handle of stage store `stage` on this shard in the checkpoint this run restored
    /// (`None` for a savepoint: its stores are new).
    pub fn restored_handle(&self, stage: &str) -> Option<weir_state::store::CheckpointHandle> {
        let restore = self.restore.as_ref().filter(|r| r.savepoint.is_none())?;
        restore.handle(&self.store_dir(stage)).cloned()
    }

    /// Where source `uid`'s splits that this shard reads (`splits` of `total`) resume: the
    /// offset of each (0 without a restore). Fails when the checkpoint this run started from
    /// recorded offsets for another number of splits, or none for one of these while it has
    /// others (the input is not the one checkpointed).
    pub fn restored_offsets(&self, uid: &str, splits: &[u32], total: u32) -> Result<Vec<u64>> {
        let Some(restore) = &self.restore else { return Ok(vec![0; splits.len()]) };
        let recorded = restore.offsets(uid);
        if recorded.is_empty() {
            return Ok(vec![0; splits.len()]);
        }
        let id = restore.manifest.checkpoint_id;
        if let Some(other) = recorded.iter().find(|r| r.splits != total) {
            return Err(RuntimeError::Checkpoint(format!(
                "source {uid} has {total} splits; checkpoint {id} recorded offsets of {} (a source resumes with \
                 the splits it had; give a changed input another uid)",
                other.splits
            )));
        }
        splits
            .iter()
            .map(|split| {
                recorded.iter().find(|r| r.split == *split).map(|r| r.offset).ok_or_else(|| {
                    RuntimeError::Checkpoint(format!("checkpoint {id} has no offset for split {split} of source {uid}"))
                })
            })
            .collect()
    }

    /// The operator state of operator `uid`'s instance on this shard: the lists its instances
    /// wrote at the checkpoint or savepoint this run started from, dealt from that
    /// checkpoint's parallelism to this run's by each list's redistribution (see
    /// [`weir_operators::operator_state::Redistribution`]). Empty without a restore.
    pub fn restored_operator_state(&self, uid: &str) -> Result<weir_operators::operator_state::OperatorState> {
        match &self.restore {
            Some(restore) => restore.operator_state(uid, self.parallelism, self.shard),
            None => Ok(weir_operators::operator_state::OperatorState::new()),
        }
    }

    /// Sleeps on the shard's executor.
    pub async fn sleep(&self, duration: Duration) {
        glommio::timer::sleep(duration).await;
    }

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
        self.idle_wait_unless(|| false).await;
    }

    /// [`ShardRuntime::idle_wait`], cut short once `wake` holds: an idle source injects a
    /// requested checkpoint barrier without waiting out its backoff. It looks every
    /// millisecond, and every quarter of one while a checkpoint is due (see
    /// [`crate::checkpointing::CheckpointShared::due_soon`]): looking every millisecond, the
    /// barrier of an idle source waited 0.8 ms at the median.
    pub async fn idle_wait_unless(&self, wake: impl Fn() -> bool) {
        let polls = self.idle_polls.get().saturating_add(1);
        self.idle_polls.set(polls);
        let cap = Duration::from_millis(self.config.tick_interval_ms.clamp(1, 10) as u64);
        let mut waited = Duration::ZERO;
        while waited < cap.min(Duration::from_millis(u64::from(polls))) {
            if wake() {
                return;
            }
            let due = self.checkpoints().is_some_and(|c| c.due_soon(self.now()));
            let step = if due { Duration::from_micros(250) } else { Duration::from_millis(1) };
            glommio::timer::sleep(step).await;
            waited += step;
        }
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
        let tx = self.endpoint::<T, _>(conn, |e| e.tx.take())?;
        Ok(Box::new(SenderAdapter { tx, pending: Vec::new() }))
    }

    /// This shard's receiving side of `conns` (inputs: every producing shard of each).
    pub fn receiver<T: Send + 'static>(&self, conns: &[ConnectionId]) -> Result<Box<dyn ExchangeRx<T>>> {
        let rxs = conns.iter().map(|c| self.endpoint::<T, _>(*c, |e| e.rx.take())).collect::<Result<Vec<_>>>()?;
        let open = vec![true; rxs.len()];
        Ok(Box::new(MultiReceiver { rxs, open, parallelism: self.parallelism, next: 0, stashed: None }))
    }

    fn endpoint<T: Send + 'static, R>(
        &self,
        conn: ConnectionId,
        take: impl FnOnce(&mut Endpoints<T>) -> Option<R>,
    ) -> Result<R> {
        let mut endpoints = self.endpoints.borrow_mut();
        endpoints.get_mut(&conn).and_then(|e| e.downcast_mut::<Endpoints<T>>()).and_then(take).ok_or_else(|| {
            RuntimeError::InvalidJob(format!("connection {conn:?} is not available (wrong type or used twice)"))
        })
    }
}

struct Endpoints<T: Send + 'static> {
    tx: Option<ExchangeSender<T>>,
    rx: Option<ExchangeReceiver<T>>,
}

fn to_wire<T>(element: Element<T>) -> StreamElement<T> {
    match element {
        Element::Record(value, timestamp) => StreamElement::Record { value, timestamp },
        Element::Watermark(w) => StreamElement::Watermark(w),
        Element::Idle(b) => StreamElement::Idle(b),
        Element::Barrier(id) => {
            StreamElement::Barrier(crate::element::Barrier { checkpoint_id: id, kind: BarrierKind::Checkpoint })
        }
        Element::End => StreamElement::EndOfInput,
    }
}

fn from_wire<T>(element: StreamElement<T>) -> Option<Element<T>> {
    match element {
        StreamElement::Record { value, timestamp } => Some(Element::Record(value, timestamp)),
        StreamElement::Watermark(w) => Some(Element::Watermark(w)),
        StreamElement::Idle(b) => Some(Element::Idle(b)),
        StreamElement::EndOfInput => Some(Element::End),
        StreamElement::Barrier(b) => Some(Element::Barrier(b.checkpoint_id)),
    }
}

/// Feeds a terminal's queued elements into the exchange sender.
struct SenderAdapter<T: Send + 'static> {
    tx: ExchangeSender<T>,
    pending: Vec<(usize, Element<T>)>,
}

impl<T: Send + 'static> SenderAdapter<T> {
    async fn send(&mut self, flush: bool) -> Result<()> {
        for (target, element) in self.pending.drain(..) {
            self.tx.send(target, to_wire(element)).await?;
        }
        if flush {
            self.tx.flush().await?;
        }
        Ok(())
    }
}

impl<T: Send + 'static> ExchangeTx<T> for SenderAdapter<T> {
    #[inline]
    fn push(&mut self, target: usize, element: Element<T>) {
        self.pending.push((target, element));
    }
    fn send_full<'a>(&'a mut self, _: &'a ShardRuntime) -> LocalFuture<'a, Result<()>> {
        Box::pin(self.send(false))
    }
    fn flush<'a>(&'a mut self, _: &'a ShardRuntime) -> LocalFuture<'a, Result<()>> {
        Box::pin(self.send(true))
    }
}

/// An element with the number of the input it came from.
type Numbered<T> = (usize, Element<T>);

/// The receivers of a stage's connections, as one numbered set of inputs: input
/// `c * P + s` is shard `s` of connection `c`.
struct MultiReceiver<T: Send + 'static> {
    rxs: Vec<ExchangeReceiver<T>>,
    open: Vec<bool>,
    parallelism: usize,
    next: usize,
    stashed: Option<(usize, Element<T>)>,
}

impl<T: Send + 'static> MultiReceiver<T> {
    /// Polls every open receiver once, starting after the last one that delivered (fairness).
    fn poll_any(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<Option<Numbered<T>>>> {
        let n = self.rxs.len();
        for k in 0..n {
            let c = (self.next + k) % n;
            if !self.open[c] {
                continue;
            }
            match self.rxs[c].poll_next_element(cx) {
                Poll::Ready(Ok(Some((input, element)))) => {
                    self.next = (c + 1) % n;
                    if let Some(element) = from_wire(element) {
                        return Poll::Ready(Ok(Some((c * self.parallelism + input.source_shard(), element))));
                    }
                    return Poll::Ready(Ok(None));
                }
                Poll::Ready(Ok(None)) => self.open[c] = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if self.open.iter().any(|o| *o) { Poll::Pending } else { Poll::Ready(Ok(None)) }
    }
}

impl<T: Send + 'static> ExchangeRx<T> for MultiReceiver<T> {
    fn inputs(&self) -> usize {
        self.rxs.len() * self.parallelism
    }

    fn try_recv<'a>(
        &'a mut self,
        out: &'a mut Vec<(usize, Element<T>)>,
        max: usize,
        _: &'a ShardRuntime,
    ) -> LocalFuture<'a, Result<bool>> {
        Box::pin(async move {
            // A barrier ends what is handed out, so that the stage can block its input before
            // anything after it is read. So does an input's end: it may complete an alignment
            // (an ended input holds up no barrier), and until the stage has seen it, the other
            // inputs may all be blocked, which the next poll would report as an error, losing
            // the end handed out with it (the job then failed with `AllInputsBlocked`).
            let ends_batch = |element: &Element<T>| matches!(element, Element::Barrier(_) | Element::End);
            if let Some(item) = self.stashed.take() {
                let last = ends_batch(&item.1);
                out.push(item);
                if last {
                    return Ok(true);
                }
            }
            while out.len() < max {
                match futures_lite::future::poll_once(futures_lite::future::poll_fn(|cx| self.poll_any(cx))).await {
                    Some(Ok(Some(item))) => {
                        let last = ends_batch(&item.1);
                        out.push(item);
                        if last {
                            break;
                        }
                    }
                    Some(Ok(None)) => {
                        if self.open.iter().all(|o| !*o) {
                            return Ok(!out.is_empty());
                        }
                    }
                    Some(Err(e)) => return Err(e),
                    None => break,
                }
            }
            Ok(true)
        })
    }

    fn set_blocked(&mut self, input: usize, blocked: bool) -> Result<()> {
        let (c, shard) = (input / self.parallelism, input % self.parallelism);
        let rx =
            self.rxs.get_mut(c).ok_or(RuntimeError::InvalidTarget { target: input, parallelism: self.parallelism })?;
        let input = crate::exchange::InputId::from_shard(shard);
        if blocked { rx.block(input) } else { rx.unblock(input) }
    }

    fn wait<'a>(&'a mut self, _: &'a ShardRuntime, timeout: Duration) -> LocalFuture<'a, Result<()>> {
        Box::pin(async move {
            if self.stashed.is_some() || self.open.iter().all(|o| !*o) {
                return Ok(());
            }
            let received = futures_lite::future::poll_fn(|cx| self.poll_any(cx));
            let timed_out = async {
                glommio::timer::sleep(timeout).await;
                Ok(None)
            };
            if let Some(item) = futures_lite::future::or(received, timed_out).await? {
                self.stashed = Some(item);
            }
            Ok(())
        })
    }
}

/// A running job.
pub struct JobHandle {
    started: std::time::Instant,
    name: String,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
    shared: Arc<JobShared>,
    run_dir: PathBuf,
    keep_state: bool,
    /// Whether the job takes checkpoints at all.
    checkpointed: bool,
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
    /// Checkpoints, aborts and restarts of the job.
    pub checkpoints: crate::checkpointing::CheckpointStats,
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

    /// The job's checkpoints so far: durations of complete ones, aborted ones, restarts.
    pub fn checkpoint_stats(&self) -> crate::checkpointing::CheckpointStats {
        self.shared.checkpoint_stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Takes a savepoint into `dir` (which must not hold one) and returns once it is complete.
    pub fn savepoint(&self, dir: impl Into<PathBuf>) -> Result<crate::checkpointing::SavepointInfo> {
        self.request_savepoint(dir.into(), None)
    }

    /// Stops the job with a savepoint into `dir`: sources stop right after its barrier, so the
    /// savepoint holds exactly what the job consumed. With `drain`, event time is first advanced
    /// to the end (every window and event-time timer fires, and its output is committed);
    /// without, pending windows and timers stay in the savepoint and fire after a resume.
    pub fn stop_with_savepoint(
        self,
        dir: impl Into<PathBuf>,
        drain: bool,
    ) -> Result<(crate::checkpointing::SavepointInfo, JobReport)> {
        let info = self.request_savepoint(dir.into(), Some(drain))?;
        let report = self.wait()?;
        Ok((info, report))
    }

    /// Takes a checkpoint now (besides the interval's; with an interval of 0, the only way to
    /// take one) and returns its id once it is complete: its manifest is durable and sinks
    /// commit up to it. When a checkpoint is in flight (and `max_concurrent` allows no other)
    /// it is triggered once that one ends. A later checkpoint that completes first (superseding
    /// it) answers for it. Fails if it was aborted (a declined snapshot, a timeout) or the run
    /// attempt stopped first; the job keeps running either way.
    pub fn checkpoint(&self) -> Result<crate::checkpoint::CheckpointId> {
        self.current_attempt()?
            .request_checkpoint()
            .recv()
            .unwrap_or_else(|_| Err(RuntimeError::Checkpoint("the job stopped before the checkpoint completed".into())))
    }

    fn request_savepoint(&self, dir: PathBuf, stop: Option<bool>) -> Result<crate::checkpointing::SavepointInfo> {
        self.current_attempt()?
            .request_savepoint(dir, stop)
            .recv()
            .unwrap_or_else(|_| Err(RuntimeError::Checkpoint("the job stopped before the savepoint completed".into())))
    }

    /// The checkpointing of the run attempt now running, waiting up to 10 s for one to start
    /// (the first, or the next after a failure).
    fn current_attempt(&self) -> Result<Arc<CheckpointShared>> {
        if !self.checkpointed {
            return Err(RuntimeError::Checkpoint("the job runs without checkpoints".into()));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let current = self.shared.current.lock().ok().and_then(|c| c.clone());
            match current {
                Some(c) => return Ok(c),
                None if std::time::Instant::now() < deadline
                    && !self.thread.as_ref().is_none_or(|t| t.is_finished()) =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                None => return Err(RuntimeError::Checkpoint("the job is not running".into())),
            }
        }
    }

    /// Asks the job to stop: sources end their input early, and the job completes.
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::SeqCst);
    }

    /// Waits for every shard to finish. The first failure is returned (a panic names the
    /// operator and shard); the other shards are stopped, never left hanging.
    pub fn wait(mut self) -> Result<JobReport> {
        let result = match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(RuntimeError::Shard { shard: 0, reason: "the job thread panicked".into() })),
            None => Ok(()),
        };
        let first_error = result.err().map(unwrap_shard_error);
        if !self.keep_state {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let dead_letters = self.shared.dead_letters.lock().map(|mut d| std::mem::take(&mut *d)).unwrap_or_default();
        let side_outputs = self.shared.side_outputs.lock().map(|mut d| std::mem::take(&mut *d)).unwrap_or_default();
        Ok(JobReport {
            dead_letters,
            batches: self.shared.batches.load(Ordering::Relaxed),
            checkpoints: self.checkpoint_stats(),
            side_outputs,
        })
    }
}

/// Creates, on the job's exchange set, the exchange of a connection carrying `T`.
pub(crate) type MeshMaker = Arc<dyn Fn(&mut Exchanges, ExchangeConfig) -> Result<Box<dyn ErasedHandle>> + Send + Sync>;

/// The maker of an exchange carrying `T`.
pub(crate) fn mesh_maker<T: Send + 'static>() -> MeshMaker {
    Arc::new(|exchanges, config| Ok(Box::new(Typed(exchanges.add::<T>(config)?))))
}

/// An exchange handle with its element type erased, connected on each shard.
pub(crate) trait ErasedHandle: Send + Sync {
    /// Connects this shard's sender and receiver.
    fn connect<'a>(&'a self, ctx: &'a mut ShardContext) -> LocalFuture<'a, Result<Box<dyn Any>>>;
}

struct Typed<T>(ExchangeHandle<T>);

impl<T: Send + 'static> ErasedHandle for Typed<T> {
    fn connect<'a>(&'a self, ctx: &'a mut ShardContext) -> LocalFuture<'a, Result<Box<dyn Any>>> {
        Box::pin(async move {
            let (tx, rx) = ctx.exchange(self.0).await?;
            Ok(Box::new(Endpoints { tx: Some(tx), rx: Some(rx) }) as Box<dyn Any>)
        })
    }
}

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Everything one run attempt needs, kept by the job thread across restarts.
struct JobPlan {
    name: String,
    stages: Vec<Arc<dyn StageFactory>>,
    makers: Vec<(ConnectionId, MeshMaker)>,
    config: JobConfig,
    operators: Vec<String>,
    shared: Arc<JobShared>,
    run_dir: PathBuf,
}

impl JobPlan {
    fn layout(&self) -> JobLayout {
        JobLayout {
            job: self.name.clone(),
            stages: self.stages.iter().map(|s| s.name().to_owned()).collect(),
            operators: self.operators.clone(),
            parallelism: self.config.parallelism.max(1),
            max_parallelism: self.config.max_parallelism,
        }
    }

    /// Runs the job, restarting it from its latest complete checkpoint after a failure as
    /// long as the restart strategy allows.
    fn run(&self) -> Result<()> {
        let Some(settings) = self.config.checkpointing.clone() else {
            return self.attempt(0, None, None);
        };
        let mut restart = 0;
        loop {
            let restore = self.restore_point(&settings, restart)?;
            let restored = restore.as_ref().map(|r| r.manifest.checkpoint_id);
            if let Ok(mut stats) = self.shared.checkpoint_stats.lock() {
                stats.restored.push(restored);
            }
            let driver = CheckpointDriver::start(
                &settings,
                self.layout(),
                restart,
                restored,
                Arc::clone(&self.shared.checkpoint_stats),
                Arc::clone(&self.config.clock),
            )?;
            if let Ok(mut current) = self.shared.current.lock() {
                *current = Some(driver.shared());
            }
            let result = self.attempt(restart, Some(driver.shared()), restore.map(Arc::new));
            if let Ok(mut current) = self.shared.current.lock() {
                *current = None;
            }
            driver.stop(result.is_ok());
            let error = match result {
                Ok(()) => return Ok(()),
                Err(e) => unwrap_shard_error(e),
            };
            let delay = match settings.restart.delay(restart) {
                Some(delay) if !self.shared.cancelled.load(Ordering::SeqCst) => delay,
                _ => return Err(error),
            };
            if let Ok(mut stats) = self.shared.checkpoint_stats.lock() {
                stats.restarts += 1;
                stats.restart_causes.push(error.to_string());
            }
            std::thread::sleep(delay);
            self.shared.failed.store(false, Ordering::SeqCst);
            restart += 1;
        }
    }

    /// The checkpoint attempt `restart` starts from. A fresh start (nothing to resume) clears
    /// this parallelism's store directories, which no manifest references.
    fn restore_point(
        &self,
        settings: &crate::checkpointing::CheckpointSettings,
        restart: u32,
    ) -> Result<Option<RestorePoint>> {
        let directory = weir_state::manifest::CheckpointDirectory::open(&settings.dir)?;
        let has_checkpoints = !directory.list()?.is_empty();
        if restart == 0 && has_checkpoints && !settings.resume && settings.resume_from.is_none() {
            return Err(RuntimeError::Checkpoint(format!(
                "{} already holds checkpoints; resume from them or use another directory",
                settings.dir.display()
            )));
        }
        let mut restore = match settings.resume_from {
            // A chosen checkpoint applies to the first attempt; a restart in-process goes on
            // from the latest the job completed since.
            Some(id) if restart == 0 => Some(crate::checkpointing::restore_point_at(&settings.dir, id)?),
            _ => crate::checkpointing::latest_restore_point(&settings.dir)?,
        };
        if restore.is_none()
            && !has_checkpoints
            && let Some(savepoint) = &settings.savepoint
        {
            let point = crate::checkpointing::savepoint_restore_point(savepoint)?;
            self.check_resume(&point, settings.allow_unmatched_state)?;
            let dir = settings.dir.join(format!("p{}", self.config.parallelism.max(1)));
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| RuntimeError::Checkpoint(format!("cannot clear {}: {e}", dir.display())))?;
            }
            return Ok(Some(point));
        }
        match &restore {
            None if has_checkpoints => {
                return Err(RuntimeError::Checkpoint(format!(
                    "no intact checkpoint in {} (every manifest is damaged): refusing to start from nothing",
                    settings.dir.display()
                )));
            }
            None => {
                let dir = settings.dir.join(format!("p{}", self.config.parallelism.max(1)));
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| RuntimeError::Checkpoint(format!("cannot clear {}: {e}", dir.display())))?;
                }
            }
            Some(point) if point.manifest.parallelism as usize != self.config.parallelism.max(1) => {
                // Rescaling from a retained checkpoint: its state goes through the canonical
                // savepoint format (by operator uid and key group), as a savepoint's would.
                let point = rescale_point(&settings.dir, point)?;
                self.check_resume(&point, settings.allow_unmatched_state)?;
                let dir = settings.dir.join(format!("p{}", self.config.parallelism.max(1)));
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| RuntimeError::Checkpoint(format!("cannot clear {}: {e}", dir.display())))?;
                }
                // Older manifests may name stores of this parallelism, just cleared: they go
                // (the converted checkpoint stays until one at this parallelism replaces it).
                let id = point.manifest.checkpoint_id;
                for older in directory.list()?.into_iter().filter(|older| *older < id) {
                    directory.remove(older)?;
                }
                // Newer ones (a chosen earlier checkpoint, or damaged ones the latest skipped)
                // would collide with the ids the job takes from here on.
                directory.discard_after(id)?;
                return Ok(Some(point));
            }
            Some(point) => {
                if restart == 0 {
                    // A job resumed from its directory: its state is matched to the operators
                    // by uid, as a savepoint's is (a restart in-process runs the same job).
                    self.check_resume(point, settings.allow_unmatched_state)?;
                } else if point.manifest.max_parallelism != self.config.max_parallelism {
                    return Err(RuntimeError::Checkpoint(format!(
                        "checkpoint {} has {} key groups; the job has {}",
                        point.manifest.checkpoint_id, point.manifest.max_parallelism, self.config.max_parallelism
                    )));
                }
                // A later checkpoint would be overwritten by a store continuing from this one;
                // an older one is no longer tracked (its files may be collected).
                directory.discard_after(point.manifest.checkpoint_id)?;
                // Removed by the reaper (each removal fsyncs the directory), off the restart's
                // path; one left behind is removed at the next restore.
                let older: Vec<u64> =
                    directory.list()?.into_iter().filter(|id| *id < point.manifest.checkpoint_id).collect();
                // So are the stores of other parallelisms and what a rescale converted: the
                // checkpoint restored is at this parallelism, and older ones go.
                let stale = stale_rescale_dirs(&settings.dir, point.manifest.parallelism);
                if !older.is_empty() || !stale.is_empty() {
                    reap(Box::new(OnDrop(Some(move || {
                        for id in older {
                            let _ = directory.remove(id);
                        }
                        for dir in stale {
                            let _ = std::fs::remove_dir_all(dir);
                        }
                    }))));
                }
            }
        }
        if let Some(point) = restore.as_mut() {
            point.savepoint = None;
        }
        Ok(restore)
    }

    /// Whether the job can start from `point` (a savepoint, a rescaled checkpoint, or a
    /// checkpoint a new process resumes): the same number of key groups, and every operator
    /// with state there (keyed state, timers or operator state) still in the job (unless
    /// dropping its state is allowed). Sources resume by split at any parallelism (see
    /// [`ShardRuntime::restored_offsets`]).
    fn check_resume(&self, point: &RestorePoint, allow_unmatched: bool) -> Result<()> {
        let id = point.manifest.checkpoint_id;
        let kind = if point.savepoint.is_some() { "savepoint" } else { "checkpoint" };
        if point.manifest.max_parallelism != self.config.max_parallelism {
            return Err(RuntimeError::Checkpoint(format!(
                "{kind} {id} has {} key groups; the job has {}",
                point.manifest.max_parallelism, self.config.max_parallelism
            )));
        }
        let ours: std::collections::BTreeSet<&str> = self.stages.iter().flat_map(|s| s.operator_uids()).collect();
        let mut theirs: std::collections::BTreeSet<String> = match &point.savepoint {
            Some(savepoint) => savepoint.operator_uids().into_iter().collect(),
            // A checkpoint's stores: the operators that registered state there (state names
            // are `<operator uid>/<name>`).
            None => {
                let names = point.manifest.shards.iter().flat_map(|s| &s.handle.states);
                names.filter_map(|state| state.name.split_once('/').map(|(uid, _)| uid.to_owned())).collect()
            }
        };
        // And the operators with operator state (in the metadata, for both).
        theirs.extend(point.metadata.operator_state.iter().map(|entry| entry.uid.clone()));
        let unmatched: Vec<String> = theirs.into_iter().filter(|uid| !ours.contains(uid.as_str())).collect();
        if !unmatched.is_empty() && !allow_unmatched {
            return Err(RuntimeError::Checkpoint(format!(
                "{kind} {id} holds state of operators the job does not have: {}; set \
                 allow_unmatched_state to drop it",
                unmatched.join(", ")
            )));
        }
        Ok(())
    }

    fn attempt(
        &self,
        attempt: u32,
        checkpoints: Option<Arc<CheckpointShared>>,
        restore: Option<Arc<RestorePoint>>,
    ) -> Result<()> {
        let parallelism = self.config.parallelism.max(1);
        let mut exchanges = Exchanges::new(parallelism);
        let exchange_config = ExchangeConfig {
            batch_len: self.config.batch_len.max(1),
            channel_capacity: self.config.channel_capacity.max(1),
        };
        let handles: Vec<(ConnectionId, Box<dyn ErasedHandle>)> = self
            .makers
            .iter()
            .map(|(id, maker)| Ok((*id, maker(&mut exchanges, exchange_config)?)))
            .collect::<Result<_>>()?;
        let shard_config =
            ShardConfig { name: format!("weir-{}-{attempt}", self.name), ..ShardConfig::with_parallelism(parallelism) };
        let root = self.config.checkpointing.as_ref().map(|c| c.dir.clone());
        let result = run_shards(&shard_config, exchanges, |ctx| {
            let context =
                AttemptContext { checkpoints: checkpoints.clone(), restore: restore.clone(), root: root.clone() };
            run_shard(ctx, &self.stages, &handles, &self.config, &self.shared, &self.run_dir, context)
        });
        if result.is_err() {
            self.shared.failed.store(true, Ordering::SeqCst);
        }
        result.map(|_| ())
    }
}

/// What the shards of one run attempt share.
struct AttemptContext {
    checkpoints: Option<Arc<CheckpointShared>>,
    restore: Option<Arc<RestorePoint>>,
    root: Option<PathBuf>,
}

/// The directory where a rescale converts checkpoint `id` of `root` (see [`rescale_point`]).
fn rescale_dir(root: &std::path::Path, id: u64) -> PathBuf {
    root.join(RESCALE_DIR).join(format!("chk-{id}"))
}

/// Where rescales convert checkpoints, under the checkpoint directory.
const RESCALE_DIR: &str = "rescale";

/// Checkpoint `point` (taken at another parallelism) as a savepoint: converted into the
/// canonical format under `<root>/rescale/chk-<id>`, or that conversion if an earlier attempt
/// completed it (an attempt that fails before its first checkpoint rescales again from it).
fn rescale_point(root: &std::path::Path, point: &RestorePoint) -> Result<RestorePoint> {
    let dir = rescale_dir(root, point.manifest.checkpoint_id);
    if let Ok(done) = crate::checkpointing::savepoint_restore_point(&dir)
        && done.manifest.checkpoint_id == point.manifest.checkpoint_id
    {
        return Ok(done);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| RuntimeError::Checkpoint(format!("cannot clear {}: {e}", dir.display())))?;
    }
    crate::checkpointing::write_savepoint(root, &dir, &point.manifest)?;
    crate::checkpointing::savepoint_restore_point(&dir)
}

/// Store directories of parallelisms other than `parallelism`, and rescale conversions: what
/// no checkpoint at `parallelism` refers to.
fn stale_rescale_dirs(root: &std::path::Path, parallelism: u32) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let other_p = name.strip_prefix('p').and_then(|p| p.parse::<u32>().ok()).is_some_and(|p| p != parallelism);
            path.is_dir() && (other_p || name == RESCALE_DIR)
        })
        .collect()
}

/// Starts `stages` on `config.parallelism` shards.
pub(crate) fn start(
    name: &str,
    stages: Vec<Arc<dyn StageFactory>>,
    makers: &[(ConnectionId, MeshMaker, bool)],
    operators: Vec<String>,
    config: JobConfig,
) -> Result<JobHandle> {
    let run = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
    let (run_dir, keep_state) = match &config.checkpointing {
        Some(settings) => (settings.dir.clone(), true),
        None => (config.data_dir.join(format!("{name}-{}-{run}", std::process::id())), config.keep_state),
    };
    let shared = Arc::new(JobShared::default());
    let checkpointed = config.checkpointing.is_some();
    let plan = JobPlan {
        name: name.to_owned(),
        stages,
        makers: makers.iter().map(|(id, maker, _)| (*id, Arc::clone(maker))).collect(),
        config,
        operators,
        shared: Arc::clone(&shared),
        run_dir: run_dir.clone(),
    };
    let thread = std::thread::Builder::new()
        .name(format!("weir-job-{name}"))
        .spawn(move || plan.run())
        .map_err(|e| RuntimeError::Shard { shard: 0, reason: format!("cannot start the job thread: {e}") })?;
    Ok(JobHandle {
        started: std::time::Instant::now(),
        name: name.to_owned(),
        thread: Some(thread),
        shared,
        run_dir,
        keep_state,
        checkpointed,
    })
}

/// The error a shard itself raised, without the wrapping `run_shards` adds (so callers see,
/// for example, [`RuntimeError::Panic`] with the operator's uid).
fn unwrap_shard_error(error: RuntimeError) -> RuntimeError {
    match error {
        RuntimeError::ShardFailed { source, .. } => unwrap_shard_error(*source),
        other => other,
    }
}

async fn run_shard(
    mut ctx: ShardContext,
    stages: &[Arc<dyn StageFactory>],
    handles: &[(ConnectionId, Box<dyn ErasedHandle>)],
    config: &JobConfig,
    shared: &Arc<JobShared>,
    run_dir: &std::path::Path,
    attempt: AttemptContext,
) -> Result<()> {
    let (shard, parallelism) = (ctx.shard(), ctx.parallelism());
    // Every exchange is connected before any stage runs.
    let mut endpoints = HashMap::new();
    for (id, handle) in handles {
        endpoints.insert(*id, handle.connect(&mut ctx).await?);
    }
    let rt = Rc::new(ShardRuntime {
        shard,
        parallelism,
        config: config.clone(),
        state_dir: match &attempt.root {
            Some(root) => root.join(format!("p{parallelism}")).join(format!("shard-{shard}")),
            None => run_dir.join(format!("shard-{shard}")),
        },
        shared: Arc::clone(shared),
        endpoints: RefCell::new(endpoints),
        idle_polls: Cell::new(0),
        checkpoints: attempt.checkpoints,
        restore: attempt.restore,
        root: attempt.root,
    });
    let mut tasks = Vec::new();
    for (index, stage) in stages.iter().enumerate() {
        let future = stage.spawn(Rc::clone(&rt), index)?;
        tasks.push(glommio::spawn_local(future));
    }
    // The first failure ends the shard at once: the other stages' tasks are dropped (which
    // cancels them) instead of waited for until they notice, so a restart does not wait on a
    // stage idling in a wait. A failure on one shard is the cause; a failure it causes on
    // another (a closed channel) is told apart by `run_shards`.
    let mut tasks: Vec<Option<_>> = tasks.into_iter().map(Some).collect();
    let outcome = std::future::poll_fn(|cx| {
        let mut pending = false;
        // Every task that ended in this round is looked at, so that the cause is reported, not
        // a consequence (a stage whose channel closed because the failed stage's is gone).
        let mut cause: Option<RuntimeError> = None;
        for slot in tasks.iter_mut() {
            let Some(task) = slot.as_mut() else { continue };
            match std::pin::Pin::new(task).poll(cx) {
                std::task::Poll::Ready(Ok(())) => *slot = None,
                std::task::Poll::Ready(Err(e)) => {
                    *slot = None;
                    if cause.as_ref().is_none_or(|c| c.is_consequence() && !e.is_consequence()) {
                        cause = Some(e);
                    }
                }
                std::task::Poll::Pending => pending = true,
            }
        }
        match cause {
            Some(e) => std::task::Poll::Ready(Err(e)),
            None if pending => std::task::Poll::Pending,
            None => std::task::Poll::Ready(Ok(())),
        }
    })
    .await;
    if outcome.is_err() {
        shared.failed.store(true, Ordering::SeqCst);
    }
    outcome
}

/// Runs its function when dropped (on the reaper thread, see [`reap`]).
struct OnDrop<F: FnOnce() + Send>(Option<F>);

impl<F: FnOnce() + Send> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// How long the reaper keeps what it is given before dropping it. A failed attempt's stores
/// arrive as its restart begins, and unmapping them takes the process's mmap lock in every
/// step, which the restart needs too (for its threads' stacks, its executors' rings and the
/// mappings it restores): dropped at once, they delayed restarts by up to 15-30 ms.
const REAP_GRACE: Duration = Duration::from_millis(250);

/// Drops `value` on a reaper thread shared by all jobs of the process (or here, should the
/// thread not start), [`REAP_GRACE`] after it was handed over: for values whose drop is slow
/// and that nobody waits for, such as a failed run attempt's mapped stores.
pub(crate) fn reap(value: Box<dyn Send>) {
    use std::sync::OnceLock;
    use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
    type Reaper = Mutex<Sender<(Instant, Box<dyn Send>)>>;
    static REAPER: OnceLock<Option<Reaper>> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = channel::<(Instant, Box<dyn Send>)>();
        let started = std::thread::Builder::new().name("weir-reaper".into()).spawn(move || {
            crate::checkpointing::yield_to_shards();
            loop {
                // While the warm pool holds buffers, the reaper wakes to free those it held
                // long enough (stores retired by a job that then ended, or more than the
                // restart's restores took).
                let received = if weir_state::warm::held_bytes() > 0 {
                    rx.recv_timeout(weir_state::warm::HOLD / 4).map_err(|e| e == RecvTimeoutError::Disconnected)
                } else {
                    rx.recv().map_err(|_| true)
                };
                drop(weir_state::warm::expire());
                match received {
                    Ok((handed, value)) => {
                        if let Some(wait) = (handed + REAP_GRACE).checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        drop(value);
                    }
                    Err(true) => break,
                    Err(false) => {}
                }
            }
        });
        started.ok().map(|_| Mutex::new(tx))
    });
    match reaper.as_ref().and_then(|tx| tx.lock().ok()) {
        Some(tx) => {
            if let Err(returned) = tx.send((Instant::now(), value)) {
                drop(returned.0);
            }
        }
        None => drop(value),
    }
}
