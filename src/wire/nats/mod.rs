//! The NATS client protocol, as pure functions over byte slices.
//!
//! Owns: parsing what a NATS server sends to a client and emitting what a
//! client sends ([`client`]), the `NATS/1.0` header block ([`headers`]) and a
//! small standard base64 decoder ([`base64`]) for the JetStream API's
//! `hdrs`/`data` fields; and the server side ([`server`]): parsing what a
//! client sends and emitting what a server sends. Both sides share the
//! control-line helpers below.
//!
//! Invariants:
//! - Nothing here does I/O, reads a clock or panics on any input. Parsers
//!   return `Ok(None)` for "need more bytes", `Err(Malformed)` with a reason
//!   for input that can never become valid, or a complete frame and the
//!   number of bytes it used.
//! - Every parse is bounded: a control line longer than
//!   [`MAX_CONTROL_LINE`] or a payload larger than the caller's limit is
//!   rejected before it is buffered in full.
//! - Emitters refuse subjects that would break the line framing (empty, or
//!   containing whitespace or control characters).

// Codecs never panic on input (`unsafe` is forbidden crate-wide).
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

pub mod base64;
pub mod client;
pub mod headers;
pub mod server;

use std::fmt;

/// Longest accepted control line (`MSG ...`, `INFO {...}`), CRLF excluded.
pub const MAX_CONTROL_LINE: usize = 64 * 1024;

/// Input that can never become a valid frame; the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed NATS protocol data: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// A subject, reply subject or queue group the caller asked us to emit is not
/// sendable on a NATS control line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError(pub String);

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EncodeError {}

/// Find the first `\r\n` in `buf`, bounded by [`MAX_CONTROL_LINE`].
/// `Ok(None)`: not yet complete. `Ok(Some(i))`: the line is `buf[..i]`.
pub(crate) fn find_line(buf: &[u8]) -> Result<Option<usize>, Malformed> {
    find_line_max(buf, MAX_CONTROL_LINE)
}

/// [`find_line`] with a caller-chosen limit.
pub(crate) fn find_line_max(buf: &[u8], max: usize) -> Result<Option<usize>, Malformed> {
    let limit = buf.len().min(max.saturating_add(2));
    let window = buf.get(..limit).unwrap_or(buf);
    // Scan for LF (one byte compare per byte) and check the CR before it.
    let mut from = 0;
    let crlf = loop {
        let Some(lf) = window
            .get(from..)
            .and_then(|w| w.iter().position(|b| *b == b'\n'))
        else {
            break None;
        };
        let lf = from + lf;
        if lf > 0 && window.get(lf - 1) == Some(&b'\r') {
            break Some(lf - 1);
        }
        from = lf + 1;
    };
    match crlf {
        Some(i) if i <= max => Ok(Some(i)),
        Some(_) => Err(Malformed(format!("control line longer than {max} bytes"))),
        None if buf.len() > max.saturating_add(1) => {
            Err(Malformed(format!("control line longer than {max} bytes")))
        }
        None => Ok(None),
    }
}

/// Parse a decimal size field.
pub(crate) fn parse_usize(field: &[u8], what: &str) -> Result<usize, Malformed> {
    if field.is_empty() || field.len() > 19 || !field.iter().all(u8::is_ascii_digit) {
        return Err(Malformed(format!(
            "{what} {:?} is not a decimal number",
            String::from_utf8_lossy(field)
        )));
    }
    let mut n: usize = 0;
    for &d in field {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(usize::from(d - b'0')))
            .ok_or_else(|| Malformed(format!("{what} is too large")))?;
    }
    Ok(n)
}

/// Check that a token can be put on a control line.
pub(crate) fn check_token(tok: &str, what: &str) -> Result<(), EncodeError> {
    if tok.is_empty() {
        return Err(EncodeError(format!("{what} is empty")));
    }
    if tok.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(EncodeError(format!(
            "{what} {tok:?} contains whitespace or control characters"
        )));
    }
    Ok(())
}

