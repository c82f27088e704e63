//! The runtime's error type.

use weir_operators::OperatorError;
use weir_state::StateError;

/// An error that stops a job or fails a request to the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// An operator failed on a shard.
    #[error("operator {operator} on shard {shard} failed: {source}")]
    Operator {
        /// The operator's uid.
        operator: String,
        /// The shard it ran on.
        shard: usize,
        /// What failed.
        #[source]
        source: OperatorError,
    },
    /// User code panicked in an operator (or source, or sink).
    #[error("operator {operator} on shard {shard} panicked: {message}")]
    Panic {
        /// The operator's uid (or the stage, when the operator is not known).
        operator: String,
        /// The shard it ran on.
        shard: usize,
        /// The panic message.
        message: String,
    },
    /// A shard could not be started or failed outside any operator.
    #[error("shard {shard}: {reason}")]
    Shard {
        /// The shard.
        shard: usize,
        /// What went wrong.
        reason: String,
    },
    /// State storage failed outside an operator.
    #[error("state: {0}")]
    State(#[from] StateError),
    /// A source could not read its input.
    #[error("source {source_name}: {reason}")]
    Source {
        /// The source's uid.
        source_name: String,
        /// What went wrong.
        reason: String,
    },
    /// A sink could not write its output.
    #[error("sink {sink}: {reason}")]
    Sink {
        /// The sink (its uid or file).
        sink: String,
        /// What went wrong.
        reason: String,
    },
    /// The job description is invalid (for example two operators with one uid).
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// The job was cancelled.
    #[error("job cancelled")]
    Cancelled,
}

/// The runtime's result type.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
