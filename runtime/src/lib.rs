//! `weir`: the crate a service depends on.
pub mod error;
pub use error::{Result, RuntimeError};
pub mod chain;
pub mod clock;
pub mod job;
pub mod runner;
pub mod sink;
pub mod source;
pub mod stage;
