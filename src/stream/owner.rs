//! The per-stream owner thread, a thin shell around [`Stream`]: the only
//! code that touches a stream (and so its store). Batches queued commands
//! into group commits, applies the sync policy, reads the clock and passes
//! `now` in, runs the expiry timer and publishes the durable state. No
//! JetStream rule is decided here.
//!
//! Invariants: a publisher is acknowledged only after its batch was written
//! (and fsynced with `Always`); a failed batch leaves no bytes behind and
//! acknowledges nobody; `durable` never exceeds what the policy made safe,
//! and [`Shared::state`] and reads never go beyond `durable`.
//!
//! `Always` and publishes nobody waits for (`synced`): a failed fsync may
//! have lost their pages without a trace (Linux marks them clean and a
//! later fsync succeeds), so it rolls the log back to the last successful
//! fsync and drops them (counted, logged): nothing written before a failed
//! fsync is made durable by a later one. While they wait, no removal
//! (limits, delete, purge, ack) and no compaction runs, so that rollback
//! never has to undo a removal.

use std::future::Future;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::handle::{Cmd, Reply, Shared};
use super::{Mark, PubAck, Stream, StreamError, SyncPolicy, LAZY_SYNC_AFTER, MAX_BATCH};

/// Unix time in nanoseconds (0 if the clock is before 1970).
pub(super) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The shortest wait for the max_age timer (bounds wake-ups when the
/// oldest message cannot be removed).
const MIN_EXPIRY_WAIT: Duration = Duration::from_millis(10);

/// `Always`: the longest a group commit waits for publishers that the
/// previous commit acknowledged and that are on their way back (see
/// [`Owner::collect`]); also at most a quarter of a recent fsync.
const MAX_LINGER: Duration = Duration::from_millis(1);

/// After a batch made only of publishes nobody waits for, the owner
/// sleeps this long before taking the next commands: those that come
/// meanwhile are queued without waking it (a sender wakes only a waiting
/// owner), so a steady stream of QoS 0 publishes costs one wake-up and one
/// write per this period instead of one per small batch. Their readers see
/// them only after their fsync ([`LAZY_SYNC_AFTER`]) anyway; a command
/// that waits (an acknowledged publish, a read) comes at most this much
/// later; the queue ([`super::QUEUE_DEPTH`], [`super::QUEUE_BYTES`]) holds
/// far more than arrives in it.
const LAZY_GATHER: Duration = Duration::from_micros(250);

/// `Always`: how long the tombstones of limit removals (which
/// [`Stream::open`] derives again after a crash) may wait for their fsync.
/// Under load that is one fsync per this period instead of one per group
/// commit (a KV bucket removes a revision on every put).
const TOMB_SYNC_AFTER: Duration = Duration::from_secs(1);

/// A repeated failure is logged at most this often per stream.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Lets a repeated log line through at most once per [`LOG_EVERY`],
/// counting the ones it holds back.
#[derive(Default)]
struct Quiet {
    last: Option<Instant>,
    held: u64,
}

impl Quiet {
    /// `None`: stay quiet. `Some(n)`: log now; `n` similar lines were held
    /// back since the last one.
    fn pass(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY)
        {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

/// `, and N more since the last report` (nothing for none).
fn more(n: u64) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({n} more like it in the last {}s)", LOG_EVERY.as_secs()),
    }
}

struct Owner {
    stream: Stream,
    shared: Arc<Shared>,
    policy: SyncPolicy,
    /// Highest sequence durable per the policy.
    durable: u64,
    /// `Interval`, and `Always` for publishes nobody waits for: when the
    /// oldest unsynced write happened.
    dirty_since: Option<Instant>,
    /// `Always`: when the oldest tombstone not yet fsynced was written.
    tombs_since: Option<Instant>,
    /// The command queue (its length when a commit replies).
    queue: smol::channel::Receiver<Cmd>,
    /// `Always`: commands the next group commit expects (see
    /// [`Owner::collect`]).
    expect: usize,
    /// `Always`: the last wait for `expect` gained nothing (skip one).
    missed: bool,
    /// A recent fsync's duration (moving average).
    sync_time: Duration,
    /// `Always`: the position of the last successful fsync while writes
    /// nobody waits for follow it unsynced (see the module notes).
    synced: Option<Mark>,
    /// Failed writes and fsyncs (logged at most every [`LOG_EVERY`]).
    fail_log: Quiet,
    /// Publishes nobody waits for that were refused.
    refused_log: Quiet,
    /// Waits for a command with a deadline.
    wait: Parked,
    /// The group commit being built and its publishes' results, kept
    /// between commits (growing a fresh one per commit reallocated it
    /// several times, and the messages this thread frees come from the
    /// network thread's heap, so those reallocations took that heap's
    /// lock); at most [`MAX_BATCH`] long, trimmed to [`IDLE_KEEP`] when
    /// idle.
    batch: Vec<Cmd>,
    acks: Vec<Acked>,
}

/// What the reused batch lists keep of their capacity while the stream is
/// idle.
const IDLE_KEEP: usize = 32;

/// The owner thread's wait for its next command with a deadline: the
/// channel's `recv` polled on this thread, which parks until a sender
/// wakes it or the deadline passes. (Racing `recv` against an
/// `async_io::Timer` inside `smol::block_on` registered a timer with the
/// reactor at every wait, and woke the reactor's thread through its
/// eventfd each time: per group commit while unsynced QoS 0 writes wait.)
struct Parked {
    waker: Waker,
}

/// Wakes the owner thread.
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

impl Parked {
    /// For the calling thread (the owner thread: only it waits).
    fn new() -> Parked {
        Parked {
            waker: Waker::from(Arc::new(Unpark(std::thread::current()))),
        }
    }

    /// The next command, or `None` once `until` has passed (a command
    /// already queued wins).
    fn recv_until(
        &self,
        rx: &smol::channel::Receiver<Cmd>,
        until: Instant,
    ) -> Option<Result<Cmd, smol::channel::RecvError>> {
        let mut cx = Context::from_waker(&self.waker);
        let mut recv = std::pin::pin!(rx.recv());
        loop {
            if let Poll::Ready(got) = recv.as_mut().poll(&mut cx) {
                return Some(got);
            }
            let now = Instant::now();
            if now >= until {
                return None;
            }
            // Returns early on an unpark (or spuriously): poll again.
            std::thread::park_timeout(until - now);
        }
    }
}

pub(super) fn run(
    stream: Stream,
    rx: smol::channel::Receiver<Cmd>,
    shared: Arc<Shared>,
    policy: SyncPolicy,
) {
    let durable = stream.state().last_seq;
    let mut o = Owner {
        stream,
        shared,
        policy,
        durable,
        dirty_since: None,
        tombs_since: None,
        queue: rx.clone(),
        expect: 0,
        missed: false,
        sync_time: Duration::ZERO,
        synced: None,
        fail_log: Quiet::default(),
        refused_log: Quiet::default(),
        wait: Parked::new(),
        batch: Vec::new(),
        acks: Vec::new(),
    };
    let mut closed = false;
    while !closed {
        let got = match o.deadline() {
            None => {
                o.trim();
                Some(rx.recv_blocking())
            }
            Some(at) => o.wait.recv_until(&rx, at),
        };
        match got {
            None => {
                o.tick();
                o.trim();
            }
            Some(Err(_)) => break, // every handle is gone, or close()
            Some(Ok(first)) => {
                let mut batch = std::mem::take(&mut o.batch);
                batch.push(first);
                o.collect(&rx, &mut batch);
                // Reserved by the publishers; given back once written
                // (or failed), when the batch's messages are freed.
                let bytes: usize = batch
                    .iter()
                    .map(|c| match c {
                        Cmd::Publish(m, _) => m.size(),
                        _ => 0,
                    })
                    .sum();
                // Only publishes nobody waits for (MQTT QoS 0, NATS
                // without reply).
                let lazy = batch.iter().all(|c| matches!(c, Cmd::Publish(_, None)));
                closed = o.handle_batch(&mut batch);
                o.batch = batch;
                o.shared.release(bytes);
                if lazy && !closed {
                    // Let the next ones gather without waking this
                    // thread for each small batch (see [`LAZY_GATHER`]).
                    std::thread::sleep(LAZY_GATHER);
                }
            }
        }
    }
    rx.close();
    // Commands still queued get `Closed` (their reply senders drop here).
    while rx.try_recv().is_ok() {}
    if !closed {
        o.finish();
    }
    o.shared.closed.store(true, Ordering::Release);
    o.shared.changed.notify(usize::MAX);
    // Publishers waiting for room find the stream closed.
    o.shared.room.notify(usize::MAX);
}

fn io_copy(e: &io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("{e}; the message was not stored (free space or fix the disk, then retry)"),
    )
}

