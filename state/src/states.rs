//! Typed keyed state over a [`StateStore`]: [`ValueState`], [`MapState`] and [`ListState`].
//!
//! A state is a small descriptor (its id and value type); the data lives in the store, so many
//! named states share one log, one index and one checkpoint. Reads return the rkyv archived
//! value straight from the mapped log, without copying:
//!
//! ```
//! use weir_state::{StateStore, StoreConfig, states::ValueState, store::Key};
//! let dir = tempfile::tempdir().unwrap();
//! let mut store = StateStore::create(dir.path(), StoreConfig::default()).unwrap();
//! let count: ValueState<u64> = ValueState::register(&mut store, "counter/count").unwrap();
//! let key = Key::new(b"user-1", 4096);
//! count.put(&mut store, key, &41).unwrap();
//! let seen = count.get(&store, key).unwrap().map(|v| v.to_native()).unwrap_or(0);
//! count.put(&mut store, key, &(seen + 1)).unwrap();
//! assert_eq!(count.get(&store, key).unwrap().map(|v| v.to_native()), Some(42));
//! ```
//!
//! Values that did not come from a typed put of this process (restored from files, imported
//! raw) are validated with rkyv's bytecheck before they are handed out; corrupt ones give a
//! [`StateError::Corrupt`], never undefined behaviour.

use std::any::TypeId;
use std::collections::HashSet;
use std::marker::PhantomData;

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;

use crate::error::{Result, StateError};
use crate::keygroup::KeyEncode;
use crate::record::StateId;
use crate::store::{Key, RawValue, StateStore};

/// A type that can be kept in state: rkyv-serialisable, validatable and deserialisable.
/// Implemented for every type that derives rkyv's `Archive`, `Serialize` and `Deserialize`
/// (with `bytecheck`, which rkyv derives by default).
pub trait StateValue:
    Sized
    + rkyv::Archive<
        Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                      + rkyv::Deserialize<Self, HighDeserializer<rancor::Error>>,
    > + for<'a> rkyv::Serialize<HighSerializer<AlignedVec<16>, ArenaHandle<'a>, rancor::Error>>
    + 'static
{
}

impl<T> StateValue for T where
    T: rkyv::Archive<
            Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                          + rkyv::Deserialize<T, HighDeserializer<rancor::Error>>,
        > + for<'a> rkyv::Serialize<HighSerializer<AlignedVec<16>, ArenaHandle<'a>, rancor::Error>>
        + 'static
{
}

/// Turns stored bytes into a reference to the archived value.
fn archived<'s, V: StateValue>(store: &'s StateStore, raw: RawValue<'s>) -> Result<&'s V::Archived> {
    if raw.needs_validation {
        return rkyv::access::<V::Archived, rancor::Error>(raw.bytes).map_err(|e| {
            let (file, offset) = store.location(raw.addr);
            StateError::corrupt(file, offset, format!("value fails validation: {e}"))
        });
    }
    debug_assert!(
        rkyv::access::<V::Archived, rancor::Error>(raw.bytes).is_ok(),
        "a value written by a typed put fails validation"
    );
    // SAFETY: `needs_validation` is false, so these bytes were produced in this process by
    // `StateStore::put_value` serialising a `V` with rkyv (the pinned format) under this
    // state id, and the store binds each state id to one value type at registration
    // (`register` rejects a second type). They sit at a 16-byte aligned offset of a
    // page-aligned mapping, with their exact length, and cannot change while the shared borrow
    // of `store` lives (writes need `&mut StateStore`). Debug builds re-check with bytecheck.
    Ok(unsafe { rkyv::access_unchecked::<V::Archived>(raw.bytes) })
}

fn deserialize<V: StateValue>(archived: &V::Archived) -> Result<V> {
    rkyv::deserialize::<V, rancor::Error>(archived).map_err(|e| StateError::Misuse(format!("cannot deserialise: {e}")))
}

/// Serialises `value` as a typed put stores it (rkyv, the pinned format), for state kept
/// outside a store: an operator's non-keyed lists, which the runtime keeps in the manifest.
/// Read it back with [`decode_value`].
pub fn encode_value<V: StateValue>(value: &V) -> Result<Vec<u8>> {
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, AlignedVec::<16>::new())
        .map(|bytes| bytes.to_vec())
        .map_err(|e| StateError::Misuse(format!("cannot serialise value: {e}")))
}

/// Reads a value [`encode_value`] wrote, from bytes at any alignment. The bytes come from
/// outside the process (a file), so they are copied to an aligned buffer and checked with
/// bytecheck before use: damaged bytes give the reason as an error, never undefined behaviour.
/// (Bytes written for another type may pass the check when both types' layouts allow them.)
pub fn decode_value<V: StateValue>(bytes: &[u8]) -> std::result::Result<V, String> {
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let archived =
        rkyv::access::<V::Archived, rancor::Error>(&aligned).map_err(|e| format!("value fails validation: {e}"))?;
    deserialize::<V>(archived).map_err(|e| e.to_string())
}

/// A single value per key.
#[derive(Debug)]
pub struct ValueState<V> {
    id: StateId,
    _value: PhantomData<fn() -> V>,
}

