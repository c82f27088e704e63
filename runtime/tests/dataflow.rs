//! End-to-end jobs on the sharded engine, at parallelism 1, 2 and 4 (4 is unpinned on a 2-core
//! machine), each compared with a plain sequential computation of the same result.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Duration;

use weir::job::{Job, JobConfig};
use weir::runner::JobReport;
use weir::sink::CollectSink;
use weir::source::VecSource;

/// Runs `job` and fails the test (instead of hanging) if it takes longer than `limit`.
fn run_with_timeout(job: Job, config: JobConfig, limit: Duration) -> weir::Result<JobReport> {
    let (tx, rx) = mpsc::channel();
    let handle = job.run(config)?;
    std::thread::spawn(move || {
        let _ = tx.send(handle.wait());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("job did not finish within {limit:?}"))
}

fn config(parallelism: usize) -> JobConfig {
    let dir = std::env::temp_dir().join("weir-tests");
    JobConfig { max_parallelism: 128, data_dir: dir, segment_bytes: 1 << 20, ..JobConfig::default() }
        .with_parallelism(parallelism)
}

fn text() -> Vec<String> {
    let words = ["apple", "banana", "cherry", "date", "elder", "fig", "grape"];
    (0..2000).map(|i| (0..(i % 7 + 1)).map(|j| words[(i * 3 + j * 5) % 7]).collect::<Vec<_>>().join(" ")).collect()
}

#[test]
fn word_count_equals_sequential_reference_at_every_parallelism() {
    let lines = text();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for line in &lines {
        for w in line.split_whitespace() {
            *expected.entry(w.to_owned()).or_default() += 1;
        }
    }
    for p in [1, 2, 4] {
        let job = Job::new("word-count");
        let out = CollectSink::new();
        job.source("lines", VecSource::new(lines.clone()))
            .flat_map("split", |line: String| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .key_by("by-word", |w: &String| w.clone())
            .reduce("count", |w: &String| (w.clone(), 0u64), |(w, n): (String, u64), _: String| (w, n + 1))
            .sink("out", out.clone());
        run_with_timeout(job, config(p), Duration::from_secs(60)).unwrap();
        // The last update of each word is its final count.
        let mut finals: BTreeMap<String, u64> = BTreeMap::new();
        for ((w, n), _) in out.take() {
            let e = finals.entry(w).or_default();
            *e = (*e).max(n);
        }
        assert_eq!(finals, expected, "parallelism {p}");
    }
}
