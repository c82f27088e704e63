//! Driving checkpoints in a running job: the I/O around the pure protocol of
//! [`crate::checkpoint`].
//!
//! - Every run attempt of a checkpointed job has one [`CheckpointShared`] (what shards and the
//!   coordinator share: the requested and completed checkpoint ids, statistics), one coordinator
//!   thread driving a [`Coordinator`], and a small pool of durability workers.
//! - Sources read [`CheckpointShared::requested`] between batches: on a new id they note their
//!   offset and inject the barrier. Stages snapshot their stores when the (aligned) barrier
//!   reaches them, forward it, and hand the stores' [`DurabilityTask`]s to the workers; a
//!   worker runs them (fsync, msync, index snapshot: off the shard's thread) and acknowledges
//!   to the coordinator, which commits the manifest once every stage instance acknowledged (to a
//!   commit slot: one `fdatasync`; it is written under its name right after completion).
//!   Only then is the checkpoint complete and sinks are told to commit.
//! - Messages carry the run attempt, so an acknowledgement from before a restart is never
//!   counted for a checkpoint of the same id after it.
//! - The manifest lists every store (`p<P>/shard-<s>/<stage>`, its handle) and, in its
//!   metadata ([`JobMetadata`]), the source offsets, operator uids and operator state (the
//!   non-keyed lists of [`weir_operators::operator_state`], whole, every checkpoint).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir_operators::operator_state::{OperatorState, Redistribution, WrittenList, restore_lists};
use weir_state::fence::Fence;
use weir_state::manifest::{CheckpointDirectory, Manifest, ShardSnapshot, SnapshotKind};
use weir_state::store::{CheckpointHandle, DurabilityTask};

use crate::checkpoint::{CheckpointConfig, CheckpointId, Command, Coordinator};
use crate::error::{Result, RuntimeError};

/// How a failed job restarts in-process from its latest complete checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum RestartStrategy {
    /// Never: the first failure fails the job.
    None,
    /// At most `attempts` restarts, `delay` apart.
    FixedDelay {
        /// Restarts allowed.
        attempts: u32,
        /// Wait before each restart.
        delay: Duration,
    },
    /// At most `attempts` restarts; the wait starts at `initial` and is multiplied by
    /// `multiplier` after each restart, up to `max`.
    ExponentialBackoff {
        /// Restarts allowed.
        attempts: u32,
        /// First wait.
        initial: Duration,
        /// Longest wait.
        max: Duration,
        /// Growth factor per restart.
        multiplier: f64,
    },
}

impl RestartStrategy {
    /// The wait before restart number `restart` (0-based), or `None` when no more are allowed.
    pub fn delay(&self, restart: u32) -> Option<Duration> {
        match self {
            RestartStrategy::None => None,
            RestartStrategy::FixedDelay { attempts, delay } => (restart < *attempts).then_some(*delay),
            RestartStrategy::ExponentialBackoff { attempts, initial, max, multiplier } => (restart < *attempts)
                .then(|| initial.mul_f64(multiplier.max(1.0).powi(restart.min(64) as i32)).min(*max)),
        }
    }
}

/// Checkpointing of a job: where, how often, and what happens on a failure.
#[derive(Debug, Clone)]
pub struct CheckpointSettings {
    /// The checkpoint directory: state stores live here (checkpoints seal them in place) and
    /// manifests are written to `manifests/`.
    pub dir: PathBuf,
    /// Interval, timeout, concurrency, pause, retention, delivery mode.
    pub protocol: CheckpointConfig,
    /// In-process restarts after a failure.
    pub restart: RestartStrategy,
    /// Start from the latest complete checkpoint in `dir` if there is one (a new process
    /// resuming a job). When `false`, a directory that already holds checkpoints is an error.
    pub resume: bool,
    /// Start from this retained checkpoint of `dir` rather than the latest (a new process
    /// going back to an earlier point). It must be in `dir` and intact: a resume never falls
    /// back to another one. The checkpoints after it are discarded (the job's stores continue
    /// from it); at another parallelism it is rescaled as the latest would be. Implies `resume`.
    pub resume_from: Option<CheckpointId>,
    /// Start from this savepoint (a directory a savepoint was written to) when `dir` holds no
    /// checkpoint yet: state is matched to operators by uid and to shards by key group, so the
    /// job may run at another parallelism.
    pub savepoint: Option<PathBuf>,
    /// Resume even when the savepoint holds state of operators the job no longer has (that
    /// state is dropped). Otherwise such a resume fails, naming them.
    pub allow_unmatched_state: bool,
    /// How the threads a checkpoint waits for (durability workers, coordinator) are scheduled.
    pub helpers: HelperScheduling,
    /// The most log bytes a restore replays per state store on top of its index snapshot,
    /// which bounds recovery time (see [`weir_state::store::StoreConfig::max_replay_bytes`]):
    /// a checkpoint that would need more writes an index snapshot as part of it, and takes
    /// longer. Default [`weir_state::store::DEFAULT_MAX_REPLAY_BYTES`]; `u64::MAX`: no bound.
    pub max_replay_bytes: u64,
}

/// How the threads a checkpoint waits for (the durability workers and the coordinator) are
/// scheduled. They sleep nearly all the time; what matters is how soon they run once woken,
/// on a machine whose cores the shards keep busy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HelperScheduling {
    /// The lowest real-time priority (`SCHED_FIFO` 1), which preempts a shard at once, where
    /// the process may use it (`CAP_SYS_NICE`, or `RLIMIT_RTPRIO` of at least 1); otherwise
    /// as [`HelperScheduling::Nice`]. Measured on the 1 GiB `checkpoint-scale` job: at nice
    /// -10 a woken durability worker waited up to 5.1 ms for a core, and the checkpoint p99 was
    /// 7.1 and 11.6 ms in two runs; in the real-time class 3.6 and 4.2 ms in the runs
    /// alternating with them (2.96-6.54 ms over all of session 9's runs of it).
    #[default]
    Realtime,
    /// Nice -10 (needs `CAP_SYS_NICE` or `RLIMIT_NICE`; the normal priority otherwise): no
    /// real-time thread in the process, for services that do not allow one.
    Nice,
}

impl CheckpointSettings {
    /// Checkpoints into `dir` every `interval_ms`, exactly-once, no restarts, resuming from
    /// the directory's latest checkpoint when there is one.
    pub fn new(dir: impl Into<PathBuf>, interval_ms: i64) -> Self {
        CheckpointSettings {
            dir: dir.into(),
            protocol: CheckpointConfig { interval_ms, ..CheckpointConfig::default() },
            restart: RestartStrategy::None,
            resume: true,
            resume_from: None,
            savepoint: None,
            allow_unmatched_state: false,
            helpers: HelperScheduling::default(),
            max_replay_bytes: weir_state::store::DEFAULT_MAX_REPLAY_BYTES,
        }
    }

    /// These settings, starting from the savepoint in `dir`.
    pub fn from_savepoint(mut self, dir: impl Into<PathBuf>) -> Self {
        self.savepoint = Some(dir.into());
        self
    }

