//! The state store of one shard: a segment log, its index, checkpoints and restore.
//!
//! # Write path
//! 1. A put looks the key up in the [`Index`]. If the key's newest record lies in the *mutable
//!    region* (at or after the last checkpoint's seal) and the new value fits in its slot, the
//!    record is rewritten in place and its CRC recomputed: a hot key costs one record per
//!    checkpoint interval, not one per update.
//! 2. Otherwise a new record is appended at the log tail (rolling to a new, preallocated
//!    segment when the current one is full) and the index points at it. Records before the
//!    seal are never modified.
//!
//! # Checkpoint path (where "durable" is decided)
//! 1. [`StateStore::checkpoint`] seals the tail: the seal becomes the start of the new mutable
//!    region, so nothing before it changes again. Nothing is re-serialised: the log is the
//!    snapshot. Every few checkpoints it also copies the index table (memcpy speed) for an
//!    index snapshot. A checkpoint whose restore would replay more of the log than
//!    [`StoreConfig::max_replay_bytes`] names a snapshot its own task writes (copied by
//!    [`StateStore::maintain`] meanwhile): that bounds recovery time.
//! 2. It returns a [`PendingCheckpoint`]: the [`CheckpointHandle`] (what a manifest records)
//!    and a [`DurabilityTask`] to run off the caller's thread. The task fsyncs new segment
//!    files and their directory (those a [`WriteBehindTask`] has not fsynced already),
//!    `msync(MS_SYNC)`s only the bytes written since the last
//!    durable checkpoint, and writes + fsyncs the index snapshot file and the directory.
//! 3. When the task returns `Ok`, the shard's part of checkpoint n is durable. Checkpoint n is
//!    *complete* only once the coordinator has written its manifest ([`crate::manifest`]).
//!    A failed sync is never retried and then trusted: the store refuses further checkpoints
//!    until it is restored from a complete checkpoint.
//!
//! # Restore
//! [`StateStore::restore`] maps the handle's segments and its index snapshot and replays only
//! the log between the snapshot's seal and the checkpoint's seal, checking every replayed
//! record's CRC. Records covered by the index snapshot are CRC-checked when first read
//! (and their values validated with rkyv's bytecheck), index chunks when first probed; so
//! restore does not read the whole state and its time does not grow with it.
//! [`RestoreOptions::verify_all`] checks everything up front instead.
//!
//! The replay does not touch the mapped index snapshot either: it goes into a small delta in
//! front of it (see [`crate::index`]), so its cost follows the replayed tail, not the state size.
//! [`StateStore::maintain`], called between batches, folds the delta into the snapshot's table a
//! bounded number of entries at a time; the store answers correctly before, during and after.
//! Until the fold is done no index snapshot is started (a checkpoint keeps referencing the
//! restored one), and whatever needs all entries at once finishes the fold first.

use std::any::TypeId;
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rkyv::util::AlignedVec;

use crate::error::{Result, StateError};
use crate::index::{FoldStatus, Found, Index, Replayed};
use crate::keygroup::{KeyGroup, KeyGroupRange};
use crate::record::{self, FLAG_UNVALIDATED, RecordHeader, RecordKind, StateId};
use crate::segment::{
    SEGMENT_HEADER_BYTES, SPARE_SEGMENT_FILE, Segment, SegmentFlusher, SegmentHeader, SegmentId,
    parse_segment_file_name, segment_file_name, sync_dir,
};

/// A position in a store's log: segment id in the high 32 bits, byte offset in the low 32.
pub type LogAddress = u64;

/// The largest segment id: the top bit of a [`LogAddress`] stays clear (the index uses it to
/// mark tombstones).
pub const MAX_SEGMENT_ID: SegmentId = (1 << 31) - 1;

/// Builds a log address.
pub const fn log_address(segment: SegmentId, offset: u32) -> LogAddress {
    ((segment as u64) << 32) | offset as u64
}

/// The segment of a log address.
pub const fn address_segment(addr: LogAddress) -> SegmentId {
    (addr >> 32) as SegmentId
}

/// The byte offset of a log address within its segment.
pub const fn address_offset(addr: LogAddress) -> u32 {
    addr as u32
}

/// A key as the store sees it: its stable encoding and its key group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key<'a> {
    /// The key group (computed once per record by whoever routed it).
    pub group: KeyGroup,
    /// The key's stable encoding ([`crate::keygroup::KeyEncode`]).
    pub bytes: &'a [u8],
}

impl<'a> Key<'a> {
    /// A key with its group computed from `bytes`.
    pub fn new(bytes: &'a [u8], max_parallelism: u16) -> Key<'a> {
        Key { group: crate::keygroup::key_group_of_encoded(bytes, max_parallelism), bytes }
    }
}

/// How a store lays out and checkpoints its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The shard that owns the store (recorded in segment headers).
    pub shard: u32,
    /// Size of each segment file. Default 64 MiB; tests use a few KiB to exercise rolling.
    pub segment_bytes: u32,
    /// Number of key groups of the job.
    pub max_parallelism: u16,
    /// The key groups this store holds.
    pub key_groups: KeyGroupRange,
    /// Write an index snapshot at least every this many checkpoints.
    pub index_snapshot_every: u32,
    /// Write an index snapshot when this many log bytes were appended since the last one, so
    /// that restore replays a bounded tail.
    pub index_snapshot_tail_bytes: u64,
    /// The most log bytes a restore of any checkpoint replays on top of its index snapshot
    /// (what bounds recovery time). Index snapshots are normally written apart from the
    /// checkpoints ([`PendingCheckpoint::detach_index`]), so a checkpoint names the newest one
    /// already durable; a checkpoint whose replay from there would be longer than this (after
    /// a bulk load, or with snapshots held up by a slow disk) names a newer one instead, and
    /// its durability task waits for it (that checkpoint takes longer): a detached snapshot
    /// not yet written, if a replay from its seal is within the bound (the task writes it if
    /// its own task has not started); otherwise one of its own seal (or of a recent one),
    /// which its task writes once [`StateStore::maintain`] has copied it. Detached snapshots
    /// still unwritten when the replay nears the bound hurry (see `crate::priority::Urgent`).
    /// `u64::MAX` switches the bound off.
    pub max_replay_bytes: u64,
    /// Incremental compaction ([`StateStore::compact_step`]) runs while the log holds more
    /// than this percentage of the live bytes (space amplification). 0 switches it off.
    pub compact_above_percent: u32,
    /// Keep the slots of the newest index snapshot written in memory, as written, until a
    /// newer one is: a store dropped for an in-process restart ([`StateStore::retire`]) hands
    /// them to the warm pool ([`crate::warm`]), and the restore of a checkpoint that names that
    /// snapshot takes them as its table instead of reading the file (each chunk still checked
    /// against the file's CRCs). Costs a second buffer the size of the index table (16 bytes a
    /// slot) per store. Default on.
    pub resident_index_snapshot: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let max = crate::keygroup::DEFAULT_MAX_PARALLELISM;
        StoreConfig {
            shard: 0,
            segment_bytes: 64 << 20,
            max_parallelism: max,
            key_groups: KeyGroupRange::all(max),
            index_snapshot_every: 16,
            index_snapshot_tail_bytes: 64 << 20,
            max_replay_bytes: DEFAULT_MAX_REPLAY_BYTES,
            compact_above_percent: 200,
            resident_index_snapshot: true,
        }
    }
}

/// The default [`StoreConfig::max_replay_bytes`].
pub const DEFAULT_MAX_REPLAY_BYTES: u64 = 128 << 20;

/// How much to check when restoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Check every CRC of the checkpoint (all index chunks and every record it references)
    /// before returning. Takes time proportional to the state size; by default records and
    /// index chunks are checked lazily, on first access.
    pub verify_all: bool,
}

/// One segment a checkpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SegmentRef {
    /// The segment's id.
    pub id: SegmentId,
    /// Where its records end, as of the checkpoint.
    pub data_end: u32,
    /// Bytes of records in it that are live (newest for their key) as of the checkpoint.
    pub live_bytes: u64,
}

/// An index snapshot a checkpoint restores from.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct IndexSnapshotRef {
    /// The checkpoint at which it was written (names the file `index-<id>.idx`).
    pub checkpoint_id: u64,
    /// The log address up to which it reflects the log.
    pub seal: LogAddress,
    /// The segments its entries point into. A replay on top of the snapshot compares keys
    /// against those records, so every checkpoint based on it keeps these segments.
    pub segments: Vec<SegmentId>,
}

impl IndexSnapshotRef {
    /// The snapshot's file name.
    pub fn file_name(&self) -> String {
        index_file_name(self.checkpoint_id)
    }
}

/// A file in a store's directory whose name ends in this is garbage (a caller of
/// [`StateStore::garbage`] renamed it so before deleting it).
pub const TRASH_SUFFIX: &str = ".trash";

/// Records a restore decodes before it replays them into the index together (256 KiB of
/// decoded records, about 2.3 MiB of a log of 144-byte records). Small, as the memory of every
/// piece is touched anew at each restore (a handful of them circulate between the threads),
/// and memory the process has not touched before faulted in at 0.5-0.7 GB/s on the test
/// machine (a virtual machine).
const REPLAY_PIECE: usize = 1 << 14;

/// The size of a record a restore sizes its index delta by when the checkpoint holds no key
/// to estimate it from.
const DEFAULT_RECORD_BYTES: u64 = 128;

/// A replayed tail at least this long is decoded on a helper thread (see `StateStore::replay`).
const PARALLEL_REPLAY_BYTES: u64 = 16 << 20;

/// The part `[start, end)` of segment `id` a restore replays.
struct TailRange<'a> {
    id: SegmentId,
    segment: &'a Segment,
    start: u32,
    end: u32,
}

/// Decodes the records of `ranges` in order, checking each CRC, and hands them to `emit`
/// [`REPLAY_PIECE`] at a time; stops early when `emit` returns false. Returns the bytes
/// decoded, or the first bad record as a corruption error naming its file and offset.
fn decode_tail(
    ranges: &[TailRange<'_>],
    mut emit: impl FnMut(Vec<Replayed>) -> bool,
    mut empty_piece: impl FnMut() -> Vec<Replayed>,
) -> Result<u64> {
    let mut decoded = 0;
    let mut piece = empty_piece();
    for range in ranges {
        let mut off = range.start;
        while off < range.end {
            let bytes = range.segment.data(off, range.end);
            let h = record::decode_checked(bytes).map_err(|e| {
                StateError::corrupt(range.segment.path(), u64::from(off), format!("bad record in replay: {e:?}"))
            })?;
            let hash = StateStore::hash(h.state, record::key_of(bytes, &h));
            let addr = log_address(range.id, off);
            piece.push(match h.kind {
                RecordKind::Put => Replayed::put(hash, addr),
                RecordKind::Delete => Replayed::delete(hash, addr),
            });
            if piece.len() == REPLAY_PIECE && !emit(std::mem::replace(&mut piece, empty_piece())) {
                return Ok(decoded);
            }
            off += h.slot_bytes();
            decoded += u64::from(h.slot_bytes());
        }
    }
    if !piece.is_empty() {
        emit(piece);
    }
    Ok(decoded)
}

/// The name under which a store keeps one index snapshot file no one needs any more, for the
/// next snapshot to be written over (see [`SPARE_SEGMENT_FILE`]).
pub const SPARE_INDEX_FILE: &str = "index.spare";

/// The file name of the index snapshot written at checkpoint `id`.
pub fn index_file_name(id: u64) -> String {
    format!("index-{id:010}.idx")
}

fn parse_index_file_name(name: &str) -> Option<u64> {
    name.strip_prefix("index-")?.strip_suffix(".idx")?.parse().ok()
}

/// A named state registered in a store.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StateInfo {
    /// The state's name (`<operator uid>/<state name>` by convention).
    pub name: String,
    /// Its id ([`state_id_of`] of the name).
    pub id: StateId,
}

/// What one shard's store contributes to a checkpoint: everything needed to restore it.
/// It is recorded in the checkpoint's manifest; retained checkpoints share segments.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct CheckpointHandle {
    /// The checkpoint.
    pub checkpoint_id: u64,
    /// The shard whose store this is.
    pub shard: u32,
    /// Number of key groups of the job.
    pub max_parallelism: u16,
    /// First key group held.
    pub key_group_start: u16,
    /// One past the last key group held.
    pub key_group_end: u16,
    /// The seal: the log address up to which the checkpoint holds the log.
    pub seal: LogAddress,
    /// The next sequence number to assign.
    pub next_seq: u64,
    /// Every segment needed, by ascending id.
    pub segments: Vec<SegmentRef>,
    /// The index snapshot to start from, if any (else replay from the first segment).
    pub index_snapshot: Option<IndexSnapshotRef>,
    /// The named states in the store.
    pub states: Vec<StateInfo>,
    /// Live keys (all states) at the seal.
    pub key_count: u64,
}

impl CheckpointHandle {
    /// The key groups the store held.
    pub fn key_groups(&self) -> KeyGroupRange {
        KeyGroupRange::new(self.key_group_start, self.key_group_end)
    }

    /// Live bytes of state at the seal.
    pub fn live_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.live_bytes).sum()
    }

    /// Log bytes a restore of this checkpoint replays on top of its index snapshot (from the
    /// start of its first segment without one): what its restore time follows. The store
    /// keeps it within [`StoreConfig::max_replay_bytes`].
    pub fn replay_bytes(&self) -> u64 {
        let from = match (&self.index_snapshot, self.segments.first()) {
            (Some(index), _) => index.seal,
            (None, Some(first)) => log_address(first.id, SEGMENT_HEADER_BYTES),
            (None, None) => return 0,
        };
        let (first, last) = (address_segment(from), address_segment(self.seal));
        self.segments
            .iter()
            .filter(|s| (first..=last).contains(&s.id))
            .map(|s| {
                let start = if s.id == first { address_offset(from) } else { SEGMENT_HEADER_BYTES };
                let end = if s.id == last { address_offset(self.seal) } else { s.data_end };
                u64::from(end.saturating_sub(start))
            })
            .sum()
    }

    /// Encodes the handle (rkyv; the manifest adds the CRC).
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain owned data into a Vec cannot fail.
        rkyv::to_bytes::<rkyv::rancor::Error>(self).map(|b| b.to_vec()).unwrap_or_default()
    }

    /// Decodes and validates a handle (bytecheck): never panics on arbitrary bytes.
    pub fn decode(bytes: &[u8]) -> std::result::Result<CheckpointHandle, String> {
        let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<CheckpointHandle, rkyv::rancor::Error>(&aligned).map_err(|e| e.to_string())
    }
}

/// The stable id of a state name: its xxh3 hash, truncated. Collisions are detected when a
/// state is registered.
pub fn state_id_of(name: &str) -> StateId {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes()) as StateId
}

/// What is shared between the store and its in-flight durability tasks.
#[derive(Debug, Default)]
struct Ledger {
    /// Everything before this address is durable.
    synced_upto: LogAddress,
    /// The newest index snapshot whose file is durable.
    confirmed_index: Option<IndexSnapshotRef>,
    /// Set when a sync failed: the files are suspect until a restore.
    failed_sync: Option<String>,
    /// The buffer of the last index snapshot, handed back for the next one.
    spare_index_buf: Option<crate::index::SnapshotBuf>,
    /// The newest index snapshot written, its slots as written, if kept
    /// ([`StoreConfig::resident_index_snapshot`]).
    resident: Option<ResidentIndex>,
    /// Whether to keep `resident`.
    keep_resident: bool,
    /// Index snapshots written apart from their checkpoint ([`PendingCheckpoint::detach_index`])
    /// and not confirmed yet. One becomes `confirmed_index` once its file is durable and the
    /// log up to its seal is synced. Their files and segments are kept meanwhile, and no
    /// further snapshot starts. (At most two: one copy may have started before the previous
    /// one was detached.)
    detached_index: Vec<Detached>,
    /// New segments whose file (allocation) and name a write-behind task already made durable:
    /// the next checkpoint need not fsync them.
    presynced: Vec<SegmentId>,
}

/// The slots of an index snapshot as written to its file, and what identifies the file.
#[derive(Debug)]
struct ResidentIndex {
    checkpoint_id: u64,
    path: PathBuf,
    /// The file's bytes before the slots.
    header: Vec<u8>,
    slots: crate::index::SnapshotBuf,
}

impl Ledger {
    /// Takes back the buffer of an index snapshot whose write ended, with the file's header if
    /// it was written durably: kept as the resident snapshot if it is the newest written, else
    /// the spare for the next snapshot. Returns a buffer to free, for the caller to drop once
    /// it let go of the ledger (freeing a large buffer takes milliseconds).
    fn index_written(&mut self, w: IndexWrite, header: Option<Vec<u8>>) -> Option<crate::index::SnapshotBuf> {
        let id = w.snapshot.checkpoint_id;
        let newest = self.resident.as_ref().is_none_or(|r| r.checkpoint_id < id);
        let spare = match header {
            Some(header) if self.keep_resident && newest => {
                let resident = ResidentIndex { checkpoint_id: id, path: w.path, header, slots: w.slots };
                self.resident.replace(resident).map(|r| r.slots)
            }
            _ => Some(w.slots),
        };
        match spare {
            Some(buf) if self.spare_index_buf.is_none() => {
                self.spare_index_buf = Some(buf);
                None
            }
            other => other,
        }
    }

