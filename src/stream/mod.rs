//! Streams: the JetStream rules on top of the store, and the owner thread.
//!
//! Owns: what a stream means. [`rules`] is the sans-IO [`Stream`]: one
//! stream's [`crate::store::Store`] plus the JetStream rules (duplicate
//! window, `Nats-Expected-*`, rollups, per-message TTLs, the limits and
//! discard policies, purge, delete, retention acks, the retention change
//! check), taking `now` from its caller and reading no clock. `owner.rs`
//! is the thin shell: one thread per stream that batches queued commands
//! into group commits, applies the sync policy, runs the expiry timer and
//! calls [`Stream`]. `handle.rs` is the async side ([`StreamHandle`]).
//! [`consumer`] holds consumer state (run by `server::jsapi`). Of the
//! crate, this module imports only [`crate::store`] and [`crate::subject`]
//! (checked by `tests/layout.rs`). [`names`] is the one validator for
//! names that become file names (streams, consumers, cursors): it lives
//! here because stream and consumer names are its first users.
//!
//! CONTRACT (used by the broker and the uplink):
//!
//! - [`open`] opens (or creates) a stream in its directory, recovers the
//!   store and spawns one owner thread per stream. The thread owns the
//!   [`crate::store`] files; nobody else touches them.
//! - [`StreamHandle::publish`] resolves only once the message is durable
//!   according to the stream's [`SyncPolicy`]: with `Always`, every publish
//!   that was queued while the previous fsync ran shares the next fsync
//!   (group commit). Acks resolve in sequence order.
//! - Limits (max_msgs, max_bytes, max_age, discard old/new) are applied on
//!   append; `discard = "new"` rejects with [`StreamError::Full`].
//! - Every queue is bounded, in commands and in bytes; `publish` awaits
//!   when the owner is busy.
//!
//! IMPLEMENTATION NOTES (owner thread, `owner.rs`):
//!
//! - Commands travel over a bounded `smol::channel` ([`QUEUE_DEPTH`]);
//!   publishes also reserve their size ([`Message::size`]) in a byte
//!   budget of [`QUEUE_BYTES`] per stream before they are queued (an empty
//!   budget takes any one message), given back when their batch is done:
//!   with 1 MiB messages 1,024 queued commands would otherwise hold 1 GiB,
//!   and the batch built from them a copy. Ingest memory per stream is
//!   thus at most about twice `QUEUE_BYTES` plus one message. Replies
//!   travel over a one-slot channel. The thread blocks in `recv_blocking`
//!   when it has no deadline; when it has one (an interval fsync due, or the
//!   oldest message's max_age expiry) it polls `recv` and parks
//!   (`thread::park_timeout`) until a sender wakes it or the deadline
//!   passes, so it wakes while idle without a reactor timer per wait.
//! - Group commit: take one command, drain what is already queued (up to
//!   [`MAX_BATCH`]), publish all of it into one buffered write, then
//!   `Always`: one fsync (fdatasync) per touched segment, then reply to
//!   all. `Interval(d)`: write, reply, fsync once `d` has passed since the
//!   first unsynced write. `Never`: write, reply; fsync only at close.
//! - Publishes nobody waits for ([`StreamHandle::store`]: MQTT QoS 0, NATS
//!   publishes without a reply subject) are not acknowledged, so with
//!   `Always` a batch made only of them is written without an fsync (and
//!   without waiting for more publishers, see `collect`); the next batch
//!   with a waiting publisher fsyncs them with its own, or the owner does
//!   [`LAZY_SYNC_AFTER`] after the first such write. Until then they are
//!   not durable, so readers do not see them yet (order is unchanged:
//!   `durable` is a prefix). A failed fsync drops them: the log is cut
//!   back to the last successful fsync (a failed fsync may have lost their
//!   pages while a later one succeeds, so retrying could make a hole
//!   durable and recovery would then cut the acknowledged records after
//!   it); they are counted in [`StreamHandle::unstored`], as are those the
//!   stream refuses. While they wait, limits, deletes, purges, acks and
//!   compaction wait too (a delete, purge, ack or close fsyncs them first).
//!   After such a batch (any policy) the owner sleeps a quarter of a
//!   millisecond so that the next ones gather unannounced (one wake-up
//!   per period rather than per small batch; `owner::LAZY_GATHER`).
//! - If a publish, write or fsync fails, the whole batch is rolled back
//!   (file truncated to the pre-batch length) and every publisher of the
//!   batch gets [`StreamError::Io`]; later batches try again.
//! - Visibility: [`StreamHandle::state`], [`StreamHandle::read`] and
//!   [`StreamHandle::wait_for`] only see messages that are durable per the
//!   policy: after the fsync with `Always` and `Interval` (so with
//!   `Interval` they lag the acks by up to `d`), after the write with
//!   `Never` (which can lose and then reuse sequences after a power cut).
//!   For an empty stream `first_seq = last_seq + 1` (a new stream: 1 and 0).
//! - Limits (also max_msgs_per_subject, per-message TTLs and rollups) are
//!   applied after each committed batch and on the expiry timer; their
//!   tombstones are written right after. With `Always`, a group commit
//!   fsyncs only the appended records (`Stream::sync_appends`): the
//!   tombstones of limit removals, which [`Stream::open`] makes again from
//!   the records after a crash, are fsynced within a second (one fsync per
//!   second, not one more per commit: a KV bucket with history 1 removes a
//!   revision on every put); those of a rollup are fsynced at once. The
//!   duplicate window is rebuilt at open from the message ids the store
//!   keeps in its snapshots and scans.
//! - Delete, purge, ack, get, last/next by subject, subject counts and info
//!   are handled after the publishes of the batch they arrive in; delete,
//!   purge and ack are durable when they reply. Compaction of a
//!   mostly-deleted segment runs one segment at a time between batches.
//! - `interest`/`workqueue` retention: the consumer layer
//!   ([`consumer`] state, run by `server::jsapi`) calls
//!   [`StreamHandle::ack`] when the last interested consumer (and, for a
//!   mirrored stream, the hub) acknowledged a message.
//! - The owner thread reads the clock; [`Stream`] and the store never do.

