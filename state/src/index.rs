//! The per-store index: `(state id, key) -> log address`, as an open-addressing hash table whose
//! memory layout *is* its snapshot format.
//!
//! A slot holds the 64-bit hash of `(state id, key)` and the address of the key's newest record;
//! the key itself lives only in the log, so a probe that matches the hash confirms by comparing
//! the record's key (the `eq` callback). Linear probing, power-of-two capacity, at most 3/4 full,
//! backward-shift deletion (no tombstones).
//!
//! An index snapshot is the slot array written to a file with a header and one CRC per chunk of
//! [`CHUNK_SLOTS`] slots. Restoring maps that file copy-on-write (`MAP_PRIVATE`): the table is
//! usable at once, whatever its size, and a chunk is CRC-checked the first time a probe touches
//! it, so corruption is still detected before a single slot of that chunk is trusted. That is
//! what keeps restore time flat as state grows.
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
use memmap2::{MmapMut, MmapOptions};

use crate::error::{Result, StateError};
use crate::segment::{u32_at, u64_at};

#[cfg(not(target_endian = "little"))]
compile_error!("weir's index snapshot is mapped in place and assumes a little-endian machine");

/// Magic bytes of an index snapshot.
pub const INDEX_MAGIC: [u8; 8] = *b"WEIRIDX\0";
/// Version of the index snapshot format.
pub const INDEX_FORMAT_VERSION: u32 = 1;
/// Slots per CRC chunk (64 KiB of slots).
pub const CHUNK_SLOTS: usize = 4096;
const PAGE: usize = 4096;
const MIN_CAPACITY: usize = 1024;

/// One slot of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct Slot {
    /// Hash of `(state id, key)`.
    pub hash: u64,
    /// Log address of the key's newest record; 0 means empty.
    pub addr: u64,
}

/// Lazy verification state of a table mapped from a snapshot file.
#[derive(Debug)]
struct LazyCheck {
    path: PathBuf,
    slots_offset: usize,
    chunk_crcs: Vec<u32>,
    verified: Vec<Cell<u64>>,
    unverified: Cell<usize>,
}

/// The index table.
#[derive(Debug)]
pub struct Index {
    mem: MmapMut,
    capacity: usize,
    len: usize,
    lazy: Option<LazyCheck>,
    copy: Option<SnapshotCopy>,
}

/// A snapshot of the table being taken copy-on-write: a chunk is copied into `buf` the first
/// time it is about to change (or when the copy is finished), so taking a snapshot costs the
/// caller no pass over the table.
#[derive(Debug)]
struct SnapshotCopy {
    buf: Vec<u8>,
    copied: Vec<u64>,
    remaining: usize,
    capacity: usize,
    len: usize,
}

impl Index {
    /// An empty table.
    pub fn new() -> Result<Index> {
        Index::with_capacity(MIN_CAPACITY)
    }

    fn with_capacity(capacity: usize) -> Result<Index> {
        debug_assert!(capacity.is_power_of_two());
        let mem = MmapOptions::new()
            .len(capacity * size_of::<Slot>())
            .map_anon()
            .map_err(|e| StateError::io("mmap anonymous index", "<memory>", e))?;
        // Huge pages where the kernel has them: a probe is a random access into the table, and
        // with 4 KiB pages most probes of a large table also miss the TLB. Only a hint.
        let _ = mem.advise(memmap2::Advice::HugePage);
        Ok(Index { mem, capacity, len: 0, lazy: None, copy: None })
    }

    /// Number of keys in the table.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the slot array.
    pub fn table_bytes(&self) -> usize {
        self.capacity * size_of::<Slot>()
    }

    fn slots(&self) -> &[Slot] {
        bytemuck::cast_slice(&self.mem[..])
    }

    fn slots_mut(&mut self) -> &mut [Slot] {
        bytemuck::cast_slice_mut(&mut self.mem[..])
    }

    /// Checks the CRC of the chunk holding slot `i`, once.
    #[inline]
    fn check(&self, i: usize) -> Result<()> {
        match &self.lazy {
            Some(lazy) if lazy.unverified.get() > 0 => self.check_chunk(lazy, i / CHUNK_SLOTS),
            _ => Ok(()),
        }
    }

