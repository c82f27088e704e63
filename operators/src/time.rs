//! Event time: timestamps, watermarks, and how watermarks are made and combined.
//!
//! # Timestamps and watermarks
//!
//! Every record carries an event [`Timestamp`]: milliseconds since the Unix epoch, as an `i64`,
//! so that times before 1970 are negative and ordinary arithmetic works. Event time moves
//! forward through [`Watermark`]s. A watermark `t` is a promise from upstream: *no record with a
//! timestamp `<= t` will arrive any more*. Windows and event-time timers fire when the watermark
//! passes their time. Records that arrive later than the promise are *late*; the window
//! operator decides what to do with them (see [`crate::window`]).
//!
//! [`Watermark::MIN`] is where every stream starts ("nothing is known yet");
//! [`Watermark::MAX`] is the end of input: it fires every pending window and timer.
//!
//! # Making watermarks: one generator per source instance
//!
//! A source instance extracts each record's timestamp with a [`TimestampAssigner`] and feeds it
//! to a [`WatermarkGenerator`], which writes into a [`WatermarkOutput`]. The generator sees every
//! record ([`WatermarkGenerator::on_event`]) and is also polled on a processing-time interval
//! ([`WatermarkGenerator::on_periodic_emit`]); the runtime passes the current processing time in,
//! so that nothing here reads a clock and every test fixes time explicitly. The built-ins:
//!
//! - [`BoundedOutOfOrderness`]: records may be up to `max_delay_ms` out of order; the watermark
//!   is `max_timestamp_seen - max_delay_ms - 1`, so a record exactly `max_delay_ms` behind the
//!   newest one is still on time.
//! - [`Monotonic`]: timestamps never decrease (the same with a delay of zero).
//! - [`FnWatermarks`]: any generator, given as two closures.
//!
//! [`WatermarkOutput`] never lets the watermark go backwards: a generator may emit freely and the
//! output keeps the maximum.
//!
//! # Idleness
//!
//! A source partition that receives nothing would hold event time back for the whole job,
//! because an operator's watermark is the minimum over its inputs. [`WithIdleness`] wraps a
//! generator and marks its output idle once no record has arrived for `idle_timeout_ms` of
//! processing time; the next record makes it active again. Downstream, idle inputs are left out
//! of the minimum. The price: records that arrive on an input after it was idle may be late,
//! because event time moved on without it.
//!
//! [`WatermarkStrategy`] bundles a timestamp assigner, a generator and an optional idle timeout,
//! and makes a fresh generator for each source instance.
//!
//! # Combining inputs: the valve
//!
//! An operator with several inputs (several upstream shards, or the two sides of a join) has
//! one watermark: the minimum over its *active* inputs. [`WatermarkValve`] keeps that minimum,
//! following Flink's `StatusWatermarkValve`; see its documentation for the rules on idle
//! inputs, inputs that come back, and the end of input.
//!
//! ```
//! use weir_operators::time::{Watermark, WatermarkValve};
//!
//! let mut valve = WatermarkValve::new(2);
//! assert_eq!(valve.on_watermark(0, Watermark(10)).watermark, None); // input 1 still at MIN
//! assert_eq!(valve.on_watermark(1, Watermark(7)).watermark, Some(Watermark(7)));
//! // Input 1 goes idle: it no longer holds event time back.
//! assert_eq!(valve.on_idle(1).watermark, Some(Watermark(10)));
//! ```

use std::fmt;

use crate::operator::END_OF_TIME;

pub use crate::operator::Timestamp;
pub use crate::timers::TimeDomain;

/// A watermark: the promise that no more records with a timestamp `<=` this value will arrive.
///
/// Watermarks are totally ordered by their timestamp; a stream's watermark only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Watermark(pub Timestamp);

impl Watermark {
    /// The watermark every stream starts at: nothing is known about event time yet.
    pub const MIN: Watermark = Watermark(Timestamp::MIN);
    /// End of input: every timestamp has passed, so every window and timer fires.
    pub const MAX: Watermark = Watermark(END_OF_TIME);

    /// The watermark's timestamp.
    pub const fn timestamp(self) -> Timestamp {
        self.0
    }

    /// Whether this is [`Watermark::MAX`], the watermark that marks the end of input.
    pub const fn is_end_of_input(self) -> bool {
        self.0 == END_OF_TIME
    }

    /// Whether event time has reached `timestamp`: a record with this timestamp arriving now is
    /// behind the watermark, and a timer for this time is due.
    pub const fn has_passed(self, timestamp: Timestamp) -> bool {
        timestamp <= self.0
    }
}

impl fmt::Display for Watermark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Watermark::MIN => f.write_str("Watermark(MIN)"),
            Watermark::MAX => f.write_str("Watermark(MAX)"),
            Watermark(t) => write!(f, "Watermark({t})"),
        }
    }
}

/// Whether a stream (or one input of an operator) currently takes part in event time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WatermarkStatus {
    /// Records and watermarks are flowing; the stream's watermark counts downstream.
    Active,
    /// Nothing has arrived for a while; downstream leaves this stream out of its minimum.
    Idle,
}

/// What changed in a watermark output since it was last looked at.
///
/// Deliver the parts downstream so that the watermark travels while the stream is active:
/// when the status turns [`Active`](WatermarkStatus::Active), send the status first; when it
/// turns [`Idle`](WatermarkStatus::Idle), send the watermark first. [`WatermarkUpdate::events`]
/// yields them in that order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatermarkUpdate {
    /// The new status, if it changed.
    pub status: Option<WatermarkStatus>,
    /// The new watermark, if it advanced.
    pub watermark: Option<Watermark>,
}

/// One element of a [`WatermarkUpdate`], in delivery order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatermarkEvent {
    /// The stream's watermark advanced to this value.
    Watermark(Watermark),
    /// The stream's status changed to this value.
    Status(WatermarkStatus),
}

impl WatermarkUpdate {
    /// An update that changes nothing.
    pub const NONE: WatermarkUpdate = WatermarkUpdate { status: None, watermark: None };

    /// Whether nothing changed.
    pub const fn is_empty(&self) -> bool {
        self.status.is_none() && self.watermark.is_none()
    }

    /// The changes in the order they must be delivered downstream (see the type's docs).
    pub fn events(&self) -> impl Iterator<Item = WatermarkEvent> + use<> {
        let status = self.status.map(WatermarkEvent::Status);
        let watermark = self.watermark.map(WatermarkEvent::Watermark);
        let ordered = match self.status {
            Some(WatermarkStatus::Idle) => [watermark, status],
            _ => [status, watermark],
        };
        ordered.into_iter().flatten()
    }
}

/// A parameter of a watermark strategy or window assigner is out of range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParameterError {
    /// A duration that must be greater than zero (a window size, slide, gap or idle timeout)
    /// was zero or negative.
    NotPositive {
        /// The parameter's name, with its unit.
        name: &'static str,
        /// The value given.
        value_ms: i64,
    },
    /// A duration that must not be negative (an out-of-orderness delay, an allowed lateness)
    /// was negative.
    Negative {
        /// The parameter's name, with its unit.
        name: &'static str,
        /// The value given.
        value_ms: i64,
    },
    /// A window offset was not strictly between `-bound_ms` and `bound_ms` (the window size
    /// for tumbling windows, the slide for sliding windows).
    OffsetOutOfRange {
        /// The offset given.
        offset_ms: i64,
        /// The bound its absolute value must stay below.
        bound_ms: i64,
    },
    /// Sliding windows whose size and slide would put one record into more windows than
    /// [`MAX_WINDOWS_PER_RECORD`](crate::window::assigner::MAX_WINDOWS_PER_RECORD).
    TooManyWindows {
        /// The window size given.
        size_ms: i64,
        /// The slide given.
        slide_ms: i64,
    },
}

