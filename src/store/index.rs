//! Segment index snapshots (`<base>.idx`) and tombstone files
//! (`<base>.del`): pure codecs over byte slices, no I/O. Layouts in
//! `docs/store-format.md`.
//!
//! Invariants: [`decode_index`] never panics and returns `None` for anything
//! that is not a complete, checksummed index; [`encode_index`] output
//! decodes to the same value. [`decode_tombs`] returns the valid prefix of
//! a tombstone file (a torn last entry is ignored).

use std::ops::Range;

use super::record::{get_varint, put_varint};

// Index snapshot (plain; an encrypted one is `"FRNDIDXE" ‖ nonce ‖
// ciphertext of this ‖ tag`), little-endian:
//
//   0..8    magic "FRNDIDX1"
//   8..16   base_seq u64   must equal the segment's
//   16..24  base_ts  u64   must equal the segment header's
//   24..32  last_ts  u64   newest timestamp in the segment
//   32..40  len      u64   segment file length described
//   40..44  last_crc u32   crc field (encrypted: last 4 tag bytes) of the
//                          last record in the file, 0 if none
//   44..    varint n_subjects, n × (varint len, UTF-8)
//           varint n_slots, per slot: varint (size << 1) | 1, varint
//             subject (a live record) or varint size << 1 (removed; 0: gap)
//           varint n_ttl, n × (varint slot, varint deadline unix ns)
//           varint n_ids, n × (varint slot, varint timestamp, varint len, id)
//   last 4  crc32c of everything before it

pub const IDX_MAGIC: &[u8; 8] = b"FRNDIDX1";
const IDX_BASE_SEQ: Range<usize> = 8..16;
const IDX_BASE_TS: Range<usize> = 16..24;
const IDX_LAST_TS: Range<usize> = 24..32;
const IDX_LEN: Range<usize> = 32..40;
const IDX_LAST_CRC: Range<usize> = 40..44;
/// Where the variable-length sections start.
const IDX_FIXED_LEN: usize = 44;
/// Bytes of the trailing crc32c.
const IDX_CRC_LEN: usize = 4;

// Tombstone file: entries of 8 bytes, `slot u32 ‖ crc32c of (base_seq u64
// ‖ slot u32)`, little-endian.

/// Bytes per tombstone entry: u32 slot + u32 crc32c.
pub const TOMB_LEN: usize = 8;
const TOMB_SLOT: Range<usize> = 0..4;
const TOMB_CRC: Range<usize> = 4..8;

/// One record slot of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// A live record: its total size and its subject (an index into
    /// [`SegIndex::subjects`]).
    Live { size: u32, subject: u32 },
    /// A deleted record still in the file (`size > 0`) or a gap left by
    /// compaction (`size == 0`).
    Dead { size: u32 },
}

impl Slot {
    /// Bytes of the record in the file (0 for a gap).
    pub fn size(&self) -> u32 {
        match *self {
            Slot::Live { size, .. } | Slot::Dead { size } => size,
        }
    }
}

/// Everything the store needs to know about a segment without reading it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegIndex {
    pub base: u64,
    pub base_ts: u64,
    pub last_ts: u64,
    /// Segment file length this index describes.
    pub len: u64,
    /// crc field of the last record in the file (0 if none).
    pub last_crc: u32,
    /// Subjects used by live slots.
    pub subjects: Vec<String>,
    /// Slot `i` is sequence `base + i`.
    pub slots: Vec<Slot>,
    /// Live records with a deadline (the stream's per-message TTL):
    /// (slot, deadline unix ns).
    pub ttls: Vec<(u32, u64)>,
    /// Records with an id (the stream's `Nats-Msg-Id`): (slot, timestamp,
    /// id).
    pub msg_ids: Vec<(u32, u64, String)>,
}

