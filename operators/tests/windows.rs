//! The window operator through the harness: tumbling, sliding and session windows with
//! out-of-order input, allowed lateness, the late side output, snapshot/restore, count windows.

use std::collections::BTreeMap;

use weir_operators::harness::OperatorHarness;
use weir_operators::operator::Keyed;
use weir_operators::window::TimeWindow;
use weir_operators::window::assigner::{SessionWindows, SlidingWindows, TumblingWindows};
use weir_operators::window::lateness::AllowedLateness;
use weir_operators::window::operator::{Count, CountWindowOperator, LATE, Reduce, WindowOperator};

type Out = (String, i64, i64, u64);

#[allow(clippy::ptr_arg)] // the window function receives the key type itself
fn label(k: &String, w: TimeWindow, n: u64) -> Out {
    (k.to_string(), w.start(), w.end(), n)
}

fn rec(k: &str, v: u64) -> Keyed<String, u64> {
    Keyed { key: k.to_owned(), value: v }
}

#[test]
fn tumbling_counts_with_out_of_order_records_fire_once_at_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let op = WindowOperator::new("w", TumblingWindows::event_time(10), Count::new(), label, AllowedLateness::ZERO);
    let mut h = OperatorHarness::new(dir.path(), "w", op).unwrap();
    for (k, ts) in [("a", 3), ("b", 1), ("a", 12), ("a", 7), ("b", 9), ("a", 15)] {
        h.process(rec(k, 1), ts).unwrap();
    }
    h.watermark(9).unwrap();
    let mut out: Vec<_> = h.take_output();
    out.sort();
    assert_eq!(out, vec![(("a".into(), 0, 10, 2), 9), (("b".into(), 0, 10, 2), 9)]);
    h.process(rec("a", 1), 5).unwrap(); // late: window [0,10) is done and cleaned up
    assert_eq!(h.take_side_output(LATE).len(), 1);
    h.watermark(i64::MAX).unwrap();
    assert_eq!(h.take_output(), vec![(("a".into(), 10, 20, 2), 19)]);
    h.watermark(i64::MAX).unwrap();
    assert!(h.take_output().is_empty(), "no window fires twice");
}

#[test]
fn allowed_lateness_refires_with_updates_then_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let op =
        WindowOperator::new("w", TumblingWindows::event_time(10), Count::new(), label, AllowedLateness::from_ms(5));
    let mut h = OperatorHarness::new(dir.path(), "w", op).unwrap();
    h.process(rec("a", 1), 2).unwrap();
    h.watermark(10).unwrap();
    assert_eq!(h.take_output(), vec![(("a".into(), 0, 10, 1), 9)]);
    h.process(rec("a", 1), 4).unwrap(); // within lateness: late firing with the new count
    assert_eq!(h.take_output(), vec![(("a".into(), 0, 10, 2), 9)]);
    h.watermark(14).unwrap(); // cleanup at 9 + 5 = 14
    h.process(rec("a", 1), 4).unwrap();
    assert!(h.take_output().is_empty());
    assert_eq!(h.take_side_output(LATE).len(), 1);
}

#[test]
fn sliding_windows_match_a_brute_force_reference() {
    let dir = tempfile::tempdir().unwrap();
    let op = WindowOperator::new("w", SlidingWindows::event_time(10, 5), Count::new(), label, AllowedLateness::ZERO);
    let mut h = OperatorHarness::new(dir.path(), "w", op).unwrap();
    let stamps: Vec<i64> = (0..60).map(|i| (i * 37) % 50).collect();
    for ts in &stamps {
        h.process(rec("k", 1), *ts).unwrap();
    }
    h.watermark(i64::MAX).unwrap();
    let got: BTreeMap<(i64, i64), u64> = h.take_output().into_iter().map(|((_, s, e, n), _)| ((s, e), n)).collect();
    let mut expected = BTreeMap::new();
    for start in (-5..50).step_by(5) {
        let n = stamps.iter().filter(|&&t| t >= start && t < start + 10).count() as u64;
        if n > 0 {
            expected.insert((start, start + 10), n);
        }
    }
    assert_eq!(got, expected);
}

