//! Word count over a text file: the file is split by byte ranges across shards, words are
//! routed by key group to the shard that owns them, and counts are kept in the mapped state.
//!
//! Run: `cargo run --release -p weir --example word_count [FILE]` (a sample text is written
//! to a temporary file when none is given).

use std::collections::BTreeMap;

use weir::prelude::*;

fn sample_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("weir-word-count-{}.txt", std::process::id()));
    let text = "the quick brown fox jumps over the lazy dog\nthe dog barks\nand the fox runs\n".repeat(200);
    std::fs::write(&path, text).expect("write the sample file");
    path
}

fn main() {
    run(std::env::args().nth(1).map(Into::into).unwrap_or_else(sample_file));
}

fn run(path: std::path::PathBuf) {
    let job = Job::new("word-count");
    let counts = CollectSink::new();
    job.source("lines", FileSource::new(&path))
        .flat_map("split", |line: String| line.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>())
        .key_by("by-word", |word: &String| word.clone())
        .reduce("count", |word: &String| (word.clone(), 0u64), |(word, n): (String, u64), _: String| (word, n + 1))
        .sink("counts", counts.clone());
    let config = JobConfig { data_dir: std::env::temp_dir().join("weir-examples"), ..JobConfig::default() };
    let report = job.run(config).and_then(|h| h.wait()).expect("the job runs");
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for ((word, n), _) in counts.take() {
        let e = totals.entry(word).or_default();
        *e = (*e).max(n);
    }
    let mut top: Vec<_> = totals.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (word, n) in top.iter().take(5) {
        println!("{word:>8} {n}");
    }
    if !report.dead_letters.is_empty() {
        println!("{} undecodable lines (see their offsets in the dead-letter output)", report.dead_letters.len());
    }
    assert_eq!(top[0], ("the".to_string(), 800));
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        super::run(super::sample_file());
    }
}
