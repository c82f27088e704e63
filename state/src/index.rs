//! The per-store index: `(state id, key) -> log address`, as an open-addressing hash table whose
//! memory layout *is* its snapshot format.
//!
//! A slot holds the 64-bit hash of `(state id, key)` and the address of the key's newest record;
//! the key itself lives only in the log, so a probe that matches the hash confirms by comparing
//! the record's key (the `eq` callback). Linear probing, power-of-two capacity, at most 3/4 full,
//! backward-shift deletion (no tombstones in the table itself).
//!
//! An index snapshot is the slot array written to a file with a header and one CRC per chunk of
//! [`CHUNK_SLOTS`] slots. Restoring maps that file read-only: the table is usable at once,
//! whatever its size, and a chunk is CRC-checked the first time a probe touches it, so
//! corruption is still detected before a single slot of that chunk is trusted. That is what
//! keeps restore time flat as state grows. A chunk is loaded into the table's own anonymous
//! memory (with huge pages where the kernel has them) before its first change, and read there
//! from then on; a caller about to change the table loads the chunk through the file first
//! ([`Index::prepare_write`]). The mapped file is never written, so no page of it is ever
//! copied on write (see [`Index::prepare_write`] for why that matters).
//!
//! # The delta of a restore
//! A restore also replays the log written after the snapshot. Replaying into the mapped table
//! would make every replayed key cost a probe at a random place in it: a chunk CRC check, a
//! page fault, and a key compare with a random old record of the log; a tail of
//! random keys touches the whole table. So the replay goes into the *delta*, a small table in
//! anonymous memory in front of the mapped one (the *base*), with the same slots, whose address
//! may carry a tombstone marker: the key is deleted, and the address is its Delete record's.
//! [`Index::replay`] probes the delta alone, comparing keys with
//! replayed records only, so a restore costs time in proportion to the replayed tail.
//!
//! While a delta exists, [`Index::find`] asks it first: a live entry answers, a tombstone means
//! absent, no entry means ask the base. Updates of keys in the delta stay there, a delete there
//! leaves a tombstone (the base may hold the key too); new keys go into the base, so the delta
//! never grows after the replay. The store folds the delta into the base a bounded number of
//! entries at a time ([`Index::next_fold_entry`], [`Index::fold_entry`]), between batches of
//! work; lookups give the same answers at every step. When it is empty, [`Index::finish_fold`]
//! drops it and checks the key count. Whatever needs a single table (a snapshot, listing all
//! entries) needs the fold finished first.
//!
//! # Snapshot file layout (`index-<checkpoint>.idx`)
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"WEIRIDX\0"` |
//! | 8 | 4 | format version ([`INDEX_FORMAT_VERSION`]) |
//! | 12 | 4 | zero |
//! | 16 | 8 | capacity in slots (a power of two) |
//! | 24 | 8 | occupied slots |
//! | 32 | 8 | log address up to which the snapshot reflects the log (the seal) |
//! | 40 | 4 | CRC-32 of the chunk CRC table |
//! | 44 | 4 | CRC-32 of bytes 0..44 |
//! | 4096 | 4 per chunk | CRC-32 of each chunk's slot bytes, padded with zeros to 4096 |
//! | after the table | 16 per slot | slots: hash (u64 LE), address (u64 LE, 0 = empty) |

use std::cell::Cell;
use std::fs::File;
use std::path::{Path, PathBuf};

use bytemuck::{Pod, Zeroable};
use memmap2::MmapOptions;

use crate::error::{Result, StateError};
use crate::segment::{PrivatePages, u32_at, u64_at};

#[cfg(not(target_endian = "little"))]
compile_error!("weir's index snapshot is mapped in place and assumes a little-endian machine");

/// Magic bytes of an index snapshot.
pub const INDEX_MAGIC: [u8; 8] = *b"WEIRIDX\0";
/// Version of the index snapshot format.
pub const INDEX_FORMAT_VERSION: u32 = 1;
/// Slots per CRC chunk (64 KiB of slots).
pub const CHUNK_SLOTS: usize = 4096;

/// Bytes of a chunk of slots.
pub const CHUNK_BYTES: usize = CHUNK_SLOTS * size_of::<Slot>();
const PAGE: usize = 4096;
/// Bytes of a snapshot file's header page, which its chunk CRC table follows.
pub(crate) const HEADER_PAGE: usize = PAGE;
const MIN_CAPACITY: usize = 1024;
const MIN_DELTA_CAPACITY: usize = 1024;

/// The smallest power of two, and at least `at_least`, with room for `entries` in a table at
/// most 3/4 full.
fn capacity_for(entries: usize, at_least: usize) -> usize {
    let mut capacity = at_least;
    while entries * 4 > capacity * 3 {
        capacity *= 2;
    }
    capacity
}

/// Inserts the occupied slots of `from` (distinct keys) into `into`, an empty table with room
/// for them: how a table moves into a larger (or, for the delta, a fitting) one.
fn insert_all(from: &[Slot], into: &mut [Slot]) {
    let mask = into.len() - 1;
    for slot in from.iter().filter(|s| s.addr != 0) {
        let mut i = slot.hash as usize & mask;
        while into[i].addr != 0 {
            i = (i + 1) & mask;
        }
        into[i] = *slot;
    }
}

/// Marks the address in a delta slot as a tombstone: the key is deleted, whatever the base table
/// says, and the rest of the address is that of its Delete record (which carries the key, so a
/// probe confirms a tombstone like any entry). Never set in the base table.
const TOMBSTONE: u64 = 1 << 63;

// A log address never carries the tombstone marker.
const _: () = assert!(crate::store::log_address(crate::store::MAX_SEGMENT_ID, u32::MAX) & TOMBSTONE == 0);

/// One slot of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct Slot {
    /// Hash of `(state id, key)`.
    pub hash: u64,
    /// Log address of the key's newest record; 0 means empty.
    pub addr: u64,
}

/// A base table restored from a snapshot file, until all of it is loaded into the table's own
/// (anonymous) memory: a chunk not loaded yet is read from a read-only mapping of the file and
/// CRC-checked the first time; a change loads the chunk first (see [`Index::prepare_write`]).
#[derive(Debug)]
struct Restored {
    path: PathBuf,
    /// The snapshot file, for [`Index::prepare_write`].
    file: File,
    slots_offset: usize,
    chunk_crcs: Vec<u32>,
    /// The file's slots, mapped read-only (never written, so never copied on write); `None`
    /// when the table's memory holds them already, unchecked: the very slots the file was
    /// written from (see [`crate::warm::take_snapshot`]).
    mapped: Option<memmap2::Mmap>,
    /// Chunks of `mapped` whose CRC was checked.
    verified: Vec<Cell<u64>>,
    /// Chunks copied into the table (checked first): read there from then on.
    loaded: Vec<u64>,
    /// Chunks not loaded yet; none left, the mapping is dropped.
    unloaded: usize,
}

impl Restored {
    fn is_loaded(&self, chunk: usize) -> bool {
        self.loaded[chunk / 64] & (1 << (chunk % 64)) != 0
    }

    fn is_verified(&self, chunk: usize) -> bool {
        self.verified[chunk / 64].get() & (1 << (chunk % 64)) != 0
    }

    /// Byte range of `chunk` in the slot array of a table of `capacity` slots.
    fn chunk_bytes(chunk: usize, capacity: usize) -> std::ops::Range<usize> {
        let start = chunk * CHUNK_BYTES;
        start..start + CHUNK_SLOTS.min(capacity) * size_of::<Slot>()
    }

    /// Checks the CRC of `chunk` in `slots` (the mapping, or the table's memory without one),
    /// once.
    fn check(&self, chunk: usize, capacity: usize, slots: &[u8]) -> Result<()> {
        if self.is_verified(chunk) {
            return Ok(());
        }
        let range = Restored::chunk_bytes(chunk, capacity);
        if crc32fast::hash(&slots[range.clone()]) != self.chunk_crcs[chunk] {
            return Err(StateError::corrupt(
                &self.path,
                (self.slots_offset + range.start) as u64,
                format!("index chunk {chunk} fails its CRC"),
            ));
        }
        let word = &self.verified[chunk / 64];
        word.set(word.get() | 1 << (chunk % 64));
        Ok(())
    }

    fn mark_loaded(&mut self, chunk: usize) {
        self.loaded[chunk / 64] |= 1 << (chunk % 64);
        self.unloaded -= 1;
    }
}

/// The index: the base table and, after a restore until folded, the delta in front of it.
#[derive(Debug)]
pub struct Index {
    mem: SlotMemory,
    capacity: usize,
    /// Occupied slots of the base table (all keys when there is no delta).
    len: usize,
    /// Set while a table restored from a snapshot is not all loaded: `mem` holds only the
    /// loaded chunks (the rest of it is whatever the memory held before).
    lazy: Option<Restored>,
    copy: Option<SnapshotCopy>,
    delta: Option<Box<Delta>>,
}

/// A snapshot of the table being taken copy-on-write: a chunk is copied into `buf` the first
/// time it is about to change (or when the copy is finished), so taking a snapshot costs the
/// caller no pass over the table.
#[derive(Debug)]
struct SnapshotCopy {
    buf: SnapshotBuf,
    copied: Vec<u64>,
    remaining: usize,
    /// The first chunk [`Index::copy_step`] has not looked at yet.
    cursor: usize,
    capacity: usize,
    len: usize,
}

/// The buffer a copy-on-write snapshot of the table is copied into ([`Index::begin_copy`]):
/// anonymous memory, reused from one snapshot to the next.
#[derive(Debug)]
pub struct SnapshotBuf(PrivatePages);

impl SnapshotBuf {
    /// A buffer of `len` bytes, from the warm pool ([`crate::warm`]) if it holds one; its
    /// content is unspecified until copied into.
    fn new(len: usize) -> Result<SnapshotBuf> {
        Ok(SnapshotBuf(PrivatePages::scratch_warm(len, "index snapshot buffer")?))
    }

    /// The buffer's memory (for the warm pool).
    pub(crate) fn into_pages(self) -> PrivatePages {
        self.0
    }
}

impl std::ops::Deref for SnapshotBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// A slot [`Index::find`] matched: in the base table or in the delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRef {
    /// A slot of the base table.
    Base(usize),
    /// A slot of the delta.
    Delta(usize),
}

/// What [`Index::find`] found. Valid until the index next changes.
#[derive(Debug)]
#[must_use]
pub enum Found {
    /// The key's entry: its slot and the address of its newest record.
    Live {
        /// Where the entry is, for [`Index::set_addr`] and [`Index::remove`].
        slot: SlotRef,
        /// The address of the key's newest record.
        addr: u64,
    },
    /// The key has no entry; [`Index::insert`] adds one.
    Absent(Vacancy),
}

/// Where a key that [`Index::find`] did not find goes, consumed by [`Index::insert`]. It carries
/// the key's tombstone in the delta, if any: the new entry must replace it, since an entry put
/// anywhere else would be hidden by it.
#[derive(Debug)]
pub struct Vacancy {
    hash: u64,
    tombstone: Option<usize>,
}

/// A delta entry that [`Index::fold_entry`] moves into the base table next, from
/// [`Index::next_fold_entry`].
#[derive(Debug)]
pub struct FoldEntry {
    slot: usize,
    hash: u64,
    addr: u64,
}

impl FoldEntry {
    /// The entry's hash.
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// The address of the entry's record (the Delete record for a tombstone); the key to look
    /// for in the base table is that record's key.
    pub fn addr(&self) -> u64 {
        self.addr & !TOMBSTONE
    }
}

/// A delta entry [`Index::peek_fold_entries`] saw ahead of the fold: what a caller prefetches
/// for, before [`Index::next_fold_entry`] hands the entry out to fold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FoldAhead {
    hash: u64,
    addr: u64,
}

impl FoldAhead {
    /// The entry's hash.
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// The address of the entry's record, as [`FoldEntry::addr`].
    pub fn addr(&self) -> u64 {
        self.addr & !TOMBSTONE
    }
}

/// How many records ahead of the one it replays [`Index::replay`] prefetches a slot.
const REPLAY_PREFETCH: usize = 16;

/// A replayed record: the hash of its key and its address, with whether it is a Delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed(Slot);

impl Replayed {
    /// A Put of the key of `hash` whose record is at `addr`.
    pub fn put(hash: u64, addr: u64) -> Replayed {
        debug_assert!(addr != 0 && addr & TOMBSTONE == 0);
        Replayed(Slot { hash, addr })
    }

    /// A Delete of the key of `hash` whose Delete record is at `delete_record`.
    pub fn delete(hash: u64, delete_record: u64) -> Replayed {
        debug_assert!(delete_record != 0 && delete_record & TOMBSTONE == 0);
        Replayed(Slot { hash, addr: delete_record | TOMBSTONE })
    }
}

/// Progress of folding the delta into the base table ([`Index::finish_fold`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoldStatus {
    /// Entries remain in the delta.
    Pending,
    /// There is no delta (any more): the index is a single table.
    Done,
    /// The delta is folded, but the base table does not hold the number of keys
    /// [`Index::end_replay`] was given: the snapshot and the replayed log do not fit together.
    CountMismatch {
        /// Keys in the base table.
        counted: usize,
        /// Keys there should be.
        expected: usize,
    },
}

/// The memory of a table of slots: anonymous (zeroed, with huge pages where the kernel has
/// them: a probe is a random access into the table, and with 4 KiB pages most probes of a
/// large table also miss the TLB) or a private mapping of an index snapshot file. Dropping it
/// releases its pages a step at a time before the unmap, as a segment's mapping does: one
/// `munmap` of a large table holds the process's mmap lock for milliseconds, and every other
/// thread's `mmap` or `munmap` waits for it.
#[derive(Debug)]
struct SlotMemory(PrivatePages);

impl SlotMemory {
    /// A zeroed table, of memory from the warm pool ([`crate::warm`]) if it holds enough.
    fn zeroed(slots: usize) -> Result<SlotMemory> {
        let mem = PrivatePages::zeroed_warm(slots * size_of::<Slot>(), "index")?;
        mem.advise_huge_pages();
        Ok(SlotMemory(mem))
    }

    fn bytes(&self) -> &[u8] {
        &self.0[..]
    }
}

impl std::ops::Deref for SlotMemory {
    type Target = [Slot];

    fn deref(&self) -> &[Slot] {
        bytemuck::cast_slice(&self.0[..])
    }
}

impl std::ops::DerefMut for SlotMemory {
    fn deref_mut(&mut self) -> &mut [Slot] {
        bytemuck::cast_slice_mut(&mut self.0[..])
    }
}

/// The delta of a restore: a small table, in the slot format, of what the replay of the log
/// tail changed, plus a tombstone for every replayed delete. A lookup asks it first, so the
/// replay never reads the base table (a probe there would CRC-check its chunk, fault its pages
/// and compare keys with records anywhere in the log).
struct Delta {
    slots: SlotMemory,
    /// Occupied slots, live or tombstone.
    used: usize,
    /// Live keys of the whole index, delta and base together.
    keys: usize,
    /// Where the fold looks for its next entry.
    cursor: usize,
}

impl std::fmt::Debug for Delta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delta")
            .field("capacity", &self.slots.len())
            .field("used", &self.used)
            .field("keys", &self.keys)
            .field("cursor", &self.cursor)
            .finish()
    }
}

impl Delta {
    fn new() -> Result<Delta> {
        Ok(Delta { slots: SlotMemory::zeroed(MIN_DELTA_CAPACITY)?, used: 0, keys: 0, cursor: 0 })
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// `Ok(slot)` of the entry (live or tombstone) of `hash` for which `eq` holds, else
    /// `Err(slot)` of the empty slot that ends its probe run.
    fn probe(&self, hash: u64, eq: &mut impl FnMut(u64) -> Result<bool>) -> Result<std::result::Result<usize, usize>> {
        let mask = self.mask();
        let mut i = hash as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot.addr == 0 {
                return Ok(Err(i));
            }
            if slot.hash == hash && eq(slot.addr & !TOMBSTONE)? {
                return Ok(Ok(i));
            }
            i = (i + 1) & mask;
        }
    }

    fn lookup(&self, hash: u64, eq: &mut impl FnMut(u64) -> Result<bool>) -> Result<Option<Found>> {
        Ok(match self.probe(hash, eq)? {
            Ok(i) if self.slots[i].addr & TOMBSTONE != 0 => Some(Found::Absent(Vacancy { hash, tombstone: Some(i) })),
            Ok(i) => Some(Found::Live { slot: SlotRef::Delta(i), addr: self.slots[i].addr }),
            Err(_) => None,
        })
    }

    /// Sets the entry of `slot.hash` for which `eq` holds to `slot`, or adds it.
    fn upsert(&mut self, slot: Slot, eq: &mut impl FnMut(u64) -> Result<bool>) -> Result<()> {
        if (self.used + 1) * 4 > self.slots.len() * 3 {
            self.grow()?;
        }
        match self.probe(slot.hash, eq)? {
            Ok(i) => self.slots[i].addr = slot.addr,
            Err(i) => {
                self.slots[i] = slot;
                self.used += 1;
            }
        }
        Ok(())
    }

    /// Grows the table, if needed, so that `more` entries fit without growing again.
    fn reserve(&mut self, more: usize) -> Result<()> {
        let capacity = capacity_for(self.used + more, self.slots.len());
        if capacity > self.slots.len() {
            self.resize(capacity)?;
        }
        Ok(())
    }

    /// Shrinks the table to the size its entries need: [`Delta::reserve`] made room for every
    /// replayed record, and many may have updated the same keys.
    fn fit(&mut self) -> Result<()> {
        let capacity = capacity_for(self.used, MIN_DELTA_CAPACITY);
        if capacity < self.slots.len() {
            self.resize(capacity)?;
        }
        Ok(())
    }

    /// Starts loading the slot a probe for `hash` looks at first (see [`Index::replay`]).
    fn prefetch(&self, hash: u64) {
        prefetch_index::prefetch_index(&self.slots[..], hash as usize & self.mask());
    }

    fn grow(&mut self) -> Result<()> {
        self.resize(self.slots.len() * 2)
    }

    /// Moves the entries into a table of `capacity` slots (a power of two that holds them).
    fn resize(&mut self, capacity: usize) -> Result<()> {
        debug_assert!(capacity.is_power_of_two() && self.used * 4 <= capacity * 3);
        let old = std::mem::replace(&mut self.slots, SlotMemory::zeroed(capacity)?);
        insert_all(&old, &mut self.slots);
        self.cursor = 0;
        // Warm memory goes to the pool, for a later table or snapshot buffer (the new table
        // here was allocated before it), and is freed from there once it expires.
        drop(crate::warm::give(old.0));
        Ok(())
    }

    /// Removes the entry in slot `i`, shifting later entries of its probe run back.
    fn remove_at(&mut self, i: usize) {
        let mask = self.mask();
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let slot = self.slots[j];
            if slot.addr == 0 {
                break;
            }
            let home = slot.hash as usize & mask;
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.slots[hole] = slot;
                hole = j;
            }
        }
        self.slots[hole] = Slot::zeroed();
        self.used -= 1;
    }
}

impl Index {
    /// An empty table.
    pub fn new() -> Result<Index> {
        Index::with_capacity(MIN_CAPACITY)
    }

    fn with_capacity(capacity: usize) -> Result<Index> {
        debug_assert!(capacity.is_power_of_two());
        let mem = SlotMemory::zeroed(capacity)?;
        Ok(Index { mem, capacity, len: 0, lazy: None, copy: None, delta: None })
    }

    /// Number of keys in the index.
    pub fn len(&self) -> usize {
        self.delta.as_ref().map_or(self.len, |d| d.keys)
    }

    /// Whether the index holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the base table's slot array.
    pub fn table_bytes(&self) -> usize {
        self.capacity * size_of::<Slot>()
    }

    /// Whether a delta (from a restore) is in front of the base table, not yet folded into it.
    pub fn has_delta(&self) -> bool {
        self.delta.is_some()
    }

    /// Entries (live or tombstone) in the delta; 0 without one.
    pub fn delta_entries(&self) -> usize {
        self.delta.as_ref().map_or(0, |d| d.used)
    }

    /// The base table's slots, all of them loaded (no restored chunk left in the file).
    fn slots(&self) -> &[Slot] {
        debug_assert!(self.lazy.is_none());
        &self.mem
    }

    /// Slot `i` of the base table: in the table's memory, or for a restored chunk not loaded
    /// yet in the file's mapping, after checking that chunk's CRC (once).
    #[inline]
    fn base_slot(&self, i: usize) -> Result<Slot> {
        match &self.lazy {
            Some(lazy) if !lazy.is_loaded(i / CHUNK_SLOTS) => {
                let slots = lazy.mapped.as_deref().unwrap_or(self.mem.bytes());
                lazy.check(i / CHUNK_SLOTS, self.capacity, slots)?;
                Ok(bytemuck::cast_slice::<u8, Slot>(slots)[i])
            }
            _ => Ok(self.mem[i]),
        }
    }

    /// Loads the chunk of a restored table holding slot `i` from the file's mapping into the
    /// table's memory (checking it first, if no lookup has), before a change there.
    #[inline]
    fn load(&mut self, i: usize) -> Result<()> {
        let chunk = i / CHUNK_SLOTS;
        match &self.lazy {
            Some(lazy) if !lazy.is_loaded(chunk) => self.load_chunk(chunk),
            _ => Ok(()),
        }
    }

    #[cold]
    fn load_chunk(&mut self, chunk: usize) -> Result<()> {
        let Some(lazy) = &mut self.lazy else { return Ok(()) };
        match &lazy.mapped {
            Some(mapped) => {
                lazy.check(chunk, self.capacity, mapped)?;
                let range = Restored::chunk_bytes(chunk, self.capacity);
                self.mem.0[range.clone()].copy_from_slice(&mapped[range]);
            }
            None => lazy.check(chunk, self.capacity, self.mem.bytes())?,
        }
        self.end_chunk_load(chunk);
        Ok(())
    }

    /// Counts `chunk` (checked and copied) as loaded; drops the mapping after the last one.
    fn end_chunk_load(&mut self, chunk: usize) {
        if let Some(lazy) = &mut self.lazy {
            lazy.mark_loaded(chunk);
            if lazy.unloaded == 0 {
                self.lazy = None;
            }
        }
    }

    /// Readies the base table for a change near the home slot of `hash`, if it is restored
    /// from a snapshot and that chunk is not loaded yet: the chunk is read from the file into
    /// the table's memory (memory of the warm pool after a restart, see [`crate::warm`]) and
    /// its CRC checked. A change would load it anyway (from the mapping); reading it through
    /// the file first saves mapping its pages, and the fold's probes that follow read memory.
    ///
    /// Why a restored table is not simply a copy-on-write mapping of the file, changed in
    /// place: a lookup maps its pages read-only first, and the change that follows copies
    /// them on a write-protect fault, which must flush the old mapping from every core the
    /// process runs on: an inter-processor interrupt, which a virtual machine pays for with an
    /// exit. A profile of the first second after a restore under load found the shards
    /// spending about 80% of their time there; writing each chunk into the mapping first
    /// (as session 12 did) still cost a page copy per fault (the kernel's, before the read's).
    pub fn prepare_write(&mut self, hash: u64) -> Result<()> {
        let chunk = (hash as usize & (self.capacity - 1)) / CHUNK_SLOTS;
        let Some(lazy) = &self.lazy else { return Ok(()) };
        if lazy.is_loaded(chunk) {
            return Ok(());
        }
        if lazy.mapped.is_none() {
            return self.load_chunk(chunk);
        }
        let range = Restored::chunk_bytes(chunk, self.capacity);
        let at = (lazy.slots_offset + range.start) as u64;
        let bytes = &mut self.mem.0[range];
        crate::segment::read_exact_at(&lazy.file, bytes, at, &lazy.path)?;
        if crc32fast::hash(bytes) != lazy.chunk_crcs[chunk] {
            return Err(StateError::corrupt(&lazy.path, at, format!("index chunk {chunk} fails its CRC")));
        }
        self.end_chunk_load(chunk);
        Ok(())
    }

    /// Loads every chunk of a restored table not loaded yet (checking each); afterwards the
    /// table is plain memory.
    pub fn verify_all(&mut self) -> Result<()> {
        let chunks = self.lazy.as_ref().map_or(0, |l| l.chunk_crcs.len());
        for chunk in 0..chunks {
            if self.lazy.as_ref().is_some_and(|l| !l.is_loaded(chunk)) {
                self.load_chunk(chunk)?;
            }
        }
        Ok(())
    }

    /// Finds the entry with `hash` for which `eq(addr)` holds: in the delta first (where a
    /// tombstone means absent), then in the base table.
    #[inline]
    pub fn find(&self, hash: u64, mut eq: impl FnMut(u64) -> Result<bool>) -> Result<Found> {
        if let Some(delta) = &self.delta
            && let Some(found) = delta.lookup(hash, &mut eq)?
        {
            return Ok(found);
        }
        Ok(match self.probe_base(hash, eq)? {
            Some((i, slot)) => Found::Live { slot: SlotRef::Base(i), addr: slot.addr },
            None => Found::Absent(Vacancy { hash, tombstone: None }),
        })
    }

    /// The slot of the base table holding the entry with `hash` for which `eq(addr)` holds,
    /// ignoring the delta. Used to fold a [`FoldEntry`].
    pub fn find_in_base(&self, hash: u64, eq: impl FnMut(u64) -> Result<bool>) -> Result<Option<usize>> {
        Ok(self.probe_base(hash, eq)?.map(|(i, _)| i))
    }

    /// [`Index::find_in_base`], with the slot's content.
    #[inline]
    fn probe_base(&self, hash: u64, mut eq: impl FnMut(u64) -> Result<bool>) -> Result<Option<(usize, Slot)>> {
        let mask = self.capacity - 1;
        let mut i = hash as usize & mask;
        loop {
            let slot = self.base_slot(i)?;
            if slot.addr == 0 {
                return Ok(None);
            }
            if slot.hash == hash && eq(slot.addr)? {
                return Ok(Some((i, slot)));
            }
            i = (i + 1) & mask;
        }
    }

    /// Replaces the address of the live entry in `slot` (from [`Index::find`]).
    #[inline]
    pub fn set_addr(&mut self, slot: SlotRef, addr: u64) -> Result<()> {
        debug_assert!(addr != 0 && addr & TOMBSTONE == 0);
        match slot {
            SlotRef::Base(i) => self.set_base_addr(i, addr)?,
            SlotRef::Delta(i) => {
                let delta = self.delta.as_mut().expect("a delta slot of an index without a delta");
                debug_assert!(delta.slots[i].addr != 0 && delta.slots[i].addr & TOMBSTONE == 0);
                delta.slots[i].addr = addr;
            }
        }
        Ok(())
    }

    #[inline]
    fn set_base_addr(&mut self, i: usize, addr: u64) -> Result<()> {
        self.before_write(i)?;
        debug_assert!(self.mem[i].addr != 0);
        self.mem[i].addr = addr;
        Ok(())
    }

    /// Adds an entry for the key that [`Index::find`] reported absent.
    #[inline]
    pub fn insert(&mut self, vacancy: Vacancy, addr: u64) -> Result<()> {
        debug_assert!(addr != 0 && addr & TOMBSTONE == 0);
        if self.delta.is_some() {
            return self.insert_with_delta(vacancy, addr);
        }
        debug_assert!(vacancy.tombstone.is_none());
        self.insert_new(vacancy.hash, addr)
    }

    /// A new key goes into the base table, so that the delta never grows after the replay
    /// (and the fold always ends); only a tombstone of the key is revived in place.
    #[cold]
    fn insert_with_delta(&mut self, vacancy: Vacancy, addr: u64) -> Result<()> {
        match vacancy.tombstone {
            Some(i) => {
                let delta = self.delta.as_mut().expect("checked by the caller");
                debug_assert!(delta.slots[i].hash == vacancy.hash && delta.slots[i].addr & TOMBSTONE != 0);
                delta.slots[i].addr = addr;
            }
            None => self.insert_new(vacancy.hash, addr)?,
        }
        if let Some(delta) = &mut self.delta {
            delta.keys += 1;
        }
        Ok(())
    }

    /// Inserts an entry whose key is known to be absent from the base table into it.
    fn insert_new(&mut self, hash: u64, addr: u64) -> Result<()> {
        debug_assert!(addr != 0);
        if (self.len + 1) * 4 > self.capacity * 3 {
            self.grow()?;
        }
        let mask = self.capacity - 1;
        let mut i = hash as usize & mask;
        loop {
            if self.base_slot(i)?.addr == 0 {
                self.before_write(i)?;
                self.mem[i] = Slot { hash, addr };
                self.len += 1;
                return Ok(());
            }
            i = (i + 1) & mask;
        }
    }

    /// Removes the live entry in `slot` (from [`Index::find`]) of a key whose Delete record is
    /// at `delete_record`. An entry of the delta becomes a tombstone pointing at that record
    /// (the base table may hold the key too); one of the base table is removed from it.
    pub fn remove(&mut self, slot: SlotRef, delete_record: u64) -> Result<()> {
        debug_assert!(delete_record != 0 && delete_record & TOMBSTONE == 0);
        match slot {
            SlotRef::Base(i) => self.remove_at(i)?,
            SlotRef::Delta(i) => {
                let delta = self.delta.as_mut().expect("a delta slot of an index without a delta");
                debug_assert!(delta.slots[i].addr != 0 && delta.slots[i].addr & TOMBSTONE == 0);
                delta.slots[i].addr = delete_record | TOMBSTONE;
            }
        }
        if let Some(delta) = &mut self.delta {
            delta.keys -= 1;
        }
        Ok(())
    }

    /// Removes the entry in slot `i` of the base table, shifting later entries of its probe run
    /// back.
    fn remove_at(&mut self, i: usize) -> Result<()> {
        let mask = self.capacity - 1;
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let slot = self.base_slot(j)?;
            if slot.addr == 0 {
                break;
            }
            let home = slot.hash as usize & mask;
            // Move `slot` into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.before_write(hole)?;
                self.mem[hole] = slot;
                hole = j;
            }
        }
        self.before_write(hole)?;
        self.mem[hole] = Slot::zeroed();
        self.len -= 1;
        Ok(())
    }

    fn grow(&mut self) -> Result<()> {
        self.grow_to(self.capacity * 2)
    }

    /// Moves the table into one of `capacity` slots (a power of two, larger than now).
    fn grow_to(&mut self, capacity: usize) -> Result<()> {
        debug_assert!(capacity.is_power_of_two() && capacity > self.capacity);
        self.verify_all()?;
        // A snapshot being copied reflects the table before the move: copy what is left now.
        self.copy_remaining();
        let copy = self.copy.take();
        let mut bigger = Index::with_capacity(capacity)?;
        insert_all(self.slots(), &mut bigger.mem);
        bigger.len = self.len;
        bigger.copy = copy;
        bigger.delta = self.delta.take();
        *self = bigger;
        Ok(())
    }

    /// Replays `records`, in log order, into the delta (started by the first call): a Put
    /// updates or adds its key's entry there, a Delete makes it (or adds it as) a tombstone.
    /// `same_key(record, other)` tells whether the records at the two addresses hold the same
    /// key; it is only called with addresses of replayed records, never with the base table's,
    /// so a replay costs time in proportion to the replayed log alone.
    ///
    /// The delta is sized for all of `records` first. While a record is replayed, the slot
    /// the one `REPLAY_PREFETCH` (16) records later probes first is prefetched: the cache misses
    /// of the scattered slots then overlap instead of coming one after the other. (Loading the
    /// slots of a batch ahead of its inserts did the same less well: a load that misses holds
    /// up the instructions after it, a prefetch does not; a 1 GiB replay took 234 ms against
    /// 311 ms.)
    pub fn replay(&mut self, records: &[Replayed], mut same_key: impl FnMut(u64, u64) -> Result<bool>) -> Result<()> {
        let delta = match &mut self.delta {
            Some(delta) => delta,
            None => self.delta.insert(Box::new(Delta::new()?)),
        };
        delta.reserve(records.len())?;
        for (i, r) in records.iter().enumerate() {
            if let Some(ahead) = records.get(i + REPLAY_PREFETCH) {
                delta.prefetch(ahead.0.hash);
            }
            let addr = r.0.addr & !TOMBSTONE;
            delta.upsert(r.0, &mut |other| same_key(addr, other))?;
        }
        Ok(())
    }

    /// Makes room in the delta (started here) for about `records` replayed records, so that
    /// [`Index::replay`] need not grow it piece by piece; [`Index::end_replay`] shrinks it to
    /// what the replay left.
    pub fn reserve_replay(&mut self, records: usize) -> Result<()> {
        match &mut self.delta {
            Some(delta) => delta.reserve(records),
            None => self.delta.insert(Box::new(Delta::new()?)).reserve(records),
        }
    }

    /// Ends a replay: the index now holds `keys` keys (as the checkpoint recorded them; counting
    /// them here would need the base table). The count is checked when the fold ends
    /// ([`FoldStatus::CountMismatch`]). Call it also when nothing was replayed.
    pub fn end_replay(&mut self, keys: usize) -> Result<()> {
        match &mut self.delta {
            Some(delta) => {
                delta.fit()?;
                delta.keys = keys;
            }
            None => self.delta.insert(Box::new(Delta::new()?)).keys = keys,
        }
        Ok(())
    }

    /// The next delta entry to fold, if any: look its key up with [`Index::find_in_base`], then
    /// pass both to [`Index::fold_entry`], with no other change of the index in between.
    ///
    /// The fold goes through the delta in slot order, that is by the low bits of the hashes.
    /// Inserted in that order into a base table with fewer slots than the delta, the entries
    /// would wrap around it and pile up in ever longer probe runs (728,000 entries took 2.3 s
    /// to fold that way), so the base table first grows to the delta's size, and to hold every
    /// delta entry.
    pub fn next_fold_entry(&mut self) -> Result<Option<FoldEntry>> {
        let Some(delta) = &self.delta else { return Ok(None) };
        if delta.used == 0 {
            return Ok(None);
        }
        if self.capacity < delta.slots.len() {
            self.grow_to(capacity_for(self.len + delta.used, delta.slots.len()))?;
        }
        let Some(delta) = &mut self.delta else { return Ok(None) };
        let mask = delta.mask();
        // Ends: `used > 0`. A removal shifts later entries back into the cursor's slot, so it
        // looks there again rather than moving on.
        while delta.slots[delta.cursor].addr == 0 {
            delta.cursor = (delta.cursor + 1) & mask;
        }
        let slot = delta.slots[delta.cursor];
        Ok(Some(FoldEntry { slot: delta.cursor, hash: slot.hash, addr: slot.addr }))
    }

    /// Fills `ahead` with the delta entries the fold goes through next, from its cursor in slot
    /// order, and returns how many it found (fewer than `ahead.len()` only when the delta holds
    /// fewer). Changes nothing: for a caller to prefetch what folding them reads.
    ///
    /// Only a forecast. A fold's removal shifts later entries of its probe run back (the
    /// delta's backward-shift deletion), so within a cluster of occupied slots the fold may
    /// take the entries in another order, and an entry of the cluster the window ends in may
    /// come up instead of one peeked; every other entry peeked is folded within `ahead.len()`
    /// steps, unless the index changes in between. (The base table growing in the first
    /// [`Index::next_fold_entry`] also moves the home slots.)
    pub fn peek_fold_entries(&self, ahead: &mut [FoldAhead]) -> usize {
        let Some(delta) = &self.delta else { return 0 };
        let (mask, want) = (delta.mask(), ahead.len().min(delta.used));
        let (mut found, mut i) = (0, delta.cursor);
        // Ends within one lap of the table: `want <= used`.
        while found < want {
            let slot = delta.slots[i];
            if slot.addr != 0 {
                ahead[found] = FoldAhead { hash: slot.hash, addr: slot.addr };
                found += 1;
            }
            i = (i + 1) & mask;
        }
        found
    }

    /// Starts loading the base table's home slot of `hash` into the cache (a hint).
    pub fn prefetch_base_home(&self, hash: u64) {
        prefetch_index::prefetch_index(&self.mem[..], hash as usize & (self.capacity - 1));
    }

    /// Calls `f` with the address of every entry with `hash` among the first `max_slots` slots
    /// of the probe run of `hash` in the base table: the records a lookup of `hash` would
    /// compare keys with, for a caller to prefetch. Reads only chunks loaded into the table's
    /// memory (checked), never the file's mapping, so it neither checks a CRC nor fails; it
    /// stops at a chunk not loaded.
    pub fn base_candidates(&self, hash: u64, max_slots: usize, mut f: impl FnMut(u64)) {
        let mask = self.capacity - 1;
        let mut i = hash as usize & mask;
        for _ in 0..max_slots {
            if self.lazy.as_ref().is_some_and(|lazy| !lazy.is_loaded(i / CHUNK_SLOTS)) {
                return;
            }
            let slot = self.mem[i];
            if slot.addr == 0 {
                return;
            }
            if slot.hash == hash {
                f(slot.addr);
            }
            i = (i + 1) & mask;
        }
    }

    /// Moves `entry` from the delta into the base table, where [`Index::find_in_base`] found its
    /// key in slot `in_base` (or did not): a live entry sets or adds the key there, a tombstone
    /// removes it. Lookups give the same answers before and after.
    pub fn fold_entry(&mut self, entry: FoldEntry, in_base: Option<usize>) -> Result<()> {
        debug_assert!(
            self.delta.as_ref().is_some_and(|d| d.slots[entry.slot] == Slot { hash: entry.hash, addr: entry.addr })
        );
        match (entry.addr & TOMBSTONE == 0, in_base) {
            (true, Some(i)) => self.set_base_addr(i, entry.addr)?,
            (true, None) => self.insert_new(entry.hash, entry.addr)?,
            (false, Some(i)) => self.remove_at(i)?,
            (false, None) => {}
        }
        if let Some(delta) = &mut self.delta {
            delta.remove_at(entry.slot);
        }
        Ok(())
    }

    /// Ends the delta once it is empty, checking that the base table then holds the number of
    /// keys the replay ended with (the index is a single table afterwards, even on a mismatch).
    pub fn finish_fold(&mut self) -> FoldStatus {
        match &self.delta {
            None => FoldStatus::Done,
            Some(delta) if delta.used > 0 => FoldStatus::Pending,
            Some(delta) => {
                let expected = delta.keys;
                self.delta = None;
                if self.len == expected {
                    FoldStatus::Done
                } else {
                    FoldStatus::CountMismatch { counted: self.len, expected }
                }
            }
        }
    }

    fn single_table(&self, what: &str) -> Result<()> {
        match &self.delta {
            Some(_) => Err(StateError::Misuse(format!("cannot {what} before the index delta is folded"))),
            None => Ok(()),
        }
    }

    /// All occupied slots, after checking every chunk. The delta must be folded first.
    pub fn entries(&mut self) -> Result<impl Iterator<Item = Slot> + '_> {
        self.single_table("list index entries")?;
        self.verify_all()?;
        Ok(self.slots().iter().copied().filter(|s| s.addr != 0))
    }

    /// Takes the index's anonymous memory (its table, its delta, a snapshot buffer) for the warm pool, leaving an empty index: for a store being
    /// dropped ([`crate::StateStore::retire`]).
    pub(crate) fn take_warm_memory(&mut self) -> Vec<PrivatePages> {
        let mut taken = Vec::new();
        taken.extend(self.delta.take().map(|d| d.slots.0));
        taken.extend(self.copy.take().map(|c| c.buf.0));
        if let Ok(empty) = Index::new() {
            taken.push(std::mem::replace(self, empty).mem.0);
        }
        taken
    }

    /// Serialises the table as a snapshot reflecting the log up to `seal` (header, chunk CRC
    /// table and slots in one buffer). The delta must be folded first.
    pub fn snapshot(&mut self, seal: u64) -> Result<Vec<u8>> {
        let mut slots = Vec::new();
        let (capacity, len) = self.copy_slots(&mut slots)?;
        let mut out = snapshot_header(capacity, len, seal, &slots);
        out.extend_from_slice(&slots);
        Ok(out)
    }

    /// Starts a copy-on-write snapshot of the table into `buf` (reused across snapshots). From
    /// now on a chunk is copied just before its first change; [`Index::finish_copy`] copies the
    /// rest. Replaces (and drops) a copy still in progress. The delta must be folded first.
    pub fn begin_copy(&mut self, buf: Option<SnapshotBuf>) -> Result<()> {
        self.single_table("snapshot the index")?;
        self.verify_all()?;
        let bytes = self.capacity * size_of::<Slot>();
        // Every chunk is copied over before the buffer is read (`finish_copy` copies what is
        // left), so a reused buffer of the right size keeps its stale bytes: zeroing the size
        // of the table here would stall the shard for milliseconds at each snapshot. A new
        // one comes from the warm pool (as stale) or is mapped zeroed, left to the faults.
        let buf = match buf {
            Some(buf) if buf.len() == bytes => buf,
            _ => SnapshotBuf::new(bytes)?,
        };
        let chunks = self.capacity.div_ceil(CHUNK_SLOTS);
        self.copy = Some(SnapshotCopy {
            buf,
            copied: vec![0; chunks.div_ceil(64)],
            remaining: chunks,
            cursor: 0,
            capacity: self.capacity,
            len: self.len,
        });
        Ok(())
    }

    /// Whether a copy-on-write snapshot is in progress.
    pub fn copy_in_progress(&self) -> bool {
        self.copy.is_some()
    }

    /// Copies what the snapshot in progress has not copied yet and returns it: the slot bytes,
    /// capacity and length as of [`Index::begin_copy`].
    pub fn finish_copy(&mut self) -> Option<(SnapshotBuf, usize, usize)> {
        self.copy_remaining();
        self.copy.take().map(|c| (c.buf, c.capacity, c.len))
    }

    /// Readies the base table for a change of `slot`: loads its chunk if the table is restored
    /// and the chunk is not loaded yet; copies it into a snapshot in progress if not copied yet.
    #[inline]
    fn before_write(&mut self, slot: usize) -> Result<()> {
        self.load(slot)?;
        if let Some(copy) = &self.copy
            && copy.remaining > 0
        {
            self.copy_chunk(slot / CHUNK_SLOTS);
        }
        Ok(())
    }

    #[cold]
    fn copy_chunk(&mut self, chunk: usize) {
        let Some(copy) = self.copy.as_mut() else { return };
        let (word, bit) = (chunk / 64, 1u64 << (chunk % 64));
        if copy.copied[word] & bit != 0 {
            return;
        }
        let start = chunk * CHUNK_BYTES;
        let end = (start + CHUNK_BYTES).min(copy.buf.len());
        copy.buf.0[start..end].copy_from_slice(&self.mem.bytes()[start..end]);
        copy.copied[word] |= bit;
        copy.remaining -= 1;
    }

    /// Copies up to `chunks` chunks the snapshot in progress has not copied yet, in table
    /// order, so that a caller can spread the copy over many short steps. Returns whether the
    /// copy is complete (or none is in progress): [`Index::finish_copy`] then copies nothing.
    pub fn copy_step(&mut self, chunks: usize) -> bool {
        let Some(copy) = &self.copy else { return true };
        let (total, mut cursor) = (copy.capacity.div_ceil(CHUNK_SLOTS), copy.cursor);
        let end = cursor.saturating_add(chunks).min(total);
        while cursor < end {
            self.copy_chunk(cursor);
            cursor += 1;
        }
        let Some(copy) = self.copy.as_mut() else { return true };
        copy.cursor = cursor;
        copy.remaining == 0
    }

    /// Gives up a copy-on-write snapshot in progress without copying what is left, and returns
    /// its buffer for the next one.
    pub fn abandon_copy(&mut self) -> Option<SnapshotBuf> {
        self.copy.take().map(|c| c.buf)
    }

    fn copy_remaining(&mut self) {
        let Some(copy) = &self.copy else { return };
        let chunks = copy.capacity.div_ceil(CHUNK_SLOTS);
        if copy.remaining == 0 {
            return;
        }
        for chunk in 0..chunks {
            self.copy_chunk(chunk);
        }
    }

    /// Copies the slot array into `buf` (reused across snapshots, so after the first one this
    /// is a memcpy into memory that is already faulted in) and returns capacity and length.
    /// This is the only part of an index snapshot that runs on the caller's thread; the CRCs and
    /// the header are computed by [`snapshot_header`] where the file is written.
    pub fn copy_slots(&mut self, buf: &mut Vec<u8>) -> Result<(usize, usize)> {
        self.single_table("snapshot the index")?;
        self.verify_all()?;
        buf.clear();
        buf.extend_from_slice(self.mem.bytes());
        Ok((self.capacity, self.len))
    }

    /// Opens a snapshot file as the base table: maps it read-only and checks the header and the
    /// chunk CRC table now, each chunk when first touched; a chunk is loaded into the table's
    /// own memory (of the warm pool if it holds enough, see [`crate::warm`]) before its first
    /// change. Returns the table and the seal it reflects.
    pub fn open_snapshot(path: &Path) -> Result<(Index, u64)> {
        Index::open_snapshot_into(
            path,
            |head, crcs| crate::warm::take_snapshot(path, head, crcs),
            |len| PrivatePages::scratch_warm(len, "index"),
        )
    }

    /// [`Index::open_snapshot`], with the table's memory from `resident(head, chunk_crcs)`
    /// (the file's slots, for the file of that header and chunk CRC table) or else from
    /// `memory(bytes)` (of any content).
    fn open_snapshot_into(
        path: &Path,
        resident: impl FnOnce(&[u8], &[u8]) -> Option<PrivatePages>,
        memory: impl FnOnce(usize) -> Result<PrivatePages>,
    ) -> Result<(Index, u64)> {
        let file = File::open(path).map_err(|e| StateError::io("open index snapshot", path, e))?;
        let file_len = file.metadata().map_err(|e| StateError::io("stat index snapshot", path, e))?.len();
        let corrupt = |offset: u64, reason: &str| StateError::corrupt(path, offset, reason);
        let mut head = [0u8; 48];
        crate::segment::read_exact_at(&file, &mut head, 0, path).map_err(|_| corrupt(0, "index snapshot truncated"))?;
        if head[0..8] != INDEX_MAGIC {
            return Err(corrupt(0, "bad index snapshot magic"));
        }
        if u32_at(&head, 44) != crc32fast::hash(&head[0..44]) {
            return Err(corrupt(0, "index snapshot header CRC mismatch"));
        }
        let version = u32_at(&head, 8);
        if version != INDEX_FORMAT_VERSION {
            return Err(StateError::Incompatible {
                file: path.to_owned(),
                found: version,
                expected: INDEX_FORMAT_VERSION,
            });
        }
        let capacity = u64_at(&head, 16);
        let len = u64_at(&head, 24);
        let seal = u64_at(&head, 32);
        if !capacity.is_power_of_two() || capacity < MIN_CAPACITY as u64 || len * 4 > capacity * 3 || capacity > 1 << 40
        {
            return Err(corrupt(16, "implausible index capacity"));
        }
        let capacity = capacity as usize;
        let chunks = capacity.div_ceil(CHUNK_SLOTS);
        let table_bytes = (chunks * 4).div_ceil(PAGE) * PAGE;
        let slots_offset = PAGE + table_bytes;
        if file_len != (slots_offset + capacity * size_of::<Slot>()) as u64 {
            return Err(corrupt(0, "index snapshot has the wrong size"));
        }
        let mut table = vec![0u8; chunks * 4];
        crate::segment::read_exact_at(&file, &mut table, PAGE as u64, path)?;
        if crc32fast::hash(&table) != u32_at(&head, 40) {
            return Err(corrupt(PAGE as u64, "index chunk table CRC mismatch"));
        }
        let chunk_crcs = table.chunks(4).map(|c| u32_at(c, 0)).collect();
        let slot_bytes = capacity * size_of::<Slot>();
        let restored = |file, mapped| Restored {
            path: path.to_owned(),
            file,
            slots_offset,
            chunk_crcs,
            mapped,
            verified: (0..chunks.div_ceil(64)).map(|_| Cell::new(0)).collect(),
            loaded: vec![0; chunks.div_ceil(64)],
            unloaded: chunks,
        };
        // The slots this file was written from, if this process still holds them: no read of
        // the file at all, each chunk checked as a mapped one is.
        if let Some(pages) = resident(&head, &table).filter(|p| p.len() == slot_bytes) {
            let (mem, lazy) = (SlotMemory(pages), Some(restored(file, None)));
            return Ok((Index { mem, capacity, len: len as usize, lazy, copy: None, delta: None }, seal));
        }
        // SAFETY: a read-only mapping of a file this store wrote once and never modifies or
        // truncates afterwards; its size was checked above, so every slot read stays in
        // bounds. Slot contents are not trusted until their chunk passes its CRC (`check`),
        // and addresses are bounds-checked again by the store before any record is read.
        let mapped = unsafe { MmapOptions::new().offset(slots_offset as u64).len(slot_bytes).map(&file) }
            .map_err(|e| StateError::io("mmap index snapshot", path, e))?;
        let lazy = restored(file, Some(mapped));
        // Read only where a chunk is loaded: what it holds before does not matter.
        let mem = SlotMemory(memory(slot_bytes)?);
        mem.0.advise_huge_pages();
        let index = Index { mem, capacity, len: len as usize, lazy: Some(lazy), copy: None, delta: None };
        Ok((index, seal))
    }
}

/// The header page and chunk CRC table of an index snapshot of `slots` (see the module docs):
/// what precedes the slots in the file.
pub fn snapshot_header(capacity: usize, len: usize, seal: u64, slots: &[u8]) -> Vec<u8> {
    let chunks = capacity.div_ceil(CHUNK_SLOTS);
    let table_bytes = (chunks * 4).div_ceil(PAGE) * PAGE;
    let mut out = vec![0u8; PAGE + table_bytes];
    for (c, chunk) in slots.chunks(CHUNK_SLOTS * size_of::<Slot>()).enumerate() {
        let crc = crc32fast::hash(chunk);
        out[PAGE + c * 4..PAGE + c * 4 + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let table_crc = crc32fast::hash(&out[PAGE..PAGE + chunks * 4]);
    out[0..8].copy_from_slice(&INDEX_MAGIC);
    out[8..12].copy_from_slice(&INDEX_FORMAT_VERSION.to_le_bytes());
    out[16..24].copy_from_slice(&(capacity as u64).to_le_bytes());
    out[24..32].copy_from_slice(&(len as u64).to_le_bytes());
    out[32..40].copy_from_slice(&seal.to_le_bytes());
    out[40..44].copy_from_slice(&table_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&out[0..44]);
    out[44..48].copy_from_slice(&header_crc.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// In these tests a key is its hash (with deliberately colliding home slots), so a hash
    /// match is a key match and `eq` always holds.
    fn key_of(k: u64) -> u64 {
        (k % 64) | (k << 32)
    }

    fn any_key(_: u64) -> Result<bool> {
        Ok(true)
    }

    fn same_key(_: u64, _: u64) -> Result<bool> {
        Ok(true)
    }

    /// An index of 20,000 keys with a copy-on-write snapshot begun into a buffer of the right
    /// size full of garbage (a spare from an earlier snapshot), and the table's bytes as of then.
    fn index_with_a_copy_begun() -> (Index, Vec<u8>) {
        let mut index = Index::new().unwrap();
        for k in 0..20_000u64 {
            apply(&mut index, key_of(k), Ok(k * 8 + 8));
        }
        let mut expected = Vec::new();
        index.copy_slots(&mut expected).unwrap();
        let mut dirty = SnapshotBuf::new(expected.len()).unwrap();
        dirty.0.fill(0xA5);
        index.begin_copy(Some(dirty)).unwrap();
        (index, expected)
    }

    #[test]
    fn a_copy_on_write_snapshot_into_a_reused_dirty_buffer_is_the_table_at_its_start() {
        let (mut index, expected) = index_with_a_copy_begun();
        for k in (0..20_000u64).step_by(7) {
            apply(&mut index, key_of(k), Ok(k * 8 + 16));
        }
        apply(&mut index, key_of(3), Err(96));
        let (slots, _, len) = index.finish_copy().unwrap();
        assert_eq!(len, 20_000);
        assert!(*slots == *expected, "the snapshot is the table as of begin_copy, with no stale byte");
    }

    #[test]
    fn a_snapshot_copied_in_steps_between_writes_is_the_table_at_its_start() {
        let (mut index, expected) = index_with_a_copy_begun();
        let mut steps = 0;
        let mut k = 0u64;
        // Writes land in chunks not copied yet and in chunks copied already, in any order.
        while !index.copy_step(1) {
            steps += 1;
            for _ in 0..50 {
                k = (k + 7919) % 20_000;
                apply(&mut index, key_of(k), Ok(k * 8 + 16));
            }
        }
        assert!(steps > 1, "{steps} steps");
        assert!(index.copy_step(1), "a complete copy stays complete");
        let (slots, _, len) = index.finish_copy().unwrap();
        assert_eq!(len, 20_000);
        assert!(*slots == *expected, "the snapshot is the table as of begin_copy");
        assert!(index.copy_step(1), "no copy in progress");
    }

    fn get(index: &Index, key: u64) -> Option<u64> {
        match index.find(key, any_key).unwrap() {
            Found::Live { addr, .. } => Some(addr),
            Found::Absent(_) => None,
        }
    }

    /// Sets `key` to `addr` (`Some`) or deletes it (`None`, its Delete record at `addr`), as the
    /// store does.
    fn apply(index: &mut Index, key: u64, op: std::result::Result<u64, u64>) {
        match (index.find(key, any_key).unwrap(), op) {
            (Found::Live { slot, .. }, Ok(addr)) => index.set_addr(slot, addr).unwrap(),
            (Found::Absent(vacancy), Ok(addr)) => index.insert(vacancy, addr).unwrap(),
            (Found::Live { slot, .. }, Err(delete_record)) => index.remove(slot, delete_record).unwrap(),
            (Found::Absent(_), Err(_)) => {}
        }
    }

    /// Entries [`fold`] peeks at a time: few, so that windows often end inside a cluster.
    const FOLD_WINDOW: usize = 5;

    /// What the store's `maintain` does, with keys that are their hashes: the fold in windows,
    /// each peeked first; checks that the fold goes through what the peek forecast.
    fn fold(index: &mut Index, budget: usize) -> Result<FoldStatus> {
        let mut ahead = [FoldAhead::default(); FOLD_WINDOW];
        let mut left = budget;
        while left > 0 {
            let peeked = index.peek_fold_entries(&mut ahead[..left.min(FOLD_WINDOW)]);
            if peeked == 0 {
                break;
            }
            let last_cluster = cluster_of_entry(index, peeked);
            let mut folded = Vec::new();
            for _ in 0..peeked {
                let Some(entry) = index.next_fold_entry()? else { break };
                folded.push(FoldAhead { hash: entry.hash, addr: entry.addr });
                let in_base = index.find_in_base(entry.hash(), any_key)?;
                index.fold_entry(entry, in_base)?;
            }
            assert_forecast(&ahead[..peeked], &folded, &last_cluster);
            left -= peeked;
        }
        Ok(index.finish_fold())
    }

    /// The entries of the cluster of occupied delta slots that holds the `n`-th entry from the
    /// fold's cursor on (`n >= 1`): the last one a peek of `n` sees.
    fn cluster_of_entry(index: &Index, n: usize) -> Vec<FoldAhead> {
        let delta = index.delta.as_ref().unwrap();
        let mask = delta.mask();
        let occupied = |i: usize| delta.slots[i & mask].addr != 0;
        let (mut seen, mut at) = (0, delta.cursor);
        loop {
            if occupied(at) {
                seen += 1;
                if seen == n {
                    break;
                }
            }
            at = (at + 1) & mask;
        }
        let mut start = at;
        while occupied(start.wrapping_sub(1)) && start.wrapping_sub(1) & mask != at {
            start = start.wrapping_sub(1) & mask;
        }
        let mut cluster = Vec::new();
        let mut i = start;
        while occupied(i) && cluster.len() <= mask {
            let slot = delta.slots[i & mask];
            cluster.push(FoldAhead { hash: slot.hash, addr: slot.addr });
            i = (i + 1) & mask;
        }
        cluster
    }

    /// What [`Index::peek_fold_entries`] promises: the fold goes through as many entries as
    /// were peeked, the same ones except entries of the cluster the window ended in.
    fn assert_forecast(peeked: &[FoldAhead], folded: &[FoldAhead], last_cluster: &[FoldAhead]) {
        assert_eq!(peeked.len(), folded.len());
        for e in peeked {
            assert!(folded.contains(e) || last_cluster.contains(e), "peeked {e:?}, not folded: {folded:?}");
        }
        for e in folded {
            assert!(peeked.contains(e) || last_cluster.contains(e), "folded {e:?}, not peeked: {peeked:?}");
        }
    }

    /// Folds up to `n` entries, returning them in the order folded.
    fn fold_entries(index: &mut Index, n: usize) -> Vec<FoldAhead> {
        let mut folded = Vec::new();
        for _ in 0..n {
            let Some(entry) = index.next_fold_entry().unwrap() else { break };
            folded.push(FoldAhead { hash: entry.hash, addr: entry.addr });
            let in_base = index.find_in_base(entry.hash(), any_key).unwrap();
            index.fold_entry(entry, in_base).unwrap();
        }
        folded
    }

    /// Where no delta entry sits away from its home slot, a removal shifts nothing back, so
    /// the fold goes through exactly the entries peeked, in the order peeked, with updates,
    /// deletes and revivals in between; peeking changes nothing. With colliding keys, a peek
    /// of the whole delta is what the whole fold goes through.
    #[test]
    fn the_fold_goes_through_the_entries_peeked() {
        let mut index = Index::new().unwrap();
        let mut ahead = [FoldAhead::default(); 16];
        assert_eq!(index.peek_fold_entries(&mut ahead), 0, "no delta");
        // Distinct home slots in a delta of 1024, the first one where the cursor starts.
        let home = |k: u64| (k - 1) * 7;
        let mut records: Vec<_> = (1..140).map(|k| Replayed::put(home(k), k)).collect();
        records.extend((140..146).map(|k| Replayed::delete(home(k), k)));
        index.replay(&records, same_key).unwrap();
        index.end_replay(139).unwrap();
        let mut folded = 0;
        let mut k = 1;
        loop {
            let peeked = index.peek_fold_entries(&mut ahead);
            let mut again = [FoldAhead::default(); 16];
            assert_eq!(index.peek_fold_entries(&mut again), peeked);
            assert_eq!(again[..peeked], ahead[..peeked], "a peek changes nothing");
            assert!(ahead[..peeked].iter().all(|e| e.hash() % 7 == 0 && e.addr() == e.hash() / 7 + 1));
            if peeked == 0 {
                break;
            }
            assert_eq!(fold_entries(&mut index, peeked), &ahead[..peeked]);
            folded += peeked;
            // Changes of delta entries not folded yet: an update, a delete, a revival.
            k += 11;
            apply(&mut index, home(k), Ok(k));
            apply(&mut index, home(k + 1), Err(k + 1));
            apply(&mut index, home(k + 2), Ok(k + 2));
        }
        assert_eq!(folded, 145);
        assert_eq!(index.finish_fold(), FoldStatus::Done);
        assert_eq!(index.peek_fold_entries(&mut ahead), 0, "the delta is gone");

        // Keys of 64 home slots: long clusters, in which removals shift entries back.
        let mut index = Index::new().unwrap();
        let records: Vec<_> = (0..300).map(|k| Replayed::put(key_of(k), k + 1)).collect();
        index.replay(&records, same_key).unwrap();
        index.end_replay(300).unwrap();
        let mut all = vec![FoldAhead::default(); 400];
        assert_eq!(index.peek_fold_entries(&mut all), 300);
        let mut folded = fold_entries(&mut index, usize::MAX);
        all.truncate(300);
        all.sort_by_key(|e| (e.hash, e.addr));
        folded.sort_by_key(|e| (e.hash, e.addr));
        assert_eq!(folded, all);
    }

    fn same_contents(index: &Index, model: &BTreeMap<u64, u64>, keys: u64) -> std::result::Result<(), TestCaseError> {
        prop_assert_eq!(index.len(), model.len());
        for k in 0..keys {
            let key = key_of(k);
            prop_assert_eq!(get(index, key), model.get(&key).copied(), "key {}", k);
        }
        Ok(())
    }

    /// Memory for a restored table that is not zeroed (as from the warm pool): every other slot
    /// looks occupied, with a hash no key has, the rest empty, so reading a chunk of it before
    /// it is loaded gives wrong answers (and probes still end).
    fn dirty_memory(len: usize) -> Result<PrivatePages> {
        let mut pages = PrivatePages::anonymous(len, "test")?;
        for (i, slot) in bytemuck::cast_slice_mut::<u8, Slot>(&mut pages).iter_mut().enumerate() {
            *slot = Slot { hash: 0xA5A5_A5A5_A5A5_A5A5, addr: if i % 2 == 0 { 0xA5A5_A5A5 } else { 0 } };
        }
        Ok(pages)
    }

    /// Builds a base table from `ops`, writes it as a snapshot and opens it again (in dirty
    /// memory).
    fn restored_base(
        dir: &Path,
        ops: &[(u64, u64, bool)],
        model: &mut BTreeMap<u64, u64>,
    ) -> std::result::Result<Index, TestCaseError> {
        let mut index = Index::new().unwrap();
        for &(k, addr, put) in ops {
            let key = key_of(k);
            if put {
                apply(&mut index, key, Ok(addr));
                model.insert(key, addr);
            } else {
                apply(&mut index, key, Err(addr));
                model.remove(&key);
            }
        }
        let path = dir.join("index-1.idx");
        std::fs::write(&path, index.snapshot(1).unwrap()).unwrap();
        let (base, _) = Index::open_snapshot_into(&path, |_, _| None, dirty_memory).unwrap();
        prop_assert_eq!(base.len(), model.len());
        Ok(base)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u64, u64),
        Delete(u64, u64),
        Fold(usize),
    }

    const KEYS: u64 = 1000;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..KEYS, 1u64..1 << 40).prop_map(|(k, a)| Op::Put(k, a)),
            3 => (0..KEYS, 1u64..1 << 40).prop_map(|(k, a)| Op::Delete(k, a)),
            1 => prop_oneof![Just(0usize), 1usize..8, 8usize..200, Just(usize::MAX)].prop_map(Op::Fold),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0u64..3000, 1u64..1000, any::<bool>()), 1..3000)) {
            let mut index = Index::new().unwrap();
            let mut model = BTreeMap::new();
            for (k, addr, insert) in ops {
                let key = key_of(k);
                if insert {
                    apply(&mut index, key, Ok(addr));
                    model.insert(key, addr);
                } else {
                    apply(&mut index, key, Err(addr));
                    model.remove(&key);
                }
                prop_assert_eq!(index.len(), model.len());
            }
            for (key, addr) in &model {
                prop_assert_eq!(get(&index, *key), Some(*addr));
            }
            prop_assert!(!index.has_delta());
        }

        /// A restored base, a replayed delta in front of it, then lookups, updates, deletes and
        /// fold steps of any budget interleaved: the index equals the model at every step, and
        /// once folded it is a single table again with the right key count.
        #[test]
        fn delta_over_a_restored_base_behaves_like_a_map(
            base_ops in proptest::collection::vec((0..KEYS, 1u64..1 << 40, any::<bool>()), 0..1000),
            replay in proptest::collection::vec((0..KEYS, 1u64..1 << 40, any::<bool>()), 0..400),
            ops in proptest::collection::vec(op(), 0..300),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut model = BTreeMap::new();
            let mut index = restored_base(dir.path(), &base_ops, &mut model)?;
            let mut records = Vec::new();
            for (k, addr, put) in replay {
                let key = key_of(k);
                if put {
                    records.push(Replayed::put(key, addr));
                    model.insert(key, addr);
                } else {
                    records.push(Replayed::delete(key, addr));
                    model.remove(&key);
                }
            }
            // In two calls, the second into a delta that already holds entries.
            let (first, second) = records.split_at(records.len() / 3);
            index.replay(first, same_key).unwrap();
            index.replay(second, same_key).unwrap();
            index.end_replay(model.len()).unwrap();
            prop_assert!(index.has_delta());
            same_contents(&index, &model, KEYS)?;
            let mut delta_entries = index.delta_entries();
            for op in ops {
                match op {
                    Op::Put(k, addr) => {
                        apply(&mut index, key_of(k), Ok(addr));
                        model.insert(key_of(k), addr);
                    }
                    Op::Delete(k, addr) => {
                        apply(&mut index, key_of(k), Err(addr));
                        model.remove(&key_of(k));
                    }
                    Op::Fold(budget) => {
                        let status = fold(&mut index, budget).unwrap();
                        prop_assert_eq!(status == FoldStatus::Done, !index.has_delta());
                        prop_assert!(matches!(status, FoldStatus::Pending | FoldStatus::Done), "{:?}", status);
                    }
                }
                // The delta never grows after the replay, so the fold always ends.
                prop_assert!(index.delta_entries() <= delta_entries);
                delta_entries = index.delta_entries();
                same_contents(&index, &model, KEYS)?;
            }
            prop_assert_eq!(fold(&mut index, usize::MAX).unwrap(), FoldStatus::Done);
            prop_assert!(!index.has_delta());
            same_contents(&index, &model, KEYS)?;
            let entries: BTreeMap<u64, u64> = index.entries().unwrap().map(|s| (s.hash, s.addr)).collect();
            prop_assert_eq!(entries, model);
        }
    }

    /// New keys inserted during the overlay, and live delta entries folded in, grow the base
    /// table; the delta survives the move.
    #[test]
    fn the_base_grows_under_the_delta() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = BTreeMap::new();
        let ops: Vec<_> = (0..700).map(|k| (k, k + 1, true)).collect();
        let mut index = restored_base(dir.path(), &ops, &mut model).unwrap();
        let capacity = index.capacity;
        let mut records: Vec<_> = (650..1000).map(|k| Replayed::put(key_of(k), k + 10)).collect();
        records.push(Replayed::delete(key_of(1), 9));
        index.replay(&records, same_key).unwrap();
        model.extend((650..1000).map(|k| (key_of(k), k + 10)));
        model.remove(&key_of(1));
        index.end_replay(model.len()).unwrap();
        for k in 1000..1100 {
            apply(&mut index, key_of(k), Ok(k));
            model.insert(key_of(k), k);
        }
        assert!(index.capacity > capacity, "inserts grew the base");
        assert!(index.has_delta());
        same_contents(&index, &model, 1100).unwrap();
        while fold(&mut index, 37).unwrap() == FoldStatus::Pending {
            same_contents(&index, &model, 1100).unwrap();
        }
        assert!(!index.has_delta());
        same_contents(&index, &model, 1100).unwrap();
    }

    /// The fold goes through the delta in slot order; into a base table smaller than the
    /// delta, that order would wrap around the table and build probe runs thousands of slots
    /// long. The base grows to the delta's size first, so runs stay as short as random
    /// inserts make them.
    #[test]
    fn folding_a_large_delta_into_a_small_base_keeps_probe_runs_short() {
        let mut index = Index::new().unwrap();
        let keys = 300_000u64;
        let records: Vec<_> =
            (1..=keys).map(|k| Replayed::put(xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes()), k)).collect();
        index.replay(&records, same_key).unwrap();
        index.end_replay(keys as usize).unwrap();
        assert!(index.capacity < index.delta.as_ref().unwrap().slots.len());
        let longest_run = |index: &Index| {
            let mask = index.capacity - 1;
            let slots = index.slots().iter().enumerate().filter(|(_, s)| s.addr != 0);
            slots.map(|(i, s)| i.wrapping_sub(s.hash as usize) & mask).max().unwrap_or(0)
        };
        let mut longest = 0;
        while fold(&mut index, 5000).unwrap() == FoldStatus::Pending {
            longest = longest.max(longest_run(&index));
        }
        assert_eq!(index.len(), keys as usize);
        assert!(longest < 200, "an entry sat {longest} slots from its home during the fold");
    }

    #[test]
    fn a_wrong_key_count_is_found_when_the_fold_ends() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = BTreeMap::new();
        let ops: Vec<_> = (0..100).map(|k| (k, k + 1, true)).collect();
        let mut index = restored_base(dir.path(), &ops, &mut model).unwrap();
        index.replay(&[Replayed::put(key_of(500), 7), Replayed::delete(key_of(3), 8)], same_key).unwrap();
        // Right would be 100: one key added, one deleted.
        index.end_replay(101).unwrap();
        assert_eq!(index.len(), 101);
        assert!(index.entries().is_err(), "a single-table operation before the fold is refused");
        assert_eq!(fold(&mut index, 1).unwrap(), FoldStatus::Pending);
        assert_eq!(fold(&mut index, 1).unwrap(), FoldStatus::CountMismatch { counted: 100, expected: 101 });
        assert!(!index.has_delta());
        // With nothing replayed the check is immediate.
        let mut index = restored_base(dir.path(), &ops, &mut model).unwrap();
        index.end_replay(100).unwrap();
        assert_eq!(fold(&mut index, 0).unwrap(), FoldStatus::Done);
    }

    /// A replay into the delta never reads the base table: keys homed in a corrupt chunk of it
    /// replay and read back fine; folding them into that chunk finds the corruption.
    #[test]
    fn replay_does_not_touch_the_base_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::new().unwrap();
        let spread = |k: u64| k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for k in 1..10_000u64 {
            index.insert_new(spread(k), k).unwrap();
        }
        let capacity = index.capacity;
        assert!(capacity >= 4 * CHUNK_SLOTS);
        let mut bytes = index.snapshot(1).unwrap();
        // Corrupt chunk 2: a byte of its last slot.
        let slots_at = bytes.len() - capacity * size_of::<Slot>();
        bytes[slots_at + (3 * CHUNK_SLOTS - 1) * size_of::<Slot>() + 3] ^= 1;
        let path = dir.path().join("index-1.idx");
        std::fs::write(&path, &bytes).unwrap();
        let (mut index, _) = Index::open_snapshot(&path).unwrap();
        let in_chunk_2 = |h: u64| (h as usize & (capacity - 1)) / CHUNK_SLOTS == 2;
        let keys: Vec<u64> = (1..10_000u64).map(spread).filter(|&h| in_chunk_2(h)).take(50).collect();
        let records: Vec<_> = (keys.iter().enumerate())
            .map(|(n, &h)| match n % 2 {
                0 => Replayed::put(h, 1_000_000 + n as u64),
                _ => Replayed::delete(h, 2_000_000 + n as u64),
            })
            .collect();
        index.replay(&records, same_key).unwrap();
        index.end_replay(9_999 - 25).unwrap();
        for (n, &h) in keys.iter().enumerate() {
            assert_eq!(get(&index, h), (n % 2 == 0).then_some(1_000_000 + n as u64));
        }
        let err = fold(&mut index, usize::MAX).unwrap_err();
        assert_eq!(err.class(), crate::ErrorClass::Corruption);
        assert!(err.to_string().contains("index-1.idx"), "{err}");
    }

    fn spread(k: u64) -> u64 {
        k.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// The capacity and snapshot bytes of a table of keys 1..20,000 spread over it by
    /// [`spread`], each with its key as address.
    fn snapshot_of_spread_keys() -> (usize, Vec<u8>) {
        let mut index = Index::new().unwrap();
        for k in 1..20_000u64 {
            index.insert_new(spread(k), k).unwrap();
        }
        (index.capacity, index.snapshot(1).unwrap())
    }

    /// `prepare_write` loads a chunk of a mapped snapshot through the file: the table reads
    /// the same afterwards, changes after it stay, and a corrupt chunk is reported (and not
    /// taken as checked).
    #[test]
    fn prepare_write_loads_a_chunk_from_the_file_and_checks_it() {
        let dir = tempfile::tempdir().unwrap();
        let (capacity, bytes) = snapshot_of_spread_keys();
        let path = dir.path().join("index-1.idx");
        std::fs::write(&path, &bytes).unwrap();
        let (mut restored, _) = Index::open_snapshot_into(&path, |_, _| None, dirty_memory).unwrap();
        for k in (1..20_000u64).step_by(3) {
            restored.prepare_write(spread(k)).unwrap();
        }
        for k in 20_000..21_000u64 {
            restored.prepare_write(spread(k)).unwrap();
            restored.insert_new(spread(k), k).unwrap();
        }
        for k in 1..21_000u64 {
            restored.prepare_write(spread(k)).unwrap();
            assert_eq!(get(&restored, spread(k)), Some(k), "key {k}");
        }
        restored.verify_all().unwrap();
        assert!(restored.lazy.is_none(), "all loaded: the file is no longer mapped");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "the file is never written");

        // A byte of chunk 1's slots flipped in the file: preparing a slot there fails, naming
        // the file, and so does the next lookup there.
        let mut bad = bytes.clone();
        let slots_at = bad.len() - capacity * size_of::<Slot>();
        bad[slots_at + CHUNK_SLOTS * size_of::<Slot>() + 5] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let (mut restored, _) = Index::open_snapshot(&path).unwrap();
        let in_chunk_1 =
            (1..20_000u64).map(spread).find(|&h| (h as usize & (capacity - 1)) / CHUNK_SLOTS == 1).unwrap();
        let err = restored.prepare_write(in_chunk_1).unwrap_err();
        assert_eq!(err.class(), crate::ErrorClass::Corruption);
        assert!(err.to_string().contains("index-1.idx"), "{err}");
        assert_eq!(restored.find(in_chunk_1, |_| Ok(true)).unwrap_err().class(), crate::ErrorClass::Corruption);
    }

    /// A table opened with the slots its file was written from (as a restart finds them in the
    /// warm pool) reads them, not the file, and still checks each chunk against the file's
    /// CRCs: a changed byte in the slots given is found as corruption.
    #[test]
    fn a_table_opened_with_its_slots_in_memory_reads_them_and_checks_them() {
        let dir = tempfile::tempdir().unwrap();
        let (capacity, bytes) = snapshot_of_spread_keys();
        let slots_at = bytes.len() - capacity * size_of::<Slot>();
        let in_memory = |flip: Option<usize>| {
            let mut pages = PrivatePages::anonymous(capacity * size_of::<Slot>(), "test").unwrap();
            pages.copy_from_slice(&bytes[slots_at..]);
            if let Some(at) = flip {
                pages[at] ^= 1;
            }
            pages
        };
        // The file's slots zeroed (header and chunk CRCs kept): only the memory holds them.
        let path = dir.path().join("index-1.idx");
        let mut file_bytes = bytes.clone();
        file_bytes[slots_at..].fill(0);
        std::fs::write(&path, &file_bytes).unwrap();
        let (mut restored, _) = Index::open_snapshot_into(&path, |_, _| Some(in_memory(None)), dirty_memory).unwrap();
        for k in (1..20_000u64).step_by(2) {
            restored.prepare_write(spread(k)).unwrap();
        }
        for k in 20_000..21_000u64 {
            restored.insert_new(spread(k), k).unwrap();
        }
        for k in 1..21_000u64 {
            assert_eq!(get(&restored, spread(k)), Some(k), "key {k}");
        }
        restored.verify_all().unwrap();
        assert!(restored.lazy.is_none());

        let flipped = CHUNK_SLOTS * size_of::<Slot>() + 5;
        let (restored, _) =
            Index::open_snapshot_into(&path, |_, _| Some(in_memory(Some(flipped))), dirty_memory).unwrap();
        let in_chunk_1 =
            (1..20_000u64).map(spread).find(|&h| (h as usize & (capacity - 1)) / CHUNK_SLOTS == 1).unwrap();
        let err = restored.find(in_chunk_1, |_| Ok(true)).unwrap_err();
        assert_eq!(err.class(), crate::ErrorClass::Corruption);
        assert!(err.to_string().contains("index-1.idx"), "{err}");
    }

    #[test]
    fn snapshot_round_trip_and_lazy_corruption_detection() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::new().unwrap();
        for k in 1..20_000u64 {
            index.insert_new(k.wrapping_mul(0x9E37_79B9_7F4A_7C15), k).unwrap();
        }
        let bytes = index.snapshot(777).unwrap();
        let path = dir.path().join("index-1.idx");
        std::fs::write(&path, &bytes).unwrap();
        let (mut restored, seal) = Index::open_snapshot(&path).unwrap();
        assert_eq!(seal, 777);
        for k in 1..20_000u64 {
            let h = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            assert_eq!(get(&restored, h), Some(k));
        }
        restored.insert_new(5, 5).unwrap();
        // The mapped file is never written.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);

        // Flip one byte in the slots of a chunk: open still succeeds (lazy), and the first
        // probe into that chunk reports corruption with the file and offset.
        let mut bad = bytes.clone();
        let at = bad.len() - 100;
        bad[at] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let (mut restored, _) = Index::open_snapshot(&path).unwrap();
        let err = restored.verify_all().unwrap_err();
        assert_eq!(err.class(), crate::ErrorClass::Corruption);
        assert!(err.to_string().contains("index-1.idx"), "{err}");

        // Header and chunk-table damage is caught at open.
        for at in [3usize, 20, 4096 + 2] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            assert_eq!(Index::open_snapshot(&path).unwrap_err().class(), crate::ErrorClass::Corruption, "byte {at}");
        }
        std::fs::write(&path, &bytes[..bytes.len() - 16]).unwrap();
        assert_eq!(Index::open_snapshot(&path).unwrap_err().class(), crate::ErrorClass::Corruption);
    }
}
