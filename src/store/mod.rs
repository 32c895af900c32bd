//! The raw segmented log of one stream, and its crash recovery.
//!
//! Owns every file of the log in one directory (through a [`Backend`]):
//! segment files `<first seq, 20 digits>.seg`, their index snapshots
//! (`.idx`) and tombstone files (`.del`), the `meta` file and the
//! `keycheck` file of an encrypted log. Other names are left alone (the
//! stream layer keeps its `retention` file there). The byte layouts,
//! invariants and recovery procedure are in `docs/store-format.md`; each
//! layout is also spelled out as named constants beside its codec
//! ([`record`], [`index`], `segment.rs`).
//!
//! What the log does: append a record (subject, headers, payload and a
//! timestamp chosen by the caller) and return its sequence; read and get
//! records; remove one record (a tombstone), a prefix, the records of a
//! subject below a sequence, the records older than a time, or those whose
//! deadline passed; compaction; flush, sync, mark and rollback; encryption
//! at rest; a per-subject index (first, last, count). What it does not:
//! limits, discard policies, duplicate detection, headers with a meaning —
//! those are the stream's rules (`crate::stream`), which call this API.
//! Plain std, no async, no clock, and no import from the rest of the crate
//! except [`crate::subject`] (wildcard matching).
//!
//! Record tags: a caller-supplied [`Tagger`] derives, from a record's
//! headers, an optional *deadline* (unix ns) and an optional *id*. The log
//! indexes the deadlines of live records ([`Store::next_deadline`],
//! [`Store::remove_expired`]) and keeps both in its index snapshots (the
//! format's TTL and message-id sections), so the caller can rebuild its
//! own id index at open ([`Store::open_visiting_ids`]) without reading the
//! records.
//!
//! Invariants:
//! - Sequences strictly increase inside a segment (record `i` of the index
//!   has seq `base + i`; compaction leaves zero-size gaps) and across
//!   segments, and are never reused, even after every record was removed
//!   and the log reopened (the `meta` file keeps `last_seq` when segments
//!   are dropped, at [`Store::persist_bounds`] and at close).
//! - Timestamps never decrease: [`Store::append`] stores
//!   `max(timestamp, previous)`, so [`Store::remove_older_than`] removes a
//!   prefix.
//! - Records with `seq < first_seq` are removed; a segment whose records are
//!   all removed is deleted (after `meta` records the new `first_seq`).
//!   Interior removals are tombstoned in `<base>.del` before the next sync
//!   ([`Store::sync_appends`] writes them but leaves their fsync to the
//!   next [`Store::sync`]).
//!   A prefix removal is durable once its segment is deleted or
//!   [`Store::persist_bounds`] ran; until then a reopen shows the records
//!   again.
//! - An `.idx` snapshot is trusted only if it matches its segment file
//!   (length, header, last record's checksum); otherwise the segment is
//!   scanned. A snapshot is written only with every live record's
//!   deadline and every record's id known.
//! - Per-subject state (first, last, count) and the deadline index count
//!   exactly the live records (see [`subjects`]).
//! - Opening never fails on damaged data, only on real I/O errors and on a
//!   wrong or missing key: a torn or corrupt tail is cut and reported,
//!   nothing that fails its checksum is ever returned.
//! - Between [`Store::mark`] and a sync (or [`Store::rollback`]) the caller
//!   only appends; a rollback removes every byte written since the mark.

pub mod backend;
mod compact;
pub mod crypt;
pub mod index;
mod read;
pub mod record;
mod recover;
mod remove;
mod segment;
pub mod subjects;
mod write;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;

pub use backend::{Backend, FsBackend, MemBackend};
pub use segment::{segment_name, META_NAME};

use crypt::Key;
use segment::Segment;
use subjects::SubjectTable;

/// Default segment size.
pub const DEFAULT_SEGMENT_SIZE: u64 = 4 << 20;
/// Smallest segment size chosen for small `max_bytes`.
pub const MIN_SEGMENT_SIZE: u64 = 64 << 10;
/// The append buffer is written out when it grows past this.
const WBUF_FLUSH: usize = 1 << 20;
/// A sealed segment is compacted when live records use at most
/// 1/COMPACT_RATIO of its record bytes.
const COMPACT_RATIO: u64 = 4;

