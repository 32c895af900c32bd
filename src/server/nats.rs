//! The NATS TCP listener: the thin smol shell around [`Conn`].
//!
//! Owns: accepting sockets (bounded by `max_connections`), one task per
//! connection that moves bytes between the socket and the connection
//! machine, registers its subscriptions with the router, routes its
//! publishes, captures them into streams, and answers JetStream-style
//! publishes (those with a reply subject to a captured subject) with a
//! PubAck once the message is durable.
//!
//! Invariants:
//! - The task never blocks on the socket while other work is pending:
//!   reads and (partial) writes are raced with deliveries, acks, timers and
//!   shutdown. What the router queues for the client is bounded by
//!   `max_pending` bytes in the connection's [`Outbox`]; the task moves
//!   deliveries into its write buffer only while that buffer is under
//!   [`WRITE_BUDGET`]. When the outbox overflows, the client gets
//!   `-ERR 'Slow Consumer'` (best effort) and is disconnected; publishers
//!   and other subscribers never wait for it.
//! - At most [`MAX_PENDING_ACKS`] PubAcks await storage per connection;
//!   reading stops while that many are pending (backpressure through TCP).
//! - PubAcks are published in the order the messages arrived, each only
//!   after its message is durable.
//! - Everything a connection registered is removed when it ends.
//! - A connection over `max_connections` gets `-ERR 'maximum connections
//!   exceeded'` if its fresh socket takes it at once, and is closed at
//!   once (refusals hold no descriptors); a failed accept (EMFILE, ...) is
//!   retried after 100 ms, never in a busy loop. Both are logged at most
//!   every 10 s.
//!
//! A JetStream PubAck is published only to a reply subject the publisher
//! may subscribe to; otherwise the message is stored and the PubAck
//! dropped (logged at debug): nats-server sends it anyway, which lets a
//! client write acks onto subjects it may not use.
//!
//! Capture rules for NATS publishes: subjects under `_INBOX.` and `$` are
//! never captured (replies and reserved namespaces). A stream that
//! captures everything (`>`, as the default stream does) stores requests
//! too but never answers them with a PubAck — it cannot tell a JetStream
//! publish from a request — so requests still reach their responders, and
//! "no responders" still applies (like nats-server's `no_ack` streams).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::channel::Receiver;
use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};
use smol::Timer;

use super::accept::{self, Accept};
use crate::broker::{Broker, Msg, NoInterest, Origin, Outbox};
use crate::config::NatsConfig;
use crate::nats::{Conn, Event, Limits};
use crate::stream::consumer::ApiError;
use crate::stream::{AckWaiter, Message, StreamError};
use crate::wire::nats::server::{self as wire, InfoOut};

/// Deliveries are moved into the write buffer only while it holds less.
pub const WRITE_BUDGET: usize = 64 * 1024;
/// JetStream publishes awaiting storage per connection.
pub const MAX_PENDING_ACKS: usize = 1024;
/// How long a closing connection may take to flush its last words.
const CLOSE_FLUSH: Duration = Duration::from_millis(500);
/// Failed accepts and refused connections are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Accept NATS connections until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    cfg: NatsConfig,
    node: String,
    shutdown: Receiver<()>,
) {
    let limits = Limits {
        max_payload: cfg.max_payload,
        max_control_line: cfg.max_control_line,
        max_subscriptions: cfg.max_subscriptions,
        ping_interval: cfg.ping_interval,
        max_pings_out: cfg.max_pings_out,
        auth: cfg.auth.clone(),
    };
    let local = listener.local_addr().ok();
    let base = InfoOut {
        server_id: format!("FROND{:016X}", fastrand::u64(..)),
        server_name: node,
        version: env!("CARGO_PKG_VERSION").into(),
        proto: 1,
        go: "frond (Rust)".into(),
        host: local.map(|a| a.ip().to_string()).unwrap_or_default(),
        port: local.map(|a| a.port()).unwrap_or(0),
        headers: true,
        max_payload: cfg.max_payload,
        auth_required: cfg.auth.is_some(),
        ..InfoOut::default()
    };
    let nkeys = cfg.auth.as_ref().is_some_and(|a| a.has_nkeys());
    let mut refusal = Vec::new();
    wire::err(wire::ERR_MAX_CONNECTIONS, &mut refusal);
    let accept = Accept {
        name: "nats",
        open: &broker.counters.nats_connections,
        max_connections: cfg.max_connections,
        limit_key: "max_connections",
        refusal: &refusal,
        refusal_log_every: LOG_EVERY,
        failure_log_every: LOG_EVERY,
        failure_hint: "",
    };
    accept::serve(&listener, &shutdown, accept, |sock, peer| {
        let _ = sock.set_nodelay(true);
        let broker = broker.clone();
        let limits = limits.clone();
        let mut info = base.clone();
        let shutdown = shutdown.clone();
        let max_pending = cfg.max_pending;
        smol::spawn(async move {
            broker
                .counters
                .total_connections
                .fetch_add(1, Ordering::Relaxed);
            let conn = broker.new_conn_id();
            info.client_id = conn;
            info.client_ip = peer.ip().to_string();
            if nkeys {
                info.nonce = Some(crate::nkey::nonce());
            }
            let why = connection(sock, &broker, conn, limits, &info, max_pending, shutdown).await;
            broker.drop_conn(conn);
            broker
                .counters
                .nats_connections
                .fetch_sub(1, Ordering::Relaxed);
            log::debug!("nats: {peer} closed: {why}");
        })
        .detach();
    })
    .await
}

