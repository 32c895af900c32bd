//! The MQTT TCP listener: the thin smol shell around [`Session`].
//!
//! Owns: accepting sockets (bounded by `max_connections`), one task per
//! connection that moves bytes between the socket and the session, hands
//! publishes to the stream and the router, and completes acknowledgements
//! in arrival order once the stream says the message is durable.
//!
//! Invariants:
//! - Per connection, at most `max_inflight` publishes await storage; the
//!   task stops reading the socket while that many are pending
//!   (backpressure reaches the client through TCP).
//! - Deliveries to a client, and the retained messages of its new
//!   subscriptions, are bounded in messages (`max_queued`) and bytes
//!   (`max_queued_bytes`) and moved into the session at the pace the
//!   client reads ([`super::outbound`]); a client that does not read
//!   loses deliveries (counted), never stalls a publisher.
//! - A retained publish past `mqtt.max_retained`/`max_retained_bytes`:
//!   MQTT 5 QoS 1/2 is refused with PUBACK/PUBREC 0x97 (quota exceeded),
//!   neither routed nor stored; MQTT 3.1.1 (no negative acknowledgement)
//!   and QoS 0 publishes go on (routed, captured, acknowledged) without
//!   being retained. Refusals are counted (`retained_refused`) and logged
//!   at most every 10 s.
//! - The read buffer starts at 1 KiB and doubles (to 16 KiB) while reads
//!   fill it: idle devices stay small, busy publishers read in bulk.
//! - Everything a connection registered (subscriptions, client id) is
//!   removed when it ends, whatever the reason.
//!
//! Persistent sessions (see [`crate::broker::session`] and
//! [`crate::broker::persist`]):
//! - On CONNECT the task claims the client id (kicking an older
//!   connection of the same user; another user's live connection is never
//!   kicked, the newcomer is refused: [`SessionStore::hold`]), waits until
//!   that connection has written its final state
//!   ([`SessionStore::checkout`]), loads the stored state and checks its
//!   owner ([`crate::broker::persist::claim`]: another user's session is
//!   refused, never resumed or deleted), then deletes it (clean session,
//!   or no expiry) or restores it before CONNACK.
//! - A persistent session follows every stream from its cursors: it reads
//!   in batches (at most the free in-flight window, 256 messages, 1 MiB)
//!   and waits with [`crate::stream::StreamHandle::wait_for`]. Router
//!   deliveries of subjects a stream captures are skipped for it (they come
//!   from the stream); subjects no stream captures still come live, and are
//!   lost while the client is offline.
//! - The backlog is bounded by the streams' limits: messages a stream drops
//!   before the session read them are skipped, with a warning giving the
//!   count.
//! - State is written after SUBSCRIBE/UNSUBSCRIBE before the SUBACK /
//!   UNSUBACK leaves (a SUBSCRIBE whose save fails is refused:
//!   [`Session::subscribe_done`]), before a write that carries QoS 2 state
//!   the session asks to be durable first ([`Session::take_sync`]: PUBREC,
//!   PUBCOMP, a stream message's QoS 2 PUBLISH or PUBREL; one write per
//!   batch; when it fails that output never leaves and the connection
//!   closes: [`Session::sync_failed`]),
//!   lazily (at most every 200 ms) while cursors move, and at disconnect
//!   (a session whose 5.0 DISCONNECT set the expiry to 0 is deleted). After a crash, or a shutdown that does not wait for
//!   connections, messages after the last written cursor are delivered
//!   again (at least once; DUP set for those known to have been sent).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use smol::channel::{bounded, unbounded, Receiver};
use smol::future::FutureExt;
use smol::io::{AsyncRead, AsyncWrite};
use smol::net::TcpListener;
use smol::Timer;

use crate::broker::bridge;
use crate::broker::persist::{claim, log_id, unix_now, Claim, Owner, SessionStore};
use crate::broker::retained::Retained;
use crate::broker::session::{Event, Limits, Session, WillMessage};
use crate::broker::wills::{unix_ms, StoredWill, WillStore};
use crate::broker::{Broker, Delivery};
use crate::config::MqttConfig;
use crate::stream::{AckWaiter, Message, StreamError, StreamHandle};

use super::accept::{self, Accept};
use super::outbound::{Outbound, WRITE_BUDGET};
use super::transport::{Plain, Transport};

