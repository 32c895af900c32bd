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

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::channel::Receiver;
use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};
use smol::Timer;

use super::accept::{self, Accept};
use super::driver::{self, Common, Deadline, Turn};
use crate::config::NatsConfig;
use crate::ingest::{AckError, AckQueue, Ingest, NatsClient, NatsPublish, Refused, Tally};
use crate::nats::{Conn, Event, Limits};
use crate::router::{Broker, ConnId, Msg, NoInterest, Outbox};
use crate::stream::consumer::ApiError;
use crate::stream::{StreamError, StreamHandle};
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
    Common(Common),
}

/// One connection's shell: the machine, what the router queues for it,
/// its write buffer and its PubAcks waiting for storage.
struct Shell<'b> {
    broker: &'b Arc<Broker>,
    conn: ConnId,
    machine: Conn,
    outbox: Arc<Outbox>,
    /// JetStream publishes waiting for their message to be durable: the
    /// reply subject and the stream.
    acks: AckQueue<(String, StreamHandle)>,
    no_interest: NoInterest,
    /// Whether the router knows this connection's permissions.
    perms_set: bool,
    close_reason: Option<String>,
    reader: TcpStream,
    writer: TcpStream,
    buf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Written up to here.
    wpos: usize,
    timer: Deadline,
    shutdown: Receiver<()>,
    now: Instant,
}

impl Shell<'_> {
    /// Step 1: do what the machine asked for.
    async fn handle_events(&mut self) {
        let mut tally = Tally::default();
        while let Some(ev) = self.machine.poll_event() {
            match ev {
                Event::Publish {
                    subject,
                    reply,
                    headers,
                    payload,
                    no_responders,
                } => {
                    let p = NatsPublish {
                        subject,
                        reply,
                        headers,
                        payload,
                        no_responders,
                    };
                    self.publish(p, &mut tally).await;
                }
                Event::Subscribe { id, subject, queue } => {
                    log::trace!("nats: conn {} SUB {subject} as {id}", self.conn);
                    if !self.perms_set {
                        // Permissions are fixed at CONNECT, which comes
                        // before any subscription when [auth] is on.
                        let perms = self.machine.permissions().cloned();
                        self.broker.set_permissions(self.conn, perms);
                        self.perms_set = true;
                    }
                    let outbox = self.outbox.clone();
                    self.broker
                        .subscribe_nats(self.conn, id, subject, queue, outbox);
                }
                Event::Unsubscribe { id, max } => self.broker.unsubscribe_nats(self.conn, id, max),
                Event::Close(why) => self.close_reason = Some(why),
            }
        }
        Ingest::new(self.broker).count(tally);
    }

    /// One publish through [`Ingest::nats`]; its capture is submitted, and
    /// its PubAck (if any) queued until the message is durable.
    async fn publish(&mut self, p: NatsPublish, tally: &mut Tally) {
        let (conn, now, broker) = (self.conn, self.now, self.broker);
        let client = NatsClient {
            conn,
            echo: self.machine.options().echo,
            permissions: self.machine.permissions(),
        };
        let ingest = Ingest::new(broker);
        let routed = match ingest.nats(&client, p, &mut self.no_interest, tally, now) {
            Ok(r) => r,
            Err(Refused::ReservedReply(to)) => {
                log::warn!("nats: conn {conn}: reply to a request dropped: its response subject {to:?} is reserved");
                return;
            }
            Err(_) => return,
        };
        if let Some((reply, subject)) = &routed.no_responders {
            self.machine.no_responders(reply, subject);
        }
        let Some((c, ack_to)) = routed.capture else {
            return;
        };
        let name = &c.stream.config().name;
        let Some(reply) = ack_to else {
            // Nobody waits: no fsync of its own (see `StreamHandle::store`).
            if let Err(e) = c.stream.store(c.message).await {
                log::warn!("nats: message not stored in {name}: {e}");
            }
            return;
        };
        match c.stream.submit(c.message).await {
            Ok(waiter) => self.acks.stored((reply, c.stream.clone()), waiter),
            Err(e) => publish_ack(broker, &reply, name, Err(e), now),
        }
    }

    /// Step 2: publish PubAcks that are ready, in order.
    fn complete_acks(&mut self) {
        while let Some(((reply, stream), result)) = self.acks.pop() {
            let result = match result {
                Ok(Some(ack)) => Ok(ack),
                Err(AckError::Stream(e)) => Err(e),
                // Only stored messages are queued here.
                Ok(None) | Err(AckError::Retained(_)) => continue,
            };
            publish_ack(self.broker, &reply, &stream.config().name, result, self.now);
        }
    }

    /// Step 3: deliveries, while the write buffer has room, then step 4: the output
    /// queued. False when the outbox overflowed (a slow consumer: the
    /// machine now closes).
    fn pump(&mut self) -> bool {
        if self.outbox.is_slow() && !self.machine.is_closed() {
            let c = &self.broker.counters;
            c.slow_consumers.fetch_add(1, Ordering::Relaxed);
            self.machine.slow_consumer();
            return false;
        }
        let room = WRITE_BUDGET.saturating_sub(self.wbuf.len() - self.wpos);
        if room > 0 && !self.machine.is_closed() {
            for (id, m) in self.outbox.take(room) {
                self.machine.deliver(id, &m);
            }
        }
        if self.machine.has_output() {
            if self.wpos == self.wbuf.len() {
                self.wbuf.clear();
                self.wpos = 0;
            }
            self.machine.append_output(&mut self.wbuf);
        }
        true
    }
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
    let now = Instant::now();
    let mut sh = Shell {
        broker,
        conn,
        machine: Conn::new(limits, info, now),
        outbox: Outbox::new(max_pending),
        acks: AckQueue::default(),
        no_interest: NoInterest::default(),
        perms_set: false,
        close_reason: None,
        reader: sock.clone(),
        writer: sock,
        buf: vec![0u8; 32 * 1024],
        wbuf: Vec::new(),
        wpos: 0,
        timer: Deadline::default(),
        shutdown,
        now,
    };
    let why = driver::run(&mut sh).await;
    sh.outbox.close();
    // JetStream publishes still awaiting storage get no PubAck; the
    // stream stores them anyway and the client retries (at-least-once).
    why
}

