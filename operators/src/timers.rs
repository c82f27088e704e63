//! Event-time and processing-time timers per key, persisted as state.
//!
//! Each timer is a record in the shard's store under the state `<uid>/timers-event` (or
//! `-processing`), keyed by `time (8 bytes, order-preserving) ++ key bytes` in the key's own
//! key group, so timers are checkpointed with the state and move with their key groups when a
//! job is rescaled. The value is the key itself (rkyv), so `on_timer` gets the typed key back.
//! An in-memory ordered set mirrors the records for firing in time order; [`TimerService::open`]
//! rebuilds it from the store after a restore.

use std::collections::{BTreeMap, BTreeSet};

use weir_state::keygroup::{KeyEncode, KeyGroup};
use weir_state::record::StateId;
use weir_state::states::StateValue;
use weir_state::store::Key;
use weir_state::{StateError, StateStore};

use crate::error::Result;
use crate::operator::{CurrentKey, Timestamp};

/// Which clock a timer follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeDomain {
    /// Fires when the watermark passes the timer's time.
    EventTime,
    /// Fires when the processing-time clock passes the timer's time.
    ProcessingTime,
}

/// A timer that became due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredTimer {
    /// The timer's time.
    pub timestamp: Timestamp,
    /// The encoded key it was registered for.
    pub key_bytes: Vec<u8>,
    /// The key's group.
    pub group: KeyGroup,
}

/// The pending timers of one domain: time -> entries `key bytes ++ key group (2 bytes LE)`.
/// Looking a timer up takes a borrowed slice, so re-registering an existing timer (what a
/// window does for every record) allocates nothing.
#[derive(Debug)]
struct Domain {
    state: StateId,
    pending: BTreeMap<Timestamp, BTreeSet<Vec<u8>>>,
    count: usize,
}

impl Domain {
    fn new(state: StateId) -> Self {
        Domain { state, pending: BTreeMap::new(), count: 0 }
    }

    fn contains(&self, ts: Timestamp, entry: &[u8]) -> bool {
        self.pending.get(&ts).is_some_and(|set| set.contains(entry))
    }

    fn insert(&mut self, ts: Timestamp, entry: &[u8]) -> bool {
        let inserted = self.pending.entry(ts).or_default().insert(entry.to_vec());
        self.count += usize::from(inserted);
        inserted
    }

    fn remove(&mut self, ts: Timestamp, entry: &[u8]) -> bool {
        let Some(set) = self.pending.get_mut(&ts) else { return false };
        let removed = set.remove(entry);
        if set.is_empty() {
            self.pending.remove(&ts);
        }
        self.count -= usize::from(removed);
        removed
    }

    /// Removes the earliest timer at or before `upto`.
    fn pop_due(&mut self, upto: Timestamp) -> Option<(Timestamp, Vec<u8>)> {
        let mut first = self.pending.first_entry()?;
        let ts = *first.key();
        if ts > upto {
            return None;
        }
        let entry = first.get_mut().pop_first();
        if first.get().is_empty() {
            first.remove();
        }
        self.count -= usize::from(entry.is_some());
        entry.map(|e| (ts, e))
    }
}

fn entry_of(buf: &mut Vec<u8>, key: &[u8], group: KeyGroup) {
    buf.clear();
    buf.extend_from_slice(key);
    buf.extend_from_slice(&group.0.to_le_bytes());
}

fn split_entry(entry: &[u8]) -> (&[u8], KeyGroup) {
    let (key, group) = entry.split_at(entry.len().saturating_sub(2));
    (key, KeyGroup(u16::from_le_bytes([group.first().copied().unwrap_or(0), group.get(1).copied().unwrap_or(0)])))
}

/// The timers of one operator instance.
#[derive(Debug)]
pub struct TimerService {
    event: Domain,
    processing: Domain,
    scratch: Vec<u8>,
    entry: Vec<u8>,
}

fn store_key(scratch: &mut Vec<u8>, ts: Timestamp, key: &[u8]) {
    scratch.clear();
    ts.encode_key(scratch);
    scratch.extend_from_slice(key);
}

impl TimerService {
    /// Registers the timer states of operator `uid` and loads the timers already in the store.
    pub fn open(store: &mut StateStore, uid: &str) -> Result<TimerService> {
        let event = store.register(&format!("{uid}/timers-event"), None)?;
        let processing = store.register(&format!("{uid}/timers-processing"), None)?;
        let mut service = TimerService {
            event: Domain::new(event),
            processing: Domain::new(processing),
            scratch: Vec::new(),
            entry: Vec::new(),
        };
        let mut bad = None;
        store.for_each(|state, group, key, _, _| {
            let domain = if state == event {
                &mut service.event
            } else if state == processing {
                &mut service.processing
            } else {
                return;
            };
            if key.len() < 8 {
                bad = Some(key.len());
                return;
            }
            let mut ts = [0u8; 8];
            ts.copy_from_slice(&key[..8]);
            let ts = (u64::from_be_bytes(ts) ^ (1 << 63)) as i64;
            let mut entry = Vec::with_capacity(key.len() - 6);
            entry_of(&mut entry, &key[8..], group);
            domain.insert(ts, &entry);
        })?;
        if let Some(len) = bad {
            return Err(StateError::corrupt(store.dir(), 0, format!("timer record key of {len} bytes")).into());
        }
        Ok(service)
    }

