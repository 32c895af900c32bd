//! Primitive field readers and writers shared by the packet codecs.
//!
//! [`Reader`] walks a slice that is already known to hold a whole packet
//! body, so running out of bytes is always "malformed", never "need more".
//! [`Sink`] is implemented by `Vec<u8>` (writes) and [`Counter`] (measures),
//! so every packet is encoded by one function run twice: once to learn the
//! lengths that prefix it, once to write. No reader or writer here panics.

use super::{DecodeError, EncodeError};

/// The largest value a Variable Byte Integer can carry (four bytes).
pub const MAX_VARINT: u32 = 268_435_455;

const TRUNCATED: DecodeError = DecodeError::Malformed("a field runs past the end of the packet");

/// A cursor over a complete packet body.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Everything not yet read.
    pub(super) fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.buf)
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let (head, tail) = self.buf.split_at_checked(n).ok_or(TRUNCATED)?;
        self.buf = tail;
        Ok(head)
    }

    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, tail) = self.buf.split_first().ok_or(TRUNCATED)?;
        self.buf = tail;
        Ok(b)
    }

    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        let arr: [u8; 2] = b.try_into().map_err(|_| TRUNCATED)?;
        Ok(u16::from_be_bytes(arr))
    }

    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        let arr: [u8; 4] = b.try_into().map_err(|_| TRUNCATED)?;
        Ok(u32::from_be_bytes(arr))
    }

    /// A Variable Byte Integer: at most four bytes, minimal encoding.
    pub(super) fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4u32 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(DecodeError::Malformed(
                        "variable byte integer not minimally encoded",
                    ));
                }
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    }

    /// Two-byte length then bytes.
    pub(super) fn bin_slice(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    pub(super) fn bin(&mut self) -> Result<Vec<u8>, DecodeError> {
        Ok(self.bin_slice()?.to_vec())
    }

    /// A UTF-8 Encoded String: valid UTF-8 (so no surrogates) without U+0000.
    pub(super) fn str_slice(&mut self) -> Result<&'a str, DecodeError> {
        let b = self.bin_slice()?;
        let s = core::str::from_utf8(b)
            .map_err(|_| DecodeError::Malformed("string is not valid UTF-8"))?;
        if b.contains(&0) {
            return Err(DecodeError::Malformed("string contains U+0000"));
        }
        Ok(s)
    }

    pub(super) fn str(&mut self) -> Result<String, DecodeError> {
        Ok(self.str_slice()?.to_owned())
    }
}

/// Where encoded bytes go: a buffer, or a byte counter.
pub(super) trait Sink {
    fn put(&mut self, bytes: &[u8]);
    fn put_u8(&mut self, b: u8);

    fn put_u16(&mut self, v: u16) {
        self.put(&v.to_be_bytes());
    }

    fn put_u32(&mut self, v: u32) {
        self.put(&v.to_be_bytes());
    }

    fn put_varint(&mut self, v: u32) -> Result<(), EncodeError> {
        if v > MAX_VARINT {
            return Err(EncodeError::TooLarge {
                size: v as usize,
                max: MAX_VARINT as usize,
            });
        }
        let mut v = v;
        loop {
            // Truncation intended: the low seven bits.
            let mut b = (v & 0x7F) as u8;
            v >>= 7;
            if v > 0 {
                b |= 0x80;
            }
            self.put_u8(b);
            if v == 0 {
                return Ok(());
            }
        }
    }

    /// A varint carrying a length measured in this process.
    fn put_len(&mut self, len: usize) -> Result<(), EncodeError> {
        let v = u32::try_from(len).map_err(|_| EncodeError::TooLarge {
            size: len,
            max: MAX_VARINT as usize,
        })?;
        self.put_varint(v)
    }

    fn put_bin(&mut self, b: &[u8], field: &'static str) -> Result<(), EncodeError> {
        let n = u16::try_from(b.len()).map_err(|_| EncodeError::TooLong(field))?;
        self.put_u16(n);
        self.put(b);
        Ok(())
    }

    fn put_str(&mut self, s: &str, field: &'static str) -> Result<(), EncodeError> {
        if s.as_bytes().contains(&0) {
            return Err(EncodeError::Invalid("string contains U+0000"));
        }
        self.put_bin(s.as_bytes(), field)
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
    fn put_u8(&mut self, b: u8) {
        self.push(b);
    }
}

/// Counts bytes instead of writing them.
#[derive(Default)]
pub(super) struct Counter(pub(super) usize);

impl Sink for Counter {
    fn put(&mut self, bytes: &[u8]) {
        self.0 = self.0.saturating_add(bytes.len());
    }
    fn put_u8(&mut self, _b: u8) {
        self.0 = self.0.saturating_add(1);
    }
}

/// How many bytes the Variable Byte Integer for `v` takes.
pub(super) fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends a QoS 0 PUBLISH without properties (3.1.1, or 5.0 with an
/// empty property block) to `out`: the frame frond sends most, written in
/// one pass from borrowed parts, with the checks [`super::encode`] makes
/// (a valid topic name without U+0000, sizes within the limits). The bytes
/// equal [`super::encode`]'s for the same [`super::Publish`]. On error
/// nothing is appended. Never panics.
pub fn encode_plain_publish(
    out: &mut Vec<u8>,
    version: super::Version,
    retain: bool,
    topic: &str,
    payload: &[u8],
) -> Result<(), EncodeError> {
    if !super::valid_topic_name(topic) {
        return Err(EncodeError::Invalid("wildcard in PUBLISH topic name"));
    }
    let props = usize::from(version == super::Version::V5);
    let len = 2 + topic.len() + props + payload.len();
    if len > super::MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge {
            size: len,
            max: super::MAX_REMAINING_LENGTH,
        });
    }
    let start = out.len();
    out.reserve(1 + varint_len(len) + len);
    out.push((super::PUBLISH << 4) | u8::from(retain));
    let written = out.put_len(len).and_then(|()| {
        out.put_str(topic, "topic name")?;
        if props == 1 {
            out.push(0);
        }
        out.extend_from_slice(payload);
        Ok(())
    });
    if written.is_err() {
        out.truncate(start);
    }
    written
}
