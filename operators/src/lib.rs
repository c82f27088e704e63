//! `weir-operators`: the operator contract and the built-in operators of weir.
//!
//! An operator is single-threaded logic over keyed state ([`weir_state`]); it never sees a
//! thread, a channel or a file. The runtime drives it through the [`operator::Operator`] trait,
//! whose output collector is a generic parameter, so chained operators compile into direct
//! calls. [`harness::OperatorHarness`] drives one operator by hand for tests, the way Flink's
//! operator test harnesses do. Besides keyed state, an operator instance may checkpoint state
//! of its own, as lists redistributed on a restore ([`operator_state`]).
//!
//! Event time and windowing rest on pure, clock-free logic: [`time`] holds watermarks, the
//! watermark generators and idleness of sources, and the valve that combines an operator's
//! inputs into one watermark; [`window`] holds windows, assigners, triggers, allowed lateness and
//! the merging of session windows. Neither touches state, threads or files.

pub mod coprocess;
pub mod error;
pub mod harness;
pub mod join;
pub mod operator;
pub mod operator_state;
pub mod process;
pub mod reduce;
pub mod time;
pub mod timers;
pub mod window;

pub use error::{OperatorError, Result};
