//! Merging windows (sessions): which windows exist for a key, and where their contents live.
//!
//! Session windows grow: a record at `ts` opens `[ts, ts + gap)`, and every window it overlaps
//! or touches merges with it into one. Moving a window's contents each time it grows would be
//! costly, so, as in Flink, a merged window keeps its contents under the name of one of the
//! windows it was made of: its **state window**. [`MergingWindowSet`] keeps, per key, the map
//! from each current ("actual") window to its state window.
//!
//! When [`add_window`](MergingWindowSet::add_window) merges, it reports a [`WindowMerge`]: the
//! actual windows that disappeared (the operator clears their triggers and cleanup timers), the
//! state window kept for the result, and the other state windows, whose contents the operator
//! must merge into the kept one. The record that caused the merge is then added under the
//! returned state window.
//!
//! ```
//! use weir_operators::window::TimeWindow;
//! use weir_operators::window::merging::MergingWindowSet;
//!
//! let mut sessions = MergingWindowSet::new(); // sessions with a gap of 12 ms
//! sessions.add_window(TimeWindow::new(0, 12)); // a record at 0
//! sessions.add_window(TimeWindow::new(20, 32)); // a record at 20
//! // A record at 8 bridges the two sessions: [8, 20) touches [20, 32).
//! let added = sessions.add_window(TimeWindow::new(8, 20));
//! assert_eq!(added.window, TimeWindow::new(0, 32));
//! assert_eq!(added.state_window, TimeWindow::new(0, 12));
//! let merge = added.merge.unwrap();
//! assert_eq!(merge.merged_windows, [TimeWindow::new(0, 12), TimeWindow::new(20, 32)]);
//! assert_eq!(merge.merged_state_windows, [TimeWindow::new(20, 32)]);
//!
//! // Persisted per key, and back.
//! let bytes = sessions.to_bytes();
//! assert_eq!(MergingWindowSet::from_bytes(&bytes), Ok(sessions));
//! ```
//!
//! # Invariants
//!
//! 1. Actual windows neither overlap nor touch: for consecutive windows `a < b`,
//!    `a.end < b.start`. (Touching windows would have merged.)
//! 2. Each state window lies inside its actual window (it is one of the windows the actual
//!    window grew from). With 1, state windows are therefore distinct.
//!
//! Both are checked when decoding, so a corrupt or foreign encoding is rejected rather than
//! aliasing two sessions' contents.
//!
//! # Where this differs from Flink's `MergingWindowSet`
//!
//! - The state window kept on a merge is that of the earliest merged window, not an arbitrary
//!   one, so results are deterministic.
//! - Flink re-maps a new window to itself whenever the merge result equals the new window,
//!   which forgets the state window of an existing window that was equal to it or covered by
//!   it. Here the kept state window always comes from an existing window when one merged.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

use crate::time::Timestamp;
use crate::window::TimeWindow;

/// A merge performed by [`MergingWindowSet::add_window`]; the operator must apply it to state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowMerge {
    /// The window the merged windows (and the new one) became.
    pub result: TimeWindow,
    /// The actual windows that merged into `result` and no longer exist, ascending. Never
    /// contains the window being added. Clear their triggers and cleanup timers.
    pub merged_windows: Vec<TimeWindow>,
    /// The state window of `result`: it keeps its contents and receives the others'.
    pub state_window: TimeWindow,
    /// State windows whose contents must be merged into `state_window` and then cleared.
    pub merged_state_windows: Vec<TimeWindow>,
}

/// The outcome of [`MergingWindowSet::add_window`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedWindow {
    /// The actual window the added window ended up in: itself, or the window it merged into.
    /// Trigger calls for the record go to this window.
    pub window: TimeWindow,
    /// Where the record's contents go: the state window of `window`.
    pub state_window: TimeWindow,
    /// The merge to apply to state first, if existing windows changed. `None` when the new
    /// window stood alone, or fell entirely inside an existing window.
    pub merge: Option<WindowMerge>,
}

/// The current session windows of one key, each mapped to the window holding its contents.
///
/// See the module docs for the semantics and [`MergingWindowSet::to_bytes`] for the encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergingWindowSet {
    /// Actual window -> state window, ordered by window.
    windows: BTreeMap<TimeWindow, TimeWindow>,
}

/// The version byte of the current encoding.
pub const CODEC_VERSION: u8 = 1;
const HEADER_BYTES: usize = 1 + 4;
const ENTRY_BYTES: usize = 4 * 8;

