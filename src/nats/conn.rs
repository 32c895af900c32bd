//! One NATS client connection's protocol state machine, sans I/O.
//!
//! Owns: the decode buffer, the client's `CONNECT` options (verbose,
//! pedantic, echo, headers, no_responders), the connection's
//! subscriptions by client `sid` (mapped to router ids), their
//! auto-unsubscribe counts, and the server's PING keep-alive.
//!
//! Call order (like [`crate::mqtt::Session`]): feed inputs with
//! [`Conn::handle_bytes`], [`Conn::deliver`], [`Conn::no_responders`],
//! [`Conn::slow_consumer`] and [`Conn::handle_timeout`]; then drain
//! [`Conn::poll_event`] (work for the shell: route, capture, subscribe,
//! close) and [`Conn::take_output`] (bytes for the socket), and sleep until
//! [`Conn::poll_deadline`]. Nothing here reads a clock, touches a socket or
//! panics on peer input.
//!
//! Invariants:
//! - `INFO` is the first thing written. Ops are accepted before `CONNECT`
//!   (with default options), as nats-server does when no authentication is
//!   required.
//! - Every fatal error writes `-ERR '<nats-server text>'` and then emits
//!   exactly one [`Event::Close`]; after it, all input is ignored.
//! - A subscription receives at most `max` messages after `UNSUB sid max`.
//! - A subscription's sid can be written on a `MSG` line: a `SUB` whose
//!   sid holds a control character is refused (`-ERR 'Invalid Subscription
//!   ID'`, the connection stays open), so no delivery can fail on it.
//! - Headers reach a client only if it said `headers: true`; to others an
//!   `HMSG` is delivered as a plain `MSG`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{Auth, Permissions};
use crate::router::Msg;
use crate::subject;
use crate::wire::nats::server::{self as wire, ClientOp, ConnectInfo, InfoOut, PubOp};

/// Limits the connection enforces (from `[nats]` config).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload: usize,
    pub max_control_line: usize,
    pub max_subscriptions: usize,
    /// The server sends PING this often ...
    pub ping_interval: Duration,
    /// ... and closes the connection when this many are unanswered.
    pub max_pings_out: u32,
    /// `[auth]`: `None` accepts everyone with every permission; otherwise
    /// the first op must be a `CONNECT` with valid credentials.
    pub auth: Option<Arc<Auth>>,
}

/// Work for the shell.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A publish to route (and capture). `no_responders`: the client
    /// wants a 503 status message on `reply` if nobody receives it (call
    /// [`Conn::no_responders`]).
    Publish {
        subject: String,
        reply: Option<String>,
        headers: Option<Vec<u8>>,
        payload: Vec<u8>,
        no_responders: bool,
    },
    /// Register router subscription `id` (unique in this connection).
    Subscribe {
        id: u64,
        subject: String,
        queue: Option<String>,
    },
    /// Remove router subscription `id` now, or after `max` deliveries in
    /// total.
    Unsubscribe { id: u64, max: Option<u64> },
    /// Close the connection; the reason is for the log.
    Close(String),
}

#[derive(Debug)]
struct SubState {
    /// The client's sid when it is not [`numeric_sid`] (then the
    /// subscription's id is the sid itself and no string is kept).
    name: Option<Box<str>>,
    subject: String,
    max: Option<u64>,
    delivered: u64,
}

pub struct Conn {
    limits: Limits,
    opts: ConnectInfo,
    connected: bool,
    closed: bool,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    events: VecDeque<Event>,
    subs: subject::FastMap<u64, SubState>,
    /// Ids of subscriptions whose sid is not numeric.
    by_sid: HashMap<Box<str>, u64>,
    /// The next id for a non-numeric sid (from [`NAMED_SIDS`] up).
    next_id: u64,
    next_ping: Instant,
    pings_out: u32,
    /// The client's permissions (`None`: everything allowed).
    perms: Option<Arc<Permissions>>,
    /// With `allow_responses`: reply subjects of requests delivered to
    /// this client -> (responses published, when the request arrived).
    replies: HashMap<String, (u64, Instant)>,
    /// The latest time the shell told us (for `allow_responses` expiry).
    now: Instant,
    /// The nonce sent in `INFO` (nkey users sign it in `CONNECT`).
    nonce: Option<String>,
}

/// Ids from here up belong to subscriptions with a non-numeric sid.
const NAMED_SIDS: u64 = 1 << 63;

/// A sid in canonical decimal ("0", "17"; not "017", at most 18 digits)
/// is its subscription's id: most clients number their subscriptions, and
/// then a subscription keeps no sid string and no sid -> id entry.
fn numeric_sid(sid: &str) -> Option<u64> {
    let canonical = !sid.is_empty()
        && sid.len() <= 18
        && sid.bytes().all(|b| b.is_ascii_digit())
        && (sid.len() == 1 || !sid.starts_with('0'));
    if canonical {
        sid.parse().ok()
    } else {
        None
    }
}

