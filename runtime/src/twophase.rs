//! Two-phase sinks: output written after barrier `n - 1` and before barrier `n` forms
//! transaction `n`. At barrier `n` the sink *pre-commits* it (makes it durable but invisible:
//! it writes the transaction on the shard, and the fsyncs it hands out with
//! [`TwoPhaseWriter::take_sync`] run on a durability worker before the checkpoint is
//! acknowledged);
//! when checkpoint `n` completes (its manifest is written) the sink *commits* every transaction
//! up to `n` (makes it visible). After a failure, the job restores checkpoint `m` and calls
//! [`TwoPhaseWriter::recover`]: transactions up to `m` are committed (their commit may have been
//! lost in the crash), later ones are discarded. So committed output is exactly the output of a
//! failure-free run up to the last complete checkpoint: no loss, no duplicate.
//!
//! - [`TransactionalFileWriter`]: each transaction is a part file, written under
//!   `<dir>/.pending/`, synced before the checkpoint's ack, renamed to `<dir>/part-<shard>-<n>` at commit
//!   (then the directory is fsynced). Readers of `<dir>` see only committed parts.
//! - [`ExactlyOnceCallback`]: records are held per transaction and handed to the callback only
//!   when their checkpoint completes. (For at-least-once delivery, use
//!   [`crate::sink::CallbackSink`], which calls at once.)
//!
//! As job sinks: [`TransactionalFileSink`] and [`DurableCallbackSink`] (exactly-once across
//! process crashes: pending transactions are durable files), [`ExactlyOnceCallbackSink`] and
//! [`ExactlyOnceCollectSink`] (exactly-once across in-process restarts: held transactions live
//! in the sink object, which outlives a restart; a new process cannot deliver what a killed
//! one held).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use weir_operators::operator::Timestamp;

use crate::error::{Result, RuntimeError};
use crate::sink::{SyncWork, Unsynced};

/// A sink writer that takes part in checkpoints.
pub trait TwoPhaseWriter {
    /// What it consumes.
    type In;
    /// Writes one record into the open transaction.
    fn write(&mut self, value: Self::In, timestamp: Timestamp) -> Result<()>;
    /// Barrier `checkpoint` arrived: the open transaction becomes invisible transaction
    /// `checkpoint`, durable once the work [`TwoPhaseWriter::take_sync`] hands out has run (or
    /// at once, for a writer that hands out none); a new one opens.
    fn pre_commit(&mut self, checkpoint: u64) -> Result<()>;
    /// What makes the last pre-committed transaction durable, to run off the shard's thread
    /// before the checkpoint is acknowledged (see [`crate::sink::SinkWriter::take_sync`]).
    fn take_sync(&mut self) -> Option<SyncWork> {
        None
    }
    /// Checkpoint `checkpoint` completed: every pre-committed transaction up to it becomes
    /// visible. Idempotent.
    fn commit(&mut self, checkpoint: u64) -> Result<()>;
    /// The job restarted from checkpoint `restored`: commit what is pre-committed up to it,
    /// discard everything after it (including an open transaction).
    fn recover(&mut self, restored: u64) -> Result<()>;
}

fn io(path: &Path, e: std::io::Error) -> RuntimeError {
    RuntimeError::Sink { sink: path.display().to_string(), reason: e.to_string() }
}

/// Part files committed by rename; see the module docs.
pub struct TransactionalFileWriter<T, F> {
    dir: PathBuf,
    pending_dir: PathBuf,
    shard: usize,
    format: F,
    open: Option<(PathBuf, BufWriter<File>)>,
    /// Pre-committed part files not yet synced.
    unsynced: Unsynced,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T, F> std::fmt::Debug for TransactionalFileWriter<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalFileWriter").field("dir", &self.dir).field("shard", &self.shard).finish()
    }
}

impl<T, F: Fn(&T) -> String> TransactionalFileWriter<T, F> {
    /// Shard `shard`'s writer into `dir`, formatting each record as a line with `format`.
    pub fn new(dir: &Path, shard: usize, format: F) -> Result<Self> {
        let pending_dir = dir.join(".pending");
        std::fs::create_dir_all(&pending_dir).map_err(|e| io(&pending_dir, e))?;
        Ok(TransactionalFileWriter {
            dir: dir.to_owned(),
            pending_dir,
            shard,
            format,
            open: None,
            unsynced: Unsynced::default(),
            _t: std::marker::PhantomData,
        })
    }

