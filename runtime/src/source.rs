//! Sources: replayable, parallel inputs, made of splits. A split is a part of the input read
//! on its own with an offset it can seek back to (a log, a byte range of a file, every n-th
//! record of a generator). The number of splits is fixed by the input, not by the job's
//! parallelism: shard `s` of `P` reads splits `s, s + P, s + 2P, ...` ([`splits_of`]), and a
//! checkpoint records each split's offset, so a job restarted from it, at this parallelism
//! or another, replays exactly what the checkpoint did not see.
//!
//! Built in: [`VecSource`] (tests), [`IterSource`] (a factory of iterators),
//! [`GeneratorSource`] (deterministic records by offset, such as Nexmark), [`FileSource`]
//! (lines, split by byte ranges, offsets are byte positions, undecodable lines go to the
//! dead-letter output with their offset), and [`IngestSource`] (durable ingest logs, a split
//! each).

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Result, RuntimeError};

/// Splits of the built-in sources that split by record ([`VecSource`], [`GeneratorSource`],
/// [`IterSource`], [`FileSource`]) unless set: a job reads them on up to this many shards.
pub const DEFAULT_SPLITS: u32 = 32;

/// The splits that shard `shard` of `parallelism` reads of a source with `splits` splits.
pub fn splits_of(shard: usize, parallelism: usize, splits: u32) -> Vec<u32> {
    (shard as u64..u64::from(splits)).step_by(parallelism.max(1)).map(|s| s as u32).collect()
}

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
    /// The split it was read from.
    pub split: u32,
    /// The offset of the bad record in its split (for files: its byte position).
    pub offset: u64,
    /// Why it could not be decoded.
    pub reason: String,
    /// The raw bytes (truncated to 1 KiB).
    pub raw: Vec<u8>,
}

/// A parallel, replayable source: its splits, and a reader for each.
pub trait Source: Send + Sync + 'static {
    /// The records it produces.
    type Out: Send + 'static;
    /// The reader of one split.
    type Reader: SourceReader<Out = Self::Out>;
    /// The number of splits. It must not change while a job's checkpoints are resumed (a
    /// resume with another number fails, naming the source); it may be smaller than the
    /// parallelism, and shards without a split read nothing.
    fn splits(&self) -> u32;
    /// The reader of split `split` (below [`Source::splits`]), at its start.
    fn reader(&self, split: u32) -> Result<Self::Reader>;
}

/// The reader of one split of a source.
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

/// A vector, dealt round-robin to its splits (element `i` to split `i % splits`).
#[derive(Debug, Clone)]
pub struct VecSource<T> {
    items: Arc<Vec<T>>,
    splits: u32,
}

impl<T> VecSource<T> {
    /// A source over `items`, in [`DEFAULT_SPLITS`] splits.
    pub fn new(items: Vec<T>) -> Self {
        VecSource { items: Arc::new(items), splits: DEFAULT_SPLITS }
    }

