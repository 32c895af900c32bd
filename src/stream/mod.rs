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
//!
//! IMPLEMENTATION NOTES (owner thread, `owner.rs`):
//!
//! - Commands travel over a bounded `smol::channel` ([`QUEUE_DEPTH`]);
//!   replies over a one-slot channel. The thread blocks in `recv_blocking`
//!   when it has no deadline; when it has one (an interval fsync due, or the
//!   oldest message's max_age expiry) it races `recv` against an
//!   `async_io::Timer` inside `smol::block_on`, so it wakes while idle.
//! - Group commit: take one command, drain what is already queued (up to
//!   [`MAX_BATCH`]), append all of it into one buffered write, then `Always`:
//!   one fsync (fdatasync) per touched segment, then reply to all.
//!   `Interval(d)`: write, reply, fsync once `d` has passed since the first
//!   unsynced write. `Never`: write, reply; fsync only at close.
//! - If an append, write or fsync fails, the whole batch is rolled back
//!   (file truncated to the pre-batch length) and every publisher of the
//!   batch gets [`StreamError::Io`]; later batches try again.
//! - Visibility: [`StreamHandle::state`], [`StreamHandle::read`] and
//!   [`StreamHandle::wait_for`] only see messages that are durable per the
//!   policy: after the fsync with `Always` and `Interval` (so with
//!   `Interval` they lag the acks by up to `d`), after the write with
//!   `Never` (which can lose and then reuse sequences after a power cut).
//!   For an empty stream `first_seq = last_seq + 1` (a new stream: 1 and 0).
//! - Limits are applied after each committed batch and on the max_age
//!   timer; duplicate-window ids live in memory only.
//! - The thread reads the clock; the store never does.

mod owner;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::store::{Backend, FsBackend, MemBackend, Store, StoreOptions};

/// Commands queued to one stream's owner before `publish` awaits.
pub const QUEUE_DEPTH: usize = 1024;
/// Most commands handled in one group commit.
pub const MAX_BATCH: usize = 1024;

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

