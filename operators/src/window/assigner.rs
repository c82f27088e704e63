//! Window assigners: the windows a record belongs to.
//!
//! Time-based windows are aligned to the epoch shifted by an optional `offset_ms`: a tumbling
//! window of size `s` and offset `o` starts at every `k * s + o`. Offsets let hourly windows
//! start at a quarter past, or daily windows follow a time zone (`offset_ms` of `-8 h` for
//! UTC+8, as in Flink). The start of the window that holds `ts` is
//! `ts - (ts - o).rem_euclid(s)`: the Euclidean remainder makes negative timestamps (before
//! 1970) fall into the window below them, never the one above, which is Flink's
//! `TimeWindow.getWindowStartWithOffset` semantics.
//!
//! All arithmetic is done in `i128`, so no timestamp overflows; a window that would reach past
//! the ends of `i64` is cut off there (see the window module).
//!
//! An assigner's [`time domain`](TimeDomain) says which time it reads: the record's event
//! timestamp or the processing time at which the operator sees it. The operator passes both
//! and the assigner picks.

use crate::time::{ParameterError, TimeDomain, Timestamp, check_positive};
use crate::window::{GlobalWindow, TimeWindow, Window};

/// The most windows one record may be assigned to by [`SlidingWindows`]; a larger
/// `size_ms / slide_ms` is rejected when the assigner is built, so that per-record work and
/// memory stay bounded.
pub const MAX_WINDOWS_PER_RECORD: u64 = 1 << 20;

/// Maps a record to the windows it belongs to.
pub trait WindowAssigner {
    /// The kind of window this assigner produces.
    type Window: Window;

    /// Appends to `out` the windows of a record with event time `event_timestamp` that the
    /// operator sees at processing time `processing_time_ms`. Does not clear `out`.
    fn assign_windows(&self, event_timestamp: Timestamp, processing_time_ms: Timestamp, out: &mut Vec<Self::Window>);

    /// Whether windows complete by event time (watermarks). If so, lateness applies; if not,
    /// records are never late.
    fn is_event_time(&self) -> bool;

    /// Whether windows merge after assignment (sessions). A merging assigner's windows must be
    /// kept in a [`MergingWindowSet`](crate::window::merging::MergingWindowSet).
    fn is_merging(&self) -> bool;
}

/// The time an assigner over `domain` reads: the record's event timestamp or the processing time.
const fn time_in(domain: TimeDomain, event_timestamp: Timestamp, processing_time_ms: Timestamp) -> Timestamp {
    match domain {
        TimeDomain::EventTime => event_timestamp,
        TimeDomain::ProcessingTime => processing_time_ms,
    }
}

/// The start of the window of size `size_ms` and offset `offset_ms` that contains `timestamp`.
fn window_start(timestamp: Timestamp, offset_ms: i64, size_ms: i64) -> i128 {
    let timestamp = i128::from(timestamp);
    timestamp - (timestamp - i128::from(offset_ms)).rem_euclid(i128::from(size_ms))
}

fn check_offset(offset_ms: i64, bound_ms: i64) -> Result<i64, ParameterError> {
    if offset_ms.unsigned_abs() < bound_ms.unsigned_abs() {
        Ok(offset_ms)
    } else {
        Err(ParameterError::OffsetOutOfRange { offset_ms, bound_ms })
    }
}

fn unwrap_parameters<T>(result: Result<T, ParameterError>) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("{error}"),
    }
}

/// Back-to-back, non-overlapping windows of `size_ms`, starting at every
/// `k * size_ms + offset_ms`. Each record is in exactly one window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TumblingWindows {
    size_ms: i64,
    offset_ms: i64,
    domain: TimeDomain,
}

impl TumblingWindows {
    /// Tumbling windows over `domain`.
    ///
    /// Errors: `size_ms` not positive, or `|offset_ms| >= size_ms`.
    pub fn try_new(domain: TimeDomain, size_ms: i64, offset_ms: i64) -> Result<Self, ParameterError> {
        let size_ms = check_positive("size_ms", size_ms)?;
        let offset_ms = check_offset(offset_ms, size_ms)?;
        Ok(TumblingWindows { size_ms, offset_ms, domain })
    }

    /// Event-time tumbling windows of `size_ms`, aligned to the epoch.
    ///
    /// # Panics
    /// If `size_ms` is not positive; see [`TumblingWindows::try_new`].
    pub fn event_time(size_ms: i64) -> Self {
        unwrap_parameters(Self::try_new(TimeDomain::EventTime, size_ms, 0))
    }

