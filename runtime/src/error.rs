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
    /// A checkpoint, a savepoint or a restore failed (for a restore: before anything ran).
    #[error("checkpoint: {0}")]
    Checkpoint(String),

    // --- shards and exchanges (shard.rs, exchange.rs): begin ---
    /// A shard or exchange configuration value is out of range (zero parallelism, zero
    /// batch length, ...).
    #[error("invalid shard configuration: {0}")]
    InvalidShardConfig(String),

    /// A shard panicked. The message is the panic payload when it is a string.
    #[error("shard {shard} panicked: {message}")]
    ShardPanicked {
        /// Index of the shard.
        shard: usize,
        /// The panic message.
        message: String,
    },

    /// A shard's function returned an error.
    #[error("shard {shard} failed: {source}")]
    ShardFailed {
        /// Index of the shard.
        shard: usize,
        /// The error the shard returned.
        source: Box<RuntimeError>,
    },

    /// The shard was stopped because another shard failed first.
    #[error("shard {shard} was stopped because another shard failed")]
    ShardAborted {
        /// Index of the shard.
        shard: usize,
    },

    /// An input of an exchange closed before it delivered end-of-input: the upstream shard
    /// failed or dropped its sender.
    #[error("exchange input from shard {source_shard} closed before end-of-input")]
    InputClosed {
        /// The upstream shard whose channel closed.
        source_shard: usize,
    },

    /// A send found its target's receiver gone: the downstream shard failed or dropped it.
    #[error("exchange target shard {target} is closed")]
    TargetClosed {
        /// The downstream shard.
        target: usize,
    },

    /// A send named a shard that does not exist.
    #[error("exchange target shard {target} out of range (parallelism {parallelism})")]
    InvalidTarget {
        /// The requested target.
        target: usize,
        /// The number of shards.
        parallelism: usize,
    },

    /// An element was sent to a target after end-of-input was sent to it.
    #[error("send to shard {target} after end-of-input")]
    SendAfterEndOfInput {
        /// The target that had already received end-of-input.
        target: usize,
    },

    /// Every input that has not ended is blocked: `next` would wait forever.
    #[error("every open exchange input is blocked; unblock one before receiving")]
    AllInputsBlocked,

    /// An exchange handle was used twice on one shard, or with the wrong shard set.
    #[error("exchange {index} is not available on this shard: {reason}")]
    ExchangeUnavailable {
        /// The exchange's index in its [`Exchanges`](crate::exchange::Exchanges).
        index: usize,
        /// Why.
        reason: ExchangeUnavailable,
    },
    // --- shards and exchanges: end ---
}

// --- shards and exchanges (shard.rs, exchange.rs): begin ---
impl RuntimeError {
    /// Whether this error is the consequence of another shard's failure (a closed channel or
    /// an abort) rather than a cause. `run_shards` reports a cause in preference.
    /// `AllInputsBlocked` counts as one: an aligning stage whose blocked input's shard failed
    /// never polls that input, so it sees every input blocked instead of one closed (it was
    /// reported instead of an injected panic in 4 of 24 runs of the exactly-once test). Alone,
    /// with no cause beside it, it is still what is reported.
    pub fn is_consequence(&self) -> bool {
        match self {
            RuntimeError::InputClosed { .. }
            | RuntimeError::TargetClosed { .. }
            | RuntimeError::ShardAborted { .. }
            | RuntimeError::AllInputsBlocked => true,
            RuntimeError::ShardFailed { source, .. } => source.is_consequence(),
            _ => false,
        }
    }
}

/// Why an exchange handle could not be turned into endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeUnavailable {
    /// This shard already took the exchange.
    AlreadyTaken,
    /// The handle belongs to another `Exchanges` set.
    ForeignHandle,
}

impl std::fmt::Display for ExchangeUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeUnavailable::AlreadyTaken => f.write_str("already taken"),
            ExchangeUnavailable::ForeignHandle => f.write_str("handle from another exchange set"),
        }
    }
}
// --- shards and exchanges: end ---

/// The runtime's result type.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
