//! The live bridge as a sans-IO machine: core NATS messages (at most once,
//! nothing stored) between local subjects and the hub, both ways, with
//! request/reply across the link (`[[uplink.export]]`,
//! `[[uplink.import]]`).
//!
//! Owns: the bridge's hub subscriptions (made through [`Link::subscribe`],
//! so they come back on every connection), the two reply tables
//! ([`Inboxes`]), the small buffer of hub-bound bytes kept while the link
//! is down, and the counters ([`BridgeStatus`]). It does not touch the
//! router: the shell (`uplink::bridge_io`) subscribes locally to
//! [`Bridge::local_subscriptions`], hands what arrives to
//! [`Bridge::handle_local`], and publishes what [`Bridge::handle_hub_msg`]
//! returns into the router with echo off.
//!
//! Semantics (hub subject = `hub_prefix` + local subject):
//! - **export** `S`: frond subscribes `hub_prefix + S` on the hub; a hub
//!   message there is published locally on `S` (NATS and MQTT subscribers
//!   get it). **import** `S`: the same from the hub, and a local publish
//!   on `S` (NATS or MQTT, requests included) is sent to the hub on
//!   `hub_prefix + S`.
//! - A hub request's reply subject `R` is replaced locally by a fresh
//!   inbox `_INBOX.frond.hub.<n>.<96 random bits>`; what is published
//!   locally to that inbox (by any responder, NATS or MQTT 5 through its
//!   Response Topic) goes to the hub on `R` until the entry expires (so a
//!   request may get several answers, as in NATS).
//! - A local request's reply subject `L` (on an imported subject) is
//!   replaced on the hub by `_INBOX.<token>.<n>.<96 random bits>` under
//!   the one wildcard subscription `_INBOX.<token>.>` frond holds; the
//!   hub's answer is published locally to `L`.
//! - Both reply tables are bounded in entries and bytes and forget an
//!   entry after `reply_ttl` (oldest first); an answer to a forgotten
//!   inbox is dropped and counted.
//!
//! Loops and duplicates:
//! - The hub connection says `echo: false`, so frond's own hub publishes
//!   never come back to its hub subscriptions; the shell publishes hub
//!   messages locally with echo off from the connection that holds the
//!   local import subscriptions, so they are never sent back up.
//! - Overlapping entries (import `a.>` and export `a.b`): the hub sends
//!   one copy per matching subscription and the local router one per
//!   matching local subscription; exactly one is passed on, the one of the
//!   lowest matching subscription id (the entry listed first, exports
//!   before imports; it also decides the local subject when prefixes
//!   differ). The others are counted as `duplicates`.
//!
//! Security (the hub is not trusted with local subjects):
//! - Only the configured subjects are subscribed on the hub, and a hub
//!   message is delivered only if its local subject matches the entry's
//!   local filter and is not reserved (`$…`, `_INBOX.…`): otherwise it is
//!   dropped and counted (`dropped_reserved`). Config refuses entries that
//!   could reach reserved subjects.
//! - A hub request whose reply subject is reserved (`$JS.API.…`) is
//!   dropped: a local answer must never become a hub API call in frond's
//!   name. Likewise a local request whose reply subject is reserved.
//! - Hub messages lose their `Mqtt-Response-Topic` header: the reply
//!   inbox is the only way back.
//! - Local permissions are the shell's: publish permissions are checked
//!   before routing (a local client that may not publish `S` never reaches
//!   the bridge), subscribe permissions at delivery; the shell refuses a
//!   local request whose requester may not subscribe to its reply subject.
//! - Inbox names end in randomness from the injected `entropy` (the OS in
//!   the shell), so answers cannot be injected by guessing.
//!
//! Link down: hub-bound messages go into a buffer of at most
//! `buffer_bytes`, sent first when the link is up again; beyond it they
//! are dropped and counted (`dropped_link_down`). A message larger than
//! the hub's `max_payload` is dropped (`dropped_too_big`) rather than
//! making the hub close the connection.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::subject;
use crate::uplink::link::Link;
use crate::wire::nats::client::{self, MsgOp};
use crate::wire::nats::headers::HeaderBlock;

