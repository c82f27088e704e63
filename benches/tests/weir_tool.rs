//! The `weir` command on the state crate's golden checkpoint directory, intact and corrupted.

use std::path::Path;
use std::process::Command;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn golden_copy() -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../state/tests/golden"), work.path());
    work
}

fn weir(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weir")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspect_lists_checkpoints_stores_and_states() {
    let dir = golden_copy();
    let (ok, out, err) = weir(&["inspect", dir.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    for id in 1..=3 {
        assert!(out.contains(&format!("checkpoint {id} ")), "{out}");
    }
    assert!(out.contains("store=shard-0"), "{out}");
    assert!(out.contains("golden/count"), "{out}");
    assert!(out.contains("index_snapshot=of checkpoint 2"), "{out}");
}

#[test]
fn verify_passes_on_intact_files_and_names_the_first_bad_one() {
    let dir = golden_copy();
    let path = dir.path().to_str().unwrap();
    let (ok, out, err) = weir(&["verify", path]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ok: 3 manifests, 3 stores"), "{out}");
    // Flip a byte inside the first segment's records.
    let segment = dir.path().join("shard-0/seg-00000001.log");
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[4096 + 40] ^= 0x01;
    std::fs::write(&segment, bytes).unwrap();
    let (ok, _, err) = weir(&["verify", path]);
    assert!(!ok, "a corrupt segment must fail verification");
    assert!(err.contains("seg-00000001.log:4096"), "names file and offset: {err}");
    // Not a checkpoint directory at all.
    let (ok, _, err) = weir(&["verify", "/nonexistent"]);
    assert!(!ok);
    assert!(err.contains("not a checkpoint directory"), "{err}");
}

/// Passes records on and counts them, the count kept as operator state.
#[derive(Default)]
struct Tally(u64);

impl weir::operators::operator::Operator for Tally {
    type In = u64;
    type Out = u64;
    fn process<C: weir::operators::operator::Collector<u64>>(
        &mut self,
        value: u64,
        timestamp: i64,
        _: &mut weir::operators::operator::OperatorContext<'_>,
        out: &mut C,
    ) -> weir::operators::Result<()> {
        self.0 += 1;
        out.collect(value, timestamp);
        Ok(())
    }
    fn snapshot_state(
        &mut self,
        state: &mut weir::operators::operator_state::OperatorStateSnapshot,
    ) -> weir::operators::Result<()> {
        state.set_list("seen", weir::operators::operator_state::Redistribution::EvenSplit, &[self.0])
    }
}

/// A checkpointed job's directory lists its source offsets and operator state; a savepoint
/// lists its operators, and a damaged savepoint file fails verification, named.
#[test]
fn inspect_shows_source_offsets_and_savepoints() {
    use weir::checkpointing::CheckpointSettings;
    use weir::prelude::*;
    let work = tempfile::tempdir().unwrap();
    let checkpoints = work.path().join("checkpoints");
    let job = Job::new("tool");
    job.source("numbers", VecSource::new((0..10_000u64).collect()).with_splits(4))
        .operator("tally", Tally::default)
        .key_by("by-key", |n: &u64| n % 10)
        .reduce("count", |k: &u64| (*k, 0u64), |(k, c): (u64, u64), _| (k, c + 1))
        .sink("out", CollectSink::new());
    let config = JobConfig::default().with_parallelism(2).with_checkpointing(CheckpointSettings::new(&checkpoints, 5));
    job.run(config).unwrap().wait().unwrap();
    let (ok, out, err) = weir(&["inspect", checkpoints.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("job=tool"), "{out}");
    // Four splits of 2,500 records, two a shard.
    for (split, shard) in [(0, 0), (1, 1), (2, 0), (3, 1)] {
        assert!(out.contains(&format!("source numbers split {split}/4 (shard {shard}) offset=2500")), "{out}");
    }
    // Each instance wrote its count: one u64, 8 bytes.
    for shard in 0..2 {
        let line = format!("operator state tally list seen mode=EvenSplit shard {shard} items=1 bytes=8");
        assert!(out.contains(&line), "{out}");
    }
    let (ok, out, err) = weir(&["verify", checkpoints.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    // A damaged commit slot (a restore would skip it) fails verification, named with its offset.
    let slots: Vec<std::path::PathBuf> = std::fs::read_dir(checkpoints.join("manifests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slot") && std::fs::read(p).unwrap().iter().any(|b| *b != 0))
        .collect();
    assert!(!slots.is_empty(), "a commit slot holds a manifest");
    let mut bytes = std::fs::read(&slots[0]).unwrap();
    bytes[40] ^= 0x04;
    std::fs::write(&slots[0], &bytes).unwrap();
    let (ok, _, err) = weir(&["verify", checkpoints.to_str().unwrap()]);
    assert!(!ok, "a damaged commit slot must fail verification");
    let name = slots[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&format!("{name}:32")), "names the slot and the payload's offset: {err}");

    // A savepoint of a job that is still running (its source never ends).
    let savepoint = work.path().join("savepoint");
    let job = Job::new("tool");
    let endless = IterSource::new(|shard: usize, _| (0u64..).map(move |n| n * 2 + shard as u64));
    job.source("numbers", endless)
        .key_by("by-key", |n: &u64| n % 10)
        .reduce("count", |k: &u64| (*k, 0u64), |(k, c): (u64, u64), _| (k, c + 1))
        .sink("out", CollectSink::new());
    let settings = CheckpointSettings::new(work.path().join("run-2"), 5);
    let handle = job.run(JobConfig::default().with_parallelism(2).with_checkpointing(settings)).unwrap();
    // Once a checkpoint completed (the first is due one interval after the start), the job has
    // state for the savepoint to hold.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while handle.checkpoint_stats().completed.is_empty() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint completed");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    handle.stop_with_savepoint(&savepoint, false).unwrap();
    let (ok, out, err) = weir(&["inspect", savepoint.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("savepoint ") && out.contains("operator count"), "{out}");
    let (ok, out, err) = weir(&["verify", savepoint.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let file = savepoint.join(weir::state::savepoint::savepoint_file_name("count"));
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let (ok, _, err) = weir(&["verify", savepoint.to_str().unwrap()]);
    assert!(!ok, "a damaged savepoint must fail verification");
    assert!(err.contains(&file.display().to_string()), "{err}");
}