pub mod backlog;
pub mod consumer;
mod dedup;
mod handle;
pub mod headers;
mod limits;
pub mod names;
pub mod oneshot;
mod owner;
pub mod push;
pub mod rules;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::store::RecoveryReport;
use crate::store::{Backend, FsBackend, MemBackend, StoreOptions};
pub use handle::{AckWaiter, StreamHandle};
use handle::{Inner, Shared};
pub use rules::{msg_id, store_options, Mark, Stream};

/// Commands queued to one stream's owner before `publish` awaits.
pub const QUEUE_DEPTH: usize = 1024;
/// Most commands handled in one group commit.
pub const MAX_BATCH: usize = 1024;
/// Bytes of publishes queued to (or being written by) one stream's owner
/// before `publish`/`submit` await.
pub const QUEUE_BYTES: usize = 4 << 20;
/// [`SyncPolicy::Always`]: the longest messages nobody waits for
/// ([`StreamHandle::store`]) stay written but not fsynced (and so not yet
/// visible to readers) when no acknowledged publish comes to share an
/// fsync with them.
pub const LAZY_SYNC_AFTER: Duration = Duration::from_millis(10);

/// When appended records are flushed to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fsync before acknowledging (group commit). The default.
    Always,
    /// fsync at most this long after a write; ack after the write.
    Interval(Duration),
    /// never fsync explicitly (the OS decides); ack after the write.
    Never,
}

/// What happens when a limit is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    Old,
    New,
}

/// When messages leave the stream (besides the limits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Retention {
    /// Only the limits remove messages.
    #[default]
    Limits,
    /// A message goes once every interested consumer acknowledged it
    /// ([`StreamHandle::ack`], called by the consumer layer).
    Interest,
    /// A message goes once one consumer acknowledged it ([`StreamHandle::ack`]).
    WorkQueue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    File,
    Memory,
}