/// A publish's acknowledgement channel (`None`: nobody waits) and result
/// (`None`: not tried, an earlier one of the batch failed).
type Acked = (
    Option<Reply<Result<PubAck, StreamError>>>,
    Option<Result<PubAck, StreamError>>,
);

fn reply<T>(r: Reply<T>, v: T) {
    // The publisher may have gone away; that is fine.
    r.send(v);
}

/// Moves what is queued into `batch`, up to [`MAX_BATCH`].
fn drain(rx: &smol::channel::Receiver<Cmd>, batch: &mut Vec<Cmd>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(c) => batch.push(c),
            Err(_) => break,
        }
    }
}

impl Owner {
    /// Builds a group commit: what is queued, and with `Always`, briefly,
    /// the publishers the previous commit released. With P publishes in
    /// flight, taking only what is queued splits them into two groups that
    /// alternate (each arrives while the other's fsync runs), so each fsync
    /// covers P/2 and each publish waits for two; waiting up to
    /// [`MAX_LINGER`] (and a quarter of an fsync) for the `expect`ed ones
    /// lets one fsync cover all P. A wait that gains nothing is not
    /// repeated at the next commit.
    fn collect(&mut self, rx: &smol::channel::Receiver<Cmd>, batch: &mut Vec<Cmd>) {
        drain(rx, batch);
        let want = self.expect.min(MAX_BATCH);
        if self.policy != SyncPolicy::Always || batch.len() >= want || self.missed {
            self.missed = false;
            return;
        }
        let until = Instant::now() + (self.sync_time / 4).min(MAX_LINGER);
        let before = batch.len();
        // Not `Parked`: this wait runs inside `smol::block_on`, which
        // drives the I/O reactor from this thread while it lingers, so the
        // network thread learns of the next puts sooner. With a parked
        // wait here KV put measured 30-50% slower (3 alternating A/B
        // series, 2026-12-07).
        while batch.len() < want {
            let got = smol::block_on(smol::future::or(async { rx.recv().await.ok() }, async {
                smol::Timer::at(until).await;
                None
            }));
            match got {
                Some(c) => {
                    batch.push(c);
                    drain(rx, batch);
                }
                None => break,
            }
        }
        self.missed = batch.len() == before;
    }