impl<V> Clone for ValueState<V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for ValueState<V> {}

impl<V: StateValue> ValueState<V> {
    /// Registers the state `name` in `store` (or finds it again after a restore).
    pub fn register(store: &mut StateStore, name: &str) -> Result<Self> {
        Ok(ValueState { id: store.register(name, Some(TypeId::of::<V>()))?, _value: PhantomData })
    }

    /// The state's id in the store.
    pub fn id(&self) -> StateId {
        self.id
    }

    /// The archived value of `key`, read in place from the log.
    pub fn get<'s>(&self, store: &'s StateStore, key: Key<'_>) -> Result<Option<&'s V::Archived>> {
        match store.get_raw(self.id, key)? {
            None => Ok(None),
            Some(raw) => archived::<V>(store, raw).map(Some),
        }
    }

    /// The value of `key`, deserialised.
    pub fn get_owned(&self, store: &StateStore, key: Key<'_>) -> Result<Option<V>> {
        self.get(store, key)?.map(deserialize::<V>).transpose()
    }

    /// Sets the value of `key`.
    pub fn put(&self, store: &mut StateStore, key: Key<'_>, value: &V) -> Result<()> {
        store.put_value(self.id, key, value)
    }

    /// Removes the value of `key`; returns whether there was one.
    pub fn delete(&self, store: &mut StateStore, key: Key<'_>) -> Result<bool> {
        store.delete(self.id, key)
    }
}

/// A store key made of a primary key and a suffix: `u32 LE length of primary, primary, suffix`.
/// Kept on the stack when short, so most map and list accesses do not allocate.
struct ComposedKey {
    inline: [u8; 96],
    len: usize,
    heap: Vec<u8>,
}

impl ComposedKey {
    fn new(primary: &[u8], suffix: impl FnOnce(&mut Vec<u8>)) -> ComposedKey {
        let mut heap = Vec::new();
        suffix(&mut heap);
        let total = 4 + primary.len() + heap.len();
        let mut k = ComposedKey { inline: [0; 96], len: total, heap: Vec::new() };
        if total <= k.inline.len() {
            k.inline[..4].copy_from_slice(&(primary.len() as u32).to_le_bytes());
            k.inline[4..4 + primary.len()].copy_from_slice(primary);
            k.inline[4 + primary.len()..total].copy_from_slice(&heap);
        } else {
            let mut v = Vec::with_capacity(total);
            v.extend_from_slice(&(primary.len() as u32).to_le_bytes());
            v.extend_from_slice(primary);
            v.extend_from_slice(&heap);
            k.heap = v;
        }
        k
    }

    fn bytes(&self) -> &[u8] {
        if self.heap.is_empty() { &self.inline[..self.len] } else { &self.heap }
    }
}

fn encode_suffix<K: KeyEncode + ?Sized>(k: &K) -> impl FnOnce(&mut Vec<u8>) + '_ {
    move |out| k.encode_key(out)
}

/// An appendable list of values per key; elements are separate records, so an append costs one
/// record, whatever the list's length.
#[derive(Debug)]
pub struct ListState<V> {
    elements: StateId,
    lengths: ValueState<u64>,
    _value: PhantomData<fn() -> V>,
}

impl<V> Clone for ListState<V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<V> Copy for ListState<V> {}

impl<V: StateValue> ListState<V> {
    /// Registers the list state `name` (and its companion `name#len`).
    pub fn register(store: &mut StateStore, name: &str) -> Result<Self> {
        Ok(ListState {
            elements: store.register(name, Some(TypeId::of::<V>()))?,
            lengths: ValueState::register(store, &format!("{name}#len"))?,
            _value: PhantomData,
        })
    }

    fn element_key(key: Key<'_>, i: u64) -> ComposedKey {
        ComposedKey::new(key.bytes, |out| out.extend_from_slice(&i.to_be_bytes()))
    }

    /// Number of elements of `key`'s list.
    pub fn len(&self, store: &StateStore, key: Key<'_>) -> Result<u64> {
        Ok(self.lengths.get(store, key)?.map_or(0, |n| n.to_native()))
    }

    /// Whether `key`'s list is empty.
    pub fn is_empty(&self, store: &StateStore, key: Key<'_>) -> Result<bool> {
        Ok(self.len(store, key)? == 0)
    }

    /// Appends `value` to `key`'s list.
    pub fn add(&self, store: &mut StateStore, key: Key<'_>, value: &V) -> Result<()> {
        let n = self.len(store, key)?;
        let k = Self::element_key(key, n);
        store.put_value(self.elements, Key { group: key.group, bytes: k.bytes() }, value)?;
        self.lengths.put(store, key, &(n + 1))
    }

    /// The `i`-th element of `key`'s list.
    pub fn get<'s>(&self, store: &'s StateStore, key: Key<'_>, i: u64) -> Result<Option<&'s V::Archived>> {
        let k = Self::element_key(key, i);
        match store.get_raw(self.elements, Key { group: key.group, bytes: k.bytes() })? {
            None => Ok(None),
            Some(raw) => archived::<V>(store, raw).map(Some),
        }
    }

