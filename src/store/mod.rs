//! The segmented, checksummed stream store and its crash recovery.
//!
//! Owns every file in one stream's directory (through a [`Backend`]):
//! segment files `<first seq, 20 digits>.seg` and the `meta` file. The byte
//! layout, invariants and recovery procedure are in `docs/store-format.md`.
//! Plain std, no async, no clock: every call that needs the time takes
//! `now` (unix nanoseconds) from the caller.
//!
//! Invariants:
//! - Sequences are contiguous inside a segment (record `i` has seq
//!   `base + i`), strictly increasing across segments, and never reused,
//!   even after every message was removed and the stream restarted (the
//!   `meta` file keeps `last_seq` when segments are dropped and at close).
//! - Timestamps never decrease (`max(now, previous)`), so age limits remove
//!   a prefix.
//! - Records with `seq < first_seq` are removed; a segment whose records are
//!   all removed is deleted (after `meta` records the new `first_seq`).
//! - Opening never fails on damaged data, only on real I/O errors: a torn or
//!   corrupt tail is cut and reported, nothing that fails its checksum is
//!   ever returned.
//! - Between [`Store::mark`] and [`Store::commit`]/[`Store::rollback`] only
//!   appends happen; a rollback removes every byte written since the mark.

pub mod backend;
pub mod record;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::Duration;

pub use backend::{Backend, FsBackend, MemBackend};

use crate::stream::{
    Discard, Message, PubAck, RecoveryReport, StoredMessage, StreamConfig, StreamError, StreamState,
};
use record::{RecordRef, SegHeader, SEG_HEADER_LEN};

/// Default segment size.
pub const DEFAULT_SEGMENT_SIZE: u64 = 4 << 20;
/// Smallest segment size chosen for small `max_bytes`.
pub const MIN_SEGMENT_SIZE: u64 = 64 << 10;
/// The append buffer is written out when it grows past this.
const WBUF_FLUSH: usize = 1 << 20;
/// Name of the metadata file.
pub const META_NAME: &str = "meta";
const META_MAGIC: &[u8; 8] = b"FRNDMET1";
const META_LEN: usize = 28;

/// The store's view of a stream configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreOptions {
    /// 0 = unlimited, for every limit.
    pub max_msgs: u64,
    pub max_bytes: u64,
    pub max_age: Duration,
    pub max_msg_size: u64,
    pub discard: Discard,
    pub duplicate_window: Duration,
    /// A new segment starts when the next record would make the current
    /// one larger than this (a single bigger record gets its own segment).
    pub segment_size: u64,
}

impl StoreOptions {
    pub fn from_config(cfg: &StreamConfig) -> StoreOptions {
        let segment_size = if cfg.max_bytes == 0 {
            DEFAULT_SEGMENT_SIZE
        } else {
            (cfg.max_bytes / 8).clamp(MIN_SEGMENT_SIZE, DEFAULT_SEGMENT_SIZE)
        };
        StoreOptions {
            max_msgs: cfg.max_msgs,
            max_bytes: cfg.max_bytes,
            max_age: cfg.max_age,
            max_msg_size: cfg.max_msg_size,
            discard: cfg.discard,
            duplicate_window: cfg.duplicate_window,
            segment_size,
        }
    }
}