    /// These settings, resuming from retained checkpoint `id` of the directory (see
    /// [`CheckpointSettings::resume_from`]).
    pub fn from_checkpoint(mut self, id: CheckpointId) -> Self {
        self.resume_from = Some(id);
        self.resume = true;
        self
    }

    /// These settings with `restart`.
    pub fn with_restart(mut self, restart: RestartStrategy) -> Self {
        self.restart = restart;
        self
    }
}

/// One source split's position at a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SourceOffset {
    /// The source's uid.
    pub uid: String,
    /// The split (see [`crate::source::Source::splits`]).
    pub split: u32,
    /// The number of splits the source had.
    pub splits: u32,
    /// The shard that read the split (informative: a resume deals splits anew).
    pub shard: u32,
    /// Its reader's offset (see [`crate::source::SourceReader::offset`]).
    pub offset: u64,
}

/// One list of one operator instance's operator state at a checkpoint (see
/// [`weir_operators::operator_state`]).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct OperatorStateEntry {
    /// The operator's uid.
    pub uid: String,
    /// The list's name.
    pub name: String,
    /// How it is dealt to the instances of a restored job.
    pub mode: Redistribution,
    /// The shard of the instance that wrote it.
    pub shard: u32,
    /// Its items, in order, each encoded with [`weir_state::states::encode_value`].
    pub items: Vec<Vec<u8>>,
}

impl OperatorStateEntry {
    /// The encoded bytes of its items.
    pub fn item_bytes(&self) -> usize {
        self.items.iter().map(Vec::len).sum()
    }
}

/// The runtime's part of a manifest (its `metadata`): source offsets, the operators whose
/// state the checkpoint holds, and their operator state.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct JobMetadata {
    /// Format version ([`JOB_METADATA_VERSION`]).
    pub version: u32,
    /// The job's name.
    pub job: String,
    /// Every source split's offset.
    pub sources: Vec<SourceOffset>,
    /// Stage names (the uid of each stage's input), in job order.
    pub stages: Vec<String>,
    /// Every operator uid of the job.
    pub operators: Vec<String>,
    /// Every list of operator state every operator instance wrote, ordered by uid, name and
    /// shard. Kept here whole (rewritten at every checkpoint), so meant for small state.
    pub operator_state: Vec<OperatorStateEntry>,
}

/// Version of [`JobMetadata`] (3: operator state).
pub const JOB_METADATA_VERSION: u32 = 3;

impl JobMetadata {
    /// Encodes it for a manifest's `metadata`.
    pub fn encode(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self).map(|b| b.to_vec()).unwrap_or_default()
    }

    /// Decodes (and validates) a manifest's `metadata`. Never panics.
    pub fn decode(bytes: &[u8]) -> std::result::Result<JobMetadata, String> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        let meta = rkyv::from_bytes::<JobMetadata, rkyv::rancor::Error>(&aligned)
            .map_err(|e| format!("job metadata fails validation: {e}"))?;
        if meta.version != JOB_METADATA_VERSION {
            return Err(format!("job metadata version {} (expected {JOB_METADATA_VERSION})", meta.version));
        }
        Ok(meta)
    }
}

/// What one stage instance contributes to a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct TaskSnapshot {
    /// Its stores: directory relative to the checkpoint root, and handle.
    pub stores: Vec<(String, CheckpointHandle)>,
    /// Source offsets (source stages only).
    pub offsets: Vec<SourceOffset>,
    /// The operator state its operators wrote at the barrier.
    pub operator_state: Vec<OperatorStateEntry>,
    /// Time from the first barrier's arrival to the snapshot (multi-input stages).
    pub alignment: Duration,
}

/// Durations of one checkpoint, as measured by the coordinator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckpointStat {
    /// The checkpoint.
    pub id: CheckpointId,
    /// From trigger to complete (manifest durable).
    pub duration: Duration,
    /// The longest alignment of any stage instance.
    pub alignment: Duration,
    /// The longest time a durability task took.
    pub sync: Duration,
    /// Writing the manifest (the last step).
    pub manifest: Duration,
    /// When the coordinator triggered it.
    pub triggered_at: Instant,
    /// When it completed (its manifest durable).
    pub completed_at: Instant,
    /// Bytes of index snapshots the checkpoint's own durability tasks wrote (0 unless a store
    /// was past its replay bound, [`CheckpointSettings::max_replay_bytes`]).
    pub index_bytes: u64,
    /// Whether a store was past its replay bound: its durability task wrote, or waited for,
    /// the index snapshot the checkpoint names (see
    /// [`weir_state::StoreConfig::max_replay_bytes`]).
    pub past_replay_bound: bool,
}

/// Counters of a job's checkpoints, over all its run attempts.
#[derive(Debug, Clone, Default)]
pub struct CheckpointStats {
    /// Complete checkpoints, in order.
    pub completed: Vec<CheckpointStat>,
    /// Aborted checkpoints with the reason.
    pub aborted: Vec<(CheckpointId, String)>,
    /// In-process restarts so far.
    pub restarts: u32,
    /// What failed the run attempt before each restart, in order.
    pub restart_causes: Vec<String>,
    /// The checkpoint each run attempt restored (`None`: started empty).
    pub restored: Vec<Option<CheckpointId>>,
    /// Index snapshots written in the background (detached from their checkpoints).
    pub index_snapshots: u64,
    /// Background work that failed (index snapshots not written, files not deleted). None of
    /// it affects correctness: a store keeps its previous index snapshot, garbage stays for
    /// the next collection.
    pub background_errors: Vec<String>,
}

/// What the shards of one run attempt and its coordinator share.
#[derive(Debug)]
pub struct CheckpointShared {
    attempt: u32,
    /// Delivery mode of this job's barriers.
    pub mode: crate::checkpoint::DeliveryMode,
    requested: AtomicU64,
    /// When the coordinator's next checkpoint is due (clock milliseconds; `i64::MAX`: not
    /// known), for idle sources to look for its request more often around then.
    next_due: std::sync::atomic::AtomicI64,
    completed: AtomicU64,
    aborted_final: AtomicU64,
    /// Checkpoints aborted in this attempt.
    aborts: AtomicU64,
    final_wanted: AtomicBool,
    /// One queue per durability worker; a task always uses the same one, so its work is
    /// done in order (its finish is reported after its last snapshot is durable).
    work: Vec<Mutex<Sender<Work>>>,
    to_coordinator: Mutex<Sender<Msg>>,
    retained: Mutex<Vec<CheckpointId>>,
    /// The checkpoint this attempt restored.
    pub restored: Option<CheckpointId>,
    /// Sources stop after injecting this barrier (a stop with savepoint; 0: none).
    stop_after: AtomicU64,
    /// Whether that stop drains event time first.
    drain: AtomicBool,
    /// The background workers' queues (see [`Background`]): write-behind (and deletion, a
    /// rename each) has a thread of its own, so that it never waits behind an index snapshot
    /// being written (the next checkpoint would then sync everything the write-behind was meant
    /// to start), and runs at nice 19, not in the idle class, where deletions starved while the
    /// shards kept every core busy (the compaction test then found the log unbounded).
    background: Mutex<Sender<Background>>,
    write_behind: Mutex<Sender<Background>>,
    /// Closed when the attempt stops: the background workers drop what is queued, a running
    /// index snapshot write gives up, and neither they nor the coordinator rename or delete a
    /// named file afterwards (see [`weir_state::fence`]), so a restart need not wait for them.
    fence: Arc<Fence>,
}

