//! `weir`: a thread-per-core stateful stream processor, embedded as a library.
//!
//! A service builds a [`Job`] in code, runs it on `P` shards (one glommio executor per core,
//! each owning a range of key groups and its own memory-mapped state store), and reads results
//! from a sink. Records cross cores only at a keyed exchange, in batches, over bounded
//! channels; operators between exchanges are chained into direct calls.
//!
//! ```no_run
//! use weir::prelude::*;
//!
//! let job = Job::new("clicks-per-minute");
//! let out = CollectSink::new();
//! job.source_with_watermarks(
//!     "clicks",
//!     VecSource::new(vec![("page-1".to_string(), 1_000i64), ("page-2".to_string(), 61_000)]),
//!     WatermarkStrategy::bounded_out_of_orderness(5_000).with_timestamp_assigner(|c: &(String, i64), _: Option<i64>| c.1),
//! )
//! .key_by("by-page", |c: &(String, i64)| c.0.clone())
//! .window("per-minute", TumblingWindows::event_time(60_000))
//! .aggregate(Count::new(), |page: &String, w: TimeWindow, n: u64| (page.clone(), w.start(), n))
//! .sink("out", out.clone());
//! job.run(JobConfig::default()).unwrap().wait().unwrap();
//! ```
//!
//! Modules: [`job`] (the API), [`source`] and [`sink`], [`chain`] and [`stage`] (how a job
//! runs), [`runner`] (shards, exchange, the job handle), [`clock`].

pub mod chain;
pub mod checkpoint;
pub mod checkpointing;
pub mod clock;
pub mod element;
pub mod error;
pub mod exchange;
pub mod job;
pub mod runner;
pub mod shard;
pub mod sink;
pub mod source;
pub mod stage;
pub mod twophase;

pub use error::{Result, RuntimeError};
pub use job::{Job, JobConfig};
pub use weir_operators as operators;
pub use weir_state as state;

/// Everything a typical job needs, in one import.
pub mod prelude {
    pub use crate::clock::{Clock, ManualClock, SystemClock};
    pub use crate::job::{Job, JobConfig, KeyedStream, Stream, WindowedStream};
    pub use crate::runner::{JobHandle, JobMetrics, JobReport, StageMetrics};
    pub use crate::sink::{CallbackSink, CollectSink, FileSink, Sink, SinkWriter};
    pub use crate::source::{FileSource, Generator, GeneratorSource, IterSource, Source, SourceReader, VecSource};
    pub use crate::{Result, RuntimeError};
    pub use weir_operators::operator::{Keyed, OutputTag, Timestamp};
    pub use weir_operators::process::{KeyedProcessFunction, ProcessContext, StateRegistry};
    pub use weir_operators::time::{TimeDomain, WatermarkStrategy};
    pub use weir_operators::window::TimeWindow;
    pub use weir_operators::window::assigner::{SessionWindows, SlidingWindows, TumblingWindows};
    pub use weir_operators::window::operator::{AggregateFunction, Count, LATE, LateRecord, Reduce};
    pub use weir_state::states::{ListState, MapState, ValueState};
}