/// Everything known about one segment file.
#[derive(Debug)]
struct Segment {
    base: u64,
    base_ts: u64,
    /// Timestamp of the newest record (`base_ts` when empty).
    last_ts: u64,
    /// Logical length: file bytes plus the store's unwritten buffer.
    len: u64,
    /// Bytes already handed to the backend.
    flushed: u64,
    /// The file exists in the backend.
    created: bool,
    /// Offset of the record with seq `base + i`.
    offsets: Vec<u32>,
    /// Interior deletions (bit `i` = seq `base + i`), allocated on first use.
    deleted: Option<Vec<u64>>,
    /// Records neither deleted nor below `first_seq`.
    live: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.base + self.offsets.len() as u64
    }

    fn offset(&self, i: usize) -> u64 {
        self.offsets.get(i).map_or(self.len, |&o| u64::from(o))
    }

    fn rec_size(&self, i: usize) -> u64 {
        self.offset(i + 1) - self.offset(i)
    }

    fn is_deleted(&self, i: usize) -> bool {
        self.deleted
            .as_ref()
            .and_then(|d| d.get(i / 64))
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set_deleted(&mut self, i: usize) {
        let d = self.deleted.get_or_insert_with(Vec::new);
        if d.len() <= i / 64 {
            d.resize(i / 64 + 1, 0);
        }
        if let Some(w) = d.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
}

/// A segment file name for a base sequence.
pub fn segment_name(base: u64) -> String {
    format!("{base:020}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn encode_meta(first_seq: u64, last_seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(META_LEN);
    out.extend_from_slice(META_MAGIC);
    out.extend_from_slice(&first_seq.to_le_bytes());
    out.extend_from_slice(&last_seq.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode_meta(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() != META_LEN || &b[..8] != META_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[24..28].try_into().ok()?);
    if crc32c::crc32c(&b[..24]) != crc {
        return None;
    }
    let first = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let last = u64::from_le_bytes(b[16..24].try_into().ok()?);
    Some((first, last))
}

/// Finds the value of the `Nats-Msg-Id` header in a NATS header block.
pub fn msg_id(headers: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(headers).ok()?;
    text.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        let v = v.trim();
        (k.trim().eq_ignore_ascii_case("Nats-Msg-Id") && !v.is_empty()).then_some(v)
    })
}

/// Recently seen message ids (memory only).
#[derive(Debug, Default)]
struct Dedup {
    window: u64,
    ids: HashMap<String, u64>,
    order: VecDeque<(u64, u64, String)>,
}

impl Dedup {
    fn expire(&mut self, now: u64) {
        while let Some((ts, seq)) = self.order.front().map(|(t, q, _)| (*t, *q)) {
            if ts.saturating_add(self.window) >= now {
                break;
            }
            if let Some((_, _, id)) = self.order.pop_front() {
                if self.ids.get(&id) == Some(&seq) {
                    self.ids.remove(&id);
                }
            }
        }
    }

    fn forget_after(&mut self, last_seq: u64) {
        while self.order.back().is_some_and(|(_, seq, _)| *seq > last_seq) {
            if let Some((_, seq, id)) = self.order.pop_back() {
                if self.ids.get(&id) == Some(&seq) {
                    self.ids.remove(&id);
                }
            }
        }
    }
}

/// A point to roll back to: everything appended after it can be undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    last_seq: u64,
    last_ts: u64,
    seg_last_ts: Option<u64>,
}

impl Mark {
    /// The last sequence at the mark.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }
}

/// A file operation that must succeed before anything else is written
/// (left over from a failed rollback).
#[derive(Debug, Clone)]
enum Repair {
    Truncate(String, u64),
    Remove(String),
}

/// One stream's messages. Single owner; not thread-safe by design.
pub struct Store {
    backend: Box<dyn Backend>,
    opts: StoreOptions,
    segs: VecDeque<Segment>,
    first_seq: u64,
    last_seq: u64,
    msgs: u64,
    bytes: u64,
    last_ts: u64,
    /// Bytes of the last segment not yet handed to the backend.
    wbuf: Vec<u8>,
    /// Base seqs of segments with appends not yet synced.
    unsynced: Vec<u64>,
    repairs: Vec<Repair>,
    dedup: Dedup,
    scratch: Vec<u8>,
}

fn io_err(e: io::Error) -> StreamError {
    StreamError::Io(e)
}

