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

use weir::prelude::*;

/// Events (key, event time) with bounded disorder: each is at most `disorder_ms` behind the
/// largest time seen before it.
fn events(n: usize, keys: usize, disorder_ms: i64) -> Vec<(String, i64)> {
    let mut seed = 42u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as i64
    };
    (0..n)
        .map(|i| {
            let ts = i as i64 * 100 - next() % disorder_ms.max(1);
            (format!("key-{}", next() as usize % keys), ts.max(0))
        })
        .collect()
}

type EventTimestamps = fn(&(String, i64), Option<i64>) -> i64;

fn event_time() -> WatermarkStrategy<weir::operators::time::BoundedOutOfOrderness, EventTimestamps> {
    WatermarkStrategy::bounded_out_of_orderness(1_000).with_timestamp_assigner(|e: &(String, i64), _| e.1)
}

fn window_reference(events: &[(String, i64)], size: i64, slide: i64) -> BTreeMap<(String, i64), u64> {
    let mut out = BTreeMap::new();
    for (k, ts) in events {
        let last_start = ts - ts.rem_euclid(slide);
        let mut start = last_start;
        while start > ts - size {
            *out.entry((k.clone(), start)).or_default() += 1;
            start -= slide;
        }
    }
    out
}

fn run_windows(p: usize, assigner_size: i64, slide: Option<i64>) -> BTreeMap<(String, i64), u64> {
    let input = events(5_000, 13, 900);
    let job = Job::new("windows");
    let out = CollectSink::new();
    let keyed = job
        .source_with_watermarks("events", VecSource::new(input), event_time())
        .key_by("by-key", |e: &(String, i64)| e.0.clone());
    let label = |k: &String, w: TimeWindow, n: u64| (k.clone(), w.start(), n);
    match slide {
        None => keyed
            .window("tumbling", TumblingWindows::event_time(assigner_size))
            .aggregate(Count::new(), label)
            .sink("out", out.clone()),
        Some(s) => keyed
            .window("sliding", SlidingWindows::event_time(assigner_size, s))
            .aggregate(Count::new(), label)
            .sink("out", out.clone()),
    };
    let mut report = run_with_timeout(job, config(p), Duration::from_secs(60)).unwrap();
    assert!(report.side_output(LATE).is_empty(), "disorder is within the bound: nothing is late");
    let mut got = BTreeMap::new();
    for ((k, start, n), _) in out.take() {
        assert!(got.insert((k, start), n).is_none(), "a window fired twice");
    }
    got
}

#[test]
fn event_time_windows_equal_reference_at_every_parallelism() {
    let input = events(5_000, 13, 900);
    let tumbling = window_reference(&input, 2_000, 2_000);
    let sliding = window_reference(&input, 3_000, 1_000);
    for p in [1, 2, 4] {
        assert_eq!(run_windows(p, 2_000, None), tumbling, "tumbling, parallelism {p}");
        assert_eq!(run_windows(p, 3_000, Some(1_000)), sliding, "sliding, parallelism {p}");
    }
}

