//! Decoders of files weir reads never panic, whatever the bytes, and report corruption as a
//! typed error: segment headers, index snapshots, checkpoint handles, values kept outside a store.

use proptest::prelude::*;
use weir_state::index::{Found, Index};
use weir_state::segment::SegmentHeader;
use weir_state::store::{CheckpointHandle, Key};
use weir_state::{StateStore, StoreConfig};

proptest! {
    #[test]
    fn segment_header_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        let _ = SegmentHeader::decode(&bytes, std::path::Path::new("seg"));
    }

    /// Values kept outside a store (operator state in a manifest) round-trip at any alignment,
    /// and arbitrary or truncated bytes are an error, never a panic.
    #[test]
    fn decode_value_round_trips_and_never_panics(
        items in proptest::collection::vec(any::<(u64, String)>(), 0..8),
        offset in 0usize..16,
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        cut in 0usize..64,
    ) {
        let encoded = weir_state::states::encode_value(&items).unwrap();
        let mut shifted = vec![0u8; offset];
        shifted.extend_from_slice(&encoded);
        let decoded: Vec<(u64, String)> = weir_state::states::decode_value(&shifted[offset..]).unwrap();
        prop_assert_eq!(decoded, items);
        let _ = weir_state::states::decode_value::<Vec<(u64, String)>>(&bytes);
        let _ = weir_state::states::decode_value::<Vec<(u64, String)>>(&encoded[..encoded.len().saturating_sub(cut)]);
    }

    #[test]
    fn checkpoint_handle_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = CheckpointHandle::decode(&bytes);
    }

    #[test]
    fn index_snapshot_open_never_panics_on_damaged_files(at in 0usize..40_000, value: u8, cut in 0usize..40_000) {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::new().unwrap();
        for k in 1..500u64 {
            let hash = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let Found::Absent(vacancy) = index.find(hash, |_| Ok(true)).unwrap() else { panic!("key {k} twice") };
            index.insert(vacancy, k).unwrap();
        }
        let mut bytes = index.snapshot(9).unwrap();
        let at = at % bytes.len();
        bytes[at] = value;
        bytes.truncate(cut.max(1).min(bytes.len()).max(bytes.len() - cut % 64));
        let path = dir.path().join("index-1.idx");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok((mut index, _)) = Index::open_snapshot(&path) {
            let _ = index.verify_all();
        }
    }
}

#[test]
fn durability_runs_on_its_own_thread_and_can_be_polled() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = StateStore::create(dir.path(), StoreConfig::default()).unwrap();
    store.put_value(7, Key::new(b"k", 4096), &1u64).unwrap();
    let pending = store.checkpoint(1).unwrap();
    let completion = pending.task.spawn();
    while !completion.is_done() {
        std::thread::yield_now();
    }
    assert_eq!(completion.wait().unwrap().checkpoint_id, 1);
}
