//! Property tests for event time and windowing, each against a simple model:
//!
//! - sliding and tumbling assigners against a brute-force search over all windows;
//! - session merging ([`MergingWindowSet`]) against "sort the timestamps, split at pauses
//!   longer than the gap", for every insertion order, including where contents end up;
//! - the watermark valve against the minimum over its inputs, and its output's monotonicity;
//! - the merging window set's encoding: round trips, and never a panic on arbitrary bytes;
//! - watermark generators and idleness against their definitions.

use std::collections::BTreeMap;

use proptest::prelude::*;
use weir_operators::time::{
    BoundedOutOfOrderness, InputStatus, Monotonic, Timestamp, Watermark, WatermarkGenerator, WatermarkOutput,
    WatermarkStatus, WatermarkValve, WithIdleness,
};
use weir_operators::window::TimeWindow;
use weir_operators::window::assigner::{SlidingWindows, TumblingWindows, WindowAssigner};
use weir_operators::window::merging::MergingWindowSet;

// ---------------------------------------------------------------------------------------------
// Assigners
// ---------------------------------------------------------------------------------------------

/// Every window `[k * slide + offset, + size)` that contains `ts`, found by scanning a range of
/// `k` wide enough to hold all of them.
fn brute_force_sliding(ts: i64, size_ms: i64, slide_ms: i64, offset_ms: i64) -> Vec<TimeWindow> {
    let k_high = (ts - offset_ms).div_euclid(slide_ms) + 1;
    let k_low = (ts - size_ms - offset_ms).div_euclid(slide_ms) - 1;
    let mut windows: Vec<TimeWindow> = (k_low..=k_high)
        .map(|k| TimeWindow::new(k * slide_ms + offset_ms, k * slide_ms + offset_ms + size_ms))
        .filter(|window| window.contains(ts))
        .collect();
    windows.sort();
    windows
}

fn sliding_parameters() -> impl Strategy<Value = (i64, i64, i64)> {
    (1i64..=500, 1i64..=500)
        .prop_flat_map(|(size_ms, slide_ms)| (Just(size_ms), Just(slide_ms), (1 - slide_ms)..slide_ms))
}