#[test]
fn session_windows_equal_reference_at_every_parallelism() {
    // Per key, bursts separated by quiet periods longer than the gap.
    let mut input = Vec::new();
    for k in 0..7 {
        for burst in 0..20i64 {
            for i in 0..(3 + (k + burst as usize) % 4) as i64 {
                input.push((format!("user-{k}"), burst * 10_000 + i * 700 + k as i64 * 13));
            }
        }
    }
    let mut reference: BTreeMap<(String, i64), (i64, u64)> = BTreeMap::new();
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (k, ts) in &input {
        by_key.entry(k.clone()).or_default().push(*ts);
    }
    for (k, mut stamps) in by_key {
        stamps.sort();
        let (mut start, mut end, mut n) = (stamps[0], stamps[0] + 2_000, 0u64);
        for ts in stamps {
            if ts > end {
                reference.insert((k.clone(), start), (end, n));
                (start, n) = (ts, 0);
            }
            end = end.max(ts + 2_000);
            n += 1;
        }
        reference.insert((k, start), (end, n));
    }
    // In event-time order, then shuffled within the out-of-orderness bound.
    let mut shuffled = input.clone();
    shuffled.sort_by_key(|e| e.1);
    for chunk in shuffled.chunks_mut(3) {
        chunk.reverse();
    }
    for p in [1, 2, 4] {
        let job = Job::new("sessions");
        let out = CollectSink::new();
        job.source_with_watermarks("events", VecSource::new(shuffled.clone()), event_time())
            .key_by("by-user", |e: &(String, i64)| e.0.clone())
            .window("sessions", SessionWindows::event_time(2_000))
            .aggregate(Count::new(), |k: &String, w: TimeWindow, n: u64| (k.clone(), w.start(), w.end(), n))
            .sink("out", out.clone());
        run_with_timeout(job, config(p), Duration::from_secs(60)).unwrap();
        let got: BTreeMap<(String, i64), (i64, u64)> =
            out.take().into_iter().map(|((k, s, e, n), _)| ((k, s), (e, n))).collect();
        assert_eq!(got, reference, "parallelism {p}");
    }
}

#[test]
fn records_later_than_allowed_lateness_go_to_the_side_output() {
    // In order, then three records from far in the past.
    let mut input: Vec<(String, i64)> = (0..100).map(|i| ("k".to_string(), i * 1_000)).collect();
    input.extend([("k".to_string(), 5), ("k".to_string(), 6), ("k".to_string(), 95_500)]);
    let job = Job::new("late");
    let out = CollectSink::new();
    job.source_with_watermarks(
        "events",
        IterSource::new(move |shard, _| if shard == 0 { input.clone().into_iter() } else { Vec::new().into_iter() }),
        WatermarkStrategy::monotonic().with_timestamp_assigner(|e: &(String, i64), _| e.1),
    )
    .key_by("by-key", |e: &(String, i64)| e.0.clone())
    .window("tumbling", TumblingWindows::event_time(10_000))
    .allowed_lateness(1_000)
    .aggregate(Count::new(), |_: &String, w: TimeWindow, n: u64| (w.start(), n))
    .sink("out", out.clone());
    // One shard: with two, whether the stragglers are late would depend on when the other
    // (empty) source's end of input reaches the window, since the watermark is the minimum.
    let mut config = config(1);
    config.source_batch = 1; // so watermarks advance record by record
    config.tick_interval_ms = 0;
    let mut report = run_with_timeout(job, config, Duration::from_secs(60)).unwrap();
    let late = report.side_output(LATE);
    assert_eq!(late.iter().map(|(r, _)| r.timestamp).collect::<Vec<_>>(), vec![5, 6]);
    // 95_500 was within the lateness of window [90_000, 100_000): no loss, no extra output.
    let finals: BTreeMap<i64, u64> = out.take().into_iter().map(|((s, n), _)| (s, n)).collect();
    assert_eq!(finals.values().sum::<u64>(), 101);
}

