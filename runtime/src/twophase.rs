//! Two-phase sinks: output written after barrier `n - 1` and before barrier `n` forms
//! transaction `n`. At barrier `n` the sink *pre-commits* it (makes it durable but invisible);
//! when checkpoint `n` completes (its manifest is written) the sink *commits* every transaction
//! up to `n` (makes it visible). After a failure, the job restores checkpoint `m` and calls
//! [`TwoPhaseWriter::recover`]: transactions up to `m` are committed (their commit may have been
//! lost in the crash), later ones are discarded. So committed output is exactly the output of a
//! failure-free run up to the last complete checkpoint: no loss, no duplicate.
//!
//! - [`TransactionalFileWriter`]: each transaction is a part file, written under
//!   `<dir>/.pending/`, fsynced at pre-commit, renamed to `<dir>/part-<shard>-<n>` at commit
//!   (then the directory is fsynced). Readers of `<dir>` see only committed parts.
//! - [`ExactlyOnceCallback`]: records are held per transaction and handed to the callback only
//!   when their checkpoint completes. (For at-least-once delivery, use
//!   [`crate::sink::CallbackSink`], which calls at once.)

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use weir_operators::operator::Timestamp;

use crate::error::{Result, RuntimeError};

/// A sink writer that takes part in checkpoints.
pub trait TwoPhaseWriter {
    /// What it consumes.
    type In;
    /// Writes one record into the open transaction.
    fn write(&mut self, value: Self::In, timestamp: Timestamp) -> Result<()>;
    /// Barrier `checkpoint` arrived: the open transaction becomes durable, invisible
    /// transaction `checkpoint`; a new one opens.
    fn pre_commit(&mut self, checkpoint: u64) -> Result<()>;
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

    fn pre_commit(&mut self, checkpoint: u64) -> Result<()> {
        let Some((path, out)) = self.open.take() else { return Ok(()) };
        let file = out.into_inner().map_err(|e| io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| io(&path, e))?;
        let target = self.pending_path(checkpoint);
        std::fs::rename(&path, &target).map_err(|e| io(&target, e))?;
        Self::sync_dir(&self.pending_dir)
    }

    fn commit(&mut self, checkpoint: u64) -> Result<()> {
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
