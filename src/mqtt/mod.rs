//! One MQTT connection's protocol state machine (3.1.1 and 5.0), sans I/O.
//!
//! Owns: the decode buffer, the CONNECT handshake, keep-alive and connect
//! timers, packet-id allocation for outbound QoS 1/2, the inbound QoS 2
//! exactly-once set, and the ordering of acknowledgements.
//!
//! Call order (quinn-proto style): feed inputs with [`Session::handle_bytes`],
//! [`Session::deliver`], [`Session::publish_done`] and
//! [`Session::handle_timeout`] (all take `now`); then drain
//! [`Session::poll_event`] (work for the shell: route, store, subscribe,
//! close) and [`Session::take_output`] (bytes for the socket), and sleep
//! until [`Session::poll_deadline`]. Nothing here reads a clock, touches a
//! socket or panics on peer input.
//!
//! The machine is split by concern, each file with its own doc:
//! `connect.rs` (CONNECT/CONNACK, authentication, the will, restoring a
//! stored session, DISCONNECT), `inbound.rs` (PUBLISH from the client,
//! acknowledgements in order, topic aliases, Receive Maximum),
//! `outbound.rs` (deliveries, packet ids, the in-flight window and queue),
//! `qos2.rs` (the QoS 2 state of both directions), `stored.rs` (stream
//! cursors of persistent sessions and their snapshot), `subscribe.rs`
//! (SUBSCRIBE/UNSUBSCRIBE and the limits on filters) and `timers.rs`
//! (connect timeout and keep-alive). [`props`] maps MQTT 5 properties to
//! NATS headers (the reply inboxes of requests are
//! [`crate::broker::bridge`]'s). Reason codes are the constants of
//! [`crate::wire::mqtt::reason`] and [`crate::wire::mqtt::return_code`];
//! why a connection closed is a [`CloseReason`].
//!
//! Invariants:
//! - A PUBACK (QoS 1) or PUBREC (QoS 2) is emitted only from
//!   [`Session::publish_done`], which the shell calls once the message is
//!   durable; acknowledgements leave in the order the PUBLISH packets came
//!   in, because the shell completes them in that order (MQTT 3.1.1 §4.6).
//! - A QoS 2 packet id awaiting PUBREL is never routed twice.
//! - After [`Event::Close`] is emitted, all further input is ignored.
//!

mod connect;
mod inbound;
mod outbound;
pub mod props;
mod qos2;
mod stored;
mod subscribe;
#[cfg(test)]
mod tests;
mod timers;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{Auth, Permissions};
use crate::broker::persist::{Cursor, Owner};
pub use crate::close::CloseReason;
#[cfg(doc)]
use crate::router::Delivery;
use crate::wire::mqtt::{
    self, reason, return_code, ConnAck, DecodeError, Disconnect, Packet, Properties, Version,
};
pub use connect::WillMessage;
use outbound::{Outbound, Queued};
use stored::Follow;
pub use subscribe::SubRequest;
use subscribe::{PendingSubAck, Sub};
use timers::{Timer, TimerTable};

/// Limits the session enforces (from `[mqtt]` config).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_packet_size: usize,
    pub max_keep_alive: u16,
    pub connect_timeout: Duration,
    pub max_inflight: usize,
    /// QoS 1/2 deliveries held while the client's window is full.
    pub max_queued: usize,
    /// Bytes of those ([`Delivery::cost`]).
    pub max_queued_bytes: usize,
    /// Longest session expiry granted; also the expiry of 3.1.1
    /// persistent sessions.
    pub max_session_expiry: Duration,
    /// `[auth]`: `None` accepts everyone with every permission.
    pub auth: Option<Arc<Auth>>,
    /// Subscriptions one client may hold (0: unlimited); `a/#` counts once.
    pub max_subscriptions: usize,
    /// Longest topic name or filter, in bytes (after `$share/{name}/`).
    pub max_topic_length: usize,
    /// Most levels in a topic name or filter.
    pub max_topic_levels: usize,
}