pub fn encode_index(ix: &SegIndex) -> Vec<u8> {
    let mut out = vec![0u8; IDX_FIXED_LEN];
    out.reserve(64 + ix.slots.len() * 3);
    out[..IDX_BASE_SEQ.start].copy_from_slice(IDX_MAGIC);
    out[IDX_BASE_SEQ].copy_from_slice(&ix.base.to_le_bytes());
    out[IDX_BASE_TS].copy_from_slice(&ix.base_ts.to_le_bytes());
    out[IDX_LAST_TS].copy_from_slice(&ix.last_ts.to_le_bytes());
    out[IDX_LEN].copy_from_slice(&ix.len.to_le_bytes());
    out[IDX_LAST_CRC].copy_from_slice(&ix.last_crc.to_le_bytes());
    put_varint(&mut out, ix.subjects.len() as u64);
    for s in &ix.subjects {
        put_varint(&mut out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
    put_varint(&mut out, ix.slots.len() as u64);
    for s in &ix.slots {
        match *s {
            Slot::Live { size, subject } => {
                put_varint(&mut out, (u64::from(size) << 1) | 1);
                put_varint(&mut out, u64::from(subject));
            }
            Slot::Dead { size } => put_varint(&mut out, u64::from(size) << 1),
        }
    }
    put_varint(&mut out, ix.ttls.len() as u64);
    for &(slot, exp) in &ix.ttls {
        put_varint(&mut out, u64::from(slot));
        put_varint(&mut out, exp);
    }
    put_varint(&mut out, ix.msg_ids.len() as u64);
    for (slot, ts, id) in &ix.msg_ids {
        put_varint(&mut out, u64::from(*slot));
        put_varint(&mut out, *ts);
        put_varint(&mut out, id.len() as u64);
        out.extend_from_slice(id.as_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn var(&mut self) -> Option<u64> {
        let (v, n) = get_varint(self.b.get(self.pos..)?)?;
        self.pos += n;
        Some(v)
    }
    fn u32v(&mut self) -> Option<u32> {
        u32::try_from(self.var()?).ok()
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn string(&mut self) -> Option<String> {
        let n = usize::try_from(self.var()?).ok()?;
        String::from_utf8(self.bytes(n)?.to_vec()).ok()
    }
    /// A count that cannot exceed the bytes left (each item takes >= 1).
    fn count(&mut self) -> Option<usize> {
        let n = usize::try_from(self.var()?).ok()?;
        (n <= self.b.len().saturating_sub(self.pos)).then_some(n)
    }
}

pub fn decode_index(buf: &[u8]) -> Option<SegIndex> {
    let body_len = buf.len().checked_sub(IDX_CRC_LEN)?;
    let (body, crc) = buf.split_at(body_len);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    if body.get(..IDX_BASE_SEQ.start)? != IDX_MAGIC {
        return None;
    }
    let u64_at = |r: Range<usize>| Some(u64::from_le_bytes(body.get(r)?.try_into().ok()?));
    let mut ix = SegIndex {
        base: u64_at(IDX_BASE_SEQ)?,
        base_ts: u64_at(IDX_BASE_TS)?,
        last_ts: u64_at(IDX_LAST_TS)?,
        len: u64_at(IDX_LEN)?,
        last_crc: u32::from_le_bytes(body.get(IDX_LAST_CRC)?.try_into().ok()?),
        ..SegIndex::default()
    };
    let mut r = Reader {
        b: body,
        pos: IDX_FIXED_LEN,
    };
    let n = r.count()?;
    for _ in 0..n {
        ix.subjects.push(r.string()?);
    }
    let n = r.count()?;
    ix.slots.reserve(n);
    for _ in 0..n {
        let v = r.var()?;
        let size = u32::try_from(v >> 1).ok()?;
        if v & 1 == 1 {
            let subject = r.u32v()?;
            if subject as usize >= ix.subjects.len() {
                return None;
            }
            ix.slots.push(Slot::Live { size, subject });
        } else {
            ix.slots.push(Slot::Dead { size });
        }
    }
    let n = r.count()?;
    for _ in 0..n {
        ix.ttls.push((r.u32v()?, r.var()?));
    }
    let n = r.count()?;
    for _ in 0..n {
        ix.msg_ids.push((r.u32v()?, r.var()?, r.string()?));
    }
    (r.pos == body.len()).then_some(ix)
}

/// One tombstone entry for slot `i` of the segment with base `base`.
pub fn encode_tomb(base: u64, i: u32, out: &mut Vec<u8>) {
    let mut e = [0u8; TOMB_LEN];
    e[TOMB_SLOT].copy_from_slice(&i.to_le_bytes());
    e[TOMB_CRC].copy_from_slice(&tomb_crc(base, i).to_le_bytes());
    out.extend_from_slice(&e);
}

fn tomb_crc(base: u64, i: u32) -> u32 {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&base.to_le_bytes());
    b[8..].copy_from_slice(&i.to_le_bytes());
    crc32c::crc32c(&b)
}

/// The slots of a tombstone file, up to the first damaged entry. The bool
/// is true if damage (other than a short torn tail) was found.
pub fn decode_tombs(base: u64, buf: &[u8]) -> (Vec<u32>, bool) {
    let mut out = Vec::with_capacity(buf.len() / TOMB_LEN);
    for e in buf.chunks(TOMB_LEN) {
        let (Some(i), Some(c)) = (e.get(TOMB_SLOT), e.get(TOMB_CRC)) else {
            return (out, false);
        };
        let i = u32::from_le_bytes([i[0], i[1], i[2], i[3]]);
        let c = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if tomb_crc(base, i) != c {
            return (out, true);
        }
        out.push(i);
    }
    (out, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SegIndex {
        SegIndex {
            base: 100,
            base_ts: 7,
            last_ts: 90,
            len: 12345,
            last_crc: 0xdead_beef,
            subjects: vec!["a.b".into(), "c".into()],
            slots: vec![
                Slot::Live {
                    size: 40,
                    subject: 1,
                },
                Slot::Dead { size: 0 },
                Slot::Dead { size: 33 },
                Slot::Live {
                    size: 70_000,
                    subject: 0,
                },
            ],
            ttls: vec![(0, 1_000)],
            msg_ids: vec![(3, 88, "id-1".into())],
        }
    }

    #[test]
    fn index_round_trip_and_damage() {
        let ix = sample();
        let b = encode_index(&ix);
        assert_eq!(decode_index(&b), Some(ix));
        for k in 0..b.len() {
            assert_eq!(decode_index(&b[..k]), None, "truncated at {k}");
        }
        for byte in 0..b.len() {
            let mut c = b.clone();
            c[byte] ^= 0x10;
            assert_eq!(decode_index(&c), None, "flip at {byte}");
        }
    }

    #[test]
    fn tombs_round_trip_torn_and_foreign() {
        let mut b = Vec::new();
        for i in [3, 9, 0] {
            encode_tomb(55, i, &mut b);
        }
        assert_eq!(decode_tombs(55, &b), (vec![3, 9, 0], false));
        assert_eq!(decode_tombs(55, &b[..b.len() - 3]), (vec![3, 9], false));
        assert_eq!(decode_tombs(56, &b), (vec![], true), "other segment");
    }
}
