//! MQTT retained messages: the last retained message per topic, durable.
//!
//! Owns `<data_dir>/mqtt/retained.log`, an append-only log of set/clear
//! records replayed into an in-memory map at start, and rewritten
//! (temp file, fsync, rename) when dead records outweigh live ones.
//!
//! Record layout (little endian): `len: u32` (bytes after this field),
//! `crc32c: u32` (of the bytes after it), `qos: u8`, `subject_len: u16`,
//! `subject`, `payload`. An empty payload clears the subject's retained
//! message (MQTT 3.1.1 §3.3.1.3). When bit 0x80 of `qos` is set, the record
//! also carries MQTT 5 metadata between `subject` and `payload`:
//! `stored_ms: u64` (unix milliseconds, for message expiry),
//! `headers_len: u32`, `headers` (the NATS header block, see
//! [`crate::broker::bridge`]). Records without metadata keep the original
//! layout.
//!
//! A retained message whose MQTT 5 message expiry (`Mqtt-Expiry` in its
//! headers, counted from `stored_ms`) has passed is deleted — a clear
//! record is appended — when a subscription would get it
//! ([`Retained::matching`]) and at start; it is never delivered.
//!
//! Invariants:
//! - [`Retained::set`] returns only after the record is fsynced, so a
//!   PUBACK for a retained publish means the retained message survives a
//!   power cut.
//! - A torn or corrupt tail is cut at start (reported); a record is never
//!   half applied.
//! - All methods block on file I/O: call them from a blocking context
//!   (`smol::unblock`), never while holding another lock.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::subject;

/// One retained message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedMsg {
    pub subject: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    /// MQTT 5 metadata as a NATS header block, if any.
    pub headers: Option<Vec<u8>>,
    /// When it was set (unix milliseconds; 0 when unknown).
    pub stored_ms: u64,
}

/// Flag in the stored `qos` byte: MQTT 5 metadata follows the subject.
const EXT: u8 = 0x80;

/// One decoded record.
struct Record {
    subject: String,
    payload: Vec<u8>,
    qos: u8,
    ext: Option<(Vec<u8>, u64)>,
    used: usize,
}

struct State {
    map: BTreeMap<String, (Vec<u8>, u8)>,
    /// MQTT 5 metadata of the retained messages that have some:
    /// (header block, stored unix ms).
    meta: BTreeMap<String, (Vec<u8>, u64)>,
    file: File,
    file_len: u64,
    live_bytes: u64,
}

pub struct Retained {
    path: PathBuf,
    state: Mutex<State>,
}

/// What start-up found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RetainedReport {
    pub messages: usize,
    pub truncated_bytes: u64,
}

const HEADER: usize = 8;

fn record_len(subject: &str, payload: &[u8]) -> u64 {
    (HEADER + 3 + subject.len() + payload.len()) as u64
}

fn ext_len(ext: Option<(&[u8], u64)>) -> usize {
    ext.map_or(0, |(h, _)| 12 + h.len())
}

fn encode(
    subject: &str,
    payload: &[u8],
    qos: u8,
    ext: Option<(&[u8], u64)>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let slen = u16::try_from(subject.len()).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, "topic longer than 65535 bytes")
    })?;
    let body_len = 4 + 3 + subject.len() + ext_len(ext) + payload.len();
    let len = u32::try_from(body_len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "retained message too large"))?;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(if ext.is_some() { qos | EXT } else { qos });
    out.extend_from_slice(&slen.to_le_bytes());
    out.extend_from_slice(subject.as_bytes());
    if let Some((headers, stored_ms)) = ext {
        let hlen = u32::try_from(headers.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "headers too large"))?;
        out.extend_from_slice(&stored_ms.to_le_bytes());
        out.extend_from_slice(&hlen.to_le_bytes());
        out.extend_from_slice(headers);
    }
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decode one record at the front of `b`, or `None` if `b` does not start
/// with a whole valid record.
fn decode(b: &[u8]) -> Option<Record> {
    let len = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?);
    let body = b.get(HEADER..4 + len)?;
    if len < 7 || crc32c::crc32c(body) != crc {
        return None;
    }
    let qos = *body.first()?;
    let slen = u16::from_le_bytes(body.get(1..3)?.try_into().ok()?) as usize;
    let subj = std::str::from_utf8(body.get(3..3 + slen)?)
        .ok()?
        .to_string();
    let mut at = 3 + slen;
    let ext = if qos & EXT != 0 {
        let stored_ms = u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?);
        let hlen = u32::from_le_bytes(body.get(at + 8..at + 12)?.try_into().ok()?) as usize;
        let headers = body.get(at + 12..at.checked_add(12 + hlen)?)?.to_vec();
        at += 12 + hlen;
        Some((headers, stored_ms))
    } else {
        None
    };
    let payload = body.get(at..)?.to_vec();
    Some(Record {
        subject: subj,
        payload,
        qos: qos & !EXT,
        ext,
        used: 4 + len,
    })
}

