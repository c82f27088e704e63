//! A fence that stops a run attempt's helper threads from changing named files once the next
//! attempt may be using the same names, without waiting for them to finish what they are doing.
//!
//! A helper (the checkpoint coordinator, a background writer) does its slow work (writing and
//! syncing a temp file) outside the fence, and only the step that makes the work visible under
//! a name another attempt also uses (a rename, a delete) inside [`Fence::pass`]. Closing the
//! fence waits only for a step in progress (microseconds), after which no step runs: a restart
//! need not join threads that are in the middle of an fsync.

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// See the module docs.
#[derive(Debug, Default)]
pub struct Fence {
    closed: AtomicBool,
    gate: RwLock<()>,
}

impl Fence {
    /// An open fence.
    pub fn new() -> Fence {
        Fence::default()
    }

    /// Whether the fence is closed: a helper may stop its slow work early (advisory; only
    /// [`Fence::pass`] decides).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the fence: waits for a step in [`Fence::pass`] to end; no step runs afterwards.
    pub fn close(&self) {
        let _gate = self.gate.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.closed.store(true, Ordering::Release);
    }

    /// Runs `step` unless the fence is closed (then `None`); closing waits for it to end.
    pub fn pass<R>(&self, step: impl FnOnce() -> R) -> Option<R> {
        let _gate = self.gate.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.closed.load(Ordering::Acquire) { None } else { Some(step()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn no_step_runs_after_close_and_close_waits_for_a_running_one() {
        let fence = Arc::new(Fence::new());
        assert_eq!(fence.pass(|| 1), Some(1));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let done = Arc::new(AtomicBool::new(false));
        let helper = {
            let (fence, done) = (Arc::clone(&fence), Arc::clone(&done));
            std::thread::spawn(move || {
                fence.pass(|| {
                    started_tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                    done.store(true, Ordering::SeqCst);
                })
            })
        };
        started_rx.recv().unwrap();
        fence.close();
        assert!(done.load(Ordering::SeqCst), "close waited for the step in progress");
        assert_eq!(helper.join().unwrap(), Some(()));
        assert!(fence.is_closed());
        assert_eq!(fence.pass(|| 2), None, "nothing passes a closed fence");
    }
}
