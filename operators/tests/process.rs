//! Keyed process functions through the operator harness: state, event-time and processing-time
//! timers, side outputs, and snapshot/restore in the middle of a stream.

use weir_operators::Result;
use weir_operators::harness::OperatorHarness;
use weir_operators::operator::{Keyed, OutputTag};
use weir_operators::process::{KeyedProcessFunction, KeyedProcessOperator, ProcessContext, StateRegistry};
use weir_operators::timers::TimeDomain;
use weir_state::states::ValueState;

const MINUTE: i64 = 60_000;
const SMALL: f64 = 1.0;
const LARGE: f64 = 500.0;
const SUSPICIOUS: OutputTag<String> = OutputTag::new("suspicious");

/// Flink's fraud-detection walkthrough: a small transaction followed by a large one within a
/// minute (processing time) raises an alert.
#[derive(Default)]
struct FraudDetector {
    flag: Option<ValueState<bool>>,
    timer: Option<ValueState<i64>>,
}

impl KeyedProcessFunction for FraudDetector {
    type Key = u64;
    type In = f64;
    type Out = u64;

    fn open(&mut self, states: &mut StateRegistry<'_>) -> Result<()> {
        self.flag = Some(states.value("flag")?);
        self.timer = Some(states.value("timer")?);
        Ok(())
    }

    fn process(&mut self, amount: f64, ctx: &mut ProcessContext<'_, u64, u64>) -> Result<()> {
        let (flag, timer) = (self.flag.expect("opened"), self.timer.expect("opened"));
        if ctx.value(&flag)?.unwrap_or(false) {
            if amount > LARGE {
                let account = *ctx.key();
                ctx.output(account);
                ctx.side_output(SUSPICIOUS, format!("account {account}: {amount}"));
            }
            if let Some(t) = ctx.value(&timer)? {
                ctx.delete_processing_timer(t)?;
            }
            ctx.clear(&flag)?;
            ctx.clear(&timer)?;
        }
        if amount < SMALL {
            ctx.set(&flag, &true)?;
            let t = ctx.processing_time() + MINUTE;
            ctx.register_processing_timer(t)?;
            ctx.set(&timer, &t)?;
        }
        Ok(())
    }

    fn on_timer(&mut self, _: i64, domain: TimeDomain, ctx: &mut ProcessContext<'_, u64, u64>) -> Result<()> {
        assert_eq!(domain, TimeDomain::ProcessingTime);
        ctx.clear(&self.flag.expect("opened"))?;
        ctx.clear(&self.timer.expect("opened"))?;
        Ok(())
    }
}

fn tx(account: u64, amount: f64) -> Keyed<u64, f64> {
    Keyed { key: account, value: amount }
}

#[test]
fn fraud_detector_alerts_small_then_large_within_a_minute() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = OperatorHarness::new(dir.path(), "fraud", KeyedProcessOperator::new(FraudDetector::default())).unwrap();
    h.set_processing_time(1_000).unwrap();
    h.process(tx(1, 0.5), 0).unwrap();
    h.process(tx(2, 0.5), 0).unwrap();
    h.process(tx(1, 900.0), 0).unwrap(); // small then large: alert
    h.set_processing_time(1_000 + MINUTE + 1).unwrap(); // account 2's flag expires
    h.process(tx(2, 900.0), 0).unwrap(); // too late: no alert
    h.process(tx(3, 900.0), 0).unwrap(); // large without small: no alert
    assert_eq!(h.take_output().into_iter().map(|(a, _)| a).collect::<Vec<_>>(), vec![1]);
    assert_eq!(h.take_side_output(SUSPICIOUS).len(), 1);
}

#[test]
fn flags_and_timers_survive_snapshot_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = OperatorHarness::new(dir.path(), "fraud", KeyedProcessOperator::new(FraudDetector::default())).unwrap();
    h.set_processing_time(1_000).unwrap();
    h.process(tx(1, 0.1), 0).unwrap();
    h.process(tx(2, 0.1), 0).unwrap();
    let handle = h.snapshot().unwrap();
    // After the snapshot, account 1 is cleared; a crash loses that.
    h.process(tx(1, 5.0), 0).unwrap();
    let mut h = h.restore(&handle, KeyedProcessOperator::new(FraudDetector::default())).unwrap();
    h.process(tx(1, 600.0), 0).unwrap(); // the flag came back with the snapshot
    assert_eq!(h.take_output().into_iter().map(|(a, _)| a).collect::<Vec<_>>(), vec![1]);
    // Account 2's processing-time timer came back too: it fires and clears the flag.
    h.set_processing_time(1_000 + MINUTE).unwrap();
    h.process(tx(2, 600.0), 0).unwrap();
    assert!(h.take_output().is_empty());
}

