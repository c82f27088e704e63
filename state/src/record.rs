//! The record format of segment logs.
//!
//! Every record starts at a 16-byte aligned offset. Its value is an rkyv archive placed at a
//! 16-byte aligned offset, so it can be accessed in place; its exact length is stored, because
//! rkyv finds an archive's root from the end of the slice.
//!
//! # Layout
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | `len`: the record's slot length, a multiple of 16 (header, key, value, padding) |
//! | 4 | 4 | CRC-32 (IEEE, crc32fast) of bytes `8..len` (the whole slot after the CRC) |
//! | 8 | 8 | sequence number |
//! | 16 | 4 | state id |
//! | 20 | 2 | key group |
//! | 22 | 1 | kind: 1 put, 2 delete |
//! | 23 | 1 | flags: bit 0 [`FLAG_UNVALIDATED`] (value bytes came from outside a typed put) |
//! | 24 | 4 | key length |
//! | 28 | 4 | value length |
//! | 32 | key length | key bytes |
//! | align16(32 + key length) | value length | value bytes (rkyv archive) |
//! | .. | .. | zero padding up to `len` |
//!
//! A record in the mutable region (after the last checkpoint's seal) may be rewritten in place
//! when the new value fits in its slot; the slot keeps its length (a shorter value leaves more
//! zero padding), so a scan of the log always steps from slot to slot. `len == 0` means no
//! record here.

use crate::keygroup::KeyGroup;
use crate::segment::{u32_at, u64_at};

/// Bytes of the fixed record header.
pub const RECORD_HEADER_BYTES: u32 = 32;
/// Alignment of records and values.
pub const RECORD_ALIGN: u32 = 16;

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// Sets the key's value.
    Put = 1,
    /// Removes the key.
    Delete = 2,
}

impl RecordKind {
    fn from_u8(b: u8) -> Option<RecordKind> {
        match b {
            1 => Some(RecordKind::Put),
            2 => Some(RecordKind::Delete),
            _ => None,
        }
    }
}

/// Flag: the value was stored from raw bytes (an import, a rescale), not serialised by a typed
/// put in this process, so a typed reader validates it (rkyv bytecheck) before access.
pub const FLAG_UNVALIDATED: u8 = 1;

/// Identifies one named state (of one operator) within a store.
pub type StateId = u32;

/// Rounds `n` up to the record alignment.
pub const fn align16(n: u32) -> u32 {
    (n + (RECORD_ALIGN - 1)) & !(RECORD_ALIGN - 1)
}

/// Offset of the value within a record whose key has `key_len` bytes.
pub const fn value_offset(key_len: u32) -> u32 {
    align16(RECORD_HEADER_BYTES + key_len)
}

/// Bytes a record with these lengths occupies in the log.
pub const fn slot_bytes(key_len: u32, value_len: u32) -> u32 {
    align16(value_offset(key_len) + value_len)
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// The slot length: bytes the record occupies in the log, a multiple of 16.
    pub len: u32,
    /// Stored CRC.
    pub crc: u32,
    /// Sequence number.
    pub seq: u64,
    /// The state the record belongs to.
    pub state: StateId,
    /// The key group of the record's key.
    pub key_group: KeyGroup,
    /// Put or delete.
    pub kind: RecordKind,
    /// Key length in bytes.
    pub key_len: u32,
    /// Value length in bytes (0 for a delete).
    pub value_len: u32,
    /// Flags ([`FLAG_UNVALIDATED`]).
    pub flags: u8,
}

impl RecordHeader {
    /// Offset of the value within the record.
    pub fn value_offset(&self) -> u32 {
        value_offset(self.key_len)
    }

    /// Bytes the record occupies in the log (its `len`).
    pub fn slot_bytes(&self) -> u32 {
        self.len
    }

    /// Offset of the end of the value within the record.
    pub fn value_end(&self) -> u32 {
        self.value_offset() + self.value_len
    }

    /// Writes the header fields except the CRC into `out[0..32]`.
    pub fn encode_into(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.len.to_le_bytes());
        out[4..8].copy_from_slice(&self.crc.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..20].copy_from_slice(&self.state.to_le_bytes());
        out[20..22].copy_from_slice(&self.key_group.0.to_le_bytes());
        out[22] = self.kind as u8;
        out[23] = self.flags;
        out[24..28].copy_from_slice(&self.key_len.to_le_bytes());
        out[28..32].copy_from_slice(&self.value_len.to_le_bytes());
    }
}

