//! Triggers: when a window emits its contents, and when it drops them.
//!
//! A [`Trigger`] is asked for a decision at three moments: a record was added to a window
//! ([`on_element`](Trigger::on_element)), an event-time timer it registered came due
//! ([`on_event_time`](Trigger::on_event_time)), or a processing-time timer did
//! ([`on_processing_time`](Trigger::on_processing_time)). Each answer is a [`TriggerResult`]:
//! *fire* (emit the window's contents) and/or *purge* (drop them).
//!
//! Triggers here are pure values, in the spirit of Flink's triggers but with their side effects
//! turned into data, so that the operator can persist them and tests can read them:
//!
//! - A trigger's per-window state (a count, for [`CountTrigger`]) is its associated
//!   [`State`](Trigger::State) type, owned by the operator (stored per key and window) and lent
//!   to each call.
//! - Timers a trigger wants are pushed into the [`TriggerContext`] as [`TimerRequest`]s; the
//!   operator registers or deletes them in its timer service and calls back when they fire.
//!   The context also tells the trigger the current watermark and processing time.
//!
//! ```
//! use weir_operators::time::{TimeDomain, Watermark};
//! use weir_operators::window::TimeWindow;
//! use weir_operators::window::trigger::{
//!     EventTimeTrigger, TimerAction, TimerRequest, Trigger, TriggerContext, TriggerResult,
//! };
//!
//! let window = TimeWindow::new(0, 10);
//! let mut ctx = TriggerContext::new(Watermark(5), 0);
//! let mut state = ();
//! // Not complete yet: ask for a timer at the window's end.
//! let result = EventTimeTrigger.on_element(&"record", 3, &window, &mut state, &mut ctx);
//! assert_eq!(result, TriggerResult::CONTINUE);
//! assert_eq!(
//!     ctx.timers(),
//!     [TimerRequest { action: TimerAction::Register, domain: TimeDomain::EventTime, time_ms: 9 }]
//! );
//! // The watermark reaches 9: the timer fires and so does the window.
//! let result = Trigger::<&str, _>::on_event_time(&EventTimeTrigger, 9, &window, &mut state, &mut ctx);
//! assert_eq!(result, TriggerResult::FIRE);
//! ```

use std::fmt::Debug;

use crate::time::{TimeDomain, Timestamp, Watermark};
use crate::window::Window;

/// A trigger's decision for one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TriggerResult {
    /// Emit the window's contents (through the window function) now.
    pub fire: bool,
    /// Drop the window's contents; the window itself stays until its cleanup time.
    pub purge: bool,
}

impl TriggerResult {
    /// Do nothing.
    pub const CONTINUE: TriggerResult = TriggerResult { fire: false, purge: false };
    /// Emit the contents and keep them (a later firing sees them again).
    pub const FIRE: TriggerResult = TriggerResult { fire: true, purge: false };
    /// Drop the contents without emitting.
    pub const PURGE: TriggerResult = TriggerResult { fire: false, purge: true };
    /// Emit the contents, then drop them.
    pub const FIRE_AND_PURGE: TriggerResult = TriggerResult { fire: true, purge: true };
}

/// Whether a timer request adds or removes a timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimerAction {
    /// Register a timer (registering the same time twice keeps one timer).
    Register,
    /// Delete a timer, if it exists.
    Delete,
}

/// A timer a trigger asks the operator to register or delete, for the current key and window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerRequest {
    /// Register or delete.
    pub action: TimerAction,
    /// The clock the timer runs on.
    pub domain: TimeDomain,
    /// When the timer fires: once the watermark (event time) or the processing clock reaches it.
    pub time_ms: Timestamp,
}

/// What a trigger sees of the world, and where it leaves its timer requests.
///
/// The operator keeps one context, sets the time before each call with
/// [`TriggerContext::set_time`], and drains the requests after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TriggerContext {
    watermark: Watermark,
    processing_time_ms: Timestamp,
    timers: Vec<TimerRequest>,
}

impl TriggerContext {
    /// A context at the given watermark and processing time, with no requests.
    pub const fn new(watermark: Watermark, processing_time_ms: Timestamp) -> Self {
        TriggerContext { watermark, processing_time_ms, timers: Vec::new() }
    }

    /// Moves the context to a new time; pending requests are kept.
    pub fn set_time(&mut self, watermark: Watermark, processing_time_ms: Timestamp) {
        self.watermark = watermark;
        self.processing_time_ms = processing_time_ms;
    }

