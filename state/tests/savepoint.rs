//! Savepoints: state taken at one parallelism restores at another, matched by operator uid and
//! key group; the format is canonical (same state, same bytes) and pinned by a golden file;
//! corruption is a typed error naming the file, never a panic and never a silent partial
//! restore; and a model test checks savepoint + restore against a `BTreeMap`.
//!
//! Regenerate the golden savepoint (only with a deliberate format change, and a format version
//! bump) with `WEIR_REGENERATE_GOLDEN=1 cargo test -p weir-state --test savepoint`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use weir_state::keygroup::{KeyEncode, KeyGroupRange};
use weir_state::savepoint::{SAVEPOINT_FORMAT_VERSION, Savepoint, SavepointWriter, savepoint_file_name};
use weir_state::states::{ListState, MapState, ValueState};
use weir_state::store::{Key, RestoreOptions};
use weir_state::{ErrorClass, StateError, StateStore, StoreConfig};

const MAX: u16 = 64;

fn config(shard: usize, parallelism: usize, max: u16) -> StoreConfig {
    StoreConfig {
        shard: shard as u32,
        segment_bytes: 64 * 1024,
        max_parallelism: max,
        key_groups: KeyGroupRange::for_shard(shard, parallelism, max),
        index_snapshot_every: 2,
        index_snapshot_tail_bytes: 16 * 1024,
        ..StoreConfig::default()
    }
}

fn enc<K: KeyEncode + ?Sized>(k: &K) -> Vec<u8> {
    let mut v = Vec::new();
    k.encode_key(&mut v);
    v
}

fn user(k: u32) -> Vec<u8> {
    enc(&format!("user-{k}"))
}

/// The typed states of the round-trip job: three operators, and timers of one of them.
struct Job {
    count: ValueState<u64>,
    history: ListState<String>,
    by_id: MapState<u32, String>,
    timers: ValueState<u64>,
}

impl Job {
    fn register(state: &mut StateStore, timers: &mut StateStore) -> Job {
        Job {
            count: ValueState::register(state, "count/acc").unwrap(),
            history: ListState::register(state, "fraud/history").unwrap(),
            by_id: MapState::register(state, "join/by-id").unwrap(),
            timers: ValueState::register(timers, "fraud/timers-event").unwrap(),
        }
    }

    /// Writes the contents [`Job::check`] expects for the keys of `0..keys` that `state` owns.
    fn fill(&self, state: &mut StateStore, timers: &mut StateStore, keys: u32) {
        for k in 0..keys {
            let bytes = user(k);
            let key = Key::new(&bytes, MAX);
            if !state.config().key_groups.contains(key.group) {
                continue;
            }
            self.count.put(state, key, &(u64::from(k) * 7)).unwrap();
            if k % 3 == 0 {
                for i in 0..=k % 4 {
                    self.history.add(state, key, &format!("event-{k}-{i}")).unwrap();
                }
            }
            if k % 2 == 0 {
                for uk in 0..k % 5 {
                    self.by_id.put(state, key, &uk, &format!("v{k}.{uk}")).unwrap();
                }
            }
            if k % 4 == 0 {
                self.timers.put(timers, key, &(1_000 + u64::from(k))).unwrap();
            }
        }
    }

    /// Checks that the keys `state` owns hold what [`Job::fill`] wrote (the map only if `join`
    /// was restored) and that the others are absent.
    fn check(&self, state: &mut StateStore, timers: &StateStore, keys: u32, join: bool) {
        for k in 0..keys {
            let bytes = user(k);
            let key = Key::new(&bytes, MAX);
            let owned = state.config().key_groups.contains(key.group);
            let count = self.count.get_owned(state, key).unwrap();
            assert_eq!(count, owned.then_some(u64::from(k) * 7), "count of key {k}");
            let history: Vec<String> =
                self.history.iter(state, key).unwrap().map(|s| s.unwrap().as_str().to_owned()).collect();
            let expected: Vec<String> =
                if owned && k % 3 == 0 { (0..=k % 4).map(|i| format!("event-{k}-{i}")).collect() } else { Vec::new() };
            assert_eq!(history, expected, "history of key {k}");
            let map_keys = self.by_id.keys_encoded(state, key).unwrap();
            let expected_len = if owned && join && k % 2 == 0 { k % 5 } else { 0 };
            assert_eq!(map_keys.len() as u32, expected_len, "map of key {k}");
            for uk in 0..expected_len {
                let v = self.by_id.get(state, key, &uk).unwrap().map(|v| v.as_str().to_owned());
                assert_eq!(v, Some(format!("v{k}.{uk}")));
            }
            let timer = self.timers.get_owned(timers, key).unwrap();
            assert_eq!(timer, (owned && k % 4 == 0).then_some(1_000 + u64::from(k)), "timer of key {k}");
        }
    }
}

