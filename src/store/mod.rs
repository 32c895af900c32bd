//! The segmented, checksummed stream store and its crash recovery.
//!
//! Owns every file in one stream's directory (through a [`Backend`]):
//! segment files `<first seq, 20 digits>.seg`, their index snapshots
//! (`.idx`) and tombstone files (`.del`), and the `meta` file. The byte
//! layout, invariants and recovery procedure are in `docs/store-format.md`.
//! Plain std, no async, no clock: every call that needs the time takes
//! `now` (unix nanoseconds) from the caller.
//!
//! Invariants:
//! - Sequences strictly increase inside a segment (record `i` of the index
//!   has seq `base + i`; compaction leaves zero-size gaps) and across
//!   segments, and are never reused, even after every message was removed
//!   and the stream restarted (the `meta` file keeps `last_seq` when
//!   segments are dropped, at purges and at close).
//! - Timestamps never decrease (`max(now, previous)`), so age limits remove
//!   a prefix.
//! - Records with `seq < first_seq` are removed; a segment whose records are
//!   all removed is deleted (after `meta` records the new `first_seq`).
//!   Interior removals are tombstoned in `<base>.del` before the next sync.
//! - An `.idx` snapshot is trusted only if it matches its segment file
//!   (length, header, last record's checksum); otherwise the segment is
//!   scanned.
//! - Per-subject state (first, last, count) counts exactly the live
//!   records (see [`subjects`]).
//! - Opening never fails on damaged data, only on real I/O errors: a torn or
//!   corrupt tail is cut and reported, nothing that fails its checksum is
//!   ever returned.
//! - Between [`Store::mark`] and [`Store::commit`]/[`Store::rollback`] only
//!   appends happen; a rollback removes every byte written since the mark.
//!   Removals caused by appends (per-subject limits, rollups) are applied
//!   after the batch committed, in [`Store::enforce_limits`].

pub mod backend;
pub mod crypt;
pub mod index;
pub mod record;
pub mod subjects;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::time::Duration;

pub use backend::{Backend, FsBackend, MemBackend};

use crate::stream::headers::{self, Rollup, Ttl};
use crate::stream::{
    Discard, Message, PubAck, PurgeRequest, RecoveryReport, Retention, StoredMessage, StreamConfig,
    StreamError, StreamInfo, StreamState,
};
use crypt::Key;
use index::{SegIndex, Slot};
use record::{RecordRef, SealInfo, SegHeader, SEG_HEADER_LEN};
use subjects::SubjectTable;

/// Default segment size.
pub const DEFAULT_SEGMENT_SIZE: u64 = 4 << 20;
/// Smallest segment size chosen for small `max_bytes`.
pub const MIN_SEGMENT_SIZE: u64 = 64 << 10;
/// The append buffer is written out when it grows past this.
const WBUF_FLUSH: usize = 1 << 20;
/// Name of the metadata file.
pub const META_NAME: &str = "meta";
/// Name of the file recording the stream's retention policy (`limits`,
/// `interest` or `workqueue`), so a config change JetStream would refuse
/// is refused at open.
pub const RETENTION_NAME: &str = "retention";

fn retention_name(r: Retention) -> &'static str {
    match r {
        Retention::Limits => "limits",
        Retention::Interest => "interest",
        Retention::WorkQueue => "workqueue",
    }
}

/// JetStream's rule: a stream's retention may change between `limits` and
/// `interest`, never to or from `workqueue` (its messages were removed by
/// acks with other meaning).
fn check_retention_change(stream: &str, stored: &[u8], now: Retention) -> io::Result<()> {
    let was = String::from_utf8_lossy(stored).trim().to_string();
    let is = retention_name(now);
    if was != is && (was == "workqueue" || is == "workqueue") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "stream {stream}: retention cannot change from {was:?} to {is:?} (to or from workqueue is refused, as in JetStream); set it back, or remove the stream's directory to start it anew"
            ),
        ));
    }
    Ok(())
}
const META_MAGIC: &[u8; 8] = b"FRNDMET1";
const META_LEN: usize = 28;
/// A sealed segment is compacted when live records use at most
/// 1/COMPACT_RATIO of its record bytes.
const COMPACT_RATIO: u64 = 4;
/// Magic of an encrypted index snapshot.
const IDX_SEALED_MAGIC: &[u8; 8] = b"FRNDIDXE";

/// The store's view of a stream configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreOptions {
    /// For `Nats-Expected-Stream`.
    pub stream_name: String,
    /// 0 = unlimited, for every limit.
    pub max_msgs: u64,
    pub max_bytes: u64,
    pub max_age: Duration,
    pub max_msg_size: u64,
    pub max_msgs_per_subject: u64,
    pub discard: Discard,
    /// With `discard = New`: reject a message whose subject already holds
    /// `max_msgs_per_subject` messages (else the subject's oldest goes).
    pub discard_new_per_subject: bool,
    pub duplicate_window: Duration,
    pub retention: Retention,
    pub allow_rollup: bool,
    pub deny_delete: bool,
    pub deny_purge: bool,
    pub allow_msg_ttl: bool,
    /// A new segment starts when the next record would make the current
    /// one larger than this (a single bigger record gets its own segment).
    pub segment_size: u64,
    /// The stream key: needed to read encrypted segments.
    pub key: Option<Key>,
    /// New segments are encrypted with `key` (which must be set).
    pub encrypt: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            stream_name: String::new(),
            max_msgs: 0,
            max_bytes: 0,
            max_age: Duration::ZERO,
            max_msg_size: 0,
            max_msgs_per_subject: 0,
            discard: Discard::Old,
            discard_new_per_subject: false,
            duplicate_window: Duration::ZERO,
            retention: Retention::Limits,
            allow_rollup: false,
            deny_delete: false,
            deny_purge: false,
            allow_msg_ttl: false,
            segment_size: DEFAULT_SEGMENT_SIZE,
            key: None,
            encrypt: false,
        }
    }
}

