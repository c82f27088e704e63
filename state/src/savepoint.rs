//! Savepoints: keyed state in a canonical, versioned format, organised by operator uid and key
//! group.
//!
//! A checkpoint is the log itself ([`crate::store`]): cheap to take, but tied to the segment
//! layout and to the shards that wrote it. A savepoint is what a user keeps across job versions
//! and rescalings, so it says nothing about segments or shards. It holds every live entry once,
//! filed under the operator that owns it (by uid, the part of a state name before the first
//! `/`) and the key group of its key. That makes the two questions a restore asks cheap to answer:
//! *which operator does this state belong to* (one file per uid) and *which shard takes it now*
//! (one block per key group, found through the file's index, so a shard reads only its own
//! blocks).
//!
//! The format is canonical: the same state gives byte-identical files, whatever the parallelism
//! and the segment layout of the stores it was taken from, because names, key groups and entries
//! are all written in ascending order.
//!
//! ```
//! use weir_state::keygroup::KeyGroupRange;
//! use weir_state::savepoint::{Savepoint, SavepointWriter};
//! use weir_state::states::ValueState;
//! use weir_state::{StateStore, StoreConfig, store::Key};
//! let tmp = tempfile::tempdir().unwrap();
//! let config = |shard, p| StoreConfig {
//!     shard: shard as u32,
//!     max_parallelism: 128,
//!     key_groups: KeyGroupRange::for_shard(shard, p, 128),
//!     segment_bytes: 64 << 10,
//!     ..StoreConfig::default()
//! };
//! // Taken at parallelism 1 ...
//! let mut store = StateStore::create(&tmp.path().join("p1"), config(0, 1)).unwrap();
//! let clicks: ValueState<u64> = ValueState::register(&mut store, "clicks/count").unwrap();
//! clicks.put(&mut store, Key::new(b"page-7", 128), &3).unwrap();
//! let mut writer = SavepointWriter::new(&tmp.path().join("sp"), 128).unwrap();
//! writer.add_store("state", &mut store).unwrap();
//! writer.finish().unwrap();
//! // ... restored at parallelism 2: the key lands in the shard that owns its key group.
//! let savepoint = Savepoint::open(&tmp.path().join("sp")).unwrap();
//! assert_eq!(savepoint.operator_uids(), ["clicks"]);
//! let owner = KeyGroupRange::shard_for(Key::new(b"page-7", 128).group, 2, 128);
//! let mut shard = StateStore::create(&tmp.path().join("p2"), config(owner, 2)).unwrap();
//! assert_eq!(savepoint.restore_into("state", &|_| true, &mut shard).unwrap(), 1);
//! let clicks: ValueState<u64> = ValueState::register(&mut shard, "clicks/count").unwrap();
//! assert_eq!(clicks.get_owned(&shard, Key::new(b"page-7", 128)).unwrap(), Some(3));
//! ```
//!
//! # Directory
//! ```text
//! <savepoint dir>/
//!   op-<hex of the uid's UTF-8 bytes>.wsp   one per operator uid with state ([`savepoint_file_name`])
//! ```
//! Each file is written atomically and durably (temp file, fsync, rename, directory fsync), so
//! a file present under its final name is whole. The directory holds nothing else: whether *all*
//! files of a savepoint were written is for the caller to record (the runtime's manifest, after
//! [`SavepointWriter::finish`] returned). A savepoint of a job without keyed state is an empty
//! directory.
//!
//! # File layout
//! All integers are little-endian. The file is a header, one block per key group present (in
//! ascending key-group order, back to back), a footer indexing the blocks, and a fixed trailer.
//! Every part carries a CRC-32 (IEEE, crc32fast), checked before any of its bytes is used.
//! Offsets, magic, version and the header length stay where they are in every future version.
//!
//! ## Header (at offset 0, `H` bytes)
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"WEIRSVP\0"` ([`SAVEPOINT_MAGIC`]) |
//! | 8 | 4 | format version ([`SAVEPOINT_FORMAT_VERSION`]) |
//! | 12 | 4 | header length `H`, CRC included |
//! | 16 | 2 | max parallelism (number of key groups) of the job |
//! | 18 | 2 | uid length `U` (at most [`MAX_UID_BYTES`]) |
//! | 20 | 4 | number of state names `N` |
//! | 24 | `U` | operator uid, UTF-8 |
//! | 24 + `U` | .. | `N` state names in ascending (space, name) order, each: `u16` space length, `u16` name length, space, name (UTF-8) |
//! | `H` - 4 | 4 | CRC-32 of bytes `0..H-4` |
//!
//! A state name is stored without its uid (`acc` for `count/acc`); its *space* separates the
//! stores of one operator ([`SavepointWriter::add_store`]). Entries refer to names by position.
//!
//! ## Block (one per key group present, `B` bytes)
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | block length `B`, CRC included |
//! | 4 | 2 | key group |
//! | 6 | 2 | zero |
//! | 8 | 4 | number of entries |
//! | 12 | .. | entries in ascending (name position, key) order, each: `u32` name position, `u32` key length, `u32` value length, key, value |
//! | `B` - 4 | 4 | CRC-32 of bytes `0..B-4` of the block |
//!
//! Values are the stored bytes (rkyv archives), copied unchanged; they are unaligned here and
//! aligned again, and validated on first typed read, once restored.
//!
//! ## Footer (at offset `F`, `8 + 24 K` bytes)
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | number of blocks `K` |
//! | 4 | 24 `K` | per block, by ascending key group: `u16` key group, `u16` zero, `u32` block length, `u64` block offset, `u32` entries, `u32` zero |
//! | 4 + 24 `K` | 4 | CRC-32 of bytes `0..4+24K` of the footer |
//!
//! ## Trailer (the last 24 bytes)
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | footer offset `F` |
//! | 8 | 4 | footer length |
//! | 12 | 8 | magic `b"WEIRSVPE"` |
//! | 20 | 4 | CRC-32 of bytes `0..20` of the trailer |
//!
//! A reader checks that the parts tile the file exactly: blocks start at `H`, each begins where
//! the previous ended, the footer begins where the last block ended, and the trailer ends the
//! file. A truncated or extended file therefore fails [`Savepoint::open`].

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, StateError};
use crate::keygroup::{KeyGroup, MAX_MAX_PARALLELISM};
use crate::record::StateId;
use crate::store::{Key, StateStore};

/// Magic bytes at the start of a savepoint file.
pub const SAVEPOINT_MAGIC: [u8; 8] = *b"WEIRSVP\0";
/// Version of the savepoint file format.
pub const SAVEPOINT_FORMAT_VERSION: u32 = 1;
/// The longest operator uid a savepoint holds, in UTF-8 bytes: its hex form must fit in a file
/// name (255 bytes on common file systems).
pub const MAX_UID_BYTES: usize = 120;

const TRAILER_MAGIC: [u8; 8] = *b"WEIRSVPE";
const HEADER_FIXED_BYTES: usize = 24;
const BLOCK_FIXED_BYTES: usize = 12;
const ENTRY_FIXED_BYTES: usize = 12;
const INDEX_ENTRY_BYTES: usize = 24;
const TRAILER_BYTES: usize = 24;
const CRC_BYTES: usize = 4;
/// A header longer than this is taken for corruption rather than read into memory.
const MAX_HEADER_BYTES: u32 = 16 << 20;

/// The file name of operator `uid`'s savepoint file: `op-<hex of uid bytes>.wsp`, a safe file
/// name whatever the uid.
pub fn savepoint_file_name(uid: &str) -> String {
    let mut name = String::with_capacity(7 + 2 * uid.len());
    name.push_str("op-");
    for b in uid.bytes() {
        name.push(char::from(HEX[usize::from(b >> 4)]));
        name.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    name.push_str(".wsp");
    name
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The uid named by a savepoint file name, `None` if the name is not one
/// ([`savepoint_file_name`] is its inverse; only lowercase hex is accepted, so one uid has one
/// name).
fn uid_of_file_name(name: &str) -> Option<String> {
    let hex = name.strip_prefix("op-")?.strip_suffix(".wsp")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| HEX.iter().position(|&h| h == c).map(|d| d as u8);
    let bytes: Option<Vec<u8>> = hex.chunks_exact(2).map(|p| Some((digit(p[0])? << 4) | digit(p[1])?)).collect();
    String::from_utf8(bytes?).ok()
}

/// What a savepoint holds; returned by [`SavepointWriter::finish`] and [`Savepoint::summary`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SavepointSummary {
    /// Number of key groups of the job it was taken from (`None` when it holds no state).
    pub max_parallelism: Option<u16>,
    /// One per operator uid with state, by ascending uid.
    pub operators: Vec<OperatorSummary>,
}

/// One operator's part of a savepoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorSummary {
    /// The operator's uid.
    pub uid: String,
    /// Its file in the savepoint directory.
    pub file_name: String,
    /// Entries, all spaces and states.
    pub entries: u64,
    /// Size of its file.
    pub file_bytes: u64,
    /// The key groups it has entries in, ascending.
    pub key_groups: Vec<KeyGroup>,
}

/// A (space, state name without uid) pair, the unit a savepoint file's name table lists.
type StateName = (String, String);

/// Entries are spilled into this many files (at most), by ranges of key groups, so that
/// [`SavepointWriter::finish`] holds one range's entries in memory at a time.
const SPILL_BUCKETS: usize = 64;

/// Fixed bytes of a spilled entry: uid index (u16), key group (u16), name id, key length,
/// value length (u32 each).
const SPILL_FIXED_BYTES: usize = 16;

/// Collects the entries of stores and writes a savepoint directory.
///
/// Memory stays bounded whatever the state size: [`SavepointWriter::add_store`] copies each
/// entry into one of up to 64 spill files (by range of key groups, under a temporary
/// directory inside the savepoint directory), and [`SavepointWriter::finish`] reads them back
/// one at a time, sorts that range's entries and appends its blocks to every operator's file.
/// So the writer holds about 1/64 of the state at once (more only when keys crowd into few key
/// groups: a key group's block is sorted whole), and writes the state twice.
#[derive(Debug)]
pub struct SavepointWriter {
    dir: PathBuf,
    max_parallelism: u16,
    /// Operator uids in order of first use, with their state names (each with a provisional
    /// id, in order of first use) and whether an entry uses them.
    operators: Vec<(String, BTreeMap<StateName, u32>)>,
    spill: Option<Spill>,
}

/// The spill files of a [`SavepointWriter`]: one per bucket of key groups, with the bytes
/// written to each (what a failed `add_store` truncates back to).
#[derive(Debug)]
struct Spill {
    dir: PathBuf,
    files: Vec<std::io::BufWriter<File>>,
    lens: Vec<u64>,
}

impl Spill {
    fn create(parent: &Path, buckets: usize) -> Result<Spill> {
        let dir = parent.join(format!(".spill-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| StateError::io("create spill dir", &dir, e))?;
        let mut files = Vec::with_capacity(buckets);
        for bucket in 0..buckets {
            let path = dir.join(format!("{bucket:03}"));
            let file = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| StateError::io("create spill file", &path, e))?;
            files.push(std::io::BufWriter::with_capacity(16 << 10, file));
        }
        Ok(Spill { dir, files, lens: vec![0; buckets] })
    }

    fn write(&mut self, bucket: usize, parts: &[&[u8]]) -> Result<()> {
        use std::io::Write;
        let out = &mut self.files[bucket];
        for part in parts {
            out.write_all(part).map_err(|e| StateError::io("write spill file", &self.dir, e))?;
            self.lens[bucket] += part.len() as u64;
        }
        Ok(())
    }

    /// Drops what was written after `lens`.
    fn truncate(&mut self, lens: &[u64]) -> Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        for (bucket, out) in self.files.iter_mut().enumerate() {
            out.flush().map_err(|e| StateError::io("write spill file", &self.dir, e))?;
            let file = out.get_mut();
            file.set_len(lens[bucket]).map_err(|e| StateError::io("truncate spill file", &self.dir, e))?;
            file.seek(SeekFrom::Start(lens[bucket])).map_err(|e| StateError::io("seek spill file", &self.dir, e))?;
            self.lens[bucket] = lens[bucket];
        }
        Ok(())
    }

    /// Everything written to `bucket`.
    fn read(&mut self, bucket: usize) -> Result<Vec<u8>> {
        use std::io::Write;
        let out = &mut self.files[bucket];
        out.flush().map_err(|e| StateError::io("write spill file", &self.dir, e))?;
        let mut bytes = vec![0u8; self.lens[bucket] as usize];
        out.get_ref().read_exact_at(&mut bytes, 0).map_err(|e| StateError::io("read spill file", &self.dir, e))?;
        Ok(bytes)
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One spilled entry, pointing into its bucket's bytes.
struct Spilled<'a> {
    uid: u16,
    group: u16,
    name: u32,
    key: &'a [u8],
    value: &'a [u8],
}

/// Parses a bucket's spilled entries (written by this process: a malformed one is a bug).
fn parse_spilled(bytes: &[u8]) -> Result<Vec<Spilled<'_>>> {
    let mut out = Vec::new();
    let mut c = Cursor::new(bytes, 0);
    while c.pos < bytes.len() {
        let entry = (|| {
            let (uid, group, name) = (c.u16()?, c.u16()?, c.u32()?);
            let (key_len, value_len) = (c.u32()? as usize, c.u32()? as usize);
            Some(Spilled { uid, group, name, key: c.take(key_len)?, value: c.take(value_len)? })
        })();
        out.push(entry.ok_or_else(|| StateError::Misuse("a savepoint spill file is damaged".into()))?);
    }
    Ok(out)
}

impl SavepointWriter {
    /// A writer of a savepoint of a job with `max_parallelism` key groups into `dir` (created if
    /// missing). A directory that already holds savepoint files is refused: one directory, one
    /// savepoint.
    pub fn new(dir: &Path, max_parallelism: u16) -> Result<SavepointWriter> {
        if max_parallelism == 0 || max_parallelism > MAX_MAX_PARALLELISM {
            return Err(StateError::Misuse(format!(
                "max parallelism {max_parallelism} is not in 1..={MAX_MAX_PARALLELISM}"
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| StateError::io("create savepoint dir", dir, e))?;
        if let Some(existing) = savepoint_files(dir)?.into_iter().next() {
            return Err(StateError::Misuse(format!(
                "savepoint directory {} already holds {}",
                dir.display(),
                existing.1.display()
            )));
        }
        Ok(SavepointWriter { dir: dir.to_owned(), max_parallelism, operators: Vec::new(), spill: None })
    }

    fn buckets(&self) -> usize {
        SPILL_BUCKETS.min(usize::from(self.max_parallelism))
    }

    /// Adds every live entry of `store` under the namespace `space` (the runtime uses `"state"`
    /// for an operator's keyed state store and `"timers"` for its timer store). State names must
    /// be `<operator uid>/<name>`. On any error nothing of `store` was added. Adding an entry of
    /// the same (space, state name, key group, key) twice makes [`SavepointWriter::finish`]
    /// fail with a [`StateError::Misuse`].
    pub fn add_store(&mut self, space: &str, store: &mut StateStore) -> Result<()> {
        if space.len() > usize::from(u16::MAX) {
            return Err(StateError::Misuse(format!("space name of {} bytes is too long", space.len())));
        }
        if store.config().max_parallelism != self.max_parallelism {
            return Err(StateError::MaxParallelismMismatch {
                path: store.dir().to_owned(),
                found: store.config().max_parallelism,
                expected: self.max_parallelism,
            });
        }
        let mut names: BTreeMap<StateId, (String, StateName)> = BTreeMap::new();
        for info in store.states() {
            let (uid, name) = split_state_name(&info.name)?;
            names.insert(info.id, (uid.to_owned(), (space.to_owned(), name.to_owned())));
        }
        if self.spill.is_none() {
            self.spill = Some(Spill::create(&self.dir, self.buckets())?);
        }
        let before = (self.operators.clone(), self.spill.as_ref().map(|s| s.lens.clone()).unwrap_or_default());
        let mut failure = None;
        // State id -> (uid index, name id), resolved on first use.
        let mut resolved: BTreeMap<StateId, (u16, u32)> = BTreeMap::new();
        let (max, buckets) = (self.max_parallelism, self.buckets());
        let dir = store.dir().to_owned();
        store.for_each(|state, group, key, value, _| {
            if failure.is_some() {
                return;
            }
            let Some((uid, name)) = names.get(&state) else {
                failure = Some(StateError::Misuse(format!(
                    "store {} holds entries of state id {state}, which is not registered",
                    dir.display()
                )));
                return;
            };
            if group.0 >= max {
                failure = Some(StateError::Misuse(format!(
                    "entry of {uid}/{} in key group {} of a job with {max} key groups",
                    name.1, group.0
                )));
                return;
            }
            let (uid_index, name_id) = match resolved.get(&state) {
                Some(r) => *r,
                None => {
                    let index = match self.operators.iter().position(|(u, _)| u == uid) {
                        Some(i) => i,
                        None => {
                            self.operators.push((uid.clone(), BTreeMap::new()));
                            self.operators.len() - 1
                        }
                    };
                    let names = &mut self.operators[index].1;
                    let next = names.len() as u32;
                    let id = *names.entry(name.clone()).or_insert(next);
                    let r = (index as u16, id);
                    resolved.insert(state, r);
                    r
                }
            };
            let (Ok(key_len), Ok(value_len)) = (u32::try_from(key.len()), u32::try_from(value.len())) else {
                failure = Some(StateError::Misuse(format!("an entry of {uid}/{} exceeds 4 GiB", name.1)));
                return;
            };
            let mut fixed = [0u8; SPILL_FIXED_BYTES];
            fixed[0..2].copy_from_slice(&uid_index.to_le_bytes());
            fixed[2..4].copy_from_slice(&group.0.to_le_bytes());
            fixed[4..8].copy_from_slice(&name_id.to_le_bytes());
            fixed[8..12].copy_from_slice(&key_len.to_le_bytes());
            fixed[12..16].copy_from_slice(&value_len.to_le_bytes());
            let bucket = usize::from(group.0) * buckets / usize::from(max);
            if let Some(spill) = self.spill.as_mut()
                && let Err(e) = spill.write(bucket, &[&fixed, key, value])
            {
                failure = Some(e);
            }
        })?;
        if self.operators.len() > usize::from(u16::MAX) {
            failure.get_or_insert(StateError::Misuse("a savepoint holds at most 65535 operators".into()));
        }
        match failure {
            None => Ok(()),
            Some(e) => {
                let (operators, lens) = before;
                self.operators = operators;
                if let Some(spill) = self.spill.as_mut() {
                    spill.truncate(&lens)?;
                }
                Err(e)
            }
        }
    }

    /// Writes one file per operator uid and nothing else, each durably and atomically (temp
    /// file, fsync, rename, then one directory fsync). When it returns `Ok`, every file is
    /// durable; the caller then records the savepoint as complete. On an error no file of the
    /// savepoint is left under its final name.
    pub fn finish(mut self) -> Result<SavepointSummary> {
        let mut summary = SavepointSummary {
            max_parallelism: (!self.operators.is_empty()).then_some(self.max_parallelism),
            operators: Vec::new(),
        };
        let Some(mut spill) = self.spill.take() else { return Ok(summary) };
        // Operators go in ascending uid order, names in ascending order; entries refer to names
        // by that position.
        let mut order: Vec<usize> = (0..self.operators.len()).collect();
        order.sort_by(|a, b| self.operators[*a].0.cmp(&self.operators[*b].0));
        let positions: Vec<Vec<u32>> = self
            .operators
            .iter()
            .map(|(_, names)| {
                let mut position = vec![0u32; names.len()];
                for (i, id) in names.values().enumerate() {
                    position[*id as usize] = i as u32;
                }
                position
            })
            .collect();
        let mut files = Vec::with_capacity(self.operators.len());
        for (uid, names) in &self.operators {
            let names: Vec<&StateName> = names.keys().collect();
            let header = encode_header(uid, self.max_parallelism, &names)?;
            files.push(OperatorFileWriter::create(&self.dir, uid, &header)?);
        }
        for bucket in 0..spill.lens.len() {
            let bytes = spill.read(bucket)?;
            let mut entries = parse_spilled(&bytes)?;
            for e in &mut entries {
                e.name = positions[usize::from(e.uid)][e.name as usize];
            }
            entries.sort_unstable_by(|a, b| (a.uid, a.group, a.name, a.key).cmp(&(b.uid, b.group, b.name, b.key)));
            for group in entries.chunk_by(|a, b| (a.uid, a.group) == (b.uid, b.group)) {
                let (uid, key_group) = (usize::from(group[0].uid), group[0].group);
                if let Some(pair) = group.windows(2).find(|p| (p[0].name, p[0].key) == (p[1].name, p[1].key)) {
                    let (operator, names) = &self.operators[uid];
                    let (space, name) = names.keys().nth(pair[0].name as usize).cloned().unwrap_or_default();
                    return Err(StateError::Misuse(format!(
                        "savepoint holds key {:02x?} (key group {key_group}) of {operator}/{name} in space {space:?} twice",
                        pair[0].key
                    )));
                }
                let block: Vec<(u32, &[u8], &[u8])> = group.iter().map(|e| (e.name, e.key, e.value)).collect();
                let encoded = encode_block(key_group, &block).ok_or_else(|| {
                    StateError::Misuse(format!(
                        "key group {key_group} of operator {:?} exceeds 4 GiB",
                        self.operators[uid].0
                    ))
                })?;
                files[uid].append_block(key_group, &encoded, block.len() as u32)?;
            }
        }
        drop(spill);
        let mut written = Vec::with_capacity(files.len());
        for i in order {
            let file = files[i].finish()?;
            written.push((i, file));
        }
        sync_dir(&self.dir)?;
        for (i, (file_name, entries, file_bytes, key_groups)) in written {
            summary.operators.push(OperatorSummary {
                uid: self.operators[i].0.clone(),
                file_name,
                entries,
                file_bytes,
                key_groups,
            });
        }
        Ok(summary)
    }
}

/// One operator's savepoint file being written: a temp file that becomes `op-<uid>.wsp` when
/// it is whole and synced.
struct OperatorFileWriter {
    tmp: PathBuf,
    target: PathBuf,
    out: Option<std::io::BufWriter<File>>,
    offset: u64,
    index: Vec<(u16, u32, u64, u32)>,
}

impl OperatorFileWriter {
    fn create(dir: &Path, uid: &str, header: &[u8]) -> Result<OperatorFileWriter> {
        let target = dir.join(savepoint_file_name(uid));
        let tmp = dir.join(format!(".{}.tmp-{}", savepoint_file_name(uid), std::process::id()));
        let file = File::create(&tmp).map_err(|e| StateError::io("create savepoint file", &tmp, e))?;
        let mut f = OperatorFileWriter {
            tmp,
            target,
            out: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            offset: 0,
            index: Vec::new(),
        };
        f.write(header)?;
        Ok(f)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        if let Some(out) = self.out.as_mut() {
            out.write_all(bytes).map_err(|e| StateError::io("write savepoint file", &self.tmp, e))?;
        }
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn append_block(&mut self, group: u16, block: &[u8], entries: u32) -> Result<()> {
        self.index.push((group, block.len() as u32, self.offset, entries));
        self.write(block)
    }

    /// Writes the footer and trailer, syncs and renames the file (the caller syncs the
    /// directory). Returns its name, entries, size and key groups.
    fn finish(&mut self) -> Result<(String, u64, u64, Vec<KeyGroup>)> {
        let footer = encode_footer(&self.index, self.offset);
        self.write(&footer)?;
        let out = self.out.take().ok_or_else(|| StateError::Misuse("savepoint file finished twice".into()))?;
        let file = out.into_inner().map_err(|e| StateError::io("write savepoint file", &self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| StateError::io("fsync savepoint file", &self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.target)
            .map_err(|e| StateError::io("rename savepoint file", &self.target, e))?;
        let name = self.target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let entries = self.index.iter().map(|i| u64::from(i.3)).sum();
        Ok((name, entries, self.offset, self.index.iter().map(|i| KeyGroup(i.0)).collect()))
    }
}

impl Drop for OperatorFileWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StateError::io("fsync savepoint dir", dir, e))
}

/// Splits `<uid>/<name>`.
fn split_state_name(full: &str) -> Result<(&str, &str)> {
    let Some((uid, name)) = full.split_once('/') else {
        return Err(StateError::Misuse(format!("state name {full:?} has no operator uid (`<uid>/<name>`)")));
    };
    if uid.len() > MAX_UID_BYTES {
        return Err(StateError::Misuse(format!("operator uid {uid:?} is longer than {MAX_UID_BYTES} bytes")));
    }
    if name.len() > usize::from(u16::MAX) {
        return Err(StateError::Misuse(format!("state name {full:?} is too long")));
    }
    Ok((uid, name))
}

/// The footer (block index) and trailer of a file whose blocks end at `offset`.
fn encode_footer(index: &[(u16, u32, u64, u32)], offset: u64) -> Vec<u8> {
    let mut footer = Vec::with_capacity(2 * CRC_BYTES + INDEX_ENTRY_BYTES * index.len() + TRAILER_BYTES);
    footer.extend_from_slice(&(index.len() as u32).to_le_bytes());
    for &(group, length, block_offset, entries) in index {
        footer.extend_from_slice(&group.to_le_bytes());
        footer.extend_from_slice(&0u16.to_le_bytes());
        footer.extend_from_slice(&length.to_le_bytes());
        footer.extend_from_slice(&block_offset.to_le_bytes());
        footer.extend_from_slice(&entries.to_le_bytes());
        footer.extend_from_slice(&0u32.to_le_bytes());
    }
    push_crc(&mut footer, 0);
    let footer_len = footer.len() as u32;
    let trailer_start = footer.len();
    footer.extend_from_slice(&offset.to_le_bytes());
    footer.extend_from_slice(&footer_len.to_le_bytes());
    footer.extend_from_slice(&TRAILER_MAGIC);
    push_crc(&mut footer, trailer_start);
    footer
}

/// Appends the CRC-32 of `out[from..]`.
fn push_crc(out: &mut Vec<u8>, from: usize) {
    let crc = crc32fast::hash(&out[from..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

fn encode_header(uid: &str, max_parallelism: u16, names: &[&StateName]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend_from_slice(&SAVEPOINT_MAGIC);
    out.extend_from_slice(&SAVEPOINT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // header length, set below
    out.extend_from_slice(&max_parallelism.to_le_bytes());
    out.extend_from_slice(&(uid.len() as u16).to_le_bytes());
    out.extend_from_slice(&(names.len() as u32).to_le_bytes());
    out.extend_from_slice(uid.as_bytes());
    for (space, name) in names {
        out.extend_from_slice(&(space.len() as u16).to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(space.as_bytes());
        out.extend_from_slice(name.as_bytes());
    }
    let len = out.len() + CRC_BYTES;
    if len > MAX_HEADER_BYTES as usize {
        return Err(StateError::Misuse(format!("the state names of operator {uid:?} exceed {MAX_HEADER_BYTES} bytes")));
    }
    out[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    push_crc(&mut out, 0);
    Ok(out)
}

/// Encodes one key group's block; `None` if it would exceed 4 GiB.
fn encode_block(group: u16, entries: &[(u32, &[u8], &[u8])]) -> Option<Vec<u8>> {
    let body: u64 = entries.iter().map(|(_, k, v)| (ENTRY_FIXED_BYTES + k.len() + v.len()) as u64).sum();
    let len = u32::try_from((BLOCK_FIXED_BYTES + CRC_BYTES) as u64 + body).ok()?;
    let mut out = Vec::with_capacity(len as usize);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (name, key, value) in entries {
        out.extend_from_slice(&name.to_le_bytes());
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(value);
    }
    push_crc(&mut out, 0);
    debug_assert_eq!(out.len(), len as usize);
    Some(out)
}

/// A bounds-checked reader over bytes from disk: every read returns `None` past the end, so
/// parsing never panics.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8], pos: usize) -> Self {
        Cursor { bytes, pos }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let taken = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(taken)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }

    fn str(&mut self, n: usize) -> Option<&'a str> {
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Whether the last four bytes of `bytes` are the CRC-32 of the others.
fn crc_matches(bytes: &[u8]) -> bool {
    let Some(split) = bytes.len().checked_sub(CRC_BYTES) else { return false };
    let (data, crc) = bytes.split_at(split);
    crc.try_into().ok().map(u32::from_le_bytes) == Some(crc32fast::hash(data))
}

/// Where one key group's block lies in an operator's file.
#[derive(Debug, Clone, Copy)]
struct BlockRef {
    key_group: u16,
    offset: u64,
    length: u32,
    entries: u32,
}

/// One operator's file, its header and footer checked.
#[derive(Debug)]
struct OperatorFile {
    uid: String,
    path: PathBuf,
    file_bytes: u64,
    max_parallelism: u16,
    names: Vec<StateName>,
    blocks: Vec<BlockRef>,
}

/// One entry of a checked block, borrowing the block's bytes.
struct EntryRef<'a> {
    name: usize,
    key: &'a [u8],
    value: &'a [u8],
}

/// A savepoint opened for reading. Opening checks every file's header, footer and trailer
/// (CRCs, and that the parts tile the file); a block's CRC is checked when it is read, before
/// any of its entries is used.
#[derive(Debug)]
pub struct Savepoint {
    dir: PathBuf,
    max_parallelism: Option<u16>,
    /// By ascending uid.
    files: Vec<OperatorFile>,
}

impl Savepoint {
    /// Opens the savepoint in `dir`. Files other than `op-*.wsp` are ignored (among them temp
    /// files of a writer that did not finish).
    pub fn open(dir: &Path) -> Result<Savepoint> {
        let mut files = Vec::new();
        for (uid, path) in savepoint_files(dir)? {
            let Some(uid) = uid else {
                return Err(StateError::corrupt(&path, 0, "file name is not op-<lowercase hex of uid>.wsp"));
            };
            let file = OperatorFile::open(&path)?;
            if file.uid != uid {
                return Err(StateError::corrupt(
                    &path,
                    HEADER_FIXED_BYTES as u64,
                    format!("header names operator {:?}, the file name {uid:?}", file.uid),
                ));
            }
            files.push(file);
        }
        files.sort_by(|a, b| a.uid.cmp(&b.uid));
        let max_parallelism = files.first().map(|f| f.max_parallelism);
        if let Some(other) = files.iter().find(|f| Some(f.max_parallelism) != max_parallelism) {
            return Err(StateError::corrupt(
                &other.path,
                16,
                format!(
                    "max parallelism {} differs from {:?} of the savepoint's other files",
                    other.max_parallelism, max_parallelism
                ),
            ));
        }
        Ok(Savepoint { dir: dir.to_owned(), max_parallelism, files })
    }

    /// The number of key groups of the job the savepoint was taken from; `None` when it holds
    /// no state (then it restores into stores of any max parallelism).
    pub fn max_parallelism(&self) -> Option<u16> {
        self.max_parallelism
    }

    /// Operator uids that have state in it, ascending.
    pub fn operator_uids(&self) -> Vec<String> {
        self.files.iter().map(|f| f.uid.clone()).collect()
    }

    /// What the savepoint holds, from the files' indexes (no block is read).
    pub fn summary(&self) -> SavepointSummary {
        SavepointSummary {
            max_parallelism: self.max_parallelism,
            operators: self
                .files
                .iter()
                .map(|f| OperatorSummary {
                    uid: f.uid.clone(),
                    file_name: savepoint_file_name(&f.uid),
                    entries: f.blocks.iter().map(|b| u64::from(b.entries)).sum(),
                    file_bytes: f.file_bytes,
                    key_groups: f.blocks.iter().map(|b| KeyGroup(b.key_group)).collect(),
                })
                .collect(),
        }
    }

    /// Reads every block of every file and checks its CRC and structure; returns the number of
    /// entries. Takes time proportional to the savepoint's size.
    pub fn verify_all(&self) -> Result<u64> {
        let mut entries = 0;
        let mut buf = Vec::new();
        for file in &self.files {
            let handle = File::open(&file.path).map_err(|e| StateError::io("open savepoint file", &file.path, e))?;
            for block in &file.blocks {
                entries += file.read_block(&handle, block, &mut buf)?.len() as u64;
            }
        }
        Ok(entries)
    }

    /// Puts into `store` every entry of namespace `space` of the operators whose uid `keep`
    /// accepts and whose key group lies in `store.config().key_groups`, registering their state
    /// names (`<uid>/<name>`, without a value type). Reads only the blocks of those key groups,
    /// found through each file's index. Returns the number of entries restored.
    ///
    /// A block's CRC and structure are checked before any of its entries is put. On an error,
    /// `store` may hold the entries of blocks restored before the failing one: discard it.
    /// The savepoint's max parallelism must equal the store's.
    pub fn restore_into(&self, space: &str, keep: &dyn Fn(&str) -> bool, store: &mut StateStore) -> Result<u64> {
        let Some(max_parallelism) = self.max_parallelism else { return Ok(0) };
        if store.config().max_parallelism != max_parallelism {
            return Err(StateError::MaxParallelismMismatch {
                path: self.dir.clone(),
                found: max_parallelism,
                expected: store.config().max_parallelism,
            });
        }
        let range = store.config().key_groups;
        let mut restored = 0;
        let mut buf = Vec::new();
        for file in self.files.iter().filter(|f| keep(&f.uid)) {
            // The store's state id of each name of the file, for the names in `space`.
            let ids = file
                .names
                .iter()
                .map(|(s, name)| {
                    (s == space).then(|| store.register(&format!("{}/{name}", file.uid), None)).transpose()
                })
                .collect::<Result<Vec<Option<StateId>>>>()?;
            if ids.iter().all(Option::is_none) {
                continue;
            }
            let first = file.blocks.partition_point(|b| b.key_group < range.start);
            let end = file.blocks.partition_point(|b| b.key_group < range.end);
            let Some(blocks) = file.blocks.get(first..end).filter(|b| !b.is_empty()) else { continue };
            let handle = File::open(&file.path).map_err(|e| StateError::io("open savepoint file", &file.path, e))?;
            for block in blocks {
                for entry in file.read_block(&handle, block, &mut buf)? {
                    if let Some(Some(id)) = ids.get(entry.name) {
                        let key = Key { group: KeyGroup(block.key_group), bytes: entry.key };
                        store.put_raw_aligned(*id, key, entry.value)?;
                        restored += 1;
                    }
                }
            }
        }
        Ok(restored)
    }
}

/// The savepoint files in `dir`, each with the uid its name encodes (`None` for an `op-*.wsp`
/// name that encodes none).
fn savepoint_files(dir: &Path) -> Result<Vec<(Option<String>, PathBuf)>> {
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| StateError::io("list savepoint dir", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StateError::io("list savepoint dir", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("op-") && name.ends_with(".wsp") {
            files.push((uid_of_file_name(name), entry.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Reads `len` bytes at `offset`; a short file is corruption (the caller checked the length).
fn read_at(file: &File, path: &Path, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
    buf.clear();
    buf.resize(len, 0);
    file.read_exact_at(buf, offset).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => StateError::corrupt(path, offset, "savepoint file ends early"),
        _ => StateError::io("read savepoint file", path, e),
    })
}

impl OperatorFile {
    /// Opens one file and checks its header, trailer and footer.
    fn open(path: &Path) -> Result<OperatorFile> {
        let corrupt = |offset: u64, reason: &str| StateError::corrupt(path, offset, reason);
        let file = File::open(path).map_err(|e| StateError::io("open savepoint file", path, e))?;
        let file_bytes = file.metadata().map_err(|e| StateError::io("stat savepoint file", path, e))?.len();
        let mut buf = Vec::new();
        if file_bytes < (HEADER_FIXED_BYTES + CRC_BYTES + TRAILER_BYTES) as u64 {
            return Err(corrupt(0, "file shorter than a savepoint header and trailer"));
        }
        read_at(&file, path, 0, HEADER_FIXED_BYTES, &mut buf)?;
        let mut fixed = Cursor::new(&buf, 0);
        if fixed.take(8) != Some(&SAVEPOINT_MAGIC[..]) {
            return Err(corrupt(0, "bad savepoint magic"));
        }
        let (version, header_len) = (fixed.u32(), fixed.u32().unwrap_or(0));
        if header_len < (HEADER_FIXED_BYTES + CRC_BYTES) as u32
            || header_len > MAX_HEADER_BYTES
            || u64::from(header_len) > file_bytes - TRAILER_BYTES as u64
        {
            return Err(corrupt(12, "header length out of bounds"));
        }
        read_at(&file, path, 0, header_len as usize, &mut buf)?;
        if !crc_matches(&buf) {
            return Err(corrupt(0, "header CRC mismatch"));
        }
        if version != Some(SAVEPOINT_FORMAT_VERSION) {
            return Err(StateError::Incompatible {
                file: path.to_owned(),
                found: version.unwrap_or(0),
                expected: SAVEPOINT_FORMAT_VERSION,
            });
        }
        let (uid, max_parallelism, names) =
            parse_header(&buf[..buf.len() - CRC_BYTES]).map_err(|reason| corrupt(0, reason))?;
        let blocks = read_index(&file, path, file_bytes, u64::from(header_len), max_parallelism, &mut buf)?;
        Ok(OperatorFile { uid, path: path.to_owned(), file_bytes, max_parallelism, names, blocks })
    }

    /// Reads `block` into `buf`, checks it, and returns its entries.
    fn read_block<'b>(&self, file: &File, block: &BlockRef, buf: &'b mut Vec<u8>) -> Result<Vec<EntryRef<'b>>> {
        read_at(file, &self.path, block.offset, block.length as usize, buf)?;
        let corrupt = |reason: &str| {
            StateError::corrupt(&self.path, block.offset, format!("block of key group {}: {reason}", block.key_group))
        };
        if !crc_matches(buf) {
            return Err(corrupt("CRC mismatch"));
        }
        let body = &buf[..buf.len() - CRC_BYTES];
        let mut c = Cursor::new(body, 0);
        if c.u32() != Some(block.length) || c.u16() != Some(block.key_group) || c.u16() != Some(0) {
            return Err(corrupt("block header disagrees with the index"));
        }
        if c.u32() != Some(block.entries) {
            return Err(corrupt("entry count disagrees with the index"));
        }
        let mut entries = Vec::with_capacity(block.entries as usize);
        for _ in 0..block.entries {
            let entry = (|| {
                let (name, key_len, value_len) = (c.u32()?, c.u32()?, c.u32()?);
                Some(EntryRef {
                    name: name as usize,
                    key: c.take(key_len as usize)?,
                    value: c.take(value_len as usize)?,
                })
            })()
            .ok_or_else(|| corrupt("entry runs past the block"))?;
            if entry.name >= self.names.len() {
                return Err(corrupt("entry refers to an unknown state name"));
            }
            if entries.last().is_some_and(|prev: &EntryRef<'_>| (prev.name, prev.key) >= (entry.name, entry.key)) {
                return Err(corrupt("entries out of order"));
            }
            entries.push(entry);
        }
        if c.pos != body.len() {
            return Err(corrupt("bytes after the last entry"));
        }
        Ok(entries)
    }
}

/// Parses a header (CRC already checked and cut off): uid, max parallelism, state names.
fn parse_header(bytes: &[u8]) -> std::result::Result<(String, u16, Vec<StateName>), &'static str> {
    let mut c = Cursor::new(bytes, 16);
    let max_parallelism = c.u16().ok_or("header too short")?;
    if max_parallelism == 0 || max_parallelism > MAX_MAX_PARALLELISM {
        return Err("max parallelism out of bounds");
    }
    let uid_len = c.u16().ok_or("header too short")?;
    let count = c.u32().ok_or("header too short")?;
    let uid = c.str(usize::from(uid_len)).ok_or("uid is not UTF-8 within the header")?.to_owned();
    // A name takes at least 4 bytes: no allocation larger than the header.
    let mut names: Vec<StateName> = Vec::with_capacity((count as usize).min(bytes.len() / 4));
    for _ in 0..count {
        let (space_len, name_len) = (c.u16().ok_or("name table too short")?, c.u16().ok_or("name table too short")?);
        let space = c.str(usize::from(space_len)).ok_or("space is not UTF-8 within the header")?;
        let name = c.str(usize::from(name_len)).ok_or("state name is not UTF-8 within the header")?;
        if names.last().is_some_and(|(s, n)| (s.as_str(), n.as_str()) >= (space, name)) {
            return Err("state names out of order");
        }
        names.push((space.to_owned(), name.to_owned()));
    }
    if c.pos != bytes.len() {
        return Err("bytes after the name table");
    }
    Ok((uid, max_parallelism, names))
}

/// Reads and checks the trailer and footer; returns the blocks, which tile `header_len..F`.
fn read_index(
    file: &File,
    path: &Path,
    file_bytes: u64,
    header_len: u64,
    max_parallelism: u16,
    buf: &mut Vec<u8>,
) -> Result<Vec<BlockRef>> {
    let corrupt = |offset: u64, reason: &str| StateError::corrupt(path, offset, reason);
    let trailer_at = file_bytes - TRAILER_BYTES as u64;
    read_at(file, path, trailer_at, TRAILER_BYTES, buf)?;
    let mut c = Cursor::new(buf, 0);
    let (footer_at, footer_len) = (c.u64().unwrap_or(0), c.u32().unwrap_or(0));
    if c.take(8) != Some(&TRAILER_MAGIC[..]) || !crc_matches(buf) {
        return Err(corrupt(trailer_at, "bad savepoint trailer (truncated file?)"));
    }
    let max_footer_len = (2 * CRC_BYTES + INDEX_ENTRY_BYTES * usize::from(max_parallelism)) as u64;
    if footer_at < header_len
        || u64::from(footer_len) > max_footer_len
        || footer_at.checked_add(u64::from(footer_len)) != Some(trailer_at)
    {
        return Err(corrupt(trailer_at, "footer position out of bounds"));
    }
    read_at(file, path, footer_at, footer_len as usize, buf)?;
    if !crc_matches(buf) {
        return Err(corrupt(footer_at, "footer CRC mismatch"));
    }
    let mut c = Cursor::new(buf, 0);
    let count = c.u32().unwrap_or(0) as usize;
    if footer_len as usize != 2 * CRC_BYTES + INDEX_ENTRY_BYTES * count {
        return Err(corrupt(footer_at, "footer length disagrees with its block count"));
    }
    let mut blocks: Vec<BlockRef> = Vec::with_capacity(count);
    let mut next_offset = header_len;
    for _ in 0..count {
        let entry = (|| {
            let (key_group, zero, length, offset, entries, zero2) =
                (c.u16()?, c.u16()?, c.u32()?, c.u64()?, c.u32()?, c.u32()?);
            (zero == 0 && zero2 == 0).then_some(BlockRef { key_group, offset, length, entries })
        })()
        .ok_or_else(|| corrupt(footer_at, "bad block index entry"))?;
        let max_entries = (entry.length as usize).saturating_sub(BLOCK_FIXED_BYTES + CRC_BYTES) / ENTRY_FIXED_BYTES;
        if entry.key_group >= max_parallelism
            || blocks.last().is_some_and(|prev| prev.key_group >= entry.key_group)
            || entry.offset != next_offset
            || (entry.length as usize) < BLOCK_FIXED_BYTES + CRC_BYTES
            || entry.entries as usize > max_entries
        {
            return Err(corrupt(footer_at, "block index does not describe the file's blocks"));
        }
        next_offset = entry.offset + u64::from(entry.length);
        blocks.push(entry);
    }
    if next_offset != footer_at {
        return Err(corrupt(footer_at, "blocks do not end where the footer starts"));
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spill_truncates_back_and_reads_what_was_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::create(dir.path(), 2).unwrap();
        spill.write(0, &[b"abc"]).unwrap();
        spill.write(1, &[b"xy"]).unwrap();
        let lens = spill.lens.clone();
        spill.write(0, &[b"def", b"g"]).unwrap();
        spill.write(1, &[b"z"]).unwrap();
        spill.truncate(&lens).unwrap();
        spill.write(1, &[b"w"]).unwrap();
        assert_eq!(spill.read(0).unwrap(), b"abc");
        assert_eq!(spill.read(1).unwrap(), b"xyw");
        let path = spill.dir.clone();
        drop(spill);
        assert!(!path.exists(), "the spill directory goes with the writer");
    }

    #[test]
    fn spilled_entries_parse_back_and_damage_is_an_error() {
        let mut bytes = Vec::new();
        for (uid, group, name, key, value) in [(1u16, 7u16, 2u32, &b"k1"[..], &b"v"[..]), (0, 3, 0, b"", b"value")] {
            bytes.extend_from_slice(&uid.to_le_bytes());
            bytes.extend_from_slice(&group.to_le_bytes());
            bytes.extend_from_slice(&name.to_le_bytes());
            bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
            bytes.extend_from_slice(key);
            bytes.extend_from_slice(value);
        }
        let parsed = parse_spilled(&bytes).unwrap();
        let got: Vec<_> = parsed.iter().map(|e| (e.uid, e.group, e.name, e.key, e.value)).collect();
        assert_eq!(got, vec![(1, 7, 2, &b"k1"[..], &b"v"[..]), (0, 3, 0, &b""[..], &b"value"[..])]);
        assert!(parse_spilled(&bytes[..bytes.len() - 1]).is_err());
    }
}