    fn pending_path(&self, checkpoint: u64) -> PathBuf {
        self.pending_dir.join(format!("part-{}-{checkpoint:010}", self.shard))
    }

    fn pre_committed(&self) -> Result<Vec<(u64, PathBuf)>> {
        let prefix = format!("part-{}-", self.shard);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.pending_dir).map_err(|e| io(&self.pending_dir, e))? {
            let entry = entry.map_err(|e| io(&self.pending_dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_prefix(&prefix).and_then(|n| n.parse::<u64>().ok()) {
                out.push((id, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn sync_dir(dir: &Path) -> Result<()> {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))
    }
}

impl<T, F: Fn(&T) -> String> TwoPhaseWriter for TransactionalFileWriter<T, F> {
    type In = T;

    fn write(&mut self, value: T, _: Timestamp) -> Result<()> {
        if self.open.is_none() {
            let path = self.pending_dir.join(format!("part-{}-open", self.shard));
            let file = File::create(&path).map_err(|e| io(&path, e))?;
            self.open = Some((path, BufWriter::new(file)));
        }
        let line = (self.format)(&value);
        let Some((path, out)) = self.open.as_mut() else { return Ok(()) };
        writeln!(out, "{line}").map_err(|e| io(path, e))
    }

    /// The part file is renamed into `.pending` now and synced (with the directory) by the
    /// work [`TwoPhaseWriter::take_sync`] hands out. A crash before that sync can leave a
    /// pending file with partial content, but only of a checkpoint that was never
    /// acknowledged, which `recover` deletes unread.
    fn pre_commit(&mut self, checkpoint: u64) -> Result<()> {
        self.unsynced.check()?;
        let Some((path, out)) = self.open.take() else { return Ok(()) };
        let file = out.into_inner().map_err(|e| io(&path, e.into_error()))?;
        let target = self.pending_path(checkpoint);
        std::fs::rename(&path, &target).map_err(|e| io(&target, e))?;
        self.unsynced.push(file, target);
        Ok(())
    }

    fn take_sync(&mut self) -> Option<SyncWork> {
        self.unsynced.take(&self.pending_dir)
    }

    fn commit(&mut self, checkpoint: u64) -> Result<()> {
        self.unsynced.check()?;
        let mut renamed = false;
        for (id, path) in self.pre_committed()? {
            if id <= checkpoint {
                let target = self.dir.join(format!("part-{}-{id:010}", self.shard));
                std::fs::rename(&path, &target).map_err(|e| io(&target, e))?;
                renamed = true;
            }
        }
        if renamed {
            Self::sync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn recover(&mut self, restored: u64) -> Result<()> {
        self.open = None;
        self.unsynced.clear();
        let _ = std::fs::remove_file(self.pending_dir.join(format!("part-{}-open", self.shard)));
        for (id, path) in self.pre_committed()? {
            if id > restored {
                std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
            }
        }
        self.commit(restored)
    }
}

/// Delivers records to a callback only when their checkpoint completes; see the module docs.
pub struct ExactlyOnceCallback<T, F> {
    f: F,
    open: Vec<(T, Timestamp)>,
    pending: BTreeMap<u64, Vec<(T, Timestamp)>>,
}

impl<T, F> std::fmt::Debug for ExactlyOnceCallback<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExactlyOnceCallback").field("pending", &self.pending.len()).finish()
    }
}

impl<T, F: FnMut(T, Timestamp)> ExactlyOnceCallback<T, F> {
    /// Calls `f(value, timestamp)` for each committed record, in order.
    pub fn new(f: F) -> Self {
        ExactlyOnceCallback { f, open: Vec::new(), pending: BTreeMap::new() }
    }
}

impl<T, F: FnMut(T, Timestamp)> TwoPhaseWriter for ExactlyOnceCallback<T, F> {
    type In = T;

    fn write(&mut self, value: T, timestamp: Timestamp) -> Result<()> {
        self.open.push((value, timestamp));
        Ok(())
    }

    fn pre_commit(&mut self, checkpoint: u64) -> Result<()> {
        let records = std::mem::take(&mut self.open);
        self.pending.entry(checkpoint).or_default().extend(records);
        Ok(())
    }

    fn commit(&mut self, checkpoint: u64) -> Result<()> {
        let later = self.pending.split_off(&(checkpoint + 1));
        for (_, records) in std::mem::replace(&mut self.pending, later) {
            for (value, ts) in records {
                (self.f)(value, ts);
            }
        }
        Ok(())
    }

    /// Held records live in memory: after a process restart there is nothing to commit, and
    /// the replay from the restored checkpoint produces them again.
    fn recover(&mut self, restored: u64) -> Result<()> {
        self.open.clear();
        self.pending.retain(|id, _| *id <= restored);
        self.commit(restored)
    }
}

/// A [`TwoPhaseWriter`] as a job's sink writer.
#[derive(Debug)]
pub struct TwoPhaseSinkWriter<W>(W);

impl<W: TwoPhaseWriter + 'static> crate::sink::SinkWriter for TwoPhaseSinkWriter<W> {
    type In = W::In;
    fn write(&mut self, value: W::In, timestamp: Timestamp) -> Result<()> {
        self.0.write(value, timestamp)
    }
    /// Without checkpoints, the end of input commits everything.
    fn flush(&mut self) -> Result<()> {
        self.0.pre_commit(u64::MAX)?;
        if let Some(sync) = self.0.take_sync() {
            sync.run()?;
        }
        self.0.commit(u64::MAX)
    }
    fn pre_commit(&mut self, checkpoint: u64) -> Result<()> {
        self.0.pre_commit(checkpoint)
    }
    fn take_sync(&mut self) -> Option<SyncWork> {
        self.0.take_sync()
    }
    fn commit(&mut self, checkpoint: u64) -> Result<()> {
        self.0.commit(checkpoint)
    }
    fn recover(&mut self, restored: Option<u64>) -> Result<()> {
        self.0.recover(restored.unwrap_or(0))
    }
    fn end_of_input(&mut self, checkpointed: bool) -> Result<()> {
        if checkpointed { Ok(()) } else { self.flush() }
    }
}

/// Exactly-once part files: [`TransactionalFileWriter`] on every shard.
pub struct TransactionalFileSink<T, F> {
    dir: PathBuf,
    format: Arc<F>,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T, F> std::fmt::Debug for TransactionalFileSink<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalFileSink").field("dir", &self.dir).finish()
    }
}

impl<T, F> TransactionalFileSink<T, F> {
    /// Committed part files in `dir`, one line `format(&record)` per record.
    pub fn new(dir: impl Into<PathBuf>, format: F) -> Self {
        TransactionalFileSink { dir: dir.into(), format: Arc::new(format), _t: std::marker::PhantomData }
    }
}

impl<T, F> crate::sink::Sink for TransactionalFileSink<T, F>
where
    T: 'static,
    F: Fn(&T) -> String + Send + Sync + 'static,
{
    type In = T;
    type Writer = TwoPhaseSinkWriter<TransactionalFileWriter<T, Box<dyn Fn(&T) -> String>>>;
    fn writer(&self, shard: usize, _: usize) -> Result<Self::Writer> {
        let format = Arc::clone(&self.format);
        let format: Box<dyn Fn(&T) -> String> = Box::new(move |t: &T| format(t));
        Ok(TwoPhaseSinkWriter(TransactionalFileWriter::new(&self.dir, shard, format)?))
    }
}

type Held<T> = BTreeMap<u64, Vec<(T, Timestamp)>>;

/// Pre-committed transactions per shard, kept by the sink object across in-process restarts.
struct HeldTransactions<T>(Mutex<HashMap<usize, Held<T>>>);

impl<T> HeldTransactions<T> {
    fn with<R>(&self, shard: usize, f: impl FnOnce(&mut Held<T>) -> R) -> Result<R> {
        let mut all =
            self.0.lock().map_err(|_| RuntimeError::Sink { sink: "exactly-once".into(), reason: "poisoned".into() })?;
        Ok(f(all.entry(shard).or_default()))
    }
}

/// Calls a function with committed records only, in order per shard: `f(value, timestamp,
/// shard)` runs on the shard's thread when the checkpoint covering the record completes.
pub struct ExactlyOnceCallbackSink<T, F> {
    f: Arc<F>,
    held: Arc<HeldTransactions<T>>,
}

impl<T, F> std::fmt::Debug for ExactlyOnceCallbackSink<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExactlyOnceCallbackSink")
    }
}