proptest! {
    #[test]
    fn sliding_equals_brute_force(
        (size_ms, slide_ms, offset_ms) in sliding_parameters(),
        ts in -1_000_000_000_000i64..1_000_000_000_000,
    ) {
        let sliding = SlidingWindows::event_time(size_ms, slide_ms).with_offset(offset_ms);
        let mut windows = Vec::new();
        sliding.assign_windows(ts, 0, &mut windows);
        // Latest first, no duplicates.
        prop_assert!(windows.windows(2).all(|pair| pair[0].start() > pair[1].start()));
        windows.sort();
        prop_assert_eq!(windows, brute_force_sliding(ts, size_ms, slide_ms, offset_ms));
    }

    #[test]
    fn tumbling_is_sliding_with_slide_equal_to_size(
        size_ms in 1i64..10_000,
        offset_seed in any::<i64>(),
        ts in any::<i64>(),
    ) {
        let offset_ms = offset_seed % size_ms;
        let tumbling = TumblingWindows::event_time(size_ms).with_offset(offset_ms);
        let window = tumbling.window_for(ts);
        prop_assert!(window.contains(ts) || window.end() == i64::MAX, "{window:?} must hold {ts}");
        prop_assert!(window.end() - window.start() <= size_ms);
        let within_range = ts.checked_sub(size_ms).is_some() && ts.checked_add(size_ms).is_some();
        if within_range {
            prop_assert_eq!(window.end() - window.start(), size_ms);
            prop_assert_eq!((window.start() - offset_ms).rem_euclid(size_ms), 0);
            let mut sliding = Vec::new();
            SlidingWindows::event_time(size_ms, size_ms).with_offset(offset_ms).assign_windows(ts, 0, &mut sliding);
            prop_assert_eq!(sliding, vec![window]);
        }
    }

    #[test]
    fn sliding_never_panics_and_windows_are_valid(
        (size_ms, slide_ms, offset_ms) in sliding_parameters(),
        ts in prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX)],
    ) {
        let sliding = SlidingWindows::event_time(size_ms, slide_ms).with_offset(offset_ms);
        let mut windows = Vec::new();
        sliding.assign_windows(ts, 0, &mut windows);
        let expected_max = (size_ms as u64).div_ceil(slide_ms as u64) as usize;
        prop_assert!(windows.len() <= expected_max);
        for window in &windows {
            prop_assert!(window.start() < window.end());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Session merging
// ---------------------------------------------------------------------------------------------

/// Sessions by definition: sort the timestamps; a pause longer than `gap_ms` starts a new
/// session; a session spans `[first, last + gap_ms)`. Returns each session with its timestamps.
fn model_sessions(timestamps: &[i64], gap_ms: i64) -> Vec<(TimeWindow, Vec<i64>)> {
    let mut sorted = timestamps.to_vec();
    sorted.sort();
    let mut sessions: Vec<Vec<i64>> = Vec::new();
    for ts in sorted {
        match sessions.last_mut() {
            Some(session) if ts - session[session.len() - 1] <= gap_ms => session.push(ts),
            _ => sessions.push(vec![ts]),
        }
    }
    sessions
        .into_iter()
        .map(|session| (TimeWindow::new(session[0], session[session.len() - 1] + gap_ms), session))
        .collect()
}

/// Runs the records through a merging window set as the window operator would, moving
/// contents on every merge, and returns each actual window with the contents of its state
/// window.
fn run_sessions(timestamps: &[i64], gap_ms: i64) -> Result<Vec<(TimeWindow, Vec<i64>)>, TestCaseError> {
    let mut set = MergingWindowSet::new();
    let mut contents: BTreeMap<TimeWindow, Vec<i64>> = BTreeMap::new();
    for (i, &ts) in timestamps.iter().enumerate() {
        let added = set.add_window(TimeWindow::new(ts, ts + gap_ms));
        if let Some(merge) = &added.merge {
            prop_assert_eq!(merge.result, added.window);
            prop_assert_eq!(merge.state_window, added.state_window);
            prop_assert!(!merge.merged_windows.is_empty());
            for merged in &merge.merged_state_windows {
                prop_assert!(*merged != merge.state_window);
                let moved = contents.remove(merged).unwrap_or_default();
                contents.entry(merge.state_window).or_default().extend(moved);
            }
        }
        prop_assert!(added.window.contains(ts));
        prop_assert_eq!(set.state_window(&added.window), Some(added.state_window));
        contents.entry(added.state_window).or_default().push(ts);

        // After every insertion, the windows are the model's for the records so far.
        let windows: Vec<TimeWindow> = set.iter().map(|(window, _)| window).collect();
        let expected: Vec<TimeWindow> =
            model_sessions(&timestamps[..=i], gap_ms).into_iter().map(|(window, _)| window).collect();
        prop_assert_eq!(windows, expected);
    }
    let mut result = Vec::new();
    for (window, state_window) in set.iter() {
        let mut held = contents.remove(&state_window).unwrap_or_default();
        held.sort();
        result.push((window, held));
    }
    prop_assert!(contents.values().all(Vec::is_empty), "contents left in no window: {contents:?}");
    Ok(result)
}

proptest! {
    #[test]
    fn session_merging_equals_the_model(
        gap_ms in 1i64..40,
        timestamps in prop::collection::vec(-200i64..200, 1..40),
    ) {
        let sessions = run_sessions(&timestamps, gap_ms)?;
        prop_assert_eq!(sessions, model_sessions(&timestamps, gap_ms));
    }

    #[test]
    fn session_merging_is_independent_of_insertion_order(
        gap_ms in 1i64..40,
        (timestamps, shuffled) in prop::collection::vec(-200i64..200, 1..40)
            .prop_flat_map(|timestamps| (Just(timestamps.clone()), Just(timestamps).prop_shuffle())),
    ) {
        prop_assert_eq!(run_sessions(&timestamps, gap_ms)?, run_sessions(&shuffled, gap_ms)?);
    }
}

// ---------------------------------------------------------------------------------------------
// Merging window set encoding
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum SetOp {
    Add { start: i64, len: i64 },
    RetireNth(usize),
}

fn set_ops() -> impl Strategy<Value = Vec<SetOp>> {
    let op = prop_oneof![
        4 => (-1_000i64..1_000, 1i64..100).prop_map(|(start, len)| SetOp::Add { start, len }),
        1 => any::<usize>().prop_map(SetOp::RetireNth),
        1 => (prop_oneof![Just(i64::MIN), Just(i64::MAX - 50)], 1i64..50)
            .prop_map(|(start, len)| SetOp::Add { start, len }),
    ];
    prop::collection::vec(op, 0..40)
}

fn build_set(ops: &[SetOp]) -> MergingWindowSet {
    let mut set = MergingWindowSet::new();
    for op in ops {
        match *op {
            SetOp::Add { start, len } => {
                set.add_window(TimeWindow::new(start, start.saturating_add(len)));
            }
            SetOp::RetireNth(n) => {
                if !set.is_empty() {
                    let nth = set.iter().nth(n % set.len()).map(|(window, _)| window);
                    if let Some(window) = nth {
                        set.retire_window(&window);
                    }
                }
            }
        }
    }
    set
}

proptest! {
    #[test]
    fn merging_window_set_round_trips(ops in set_ops()) {
        let set = build_set(&ops);
        let bytes = set.to_bytes();
        prop_assert_eq!(bytes.len(), set.encoded_len());
        prop_assert_eq!(MergingWindowSet::from_bytes(&bytes), Ok(set));
    }

    #[test]
    fn from_bytes_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        // Whatever it decodes must be canonical: encoding it again gives the same bytes.
        if let Ok(set) = MergingWindowSet::from_bytes(&bytes) {
            prop_assert_eq!(set.to_bytes(), bytes);
        }
    }

    #[test]
    fn from_bytes_never_panics_on_damaged_encodings(
        ops in set_ops(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cut in any::<Option<usize>>(),
    ) {
        let mut bytes = build_set(&ops).to_bytes();
        for (at, mask) in flips {
            let at = at % bytes.len();
            bytes[at] ^= mask;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        if let Ok(set) = MergingWindowSet::from_bytes(&bytes) {
            prop_assert_eq!(set.to_bytes(), bytes);
            // A decoded set still merges correctly: windows stay separated.
            let windows: Vec<TimeWindow> = set.iter().map(|(window, _)| window).collect();
            prop_assert!(windows.windows(2).all(|pair| pair[0].end() < pair[1].start()));
            prop_assert!(set.iter().all(|(window, state)| window.covers(&state)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Watermark valve
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum ValveOp {
    Watermark(usize, i64),
    Idle(usize),
    Active(usize),
    End(usize),
}

fn valve_ops(inputs: usize, with_status: bool) -> impl Strategy<Value = Vec<ValveOp>> {
    let watermark = (0..inputs, -50i64..200).prop_map(|(input, ts)| ValveOp::Watermark(input, ts));
    let end = (0..inputs).prop_map(ValveOp::End);
    let op = if with_status {
        prop_oneof![
            6 => watermark,
            2 => (0..inputs).prop_map(ValveOp::Idle),
            2 => (0..inputs).prop_map(ValveOp::Active),
            1 => end,
        ]
        .boxed()
    } else {
        prop_oneof![8 => watermark, 1 => end].boxed()
    };
    prop::collection::vec(op, 0..60)
}

fn apply(valve: &mut WatermarkValve, op: &ValveOp) -> weir_operators::time::WatermarkUpdate {
    match *op {
        ValveOp::Watermark(input, ts) => valve.on_watermark(input, Watermark(ts)),
        ValveOp::Idle(input) => valve.on_idle(input),
        ValveOp::Active(input) => valve.on_active(input),
        ValveOp::End(input) => valve.on_end_of_input(input),
    }
}

proptest! {
    #[test]
    fn valve_without_idleness_is_the_minimum_over_inputs(
        (inputs, ops) in (1usize..5).prop_flat_map(|inputs| (Just(inputs), valve_ops(inputs, false))),
    ) {
        let mut valve = WatermarkValve::new(inputs);
        let mut model = vec![Watermark::MIN; inputs];
        for op in &ops {
            let before = valve.current_watermark();
            let update = apply(&mut valve, op);
            match *op {
                ValveOp::Watermark(input, ts) => model[input] = model[input].max(Watermark(ts)),
                ValveOp::End(input) => model[input] = Watermark::MAX,
                _ => unreachable!("no status changes in this test"),
            }
            let expected = model.iter().copied().min().unwrap_or(Watermark::MAX);
            prop_assert_eq!(valve.current_watermark(), expected);
            prop_assert_eq!(update.watermark, (expected > before).then_some(expected));
            prop_assert_eq!(update.status, None);
        }
    }

    #[test]
    fn valve_with_idleness_is_monotone_and_follows_active_inputs(
        (inputs, ops) in (1usize..5).prop_flat_map(|inputs| (Just(inputs), valve_ops(inputs, true))),
    ) {
        let mut valve = WatermarkValve::new(inputs);
        let mut highest_seen = Watermark::MIN;
        let mut reported_idle = false;
        for op in &ops {
            let before = valve.current_watermark();
            let update = apply(&mut valve, op);
            if let ValveOp::Watermark(_, ts) = *op {
                highest_seen = highest_seen.max(Watermark(ts));
            }
            let now = valve.current_watermark();
            // Monotone, and emitted exactly when it advances.
            prop_assert!(now >= before);
            prop_assert_eq!(update.watermark, (now > before).then_some(now));
            // Status changes are reported exactly when they happen.
            if let Some(status) = update.status {
                prop_assert_eq!(status == WatermarkStatus::Idle, !reported_idle);
                reported_idle = status == WatermarkStatus::Idle;
            }
            prop_assert_eq!(reported_idle, valve.is_idle());

            let statuses: Vec<InputStatus> = (0..inputs).map(|i| valve.input_status(i)).collect();
            let active: Vec<Watermark> =
                (0..inputs).filter(|&i| statuses[i] == InputStatus::Active).map(|i| valve.input_watermark(i)).collect();
            let any_idle = statuses.contains(&InputStatus::Idle);
            prop_assert_eq!(valve.is_idle(), active.is_empty() && any_idle);
            if statuses.iter().all(|status| *status == InputStatus::Ended) {
                prop_assert_eq!(now, Watermark::MAX);
            } else {
                // Never invents progress no input reported.
                prop_assert!(now <= highest_seen);
            }
            // When every active input has caught up with the output, the output is their minimum.
            if !active.is_empty() && active.iter().all(|&w| w >= now) {
                prop_assert_eq!(Some(now), active.iter().copied().min());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generators and idleness
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn bounded_out_of_orderness_is_max_minus_delay_minus_one(
        max_delay_ms in 0i64..1_000,
        batches in prop::collection::vec(prop::collection::vec(-10_000i64..10_000, 0..10), 1..10),
    ) {
        let mut generator = BoundedOutOfOrderness::new(max_delay_ms);
        let mut out = WatermarkOutput::new();
        let mut max_seen: Option<i64> = None;
        let mut previous = out.current_watermark();
        for batch in batches {
            for ts in batch {
                WatermarkGenerator::<()>::on_event(&mut generator, &(), ts, &mut out);
                max_seen = Some(max_seen.map_or(ts, |max| max.max(ts)));
            }
            WatermarkGenerator::<()>::on_periodic_emit(&mut generator, 0, &mut out);
            let expected = max_seen.map_or(Watermark::MIN, |max| Watermark(max - max_delay_ms - 1));
            prop_assert_eq!(out.current_watermark(), expected);
            prop_assert!(out.current_watermark() >= previous);
            previous = out.current_watermark();
        }
    }

    #[test]
    fn idleness_never_fires_before_the_timeout(
        idle_timeout_ms in 1i64..500,
        steps in prop::collection::vec((0i64..300, any::<bool>()), 1..60),
    ) {
        // Each step advances processing time, then either a record arrives or a periodic call
        // happens.
        let mut generator = WithIdleness::new(Monotonic::new(), idle_timeout_ms);
        let mut out = WatermarkOutput::new();
        let mut now_ms: Timestamp = 0;
        let mut last_record_ms: Timestamp = 0;
        let mut quiet_checks_since_record = 0;
        for (advance_ms, is_record) in steps {
            now_ms += advance_ms;
            if is_record {
                WatermarkGenerator::<()>::on_event(&mut generator, &(), now_ms, &mut out);
                prop_assert!(!out.is_idle(), "a record makes the output active");
                last_record_ms = now_ms;
                quiet_checks_since_record = 0;
            } else {
                WatermarkGenerator::<()>::on_periodic_emit(&mut generator, now_ms, &mut out);
                quiet_checks_since_record += 1;
                if out.is_idle() {
                    prop_assert!(now_ms - last_record_ms > idle_timeout_ms);
                    prop_assert!(quiet_checks_since_record >= 2);
                }
            }
        }
    }
}