    /// The operator's current watermark.
    pub const fn current_watermark(&self) -> Watermark {
        self.watermark
    }

    /// The current processing time.
    pub const fn current_processing_time_ms(&self) -> Timestamp {
        self.processing_time_ms
    }

    /// Asks for an event-time timer at `time_ms`.
    pub fn register_event_time_timer(&mut self, time_ms: Timestamp) {
        self.request(TimerAction::Register, TimeDomain::EventTime, time_ms);
    }

    /// Asks to delete the event-time timer at `time_ms`.
    pub fn delete_event_time_timer(&mut self, time_ms: Timestamp) {
        self.request(TimerAction::Delete, TimeDomain::EventTime, time_ms);
    }

    /// Asks for a processing-time timer at `time_ms`.
    pub fn register_processing_time_timer(&mut self, time_ms: Timestamp) {
        self.request(TimerAction::Register, TimeDomain::ProcessingTime, time_ms);
    }

    /// Asks to delete the processing-time timer at `time_ms`.
    pub fn delete_processing_time_timer(&mut self, time_ms: Timestamp) {
        self.request(TimerAction::Delete, TimeDomain::ProcessingTime, time_ms);
    }

    fn request(&mut self, action: TimerAction, domain: TimeDomain, time_ms: Timestamp) {
        self.timers.push(TimerRequest { action, domain, time_ms });
    }

    /// The requests made so far, in order.
    pub fn timers(&self) -> &[TimerRequest] {
        &self.timers
    }

    /// Removes and returns the requests made so far, in order.
    pub fn drain_timers(&mut self) -> std::vec::Drain<'_, TimerRequest> {
        self.timers.drain(..)
    }
}

/// Decides when a window of type `W` over records of type `T` fires and purges.
///
/// Methods take `&self`: a trigger's configuration is fixed, and everything that changes lives
/// in `state` (per key and window) or goes out through the context.
pub trait Trigger<T, W: Window> {
    /// Per-window state, owned by the operator. `Default` is the state of a new window.
    type State: Clone + Debug + Default + PartialEq;

    /// A record with timestamp `timestamp` was added to `window`.
    fn on_element(
        &self,
        element: &T,
        timestamp: Timestamp,
        window: &W,
        state: &mut Self::State,
        ctx: &mut TriggerContext,
    ) -> TriggerResult;

    /// An event-time timer at `time_ms` that this trigger registered for `window` came due.
    fn on_event_time(
        &self,
        time_ms: Timestamp,
        window: &W,
        state: &mut Self::State,
        ctx: &mut TriggerContext,
    ) -> TriggerResult;

    /// A processing-time timer at `time_ms` that this trigger registered for `window` came due.
    fn on_processing_time(
        &self,
        time_ms: Timestamp,
        window: &W,
        state: &mut Self::State,
        ctx: &mut TriggerContext,
    ) -> TriggerResult;

    /// Whether the trigger supports merging windows (sessions). An operator with a merging
    /// assigner must reject a trigger that does not.
    fn can_merge(&self) -> bool;

    /// Windows were merged into `window`; `merged_states` are the states of the windows that
    /// disappeared. Returns the state of `window`, and may register timers for it. The
    /// operator calls [`clear`](Trigger::clear) on each merged window afterwards. Only called
    /// if [`can_merge`](Trigger::can_merge) is true.
    fn on_merge(&self, window: &W, merged_states: &[Self::State], ctx: &mut TriggerContext) -> Self::State;

    /// `window` is being removed: delete its timers and reset `state`.
    fn clear(&self, window: &W, state: &mut Self::State, ctx: &mut TriggerContext);
}

/// Fires once the watermark passes the window's end (`max_timestamp`); the default trigger of
/// event-time windows. A record added to a window the watermark has already passed (a late
/// record within the allowed lateness) fires the window again at once: a *late firing*.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventTimeTrigger;

impl<T, W: Window> Trigger<T, W> for EventTimeTrigger {
    type State = ();

    fn on_element(
        &self,
        _element: &T,
        _timestamp: Timestamp,
        window: &W,
        _state: &mut (),
        ctx: &mut TriggerContext,
    ) -> TriggerResult {
        if ctx.current_watermark().has_passed(window.max_timestamp()) {
            TriggerResult::FIRE
        } else {
            ctx.register_event_time_timer(window.max_timestamp());
            TriggerResult::CONTINUE
        }
    }

