//! `weir-state`: keyed state for weir, kept in memory-mapped, CRC-checked, append-only logs.
//!
//! This crate owns everything weir keeps on disk for state: segment files ([`segment`]), the
//! record format ([`record`]), the index and its snapshots ([`index`]), key groups
//! ([`keygroup`]), the per-shard [`StateStore`] with incremental checkpoints and restore
//! ([`store`]), typed keyed state ([`states`]), checkpoint manifests ([`manifest`]), and savepoints, the
//! canonical format organised by operator uid and key group that outlives a job version
//! ([`savepoint`]).
//!
//! It knows nothing of threads, executors or operators: a store is single-threaded, and the
//! work that makes a checkpoint durable is handed back as a [`store::DurabilityTask`] for the
//! caller to run wherever it likes (the runtime uses its blocking pool). That keeps it pure
//! enough to test against a model (`tests/model.rs`).
//!
//! Invariants:
//! - A byte before the last checkpoint's seal is never written again.
//! - Nothing read from a file is trusted before its CRC passed (records, index chunks,
//!   manifests), and no value from a file is accessed zero-copy before rkyv's bytecheck passed.
//! - A segment never changes size while mapped, and is fully allocated before it is mapped.
//! - A failed sync is never retried and then trusted.
//!
//! ```
//! use weir_state::{StateStore, StoreConfig, states::ValueState, store::{Key, RestoreOptions}};
//! let dir = tempfile::tempdir().unwrap();
//! let mut store = StateStore::create(dir.path(), StoreConfig::default()).unwrap();
//! let clicks: ValueState<u64> = ValueState::register(&mut store, "clicks/count").unwrap();
//! clicks.put(&mut store, Key::new(b"page-7", 4096), &3).unwrap();
//! let pending = store.checkpoint(1).unwrap();
//! pending.task.run().unwrap(); // off the executor in the runtime
//! drop(store);
//! let store = StateStore::restore(dir.path(), &pending.handle, StoreConfig::default(), RestoreOptions::default()).unwrap();
//! assert_eq!(clicks.get_owned(&store, Key::new(b"page-7", 4096)).unwrap(), Some(3));
//! ```

pub mod error;
mod faults;
pub mod fence;
pub mod index;
pub mod ingest;
pub mod keygroup;
pub mod manifest;
pub mod priority;
pub mod record;
pub mod savepoint;
pub mod segment;
pub mod states;
pub mod store;
pub mod warm;

pub use error::{ErrorClass, Result, StateError};
pub use store::{StateStore, StoreConfig};
