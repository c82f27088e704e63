//! Shards: one glommio `LocalExecutor` per thread, and the supervisor that runs them.
//!
//! Weir is shared-nothing: shard `i` of `P` owns its key groups, its state and one instance of
//! every operator, and runs on its own thread under its own executor, with no lock on the data
//! path. [`run_shards`] is the only place that creates executors, so glommio's settings and
//! pitfalls are handled once, here:
//!
//! - **Placement.** A shard is pinned to a CPU when `P` fits the CPUs this process may use, and
//!   left unpinned otherwise: glommio refuses a pinned placement on a CPU that does not exist
//!   (`NonExistentCpus`), so `P = 4` on a 2-CPU machine must run unpinned. glommio's blocking
//!   thread pool (where `msync` and other blocking calls go) is left unpinned, so that blocking
//!   work does not compete with its own shard for one core.
//! - **io memory.** Each executor allocates `io_memory_bytes` for DMA file I/O and registers it
//!   with each of its **three** io_uring rings; the kernel charges every registration against
//!   the user's locked-memory limit (`ulimit -l`, shared by all of the user's processes), so
//!   `P` shards pin `3 * P * io_memory_bytes` (see [`ShardConfig::locked_io_bytes`]). When the
//!   limit is too small glommio does not fail: it logs a warning and runs without registered
//!   buffers, i.e. slower DMA I/O (weir's state uses `mmap`, not DMA, so this costs little).
//!   glommio's default, 10 MiB, pins 30 MiB per executor: over an 8 MiB limit even at `P = 1`
//!   for a normal user, while a process with `CAP_IPC_LOCK` (root) is not limited and pins
//!   120 MiB at `P = 4`. Weir's default, [`DEFAULT_IO_MEMORY_BYTES`] (512 KiB), pins 1.5 MiB per
//!   shard: `P = 5` fits 8 MiB; a larger `P` needs `ulimit -l` of at least
//!   `3 * P * io_memory_bytes` (24 MiB for `P = 16`) or a smaller `io_memory_bytes`
//!   (glommio's floor is 64 KiB). Two measured caveats: the limit is per user, so concurrent
//!   jobs (or tests) share it; and the kernel releases a finished executor's charge
//!   asynchronously, so shards started right after others ended may briefly find it still
//!   taken and run unregistered.
//! - **Spin before park.** An idle executor parks in the kernel and a peer wakes it with an
//!   `eventfd` write; a round trip costs ~50-70 us parked against ~11 us spinning.
//!   [`ShardConfig::spin_before_park`] trades a busy core for that latency.
//!
//! # Failure
//! A shard fails when its function returns an error, panics (in its own future or in a task it
//! spawned), or its executor cannot start. [`run_shards`] then stops every other shard: their
//! futures are dropped, which closes their channels. Dropping a failed shard's channel ends
//! wakes the peers blocked on them; and because a shard that died while unwinding may not get
//! to notify anyone, every shard also checks a shared stop flag every
//! [`STOP_POLL_INTERVAL`], so no peer is left waiting, whatever it waits on. (A parked glommio
//! executor can be woken from another thread only through one of its channels or a foreign
//! waker, and a foreign waker must not outlive its executor; a timer is simpler and costs an
//! idle shard 100 wake-ups a second.) The error returned
//! names the shard that failed first, preferring a cause (a panic, an error of its own) over
//! a consequence (a closed channel, a stop). A shard that never yields to its executor (an
//! endless loop without `.await`) cannot be stopped.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use futures_lite::FutureExt;
use glommio::{CpuSet, LocalExecutorBuilder, Placement, PoolPlacement};

use crate::error::{Result, RuntimeError};
use crate::exchange::{ExchangeHandle, ExchangeReceiver, ExchangeSender, Exchanges, ShardExchanges};

/// Default [`ShardConfig::io_memory_bytes`]: small enough that four shards fit an 8 MiB
/// locked-memory limit (see the module docs).
pub const DEFAULT_IO_MEMORY_BYTES: usize = 512 << 10;

/// io_uring rings per glommio executor, each of which registers the executor's io memory.
pub const IO_RINGS_PER_EXECUTOR: usize = 3;

/// glommio rounds io memory up to a multiple of 4 KiB and at least 64 KiB.
const IO_MEMORY_FLOOR_BYTES: usize = 64 << 10;

