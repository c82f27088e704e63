//! The ingest log against a model: random appends, syncs and crashes (the file cut anywhere
//! after the durable prefix, or garbage appended); after every reopen, exactly the durable
//! records are there, in order. Opening arbitrary bytes never panics.

use proptest::prelude::*;
use weir_state::ingest::{IngestLog, IngestStatus};

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<u8>),
    Sync,
    Crash { keep_extra: usize, garbage: Vec<u8> },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 1..40).prop_map(Op::Append),
        2 => Just(Op::Sync),
        1 => (0usize..64, proptest::collection::vec(any::<u8>(), 0..24)).prop_map(|(keep_extra, garbage)| Op::Crash { keep_extra, garbage }),
    ]
}

fn read_all(log: &std::sync::Arc<IngestLog>) -> Vec<Vec<u8>> {
    let mut reader = log.reader(IngestLog::first_offset()).unwrap();
    let mut out = Vec::new();
    while reader.read(&mut out, 16).unwrap() == IngestStatus::More {}
    out.into_iter().map(|(_, p)| p).collect()
}

proptest! {
    #[test]
    fn durable_records_survive_any_crash(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.ingest");
        let mut log = IngestLog::open(&path).unwrap();
        let mut durable: Vec<Vec<u8>> = Vec::new();
        let mut pending: Vec<Vec<u8>> = Vec::new();
        for op in ops {
            match op {
                Op::Append(p) => {
                    log.append(&p).unwrap();
                    pending.push(p);
                }
                Op::Sync => {
                    log.sync().unwrap();
                    durable.append(&mut pending);
                }
                Op::Crash { keep_extra, garbage } => {
                    // Some unsynced bytes may have reached the file, torn anywhere.
                    let end = log.durable_offset();
                    let _ = log.sync();
                    drop(log);
                    let bytes = std::fs::read(&path).unwrap();
                    let cut = (end as usize + keep_extra).min(bytes.len());
                    let mut kept = bytes[..cut].to_vec();
                    kept.extend_from_slice(&garbage);
                    std::fs::write(&path, &kept).unwrap();
                    log = IngestLog::open(&path).unwrap();
                    let recovered = read_all(&log);
                    // Everything durable is there, in order; of the rest, at most a prefix.
                    prop_assert!(recovered.len() >= durable.len());
                    prop_assert_eq!(&recovered[..durable.len()], &durable[..]);
                    let extra = &recovered[durable.len()..];
                    prop_assert!(extra.len() <= pending.len());
                    prop_assert_eq!(extra, &pending[..extra.len()]);
                    durable = recovered;
                    pending.clear();
                }
            }
        }
    }

    #[test]
    fn opening_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.ingest");
        std::fs::write(&path, &bytes).unwrap();
        let _ = IngestLog::open(&path);
    }
}