    /// How long an unsynced write may wait for its fsync (`dirty_since`).
    fn sync_period(&self) -> Option<Duration> {
        match self.policy {
            SyncPolicy::Interval(d) => Some(d),
            SyncPolicy::Always => Some(LAZY_SYNC_AFTER),
            SyncPolicy::Never => None,
        }
    }

    fn deadline(&mut self) -> Option<Instant> {
        let sync_at = match (self.sync_period(), self.dirty_since) {
            (Some(d), Some(since)) => Some(since + d),
            _ => None,
        };
        let tombs_at = self.tombs_since.map(|t| t + TOMB_SYNC_AFTER);
        let expiry_at = self.stream.next_expiry().map(|exp| {
            let wait = Duration::from_nanos(exp.saturating_sub(now_ns())).max(MIN_EXPIRY_WAIT);
            Instant::now() + wait
        });
        let at = [sync_at, tombs_at, expiry_at].into_iter().flatten().min();
        if self.synced.is_none() && self.stream.needs_maintenance() {
            // Compaction runs one segment at a time between batches.
            return Some(Instant::now());
        }
        at
    }

    fn tick(&mut self) {
        self.interval_sync();
        self.removals(now_ns());
        self.publish_state();
        self.maintain();
    }

    /// Applies the limits, unless writes nobody waits for are not fsynced
    /// yet (`synced`): then after their fsync.
    fn removals(&mut self, now: u64) {
        if self.synced.is_some() {
            return;
        }
        let derivable = self.stream.removals_derivable();
        self.stream.enforce_limits(now);
        self.after_removals(derivable);
    }