/// Work a stage hands off its shard's thread that no checkpoint waits for. It runs on two
/// background threads per run attempt (one at nice 19 for write-behind and deletions, one in
/// the idle class for index snapshots), so it never delays a checkpoint's durability tasks.
pub enum Background {
    /// Write back full pages of a store's mutable region, so that the next checkpoint has
    /// little left to sync; `busy` is cleared when done (one task per store at a time).
    WriteBehind(weir_state::store::WriteBehindTask, Arc<AtomicBool>),
    /// Write an index snapshot taken at a checkpoint but detached from it.
    IndexSnapshot(weir_state::store::IndexSnapshotTask),
    /// Delete files a store let go of (unlinking can block for milliseconds).
    Delete(Vec<PathBuf>),
}

impl std::fmt::Debug for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Background::WriteBehind(..) => f.write_str("WriteBehind"),
            Background::IndexSnapshot(t) => write!(f, "IndexSnapshot({} bytes)", t.bytes()),
            Background::Delete(paths) => write!(f, "Delete({} files)", paths.len()),
        }
    }
}

/// Files to unlink when dropped (on the reaper thread).
struct Trash(Vec<PathBuf>);

impl Drop for Trash {
    fn drop(&mut self) {
        for path in &self.0 {
            // A file left behind is collected again by the store's next garbage collection.
            let _ = weir_state::priority::delete_in_steps(path);
        }
    }
}

fn background_worker(rx: &Receiver<Background>, fence: &Fence, stats: &Mutex<CheckpointStats>) {
    let failed = |what: String| {
        if let Ok(mut s) = stats.lock()
            && s.background_errors.len() < 100
        {
            s.background_errors.push(what);
        }
    };
    // Trash files handed to the reaper and not unlinked yet.
    let mut handed = std::collections::HashSet::new();
    while let Ok(job) = rx.recv() {
        if fence.is_closed() {
            // Dropping the job abandons it: an index snapshot unwritten, garbage left for the
            // next attempt's collection, a write-behind undone (the checkpoint syncs anyway).
            continue;
        }
        match job {
            Background::WriteBehind(task, busy) => {
                // Only a hint: the next checkpoint syncs the same bytes and reports errors.
                let _ = task.run();
                busy.store(false, Ordering::Release);
            }
            Background::IndexSnapshot(task) => {
                // A failed snapshot leaves the store on its previous one (a longer replay).
                // Nothing written: a checkpoint past the replay bound took the write over (its
                // `CheckpointStat::index_bytes` counts it).
                match task.run(fence) {
                    Ok(0) => {}
                    Ok(_) => {
                        if let Ok(mut s) = stats.lock() {
                            s.index_snapshots += 1;
                        }
                    }
                    Err(_) if fence.is_closed() => {}
                    Err(e) => failed(format!("index snapshot not written: {e}")),
                }
            }
            Background::Delete(paths) => {
                // Renamed to a name no store uses (fast, and inside the fence, as the next
                // attempt may create a file of the same name), then unlinked by the reaper
                // (which nobody waits for; an unlink can block for tens of ms). A store hands
                // out files with a trash name too (left by a stopped attempt, or handed to the
                // reaper and not unlinked yet, which the store's next collection finds again):
                // those go to the reaper as they are, once. Renaming them again raced the
                // reaper, which then found nothing to unlink, and the names grew at every
                // collection until too long (found under load by the compaction test).
                handed.retain(|p: &PathBuf| p.exists());
                let mut trash = Vec::with_capacity(paths.len());
                for path in paths {
                    if path.as_os_str().to_string_lossy().ends_with(weir_state::store::TRASH_SUFFIX) {
                        if handed.insert(path.clone()) {
                            trash.push(path);
                        }
                        continue;
                    }
                    let mut name = path.clone().into_os_string();
                    name.push(weir_state::store::TRASH_SUFFIX);
                    match fence.pass(|| std::fs::rename(&path, &name)) {
                        None => break,
                        Some(Ok(())) => {
                            let name = PathBuf::from(name);
                            handed.insert(name.clone());
                            trash.push(name);
                        }
                        Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Some(Err(e)) => failed(format!("cannot delete {}: {e}", path.display())),
                    }
                }
                crate::runner::reap(Box::new(Trash(trash)));
            }
        }
    }
}

impl CheckpointShared {
    /// Queues `job` for the background worker.
    pub fn background(&self, job: Background) {
        let queue = match job {
            Background::WriteBehind(..) | Background::Delete(..) => &self.write_behind,
            Background::IndexSnapshot(..) => &self.background,
        };
        if let Ok(tx) = queue.lock() {
            let _ = tx.send(job);
        }
    }

    /// The newest checkpoint sources should inject (0: none yet).
    pub fn requested(&self) -> CheckpointId {
        self.requested.load(Ordering::Acquire)
    }

    /// Whether a checkpoint may be triggered any moment at `now_ms`: from a millisecond before
    /// it is due until a few after (the coordinator ticks every few milliseconds).
    pub fn due_soon(&self, now_ms: i64) -> bool {
        let due = self.next_due.load(Ordering::Relaxed);
        due != i64::MAX && now_ms >= due.saturating_sub(1) && now_ms <= due.saturating_add(6)
    }

    /// The newest complete checkpoint (0: none yet in this attempt; see `restored`).
    pub fn completed(&self) -> CheckpointId {
        self.completed.load(Ordering::Acquire)
    }

    /// Checkpoints aborted so far in this attempt.
    pub fn aborts(&self) -> u64 {
        self.aborts.load(Ordering::Acquire)
    }

    /// Whether checkpoint `id` (a final one) was aborted.
    pub fn final_aborted(&self, id: CheckpointId) -> bool {
        self.aborted_final.load(Ordering::Acquire) >= id
    }

    /// A source reached its end: it wants a checkpoint after its last record (so that every
    /// record's output is committed before the job finishes).
    pub fn request_final(&self) {
        self.final_wanted.store(true, Ordering::Release);
    }

    /// Whether a source injecting barrier `id` stops after it, and whether it drains event
    /// time (the final watermark) first.
    pub fn stop_at(&self, id: CheckpointId) -> Option<bool> {
        let stop = self.stop_after.load(Ordering::Acquire);
        (stop != 0 && id >= stop).then(|| self.drain.load(Ordering::Acquire))
    }

