//! Allowed lateness: how long a window outlives its end, and which records are too late.
//!
//! An event-time window is complete when the watermark reaches its `max_timestamp`, and its
//! trigger fires then. With an allowed lateness of `L` ms, the window's contents are kept until
//! the watermark reaches its *cleanup time*, `max_timestamp + L`:
//!
//! - a record for the window that arrives while `max_timestamp <= watermark < cleanup time` is
//!   still added, and the [`EventTimeTrigger`](crate::window::trigger::EventTimeTrigger) fires
//!   the window again at once (a *late firing*, with the updated contents);
//! - once `cleanup time <= watermark`, the window is *late*: its state is cleared (by a timer at
//!   the cleanup time) and records for it are not added any more.
//!
//! A record is sent to the late-data side output when **every** window it was assigned to is
//! late ([`is_dropped_as_late`]): it would change nothing. A record with at least one live
//! window is processed for those windows only. This is Flink's `WindowOperator` rule, with one
//! difference: Flink sends such a record to the side output only if its own timestamp is also
//! late (`timestamp + L <= watermark`) and otherwise drops it silently. For the built-in
//! assigners every window contains the record's timestamp, so the two rules agree; for a custom
//! assigner whose windows do not, weir still never drops a record silently.
//!
//! These rules are for event-time windows. Processing-time windows are never late (their
//! cleanup time is their `max_timestamp` and lateness does not apply), and neither are global
//! windows; the operator asks [`WindowAssigner::is_event_time`](crate::window::assigner::WindowAssigner::is_event_time)
//! before applying them.
//!
//! ```
//! use weir_operators::time::Watermark;
//! use weir_operators::window::TimeWindow;
//! use weir_operators::window::lateness::{AllowedLateness, cleanup_time, is_window_late};
//!
//! let window = TimeWindow::new(0, 10); // max_timestamp 9
//! let lateness = AllowedLateness::from_ms(5);
//! assert_eq!(cleanup_time(&window, lateness), 14);
//! assert!(!is_window_late(&window, Watermark(13), lateness)); // late firing still possible
//! assert!(is_window_late(&window, Watermark(14), lateness));
//! ```

use crate::time::{ParameterError, Timestamp, Watermark, check_not_negative};
use crate::window::Window;

/// How long, in event time, a window's state is kept after the window completes. Never
/// negative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowedLateness(i64);

impl AllowedLateness {
    /// No lateness: a window is dropped as soon as it completes.
    pub const ZERO: AllowedLateness = AllowedLateness(0);

    /// An allowed lateness of `lateness_ms`.
    ///
    /// # Panics
    /// If `lateness_ms` is negative; see [`AllowedLateness::try_from_ms`].
    pub fn from_ms(lateness_ms: i64) -> Self {
        match Self::try_from_ms(lateness_ms) {
            Ok(lateness) => lateness,
            Err(error) => panic!("{error}"),
        }
    }

    /// An allowed lateness of `lateness_ms`, or an error if it is negative.
    pub fn try_from_ms(lateness_ms: i64) -> Result<Self, ParameterError> {
        check_not_negative("allowed_lateness_ms", lateness_ms).map(AllowedLateness)
    }

    /// The lateness in milliseconds.
    pub const fn ms(self) -> i64 {
        self.0
    }
}

/// The event time at which `window`'s state is dropped: `max_timestamp + lateness`, saturating
/// at [`Timestamp::MAX`] (so a global window is cleaned up only at the end of input).
pub fn cleanup_time<W: Window>(window: &W, lateness: AllowedLateness) -> Timestamp {
    window.max_timestamp().saturating_add(lateness.ms())
}

/// Whether `window` is past its cleanup time at `watermark`: its state is gone or going, and
/// records for it are not added any more.
pub fn is_window_late<W: Window>(window: &W, watermark: Watermark, lateness: AllowedLateness) -> bool {
    watermark.has_passed(cleanup_time(window, lateness))
}

/// Whether a record's own timestamp is beyond the allowed lateness at `watermark`
/// (`timestamp + lateness <= watermark`).
pub fn is_element_late(timestamp: Timestamp, watermark: Watermark, lateness: AllowedLateness) -> bool {
    watermark.has_passed(timestamp.saturating_add(lateness.ms()))
}