/// How often a running shard checks whether it must stop because another one failed: a timer
/// wake-up a millisecond per shard, against a restart that waits for the slowest shard.
pub const STOP_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// How shards are started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardConfig {
    /// The number of shards, `P`. Default: the CPUs available to the process.
    pub parallelism: usize,
    /// io memory per executor (see the module docs for the locked-memory limit it counts
    /// against). Default: [`DEFAULT_IO_MEMORY_BYTES`].
    pub io_memory_bytes: usize,
    /// Spin this long before parking an idle executor: lower wake-up latency for a busy core.
    /// Default: `None` (park at once).
    pub spin_before_park: Option<Duration>,
    /// Thread name prefix; shard `i` runs on thread `"{name}-{i}"`.
    pub name: String,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            parallelism: std::thread::available_parallelism().map_or(1, |n| n.get()),
            io_memory_bytes: DEFAULT_IO_MEMORY_BYTES,
            spin_before_park: None,
            name: "weir-shard".into(),
        }
    }
}

impl ShardConfig {
    /// The default configuration with `parallelism` shards.
    pub fn with_parallelism(parallelism: usize) -> Self {
        ShardConfig { parallelism, ..ShardConfig::default() }
    }

    /// Locked memory the shards' io_uring registrations need: what `ulimit -l` must allow
    /// (unless the process has `CAP_IPC_LOCK`) for every executor to get registered buffers.
    pub fn locked_io_bytes(&self) -> usize {
        let per_ring = self.io_memory_bytes.next_multiple_of(4096).max(IO_MEMORY_FLOOR_BYTES);
        IO_RINGS_PER_EXECUTOR * self.parallelism * per_ring
    }

    fn validate(&self) -> Result<()> {
        if self.parallelism == 0 {
            return Err(RuntimeError::InvalidShardConfig("parallelism must be > 0".into()));
        }
        Ok(())
    }
}

/// What a shard's function gets: who it is, and its ends of the exchanges.
pub struct ShardContext {
    shard: usize,
    parallelism: usize,
    exchanges: ShardExchanges,
}

impl std::fmt::Debug for ShardContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardContext").field("shard", &self.shard).field("parallelism", &self.parallelism).finish()
    }
}

impl ShardContext {
    /// This shard's index, `0..parallelism`.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The number of shards.
    pub fn parallelism(&self) -> usize {
        self.parallelism
    }

    /// Connects this shard's ends of `exchange`; waits until every peer has connected its
    /// ends, or dropped them (then the channels to it are closed).
    ///
    /// Every shard must connect every exchange early, or drop its context: a peer waits in
    /// this call until it does, and glommio busy-polls while a connection is pending.
    pub async fn exchange<T: Send + 'static>(
        &mut self,
        exchange: ExchangeHandle<T>,
    ) -> Result<(ExchangeSender<T>, ExchangeReceiver<T>)> {
        self.exchanges.connect(exchange).await
    }
}