/// Local reply inboxes for hub requests start with this.
pub const LOCAL_INBOX_PREFIX: &str = "_INBOX.frond.hub.";
/// Estimated bytes of one reply-table entry besides its two strings.
const ENTRY_OVERHEAD: usize = 64;
/// The MQTT 5 Response Topic header (a way back that is not the inbox).
const RESPONSE_TOPIC: &str = "Mqtt-Response-Topic";

/// One configured subject of `[[uplink.export]]` or `[[uplink.import]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The local subject filter.
    pub subject: String,
    /// Prepended on the hub (empty, or tokens ending in `.`).
    pub hub_prefix: String,
}

impl Entry {
    fn hub_filter(&self) -> String {
        self.hub_subject(&self.subject)
    }

    /// The hub subject of local subject `local`.
    fn hub_subject(&self, local: &str) -> String {
        format!("{}{local}", self.hub_prefix)
    }
}

/// What the bridge needs to know, fixed for its life.
#[derive(Debug, Clone)]
pub struct BridgeParams {
    pub exports: Vec<Entry>,
    pub imports: Vec<Entry>,
    /// Most entries per reply table.
    pub max_replies: usize,
    /// Most bytes per reply table.
    pub max_reply_bytes: usize,
    pub reply_ttl: Duration,
    /// Hub-bound bytes kept while the link is down.
    pub buffer_bytes: usize,
}

impl BridgeParams {
    /// Defaults for the bounds: 10,000 replies and 1 MiB per table, 2
    /// minutes, 64 KiB while down.
    pub fn new(exports: Vec<Entry>, imports: Vec<Entry>) -> BridgeParams {
        BridgeParams {
            exports,
            imports,
            max_replies: 10_000,
            max_reply_bytes: 1 << 20,
            reply_ttl: Duration::from_secs(120),
            buffer_bytes: 64 << 10,
        }
    }
}

/// A message as the local side sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMsg {
    pub subject: String,
    pub reply: Option<String>,
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// Counters, for `frond status` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BridgeStatus {
    /// Hub messages published locally (requests included).
    pub msgs_down: u64,
    /// Local messages sent to the hub, or kept in the down buffer to be
    /// sent (requests included).
    pub msgs_up: u64,
    /// Hub answers to local requests, published locally.
    pub replies_down: u64,
    /// Local answers to hub requests, sent to the hub.
    pub replies_up: u64,
    /// Extra copies of overlapping subscriptions, not passed on.
    pub duplicates: u64,
    /// Mapped to (or answering to) a reserved subject.
    pub dropped_reserved: u64,
    /// Answers to an unknown or expired inbox.
    pub dropped_no_inbox: u64,
    /// Hub-bound while the link was down and the buffer full.
    pub dropped_link_down: u64,
    /// Larger than the hub's `max_payload`.
    pub dropped_too_big: u64,
    /// Local messages the bridge's local queue had no room for.
    pub dropped_local_overflow: u64,
    /// Local requests whose requester may not subscribe to the reply.
    pub refused: u64,
    /// Reply-table entries evicted before their time (tables full).
    pub evicted: u64,
    /// Live entries: hub requests awaiting a local answer, local requests
    /// awaiting a hub answer.
    pub pending_hub_requests: usize,
    pub pending_local_requests: usize,
}

/// A bounded table of reply inboxes: inbox -> where the answer goes.
/// Bounded by entries and bytes; entries live `ttl`, oldest evicted first.
#[derive(Debug)]
pub struct Inboxes {
    map: HashMap<String, (String, Instant)>,
    order: VecDeque<String>,
    bytes: usize,
    max: usize,
    max_bytes: usize,
    ttl: Duration,
}

impl Inboxes {
    pub fn new(max: usize, max_bytes: usize, ttl: Duration) -> Inboxes {
        Inboxes {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max: max.max(1),
            max_bytes,
            ttl,
        }
    }

    fn cost(inbox: &str, to: &str) -> usize {
        2 * inbox.len() + to.len() + ENTRY_OVERHEAD
    }

    /// Remember `inbox -> to`; returns how many live entries were evicted
    /// to make room (an entry larger than the byte bound still fits alone).
    pub fn insert(&mut self, now: Instant, inbox: String, to: String) -> u64 {
        self.expire(now);
        let cost = Inboxes::cost(&inbox, &to);
        let mut evicted = 0;
        while !self.order.is_empty()
            && (self.map.len() >= self.max || self.bytes + cost > self.max_bytes)
        {
            self.pop_front();
            evicted += 1;
        }
        self.bytes += cost;
        self.order.push_back(inbox.clone());
        if let Some((old_to, _)) = self.map.insert(inbox.clone(), (to, now)) {
            // Same inbox twice (not produced by the bridge): keep one.
            self.bytes = self.bytes.saturating_sub(Inboxes::cost(&inbox, &old_to));
            self.order.retain(|k| k != &inbox);
            self.order.push_back(inbox);
        }
        evicted
    }

