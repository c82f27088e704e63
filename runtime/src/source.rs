//! Sources: replayable, parallel inputs. Each shard reads its own split and reports an offset
//! it can seek back to, so that a restarted job replays exactly what a checkpoint did not see.
//!
//! Built in: [`VecSource`] (tests), [`IterSource`] (a factory of iterators),
//! [`GeneratorSource`] (deterministic records by offset, such as Nexmark), and [`FileSource`]
//! (lines, split by byte ranges, offsets are byte positions, undecodable lines go to the
//! dead-letter output with their offset).

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Result, RuntimeError};

/// What one read of a source produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStatus {
    /// More input may follow at once.
    More,
    /// Nothing available now; ask again later (the source may be marked idle).
    Idle,
    /// The input is exhausted.
    End,
}

/// A record that could not be decoded, with where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The source's uid.
    pub source: String,
    /// The shard that read it.
    pub shard: usize,
    /// The offset of the bad record in the source (for files: its byte position).
    pub offset: u64,
    /// Why it could not be decoded.
    pub reason: String,
    /// The raw bytes (truncated to 1 KiB).
    pub raw: Vec<u8>,
}

/// A parallel, replayable source: a factory of one reader per shard.
pub trait Source: Send + Sync + 'static {
    /// The records it produces.
    type Out: Send + 'static;
    /// The per-shard reader.
    type Reader: SourceReader<Out = Self::Out>;
    /// The reader of `shard` of `parallelism`.
    fn reader(&self, shard: usize, parallelism: usize) -> Result<Self::Reader>;
}

/// One shard's reader of a source.
pub trait SourceReader: 'static {
    /// The records it produces.
    type Out;
    /// Appends up to `max` records to `out` (and undecodable ones to `dead`).
    fn read(&mut self, out: &mut Vec<Self::Out>, dead: &mut Vec<DeadLetter>, max: usize) -> Result<ReadStatus>;
    /// The position after the last record read.
    fn offset(&self) -> u64;
    /// Continues from a position [`SourceReader::offset`] returned.
    fn seek(&mut self, offset: u64) -> Result<()>;
}

/// A vector, dealt round-robin to the shards (element `i` to shard `i % P`).
#[derive(Debug, Clone)]
pub struct VecSource<T> {
    items: Arc<Vec<T>>,
}

impl<T> VecSource<T> {
    /// A source over `items`.
    pub fn new(items: Vec<T>) -> Self {
        VecSource { items: Arc::new(items) }
    }
}

/// The reader of a [`VecSource`].
#[derive(Debug)]
pub struct VecReader<T> {
    items: Arc<Vec<T>>,
    next: usize,
    stride: usize,
    start: usize,
}

impl<T: Clone + Send + Sync + 'static> Source for VecSource<T> {
    type Out = T;
    type Reader = VecReader<T>;
    fn reader(&self, shard: usize, parallelism: usize) -> Result<VecReader<T>> {
        Ok(VecReader { items: Arc::clone(&self.items), next: shard, stride: parallelism.max(1), start: shard })
    }
}

impl<T: Clone + 'static> SourceReader for VecReader<T> {
    type Out = T;
    fn read(&mut self, out: &mut Vec<T>, _: &mut Vec<DeadLetter>, max: usize) -> Result<ReadStatus> {
        for _ in 0..max {
            match self.items.get(self.next) {
                Some(item) => {
                    out.push(item.clone());
                    self.next += self.stride;
                }
                None => return Ok(ReadStatus::End),
            }
        }
        Ok(ReadStatus::More)
    }
    fn offset(&self) -> u64 {
        ((self.next - self.start) / self.stride) as u64
    }
    fn seek(&mut self, offset: u64) -> Result<()> {
        self.next = self.start + offset as usize * self.stride;
        Ok(())
    }
}

/// Records computed from their offset (deterministic, so replayable): shard `s` of `P` makes
/// offsets `s, s + P, s + 2P, ...`.
pub trait Generator: Send + Sync + 'static {
    /// The records.
    type Out: Send + 'static;
    /// The record at `offset`, or `None` past the end.
    fn generate(&self, offset: u64) -> Option<Self::Out>;
}

/// A source over a [`Generator`].
#[derive(Debug, Clone)]
pub struct GeneratorSource<G> {
    generator: Arc<G>,
}

impl<G> GeneratorSource<G> {
    /// A source over `generator`.
    pub fn new(generator: G) -> Self {
        GeneratorSource { generator: Arc::new(generator) }
    }
}

