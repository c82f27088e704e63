//! placeholder
pub mod error;
pub mod index;
pub mod keygroup;
pub mod record;
pub mod segment;
pub use error::{ErrorClass, Result, StateError};
