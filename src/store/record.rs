//! The on-disk record and segment-header codec: pure functions over byte
//! slices, no I/O. See `docs/store-format.md` for the layout; the byte
//! positions are the constants below.
//!
//! Invariants: [`decode`] never panics on any input and never returns a
//! record whose checksum does not match; [`encode_into`] output always
//! decodes back to the same fields (round-trip tests below). The same holds
//! for encrypted records ([`encode_any`], [`decode_any`] with a key), whose
//! AEAD tag replaces the crc.

// Codecs never panic on input (`unsafe` is forbidden crate-wide).
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::ops::Range;

use super::crypt::{Key, KIND_ERASED, SALT_LEN, TAG_LEN};

// Plain record: `body_len u32 ‖ crc32c u32 of the body ‖ body`, where the
// body is `varint seq_delta ‖ varint ts_delta ‖ varint subject_len ‖
// varint hdr_field (0: none, n + 1: n header bytes) ‖ subject ‖ headers ‖
// payload`. Encrypted record: `varint body_len ‖ ciphertext of the same
// body ‖ 16-byte tag`.

/// Bytes before the checksummed body: u32 body length + u32 crc32c.
pub const PREFIX_LEN: usize = 8;
/// Where the body length sits in a plain record's prefix.
pub const REC_BODY_LEN: Range<usize> = 0..4;
/// Where the crc32c of the body sits in a plain record's prefix.
pub const REC_CRC: Range<usize> = 4..8;
/// The smallest possible body: four one-byte varints.
pub const MIN_BODY: usize = 4;
/// Sanity cap on a body length read from disk (1 GiB).
pub const MAX_BODY: usize = 1 << 30;

// Segment header, plain (28 bytes) and encrypted (52 bytes), little-endian:
//
//   0..8    magic and version ("FRNDSEG1" / "FRNDSEGE")
//   8..16   base_seq u64   sequence of the first record (equals the name)
//   16..24  base_ts  u64   unix ns, timestamp of the first record
//   24..40  salt           encrypted only
//   40..48  key check      encrypted only
//   last 4  crc32c of everything before it

/// Segment file header length.
pub const SEG_HEADER_LEN: usize = 28;
/// Magic and format version at the start of every segment file.
pub const SEG_MAGIC: &[u8; 8] = b"FRNDSEG1";
/// Header length of an encrypted segment (adds salt and key check).
pub const SEALED_HEADER_LEN: usize = 52;
/// Magic of an encrypted segment.
pub const SEALED_MAGIC: &[u8; 8] = b"FRNDSEGE";
const HDR_MAGIC: Range<usize> = 0..8;
const HDR_BASE_SEQ: Range<usize> = 8..16;
const HDR_BASE_TS: Range<usize> = 16..24;
const HDR_SALT: Range<usize> = 24..40;
const HDR_KEY_CHECK: Range<usize> = 40..48;
/// Bytes of the trailing crc32c of a segment header.
const HDR_CRC_LEN: usize = 4;
/// Longest body length varint of an encrypted record (bodies <= 2^30).
const MAX_LEN_VARINT: usize = 5;

/// A record's fields, borrowed from a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub seq: u64,
    pub timestamp: u64,
    pub subject: &'a [u8],
    pub headers: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The buffer ends before the record does (a torn write, or just the
    /// end of what was read).
    Incomplete,
    /// The bytes are not a valid record (bad length, checksum or fields).
    Corrupt(&'static str),
}

/// Segment header: base sequence and base timestamp of the segment, and
/// for an encrypted segment its salt and key check value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegHeader {
    pub base_seq: u64,
    pub base_ts: u64,
    pub seal: Option<SealInfo>,
}

/// The encryption fields of a segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealInfo {
    /// Random per segment file: with the key it selects the AEAD subkey.
    pub salt: [u8; SALT_LEN],
    /// [`Key::check_value`] of the key that wrote the segment.
    pub check: [u8; 8],
}

impl SegHeader {
    /// Bytes of the header in the file (where the first record starts).
    pub fn header_len(&self) -> usize {
        header_len(self.seal.is_some())
    }
}