impl MergingWindowSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of actual windows.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether there are no windows.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// The actual windows with their state windows, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (TimeWindow, TimeWindow)> + '_ {
        self.windows.iter().map(|(window, state_window)| (*window, *state_window))
    }

    /// The state window of actual window `window`, or `None` if it is not in the set.
    pub fn state_window(&self, window: &TimeWindow) -> Option<TimeWindow> {
        self.windows.get(window).copied()
    }

    /// Removes actual window `window` (it fired for the last time, or was found late) and
    /// returns its state window, or `None` if it was not in the set.
    pub fn retire_window(&mut self, window: &TimeWindow) -> Option<TimeWindow> {
        self.windows.remove(window)
    }

    /// Adds `new_window` and merges every window it overlaps or touches into one.
    ///
    /// The new window itself has no contents yet, so it never appears among the merged
    /// windows; if it merged, the returned window is the merge result and the record goes to
    /// the result's state window.
    pub fn add_window(&mut self, new_window: TimeWindow) -> AddedWindow {
        let touching = self.windows_touching(&new_window);
        let Some(&earliest) = touching.first() else {
            self.windows.insert(new_window, new_window);
            return AddedWindow { window: new_window, state_window: new_window, merge: None };
        };

        let result = touching.iter().fold(new_window, |cover, window| cover.cover(window));
        let mut state_windows = touching.iter().filter_map(|window| self.windows.remove(window));
        // `earliest` came from the map, so its state window is the first one removed.
        let state_window = state_windows.next().unwrap_or(earliest);
        let merged_state_windows: Vec<TimeWindow> = state_windows.collect();
        self.windows.insert(result, state_window);
        debug_assert_eq!(self.check_invariants(), Ok(()));

        // Falling entirely inside one existing window changes nothing the operator must apply.
        let unchanged = touching.len() == 1 && earliest == result;
        let merge = if unchanged {
            None
        } else {
            Some(WindowMerge { result, merged_windows: touching, state_window, merged_state_windows })
        };
        AddedWindow { window: result, state_window, merge }
    }

    /// The windows that overlap or touch `window`, ascending.
    ///
    /// By invariant 1 they are consecutive in the map, and their starts are `<= window.end`.
    fn windows_touching(&self, window: &TimeWindow) -> Vec<TimeWindow> {
        // A search bound, not a window: every key with start <= window.end sorts at or below
        // it (it may be empty when window.end == Timestamp::MAX, which a bound may be).
        let upper = TimeWindow { start: window.end, end: Timestamp::MAX };
        let mut touching: Vec<TimeWindow> = self
            .windows
            .range((Bound::Unbounded, Bound::Included(upper)))
            .rev()
            .map(|(existing, _)| *existing)
            .take_while(|existing| existing.end >= window.start)
            .collect();
        touching.reverse();
        touching
    }

    fn check_invariants(&self) -> Result<(), WindowCodecError> {
        let mut previous = None;
        for (entry, (window, state_window)) in self.iter().enumerate() {
            check_entry(entry, previous, window, state_window)?;
            previous = Some(window);
        }
        Ok(())
    }

    /// The exact length of [`MergingWindowSet::to_bytes`]'s output.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES + ENTRY_BYTES * self.windows.len()
    }

    /// Encodes the set. All integers are little-endian:
    ///
    /// | offset         | bytes | field                                     |
    /// |----------------|-------|-------------------------------------------|
    /// | 0              | 1     | version, [`CODEC_VERSION`] (1)            |
    /// | 1              | 4     | `n`: number of windows, `u32`             |
    /// | 5 + 32 i       | 8     | window `i` start, `i64`                   |
    /// | 5 + 32 i + 8   | 8     | window `i` end (exclusive), `i64`         |
    /// | 5 + 32 i + 16  | 8     | state window of window `i`: start, `i64`  |
    /// | 5 + 32 i + 24  | 8     | state window of window `i`: end, `i64`    |
    ///
    /// Windows are written in ascending order; the total length is exactly `5 + 32 n`. There is
    /// no checksum: the state store checks its records.
    ///
    /// # Panics
    /// If the set holds more than `u32::MAX` windows (over 128 GiB of them).
    pub fn to_bytes(&self) -> Vec<u8> {
        let count = u32::try_from(self.windows.len()).unwrap_or_else(|_| {
            panic!("a merging window set of {} windows is too large to encode", self.windows.len())
        });
        let mut bytes = Vec::with_capacity(self.encoded_len());
        bytes.push(CODEC_VERSION);
        bytes.extend_from_slice(&count.to_le_bytes());
        for (window, state_window) in self.iter() {
            for value in [window.start, window.end, state_window.start, state_window.end] {
                bytes.extend_from_slice(&value.to_le_bytes());
            }
        }
        debug_assert_eq!(bytes.len(), self.encoded_len());
        bytes
    }

    /// Decodes a set written by [`MergingWindowSet::to_bytes`].
    ///
    /// Rejects, without panicking, anything that is not exactly such an encoding of a valid
    /// set: a wrong version, a length that does not match the count, an empty window, windows
    /// out of order or overlapping or touching, a state window outside its window.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WindowCodecError> {
        let mut reader = Reader { bytes };
        let version = reader.u8().ok_or(WindowCodecError::Truncated { len: bytes.len() })?;
        if version != CODEC_VERSION {
            return Err(WindowCodecError::UnsupportedVersion { version });
        }
        let count = reader.u32().ok_or(WindowCodecError::Truncated { len: bytes.len() })?;
        let expected_len = HEADER_BYTES as u64 + ENTRY_BYTES as u64 * u64::from(count);
        if expected_len != bytes.len() as u64 {
            return Err(WindowCodecError::LengthMismatch { expected: expected_len, actual: bytes.len() });
        }

        let mut windows = BTreeMap::new();
        let mut previous = None;
        for entry in 0..count as usize {
            let mut next = || reader.i64().ok_or(WindowCodecError::Truncated { len: bytes.len() });
            let (start, end, state_start, state_end) = (next()?, next()?, next()?, next()?);
            let invalid = WindowCodecError::EmptyWindow { entry };
            let window = TimeWindow::try_new(start, end).ok_or(invalid.clone())?;
            let state_window = TimeWindow::try_new(state_start, state_end).ok_or(invalid)?;
            check_entry(entry, previous, window, state_window)?;
            windows.insert(window, state_window);
            previous = Some(window);
        }
        Ok(MergingWindowSet { windows })
    }
}