/// Why bytes do not hold a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// `len == 0`: no record here (end of the segment's data).
    End,
    /// The header's lengths are inconsistent or run past the available bytes.
    BadHeader(&'static str),
    /// The CRC does not match the contents.
    BadCrc,
}

/// Decodes the header at the start of `bytes` and checks its lengths against `bytes.len()`,
/// without checking the CRC. Never panics, whatever the bytes.
pub fn decode_header(bytes: &[u8]) -> Result<RecordHeader, RecordError> {
    if bytes.len() < RECORD_HEADER_BYTES as usize {
        return if bytes.iter().all(|b| *b == 0) {
            Err(RecordError::End)
        } else {
            Err(RecordError::BadHeader("short"))
        };
    }
    let len = u32_at(bytes, 0);
    if len == 0 {
        return Err(RecordError::End);
    }
    let kind = RecordKind::from_u8(bytes[22]).ok_or(RecordError::BadHeader("unknown kind"))?;
    let key_len = u32_at(bytes, 24);
    let value_len = u32_at(bytes, 28);
    let value_end = u64::from(RECORD_HEADER_BYTES) + u64::from(key_len);
    let value_end = value_end.div_ceil(u64::from(RECORD_ALIGN)) * u64::from(RECORD_ALIGN) + u64::from(value_len);
    if !len.is_multiple_of(RECORD_ALIGN) || value_end > u64::from(len) {
        return Err(RecordError::BadHeader("lengths disagree"));
    }
    if len as usize > bytes.len() {
        return Err(RecordError::BadHeader("record runs past the end"));
    }
    if bytes[23] & !FLAG_UNVALIDATED != 0 {
        return Err(RecordError::BadHeader("unknown flag set"));
    }
    Ok(RecordHeader {
        len,
        crc: u32_at(bytes, 4),
        seq: u64_at(bytes, 8),
        state: u32_at(bytes, 16),
        key_group: KeyGroup(u16::from_le_bytes([bytes[20], bytes[21]])),
        kind,
        key_len,
        value_len,
        flags: bytes[23],
    })
}

/// Decodes the record at the start of `bytes` and checks its CRC.
pub fn decode_checked(bytes: &[u8]) -> Result<RecordHeader, RecordError> {
    let header = decode_header(bytes)?;
    if crc_of(&bytes[..header.len as usize]) != header.crc {
        return Err(RecordError::BadCrc);
    }
    Ok(header)
}

/// The CRC of a record: over everything after the CRC field.
pub fn crc_of(record: &[u8]) -> u32 {
    crc32fast::hash(&record[8..])
}

/// The key bytes of a record whose header was decoded from `record`.
pub fn key_of<'a>(record: &'a [u8], header: &RecordHeader) -> &'a [u8] {
    &record[RECORD_HEADER_BYTES as usize..(RECORD_HEADER_BYTES + header.key_len) as usize]
}

/// The value bytes of a record whose header was decoded from `record`.
pub fn value_of<'a>(record: &'a [u8], header: &RecordHeader) -> &'a [u8] {
    &record[header.value_offset() as usize..header.value_end() as usize]
}