impl Store {
    /// Opens the store held by `backend`, recovering from any damage, and
    /// applies the limits as of `now`.
    pub fn open(
        backend: Box<dyn Backend>,
        opts: StoreOptions,
        now: u64,
    ) -> io::Result<(Store, RecoveryReport)> {
        let mut st = Store {
            backend,
            dedup: Dedup {
                window: u64::try_from(opts.duplicate_window.as_nanos()).unwrap_or(u64::MAX),
                ..Dedup::default()
            },
            opts,
            segs: VecDeque::new(),
            first_seq: 1,
            last_seq: 0,
            msgs: 0,
            bytes: 0,
            last_ts: 0,
            wbuf: Vec::new(),
            unsynced: Vec::new(),
            repairs: Vec::new(),
            scratch: Vec::new(),
        };
        let report = st.recover()?;
        st.enforce_limits(now);
        Ok((st, report))
    }

    fn recover(&mut self) -> io::Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        let mut bases = Vec::new();
        let mut meta = None;
        for name in self.backend.list()? {
            if let Some(base) = parse_segment_name(&name) {
                bases.push(base);
            } else if name == META_NAME {
                let len = self.backend.len(&name)?;
                let mut b = vec![0u8; usize::try_from(len).unwrap_or(0).min(META_LEN + 1)];
                self.backend.read_at(&name, 0, &mut b)?;
                meta = decode_meta(&b);
                if meta.is_none() {
                    log::warn!("stream meta file is damaged; ignoring it (sequences are recovered from the segments)");
                }
            } else if name.ends_with(".tmp") {
                self.backend.remove(&name)?;
            }
        }
        bases.sort_unstable();
        let mut buf = Vec::new();
        for (k, &base) in bases.iter().enumerate() {
            let name = segment_name(base);
            let next_base = bases.get(k + 1).copied();
            let is_last = next_base.is_none();
            let len = self.backend.len(&name)?;
            let Ok(ulen) = usize::try_from(len) else {
                return Err(io::Error::other(format!("segment {name} too large")));
            };
            buf.clear();
            buf.resize(ulen, 0);
            self.backend.read_at(&name, 0, &mut buf)?;
            let prev_end = self.segs.back().map_or(0, Segment::end);
            let header = record::decode_header(&buf)
                .ok()
                .filter(|h| h.base_seq == base && base >= prev_end);
            let Some(h) = header else {
                // Unusable header: nothing in this file can be trusted.
                if is_last {
                    report.truncated_bytes += len;
                } else {
                    report.lost_records += next_base.unwrap_or(base).saturating_sub(base);
                    report.truncated_bytes += len;
                }
                log::error!("segment {name}: header damaged; removing the file ({len} bytes)");
                self.backend.remove(&name)?;
                continue;
            };
            let mut seg = Segment {
                base,
                base_ts: h.base_ts,
                last_ts: h.base_ts,
                len,
                flushed: len,
                created: true,
                offsets: Vec::new(),
                deleted: None,
                live: 0,
            };
            let mut pos = SEG_HEADER_LEN;
            let mut cut = None;
            while pos < buf.len() {
                let expect = seg.end();
                match record::decode(&buf[pos..], base, h.base_ts) {
                    Ok((rec, n)) if rec.seq == expect && u32::try_from(pos).is_ok() => {
                        seg.offsets.push(pos as u32);
                        seg.last_ts = seg.last_ts.max(rec.timestamp);
                        pos += n;
                    }
                    Ok(_) => {
                        cut = Some("record out of sequence");
                        break;
                    }
                    Err(record::DecodeError::Incomplete) => {
                        cut = Some("record incomplete (torn write)");
                        break;
                    }
                    Err(record::DecodeError::Corrupt(why)) => {
                        cut = Some(why);
                        break;
                    }
                }
            }
            if let Some(why) = cut {
                let dropped = len - pos as u64;
                report.truncated_bytes += dropped;
                if let Some(nb) = next_base {
                    report.lost_records += nb.saturating_sub(seg.end());
                }
                log::warn!(
                    "segment {name}: {why} at offset {pos}; cutting {dropped} bytes{}",
                    if is_last {
                        " (unacknowledged tail)"
                    } else {
                        ""
                    }
                );
                self.backend.truncate(&name, pos as u64)?;
                self.backend.sync(&name)?;
                seg.len = pos as u64;
                seg.flushed = seg.len;
            }
            if seg.offsets.is_empty() && !is_last {
                self.backend.remove(&name)?;
                continue;
            }
            self.segs.push_back(seg);
        }
        let (meta_first, meta_last) = meta.unwrap_or((1, 0));
        let seg_last = self.segs.back().map_or(0, |s| s.end().saturating_sub(1));
        self.last_seq = meta_last.max(seg_last);
        self.last_ts = self.segs.back().map_or(0, |s| s.last_ts);
        self.first_seq = meta_first
            .max(self.segs.front().map_or(1, |s| s.base))
            .max(1)
            .min(self.last_seq + 1);
        for seg in self.segs.iter_mut() {
            for i in 0..seg.offsets.len() {
                if seg.base + i as u64 >= self.first_seq {
                    seg.live += 1;
                    self.bytes += seg.rec_size(i);
                }
            }
            self.msgs += seg.live;
        }
        report.records = self.msgs;
        self.advance_first();
        self.drop_dead_segments();
        Ok(report)
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    pub fn state(&self) -> StreamState {
        StreamState {
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            msgs: self.msgs,
            bytes: self.bytes,
        }
    }