    #[cold]
    fn check_chunk(&self, lazy: &LazyCheck, chunk: usize) -> Result<()> {
        let word = &lazy.verified[chunk / 64];
        let bit = 1u64 << (chunk % 64);
        if word.get() & bit != 0 {
            return Ok(());
        }
        let start = chunk * CHUNK_SLOTS * size_of::<Slot>();
        let end = start + CHUNK_SLOTS.min(self.capacity) * size_of::<Slot>();
        if crc32fast::hash(&self.mem[start..end]) != lazy.chunk_crcs[chunk] {
            return Err(StateError::corrupt(
                &lazy.path,
                (lazy.slots_offset + start) as u64,
                format!("index chunk {chunk} fails its CRC"),
            ));
        }
        word.set(word.get() | bit);
        lazy.unverified.set(lazy.unverified.get() - 1);
        Ok(())
    }

    /// Checks every chunk not yet checked; afterwards the table is plain memory.
    pub fn verify_all(&mut self) -> Result<()> {
        if let Some(lazy) = &self.lazy {
            for chunk in 0..lazy.chunk_crcs.len() {
                self.check_chunk(lazy, chunk)?;
            }
        }
        self.lazy = None;
        Ok(())
    }

    /// Finds the slot of the entry with `hash` for which `eq(addr)` holds.
    pub fn find(&self, hash: u64, mut eq: impl FnMut(u64) -> Result<bool>) -> Result<Option<usize>> {
        let mask = self.capacity - 1;
        let mut i = hash as usize & mask;
        loop {
            self.check(i)?;
            let slot = self.slots()[i];
            if slot.addr == 0 {
                return Ok(None);
            }
            if slot.hash == hash && eq(slot.addr)? {
                return Ok(Some(i));
            }
            i = (i + 1) & mask;
        }
    }

    /// The address stored in slot `i` (from [`Index::find`]).
    pub fn addr_at(&self, i: usize) -> u64 {
        self.slots()[i].addr
    }

    /// Replaces the address in slot `i` (from [`Index::find`]).
    pub fn set_addr(&mut self, i: usize, addr: u64) {
        debug_assert!(addr != 0 && self.slots()[i].addr != 0);
        self.before_write(i);
        self.slots_mut()[i].addr = addr;
    }

    /// Inserts an entry whose key is known to be absent.
    pub fn insert_new(&mut self, hash: u64, addr: u64) -> Result<()> {
        debug_assert!(addr != 0);
        if (self.len + 1) * 4 > self.capacity * 3 {
            self.grow()?;
        }
        let mask = self.capacity - 1;
        let mut i = hash as usize & mask;
        loop {
            self.check(i)?;
            if self.slots()[i].addr == 0 {
                self.before_write(i);
                self.slots_mut()[i] = Slot { hash, addr };
                self.len += 1;
                return Ok(());
            }
            i = (i + 1) & mask;
        }
    }