/// Stores of `parallelism` shards filled by [`Job::fill`], as (state, timers) pairs.
fn job_at(root: &Path, parallelism: usize, keys: u32) -> Vec<(StateStore, StateStore)> {
    (0..parallelism)
        .map(|shard| {
            let mut state =
                StateStore::create(&root.join(format!("state-{shard}")), config(shard, parallelism, MAX)).unwrap();
            let mut timers =
                StateStore::create(&root.join(format!("timers-{shard}")), config(shard, parallelism, MAX)).unwrap();
            Job::register(&mut state, &mut timers).fill(&mut state, &mut timers, keys);
            (state, timers)
        })
        .collect()
}

fn take_savepoint(dir: &Path, stores: &mut [(StateStore, StateStore)]) -> weir_state::savepoint::SavepointSummary {
    let mut writer = SavepointWriter::new(dir, MAX).unwrap();
    for (state, timers) in stores {
        writer.add_store("state", state).unwrap();
        writer.add_store("timers", timers).unwrap();
    }
    writer.finish().unwrap()
}

/// Restores `savepoint` into fresh stores of `parallelism` shards; returns them and the number
/// of entries restored.
fn restore_at(
    root: &Path,
    savepoint: &Savepoint,
    parallelism: usize,
    keep: &dyn Fn(&str) -> bool,
) -> (Vec<(StateStore, StateStore)>, u64) {
    let mut restored = 0;
    let stores = (0..parallelism)
        .map(|shard| {
            let mut state =
                StateStore::create(&root.join(format!("state-{shard}")), config(shard, parallelism, MAX)).unwrap();
            let mut timers =
                StateStore::create(&root.join(format!("timers-{shard}")), config(shard, parallelism, MAX)).unwrap();
            restored += savepoint.restore_into("state", keep, &mut state).unwrap();
            restored += savepoint.restore_into("timers", keep, &mut timers).unwrap();
            (state, timers)
        })
        .collect();
    (stores, restored)
}

fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect()
}

#[test]
fn round_trip_across_parallelisms() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = 300;
    let mut source = job_at(&tmp.path().join("p2"), 2, keys);
    let sp_dir = tmp.path().join("savepoint");
    let summary = take_savepoint(&sp_dir, &mut source);
    let uids: Vec<&str> = summary.operators.iter().map(|o| o.uid.as_str()).collect();
    assert_eq!(uids, ["count", "fraud", "join"]);
    assert_eq!(summary.max_parallelism, Some(MAX));
    for op in &summary.operators {
        assert!(op.key_groups.windows(2).all(|w| w[0] < w[1]), "key groups ascending");
        assert_eq!(op.file_bytes, std::fs::metadata(sp_dir.join(&op.file_name)).unwrap().len());
    }
    // One file per uid and nothing else.
    let names: Vec<String> = files_of(&sp_dir).into_keys().collect();
    assert_eq!(names, ["count", "fraud", "join"].map(savepoint_file_name));

    let savepoint = Savepoint::open(&sp_dir).unwrap();
    assert_eq!(savepoint.summary(), summary);
    assert_eq!(savepoint.max_parallelism(), Some(MAX));
    assert_eq!(savepoint.operator_uids(), ["count", "fraud", "join"]);
    let total: u64 = summary.operators.iter().map(|o| o.entries).sum();
    assert_eq!(savepoint.verify_all().unwrap(), total);
    let source_keys: u64 = source.iter().map(|(s, t)| s.stats().keys + t.stats().keys).sum();
    assert_eq!(total, source_keys);

    for parallelism in [4, 1] {
        let root = tmp.path().join(format!("restored-p{parallelism}"));
        let (mut stores, restored) = restore_at(&root, &savepoint, parallelism, &|_| true);
        assert_eq!(restored, total, "P={parallelism}");
        for (state, timers) in &mut stores {
            let job = Job::register(state, timers);
            job.check(state, timers, keys, true);
        }
        // The format is canonical: the state restored at P, saved again, gives the same bytes.
        let again = tmp.path().join(format!("savepoint-from-p{parallelism}"));
        assert_eq!(take_savepoint(&again, &mut stores), summary);
        assert_eq!(files_of(&again), files_of(&sp_dir), "P={parallelism}");
    }
}

