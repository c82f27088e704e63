//! Operator state: an operator instance's own, non-keyed state, as named lists that are taken
//! at every checkpoint barrier and handed back, redistributed, when the job restores (Flink's
//! operator `ListState` of a `CheckpointedFunction`).
//!
//! Keyed state lives in the shard's [`weir_state::StateStore`] and moves with its key groups.
//! Some state belongs to an instance instead: records buffered for a batch write, a
//! per-instance counter, ids waiting for an acknowledgement. An operator keeps it in memory and
//! hands it over as lists:
//!
//! - at every checkpoint barrier the runtime calls
//!   [`Operator::snapshot_state`](crate::operator::Operator::snapshot_state), which writes the
//!   lists into an [`OperatorStateSnapshot`] ([`OperatorStateSnapshot::set_list`]);
//! - after a restore, the instance reads its lists in
//!   [`Operator::open`](crate::operator::Operator::open), from
//!   [`OperatorContext::operator_state`](crate::operator::OperatorContext::operator_state)
//!   ([`OperatorState::list`]: empty when nothing was restored under that name).
//!
//! Each list names its [`Redistribution`]: how the items all old instances wrote are dealt to
//! the new instances ([`redistribute`], [`restore_lists`]).
//!
//! Items are encoded as keyed state values are (rkyv, [`weir_state::states::encode_value`]) and
//! validated when read back. The runtime keeps the lists in the checkpoint's manifest,
//! rewritten whole at every checkpoint: operator state is meant to be small (kilobytes; keyed
//! state is where large state goes).
//!
//! ```
//! use weir_operators::operator_state::{OperatorStateSnapshot, Redistribution, WrittenList, restore_lists};
//!
//! // Two instances wrote their pending ids at a checkpoint...
//! let mut written = Vec::new();
//! for (shard, ids) in [(0, vec![1u64, 2, 3]), (1, vec![4u64])] {
//!     let mut snapshot = OperatorStateSnapshot::new();
//!     snapshot.set_list("pending", Redistribution::EvenSplit, &ids).unwrap();
//!     written.push((shard, snapshot));
//! }
//! // ...and the job restores with one instance, which gets them all.
//! let lists = written.iter().flat_map(|(shard, s)| s.lists().iter().map(|l| WrittenList::of(*shard, l)));
//! let restored = restore_lists(lists, 2, 1, 0).unwrap();
//! assert_eq!(restored.list::<u64>("pending").unwrap(), vec![1, 2, 3, 4]);
//! assert!(restored.list::<u64>("never-written").unwrap().is_empty());
//! ```

use std::collections::BTreeMap;

use weir_state::states::{StateValue, decode_value, encode_value};

use crate::error::{OperatorError, Result};

/// How a list of operator state is dealt to the instances of a restored job.
///
/// Stored in manifests (as rkyv's discriminant): the order of the variants is part of the
/// format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Redistribution {
    /// Each instance gets a share. At the parallelism the checkpoint was taken at, each
    /// instance gets back exactly the items it wrote. At another, the lists of all old
    /// instances are concatenated (by old shard, each list in its order) and cut into
    /// contiguous ranges, one per new instance, whose sizes differ by one at most: range `i`
    /// goes to instance `i`. Flink's split redistribution (`getListState`).
    EvenSplit,
    /// Every instance gets every item: the lists of all old instances, concatenated by old
    /// shard. Flink's `getUnionListState`.
    Union,
}

/// The items instance `shard` of `parallelism` gets of one list, of which `old[s]` is what old
/// instance `s` wrote (`old.len()` is the parallelism of the checkpoint). See
/// [`Redistribution`]. A `shard` outside `parallelism` gets nothing.
pub fn redistribute<T: Clone>(mode: Redistribution, old: &[Vec<T>], parallelism: usize, shard: usize) -> Vec<T> {
    let all = || old.iter().flatten().cloned();
    if shard >= parallelism {
        return Vec::new();
    }
    match mode {
        Redistribution::Union => all().collect(),
        Redistribution::EvenSplit if old.len() == parallelism => old[shard].clone(),
        Redistribution::EvenSplit => {
            let n: usize = old.iter().map(Vec::len).sum();
            let (base, extra) = (n / parallelism, n % parallelism);
            let start = shard * base + shard.min(extra);
            let len = base + usize::from(shard < extra);
            all().skip(start).take(len).collect()
        }
    }
}