#[test]
fn late_records_themselves_flow_into_a_side_stream() {
    const LATE_EVENTS: OutputTag<Keyed<String, (String, i64)>> = OutputTag::new("late-events");
    let mut input: Vec<(String, i64)> = (0..100).map(|i| ("k".to_string(), i * 1_000)).collect();
    input.extend([("k".to_string(), 5), ("k".to_string(), 6), ("k".to_string(), 95_500)]);
    let job = Job::new("late-stream");
    let (out, late_out) = (CollectSink::new(), CollectSink::new());
    let counts = job
        .source_with_watermarks(
            "events",
            IterSource::new(
                move |shard, _| if shard == 0 { input.clone().into_iter() } else { Vec::new().into_iter() },
            ),
            WatermarkStrategy::monotonic().with_timestamp_assigner(|e: &(String, i64), _| e.1),
        )
        .key_by("by-key", |e: &(String, i64)| e.0.clone())
        .window("tumbling", TumblingWindows::event_time(10_000))
        .allowed_lateness(1_000)
        .side_output_late_data(LATE_EVENTS)
        .aggregate(Count::new(), |_: &String, w: TimeWindow, n: u64| (w.start(), n));
    counts
        .side_output("late-stream", LATE_EVENTS)
        .map("late-value", |k: Keyed<String, (String, i64)>| k.value)
        .sink("late-out", late_out.clone());
    counts.sink("out", out.clone());
    let mut config = config(1);
    config.source_batch = 1;
    config.tick_interval_ms = 0;
    let mut report = run_with_timeout(job, config, Duration::from_secs(60)).unwrap();
    assert_eq!(late_out.take(), vec![(("k".to_string(), 5), 5), (("k".to_string(), 6), 6)]);
    assert!(report.side_output(LATE).is_empty(), "late records went to the stream, not the report");
    let finals: BTreeMap<i64, u64> = out.take().into_iter().map(|((s, n), _)| (s, n)).collect();
    assert_eq!(finals.values().sum::<u64>(), 101);
}

/// Splits events by time: those at a multiple of 3 go to a side output.
#[derive(Default)]
struct Split;

const THIRDS: OutputTag<(String, i64)> = OutputTag::new("thirds");

impl KeyedProcessFunction for Split {
    type Key = String;
    type In = (String, i64);
    type Out = (String, i64);
    fn process(
        &mut self,
        e: (String, i64),
        ctx: &mut ProcessContext<'_, String, (String, i64)>,
    ) -> weir::operators::Result<()> {
        if e.1 % 3 == 0 {
            ctx.side_output(THIRDS, e);
        } else {
            ctx.output(e);
        }
        Ok(())
    }
}

#[test]
fn a_side_stream_is_keyed_and_windowed_like_any_stream_at_every_parallelism() {
    let input = events(5_000, 13, 900);
    let (thirds, rest): (Vec<_>, Vec<_>) = input.iter().cloned().partition(|e| e.1 % 3 == 0);
    let (want_main, want_side) = (window_reference(&rest, 2_000, 2_000), window_reference(&thirds, 2_000, 2_000));
    for p in [1, 2, 4] {
        let job = Job::new("side-stream");
        let (main_out, side_out) = (CollectSink::new(), CollectSink::new());
        let split = job
            .source_with_watermarks("events", VecSource::new(input.clone()), event_time())
            .key_by("by-key", |e: &(String, i64)| e.0.clone())
            .process("split", || Split);
        let label = |k: &String, w: TimeWindow, n: u64| (k.clone(), w.start(), n);
        split
            .side_output("thirds", THIRDS)
            .key_by("thirds-by-key", |e: &(String, i64)| e.0.clone())
            .window("thirds-windows", TumblingWindows::event_time(2_000))
            .aggregate(Count::new(), label)
            .sink("thirds-out", side_out.clone());
        split
            .key_by("rest-by-key", |e: &(String, i64)| e.0.clone())
            .window("rest-windows", TumblingWindows::event_time(2_000))
            .aggregate(Count::new(), label)
            .sink("rest-out", main_out.clone());
        let mut report = run_with_timeout(job, config(p), Duration::from_secs(60)).unwrap();
        assert!(report.side_output(THIRDS).is_empty(), "every side record went to the stream");
        let collect = |sink: CollectSink<(String, i64, u64)>| {
            let mut got = BTreeMap::new();
            for ((k, start, n), _) in sink.take() {
                assert!(got.insert((k, start), n).is_none(), "a window fired twice");
            }
            got
        };
        assert_eq!(collect(side_out), want_side, "side stream, parallelism {p}");
        assert_eq!(collect(main_out), want_main, "main stream, parallelism {p}");
    }
}

