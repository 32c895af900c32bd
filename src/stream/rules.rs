//! The JetStream rules of one stream as a sans-IO [`Stream`] on top of a
//! [`Store`]: the duplicate window, the `Nats-Expected-*` checks, rollups,
//! per-message TTLs, the limits (`max_msgs`, `max_bytes`, `max_age`,
//! `max_msg_size`, `max_msgs_per_subject`), discard old / new / new per
//! subject, purge requests, deletes, retention acks, and the retention
//! change check at open (`limits.rs` holds the removals).
//!
//! No thread and no clock: every call that needs the time takes `now`
//! (unix ns) from the caller, the owner thread (`owner.rs`). Its only I/O
//! is through the store's [`Backend`].
//!
//! Invariants:
//! - A publish either stores the message (and only then enters its id in
//!   the duplicate window and queues its rollup) or stores nothing.
//! - Between [`Stream::mark`] and the caller's sync only publishes happen;
//!   removals caused by them (per-subject limits, rollups) wait for
//!   [`Stream::enforce_limits`] after the batch committed, so a rollback
//!   never has to undo a removal.
//! - The duplicate window holds every id stored within `duplicate_window`
//!   of `now`, rebuilt at open from the ids the store keeps in its index
//!   snapshots and scans (see [`crate::store::Tags`]).
//! - Records carry a deadline in the store exactly when their `Nats-TTL`
//!   parses to a duration ([`tags`]), so TTLs survive a reopen.

use std::io;
use std::time::Duration;

use super::dedup::Dedup;
use super::headers::{self, Rollup, Ttl};
use super::{
    Message, PubAck, Retention, StoredMessage, StreamConfig, StreamError, StreamInfo, StreamState,
};
use crate::store::record::{MAX_BODY, PREFIX_LEN};
use crate::store::{
    AppendError, Backend, NewRecord, Record, RecoveryReport, Store, StoreOptions, SubjectId, Tags,
};

/// Name of the file (beside the store's) recording the stream's retention
/// policy (`limits`, `interest` or `workqueue`), so a config change
/// JetStream would refuse is refused at open.
pub const RETENTION_NAME: &str = "retention";

pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

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

/// Finds the value of the `Nats-Msg-Id` header in a NATS header block.
pub fn msg_id(headers: &[u8]) -> Option<&str> {
    if !headers::has_nats(headers) {
        return None;
    }
    headers::header(headers, headers::MSG_ID)
}

/// The store [`Tags`] of a stored message: its `Nats-TTL` deadline and
/// its `Nats-Msg-Id`.
pub fn tags(headers: &[u8], ts: u64) -> Tags<'_> {
    if !headers::has_nats(headers) {
        return Tags::default();
    }
    let deadline = match headers::header(headers, headers::TTL).map(headers::parse_ttl) {
        Some(Ok(Ttl::After(d))) => Some(ts.saturating_add(nanos(d))),
        _ => None,
    };
    Tags {
        deadline,
        id: headers::header(headers, headers::MSG_ID),
    }
}

/// The store options for a stream: segments sized for its `max_bytes`,
/// its key, and the stream's [`tags`].
pub fn store_options(cfg: &StreamConfig) -> StoreOptions {
    use crate::store::{DEFAULT_SEGMENT_SIZE, MIN_SEGMENT_SIZE};
    let segment_size = if cfg.max_bytes == 0 {
        DEFAULT_SEGMENT_SIZE
    } else {
        (cfg.max_bytes / 8).clamp(MIN_SEGMENT_SIZE, DEFAULT_SEGMENT_SIZE)
    };
    StoreOptions {
        name: cfg.name.clone(),
        segment_size,
        key: cfg.key.clone(),
        encrypt: cfg.encrypt && cfg.key.is_some(),
        tagger: Some(tags),
    }
}

/// A point to roll back to (see [`Stream::rollback`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    store: crate::store::Mark,
    last_msg_id: Option<String>,
}

impl Mark {
    /// The last sequence at the mark.
    pub fn last_seq(&self) -> u64 {
        self.store.last_seq()
    }
}

/// One stream: its store and the JetStream rules. Single owner.
pub struct Stream {
    pub(super) store: Store,
    pub(super) cfg: StreamConfig,
    pub(super) dedup: Dedup,
    /// `Nats-Msg-Id` of the newest message (for Nats-Expected-Last-Msg-Id).
    last_msg_id: Option<String>,
    /// Rollups published but not applied yet (applied after the commit).
    pub(super) rollups: Vec<(u64, Rollup)>,
    /// Subjects that may be over `max_msgs_per_subject`.
    pub(super) over_subjects: Vec<SubjectId>,
}

