//! The on-disk record and segment-header codec: pure functions over byte
//! slices, no I/O. See `docs/store-format.md` for the layout.
//!
//! Invariants: [`decode`] never panics on any input and never returns a
//! record whose checksum does not match; [`encode_into`] output always
//! decodes back to the same fields (round-trip tests below).

/// Bytes before the checksummed body: u32 body length + u32 crc32c.
pub const PREFIX_LEN: usize = 8;
/// The smallest possible body: four one-byte varints.
pub const MIN_BODY: usize = 4;
/// Sanity cap on a body length read from disk (1 GiB).
pub const MAX_BODY: usize = 1 << 30;

/// Segment file header length.
pub const SEG_HEADER_LEN: usize = 28;
/// Magic and format version at the start of every segment file.
pub const SEG_MAGIC: &[u8; 8] = b"FRNDSEG1";

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

/// Segment header: base sequence and base timestamp of the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegHeader {
    pub base_seq: u64,
    pub base_ts: u64,
}

pub fn encode_header(h: SegHeader, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(SEG_MAGIC);
    out.extend_from_slice(&h.base_seq.to_le_bytes());
    out.extend_from_slice(&h.base_ts.to_le_bytes());
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

pub fn decode_header(buf: &[u8]) -> Result<SegHeader, DecodeError> {
    let h = buf.get(..SEG_HEADER_LEN).ok_or(DecodeError::Incomplete)?;
    let (body, crc) = h.split_at(SEG_HEADER_LEN - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(arr4(crc)) {
        return Err(DecodeError::Corrupt("segment header checksum mismatch"));
    }
    if &body[..8] != SEG_MAGIC {
        return Err(DecodeError::Corrupt("segment header magic/version unknown"));
    }
    Ok(SegHeader {
        base_seq: u64::from_le_bytes(arr8(&body[8..16])),
        base_ts: u64::from_le_bytes(arr8(&body[16..24])),
    })
}

fn arr4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

fn arr8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
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
    let crc = crc32c::crc32c(&out[start + PREFIX_LEN..]);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Total length (prefix + body) of the record starting at `buf[0]`, from
/// its length field alone (no checksum check).
pub fn peek_len(buf: &[u8]) -> Result<usize, DecodeError> {
    let len = buf.get(..4).ok_or(DecodeError::Incomplete)?;
    let body = u32::from_le_bytes(arr4(len)) as usize;
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
    let crc = u32::from_le_bytes(arr4(&rec[4..8]));
    let body = &rec[PREFIX_LEN..];
    if crc32c::crc32c(body) != crc {
        return Err(DecodeError::Corrupt("record checksum mismatch"));
    }
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
    Ok((
        RecordRef {
            seq,
            timestamp,
            subject,
            headers,
            payload,
        },
        total,
    ))
}

#[cfg(test)]
mod tests {
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
        };
        encode_header(h, &mut out);
        assert_eq!(out.len(), SEG_HEADER_LEN);
        assert_eq!(decode_header(&out), Ok(h));
        assert_eq!(decode_header(&out[..10]), Err(DecodeError::Incomplete));
        out[9] ^= 4;
        assert!(matches!(decode_header(&out), Err(DecodeError::Corrupt(_))));
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