impl fmt::Display for ParameterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParameterError::NotPositive { name, value_ms } => {
                write!(f, "{name} must be greater than zero, got {value_ms}")
            }
            ParameterError::Negative { name, value_ms } => {
                write!(f, "{name} must not be negative, got {value_ms}")
            }
            ParameterError::OffsetOutOfRange { offset_ms, bound_ms } => {
                write!(f, "window offset_ms must satisfy |offset_ms| < {bound_ms}, got {offset_ms}")
            }
            ParameterError::TooManyWindows { size_ms, slide_ms } => write!(
                f,
                "sliding windows of size_ms {size_ms} and slide_ms {slide_ms} would assign more \
                 than {} windows to one record",
                crate::window::assigner::MAX_WINDOWS_PER_RECORD
            ),
        }
    }
}

impl std::error::Error for ParameterError {}

/// Checks that a duration is greater than zero.
pub(crate) fn check_positive(name: &'static str, value_ms: i64) -> Result<i64, ParameterError> {
    if value_ms > 0 { Ok(value_ms) } else { Err(ParameterError::NotPositive { name, value_ms }) }
}

/// Checks that a duration is zero or more.
pub(crate) fn check_not_negative(name: &'static str, value_ms: i64) -> Result<i64, ParameterError> {
    if value_ms >= 0 { Ok(value_ms) } else { Err(ParameterError::Negative { name, value_ms }) }
}

// ------------------------------------------------------------------------------------------
// Timestamp assigners
// ------------------------------------------------------------------------------------------

/// Extracts the event timestamp of a record.
///
/// `previous` is the timestamp the record already carries, if any (a source may attach one,
/// e.g. a log's append time). Any `FnMut(&T, Option<Timestamp>) -> Timestamp` is an assigner.
///
/// ```
/// use weir_operators::time::TimestampAssigner;
///
/// struct Bid { at_ms: i64 }
/// let mut assigner = |bid: &Bid, _previous: Option<i64>| bid.at_ms;
/// assert_eq!(assigner.timestamp(&Bid { at_ms: 42 }, None), 42);
/// ```
pub trait TimestampAssigner<T> {
    /// The event timestamp of `record`.
    fn timestamp(&mut self, record: &T, previous: Option<Timestamp>) -> Timestamp;
}

impl<T, F> TimestampAssigner<T> for F
where
    F: FnMut(&T, Option<Timestamp>) -> Timestamp,
{
    fn timestamp(&mut self, record: &T, previous: Option<Timestamp>) -> Timestamp {
        self(record, previous)
    }
}

/// The assigner that keeps the timestamp a record already carries.
///
/// A record without one gets [`Timestamp::MIN`], which every window and watermark treats as
/// "before everything" (Flink uses the same marker for "no timestamp").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordTimestamp;

impl<T> TimestampAssigner<T> for RecordTimestamp {
    fn timestamp(&mut self, _record: &T, previous: Option<Timestamp>) -> Timestamp {
        previous.unwrap_or(Timestamp::MIN)
    }
}

// ------------------------------------------------------------------------------------------
// Watermark output and generators
// ------------------------------------------------------------------------------------------

/// Where a [`WatermarkGenerator`] writes: the current watermark and whether the stream is idle.
///
/// The watermark never goes backwards: emitting a value at or below the current one is
/// ignored. Emitting a watermark that advances also marks an idle output active again (a stream
/// that makes progress is not idle). The runtime collects the changes with
/// [`WatermarkOutput::take_update`] after each call into the generator.
///
/// ```
/// use weir_operators::time::{Watermark, WatermarkOutput, WatermarkStatus};
///
/// let mut out = WatermarkOutput::new();
/// out.emit_watermark(Watermark(10));
/// out.emit_watermark(Watermark(5)); // ignored: watermarks never go back
/// assert_eq!(out.take_update().watermark, Some(Watermark(10)));
/// out.mark_idle();
/// assert_eq!(out.take_update().status, Some(WatermarkStatus::Idle));
/// assert!(out.take_update().is_empty());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatermarkOutput {
    watermark: Watermark,
    idle: bool,
    reported_watermark: Watermark,
    reported_idle: bool,
}

impl Default for WatermarkOutput {
    fn default() -> Self {
        Self::new()
    }
}

impl WatermarkOutput {
    /// An active output at [`Watermark::MIN`].
    pub const fn new() -> Self {
        WatermarkOutput {
            watermark: Watermark::MIN,
            idle: false,
            reported_watermark: Watermark::MIN,
            reported_idle: false,
        }
    }

    /// Emits a watermark. Ignored unless it is above the current one; if it is, the output
    /// becomes active.
    pub fn emit_watermark(&mut self, watermark: Watermark) {
        if watermark > self.watermark {
            self.watermark = watermark;
            self.idle = false;
        }
    }

    /// Marks the stream idle: downstream stops waiting for its watermark.
    pub fn mark_idle(&mut self) {
        self.idle = true;
    }

    /// Marks the stream active again.
    pub fn mark_active(&mut self) {
        self.idle = false;
    }

    /// The highest watermark emitted so far.
    pub const fn current_watermark(&self) -> Watermark {
        self.watermark
    }

    /// Whether the stream is currently idle.
    pub const fn is_idle(&self) -> bool {
        self.idle
    }

    /// The net changes since the previous call: a watermark that advanced, a status that
    /// differs from the one last reported. A status that flipped and flipped back is no change.
    pub fn take_update(&mut self) -> WatermarkUpdate {
        let watermark = (self.watermark > self.reported_watermark).then_some(self.watermark);
        let status = (self.idle != self.reported_idle).then_some(if self.idle {
            WatermarkStatus::Idle
        } else {
            WatermarkStatus::Active
        });
        self.reported_watermark = self.watermark;
        self.reported_idle = self.idle;
        WatermarkUpdate { status, watermark }
    }
}

/// Generates watermarks for one source instance, in the shape of Flink's `WatermarkGenerator`.
///
/// `on_event` sees every record with its timestamp; `on_periodic_emit` is called on a
/// processing-time interval chosen by the runtime. Either may write to the output. The current
/// processing time is an argument, never read from a clock, so tests control it.
pub trait WatermarkGenerator<T> {
    /// Called for every record, after its timestamp was assigned.
    fn on_event(&mut self, record: &T, timestamp: Timestamp, out: &mut WatermarkOutput);

    /// Called periodically; `processing_time_ms` is the runtime's current processing time.
    fn on_periodic_emit(&mut self, processing_time_ms: Timestamp, out: &mut WatermarkOutput);
}