#[test]
fn a_side_stream_that_is_never_closed_is_an_error_not_a_hang() {
    let job = Job::new("unclosed-side");
    let split = job
        .source("events", VecSource::new(vec![("a".to_string(), 3i64)]))
        .key_by("by-key", |e: &(String, i64)| e.0.clone())
        .process("split", || Split);
    let _unread = split.side_output("thirds", THIRDS);
    split.sink("out", CollectSink::new());
    let err = job.run(config(2)).unwrap_err();
    assert!(err.to_string().contains("never closed"), "{err}");

    let job = Job::new("side-read-twice");
    let split = job
        .source("events", VecSource::new(vec![("a".to_string(), 3i64)]))
        .key_by("by-key", |e: &(String, i64)| e.0.clone())
        .process("split", || Split);
    split.side_output("thirds-a", THIRDS).sink("a", CollectSink::new());
    split.side_output("thirds-b", THIRDS).sink("b", CollectSink::new());
    split.sink("out", CollectSink::new());
    let err = job.run(config(2)).unwrap_err();
    assert!(err.to_string().contains("read twice"), "{err}");
}

/// Processing-time tumbling windows on the engine, driven by a manual clock that the source
/// advances as it reads (record `i` is read at `7 * i` ms; the clock jumps a window ahead when
/// the input ends): every record is counted in exactly one window, and windows fire as the clock
/// passes them. At the end of input, pending processing-time windows fire (the last one).
#[test]
fn processing_time_windows_fire_as_the_clock_passes_their_end() {
    let n = 1_000i64;
    for p in [1, 2] {
        let clock = Arc::new(ManualClock::new(0));
        let source_clock = Arc::clone(&clock);
        let job = Job::new("processing-time-windows");
        let out = CollectSink::new();
        job.source(
            "events",
            IterSource::new(move |shard, _| {
                let clock = Arc::clone(&source_clock);
                let end_clock = Arc::clone(&source_clock);
                let records: Box<dyn Iterator<Item = (String, i64)> + Send> = if shard == 0 {
                    Box::new(
                        (0..n)
                            .map(move |i| {
                                clock.set(7 * i);
                                (format!("k{}", i % 3), i)
                            })
                            .chain(std::iter::from_fn(move || {
                                end_clock.set(7 * n + 100);
                                None
                            })),
                    )
                } else {
                    Box::new(std::iter::empty())
                };
                records
            }),
        )
        .key_by("by-key", |e: &(String, i64)| e.0.clone())
        .window("tumbling", TumblingWindows::processing_time(100))
        .aggregate(Count::new(), |k: &String, w: TimeWindow, c: u64| (k.clone(), w.start(), c))
        .sink("out", out.clone());
        let mut config = config(p);
        // One record per read and per exchange batch: the source yields after each record and
        // the window stage takes it before the clock moves on.
        config.source_batch = 1;
        config.batch_len = 1;
        config.tick_interval_ms = 0;
        config.clock = clock;
        let mut report = run_with_timeout(job, config, Duration::from_secs(60)).unwrap();
        assert!(report.side_output(LATE).is_empty(), "nothing is late in processing time");
        let mut got: BTreeMap<(String, i64), u64> = BTreeMap::new();
        for ((k, start, c), _) in out.take() {
            assert!(got.insert((k, start), c).is_none(), "a window fired twice");
        }
        assert_eq!(got.values().sum::<u64>(), n as u64, "parallelism {p}: every record in exactly one window");
        if p == 1 {
            // The window stage reads the clock when it takes a record, a record or two after
            // the source set it: each record is in the window of that moment, so the windows
            // of the whole run fire one by one, not all at the end.
            let starts: std::collections::BTreeSet<i64> = got.keys().map(|(_, start)| *start).collect();
            assert!(starts.len() >= 60, "windows fired as the clock passed them: {starts:?}");
            assert!(starts.iter().all(|s| *s <= 7 * n + 100), "{starts:?}");
        }
    }
}