    fn domain(&mut self, domain: TimeDomain) -> &mut Domain {
        match domain {
            TimeDomain::EventTime => &mut self.event,
            TimeDomain::ProcessingTime => &mut self.processing,
        }
    }

    /// Registers a timer at `ts` for `key` (idempotent), storing the typed key with it.
    pub fn register<K: StateValue>(
        &mut self,
        store: &mut StateStore,
        domain: TimeDomain,
        key: CurrentKey<'_>,
        typed_key: &K,
        ts: Timestamp,
    ) -> Result<()> {
        entry_of(&mut self.entry, key.bytes, key.group);
        let entry = std::mem::take(&mut self.entry);
        let mut scratch = std::mem::take(&mut self.scratch);
        let d = self.domain(domain);
        let result = if !d.contains(ts, &entry) && d.insert(ts, &entry) {
            store_key(&mut scratch, ts, key.bytes);
            store.put_value(d.state, Key { group: key.group, bytes: &scratch }, typed_key).map_err(Into::into)
        } else {
            Ok(())
        };
        self.scratch = scratch;
        self.entry = entry;
        result
    }

    /// Deletes the timer at `ts` for `key`, if any.
    pub fn delete(
        &mut self,
        store: &mut StateStore,
        domain: TimeDomain,
        key: CurrentKey<'_>,
        ts: Timestamp,
    ) -> Result<()> {
        entry_of(&mut self.entry, key.bytes, key.group);
        let entry = std::mem::take(&mut self.entry);
        let mut scratch = std::mem::take(&mut self.scratch);
        let d = self.domain(domain);
        let result = if d.remove(ts, &entry) {
            store_key(&mut scratch, ts, key.bytes);
            store.delete(d.state, Key { group: key.group, bytes: &scratch }).map(|_| ()).map_err(Into::into)
        } else {
            Ok(())
        };
        self.scratch = scratch;
        self.entry = entry;
        result
    }

    /// The earliest pending timer's time.
    pub fn next(&self, domain: TimeDomain) -> Option<Timestamp> {
        match domain {
            TimeDomain::EventTime => self.event.pending.first_key_value().map(|t| *t.0),
            TimeDomain::ProcessingTime => self.processing.pending.first_key_value().map(|t| *t.0),
        }
    }

    /// Number of pending timers.
    pub fn len(&self, domain: TimeDomain) -> usize {
        match domain {
            TimeDomain::EventTime => self.event.count,
            TimeDomain::ProcessingTime => self.processing.count,
        }
    }

    /// Whether no timer of `domain` is pending.
    pub fn is_empty(&self, domain: TimeDomain) -> bool {
        self.len(domain) == 0
    }

    /// Removes and returns the earliest timer at or before `upto` with the typed key stored with
    /// it, deleting its record.
    pub fn pop_due<K: StateValue>(
        &mut self,
        store: &mut StateStore,
        domain: TimeDomain,
        upto: Timestamp,
    ) -> Result<Option<(FiredTimer, K)>> {
        let d = self.domain(domain);
        let Some((ts, entry)) = d.pop_due(upto) else { return Ok(None) };
        let (key, group) = split_entry(&entry);
        let (key, group) = (key.to_vec(), group.0);
        let state = d.state;
        let mut scratch = std::mem::take(&mut self.scratch);
        store_key(&mut scratch, ts, &key);
        let record_key = Key { group: KeyGroup(group), bytes: &scratch };
        let typed = match store.get_raw(state, record_key)? {
            Some(raw) => {
                let mut aligned = rkyv::util::AlignedVec::<16>::new();
                aligned.extend_from_slice(raw.bytes);
                rkyv::from_bytes::<K, rkyv::rancor::Error>(&aligned)
                    .map_err(|e| StateError::corrupt(store.dir(), 0, format!("timer key fails validation: {e}")))
            }
            None => Err(StateError::Misuse(format!("timer at {ts} has no record"))),
        };
        let deleted = typed.and_then(|k| store.delete(state, record_key).map(|_| k));
        self.scratch = scratch;
        let typed = deleted?;
        Ok(Some((FiredTimer { timestamp: ts, key_bytes: key, group: KeyGroup(group) }, typed)))
    }
}