/// A stream's configuration, already validated by `config`.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamConfig {
    pub name: String,
    /// NATS subjects (wildcards allowed) captured into this stream.
    pub subjects: Vec<String>,
    pub storage: Storage,
    pub sync: SyncPolicy,
    /// 0 = unlimited for all the limits below.
    pub max_msgs: u64,
    pub max_bytes: u64,
    pub max_age: Duration,
    pub max_msgs_per_subject: u64,
    pub max_msg_size: u64,
    pub discard: Discard,
    /// With `discard = New` and `max_msgs_per_subject`: reject a message
    /// whose subject is full instead of dropping the subject's oldest.
    pub discard_new_per_subject: bool,
    pub duplicate_window: Duration,
    pub retention: Retention,
    /// Accept `Nats-Rollup` headers.
    pub allow_rollup: bool,
    /// Refuse [`StreamHandle::delete`].
    pub deny_delete: bool,
    /// Refuse [`StreamHandle::purge`] (and rollups).
    pub deny_purge: bool,
    /// Accept `Nats-TTL` headers.
    pub allow_msg_ttl: bool,
    /// Answer `$JS.API.DIRECT.GET.<stream>` (direct get).
    pub allow_direct: bool,
    /// Key for encrypted segments (the global `encryption_key_file`).
    pub key: Option<crate::store::crypt::Key>,
    /// Encrypt new records with `key`.
    pub encrypt: bool,
    /// JetStream `mirror_direct` (stored and rendered only).
    pub mirror_direct: bool,
    /// JetStream `metadata`: user key/value pairs, kept and rendered.
    pub metadata: Vec<(String, String)>,
}

impl StreamConfig {
    /// A file stream capturing `subjects` with JetStream's defaults: sync
    /// `always`, no limits, discard old, 2-minute duplicate window,
    /// `limits` retention, no special headers honoured, not encrypted.
    pub fn new(name: &str, subjects: &[&str]) -> StreamConfig {
        StreamConfig {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            storage: Storage::File,
            sync: SyncPolicy::Always,
            max_msgs: 0,
            max_bytes: 0,
            max_age: Duration::ZERO,
            max_msgs_per_subject: 0,
            max_msg_size: 0,
            discard: Discard::Old,
            discard_new_per_subject: false,
            duplicate_window: Duration::from_secs(120),
            retention: Retention::Limits,
            allow_rollup: false,
            deny_delete: false,
            deny_purge: false,
            allow_msg_ttl: false,
            allow_direct: false,
            key: None,
            encrypt: false,
            mirror_direct: false,
            metadata: Vec::new(),
        }
    }
}

/// A message to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    /// Raw NATS header block (`NATS/1.0\r\n...\r\n\r\n`), if any.
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

impl Message {
    /// Bytes it holds (what it counts against [`QUEUE_BYTES`]).
    pub fn size(&self) -> usize {
        64 + self.subject.len() + self.headers.as_ref().map_or(0, Vec::len) + self.payload.len()
    }
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    /// Unix time in nanoseconds, assigned at append.
    pub timestamp: u64,
    pub subject: String,
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubAck {
    pub seq: u64,
    pub duplicate: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamState {
    pub first_seq: u64,
    pub last_seq: u64,
    pub msgs: u64,
    pub bytes: u64,
}

/// The full state of a stream ([`StreamHandle::info`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamInfo {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Unix ns of the oldest live message (0 if empty).
    pub first_ts: u64,
    /// Unix ns of the newest message ever stored (0 if none).
    pub last_ts: u64,
    pub msgs: u64,
    pub bytes: u64,
    /// Sequences between first and last that are not live (deleted).
    pub deleted: u64,
    /// Distinct subjects with live messages.
    pub subjects: u64,
}

/// What [`StreamHandle::purge`] removes: messages matching `subject`
/// (a filter; all if `None`) with `seq < upto_seq`, except the newest
/// `keep`. `upto_seq` and `keep` exclude each other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeRequest {
    pub subject: Option<String>,
    pub upto_seq: Option<u64>,
    pub keep: Option<u64>,
}