    /// The state as if nothing after `seq` had been appended yet.
    pub fn state_upto(&self, seq: u64) -> StreamState {
        let mut s = self.state();
        if seq >= self.last_seq {
            return s;
        }
        for seg in self.segs.iter().rev() {
            if seg.end() <= seq + 1 {
                break;
            }
            let from = (seq + 1).max(seg.base).max(self.first_seq);
            for q in from..seg.end() {
                let i = (q - seg.base) as usize;
                if !seg.is_deleted(i) {
                    s.msgs = s.msgs.saturating_sub(1);
                    s.bytes = s.bytes.saturating_sub(seg.rec_size(i));
                }
            }
        }
        s.last_seq = seq;
        s.first_seq = s.first_seq.min(seq + 1);
        s
    }

    /// Bytes used by the stream's files.
    pub fn disk_usage(&mut self) -> io::Result<u64> {
        self.backend.disk_usage()
    }

    /// Timestamp (unix ns) at which the oldest message expires by max_age.
    pub fn next_expiry(&mut self) -> Option<u64> {
        if self.opts.max_age.is_zero() || self.msgs == 0 {
            return None;
        }
        let age = u64::try_from(self.opts.max_age.as_nanos()).unwrap_or(u64::MAX);
        let ts = self.first_ts()?;
        Some(ts.saturating_add(age))
    }

    /// The current position, for [`Store::rollback`].
    pub fn mark(&self) -> Mark {
        Mark {
            last_seq: self.last_seq,
            last_ts: self.last_ts,
            seg_last_ts: self.segs.back().map(|s| s.last_ts),
        }
    }