impl<T, F> Clone for ExactlyOnceCallbackSink<T, F> {
    fn clone(&self) -> Self {
        ExactlyOnceCallbackSink { f: Arc::clone(&self.f), held: Arc::clone(&self.held) }
    }
}

impl<T, F> ExactlyOnceCallbackSink<T, F> {
    /// Delivers committed records to `f`.
    pub fn new(f: F) -> Self {
        ExactlyOnceCallbackSink { f: Arc::new(f), held: Arc::new(HeldTransactions(Mutex::new(HashMap::new()))) }
    }
}

/// The writer of an [`ExactlyOnceCallbackSink`].
pub struct HeldWriter<T, F> {
    f: Arc<F>,
    held: Arc<HeldTransactions<T>>,
    shard: usize,
    open: Vec<(T, Timestamp)>,
}

impl<T, F> crate::sink::Sink for ExactlyOnceCallbackSink<T, F>
where
    T: Send + 'static,
    F: Fn(T, Timestamp, usize) + Send + Sync + 'static,
{
    type In = T;
    type Writer = HeldWriter<T, F>;
    fn writer(&self, shard: usize, _: usize) -> Result<Self::Writer> {
        Ok(HeldWriter { f: Arc::clone(&self.f), held: Arc::clone(&self.held), shard, open: Vec::new() })
    }
}