    /// Processing-time tumbling windows of `size_ms`, aligned to the epoch.
    ///
    /// # Panics
    /// If `size_ms` is not positive; see [`TumblingWindows::try_new`].
    pub fn processing_time(size_ms: i64) -> Self {
        unwrap_parameters(Self::try_new(TimeDomain::ProcessingTime, size_ms, 0))
    }

    /// The same windows shifted by `offset_ms`.
    ///
    /// # Panics
    /// If `|offset_ms| >= size_ms`; see [`TumblingWindows::try_new`].
    pub fn with_offset(self, offset_ms: i64) -> Self {
        unwrap_parameters(Self::try_new(self.domain, self.size_ms, offset_ms))
    }

    /// The window length.
    pub const fn size_ms(&self) -> i64 {
        self.size_ms
    }

    /// The shift of window starts from the epoch.
    pub const fn offset_ms(&self) -> i64 {
        self.offset_ms
    }

    /// Which time the windows are in.
    pub const fn domain(&self) -> TimeDomain {
        self.domain
    }

    /// The window that contains `timestamp`.
    pub fn window_for(&self, timestamp: Timestamp) -> TimeWindow {
        TimeWindow::saturating(window_start(timestamp, self.offset_ms, self.size_ms), self.size_ms)
    }
}

impl WindowAssigner for TumblingWindows {
    type Window = TimeWindow;

    fn assign_windows(&self, event_timestamp: Timestamp, processing_time_ms: Timestamp, out: &mut Vec<TimeWindow>) {
        out.push(self.window_for(time_in(self.domain, event_timestamp, processing_time_ms)));
    }

    fn is_event_time(&self) -> bool {
        self.domain == TimeDomain::EventTime
    }

    fn is_merging(&self) -> bool {
        false
    }
}

/// Windows of `size_ms` starting every `slide_ms` (at every `k * slide_ms + offset_ms`). A
/// record is in every window that contains it: `size_ms / slide_ms` of them when the slide
/// divides the size. With `slide_ms > size_ms` the windows leave gaps, and a record in a gap
/// belongs to no window.
///
/// Windows are assigned latest first, as in Flink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlidingWindows {
    size_ms: i64,
    slide_ms: i64,
    offset_ms: i64,
    domain: TimeDomain,
}

impl SlidingWindows {
    /// Sliding windows over `domain`.
    ///
    /// Errors: `size_ms` or `slide_ms` not positive, `|offset_ms| >= slide_ms`, or more than
    /// [`MAX_WINDOWS_PER_RECORD`] windows per record.
    pub fn try_new(domain: TimeDomain, size_ms: i64, slide_ms: i64, offset_ms: i64) -> Result<Self, ParameterError> {
        let size_ms = check_positive("size_ms", size_ms)?;
        let slide_ms = check_positive("slide_ms", slide_ms)?;
        let offset_ms = check_offset(offset_ms, slide_ms)?;
        // Both are positive, so the conversions are exact.
        if (size_ms as u64).div_ceil(slide_ms as u64) > MAX_WINDOWS_PER_RECORD {
            return Err(ParameterError::TooManyWindows { size_ms, slide_ms });
        }
        Ok(SlidingWindows { size_ms, slide_ms, offset_ms, domain })
    }

    /// Event-time sliding windows of `size_ms` every `slide_ms`, aligned to the epoch.
    ///
    /// # Panics
    /// On invalid parameters; see [`SlidingWindows::try_new`].
    pub fn event_time(size_ms: i64, slide_ms: i64) -> Self {
        unwrap_parameters(Self::try_new(TimeDomain::EventTime, size_ms, slide_ms, 0))
    }

    /// Processing-time sliding windows of `size_ms` every `slide_ms`, aligned to the epoch.
    ///
    /// # Panics
    /// On invalid parameters; see [`SlidingWindows::try_new`].
    pub fn processing_time(size_ms: i64, slide_ms: i64) -> Self {
        unwrap_parameters(Self::try_new(TimeDomain::ProcessingTime, size_ms, slide_ms, 0))
    }

    /// The same windows shifted by `offset_ms`.
    ///
    /// # Panics
    /// If `|offset_ms| >= slide_ms`; see [`SlidingWindows::try_new`].
    pub fn with_offset(self, offset_ms: i64) -> Self {
        unwrap_parameters(Self::try_new(self.domain, self.size_ms, self.slide_ms, offset_ms))
    }

    /// The window length.
    pub const fn size_ms(&self) -> i64 {
        self.size_ms
    }

