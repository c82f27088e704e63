//! Sinks: where a job's output goes. [`CollectSink`] (tests), [`CallbackSink`] (embedding),
//! [`FileSink`] (one part file per shard).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use weir_operators::operator::Timestamp;

use crate::error::{Result, RuntimeError};

/// A parallel sink: a factory of one writer per shard.
pub trait Sink: Send + Sync + 'static {
    /// What it consumes.
    type In: 'static;
    /// The per-shard writer.
    type Writer: SinkWriter<In = Self::In>;
    /// The writer of `shard` of `parallelism`.
    fn writer(&self, shard: usize, parallelism: usize) -> Result<Self::Writer>;
}

/// One shard's writer.
pub trait SinkWriter: 'static {
    /// What it consumes.
    type In;
    /// Writes one record.
    fn write(&mut self, value: Self::In, timestamp: Timestamp) -> Result<()>;
    /// Makes everything written so far visible (end of input).
    fn flush(&mut self) -> Result<()>;
    /// Checkpoint barrier `checkpoint` passed: what was written since the previous barrier is
    /// one transaction. A two-phase writer makes it durable but invisible (see
    /// [`crate::twophase`]); other writers do nothing.
    fn pre_commit(&mut self, checkpoint: u64) -> Result<()> {
        let _ = checkpoint;
        Ok(())
    }
    /// Checkpoint `checkpoint` is complete: a two-phase writer makes every transaction up to it
    /// visible.
    fn commit(&mut self, checkpoint: u64) -> Result<()> {
        let _ = checkpoint;
        Ok(())
    }
    /// The job (re)started from checkpoint `restored` (`None`: from nothing): a two-phase
    /// writer commits what it pre-committed up to it and discards the rest.
    fn recover(&mut self, restored: Option<u64>) -> Result<()> {
        let _ = restored;
        Ok(())
    }
    /// The work that makes the transaction of the last [`SinkWriter::pre_commit`] durable, for
    /// the runtime to run off the shard's thread (with the stores' syncs) before the stage
    /// acknowledges the checkpoint: the shard does not stall for an `fsync` at every barrier.
    /// Writers that need none (or sync in `pre_commit`) return `None`.
    fn take_sync(&mut self) -> Option<SyncWork> {
        None
    }
    /// End of input. By default [`SinkWriter::flush`]; a two-phase writer of a checkpointed job
    /// leaves its last transaction to the final checkpoint (`checkpointed`).
    fn end_of_input(&mut self, checkpointed: bool) -> Result<()> {
        let _ = checkpointed;
        self.flush()
    }
}

/// Files (then directories) to `fsync` so that a pre-committed transaction is durable; see
/// [`SinkWriter::take_sync`] and [`Unsynced`], which makes them. A failure is recorded where
/// the writer's [`Unsynced::check`] reports it at its next call (the job restarts from the last complete checkpoint: an `fsync`
/// error is never retried and then trusted), and declines the checkpoint.
#[derive(Debug)]
pub struct SyncWork {
    files: Vec<(File, PathBuf)>,
    dirs: Vec<PathBuf>,
    failure: SyncFailure,
}

impl SyncWork {
    /// Work that syncs `files`, then `dirs`, recording a failure in `failure`.
    fn new(files: Vec<(File, PathBuf)>, dirs: Vec<PathBuf>, failure: SyncFailure) -> SyncWork {
        SyncWork { files, dirs, failure }
    }

    /// Syncs the files and directories, in that order.
    pub fn run(self) -> Result<()> {
        let fsync = |path: &std::path::Path, e: std::io::Error| (path.display().to_string(), format!("fsync: {e}"));
        let synced = (|| {
            for (file, path) in &self.files {
                file.sync_all().map_err(|e| fsync(path, e))?;
            }
            for dir in &self.dirs {
                File::open(dir).and_then(|d| d.sync_all()).map_err(|e| fsync(dir, e))?;
            }
            Ok(())
        })();
        synced.map_err(|(sink, reason)| {
            self.failure.set(sink.clone(), reason.clone());
            RuntimeError::Sink { sink, reason }
        })
    }
}

/// A two-phase writer's files written at barriers and not yet synced, and where their
/// [`SyncWork`] reports a failure: the bookkeeping behind [`SinkWriter::take_sync`].
#[derive(Debug, Default)]
pub struct Unsynced {
    files: Vec<(File, PathBuf)>,
    failure: SyncFailure,
}

impl Unsynced {
    /// `Err` if an earlier sync of these files failed: they are suspect, and the writer must
    /// not commit them (the job restarts instead).
    pub fn check(&self) -> Result<()> {
        self.failure.check()
    }

    /// Notes `file` (now at `path`) as written and not synced.
    pub fn push(&mut self, file: File, path: PathBuf) {
        self.files.push((file, path));
    }

    /// The work that syncs the noted files, then `dir`; `None` when none was noted.
    pub fn take(&mut self, dir: &std::path::Path) -> Option<SyncWork> {
        if self.files.is_empty() {
            return None;
        }
        Some(SyncWork::new(std::mem::take(&mut self.files), vec![dir.to_owned()], self.failure.clone()))
    }

    /// Forgets the noted files (a restart discards their transactions).
    pub fn clear(&mut self) {
        self.files.clear();
    }
}

/// Where a sink writer's [`SyncWork`] leaves a failure for the writer to report.
#[derive(Debug, Clone, Default)]
struct SyncFailure(Arc<Mutex<Option<(String, String)>>>);

impl SyncFailure {
    fn set(&self, sink: String, reason: String) {
        if let Ok(mut f) = self.0.lock() {
            f.get_or_insert((sink, reason));
        }
    }

