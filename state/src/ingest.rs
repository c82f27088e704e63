//! The durable ingest log: how a service that embeds weir hands it events so that they survive
//! a crash and can be replayed, which makes embedded input exactly-once end to end.
//!
//! A service appends records ([`IngestLog::append`]); [`IngestLog::sync`] makes everything
//! appended so far durable with one `fdatasync` (group commit) and returns the durable offset;
//! [`IngestLog::wait_durable`] waits for a given offset. Readers ([`IngestLog::reader`]) only
//! ever see the durable prefix, so a job never processes input that a crash could take back,
//! and they can start at any record's offset (a checkpoint records it).
//!
//! # Layout (`<name>.ingest`)
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"WEIRING\0"` |
//! | 8 | 4 | format version ([`INGEST_FORMAT_VERSION`]) |
//! | 12 | 4 | CRC-32 of bytes 0..12 |
//! | 16 | .. | records, each 8-byte aligned |
//!
//! A record: `u32` payload length, `u32` CRC-32 of the payload, the payload, zero padding to
//! 8 bytes. A record of length 0 marks the end of the log ([`IngestLog::close`]).
//!
//! On open, a torn tail (a partial or damaged last record: what a crash leaves of a write that
//! was never synced) is truncated. A damaged record *followed by valid ones* is corruption of
//! durable data: open fails with the file and offset, and nothing is dropped silently.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Result, StateError};
use crate::segment::{sync_dir, u32_at};

/// Magic bytes of an ingest log.
pub const INGEST_MAGIC: [u8; 8] = *b"WEIRING\0";
/// Version of the ingest log format.
pub const INGEST_FORMAT_VERSION: u32 = 1;
const HEADER_BYTES: u64 = 16;
/// The largest payload accepted.
pub const MAX_PAYLOAD_BYTES: usize = 64 << 20;

const fn padded(len: u64) -> u64 {
    (8 + len).div_ceil(8) * 8
}

#[derive(Debug)]
struct Writer {
    file: File,
    /// Where the next record goes.
    end: u64,
    /// Bytes appended but not yet written to the file.
    buf: Vec<u8>,
    closed: bool,
}

/// An append-only, CRC-checked, durable log of opaque records.
#[derive(Debug)]
pub struct IngestLog {
    path: PathBuf,
    writer: Mutex<Writer>,
    durable: AtomicU64,
    closed: AtomicBool,
}

/// What a reader found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestStatus {
    /// It read what was durable; more may follow.
    More,
    /// It is at the durable end; the log is still open.
    CaughtUp,
    /// It read everything and the log is closed.
    Closed,
}

fn poisoned(path: &Path) -> StateError {
    StateError::Misuse(format!("{}: a writer panicked while holding the log", path.display()))
}

impl IngestLog {
    /// Opens (creating if needed) the log at `path`. Truncates a torn tail; fails if a damaged
    /// record is followed by valid ones.
    pub fn open(path: &Path) -> Result<Arc<IngestLog>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| StateError::io("open ingest log", path, e))?;
        let len = file.metadata().map_err(|e| StateError::io("stat ingest log", path, e))?.len();
        if len == 0 {
            let mut header = [0u8; HEADER_BYTES as usize];
            header[0..8].copy_from_slice(&INGEST_MAGIC);
            header[8..12].copy_from_slice(&INGEST_FORMAT_VERSION.to_le_bytes());
            let crc = crc32fast::hash(&header[0..12]);
            header[12..16].copy_from_slice(&crc.to_le_bytes());
            file.write_all_at(&header, 0).map_err(|e| StateError::io("write ingest header", path, e))?;
            file.sync_all().map_err(|e| StateError::io("fsync ingest log", path, e))?;
            if let Some(dir) = path.parent() {
                sync_dir(dir)?;
            }
        }
        let (end, closed) = Self::recover(&file, path)?;
        file.set_len(end).map_err(|e| StateError::io("truncate torn ingest tail", path, e))?;
        Ok(Arc::new(IngestLog {
            path: path.to_owned(),
            writer: Mutex::new(Writer { file, end, buf: Vec::new(), closed }),
            durable: AtomicU64::new(end),
            closed: AtomicBool::new(closed),
        }))
    }

    /// Scans the records: returns where valid data ends and whether the log was closed.
    fn recover(file: &File, path: &Path) -> Result<(u64, bool)> {
        let len = file.metadata().map_err(|e| StateError::io("stat ingest log", path, e))?.len();
        let mut header = [0u8; HEADER_BYTES as usize];
        file.read_exact_at(&mut header, 0).map_err(|_| StateError::corrupt(path, 0, "ingest log header truncated"))?;
        if header[0..8] != INGEST_MAGIC || u32_at(&header, 12) != crc32fast::hash(&header[0..12]) {
            return Err(StateError::corrupt(path, 0, "bad ingest log header"));
        }
        let version = u32_at(&header, 8);
        if version != INGEST_FORMAT_VERSION {
            return Err(StateError::Incompatible {
                file: path.to_owned(),
                found: version,
                expected: INGEST_FORMAT_VERSION,
            });
        }
        let mut at = HEADER_BYTES;
        loop {
            match read_record(file, at, len) {
                Ok(Some((payload, next))) => {
                    if payload.is_empty() {
                        return Ok((next, true));
                    }
                    at = next;
                }
                Ok(None) => return Ok((at, false)),
                Err(reason) => {
                    // Torn tail, or damage followed by valid records?
                    let mut probe = at + 8;
                    while probe + 8 <= len {
                        if let Ok(Some(_)) = read_record(file, probe, len) {
                            return Err(StateError::corrupt(
                                path,
                                at,
                                format!("{reason}, with valid records after it"),
                            ));
                        }
                        probe += 8;
                    }
                    return Ok((at, false));
                }
            }
        }
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `payload` (not yet durable) and returns its offset.
    pub fn append(&self, payload: &[u8]) -> Result<u64> {
        if payload.is_empty() || payload.len() > MAX_PAYLOAD_BYTES {
            return Err(StateError::Misuse(format!("an ingest record must have 1..={MAX_PAYLOAD_BYTES} bytes")));
        }
        let mut w = self.writer.lock().map_err(|_| poisoned(&self.path))?;
        if w.closed {
            return Err(StateError::Misuse(format!("{} is closed", self.path.display())));
        }
        let offset = w.end + w.buf.len() as u64;
        w.buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        w.buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        w.buf.extend_from_slice(payload);
        let padded_len = padded(payload.len() as u64) as usize;
        let pad = padded_len - 8 - payload.len();
        w.buf.extend(std::iter::repeat_n(0u8, pad));
        Ok(offset)
    }

    /// Writes and `fdatasync`s everything appended so far; returns the durable offset (one
    /// past the last durable record). One sync covers every append before it (group commit).
    pub fn sync(&self) -> Result<u64> {
        let mut w = self.writer.lock().map_err(|_| poisoned(&self.path))?;
        self.sync_locked(&mut w)
    }

    /// [`IngestLog::sync`] with the writer held.
    fn sync_locked(&self, w: &mut Writer) -> Result<u64> {
        if !w.buf.is_empty() {
            let at = w.end;
            let buf = std::mem::take(&mut w.buf);
            w.file.write_all_at(&buf, at).map_err(|e| StateError::io("write ingest log", &self.path, e))?;
            w.end += buf.len() as u64;
            w.buf = buf;
            w.buf.clear();
        }
        crate::faults::check("state::ingest_sync", &self.path)?;
        w.file.sync_data().map_err(|e| StateError::io("fdatasync ingest log", &self.path, e))?;
        self.durable.store(w.end, Ordering::Release);
        Ok(w.end)
    }

    /// Waits until the record at `offset` is durable (syncing if needed).
    pub fn wait_durable(&self, offset: u64) -> Result<()> {
        if self.durable_offset() > offset {
            return Ok(());
        }
        self.sync().map(|_| ())
    }

    /// One past the last durable record.
    pub fn durable_offset(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Ends the log: syncs, writes the end marker and syncs again. Readers return
    /// [`IngestStatus::Closed`] once they have read everything.
    pub fn close(&self) -> Result<()> {
        let mut w = self.writer.lock().map_err(|_| poisoned(&self.path))?;
        if w.closed {
            return Ok(());
        }
        // Under the same lock as the end marker: an append racing the close is either synced
        // here or refused (the log is closed), never dropped.
        self.sync_locked(&mut w)?;
        let at = w.end;
        w.file.write_all_at(&[0u8; 8], at).map_err(|e| StateError::io("write ingest end", &self.path, e))?;
        w.file.sync_data().map_err(|e| StateError::io("fdatasync ingest log", &self.path, e))?;
        w.end += 8;
        w.closed = true;
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    /// A reader starting at `offset` (the header's end, [`IngestLog::first_offset`], or an
    /// offset a reader reported).
    pub fn reader(self: &Arc<Self>, offset: u64) -> Result<IngestReader> {
        let file = File::open(&self.path).map_err(|e| StateError::io("open ingest log", &self.path, e))?;
        Ok(IngestReader { log: Arc::clone(self), file, pos: offset.max(HEADER_BYTES) })
    }

    /// The offset of the first record.
    pub fn first_offset() -> u64 {
        HEADER_BYTES
    }
}

/// Reads the record at `at` (file length `len`): `Ok(None)` at a clean end of data,
/// `Err(reason)` if the bytes there are not a valid record. Never panics.
fn read_record(file: &File, at: u64, len: u64) -> std::result::Result<Option<(Vec<u8>, u64)>, String> {
    if at >= len {
        return Ok(None);
    }
    if at + 8 > len {
        return Err("partial record header".into());
    }
    let mut head = [0u8; 8];
    file.read_exact_at(&mut head, at).map_err(|e| e.to_string())?;
    let payload_len = u64::from(u32_at(&head, 0));
    if payload_len == 0 {
        return if u32_at(&head, 4) == 0 { Ok(Some((Vec::new(), at + 8))) } else { Err("bad end marker".into()) };
    }
    if payload_len > MAX_PAYLOAD_BYTES as u64 || at + padded(payload_len) > len {
        return Err("record runs past the end".into());
    }
    let mut payload = vec![0u8; payload_len as usize];
    file.read_exact_at(&mut payload, at + 8).map_err(|e| e.to_string())?;
    if crc32fast::hash(&payload) != u32_at(&head, 4) {
        return Err("record CRC mismatch".into());
    }
    Ok(Some((payload, at + padded(payload_len))))
}

/// Reads the durable records of an [`IngestLog`] from an offset.
#[derive(Debug)]
pub struct IngestReader {
    log: Arc<IngestLog>,
    file: File,
    pos: u64,
}

impl IngestReader {
    /// The offset of the next record to read.
    pub fn offset(&self) -> u64 {
        self.pos
    }

    /// Continues at `offset` (one a reader reported).
    pub fn seek(&mut self, offset: u64) {
        self.pos = offset.max(HEADER_BYTES);
    }

    /// Appends up to `max` durable records, each with its offset, to `out`.
    pub fn read(&mut self, out: &mut Vec<(u64, Vec<u8>)>, max: usize) -> Result<IngestStatus> {
        let durable = self.log.durable_offset();
        let mut n = 0;
        while n < max && self.pos < durable {
            match read_record(&self.file, self.pos, durable) {
                Ok(Some((payload, next))) => {
                    if payload.is_empty() {
                        self.pos = next;
                        break;
                    }
                    out.push((self.pos, payload));
                    self.pos = next;
                    n += 1;
                }
                Ok(None) => break,
                Err(reason) => return Err(StateError::corrupt(self.log.path(), self.pos, reason)),
            }
        }
        if self.pos < durable {
            return Ok(IngestStatus::More);
        }
        // Tests stretch this moment (`sleep(ms)`) to let a close run inside it.
        crate::faults::check("state::ingest_caught_up", self.log.path())?;
        if !self.log.closed.load(Ordering::Acquire) {
            return Ok(IngestStatus::CaughtUp);
        }
        // Closing syncs what was appended, then sets `closed`: records may have become durable
        // after `durable` was read above. Only with none left is the log read to its end.
        Ok(if self.pos < self.log.durable_offset() { IngestStatus::More } else { IngestStatus::Closed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(log: &Arc<IngestLog>, from: u64) -> (Vec<(u64, Vec<u8>)>, IngestStatus) {
        let mut reader = log.reader(from).unwrap();
        let mut out = Vec::new();
        loop {
            let status = reader.read(&mut out, 3).unwrap();
            if status != IngestStatus::More {
                return (out, status);
            }
        }
    }

    #[test]
    fn a_reader_racing_the_close_reads_every_record() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..200u32 {
            let log = IngestLog::open(&dir.path().join(format!("race-{round}.ingest"))).unwrap();
            let writer = {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..40u32 {
                        log.append(&i.to_le_bytes()).unwrap();
                        if i % 8 == 7 {
                            log.sync().unwrap();
                        }
                    }
                    log.close().unwrap();
                })
            };
            let mut reader = log.reader(IngestLog::first_offset()).unwrap();
            let mut out = Vec::new();
            while reader.read(&mut out, 5).unwrap() != IngestStatus::Closed {
                std::hint::spin_loop();
            }
            writer.join().unwrap();
            assert_eq!(out.len(), 40, "round {round}: every record read before the end");
        }
    }

    #[test]
    fn readers_see_only_durable_records_and_can_resume_at_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = IngestLog::open(&dir.path().join("in.ingest")).unwrap();
        let offsets: Vec<u64> = (0..10u8).map(|i| log.append(&vec![i; i as usize + 1]).unwrap()).collect();
        assert_eq!(read_all(&log, IngestLog::first_offset()).0.len(), 0, "nothing durable yet");
        log.sync().unwrap();
        let (records, status) = read_all(&log, IngestLog::first_offset());
        assert_eq!(status, IngestStatus::CaughtUp);
        assert_eq!(records.iter().map(|r| r.0).collect::<Vec<_>>(), offsets);
        assert_eq!(records[4].1, vec![4u8; 5]);
        let (rest, _) = read_all(&log, offsets[7]);
        assert_eq!(rest.len(), 3);
        log.close().unwrap();
        assert_eq!(read_all(&log, offsets[9]).1, IngestStatus::Closed);
        assert!(log.append(b"late").is_err());
        // Reopened, the log is still closed and holds the same records.
        drop(log);
        let log = IngestLog::open(&dir.path().join("in.ingest")).unwrap();
        let (again, status) = read_all(&log, IngestLog::first_offset());
        assert_eq!((again.len(), status), (10, IngestStatus::Closed));
    }

    #[test]
    fn a_torn_tail_is_truncated_and_damage_before_valid_records_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.ingest");
        let log = IngestLog::open(&path).unwrap();
        let offsets: Vec<u64> = (0..5u8).map(|i| log.append(&[i; 20]).unwrap()).collect();
        log.sync().unwrap();
        drop(log);
        let good = std::fs::read(&path).unwrap();
        // A crash in the middle of writing one more record.
        let mut torn = good.clone();
        torn.extend_from_slice(&[30, 0, 0, 0, 1, 2, 3, 4, 9, 9]);
        std::fs::write(&path, &torn).unwrap();
        let log = IngestLog::open(&path).unwrap();
        assert_eq!(log.durable_offset(), good.len() as u64);
        assert_eq!(read_all(&log, IngestLog::first_offset()).0.len(), 5);
        log.append(b"after recovery").unwrap();
        log.sync().unwrap();
        assert_eq!(read_all(&log, IngestLog::first_offset()).0.len(), 6);
        drop(log);
        // A flipped byte in the second record, with valid records after it.
        let mut damaged = good.clone();
        damaged[offsets[1] as usize + 12] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        let err = IngestLog::open(&path).unwrap_err();
        assert_eq!(err.class(), crate::ErrorClass::Corruption, "{err}");
        assert!(err.to_string().contains(&format!(":{}", offsets[1])), "{err}");
    }
}