impl<T: 'static, F: Fn(T, Timestamp, usize) + 'static> crate::sink::SinkWriter for HeldWriter<T, F> {
    type In = T;
    fn write(&mut self, value: T, timestamp: Timestamp) -> Result<()> {
        self.open.push((value, timestamp));
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        self.pre_commit(u64::MAX)?;
        self.commit(u64::MAX)
    }
    fn pre_commit(&mut self, checkpoint: u64) -> Result<()> {
        let records = std::mem::take(&mut self.open);
        self.held.with(self.shard, |held| held.entry(checkpoint).or_default().extend(records))
    }
    fn commit(&mut self, checkpoint: u64) -> Result<()> {
        let ready = self.held.with(self.shard, |held| {
            let later = held.split_off(&checkpoint.saturating_add(1));
            std::mem::replace(held, later)
        })?;
        for (value, ts) in ready.into_values().flatten() {
            (self.f)(value, ts, self.shard);
        }
        Ok(())
    }
    fn recover(&mut self, restored: Option<u64>) -> Result<()> {
        self.open.clear();
        let restored = restored.unwrap_or(0);
        self.held.with(self.shard, |held| held.retain(|id, _| *id <= restored))?;
        self.commit(restored)
    }
    fn end_of_input(&mut self, checkpointed: bool) -> Result<()> {
        if checkpointed { Ok(()) } else { self.flush() }
    }
}

/// A boxed record callback.
type BoxedDeliver<T> = Box<dyn Fn(T, Timestamp, usize) + Send + Sync>;

/// Collects committed records only (for tests and examples of exactly-once output).
pub struct ExactlyOnceCollectSink<T> {
    items: Arc<Mutex<Vec<(T, Timestamp)>>>,
    inner: ExactlyOnceCallbackSink<T, BoxedDeliver<T>>,
}

impl<T> std::fmt::Debug for ExactlyOnceCollectSink<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExactlyOnceCollectSink")
    }
}

impl<T: Send + 'static> Default for ExactlyOnceCollectSink<T> {
    fn default() -> Self {
        let items: Arc<Mutex<Vec<(T, Timestamp)>>> = Arc::default();
        let sink = Arc::clone(&items);
        let f: BoxedDeliver<T> = Box::new(move |v, ts, _| {
            if let Ok(mut items) = sink.lock() {
                items.push((v, ts));
            }
        });
        ExactlyOnceCollectSink { items, inner: ExactlyOnceCallbackSink::new(f) }
    }
}

impl<T: Send + 'static> ExactlyOnceCollectSink<T> {
    /// An empty collector. Keep a clone to read what was committed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the records committed so far.
    pub fn take(&self) -> Vec<(T, Timestamp)> {
        self.items.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default()
    }
}