    /// `Err` if a sync failed: the writer's pre-committed files are suspect.
    fn check(&self) -> Result<()> {
        match self.0.lock().ok().and_then(|f| f.clone()) {
            Some((sink, reason)) => Err(RuntimeError::Sink {
                sink,
                reason: format!("a pre-committed transaction failed to sync ({reason})"),
            }),
            None => Ok(()),
        }
    }
}

/// Collects every record (with its timestamp) into a shared vector: for tests and examples.
#[derive(Debug)]
pub struct CollectSink<T> {
    items: Arc<Mutex<Vec<(T, Timestamp)>>>,
}

impl<T> Clone for CollectSink<T> {
    fn clone(&self) -> Self {
        CollectSink { items: Arc::clone(&self.items) }
    }
}

impl<T> Default for CollectSink<T> {
    fn default() -> Self {
        CollectSink { items: Arc::new(Mutex::new(Vec::new())) }
    }
}

impl<T> CollectSink<T> {
    /// An empty collector; keep a clone to read the results.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the records collected so far (in arrival order across shards).
    pub fn take(&self) -> Vec<(T, Timestamp)> {
        self.items.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default()
    }

    /// Takes only the values, sorted.
    pub fn take_sorted(&self) -> Vec<T>
    where
        T: Ord,
    {
        let mut v: Vec<T> = self.take().into_iter().map(|(t, _)| t).collect();
        v.sort();
        v
    }
}

/// The writer of a [`CollectSink`]: buffers locally, publishes on flush and every 4096 records.
#[derive(Debug)]
pub struct CollectWriter<T> {
    items: Arc<Mutex<Vec<(T, Timestamp)>>>,
    local: Vec<(T, Timestamp)>,
}

impl<T: Send + 'static> Sink for CollectSink<T> {
    type In = T;
    type Writer = CollectWriter<T>;
    fn writer(&self, _: usize, _: usize) -> Result<CollectWriter<T>> {
        Ok(CollectWriter { items: Arc::clone(&self.items), local: Vec::new() })
    }
}

impl<T: Send + 'static> SinkWriter for CollectWriter<T> {
    type In = T;
    fn write(&mut self, value: T, timestamp: Timestamp) -> Result<()> {
        self.local.push((value, timestamp));
        if self.local.len() >= 4096 {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        let mut items = self.items.lock().map_err(|_| RuntimeError::InvalidJob("collect sink poisoned".into()))?;
        items.append(&mut self.local);
        Ok(())
    }
}

/// Calls a function for every record (from the shard's thread): how a service receives
/// results when it embeds weir.
pub struct CallbackSink<T, F> {
    f: Arc<F>,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T, F> std::fmt::Debug for CallbackSink<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallbackSink")
    }
}

impl<T, F> CallbackSink<T, F> {
    /// Calls `f(value, timestamp, shard)` for every record.
    pub fn new(f: F) -> Self {
        CallbackSink { f: Arc::new(f), _t: std::marker::PhantomData }
    }
}

/// The writer of a [`CallbackSink`].
pub struct CallbackWriter<T, F> {
    f: Arc<F>,
    shard: usize,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T, F> Sink for CallbackSink<T, F>
where
    T: 'static,
    F: Fn(T, Timestamp, usize) + Send + Sync + 'static,
{
    type In = T;
    type Writer = CallbackWriter<T, F>;
    fn writer(&self, shard: usize, _: usize) -> Result<CallbackWriter<T, F>> {
        Ok(CallbackWriter { f: Arc::clone(&self.f), shard, _t: std::marker::PhantomData })
    }
}

impl<T: 'static, F: Fn(T, Timestamp, usize) + 'static> SinkWriter for CallbackWriter<T, F> {
    type In = T;
    fn write(&mut self, value: T, timestamp: Timestamp) -> Result<()> {
        (self.f)(value, timestamp, self.shard);
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Writes records as lines into `dir/part-<shard>` (formatted by a function).
pub struct FileSink<T, F> {
    dir: PathBuf,
    format: Arc<F>,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T, F> std::fmt::Debug for FileSink<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink").field("dir", &self.dir).finish()
    }
}

impl<T, F> FileSink<T, F> {
    /// Part files in `dir`, each record written as `format(&record)` and a newline.
    pub fn new(dir: impl Into<PathBuf>, format: F) -> Self {
        FileSink { dir: dir.into(), format: Arc::new(format), _t: std::marker::PhantomData }
    }
}

/// The writer of a [`FileSink`].
pub struct FileWriter<T, F> {
    out: BufWriter<File>,
    path: PathBuf,
    format: Arc<F>,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T, F> Sink for FileSink<T, F>
where
    T: 'static,
    F: Fn(&T) -> String + Send + Sync + 'static,
{
    type In = T;
    type Writer = FileWriter<T, F>;
    fn writer(&self, shard: usize, _: usize) -> Result<FileWriter<T, F>> {
        let path = self.dir.join(format!("part-{shard}"));
        let err = |e: std::io::Error| RuntimeError::Sink {
            sink: format!("{} (shard {shard})", path.display()),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let file = File::create(&path).map_err(err)?;
        Ok(FileWriter {
            out: BufWriter::new(file),
            path,
            format: Arc::clone(&self.format),
            _t: std::marker::PhantomData,
        })
    }
}

impl<T: 'static, F: Fn(&T) -> String + 'static> SinkWriter for FileWriter<T, F> {
    type In = T;
    fn write(&mut self, value: T, _: Timestamp) -> Result<()> {
        let line = (self.format)(&value);
        writeln!(self.out, "{line}")
            .map_err(|e| RuntimeError::Sink { sink: self.path.display().to_string(), reason: e.to_string() })
    }
    fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .and_then(|_| self.out.get_ref().sync_data())
            .map_err(|e| RuntimeError::Sink { sink: self.path.display().to_string(), reason: e.to_string() })
    }
}
