//! One MQTT connection's task: the loop around its [`Session`] (see the
//! listener's module doc for the invariants).
//!
//! Each turn: 1. act on the session's events (publishes through
//! [`Ingest`], subscriptions, CONNECT bookkeeping), 2. complete the
//! acknowledgements that are ready, in order, 3. pass owed retained
//! messages and deliveries on, and read followed streams, 4. write, 5.
//! sleep until something happens.

use std::sync::Arc;
use std::time::Instant;

use smol::channel::{bounded, Receiver, Sender};
use smol::future::FutureExt;
use smol::Timer;

use super::{refuse_client_id, save, Ctx, HANDOVER_TIMEOUT, READ_BATCH, SAVE_EVERY};
use crate::broker::persist::{claim, log_id, Claim};
use crate::ingest::{AckError, AckQueue, Ingest, Publish, Refused};
use crate::mqtt::{CloseReason, Event, Limits, Session, SubRequest};
use crate::router::{delivery_queue, ConnId, DeliveryRx, DeliveryTx, Wakes};
use crate::server::driver::{self, Common, Deadline, Turn};
use crate::server::outbound::{Outbound, WRITE_BUDGET};
use crate::server::transport::Transport;
use crate::stream::{Message, StreamHandle};

/// Longest a DISCONNECT frond sends on its own (takeover, shutdown) may
/// take to write.
const GOODBYE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);

enum Wake {
    Read(std::io::Result<usize>),
    /// Deliveries wait in the queue (step 3 takes them).
    Deliver,
    /// Retained messages are owed (step 3 reads them).
    Retained,
    Kicked,
    StreamGrew,
    /// The front acknowledgement, shutdown or the timer.
    Common(Common),
}

/// The publishes of one read, handed on together: first every live
/// delivery of the batch (the router queued them, their subscribers' tasks
/// are woken once the batch is routed, [`Wakes`], and one yield lets them
/// write it, each in one write), then the captured ones to their streams,
/// in order, which wakes each stream's thread about once per batch instead
/// of once per message (a wake can preempt this thread, and costs more
/// than the write of a small message).
#[derive(Default)]
struct StoreBatch {
    msgs: Vec<(StreamHandle, Message, Option<u16>)>,
    /// Some message of the batch went to live subscribers.
    routed: bool,
    /// The subscribers' tasks to wake at the end of the batch.
    wakes: Wakes,
}

impl StoreBatch {
    /// The batch ends: wake its subscribers, then store what it captured.
    async fn submit(&mut self, acks: &mut AckQueue<u16>) {
        self.wakes.wake_all();
        if self.msgs.is_empty() {
            return;
        }
        if std::mem::take(&mut self.routed) {
            smol::future::yield_now().await;
        }
        for (stream, msg, ack) in self.msgs.drain(..) {
            let Some(id) = ack else {
                // QoS 0: nobody waits, so no fsync of its own either.
                if let Err(e) = stream.store(msg).await {
                    log::warn!("mqtt: QoS 0 message not stored: {e}");
                }
                continue;
            };
            match stream.submit(msg).await {
                Ok(w) => acks.stored(id, w),
                Err(e) => acks.ready(id, Err(AckError::Stream(e))),
            }
        }
    }
}

/// One connection's state around its session.
struct Conn<'c, T> {
    ctx: &'c Ctx<'c>,
    transport: T,
    /// The read buffer: starts at 1 KiB and doubles (to 16 KiB) while
    /// reads fill it.
    buf: Vec<u8>,
    timer: Deadline,
    shutdown: Receiver<()>,
    conn: ConnId,
    session: Session,
    limits_auth: Option<Arc<crate::auth::Auth>>,
    deliver_tx: DeliveryTx,
    deliver_rx: DeliveryRx,
    owed: Outbound,
    kick_tx: Sender<()>,
    kick_rx: Receiver<()>,
    acks: AckQueue<u16>,
    batch: StoreBatch,
    client_id: Option<String>,
    close_reason: Option<String>,
    /// Streams a persistent session follows (index = follow index) and
    /// whether reading one failed (then it is not followed any more).
    follows: Vec<(StreamHandle, bool)>,
    checked_out: bool,
    /// This connection is the recorded holder of its client id.
    held: bool,
    save_at: Option<Instant>,
    /// The arming token of this connection's durable will.
    will_token: Option<u64>,
    now: Instant,
}