/// Event-time timers fire in time order, once, when the watermark passes them.
struct Delay;

impl KeyedProcessFunction for Delay {
    type Key = String;
    type In = i64;
    type Out = (String, i64);

    fn process(&mut self, delay: i64, ctx: &mut ProcessContext<'_, String, (String, i64)>) -> Result<()> {
        let at = ctx.timestamp().unwrap_or(0) + delay;
        ctx.register_event_timer(at)?;
        ctx.register_event_timer(at)?; // idempotent
        Ok(())
    }

    fn on_timer(
        &mut self,
        ts: i64,
        domain: TimeDomain,
        ctx: &mut ProcessContext<'_, String, (String, i64)>,
    ) -> Result<()> {
        assert_eq!(domain, TimeDomain::EventTime);
        let key = ctx.key().clone();
        ctx.output((key, ts));
        Ok(())
    }
}

#[test]
fn event_timers_fire_in_order_once_and_survive_restore() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = OperatorHarness::new(dir.path(), "delay", KeyedProcessOperator::new(Delay)).unwrap();
    h.process(Keyed { key: "a".into(), value: 30 }, 100).unwrap();
    h.process(Keyed { key: "b".into(), value: 10 }, 100).unwrap();
    h.process(Keyed { key: "c".into(), value: 50 }, 100).unwrap();
    h.watermark(115).unwrap();
    assert_eq!(h.take_output(), vec![(("b".to_string(), 110), 110)]);
    let handle = h.snapshot().unwrap();
    let mut h = h.restore(&handle, KeyedProcessOperator::new(Delay)).unwrap();
    h.watermark(i64::MAX).unwrap();
    assert_eq!(h.take_output(), vec![(("a".to_string(), 130), 130), (("c".to_string(), 150), 150)]);
    h.watermark(i64::MAX).unwrap();
    assert!(h.take_output().is_empty());
}

/// Keeps a value per key; registers a timer only for every 400th key.
struct ManyKeysFewTimers {
    seen: Option<ValueState<u64>>,
}

impl KeyedProcessFunction for ManyKeysFewTimers {
    type Key = u64;
    type In = u64;
    type Out = u64;

    fn open(&mut self, states: &mut StateRegistry<'_>) -> Result<()> {
        self.seen = Some(states.value("seen")?);
        Ok(())
    }

    fn process(&mut self, v: u64, ctx: &mut ProcessContext<'_, u64, u64>) -> Result<()> {
        ctx.set(&self.seen.expect("opened"), &v)?;
        if *ctx.key() % 400 == 0 {
            ctx.register_event_timer(1_000 + *ctx.key() as i64)?;
        }
        Ok(())
    }

    fn on_timer(&mut self, ts: i64, _: TimeDomain, ctx: &mut ProcessContext<'_, u64, u64>) -> Result<()> {
        ctx.output(ts as u64);
        Ok(())
    }
}

#[test]
fn timers_live_in_their_own_store_so_a_restore_rebuilds_them_from_timers_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut h =
        OperatorHarness::new(dir.path(), "few", KeyedProcessOperator::new(ManyKeysFewTimers { seen: None })).unwrap();
    for k in 0..1200u64 {
        h.process(Keyed { key: k, value: k }, 0).unwrap();
    }
    let snapshot = h.snapshot().unwrap();
    let h = h.restore(&snapshot, KeyedProcessOperator::new(ManyKeysFewTimers { seen: None })).unwrap();
    assert_eq!(h.timer_store().stats().keys, 3, "the timer store holds the 3 timers and nothing else");
    assert!(h.store().stats().keys >= 1200, "the keyed state lives in the state store");
    let mut h = h;
    h.watermark(i64::MAX).unwrap();
    assert_eq!(h.take_output().into_iter().map(|(t, _)| t).collect::<Vec<_>>(), vec![1_000, 1_400, 1_800]);
}