/// Watermarks for records that arrive at most `max_delay_ms` out of order.
///
/// The watermark, emitted on every periodic call, is `max_timestamp_seen - max_delay_ms - 1`:
/// a record whose timestamp is `max_delay_ms` behind the newest seen is still on time, one a
/// millisecond older is late. Nothing is emitted before the first record.
///
/// ```
/// use weir_operators::time::{BoundedOutOfOrderness, Watermark, WatermarkGenerator, WatermarkOutput};
///
/// let mut generator = BoundedOutOfOrderness::new(5);
/// let mut out = WatermarkOutput::new();
/// WatermarkGenerator::<()>::on_event(&mut generator, &(), 100, &mut out);
/// WatermarkGenerator::<()>::on_event(&mut generator, &(), 90, &mut out); // out of order: fine
/// WatermarkGenerator::<()>::on_periodic_emit(&mut generator, 0, &mut out);
/// assert_eq!(out.current_watermark(), Watermark(94));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundedOutOfOrderness {
    max_delay_ms: i64,
    max_timestamp: Option<Timestamp>,
}

impl BoundedOutOfOrderness {
    /// A generator that tolerates records up to `max_delay_ms` behind the newest one.
    ///
    /// # Panics
    /// If `max_delay_ms` is negative; see [`BoundedOutOfOrderness::try_new`].
    pub fn new(max_delay_ms: i64) -> Self {
        match Self::try_new(max_delay_ms) {
            Ok(generator) => generator,
            Err(error) => panic!("{error}"),
        }
    }

    /// Like [`BoundedOutOfOrderness::new`], but returns an error for a negative delay.
    pub fn try_new(max_delay_ms: i64) -> Result<Self, ParameterError> {
        let max_delay_ms = check_not_negative("max_delay_ms", max_delay_ms)?;
        Ok(BoundedOutOfOrderness { max_delay_ms, max_timestamp: None })
    }

    /// The tolerated out-of-orderness.
    pub const fn max_delay_ms(&self) -> i64 {
        self.max_delay_ms
    }

    /// The watermark this generator would emit now, or `None` before the first record.
    pub fn current_watermark(&self) -> Option<Watermark> {
        self.max_timestamp.map(|max| Watermark(max.saturating_sub(self.max_delay_ms).saturating_sub(1)))
    }
}

impl<T> WatermarkGenerator<T> for BoundedOutOfOrderness {
    fn on_event(&mut self, _record: &T, timestamp: Timestamp, _out: &mut WatermarkOutput) {
        self.max_timestamp = Some(self.max_timestamp.map_or(timestamp, |max| max.max(timestamp)));
    }

    fn on_periodic_emit(&mut self, _processing_time_ms: Timestamp, out: &mut WatermarkOutput) {
        if let Some(watermark) = self.current_watermark() {
            out.emit_watermark(watermark);
        }
    }
}

/// Watermarks for records whose timestamps never decrease: [`BoundedOutOfOrderness`] with a
/// delay of zero, so the watermark trails the newest timestamp by one millisecond (more records
/// with that same timestamp may still come).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Monotonic(BoundedOutOfOrderness);

impl Default for Monotonic {
    fn default() -> Self {
        Self::new()
    }
}

impl Monotonic {
    /// A generator for ascending timestamps.
    pub const fn new() -> Self {
        Monotonic(BoundedOutOfOrderness { max_delay_ms: 0, max_timestamp: None })
    }
}

impl<T> WatermarkGenerator<T> for Monotonic {
    fn on_event(&mut self, record: &T, timestamp: Timestamp, out: &mut WatermarkOutput) {
        self.0.on_event(record, timestamp, out);
    }

    fn on_periodic_emit(&mut self, processing_time_ms: Timestamp, out: &mut WatermarkOutput) {
        WatermarkGenerator::<T>::on_periodic_emit(&mut self.0, processing_time_ms, out);
    }
}

/// A watermark generator made of two closures: one called per record, one periodically.
///
/// ```
/// use weir_operators::time::{FnWatermarks, Watermark, WatermarkGenerator, WatermarkOutput};
///
/// // Punctuated watermarks: a record that says "end of batch" carries the watermark itself.
/// struct Event { ts: i64, end_of_batch: bool }
/// let mut generator = FnWatermarks::new(
///     |event: &Event, ts: i64, out: &mut WatermarkOutput| {
///         if event.end_of_batch {
///             out.emit_watermark(Watermark(ts));
///         }
///     },
///     |_now_ms: i64, _out: &mut WatermarkOutput| {},
/// );
/// let mut out = WatermarkOutput::new();
/// generator.on_event(&Event { ts: 7, end_of_batch: true }, 7, &mut out);
/// assert_eq!(out.current_watermark(), Watermark(7));
/// ```
#[derive(Clone, Debug)]
pub struct FnWatermarks<E, P> {
    on_event: E,
    on_periodic: P,
}

impl<E, P> FnWatermarks<E, P> {
    /// A generator that calls `on_event(record, timestamp, out)` per record and
    /// `on_periodic(processing_time_ms, out)` periodically.
    pub const fn new(on_event: E, on_periodic: P) -> Self {
        FnWatermarks { on_event, on_periodic }
    }
}

impl<T, E, P> WatermarkGenerator<T> for FnWatermarks<E, P>
where
    E: FnMut(&T, Timestamp, &mut WatermarkOutput),
    P: FnMut(Timestamp, &mut WatermarkOutput),
{
    fn on_event(&mut self, record: &T, timestamp: Timestamp, out: &mut WatermarkOutput) {
        (self.on_event)(record, timestamp, out);
    }

    fn on_periodic_emit(&mut self, processing_time_ms: Timestamp, out: &mut WatermarkOutput) {
        (self.on_periodic)(processing_time_ms, out);
    }
}

/// Adds idleness detection to a generator: the output is marked idle when no record has
/// arrived for `idle_timeout_ms` of processing time, and active again by the next record.
///
/// As in Flink's `WatermarksWithIdleness`, idleness is judged only in `on_periodic_emit`, from
/// the processing times the runtime passes in: the countdown starts at the first periodic call
/// that saw no record since the previous call, and the output turns idle at the first periodic
/// call more than `idle_timeout_ms` after that. So an input is never marked idle sooner than
/// `idle_timeout_ms` after its last record, and at worst about three periodic intervals later.
/// While idle, the wrapped generator is not polled.
///
/// ```
/// use weir_operators::time::{BoundedOutOfOrderness, WatermarkGenerator, WatermarkOutput, WithIdleness};
///
/// let mut generator = WithIdleness::new(BoundedOutOfOrderness::new(0), 1_000);
/// let mut out = WatermarkOutput::new();
/// WatermarkGenerator::<()>::on_periodic_emit(&mut generator, 0, &mut out); // countdown starts
/// WatermarkGenerator::<()>::on_periodic_emit(&mut generator, 1_000, &mut out); // not more than 1 s
/// assert!(!out.is_idle());
/// WatermarkGenerator::<()>::on_periodic_emit(&mut generator, 1_001, &mut out);
/// assert!(out.is_idle());
/// WatermarkGenerator::<()>::on_event(&mut generator, &(), 5, &mut out); // a record: active again
/// assert!(!out.is_idle());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WithIdleness<G> {
    inner: G,
    /// `None`: idleness detection is off and this is a transparent wrapper.
    idle_timeout_ms: Option<i64>,
    /// Whether a record arrived since the previous periodic call.
    saw_record: bool,
    /// The processing time of the first periodic call that saw no record, if the countdown runs.
    quiet_since_ms: Option<Timestamp>,
}