impl From<Record> for StoredMessage {
    fn from(r: Record) -> StoredMessage {
        StoredMessage {
            seq: r.seq,
            timestamp: r.timestamp,
            subject: r.subject,
            headers: r.headers,
            payload: r.payload,
        }
    }
}

impl From<crate::store::State> for StreamState {
    fn from(s: crate::store::State) -> StreamState {
        StreamState {
            first_seq: s.first_seq,
            last_seq: s.last_seq,
            msgs: s.msgs,
            bytes: s.bytes,
        }
    }
}

impl Stream {
    /// Opens the stream held by `backend` (its store with `opts`, whose
    /// tagger is set to [`tags`]), refusing a retention change JetStream
    /// refuses, and applies the limits as of `now`.
    pub fn open(
        mut backend: Box<dyn Backend>,
        cfg: &StreamConfig,
        mut opts: StoreOptions,
        now: u64,
    ) -> io::Result<(Stream, RecoveryReport)> {
        let stored = Store::read_aux(&mut *backend, RETENTION_NAME)?;
        if let Some(b) = &stored {
            check_retention_change(&cfg.name, b, cfg.retention)?;
        }
        opts.tagger = Some(tags);
        let window = nanos(cfg.duplicate_window);
        let cutoff = now.saturating_sub(window);
        let mut dedup = Dedup::new(window);
        let (mut newest_seq, mut newest_id) = (0, String::new());
        let (mut store, report) = Store::open_visiting_ids(backend, opts, &mut |seq, ts, id| {
            if window > 0 && ts >= cutoff {
                dedup.insert(id, ts, seq);
            }
            if seq >= newest_seq {
                newest_seq = seq;
                newest_id.clear();
                newest_id.push_str(id);
            }
        })?;
        let want = retention_name(cfg.retention).as_bytes();
        if stored.as_deref() != Some(want) {
            store.write_aux(RETENTION_NAME, want)?;
        }
        let last = store.state().last_seq;
        let mut st = Stream {
            last_msg_id: (newest_seq == last && last > 0 && !newest_id.is_empty())
                .then_some(newest_id),
            over_subjects: if cfg.max_msgs_per_subject > 0 {
                store.subject_ids()
            } else {
                Vec::new()
            },
            store,
            cfg: cfg.clone(),
            dedup,
            rollups: Vec::new(),
        };
        st.enforce_limits(now);
        Ok((st, report))
    }

    pub fn config(&self) -> &StreamConfig {
        &self.cfg
    }

