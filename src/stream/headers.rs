//! JetStream publish headers the store acts on: parsing only, no state,
//! no I/O. Never panics on any input.
//!
//! Names (matched case-insensitively, first occurrence wins):
//! `Nats-Msg-Id`, `Nats-Expected-Stream`, `Nats-Expected-Last-Sequence`,
//! `Nats-Expected-Last-Subject-Sequence`, `Nats-Expected-Last-Msg-Id`,
//! `Nats-Rollup` (`sub` | `all`), `Nats-TTL` (seconds, a duration such as
//! `90s`/`1h30m`/`500ms`, or `never`).

use std::time::Duration;

pub const MSG_ID: &str = "Nats-Msg-Id";
pub const EXPECTED_STREAM: &str = "Nats-Expected-Stream";
pub const EXPECTED_LAST_SEQ: &str = "Nats-Expected-Last-Sequence";
pub const EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";
pub const EXPECTED_LAST_MSG_ID: &str = "Nats-Expected-Last-Msg-Id";
pub const ROLLUP: &str = "Nats-Rollup";
pub const TTL: &str = "Nats-TTL";

/// The value of header `name` in a raw NATS header block
/// (`NATS/1.0\r\nKey: value\r\n...\r\n\r\n`), trimmed; `None` if absent or
/// empty.
/// Whether `block` may hold a JetStream header (`Nats-…`, any case): a
/// cheap test that lets a message with only other headers (MQTT metadata,
/// user properties) skip every [`header`] lookup.
pub fn has_nats(block: &[u8]) -> bool {
    // Looks at the few `-` first (hot: every stored message).
    (4..block.len()).any(|i| block[i] == b'-' && block[i - 4..i].eq_ignore_ascii_case(b"nats"))
}

pub fn header<'a>(block: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(block).ok()?;
    text.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        let v = v.trim();
        (k.trim().eq_ignore_ascii_case(name) && !v.is_empty()).then_some(v)
    })
}

/// `Nats-Rollup` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollup {
    /// Keep only this message among those with its subject.
    Subject,
    /// Keep only this message in the stream.
    All,
}

pub fn parse_rollup(v: &str) -> Result<Rollup, String> {
    match v {
        _ if v.eq_ignore_ascii_case("sub") => Ok(Rollup::Subject),
        _ if v.eq_ignore_ascii_case("all") => Ok(Rollup::All),
        _ => Err(format!(
            "Nats-Rollup: {v:?} is not a rollup; use \"sub\" or \"all\""
        )),
    }
}

/// A parsed `Nats-TTL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    After(Duration),
    Never,
}

/// Parses `Nats-TTL`: whole seconds (`"60"`), a duration (`"1h2m3s"`,
/// `"500ms"`; units ns, us, ms, s, m, h) or `"never"`. At least 1 s.
pub fn parse_ttl(v: &str) -> Result<Ttl, String> {
    if v.eq_ignore_ascii_case("never") {
        return Ok(Ttl::Never);
    }
    let bad = || {
        format!("Nats-TTL: {v:?} is not a TTL; use seconds (\"60\"), a duration (\"1h30m\") or \"never\"")
    };
    let d = if v.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(v.parse().map_err(|_| bad())?)
    } else {
        parse_duration(v).ok_or_else(bad)?
    };
    if d < Duration::from_secs(1) {
        return Err(format!("Nats-TTL: {v:?} is shorter than the minimum of 1s"));
    }
    Ok(Ttl::After(d))
}

fn parse_duration(s: &str) -> Option<Duration> {
    let mut total: u128 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        let num: u128 = rest.get(..n)?.parse().ok()?;
        rest = rest.get(n..)?;
        let u = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = rest.get(..u)?;
        rest = rest.get(u..)?;
        let ns: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        total = total.checked_add(num.checked_mul(ns)?)?;
    }
    Some(Duration::from_nanos(u64::try_from(total).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_nats_tells_jetstream_headers_apart() {
        assert!(!has_nats(b"NATS/1.0\r\nMqtt-QoS: 0\r\n\r\n"));
        assert!(!has_nats(b"NATS/1.0\r\n\r\n"));
        assert!(has_nats(b"NATS/1.0\r\nnats-msg-id: a\r\n\r\n"));
        assert!(has_nats(b"NATS/1.0\r\nK: v\r\nNats-TTL: 5s\r\n\r\n"));
        assert!(has_nats(b"nats-"));
        assert!(has_nats(b"NATS/1.0\r\nX-NATS-Y: 1\r\n\r\n"));
        assert!(!has_nats(b"nats"));
        assert!(!has_nats(b"-nats"));
        assert!(!has_nats(b""));
    }

    #[test]
    fn finds_headers_case_insensitively() {
        let h = b"NATS/1.0\r\nnats-msg-id:  abc \r\nNats-TTL: 5s\r\nX:\r\n\r\n";
        assert_eq!(header(h, MSG_ID), Some("abc"));
        assert_eq!(header(h, TTL), Some("5s"));
        assert_eq!(header(h, "X"), None);
        assert_eq!(header(h, ROLLUP), None);
        assert_eq!(header(&[0xff, 0xfe], MSG_ID), None);
    }

    #[test]
    fn ttl_forms() {
        assert_eq!(parse_ttl("60"), Ok(Ttl::After(Duration::from_secs(60))));
        assert_eq!(
            parse_ttl("1h30m"),
            Ok(Ttl::After(Duration::from_secs(5400)))
        );
        assert_eq!(
            parse_ttl("1500ms"),
            Ok(Ttl::After(Duration::from_millis(1500)))
        );
        assert_eq!(parse_ttl("never"), Ok(Ttl::Never));
        for bad in ["", "0", "500ms", "1x", "s", "-1", "99999999999999999999999"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_rollup("SUB"), Ok(Rollup::Subject));
        assert!(parse_rollup("some").is_err());
    }
}