impl<T> Clone for ExactlyOnceCollectSink<T> {
    fn clone(&self) -> Self {
        ExactlyOnceCollectSink { items: Arc::clone(&self.items), inner: self.inner.clone() }
    }
}

impl<T: Send + 'static> crate::sink::Sink for ExactlyOnceCollectSink<T> {
    type In = T;
    type Writer = HeldWriter<T, BoxedDeliver<T>>;
    fn writer(&self, shard: usize, parallelism: usize) -> Result<Self::Writer> {
        self.inner.writer(shard, parallelism)
    }
}

/// One shard's transaction of a [`DurableCallbackSink`]: the records it wrote between two
/// barriers, delivered once checkpoint `checkpoint` completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed<T> {
    /// The shard that wrote it.
    pub shard: usize,
    /// The checkpoint that committed it (`u64::MAX` for a job without checkpoints).
    pub checkpoint: u64,
    /// The records, in order, with their timestamps.
    pub records: Vec<(T, Timestamp)>,
}

/// Exactly-once delivery to a callback across process crashes: each shard's transaction is
/// written to a file under `dir` at its barrier (CRC-checked, fsynced before the checkpoint is
/// acknowledged), and handed to the
/// callback, whole and named by `(shard, checkpoint)`, once its checkpoint completes; the file
/// is deleted after the callback returns. A process that resumes the job from the directory
/// delivers the transactions its predecessor pre-committed but did not deliver.
///
/// A crash between the callback's return and the file's deletion delivers that transaction
/// again after the resume, under the same `(shard, checkpoint)`: a receiver that ignores a
/// pair it has seen gets every record exactly once (as Flink asks of a two-phase commit's
/// `commit`). Records are stored with rkyv, so `T` is a [`weir_state::states::StateValue`].
pub struct DurableCallbackSink<T, F> {
    dir: PathBuf,
    f: Arc<F>,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T, F> std::fmt::Debug for DurableCallbackSink<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableCallbackSink").field("dir", &self.dir).finish()
    }
}

impl<T, F> Clone for DurableCallbackSink<T, F> {
    fn clone(&self) -> Self {
        DurableCallbackSink { dir: self.dir.clone(), f: Arc::clone(&self.f), _t: std::marker::PhantomData }
    }
}

impl<T, F> DurableCallbackSink<T, F> {
    /// Keeps pre-committed transactions under `dir` and delivers committed ones to `f`.
    pub fn new(dir: impl Into<PathBuf>, f: F) -> Self {
        DurableCallbackSink { dir: dir.into(), f: Arc::new(f), _t: std::marker::PhantomData }
    }
}

impl<T, F> crate::sink::Sink for DurableCallbackSink<T, F>
where
    T: weir_state::states::StateValue,
    F: Fn(Committed<T>) + Send + Sync + 'static,
{
    type In = T;
    type Writer = DurableCallbackWriter<T, F>;
    fn writer(&self, shard: usize, parallelism: usize) -> Result<Self::Writer> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        Ok(DurableCallbackWriter {
            dir: self.dir.clone(),
            f: Arc::clone(&self.f),
            shard,
            parallelism,
            open: Vec::new(),
            unsynced: Unsynced::default(),
        })
    }
}

/// The writer of a [`DurableCallbackSink`] on one shard.
pub struct DurableCallbackWriter<T, F> {
    dir: PathBuf,
    f: Arc<F>,
    shard: usize,
    parallelism: usize,
    open: Vec<(T, Timestamp)>,
    /// Transaction files written but not yet synced.
    unsynced: Unsynced,
}

/// First bytes of a transaction file.
const TXN_MAGIC: &[u8; 8] = b"WEIRTXN1";

/// A transaction file's name: shard, then checkpoint, both fixed-width.
fn txn_file_name(shard: usize, checkpoint: u64) -> String {
    format!("txn-{shard:05}-{checkpoint:020}")
}

fn parse_txn_file_name(name: &str) -> Option<(usize, u64)> {
    let rest = name.strip_prefix("txn-")?;
    let (shard, checkpoint) = rest.split_once('-')?;
    if checkpoint.len() != 20 {
        return None;
    }
    Some((shard.parse().ok()?, checkpoint.parse().ok()?))
}

fn sink_error(path: &Path, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Sink { sink: path.display().to_string(), reason: reason.into() }
}