#[derive(Debug)]
pub enum StreamError {
    /// discard = new and a limit is reached.
    Full(String),
    /// The message exceeds max_msg_size.
    TooLarge { size: u64, max: u64 },
    /// An I/O error from the store (ENOSPC included); nothing was stored.
    Io(std::io::Error),
    /// The stream's owner thread has stopped (shutdown).
    Closed,
    /// `Nats-Expected-Stream` names another stream (JetStream 10060).
    WrongStream { expected: String, actual: String },
    /// `Nats-Expected-Last-Sequence` does not match (JetStream 10071).
    WrongLastSequence { expected: u64, last: u64 },
    /// `Nats-Expected-Last-Subject-Sequence` does not match (JetStream 10071).
    WrongLastSubjectSequence {
        subject: String,
        expected: u64,
        last: u64,
    },
    /// `Nats-Expected-Last-Msg-Id` does not match (JetStream 10070).
    WrongLastMsgId {
        expected: String,
        last: Option<String>,
    },
    /// `Nats-Rollup` on a stream without `allow_rollup` (JetStream 10111).
    RollupDenied(String),
    /// `Nats-TTL` on a stream without `allow_msg_ttl` (JetStream 10166).
    TtlDisabled,
    /// `Nats-TTL` malformed (JetStream 10165).
    InvalidTtl(String),
    /// A header the store acts on is malformed (JetStream 10003).
    BadHeader(String),
    /// `discard_new_per_subject` and the subject holds
    /// `max_msgs_per_subject` messages (JetStream 10077).
    SubjectFull { subject: String, max: u64 },
    /// The stream has `deny_delete` (JetStream 10057).
    DeleteDenied,
    /// The stream has `deny_purge` (JetStream 10110).
    PurgeDenied,
    /// A request that makes no sense for this stream (JetStream 10003).
    BadRequest(String),
}

impl StreamError {
    /// The JetStream API error code for this error, where one exists.
    pub fn code(&self) -> Option<u16> {
        Some(match self {
            StreamError::Full(_) => 10077,
            StreamError::TooLarge { .. } => 10054,
            StreamError::Io(_) => 10077,
            StreamError::Closed => return None,
            StreamError::WrongStream { .. } => 10060,
            StreamError::WrongLastSequence { .. } => 10071,
            StreamError::WrongLastSubjectSequence { .. } => 10071,
            StreamError::WrongLastMsgId { .. } => 10070,
            StreamError::RollupDenied(_) => 10111,
            StreamError::TtlDisabled => 10166,
            StreamError::InvalidTtl(_) => 10165,
            StreamError::BadHeader(_) | StreamError::BadRequest(_) => 10003,
            StreamError::SubjectFull { .. } => 10077,
            StreamError::DeleteDenied => 10057,
            StreamError::PurgeDenied => 10110,
        })
    }
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Full(why) => write!(f, "stream full: {why}"),
            StreamError::TooLarge { size, max } => {
                write!(f, "message of {size} bytes exceeds max_msg_size {max}")
            }
            StreamError::Io(e) => write!(f, "storage error: {e}"),
            StreamError::Closed => write!(f, "stream is shut down"),
            StreamError::WrongStream { expected, actual } => write!(
                f,
                "expected stream {expected:?} (Nats-Expected-Stream) but this is stream {actual:?}"
            ),
            StreamError::WrongLastSequence { expected, last } => write!(
                f,
                "wrong last sequence: expected {expected} (Nats-Expected-Last-Sequence), the stream's last is {last}"
            ),
            StreamError::WrongLastSubjectSequence {
                subject,
                expected,
                last,
            } => write!(
                f,
                "wrong last sequence for subject {subject:?}: expected {expected} (Nats-Expected-Last-Subject-Sequence), it is {last}"
            ),
            StreamError::WrongLastMsgId { expected, last } => write!(
                f,
                "wrong last msg id: expected {expected:?} (Nats-Expected-Last-Msg-Id), the last message has {}",
                last.as_deref().map_or("none".to_string(), |l| format!("{l:?}"))
            ),
            StreamError::RollupDenied(why) => write!(f, "rollup refused: {why}"),
            StreamError::TtlDisabled => write!(
                f,
                "per-message TTL (Nats-TTL) is disabled on this stream; set allow_msg_ttl = true"
            ),
            StreamError::InvalidTtl(why) => write!(f, "invalid per-message TTL: {why}"),
            StreamError::BadHeader(why) => write!(f, "bad header: {why}"),
            StreamError::SubjectFull { subject, max } => write!(
                f,
                "maximum messages per subject exceeded: {subject:?} holds max_msgs_per_subject {max} (discard_new_per_subject)"
            ),
            StreamError::DeleteDenied => {
                write!(f, "message delete not permitted: the stream has deny_delete")
            }
            StreamError::PurgeDenied => write!(f, "purge not permitted: the stream has deny_purge"),
            StreamError::BadRequest(why) => write!(f, "bad request: {why}"),
        }
    }
}

