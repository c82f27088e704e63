//! The operators crate's error type.

use weir_state::StateError;

/// An error raised while running an operator.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The state store failed (corruption, I/O, full disk, misuse).
    #[error("state: {0}")]
    State(#[from] StateError),
    /// A list of operator state could not be written or read back (see
    /// [`crate::operator_state`]): an item that fails to serialise, bytes that fail validation.
    #[error("operator state {name}: {reason}")]
    OperatorState {
        /// The list's name.
        name: String,
        /// What failed.
        reason: String,
    },
    /// User code reported an error.
    #[error("user function failed: {0}")]
    User(String),
}

/// The operators crate's result type.
pub type Result<T, E = OperatorError> = std::result::Result<T, E>;