/// The reader of a [`GeneratorSource`].
#[derive(Debug)]
pub struct GeneratorReader<G> {
    generator: Arc<G>,
    shard: u64,
    stride: u64,
    produced: u64,
}

impl<G: Generator> Source for GeneratorSource<G> {
    type Out = G::Out;
    type Reader = GeneratorReader<G>;
    fn reader(&self, shard: usize, parallelism: usize) -> Result<GeneratorReader<G>> {
        Ok(GeneratorReader {
            generator: Arc::clone(&self.generator),
            shard: shard as u64,
            stride: parallelism.max(1) as u64,
            produced: 0,
        })
    }
}

impl<G: Generator> SourceReader for GeneratorReader<G> {
    type Out = G::Out;
    fn read(&mut self, out: &mut Vec<G::Out>, _: &mut Vec<DeadLetter>, max: usize) -> Result<ReadStatus> {
        let before = out.len();
        let (generator, shard, stride, start) = (&self.generator, self.shard, self.stride, self.produced);
        out.reserve(max);
        for i in start..start + max as u64 {
            match generator.generate(shard + i * stride) {
                Some(value) => out.push(value),
                None => break,
            }
        }
        let n = (out.len() - before) as u64;
        self.produced += n;
        Ok(if n < max as u64 { ReadStatus::End } else { ReadStatus::More })
    }
    fn offset(&self) -> u64 {
        self.produced
    }
    fn seek(&mut self, offset: u64) -> Result<()> {
        self.produced = offset;
        Ok(())
    }
}

/// A factory of one iterator per shard. Offsets count records; seeking skips.
pub struct IterSource<F> {
    factory: Arc<F>,
}

impl<F> std::fmt::Debug for IterSource<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IterSource")
    }
}

impl<F> IterSource<F> {
    /// A source whose shard `s` of `P` reads `factory(s, P)`.
    pub fn new(factory: F) -> Self {
        IterSource { factory: Arc::new(factory) }
    }
}

/// The reader of an [`IterSource`].
pub struct IterReader<I> {
    iter: I,
    produced: u64,
}

impl<F, I> Source for IterSource<F>
where
    F: Fn(usize, usize) -> I + Send + Sync + 'static,
    I: Iterator + 'static,
    I::Item: Send + 'static,
{
    type Out = I::Item;
    type Reader = IterReader<I>;
    fn reader(&self, shard: usize, parallelism: usize) -> Result<IterReader<I>> {
        Ok(IterReader { iter: (self.factory)(shard, parallelism), produced: 0 })
    }
}

impl<I: Iterator + 'static> SourceReader for IterReader<I> {
    type Out = I::Item;
    fn read(&mut self, out: &mut Vec<I::Item>, _: &mut Vec<DeadLetter>, max: usize) -> Result<ReadStatus> {
        for _ in 0..max {
            match self.iter.next() {
                Some(item) => {
                    out.push(item);
                    self.produced += 1;
                }
                None => return Ok(ReadStatus::End),
            }
        }
        Ok(ReadStatus::More)
    }
    fn offset(&self) -> u64 {
        self.produced
    }
    fn seek(&mut self, offset: u64) -> Result<()> {
        while self.produced < offset {
            if self.iter.next().is_none() {
                break;
            }
            self.produced += 1;
        }
        Ok(())
    }
}

/// Lines of a file. Shard `s` of `P` reads the lines that *start* in its byte range
/// `[s * len / P, (s + 1) * len / P)`, so every line is read exactly once whatever `P`.
/// Offsets are byte positions. A line that is not UTF-8 goes to the dead-letter output.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
    uid_hint: String,
}

impl FileSource {
    /// Lines of the file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        FileSource { uid_hint: path.display().to_string(), path }
    }
}

/// The reader of a [`FileSource`].
#[derive(Debug)]
pub struct FileReader {
    reader: BufReader<File>,
    pos: u64,
    end: u64,
    shard: usize,
    name: String,
    line: Vec<u8>,
}

impl Source for FileSource {
    type Out = String;
    type Reader = FileReader;
    fn reader(&self, shard: usize, parallelism: usize) -> Result<FileReader> {
        let err =
            |e: std::io::Error| RuntimeError::Source { source_name: self.uid_hint.clone(), reason: e.to_string() };
        let file = File::open(&self.path).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let p = parallelism.max(1) as u64;
        let start = len * shard as u64 / p;
        let end = len * (shard as u64 + 1) / p;
        let mut reader = FileReader {
            reader: BufReader::with_capacity(64 * 1024, file),
            pos: 0,
            end,
            shard,
            name: self.uid_hint.clone(),
            line: Vec::new(),
        };
        reader.seek_to_line_start(start)?;
        Ok(reader)
    }
}