/// Longest a connection waits for the previous connection of its client
/// id to hand its session over.
const HANDOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Cursor progress is written at most this often while a session is active.
const SAVE_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// Refused connections are logged at most this often.
const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// Most messages read from a stream in one batch.
const READ_BATCH: usize = 256;
/// Failed accepts are logged at most this often.
const ACCEPT_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// What a listener speaks below MQTT.
#[derive(Clone)]
pub struct Framing {
    /// TLS first (`mqtt.tls_listen`, `mqtt.wss_listen`).
    pub tls: Option<futures_rustls::TlsAcceptor>,
    /// Then a WebSocket upgrade (`mqtt.ws_listen`, `mqtt.wss_listen`).
    pub websocket: bool,
}

/// What every MQTT listener shares: the router, retained messages,
/// persistent sessions and wills.
#[derive(Clone)]
pub struct Shared {
    pub broker: Arc<Broker>,
    pub retained: Arc<Retained>,
    pub sessions: Arc<SessionStore>,
    pub wills: Arc<DelayedWills>,
}

/// Accept MQTT connections until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    shared: Shared,
    cfg: MqttConfig,
    shutdown: Receiver<()>,
    framing: Framing,
) {
    let limits = Limits {
        max_packet_size: cfg.max_packet_size,
        max_keep_alive: cfg.max_keep_alive,
        connect_timeout: cfg.connect_timeout,
        max_inflight: cfg.max_inflight,
        max_queued: cfg.max_queued,
        max_queued_bytes: cfg.max_queued_bytes,
        max_session_expiry: cfg.max_session_expiry,
        auth: cfg.auth.clone(),
        max_subscriptions: cfg.max_subscriptions,
        max_topic_length: cfg.max_topic_length,
        max_topic_levels: cfg.max_topic_levels,
    };
    let accept = Accept {
        name: "mqtt",
        open: &shared.broker.counters.connections,
        max_connections: cfg.max_connections,
        limit_key: "max_connections",
        refusal: b"",
        refusal_log_every: REFUSAL_LOG_EVERY,
        failure_log_every: ACCEPT_LOG_EVERY,
        failure_hint: " (out of file descriptors? see the start-up line about RLIMIT_NOFILE)",
    };
    accept::serve(&listener, &shutdown, accept, |sock, peer| {
        let _ = sock.set_nodelay(true);
        let task = serve_one(
            sock,
            shared.clone(),
            limits.clone(),
            shutdown.clone(),
            framing.clone(),
        );
        smol::spawn(async move {
            let why = task.await;
            log::debug!("mqtt: {peer} closed: {why}");
        })
        .detach();
    })
    .await
}

/// One accepted connection, through TLS and WebSocket if configured;
/// gives its slot back when it ends. Returns why it ended.
async fn serve_one(
    sock: smol::net::TcpStream,
    shared: Shared,
    limits: Limits,
    shutdown: Receiver<()>,
    framing: Framing,
) -> String {
    let Shared {
        broker,
        retained,
        sessions,
        wills,
    } = shared;
    broker
        .counters
        .total_connections
        .fetch_add(1, Ordering::Relaxed);
    let max_queued = limits.max_queued;
    let ctx = Ctx {
        broker: &broker,
        wills: &wills,
        retained: &retained,
        sessions: &sessions,
    };
    let timeout = limits.connect_timeout;
    let why = match framing.tls {
        None => unwrap_and_serve(sock, framing.websocket, &ctx, limits, max_queued, shutdown).await,
        // Boxed, like the WebSocket path: the TLS state would make every
        // plain connection's task that much bigger.
        Some(acceptor) => {
            Box::pin(async {
                let shaken = async { acceptor.accept(sock).await.map_err(|e| e.to_string()) }
                    .or(async {
                        Timer::after(timeout).await;
                        Err("no TLS handshake within connect_timeout".into())
                    })
                    .await;
                match shaken {
                    Ok(tls) => {
                        let ws = framing.websocket;
                        unwrap_and_serve(tls, ws, &ctx, limits, max_queued, shutdown).await
                    }
                    Err(e) => format!("TLS handshake failed: {e}"),
                }
            })
            .await
        }
    };
    broker.counters.connections.fetch_sub(1, Ordering::Relaxed);
    why
}

enum Wake {
    Read(std::io::Result<usize>),
    Deliver(Arc<Delivery>),
    /// Retained messages are owed (step 3 reads them).
    Retained,
    Stored,
    Kicked,
    Shutdown,
    StreamGrew,
    Timer,
}

/// An acknowledgement waiting its turn.
enum PendingAck {
    /// Waiting for the stream to make the message durable.
    Store(u16, AckWaiter),
    /// Nothing to wait for (QoS 2 duplicate, or no stream captures it).
    Ready(u16, Result<(), String>),
}

