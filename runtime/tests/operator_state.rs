//! Operator state (an operator instance's own, non-keyed lists): exactly-once across a
//! failure, redistributed when a savepoint or a retained checkpoint is resumed at another
//! parallelism, and matched to operators by uid like keyed state.
//!
//! The operators here keep their state in memory only and hand it over at barriers
//! (`Operator::snapshot_state`); nothing of it is in the stores.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir::checkpointing::{CheckpointSettings, RestartStrategy};
use weir::operators::operator::{Collector, END_OF_TIME, Operator, OperatorContext};
use weir::operators::operator_state::{OperatorStateSnapshot, Redistribution};
use weir::prelude::*;
use weir::source::{DeadLetter, ReadStatus};
use weir::twophase::{ExactlyOnceCallbackSink, ExactlyOnceCollectSink};

/// A seed from the clock, printed so that a failing run can be repeated with `WEIR_SEED`.
fn seed() -> u64 {
    let seed = std::env::var("WEIR_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64)
    });
    eprintln!("WEIR_SEED={seed}");
    seed
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

// ---------------------------------------------------------------------------------------
// Exactly-once across a failure
// ---------------------------------------------------------------------------------------

/// Records `0..n`.
struct Numbers(u64);

impl Generator for Numbers {
    type Out = u64;
    fn generate(&self, offset: u64) -> Option<u64> {
        (offset < self.0).then_some(offset)
    }
}

/// Counts the records its instance sees, in memory only (no store), and emits `(shard,
/// count)` at the end of input. Panics once, when the records counted by all instances
/// together reach `panic_at`.
///
/// That it emitted is part of its state too, as a window's firing is: an instance whose input
/// ended before a checkpoint that the restart restores (the other shard was still reading)
/// sees the end of input again, and must not emit its count twice.
struct Tally {
    count: u64,
    emitted: bool,
    seen: Arc<AtomicU64>,
    fired: Arc<AtomicBool>,
    panic_at: u64,
}

impl Operator for Tally {
    type In = u64;
    type Out = (usize, u64);

    fn open(&mut self, ctx: &mut OperatorContext<'_>) -> weir::operators::Result<()> {
        self.count = ctx.operator_state.list::<u64>("count")?.iter().sum();
        self.emitted = ctx.operator_state.list::<bool>("emitted")?.contains(&true);
        Ok(())
    }

    fn process<C: Collector<(usize, u64)>>(
        &mut self,
        _: u64,
        _: Timestamp,
        _: &mut OperatorContext<'_>,
        _: &mut C,
    ) -> weir::operators::Result<()> {
        if self.seen.fetch_add(1, Ordering::Relaxed) == self.panic_at && !self.fired.swap(true, Ordering::SeqCst) {
            panic!("injected failure at record {}", self.panic_at);
        }
        self.count += 1;
        Ok(())
    }

