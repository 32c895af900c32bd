//! The handle side of a stream: [`StreamHandle`] (cheap to clone, async),
//! the commands it queues to the owner thread, and the durable state the
//! owner publishes for it.
//!
//! Invariants: every queue is bounded ([`QUEUE_DEPTH`] commands, and
//! [`QUEUE_BYTES`] of publishes, reserved before sending and given back
//! by the owner after their batch); a reply channel carries exactly one
//! answer; dropping the last handle stops the owner after a final sync.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::QUEUE_BYTES;
use super::{oneshot, Message};
use super::{
    PubAck, PurgeRequest, StoredMessage, StreamConfig, StreamError, StreamInfo, StreamState,
};
#[cfg(doc)]
use super::{SyncPolicy, LAZY_SYNC_AFTER, QUEUE_DEPTH};

/// State shared between the handles and the owner thread.
pub(super) struct Shared {
    /// The durable view (see the module notes).
    pub state: Mutex<StreamState>,
    /// Notified after every change of `state` and at shutdown.
    pub changed: event_listener::Event,
    pub closed: AtomicBool,
    /// Bytes of publishes reserved ([`QUEUE_BYTES`]).
    pub queued_bytes: AtomicUsize,
    /// Notified when reserved bytes are given back, and at shutdown.
    pub room: event_listener::Event,
    /// Publishes nobody waits for that were not stored, or dropped before
    /// their fsync ([`StreamHandle::unstored`]).
    pub unstored: AtomicU64,
}

impl Shared {
    pub fn state(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserve `n` bytes if they fit (or none are reserved, or the owner
    /// is gone: the send then fails).
    fn try_reserve(&self, n: usize) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        let mut cur = self.queued_bytes.load(Ordering::Acquire);
        loop {
            if cur > 0 && cur.saturating_add(n) > QUEUE_BYTES {
                return false;
            }
            match self.queued_bytes.compare_exchange_weak(
                cur,
                cur.saturating_add(n),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Wait until `n` bytes are reserved.
    async fn reserve(&self, n: usize) {
        loop {
            if self.try_reserve(n) {
                return;
            }
            let listener = self.room.listen();
            if self.try_reserve(n) {
                return;
            }
            listener.await;
        }
    }

    /// Give back `n` reserved bytes.
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let _ = self
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                Some(c.saturating_sub(n))
            });
        self.room.notify(usize::MAX);
    }
}

pub(super) type Reply<T> = oneshot::Sender<T>;

pub(super) enum Cmd {
    /// A publish, with its acknowledgement's channel; `None`: nobody waits
    /// ([`StreamHandle::store`]).
    Publish(Message, Option<Reply<Result<PubAck, StreamError>>>),
    Read {
        from: u64,
        max_msgs: usize,
        max_bytes: usize,
        reply: Reply<Result<Vec<StoredMessage>, StreamError>>,
    },
    DiskUsage(Reply<Result<u64, StreamError>>),
    Close(Reply<()>),
    Delete {
        seq: u64,
        secure: bool,
        reply: Reply<Result<bool, StreamError>>,
    },
    Purge(PurgeRequest, Reply<Result<u64, StreamError>>),
    Ack(u64, Reply<Result<bool, StreamError>>),
    AckMany(Vec<u64>, Reply<Result<u64, StreamError>>),
    Get(u64, Reply<Result<Option<StoredMessage>, StreamError>>),
    LastBySubject(String, Reply<Result<Option<StoredMessage>, StreamError>>),
    NextBySubject(
        String,
        u64,
        Reply<Result<Option<StoredMessage>, StreamError>>,
    ),
    SubjectCounts(String, Reply<Result<Vec<(String, u64)>, StreamError>>),
    CountMatching(String, u64, u64, Reply<Result<u64, StreamError>>),
    LastPerSubject(Vec<String>, u64, usize, Reply<LastSeqs>),
    Info(Reply<Result<StreamInfo, StreamError>>),
}

/// Answer of [`StreamHandle::last_per_subject`].
pub type LastSeqs = Result<Option<Vec<u64>>, StreamError>;

pub(super) struct Inner {
    pub cfg: StreamConfig,
    pub tx: smol::channel::Sender<Cmd>,
    pub shared: Arc<Shared>,
    pub thread: Mutex<Option<JoinHandle<()>>>,
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
    pub(super) inner: Arc<Inner>,
}

impl StreamHandle {
    pub fn config(&self) -> &StreamConfig {
        &self.inner.cfg
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, StreamError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .send(make(tx))
            .await
            .map_err(|_| StreamError::Closed)?;
        rx.await.map_err(|_| StreamError::Closed)
    }

    /// Append; resolves when durable per the sync policy.
    pub async fn publish(&self, msg: Message) -> Result<PubAck, StreamError> {
        let (tx, rx) = oneshot::channel();
        self.queue(msg, Some(tx)).await?;
        rx.await.map_err(|_| StreamError::Closed)?
    }

    /// Reserve the message's bytes, then queue it to the owner.
    async fn queue(
        &self,
        msg: Message,
        ack: Option<Reply<Result<PubAck, StreamError>>>,
    ) -> Result<(), StreamError> {
        let n = msg.size();
        self.inner.shared.reserve(n).await;
        if self.inner.tx.send(Cmd::Publish(msg, ack)).await.is_err() {
            // Never queued: give its bytes back (the owner gives back
            // those of what it took).
            self.inner.shared.release(n);
            return Err(StreamError::Closed);
        }
        Ok(())
    }