/// The captured publishes of one read, handed to their streams together:
/// first every live delivery of the batch (the router queued them; one
/// yield lets the subscribers' tasks write them, each in one write), then
/// the stream submits, in order, which wake each stream's thread about
/// once per batch instead of once per message (a wake can preempt this
/// thread, and costs more than the write of a small message).
#[derive(Default)]
struct StoreBatch {
    msgs: Vec<(StreamHandle, Message, Option<u16>)>,
    /// Some message of the batch went to live subscribers.
    routed: bool,
}

impl StoreBatch {
    async fn submit(&mut self, acks: &mut VecDeque<PendingAck>) {
        if self.msgs.is_empty() {
            return;
        }
        if std::mem::take(&mut self.routed) {
            smol::future::yield_now().await;
        }
        for (stream, msg, ack) in self.msgs.drain(..) {
            match (ack, stream.submit(msg).await) {
                (Some(id), Ok(w)) => acks.push_back(PendingAck::Store(id, w)),
                (Some(id), Err(e)) => acks.push_back(PendingAck::Ready(id, Err(e.to_string()))),
                (None, Ok(_)) => {}
                (None, Err(e)) => log::warn!("mqtt: QoS 0 message not stored: {e}"),
            }
        }
    }
}

/// Wills waiting out their MQTT 5 delay, by client id, and the durable
/// copies of all unsettled wills ([`WillStore`]; `None` in tests of the
/// shell). A new connection with the same client id cancels its will
/// (MQTT 5 §3.1.3.2.2). One per server, shared by all MQTT listeners.
#[derive(Default)]
pub struct DelayedWills {
    pending: std::sync::Mutex<std::collections::HashMap<String, smol::channel::Sender<()>>>,
    store: Option<Arc<WillStore>>,
    /// Where a will with the retain flag becomes the retained message.
    retained: Option<Arc<Retained>>,
}

impl DelayedWills {
    pub fn with_store(store: WillStore, retained: Arc<Retained>) -> DelayedWills {
        DelayedWills {
            pending: Default::default(),
            store: Some(Arc::new(store)),
            retained: Some(retained),
        }
    }

    /// Make the will of a connection that just connected durable (or
    /// forget the stored one when it has none); blocks on the disk, so the
    /// CONNACK leaves after it. Returns the arming token.
    pub async fn arm(&self, client_id: &str, will: Option<&WillMessage>) -> Option<u64> {
        let store = self.store.clone()?;
        let id = client_id.to_string();
        let stored = will.map(|w| StoredWill::new(client_id, w));
        let token = stored.as_ref().map(|w| w.token);
        let r = smol::unblock(move || match &stored {
            Some(w) => store.save(w),
            None => store.remove(&id),
        })
        .await;
        if let Err(e) = r {
            log::warn!("mqtt: cannot store the will of {client_id}: {e}; it is lost if frond stops before it is due");
        }
        token
    }

    fn cancel(&self, client_id: &str) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = p.remove(client_id) {
            tx.close();
        }
    }

    fn insert(&self, client_id: &str, tx: smol::channel::Sender<()>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = p.insert(client_id.to_string(), tx) {
            old.close();
        }
    }
}

