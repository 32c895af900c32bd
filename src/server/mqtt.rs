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
//! - Deliveries to a client queue in a bounded channel (`max_queued`); a
//!   client that does not read loses deliveries (counted), never stalls a
//!   publisher.
//! - Everything a connection registered (subscriptions, client id) is
//!   removed when it ends, whatever the reason.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use smol::channel::{bounded, Receiver};
use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};
use smol::Timer;

use crate::broker::retained::Retained;
use crate::broker::session::{Event, Limits, Session, WillMessage};
use crate::broker::{Broker, Delivery};
use crate::config::MqttConfig;
use crate::stream::{AckWaiter, Message, StreamError};

/// Accept MQTT connections (over WebSocket when `websocket`) until
/// `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    cfg: MqttConfig,
    shutdown: Receiver<()>,
    websocket: bool,
    retained: Arc<Retained>,
) {
    let wills = Arc::new(DelayedWills::default());
    let limits = Limits {
        max_packet_size: cfg.max_packet_size,
        max_keep_alive: cfg.max_keep_alive,
        connect_timeout: cfg.connect_timeout,
        max_inflight: cfg.max_inflight,
        auth: cfg.auth.clone(),
    };
    loop {
        let accepted = async { Some(listener.accept().await) }
            .or(async {
                let _ = shutdown.recv().await;
                None
            })
            .await;
        let (sock, peer) = match accepted {
            None => return,
            Some(Ok(x)) => x,
            Some(Err(e)) => {
                // EMFILE and friends: wait a little instead of spinning.
                log::warn!("mqtt: accept failed: {e}; retrying in 100ms");
                Timer::after(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let current = broker.counters.connections.load(Ordering::Relaxed);
        if current as usize >= cfg.max_connections {
            log::warn!(
                "mqtt: refusing {peer}: max_connections ({}) reached",
                cfg.max_connections
            );
            drop(sock);
            continue;
        }
        let _ = sock.set_nodelay(true);
        let broker = broker.clone();
        let limits = limits.clone();
        let max_queued = cfg.max_queued;
        let shutdown = shutdown.clone();
        let wills = wills.clone();
        let retained = retained.clone();
        smol::spawn(async move {
            broker.counters.connections.fetch_add(1, Ordering::Relaxed);
            broker
                .counters
                .total_connections
                .fetch_add(1, Ordering::Relaxed);
            let why = if websocket {
                let mut sock = sock;
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
                        connection(ws, &broker, limits, max_queued, shutdown, &wills, &retained)
                            .await
                    }
                    Err(e) => format!("websocket handshake failed: {e}"),
                }
            } else {
                connection(
                    Tcp(sock),
                    &broker,
                    limits,
                    max_queued,
                    shutdown,
                    &wills,
                    &retained,
                )
                .await
            };
            broker.counters.connections.fetch_sub(1, Ordering::Relaxed);
            log::debug!("mqtt: {peer} closed: {why}");
        })
        .detach();
    }
}

enum Wake {
    Read(std::io::Result<usize>),
    Deliver(Arc<Delivery>),
    Stored,
    Kicked,
    Shutdown,
    Timer,
}

/// An acknowledgement waiting its turn.
enum PendingAck {
    /// Waiting for the stream to make the message durable.
    Store(u16, AckWaiter),
    /// Nothing to wait for (QoS 2 duplicate, or no stream captures it).
    Ready(u16, Result<(), String>),
}

/// Wills waiting out their MQTT 5 delay, by client id. A new connection
/// with the same client id cancels its will (MQTT 5 §3.1.3.2.2).
#[derive(Default)]
pub struct DelayedWills {
    pending: std::sync::Mutex<std::collections::HashMap<String, smol::channel::Sender<()>>>,
}

impl DelayedWills {
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

/// Publish a will now, or after its delay unless cancelled.
fn publish_will(
    broker: &Arc<Broker>,
    wills: &Arc<DelayedWills>,
    client_id: Option<&str>,
    will: WillMessage,
) {
    let broker = broker.clone();
    let (cancel_tx, cancel_rx) = bounded::<()>(1);
    if !will.delay.is_zero() {
        if let Some(id) = client_id {
            wills.insert(id, cancel_tx);
        }
    }
    smol::spawn(async move {
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
        broker.route(&will.subject, &will.payload, will.qos, will.retain);
        if let Some(stream) = broker.capture(&will.subject) {
            let msg = Message {
                subject: will.subject.clone(),
                headers: None,
                payload: will.payload,
            };
            if let Err(e) = stream.publish(msg).await {
                log::warn!("mqtt: will on {} not stored: {e}", will.subject);
            }
        }
    })
    .detach();
}

/// How a connection's bytes travel: plain TCP, or WebSocket frames
/// ([`super::ws`]). Reads and writes never run concurrently.
pub trait Transport {
    /// Read some bytes; `Ok(0)` is the end of the stream. Cancel-safe.
    fn read(&mut self, buf: &mut [u8])
        -> impl std::future::Future<Output = std::io::Result<usize>>;
    /// Write all of `data`.
    fn write_all(&mut self, data: &[u8]) -> impl std::future::Future<Output = std::io::Result<()>>;
}

/// Plain TCP.
pub struct Tcp(pub TcpStream);

impl Transport for Tcp {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        AsyncReadExt::read(&mut self.0, buf).await
    }
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        AsyncWriteExt::write_all(&mut self.0, data).await
    }
}

