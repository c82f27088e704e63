//! The state crate's one error type.
//!
//! Every error carries the context a reader needs to act on it (file, offset, checkpoint id)
//! and is classified by [`StateError::class`], so a caller can tell corrupt data from a full
//! disk from an I/O failure from its own misuse without matching on strings.

use std::io;
use std::path::PathBuf;

/// What kind of failure a [`StateError`] is, for callers that decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Bytes on disk failed a check (CRC, magic, bounds, rkyv validation). Never load them.
    Corruption,
    /// The disk is full (ENOSPC, EDQUOT). The operation failed; earlier data is intact.
    StorageFull,
    /// Any other I/O failure (EIO, permissions, ...). After a failed sync, treat the files
    /// as suspect: a failed fsync/msync is never retried and then trusted.
    Io,
    /// The caller asked for something the store cannot do (unknown checkpoint, bad argument).
    Misuse,
    /// The files were written by an incompatible format version.
    Incompatible,
}

/// An error from the state crate, with context.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Data at `file`:`offset` failed an integrity check.
    #[error("corrupt state in {file}:{offset}: {reason}", file = .file.display())]
    Corrupt {
        /// The file that holds the bad bytes.
        file: PathBuf,
        /// Byte offset of the bad record or structure in `file`.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// An I/O operation failed.
    #[error("{op} {path}: {source}", path = .path.display())]
    Io {
        /// The operation, e.g. "fallocate" or "msync".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The files were written in a format this build does not read.
    #[error("unsupported format in {file}: version {found}, this build reads {expected}", file = .file.display())]
    Incompatible {
        /// The file with the unknown format.
        file: PathBuf,
        /// The version found in the file.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// State partitioned into `found` key groups was offered to a store or savepoint with
    /// `expected` key groups. Key groups only map onto each other at equal max parallelism.
    #[error("max parallelism mismatch: {path} has {found} key groups, expected {expected}", path = .path.display())]
    MaxParallelismMismatch {
        /// The savepoint directory or store directory holding the state.
        path: PathBuf,
        /// Its max parallelism.
        found: u16,
        /// The max parallelism of the other side.
        expected: u16,
    },
    /// The caller misused the API.
    #[error("misuse: {0}")]
    Misuse(String),
}

impl StateError {
    /// Classifies the error; see [`ErrorClass`].
    pub fn class(&self) -> ErrorClass {
        match self {
            StateError::Corrupt { .. } => ErrorClass::Corruption,
            StateError::Io { source, .. } => match source.raw_os_error() {
                Some(code) if code == libc_enospc() || code == libc_edquot() => ErrorClass::StorageFull,
                _ if source.kind() == io::ErrorKind::StorageFull => ErrorClass::StorageFull,
                _ => ErrorClass::Io,
            },
            StateError::Incompatible { .. } | StateError::MaxParallelismMismatch { .. } => ErrorClass::Incompatible,
            StateError::Misuse(_) => ErrorClass::Misuse,
        }
    }

    /// Builds an [`StateError::Io`] for `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StateError::Io { op, path: path.into(), source }
    }

    /// Builds a [`StateError::Corrupt`] for `file` at `offset`.
    pub fn corrupt(file: impl Into<PathBuf>, offset: u64, reason: impl Into<String>) -> Self {
        StateError::Corrupt { file: file.into(), offset, reason: reason.into() }
    }
}

fn libc_enospc() -> i32 {
    rustix::io::Errno::NOSPC.raw_os_error()
}

fn libc_edquot() -> i32 {
    rustix::io::Errno::DQUOT.raw_os_error()
}

/// The state crate's result type.
pub type Result<T, E = StateError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_storage_full() {
        let e = StateError::io("fallocate", "/x", io::Error::from_raw_os_error(libc_enospc()));
        assert_eq!(e.class(), ErrorClass::StorageFull);
        let e = StateError::io("msync", "/x", io::Error::from_raw_os_error(5));
        assert_eq!(e.class(), ErrorClass::Io);
        assert_eq!(StateError::corrupt("/x", 7, "crc").class(), ErrorClass::Corruption);
        assert!(StateError::corrupt("/x", 7, "crc").to_string().contains("/x:7"));
    }
}