/// Publish a will now, or after its delay unless cancelled. `armed`: the
/// client id and token of its durable copy, settled once it is stored (a
/// delayed one is first rewritten with its due time).
pub fn publish_will(
    broker: &Arc<Broker>,
    wills: &Arc<DelayedWills>,
    armed: Option<(String, u64)>,
    will: WillMessage,
) {
    let broker = broker.clone();
    let (cancel_tx, cancel_rx) = bounded::<()>(1);
    if !will.delay.is_zero() {
        if let Some((id, _)) = &armed {
            wills.insert(id, cancel_tx);
        }
    }
    let store = wills.store.clone();
    let retained = wills.retained.clone();
    smol::spawn(async move {
        if let (Some(store), Some((id, token)), false) = (&store, &armed, will.delay.is_zero()) {
            let mut w = StoredWill::new(id, &will);
            w.token = *token;
            w.due_ms = unix_ms().saturating_add(w.delay_ms);
            let store = store.clone();
            if let Err(e) = smol::unblock(move || store.save(&w)).await {
                log::warn!("mqtt: cannot store the due time of a will: {e}");
            }
        }
        if !will.delay.is_zero() {
            let fire = async {
                Timer::after(will.delay).await;
                true
            }
            .or(async {
                let _ = cancel_rx.recv().await;
                false
            })
            .await;
            if !fire {
                return;
            }
        }
        // No request inbox for a will, and no JetStream API call: its
        // client's permissions may be long gone ([`bridge::will_meta`]).
        let (headers, reply) = match &will.props {
            Some(p) => bridge::will_meta(p),
            None => (None, None),
        };
        let _ = broker.route_mqtt_as(
            Some(bridge::will_publisher()),
            &will.subject,
            &will.payload,
            will.qos,
            will.retain,
            headers.clone(),
            reply,
            Instant::now(),
        );
        if let (true, Some(retained)) = (will.retain, retained) {
            let (s, p, q, h) = (
                will.subject.clone(),
                will.payload.clone(),
                will.qos,
                headers.clone(),
            );
            let now_ms = unix_now_ms();
            let set = move || retained.set_with(&s, &p, q, h.as_deref(), now_ms);
            match smol::unblock(set).await {
                Ok(()) => {}
                // Over mqtt.max_retained(_bytes): published, not retained
                // (logged by the store).
                Err(e) if e.kind() == std::io::ErrorKind::QuotaExceeded => {
                    broker
                        .counters
                        .retained_refused
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => log::warn!("mqtt: retained will on {} not stored: {e}", will.subject),
            }
        }
        if let Some(stream) = broker.capture(&will.subject) {
            let msg = Message {
                subject: will.subject.clone(),
                headers: bridge::stored_headers(headers, will.qos),
                payload: will.payload,
            };
            if let Err(e) = stream.publish(msg).await {
                log::warn!("mqtt: will on {} not stored: {e}", will.subject);
            }
        }
        if let (Some(store), Some((id, token))) = (store, armed) {
            let r = smol::unblock(move || store.settle(&id, token)).await;
            if let Err(e) = r {
                log::warn!("mqtt: cannot delete a published will's file: {e}; it is published again at the next start");
            }
        }
    })
    .detach();
}

/// After TLS (if any): the WebSocket upgrade (if `websocket`), then the
/// MQTT connection. Returns why it ended.
async fn unwrap_and_serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    websocket: bool,
    ctx: &Ctx<'_>,
    limits: Limits,
    max_queued: usize,
    shutdown: Receiver<()>,
) -> String {
    if !websocket {
        return connection(Plain(sock), ctx, limits, max_queued, shutdown).await;
    }
    // Boxed: the WebSocket path's future is several KiB larger than the
    // plain one, and every task would otherwise be that big.
    Box::pin(async {
        let timeout = limits.connect_timeout;
        let shaken = super::ws::handshake(&mut sock)
            .or(async {
                Timer::after(timeout).await;
                Err("no WebSocket handshake within connect_timeout".into())
            })
            .await;
        match shaken {
            Ok(()) => {
                let ws = super::ws::Ws::new(sock, limits.max_packet_size + 16);
                connection(ws, ctx, limits, max_queued, shutdown).await
            }
            Err(e) => format!("websocket handshake failed: {e}"),
        }
    })
    .await
}

/// What a connection shares with the rest of the server.
pub struct Ctx<'a> {
    pub broker: &'a Arc<Broker>,
    pub wills: &'a Arc<DelayedWills>,
    pub retained: &'a Arc<Retained>,
    pub sessions: &'a Arc<SessionStore>,
}