    /// The same source in `splits` splits (at least one).
    pub fn with_splits(mut self, splits: u32) -> Self {
        self.splits = splits.max(1);
        self
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
    fn splits(&self) -> u32 {
        self.splits
    }
    fn reader(&self, split: u32) -> Result<VecReader<T>> {
        let (start, stride) = (split as usize, self.splits as usize);
        Ok(VecReader { items: Arc::clone(&self.items), next: start, stride, start })
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

/// Records computed from their offset (deterministic, so replayable): split `s` of `n` makes
/// offsets `s, s + n, s + 2n, ...`.
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
    splits: u32,
}

impl<G> GeneratorSource<G> {
    /// A source over `generator`, in [`DEFAULT_SPLITS`] splits.
    pub fn new(generator: G) -> Self {
        GeneratorSource { generator: Arc::new(generator), splits: DEFAULT_SPLITS }
    }

    /// The same source in `splits` splits (at least one).
    pub fn with_splits(mut self, splits: u32) -> Self {
        self.splits = splits.max(1);
        self
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
    fn splits(&self) -> u32 {
        self.splits
    }
    fn reader(&self, split: u32) -> Result<GeneratorReader<G>> {
        Ok(GeneratorReader {
            generator: Arc::clone(&self.generator),
            shard: u64::from(split),
            stride: u64::from(self.splits),
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

/// A factory of one iterator per split. Offsets count records; seeking skips.
pub struct IterSource<F> {
    factory: Arc<F>,
    splits: u32,
}

impl<F> std::fmt::Debug for IterSource<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IterSource")
    }
}

impl<F> IterSource<F> {
    /// A source whose split `s` of `n` ([`DEFAULT_SPLITS`]) reads `factory(s, n)`.
    pub fn new(factory: F) -> Self {
        IterSource { factory: Arc::new(factory), splits: DEFAULT_SPLITS }
    }

    /// The same source in `splits` splits (at least one).
    pub fn with_splits(mut self, splits: u32) -> Self {
        self.splits = splits.max(1);
        self
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
    fn splits(&self) -> u32 {
        self.splits
    }
    fn reader(&self, split: u32) -> Result<IterReader<I>> {
        Ok(IterReader { iter: (self.factory)(split as usize, self.splits as usize), produced: 0 })
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

/// Lines of a file. Split `s` of `n` reads the lines that *start* in its byte range
/// `[s * len / n, (s + 1) * len / n)`, so every line is read exactly once whatever `n`.
/// Offsets are byte positions. A line that is not UTF-8 goes to the dead-letter output.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
    uid_hint: String,
    splits: u32,
}

impl FileSource {
    /// Lines of the file at `path`, in [`DEFAULT_SPLITS`] splits.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        FileSource { uid_hint: path.display().to_string(), path, splits: DEFAULT_SPLITS }
    }

    /// The same source in `splits` splits (at least one).
    pub fn with_splits(mut self, splits: u32) -> Self {
        self.splits = splits.max(1);
        self
    }
}

/// The reader of a [`FileSource`].
#[derive(Debug)]
pub struct FileReader {
    reader: BufReader<File>,
    pos: u64,
    end: u64,
    split: u32,
    name: String,
    line: Vec<u8>,
}

impl Source for FileSource {
    type Out = String;
    type Reader = FileReader;
    fn splits(&self) -> u32 {
        self.splits
    }
    fn reader(&self, split: u32) -> Result<FileReader> {
        let err =
            |e: std::io::Error| RuntimeError::Source { source_name: self.uid_hint.clone(), reason: e.to_string() };
        let file = File::open(&self.path).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let n = u64::from(self.splits);
        let start = len * u64::from(split) / n;
        let end = len * (u64::from(split) + 1) / n;
        let mut reader = FileReader {
            reader: BufReader::with_capacity(64 * 1024, file),
            pos: 0,
            end,
            split,
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
                    split: self.split,
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
/// Each log is a split (log `i` is read by shard `i % P`). Each payload is decoded by `decode`;
/// one that fails goes to the dead-letter output with its offset. A split ends when its log is
/// closed.
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

/// The reader of one log of an [`IngestSource`].
pub struct IngestSourceReader<D> {
    reader: weir_state::ingest::IngestReader,
    decode: Arc<D>,
    name: String,
    split: u32,
    closed: bool,
    buf: Vec<(u64, Vec<u8>)>,
}

impl<D, T> Source for IngestSource<D>
where
    D: Fn(&[u8]) -> std::result::Result<T, String> + Send + Sync + 'static,
    T: Send + 'static,
{
    type Out = T;
    type Reader = IngestSourceReader<D>;
    fn splits(&self) -> u32 {
        self.logs.len() as u32
    }
    fn reader(&self, split: u32) -> Result<IngestSourceReader<D>> {
        let log = self.logs.get(split as usize).ok_or_else(|| RuntimeError::Source {
            source_name: self.name.clone(),
            reason: format!("no log for split {split} of {}", self.logs.len()),
        })?;
        let reader = log
            .reader(weir_state::ingest::IngestLog::first_offset())
            .map_err(|e| RuntimeError::Source { source_name: self.name.clone(), reason: e.to_string() })?;
        Ok(IngestSourceReader {
            reader,
            decode: Arc::clone(&self.decode),
            name: log.path().display().to_string(),
            split,
            closed: false,
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
        if self.closed {
            return Ok(ReadStatus::End);
        }
        self.buf.clear();
        let status = self
            .reader
            .read(&mut self.buf, max)
            .map_err(|e| RuntimeError::Source { source_name: self.name.clone(), reason: e.to_string() })?;
        let any = !self.buf.is_empty();
        for (offset, payload) in self.buf.drain(..) {
            match (self.decode)(&payload) {
                Ok(value) => out.push(value),
                Err(reason) => dead.push(DeadLetter {
                    source: self.name.clone(),
                    split: self.split,
                    offset,
                    reason,
                    raw: payload[..payload.len().min(1024)].to_vec(),
                }),
            }
        }
        self.closed = status == IngestStatus::Closed;
        Ok(if any {
            ReadStatus::More
        } else if self.closed {
            ReadStatus::End
        } else {
            ReadStatus::Idle
        })
    }
    fn offset(&self) -> u64 {
        self.reader.offset()
    }
    fn seek(&mut self, offset: u64) -> Result<()> {
        self.reader.seek(offset);
        self.closed = false;
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
        for p in 1..=7u32 {
            let mut lines = Vec::new();
            let mut dead = Vec::new();
            for s in 0..p {
                let (l, d) = read_all(FileSource::new(&path).with_splits(p).reader(s).unwrap());
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
        let mut r = FileSource::new(&path).with_splits(1).reader(0).unwrap();
        let (mut out, mut dead) = (Vec::new(), Vec::new());
        r.read(&mut out, &mut dead, 2).unwrap();
        let at = r.offset();
        let mut r2 = FileSource::new(&path).with_splits(1).reader(0).unwrap();
        r2.seek(at).unwrap();
        assert_eq!(read_all(r2).0, vec!["c", "d"]);
        let mut v = VecSource::new((0..10).collect::<Vec<u32>>()).with_splits(3).reader(1).unwrap();
        let mut out = Vec::new();
        v.read(&mut out, &mut dead, 2).unwrap();
        assert_eq!(out, vec![1, 4]);
        let at = v.offset();
        let mut v2 = VecSource::new((0..10).collect::<Vec<u32>>()).with_splits(3).reader(1).unwrap();
        v2.seek(at).unwrap();
        assert_eq!(read_all(v2).0, vec![7]);
    }
}
