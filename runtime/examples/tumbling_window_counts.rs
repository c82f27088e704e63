//! Event-time tumbling windows: page views counted per page and minute, from out-of-order
//! events, with a bounded-out-of-orderness watermark. A view that arrives after its minute was
//! complete (beyond the allowed lateness) goes to the late-data side output.
//!
//! Run: `cargo run --release -p weir --example tumbling_window_counts`

use weir::prelude::*;

const MINUTE: i64 = 60_000;

fn main() {
    // (page, event time): 10 minutes of views on 3 pages, up to 4 s out of order, plus one
    // view that arrives 5 minutes late.
    let mut views: Vec<(String, i64)> = (0..600)
        .map(|i| (format!("page-{}", i % 3), i * 1_000 - (i * 7919 % 4_000)))
        .map(|(p, t)| (p, t.max(0)))
        .collect();
    views.push(("page-0".into(), 30_000));
    let job = Job::new("page-views");
    let counts = CollectSink::new();
    job.source_with_watermarks(
        "views",
        VecSource::new(views),
        WatermarkStrategy::bounded_out_of_orderness(5_000).with_timestamp_assigner(|v: &(String, i64), _| v.1),
    )
    .key_by("by-page", |v: &(String, i64)| v.0.clone())
    .window("per-minute", TumblingWindows::event_time(MINUTE))
    .allowed_lateness(10_000)
    .aggregate(Count::new(), |page: &String, w: TimeWindow, n: u64| (w.start() / MINUTE, page.clone(), n))
    .sink("counts", counts.clone());
    let config = JobConfig {
        data_dir: std::env::temp_dir().join("weir-examples"),
        source_batch: 16,
        tick_interval_ms: 0,
        ..JobConfig::default()
    }
    .with_parallelism(1);
    let mut report = job.run(config).and_then(|h| h.wait()).expect("the job runs");
    let mut rows: Vec<(i64, String, u64)> = counts.take().into_iter().map(|(r, _)| r).collect();
    rows.sort();
    for (minute, page, n) in &rows {
        println!("minute {minute:>2} {page} {n:>3} views");
    }
    let late = report.side_output(LATE);
    println!("{} late view(s) in the side output", late.len());
    assert_eq!(rows.iter().map(|r| r.2).sum::<u64>(), 600);
    assert_eq!(late.len(), 1);
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        super::main();
    }
}