/// Shard 0 produces events; shard 1 has nothing for a long time (it is idle, not finished).
struct HalfIdle {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

struct HalfIdleReader {
    shard: usize,
    next: i64,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Source for HalfIdle {
    type Out = (String, i64);
    type Reader = HalfIdleReader;
    /// A split a shard (the test runs at parallelism 2); only split 0 has records.
    fn splits(&self) -> u32 {
        2
    }
    fn reader(&self, split: u32) -> weir::Result<HalfIdleReader> {
        Ok(HalfIdleReader { shard: split as usize, next: 0, stop: Arc::clone(&self.stop) })
    }
}

impl SourceReader for HalfIdleReader {
    type Out = (String, i64);
    fn read(
        &mut self,
        out: &mut Vec<(String, i64)>,
        _: &mut Vec<weir::source::DeadLetter>,
        _: usize,
    ) -> weir::Result<weir::source::ReadStatus> {
        if self.stop.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(weir::source::ReadStatus::End);
        }
        if self.shard == 0 && self.next < 50 {
            out.push(("k".into(), self.next * 1_000));
            self.next += 1;
            return Ok(weir::source::ReadStatus::More);
        }
        Ok(weir::source::ReadStatus::Idle)
    }
    fn offset(&self) -> u64 {
        self.next as u64
    }
    fn seek(&mut self, offset: u64) -> weir::Result<()> {
        self.next = offset as i64;
        Ok(())
    }
}

use std::sync::Arc;

#[test]
fn an_idle_source_does_not_stall_windows() {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let job = Job::new("idle");
    job.source_with_watermarks(
        "half-idle",
        HalfIdle { stop: Arc::clone(&stop) },
        WatermarkStrategy::monotonic().with_timestamp_assigner(|e: &(String, i64), _| e.1).with_idleness(100),
    )
    .key_by("by-key", |e: &(String, i64)| e.0.clone())
    .window("tumbling", TumblingWindows::event_time(10_000))
    .aggregate(Count::new(), |_: &String, w: TimeWindow, n: u64| (w.start(), n))
    .sink(
        "out",
        CallbackSink::new(move |v: (i64, u64), _, _| {
            let _ = tx.lock().map(|tx| tx.send(v));
        }),
    );
    let handle = job.run(config(2)).unwrap();
    // Windows complete while shard 1's source is still open: idleness took it out of event time.
    let first = rx.recv_timeout(Duration::from_secs(20)).expect("a window fired while a source was idle");
    assert_eq!(first, (0, 10));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    handle.wait().unwrap();
}

#[test]
fn a_slow_sink_under_backpressure_loses_nothing() {
    let job = Job::new("backpressure");
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen2 = Arc::clone(&seen);
    job.source("numbers", VecSource::new((0..20_000u64).collect()))
        .key_by("spread", |n: &u64| *n)
        .into_stream("records")
        .map("value", |k: Keyed<u64, u64>| k.value)
        .sink(
            "slow",
            CallbackSink::new(move |n: u64, _, _| {
                if n.is_multiple_of(2_000) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                seen2.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            }),
        );
    let mut cfg = config(4);
    cfg.channel_capacity = 1;
    cfg.batch_len = 8;
    run_with_timeout(job, cfg, Duration::from_secs(120)).unwrap();
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), (0..20_000u64).sum::<u64>());
}

#[test]
fn a_panic_in_a_user_function_names_operator_and_shard() {
    for p in [1, 2, 4] {
        let job = Job::new("panic");
        job.source("numbers", VecSource::new((0..10_000u64).collect()))
            .key_by("by-n", |n: &u64| *n % 100)
            .into_stream("keyed")
            .map("explode", |k: Keyed<u64, u64>| {
                assert!(k.value != 7_777, "boom at 7777");
                k.value
            })
            .sink("out", CollectSink::new());
        let err = run_with_timeout(job, config(p), Duration::from_secs(60)).unwrap_err();
        match err {
            RuntimeError::Panic { operator, shard, message } => {
                assert_eq!(operator, "explode");
                assert!(shard < p);
                assert!(message.contains("boom at 7777"), "{message}");
            }
            other => panic!("unexpected error {other}"),
        }
    }
}