enum Wake {
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    Outbox,
    Stored,
    Shutdown,
    Timer,
}

/// A JetStream publish waiting for its message to be durable.
struct PendingAck {
    reply: String,
    stream: crate::stream::StreamHandle,
    waiter: AckWaiter,
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    sock: TcpStream,
    broker: &Arc<Broker>,
    conn: u64,
    limits: Limits,
    info: &InfoOut,
    max_pending: usize,
    shutdown: Receiver<()>,
) -> String {
    let outbox = Outbox::new(max_pending);
    let mut machine = Conn::new(limits, info, Instant::now());
    let mut reader = sock.clone();
    let mut writer = sock;
    let mut buf = vec![0u8; 32 * 1024];
    let mut wbuf: Vec<u8> = Vec::new();
    let mut wpos = 0usize;
    let mut acks: VecDeque<PendingAck> = VecDeque::new();
    let mut timer = Timer::never();
    let mut timer_at: Option<Instant> = None;
    let mut close_reason: Option<String> = None;

    let mut no_interest = NoInterest::default();
    // Whether the router knows this connection's permissions.
    let mut perms_set = false;
    let why = loop {
        // 1. Do what the machine asked for.
        let (mut msgs_in, mut bytes_in) = (0u64, 0u64);
        while let Some(ev) = machine.poll_event() {
            match ev {
                Event::Publish {
                    subject,
                    reply,
                    headers,
                    payload,
                    no_responders,
                } => {
                    let subject = broker.map_subject(subject);
                    // A reply to an MQTT 5 request goes to its response
                    // topic, with its correlation data and without a reply
                    // subject of its own ([`crate::broker::bridge`]).
                    let redirected = crate::broker::bridge::redirect_reply(
                        &broker.replies,
                        subject,
                        headers,
                        reply,
                    );
                    let (subject, headers, reply) = match redirected {
                        Ok(r) => r,
                        Err(to) => {
                            log::warn!("nats: conn {conn}: reply to a request dropped: its response subject {to:?} is reserved");
                            continue;
                        }
                    };
                    msgs_in += 1;
                    bytes_in += payload.len() as u64;
                    let origin = Origin {
                        conn,
                        echo: machine.options().echo,
                    };
                    let stream = capture(broker, &subject);
                    // Who answers a request: a subscriber, or a stream that
                    // acknowledges (a catch-all stream cannot tell
                    // JetStream publishes from requests: it stays silent).
                    let acking = stream.filter(|s| !catches_all(s));
                    let msg = Msg {
                        subject,
                        reply,
                        headers,
                        payload,
                        publisher: machine.permissions().cloned(),
                    };
                    // Captured messages are durable: MQTT subscribers get
                    // them at QoS 1 (capped by their subscription's QoS).
                    let qos = u8::from(stream.is_some());
                    let (receivers, m) = broker.route_publish(
                        &mut no_interest,
                        Some(origin),
                        msg,
                        qos,
                        stream.is_some(),
                        Instant::now(),
                    );
                    log::trace!("nats: conn {conn} PUB {} -> {receivers}", m.subject);
                    if receivers == 0 && no_responders && acking.is_none() {
                        if let Some(r) = &m.reply {
                            machine.no_responders(r, &m.subject);
                        }
                    }
                    if let Some(stream) = stream {
                        // A PubAck goes only where the publisher may
                        // subscribe (it is the publisher's answer).
                        let reply = m.reply.filter(|_| acking.is_some()).filter(|r| {
                            let ok = machine.permissions().is_none_or(|p| p.can_subscribe(r));
                            if !ok {
                                log::debug!("nats: conn {conn}: no PubAck to {r:?}: the publisher may not subscribe to it");
                            }
                            ok
                        });
                        let stored = stream
                            .submit(Message {
                                subject: m.subject,
                                headers: m.headers,
                                payload: m.payload,
                            })
                            .await;
                        let name = &stream.config().name;
                        match (reply, stored) {
                            (Some(reply), Ok(waiter)) => acks.push_back(PendingAck {
                                reply,
                                stream: stream.clone(),
                                waiter,
                            }),
                            (Some(reply), Err(e)) => publish_ack(broker, &reply, name, Err(e)),
                            (None, Ok(_)) => {}
                            (None, Err(e)) => {
                                log::warn!("nats: message not stored in {name}: {e}");
                            }
                        }
                    }
                }
                Event::Subscribe { id, subject, queue } => {
                    log::trace!("nats: conn {conn} SUB {subject} as {id}");
                    if !perms_set {
                        // Permissions are fixed at CONNECT, which comes
                        // before any subscription when [auth] is on.
                        broker.set_permissions(conn, machine.permissions().cloned());
                        perms_set = true;
                    }
                    broker.subscribe_nats(conn, id, subject, queue, outbox.clone());
                }
                Event::Unsubscribe { id, max } => broker.unsubscribe_nats(conn, id, max),
                Event::Close(why) => close_reason = Some(why),
            }
        }
        if msgs_in > 0 {
            let c = &broker.counters;
            c.msgs_in.fetch_add(msgs_in, Ordering::Relaxed);
            c.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        }
        // 2. Publish PubAcks that are ready, in order.
        while let Some(front) = acks.front_mut() {
            let Some(result) = front.waiter.try_take() else {
                break;
            };
            if let Some(a) = acks.pop_front() {
                publish_ack(broker, &a.reply, &a.stream.config().name, result);
            }
        }
        // 3. Deliveries, while the write buffer has room; a full outbox
        //    means a slow consumer.
        if outbox.is_slow() && !machine.is_closed() {
            broker
                .counters
                .slow_consumers
                .fetch_add(1, Ordering::Relaxed);
            machine.slow_consumer();
            continue;
        }
        let room = WRITE_BUDGET.saturating_sub(wbuf.len() - wpos);
        if room > 0 && !machine.is_closed() {
            for (id, m) in outbox.take(room) {
                machine.deliver(id, &m);
            }
        }
        // 4. Queue output.
        if machine.has_output() {
            if wpos == wbuf.len() {
                wbuf.clear();
                wpos = 0;
            }
            machine.append_output(&mut wbuf);
        }
        if let Some(why) = close_reason.take() {
            // Best effort: the client may not be reading at all.
            let rest = wbuf.get(wpos..).unwrap_or_default();
            let _ = writer
                .write_all(rest)
                .or(async {
                    Timer::after(CLOSE_FLUSH).await;
                    Ok(())
                })
                .await;
            break why;
        }
        if machine.has_events() {
            continue;
        }
        // 5. Sleep until something happens.
        let deadline = machine.poll_deadline();
        if deadline != timer_at {
            match deadline {
                Some(d) => timer.set_at(d),
                None => timer = Timer::never(),
            }
            timer_at = deadline;
        }
        let want_read = acks.len() < MAX_PENDING_ACKS;
        let want_items = wbuf.len() - wpos < WRITE_BUDGET;
        let pending_write = wbuf.get(wpos..).unwrap_or_default();
        let wake = async {
            if want_read {
                Wake::Read(reader.read(&mut buf).await)
            } else {
                std::future::pending().await
            }
        }
        .or(async {
            if pending_write.is_empty() {
                std::future::pending().await
            } else {
                Wake::Wrote(writer.write(pending_write).await)
            }
        })
        .or(async {
            outbox.wait(want_items).await;
            Wake::Outbox
        })
        .or(async {
            match acks.front_mut() {
                Some(a) => {
                    a.waiter.wait().await;
                    Wake::Stored
                }
                None => std::future::pending().await,
            }
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
        machine.set_time(now);
        match wake {
            Wake::Read(Ok(0)) => break "client closed the connection".into(),
            Wake::Read(Ok(n)) => {
                let data = buf.get(..n).unwrap_or_default();
                let seen = &mut no_interest;
                machine.handle_bytes_with(data, now, &mut |s| !broker.publish_unwanted(seen, s));
            }
            Wake::Read(Err(e)) => break format!("read failed: {e}"),
            Wake::Wrote(Ok(0)) => break "socket closed for writing".into(),
            Wake::Wrote(Ok(n)) => wpos = (wpos + n).min(wbuf.len()),
            Wake::Wrote(Err(e)) => break format!("write failed: {e}"),
            Wake::Outbox | Wake::Stored => {}
            Wake::Shutdown => break "server shutting down".into(),
            Wake::Timer => {
                timer_at = None;
                machine.handle_timeout(now);
            }
        }
    };
    outbox.close();
    // JetStream publishes still awaiting storage get no PubAck; the
    // stream stores them anyway and the client retries (at-least-once).
    why
}

/// The stream a NATS publish is captured into. Reply subjects
/// (`_INBOX.`) and the reserved `$` namespace are transient traffic and
/// never captured.
fn capture<'a>(broker: &'a Broker, subject: &str) -> Option<&'a crate::stream::StreamHandle> {
    if subject.starts_with("_INBOX.") || subject.starts_with('$') {
        return None;
    }
    broker.capture(subject)
}

