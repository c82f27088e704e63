//! `weir-bench`: the benchmark harness. Run `weir-bench --help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use weir::checkpointing::HelperScheduling;
use weir_bench::nexmark_queries::{self, Query};
use weir_bench::{checkpoint_bench, pipeline_bench, state_bench};

/// Weir's benchmark harness: plain programs that print numbers, each with its baseline.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Directory for state and checkpoints (created; a fresh subdirectory per run).
    #[arg(long, default_value = "weir-data")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

/// How the threads a checkpoint waits for are scheduled (see `HelperScheduling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Helpers {
    /// `SCHED_FIFO` 1 where allowed, else nice -10 (the runtime's default).
    Realtime,
    /// Nice -10.
    Nice,
}

/// The options of `checkpoint-scale`.
#[derive(clap::Args, Debug)]
struct ScaleArgs {
    /// State size in MiB.
    #[arg(long, default_value_t = 1024)]
    state_mib: u64,
    /// Percent of the keys updated per checkpoint interval.
    #[arg(long, default_value_t = 1.0)]
    changed_percent: f64,
    /// Checkpoint interval.
    #[arg(long, default_value_t = 100)]
    interval_ms: i64,
    /// Parallelism.
    #[arg(long, default_value_t = 2)]
    parallelism: usize,
    /// Seconds measured once the state is complete (30 s: about 300 checkpoints, so that
    /// p99 is not simply the slowest one; the baselines run as many rounds).
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// How the threads a checkpoint waits for are scheduled (`nice`: the runtime's fallback
    /// where the real-time class is not allowed, for comparison).
    #[arg(long, value_enum, default_value_t = Helpers::Realtime)]
    helpers: Helpers,
    /// Then fail the job once at that load, and measure the recovery and the checkpoints of
    /// as many seconds after it.
    #[arg(long)]
    recover: bool,
}