    /// Queue a message for appending and return at once with a waiter for
    /// its acknowledgement. Messages submitted one after another by the same
    /// caller are stored in that order. Awaits only while the owner's queue
    /// is full (backpressure).
    pub async fn submit(&self, msg: Message) -> Result<AckWaiter, StreamError> {
        let (tx, rx) = oneshot::channel();
        self.queue(msg, Some(tx)).await?;
        Ok(AckWaiter { rx, done: None })
    }

    /// Queue a message nobody waits for (an MQTT QoS 0 publish, a NATS
    /// publish without a reply subject): stored in order with what the
    /// same caller submits, but with [`SyncPolicy::Always`] a batch of
    /// only such messages is written without its own fsync; it becomes
    /// durable (and visible to readers) with the next fsync, at the latest
    /// [`LAZY_SYNC_AFTER`] later. If that fsync fails, it is dropped (never
    /// made durable by a later one). A message the stream refuses (full,
    /// too large, ...) or drops is counted in [`StreamHandle::unstored`]
    /// and logged (at most every 10 s per stream); `Ok` means only that it
    /// was queued. Awaits only while the owner's queue is full
    /// (backpressure).
    pub async fn store(&self, msg: Message) -> Result<(), StreamError> {
        self.queue(msg, None).await
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

    /// Delete one message. With `secure`, its bytes on disk are overwritten
    /// too. Ok(false) if there is no such message. Durable when it returns.
    pub async fn delete(&self, seq: u64, secure: bool) -> Result<bool, StreamError> {
        self.call(|reply| Cmd::Delete { seq, secure, reply })
            .await?
    }

    /// Purge messages (see [`PurgeRequest`]); returns how many went.
    /// Durable when it returns.
    pub async fn purge(&self, req: PurgeRequest) -> Result<u64, StreamError> {
        self.call(|r| Cmd::Purge(req, r)).await?
    }

    /// Retention `interest`/`workqueue`: every interested consumer has
    /// acknowledged `seq`, so it is removed. `BadRequest` with `limits`.
    pub async fn ack(&self, seq: u64) -> Result<bool, StreamError> {
        self.call(|r| Cmd::Ack(seq, r)).await?
    }

    /// [`StreamHandle::ack`] for many sequences at once: their tombstones
    /// are written and synced together (one fsync). Returns how many were
    /// removed.
    pub async fn ack_many(&self, seqs: Vec<u64>) -> Result<u64, StreamError> {
        self.call(|r| Cmd::AckMany(seqs, r)).await?
    }

    /// The message with sequence `seq` (None if absent or deleted).
    pub async fn get(&self, seq: u64) -> Result<Option<StoredMessage>, StreamError> {
        self.call(|r| Cmd::Get(seq, r)).await?
    }

    /// The newest message whose subject matches `filter`.
    pub async fn last_by_subject(
        &self,
        filter: &str,
    ) -> Result<Option<StoredMessage>, StreamError> {
        let f = filter.to_string();
        self.call(|r| Cmd::LastBySubject(f, r)).await?
    }

    /// The first message with `seq >= from` whose subject matches `filter`.
    pub async fn next_by_subject(
        &self,
        filter: &str,
        from: u64,
    ) -> Result<Option<StoredMessage>, StreamError> {
        let f = filter.to_string();
        self.call(|r| Cmd::NextBySubject(f, from, r)).await?
    }

    /// Message counts per subject matching `filter` (`">"` for all), sorted.
    pub async fn subject_counts(&self, filter: &str) -> Result<Vec<(String, u64)>, StreamError> {
        let f = filter.to_string();
        self.call(|r| Cmd::SubjectCounts(f, r)).await?
    }

    /// Messages with `from <= seq <= upto` whose subject matches `filter`
    /// (exact; `upto` is clamped to what is durable).
    pub async fn count_matching(
        &self,
        filter: &str,
        from: u64,
        upto: u64,
    ) -> Result<u64, StreamError> {
        let f = filter.to_string();
        self.call(|r| Cmd::CountMatching(f, from, upto, r)).await?
    }

    /// Sequences of the newest message with `seq <= upto` of each subject
    /// matching one of `filters`, ascending; `Ok(None)` if there are more
    /// than `max` such subjects.
    pub async fn last_per_subject(&self, filters: &[String], upto: u64, max: usize) -> LastSeqs {
        let f = filters.to_vec();
        self.call(|r| Cmd::LastPerSubject(f, upto, max, r)).await?
    }

    /// The full state (a round trip to the owner).
    pub async fn info(&self) -> Result<StreamInfo, StreamError> {
        self.call(Cmd::Info).await?
    }

    /// Publishes nobody waited for ([`StreamHandle::store`]) that were not
    /// stored (refused, or dropped after a failed fsync) since the open.
    pub fn unstored(&self) -> u64 {
        self.inner.shared.unstored.load(Ordering::Relaxed)
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
    rx: oneshot::Receiver<Result<PubAck, StreamError>>,
    done: Option<Result<PubAck, StreamError>>,
}

impl AckWaiter {
    /// Wait until the result is known (cancel-safe; the result is kept for
    /// [`AckWaiter::try_take`]).
    pub async fn wait(&mut self) {
        if self.done.is_none() {
            self.done = Some((&mut self.rx).await.unwrap_or(Err(StreamError::Closed)));
        }
    }

    /// The result, once known (taken: later calls return `None`).
    pub fn try_take(&mut self) -> Option<Result<PubAck, StreamError>> {
        if self.done.is_none() {
            self.done = self
                .rx
                .try_recv()
                .map(|r| r.unwrap_or(Err(StreamError::Closed)));
        }
        self.done.take()
    }
}