/// Serve one MQTT connection over `transport` until it ends; returns why.
pub async fn connection<T: Transport>(
    transport: T,
    ctx: &Ctx<'_>,
    limits: Limits,
    max_queued: usize,
    shutdown: Receiver<()>,
) -> String {
    let mut c = Conn::new(ctx, limits, max_queued, transport, shutdown);
    let why = driver::run(&mut c).await;
    // Boxed, like the other once-per-connection steps below: their
    // futures would otherwise make every connection's task bigger.
    Box::pin(c.finish()).await;
    // Publishes still awaiting storage get no acknowledgement; the stream
    // stores them anyway and the client resends (at-least-once).
    why
}

impl<T: Transport> driver::Shell for Conn<'_, T> {
    type Wake = Wake;

    async fn turn(&mut self) -> Turn {
        self.handle_events().await;
        if let Some(why) = self.close_reason.take() {
            // Flush whatever the session queued (CONNACK refusal,
            // DISCONNECT with reason) before closing; QoS 2 state it
            // depends on first, as in step 4.
            if self.session.take_sync() && !save(&self.session, self.ctx.sessions, false).await {
                self.session.sync_failed("write failed");
            }
            let out = self.session.take_output();
            if !out.is_empty() {
                let _ = self.transport.write_all(&out).await;
            }
            return Turn::Close(why);
        }
        self.complete_acks();
        let more = self.pass_on().await;
        if let Err(why) = self.write().await {
            return Turn::Close(why);
        }
        if self.session.is_closed() || self.session.has_events() || more {
            // Completing acks can resume decoding buffered input; handle
            // what it produced (or the Close reason) before sleeping.
            return Turn::Again;
        }
        Turn::Sleep
    }

    async fn sleep(&mut self) -> Wake {
        self.wait().await
    }

    async fn woke(&mut self, wake: Wake) -> Result<(), String> {
        self.act(wake).await
    }
}

impl<'c, T: Transport> Conn<'c, T> {
    fn new(
        ctx: &'c Ctx<'c>,
        limits: Limits,
        max_queued: usize,
        transport: T,
        shutdown: Receiver<()>,
    ) -> Self {
        let conn = ctx.broker.new_conn_id();
        let owed = Outbound::new(max_queued, limits.max_queued_bytes);
        let (deliver_tx, deliver_rx) = delivery_queue(max_queued, Some(owed.budget()));
        let (kick_tx, kick_rx) = bounded::<()>(1);
        let limits_auth = limits.auth.clone();
        let now = Instant::now();
        Conn {
            ctx,
            transport,
            buf: vec![0u8; 1024],
            timer: Deadline::default(),
            shutdown,
            conn,
            session: Session::new(limits, now),
            limits_auth,
            deliver_tx,
            deliver_rx,
            owed,
            kick_tx,
            kick_rx,
            acks: AckQueue::default(),
            batch: StoreBatch::default(),
            client_id: None,
            close_reason: None,
            follows: Vec::new(),
            checked_out: false,
            held: false,
            save_at: None,
            will_token: None,
            now,
        }
    }

    /// Step 1: do what the session asked for. Captured publishes are handed to
    /// their streams together, after the batch's live deliveries
    /// ([`StoreBatch`]); anything else waits for them (acks in order).
    async fn handle_events(&mut self) {
        while let Some(ev) = self.session.poll_event() {
            if !matches!(ev, Event::Publish { .. }) {
                self.batch.submit(&mut self.acks).await;
            }
            match ev {
                Event::Connected {
                    client_id,
                    clean,
                    expiry,
                } => Box::pin(self.connected(client_id, clean, expiry.is_zero())).await,
                Event::Publish {
                    subject,
                    payload,
                    qos,
                    retain,
                    ack,
                    props,
                } => {
                    let now = self.now;
                    let ingest = Ingest::new(self.ctx.broker);
                    match ingest.mqtt(subject, payload, qos, retain, props.as_deref(), now) {
                        Ok(p) => self.publish(p, ack).await,
                        Err(Refused::ReservedReply(to)) => {
                            log::warn!("mqtt: reply to a request dropped: its response subject {to:?} is reserved");
                            self.ack_now(ack, Ok(())).await;
                        }
                        Err(_) => self.ack_now(ack, Ok(())).await,
                    }
                }
                Event::AckInOrder(id) => self.acks.ready(id, Ok(())),
                Event::Subscribe(requests) => Box::pin(self.subscribe(requests)).await,
                Event::Unsubscribe(filters) => {
                    save(&self.session, self.ctx.sessions, false).await;
                    for f in filters {
                        self.ctx.broker.unsubscribe(self.conn, &f);
                    }
                }
                Event::UnsubscribeShared(filters) => {
                    for (share, f) in filters {
                        self.ctx
                            .broker
                            .unsubscribe_mqtt(self.conn, Some(&share), &f);
                    }
                }
                Event::Close(why) => self.close_reason = Some(why.to_string()),
            }
        }
        self.batch.submit(&mut self.acks).await;
    }