/// Whether a record assigned to `windows` goes to the late-data side output: it was assigned at
/// least one window and all of them are late. (A record assigned no window, such as one in the
/// gap between hopping windows, is not late; it belongs nowhere.)
///
/// For a merging assigner, pass the windows after merging, as the operator sees them.
pub fn is_dropped_as_late<W: Window>(windows: &[W], watermark: Watermark, lateness: AllowedLateness) -> bool {
    !windows.is_empty() && windows.iter().all(|window| is_window_late(window, watermark, lateness))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::assigner::{SlidingWindows, TumblingWindows, WindowAssigner};
    use crate::window::trigger::{EventTimeTrigger, Trigger, TriggerContext, TriggerResult};
    use crate::window::{GlobalWindow, TimeWindow};

    #[test]
    fn cleanup_time_adds_lateness_and_saturates() {
        let window = TimeWindow::new(0, 10);
        assert_eq!(cleanup_time(&window, AllowedLateness::ZERO), 9);
        assert_eq!(cleanup_time(&window, AllowedLateness::from_ms(100)), 109);
        assert_eq!(cleanup_time(&window, AllowedLateness::from_ms(i64::MAX)), i64::MAX);
        assert_eq!(cleanup_time(&GlobalWindow, AllowedLateness::from_ms(1)), i64::MAX);
    }

    #[test]
    fn window_is_late_from_its_cleanup_time_on() {
        let window = TimeWindow::new(0, 10);
        let zero = AllowedLateness::ZERO;
        assert!(!is_window_late(&window, Watermark(8), zero));
        assert!(is_window_late(&window, Watermark(9), zero), "complete with no lateness: late");
        let lateness = AllowedLateness::from_ms(3);
        assert!(!is_window_late(&window, Watermark(11), lateness));
        assert!(is_window_late(&window, Watermark(12), lateness));
        assert!(!is_window_late(&GlobalWindow, Watermark(i64::MAX - 1), lateness));
    }

    #[test]
    fn element_lateness() {
        let lateness = AllowedLateness::from_ms(5);
        assert!(!is_element_late(10, Watermark(14), lateness));
        assert!(is_element_late(10, Watermark(15), lateness));
        assert!(!is_element_late(i64::MAX, Watermark(i64::MAX - 1), lateness));
        assert!(is_element_late(i64::MIN, Watermark::MIN, AllowedLateness::ZERO));
    }

    #[test]
    fn side_output_only_when_every_window_is_late() {
        let sliding = SlidingWindows::event_time(10, 5);
        let mut windows = Vec::new();
        sliding.assign_windows(7, 0, &mut windows); // [5, 15) and [0, 10)
        let zero = AllowedLateness::ZERO;
        assert!(!is_dropped_as_late(&windows, Watermark(9), zero), "[5, 15) is still open");
        assert!(!is_dropped_as_late(&windows, Watermark(13), zero));
        assert!(is_dropped_as_late(&windows, Watermark(14), zero));
        assert!(!is_dropped_as_late(&windows, Watermark(14), AllowedLateness::from_ms(1)));
        assert!(!is_dropped_as_late::<TimeWindow>(&[], Watermark::MAX, zero), "no window: not late");
    }

    #[test]
    fn records_within_lateness_cause_a_late_firing() {
        let tumbling = TumblingWindows::event_time(10);
        let lateness = AllowedLateness::from_ms(5);
        let watermark = Watermark(12); // [0, 10) completed at 9, cleaned up at 14
        let mut windows = Vec::new();
        tumbling.assign_windows(3, 0, &mut windows);
        assert!(!is_dropped_as_late(&windows, watermark, lateness));
        let mut ctx = TriggerContext::new(watermark, 0);
        let result = EventTimeTrigger.on_element(&(), 3, &windows[0], &mut (), &mut ctx);
        assert_eq!(result, TriggerResult::FIRE, "late firing");
        // Past cleanup, the same record goes to the side output.
        assert!(is_dropped_as_late(&windows, Watermark(14), lateness));
        assert!(is_element_late(3, Watermark(14), lateness));
    }

    #[test]
    fn lateness_cannot_be_negative() {
        assert!(AllowedLateness::try_from_ms(-1).is_err());
        assert_eq!(AllowedLateness::try_from_ms(7).map(AllowedLateness::ms), Ok(7));
    }

    #[test]
    #[should_panic(expected = "allowed_lateness_ms must not be negative")]
    fn negative_lateness_panics() {
        let _ = AllowedLateness::from_ms(-1);
    }
}