/// Header length of a plain (`false`) or encrypted (`true`) segment.
pub fn header_len(sealed: bool) -> usize {
    if sealed {
        SEALED_HEADER_LEN
    } else {
        SEG_HEADER_LEN
    }
}

pub fn encode_header(h: SegHeader, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(if h.seal.is_some() {
        SEALED_MAGIC
    } else {
        SEG_MAGIC
    });
    out.extend_from_slice(&h.base_seq.to_le_bytes());
    out.extend_from_slice(&h.base_ts.to_le_bytes());
    if let Some(s) = &h.seal {
        out.extend_from_slice(&s.salt);
        out.extend_from_slice(&s.check);
    }
    let crc = crc32c::crc32c(out.get(start..).unwrap_or_default());
    out.extend_from_slice(&crc.to_le_bytes());
}

pub fn decode_header(buf: &[u8]) -> Result<SegHeader, DecodeError> {
    let magic = buf.get(HDR_MAGIC).ok_or(DecodeError::Incomplete)?;
    let sealed = magic == SEALED_MAGIC;
    let hl = header_len(sealed);
    let h = buf.get(..hl).ok_or(DecodeError::Incomplete)?;
    let (body, crc) = h.split_at(hl - HDR_CRC_LEN);
    if crc32c::crc32c(body) != u32::from_le_bytes(arr(crc)) {
        return Err(DecodeError::Corrupt("segment header checksum mismatch"));
    }
    if !sealed && body.get(HDR_MAGIC) != Some(SEG_MAGIC) {
        return Err(DecodeError::Corrupt("segment header magic/version unknown"));
    }
    // `body` is `header_len(sealed) - HDR_CRC_LEN` bytes: every field is in it.
    let field = |r: Range<usize>| body.get(r).unwrap_or_default();
    let seal = sealed.then(|| SealInfo {
        salt: arr(field(HDR_SALT)),
        check: arr(field(HDR_KEY_CHECK)),
    });
    Ok(SegHeader {
        base_seq: u64::from_le_bytes(arr(field(HDR_BASE_SEQ))),
        base_ts: u64::from_le_bytes(arr(field(HDR_BASE_TS))),
        seal,
    })
}

/// The first `N` bytes of `b` (zeros past its end: callers pass fields
/// of a length-checked buffer).
fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = b.get(..N) {
        a.copy_from_slice(s);
    }
    a
}