    /// Queue acknowledgement `ack` (if any) with a known result, after the
    /// batch's earlier publishes.
    async fn ack_now(&mut self, ack: Option<u16>, r: Result<(), AckError>) {
        if let Some(id) = ack {
            self.batch.submit(&mut self.acks).await;
            self.acks.ready(id, r);
        }
    }

    /// A client publish after [`Ingest::mqtt`]: its retained copy durable
    /// first (before the acknowledgement, and before it is routed), then
    /// routed and captured.
    async fn publish(&mut self, p: Publish, ack: Option<u16>) {
        let ingest = Ingest::new(self.ctx.broker);
        if p.retain {
            // Deliveries routed so far do not wait for the disk.
            self.batch.wakes.wake_all();
            let store = self.ctx.retained.clone();
            let (s, pl, h, q) = (
                p.subject.clone(),
                p.payload.clone(),
                p.headers.clone(),
                p.qos,
            );
            let now_ms = super::unix_now_ms();
            let set = move || store.set_with(&s, &pl, q, h.as_deref(), now_ms);
            match ingest.retained(smol::unblock(set).await) {
                Ok(()) => {}
                Err(Refused::RetainedFailed(e)) => {
                    log::warn!("mqtt: retained message on {} not stored: {e}", p.subject);
                    return self.ack_now(ack, Err(AckError::Retained(e))).await;
                }
                // 5.0: quota exceeded; nothing routed or stored. 3.1.1 and
                // QoS 0: on, without being retained.
                Err(_) => {
                    if let Some(id) = ack.filter(|&id| self.session.refuse_publish(id, 0x97)) {
                        return self.ack_now(Some(id), Ok(())).await;
                    }
                }
            }
        }
        let publisher = self.session.permissions().cloned();
        let now = self.now;
        match self
            .batch
            .wakes
            .route(|| ingest.route_mqtt(p, publisher, now))
        {
            (routed, Some(c)) => {
                self.batch.routed |= routed;
                self.batch.msgs.push((c.stream.clone(), c.message, ack));
            }
            (_, None) => self.ack_now(ack, Ok(())).await,
        }
    }