    fn on_event_time(
        &self,
        time_ms: Timestamp,
        window: &W,
        _state: &mut (),
        _ctx: &mut TriggerContext,
    ) -> TriggerResult {
        if time_ms == window.max_timestamp() { TriggerResult::FIRE } else { TriggerResult::CONTINUE }
    }

    fn on_processing_time(&self, _: Timestamp, _: &W, _: &mut (), _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::CONTINUE
    }

    fn can_merge(&self) -> bool {
        true
    }

    fn on_merge(&self, window: &W, _merged_states: &[()], ctx: &mut TriggerContext) {
        // A merged window the watermark already passed fires through the next record's
        // on_element; only a window still in the future needs a timer.
        if !ctx.current_watermark().has_passed(window.max_timestamp()) {
            ctx.register_event_time_timer(window.max_timestamp());
        }
    }

    fn clear(&self, window: &W, _state: &mut (), ctx: &mut TriggerContext) {
        ctx.delete_event_time_timer(window.max_timestamp());
    }
}

/// Fires once the processing clock passes the window's end; the default trigger of
/// processing-time windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProcessingTimeTrigger;

impl<T, W: Window> Trigger<T, W> for ProcessingTimeTrigger {
    type State = ();

    fn on_element(
        &self,
        _element: &T,
        _timestamp: Timestamp,
        window: &W,
        _state: &mut (),
        ctx: &mut TriggerContext,
    ) -> TriggerResult {
        ctx.register_processing_time_timer(window.max_timestamp());
        TriggerResult::CONTINUE
    }

    fn on_event_time(&self, _: Timestamp, _: &W, _: &mut (), _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::CONTINUE
    }

    fn on_processing_time(&self, _: Timestamp, _: &W, _: &mut (), _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::FIRE
    }

    fn can_merge(&self) -> bool {
        true
    }

    fn on_merge(&self, window: &W, _merged_states: &[()], ctx: &mut TriggerContext) {
        if window.max_timestamp() > ctx.current_processing_time_ms() {
            ctx.register_processing_time_timer(window.max_timestamp());
        }
    }

    fn clear(&self, window: &W, _state: &mut (), ctx: &mut TriggerContext) {
        ctx.delete_processing_time_timer(window.max_timestamp());
    }
}

/// Fires every `count` records added to a window, and resets its count. Its state is the number
/// of records since the last firing. Merged windows add their counts (a merge never fires by
/// itself; the next record does, if the sum reached `count`).
///
/// Flink's `countWindow(n)` is [`GlobalWindows`](crate::window::assigner::GlobalWindows) with
/// `Purging<CountTrigger>`, made by [`CountTrigger::purging`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CountTrigger {
    count: u64,
}

impl CountTrigger {
    /// Fires every `count` records.
    ///
    /// # Panics
    /// If `count` is zero; see [`CountTrigger::try_new`].
    pub fn new(count: u64) -> Self {
        match Self::try_new(count) {
            Some(trigger) => trigger,
            None => panic!("a count trigger needs a count of at least 1"),
        }
    }

    /// Fires every `count` records, or `None` if `count` is zero.
    pub const fn try_new(count: u64) -> Option<Self> {
        if count > 0 { Some(CountTrigger { count }) } else { None }
    }

    /// Fires and purges every `count` records: tumbling count windows.
    ///
    /// # Panics
    /// If `count` is zero.
    pub fn purging(count: u64) -> Purging<CountTrigger> {
        Purging(Self::new(count))
    }

    /// The number of records per firing.
    pub const fn count(&self) -> u64 {
        self.count
    }
}

impl<T, W: Window> Trigger<T, W> for CountTrigger {
    type State = u64;

    fn on_element(
        &self,
        _element: &T,
        _timestamp: Timestamp,
        _window: &W,
        seen: &mut u64,
        _ctx: &mut TriggerContext,
    ) -> TriggerResult {
        *seen += 1;
        if *seen >= self.count {
            *seen = 0;
            TriggerResult::FIRE
        } else {
            TriggerResult::CONTINUE
        }
    }

    fn on_event_time(&self, _: Timestamp, _: &W, _: &mut u64, _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::CONTINUE
    }

    fn on_processing_time(&self, _: Timestamp, _: &W, _: &mut u64, _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::CONTINUE
    }

    fn can_merge(&self) -> bool {
        true
    }

    fn on_merge(&self, _window: &W, merged_states: &[u64], _ctx: &mut TriggerContext) -> u64 {
        merged_states.iter().fold(0, |sum, seen| sum.saturating_add(*seen))
    }

