//! weir's benchmark crate: workloads, drivers and harnesses that exercise the runtime from
//! outside.
//!
//! - [`nexmark`]: a faithful, deterministic Nexmark event generator, random access by offset.

pub mod checkpoint_bench;
pub mod nexmark;
pub mod nexmark_queries;
pub mod pipeline_bench;
pub mod state_bench;
