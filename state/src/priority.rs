//! Checkpoint I/O first: background writers hold back while a checkpoint is in flight.
//!
//! A checkpoint's syncs (`msync` of the log, `fsync` of the manifest) wait for whatever the
//! disk has queued before them. An index snapshot written in the background (hundreds of MiB
//! at a time) would keep the queue full, and `checkpoint-scale` measured it: with snapshots
//! written at 256 MiB/s or more, the job's sync p99 was 30-65 ms; with them off, 1.6-2.7 ms.
//! So a checkpoint's syncs hold a [`Foreground`] while they run (the store's durability task
//! and the manifest commit), and a background writer waits, between pieces of [`BACKGROUND_PIECE`] bytes, until no one
//! holds one. The count is process-wide: a snapshot of one shard's store waits for the
//! checkpoint syncs of every shard.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The most a background writer writes at once: a checkpoint that starts meanwhile waits for
/// at most this much to reach the disk before its own syncs.
pub(crate) const BACKGROUND_PIECE: usize = 512 << 10;

/// The longest a background writer waits for the foreground per piece: a checkpoint stuck on
/// a slow disk does not stop snapshots for good.
const MAX_YIELD: Duration = Duration::from_millis(50);

static FOREGROUND: AtomicUsize = AtomicUsize::new(0);

/// Marks checkpoint I/O in flight while it lives. Cheap: an atomic count. Hold it only while
/// syncing: a guard held for a whole checkpoint would starve background writers when
/// checkpoints follow each other closely.
#[derive(Debug)]
#[must_use = "background writers only hold back while the guard lives"]
pub struct Foreground(());

impl Foreground {
    /// Background writers hold back from now until the guard is dropped.
    pub fn begin() -> Foreground {
        FOREGROUND.fetch_add(1, Ordering::SeqCst);
        Foreground(())
    }

    /// Whether any checkpoint I/O is in flight in this process.
    pub fn active() -> bool {
        FOREGROUND.load(Ordering::SeqCst) > 0
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        FOREGROUND.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits (a background writer, between pieces) while checkpoint I/O is in flight, at most
/// [`MAX_YIELD`], or until `stop` says so. Returns how long it waited, which a paced writer
/// adds to its schedule so that it does not burst afterwards to catch up.
pub(crate) fn yield_to_foreground(stop: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while Foreground::active() && !stop() && started.elapsed() < MAX_YIELD {
        std::thread::sleep(Duration::from_micros(100));
    }
    started.elapsed()
}

/// Bytes a deletion frees per step (see [`delete_in_steps`]).
const DELETE_STEP: u64 = 4 << 20;

/// Deletes the file `path` a step at a time: shrinks it by 4 MiB per step, yielding to
/// checkpoint I/O before each and pausing a millisecond after, then unlinks what is left.
/// Unlinking a 64-128 MiB file at once frees all its blocks together, and on a file system
/// mounted with `discard` that stalls the disk for everyone (checkpoint syncs of tens to
/// hundreds of milliseconds); in steps, each discard is small. For a thread nobody waits for.
pub fn delete_in_steps(path: &Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut len = file.metadata()?.len();
    while len > DELETE_STEP {
        yield_to_foreground(|| false);
        len -= DELETE_STEP;
        file.set_len(len)?;
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(file);
    std::fs::remove_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_deleted_in_steps_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![7u8; 3 * DELETE_STEP as usize + 5]).unwrap();
        delete_in_steps(&path).unwrap();
        assert!(!path.exists());
        assert!(delete_in_steps(&path).is_err(), "a missing file is an error");
    }

    #[test]
    fn a_background_writer_waits_while_a_guard_lives_and_no_longer() {
        // Other tests of this binary may hold guards: measure against what they do.
        let guard = Foreground::begin();
        assert!(Foreground::active());
        let released = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(guard);
        });
        let waited = yield_to_foreground(|| false);
        released.join().unwrap();
        assert!(waited >= Duration::from_millis(15), "waited {waited:?}");
        assert!(waited <= MAX_YIELD + Duration::from_millis(20), "waited {waited:?}");
        // A stop request ends the wait at once.
        let _guard = Foreground::begin();
        assert!(yield_to_foreground(|| true) < Duration::from_millis(5));
    }
}