/// What a caller derives from a record's headers (see [`Tagger`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tags<'a> {
    /// Unix ns after which the record should go ([`Store::remove_expired`]).
    pub deadline: Option<u64>,
    /// The record's id, kept in the index snapshots for the caller.
    pub id: Option<&'a str>,
}

/// Derives the [`Tags`] of a stored record from its header block and
/// timestamp. Must be a pure function of its arguments and agree with the
/// tags passed to [`Store::append`]: the log calls it when it scans a
/// segment at open and when it rewrites one.
pub type Tagger = for<'a> fn(&'a [u8], u64) -> Tags<'a>;

/// How the log is laid out and sealed.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Names the log in error messages (the stream's name).
    pub name: String,
    /// A new segment starts when the next record would make the current
    /// one larger than this (a single bigger record gets its own segment).
    pub segment_size: u64,
    /// The key: needed to read encrypted segments.
    pub key: Option<Key>,
    /// New segments are encrypted with `key` (which must be set).
    pub encrypt: bool,
    /// Derives record tags when scanning or rewriting a segment (`None`:
    /// records have no tags).
    pub tagger: Option<Tagger>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            name: String::new(),
            segment_size: DEFAULT_SEGMENT_SIZE,
            key: None,
            encrypt: false,
            tagger: None,
        }
    }
}

/// A record to append.
#[derive(Debug, Clone, Copy)]
pub struct NewRecord<'a> {
    pub subject: &'a str,
    /// Raw header block, if any (opaque to the log).
    pub headers: Option<&'a [u8]>,
    pub payload: &'a [u8],
    /// Unix ns; the log stores `max(timestamp, last timestamp)`.
    pub timestamp: u64,
    /// Must equal what the [`Tagger`] derives from `headers`.
    pub tags: Tags<'a>,
}

/// A record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// Unix ns.
    pub timestamp: u64,
    pub subject: String,
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// Sequence bounds and totals of the live records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State {
    /// `last_seq + 1` when empty.
    pub first_seq: u64,
    pub last_seq: u64,
    pub msgs: u64,
    /// Whole records (prefix and body), no segment headers.
    pub bytes: u64,
}

/// What recovery found when the log was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub records: u64,
    /// Bytes cut from torn or corrupt tails.
    pub truncated_bytes: u64,
    /// Records known lost (a corrupt record in the middle, skipped).
    pub lost_records: u64,
    /// Records (at least) in the bytes cut from the log's tail (the newest
    /// segment; a cut elsewhere counts in `lost_records`): the whole
    /// ones still found there (a zero-filled hole ends the count), and at
    /// least one if any cut byte is not zero.
    pub cut_records: u64,
}

/// Why [`Store::append`] stored nothing.
#[derive(Debug)]
pub enum AppendError {
    /// The record's body would exceed what the format allows.
    TooLarge { len: u64, max: u64 },
    /// Writing out the buffer failed; roll back to the batch's mark.
    Io(io::Error),
}

/// A subject with live records. Valid while the subject has live records;
/// the number is reused afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubjectId(u32);

/// Per-subject state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubjectState {
    /// A lower bound of the first live sequence ([`Store::subject_first`]
    /// is exact).
    pub first: u64,
    pub last: u64,
    pub count: u64,
}

/// A point to roll back to: everything appended after it can be undone.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// One log. Single owner; not thread-safe by design.
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
    scratch: Vec<u8>,
    subjects: SubjectTable,
    /// Deadlines of live records: (deadline, seq) and seq -> deadline.
    deadlines: BTreeSet<(u64, u64)>,
    deadline_of: BTreeMap<u64, u64>,
    /// Tombstones not yet written: (segment base, slot).
    tombs: Vec<(u64, u32)>,
    /// Segments to check for compaction.
    compact: BTreeSet<u64>,
    /// Bumped by every removal of a live record and every rollback.
    removals: u64,
    upto_memo: std::cell::Cell<Option<read::UptoMemo>>,
}

