//! Keys, their stable byte encoding, and key groups.
//!
//! State is partitioned by *key group*: `key_group = xxh3_64(encoded key) % max_parallelism`.
//! Key groups are persisted in every record, checkpoint and savepoint, so both the encoding and
//! the hash are part of the on-disk format; changing either is a format change. Rust's `Hash`
//! is not used because it is not stable across compiler versions or platforms.
//!
//! Shard `s` of `P` owns the contiguous range of key groups given by [`KeyGroupRange::for_shard`];
//! key groups are the unit of rescaling: state taken at `P` restores at any `P'`.
//!
//! # Encoding ([`KeyEncode`])
//! | type | bytes |
//! |---|---|
//! | `u8`..`u128`, `usize` as `u64` | big-endian, fixed width |
//! | `i8`..`i128`, `isize` as `i64` | big-endian, fixed width, sign bit flipped (so byte order = numeric order) |
//! | `bool` | one byte, 0 or 1 |
//! | `char` | as `u32` |
//! | `str`, `String`, `[u8]`, `Vec<u8>` | `u32` big-endian length, then the bytes |
//! | tuples (up to 4) | the fields' encodings, concatenated |
//! | `Option<T>` | `0`, or `1` then `T` |
//!
//! ```
//! use weir_state::keygroup::{KeyEncode, KeyGroupRange, key_group_of};
//! let kg = key_group_of(&"user-42", 4096);
//! let owner = KeyGroupRange::shard_for(kg, 4, 4096);
//! assert!(KeyGroupRange::for_shard(owner, 4, 4096).contains(kg));
//! ```

use xxhash_rust::xxh3::xxh3_64;

/// The default `max_parallelism`: the number of key groups of a job.
pub const DEFAULT_MAX_PARALLELISM: u16 = 4096;

/// The largest `max_parallelism` weir accepts (key groups are stored as `u16`).
pub const MAX_MAX_PARALLELISM: u16 = 32768;

/// A key group: the unit in which keyed state is partitioned, moved and rescaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct KeyGroup(pub u16);

/// A stable byte encoding of a key. Implement it for your own key types by encoding their
/// fields in a fixed order with these impls (the encoding must be injective: two different
/// keys must never encode to the same bytes).
pub trait KeyEncode {
    /// Appends this key's stable encoding to `out`.
    fn encode_key(&self, out: &mut Vec<u8>);
}

/// The stable hash of an encoded key (xxh3, 64 bit, seed 0).
pub fn key_hash(encoded: &[u8]) -> u64 {
    xxh3_64(encoded)
}

/// The key group of an already encoded key.
pub fn key_group_of_encoded(encoded: &[u8], max_parallelism: u16) -> KeyGroup {
    debug_assert!(max_parallelism > 0);
    KeyGroup((key_hash(encoded) % u64::from(max_parallelism.max(1))) as u16)
}

/// Encodes `key` and returns its key group. Allocates; hot paths encode into a reused buffer
/// and call [`key_group_of_encoded`].
pub fn key_group_of<K: KeyEncode + ?Sized>(key: &K, max_parallelism: u16) -> KeyGroup {
    let mut buf = Vec::with_capacity(32);
    key.encode_key(&mut buf);
    key_group_of_encoded(&buf, max_parallelism)
}

/// A half-open range `[start, end)` of key groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct KeyGroupRange {
    /// First key group in the range.
    pub start: u16,
    /// One past the last key group in the range.
    pub end: u16,
}

impl KeyGroupRange {
    /// The range `[start, end)`.
    pub fn new(start: u16, end: u16) -> Self {
        debug_assert!(start <= end);
        KeyGroupRange { start, end }
    }

    /// Every key group of a job with `max_parallelism` key groups.
    pub fn all(max_parallelism: u16) -> Self {
        KeyGroupRange { start: 0, end: max_parallelism }
    }

    /// The key groups owned by `shard` of `parallelism` shards: contiguous, disjoint, covering
    /// `[0, max_parallelism)`, and each of size `floor` or `ceil` of `max_parallelism / parallelism`.
    pub fn for_shard(shard: usize, parallelism: usize, max_parallelism: u16) -> Self {
        let m = max_parallelism as usize;
        let p = parallelism.max(1);
        let start = (shard * m).div_ceil(p);
        let end = ((shard + 1) * m).div_ceil(p);
        KeyGroupRange { start: start.min(m) as u16, end: end.min(m) as u16 }
    }

    /// The shard of `parallelism` that owns key group `kg` (the inverse of [`Self::for_shard`]).
    pub fn shard_for(kg: KeyGroup, parallelism: usize, max_parallelism: u16) -> usize {
        kg.0 as usize * parallelism.max(1) / max_parallelism.max(1) as usize
    }

    /// Whether `kg` lies in this range.
    pub fn contains(&self, kg: KeyGroup) -> bool {
        self.start <= kg.0 && kg.0 < self.end
    }

    /// Number of key groups in the range.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// Whether the range holds no key group.
    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    /// The key groups present in both ranges.
    pub fn intersect(&self, other: &KeyGroupRange) -> KeyGroupRange {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end).max(start);
        KeyGroupRange { start, end }
    }

    /// Iterates over the key groups of the range.
    pub fn iter(&self) -> impl Iterator<Item = KeyGroup> {
        (self.start..self.end).map(KeyGroup)
    }
}