/// Work for the shell.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// CONNECT accepted: claim this client id (takeover of an older
    /// connection of the same user), delete stored state when `clean`,
    /// load it otherwise (Clean Start 0 resumes a stored session whatever
    /// `expiry` is, MQTT 5 [MQTT-3.1.2-5]; with `expiry` 0 the stored copy
    /// is deleted once loaded: the session ends with this connection),
    /// then call [`Session::restore`] — or [`Session::refuse`] when the
    /// client id belongs to another user. `expiry` > 0: the session is
    /// persistent.
    Connected {
        client_id: String,
        clean: bool,
        expiry: Duration,
    },
    /// A PUBLISH to route and capture. When `ack` is `Some`, the shell must
    /// call [`Session::publish_done`] with it once stored (or failed), in
    /// the order these events were emitted.
    Publish {
        subject: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
        ack: Option<u16>,
        /// MQTT 5 properties to carry ([`props`]); `None` when empty.
        props: Option<Box<Properties>>,
    },
    /// Acknowledge packet `.0` in order once every earlier publish is
    /// acknowledged; nothing to store (a QoS 2 duplicate).
    AckInOrder(u16),
    /// Add or update router registrations (and owe retained messages).
    /// The shell saves the session first, then calls
    /// [`Session::subscribe_done`] and adds them only if it returns true.
    Subscribe(Vec<SubRequest>),
    /// Remove router registrations (NATS filters no subscription maps
    /// to any more).
    Unsubscribe(Vec<String>),
    /// Remove shared subscriptions: (share name, NATS filter).
    UnsubscribeShared(Vec<(String, String)>),
    /// Close the connection (after [`Session::take_output`] is written);
    /// the reason is for the log.
    Close(CloseReason),
}

/// Where the connection is in its life.
#[derive(Debug, PartialEq, Eq)]
enum State {
    AwaitConnect,
    /// CONNECT seen; waiting for [`Session::restore`].
    Restoring,
    Connected,
    Closed,
}

/// Topic aliases frond accepts from a client (CONNACK Topic Alias Maximum).
pub const TOPIC_ALIAS_MAX: u16 = 64;