    /// CONNECT accepted by the session: claim the client id, take over its
    /// stored session (or refuse; a clean start deletes it; Clean Start 0
    /// resumes it, and with `ends_here` — expiry 0 — deletes the stored
    /// copy once loaded, the session ending with this connection), arm the
    /// will, follow the streams.
    async fn connected(&mut self, id: String, fresh: bool, ends_here: bool) {
        let (broker, sessions) = (self.ctx.broker, self.ctx.sessions);
        // A client id held by another user's connection is refused, never
        // taken over ([`SessionStore::hold`]).
        let owner = self.session.owner().cloned();
        if let Err(holder) = sessions.hold(&id, self.conn, owner.as_ref()) {
            let held_by = format!("is held by a connection of {holder}");
            refuse_client_id(&mut self.session, &id, &held_by, owner.as_ref());
            return;
        }
        self.held = true;
        // Before any subscription (restored ones included).
        broker.set_permissions(self.conn, self.session.permissions().cloned());
        broker.claim_client_id(&id, self.conn, self.kick_tx.clone());
        self.client_id = Some(id.clone());
        if !sessions.checkout(&id, HANDOVER_TIMEOUT).await {
            self.close_reason =
                Some("the previous connection of this client id did not end".into());
            return;
        }
        self.checked_out = true;
        let store = sessions.clone();
        let load_id = id.clone();
        let stored = smol::unblock(move || store.load(&load_id)).await;
        // The stored session belongs to its owner: another user neither
        // resumes nor deletes it.
        let stored_owner = stored.as_ref().and_then(|s| s.owner.as_ref());
        let decision = claim(stored_owner, owner.as_ref(), self.limits_auth.as_deref());
        let other = || stored_owner.map_or("another user".into(), |o| o.to_string());
        match decision {
            Claim::Refuse => {
                let has = format!("has a stored session of {}", other());
                refuse_client_id(&mut self.session, &id, &has, owner.as_ref());
                return;
            }
            Claim::Discard => log::warn!(
                "mqtt: the stored session of client id {} belonged to {}, who can no longer log in; discarded",
                log_id(&id),
                other()
            ),
            Claim::Resume => {}
        }
        if let (Some(me), Some(st)) = (&owner, &stored) {
            if st.owner.is_none() && !fresh {
                log::info!(
                    "mqtt: the stored session of client id {} had no owner (an earlier version); it now belongs to {me}",
                    log_id(&id)
                );
            }
        }
        let (stored, remove) = match (fresh, decision, stored) {
            (false, Claim::Resume, stored) => {
                let found = stored.is_some();
                (stored, found && ends_here)
            }
            (_, _, None) => (None, false),
            (_, _, Some(_)) => (None, true),
        };
        if remove {
            let store = sessions.clone();
            let rm_id = id.clone();
            if let Err(e) = smol::unblock(move || store.remove(&rm_id)).await {
                log::warn!(
                    "mqtt: cannot delete the stored session of {}: {e}",
                    log_id(&id)
                );
            }
        }
        self.ctx.wills.cancel(&id);
        self.session.restore(stored);
        // Durable before the CONNACK (queued by restore) leaves.
        self.will_token = self.ctx.wills.arm(&id, self.session.will()).await;
        if self.session.follows_streams() {
            // Only the streams its subscriptions reach (and those it owes
            // QoS 2 completions on); SUBSCRIBE adds more ([`Self::subscribe`]).
            for s in broker.streams().iter() {
                let name = &s.config().name;
                if self.session.wants_stream(&s.config().subjects) || self.session.owes_stream(name)
                {
                    self.session.follow(name, s.state().last_seq);
                    self.follows.push((s.clone(), false));
                } else {
                    self.session.not_followed(name);
                }
            }
        }
    }

    /// Follow, from their tails, the streams a persistent session's
    /// subscriptions now reach and it did not follow yet (before the
    /// router registrations: what a stream captures after its tail comes
    /// from the stream, nothing is missed in between).
    fn follow_new_streams(&mut self) {
        if !self.session.follows_streams() {
            return;
        }
        for s in self.ctx.broker.streams().iter() {
            let name = &s.config().name;
            if !self.session.follows_stream(name) && self.session.wants_stream(&s.config().subjects)
            {
                self.session.follow(name, s.state().last_seq);
                self.follows.push((s.clone(), false));
            }
        }
    }

    /// Durable before the SUBACK (which the session holds until told;
    /// refused when the save failed), then registered; the retained
    /// messages they are owed are read in step 3, in batches, before
    /// later live deliveries.
    async fn subscribe(&mut self, requests: Vec<SubRequest>) {
        let saved = save(&self.session, self.ctx.sessions, false).await;
        if !self.session.subscribe_done(saved) {
            return;
        }
        self.follow_new_streams();
        let mut filters = Vec::new();
        let mut granted = Vec::new();
        for r in requests {
            self.ctx.broker.subscribe_mqtt(
                self.conn,
                r.share.clone(),
                r.filter.clone(),
                r.qos,
                self.deliver_tx.clone(),
            );
            if let Some(q) = r.retained {
                filters.push(r.filter);
                granted.push(q);
            }
        }
        let id = self.client_id.as_deref().unwrap_or("?");
        let retained = self.ctx.retained;
        let broker = &self.ctx.broker;
        self.owed.owe_kv(broker, &filters, &granted, id).await;
        self.owed.owe_retained(retained, filters, granted, id).await;
    }

    /// Step 2: complete acknowledgements that are ready, in order.
    fn complete_acks(&mut self) {
        while let Some((id, r)) = self.acks.pop() {
            let r = r.map(|_| ()).map_err(|e| e.to_string());
            self.session.publish_done(id, r);
        }
    }

    /// Step 3: pass owed retained messages, then queued deliveries, on without
    /// waiting, while the output is small ([`Outbound`]); then one batch
    /// from each stream a persistent session follows. True when there may
    /// be more to pass on at once.
    async fn pass_on(&mut self) -> bool {
        let (broker, retained) = (self.ctx.broker, self.ctx.retained);
        self.owed
            .pump(&mut self.session, broker, retained, &self.deliver_rx)
            .await;
        let mut more = false;
        for idx in 0..self.follows.len() {
            more |= self.read_stream(idx).await;
        }
        more
    }