/// The sid of subscription `id` as the client wrote it.
fn sid_text<'a>(id: u64, name: Option<&'a str>, digits: &'a mut [u8; 20]) -> &'a str {
    if let Some(n) = name {
        return n;
    }
    let mut i = digits.len();
    let mut v = id;
    loop {
        i -= 1;
        if let Some(d) = digits.get_mut(i) {
            *d = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    std::str::from_utf8(digits.get(i..).unwrap_or_default()).unwrap_or_default()
}

/// Most reply subjects tracked for `allow_responses`; expired and used-up
/// ones are pruned first, then arbitrary ones are forgotten.
pub const MAX_TRACKED_REPLIES: usize = 4096;

impl Conn {
    /// A new connection; `INFO` is queued for output at once.
    pub fn new(limits: Limits, info: &InfoOut, now: Instant) -> Conn {
        let mut out = Vec::with_capacity(512);
        wire::info(info, &mut out);
        Conn {
            next_ping: now + limits.ping_interval,
            limits,
            opts: ConnectInfo::default(),
            connected: false,
            closed: false,
            inbuf: Vec::new(),
            out,
            events: VecDeque::new(),
            subs: subject::FastMap::default(),
            by_sid: HashMap::new(),
            next_id: NAMED_SIDS,
            pings_out: 0,
            perms: None,
            replies: HashMap::new(),
            now,
            nonce: info.nonce.clone(),
        }
    }

    /// The current time, for deliveries (call after each wake-up).
    pub fn set_time(&mut self, now: Instant) {
        self.now = now;
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The client's `CONNECT` options (defaults until it sends one).
    pub fn options(&self) -> &ConnectInfo {
        &self.opts
    }

    /// The client's permissions (`None`: unrestricted, or not yet
    /// authenticated).
    pub fn permissions(&self) -> Option<&Arc<Permissions>> {
        self.perms.as_ref()
    }

    /// Whether the client sent `CONNECT`.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Bytes from the socket.
    pub fn handle_bytes(&mut self, data: &[u8], now: Instant) {
        self.handle_bytes_with(data, now, &mut |_| true)
    }

    /// [`Conn::handle_bytes`], asking `wanted` whether a publish to a
    /// subject can reach anyone: a publish it says `false` to is checked
    /// (subject, permissions) and acknowledged as usual, answered with
    /// no-responders when asked for, and then dropped without producing
    /// an event or allocating anything.
    pub fn handle_bytes_with(
        &mut self,
        data: &[u8],
        now: Instant,
        wanted: &mut dyn FnMut(&str) -> bool,
    ) {
        if self.closed {
            return;
        }
        self.now = now;
        if self.inbuf.is_empty() {
            // The common case: parse straight from the socket's bytes and
            // keep only an incomplete tail.
            let used = self.parse_ops(data, now, wanted);
            if !self.closed {
                self.inbuf
                    .extend_from_slice(data.get(used..).unwrap_or_default());
            }
            return;
        }
        let mut buf = std::mem::take(&mut self.inbuf);
        buf.extend_from_slice(data);
        let used = self.parse_ops(&buf, now, wanted);
        buf.drain(..used.min(buf.len()));
        if !self.closed {
            self.inbuf = buf;
        }
    }

    /// Handle every complete op at the front of `buf`; returns the bytes
    /// they used.
    fn parse_ops(
        &mut self,
        buf: &[u8],
        now: Instant,
        wanted: &mut dyn FnMut(&str) -> bool,
    ) -> usize {
        let mut start = 0;
        while !self.closed {
            let rest = buf.get(start..).unwrap_or_default();
            match wire::parse_client_op(rest, self.limits.max_control_line, self.limits.max_payload)
            {
                Ok(Some((op, used))) => {
                    start += used;
                    self.handle_op(op, now, wanted);
                }
                Ok(None) => break,
                Err(e) => {
                    self.fatal(e.err_text(), format!("protocol error: {e}"));
                    break;
                }
            }
        }
        start
    }

    fn fatal(&mut self, err_text: &str, why: String) {
        if self.closed {
            return;
        }
        wire::err(err_text, &mut self.out);
        self.closed = true;
        self.events.push_back(Event::Close(why));
    }

    fn ok(&mut self) {
        if self.opts.verbose {
            wire::ok(&mut self.out);
        }
    }

    fn handle_op(&mut self, op: ClientOp, _now: Instant, wanted: &mut dyn FnMut(&str) -> bool) {
        if let Some(auth) = self.limits.auth.clone() {
            if !self.connected {
                let ClientOp::Connect(c) = &op else {
                    return self.fatal(
                        wire::ERR_AUTH,
                        "op before CONNECT with auth required".into(),
                    );
                };
                let res = match (&c.user, &c.auth_token) {
                    _ if c.nkey.is_some() => match (&c.nkey, &self.nonce) {
                        (Some(k), Some(n)) => {
                            auth.authenticate_nkey(k, c.sig.as_deref().unwrap_or_default(), n)
                        }
                        _ => Err(crate::auth::Refusal::BadCredentials),
                    },
                    (Some(u), _) => {
                        auth.authenticate(Some(u), c.pass.as_deref().map(str::as_bytes))
                    }
                    (None, Some(t)) => auth.authenticate_token(t),
                    (None, None) => auth.authenticate(None, None),
                };
                match res {
                    Ok(p) => self.perms = (!p.is_unrestricted()).then_some(p),
                    Err(r) => {
                        let who = c
                            .user
                            .as_ref()
                            .or(c.nkey.as_ref())
                            .cloned()
                            .unwrap_or_default();
                        return self.fatal(
                            wire::ERR_AUTH,
                            format!("authentication failed for user {who:?} ({r:?})"),
                        );
                    }
                }
            }
        }
        match op {
            ClientOp::Connect(c) => {
                self.opts = *c;
                self.connected = true;
                self.ok();
            }
            ClientOp::Ping => wire::pong(&mut self.out),
            ClientOp::Pong => self.pings_out = 0,
            ClientOp::Pub(p) => self.handle_pub(p, wanted),
            ClientOp::Sub {
                subject,
                queue,
                sid,
            } => self.handle_sub(subject, queue, sid),
            ClientOp::Unsub { sid, max } => {
                if let Some(id) = self.id_of(&sid) {
                    match (max, self.subs.get_mut(&id)) {
                        (Some(m), Some(s)) if s.delivered < m => {
                            s.max = Some(m);
                        }
                        _ => self.forget(id),
                    }
                    self.events.push_back(Event::Unsubscribe { id, max });
                }
                self.ok();
            }
        }
    }

    fn handle_pub(&mut self, p: PubOp, wanted: &mut dyn FnMut(&str) -> bool) {
        if !subject::valid_subject(p.subject) {
            // Not fatal in nats-server either: the message is dropped.
            wire::err(wire::ERR_INVALID_PUB_SUBJECT, &mut self.out);
            return;
        }
        if self.opts.pedantic {
            if let Some(r) = &p.reply {
                if !subject::valid_subject(r) {
                    wire::err(wire::ERR_INVALID_PUB_SUBJECT, &mut self.out);
                    return;
                }
            }
        }
        if self
            .perms
            .as_ref()
            .is_some_and(|x| !x.can_publish(p.subject))
            && !self.response_allowed(p.subject)
        {
            let text = format!("Permissions Violation for Publish to \"{}\"", p.subject);
            wire::err(&text, &mut self.out);
            return;
        }
        let no_responders = self.opts.headers && self.opts.no_responders && p.reply.is_some();
        if !wanted(p.subject) {
            if let (true, Some(reply)) = (no_responders, p.reply) {
                self.no_responders(reply, p.subject);
            }
            self.ok();
            return;
        }
        self.events.push_back(Event::Publish {
            subject: p.subject.to_string(),
            reply: p.reply.map(str::to_string),
            headers: p.headers.map(<[u8]>::to_vec),
            payload: p.payload.to_vec(),
            no_responders,
        });
        self.ok();
    }

    /// `allow_responses`: may the client publish to `subject` because it
    /// received a request with that reply subject? Counts the response.
    fn response_allowed(&mut self, subject: &str) -> bool {
        let Some(rp) = self.perms.as_ref().and_then(|p| p.responses) else {
            return false;
        };
        let Some((sent, at)) = self.replies.get_mut(subject) else {
            return false;
        };
        *sent += 1;
        let fresh = self.now.saturating_duration_since(*at) <= rp.expires;
        let ok = fresh && *sent <= rp.max;
        if !ok || *sent >= rp.max {
            self.replies.remove(subject);
        }
        ok
    }

    /// `allow_responses`: remember the reply subject of a delivered
    /// request.
    fn track_reply(&mut self, reply: &str) {
        let Some(rp) = self.perms.as_ref().and_then(|p| p.responses) else {
            return;
        };
        if self.replies.len() >= MAX_TRACKED_REPLIES && !self.replies.contains_key(reply) {
            let now = self.now;
            self.replies.retain(|_, (sent, at)| {
                *sent < rp.max && now.saturating_duration_since(*at) <= rp.expires
            });
            if self.replies.len() >= MAX_TRACKED_REPLIES {
                if let Some(k) = self.replies.keys().next().cloned() {
                    self.replies.remove(&k);
                }
            }
        }
        self.replies.insert(reply.to_string(), (0, self.now));
    }

    fn handle_sub(&mut self, subject: String, queue: Option<String>, sid: String) {
        let queue_ok = queue
            .as_deref()
            .is_none_or(|q| !q.contains(['*', '>']) && !q.is_empty());
        if !subject::valid_filter(&subject) || !queue_ok {
            wire::err(wire::ERR_INVALID_SUBJECT, &mut self.out);
            return;
        }
        if crate::wire::nats::check_token(&sid, "sid").is_err() {
            // A sid that cannot be echoed on a MSG line (a control
            // character) would fail every delivery. nats-server has no
            // check and so no wording; not fatal, like an invalid subject.
            wire::err(wire::ERR_INVALID_SID, &mut self.out);
            return;
        }
        if self
            .perms
            .as_ref()
            .is_some_and(|x| !x.can_subscribe(&subject))
        {
            let text = match &queue {
                Some(q) => format!(
                    "Permissions Violation for Subscription to \"{subject}\" using queue \"{q}\""
                ),
                None => format!("Permissions Violation for Subscription to \"{subject}\""),
            };
            wire::err(&text, &mut self.out);
            return;
        }
        if self.id_of(&sid).is_some() {
            // nats-server ignores a repeated sid; so do we.
            self.ok();
            return;
        }
        if self.limits.max_subscriptions > 0 && self.subs.len() >= self.limits.max_subscriptions {
            wire::err(wire::ERR_MAX_SUBS, &mut self.out);
            return;
        }
        let (id, name) = match numeric_sid(&sid) {
            Some(n) => (n, None),
            None => {
                let id = self.next_id;
                self.next_id += 1;
                let name: Box<str> = sid.into();
                self.by_sid.insert(name.clone(), id);
                (id, Some(name))
            }
        };
        self.subs.insert(
            id,
            SubState {
                name,
                subject: subject.clone(),
                max: None,
                delivered: 0,
            },
        );
        self.events
            .push_back(Event::Subscribe { id, subject, queue });
        self.ok();
    }

    fn forget(&mut self, id: u64) {
        if let Some(SubState { name: Some(n), .. }) = self.subs.remove(&id) {
            self.by_sid.remove(&n);
        }
    }

    /// The id of the live subscription with this sid.
    fn id_of(&self, sid: &str) -> Option<u64> {
        match numeric_sid(sid) {
            Some(n) => self.subs.contains_key(&n).then_some(n),
            None => self.by_sid.get(sid).copied(),
        }
    }

    /// A message for subscription `id` (from the router). Dropped if the
    /// subscription is gone or reached its maximum.
    pub fn deliver(&mut self, id: u64, m: &Msg) {
        if self.closed {
            return;
        }
        if self
            .perms
            .as_ref()
            .is_some_and(|p| !p.may_deliver(&m.subject))
        {
            return;
        }
        let Some(s) = self.subs.get_mut(&id) else {
            return;
        };
        if s.max.is_some_and(|max| s.delivered >= max) {
            return;
        }
        s.delivered += 1;
        let done = s.max.is_some_and(|max| s.delivered >= max);
        let mut digits = [0u8; 20];
        let sid = sid_text(id, s.name.as_deref(), &mut digits);
        let reply = m.reply.as_deref();
        let res = match (&m.headers, self.opts.headers) {
            (Some(h), true) => wire::hmsg(&m.subject, sid, reply, h, &m.payload, &mut self.out),
            _ => wire::msg(&m.subject, sid, reply, &m.payload, &mut self.out),
        };
        if let Err(e) = res {
            // Subjects are validated on the way in; a failure means a bad
            // subject from elsewhere (an MQTT mapping bug). Skip it.
            log::warn!("nats: cannot deliver on {:?}: {e}", m.subject);
        }
        if done {
            self.forget(id);
        }
        if let Some(r) = &m.reply {
            self.track_reply(r);
        }
    }

    /// Nobody received a request on `subject`: answer on `reply` with a
    /// `503` status, through this connection's subscription that matches
    /// `reply` (none: nothing to do).
    pub fn no_responders(&mut self, reply: &str, subject: &str) {
        if self.closed || !self.opts.headers {
            return;
        }
        let mut digits = [0u8; 20];
        let Some(sid) = self
            .subs
            .iter()
            .find(|(_, s)| subject::matches(&s.subject, reply))
            .map(|(id, s)| sid_text(*id, s.name.as_deref(), &mut digits).to_string())
        else {
            return;
        };
        let mut h = crate::wire::nats::headers::HeaderBlock::new();
        h.status = Some(503);
        h.push("Nats-Subject", subject);
        let Ok(block) = h.encode() else { return };
        if wire::hmsg(reply, &sid, None, &block, b"", &mut self.out).is_err() {
            log::debug!("nats: cannot send no-responders to {reply:?}");
        }
    }

    /// The router dropped messages for this connection (its outbox is
    /// full): tell the client and close.
    pub fn slow_consumer(&mut self) {
        self.fatal(
            wire::ERR_SLOW_CONSUMER,
            "slow consumer: pending bytes over max_pending".into(),
        );
    }

    /// Refuse and close (e.g. too many connections).
    pub fn refuse(&mut self, err_text: &str, why: String) {
        self.fatal(err_text, why);
    }

    /// The next time [`Conn::handle_timeout`] must be called.
    pub fn poll_deadline(&self) -> Option<Instant> {
        (!self.closed).then_some(self.next_ping)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.closed || now < self.next_ping {
            return;
        }
        if self.pings_out >= self.limits.max_pings_out {
            self.fatal(
                wire::ERR_STALE,
                format!("stale connection: {} PINGs unanswered", self.pings_out),
            );
            return;
        }
        wire::ping(&mut self.out);
        self.pings_out += 1;
        self.next_ping = now + self.limits.ping_interval;
    }

    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes to write to the socket (moved out).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Move the bytes to write to the end of `dst`, keeping both buffers'
    /// capacity (no allocation per batch once warmed up).
    pub fn append_output(&mut self, dst: &mut Vec<u8>) {
        if dst.is_empty() {
            std::mem::swap(dst, &mut self.out);
        } else {
            dst.extend_from_slice(&self.out);
            self.out.clear();
        }
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Number of live subscriptions.
    pub fn subscriptions(&self) -> usize {
        self.subs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::nats::client::{parse_server_op, ServerOp};

    fn limits() -> Limits {
        Limits {
            max_payload: 1024,
            max_control_line: 4096,
            max_subscriptions: 3,
            ping_interval: Duration::from_secs(10),
            max_pings_out: 2,
            auth: None,
        }
    }

    fn ops(c: &mut Conn) -> Vec<ServerOp> {
        let out = c.take_output();
        let mut v = Vec::new();
        let mut pos = 0;
        while let Some((op, used)) = parse_server_op(&out[pos..], 1 << 20).unwrap() {
            v.push(op);
            pos += used;
        }
        assert_eq!(pos, out.len(), "trailing bytes");
        v
    }

    fn events(c: &mut Conn) -> Vec<Event> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn start(connect: &str) -> (Conn, Instant) {
        let now = Instant::now();
        let info = InfoOut {
            server_id: "S".into(),
            max_payload: 1024,
            headers: true,
            proto: 1,
            ..InfoOut::default()
        };
        let mut c = Conn::new(limits(), &info, now);
        assert!(matches!(&ops(&mut c)[..], [ServerOp::Info(_)]));
        c.handle_bytes(format!("CONNECT {connect}\r\n").as_bytes(), now);
        (c, now)
    }

    fn msg(subject: &str, reply: Option<&str>, headers: Option<&[u8]>, payload: &[u8]) -> Msg {
        Msg {
            subject: subject.into(),
            reply: reply.map(Into::into),
            headers: headers.map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            publisher: None,
        }
    }

    #[test]
    fn verbose_acks_and_ping() {
        let (mut c, now) = start(r#"{"verbose":true}"#);
        c.handle_bytes(b"SUB a.* 1\r\nPUB a.b 2\r\nhi\r\nPING\r\nUNSUB 1\r\n", now);
        assert_eq!(
            ops(&mut c),
            vec![
                ServerOp::Ok,
                ServerOp::Ok,
                ServerOp::Ok,
                ServerOp::Pong,
                ServerOp::Ok
            ]
        );
        let ev = events(&mut c);
        assert_eq!(ev.len(), 3);
        assert!(
            matches!(&ev[0], Event::Subscribe { id: 1, subject, queue: None } if subject == "a.*")
        );
        assert!(
            matches!(&ev[1], Event::Publish { subject, payload, no_responders: false, .. } if subject == "a.b" && payload == b"hi")
        );
        assert_eq!(ev[2], Event::Unsubscribe { id: 1, max: None });
    }

    #[test]
    fn deliver_uses_client_sid_and_strips_headers_for_old_clients() {
        let (mut c, now) = start("{}");
        c.handle_bytes(b"SUB a.> x7\r\n", now);
        let [Event::Subscribe { id, .. }] = &events(&mut c)[..] else {
            panic!("no subscribe")
        };
        // The client did not ask for headers: a plain MSG. (The sid "x7" is
        // not a number, which the client-side parser insists on; compare
        // raw bytes.)
        c.deliver(
            *id,
            &msg("a.b", Some("r.1"), Some(b"NATS/1.0\r\nK: v\r\n\r\n"), b"p"),
        );
        assert_eq!(c.take_output(), b"MSG a.b x7 r.1 1\r\np\r\n");
        let (mut c, now) = start(r#"{"headers":true}"#);
        c.handle_bytes(b"SUB a 3\r\n", now);
        c.deliver(3, &msg("a", None, Some(b"NATS/1.0\r\n\r\n"), b"p"));
        assert!(
            matches!(&ops(&mut c)[..], [ServerOp::Msg(m)] if m.headers.is_some() && m.sid == 3)
        );
    }

    #[test]
    fn numeric_and_named_sids_echo_back_and_unsubscribe() {
        assert_eq!(numeric_sid("0"), Some(0));
        assert_eq!(numeric_sid("17"), Some(17));
        assert_eq!(numeric_sid("017"), None);
        assert_eq!(numeric_sid(""), None);
        assert_eq!(numeric_sid("1x"), None);
        assert_eq!(
            numeric_sid("999999999999999999"),
            Some(999_999_999_999_999_999)
        );
        assert_eq!(
            numeric_sid("1000000000000000000"),
            None,
            "19 digits are named"
        );
        let mut d = [0u8; 20];
        assert_eq!(sid_text(0, None, &mut d), "0");
        assert_eq!(sid_text(u64::MAX, None, &mut d), "18446744073709551615");
        assert_eq!(sid_text(5, Some("07"), &mut d), "07");

        let (mut c, now) = start("{}");
        c.handle_bytes(b"SUB a 7\r\nSUB a 07\r\nSUB a 7\r\nSUB a 0\r\n", now);
        let ids: Vec<u64> = events(&mut c)
            .iter()
            .filter_map(|e| match e {
                Event::Subscribe { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(ids.len(), 3, "a repeated sid is ignored");
        assert_eq!((ids[0], ids[2]), (7, 0));
        assert!(ids[1] >= NAMED_SIDS);
        let _ = c.take_output();
        for id in &ids {
            c.deliver(*id, &msg("a", None, None, b"p"));
        }
        assert_eq!(
            c.take_output(),
            b"MSG a 7 1\r\np\r\nMSG a 07 1\r\np\r\nMSG a 0 1\r\np\r\n"
        );
        c.handle_bytes(b"UNSUB 07\r\nUNSUB 8\r\n", now);
        assert!(matches!(
            &events(&mut c)[..],
            [Event::Unsubscribe { id, max: None }] if *id == ids[1]
        ));
        assert_eq!(c.subscriptions(), 2);
        assert!(c.by_sid.is_empty());
    }

    #[test]
    fn unsub_max_limits_deliveries() {
        let (mut c, now) = start("{}");
        c.handle_bytes(b"SUB a 1\r\nUNSUB 1 2\r\n", now);
        assert_eq!(
            events(&mut c)[1],
            Event::Unsubscribe {
                id: 1,
                max: Some(2)
            }
        );
        for _ in 0..4 {
            c.deliver(1, &msg("a", None, None, b"x"));
        }
        assert_eq!(ops(&mut c).len(), 2);
        assert_eq!(c.subscriptions(), 0);
    }

    #[test]
    fn no_responders_only_when_asked() {
        let (mut c, now) = start(r#"{"headers":true,"no_responders":true}"#);
        c.handle_bytes(b"SUB _INBOX.abc.* 1\r\nPUB svc _INBOX.abc.1 0\r\n\r\n", now);
        let ev = events(&mut c);
        assert!(
            matches!(&ev[1], Event::Publish { no_responders: true, reply: Some(r), .. } if r == "_INBOX.abc.1")
        );
        c.no_responders("_INBOX.abc.1", "svc");
        match &ops(&mut c)[..] {
            [ServerOp::Msg(m)] => {
                assert_eq!(m.subject, "_INBOX.abc.1");
                let h =
                    crate::wire::nats::headers::HeaderBlock::parse(m.headers.as_deref().unwrap())
                        .unwrap();
                assert_eq!(h.status, Some(503));
                assert!(m.payload.is_empty());
            }
            other => panic!("{other:?}"),
        }
        let (mut c, now) = start(r#"{"headers":true}"#);
        c.handle_bytes(b"PUB svc r 0\r\n\r\n", now);
        assert!(matches!(
            &events(&mut c)[..],
            [Event::Publish {
                no_responders: false,
                ..
            }]
        ));
    }

    #[test]
    fn unwanted_publishes_are_checked_acknowledged_and_dropped() {
        let (mut c, now) = start(r#"{"verbose":true,"headers":true,"no_responders":true}"#);
        let _ = ops(&mut c); // +OK for CONNECT
        let mut asked = Vec::new();
        let mut nobody = |s: &str| {
            asked.push(s.to_string());
            false
        };
        c.handle_bytes_with(
            b"SUB _INBOX.q.* 1\r\nPUB t.a 2\r\nhi\r\nPUB svc _INBOX.q.1 0\r\n\r\nPUB bad..subject 0\r\n\r\n",
            now,
            &mut nobody,
        );
        // The invalid subject is refused before anyone is asked.
        assert_eq!(asked, ["t.a", "svc"]);
        assert!(
            matches!(&events(&mut c)[..], [Event::Subscribe { .. }]),
            "nothing to route"
        );
        match &ops(&mut c)[..] {
            [ServerOp::Ok, ServerOp::Ok, ServerOp::Msg(m), ServerOp::Ok, ServerOp::Err(e)] => {
                assert_eq!(m.subject, "_INBOX.q.1");
                let h =
                    crate::wire::nats::headers::HeaderBlock::parse(m.headers.as_deref().unwrap())
                        .unwrap();
                assert_eq!(h.status, Some(503));
                assert!(e.contains("Invalid Publish Subject"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // Wanted ones become events as before.
        c.handle_bytes_with(b"PUB t.a 2\r\nhi\r\n", now, &mut |_| true);
        assert!(
            matches!(&events(&mut c)[..], [Event::Publish { subject, .. }] if subject == "t.a")
        );
    }

    #[test]
    fn non_fatal_errors_keep_the_connection() {
        let (mut c, now) = start("{}");
        c.handle_bytes(
            b"SUB a..b 1\r\nPUB a.* 0\r\n\r\nSUB a q* 2\r\nSUB a x\x01y\r\nSUB a \x7f\r\nSUB ok 3\r\n",
            now,
        );
        assert_eq!(
            ops(&mut c),
            vec![
                ServerOp::Err("Invalid Subject".into()),
                ServerOp::Err("Invalid Publish Subject".into()),
                ServerOp::Err("Invalid Subject".into()),
                ServerOp::Err("Invalid Subscription ID".into()),
                ServerOp::Err("Invalid Subscription ID".into()),
            ]
        );
        assert!(!c.is_closed());
        assert!(matches!(&events(&mut c)[..], [Event::Subscribe { .. }]));
        // The subscription limit (3) is not fatal either.
        c.handle_bytes(b"SUB b 4\r\nSUB c 5\r\nSUB d 6\r\n", now);
        assert_eq!(
            ops(&mut c),
            vec![ServerOp::Err("Maximum Subscriptions Exceeded".into())]
        );
    }

    #[test]
    fn fatal_errors_close_with_nats_texts() {
        for (input, text) in [
            (&b"PUB a 2048\r\n"[..], "Maximum Payload Violation"),
            (b"HELLO\r\n", "Unknown Protocol Operation"),
            (b"PUB a 3\r\nabcd\r\n", "Parser Error"),
        ] {
            let (mut c, now) = start("{}");
            c.handle_bytes(input, now);
            assert!(c.is_closed());
            assert_eq!(ops(&mut c), vec![ServerOp::Err(text.into())]);
            assert!(matches!(&events(&mut c)[..], [Event::Close(_)]));
            c.handle_bytes(b"PING\r\n", now);
            assert!(
                !c.has_output() && !c.has_events(),
                "input after close is ignored"
            );
        }
        let (mut c, _) = start("{}");
        c.slow_consumer();
        assert_eq!(ops(&mut c), vec![ServerOp::Err("Slow Consumer".into())]);
        assert!(c.is_closed());
    }

    #[test]
    fn stale_connection_after_unanswered_pings() {
        let (mut c, now) = start("{}");
        let t = |s| now + Duration::from_secs(s);
        assert_eq!(c.poll_deadline(), Some(t(10)));
        c.handle_timeout(t(5));
        assert!(!c.has_output());
        c.handle_timeout(t(10));
        assert_eq!(ops(&mut c), vec![ServerOp::Ping]);
        c.handle_bytes(b"PONG\r\n", t(11));
        c.handle_timeout(t(20));
        c.handle_timeout(t(30));
        assert_eq!(ops(&mut c), vec![ServerOp::Ping, ServerOp::Ping]);
        assert!(!c.is_closed());
        c.handle_timeout(t(40));
        assert_eq!(ops(&mut c), vec![ServerOp::Err("Stale Connection".into())]);
        assert!(c.is_closed());
        assert_eq!(c.poll_deadline(), None);
    }

    #[test]
    fn nkey_connect_verifies_the_signed_nonce() {
        use crate::auth::{Auth, Secret, User};
        use crate::nkey::{decode_user_public, SeedKey};
        let seed = SeedKey::from_bytes([8u8; 32]);
        let public = seed.public_key();
        let auth = Arc::new(Auth {
            anonymous: false,
            anonymous_permissions: Arc::new(Permissions::default()),
            users: vec![User {
                name: "dev".into(),
                secret: Secret::Nkey(decode_user_public(&public).unwrap()),
                permissions: Arc::new(Permissions {
                    allow_publish: vec!["ok".into()],
                    ..Permissions::default()
                }),
            }],
        });
        let info = InfoOut {
            nonce: Some("n0nce".into()),
            auth_required: true,
            ..InfoOut::default()
        };
        let conn = |line: String| {
            let now = Instant::now();
            let mut c = Conn::new(
                Limits {
                    auth: Some(auth.clone()),
                    ..limits()
                },
                &info,
                now,
            );
            let ServerOp::Info(j) = &ops(&mut c)[0] else {
                panic!("no INFO")
            };
            assert!(j.contains("\"nonce\":\"n0nce\""), "{j}");
            c.handle_bytes(format!("{line}\r\nPUB no 1\r\nx\r\n").as_bytes(), now);
            (ops(&mut c), c.is_closed())
        };
        let good = format!(
            "CONNECT {{\"nkey\":\"{public}\",\"sig\":\"{}\"}}",
            seed.sign(b"n0nce")
        );
        let (o, closed) = conn(good);
        assert!(!closed);
        assert_eq!(
            o,
            vec![ServerOp::Err(
                "Permissions Violation for Publish to \"no\"".into()
            )],
            "the user's permissions apply"
        );
        let other = SeedKey::from_bytes([9u8; 32]);
        for bad in [
            format!(
                "CONNECT {{\"nkey\":\"{public}\",\"sig\":\"{}\"}}",
                other.sign(b"n0nce")
            ),
            format!(
                "CONNECT {{\"nkey\":\"{}\",\"sig\":\"{}\"}}",
                other.public_key(),
                other.sign(b"n0nce")
            ),
            format!("CONNECT {{\"nkey\":\"{public}\"}}"),
            "CONNECT {\"user\":\"dev\",\"pass\":\"\"}".to_string(),
        ] {
            let (o, closed) = conn(bad.clone());
            assert!(closed, "{bad}");
            assert_eq!(
                o,
                vec![ServerOp::Err("Authorization Violation".into())],
                "{bad}"
            );
        }
    }

    #[test]
    fn allow_responses_permits_max_replies_within_expiry() {
        use crate::auth::{Auth, ResponsePermission, Secret, User};
        let perms = Permissions {
            allow_subscribe: vec!["svc.>".into()],
            responses: Some(ResponsePermission {
                max: 2,
                expires: Duration::from_secs(10),
            }),
            ..Permissions::default()
        };
        let auth = Arc::new(Auth {
            anonymous: false,
            anonymous_permissions: Arc::new(Permissions::default()),
            users: vec![User {
                name: "svc".into(),
                secret: Secret::parse("pw"),
                permissions: Arc::new(perms),
            }],
        });
        let now = Instant::now();
        let info = InfoOut::default();
        let mut c = Conn::new(
            Limits {
                auth: Some(auth),
                ..limits()
            },
            &info,
            now,
        );
        c.handle_bytes(
            b"CONNECT {\"user\":\"svc\",\"pass\":\"pw\"}\r\nSUB svc.> 1\r\n",
            now,
        );
        ops(&mut c);
        events(&mut c);
        let publishes = |c: &mut Conn| {
            events(c)
                .into_iter()
                .filter(|e| matches!(e, Event::Publish { .. }))
                .count()
        };
        // Not a reply to anything yet: denied (implicitly, no allow list).
        c.handle_bytes(b"PUB _INBOX.a 1\r\nx\r\n", now);
        assert_eq!(publishes(&mut c), 0);
        assert_eq!(
            ops(&mut c),
            vec![ServerOp::Err(
                "Permissions Violation for Publish to \"_INBOX.a\"".into()
            )]
        );
        // A request arrives: two replies allowed, the third refused.
        c.deliver(1, &msg("svc.echo", Some("_INBOX.a"), None, b"q"));
        ops(&mut c);
        c.handle_bytes(b"PUB _INBOX.a 1\r\nx\r\nPUB _INBOX.a 1\r\ny\r\n", now);
        assert_eq!(publishes(&mut c), 2);
        c.handle_bytes(b"PUB _INBOX.a 1\r\nz\r\n", now);
        assert_eq!(publishes(&mut c), 0);
        assert!(matches!(&ops(&mut c)[..], [ServerOp::Err(_)]));
        // Another request, answered too late.
        c.set_time(now);
        c.deliver(1, &msg("svc.echo", Some("_INBOX.b"), None, b"q"));
        ops(&mut c);
        c.handle_bytes(b"PUB _INBOX.b 1\r\nx\r\n", now + Duration::from_secs(11));
        assert_eq!(publishes(&mut c), 0);
        assert!(!c.is_closed(), "a violation is not fatal");
        // The bookkeeping is bounded.
        for i in 0..MAX_TRACKED_REPLIES + 10 {
            c.deliver(1, &msg("svc.echo", Some(&format!("_INBOX.{i}")), None, b""));
        }
        assert!(c.replies.len() <= MAX_TRACKED_REPLIES);
    }

    #[test]
    fn split_input_is_reassembled() {
        let (mut c, now) = start("{}");
        let wire = b"PUB a.b 11\r\nhello world\r\n";
        for b in wire.chunks(3) {
            c.handle_bytes(b, now);
        }
        assert!(
            matches!(&events(&mut c)[..], [Event::Publish { payload, .. }] if payload == b"hello world")
        );
    }
}
