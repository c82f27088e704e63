//! The warm pool: large anonymous buffers that stores being dropped hand over
//! ([`crate::StateStore::retire`]), kept a short while for the stores restored next to use
//! instead of new memory.
//!
//! Memory a process touches for the first time is not always cheap. On a virtual machine that
//! gives freed memory back to its host (virtio-balloon free page reporting, on here with
//! `page_reporting_order` 9 and no delay), a page touched again is faulted in from the host
//! at 0.4-0.7 GB/s instead of about 10 GB/s for memory the process still holds. A restore's
//! index delta (8-32 MiB) took 0.6-9 ms to touch in most restores and 15-41 ms in 4 of 10
//! (a temporary timer in `weir-bench recovery --state-mib 1024`), which made one shard's
//! replay up to twice as long as the other's. An in-process restart drops the failed attempt's
//! stores just before it restores the same stores again: their index tables and snapshot
//! buffers, handed over here, become the restore's delta, zeroed at memory speed (and its
//! first snapshot buffer, should the pool still hold one then: in the traced 1 GiB restores
//! it no longer did, as that snapshot starts once the delta is folded).
//!
//! A store also hands over the slots of its newest index snapshot, as written to its file
//! (see [`crate::StoreConfig::resident_index_snapshot`]), tagged with the file's path and
//! header: a restore of that very file then takes them as its table, which needs no read of
//! the file at all ([`take_snapshot`]). Other requests never take a tagged entry.
//!
//! The pool holds an entry for [`HOLD`] at most and [`MAX_HELD_BYTES`] in all; [`expire`]
//! hands out the older entries for the caller to drop (the runtime's reaper calls it, as
//! freeing mapped memory takes milliseconds that no shard should spend).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::segment::PrivatePages;

/// How long the pool keeps an entry: long enough for a restart (without a configured delay)
/// to restore its stores.
pub const HOLD: Duration = Duration::from_secs(2);

/// The most bytes the pool holds.
pub const MAX_HELD_BYTES: usize = 2 << 30;

/// Requests smaller than this are served with new memory: touching it costs little, and an
/// entry is better kept for a large one.
const MIN_TAKE_BYTES: usize = 1 << 20;

/// An entry serves a request of at least this fraction of its size: the rest of it stays with
/// the buffer, unused, as long as the buffer lives (a restore's delta: until it is folded).
const MAX_WASTE_FACTOR: usize = 8;

static POOL: Mutex<Pool> = Mutex::new(Pool { entries: Vec::new(), held: 0 });

/// Hands `pages` to the pool. Returns them when the pool does not take them (a file mapping,
/// or the pool is full), for the caller to drop.
/// Entries held past [`HOLD`] are freed first, on the caller's thread (the runtime's reaper
/// normally frees them before that).
pub(crate) fn give(pages: PrivatePages) -> Option<PrivatePages> {
    let now = Instant::now();
    let Ok(mut pool) = POOL.lock() else { return Some(pages) };
    let expired = pool.expire(now);
    let refused = pool.give(pages, now);
    drop(pool);
    drop(expired);
    refused
}

/// Hands the slots of an index snapshot to the pool, tagged with the file they were written
/// to and its header (the bytes before the slots): for [`take_snapshot`] only. Returns them
/// when the pool does not take them, as [`give`] does.
pub(crate) fn give_snapshot(path: PathBuf, header: Vec<u8>, pages: PrivatePages) -> Option<PrivatePages> {
    let now = Instant::now();
    let Ok(mut pool) = POOL.lock() else { return Some(pages) };
    let expired = pool.expire(now);
    let refused = pool.give_tagged(pages, Some(Tag { path, header }), now);
    drop(pool);
    drop(expired);
    refused
}

/// Takes the slots of the index snapshot at `path` whose file starts with `head` (its first
/// bytes, header included) and holds `chunk_crcs` (its chunk CRC table, unpadded), if the
/// pool holds them: the same bytes as the file's slots, as written from them.
pub(crate) fn take_snapshot(path: &Path, head: &[u8], chunk_crcs: &[u8]) -> Option<PrivatePages> {
    let now = Instant::now();
    let mut pool = POOL.lock().ok()?;
    let expired = pool.expire(now);
    let taken = pool.take_tagged(path, head, chunk_crcs);
    drop(pool);
    drop(expired);
    taken
}

/// Whether the pool holds the slots of the index snapshot at `path`.
#[cfg(test)]
pub(crate) fn holds_snapshot(path: &Path) -> bool {
    POOL.lock().is_ok_and(|pool| pool.entries.iter().any(|e| e.tag.as_ref().is_some_and(|t| t.path == path)))
}