    /// One batch of followed stream `idx` into the session; true when it
    /// read something or waits for the output to shrink.
    async fn read_stream(&mut self, idx: usize) -> bool {
        let room = self.session.stream_room();
        let Some(next) = self.session.stream_next(idx) else {
            return false;
        };
        let Some((stream, broken)) = self.follows.get_mut(idx) else {
            return false;
        };
        if room == 0 || *broken {
            return false;
        }
        if self.session.output_len() >= WRITE_BUDGET {
            // Written in step 4 first.
            return true;
        }
        let st = stream.state();
        if next < st.first_seq {
            log::warn!(
                "mqtt: {}: {} messages of stream {} were removed by its limits before delivery; skipped",
                self.client_id.as_deref().unwrap_or("?"),
                st.first_seq - next,
                stream.config().name
            );
            self.session.stream_skip_to(idx, st.first_seq);
        }
        let next = self.session.stream_next(idx).unwrap_or(next);
        if st.last_seq < next {
            return false;
        }
        let msgs = match stream.read(next, room.min(READ_BATCH), 1 << 20).await {
            Ok(msgs) => msgs,
            Err(e) => {
                log::warn!(
                    "mqtt: cannot read stream {} for a persistent session: {e}",
                    stream.config().name
                );
                *broken = true;
                return false;
            }
        };
        if msgs.is_empty() {
            // Everything up to last_seq was deleted.
            self.session
                .stream_skip_to(idx, st.last_seq.saturating_add(1));
        }
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for m in msgs {
            // The age decides MQTT message expiry.
            let age = now_ns.saturating_sub(u128::from(m.timestamp));
            let age = std::time::Duration::from_nanos(u64::try_from(age).unwrap_or(u64::MAX));
            let headers = m.headers.as_deref();
            self.session
                .deliver_stored_msg(idx, m.seq, &m.subject, headers, &m.payload, age);
        }
        true
    }

    /// Step 4: write. A takeover interrupts a write to a client that does not
    /// read, so the new connection gets the session without waiting. QoS
    /// 2 state the output depends on is written first (one write for the
    /// whole batch; see `Session::take_sync`). `Err`: why the connection
    /// ends.
    async fn write(&mut self) -> Result<(), String> {
        let sessions = self.ctx.sessions;
        if self.session.take_sync() {
            if save(&self.session, sessions, false).await {
                let _ = self.session.take_dirty();
                self.save_at = None;
            } else {
                // Nothing the disk does not back leaves; the connection
                // closes (handled on the next turn).
                self.session.sync_failed("write failed");
            }
        }
        if self.session.has_output() {
            let out = self.session.take_output();
            let (transport, kick_rx) = (&mut self.transport, &self.kick_rx);
            let written = async { Some(transport.write_all(&out).await) }
                .or(async {
                    let _ = kick_rx.recv().await;
                    None
                })
                .await;
            crate::server::outbound::recycle_output(out);
            match written {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(format!("write failed: {e}")),
                None => return Err("another connection took over the client id".into()),
            }
        }
        if self.session.take_dirty() && self.save_at.is_none() {
            self.save_at = Some(Instant::now() + SAVE_EVERY);
        }
        Ok(())
    }