impl Retained {
    /// Open (or create) the retained store in `dir`.
    pub fn open(dir: &Path) -> io::Result<(Retained, RetainedReport)> {
        fs::create_dir_all(dir)?;
        let path = dir.join("retained.log");
        let mut bytes = Vec::new();
        if let Ok(mut f) = File::open(&path) {
            f.read_to_end(&mut bytes)?;
        }
        let mut map = BTreeMap::new();
        let mut meta = BTreeMap::new();
        let mut at = 0;
        while let Some(r) = bytes.get(at..).and_then(decode) {
            meta.remove(&r.subject);
            if r.payload.is_empty() {
                map.remove(&r.subject);
            } else {
                if let Some(ext) = r.ext {
                    meta.insert(r.subject.clone(), ext);
                }
                map.insert(r.subject, (r.payload, r.qos));
            }
            at += r.used;
        }
        let truncated = (bytes.len() - at) as u64;
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if truncated > 0 {
            file.set_len(at as u64)?;
            file.sync_data()?;
        }
        let live_bytes = map.iter().map(|(s, (p, _))| record_len(s, p)).sum::<u64>()
            + meta.values().map(|(h, _)| 12 + h.len() as u64).sum::<u64>();
        let retained = Retained {
            path,
            state: Mutex::new(State {
                map,
                meta,
                file,
                file_len: at as u64,
                live_bytes,
            }),
        };
        retained.remove_expired(unix_ms());
        let report = RetainedReport {
            messages: retained.len(),
            truncated_bytes: truncated,
        };
        Ok((retained, report))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Set (or, with an empty payload, clear) the retained message of
    /// `subject`; durable when it returns.
    pub fn set(&self, subject: &str, payload: &[u8], qos: u8) -> io::Result<()> {
        self.set_with(subject, payload, qos, None, 0)
    }

    /// [`Retained::set`] with MQTT 5 metadata (a NATS header block) and
    /// the time it is set (unix milliseconds).
    pub fn set_with(
        &self,
        subject: &str,
        payload: &[u8],
        qos: u8,
        headers: Option<&[u8]>,
        stored_ms: u64,
    ) -> io::Result<()> {
        let mut st = self.lock();
        self.set_in(&mut st, subject, payload, qos, headers, stored_ms)
    }

    /// [`Retained::set_with`] with the state locked.
    fn set_in(
        &self,
        st: &mut State,
        subject: &str,
        payload: &[u8],
        qos: u8,
        headers: Option<&[u8]>,
        stored_ms: u64,
    ) -> io::Result<()> {
        if payload.is_empty() && !st.map.contains_key(subject) {
            return Ok(());
        }
        let ext = headers
            .filter(|_| !payload.is_empty())
            .map(|h| (h, stored_ms));
        let mut rec = Vec::with_capacity(record_len(subject, payload) as usize + ext_len(ext));
        encode(subject, payload, qos, ext, &mut rec)?;
        if let Err(e) = st.file.write_all(&rec).and_then(|()| st.file.sync_data()) {
            // Cut back whatever part of the record reached the file.
            let len = st.file_len;
            let _ = st.file.set_len(len);
            return Err(e);
        }
        st.file_len += rec.len() as u64;
        let old = if payload.is_empty() {
            st.map.remove(subject)
        } else {
            st.map.insert(subject.to_string(), (payload.to_vec(), qos))
        };
        if let Some((p, _)) = old {
            st.live_bytes -= record_len(subject, &p);
        }
        if let Some((h, _)) = st.meta.remove(subject) {
            st.live_bytes -= 12 + h.len() as u64;
        }
        if !payload.is_empty() {
            st.live_bytes += record_len(subject, payload) + ext_len(ext) as u64;
            if let Some((h, at)) = ext {
                st.meta.insert(subject.to_string(), (h.to_vec(), at));
            }
        }
        if st.file_len > 2 * st.live_bytes + 64 * 1024 {
            if let Err(e) = self.compact(st) {
                log::warn!(
                    "retained: compaction of {} failed: {e}",
                    self.path.display()
                );
            }
        }
        Ok(())
    }

    /// Rewrite the log with only live records.
    fn compact(&self, st: &mut State) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut buf = Vec::with_capacity(st.live_bytes as usize);
        for (s, (p, q)) in &st.map {
            let ext = st.meta.get(s).map(|(h, at)| (h.as_slice(), *at));
            encode(s, p, *q, ext, &mut buf)?;
        }
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        st.file = OpenOptions::new().append(true).open(&self.path)?;
        st.file_len = buf.len() as u64;
        Ok(())
    }