impl<G> WithIdleness<G> {
    /// Wraps `inner`, marking the output idle after `idle_timeout_ms` without records.
    ///
    /// # Panics
    /// If `idle_timeout_ms` is not positive; see [`WithIdleness::try_new`].
    pub fn new(inner: G, idle_timeout_ms: i64) -> Self {
        match Self::try_new(inner, idle_timeout_ms) {
            Ok(generator) => generator,
            Err(error) => panic!("{error}"),
        }
    }

    /// Like [`WithIdleness::new`], but returns an error for a timeout that is not positive.
    pub fn try_new(inner: G, idle_timeout_ms: i64) -> Result<Self, ParameterError> {
        let idle_timeout_ms = check_positive("idle_timeout_ms", idle_timeout_ms)?;
        Ok(Self::with_optional_timeout(inner, Some(idle_timeout_ms)))
    }

    /// Wraps `inner` without idleness detection: the output is never marked idle.
    pub const fn never_idle(inner: G) -> Self {
        Self::with_optional_timeout(inner, None)
    }

    const fn with_optional_timeout(inner: G, idle_timeout_ms: Option<i64>) -> Self {
        WithIdleness { inner, idle_timeout_ms, saw_record: false, quiet_since_ms: None }
    }

    /// The idle timeout, or `None` if idleness detection is off.
    pub const fn idle_timeout_ms(&self) -> Option<i64> {
        self.idle_timeout_ms
    }

    /// The wrapped generator.
    pub const fn inner(&self) -> &G {
        &self.inner
    }

    /// A batch of records with their timestamps, in order: the same as calling
    /// [`WatermarkGenerator::on_event`] for each, with the activity noted once for the batch.
    pub fn on_events<'a, T: 'a>(
        &mut self,
        events: impl IntoIterator<Item = (&'a T, Timestamp)>,
        out: &mut WatermarkOutput,
    ) where
        G: WatermarkGenerator<T>,
    {
        let mut events = events.into_iter().peekable();
        if events.peek().is_none() {
            return;
        }
        self.saw_record = true;
        out.mark_active();
        for (record, timestamp) in events {
            self.inner.on_event(record, timestamp, out);
        }
    }

    /// Advances the countdown at a periodic call and says whether the input is idle now.
    fn check_idle(&mut self, processing_time_ms: Timestamp) -> bool {
        let Some(idle_timeout_ms) = self.idle_timeout_ms else { return false };
        if self.saw_record {
            self.saw_record = false;
            self.quiet_since_ms = None;
            return false;
        }
        match self.quiet_since_ms {
            None => {
                self.quiet_since_ms = Some(processing_time_ms);
                false
            }
            Some(quiet_since_ms) => processing_time_ms.saturating_sub(quiet_since_ms) > idle_timeout_ms,
        }
    }
}

impl<T, G: WatermarkGenerator<T>> WatermarkGenerator<T> for WithIdleness<G> {
    fn on_event(&mut self, record: &T, timestamp: Timestamp, out: &mut WatermarkOutput) {
        self.saw_record = true;
        out.mark_active();
        self.inner.on_event(record, timestamp, out);
    }

    fn on_periodic_emit(&mut self, processing_time_ms: Timestamp, out: &mut WatermarkOutput) {
        if self.check_idle(processing_time_ms) {
            out.mark_idle();
        } else {
            self.inner.on_periodic_emit(processing_time_ms, out);
        }
    }
}

/// How a source makes event time: a timestamp assigner, a watermark generator and an optional
/// idle timeout. Each source instance gets its own generator from
/// [`WatermarkStrategy::create_generator`].
///
/// ```
/// use weir_operators::time::{WatermarkGenerator, WatermarkOutput, WatermarkStrategy};
///
/// let strategy = WatermarkStrategy::bounded_out_of_orderness(2_000)
///     .with_timestamp_assigner(|record: &(i64, &str), _previous: Option<i64>| record.0)
///     .with_idleness(60_000);
/// let mut generator = strategy.create_generator();
/// let mut out = WatermarkOutput::new();
/// WatermarkGenerator::<(i64, &str)>::on_periodic_emit(&mut generator, 0, &mut out);
/// assert_eq!(strategy.idle_timeout_ms(), Some(60_000));
/// ```
#[derive(Clone, Debug)]
pub struct WatermarkStrategy<G, A = RecordTimestamp> {
    generator: G,
    timestamps: A,
    idle_timeout_ms: Option<i64>,
}

impl<G> WatermarkStrategy<G> {
    /// A strategy using `generator` and keeping the timestamps records already carry.
    pub const fn new(generator: G) -> Self {
        WatermarkStrategy { generator, timestamps: RecordTimestamp, idle_timeout_ms: None }
    }
}

impl WatermarkStrategy<BoundedOutOfOrderness> {
    /// Records at most `max_delay_ms` out of order (see [`BoundedOutOfOrderness`]).
    ///
    /// # Panics
    /// If `max_delay_ms` is negative.
    pub fn bounded_out_of_orderness(max_delay_ms: i64) -> Self {
        Self::new(BoundedOutOfOrderness::new(max_delay_ms))
    }
}

impl WatermarkStrategy<Monotonic> {
    /// Records in ascending timestamp order (see [`Monotonic`]).
    pub const fn monotonic() -> Self {
        Self::new(Monotonic::new())
    }
}

impl<G, A> WatermarkStrategy<G, A> {
    /// The same strategy, extracting timestamps with `timestamps`.
    pub fn with_timestamp_assigner<B>(self, timestamps: B) -> WatermarkStrategy<G, B> {
        WatermarkStrategy { generator: self.generator, timestamps, idle_timeout_ms: self.idle_timeout_ms }
    }

    /// The same strategy, marking a source instance idle after `idle_timeout_ms` of processing
    /// time without records (see [`WithIdleness`]).
    ///
    /// # Panics
    /// If `idle_timeout_ms` is not positive; see [`WatermarkStrategy::try_with_idleness`].
    pub fn with_idleness(self, idle_timeout_ms: i64) -> Self {
        match self.try_with_idleness(idle_timeout_ms) {
            Ok(strategy) => strategy,
            Err(error) => panic!("{error}"),
        }
    }

    /// Like [`WatermarkStrategy::with_idleness`], but returns an error for a timeout that is
    /// not positive.
    pub fn try_with_idleness(self, idle_timeout_ms: i64) -> Result<Self, ParameterError> {
        let idle_timeout_ms = check_positive("idle_timeout_ms", idle_timeout_ms)?;
        Ok(WatermarkStrategy { idle_timeout_ms: Some(idle_timeout_ms), ..self })
    }

    /// The idle timeout, or `None` if sources never turn idle.
    pub const fn idle_timeout_ms(&self) -> Option<i64> {
        self.idle_timeout_ms
    }

    /// A fresh generator for one source instance.
    pub fn create_generator(&self) -> WithIdleness<G>
    where
        G: Clone,
    {
        WithIdleness::with_optional_timeout(self.generator.clone(), self.idle_timeout_ms)
    }

