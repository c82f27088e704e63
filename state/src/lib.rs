//! placeholder
pub mod error;
pub mod keygroup;
pub use error::{ErrorClass, Result, StateError};