    /// Retained messages whose subject matches the NATS `filter`; expired
    /// ones among them are deleted instead.
    pub fn matching(&self, filter: &str) -> Vec<RetainedMsg> {
        self.matching_at(filter, unix_ms())
    }

    /// [`Retained::matching`] at `now_ms` (unix milliseconds).
    pub fn matching_at(&self, filter: &str, now_ms: u64) -> Vec<RetainedMsg> {
        let mut st = self.lock();
        let mut expired = Vec::new();
        let found = st
            .map
            .iter()
            .filter(|(s, _)| subject::matches(filter, s))
            .filter_map(|(s, (p, q))| {
                let meta = st.meta.get(s);
                if meta.is_some_and(|(h, at)| is_expired(h, *at, now_ms)) {
                    expired.push(s.clone());
                    return None;
                }
                Some(RetainedMsg {
                    subject: s.clone(),
                    payload: p.clone(),
                    qos: *q,
                    headers: meta.map(|(h, _)| h.clone()),
                    stored_ms: meta.map_or(0, |(_, at)| *at),
                })
            })
            .collect();
        self.delete(&mut st, &expired);
        found
    }

    /// Delete every expired retained message; returns how many.
    pub fn remove_expired(&self, now_ms: u64) -> usize {
        let mut st = self.lock();
        let expired: Vec<String> = st
            .meta
            .iter()
            .filter(|(_, (h, at))| is_expired(h, *at, now_ms))
            .map(|(s, _)| s.clone())
            .collect();
        self.delete(&mut st, &expired);
        expired.len()
    }