    /// Appends one message (buffered; see [`Store::flush`], [`Store::sync`]).
    pub fn append(&mut self, msg: &Message, now: u64) -> Result<PubAck, StreamError> {
        let hdr_len = msg.headers.as_ref().map(Vec::len);
        let size = (hdr_len.unwrap_or(0) + msg.payload.len()) as u64;
        if self.opts.max_msg_size > 0 && size > self.opts.max_msg_size {
            return Err(StreamError::TooLarge {
                size,
                max: self.opts.max_msg_size,
            });
        }
        let id = match (&msg.headers, self.dedup.window) {
            (Some(h), w) if w > 0 => msg_id(h),
            _ => None,
        };
        if let Some(id) = id {
            self.dedup.expire(now);
            if let Some(&seq) = self.dedup.ids.get(id) {
                return Ok(PubAck {
                    seq,
                    duplicate: true,
                });
            }
        }
        let seq = self.last_seq + 1;
        let ts = now.max(self.last_ts);
        let rec_len = |base: u64, base_ts: u64| {
            record::encoded_len(
                seq - base,
                ts - base_ts,
                msg.subject.len(),
                hdr_len,
                msg.payload.len(),
            ) as u64
        };
        let in_active = self.segs.back().and_then(|s| {
            let len = rec_len(s.base, s.base_ts);
            let fits = s.offsets.is_empty() || s.len + len <= self.opts.segment_size;
            (s.end() == seq && fits && s.len + len <= u64::from(u32::MAX)).then_some(len)
        });
        let (roll, len) = match in_active {
            Some(len) => (false, len),
            None => (true, SEG_HEADER_LEN as u64 + rec_len(seq, ts)),
        };
        let len = if roll {
            len - SEG_HEADER_LEN as u64
        } else {
            len
        };
        let body = len - record::PREFIX_LEN as u64;
        if body > record::MAX_BODY as u64 {
            return Err(StreamError::TooLarge {
                size,
                max: record::MAX_BODY as u64,
            });
        }
        let o = &self.opts;
        if o.max_bytes > 0 && len > o.max_bytes {
            return Err(StreamError::Full(format!(
                "a message of {len} stored bytes can never fit max_bytes {}",
                o.max_bytes
            )));
        }
        if o.discard == Discard::New {
            if o.max_msgs > 0 && self.msgs >= o.max_msgs {
                return Err(StreamError::Full(format!(
                    "max_msgs {} reached (discard = new); remove messages or raise the limit",
                    o.max_msgs
                )));
            }
            if o.max_bytes > 0 && self.bytes + len > o.max_bytes {
                return Err(StreamError::Full(format!(
                    "max_bytes {} reached (discard = new); remove messages or raise the limit",
                    o.max_bytes
                )));
            }
        }
        if roll {
            self.flush().map_err(io_err)?;
            let mut seg = Segment {
                base: seq,
                base_ts: ts,
                last_ts: ts,
                len: 0,
                flushed: 0,
                created: false,
                offsets: Vec::new(),
                deleted: None,
                live: 0,
            };
            record::encode_header(
                SegHeader {
                    base_seq: seq,
                    base_ts: ts,
                },
                &mut self.wbuf,
            );
            seg.len = SEG_HEADER_LEN as u64;
            self.segs.push_back(seg);
        }
        let Some(seg) = self.segs.back_mut() else {
            return Err(StreamError::Io(io::Error::other("no active segment")));
        };
        let offset = seg.len as u32;
        record::encode_into(
            &mut self.wbuf,
            seg.base,
            seg.base_ts,
            &RecordRef {
                seq,
                timestamp: ts,
                subject: msg.subject.as_bytes(),
                headers: msg.headers.as_deref(),
                payload: &msg.payload,
            },
        );
        seg.offsets.push(offset);
        seg.len += len;
        seg.last_ts = ts;
        seg.live += 1;
        self.last_seq = seq;
        self.last_ts = ts;
        self.msgs += 1;
        self.bytes += len;
        if let Some(id) = id {
            self.dedup.ids.insert(id.to_string(), seq);
            self.dedup.order.push_back((ts, seq, id.to_string()));
        }
        if self.wbuf.len() >= WBUF_FLUSH {
            self.flush().map_err(io_err)?;
        }
        Ok(PubAck {
            seq,
            duplicate: false,
        })
    }

    fn run_repairs(&mut self) -> io::Result<()> {
        while let Some(r) = self.repairs.first().cloned() {
            match &r {
                Repair::Truncate(name, len) => {
                    self.backend.truncate(name, *len)?;
                    self.backend.sync(name)?;
                }
                Repair::Remove(name) => self.backend.remove(name)?,
            }
            self.repairs.remove(0);
        }
        Ok(())
    }