    /// The distance between consecutive window starts.
    pub const fn slide_ms(&self) -> i64 {
        self.slide_ms
    }

    /// The shift of window starts from the epoch.
    pub const fn offset_ms(&self) -> i64 {
        self.offset_ms
    }

    /// Which time the windows are in.
    pub const fn domain(&self) -> TimeDomain {
        self.domain
    }

    /// Appends every window that contains `timestamp`, latest first.
    pub fn windows_for(&self, timestamp: Timestamp, out: &mut Vec<TimeWindow>) {
        let earliest_excluded = i128::from(timestamp) - i128::from(self.size_ms);
        let mut start = window_start(timestamp, self.offset_ms, self.slide_ms);
        while start > earliest_excluded {
            out.push(TimeWindow::saturating(start, self.size_ms));
            start -= i128::from(self.slide_ms);
        }
    }
}

impl WindowAssigner for SlidingWindows {
    type Window = TimeWindow;

    fn assign_windows(&self, event_timestamp: Timestamp, processing_time_ms: Timestamp, out: &mut Vec<TimeWindow>) {
        self.windows_for(time_in(self.domain, event_timestamp, processing_time_ms), out);
    }

    fn is_event_time(&self) -> bool {
        self.domain == TimeDomain::EventTime
    }

    fn is_merging(&self) -> bool {
        false
    }
}

/// Session windows: each record opens the window `[ts, ts + gap_ms)`, and windows that overlap
/// or touch merge. So records belong to one session as long as each follows the previous one
/// by at most `gap_ms`; a pause longer than `gap_ms` starts a new session. The merging itself
/// is done by [`MergingWindowSet`](crate::window::merging::MergingWindowSet).
///
/// ```
/// use weir_operators::window::TimeWindow;
/// use weir_operators::window::assigner::{SessionWindows, WindowAssigner};
///
/// let sessions = SessionWindows::event_time(30_000);
/// let mut windows = Vec::new();
/// sessions.assign_windows(1_000, 0, &mut windows);
/// assert_eq!(windows, [TimeWindow::new(1_000, 31_000)]);
/// assert!(sessions.is_merging());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionWindows {
    gap_ms: i64,
    domain: TimeDomain,
}

impl SessionWindows {
    /// Session windows over `domain`. Errors if `gap_ms` is not positive.
    pub fn try_new(domain: TimeDomain, gap_ms: i64) -> Result<Self, ParameterError> {
        let gap_ms = check_positive("gap_ms", gap_ms)?;
        Ok(SessionWindows { gap_ms, domain })
    }

    /// Event-time sessions closed by a pause longer than `gap_ms`.
    ///
    /// # Panics
    /// If `gap_ms` is not positive.
    pub fn event_time(gap_ms: i64) -> Self {
        unwrap_parameters(Self::try_new(TimeDomain::EventTime, gap_ms))
    }

    /// Processing-time sessions closed by a pause longer than `gap_ms`.
    ///
    /// # Panics
    /// If `gap_ms` is not positive.
    pub fn processing_time(gap_ms: i64) -> Self {
        unwrap_parameters(Self::try_new(TimeDomain::ProcessingTime, gap_ms))
    }

    /// The longest pause inside one session.
    pub const fn gap_ms(&self) -> i64 {
        self.gap_ms
    }

    /// Which time the sessions are in.
    pub const fn domain(&self) -> TimeDomain {
        self.domain
    }

    /// The window a record at `timestamp` opens, before merging.
    pub fn window_for(&self, timestamp: Timestamp) -> TimeWindow {
        TimeWindow::saturating(i128::from(timestamp), self.gap_ms)
    }
}

impl WindowAssigner for SessionWindows {
    type Window = TimeWindow;

    fn assign_windows(&self, event_timestamp: Timestamp, processing_time_ms: Timestamp, out: &mut Vec<TimeWindow>) {
        out.push(self.window_for(time_in(self.domain, event_timestamp, processing_time_ms)));
    }

    fn is_event_time(&self) -> bool {
        self.domain == TimeDomain::EventTime
    }

    fn is_merging(&self) -> bool {
        true
    }
}

/// Every record into the one [`GlobalWindow`]. Such windows never complete by time; a trigger
/// (a count, typically) decides when to fire. As in Flink, they are not event-time windows, so
/// lateness does not apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GlobalWindows;

impl WindowAssigner for GlobalWindows {
    type Window = GlobalWindow;

