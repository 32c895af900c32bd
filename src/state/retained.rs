//! MQTT retained messages: the last retained message per topic, durable,
//! bounded, and read from disk when a subscription needs them.
//!
//! Owns `<data_dir>/mqtt/retained.log`, an append-only log of set/clear
//! records, and an in-memory index built from it at start: per subject the
//! record's offset and length, QoS, set time and expiry time, never the
//! payload or properties. Payloads are read back from the file in bounded
//! batches ([`Retained::next_batch`] of a [`RetainedScan`]) when a new
//! subscription gets its retained messages, so memory does not grow with
//! the retained messages' size. The log is rewritten (`retained.tmp`,
//! fsync, [`Backend::rename`]; live records copied in 64 KiB pieces) when
//! dead records outweigh live ones, so the file holds at most about twice
//! the live bytes. All file access goes through a [`Backend`], so the
//! crash-injection tests drive this log as they drive the streams.
//!
//! Record layout (little endian): `len: u32` (bytes after this field),
//! `crc32c: u32` (of the bytes after it), `qos: u8`, `subject_len: u16`,
//! `subject`, `payload`. An empty payload clears the subject's retained
//! message (MQTT 3.1.1 §3.3.1.3). When bit 0x80 of `qos` is set, the record
//! also carries MQTT 5 metadata between `subject` and `payload`:
//! `stored_ms: u64` (unix milliseconds, for message expiry),
//! `headers_len: u32`, `headers` (the NATS header block, see
//! [`crate::broker::bridge`]). Records without metadata keep the original
//! layout. This hand-made layout is kept (not postcard, unlike the other
//! state records): it is already compact, and start-up reads each
//! record's fields at fixed places without loading its payload.
//!
//! Limits ([`RetainedLimits`]: `mqtt.max_retained` messages and
//! `mqtt.max_retained_bytes` of live records, counted as whole records):
//! a set that would go over either (a new subject past the count, or more
//! bytes) fails with [`io::ErrorKind::QuotaExceeded`] after expired
//! messages were deleted to make room; replacing a message with one no
//! larger, and clearing, always work. Refusals are logged at most every
//! 10 s with their count. What a refusal means for the publisher is the
//! MQTT shell's choice ([`crate::server::mqtt`]). A store opened over its
//! limits (they were lowered) keeps what it holds and refuses growth.
//!
//! A retained message whose MQTT 5 message expiry (`Mqtt-Expiry` in its
//! headers, counted from `stored_ms`) has passed is deleted — a clear
//! record is appended — when a subscription would get it and at start; it
//! is never delivered.
//!
//! Invariants:
//! - [`Retained::set`] returns only after the record is fsynced, so a
//!   PUBACK for a retained publish means the retained message survives a
//!   power cut.
//! - A torn or corrupt tail is cut at start (reported); a record is never
//!   half applied. Start-up reads the log sequentially with a fixed
//!   buffer: its memory does not depend on the file's size.
//! - Every index entry points at a whole record of the current file whose
//!   checksum was verified when it was indexed; a record that fails its
//!   checksum when read back (disk corruption) is skipped with a warning.
//! - All methods block on file I/O: call them from a blocking context
//!   (`smol::unblock`), never while holding another lock.
//! - Time is the [`RetainedEnv`] clock given at open (the caller's), and a
//!   header block's message expiry is read by its parser: this module
//!   reads no clock and knows no MQTT.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use super::Clock;
use crate::store::backend::{Backend, FsBackend};
use crate::subject;

/// What the retained store needs from its caller.
#[derive(Clone)]
pub struct RetainedEnv {
    /// Unix milliseconds now.
    pub now_ms: Clock,
    /// The MQTT 5 message expiry (seconds) of a NATS header block.
    pub expiry_secs: fn(&[u8]) -> Option<u32>,
}

/// The log file.
pub const LOG: &str = "retained.log";
/// The compacted log being written.
pub const TMP: &str = "retained.tmp";

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
}

/// The caps of a retained store (`mqtt.max_retained`,
/// `mqtt.max_retained_bytes`); the default is no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedLimits {
    /// Most retained messages.
    pub max_msgs: usize,
    /// Most bytes of live records.
    pub max_bytes: u64,
}

