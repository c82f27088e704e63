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
//!
//! # CPU
//! On a machine with as many shards as cores, a background writer at the shards' priority
//! takes a shard's core for a scheduler slice at a time: a temporary trace of the 1 GiB
//! `checkpoint-scale` job counted 6309 preemptions of the two shards by the index snapshot
//! writer in 14.7 s, 690 ms of shard time, each delaying whatever barrier the shard had to
//! pass on. So that writer runs in the idle scheduling class ([`enter_idle_class`]): a shard
//! waking up takes the core back at once. A paced write that is urgent (a long replay tail,
//! after a bulk load) or falls [`STARVED_AFTER`] behind its pace (shards busy on every core)
//! leaves the idle class until it is done ([`Raised`]), so snapshots, which bound recovery,
//! are never starved. While some store's snapshot is needed soon ([`Urgent`]: its replay tail
//! nears the bound, or a checkpoint waits for it), every paced write also drops its pace and
//! stops holding back for checkpoint I/O. Where the process may not leave the idle class again
//! (no `CAP_SYS_NICE`, `RLIMIT_NICE` too low), it is not entered: [`idle_class_available`]
//! tries the round trip on a throwaway thread first.
//!
//! The threads a checkpoint waits for (the runtime's durability workers and coordinator) are
//! the opposite case: they sleep nearly all the time, and when one wakes up, the checkpoint
//! waits until it runs. At a higher nice value than the shards (nice -10) that was not soon:
//! the fair scheduler (EEVDF) does not preempt a running shard for a waking thread until the
//! shard's slice is used up, and checks again at the next tick (4 ms at 250 Hz). A temporary
//! trace of the 1 GiB `checkpoint-scale` job showed a durability worker woken and runnable for
//! 5.1 ms before it ran, and the coordinator delayed by as much. So these threads enter the
//! lowest real-time priority ([`enter_realtime_class`], `SCHED_FIFO` 1), which preempts a
//! shard at once; they do milliseconds of work at most per checkpoint (syscalls that wait on
//! the disk), and the kernel's real-time throttling caps them in any case. Longer work on such
//! a thread (writing a savepoint) runs in the normal class ([`lower`]).

use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use thread_priority::unix::{
    NormalThreadSchedulePolicy, RealtimeThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
    thread_native_id, thread_schedule_policy,
};
use thread_priority::{ThreadPriority, ThreadPriorityValue};

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

static URGENT: AtomicUsize = AtomicUsize::new(0);

/// Marks, while it lives, an index snapshot that a store's replay bound needs soon: its
/// store's replay tail is near the bound, or a checkpoint past the bound waits for it. Every
/// paced background write of the process then writes at full speed, at the shards' priority
/// and without holding back for checkpoint I/O, as the snapshot that matters may be queued
/// behind another one on the same writer.
#[derive(Debug)]
pub(crate) struct Urgent(());

impl Urgent {
    /// Background writes hurry from now until the guard is dropped.
    pub(crate) fn begin() -> Urgent {
        URGENT.fetch_add(1, Ordering::SeqCst);
        Urgent(())
    }

    /// Whether any index snapshot of this process is urgent.
    pub(crate) fn active() -> bool {
        URGENT.load(Ordering::SeqCst) > 0
    }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        URGENT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How far behind its pace a paced background write may fall before it leaves the idle
/// scheduling class (see the module docs).
pub(crate) const STARVED_AFTER: Duration = Duration::from_millis(500);

/// `thread-priority`'s cross-platform value that maps to nice 0 for the normal policies (it
/// maps 0-99 onto nice 19 to -20, rounding toward nice 0): the shards' priority.
const NICE_ZERO: u8 = 48;

/// How high a thread leaving the idle or the real-time class goes in the normal one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// Nice 0, the shards' priority: a fair share of the cores.
    Shards,
    /// Nice 19: a trickle beside busy shards, more than the idle class gets.
    Trickle,
}

/// Moves the calling thread to `policy`, at `level` (the idle class ignores nice).
fn set_policy(policy: NormalThreadSchedulePolicy, level: Level) -> bool {
    let priority = match level {
        Level::Shards => match ThreadPriorityValue::try_from(NICE_ZERO) {
            Ok(nice_zero) => ThreadPriority::Crossplatform(nice_zero),
            Err(_) => return false,
        },
        // `thread-priority`'s lowest priority for the normal policies.
        Level::Trickle => ThreadPriority::Min,
    };
    set_thread_priority_and_policy(thread_native_id(), priority, ThreadSchedulePolicy::Normal(policy)).is_ok()
}

fn in_idle_class() -> bool {
    matches!(thread_schedule_policy(), Ok(ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle)))
}

/// Whether a thread of this process may enter the idle scheduling class and leave it again
/// (tried once, on a throwaway thread).
pub fn idle_class_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::thread::Builder::new()
            .name("weir-sched-probe".into())
            .spawn(|| {
                set_policy(NormalThreadSchedulePolicy::Idle, Level::Shards)
                    && set_policy(NormalThreadSchedulePolicy::Other, Level::Shards)
            })
            .ok()
            .and_then(|probe| probe.join().ok())
            .unwrap_or(false)
    })
}

/// Puts the calling thread in the idle scheduling class (`SCHED_IDLE`), if a thread may leave
/// it again ([`idle_class_available`]). For a background thread that nobody waits for; its
/// paced writes leave the class for a while when they starve. Returns whether it did.
pub fn enter_idle_class() -> bool {
    idle_class_available() && set_policy(NormalThreadSchedulePolicy::Idle, Level::Shards)
}

