//! Windows: which windows a record belongs to, when a window fires, and when it is too late.
//!
//! This module is the pure logic under the window operator: no state store, no threads, no
//! clock. The operator asks it questions and persists the answers.
//!
//! # Windows
//!
//! A [`TimeWindow`] is a half-open interval of time `[start, end)`: it contains the timestamps
//! `start..=end - 1`, and its [`max_timestamp`](Window::max_timestamp) is `end - 1`. An
//! event-time window is complete once the watermark reaches `max_timestamp`, since no record
//! inside it can arrive after that. A [`GlobalWindow`] contains all of time; it fires only when
//! a trigger such as a count says so.
//!
//! # Assigners
//!
//! A [`WindowAssigner`](assigner::WindowAssigner) maps a record's time to its windows:
//!
//! - [`TumblingWindows`](assigner::TumblingWindows): back-to-back windows of `size_ms`,
//!   aligned to the epoch plus `offset_ms`; each record is in exactly one.
//! - [`SlidingWindows`](assigner::SlidingWindows): windows of `size_ms` starting every
//!   `slide_ms`; a record is in every window that contains it (about `size_ms / slide_ms`).
//! - [`SessionWindows`](assigner::SessionWindows): each record starts the window
//!   `[ts, ts + gap_ms)`, and windows that overlap or touch merge into one session, kept by a
//!   [`MergingWindowSet`](merging::MergingWindowSet).
//! - [`GlobalWindows`](assigner::GlobalWindows): one window for everything.
//!
//! The time-based assigners work on event time or on processing time; which one is a field of
//! the assigner, not a separate type.
//!
//! ```
//! use weir_operators::window::TimeWindow;
//! use weir_operators::window::assigner::{SlidingWindows, TumblingWindows, WindowAssigner};
//!
//! let mut windows = Vec::new();
//! // One-minute windows shifted by 15 s: [15 s, 75 s) contains 20 s.
//! TumblingWindows::event_time(60_000).with_offset(15_000).assign_windows(20_000, 0, &mut windows);
//! assert_eq!(windows, [TimeWindow::new(15_000, 75_000)]);
//!
//! windows.clear();
//! SlidingWindows::event_time(10, 5).assign_windows(12, 0, &mut windows);
//! assert_eq!(windows, [TimeWindow::new(10, 20), TimeWindow::new(5, 15)]);
//! ```
//!
//! # Triggers
//!
//! A [`Trigger`](trigger::Trigger) decides, per window, when to emit the window's contents
//! ([`fire`](trigger::TriggerResult::fire)) and when to drop them
//! ([`purge`](trigger::TriggerResult::purge)). Triggers are pure: their per-window state (a
//! count, say) is passed in and out explicitly, and the timers they want are returned as
//! [`TimerRequest`](trigger::TimerRequest)s for the operator to persist and call back.
//! [`EventTimeTrigger`](trigger::EventTimeTrigger) fires when the watermark passes the window's
//! end and is the default for event-time assigners;
//! [`ProcessingTimeTrigger`](trigger::ProcessingTimeTrigger) does the same on the processing
//! clock; [`CountTrigger`](trigger::CountTrigger) fires every `n` records and is usually
//! wrapped in [`Purging`](trigger::Purging) on global windows; [`NeverTrigger`](trigger::NeverTrigger)
//! is the default for global windows.
//!
//! # Lateness
//!
//! A window's state is kept until its [`cleanup_time`](lateness::cleanup_time):
//! `max_timestamp + allowed_lateness_ms`. A record that arrives after the watermark passed a
//! window's end but before its cleanup time is added and fires the window again (a *late
//! firing*). A record all of whose windows are past cleanup goes to the late side output
//! ([`is_dropped_as_late`](lateness::is_dropped_as_late)); nothing is dropped silently.

pub mod assigner;
pub mod lateness;
pub mod merging;
pub mod operator;
pub mod trigger;

use std::fmt::Debug;
use std::hash::Hash;

use crate::time::Timestamp;

/// A window: a set of timestamps whose records are grouped and emitted together.
///
/// Windows are plain values, ordered (so they can key a `BTreeMap` and be persisted in a stable
/// order) and hashable.
pub trait Window: Clone + Debug + Eq + Ord + Hash {
    /// The largest timestamp that belongs to the window. An event-time window is complete once
    /// the watermark reaches it.
    fn max_timestamp(&self) -> Timestamp;
}

/// The window `[start, end)` of event or processing time, in milliseconds.
///
/// Invariant: `start < end`, so a window is never empty. Windows order by start, then end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeWindow {
    start: Timestamp,
    end: Timestamp,
}

impl TimeWindow {
    /// The window `[start, end)`.
    ///
    /// # Panics
    /// If `start >= end`; see [`TimeWindow::try_new`].
    pub fn new(start: Timestamp, end: Timestamp) -> Self {
        match Self::try_new(start, end) {
            Some(window) => window,
            None => panic!("a time window needs start < end, got [{start}, {end})"),
        }
    }