impl driver::Shell for Shell<'_> {
    type Wake = Wake;

    async fn turn(&mut self) -> Turn {
        self.handle_events().await;
        self.complete_acks();
        if !self.pump() {
            return Turn::Again;
        }
        if let Some(why) = self.close_reason.take() {
            // Best effort: the client may not be reading at all.
            let rest = self.wbuf.get(self.wpos..).unwrap_or_default();
            let _ = self
                .writer
                .write_all(rest)
                .or(async {
                    Timer::after(CLOSE_FLUSH).await;
                    Ok(())
                })
                .await;
            return Turn::Close(why);
        }
        match self.machine.has_events() {
            true => Turn::Again,
            false => Turn::Sleep,
        }
    }

    /// Step 5: sleep until something happens.
    async fn sleep(&mut self) -> Wake {
        self.timer.set(self.machine.poll_deadline());
        let want_read = self.acks.len() < MAX_PENDING_ACKS;
        let want_items = self.wbuf.len() - self.wpos < WRITE_BUDGET;
        let pending_write = self.wbuf.get(self.wpos..).unwrap_or_default();
        let (outbox, acks) = (&self.outbox, &mut self.acks);
        let (reader, writer, buf) = (&mut self.reader, &mut self.writer, &mut self.buf);
        let (timer, shutdown) = (&mut self.timer, &self.shutdown);
        async {
            if want_read {
                Wake::Read(reader.read(buf).await)
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
        .or(async { Wake::Common(driver::wait_common(acks, shutdown, timer).await) })
        .await
    }

    async fn woke(&mut self, wake: Wake) -> Result<(), String> {
        let now = Instant::now();
        self.now = now;
        self.machine.set_time(now);
        match wake {
            Wake::Read(Ok(0)) => return Err("client closed the connection".into()),
            Wake::Read(Ok(n)) => {
                let data = self.buf.get(..n).unwrap_or_default();
                let (broker, seen) = (self.broker, &mut self.no_interest);
                let wanted = &mut |s: &str| !broker.publish_unwanted(seen, s);
                self.machine.handle_bytes_with(data, now, wanted);
            }
            Wake::Read(Err(e)) => return Err(format!("read failed: {e}")),
            Wake::Wrote(Ok(0)) => return Err("socket closed for writing".into()),
            Wake::Wrote(Ok(n)) => self.wpos = (self.wpos + n).min(self.wbuf.len()),
            Wake::Wrote(Err(e)) => return Err(format!("write failed: {e}")),
            Wake::Outbox | Wake::Common(Common::Stored) => {}
            Wake::Common(Common::Shutdown) => return Err("server shutting down".into()),
            Wake::Common(Common::Timer) => {
                self.timer.fired();
                self.machine.handle_timeout(now);
            }
        }
        Ok(())
    }
}

/// Publish a JetStream-style PubAck (or error) to `reply`.
fn publish_ack(
    broker: &Broker,
    reply: &str,
    stream: &str,
    result: Result<crate::stream::PubAck, StreamError>,
    now: Instant,
) {
    let msg = Arc::new(Msg {
        subject: reply.to_string(),
        reply: None,
        headers: None,
        payload: pub_ack_json(stream, result).into_bytes(),
        publisher: None,
    });
    broker.route_msg(None, msg, 0, now);
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
            // allowed" (400), 10077 "stream store failed" (503); a refused
            // expectation or header keeps its own code (400), e.g. 10071
            // for a wrong last (subject) sequence, which the KV clients
            // read as "wrong revision".
            let err = match &e {
                StreamError::TooLarge { .. } => {
                    ApiError::new(400, 10054, "message size exceeds maximum allowed")
                }
                StreamError::Full(_)
                | StreamError::Io(_)
                | StreamError::Closed
                | StreamError::SubjectFull { .. } => ApiError::new(503, 10077, e.to_string()),
                other => ApiError::new(400, other.code().unwrap_or(10077), other.to_string()),
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
        let w: serde_json::Value = serde_json::from_str(&pub_ack_json(
            "T",
            Err(StreamError::WrongLastSubjectSequence {
                subject: "$KV.b.k".into(),
                expected: 1,
                last: 3,
            }),
        ))
        .unwrap();
        assert_eq!(
            (&w["error"]["code"], &w["error"]["err_code"]),
            (&serde_json::json!(400), &serde_json::json!(10071))
        );
        assert!(e["error"]["description"]
            .as_str()
            .unwrap()
            .contains("max_msgs"));
    }
}