    /// Whether the job is stopping without draining: the end of input then fires no timers.
    pub fn stopping_without_drain(&self) -> bool {
        self.stop_after.load(Ordering::Acquire) != 0 && !self.drain.load(Ordering::Acquire)
    }

    /// Asks for a savepoint into `dir` (and, with `stop`, stops the job after it, draining event
    /// time first when `stop == Some(true)`). The answer arrives on the returned channel.
    pub fn request_savepoint(&self, dir: PathBuf, stop: Option<bool>) -> Receiver<Result<SavepointInfo>> {
        let (reply, answer) = channel();
        let request = SavepointRequest { dir, stop, reply };
        match self.to_coordinator.lock() {
            Ok(tx) => {
                if let Err(e) = tx.send(Msg::Savepoint(request))
                    && let Msg::Savepoint(r) = e.0
                {
                    let _ = r.reply.send(Err(RuntimeError::Checkpoint("the job is not running".into())));
                }
            }
            Err(_) => {
                let _ = request.reply.send(Err(RuntimeError::Checkpoint("coordinator unavailable".into())));
            }
        }
        answer
    }

    /// Asks for a checkpoint now, besides the interval's: it is triggered as soon as the
    /// in-flight limit allows. The answer (its id once complete, or why it was not) arrives on
    /// the returned channel.
    pub fn request_checkpoint(&self) -> Receiver<Result<CheckpointId>> {
        let (reply, answer) = channel();
        match self.to_coordinator.lock() {
            Ok(tx) => {
                if let Err(e) = tx.send(Msg::Checkpoint(reply))
                    && let Msg::Checkpoint(r) = e.0
                {
                    let _ = r.send(Err(RuntimeError::Checkpoint("the job is not running".into())));
                }
            }
            Err(_) => {
                let _ = reply.send(Err(RuntimeError::Checkpoint("coordinator unavailable".into())));
            }
        }
        answer
    }

    /// Complete checkpoints still retained (their files must be kept).
    pub fn retained(&self) -> Vec<CheckpointId> {
        self.retained.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Hands a stage instance's snapshot and durability tasks to the workers; the coordinator
    /// hears of it once they are durable.
    pub fn snapshot_taken(
        &self,
        task: usize,
        id: CheckpointId,
        snapshot: TaskSnapshot,
        work: Vec<DurabilityTask>,
        sinks: Vec<crate::sink::SyncWork>,
    ) {
        self.queue(Work { attempt: self.attempt, task, id, snapshot, work, sinks, finished: false });
    }

    /// A stage instance finished (its input ended) after its snapshot for checkpoint `id`: that
    /// snapshot stands for it in every later checkpoint, once it is durable.
    pub fn task_finished(&self, task: usize, id: CheckpointId, snapshot: TaskSnapshot) {
        let work = Vec::new();
        self.queue(Work { attempt: self.attempt, task, id, snapshot, work, sinks: Vec::new(), finished: true });
    }

    fn queue(&self, item: Work) {
        if let Some(queue) = self.work.get(item.task % self.work.len().max(1))
            && let Ok(tx) = queue.lock()
        {
            let _ = tx.send(item);
        }
    }

    /// A stage instance could not take checkpoint `id`.
    pub fn decline(&self, task: usize, id: CheckpointId, reason: String) {
        if let Ok(tx) = self.to_coordinator.lock() {
            let _ = tx.send(Msg::Declined { attempt: self.attempt, task, id, reason });
        }
    }
}

struct Work {
    attempt: u32,
    task: usize,
    id: CheckpointId,
    snapshot: TaskSnapshot,
    work: Vec<DurabilityTask>,
    /// Syncs of the stage's sink transactions (after the stores').
    sinks: Vec<crate::sink::SyncWork>,
    finished: bool,
}

/// A savepoint a running job wrote.
#[derive(Debug, Clone)]
pub struct SavepointInfo {
    /// The checkpoint id it was taken at.
    pub id: CheckpointId,
    /// Its directory.
    pub dir: PathBuf,
    /// What it holds, per operator uid.
    pub summary: weir_state::savepoint::SavepointSummary,
}

struct SavepointRequest {
    dir: PathBuf,
    stop: Option<bool>,
    reply: Sender<Result<SavepointInfo>>,
}

enum Msg {
    Savepoint(SavepointRequest),
    /// A checkpoint on demand ([`CheckpointShared::request_checkpoint`]).
    Checkpoint(Sender<Result<CheckpointId>>),
    Acked {
        attempt: u32,
        task: usize,
        id: CheckpointId,
        ack: Ack,
    },
    Finished {
        attempt: u32,
        task: usize,
        id: CheckpointId,
        snapshot: TaskSnapshot,
    },
    Declined {
        attempt: u32,
        task: usize,
        id: CheckpointId,
        reason: String,
    },
    Stop,
}

/// The description of the job a manifest needs.
#[derive(Debug, Clone)]
pub struct JobLayout {
    /// The job's name.
    pub job: String,
    /// Stage names, in job order.
    pub stages: Vec<String>,
    /// Operator uids.
    pub operators: Vec<String>,
    /// Number of shards.
    pub parallelism: usize,
    /// Number of key groups.
    pub max_parallelism: u16,
}

/// The coordinator thread and durability workers of one run attempt.
pub struct CheckpointDriver {
    shared: Arc<CheckpointShared>,
    coordinator: Option<std::thread::JoinHandle<()>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    background: Option<std::thread::JoinHandle<()>>,
    write_behind: Option<std::thread::JoinHandle<()>>,
    stop: Sender<Msg>,
}

impl std::fmt::Debug for CheckpointDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointDriver").field("attempt", &self.shared.attempt).finish()
    }
}

/// Durability workers per job: syncs of different stores overlap, and a slow one (an index
/// snapshot) does not hold up the others.
const WORKERS: usize = 2;