impl Default for RetainedLimits {
    fn default() -> Self {
        RetainedLimits {
            max_msgs: usize::MAX,
            max_bytes: u64::MAX,
        }
    }
}

/// Where one retained message lives in the log, and what the index needs
/// to know without reading it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Offset of the record (its `len` field).
    offset: u64,
    /// Bytes of the whole record.
    len: u64,
    /// Unix ms from which it is expired (MQTT 5 message expiry).
    expires_ms: Option<u64>,
    /// Order of sets: a scan skips entries set after it began (those
    /// reached the subscriber live).
    seq: u64,
}

struct State {
    index: BTreeMap<String, Entry>,
    /// Holds [`LOG`].
    disk: Box<dyn Backend>,
    file_len: u64,
    /// Bytes of the records the index points at.
    live_bytes: u64,
    next_seq: u64,
}

pub struct Retained {
    state: Mutex<State>,
    limits: RetainedLimits,
    env: RetainedEnv,
    /// Refusals since the last log line, and when that was (unix ms).
    refusals: Mutex<(u64, Option<u64>)>,
}

/// Refusals are logged at most this often (ms).
const REFUSAL_LOG_EVERY_MS: u64 = 10_000;
/// Piece size for reading the log at start and copying it at compaction.
const IO_CHUNK: usize = 64 * 1024;

/// The retained messages one subscription gets, read in batches
/// ([`Retained::next_batch`]): the subjects matching its filter, in
/// subject order, set before the scan began, except those an earlier
/// filter of the same SUBSCRIBE already covers. Holds no payloads; its
/// size is that of the SUBSCRIBE's filters.
#[derive(Debug, Clone)]
pub struct RetainedScan {
    filters: Arc<[String]>,
    /// This scan's filter in `filters`; earlier ones are skipped.
    idx: usize,
    /// The last subject visited.
    after: Option<String>,
    /// Entries with a higher `seq` were set after the scan began.
    until: u64,
    done: bool,
}

impl RetainedScan {
    /// Whether every matching message was handed out.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The NATS filter of this scan.
    pub fn filter(&self) -> &str {
        self.filters.get(self.idx).map_or("", String::as_str)
    }
}

/// What start-up found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RetainedReport {
    pub messages: usize,
    pub truncated_bytes: u64,
    /// Bytes of live records.
    pub bytes: u64,
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
    })
}

/// What start-up reads of one record (everything but the payload).
struct Meta {
    subject: String,
    ext: Option<(Vec<u8>, u64)>,
    payload_len: u64,
    /// Bytes of the whole record.
    total: u64,
}

/// Read exactly `buf.len()` bytes, feeding them to the running checksum.
fn read_crc<R: Read>(r: &mut R, buf: &mut [u8], crc: &mut u32) -> io::Result<()> {
    r.read_exact(buf)?;
    *crc = crc32c::crc32c_append(*crc, buf);
    Ok(())
}

/// Read the record at the reader's position, `remaining` bytes before the
/// end of the file, with a fixed-size buffer for its payload (only its
/// checksum is needed). `Ok(None)`: no whole valid record starts here (the
/// end, or a torn or corrupt tail).
fn read_meta<R: Read>(r: &mut R, remaining: u64, chunk: &mut [u8]) -> io::Result<Option<Meta>> {
    match read_meta_inner(r, remaining, chunk) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        other => other,
    }
}