impl FileReader {
    fn io(&self, e: std::io::Error) -> RuntimeError {
        RuntimeError::Source { source_name: self.name.clone(), reason: e.to_string() }
    }

    /// Positions at the first line that starts at or after `at`.
    fn seek_to_line_start(&mut self, at: u64) -> Result<()> {
        if at == 0 {
            self.reader.seek(SeekFrom::Start(0)).map_err(|e| self.io(e))?;
            self.pos = 0;
            return Ok(());
        }
        // A line starts at `at` iff the byte before it is a newline.
        self.reader.seek(SeekFrom::Start(at - 1)).map_err(|e| self.io(e))?;
        self.pos = at - 1;
        let mut skipped = Vec::new();
        let n = self.reader.read_until(b'\n', &mut skipped).map_err(|e| self.io(e))?;
        self.pos += n as u64;
        Ok(())
    }
}

impl SourceReader for FileReader {
    type Out = String;
    fn read(&mut self, out: &mut Vec<String>, dead: &mut Vec<DeadLetter>, max: usize) -> Result<ReadStatus> {
        for _ in 0..max {
            if self.pos >= self.end {
                return Ok(ReadStatus::End);
            }
            self.line.clear();
            let start = self.pos;
            let n = self.reader.read_until(b'\n', &mut self.line).map_err(|e| self.io(e))?;
            if n == 0 {
                return Ok(ReadStatus::End);
            }
            self.pos += n as u64;
            let mut bytes = &self.line[..];
            if bytes.last() == Some(&b'\n') {
                bytes = &bytes[..bytes.len() - 1];
            }
            if bytes.last() == Some(&b'\r') {
                bytes = &bytes[..bytes.len() - 1];
            }
            match std::str::from_utf8(bytes) {
                Ok(s) => out.push(s.to_owned()),
                Err(e) => dead.push(DeadLetter {
                    source: self.name.clone(),
                    shard: self.shard,
                    offset: start,
                    reason: format!("not UTF-8: {e}"),
                    raw: bytes[..bytes.len().min(1024)].to_vec(),
                }),
            }
        }
        Ok(ReadStatus::More)
    }
    fn offset(&self) -> u64 {
        self.pos
    }
    fn seek(&mut self, offset: u64) -> Result<()> {
        self.reader.seek(SeekFrom::Start(offset)).map_err(|e| self.io(e))?;
        self.pos = offset;
        Ok(())
    }
}

/// Durable ingest logs ([`weir_state::ingest::IngestLog`]) as a replayable source: what a
/// service appends (and syncs) is what the job reads, from a recorded offset after a restart.
/// Log `i` is read by shard `i % P`. Each payload is decoded by `decode`; one that fails goes to
/// the dead-letter output with its offset. The source ends when every log it reads is closed.
pub struct IngestSource<D> {
    logs: Vec<Arc<weir_state::ingest::IngestLog>>,
    decode: Arc<D>,
    name: String,
}

impl<D> std::fmt::Debug for IngestSource<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestSource").field("logs", &self.logs.len()).finish()
    }
}

impl<D> IngestSource<D> {
    /// Reads `logs`, decoding each payload with `decode`.
    pub fn new(logs: Vec<Arc<weir_state::ingest::IngestLog>>, decode: D) -> Self {
        let name = logs.first().map_or_else(|| "ingest".to_owned(), |l| l.path().display().to_string());
        IngestSource { logs, decode: Arc::new(decode), name }
    }
}

/// The reader of an [`IngestSource`] on one shard.
pub struct IngestSourceReader<D> {
    readers: Vec<weir_state::ingest::IngestReader>,
    decode: Arc<D>,
    name: String,
    shard: usize,
    closed: Vec<bool>,
    buf: Vec<(u64, Vec<u8>)>,
}

impl<D, T> Source for IngestSource<D>
where
    D: Fn(&[u8]) -> std::result::Result<T, String> + Send + Sync + 'static,
    T: Send + 'static,
{
    type Out = T;
    type Reader = IngestSourceReader<D>;
    fn reader(&self, shard: usize, parallelism: usize) -> Result<IngestSourceReader<D>> {
        let err =
            |e: weir_state::StateError| RuntimeError::Source { source_name: self.name.clone(), reason: e.to_string() };
        let readers = self
            .logs
            .iter()
            .enumerate()
            .filter(|(i, _)| i % parallelism.max(1) == shard)
            .map(|(_, log)| log.reader(weir_state::ingest::IngestLog::first_offset()).map_err(err))
            .collect::<Result<Vec<_>>>()?;
        let closed = vec![false; readers.len()];
        Ok(IngestSourceReader {
            readers,
            decode: Arc::clone(&self.decode),
            name: self.name.clone(),
            shard,
            closed,
            buf: Vec::new(),
        })
    }
}