/// Writes `bytes` over `buf[at]` (a field of a length-checked buffer).
fn put(buf: &mut [u8], at: Range<usize>, bytes: &[u8]) {
    if let Some(d) = buf.get_mut(at) {
        d.copy_from_slice(bytes);
    }
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 varint; returns the value and the bytes used.
pub fn get_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(10) {
        let part = u64::from(b & 0x7f);
        if i == 9 && b > 1 {
            return None; // would overflow u64
        }
        v |= part << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Encoded size of a record, without encoding it.
pub fn encoded_len(
    seq_delta: u64,
    ts_delta: u64,
    subject: usize,
    headers: Option<usize>,
    payload: usize,
) -> usize {
    let hdr_field = headers.map_or(0, |h| h as u64 + 1);
    PREFIX_LEN
        + varint_len(seq_delta)
        + varint_len(ts_delta)
        + varint_len(subject as u64)
        + varint_len(hdr_field)
        + subject
        + headers.unwrap_or(0)
        + payload
}

pub fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends one record to `out`. `base_seq`/`base_ts` are the segment's.
/// Callers guarantee `seq >= base_seq` and `timestamp >= base_ts`, and that
/// the body is at most [`MAX_BODY`] bytes (the store checks sizes first).
pub fn encode_into(out: &mut Vec<u8>, base_seq: u64, base_ts: u64, rec: &RecordRef<'_>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; PREFIX_LEN]);
    put_varint(out, rec.seq.saturating_sub(base_seq));
    put_varint(out, rec.timestamp.saturating_sub(base_ts));
    put_varint(out, rec.subject.len() as u64);
    put_varint(out, rec.headers.map_or(0, |h| h.len() as u64 + 1));
    out.extend_from_slice(rec.subject);
    if let Some(h) = rec.headers {
        out.extend_from_slice(h);
    }
    out.extend_from_slice(rec.payload);
    let body_len = (out.len() - start - PREFIX_LEN) as u32;
    let crc = crc32c::crc32c(out.get(start + PREFIX_LEN..).unwrap_or_default());
    let prefix = out.get_mut(start..).unwrap_or_default();
    put(prefix, REC_BODY_LEN, &body_len.to_le_bytes());
    put(prefix, REC_CRC, &crc.to_le_bytes());
}

/// Encoded size of a plain (`sealed = false`) or encrypted record.
pub fn record_len(
    sealed: bool,
    seq_delta: u64,
    ts_delta: u64,
    subject: usize,
    headers: Option<usize>,
    payload: usize,
) -> usize {
    let plain = encoded_len(seq_delta, ts_delta, subject, headers, payload);
    if !sealed {
        return plain;
    }
    let body = plain - PREFIX_LEN + TAG_LEN;
    varint_len(body as u64) + body
}

/// The key and segment salt an encrypted record is sealed with.
pub type Sealing<'a> = Option<(&'a Key, &'a [u8; SALT_LEN])>;

/// Appends one record, encrypted when `seal` is given. `offset` is the
/// record's offset in its segment file (part of the nonce).
pub fn encode_any(
    out: &mut Vec<u8>,
    base_seq: u64,
    base_ts: u64,
    rec: &RecordRef<'_>,
    seal: Sealing<'_>,
    offset: u32,
) {
    let Some((key, salt)) = seal else {
        return encode_into(out, base_seq, base_ts, rec);
    };
    let start = out.len();
    encode_into(out, base_seq, base_ts, rec);
    // Reuse the plain encoding's body; replace its 8-byte prefix.
    let plain: Vec<u8> = out.drain(start..).skip(PREFIX_LEN).collect();
    seal_body(out, plain, key, salt, u64::from(offset));
}

/// Appends `varint(len) ‖ ciphertext ‖ tag` for a plain body.
fn seal_body(out: &mut Vec<u8>, mut body: Vec<u8>, key: &Key, salt: &[u8; SALT_LEN], counter: u64) {
    put_varint(out, (body.len() + TAG_LEN) as u64);
    let tag = key.seal(salt, counter, &mut body);
    out.extend_from_slice(&body);
    out.extend_from_slice(&tag);
}

/// A secure-erase overwrite for the encrypted record at `offset` whose
/// length varint has `vlen` bytes and which is `total` bytes long: same
/// length, sequence and timestamp, empty subject, no headers, zero payload,
/// sealed under the erase counter kind so it never shares a nonce with the
/// record it replaces.
pub fn encode_erased_sealed(
    seq_delta: u64,
    ts_delta: u64,
    (vlen, total): (usize, usize),
    key: &Key,
    salt: &[u8; SALT_LEN],
    offset: u32,
) -> Option<Vec<u8>> {
    let plain = total.checked_sub(vlen)?.checked_sub(TAG_LEN)?;
    let mut body = Vec::with_capacity(plain);
    put_varint(&mut body, seq_delta);
    put_varint(&mut body, ts_delta);
    put_varint(&mut body, 0);
    put_varint(&mut body, 0);
    if body.len() > plain {
        return None;
    }
    body.resize(plain, 0);
    let mut out = Vec::with_capacity(total);
    seal_body(&mut out, body, key, salt, u64::from(offset) | KIND_ERASED);
    (out.len() == total).then_some(out)
}

/// A secure-erase overwrite for the plain record of `total` bytes: same
/// length, sequence and timestamp, empty subject, no headers, zero payload.
pub fn encode_erased(seq_delta: u64, ts_delta: u64, total: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(total);
    put_varint(&mut body, seq_delta);
    put_varint(&mut body, ts_delta);
    put_varint(&mut body, 0);
    put_varint(&mut body, 0);
    body.resize(total.saturating_sub(PREFIX_LEN), 0);
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Total length of an encrypted record from its length varint.
pub fn peek_len_sealed(buf: &[u8]) -> Result<(usize, usize), DecodeError> {
    let Some((body, n)) = get_varint(buf.get(..MAX_LEN_VARINT).unwrap_or(buf)) else {
        return Err(if buf.len() < MAX_LEN_VARINT {
            DecodeError::Incomplete
        } else {
            DecodeError::Corrupt("record length malformed")
        });
    };
    let body = usize::try_from(body).unwrap_or(usize::MAX);
    if !(MIN_BODY + TAG_LEN..=MAX_BODY).contains(&body) {
        return Err(DecodeError::Corrupt("record length out of range"));
    }
    Ok((n, n + body))
}

/// Decodes the record at the start of `buf`: plain (crc checked) or, with
/// `seal`, authenticated and decrypted in place. `offset` is its offset in
/// the segment file. Never returns a record that fails its check.
pub fn decode_any<'a>(
    buf: &'a mut [u8],
    base_seq: u64,
    base_ts: u64,
    seal: Sealing<'_>,
    offset: u64,
) -> Result<(RecordRef<'a>, usize), DecodeError> {
    let Some((key, salt)) = seal else {
        return decode(buf, base_seq, base_ts);
    };
    let (vlen, total) = peek_len_sealed(buf)?;
    let rec = buf.get_mut(..total).ok_or(DecodeError::Incomplete)?;
    // peek_len_sealed: total >= vlen + MIN_BODY + TAG_LEN.
    let sealed = rec.get_mut(vlen..).unwrap_or_default();
    let (ct, tag) = sealed.split_at_mut(total - vlen - TAG_LEN);
    if !key.open(salt, offset, ct, tag) && !key.open(salt, offset | KIND_ERASED, ct, tag) {
        return Err(DecodeError::Corrupt("record authentication failed"));
    }
    let rec = parse_body(ct, base_seq, base_ts)?;
    Ok((rec, total))
}

/// Total length (prefix + body) of the record starting at `buf[0]`, from
/// its length field alone (no checksum check).
pub fn peek_len(buf: &[u8]) -> Result<usize, DecodeError> {
    let len = buf.get(REC_BODY_LEN).ok_or(DecodeError::Incomplete)?;
    let body = u32::from_le_bytes(arr(len)) as usize;
    if !(MIN_BODY..=MAX_BODY).contains(&body) {
        return Err(DecodeError::Corrupt("record length out of range"));
    }
    Ok(PREFIX_LEN + body)
}

/// Decodes and verifies the record at the start of `buf`; returns it and
/// its total length.
pub fn decode<'a>(
    buf: &'a [u8],
    base_seq: u64,
    base_ts: u64,
) -> Result<(RecordRef<'a>, usize), DecodeError> {
    let total = peek_len(buf)?;
    let rec = buf.get(..total).ok_or(DecodeError::Incomplete)?;
    // peek_len: total >= PREFIX_LEN + MIN_BODY.
    let crc = u32::from_le_bytes(arr(rec.get(REC_CRC).unwrap_or_default()));
    let body = rec.get(PREFIX_LEN..).unwrap_or_default();
    if crc32c::crc32c(body) != crc {
        return Err(DecodeError::Corrupt("record checksum mismatch"));
    }
    Ok((parse_body(body, base_seq, base_ts)?, total))
}

/// The fields of a verified record body.
fn parse_body(body: &[u8], base_seq: u64, base_ts: u64) -> Result<RecordRef<'_>, DecodeError> {
    let bad = DecodeError::Corrupt("record fields malformed");
    let mut pos = 0usize;
    let next = |pos: &mut usize| -> Result<u64, DecodeError> {
        let (v, n) = get_varint(body.get(*pos..).ok_or(bad)?).ok_or(bad)?;
        *pos += n;
        Ok(v)
    };
    let seq_delta = next(&mut pos)?;
    let ts_delta = next(&mut pos)?;
    let subj_len = usize::try_from(next(&mut pos)?).map_err(|_| bad)?;
    let hdr_field = usize::try_from(next(&mut pos)?).map_err(|_| bad)?;
    let subj_end = pos.checked_add(subj_len).ok_or(bad)?;
    let subject = body.get(pos..subj_end).ok_or(bad)?;
    let (headers, hdr_end) = if hdr_field == 0 {
        (None, subj_end)
    } else {
        let end = subj_end.checked_add(hdr_field - 1).ok_or(bad)?;
        (Some(body.get(subj_end..end).ok_or(bad)?), end)
    };
    let payload = body.get(hdr_end..).ok_or(bad)?;
    let seq = base_seq.checked_add(seq_delta).ok_or(bad)?;
    let timestamp = base_ts.checked_add(ts_delta).ok_or(bad)?;
    Ok(RecordRef {
        seq,
        timestamp,
        subject,
        headers,
        payload,
    })
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]

    use super::*;

    fn rec<'a>(seq: u64, ts: u64, s: &'a [u8], h: Option<&'a [u8]>, p: &'a [u8]) -> RecordRef<'a> {
        RecordRef {
            seq,
            timestamp: ts,
            subject: s,
            headers: h,
            payload: p,
        }
    }

    #[test]
    fn round_trip_variants() {
        let big = vec![7u8; 70_000];
        let cases = [
            rec(1, 1_000, b"a", None, b""),
            rec(5, 1_000, b"sensors.truck1.t", None, &[1u8; 100]),
            rec(
                40_000,
                u64::MAX,
                b"x.y",
                Some(b"NATS/1.0\r\nNats-Msg-Id: 1\r\n\r\n"),
                b"p",
            ),
            rec(2, 1_000, b"", Some(b""), &big),
        ];
        for r in &cases {
            let mut out = vec![0xAA]; // records need not start at 0
            encode_into(&mut out, 1, 1_000, r);
            let hl = r.headers.map(|h| h.len());
            let expect = encoded_len(
                r.seq - 1,
                r.timestamp - 1_000,
                r.subject.len(),
                hl,
                r.payload.len(),
            );
            assert_eq!(out.len() - 1, expect);
            let (got, n) = decode(&out[1..], 1, 1_000).unwrap();
            assert_eq!(n, expect);
            assert_eq!(&got, r);
        }
    }

    #[test]
    fn overhead_of_typical_record() {
        // 100-byte payload, 16-byte subject, no headers, 1000th record of
        // a segment, written 10 minutes after the segment started.
        let mut out = Vec::new();
        let ts0 = 1_700_000_000_000_000_000u64;
        let r = rec(
            1000,
            ts0 + 600 * 1_000_000_000,
            b"sensors.truck1.t",
            None,
            &[0u8; 100],
        );
        encode_into(&mut out, 1, ts0, &r);
        let overhead = out.len() - 116;
        assert_eq!(overhead, 4 + 4 + 2 + 6 + 1 + 1);
        assert!(overhead <= 20);
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_bitflip_is_caught() {
        let mut out = Vec::new();
        encode_into(
            &mut out,
            10,
            0,
            &rec(12, 99, b"s.t", Some(b"h"), b"payload"),
        );
        for k in 0..out.len() {
            assert_eq!(
                decode(&out[..k], 10, 0).err(),
                Some(DecodeError::Incomplete)
            );
        }
        for byte in 0..out.len() {
            for bit in 0..8 {
                let mut b = out.clone();
                b[byte] ^= 1 << bit;
                assert!(decode(&b, 10, 0).is_err(), "flip {byte}:{bit} undetected");
            }
        }
    }

    #[test]
    fn header_round_trip_and_corruption() {
        let mut out = Vec::new();
        let h = SegHeader {
            base_seq: 77,
            base_ts: 123,
            seal: None,
        };
        encode_header(h, &mut out);
        assert_eq!(out.len(), SEG_HEADER_LEN);
        assert_eq!(decode_header(&out), Ok(h));
        assert_eq!(decode_header(&out[..10]), Err(DecodeError::Incomplete));
        out[9] ^= 4;
        assert!(matches!(decode_header(&out), Err(DecodeError::Corrupt(_))));
        let sealed = SegHeader {
            seal: Some(SealInfo {
                salt: [9; 16],
                check: [3; 8],
            }),
            ..h
        };
        let mut out = Vec::new();
        encode_header(sealed, &mut out);
        assert_eq!(out.len(), SEALED_HEADER_LEN);
        assert_eq!(sealed.header_len(), SEALED_HEADER_LEN);
        assert_eq!(decode_header(&out), Ok(sealed));
        assert_eq!(decode_header(&out[..40]), Err(DecodeError::Incomplete));
        for byte in 0..out.len() {
            let mut b = out.clone();
            b[byte] ^= 0x10;
            assert!(decode_header(&b).is_err(), "flip in byte {byte}");
        }
    }

    #[test]
    fn sealed_round_trip_truncation_bitflip_and_erase() {
        let key = Key::from_bytes([5; 32], "test");
        let salt = [1u8; 16];
        let seal = Some((&key, &salt));
        let r = rec(12, 99, b"s.t", Some(b"h"), b"payload secret");
        let mut out = vec![0xAA];
        encode_any(&mut out, 10, 0, &r, seal, 300);
        let expect = record_len(true, 2, 99, 3, Some(1), 14);
        assert_eq!(out.len() - 1, expect);
        assert!(!out.windows(6).any(|w| w == b"secret"), "payload in clear");
        let mut b = out[1..].to_vec();
        let (got, n) = decode_any(&mut b, 10, 0, seal, 300).unwrap();
        assert_eq!((got, n), (r.clone(), expect));
        // Wrong offset, salt or key: rejected, never garbage.
        for (k, s, off) in [
            (&key, &salt, 301),
            (&key, &[2u8; 16], 300),
            (&Key::from_bytes([6; 32], "x"), &salt, 300),
        ] {
            let mut b = out[1..].to_vec();
            assert!(decode_any(&mut b, 10, 0, Some((k, s)), off).is_err());
        }
        let enc = out[1..].to_vec();
        for k in 0..enc.len() {
            let mut b = enc[..k].to_vec();
            assert_eq!(
                decode_any(&mut b, 10, 0, seal, 300).err(),
                Some(DecodeError::Incomplete),
                "cut at {k}"
            );
        }
        for byte in 0..enc.len() {
            for bit in 0..8 {
                let mut b = enc.clone();
                b[byte] ^= 1 << bit;
                assert!(
                    decode_any(&mut b, 10, 0, seal, 300).is_err(),
                    "flip {byte}:{bit}"
                );
            }
        }
        let (vlen, total) = peek_len_sealed(&enc).unwrap();
        assert_eq!(total, enc.len());
        let mut erased = encode_erased_sealed(2, 99, (vlen, total), &key, &salt, 300).unwrap();
        assert_eq!(erased.len(), enc.len());
        let (e, n) = decode_any(&mut erased, 10, 0, seal, 300).unwrap();
        assert_eq!(n, enc.len());
        assert_eq!((e.seq, e.timestamp, e.subject), (12, 99, &b""[..]));
        assert!(e.headers.is_none() && e.payload.iter().all(|&b| b == 0));
    }

    #[test]
    fn sealed_overhead_of_typical_record() {
        // As in the plain case, 1000th record 10 minutes into the segment,
        // and the worst case of a full 4 MiB segment (3-byte sequence delta,
        // 7-byte time delta: up to 6.5 days).
        let key = Key::from_bytes([5; 32], "test");
        let ts0 = 1_700_000_000_000_000_000u64;
        for (seq, dt, max) in [
            (1000, 600 * 1_000_000_000u64, 28),
            (30_000, 5 * 86_400 * 1_000_000_000, 30),
        ] {
            let mut out = Vec::new();
            let r = rec(seq, ts0 + dt, b"sensors.truck1.t", None, &[0u8; 100]);
            encode_any(&mut out, 1, ts0, &r, Some((&key, &[0; 16])), 28);
            let overhead = out.len() - 116;
            assert!(overhead <= max, "overhead {overhead}");
        }
    }

    #[test]
    fn varints() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX / 3, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v));
            assert_eq!(get_varint(&b), Some((v, b.len())));
        }
        assert_eq!(get_varint(&[0x80; 11]), None);
        assert_eq!(
            get_varint(&[0xff; 9].iter().chain(&[0x7f]).copied().collect::<Vec<_>>()),
            None
        );
    }
}
