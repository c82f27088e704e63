//! Event-time and processing-time timers per key, persisted as state.
//!
//! Each timer is a record in the shard's store under the state `<uid>/timers-event` (or
//! `-processing`), keyed by `time (8 bytes, order-preserving) ++ key bytes` in the key's own
//! key group, so timers are checkpointed with the state and move with their key groups when a
//! job is rescaled. The value is the key itself (rkyv), so `on_timer` gets the typed key back.
//! An in-memory ordered set mirrors the records for firing in time order; [`TimerService::open`]
//! rebuilds it from the store after a restore.

use std::collections::BTreeSet;

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

#[derive(Debug)]
struct Domain {
    state: StateId,
    pending: BTreeSet<(Timestamp, Vec<u8>, u16)>,
}

/// The timers of one operator instance.
#[derive(Debug)]
pub struct TimerService {
    event: Domain,
    processing: Domain,
    scratch: Vec<u8>,
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
            event: Domain { state: event, pending: BTreeSet::new() },
            processing: Domain { state: processing, pending: BTreeSet::new() },
            scratch: Vec::new(),
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
            domain.pending.insert((ts, key[8..].to_vec(), group.0));
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
        let mut scratch = std::mem::take(&mut self.scratch);
        let d = self.domain(domain);
        let entry = (ts, key.bytes.to_vec(), key.group.0);
        let result = if d.pending.insert(entry) {
            store_key(&mut scratch, ts, key.bytes);
            store.put_value(d.state, Key { group: key.group, bytes: &scratch }, typed_key).map_err(Into::into)
        } else {
            Ok(())
        };
        self.scratch = scratch;
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
        let mut scratch = std::mem::take(&mut self.scratch);
        let d = self.domain(domain);
        let result = if d.pending.remove(&(ts, key.bytes.to_vec(), key.group.0)) {
            store_key(&mut scratch, ts, key.bytes);
            store.delete(d.state, Key { group: key.group, bytes: &scratch }).map(|_| ()).map_err(Into::into)
        } else {
            Ok(())
        };
        self.scratch = scratch;
        result
    }

    /// The earliest pending timer's time.
    pub fn next(&self, domain: TimeDomain) -> Option<Timestamp> {
        match domain {
            TimeDomain::EventTime => self.event.pending.first().map(|t| t.0),
            TimeDomain::ProcessingTime => self.processing.pending.first().map(|t| t.0),
        }
    }

    /// Number of pending timers.
    pub fn len(&self, domain: TimeDomain) -> usize {
        match domain {
            TimeDomain::EventTime => self.event.pending.len(),
            TimeDomain::ProcessingTime => self.processing.pending.len(),
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
        let (ts, key, group) = match d.pending.first() {
            Some(first) if first.0 <= upto => match d.pending.pop_first() {
                Some(t) => t,
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
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