    /// One compaction step, unless `synced` (a rollback may follow).
    fn maintain(&mut self) {
        if self.synced.is_some() {
            return;
        }
        if let Err(e) = self.stream.maintain() {
            log::warn!("stream compaction failed: {e}; will retry");
        }
    }

    /// Tombstones of removals caused by limits, TTLs and rollups are
    /// written right away. With `Always` they are fsynced right away too
    /// unless every removal was `derivable` (see
    /// [`Stream::removals_derivable`]): then within [`TOMB_SYNC_AFTER`].
    fn after_removals(&mut self, derivable: bool) {
        let due = self
            .tombs_since
            .is_some_and(|t| t.elapsed() >= TOMB_SYNC_AFTER);
        let res = match self.policy {
            SyncPolicy::Always if !derivable || due => self.stream.sync(),
            _ => self.stream.flush(),
        };
        if let Err(e) = res {
            log::warn!("writing tombstones: {e}; will retry");
        }
        let waiting = self.policy == SyncPolicy::Always && self.stream.tombs_unsynced();
        self.tombs_since = match waiting {
            true => self.tombs_since.or_else(|| Some(Instant::now())),
            false => None,
        };
    }

    /// `Interval` (and `Always` for publishes nobody waits for): fsync if
    /// the period since the first unsynced write has passed.
    fn interval_sync(&mut self) {
        let (Some(d), Some(since)) = (self.sync_period(), self.dirty_since) else {
            return;
        };
        if since.elapsed() < d {
            return;
        }
        self.sync_dirty(d);
    }

    /// Fsyncs the unsynced writes now. `Always`: a failure drops those
    /// nobody waited for ([`Owner::cut_unsynced`]); `Interval`: retried
    /// after `retry`.
    fn sync_dirty(&mut self, retry: Duration) {
        match self.stream.sync() {
            Ok(()) => self.all_synced(),
            Err(e) => match self.synced.take() {
                Some(to) => {
                    let n = self.cut_unsynced(to);
                    if let Some(held) = self.fail_log.pass(Instant::now()) {
                        log::error!(
                            "stream {}: fsync failed: {e}; dropped the {n} unacknowledged \
                             messages (MQTT QoS 0, NATS without reply) written since the last \
                             successful fsync, as no later fsync can make them safe{}; free \
                             space or fix the disk",
                            self.stream.cfg.name,
                            more(held)
                        );
                    }
                }
                None => {
                    if let Some(n) = self.fail_log.pass(Instant::now()) {
                        log::error!(
                            "stream {}: fsync failed: {e}; retrying every {retry:?}{} \
                             (free space or fix the disk)",
                            self.stream.cfg.name,
                            more(n)
                        );
                    }
                    self.dirty_since = Some(Instant::now());
                }
            },
        }
    }

    /// `Always`: fsyncs writes nobody waited for before an operation that
    /// removes messages or closes (see the module notes).
    fn settle(&mut self) {
        if self.synced.is_some() {
            self.sync_dirty(LAZY_SYNC_AFTER);
        }
    }

    /// Every write is fsynced: all of it is durable.
    fn all_synced(&mut self) {
        self.durable = self.stream.state().last_seq;
        self.dirty_since = None;
        self.synced = None;
    }