    /// Iterates over `key`'s list in insertion order.
    pub fn iter<'s>(
        &self,
        store: &'s StateStore,
        key: Key<'s>,
    ) -> Result<impl Iterator<Item = Result<&'s V::Archived>> + 's> {
        let n = self.len(store, key)?;
        let this = *self;
        Ok((0..n).map(move |i| {
            this.get(store, key, i)?.ok_or_else(|| {
                StateError::Misuse(format!("list element {i} of {n} is missing (state {})", this.elements))
            })
        }))
    }

    /// Removes every element of `key`'s list.
    pub fn clear(&self, store: &mut StateStore, key: Key<'_>) -> Result<()> {
        let n = self.len(store, key)?;
        for i in 0..n {
            let k = Self::element_key(key, i);
            store.delete(self.elements, Key { group: key.group, bytes: k.bytes() })?;
        }
        self.lengths.delete(store, key)?;
        Ok(())
    }
}

/// A map per key from user keys `UK` to values `V`. Each entry is its own record; a directory
/// list per key remembers which user keys were added, for iteration.
#[derive(Debug)]
pub struct MapState<UK, V> {
    entries: StateId,
    directory: ListState<Vec<u8>>,
    _types: PhantomData<fn() -> (UK, V)>,
}

impl<UK, V> Clone for MapState<UK, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<UK, V> Copy for MapState<UK, V> {}

impl<UK: KeyEncode, V: StateValue> MapState<UK, V> {
    /// Registers the map state `name` (and its companions `name#dir`, `name#dir#len`).
    pub fn register(store: &mut StateStore, name: &str) -> Result<Self> {
        Ok(MapState {
            entries: store.register(name, Some(TypeId::of::<V>()))?,
            directory: ListState::register(store, &format!("{name}#dir"))?,
            _types: PhantomData,
        })
    }

    /// The value under `user_key` in `key`'s map.
    pub fn get<'s>(&self, store: &'s StateStore, key: Key<'_>, user_key: &UK) -> Result<Option<&'s V::Archived>> {
        let k = ComposedKey::new(key.bytes, encode_suffix(user_key));
        match store.get_raw(self.entries, Key { group: key.group, bytes: k.bytes() })? {
            None => Ok(None),
            Some(raw) => archived::<V>(store, raw).map(Some),
        }
    }

    /// Whether `key`'s map holds `user_key`.
    pub fn contains(&self, store: &StateStore, key: Key<'_>, user_key: &UK) -> Result<bool> {
        let k = ComposedKey::new(key.bytes, encode_suffix(user_key));
        store.contains(self.entries, Key { group: key.group, bytes: k.bytes() })
    }

    /// Sets `user_key` to `value` in `key`'s map.
    pub fn put(&self, store: &mut StateStore, key: Key<'_>, user_key: &UK, value: &V) -> Result<()> {
        let k = ComposedKey::new(key.bytes, encode_suffix(user_key));
        let entry = Key { group: key.group, bytes: k.bytes() };
        let is_new = !store.contains(self.entries, entry)?;
        store.put_value(self.entries, entry, value)?;
        if is_new {
            let mut encoded = Vec::new();
            user_key.encode_key(&mut encoded);
            self.directory.add(store, key, &encoded)?;
        }
        Ok(())
    }

    /// Removes `user_key` from `key`'s map; returns whether it was there.
    pub fn remove(&self, store: &mut StateStore, key: Key<'_>, user_key: &UK) -> Result<bool> {
        let k = ComposedKey::new(key.bytes, encode_suffix(user_key));
        store.delete(self.entries, Key { group: key.group, bytes: k.bytes() })
    }

    /// The encoded user keys present in `key`'s map, each once, in first-insertion order.
    /// Rewrites the directory when more than half of it is stale.
    pub fn keys_encoded(&self, store: &mut StateStore, key: Key<'_>) -> Result<Vec<Vec<u8>>> {
        let mut seen = HashSet::new();
        let mut live = Vec::new();
        let total = self.directory.len(store, key)?;
        for encoded in self.directory.iter(store, key)? {
            let encoded = encoded?.as_slice().to_vec();
            let k = ComposedKey::new(key.bytes, |out| out.extend_from_slice(&encoded));
            if store.contains(self.entries, Key { group: key.group, bytes: k.bytes() })? && seen.insert(encoded.clone())
            {
                live.push(encoded);
            }
        }
        if total > 8 && live.len() as u64 * 2 < total {
            self.directory.clear(store, key)?;
            for encoded in &live {
                self.directory.add(store, key, encoded)?;
            }
        }
        Ok(live)
    }

    /// Removes every entry of `key`'s map.
    pub fn clear(&self, store: &mut StateStore, key: Key<'_>) -> Result<()> {
        for encoded in self.keys_encoded(store, key)? {
            let k = ComposedKey::new(key.bytes, |out| out.extend_from_slice(&encoded));
            store.delete(self.entries, Key { group: key.group, bytes: k.bytes() })?;
        }
        self.directory.clear(store, key)
    }
}