    fn on_watermark<C: Collector<(usize, u64)>>(
        &mut self,
        watermark: Timestamp,
        ctx: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> weir::operators::Result<()> {
        if watermark == END_OF_TIME && !self.emitted {
            out.collect((ctx.shard, self.count), watermark);
            self.emitted = true;
        }
        Ok(())
    }

    fn snapshot_state(&mut self, state: &mut OperatorStateSnapshot) -> weir::operators::Result<()> {
        state.set_list("count", Redistribution::EvenSplit, &[self.count])?;
        state.set_list("emitted", Redistribution::EvenSplit, &[self.emitted])
    }
}

/// A per-instance count kept only as operator state, with a panic between 40% and 70% of the
/// input and a restart from the latest checkpoint: each instance's committed count is exactly
/// the number of records its splits hold (a count restored from nothing, or restored and then
/// fed the replayed records twice, would be off).
#[test]
fn a_per_instance_count_in_operator_state_is_exact_after_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let n: u64 = std::env::var("WEIR_RECORDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2_000_000);
    let parallelism = 2;
    let panic_at = n * 4 / 10 + mix(seed()) % (n * 3 / 10);
    let seen = Arc::new(AtomicU64::new(0));
    let fired = Arc::new(AtomicBool::new(false));
    let (seen2, fired2) = (Arc::clone(&seen), Arc::clone(&fired));
    let out = ExactlyOnceCollectSink::new();
    let job = Job::new("operator-state-count");
    job.source("numbers", GeneratorSource::new(Numbers(n)))
        .operator("tally", move || Tally {
            count: 0,
            emitted: false,
            seen: Arc::clone(&seen2),
            fired: Arc::clone(&fired2),
            panic_at,
        })
        .sink("out", out.clone());
    let settings = CheckpointSettings::new(dir.path(), 5)
        .with_restart(RestartStrategy::FixedDelay { attempts: 3, delay: Duration::from_millis(10) });
    let report = job.run(JobConfig::default().with_parallelism(parallelism).with_checkpointing(settings)).unwrap();
    let stats = report.wait().unwrap().checkpoints;
    assert!(fired.load(Ordering::SeqCst), "the failure was injected");
    assert_eq!(stats.restarts, 1, "one restart: {stats:?}");
    assert!(stats.restored.get(1).copied().flatten().is_some(), "the restart restored a checkpoint: {stats:?}");
    let mut counts: Vec<(usize, u64)> = out.take().into_iter().map(|(c, _)| c).collect();
    counts.sort_unstable();
    // Record `o` is read by split `o % 32`, which shard `split % P` reads.
    let expected: Vec<(usize, u64)> =
        (0..parallelism).map(|s| (s, (0..n).filter(|o| (o % 32) as usize % parallelism == s).count() as u64)).collect();
    assert_eq!(counts, expected, "each instance committed its count once, exactly");
    assert_eq!(counts.iter().map(|(_, c)| c).sum::<u64>(), n);
}

// ---------------------------------------------------------------------------------------
// Redistribution on a rescale
// ---------------------------------------------------------------------------------------

/// Records `0..n`, split `s` of eight reading `s, s + 8, ...`, each only once `allowed`
/// exceeds it; after that the source idles, or ends when `end` is set.
#[derive(Clone)]
struct Gated {
    n: u64,
    allowed: Arc<AtomicU64>,
    end: Arc<AtomicBool>,
}

impl Gated {
    fn new(n: u64) -> Gated {
        Gated { n, allowed: Arc::new(AtomicU64::new(0)), end: Arc::new(AtomicBool::new(false)) }
    }
    fn open(&self, upto: u64, end: bool) {
        self.allowed.store(upto, Ordering::SeqCst);
        self.end.store(end, Ordering::SeqCst);
    }
}

struct GatedReader {
    source: Gated,
    next: u64,
    start: u64,
}

const SPLITS: u64 = 8;

impl Source for Gated {
    type Out = u64;
    type Reader = GatedReader;
    fn splits(&self) -> u32 {
        SPLITS as u32
    }
    fn reader(&self, split: u32) -> weir::Result<GatedReader> {
        Ok(GatedReader { source: self.clone(), next: u64::from(split), start: u64::from(split) })
    }
}

impl SourceReader for GatedReader {
    type Out = u64;
    fn read(&mut self, out: &mut Vec<u64>, _: &mut Vec<DeadLetter>, max: usize) -> weir::Result<ReadStatus> {
        let limit = self.source.allowed.load(Ordering::SeqCst).min(self.source.n);
        let mut produced = 0;
        while produced < max && self.next < limit {
            out.push(self.next);
            self.next += SPLITS;
            produced += 1;
        }
        if produced == max {
            return Ok(ReadStatus::More);
        }
        if self.next >= limit && self.source.end.load(Ordering::SeqCst) {
            return Ok(ReadStatus::End);
        }
        Ok(if produced > 0 { ReadStatus::More } else { ReadStatus::Idle })
    }
    fn offset(&self) -> u64 {
        (self.next - self.start) / SPLITS
    }
    fn seek(&mut self, offset: u64) -> weir::Result<()> {
        self.next = self.start + offset * SPLITS;
        Ok(())
    }
}

/// What an instance of [`Remember`] found at `open`.
#[derive(Debug, Clone, PartialEq)]
struct Opened {
    shard: usize,
    parallelism: usize,
    ids: Vec<u64>,
    instances: Vec<u64>,
}

type OpenLog = Arc<Mutex<Vec<Opened>>>;

/// Remembers every id its instance passed on (an even-split list), and which instance it is
/// (a union list, so every instance of a restored job learns every old instance).
struct Remember {
    log: OpenLog,
    shard: u64,
    ids: Vec<u64>,
}

impl Operator for Remember {
    type In = u64;
    type Out = u64;

    fn open(&mut self, ctx: &mut OperatorContext<'_>) -> weir::operators::Result<()> {
        self.shard = ctx.shard as u64;
        self.ids = ctx.operator_state.list("ids")?;
        let instances = ctx.operator_state.list("instances")?;
        let opened = Opened { shard: ctx.shard, parallelism: ctx.parallelism, ids: self.ids.clone(), instances };
        self.log.lock().unwrap().push(opened);
        Ok(())
    }

