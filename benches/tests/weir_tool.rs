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