/// One MQTT connection's protocol state (see the module doc for the call
/// order). Its fields are kept by the files of this module, each for its
/// concern.
pub struct Session {
    limits: Limits,
    state: State,
    version: Option<Version>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// The subject of the latest plain QoS 0 delivery and its topic name,
    /// reused (no allocation or mapping per delivery; see `outbound.rs`).
    /// Boxed: a session that never receives holds one pointer.
    topic_of: Option<Box<(String, String)>>,
    events: VecDeque<Event>,
    keep_alive: Option<Duration>,
    /// When the latest packet was decoded (keep-alive counts from here).
    last_packet: Instant,
    timers: TimerTable,
    /// Inbound QoS 2 packet ids stored and PUBREC'd, awaiting PUBREL.
    qos2_in: HashSet<u16>,
    /// Inbound publishes awaiting storage (QoS 1 and 2), in arrival order.
    pending_acks: VecDeque<(u16, u8)>,
    outbound: VecDeque<Outbound>,
    next_packet_id: u16,
    /// The `now` of the latest input, for work resumed by
    /// [`Session::publish_done`].
    now: Instant,
    /// Deliveries dropped because the client's in-flight window was full.
    pub dropped: u64,
    /// The will from CONNECT, until a normal DISCONNECT discards it.
    will: Option<WillMessage>,
    /// The subscriptions, keyed by MQTT filter and share name. Shared ones
    /// are served live by the router only, never from stream cursors.
    subs: Vec<Sub>,
    /// Some subscription has No Local, Retain As Published or an
    /// identifier: deliveries look at the subscriptions they match.
    sub_opts: bool,
    /// Some subscription has No Local: publishes are checked against them.
    no_local: bool,
    /// A stored session was resumed (`session_present` = 1).
    resumed: bool,
    /// The CONNECT had Clean Start (3.1.1 Clean Session) = 1.
    clean_start: bool,
    client_id: String,
    /// Session expiry; zero: not persistent.
    expiry: Duration,
    follows: Vec<Follow>,
    /// Cursors from the stored session, until [`Session::follow`] uses them.
    restored_cursors: Vec<Cursor>,
    /// CONNACK properties, held until [`Session::restore`].
    pending_connack: Option<Properties>,
    /// Persistent state changed since [`Session::take_dirty`].
    dirty: bool,
    /// The output holds a packet whose state must be durable before it
    /// leaves ([`Session::take_sync`]).
    sync: bool,
    /// The session was persistent when it was restored (its stored state
    /// must go if a DISCONNECT sets the expiry to 0).
    was_persistent: bool,
    /// Outbound entries with `awaiting_resend` set.
    resends: usize,
    /// The client's permissions (`None`: everything allowed).
    perms: Option<Arc<Permissions>>,
    /// Who logged in (`None` without `[auth]`): the owner of the session.
    owner: Option<Owner>,
    /// One entry per [`Event::Subscribe`] not yet passed to
    /// [`Session::subscribe_done`]: the SUBACK held until the session is
    /// durable (persistent sessions), or `None` (nothing held).
    subacks: VecDeque<Option<PendingSubAck>>,
    /// Pending acks of publishes refused (MQTT 5 reason code: 0x87 by
    /// permissions, 0x90 by the topic limits).
    denied: HashMap<u16, u8>,
    /// MQTT 5 inbound topic aliases.
    alias_in: HashMap<u16, String>,
    /// MQTT 5 outbound topic aliases, up to the client's maximum.
    alias_out: HashMap<String, u16>,
    alias_out_max: u16,
    /// The client's Maximum Packet Size (MQTT 5).
    client_max_packet: Option<usize>,
    /// The client's Receive Maximum (MQTT 5; 65,535 when not given).
    client_receive_max: usize,
    /// QoS 1/2 deliveries waiting for the in-flight window.
    queued: VecDeque<Queued>,
    /// The sum of their costs.
    queued_bytes: usize,
    /// MQTT 5 Request Problem Information (reason strings on acks).
    problem_info: bool,
    /// Messages not sent because they exceed the client's Maximum Packet
    /// Size.
    pub oversize_dropped: u64,
    /// Messages not sent because their message expiry passed.
    pub expired: u64,
}