    fn clear(&self, _window: &W, seen: &mut u64, _ctx: &mut TriggerContext) {
        *seen = 0;
    }
}

/// Never fires: the default trigger of global windows, which without another trigger only
/// collect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NeverTrigger;

impl<T, W: Window> Trigger<T, W> for NeverTrigger {
    type State = ();

    fn on_element(&self, _: &T, _: Timestamp, _: &W, _: &mut (), _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::CONTINUE
    }

    fn on_event_time(&self, _: Timestamp, _: &W, _: &mut (), _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::CONTINUE
    }

    fn on_processing_time(&self, _: Timestamp, _: &W, _: &mut (), _: &mut TriggerContext) -> TriggerResult {
        TriggerResult::CONTINUE
    }

    fn can_merge(&self) -> bool {
        true
    }

    fn on_merge(&self, _: &W, _: &[()], _: &mut TriggerContext) {}

    fn clear(&self, _: &W, _: &mut (), _: &mut TriggerContext) {}
}

/// Wraps a trigger so that every firing also purges: the window emits what it collected since
/// the previous firing, not everything since it opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Purging<Tr>(pub Tr);

impl<Tr> Purging<Tr> {
    fn purge_on_fire(result: TriggerResult) -> TriggerResult {
        if result.fire { TriggerResult::FIRE_AND_PURGE } else { result }
    }
}

impl<T, W: Window, Tr: Trigger<T, W>> Trigger<T, W> for Purging<Tr> {
    type State = Tr::State;

    fn on_element(
        &self,
        element: &T,
        timestamp: Timestamp,
        window: &W,
        state: &mut Tr::State,
        ctx: &mut TriggerContext,
    ) -> TriggerResult {
        Self::purge_on_fire(self.0.on_element(element, timestamp, window, state, ctx))
    }

    fn on_event_time(
        &self,
        time_ms: Timestamp,
        window: &W,
        state: &mut Tr::State,
        ctx: &mut TriggerContext,
    ) -> TriggerResult {
        Self::purge_on_fire(self.0.on_event_time(time_ms, window, state, ctx))
    }

    fn on_processing_time(
        &self,
        time_ms: Timestamp,
        window: &W,
        state: &mut Tr::State,
        ctx: &mut TriggerContext,
    ) -> TriggerResult {
        Self::purge_on_fire(self.0.on_processing_time(time_ms, window, state, ctx))
    }

    fn can_merge(&self) -> bool {
        self.0.can_merge()
    }

    fn on_merge(&self, window: &W, merged_states: &[Tr::State], ctx: &mut TriggerContext) -> Tr::State {
        self.0.on_merge(window, merged_states, ctx)
    }