/// The operator state restored for one operator instance: its lists by name, encoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperatorState {
    lists: BTreeMap<String, Vec<Vec<u8>>>,
}

static EMPTY: OperatorState = OperatorState::new();

impl OperatorState {
    /// No lists.
    pub const fn new() -> Self {
        OperatorState { lists: BTreeMap::new() }
    }

    /// A shared empty state (what an operator sees when nothing was restored).
    pub fn empty() -> &'static OperatorState {
        &EMPTY
    }

    /// The items of list `name`, decoded, in order; empty when nothing was restored under
    /// that name. `T` must be the type the list was written with. An item that fails
    /// validation is an error naming the list and the item.
    pub fn list<T: StateValue>(&self, name: &str) -> Result<Vec<T>> {
        self.items(name)
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                decode_value::<T>(bytes).map_err(|reason| OperatorError::OperatorState {
                    name: name.to_owned(),
                    reason: format!("item {i}: {reason}"),
                })
            })
            .collect()
    }

    /// The encoded items of list `name` (empty when there is none).
    pub fn items(&self, name: &str) -> &[Vec<u8>] {
        self.lists.get(name).map_or(&[], Vec::as_slice)
    }

    /// The names of the lists restored, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.lists.keys().map(String::as_str)
    }

    /// Whether nothing was restored.
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }
}

/// One list of operator state as an instance wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorStateList {
    /// The list's name (unique within the operator).
    pub name: String,
    /// How it is dealt to the instances of a restored job.
    pub mode: Redistribution,
    /// Its items, each encoded with [`weir_state::states::encode_value`].
    pub items: Vec<Vec<u8>>,
}

/// What an operator instance writes at a checkpoint barrier (see
/// [`Operator::snapshot_state`](crate::operator::Operator::snapshot_state)): its lists, each
/// with its redistribution. A list not written at a checkpoint is not in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperatorStateSnapshot {
    lists: Vec<OperatorStateList>,
}

impl OperatorStateSnapshot {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes list `name`: `items`, in order, to be dealt by `mode` on a restore. Writing a
    /// name again replaces the list.
    pub fn set_list<T: StateValue>(&mut self, name: &str, mode: Redistribution, items: &[T]) -> Result<()> {
        let items = items
            .iter()
            .map(encode_value)
            .collect::<weir_state::Result<Vec<_>>>()
            .map_err(|e| OperatorError::OperatorState { name: name.to_owned(), reason: e.to_string() })?;
        let list = OperatorStateList { name: name.to_owned(), mode, items };
        match self.lists.iter_mut().find(|l| l.name == name) {
            Some(existing) => *existing = list,
            None => self.lists.push(list),
        }
        Ok(())
    }

    /// The lists written, in the order first written.
    pub fn lists(&self) -> &[OperatorStateList] {
        &self.lists
    }

    /// The lists written, by value.
    pub fn into_lists(self) -> Vec<OperatorStateList> {
        self.lists
    }

    /// Whether no list was written.
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }
}

/// One list as one old instance of an operator wrote it at a checkpoint, for
/// [`restore_lists`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenList<'a> {
    /// The old instance (its shard at the checkpoint).
    pub shard: usize,
    /// The list's name.
    pub name: &'a str,
    /// Its redistribution.
    pub mode: Redistribution,
    /// Its encoded items.
    pub items: &'a [Vec<u8>],
}

impl<'a> WrittenList<'a> {
    /// `list` as old instance `shard` wrote it.
    pub fn of(shard: usize, list: &'a OperatorStateList) -> Self {
        WrittenList { shard, name: &list.name, mode: list.mode, items: &list.items }
    }
}