    /// Confirms the detached index snapshot if its file is durable and the log it reflects is.
    fn promote_detached(&mut self) {
        let synced_upto = self.synced_upto;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.detached_index)
            .into_iter()
            .partition(|d| d.write.is_durable() && d.snapshot.seal <= synced_upto);
        self.detached_index = waiting;
        for Detached { snapshot, .. } in ready {
            if self.confirmed_index.as_ref().is_none_or(|c| c.checkpoint_id < snapshot.checkpoint_id) {
                self.confirmed_index = Some(snapshot);
            }
        }
    }

    /// Forgets the detached snapshot of checkpoint `id` (abandoned or failed).
    fn drop_detached(&mut self, id: u64) {
        self.detached_index.retain(|d| d.snapshot.checkpoint_id != id);
    }
}

/// A detached index snapshot the ledger waits for.
#[derive(Debug)]
struct Detached {
    snapshot: IndexSnapshotRef,
    write: Arc<DetachedWrite>,
}

/// An index snapshot detached from its checkpoint ([`PendingCheckpoint::detach_index`]),
/// shared by its [`IndexSnapshotTask`], the store's ledger, and a later checkpoint past the
/// replay bound that names it instead of copying and writing a snapshot of its own (see
/// [`StoreConfig::max_replay_bytes`]). Whoever comes first writes it: the task (paced, in the
/// background), or that checkpoint's durability task if it finds the write still queued (at
/// full speed: the checkpoint waits for it); the other one then waits for it or does nothing.
#[derive(Debug)]
struct DetachedWrite {
    state: Mutex<DetachedState>,
    written: std::sync::Condvar,
}

#[derive(Debug)]
struct DetachedState {
    stage: DetachedStage,
    /// Held while the snapshot is urgent (see [`crate::priority::Urgent`]) and not written.
    urgent: Option<crate::priority::Urgent>,
}

#[derive(Debug)]
enum DetachedStage {
    Queued(IndexWrite),
    Writing,
    /// Whether the file was written durably.
    Written(bool),
}