impl Session {
    pub fn new(limits: Limits, now: Instant) -> Session {
        let mut timers = TimerTable::default();
        timers.set(Timer::Connect, now + limits.connect_timeout);
        Session {
            timers,
            limits,
            state: State::AwaitConnect,
            version: None,
            inbuf: Vec::new(),
            out: Vec::new(),
            topic_of: None,
            events: VecDeque::new(),
            keep_alive: None,
            last_packet: now,
            qos2_in: HashSet::new(),
            pending_acks: VecDeque::new(),
            outbound: VecDeque::new(),
            next_packet_id: 1,
            now,
            dropped: 0,
            will: None,
            subs: Vec::new(),
            sub_opts: false,
            no_local: false,
            resumed: false,
            clean_start: true,
            client_id: String::new(),
            expiry: Duration::ZERO,
            follows: Vec::new(),
            restored_cursors: Vec::new(),
            pending_connack: None,
            dirty: false,
            sync: false,
            was_persistent: false,
            resends: 0,
            perms: None,
            owner: None,
            subacks: VecDeque::new(),
            denied: HashMap::new(),
            alias_in: HashMap::new(),
            alias_out: HashMap::new(),
            alias_out_max: 0,
            client_max_packet: None,
            client_receive_max: 65_535,
            queued: VecDeque::new(),
            queued_bytes: 0,
            problem_info: true,
            oversize_dropped: 0,
            expired: 0,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// How many inbound publishes await [`Session::publish_done`]. The shell
    /// stops reading while this is at `max_inflight` (backpressure).
    pub fn awaiting_storage(&self) -> usize {
        self.pending_acks.len()
    }

    pub fn wants_input(&self) -> bool {
        self.state != State::Closed
            && !self.inflight_blocks()
            && self.inbuf.len() < self.limits.max_packet_size.saturating_add(64 * 1024)
    }

    /// Bytes from the socket.
    pub fn handle_bytes(&mut self, data: &[u8], now: Instant) {
        if self.state == State::Closed {
            return;
        }
        self.inbuf.extend_from_slice(data);
        self.process(now);
    }

    /// Decode and handle buffered packets until the buffer is exhausted or
    /// `max_inflight` publishes await storage (the rest waits in the buffer;
    /// [`Session::publish_done`] resumes).
    fn process(&mut self, now: Instant) {
        self.now = now;
        let mut start = 0;
        while self.state != State::Closed
            && self.state != State::Restoring
            && !self.inflight_blocks()
            && !self.subacks.iter().any(Option::is_some)
        {
            match mqtt::decode(
                &self.inbuf[start..],
                self.version,
                self.limits.max_packet_size,
            ) {
                Ok(Some((packet, used))) => {
                    start += used;
                    self.last_packet = now;
                    if self.state == State::Connected {
                        self.arm_keep_alive();
                    }
                    self.handle_packet(packet, now);
                }
                Ok(None) => break,
                Err(e) => {
                    self.protocol_error(&e);
                    break;
                }
            }
        }
        self.inbuf.drain(..start.min(self.inbuf.len()));
    }

    fn protocol_error(&mut self, e: &DecodeError) {
        if let (DecodeError::UnsupportedVersion(_), State::AwaitConnect) = (e, &self.state) {
            // 3.1.1 §3.1.2-2: answer CONNACK 0x01 (unacceptable protocol
            // level) and close.
            self.send(&Packet::ConnAck(ConnAck {
                session_present: false,
                code: return_code::UNACCEPTABLE_PROTOCOL_VERSION,
                properties: Properties::default(),
            }));
        }
        let code = match e {
            // After CONNECT, an unsupported protocol level can only be a
            // second CONNECT: a protocol error (MQTT 5 §3.1). 0x84 is a
            // CONNACK code, not a DISCONNECT reason.
            DecodeError::UnsupportedVersion(_) => reason::PROTOCOL_ERROR,
            _ => e.reason_code(),
        };
        self.close_with(code, CloseReason::Malformed(e.to_string()));
    }

    /// Close; in 5.0 after CONNECT, tell the client why.
    fn close_with(&mut self, reason_code: u8, why: CloseReason) {
        if self.state == State::Closed {
            return;
        }
        if self.state == State::Connected && self.version == Some(Version::V5) {
            let props = Properties {
                reason_string: Some(why.to_string()),
                ..Properties::default()
            };
            self.send(&Packet::Disconnect(Disconnect {
                code: reason_code,
                properties: props,
            }));
        }
        self.closed(why);
    }

    /// The shell ends the connection for a reason of its own: another
    /// connection took over the client id (5.0: DISCONNECT 0x8E,
    /// [MQTT-3.1.4-3]) or frond shuts down (0x8B), as Mosquitto does. The
    /// shell then writes [`Session::take_output`], without waiting long
    /// for a client that does not read.
    pub fn end(&mut self, why: CloseReason) {
        let code = match why {
            CloseReason::TakenOver => reason::SESSION_TAKEN_OVER,
            CloseReason::ShuttingDown => reason::SERVER_SHUTTING_DOWN,
            _ => reason::UNSPECIFIED_ERROR,
        };
        self.close_with(code, why);
    }

    /// Closed without telling the client (it was told already, or there
    /// is no DISCONNECT to send): every timer stops, all further input is
    /// ignored.
    fn closed(&mut self, why: CloseReason) {
        self.state = State::Closed;
        self.timers.stop_all();
        self.events.push_back(Event::Close(why));
    }

    fn send(&mut self, p: &Packet) {
        let v = self.version.unwrap_or(Version::V311);
        if let Err(e) = mqtt::encode(p, v, &mut self.out) {
            // Only our own packets are encoded here; a failure is a bug,
            // reported and contained to this connection.
            log::error!("cannot encode {p:?}: {e}");
            self.closed(CloseReason::Internal(e.to_string()));
        }
    }

    fn handle_packet(&mut self, packet: Packet, now: Instant) {
        if self.state == State::AwaitConnect {
            match packet {
                Packet::Connect(c) => self.handle_connect(c, now),
                other => self.close_with(
                    reason::PROTOCOL_ERROR,
                    CloseReason::ProtocolError(format!("expected CONNECT, got {}", other.name())),
                ),
            }
            return;
        }
        match packet {
            Packet::Connect(_) => self.close_with(
                reason::PROTOCOL_ERROR,
                CloseReason::ProtocolError("second CONNECT".into()),
            ),
            Packet::Publish(p) => self.handle_publish(p),
            Packet::PubAck(a) => self.outbound_done(a.packet_id),
            Packet::PubRec(a) => self.handle_pubrec(&a),
            Packet::PubComp(a) => self.outbound_done(a.packet_id),
            Packet::PubRel(a) => self.handle_pubrel(&a),
            Packet::Subscribe(s) => self.handle_subscribe(s),
            Packet::Unsubscribe(u) => self.handle_unsubscribe(u),
            Packet::PingReq => self.send(&Packet::PingResp),
            Packet::Disconnect(d) => self.handle_disconnect(&d),
            Packet::Auth(_) => self.close_with(
                reason::BAD_AUTHENTICATION_METHOD,
                CloseReason::Unsupported("AUTH"),
            ),
            other => self.close_with(
                reason::PROTOCOL_ERROR,
                CloseReason::ProtocolError(format!("unexpected {} from a client", other.name())),
            ),
        }
    }

    /// The client id (empty before CONNECT).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Whether this session outlives its connection.
    pub fn is_persistent(&self) -> bool {
        !self.expiry.is_zero()
    }

    /// Whether this session reads the streams from cursors (and takes
    /// captured subjects from them, not from the router): a persistent
    /// one, or one resumed with Clean Start 0 whose new expiry is 0 — it
    /// delivers what was kept for it and ends with this connection.
    pub fn follows_streams(&self) -> bool {
        self.is_persistent() || self.resumed
    }

    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes to write to the socket (moved out; the session's buffer is
    /// left empty).
    #[must_use]
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Make room for `bytes` more output at once: the shell, before moving
    /// a batch of deliveries in, so encoding them does not grow the buffer
    /// step by step (the buffer leaves with [`Session::take_output`]).
    pub fn reserve_output(&mut self, bytes: usize) {
        self.out.reserve(bytes);
    }

    /// Offer `buf` (its contents are discarded) as the output buffer: kept
    /// when it is larger than the session's, whose bytes move into it.
    /// Returns the buffer not kept, for the shell to reuse.
    #[must_use]
    pub fn offer_output(&mut self, mut buf: Vec<u8>) -> Vec<u8> {
        if buf.capacity() <= self.out.capacity() {
            return buf;
        }
        buf.clear();
        buf.extend_from_slice(&self.out);
        std::mem::replace(&mut self.out, buf)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Bytes waiting in the output (the shell moves deliveries in only
    /// while this is small).
    pub fn output_len(&self) -> usize {
        self.out.len()
    }

    /// Bytes of QoS 1/2 deliveries waiting for the client's window.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// How many QoS 1/2 deliveries wait for the client's window.
    pub fn queued_len(&self) -> usize {
        self.queued.len()
    }
}