#[test]
fn restored_values_survive_checkpoint_and_restore_of_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let mut source = job_at(&tmp.path().join("src"), 1, 100);
    take_savepoint(&tmp.path().join("sp"), &mut source);
    let savepoint = Savepoint::open(&tmp.path().join("sp")).unwrap();
    let (mut stores, _) = restore_at(&tmp.path().join("dst"), &savepoint, 1, &|_| true);
    let (state, timers) = &mut stores[0];
    let pending = state.checkpoint(1).unwrap();
    pending.task.run().unwrap();
    let dir = state.dir().to_owned();
    let mut state =
        StateStore::restore(&dir, &pending.handle, config(0, 1, MAX), RestoreOptions { verify_all: true }).unwrap();
    let job = Job::register(&mut state, timers);
    job.check(&mut state, timers, 100, true);
}

#[test]
fn keep_filter_drops_an_operator() {
    let tmp = tempfile::tempdir().unwrap();
    let mut source = job_at(&tmp.path().join("p3"), 3, 200);
    let summary = take_savepoint(&tmp.path().join("sp"), &mut source);
    let savepoint = Savepoint::open(&tmp.path().join("sp")).unwrap();
    let (mut stores, restored) = restore_at(&tmp.path().join("p2"), &savepoint, 2, &|uid| uid != "join");
    let join = summary.operators.iter().find(|o| o.uid == "join").unwrap().entries;
    let total: u64 = summary.operators.iter().map(|o| o.entries).sum();
    assert_eq!(restored, total - join);
    for (state, timers) in &mut stores {
        assert!(state.states().all(|s| !s.name.starts_with("join/")), "dropped names are not registered");
        let job = Job::register(state, timers);
        job.check(state, timers, 200, false);
    }
}

#[test]
fn misuse_and_mismatch_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut source = job_at(&tmp.path().join("src"), 1, 50);
    // The same entries twice: the savepoint is refused, and leaves no file behind.
    let dup_dir = tmp.path().join("dup");
    let mut writer = SavepointWriter::new(&dup_dir, MAX).unwrap();
    writer.add_store("state", &mut source[0].0).unwrap();
    writer.add_store("state", &mut source[0].0).unwrap();
    let again = writer.finish().unwrap_err();
    assert_eq!(again.class(), ErrorClass::Misuse, "{again}");
    assert!(again.to_string().contains("twice"), "{again}");
    assert_eq!(std::fs::read_dir(&dup_dir).unwrap().count(), 0, "nothing left in {}", dup_dir.display());
    let sp_dir = tmp.path().join("sp");
    let mut writer = SavepointWriter::new(&sp_dir, MAX).unwrap();
    writer.add_store("state", &mut source[0].0).unwrap();
    // The same entries in another space are other entries.
    writer.add_store("copy", &mut source[0].0).unwrap();
    let mut other_max = StateStore::create(&tmp.path().join("m128"), config(0, 1, 128)).unwrap();
    let e = writer.add_store("state", &mut other_max).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Incompatible, "{e}");
    let mut no_uid = StateStore::create(&tmp.path().join("no-uid"), config(0, 1, MAX)).unwrap();
    let v: ValueState<u64> = ValueState::register(&mut no_uid, "nouid").unwrap();
    v.put(&mut no_uid, Key::new(b"k", MAX), &1).unwrap();
    assert_eq!(writer.add_store("state", &mut no_uid).unwrap_err().class(), ErrorClass::Misuse);
    let summary = writer.finish().unwrap();
    assert_eq!(summary.operators.len(), 3);

    let e = SavepointWriter::new(&sp_dir, MAX).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Misuse, "a directory holds one savepoint: {e}");
    let savepoint = Savepoint::open(&sp_dir).unwrap();
    let e = savepoint.restore_into("state", &|_| true, &mut other_max).unwrap_err();
    assert!(matches!(e, StateError::MaxParallelismMismatch { found: MAX, expected: 128, .. }), "{e}");
    assert_eq!(e.class(), ErrorClass::Incompatible);
    let mut copy = StateStore::create(&tmp.path().join("copy"), config(0, 1, MAX)).unwrap();
    let copied = savepoint.restore_into("copy", &|_| true, &mut copy).unwrap();
    assert_eq!(copied, source[0].0.stats().keys);
}