impl<D, T> SourceReader for IngestSourceReader<D>
where
    D: Fn(&[u8]) -> std::result::Result<T, String> + 'static,
{
    type Out = T;
    fn read(&mut self, out: &mut Vec<T>, dead: &mut Vec<DeadLetter>, max: usize) -> Result<ReadStatus> {
        use weir_state::ingest::IngestStatus;
        let mut any = false;
        for (i, reader) in self.readers.iter_mut().enumerate() {
            if self.closed[i] {
                continue;
            }
            self.buf.clear();
            let status = reader
                .read(&mut self.buf, max)
                .map_err(|e| RuntimeError::Source { source_name: self.name.clone(), reason: e.to_string() })?;
            for (offset, payload) in self.buf.drain(..) {
                any = true;
                match (self.decode)(&payload) {
                    Ok(value) => out.push(value),
                    Err(reason) => dead.push(DeadLetter {
                        source: self.name.clone(),
                        shard: self.shard,
                        offset,
                        reason,
                        raw: payload[..payload.len().min(1024)].to_vec(),
                    }),
                }
            }
            if status == IngestStatus::Closed {
                self.closed[i] = true;
            }
        }
        Ok(if self.closed.iter().all(|c| *c) {
            ReadStatus::End
        } else if any {
            ReadStatus::More
        } else {
            ReadStatus::Idle
        })
    }
    /// The offset of the first log this shard reads (one log per shard is the replayable
    /// configuration; with several, each reader's offset is its own).
    fn offset(&self) -> u64 {
        self.readers.first().map_or(0, |r| r.offset())
    }
    fn seek(&mut self, offset: u64) -> Result<()> {
        if let Some(r) = self.readers.first_mut() {
            r.seek(offset);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all<R: SourceReader>(mut r: R) -> (Vec<R::Out>, Vec<DeadLetter>) {
        let (mut out, mut dead) = (Vec::new(), Vec::new());
        while r.read(&mut out, &mut dead, 3).unwrap() != ReadStatus::End {}
        (out, dead)
    }

    #[test]
    fn file_splits_read_every_line_once_and_dead_letter_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.txt");
        let mut content = Vec::new();
        for i in 0..100 {
            content.extend_from_slice(format!("line number {i}\n").as_bytes());
        }
        content.extend_from_slice(b"bad \xff\xfe line\nlast line without newline");
        std::fs::write(&path, &content).unwrap();
        for p in 1..=7 {
            let mut lines = Vec::new();
            let mut dead = Vec::new();
            for s in 0..p {
                let (l, d) = read_all(FileSource::new(&path).reader(s, p).unwrap());
                lines.extend(l);
                dead.extend(d);
            }
            lines.sort();
            let mut expected: Vec<String> = (0..100).map(|i| format!("line number {i}")).collect();
            expected.push("last line without newline".into());
            expected.sort();
            assert_eq!(lines, expected, "p={p}");
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].offset, content.windows(3).position(|w| w == b"bad").unwrap() as u64);
        }
    }

    #[test]
    fn seek_resumes_at_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.txt");
        std::fs::write(&path, "a\nb\nc\nd\n").unwrap();
        let mut r = FileSource::new(&path).reader(0, 1).unwrap();
        let (mut out, mut dead) = (Vec::new(), Vec::new());
        r.read(&mut out, &mut dead, 2).unwrap();
        let at = r.offset();
        let mut r2 = FileSource::new(&path).reader(0, 1).unwrap();
        r2.seek(at).unwrap();
        assert_eq!(read_all(r2).0, vec!["c", "d"]);
        let mut v = VecSource::new((0..10).collect::<Vec<u32>>()).reader(1, 3).unwrap();
        let mut out = Vec::new();
        v.read(&mut out, &mut dead, 2).unwrap();
        assert_eq!(out, vec![1, 4]);
        let at = v.offset();
        let mut v2 = VecSource::new((0..10).collect::<Vec<u32>>()).reader(1, 3).unwrap();
        v2.seek(at).unwrap();
        assert_eq!(read_all(v2).0, vec![7]);
    }
}
