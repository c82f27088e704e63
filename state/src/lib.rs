//! placeholder
pub mod error;
pub use error::{ErrorClass, Result, StateError};