#[test]
fn a_job_without_state_has_an_empty_savepoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut empty = StateStore::create(&tmp.path().join("s"), config(0, 1, MAX)).unwrap();
    let mut writer = SavepointWriter::new(&tmp.path().join("sp"), MAX).unwrap();
    writer.add_store("state", &mut empty).unwrap();
    let summary = writer.finish().unwrap();
    assert!(summary.operators.is_empty());
    let savepoint = Savepoint::open(&tmp.path().join("sp")).unwrap();
    assert_eq!(savepoint.max_parallelism(), None);
    let mut target = StateStore::create(&tmp.path().join("t"), config(0, 1, 128)).unwrap();
    assert_eq!(savepoint.restore_into("state", &|_| true, &mut target).unwrap(), 0);
}

// ---- corruption ----------------------------------------------------------------------------

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Where the parts of a valid savepoint file lie: header length, blocks (offset, length),
/// footer (offset, length).
struct Layout {
    header: usize,
    blocks: Vec<(usize, usize)>,
    footer: (usize, usize),
}

fn layout(bytes: &[u8]) -> Layout {
    let trailer = bytes.len() - 24;
    let footer = (u64_at(bytes, trailer) as usize, u32_at(bytes, trailer + 8) as usize);
    let count = u32_at(bytes, footer.0) as usize;
    let blocks = (0..count)
        .map(|i| {
            let e = footer.0 + 4 + 24 * i;
            (u64_at(bytes, e + 8) as usize, u32_at(bytes, e + 4) as usize)
        })
        .collect();
    Layout { header: u32_at(bytes, 12) as usize, blocks, footer }
}

/// Recomputes the CRC at the end of `bytes[at..at + len]`.
fn reseal(bytes: &mut [u8], at: usize, len: usize) {
    let crc = crc32fast::hash(&bytes[at..at + len - 4]);
    bytes[at + len - 4..at + len].copy_from_slice(&crc.to_le_bytes());
}

/// A savepoint of one operator ("count") taken at P=1, keys 0..120.
fn one_operator_savepoint(root: &Path) -> PathBuf {
    let mut store = StateStore::create(&root.join("src"), config(0, 1, MAX)).unwrap();
    let count: ValueState<u64> = ValueState::register(&mut store, "count/acc").unwrap();
    for k in 0..120 {
        count.put(&mut store, Key::new(&user(k), MAX), &u64::from(k)).unwrap();
    }
    let dir = root.join("sp");
    let mut writer = SavepointWriter::new(&dir, MAX).unwrap();
    writer.add_store("state", &mut store).unwrap();
    writer.finish().unwrap();
    dir.join(savepoint_file_name("count"))
}