    /// A timestamp assigner for one source instance.
    pub fn create_timestamp_assigner(&self) -> A
    where
        A: Clone,
    {
        self.timestamps.clone()
    }
}

// ------------------------------------------------------------------------------------------
// Combining inputs
// ------------------------------------------------------------------------------------------

/// The state of one input of a [`WatermarkValve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputStatus {
    /// The input takes part in the minimum.
    Active,
    /// The input is idle and left out of the minimum.
    Idle,
    /// The input has ended: its watermark is [`Watermark::MAX`] and it never holds time back.
    Ended,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ValveInput {
    watermark: Watermark,
    status: InputStatus,
}

/// Combines the watermarks and statuses of an operator's inputs into the operator's own,
/// following Flink's `StatusWatermarkValve`.
///
/// The rules:
///
/// 1. Each input's watermark only moves forward; a watermark at or below the input's current
///    one is ignored.
/// 2. The output watermark is the minimum over the **active** inputs, and it is emitted only
///    when it advances; the output never goes backwards.
/// 3. An input that turns **idle** leaves the minimum, so the output may advance at once.
/// 4. An input that turns active again (by [`on_active`](Self::on_active), or implicitly by
///    sending a watermark) with a watermark below the current output does not pull the output
///    back: it rejoins the minimum once its watermark catches up with the output (Flink calls
///    such an input "unaligned"). Its records in between may be late.
/// 5. When **every** input that has not ended is idle, the valve itself is idle (it reports
///    [`WatermarkStatus::Idle`]), and the output advances to the *maximum* watermark over those
///    idle inputs: nobody is making progress, so there is no reason to hold back the progress
///    already reported. Any input turning active makes the valve active again.
/// 6. **End of input** on an input ([`on_end_of_input`](Self::on_end_of_input)) sets that
///    input's watermark to [`Watermark::MAX`] for good; it never holds time back again and
///    ignores whatever arrives after. When every input has ended, the output is
///    [`Watermark::MAX`].
///
/// Decisions where Flink is silent or differs (recorded in the operators crate's design notes):
///
/// - Rule 6: Flink treats a finished channel as an *active* channel at `MAX`, so when all
///   other channels are idle, Flink's valve emits `MAX` and every later record of the idle
///   channels is late. Here an ended input counts as neither active nor idle: if the rest are
///   idle, the valve is idle and flushes only to the idle inputs' maximum (rule 5). Event time
///   reaches `MAX` only when every input has ended.
/// - Rule 5 applies whenever the valve turns idle. Flink's valve skips the flush when the last
///   input to turn idle was unaligned, a case its own comments say should flush.
/// - Rule 4: a watermark that arrives on an idle input makes it active. Flink ignores such a
///   watermark (its upstream always sends "active" first); accepting it loses no progress.
///
/// With `n` inputs, every call costs `O(n)`; `n` is the number of upstream shards or join
/// sides, so small.
///
/// ```
/// use weir_operators::time::{Watermark, WatermarkStatus, WatermarkValve};
///
/// let mut valve = WatermarkValve::new(2);
/// valve.on_watermark(0, Watermark(20));
/// valve.on_watermark(1, Watermark(10));
/// assert_eq!(valve.current_watermark(), Watermark(10));
///
/// // Input 1 goes idle, then input 0 too: the valve is idle at the maximum, 20.
/// valve.on_idle(1);
/// let update = valve.on_idle(0);
/// assert_eq!(update.status, Some(WatermarkStatus::Idle));
/// assert_eq!(valve.current_watermark(), Watermark(20));
///
/// // Input 1 comes back behind the output: it does not pull the watermark back.
/// let update = valve.on_watermark(1, Watermark(15));
/// assert_eq!(update.status, Some(WatermarkStatus::Active));
/// assert_eq!(update.watermark, None);
/// assert_eq!(valve.on_watermark(1, Watermark(25)).watermark, Some(Watermark(25)));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatermarkValve {
    inputs: Vec<ValveInput>,
    output: Watermark,
    idle: bool,
}

impl WatermarkValve {
    /// A valve over `input_count` inputs, all active at [`Watermark::MIN`].
    ///
    /// # Panics
    /// If `input_count` is zero: an operator without inputs has no watermark to combine.
    pub fn new(input_count: usize) -> Self {
        assert!(input_count > 0, "a watermark valve needs at least one input");
        let input = ValveInput { watermark: Watermark::MIN, status: InputStatus::Active };
        WatermarkValve { inputs: vec![input; input_count], output: Watermark::MIN, idle: false }
    }

    /// The number of inputs.
    pub fn input_count(&self) -> usize {
        self.inputs.len()
    }

    /// The combined watermark: the highest one emitted so far.
    pub const fn current_watermark(&self) -> Watermark {
        self.output
    }

    /// Whether the valve is idle: every input that has not ended is idle.
    pub const fn is_idle(&self) -> bool {
        self.idle
    }

    /// Whether every input has ended.
    pub fn is_ended(&self) -> bool {
        self.inputs.iter().all(|input| input.status == InputStatus::Ended)
    }

    /// The status of input `input`.
    ///
    /// # Panics
    /// If `input >= self.input_count()`.
    pub fn input_status(&self, input: usize) -> InputStatus {
        self.inputs[input].status
    }

    /// The last watermark received on input `input` ([`Watermark::MAX`] once it ended).
    ///
    /// # Panics
    /// If `input >= self.input_count()`.
    pub fn input_watermark(&self, input: usize) -> Watermark {
        self.inputs[input].watermark
    }

    /// A watermark arrived on input `input`. An idle input becomes active (rule 4).
    ///
    /// # Panics
    /// If `input >= self.input_count()`.
    pub fn on_watermark(&mut self, input: usize, watermark: Watermark) -> WatermarkUpdate {
        let state = &mut self.inputs[input];
        if state.status == InputStatus::Ended {
            return WatermarkUpdate::NONE;
        }
        state.status = InputStatus::Active;
        state.watermark = state.watermark.max(watermark);
        self.settle()
    }

    /// Input `input` turned idle.
    ///
    /// # Panics
    /// If `input >= self.input_count()`.
    pub fn on_idle(&mut self, input: usize) -> WatermarkUpdate {
        self.set_status(input, InputStatus::Idle)
    }

    /// Input `input` turned active again.
    ///
    /// # Panics
    /// If `input >= self.input_count()`.
    pub fn on_active(&mut self, input: usize) -> WatermarkUpdate {
        self.set_status(input, InputStatus::Active)
    }

    /// Input `input` reached its end: its watermark becomes [`Watermark::MAX`] for good.
    ///
    /// # Panics
    /// If `input >= self.input_count()`.
    pub fn on_end_of_input(&mut self, input: usize) -> WatermarkUpdate {
        let state = &mut self.inputs[input];
        state.status = InputStatus::Ended;
        state.watermark = Watermark::MAX;
        self.settle()
    }

    fn set_status(&mut self, input: usize, status: InputStatus) -> WatermarkUpdate {
        let state = &mut self.inputs[input];
        if state.status == InputStatus::Ended {
            return WatermarkUpdate::NONE;
        }
        state.status = status;
        self.settle()
    }

