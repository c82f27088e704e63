//! The one seam through which tests inject storage faults.
//!
//! Built on the `fail` crate: with the `failpoints` feature, a test configures a named point
//! (`fail::cfg("state::sync_segment", "return(eio)")`) and the next I/O at that point fails
//! with the given errno (`eio`, `enospc`); without the feature every check compiles to nothing.
//!
//! Points: `state::sync_segment` (msync/fsync of segments at a checkpoint),
//! `state::presync_segment` (the early fsync of new segment files by write-behind),
//! `state::write_file` (index snapshots and manifests), `state::write_segment` (the `pwrite`
//! of a segment's open tail into its file), `state::write_slot` and `state::sync_slot` (the
//! write and the `fdatasync` of a manifest's commit slot), `state::background_piece` (each piece of a paced background write; tests
//! configure `sleep(ms)` there to make it fall behind), `state::ingest_caught_up` (an ingest
//! reader that read everything durable, before it looks whether the log is closed; tests
//! configure `sleep(ms)` there to let a close run in between).

use std::path::Path;

use crate::error::Result;

/// Fails with an injected I/O error if the fail point `name` is configured.
#[inline(always)]
pub(crate) fn check(name: &str, path: &Path) -> Result<()> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(name, |arg: Option<String>| Err(injected(arg.as_deref(), path)));
    let _ = (name, path);
    Ok(())
}

#[cfg(feature = "failpoints")]
fn injected(arg: Option<&str>, path: &Path) -> crate::StateError {
    let errno = match arg {
        Some("enospc") => rustix::io::Errno::NOSPC,
        _ => rustix::io::Errno::IO,
    };
    crate::StateError::io("injected fault", path, std::io::Error::from_raw_os_error(errno.raw_os_error()))
}
