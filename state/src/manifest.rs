//! The checkpoint directory: one manifest per complete checkpoint, written atomically.
//!
//! # Layout
//! ```text
//! <root>/
//!   manifests/chk-<id>.manifest   one per complete checkpoint or savepoint
//!   <store dirs>                  named by the runtime (e.g. `g0-shard-1/`), each a StateStore
//! ```
//! A checkpoint is *complete* exactly when its manifest exists under its final name: it is
//! written to `chk-<id>.manifest.tmp`, fsynced, renamed, and the directory fsynced
//! ([`CheckpointDirectory::commit`]). A crash before the rename leaves only a temp file, which
//! is ignored and cleaned up.
//!
//! # Manifest file layout
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"WEIRMAN\0"` |
//! | 8 | 4 | format version ([`MANIFEST_FORMAT_VERSION`]) |
//! | 12 | 4 | payload length |
//! | 16 | 8 | checkpoint id |
//! | 24 | 4 | CRC-32 of the payload |
//! | 28 | 4 | CRC-32 of bytes 0..28 |
//! | 32 | payload length | the [`Manifest`], an rkyv archive (validated with bytecheck on read) |

use std::path::{Path, PathBuf};

use rkyv::util::AlignedVec;

use crate::error::{Result, StateError};
use crate::segment::{sync_dir, u32_at, u64_at};
use crate::store::{CheckpointHandle, write_durably_fenced};

/// Magic bytes of a manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"WEIRMAN\0";
/// Version of the manifest format.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;
const MANIFEST_HEADER_BYTES: usize = 32;

/// Whether a manifest describes a periodic checkpoint or a user-requested savepoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum SnapshotKind {
    /// A periodic checkpoint, owned and released by the coordinator.
    Checkpoint,
    /// A savepoint: never released automatically.
    Savepoint,
}

/// One shard's part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ShardSnapshot {
    /// The shard.
    pub shard: u32,
    /// Its store directory, relative to the checkpoint root.
    pub store_dir: String,
    /// The store's handle.
    pub handle: CheckpointHandle,
}

/// Everything needed to restore a job from one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Manifest {
    /// The checkpoint.
    pub checkpoint_id: u64,
    /// Checkpoint or savepoint.
    pub kind: SnapshotKind,
    /// Wall-clock time it was taken, epoch milliseconds.
    pub created_ms: u64,
    /// Parallelism of the job when it was taken.
    pub parallelism: u32,
    /// Number of key groups of the job.
    pub max_parallelism: u16,
    /// Every shard's store handle.
    pub shards: Vec<ShardSnapshot>,
    /// The runtime's own metadata (source offsets, operator uids, ...), opaque here.
    pub metadata: Vec<u8>,
}

impl Manifest {
    /// Encodes the manifest file: header and payload.
    pub fn encode(&self) -> Vec<u8> {
        let payload = rkyv::to_bytes::<rkyv::rancor::Error>(self).map(|b| b.to_vec()).unwrap_or_default();
        let mut out = vec![0u8; MANIFEST_HEADER_BYTES];
        out[0..8].copy_from_slice(&MANIFEST_MAGIC);
        out[8..12].copy_from_slice(&MANIFEST_FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.checkpoint_id.to_le_bytes());
        out[24..28].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        let header_crc = crc32fast::hash(&out[0..28]);
        out[28..32].copy_from_slice(&header_crc.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Decodes and checks a manifest file's bytes; `path` is for error context. Never panics.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Manifest> {
        let corrupt = |offset: u64, reason: &str| StateError::corrupt(path, offset, reason);
        if bytes.len() < MANIFEST_HEADER_BYTES {
            return Err(corrupt(0, "manifest shorter than its header"));
        }
        if bytes[0..8] != MANIFEST_MAGIC {
            return Err(corrupt(0, "bad manifest magic"));
        }
        if u32_at(bytes, 28) != crc32fast::hash(&bytes[0..28]) {
            return Err(corrupt(0, "manifest header CRC mismatch"));
        }
        let version = u32_at(bytes, 8);
        if version != MANIFEST_FORMAT_VERSION {
            return Err(StateError::Incompatible {
                file: path.to_owned(),
                found: version,
                expected: MANIFEST_FORMAT_VERSION,
            });
        }
        let len = u32_at(bytes, 12) as usize;
        let payload = &bytes[MANIFEST_HEADER_BYTES..];
        if payload.len() != len {
            return Err(corrupt(MANIFEST_HEADER_BYTES as u64, "manifest payload has the wrong length"));
        }
        if crc32fast::hash(payload) != u32_at(bytes, 24) {
            return Err(corrupt(MANIFEST_HEADER_BYTES as u64, "manifest payload CRC mismatch"));
        }
        let mut aligned = AlignedVec::<16>::with_capacity(len);
        aligned.extend_from_slice(payload);
        let manifest = rkyv::from_bytes::<Manifest, rkyv::rancor::Error>(&aligned)
            .map_err(|e| corrupt(MANIFEST_HEADER_BYTES as u64, &format!("manifest fails validation: {e}")))?;
        if manifest.checkpoint_id != u64_at(bytes, 16) {
            return Err(corrupt(16, "manifest header and payload disagree on the checkpoint id"));
        }
        Ok(manifest)
    }
}

/// A checkpoint root directory and its manifests.
#[derive(Debug, Clone)]
pub struct CheckpointDirectory {
    root: PathBuf,
    manifests: PathBuf,
    /// The writer's fence: commits and removals happen inside it (see [`crate::fence`]).
    fence: Option<std::sync::Arc<crate::fence::Fence>>,
}

/// The result of looking for the newest usable checkpoint.
#[derive(Debug)]
pub struct LatestCheckpoint {
    /// The newest manifest that passed every check, if any.
    pub manifest: Option<Manifest>,
    /// Newer manifests that failed a check and were skipped, with the reason.
    pub skipped: Vec<StateError>,
}

fn manifest_file_name(id: u64) -> String {
    format!("chk-{id:010}.manifest")
}

fn parse_manifest_file_name(name: &str) -> Option<u64> {
    name.strip_prefix("chk-")?.strip_suffix(".manifest")?.parse().ok()
}

impl CheckpointDirectory {
    /// Opens (creating if needed) the checkpoint root `root`. Safe while a job commits
    /// checkpoints to it (readers, `weir inspect`): temp files are left alone.
    pub fn open(root: &Path) -> Result<CheckpointDirectory> {
        let manifests = root.join("manifests");
        std::fs::create_dir_all(&manifests).map_err(|e| StateError::io("create checkpoint dir", &manifests, e))?;
        Ok(CheckpointDirectory { root: root.to_owned(), manifests, fence: None })
    }

    /// [`CheckpointDirectory::open`] for the one writer, before it commits anything: also
    /// removes temp files left by a crash or a fenced commit. A stopped writer still writing a
    /// temp file then fails its commit (its fence is closed anyway).
    pub fn open_for_writing(root: &Path) -> Result<CheckpointDirectory> {
        let dir = CheckpointDirectory::open(root)?;
        for entry in std::fs::read_dir(&dir.manifests).map_err(|e| StateError::io("list", &dir.manifests, e))? {
            let entry = entry.map_err(|e| StateError::io("list", &dir.manifests, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") || name.ends_with(crate::store::TRASH_SUFFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(dir)
    }

    /// This directory with its commits and removals inside `fence`: once the fence is closed
    /// they fail without touching a name (a stopped run attempt's coordinator, still in an
    /// fsync, never commits over the next attempt's manifests).
    pub fn with_fence(mut self, fence: std::sync::Arc<crate::fence::Fence>) -> CheckpointDirectory {
        self.fence = Some(fence);
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of checkpoint `id`'s manifest.
    pub fn manifest_path(&self, id: u64) -> PathBuf {
        self.manifests.join(manifest_file_name(id))
    }

    /// Writes `manifest` atomically: temp file, fsync, rename, fsync of the directory. When this
    /// returns `Ok`, the checkpoint is complete and survives a crash.
    pub fn commit(&self, manifest: &Manifest) -> Result<()> {
        let _foreground = crate::priority::Foreground::begin();
        let path = self.manifest_path(manifest.checkpoint_id);
        write_durably_fenced(&path, &[&manifest.encode()], &self.manifests, self.fence.as_deref(), None)
    }

    /// Ids of all manifests present (valid or not), ascending.
    pub fn list(&self) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.manifests).map_err(|e| StateError::io("list", &self.manifests, e))? {
            let entry = entry.map_err(|e| StateError::io("list", &self.manifests, e))?;
            if let Some(id) = parse_manifest_file_name(&entry.file_name().to_string_lossy()) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Reads and checks manifest `id`.
    pub fn read(&self, id: u64) -> Result<Manifest> {
        let path = self.manifest_path(id);
        let bytes = std::fs::read(&path).map_err(|e| StateError::io("read manifest", &path, e))?;
        let manifest = Manifest::decode(&bytes, &path)?;
        if manifest.checkpoint_id != id {
            return Err(StateError::corrupt(&path, 16, "manifest names another checkpoint"));
        }
        Ok(manifest)
    }

    /// The newest manifest that passes its checks; newer ones that fail are reported, never used.
    pub fn latest(&self) -> Result<LatestCheckpoint> {
        let mut skipped = Vec::new();
        for id in self.list()?.into_iter().rev() {
            match self.read(id) {
                Ok(manifest) => return Ok(LatestCheckpoint { manifest: Some(manifest), skipped }),
                Err(e) => skipped.push(e),
            }
        }
        Ok(LatestCheckpoint { manifest: None, skipped })
    }

    /// Deletes manifest `id` (the checkpoint is no longer restorable).
    pub fn remove(&self, id: u64) -> Result<()> {
        let path = self.manifest_path(id);
        let remove = || std::fs::remove_file(&path).map_err(|e| StateError::io("delete manifest", &path, e));
        match &self.fence {
            Some(fence) => fence.pass(remove).unwrap_or_else(|| {
                Err(StateError::Misuse(format!("not deleting {}: its writer was stopped", path.display())))
            })?,
            None => remove()?,
        }
        sync_dir(&self.manifests)
    }

    /// Deletes every manifest newer than `id`: after restoring `id`, the stores continue from
    /// its seals and overwrite what later checkpoints referenced.
    pub fn discard_after(&self, id: u64) -> Result<Vec<u64>> {
        let newer: Vec<u64> = self.list()?.into_iter().filter(|&m| m > id).collect();
        for &m in &newer {
            self.remove(m)?;
        }
        Ok(newer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest(id: u64) -> Manifest {
        Manifest {
            checkpoint_id: id,
            kind: SnapshotKind::Checkpoint,
            created_ms: 1_700_000_000_000,
            parallelism: 2,
            max_parallelism: 128,
            shards: Vec::new(),
            metadata: b"offsets".to_vec(),
        }
    }

    #[test]
    fn a_closed_fence_stops_commits_and_removals_without_touching_a_name() {
        let root = tempfile::tempdir().unwrap();
        let fence = std::sync::Arc::new(crate::fence::Fence::new());
        let dir = CheckpointDirectory::open_for_writing(root.path()).unwrap().with_fence(std::sync::Arc::clone(&fence));
        dir.commit(&manifest(1)).unwrap();
        fence.close();
        assert!(dir.commit(&manifest(2)).is_err(), "no commit after the fence closed");
        assert!(dir.remove(1).is_err(), "no removal after the fence closed");
        let reader = CheckpointDirectory::open(root.path()).unwrap();
        assert_eq!(reader.list().unwrap(), vec![1]);
        assert_eq!(reader.latest().unwrap().manifest.map(|m| m.checkpoint_id), Some(1));
        let names: Vec<String> = std::fs::read_dir(root.path().join("manifests"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "the fenced commit's temp file went to trash: {names:?}");
    }

    #[test]
    fn latest_skips_corrupt_and_ignores_temp_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = CheckpointDirectory::open(root.path()).unwrap();
        assert!(dir.latest().unwrap().manifest.is_none());
        for id in [1, 2, 3] {
            dir.commit(&manifest(id)).unwrap();
        }
        std::fs::write(dir.manifest_path(4).with_extension("manifest.tmp"), b"half").unwrap();
        assert_eq!(dir.latest().unwrap().manifest.unwrap().checkpoint_id, 3);
        let path = dir.manifest_path(3);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        let latest = dir.latest().unwrap();
        assert_eq!(latest.manifest.unwrap().checkpoint_id, 2);
        assert_eq!(latest.skipped.len(), 1);
        assert_eq!(latest.skipped[0].class(), crate::ErrorClass::Corruption);
        assert!(latest.skipped[0].to_string().contains("chk-0000000003"));
        let dir = CheckpointDirectory::open(root.path()).unwrap();
        assert!(dir.manifest_path(4).with_extension("manifest.tmp").exists(), "a reader leaves temp files alone");
        let dir = CheckpointDirectory::open_for_writing(root.path()).unwrap();
        assert!(!dir.manifest_path(4).with_extension("manifest.tmp").exists(), "the writer removes them");
        assert_eq!(dir.list().unwrap(), vec![1, 2, 3]);
        assert_eq!(dir.discard_after(1).unwrap(), vec![2, 3]);
        assert_eq!(dir.list().unwrap(), vec![1]);
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_detects_every_flip(at in 0usize..400, bit in 0u8..8, junk in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Manifest::decode(&junk, Path::new("x"));
            let good = manifest(9).encode();
            let mut bad = good.clone();
            let at = at % bad.len();
            bad[at] ^= 1 << bit;
            prop_assert!(Manifest::decode(&bad, Path::new("x")).is_err());
            prop_assert_eq!(Manifest::decode(&good, Path::new("x")).unwrap(), manifest(9));
        }
    }
}