/// Runs `f` on `config.parallelism` shards, each on its own thread and glommio executor, and
/// returns each shard's result, in shard order.
///
/// `f` is called once per shard, on that shard's thread, so the future it returns need not be
/// `Send`. Blocks until every shard has finished; call it from a plain thread, not from inside
/// an executor. Tasks a shard spawns must be awaited by it: whatever is still running when
/// the shard's future completes is dropped.
///
/// If a shard fails, the others are stopped and the error names the shard that failed (see
/// the module docs).
pub fn run_shards<F, Fut, R>(config: &ShardConfig, exchanges: Exchanges, f: F) -> Result<Vec<R>>
where
    F: Fn(ShardContext) -> Fut + Sync,
    Fut: Future<Output = Result<R>>,
    R: Send,
{
    config.validate()?;
    if exchanges.parallelism() != config.parallelism {
        return Err(RuntimeError::InvalidShardConfig(format!(
            "exchanges built for {} shards, config has {}",
            exchanges.parallelism(),
            config.parallelism
        )));
    }
    let parallelism = config.parallelism;
    let placements = placements(parallelism);
    let stop = AtomicBool::new(false);
    let (report, reports) = mpsc::channel::<(usize, Result<R>)>();
    let mut outcomes: Vec<Option<Result<R>>> = (0..parallelism).map(|_| None).collect();
    // Shards in the order their failures arrived.
    let mut failed: Vec<usize> = Vec::new();

    std::thread::scope(|scope| {
        let mut started = 0;
        let shards = exchanges.into_shards().into_iter().zip(placements).enumerate();
        for (shard, (ends, placement)) in shards {
            if stop.load(Ordering::Acquire) {
                outcomes[shard] = Some(Err(RuntimeError::ShardAborted { shard }));
                continue; // `ends` dropped: peers see the channels closed
            }
            let report = report.clone();
            let (f, stop) = (&f, &stop);
            let spawned =
                std::thread::Builder::new().name(format!("{}-{shard}", config.name)).spawn_scoped(scope, move || {
                    let ctx = ShardContext { shard, parallelism, exchanges: ends };
                    let outcome = run_shard(config, placement, ctx, f, stop);
                    // The supervisor outlives every report; a send error cannot happen.
                    let _ = report.send((shard, outcome));
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => {
                    stop.store(true, Ordering::Release);
                    let reason = format!("cannot spawn thread: {e}");
                    outcomes[shard] = Some(Err(RuntimeError::Shard { shard, reason }));
                    failed.push(shard);
                }
            }
        }
        drop(report);
        for _ in 0..started {
            let Ok((shard, outcome)) = reports.recv() else { break };
            if outcome.is_err() {
                stop.store(true, Ordering::Release);
                failed.push(shard);
            }
            outcomes[shard] = Some(outcome);
        }
    });

    let cause = failed
        .iter()
        .copied()
        .find(|&s| matches!(&outcomes[s], Some(Err(e)) if !e.is_consequence()))
        .or_else(|| failed.first().copied());
    if let Some(shard) = cause {
        return match outcomes[shard].take() {
            Some(Err(e)) => Err(e),
            _ => Err(RuntimeError::Shard { shard, reason: "failed".into() }),
        };
    }
    outcomes
        .into_iter()
        .enumerate()
        .map(|(shard, outcome)| {
            outcome.unwrap_or_else(|| Err(RuntimeError::Shard { shard, reason: "ended without a result".into() }))
        })
        .collect()
}

/// One shard's thread: start the executor, run the shard, and turn every way it can end
/// (result, error, panic anywhere on the thread) into a `Result` naming the shard.
fn run_shard<F, Fut, R>(
    config: &ShardConfig,
    placement: Placement,
    ctx: ShardContext,
    f: &F,
    stop: &AtomicBool,
) -> Result<R>
where
    F: Fn(ShardContext) -> Fut,
    Fut: Future<Output = Result<R>>,
{
    let shard = ctx.shard;
    let mut builder = LocalExecutorBuilder::new(placement)
        .name(&config.name)
        .io_memory(config.io_memory_bytes)
        .blocking_thread_pool_placement(PoolPlacement::Unbound(1));
    if let Some(spin) = config.spin_before_park {
        builder = builder.spin_before_park(spin);
    }
    // Catches panics of tasks the shard spawned (glommio propagates them out of `run`) and of
    // the executor's teardown; the shard's own future is caught inside `shard_main`.
    let ran = catch_unwind(AssertUnwindSafe(|| {
        let executor =
            builder.make().map_err(|e| RuntimeError::Shard { shard, reason: format!("cannot start executor: {e}") })?;
        executor.run(shard_main(ctx, f, stop))
    }));
    ran.unwrap_or_else(|payload| Err(RuntimeError::ShardPanicked { shard, message: panic_message(payload.as_ref()) }))
}

async fn shard_main<F, Fut, R>(ctx: ShardContext, f: &F, stop: &AtomicBool) -> Result<R>
where
    F: Fn(ShardContext) -> Fut,
    Fut: Future<Output = Result<R>>,
{
    let shard = ctx.shard;
    let panicked = |payload: Box<dyn std::any::Any + Send>| RuntimeError::ShardPanicked {
        shard,
        message: panic_message(payload.as_ref()),
    };
    let work = async {
        let future = catch_unwind(AssertUnwindSafe(|| f(ctx))).map_err(panicked)?;
        match AssertUnwindSafe(future).catch_unwind().await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(RuntimeError::ShardFailed { shard, source: Box::new(e) }),
            Err(payload) => Err(panicked(payload)),
        }
    };
    let stopped = async {
        while !stop.load(Ordering::Acquire) {
            glommio::timer::sleep(STOP_POLL_INTERVAL).await;
        }
        Err(RuntimeError::ShardAborted { shard })
    };
    // `or` polls `work` first: a shard that finished is not reported as stopped.
    work.or(stopped).await
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// Pinned to the first `parallelism` usable CPUs when they suffice, unpinned otherwise.
fn placements(parallelism: usize) -> Vec<Placement> {
    let cpus = usable_cpus();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if parallelism <= cpus.len().min(cores) {
        cpus.into_iter().take(parallelism).map(Placement::Fixed).collect()
    } else {
        vec![Placement::Unbound; parallelism]
    }
}

/// CPUs this process may run on: its affinity list (a container's cpuset, `taskset`), else
/// every online CPU. Sorted; empty when neither is known (then nothing is pinned).
fn usable_cpus() -> Vec<usize> {
    let allowed = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .and_then(|list| parse_cpu_list(list.trim()))
    });
    let mut cpus = allowed.unwrap_or_else(|| {
        CpuSet::online().map(|set| set.into_iter().map(|loc| loc.cpu).collect()).unwrap_or_default()
    });
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (usize, usize) = (first.parse().ok()?, last.parse().ok()?);
                if first > last {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn too_many_shards_run_unpinned() {
        let cpus = usable_cpus().len().max(1);
        assert!(placements(cpus * 2).iter().all(|p| *p == Placement::Unbound));
        if std::thread::available_parallelism().map_or(1, |n| n.get()) <= cpus {
            assert!(placements(1).iter().all(|p| matches!(p, Placement::Fixed(_))));
        }
    }

    #[test]
    fn locked_memory_counts_three_rings_and_the_floor() {
        let config = ShardConfig { parallelism: 4, io_memory_bytes: 1 << 20, ..ShardConfig::default() };
        assert_eq!(config.locked_io_bytes(), 12 << 20);
        let tiny = ShardConfig { parallelism: 1, io_memory_bytes: 1, ..ShardConfig::default() };
        assert_eq!(tiny.locked_io_bytes(), 3 * (64 << 10));
        let default = ShardConfig::with_parallelism(4);
        assert!(default.locked_io_bytes() <= 8 << 20, "P = 4 must fit an 8 MiB limit");
    }

    /// A consequence reported first (here: every input blocked, as an aligning stage sees a
    /// failed upstream shard) does not hide the cause another shard reports after it.
    #[test]
    fn the_cause_is_reported_not_a_consequence_that_came_first() {
        let config = ShardConfig::with_parallelism(2);
        let result = run_shards(&config, Exchanges::new(2), |ctx| async move {
            if ctx.shard() == 0 {
                return Err::<(), _>(RuntimeError::AllInputsBlocked);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            Err(RuntimeError::Shard { shard: 1, reason: "the cause".into() })
        });
        let cause = matches!(&result, Err(RuntimeError::ShardFailed { source, .. })
            if matches!(source.as_ref(), RuntimeError::Shard { reason, .. } if reason == "the cause"));
        assert!(cause, "{result:?}");
        let alone = run_shards(&config, Exchanges::new(2), |ctx| async move {
            if ctx.shard() == 0 { Err(RuntimeError::AllInputsBlocked) } else { Ok(()) }
        });
        let blocked = matches!(&alone, Err(RuntimeError::ShardFailed { source, .. })
            if matches!(source.as_ref(), RuntimeError::AllInputsBlocked));
        assert!(blocked, "alone, it is still reported: {alone:?}");
    }

    #[test]
    fn rejects_zero_and_mismatched_parallelism() {
        let run =
            |config: &ShardConfig, exchanges| run_shards(config, exchanges, |_ctx| async { Ok(()) }).map(|v| v.len());
        let zero = ShardConfig::with_parallelism(0);
        assert!(matches!(run(&zero, Exchanges::new(0)), Err(RuntimeError::InvalidShardConfig(_))));
        let two = ShardConfig::with_parallelism(2);
        assert!(matches!(run(&two, Exchanges::new(3)), Err(RuntimeError::InvalidShardConfig(_))));
        assert_eq!(run(&two, Exchanges::new(2)).ok(), Some(2));
    }
}
