//! The NATS header block: `NATS/1.0[ status[ description]]\r\n`, then
//! `Key: Value\r\n` lines, then an empty line.
//!
//! Invariants: [`HeaderBlock::parse`] never panics and accepts exactly one
//! complete block; [`HeaderBlock::encode`] only emits keys and values that
//! parse back to the same thing (it rejects CR/LF in values and `:` or
//! whitespace in keys). Keys keep their case; lookups are case-insensitive
//! like nats-server's.

use super::Malformed;

const VERSION: &str = "NATS/1.0";

/// A parsed (or to-be-built) header block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderBlock {
    /// Inline status, e.g. 503 for "no responders".
    pub status: Option<u16>,
    /// Text after the status code, if any.
    pub description: String,
    pub entries: Vec<(String, String)>,
}

impl HeaderBlock {
    pub fn new() -> HeaderBlock {
        HeaderBlock::default()
    }

    /// First value of `key` (case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// Last value of `key` (case-insensitive): for the headers a server
    /// appends after the stored message's own (`Nats-Sequence`,
    /// `Nats-Time-Stamp`… of a direct get), which a publisher may also
    /// have set.
    pub fn get_last(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rfind(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// Remove every value of `key` (case-insensitive).
    pub fn remove(&mut self, key: &str) {
        self.entries.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
    }

    /// Append a value.
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.entries.push((key.into(), value.into()));
    }

    /// Replace every value of `key` with one.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.remove(key);
        self.push(key, value);
    }

    /// Build the wire form.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(16 + self.entries.len() * 32);
        out.extend_from_slice(VERSION.as_bytes());
        if let Some(code) = self.status {
            if !(100..=999).contains(&code) {
                return Err(format!("header status {code} is not three digits"));
            }
            out.extend_from_slice(format!(" {code}").as_bytes());
            if !self.description.is_empty() {
                if self.description.contains(['\r', '\n']) {
                    return Err("header status description contains CR or LF".into());
                }
                out.push(b' ');
                out.extend_from_slice(self.description.as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
        for (k, v) in &self.entries {
            if k.is_empty() || k.bytes().any(|b| b == b':' || b <= b' ' || b == 0x7f) {
                return Err(format!(
                    "header key {k:?} is empty or contains ':', whitespace or control characters"
                ));
            }
            if v.contains(['\r', '\n']) {
                return Err(format!("header {k} value contains CR or LF"));
            }
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        Ok(out)
    }

    /// Parse one complete header block (exactly the `hdr_size` bytes of an
    /// HMSG/HPUB).
    pub fn parse(block: &[u8]) -> Result<HeaderBlock, Malformed> {
        let bad = |why: &str| Malformed(format!("header block: {why}"));
        let text = std::str::from_utf8(block).map_err(|_| bad("not UTF-8"))?;
        let body = text
            .strip_suffix("\r\n\r\n")
            .ok_or_else(|| bad("does not end with an empty line"))?;
        let mut lines = body.split("\r\n");
        let first = lines.next().unwrap_or("");
        let rest = first
            .strip_prefix(VERSION)
            .ok_or_else(|| bad("does not start with NATS/1.0"))?;
        let mut hb = HeaderBlock::new();
        if !rest.is_empty() {
            let rest = rest
                .strip_prefix([' ', '\t'])
                .ok_or_else(|| bad("junk after NATS/1.0"))?
                .trim_start();
            let (code, desc) = match rest.split_once([' ', '\t']) {
                Some((c, d)) => (c, d.trim()),
                None => (rest, ""),
            };
            if !code.is_empty() {
                if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad("status is not a three-digit code"));
                }
                hb.status = code.parse().ok();
                hb.description = desc.to_string();
            }
        }
        for line in lines {
            if line.contains(['\r', '\n']) {
                return Err(bad("stray CR or LF"));
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| bad("a line has no ':'"))?;
            let k = k.trim();
            if k.is_empty() || k.bytes().any(|b| b <= b' ') {
                return Err(bad("empty or invalid key"));
            }
            hb.entries.push((k.to_string(), v.trim().to_string()));
        }
        Ok(hb)
    }
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
    fn build_and_parse() {
        let mut hb = HeaderBlock::new();
        hb.push("Nats-Msg-Id", "truck-042:TELEMETRY:17");
        hb.push("Foo", "bar baz");
        let wire = hb.encode().unwrap();
        assert_eq!(
            wire,
            b"NATS/1.0\r\nNats-Msg-Id: truck-042:TELEMETRY:17\r\nFoo: bar baz\r\n\r\n"
        );
        let back = HeaderBlock::parse(&wire).unwrap();
        assert_eq!(back, hb);
        assert_eq!(back.get("nats-msg-id"), Some("truck-042:TELEMETRY:17"));
    }

    #[test]
    fn status_lines() {
        let hb = HeaderBlock::parse(b"NATS/1.0 503\r\n\r\n").unwrap();
        assert_eq!(hb.status, Some(503));
        assert!(hb.entries.is_empty());
        let hb =
            HeaderBlock::parse(b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\n\r\n")
                .unwrap();
        assert_eq!(hb.status, Some(408));
        assert_eq!(hb.description, "Request Timeout");
        assert_eq!(hb.get("Nats-Pending-Messages"), Some("1"));
        // What nats-server 2.12 sends for "no responders".
        let hb = HeaderBlock::parse(b"NATS/1.0 503\r\nNats-Subject: nosuch.x\r\n\r\n").unwrap();
        assert_eq!(hb.status, Some(503));
        let mut s = HeaderBlock::new();
        s.status = Some(503);
        s.description = "No Responders".into();
        assert_eq!(HeaderBlock::parse(&s.encode().unwrap()).unwrap(), s);
    }

    #[test]
    fn set_replaces() {
        let mut hb = HeaderBlock::parse(b"NATS/1.0\r\nnats-msg-id: x\r\nA: 1\r\n\r\n").unwrap();
        hb.set("Nats-Msg-Id", "y");
        assert_eq!(
            hb.entries,
            vec![("A".into(), "1".into()), ("Nats-Msg-Id".into(), "y".into())]
        );
    }

    #[test]
    fn malformed() {
        for bad in [
            &b""[..],
            b"NATS/1.0\r\n",
            b"HTTP/1.0\r\n\r\n",
            b"NATS/1.0 5x3\r\n\r\n",
            b"NATS/1.0\r\nnocolon\r\n\r\n",
            b"NATS/1.0\r\n: v\r\n\r\n",
            b"NATS/1.0\r\nA: \xff\r\n\r\n",
            b"NATS/1.0x\r\n\r\n",
        ] {
            assert!(
                HeaderBlock::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut hb = HeaderBlock::new();
        hb.push("A", "x\r\ny");
        assert!(hb.encode().is_err());
        let mut hb = HeaderBlock::new();
        hb.push("A:B", "x");
        assert!(hb.encode().is_err());
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(3);
        let alphabet = b"NATS/1.0 503\r\n:abc";
        for _ in 0..5000 {
            let v: Vec<u8> = (0..rng.usize(0..40))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let _ = HeaderBlock::parse(&v);
        }
    }
}