/// Opens the savepoint of `file` and restores it into a fresh P=1 store; returns the error, and
/// the number of keys in the store afterwards.
fn open_and_restore(root: &Path, file: &Path) -> (std::result::Result<u64, StateError>, u64) {
    let target_dir = root.join(format!("target-{}", rand_suffix()));
    let mut target = StateStore::create(&target_dir, config(0, 1, MAX)).unwrap();
    let result = Savepoint::open(file.parent().unwrap()).and_then(|sp| {
        sp.restore_into("state", &|_| true, &mut target)?;
        sp.verify_all()
    });
    let keys = target.stats().keys;
    drop(target);
    let _ = std::fs::remove_dir_all(target_dir);
    (result, keys)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn assert_corrupt(result: std::result::Result<u64, StateError>, file: &Path, what: &str) {
    let e = result.expect_err(what);
    assert_eq!(e.class(), ErrorClass::Corruption, "{what}: {e}");
    assert!(e.to_string().contains(&*file.to_string_lossy()), "{what}: {e} names the file");
}

#[test]
fn corruption_is_detected_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let file = one_operator_savepoint(tmp.path());
    let good = std::fs::read(&file).unwrap();
    let l = layout(&good);
    assert!(l.blocks.len() > 10);
    let write = |bytes: &[u8]| std::fs::write(&file, bytes).unwrap();

    // A flipped byte in the first block: nothing is restored from it.
    let mut bad = good.clone();
    bad[l.blocks[0].0 + 20] ^= 0x40;
    write(&bad);
    let (result, keys) = open_and_restore(tmp.path(), &file);
    assert_corrupt(result, &file, "block flip");
    assert_eq!(keys, 0, "no entry of a corrupt block is put");
    assert!(Savepoint::open(file.parent().unwrap()).is_ok(), "open reads no block");

    // A flipped byte in the last block: the error names its offset.
    let mut bad = good.clone();
    let last = *l.blocks.last().unwrap();
    bad[last.0 + last.1 - 6] ^= 0x01;
    write(&bad);
    let (result, _) = open_and_restore(tmp.path(), &file);
    let e = result.unwrap_err();
    assert!(matches!(&e, StateError::Corrupt { offset, .. } if *offset == last.0 as u64), "{e}");

    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    for (what, at) in [
        ("magic", 0),
        ("version", 9),
        ("header length", 13),
        ("max parallelism", 16),
        ("uid", 25),
        ("name table", l.header - 6),
        ("header CRC", l.header - 1),
        ("footer count", l.footer.0),
        ("footer entry", l.footer.0 + 4 + 24 + 9),
        ("footer CRC", l.footer.0 + l.footer.1 - 2),
        ("trailer offset", good.len() - 24),
        ("trailer magic", good.len() - 10),
        ("trailer CRC", good.len() - 1),
    ] {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        cases.push((what, bad));
    }
    cases.push(("truncated by one byte", good[..good.len() - 1].to_vec()));
    cases.push(("truncated to half", good[..good.len() / 2].to_vec()));
    cases.push(("truncated to the header", good[..l.header].to_vec()));
    cases.push(("empty", Vec::new()));
    let mut longer = good.clone();
    longer.push(0);
    cases.push(("one byte appended", longer));
    // Footer entries swapped, CRC recomputed: the index no longer tiles the file.
    let mut swapped = good.clone();
    let (a, b) = (l.footer.0 + 4, l.footer.0 + 28);
    let first: Vec<u8> = swapped[a..b].to_vec();
    swapped.copy_within(b..b + 24, a);
    swapped[b..b + 24].copy_from_slice(&first);
    reseal(&mut swapped, l.footer.0, l.footer.1);
    cases.push(("footer entries swapped", swapped));
    for (what, bad) in cases {
        write(&bad);
        let (result, keys) = open_and_restore(tmp.path(), &file);
        assert_corrupt(result, &file, what);
        assert_eq!(keys, 0, "{what}: nothing restored");
    }

    // A newer format version (with a valid CRC) is Incompatible, not corrupt.
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&(SAVEPOINT_FORMAT_VERSION + 1).to_le_bytes());
    reseal(&mut newer, 0, l.header);
    write(&newer);
    let e = Savepoint::open(file.parent().unwrap()).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Incompatible, "{e}");

    // A file renamed to another uid's name.
    write(&good);
    std::fs::rename(&file, file.with_file_name(savepoint_file_name("other"))).unwrap();
    let e = Savepoint::open(file.parent().unwrap()).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Corruption, "{e}");
}