    /// Step 5: sleep until something happens.
    async fn wait(&mut self) -> Wake {
        let deadline = match (self.session.poll_deadline(), self.save_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.timer.set(deadline);
        let want_read = self.session.wants_input();
        // Owed retained messages go before live deliveries: while any are,
        // the delivery queue is not watched.
        let retained_waiting = self.owed.retained_waiting();
        let retained_owed = self.owed.retained_ready(&self.session);
        let room = self.session.stream_room() > 0;
        let session = &self.session;
        let waits: Vec<(&StreamHandle, u64)> = self
            .follows
            .iter()
            .enumerate()
            .filter(|(_, (_, broken))| room && !*broken)
            .filter_map(|(i, (s, _))| Some((s, session.stream_next(i)?)))
            .collect();
        let (deliver_rx, kick_rx, acks) = (&self.deliver_rx, &self.kick_rx, &mut self.acks);
        let (transport, buf) = (&mut self.transport, &mut self.buf);
        let (timer, shutdown) = (&mut self.timer, &self.shutdown);
        let read = async {
            if want_read {
                Wake::Read(transport.read(buf).await)
            } else {
                std::future::pending().await
            }
        };
        let owed = async {
            // Retained messages owed go before live deliveries (step 3).
            match retained_owed {
                true => Wake::Retained,
                false => std::future::pending().await,
            }
        }
        .or(async {
            if retained_waiting {
                return std::future::pending().await;
            }
            deliver_rx.ready().await;
            Wake::Deliver
        });
        // Polling `read` first costs nothing when a delivery woke the task:
        // a socket whose last read found nothing is read again only once
        // it is readable ([`crate::server::transport::Tcp`]).
        read.or(owed)
            .or(async { Wake::Common(driver::wait_common(acks, shutdown, timer).await) })
            .or(async {
                let _ = kick_rx.recv().await;
                Wake::Kicked
            })
            .or(async {
                any_grew(waits).await;
                Wake::StreamGrew
            })
            .await
    }

    /// Act on what woke the connection; `Err`: why it ends.
    async fn act(&mut self, wake: Wake) -> Result<(), String> {
        let now = Instant::now();
        self.now = now;
        match wake {
            Wake::Read(Ok(0)) => return Err("client closed the connection".into()),
            Wake::Read(Ok(n)) => {
                let buf = &mut self.buf;
                self.session
                    .handle_bytes(buf.get(..n).unwrap_or_default(), now);
                // The read buffer grows while reads fill it (to 16 KiB).
                if n == buf.len() && buf.len() < 16 * 1024 {
                    buf.resize(buf.len() * 2, 0);
                }
            }
            Wake::Read(Err(e)) => return Err(format!("read failed: {e}")),
            // Taken in step 3, the whole batch at once; the result is
            // re-read from the waiter in step 2.
            Wake::Deliver | Wake::Retained | Wake::StreamGrew | Wake::Common(Common::Stored) => {}
            Wake::Kicked => return Err(self.goodbye(CloseReason::TakenOver).await),
            Wake::Common(Common::Shutdown) => {
                return Err(self.goodbye(CloseReason::ShuttingDown).await)
            }
            Wake::Common(Common::Timer) => {
                self.timer.fired();
                if self.save_at.is_some_and(|t| t <= now) {
                    self.save_at = None;
                    save(&self.session, self.ctx.sessions, false).await;
                }
                self.session.handle_timeout(now);
            }
        }
        Ok(())
    }

    /// Tell a 5.0 client why frond ends its connection (DISCONNECT 0x8E
    /// or 0x8B, [`Session::end`]), waiting at most [`GOODBYE_TIMEOUT`] for
    /// a client that does not read (a takeover must not wait for it).
    /// Returns the text for the log.
    async fn goodbye(&mut self, why: CloseReason) -> String {
        let text = why.to_string();
        self.session.end(why);
        let out = self.session.take_output();
        if !out.is_empty() {
            let transport = &mut self.transport;
            async {
                let _ = transport.write_all(&out).await;
            }
            .or(async {
                Timer::after(GOODBYE_TIMEOUT).await;
            })
            .await;
        }
        text
    }

    /// The connection ended: write the session's final state, give back
    /// what it registered, and publish (or forget) its will.
    async fn finish(mut self) {
        let Ctx {
            broker,
            wills,
            sessions,
            ..
        } = *self.ctx;
        if self.checked_out {
            save(&self.session, sessions, true).await;
            if let Some(id) = &self.client_id {
                sessions.checkin(id);
            }
        }
        broker.drop_conn(self.conn);
        if let Some(id) = &self.client_id {
            broker.release_client_id(id, self.conn);
            if self.held {
                sessions.unhold(id, self.conn);
            }
        }
        if let Some(will) = self.session.take_will() {
            let armed = self.client_id.clone().zip(self.will_token);
            super::publish_will(broker, wills, armed, will);
        } else if let (Some(id), Some(token)) = (&self.client_id, self.will_token) {
            // Discarded (clean DISCONNECT): forget the durable copy.
            wills.forget(id, token).await;
        }
    }
}

/// Resolve when any of `streams` reaches its sequence.
async fn any_grew(streams: Vec<(&StreamHandle, u64)>) {
    if streams.is_empty() {
        return std::future::pending().await;
    }
    let mut futs: Vec<_> = streams
        .into_iter()
        .map(|(s, seq)| Box::pin(s.wait_for(seq)))
        .collect();
    std::future::poll_fn(|cx| {
        for f in &mut futs {
            if f.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}