    /// Recomputes the output after an input changed, and reports what changed.
    ///
    /// Invariant kept here: an active input whose watermark is at or above the output is
    /// "aligned" and part of the minimum; an active input below the output is "unaligned" and
    /// is left out until it catches up. So the aligned set needs no bookkeeping of its own.
    fn settle(&mut self) -> WatermarkUpdate {
        let was_idle = self.idle;
        let mut any_active = false;
        let mut aligned_min: Option<Watermark> = None;
        let mut idle_max: Option<Watermark> = None;
        for input in &self.inputs {
            match input.status {
                InputStatus::Active => {
                    any_active = true;
                    if input.watermark >= self.output {
                        aligned_min = Some(aligned_min.map_or(input.watermark, |m| m.min(input.watermark)));
                    }
                }
                InputStatus::Idle => {
                    idle_max = Some(idle_max.map_or(input.watermark, |m| m.max(input.watermark)));
                }
                InputStatus::Ended => {}
            }
        }
        let candidate = match (any_active, idle_max) {
            (true, _) => aligned_min,
            (false, Some(idle_max)) => Some(idle_max),
            (false, None) => Some(Watermark::MAX),
        };
        self.idle = !any_active && idle_max.is_some();

        let watermark = candidate.filter(|&candidate| candidate > self.output);
        if let Some(watermark) = watermark {
            self.output = watermark;
        }
        let status =
            (self.idle != was_idle).then_some(if self.idle { WatermarkStatus::Idle } else { WatermarkStatus::Active });
        WatermarkUpdate { status, watermark }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_events_equals_one_on_event_per_record() {
        let timestamps = [5i64, 3, 9, 9, 2, 14];
        for idle_timeout in [None, Some(10)] {
            let make = || WithIdleness::with_optional_timeout(BoundedOutOfOrderness::new(2), idle_timeout);
            let (mut single, mut batched) = (make(), make());
            let (mut out_single, mut out_batched) = (WatermarkOutput::new(), WatermarkOutput::new());
            for (now, chunk) in timestamps.chunks(4).enumerate() {
                for ts in chunk {
                    single.on_event(&(), *ts, &mut out_single);
                }
                batched.on_events(chunk.iter().map(|ts| (&(), *ts)), &mut out_batched);
                batched.on_events(std::iter::empty::<(&(), i64)>(), &mut out_batched);
                WatermarkGenerator::<()>::on_periodic_emit(&mut single, now as i64 * 100, &mut out_single);
                WatermarkGenerator::<()>::on_periodic_emit(&mut batched, now as i64 * 100, &mut out_batched);
                assert_eq!(out_single.take_update(), out_batched.take_update());
                assert_eq!(single, batched);
            }
            // No records for a while: both go idle at the same periodic call.
            for now in 3..6 {
                WatermarkGenerator::<()>::on_periodic_emit(&mut single, now * 100, &mut out_single);
                WatermarkGenerator::<()>::on_periodic_emit(&mut batched, now * 100, &mut out_batched);
                assert_eq!(out_single.take_update(), out_batched.take_update());
            }
        }
    }

    #[test]
    fn watermark_orders_and_passes() {
        assert!(Watermark::MIN < Watermark(0) && Watermark(0) < Watermark::MAX);
        assert!(Watermark(10).has_passed(10));
        assert!(!Watermark(10).has_passed(11));
        assert!(Watermark::MAX.is_end_of_input());
        assert_eq!(Watermark::MIN.to_string(), "Watermark(MIN)");
        assert_eq!(Watermark(-3).to_string(), "Watermark(-3)");
    }

    #[test]
    fn update_events_keep_the_watermark_inside_the_active_period() {
        let activating = WatermarkUpdate { status: Some(WatermarkStatus::Active), watermark: Some(Watermark(3)) };
        let events: Vec<_> = activating.events().collect();
        assert_eq!(events, [WatermarkEvent::Status(WatermarkStatus::Active), WatermarkEvent::Watermark(Watermark(3))]);
        let idling = WatermarkUpdate { status: Some(WatermarkStatus::Idle), watermark: Some(Watermark(3)) };
        let events: Vec<_> = idling.events().collect();
        assert_eq!(events, [WatermarkEvent::Watermark(Watermark(3)), WatermarkEvent::Status(WatermarkStatus::Idle)]);
        assert_eq!(WatermarkUpdate::NONE.events().count(), 0);
        assert!(WatermarkUpdate::NONE.is_empty());
    }

    #[test]
    fn closures_and_record_timestamps_assign() {
        let mut keep = RecordTimestamp;
        assert_eq!(TimestampAssigner::<u8>::timestamp(&mut keep, &0, Some(5)), 5);
        assert_eq!(TimestampAssigner::<u8>::timestamp(&mut keep, &0, None), Timestamp::MIN);
        let mut offset = |record: &i64, previous: Option<i64>| record + previous.unwrap_or(0);
        assert_eq!(offset.timestamp(&10, Some(1)), 11);
    }

    #[test]
    fn output_never_goes_back_and_reports_net_changes() {
        let mut out = WatermarkOutput::new();
        assert!(out.take_update().is_empty());
        out.emit_watermark(Watermark(5));
        out.emit_watermark(Watermark(3));
        assert_eq!(out.current_watermark(), Watermark(5));
        assert_eq!(out.take_update(), WatermarkUpdate { status: None, watermark: Some(Watermark(5)) });
        out.emit_watermark(Watermark(5));
        assert!(out.take_update().is_empty());

        out.mark_idle();
        out.mark_active();
        assert!(out.take_update().is_empty(), "idle then active again is no change");

        out.mark_idle();
        out.emit_watermark(Watermark(4)); // not an advance: stays idle
        assert!(out.is_idle());
        assert_eq!(out.take_update().status, Some(WatermarkStatus::Idle));
        out.emit_watermark(Watermark(6)); // an advance: active again
        assert_eq!(
            out.take_update(),
            WatermarkUpdate { status: Some(WatermarkStatus::Active), watermark: Some(Watermark(6)) }
        );
    }

    fn feed<G: WatermarkGenerator<()>>(generator: &mut G, timestamps: &[i64], out: &mut WatermarkOutput) {
        for &ts in timestamps {
            generator.on_event(&(), ts, out);
        }
    }

    #[test]
    fn bounded_out_of_orderness_trails_the_max_by_delay_plus_one() {
        let mut generator = BoundedOutOfOrderness::new(10);
        let mut out = WatermarkOutput::new();
        WatermarkGenerator::<()>::on_periodic_emit(&mut generator, 0, &mut out);
        assert!(out.take_update().is_empty(), "nothing before the first record");
        feed(&mut generator, &[100, 120, 105], &mut out);
        assert!(out.take_update().is_empty(), "watermarks are emitted periodically, not per record");
        WatermarkGenerator::<()>::on_periodic_emit(&mut generator, 1, &mut out);
        assert_eq!(out.take_update().watermark, Some(Watermark(109)));
        // A record exactly max_delay_ms behind the newest is on time.
        assert!(!out.current_watermark().has_passed(120 - 10));
        assert!(out.current_watermark().has_passed(120 - 11));
    }

    #[test]
    fn bounded_out_of_orderness_saturates_at_the_ends_of_time() {
        let mut generator = BoundedOutOfOrderness::new(i64::MAX);
        let mut out = WatermarkOutput::new();
        feed(&mut generator, &[i64::MIN, 0], &mut out);
        assert_eq!(generator.current_watermark(), Some(Watermark(-i64::MAX - 1)));
        let mut generator = BoundedOutOfOrderness::new(0);
        feed(&mut generator, &[i64::MAX], &mut out);
        assert_eq!(generator.current_watermark(), Some(Watermark(i64::MAX - 1)));
    }

    #[test]
    fn bounded_out_of_orderness_rejects_negative_delay() {
        assert_eq!(
            BoundedOutOfOrderness::try_new(-1),
            Err(ParameterError::Negative { name: "max_delay_ms", value_ms: -1 })
        );
        assert!(BoundedOutOfOrderness::try_new(0).is_ok());
    }

    #[test]
    #[should_panic(expected = "max_delay_ms must not be negative")]
    fn bounded_out_of_orderness_new_panics_on_negative_delay() {
        let _ = BoundedOutOfOrderness::new(-5);
    }

    #[test]
    fn monotonic_trails_by_one() {
        let mut generator = Monotonic::new();
        let mut out = WatermarkOutput::new();
        feed(&mut generator, &[1, 2, 2, 7], &mut out);
        WatermarkGenerator::<()>::on_periodic_emit(&mut generator, 0, &mut out);
        assert_eq!(out.current_watermark(), Watermark(6));
    }

    #[test]
    fn fn_watermarks_call_both_closures() {
        let mut generator = FnWatermarks::new(
            |_: &(), ts: i64, out: &mut WatermarkOutput| out.emit_watermark(Watermark(ts)),
            |now_ms: i64, out: &mut WatermarkOutput| out.emit_watermark(Watermark(now_ms)),
        );
        let mut out = WatermarkOutput::new();
        generator.on_event(&(), 3, &mut out);
        assert_eq!(out.current_watermark(), Watermark(3));
        generator.on_periodic_emit(8, &mut out);
        assert_eq!(out.current_watermark(), Watermark(8));
    }

    fn periodic<G: WatermarkGenerator<()>>(generator: &mut G, now_ms: i64, out: &mut WatermarkOutput) {
        generator.on_periodic_emit(now_ms, out);
    }

    #[test]
    fn idleness_counts_from_the_first_quiet_periodic_call() {
        let mut generator = WithIdleness::new(BoundedOutOfOrderness::new(0), 100);
        let mut out = WatermarkOutput::new();
        generator.on_event(&(), 50, &mut out);
        periodic(&mut generator, 1_000, &mut out); // saw the record: no countdown
        assert_eq!(out.take_update().watermark, Some(Watermark(49)));
        periodic(&mut generator, 1_010, &mut out); // quiet: countdown starts at 1_010
        periodic(&mut generator, 1_110, &mut out); // exactly 100 ms: not more than the timeout
        assert!(!out.is_idle());
        periodic(&mut generator, 1_111, &mut out);
        assert!(out.is_idle());
        assert_eq!(out.take_update().status, Some(WatermarkStatus::Idle));
        periodic(&mut generator, 5_000, &mut out); // stays idle, no repeated change
        assert!(out.take_update().is_empty());
    }

    #[test]
    fn a_record_makes_an_idle_output_active_and_restarts_the_countdown() {
        let mut generator = WithIdleness::new(BoundedOutOfOrderness::new(0), 100);
        let mut out = WatermarkOutput::new();
        periodic(&mut generator, 0, &mut out);
        periodic(&mut generator, 101, &mut out);
        assert!(out.is_idle(), "an input that never saw a record also turns idle");
        out.take_update();

        generator.on_event(&(), 7, &mut out);
        assert!(!out.is_idle());
        periodic(&mut generator, 150, &mut out);
        assert_eq!(
            out.take_update(),
            WatermarkUpdate { status: Some(WatermarkStatus::Active), watermark: Some(Watermark(6)) }
        );
        periodic(&mut generator, 200, &mut out); // countdown starts again here
        periodic(&mut generator, 300, &mut out);
        assert!(!out.is_idle());
        periodic(&mut generator, 301, &mut out);
        assert!(out.is_idle());
    }

    #[test]
    fn idleness_off_never_idles_and_timeout_must_be_positive() {
        let mut generator = WithIdleness::never_idle(Monotonic::new());
        let mut out = WatermarkOutput::new();
        for now_ms in [0, 1_000_000, i64::MAX] {
            periodic(&mut generator, now_ms, &mut out);
        }
        assert!(!out.is_idle());
        assert!(WithIdleness::try_new(Monotonic::new(), 0).is_err());
        assert_eq!(generator.idle_timeout_ms(), None);
        assert_eq!(generator.inner(), &Monotonic::new());
    }

    #[test]
    fn idleness_survives_a_clock_that_jumps_backwards() {
        let mut generator = WithIdleness::new(Monotonic::new(), 10);
        let mut out = WatermarkOutput::new();
        periodic(&mut generator, i64::MAX, &mut out);
        periodic(&mut generator, i64::MIN, &mut out);
        assert!(!out.is_idle());
    }

    #[test]
    fn strategy_makes_fresh_generators_and_assigners() {
        let strategy = WatermarkStrategy::bounded_out_of_orderness(5)
            .with_timestamp_assigner(|record: &i64, _: Option<i64>| *record * 2);
        let mut assigner = strategy.create_timestamp_assigner();
        assert_eq!(assigner.timestamp(&21, None), 42);
        let mut first = strategy.create_generator();
        let mut out = WatermarkOutput::new();
        first.on_event(&0, 100, &mut out);
        let second = strategy.create_generator();
        assert_eq!(second.inner().current_watermark(), None, "instances do not share state");
        assert_eq!(second.idle_timeout_ms(), None);

        let idle = WatermarkStrategy::monotonic().with_idleness(30);
        assert_eq!(idle.create_generator().idle_timeout_ms(), Some(30));
        assert!(WatermarkStrategy::monotonic().try_with_idleness(-1).is_err());
        assert_eq!(WatermarkStrategy::new(Monotonic::new()).idle_timeout_ms(), None);
    }

    // ---- valve ----

    fn wm(update: WatermarkUpdate) -> Option<i64> {
        update.watermark.map(Watermark::timestamp)
    }

    #[test]
    fn valve_emits_the_minimum_only_when_it_advances() {
        let mut valve = WatermarkValve::new(3);
        assert_eq!(wm(valve.on_watermark(0, Watermark(5))), None);
        assert_eq!(wm(valve.on_watermark(1, Watermark(3))), None);
        assert_eq!(wm(valve.on_watermark(2, Watermark(4))), Some(3));
        assert_eq!(wm(valve.on_watermark(1, Watermark(6))), Some(4));
        assert_eq!(wm(valve.on_watermark(2, Watermark(4))), None, "repeated watermark");
        assert_eq!(wm(valve.on_watermark(2, Watermark(1))), None, "backwards watermark");
        assert_eq!(valve.input_watermark(2), Watermark(4));
        assert_eq!(wm(valve.on_watermark(2, Watermark(9))), Some(5));
        assert_eq!(valve.current_watermark(), Watermark(5));
    }

    #[test]
    fn single_input_valve_passes_watermarks_through() {
        let mut valve = WatermarkValve::new(1);
        assert_eq!(wm(valve.on_watermark(0, Watermark(-10))), Some(-10));
        assert_eq!(wm(valve.on_watermark(0, Watermark(0))), Some(0));
        assert_eq!(valve.input_count(), 1);
    }

    #[test]
    fn idle_inputs_leave_the_minimum() {
        let mut valve = WatermarkValve::new(3);
        valve.on_watermark(0, Watermark(10));
        valve.on_watermark(1, Watermark(20));
        // Input 2 never sent anything: it holds the valve at MIN until it turns idle.
        assert_eq!(valve.current_watermark(), Watermark::MIN);
        let update = valve.on_idle(2);
        assert_eq!(update, WatermarkUpdate { status: None, watermark: Some(Watermark(10)) });
        assert_eq!(valve.input_status(2), InputStatus::Idle);
        assert_eq!(wm(valve.on_idle(0)), Some(20));
        assert!(!valve.is_idle());
    }

    #[test]
    fn all_idle_makes_the_valve_idle_at_the_maximum() {
        let mut valve = WatermarkValve::new(3);
        valve.on_watermark(0, Watermark(10));
        valve.on_watermark(1, Watermark(30));
        valve.on_watermark(2, Watermark(20));
        valve.on_idle(1);
        valve.on_idle(2);
        assert_eq!(valve.current_watermark(), Watermark(10));
        let update = valve.on_idle(0);
        assert_eq!(update, WatermarkUpdate { status: Some(WatermarkStatus::Idle), watermark: Some(Watermark(30)) });
        assert!(valve.is_idle());
        assert_eq!(valve.on_idle(0), WatermarkUpdate::NONE, "already idle");
    }

    #[test]
    fn reactivated_input_behind_the_output_does_not_pull_it_back() {
        let mut valve = WatermarkValve::new(2);
        valve.on_watermark(0, Watermark(10));
        valve.on_watermark(1, Watermark(50));
        valve.on_idle(0);
        assert_eq!(valve.current_watermark(), Watermark(50));

        let update = valve.on_active(0);
        assert_eq!(update, WatermarkUpdate::NONE, "input 0 is at 10 < 50: unaligned");
        assert_eq!(wm(valve.on_watermark(0, Watermark(40))), None);
        // Input 0 is unaligned: it does not hold the output back.
        assert_eq!(wm(valve.on_watermark(1, Watermark(60))), Some(60));
        assert_eq!(wm(valve.on_watermark(0, Watermark(65))), None, "caught up: aligned again");
        // Input 0 is part of the minimum again.
        assert_eq!(wm(valve.on_watermark(1, Watermark(80))), Some(65));
    }

    #[test]
    fn reactivation_while_idle_turns_the_valve_active() {
        let mut valve = WatermarkValve::new(2);
        valve.on_watermark(0, Watermark(10));
        valve.on_watermark(1, Watermark(20));
        valve.on_idle(0);
        valve.on_idle(1);
        assert!(valve.is_idle());
        assert_eq!(valve.current_watermark(), Watermark(20));
        let update = valve.on_active(0);
        assert_eq!(update, WatermarkUpdate { status: Some(WatermarkStatus::Active), watermark: None });
        assert!(!valve.is_idle());
        // Implicit reactivation by a watermark on an idle input.
        let update = valve.on_watermark(1, Watermark(25));
        assert_eq!(
            update,
            WatermarkUpdate { status: None, watermark: Some(Watermark(25)) },
            "input 0 (at 10) is unaligned, so input 1 alone sets the minimum"
        );
        assert_eq!(valve.current_watermark(), Watermark(25));
        assert_eq!(valve.input_status(1), InputStatus::Active);
    }

    #[test]
    fn unaligned_inputs_do_not_stop_the_flush_when_all_turn_idle() {
        // Flink's valve skips the flush here (see the type docs); this one does not.
        let mut valve = WatermarkValve::new(3);
        valve.on_watermark(0, Watermark(200));
        valve.on_watermark(1, Watermark(50));
        valve.on_watermark(2, Watermark(30));
        valve.on_idle(0);
        valve.on_idle(2);
        assert_eq!(valve.current_watermark(), Watermark(50));
        valve.on_active(2); // 30 < 50: unaligned
        valve.on_idle(1);
        assert_eq!(valve.current_watermark(), Watermark(50));
        let update = valve.on_idle(2);
        assert_eq!(update, WatermarkUpdate { status: Some(WatermarkStatus::Idle), watermark: Some(Watermark(200)) });
    }

    #[test]
    fn end_of_input_releases_the_input_and_all_ended_is_max() {
        let mut valve = WatermarkValve::new(2);
        valve.on_watermark(0, Watermark(10));
        valve.on_watermark(1, Watermark(20));
        assert_eq!(wm(valve.on_end_of_input(0)), Some(20));
        assert_eq!(valve.input_status(0), InputStatus::Ended);
        assert_eq!(valve.input_watermark(0), Watermark::MAX);
        assert_eq!(valve.on_watermark(0, Watermark(99)), WatermarkUpdate::NONE, "ignored after end");
        assert_eq!(valve.on_idle(0), WatermarkUpdate::NONE);
        assert_eq!(valve.on_active(0), WatermarkUpdate::NONE);
        assert!(!valve.is_ended());
        assert_eq!(valve.on_end_of_input(1), WatermarkUpdate { status: None, watermark: Some(Watermark::MAX) });
        assert!(valve.is_ended());
        assert_eq!(valve.on_end_of_input(1), WatermarkUpdate::NONE);
    }

    #[test]
    fn an_ended_input_does_not_release_idle_ones_to_max() {
        let mut valve = WatermarkValve::new(2);
        valve.on_watermark(0, Watermark(10));
        valve.on_watermark(1, Watermark(20));
        valve.on_idle(1);
        assert_eq!(valve.current_watermark(), Watermark(10));
        let update = valve.on_end_of_input(0);
        assert_eq!(update, WatermarkUpdate { status: Some(WatermarkStatus::Idle), watermark: Some(Watermark(20)) });
        // The idle input comes back and ends: now everything has ended.
        assert_eq!(
            valve.on_watermark(1, Watermark(30)),
            WatermarkUpdate { status: Some(WatermarkStatus::Active), watermark: Some(Watermark(30)) }
        );
        assert_eq!(wm(valve.on_end_of_input(1)), Some(i64::MAX));
        assert!(!valve.is_idle());
    }

    #[test]
    fn ending_the_last_idle_input_makes_an_idle_valve_active_at_max() {
        let mut valve = WatermarkValve::new(2);
        valve.on_end_of_input(0);
        valve.on_idle(1);
        assert!(valve.is_idle());
        let update = valve.on_end_of_input(1);
        assert_eq!(update, WatermarkUpdate { status: Some(WatermarkStatus::Active), watermark: Some(Watermark::MAX) });
    }

    #[test]
    #[should_panic(expected = "at least one input")]
    fn valve_needs_an_input() {
        let _ = WatermarkValve::new(0);
    }
}
