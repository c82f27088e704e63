//! What flows through a stream: records and the markers between them.
//!
//! Records and markers share one enum, and therefore one channel and one batch, because their
//! relative order carries meaning: a watermark `w` promises that no record with a timestamp
//! `<= w` follows it on that channel; barrier `n` splits the records that belong to checkpoint
//! `n` from those after it; end-of-input is the last element of a channel. The exchange never
//! reorders the elements of one (source shard, target shard) pair, so these promises survive
//! the trip between cores.
//!
//! Timestamps are event time as an `i64`; weir only compares and subtracts them, so the unit is
//! the job's convention (milliseconds since the Unix epoch, by default).

/// One element of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamElement<T> {
    /// A data record and its event timestamp.
    Record {
        /// The payload.
        value: T,
        /// Event time of the record.
        timestamp: i64,
    },
    /// Event time has reached this value on this channel: no later record on it is older.
    Watermark(i64),
    /// The producer became idle (`true`: leave it out of event time downstream) or active again.
    Idle(bool),
    /// A checkpoint (or savepoint) barrier: everything before it belongs to the snapshot.
    Barrier(Barrier),
    /// The channel ends here; nothing follows.
    EndOfInput,
}

impl<T> StreamElement<T> {
    /// A record with its event timestamp.
    pub fn record(value: T, timestamp: i64) -> Self {
        StreamElement::Record { value, timestamp }
    }

    /// Whether this is a record (not a marker).
    pub fn is_record(&self) -> bool {
        matches!(self, StreamElement::Record { .. })
    }

    /// The marker this element is, or `None` for a record.
    pub fn marker(&self) -> Option<Marker> {
        match self {
            StreamElement::Record { .. } => None,
            StreamElement::Watermark(w) => Some(Marker::Watermark(*w)),
            StreamElement::Idle(b) => Some(Marker::Idle(*b)),
            StreamElement::Barrier(b) => Some(Marker::Barrier(*b)),
            StreamElement::EndOfInput => Some(Marker::EndOfInput),
        }
    }
}

/// A stream element that is not a record. Every downstream instance must see each marker, so
/// markers are what an exchange broadcasts; they carry no payload, so broadcasting one needs no
/// `Clone` on the record type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// See [`StreamElement::Watermark`].
    Watermark(i64),
    /// See [`StreamElement::Idle`].
    Idle(bool),
    /// See [`StreamElement::Barrier`].
    Barrier(Barrier),
    /// See [`StreamElement::EndOfInput`].
    EndOfInput,
}

impl<T> From<Marker> for StreamElement<T> {
    fn from(marker: Marker) -> Self {
        match marker {
            Marker::Watermark(w) => StreamElement::Watermark(w),
            Marker::Idle(b) => StreamElement::Idle(b),
            Marker::Barrier(b) => StreamElement::Barrier(b),
            Marker::EndOfInput => StreamElement::EndOfInput,
        }
    }
}

/// A checkpoint barrier, injected by the sources and aligned by every multi-input operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Barrier {
    /// The checkpoint (or savepoint) this barrier belongs to; increases over a job's life.
    pub checkpoint_id: u64,
    /// Whether the snapshot is a periodic checkpoint or a user-requested savepoint.
    pub kind: BarrierKind,
}

/// What a barrier asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarrierKind {
    /// A periodic checkpoint, used for recovery; owned and retired by the runtime.
    Checkpoint,
    /// A savepoint, requested by the user; written in the canonical, rescalable format.
    Savepoint,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_through_elements() {
        let barrier = Barrier { checkpoint_id: 7, kind: BarrierKind::Savepoint };
        for marker in [Marker::Watermark(-3), Marker::Barrier(barrier), Marker::EndOfInput] {
            let element: StreamElement<String> = marker.into();
            assert!(!element.is_record());
            assert_eq!(element.marker(), Some(marker));
        }
    }

    #[test]
    fn a_record_is_no_marker() {
        let element = StreamElement::record("x", 5);
        assert!(element.is_record());
        assert_eq!(element.marker(), None);
    }
}
