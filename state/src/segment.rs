//! Segment files: fixed-size, fully preallocated, memory-mapped log files.
//!
//! A segment is created at its final size with `fallocate` (never a sparse `set_len`, so a
//! write never has to allocate a block) and mapped once, read-only. It never shrinks or grows
//! while mapped, so the mapping never moves and no reference into it is ever invalidated by the
//! store itself.
//!
//! # The open tail
//! Nothing is written through the mapping. The part of a segment that may still change (from
//! the last checkpoint's seal to the end of the data: appends, and values rewritten in place)
//! is its *open tail*, held in anonymous memory and read from there; [`Segment::write_out`]
//! copies it into the file with `pwrite`, and [`Segment::seal`] seals it at a checkpoint,
//! after which its bytes are read through the mapping ([`Segment::close`] when the segment is
//! full). The buffer is reused from its start after every seal (`buffer[o - base]` holds byte
//! `o`, `base` being the seal's page), so a store's steady checkpoints neither give pages back
//! nor fault fresh ones in: giving back the 4-6 MiB sealed per checkpoint at 1 GiB took the
//! shard 0.5 ms at the median and up to 6 ms, inside the checkpoint. The reason for the open
//! tail is the kernel's writeback: a
//! page mapped writable and dirty is write-protected before it is written back
//! (`folio_mkclean`), and each of those flushes the TLB of every CPU running the process. On a
//! 2-vCPU VM that made syncing a checkpoint's pages through the mapping take 14-250 ms at the
//! 99th percentile, against 1-2 ms for the same bytes written with `pwrite` and read through a
//! read-only mapping (`weir-bench checkpoint-scale` measures both before its job).
//!
//! # Layout
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"WEIRSEG\0"` |
//! | 8 | 4 | format version ([`SEGMENT_FORMAT_VERSION`]) |
//! | 12 | 4 | rkyv format flags ([`RKYV_FORMAT`]) |
//! | 16 | 4 | shard |
//! | 20 | 4 | segment id |
//! | 24 | 8 | sequence number of the first record |
//! | 32 | 8 | segment size in bytes |
//! | 40 | 4 | CRC-32 (IEEE) of bytes 0..40 |
//! | 44 | 4052 | zero |
//! | 4096 | .. | records (see [`crate::record`]) |
//!
//! All integers are little-endian.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Advice, MmapMut, MmapOptions, MmapRaw, UncheckedAdvice};

use crate::error::{Result, StateError};

/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"WEIRSEG\0";
/// Version of the segment and record format written by this build.
pub const SEGMENT_FORMAT_VERSION: u32 = 1;
/// rkyv's format options, pinned: bit 0 little-endian, bit 1 32-bit relative pointers,
/// bit 2 aligned primitives. Values in a segment are only read by a build with the same flags.
pub const RKYV_FORMAT: u32 = 0b111;
/// Bytes reserved for the segment header; records start here.
pub const SEGMENT_HEADER_BYTES: u32 = 4096;
/// The smallest segment size accepted.
pub const MIN_SEGMENT_BYTES: u32 = 2 * SEGMENT_HEADER_BYTES;

/// Identifies a segment within one store. Ids start at 1 and only grow.
pub type SegmentId = u32;

/// The name under which a store keeps one segment file that nothing needs any more, for its
/// next segment to be written over: deleting a file of 64 MiB frees its blocks, and on a file
/// system mounted with `discard` that stalls the disk (`checkpoint-scale`'s checkpoint syncs
/// waited tens of milliseconds behind such deletions); a recycled file also has its blocks
/// written already, so writing it converts no extent.
pub const SPARE_SEGMENT_FILE: &str = "seg.spare";

/// Moves the file `path` to `spare` unless a file of that name exists; returns whether it did.
pub(crate) fn recycle(path: &Path, spare: &Path) -> bool {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, path, CWD, spare, RenameFlags::NOREPLACE).is_ok()
}

/// The file name of segment `id`.
pub fn segment_file_name(id: SegmentId) -> String {
    format!("seg-{id:08}.log")
}

/// Parses a segment file name back to its id.
pub fn parse_segment_file_name(name: &str) -> Option<SegmentId> {
    name.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok()
}

/// The decoded header of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The shard that wrote the segment.
    pub shard: u32,
    /// The segment's id.
    pub id: SegmentId,
    /// Sequence number of the first record written into it.
    pub first_seq: u64,
    /// Total file size in bytes.
    pub segment_bytes: u32,
}

impl SegmentHeader {
    fn encode(&self) -> [u8; 44] {
        let mut h = [0u8; 44];
        h[0..8].copy_from_slice(&SEGMENT_MAGIC);
        h[8..12].copy_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&RKYV_FORMAT.to_le_bytes());
        h[16..20].copy_from_slice(&self.shard.to_le_bytes());
        h[20..24].copy_from_slice(&self.id.to_le_bytes());
        h[24..32].copy_from_slice(&self.first_seq.to_le_bytes());
        h[32..40].copy_from_slice(&u64::from(self.segment_bytes).to_le_bytes());
        let crc = crc32fast::hash(&h[0..40]);
        h[40..44].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decodes and checks a header; `path` is only used for error context.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<SegmentHeader> {
        let corrupt = |reason: &str| StateError::corrupt(path, 0, reason);
        if bytes.len() < 44 {
            return Err(corrupt("segment shorter than its header"));
        }
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err(corrupt("bad segment magic"));
        }
        let crc = u32_at(bytes, 40);
        if crc != crc32fast::hash(&bytes[0..40]) {
            return Err(corrupt("segment header CRC mismatch"));
        }
        let version = u32_at(bytes, 8);
        if version != SEGMENT_FORMAT_VERSION {
            return Err(StateError::Incompatible {
                file: path.to_owned(),
                found: version,
                expected: SEGMENT_FORMAT_VERSION,
            });
        }
        let rkyv = u32_at(bytes, 12);
        if rkyv != RKYV_FORMAT {
            return Err(StateError::Incompatible { file: path.to_owned(), found: rkyv, expected: RKYV_FORMAT });
        }
        let segment_bytes = u64_at(bytes, 32);
        let segment_bytes = u32::try_from(segment_bytes).map_err(|_| corrupt("segment size over 4 GiB"))?;
        Ok(SegmentHeader {
            shard: u32_at(bytes, 16),
            id: u32_at(bytes, 20),
            first_seq: u64_at(bytes, 24),
            segment_bytes,
        })
    }
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A mapped segment file. Only its owner (one store, one thread) writes to it, through
/// `&mut self`; reads borrow `&self`, so the borrow checker keeps readers and the writer apart.
/// Background durability work holds a [`SegmentFlusher`], which can only `msync`.
#[derive(Debug)]
pub struct Segment {
    header: SegmentHeader,
    path: PathBuf,
    map: Arc<SharedMap>,
    file: Arc<File>,
    tail: Option<OpenTail>,
}

/// Bytes of a page: the unit in which an open tail tracks what changed after it was written.
const PAGE: u32 = 4096;
/// Bytes of a cache line (of the machines weir runs on), the unit of [`Segment::prefetch_at`].
const CACHE_LINE: usize = 64;

/// The part of a segment that may still change, held in memory (see the module docs).
#[derive(Debug)]
struct OpenTail {
    /// The first byte that may change: a record boundary (the seal, or the end of the header).
    start: u32,
    /// The end of the bytes written so far.
    end: u32,
    /// `[start, written)` is in the file as it was when written, except the `dirty` pages.
    written: u32,
    /// One bit per page of the segment: changed in `[start, written)` since written out.
    dirty: Vec<u64>,
    any_dirty: bool,
    /// The page-aligned segment offset the buffer starts at: `buffer[o - base]` is byte `o`
    /// for `o` in `[start, end)` (`base <= start`).
    base: u32,
    /// Bytes of the buffer touched so far (its pages are allocated): the largest `end - base`.
    touched: u32,
    /// The segment's bytes, from `base` on.
    buffer: PrivatePages,
}

impl OpenTail {
    fn new(start: u32, segment_bytes: u32) -> Result<OpenTail> {
        let pages = segment_bytes.div_ceil(PAGE) as usize;
        Ok(OpenTail {
            start,
            end: start,
            written: start,
            dirty: vec![0; pages.div_ceil(64)],
            any_dirty: false,
            base: start / PAGE * PAGE,
            touched: 0,
            buffer: PrivatePages::anonymous(segment_bytes as usize, "segment tail")?,
        })
    }

    /// Marks the pages of `[from, to)` that were written out already as changed.
    fn mark_dirty(&mut self, from: u32, to: u32) {
        let to = to.min(self.written);
        if from >= to {
            return;
        }
        for page in from / PAGE..=(to - 1) / PAGE {
            self.dirty[page as usize / 64] |= 1 << (page % 64);
        }
        self.any_dirty = true;
    }

    /// The runs of consecutive dirty pages, as byte ranges clipped to `[start, written)`.
    fn dirty_runs(&self) -> Vec<(u32, u32)> {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        if !self.any_dirty {
            return runs;
        }
        for (word_at, &word) in self.dirty.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = word_at as u32 * 64 + bits.trailing_zeros();
                bits &= bits - 1;
                let (from, to) = ((page * PAGE).max(self.start), ((page + 1) * PAGE).min(self.written));
                match runs.last_mut() {
                    _ if from >= to => {}
                    Some(run) if run.1 == from => run.1 = to,
                    _ => runs.push((from, to)),
                }
            }
        }
        runs
    }
}

/// Bytes of a mapping whose page table entries [`SharedMap`] releases per step.
const RELEASE_STEP: usize = 2 << 20;

/// A segment's shared (`MAP_SHARED`) file mapping. Its last owner releases its page table
/// entries a step at a time before the unmap. One `munmap` of a 64 MiB segment whose pages are
/// all mapped holds the process's mmap lock for milliseconds, and every `mmap` or `munmap` of
/// another thread (a shard freeing a buffer, mapping its next segment, a restart starting its
/// threads) waits for it: dropping a failed attempt's stores stalled its restart for 15-25 ms.
/// A step holds the lock for microseconds.
#[derive(Debug)]
struct SharedMap(MmapRaw);

impl std::ops::Deref for SharedMap {
    type Target = MmapRaw;
    fn deref(&self) -> &MmapRaw {
        &self.0
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        release_in_steps(self.0.len(), |offset, len| {
            // SAFETY: `MADV_DONTNEED` on a shared file mapping drops page table entries only: a
            // later access would fault the same page cache pages back in, holding every byte
            // written through the mapping (the kernel keeps a dirty page dirty and writes it
            // back), so no content changes and no write is lost. (On a private mapping it would
            // discard the writes: `Segment::map` maps shared, and the test
            // `dropping_a_segment_keeps_unsynced_writes` would catch a private one.) Nothing
            // reads the mapping any more either: this is its last owner, being dropped.
            let _ = unsafe { self.0.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len) };
        });
    }
}

/// Calls `release(offset, len)` for consecutive steps of [`RELEASE_STEP`] bytes covering a
/// mapping of `len` bytes, for a `Drop` that releases the mapping's pages (`MADV_DONTNEED`)
/// before it is unmapped. A failed step only leaves its pages to the unmap.
pub(crate) fn release_in_steps(len: usize, mut release: impl FnMut(usize, usize)) {
    let mut offset = 0;
    while offset < len {
        let step = RELEASE_STEP.min(len - offset);
        release(offset, step);
        offset += step;
    }
}

/// Private memory, anonymous or a copy-on-write file mapping, that gives its pages back a
/// step at a time (see [`SharedMap`]) before it is unmapped. It reads as `len` bytes, which
/// may be fewer than the mapping holds (memory taken from the warm pool, [`crate::warm`]).
pub(crate) struct PrivatePages {
    map: MmapMut,
    len: usize,
    /// Anonymous memory (not a file mapping): it may go to the warm pool.
    anonymous: bool,
}

impl PrivatePages {
    /// `len` bytes of zeroed anonymous memory (pages are allocated on first touch); `what`
    /// names it in an error.
    pub(crate) fn anonymous(len: usize, what: &str) -> Result<PrivatePages> {
        let map = MmapOptions::new().len(len).map_anon().map_err(|e| StateError::io("mmap anonymous", what, e))?;
        Ok(PrivatePages { map, len, anonymous: true })
    }

    /// `len` bytes of zeroed anonymous memory, from the warm pool if it holds enough (then
    /// zeroed here, at memory speed, instead of faulted in page by page), else new.
    pub(crate) fn zeroed_warm(len: usize, what: &str) -> Result<PrivatePages> {
        match crate::warm::take(len) {
            Some(mut pages) => {
                pages.fill(0);
                Ok(pages)
            }
            None => PrivatePages::anonymous(len, what),
        }
    }

    /// `len` bytes of anonymous memory whose content the caller overwrites before reading it
    /// (a buffer to copy into): from the warm pool if it holds enough, else new (zeroed).
    pub(crate) fn scratch_warm(len: usize, what: &str) -> Result<PrivatePages> {
        match crate::warm::take(len) {
            Some(pages) => Ok(pages),
            None => PrivatePages::anonymous(len, what),
        }
    }

    /// Takes over a private (`MAP_PRIVATE`) mapping.
    #[cfg(test)]
    pub(crate) fn from_private_map(map: MmapMut) -> PrivatePages {
        let len = map.len();
        PrivatePages { map, len, anonymous: false }
    }

    /// Whether this is anonymous memory (not a copy-on-write file mapping).
    pub(crate) fn is_anonymous(&self) -> bool {
        self.anonymous
    }

    /// Bytes the mapping holds (at least [`PrivatePages::len`]).
    pub(crate) fn capacity(&self) -> usize {
        self.map.len()
    }

    /// The same memory read as `len` bytes (at most its capacity).
    pub(crate) fn with_len(mut self, len: usize) -> PrivatePages {
        self.len = len.min(self.map.len());
        self
    }

    /// Asks for huge pages for the mapping (only a hint).
    pub(crate) fn advise_huge_pages(&self) {
        let _ = self.map.advise(memmap2::Advice::HugePage);
    }

    /// Gives back the pages of `[offset, offset + len)` (`offset` page-aligned). They read as
    /// they were first mapped afterwards: zeros, or the file's bytes. A failure only keeps them.
    pub(crate) fn discard(&mut self, offset: usize, len: usize) {
        // SAFETY: `MADV_DONTNEED` on a private or anonymous mapping replaces the pages of the
        // range with their original content (zeros, or the mapped file's bytes), exactly like
        // a write of those bytes would, and `&mut self` rules out any borrow of them being
        // alive. The range is checked against the mapping by memmap2. (On a shared file
        // mapping it would not change content at all; this type never holds one.)
        let _ = unsafe { self.map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len) };
    }
}

impl std::fmt::Debug for PrivatePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivatePages({} of {} bytes)", self.len, self.map.len())
    }
}

impl std::ops::Deref for PrivatePages {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

impl std::ops::DerefMut for PrivatePages {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }
}

impl Drop for PrivatePages {
    fn drop(&mut self) {
        let len = self.map.len();
        release_in_steps(len, |offset, step| self.discard(offset, step));
    }
}

/// The memory of a closed open tail (see [`Segment::close`]): frees it when dropped.
#[derive(Debug)]
pub struct ClosedTail {
    _memory: PrivatePages,
}

impl Segment {
    /// Creates `dir/seg-<id>.log` of `segment_bytes`, fully allocated, and maps it: the
    /// store's spare segment file ([`SPARE_SEGMENT_FILE`]) if it has one of that size, else a
    /// new file. An existing file of that name (left behind past the last checkpoint) is
    /// replaced. What a spare held after the header is never read: reads stop at the data end
    /// a checkpoint recorded.
    pub fn create(dir: &Path, header: SegmentHeader) -> Result<Segment> {
        if header.segment_bytes < MIN_SEGMENT_BYTES || !header.segment_bytes.is_multiple_of(SEGMENT_HEADER_BYTES) {
            return Err(StateError::Misuse(format!(
                "segment size {} must be a multiple of {SEGMENT_HEADER_BYTES} and at least {MIN_SEGMENT_BYTES}",
                header.segment_bytes
            )));
        }
        let path = dir.join(segment_file_name(header.id));
        let spare = dir.join(SPARE_SEGMENT_FILE);
        let recycled = std::fs::metadata(&spare).is_ok_and(|m| m.len() == u64::from(header.segment_bytes))
            && std::fs::rename(&spare, &path).is_ok();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!recycled)
            .open(&path)
            .map_err(|e| StateError::io("create segment", &path, e))?;
        if !recycled {
            preallocate(&file, u64::from(header.segment_bytes), &path)?;
        }
        std::os::unix::fs::FileExt::write_all_at(&file, &header.encode(), 0)
            .map_err(|e| StateError::io("write segment header", &path, e))?;
        let mut segment = Segment::map(file, path, header)?;
        segment.open_tail(SEGMENT_HEADER_BYTES)?;
        Ok(segment)
    }

    /// Opens and maps an existing segment, checking its header, size and id.
    pub fn open(dir: &Path, id: SegmentId) -> Result<Segment> {
        let path = dir.join(segment_file_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StateError::io("open segment", &path, e))?;
        let len = file.metadata().map_err(|e| StateError::io("stat segment", &path, e))?.len();
        if len < u64::from(MIN_SEGMENT_BYTES) {
            return Err(StateError::corrupt(&path, len, "segment file is truncated"));
        }
        let mut head = [0u8; 44];
        read_exact_at(&file, &mut head, 0, &path)?;
        let header = SegmentHeader::decode(&head, &path)?;
        if u64::from(header.segment_bytes) != len {
            return Err(StateError::corrupt(
                &path,
                0,
                format!("header says {} bytes, file has {len}", header.segment_bytes),
            ));
        }
        if header.id != id {
            return Err(StateError::corrupt(&path, 0, format!("header names segment {}", header.id)));
        }
        Segment::map(file, path, header)
    }

    fn map(file: File, path: PathBuf, header: SegmentHeader) -> Result<Segment> {
        // MmapRaw is the safe constructor: it hands out raw pointers only, so the unsafety of
        // a file changing under the mapping lands in `mapped` below, where it is argued. The
        // mapping is shared (so `msync` makes ranges durable) and read-only.
        let map = MmapOptions::new()
            .len(header.segment_bytes as usize)
            .map_raw_read_only(&file)
            .map_err(|e| StateError::io("mmap segment", &path, e))?;
        Ok(Segment { header, path, map: Arc::new(SharedMap(map)), file: Arc::new(file), tail: None })
    }

    /// Opens the segment for writing from `at` on, a record boundary (the end of the data a
    /// checkpoint sealed): appends and in-place rewrites go to an open tail in memory from
    /// there (see the module docs). Whatever the file holds after `at` is overwritten.
    pub fn open_tail(&mut self, at: u32) -> Result<()> {
        if at < SEGMENT_HEADER_BYTES || at > self.len() || !at.is_multiple_of(16) {
            return Err(StateError::Misuse(format!("cannot open segment {} for writing at {at}", self.id())));
        }
        self.tail = Some(OpenTail::new(at, self.len())?);
        Ok(())
    }

    /// The segment's header.
    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    /// The segment's id.
    pub fn id(&self) -> SegmentId {
        self.header.id
    }

    /// The segment file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the segment in bytes.
    pub fn len(&self) -> u32 {
        self.header.segment_bytes
    }

    /// Always false: a segment has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Starts reading `[from, to)` of the file into memory in the background
    /// (`madvise(MADV_WILLNEED)`), for a caller about to read all of it: a restore's replay.
    /// Pages the machine evicted since they were written would otherwise come back one fault
    /// at a time (the kernel reads 128 KiB around each), with the reader waiting for each.
    /// Only a hint: a failure changes nothing but the speed.
    pub fn prefetch(&self, from: u32, to: u32) {
        let (from, to) = (from / PAGE * PAGE, to.min(self.len()));
        if from < to {
            let _ = self.map.advise_range(Advice::WillNeed, from as usize, (to - from) as usize);
        }
    }

    /// Starts loading the cache lines of the bytes `[offset, offset + len)` (clipped as
    /// [`Segment::data`] clips them), for a caller about to read them: a hint, which does
    /// nothing for a page not mapped yet. Any offset is fine: the bytes come from the bounds-
    /// checked `data`, so an address read from an unchecked index slot never reads outside the
    /// segment.
    pub fn prefetch_at(&self, offset: u32, len: u32) {
        let bytes = self.data(offset, offset.saturating_add(len));
        let mut at = 0;
        while at < bytes.len() {
            prefetch_index::prefetch_index(bytes, at);
            // On to the start of the next line (`bytes` may start inside one).
            at += CACHE_LINE - (bytes.as_ptr() as usize + at) % CACHE_LINE;
        }
    }

    /// The whole mapped segment, as the file holds it.
    fn mapped(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes long and stays mapped while `self.map` (an Arc
        // we hold) lives. The file is created at its final size, owned by this store, and never
        // truncated by weir; another process truncating it would be outside our contract (the
        // documented SIGBUS hazard of any file mapping). The file is only written by
        // `write_out(&mut self)` (and `create`, before the mapping exists), so no write can
        // overlap the lifetime of this shared borrow.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }

    /// The segment's bytes `[from, to)`, clipped to where they are held: from the open tail
    /// when `from` lies in it (up to the end written), otherwise from the mapping up to the
    /// open tail's start. (A record never spans the start: it is a record boundary.)
    pub fn data(&self, from: u32, to: u32) -> &[u8] {
        match &self.tail {
            Some(tail) if from >= tail.start => {
                let from = from.min(tail.end);
                &tail.buffer[(from - tail.base) as usize..(to.clamp(from, tail.end) - tail.base) as usize]
            }
            tail => {
                let limit = tail.as_ref().map_or(self.len(), |t| t.start);
                let from = from.min(limit);
                &self.mapped()[from as usize..to.clamp(from, limit) as usize]
            }
        }
    }

    /// Closes the segment for writing for good (it is full): writes out what is left of the
    /// open tail, after which everything is read through the mapping. Returns the tail's
    /// memory, for the caller to free on a thread that may wait (giving back tens of MiB of
    /// touched pages takes milliseconds). On an error nothing is closed.
    pub fn close(&mut self) -> Result<Option<ClosedTail>> {
        self.write_out(u32::MAX)?;
        Ok(self.tail.take().map(|tail| ClosedTail { _memory: tail.buffer }))
    }

    /// Whether `offset` lies in the open tail, where it may be written.
    pub fn is_writable(&self, offset: u32) -> bool {
        self.tail.as_ref().is_some_and(|t| offset >= t.start)
    }

    /// Copies `src` into the segment at `offset`. Panics as [`Segment::slice_mut`] does.
    pub fn write(&mut self, offset: u32, src: &[u8]) {
        self.slice_mut(offset, src.len() as u32).copy_from_slice(src);
    }

    /// The bytes `[offset, offset + len)` of the open tail, for writing in place; what they
    /// hold is in the file once [`Segment::write_out`] returns `Ok`. Panics if the range is
    /// not in the open tail: callers compute offsets from their own bookkeeping, so that is a
    /// bug, never bad input.
    pub fn slice_mut(&mut self, offset: u32, len: u32) -> &mut [u8] {
        let end = offset as usize + len as usize;
        let size = self.len() as usize;
        let Some(tail) = self.tail.as_mut() else {
            panic!("segment {} is sealed: no write at {offset}", self.header.id);
        };
        assert!(end <= size, "segment write {offset}+{len} beyond {size}");
        assert!(offset >= tail.start, "segment write at {offset} before its open tail at {}", tail.start);
        tail.mark_dirty(offset, end as u32);
        tail.end = tail.end.max(end as u32);
        tail.touched = tail.touched.max(end as u32 - tail.base);
        &mut tail.buffer[(offset - tail.base) as usize..end - tail.base as usize]
    }

    /// Writes what changed in the open tail before `upto` into the file (`pwrite`): pages
    /// rewritten since they were written out, then what was never written. It is in the page
    /// cache, and read through the mapping after a [`Segment::seal`], once this returns `Ok`;
    /// after an error the open tail still holds every byte and the next call writes it again.
    pub fn write_out(&mut self, upto: u32) -> Result<()> {
        let Some(tail) = self.tail.as_mut() else { return Ok(()) };
        for (from, to) in tail.dirty_runs() {
            let buffer = &tail.buffer[(from - tail.base) as usize..(to - tail.base) as usize];
            write_all_at(&self.file, buffer, u64::from(from), &self.path)?;
        }
        if tail.any_dirty {
            tail.dirty.fill(0);
            tail.any_dirty = false;
        }
        self.write_ahead(upto)
    }

    /// Writes only what was never written of the open tail before `upto` (see
    /// [`Segment::write_out`]), not the pages rewritten since: between checkpoints, pages of
    /// hot keys change again and again, and the seal writes them once.
    pub fn write_ahead(&mut self, upto: u32) -> Result<()> {
        let Some(tail) = self.tail.as_mut() else { return Ok(()) };
        let upto = upto.min(tail.end);
        if upto > tail.written {
            let (from, to) = ((tail.written - tail.base) as usize, (upto - tail.base) as usize);
            write_all_at(&self.file, &tail.buffer[from..to], u64::from(tail.written), &self.path)?;
            tail.written = upto;
        }
        Ok(())
    }

    /// Seals the open tail at its end, for a checkpoint: writes out what is left, then reads
    /// of everything before the end go through the mapping, and further writes go after the
    /// end, into the buffer from its start again. On an error nothing is sealed (see
    /// [`Segment::write_out`]).
    pub fn seal(&mut self) -> Result<()> {
        self.write_out(u32::MAX)?;
        let Some(tail) = self.tail.as_mut() else { return Ok(()) };
        let used = tail.end - tail.base;
        tail.start = tail.end;
        // Nothing before the new start is read from the buffer again (reads go through the
        // mapping, writes come after it), so the buffer starts over at the start's page (the
        // same offsets within a page: records stay aligned as in the file).
        tail.base = tail.start / PAGE * PAGE;
        // Pages touched well beyond what an interval uses (a bulk load before the first
        // checkpoint) are given back, once.
        let keep = (2 * used as usize).max(RELEASE_STEP).next_multiple_of(RELEASE_STEP);
        if tail.touched as usize > 2 * keep {
            let touched = (tail.touched as usize).next_multiple_of(PAGE as usize).min(tail.buffer.len());
            tail.buffer.discard(keep, touched - keep);
            tail.touched = keep as u32;
        }
        Ok(())
    }

    /// A handle that can make ranges of this segment durable from another thread.
    pub fn flusher(&self) -> SegmentFlusher {
        SegmentFlusher { map: Arc::clone(&self.map), file: Arc::clone(&self.file), path: self.path.clone() }
    }
}

/// Makes ranges of a segment durable (`msync(MS_SYNC)`); cheap to clone, `Send`, keeps the
/// mapping alive until the flush is done.
#[derive(Debug, Clone)]
pub struct SegmentFlusher {
    map: Arc<SharedMap>,
    file: Arc<File>,
    path: PathBuf,
}

impl SegmentFlusher {
    /// Writes back `[offset, offset + len)` and waits until it is on disk.
    pub fn flush_range(&self, offset: u32, len: u32) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.map.flush_range(offset as usize, len as usize).map_err(|e| StateError::io("msync", &self.path, e))
    }

    /// Starts writing back `[offset, offset + len)` without waiting for it, and without the
    /// journal commit and device cache flush a sync costs: a later [`SegmentFlusher::flush_range`]
    /// then has little left to do. Uses `posix_fadvise(DONTNEED)`, which on Linux starts
    /// writeback of the range's dirty pages; it cannot drop them, as they stay mapped.
    pub fn start_writeback(&self, offset: u32, len: u32) -> Result<()> {
        let Some(len) = std::num::NonZeroU64::new(u64::from(len)) else { return Ok(()) };
        rustix::fs::fadvise(&*self.file, u64::from(offset), Some(len), rustix::fs::Advice::DontNeed)
            .map_err(|e| StateError::io("fadvise", &self.path, e.into()))
    }

    /// `fsync` of the file: makes its allocation (metadata) durable; used once for new segments.
    pub fn sync_file(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| StateError::io("fsync segment", &self.path, e))
    }

    /// The segment's path, for error context.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Allocates every block of `file` up to `len`. Uses `fallocate`; where the file system does
/// not support it, writes zeros, which allocates as well. Never leaves a hole.
fn preallocate(file: &File, len: u64, path: &Path) -> Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
            use std::os::unix::fs::FileExt;
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at).map_err(|e| StateError::io("zero-fill segment", path, e))?;
                at += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(StateError::io("fallocate", path, e.into())),
    }
}

fn write_all_at(file: &File, buf: &[u8], at: u64, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    crate::faults::check("state::write_segment", path)?;
    file.write_all_at(buf, at).map_err(|e| StateError::io("write", path, e))
}

pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], at: u64, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, at).map_err(|e| StateError::io("read", path, e))
}

/// fsyncs a directory, so that a file created or renamed in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StateError::io("fsync dir", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: SegmentId) -> SegmentHeader {
        SegmentHeader { shard: 3, id, first_seq: 99, segment_bytes: 64 * 1024 }
    }

    #[test]
    fn create_write_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), header(1)).unwrap();
        seg.write(4096, b"hello");
        seg.write_out(u32::MAX).unwrap();
        seg.flusher().flush_range(4096, 5).unwrap();
        drop(seg);
        let seg = Segment::open(dir.path(), 1).unwrap();
        assert_eq!(seg.header(), &header(1));
        assert_eq!(seg.data(4096, 4101), b"hello");
    }

    fn file_bytes(path: &Path, at: usize, len: usize) -> Vec<u8> {
        std::fs::read(path).unwrap()[at..at + len].to_vec()
    }

    /// The open tail is read from memory until it is sealed, and reaches the file only when
    /// written out: whole, then the pages rewritten in place since, and nothing twice.
    #[test]
    fn the_open_tail_reaches_the_file_when_written_out_and_is_read_from_the_mapping_once_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), header(1)).unwrap();
        seg.write(4096, &[1; 32]);
        seg.write(12288, &[2; 32]);
        assert_eq!(seg.data(4096, 4128), &[1; 32]);
        assert_eq!(seg.data(4096, 1 << 20).len(), 12288 + 32 - 4096, "clipped to the end written");
        assert_eq!(file_bytes(seg.path(), 4096, 4), [0; 4], "not written out yet");
        seg.write_out(8192).unwrap();
        assert_eq!(file_bytes(seg.path(), 4096, 4), [1; 4]);
        assert_eq!(file_bytes(seg.path(), 12288, 4), [0; 4], "past `upto`");
        // A rewrite of a page written out already marks it; only that page is written again.
        seg.write(4100, &[3; 4]);
        assert_eq!(seg.data(4096, 4104), &[1, 1, 1, 1, 3, 3, 3, 3]);
        seg.write_ahead(8192).unwrap();
        assert_eq!(file_bytes(seg.path(), 4100, 4), [1; 4], "write-ahead leaves rewritten pages to the seal");
        seg.seal().unwrap();
        assert_eq!(file_bytes(seg.path(), 4096, 8), [1, 1, 1, 1, 3, 3, 3, 3]);
        assert_eq!(file_bytes(seg.path(), 12288, 4), [2; 4]);
        // Sealed: reads of what came before the seal go through the mapping, writes go on after it.
        assert!(!seg.is_writable(4096) && seg.is_writable(12288 + 32));
        assert_eq!(seg.data(4096, 20000).len(), 12288 + 32 - 4096, "the mapping up to the seal");
        seg.write(12288 + 32, &[4; 16]);
        assert_eq!(seg.data(12288 + 32, 20000), &[4; 16]);
        assert_eq!(seg.data(12288, 12288 + 4), &[2; 4]);
    }

    /// After a seal the buffer is reused from its start: reads of the bytes before the seal
    /// must go to the mapping, or they would see what was written after it.
    #[test]
    fn bytes_before_the_seal_are_read_from_the_file_once_the_buffer_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let header = SegmentHeader { segment_bytes: 2 * RELEASE_STEP as u32 + 8192, ..header(1) };
        let mut seg = Segment::create(dir.path(), header).unwrap();
        let data: Vec<u8> = (0..RELEASE_STEP / 2).map(|i| (i % 251) as u8 + 1).collect();
        let (first, second) = (4096u32, 4096 + data.len() as u32 + 48);
        seg.write(first, &data);
        seg.write(second - 48, &[7; 48]);
        seg.seal().unwrap();
        assert_eq!(seg.tail.as_ref().unwrap().base, second / PAGE * PAGE);
        // Lands where `data` was in the buffer.
        let after: Vec<u8> = data.iter().map(|b| b.wrapping_mul(3) ^ 0x55).collect();
        seg.write(second, &after);
        assert_eq!(seg.data(first, first + data.len() as u32), &data[..]);
        assert_eq!(seg.data(second, second + after.len() as u32), &after[..]);
        // In-place rewrites after the rebase reach the file at their own offsets.
        seg.write(second + 100, &[9; 8]);
        seg.seal().unwrap();
        assert_eq!(
            file_bytes(seg.path(), second as usize + 96, 16),
            [&after[96..100], &[9; 8], &after[108..112]].concat()
        );
        assert_eq!(file_bytes(seg.path(), first as usize, 64), data[..64]);
        seg.close().unwrap();
        assert_eq!(seg.data(first, first + data.len() as u32), &data[..]);
    }

    /// A large first interval (a bulk load) leaves many pages touched; the seal gives back
    /// those beyond twice what the interval used, rounded to a step, once.
    #[test]
    fn pages_touched_far_beyond_an_interval_are_given_back_at_the_seal() {
        let dir = tempfile::tempdir().unwrap();
        let header = SegmentHeader { segment_bytes: 12 * RELEASE_STEP as u32, ..header(1) };
        let mut seg = Segment::create(dir.path(), header).unwrap();
        seg.write(4096, &vec![1; 9 * RELEASE_STEP]);
        seg.seal().unwrap();
        let touched = seg.tail.as_ref().unwrap().touched as usize;
        assert!(touched >= 9 * RELEASE_STEP, "a big interval's pages are kept for the next: {touched}");
        let at = 4096 + 9 * RELEASE_STEP as u32;
        seg.write(at, &[2; 4096]);
        seg.seal().unwrap();
        assert_eq!(seg.tail.as_ref().unwrap().touched as usize, RELEASE_STEP);
        seg.write(at + 4096, &[3; 64]);
        assert_eq!(seg.data(at, at + 4096), &[2; 4096]);
        assert_eq!(seg.data(at + 4096, at + 4160), &[3; 64]);
    }

    #[test]
    #[should_panic(expected = "before its open tail")]
    fn a_write_before_the_seal_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), header(1)).unwrap();
        seg.write(4096, &[1; 32]);
        seg.seal().unwrap();
        seg.write(4096, &[2; 4]);
    }

    /// Dropping a segment releases its pages before the unmap (see `SharedMap`); what was
    /// written out and never synced must still be in the file.
    #[test]
    fn dropping_a_segment_keeps_unsynced_writes() {
        let dir = tempfile::tempdir().unwrap();
        let header = SegmentHeader { segment_bytes: 3 * RELEASE_STEP as u32 + 4096, ..header(1) };
        let mut seg = Segment::create(dir.path(), header).unwrap();
        let flusher = seg.flusher();
        let at = [4096, RELEASE_STEP as u32 - 2, 2 * RELEASE_STEP as u32 + 100, 3 * RELEASE_STEP as u32 + 4000];
        for (n, &offset) in at.iter().enumerate() {
            seg.write(offset, &[n as u8 + 1; 5]);
        }
        seg.close().unwrap();
        // Pages read through the mapping are mapped; they must survive the release too.
        for &offset in &at {
            std::hint::black_box(seg.data(offset, offset + 5));
        }
        // The flusher's share keeps the mapping: its pages are released when the last goes.
        drop(seg);
        drop(flusher);
        let seg = Segment::open(dir.path(), 1).unwrap();
        for (n, &offset) in at.iter().enumerate() {
            assert_eq!(seg.data(offset, offset + 5), &[n as u8 + 1; 5]);
        }
        assert_eq!(file_bytes(seg.path(), at[3] as usize, 5), [4; 5]);
    }

    #[test]
    fn a_prefetched_range_reads_back_unchanged_and_out_of_range_bounds_are_clamped() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = 8u32 << 20;
        let mut seg = Segment::create(dir.path(), SegmentHeader { segment_bytes: bytes + 4096, ..header(1) }).unwrap();
        let fill = |page: u32| [(page % 251) as u8 + 1; 4096];
        for page in 0..bytes / 4096 {
            seg.write(4096 + page * 4096, &fill(page));
        }
        seg.close().unwrap();
        seg.flusher().sync_file().unwrap();
        drop(seg);
        // Out of the page cache, so that the hint has something to read back.
        let file = File::open(dir.path().join(segment_file_name(1))).unwrap();
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let seg = Segment::open(dir.path(), 1).unwrap();
        // Unaligned, past the end, empty and reversed: clamped or ignored, never an error.
        seg.prefetch(4000, u32::MAX);
        seg.prefetch(5000, 5000);
        seg.prefetch(9000, 100);
        for page in 0..bytes / 4096 {
            let at = 4096 + page * 4096;
            assert_eq!(seg.data(at, at + 4096), &fill(page), "page {page}");
        }
    }

    /// `prefetch_at` takes any offset and length (an address from an index slot not checked
    /// yet): in the mapping, in the open tail, past the bytes written, past the end.
    #[test]
    fn prefetching_at_any_offset_stays_in_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), header(1)).unwrap();
        seg.write(4096, &[9; 300]);
        let size = seg.len();
        let offsets = [0, 1, 63, 4096, 4100, 4396, 8191, size - 1, size, size + 1, u32::MAX - 64, u32::MAX];
        let lengths = [0, 1, 64, 128, 4096, size, u32::MAX];
        let probe = |seg: &Segment| {
            for &offset in &offsets {
                for &len in &lengths {
                    seg.prefetch_at(offset, len);
                }
            }
        };
        probe(&seg);
        seg.write_out(u32::MAX).unwrap();
        seg.seal().unwrap();
        probe(&seg);
        seg.close().unwrap();
        probe(&seg);
        assert_eq!(seg.data(4096, 4396), &[9; 300]);
    }

    #[test]
    fn file_is_fully_allocated_not_sparse() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let seg = Segment::create(dir.path(), header(1)).unwrap();
        let meta = std::fs::metadata(seg.path()).unwrap();
        assert_eq!(meta.len(), 64 * 1024);
        assert!(meta.blocks() * 512 >= meta.len(), "segment has holes: {} blocks", meta.blocks());
    }

    #[test]
    fn damaged_headers_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        drop(Segment::create(dir.path(), header(1)).unwrap());
        let path = dir.path().join(segment_file_name(1));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[17] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = Segment::open(dir.path(), 1).unwrap_err();
        assert_eq!(err.class(), crate::ErrorClass::Corruption, "{err}");
        std::fs::write(&path, &bytes[..100]).unwrap();
        assert_eq!(Segment::open(dir.path(), 1).unwrap_err().class(), crate::ErrorClass::Corruption);
        // A segment opened under the wrong id is not silently accepted either.
        drop(Segment::create(dir.path(), header(2)).unwrap());
        std::fs::rename(dir.path().join(segment_file_name(2)), dir.path().join(segment_file_name(5))).unwrap();
        assert_eq!(Segment::open(dir.path(), 5).unwrap_err().class(), crate::ErrorClass::Corruption);
    }

    #[test]
    #[should_panic(expected = "beyond")]
    fn out_of_bounds_write_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), header(1)).unwrap();
        seg.write(64 * 1024 - 2, b"abc");
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("seg-x.log"), None);
    }
}