impl DetachedWrite {
    fn new(write: IndexWrite) -> Arc<DetachedWrite> {
        let state = DetachedState { stage: DetachedStage::Queued(write), urgent: None };
        Arc::new(DetachedWrite { state: Mutex::new(state), written: std::sync::Condvar::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DetachedState> {
        // Nothing panics while holding it; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks the snapshot urgent until it is written.
    fn hurry(&self) {
        let mut state = self.lock();
        if !matches!(state.stage, DetachedStage::Written(_)) {
            state.urgent.get_or_insert_with(crate::priority::Urgent::begin);
        }
    }

    /// Bytes of slots still queued to be written.
    fn queued_bytes(&self) -> u64 {
        match &self.lock().stage {
            DetachedStage::Queued(w) => w.slots.len() as u64,
            _ => 0,
        }
    }

    /// Takes the write for the caller to do, if nobody has started it.
    fn take(&self) -> Option<IndexWrite> {
        let mut state = self.lock();
        match std::mem::replace(&mut state.stage, DetachedStage::Writing) {
            DetachedStage::Queued(w) => Some(w),
            other => {
                state.stage = other;
                None
            }
        }
    }

    /// Writes `w` (taken with [`DetachedWrite::take`]) durably, paced when `pace` is given,
    /// and records the outcome in `ledger` and for whoever waits. Returns the bytes written.
    fn write(
        &self,
        w: IndexWrite,
        dir: &Path,
        ledger: &Mutex<Ledger>,
        fence: Option<&crate::fence::Fence>,
        pace: Option<u64>,
    ) -> Result<u64> {
        let header = crate::index::snapshot_header(w.capacity, w.len, w.snapshot.seal, &w.slots);
        let written = write_durably_fenced(&w.path, &[&header, &w.slots], dir, fence, pace);
        let bytes = (header.len() + w.slots.len()) as u64;
        // The outcome first: the ledger reads it from here.
        self.finish(written.is_ok());
        let id = w.snapshot.checkpoint_id;
        let mut freed = None;
        if let Ok(mut ledger) = ledger.lock() {
            freed = ledger.index_written(w, written.is_ok().then_some(header));
            match &written {
                Ok(()) => ledger.promote_detached(),
                Err(_) => ledger.drop_detached(id),
            }
        }
        drop(freed);
        written.map(|()| bytes)
    }

    /// Whether the file was written durably.
    fn is_durable(&self) -> bool {
        matches!(self.lock().stage, DetachedStage::Written(true))
    }

    fn finish(&self, durable: bool) {
        let mut state = self.lock();
        state.stage = DetachedStage::Written(durable);
        state.urgent = None;
        self.written.notify_all();
    }

    /// Waits until the snapshot is written by another thread; fails if it was not (written
    /// badly or abandoned), or once `fence` closes.
    fn wait(&self, fence: Option<&crate::fence::Fence>, checkpoint_id: u64) -> Result<()> {
        let mut state = self.lock();
        loop {
            match state.stage {
                DetachedStage::Written(true) => return Ok(()),
                DetachedStage::Written(false) => {
                    return Err(StateError::Misuse(format!(
                        "checkpoint {checkpoint_id} names an index snapshot that was not written"
                    )));
                }
                _ if fence.is_some_and(|f| f.is_closed()) => {
                    return Err(StateError::Misuse(format!(
                        "checkpoint {checkpoint_id} was cancelled waiting for its index snapshot"
                    )));
                }
                _ => {
                    state = self
                        .written
                        .wait_timeout(state, Duration::from_millis(10))
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct SegmentStats {
    data_end: u32,
    live_bytes: u64,
}

#[derive(Debug)]
struct Registered {
    info: StateInfo,
    value_type: Option<TypeId>,
}

/// Counters of a store, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Live keys across all states.
    pub keys: u64,
    /// Live record bytes.
    pub live_bytes: u64,
    /// Record bytes in the log, live or not.
    pub log_bytes: u64,
    /// Segments mapped.
    pub segments: u64,
    /// Updates done in place (mutable region).
    pub in_place_updates: u64,
    /// Records appended.
    pub appends: u64,
    /// Live records compaction moved to the tail.
    pub compaction_moves: u64,
    /// Bytes compaction scanned in the segments it empties.
    pub compaction_scanned: u64,
    /// Index entries a restore's replay left that [`StateStore::maintain`] has not folded into
    /// the restored table yet (0 once the fold is done).
    pub index_delta: u64,
}

/// The keyed state store of one shard. See the module docs for the write, checkpoint and
/// restore paths. Single-threaded by design: one shard's executor owns it.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    config: StoreConfig,
    /// Segments of the store by id: `None` if not part of it; an empty cell if listed by the
    /// restored checkpoint but not opened yet (opened, and its header checked, on first use).
    segments: Vec<Option<OnceCell<Segment>>>,
    stats: Vec<SegmentStats>,
    /// First segment of the log still present.
    first_segment: SegmentId,
    tail_segment: SegmentId,
    tail_offset: u32,
    /// Start of the mutable region.
    seal: LogAddress,
    /// The index snapshot file the index table is mapped from, if it is.
    mapped_index: Option<String>,
    /// Memory let go of since the last checkpoint, for its task to free (see [`Released`]).
    released: Released,
    /// The first segment that may have an open tail: the last segment sealed whole by a
    /// checkpoint (a failed write can leave tails open across later seals).
    open_from: SegmentId,
    /// Records before this address came from files: check them on read.
    restored_upto: LogAddress,
    next_seq: u64,
    index: Index,
    value_buf: AlignedVec<16>,
    states: BTreeMap<StateId, Registered>,
    ledger: Arc<Mutex<Ledger>>,
    checkpoints_since_index: u32,
    bytes_since_index: u64,
    new_segments: Vec<SegmentId>,
    /// New segments not yet handed to a write-behind task for an early fsync.
    presync: Vec<SegmentId>,
    last_checkpoint: Option<u64>,
    counters: StoreStats,
    /// The index snapshot being copied (copy-on-write) since the checkpoint it reflects.
    pending_index: Option<IndexSnapshotRef>,
    /// The index snapshot a checkpoint past the replay bound named, being copied for its task.
    owed_index: Option<OwedIndex>,
    /// The log up to here was handed to a write-behind task.
    behind_upto: LogAddress,
    /// Bytes appended since the store was created or restored, and their count when a
    /// write-behind task was last handed out: the cheap test, without the ledger's lock, of
    /// whether one is due.
    appended_bytes: u64,
    behind_mark: u64,
    compaction: Compaction,
}

/// An index snapshot a checkpoint past the replay bound named and its durability task waits
/// for: copied copy-on-write, and a slice at a time by [`StateStore::maintain`], then handed
/// to the task.
#[derive(Debug)]
struct OwedIndex {
    snapshot: IndexSnapshotRef,
    to_task: std::sync::mpsc::SyncSender<IndexWrite>,
}

/// Bytes of an owed index snapshot [`StateStore::maintain`] copies per entry of its budget (in
/// chunks of 64 KiB): the runtime's budget of 512 copies 1 MiB a call.
const COPY_BYTES_PER_BUDGET: usize = 2 << 10;

/// Where incremental compaction ([`StateStore::compact_step`]) stands.
#[derive(Debug, Default)]
struct Compaction {
    /// The segment being emptied and how far it was scanned.
    victim: Option<(SegmentId, u32)>,
    /// Bytes compaction may still scan (it earns twice what is appended), and the appended
    /// bytes it was last credited for.
    credit: u64,
    mark: u64,
    /// A reused buffer for the key of a record being moved.
    key_buf: Vec<u8>,
}

impl StateStore {
    /// Creates an empty store in `dir` (created if missing). Files of an earlier store there
    /// are replaced as the new log reaches them; use [`StateStore::restore`] to resume one.
    pub fn create(dir: &Path, config: StoreConfig) -> Result<StateStore> {
        std::fs::create_dir_all(dir).map_err(|e| StateError::io("create store dir", dir, e))?;
        let mut store = StateStore {
            dir: dir.to_owned(),
            segments: Vec::new(),
            stats: Vec::new(),
            first_segment: 1,
            tail_segment: 0,
            tail_offset: 0,
            seal: log_address(1, SEGMENT_HEADER_BYTES),
            mapped_index: None,
            released: Released::default(),
            open_from: 1,
            restored_upto: 0,
            next_seq: 1,
            index: Index::new()?,
            value_buf: AlignedVec::new(),
            states: BTreeMap::new(),
            ledger: Arc::new(Mutex::new(Ledger {
                synced_upto: log_address(1, SEGMENT_HEADER_BYTES),
                keep_resident: config.resident_index_snapshot,
                ..Ledger::default()
            })),
            checkpoints_since_index: 0,
            bytes_since_index: 0,
            new_segments: Vec::new(),
            presync: Vec::new(),
            last_checkpoint: None,
            counters: StoreStats::default(),
            pending_index: None,
            owed_index: None,
            behind_upto: 0,
            appended_bytes: 0,
            behind_mark: 0,
            compaction: Compaction::default(),
            config,
        };
        store.open_segment(1)?;
        // The first segment is fsynced by the first checkpoint: nothing to write back yet.
        store.presync.clear();
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> StoreStats {
        let (live, log) = self.log_totals(false);
        StoreStats {
            keys: self.index.len() as u64,
            live_bytes: live,
            log_bytes: log,
            segments: self.segments.iter().filter(|s| s.as_ref().is_some_and(|c| c.get().is_some())).count() as u64,
            index_delta: self.index.delta_entries() as u64,
            ..self.counters
        }
    }

    /// Live record bytes and all record bytes of the segments that are part of the store
    /// (`holding_live`: only of those with live records).
    fn log_totals(&self, holding_live: bool) -> (u64, u64) {
        let (mut live, mut log) = (0u64, 0u64);
        for id in self.first_segment..=self.tail_segment {
            if let (true, Some(s)) = (self.has_segment(id), self.stats.get(id as usize))
                && (!holding_live || s.live_bytes > 0)
            {
                live += s.live_bytes;
                log += u64::from(s.data_end.saturating_sub(SEGMENT_HEADER_BYTES));
            }
        }
        (live, log)
    }

    /// Bytes of log from `from` (the start of the log when `None`) to `to`, counting every
    /// segment in between as full.
    fn log_distance(&self, from: Option<LogAddress>, to: LogAddress) -> u64 {
        let from = from.unwrap_or(log_address(self.first_segment, SEGMENT_HEADER_BYTES));
        let segments = u64::from(address_segment(to).saturating_sub(address_segment(from)));
        (segments * u64::from(self.config.segment_bytes) + u64::from(address_offset(to)))
            .saturating_sub(u64::from(address_offset(from)))
    }

    /// The current log tail.
    pub fn tail(&self) -> LogAddress {
        log_address(self.tail_segment, self.tail_offset)
    }

    /// Registers (or looks up) the state `name` holding values of type `V` and returns its id.
    /// Registering one name with two value types is an error, as is a hash collision between
    /// two names.
    pub fn register(&mut self, name: &str, value_type: Option<TypeId>) -> Result<StateId> {
        let id = state_id_of(name);
        match self.states.get_mut(&id) {
            Some(r) if r.info.name != name => Err(StateError::Misuse(format!(
                "state names {name:?} and {:?} hash to the same id; rename one",
                r.info.name
            ))),
            Some(r) => match (r.value_type, value_type) {
                (Some(a), Some(b)) if a != b => {
                    Err(StateError::Misuse(format!("state {name:?} is already registered with another value type")))
                }
                (None, t) => {
                    r.value_type = t;
                    Ok(id)
                }
                _ => Ok(id),
            },
            None => {
                self.states.insert(id, Registered { info: StateInfo { name: name.to_owned(), id }, value_type });
                Ok(id)
            }
        }
    }

    /// The registered states.
    pub fn states(&self) -> impl Iterator<Item = &StateInfo> {
        self.states.values().map(|r| &r.info)
    }

    fn open_segment(&mut self, id: SegmentId) -> Result<()> {
        if id > MAX_SEGMENT_ID {
            return Err(StateError::Misuse(format!("the log of {} has run out of segment ids", self.dir.display())));
        }
        let header = SegmentHeader {
            shard: self.config.shard,
            id,
            first_seq: self.next_seq,
            segment_bytes: self.config.segment_bytes,
        };
        let segment = Segment::create(&self.dir, header)?;
        // The full segment before the last keeps its open tail until the next checkpoint
        // seals it (values in it are rewritten in place meanwhile); the one before that is
        // written out and closed now (its records are appended again when they change), so a
        // store holds two open tails at most, whatever the time between checkpoints. Should
        // the write fail, the tail stays open, and the next checkpoint writes it or fails.
        if let Some(older) = self.tail_segment.checked_sub(1)
            && let Ok(Some(full)) = self.segment_mut(older)
            && let Ok(Some(closed)) = full.close()
        {
            self.released.0.push(Box::new(closed));
        }
        let idx = id as usize;
        if self.segments.len() <= idx {
            self.segments.resize_with(idx + 1, || None);
            self.stats.resize(idx + 1, SegmentStats::default());
        }
        self.segments[idx] = Some(OnceCell::from(segment));
        self.stats[idx] = SegmentStats { data_end: SEGMENT_HEADER_BYTES, live_bytes: 0 };
        self.tail_segment = id;
        self.tail_offset = SEGMENT_HEADER_BYTES;
        self.new_segments.push(id);
        self.presync.push(id);
        Ok(())
    }

    /// Whether segment `id` is part of the store.
    fn has_segment(&self, id: SegmentId) -> bool {
        self.segments.get(id as usize).is_some_and(Option::is_some)
    }

    /// Segment `id`, opened (and its header and data end checked) on first use. `Ok(None)` if
    /// it is not part of the store.
    fn segment(&self, id: SegmentId) -> Result<Option<&Segment>> {
        let Some(Some(cell)) = self.segments.get(id as usize) else { return Ok(None) };
        if let Some(segment) = cell.get() {
            return Ok(Some(segment));
        }
        let segment = Segment::open(&self.dir, id)?;
        let data_end = self.stats[id as usize].data_end;
        if data_end > segment.len() || data_end < SEGMENT_HEADER_BYTES {
            return Err(StateError::corrupt(segment.path(), u64::from(data_end), "checkpoint names a bad data end"));
        }
        if segment.header().shard != self.config.shard {
            return Err(StateError::corrupt(
                segment.path(),
                16,
                format!("segment of shard {}", segment.header().shard),
            ));
        }
        let _ = cell.set(segment);
        Ok(cell.get())
    }

    fn segment_mut(&mut self, id: SegmentId) -> Result<Option<&mut Segment>> {
        self.segment(id)?;
        Ok(self.segments.get_mut(id as usize).and_then(|s| s.as_mut()).and_then(OnceCell::get_mut))
    }

    /// The record at `addr`: its bytes (from the record start to the end of its segment's data)
    /// and its header. Bounds and lengths are always checked; the CRC is checked for records
    /// that came from files (before `restored_upto`).
    fn record_at(&self, addr: LogAddress) -> Result<(&[u8], RecordHeader)> {
        let (seg_id, off) = (address_segment(addr), address_offset(addr));
        let Some(segment) = self.segment(seg_id)? else {
            return Err(StateError::corrupt(
                self.dir.join(segment_file_name(seg_id)),
                u64::from(off),
                "index points into a segment that is not part of the store",
            ));
        };
        let end = self.stats[seg_id as usize].data_end as usize;
        if off < SEGMENT_HEADER_BYTES || off as usize >= end {
            return Err(StateError::corrupt(segment.path(), u64::from(off), "index points outside the log"));
        }
        let bytes = segment.data(off, end as u32);
        let decoded =
            if addr < self.restored_upto { record::decode_checked(bytes) } else { record::decode_header(bytes) };
        match decoded {
            Ok(h) => Ok((&bytes[..h.len as usize], h)),
            Err(e) => Err(StateError::corrupt(segment.path(), u64::from(off), format!("bad record: {e:?}"))),
        }
    }

    fn key_matches(&self, addr: LogAddress, state: StateId, key: &[u8]) -> Result<bool> {
        let (rec, h) = self.record_at(addr)?;
        Ok(h.state == state && record::key_of(rec, &h) == key)
    }

    fn hash(state: StateId, key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(key, u64::from(state))
    }

    fn find(&self, state: StateId, key: &[u8]) -> Result<Found> {
        self.index.find(Self::hash(state, key), |addr| self.key_matches(addr, state, key))
    }

    /// Whether the records at `a` and `b` have the same state and key.
    fn same_key(&self, a: LogAddress, b: LogAddress) -> Result<bool> {
        let (rec_a, h_a) = self.record_at(a)?;
        let (rec_b, h_b) = self.record_at(b)?;
        Ok(h_a.state == h_b.state && record::key_of(rec_a, &h_a) == record::key_of(rec_b, &h_b))
    }

    /// The value bytes of `key` in `state`. `needs_validation` is set when they did not come
    /// from a typed put of this process (restored from a file, or stored raw), so a typed
    /// reader must validate them before zero-copy access.
    pub fn get_raw(&self, state: StateId, key: Key<'_>) -> Result<Option<RawValue<'_>>> {
        // The record the probe matched is kept, so it is decoded once.
        let mut matched = None;
        let found = self.index.find(Self::hash(state, key.bytes), |addr| {
            let (rec, h) = self.record_at(addr)?;
            let is_match = h.state == state && record::key_of(rec, &h) == key.bytes;
            if is_match {
                matched = Some((addr, rec, h));
            }
            Ok(is_match)
        })?;
        let live = matches!(found, Found::Live { .. });
        Ok(matched.filter(|_| live).map(|(addr, rec, h)| RawValue {
            bytes: record::value_of(rec, &h),
            needs_validation: addr < self.restored_upto || h.flags & FLAG_UNVALIDATED != 0,
            addr,
        }))
    }

    /// The file and offset of a log address, for error messages.
    pub fn location(&self, addr: LogAddress) -> (PathBuf, u64) {
        (self.dir.join(segment_file_name(address_segment(addr))), u64::from(address_offset(addr)))
    }

    /// Whether `key` has a value in `state`.
    pub fn contains(&self, state: StateId, key: Key<'_>) -> Result<bool> {
        Ok(matches!(self.find(state, key.bytes)?, Found::Live { .. }))
    }

    /// Sets `key` in `state` to the bytes `value`. They are marked unvalidated: a typed reader
    /// checks them with rkyv's bytecheck before any zero-copy access.
    pub fn put_raw(&mut self, state: StateId, key: Key<'_>, value: &[u8]) -> Result<()> {
        self.put_bytes(state, key, value, FLAG_UNVALIDATED)
    }

    fn put_bytes(&mut self, state: StateId, key: Key<'_>, value: &[u8], flags: u8) -> Result<()> {
        self.index.prepare_write(Self::hash(state, key.bytes))?;
        match self.find(state, key.bytes)? {
            Found::Live { slot, addr } => {
                if addr >= self.seal && self.try_update_in_place(addr, value, flags)? {
                    return Ok(());
                }
                let new_addr = self.append(state, key, RecordKind::Put, value, flags)?;
                self.mark_dead(addr)?;
                self.index.set_addr(slot, new_addr)?;
            }
            Found::Absent(vacancy) => {
                let new_addr = self.append(state, key, RecordKind::Put, value, flags)?;
                self.index.insert(vacancy, new_addr)?;
            }
        }
        Ok(())
    }

    /// Serialises `value` with rkyv into a reused buffer and stores it.
    pub fn put_value<V>(&mut self, state: StateId, key: Key<'_>, value: &V) -> Result<()>
    where
        V: for<'a> rkyv::Serialize<
                rkyv::api::high::HighSerializer<
                    AlignedVec<16>,
                    rkyv::ser::allocator::ArenaHandle<'a>,
                    rkyv::rancor::Error,
                >,
            >,
    {
        let mut buf = std::mem::take(&mut self.value_buf);
        buf.clear();
        let buf = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(value, buf)
            .map_err(|e| StateError::Misuse(format!("cannot serialise value: {e}")))?;
        let result = self.put_bytes(state, key, &buf, 0);
        self.value_buf = buf;
        result
    }

    /// Removes `key` from `state`; returns whether it was present.
    pub fn delete(&mut self, state: StateId, key: Key<'_>) -> Result<bool> {
        self.index.prepare_write(Self::hash(state, key.bytes))?;
        let Found::Live { slot, addr } = self.find(state, key.bytes)? else {
            return Ok(false);
        };
        // The Delete record tells a replay from an older index snapshot that the key is gone. It
        // is written first: a tombstone in the index delta points at it.
        let delete_addr = self.append(state, key, RecordKind::Delete, &[], 0)?;
        self.mark_dead(addr)?;
        self.index.remove(slot, delete_addr)?;
        Ok(true)
    }

    fn try_update_in_place(&mut self, addr: LogAddress, value: &[u8], flags: u8) -> Result<bool> {
        let (_, h) = self.record_at(addr)?;
        if h.value_offset() as usize + value.len() > h.slot_bytes() as usize {
            return Ok(false);
        }
        let seq = self.next_seq;
        let Some(segment) = self.segment_mut(address_segment(addr))? else {
            return Ok(false);
        };
        // A full segment's tail is closed when the log moves on (see `open_segment`).
        if !segment.is_writable(address_offset(addr)) {
            return Ok(false);
        }
        let slot = segment.slice_mut(address_offset(addr), h.slot_bytes());
        record::rewrite_value(slot, &h, seq, flags, value);
        self.next_seq += 1;
        self.counters.in_place_updates += 1;
        Ok(true)
    }

    fn append(
        &mut self,
        state: StateId,
        key: Key<'_>,
        kind: RecordKind,
        value: &[u8],
        flags: u8,
    ) -> Result<LogAddress> {
        let (key_len, value_len) = (key.bytes.len() as u32, value.len() as u32);
        let slot = u64::from(record::value_offset(key_len)) + u64::from(value_len);
        let slot = slot.div_ceil(16) * 16;
        if slot > u64::from(self.config.segment_bytes - SEGMENT_HEADER_BYTES) {
            return Err(StateError::Misuse(format!(
                "a record of {slot} bytes does not fit in a segment of {} bytes",
                self.config.segment_bytes
            )));
        }
        let slot = slot as u32;
        if u64::from(self.tail_offset) + u64::from(slot) > u64::from(self.config.segment_bytes) {
            self.open_segment(self.tail_segment + 1)?;
        }
        let header = RecordHeader {
            len: slot,
            crc: 0,
            seq: self.next_seq,
            state,
            key_group: key.group,
            kind,
            key_len,
            value_len,
            flags,
        };
        let (seg, off) = (self.tail_segment, self.tail_offset);
        let Some(segment) = self.segment_mut(seg)? else {
            return Err(StateError::Misuse("tail segment is not mapped".into()));
        };
        record::encode(segment.slice_mut(off, slot), &header, key.bytes, value);
        self.next_seq += 1;
        self.tail_offset += slot;
        let stats = &mut self.stats[seg as usize];
        stats.data_end = self.tail_offset;
        if kind == RecordKind::Put {
            stats.live_bytes += u64::from(slot);
        }
        self.bytes_since_index += u64::from(slot);
        self.appended_bytes += u64::from(slot);
        self.counters.appends += 1;
        Ok(log_address(seg, off))
    }

    fn mark_dead(&mut self, addr: LogAddress) -> Result<()> {
        let (_, h) = self.record_at(addr)?;
        let stats = &mut self.stats[address_segment(addr) as usize];
        stats.live_bytes = stats.live_bytes.saturating_sub(u64::from(h.slot_bytes()));
        Ok(())
    }

    /// Calls `f(state, key group, key, value, needs_validation)` for every live entry. The order is
    /// unspecified. Used for rescaling, inspection and timer restore; it checks every index
    /// chunk first (and finishes folding the index delta of a restore).
    pub fn for_each(&mut self, mut f: impl FnMut(StateId, KeyGroup, &[u8], &[u8], bool)) -> Result<()> {
        self.fold_index()?;
        let addrs: Vec<LogAddress> = self.index.entries()?.map(|s| s.addr).collect();
        for addr in addrs {
            let (rec, h) = self.record_at(addr)?;
            let unvalidated = addr < self.restored_upto || h.flags & FLAG_UNVALIDATED != 0;
            f(h.state, h.key_group, record::key_of(rec, &h), record::value_of(rec, &h), unvalidated);
        }
        Ok(())
    }

    /// Seals the log for checkpoint `checkpoint_id` and returns its handle with the task that
    /// makes it durable. Fails (and changes nothing) when a previous sync failed.
    pub fn checkpoint(&mut self, checkpoint_id: u64) -> Result<PendingCheckpoint> {
        if let Some(prev) = self.last_checkpoint
            && checkpoint_id <= prev
        {
            return Err(StateError::Misuse(format!("checkpoint {checkpoint_id} is not after {prev}")));
        }
        // A copy an earlier checkpoint's task still waits for is finished first (one copy at a
        // time; the runtime's stages finish it in slices long before).
        self.finish_copies();
        // What the log holds up to the seal goes into the files first (`pwrite` from the open
        // tails). Should that fail, the open tails keep every byte: this checkpoint's task
        // fails (and the store is not suspect), and the next checkpoint writes them again.
        let write_error = self.write_out_open_tails().err();
        let seal = self.tail();
        let max_replay = self.config.max_replay_bytes;
        let (synced_upto, confirmed_index, mut spare, take_index, replay_tail, bounded, named) = {
            let mut ledger = self.ledger.lock().map_err(|_| StateError::Misuse("ledger poisoned".into()))?;
            if let Some(failure) = &ledger.failed_sync {
                return Err(StateError::Misuse(format!(
                    "an earlier sync failed ({failure}); the files are suspect: restore from the last complete checkpoint"
                )));
            }
            // What a restore of this checkpoint would replay on top of the newest durable
            // snapshot; past the bound, this checkpoint writes a snapshot of its own. So that
            // steady checkpoints never do, a snapshot is due once that is half the bound (the
            // log may grow by the other half while the snapshot is copied and written), unless
            // one is being copied (and is about to be detached, so the tail stays long).
            let replay_tail = self.log_distance(ledger.confirmed_index.as_ref().map(|r| r.seal), seal);
            let bounded = replay_tail > max_replay;
            // A detached snapshot still being written when the tail nears the bound hurries;
            // past the bound, the newest one within it is named by this checkpoint, whose task
            // waits for it (or writes it, if not started): on a slow disk, a snapshot of its
            // own would be a second one to write behind it, and a table to copy first.
            if replay_tail >= max_replay - max_replay / 8 {
                ledger.detached_index.iter().for_each(|d| d.write.hurry());
            }
            let named = ledger
                .detached_index
                .iter()
                .filter(|d| bounded && self.log_distance(Some(d.snapshot.seal), seal) <= max_replay)
                .max_by_key(|d| d.snapshot.checkpoint_id)
                .map(|d| (d.snapshot.clone(), Arc::clone(&d.write)));
            // A detached snapshot still being written postpones the next one (snapshots never
            // queue up behind a slow disk), and so does the index delta of a restore that is
            // not folded yet (the handle references the restored snapshot meanwhile).
            let due = (self.checkpoints_since_index + 1 >= self.config.index_snapshot_every
                || self.bytes_since_index >= self.config.index_snapshot_tail_bytes
                || replay_tail >= max_replay / 2 && self.pending_index.is_none())
                && ledger.detached_index.is_empty()
                && !self.index.has_delta();
            let mut spare = if due || bounded { ledger.spare_index_buf.take() } else { None };
            // A buffer of an index that has grown since is freed off this thread.
            if let Some(buf) = spare.take_if(|b| b.len() != self.index.table_bytes()) {
                self.released.0.push(Box::new(buf));
            }
            // New segments a write-behind task fsynced already need no fsync now; whatever
            // else the list holds was synced by an earlier checkpoint.
            self.new_segments.retain(|id| !ledger.presynced.contains(id));
            ledger.presynced.clear();
            (ledger.synced_upto, ledger.confirmed_index.clone(), spare, due, replay_tail, bounded, named)
        };
        // An index snapshot started at an earlier checkpoint (copy-on-write since) is finished
        // now and written by this checkpoint's task; one is started now if due, and finished
        // and written by the next checkpoint. So no checkpoint copies the whole table on the
        // caller's thread, unless it is past the replay bound (see below).
        // The further behind snapshots are (a bulk load), the faster the next one is written.
        let pace = snapshot_pace(replay_tail);
        let pending = match self.pending_index.take() {
            // Past the bound and naming a detached snapshot, a snapshot copying since an
            // earlier checkpoint goes on copying (the next checkpoint writes it).
            pending if named.is_some() => {
                self.pending_index = pending;
                None
            }
            // Past the bound, a snapshot copying since an earlier checkpoint serves only if a
            // replay from its seal is within the bound.
            Some(snapshot) if bounded && self.log_distance(Some(snapshot.seal), seal) > max_replay => {
                spare = spare.or(self.index.abandon_copy());
                None
            }
            pending => pending,
        };
        let (index_write, index_copying, own_index, index_named) = if let Some((snapshot, write)) = named {
            (None, None, Some(snapshot), Some(write))
        } else if bounded {
            let snapshot = match pending {
                Some(snapshot) => snapshot,
                None => {
                    // A snapshot of this seal: the restore replays nothing. The delta of a
                    // restore is folded first (the snapshot is of one table).
                    if self.index.has_delta() {
                        self.fold_index()?;
                    }
                    self.index.begin_copy(spare.take())?;
                    IndexSnapshotRef { checkpoint_id, seal, segments: self.live_segments() }
                }
            };
            // Its copy is finished by the next calls of `maintain`, a slice at a time, not
            // here: at 1 GiB that is a 128 MiB memcpy a store, which a restart would wait for.
            let (to_task, copying) = std::sync::mpsc::sync_channel(1);
            self.owed_index = Some(OwedIndex { snapshot: snapshot.clone(), to_task });
            (None, Some((copying, std::thread::current().id())), Some(snapshot), None)
        } else {
            let write = pending.and_then(|snapshot| {
                let (slots, capacity, len) = self.index.finish_copy()?;
                let path = self.dir.join(index_file_name(snapshot.checkpoint_id));
                Some(IndexWrite { path, slots, capacity, len, snapshot, pace })
            });
            let own = write.as_ref().map(|w| w.snapshot.clone());
            (write, None, own, None)
        };
        // A checkpoint past the bound just took its snapshot: none starts now.
        let take_index = take_index && !bounded;
        if take_index {
            let segments = self.live_segments();
            self.index.begin_copy(spare.take())?;
            self.pending_index = Some(IndexSnapshotRef { checkpoint_id, seal, segments });
        }
        if let Some(buf) = spare
            && let Ok(mut ledger) = self.ledger.lock()
        {
            ledger.spare_index_buf.get_or_insert(buf);
        }
        let segments_for = |index: Option<&IndexSnapshotRef>| -> Vec<SegmentRef> {
            (self.first_segment..=self.tail_segment)
                .filter(|&id| self.has_segment(id) && self.needed_by(id, index))
                .map(|id| {
                    let s = self.stats[id as usize];
                    SegmentRef { id, data_end: s.data_end, live_bytes: s.live_bytes }
                })
                .collect()
        };
        // Should the caller write the index snapshot apart from the checkpoint, the handle
        // falls back to the confirmed snapshot (and the segments a replay from it needs); not
        // past the bound, where the snapshot belongs to the checkpoint.
        let fallback = index_write
            .as_ref()
            .filter(|_| !bounded)
            .map(|_| (confirmed_index.clone(), segments_for(confirmed_index.as_ref())));
        let index_ref = own_index.or(confirmed_index);
        let segments = segments_for(index_ref.as_ref());
        let handle = CheckpointHandle {
            checkpoint_id,
            shard: self.config.shard,
            max_parallelism: self.config.max_parallelism,
            key_group_start: self.config.key_groups.start,
            key_group_end: self.config.key_groups.end,
            seal,
            next_seq: self.next_seq,
            segments,
            index_snapshot: index_ref,
            states: self.states.values().map(|r| r.info.clone()).collect(),
            key_count: self.index.len() as u64,
        };
        let flushes = self.ranges_to_sync(synced_upto, seal)?;
        let mut new_files = Vec::new();
        if write_error.is_none() {
            new_files = std::mem::take(&mut self.new_segments)
                .into_iter()
                .filter_map(|id| self.segment(id).ok().flatten().map(Segment::flusher))
                .collect();
            // Reads before the seal go through the mappings from now on (written out above).
            let tail_segment = self.tail_segment;
            for id in self.open_from.max(self.first_segment)..=tail_segment {
                let Some(segment) = self.segment_mut(id)? else { continue };
                if id == tail_segment {
                    segment.seal()?;
                } else if let Some(closed) = segment.close()? {
                    self.released.0.push(Box::new(closed));
                }
            }
            self.open_from = tail_segment;
        }
        self.seal = seal;
        self.last_checkpoint = Some(checkpoint_id);
        if take_index || bounded {
            self.checkpoints_since_index = 0;
            self.bytes_since_index = 0;
        } else {
            self.checkpoints_since_index += 1;
        }
        let task = DurabilityTask {
            released: std::mem::take(&mut self.released),
            write_error,
            checkpoint_id,
            dir: self.dir.clone(),
            seal,
            new_files,
            flushes,
            index_write,
            index_copying,
            index_named,
            past_replay_bound: bounded,
            ledger: Arc::clone(&self.ledger),
        };
        Ok(PendingCheckpoint { handle, task, fallback })
    }

    /// The segments holding live records: those an index snapshot taken now needs.
    fn live_segments(&self) -> Vec<SegmentId> {
        (self.first_segment..=self.tail_segment)
            .filter(|&id| self.has_segment(id) && self.stats[id as usize].live_bytes > 0)
            .collect()
    }

    /// Writes the open tails of the segments after the seal into their files (`pwrite`).
    fn write_out_open_tails(&mut self) -> Result<()> {
        for id in self.open_from.max(self.first_segment)..=self.tail_segment {
            if let Some(segment) = self.segment_mut(id)? {
                segment.write_out(u32::MAX)?;
            }
        }
        Ok(())
    }

    /// Whether the current state, restored from `index` plus a replay, needs segment `id`.
    fn needed_by(&self, id: SegmentId, index: Option<&IndexSnapshotRef>) -> bool {
        let live = self.stats.get(id as usize).is_some_and(|s| s.live_bytes > 0);
        live || match index {
            None => true,
            Some(r) => id >= address_segment(r.seal) || r.segments.contains(&id),
        }
    }

    fn ranges_to_sync(&self, from: LogAddress, to: LogAddress) -> Result<Vec<(SegmentFlusher, u32, u32)>> {
        let mut out = Vec::new();
        for id in address_segment(from).max(self.first_segment)..=address_segment(to) {
            let Some(segment) = self.segment(id)? else { continue };
            let start = if id == address_segment(from) { address_offset(from) } else { SEGMENT_HEADER_BYTES };
            let end = if id == address_segment(to) { address_offset(to) } else { self.stats[id as usize].data_end };
            if end > start {
                out.push((segment.flusher(), start, end - start));
            }
        }
        Ok(out)
    }

    /// Writes back full pages of the mutable region in the background, so that a checkpoint
    /// finds little left to sync. Returns a task to run off the caller's thread, or `None` when
    /// there is less than `min_bytes` to write. Correctness never depends on it.
    pub fn write_behind(&mut self, min_bytes: u32) -> Option<WriteBehindTask> {
        if self.appended_bytes - self.behind_mark < u64::from(min_bytes) && self.presync.is_empty() {
            return None;
        }
        // New segments are fsynced early (their allocation and name), so that checkpoints
        // seldom wait for a journal commit of new files.
        let new_files: Vec<(SegmentId, SegmentFlusher)> = std::mem::take(&mut self.presync)
            .into_iter()
            .filter_map(|id| self.segment(id).ok().flatten().map(|s| (id, s.flusher())))
            .collect();
        let presync = (!new_files.is_empty()).then(|| Presync {
            files: new_files,
            dir: self.dir.clone(),
            ledger: Arc::clone(&self.ledger),
        });
        // Whole pages only: the page the tail is in keeps changing.
        let to = log_address(self.tail_segment, self.tail_offset & !4095);
        let from = self.ledger.lock().ok()?.synced_upto.max(self.seal).max(self.behind_upto);
        // This thread writes those pages into the files (`pwrite` from the open tail: only
        // the shard's thread touches it); the task starts their writeback. Should the write
        // fail, the checkpoint writes them again, or fails.
        for id in address_segment(from).max(self.first_segment)..=self.tail_segment {
            let upto = if id == self.tail_segment { address_offset(to) } else { u32::MAX };
            if let Ok(Some(segment)) = self.segment_mut(id)
                && segment.write_ahead(upto).is_err()
            {
                return presync.map(|p| WriteBehindTask { ranges: Vec::new(), presync: Some(p) });
            }
        }
        let ranges = self.ranges_to_sync(from, to.max(from)).ok()?;
        let total: u64 = ranges.iter().map(|r| u64::from(r.2)).sum();
        if total < u64::from(min_bytes) {
            // The rest was synced by a checkpoint already: due again once `total` grew enough.
            self.behind_mark = self.appended_bytes.saturating_sub(total);
            return presync.map(|p| WriteBehindTask { ranges: Vec::new(), presync: Some(p) });
        }
        self.behind_upto = to;
        self.behind_mark = self.appended_bytes;
        Some(WriteBehindTask { ranges, presync })
    }

    /// Hands the store's large anonymous buffers (its index table, a restore's delta, its index
    /// snapshot buffers, and the slots of its newest index snapshot as written, tagged with
    /// their file) to the warm pool ([`crate::warm`]) for the stores restored next, and returns the rest, for the caller to
    /// drop where it likes (unmapping a store's files takes milliseconds). For a store being
    /// dropped that is about to be restored again: a failed run attempt's, at its restart.
    pub fn retire(mut self) -> RetiredStore {
        let mut memory = self.index.take_warm_memory();
        let mut donated = 0;
        if let Ok(mut ledger) = self.ledger.lock() {
            memory.extend(ledger.spare_index_buf.take().map(crate::index::SnapshotBuf::into_pages));
            if let Some(r) = ledger.resident.take() {
                let bytes = r.slots.len();
                match crate::warm::give_snapshot(r.path, r.header, r.slots.into_pages()) {
                    Some(refused) => self.released.0.push(Box::new(refused)),
                    None => donated += bytes,
                }
            }
        }
        for pages in memory {
            let bytes = pages.capacity();
            match crate::warm::give(pages) {
                Some(refused) => self.released.0.push(Box::new(refused)),
                None => donated += bytes,
            }
        }
        RetiredStore { _store: self, donated }
    }

    /// Restores the store of `handle` from its directory `dir`: maps its segments and index
    /// snapshot and replays the log tail between them, checking CRCs. The files of any later
    /// checkpoint in `dir` are overwritten as the store continues from the seal: the caller
    /// (the checkpoint coordinator) discards later manifests first.
    pub fn restore(
        dir: &Path,
        handle: &CheckpointHandle,
        config: StoreConfig,
        options: RestoreOptions,
    ) -> Result<StateStore> {
        let config = StoreConfig {
            shard: handle.shard,
            max_parallelism: handle.max_parallelism,
            key_groups: handle.key_groups(),
            ..config
        };
        let Some(first) = handle.segments.first() else {
            return Err(StateError::corrupt(dir, 0, format!("checkpoint {} lists no segment", handle.checkpoint_id)));
        };
        let tail_segment = address_segment(handle.seal);
        // Segments are opened lazily (on first read); only the bookkeeping is set up here, so
        // restore opens a constant number of files whatever the state size.
        let mut segments: Vec<Option<OnceCell<Segment>>> = Vec::new();
        let mut stats = Vec::new();
        for r in &handle.segments {
            if r.id > tail_segment || r.id > MAX_SEGMENT_ID || r.data_end < SEGMENT_HEADER_BYTES {
                return Err(StateError::corrupt(
                    dir.join(segment_file_name(r.id)),
                    u64::from(r.data_end),
                    "checkpoint names bad data end",
                ));
            }
            let idx = r.id as usize;
            if segments.len() <= idx {
                segments.resize_with(idx + 1, || None);
                stats.resize(idx + 1, SegmentStats::default());
            }
            segments[idx] = Some(OnceCell::new());
            stats[idx] = SegmentStats { data_end: r.data_end, live_bytes: r.live_bytes };
        }
        let tail_offset = address_offset(handle.seal);
        if stats.get(tail_segment as usize).is_none_or(|s| s.data_end != tail_offset) {
            return Err(StateError::corrupt(dir, handle.seal, "checkpoint seal does not match its last segment"));
        }
        let (mut index, replay_from) = match &handle.index_snapshot {
            Some(r) => {
                let (index, seal) = Index::open_snapshot(&dir.join(r.file_name()))?;
                if seal != r.seal || seal > handle.seal {
                    return Err(StateError::corrupt(dir.join(r.file_name()), 32, "index snapshot seal mismatch"));
                }
                (index, seal)
            }
            None => (Index::new()?, log_address(first.id, SEGMENT_HEADER_BYTES)),
        };
        let key_count = usize::try_from(handle.key_count)
            .map_err(|_| StateError::corrupt(dir, handle.seal, "implausible key count"))?;
        let mut store = StateStore {
            dir: dir.to_owned(),
            segments,
            stats,
            first_segment: first.id,
            tail_segment,
            tail_offset,
            seal: handle.seal,
            mapped_index: handle.index_snapshot.as_ref().map(IndexSnapshotRef::file_name),
            released: Released::default(),
            open_from: tail_segment,
            restored_upto: handle.seal,
            next_seq: handle.next_seq,
            // A stand-in while the replay fills `index` (it reads records, never the index).
            index: Index::new()?,
            value_buf: AlignedVec::new(),
            states: handle.states.iter().map(|s| (s.id, Registered { info: s.clone(), value_type: None })).collect(),
            ledger: Arc::new(Mutex::new(Ledger {
                synced_upto: handle.seal,
                confirmed_index: handle.index_snapshot.clone(),
                failed_sync: None,
                spare_index_buf: None,
                resident: None,
                keep_resident: config.resident_index_snapshot,
                detached_index: Vec::new(),
                presynced: Vec::new(),
            })),
            checkpoints_since_index: 0,
            bytes_since_index: 0,
            new_segments: Vec::new(),
            presync: Vec::new(),
            last_checkpoint: Some(handle.checkpoint_id),
            counters: StoreStats::default(),
            pending_index: None,
            owed_index: None,
            behind_upto: 0,
            appended_bytes: 0,
            behind_mark: 0,
            compaction: Compaction::default(),
            config,
        };
        // The log continues from the seal, through an open tail of the last segment.
        match store.segment_mut(tail_segment)? {
            Some(segment) => segment.open_tail(tail_offset)?,
            None => return Err(StateError::corrupt(dir, handle.seal, "checkpoint does not list its last segment")),
        }
        // The log a restore of the next checkpoint replays starts as long as this one was: a
        // store restored with a long tail takes its next index snapshot as soon as one is due.
        // The delta is sized for the records the tail holds, estimated from the size of the
        // live records (a replay that overestimates it by a power of two shrinks it again,
        // and one that underestimates it grows it: each moves every entry).
        let record_bytes = handle.live_bytes().checked_div(handle.key_count).unwrap_or(DEFAULT_RECORD_BYTES);
        let record_bytes = record_bytes.max(u64::from(record::RECORD_HEADER_BYTES));
        store.bytes_since_index = store.replay(replay_from, handle.seal, record_bytes, &mut index)?;
        index.end_replay(key_count)?;
        store.index = index;
        // Ends the delta at once (checking the key count) if the tail held nothing.
        store.maintain(0)?;
        if options.verify_all {
            store.verify_all()?;
        }
        Ok(store)
    }

    /// Replays records in `[from, to)` into the delta of `index`, checking each one's CRC.
    /// Returns the bytes replayed. The records are decoded first (16 bytes each: the hash of
    /// the key, the address) and handed to [`Index::replay`] [`REPLAY_PIECE`] at a time, into
    /// a delta sized up front for the whole tail. A tail of at least [`PARALLEL_REPLAY_BYTES`]
    /// is decoded on a helper thread while this one replays the pieces decoded before (in a
    /// profile of a single-threaded replay, decoding and inserting each took roughly half the
    /// time; restore is the one time a shard's thread has a helper, as the other cores are
    /// idle or restoring too).
    fn replay(&self, from: LogAddress, to: LogAddress, record_bytes: u64, index: &mut Index) -> Result<u64> {
        // Opened here: a segment opens lazily, on the store's thread.
        let mut ranges = Vec::new();
        for id in address_segment(from)..=address_segment(to) {
            let Some(segment) = self.segment(id)? else {
                return Err(StateError::corrupt(
                    self.dir.join(segment_file_name(id)),
                    0,
                    "a segment the checkpoint replays is missing from it",
                ));
            };
            let start = if id == address_segment(from) { address_offset(from) } else { SEGMENT_HEADER_BYTES };
            ranges.push(TailRange { id, segment, start, end: self.stats[id as usize].data_end });
        }
        for range in &ranges {
            range.segment.prefetch(range.start, range.end);
        }
        let tail = self.log_distance(Some(from), to);
        index.reserve_replay(usize::try_from(tail / record_bytes.max(1)).unwrap_or(usize::MAX))?;
        let same_key = |a, b| self.same_key(a, b);
        if tail < PARALLEL_REPLAY_BYTES {
            let mut replayed = Ok(());
            let spare = std::cell::Cell::new(None);
            let bytes = decode_tail(
                &ranges,
                |mut piece| {
                    replayed = index.replay(&piece, same_key);
                    piece.clear();
                    spare.set(Some(piece));
                    replayed.is_ok()
                },
                || spare.take().unwrap_or_else(|| Vec::with_capacity(REPLAY_PIECE)),
            );
            return replayed.and(bytes);
        }
        let (pieces, decoded) = std::sync::mpsc::sync_channel::<Vec<Replayed>>(2);
        // Replayed pieces go back to the decoder to be filled again: a replay touches the
        // memory of four pieces, not of one per piece.
        let (recycle, recycled) = std::sync::mpsc::sync_channel::<Vec<Replayed>>(4);
        std::thread::scope(|scope| {
            let decoder = scope.spawn(move || {
                decode_tail(
                    &ranges,
                    |piece| pieces.send(piece).is_ok(),
                    || recycled.try_recv().unwrap_or_else(|_| Vec::with_capacity(REPLAY_PIECE)),
                )
            });
            let mut replayed = Ok(());
            for mut piece in decoded {
                replayed = index.replay(&piece, same_key);
                if replayed.is_err() {
                    break; // the receiver goes with the loop, which stops the decoder
                }
                piece.clear();
                let _ = recycle.try_send(piece);
            }
            let bytes =
                decoder.join().unwrap_or_else(|_| Err(StateError::Misuse("the replay decoder panicked".into())));
            replayed.and(bytes)
        })
    }

    /// Delta entries [`StateStore::maintain`] prefetches for at a time.
    const FOLD_AHEAD: usize = 32;
    /// Slots of a base table probe run [`StateStore::prefetch_fold`] looks at for an entry.
    const FOLD_AHEAD_SLOTS: usize = 4;
    /// Bytes of a record prefetched for the fold: its key compare reads the header and key and
    /// the CRC check of a restored record all of it (128 bytes for 80-byte values and short
    /// keys); a longer record costs misses beyond these.
    const FOLD_AHEAD_RECORD_BYTES: u32 = 128;

    /// Does up to `budget` entries of background upkeep on the caller's thread; returns whether
    /// more remains. The upkeep is folding the index delta a restore left (see the module docs)
    /// into the restored table: per entry a probe of the mapped index snapshot and a key compare
    /// with an old record. The store is correct at every step, so a caller calls this between
    /// batches of work until it returns `false`; without a delta it costs one branch. Fails with
    /// a corruption error when an index chunk or record it reads fails its check, or when the
    /// folded index does not hold the key count of the restored checkpoint.
    ///
    /// Those reads are at random places in the table and the log, so the fold goes through the
    /// delta a window of 32 entries at a time, prefetching what each entry of the window will
    /// read before folding any of them: the cache misses then overlap instead of coming one
    /// after the other (at 1 GiB of state, 645,000 entries folded in about 290 ms, not 560).
    pub fn maintain(&mut self, budget: usize) -> Result<bool> {
        let owed = self.copy_owed_index(budget.saturating_mul(COPY_BYTES_PER_BUDGET));
        if !self.index.has_delta() {
            return Ok(owed);
        }
        let mut ahead = [crate::index::FoldAhead::default(); Self::FOLD_AHEAD];
        let mut left = budget;
        while left > 0 {
            let peeked = self.index.peek_fold_entries(&mut ahead[..left.min(Self::FOLD_AHEAD)]);
            if peeked == 0 {
                break;
            }
            self.prefetch_fold(&ahead[..peeked])?;
            // The peek is a forecast: what is folded is what `next_fold_entry` hands out.
            for _ in 0..peeked {
                let Some(entry) = self.index.next_fold_entry()? else { break };
                self.index.prepare_write(entry.hash())?;
                let in_base = self.index.find_in_base(entry.hash(), |base| self.same_key(entry.addr(), base))?;
                self.index.fold_entry(entry, in_base)?;
            }
            left -= peeked;
        }
        match self.index.finish_fold() {
            FoldStatus::Pending => Ok(true),
            FoldStatus::Done => Ok(false),
            FoldStatus::CountMismatch { counted, expected } => Err(StateError::corrupt(
                &self.dir,
                self.restored_upto,
                format!("the restored index holds {counted} keys, the checkpoint says {expected}"),
            )),
        }
    }

    /// Readies the fold of the delta entries `ahead` (from [`Index::peek_fold_entries`]): loads
    /// the index chunks their home slots lie in (which may fail, as the fold's own load would),
    /// then starts loading into the cache what their folds read: first the home slots and the
    /// entries' records, then, once those slots are in (the other entries' prefetches gave
    /// them time), the records of the base entries with the same hash, whose keys the fold
    /// compares. Only hints: the addresses come from slots a later probe checks again, and a
    /// wrong one prefetches nothing or something useless, never outside a segment.
    fn prefetch_fold(&mut self, ahead: &[crate::index::FoldAhead]) -> Result<()> {
        for entry in ahead {
            self.index.prepare_write(entry.hash())?;
            self.index.prefetch_base_home(entry.hash());
            self.prefetch_record(entry.addr());
        }
        for entry in ahead {
            self.index.base_candidates(entry.hash(), Self::FOLD_AHEAD_SLOTS, |addr| self.prefetch_record(addr));
        }
        Ok(())
    }

    /// Starts loading the first [`Self::FOLD_AHEAD_RECORD_BYTES`] of the record at `addr` into
    /// the cache, if its segment is open (a hint: opening one could fail).
    fn prefetch_record(&self, addr: LogAddress) {
        if let Some(Some(cell)) = self.segments.get(address_segment(addr) as usize)
            && let Some(segment) = cell.get()
        {
            segment.prefetch_at(address_offset(addr), Self::FOLD_AHEAD_RECORD_BYTES);
        }
    }

    /// Copies up to `bytes` of the index snapshot a checkpoint past the replay bound waits for
    /// (at least a chunk unless `bytes` is 0), and hands it to the checkpoint's task once it is
    /// complete. Returns whether one is still owed.
    fn copy_owed_index(&mut self, bytes: usize) -> bool {
        if self.owed_index.is_none() {
            return false;
        }
        let chunks = bytes.div_ceil(crate::index::CHUNK_BYTES);
        if !self.index.copy_step(chunks) {
            return true;
        }
        let Some(owed) = self.owed_index.take() else { return false };
        if let Some((slots, capacity, len)) = self.index.finish_copy() {
            let path = self.dir.join(index_file_name(owed.snapshot.checkpoint_id));
            // Written by the checkpoint's task, never detached: no pace.
            let write = IndexWrite { path, slots, capacity, len, snapshot: owed.snapshot, pace: 0 };
            // A task that is gone (its checkpoint dropped) leaves the buffer to the next one.
            if let Err(std::sync::mpsc::TrySendError::Full(w) | std::sync::mpsc::TrySendError::Disconnected(w)) =
                owed.to_task.try_send(write)
                && let Ok(mut ledger) = self.ledger.lock()
            {
                ledger.spare_index_buf.get_or_insert(w.slots);
            }
        }
        false
    }

    /// Finishes what a checkpoint's durability task may be waiting for from this store (the
    /// copy of an index snapshot, see [`StoreConfig::max_replay_bytes`]), at once. A caller
    /// that stops calling [`StateStore::maintain`] (a stage at its end) calls this first.
    pub fn finish_copies(&mut self) {
        self.copy_owed_index(usize::MAX);
    }

    /// Finishes the upkeep of [`StateStore::maintain`] at once.
    fn fold_index(&mut self) -> Result<()> {
        while self.maintain(usize::MAX)? {}
        Ok(())
    }

    /// Checks every CRC the store depends on: all index chunks and every record of every
    /// segment up to its data end (after finishing the fold of a restore's index delta).
    /// Returns the number of records checked.
    pub fn verify_all(&mut self) -> Result<u64> {
        self.fold_index()?;
        self.index.verify_all()?;
        let mut records = 0;
        for id in self.first_segment..=self.tail_segment {
            let Some(segment) = self.segment(id)? else { continue };
            let end = if id == self.tail_segment { self.tail_offset } else { self.stats[id as usize].data_end };
            let mut off = SEGMENT_HEADER_BYTES;
            while off < end {
                let h = record::decode_checked(segment.data(off, end))
                    .map_err(|e| StateError::corrupt(segment.path(), u64::from(off), format!("bad record: {e:?}")))?;
                off += h.slot_bytes();
                records += 1;
            }
        }
        Ok(records)
    }

    /// Builds a new store in `dir` holding the entries of the key groups in `config.key_groups`
    /// from the stores of `sources` (directory and handle of each). This is how state taken at
    /// one parallelism is restored at another: every source record is CRC-checked as it is
    /// copied, and the copies count as foreign (values are validated on first typed read).
    pub fn restore_key_groups(
        dir: &Path,
        sources: &[(PathBuf, CheckpointHandle)],
        config: StoreConfig,
    ) -> Result<StateStore> {
        let range = config.key_groups;
        let mut target = StateStore::create(dir, config)?;
        for (source_dir, handle) in sources {
            if source_dir.as_path() == dir {
                return Err(StateError::Misuse("a rescaled store needs a directory of its own".into()));
            }
            if !handle.key_groups().intersect(&range).is_empty() {
                let mut source = StateStore::restore(
                    source_dir,
                    handle,
                    StoreConfig { shard: handle.shard, ..target.config.clone() },
                    RestoreOptions::default(),
                )?;
                for info in source.states() {
                    target.register(&info.name, None)?;
                }
                let mut copied = Vec::new();
                source.for_each(|state, group, key, value, _| {
                    if range.contains(group) {
                        copied.push((state, group, key.to_vec(), value.to_vec()));
                    }
                })?;
                for (state, group, key, value) in copied {
                    target.put_raw_aligned(state, Key { group, bytes: &key }, &value)?;
                }
            }
        }
        Ok(target)
    }

    /// `put_raw` for value bytes that may sit at any alignment (copies them via the aligned
    /// buffer first; the log aligns them again).
    pub(crate) fn put_raw_aligned(&mut self, state: StateId, key: Key<'_>, value: &[u8]) -> Result<()> {
        let mut buf = std::mem::take(&mut self.value_buf);
        buf.clear();
        buf.extend_from_slice(value);
        let result = self.put_bytes(state, key, &buf, FLAG_UNVALIDATED);
        self.value_buf = buf;
        result
    }

    /// Rewrites the live records of sealed segments whose live ratio is below `max_live_ratio`
    /// to the tail, so those segments hold nothing the current state needs, all at once. Only
    /// segments before the newest durable index snapshot are candidates (a later replay must
    /// still find the records after it). Their files are deleted by
    /// [`StateStore::collect_garbage`] once no retained checkpoint lists them. A running job
    /// uses [`StateStore::compact_step`] instead, which spreads the work.
    pub fn compact(&mut self, max_live_ratio: f64) -> Result<CompactionStats> {
        let started = Instant::now();
        let mut stats = CompactionStats::default();
        for id in self.compaction_candidates() {
            let s = self.stats[id as usize];
            let data = u64::from(s.data_end - SEGMENT_HEADER_BYTES);
            if (s.live_bytes as f64) / (data as f64) >= max_live_ratio {
                continue;
            }
            let moved = self.counters.compaction_moves;
            let (end, scanned) = self.compact_slice(id, SEGMENT_HEADER_BYTES, u64::MAX)?;
            debug_assert!(end.is_none() && scanned <= data);
            stats.records_moved += self.counters.compaction_moves - moved;
            stats.bytes_moved += s.live_bytes - self.stats[id as usize].live_bytes;
            stats.segments_compacted += 1;
        }
        stats.duration = started.elapsed();
        Ok(stats)
    }

    /// A bounded slice of incremental compaction, for a caller that calls it between batches
    /// of work (a stage's loop). While the log holds more than
    /// [`StoreConfig::compact_above_percent`] of the live bytes, it empties the candidate
    /// segment (see [`StateStore::compact`]) with the lowest live ratio, moving its live
    /// records to the tail a slice at a time: each call scans up to twice the bytes appended
    /// since the previous call (so compaction keeps pace with the garbage that updates leave),
    /// at least `min_bytes` (an idle caller's budget) and at most 256 KiB. Returns whether
    /// compaction is still due and has a segment to work on (an idle caller calls again).
    pub fn compact_step(&mut self, min_bytes: u32) -> Result<bool> {
        const MAX_SLICE: u64 = 256 << 10;
        const MAX_CREDIT: u64 = 64 << 20;
        let appended = self.appended_bytes - self.compaction.mark;
        self.compaction.mark = self.appended_bytes;
        if self.compaction.victim.is_none() {
            if appended == 0 && min_bytes == 0 {
                return Ok(false);
            }
            match self.compaction_victim() {
                Some(id) => self.compaction.victim = Some((id, SEGMENT_HEADER_BYTES)),
                None => {
                    self.compaction.credit = 0;
                    return Ok(false);
                }
            }
        }
        self.compaction.credit = (self.compaction.credit + 2 * appended).min(MAX_CREDIT);
        let budget = self.compaction.credit.max(u64::from(min_bytes)).min(MAX_SLICE);
        if let Some((id, from)) = self.compaction.victim {
            let (next, scanned) = self.compact_slice(id, from, budget)?;
            self.compaction.credit = self.compaction.credit.saturating_sub(scanned);
            self.compaction.victim = next.map(|off| (id, off));
        }
        // The slice's own appends earn no credit.
        self.compaction.mark = self.appended_bytes;
        Ok(self.compaction.victim.is_some() || self.compaction_victim().is_some())
    }

    /// Segments compaction may empty: sealed, before the newest confirmed index snapshot's
    /// seal (a replay from it never needs their records), holding live records.
    fn compaction_candidates(&self) -> Vec<SegmentId> {
        let replay_from = self.ledger.lock().ok().and_then(|l| l.confirmed_index.as_ref().map(|r| r.seal));
        let Some(replay_from) = replay_from else { return Vec::new() };
        let limit = address_segment(replay_from).min(address_segment(self.seal));
        (self.first_segment..limit)
            .filter(|&id| {
                let s = self.stats.get(id as usize).copied().unwrap_or_default();
                self.has_segment(id) && s.live_bytes > 0 && s.data_end > SEGMENT_HEADER_BYTES
            })
            .collect()
    }

    /// The segment compaction should empty next, if compaction is due: the candidate with the
    /// lowest live ratio, if that is at most 3/4 (emptying a fuller one frees too little).
    fn compaction_victim(&self) -> Option<SegmentId> {
        let percent = u64::from(self.config.compact_above_percent);
        if percent == 0 {
            return None;
        }
        // Segments already emptied wait for deletion (once no checkpoint needs them): they
        // are not compaction's to reclaim.
        let (live, log) = self.log_totals(true);
        if log * 100 <= live * percent {
            return None;
        }
        let ratio = |id: SegmentId| {
            let s = self.stats[id as usize];
            (s.live_bytes as f64) / f64::from(s.data_end - SEGMENT_HEADER_BYTES)
        };
        self.compaction_candidates()
            .into_iter()
            .map(|id| (ratio(id), id))
            .filter(|(r, _)| *r <= 0.75)
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, id)| id)
    }

    /// Moves the live records of segment `id` from offset `from` on to the tail, scanning at
    /// most about `budget` bytes. Returns where to go on (`None`: the segment is done, or no
    /// longer part of the store) and the bytes scanned.
    fn compact_slice(&mut self, id: SegmentId, from: u32, budget: u64) -> Result<(Option<u32>, u64)> {
        let mut key = std::mem::take(&mut self.compaction.key_buf);
        let mut value = std::mem::take(&mut self.value_buf);
        let result = self.compact_slice_with(id, from, budget, &mut key, &mut value);
        self.compaction.key_buf = key;
        self.value_buf = value;
        result
    }

    fn compact_slice_with(
        &mut self,
        id: SegmentId,
        from: u32,
        budget: u64,
        key: &mut Vec<u8>,
        value: &mut AlignedVec<16>,
    ) -> Result<(Option<u32>, u64)> {
        let end = match self.stats.get(id as usize) {
            Some(s) if self.has_segment(id) && s.live_bytes > 0 => s.data_end,
            _ => return Ok((None, 0)),
        };
        let mut off = from;
        while off < end && u64::from(off - from) < budget {
            let addr = log_address(id, off);
            let Some(segment) = self.segment(id)? else { return Ok((None, u64::from(off - from))) };
            let bytes = segment.data(off, end);
            let h =
                if addr < self.restored_upto { record::decode_checked(bytes) } else { record::decode_header(bytes) }
                    .map_err(|e| StateError::corrupt(segment.path(), u64::from(off), format!("bad record: {e:?}")))?;
            off += h.slot_bytes();
            if h.kind != RecordKind::Put {
                continue;
            }
            let Found::Live { slot, addr: current } = self.find(h.state, record::key_of(bytes, &h))? else {
                continue;
            };
            if current != addr {
                continue;
            }
            key.clear();
            key.extend_from_slice(record::key_of(bytes, &h));
            value.clear();
            value.extend_from_slice(record::value_of(bytes, &h));
            // A value read from a file keeps being validated before typed access after the move.
            let flags = if addr < self.restored_upto { h.flags | FLAG_UNVALIDATED } else { h.flags };
            let new_addr =
                self.append(h.state, Key { group: h.key_group, bytes: key }, RecordKind::Put, value, flags)?;
            self.mark_dead(addr)?;
            self.index.set_addr(slot, new_addr)?;
            self.counters.compaction_moves += 1;
            if self.stats[id as usize].live_bytes == 0 {
                // Nothing live is left after this record.
                break;
            }
        }
        let scanned = u64::from(off - from);
        self.counters.compaction_scanned += scanned;
        let empty = self.stats[id as usize].live_bytes == 0;
        Ok(((off < end && !empty).then_some(off), scanned))
    }

    /// Deletes segment and index snapshot files that neither the current state nor any of the
    /// `retained` checkpoints needs. `retained` must list every checkpoint that may still be
    /// restored, including one whose durability task is still running. Returns the number of
    /// files deleted. See [`StateStore::garbage`] to delete them on another thread.
    pub fn collect_garbage(&mut self, retained: &[&CheckpointHandle]) -> Result<usize> {
        let garbage = self.garbage(retained)?;
        for path in &garbage {
            std::fs::remove_file(path).map_err(|e| StateError::io("delete", path, e))?;
        }
        Ok(garbage.len())
    }

    /// Keeps a file no one needs as the store's spare segment or index file, for the next one
    /// to be written over instead of a new file (see [`SPARE_SEGMENT_FILE`]), if there is no
    /// spare yet. Never the index snapshot the index table is mapped from (privately: writing
    /// the file would show through pages not copied yet). Returns whether it did.
    fn recycle(&self, entry: &std::fs::DirEntry, name: &str) -> bool {
        let spare = if parse_segment_file_name(name).is_some() {
            let size_fits = entry.metadata().is_ok_and(|m| m.len() == u64::from(self.config.segment_bytes));
            if !size_fits {
                return false;
            }
            SPARE_SEGMENT_FILE
        } else if parse_index_file_name(name).is_some() && self.mapped_index.as_deref() != Some(name) {
            SPARE_INDEX_FILE
        } else {
            return false;
        };
        crate::segment::recycle(&entry.path(), &self.dir.join(spare))
    }

    /// The files no checkpoint in `retained` (nor the store itself) needs, which the store
    /// has let go of (unmapped): the caller deletes them, on any thread (unlinking a large file
    /// can block for milliseconds), and may shrink them first
    /// ([`crate::priority::delete_in_steps`]). The store never writes to these paths again.
    /// Some become the store's spare files instead (see [`SPARE_SEGMENT_FILE`]).
    pub fn garbage(&mut self, retained: &[&CheckpointHandle]) -> Result<Vec<PathBuf>> {
        let (confirmed, detached) = match self.ledger.lock() {
            Ok(l) => (l.confirmed_index.clone(), l.detached_index.iter().map(|d| d.snapshot.clone()).collect()),
            Err(_) => (None, Vec::new()),
        };
        let mut garbage = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| StateError::io("list store dir", &self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StateError::io("list store dir", &self.dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let keep = if let Some(id) = parse_segment_file_name(&name) {
                // The segments a snapshot still being copied or written points into are needed
                // too: later checkpoints' handles will reference that snapshot.
                let pending = self.pending_index.iter().chain(&detached).any(|p| p.segments.contains(&id));
                let needed_now = self.has_segment(id) && (pending || self.needed_by(id, confirmed.as_ref()));
                let keep = needed_now || retained.iter().any(|h| h.segments.iter().any(|s| s.id == id));
                if !keep && let Some(slot) = self.segments.get_mut(id as usize) {
                    *slot = None;
                }
                keep
            } else if name.ends_with(TRASH_SUFFIX) {
                false
            } else if let Some(id) = parse_index_file_name(&name) {
                retained.iter().any(|h| h.index_snapshot.as_ref().is_some_and(|r| r.checkpoint_id == id))
                    || confirmed.iter().chain(&detached).any(|r| r.checkpoint_id == id)
                    || self.last_checkpoint.is_some_and(|last| id >= last)
            } else {
                true
            };
            if keep || self.recycle(&entry, &name) {
                continue;
            }
            if self.mapped_index.as_deref() == Some(&*name) {
                // The index table is still mapped from it: unlinked here (its blocks are freed
                // when the mapping goes), never handed out, as a caller may shrink what it
                // deletes first, and a mapped page past the end of a file raises SIGBUS.
                std::fs::remove_file(entry.path()).map_err(|e| StateError::io("delete", entry.path(), e))?;
                self.mapped_index = None;
                continue;
            }
            garbage.push(entry.path());
        }
        while self.first_segment < self.tail_segment && !self.has_segment(self.first_segment) {
            self.first_segment += 1;
        }
        Ok(garbage)
    }
}

/// A value as stored, before typed access.
#[derive(Debug, Clone, Copy)]
pub struct RawValue<'a> {
    /// The value bytes (an rkyv archive), 16-byte aligned in the mapping.
    pub bytes: &'a [u8],
    /// Whether a typed reader must validate the bytes before zero-copy access.
    pub needs_validation: bool,
    /// Where the record lives.
    pub addr: LogAddress,
}

/// What [`StateStore::compact`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CompactionStats {
    /// Segments whose live records were moved.
    pub segments_compacted: u64,
    /// Records moved to the tail.
    pub records_moved: u64,
    /// Bytes moved.
    pub bytes_moved: u64,
    /// Time taken.
    pub duration: Duration,
}

#[derive(Debug)]
struct IndexWrite {
    path: PathBuf,
    slots: crate::index::SnapshotBuf,
    capacity: usize,
    len: usize,
    snapshot: IndexSnapshotRef,
    /// Bytes per second to write it at when detached (see [`write_paced`]).
    pace: u64,
}

/// A sealed checkpoint of one store: its handle, and the task that makes it durable.
#[derive(Debug)]
pub struct PendingCheckpoint {
    /// What the manifest records once the task succeeded.
    pub handle: CheckpointHandle,
    /// Run this off the executor thread (a blocking pool); the checkpoint's part of this shard
    /// is durable when it returns `Ok`.
    pub task: DurabilityTask,
    /// The confirmed index snapshot and the segments the handle lists when the index snapshot
    /// this checkpoint writes is detached from it; `None` when it may not be (the checkpoint
    /// is past the replay bound, [`StoreConfig::max_replay_bytes`]).
    fallback: Option<(Option<IndexSnapshotRef>, Vec<SegmentRef>)>,
}

impl PendingCheckpoint {
    /// Takes the memory the store let go of since the last checkpoint out of the durability
    /// task, for the caller to drop on a thread nobody waits for (see [`Released`]); `None`
    /// when there is none. Left in the task, it is freed when the task is dropped.
    pub fn take_released(&mut self) -> Option<Released> {
        let released = std::mem::take(&mut self.task.released);
        (!released.0.is_empty()).then_some(released)
    }

    /// Takes the index snapshot this checkpoint would write (if one is due) out of its
    /// durability task, so that the checkpoint's duration does not include writing a file the
    /// size of the index. The handle then refers to the newest confirmed snapshot instead (a
    /// restore replays a longer log tail); the detached snapshot is confirmed, and referred to
    /// by later checkpoints, once its task succeeded and the log up to its seal is durable.
    /// Until then the store starts no other snapshot and keeps its file and segments.
    ///
    /// `None` when no snapshot is due, and when the checkpoint is past the replay bound
    /// ([`StoreConfig::max_replay_bytes`]): its snapshot stays in its task.
    pub fn detach_index(&mut self) -> Option<IndexSnapshotTask> {
        let (index, segments) = self.fallback.take()?;
        let write = self.task.index_write.take()?;
        self.handle.index_snapshot = index;
        self.handle.segments = segments;
        let ledger = Arc::clone(&self.task.ledger);
        let snapshot = write.snapshot.clone();
        let write = DetachedWrite::new(write);
        if let Ok(mut l) = ledger.lock() {
            l.detached_index.push(Detached { snapshot, write: Arc::clone(&write) });
        }
        Some(IndexSnapshotTask { write, dir: self.task.dir.clone(), ledger })
    }
}

/// An index snapshot written apart from its checkpoint (see [`PendingCheckpoint::detach_index`]).
/// Dropping it unrun abandons the snapshot; the store then starts another when one is due.
/// A later checkpoint past the replay bound may name it, and then writes it itself if this
/// task has not started by the time that checkpoint's durability task runs.
#[derive(Debug)]
pub struct IndexSnapshotTask {
    write: Arc<DetachedWrite>,
    dir: PathBuf,
    ledger: Arc<Mutex<Ledger>>,
}

impl IndexSnapshotTask {
    /// Bytes of slots the snapshot holds (0 once its write has started).
    pub fn bytes(&self) -> u64 {
        self.write.queued_bytes()
    }

    /// Writes the snapshot file durably, blocking the calling thread; stops early (and names
    /// nothing) once `fence` is closed, and renames the file into place only inside it.
    /// Returns the bytes written: 0 when a checkpoint's durability task took the write over.
    /// A failure leaves the store sound: later checkpoints keep referring to the older
    /// snapshot.
    pub fn run(self, fence: &crate::fence::Fence) -> Result<u64> {
        let Some(w) = self.write.take() else { return Ok(0) };
        let pace = w.pace;
        self.write.write(w, &self.dir, &self.ledger, Some(fence), Some(pace))
    }
}

impl Drop for IndexSnapshotTask {
    fn drop(&mut self) {
        if let Some(w) = self.write.take() {
            if let Ok(mut ledger) = self.ledger.lock() {
                ledger.drop_detached(w.snapshot.checkpoint_id);
                ledger.spare_index_buf = Some(w.slots);
            }
            self.write.finish(false);
        }
    }
}

/// The work that makes one store's checkpoint durable: fsync of new segment files and of
/// the directory, `msync(MS_SYNC)` of the bytes written since the last durable checkpoint,
/// and the index snapshot file. `Send`, so it runs on any thread.
#[derive(Debug)]
pub struct DurabilityTask {
    /// Memory the store let go of, freed where the task is dropped (off the shard).
    released: Released,
    /// Set when the log could not be written into its files: the task fails with it.
    write_error: Option<StateError>,
    checkpoint_id: u64,
    dir: PathBuf,
    seal: LogAddress,
    new_files: Vec<SegmentFlusher>,
    flushes: Vec<(SegmentFlusher, u32, u32)>,
    index_write: Option<IndexWrite>,
    /// The index snapshot of a checkpoint past the replay bound, which the store hands over
    /// once copied (see [`StateStore::maintain`]), and the store's thread.
    index_copying: Option<(std::sync::mpsc::Receiver<IndexWrite>, std::thread::ThreadId)>,
    /// The detached index snapshot of an earlier checkpoint that a checkpoint past the replay
    /// bound names: the task writes it if its own task has not started, and waits for it
    /// otherwise.
    index_named: Option<Arc<DetachedWrite>>,
    /// Whether the checkpoint is past the replay bound.
    past_replay_bound: bool,
    ledger: Arc<Mutex<Ledger>>,
}

/// What is left of a store after [`StateStore::retire`]: its files' mappings, freed when this
/// is dropped.
pub struct RetiredStore {
    _store: StateStore,
    donated: usize,
}

impl RetiredStore {
    /// Bytes of memory the store handed to the warm pool.
    pub fn donated_bytes(&self) -> usize {
        self.donated
    }
}

impl std::fmt::Debug for RetiredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RetiredStore({}, {} bytes donated)", self._store.dir.display(), self.donated)
    }
}

/// Memory a store let go of (closed open tails, a snapshot buffer of the wrong size), handed
/// out with the next checkpoint ([`PendingCheckpoint::take_released`]) so that it is freed
/// off the store's thread: giving back tens of MiB of touched pages took 2-6 ms on the shard
/// (measured with a temporary timer in `checkpoint-scale`). Frees it when dropped.
#[derive(Default)]
pub struct Released(Vec<Box<dyn Send>>);

impl std::fmt::Debug for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Released({} items)", self.0.len())
    }
}

/// What a finished [`DurabilityTask`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    /// The checkpoint.
    pub checkpoint_id: u64,
    /// Log bytes synced.
    pub bytes_synced: u64,
    /// Bytes of index snapshot written (0 when none was due).
    pub index_bytes: u64,
    /// Whether the checkpoint was past the store's replay bound
    /// ([`StoreConfig::max_replay_bytes`]): the task wrote, or waited for, the index snapshot
    /// the checkpoint names.
    pub past_replay_bound: bool,
    /// Wall time the task took.
    pub duration: Duration,
}

impl DurabilityTask {
    /// Log bytes this task will sync.
    pub fn bytes_to_sync(&self) -> u64 {
        self.flushes.iter().map(|f| u64::from(f.2)).sum()
    }

    /// Runs the task on a new thread and returns a [`Completion`] to poll or wait on, for
    /// callers without a blocking pool of their own (the runtime uses glommio's).
    pub fn spawn(self) -> Completion {
        let handle = std::thread::Builder::new().name("weir-durability".into()).spawn(move || self.run());
        Completion { handle: Some(handle) }
    }

    /// Performs the syncs, blocking the calling thread.
    pub fn run(self) -> Result<Durable> {
        self.run_fenced(None)
    }

    /// [`DurabilityTask::run`] for a helper of a run attempt (see [`crate::fence`]): the index
    /// snapshot the task writes, if any, is given up once `fence` closes and renamed into
    /// place only inside it. (A later attempt may reuse the checkpoint id, and so the file's
    /// name.) The log's syncs run regardless: they make durable what any attempt reads.
    pub fn run_fenced(mut self, fence: Option<&crate::fence::Fence>) -> Result<Durable> {
        let foreground = crate::priority::Foreground::begin();
        let started = Instant::now();
        let bytes_synced = self.bytes_to_sync();
        if let Some(e) = self.write_error.take() {
            // Nothing was synced: the store still holds the bytes and writes them again.
            return Err(e);
        }
        if let Err(e) = self.sync_log() {
            if let Ok(mut ledger) = self.ledger.lock() {
                ledger.failed_sync = Some(e.to_string());
            }
            return Err(e);
        }
        // An index snapshot is bulk: background writers need not hold back for it.
        drop(foreground);
        let mut index_bytes = 0;
        let mut written_index = None;
        let index_write = match (self.index_write.take(), self.index_copying.take()) {
            (Some(write), _) => Some(write),
            (None, Some((copying, store_thread))) => Some(self.wait_for_copy(&copying, store_thread, fence)?),
            (None, None) => None,
        };
        // Writing (and checksumming) a file the size of the index is long work: the runtime's
        // durability workers, in the real-time class, share the cores for it.
        let _normal = (index_write.is_some() || self.index_named.is_some()).then(crate::priority::lower);
        if let Some(named) = self.index_named.take() {
            match named.take() {
                Some(w) => index_bytes = named.write(w, &self.dir, &self.ledger, fence, None)?,
                None => named.wait(fence, self.checkpoint_id)?,
            }
        }
        if let Some(w) = index_write {
            // CRCs and header are computed here, off the caller's thread.
            let header = crate::index::snapshot_header(w.capacity, w.len, w.snapshot.seal, &w.slots);
            let written = write_durably_fenced(&w.path, &[&header, &w.slots], &self.dir, fence, None);
            index_bytes = (header.len() + w.capacity * 16) as u64;
            let snapshot = w.snapshot.clone();
            let mut freed = None;
            if let Ok(mut ledger) = self.ledger.lock() {
                freed = ledger.index_written(w, written.is_ok().then_some(header));
            }
            drop(freed);
            written?;
            written_index = Some(snapshot);
        }
        if let Ok(mut ledger) = self.ledger.lock() {
            ledger.synced_upto = ledger.synced_upto.max(self.seal);
            ledger.promote_detached();
            if let Some(snapshot) = written_index
                && ledger.confirmed_index.as_ref().is_none_or(|c| c.checkpoint_id < snapshot.checkpoint_id)
            {
                ledger.confirmed_index = Some(snapshot);
            }
        }
        Ok(Durable {
            checkpoint_id: self.checkpoint_id,
            bytes_synced,
            index_bytes,
            past_replay_bound: self.past_replay_bound,
            duration: started.elapsed(),
        })
    }

    /// Waits until the store has copied this checkpoint's index snapshot (a slice per call of
    /// [`StateStore::maintain`]); gives up once `fence` closes. On the store's own thread it
    /// does not wait (nothing would copy meanwhile): the caller finishes the copy first.
    fn wait_for_copy(
        &self,
        copying: &std::sync::mpsc::Receiver<IndexWrite>,
        store_thread: std::thread::ThreadId,
        fence: Option<&crate::fence::Fence>,
    ) -> Result<IndexWrite> {
        use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
        match copying.try_recv() {
            Ok(write) => return Ok(write),
            Err(TryRecvError::Empty) if std::thread::current().id() == store_thread => {
                return Err(StateError::Misuse(format!(
                    "checkpoint {}'s task waits for its index snapshot to be copied: call StateStore::finish_copies (or maintain) before running it on the store's thread",
                    self.checkpoint_id
                )));
            }
            Err(_) => {}
        }
        loop {
            match copying.recv_timeout(Duration::from_millis(10)) {
                Ok(write) => return Ok(write),
                Err(RecvTimeoutError::Timeout) if fence.is_some_and(|f| f.is_closed()) => {
                    return Err(StateError::Misuse(format!(
                        "the index snapshot of checkpoint {} was cancelled",
                        self.checkpoint_id
                    )));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(StateError::Misuse(format!(
                        "the store in {} stopped before it copied the index snapshot of checkpoint {}",
                        self.dir.display(),
                        self.checkpoint_id
                    )));
                }
            }
        }
    }

    fn sync_log(&self) -> Result<()> {
        crate::faults::check("state::sync_segment", &self.dir)?;
        for f in &self.new_files {
            f.sync_file()?;
        }
        if !self.new_files.is_empty() {
            sync_dir(&self.dir)?;
        }
        for (f, off, len) in &self.flushes {
            f.flush_range(*off, *len)?;
        }
        Ok(())
    }
}

/// A [`DurabilityTask`] running on its own thread.
#[derive(Debug)]
pub struct Completion {
    handle: Option<std::io::Result<std::thread::JoinHandle<Result<Durable>>>>,
}

impl Completion {
    /// Whether the task has finished (then [`Completion::wait`] does not block).
    pub fn is_done(&self) -> bool {
        match &self.handle {
            Some(Ok(h)) => h.is_finished(),
            _ => true,
        }
    }

    /// Waits for the task and returns its result.
    pub fn wait(mut self) -> Result<Durable> {
        match self.handle.take() {
            Some(Ok(h)) => {
                h.join().unwrap_or_else(|_| Err(StateError::Misuse("the durability thread panicked".into())))
            }
            Some(Err(e)) => Err(StateError::io("spawn durability thread", "<thread>", e)),
            None => Err(StateError::Misuse("completion already waited on".into())),
        }
    }
}

/// How fast a background index snapshot is written at least: slow enough that its CPU (the
/// copy into the bounce buffer) and disk bandwidth leave room for the shards and for
/// checkpoints' syncs. It is written faster, up to [`MAX_BACKGROUND_WRITE_BYTES_PER_S`], when
/// the log a restore would replay is long: four times its length per second, so that after a
/// bulk load snapshots catch up instead of trailing it (a 1 GiB restore replayed 93-144 MiB).
const BACKGROUND_WRITE_BYTES_PER_S: u64 = 256 << 20;
/// The fastest pace of a background index snapshot.
const MAX_BACKGROUND_WRITE_BYTES_PER_S: u64 = 1 << 30;
/// From this pace on (a replay tail of 128 MiB) a snapshot is urgent: its writer does not
/// stay in the idle scheduling class (see `crate::priority`). Steady checkpoints keep the tail
/// under `index_snapshot_tail_bytes` (64 MiB), so their snapshots do.
const URGENT_BACKGROUND_WRITE_BYTES_PER_S: u64 = 2 * BACKGROUND_WRITE_BYTES_PER_S;

/// The pace of an index snapshot written while a restore would replay `replay_tail` bytes.
fn snapshot_pace(replay_tail: u64) -> u64 {
    replay_tail.saturating_mul(4).clamp(BACKGROUND_WRITE_BYTES_PER_S, MAX_BACKGROUND_WRITE_BYTES_PER_S)
}

/// The most a fenced write writes between two looks at its fence.
const FENCED_PIECE: usize = 4 << 20;

/// Temp files get names of their own (process and counter), so that a helper of a stopped run
/// attempt still writing one never shares it with the next attempt writing the same target.
static TEMP_FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Writes `parts` to `path` durably and atomically: a temp file is written and fsynced, renamed
/// over `path`, and `dir` fsynced. Readers see the old file or the whole new one, never a
/// partial one, and an existing file at `path` is replaced (new inode), never truncated, so an
/// older index snapshot that is still mapped is never cut short under its mapping.
///
/// With a `fence`, the rename that makes the file visible runs inside it (so it never happens
/// once the fence is closed; see [`crate::fence`]) and the write is given up soon after it
/// closes. With a `pace` (a background write) the file is written at that many bytes per
/// second with direct I/O (see [`write_paced`]).
pub(crate) fn write_durably_fenced(
    path: &Path,
    parts: &[&[u8]],
    dir: &Path,
    fence: Option<&crate::fence::Fence>,
    pace: Option<u64>,
) -> Result<()> {
    use std::io::Write;
    crate::faults::check("state::write_file", path)?;
    let mut tmp_name = path.as_os_str().to_owned();
    let n = TEMP_FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tmp_name.push(format!(".{}-{n}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let fenced = || StateError::Misuse(format!("writing {} was cancelled", path.display()));
    let written = (|| {
        let file = match fence {
            Some(fence) if let Some(pace) = pace => {
                // A background write goes over the store's spare file, if it has one.
                let _ = std::fs::rename(dir.join(SPARE_INDEX_FILE), &tmp);
                write_paced(&tmp, parts, fence, pace)?
            }
            _ => {
                let mut file = std::fs::File::create(&tmp).map_err(|e| StateError::io("create", &tmp, e))?;
                // In pieces, so that a closed fence stops a long write soon.
                for piece in parts.iter().flat_map(|bytes| bytes.chunks(FENCED_PIECE)) {
                    if fence.is_some_and(|f| f.is_closed()) {
                        return Err(fenced());
                    }
                    file.write_all(piece).map_err(|e| StateError::io("write", &tmp, e))?;
                }
                file
            }
        };
        if fence.is_some_and(|f| f.is_closed()) {
            return Err(fenced());
        }
        file.sync_all().map_err(|e| StateError::io("fsync", &tmp, e))?;
        let rename = || std::fs::rename(&tmp, path).map_err(|e| StateError::io("rename", path, e));
        match fence {
            Some(fence) => fence.pass(rename).unwrap_or_else(|| Err(fenced())),
            None => rename(),
        }
    })();
    if written.is_err() {
        // Unlinking a file of tens of MiB can take tens of milliseconds, which a cancelled
        // write (a restart waiting for it) must not spend: the file is renamed to a trash name
        // instead, which the store's next garbage collection deletes off the shard.
        let mut trash = tmp.clone().into_os_string();
        trash.push(TRASH_SUFFIX);
        if std::fs::rename(&tmp, &trash).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    written?;
    sync_dir(dir)
}

/// Writes `parts` to a new file `tmp` in the background manner of
/// [`write_durably_fenced`]: paced, cancellable, and with direct I/O (`O_DIRECT`, through
/// a page-aligned bounce buffer) where the file system has it, so that the file's pages never
/// sit dirty in the page cache, where a checkpoint's `msync` (whose journal commit flushes
/// ordered data) would wait for them. Falls back to buffered writes. Returns the open file.
fn write_paced(tmp: &Path, parts: &[&[u8]], fence: &crate::fence::Fence, pace: u64) -> Result<std::fs::File> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const PIECE: usize = crate::priority::BACKGROUND_PIECE;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let direct = total.is_multiple_of(4096);
    // Not truncated: `tmp` may be a recycled file, whose blocks are written over; its length
    // is set once written.
    let open =
        |flags: i32| std::fs::OpenOptions::new().write(true).create(true).truncate(false).custom_flags(flags).open(tmp);
    let direct_flag = rustix::fs::OFlags::DIRECT.bits() as i32;
    let (mut file, direct) = match direct.then(|| open(direct_flag)) {
        Some(Ok(file)) => (file, true),
        _ => (open(0).map_err(|e| StateError::io("create", tmp, e))?, false),
    };
    let mut bounce = memmap2::MmapMut::map_anon(PIECE).map_err(|e| StateError::io("mmap bounce buffer", tmp, e))?;
    let mut started = Instant::now();
    let mut written = 0usize;
    let mut filled = 0usize;
    // A writer in the idle scheduling class leaves it until the file is written (see
    // `crate::priority`) when the snapshot is urgent (a long replay tail: after a bulk load,
    // when the shards are busiest), at the shards' priority, or once it falls behind (shards
    // busy on every core), at the lowest normal priority.
    use crate::priority::Level;
    let urgent = pace >= URGENT_BACKGROUND_WRITE_BYTES_PER_S;
    let mut raised = urgent.then(|| (crate::priority::raise(Level::Shards), Level::Shards));
    let mut flush = |buf: &[u8], written: &mut usize| -> Result<()> {
        // While a snapshot a store's replay bound needs is waiting (maybe this one, maybe one
        // queued behind it), this one neither holds back nor keeps its pace.
        let hurry = crate::priority::Urgent::active();
        if hurry && !matches!(raised, Some((_, Level::Shards))) {
            // Back to the idle class first: `raise` leaves a thread outside it alone.
            raised = None;
            raised = Some((crate::priority::raise(Level::Shards), Level::Shards));
        }
        if !hurry {
            // Checkpoint I/O goes first; the time waited for it does not count against the pace.
            started += crate::priority::yield_to_foreground(|| fence.is_closed());
        }
        if fence.is_closed() {
            return Err(StateError::Misuse(format!("writing {} was cancelled", tmp.display())));
        }
        crate::faults::check("state::background_piece", tmp)?;
        file.write_all(buf).map_err(|e| StateError::io("write", tmp, e))?;
        if !direct {
            // Starts writeback of what was just written; only a hint.
            let len = std::num::NonZeroU64::new(buf.len() as u64);
            let _ = rustix::fs::fadvise(&file, *written as u64, len, rustix::fs::Advice::DontNeed);
        }
        *written += buf.len();
        let due = Duration::from_secs_f64(*written as f64 / pace.max(1) as f64);
        if hurry {
            // On schedule from here: once nothing is urgent, the pace goes on from where the
            // write is, without a pause to make up for the hurry.
            started = Instant::now().checked_sub(due).unwrap_or(started);
            return Ok(());
        }
        if raised.is_none() && started.elapsed() > due + crate::priority::STARVED_AFTER {
            raised = Some((crate::priority::raise(Level::Trickle), Level::Trickle));
        }
        while let Some(wait) = due.checked_sub(started.elapsed()) {
            if fence.is_closed() {
                break;
            }
            std::thread::sleep(wait.min(Duration::from_millis(1)));
        }
        Ok(())
    };
    for mut bytes in parts.iter().copied() {
        while !bytes.is_empty() {
            let n = bytes.len().min(PIECE - filled);
            bounce[filled..filled + n].copy_from_slice(&bytes[..n]);
            filled += n;
            bytes = &bytes[n..];
            if filled == PIECE {
                flush(&bounce[..], &mut written)?;
                filled = 0;
            }
        }
    }
    if filled > 0 {
        flush(&bounce[..filled], &mut written)?;
    }
    file.set_len(total as u64).map_err(|e| StateError::io("truncate", tmp, e))?;

    Ok(file)
}

/// Background write-back of the mutable region; see [`StateStore::write_behind`].
#[derive(Debug)]
pub struct WriteBehindTask {
    ranges: Vec<(SegmentFlusher, u32, u32)>,
    presync: Option<Presync>,
}

/// The early fsync of new segment files and their directory (see [`WriteBehindTask`]).
#[derive(Debug)]
struct Presync {
    files: Vec<(SegmentId, SegmentFlusher)>,
    dir: PathBuf,
    ledger: Arc<Mutex<Ledger>>,
}

impl WriteBehindTask {
    /// Fsyncs new segment files and their directory, so that the next checkpoint need not,
    /// then starts writing the ranges back (it does not wait for the disk). A failed fsync marks
    /// the store suspect, like a failed checkpoint sync (it is never retried and then trusted);
    /// a failure to start writeback is only a hint: the next checkpoint syncs the same bytes.
    pub fn run(self) -> Result<u64> {
        if let Some(p) = &self.presync {
            let synced = crate::faults::check("state::presync_segment", &p.dir)
                .and_then(|()| p.files.iter().try_for_each(|(_, f)| f.sync_file()))
                .and_then(|()| sync_dir(&p.dir));
            if let Ok(mut ledger) = p.ledger.lock() {
                match &synced {
                    Ok(()) => ledger.presynced.extend(p.files.iter().map(|(id, _)| *id)),
                    Err(e) => {
                        ledger.failed_sync.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            synced?;
        }
        let mut bytes = 0;
        for (f, off, len) in &self.ranges {
            f.start_writeback(*off, *len)?;
            bytes += u64::from(*len);
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::CHUNK_SLOTS;

    fn config() -> StoreConfig {
        StoreConfig {
            segment_bytes: 1 << 20,
            max_parallelism: 64,
            key_groups: KeyGroupRange::all(64),
            index_snapshot_every: 1,
            ..StoreConfig::default()
        }
    }

    fn key(k: u64) -> Vec<u8> {
        k.to_be_bytes().to_vec()
    }

    /// The fold's record prefetch takes any address (it reads them from index slots it has
    /// not checked): no segment, a segment not part of the store, offsets past a segment's
    /// end, a tombstone's flag, all do nothing, and the store reads the same afterwards.
    #[test]
    fn prefetching_a_record_at_any_address_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = StateStore::create(dir.path(), config()).unwrap();
        let state = store.register("s", None).unwrap();
        for k in 0..100u64 {
            store.put_raw(state, Key::new(&key(k), 64), &[k as u8; 40]).unwrap();
        }
        let tail = store.tail();
        let seg = address_segment(tail);
        for addr in [
            0,
            1,
            u64::MAX,
            tail,
            log_address(seg, 0),
            log_address(seg, u32::MAX),
            log_address(seg + 1, 64),
            log_address(SegmentId::MAX, 4096),
            tail | (1 << 63),
        ] {
            store.prefetch_record(addr);
        }
        for k in 0..100u64 {
            assert_eq!(store.get_raw(state, Key::new(&key(k), 64)).unwrap().unwrap().bytes, &[k as u8; 40]);
        }
    }

    /// A tail long enough to be decoded on a helper thread replays like a short one: every
    /// key's newest value and every delete come back; a bad record past its first pieces is
    /// reported with its file and offset, and nothing is restored.
    #[test]
    fn a_long_tail_replays_on_a_helper_thread_and_its_corruption_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { segment_bytes: 8 << 20, index_snapshot_every: u32::MAX, ..config() };
        let mut store = StateStore::create(dir.path(), config.clone()).unwrap();
        let state = store.register("s", None).unwrap();
        let keys = 40_000u64;
        // Three rounds of writes over every key, each sealed by a checkpoint (so the next
        // appends instead of updating in place), then deletes of every 7th: about
        // 3 * 40,000 * 300 bytes, over PARALLEL_REPLAY_BYTES.
        for round in 0..3u8 {
            for k in 0..keys {
                store.put_raw(state, Key::new(&key(k), 64), &[round.wrapping_add(k as u8); 256]).unwrap();
            }
            store.checkpoint(u64::from(round) + 1).unwrap().task.run().unwrap();
        }
        for k in (0..keys).step_by(7) {
            store.delete(state, Key::new(&key(k), 64)).unwrap();
        }
        let pending = store.checkpoint(4).unwrap();
        pending.task.run().unwrap();
        let handle = pending.handle;
        assert!(handle.index_snapshot.is_none());
        let tail = store.log_distance(None, handle.seal);
        // More than a piece comes before the corrupted record below.
        assert!(tail >= PARALLEL_REPLAY_BYTES && tail as usize > REPLAY_PIECE * 300, "tail {tail}");
        drop(store);
        let restored = StateStore::restore(dir.path(), &handle, config.clone(), RestoreOptions::default()).unwrap();
        for k in 0..keys {
            let got = restored.get_raw(state, Key::new(&key(k), 64)).unwrap().map(|v| v.bytes.to_vec());
            let want = (k % 7 != 0).then(|| vec![2u8.wrapping_add(k as u8); 256]);
            assert_eq!(got, want, "key {k}");
        }
        drop(restored);
        // A byte of a record in the last segment the tail spans.
        let last = address_segment(handle.seal);
        let path = dir.path().join(segment_file_name(last));
        let mut bytes = std::fs::read(&path).unwrap();
        let at = SEGMENT_HEADER_BYTES as usize + 1000;
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        match StateStore::restore(dir.path(), &handle, config, RestoreOptions::default()) {
            Err(StateError::Corrupt { file, offset, .. }) => {
                assert_eq!(file, path);
                assert!(offset <= at as u64 && offset + 1024 > at as u64, "offset {offset} of a byte at {at}");
            }
            other => panic!("expected a corruption error, got {:?}", other.map(|_| ())),
        }
    }

    /// A retired store's index table goes to the warm pool, and a restore's delta built in
    /// memory from the pool (left dirty by its last owner) is zeroed first: every key comes
    /// back. (The pool is the process's: another test may take an entry first, which only
    /// makes the restore use new memory.)
    #[test]
    fn a_retired_stores_memory_goes_to_the_warm_pool_and_a_restore_from_it_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { segment_bytes: 8 << 20, index_snapshot_every: u32::MAX, ..config() };
        let mut store = StateStore::create(dir.path(), config.clone()).unwrap();
        let state = store.register("s", None).unwrap();
        let keys = 100_000u64;
        for k in 0..keys {
            put(&mut store, state, k, k * 3);
        }
        let pending = store.checkpoint(1).unwrap();
        pending.task.run().unwrap();
        assert!(pending.handle.index_snapshot.is_none(), "the restore replays every record");
        let table = store.index.table_bytes();
        assert!(table >= 1 << 20, "a table the pool takes: {table}");
        let retired = store.retire();
        assert!(retired.donated_bytes() >= table || crate::warm::held_bytes() + table > crate::warm::MAX_HELD_BYTES);
        // Dirty buffers of every size a delta for this tail may ask for.
        for mib in [1usize, 2, 4, 8] {
            let mut dirty = crate::segment::PrivatePages::anonymous(mib << 20, "test").unwrap();
            dirty.fill(0xFF);
            drop(crate::warm::give(dirty));
        }
        // On a thread: a delta of stale slots would look full, and its probes would not end.
        let (done, finished) = std::sync::mpsc::channel();
        let path = dir.path().to_owned();
        std::thread::spawn(move || {
            let restored = StateStore::restore(&path, &pending.handle, config, RestoreOptions::default()).unwrap();
            let wrong = (0..=keys).find(|&k| get(&restored, state, k).unwrap() != (k < keys).then_some(k * 3));
            let _ = done.send(wrong);
        });
        match finished.recv_timeout(Duration::from_secs(60)) {
            Ok(wrong) => assert_eq!(wrong, None, "a key restored wrong"),
            Err(e) => panic!("the restore did not finish: {e}"),
        }
        drop(retired);
    }

    /// The newest index snapshot's slots stay in memory as written. A retired store hands them
    /// to the warm pool, tagged with their file, and the restore of a checkpoint that names
    /// that file takes them as its table: its slots in the file are not read (zeroed here,
    /// header and chunk CRCs kept, every key still comes back). With the setting off, nothing
    /// is kept.
    #[test]
    fn the_newest_index_snapshot_stays_in_memory_for_the_restore_of_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = StateStore::create(dir.path(), config()).unwrap();
        let state = store.register("s", None).unwrap();
        let keys = 50_000u64;
        for k in 0..keys {
            put(&mut store, state, k, k * 3);
        }
        store.checkpoint(1).unwrap().task.run().unwrap();
        let c2 = store.checkpoint(2).unwrap();
        c2.task.run().unwrap();
        assert_eq!(c2.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id), Some(1));
        let path = dir.path().join(index_file_name(1));
        let table = store.index.table_bytes();
        assert!(table >= 1 << 20, "a table the pool takes: {table}");
        assert!(store.ledger.lock().unwrap().resident.as_ref().is_some_and(|r| r.path == path));

        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let slots_at = file.metadata().unwrap().len() - table as u64;
        std::os::unix::fs::FileExt::write_all_at(&file, &vec![0u8; table], slots_at).unwrap();
        drop(file);
        let retired = store.retire();
        if !crate::warm::holds_snapshot(&path) {
            // The pool was full (other tests' entries): nothing to check here.
            assert!(crate::warm::held_bytes() + table > crate::warm::MAX_HELD_BYTES);
            return;
        }
        let restored = StateStore::restore(dir.path(), &c2.handle, config(), RestoreOptions::default()).unwrap();
        assert!(!crate::warm::holds_snapshot(&path), "the restore took the slots");
        let wrong = (0..=keys).find(|&k| get(&restored, state, k).unwrap() != (k < keys).then_some(k * 3));
        assert_eq!(wrong, None, "a key restored wrong");
        drop(retired);

        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig { resident_index_snapshot: false, ..config() };
        let mut store = StateStore::create(dir.path(), config).unwrap();
        let state = store.register("s", None).unwrap();
        for k in 0..1000 {
            put(&mut store, state, k, k);
        }
        store.checkpoint(1).unwrap().task.run().unwrap();
        store.checkpoint(2).unwrap().task.run().unwrap();
        let ledger = store.ledger.lock().unwrap();
        assert!(ledger.resident.is_none() && ledger.spare_index_buf.is_some());
    }

    fn put(store: &mut StateStore, state: StateId, k: u64, v: u64) {
        store.put_raw(state, Key::new(&key(k), 64), &v.to_le_bytes()).unwrap();
    }

    fn get(store: &StateStore, state: StateId, k: u64) -> Result<Option<u64>> {
        let raw = store.get_raw(state, Key::new(&key(k), 64))?;
        Ok(raw.map(|r| u64::from_le_bytes(r.bytes[..8].try_into().unwrap())))
    }

    /// A store of 10,000 keys whose index snapshot (taken at checkpoint 1, written by
    /// checkpoint 2) has 4 chunks, and a tail after it that updates, deletes and adds keys whose
    /// home slot lies in chunk 2 only. Returns the handle of checkpoint 2, the index capacity,
    /// and the expected contents of the tail's keys.
    fn store_with_a_tail_in_chunk_2(dir: &Path) -> (CheckpointHandle, usize, Vec<(u64, Option<u64>)>) {
        let mut store = StateStore::create(dir, config()).unwrap();
        let state = store.register("op/v", None).unwrap();
        for k in 0..10_000 {
            put(&mut store, state, k, k);
        }
        let capacity = store.index.table_bytes() / 16;
        assert_eq!(capacity, 4 * CHUNK_SLOTS);
        let in_chunk_2 = |k: u64| (StateStore::hash(state, &key(k)) as usize & (capacity - 1)) / CHUNK_SLOTS == 2;
        store.checkpoint(1).unwrap().task.run().unwrap();
        let mut tail = Vec::new();
        for k in (0..10_000).filter(|&k| in_chunk_2(k)).take(60) {
            if k % 3 == 0 {
                assert!(store.delete(state, Key::new(&key(k), 64)).unwrap());
                tail.push((k, None));
            } else {
                put(&mut store, state, k, k + 1_000_000);
                tail.push((k, Some(k + 1_000_000)));
            }
        }
        for k in (10_000..).filter(|&k| in_chunk_2(k)).take(20) {
            put(&mut store, state, k, k);
            tail.push((k, Some(k)));
        }
        let c2 = store.checkpoint(2).unwrap();
        c2.task.run().unwrap();
        assert_eq!(c2.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id), Some(1));
        (c2.handle, capacity, tail)
    }

    /// The replay of the tail never touches the mapped index snapshot: with its chunk 2
    /// corrupt, a restore whose tail changes only keys homed in chunk 2 succeeds and answers for
    /// them from the delta; the fold, which writes them into chunk 2, finds the corruption.
    #[test]
    fn replay_does_not_touch_the_restored_index_table() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, capacity, tail) = store_with_a_tail_in_chunk_2(dir.path());
        let path = dir.path().join(index_file_name(1));
        let mut bytes = std::fs::read(&path).unwrap();
        let chunk_2 = bytes.len() - capacity * 16 + 2 * CHUNK_SLOTS * 16;
        bytes[chunk_2 + CHUNK_SLOTS * 8 + 5] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();

        let mut store = StateStore::restore(dir.path(), &handle, config(), RestoreOptions::default()).unwrap();
        let state = state_id_of("op/v");
        for &(k, v) in &tail {
            assert_eq!(get(&store, state, k).unwrap(), v, "key {k}");
        }
        assert_eq!(store.stats().keys, handle.key_count);
        // A key of chunk 2 that the tail did not change is looked up in the table: corrupt.
        let untouched = (0..10_000).find(|k| {
            !tail.iter().any(|t| t.0 == *k) && {
                let h = StateStore::hash(state, &key(*k));
                (h as usize & (capacity - 1)) / CHUNK_SLOTS == 2
            }
        });
        let err = get(&store, state, untouched.unwrap()).unwrap_err();
        assert_eq!(err.class(), crate::ErrorClass::Corruption);
        let err = store.maintain(usize::MAX).unwrap_err();
        assert_eq!(err.class(), crate::ErrorClass::Corruption, "{err}");
        assert!(err.to_string().contains(&index_file_name(1)), "{err}");
    }

    /// A restore answers at once; folding in small steps keeps every answer; index snapshots
    /// wait for the fold; the key count is checked when it ends.
    #[test]
    fn write_behind_fsyncs_new_segments_so_checkpoints_need_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = StateStore::create(dir.path(), config()).unwrap();
        let state = store.register("s", None).unwrap();
        let value = [7u8; 1000];
        let mut k = 0;
        let mut roll = |store: &mut StateStore| {
            let first = address_segment(store.tail());
            while address_segment(store.tail()) == first {
                store.put_raw(state, Key::new(&key(k), 64), &value).unwrap();
                k += 1;
            }
        };
        // Without write-behind the checkpoint fsyncs the new segment itself.
        roll(&mut store);
        let pending = store.checkpoint(1).unwrap();
        assert_eq!(pending.task.new_files.len(), 2, "segments 1 and 2");
        pending.task.run().unwrap();
        // With it, the write-behind task did.
        roll(&mut store);
        let task = store.write_behind(1 << 30).expect("a new segment to fsync");
        assert!(task.ranges.is_empty() && task.presync.is_some());
        task.run().unwrap();
        let pending = store.checkpoint(2).unwrap();
        assert!(pending.task.new_files.is_empty(), "the new segment was fsynced early");
        pending.task.run().unwrap();
        // A new segment whose write-behind has not run yet is still the checkpoint's.
        roll(&mut store);
        let late = store.write_behind(1 << 30).unwrap();
        let pending = store.checkpoint(3).unwrap();
        assert_eq!(pending.task.new_files.len(), 1);
        late.run().unwrap();
        pending.task.run().unwrap();
        assert!(store.ledger.lock().unwrap().presynced.len() <= 1);
        assert!(store.checkpoint(4).is_ok_and(|p| p.task.new_files.is_empty()));
        assert!(store.ledger.lock().unwrap().presynced.is_empty(), "stale entries are dropped");
    }