impl ScaleArgs {
    fn spec(&self) -> checkpoint_bench::ScaleSpec {
        checkpoint_bench::ScaleSpec {
            state_bytes: self.state_mib << 20,
            changed_percent: self.changed_percent,
            interval_ms: self.interval_ms,
            parallelism: self.parallelism,
            seconds: self.seconds,
            helpers: match self.helpers {
                Helpers::Realtime => HelperScheduling::Realtime,
                Helpers::Nice => HelperScheduling::Nice,
            },
            recover: self.recover,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Quick tour (the default): Nexmark Q1/Q2/Q5, chain, keyed count, latency, state ops,
    /// checkpoint, restore, checkpoint overhead, recovery.
    Demo,
    /// State put/get throughput against HashMap<u64, u64>.
    StateOps {
        /// Key counts, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1_000_000u64, 10_000_000])]
        keys: Vec<u64>,
    },
    /// Checkpoint duration with a state size and a share of keys changed per checkpoint.
    StateCheckpoint {
        /// State size in MiB.
        #[arg(long, default_value_t = 1024)]
        state_mib: u64,
        /// Percent of keys changed between checkpoints.
        #[arg(long, default_value_t = 1.0)]
        changed_percent: f64,
        /// Checkpoints to take.
        #[arg(long, default_value_t = 40)]
        rounds: u32,
    },
    /// Nexmark Q1, Q2 and Q5 on the engine at parallelism 1 and 2.
    Nexmark {
        /// Events.
        #[arg(long, default_value_t = 2_000_000)]
        events: u64,
    },
    /// A chained stateless pipeline on the engine against a hand-written loop.
    Chain {
        /// Records.
        #[arg(long, default_value_t = 50_000_000)]
        records: u64,
    },
    /// Keyed count through key_by at parallelism 1 and 2.
    Keyed {
        /// Records.
        #[arg(long, default_value_t = 10_000_000)]
        records: u64,
        /// Distinct keys.
        #[arg(long, default_value_t = 100_000)]
        keys: u64,
    },
    /// Source-to-sink latency at half the measured peak rate of the same pipeline.
    Latency {
        /// Seconds of paced input.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Parallelism.
        #[arg(long, default_value_t = 2)]
        parallelism: usize,
    },
    /// Restore time until the store answers reads, across state sizes.
    StateRestore {
        /// State sizes in MiB, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = [100u64, 1024, 4096])]
        state_mib: Vec<u64>,
    },
    /// Keyed count with checkpoints every 100 ms and every 10 ms against none.
    CheckpointOverhead {
        /// Records.
        #[arg(long, default_value_t = 20_000_000)]
        records: u64,
        /// Parallelism.
        #[arg(long, default_value_t = 2)]
        parallelism: usize,
        /// Distinct keys.
        #[arg(long, default_value_t = 100_000)]
        keys: u64,
        /// Every count goes to an exactly-once durable callback sink (a transaction file per
        /// shard and checkpoint) instead of a summing sink.
        #[arg(long)]
        durable_sink: bool,
    },
    /// Checkpoint durations of a running job with a large state of which a share changes per
    /// interval (the target: p99 under 5 ms at 1 GiB and 1%).
    CheckpointScale(ScaleArgs),
    /// Recovery time (panic to first output after the in-process restart) across state sizes.
    Recovery {
        /// State sizes in MiB, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = [100u64, 1024])]
        state_mib: Vec<u64>,
        /// Parallelism.
        #[arg(long, default_value_t = 2)]
        parallelism: usize,
    },
}

fn run_dir(base: &std::path::Path, name: &str) -> Result<tempfile::TempDir, String> {
    std::fs::create_dir_all(base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    tempfile::Builder::new().prefix(name).tempdir_in(base).map_err(|e| format!("cannot create run dir: {e}"))
}

fn state_ops(base: &std::path::Path, keys: &[u64]) -> Result<(), String> {
    for &n in keys {
        let dir = run_dir(base, "ops")?;
        let r = state_bench::ops(dir.path(), n).map_err(|e| e.to_string())?;
        for (what, (w, h)) in [("insert", r.insert_mops), ("get", r.get_mops), ("update", r.update_mops)] {
            println!("state-ops keys={n:>9} {what:<6} weir={w:6.2} Mops/s  HashMap={h:6.2} Mops/s  ratio={:.2}", w / h);
        }
    }
    Ok(())
}

fn state_checkpoint(base: &std::path::Path, mib: u64, pct: f64, rounds: u32) -> Result<(), String> {
    let dir = run_dir(base, "checkpoint")?;
    let r = state_bench::checkpoint(dir.path(), mib << 20, pct, rounds).map_err(|e| e.to_string())?;
    println!(
        "state-checkpoint state={}MiB keys={} changed={pct}% synced/checkpoint={:.1}MiB",
        r.state_bytes >> 20,
        r.keys,
        r.bytes_synced_mean as f64 / 1048576.0
    );
    println!("  seal (caller thread)       {}", state_bench::percentiles_us(&r.seal_us));
    println!("  durability task            {}", state_bench::percentiles_us(&r.sync_us));
    println!("  total, incremental only    {}", state_bench::percentiles_us(&r.total_us_incremental));
    println!("  total, with index snapshot {}", state_bench::percentiles_us(&r.total_us_with_index));
    Ok(())
}

fn state_restore(base: &std::path::Path, sizes: &[u64]) -> Result<(), String> {
    let mut first: Option<f64> = None;
    for &mib in sizes {
        let dir = run_dir(base, "restore")?;
        let r = state_bench::restore(dir.path(), mib << 20).map_err(|e| e.to_string())?;
        let ms = r.until_first_read.as_secs_f64() * 1000.0;
        let ratio = ms / *first.get_or_insert(ms);
        println!(
            "state-restore state={:>5}MiB keys={:>9} until-first-read={ms:7.3}ms (x{ratio:.2} of smallest) first-1000-reads-mean={:.1}us verify-all={:.0}ms | with no index snapshot: replay={:.0}ms ({:.2} GB/s) then fold={:.0}ms | fold after {}% of the keys rewritten: {} entries in {:.0}ms ({:.0}ns each)",
            r.state_bytes >> 20,
            r.keys,
            r.first_reads_mean.as_secs_f64() * 1e6,
            r.verify_all.as_secs_f64() * 1000.0,
            r.replay_all.as_secs_f64() * 1000.0,
            r.state_bytes as f64 / r.replay_all.as_secs_f64() / 1e9,
            r.fold_all.as_secs_f64() * 1000.0,
            state_bench::FOLD_UPDATES_PER_MILLE as f64 / 10.0,
            r.fold_updates_entries,
            r.fold_updates.as_secs_f64() * 1000.0,
            r.fold_updates.as_secs_f64() * 1e9 / r.fold_updates_entries.max(1) as f64,
        );
    }
    Ok(())
}

fn chain(base: &std::path::Path, records: u64) -> Result<(), String> {
    let r = pipeline_bench::chain(records, base).map_err(|e| e.to_string())?;
    println!(
        "chain records={} engine={:.1} M/s  hand-written-loop={:.1} M/s  ratio={:.2}",
        r.records,
        r.engine_per_s / 1e6,
        r.loop_per_s / 1e6,
        r.engine_per_s / r.loop_per_s
    );
    Ok(())
}

fn keyed(base: &std::path::Path, records: u64, keys: u64) -> Result<f64, String> {
    let p1 = pipeline_bench::keyed(records, keys, 1, base).map_err(|e| e.to_string())?;
    pipeline_bench::settle();
    let p2 = pipeline_bench::keyed(records, keys, 2, base).map_err(|e| e.to_string())?;
    println!(
        "keyed-count records={records} keys={keys} P=1 {:.2} M events/s  P=2 {:.2} M events/s  scaling={:.2}",
        p1 / 1e6,
        p2 / 1e6,
        p2 / p1
    );
    Ok(p1.max(p2))
}

fn latency(base: &std::path::Path, seconds: f64, parallelism: usize) -> Result<(), String> {
    // The peak of the same keyed pipeline, measured now, then half of it.
    let peak = pipeline_bench::keyed(2_000_000, 10_000, parallelism, base).map_err(|e| e.to_string())?;
    pipeline_bench::settle();
    let rate = peak / 2.0;
    let h = pipeline_bench::latency(rate, seconds, parallelism, base).map_err(|e| e.to_string())?;
    println!(
        "latency P={parallelism} rate={:.0} events/s (half of measured peak {:.0}) {}",
        rate,
        peak,
        pipeline_bench::latency_percentiles(&h)
    );
    Ok(())
}

fn nexmark(base: &std::path::Path, events: u64) -> Result<(), String> {
    for (name, query) in [("q1", Query::Q1), ("q2", Query::Q2), ("q5", Query::Q5)] {
        let (p1, out1) = nexmark_queries::run(query, events, 1, base).map_err(|e| e.to_string())?;
        pipeline_bench::settle();
        let (p2, out2) = nexmark_queries::run(query, events, 2, base).map_err(|e| e.to_string())?;
        if name != "q5" && out1 != out2 {
            return Err(format!("nexmark {name}: {out1} results at P=1 but {out2} at P=2"));
        }
        println!(
            "nexmark {name} events={events} P=1 {:.2} M events/s  P=2 {:.2} M events/s  scaling={:.2}  results={out1}",
            p1 / 1e6,
            p2 / 1e6,
            p2 / p1
        );
    }
    Ok(())
}

/// Checkpoint intervals measured against the job without checkpoints.
const OVERHEAD_INTERVALS_MS: [i64; 2] = [100, 10];

fn checkpoint_overhead(
    base: &std::path::Path,
    records: u64,
    parallelism: usize,
    keys: u64,
    durable: bool,
) -> Result<(), String> {
    let baseline =
        checkpoint_bench::overhead(records, keys, parallelism, None, durable, base).map_err(|e| e.to_string())?;
    let sink = if durable { " durable-sink" } else { "" };
    println!(
        "checkpoint-overhead records={records} keys={keys} P={parallelism}{sink} no-checkpoints {:.2} M events/s",
        baseline.events_per_s / 1e6
    );
    for interval_ms in OVERHEAD_INTERVALS_MS {
        pipeline_bench::settle();
        let run = checkpoint_bench::overhead(records, keys, parallelism, Some(interval_ms), durable, base)
            .map_err(|e| e.to_string())?;
        let c = run.checkpoints.unwrap_or_default();
        println!(
            "  every {interval_ms:>3}ms {:.2} M events/s ratio={:.2} checkpoints={} aborted={} duration {} alignment {} sync {}",
            run.events_per_s / 1e6,
            run.events_per_s / baseline.events_per_s,
            c.completed,
            c.aborted,
            c.duration,
            c.alignment,
            c.sync
        );
    }
    Ok(())
}

fn checkpoint_scale(base: &std::path::Path, spec: checkpoint_bench::ScaleSpec) -> Result<(), String> {
    let r = checkpoint_bench::at_scale(spec, base).map_err(|e| e.to_string())?;
    let checkpoint_bench::ScaleSpec { changed_percent: pct, interval_ms, parallelism, helpers, .. } = spec;
    let helpers = match helpers {
        HelperScheduling::Realtime if weir_state::priority::realtime_class_available() => "realtime (SCHED_FIFO 1)",
        HelperScheduling::Realtime => "nice -10 (the real-time class is not allowed here)",
        HelperScheduling::Nice => "nice -10",
    };
    let asked = r.keys as f64 * pct / 100.0 * 1000.0 / interval_ms as f64;
    let c = r.checkpoints;
    println!(
        "checkpoint-scale state={}MiB keys={} changed={pct}%/interval every {interval_ms}ms P={parallelism}: duration {} max={:.2}ms (p99 / 5ms target = {:.2}) alignment {} sync {} | baselines, the same {:.1} MB a store per interval synced without the runtime: pwrite+fdatasync into a file {} (sync p99 = x{:.2} of it), through a weir segment (open tail, pwrite, msync) {} (x{:.2}) | checkpoints={} aborted={} updates={:.0}/s ({:.2} of asked) index-snapshots={} (past the replay bound: {}) fill={:.1}s helpers={helpers}",
        r.state_bytes >> 20,
        r.keys,
        c.duration,
        r.max.as_secs_f64() * 1000.0,
        c.duration.p99_us as f64 / 5000.0,
        c.alignment,
        c.sync,
        r.synced_per_store as f64 / 1e6,
        r.floor_write,
        c.sync.p99_us as f64 / r.floor_write.p99_us.max(1) as f64,
        r.floor_segment,
        c.sync.p99_us as f64 / r.floor_segment.p99_us.max(1) as f64,
        c.completed,
        c.aborted,
        r.updates_per_s,
        r.updates_per_s / asked,
        r.index_snapshots,
        c.bounded,
        r.fill.as_secs_f64(),
    );
    if let Some(u) = r.under_load {
        let rec = u.recovery;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        println!(
            "checkpoint-scale under load: a failure after the window, panic to first output {:.2}ms (restarted +{:.2}ms, operators open +{:.2}ms, all +{:.2}ms; restored checkpoint {}, replayed {:.1}MiB) | the {} checkpoints of the {:.0}s after it: duration {} max={:.2}ms sync {} (past the replay bound: {})",
            ms(rec.until_output),
            ms(rec.until_restarted),
            ms(rec.until_reopened),
            ms(rec.until_all_reopened),
            rec.restored,
            rec.replayed_bytes.unwrap_or(0) as f64 / (1u64 << 20) as f64,
            u.after.completed,
            spec.seconds,
            u.after.duration,
            ms(u.max_after),
            u.after.sync,
            u.after.bounded,
        );
    }
    Ok(())
}

fn recovery(base: &std::path::Path, sizes: &[u64], parallelism: usize) -> Result<(), String> {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let mut first: Option<f64> = None;
    for &mib in sizes {
        let r = checkpoint_bench::recovery(mib << 20, parallelism, base).map_err(|e| e.to_string())?;
        let after_fill = ms(r.after_fill.until_output);
        let ratio = after_fill / *first.get_or_insert(after_fill);
        println!(
            "recovery state={:>5}MiB keys={:>8} P={parallelism} after-fill={after_fill:7.2}ms (x{ratio:.2} of smallest; every shard restored +{:.2}ms) after-index-snapshot={:7.2}ms fill={:.1}s",
            r.state_bytes >> 20,
            r.keys,
            ms(r.after_fill.until_all_reopened),
            ms(r.after_index_snapshot.until_output),
            r.fill.as_secs_f64()
        );
        for (what, f) in [("after-fill", r.after_fill), ("after-index-snapshot", r.after_index_snapshot)] {
            let replayed = f.replayed_bytes.map_or("?".to_owned(), |b| format!("{:.1}MiB", b as f64 / 1048576.0));
            println!(
                "  {what:<20} restored checkpoint {} (replayed {replayed}): restarted +{:.2}ms operators open +{:.2}ms (all +{:.2}ms) first output +{:.2}ms",
                f.restored,
                ms(f.until_restarted),
                ms(f.until_reopened),
                ms(f.until_all_reopened),
                ms(f.until_output)
            );
        }
        let c = r.checkpoints;
        println!(
            "  checkpoints={} aborted={} past the replay bound={} duration {} sync {}",
            c.completed, c.aborted, c.bounded, c.duration, c.sync
        );
        pipeline_bench::settle();
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let base = cli.data_dir;
    let result = match cli.command.unwrap_or(Command::Demo) {
        Command::Demo => nexmark(&base, 1_000_000)
            .and_then(|_| chain(&base, 10_000_000))
            .and_then(|_| keyed(&base, 2_000_000, 100_000).map(|_| ()))
            .and_then(|_| latency(&base, 3.0, 2))
            .and_then(|_| state_ops(&base, &[1_000_000]))
            .and_then(|_| state_checkpoint(&base, 100, 1.0, 20))
            .and_then(|_| state_restore(&base, &[100]))
            .and_then(|_| checkpoint_overhead(&base, 3_000_000, 2, 100_000, false))
            .and_then(|_| {
                let spec = checkpoint_bench::ScaleSpec {
                    state_bytes: 128 << 20,
                    changed_percent: 1.0,
                    interval_ms: 100,
                    parallelism: 2,
                    seconds: 2.0,
                    helpers: HelperScheduling::default(),
                    recover: false,
                };
                checkpoint_scale(&base, spec)
            })
            .and_then(|_| recovery(&base, &[64], 2)),
        Command::Chain { records } => chain(&base, records),
        Command::Nexmark { events } => nexmark(&base, events),
        Command::Keyed { records, keys } => keyed(&base, records, keys).map(|_| ()),
        Command::Latency { seconds, parallelism } => latency(&base, seconds, parallelism),
        Command::StateOps { keys } => state_ops(&base, &keys),
        Command::StateCheckpoint { state_mib, changed_percent, rounds } => {
            state_checkpoint(&base, state_mib, changed_percent, rounds)
        }
        Command::StateRestore { state_mib } => state_restore(&base, &state_mib),
        Command::CheckpointOverhead { records, parallelism, keys, durable_sink } => {
            checkpoint_overhead(&base, records, parallelism, keys, durable_sink)
        }
        Command::CheckpointScale(args) => checkpoint_scale(&base, args.spec()),
        Command::Recovery { state_mib, parallelism } => recovery(&base, &state_mib, parallelism),
    };
    if let Err(e) = result {
        eprintln!("weir-bench: {e}");
        std::process::exit(1);
    }
}