/// A valid savepoint file with two spaces and several names, built once.
fn sample_file() -> &'static (Vec<u8>, Layout) {
    static SAMPLE: OnceLock<(Vec<u8>, Layout)> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let mut state = StateStore::create(&tmp.path().join("s"), config(0, 1, MAX)).unwrap();
        let mut timers = StateStore::create(&tmp.path().join("t"), config(0, 1, MAX)).unwrap();
        let count: ValueState<u64> = ValueState::register(&mut state, "x/acc").unwrap();
        let names: ListState<String> = ListState::register(&mut state, "x/names").unwrap();
        let timer: ValueState<u64> = ValueState::register(&mut timers, "x/timers-event").unwrap();
        for k in 0..24 {
            let bytes = user(k);
            let key = Key::new(&bytes, MAX);
            count.put(&mut state, key, &u64::from(k)).unwrap();
            names.add(&mut state, key, &format!("n{k}")).unwrap();
            timer.put(&mut timers, key, &u64::from(k)).unwrap();
        }
        let mut writer = SavepointWriter::new(&tmp.path().join("sp"), MAX).unwrap();
        writer.add_store("state", &mut state).unwrap();
        writer.add_store("timers", &mut timers).unwrap();
        writer.finish().unwrap();
        let bytes = std::fs::read(tmp.path().join("sp").join(savepoint_file_name("x"))).unwrap();
        let l = layout(&bytes);
        (bytes, l)
    })
}

/// Writes `bytes` as operator "x"'s file, opens, restores both spaces and verifies. Must not
/// panic; returns whether it all succeeded.
fn try_everything(bytes: &[u8]) -> bool {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sp");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(savepoint_file_name("x")), bytes).unwrap();
    let Ok(savepoint) = Savepoint::open(&dir) else { return false };
    let mut store = StateStore::create(&tmp.path().join("t"), config(0, 1, MAX)).unwrap();
    let restored = savepoint.restore_into("state", &|_| true, &mut store).is_ok()
        && savepoint.restore_into("timers", &|_| true, &mut store).is_ok();
    savepoint.verify_all().is_ok() && restored
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(128),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(junk in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = try_everything(&junk);
    }

    /// Mutations of a valid file, with the CRC of the mutated part recomputed, so the checks
    /// behind the CRCs run too. Any flip without a reseal must fail.
    #[test]
    fn mutated_files_never_panic(
        part in 0usize..4,
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
        cut in any::<prop::sample::Index>(),
    ) {
        let (good, l) = sample_file();
        let (start, len) = match part {
            0 => (0, l.header),
            1 => l.blocks[at.index(l.blocks.len())],
            2 => l.footer,
            _ => (good.len() - 24, 24),
        };
        let mut bad = good.clone();
        let pos = start + at.index(len - 4);
        bad[pos] ^= xor;
        prop_assert!(!try_everything(&bad), "unsealed flip at {} accepted", pos);
        reseal(&mut bad, start, len);
        let _ = try_everything(&bad);
        bad.truncate(cut.index(bad.len()));
        prop_assert!(!try_everything(&bad), "truncation accepted");
    }
}

// ---- model ---------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// Sets `a/count` of key k.
    Count(u16, u64),
    /// Sets `b/name` of key k.
    Name(u16, String),
    /// Sets the timer `a/timers` of key k.
    Timer(u16, u64),
    /// Deletes key k from all three.
    Delete(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u16..80, any::<u64>()).prop_map(|(k, v)| Op::Count(k, v)),
        3 => (0u16..80, "[a-z]{0,24}").prop_map(|(k, v)| Op::Name(k, v)),
        2 => (0u16..80, any::<u64>()).prop_map(|(k, v)| Op::Timer(k, v)),
        2 => (0u16..80).prop_map(Op::Delete),
    ]
}

#[derive(Debug, Default, PartialEq)]
struct Model {
    count: BTreeMap<u16, u64>,
    name: BTreeMap<u16, String>,
    timer: BTreeMap<u16, u64>,
}

struct ModelStates {
    count: ValueState<u64>,
    name: ValueState<String>,
    timer: ValueState<u64>,
}

fn model_states(state: &mut StateStore, timers: &mut StateStore) -> ModelStates {
    ModelStates {
        count: ValueState::register(state, "a/count").unwrap(),
        name: ValueState::register(state, "b/name").unwrap(),
        timer: ValueState::register(timers, "a/timers").unwrap(),
    }
}