fn read_meta_inner<R: Read>(
    r: &mut R,
    remaining: u64,
    chunk: &mut [u8],
) -> io::Result<Option<Meta>> {
    if remaining < HEADER as u64 {
        return Ok(None);
    }
    let mut head = [0u8; HEADER];
    r.read_exact(&mut head)?;
    let len = u64::from(u32::from_le_bytes([head[0], head[1], head[2], head[3]]));
    let want = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len < 7 || 4 + len > remaining {
        return Ok(None);
    }
    // Bytes of the body (after the checksum) not read yet.
    let mut left = len - 4;
    let mut crc = 0u32;
    let mut fixed = [0u8; 3];
    read_crc(r, &mut fixed, &mut crc)?;
    left -= 3;
    let qos = fixed[0];
    let slen = u64::from(u16::from_le_bytes([fixed[1], fixed[2]]));
    if slen > left {
        return Ok(None);
    }
    let mut subj = vec![0u8; slen as usize];
    read_crc(r, &mut subj, &mut crc)?;
    left -= slen;
    let ext = if qos & EXT != 0 {
        if left < 12 {
            return Ok(None);
        }
        let mut m = [0u8; 12];
        read_crc(r, &mut m, &mut crc)?;
        left -= 12;
        let mut ms = [0u8; 8];
        ms.copy_from_slice(&m[..8]);
        let hlen = u64::from(u32::from_le_bytes([m[8], m[9], m[10], m[11]]));
        if hlen > left {
            return Ok(None);
        }
        let mut headers = vec![0u8; hlen as usize];
        read_crc(r, &mut headers, &mut crc)?;
        left -= hlen;
        Some((headers, u64::from_le_bytes(ms)))
    } else {
        None
    };
    let payload_len = left;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
        let piece = chunk.get_mut(..n).unwrap_or_default();
        read_crc(r, piece, &mut crc)?;
        left -= n as u64;
    }
    if crc != want {
        return Ok(None);
    }
    let Ok(subject) = String::from_utf8(subj) else {
        return Ok(None);
    };
    Ok(Some(Meta {
        subject,
        ext,
        payload_len,
        total: 4 + len,
    }))
}

/// When a message with MQTT 5 metadata `ext` (headers, set at unix ms)
/// expires, if it does.
fn expiry_of(env: &RetainedEnv, ext: Option<(&[u8], u64)>) -> Option<u64> {
    let (headers, stored_ms) = ext?;
    if stored_ms == 0 {
        return None;
    }
    let secs = (env.expiry_secs)(headers)?;
    Some(stored_ms.saturating_add(u64::from(secs).saturating_mul(1000)))
}

/// Sequential reads of one file of a backend.
struct FileReader<'a> {
    disk: &'a mut dyn Backend,
    name: &'static str,
    at: u64,
    len: u64,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.len - self.at).unwrap_or(usize::MAX);
        let n = buf.len().min(left);
        let piece = buf.get_mut(..n).unwrap_or_default();
        if n > 0 {
            self.disk.read_at(self.name, self.at, piece)?;
            self.at += n as u64;
        }
        Ok(n)
    }
}

/// Index the log: (index, live bytes, last seq, length of the valid part).
fn scan(
    disk: &mut dyn Backend,
    file_len: u64,
    env: &RetainedEnv,
) -> io::Result<(BTreeMap<String, Entry>, u64, u64, u64)> {
    let mut index: BTreeMap<String, Entry> = BTreeMap::new();
    let (mut live_bytes, mut next_seq, mut at) = (0u64, 0u64, 0u64);
    let f = FileReader {
        disk,
        name: LOG,
        at: 0,
        len: file_len,
    };
    let mut rd = BufReader::with_capacity(IO_CHUNK, f);
    let mut chunk = vec![0u8; IO_CHUNK];
    while let Some(m) = read_meta(&mut rd, file_len - at, &mut chunk)? {
        if let Some(old) = index.remove(&m.subject) {
            live_bytes -= old.len;
        }
        if m.payload_len > 0 {
            next_seq += 1;
            let ext = m.ext.as_ref().map(|(h, t)| (h.as_slice(), *t));
            let entry = Entry {
                offset: at,
                len: m.total,
                expires_ms: expiry_of(env, ext),
                seq: next_seq,
            };
            index.insert(m.subject, entry);
            live_bytes += m.total;
        }
        at += m.total;
    }
    Ok((index, live_bytes, next_seq, at))
}

impl Retained {
    /// Open (or create) the retained store in `dir`, without caps.
    pub fn open(dir: &Path, env: RetainedEnv) -> io::Result<(Retained, RetainedReport)> {
        Retained::open_limited(dir, RetainedLimits::default(), env)
    }

    /// Open (or create) the retained store in `dir` with `limits`.
    pub fn open_limited(
        dir: &Path,
        limits: RetainedLimits,
        env: RetainedEnv,
    ) -> io::Result<(Retained, RetainedReport)> {
        Retained::open_on(Box::new(FsBackend::open(dir)?), limits, env)
    }