#[test]
fn panics_in_a_key_selector_a_filter_and_a_sink_name_their_operator() {
    fn check(job: Job, expected: &str) {
        match run_with_timeout(job, config(2), Duration::from_secs(60)).unwrap_err() {
            RuntimeError::Panic { operator, message, .. } => {
                assert_eq!(operator, expected, "{message}");
                assert!(message.contains("boom"), "{message}");
            }
            other => panic!("unexpected error {other}"),
        }
    }
    let job = Job::new("panic-key");
    job.source("numbers", VecSource::new((0..1_000u64).collect()))
        .map("double", |n: u64| n * 2)
        .key_by("by-n", |n: &u64| {
            assert!(*n != 900, "boom in the key selector");
            *n % 10
        })
        .into_stream("keyed")
        .sink("out", CollectSink::new());
    check(job, "by-n");

    let job = Job::new("panic-filter");
    job.source("numbers", VecSource::new((0..1_000u64).collect()))
        .map("double", |n: u64| n * 2)
        .filter("odd-filter", |n: &u64| {
            assert!(*n != 900, "boom in the filter");
            true
        })
        .sink("out", CollectSink::new());
    check(job, "odd-filter");

    let job = Job::new("panic-sink");
    job.source("numbers", VecSource::new((0..1_000u64).collect()))
        .map("double", |n: u64| n * 2)
        .sink("exploding-sink", CallbackSink::new(|n: u64, _, _| assert!(n != 900, "boom in the sink")));
    check(job, "exploding-sink");
}

/// (key, event time, value): `n` records per side over `keys` keys, in time order with a
/// little disorder.
fn side(n: i64, keys: i64, seed: i64) -> Vec<(String, i64, i64)> {
    let mut v: Vec<(String, i64, i64)> =
        (0..n).map(|i| (format!("k{}", (i * 7 + seed) % keys), i * 37 + (i * seed) % 50, i * 1000 + seed)).collect();
    v.sort_by_key(|r| r.1);
    for chunk in v.chunks_mut(2) {
        chunk.reverse();
    }
    v
}

type Triple = (String, i64, i64);
type TripleTimestamps = fn(&Triple, Option<i64>) -> i64;

fn triple_time() -> WatermarkStrategy<weir::operators::time::BoundedOutOfOrderness, TripleTimestamps> {
    WatermarkStrategy::bounded_out_of_orderness(500).with_timestamp_assigner(|r: &Triple, _| r.1)
}

fn join_job(p: usize, interval: bool) -> Vec<(String, i64, i64)> {
    let (left, right) = (side(1500, 11, 3), side(1500, 11, 5));
    let job = Job::new("join");
    let out = CollectSink::new();
    let l = job
        .source_with_watermarks("left", VecSource::new(left), triple_time())
        .key_by("left-key", |r: &Triple| r.0.clone());
    let r = job
        .source_with_watermarks("right", VecSource::new(right), triple_time())
        .key_by("right-key", |r: &Triple| r.0.clone());
    let pair = |k: &String, a: &Triple, b: &Triple| (k.clone(), a.2, b.2);
    if interval {
        l.connect(r).interval_join("ij", -200, 300, pair).sink("out", out.clone());
    } else {
        l.connect(r).window_join("wj", 1_000, 1_000, pair).sink("out", out.clone());
    }
    let mut report = run_with_timeout(job, config(p), Duration::from_secs(60)).unwrap();
    assert!(report.side_output(LATE).is_empty());
    let mut got: Vec<_> = out.take().into_iter().map(|(t, _)| t).collect();
    got.sort();
    got
}