/// Write the session's state (persistent sessions only); logged on error.
/// A session whose expiry a DISCONNECT set to 0 is deleted instead.
/// False when the write failed (nothing that depends on it may be
/// acknowledged).
async fn save(session: &Session, sessions: &Arc<SessionStore>, disconnected: bool) -> bool {
    if disconnected && session.discard_stored() {
        let store = sessions.clone();
        let id = session.client_id().to_string();
        if let Err(e) = smol::unblock(move || store.remove(&id)).await {
            log::warn!("mqtt: cannot delete an ended session's state: {e}");
            return false;
        }
        return true;
    }
    if !session.is_persistent() {
        return true;
    }
    let mut st = session.snapshot();
    if disconnected {
        st.disconnected_at = unix_now().max(1);
    }
    let store = sessions.clone();
    if let Err(e) = smol::unblock(move || store.save(&st)).await {
        log::warn!(
            "mqtt: cannot save the session state of {}: {e}; what depends on it is not acknowledged, and after a restart some messages may be delivered again",
            log_id(session.client_id())
        );
        return false;
    }
    true
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

/// Serve one MQTT connection over `transport` until it ends; returns why.
pub async fn connection<T: Transport>(
    mut transport: T,
    ctx: &Ctx<'_>,
    limits: Limits,
    max_queued: usize,
    shutdown: Receiver<()>,
) -> String {
    let Ctx {
        broker,
        wills,
        retained,
        sessions,
    } = *ctx;
    let conn = broker.new_conn_id();
    let (deliver_tx, deliver_rx) = unbounded::<Arc<Delivery>>();
    let mut owed = Outbound::new(broker, conn, max_queued, limits.max_queued_bytes);
    let (kick_tx, kick_rx) = bounded::<()>(1);
    let limits_auth = limits.auth.clone();
    let mut session = Session::new(limits, Instant::now());
    let mut buf = vec![0u8; 1024];
    let mut acks: VecDeque<PendingAck> = VecDeque::new();
    let mut client_id: Option<String> = None;
    let mut timer = Timer::never();
    let mut timer_at: Option<Instant> = None;
    let mut close_reason: Option<String> = None;
    // Streams a persistent session follows (index = follow index) and
    // whether reading one failed (then it is not followed any more).
    let mut follows: Vec<(StreamHandle, bool)> = Vec::new();
    let mut checked_out = false;
    // This connection is the recorded holder of its client id.
    let mut held = false;
    let mut save_at: Option<Instant> = None;
    // The arming token of this connection's durable will.
    let mut will_token: Option<u64> = None;

    let mut batch = StoreBatch::default();
    let why = loop {
        // 1. Do what the session asked for. Captured publishes are handed
        //    to their streams together, after the batch's live deliveries
        //    ([`StoreBatch`]); anything else waits for them (acks in order).
        while let Some(ev) = session.poll_event() {
            if !matches!(ev, Event::Publish { .. }) {
                batch.submit(&mut acks).await;
            }
            match ev {
                Event::Connected {
                    client_id: id,
                    clean,
                    expiry,
                } => {
                    // A client id held by another user's connection is
                    // refused, never taken over ([`SessionStore::hold`]).
                    let owner = session.owner().cloned();
                    if let Err(holder) = sessions.hold(&id, conn, owner.as_ref()) {
                        let held_by = format!("is held by a connection of {holder}");
                        refuse_client_id(&mut session, &id, &held_by, owner.as_ref());
                        continue;
                    }
                    held = true;
                    // Before any subscription (restored ones included).
                    broker.set_permissions(conn, session.permissions().cloned());
                    broker.claim_client_id(&id, conn, kick_tx.clone());
                    client_id = Some(id.clone());
                    if !sessions.checkout(&id, HANDOVER_TIMEOUT).await {
                        close_reason =
                            Some("the previous connection of this client id did not end".into());
                        continue;
                    }
                    checked_out = true;
                    let store = sessions.clone();
                    let fresh = clean || expiry.is_zero();
                    let load_id = id.clone();
                    let stored = smol::unblock(move || store.load(&load_id)).await;
                    // The stored session belongs to its owner: another
                    // user neither resumes nor deletes it.
                    let stored_owner = stored.as_ref().and_then(|s| s.owner.as_ref());
                    let decision = claim(stored_owner, owner.as_ref(), limits_auth.as_deref());
                    if decision == Claim::Refuse {
                        let other = stored_owner.map_or("another user".into(), |o| o.to_string());
                        let has = format!("has a stored session of {other}");
                        refuse_client_id(&mut session, &id, &has, owner.as_ref());
                        continue;
                    }
                    if decision == Claim::Discard {
                        log::warn!(
                            "mqtt: the stored session of client id {} belonged to {}, who can no longer log in; discarded",
                            log_id(&id),
                            stored_owner.map_or("another user".into(), |o| o.to_string())
                        );
                    }
                    if let (Some(me), Some(st)) = (&owner, &stored) {
                        if st.owner.is_none() && !fresh {
                            log::info!(
                                "mqtt: the stored session of client id {} had no owner (an earlier version); it now belongs to {me}",
                                log_id(&id)
                            );
                        }
                    }
                    let stored = match (fresh, decision, stored) {
                        (false, Claim::Resume, stored) => stored,
                        (_, _, None) => None,
                        (_, _, Some(_)) => {
                            let store = sessions.clone();
                            let rm_id = id.clone();
                            let removed = smol::unblock(move || store.remove(&rm_id)).await;
                            if let Err(e) = removed {
                                log::warn!(
                                    "mqtt: cannot delete the stored session of {}: {e}",
                                    log_id(&id)
                                );
                            }
                            None
                        }
                    };
                    wills.cancel(&id);
                    session.restore(stored);
                    // Durable before the CONNACK (queued by restore) leaves.
                    let id = client_id.clone().unwrap_or_default();
                    will_token = wills.arm(&id, session.will()).await;
                    if session.is_persistent() {
                        for s in broker.streams() {
                            session.follow(&s.config().name, s.state().last_seq);
                            follows.push((s.clone(), false));
                        }
                    }
                }
                Event::Publish {
                    subject,
                    payload,
                    qos,
                    retain,
                    ack,
                    props,
                } => {
                    let subject = broker.map_subject(subject);
                    // MQTT 5 properties travel as NATS headers ([`bridge`]);
                    // a publish to a request inbox goes to its response
                    // topic, without a reply subject of its own (so a reply
                    // gets no inbox either).
                    let (headers, reply) = match &props {
                        Some(p) if subject.starts_with(bridge::INBOX_PREFIX) => {
                            (bridge::props_to_headers(p), None)
                        }
                        Some(p) => bridge::publish_meta(&broker.replies, p, Instant::now()),
                        None => (None, None),
                    };
                    let redirected =
                        bridge::redirect_reply(&broker.replies, subject, headers, reply);
                    let (subject, headers, reply) = match redirected {
                        Ok(r) => r,
                        Err(to) => {
                            log::warn!("mqtt: reply to a request dropped: its response subject {to:?} is reserved");
                            if let Some(id) = ack {
                                batch.submit(&mut acks).await;
                                acks.push_back(PendingAck::Ready(id, Ok(())));
                            }
                            continue;
                        }
                    };
                    broker.counters.msgs_in.fetch_add(1, Ordering::Relaxed);
                    broker
                        .counters
                        .bytes_in
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                    if retain {
                        // Durable before the acknowledgement (and before it
                        // is routed), like the stream below.
                        let store = retained.clone();
                        let (s2, p2, h2) = (subject.clone(), payload.clone(), headers.clone());
                        let now_ms = unix_now_ms();
                        let set = move || store.set_with(&s2, &p2, qos, h2.as_deref(), now_ms);
                        match smol::unblock(set).await {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::QuotaExceeded => {
                                // Logged (rate-limited) by the store.
                                broker
                                    .counters
                                    .retained_refused
                                    .fetch_add(1, Ordering::Relaxed);
                                if let Some(id) = ack.filter(|&id| session.refuse_publish(id, 0x97))
                                {
                                    // 5.0: quota exceeded; nothing routed or stored.
                                    batch.submit(&mut acks).await;
                                    acks.push_back(PendingAck::Ready(id, Ok(())));
                                    continue;
                                }
                                // 3.1.1 and QoS 0: on, without being retained.
                            }
                            Err(e) => {
                                log::warn!("mqtt: retained message on {subject} not stored: {e}");
                                if let Some(id) = ack {
                                    batch.submit(&mut acks).await;
                                    acks.push_back(PendingAck::Ready(
                                        id,
                                        Err(format!("retained message not stored: {e}")),
                                    ));
                                }
                                continue;
                            }
                        }
                    }
                    let routed = broker.route_mqtt_as(
                        session.permissions().cloned(),
                        &subject,
                        &payload,
                        qos,
                        retain,
                        headers.clone(),
                        reply,
                        Instant::now(),
                    );
                    match broker.capture(&subject) {
                        Some(stream) => {
                            batch.routed |= routed > 0;
                            batch.msgs.push((
                                stream.clone(),
                                Message {
                                    subject,
                                    // The publisher's QoS when 0 or 2 ([`bridge`]).
                                    headers: bridge::stored_headers(headers, qos),
                                    payload,
                                },
                                ack,
                            ));
                        }
                        None => {
                            if let Some(id) = ack {
                                batch.submit(&mut acks).await;
                                acks.push_back(PendingAck::Ready(id, Ok(())));
                            }
                        }
                    }
                }
                Event::AckInOrder(id) => acks.push_back(PendingAck::Ready(id, Ok(()))),
                Event::Subscribe(requests) => {
                    // Durable before the SUBACK (which the session holds
                    // until told; refused when the save failed).
                    let saved = save(&session, sessions, false).await;
                    if !session.subscribe_done(saved) {
                        continue;
                    }
                    let mut filters = Vec::new();
                    let mut granted = Vec::new();
                    for r in requests {
                        broker.subscribe_mqtt(
                            conn,
                            r.share.clone(),
                            r.filter.clone(),
                            r.qos,
                            deliver_tx.clone(),
                            max_queued,
                        );
                        if r.send_retained {
                            filters.push(r.filter);
                            granted.push(r.qos);
                        }
                    }
                    // Read from disk in step 3, in batches, before later
                    // live deliveries.
                    let id = client_id.as_deref().unwrap_or("?");
                    owed.owe_retained(retained, filters, granted, id).await;
                }
                Event::Unsubscribe(filters) => {
                    save(&session, sessions, false).await;
                    for f in filters {
                        broker.unsubscribe(conn, &f);
                    }
                }
                Event::UnsubscribeShared(filters) => {
                    for (share, f) in filters {
                        broker.unsubscribe_mqtt(conn, Some(&share), &f);
                    }
                }
                Event::Close(why) => close_reason = Some(why),
            }
        }
        batch.submit(&mut acks).await;
        if let Some(why) = close_reason.take() {
            // Flush whatever the session queued (CONNACK refusal,
            // DISCONNECT with reason) before closing; QoS 2 state it
            // depends on first, as in step 4.
            if session.take_sync() && !save(&session, sessions, false).await {
                session.sync_failed("write failed");
            }
            let out = session.take_output();
            if !out.is_empty() {
                let _ = transport.write_all(&out).await;
            }
            break why;
        }
        // 2. Complete acknowledgements that are ready, in order.
        while let Some(front) = acks.front_mut() {
            let result = match front {
                PendingAck::Ready(_, r) => Some(r.clone()),
                PendingAck::Store(_, w) => w.try_take().map(ack_result),
            };
            let Some(result) = result else { break };
            if let Some(PendingAck::Ready(id, _) | PendingAck::Store(id, _)) = acks.pop_front() {
                session.publish_done(id, result);
            }
        }
        // 3. Pass owed retained messages, then queued deliveries, on
        // without waiting, while the output is small ([`Outbound`]).
        let mut more = false;
        owed.pump(&mut session, broker, retained, &deliver_rx).await;
        // 3b. Persistent sessions: one batch from each followed stream.
        for (idx, (stream, broken)) in follows.iter_mut().enumerate() {
            let room = session.stream_room();
            let Some(next) = session.stream_next(idx) else {
                continue;
            };
            if room == 0 || *broken {
                continue;
            }
            if session.output_len() >= WRITE_BUDGET {
                // Written in step 4 first.
                more = true;
                continue;
            }
            let st = stream.state();
            if next < st.first_seq {
                log::warn!(
                    "mqtt: {}: {} messages of stream {} were removed by its limits before delivery; skipped",
                    client_id.as_deref().unwrap_or("?"),
                    st.first_seq - next,
                    stream.config().name
                );
                session.stream_skip_to(idx, st.first_seq);
            }
            let next = session.stream_next(idx).unwrap_or(next);
            if st.last_seq < next {
                continue;
            }
            match stream.read(next, room.min(READ_BATCH), 1 << 20).await {
                Ok(msgs) => {
                    if msgs.is_empty() {
                        // Everything up to last_seq was deleted.
                        session.stream_skip_to(idx, st.last_seq.saturating_add(1));
                    }
                    let now_ns = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos());
                    for m in msgs {
                        // The age decides MQTT message expiry.
                        let age = now_ns.saturating_sub(u128::from(m.timestamp));
                        let age =
                            std::time::Duration::from_nanos(u64::try_from(age).unwrap_or(u64::MAX));
                        session.deliver_stored_msg(
                            idx,
                            m.seq,
                            &m.subject,
                            m.headers.as_deref(),
                            &m.payload,
                            age,
                        );
                    }
                    more = true;
                }
                Err(e) => {
                    log::warn!(
                        "mqtt: cannot read stream {} for a persistent session: {e}",
                        stream.config().name
                    );
                    *broken = true;
                }
            }
        }
        // 4. Write. A takeover interrupts a write to a client that does
        // not read, so the new connection gets the session without waiting.
        // QoS 2 state the output depends on is written first (one write
        // for the whole batch; see `Session::take_sync`).
        if session.take_sync() {
            if save(&session, sessions, false).await {
                let _ = session.take_dirty();
                save_at = None;
            } else {
                // Nothing the disk does not back leaves; the connection
                // closes (handled on the next turn).
                session.sync_failed("write failed");
            }
        }
        if session.has_output() {
            let out = session.take_output();
            let written = async { Some(transport.write_all(&out).await) }
                .or(async {
                    let _ = kick_rx.recv().await;
                    None
                })
                .await;
            match written {
                Some(Ok(())) => {}
                Some(Err(e)) => break format!("write failed: {e}"),
                None => break "another connection took over the client id".into(),
            }
        }
        if session.take_dirty() && save_at.is_none() {
            save_at = Some(Instant::now() + SAVE_EVERY);
        }
        if session.is_closed() || session.has_events() || more {
            // Completing acks can resume decoding buffered input; handle
            // what it produced (or the Close reason) before sleeping.
            continue;
        }
        // 5. Sleep until something happens.
        let deadline = match (session.poll_deadline(), save_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Re-arm only when the deadline comes earlier. The keep-alive
        // deadline moves later with every packet, and re-arming costs the
        // reactor several syscalls per packet; a timer that fires early is
        // harmless (`handle_timeout` and `save_at` check the time) and is
        // re-armed at the current deadline on the next turn.
        if let Some(d) = deadline {
            if timer_at.is_none_or(|t| d < t) {
                timer.set_at(d);
                timer_at = Some(d);
            }
        }
        let want_read = session.wants_input();
        // Owed retained messages go before live deliveries: while any are,
        // the channel is not watched.
        let retained_waiting = owed.retained_waiting();
        let retained_owed = owed.retained_ready(&session);
        let room = session.stream_room() > 0;
        let waits: Vec<(&StreamHandle, u64)> = follows
            .iter()
            .enumerate()
            .filter(|(_, (_, broken))| room && !*broken)
            .filter_map(|(i, (s, _))| Some((s, session.stream_next(i)?)))
            .collect();
        let wake = async {
            if want_read {
                Wake::Read(transport.read(&mut buf).await)
            } else {
                std::future::pending().await
            }
        }
        .or(async {
            // Retained messages owed go before live deliveries (step 3).
            match retained_owed {
                true => Wake::Retained,
                false => std::future::pending().await,
            }
        })
        .or(async {
            if retained_waiting {
                return std::future::pending().await;
            }
            match deliver_rx.recv().await {
                Ok(d) => Wake::Deliver(d),
                Err(_) => std::future::pending().await,
            }
        })
        .or(async {
            match acks.front_mut() {
                Some(PendingAck::Store(_, w)) => {
                    w.wait().await;
                    Wake::Stored
                }
                Some(PendingAck::Ready(..)) => Wake::Stored,
                None => std::future::pending().await,
            }
        })
        .or(async {
            let _ = kick_rx.recv().await;
            Wake::Kicked
        })
        .or(async {
            any_grew(waits).await;
            Wake::StreamGrew
        })
        .or(async {
            let _ = shutdown.recv().await;
            Wake::Shutdown
        })
        .or(async {
            (&mut timer).await;
            Wake::Timer
        })
        .await;
        let now = Instant::now();
        match wake {
            Wake::Read(Ok(0)) => break "client closed the connection".into(),
            Wake::Read(Ok(n)) => {
                session.handle_bytes(&buf[..n], now);
                if n == buf.len() && buf.len() < 16 * 1024 {
                    buf.resize(buf.len() * 2, 0);
                }
            }
            Wake::Read(Err(e)) => break format!("read failed: {e}"),
            Wake::Deliver(d) => owed.take(&mut session, broker, &d),
            Wake::Retained => {}
            Wake::StreamGrew => {}
            // The result is re-read from the waiter in step 2.
            Wake::Stored => {}
            Wake::Kicked => break "another connection took over the client id".into(),
            Wake::Shutdown => break "server shutting down".into(),
            Wake::Timer => {
                timer_at = None;
                if save_at.is_some_and(|t| t <= now) {
                    save_at = None;
                    save(&session, sessions, false).await;
                }
                session.handle_timeout(now);
            }
        }
    };
    if checked_out {
        save(&session, sessions, true).await;
        if let Some(id) = &client_id {
            sessions.checkin(id);
        }
    }
    broker.drop_conn(conn);
    if let Some(id) = &client_id {
        broker.release_client_id(id, conn);
        if held {
            sessions.unhold(id, conn);
        }
    }
    if let Some(will) = session.take_will() {
        let armed = client_id.clone().zip(will_token);
        publish_will(broker, wills, armed, will);
    } else if let (Some(id), Some(token)) = (&client_id, will_token) {
        // Discarded (clean DISCONNECT): forget the durable copy.
        if let Some(store) = wills.store.clone() {
            let id = id.clone();
            let _ = smol::unblock(move || store.settle(&id, token)).await;
        }
    }
    // Publishes still awaiting storage get no acknowledgement; the stream
    // stores them anyway and the client resends (at-least-once).
    why
}

/// Refuse a CONNECT whose client id belongs to another user (`why`
/// completes "client id … "), with a warning naming both.
fn refuse_client_id(session: &mut Session, id: &str, why: &str, me: Option<&Owner>) {
    let me = me.map_or("this client".into(), |o| o.to_string());
    let why = format!("client id {} {why}; {me} refused", log_id(id));
    log::warn!("mqtt: {why}");
    session.refuse(why);
}

/// Unix time in milliseconds.
fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The `Instant` a retained message set at `stored_ms` (unix ms) was set.
pub(super) fn retained_at(stored_ms: u64) -> Instant {
    let now = Instant::now();
    let age = std::time::Duration::from_millis(unix_now_ms().saturating_sub(stored_ms));
    match stored_ms {
        0 => now,
        _ => now.checked_sub(age).unwrap_or(now),
    }
}

fn ack_result(r: Result<crate::stream::PubAck, StreamError>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| e.to_string())
}