impl std::error::Error for StreamError {}

/// Open or create the stream stored in `dir`.
pub fn open(dir: &Path, cfg: StreamConfig) -> Result<(StreamHandle, RecoveryReport), StreamError> {
    let backend: Box<dyn Backend> = match cfg.storage {
        Storage::File => Box::new(FsBackend::open(dir).map_err(StreamError::Io)?),
        Storage::Memory => Box::new(MemBackend::new()),
    };
    open_with_backend(backend, cfg, None)
}

/// Tells the operator what recovery cut and whether any of it had been
/// acknowledged.
fn log_recovery(cfg: &StreamConfig, r: &RecoveryReport) {
    let name = &cfg.name;
    if r.truncated_bytes > 0 {
        let whose = match cfg.sync {
            SyncPolicy::Always => {
                "with sync = \"always\" none of them had been acknowledged: they were publishes \
                 nobody waits for (MQTT QoS 0, NATS without reply) not yet fsynced at a crash, or \
                 a torn write; nothing to do (after a clean shutdown this means disk damage: \
                 check the disk)"
            }
            SyncPolicy::Interval(_) => {
                "with sync = \"interval\" they may include publishes acknowledged less than one \
                 interval before a crash; use sync = \"always\" if that is not acceptable"
            }
            SyncPolicy::Never => {
                "with sync = \"never\" they may include acknowledged publishes the OS had not \
                 written at a crash"
            }
        };
        log::warn!(
            "stream {name}: recovery cut {} damaged bytes (at least {} records at the end of \
             the log; {} records intact); {whose}",
            r.truncated_bytes,
            r.cut_records,
            r.records
        );
    }
    if r.lost_records > 0 {
        log::error!(
            "stream {name}: recovery skipped {} damaged records inside the log (disk damage, \
             acknowledged or not); check the disk",
            r.lost_records
        );
    }
}

/// Open a stream on a given backend (tests: [`MemBackend`] for crash
/// simulation). `opts` overrides the store options derived from `cfg`
/// ([`store_options`], e.g. a small segment size; the tagger is always the
/// stream's).
pub fn open_with_backend(
    backend: Box<dyn Backend>,
    cfg: StreamConfig,
    opts: Option<StoreOptions>,
) -> Result<(StreamHandle, RecoveryReport), StreamError> {
    let opts = opts.unwrap_or_else(|| store_options(&cfg));
    let (stream, report) =
        Stream::open(backend, &cfg, opts, owner::now_ns()).map_err(StreamError::Io)?;
    if report.truncated_bytes > 0 || report.lost_records > 0 {
        log_recovery(&cfg, &report);
    }
    let shared = Arc::new(Shared {
        state: Mutex::new(stream.state()),
        changed: event_listener::Event::new(),
        closed: AtomicBool::new(false),
        queued_bytes: AtomicUsize::new(0),
        room: event_listener::Event::new(),
        unstored: AtomicU64::new(0),
    });
    let (tx, rx) = smol::channel::bounded(QUEUE_DEPTH);
    let thread = {
        let shared = shared.clone();
        let policy = cfg.sync;
        std::thread::Builder::new()
            .name(format!("stream-{}", cfg.name))
            .spawn(move || owner::run(stream, rx, shared, policy))
            .map_err(StreamError::Io)?
    };
    let handle = StreamHandle {
        inner: Arc::new(Inner {
            cfg,
            tx,
            shared,
            thread: Mutex::new(Some(thread)),
        }),
    };
    Ok((handle, report))
}

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod rules_tests;
// The same rule tests with every stream encrypted.
#[cfg(test)]
#[allow(clippy::duplicate_mod)]
#[path = "rules_tests.rs"]
mod rules_tests_encrypted;
#[cfg(test)]
mod tests;