impl StoreOptions {
    pub fn from_config(cfg: &StreamConfig) -> StoreOptions {
        let segment_size = if cfg.max_bytes == 0 {
            DEFAULT_SEGMENT_SIZE
        } else {
            (cfg.max_bytes / 8).clamp(MIN_SEGMENT_SIZE, DEFAULT_SEGMENT_SIZE)
        };
        StoreOptions {
            stream_name: cfg.name.clone(),
            max_msgs: cfg.max_msgs,
            max_bytes: cfg.max_bytes,
            max_age: cfg.max_age,
            max_msg_size: cfg.max_msg_size,
            max_msgs_per_subject: cfg.max_msgs_per_subject,
            discard: cfg.discard,
            discard_new_per_subject: cfg.discard_new_per_subject,
            duplicate_window: cfg.duplicate_window,
            retention: cfg.retention,
            allow_rollup: cfg.allow_rollup,
            deny_delete: cfg.deny_delete,
            deny_purge: cfg.deny_purge,
            allow_msg_ttl: cfg.allow_msg_ttl,
            segment_size,
            key: cfg.key.clone(),
            encrypt: cfg.encrypt && cfg.key.is_some(),
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
    /// Offset of the record with seq `base + i` (a gap has the offset of
    /// the next record, so its size is 0).
    offsets: Vec<u32>,
    /// Subject id of record `i` (meaningless once the record is removed).
    sids: Vec<u32>,
    /// Interior deletions and gaps (bit `i` = seq `base + i`), allocated on
    /// first use.
    deleted: Option<Vec<u64>>,
    /// Records neither deleted nor below `first_seq`.
    live: u64,
    /// An `.idx` matching the current file exists.
    indexed: bool,
    /// The `.del` file exists.
    has_tombs: bool,
    /// Salt and key check of an encrypted segment.
    seal: Option<SealInfo>,
    /// Never append again (an encrypted segment that was truncated or
    /// reopened: its next offsets may have been used for other bytes).
    no_append: bool,
}

impl Segment {
    fn new(base: u64, base_ts: u64, seal: Option<SealInfo>) -> Segment {
        Segment {
            base,
            base_ts,
            last_ts: base_ts,
            len: record::header_len(seal.is_some()) as u64,
            seal,
            no_append: false,
            flushed: 0,
            created: false,
            offsets: Vec::new(),
            sids: Vec::new(),
            deleted: None,
            live: 0,
            indexed: false,
            has_tombs: false,
        }
    }

    fn end(&self) -> u64 {
        self.base + self.offsets.len() as u64
    }

    fn header_len(&self) -> u64 {
        record::header_len(self.seal.is_some()) as u64
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

    fn sid(&self, i: usize) -> u32 {
        self.sids.get(i).copied().unwrap_or(u32::MAX)
    }
}

/// The key and salt to decode segment `seg`'s records with (`None`: plain,
/// or encrypted without a key, which open refuses).
fn sealing<'a>(key: &'a Option<Key>, seg: &'a Segment) -> record::Sealing<'a> {
    match (key, &seg.seal) {
        (Some(k), Some(si)) => Some((k, &si.salt)),
        _ => None,
    }
}

/// A segment file name for a base sequence.
pub fn segment_name(base: u64) -> String {
    format!("{base:020}.seg")
}

fn index_name(base: u64) -> String {
    format!("{base:020}.idx")
}

fn tomb_name(base: u64) -> String {
    format!("{base:020}.del")
}

fn parse_name(name: &str) -> Option<(u64, &str)> {
    let (digits, ext) = name.split_once('.')?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, ext))
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
    if !headers::has_nats(headers) {
        return None;
    }
    headers::header(headers, headers::MSG_ID)
}

/// Per-message expiry (unix ns) from a stored record's `Nats-TTL`.
fn ttl_expiry(headers: Option<&[u8]>, ts: u64) -> Option<u64> {
    if !headers::has_nats(headers?) {
        return None;
    }
    match headers::parse_ttl(headers::header(headers?, headers::TTL)?) {
        Ok(Ttl::After(d)) => {
            Some(ts.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
        }
        _ => None,
    }
}

/// Recently seen message ids.
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

    fn insert(&mut self, id: &str, ts: u64, seq: u64) {
        self.ids.insert(id.to_string(), seq);
        self.order.push_back((ts, seq, id.to_string()));
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    last_seq: u64,
    last_ts: u64,
    seg_last_ts: Option<u64>,
    last_msg_id: Option<String>,
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
    /// Files (segments and tombstone files) written since the last sync.
    unsynced: Vec<String>,
    repairs: Vec<Repair>,
    dedup: Dedup,
    scratch: Vec<u8>,
    subjects: SubjectTable,
    /// `Nats-Msg-Id` of the newest message (for Nats-Expected-Last-Msg-Id).
    last_msg_id: Option<String>,
    /// Per-message TTLs: (expiry, seq) and seq -> expiry.
    ttl_queue: BTreeSet<(u64, u64)>,
    ttl_of: BTreeMap<u64, u64>,
    /// Tombstones not yet written: (segment base, slot).
    tombs: Vec<(u64, u32)>,
    /// Rollups appended but not applied yet (applied after the commit).
    rollups: Vec<(u64, Rollup)>,
    /// Subjects that may be over `max_msgs_per_subject`.
    over_subjects: Vec<u32>,
    /// Segments to check for compaction.
    compact: BTreeSet<u64>,
    /// Bumped by every removal of a live record and every rollback.
    removals: u64,
    upto_memo: std::cell::Cell<Option<UptoMemo>>,
}

/// Live records and bytes with `upto < seq <= scanned`, valid while
/// `removals` is unchanged.
#[derive(Debug, Clone, Copy)]
struct UptoMemo {
    upto: u64,
    scanned: u64,
    removals: u64,
    msgs: u64,
    bytes: u64,
}

fn io_err(e: io::Error) -> StreamError {
    StreamError::Io(e)
}

/// What recovery collected from one segment (index or scan).
struct Loaded {
    ix: SegIndex,
    seal: Option<SealInfo>,
    indexed: bool,
    tombs: Vec<u32>,
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
            subjects: SubjectTable::default(),
            last_msg_id: None,
            ttl_queue: BTreeSet::new(),
            ttl_of: BTreeMap::new(),
            tombs: Vec::new(),
            rollups: Vec::new(),
            over_subjects: Vec::new(),
            compact: BTreeSet::new(),
            removals: 0,
            upto_memo: std::cell::Cell::new(None),
        };
        let report = st.recover(now)?;
        st.enforce_limits(now);
        Ok((st, report))
    }

    fn read_file(&mut self, name: &str) -> io::Result<Vec<u8>> {
        let len = self.backend.len(name)?;
        let ulen =
            usize::try_from(len).map_err(|_| io::Error::other(format!("file {name} too large")))?;
        let mut b = vec![0u8; ulen];
        self.backend.read_at(name, 0, &mut b)?;
        Ok(b)
    }

    /// Uses `<base>.idx` if it matches the segment file exactly.
    fn try_index(
        &mut self,
        base: u64,
        len: u64,
        prev_end: u64,
    ) -> io::Result<Option<(SegIndex, SegHeader)>> {
        let raw = self.read_file(&index_name(base))?;
        let plain = if raw.starts_with(IDX_SEALED_MAGIC) {
            match &self.opts.key {
                Some(k) => k.open_blob(IDX_SEALED_MAGIC, &raw),
                None => None,
            }
        } else {
            Some(raw)
        };
        let Some(ix) = plain.and_then(|p| index::decode_index(&p)) else {
            return Ok(None);
        };
        if ix.base != base || ix.len != len || base < prev_end || len < SEG_HEADER_LEN as u64 {
            return Ok(None);
        }
        let mut h = vec![0u8; (len as usize).min(record::SEALED_HEADER_LEN)];
        self.backend.read_at(&segment_name(base), 0, &mut h)?;
        let hd = match record::decode_header(&h) {
            Ok(hd) if hd.base_seq == base && hd.base_ts == ix.base_ts => hd,
            _ => return Ok(None),
        };
        self.check_seal(&segment_name(base), &hd.seal)?;
        let total: u64 = ix
            .slots
            .iter()
            .map(|s| match *s {
                Slot::Live { size, .. } | Slot::Dead { size } => u64::from(size),
            })
            .sum();
        if hd.header_len() as u64 + total != len {
            return Ok(None);
        }
        let last = ix.slots.iter().rev().find_map(|s| match *s {
            Slot::Live { size, .. } | Slot::Dead { size } => (size > 0).then_some(size),
        });
        if let Some(size) = last {
            let size = u64::from(size);
            let (total, check) = self.record_check(base, hd.seal.is_some(), len - size, size)?;
            if total != size || check != ix.last_crc {
                return Ok(None);
            }
        } else if ix.last_crc != 0 {
            return Ok(None);
        }
        Ok(Some((ix, hd)))
    }

    /// Length (from its length field) and check word (plain: the crc;
    /// encrypted: the last 4 bytes of the tag) of the record of `size`
    /// bytes at `off` in segment `base`.
    fn record_check(
        &mut self,
        base: u64,
        sealed: bool,
        off: u64,
        size: u64,
    ) -> io::Result<(u64, u32)> {
        let name = segment_name(base);
        if !sealed {
            let mut p = [0u8; record::PREFIX_LEN];
            self.backend.read_at(&name, off, &mut p)?;
            let body = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
            let crc = u32::from_le_bytes([p[4], p[5], p[6], p[7]]);
            return Ok((u64::from(body) + record::PREFIX_LEN as u64, crc));
        }
        if size < 4 {
            return Ok((0, 0));
        }
        let mut p = vec![0u8; size.min(5) as usize];
        self.backend.read_at(&name, off, &mut p)?;
        let total = record::peek_len_sealed(&p).map_or(0, |(_, t)| t as u64);
        let mut t = [0u8; 4];
        self.backend.read_at(&name, off + size - 4, &mut t)?;
        Ok((total, u32::from_le_bytes(t)))
    }