#[test]
fn window_and_interval_joins_equal_brute_force_at_every_parallelism() {
    let (left, right) = (side(1500, 11, 3), side(1500, 11, 5));
    let mut window_ref = Vec::new();
    let mut interval_ref = Vec::new();
    for a in &left {
        for b in &right {
            if a.0 != b.0 {
                continue;
            }
            if a.1.div_euclid(1_000) == b.1.div_euclid(1_000) {
                window_ref.push((a.0.clone(), a.2, b.2));
            }
            if b.1 >= a.1 - 200 && b.1 <= a.1 + 300 {
                interval_ref.push((a.0.clone(), a.2, b.2));
            }
        }
    }
    window_ref.sort();
    interval_ref.sort();
    assert!(!window_ref.is_empty() && !interval_ref.is_empty());
    for p in [1, 2, 4] {
        assert_eq!(join_job(p, false), window_ref, "window join, parallelism {p}");
        assert_eq!(join_job(p, true), interval_ref, "interval join, parallelism {p}");
    }
}

/// A co-process function counting each key's records of both inputs in shared keyed state,
/// reported by an event-time timer when the input ends.
struct BothCounts {
    counts: Option<ValueState<(u64, u64)>>,
}

impl BothCounts {
    fn bump(
        &self,
        ctx: &mut ProcessContext<'_, String, (String, u64, u64)>,
        first: bool,
    ) -> weir::operators::Result<()> {
        let state = self.counts.expect("opened");
        let (a, b) = ctx.value(&state)?.unwrap_or((0, 0));
        ctx.set(&state, &if first { (a + 1, b) } else { (a, b + 1) })?;
        ctx.register_event_timer(1_000_000_000)
    }
}

impl weir::operators::coprocess::KeyedCoProcessFunction for BothCounts {
    type Key = String;
    type In1 = Triple;
    type In2 = Triple;
    type Out = (String, u64, u64);
    fn open(&mut self, states: &mut StateRegistry<'_>) -> weir::operators::Result<()> {
        self.counts = Some(states.value("counts")?);
        Ok(())
    }
    fn process1(
        &mut self,
        _: Triple,
        ctx: &mut ProcessContext<'_, String, (String, u64, u64)>,
    ) -> weir::operators::Result<()> {
        self.bump(ctx, true)
    }
    fn process2(
        &mut self,
        _: Triple,
        ctx: &mut ProcessContext<'_, String, (String, u64, u64)>,
    ) -> weir::operators::Result<()> {
        self.bump(ctx, false)
    }
    fn on_timer(
        &mut self,
        _: i64,
        _: TimeDomain,
        ctx: &mut ProcessContext<'_, String, (String, u64, u64)>,
    ) -> weir::operators::Result<()> {
        let (a, b) = ctx.value(&self.counts.expect("opened"))?.unwrap_or((0, 0));
        let k = ctx.key().clone();
        ctx.output((k, a, b));
        Ok(())
    }
}

#[test]
fn connected_streams_share_keyed_state_and_timers() {
    let (left, right) = (side(1000, 7, 3), side(700, 7, 5));
    let mut expected: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for r in &left {
        expected.entry(r.0.clone()).or_default().0 += 1;
    }
    for r in &right {
        expected.entry(r.0.clone()).or_default().1 += 1;
    }
    for p in [1, 2, 4] {
        let job = Job::new("connect");
        let out = CollectSink::new();
        let l = job
            .source_with_watermarks("left", VecSource::new(left.clone()), triple_time())
            .key_by("lk", |r: &Triple| r.0.clone());
        let r = job
            .source_with_watermarks("right", VecSource::new(right.clone()), triple_time())
            .key_by("rk", |r: &Triple| r.0.clone());
        l.connect(r).process("both", || BothCounts { counts: None }).sink("out", out.clone());
        run_with_timeout(job, config(p), Duration::from_secs(60)).unwrap();
        let got: BTreeMap<String, (u64, u64)> = out.take().into_iter().map(|((k, a, b), _)| (k, (a, b))).collect();
        assert_eq!(got, expected, "parallelism {p}");
    }
}