    /// `Always`: an fsync failed with writes nobody waited for after the
    /// last successful one (at `to`). Their pages may be gone while a later
    /// fsync would succeed, so they are cut off and counted, never made
    /// durable. Returns how many were dropped (the caller logs).
    fn cut_unsynced(&mut self, to: Mark) -> u64 {
        let n = self.stream.state().last_seq.saturating_sub(to.last_seq());
        self.stream.rollback(to);
        self.dirty_since = None;
        self.synced = None;
        self.shared.unstored.fetch_add(n, Ordering::Relaxed);
        n
    }

    fn publish_state(&mut self) {
        let s = self.stream.state_upto(self.durable);
        let mut g = self.shared.state();
        if *g != s {
            *g = s;
            drop(g);
            self.shared.changed.notify(usize::MAX);
        }
    }

    /// The reused lists give back what they grew to in a burst.
    fn trim(&mut self) {
        self.batch.shrink_to(IDLE_KEEP);
        self.acks.shrink_to(IDLE_KEEP);
    }

    /// One group commit of `batch` (left empty; its messages are freed).
    /// Returns true when a close was requested.
    fn handle_batch(&mut self, batch: &mut Vec<Cmd>) -> bool {
        let now = now_ns();
        let mark = self.stream.mark();
        let mut acks = std::mem::take(&mut self.acks);
        let mut failed: Option<io::Error> = None;
        let mut later = Vec::new();
        for cmd in batch.drain(..) {
            match cmd {
                Cmd::Publish(msg, r) => {
                    if failed.is_some() {
                        acks.push((r, None));
                        continue;
                    }
                    match self.stream.publish(&msg, now) {
                        Err(StreamError::Io(e)) => {
                            failed = Some(e);
                            acks.push((r, None));
                        }
                        res => acks.push((r, Some(res))),
                    }
                }
                other => later.push(other),
            }
        }
        let appended = self.stream.state().last_seq != mark.last_seq();
        // Publishers waiting for their acknowledgement.
        let waiting = acks.iter().filter(|(r, _)| r.is_some()).count();
        self.count_refused(&acks);
        // `Always`: an acknowledgement needs every write before it fsynced
        // (a duplicate's names an earlier message nobody may have waited
        // for); a batch nobody waits for is only written.
        let sync_now = self.policy == SyncPolicy::Always
            && waiting > 0
            && (appended || self.dirty_since.is_some());
        let mut sync_failed = false;
        if failed.is_none() && (appended || sync_now) {
            // Written first: a failed write (ENOSPC) is not a failed fsync
            // and leaves earlier writes intact.
            failed = self.stream.flush().err();
            if failed.is_none() && sync_now {
                let t = Instant::now();
                failed = self.stream.sync_appends().err();
                sync_failed = failed.is_some();
                self.sync_time = (self.sync_time * 3 + t.elapsed()) / 4;
            }
        }
        if let Some(e) = &failed {
            self.fail_batch(e, mark.clone(), sync_failed, &acks);
            for (_, res) in acks.iter_mut() {
                if !matches!(res, Some(Err(_))) {
                    *res = Some(Err(StreamError::Io(io_copy(e))));
                }
            }
        } else if sync_now {
            // Every unsynced segment was fsynced, earlier writes that
            // nobody waited for included.
            self.all_synced();
        } else if appended {
            match self.policy {
                SyncPolicy::Never => self.durable = self.stream.state().last_seq,
                SyncPolicy::Always | SyncPolicy::Interval(_) => {
                    if self.policy == SyncPolicy::Always && self.synced.is_none() {
                        self.synced = Some(mark);
                    }
                    self.dirty_since.get_or_insert_with(Instant::now);
                    self.interval_sync();
                }
            }
        }
        self.removals(now);
        self.publish_state();
        // Those acknowledged now, and those that came meanwhile, make the
        // next commit (see `collect`); nobody comes back for a publish
        // nobody waited for.
        self.expect = match waiting {
            0 => 0,
            n => n + self.queue.len(),
        };
        for (r, res) in acks.drain(..) {
            if let (Some(r), Some(res)) = (r, res) {
                reply(r, res);
            }
        }
        self.acks = acks;
        let mut closes = Vec::new();
        for cmd in later {
            self.handle_other(cmd, &mut closes);
        }
        self.maintain();
        if closes.is_empty() {
            return false;
        }
        self.finish();
        for r in closes {
            reply(r, ());
        }
        true
    }