/// The operator state of instance `shard` of `parallelism`, from the lists one operator's
/// instances wrote at a checkpoint taken at `old_parallelism`: each list dealt by its mode
/// ([`redistribute`]); an old instance that wrote nothing under a name counts as an empty list.
///
/// Fails (naming the list) when a list names a shard outside `old_parallelism`, when one old
/// instance wrote a name twice, or when the old instances disagree on a list's mode: such a
/// checkpoint is damaged, or not one this operator wrote.
pub fn restore_lists<'a>(
    written: impl IntoIterator<Item = WrittenList<'a>>,
    old_parallelism: usize,
    parallelism: usize,
    shard: usize,
) -> Result<OperatorState> {
    let error = |name: &str, reason: String| OperatorError::OperatorState { name: name.to_owned(), reason };
    /// What each old instance wrote of one list (`None`: nothing).
    type ByOldShard<'a> = Vec<Option<&'a [Vec<u8>]>>;
    let mut by_name: BTreeMap<&str, (Redistribution, ByOldShard<'_>)> = BTreeMap::new();
    for list in written {
        if list.shard >= old_parallelism {
            let reason = format!("written by shard {} of a checkpoint at parallelism {old_parallelism}", list.shard);
            return Err(error(list.name, reason));
        }
        let (mode, old) = by_name.entry(list.name).or_insert_with(|| (list.mode, vec![None; old_parallelism]));
        if *mode != list.mode {
            return Err(error(list.name, format!("written as {mode:?} and as {:?}", list.mode)));
        }
        if old[list.shard].replace(list.items).is_some() {
            return Err(error(list.name, format!("written twice by shard {}", list.shard)));
        }
    }
    let mut state = OperatorState::new();
    for (name, (mode, old)) in by_name {
        let old: Vec<Vec<&[u8]>> =
            old.into_iter().map(|items| items.unwrap_or(&[]).iter().map(Vec::as_slice).collect()).collect();
        let items = redistribute(mode, &old, parallelism, shard).into_iter().map(<[u8]>::to_vec).collect();
        state.lists.insert(name.to_owned(), items);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn lists(old: &[&[char]]) -> Vec<Vec<char>> {
        old.iter().map(|l| l.to_vec()).collect()
    }

    #[test]
    fn even_split_gives_each_instance_its_own_items_at_the_same_parallelism() {
        let old = lists(&[&['a', 'b', 'c'], &[], &['d']]);
        for shard in 0..3 {
            assert_eq!(redistribute(Redistribution::EvenSplit, &old, 3, shard), old[shard]);
        }
    }

    #[test]
    fn even_split_cuts_the_concatenation_into_near_equal_contiguous_ranges() {
        let old = lists(&[&['a', 'b'], &['c'], &['d', 'e', 'f']]);
        let split = |p: usize| (0..p).map(|s| redistribute(Redistribution::EvenSplit, &old, p, s)).collect::<Vec<_>>();
        assert_eq!(split(2), vec![vec!['a', 'b', 'c'], vec!['d', 'e', 'f']]);
        assert_eq!(split(4), vec![vec!['a', 'b'], vec!['c', 'd'], vec!['e'], vec!['f']]);
        assert_eq!(split(1), vec![vec!['a', 'b', 'c', 'd', 'e', 'f']]);
        assert_eq!(split(8)[6..], [Vec::<char>::new(), Vec::new()]);
        assert!(redistribute(Redistribution::EvenSplit, &old, 2, 2).is_empty(), "no such instance");
    }

    #[test]
    fn union_gives_every_instance_everything() {
        let old = lists(&[&['a'], &['b', 'c']]);
        for p in [1, 2, 5] {
            for shard in 0..p {
                assert_eq!(redistribute(Redistribution::Union, &old, p, shard), vec!['a', 'b', 'c']);
            }
        }
    }

    fn snapshot(lists: &[(&str, Redistribution, &[u64])]) -> OperatorStateSnapshot {
        let mut snapshot = OperatorStateSnapshot::new();
        for (name, mode, items) in lists {
            snapshot.set_list(name, *mode, items).unwrap();
        }
        snapshot
    }

    fn written(snapshots: &[OperatorStateSnapshot]) -> Vec<WrittenList<'_>> {
        snapshots
            .iter()
            .enumerate()
            .flat_map(|(s, snapshot)| snapshot.lists().iter().map(move |l| WrittenList::of(s, l)))
            .collect()
    }

    #[test]
    fn restored_lists_are_dealt_by_their_own_mode_and_missing_ones_are_empty() {
        use Redistribution::{EvenSplit, Union};
        let old = [
            snapshot(&[("split", EvenSplit, &[1, 2, 3]), ("all", Union, &[10])]),
            snapshot(&[("all", Union, &[11, 12])]),
        ];
        let at = |p, s| restore_lists(written(&old), 2, p, s).unwrap();
        assert_eq!(at(2, 1).list::<u64>("split").unwrap(), Vec::<u64>::new(), "shard 1 wrote none");
        assert_eq!(at(2, 0).list::<u64>("split").unwrap(), vec![1, 2, 3]);
        assert_eq!(at(3, 2).list::<u64>("split").unwrap(), vec![3]);
        for (p, s) in [(1, 0), (2, 1), (3, 2)] {
            assert_eq!(at(p, s).list::<u64>("all").unwrap(), vec![10, 11, 12]);
        }
        assert_eq!(at(2, 0).names().collect::<Vec<_>>(), ["all", "split"]);
        assert!(at(2, 0).list::<u64>("unknown").unwrap().is_empty());
        assert!(restore_lists(Vec::new(), 2, 3, 0).unwrap().is_empty());
    }

    #[test]
    fn inconsistent_or_damaged_lists_are_errors_naming_the_list() {
        use Redistribution::{EvenSplit, Union};
        let old = [snapshot(&[("x", EvenSplit, &[1])]), snapshot(&[("x", Union, &[2])])];
        let message = restore_lists(written(&old), 2, 2, 0).unwrap_err().to_string();
        assert!(message.contains("operator state x") && message.contains("Union"), "{message}");
        let message = restore_lists(written(&old), 1, 1, 0).unwrap_err().to_string();
        assert!(message.contains("shard 1 of a checkpoint at parallelism 1"), "{message}");
        let twice = [WrittenList::of(0, &old[0].lists()[0]), WrittenList::of(0, &old[0].lists()[0])];
        assert!(restore_lists(twice, 1, 1, 0).unwrap_err().to_string().contains("written twice"));
        // Bytes that are not an item of the type asked for.
        let garbage = OperatorStateList { name: "g".into(), mode: EvenSplit, items: vec![vec![0xff; 3]] };
        let state = restore_lists([WrittenList::of(0, &garbage)], 1, 1, 0).unwrap();
        let message = state.list::<String>("g").unwrap_err().to_string();
        assert!(message.contains("operator state g") && message.contains("item 0"), "{message}");
    }

    #[test]
    fn writing_a_list_again_replaces_it() {
        let mut snapshot = snapshot(&[("a", Redistribution::EvenSplit, &[1, 2])]);
        snapshot.set_list("a", Redistribution::Union, &[3u64]).unwrap();
        assert_eq!(snapshot.lists().len(), 1);
        let state = restore_lists(written(std::slice::from_ref(&snapshot)), 1, 1, 0).unwrap();
        assert_eq!(state.list::<u64>("a").unwrap(), vec![3]);
    }

    proptest! {
        /// For any lists written at P and any P', EvenSplit keeps every item once and in order,
        /// with shares differing by one at most, and gives each instance its own list when P'
        /// is P; Union gives every instance everything.
        #[test]
        fn redistribution_keeps_every_item(
            sizes in proptest::collection::vec(0usize..20, 1..7),
            parallelism in 1usize..9,
        ) {
            let mut next = 0u32;
            let old: Vec<Vec<u32>> = sizes.iter().map(|n| (0..*n).map(|_| { next += 1; next }).collect()).collect();
            let everything: Vec<u32> = old.iter().flatten().copied().collect();
            let shares: Vec<Vec<u32>> =
                (0..parallelism).map(|s| redistribute(Redistribution::EvenSplit, &old, parallelism, s)).collect();
            prop_assert_eq!(shares.concat(), everything.clone());
            let (min, max) = shares.iter().fold((usize::MAX, 0), |(lo, hi), s| (lo.min(s.len()), hi.max(s.len())));
            if parallelism == old.len() {
                prop_assert_eq!(&shares, &old);
            } else {
                prop_assert!(max - min <= 1, "{:?}", shares);
            }
            for s in 0..parallelism {
                prop_assert_eq!(redistribute(Redistribution::Union, &old, parallelism, s), everything.clone());
            }
        }
    }
}