    fn clear(&self, window: &W, state: &mut Tr::State, ctx: &mut TriggerContext) {
        self.0.clear(window, state, ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{GlobalWindow, TimeWindow};

    fn event_timer(action: TimerAction, time_ms: Timestamp) -> TimerRequest {
        TimerRequest { action, domain: TimeDomain::EventTime, time_ms }
    }

    #[test]
    fn event_time_trigger_registers_then_fires_at_the_window_end() {
        let window = TimeWindow::new(0, 10);
        let mut ctx = TriggerContext::new(Watermark(3), 0);
        let result = EventTimeTrigger.on_element(&(), 4, &window, &mut (), &mut ctx);
        assert_eq!(result, TriggerResult::CONTINUE);
        assert_eq!(ctx.drain_timers().collect::<Vec<_>>(), [event_timer(TimerAction::Register, 9)]);
        assert!(ctx.timers().is_empty());
        let fire = |time_ms, ctx: &mut TriggerContext| {
            Trigger::<(), _>::on_event_time(&EventTimeTrigger, time_ms, &window, &mut (), ctx)
        };
        assert_eq!(fire(8, &mut ctx), TriggerResult::CONTINUE, "a timer that is not ours");
        assert_eq!(fire(9, &mut ctx), TriggerResult::FIRE);
        let processing = Trigger::<(), _>::on_processing_time(&EventTimeTrigger, 9, &window, &mut (), &mut ctx);
        assert_eq!(processing, TriggerResult::CONTINUE);
    }

    #[test]
    fn event_time_trigger_fires_at_once_for_a_passed_window() {
        let window = TimeWindow::new(0, 10);
        // Watermark exactly at max_timestamp: the window is complete.
        let mut ctx = TriggerContext::new(Watermark(9), 0);
        assert_eq!(EventTimeTrigger.on_element(&(), 2, &window, &mut (), &mut ctx), TriggerResult::FIRE);
        assert!(ctx.timers().is_empty());
        ctx.set_time(Watermark(8), 0);
        assert_eq!(EventTimeTrigger.on_element(&(), 2, &window, &mut (), &mut ctx), TriggerResult::CONTINUE);
    }

    #[test]
    fn event_time_trigger_merges_and_clears_timers() {
        let merged = TimeWindow::new(0, 20);
        let mut ctx = TriggerContext::new(Watermark(5), 0);
        Trigger::<(), _>::on_merge(&EventTimeTrigger, &merged, &[(), ()], &mut ctx);
        assert_eq!(ctx.drain_timers().collect::<Vec<_>>(), [event_timer(TimerAction::Register, 19)]);
        ctx.set_time(Watermark(19), 0);
        Trigger::<(), _>::on_merge(&EventTimeTrigger, &merged, &[()], &mut ctx);
        assert!(ctx.timers().is_empty(), "no timer for a merged window already passed");
        Trigger::<(), _>::clear(&EventTimeTrigger, &merged, &mut (), &mut ctx);
        assert_eq!(ctx.timers(), [event_timer(TimerAction::Delete, 19)]);
        assert!(Trigger::<(), TimeWindow>::can_merge(&EventTimeTrigger));
    }

    #[test]
    fn processing_time_trigger_fires_on_its_timer() {
        let window = TimeWindow::new(100, 200);
        let mut ctx = TriggerContext::new(Watermark::MIN, 150);
        assert_eq!(ProcessingTimeTrigger.on_element(&(), 0, &window, &mut (), &mut ctx), TriggerResult::CONTINUE);
        let registered =
            TimerRequest { action: TimerAction::Register, domain: TimeDomain::ProcessingTime, time_ms: 199 };
        assert_eq!(ctx.timers(), [registered]);
        let fired = Trigger::<(), _>::on_processing_time(&ProcessingTimeTrigger, 199, &window, &mut (), &mut ctx);
        assert_eq!(fired, TriggerResult::FIRE);
        let event = Trigger::<(), _>::on_event_time(&ProcessingTimeTrigger, 199, &window, &mut (), &mut ctx);
        assert_eq!(event, TriggerResult::CONTINUE);

        let mut ctx = TriggerContext::new(Watermark::MIN, 150);
        Trigger::<(), _>::on_merge(&ProcessingTimeTrigger, &window, &[], &mut ctx);
        assert_eq!(ctx.timers(), [registered]);
        let mut ctx = TriggerContext::new(Watermark::MIN, 199);
        Trigger::<(), _>::on_merge(&ProcessingTimeTrigger, &window, &[], &mut ctx);
        assert!(ctx.timers().is_empty());
        Trigger::<(), _>::clear(&ProcessingTimeTrigger, &window, &mut (), &mut ctx);
        assert_eq!(ctx.timers()[0].action, TimerAction::Delete);
        assert_eq!(ctx.current_processing_time_ms(), 199);
    }

    #[test]
    fn count_trigger_fires_every_n_and_resets() {
        let trigger = CountTrigger::new(3);
        let mut ctx = TriggerContext::new(Watermark::MIN, 0);
        let mut seen = 0;
        let results: Vec<_> = (0..7).map(|i| trigger.on_element(&i, i, &GlobalWindow, &mut seen, &mut ctx)).collect();
        let fired: Vec<bool> = results.iter().map(|r| r.fire).collect();
        assert_eq!(fired, [false, false, true, false, false, true, false]);
        assert!(results.iter().all(|r| !r.purge), "a plain count trigger keeps the contents");
        assert_eq!(seen, 1);
        assert!(ctx.timers().is_empty(), "counts need no timers");
        Trigger::<(), _>::clear(&trigger, &GlobalWindow, &mut seen, &mut ctx);
        assert_eq!(seen, 0);
        assert_eq!(trigger.count(), 3);
        assert_eq!(CountTrigger::try_new(0), None);
    }

    #[test]
    fn count_trigger_ignores_timers_and_sums_on_merge() {
        let trigger = CountTrigger::new(5);
        let window = TimeWindow::new(0, 10);
        let mut ctx = TriggerContext::new(Watermark::MAX, i64::MAX);
        let mut seen = 4;
        assert_eq!(Trigger::<(), _>::on_event_time(&trigger, 9, &window, &mut seen, &mut ctx), TriggerResult::CONTINUE);
        assert_eq!(
            Trigger::<(), _>::on_processing_time(&trigger, 9, &window, &mut seen, &mut ctx),
            TriggerResult::CONTINUE
        );
        let merged = Trigger::<(), _>::on_merge(&trigger, &window, &[2, 3, u64::MAX], &mut ctx);
        assert_eq!(merged, u64::MAX);
        let mut merged = Trigger::<(), _>::on_merge(&trigger, &window, &[2, 1], &mut ctx);
        assert_eq!(merged, 3);
        trigger.on_element(&(), 0, &window, &mut merged, &mut ctx);
        assert_eq!(trigger.on_element(&(), 0, &window, &mut merged, &mut ctx), TriggerResult::FIRE);
    }

    #[test]
    #[should_panic(expected = "at least 1")]
    fn count_trigger_needs_a_count() {
        let _ = CountTrigger::new(0);
    }

    #[test]
    fn purging_count_trigger_is_a_count_window() {
        let trigger = CountTrigger::purging(2);
        let mut ctx = TriggerContext::new(Watermark::MIN, 0);
        let mut seen = 0;
        assert_eq!(trigger.on_element(&(), 0, &GlobalWindow, &mut seen, &mut ctx), TriggerResult::CONTINUE);
        assert_eq!(trigger.on_element(&(), 0, &GlobalWindow, &mut seen, &mut ctx), TriggerResult::FIRE_AND_PURGE);
        assert!(Trigger::<(), GlobalWindow>::can_merge(&trigger));
        assert_eq!(Trigger::<(), _>::on_merge(&trigger, &GlobalWindow, &[1, 1], &mut ctx), 2);
        seen = 1;
        Trigger::<(), _>::clear(&trigger, &GlobalWindow, &mut seen, &mut ctx);
        assert_eq!(seen, 0);
    }

    #[test]
    fn purging_turns_every_fire_into_fire_and_purge() {
        let trigger = Purging(EventTimeTrigger);
        let window = TimeWindow::new(0, 10);
        let mut ctx = TriggerContext::new(Watermark(100), 0);
        assert_eq!(trigger.on_element(&(), 1, &window, &mut (), &mut ctx), TriggerResult::FIRE_AND_PURGE);
        let on_time = Trigger::<(), _>::on_event_time(&trigger, 9, &window, &mut (), &mut ctx);
        assert_eq!(on_time, TriggerResult::FIRE_AND_PURGE);
        let other = Trigger::<(), _>::on_event_time(&trigger, 8, &window, &mut (), &mut ctx);
        assert_eq!(other, TriggerResult::CONTINUE);
        let processing =
            Trigger::<(), _>::on_processing_time(&Purging(ProcessingTimeTrigger), 9, &window, &mut (), &mut ctx);
        assert_eq!(processing, TriggerResult::FIRE_AND_PURGE);
    }

    #[test]
    fn never_trigger_never_fires() {
        let mut ctx = TriggerContext::new(Watermark::MAX, i64::MAX);
        assert_eq!(NeverTrigger.on_element(&(), 0, &GlobalWindow, &mut (), &mut ctx), TriggerResult::CONTINUE);
        let results = [
            Trigger::<(), _>::on_event_time(&NeverTrigger, i64::MAX, &GlobalWindow, &mut (), &mut ctx),
            Trigger::<(), _>::on_processing_time(&NeverTrigger, i64::MAX, &GlobalWindow, &mut (), &mut ctx),
        ];
        assert_eq!(results, [TriggerResult::CONTINUE; 2]);
        Trigger::<(), _>::on_merge(&NeverTrigger, &GlobalWindow, &[], &mut ctx);
        Trigger::<(), _>::clear(&NeverTrigger, &GlobalWindow, &mut (), &mut ctx);
        assert!(ctx.timers().is_empty());
        assert!(Trigger::<(), GlobalWindow>::can_merge(&NeverTrigger));
    }

    #[test]
    fn trigger_result_constants() {
        assert_eq!(TriggerResult::default(), TriggerResult::CONTINUE);
        let flags = |result: TriggerResult| (result.fire, result.purge);
        assert_eq!(flags(TriggerResult::FIRE), (true, false));
        assert_eq!(flags(TriggerResult::PURGE), (false, true));
        assert_eq!(flags(TriggerResult::FIRE_AND_PURGE), (true, true));
    }
}