    fn assign_windows(&self, _event_timestamp: Timestamp, _processing_time_ms: Timestamp, out: &mut Vec<GlobalWindow>) {
        out.push(GlobalWindow);
    }

    fn is_event_time(&self) -> bool {
        false
    }

    fn is_merging(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign<A: WindowAssigner>(assigner: &A, event_timestamp: Timestamp) -> Vec<A::Window> {
        let mut out = Vec::new();
        assigner.assign_windows(event_timestamp, 999_999, &mut out);
        out
    }

    fn w(start: i64, end: i64) -> TimeWindow {
        TimeWindow::new(start, end)
    }

    #[test]
    fn tumbling_assigns_the_one_containing_window() {
        let tumbling = TumblingWindows::event_time(10);
        assert_eq!(assign(&tumbling, 0), [w(0, 10)]);
        assert_eq!(assign(&tumbling, 9), [w(0, 10)]);
        assert_eq!(assign(&tumbling, 10), [w(10, 20)]);
        assert!(tumbling.is_event_time() && !tumbling.is_merging());
        assert_eq!((tumbling.size_ms(), tumbling.offset_ms()), (10, 0));
    }

    #[test]
    fn tumbling_negative_timestamps_round_down() {
        let tumbling = TumblingWindows::event_time(10);
        assert_eq!(assign(&tumbling, -1), [w(-10, 0)]);
        assert_eq!(assign(&tumbling, -10), [w(-10, 0)]);
        assert_eq!(assign(&tumbling, -11), [w(-20, -10)]);
    }

    #[test]
    fn tumbling_offsets_shift_the_grid() {
        let plus = TumblingWindows::event_time(10).with_offset(3);
        assert_eq!(assign(&plus, 2), [w(-7, 3)]);
        assert_eq!(assign(&plus, 3), [w(3, 13)]);
        assert_eq!(assign(&plus, -8), [w(-17, -7)]);
        let minus = TumblingWindows::event_time(10).with_offset(-3);
        assert_eq!(assign(&minus, 6), [w(-3, 7)]);
        assert_eq!(assign(&minus, 7), [w(7, 17)]);
        // A day in UTC+8: days start at 16:00 UTC.
        let hour_ms = 3_600_000;
        let day = TumblingWindows::event_time(24 * hour_ms).with_offset(-8 * hour_ms);
        assert_eq!(assign(&day, 17 * hour_ms), [w(16 * hour_ms, 40 * hour_ms)]);
    }

    #[test]
    fn tumbling_parameters_are_checked() {
        assert_eq!(
            TumblingWindows::try_new(TimeDomain::EventTime, 0, 0),
            Err(ParameterError::NotPositive { name: "size_ms", value_ms: 0 })
        );
        assert_eq!(
            TumblingWindows::try_new(TimeDomain::EventTime, 10, -10),
            Err(ParameterError::OffsetOutOfRange { offset_ms: -10, bound_ms: 10 })
        );
        assert!(TumblingWindows::try_new(TimeDomain::EventTime, 10, i64::MIN).is_err());
        assert!(TumblingWindows::try_new(TimeDomain::EventTime, 10, 9).is_ok());
    }

    #[test]
    #[should_panic(expected = "|offset_ms| < 10")]
    fn tumbling_with_offset_panics_when_out_of_range() {
        let _ = TumblingWindows::event_time(10).with_offset(10);
    }

    #[test]
    fn tumbling_at_the_ends_of_time() {
        let tumbling = TumblingWindows::event_time(10);
        let top = assign(&tumbling, i64::MAX);
        assert!(top[0].end() == i64::MAX && top[0].start() < i64::MAX);
        let bottom = assign(&tumbling, i64::MIN);
        assert!(bottom[0].contains(i64::MIN));
        let huge = TumblingWindows::event_time(i64::MAX).with_offset(i64::MAX - 1);
        assert!(assign(&huge, i64::MIN)[0].contains(i64::MIN));
        assert!(assign(&huge, 0)[0].contains(0));
    }

    #[test]
    fn processing_time_variant_reads_the_processing_clock() {
        let tumbling = TumblingWindows::processing_time(10);
        let mut out = Vec::new();
        tumbling.assign_windows(5, 42, &mut out);
        assert_eq!(out, [w(40, 50)]);
        assert!(!tumbling.is_event_time());
        assert_eq!(tumbling.domain(), TimeDomain::ProcessingTime);

        out.clear();
        SlidingWindows::processing_time(10, 5).assign_windows(0, 42, &mut out);
        assert_eq!(out, [w(40, 50), w(35, 45)]);
        out.clear();
        SessionWindows::processing_time(7).assign_windows(0, 42, &mut out);
        assert_eq!(out, [w(42, 49)]);
    }

    #[test]
    fn sliding_assigns_every_containing_window_latest_first() {
        let sliding = SlidingWindows::event_time(10, 5);
        assert_eq!(assign(&sliding, 0), [w(0, 10), w(-5, 5)]);
        assert_eq!(assign(&sliding, 4), [w(0, 10), w(-5, 5)]);
        assert_eq!(assign(&sliding, 5), [w(5, 15), w(0, 10)]);
        assert_eq!(assign(&sliding, -1), [w(-5, 5), w(-10, 0)]);
        let thirds = SlidingWindows::event_time(9, 3);
        assert_eq!(assign(&thirds, 7), [w(6, 15), w(3, 12), w(0, 9)]);
    }

    #[test]
    fn sliding_with_uneven_slide_and_offset() {
        let sliding = SlidingWindows::event_time(10, 4).with_offset(1);
        // starts ... -7, -3, 1, 5, 9 ...; 6 is in [-3, 7), [1, 11), [5, 15)
        assert_eq!(assign(&sliding, 6), [w(5, 15), w(1, 11), w(-3, 7)]);
        let negative = SlidingWindows::event_time(10, 4).with_offset(-1);
        // starts ... -9, -5, -1, 3 ...; 0 is in [-1, 9), [-5, 5), [-9, 1)
        assert_eq!(assign(&negative, 0), [w(-1, 9), w(-5, 5), w(-9, 1)]);
    }

    #[test]
    fn sliding_with_gaps_can_assign_nothing() {
        let hopping = SlidingWindows::event_time(5, 10);
        assert_eq!(assign(&hopping, 3), [w(0, 5)]);
        assert_eq!(assign(&hopping, 7), []);
        assert_eq!(assign(&hopping, 10), [w(10, 15)]);
    }

    #[test]
    fn sliding_parameters_are_checked() {
        assert!(SlidingWindows::try_new(TimeDomain::EventTime, 10, 0, 0).is_err());
        assert!(SlidingWindows::try_new(TimeDomain::EventTime, -1, 5, 0).is_err());
        assert_eq!(
            SlidingWindows::try_new(TimeDomain::EventTime, 10, 5, 5),
            Err(ParameterError::OffsetOutOfRange { offset_ms: 5, bound_ms: 5 })
        );
        assert_eq!(
            SlidingWindows::try_new(TimeDomain::EventTime, i64::MAX, 1, 0),
            Err(ParameterError::TooManyWindows { size_ms: i64::MAX, slide_ms: 1 })
        );
        let limit = MAX_WINDOWS_PER_RECORD as i64;
        assert!(SlidingWindows::try_new(TimeDomain::EventTime, limit, 1, 0).is_ok());
        assert!(SlidingWindows::try_new(TimeDomain::EventTime, limit + 1, 1, 0).is_err());
        let ok = SlidingWindows::event_time(10, 5).with_offset(-4);
        assert_eq!((ok.size_ms(), ok.slide_ms(), ok.offset_ms()), (10, 5, -4));
        assert_eq!(ok.domain(), TimeDomain::EventTime);
    }

    #[test]
    fn sliding_at_the_ends_of_time_stays_valid() {
        let sliding = SlidingWindows::event_time(10, 3);
        for ts in [i64::MIN, i64::MIN + 1, i64::MAX - 1, i64::MAX] {
            let windows = assign(&sliding, ts);
            assert!(!windows.is_empty());
            let mut unique = windows.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), windows.len(), "no duplicate windows at {ts}");
        }
    }

    #[test]
    fn session_assigns_ts_plus_gap_and_merges() {
        let sessions = SessionWindows::event_time(30);
        assert_eq!(assign(&sessions, -5), [w(-5, 25)]);
        assert_eq!(assign(&sessions, i64::MAX), [w(i64::MAX - 1, i64::MAX)]);
        assert!(sessions.is_merging() && sessions.is_event_time());
        assert_eq!(sessions.gap_ms(), 30);
        assert_eq!(sessions.domain(), TimeDomain::EventTime);
        assert!(SessionWindows::try_new(TimeDomain::EventTime, 0).is_err());
    }

    #[test]
    fn global_assigns_the_global_window() {
        assert_eq!(assign(&GlobalWindows, 5), [GlobalWindow]);
        assert!(!GlobalWindows.is_event_time() && !GlobalWindows.is_merging());
    }
}