/// Checks invariants 1 and 2 for entry `entry`, given the window before it.
fn check_entry(
    entry: usize,
    previous: Option<TimeWindow>,
    window: TimeWindow,
    state_window: TimeWindow,
) -> Result<(), WindowCodecError> {
    if previous.is_some_and(|previous| previous.end >= window.start) {
        return Err(WindowCodecError::NotSeparated { entry });
    }
    if !window.covers(&state_window) {
        return Err(WindowCodecError::StateWindowOutside { entry });
    }
    Ok(())
}

/// Reads fixed-width little-endian integers off the front of a slice.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.bytes.split_first_chunk::<N>()?;
        self.bytes = rest;
        Some(*head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[byte]| byte)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_le_bytes)
    }
}

/// Why [`MergingWindowSet::from_bytes`] rejected its input. Every variant means the bytes are
/// not a valid encoding: corrupt, truncated, or written by an incompatible version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowCodecError {
    /// The input is shorter than the 5-byte header.
    Truncated {
        /// The input's length.
        len: usize,
    },
    /// The version byte is not one this build reads.
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// The input's length does not match the window count in its header.
    LengthMismatch {
        /// The length the header implies.
        expected: u64,
        /// The input's length.
        actual: usize,
    },
    /// A window or state window of entry `entry` (0-based) has `start >= end`.
    EmptyWindow {
        /// The entry's index.
        entry: usize,
    },
    /// Window `entry` does not start after the end of the window before it: out of order,
    /// overlapping, or touching (such windows would have merged).
    NotSeparated {
        /// The entry's index.
        entry: usize,
    },
    /// The state window of entry `entry` is not inside its window.
    StateWindowOutside {
        /// The entry's index.
        entry: usize,
    },
}

impl fmt::Display for WindowCodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WindowCodecError::Truncated { len } => {
                write!(f, "merging window set: {len} bytes is shorter than the {HEADER_BYTES}-byte header")
            }
            WindowCodecError::UnsupportedVersion { version } => {
                write!(f, "merging window set: unsupported version {version} (expected {CODEC_VERSION})")
            }
            WindowCodecError::LengthMismatch { expected, actual } => {
                write!(f, "merging window set: header implies {expected} bytes, got {actual}")
            }
            WindowCodecError::EmptyWindow { entry } => {
                write!(f, "merging window set: entry {entry} has a window with start >= end")
            }
            WindowCodecError::NotSeparated { entry } => {
                write!(f, "merging window set: window {entry} is out of order with, overlaps or touches the one before")
            }
            WindowCodecError::StateWindowOutside { entry } => {
                write!(f, "merging window set: the state window of entry {entry} lies outside its window")
            }
        }
    }
}