    fn delete(&self, st: &mut State, subjects: &[String]) {
        for s in subjects {
            if let Err(e) = self.set_in(st, s, &[], 0, None, 0) {
                log::warn!("retained: cannot delete the expired message of {s}: {e}; it is not delivered, and deleted later");
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a retained message with header block `headers`, set at
/// `stored_ms`, has passed its MQTT 5 message expiry at `now_ms`.
fn is_expired(headers: &[u8], stored_ms: u64, now_ms: u64) -> bool {
    if stored_ms == 0 {
        return false;
    }
    match crate::broker::bridge::headers_to_meta(Some(headers), None).expiry {
        Some(secs) => now_ms >= stored_ms.saturating_add(u64::from(secs).saturating_mul(1000)),
        None => false,
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (r, rep) = Retained::open(dir.path()).unwrap();
        assert_eq!(rep, RetainedReport::default());
        r.set("a.b", b"one", 1).unwrap();
        r.set("a.c", b"two", 0).unwrap();
        r.set("a.b", b"three", 1).unwrap();
        r.set("a.c", b"", 0).unwrap();
        let got = r.matching("a.>");
        assert_eq!(
            got,
            vec![RetainedMsg {
                subject: "a.b".into(),
                payload: b"three".to_vec(),
                qos: 1,
                headers: None,
                stored_ms: 0,
            }]
        );
        drop(r);
        let (r, rep) = Retained::open(dir.path()).unwrap();
        assert_eq!(rep.messages, 1);
        assert_eq!(r.matching(">").len(), 1);
    }

    #[test]
    fn torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Retained::open(dir.path()).unwrap();
        r.set("x", b"keep", 1).unwrap();
        r.set("y", b"torn", 1).unwrap();
        drop(r);
        let path = dir.path().join("retained.log");
        let len = fs::metadata(&path).unwrap().len();
        for cut in 1..record_len("y", b"torn") {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(len - cut).unwrap();
            drop(f);
            let (r, rep) = Retained::open(dir.path()).unwrap();
            assert_eq!(rep.messages, 1, "cut {cut}");
            assert_eq!(rep.truncated_bytes, record_len("y", b"torn") - cut);
            assert_eq!(r.matching("x")[0].payload, b"keep");
            drop(r);
            // restore the full record for the next cut
            let (r, _) = Retained::open(dir.path()).unwrap();
            r.set("y", b"torn", 1).unwrap();
        }
    }

    #[test]
    fn compaction_keeps_live_records() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Retained::open(dir.path()).unwrap();
        let big = vec![7u8; 4096];
        for i in 0..100 {
            r.set("hot", &big, 1).unwrap();
            r.set(&format!("k.{}", i % 3), b"v", 0).unwrap();
        }
        let len = fs::metadata(dir.path().join("retained.log")).unwrap().len();
        assert!(len < 200 * 1024, "log was not compacted: {len} bytes");
        drop(r);
        let (r, rep) = Retained::open(dir.path()).unwrap();
        assert_eq!(rep.messages, 4);
        assert_eq!(r.matching("hot")[0].payload, big);
    }

    #[test]
    fn mqtt5_metadata_survives_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Retained::open(dir.path()).unwrap();
        let h = b"NATS/1.0\r\nk: v\r\n\r\n";
        r.set_with("m", b"with", 1, Some(h), 1234).unwrap();
        r.set("plain", b"p", 0).unwrap();
        drop(r);
        let (r, rep) = Retained::open(dir.path()).unwrap();
        assert_eq!(
            rep,
            RetainedReport {
                messages: 2,
                truncated_bytes: 0
            }
        );
        let m = &r.matching("m")[0];
        assert_eq!(
            (m.headers.as_deref(), m.stored_ms, m.qos),
            (Some(&h[..]), 1234, 1)
        );
        assert_eq!(m.payload, b"with");
        assert_eq!(r.matching("plain")[0].headers, None);
        // Replaced without metadata: the old metadata is gone.
        for _ in 0..40 {
            r.set_with("m", &[1u8; 4096], 1, Some(h), 99).unwrap();
        }
        r.set("m", b"bare", 0).unwrap();
        assert_eq!(r.matching("m")[0].headers, None);
        r.set_with("m", b"again", 1, Some(h), 5).unwrap();
        drop(r);
        let (r, _) = Retained::open(dir.path()).unwrap();
        let m = &r.matching("m")[0];
        assert_eq!((m.payload.as_slice(), m.stored_ms), (&b"again"[..], 5));
    }

    #[test]
    fn expired_messages_are_deleted_not_just_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Retained::open(dir.path()).unwrap();
        let h = crate::broker::bridge::props_to_headers(&crate::wire::mqtt::Properties {
            message_expiry_interval: Some(10),
            ..Default::default()
        })
        .unwrap();
        r.set_with("e.one", b"1", 1, Some(&h), 1_000).unwrap();
        r.set_with("e.two", b"2", 1, Some(&h), 5_000).unwrap();
        r.set_with("e.keep", b"k", 1, None, 1_000).unwrap();
        // At 11 s the first expired (set at 1 s, 10 s life); the second not.
        let got: Vec<String> = r
            .matching_at("e.*", 11_000)
            .into_iter()
            .map(|m| m.subject)
            .collect();
        assert_eq!(got, vec!["e.keep".to_string(), "e.two".to_string()]);
        assert_eq!(r.len(), 2, "deleted, not only skipped");
        assert_eq!(r.remove_expired(14_999), 0);
        assert_eq!(r.remove_expired(15_000), 1);
        r.set_with("e.late", b"l", 1, Some(&h), 1_000).unwrap();
        drop(r);
        // Reopening (now is long after 11 s) deletes it durably.
        let (r, rep) = Retained::open(dir.path()).unwrap();
        assert_eq!(rep.messages, 1);
        drop(r);
        let (r, rep) = Retained::open(dir.path()).unwrap();
        assert_eq!((rep.messages, r.matching(">").len()), (1, 1));
    }
}
