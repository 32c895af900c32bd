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
//! Limits (`[mqtt]`): `max_subscriptions` per client (an MQTT `a/#` counts
//! once; refused filters get SUBACK 0x97, 3.1.1: 0x80), and
//! `max_topic_length`/`max_topic_levels` for topic names and filters (a
//! filter over them: SUBACK 0x8F / 0x80; a PUBLISH: 5.0 PUBACK/PUBREC 0x90,
//! or DISCONNECT 0x90 for QoS 0; 3.1.1 closes the connection). The connect
//! timeout is a deadline for the complete CONNECT counted from the
//! connection's start: bytes trickling in do not move it.
//!
//! Wills are authorized at CONNECT (issue 10): with `[auth]`, a will whose
//! topic the user may not publish to, or whose MQTT 5 response topic it may
//! not subscribe to, refuses the CONNECT (5.0: CONNACK 0x87 with a reason
//! string; 3.1.1: return code 0x05), as HiveMQ, EMQX and VerneMQ do, rather
//! than accepting it and dropping the will later as Mosquitto 2 does: the
//! client learns of the mistake when it can still fix it, not when its
//! will silently never arrives. The will records its owner
//! ([`WillMessage::owner`]) so that a will restored after a restart is
//! checked again against the then current `[auth]`
//! ([`crate::broker::wills`]).
//!
//! Invariants:
//! - A PUBACK (QoS 1) or PUBREC (QoS 2) is emitted only from
//!   [`Session::publish_done`], which the shell calls once the message is
//!   durable; acknowledgements leave in the order the PUBLISH packets came
//!   in, because the shell completes them in that order (MQTT 3.1.1 §4.6).
//! - A QoS 2 packet id awaiting PUBREL is never routed twice.
//! - After [`Event::Close`] is emitted, all further input is ignored.
//!
//!
//! Persistent sessions (3.1.1 `clean_session = 0`, or a 5.0 session expiry
//! interval > 0, capped by `mqtt.max_session_expiry`, which 3.1.1 persistent
//! sessions use as their expiry):
//! - After CONNECT the machine emits [`Event::Connected`] and waits
//!   (decoding nothing more) until the shell calls [`Session::restore`]
//!   with the stored state, if any: only then is CONNACK sent, with
//!   `session_present` = 1 when a persistent session was resumed. The
//!   stored subscriptions come back as an [`Event::Subscribe`] (without
//!   retained messages) and the inbound QoS 2 ids awaiting PUBREL are
//!   restored, so a publisher resending PUBLISH(DUP) or PUBREL after a
//!   reconnect is handled exactly once.
//! - Sessions belong to a user ([`Session::owner`]: the authenticated
//!   user name, or anonymous; nobody without `[auth]`). The stored
//!   session records its owner. A client id is never handed across
//!   users: while another user's connection holds it, or another user's
//!   stored session exists for it, the CONNECT is refused with "not
//!   authorized" ([`Session::refuse`]: 5.0 0x87, 3.1.1 0x05) — the holder
//!   is not kicked, the stored session is neither resumed nor deleted
//!   (not even by a clean start), and the refused connection's will is
//!   dropped. A session whose owner can no longer log in (removed from
//!   `[auth]`) is discarded and the newcomer starts fresh; one without
//!   owner (written by an earlier version, or without `[auth]`) is
//!   adopted by the first client that resumes it. The rule
//!   ([`crate::broker::persist::claim`]) follows MQTT 5 §5.4.2 (the server
//!   should check the client is authorized to use the client id) and
//!   brokers that enforce it (Azure Event Grid refuses live and kept
//!   sessions of another client; HiveMQ and EMQX leave it to plugins).
//!   Refusing rather than discarding keeps one user from erasing
//!   another's queued messages by guessing a client id.
//! - Restored subscriptions are re-checked against the client's current
//!   permissions (the configuration may have changed since they were
//!   granted): one no longer allowed is dropped, with a warning naming
//!   client id, user and filter.
//! - Every message from a stream cursor passes the same check as a live
//!   delivery ([`Permissions::may_deliver`], i.e. `deny_subscribe`);
//!   one that fails is skipped and the cursor moves past it (it is not for
//!   this client). A restored QoS 2 message in flight that fails it is not
//!   sent again: its packet id is released with a PUBREL.
//! - Durable before acknowledged: a persistent session's SUBACK is held
//!   (and decoding with it) until the shell reports the save through
//!   [`Session::subscribe_done`]; when the save failed, every filter the
//!   SUBSCRIBE would have granted gets 0x80 (3.1.1 failure, 5.0
//!   unspecified error, with a reason string) and the subscriptions are
//!   put back as before it (nothing is added live either). When a save
//!   [`Session::take_sync`] asked for fails, the shell calls
//!   [`Session::sync_failed`]: the pending output (PUBREC, PUBCOMP, a QoS
//!   2 PUBLISH or PUBREL whose state is not on disk) is dropped and the
//!   connection closes (5.0: DISCONNECT 0x80); the client resends what
//!   was not acknowledged. 3.1.1 has no negative PUBREC, so closing is
//!   the one answer that works for both versions. (A failed save after
//!   UNSUBSCRIBE is only logged: the subscription may come back after a
//!   restart.)
//! - Messages on subjects a stream captures come from the streams, not the
//!   router: the shell registers each stream with [`Session::follow`] and
//!   feeds what it reads from [`Session::stream_next`] into
//!   [`Session::deliver_stored`]. The machine filters by its subscriptions
//!   and sends at min(subscription QoS, publisher QoS), the publisher's
//!   QoS being what the stored message carries in `Mqtt-QoS` (MQTT QoS 0
//!   and 2 publishes) and 1 otherwise (MQTT QoS 1, NATS publishes, hub
//!   messages; see
//!   [`bridge`]). Per stream, the cursor ([`Session::snapshot`]) is the
//!   highest sequence such that every matching message at or below it was
//!   sent and acknowledged (PUBACK, PUBCOMP); acknowledgements advance it
//!   contiguously. QoS 1 messages above it are sent again after a
//!   reconnect (new packet ids; DUP = 1 at or below the stored `sent`
//!   mark, 0 above it).
//! - QoS 2 stream messages are exactly once across reconnects and frond
//!   restarts: the stored cursor lists each one in flight with its packet
//!   id and whether PUBREC came, plus the completed ones above the cursor.
//!   [`Session::take_sync`] makes the shell write that before the first
//!   PUBLISH of one or its PUBREL leaves. On resume, a PUBREL is sent for
//!   every PUBREC'd one (the message is not sent again), the others are
//!   resent with DUP and their packet id when the stream is read up to
//!   them, and completed ones are skipped. One removed from the stream
//!   (limits) before its resend gets a PUBREL, releasing its id.
//! - Shared subscriptions (`$share/{name}/{filter}`, 3.1.1 and 5.0) are
//!   stored with the session (and resubscribed on resume) but are always
//!   served live by the router, never from the stream cursors: a group's
//!   messages are split between its members as they arrive, and
//!   independent per-member cursors cannot split a stream. So a shared
//!   message goes to a member connected at that moment; nothing is queued
//!   for a member while it is offline (its share goes to the members that
//!   are connected; with none connected the group misses it, though a
//!   capturing stream still holds it). Shared subscriptions get no retained
//!   messages on subscribe (MQTT 5 §4.8.2); no-local on one is a protocol
//!   error (the 5.0 decoder refuses it).
//! - Outbound QoS 2 of router deliveries (subjects no stream captures,
//!   shared subscriptions) keeps its PUBREC state in memory: after a
//!   reconnect such a message is not resent.
//! - The inbound QoS 2 ids are durable before the PUBREC that reports
//!   one leaves, and their removal before the PUBCOMP ([`Session::take_sync`]),
//!   so a PUBLISH(DUP) resent after a frond crash is not stored twice and
//!   an id the client reuses is never taken for a duplicate. Left open: a
//!   crash after the message is in the stream but before its id is
//!   written (the PUBREC never left) stores the client's resend again.
//! - A 5.0 DISCONNECT with a Session Expiry Interval replaces the expiry
//!   (capped by `mqtt.max_session_expiry`; 0 deletes the stored session);
//!   setting one when CONNECT had 0 is a protocol error (DISCONNECT 0x82,
//!   the will is published; MQTT 5 §3.14.2.2.2).
//!
//! MQTT 5 features (all per connection):
//! - Topic aliases: inbound up to [`TOPIC_ALIAS_MAX`] (advertised in
//!   CONNACK; alias 0 or above it: DISCONNECT 0x94, an unknown alias with
//!   an empty topic: 0x82); outbound, when the client's CONNECT gives a
//!   Topic Alias Maximum, the first that many topics get an alias, sent
//!   with the topic once and with an empty topic afterwards.
//! - Flow control: outbound QoS 1/2 in flight are bounded by
//!   min(`max_inflight`, the client's Receive Maximum); further QoS 1/2
//!   deliveries wait in a queue of at most `max_queued` messages and
//!   `max_queued_bytes` bytes ([`Delivery::cost`]; an empty queue takes
//!   one message of any size), then are dropped and counted in `dropped`;
//!   QoS 0 goes out at once. The shell reports [`Session::queued_bytes`]
//!   to the connection's [`crate::broker::QueueBudget`], so the router's
//!   channel and this queue share one byte limit, and moves deliveries in
//!   only while [`Session::output_len`] is small (the output is bounded by
//!   what the shell lets in, not here). frond's Receive
//!   Maximum is `max_inflight`; a 5.0 client with that many publishes
//!   unacknowledged that sends another QoS 1/2 PUBLISH is disconnected
//!   with 0x93 (3.1.1 clients are slowed through TCP instead).
//! - Maximum Packet Size: inbound enforced by the decoder; a PUBLISH
//!   larger than the client's maximum is not sent (counted in
//!   `oversize_dropped`, logged at debug; for a stream message the cursor
//!   moves past it).
//! - Metadata: PUBLISH properties travel as NATS headers
//!   ([`crate::broker::bridge`]); subscribers on 5.0 get them back as
//!   properties, plus the identifiers of every matching subscription
//!   (kept in stored sessions). Message expiry counts from the routing
//!   time (router deliveries, also while queued) or the stored timestamp
//!   (stream messages); an expired message is not sent to anyone, and the
//!   interval sent is the remaining time.
//! - Request Problem Information = 0: no reason string on acks. Request
//!   Response Information = 1: CONNACK Response Information
//!   `frond/response/<client id>` (`+`, `#`, `/` replaced by `_`).
//!
//! Not yet: the MQTT filter form and subscription options in stored
//! sessions (NATS filters, QoS and subscription identifiers are kept;
//! that is all delivery needs).
//! Retained messages keep their properties and expiry
//! ([`crate::broker::retained`]); CONNACK says retain is available.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{Auth, Permissions, Refusal};
use crate::broker::bridge;
use crate::broker::persist::{log_id, Cursor, Owner, StoredSession, StoredSub};
use crate::broker::Delivery;
use crate::subject::mqtt as topics;
use crate::wire::mqtt::{
    self, Ack, ConnAck, DecodeError, Disconnect, Packet, Properties, Publish, QoS, SubAck,
    UnsubAck, Version,
};

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
    /// load it otherwise, then call [`Session::restore`] — or
    /// [`Session::refuse`] when the client id belongs to another user.
    /// `expiry` > 0: the session is persistent.
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
        /// MQTT 5 properties to carry ([`bridge`]); `None` when empty.
        props: Option<Box<Properties>>,
    },
    /// Acknowledge packet `.0` in order once every earlier publish is
    /// acknowledged; nothing to store (a QoS 2 duplicate).
    AckInOrder(u16),
    /// Add subscriptions. The shell saves the session first, then calls
    /// [`Session::subscribe_done`] and adds them only if it returns true.
    Subscribe(Vec<SubRequest>),
    /// Remove subscriptions (NATS filters).
    Unsubscribe(Vec<String>),
    /// Remove shared subscriptions: (share name, NATS filter).
    UnsubscribeShared(Vec<(String, String)>),
    /// Close the connection; the reason is for the log.
    Close(String),
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    AwaitConnect,
    /// CONNECT seen; waiting for [`Session::restore`].
    Restoring,
    Connected,
    Closed,
}

/// An outbound QoS 1/2 message awaiting the client's acknowledgement.
#[derive(Debug)]
struct Outbound {
    packet_id: u16,
    /// For QoS 2: PUBREC seen, PUBREL sent, awaiting PUBCOMP.
    released: bool,
    /// (follow index, stream sequence) for a message from a stream.
    origin: Option<(usize, u64)>,
    /// Sent at QoS 2.
    exactly_once: bool,
    /// Restored from the stored session, not yet sent again on this
    /// connection: resent (DUP, same packet id) when the stream is read
    /// up to it.
    awaiting_resend: bool,
}

/// A SUBACK of a persistent session, held until its state is durable
/// ([`Session::subscribe_done`]).
#[derive(Debug)]
struct PendingSubAck {
    packet_id: u16,
    codes: Vec<u8>,
    /// Indices into `codes` of the filters granted.
    granted: Vec<usize>,
    /// The subscriptions before the SUBSCRIBE, restored if it fails.
    filters: Vec<(String, u8)>,
    shared: Vec<(String, String, u8)>,
    sub_ids: HashMap<String, u32>,
}

/// A QoS 1/2 delivery waiting for room in the client's window.
#[derive(Debug)]
struct Queued {
    publish: Publish,
    /// When it expires (MQTT 5 message expiry).
    deadline: Option<Instant>,
    /// What it counts against `max_queued_bytes`.
    cost: usize,
}

/// What [`Session::emit`] did with a PUBLISH.
#[derive(Debug, PartialEq, Eq)]
enum Emitted {
    Sent,
    Expired,
    TooLarge,
}

/// Topic aliases frond accepts from a client (CONNACK Topic Alias Maximum).
pub const TOPIC_ALIAS_MAX: u16 = 64;

/// One stream a persistent session follows.
#[derive(Debug)]
struct Follow {
    stream: String,
    /// The next sequence to read.
    next: u64,
    /// Sequences sent at QoS 1 and not yet acknowledged.
    inflight: BTreeSet<u64>,
    /// Highest sequence known sent.
    sent: u64,
    /// Sequences above [`Follow::acked`] whose QoS 2 exchange completed:
    /// never sent again.
    done: BTreeSet<u64>,
}

impl Follow {
    fn acked(&self) -> u64 {
        match self.inflight.first() {
            Some(s) => s.saturating_sub(1),
            None => self.next.saturating_sub(1),
        }
    }
}

pub struct Session {
    limits: Limits,
    state: State,
    version: Option<Version>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    events: VecDeque<Event>,
    keep_alive: Option<Duration>,
    last_packet: Instant,
    connect_deadline: Instant,
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
    /// NATS filters this client subscribed to, with granted QoS.
    filters: Vec<(String, u8)>,
    /// Shared subscriptions: (share name, NATS filter, granted QoS). Served
    /// live by the router only, never from stream cursors.
    shared: Vec<(String, String, u8)>,
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
    /// MQTT 5 subscription identifiers, by NATS filter.
    sub_ids: HashMap<String, u32>,
    /// MQTT 5 Request Problem Information (reason strings on acks).
    problem_info: bool,
    /// Messages not sent because they exceed the client's Maximum Packet
    /// Size.
    pub oversize_dropped: u64,
    /// Messages not sent because their message expiry passed.
    pub expired: u64,
}

/// One subscription to add (a NATS filter; an MQTT filter ending in `#`
/// yields two).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubRequest {
    pub filter: String,
    pub qos: u8,
    /// Send the retained messages matching `filter` (MQTT 5 retain
    /// handling: 0 always, 1 only for a new subscription, 2 never; never
    /// for a shared subscription).
    pub send_retained: bool,
    /// The share name of a shared subscription (`$share/{name}/...`).
    pub share: Option<String>,
}

/// A will message to publish when the connection ends abnormally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillMessage {
    pub subject: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 will delay interval: publish this long after the connection
    /// ended, unless the same client id connects again first.
    pub delay: Duration,
    /// MQTT 5 will properties carried with the message ([`bridge`]).
    pub props: Option<Box<Properties>>,
    /// Who armed it, for re-checking its permission after a restart;
    /// `None` without `[auth]`.
    pub owner: Option<Owner>,
}

impl Session {
    pub fn new(limits: Limits, now: Instant) -> Session {
        Session {
            connect_deadline: now + limits.connect_timeout,
            limits,
            state: State::AwaitConnect,
            version: None,
            inbuf: Vec::new(),
            out: Vec::new(),
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
            filters: Vec::new(),
            shared: Vec::new(),
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
            sub_ids: HashMap::new(),
            problem_info: true,
            oversize_dropped: 0,
            expired: 0,
        }
    }

    /// Whether inbound publishes awaiting storage stop decoding: 3.1.1
    /// clients are slowed through TCP; 5.0 clients are told the Receive
    /// Maximum and disconnected (0x93) when they exceed it.
    fn inflight_blocks(&self) -> bool {
        self.version != Some(Version::V5) && self.pending_acks.len() >= self.limits.max_inflight
    }