/// Whether a stream captures every subject (the default stream does).
fn catches_all(stream: &crate::stream::StreamHandle) -> bool {
    stream.config().subjects.iter().any(|s| s == ">")
}

/// Publish a JetStream-style PubAck (or error) to `reply`.
fn publish_ack(
    broker: &Broker,
    reply: &str,
    stream: &str,
    result: Result<crate::stream::PubAck, StreamError>,
) {
    let msg = Arc::new(Msg {
        subject: reply.to_string(),
        reply: None,
        headers: None,
        payload: pub_ack_json(stream, result).into_bytes(),
        publisher: None,
    });
    broker.route_msg(None, msg, 0, Instant::now());
}

/// The JSON JetStream clients expect in reply to a publish. A PubAck is
/// written by hand (one allocation, no serde): this runs once per
/// JetStream publish.
pub fn pub_ack_json(stream: &str, result: Result<crate::stream::PubAck, StreamError>) -> String {
    match result {
        Ok(ack) => {
            use std::fmt::Write;
            let mut out = String::with_capacity(40 + stream.len());
            out.push_str("{\"stream\":");
            if stream.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
                out.push('"');
                out.push_str(stream);
                out.push('"');
            } else {
                out.push_str(&serde_json::to_string(stream).unwrap_or_default());
            }
            let _ = write!(out, ",\"seq\":{}", ack.seq);
            if ack.duplicate {
                out.push_str(",\"duplicate\":true");
            }
            out.push('}');
            out
        }
        Err(e) => {
            // JetStream's codes: 10054 "message size exceeds maximum
            // allowed" (400), 10077 "stream store failed" (503).
            let err = match &e {
                StreamError::TooLarge { .. } => {
                    ApiError::new(400, 10054, "message size exceeds maximum allowed")
                }
                other => ApiError::new(503, 10077, other.to_string()),
            };
            serde_json::json!({ "error": err.to_json() }).to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::PubAck;

    #[test]
    fn pub_ack_shapes() {
        let ok: serde_json::Value = serde_json::from_str(&pub_ack_json(
            "T",
            Ok(PubAck {
                seq: 7,
                duplicate: false,
            }),
        ))
        .unwrap();
        assert_eq!(ok, serde_json::json!({"stream": "T", "seq": 7}));
        let dup: serde_json::Value = serde_json::from_str(&pub_ack_json(
            "T",
            Ok(PubAck {
                seq: 7,
                duplicate: true,
            }),
        ))
        .unwrap();
        assert_eq!(dup["duplicate"], true);
        let odd: serde_json::Value = serde_json::from_str(&pub_ack_json(
            "a\"b\\c",
            Ok(PubAck {
                seq: u64::MAX,
                duplicate: false,
            }),
        ))
        .unwrap();
        assert_eq!(
            odd,
            serde_json::json!({"stream": "a\"b\\c", "seq": u64::MAX})
        );
        let e: serde_json::Value = serde_json::from_str(&pub_ack_json(
            "T",
            Err(StreamError::TooLarge { size: 9, max: 8 }),
        ))
        .unwrap();
        assert_eq!(e["error"]["err_code"], 10054);
        assert_eq!(e["error"]["code"], 400);
        let e: serde_json::Value = serde_json::from_str(&pub_ack_json(
            "T",
            Err(StreamError::Full("max_msgs".into())),
        ))
        .unwrap();
        assert_eq!(e["error"]["err_code"], 10077);
        assert!(e["error"]["description"]
            .as_str()
            .unwrap()
            .contains("max_msgs"));
    }
}