    /// The store underneath (read-only).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Checks the JetStream `Nats-Expected-*`, `Nats-Rollup` and `Nats-TTL`
    /// headers of a block with JetStream headers; returns the rollup and
    /// TTL to apply.
    fn check_headers(
        &self,
        msg: &Message,
        h: &[u8],
    ) -> Result<(Option<Rollup>, Option<Duration>), StreamError> {
        let name = &self.cfg.name;
        if let Some(v) = headers::header(h, headers::EXPECTED_STREAM) {
            if v != name {
                return Err(StreamError::WrongStream {
                    expected: v.to_string(),
                    actual: name.clone(),
                });
            }
        }
        let num = |name: &str, v: &str| {
            v.parse::<u64>().map_err(|_| {
                StreamError::BadHeader(format!("{name}: {v:?} is not a sequence number"))
            })
        };
        let last_seq = self.store.state().last_seq;
        if let Some(v) = headers::header(h, headers::EXPECTED_LAST_SEQ) {
            let expected = num(headers::EXPECTED_LAST_SEQ, v)?;
            if expected != last_seq {
                return Err(StreamError::WrongLastSequence {
                    expected,
                    last: last_seq,
                });
            }
        }
        if let Some(v) = headers::header(h, headers::EXPECTED_LAST_SUBJECT_SEQ) {
            let expected = num(headers::EXPECTED_LAST_SUBJECT_SEQ, v)?;
            let last = self
                .store
                .subject_id(&msg.subject)
                .and_then(|id| self.store.subject(id))
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
                if !self.cfg.allow_rollup || self.cfg.deny_purge {
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
                if !self.cfg.allow_msg_ttl {
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

    /// `discard = new`: refuses a message of `len` stored bytes on
    /// `subject` that a limit has no room for. Also refuses one that can
    /// never fit `max_bytes`.
    fn check_room(&self, subject: &str, len: u64) -> Result<(), StreamError> {
        let o = &self.cfg;
        let s = self.store.state();
        if o.max_bytes > 0 && len > o.max_bytes {
            return Err(StreamError::Full(format!(
                "a message of {len} stored bytes can never fit max_bytes {}",
                o.max_bytes
            )));
        }
        if o.discard != super::Discard::New {
            return Ok(());
        }
        if o.max_msgs > 0 && s.msgs >= o.max_msgs {
            return Err(StreamError::Full(format!(
                "max_msgs {} reached (discard = new); remove messages or raise the limit",
                o.max_msgs
            )));
        }
        if o.max_bytes > 0 && s.bytes + len > o.max_bytes {
            return Err(StreamError::Full(format!(
                "max_bytes {} reached (discard = new); remove messages or raise the limit",
                o.max_bytes
            )));
        }
        if o.discard_new_per_subject && o.max_msgs_per_subject > 0 {
            let count = self
                .store
                .subject_id(subject)
                .and_then(|id| self.store.subject(id))
                .map_or(0, |e| e.count);
            if count >= o.max_msgs_per_subject {
                return Err(StreamError::SubjectFull {
                    subject: subject.to_string(),
                    max: o.max_msgs_per_subject,
                });
            }
        }
        Ok(())
    }

    /// Publishes one message at `now` (buffered in the store; durable after
    /// the caller's flush or sync).
    pub fn publish(&mut self, msg: &Message, now: u64) -> Result<PubAck, StreamError> {
        let hdr_len = msg.headers.as_ref().map(Vec::len);
        let size = (hdr_len.unwrap_or(0) + msg.payload.len()) as u64;
        if self.cfg.max_msg_size > 0 && size > self.cfg.max_msg_size {
            return Err(StreamError::TooLarge {
                size,
                max: self.cfg.max_msg_size,
            });
        }
        let nats = msg.headers.as_deref().filter(|h| headers::has_nats(h));
        let id = nats.and_then(|h| headers::header(h, headers::MSG_ID));
        if let (Some(id), true) = (id, self.dedup.window > 0) {
            if let Some(seq) = self.dedup.find(id, now) {
                return Ok(PubAck {
                    seq,
                    duplicate: true,
                });
            }
        }
        let (rollup, ttl) = match nats {
            Some(h) => self.check_headers(msg, h)?,
            None => (None, None),
        };
        let ts = now.max(self.store.last_ts());
        let len = self
            .store
            .next_len(msg.subject.len(), hdr_len, msg.payload.len(), ts);
        if len - PREFIX_LEN as u64 > MAX_BODY as u64 {
            return Err(StreamError::TooLarge {
                size,
                max: MAX_BODY as u64,
            });
        }
        self.check_room(&msg.subject, len)?;
        let rec = NewRecord {
            subject: &msg.subject,
            headers: msg.headers.as_deref(),
            payload: &msg.payload,
            timestamp: ts,
            tags: Tags {
                deadline: ttl.map(|d| ts.saturating_add(nanos(d))),
                id,
            },
        };
        let (seq, sid) = self.store.append(&rec).map_err(|e| match e {
            AppendError::TooLarge { max, .. } => StreamError::TooLarge { size, max },
            AppendError::Io(e) => StreamError::Io(e),
        })?;
        self.last_msg_id = id.map(str::to_string);
        if let (Some(id), true) = (id, self.dedup.window > 0) {
            self.dedup.insert(id, ts, seq);
        }
        if let Some(r) = rollup {
            self.rollups.push((seq, r));
        }
        if self.cfg.max_msgs_per_subject > 0 {
            self.over_subjects.push(sid);
        }
        Ok(PubAck {
            seq,
            duplicate: false,
        })
    }

    /// The current position, for [`Stream::rollback`].
    pub fn mark(&self) -> Mark {
        Mark {
            store: self.store.mark(),
            last_msg_id: self.last_msg_id.clone(),
        }
    }

    /// Undoes every publish after `mark` (store bytes included).
    pub fn rollback(&mut self, mark: Mark) {
        let last = mark.last_seq();
        self.store.rollback(mark.store);
        self.last_msg_id = mark.last_msg_id;
        self.dedup.forget_after(last);
        self.rollups.retain(|(s, _)| *s <= last);
    }

    /// Hands buffered records and tombstones to the disk (no fsync).
    pub fn flush(&mut self) -> io::Result<()> {
        self.store.flush()
    }

    /// Flushes and fsyncs.
    pub fn sync(&mut self) -> io::Result<()> {
        self.store.sync()
    }

    /// Flushes, and fsyncs the appended records but not the tombstones
    /// written since the last [`Stream::sync`] (see
    /// [`Stream::removals_derivable`]).
    pub fn sync_appends(&mut self) -> io::Result<()> {
        self.store.sync_appends()
    }

    /// True when tombstones were written but not fsynced.
    pub fn tombs_unsynced(&self) -> bool {
        self.store.tombs_unsynced()
    }

    /// True when every removal [`Stream::enforce_limits`] would make now
    /// is one it makes again after a crash from the durable records alone
    /// (`max_msgs_per_subject`, `max_msgs`/`max_bytes`, `max_age`, TTLs:
    /// [`Stream::open`] enforces the limits over every subject), so their
    /// tombstones need not be fsynced before the next acknowledgement.
    /// False while a rollup waits: the records it removes would come back.
    pub fn removals_derivable(&self) -> bool {
        self.rollups.is_empty()
    }

    /// Flush, sync, record first/last sequence and write index snapshots.
    pub fn close(&mut self) -> io::Result<()> {
        self.store.close()
    }

    pub fn state(&self) -> StreamState {
        self.store.state().into()
    }

    /// The state as if nothing after `seq` had been published yet.
    pub fn state_upto(&self, seq: u64) -> StreamState {
        self.store.state_upto(seq).into()
    }

    /// The full state. Reads the oldest message for its timestamp.
    pub fn info(&mut self) -> StreamInfo {
        let s = self.state();
        let first_ts = if s.msgs > 0 {
            self.store.first_ts().unwrap_or(0)
        } else {
            0
        };
        StreamInfo {
            first_seq: s.first_seq,
            last_seq: s.last_seq,
            first_ts,
            last_ts: self.store.last_ts(),
            msgs: s.msgs,
            bytes: s.bytes,
            deleted: (s.last_seq + 1)
                .saturating_sub(s.first_seq)
                .saturating_sub(s.msgs),
            subjects: self.store.subject_count() as u64,
        }
    }

    /// Bytes used by the stream's files.
    pub fn disk_usage(&mut self) -> io::Result<u64> {
        self.store.disk_usage()
    }

    /// Up to `max_msgs` messages with `from <= seq <= upto`, about
    /// `max_bytes` (at least one if any).
    pub fn read(
        &mut self,
        from: u64,
        max_msgs: usize,
        max_bytes: usize,
        upto: u64,
    ) -> io::Result<Vec<StoredMessage>> {
        let recs = self.store.read(from, max_msgs, max_bytes, upto)?;
        Ok(recs.into_iter().map(StoredMessage::from).collect())
    }

    /// The message with sequence `seq`, if live.
    pub fn get(&mut self, seq: u64) -> io::Result<Option<StoredMessage>> {
        Ok(self.store.get(seq)?.map(StoredMessage::from))
    }

    /// The newest message whose subject matches `filter`.
    pub fn last_by_subject(&mut self, filter: &str) -> io::Result<Option<StoredMessage>> {
        Ok(self.store.last_by_subject(filter)?.map(StoredMessage::from))
    }

    /// The first message with `seq >= from` whose subject matches `filter`.
    pub fn next_by_subject(
        &mut self,
        filter: &str,
        from: u64,
    ) -> io::Result<Option<StoredMessage>> {
        Ok(self
            .store
            .next_by_subject(filter, from)?
            .map(StoredMessage::from))
    }

    /// Messages with `from <= seq <= upto` whose subject matches `filter`.
    pub fn count_matching(&self, filter: &str, from: u64, upto: u64) -> u64 {
        self.store.count_matching(filter, from, upto)
    }

    /// Sequences of the newest message (`seq <= upto`) of each subject
    /// matching one of `filters`, ascending; `None` beyond `max` subjects.
    pub fn last_per_subject(&self, filters: &[String], upto: u64, max: usize) -> Option<Vec<u64>> {
        self.store.last_per_subject(filters, upto, max)
    }

    /// Message counts of the subjects matching `filter`, sorted.
    pub fn subject_counts(&self, filter: &str) -> Vec<(String, u64)> {
        self.store.subject_counts(filter)
    }

    /// True when [`Stream::maintain`] has work (segment compaction).
    pub fn needs_maintenance(&self) -> bool {
        self.store.needs_maintenance()
    }

    /// One step of background work (compacts at most one segment).
    pub fn maintain(&mut self) -> io::Result<()> {
        self.store.maintain()
    }
}