macro_rules! encode_unsigned {
    ($($t:ty),*) => {$(
        impl KeyEncode for $t {
            fn encode_key(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_be_bytes());
            }
        }
    )*};
}
encode_unsigned!(u8, u16, u32, u64, u128);

macro_rules! encode_signed {
    ($($t:ty => $u:ty),*) => {$(
        impl KeyEncode for $t {
            fn encode_key(&self, out: &mut Vec<u8>) {
                let flipped = (*self as $u) ^ (1 << (<$u>::BITS - 1));
                out.extend_from_slice(&flipped.to_be_bytes());
            }
        }
    )*};
}
encode_signed!(i8 => u8, i16 => u16, i32 => u32, i64 => u64, i128 => u128);

impl KeyEncode for usize {
    fn encode_key(&self, out: &mut Vec<u8>) {
        (*self as u64).encode_key(out)
    }
}

impl KeyEncode for isize {
    fn encode_key(&self, out: &mut Vec<u8>) {
        (*self as i64).encode_key(out)
    }
}

impl KeyEncode for bool {
    fn encode_key(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl KeyEncode for char {
    fn encode_key(&self, out: &mut Vec<u8>) {
        (*self as u32).encode_key(out)
    }
}

impl KeyEncode for [u8] {
    fn encode_key(&self, out: &mut Vec<u8>) {
        // Keys longer than 4 GiB are not representable in a record anyway.
        out.extend_from_slice(&(self.len() as u32).to_be_bytes());
        out.extend_from_slice(self);
    }
}

impl KeyEncode for Vec<u8> {
    fn encode_key(&self, out: &mut Vec<u8>) {
        self.as_slice().encode_key(out)
    }
}

impl KeyEncode for str {
    fn encode_key(&self, out: &mut Vec<u8>) {
        self.as_bytes().encode_key(out)
    }
}

impl KeyEncode for String {
    fn encode_key(&self, out: &mut Vec<u8>) {
        self.as_bytes().encode_key(out)
    }
}

impl<T: KeyEncode + ?Sized> KeyEncode for &T {
    fn encode_key(&self, out: &mut Vec<u8>) {
        (**self).encode_key(out)
    }
}

impl<T: KeyEncode> KeyEncode for Option<T> {
    fn encode_key(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                v.encode_key(out)
            }
        }
    }
}

macro_rules! encode_tuple {
    ($($name:ident),+) => {
        impl<$($name: KeyEncode),+> KeyEncode for ($($name,)+) {
            #[allow(non_snake_case)]
            fn encode_key(&self, out: &mut Vec<u8>) {
                let ($($name,)+) = self;
                $($name.encode_key(out);)+
            }
        }
    };
}
encode_tuple!(A);
encode_tuple!(A, B);
encode_tuple!(A, B, C);
encode_tuple!(A, B, C, D);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc<K: KeyEncode + ?Sized>(k: &K) -> Vec<u8> {
        let mut v = Vec::new();
        k.encode_key(&mut v);
        v
    }

    #[test]
    fn encodings_are_pinned() {
        assert_eq!(enc(&0x0102u16), [1, 2]);
        assert_eq!(enc(&-1i32), [0x7f, 0xff, 0xff, 0xff]);
        assert_eq!(enc(&0i8), [0x80]);
        assert_eq!(enc("ab"), [0, 0, 0, 2, b'a', b'b']);
        assert_eq!(enc(&(1u8, true)), [1, 1]);
        assert_eq!(enc(&Some(7u8)), [1, 7]);
        assert_eq!(enc(&None::<u8>), [0]);
    }

    /// The hash and key groups are persisted: these values must never change.
    #[test]
    fn key_groups_are_pinned() {
        assert_eq!(key_hash(b""), 0x2d06800538d394c2);
        let cases: [(Vec<u8>, u16); 4] =
            [(enc(&0u64), 3289), (enc(&42u64), 172), (enc("user-42"), 2243), (enc(&(7u32, "x")), 3212)];
        for (bytes, expected) in cases {
            assert_eq!(key_group_of_encoded(&bytes, DEFAULT_MAX_PARALLELISM), KeyGroup(expected), "{bytes:?}");
        }
    }

    #[test]
    fn shard_ranges_partition_key_groups() {
        for max in [1u16, 7, 128, 4096, MAX_MAX_PARALLELISM] {
            for p in 1..=9usize {
                let mut next = 0u16;
                for s in 0..p {
                    let r = KeyGroupRange::for_shard(s, p, max);
                    assert_eq!(r.start, next, "contiguous p={p} max={max}");
                    for kg in r.iter() {
                        assert_eq!(KeyGroupRange::shard_for(kg, p, max), s);
                    }
                    next = r.end;
                }
                assert_eq!(next, max);
            }
        }
    }

    proptest! {
        #[test]
        fn signed_encoding_preserves_order(a: i64, b: i64) {
            prop_assert_eq!(a.cmp(&b), enc(&a).cmp(&enc(&b)));
        }

        #[test]
        fn string_tuples_are_unambiguous(a: String, b: String, c: String, d: String) {
            prop_assume!((a.clone(), b.clone()) != (c.clone(), d.clone()));
            prop_assert_ne!(enc(&(a, b)), enc(&(c, d)));
        }
    }
}
