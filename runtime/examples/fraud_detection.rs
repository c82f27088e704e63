//! Flink's fraud-detection walkthrough as a keyed process function: a small transaction
//! (under $1.00) followed within a minute by a large one (over $500) on the same account raises
//! an alert. Per-account state (a flag and the timer's time) lives in the mapped state store; a
//! processing-time timer clears the flag after a minute.
//!
//! Run: `cargo run --release -p weir --example fraud_detection`

use weir::prelude::*;

const SMALL: f64 = 1.00;
const LARGE: f64 = 500.00;
const ONE_MINUTE: i64 = 60_000;

/// One transaction: (account, amount).
type Transaction = (u64, f64);

#[derive(Default)]
struct FraudDetector {
    flag: Option<ValueState<bool>>,
    timer: Option<ValueState<i64>>,
}

impl KeyedProcessFunction for FraudDetector {
    type Key = u64;
    type In = Transaction;
    type Out = String;

    fn open(&mut self, states: &mut StateRegistry<'_>) -> weir::operators::Result<()> {
        self.flag = Some(states.value("flag")?);
        self.timer = Some(states.value("timer")?);
        Ok(())
    }

    fn process(
        &mut self,
        (account, amount): Transaction,
        ctx: &mut ProcessContext<'_, u64, String>,
    ) -> weir::operators::Result<()> {
        let (flag, timer) = (self.flag.expect("opened"), self.timer.expect("opened"));
        if ctx.value(&flag)?.unwrap_or(false) {
            if amount > LARGE {
                ctx.output(format!("ALERT account {account}: ${amount:.2} right after a small charge"));
            }
            if let Some(t) = ctx.value(&timer)? {
                ctx.delete_processing_timer(t)?;
            }
            ctx.clear(&flag)?;
            ctx.clear(&timer)?;
        }
        if amount < SMALL {
            ctx.set(&flag, &true)?;
            let t = ctx.processing_time() + ONE_MINUTE;
            ctx.register_processing_timer(t)?;
            ctx.set(&timer, &t)?;
        }
        Ok(())
    }

    fn on_timer(
        &mut self,
        _: i64,
        _: TimeDomain,
        ctx: &mut ProcessContext<'_, u64, String>,
    ) -> weir::operators::Result<()> {
        ctx.clear(&self.flag.expect("opened"))?;
        ctx.clear(&self.timer.expect("opened"))?;
        Ok(())
    }
}

fn main() {
    let transactions: Vec<Transaction> = vec![
        (1, 0.50), // small ...
        (2, 20.00),
        (1, 900.00), // ... then large on the same account: alert
        (3, 0.10),
        (3, 40.00), // small then medium: no alert, flag cleared
        (3, 700.00),
        (4, 800.00), // large without small: no alert
    ];
    let job = Job::new("fraud-detection");
    let alerts = CollectSink::new();
    job.source("transactions", VecSource::new(transactions))
        .key_by("by-account", |t: &Transaction| t.0)
        .process("fraud-detector", FraudDetector::default)
        .sink("alerts", alerts.clone());
    let config =
        JobConfig { data_dir: std::env::temp_dir().join("weir-examples"), ..JobConfig::default() }.with_parallelism(1);
    job.run(config).and_then(|h| h.wait()).expect("the job runs");
    let alerts: Vec<String> = alerts.take().into_iter().map(|(a, _)| a).collect();
    for alert in &alerts {
        println!("{alert}");
    }
    assert_eq!(alerts.len(), 1);
    assert!(alerts[0].starts_with("ALERT account 1"));
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        super::main();
    }
}