#[test]
fn session_windows_merge_and_survive_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let make = || {
        WindowOperator::new(
            "s",
            SessionWindows::event_time(10),
            Reduce::new(|a: u64, b: u64| a + b),
            |k: &String, w: TimeWindow, sum: u64| (k.clone(), w.start(), w.end(), sum),
            AllowedLateness::ZERO,
        )
    };
    let mut h = OperatorHarness::new(dir.path(), "s", make()).unwrap();
    h.process(rec("a", 1), 0).unwrap();
    h.process(rec("a", 2), 30).unwrap();
    let handle = h.snapshot().unwrap();
    let mut h = h.restore(&handle, make()).unwrap();
    h.process(rec("a", 4), 15).unwrap(); // bridges [0,10) and [30,40) with [15,25)? no: gap 10
    h.process(rec("a", 8), 22).unwrap(); // [22,32) touches [30,40) and [15,25): merge
    h.process(rec("b", 16), 5).unwrap();
    h.watermark(i64::MAX).unwrap();
    let mut out: Vec<Out> = h.take_output().into_iter().map(|(o, _)| o).collect();
    out.sort();
    assert_eq!(out, vec![("a".into(), 0, 10, 1), ("a".into(), 15, 40, 14), ("b".into(), 5, 15, 16)]);
}

#[test]
fn count_windows_fire_every_n_records_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let op = CountWindowOperator::new(3, Count::<u64>::new(), |k: &String, n: u64| (k.clone(), n));
    let mut h = OperatorHarness::new(dir.path(), "c", op).unwrap();
    for i in 0..8 {
        h.process(rec(if i % 2 == 0 { "x" } else { "y" }, 1), i).unwrap();
    }
    let out: Vec<(String, u64)> = h.take_output().into_iter().map(|(o, _)| o).collect();
    assert_eq!(out, vec![("x".into(), 3), ("y".into(), 3)]);
}

#[test]
fn processing_time_windows_fire_when_the_clock_passes_their_end() {
    let dir = tempfile::tempdir().unwrap();
    let op =
        WindowOperator::new("p", TumblingWindows::processing_time(100), Count::new(), label, AllowedLateness::ZERO);
    let mut h = OperatorHarness::new(dir.path(), "p", op).unwrap();
    // Event times are irrelevant: the processing clock assigns and fires windows.
    h.set_processing_time(10).unwrap();
    h.process(rec("a", 1), 999_999).unwrap();
    h.process(rec("b", 1), -5).unwrap();
    h.set_processing_time(60).unwrap();
    h.process(rec("a", 1), 0).unwrap();
    h.watermark(i64::MAX).unwrap();
    let early = h.take_output();
    assert!(early.is_empty(), "watermarks do not fire processing-time windows: {early:?}");
    h.set_processing_time(98).unwrap();
    assert!(h.take_output().is_empty());
    // During its last millisecond a window still takes records and has not fired: it fires
    // once the clock passes its end, once, with all of them (a firing at 99 would have been
    // followed by a second firing of the same window).
    h.set_processing_time(99).unwrap();
    h.process(rec("b", 1), 0).unwrap();
    assert!(h.take_output().is_empty());
    h.set_processing_time(100).unwrap();
    let mut out: Vec<Out> = h.take_output().into_iter().map(|(o, _)| o).collect();
    out.sort();
    assert_eq!(out, vec![("a".into(), 0, 100, 2), ("b".into(), 0, 100, 2)]);
    h.set_processing_time(150).unwrap();
    h.process(rec("a", 1), 0).unwrap();
    h.set_processing_time(250).unwrap();
    assert_eq!(h.take_output().into_iter().map(|(o, _)| o).collect::<Vec<Out>>(), vec![("a".into(), 100, 200, 1)]);
}