/// Takes a buffer of at least `len` bytes from the pool (read as `len` bytes; its content is
/// whatever its last owner left), if it holds a fitting one. Entries held past [`HOLD`] are
/// freed first, as by [`give`].
pub(crate) fn take(len: usize) -> Option<PrivatePages> {
    let now = Instant::now();
    let mut pool = POOL.lock().ok()?;
    let expired = pool.expire(now);
    let taken = pool.take(len);
    drop(pool);
    drop(expired);
    taken
}

/// Bytes the pool holds.
pub fn held_bytes() -> usize {
    POOL.lock().map_or(0, |pool| pool.held)
}

/// Removes the entries held for longer than [`HOLD`] and returns them, freed when the result
/// is dropped.
pub fn expire() -> WarmMemory {
    match POOL.lock() {
        Ok(mut pool) => WarmMemory(pool.expire(Instant::now())),
        Err(_) => WarmMemory(Vec::new()),
    }
}

/// Buffers out of the pool ([`expire`]); dropping this frees them.
#[derive(Debug, Default)]
pub struct WarmMemory(Vec<PrivatePages>);

impl WarmMemory {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.0.iter().map(|p| p.capacity()).sum()
    }
}

#[derive(Debug)]
struct Entry {
    pages: PrivatePages,
    given: Instant,
    /// For the slots of an index snapshot: the file and its header.
    tag: Option<Tag>,
}

/// What identifies the index snapshot file an entry holds the slots of.
#[derive(Debug)]
struct Tag {
    path: PathBuf,
    /// The file's bytes before the slots: the header page and the chunk CRC table.
    header: Vec<u8>,
}

#[derive(Debug)]
struct Pool {
    entries: Vec<Entry>,
    held: usize,
}

impl Pool {
    fn give(&mut self, pages: PrivatePages, now: Instant) -> Option<PrivatePages> {
        self.give_tagged(pages, None, now)
    }

    fn give_tagged(&mut self, pages: PrivatePages, tag: Option<Tag>, now: Instant) -> Option<PrivatePages> {
        if !pages.is_anonymous() || pages.capacity() < MIN_TAKE_BYTES || self.held + pages.capacity() > MAX_HELD_BYTES {
            return Some(pages);
        }
        self.held += pages.capacity();
        self.entries.push(Entry { pages, given: now, tag });
        None
    }

    fn take_tagged(&mut self, path: &Path, head: &[u8], chunk_crcs: &[u8]) -> Option<PrivatePages> {
        let at = self.entries.iter().position(|e| {
            e.tag.as_ref().is_some_and(|t| {
                let table = t.header.get(crate::index::HEADER_PAGE..).unwrap_or_default();
                t.path == path && t.header.starts_with(head) && table.starts_with(chunk_crcs)
            })
        })?;
        let entry = self.entries.swap_remove(at);
        self.held -= entry.pages.capacity();
        Some(entry.pages)
    }