    /// The window `[start, end)`, or `None` if `start >= end`.
    pub const fn try_new(start: Timestamp, end: Timestamp) -> Option<Self> {
        if start < end { Some(TimeWindow { start, end }) } else { None }
    }

    /// The window `[start, start + size)` computed without overflow, saturating at the ends of
    /// time: a start below [`Timestamp::MIN`] is raised to it, an end above [`Timestamp::MAX`]
    /// is lowered to it, and a window that would then be empty (a start of `Timestamp::MAX`)
    /// becomes `[MAX - 1, MAX)`. Only timestamps within one window of the ends of `i64` are
    /// affected.
    pub(crate) fn saturating(start: i128, size_ms: i64) -> Self {
        let lowest = i128::from(Timestamp::MIN);
        let highest = i128::from(Timestamp::MAX);
        let clamped_start = start.clamp(lowest, highest - 1);
        let clamped_end = (start + i128::from(size_ms)).clamp(clamped_start + 1, highest);
        // Both values are inside the i64 range by the clamps above.
        TimeWindow { start: clamped_start as Timestamp, end: clamped_end as Timestamp }
    }

    /// The first timestamp in the window.
    pub const fn start(&self) -> Timestamp {
        self.start
    }

    /// The first timestamp after the window (exclusive end).
    pub const fn end(&self) -> Timestamp {
        self.end
    }

    /// Whether `timestamp` lies in the window.
    pub const fn contains(&self, timestamp: Timestamp) -> bool {
        self.start <= timestamp && timestamp < self.end
    }

    /// Whether the two windows share at least one timestamp.
    pub const fn overlaps(&self, other: &TimeWindow) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Whether the two windows overlap or touch end to start (`[0, 5)` and `[5, 10)`): the
    /// condition under which session windows merge. Flink calls this `intersects`.
    pub const fn overlaps_or_adjoins(&self, other: &TimeWindow) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// The smallest window that covers both windows.
    pub fn cover(&self, other: &TimeWindow) -> TimeWindow {
        TimeWindow { start: self.start.min(other.start), end: self.end.max(other.end) }
    }

    /// Whether `other` lies entirely inside this window.
    pub const fn covers(&self, other: &TimeWindow) -> bool {
        self.start <= other.start && other.end <= self.end
    }
}

impl Window for TimeWindow {
    fn max_timestamp(&self) -> Timestamp {
        // start < end, so end > MIN and this cannot overflow.
        self.end - 1
    }
}

/// The single window that holds every record of a key, for as long as the job runs.
///
/// Its `max_timestamp` is [`Timestamp::MAX`]: it completes only at the end of input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GlobalWindow;

impl Window for GlobalWindow {
    fn max_timestamp(&self) -> Timestamp {
        Timestamp::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_window_basics() {
        let window = TimeWindow::new(10, 20);
        assert_eq!((window.start(), window.end(), window.max_timestamp()), (10, 20, 19));
        assert!(window.contains(10) && window.contains(19));
        assert!(!window.contains(9) && !window.contains(20));
        assert_eq!(TimeWindow::try_new(5, 5), None);
        assert_eq!(TimeWindow::try_new(6, 5), None);
    }

    #[test]
    #[should_panic(expected = "start < end")]
    fn empty_time_window_panics() {
        let _ = TimeWindow::new(3, 3);
    }

    #[test]
    fn overlap_adjoin_cover() {
        let a = TimeWindow::new(0, 5);
        let b = TimeWindow::new(5, 10);
        let c = TimeWindow::new(4, 6);
        let d = TimeWindow::new(11, 12);
        assert!(!a.overlaps(&b) && a.overlaps_or_adjoins(&b) && b.overlaps_or_adjoins(&a));
        assert!(a.overlaps(&c) && c.overlaps(&b));
        assert!(!b.overlaps_or_adjoins(&d));
        assert_eq!(a.cover(&d), TimeWindow::new(0, 12));
        assert!(TimeWindow::new(0, 12).covers(&c) && !c.covers(&a));
    }

    #[test]
    fn windows_order_by_start_then_end() {
        let mut windows = vec![TimeWindow::new(5, 9), TimeWindow::new(0, 10), TimeWindow::new(0, 3)];
        windows.sort();
        assert_eq!(windows, [TimeWindow::new(0, 3), TimeWindow::new(0, 10), TimeWindow::new(5, 9)]);
    }

    #[test]
    fn saturating_windows_stay_valid_at_the_ends_of_time() {
        let max = i128::from(i64::MAX);
        let min = i128::from(i64::MIN);
        assert_eq!(TimeWindow::saturating(0, 10), TimeWindow::new(0, 10));
        assert_eq!(TimeWindow::saturating(max - 3, 10), TimeWindow::new(i64::MAX - 3, i64::MAX));
        assert_eq!(TimeWindow::saturating(max, 10), TimeWindow::new(i64::MAX - 1, i64::MAX));
        assert_eq!(TimeWindow::saturating(min - 3, 10), TimeWindow::new(i64::MIN, i64::MIN + 7));
    }

    #[test]
    fn global_window_never_completes_before_the_end() {
        assert_eq!(GlobalWindow.max_timestamp(), i64::MAX);
    }
}