impl CheckpointDriver {
    /// Starts the coordinator of attempt `attempt`, whose state was restored from `restored`.
    pub fn start(
        settings: &CheckpointSettings,
        layout: JobLayout,
        attempt: u32,
        restored: Option<CheckpointId>,
        stats: Arc<Mutex<CheckpointStats>>,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Result<CheckpointDriver> {
        // The previous attempt's fence is closed: its coordinator (perhaps still in an fsync)
        // renames and deletes nothing any more, and its temp files have names of their own.
        let fence = Arc::new(Fence::new());
        let directory = CheckpointDirectory::open_for_writing(&settings.dir)?.with_fence(Arc::clone(&fence));
        let (to_coordinator, inbox) = channel::<Msg>();
        let queues: Vec<(Sender<Work>, Receiver<Work>)> = (0..WORKERS).map(|_| channel::<Work>()).collect();
        let (work_tx, work_rx): (Vec<_>, Vec<_>) = queues.into_iter().unzip();
        let (background_tx, background_rx) = channel::<Background>();
        let (write_behind_tx, write_behind_rx) = channel::<Background>();
        let shared = Arc::new(CheckpointShared {
            attempt,
            mode: settings.protocol.mode,
            requested: AtomicU64::new(0),
            next_due: std::sync::atomic::AtomicI64::new(i64::MAX),
            completed: AtomicU64::new(0),
            aborted_final: AtomicU64::new(0),
            aborts: AtomicU64::new(0),
            final_wanted: AtomicBool::new(false),
            work: work_tx.into_iter().map(Mutex::new).collect(),
            to_coordinator: Mutex::new(to_coordinator.clone()),
            retained: Mutex::new(restored.into_iter().collect()),
            restored,
            stop_after: AtomicU64::new(0),
            drain: AtomicBool::new(false),
            background: Mutex::new(background_tx),
            write_behind: Mutex::new(write_behind_tx),
            fence: Arc::clone(&fence),
        });
        let background = std::thread::Builder::new()
            .name("weir-background".into())
            .spawn({
                let stats = Arc::clone(&stats);
                // The idle scheduling class: a shard waking up takes its core back at once (at
                // the shards' priority this thread took 690 ms of shard time in 14.7 s of the
                // 1 GiB `checkpoint-scale` job). An urgent snapshot (a long replay tail), or one
                // that falls behind its pace, leaves the class until written
                // (`weir_state::priority`): at nice 19, with no such escape, snapshots starved
                // behind busy shards (a restored 1 GiB store had none confirmed within 76 s),
                // and restore replays everything after the last one.
                move || {
                    weir_state::priority::enter_idle_class();
                    background_worker(&background_rx, &fence, &stats)
                }
            })
            .map_err(|e| RuntimeError::Checkpoint(format!("cannot start the background worker: {e}")))?;
        let write_behind = std::thread::Builder::new()
            .name("weir-write-behind".into())
            .spawn({
                let (stats, fence) = (Arc::clone(&stats), Arc::clone(&shared.fence));
                move || {
                    yield_to_shards();
                    background_worker(&write_behind_rx, &fence, &stats)
                }
            })
            .map_err(|e| RuntimeError::Checkpoint(format!("cannot start the write-behind worker: {e}")))?;
        let workers = work_rx
            .into_iter()
            .enumerate()
            .map(|(i, rx)| {
                let tx = to_coordinator.clone();
                let (how, fence) = (settings.helpers, Arc::clone(&shared.fence));
                std::thread::Builder::new()
                    .name(format!("weir-durability-{i}"))
                    .spawn(move || {
                        hurry(how);
                        durability_worker(&rx, &tx, &fence)
                    })
                    .map_err(|e| RuntimeError::Checkpoint(format!("cannot start a durability worker: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let tasks = layout.stages.len() * layout.parallelism;
        let mut coordinator = Coordinator::new(settings.protocol.clone(), tasks, restored.map_or(1, |r| r + 1));
        coordinator.start_interval_at(clock.now_ms());
        let run = CoordinatorLoop {
            shared: Arc::clone(&shared),
            coordinator,
            directory,
            layout,
            inbox,
            stats,
            clock,
            started: BTreeMap::new(),
            finished: BTreeMap::new(),
            waiting_savepoints: std::collections::VecDeque::new(),
            savepoints: BTreeMap::new(),
            manifests: BTreeMap::new(),
            waiting_checkpoints: Vec::new(),
            on_demand: BTreeMap::new(),
            root: settings.dir.clone(),
            tick: Duration::from_millis(settings.protocol.interval_ms.clamp(1, 5) as u64),
        };
        let helpers = settings.helpers;
        let coordinator = std::thread::Builder::new()
            .name("weir-coordinator".into())
            .spawn(move || {
                hurry(helpers);
                run.run()
            })
            .map_err(|e| RuntimeError::Checkpoint(format!("cannot start the coordinator: {e}")))?;
        Ok(CheckpointDriver {
            shared,
            coordinator: Some(coordinator),
            workers,
            background: Some(background),
            write_behind: Some(write_behind),
            stop: to_coordinator,
        })
    }

    /// What the shards of this attempt share with the coordinator.
    pub fn shared(&self) -> Arc<CheckpointShared> {
        Arc::clone(&self.shared)
    }

    /// Stops the coordinator and the background workers (after the attempt's shards stopped).
    /// At the end of a job (`wait_for_syncs`) it waits for all of them. On a restart it closes
    /// the attempt's fence and waits for none: after the fence no helper renames or deletes a
    /// named file (the coordinator's manifest commits and removals, the background workers'
    /// index snapshots and deletions), and the durability workers only sync files the next
    /// attempt maps too, with acks that carry this attempt's number, which no later coordinator
    /// counts. Threads left running end on their own once their current call returns.
    pub fn stop(mut self, wait_for_syncs: bool) {
        let _ = self.stop.send(Msg::Stop);
        if wait_for_syncs && let Some(c) = self.coordinator.take() {
            let _ = c.join();
        }
        // Background work is only worth finishing while the attempt runs.
        self.shared.fence.close();
        // Dropping the shared sender side closes the work queues once no shard holds it.
        drop(self.shared);
        if wait_for_syncs {
            let helpers = self.workers.drain(..).chain(self.background.take()).chain(self.write_behind.take());
            for helper in helpers {
                let _ = helper.join();
            }
        }
    }
}

/// Gives the calling thread the lowest priority (nice 19), for helpers whose work nobody waits
/// for (write-behind, unmapping a failed attempt's stores): on a machine with as many shards
/// as cores they would otherwise take a shard's core for milliseconds at a time, stalling its
/// records and its barriers. The durability workers and the coordinator, which a checkpoint
/// waits for, get a higher one instead ([`hurry`]). A failure (a sandbox that forbids it) is
/// ignored.
pub(crate) fn yield_to_shards() {
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
}

/// Schedules the calling thread ahead of the shards as `how` says, for the threads a checkpoint
/// waits for (the durability workers and the coordinator): they sleep nearly all the time, and
/// on a machine with as many shards as cores a wakeup would otherwise wait for a busy shard's
/// time slice. [`HelperScheduling::Realtime`] falls back to nice -10 where the real-time class
/// is not allowed; nice -10 needs `CAP_SYS_NICE` (or `RLIMIT_NICE`), without which the thread
/// keeps the normal priority.
pub(crate) fn hurry(how: HelperScheduling) {
    if how == HelperScheduling::Realtime && weir_state::priority::enter_realtime_class() {
        return;
    }
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), -10);
}

fn durability_worker(rx: &Receiver<Work>, tx: &Sender<Msg>, fence: &Fence) {
    // Tasks whose files a failed sync made suspect: their finish never stands in for them.
    let mut failed = std::collections::HashSet::new();
    while let Ok(item) = rx.recv() {
        if item.finished {
            if !failed.contains(&item.task) {
                let msg =
                    Msg::Finished { attempt: item.attempt, task: item.task, id: item.id, snapshot: item.snapshot };
                if tx.send(msg).is_err() {
                    return;
                }
            }
            continue;
        }
        let started = Instant::now();
        let mut failure = None;
        let mut index_bytes = 0;
        let mut past_replay_bound = false;
        for task in item.work {
            // An index snapshot a task writes (a store past its replay bound) is named after
            // the checkpoint, whose id a later attempt may reuse: it is fenced.
            match task.run_fenced(Some(fence)) {
                Ok(durable) => {
                    index_bytes += durable.index_bytes;
                    past_replay_bound |= durable.past_replay_bound;
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        if failure.is_none() {
            for sync in item.sinks {
                if let Err(e) = sync.run() {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        let msg = match failure {
            None => Msg::Acked {
                attempt: item.attempt,
                task: item.task,
                id: item.id,
                ack: Ack { snapshot: item.snapshot, sync: started.elapsed(), index_bytes, past_replay_bound },
            },
            Some(reason) => {
                failed.insert(item.task);
                Msg::Declined { attempt: item.attempt, task: item.task, id: item.id, reason }
            }
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// A stage instance's acknowledgement of a checkpoint: its snapshot, and what making it
/// durable took.
#[derive(Debug, Clone)]
struct Ack {
    snapshot: TaskSnapshot,
    /// The durability tasks' time.
    sync: Duration,
    /// Index snapshot bytes the tasks wrote.
    index_bytes: u64,
    /// Whether a store was past its replay bound.
    past_replay_bound: bool,
}

impl Ack {
    /// The acknowledgement a finished stage instance gives every later checkpoint: its last
    /// snapshot, with nothing left to sync.
    fn finished(snapshot: &TaskSnapshot) -> Ack {
        Ack { snapshot: snapshot.clone(), sync: Duration::ZERO, index_bytes: 0, past_replay_bound: false }
    }
}

struct CoordinatorLoop {
    shared: Arc<CheckpointShared>,
    coordinator: Coordinator<Ack>,
    directory: CheckpointDirectory,
    layout: JobLayout,
    inbox: Receiver<Msg>,
    stats: Arc<Mutex<CheckpointStats>>,
    clock: Arc<dyn crate::clock::Clock>,
    /// Checkpoints in flight, with when each was triggered.
    started: BTreeMap<CheckpointId, Instant>,
    /// Stage instances that finished, with their last (durable) snapshot.
    finished: BTreeMap<usize, (CheckpointId, TaskSnapshot)>,
    /// Savepoint requests not triggered yet (a checkpoint is in flight).
    waiting_savepoints: std::collections::VecDeque<SavepointRequest>,
    /// Savepoints in flight, by checkpoint id.
    savepoints: BTreeMap<CheckpointId, SavepointRequest>,
    /// Manifests of savepoints in flight, written, not yet converted.
    manifests: BTreeMap<CheckpointId, Manifest>,
    /// Checkpoints asked for on demand and not triggered yet (one is in flight).
    waiting_checkpoints: Vec<Sender<Result<CheckpointId>>>,
    /// Checkpoints on demand in flight, by id: answered when it (or a later one) completes.
    on_demand: BTreeMap<CheckpointId, Vec<Sender<Result<CheckpointId>>>>,
    root: PathBuf,
    tick: Duration,
}

impl CoordinatorLoop {
    fn run(mut self) {
        loop {
            let now = self.clock.now_ms();
            let mut commands = self.coordinator.tick(now);
            if self.shared.final_wanted.swap(false, Ordering::AcqRel) {
                match self.coordinator.trigger_early(now) {
                    Some(id) => commands.push(Command::Trigger(id)),
                    // One in flight, or within the minimum pause: ask again at the next tick.
                    None => self.shared.final_wanted.store(true, Ordering::Release),
                }
            }
            if !self.waiting_savepoints.is_empty()
                && let Some(id) = self.coordinator.trigger_now(now)
                && let Some(request) = self.waiting_savepoints.pop_front()
            {
                if let Some(drain) = request.stop {
                    self.shared.drain.store(drain, Ordering::Release);
                    self.shared.stop_after.store(id, Ordering::Release);
                }
                self.savepoints.insert(id, request);
                commands.push(Command::Trigger(id));
            }
            if !self.waiting_checkpoints.is_empty()
                && let Some(id) = self.coordinator.trigger_now(now)
            {
                self.on_demand.insert(id, std::mem::take(&mut self.waiting_checkpoints));
                commands.push(Command::Trigger(id));
            }
            self.execute(commands);
            let due = self.coordinator.next_due_ms().unwrap_or(i64::MAX);
            self.shared.next_due.store(due, Ordering::Relaxed);
            match self.inbox.recv_timeout(self.tick) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    for (_, request) in std::mem::take(&mut self.savepoints) {
                        let _ = request.reply.send(Err(RuntimeError::Checkpoint("the job stopped".into())));
                    }
                    for request in self.waiting_savepoints.drain(..) {
                        let _ = request.reply.send(Err(RuntimeError::Checkpoint("the job stopped".into())));
                    }
                    let waiting = std::mem::take(&mut self.on_demand).into_values().flatten();
                    for reply in waiting.chain(self.waiting_checkpoints.drain(..)) {
                        let message = "the run attempt stopped (the job finished or failed) before the checkpoint \
                                       completed";
                        let _ = reply.send(Err(RuntimeError::Checkpoint(message.into())));
                    }
                    return;
                }
                Ok(Msg::Savepoint(request)) => self.waiting_savepoints.push_back(request),
                Ok(Msg::Checkpoint(reply)) => self.waiting_checkpoints.push(reply),
                Ok(Msg::Acked { attempt, task, id, ack }) if attempt == self.shared.attempt => {
                    let commands = self.coordinator.on_ack(task, id, ack);
                    self.execute(commands);
                }
                Ok(Msg::Finished { attempt, task, id, snapshot }) if attempt == self.shared.attempt => {
                    let mut commands = Vec::new();
                    for later in self.coordinator.in_flight().into_iter().filter(|c| *c > id) {
                        commands.extend(self.coordinator.on_ack(task, later, Ack::finished(&snapshot)));
                    }
                    self.finished.insert(task, (id, snapshot));
                    self.execute(commands);
                }
                Ok(Msg::Declined { attempt, task, id, reason }) if attempt == self.shared.attempt => {
                    let commands = self.coordinator.on_decline(task, id, &reason);
                    self.execute(commands);
                }
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn execute(&mut self, mut commands: Vec<Command<Ack>>) {
        while !commands.is_empty() {
            let mut next = Vec::new();
            for command in commands {
                match command {
                    Command::Trigger(id) => {
                        self.started.insert(id, Instant::now());
                        self.shared.requested.fetch_max(id, Ordering::AcqRel);
                        for (task, (last, snapshot)) in &self.finished {
                            if *last < id {
                                next.extend(self.coordinator.on_ack(*task, id, Ack::finished(snapshot)));
                            }
                        }
                    }
                    Command::WriteManifest(id, acks) => {
                        let alignment = acks.iter().map(|(_, a)| a.snapshot.alignment).max().unwrap_or_default();
                        let sync = acks.iter().map(|(_, a)| a.sync).max().unwrap_or_default();
                        let index_bytes = acks.iter().map(|(_, a)| a.index_bytes).sum();
                        let past_replay_bound = acks.iter().any(|(_, a)| a.past_replay_bound);
                        let writing = Instant::now();
                        let result = self.write_manifest(id, acks.into_iter().map(|(_, a)| a.snapshot).collect());
                        let manifest = writing.elapsed();
                        if result.is_ok()
                            && let Ok(mut stats) = self.stats.lock()
                        {
                            let completed_at = Instant::now();
                            let triggered_at = self.started.get(&id).copied().unwrap_or(writing);
                            stats.completed.push(CheckpointStat {
                                id,
                                duration: completed_at.saturating_duration_since(triggered_at),
                                triggered_at,
                                completed_at,
                                alignment,
                                sync,
                                manifest,
                                index_bytes,
                                past_replay_bound,
                            });
                        }
                        let now = self.clock.now_ms();
                        next.extend(self.coordinator.on_manifest(id, result.map_err(|e| e.to_string()), now));
                    }
                    Command::Complete(id) => {
                        self.started.remove(&id);
                        if let Ok(mut r) = self.shared.retained.lock() {
                            *r = self.coordinator.retained();
                        }
                        self.shared.completed.fetch_max(id, Ordering::AcqRel);
                        // A checkpoint asked for is answered by the first to complete after it
                        // was triggered: itself, or a later one that superseded it.
                        let answered: Vec<CheckpointId> = self.on_demand.range(..=id).map(|(k, _)| *k).collect();
                        for reply in answered.into_iter().filter_map(|k| self.on_demand.remove(&k)).flatten() {
                            let _ = reply.send(Ok(id));
                        }
                        // Complete once in its commit slot; named now, off the checkpoint's
                        // path and before the next trigger. A failure here loses nothing: the
                        // slot keeps it, and the next commit or writer names it first.
                        let _ = self.directory.materialize(id);
                        if let (Some(request), Some(manifest)) =
                            (self.savepoints.remove(&id), self.manifests.remove(&id))
                        {
                            // No checkpoint is triggered (so no file released) while this runs.
                            // It reads and writes all the job's state: in the normal class, so
                            // that it shares the cores with the shards instead of preempting one.
                            let lowered = weir_state::priority::lower();
                            let written = write_savepoint(&self.root, &request.dir, &manifest);
                            drop(lowered);
                            let _ = request.reply.send(written);
                        }
                    }
                    Command::Release(ids) => {
                        if let Ok(mut r) = self.shared.retained.lock() {
                            *r = self.coordinator.retained();
                        }
                        for id in ids {
                            let _ = self.directory.remove(id);
                        }
                    }
                    Command::Abort(id, reason) => {
                        self.started.remove(&id);
                        self.manifests.remove(&id);
                        if let Some(request) = self.savepoints.remove(&id) {
                            let message = format!("savepoint {id} failed: {reason}");
                            let _ = request.reply.send(Err(RuntimeError::Checkpoint(message)));
                        }
                        for reply in self.on_demand.remove(&id).into_iter().flatten() {
                            let _ =
                                reply.send(Err(RuntimeError::Checkpoint(format!("checkpoint {id} failed: {reason}"))));
                        }
                        if let Ok(mut stats) = self.stats.lock() {
                            stats.aborted.push((id, reason));
                        }
                        // Sources that ended wait for a checkpoint after their last record.
                        self.shared.aborted_final.fetch_max(id, Ordering::AcqRel);
                        self.shared.aborts.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
            commands = next;
        }
    }

    fn write_manifest(&mut self, id: CheckpointId, snapshots: Vec<TaskSnapshot>) -> Result<()> {
        let mut shards = Vec::new();
        let mut sources = Vec::new();
        let mut operator_state = Vec::new();
        for snapshot in snapshots {
            for (dir, handle) in snapshot.stores {
                shards.push(ShardSnapshot { shard: handle.shard, store_dir: dir, handle });
            }
            sources.extend(snapshot.offsets);
            operator_state.extend(snapshot.operator_state);
        }
        shards.sort_by(|a, b| a.store_dir.cmp(&b.store_dir));
        sources.sort_by(|a, b| (&a.uid, a.shard).cmp(&(&b.uid, b.shard)));
        operator_state.sort_by(|a, b| (&a.uid, &a.name, a.shard).cmp(&(&b.uid, &b.name, b.shard)));
        let metadata = JobMetadata {
            version: JOB_METADATA_VERSION,
            job: self.layout.job.clone(),
            sources,
            stages: self.layout.stages.clone(),
            operators: self.layout.operators.clone(),
            operator_state,
        };
        let manifest = Manifest {
            checkpoint_id: id,
            kind: SnapshotKind::Checkpoint,
            created_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            parallelism: self.layout.parallelism as u32,
            max_parallelism: self.layout.max_parallelism,
            shards,
            metadata: metadata.encode(),
        };
        self.directory.commit_to_slot(&manifest)?;
        if self.savepoints.contains_key(&id) {
            self.manifests.insert(id, manifest);
        }
        Ok(())
    }
}

/// Converts complete checkpoint `manifest` (stores under `root`) into a savepoint in `dir`:
/// every store is mapped back read-only (its files are sealed up to the checkpoint) and its
/// entries written in the canonical format; then the savepoint's own manifest is committed.
pub(crate) fn write_savepoint(root: &Path, dir: &Path, manifest: &Manifest) -> Result<SavepointInfo> {
    use weir_state::savepoint::SavepointWriter;
    let mut writer = SavepointWriter::new(dir, manifest.max_parallelism)?;
    for shard in &manifest.shards {
        let space = if shard.store_dir.ends_with(".timers") { SPACE_TIMERS } else { SPACE_STATE };
        let mut store = weir_state::StateStore::restore(
            &root.join(&shard.store_dir),
            &shard.handle,
            weir_state::StoreConfig::default(),
            weir_state::store::RestoreOptions::default(),
        )?;
        writer.add_store(space, &mut store)?;
    }
    let summary = writer.finish()?;
    let own = Manifest { kind: SnapshotKind::Savepoint, shards: Vec::new(), ..manifest.clone() };
    CheckpointDirectory::open(dir)?.commit(&own)?;
    Ok(SavepointInfo { id: manifest.checkpoint_id, dir: dir.to_owned(), summary })
}

/// The savepoint space of operators' keyed state.
pub const SPACE_STATE: &str = "state";
/// The savepoint space of operators' timers.
pub const SPACE_TIMERS: &str = "timers";

/// The store directory of stage `stage` on `shard` of `parallelism`, relative to the
/// checkpoint root.
pub fn store_dir(parallelism: usize, shard: usize, stage: &str) -> String {
    format!("p{parallelism}/shard-{shard}/{stage}")
}

/// What a run attempt starts from.
#[derive(Debug, Clone)]
pub struct RestorePoint {
    /// The manifest restored.
    pub manifest: Manifest,
    /// Its metadata.
    pub metadata: JobMetadata,
    /// The savepoint, when the job starts from one (its state is read by uid and key group).
    pub savepoint: Option<Arc<weir_state::savepoint::Savepoint>>,
}

impl RestorePoint {
    /// The handle of the store at `dir` (relative), if the checkpoint has one.
    pub fn handle(&self, dir: &str) -> Option<&CheckpointHandle> {
        self.manifest.shards.iter().find(|s| s.store_dir == dir).map(|s| &s.handle)
    }

    /// The offsets source `uid` recorded, by split (empty if it recorded none).
    pub fn offsets(&self, uid: &str) -> Vec<&SourceOffset> {
        self.metadata.sources.iter().filter(|s| s.uid == uid).collect()
    }

    /// The operator state of operator `uid` for instance `shard` of `parallelism`: the lists
    /// its instances wrote at this checkpoint (taken at the manifest's parallelism), dealt by
    /// their [`Redistribution`]. Fails, naming the operator, on lists that do not fit together
    /// (see [`weir_operators::operator_state::restore_lists`]).
    pub fn operator_state(&self, uid: &str, parallelism: usize, shard: usize) -> Result<OperatorState> {
        let written = self.metadata.operator_state.iter().filter(|e| e.uid == uid).map(|e| WrittenList {
            shard: e.shard as usize,
            name: &e.name,
            mode: e.mode,
            items: &e.items,
        });
        restore_lists(written, self.manifest.parallelism as usize, parallelism, shard).map_err(|e| {
            let id = self.manifest.checkpoint_id;
            RuntimeError::Checkpoint(format!("checkpoint {id}: operator {uid}: {e}"))
        })
    }
}

/// The latest complete checkpoint in `root`, if any (corrupt manifests are skipped: an older
/// intact one is used).
pub fn latest_restore_point(root: &Path) -> Result<Option<RestorePoint>> {
    let directory = CheckpointDirectory::open(root)?;
    let latest = directory.latest()?;
    let Some(manifest) = latest.manifest else { return Ok(None) };
    let metadata = JobMetadata::decode(&manifest.metadata)
        .map_err(|e| RuntimeError::Checkpoint(format!("checkpoint {}: {e}", manifest.checkpoint_id)))?;
    Ok(Some(RestorePoint { manifest, metadata, savepoint: None }))
}

/// Checkpoint `id` of `root`, checked: an error if it is not there or fails a check (never
/// another checkpoint in its place).
pub fn restore_point_at(root: &Path, id: CheckpointId) -> Result<RestorePoint> {
    let directory = CheckpointDirectory::open(root)?;
    let ids = directory.list()?;
    if !ids.contains(&id) {
        let held: Vec<String> = ids.iter().map(u64::to_string).collect();
        let held = if held.is_empty() { "none".to_owned() } else { held.join(", ") };
        return Err(RuntimeError::Checkpoint(format!(
            "checkpoint {id} is not in {} (it holds: {held})",
            root.display()
        )));
    }
    let manifest = directory.read(id).map_err(|e| RuntimeError::Checkpoint(format!("checkpoint {id}: {e}")))?;
    let metadata = JobMetadata::decode(&manifest.metadata)
        .map_err(|e| RuntimeError::Checkpoint(format!("checkpoint {id}: {e}")))?;
    Ok(RestorePoint { manifest, metadata, savepoint: None })
}

/// The savepoint in `dir`, checked: its manifest and files are intact.
pub fn savepoint_restore_point(dir: &Path) -> Result<RestorePoint> {
    let Some(mut point) = latest_restore_point(dir)? else {
        return Err(RuntimeError::Checkpoint(format!("{} holds no complete savepoint", dir.display())));
    };
    if point.manifest.kind != SnapshotKind::Savepoint {
        return Err(RuntimeError::Checkpoint(format!("{} is not a savepoint directory", dir.display())));
    }
    point.savepoint = Some(Arc::new(weir_state::savepoint::Savepoint::open(dir)?));
    Ok(point)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's scheduling policy (`/proc/thread-self/stat` field 41: 0 normal,
    /// 1 `SCHED_FIFO`) and nice value.
    fn own_scheduling() -> (u32, i32) {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        let policy = after_comm.split(' ').nth(41 - 3).unwrap().parse().unwrap();
        (policy, rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap())
    }

    #[test]
    fn helper_priorities_apply_to_the_calling_thread_only() {
        let before = own_scheduling();
        let (low, nice, realtime) = std::thread::scope(|s| {
            let low = s.spawn(|| {
                yield_to_shards();
                own_scheduling()
            });
            let nice = s.spawn(|| {
                hurry(HelperScheduling::Nice);
                own_scheduling()
            });
            let realtime = s.spawn(|| {
                hurry(HelperScheduling::Realtime);
                own_scheduling()
            });
            (low.join().unwrap(), nice.join().unwrap(), realtime.join().unwrap())
        });
        assert_eq!(low, (0, 19));
        // Raising a priority needs CAP_SYS_NICE; without it the thread keeps its own.
        assert!(nice == (0, -10) || nice == before, "{nice:?}");
        // The real-time class needs CAP_SYS_NICE or RLIMIT_RTPRIO; without it, nice -10 (or
        // the thread's own priority).
        assert!(realtime == (1, before.1) || realtime == nice, "{realtime:?}");
        assert_eq!(own_scheduling(), before, "the caller's scheduling is unchanged");
    }

    #[test]
    fn restart_strategies_bound_attempts_and_back_off() {
        assert_eq!(RestartStrategy::None.delay(0), None);
        let fixed = RestartStrategy::FixedDelay { attempts: 2, delay: Duration::from_millis(5) };
        assert_eq!(fixed.delay(0), Some(Duration::from_millis(5)));
        assert_eq!(fixed.delay(1), Some(Duration::from_millis(5)));
        assert_eq!(fixed.delay(2), None);
        let exp = RestartStrategy::ExponentialBackoff {
            attempts: 5,
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            multiplier: 2.0,
        };
        let delays: Vec<_> = (0..6).map(|i| exp.delay(i).map(|d| d.as_millis())).collect();
        assert_eq!(delays, vec![Some(10), Some(20), Some(40), Some(50), Some(50), None]);
    }

    #[test]
    fn metadata_round_trips_and_garbage_is_an_error() {
        let meta = JobMetadata {
            version: JOB_METADATA_VERSION,
            job: "j".into(),
            sources: vec![SourceOffset { uid: "src".into(), split: 3, splits: 32, shard: 1, offset: 42 }],
            stages: vec!["src".into(), "by-key".into()],
            operators: vec!["count".into()],
            operator_state: vec![OperatorStateEntry {
                uid: "count".into(),
                name: "pending".into(),
                mode: Redistribution::Union,
                shard: 1,
                items: vec![vec![1, 2, 3], Vec::new()],
            }],
        };
        assert_eq!(JobMetadata::decode(&meta.encode()).unwrap(), meta);
        assert!(JobMetadata::decode(b"not metadata at all").is_err());
        assert!(JobMetadata::decode(&[]).is_err());
    }
}