    /// The smallest entry that fits, if it is not too large for `len`.
    fn take(&mut self, len: usize) -> Option<PrivatePages> {
        if len < MIN_TAKE_BYTES {
            return None;
        }
        let (at, _) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.tag.is_none())
            .filter(|(_, e)| (len..=len.saturating_mul(MAX_WASTE_FACTOR)).contains(&e.pages.capacity()))
            .min_by_key(|(_, e)| e.pages.capacity())?;
        let entry = self.entries.swap_remove(at);
        self.held -= entry.pages.capacity();
        Some(entry.pages.with_len(len))
    }

    fn expire(&mut self, now: Instant) -> Vec<PrivatePages> {
        let (old, kept): (Vec<Entry>, Vec<Entry>) =
            std::mem::take(&mut self.entries).into_iter().partition(|e| now.duration_since(e.given) >= HOLD);
        self.entries = kept;
        self.held = self.entries.iter().map(|e| e.pages.capacity()).sum();
        old.into_iter().map(|e| e.pages).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        Pool { entries: Vec::new(), held: 0 }
    }

    fn pages(len: usize, byte: u8) -> PrivatePages {
        let mut pages = PrivatePages::anonymous(len, "test").unwrap();
        pages.fill(byte);
        pages
    }

    #[test]
    fn a_request_gets_the_smallest_entry_that_fits_with_its_content() {
        let mut pool = pool();
        let now = Instant::now();
        assert!(pool.give(pages(8 << 20, 1), now).is_none());
        assert!(pool.give(pages(2 << 20, 2), now).is_none());
        assert_eq!(pool.held, 10 << 20);
        // Too small for the request, then too small a request for what is left.
        assert!(pool.take(9 << 20).is_none());
        assert!(pool.take(1 << 19).is_none(), "small requests take new memory");
        let taken = pool.take(3 << 20).unwrap();
        assert_eq!((taken.len(), taken.capacity()), (3 << 20, 8 << 20));
        assert!(taken.iter().all(|b| *b == 1), "the memory is the entry's, as its last owner left it");
        assert!(pool.take(1 << 20).is_some_and(|p| p.iter().all(|b| *b == 2)));
        assert_eq!(pool.held, 0);
        assert!(pool.take(1 << 20).is_none());
    }

    #[test]
    fn the_slots_of_a_snapshot_go_only_to_the_restore_of_that_file() {
        let mut pool = pool();
        let now = Instant::now();
        let mut header = vec![0u8; crate::index::HEADER_PAGE + 4096];
        header[..4].copy_from_slice(b"head");
        header[crate::index::HEADER_PAGE..][..8].copy_from_slice(b"crcs1234");
        let tag = |path: &str| Some(Tag { path: PathBuf::from(path), header: header.clone() });
        assert!(pool.give_tagged(pages(2 << 20, 7), tag("/a/index-1.idx"), now).is_none());
        assert!(pool.take(2 << 20).is_none(), "never to a request for any memory");
        assert!(pool.take_tagged(Path::new("/b/index-1.idx"), b"head", b"crcs1234").is_none(), "another file");
        assert!(pool.take_tagged(Path::new("/a/index-1.idx"), b"hexd", b"crcs1234").is_none(), "another header");
        assert!(pool.take_tagged(Path::new("/a/index-1.idx"), b"head", b"crcs1235").is_none(), "other chunks");
        let taken = pool.take_tagged(Path::new("/a/index-1.idx"), b"head", b"crcs1234").unwrap();
        assert!(taken.iter().all(|b| *b == 7));
        assert_eq!(pool.held, 0);
        assert!(pool.give_tagged(pages(2 << 20, 7), tag("/a/index-1.idx"), now).is_none());
        assert_eq!(pool.expire(now + HOLD).len(), 1, "held as long as any entry");
    }

    #[test]
    fn an_entry_far_larger_than_the_request_stays() {
        let mut pool = pool();
        assert!(pool.give(pages(32 << 20, 1), Instant::now()).is_none());
        assert!(pool.take(2 << 20).is_none());
        assert!(pool.take(4 << 20).is_some());
    }

    #[test]
    fn file_mappings_and_entries_past_the_limit_are_refused() {
        let mut pool = pool();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a private mapping of a file only this test knows.
        let map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }.unwrap();
        assert!(pool.give(PrivatePages::from_private_map(map), Instant::now()).is_some());
        pool.held = MAX_HELD_BYTES - (1 << 20);
        assert!(pool.give(pages(2 << 20, 0), Instant::now()).is_some());
        assert!(pool.give(pages(1 << 20, 0), Instant::now()).is_none());
    }

    #[test]
    fn entries_expire_after_the_hold() {
        let mut pool = pool();
        let start = Instant::now();
        assert!(pool.give(pages(2 << 20, 0), start).is_none());
        assert!(pool.give(pages(4 << 20, 0), start + HOLD / 2).is_none());
        assert!(pool.expire(start + HOLD / 4).is_empty());
        let old = pool.expire(start + HOLD);
        assert_eq!(old.iter().map(|p| p.capacity()).collect::<Vec<_>>(), vec![2 << 20]);
        assert_eq!(pool.held, 4 << 20);
        assert_eq!(pool.expire(start + HOLD * 2).len(), 1);
        assert_eq!(pool.held, 0);
    }

    #[test]
    fn warm_buffers_are_zeroed_or_left_as_asked() {
        // The process-wide pool: another test may take the entry first, so only what holds
        // either way is asserted.
        let len = (3 << 20) + 4096 * 5;
        assert!(give(pages(len, 7)).is_none() || held_bytes() + len > MAX_HELD_BYTES);
        let zeroed = PrivatePages::zeroed_warm(len, "test").unwrap();
        assert_eq!(zeroed.len(), len);
        assert!(zeroed.iter().all(|b| *b == 0));
        let scratch = PrivatePages::scratch_warm(len, "test").unwrap();
        assert_eq!(scratch.len(), len);
    }
}