/// The body of a message-carrying op (MSG/HMSG or PUB/HPUB) whose control
/// line ended at `after_line`, shared by both sides of the codec.
pub(crate) enum Body<'a> {
    /// Fewer than `total + 2` bytes have arrived.
    Incomplete,
    /// The payload is not followed by CRLF.
    NoCrlf,
    /// Header block (when `hdr` was given) and payload, and the offset
    /// just past the trailing CRLF.
    Ready(Option<&'a [u8]>, &'a [u8], usize),
}

/// Split the `total` body bytes after `after_line` into headers (the first
/// `hdr` bytes, if any) and payload.
pub(crate) fn take_body(
    buf: &[u8],
    after_line: usize,
    total: usize,
    hdr: Option<usize>,
) -> Body<'_> {
    let end = after_line + total;
    if buf.len() < end + 2 {
        return Body::Incomplete;
    }
    if buf.get(end..end + 2) != Some(&b"\r\n"[..]) {
        return Body::NoCrlf;
    }
    let body = buf.get(after_line..end).unwrap_or_default();
    match hdr {
        Some(h) => {
            let (hb, pl) = body.split_at(h.min(body.len()));
            Body::Ready(Some(hb), pl, end + 2)
        }
        None => Body::Ready(None, body, end + 2),
    }
}

/// Emit one message-carrying op, the shape PUB, HPUB, MSG and HMSG share:
/// `OP subject [sid] [reply] [hdr_size] size\r\n[headers]payload\r\n`.
/// `sid` is given for MSG/HMSG only; `headers` for HPUB/HMSG only.
pub(crate) fn emit_message(
    op: &str,
    subject: &str,
    sid: Option<&str>,
    reply: Option<&str>,
    headers: Option<&[u8]>,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    check_token(subject, "subject")?;
    if let Some(sid) = sid {
        check_token(sid, "sid")?;
    }
    if let Some(r) = reply {
        check_token(r, "reply subject")?;
    }
    out.extend_from_slice(op.as_bytes());
    for field in [Some(subject), sid, reply].into_iter().flatten() {
        out.push(b' ');
        out.extend_from_slice(field.as_bytes());
    }
    if let Some(h) = headers {
        out.push(b' ');
        push_decimal(h.len(), out);
        out.push(b' ');
        push_decimal(h.len() + payload.len(), out);
    } else {
        out.push(b' ');
        push_decimal(payload.len(), out);
    }
    out.extend_from_slice(b"\r\n");
    if let Some(h) = headers {
        out.extend_from_slice(h);
    }
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// Append `n` in decimal (no formatting machinery: this runs per message).
pub(crate) fn push_decimal(mut n: usize, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        if let Some(d) = digits.get_mut(i) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(i..).unwrap_or_default());
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

    #[test]
    fn decimals() {
        for n in [0usize, 7, 10, 99, 100, 1_048_576, usize::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(n, &mut out);
            assert_eq!(out, format!("x{n}").as_bytes());
        }
    }

    #[test]
    fn line_finding_is_bounded() {
        assert_eq!(find_line(b"PING\r\n"), Ok(Some(4)));
        assert_eq!(find_line(b"PIN"), Ok(None));
        assert_eq!(find_line(b"PING\r"), Ok(None));
        let long = vec![b'a'; MAX_CONTROL_LINE + 2];
        assert!(find_line(&long).is_err());
        let mut ok = vec![b'a'; MAX_CONTROL_LINE];
        ok.extend_from_slice(b"\r\n");
        assert_eq!(find_line(&ok), Ok(Some(MAX_CONTROL_LINE)));
        // A lone LF or CR is not a line end.
        assert_eq!(find_line(b"\nA\rB\r\n"), Ok(Some(4)));
        assert_eq!(find_line(b"A\n\r"), Ok(None));
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_usize(b"0", "n"), Ok(0));
        assert_eq!(parse_usize(b"1048576", "n"), Ok(1_048_576));
        assert!(parse_usize(b"", "n").is_err());
        assert!(parse_usize(b"-1", "n").is_err());
        assert!(parse_usize(b"99999999999999999999", "n").is_err());
    }
}