    fn process<C: Collector<u64>>(
        &mut self,
        id: u64,
        timestamp: Timestamp,
        _: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> weir::operators::Result<()> {
        self.ids.push(id);
        out.collect(id, timestamp);
        Ok(())
    }

    fn snapshot_state(&mut self, state: &mut OperatorStateSnapshot) -> weir::operators::Result<()> {
        state.set_list("ids", Redistribution::EvenSplit, &self.ids)?;
        state.set_list("instances", Redistribution::Union, &[self.shard])
    }
}

type SinkFn = Box<dyn Fn(u64, i64, usize) + Send + Sync>;

/// The ids committed, by the shard that committed them, in order.
type Committed = Arc<Mutex<Vec<Vec<u64>>>>;

fn committing_sink(committed: &Committed) -> ExactlyOnceCallbackSink<u64, SinkFn> {
    let committed = Arc::clone(committed);
    ExactlyOnceCallbackSink::new(Box::new(move |id: u64, _, shard: usize| {
        let mut c = committed.lock().unwrap();
        if c.len() <= shard {
            c.resize(shard + 1, Vec::new());
        }
        c[shard].push(id);
    }) as SinkFn)
}

/// `source` -> `remember` (when `with_remember`) -> `out`.
fn remember_job(source: &Gated, with_remember: bool, log: &OpenLog, committed: &Committed) -> Job {
    let job = Job::new("remember");
    let stream = job.source("input", source.clone());
    if with_remember {
        let log = Arc::clone(log);
        stream
            .operator("remember", move || Remember { log: Arc::clone(&log), shard: 0, ids: Vec::new() })
            .sink("out", committing_sink(committed));
    } else {
        stream.map("pass", |id: u64| id).sink("out", committing_sink(committed));
    }
    job
}

fn settings(dir: &std::path::Path, savepoint: Option<&std::path::Path>, allow_unmatched: bool) -> CheckpointSettings {
    let mut settings = CheckpointSettings::new(dir, 20);
    settings.savepoint = savepoint.map(Into::into);
    settings.allow_unmatched_state = allow_unmatched;
    settings
}

fn config(parallelism: usize, settings: CheckpointSettings) -> JobConfig {
    JobConfig::default().with_parallelism(parallelism).with_checkpointing(settings)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

const IDS: u64 = 1_000;

/// Runs [`remember_job`] at P=2 over ids `0..IDS` and stops it with a savepoint into
/// `savepoint` once every id is committed. Returns the ids each shard passed on, in order.
fn savepoint_at_two(work: &std::path::Path, savepoint: &std::path::Path) -> Vec<Vec<u64>> {
    let source = Gated::new(IDS);
    source.open(IDS, false);
    let (log, committed) = (OpenLog::default(), Committed::default());
    let handle = remember_job(&source, true, &log, &committed)
        .run(config(2, settings(&work.join("run-1"), None, false)))
        .unwrap();
    let total = || committed.lock().unwrap().iter().map(Vec::len).sum::<usize>();
    wait_until("every id is committed", || total() == IDS as usize);
    handle.stop_with_savepoint(savepoint, false).unwrap();
    let opened = log.lock().unwrap().clone();
    assert!(opened.iter().all(|o| o.ids.is_empty() && o.instances.is_empty()), "a fresh start restores nothing");
    let by_shard = committed.lock().unwrap().clone();
    assert_eq!(by_shard.len(), 2);
    assert!(by_shard.iter().all(|ids| !ids.is_empty()), "both instances passed ids on: {by_shard:?}");
    by_shard
}

/// Resumes [`remember_job`] at `parallelism` (from `savepoint`, or from the latest checkpoint
/// in `dir`) with no new input, to the end; returns what each instance found at `open`, by
/// shard.
fn resume(parallelism: usize, dir: &std::path::Path, savepoint: Option<&std::path::Path>) -> Vec<Opened> {
    let source = Gated::new(IDS);
    source.open(IDS, true);
    let (log, committed) = (OpenLog::default(), Committed::default());
    let report = remember_job(&source, true, &log, &committed)
        .run(config(parallelism, settings(dir, savepoint, false)))
        .unwrap()
        .wait()
        .unwrap();
    assert!(report.checkpoints.restored.first().copied().flatten().is_some(), "it resumed");
    assert_eq!(report.checkpoints.restarts, 0);
    assert!(committed.lock().unwrap().iter().all(Vec::is_empty), "no id was read again");
    let mut opened = log.lock().unwrap().clone();
    opened.sort_by_key(|o| o.shard);
    assert_eq!(opened.iter().map(|o| (o.shard, o.parallelism)).collect::<Vec<_>>(), {
        (0..parallelism).map(|s| (s, parallelism)).collect::<Vec<_>>()
    });
    opened
}

/// Even-split ids are every old instance's list, concatenated by old shard and cut into
/// contiguous shares differing by one at most, one per new instance; union lists reach every
/// instance whole.
fn assert_redistributed(opened: &[Opened], old: &[Vec<u64>], old_instances: &[u64]) {
    let shares: Vec<Vec<u64>> = opened.iter().map(|o| o.ids.clone()).collect();
    assert_eq!(shares.concat(), old.concat(), "every id exactly once, in order");
    let sizes: Vec<usize> = shares.iter().map(Vec::len).collect();
    let (min, max) = (sizes.iter().min().copied().unwrap_or(0), sizes.iter().max().copied().unwrap_or(0));
    assert!(max - min <= 1, "near-equal shares: {sizes:?}");
    for o in opened {
        assert_eq!(o.instances, old_instances, "shard {} of {} got every union item", o.shard, o.parallelism);
    }
}

/// P=2 -> savepoint -> P=2, P=3 and P=1: at the same parallelism each instance gets back
/// exactly the ids it passed on; at another, the ids are dealt in near-equal contiguous shares;
/// the union list reaches every instance whole.
#[test]
fn a_savepoint_redistributes_operator_state_to_any_parallelism() {
    let work = tempfile::tempdir().unwrap();
    let savepoint = work.path().join("savepoint");
    let old = savepoint_at_two(work.path(), &savepoint);

    let same = resume(2, &work.path().join("run-p2"), Some(&savepoint));
    for o in &same {
        assert_eq!(o.ids, old[o.shard], "shard {} got back exactly its own ids", o.shard);
        assert_eq!(o.instances, [0, 1]);
    }
    for parallelism in [3, 1] {
        let opened = resume(parallelism, &work.path().join(format!("run-p{parallelism}")), Some(&savepoint));
        assert_redistributed(&opened, &old, &[0, 1]);
    }
}

/// Rescaling from a retained checkpoint (no savepoint): the job runs to its end at P=2, then
/// resumes from its directory at P=3 and then at P=1, redistributed each time from the
/// parallelism of the checkpoint it resumes.
#[test]
fn a_retained_checkpoint_redistributes_operator_state_when_rescaled() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("checkpoints");
    let source = Gated::new(IDS);
    source.open(IDS, true);
    let (log, committed) = (OpenLog::default(), Committed::default());
    remember_job(&source, true, &log, &committed).run(config(2, settings(&dir, None, false))).unwrap().wait().unwrap();
    let old = committed.lock().unwrap().clone();
    assert_eq!(old.iter().map(Vec::len).sum::<usize>(), IDS as usize);

    let at_three = resume(3, &dir, None);
    assert_redistributed(&at_three, &old, &[0, 1]);
    // The P=3 instances wrote their shares and their own shard at their last checkpoint.
    let at_one = resume(1, &dir, None);
    assert_redistributed(&at_one, &old, &[0, 1, 2]);
}

/// A savepoint whose only state of operator "remember" is operator state: a job without that
/// operator fails to resume from it, naming it, and resumes when dropping its state is
/// allowed.
#[test]
fn operator_state_of_a_removed_operator_fails_the_resume_unless_allowed() {
    let work = tempfile::tempdir().unwrap();
    let savepoint = work.path().join("savepoint");
    savepoint_at_two(work.path(), &savepoint);
    let summary = weir::state::savepoint::Savepoint::open(&savepoint).unwrap().summary();
    assert!(!summary.operators.iter().any(|o| o.uid == "remember"), "no keyed state of it: {summary:?}");

    let source = Gated::new(IDS + 10);
    source.open(IDS + 10, true);
    let (log, committed) = (OpenLog::default(), Committed::default());
    let job = remember_job(&source, false, &log, &committed);
    let error = job.run(config(2, settings(&work.path().join("run-2"), Some(&savepoint), false))).unwrap().wait();
    let message = error.unwrap_err().to_string();
    assert!(message.contains("remember") && message.contains("allow_unmatched_state"), "{message}");

    let report =
        job.run(config(2, settings(&work.path().join("run-3"), Some(&savepoint), true))).unwrap().wait().unwrap();
    assert!(report.checkpoints.restored.first().copied().flatten().is_some(), "it resumed the savepoint");
    let mut ids: Vec<u64> = committed.lock().unwrap().concat();
    ids.sort_unstable();
    assert_eq!(ids, (IDS..IDS + 10).collect::<Vec<_>>(), "only what followed the savepoint was read");
}