    /// A batch failed with `e`: roll it back (with a failed fsync under
    /// `Always`, back to the last successful fsync: [`Owner::cut_unsynced`])
    /// and log it, rate-limited.
    fn fail_batch(&mut self, e: &io::Error, mark: Mark, sync_failed: bool, acks: &[Acked]) {
        // This batch's messages nobody waits for that were stored or not
        // tried (those refused are counted already, duplicates store none).
        let unacked = acks
            .iter()
            .filter(|(r, res)| {
                r.is_none()
                    && matches!(
                        res,
                        None | Some(Ok(PubAck {
                            duplicate: false,
                            ..
                        }))
                    )
            })
            .count() as u64;
        let rejected = acks.iter().filter(|(r, _)| r.is_some()).count();
        self.stream.rollback(mark);
        self.shared.unstored.fetch_add(unacked, Ordering::Relaxed);
        let earlier = match self.synced.take() {
            Some(to) if sync_failed => self.cut_unsynced(to),
            other => {
                self.synced = other;
                0
            }
        };
        if let Some(n) = self.fail_log.pass(Instant::now()) {
            log::error!(
                "stream {}: storing a batch failed: {e}; rejected {rejected} publishes and \
                 dropped {} unacknowledged ones (MQTT QoS 0, NATS without reply){}; free space \
                 or fix the disk",
                self.stream.cfg.name,
                unacked + earlier,
                more(n)
            );
        }
    }

    /// Counts (and logs, rate-limited) publishes nobody waits for that the
    /// stream refused (full, too large, a failed header check, ...): their
    /// publisher cannot be told.
    fn count_refused(&mut self, acks: &[Acked]) {
        let mut refused = acks.iter().filter_map(|(r, res)| match (r, res) {
            (None, Some(Err(e))) if !matches!(e, StreamError::Io(_)) => Some(e),
            _ => None,
        });
        let Some(first) = refused.next() else {
            return;
        };
        let n = 1 + refused.count() as u64;
        self.shared.unstored.fetch_add(n, Ordering::Relaxed);
        if let Some(held) = self.refused_log.pass(Instant::now()) {
            log::warn!(
                "stream {}: {n} unacknowledged publishes (MQTT QoS 0, NATS without reply) not \
                 stored: {first}{}",
                self.stream.cfg.name,
                more(held)
            );
        }
    }