    #[test]
    fn log_distance_counts_what_a_replay_reads_and_paces_snapshots_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = StateStore::create(dir.path(), config()).unwrap();
        let state = store.register("s", None).unwrap();
        let start = store.tail();
        assert_eq!(store.log_distance(None, start), 0);
        let value = [7u8; 1000];
        for k in 0..3000 {
            store.put_raw(state, Key::new(&key(k), 64), &value).unwrap();
        }
        let end = store.tail();
        assert!(address_segment(end) > address_segment(start), "the log rolled over");
        let full = u64::from(address_segment(end) - address_segment(start)) * u64::from(config().segment_bytes);
        let expected = full + u64::from(address_offset(end)) - u64::from(address_offset(start));
        assert_eq!(store.log_distance(None, end), expected);
        assert_eq!(store.log_distance(Some(end), end), 0);
        // A first snapshot with 3 MB to replay is written at the slowest pace; the pace grows
        // with the replay tail.
        store.checkpoint(1).unwrap().task.run().unwrap();
        let pending = store.checkpoint(2).unwrap();
        let pace = pending.task.index_write.as_ref().map(|w| w.pace).unwrap();
        assert_eq!(pace, BACKGROUND_WRITE_BYTES_PER_S);
        assert_eq!(snapshot_pace(100 << 20), 400 << 20);
        assert_eq!(snapshot_pace(300 << 20), MAX_BACKGROUND_WRITE_BYTES_PER_S);
        assert_eq!(snapshot_pace(u64::MAX), MAX_BACKGROUND_WRITE_BYTES_PER_S);
    }

    /// Past the replay bound a checkpoint names an index snapshot its own task writes: the
    /// one copying since an earlier checkpoint when a replay from its seal is within the
    /// bound, else one of its own seal. Either way it cannot be detached, and it restores.
    #[test]
    fn a_checkpoint_past_the_replay_bound_writes_an_index_snapshot_within_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, config, state, record) = store_with_a_replay_bound(dir.path());
        let mut next = 0;
        // Each step: records appended, then (snapshot named, records replayed, whether the
        // checkpoint is past the bound).
        let steps = [
            (150, 1, 0, true),  // no snapshot yet: one of its own seal
            (50, 1, 50, false), // one is due: copied from here on (for checkpoint 2)
            (60, 2, 60, true),  // 110 past snapshot 1: snapshot 2 (60 back) will do
            (50, 4, 0, true),   // 110 past snapshot 2, none copying: one of its own seal
            (50, 4, 50, false), // one is due (for checkpoint 5)
            (120, 6, 0, true),  // 170 past snapshot 4, and 120 past snapshot 5: its own
        ];
        let mut handles = Vec::new();
        for (i, (records, index, replayed, bounded)) in steps.into_iter().enumerate() {
            for _ in 0..records {
                put(&mut store, state, next, next);
                next += 1;
            }
            let id = i as u64 + 1;
            let mut pending = store.checkpoint(id).unwrap();
            // Every snapshot finished here is by a checkpoint past the bound: none detaches.
            assert!(pending.detach_index().is_none(), "checkpoint {id}");
            let handle = pending.handle.clone();
            assert_eq!(handle.index_snapshot.as_ref().map(|r| r.checkpoint_id), Some(index), "checkpoint {id}");
            assert_eq!(handle.replay_bytes(), replayed * record, "checkpoint {id}");
            // Its own snapshot is copied for the task between batches (here: at once).
            store.finish_copies();
            let durable = pending.task.run().unwrap();
            assert_eq!(durable.index_bytes > 0, bounded, "checkpoint {id}");
            handles.push(handle);
        }
        drop(store);
        each_restores_keys_up_to_its_count(dir.path(), [&handles[2], &handles[5]], &config, state);
    }

    /// A store whose replay bound is 100 records of 8-byte keys and values, with snapshots due
    /// every 40 records (or half the bound) only, and its config, state and record size.
    fn store_with_a_replay_bound(dir: &Path) -> (StateStore, StoreConfig, StateId, u64) {
        let record = u64::from(record::slot_bytes(8, 8));
        let config = StoreConfig {
            index_snapshot_every: 1000,
            index_snapshot_tail_bytes: 40 * record,
            max_replay_bytes: 100 * record,
            ..config()
        };
        let mut store = StateStore::create(dir, config.clone()).unwrap();
        let state = store.register("op/v", None).unwrap();
        (store, config, state, record)
    }

    /// Restores each of `handles` (of a store where key `k` holds `k`, written in key order)
    /// and checks that it holds exactly the keys below its key count.
    fn each_restores_keys_up_to_its_count<'a>(
        dir: &Path,
        handles: impl IntoIterator<Item = &'a CheckpointHandle>,
        config: &StoreConfig,
        state: StateId,
    ) {
        for handle in handles {
            let store = StateStore::restore(dir, handle, config.clone(), RestoreOptions::default()).unwrap();
            let upto = handle.key_count;
            for k in (0..upto).step_by(7).chain([upto - 1]) {
                assert_eq!(get(&store, state, k).unwrap(), Some(k), "key {k} of checkpoint {}", handle.checkpoint_id);
            }
            assert_eq!(get(&store, state, upto).unwrap(), None);
        }
    }

    /// While a snapshot is urgent, a paced background write ignores its pace: 2 MiB at 1 MiB/s
    /// would take two seconds.
    #[test]
    fn an_urgent_snapshot_makes_paced_writes_ignore_their_pace() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = vec![7u8; 2 << 20];
        let fence = crate::fence::Fence::new();
        let urgent = crate::priority::Urgent::begin();
        let started = Instant::now();
        let path = dir.path().join("paced");
        write_durably_fenced(&path, &[&bytes], dir.path(), Some(&fence), Some(1 << 20)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        drop(urgent);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    /// The index snapshot of a checkpoint past the replay bound is named after the checkpoint,
    /// whose id a later run attempt may reuse: once the attempt's fence is closed the task
    /// writes and renames nothing, and its store is not made suspect. The task waits for the
    /// store to copy the snapshot, except on the store's own thread, where it fails at once.
    #[test]
    fn a_closed_fence_stops_the_index_snapshot_a_checkpoint_writes() {
        let config = StoreConfig { max_replay_bytes: 0, ..config() };
        let dir = tempfile::tempdir().unwrap();
        let mut store = StateStore::create(dir.path(), config).unwrap();
        let state = store.register("op/v", None).unwrap();
        put(&mut store, state, 1, 1);
        let pending = store.checkpoint(1).unwrap();
        assert!(pending.handle.index_snapshot.is_some());
        store.finish_copies();
        let fence = crate::fence::Fence::new();
        fence.close();
        let err = pending.task.run_fenced(Some(&fence)).unwrap_err();
        assert!(err.to_string().contains("cancelled"), "{err}");
        assert!(!dir.path().join(index_file_name(1)).exists());
        // On the store's thread, a task whose snapshot is not copied yet fails instead of
        // waiting for ever; the store goes on.
        put(&mut store, state, 2, 2);
        let err = store.checkpoint(2).unwrap().task.run().unwrap_err();
        assert!(err.to_string().contains("finish_copies"), "{err}");
        put(&mut store, state, 3, 3);
        let pending = store.checkpoint(3).unwrap();
        // Waited for on another thread, it is handed over once copied.
        let task = std::thread::spawn(move || pending.task.run_fenced(Some(&crate::fence::Fence::new())));
        std::thread::sleep(Duration::from_millis(20));
        while store.maintain(1).unwrap() {}
        assert!(task.join().unwrap().unwrap().index_bytes > 0);
        assert!(dir.path().join(index_file_name(3)).exists());
        assert!(!dir.path().join(index_file_name(2)).exists());
    }

    /// A checkpoint past the replay bound while a detached index snapshot within the bound is
    /// still unwritten names that snapshot instead of copying one of its own (which, on a slow
    /// disk, would be a second file to write behind the first): its task writes it when the
    /// snapshot's own task has not started (that task then writes nothing), waits for it when
    /// it has, and fails when it was abandoned. A restore of each replays within the bound.
    #[test]
    fn a_checkpoint_past_the_replay_bound_names_a_detached_snapshot_still_unwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, config, state, record) = store_with_a_replay_bound(dir.path());
        let mut next = 0;
        let mut checkpoint = |store: &mut StateStore, id: u64, records: u64| {
            for _ in 0..records {
                put(store, state, next, next);
                next += 1;
            }
            store.checkpoint(id).unwrap()
        };
        let fence = crate::fence::Fence::new();
        // A snapshot of 50 records is copied from checkpoint 1 and detached at 2.
        checkpoint(&mut store, 1, 50).task.run().unwrap();
        let mut c2 = checkpoint(&mut store, 2, 10);
        let s1 = c2.detach_index().expect("snapshot 1 is detached");
        assert!(!c2.task.run().unwrap().past_replay_bound);
        // 110 records and no durable snapshot: past the bound, and snapshot 1 will do.
        let mut c3 = checkpoint(&mut store, 3, 50);
        assert!(c3.detach_index().is_none());
        assert_eq!(c3.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id), Some(1));
        assert_eq!(c3.handle.replay_bytes(), 60 * record);
        assert!(crate::priority::Urgent::active(), "a snapshot the bound needs hurries");
        // Its task writes snapshot 1 itself; the snapshot's own task then has nothing to do.
        let durable = c3.task.run().unwrap();
        assert!(durable.index_bytes > 0 && durable.past_replay_bound);
        assert!(dir.path().join(index_file_name(1)).exists());
        assert_eq!(s1.run(&fence).unwrap(), 0);
        let mut handles = vec![c3.handle];
        // Snapshot 4 is detached at 5, and its own task has started when checkpoint 6 names it.
        checkpoint(&mut store, 4, 20).task.run().unwrap();
        let mut c5 = checkpoint(&mut store, 5, 5);
        let s4 = c5.detach_index().expect("snapshot 4 is detached");
        c5.task.run().unwrap();
        let c6 = checkpoint(&mut store, 6, 30);
        assert_eq!(c6.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id), Some(4));
        assert_eq!(c6.handle.replay_bytes(), 35 * record);
        handles.push(c6.handle);
        let started = s4.write.take().expect("not started yet");
        let c6_task = std::thread::spawn(move || c6.task.run());
        std::thread::sleep(Duration::from_millis(30));
        assert!(!c6_task.is_finished(), "checkpoint 6 waits for snapshot 4");
        s4.write.write(started, &s4.dir, &s4.ledger, Some(&fence), Some(BACKGROUND_WRITE_BYTES_PER_S)).unwrap();
        let durable = c6_task.join().unwrap().unwrap();
        assert_eq!(durable.index_bytes, 0, "written by the snapshot's task");
        assert!(durable.past_replay_bound);
        // Snapshot 7, detached at 8, is named by checkpoint 9 and then abandoned: 9 fails, and
        // 10 writes a snapshot of its own.
        checkpoint(&mut store, 7, 20).task.run().unwrap();
        let mut c8 = checkpoint(&mut store, 8, 5);
        let s7 = c8.detach_index().expect("snapshot 7 is detached");
        c8.task.run().unwrap();
        let c9 = checkpoint(&mut store, 9, 60);
        assert_eq!(c9.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id), Some(7));
        drop(s7);
        let err = c9.task.run().unwrap_err();
        assert!(err.to_string().contains("not written"), "{err}");
        let c10 = checkpoint(&mut store, 10, 0);
        assert_eq!(c10.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id), Some(10));
        store.finish_copies();
        assert!(c10.task.run().unwrap().index_bytes > 0);
        handles.push(c10.handle);
        drop(store);
        assert!(handles.iter().all(|h| h.replay_bytes() <= config.max_replay_bytes));
        each_restores_keys_up_to_its_count(dir.path(), &handles, &config, state);
    }

    #[test]
    fn restored_store_folds_in_steps_and_snapshots_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, _, tail) = store_with_a_tail_in_chunk_2(dir.path());
        let state = state_id_of("op/v");
        let mut store = StateStore::restore(dir.path(), &handle, config(), RestoreOptions::default()).unwrap();
        assert!(store.index.has_delta());
        // Checkpoints during the fold reference the restored snapshot and start none.
        let c3 = store.checkpoint(3).unwrap();
        c3.task.run().unwrap();
        let c4 = store.checkpoint(4).unwrap();
        c4.task.run().unwrap();
        assert_eq!(c4.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id), Some(1));
        let mut steps = 0;
        while store.maintain(7).unwrap() {
            steps += 1;
            for &(k, v) in tail.iter().step_by(5) {
                assert_eq!(get(&store, state, k).unwrap(), v, "key {k}");
            }
        }
        assert!(steps >= 5, "{steps} steps");
        assert!(!store.index.has_delta() && !store.maintain(4096).unwrap());
        store.checkpoint(5).unwrap().task.run().unwrap();
        let c6 = store.checkpoint(6).unwrap();
        c6.task.run().unwrap();
        assert_eq!(c6.handle.index_snapshot.as_ref().map(|r| r.checkpoint_id), Some(5));
        drop(store);
        let store = StateStore::restore(dir.path(), &c6.handle, config(), RestoreOptions { verify_all: true }).unwrap();
        for &(k, v) in &tail {
            assert_eq!(get(&store, state, k).unwrap(), v, "key {k}");
        }
        assert_eq!(get(&store, state, 1).unwrap(), Some(1));

        // A checkpoint whose key count disagrees with its log is found when the fold ends.
        let wrong = CheckpointHandle { key_count: handle.key_count + 1, ..handle };
        let mut store = StateStore::restore(dir.path(), &wrong, config(), RestoreOptions::default()).unwrap();
        let err = store.maintain(usize::MAX).unwrap_err();
        assert_eq!(err.class(), crate::ErrorClass::Corruption, "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
    }
}
