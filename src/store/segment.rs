//! One segment file's in-memory description, the directory's file names,
//! and the `meta` file codec.
//!
//! A [`Segment`] knows where every record of its file starts (one `u32`
//! per sequence), which records are deleted (a lazily allocated bitmap)
//! and each record's subject id; it never reads the file itself.
//!
//! Invariants: `offsets` is strictly increasing except for compaction gaps
//! (equal offsets, size 0); `offsets[i]` is the offset of sequence
//! `base + i`; `flushed <= len`; `live` counts the records that are neither
//! deleted nor below the store's `first_seq`.

use super::crypt::Key;
use super::record::{self, SealInfo};

/// Record ids (`Tags::id`) of one segment: (slot, timestamp, id).
pub(super) type SegIds = Vec<(u32, u64, String)>;

/// Everything known about one segment file.
#[derive(Debug)]
pub(super) struct Segment {
    pub base: u64,
    pub base_ts: u64,
    /// Timestamp of the newest record (`base_ts` when empty).
    pub last_ts: u64,
    /// Logical length: file bytes plus the store's unwritten buffer.
    pub len: u64,
    /// Bytes already handed to the backend.
    pub flushed: u64,
    /// The file exists in the backend.
    pub created: bool,
    /// Offset of the record with seq `base + i` (a gap has the offset of
    /// the next record, so its size is 0).
    pub offsets: Vec<u32>,
    /// Subject id of record `i` (meaningless once the record is removed).
    pub sids: Vec<u32>,
    /// Interior deletions and gaps (bit `i` = seq `base + i`), allocated on
    /// first use.
    pub deleted: Option<Vec<u64>>,
    /// Records neither deleted nor below `first_seq`.
    pub live: u64,
    /// An `.idx` matching the current file exists.
    pub indexed: bool,
    /// The `.del` file exists.
    pub has_tombs: bool,
    /// Salt and key check of an encrypted segment.
    pub seal: Option<SealInfo>,
    /// Never append again (an encrypted segment that was truncated or
    /// reopened: its next offsets may have been used for other bytes).
    pub no_append: bool,
    /// The ids of its records, kept while the segment may still need an
    /// index snapshot (`None`: not in memory; read from the records when
    /// a snapshot is written).
    pub ids: Option<SegIds>,
}

impl Segment {
    pub fn new(base: u64, base_ts: u64, seal: Option<SealInfo>) -> Segment {
        Segment {
            base,
            base_ts,
            last_ts: base_ts,
            len: record::header_len(seal.is_some()) as u64,
            seal,
            no_append: false,
            flushed: 0,
            created: false,
            offsets: Vec::new(),
            sids: Vec::new(),
            deleted: None,
            live: 0,
            indexed: false,
            has_tombs: false,
            ids: Some(Vec::new()),
        }
    }

    /// One past the last sequence of the segment.
    pub fn end(&self) -> u64 {
        self.base + self.offsets.len() as u64
    }

    pub fn header_len(&self) -> u64 {
        record::header_len(self.seal.is_some()) as u64
    }

    pub fn offset(&self, i: usize) -> u64 {
        self.offsets.get(i).map_or(self.len, |&o| u64::from(o))
    }

    pub fn rec_size(&self, i: usize) -> u64 {
        self.offset(i + 1) - self.offset(i)
    }

    pub fn is_deleted(&self, i: usize) -> bool {
        self.deleted
            .as_ref()
            .and_then(|d| d.get(i / 64))
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn set_deleted(&mut self, i: usize) {
        let d = self.deleted.get_or_insert_with(Vec::new);
        if d.len() <= i / 64 {
            d.resize(i / 64 + 1, 0);
        }
        if let Some(w) = d.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    pub fn sid(&self, i: usize) -> u32 {
        self.sids.get(i).copied().unwrap_or(u32::MAX)
    }
}

/// The key and salt to decode segment `seg`'s records with (`None`: plain,
/// or encrypted without a key, which open refuses).
pub(super) fn sealing<'a>(key: &'a Option<Key>, seg: &'a Segment) -> record::Sealing<'a> {
    match (key, &seg.seal) {
        (Some(k), Some(si)) => Some((k, &si.salt)),
        _ => None,
    }
}

/// Digits of the sequence in segment, snapshot and tombstone file names.
const NAME_DIGITS: usize = 20;

/// A segment file name for a base sequence.
pub fn segment_name(base: u64) -> String {
    format!("{base:020}.seg")
}

pub(super) fn index_name(base: u64) -> String {
    format!("{base:020}.idx")
}

pub(super) fn tomb_name(base: u64) -> String {
    format!("{base:020}.del")
}

/// Is `name` a tombstone file's name?
pub(super) fn is_tomb_name(name: &str) -> bool {
    parse_name(name).is_some_and(|(_, ext)| ext == "del")
}

/// `(base, extension)` of a segment, snapshot or tombstone file name.
pub(super) fn parse_name(name: &str) -> Option<(u64, &str)> {
    let (digits, ext) = name.split_once('.')?;
    if digits.len() != NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, ext))
}

/// Name of the metadata file.
pub const META_NAME: &str = "meta";

/// `meta` file layout (little-endian): magic, first_seq, last_seq, crc32c
/// of everything before it.
const META_MAGIC: &[u8; 8] = b"FRNDMET1";
const META_FIRST_SEQ: usize = 8;
const META_LAST_SEQ: usize = 16;
const META_CRC: usize = 24;
const META_LEN: usize = 28;

pub(super) fn encode_meta(first_seq: u64, last_seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(META_LEN);
    out.extend_from_slice(META_MAGIC);
    out.extend_from_slice(&first_seq.to_le_bytes());
    out.extend_from_slice(&last_seq.to_le_bytes());
    let crc = crc32c::crc32c(&out[..META_CRC]);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// `(first_seq, last_seq)`, or `None` for anything but an intact file.
pub(super) fn decode_meta(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() != META_LEN || &b[..META_FIRST_SEQ] != META_MAGIC {
        return None;
    }
    let u64_at = |at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
    let crc = u32::from_le_bytes(b.get(META_CRC..META_LEN)?.try_into().ok()?);
    if crc32c::crc32c(&b[..META_CRC]) != crc {
        return None;
    }
    Some((u64_at(META_FIRST_SEQ)?, u64_at(META_LAST_SEQ)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trip_and_damage() {
        let b = encode_meta(7, 99);
        assert_eq!(b.len(), META_LEN);
        assert_eq!(decode_meta(&b), Some((7, 99)));
        for byte in 0..b.len() {
            let mut c = b.clone();
            c[byte] ^= 0x01;
            assert_eq!(decode_meta(&c), None, "flip at {byte}");
        }
        assert_eq!(decode_meta(&b[..27]), None);
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_name(&segment_name(42)), Some((42, "seg")));
        assert_eq!(parse_name(&index_name(42)), Some((42, "idx")));
        assert_eq!(parse_name(&tomb_name(u64::MAX)), Some((u64::MAX, "del")));
        assert_eq!(parse_name("meta"), None);
        assert_eq!(parse_name("0001.seg"), None);
    }
}
