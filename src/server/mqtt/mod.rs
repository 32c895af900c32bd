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
//! Persistent sessions (see [`crate::mqtt`] and
//! [`crate::broker::persist`]):
//! - On CONNECT the task claims the client id (kicking an older
//!   connection of the same user; another user's live connection is never
//!   kicked, the newcomer is refused: [`SessionStore::hold`]), waits until
//!   that connection has written its final state
//!   ([`SessionStore::checkout`]), loads the stored state and checks its
//!   owner ([`crate::broker::persist::claim`]: another user's session is
//!   refused, never resumed or deleted), then deletes it (clean session,
//!   or no expiry) or restores it before CONNACK.
//! - A persistent session (and one resumed with Clean Start 0 and expiry
//!   0, until its connection ends) follows, from its cursors, the streams
//!   whose subjects its (non-shared) subscriptions overlap — a SUBSCRIBE
//!   that reaches another stream follows it from its tail; a stored cursor
//!   of a stream no subscription reaches is dropped at resume — so its
//!   cost is that of the streams its filters reach: it reads
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

mod conn;
mod wills;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use smol::channel::Receiver;
use smol::future::FutureExt;
use smol::net::TcpListener;
use smol::Timer;

use crate::broker::persist::{log_id, Owner, SessionStore};
use crate::broker::retained::Retained;
use crate::config::MqttConfig;
use crate::mqtt::{Limits, Session};
use crate::router::Broker;

use super::accept::{self, Accept};
use super::transport::{Link, Plain, Stream, Tcp};

pub use conn::connection;
pub use wills::{publish_will, DelayedWills};

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
        // Spawned as it is: wrapping it in another async block would store
        // the future twice (the captured value and the awaited one), and
        // every connection's task would be twice as big.
        smol::spawn(serve_one(
            sock,
            peer,
            shared.clone(),
            limits.clone(),
            shutdown.clone(),
            framing.clone(),
        ))
        .detach();
    })
    .await
}

/// One accepted connection, through TLS and WebSocket if configured;
/// gives its slot back when it ends, and logs why it ended.
async fn serve_one(
    sock: smol::net::TcpStream,
    peer: std::net::SocketAddr,
    shared: Shared,
    limits: Limits,
    shutdown: Receiver<()>,
    framing: Framing,
) {
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
    let sock = Tcp::from(sock);
    let why = match framing.tls {
        None => {
            let sock: Stream = Box::new(sock);
            unwrap_and_serve(sock, framing.websocket, &ctx, limits, max_queued, shutdown).await
        }
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
                        let tls: Stream = Box::new(tls);
                        unwrap_and_serve(tls, ws, &ctx, limits, max_queued, shutdown).await
                    }
                    Err(e) => format!("TLS handshake failed: {e}"),
                }
            })
            .await
        }
    };
    broker.counters.connections.fetch_sub(1, Ordering::Relaxed);
    log::debug!("mqtt: {peer} closed: {why}");
}

/// After TLS (if any): the WebSocket upgrade (if `websocket`), then the
/// MQTT connection. Returns why it ended.
async fn unwrap_and_serve(
    mut sock: Stream,
    websocket: bool,
    ctx: &Ctx<'_>,
    limits: Limits,
    max_queued: usize,
    shutdown: Receiver<()>,
) -> String {
    if !websocket {
        return connection(Link::Plain(Plain(sock)), ctx, limits, max_queued, shutdown).await;
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
                connection(Link::Ws(ws), ctx, limits, max_queued, shutdown).await
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
        st.disconnected_at_ms = unix_now_ms().max(1);
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
pub(crate) fn retained_at(stored_ms: u64) -> Instant {
    let now = Instant::now();
    let age = std::time::Duration::from_millis(unix_now_ms().saturating_sub(stored_ms));
    match stored_ms {
        0 => now,
        _ => now.checked_sub(age).unwrap_or(now),
    }
}