/// State shared between the handles and the owner thread.
struct Shared {
    /// The durable view (see the module notes).
    state: Mutex<StreamState>,
    /// Notified after every change of `state` and at shutdown.
    changed: event_listener::Event,
    closed: AtomicBool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type Reply<T> = smol::channel::Sender<T>;

enum Cmd {
    Publish(Message, Reply<Result<PubAck, StreamError>>),
    Read {
        from: u64,
        max_msgs: usize,
        max_bytes: usize,
        reply: Reply<Result<Vec<StoredMessage>, StreamError>>,
    },
    DiskUsage(Reply<Result<u64, StreamError>>),
    Close(Reply<()>),
}

struct Inner {
    cfg: StreamConfig,
    tx: smol::channel::Sender<Cmd>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    fn take_thread(&self) -> Option<JoinHandle<()>> {
        self.thread.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for Inner {
    /// The last handle went away: let the owner sync and stop, and wait for
    /// it (a short block for the final fsync).
    fn drop(&mut self) {
        self.tx.close();
        if let Some(t) = self.take_thread() {
            if t.join().is_err() {
                log::error!("stream {}: owner thread panicked", self.cfg.name);
            }
        }
    }
}

/// A cheap, cloneable handle to a stream's owner thread.
#[derive(Clone)]
pub struct StreamHandle {
    inner: Arc<Inner>,
}

impl StreamHandle {
    pub fn config(&self) -> &StreamConfig {
        &self.inner.cfg
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, StreamError> {
        let (tx, rx) = smol::channel::bounded(1);
        self.inner
            .tx
            .send(make(tx))
            .await
            .map_err(|_| StreamError::Closed)?;
        rx.recv().await.map_err(|_| StreamError::Closed)
    }

    /// Append; resolves when durable per the sync policy.
    pub async fn publish(&self, msg: Message) -> Result<PubAck, StreamError> {
        self.call(|r| Cmd::Publish(msg, r)).await?
    }

    /// Queue a message for appending and return at once with a waiter for
    /// its acknowledgement. Messages submitted one after another by the same
    /// caller are stored in that order. Awaits only while the owner's queue
    /// is full (backpressure).
    pub async fn submit(&self, msg: Message) -> Result<AckWaiter, StreamError> {
        let (tx, rx) = smol::channel::bounded(1);
        self.inner
            .tx
            .send(Cmd::Publish(msg, tx))
            .await
            .map_err(|_| StreamError::Closed)?;
        Ok(AckWaiter { rx, done: None })
    }

    /// Messages with `seq >= from`, in order, skipping deleted ones, at most
    /// `max_msgs` and about `max_bytes` (at least one if any exists).
    pub async fn read(
        &self,
        from: u64,
        max_msgs: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StreamError> {
        self.call(|reply| Cmd::Read {
            from,
            max_msgs,
            max_bytes,
            reply,
        })
        .await?
    }

    /// Bytes the stream's files use on disk (0 for memory storage is not
    /// guaranteed: it reports the in-memory file sizes).
    pub async fn disk_usage(&self) -> Result<u64, StreamError> {
        self.call(Cmd::DiskUsage).await?
    }

    /// Current state (cheap, no round trip to the owner).
    pub fn state(&self) -> StreamState {
        *self.inner.shared.state()
    }

    /// Resolves once `last_seq >= seq` or the stream is closed.
    pub async fn wait_for(&self, seq: u64) {
        let shared = &self.inner.shared;
        let done = || shared.state().last_seq >= seq || shared.closed.load(Ordering::Acquire);
        loop {
            if done() {
                return;
            }
            let listener = shared.changed.listen();
            if done() {
                return;
            }
            listener.await;
        }
    }

    /// Flush, sync, write the meta file, stop the owner thread and wait
    /// for it. Later calls on any clone return `Closed`. Idempotent.
    pub async fn close(&self) {
        let _ = self.call(Cmd::Close).await;
        self.inner.tx.close();
        if let Some(t) = self.inner.take_thread() {
            let name = self.inner.cfg.name.clone();
            smol::unblock(move || {
                if t.join().is_err() {
                    log::error!("stream {name}: owner thread panicked");
                }
            })
            .await;
        }
    }
}

/// The acknowledgement of one submitted message.
pub struct AckWaiter {
    rx: smol::channel::Receiver<Result<PubAck, StreamError>>,
    done: Option<Result<PubAck, StreamError>>,
}

impl AckWaiter {
    /// Wait until the result is known (cancel-safe; the result is kept for
    /// [`AckWaiter::try_take`]).
    pub async fn wait(&mut self) {
        if self.done.is_none() {
            self.done = Some(self.rx.recv().await.unwrap_or(Err(StreamError::Closed)));
        }
    }

    /// The result, once known (taken: later calls return `None`).
    pub fn try_take(&mut self) -> Option<Result<PubAck, StreamError>> {
        if self.done.is_none() {
            match self.rx.try_recv() {
                Ok(r) => self.done = Some(r),
                Err(smol::channel::TryRecvError::Closed) => {
                    self.done = Some(Err(StreamError::Closed))
                }
                Err(smol::channel::TryRecvError::Empty) => {}
            }
        }
        self.done.take()
    }
}

/// Open or create the stream stored in `dir`.
pub fn open(dir: &Path, cfg: StreamConfig) -> Result<(StreamHandle, RecoveryReport), StreamError> {
    let backend: Box<dyn Backend> = match cfg.storage {
        Storage::File => Box::new(FsBackend::open(dir).map_err(StreamError::Io)?),
        Storage::Memory => Box::new(MemBackend::new()),
    };
    open_with_backend(backend, cfg, None)
}

/// Open a stream on a given backend (tests: [`MemBackend`] for crash
/// simulation). `opts` overrides the store options derived from `cfg`
/// (e.g. a small segment size).
pub fn open_with_backend(
    backend: Box<dyn Backend>,
    cfg: StreamConfig,
    opts: Option<StoreOptions>,
) -> Result<(StreamHandle, RecoveryReport), StreamError> {
    let opts = opts.unwrap_or_else(|| StoreOptions::from_config(&cfg));
    let (store, report) = Store::open(backend, opts, owner::now_ns()).map_err(StreamError::Io)?;
    if report.truncated_bytes > 0 || report.lost_records > 0 {
        log::warn!(
            "stream {}: recovery cut {} damaged bytes; {} records lost; {} records intact",
            cfg.name,
            report.truncated_bytes,
            report.lost_records,
            report.records
        );
    }
    let shared = Arc::new(Shared {
        state: Mutex::new(store.state()),
        changed: event_listener::Event::new(),
        closed: AtomicBool::new(false),
    });
    let (tx, rx) = smol::channel::bounded(QUEUE_DEPTH);
    let thread = {
        let shared = shared.clone();
        let policy = cfg.sync;
        std::thread::Builder::new()
            .name(format!("stream-{}", cfg.name))
            .spawn(move || owner::run(store, rx, shared, policy))
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
mod tests;