fn shard_stores(root: &Path, parallelism: usize, max: u16) -> Vec<(StateStore, StateStore)> {
    (0..parallelism)
        .map(|s| {
            (
                StateStore::create(&root.join(format!("s{s}")), config(s, parallelism, max)).unwrap(),
                StateStore::create(&root.join(format!("t{s}")), config(s, parallelism, max)).unwrap(),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    /// Random puts and deletes at P=`from`, optionally through a checkpoint and restore of the
    /// source stores, savepoint, restore at P=`to`: every shard holds exactly the model's
    /// entries of its key groups.
    #[test]
    fn savepoint_restores_the_model_at_any_parallelism(
        ops in proptest::collection::vec(op(), 0..200),
        from in 1usize..=4,
        to in 1usize..=5,
        max in prop_oneof![Just(1u16), Just(7), Just(32)],
        through_checkpoint in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut model = Model::default();
        let mut source = shard_stores(&tmp.path().join("from"), from, max);
        for op in &ops {
            let k = match op { Op::Count(k, _) | Op::Name(k, _) | Op::Timer(k, _) | Op::Delete(k) => *k };
            let bytes = enc(&k);
            let key = Key::new(&bytes, max);
            let (state, timers) = &mut source[KeyGroupRange::shard_for(key.group, from, max)];
            let s = model_states(state, timers);
            match op {
                Op::Count(_, v) => { s.count.put(state, key, v).unwrap(); model.count.insert(k, *v); }
                Op::Name(_, v) => { s.name.put(state, key, v).unwrap(); model.name.insert(k, v.clone()); }
                Op::Timer(_, v) => { s.timer.put(timers, key, v).unwrap(); model.timer.insert(k, *v); }
                Op::Delete(_) => {
                    s.count.delete(state, key).unwrap();
                    s.name.delete(state, key).unwrap();
                    s.timer.delete(timers, key).unwrap();
                    model.count.remove(&k);
                    model.name.remove(&k);
                    model.timer.remove(&k);
                }
            }
        }
        if through_checkpoint {
            source = source
                .into_iter()
                .enumerate()
                .map(|(shard, (state, timers))| {
                    let reopen = |mut store: StateStore| {
                        let pending = store.checkpoint(1).unwrap();
                        pending.task.run().unwrap();
                        let dir = store.dir().to_owned();
                        drop(store);
                        StateStore::restore(&dir, &pending.handle, config(shard, from, max), RestoreOptions::default())
                            .unwrap()
                    };
                    (reopen(state), reopen(timers))
                })
                .collect();
        }
        let sp_dir = tmp.path().join("sp");
        let mut writer = SavepointWriter::new(&sp_dir, max).unwrap();
        for (state, timers) in &mut source {
            writer.add_store("state", state).unwrap();
            writer.add_store("timers", timers).unwrap();
        }
        let summary = writer.finish().unwrap();
        let entries = (model.count.len() + model.name.len() + model.timer.len()) as u64;
        prop_assert_eq!(summary.operators.iter().map(|o| o.entries).sum::<u64>(), entries);

        let savepoint = Savepoint::open(&sp_dir).unwrap();
        let mut target = shard_stores(&tmp.path().join("to"), to, max);
        let mut restored = 0;
        let mut found = Model::default();
        for (state, timers) in &mut target {
            restored += savepoint.restore_into("state", &|_| true, state).unwrap();
            restored += savepoint.restore_into("timers", &|_| true, timers).unwrap();
            let s = model_states(state, timers);
            for k in 0..80u16 {
                let bytes = enc(&k);
                let key = Key::new(&bytes, max);
                let owned = state.config().key_groups.contains(key.group);
                let count = s.count.get_owned(state, key).unwrap();
                let name = s.name.get_owned(state, key).unwrap();
                let timer = s.timer.get_owned(timers, key).unwrap();
                prop_assert!(owned || (count.is_none() && name.is_none() && timer.is_none()), "key {} outside its shard", k);
                if let Some(v) = count {
                    found.count.insert(k, v);
                }
                if let Some(v) = name {
                    found.name.insert(k, v);
                }
                if let Some(v) = timer {
                    found.timer.insert(k, v);
                }
            }
            prop_assert_eq!(state.stats().keys + timers.stats().keys, {
                let r = state.config().key_groups;
                let owned = |k: &u16| r.contains(Key::new(&enc(k), max).group);
                (model.count.keys().filter(|k| owned(k)).count()
                    + model.name.keys().filter(|k| owned(k)).count()
                    + model.timer.keys().filter(|k| owned(k)).count()) as u64
            });
        }
        prop_assert_eq!(restored, entries);
        prop_assert_eq!(found, model);
    }
}

// ---- golden --------------------------------------------------------------------------------

const GOLDEN_MAX: u16 = 16;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden_savepoint")
}

/// The golden savepoint's state, taken at P=2: two operators, a value and a list state, timers.
fn write_golden(root: &Path, out: &Path) {
    let mut writer = SavepointWriter::new(out, GOLDEN_MAX).unwrap();
    for shard in 0..2 {
        let mut state = StateStore::create(&root.join(format!("state-{shard}")), config(shard, 2, GOLDEN_MAX)).unwrap();
        let mut timers =
            StateStore::create(&root.join(format!("timers-{shard}")), config(shard, 2, GOLDEN_MAX)).unwrap();
        let count: ValueState<u64> = ValueState::register(&mut state, "golden/count").unwrap();
        let list: ListState<String> = ListState::register(&mut state, "golden/list").unwrap();
        let other: ValueState<String> = ValueState::register(&mut state, "other op/v").unwrap();
        let timer: ValueState<u64> = ValueState::register(&mut timers, "golden/timers-event").unwrap();
        for k in 0..20u64 {
            let bytes = enc(&k);
            let key = Key::new(&bytes, GOLDEN_MAX);
            if !state.config().key_groups.contains(key.group) {
                continue;
            }
            count.put(&mut state, key, &(k * k)).unwrap();
            if k % 3 == 0 {
                list.add(&mut state, key, &format!("item-{k}")).unwrap();
            }
            other.put(&mut state, key, &format!("o{k}")).unwrap();
            timer.put(&mut timers, key, &(k + 100)).unwrap();
        }
        writer.add_store("state", &mut state).unwrap();
        writer.add_store("timers", &mut timers).unwrap();
    }
    writer.finish().unwrap();
}

#[test]
fn golden_savepoint_restores_and_encoding_is_pinned() {
    let tmp = tempfile::tempdir().unwrap();
    if std::env::var_os("WEIR_REGENERATE_GOLDEN").is_some() {
        let _ = std::fs::remove_dir_all(golden_dir());
        write_golden(tmp.path(), &golden_dir());
    }
    // Writing the same state again gives the committed bytes.
    let fresh = tmp.path().join("fresh");
    write_golden(&tmp.path().join("stores"), &fresh);
    assert_eq!(files_of(&fresh), files_of(&golden_dir()), "savepoint encoding changed: bump the format version");

    let savepoint = Savepoint::open(&golden_dir()).unwrap();
    assert_eq!(savepoint.operator_uids(), ["golden", "other op"]);
    assert_eq!(savepoint.max_parallelism(), Some(GOLDEN_MAX));
    let mut state = StateStore::create(&tmp.path().join("s"), config(0, 1, GOLDEN_MAX)).unwrap();
    let mut timers = StateStore::create(&tmp.path().join("t"), config(0, 1, GOLDEN_MAX)).unwrap();
    savepoint.restore_into("state", &|_| true, &mut state).unwrap();
    savepoint.restore_into("timers", &|_| true, &mut timers).unwrap();
    let count: ValueState<u64> = ValueState::register(&mut state, "golden/count").unwrap();
    let list: ListState<String> = ListState::register(&mut state, "golden/list").unwrap();
    let other: ValueState<String> = ValueState::register(&mut state, "other op/v").unwrap();
    let timer: ValueState<u64> = ValueState::register(&mut timers, "golden/timers-event").unwrap();
    for k in 0..20u64 {
        let bytes = enc(&k);
        let key = Key::new(&bytes, GOLDEN_MAX);
        assert_eq!(count.get_owned(&state, key).unwrap(), Some(k * k));
        let items: Vec<String> = list.iter(&state, key).unwrap().map(|s| s.unwrap().as_str().to_owned()).collect();
        assert_eq!(items, if k % 3 == 0 { vec![format!("item-{k}")] } else { vec![] });
        assert_eq!(other.get_owned(&state, key).unwrap(), Some(format!("o{k}")));
        assert_eq!(timer.get_owned(&timers, key).unwrap(), Some(k + 100));
    }
}
