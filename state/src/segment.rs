//! Segment files: fixed-size, fully preallocated, memory-mapped log files.
//!
//! A segment is created at its final size with `fallocate` (never a sparse `set_len`: writing
//! through a mapping into a hole on a full disk raises SIGBUS instead of returning ENOSPC) and
//! mapped once. It never shrinks or grows while mapped, so the mapping never moves and no
//! reference into it is ever invalidated by the store itself.
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

use memmap2::{MmapOptions, MmapRaw, UncheckedAdvice};

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

impl Segment {
    /// Creates `dir/seg-<id>.log` of `segment_bytes`, fully allocated, and maps it.
    /// An existing file of that name (left behind past the last checkpoint) is replaced.
    pub fn create(dir: &Path, header: SegmentHeader) -> Result<Segment> {
        if header.segment_bytes < MIN_SEGMENT_BYTES || !header.segment_bytes.is_multiple_of(SEGMENT_HEADER_BYTES) {
            return Err(StateError::Misuse(format!(
                "segment size {} must be a multiple of {SEGMENT_HEADER_BYTES} and at least {MIN_SEGMENT_BYTES}",
                header.segment_bytes
            )));
        }
        let path = dir.join(segment_file_name(header.id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| StateError::io("create segment", &path, e))?;
        preallocate(&file, u64::from(header.segment_bytes), &path)?;
        let mut segment = Segment::map(file, path, header)?;
        segment.write(0, &header.encode());
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
        // a file changing under the mapping lands in `bytes`/`write` below, where it is argued.
        let map = MmapOptions::new()
            .len(header.segment_bytes as usize)
            .map_raw(&file)
            .map_err(|e| StateError::io("mmap segment", &path, e))?;
        Ok(Segment { header, path, map: Arc::new(SharedMap(map)), file: Arc::new(file) })
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

    /// The whole mapped segment.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes long and stays mapped while `self.map` (an Arc
        // we hold) lives. The file is created at its final size, owned by this store, and never
        // truncated by weir; another process truncating it would be outside our contract (the
        // documented SIGBUS hazard of any file mapping). Writes go through `write(&mut self)`,
        // so no write can overlap the lifetime of this shared borrow.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }

    /// Copies `src` into the segment at `offset`. Panics if the range is out of bounds: callers
    /// compute offsets from their own bookkeeping, so this is a bug, never bad input.
    pub fn write(&mut self, offset: u32, src: &[u8]) {
        self.slice_mut(offset, src.len() as u32).copy_from_slice(src);
    }

    /// The bytes `[offset, offset + len)` for writing in place. Panics if out of bounds.
    pub fn slice_mut(&mut self, offset: u32, len: u32) -> &mut [u8] {
        let end = offset as usize + len as usize;
        assert!(end <= self.map.len(), "segment write {offset}+{len} beyond {}", self.map.len());
        // SAFETY: the range is inside the mapping (asserted above), which stays mapped while
        // `self.map` lives, and is writable (MmapRaw of a file opened read-write). `&mut self`
        // guarantees that no shared borrow from `bytes()` is alive for the returned lifetime,
        // and flushers only msync, which reads but never writes user memory.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(offset as usize), len as usize) }
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
        seg.flusher().flush_range(4096, 5).unwrap();
        drop(seg);
        let seg = Segment::open(dir.path(), 1).unwrap();
        assert_eq!(seg.header(), &header(1));
        assert_eq!(&seg.bytes()[4096..4101], b"hello");
    }

    /// Dropping a segment releases its pages before the unmap (see `SharedMap`); what was
    /// written through the mapping and never synced must still be in the file.
    #[test]
    fn dropping_a_segment_keeps_unsynced_writes() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let header = SegmentHeader { segment_bytes: 3 * RELEASE_STEP as u32 + 4096, ..header(1) };
        let mut seg = Segment::create(dir.path(), header).unwrap();
        let flusher = seg.flusher();
        let at = [4096, RELEASE_STEP as u32 - 2, 2 * RELEASE_STEP as u32 + 100, 3 * RELEASE_STEP as u32 + 4000];
        for (n, &offset) in at.iter().enumerate() {
            seg.write(offset, &[n as u8 + 1; 5]);
        }
        // The flusher's share keeps the mapping: its pages are released when the last goes.
        drop(seg);
        drop(flusher);
        let seg = Segment::open(dir.path(), 1).unwrap();
        for (n, &offset) in at.iter().enumerate() {
            assert_eq!(&seg.bytes()[offset as usize..offset as usize + 5], &[n as u8 + 1; 5]);
        }
        let mut file = Vec::new();
        File::open(seg.path()).unwrap().read_to_end(&mut file).unwrap();
        assert_eq!(&file[at[3] as usize..at[3] as usize + 5], &[4; 5]);
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