impl Store {
    /// Opens the log held by `backend`, recovering from any damage.
    pub fn open(
        backend: Box<dyn Backend>,
        opts: StoreOptions,
    ) -> io::Result<(Store, RecoveryReport)> {
        Store::open_visiting_ids(backend, opts, &mut |_, _, _| {})
    }

    /// [`Store::open`], calling `visit(seq, timestamp, id)` for every
    /// record id found in the snapshots and scanned segments (records
    /// removed by tombstones included), in sequence order per segment.
    pub fn open_visiting_ids(
        backend: Box<dyn Backend>,
        opts: StoreOptions,
        visit: &mut dyn FnMut(u64, u64, &str),
    ) -> io::Result<(Store, RecoveryReport)> {
        let mut st = Store {
            backend,
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
            deadlines: BTreeSet::new(),
            deadline_of: BTreeMap::new(),
            tombs: Vec::new(),
            compact: BTreeSet::new(),
            removals: 0,
            upto_memo: std::cell::Cell::new(None),
        };
        let report = st.recover(visit)?;
        Ok((st, report))
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    pub fn state(&self) -> State {
        State {
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            msgs: self.msgs,
            bytes: self.bytes,
        }
    }

    /// Timestamp of the newest record ever stored (0 if none).
    pub fn last_ts(&self) -> u64 {
        self.last_ts
    }

    /// Bytes used by the log's files.
    pub fn disk_usage(&mut self) -> io::Result<u64> {
        self.backend.disk_usage()
    }

    /// Reads a small file the caller keeps beside the log (`None` if it
    /// does not exist). Its name must not be one the log uses.
    pub fn read_aux(backend: &mut dyn Backend, name: &str) -> io::Result<Option<Vec<u8>>> {
        if !backend.list()?.iter().any(|n| n == name) {
            return Ok(None);
        }
        read_whole(backend, name).map(Some)
    }

    /// Replaces a small file the caller keeps beside the log, atomically
    /// and durably.
    pub fn write_aux(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.backend.write_atomic(name, data)
    }

    /// Number of subjects with live records.
    pub fn subject_count(&self) -> usize {
        self.subjects.len()
    }

    /// The id of subject `name`, if it has live records.
    pub fn subject_id(&self, name: &str) -> Option<SubjectId> {
        self.subjects.get(name).map(SubjectId)
    }

    pub fn subject(&self, id: SubjectId) -> Option<SubjectState> {
        self.subjects.entry(id.0).map(|e| SubjectState {
            first: e.first,
            last: e.last,
            count: e.count,
        })
    }

    /// Every subject with live records.
    pub fn subject_ids(&self) -> Vec<SubjectId> {
        self.subjects.iter().map(|(id, _)| SubjectId(id)).collect()
    }

    /// The subject of live record `seq`.
    pub fn subject_of(&self, seq: u64) -> Option<SubjectId> {
        self.is_live(seq)
            .map(|(si, i)| SubjectId(self.segs[si].sid(i)))
    }

    /// Is `seq` a live record?
    pub fn contains(&self, seq: u64) -> bool {
        self.is_live(seq).is_some()
    }

    /// The earliest deadline of a live record: (deadline, seq).
    pub fn next_deadline(&self) -> Option<(u64, u64)> {
        self.deadlines.first().copied()
    }
}

/// Reads all of file `name`.
fn read_whole(backend: &mut dyn Backend, name: &str) -> io::Result<Vec<u8>> {
    let len = backend.len(name)?;
    let ulen =
        usize::try_from(len).map_err(|_| io::Error::other(format!("file {name} too large")))?;
    let mut b = vec![0u8; ulen];
    backend.read_at(name, 0, &mut b)?;
    Ok(b)
}

#[cfg(test)]
mod bench_tests;
#[cfg(test)]
mod crypt_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
// The same tests with every log encrypted.
#[cfg(test)]
#[allow(clippy::duplicate_mod)]
#[path = "tests.rs"]
mod tests_encrypted;
