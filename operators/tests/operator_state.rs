//! Operator state through the operator harness: an operator that keeps non-keyed state in
//! memory (a buffer of records not yet flushed, a count) hands it over at a snapshot and gets
//! it back at `open` after a restore, and nothing written after the snapshot comes back.

use weir_operators::Result;
use weir_operators::harness::OperatorHarness;
use weir_operators::operator::{Collector, Operator, OperatorContext, Timestamp};
use weir_operators::operator_state::{OperatorStateSnapshot, Redistribution};

/// Emits its records in batches of three (a batch writer's buffer), and counts every record it
/// took. Both live in memory only; the buffer is split on a rescale, the count is kept by every
/// instance (a union list of the old instances' counts).
#[derive(Default)]
struct Batcher {
    buffer: Vec<String>,
    seen: u64,
    /// What `open` found, for the test to look at.
    restored_counts: Vec<u64>,
}

impl Operator for Batcher {
    type In = String;
    type Out = Vec<String>;

    fn open(&mut self, ctx: &mut OperatorContext<'_>) -> Result<()> {
        self.buffer = ctx.operator_state.list("buffer")?;
        self.restored_counts = ctx.operator_state.list("seen")?;
        self.seen = self.restored_counts.iter().sum();
        Ok(())
    }

    fn process<C: Collector<Vec<String>>>(
        &mut self,
        value: String,
        timestamp: Timestamp,
        _: &mut OperatorContext<'_>,
        out: &mut C,
    ) -> Result<()> {
        self.seen += 1;
        self.buffer.push(value);
        if self.buffer.len() == 3 {
            out.collect(std::mem::take(&mut self.buffer), timestamp);
        }
        Ok(())
    }

    fn snapshot_state(&mut self, state: &mut OperatorStateSnapshot) -> Result<()> {
        state.set_list("buffer", Redistribution::EvenSplit, &self.buffer)?;
        state.set_list("seen", Redistribution::Union, &[self.seen])
    }
}

fn words(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

#[test]
fn a_restored_instance_gets_back_its_buffer_and_count_as_of_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = OperatorHarness::new(dir.path(), "batcher", Batcher::default()).unwrap();
    for word in words(&["a", "b", "c", "d", "e"]) {
        h.process(word, 0).unwrap();
    }
    assert_eq!(h.take_output(), vec![(words(&["a", "b", "c"]), 0)]);
    let snapshot = h.snapshot().unwrap();
    let lists: Vec<&str> = snapshot.operator_state.lists().iter().map(|l| l.name.as_str()).collect();
    assert_eq!(lists, ["buffer", "seen"]);
    // After the snapshot: lost in the crash (the source replays it after the restore).
    h.process("f".to_owned(), 0).unwrap();
    assert_eq!(h.take_output(), vec![(words(&["d", "e", "f"]), 0)]);

    let mut h = h.restore(&snapshot, Batcher::default()).unwrap();
    assert_eq!(h.operator().buffer, words(&["d", "e"]), "the buffer as of the snapshot");
    assert_eq!(h.operator().restored_counts, [5], "the count as of the snapshot");
    h.process("f".to_owned(), 0).unwrap();
    assert_eq!(h.take_output(), vec![(words(&["d", "e", "f"]), 0)]);
    h.process("g".to_owned(), 0).unwrap();
    // A second snapshot and restore carry what the restored instance went on with.
    let snapshot = h.snapshot().unwrap();
    let h = h.restore(&snapshot, Batcher::default()).unwrap();
    assert_eq!(h.operator().buffer, words(&["g"]));
    assert_eq!(h.operator().seen, 7);
}

#[test]
fn an_operator_that_writes_nothing_restores_with_empty_lists() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = OperatorHarness::new(dir.path(), "batcher", Batcher::default()).unwrap();
    let snapshot = h.snapshot().unwrap();
    // Lists written empty come back empty; so do names never written.
    let mut h = h.restore(&snapshot, Batcher::default()).unwrap();
    for word in ["x", "y"] {
        h.process(word.to_owned(), 0).unwrap();
    }
    assert!(h.take_output().is_empty(), "the restored buffer was empty");
    let mut empty = OperatorStateSnapshot::new();
    assert!(empty.is_empty());
    empty.set_list::<u64>("seen", Redistribution::Union, &[]).unwrap();
    assert!(!empty.is_empty());
}