    /// A command other than a publish, after the batch's publishes.
    fn handle_other(&mut self, cmd: Cmd, closes: &mut Vec<Reply<()>>) {
        if matches!(
            cmd,
            Cmd::Delete { .. } | Cmd::Purge(..) | Cmd::Ack(..) | Cmd::AckMany(..)
        ) {
            self.settle();
        }
        match cmd {
            Cmd::Read {
                from,
                max_msgs,
                max_bytes,
                reply: r,
            } => {
                let res = self
                    .stream
                    .read(from, max_msgs, max_bytes, self.durable)
                    .map_err(StreamError::Io);
                reply(r, res);
            }
            Cmd::DiskUsage(r) => reply(r, self.stream.disk_usage().map_err(StreamError::Io)),
            Cmd::Close(r) => closes.push(r),
            Cmd::Delete {
                seq,
                secure,
                reply: r,
            } => {
                let res = self.stream.delete_msg(seq, secure);
                self.publish_state();
                reply(r, res);
            }
            Cmd::Purge(req, r) => {
                let res = self.stream.purge(&req);
                self.publish_state();
                reply(r, res);
            }
            Cmd::Ack(seq, r) => {
                let res = self.stream.ack(seq).and_then(|ok| {
                    self.stream.sync().map_err(StreamError::Io)?;
                    Ok(ok)
                });
                self.publish_state();
                reply(r, res);
            }
            Cmd::AckMany(seqs, r) => {
                let mut n = 0;
                let mut res = Ok(());
                for seq in seqs {
                    match self.stream.ack(seq) {
                        Ok(true) => n += 1,
                        Ok(false) => {}
                        Err(e) => {
                            res = Err(e);
                            break;
                        }
                    }
                }
                let res = res
                    .and_then(|()| self.stream.sync().map_err(StreamError::Io))
                    .map(|()| n);
                self.publish_state();
                reply(r, res);
            }
            Cmd::Get(seq, r) => {
                let res = if seq > self.durable {
                    Ok(None)
                } else {
                    self.stream.get(seq).map_err(StreamError::Io)
                };
                reply(r, res);
            }
            Cmd::LastBySubject(f, r) => {
                let res = self.stream.last_by_subject(&f).map_err(StreamError::Io);
                reply(r, res.map(|m| m.filter(|m| m.seq <= self.durable)));
            }
            Cmd::NextBySubject(f, from, r) => {
                let res = self
                    .stream
                    .next_by_subject(&f, from)
                    .map_err(StreamError::Io);
                reply(r, res.map(|m| m.filter(|m| m.seq <= self.durable)));
            }
            Cmd::SubjectCounts(f, r) => reply(r, Ok(self.stream.subject_counts(&f))),
            Cmd::CountMatching(f, from, upto, r) => {
                let n = self.stream.count_matching(&f, from, upto.min(self.durable));
                reply(r, Ok(n));
            }
            Cmd::LastPerSubject(f, upto, max, r) => {
                let seqs = self
                    .stream
                    .last_per_subject(&f, upto.min(self.durable), max);
                reply(r, Ok(seqs));
            }
            Cmd::Info(r) => reply(r, Ok(self.stream.info())),
            Cmd::Publish(..) => {}
        }
    }

    /// Final sync and meta write; everything written becomes durable.
    fn finish(&mut self) {
        self.settle();
        match self.stream.close() {
            Ok(()) => self.durable = self.stream.state().last_seq,
            Err(e) => log::error!("closing stream: {e}"),
        }
        self.dirty_since = None;
        self.publish_state();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_lets_one_line_through_per_period_and_counts_the_rest() {
        let mut q = Quiet::default();
        let t = Instant::now();
        assert_eq!(q.pass(t), Some(0));
        for i in 1..100 {
            assert_eq!(q.pass(t + Duration::from_millis(i)), None);
        }
        assert_eq!(q.pass(t + LOG_EVERY), Some(99));
        assert_eq!(q.pass(t + LOG_EVERY), None);
        assert_eq!(more(0), "");
        assert!(more(5).contains("5 more"));
    }

    #[test]
    fn parked_wait_ends_at_its_deadline_or_with_the_next_command() {
        let (tx, rx) = smol::channel::bounded::<Cmd>(4);
        let wait = Parked::new();
        let start = Instant::now();
        assert!(wait
            .recv_until(&rx, start + Duration::from_millis(20))
            .is_none());
        assert!(start.elapsed() >= Duration::from_millis(20));
        // Sent from another thread, while this one waits (or just before).
        let (reply, _answer) = super::super::oneshot::channel();
        let sender = std::thread::spawn(move || tx.send_blocking(Cmd::DiskUsage(reply)).is_ok());
        let start = Instant::now();
        let got = wait.recv_until(&rx, start + Duration::from_secs(60));
        assert!(matches!(got, Some(Ok(Cmd::DiskUsage(_)))));
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "woken by the send"
        );
        assert!(sender.join().unwrap_or(false));
        // Every sender gone: the wait ends at once.
        let start = Instant::now();
        let got = wait.recv_until(&rx, start + Duration::from_secs(60));
        assert!(matches!(got, Some(Err(_))));
        assert!(start.elapsed() < Duration::from_secs(30));
    }
}