/// Builds a complete record (header, key, padding, value) in `out`, computing its CRC.
/// `out` must be at least `slot_bytes(key.len(), value.len())` long; bytes past `len` up to the
/// slot end are zeroed so a record's slot never holds stale bytes.
pub fn encode(out: &mut [u8], header: &RecordHeader, key: &[u8], value: &[u8]) {
    let voff = header.value_offset() as usize;
    let slot = header.slot_bytes() as usize;
    debug_assert!(voff + value.len() <= slot && slot.is_multiple_of(RECORD_ALIGN as usize));
    debug_assert!(out.len() >= slot);
    header.encode_into(&mut out[..RECORD_HEADER_BYTES as usize]);
    out[RECORD_HEADER_BYTES as usize..RECORD_HEADER_BYTES as usize + key.len()].copy_from_slice(key);
    out[RECORD_HEADER_BYTES as usize + key.len()..voff].fill(0);
    out[voff..voff + value.len()].copy_from_slice(value);
    out[voff + value.len()..slot].fill(0);
    let crc = crc_of(&out[..slot]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Rewrites the value of the record in `slot` (its whole slot) in place: new sequence number,
/// flags and value, padding zeroed, CRC recomputed. The slot length, key and other fields stay.
/// The caller checked that `value_offset + value.len()` fits in the slot.
pub fn rewrite_value(slot: &mut [u8], header: &RecordHeader, seq: u64, flags: u8, value: &[u8]) {
    let voff = header.value_offset() as usize;
    let len = voff + value.len();
    debug_assert!(len <= slot.len() && slot.len() == header.len as usize);
    slot[8..16].copy_from_slice(&seq.to_le_bytes());
    slot[23] = flags;
    slot[28..32].copy_from_slice(&(value.len() as u32).to_le_bytes());
    slot[voff..len].copy_from_slice(value);
    slot[len..].fill(0);
    let crc = crc_of(slot);
    slot[4..8].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(key_len: u32, value_len: u32) -> RecordHeader {
        RecordHeader {
            len: slot_bytes(key_len, value_len),
            crc: 0,
            seq: 7,
            state: 3,
            key_group: KeyGroup(11),
            kind: RecordKind::Put,
            key_len,
            value_len,
            flags: 0,
        }
    }

    #[test]
    fn golden_record_bytes() {
        let h = header(3, 4);
        let mut buf = vec![0xAAu8; slot_bytes(3, 4) as usize];
        encode(&mut buf, &h, b"abc", &[1, 2, 3, 4]);
        assert_eq!(buf.len(), 64);
        assert_eq!(&buf[0..4], &64u32.to_le_bytes());
        assert_eq!(&buf[32..35], b"abc");
        assert_eq!(&buf[48..52], &[1, 2, 3, 4]);
        assert!(buf[52..].iter().all(|b| *b == 0));
        let crc = crc32fast::hash(&buf[8..64]);
        assert_eq!(&buf[4..8], &crc.to_le_bytes());
        let d = decode_checked(&buf).unwrap();
        assert_eq!(d, RecordHeader { crc, ..h });
        assert_eq!(key_of(&buf, &d), b"abc");
        assert_eq!(value_of(&buf, &d), &[1, 2, 3, 4]);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let h = header(5, 9);
        let mut buf = vec![0u8; slot_bytes(5, 9) as usize];
        encode(&mut buf, &h, b"keyed", b"valuebyte");
        for bit in 0..(h.len as usize * 8) {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_checked(&bad).is_err(), "flip of bit {bit} not detected");
        }
    }

    #[test]
    fn rewrite_in_place_keeps_key_and_fixes_crc() {
        let h = header(3, 20);
        let mut buf = vec![0u8; h.slot_bytes() as usize];
        encode(&mut buf, &h, b"abc", &[9u8; 20]);
        let d = decode_checked(&buf).unwrap();
        rewrite_value(&mut buf, &d, 8, FLAG_UNVALIDATED, &[1, 2]);
        let d = decode_checked(&buf).unwrap();
        assert_eq!((d.seq, d.value_len, d.flags), (8, 2, FLAG_UNVALIDATED));
        assert_eq!(key_of(&buf, &d), b"abc");
        assert_eq!(value_of(&buf, &d), &[1, 2]);
        assert_eq!(d.len, slot_bytes(3, 20), "the slot keeps its length");
        assert!(buf[d.value_end() as usize..].iter().all(|b| *b == 0));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_checked(&bytes);
        }

        #[test]
        fn round_trip(key in proptest::collection::vec(any::<u8>(), 0..40), value in proptest::collection::vec(any::<u8>(), 0..80)) {
            let h = header(key.len() as u32, value.len() as u32);
            let mut buf = vec![0u8; h.slot_bytes() as usize];
            encode(&mut buf, &h, &key, &value);
            let d = decode_checked(&buf).unwrap();
            prop_assert_eq!(key_of(&buf, &d), &key[..]);
            prop_assert_eq!(value_of(&buf, &d), &value[..]);
            prop_assert_eq!(buf.len() % 16, 0);
        }
    }
}