#[test]
fn rebalance_and_broadcast_route_every_record() {
    for p in [1, 2, 4] {
        let job = Job::new("routes");
        let rebalanced = CollectSink::new();
        let broadcast = CollectSink::new();
        job.source("numbers", VecSource::new((0..1000u64).collect()))
            .rebalance("spread")
            .map("tag", |n: u64| n)
            .sink("rebalanced", rebalanced.clone());
        job.source("few", VecSource::new((0..10u64).collect()))
            .broadcast("everywhere")
            .sink("broadcast", broadcast.clone());
        let handle = job.run(config(p)).unwrap();
        let metrics_while_running = handle.metrics();
        let _ = metrics_while_running.uptime;
        handle.wait().unwrap();
        assert_eq!(rebalanced.take_sorted(), (0..1000u64).collect::<Vec<_>>(), "rebalance, parallelism {p}");
        let mut expected: Vec<u64> = (0..10u64).flat_map(|n| std::iter::repeat_n(n, p)).collect();
        expected.sort();
        assert_eq!(broadcast.take_sorted(), expected, "broadcast, parallelism {p}");
    }
}

#[test]
fn metrics_count_records_per_stage() {
    let job = Job::new("metrics");
    job.source("numbers", VecSource::new((0..5000u64).collect()))
        .key_by("by-n", |n: &u64| n % 10)
        .reduce("sum", |_: &u64| 0u64, |a: u64, n: u64| a + n)
        .sink("out", CollectSink::new());
    let handle = job.run(config(2)).unwrap();
    while handle.metrics().stages.iter().map(|s| s.1.records).sum::<u64>() < 10_000 {
        std::thread::sleep(Duration::from_millis(1));
        if handle.metrics().uptime > Duration::from_secs(30) {
            panic!("metrics never reached the input size");
        }
    }
    let m = handle.metrics();
    let by_stage: BTreeMap<&str, u64> = m.stages.iter().map(|(n, s)| (*n, s.records)).collect();
    assert_eq!(by_stage.get("numbers"), Some(&5000));
    assert_eq!(by_stage.get("sum"), Some(&5000));
    handle.wait().unwrap();
}

#[test]
fn a_job_reads_what_a_service_appends_to_its_ingest_logs() {
    use weir::source::IngestSource;
    use weir_state::ingest::IngestLog;
    let dir = tempfile::tempdir().unwrap();
    let logs: Vec<_> =
        (0..3).map(|i| IngestLog::open(&dir.path().join(format!("events-{i}.ingest"))).unwrap()).collect();
    let job = Job::new("ingest");
    let out = CollectSink::new();
    job.source(
        "events",
        IngestSource::new(logs.clone(), |bytes: &[u8]| {
            std::str::from_utf8(bytes).map_err(|e| e.to_string())?.parse::<u64>().map_err(|e| e.to_string())
        }),
    )
    .key_by("by-n", |n: &u64| *n % 7)
    .reduce("sum", |k: &u64| (*k, 0u64), |(k, a): (u64, u64), n: u64| (k, a + n))
    .sink("out", out.clone());
    let handle = job.run(config(2)).unwrap();
    // The service appends in batches, syncs each batch (group commit), then closes its logs.
    let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
    for batch in 0..20u64 {
        for i in 0..50u64 {
            let n = batch * 50 + i;
            logs[(n % 3) as usize].append(n.to_string().as_bytes()).unwrap();
            *expected.entry(n % 7).or_default() += n;
        }
        for log in &logs {
            log.sync().unwrap();
        }
    }
    logs[1].append(b"not a number").unwrap();
    for log in &logs {
        log.close().unwrap();
    }
    let report = handle.wait().unwrap();
    // Running sums only grow, so each key's largest is its final sum; one update per event.
    let updates = out.take();
    assert_eq!(updates.len(), 1000, "every durable event processed exactly once");
    let mut finals: BTreeMap<u64, u64> = BTreeMap::new();
    for ((k, sum), _) in updates {
        let e = finals.entry(k).or_default();
        *e = (*e).max(sum);
    }
    assert_eq!(finals, expected);
    assert_eq!(report.dead_letters.len(), 1);
    assert_eq!(report.dead_letters[0].raw, b"not a number");
}