/// The calling thread out of the idle scheduling class while this lives (see [`raise`]).
#[derive(Debug)]
pub(crate) struct Raised(bool);

/// Moves the calling thread from the idle scheduling class to the normal one, at `level`, until
/// the returned guard is dropped; a thread that is not in the idle class is left alone. An
/// urgent snapshot (after a bulk load) goes to [`Level::Shards`]; one that merely fell behind
/// in a steady job to [`Level::Trickle`]: with those at nice 0 too, `checkpoint-scale`'s p99
/// was 5.2-6.4 ms in three runs, against 3.3-4.2 ms with them at nice 19.
pub(crate) fn raise(level: Level) -> Raised {
    let raised = in_idle_class() && set_policy(NormalThreadSchedulePolicy::Other, level);
    if raised {
        RAISED.fetch_add(1, Ordering::Relaxed);
    }
    Raised(raised)
}

static RAISED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many paced background writes of this process left the idle scheduling class (urgent,
/// or fallen behind their pace).
pub fn raised_writes() -> u64 {
    RAISED.load(Ordering::Relaxed)
}

impl Drop for Raised {
    fn drop(&mut self) {
        if self.0 {
            set_policy(NormalThreadSchedulePolicy::Idle, Level::Shards);
        }
    }
}

/// Puts the calling thread in the real-time class at its lowest priority (`SCHED_FIFO`, 1):
/// it preempts any thread of the normal classes as soon as it wakes up. For threads that
/// mostly sleep and that a checkpoint waits for (see the module docs). Needs `CAP_SYS_NICE`
/// or an `RLIMIT_RTPRIO` of at least 1; returns whether it was allowed (the thread is
/// unchanged otherwise).
pub fn enter_realtime_class() -> bool {
    set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
    )
    .is_ok()
}

/// Whether a thread of this process may enter the real-time class (tried once, on a throwaway
/// thread): what [`enter_realtime_class`] will do, for reports.
pub fn realtime_class_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::thread::Builder::new()
            .name("weir-sched-probe".into())
            .spawn(enter_realtime_class)
            .ok()
            .and_then(|probe| probe.join().ok())
            .unwrap_or(false)
    })
}

fn in_realtime_class() -> bool {
    matches!(thread_schedule_policy(), Ok(ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo)))
}

/// The calling thread in the normal class while this lives (see [`lower`]).
#[derive(Debug)]
#[must_use = "the thread returns to the real-time class when the guard is dropped"]
pub struct Lowered(bool);

/// Moves the calling thread from the real-time class to the normal one until the returned
/// guard is dropped, for work long enough that it should share the cores with the shards
/// instead of preempting them (writing a savepoint). A thread in another class is left alone.
pub fn lower() -> Lowered {
    Lowered(in_realtime_class() && set_policy(NormalThreadSchedulePolicy::Other, Level::Shards))
}

impl Drop for Lowered {
    fn drop(&mut self) {
        if self.0 {
            enter_realtime_class();
        }
    }
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

    /// Runs `test` on a thread of its own, whose scheduling it may change, and checks that the
    /// caller's stays as it was.
    fn on_a_thread_of_its_own(test: impl FnOnce() + Send + 'static) {
        std::thread::spawn(test).join().unwrap();
        assert!(!in_idle_class() && !in_realtime_class(), "other threads keep their class");
    }

    /// The calling thread's nice value (`/proc/thread-self/stat` field 19).
    fn nice() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        stat[stat.rfind(')').unwrap() + 2..].split(' ').nth(19 - 3).unwrap().parse().unwrap()
    }

    #[test]
    fn an_idle_thread_is_raised_while_the_guard_lives_and_a_normal_one_is_left_alone() {
        on_a_thread_of_its_own(|| {
            if !enter_idle_class() {
                // Not allowed here (no CAP_SYS_NICE, low RLIMIT_NICE): the class is not entered.
                assert!(!idle_class_available() && !in_idle_class());
                return;
            }
            assert!(in_idle_class());
            let trickle = raise(Level::Trickle);
            assert!(!in_idle_class());
            assert_eq!(nice(), 19);
            drop(trickle);
            assert!(in_idle_class());
            let raised = raise(Level::Shards);
            assert!(!in_idle_class());
            assert_eq!(nice(), 0, "raised to the shards' priority, not nice 19");
            let nested = raise(Level::Shards);
            assert!(!nested.0, "a thread not in the idle class is left alone");
            drop(nested);
            assert!(!in_idle_class());
            drop(raised);
            assert!(in_idle_class(), "back in the idle class once the guard is gone");
        });
    }

    #[test]
    fn a_realtime_thread_is_lowered_while_the_guard_lives_and_others_are_left_alone() {
        on_a_thread_of_its_own(|| {
            let normal = lower();
            assert!(!normal.0, "a thread in the normal class is left alone");
            drop(normal);
            assert!(!in_realtime_class());
            if !enter_realtime_class() {
                // Not allowed here (no CAP_SYS_NICE, RLIMIT_RTPRIO 0): the thread is unchanged.
                assert!(!in_realtime_class());
                return;
            }
            assert!(in_realtime_class());
            let lowered = lower();
            assert!(matches!(
                thread_schedule_policy(),
                Ok(ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other))
            ));
            assert_eq!(nice(), 0, "lowered to the shards' priority, not nice 19");
            drop(lowered);
            assert!(in_realtime_class(), "back in the real-time class once the guard is gone");
        });
    }

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