    /// Where an answer to `inbox` goes, while the entry lives.
    pub fn get(&mut self, now: Instant, inbox: &str) -> Option<&str> {
        self.expire(now);
        self.map.get(inbox).map(|(to, _)| to.as_str())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes accounted to the live entries.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn pop_front(&mut self) {
        if let Some(k) = self.order.pop_front() {
            if let Some((to, _)) = self.map.remove(&k) {
                self.bytes = self.bytes.saturating_sub(Inboxes::cost(&k, &to));
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(front) = self.order.front() {
            let old = self
                .map
                .get(front)
                .is_none_or(|(_, at)| now.saturating_duration_since(*at) >= self.ttl);
            if !old {
                break;
            }
            self.pop_front();
        }
    }
}

/// One hub subscription of the bridge.
#[derive(Debug)]
struct HubSub {
    sid: u64,
    filter: String,
    entry: Entry,
}

/// Whether a subject is in a namespace the bridge never writes to: the
/// `$` APIs (`$JS`, `$SYS`, `$KV`, …) and reply inboxes.
pub fn reserved(subject: &str) -> bool {
    subject.starts_with('$') || subject == "_INBOX" || subject.starts_with("_INBOX.")
}

/// The lowest id among `subs` (`(id, filter)`) whose filter matches
/// `subject`: the one subscription whose copy of a message is passed on.
pub fn first_match<'a>(
    subs: impl IntoIterator<Item = (u64, &'a str)>,
    subject: &str,
) -> Option<u64> {
    subs.into_iter()
        .filter(|(_, f)| subject::matches(f, subject))
        .map(|(id, _)| id)
        .min()
}

/// The live bridge's state machine.
pub struct Bridge {
    p: BridgeParams,
    hub_subs: Vec<HubSub>,
    /// The sid of `_INBOX.<token>.>` on the hub (with imports).
    reply_sid: Option<u64>,
    /// `_INBOX.<token>.`
    hub_inbox: String,
    /// Local inbox -> hub reply subject (hub requests).
    to_hub: Inboxes,
    /// Hub inbox -> local reply subject (local requests).
    to_local: Inboxes,
    down_buf: Vec<u8>,
    next: u64,
    stats: BridgeStatus,
    entropy: Box<dyn FnMut() -> [u8; 12] + Send>,
}

/// The local sid of the local inbox subscription; imports use 1..=n.
pub const LOCAL_INBOX_SID: u64 = 0;

impl Bridge {
    /// A bridge whose inbox names take randomness from `entropy` (the OS
    /// in the shell; a seeded generator in tests).
    pub fn new(p: BridgeParams, entropy: Box<dyn FnMut() -> [u8; 12] + Send>) -> Bridge {
        let to_hub = Inboxes::new(p.max_replies, p.max_reply_bytes, p.reply_ttl);
        let to_local = Inboxes::new(p.max_replies, p.max_reply_bytes, p.reply_ttl);
        let mut b = Bridge {
            p,
            hub_subs: Vec::new(),
            reply_sid: None,
            hub_inbox: String::new(),
            to_hub,
            to_local,
            down_buf: Vec::new(),
            next: 0,
            stats: BridgeStatus::default(),
            entropy,
        };
        b.hub_inbox = format!("_INBOX.{}.", b.secret());
        b
    }

    /// Make the hub subscriptions on `link` (kept across reconnects):
    /// exports, imports, then the reply wildcard when there are imports.
    pub fn attach(&mut self, link: &mut Link) -> Result<(), String> {
        let entries: Vec<Entry> = self
            .p
            .exports
            .iter()
            .chain(self.p.imports.iter())
            .cloned()
            .collect();
        for entry in entries {
            let filter = entry.hub_filter();
            let sid = link
                .subscribe(&filter, None)
                .map_err(|e| format!("cannot subscribe to {filter:?} on the hub: {e}"))?;
            self.hub_subs.push(HubSub { sid, filter, entry });
        }
        if !self.p.imports.is_empty() {
            let wildcard = format!("{}>", self.hub_inbox);
            let sid = link
                .subscribe(&wildcard, None)
                .map_err(|e| format!("cannot subscribe to {wildcard:?} on the hub: {e}"))?;
            self.reply_sid = Some(sid);
        }
        Ok(())
    }

    /// `(local sid, filter)` the shell subscribes to on the local router:
    /// [`LOCAL_INBOX_SID`] for the local reply inboxes, then `i + 1` for
    /// import `i`.
    pub fn local_subscriptions(&self) -> Vec<(u64, String)> {
        let mut v = vec![(LOCAL_INBOX_SID, format!("{LOCAL_INBOX_PREFIX}>"))];
        for (i, e) in self.p.imports.iter().enumerate() {
            v.push((i as u64 + 1, e.subject.clone()));
        }
        v
    }

    /// The link came up: send what was buffered while it was down.
    pub fn handle_up(&mut self, link: &mut Link) {
        if self.down_buf.is_empty() {
            return;
        }
        if let Some(out) = link.send() {
            out.append(&mut self.down_buf);
        }
    }

    /// A message from the hub. `Err` gives back a message that is not the
    /// bridge's (another user's subscription); `Ok(Some)`: publish it
    /// locally.
    pub fn handle_hub_msg(&mut self, now: Instant, m: MsgOp) -> Result<Option<LocalMsg>, MsgOp> {
        if Some(m.sid) == self.reply_sid {
            return Ok(self.hub_answer(now, m));
        }
        let Some(sub) = self.hub_subs.iter().find(|s| s.sid == m.sid) else {
            return Err(m);
        };
        let first = first_match(
            self.hub_subs.iter().map(|s| (s.sid, s.filter.as_str())),
            &m.subject,
        );
        if first != Some(sub.sid) {
            self.stats.duplicates += 1;
            return Ok(None);
        }
        let local = m
            .subject
            .strip_prefix(sub.entry.hub_prefix.as_str())
            .filter(|l| subject::matches(&sub.entry.subject, l) && !reserved(l));
        let Some(local) = local.map(str::to_string) else {
            self.stats.dropped_reserved += 1;
            return Ok(None);
        };
        let reply = match m.reply {
            Some(r) if r.starts_with('$') => {
                self.stats.dropped_reserved += 1;
                return Ok(None);
            }
            Some(r) => {
                let inbox = format!("{LOCAL_INBOX_PREFIX}{:x}.{}", self.bump(), self.secret());
                self.stats.evicted += self.to_hub.insert(now, inbox.clone(), r);
                Some(inbox)
            }
            None => None,
        };
        self.stats.msgs_down += 1;
        Ok(Some(LocalMsg {
            subject: local,
            reply,
            headers: without_response_topic(m.headers),
            payload: m.payload,
        }))
    }

    /// An answer on the hub to a local request.
    fn hub_answer(&mut self, now: Instant, m: MsgOp) -> Option<LocalMsg> {
        let Some(to) = self.to_local.get(now, &m.subject).map(str::to_string) else {
            self.stats.dropped_no_inbox += 1;
            return None;
        };
        self.stats.replies_down += 1;
        Some(LocalMsg {
            subject: to,
            reply: None,
            headers: without_response_topic(m.headers),
            payload: m.payload,
        })
    }

    /// A message from the local router for local subscription `sid` (see
    /// [`Bridge::local_subscriptions`]); what goes to the hub is written
    /// to `link` (or buffered while it is down).
    pub fn handle_local(&mut self, now: Instant, link: &mut Link, sid: u64, m: LocalMsg) {
        if sid == LOCAL_INBOX_SID {
            let Some(to) = self.to_hub.get(now, &m.subject).map(str::to_string) else {
                self.stats.dropped_no_inbox += 1;
                return;
            };
            if self.emit(link, &to, None, &m) {
                self.stats.replies_up += 1;
            }
            return;
        }
        let imports = self.p.imports.iter().enumerate();
        let first = first_match(
            imports.map(|(i, e)| (i as u64 + 1, e.subject.as_str())),
            &m.subject,
        );
        if first != Some(sid) {
            if first.is_some() {
                self.stats.duplicates += 1;
            }
            return;
        }
        let Some(entry) = usize::try_from(sid - 1)
            .ok()
            .and_then(|i| self.p.imports.get(i))
        else {
            return;
        };
        let hub_subject = entry.hub_subject(&m.subject);
        let reply = match &m.reply {
            Some(r) if r.starts_with('$') => {
                self.stats.dropped_reserved += 1;
                return;
            }
            Some(r) => {
                let (n, secret) = (self.bump(), self.secret());
                let inbox = format!("{}{n:x}.{secret}", self.hub_inbox);
                self.stats.evicted += self.to_local.insert(now, inbox.clone(), r.clone());
                Some(inbox)
            }
            None => None,
        };
        if self.emit(link, &hub_subject, reply.as_deref(), &m) {
            self.stats.msgs_up += 1;
        }
    }

    /// An `-ERR` the hub sent without closing. When it refuses one of the
    /// bridge's subscriptions (`Permissions Violation for Subscription to
    /// "S"`), that subscription no longer counts for the overlap rule, so
    /// an overlapping entry the hub does serve delivers instead. Returns
    /// the refused hub filter.
    pub fn handle_hub_error(&mut self, text: &str) -> Option<String> {
        let (_, rest) = text.split_once("Subscription to \"")?;
        let (filter, _) = rest.split_once('"')?;
        let before = self.hub_subs.len();
        self.hub_subs.retain(|s| s.filter != filter);
        (self.hub_subs.len() < before).then(|| filter.to_string())
    }

    /// Count a local request refused by the shell (the requester may not
    /// subscribe to its reply subject).
    pub fn count_refused(&mut self) {
        self.stats.refused += 1;
    }

    /// Count local messages the local queue dropped.
    pub fn count_local_overflow(&mut self, n: u64) {
        self.stats.dropped_local_overflow += n;
    }

    /// Forget reply-table entries older than `reply_ttl` (also done on
    /// every use; this keeps the status counts current when idle).
    pub fn handle_tick(&mut self, now: Instant) {
        self.to_hub.expire(now);
        self.to_local.expire(now);
    }

    pub fn status(&self) -> BridgeStatus {
        let mut s = self.stats.clone();
        s.pending_hub_requests = self.to_hub.len();
        s.pending_local_requests = self.to_local.len();
        s
    }

    /// Write one publish to the hub (or the down buffer); false if dropped.
    fn emit(&mut self, link: &mut Link, subject: &str, reply: Option<&str>, m: &LocalMsg) -> bool {
        let size = m.payload.len() + m.headers.as_ref().map_or(0, Vec::len);
        if size > link.max_payload() {
            self.stats.dropped_too_big += 1;
            return false;
        }
        let mut frame = Vec::new();
        let r = match &m.headers {
            Some(h) => client::hpublish(subject, reply, h, &m.payload, &mut frame),
            None => client::publish(subject, reply, &m.payload, &mut frame),
        };
        if r.is_err() {
            // A subject the hub protocol cannot carry: not ours to send.
            self.stats.dropped_reserved += 1;
            return false;
        }
        match link.send() {
            Some(out) => {
                out.append(&mut self.down_buf);
                out.extend_from_slice(&frame);
                true
            }
            None if self.down_buf.len() + frame.len() <= self.p.buffer_bytes => {
                self.down_buf.extend_from_slice(&frame);
                true
            }
            None => {
                self.stats.dropped_link_down += 1;
                false
            }
        }
    }

    fn bump(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// 96 random bits in hex.
    fn secret(&mut self) -> String {
        use std::fmt::Write;
        (self.entropy)()
            .iter()
            .fold(String::with_capacity(24), |mut s, x| {
                let _ = write!(s, "{x:02x}");
                s
            })
    }
}

/// `headers` without `Mqtt-Response-Topic` (dropped whole when
/// unreadable: a hub block frond cannot parse is not passed on half).
fn without_response_topic(headers: Option<Vec<u8>>) -> Option<Vec<u8>> {
    let block = headers?;
    let Ok(mut h) = HeaderBlock::parse(&block) else {
        return None;
    };
    if h.get(RESPONSE_TOPIC).is_none() {
        return Some(block);
    }
    h.remove(RESPONSE_TOPIC);
    if h.entries.is_empty() && h.status.is_none() {
        return None;
    }
    h.encode().ok()
}

#[cfg(test)]
#[path = "bridge_tests.rs"]
mod tests;