impl std::error::Error for WindowCodecError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(start: i64, end: i64) -> TimeWindow {
        TimeWindow::new(start, end)
    }

    #[test]
    fn a_lone_window_is_its_own_state_window() {
        let mut set = MergingWindowSet::new();
        let added = set.add_window(w(0, 10));
        assert_eq!(added, AddedWindow { window: w(0, 10), state_window: w(0, 10), merge: None });
        let added = set.add_window(w(11, 21));
        assert_eq!(added.merge, None, "[0, 10) and [11, 21) do not touch");
        assert_eq!(set.len(), 2);
        assert_eq!(set.state_window(&w(11, 21)), Some(w(11, 21)));
    }

    #[test]
    fn touching_windows_merge() {
        let mut set = MergingWindowSet::new();
        set.add_window(w(0, 10));
        let added = set.add_window(w(10, 20));
        assert_eq!(added.window, w(0, 20));
        assert_eq!(added.state_window, w(0, 10));
        assert_eq!(
            added.merge,
            Some(WindowMerge {
                result: w(0, 20),
                merged_windows: vec![w(0, 10)],
                state_window: w(0, 10),
                merged_state_windows: vec![],
            })
        );
        assert_eq!(set.iter().collect::<Vec<_>>(), [(w(0, 20), w(0, 10))]);
    }

    #[test]
    fn a_window_inside_an_existing_one_changes_nothing() {
        let mut set = MergingWindowSet::new();
        set.add_window(w(0, 10));
        set.add_window(w(5, 15));
        let before = set.clone();
        let added = set.add_window(w(3, 13));
        assert_eq!(added, AddedWindow { window: w(0, 15), state_window: w(0, 10), merge: None });
        assert_eq!(set, before);
        // Exactly equal to an existing window: its state window is kept (Flink would reset it).
        let added = set.add_window(w(0, 15));
        assert_eq!(added.state_window, w(0, 10));
        assert_eq!(set, before);
    }

    #[test]
    fn a_bridge_merges_several_windows_and_keeps_the_earliest_state() {
        let mut set = MergingWindowSet::new();
        set.add_window(w(0, 10));
        set.add_window(w(15, 25));
        set.add_window(w(30, 40));
        set.add_window(w(100, 110));
        // [5, 35) touches the first three; the earliest one's state window is kept.
        let added = set.add_window(w(5, 35));
        assert_eq!(added.window, w(0, 40));
        let merge = added.merge.expect("merged");
        assert_eq!(merge.merged_windows, [w(0, 10), w(15, 25), w(30, 40)]);
        assert_eq!(merge.state_window, w(0, 10));
        assert_eq!(merge.merged_state_windows, [w(15, 25), w(30, 40)]);
        assert_eq!(set.iter().collect::<Vec<_>>(), [(w(0, 40), w(0, 10)), (w(100, 110), w(100, 110))]);
    }

    #[test]
    fn a_new_window_covering_an_existing_one_keeps_the_existing_state() {
        let mut set = MergingWindowSet::new();
        set.add_window(w(5, 10));
        let added = set.add_window(w(0, 20));
        assert_eq!(added.window, w(0, 20));
        assert_eq!(added.state_window, w(5, 10));
        assert_eq!(added.merge.map(|merge| merge.merged_windows), Some(vec![w(5, 10)]));
        assert_eq!(set.state_window(&w(0, 20)), Some(w(5, 10)));
    }

    #[test]
    fn merging_from_the_left_keeps_the_merged_windows_state() {
        let mut set = MergingWindowSet::new();
        set.add_window(w(10, 20));
        let added = set.add_window(w(5, 15));
        assert_eq!(added.window, w(5, 20));
        assert_eq!(added.state_window, w(10, 20));
    }

    #[test]
    fn retire_removes_a_window() {
        let mut set = MergingWindowSet::new();
        set.add_window(w(0, 10));
        set.add_window(w(5, 15));
        assert_eq!(set.retire_window(&w(0, 10)), None, "not an actual window any more");
        assert_eq!(set.retire_window(&w(0, 15)), Some(w(0, 10)));
        assert!(set.is_empty());
        // After retiring, a new window at the same place starts afresh.
        assert_eq!(set.add_window(w(0, 10)).merge, None);
    }

    #[test]
    fn windows_at_the_ends_of_time_merge() {
        let mut set = MergingWindowSet::new();
        set.add_window(w(i64::MAX - 5, i64::MAX));
        let added = set.add_window(w(i64::MAX - 1, i64::MAX));
        assert_eq!(added.window, w(i64::MAX - 5, i64::MAX));
        assert_eq!(added.merge, None);
        set.add_window(w(i64::MIN, i64::MIN + 1));
        let added = set.add_window(w(i64::MIN + 1, i64::MIN + 3));
        assert_eq!(added.window, w(i64::MIN, i64::MIN + 3));
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn golden_encoding() {
        let mut set = MergingWindowSet::new();
        set.add_window(w(0, 10));
        set.add_window(w(10, 20)); // [0, 20) with state [0, 10)
        set.add_window(w(-300, -200));
        #[rustfmt::skip]
        let golden: Vec<u8> = vec![
            1, // version
            2, 0, 0, 0, // two windows
            0xD4, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, // -300
            0x38, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, // -200
            0xD4, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, // -300
            0x38, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, // -200
            0, 0, 0, 0, 0, 0, 0, 0, // 0
            20, 0, 0, 0, 0, 0, 0, 0, // 20
            0, 0, 0, 0, 0, 0, 0, 0, // 0
            10, 0, 0, 0, 0, 0, 0, 0, // 10
        ];
        assert_eq!(set.to_bytes(), golden);
        assert_eq!(set.encoded_len(), golden.len());
        assert_eq!(MergingWindowSet::from_bytes(&golden), Ok(set));
        assert_eq!(MergingWindowSet::new().to_bytes(), [1, 0, 0, 0, 0]);
        assert_eq!(MergingWindowSet::from_bytes(&[1, 0, 0, 0, 0]), Ok(MergingWindowSet::new()));
    }

    fn encode(version: u8, entries: &[[i64; 4]]) -> Vec<u8> {
        let mut bytes = vec![version];
        bytes.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for value in entries.iter().flatten() {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn decoding_rejects_malformed_input() {
        use WindowCodecError::*;
        let decode = |bytes: &[u8]| MergingWindowSet::from_bytes(bytes);
        assert_eq!(decode(&[]), Err(Truncated { len: 0 }));
        assert_eq!(decode(&[1, 0, 0]), Err(Truncated { len: 3 }));
        assert_eq!(decode(&encode(2, &[])), Err(UnsupportedVersion { version: 2 }));
        assert_eq!(decode(&[1, 1, 0, 0, 0]), Err(LengthMismatch { expected: 37, actual: 5 }));
        let mut long = encode(1, &[]);
        long.push(0);
        assert_eq!(decode(&long), Err(LengthMismatch { expected: 5, actual: 6 }));
        assert_eq!(
            decode(&[1, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(LengthMismatch { expected: 5 + 32 * u64::from(u32::MAX), actual: 5 })
        );
        assert_eq!(decode(&encode(1, &[[5, 5, 5, 6]])), Err(EmptyWindow { entry: 0 }));
        assert_eq!(decode(&encode(1, &[[0, 10, 3, 2]])), Err(EmptyWindow { entry: 0 }));
        assert_eq!(decode(&encode(1, &[[0, 10, 0, 11]])), Err(StateWindowOutside { entry: 0 }));
        assert_eq!(decode(&encode(1, &[[0, 10, 0, 10], [10, 20, 10, 20]])), Err(NotSeparated { entry: 1 }));
        assert_eq!(decode(&encode(1, &[[20, 30, 20, 30], [0, 10, 0, 10]])), Err(NotSeparated { entry: 1 }));
        assert_eq!(decode(&encode(1, &[[0, 10, 0, 10], [0, 10, 0, 10]])), Err(NotSeparated { entry: 1 }));
        assert!(decode(&encode(1, &[[0, 10, 2, 5], [11, 20, 11, 12]])).is_ok());
    }

    #[test]
    fn codec_errors_display() {
        let message = WindowCodecError::LengthMismatch { expected: 37, actual: 5 }.to_string();
        assert!(message.contains("37") && message.contains('5'));
        for error in [
            WindowCodecError::Truncated { len: 1 },
            WindowCodecError::UnsupportedVersion { version: 9 },
            WindowCodecError::EmptyWindow { entry: 2 },
            WindowCodecError::NotSeparated { entry: 2 },
            WindowCodecError::StateWindowOutside { entry: 2 },
        ] {
            assert!(error.to_string().starts_with("merging window set: "));
        }
    }
}