    /// Refuses an encrypted segment the configured key did not write:
    /// reading on would find every record "corrupt" and cut them.
    fn check_seal(&self, name: &str, seal: &Option<SealInfo>) -> io::Result<()> {
        let Some(si) = seal else {
            return Ok(());
        };
        let stream = &self.opts.stream_name;
        match &self.opts.key {
            None => Err(io::Error::other(format!(
                "stream {stream}: segment {name} is encrypted but no encryption_key_file is \
                 configured; configure the key file the stream was written with"
            ))),
            Some(k) if k.check_value(&si.salt) != si.check => Err(io::Error::other(format!(
                "stream {stream}: the key in {} is not the key segment {name} was encrypted \
                 with; configure the right encryption_key_file (nothing was changed on disk)",
                k.source()
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Checks the stream's key check file against the configured key.
    /// `Ok(true)`: a stream that encrypts and has no (valid) file; write one
    /// once the segments were accepted.
    fn check_keycheck(&mut self, file: Option<Vec<u8>>) -> io::Result<bool> {
        let Some(key) = self.opts.key.clone() else {
            return Ok(false);
        };
        let stream = &self.opts.stream_name;
        match file.as_deref().map(|b| key.matches_keycheck(b)) {
            Some(Some(true)) => Ok(false),
            Some(Some(false)) if self.opts.encrypt => Err(io::Error::other(format!(
                "stream {stream}: the key in {} is not the key this stream was encrypted with \
                 (its {} file says so); configure the right encryption_key_file, or delete that \
                 file if the stream holds no encrypted data any more",
                key.source(),
                crypt::KEYCHECK_NAME
            ))),
            Some(Some(false)) => Ok(false),
            _ if self.opts.encrypt => {
                if file.is_some() {
                    log::warn!(
                        "stream {stream}: {} file damaged; rewriting it",
                        crypt::KEYCHECK_NAME
                    );
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn recover(&mut self, now: u64) -> io::Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        let mut bases = Vec::new();
        let mut idx_files = BTreeSet::new();
        let mut del_files = BTreeSet::new();
        let mut meta = None;
        let mut keycheck = None;
        let mut stored_retention = None;
        for name in self.backend.list()? {
            match parse_name(&name) {
                Some((base, "seg")) => bases.push(base),
                Some((base, "idx")) => {
                    idx_files.insert(base);
                }
                Some((base, "del")) => {
                    del_files.insert(base);
                }
                _ if name == META_NAME => {
                    let b = self.read_file(&name)?;
                    meta = decode_meta(&b);
                    if meta.is_none() {
                        log::warn!("stream meta file is damaged; ignoring it (sequences are recovered from the segments)");
                    }
                }
                _ if name == crypt::KEYCHECK_NAME => keycheck = Some(self.read_file(&name)?),
                _ if name == RETENTION_NAME => {
                    let b = self.read_file(&name)?;
                    check_retention_change(&self.opts.stream_name, &b, self.opts.retention)?;
                    stored_retention = Some(b);
                }
                _ if name.ends_with(".tmp") => self.backend.remove(&name)?,
                _ => {}
            }
        }
        let write_keycheck = self.check_keycheck(keycheck)?;
        bases.sort_unstable();
        // Every encrypted segment's key check first: a wrong key must not
        // get as far as cutting "corrupt" records anywhere.
        for &base in &bases {
            let name = segment_name(base);
            let len = self.backend.len(&name)?;
            let mut h = vec![0u8; len.min(record::SEALED_HEADER_LEN as u64) as usize];
            self.backend.read_at(&name, 0, &mut h)?;
            if let Ok(hd) = record::decode_header(&h) {
                self.check_seal(&name, &hd.seal)?;
            }
        }
        let mut loaded: Vec<Loaded> = Vec::new();
        for (k, &base) in bases.iter().enumerate() {
            let name = segment_name(base);
            let next_base = bases.get(k + 1).copied();
            let is_last = next_base.is_none();
            let len = self.backend.len(&name)?;
            let prev_end = loaded
                .last()
                .map_or(0, |l| l.ix.base + l.ix.slots.len() as u64);
            let mut ix = None;
            if idx_files.contains(&base) {
                ix = self.try_index(base, len, prev_end)?;
                if ix.is_none() {
                    log::info!("segment {name}: index snapshot does not match; scanning");
                }
                if is_last || ix.is_none() {
                    // The active segment changes from now on: its snapshot
                    // is rewritten at close.
                    self.backend.remove(&index_name(base))?;
                }
            }
            let indexed = ix.is_some() && !is_last;
            let (ix, header) = match ix {
                Some(ix) => ix,
                None => {
                    let buf = self.read_file(&name)?;
                    match self.scan(&name, base, buf, prev_end, next_base, &mut report)? {
                        Some(ix) => ix,
                        None => continue,
                    }
                }
            };
            if ix.slots.is_empty() && !is_last {
                self.remove_segment_files(base)?;
                continue;
            }
            let tombs = if del_files.contains(&base) {
                let b = self.read_file(&tomb_name(base))?;
                let (t, damaged) = index::decode_tombs(base, &b);
                if damaged {
                    log::warn!("segment {name}: tombstone file damaged after {} entries; deleted messages past that may reappear", t.len());
                }
                t
            } else {
                Vec::new()
            };
            loaded.push(Loaded {
                ix,
                seal: header.seal,
                indexed,
                tombs,
            });
        }
        // Orphan snapshots and tombstones (their segment is gone).
        for base in idx_files.iter().chain(del_files.iter()) {
            if !loaded.iter().any(|l| l.ix.base == *base) {
                self.backend.remove(&index_name(*base))?;
                self.backend.remove(&tomb_name(*base))?;
            }
        }
        let (meta_first, meta_last) = meta.unwrap_or((1, 0));
        let seg_last = loaded.last().map_or(0, |l| {
            (l.ix.base + l.ix.slots.len() as u64).saturating_sub(1)
        });
        self.last_seq = meta_last.max(seg_last);
        self.last_ts = loaded.last().map_or(0, |l| l.ix.last_ts);
        self.first_seq = meta_first
            .max(loaded.first().map_or(1, |l| l.ix.base))
            .max(1)
            .min(self.last_seq + 1);
        let cutoff = now.saturating_sub(self.dedup.window);
        for l in loaded {
            self.install(l, cutoff);
        }
        report.records = self.msgs;
        if let (true, Some(k)) = (write_keycheck, &self.opts.key) {
            let b = k.keycheck()?;
            self.backend.write_atomic(crypt::KEYCHECK_NAME, &b)?;
        }
        let retention = retention_name(self.opts.retention).as_bytes();
        if stored_retention.as_deref() != Some(retention) {
            self.backend.write_atomic(RETENTION_NAME, retention)?;
        }
        if let Some(seg) = self.segs.back_mut() {
            // Its tail may have held other bytes before a crash (a torn or
            // lost write): never encrypt new records at those offsets.
            seg.no_append = seg.seal.is_some();
        }
        self.advance_first();
        self.drop_dead_segments();
        for id in self.subjects.iter().map(|(id, _)| id).collect::<Vec<_>>() {
            self.over_subjects.push(id);
        }
        Ok(report)
    }

    /// Reads a segment record by record. `None`: the file was unusable and
    /// removed.
    fn scan(
        &mut self,
        name: &str,
        base: u64,
        mut buf: Vec<u8>,
        prev_end: u64,
        next_base: Option<u64>,
        report: &mut RecoveryReport,
    ) -> io::Result<Option<(SegIndex, SegHeader)>> {
        let len = buf.len() as u64;
        let header = record::decode_header(&buf)
            .ok()
            .filter(|h| h.base_seq == base && base >= prev_end);
        let Some(h) = header else {
            if let Some(nb) = next_base {
                report.lost_records += nb.saturating_sub(base);
            }
            report.truncated_bytes += len;
            log::error!("segment {name}: header damaged; removing the file ({len} bytes)");
            self.remove_segment_files(base)?;
            return Ok(None);
        };
        let mut ix = SegIndex {
            base,
            base_ts: h.base_ts,
            last_ts: h.base_ts,
            ..SegIndex::default()
        };
        self.check_seal(name, &h.seal)?;
        let key = self.opts.key.clone();
        let seal = match (&key, &h.seal) {
            (Some(k), Some(si)) => Some((k, &si.salt)),
            _ => None,
        };
        let mut local: HashMap<String, u32> = HashMap::new();
        let mut pos = h.header_len();
        let mut cut = None;
        while pos < buf.len() {
            let expect = base + ix.slots.len() as u64;
            match record::decode_any(&mut buf[pos..], base, h.base_ts, seal, pos as u64) {
                Ok((rec, n)) if rec.seq >= expect && u32::try_from(pos + n).is_ok() => {
                    // A gap: slots removed by compaction.
                    let gap = usize::try_from(rec.seq - expect).unwrap_or(usize::MAX);
                    if gap > u32::MAX as usize {
                        cut = Some("record sequence out of range");
                        break;
                    }
                    ix.slots
                        .resize(ix.slots.len() + gap, Slot::Dead { size: 0 });
                    let subj = String::from_utf8_lossy(rec.subject);
                    let next = local.len() as u32;
                    let subject = *local.entry(subj.into_owned()).or_insert(next);
                    let slot = ix.slots.len() as u32;
                    ix.slots.push(Slot::Live {
                        size: n as u32,
                        subject,
                    });
                    ix.last_ts = ix.last_ts.max(rec.timestamp);
                    if let Some(h) = rec.headers {
                        if let Some(exp) = ttl_expiry(Some(h), rec.timestamp) {
                            ix.ttls.push((slot, exp));
                        }
                        if let Some(id) = msg_id(h) {
                            ix.msg_ids.push((slot, rec.timestamp, id.to_string()));
                        }
                    }
                    // Plain: the crc; encrypted: the tag's last 4 bytes.
                    let w = if seal.is_some() { pos + n - 4 } else { pos + 4 };
                    ix.last_crc = buf
                        .get(w..w + 4)
                        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
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
        let mut subjects = vec![String::new(); local.len()];
        for (s, i) in local {
            if let Some(slot) = subjects.get_mut(i as usize) {
                *slot = s;
            }
        }
        ix.subjects = subjects;
        ix.len = pos as u64;
        if let Some(why) = cut {
            let dropped = len - pos as u64;
            report.truncated_bytes += dropped;
            if let Some(nb) = next_base {
                report.lost_records += nb.saturating_sub(base + ix.slots.len() as u64);
            }
            log::warn!(
                "segment {name}: {why} at offset {pos}; cutting {dropped} bytes{}",
                if next_base.is_none() {
                    " (unacknowledged tail)"
                } else {
                    ""
                }
            );
            self.backend.truncate(name, pos as u64)?;
            self.backend.sync(name)?;
        }
        Ok(Some((ix, h)))
    }

    /// Turns a loaded segment into memory state (first/last seq known).
    fn install(&mut self, l: Loaded, dedup_cutoff: u64) {
        let ix = l.ix;
        let mut seg = Segment::new(ix.base, ix.base_ts, l.seal);
        seg.last_ts = ix.last_ts;
        seg.len = ix.len;
        seg.flushed = ix.len;
        seg.created = true;
        seg.indexed = l.indexed;
        seg.has_tombs = !l.tombs.is_empty();
        seg.offsets.reserve_exact(ix.slots.len());
        seg.sids.reserve_exact(ix.slots.len());
        let mut off = seg.header_len();
        let mut dead = Vec::new();
        for (i, s) in ix.slots.iter().enumerate() {
            seg.offsets.push(off as u32);
            match *s {
                Slot::Live { size, subject } => {
                    off += u64::from(size);
                    seg.sids.push(subject);
                }
                Slot::Dead { size } => {
                    off += u64::from(size);
                    seg.sids.push(u32::MAX);
                    dead.push(i);
                }
            }
        }
        for i in dead {
            seg.set_deleted(i);
        }
        for &t in &l.tombs {
            if (t as usize) < seg.offsets.len() {
                seg.set_deleted(t as usize);
            }
        }
        // Local subject ids -> global, counting live records.
        let mut map: Vec<Option<u32>> = vec![None; ix.subjects.len()];
        for i in 0..seg.offsets.len() {
            let seq = seg.base + i as u64;
            if seq < self.first_seq || seg.is_deleted(i) {
                continue;
            }
            let local = seg.sids[i] as usize;
            let name = ix.subjects.get(local).map_or("", String::as_str);
            let gid = match map.get(local).copied().flatten() {
                Some(g) => {
                    if let Some(e) = self.subjects.entry_mut(g) {
                        if e.count == 0 {
                            e.first = seq;
                        }
                        e.count += 1;
                        e.last = seq;
                    }
                    g
                }
                None => {
                    let g = self.subjects.add(name, seq);
                    if let Some(m) = map.get_mut(local) {
                        *m = Some(g);
                    }
                    g
                }
            };
            seg.sids[i] = gid;
            seg.live += 1;
            self.bytes += seg.rec_size(i);
        }
        self.msgs += seg.live;
        let live = |seg: &Segment, slot: u32, first: u64| {
            let i = slot as usize;
            i < seg.offsets.len() && !seg.is_deleted(i) && seg.base + i as u64 >= first
        };
        for &(slot, exp) in &ix.ttls {
            if live(&seg, slot, self.first_seq) {
                let seq = seg.base + u64::from(slot);
                self.ttl_queue.insert((exp, seq));
                self.ttl_of.insert(seq, exp);
            }
        }
        self.last_msg_id = None;
        for (slot, ts, id) in &ix.msg_ids {
            let seq = seg.base + u64::from(*slot);
            if *ts >= dedup_cutoff && self.dedup.window > 0 {
                self.dedup.insert(id, *ts, seq);
            }
            if seq + 1 == seg.end() {
                self.last_msg_id = Some(id.clone());
            }
        }
        self.segs.push_back(seg);
    }

    fn remove_segment_files(&mut self, base: u64) -> io::Result<()> {
        self.backend.remove(&segment_name(base))?;
        self.backend.remove(&index_name(base))?;
        self.backend.remove(&tomb_name(base))
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

    /// The full state. Reads the oldest record for its timestamp.
    pub fn info(&mut self) -> StreamInfo {
        let s = self.state();
        let first_ts = if s.msgs > 0 {
            self.first_ts().unwrap_or(0)
        } else {
            0
        };
        StreamInfo {
            first_seq: s.first_seq,
            last_seq: s.last_seq,
            first_ts,
            last_ts: self.last_ts,
            msgs: s.msgs,
            bytes: s.bytes,
            deleted: (s.last_seq + 1)
                .saturating_sub(s.first_seq)
                .saturating_sub(s.msgs),
            subjects: self.subjects.len() as u64,
        }
    }

    /// The state as if nothing after `seq` had been appended yet.
    ///
    /// Called after every batch with the last durable sequence; with
    /// `sync = "<interval>"` that can lag by many records, so the live
    /// records after `seq` are counted incrementally (only the records
    /// appended since the previous call), unless something was removed or
    /// rolled back since ([`Store::removals`]).
    pub fn state_upto(&self, seq: u64) -> StreamState {
        let mut s = self.state();
        if seq >= self.last_seq {
            return s;
        }
        let (mut msgs, mut bytes, from) = match self.upto_memo.get() {
            Some(m)
                if m.upto == seq && m.removals == self.removals && m.scanned <= self.last_seq =>
            {
                (m.msgs, m.bytes, m.scanned + 1)
            }
            _ => (0, 0, seq + 1),
        };
        for seg in self.segs.iter().rev() {
            if seg.end() <= from {
                break;
            }
            let start = from.max(seg.base).max(self.first_seq);
            for q in start..seg.end() {
                let i = (q - seg.base) as usize;
                if !seg.is_deleted(i) {
                    msgs += 1;
                    bytes += seg.rec_size(i);
                }
            }
        }
        self.upto_memo.set(Some(UptoMemo {
            upto: seq,
            scanned: self.last_seq,
            removals: self.removals,
            msgs,
            bytes,
        }));
        s.msgs = s.msgs.saturating_sub(msgs);
        s.bytes = s.bytes.saturating_sub(bytes);
        s.last_seq = seq;
        s.first_seq = s.first_seq.min(seq + 1);
        s
    }

    /// [`Store::state_upto`] without the memo (for tests).
    #[cfg(test)]
    pub(crate) fn state_upto_uncached(&self, seq: u64) -> StreamState {
        self.upto_memo.set(None);
        self.state_upto(seq)
    }

    /// Bytes used by the stream's files.
    pub fn disk_usage(&mut self) -> io::Result<u64> {
        self.backend.disk_usage()
    }

    /// Timestamp (unix ns) at which the next message expires (max_age or a
    /// per-message TTL).
    pub fn next_expiry(&mut self) -> Option<u64> {
        let ttl = self.ttl_queue.first().map(|&(exp, _)| exp);
        if self.opts.max_age.is_zero() || self.msgs == 0 {
            return ttl;
        }
        let age = u64::try_from(self.opts.max_age.as_nanos()).unwrap_or(u64::MAX);
        let by_age = self.first_ts().map(|ts| ts.saturating_add(age));
        match (ttl, by_age) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The current position, for [`Store::rollback`].
    pub fn mark(&self) -> Mark {
        Mark {
            last_seq: self.last_seq,
            last_ts: self.last_ts,
            seg_last_ts: self.segs.back().map(|s| s.last_ts),
            last_msg_id: self.last_msg_id.clone(),
        }
    }

    /// Checks the JetStream `Nats-Expected-*`, `Nats-Rollup` and `Nats-TTL`
    /// headers; returns the rollup and TTL to apply.
    fn check_headers(
        &self,
        msg: &Message,
        h: &[u8],
    ) -> Result<(Option<Rollup>, Option<Duration>), StreamError> {
        if !headers::has_nats(h) {
            return Ok((None, None));
        }
        if let Some(v) = headers::header(h, headers::EXPECTED_STREAM) {
            if v != self.opts.stream_name {
                return Err(StreamError::WrongStream {
                    expected: v.to_string(),
                    actual: self.opts.stream_name.clone(),
                });
            }
        }
        let num = |name: &str, v: &str| {
            v.parse::<u64>().map_err(|_| {
                StreamError::BadHeader(format!("{name}: {v:?} is not a sequence number"))
            })
        };
        if let Some(v) = headers::header(h, headers::EXPECTED_LAST_SEQ) {
            let expected = num(headers::EXPECTED_LAST_SEQ, v)?;
            if expected != self.last_seq {
                return Err(StreamError::WrongLastSequence {
                    expected,
                    last: self.last_seq,
                });
            }
        }
        if let Some(v) = headers::header(h, headers::EXPECTED_LAST_SUBJECT_SEQ) {
            let expected = num(headers::EXPECTED_LAST_SUBJECT_SEQ, v)?;
            let last = self
                .subjects
                .get(&msg.subject)
                .and_then(|id| self.subjects.entry(id))
                .map_or(0, |e| e.last);
            if expected != last {
                return Err(StreamError::WrongLastSubjectSequence {
                    subject: msg.subject.clone(),
                    expected,
                    last,
                });
            }
        }
        if let Some(v) = headers::header(h, headers::EXPECTED_LAST_MSG_ID) {
            if self.last_msg_id.as_deref() != Some(v) {
                return Err(StreamError::WrongLastMsgId {
                    expected: v.to_string(),
                    last: self.last_msg_id.clone(),
                });
            }
        }
        let rollup = match headers::header(h, headers::ROLLUP) {
            None => None,
            Some(v) => {
                if !self.opts.allow_rollup || self.opts.deny_purge {
                    return Err(StreamError::RollupDenied(
                        "Nats-Rollup is not permitted on this stream (set allow_rollup = true and deny_purge = false)".into(),
                    ));
                }
                Some(headers::parse_rollup(v).map_err(StreamError::BadHeader)?)
            }
        };
        let ttl = match headers::header(h, headers::TTL) {
            None => None,
            Some(v) => {
                if !self.opts.allow_msg_ttl {
                    return Err(StreamError::TtlDisabled);
                }
                match headers::parse_ttl(v).map_err(StreamError::InvalidTtl)? {
                    Ttl::After(d) => Some(d),
                    Ttl::Never => None,
                }
            }
        };
        Ok((rollup, ttl))
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
        let id = msg.headers.as_deref().and_then(msg_id);
        if let (Some(id), true) = (id, self.dedup.window > 0) {
            self.dedup.expire(now);
            if let Some(&seq) = self.dedup.ids.get(id) {
                return Ok(PubAck {
                    seq,
                    duplicate: true,
                });
            }
        }
        let (rollup, ttl) = match &msg.headers {
            Some(h) => self.check_headers(msg, h)?,
            None => (None, None),
        };
        let seq = self.last_seq + 1;
        let ts = now.max(self.last_ts);
        let encrypt = self.opts.encrypt && self.opts.key.is_some();
        let rec_len = |base: u64, base_ts: u64| {
            record::record_len(
                encrypt,
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
            let same_kind = s.seal.is_some() == encrypt && !s.no_append;
            (s.end() == seq && fits && same_kind && s.len + len <= u64::from(u32::MAX))
                .then_some(len)
        });
        let (roll, len) = match in_active {
            Some(len) => (false, len),
            None => (true, rec_len(seq, ts)),
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
            if o.discard_new_per_subject && o.max_msgs_per_subject > 0 {
                let count = self
                    .subjects
                    .get(&msg.subject)
                    .and_then(|id| self.subjects.entry(id))
                    .map_or(0, |e| e.count);
                if count >= o.max_msgs_per_subject {
                    return Err(StreamError::SubjectFull {
                        subject: msg.subject.clone(),
                        max: o.max_msgs_per_subject,
                    });
                }
            }
        }
        if roll {
            self.flush().map_err(io_err)?;
            if let Some(prev) = self.segs.len().checked_sub(1) {
                self.write_index(prev);
                if let Some(p) = self.segs.get(prev) {
                    if p.deleted.is_some() {
                        self.compact.insert(p.base);
                    }
                }
            }
            let seal = self.new_seal().map_err(io_err)?;
            record::encode_header(
                SegHeader {
                    base_seq: seq,
                    base_ts: ts,
                    seal,
                },
                &mut self.wbuf,
            );
            self.segs.push_back(Segment::new(seq, ts, seal));
        }
        let sid = self.subjects.add(&msg.subject, seq);
        let Some(seg) = self.segs.back_mut() else {
            return Err(StreamError::Io(io::Error::other("no active segment")));
        };
        let offset = seg.len as u32;
        let seal = match (&self.opts.key, &seg.seal) {
            (Some(k), Some(si)) => Some((k, &si.salt)),
            _ => None,
        };
        record::encode_any(
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
            seal,
            offset,
        );
        seg.offsets.push(offset);
        seg.sids.push(sid);
        seg.len += len;
        seg.last_ts = ts;
        seg.live += 1;
        self.last_seq = seq;
        self.last_ts = ts;
        self.msgs += 1;
        self.bytes += len;
        self.last_msg_id = id.map(str::to_string);
        if let (Some(id), true) = (id, self.dedup.window > 0) {
            self.dedup.insert(id, ts, seq);
        }
        if let Some(d) = ttl {
            let exp = ts.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            self.ttl_queue.insert((exp, seq));
            self.ttl_of.insert(seq, exp);
        }
        if let Some(r) = rollup {
            self.rollups.push((seq, r));
        }
        if self.opts.max_msgs_per_subject > 0 {
            self.over_subjects.push(sid);
        }
        if self.wbuf.len() >= WBUF_FLUSH {
            self.flush().map_err(io_err)?;
        }
        Ok(PubAck {
            seq,
            duplicate: false,
        })
    }

    /// Header fields of a new segment file: a fresh random salt when the
    /// stream encrypts.
    fn new_seal(&self) -> io::Result<Option<SealInfo>> {
        if !self.opts.encrypt {
            return Ok(None);
        }
        self.new_seal_always()
    }

    /// A fresh salt under the configured key (for rewriting an encrypted
    /// segment, whether or not the stream still encrypts new ones).
    fn new_seal_always(&self) -> io::Result<Option<SealInfo>> {
        let Some(key) = &self.opts.key else {
            return Ok(None);
        };
        let mut salt = [0u8; crypt::SALT_LEN];
        crypt::random(&mut salt)?;
        Ok(Some(SealInfo {
            salt,
            check: key.check_value(&salt),
        }))
    }

    /// Writes the `.idx` snapshot of segment `si` (which must be flushed).
    /// Failure only costs a scan at the next open.
    fn write_index(&mut self, si: usize) {
        let Some(seg) = self.segs.get(si) else {
            return;
        };
        if seg.indexed || !seg.created || seg.flushed != seg.len {
            return;
        }
        let mut ix = SegIndex {
            base: seg.base,
            base_ts: seg.base_ts,
            last_ts: seg.last_ts,
            len: seg.len,
            ..SegIndex::default()
        };
        let mut local: HashMap<u32, u32> = HashMap::new();
        for i in 0..seg.offsets.len() {
            let size = seg.rec_size(i) as u32;
            let seq = seg.base + i as u64;
            if seg.is_deleted(i) || seq < self.first_seq {
                ix.slots.push(Slot::Dead { size });
                continue;
            }
            let gid = seg.sid(i);
            let name = self.subjects.entry(gid).map_or("", |e| &e.name);
            let next = local.len() as u32;
            let subject = *local.entry(gid).or_insert_with(|| {
                ix.subjects.push(name.to_string());
                next
            });
            ix.slots.push(Slot::Live { size, subject });
            if let Some(&exp) = self.ttl_of.get(&seq) {
                ix.ttls.push((i as u32, exp));
            }
        }
        for (ts, seq, id) in &self.dedup.order {
            if *seq >= seg.base && *seq < seg.end() {
                ix.msg_ids.push(((*seq - seg.base) as u32, *ts, id.clone()));
            }
        }
        let newest = seg.end().saturating_sub(1);
        if let (Some(id), true) = (&self.last_msg_id, newest == self.last_seq) {
            let slot = (newest - seg.base) as u32;
            if !ix.msg_ids.iter().any(|(s, _, _)| *s == slot) {
                ix.msg_ids.push((slot, seg.last_ts, id.clone()));
            }
        }
        let last = (0..seg.offsets.len()).rev().find(|&i| seg.rec_size(i) > 0);
        let base = seg.base;
        let sealed = seg.seal.is_some();
        if let Some(i) = last {
            let (off, size) = (seg.offset(i), seg.rec_size(i));
            match self.record_check(base, sealed, off, size) {
                Ok((_, check)) => ix.last_crc = check,
                Err(e) => {
                    log::warn!("segment {base}: cannot read for its index snapshot: {e}");
                    return;
                }
            }
        }
        let mut bytes = index::encode_index(&ix);
        // Subjects and message ids are content: sealed when the stream (or
        // this segment) is encrypted.
        if let Some(k) = self
            .opts
            .key
            .as_ref()
            .filter(|_| sealed || self.opts.encrypt)
        {
            match k.seal_blob(IDX_SEALED_MAGIC, &bytes) {
                Ok(b) => bytes = b,
                Err(e) => {
                    log::warn!("segment {base}: cannot encrypt its index snapshot: {e}");
                    return;
                }
            }
        }
        match self.backend.write_atomic(&index_name(base), &bytes) {
            Ok(()) => {
                if let Some(seg) = self.segs.get_mut(si) {
                    seg.indexed = true;
                }
            }
            Err(e) => log::warn!(
                "cannot write index snapshot for segment {base}: {e}; the next open scans it"
            ),
        }
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

    /// Hands buffered appends and tombstones to the backend (no fsync).
    pub fn flush(&mut self) -> io::Result<()> {
        self.run_repairs()?;
        if self.wbuf.is_empty() {
            return self.flush_tombs();
        }
        let Some(seg) = self.segs.back_mut() else {
            self.wbuf.clear();
            return self.flush_tombs();
        };
        let name = segment_name(seg.base);
        if !seg.created {
            self.backend.create(&name)?;
            seg.created = true;
        }
        if !self.unsynced.contains(&name) {
            self.unsynced.push(name.clone());
        }
        self.backend.append(&name, &self.wbuf)?;
        seg.flushed += self.wbuf.len() as u64;
        self.wbuf.clear();
        // Tombstones after the records they name exist on disk.
        self.flush_tombs()
    }

    fn flush_tombs(&mut self) -> io::Result<()> {
        if self.tombs.is_empty() {
            return Ok(());
        }
        let mut tombs = std::mem::take(&mut self.tombs);
        tombs.sort_unstable();
        let mut k = 0;
        while k < tombs.len() {
            let base = tombs[k].0;
            let mut buf = Vec::new();
            while let Some(&(b, i)) = tombs.get(k) {
                if b != base {
                    break;
                }
                index::encode_tomb(base, i, &mut buf);
                k += 1;
            }
            let Some(seg) = self.segs.iter_mut().find(|s| s.base == base && s.created) else {
                continue; // segment gone (or never written): nothing to mark
            };
            let name = tomb_name(base);
            let res = (|| {
                if !seg.has_tombs {
                    self.backend.create(&name)?;
                    seg.has_tombs = true;
                }
                self.backend.append(&name, &buf)
            })();
            if let Err(e) = res {
                // Keep the rest for the next try (a torn entry is ignored
                // at open).
                self.tombs.extend_from_slice(&tombs[k..]);
                return Err(e);
            }
            if !self.unsynced.contains(&name) {
                self.unsynced.push(name);
            }
        }
        Ok(())
    }

    /// Flushes and fsyncs every file written since the last sync.
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        while let Some(name) = self.unsynced.first() {
            match self.backend.sync(name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.unsynced.remove(0);
        }
        Ok(())
    }

    /// Undoes every append after `mark`: memory state, buffered bytes and
    /// file bytes. If the file operations fail they are retried before the
    /// next write, so half-written records never stay.
    pub fn rollback(&mut self, mark: Mark) {
        self.removals += 1;
        // Per-record state first (subjects, TTLs), newest first.
        let mut q = self.last_seq;
        while q > mark.last_seq {
            if let Some(si) = self.seg_index(q) {
                let i = (q - self.segs[si].base) as usize;
                if !self.segs[si].is_deleted(i) && q >= self.first_seq {
                    let sid = self.segs[si].sid(i);
                    self.subjects.remove(sid, q);
                    if let Some(e) = self.subjects.entry(sid) {
                        if e.last >= q {
                            let prev = self.find_prev(sid, q);
                            if let Some(e) = self.subjects.entry_mut(sid) {
                                e.last = prev.unwrap_or(e.first);
                            }
                        }
                    }
                }
            }
            self.forget_ttl(q);
            q -= 1;
        }
        self.rollups.retain(|(s, _)| *s <= mark.last_seq);
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
                    self.repairs.push(Repair::Remove(tomb_name(seg.base)));
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
            seg.sids.truncate(keep);
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
            if seg.indexed {
                seg.indexed = false;
                self.repairs.push(Repair::Remove(index_name(seg.base)));
            }
            if seg.created {
                // The backend may hold a partial write beyond `flushed`.
                self.repairs
                    .push(Repair::Truncate(segment_name(seg.base), seg.flushed));
            }
            // Offsets past the cut may have held other sealed bytes.
            seg.no_append |= seg.seal.is_some();
        }
        self.last_seq = mark.last_seq;
        self.last_ts = mark.last_ts;
        self.last_msg_id = mark.last_msg_id;
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

    /// Is `seq` a live message?
    fn is_live(&self, seq: u64) -> Option<(usize, usize)> {
        if seq < self.first_seq || seq > self.last_seq {
            return None;
        }
        let si = self.seg_index(seq)?;
        let i = (seq - self.segs[si].base) as usize;
        (!self.segs[si].is_deleted(i)).then_some((si, i))
    }

    /// The newest live message of subject `sid` below `before`.
    fn find_prev(&self, sid: u32, before: u64) -> Option<u64> {
        let lo = self.first_seq;
        let mut q = before.checked_sub(1)?;
        while q >= lo {
            match self.seg_index(q) {
                Some(si) => {
                    let seg = &self.segs[si];
                    let i0 = (q - seg.base) as usize;
                    for i in (0..=i0).rev() {
                        let s = seg.base + i as u64;
                        if s < lo {
                            return None;
                        }
                        if seg.sid(i) == sid && !seg.is_deleted(i) {
                            return Some(s);
                        }
                    }
                    q = seg.base.checked_sub(1)?;
                }
                None => {
                    // In a gap between segments: jump to the previous one.
                    let k = self.segs.partition_point(|s| s.base <= q);
                    let prev = self.segs.get(k.checked_sub(1)?)?;
                    q = prev.end().checked_sub(1)?;
                }
            }
        }
        None
    }

    /// The first live sequence >= `from` whose subject id is in `want`
    /// (`None` = any subject), up to `upto`.
    fn find_next(&self, from: u64, upto: u64, want: &dyn Fn(u32) -> bool) -> Option<u64> {
        let mut q = from.max(self.first_seq);
        let upto = upto.min(self.last_seq);
        while q <= upto {
            let Some(si) = self.seg_index(q) else {
                let k = self.segs.partition_point(|s| s.base <= q);
                q = self.segs.get(k)?.base;
                continue;
            };
            let seg = &self.segs[si];
            let i0 = (q - seg.base) as usize;
            for i in i0..seg.offsets.len() {
                let s = seg.base + i as u64;
                if s > upto {
                    return None;
                }
                if !seg.is_deleted(i) && want(seg.sid(i)) {
                    return Some(s);
                }
            }
            q = seg.end();
        }
        None
    }

    /// Exact first live sequence of subject `sid` (fixes the hint).
    fn subject_first(&mut self, sid: u32) -> Option<u64> {
        let e = self.subjects.entry(sid)?;
        if e.count == 1 {
            return Some(e.last);
        }
        let (hint, last) = (e.first, e.last);
        let first = self.find_next(hint, last, &|s| s == sid)?;
        if let Some(e) = self.subjects.entry_mut(sid) {
            e.first = first;
        }
        Some(first)
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

    fn write_meta(&mut self) -> io::Result<()> {
        let meta = encode_meta(self.first_seq, self.last_seq);
        self.backend.write_atomic(META_NAME, &meta)
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
            let base = seg.base;
            if seg.created {
                if let Err(e) = self.write_meta() {
                    log::warn!(
                        "cannot write stream meta file: {e}; keeping segment {base} for now"
                    );
                    return;
                }
                if let Err(e) = self.remove_segment_files(base) {
                    log::warn!("cannot remove segment {base}: {e}; will retry");
                    return;
                }
            }
            self.segs.pop_front();
        }
    }

    fn forget_ttl(&mut self, seq: u64) {
        if !self.ttl_of.is_empty() {
            if let Some(exp) = self.ttl_of.remove(&seq) {
                self.ttl_queue.remove(&(exp, seq));
            }
        }
    }

    /// Bookkeeping for removing live record `i` of segment `si`.
    fn unlink(&mut self, si: usize, i: usize) {
        self.removals += 1;
        let seg = &mut self.segs[si];
        let seq = seg.base + i as u64;
        let sid = seg.sid(i);
        self.bytes = self.bytes.saturating_sub(seg.rec_size(i));
        seg.live = seg.live.saturating_sub(1);
        self.msgs = self.msgs.saturating_sub(1);
        let was_last = self.subjects.entry(sid).is_some_and(|e| e.last == seq);
        if self.subjects.remove(sid, seq) > 0 && was_last {
            // Not on the hot path (removing a subject's newest message).
            let prev = self.find_prev(sid, seq);
            if let Some(e) = self.subjects.entry_mut(sid) {
                e.last = prev.unwrap_or(e.first);
                if e.count == 1 {
                    e.first = e.last;
                }
            }
        }
        self.forget_ttl(seq);
    }

    /// Removes the oldest message. Returns false if the stream is empty.
    fn remove_first(&mut self) -> bool {
        if self.msgs == 0 {
            return false;
        }
        let Some(si) = self.seg_index(self.first_seq) else {
            return false;
        };
        let i = (self.first_seq - self.segs[si].base) as usize;
        self.unlink(si, i);
        self.first_seq += 1;
        self.advance_first();
        true
    }

    /// Removes live message `seq` (an interior tombstone, or moving
    /// `first_seq` for the oldest). Returns false if it is not live.
    fn remove(&mut self, seq: u64) -> bool {
        let Some((si, i)) = self.is_live(seq) else {
            return false;
        };
        self.unlink(si, i);
        let seg = &mut self.segs[si];
        seg.set_deleted(i);
        let base = seg.base;
        self.tombs.push((base, i as u32));
        if si + 1 < self.segs.len() {
            self.compact.insert(base);
        }
        if seq == self.first_seq {
            self.advance_first();
        }
        true
    }

    /// Applies rollups, max_msgs_per_subject, per-message TTLs,
    /// max_msgs / max_bytes (discard = old) and max_age as of `now`.
    /// Returns how many messages were removed.
    pub fn enforce_limits(&mut self, now: u64) -> u64 {
        let mut removed = 0;
        for (seq, r) in std::mem::take(&mut self.rollups) {
            removed += match r {
                Rollup::All => {
                    let n = self.purge_before(seq, None);
                    // Not derivable at open: record the new first_seq.
                    if let Err(e) = self.write_meta() {
                        log::error!("recording a rollup in the meta file: {e}");
                    }
                    n
                }
                Rollup::Subject => {
                    let sid = self.is_live(seq).map(|(si, i)| self.segs[si].sid(i));
                    match sid {
                        Some(sid) => self.purge_subject_before(sid, seq),
                        None => 0,
                    }
                }
            };
        }
        let per = self.opts.max_msgs_per_subject;
        let mut over = std::mem::take(&mut self.over_subjects);
        if per > 0 {
            over.sort_unstable();
            over.dedup();
            for sid in over {
                while self.subjects.entry(sid).is_some_and(|e| e.count > per) {
                    match self.subject_first(sid) {
                        Some(q) if self.remove(q) => removed += 1,
                        _ => break,
                    }
                }
            }
        }
        while let Some(&(exp, seq)) = self.ttl_queue.first() {
            if exp > now {
                break;
            }
            self.ttl_queue.pop_first();
            self.ttl_of.remove(&seq);
            if self.remove(seq) {
                removed += 1;
            }
        }
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
        let off = seg.offset(i);
        let seal = sealing(&self.opts.key, seg);
        match record::decode_any(&mut self.scratch, seg.base, seg.base_ts, seal, off) {
            Ok((r, _)) => Some(r.timestamp),
            // A damaged oldest record: treat it as expired.
            Err(_) => Some(0),
        }
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
                let seal = sealing(&self.opts.key, seg);
                let decoded = self
                    .scratch
                    .get_mut(at..)
                    .ok_or(record::DecodeError::Incomplete)
                    .and_then(|b| {
                        record::decode_any(b, seg.base, seg.base_ts, seal, start + at as u64)
                    })
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

    /// The message with sequence `seq`, if live.
    pub fn get(&mut self, seq: u64) -> io::Result<Option<StoredMessage>> {
        if self.is_live(seq).is_none() {
            return Ok(None);
        }
        Ok(self.read(seq, 1, usize::MAX, seq)?.pop())
    }

    /// Subject ids matching a filter (a literal subject or a wildcard).
    fn matching(&self, filter: &str) -> Vec<u32> {
        if !filter.contains(['*', '>']) {
            return self.subjects.get(filter).into_iter().collect();
        }
        let mut v: Vec<u32> = self
            .subjects
            .iter()
            .filter(|(_, e)| crate::subject::matches(filter, &e.name))
            .map(|(id, _)| id)
            .collect();
        v.sort_unstable();
        v
    }

    /// The newest live message whose subject matches `filter`.
    pub fn last_by_subject(&mut self, filter: &str) -> io::Result<Option<StoredMessage>> {
        let last = self
            .matching(filter)
            .into_iter()
            .filter_map(|id| self.subjects.entry(id).map(|e| e.last))
            .max();
        match last {
            Some(seq) => self.get(seq),
            None => Ok(None),
        }
    }

    /// The first live message with `seq >= from` whose subject matches
    /// `filter`.
    pub fn next_by_subject(
        &mut self,
        filter: &str,
        from: u64,
    ) -> io::Result<Option<StoredMessage>> {
        let ids = self.matching(filter);
        let start = ids
            .iter()
            .filter_map(|&id| self.subjects.entry(id).map(|e| e.first))
            .min();
        let Some(start) = start else {
            return Ok(None);
        };
        let found = self.find_next(from.max(start), u64::MAX, &|s| {
            ids.binary_search(&s).is_ok()
        });
        match found {
            Some(seq) => self.get(seq),
            None => Ok(None),
        }
    }

    /// Live message counts of the subjects matching `filter`, sorted.
    pub fn subject_counts(&self, filter: &str) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .matching(filter)
            .into_iter()
            .filter_map(|id| {
                self.subjects
                    .entry(id)
                    .map(|e| (e.name.to_string(), e.count))
            })
            .collect();
        v.sort();
        v
    }

    /// Deletes one message (tombstoned; durable at the next sync). Returns
    /// false if absent. Internal: ignores `deny_delete`.
    pub fn delete(&mut self, seq: u64) -> bool {
        let ok = self.remove(seq);
        if ok {
            self.drop_dead_segments();
        }
        ok
    }

    /// The API delete: honours `deny_delete`; with `secure`, the record's
    /// subject, headers and payload are overwritten on disk (zeros). The
    /// deletion (and the overwrite) is durable when this returns.
    pub fn delete_msg(&mut self, seq: u64, secure: bool) -> Result<bool, StreamError> {
        if self.opts.deny_delete {
            return Err(StreamError::DeleteDenied);
        }
        let Some((si, i)) = self.is_live(seq) else {
            return Ok(false);
        };
        let base = self.segs[si].base;
        // The tombstone is durable before the bytes change, so a crash in
        // between never shows an erased record as a message.
        self.remove(seq);
        self.sync().map_err(io_err)?;
        if secure {
            self.erase(base, i).map_err(io_err)?;
        }
        self.drop_dead_segments();
        Ok(true)
    }

    /// Overwrites record `i` of segment `base` in place with a valid record
    /// of the same length whose subject, headers and payload are zeros, and
    /// syncs.
    fn erase(&mut self, base: u64, i: usize) -> io::Result<()> {
        let Some(si) = self.segs.iter().position(|s| s.base == base) else {
            return Ok(());
        };
        if self.segs[si].offset(i + 1) > self.segs[si].flushed {
            self.flush()?;
        }
        self.read_span(si, i, i + 1)?;
        let seg = &self.segs[si];
        let seq = seg.base + i as u64;
        let off = seg.offset(i);
        let seal = sealing(&self.opts.key, seg);
        let peek = record::peek_len_sealed(&self.scratch);
        let damaged = || io::Error::other(format!("message {seq} is damaged; cannot erase it"));
        let (rec, n) = record::decode_any(&mut self.scratch, seg.base, seg.base_ts, seal, off)
            .map_err(|_| damaged())?;
        let (seq_delta, ts_delta) = (rec.seq - seg.base, rec.timestamp - seg.base_ts);
        let out = match seal {
            Some((key, salt)) => {
                let lens = peek.map_err(|_| damaged())?;
                record::encode_erased_sealed(seq_delta, ts_delta, lens, key, salt, off as u32)
                    .ok_or_else(damaged)?
            }
            None => {
                let mut body = Vec::with_capacity(n);
                record::put_varint(&mut body, seq_delta);
                record::put_varint(&mut body, ts_delta);
                record::put_varint(&mut body, 0);
                record::put_varint(&mut body, 0);
                body.resize(n - record::PREFIX_LEN, 0);
                let mut out = Vec::with_capacity(n);
                out.extend_from_slice(&(body.len() as u32).to_le_bytes());
                out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
                out.extend_from_slice(&body);
                out
            }
        };
        let name = segment_name(seg.base);
        let last = i + 1 == seg.offsets.len();
        if seg.indexed && last {
            // The snapshot checks the last record's crc: it must go first.
            self.backend.remove(&index_name(base))?;
            if let Some(seg) = self.segs.get_mut(si) {
                seg.indexed = false;
            }
        }
        self.backend.write_at(&name, off, &out)?;
        self.backend.sync(&name)
    }

    /// Removes every live message with `seq < before` (and, with `keep`,
    /// not among the newest `keep`), all subjects. Returns the count.
    fn purge_before(&mut self, before: u64, keep: Option<u64>) -> u64 {
        let mut cut = before.min(self.last_seq + 1);
        if let Some(k) = keep {
            // The newest `k` live messages stay.
            if self.msgs <= k {
                return 0;
            }
            let mut left = k;
            let mut q = self.last_seq;
            while left > 0 && q >= self.first_seq {
                if self.is_live(q).is_some() {
                    left -= 1;
                }
                q -= 1;
            }
            cut = cut.min(q + 1);
        }
        let mut n = 0;
        while self.first_seq < cut && self.msgs > 0 {
            if self.remove_first() {
                n += 1;
            } else {
                break;
            }
        }
        if self.first_seq < cut && self.msgs == 0 {
            self.first_seq = self.last_seq + 1;
        }
        n
    }

    /// Removes live messages of subject `sid` below `before`.
    fn purge_subject_before(&mut self, sid: u32, before: u64) -> u64 {
        let mut n = 0;
        while let Some(q) = self.subject_first(sid) {
            if q >= before || !self.remove(q) {
                break;
            }
            n += 1;
        }
        n
    }

    /// The API purge (honours `deny_purge`). Durable when it returns.
    pub fn purge(&mut self, req: &PurgeRequest) -> Result<u64, StreamError> {
        if self.opts.deny_purge {
            return Err(StreamError::PurgeDenied);
        }
        if req.upto_seq.is_some() && req.keep.is_some() {
            return Err(StreamError::BadRequest(
                "purge: give either a sequence or keep, not both".into(),
            ));
        }
        let before = req.upto_seq.unwrap_or(u64::MAX);
        let n = match &req.subject {
            None => self.purge_before(before, req.keep),
            Some(filter) => {
                let ids = self.matching(filter);
                let mut seqs = Vec::new();
                for &id in &ids {
                    let mut q = match self.subject_first(id) {
                        Some(q) => q,
                        None => continue,
                    };
                    let last = self.subjects.entry(id).map_or(0, |e| e.last);
                    while let Some(s) = self.find_next(q, last, &|x| x == id) {
                        seqs.push(s);
                        q = s + 1;
                    }
                }
                seqs.sort_unstable();
                let keep = usize::try_from(req.keep.unwrap_or(0)).unwrap_or(usize::MAX);
                let upto = seqs.len().saturating_sub(keep);
                let mut n = 0;
                for &s in seqs.iter().take(upto) {
                    if s < before && self.remove(s) {
                        n += 1;
                    }
                }
                n
            }
        };
        self.drop_dead_segments();
        self.write_meta().map_err(io_err)?;
        self.sync().map_err(io_err)?;
        Ok(n)
    }

    /// Retention `interest`/`workqueue`: the message was acknowledged by
    /// every interested consumer; it is removed. Returns false if absent.
    pub fn ack(&mut self, seq: u64) -> Result<bool, StreamError> {
        if self.opts.retention == Retention::Limits {
            return Err(StreamError::BadRequest(
                "ack: the stream has retention = \"limits\"; acknowledgements do not remove messages".into(),
            ));
        }
        Ok(self.delete(seq))
    }

    /// True when [`Store::maintain`] has work (segment compaction).
    pub fn needs_maintenance(&self) -> bool {
        !self.compact.is_empty()
    }

    /// One step of background work: compacts at most one mostly-deleted
    /// sealed segment (rewritten to a new file, swapped atomically).
    pub fn maintain(&mut self) -> io::Result<()> {
        let Some(base) = self.compact.pop_first() else {
            return Ok(());
        };
        let Some(si) = self.segs.iter().position(|s| s.base == base) else {
            return Ok(());
        };
        if si + 1 >= self.segs.len() {
            return Ok(()); // the active segment is never compacted
        }
        let seg = &self.segs[si];
        let data = seg.len - seg.header_len();
        let mut live_bytes = 0;
        for i in 0..seg.offsets.len() {
            if !seg.is_deleted(i) && seg.base + i as u64 >= self.first_seq {
                live_bytes += seg.rec_size(i);
            }
        }
        if live_bytes * COMPACT_RATIO > data {
            return Ok(());
        }
        self.flush()?;
        if live_bytes == 0 {
            // Nothing left: drop the whole file.
            let live = self.segs[si].live;
            if live == 0 {
                self.remove_segment_files(base)?;
                self.segs.remove(si);
                return Ok(());
            }
        }
        let n = self.segs[si].offsets.len();
        self.read_span(si, 0, n)?;
        // An encrypted segment is rewritten under a new salt: its records
        // move to new offsets, which must never be reused with the old one.
        let new_seal = match self.segs[si].seal {
            Some(_) => match self.new_seal_always()? {
                Some(ns) => Some(ns),
                None => return Ok(()), // no key: open refuses such a stream
            },
            None => None,
        };
        let seg = &self.segs[si];
        let mut out = Vec::with_capacity(live_bytes as usize + record::SEALED_HEADER_LEN);
        record::encode_header(
            SegHeader {
                base_seq: seg.base,
                base_ts: seg.base_ts,
                seal: new_seal,
            },
            &mut out,
        );
        let start = seg.offset(0);
        let mut offsets = Vec::with_capacity(n);
        let mut dead = Vec::new();
        let old_seal = sealing(&self.opts.key, seg);
        for i in 0..n {
            offsets.push(out.len() as u32);
            let alive = !seg.is_deleted(i) && seg.base + i as u64 >= self.first_seq;
            if !alive {
                dead.push(i);
                continue;
            }
            let a = (seg.offset(i) - start) as usize;
            let b = (seg.offset(i + 1) - start) as usize;
            let Some(bytes) = self.scratch.get_mut(a..b) else {
                continue;
            };
            match (old_seal, &new_seal) {
                (Some((key, _)), Some(ns)) => {
                    let at = out.len() as u32;
                    match record::decode_any(bytes, seg.base, seg.base_ts, old_seal, seg.offset(i))
                    {
                        Ok((rec, _)) => record::encode_any(
                            &mut out,
                            seg.base,
                            seg.base_ts,
                            &rec,
                            Some((key, &ns.salt)),
                            at,
                        ),
                        Err(_) => {
                            return Err(io::Error::other(format!(
                                "segment {base}: message {} is damaged; not compacting",
                                seg.base + i as u64
                            )))
                        }
                    }
                }
                _ => out.extend_from_slice(bytes),
            }
        }
        let saved = seg.len - out.len() as u64;
        self.backend.write_atomic(&segment_name(base), &out)?;
        let seg = &mut self.segs[si];
        seg.offsets = offsets;
        seg.seal = new_seal;
        seg.len = out.len() as u64;
        seg.flushed = seg.len;
        seg.indexed = false;
        for i in dead {
            seg.set_deleted(i);
        }
        self.backend.remove(&index_name(base))?;
        self.write_index(si);
        if self.segs[si].indexed {
            // Gaps now carry the deletions: the tombstones are redundant.
            self.backend.remove(&tomb_name(base))?;
            self.segs[si].has_tombs = false;
        }
        log::debug!("compacted segment {base}: {saved} bytes freed");
        Ok(())
    }

    /// Flush, sync, record first/last sequence in `meta` and write the
    /// index snapshots of segments that have none.
    pub fn close(&mut self) -> io::Result<()> {
        self.sync()?;
        for si in 0..self.segs.len() {
            self.write_index(si);
        }
        self.write_meta()
    }
}

#[cfg(test)]
mod bench_tests;
#[cfg(test)]
mod crypt_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
// The same tests with every stream encrypted.
#[cfg(test)]
#[allow(clippy::duplicate_mod)]
#[path = "tests.rs"]
mod tests_encrypted;