    /// [`Retained::open_limited`] on `disk`.
    pub fn open_on(
        mut disk: Box<dyn Backend>,
        limits: RetainedLimits,
        env: RetainedEnv,
    ) -> io::Result<(Retained, RetainedReport)> {
        disk.remove(TMP)?;
        let file_len = match disk.len(LOG) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                disk.create(LOG)?;
                0
            }
            Err(e) => return Err(e),
        };
        let (index, live_bytes, next_seq, at) = scan(&mut *disk, file_len, &env)?;
        let truncated = file_len - at;
        if truncated > 0 {
            disk.truncate(LOG, at)?;
            disk.sync(LOG)?;
        }
        let now = (env.now_ms)();
        let retained = Retained {
            state: Mutex::new(State {
                index,
                disk,
                file_len: at,
                live_bytes,
                next_seq,
            }),
            limits,
            env,
            refusals: Mutex::new((0, None)),
        };
        retained.remove_expired(now);
        let (messages, bytes) = {
            let st = retained.lock();
            (st.index.len(), st.live_bytes)
        };
        if messages > limits.max_msgs || bytes > limits.max_bytes {
            log::warn!(
                "retained: {messages} messages of {bytes} bytes are over mqtt.max_retained ({}) or mqtt.max_retained_bytes ({}); they are kept, but new retained messages are refused until some are cleared",
                limits.max_msgs,
                limits.max_bytes
            );
        }
        let report = RetainedReport {
            messages,
            truncated_bytes: truncated,
            bytes,
        };
        Ok((retained, report))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The caps this store enforces.
    pub fn limits(&self) -> RetainedLimits {
        self.limits
    }

    /// Set (or, with an empty payload, clear) the retained message of
    /// `subject`; durable when it returns.
    pub fn set(&self, subject: &str, payload: &[u8], qos: u8) -> io::Result<()> {
        self.set_with(subject, payload, qos, None, 0)
    }

    /// [`Retained::set`] with MQTT 5 metadata (a NATS header block) and
    /// the time it is set (unix milliseconds). Over the limits: an error
    /// of kind [`io::ErrorKind::QuotaExceeded`], nothing written.
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

    /// Why a set of a record of `len` bytes for `subject` would exceed the
    /// limits, if it would.
    fn over_limits(&self, st: &State, subject: &str, len: u64) -> Option<String> {
        let old = st.index.get(subject).map(|e| e.len);
        let count = st.index.len() + usize::from(old.is_none());
        let bytes = (st.live_bytes - old.unwrap_or(0)).saturating_add(len);
        if old.is_none() && count > self.limits.max_msgs {
            return Some(format!(
                "mqtt.max_retained ({}) retained messages reached",
                self.limits.max_msgs
            ));
        }
        if bytes > self.limits.max_bytes && len > old.unwrap_or(0) {
            return Some(format!(
                "mqtt.max_retained_bytes ({} bytes) reached ({} bytes retained, {len} more asked)",
                self.limits.max_bytes, st.live_bytes
            ));
        }
        None
    }

    /// Count a refusal; log at most every [`REFUSAL_LOG_EVERY`].
    fn refused(&self, subject: &str, why: &str) {
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        r.0 += 1;
        let now = (self.env.now_ms)();
        if r.1.is_none_or(|t| now.abs_diff(t) >= REFUSAL_LOG_EVERY_MS) {
            log::warn!(
                "retained: {} message(s) not retained (latest on {subject}): {why}; clear retained messages (publish an empty retained payload) or raise the limit",
                r.0
            );
            *r = (0, Some(now));
        }
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
        if payload.is_empty() && !st.index.contains_key(subject) {
            return Ok(());
        }
        let ext = headers
            .filter(|_| !payload.is_empty())
            .map(|h| (h, stored_ms));
        let len = record_len(subject, payload) + ext_len(ext) as u64;
        if !payload.is_empty() {
            if self.over_limits(st, subject, len).is_some() {
                // Expired messages make room first.
                let expired = expired_in(st, (self.env.now_ms)());
                self.delete(st, &expired);
            }
            if let Some(why) = self.over_limits(st, subject, len) {
                self.refused(subject, &why);
                return Err(io::Error::new(io::ErrorKind::QuotaExceeded, why));
            }
        }
        let mut rec = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        encode(subject, payload, qos, ext, &mut rec)?;
        if let Err(e) = st.disk.append(LOG, &rec).and_then(|()| st.disk.sync(LOG)) {
            // Cut back whatever part of the record reached the file.
            let len = st.file_len;
            let _ = st.disk.truncate(LOG, len);
            return Err(e);
        }
        let offset = st.file_len;
        st.file_len += rec.len() as u64;
        if let Some(old) = st.index.remove(subject) {
            st.live_bytes -= old.len;
        }
        if !payload.is_empty() {
            st.next_seq += 1;
            let entry = Entry {
                offset,
                len: rec.len() as u64,
                expires_ms: expiry_of(&self.env, ext),
                seq: st.next_seq,
            };
            st.live_bytes += entry.len;
            st.index.insert(subject.to_string(), entry);
        }
        if st.file_len > 2 * st.live_bytes + 64 * 1024 {
            if let Err(e) = self.compact(st) {
                log::warn!("retained: compaction of {LOG} failed: {e}");
            }
        }
        Ok(())
    }

    /// Rewrite the log with only live records, copied in pieces.
    fn compact(&self, st: &mut State) -> io::Result<()> {
        let mut moved: Vec<u64> = Vec::with_capacity(st.index.len());
        let disk = &mut *st.disk;
        disk.create(TMP)?;
        let mut chunk = vec![0u8; IO_CHUNK];
        let mut at = 0u64;
        for e in st.index.values() {
            let mut done = 0u64;
            while done < e.len {
                let n = usize::try_from(e.len - done)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                let piece = chunk.get_mut(..n).unwrap_or_default();
                disk.read_at(LOG, e.offset + done, piece)?;
                disk.append(TMP, piece)?;
                done += n as u64;
            }
            moved.push(at);
            at += e.len;
        }
        disk.sync(TMP)?;
        disk.rename(TMP, LOG)?;
        for (e, at) in st.index.values_mut().zip(moved) {
            e.offset = at;
        }
        st.file_len = st.live_bytes;
        Ok(())
    }

    /// One scan per filter of a SUBSCRIBE (NATS filters, in packet order);
    /// a subject several of them match is handed out by the first only.
    pub fn scans(&self, filters: Vec<String>) -> Vec<RetainedScan> {
        let until = self.lock().next_seq;
        let filters: Arc<[String]> = filters.into();
        (0..filters.len())
            .map(|idx| RetainedScan {
                filters: filters.clone(),
                idx,
                after: None,
                until,
                done: false,
            })
            .collect()
    }

    /// The next retained messages of `scan`: at most `max_msgs` and about
    /// `max_bytes` of records (at least one message while any is left),
    /// read from the log. Expired ones are deleted instead.
    pub fn next_batch(
        &self,
        scan: &mut RetainedScan,
        max_bytes: usize,
        max_msgs: usize,
    ) -> Vec<RetainedMsg> {
        self.next_batch_at(scan, max_bytes, max_msgs, (self.env.now_ms)())
    }

    /// [`Retained::next_batch`] at `now_ms` (unix milliseconds).
    pub fn next_batch_at(
        &self,
        scan: &mut RetainedScan,
        max_bytes: usize,
        max_msgs: usize,
        now_ms: u64,
    ) -> Vec<RetainedMsg> {
        let mut out = Vec::new();
        if scan.done {
            return out;
        }
        let mut st = self.lock();
        let mut expired = Vec::new();
        let mut used = 0u64;
        let mut last: Option<String> = None;
        let mut finished = true;
        {
            let State { index, disk, .. } = &mut *st;
            let range = match &scan.after {
                None => index.range::<str, _>((Bound::Unbounded, Bound::Unbounded)),
                Some(a) => index.range::<str, _>((Bound::Excluded(a.as_str()), Bound::Unbounded)),
            };
            let filter = scan.filter();
            let earlier = scan.filters.get(..scan.idx).unwrap_or_default();
            for (s, e) in range {
                if !out.is_empty() && (used >= max_bytes as u64 || out.len() >= max_msgs) {
                    finished = false;
                    break;
                }
                last = Some(s.clone());
                if e.seq > scan.until
                    || !subject::matches(filter, s)
                    || earlier.iter().any(|f| subject::matches(f, s))
                {
                    continue;
                }
                if e.expires_ms.is_some_and(|t| now_ms >= t) {
                    expired.push(s.clone());
                    continue;
                }
                match read_record(&mut **disk, e) {
                    Ok(m) => {
                        used += e.len;
                        out.push(m);
                    }
                    Err(err) => log::warn!(
                        "retained: cannot read the retained message of {s} from the log: {err}; skipped"
                    ),
                }
            }
        }
        if last.is_some() {
            scan.after = last;
        }
        scan.done = finished;
        self.delete(&mut st, &expired);
        out
    }

    /// Retained messages whose subject matches the NATS `filter`; expired
    /// ones among them are deleted instead. Loads every matching payload:
    /// for tests and tools; subscriptions use [`Retained::scans`].
    pub fn matching(&self, filter: &str) -> Vec<RetainedMsg> {
        self.matching_at(filter, (self.env.now_ms)())
    }

    /// [`Retained::matching`] at `now_ms` (unix milliseconds).
    pub fn matching_at(&self, filter: &str, now_ms: u64) -> Vec<RetainedMsg> {
        let mut out = Vec::new();
        for mut scan in self.scans(vec![filter.to_string()]) {
            while !scan.is_done() {
                out.extend(self.next_batch_at(&mut scan, usize::MAX, usize::MAX, now_ms));
            }
        }
        out
    }

    /// Delete every expired retained message; returns how many.
    pub fn remove_expired(&self, now_ms: u64) -> usize {
        let mut st = self.lock();
        let expired = expired_in(&st, now_ms);
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
        self.lock().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the live records.
    pub fn bytes(&self) -> u64 {
        self.lock().live_bytes
    }
}