    /// Removes the entry in slot `i`, shifting later entries of its probe run back.
    pub fn remove_at(&mut self, i: usize) -> Result<()> {
        let mask = self.capacity - 1;
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            self.check(j)?;
            let slot = self.slots()[j];
            if slot.addr == 0 {
                break;
            }
            let home = slot.hash as usize & mask;
            // Move `slot` into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.before_write(hole);
                self.slots_mut()[hole] = slot;
                hole = j;
            }
        }
        self.before_write(hole);
        self.slots_mut()[hole] = Slot::zeroed();
        self.len -= 1;
        Ok(())
    }

    fn grow(&mut self) -> Result<()> {
        self.verify_all()?;
        // A snapshot being copied reflects the table before the move: copy what is left now.
        self.copy_remaining();
        let copy = self.copy.take();
        let mut bigger = Index::with_capacity(self.capacity * 2)?;
        for slot in self.slots().iter().filter(|s| s.addr != 0) {
            let mask = bigger.capacity - 1;
            let mut i = slot.hash as usize & mask;
            while bigger.slots()[i].addr != 0 {
                i = (i + 1) & mask;
            }
            bigger.slots_mut()[i] = *slot;
        }
        bigger.len = self.len;
        bigger.copy = copy;
        *self = bigger;
        Ok(())
    }

    /// All occupied slots, after checking every chunk.
    pub fn entries(&mut self) -> Result<impl Iterator<Item = Slot> + '_> {
        self.verify_all()?;
        Ok(self.slots().iter().copied().filter(|s| s.addr != 0))
    }

    /// Serialises the table as a snapshot reflecting the log up to `seal` (header, chunk CRC
    /// table and slots in one buffer).
    pub fn snapshot(&mut self, seal: u64) -> Result<Vec<u8>> {
        let mut slots = Vec::new();
        let (capacity, len) = self.copy_slots(&mut slots)?;
        let mut out = snapshot_header(capacity, len, seal, &slots);
        out.extend_from_slice(&slots);
        Ok(out)
    }

    /// Starts a copy-on-write snapshot of the table into `buf` (reused across snapshots). From
    /// now on a chunk is copied just before its first change; [`Index::finish_copy`] copies the
    /// rest. Replaces (and drops) a copy still in progress.
    pub fn begin_copy(&mut self, mut buf: Vec<u8>) -> Result<()> {
        self.verify_all()?;
        let bytes = self.capacity * size_of::<Slot>();
        buf.clear();
        buf.resize(bytes, 0);
        let chunks = self.capacity.div_ceil(CHUNK_SLOTS);
        self.copy = Some(SnapshotCopy {
            buf,
            copied: vec![0; chunks.div_ceil(64)],
            remaining: chunks,
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
    pub fn finish_copy(&mut self) -> Option<(Vec<u8>, usize, usize)> {
        self.copy_remaining();
        self.copy.take().map(|c| (c.buf, c.capacity, c.len))
    }

    #[inline]
    fn before_write(&mut self, slot: usize) {
        if let Some(copy) = &self.copy
            && copy.remaining > 0
        {
            self.copy_chunk(slot / CHUNK_SLOTS);
        }
    }

    #[cold]
    fn copy_chunk(&mut self, chunk: usize) {
        let Some(copy) = self.copy.as_mut() else { return };
        let (word, bit) = (chunk / 64, 1u64 << (chunk % 64));
        if copy.copied[word] & bit != 0 {
            return;
        }
        let chunk_bytes = CHUNK_SLOTS * size_of::<Slot>();
        let start = chunk * chunk_bytes;
        let end = (start + chunk_bytes).min(copy.buf.len());
        copy.buf[start..end].copy_from_slice(&self.mem[start..end]);
        copy.copied[word] |= bit;
        copy.remaining -= 1;
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
        self.verify_all()?;
        buf.clear();
        buf.extend_from_slice(&self.mem[..]);
        Ok((self.capacity, self.len))
    }

    /// Maps a snapshot file copy-on-write. Checks the header and the chunk CRC table now, each
    /// chunk when first touched. Returns the table and the seal it reflects.
    pub fn open_snapshot(path: &Path) -> Result<(Index, u64)> {
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
        // SAFETY: a private (copy-on-write) mapping of a file this store wrote once and never
        // modifies or truncates afterwards; its size was checked above, so every slot access
        // stays in bounds. Writes go to private copies of the pages, never to the file. Slot
        // contents are not trusted until their chunk passes its CRC (`check`), and addresses
        // are bounds-checked again by the store before any record is read.
        let mem =
            unsafe { MmapOptions::new().offset(slots_offset as u64).len(capacity * size_of::<Slot>()).map_copy(&file) }
                .map_err(|e| StateError::io("mmap index snapshot", path, e))?;
        let lazy = LazyCheck {
            path: path.to_owned(),
            slots_offset,
            chunk_crcs,
            verified: (0..chunks.div_ceil(64)).map(|_| Cell::new(0)).collect(),
            unverified: Cell::new(chunks),
        };
        let index = Index { mem, capacity, len: len as usize, lazy: Some(lazy), copy: None };
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

    /// The model: keys are the hashes themselves (with deliberately colliding home slots).
    fn find(index: &Index, key: u64) -> Option<usize> {
        let table: &Index = index;
        table.find(key, |_| Ok(true)).unwrap().filter(|&i| table.slots()[i].hash == key)
    }

    proptest! {
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0u64..3000, 1u64..1000, any::<bool>()), 1..3000)) {
            let mut index = Index::new().unwrap();
            let mut model = BTreeMap::new();
            for (k, addr, insert) in ops {
                // Force collisions: many keys share a home slot.
                let key = (k % 64) | (k << 32);
                let found = index.find(key, |_| Ok(true)).unwrap();
                if insert {
                    match found {
                        Some(i) => index.set_addr(i, addr),
                        None => index.insert_new(key, addr).unwrap(),
                    }
                    model.insert(key, addr);
                } else if let Some(i) = found {
                    index.remove_at(i).unwrap();
                    model.remove(&key);
                }
                prop_assert_eq!(index.len(), model.len());
            }
            for (key, addr) in &model {
                let i = find(&index, *key).unwrap();
                prop_assert_eq!(index.addr_at(i), *addr);
            }
        }
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
            assert_eq!(restored.addr_at(restored.find(h, |_| Ok(true)).unwrap().unwrap()), k);
        }
        restored.insert_new(5, 5).unwrap();
        // The copy-on-write mapping never writes back to the file.
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
