//! Streams: the semantics on top of the store, and the owner thread.
//!
//! CONTRACT (used by the broker and the uplink; helper-implemented):
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
//! - Every queue is bounded; `publish` awaits when the owner is busy.

use std::path::Path;
use std::time::Duration;

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
    pub duplicate_window: Duration,
}

/// A message to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    /// Raw NATS header block (`NATS/1.0\r\n...\r\n\r\n`), if any.
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
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

/// What recovery found when the stream was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub records: u64,
    /// Bytes cut from torn or corrupt tails.
    pub truncated_bytes: u64,
    /// Records known lost (a corrupt record in the middle, skipped).
    pub lost_records: u64,
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
        }
    }
}

impl std::error::Error for StreamError {}

/// A cheap, cloneable handle to a stream's owner thread.
#[derive(Clone)]
pub struct StreamHandle {
    _todo: (),
}

impl StreamHandle {
    pub fn config(&self) -> &StreamConfig {
        todo!()
    }
    /// Append; resolves when durable per the sync policy.
    pub async fn publish(&self, _msg: Message) -> Result<PubAck, StreamError> {
        todo!()
    }
    /// Queue a message for appending and return at once with a waiter for
    /// its acknowledgement. Messages submitted one after another by the same
    /// caller are stored in that order. Awaits only while the owner's queue
    /// is full (backpressure).
    pub async fn submit(&self, _msg: Message) -> Result<AckWaiter, StreamError> {
        todo!()
    }
    /// Messages with `seq >= from`, in order, skipping deleted ones, at most
    /// `max_msgs` and about `max_bytes` (at least one if any exists).
    pub async fn read(
        &self,
        _from: u64,
        _max_msgs: usize,
        _max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StreamError> {
        todo!()
    }
    /// Current state (cheap, no round trip to the owner).
    pub fn state(&self) -> StreamState {
        todo!()
    }
    /// Resolves once `last_seq >= seq` or the stream is closed.
    pub async fn wait_for(&self, _seq: u64) {
        todo!()
    }
    /// Flush, sync, write the index snapshot, stop the owner thread and wait
    /// for it. Later calls on any clone return `Closed`.
    pub async fn close(&self) {
        todo!()
    }
}

/// The acknowledgement of one submitted message.
pub struct AckWaiter {
    _todo: (),
}

impl AckWaiter {
    /// Wait until the result is known (cancel-safe; the result is kept).
    pub async fn wait(&mut self) {
        todo!()
    }
    /// The result, once known (taken: later calls return `None`).
    pub fn try_take(&mut self) -> Option<Result<PubAck, StreamError>> {
        todo!()
    }
}

/// Open or create the stream stored in `dir`.
pub fn open(_dir: &Path, _cfg: StreamConfig) -> Result<(StreamHandle, RecoveryReport), StreamError> {
    todo!()
}