/// Serve one MQTT connection over `transport` until it ends; returns why.
pub async fn connection<T: Transport>(
    mut transport: T,
    broker: &Arc<Broker>,
    limits: Limits,
    max_queued: usize,
    shutdown: Receiver<()>,
    wills: &Arc<DelayedWills>,
    retained: &Arc<Retained>,
) -> String {
    let conn = broker.new_conn_id();
    let (deliver_tx, deliver_rx) = bounded::<Arc<Delivery>>(max_queued);
    let (kick_tx, kick_rx) = bounded::<()>(1);
    let mut session = Session::new(limits, Instant::now());
    let mut buf = vec![0u8; 16 * 1024];
    let mut acks: VecDeque<PendingAck> = VecDeque::new();
    let mut client_id: Option<String> = None;
    let mut timer = Timer::never();
    let mut timer_at: Option<Instant> = None;
    let mut close_reason: Option<String> = None;

    let why = loop {
        // 1. Do what the session asked for.
        while let Some(ev) = session.poll_event() {
            match ev {
                Event::Connected { client_id: id, .. } => {
                    wills.cancel(&id);
                    broker.claim_client_id(&id, conn, kick_tx.clone());
                    client_id = Some(id);
                }
                Event::Publish {
                    subject,
                    payload,
                    qos,
                    retain,
                    ack,
                } => {
                    broker.counters.msgs_in.fetch_add(1, Ordering::Relaxed);
                    broker
                        .counters
                        .bytes_in
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                    broker.route(&subject, &payload, qos, retain);
                    if retain {
                        // Durable before the acknowledgement, like the
                        // stream below; a failure fails the publish.
                        let store = retained.clone();
                        let (s2, p2) = (subject.clone(), payload.clone());
                        if let Err(e) = smol::unblock(move || store.set(&s2, &p2, qos)).await {
                            log::warn!("mqtt: retained message on {subject} not stored: {e}");
                            if let Some(id) = ack {
                                acks.push_back(PendingAck::Ready(
                                    id,
                                    Err(format!("retained message not stored: {e}")),
                                ));
                            }
                            continue;
                        }
                    }
                    let pending = match broker.capture(&subject) {
                        None => Ok(None),
                        Some(stream) => {
                            let msg = Message {
                                subject,
                                headers: None,
                                payload,
                            };
                            stream.submit(msg).await.map(Some)
                        }
                    };
                    if let Some(id) = ack {
                        acks.push_back(match pending {
                            Ok(Some(w)) => PendingAck::Store(id, w),
                            Ok(None) => PendingAck::Ready(id, Ok(())),
                            Err(e) => PendingAck::Ready(id, Err(e.to_string())),
                        });
                    } else if let Err(e) = pending {
                        log::warn!("mqtt: QoS 0 message not stored: {e}");
                    }
                }
                Event::AckInOrder(id) => acks.push_back(PendingAck::Ready(id, Ok(()))),
                Event::Subscribe(requests) => {
                    let mut seen = std::collections::HashSet::new();
                    for r in requests {
                        broker.subscribe(conn, r.filter.clone(), r.qos, deliver_tx.clone());
                        if !r.send_retained || retained.is_empty() {
                            continue;
                        }
                        let store = retained.clone();
                        let filter = r.filter.clone();
                        for m in smol::unblock(move || store.matching(&filter)).await {
                            if seen.insert(m.subject.clone()) {
                                session.deliver_retained(&Delivery {
                                    subject: m.subject,
                                    payload: m.payload,
                                    qos: m.qos.min(r.qos),
                                    retain: true,
                                });
                            }
                        }
                    }
                }
                Event::Unsubscribe(filters) => {
                    for f in filters {
                        broker.unsubscribe(conn, &f);
                    }
                }
                Event::Close(why) => close_reason = Some(why),
            }
        }
        if let Some(why) = close_reason.take() {
            // Flush whatever the session queued (CONNACK refusal,
            // DISCONNECT with reason) before closing.
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
        // 3. Pass queued deliveries on without waiting.
        while let Ok(d) = deliver_rx.try_recv() {
            session.deliver(&d);
        }
        // 4. Write.
        if session.has_output() {
            let out = session.take_output();
            if let Err(e) = transport.write_all(&out).await {
                break format!("write failed: {e}");
            }
        }
        if session.is_closed() || session.has_events() {
            // Completing acks can resume decoding buffered input; handle
            // what it produced (or the Close reason) before sleeping.
            continue;
        }
        // 5. Sleep until something happens.
        let deadline = session.poll_deadline();
        if deadline != timer_at {
            match deadline {
                Some(d) => timer.set_at(d),
                None => timer = Timer::never(),
            }
            timer_at = deadline;
        }
        let want_read = session.wants_input();
        let wake = async {
            if want_read {
                Wake::Read(transport.read(&mut buf).await)
            } else {
                std::future::pending().await
            }
        }
        .or(async {
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
            Wake::Read(Ok(n)) => session.handle_bytes(&buf[..n], now),
            Wake::Read(Err(e)) => break format!("read failed: {e}"),
            Wake::Deliver(d) => session.deliver(&d),
            // The result is re-read from the waiter in step 2.
            Wake::Stored => {}
            Wake::Kicked => break "another connection took over the client id".into(),
            Wake::Shutdown => break "server shutting down".into(),
            Wake::Timer => {
                timer_at = None;
                session.handle_timeout(now);
            }
        }
    };
    broker.drop_conn(conn);
    if let Some(id) = &client_id {
        broker.release_client_id(id, conn);
    }
    if let Some(will) = session.take_will() {
        publish_will(broker, wills, client_id.as_deref(), will);
    }
    // Publishes still awaiting storage get no acknowledgement; the stream
    // stores them anyway and the client resends (at-least-once).
    why
}

fn ack_result(r: Result<crate::stream::PubAck, StreamError>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| e.to_string())
}