/// The subjects whose message has expired at `now_ms`.
fn expired_in(st: &State, now_ms: u64) -> Vec<String> {
    st.index
        .iter()
        .filter(|(_, e)| e.expires_ms.is_some_and(|t| now_ms >= t))
        .map(|(s, _)| s.clone())
        .collect()
}

/// Read and check the record `e` points at.
fn read_record(disk: &mut dyn Backend, e: &Entry) -> io::Result<RetainedMsg> {
    let len = usize::try_from(e.len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "record too large"))?;
    let mut buf = vec![0u8; len];
    disk.read_at(LOG, e.offset, &mut buf)?;
    let r = decode(&buf)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "checksum or layout mismatch"))?;
    let (headers, stored_ms) = match r.ext {
        Some((h, t)) => (Some(h), t),
        None => (None, 0),
    };
    Ok(RetainedMsg {
        subject: r.subject,
        payload: r.payload,
        qos: r.qos,
        headers,
        stored_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, OpenOptions};
    use std::io::Write;

    /// Unix ms of the tests' clock: long after the times they set.
    pub(crate) const NOW_MS: u64 = 1_700_000_000_000;

    pub(crate) fn env() -> RetainedEnv {
        RetainedEnv {
            now_ms: Arc::new(|| NOW_MS),
            expiry_secs: crate::broker::retained::expiry_secs,
        }
    }

    #[test]
    fn set_clear_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (r, rep) = Retained::open(dir.path(), env()).unwrap();
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
        let (r, rep) = Retained::open(dir.path(), env()).unwrap();
        assert_eq!(rep.messages, 1);
        assert_eq!(r.matching(">").len(), 1);
    }

    #[test]
    fn torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Retained::open(dir.path(), env()).unwrap();
        r.set("x", b"keep", 1).unwrap();
        r.set("y", b"torn", 1).unwrap();
        drop(r);
        let path = dir.path().join("retained.log");
        let len = fs::metadata(&path).unwrap().len();
        for cut in 1..record_len("y", b"torn") {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(len - cut).unwrap();
            drop(f);
            let (r, rep) = Retained::open(dir.path(), env()).unwrap();
            assert_eq!(rep.messages, 1, "cut {cut}");
            assert_eq!(rep.truncated_bytes, record_len("y", b"torn") - cut);
            assert_eq!(r.matching("x")[0].payload, b"keep");
            drop(r);
            // restore the full record for the next cut
            let (r, _) = Retained::open(dir.path(), env()).unwrap();
            r.set("y", b"torn", 1).unwrap();
        }
    }

    #[test]
    fn compaction_keeps_live_records() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Retained::open(dir.path(), env()).unwrap();
        let big = vec![7u8; 4096];
        for i in 0..100 {
            r.set("hot", &big, 1).unwrap();
            r.set(&format!("k.{}", i % 3), b"v", 0).unwrap();
        }
        let len = fs::metadata(dir.path().join("retained.log")).unwrap().len();
        assert!(len < 200 * 1024, "log was not compacted: {len} bytes");
        drop(r);
        let (r, rep) = Retained::open(dir.path(), env()).unwrap();
        assert_eq!(rep.messages, 4);
        assert_eq!(r.matching("hot")[0].payload, big);
    }

    #[test]
    fn mqtt5_metadata_survives_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Retained::open(dir.path(), env()).unwrap();
        let h = b"NATS/1.0\r\nk: v\r\n\r\n";
        r.set_with("m", b"with", 1, Some(h), 1234).unwrap();
        r.set("plain", b"p", 0).unwrap();
        drop(r);
        let (r, rep) = Retained::open(dir.path(), env()).unwrap();
        assert_eq!(
            rep,
            RetainedReport {
                messages: 2,
                truncated_bytes: 0,
                bytes: record_len("m", b"with") + 12 + h.len() as u64 + record_len("plain", b"p"),
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
        let (r, _) = Retained::open(dir.path(), env()).unwrap();
        let m = &r.matching("m")[0];
        assert_eq!((m.payload.as_slice(), m.stored_ms), (&b"again"[..], 5));
    }

    #[test]
    fn expired_messages_are_deleted_not_just_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Retained::open(dir.path(), env()).unwrap();
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
        let (r, rep) = Retained::open(dir.path(), env()).unwrap();
        assert_eq!(rep.messages, 1);
        drop(r);
        let (r, rep) = Retained::open(dir.path(), env()).unwrap();
        assert_eq!((rep.messages, r.matching(">").len()), (1, 1));
    }

    #[test]
    fn caps_refuse_growth_but_allow_replacing_and_clearing() {
        let dir = tempfile::tempdir().unwrap();
        let one = record_len("t.0", &[1u8; 100]);
        let limits = RetainedLimits {
            max_msgs: 3,
            max_bytes: 3 * one,
        };
        let (r, _) = Retained::open_limited(dir.path(), limits, env()).unwrap();
        for i in 0..3 {
            r.set(&format!("t.{i}"), &[1u8; 100], 1).unwrap();
        }
        // A fourth subject: over the count.
        let e = r.set("t.3", &[1u8; 100], 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::QuotaExceeded);
        assert!(e.to_string().contains("mqtt.max_retained"), "{e}");
        // Replacing with the same size works; growing one does not (bytes).
        r.set("t.0", &[2u8; 100], 1).unwrap();
        let e = r.set("t.0", &[2u8; 101], 1).unwrap_err();
        assert!(e.to_string().contains("mqtt.max_retained_bytes"), "{e}");
        assert_eq!(r.matching("t.0")[0].payload, vec![2u8; 100]);
        // Clearing makes room.
        r.set("t.1", b"", 0).unwrap();
        r.set("t.3", &[3u8; 100], 0).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r.bytes(), 3 * one);
        // Reopened with lower caps: kept, growth refused.
        drop(r);
        let lower = RetainedLimits {
            max_msgs: 1,
            max_bytes: u64::MAX,
        };
        let (r, rep) = Retained::open_limited(dir.path(), lower, env()).unwrap();
        assert_eq!(rep.messages, 3);
        assert!(r.set("t.9", b"x", 0).is_err());
        r.set("t.3", b"smaller", 0).unwrap();
    }

    #[test]
    fn expired_messages_make_room_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let limits = RetainedLimits {
            max_msgs: 1,
            max_bytes: u64::MAX,
        };
        let (r, _) = Retained::open_limited(dir.path(), limits, env()).unwrap();
        let h = crate::broker::bridge::props_to_headers(&crate::wire::mqtt::Properties {
            message_expiry_interval: Some(1),
            ..Default::default()
        })
        .unwrap();
        // Set long ago (unix ms 1000), expired for a while.
        r.set_with("old", b"o", 1, Some(&h), 1_000).unwrap();
        r.set("new", b"n", 1).unwrap();
        assert_eq!(r.matching(">").len(), 1);
        assert_eq!(r.matching("new").len(), 1);
    }

    #[test]
    fn scans_read_in_batches_skip_earlier_filters_and_later_sets() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Retained::open(dir.path(), env()).unwrap();
        for i in 0..10 {
            r.set(&format!("a.{i}"), &[i as u8; 1000], 1).unwrap();
        }
        r.set("b.x", b"bx", 0).unwrap();
        let mut scans = r.scans(vec!["a.1".into(), "a.*".into(), "b.>".into()]);
        assert_eq!(scans.len(), 3);
        // Set after the scans began: reaches subscribers live, not here.
        r.set("a.99", b"late", 1).unwrap();
        let first: Vec<String> = r
            .next_batch(&mut scans[0], 1, 100)
            .into_iter()
            .map(|m| m.subject)
            .collect();
        assert_eq!(first, vec!["a.1".to_string()]);
        let mut got = Vec::new();
        let mut batches = 0;
        while !scans[1].is_done() {
            let b = r.next_batch(&mut scans[1], 2500, 100);
            assert!(b.len() <= 3, "about 2500 bytes a batch: {}", b.len());
            got.extend(b.into_iter().map(|m| m.subject));
            batches += 1;
        }
        assert!(batches >= 3, "{batches} batches");
        let want: Vec<String> = [0, 2, 3, 4, 5, 6, 7, 8, 9]
            .iter()
            .map(|i| format!("a.{i}"))
            .collect();
        assert_eq!(got, want, "a.1 went with the first filter; a.99 is later");
        // A message count limit holds too.
        let mut s = r.scans(vec!["a.*".into()]).pop().unwrap();
        assert_eq!(r.next_batch(&mut s, usize::MAX, 4).len(), 4);
        let b = r.next_batch(&mut scans[2], usize::MAX, 100);
        assert_eq!((b.len(), b[0].payload.as_slice()), (1, &b"bx"[..]));
        assert!(scans[2].is_done());
        assert!(r.next_batch(&mut scans[2], usize::MAX, 100).is_empty());
    }

    #[test]
    fn start_up_indexes_without_loading_payloads_and_reads_after_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Retained::open(dir.path(), env()).unwrap();
        let big = vec![9u8; 200 * 1024];
        for round in 0..3u8 {
            for i in 0..8 {
                let mut p = big.clone();
                p[0] = round;
                r.set(&format!("big.{i}"), &p, 1).unwrap();
            }
        }
        drop(r);
        let (r, rep) = Retained::open(dir.path(), env()).unwrap();
        assert_eq!(rep.messages, 8);
        // The index holds offsets, not payloads.
        assert!(std::mem::size_of::<Entry>() <= 40);
        // Replacing compacts (dead outweigh live); offsets follow.
        for i in 0..8 {
            r.set(&format!("big.{i}"), b"small", 0).unwrap();
        }
        r.set("big.0", &big, 1).unwrap();
        let len = fs::metadata(dir.path().join("retained.log")).unwrap().len();
        assert!(len < 2 * r.bytes() + 64 * 1024 + 1, "compacted: {len}");
        let all = r.matching("big.*");
        assert_eq!(all.len(), 8);
        assert_eq!(all[0].payload, big);
        assert!(all[1..].iter().all(|m| m.payload == b"small"));
        drop(r);
        let (r, rep) = Retained::open(dir.path(), env()).unwrap();
        assert_eq!((rep.messages, rep.truncated_bytes), (8, 0));
        assert_eq!(r.matching("big.0")[0].payload, big);
    }

    #[test]
    fn corrupt_length_at_the_tail_is_cut_without_allocating_it() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Retained::open(dir.path(), env()).unwrap();
        r.set("x", b"keep", 1).unwrap();
        drop(r);
        let path = dir.path().join("retained.log");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        // A record header claiming 4 GiB, then a few bytes.
        f.write_all(&u32::MAX.to_le_bytes()).unwrap();
        f.write_all(&[0u8; 20]).unwrap();
        drop(f);
        let (r, rep) = Retained::open(dir.path(), env()).unwrap();
        assert_eq!((rep.messages, rep.truncated_bytes), (1, 24));
        assert_eq!(r.matching("x")[0].payload, b"keep");
    }
}