/// A transaction's bytes: magic, record count, per record its timestamp, length and rkyv
/// bytes, then a CRC32 of everything before it.
fn encode_txn<T: weir_state::states::StateValue>(records: &[(T, Timestamp)], path: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(16 + records.len() * 32);
    out.extend_from_slice(TXN_MAGIC);
    out.extend_from_slice(&(records.len() as u64).to_le_bytes());
    for (value, ts) in records {
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(value)
            .map_err(|e| sink_error(path, format!("cannot encode a record: {e}")))?;
        out.extend_from_slice(&ts.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes a transaction file's bytes; a damaged file is an error naming it and the offset.
fn decode_txn<T: weir_state::states::StateValue>(bytes: &[u8], path: &Path) -> Result<Vec<(T, Timestamp)>> {
    let corrupt = |at: usize, what: &str| sink_error(path, format!("corrupt transaction file at offset {at}: {what}"));
    if bytes.len() < TXN_MAGIC.len() + 12 || &bytes[..8] != TXN_MAGIC {
        return Err(corrupt(0, "not a transaction file"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(corrupt(body.len(), "CRC mismatch"));
    }
    let take = |at: &mut usize, n: usize| -> Result<&[u8]> {
        let piece = body.get(*at..*at + n).ok_or_else(|| corrupt(*at, "truncated"))?;
        *at += n;
        Ok(piece)
    };
    let mut at = 8;
    let count = u64::from_le_bytes(take(&mut at, 8)?.try_into().map_err(|_| corrupt(8, "count"))?);
    let mut records = Vec::with_capacity(count.min(1 << 20) as usize);
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    for _ in 0..count {
        let ts = i64::from_le_bytes(take(&mut at, 8)?.try_into().map_err(|_| corrupt(at, "timestamp"))?);
        let len = u32::from_le_bytes(take(&mut at, 4)?.try_into().map_err(|_| corrupt(at, "length"))?) as usize;
        let start = at;
        aligned.clear();
        aligned.extend_from_slice(take(&mut at, len)?);
        let value = rkyv::from_bytes::<T, rkyv::rancor::Error>(&aligned)
            .map_err(|e| corrupt(start, &format!("record fails validation: {e}")))?;
        records.push((value, ts));
    }
    if at != body.len() {
        return Err(corrupt(at, "trailing bytes"));
    }
    Ok(records)
}

impl<T, F> DurableCallbackWriter<T, F>
where
    T: weir_state::states::StateValue,
    F: Fn(Committed<T>),
{
    /// Pre-committed transactions this writer answers for, in checkpoint order: its own, and
    /// on shard 0 those of shards beyond the current parallelism (written before a rescale).
    fn pending(&self) -> Result<Vec<(u64, usize, PathBuf)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))? {
            let entry = entry.map_err(|e| io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((shard, checkpoint)) = parse_txn_file_name(&name)
                && (shard == self.shard || (self.shard == 0 && shard >= self.parallelism))
            {
                out.push((checkpoint, shard, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn deliver(&self, shard: usize, checkpoint: u64, records: Vec<(T, Timestamp)>) {
        (self.f)(Committed { shard, checkpoint, records });
    }
}

impl<T, F> crate::sink::SinkWriter for DurableCallbackWriter<T, F>
where
    T: weir_state::states::StateValue,
    F: Fn(Committed<T>) + 'static,
{
    type In = T;
    fn write(&mut self, value: T, timestamp: Timestamp) -> Result<()> {
        self.open.push((value, timestamp));
        Ok(())
    }
    /// Without checkpoints, the end of input delivers what was written.
    fn flush(&mut self) -> Result<()> {
        if !self.open.is_empty() {
            let records = std::mem::take(&mut self.open);
            self.deliver(self.shard, u64::MAX, records);
        }
        Ok(())
    }
    /// The transaction file is written and renamed now, and synced (with the directory) by the
    /// work [`crate::sink::SinkWriter::take_sync`] hands out, off the shard's thread. A crash
    /// before that sync can leave a damaged file, but only of a checkpoint that was never
    /// acknowledged, which `recover` deletes unread.
    fn pre_commit(&mut self, checkpoint: u64) -> Result<()> {
        self.unsynced.check()?;
        if self.open.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(txn_file_name(self.shard, checkpoint));
        let bytes = encode_txn(&self.open, &path)?;
        let tmp = path.with_extension("tmp");
        let mut file = File::create(&tmp).map_err(|e| io(&tmp, e))?;
        file.write_all(&bytes).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
        self.unsynced.push(file, path);
        self.open.clear();
        Ok(())
    }
    fn take_sync(&mut self) -> Option<SyncWork> {
        self.unsynced.take(&self.dir)
    }
    fn commit(&mut self, checkpoint: u64) -> Result<()> {
        self.unsynced.check()?;
        for (id, shard, path) in self.pending()? {
            if id > checkpoint {
                break;
            }
            let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
            let records = decode_txn::<T>(&bytes, &path)?;
            self.deliver(shard, id, records);
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
        }
        Ok(())
    }
    fn recover(&mut self, restored: Option<u64>) -> Result<()> {
        self.open.clear();
        self.unsynced.clear();
        // A pre-commit cut short by a crash leaves its temp file: it was never a transaction.
        let own_tmp = format!("txn-{:05}-", self.shard);
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))? {
            let entry = entry.map_err(|e| io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&own_tmp) && name.ends_with(".tmp") {
                std::fs::remove_file(entry.path()).map_err(|e| io(&entry.path(), e))?;
            }
        }
        let restored = restored.unwrap_or(0);
        for (id, _, path) in self.pending()? {
            if id > restored {
                std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
            }
        }
        self.commit(restored)
    }
    fn end_of_input(&mut self, checkpointed: bool) -> Result<()> {
        if checkpointed { Ok(()) } else { self.flush() }
    }
}

#[cfg(test)]
mod durable_tests {
    use super::*;
    use crate::sink::{Sink, SinkWriter};

    type Delivered = Arc<Mutex<Vec<Committed<(u64, String)>>>>;

    fn collecting() -> (Delivered, impl Fn(Committed<(u64, String)>) + Send + Sync) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        (got, move |c| sink.lock().unwrap().push(c))
    }

    #[test]
    fn transactions_survive_a_new_writer_and_later_ones_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let (got, f) = collecting();
        let sink = DurableCallbackSink::new(dir.path(), f);
        let mut w = sink.writer(1, 2).unwrap();
        w.write((1, "a".into()), 10).unwrap();
        w.pre_commit(5).unwrap();
        w.take_sync().expect("the transaction file to sync").run().unwrap();
        w.write((2, "b".into()), 11).unwrap();
        w.pre_commit(6).unwrap();
        w.write((3, "c".into()), 12).unwrap();
        drop(w); // a crash: nothing delivered, transaction 7 still open
        std::fs::write(dir.path().join(format!("{}.tmp", txn_file_name(1, 7))), b"cut short").unwrap();
        assert!(got.lock().unwrap().is_empty());
        // A new process restores checkpoint 5: transaction 5 is delivered, 6 discarded.
        let mut w = sink.writer(1, 2).unwrap();
        w.recover(Some(5)).unwrap();
        assert_eq!(
            *got.lock().unwrap(),
            vec![Committed { shard: 1, checkpoint: 5, records: vec![((1, "a".into()), 10)] }]
        );
        w.commit(6).unwrap();
        assert_eq!(got.lock().unwrap().len(), 1, "transaction 6 was discarded");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "no file left");
    }

    #[test]
    fn a_damaged_transaction_is_an_error_naming_the_file_never_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let (got, f) = collecting();
        let sink = DurableCallbackSink::new(dir.path(), f);
        let mut w = sink.writer(0, 1).unwrap();
        w.write((7, "x".repeat(100)), 1).unwrap();
        w.pre_commit(3).unwrap();
        let path = dir.path().join(txn_file_name(0, 3));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = w.commit(3).unwrap_err().to_string();
        assert!(err.contains("txn-00000-") && err.contains("CRC"), "{err}");
        assert!(got.lock().unwrap().is_empty());
        std::fs::write(&path, &bytes[..20]).unwrap();
        assert!(w.commit(3).is_err(), "a truncated file is rejected too");
    }

    #[test]
    fn shard_zero_delivers_what_shards_beyond_a_smaller_parallelism_left() {
        let dir = tempfile::tempdir().unwrap();
        let (got, f) = collecting();
        let sink = DurableCallbackSink::new(dir.path(), f);
        let mut w3 = sink.writer(3, 4).unwrap();
        w3.write((3, "from shard 3".into()), 1).unwrap();
        w3.pre_commit(9).unwrap();
        // Resumed at parallelism 2: shard 1 leaves shard 3's file alone, shard 0 delivers it.
        sink.writer(1, 2).unwrap().recover(Some(9)).unwrap();
        assert!(got.lock().unwrap().is_empty());
        sink.writer(0, 2).unwrap().recover(Some(9)).unwrap();
        assert_eq!(got.lock().unwrap()[0].shard, 3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("part-"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn pre_commit_hands_its_sync_out_and_a_failed_sync_fails_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TransactionalFileWriter::new(dir.path(), 0, |n: &u32| n.to_string()).unwrap();
        w.pre_commit(1).unwrap();
        assert!(w.take_sync().is_none(), "an empty transaction needs no sync");
        w.write(1, 0).unwrap();
        w.pre_commit(2).unwrap();
        let sync = w.take_sync().expect("the part file and its directory to sync");
        assert!(w.take_sync().is_none(), "handed out once");
        sync.run().unwrap();
        w.commit(2).unwrap();
        assert_eq!(parts(dir.path()), vec!["part-0-0000000002"]);
        // A sync that fails (here its directory is gone) poisons the writer: the job restarts
        // rather than commit a transaction that may not be durable.
        w.write(2, 0).unwrap();
        w.pre_commit(3).unwrap();
        let sync = w.take_sync().unwrap();
        std::fs::rename(dir.path().join(".pending"), dir.path().join("moved")).unwrap();
        let err = sync.run().unwrap_err();
        assert!(err.to_string().contains(".pending"), "{err}");
        let err = w.commit(3).unwrap_err();
        assert!(err.to_string().contains("failed to sync"), "{err}");
        assert!(w.pre_commit(4).is_err());
    }

    #[test]
    fn file_parts_become_visible_only_on_commit_and_recovery_discards_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TransactionalFileWriter::new(dir.path(), 0, |n: &u32| n.to_string()).unwrap();
        w.write(1, 0).unwrap();
        w.write(2, 0).unwrap();
        w.pre_commit(1).unwrap();
        w.write(3, 0).unwrap();
        w.pre_commit(2).unwrap();
        w.write(4, 0).unwrap();
        assert!(parts(dir.path()).is_empty(), "nothing is visible before a commit");
        w.commit(1).unwrap();
        assert_eq!(parts(dir.path()), vec!["part-0-0000000001"]);
        assert_eq!(std::fs::read_to_string(dir.path().join("part-0-0000000001")).unwrap(), "1\n2\n");
        w.commit(1).unwrap(); // idempotent
        // A crash: checkpoint 2 never completed. The restart restores 1: transaction 2 and the
        // open one are discarded; a fresh writer sees the same directory.
        drop(w);
        let mut w = TransactionalFileWriter::new(dir.path(), 0, |n: &u32| n.to_string()).unwrap();
        w.recover(1).unwrap();
        assert_eq!(parts(dir.path()), vec!["part-0-0000000001"]);
        assert!(parts(&dir.path().join(".pending")).is_empty());
        // Had checkpoint 2 completed before the crash, recovery commits it.
        w.write(3, 0).unwrap();
        w.pre_commit(2).unwrap();
        drop(w);
        let mut w = TransactionalFileWriter::new(dir.path(), 0, |n: &u32| n.to_string()).unwrap();
        w.recover(2).unwrap();
        assert_eq!(parts(dir.path()), vec!["part-0-0000000001", "part-0-0000000002"]);
    }

    #[test]
    fn callbacks_see_committed_records_only_in_order() {
        let mut seen = Vec::new();
        {
            let mut w = ExactlyOnceCallback::new(|v: u32, _| seen.push(v));
            w.write(1, 0).unwrap();
            w.pre_commit(1).unwrap();
            w.write(2, 0).unwrap();
            w.pre_commit(2).unwrap();
            w.write(3, 0).unwrap();
            w.commit(1).unwrap();
            w.recover(1).unwrap(); // 2 and 3 are discarded: the replay will produce them again
            w.write(2, 0).unwrap();
            w.pre_commit(2).unwrap();
            w.commit(2).unwrap();
        }
        assert_eq!(seen, vec![1, 2]);
    }
}