    /// The outbound QoS 1/2 window: frond's `max_inflight`, capped by the
    /// client's Receive Maximum.
    fn window(&self) -> usize {
        self.limits
            .max_inflight
            .min(self.client_receive_max)
            .min(65_535)
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
                code: mqtt::return_code::UNACCEPTABLE_PROTOCOL_VERSION,
                properties: Properties::default(),
            }));
        }
        let code = match e {
            // After CONNECT, an unsupported protocol level can only be a
            // second CONNECT: a protocol error (MQTT 5 §3.1). 0x84 is a
            // CONNACK code, not a DISCONNECT reason.
            DecodeError::UnsupportedVersion(_) => mqtt::reason::PROTOCOL_ERROR,
            _ => e.reason_code(),
        };
        self.close_with(code, format!("protocol error: {e}"));
    }

    /// Close; in 5.0 after CONNECT, tell the client why.
    fn close_with(&mut self, reason_code: u8, why: String) {
        if self.state == State::Closed {
            return;
        }
        if self.state == State::Connected && self.version == Some(Version::V5) {
            let props = Properties {
                reason_string: Some(why.clone()),
                ..Properties::default()
            };
            self.send(&Packet::Disconnect(Disconnect {
                code: reason_code,
                properties: props,
            }));
        }
        self.state = State::Closed;
        self.events.push_back(Event::Close(why));
    }

    fn send(&mut self, p: &Packet) {
        let v = self.version.unwrap_or(Version::V311);
        if let Err(e) = mqtt::encode(p, v, &mut self.out) {
            // Only our own packets are encoded here; a failure is a bug,
            // reported and contained to this connection.
            log::error!("cannot encode {p:?}: {e}");
            self.state = State::Closed;
            self.events
                .push_back(Event::Close(format!("internal encode error: {e}")));
        }
    }

    fn handle_packet(&mut self, packet: Packet, now: Instant) {
        if self.state == State::AwaitConnect {
            match packet {
                Packet::Connect(c) => self.handle_connect(c, now),
                other => self.close_with(0x82, format!("expected CONNECT, got {}", other.name())),
            }
            return;
        }
        match packet {
            Packet::Connect(_) => self.close_with(0x82, "second CONNECT".into()),
            Packet::Publish(p) => self.handle_publish(p),
            Packet::PubAck(a) => self.outbound_done(a.packet_id),
            Packet::PubRec(a) => {
                if a.code >= 0x80 {
                    // MQTT 5 §4.3.3: a failed PUBREC ends the exchange;
                    // the message is not sent again.
                    self.outbound_done(a.packet_id);
                    return;
                }
                if let Some(o) = self
                    .outbound
                    .iter_mut()
                    .find(|o| o.packet_id == a.packet_id)
                {
                    if o.awaiting_resend {
                        // The client had it from before: no resend.
                        o.awaiting_resend = false;
                        self.resends = self.resends.saturating_sub(1);
                    }
                    if !o.released && o.origin.is_some() {
                        // A stream message: the PUBREL owed is recorded
                        // before it leaves (after a restart frond sends
                        // PUBREL, never the message again).
                        self.sync = true;
                        self.dirty = true;
                    }
                    o.released = true;
                }
                self.send(&Packet::PubRel(Ack {
                    packet_id: a.packet_id,
                    code: 0,
                    properties: Properties::default(),
                }));
            }
            Packet::PubComp(a) => self.outbound_done(a.packet_id),
            Packet::PubRel(a) => {
                if self.qos2_in.remove(&a.packet_id) {
                    // Durable before the PUBCOMP: once the client has it,
                    // it may reuse the id for a new message, which a stale
                    // id restored after a crash would drop as a duplicate.
                    self.dirty = true;
                    self.sync = true;
                }
                self.send(&Packet::PubComp(Ack {
                    packet_id: a.packet_id,
                    code: 0,
                    properties: Properties::default(),
                }));
            }
            Packet::Subscribe(s) => {
                let sub_id = s.properties.subscription_identifiers.first().copied();
                let mut granted = Vec::new();
                let mut codes = Vec::new();
                let mut granted_at = Vec::new();
                let before = self.is_persistent().then(|| {
                    (
                        self.filters.clone(),
                        self.shared.clone(),
                        self.sub_ids.clone(),
                    )
                });
                let v5 = self.version == Some(Version::V5);
                for (filter, opts) in s.filters {
                    let qos = (opts.qos as u8).min(2);
                    let (share, inner) = match mqtt::split_shared(&filter) {
                        Some((name, inner)) => (Some(name.to_string()), inner),
                        None => (None, filter.as_str()),
                    };
                    if let Err(code) = self.check_filter(share.as_deref(), inner) {
                        codes.push(if v5 { code } else { 0x80 });
                        continue;
                    }
                    let mut nfs = topics::filter_to_subjects(inner);
                    if let Some(p) = &self.perms {
                        // `a/#` is `a.>` plus `a`: granted if either is
                        // allowed, subscribing only the allowed ones.
                        nfs.retain(|f| p.can_subscribe(f));
                        if nfs.is_empty() {
                            codes.push(if v5 { 0x87 } else { 0x80 });
                            continue;
                        }
                    }
                    if let Some(name) = share {
                        if self.over_quota(&nfs, Some(&name)) {
                            codes.push(if v5 { 0x97 } else { 0x80 });
                            continue;
                        }
                        granted_at.push(codes.len());
                        codes.push(qos);
                        for nf in nfs {
                            self.shared.retain(|(g, f, _)| !(*g == name && *f == nf));
                            self.shared.push((name.clone(), nf.clone(), qos));
                            self.dirty = true;
                            // MQTT 5 §4.8.2: no retained messages for a
                            // shared subscription.
                            granted.push(SubRequest {
                                filter: nf,
                                qos,
                                send_retained: false,
                                share: Some(name.clone()),
                            });
                        }
                        continue;
                    }
                    if self.over_quota(&nfs, None) {
                        codes.push(if v5 { 0x97 } else { 0x80 });
                        continue;
                    }
                    granted_at.push(codes.len());
                    codes.push(qos);
                    for nf in nfs {
                        let new = !self.filters.iter().any(|(f, _)| *f == nf);
                        if new {
                            self.filters.push((nf.clone(), qos));
                        } else {
                            for (f, q) in &mut self.filters {
                                if *f == nf {
                                    *q = qos;
                                }
                            }
                        }
                        self.dirty = true;
                        match sub_id {
                            Some(i) => self.sub_ids.insert(nf.clone(), i),
                            None => self.sub_ids.remove(&nf),
                        };
                        let send_retained = match opts.retain_handling {
                            0 => true,
                            1 => new,
                            _ => false,
                        };
                        granted.push(SubRequest {
                            filter: nf,
                            qos,
                            send_retained,
                            share: None,
                        });
                    }
                }
                self.events.push_back(Event::Subscribe(granted));
                match before {
                    // Durable before acknowledged: the SUBACK waits for
                    // the shell's save, and decoding waits with it.
                    Some((filters, shared, sub_ids)) => {
                        self.subacks.push_back(Some(PendingSubAck {
                            packet_id: s.packet_id,
                            codes,
                            granted: granted_at,
                            filters,
                            shared,
                            sub_ids,
                        }))
                    }
                    None => {
                        self.subacks.push_back(None);
                        self.send(&Packet::SubAck(SubAck {
                            packet_id: s.packet_id,
                            codes,
                            properties: Properties::default(),
                        }));
                    }
                }
            }
            Packet::Unsubscribe(u) => {
                let n = u.filters.len();
                let mut gone = Vec::new();
                let mut gone_shared = Vec::new();
                for f in u.filters {
                    match mqtt::split_shared(&f) {
                        Some((name, inner)) => {
                            for nf in topics::filter_to_subjects(inner) {
                                gone_shared.push((name.to_string(), nf));
                            }
                        }
                        None => gone.extend(topics::filter_to_subjects(&f)),
                    }
                }
                self.filters.retain(|(f, _)| !gone.contains(f));
                self.shared
                    .retain(|(g, f, _)| !gone_shared.iter().any(|x| x.0 == *g && x.1 == *f));
                self.sub_ids.retain(|f, _| !gone.contains(f));
                self.dirty = true;
                if !gone_shared.is_empty() {
                    self.events.push_back(Event::UnsubscribeShared(gone_shared));
                }
                self.events.push_back(Event::Unsubscribe(gone));
                let codes = if self.version == Some(Version::V5) {
                    vec![0; n]
                } else {
                    Vec::new()
                };
                self.send(&Packet::UnsubAck(UnsubAck {
                    packet_id: u.packet_id,
                    codes,
                    properties: Properties::default(),
                }));
            }
            Packet::PingReq => self.send(&Packet::PingResp),
            Packet::Disconnect(d) => {
                if let Some(secs) = d.properties.session_expiry_interval {
                    if self.expiry.is_zero() && secs != 0 {
                        // MQTT 5 §3.14.2.2.2: not a valid DISCONNECT (the
                        // will stays armed).
                        self.close_with(
                            0x82,
                            "DISCONNECT sets a session expiry, but CONNECT had 0".into(),
                        );
                        return;
                    }
                    let granted =
                        Duration::from_secs(u64::from(secs)).min(self.limits.max_session_expiry);
                    if granted != self.expiry {
                        self.expiry = granted;
                        self.dirty = true;
                    }
                }
                // MQTT 5 reason 0x04: disconnect *with* will message.
                if d.code != mqtt::reason::DISCONNECT_WITH_WILL_MESSAGE {
                    self.will = None;
                }
                self.state = State::Closed;
                self.events
                    .push_back(Event::Close("client sent DISCONNECT".into()));
            }
            Packet::Auth(_) => self.close_with(0x8C, "AUTH not supported".into()),
            other => self.close_with(0x82, format!("unexpected {} from a client", other.name())),
        }
    }

    fn handle_connect(&mut self, c: mqtt::Connect, _now: Instant) {
        self.version = Some(c.version);
        let v5 = c.version == Version::V5;
        if let Some(auth) = &self.limits.auth {
            match auth.authenticate(c.username.as_deref(), c.password.as_deref()) {
                Ok(p) => self.logged_in(p, c.username.as_deref()),
                Err(r) => {
                    let code = match (r, v5) {
                        (Refusal::BadCredentials, false) => 0x04,
                        (Refusal::NotAuthorized, false) => 0x05,
                        (Refusal::BadCredentials, true) => 0x86,
                        (Refusal::NotAuthorized, true) => 0x87,
                    };
                    self.send(&Packet::ConnAck(ConnAck {
                        session_present: false,
                        code,
                        properties: Properties::default(),
                    }));
                    self.state = State::Closed;
                    self.events.push_back(Event::Close(format!(
                        "authentication failed for user {:?} ({r:?})",
                        c.username.unwrap_or_default()
                    )));
                    return;
                }
            }
        }
        if !self.accept_will(c.will, c.username.as_deref(), v5) {
            return;
        }
        let mut client_id = c.client_id;
        let mut props = Properties::default();
        if v5 {
            let cp = &c.properties;
            self.client_receive_max = usize::from(cp.receive_maximum.unwrap_or(65_535).max(1));
            self.alias_out_max = cp.topic_alias_maximum.unwrap_or(0);
            self.client_max_packet = cp.maximum_packet_size.and_then(|m| usize::try_from(m).ok());
            self.problem_info = cp.request_problem_information != Some(0);
        }
        if client_id.is_empty() {
            if !c.clean_start && !v5 {
                // 3.1.1 §3.1.3-8: an empty id needs CleanSession = 1.
                self.send(&Packet::ConnAck(ConnAck {
                    session_present: false,
                    code: 0x02,
                    properties: Properties::default(),
                }));
                self.state = State::Closed;
                self.events
                    .push_back(Event::Close("empty client id without clean session".into()));
                return;
            }
            client_id = format!("frond-{:016x}", fastrand::u64(..));
            if v5 {
                props.assigned_client_identifier = Some(client_id.clone());
            }
        }
        let max_ka = self.limits.max_keep_alive;
        let ka = if c.keep_alive > max_ka || (c.keep_alive == 0 && v5) {
            if v5 {
                props.server_keep_alive = Some(max_ka);
                max_ka
            } else {
                c.keep_alive
            }
        } else {
            c.keep_alive
        };
        self.keep_alive = (ka > 0).then(|| Duration::from_secs(u64::from(ka)));
        if v5 {
            props.maximum_packet_size = u32::try_from(self.limits.max_packet_size).ok();
            props.receive_maximum = u16::try_from(self.limits.max_inflight).ok();
            props.topic_alias_maximum = Some(TOPIC_ALIAS_MAX);
            props.shared_subscription_available = Some(1);
            if c.properties.request_response_information == Some(1) {
                // A per-client topic prefix for response topics.
                let id: String = client_id
                    .chars()
                    .map(|ch| match ch {
                        '+' | '#' | '/' | '\0' => '_',
                        other => other,
                    })
                    .collect();
                props.response_information = Some(format!("frond/response/{id}"));
            }
        }
        let max_exp = self.limits.max_session_expiry;
        self.expiry = if v5 {
            match c.properties.session_expiry_interval.unwrap_or(0) {
                0 => Duration::ZERO,
                s => {
                    let granted = Duration::from_secs(u64::from(s)).min(max_exp);
                    if granted.as_secs() < u64::from(s) {
                        props.session_expiry_interval =
                            Some(u32::try_from(granted.as_secs()).unwrap_or(u32::MAX));
                    }
                    granted
                }
            }
        } else if c.clean_start {
            Duration::ZERO
        } else {
            max_exp
        };
        self.state = State::Restoring;
        self.pending_connack = Some(props);
        self.client_id = client_id.clone();
        self.events.push_back(Event::Connected {
            client_id,
            clean: c.clean_start,
            expiry: self.expiry,
        });
    }

    /// Arm the will of CONNECT, owned by who logged in. A will is a
    /// publish by this client: one it may not make refuses the CONNECT (as
    /// HiveMQ, EMQX and VerneMQ do; CONNACK not authorized, then close),
    /// so the client learns at once rather than when its will is dropped.
    /// Returns whether the CONNECT goes on.
    fn accept_will(&mut self, will: Option<mqtt::Will>, user: Option<&str>, v5: bool) -> bool {
        let owner = self.owner.clone();
        self.will = will.map(|w| WillMessage {
            subject: topics::topic_to_subject(&w.topic),
            delay: Duration::from_secs(u64::from(w.properties.will_delay_interval.unwrap_or(0))),
            payload: w.payload,
            qos: w.qos as u8,
            retain: w.retain,
            props: (!w.properties.is_empty()).then(|| Box::new(w.properties)),
            owner,
        });
        let Some(why) = self.will_refused() else {
            return true;
        };
        self.will = None;
        self.send(&Packet::ConnAck(ConnAck {
            session_present: false,
            code: if v5 {
                mqtt::reason::NOT_AUTHORIZED
            } else {
                0x05
            },
            properties: Properties {
                reason_string: v5.then(|| why.clone()),
                ..Properties::default()
            },
        }));
        self.state = State::Closed;
        self.events.push_back(Event::Close(format!(
            "CONNECT refused for user {:?}: {why}",
            user.unwrap_or_default()
        )));
        false
    }

    /// Why the will from CONNECT may not be armed, if so: its client may
    /// not publish to its topic, or not subscribe to its response topic
    /// (the reply would reach a subject the client may not read).
    fn will_refused(&self) -> Option<String> {
        let (Some(w), Some(p)) = (&self.will, &self.perms) else {
            return None;
        };
        if !p.can_publish(&w.subject) {
            let topic = topics::subject_to_topic(&w.subject);
            return Some(format!("not authorized to publish the will to {topic}"));
        }
        let response = w.props.as_ref().and_then(|x| x.response_topic.as_deref());
        match response {
            Some(rt) if !p.can_subscribe(&topics::topic_to_subject(rt)) => Some(format!(
                "not authorized to subscribe to the will's response topic {rt}"
            )),
            _ => None,
        }
    }

    /// Authenticated as `user` (`None`: anonymous) with permissions `p`.
    fn logged_in(&mut self, p: Arc<Permissions>, user: Option<&str>) {
        self.perms = (!p.is_unrestricted()).then_some(p);
        self.owner = Some(user.map_or(Owner::Anonymous, |u| Owner::User(u.into())));
    }

    /// Finish CONNECT: `stored` is the persistent state found for this
    /// client id (None for a clean session or when there was none). Sends
    /// CONNACK and resumes decoding.
    pub fn restore(&mut self, stored: Option<StoredSession>) {
        if self.state != State::Restoring {
            return;
        }
        let props = self.pending_connack.take().unwrap_or_default();
        let present = self.is_persistent() && stored.is_some();
        if let Some(mut st) = stored.filter(|_| self.is_persistent()) {
            self.qos2_in = st.qos2_in.into_iter().collect();
            self.recheck_restored(&mut st.subs, &mut st.sub_ids);
            let subs: Vec<SubRequest> = st
                .subs
                .iter()
                .map(|s| SubRequest {
                    filter: s.filter.clone(),
                    qos: s.qos.min(2),
                    send_retained: false,
                    share: s.share.clone(),
                })
                .collect();
            for s in st.subs {
                match s.share {
                    Some(g) => self.shared.push((g, s.filter, s.qos)),
                    None => self.filters.push((s.filter, s.qos)),
                }
            }
            self.sub_ids = st.sub_ids.into_iter().collect();
            self.restored_cursors = st.cursors;
            if !subs.is_empty() {
                self.events.push_back(Event::Subscribe(subs));
                self.subacks.push_back(None);
            }
        }
        self.state = State::Connected;
        self.dirty = self.is_persistent();
        self.was_persistent = self.is_persistent();
        self.send(&Packet::ConnAck(ConnAck {
            session_present: present,
            code: 0,
            properties: props,
        }));
        self.process(self.now);
    }

    /// The client's permissions once CONNECT is accepted (`None`:
    /// unrestricted, or before CONNECT).
    pub fn permissions(&self) -> Option<&Arc<Permissions>> {
        self.perms.as_ref()
    }

    /// Drop restored subscriptions the client's current permissions do not
    /// allow (the configuration may have changed since they were granted);
    /// each is logged.
    fn recheck_restored(&self, subs: &mut Vec<StoredSub>, sub_ids: &mut Vec<(String, u32)>) {
        let Some(p) = &self.perms else { return };
        subs.retain(|s| {
            let ok = p.can_subscribe(&s.filter);
            if !ok {
                log::warn!(
                    "mqtt: {}: restored subscription {}{} is no longer allowed for {}; dropped",
                    log_id(&self.client_id),
                    s.share
                        .as_ref()
                        .map_or(String::new(), |g| format!("(share {g}) ")),
                    s.filter,
                    self.owner
                        .as_ref()
                        .map_or("this client".into(), |o| o.to_string()),
                );
            }
            ok
        });
        sub_ids.retain(|(f, _)| subs.iter().any(|s| s.share.is_none() && s.filter == *f));
    }

    /// Refuse the CONNECT (after [`Event::Connected`], instead of
    /// [`Session::restore`]): the client id belongs to another user's
    /// session. CONNACK "not authorized" (5.0 0x87, 3.1.1 0x05), then
    /// close; the will is dropped and nothing of this connection is stored.
    pub fn refuse(&mut self, why: String) {
        if self.state != State::Restoring {
            return;
        }
        let code = if self.version == Some(Version::V5) {
            0x87
        } else {
            0x05
        };
        self.send(&Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: Properties::default(),
        }));
        self.will = None;
        self.expiry = Duration::ZERO;
        self.was_persistent = false;
        self.state = State::Closed;
        self.events.push_back(Event::Close(why));
    }

    /// Who logged in (`None` when frond runs without `[auth]`).
    pub fn owner(&self) -> Option<&Owner> {
        self.owner.as_ref()
    }

    /// The shell stored the state of the oldest [`Event::Subscribe`] not
    /// yet answered (`saved`), or could not. Call once per such event, in
    /// order. Returns whether to add its subscriptions: a persistent
    /// session's SUBACK leaves only now; when the save failed, every
    /// filter it would have granted is refused instead (0x80; 5.0
    /// "unspecified error") and the subscriptions are as before it.
    pub fn subscribe_done(&mut self, saved: bool) -> bool {
        let Some(Some(p)) = self.subacks.pop_front() else {
            return true;
        };
        let mut codes = p.codes;
        let mut properties = Properties::default();
        if !saved {
            for &i in &p.granted {
                if let Some(c) = codes.get_mut(i) {
                    *c = 0x80;
                }
            }
            self.filters = p.filters;
            self.shared = p.shared;
            self.sub_ids = p.sub_ids;
            // What reached the disk, if anything, is overwritten.
            self.dirty = true;
            if self.version == Some(Version::V5) && self.problem_info {
                properties.reason_string = Some("the session state could not be saved".into());
            }
        }
        if self.state != State::Closed {
            self.send(&Packet::SubAck(SubAck {
                packet_id: p.packet_id,
                codes,
                properties,
            }));
        }
        if !self.inbuf.is_empty() {
            self.process(self.now);
        }
        saved
    }

    /// The save [`Session::take_sync`] asked for failed: what the output
    /// holds must not leave (a PUBREC or PUBCOMP the disk does not back,
    /// a QoS 2 PUBLISH whose packet id is not recorded). It is dropped and
    /// the connection closes (5.0: DISCONNECT 0x80); the client resends
    /// what was not acknowledged after reconnecting.
    pub fn sync_failed(&mut self, why: &str) {
        self.out.clear();
        self.close_with(
            0x80,
            format!("session state could not be saved ({why}); nothing unsaved is acknowledged"),
        );
    }

    /// The client id (empty before CONNECT).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Whether this session outlives its connection.
    pub fn is_persistent(&self) -> bool {
        !self.expiry.is_zero()
    }

    /// Follow stream `name` (persistent sessions): resume from the stored
    /// cursor, or after `last_seq` (the stream's tail) for a stream the
    /// session did not know. Returns the follow index.
    ///
    /// QoS 2 messages of the stream that were in flight come back in the
    /// in-flight window with their packet ids: a PUBREL is sent now for
    /// each one the client had PUBREC'd; the others are resent (DUP) when
    /// the stream is read up to them.
    pub fn follow(&mut self, name: &str, last_seq: u64) -> usize {
        let idx = self.follows.len();
        let cursor = self.restored_cursors.iter().find(|c| c.stream == name);
        let (acked, sent) = cursor.map_or((last_seq, last_seq), |c| (c.acked, c.sent));
        let qos2 = cursor.map(|c| c.qos2.clone()).unwrap_or_default();
        let done = cursor.map(|c| c.done.clone()).unwrap_or_default();
        let mut f = Follow {
            stream: name.to_string(),
            next: acked.saturating_add(1),
            inflight: BTreeSet::new(),
            sent,
            done: done.into_iter().filter(|&d| d > acked).collect(),
        };
        let mut rels = Vec::new();
        for (seq, packet_id, released) in qos2 {
            if packet_id == 0 || self.outbound.iter().any(|o| o.packet_id == packet_id) {
                log::warn!(
                    "mqtt: {}: stored QoS 2 state of stream {name} reuses packet id {packet_id}; ignored",
                    self.client_id
                );
                continue;
            }
            // An entry at or below the cursor is never read again: release
            // its packet id at the client instead of resending.
            let released = released || seq <= acked;
            if released {
                rels.push(packet_id);
            } else {
                self.resends += 1;
            }
            f.inflight.insert(seq);
            self.outbound.push_back(Outbound {
                packet_id,
                released,
                origin: Some((idx, seq)),
                exactly_once: true,
                awaiting_resend: !released,
            });
        }
        self.follows.push(f);
        for packet_id in rels {
            self.send(&Packet::PubRel(Ack {
                packet_id,
                code: 0,
                properties: Properties::default(),
            }));
        }
        idx
    }

    /// How many more stream messages may be sent now (the in-flight window).
    pub fn stream_room(&self) -> usize {
        if self.state != State::Connected {
            return 0;
        }
        // Entries awaiting a resend need the stream read to go on.
        let busy = self.outbound.len().saturating_sub(self.resends);
        self.window().saturating_sub(busy + self.queued.len())
    }

    /// The next sequence to read from followed stream `idx`.
    pub fn stream_next(&self, idx: usize) -> Option<u64> {
        self.follows.get(idx).map(|f| f.next)
    }

    /// Messages below `seq` of stream `idx` are gone (stream limits):
    /// continue from `seq`.
    pub fn stream_skip_to(&mut self, idx: usize, seq: u64) {
        if let Some(f) = self.follows.get_mut(idx) {
            if seq > f.next {
                f.next = seq;
                self.dirty = true;
            }
        }
        self.release_unsent(idx, seq);
    }

    /// Restored QoS 2 messages of stream `idx` below `seq` that the stream
    /// no longer holds (its limits removed them) cannot be resent: release
    /// their packet ids at the client with a PUBREL.
    fn release_unsent(&mut self, idx: usize, seq: u64) {
        if self.resends == 0 {
            return;
        }
        let mut rels = Vec::new();
        for o in &mut self.outbound {
            if o.awaiting_resend && o.origin.is_some_and(|(i, s)| i == idx && s < seq) {
                o.awaiting_resend = false;
                o.released = true;
                rels.push(o.packet_id);
            }
        }
        for packet_id in rels {
            log::warn!(
                "mqtt: {}: a QoS 2 message in flight (packet id {packet_id}) left its stream before it could be resent",
                self.client_id
            );
            self.resends = self.resends.saturating_sub(1);
            self.sync = true;
            self.dirty = true;
            self.send(&Packet::PubRel(Ack {
                packet_id,
                code: 0,
                properties: Properties::default(),
            }));
        }
    }

    /// A message read from followed stream `idx` (in sequence order, from
    /// [`Session::stream_next`] on). Sends it if a subscription matches.
    pub fn deliver_stored(&mut self, idx: usize, seq: u64, subject: &str, payload: &[u8]) {
        self.deliver_stored_msg(idx, seq, subject, None, payload, Duration::ZERO)
    }

    /// [`Session::deliver_stored`] with the stored header block (MQTT 5
    /// properties, see [`bridge`]) and the message's age (time since it
    /// was stored), against which its message expiry is checked.
    pub fn deliver_stored_msg(
        &mut self,
        idx: usize,
        seq: u64,
        subject: &str,
        headers: Option<&[u8]>,
        payload: &[u8],
        age: Duration,
    ) {
        if self.state != State::Connected {
            return;
        }
        let Some(f) = self.follows.get_mut(idx) else {
            return;
        };
        if seq < f.next {
            return;
        }
        f.next = seq.saturating_add(1);
        let done = f.done.contains(&seq);
        // Only a restored QoS 2 entry is in flight when read: the stream
        // is read past everything sent on this connection.
        let restored = f.inflight.contains(&seq);
        self.dirty = true;
        self.release_unsent(idx, seq);
        if done {
            // Delivered exactly once already.
            return;
        }
        if self.perms.as_ref().is_some_and(|p| !p.may_deliver(subject)) {
            // Not for this client (deny_subscribe, as on the live path);
            // the cursor moves past it. A QoS 2 one in flight from before
            // is not sent again: its packet id is released.
            if restored {
                if let Some(o) = self.outbound.iter().find(|o| o.origin == Some((idx, seq))) {
                    if o.awaiting_resend {
                        let packet_id = o.packet_id;
                        self.release_restored(packet_id);
                    }
                }
            }
            return;
        }
        let entry = match restored {
            true => self.outbound.iter().find(|o| o.origin == Some((idx, seq))),
            false => None,
        };
        if let Some(o) = entry {
            if o.awaiting_resend {
                let packet_id = o.packet_id;
                self.resend_stored(packet_id, subject, headers, payload);
            }
            // Otherwise in flight already (a PUBREL was sent for it).
            return;
        }
        let Some(granted) = self.matching_qos(subject) else {
            return;
        };
        let dollar_ok = !subject.starts_with('$') || self.dollar_subscribed(subject);
        if !dollar_ok {
            return;
        }
        let (properties, deadline, published) = self.publish_props(subject, headers, None);
        // The publisher's QoS: recorded for MQTT QoS 0 and 2; everything
        // else in a stream counts as QoS 1 (see [`bridge`]).
        let qos = granted.min(published.unwrap_or(1));
        let deadline = match deadline {
            Some(life) if life <= age => {
                self.expired += 1;
                return;
            }
            Some(life) => Some(self.now + (life - age)),
            None => None,
        };
        let mut publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topics::subject_to_topic(subject),
            packet_id: None,
            properties,
            payload: payload.to_vec(),
        };
        if qos >= 1 {
            publish.qos = if qos >= 2 {
                QoS::ExactlyOnce
            } else {
                QoS::AtLeastOnce
            };
            if let Some(f) = self.follows.get(idx) {
                publish.dup = seq <= f.sent;
            }
        }
        if self.emit(publish, deadline, Some((idx, seq))) == Emitted::Sent && qos >= 1 {
            if let Some(f) = self.follows.get_mut(idx) {
                f.sent = f.sent.max(seq);
                f.inflight.insert(seq);
            }
            if qos >= 2 {
                // Its packet id is recorded before it leaves, so after a
                // restart it is resent with the same id, never as new.
                self.sync = true;
            }
        }
    }

    /// Send again, with DUP and its packet id, a QoS 2 stream message
    /// restored from the stored session. Its expiry is not checked: the
    /// client may hold it already. One too large for the client now gets
    /// a PUBREL instead (releasing the id).
    fn resend_stored(
        &mut self,
        packet_id: u16,
        subject: &str,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) {
        let (properties, _, _) = self.publish_props(subject, headers, None);
        let publish = Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: topics::subject_to_topic(subject),
            packet_id: Some(packet_id),
            properties,
            payload: payload.to_vec(),
        };
        if self.emit(publish, None, None) == Emitted::Sent {
            return;
        }
        self.release_restored(packet_id);
    }

    /// A restored QoS 2 stream message awaiting its resend is not sent
    /// again: PUBREL releases its packet id at the client.
    fn release_restored(&mut self, packet_id: u16) {
        if let Some(o) = self
            .outbound
            .iter_mut()
            .find(|o| o.packet_id == packet_id && o.awaiting_resend)
        {
            o.awaiting_resend = false;
            o.released = true;
            self.resends = self.resends.saturating_sub(1);
            self.sync = true;
            self.dirty = true;
            self.send(&Packet::PubRel(Ack {
                packet_id,
                code: 0,
                properties: Properties::default(),
            }));
        }
    }

    /// MQTT 5 PUBLISH properties for a message to this client (from its
    /// NATS headers and reply subject, plus matching subscription
    /// identifiers), the message's lifetime (`Mqtt-Expiry`) and the
    /// publisher's QoS if recorded (`Mqtt-QoS`).
    fn publish_props(
        &self,
        subject: &str,
        headers: Option<&[u8]>,
        reply: Option<&str>,
    ) -> (Properties, Option<Duration>, Option<u8>) {
        if headers.is_none() && reply.is_none() && self.sub_ids.is_empty() {
            return (Properties::default(), None, None);
        }
        let meta = bridge::headers_to_meta(headers, reply);
        let life = meta.expiry.map(|e| Duration::from_secs(u64::from(e)));
        if self.version != Some(Version::V5) {
            return (Properties::default(), life, meta.qos);
        }
        let mut props = meta.props;
        props.message_expiry_interval = None;
        if !self.sub_ids.is_empty() {
            let mut ids: Vec<u32> = self
                .sub_ids
                .iter()
                .filter(|(f, _)| crate::subject::matches(f, subject))
                .map(|(_, i)| *i)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            props.subscription_identifiers = ids;
        }
        (props, life, meta.qos)
    }

    /// Send one PUBLISH: sets the remaining message expiry, a topic alias
    /// (when the client accepts them) and, for QoS 1/2, a packet id and the
    /// in-flight entry. Not sent when expired, or (MQTT 5 §3.1.2.11.4) when
    /// larger than the client's Maximum Packet Size.
    fn emit(
        &mut self,
        mut p: Publish,
        deadline: Option<Instant>,
        origin: Option<(usize, u64)>,
    ) -> Emitted {
        if let Some(d) = deadline {
            if d <= self.now {
                self.expired += 1;
                log::debug!("mqtt: {}: message on {} expired", self.client_id, p.topic);
                return Emitted::Expired;
            }
            let left = d - self.now;
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            p.properties.message_expiry_interval = Some(u32::try_from(secs).unwrap_or(u32::MAX));
        }
        let v5 = self.version == Some(Version::V5);
        let mut new_alias = None;
        if v5 && self.alias_out_max > 0 {
            if let Some(&a) = self.alias_out.get(&p.topic) {
                p.properties.topic_alias = Some(a);
                p.topic = String::new();
            } else if let Ok(n) = u16::try_from(self.alias_out.len()) {
                if n < self.alias_out_max {
                    p.properties.topic_alias = Some(n + 1);
                    new_alias = Some((p.topic.clone(), n + 1));
                }
            }
        }
        // A resend keeps its packet id (its entry is in `outbound`).
        let resend = p.packet_id.filter(|_| p.qos != QoS::AtMostOnce);
        let id = match p.qos {
            QoS::AtMostOnce => None,
            _ => Some(resend.unwrap_or_else(|| self.alloc_packet_id())),
        };
        let exactly_once = p.qos == QoS::ExactlyOnce;
        p.packet_id = id;
        let start = self.out.len();
        self.send(&Packet::Publish(p));
        let size = self.out.len().saturating_sub(start);
        if self.client_max_packet.is_some_and(|max| size > max) {
            self.out.truncate(start);
            self.oversize_dropped += 1;
            log::debug!(
                "mqtt: {}: a {size}-byte PUBLISH exceeds the client's maximum packet size; not sent",
                self.client_id
            );
            return Emitted::TooLarge;
        }
        if let Some((topic, a)) = new_alias {
            self.alias_out.insert(topic, a);
        }
        if let Some(packet_id) = resend {
            if let Some(o) = self
                .outbound
                .iter_mut()
                .find(|o| o.packet_id == packet_id && o.awaiting_resend)
            {
                o.awaiting_resend = false;
                self.resends = self.resends.saturating_sub(1);
            }
        } else if let Some(packet_id) = id {
            self.outbound.push_back(Outbound {
                packet_id,
                released: false,
                origin,
                exactly_once,
                awaiting_resend: false,
            });
        }
        Emitted::Sent
    }

    /// Send queued deliveries while the window has room.
    fn pump(&mut self) {
        while self.state == State::Connected && self.outbound.len() < self.window() {
            let Some(q) = self.queued.pop_front() else {
                break;
            };
            self.queued_bytes = self.queued_bytes.saturating_sub(q.cost);
            self.emit(q.publish, q.deadline, None);
        }
    }

    /// The highest QoS of the subscriptions matching `subject`.
    fn matching_qos(&self, subject: &str) -> Option<u8> {
        self.filters
            .iter()
            .filter(|(f, _)| crate::subject::matches(f, subject))
            .map(|(_, q)| (*q).min(2))
            .max()
    }

    fn outbound_done(&mut self, packet_id: u16) {
        let Some(pos) = self.outbound.iter().position(|o| o.packet_id == packet_id) else {
            return;
        };
        if let Some(o) = self.outbound.remove(pos) {
            if o.awaiting_resend {
                self.resends = self.resends.saturating_sub(1);
            }
            if let Some((idx, seq)) = o.origin {
                if let Some(f) = self.follows.get_mut(idx) {
                    f.inflight.remove(&seq);
                    let acked = f.acked();
                    if o.exactly_once && seq > acked {
                        f.done.insert(seq);
                    }
                    while f.done.first().is_some_and(|&d| d <= acked) {
                        f.done.pop_first();
                    }
                    self.dirty = true;
                }
            }
        }
        self.pump();
    }

    /// True (once) if the persistent state changed since the last call.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty) && self.is_persistent()
    }

    /// True (once) if the output holds a packet whose state must be
    /// durable before it leaves: the shell writes [`Session::snapshot`]
    /// first (one write for everything queued). Set by a PUBREC (the
    /// inbound QoS 2 id) or PUBCOMP (its removal) to the client, and by a
    /// QoS 2 stream message's first PUBLISH (its packet id) or PUBREL (the
    /// PUBREC received). Only for persistent sessions; never for QoS 0/1.
    pub fn take_sync(&mut self) -> bool {
        std::mem::take(&mut self.sync) && self.is_persistent()
    }

    /// Whether the stored state of this session must be deleted now that
    /// its connection ended: it was persistent, and a 5.0 DISCONNECT set
    /// its expiry to 0.
    pub fn discard_stored(&self) -> bool {
        self.was_persistent && !self.is_persistent()
    }

    /// The state to store for a persistent session (`disconnected_at`
    /// is 0: the shell sets it at disconnect).
    pub fn snapshot(&self) -> StoredSession {
        let mut cursors: Vec<Cursor> = self
            .follows
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let acked = f.acked();
                Cursor {
                    stream: f.stream.clone(),
                    acked,
                    sent: f.sent,
                    qos2: self
                        .outbound
                        .iter()
                        .filter(|o| o.exactly_once)
                        .filter_map(|o| match o.origin {
                            Some((x, seq)) if x == i => Some((seq, o.packet_id, o.released)),
                            _ => None,
                        })
                        .collect(),
                    done: f.done.iter().copied().filter(|&d| d > acked).collect(),
                }
            })
            .collect();
        // Keep cursors of streams not followed now (not configured at the
        // moment) so they survive a configuration round trip.
        for c in &self.restored_cursors {
            if !cursors.iter().any(|k| k.stream == c.stream) {
                cursors.push(c.clone());
            }
        }
        let mut qos2_in: Vec<u16> = self.qos2_in.iter().copied().collect();
        qos2_in.sort_unstable();
        StoredSession {
            client_id: self.client_id.clone(),
            owner: self.owner.clone(),
            version: if self.version == Some(Version::V5) {
                5
            } else {
                4
            },
            subs: self
                .filters
                .iter()
                .map(|(f, q)| StoredSub {
                    filter: f.clone(),
                    qos: *q,
                    share: None,
                })
                .chain(self.shared.iter().map(|(g, f, q)| StoredSub {
                    filter: f.clone(),
                    qos: *q,
                    share: Some(g.clone()),
                }))
                .collect(),
            expiry_secs: self.expiry.as_secs(),
            disconnected_at: 0,
            cursors,
            qos2_in,
            sub_ids: {
                let mut ids: Vec<(String, u32)> =
                    self.sub_ids.iter().map(|(f, i)| (f.clone(), *i)).collect();
                ids.sort();
                ids
            },
        }
    }

    fn handle_publish(&mut self, mut p: Publish) {
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias == 0 || alias > TOPIC_ALIAS_MAX {
                self.close_with(
                    0x94,
                    format!("topic alias {alias} is outside 1..={TOPIC_ALIAS_MAX}"),
                );
                return;
            }
            if p.topic.is_empty() {
                match self.alias_in.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        self.close_with(0x82, format!("topic alias {alias} was never set"));
                        return;
                    }
                }
            } else {
                self.alias_in.insert(alias, p.topic.clone());
            }
        }
        if p.topic.is_empty() {
            self.close_with(0x82, "PUBLISH with an empty topic and no alias".into());
            return;
        }
        let qos = p.qos as u8;
        if let Some(why) = self.topic_too_big(&p.topic) {
            // 5.0: a negative acknowledgement (0x90 topic name invalid), or
            // for QoS 0 a DISCONNECT saying why; 3.1.1 has neither, so the
            // connection closes (dropping the message silently would hide
            // the problem from the device).
            match p.packet_id.filter(|_| qos > 0) {
                Some(id) if self.version == Some(Version::V5) => {
                    self.denied.insert(id, 0x90);
                    self.pending_acks.push_back((id, qos));
                    self.events.push_back(Event::AckInOrder(id));
                }
                _ => self.close_with(0x90, format!("PUBLISH refused: {why}")),
            }
            return;
        }
        if qos > 0
            && self.version == Some(Version::V5)
            && self.pending_acks.len() >= self.limits.max_inflight
        {
            // Every one of those is still unacknowledged: the client
            // cannot have seen room for this one.
            self.close_with(
                0x93,
                format!(
                    "more than the Receive Maximum ({}) unacknowledged QoS 1/2 publishes",
                    self.limits.max_inflight
                ),
            );
            return;
        }
        let props = (!p.properties.is_empty()).then(|| Box::new(std::mem::take(&mut p.properties)));
        let subject = topics::topic_to_subject(&p.topic);
        // An MQTT 5 request's Response Topic is checked as the requester's
        // own publish and subscribe ([`bridge::response_topic_allowed`]).
        let bad_response = props
            .as_ref()
            .and_then(|p| p.response_topic.as_deref())
            .filter(|t| !bridge::response_topic_allowed(self.perms.as_deref(), t));
        if bad_response.is_some()
            || self
                .perms
                .as_ref()
                .is_some_and(|x| !x.can_publish(&subject))
        {
            // Dropped. QoS 1/2 are still acknowledged in order: a success
            // in 3.1.1 (which has no negative ack), 0x87 in 5.0.
            match bad_response {
                Some(t) => log::debug!(
                    "mqtt: publish to {subject:?} denied: response topic {t:?} not allowed"
                ),
                None => log::debug!("mqtt: publish to {subject:?} denied by permissions"),
            }
            if let Some(id) = p.packet_id.filter(|_| qos > 0) {
                if self.version == Some(Version::V5) {
                    self.denied.insert(id, 0x87);
                }
                self.pending_acks.push_back((id, qos));
                self.events.push_back(Event::AckInOrder(id));
            }
            return;
        }
        match (p.qos, p.packet_id) {
            (QoS::AtMostOnce, _) => self.events.push_back(Event::Publish {
                subject,
                payload: p.payload,
                qos,
                retain: p.retain,
                ack: None,
                props,
            }),
            (QoS::ExactlyOnce, Some(id))
                if self.qos2_in.contains(&id)
                    || self.pending_acks.iter().any(|&(p, q)| p == id && q == 2) =>
            {
                // Already stored (or being stored); the client resent it.
                // Answer again in order, without routing it twice.
                self.pending_acks.push_back((id, 2));
                self.events.push_back(Event::AckInOrder(id));
            }
            (_, Some(id)) => {
                self.pending_acks.push_back((id, qos));
                self.events.push_back(Event::Publish {
                    subject,
                    payload: p.payload,
                    qos,
                    retain: p.retain,
                    ack: Some(id),
                    props,
                });
            }
            (_, None) => self.close_with(0x81, "QoS > 0 PUBLISH without packet id".into()),
        }
    }

    /// The message of the oldest pending PUBLISH is stored (`Ok`) or could
    /// not be (`Err(reason)`). `packet_id` must be the oldest pending one.
    pub fn publish_done(&mut self, packet_id: u16, result: Result<(), String>) {
        if self.state == State::Closed {
            return;
        }
        let Some((id, qos)) = self.pending_acks.pop_front() else {
            return;
        };
        debug_assert_eq!(id, packet_id);
        match result {
            Ok(()) if self.denied.contains_key(&id) => {
                let ack = Ack {
                    packet_id: id,
                    // 0x87 not authorized, 0x90 topic name invalid
                    code: self.denied.remove(&id).unwrap_or(0x80),
                    properties: Properties::default(),
                };
                if qos == 2 {
                    self.send(&Packet::PubRec(ack));
                } else {
                    self.send(&Packet::PubAck(ack));
                }
            }
            Ok(()) => {
                let ack = Ack {
                    packet_id: id,
                    code: 0,
                    properties: Properties::default(),
                };
                if qos == 2 {
                    // Durable before the PUBREC leaves ([`Session::take_sync`]).
                    self.qos2_in.insert(id);
                    self.dirty = true;
                    self.sync = true;
                    self.send(&Packet::PubRec(ack));
                } else {
                    self.send(&Packet::PubAck(ack));
                }
            }
            Err(why) => {
                if self.version == Some(Version::V5) {
                    let props = Properties {
                        // Request Problem Information = 0: no reason string.
                        reason_string: self.problem_info.then(|| why.clone()),
                        ..Properties::default()
                    };
                    let ack = Ack {
                        packet_id: id,
                        code: 0x80, // unspecified error: not stored
                        properties: props,
                    };
                    if qos == 2 {
                        self.send(&Packet::PubRec(ack));
                    } else {
                        self.send(&Packet::PubAck(ack));
                    }
                } else {
                    // 3.1.1 has no negative acknowledgement: closing the
                    // connection is the only way to say "not stored"; the
                    // client resends after reconnecting.
                    self.close_with(0x80, format!("message not stored: {why}"));
                }
            }
        }
        if !self.inbuf.is_empty() {
            self.process(self.now);
        }
    }

    /// A message for this client from a subscription.
    pub fn deliver(&mut self, d: &Delivery) {
        self.deliver_with(d, false)
    }

    /// A retained message sent because of a new subscription (RETAIN set).
    pub fn deliver_retained(&mut self, d: &Delivery) {
        self.deliver_with(d, true)
    }

    fn deliver_with(&mut self, d: &Delivery, retain: bool) {
        if self.state != State::Connected {
            return;
        }
        if self
            .perms
            .as_ref()
            .is_some_and(|p| !p.may_deliver(&d.subject))
        {
            return;
        }
        if d.subject.starts_with('$') && !self.dollar_subscribed(&d.subject) {
            // MQTT 3.1.1 §4.7.2: a filter starting with a wildcard does not
            // match topics starting with `$`.
            return;
        }
        let qos = match d.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        // `now` may be older than the routing time when no input came for a
        // while; expiry is counted from `d.at`.
        self.now = self.now.max(d.at);
        let (properties, life, _) =
            self.publish_props(&d.subject, d.headers.as_deref(), d.reply.as_deref());
        let publish = Publish {
            dup: false,
            qos,
            retain,
            topic: topics::subject_to_topic(&d.subject),
            packet_id: None,
            properties,
            payload: d.payload.clone(),
        };
        let deadline = life.map(|l| d.at + l);
        if qos != QoS::AtMostOnce
            && (self.outbound.len() >= self.window() || !self.queued.is_empty())
        {
            let cost = d.cost();
            if self.queued.len() >= self.limits.max_queued
                || (!self.queued.is_empty()
                    && self.queued_bytes.saturating_add(cost) > self.limits.max_queued_bytes)
            {
                // The client is not acknowledging; drop rather than grow.
                self.dropped += 1;
                return;
            }
            self.queued_bytes += cost;
            self.queued.push_back(Queued {
                publish,
                deadline,
                cost,
            });
            return;
        }
        self.emit(publish, deadline, None);
    }

    /// Whether a filter that does not start with a wildcard matches `subject`.
    fn dollar_subscribed(&self, subject: &str) -> bool {
        let shared = self.shared.iter().map(|(_, f, _)| f);
        self.filters.iter().map(|(f, _)| f).chain(shared).any(|f| {
            !(f.starts_with('*') || f.starts_with('>')) && crate::subject::matches(f, subject)
        })
    }

    /// Why a PUBLISH topic name exceeds `max_topic_length`/`max_topic_levels`.
    fn topic_too_big(&self, topic: &str) -> Option<String> {
        let (len, max_len) = (topic.len(), self.limits.max_topic_length);
        if len > max_len {
            return Some(format!(
                "topic of {len} bytes exceeds mqtt.max_topic_length ({max_len})"
            ));
        }
        let (levels, max_levels) = (topic.split('/').count(), self.limits.max_topic_levels);
        if levels > max_levels {
            return Some(format!(
                "topic of {levels} levels exceeds mqtt.max_topic_levels ({max_levels})"
            ));
        }
        None
    }

    /// Check a SUBSCRIBE filter (the part after `$share/{name}/` for a
    /// shared one); `Err` is the 5.0 SUBACK reason code. The 5.0 decoder
    /// already refused malformed shared filters; 3.1.1 has no shared
    /// subscriptions in its grammar, so they are checked here.
    fn check_filter(&self, share: Option<&str>, inner: &str) -> Result<(), u8> {
        if let Some(name) = share {
            if name.is_empty() || name.contains(['+', '#']) || !mqtt::valid_filter(inner) {
                return Err(0x8F); // topic filter invalid
            }
        }
        match self.topic_too_big(inner) {
            Some(why) => {
                log::debug!("mqtt: SUBSCRIBE refused: {why}");
                Err(0x8F)
            }
            None => Ok(()),
        }
    }

    /// Whether adding the NATS filters `nfs` (of one MQTT filter, shared in
    /// `share` or not) would exceed `max_subscriptions`. Replacing an
    /// existing subscription never does; `a/#` (`a` and `a.>`) counts once.
    fn over_quota(&self, nfs: &[String], share: Option<&str>) -> bool {
        let max = self.limits.max_subscriptions;
        if max == 0 {
            return false;
        }
        let exists = nfs.iter().all(|nf| match share {
            Some(g) => self.shared.iter().any(|(sg, f, _)| sg == g && f == nf),
            None => self.filters.iter().any(|(f, _)| f == nf),
        });
        !exists && self.subscription_count() >= max
    }

    /// Subscriptions held, counting an MQTT `a/#` (`a` plus `a.>`) once.
    pub fn subscription_count(&self) -> usize {
        let count = |fs: Vec<(Option<&str>, &str)>| {
            fs.iter()
                .filter(|(g, f)| {
                    f.strip_suffix(".>")
                        .is_none_or(|parent| !fs.contains(&(*g, parent)))
                })
                .count()
        };
        count(
            self.filters
                .iter()
                .map(|(f, _)| (None, f.as_str()))
                .collect(),
        ) + count(
            self.shared
                .iter()
                .map(|(g, f, _)| (Some(g.as_str()), f.as_str()))
                .collect(),
        )
    }

    /// The will to publish now that the connection ended (taken; `None`
    /// after a normal DISCONNECT or when CONNECT had no will).
    /// Call only once the connection has ended.
    pub fn take_will(&mut self) -> Option<WillMessage> {
        self.will.take()
    }

    /// The will that an abnormal end would publish, if any.
    pub fn will(&self) -> Option<&WillMessage> {
        self.will.as_ref()
    }

    fn alloc_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.outbound.iter().any(|o| o.packet_id == id) {
                return id;
            }
        }
    }

    /// The next time [`Session::handle_timeout`] must be called.
    pub fn poll_deadline(&self) -> Option<Instant> {
        match self.state {
            State::AwaitConnect | State::Restoring => Some(self.connect_deadline),
            State::Connected => self.keep_alive.map(|ka| self.last_packet + ka + ka / 2),
            State::Closed => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.poll_deadline() {
            Some(d) if now >= d => {}
            _ => return,
        }
        if self.state == State::AwaitConnect || self.state == State::Restoring {
            self.state = State::Closed;
            self.events
                .push_back(Event::Close("no CONNECT within connect_timeout".into()));
        } else {
            self.close_with(0x8D, "keep-alive timeout".into());
        }
    }

    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes to write to the socket (moved out; the session's buffer is
    /// left empty).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
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

    /// Refuse the QoS 1/2 publish `packet_id` (announced by an
    /// [`Event::Publish`]) with MQTT 5 reason `code` instead of storing
    /// it: the shell then completes it with `publish_done(packet_id,
    /// Ok(()))`, in order, and routes and stores nothing. False on 3.1.1,
    /// which has no negative acknowledgement: the shell decides then.
    pub fn refuse_publish(&mut self, packet_id: u16, code: u8) -> bool {
        if self.version != Some(Version::V5) {
            return false;
        }
        self.denied.insert(packet_id, code);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::mqtt::{Connect, Subscribe, SubscriptionOptions};

    fn limits() -> Limits {
        Limits {
            max_packet_size: 1024,
            max_keep_alive: 60,
            connect_timeout: Duration::from_secs(5),
            max_inflight: 4,
            max_queued: 8,
            max_queued_bytes: 1 << 20,
            max_session_expiry: Duration::from_secs(3600),
            auth: None,
            max_subscriptions: 3,
            max_topic_length: 32,
            max_topic_levels: 4,
        }
    }

    fn bytes(p: &Packet, v: Version) -> Vec<u8> {
        let mut out = Vec::new();
        mqtt::encode(p, v, &mut out).unwrap();
        out
    }

    fn connect(v: Version, id: &str, clean: bool, keep_alive: u16) -> Packet {
        Packet::Connect(Connect {
            version: v,
            clean_start: clean,
            keep_alive,
            client_id: id.into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        })
    }

    fn publish(qos: QoS, id: Option<u16>, topic: &str, payload: &[u8]) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id: id,
            properties: Properties::default(),
            payload: payload.to_vec(),
        })
    }

    /// Decode everything the session wrote.
    fn sent(s: &mut Session, v: Version) -> Vec<Packet> {
        let out = s.take_output();
        let mut at = 0;
        let mut packets = Vec::new();
        while let Some((p, used)) = mqtt::decode(&out[at..], Some(v), usize::MAX).unwrap() {
            packets.push(p);
            at += used;
        }
        assert_eq!(at, out.len(), "trailing bytes in output");
        packets
    }

    /// Drain the events as the shell does when every save succeeds: each
    /// [`Event::Subscribe`] is answered with [`Session::subscribe_done`].
    fn events(s: &mut Session) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(ev) = s.poll_event() {
            if matches!(ev, Event::Subscribe(_)) {
                s.subscribe_done(true);
            }
            out.push(ev);
        }
        out
    }

    fn connected(v: Version) -> (Session, Instant) {
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        s.handle_bytes(&bytes(&connect(v, "dev-1", true, 10), v), now);
        assert!(!s.has_output(), "CONNACK waits for restore");
        assert_eq!(
            events(&mut s),
            vec![Event::Connected {
                client_id: "dev-1".into(),
                clean: true,
                expiry: Duration::ZERO,
            }]
        );
        s.restore(None);
        match &sent(&mut s, v)[..] {
            [Packet::ConnAck(c)] => {
                assert_eq!(c.code, 0);
                assert!(!c.session_present);
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
        (s, now)
    }

    #[test]
    fn qos1_acks_only_after_storage_and_in_order() {
        let v = Version::V311;
        let (mut s, now) = connected(v);
        let mut input = bytes(&publish(QoS::AtLeastOnce, Some(7), "a/b", b"one"), v);
        input.extend(bytes(&publish(QoS::AtLeastOnce, Some(8), "a/c", b"two"), v));
        // Split the input at an awkward place: decoding must resume.
        s.handle_bytes(&input[..5], now);
        s.handle_bytes(&input[5..], now);
        let ev = events(&mut s);
        assert_eq!(ev.len(), 2);
        assert!(matches!(&ev[0], Event::Publish { subject, ack: Some(7), .. } if subject == "a.b"));
        assert!(matches!(&ev[1], Event::Publish { subject, ack: Some(8), .. } if subject == "a.c"));
        assert!(
            !s.has_output(),
            "nothing may be acknowledged before storage"
        );
        assert_eq!(s.awaiting_storage(), 2);
        s.publish_done(7, Ok(()));
        s.publish_done(8, Ok(()));
        let acks: Vec<u16> = sent(&mut s, v)
            .into_iter()
            .map(|p| match p {
                Packet::PubAck(a) => a.packet_id,
                other => panic!("expected PUBACK, got {other:?}"),
            })
            .collect();
        assert_eq!(acks, vec![7, 8]);
    }

    #[test]
    fn inflight_limit_stops_reading() {
        let v = Version::V311;
        let (mut s, now) = connected(v);
        // Six publishes in one read; the limit is 4.
        let mut input = Vec::new();
        for id in 1..=6 {
            input.extend(bytes(&publish(QoS::AtLeastOnce, Some(id), "t", b"x"), v));
        }
        s.handle_bytes(&input, now);
        assert_eq!(events(&mut s).len(), 4);
        assert!(!s.wants_input());
        s.publish_done(1, Ok(()));
        // The fifth was waiting in the buffer and is decoded now.
        assert!(matches!(
            &events(&mut s)[..],
            [Event::Publish { ack: Some(5), .. }]
        ));
        assert!(!s.wants_input());
        s.publish_done(2, Ok(()));
        assert!(matches!(
            &events(&mut s)[..],
            [Event::Publish { ack: Some(6), .. }]
        ));
        s.publish_done(3, Ok(()));
        assert!(s.wants_input());
        assert!(!s.is_closed());
    }

    #[test]
    fn qos2_duplicate_is_not_routed_twice() {
        let v = Version::V311;
        let (mut s, now) = connected(v);
        let p = bytes(&publish(QoS::ExactlyOnce, Some(3), "q/2", b"once"), v);
        s.handle_bytes(&p, now);
        assert!(matches!(
            &events(&mut s)[..],
            [Event::Publish {
                qos: 2,
                ack: Some(3),
                ..
            }]
        ));
        s.publish_done(3, Ok(()));
        assert!(matches!(&sent(&mut s, v)[..], [Packet::PubRec(a)] if a.packet_id == 3));
        // The client lost our PUBREC and resends (DUP) before PUBREL.
        s.handle_bytes(&p, now);
        assert_eq!(events(&mut s), vec![Event::AckInOrder(3)]);
        s.publish_done(3, Ok(()));
        assert!(matches!(&sent(&mut s, v)[..], [Packet::PubRec(a)] if a.packet_id == 3));
        let rel = Packet::PubRel(Ack {
            packet_id: 3,
            ..Ack::default()
        });
        s.handle_bytes(&bytes(&rel, v), now);
        assert!(matches!(&sent(&mut s, v)[..], [Packet::PubComp(a)] if a.packet_id == 3));
        // After PUBREL the id is free again: a new message with it is routed.
        s.handle_bytes(&p, now);
        assert!(matches!(&events(&mut s)[..], [Event::Publish { .. }]));
    }

    #[test]
    fn garbage_closes_with_reason() {
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        s.handle_bytes(&[0xFF; 16], now);
        assert!(s.is_closed());
        assert!(matches!(&events(&mut s)[..], [Event::Close(_)]));
        // Later input is ignored.
        s.handle_bytes(
            &bytes(&connect(Version::V311, "x", true, 0), Version::V311),
            now,
        );
        assert!(events(&mut s).is_empty());
    }

    #[test]
    fn oversized_packet_closes_before_body_arrives() {
        let (mut s, now) = connected(Version::V311);
        // PUBLISH announcing a 200 MB body.
        s.handle_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0x5F], now);
        assert!(s.is_closed());
        assert!(
            matches!(&events(&mut s)[..], [Event::Close(why)] if why.contains("protocol error"))
        );
    }

    #[test]
    fn connect_timeout_and_keep_alive() {
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        assert_eq!(s.poll_deadline(), Some(now + Duration::from_secs(5)));
        s.handle_timeout(now + Duration::from_secs(4));
        assert!(!s.is_closed());
        s.handle_timeout(now + Duration::from_secs(5));
        assert!(matches!(&events(&mut s)[..], [Event::Close(why)] if why.contains("CONNECT")));

        let (mut s, now) = connected(Version::V311);
        // keep_alive 10 s: closed after 1.5 x without a packet.
        assert_eq!(s.poll_deadline(), Some(now + Duration::from_secs(15)));
        let later = now + Duration::from_secs(12);
        s.handle_bytes(&bytes(&Packet::PingReq, Version::V311), later);
        assert!(matches!(
            &sent(&mut s, Version::V311)[..],
            [Packet::PingResp]
        ));
        s.handle_timeout(now + Duration::from_secs(15));
        assert!(!s.is_closed(), "the PINGREQ moved the deadline");
        s.handle_timeout(later + Duration::from_secs(15));
        assert!(s.is_closed());
    }

    #[test]
    fn empty_client_id_rules() {
        let v = Version::V311;
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        s.handle_bytes(&bytes(&connect(v, "", false, 0), v), now);
        assert!(matches!(&sent(&mut s, v)[..], [Packet::ConnAck(c)] if c.code == 0x02));
        assert!(s.is_closed());

        let mut s = Session::new(limits(), now);
        s.handle_bytes(&bytes(&connect(v, "", true, 0), v), now);
        assert!(
            matches!(&events(&mut s)[..], [Event::Connected { client_id, .. }] if client_id.starts_with("frond-"))
        );
        s.restore(None);
        assert!(matches!(&sent(&mut s, v)[..], [Packet::ConnAck(c)] if c.code == 0));
    }

    #[test]
    fn subscribe_maps_filters_and_deliver_uses_min_qos_from_router() {
        let v = Version::V311;
        let (mut s, now) = connected(v);
        let sub = Packet::Subscribe(Subscribe {
            packet_id: 9,
            filters: vec![
                (
                    "plant/+/temp".into(),
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..SubscriptionOptions::default()
                    },
                ),
                ("alarm/#".into(), SubscriptionOptions::default()),
            ],
            properties: Properties::default(),
        });
        s.handle_bytes(&bytes(&sub, v), now);
        assert_eq!(
            events(&mut s),
            vec![Event::Subscribe(
                [("plant.*.temp", 1), ("alarm", 0), ("alarm.>", 0)]
                    .into_iter()
                    .map(|(f, qos)| SubRequest {
                        filter: f.into(),
                        qos,
                        send_retained: true,
                        share: None,
                    })
                    .collect()
            )]
        );
        assert!(matches!(&sent(&mut s, v)[..], [Packet::SubAck(a)] if a.codes == vec![1, 0]));
        s.deliver(&Delivery {
            subject: "plant.l1.temp".into(),
            payload: b"21".to_vec(),
            qos: 1,
            retain: false,
            shared: false,
            headers: None,
            reply: None,
            at: now,
        });
        match &sent(&mut s, v)[..] {
            [Packet::Publish(p)] => {
                assert_eq!(p.topic, "plant/l1/temp");
                assert_eq!(p.qos, QoS::AtLeastOnce);
                assert!(p.packet_id.is_some());
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    #[test]
    fn v5_auth_reason_codes() {
        use crate::auth::{Auth, Permissions, Secret, User};
        use std::sync::Arc;
        let v = Version::V5;
        let perms = Permissions {
            allow_publish: vec!["t.ok".into()],
            deny_subscribe: vec!["no".into()],
            ..Permissions::default()
        };
        let auth = Arc::new(Auth {
            anonymous: false,
            anonymous_permissions: Arc::new(Permissions::default()),
            users: vec![User {
                name: "u".into(),
                secret: Secret::parse("pw"),
                permissions: Arc::new(perms),
            }],
        });
        let lim = Limits {
            auth: Some(auth),
            ..limits()
        };
        let with = |user: Option<&str>, pass: &[u8]| {
            let Packet::Connect(mut c) = connect(v, "d", true, 10) else {
                unreachable!()
            };
            c.username = user.map(String::from);
            c.password = user.map(|_| pass.to_vec());
            Packet::Connect(c)
        };
        let now = Instant::now();
        for (user, pass, code) in [(Some("u"), &b"bad"[..], 0x86), (None, &b""[..], 0x87)] {
            let mut s = Session::new(lim.clone(), now);
            s.handle_bytes(&bytes(&with(user, pass), v), now);
            assert!(matches!(&sent(&mut s, v)[..], [Packet::ConnAck(c)] if c.code == code));
            assert!(s.is_closed());
        }
        let mut s = Session::new(lim, now);
        s.handle_bytes(&bytes(&with(Some("u"), b"pw"), v), now);
        events(&mut s);
        s.restore(None);
        assert!(matches!(&sent(&mut s, v)[..], [Packet::ConnAck(c)] if c.code == 0));
        s.handle_bytes(
            &bytes(&publish(QoS::AtLeastOnce, Some(1), "t/denied", b"x"), v),
            now,
        );
        s.handle_bytes(
            &bytes(&publish(QoS::AtLeastOnce, Some(2), "t/ok", b"x"), v),
            now,
        );
        let evs = events(&mut s);
        assert!(matches!(
            &evs[..],
            [Event::AckInOrder(1), Event::Publish { ack: Some(2), .. }]
        ));
        s.publish_done(1, Ok(()));
        s.publish_done(2, Ok(()));
        let acks: Vec<u8> = sent(&mut s, v)
            .iter()
            .filter_map(|p| match p {
                Packet::PubAck(a) => Some(a.code),
                _ => None,
            })
            .collect();
        assert_eq!(acks, vec![0x87, 0]);
        s.handle_bytes(
            &bytes(
                &Packet::Subscribe(Subscribe {
                    packet_id: 3,
                    filters: vec![
                        ("no".into(), SubscriptionOptions::default()),
                        ("yes".into(), SubscriptionOptions::default()),
                    ],
                    properties: Properties::default(),
                }),
                v,
            ),
            now,
        );
        assert!(matches!(&sent(&mut s, v)[..], [Packet::SubAck(a)] if a.codes == vec![0x87, 0]));
    }

    #[test]
    fn will_the_user_may_not_publish_refuses_the_connect() {
        use crate::auth::{Auth, Permissions, Secret, User};
        let perms = Permissions {
            allow_publish: vec!["a.>".into()],
            allow_subscribe: vec!["a.>".into()],
            ..Permissions::default()
        };
        let auth = Arc::new(Auth {
            anonymous: false,
            anonymous_permissions: Arc::new(Permissions::default()),
            users: vec![User {
                name: "alice".into(),
                secret: Secret::parse("pw"),
                permissions: Arc::new(perms),
            }],
        });
        let lim = Limits {
            auth: Some(auth),
            ..limits()
        };
        let with_will = |v: Version, topic: &str, response: Option<&str>| {
            let Packet::Connect(mut c) = connect(v, "d", true, 10) else {
                unreachable!()
            };
            c.username = Some("alice".into());
            c.password = Some(b"pw".to_vec());
            c.will = Some(mqtt::Will {
                topic: topic.into(),
                payload: b"gone".to_vec(),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties {
                    response_topic: response.map(String::from),
                    ..Properties::default()
                },
            });
            bytes(&Packet::Connect(c), v)
        };
        let now = Instant::now();
        for (v, topic, response, code) in [
            (Version::V5, "secret/will", None, 0x87),
            (Version::V311, "secret/will", None, 0x05),
            (Version::V5, "a/will", Some("secret/replies"), 0x87),
        ] {
            let mut s = Session::new(lim.clone(), now);
            s.handle_bytes(&with_will(v, topic, response), now);
            match &sent(&mut s, v)[..] {
                [Packet::ConnAck(c)] => {
                    assert_eq!(c.code, code, "{topic} {response:?}");
                    let why = c.properties.reason_string.as_deref();
                    assert_eq!(why.is_some(), v == Version::V5, "{why:?}");
                }
                other => panic!("expected a refusing CONNACK, got {other:?}"),
            }
            assert!(s.is_closed());
            assert!(matches!(&events(&mut s)[..], [Event::Close(_)]));
            assert!(s.take_will().is_none(), "nothing to publish");
        }
        // An allowed will is armed with its owner.
        let v = Version::V5;
        let mut s = Session::new(lim, now);
        s.handle_bytes(&with_will(v, "a/will", Some("a/replies")), now);
        assert!(matches!(&events(&mut s)[..], [Event::Connected { .. }]));
        let will = s.will().cloned().expect("armed");
        assert_eq!(will.owner, Some(Owner::User("alice".into())));
        assert_eq!(will.subject, "a.will");
        // Without [auth], no owner is recorded.
        let mut s = Session::new(limits(), now);
        s.handle_bytes(&with_will(v, "secret/will", None), now);
        assert!(matches!(&events(&mut s)[..], [Event::Connected { .. }]));
        assert_eq!(s.will().map(|w| w.owner.clone()), Some(None));
    }

    #[test]
    fn retained_messages_respect_deny_subscribe_and_dollar_topics() {
        use crate::auth::{Auth, Permissions, Secret, User};
        let auth = Arc::new(Auth {
            anonymous: false,
            anonymous_permissions: Arc::new(Permissions::default()),
            users: vec![User {
                name: "dave".into(),
                secret: Secret::parse("pw"),
                permissions: Arc::new(Permissions {
                    deny_subscribe: vec!["secret.>".into()],
                    ..Permissions::default()
                }),
            }],
        });
        let v = Version::V5;
        let now = Instant::now();
        let mut s = Session::new(
            Limits {
                auth: Some(auth),
                ..limits()
            },
            now,
        );
        let Packet::Connect(mut c) = connect(v, "d", true, 10) else {
            unreachable!()
        };
        c.username = Some("dave".into());
        c.password = Some(b"pw".to_vec());
        s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
        events(&mut s);
        s.restore(None);
        sent(&mut s, v);
        subscribe_all(&mut s, now, None);
        for subject in ["secret.x", "$SYS.x", "a.x"] {
            s.deliver_retained(&delivery(subject, 0, None, now));
        }
        let got: Vec<String> = publishes(&mut s).into_iter().map(|p| p.topic).collect();
        assert_eq!(got, vec!["a/x"], "only what dave may receive through #");
    }

    #[test]
    fn second_connect_with_an_unknown_level_is_a_protocol_error() {
        let v = Version::V5;
        let (mut s, now) = connected(v);
        // CONNECT with protocol level 9.
        let mut c = bytes(&connect(Version::V311, "x", true, 10), Version::V311);
        c[8] = 9;
        s.handle_bytes(&c, now);
        assert!(s.is_closed());
        match &sent(&mut s, v)[..] {
            [Packet::Disconnect(d)] => assert_eq!(d.code, 0x82),
            other => panic!("expected DISCONNECT 0x82, got {other:?}"),
        }
        assert!(
            matches!(&events(&mut s)[..], [Event::Close(why)] if !why.contains("encode")),
            "no encode error"
        );
    }

    #[test]
    fn v5_store_failure_is_a_negative_puback() {
        let v = Version::V5;
        let (mut s, now) = connected(v);
        s.handle_bytes(
            &bytes(&publish(QoS::AtLeastOnce, Some(1), "t", b"x"), v),
            now,
        );
        events(&mut s);
        s.publish_done(1, Err("stream full".into()));
        match &sent(&mut s, v)[..] {
            [Packet::PubAck(a)] => {
                assert_eq!(a.code, 0x80);
                assert_eq!(a.properties.reason_string.as_deref(), Some("stream full"));
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
        assert!(!s.is_closed());
    }

    #[test]
    fn v311_store_failure_closes_the_connection() {
        let v = Version::V311;
        let (mut s, now) = connected(v);
        s.handle_bytes(
            &bytes(&publish(QoS::AtLeastOnce, Some(1), "t", b"x"), v),
            now,
        );
        events(&mut s);
        s.publish_done(1, Err("disk full".into()));
        assert!(s.is_closed());
        assert!(
            !s.has_output(),
            "no PUBACK for a message that was not stored"
        );
    }

    fn persistent(v: Version, stored: Option<StoredSession>) -> (Session, Instant, bool) {
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        s.handle_bytes(&bytes(&connect(v, "dev-p", false, 10), v), now);
        match &events(&mut s)[..] {
            [Event::Connected { expiry, clean, .. }] => {
                assert!(!clean);
                assert_eq!(*expiry, Duration::from_secs(3600), "3.1.1 uses the max");
            }
            other => panic!("expected Connected, got {other:?}"),
        }
        s.restore(stored);
        let present = match &sent(&mut s, v)[..] {
            [Packet::ConnAck(c)] => c.session_present,
            other => panic!("expected CONNACK, got {other:?}"),
        };
        (s, now, present)
    }

    fn subscribe_pkt(id: u16, filter: &str, qos: QoS) -> Packet {
        Packet::Subscribe(Subscribe {
            packet_id: id,
            filters: vec![(
                filter.into(),
                SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            )],
            properties: Properties::default(),
        })
    }

    #[test]
    fn input_after_connect_waits_for_restore() {
        let v = Version::V311;
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        let mut input = bytes(&connect(v, "dev-p", false, 10), v);
        input.extend(bytes(&Packet::PingReq, v));
        s.handle_bytes(&input, now);
        assert!(matches!(&events(&mut s)[..], [Event::Connected { .. }]));
        assert!(!s.has_output());
        s.restore(None);
        // CONNACK first, then the answer to what followed CONNECT.
        assert!(matches!(
            &sent(&mut s, v)[..],
            [Packet::ConnAck(c), Packet::PingResp] if !c.session_present
        ));
    }

    #[test]
    fn stream_delivery_filters_caps_qos_and_advances_cursor_contiguously() {
        let v = Version::V311;
        let (mut s, now, present) = persistent(v, None);
        assert!(!present);
        assert!(s.is_persistent());
        let idx = s.follow("T", 10);
        assert_eq!(s.stream_next(idx), Some(11));
        s.handle_bytes(&bytes(&subscribe_pkt(1, "t/#", QoS::ExactlyOnce), v), now);
        assert!(matches!(&events(&mut s)[..], [Event::Subscribe(_)]));
        sent(&mut s, v);
        assert!(s.take_dirty());
        s.deliver_stored(idx, 11, "t.a", b"1");
        s.deliver_stored(idx, 12, "other", b"x"); // no match: skipped
        s.deliver_stored(idx, 13, "t.b", b"3");
        s.deliver_stored(idx, 13, "t.b", b"3"); // already read: ignored
        let ids: Vec<u16> = sent(&mut s, v)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => {
                    assert_eq!(p.qos, QoS::AtLeastOnce, "capped at 1");
                    assert!(!p.dup);
                    p.packet_id.unwrap()
                }
                other => panic!("expected PUBLISH, got {other:?}"),
            })
            .collect();
        assert_eq!(ids.len(), 2);
        assert_eq!(s.stream_next(idx), Some(14));
        assert_eq!(s.snapshot().cursors[0].acked, 10, "nothing acknowledged");
        assert_eq!(s.stream_room(), 2, "window 4, two in flight");
        // Acknowledge the second first: the cursor must not pass the first.
        let ack = |id| {
            bytes(
                &Packet::PubAck(Ack {
                    packet_id: id,
                    ..Ack::default()
                }),
                v,
            )
        };
        s.handle_bytes(&ack(ids[1]), now);
        assert_eq!(s.snapshot().cursors[0].acked, 10);
        s.handle_bytes(&ack(ids[0]), now);
        let snap = s.snapshot();
        assert_eq!(snap.cursors[0].acked, 13);
        assert_eq!(snap.cursors[0].sent, 13);
        assert_eq!(
            snap.subs,
            vec![
                StoredSub {
                    filter: "t".into(),
                    qos: 2,
                    share: None,
                },
                StoredSub {
                    filter: "t.>".into(),
                    qos: 2,
                    share: None,
                }
            ]
        );
        assert!(s.take_dirty());
        s.stream_skip_to(idx, 20);
        assert_eq!(s.snapshot().cursors[0].acked, 19);
    }

    #[test]
    fn restore_resumes_subscriptions_cursor_dup_and_qos2_ids() {
        let v = Version::V311;
        let stored = StoredSession {
            client_id: "dev-p".into(),
            owner: None,
            version: 4,
            subs: vec![StoredSub {
                filter: "t.*".into(),
                qos: 1,
                share: None,
            }],
            expiry_secs: 3600,
            disconnected_at: 1,
            cursors: vec![Cursor {
                stream: "T".into(),
                acked: 5,
                sent: 6,
                ..Cursor::default()
            }],
            qos2_in: vec![9],
            sub_ids: Vec::new(),
        };
        let (mut s, now, present) = persistent(v, Some(stored));
        assert!(present, "session_present");
        assert_eq!(
            events(&mut s),
            vec![Event::Subscribe(vec![SubRequest {
                filter: "t.*".into(),
                qos: 1,
                send_retained: false,
                share: None,
            }])]
        );
        let idx = s.follow("T", 100);
        assert_eq!(s.stream_next(idx), Some(6), "resume after the cursor");
        let other = s.follow("NEW", 100);
        assert_eq!(s.stream_next(other), Some(101), "a new stream: its tail");
        s.deliver_stored(idx, 6, "t.a", b"6");
        s.deliver_stored(idx, 7, "t.a", b"7");
        let dups: Vec<bool> = sent(&mut s, v)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => p.dup,
                other => panic!("expected PUBLISH, got {other:?}"),
            })
            .collect();
        assert_eq!(dups, vec![true, false], "DUP only for what was sent");
        // The publisher resends QoS 2 id 9 (DUP): not routed again.
        s.handle_bytes(
            &bytes(&publish(QoS::ExactlyOnce, Some(9), "t/x", b"q"), v),
            now,
        );
        assert_eq!(events(&mut s), vec![Event::AckInOrder(9)]);
        s.publish_done(9, Ok(()));
        let rel = Packet::PubRel(Ack {
            packet_id: 9,
            ..Ack::default()
        });
        s.handle_bytes(&bytes(&rel, v), now);
        assert!(matches!(
            &sent(&mut s, v)[..],
            [Packet::PubRec(_), Packet::PubComp(c)] if c.packet_id == 9
        ));
        assert!(s.snapshot().qos2_in.is_empty());
    }

    #[test]
    fn clean_and_v5_expiry_decide_persistence() {
        let now = Instant::now();
        // 3.1.1 clean session: not persistent, stored state ignored.
        let mut s = Session::new(limits(), now);
        let v = Version::V311;
        s.handle_bytes(&bytes(&connect(v, "c", true, 0), v), now);
        events(&mut s);
        s.restore(Some(StoredSession::default()));
        assert!(matches!(&sent(&mut s, v)[..], [Packet::ConnAck(c)] if !c.session_present));
        assert!(!s.is_persistent());
        assert!(!s.take_dirty());
        // 5.0: expiry capped by max_session_expiry and told to the client.
        let v = Version::V5;
        let mut s = Session::new(limits(), now);
        let mut c = connect(v, "c5", true, 0);
        if let Packet::Connect(c) = &mut c {
            c.properties.session_expiry_interval = Some(u32::MAX);
        }
        s.handle_bytes(&bytes(&c, v), now);
        assert!(matches!(
            &events(&mut s)[..],
            [Event::Connected { expiry, clean: true, .. }] if *expiry == Duration::from_secs(3600)
        ));
        s.restore(None);
        assert!(matches!(
            &sent(&mut s, v)[..],
            [Packet::ConnAck(c)] if c.properties.session_expiry_interval == Some(3600)
        ));
        assert!(s.is_persistent());
    }

    fn sub_opts(filters: &[(&str, QoS)], id: u16) -> Packet {
        Packet::Subscribe(Subscribe {
            packet_id: id,
            filters: filters
                .iter()
                .map(|(f, qos)| {
                    (
                        f.to_string(),
                        SubscriptionOptions {
                            qos: *qos,
                            ..SubscriptionOptions::default()
                        },
                    )
                })
                .collect(),
            properties: Properties::default(),
        })
    }

    fn suback_codes(s: &mut Session, v: Version) -> Vec<u8> {
        match &sent(s, v)[..] {
            [Packet::SubAck(a)] => a.codes.clone(),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    #[test]
    fn shared_subscriptions_both_versions() {
        // 5.0 advertises them.
        let v = Version::V5;
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        s.handle_bytes(&bytes(&connect(v, "d", true, 10), v), now);
        events(&mut s);
        s.restore(None);
        assert!(matches!(
            &sent(&mut s, v)[..],
            [Packet::ConnAck(c)] if c.properties.shared_subscription_available == Some(1)
        ));
        for v in [Version::V5, Version::V311] {
            let (mut s, now) = connected(v);
            let sub = sub_opts(
                &[("$share/g/a/#", QoS::AtLeastOnce), ("a/b", QoS::AtMostOnce)],
                1,
            );
            s.handle_bytes(&bytes(&sub, v), now);
            let req = |f: &str, qos, share: Option<&str>| SubRequest {
                filter: f.into(),
                qos,
                send_retained: share.is_none(),
                share: share.map(String::from),
            };
            assert_eq!(
                events(&mut s),
                vec![Event::Subscribe(vec![
                    req("a", 1, Some("g")),
                    req("a.>", 1, Some("g")),
                    req("a.b", 0, None),
                ])]
            );
            assert_eq!(suback_codes(&mut s, v), vec![1, 0]);
            assert_eq!(s.subscription_count(), 2);
            let stored = s.snapshot().subs;
            assert_eq!(stored.iter().filter(|x| x.share.is_some()).count(), 2);
            // A shared delivery of a `$` topic is not refused by the
            // non-wildcard check, and arrives at the router's QoS.
            s.deliver(&Delivery {
                subject: "a.c".into(),
                payload: b"x".to_vec(),
                qos: 1,
                retain: false,
                shared: true,
                headers: None,
                reply: None,
                at: now,
            });
            assert!(
                matches!(&sent(&mut s, v)[..], [Packet::Publish(p)] if p.qos == QoS::AtLeastOnce)
            );
            let unsub = Packet::Unsubscribe(mqtt::Unsubscribe {
                packet_id: 2,
                filters: vec!["$share/g/a/#".into()],
                properties: Properties::default(),
            });
            s.handle_bytes(&bytes(&unsub, v), now);
            assert_eq!(
                events(&mut s),
                vec![
                    Event::UnsubscribeShared(vec![
                        ("g".into(), "a".into()),
                        ("g".into(), "a.>".into())
                    ]),
                    Event::Unsubscribe(vec![])
                ]
            );
            assert_eq!(s.subscription_count(), 1);
        }
        // 3.1.1 has no grammar for them: checked by the session.
        let v = Version::V311;
        let (mut s, now) = connected(v);
        let sub = sub_opts(
            &[
                ("$share/g", QoS::AtMostOnce),
                ("$share//a", QoS::AtMostOnce),
            ],
            1,
        );
        s.handle_bytes(&bytes(&sub, v), now);
        assert_eq!(suback_codes(&mut s, v), vec![0x80, 0x80]);
        assert_eq!(events(&mut s), vec![Event::Subscribe(vec![])]);
    }

    #[test]
    fn persistent_shared_subscription_is_live_only_and_restored() {
        let v = Version::V311;
        let (mut s, now, _) = persistent(v, None);
        let idx = s.follow("T", 0);
        s.handle_bytes(
            &bytes(&subscribe_pkt(1, "$share/g/t/x", QoS::AtLeastOnce), v),
            now,
        );
        events(&mut s);
        sent(&mut s, v);
        s.deliver_stored(idx, 1, "t.x", b"from the stream");
        assert!(
            !s.has_output(),
            "shared subscriptions are not served from cursors"
        );
        let snap = s.snapshot();
        let (s2, _, present) = persistent(v, Some(snap));
        assert!(present);
        assert_eq!(s2.shared, vec![("g".into(), "t.x".into(), 1)]);
        assert!(s2.filters.is_empty());
    }

    #[test]
    fn subscription_quota_and_topic_limits() {
        for v in [Version::V5, Version::V311] {
            let (mut s, now) = connected(v);
            let quota = if v == Version::V5 { 0x97 } else { 0x80 };
            let invalid = if v == Version::V5 { 0x8F } else { 0x80 };
            let q0 = QoS::AtMostOnce;
            // `a/#` counts once: three fit.
            s.handle_bytes(
                &bytes(&sub_opts(&[("a/#", q0), ("b", q0), ("c", q0)], 1), v),
                now,
            );
            assert_eq!(suback_codes(&mut s, v), vec![0, 0, 0]);
            let sub = sub_opts(&[("d", q0), ("b", QoS::AtLeastOnce), ("$share/g/e", q0)], 2);
            s.handle_bytes(&bytes(&sub, v), now);
            assert_eq!(
                suback_codes(&mut s, v),
                vec![quota, 1, quota],
                "replacing is fine"
            );
            s.handle_bytes(&bytes(&sub_opts(&[("x/x/x/x/x", q0)], 3), v), now);
            assert_eq!(suback_codes(&mut s, v), vec![invalid], "5 levels");
            let long = "l".repeat(33);
            s.handle_bytes(&bytes(&sub_opts(&[(long.as_str(), q0)], 4), v), now);
            assert_eq!(suback_codes(&mut s, v), vec![invalid], "33 bytes");
            assert_eq!(s.subscription_count(), 3);
            events(&mut s);
            // PUBLISH over the limits.
            let p = publish(QoS::AtLeastOnce, Some(5), "p/p/p/p/p", b"x");
            s.handle_bytes(&bytes(&p, v), now);
            if v == Version::V5 {
                assert_eq!(events(&mut s), vec![Event::AckInOrder(5)]);
                s.publish_done(5, Ok(()));
                assert!(matches!(&sent(&mut s, v)[..], [Packet::PubAck(a)] if a.code == 0x90));
                let p = publish(QoS::AtMostOnce, None, &long, b"x");
                s.handle_bytes(&bytes(&p, v), now);
                assert!(matches!(&sent(&mut s, v)[..], [Packet::Disconnect(d)] if d.code == 0x90));
            }
            assert!(s.is_closed());
        }
    }

    #[test]
    fn connect_timeout_is_a_deadline_for_the_whole_connect() {
        let v = Version::V311;
        let start = Instant::now();
        let mut s = Session::new(limits(), start);
        let connect = bytes(&connect(v, "slow", true, 10), v);
        // One byte a second: every byte is "activity", none moves the
        // deadline (5 s from the start).
        for (i, b) in connect.iter().take(connect.len() - 1).enumerate() {
            let t = start + Duration::from_secs(i as u64);
            s.handle_timeout(t);
            s.handle_bytes(&[*b], t);
            if s.is_closed() {
                break;
            }
        }
        assert!(connect.len() > 6);
        assert!(s.is_closed(), "closed at the deadline, not reset per byte");
        assert!(
            matches!(&events(&mut s)[..], [Event::Close(why)] if why.contains("connect_timeout"))
        );
    }
    fn connected_v5(props: Properties) -> (Session, Instant) {
        let v = Version::V5;
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        let Packet::Connect(mut c) = connect(v, "dev-5", true, 10) else {
            unreachable!()
        };
        c.properties = props;
        s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
        events(&mut s);
        s.restore(None);
        match &sent(&mut s, v)[..] {
            [Packet::ConnAck(c)] => {
                assert_eq!(c.properties.topic_alias_maximum, Some(TOPIC_ALIAS_MAX));
                assert_eq!(c.properties.receive_maximum, Some(4));
                assert_eq!(c.properties.subscription_identifier_available, None);
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
        (s, now)
    }

    fn delivery(subject: &str, qos: u8, headers: Option<Vec<u8>>, at: Instant) -> Delivery {
        Delivery {
            subject: subject.into(),
            payload: b"p".to_vec(),
            qos,
            retain: false,
            shared: false,
            headers,
            reply: None,
            at,
        }
    }

    fn publishes(s: &mut Session) -> Vec<Publish> {
        sent(s, Version::V5)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => p,
                other => panic!("expected PUBLISH, got {other:?}"),
            })
            .collect()
    }

    fn subscribe_all(s: &mut Session, now: Instant, id: Option<u32>) {
        let Packet::Subscribe(mut sub) = subscribe_pkt(1, "#", QoS::AtLeastOnce) else {
            unreachable!()
        };
        sub.properties.subscription_identifiers = id.into_iter().collect();
        s.handle_bytes(&bytes(&Packet::Subscribe(sub), Version::V5), now);
        events(s);
        sent(s, Version::V5);
    }

    fn aliased(qos: QoS, id: Option<u16>, topic: &str, alias: u16) -> Packet {
        let Packet::Publish(mut p) = publish(qos, id, topic, b"x") else {
            unreachable!()
        };
        p.properties.topic_alias = Some(alias);
        Packet::Publish(p)
    }

    #[test]
    fn v5_inbound_topic_alias_set_reused_and_refused() {
        let v = Version::V5;
        let (mut s, now) = connected_v5(Properties::default());
        s.handle_bytes(&bytes(&aliased(QoS::AtMostOnce, None, "a/b", 3), v), now);
        s.handle_bytes(&bytes(&aliased(QoS::AtMostOnce, None, "", 3), v), now);
        let subjects: Vec<String> = events(&mut s)
            .into_iter()
            .map(|e| match e {
                Event::Publish { subject, props, .. } => {
                    assert!(props.is_none(), "the alias is not carried");
                    subject
                }
                other => panic!("expected Publish, got {other:?}"),
            })
            .collect();
        assert_eq!(subjects, vec!["a.b", "a.b"]);
        // Unknown alias: protocol error.
        s.handle_bytes(&bytes(&aliased(QoS::AtMostOnce, None, "", 4), v), now);
        assert!(s.is_closed());
        assert!(matches!(&sent(&mut s, v)[..], [Packet::Disconnect(d)] if d.code == 0x82));
        // Above the maximum: 0x94.
        let (mut s, now) = connected_v5(Properties::default());
        s.handle_bytes(
            &bytes(&aliased(QoS::AtMostOnce, None, "t", TOPIC_ALIAS_MAX + 1), v),
            now,
        );
        assert!(matches!(&sent(&mut s, v)[..], [Packet::Disconnect(d)] if d.code == 0x94));
    }

    #[test]
    fn v5_outbound_topic_aliases_up_to_the_client_maximum() {
        let (mut s, now) = connected_v5(Properties {
            topic_alias_maximum: Some(1),
            ..Properties::default()
        });
        subscribe_all(&mut s, now, None);
        for subject in ["a.b", "a.b", "c", "a.b"] {
            s.deliver(&delivery(subject, 0, None, now));
        }
        let got: Vec<(String, Option<u16>)> = publishes(&mut s)
            .into_iter()
            .map(|p| (p.topic, p.properties.topic_alias))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a/b".into(), Some(1)),
                (String::new(), Some(1)),
                ("c".into(), None),
                (String::new(), Some(1)),
            ]
        );
    }

    #[test]
    fn v5_receive_maximum_queues_outbound_and_expiry_drops_queued() {
        let v = Version::V5;
        let (mut s, now) = connected_v5(Properties {
            receive_maximum: Some(2),
            ..Properties::default()
        });
        subscribe_all(&mut s, now, None);
        let expiring = bridge::props_to_headers(&Properties {
            message_expiry_interval: Some(5),
            ..Properties::default()
        });
        s.deliver(&delivery("a", 1, None, now));
        s.deliver(&delivery("b", 1, None, now));
        s.deliver(&delivery("c", 1, expiring.clone(), now));
        s.deliver(&delivery("d", 1, expiring, now));
        s.deliver(&delivery("e", 1, None, now));
        let first = publishes(&mut s);
        assert_eq!(first.len(), 2, "window of 2");
        assert_eq!(s.stream_room(), 0);
        // One acknowledged 2 s later: "c" goes out with 3 s left.
        let ack = |id| {
            bytes(
                &Packet::PubAck(Ack {
                    packet_id: id,
                    ..Ack::default()
                }),
                v,
            )
        };
        let t2 = now + Duration::from_secs(2);
        s.handle_bytes(&ack(first[0].packet_id.unwrap()), t2);
        match &publishes(&mut s)[..] {
            [p] => {
                assert_eq!(p.topic, "c");
                assert_eq!(p.properties.message_expiry_interval, Some(3));
            }
            other => panic!("expected one PUBLISH, got {other:?}"),
        }
        // The next acknowledgement comes after "d" expired: "e" is next.
        s.handle_bytes(
            &ack(first[1].packet_id.unwrap()),
            now + Duration::from_secs(6),
        );
        let next = publishes(&mut s);
        assert_eq!(
            next.iter().map(|p| p.topic.as_str()).collect::<Vec<_>>(),
            vec!["e"]
        );
        assert_eq!(s.expired, 1);
    }

    #[test]
    fn queued_deliveries_are_bounded_in_bytes_too() {
        let (mut s, now) = connected_v5(Properties {
            receive_maximum: Some(1),
            ..Properties::default()
        });
        subscribe_all(&mut s, now, None);
        let big = |subject: &str| Delivery {
            payload: vec![7u8; 300_000],
            ..delivery(subject, 1, None, now)
        };
        // One in flight; then the queue takes one of any size, and more
        // while under max_queued_bytes (1 MiB in these limits).
        for t in ["a", "b", "c", "d", "e", "f"] {
            s.deliver(&big(t));
        }
        assert_eq!(publishes(&mut s).len(), 1);
        assert_eq!(s.queued_len(), 3, "3 x 300 kB fit in 1 MiB, a fourth not");
        assert_eq!(s.dropped, 2);
        assert_eq!(s.queued_bytes(), 3 * big("x").cost());
        // QoS 0 is never queued.
        s.deliver(&delivery("z", 0, None, now));
        assert_eq!(publishes(&mut s).len(), 1);
        // An empty queue takes a message larger than the limit.
        let mut s2 = connected_v5(Properties {
            receive_maximum: Some(1),
            ..Properties::default()
        })
        .0;
        subscribe_all(&mut s2, now, None);
        s2.deliver(&big("a"));
        s2.deliver(&Delivery {
            payload: vec![1u8; 2 << 20],
            ..delivery("b", 1, None, now)
        });
        assert_eq!((s2.queued_len(), s2.dropped), (1, 0));
    }

    #[test]
    fn refused_publish_gets_its_reason_code_in_5_only() {
        let v = Version::V5;
        let (mut s, now) = connected_v5(Properties::default());
        s.handle_bytes(
            &bytes(&publish(QoS::AtLeastOnce, Some(3), "r", b"x"), v),
            now,
        );
        assert!(matches!(
            &events(&mut s)[..],
            [Event::Publish { ack: Some(3), .. }]
        ));
        assert!(s.refuse_publish(3, 0x97));
        s.publish_done(3, Ok(()));
        match &sent(&mut s, v)[..] {
            [Packet::PubAck(a)] => assert_eq!((a.packet_id, a.code), (3, 0x97)),
            other => panic!("expected PUBACK 0x97, got {other:?}"),
        }
        let (mut s, _) = connected(Version::V311);
        assert!(!s.refuse_publish(3, 0x97), "3.1.1 has no negative ack");
    }

    #[test]
    fn v5_receive_maximum_exceeded_by_client_is_0x93() {
        let v = Version::V5;
        let (mut s, now) = connected_v5(Properties::default());
        let mut input = Vec::new();
        for id in 1..=5 {
            input.extend(bytes(&publish(QoS::AtLeastOnce, Some(id), "t", b"x"), v));
        }
        s.handle_bytes(&input, now);
        assert!(s.is_closed());
        assert!(matches!(&sent(&mut s, v)[..], [Packet::Disconnect(d)] if d.code == 0x93));
    }

    #[test]
    fn v5_max_packet_size_drops_only_that_message() {
        let (mut s, now) = connected_v5(Properties {
            maximum_packet_size: Some(64),
            topic_alias_maximum: Some(4),
            ..Properties::default()
        });
        subscribe_all(&mut s, now, None);
        let mut big = delivery("big", 1, None, now);
        big.payload = vec![0; 100];
        s.deliver(&big);
        s.deliver(&delivery("big", 1, None, now));
        let got = publishes(&mut s);
        assert_eq!(s.oversize_dropped, 1);
        assert_eq!(got.len(), 1);
        // The dropped packet did not set the alias: the next one does.
        assert_eq!(got[0].topic, "big");
        assert_eq!(s.stream_room(), 3, "only the sent one is in flight");
    }

    #[test]
    fn v5_subscription_identifiers_and_properties_reach_subscribers() {
        let v = Version::V5;
        let (mut s, now) = connected_v5(Properties::default());
        subscribe_all(&mut s, now, Some(42));
        s.handle_bytes(
            &bytes(
                &Packet::Subscribe(Subscribe {
                    packet_id: 2,
                    filters: vec![("a/+".into(), SubscriptionOptions::default())],
                    properties: Properties {
                        subscription_identifiers: vec![7],
                        ..Properties::default()
                    },
                }),
                v,
            ),
            now,
        );
        events(&mut s);
        sent(&mut s, v);
        let headers = bridge::props_to_headers(&Properties {
            user_properties: vec![("k".into(), "v".into())],
            content_type: Some("text/plain".into()),
            ..Properties::default()
        });
        let mut d = delivery("a.b", 0, headers, now);
        d.reply = Some("svc.reply".into());
        s.deliver(&d);
        s.deliver(&delivery("x", 0, None, now));
        let got = publishes(&mut s);
        assert_eq!(got[0].properties.subscription_identifiers, vec![7, 42]);
        assert_eq!(
            got[0].properties.user_properties,
            vec![("k".to_string(), "v".to_string())]
        );
        assert_eq!(
            got[0].properties.content_type.as_deref(),
            Some("text/plain")
        );
        assert_eq!(
            got[0].properties.response_topic.as_deref(),
            Some("svc/reply")
        );
        assert_eq!(got[1].properties.subscription_identifiers, vec![42]);
        assert_eq!(s.snapshot().sub_ids.len(), 2, "> and a.*");
    }

    #[test]
    fn v5_subscription_identifiers_survive_in_stored_sessions() {
        let v = Version::V5;
        let now = Instant::now();
        let stored = StoredSession {
            client_id: "sid".into(),
            version: 5,
            subs: vec![StoredSub {
                filter: "a.*".into(),
                qos: 0,
                share: None,
            }],
            expiry_secs: 60,
            sub_ids: vec![("a.*".into(), 11)],
            ..StoredSession::default()
        };
        let mut s = Session::new(limits(), now);
        let Packet::Connect(mut c) = connect(v, "sid", false, 10) else {
            unreachable!()
        };
        c.properties.session_expiry_interval = Some(60);
        s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
        events(&mut s);
        s.restore(Some(stored));
        events(&mut s);
        sent(&mut s, v);
        s.deliver(&delivery("a.b", 0, None, now));
        assert_eq!(
            publishes(&mut s)[0].properties.subscription_identifiers,
            vec![11]
        );
        assert_eq!(s.snapshot().sub_ids, vec![("a.*".to_string(), 11)]);
    }

    #[test]
    fn v5_response_information_when_requested() {
        let v = Version::V5;
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        let Packet::Connect(mut c) = connect(v, "a/b+", true, 10) else {
            unreachable!()
        };
        c.properties.request_response_information = Some(1);
        s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
        events(&mut s);
        s.restore(None);
        assert!(matches!(
            &sent(&mut s, v)[..],
            [Packet::ConnAck(c)]
                if c.properties.response_information.as_deref() == Some("frond/response/a_b_")
        ));
    }

    #[test]
    fn v5_request_problem_information_zero_hides_reason_strings() {
        let v = Version::V5;
        let (mut s, now) = connected_v5(Properties {
            request_problem_information: Some(0),
            request_response_information: Some(1),
            ..Properties::default()
        });
        s.handle_bytes(
            &bytes(&publish(QoS::AtLeastOnce, Some(1), "t", b"x"), v),
            now,
        );
        events(&mut s);
        s.publish_done(1, Err("stream full".into()));
        assert!(matches!(
            &sent(&mut s, v)[..],
            [Packet::PubAck(a)] if a.code == 0x80 && a.properties.reason_string.is_none()
        ));
    }

    #[test]
    fn v5_stored_message_expiry_uses_its_age() {
        let v = Version::V5;
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        let Packet::Connect(mut c) = connect(v, "p5", false, 10) else {
            unreachable!()
        };
        c.properties.session_expiry_interval = Some(60);
        s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
        events(&mut s);
        s.restore(None);
        sent(&mut s, v);
        let idx = s.follow("T", 0);
        subscribe_all(&mut s, now, None);
        let h = bridge::props_to_headers(&Properties {
            message_expiry_interval: Some(10),
            ..Properties::default()
        });
        s.deliver_stored_msg(idx, 1, "t", h.as_deref(), b"old", Duration::from_secs(11));
        s.deliver_stored_msg(idx, 2, "t", h.as_deref(), b"new", Duration::from_secs(4));
        match &publishes(&mut s)[..] {
            [p] => {
                assert_eq!(p.payload, b"new");
                assert_eq!(p.properties.message_expiry_interval, Some(6));
            }
            other => panic!("expected one PUBLISH, got {other:?}"),
        }
        assert_eq!(s.expired, 1);
        assert_eq!(s.stream_next(idx), Some(3));
    }

    fn ack_pkt(kind: fn(Ack) -> Packet, id: u16) -> Vec<u8> {
        bytes(
            &kind(Ack {
                packet_id: id,
                ..Ack::default()
            }),
            Version::V311,
        )
    }

    fn qos2_header() -> Option<Vec<u8>> {
        bridge::stored_headers(None, 2)
    }

    /// Publishes sent, as (packet id, QoS, DUP, payload).
    fn sent_publishes(s: &mut Session) -> Vec<(u16, QoS, bool, Vec<u8>)> {
        sent(s, Version::V311)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => (p.packet_id.unwrap_or(0), p.qos, p.dup, p.payload),
                other => panic!("expected PUBLISH, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn stored_qos2_is_min_of_publisher_and_subscription_and_synced() {
        let v = Version::V311;
        let (mut s, now, _) = persistent(v, None);
        let idx = s.follow("T", 0);
        s.handle_bytes(&bytes(&subscribe_pkt(1, "q2/#", QoS::ExactlyOnce), v), now);
        s.handle_bytes(&bytes(&subscribe_pkt(2, "q1/#", QoS::AtLeastOnce), v), now);
        events(&mut s);
        sent(&mut s, v);
        assert!(!s.take_sync(), "SUBSCRIBE needs no sync");
        let h = qos2_header();
        s.deliver_stored_msg(idx, 1, "q2.a", h.as_deref(), b"1", Duration::ZERO);
        s.deliver_stored_msg(idx, 2, "q1.a", h.as_deref(), b"2", Duration::ZERO);
        s.deliver_stored_msg(idx, 3, "q2.a", None, b"3", Duration::ZERO);
        let got = sent_publishes(&mut s);
        let qos: Vec<QoS> = got.iter().map(|p| p.1).collect();
        assert_eq!(
            qos,
            vec![QoS::ExactlyOnce, QoS::AtLeastOnce, QoS::AtLeastOnce],
            "QoS 2 only when publisher and subscription are 2"
        );
        assert!(s.take_sync(), "a QoS 2 PUBLISH waits for its state on disk");
        assert!(!s.take_sync(), "once");
        let id1 = got[0].0;
        assert_eq!(s.snapshot().cursors[0].qos2, vec![(1, id1, false)]);
        // PUBACK for the QoS 1 ones: no sync needed.
        s.handle_bytes(&ack_pkt(Packet::PubAck, got[1].0), now);
        s.handle_bytes(&ack_pkt(Packet::PubAck, got[2].0), now);
        assert!(!s.take_sync());
        assert_eq!(s.snapshot().cursors[0].acked, 0, "message 1 is in flight");
        // PUBREC: PUBREL, recorded first.
        s.handle_bytes(&ack_pkt(Packet::PubRec, id1), now);
        assert!(matches!(&sent(&mut s, v)[..], [Packet::PubRel(a)] if a.packet_id == id1));
        assert!(s.take_sync());
        assert_eq!(s.snapshot().cursors[0].qos2, vec![(1, id1, true)]);
        // PUBCOMP: done; lazily written.
        s.handle_bytes(&ack_pkt(Packet::PubComp, id1), now);
        assert!(!s.take_sync());
        assert!(s.take_dirty());
        let c = &s.snapshot().cursors[0];
        assert_eq!((c.acked, c.qos2.len(), c.done.len()), (3, 0, 0));
        // A stored QoS 0 publish goes out at QoS 0 to a QoS 2 subscription,
        // and the cursor passes it without an acknowledgement.
        let h0 = bridge::stored_headers(None, 0);
        s.deliver_stored_msg(idx, 4, "q2.b", h0.as_deref(), b"4", Duration::ZERO);
        let got = sent_publishes(&mut s);
        assert_eq!(
            got.iter().map(|p| p.1).collect::<Vec<_>>(),
            vec![QoS::AtMostOnce]
        );
        assert_eq!(s.snapshot().cursors[0].acked, 4);
    }

    #[test]
    fn completed_qos2_above_the_cursor_is_remembered() {
        let v = Version::V311;
        let (mut s, now, _) = persistent(v, None);
        let idx = s.follow("T", 0);
        s.handle_bytes(&bytes(&subscribe_pkt(1, "q/#", QoS::ExactlyOnce), v), now);
        events(&mut s);
        sent(&mut s, v);
        let h = qos2_header();
        for seq in 1..=3 {
            s.deliver_stored_msg(idx, seq, "q.a", h.as_deref(), b"x", Duration::ZERO);
        }
        let ids: Vec<u16> = sent_publishes(&mut s).iter().map(|p| p.0).collect();
        // The third completes first; the first is still unanswered.
        s.handle_bytes(&ack_pkt(Packet::PubRec, ids[2]), now);
        s.handle_bytes(&ack_pkt(Packet::PubComp, ids[2]), now);
        s.handle_bytes(&ack_pkt(Packet::PubRec, ids[1]), now);
        let c = s.snapshot().cursors[0].clone();
        assert_eq!(c.acked, 0);
        assert_eq!(c.done, vec![3]);
        assert_eq!(c.qos2, vec![(1, ids[0], false), (2, ids[1], true)]);
        s.handle_bytes(&ack_pkt(Packet::PubRec, ids[0]), now);
        s.handle_bytes(&ack_pkt(Packet::PubComp, ids[0]), now);
        s.handle_bytes(&ack_pkt(Packet::PubComp, ids[1]), now);
        let c = s.snapshot().cursors[0].clone();
        assert_eq!((c.acked, c.done, c.qos2), (3, vec![], vec![]));
    }

    /// A stored 3.1.1 session of `dev-p` subscribed to `q.>` at QoS 2,
    /// with one stream cursor.
    fn qos2_session(cursor: Cursor) -> StoredSession {
        StoredSession {
            client_id: "dev-p".into(),
            owner: None,
            version: 4,
            subs: vec![StoredSub {
                filter: "q.>".into(),
                qos: 2,
                share: None,
            }],
            expiry_secs: 3600,
            disconnected_at: 1,
            cursors: vec![cursor],
            qos2_in: Vec::new(),
            sub_ids: Vec::new(),
        }
    }

    #[test]
    fn restored_qos2_gets_pubrel_or_dup_resend_with_its_id_never_twice() {
        let v = Version::V311;
        let stored = qos2_session(Cursor {
            stream: "T".into(),
            acked: 5,
            sent: 8,
            qos2: vec![(6, 30, true), (7, 31, false), (9, 32, false)],
            done: vec![8],
        });
        let (mut s, now, present) = persistent(v, Some(stored));
        assert!(present);
        events(&mut s);
        let idx = s.follow("T", 100);
        // PUBREL for the one the client PUBREC'd, at once.
        assert!(matches!(&sent(&mut s, v)[..], [Packet::PubRel(a)] if a.packet_id == 30));
        assert_eq!(s.stream_next(idx), Some(6));
        assert_eq!(s.stream_room(), 3, "window 4, the PUBREL'd one in flight");
        let h = qos2_header();
        for seq in 6..=10 {
            s.deliver_stored_msg(idx, seq, "q.a", h.as_deref(), &[seq as u8], Duration::ZERO);
        }
        let got = sent_publishes(&mut s);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!((got[0].0, got[0].2, got[0].3.clone()), (31, true, vec![7]));
        assert_eq!((got[1].0, got[1].2, got[1].3.clone()), (32, true, vec![9]));
        assert!(
            ![30, 31, 32].contains(&got[2].0),
            "a new id for a new message"
        );
        assert_eq!((got[2].2, got[2].3.clone()), (false, vec![10]));
        assert!(s.take_sync(), "the new message's id is recorded first");
        // Completing them moves the cursor over the done one.
        s.handle_bytes(&ack_pkt(Packet::PubComp, 30), now);
        for id in [31, 32, got[2].0] {
            s.handle_bytes(&ack_pkt(Packet::PubRec, id), now);
            s.handle_bytes(&ack_pkt(Packet::PubComp, id), now);
        }
        let c = s.snapshot().cursors[0].clone();
        assert_eq!((c.acked, c.done, c.qos2), (10, vec![], vec![]));
    }

    #[test]
    fn restored_qos2_gone_from_the_stream_is_released() {
        let v = Version::V311;
        let stored = qos2_session(Cursor {
            stream: "T".into(),
            acked: 5,
            sent: 7,
            qos2: vec![(6, 40, false), (7, 41, false)],
            done: Vec::new(),
        });
        let (mut s, now, _) = persistent(v, Some(stored));
        events(&mut s);
        let idx = s.follow("T", 100);
        assert!(sent(&mut s, v).is_empty());
        // Limits removed 6; 7 is read.
        let h = qos2_header();
        s.deliver_stored_msg(idx, 7, "q.a", h.as_deref(), b"7", Duration::ZERO);
        match &sent(&mut s, v)[..] {
            [Packet::PubRel(r), Packet::Publish(p)] => {
                assert_eq!(r.packet_id, 40);
                assert_eq!((p.packet_id, p.dup), (Some(41), true));
            }
            other => panic!("expected PUBREL 40 and PUBLISH 41, got {other:?}"),
        }
        assert!(s.take_sync());
        s.handle_bytes(&ack_pkt(Packet::PubComp, 40), now);
        assert_eq!(s.snapshot().cursors[0].acked, 6);
    }

    #[test]
    fn restored_qos2_before_a_completed_one_is_released_when_gone() {
        let v = Version::V311;
        let stored = qos2_session(Cursor {
            stream: "T".into(),
            acked: 5,
            sent: 8,
            qos2: vec![(6, 40, false), (7, 41, false)],
            done: vec![8],
        });
        let (mut s, _, _) = persistent(v, Some(stored));
        events(&mut s);
        let idx = s.follow("T", 100);
        // 6 and 7 were removed; 8 (completed) is the first read.
        let h = qos2_header();
        s.deliver_stored_msg(idx, 8, "q.a", h.as_deref(), b"8", Duration::ZERO);
        let rels: Vec<u16> = sent(&mut s, v)
            .into_iter()
            .map(|p| match p {
                Packet::PubRel(a) => a.packet_id,
                other => panic!("expected PUBREL, got {other:?}"),
            })
            .collect();
        assert_eq!(rels, vec![40, 41]);
    }

    #[test]
    fn inbound_qos2_id_and_its_removal_are_synced_qos1_never() {
        let v = Version::V311;
        let (mut s, now, _) = persistent(v, None);
        s.handle_bytes(
            &bytes(&publish(QoS::AtLeastOnce, Some(1), "a", b"1"), v),
            now,
        );
        events(&mut s);
        s.publish_done(1, Ok(()));
        assert!(!s.take_sync(), "QoS 1 costs no session write");
        s.handle_bytes(
            &bytes(&publish(QoS::ExactlyOnce, Some(2), "a", b"2"), v),
            now,
        );
        events(&mut s);
        s.publish_done(2, Ok(()));
        assert!(s.take_sync(), "the id is durable before the PUBREC");
        assert_eq!(s.snapshot().qos2_in, vec![2]);
        s.handle_bytes(&ack_pkt(Packet::PubRel, 2), now);
        assert!(s.take_sync(), "and its removal before the PUBCOMP");
        s.handle_bytes(&ack_pkt(Packet::PubRel, 2), now);
        assert!(!s.take_sync(), "an unknown id changes nothing");
        assert!(matches!(
            &sent(&mut s, v)[..],
            [
                Packet::PubAck(_),
                Packet::PubRec(_),
                Packet::PubComp(_),
                Packet::PubComp(_)
            ]
        ));
    }

    fn v5_session(expiry: u32) -> (Session, Instant) {
        let v = Version::V5;
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        let Packet::Connect(mut c) = connect(v, "dev-x", false, 10) else {
            unreachable!()
        };
        c.properties.session_expiry_interval = Some(expiry);
        c.will = Some(mqtt::Will {
            topic: "w".into(),
            payload: b"gone".to_vec(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        });
        s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
        events(&mut s);
        s.restore(None);
        sent(&mut s, v);
        (s, now)
    }

    fn disconnect_pkt(expiry: Option<u32>) -> Vec<u8> {
        bytes(
            &Packet::Disconnect(Disconnect {
                code: 0,
                properties: Properties {
                    session_expiry_interval: expiry,
                    ..Properties::default()
                },
            }),
            Version::V5,
        )
    }

    #[test]
    fn v5_disconnect_changes_the_session_expiry() {
        // 3600 -> 0: no longer persistent, the stored state goes.
        let (mut s, now) = v5_session(3600);
        assert!(s.is_persistent() && !s.discard_stored());
        s.handle_bytes(&disconnect_pkt(Some(0)), now);
        assert!(!s.is_persistent());
        assert!(s.discard_stored());
        assert!(
            s.take_will().is_none(),
            "a normal DISCONNECT drops the will"
        );
        // 3600 -> 60 (and above the maximum: capped).
        let (mut s, now) = v5_session(3600);
        s.handle_bytes(&disconnect_pkt(Some(60)), now);
        assert_eq!(s.snapshot().expiry_secs, 60);
        assert!(!s.discard_stored());
        let (mut s, now) = v5_session(60);
        s.handle_bytes(&disconnect_pkt(Some(u32::MAX)), now);
        assert_eq!(s.snapshot().expiry_secs, 3600);
        // Absent: unchanged.
        let (mut s, now) = v5_session(60);
        s.handle_bytes(&disconnect_pkt(None), now);
        assert_eq!(s.snapshot().expiry_secs, 60);
    }

    #[test]
    fn v5_disconnect_setting_an_expiry_after_connect_zero_is_a_protocol_error() {
        let (mut s, now) = v5_session(0);
        s.handle_bytes(&disconnect_pkt(Some(10)), now);
        match &sent(&mut s, Version::V5)[..] {
            [Packet::Disconnect(d)] => assert_eq!(d.code, 0x82),
            other => panic!("expected DISCONNECT 0x82, got {other:?}"),
        }
        assert!(s.is_closed());
        assert!(!s.is_persistent() && !s.discard_stored());
        assert!(
            s.take_will().is_some(),
            "not a valid DISCONNECT: the will stays"
        );
        // Setting 0 again is fine.
        let (mut s, now) = v5_session(0);
        s.handle_bytes(&disconnect_pkt(Some(0)), now);
        assert!(s.is_closed() && s.take_will().is_none());
    }

    // Issue 10: sessions belong to a user, stored deliveries pass the
    // permission check, and nothing unsaved is acknowledged.

    /// Users `alice` (subscribe `a.pub.>` only) and `dave` (deny subscribe
    /// `secret.>`), password `pw`.
    fn cast() -> Limits {
        use crate::auth::{Auth, Secret, User};
        let user = |name: &str, p: Permissions| User {
            name: name.into(),
            secret: Secret::parse("pw"),
            permissions: Arc::new(p),
        };
        let auth = Auth {
            anonymous: false,
            anonymous_permissions: Arc::new(Permissions::default()),
            users: vec![
                user(
                    "alice",
                    Permissions {
                        allow_subscribe: vec!["a.pub.>".into()],
                        ..Permissions::default()
                    },
                ),
                user(
                    "dave",
                    Permissions {
                        deny_subscribe: vec!["secret.>".into()],
                        ..Permissions::default()
                    },
                ),
            ],
        };
        Limits {
            auth: Some(Arc::new(auth)),
            ..limits()
        }
    }

    /// A persistent session of `user` (of [`cast`]), restored from
    /// `stored`: (session, now, session present).
    fn session_as(
        v: Version,
        user: &str,
        stored: Option<StoredSession>,
    ) -> (Session, Instant, bool) {
        let now = Instant::now();
        let mut s = Session::new(cast(), now);
        let Packet::Connect(mut c) = connect(v, "dev-p", false, 10) else {
            unreachable!()
        };
        c.username = Some(user.into());
        c.password = Some(b"pw".to_vec());
        if v == Version::V5 {
            c.properties.session_expiry_interval = Some(3600);
        }
        s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
        assert!(matches!(&events(&mut s)[..], [Event::Connected { .. }]));
        assert_eq!(s.owner(), Some(&Owner::User(user.into())));
        s.restore(stored);
        let present = match &sent(&mut s, v)[..] {
            [Packet::ConnAck(c)] => c.session_present,
            other => panic!("expected CONNACK, got {other:?}"),
        };
        (s, now, present)
    }

    /// The events, without answering any (the shell's save not done yet).
    fn raw_events(s: &mut Session) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    #[test]
    fn suback_waits_for_the_save_and_a_failed_save_refuses_it() {
        for v in [Version::V311, Version::V5] {
            let (mut s, now) = if v == Version::V311 {
                let (s, now, _) = persistent(v, None);
                (s, now)
            } else {
                v5_session(60)
            };
            assert!(s.is_persistent());
            let mut input = bytes(&sub_opts(&[("a/#", QoS::AtLeastOnce)], 1), v);
            input.extend(bytes(&Packet::PingReq, v));
            s.handle_bytes(&input, now);
            assert!(matches!(&raw_events(&mut s)[..], [Event::Subscribe(r)] if r.len() == 2));
            assert!(
                !s.has_output(),
                "no SUBACK (nor anything after it) before the save"
            );
            assert_eq!(s.snapshot().subs.len(), 2, "what the save writes");
            assert!(!s.subscribe_done(false), "not added after a failed save");
            match &sent(&mut s, v)[..] {
                [Packet::SubAck(a), Packet::PingResp] => {
                    assert_eq!(a.codes, vec![0x80]);
                    if v == Version::V5 {
                        assert!(a.properties.reason_string.is_some());
                    }
                }
                other => panic!("expected SUBACK 0x80 then PINGRESP, got {other:?}"),
            }
            assert!(s.snapshot().subs.is_empty(), "rolled back");
            // Saved: granted.
            s.handle_bytes(&bytes(&sub_opts(&[("a/#", QoS::AtLeastOnce)], 2), v), now);
            raw_events(&mut s);
            assert!(s.subscribe_done(true));
            assert_eq!(suback_codes(&mut s, v), vec![1]);
            // A failed upgrade to QoS 2 keeps QoS 1; a refused filter
            // (over max_topic_length) keeps its own code.
            let long = "z".repeat(40);
            s.handle_bytes(
                &bytes(
                    &sub_opts(&[("a/#", QoS::ExactlyOnce), (&long, QoS::AtMostOnce)], 3),
                    v,
                ),
                now,
            );
            raw_events(&mut s);
            assert!(!s.subscribe_done(false));
            let codes = suback_codes(&mut s, v);
            assert_eq!(codes[0], 0x80);
            assert!(codes[1] >= 0x80);
            assert!(s.snapshot().subs.iter().all(|x| x.qos == 1));
        }
        // Not persistent: nothing to save, the SUBACK leaves at once.
        let (mut s, now) = connected(Version::V311);
        s.handle_bytes(
            &bytes(&subscribe_pkt(1, "a", QoS::AtMostOnce), Version::V311),
            now,
        );
        assert_eq!(suback_codes(&mut s, Version::V311), vec![0]);
        raw_events(&mut s);
        assert!(s.subscribe_done(false));
    }

    #[test]
    fn a_failed_sync_drops_the_ack_and_closes() {
        for v in [Version::V311, Version::V5] {
            let (mut s, now) = if v == Version::V311 {
                let (s, now, _) = persistent(v, None);
                (s, now)
            } else {
                v5_session(60)
            };
            s.handle_bytes(
                &bytes(&publish(QoS::ExactlyOnce, Some(7), "a", b"2"), v),
                now,
            );
            events(&mut s);
            s.publish_done(7, Ok(()));
            assert!(s.take_sync());
            s.sync_failed("disk full");
            assert!(s.is_closed());
            match (&sent(&mut s, v)[..], v) {
                ([], Version::V311) => {}
                ([Packet::Disconnect(d)], Version::V5) => assert_eq!(d.code, 0x80),
                (other, _) => panic!("no PUBREC may leave; got {other:?}"),
            }
            assert!(matches!(&events(&mut s)[..], [Event::Close(_)]));
        }
    }

    #[test]
    fn restore_drops_subscriptions_the_permissions_no_longer_allow() {
        let sub = |f: &str, share: Option<&str>| StoredSub {
            filter: f.into(),
            qos: 1,
            share: share.map(String::from),
        };
        let stored = StoredSession {
            client_id: "dev-p".into(),
            owner: Some(Owner::User("alice".into())),
            version: 4,
            subs: vec![
                sub("a.>", None),
                sub("a.pub.>", None),
                sub("a.>", Some("g")),
            ],
            expiry_secs: 3600,
            disconnected_at: 1,
            sub_ids: vec![("a.>".into(), 1), ("a.pub.>".into(), 2)],
            ..StoredSession::default()
        };
        let (mut s, _, present) = session_as(Version::V311, "alice", Some(stored));
        assert!(present);
        match &events(&mut s)[..] {
            [Event::Subscribe(r)] => {
                assert_eq!(r.len(), 1);
                assert_eq!(r[0].filter, "a.pub.>");
            }
            other => panic!("expected one Subscribe, got {other:?}"),
        }
        let snap = s.snapshot();
        assert_eq!(snap.subs, vec![sub("a.pub.>", None)]);
        assert_eq!(snap.sub_ids, vec![("a.pub.>".into(), 2)]);
        assert_eq!(snap.owner, Some(Owner::User("alice".into())));
        let idx = s.follow("T", 0);
        s.deliver_stored(idx, 1, "a.x", b"no");
        s.deliver_stored(idx, 2, "a.pub.x", b"yes");
        let got = sent_publishes(&mut s);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].3, b"yes");
    }

    #[test]
    fn stored_messages_pass_deny_subscribe_and_the_cursor_moves_on() {
        let v = Version::V311;
        let (mut s, now, _) = session_as(v, "dave", None);
        let idx = s.follow("T", 10);
        s.handle_bytes(&bytes(&subscribe_pkt(1, "#", QoS::AtLeastOnce), v), now);
        events(&mut s);
        assert_eq!(suback_codes(&mut s, v), vec![1]);
        s.deliver_stored(idx, 11, "secret.s", b"no");
        s.deliver_stored(idx, 12, "a.b", b"yes");
        let got = sent_publishes(&mut s);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].3, b"yes");
        s.handle_bytes(&ack_pkt(Packet::PubAck, got[0].0), now);
        assert_eq!(s.snapshot().cursors[0].acked, 12, "skipped, not stuck");

        // A QoS 2 one in flight from before the permissions changed is
        // not sent again: its packet id is released.
        let mut stored = qos2_session(Cursor {
            stream: "T".into(),
            acked: 5,
            sent: 7,
            qos2: vec![(6, 30, false), (7, 31, false)],
            done: vec![],
        });
        stored.subs[0].filter = ">".into();
        let (mut s, now, present) = session_as(v, "dave", Some(stored));
        assert!(present);
        events(&mut s);
        let idx = s.follow("T", 100);
        let h = qos2_header();
        s.deliver_stored_msg(idx, 6, "secret.x", h.as_deref(), b"no", Duration::ZERO);
        s.deliver_stored_msg(idx, 7, "q.x", h.as_deref(), b"yes", Duration::ZERO);
        match &sent(&mut s, v)[..] {
            [Packet::PubRel(r), Packet::Publish(p)] => {
                assert_eq!(r.packet_id, 30);
                assert_eq!(
                    (p.packet_id, p.dup, &p.payload[..]),
                    (Some(31), true, &b"yes"[..])
                );
            }
            other => panic!("expected PUBREL 30 and the resend of 31, got {other:?}"),
        }
        s.handle_bytes(&ack_pkt(Packet::PubComp, 30), now);
        s.handle_bytes(&ack_pkt(Packet::PubRec, 31), now);
        s.handle_bytes(&ack_pkt(Packet::PubComp, 31), now);
        assert_eq!(s.snapshot().cursors[0].acked, 7);
    }

    #[test]
    fn refuse_answers_not_authorized_and_keeps_nothing() {
        for (v, code) in [(Version::V311, 0x05), (Version::V5, 0x87)] {
            let now = Instant::now();
            let mut s = Session::new(cast(), now);
            let Packet::Connect(mut c) = connect(v, "dev-p", false, 10) else {
                unreachable!()
            };
            c.username = Some("alice".into());
            c.password = Some(b"pw".to_vec());
            c.properties.session_expiry_interval = Some(60);
            c.will = Some(mqtt::Will {
                topic: "a/pub/w".into(),
                payload: b"w".to_vec(),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
            });
            s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
            events(&mut s);
            assert!(s.is_persistent() && s.will().is_some());
            s.refuse("held by another user".into());
            match &sent(&mut s, v)[..] {
                [Packet::ConnAck(a)] => assert_eq!((a.code, a.session_present), (code, false)),
                other => panic!("expected CONNACK {code:#x}, got {other:?}"),
            }
            assert!(s.is_closed());
            assert!(
                !s.is_persistent() && !s.discard_stored(),
                "nothing saved or deleted"
            );
            assert!(s.take_will().is_none(), "no will for a refused connection");
            assert!(matches!(&events(&mut s)[..], [Event::Close(_)]));
        }
    }
}