    /// Hands buffered appends to the backend (no fsync).
    pub fn flush(&mut self) -> io::Result<()> {
        self.run_repairs()?;
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let Some(seg) = self.segs.back_mut() else {
            self.wbuf.clear();
            return Ok(());
        };
        let name = segment_name(seg.base);
        if !seg.created {
            self.backend.create(&name)?;
            seg.created = true;
        }
        if !self.unsynced.contains(&seg.base) {
            self.unsynced.push(seg.base);
        }
        self.backend.append(&name, &self.wbuf)?;
        seg.flushed += self.wbuf.len() as u64;
        self.wbuf.clear();
        Ok(())
    }

    /// Flushes and fsyncs every segment written since the last sync.
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        while let Some(&base) = self.unsynced.first() {
            if self.segs.iter().any(|s| s.base == base) {
                self.backend.sync(&segment_name(base))?;
            }
            self.unsynced.remove(0);
        }
        Ok(())
    }

    /// Undoes every append after `mark`: memory state, buffered bytes and
    /// file bytes. If the file operations fail they are retried before the
    /// next write, so half-written records never stay.
    pub fn rollback(&mut self, mark: Mark) {
        while self.segs.back().is_some_and(|s| s.base > mark.last_seq) {
            if let Some(seg) = self.segs.pop_back() {
                self.msgs = self.msgs.saturating_sub(seg.live);
                let n = seg.offsets.len();
                self.bytes = self
                    .bytes
                    .saturating_sub(seg.offset(n).saturating_sub(seg.offset(0)));
                self.wbuf.clear();
                if seg.created {
                    self.repairs.push(Repair::Remove(segment_name(seg.base)));
                }
            }
        }
        if let Some(seg) = self.segs.back_mut() {
            let keep = usize::try_from((mark.last_seq + 1).saturating_sub(seg.base))
                .unwrap_or(usize::MAX)
                .min(seg.offsets.len());
            for i in keep..seg.offsets.len() {
                if !seg.is_deleted(i) && seg.base + i as u64 >= self.first_seq {
                    seg.live = seg.live.saturating_sub(1);
                    self.msgs = self.msgs.saturating_sub(1);
                    self.bytes = self.bytes.saturating_sub(seg.rec_size(i));
                }
            }
            let new_len = seg.offset(keep);
            seg.offsets.truncate(keep);
            if new_len < seg.flushed {
                self.wbuf.clear();
                seg.flushed = new_len;
            } else {
                self.wbuf
                    .truncate(usize::try_from(new_len - seg.flushed).unwrap_or(usize::MAX));
            }
            seg.len = new_len;
            if let Some(t) = mark.seg_last_ts {
                seg.last_ts = t;
            }
            if seg.created {
                // The backend may hold a partial write beyond `flushed`.
                self.repairs
                    .push(Repair::Truncate(segment_name(seg.base), seg.flushed));
            }
        }
        self.last_seq = mark.last_seq;
        self.last_ts = mark.last_ts;
        self.first_seq = self.first_seq.min(self.last_seq + 1);
        self.dedup.forget_after(mark.last_seq);
        if let Err(e) = self.run_repairs() {
            log::error!("rolling back a failed write: {e}; will retry before the next write");
        }
    }

    fn seg_index(&self, seq: u64) -> Option<usize> {
        let i = self
            .segs
            .partition_point(|s| s.base <= seq)
            .checked_sub(1)?;
        (seq < self.segs.get(i)?.end()).then_some(i)
    }

    /// Moves `first_seq` past gaps and deleted records.
    fn advance_first(&mut self) {
        while self.first_seq <= self.last_seq {
            match self.seg_index(self.first_seq) {
                Some(si) => {
                    let seg = &self.segs[si];
                    if !seg.is_deleted((self.first_seq - seg.base) as usize) {
                        return;
                    }
                    self.first_seq += 1;
                }
                None => {
                    let next = self
                        .segs
                        .iter()
                        .find(|s| s.base > self.first_seq && !s.offsets.is_empty())
                        .map(|s| s.base);
                    self.first_seq = next.unwrap_or(self.last_seq + 1);
                }
            }
        }
    }

    /// Deletes front segments with no live records (meta first).
    fn drop_dead_segments(&mut self) {
        while let Some(seg) = self.segs.front() {
            let dead = seg.live == 0 && seg.end() <= self.first_seq;
            if !dead {
                return;
            }
            if self.segs.len() == 1 {
                // The active segment: its buffered bytes go with it.
                self.wbuf.clear();
            }
            let name = segment_name(seg.base);
            let created = seg.created;
            if created {
                let meta = encode_meta(self.first_seq, self.last_seq);
                if let Err(e) = self.backend.write_atomic(META_NAME, &meta) {
                    log::warn!(
                        "cannot write stream meta file: {e}; keeping segment {name} for now"
                    );
                    return;
                }
                if let Err(e) = self.backend.remove(&name) {
                    log::warn!("cannot remove segment {name}: {e}; will retry");
                    return;
                }
            }
            self.segs.pop_front();
        }
    }

    /// Removes the oldest message. Returns false if the stream is empty.
    fn remove_first(&mut self) -> bool {
        if self.msgs == 0 {
            return false;
        }
        let Some(si) = self.seg_index(self.first_seq) else {
            return false;
        };
        let seg = &mut self.segs[si];
        let i = (self.first_seq - seg.base) as usize;
        self.bytes = self.bytes.saturating_sub(seg.rec_size(i));
        seg.live = seg.live.saturating_sub(1);
        self.msgs -= 1;
        self.first_seq += 1;
        self.advance_first();
        true
    }

    /// Reads the raw bytes of records `i..j` of segment `si` into scratch.
    fn read_span(&mut self, si: usize, i: usize, j: usize) -> io::Result<()> {
        let seg = &self.segs[si];
        let (start, end) = (seg.offset(i), seg.offset(j));
        let name = segment_name(seg.base);
        self.scratch.clear();
        self.scratch
            .resize(usize::try_from(end - start).unwrap_or(0), 0);
        self.backend.read_at(&name, start, &mut self.scratch)
    }

    /// Timestamp of the oldest live message.
    fn first_ts(&mut self) -> Option<u64> {
        let si = self.seg_index(self.first_seq)?;
        let i = (self.first_seq - self.segs[si].base) as usize;
        if self.segs[si].offset(i) >= self.segs[si].flushed {
            // Not on disk yet: it is as new as the newest record.
            return Some(self.segs[si].last_ts);
        }
        if let Err(e) = self.read_span(si, i, i + 1) {
            log::warn!("reading the oldest message's timestamp: {e}");
            return None;
        }
        let seg = &self.segs[si];
        match record::decode(&self.scratch, seg.base, seg.base_ts) {
            Ok((r, _)) => Some(r.timestamp),
            // A damaged oldest record: treat it as expired.
            Err(_) => Some(0),
        }
    }

    /// Applies max_msgs / max_bytes (discard = old) and max_age as of `now`.
    /// Returns how many messages were removed.
    pub fn enforce_limits(&mut self, now: u64) -> u64 {
        let mut removed = 0;
        if self.opts.discard == Discard::Old {
            loop {
                let o = &self.opts;
                let over = (o.max_msgs > 0 && self.msgs > o.max_msgs)
                    || (o.max_bytes > 0 && self.bytes > o.max_bytes);
                if !over || !self.remove_first() {
                    break;
                }
                removed += 1;
            }
        }
        if !self.opts.max_age.is_zero() {
            let age = u64::try_from(self.opts.max_age.as_nanos()).unwrap_or(u64::MAX);
            let cutoff = now.saturating_sub(age);
            // Whole segments first (no reads), then record by record.
            while let Some(si) = self.seg_index(self.first_seq) {
                if self.segs[si].last_ts >= cutoff {
                    break;
                }
                let before = removed;
                while self.seg_index(self.first_seq) == Some(si) && self.remove_first() {
                    removed += 1;
                }
                if removed == before {
                    break;
                }
            }
            while self.first_ts().is_some_and(|ts| ts < cutoff) && self.remove_first() {
                removed += 1;
            }
        }
        self.drop_dead_segments();
        removed
    }

    /// Up to `max_msgs` messages with `from <= seq <= upto`, about
    /// `max_bytes` of records (at least one if any). Records that fail their
    /// checksum are deleted and skipped (logged), never returned.
    pub fn read(
        &mut self,
        from: u64,
        max_msgs: usize,
        max_bytes: usize,
        upto: u64,
    ) -> io::Result<Vec<StoredMessage>> {
        let upto = upto.min(self.last_seq);
        let mut seq = from.max(self.first_seq);
        let mut out = Vec::new();
        let mut used = 0u64;
        let mut bad = Vec::new();
        if self.segs.back().is_some_and(|s| s.flushed < s.len) && upto >= seq {
            self.flush()?;
        }
        while seq <= upto && out.len() < max_msgs {
            let si = match self.seg_index(seq) {
                Some(si) => si,
                None => match self.segs.iter().position(|s| s.base > seq) {
                    Some(si) => {
                        seq = self.segs[si].base;
                        continue;
                    }
                    None => break,
                },
            };
            let seg = &self.segs[si];
            let i0 = (seq - seg.base) as usize;
            let mut j = i0;
            let mut n = out.len();
            while j < seg.offsets.len() && seg.base + (j as u64) <= upto && n < max_msgs {
                let sz = seg.rec_size(j);
                if n > 0 && used + sz > max_bytes as u64 {
                    break;
                }
                if !seg.is_deleted(j) {
                    used += sz;
                    n += 1;
                }
                j += 1;
            }
            if j == i0 {
                break;
            }
            self.read_span(si, i0, j)?;
            let seg = &self.segs[si];
            let start = seg.offset(i0);
            for i in i0..j {
                if seg.is_deleted(i) {
                    continue;
                }
                let at = (seg.offset(i) - start) as usize;
                let q = seg.base + i as u64;
                let decoded = self
                    .scratch
                    .get(at..)
                    .ok_or(record::DecodeError::Incomplete)
                    .and_then(|b| record::decode(b, seg.base, seg.base_ts))
                    .ok()
                    .filter(|(r, _)| r.seq == q)
                    .and_then(|(r, _)| {
                        Some(StoredMessage {
                            seq: r.seq,
                            timestamp: r.timestamp,
                            subject: String::from_utf8(r.subject.to_vec()).ok()?,
                            headers: r.headers.map(<[u8]>::to_vec),
                            payload: r.payload.to_vec(),
                        })
                    });
                match decoded {
                    Some(m) => out.push(m),
                    None => bad.push(q),
                }
            }
            seq = seg.base + j as u64;
            if out.len() >= max_msgs || (used >= max_bytes as u64 && !out.is_empty()) {
                break;
            }
        }
        for q in bad {
            log::error!("message {q} fails its checksum on read; deleting it");
            self.delete(q);
        }
        Ok(out)
    }

    /// Deletes one message (interior tombstone). Returns false if absent.
    pub fn delete(&mut self, seq: u64) -> bool {
        if seq < self.first_seq {
            return false;
        }
        let Some(si) = self.seg_index(seq) else {
            return false;
        };
        let seg = &mut self.segs[si];
        let i = (seq - seg.base) as usize;
        if seg.is_deleted(i) {
            return false;
        }
        seg.set_deleted(i);
        seg.live = seg.live.saturating_sub(1);
        self.msgs = self.msgs.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(seg.rec_size(i));
        if seq == self.first_seq {
            self.advance_first();
        }
        self.drop_dead_segments();
        true
    }

    /// Flush, sync and record first/last sequence in `meta`.
    pub fn close(&mut self) -> io::Result<()> {
        self.sync()?;
        self.backend
            .write_atomic(META_NAME, &encode_meta(self.first_seq, self.last_seq))
    }
}

#[cfg(test)]
mod tests;
