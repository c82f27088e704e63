//! placeholder
pub mod error;
mod faults;
pub mod index;
pub mod keygroup;
pub mod manifest;
pub mod record;
pub mod segment;
pub mod states;
pub mod store;
pub use error::{ErrorClass, Result, StateError};
pub use store::{StateStore, StoreConfig};
