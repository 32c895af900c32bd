//! The router: who is connected, who subscribes to what, and which stream
//! captures a subject.
//!
//! Owns: the subscription table (NATS filters, whatever protocol the
//! subscriber speaks) indexed by an interest trie
//! ([`crate::subject::SubjectTrie`]), queue groups, auto-unsubscribe after
//! N messages, the per-connection NATS outboxes ([`Outbox`]), the client-id
//! registry used for MQTT session takeover, and the subject -> stream
//! capture map.
//!
//! Two kinds of subscriber:
//! - MQTT sessions register filters with a channel of [`Delivery`],
//!   bounded by count (`max_queued`) and, once the connection registered
//!   its [`QueueBudget`] ([`Broker::limit_mqtt_queue`]), by bytes
//!   (`mqtt.max_queued_bytes`); a connection subscribed through several
//!   overlapping filters receives a message once, at the highest granted
//!   QoS (MQTT 3.1.1 §3.3.5).
//! - MQTT shared subscriptions (`$share/{group}/{filter}`) are queue
//!   subscriptions with the share name as queue group, so MQTT members of
//!   group `G` and NATS queue subscribers of group `G` share the messages
//!   of one subject (as in nats-server). A connection's shared copy is
//!   separate from its non-shared one (MQTT 5 §4.8.2).
//! - NATS connections register subscriptions by `sid` with their
//!   [`Outbox`]; every matching subscription gets its own copy (as in
//!   nats-server), except that a queue group gets each message once, at a
//!   randomly chosen member; a member whose queue is full (or a slow NATS
//!   connection) is passed over while another member has room.
//!
//! Who may receive (issue 10): a subscription receives a message only if
//! its connection may receive the subject (not denied by
//! `deny_subscribe`, [`crate::auth::Permissions::may_deliver`]; the shells
//! register a connection's permissions with [`Broker::set_permissions`])
//! and, for an MQTT filter starting with a wildcard, the subject does not
//! start with `$` (MQTT 3.1.1 §4.7.2). This is decided here, before a queue
//! group's member is chosen: the member is picked among those that may
//! receive the message (as nats-server does), and a group none of whose
//! members may receive it does not get it. Connections without a deny list
//! cost one pointer test per matching subscription. The protocol machines
//! check again at delivery (they also serve retained and stream messages).
//!
//! Invariants:
//! - Delivery never blocks a publisher: MQTT queues are bounded by count
//!   and bytes, NATS outboxes by bytes; when one is full the message is
//!   dropped for that subscriber only and counted (`dropped_slow`), and a
//!   NATS outbox is marked slow so its connection is closed (slow
//!   consumer). Other subscribers and the publisher are not affected. An
//!   empty queue always takes one message, however large, so a message
//!   bigger than a limit is never lost for a subscriber that keeps up.
//! - The table's lock is never held across an `.await`; while it is held,
//!   only non-blocking work happens (trie lookup, `try_send`, outbox push,
//!   which takes the outbox's own short lock: order table -> outbox).
//! - Every subscription of a connection is in `by_conn`, and in the trie
//!   under its filter, exactly while it is in `subs`.
//! - A subscription's `deny` is its connection's entry in the table's
//!   `deny` map (set by [`Broker::set_permissions`], dropped with the
//!   connection).
//! - At most one stream captures a subject (config refuses overlaps).
//! - Subject mappings ([`Broker::map_subject`]) are applied once, by the
//!   protocol shells, to each incoming publish before routing and capture.
//!
//! MQTT <-> NATS metadata: MQTT 5 properties are NATS headers on the
//! routed and stored message, a Response Topic is a reply subject, and
//! replies to MQTT 5 requests are redirected through [`Broker::replies`]
//! (see [`bridge`]). A NATS publish that a stream captures is durable, so
//! MQTT subscribers get it at QoS 1 (capped by their subscription); an
//! uncaptured one at QoS 0.

pub mod bridge;
pub mod nats;
pub mod persist;
pub mod retained;
pub mod session;
pub mod wills;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use smol::channel::{Sender, TrySendError};

use crate::auth::Permissions;
use crate::stream::StreamHandle;
use crate::subject::mapping::Mappings;
use crate::subject::{self, SubjectTrie};

/// A message handed to an MQTT subscriber.
#[derive(Debug)]
pub struct Delivery {
    /// The NATS subject.
    pub subject: String,
    pub payload: Vec<u8>,
    /// The publisher's QoS (0 for NATS publishes), capped at the
    /// subscription's.
    pub qos: u8,
    pub retain: bool,
    /// Chosen for a shared subscription (`$share/...`): delivered live
    /// even to a persistent session (see [`session`]).
    pub shared: bool,
    /// The NATS header block (MQTT 5 properties, see [`bridge`]).
    pub headers: Option<Vec<u8>>,
    /// The NATS reply subject (an MQTT 5 Response Topic).
    pub reply: Option<String>,
    /// When it was routed (MQTT message expiry counts from here).
    pub at: std::time::Instant,
}

impl Delivery {
    /// Bytes this delivery costs while queued (close to what it holds).
    pub fn cost(&self) -> usize {
        DELIVERY_OVERHEAD
            + self.subject.len()
            + self.payload.len()
            + self.headers.as_ref().map_or(0, Vec::len)
            + self.reply.as_ref().map_or(0, String::len)
    }
}

/// What a queued [`Delivery`] costs beyond its strings and payload (the
/// struct, its `Arc`, the channel slot).
pub const DELIVERY_OVERHEAD: usize = 128;

/// The byte budget of one MQTT connection's queued deliveries
/// (`mqtt.max_queued_bytes`), shared by the router, which charges what it
/// puts into the connection's channel, and the connection, which releases
/// what it takes out and reports what its session still holds in its own
/// queue ([`QueueBudget::set_held`]). A delivery is admitted while both
/// together stay within the limit, or when nothing is queued at all.
#[derive(Debug)]
pub struct QueueBudget {
    max_bytes: usize,
    /// Bytes in the channel.
    queued: AtomicUsize,
    /// Bytes the session holds (QoS 1/2 waiting for the client's window).
    held: AtomicUsize,
}

impl QueueBudget {
    pub fn new(max_bytes: usize) -> Arc<QueueBudget> {
        Arc::new(QueueBudget {
            max_bytes,
            queued: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
        })
    }

    /// Charge `n` bytes if they fit (or nothing is queued); false if not.
    pub fn try_charge(&self, n: usize) -> bool {
        let held = self.held.load(Ordering::Relaxed);
        let mut cur = self.queued.load(Ordering::Relaxed);
        loop {
            let used = cur.saturating_add(held);
            if used > 0 && used.saturating_add(n) > self.max_bytes {
                return false;
            }
            match self.queued.compare_exchange_weak(
                cur,
                cur.saturating_add(n),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// `n` bytes left the channel.
    pub fn release(&self, n: usize) {
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_sub(n))
            });
    }

    /// The session now holds `n` bytes in its own queue.
    pub fn set_held(&self, n: usize) {
        self.held.store(n, Ordering::Relaxed);
    }

    /// Bytes charged: in the channel plus held by the session.
    pub fn used(&self) -> usize {
        self.queued
            .load(Ordering::Relaxed)
            .saturating_add(self.held.load(Ordering::Relaxed))
    }

    /// Whether anything more fits now.
    pub fn has_room(&self) -> bool {
        self.used() < self.max_bytes
    }
}

/// A routed message as NATS subscribers see it; shared by all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub subject: String,
    pub reply: Option<String>,
    /// A raw `NATS/1.0` header block.
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// The permissions of the client that published it, when it has
    /// restrictions (`None`: an unrestricted client, or frond itself). The
    /// JetStream API service authorizes its callers with them
    /// (`server::jsapi`); subscribers never see them.
    pub publisher: Option<Arc<crate::auth::Permissions>>,
}

impl Msg {
    /// Bytes this message costs in an outbox (close to its wire size).
    pub fn size(&self) -> usize {
        self.subject.len()
            + self.reply.as_ref().map_or(0, String::len)
            + self.headers.as_ref().map_or(0, Vec::len)
            + self.payload.len()
            + 32
    }
}

/// Identifies one connection.
pub type ConnId = u64;

/// Identifies one subscription inside the router.
type SubId = u64;

enum Target {
    Mqtt {
        tx: Sender<Arc<Delivery>>,
        qos: u8,
        /// Deliveries queued in `tx` beyond which more are dropped (the
        /// channel may be unbounded: it then allocates only what is
        /// queued, so an idle client costs no queue memory).
        max_queued: usize,
        /// The connection's byte budget, if it registered one.
        budget: Option<Arc<QueueBudget>>,
    },
    Nats {
        outbox: Arc<Outbox>,
        sid: u64,
    },
}

struct Sub {
    conn: ConnId,
    filter: String,
    queue: Option<String>,
    target: Target,
    /// Remove after this many deliveries (NATS `UNSUB sid max`).
    max: Option<u64>,
    delivered: u64,
    /// The connection's permissions when they deny some subjects
    /// (`deny_subscribe`); `None`: it may receive whatever it matches.
    deny: Option<Arc<Permissions>>,
    /// An MQTT filter starting with a wildcard: it does not match subjects
    /// starting with `$` (MQTT 3.1.1 §4.7.2).
    dollar_blind: bool,
}

impl Sub {
    /// Whether this subscription may receive a message on `subj`
    /// (`dollar`: `subj` starts with `$`).
    #[inline]
    fn may_receive(&self, subj: &str, dollar: bool) -> bool {
        !(dollar && self.dollar_blind) && self.deny.as_ref().is_none_or(|p| p.may_deliver(subj))
    }
}

/// Whether an MQTT subscription to NATS filter `filter` must not receive
/// `$` subjects.
fn mqtt_dollar_blind(filter: &str) -> bool {
    filter.starts_with('*') || filter.starts_with('>')
}

#[derive(Default)]
struct Table {
    trie: SubjectTrie<SubId>,
    subs: subject::FastMap<SubId, Sub>,
    by_conn: subject::FastMap<ConnId, Vec<SubId>>,
    /// Connections whose permissions deny some subjects
    /// ([`Broker::set_permissions`]).
    deny: subject::FastMap<ConnId, Arc<Permissions>>,
    /// Byte budgets of MQTT connections ([`Broker::limit_mqtt_queue`]).
    budgets: subject::FastMap<ConnId, Arc<QueueBudget>>,
    next: SubId,
    /// Bumped (under the table's lock) by every change of `trie`;
    /// [`NoInterest`] memories are valid only while it stays the same.
    generation: Arc<AtomicU64>,
}

impl Table {
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn add(&mut self, mut sub: Sub) -> SubId {
        sub.deny = self.deny.get(&sub.conn).cloned();
        self.next += 1;
        let id = self.next;
        self.changed();
        self.trie.insert(&sub.filter, id);
        self.by_conn.entry(sub.conn).or_default().push(id);
        self.subs.insert(id, sub);
        id
    }

    fn remove(&mut self, id: SubId) {
        let Some(sub) = self.subs.remove(&id) else {
            return;
        };
        self.changed();
        self.trie.remove(&sub.filter, id);
        if let Some(ids) = self.by_conn.get_mut(&sub.conn) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_conn.remove(&sub.conn);
            }
        }
    }

    fn find(&self, conn: ConnId, pred: impl Fn(&Sub) -> bool) -> Option<SubId> {
        self.by_conn
            .get(&conn)?
            .iter()
            .copied()
            .find(|id| self.subs.get(id).is_some_and(&pred))
    }
}

/// Counters for monitoring.
#[derive(Default)]
pub struct Counters {
    pub msgs_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub msgs_out: AtomicU64,
    pub dropped_slow: AtomicU64,
    pub connections: AtomicU64,
    pub total_connections: AtomicU64,
    pub nats_connections: AtomicU64,
    pub slow_consumers: AtomicU64,
    /// Retained messages not stored because `mqtt.max_retained` or
    /// `mqtt.max_retained_bytes` was reached.
    pub retained_refused: AtomicU64,
}

/// The outcome of [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Over the byte limit: dropped, and the outbox is now marked slow.
    Slow,
    /// The connection is gone.
    Closed,
}

/// Messages waiting for one NATS connection, bounded by bytes.
///
/// The router pushes (never blocking); the connection's task takes them.
/// When a push would exceed the limit, the message is dropped and the
/// outbox is marked slow: the connection must then be closed as a slow
/// consumer.
pub struct Outbox {
    state: Mutex<OutboxState>,
    max_bytes: usize,
    ready: event_listener::Event,
}

#[derive(Default)]
struct OutboxState {
    items: VecDeque<(u64, Arc<Msg>)>,
    bytes: usize,
    slow: bool,
    closed: bool,
}

impl Outbox {
    pub fn new(max_bytes: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutboxState::default()),
            max_bytes,
            ready: event_listener::Event::new(),
        })
    }

    /// Queue `msg` for subscription `sid`.
    pub fn push(&self, sid: u64, msg: Arc<Msg>) -> Push {
        let mut st = lock(&self.state);
        if st.closed {
            return Push::Closed;
        }
        let size = msg.size();
        if st.slow || st.bytes.saturating_add(size) > self.max_bytes {
            let first = !st.slow;
            st.slow = true;
            drop(st);
            if first {
                self.ready.notify(usize::MAX);
            }
            return Push::Slow;
        }
        st.bytes += size;
        st.items.push_back((sid, msg));
        drop(st);
        self.ready.notify(usize::MAX);
        Push::Queued
    }

    /// Take queued messages, about `budget` bytes (at least one if any).
    pub fn take(&self, budget: usize) -> Vec<(u64, Arc<Msg>)> {
        let mut st = lock(&self.state);
        let mut out = Vec::new();
        let mut used = 0;
        while used < budget.max(1) {
            let Some((sid, m)) = st.items.pop_front() else {
                break;
            };
            let size = m.size();
            used += size;
            st.bytes = st.bytes.saturating_sub(size);
            out.push((sid, m));
        }
        out
    }

    /// Bytes waiting.
    pub fn pending(&self) -> usize {
        lock(&self.state).bytes
    }

    pub fn is_slow(&self) -> bool {
        lock(&self.state).slow
    }

    /// Refuse further pushes and drop what is queued.
    pub fn close(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        st.items.clear();
        st.bytes = 0;
    }

    /// Resolve once the outbox is slow, or (with `items`) once something
    /// is queued.
    pub async fn wait(&self, items: bool) {
        loop {
            let ready = |st: &OutboxState| (items && !st.items.is_empty()) || st.slow;
            if ready(&lock(&self.state)) {
                return;
            }
            let listener = self.ready.listen();
            if ready(&lock(&self.state)) {
                return;
            }
            listener.await;
        }
    }
}

/// Most subjects one [`NoInterest`] remembers.
const NO_INTEREST_MAX: usize = 256;

/// A connection's memory of subjects no subscription matched, so that
/// publishing to them again costs neither the router's lock nor a lookup
/// (the common case for telemetry nobody is watching live). Valid only
/// while the router's subscriptions are unchanged: any subscribe or
/// unsubscribe anywhere empties it at the next publish. Reply inboxes are
/// never remembered (each is used once).
#[derive(Debug, Default)]
pub struct NoInterest {
    generation: u64,
    subjects: subject::FastSet<Box<str>>,
}

impl NoInterest {
    /// Forget everything if the router's subscriptions changed since the
    /// memory was made; whether it is still valid.
    fn refresh(&mut self, generation: u64) -> bool {
        if self.generation == generation {
            return true;
        }
        self.subjects.clear();
        self.generation = generation;
        false
    }
}

/// The router shared by every listener task.
pub struct Broker {
    streams: Vec<StreamHandle>,
    table: Mutex<Table>,
    /// The table's generation, readable without its lock.
    generation: Arc<AtomicU64>,
    clients: Mutex<HashMap<String, (ConnId, Sender<()>)>>,
    next_conn: AtomicU64,
    pub counters: Counters,
    mappings: Mappings,
    /// Reply inboxes of MQTT 5 requests ([`bridge`]).
    pub replies: bridge::Replies,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these tables half
    // updated in a way that matters more than stopping would; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Who publishes, for echo suppression (NATS `echo: false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub conn: ConnId,
    /// Whether the publisher's own subscriptions receive the message.
    pub echo: bool,
}

impl Broker {
    pub fn new(streams: Vec<StreamHandle>) -> Arc<Broker> {
        Broker::with_mappings(streams, Mappings::default())
    }

    /// A broker that rewrites incoming publishes through `mappings`.
    pub fn with_mappings(streams: Vec<StreamHandle>, mappings: Mappings) -> Arc<Broker> {
        let table = Table::default();
        Arc::new(Broker {
            mappings,
            streams,
            generation: table.generation.clone(),
            table: Mutex::new(table),
            clients: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            counters: Counters::default(),
            replies: bridge::Replies::default(),
        })
    }

    pub fn streams(&self) -> &[StreamHandle] {
        &self.streams
    }

    pub fn new_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The subject an incoming client publish (MQTT or NATS) is routed and
    /// captured under: `subject` rewritten by the configured mappings
    /// (`[mappings]`), or unchanged. Protocol shells call this once per
    /// publish, before [`Broker::route`]/[`Broker::route_msg`] and
    /// [`Broker::capture`]; messages the server makes itself are not mapped.
    pub fn map_subject(&self, subject: String) -> String {
        if self.mappings.is_empty() {
            return subject;
        }
        match self.mappings.apply(&subject, || fastrand::u8(..100)) {
            Some(mapped) => mapped,
            None => subject,
        }
    }

    /// The stream that captures `subject`, if any.
    pub fn capture(&self, subj: &str) -> Option<&StreamHandle> {
        self.streams.iter().find(|s| {
            s.config()
                .subjects
                .iter()
                .any(|f| subject::matches(f, subj))
        })
    }

    /// Add an MQTT subscription for `conn`; replaces an identical filter of
    /// the same connection (MQTT semantics).
    pub fn subscribe(&self, conn: ConnId, filter: String, qos: u8, tx: Sender<Arc<Delivery>>) {
        let max_queued = tx.capacity().unwrap_or(usize::MAX);
        self.subscribe_mqtt(conn, None, filter, qos, tx, max_queued)
    }

    /// Add an MQTT subscription for `conn`, shared in queue group `share`
    /// when given (`$share/{share}/...`); replaces the same (share, filter)
    /// of the same connection. At most `max_queued` deliveries wait in
    /// `tx`; more are dropped for this subscriber.
    pub fn subscribe_mqtt(
        &self,
        conn: ConnId,
        share: Option<String>,
        filter: String,
        qos: u8,
        tx: Sender<Arc<Delivery>>,
        max_queued: usize,
    ) {
        let mut t = lock(&self.table);
        let same = |s: &Sub| {
            s.filter == filter && s.queue == share && matches!(s.target, Target::Mqtt { .. })
        };
        if let Some(id) = t.find(conn, same) {
            if let Some(Sub {
                target: Target::Mqtt { qos: q, .. },
                ..
            }) = t.subs.get_mut(&id)
            {
                *q = qos;
            }
            return;
        }
        let budget = t.budgets.get(&conn).cloned();
        t.add(Sub {
            conn,
            dollar_blind: mqtt_dollar_blind(&filter),
            filter,
            queue: share,
            target: Target::Mqtt {
                tx,
                qos,
                max_queued,
                budget,
            },
            max: None,
            delivered: 0,
            deny: None,
        });
    }

    /// The permissions of connection `conn` (`None`: unrestricted), for
    /// deciding who may receive what ([`Sub::may_receive`]). Shells call it
    /// once the client is authenticated, before it subscribes; it also
    /// applies to subscriptions the connection already holds. Forgotten by
    /// [`Broker::drop_conn`].
    pub fn set_permissions(&self, conn: ConnId, perms: Option<Arc<Permissions>>) {
        let deny = perms.filter(|p| !p.deny_subscribe.is_empty());
        let mut t = lock(&self.table);
        match &deny {
            Some(p) => {
                t.deny.insert(conn, p.clone());
            }
            None => {
                t.deny.remove(&conn);
            }
        }
        let ids = t.by_conn.get(&conn).cloned().unwrap_or_default();
        for id in ids {
            if let Some(s) = t.subs.get_mut(&id) {
                s.deny = deny.clone();
            }
        }
    }

    /// Remove an MQTT subscription; false if there was none.
    pub fn unsubscribe(&self, conn: ConnId, filter: &str) -> bool {
        self.unsubscribe_mqtt(conn, None, filter)
    }

    /// Remove an MQTT subscription, shared in group `share` when given;
    /// false if there was none.
    pub fn unsubscribe_mqtt(&self, conn: ConnId, share: Option<&str>, filter: &str) -> bool {
        let mut t = lock(&self.table);
        let same = |s: &Sub| {
            s.filter == filter
                && s.queue.as_deref() == share
                && matches!(s.target, Target::Mqtt { .. })
        };
        match t.find(conn, same) {
            Some(id) => {
                t.remove(id);
                true
            }
            None => false,
        }
    }

    /// Add NATS subscription `sid` of `conn`. False (and nothing changes)
    /// if the connection already has that sid.
    pub fn subscribe_nats(
        &self,
        conn: ConnId,
        sid: u64,
        filter: String,
        queue: Option<String>,
        outbox: Arc<Outbox>,
    ) -> bool {
        let mut t = lock(&self.table);
        if t.find(conn, |s| is_sid(s, sid)).is_some() {
            return false;
        }
        t.add(Sub {
            conn,
            filter,
            queue,
            target: Target::Nats { outbox, sid },
            max: None,
            delivered: 0,
            deny: None,
            dollar_blind: false,
        });
        true
    }

    /// NATS `UNSUB sid [max]`: remove now, or after `max` deliveries in
    /// total (at once if that many were already delivered).
    pub fn unsubscribe_nats(&self, conn: ConnId, sid: u64, max: Option<u64>) {
        let mut t = lock(&self.table);
        let Some(id) = t.find(conn, |s| is_sid(s, sid)) else {
            return;
        };
        match (max, t.subs.get_mut(&id)) {
            (Some(m), Some(s)) if s.delivered < m => s.max = Some(m),
            _ => t.remove(id),
        }
    }

    /// Bound the bytes queued for MQTT connection `conn` by `budget` (for
    /// the subscriptions it makes from now on; call before subscribing).
    /// Forgotten with [`Broker::drop_conn`].
    pub fn limit_mqtt_queue(&self, conn: ConnId, budget: Arc<QueueBudget>) {
        lock(&self.table).budgets.insert(conn, budget);
    }

    /// Remove every subscription of a connection.
    pub fn drop_conn(&self, conn: ConnId) {
        let mut t = lock(&self.table);
        t.deny.remove(&conn);
        t.budgets.remove(&conn);
        let ids = t.by_conn.remove(&conn).unwrap_or_default();
        for id in ids {
            if let Some(sub) = t.subs.remove(&id) {
                t.changed();
                t.trie.remove(&sub.filter, id);
            }
        }
    }

    /// Number of subscriptions (for monitoring and tests).
    pub fn subscription_count(&self) -> usize {
        lock(&self.table).subs.len()
    }

    /// Whether some subscription matches `subj`.
    pub fn has_interest(&self, subj: &str) -> bool {
        lock(&self.table).trie.has_interest(subj)
    }

    /// Hand an MQTT publish to every matching subscriber (live delivery).
    pub fn route(&self, subj: &str, payload: &[u8], qos: u8, retain: bool) {
        let _ = self.route_mqtt(subj, payload, qos, retain, None, None);
    }

    /// [`Broker::route`] with the NATS header block and reply subject an
    /// MQTT 5 publish maps to ([`bridge`]). Returns how many
    /// subscriptions it was handed to, as [`Broker::route_msg`].
    pub fn route_mqtt(
        &self,
        subj: &str,
        payload: &[u8],
        qos: u8,
        retain: bool,
        headers: Option<Vec<u8>>,
        reply: Option<String>,
    ) -> usize {
        self.route_mqtt_as(None, subj, payload, qos, retain, headers, reply)
    }

    /// [`Broker::route_mqtt`] for a client publish: NATS subscribers (the
    /// JetStream API service among them) see the publisher's permissions
    /// ([`Msg::publisher`]).
    #[allow(clippy::too_many_arguments)]
    pub fn route_mqtt_as(
        &self,
        publisher: Option<Arc<crate::auth::Permissions>>,
        subj: &str,
        payload: &[u8],
        qos: u8,
        retain: bool,
        headers: Option<Vec<u8>>,
        reply: Option<String>,
    ) -> usize {
        let mut headers = headers;
        let mut reply = reply;
        let mut publisher = publisher;
        self.route_inner(None, subj, qos, retain, &mut || {
            Arc::new(Msg {
                subject: subj.to_string(),
                reply: reply.take(),
                headers: headers.take(),
                payload: payload.to_vec(),
                publisher: publisher.take(),
            })
        })
        .unwrap_or(0)
    }

    /// Hand a message (NATS publish, or one the server makes, such as a
    /// JetStream acknowledgement) to every matching subscriber. Returns
    /// how many subscriptions it was handed to (queue groups count once),
    /// dropped ones included: 0 means nobody listens.
    pub fn route_msg(&self, origin: Option<Origin>, msg: Arc<Msg>, qos: u8) -> usize {
        let shared = &msg;
        self.route_inner(origin, &msg.subject, qos, false, &mut || shared.clone())
            .unwrap_or(0)
    }

    /// Whether `seen` remembers that a client publish to `subject` reaches
    /// nobody: no subscription matches it and no stream captures it (see
    /// [`NoInterest`]). Lock-free. Always false with `[mappings]`, whose
    /// rewrite comes first.
    pub fn publish_unwanted(&self, seen: &mut NoInterest, subject: &str) -> bool {
        if !self.mappings.is_empty() {
            return false;
        }
        seen.refresh(self.generation.load(Ordering::Acquire)) && seen.subjects.contains(subject)
    }

    /// [`Broker::route_msg`] for a connection's publishes that remembers,
    /// in `seen`, subjects that reached nobody (no subscription matched
    /// and, as the caller says with `captured`, no stream took the
    /// message), for [`Broker::publish_unwanted`]. Returns the message
    /// back, for capture into a stream (a copy only when a subscriber
    /// kept it).
    pub fn route_publish(
        &self,
        seen: &mut NoInterest,
        origin: Option<Origin>,
        msg: Msg,
        qos: u8,
        captured: bool,
    ) -> (usize, Msg) {
        seen.refresh(self.generation.load(Ordering::Acquire));
        let msg = Arc::new(msg);
        let shared = &msg;
        let routed = self.route_inner(origin, &msg.subject, qos, false, &mut || shared.clone());
        if routed.is_none() && !captured && !msg.subject.starts_with("_INBOX.") {
            if seen.subjects.len() >= NO_INTEREST_MAX {
                seen.subjects.clear();
            }
            seen.subjects.insert(msg.subject.as_str().into());
        }
        (routed.unwrap_or(0), Arc::unwrap_or_clone(msg))
    }

    /// Hand `msg` to the subscribers of `to` rather than of `msg.subject`
    /// (JetStream pull deliveries reach the request's inbox with the
    /// stored subject). Returns how many subscriptions got it.
    pub fn route_to(&self, to: &str, msg: Arc<Msg>) -> usize {
        self.route_inner(None, to, 0, false, &mut || msg.clone())
            .unwrap_or(0)
    }

    fn route_inner(
        &self,
        origin: Option<Origin>,
        subj: &str,
        qos: u8,
        retain: bool,
        make: &mut dyn FnMut() -> Arc<Msg>,
    ) -> Option<usize> {
        let mut t = lock(&self.table);
        let ids = t.trie.matches(subj);
        if ids.is_empty() {
            return None;
        }
        let skip_conn = origin.filter(|o| !o.echo).map(|o| o.conn);
        let dollar = subj.starts_with('$');
        // Choose recipients among the subscriptions that may receive the
        // subject: every plain one, one member per queue group.
        let mut chosen: Vec<SubId> = Vec::with_capacity(ids.len());
        let mut groups: Vec<(&str, Vec<SubId>)> = Vec::new();
        for id in ids.iter() {
            let Some(s) = t.subs.get(id) else { continue };
            if Some(s.conn) == skip_conn || !s.may_receive(subj, dollar) {
                continue;
            }
            match &s.queue {
                None => chosen.push(*id),
                Some(q) => match groups.iter_mut().find(|g| g.0 == q.as_str()) {
                    Some(g) => g.1.push(*id),
                    None => groups.push((q.as_str(), vec![*id])),
                },
            }
        }
        for (_, members) in &groups {
            if let Some(id) = pick_member(&t.subs, members) {
                chosen.push(id);
            }
        }
        drop(groups);
        let count = chosen.len();
        // MQTT: once per connection at the highest QoS (and once more for a
        // shared subscription of that connection).
        let mut mqtt: Vec<(ConnId, bool, u8, SubId)> = Vec::new();
        let mut msg: Option<Arc<Msg>> = None;
        let mut finished: Vec<SubId> = Vec::new();
        for id in chosen {
            let Some(s) = t.subs.get_mut(&id) else {
                continue;
            };
            s.delivered += 1;
            if s.max.is_some_and(|m| s.delivered >= m) {
                finished.push(id);
            }
            match &s.target {
                Target::Mqtt { qos: sub_qos, .. } => {
                    let q = qos.min(*sub_qos);
                    let shared = s.queue.is_some();
                    match mqtt.iter_mut().find(|h| h.0 == s.conn && h.1 == shared) {
                        Some(h) => {
                            if q > h.2 {
                                h.2 = q;
                                h.3 = id;
                            }
                        }
                        None => mqtt.push((s.conn, shared, q, id)),
                    }
                }
                Target::Nats { outbox, sid } => {
                    let m = msg.get_or_insert_with(&mut *make).clone();
                    match outbox.push(*sid, m) {
                        Push::Queued => {
                            self.counters.msgs_out.fetch_add(1, Ordering::Relaxed);
                        }
                        Push::Slow => {
                            self.counters.dropped_slow.fetch_add(1, Ordering::Relaxed);
                        }
                        Push::Closed => {}
                    }
                }
            }
        }
        // Only MQTT deliveries carry the routing time (message expiry).
        let now = match mqtt.is_empty() {
            true => None,
            false => Some(std::time::Instant::now()),
        };
        for (_, shared, q, id) in mqtt {
            let Some(Sub {
                target:
                    Target::Mqtt {
                        tx,
                        max_queued,
                        budget,
                        ..
                    },
                ..
            }) = t.subs.get(&id)
            else {
                continue;
            };
            if tx.len() >= *max_queued {
                self.counters.dropped_slow.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let m = msg.get_or_insert_with(&mut *make);
            if let Some(b) = budget {
                let cost = DELIVERY_OVERHEAD
                    + m.subject.len()
                    + m.payload.len()
                    + m.headers.as_ref().map_or(0, Vec::len)
                    + m.reply.as_ref().map_or(0, String::len);
                if !b.try_charge(cost) {
                    self.counters.dropped_slow.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            let d = Arc::new(Delivery {
                subject: m.subject.clone(),
                payload: m.payload.clone(),
                qos: q,
                retain,
                shared,
                headers: m.headers.clone(),
                reply: m.reply.clone(),
                at: now.unwrap_or_else(std::time::Instant::now),
            });
            match tx.try_send(d) {
                Ok(()) => {
                    self.counters.msgs_out.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Full(d)) => {
                    if let Some(b) = budget {
                        b.release(d.cost());
                    }
                    self.counters.dropped_slow.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Closed(d)) => {
                    if let Some(b) = budget {
                        b.release(d.cost());
                    }
                }
            }
        }
        for id in finished {
            t.remove(id);
        }
        Some(count)
    }

    /// Register `client_id` for `conn`. If another connection holds it,
    /// that one is told to close (session takeover).
    pub fn claim_client_id(&self, client_id: &str, conn: ConnId, kick: Sender<()>) {
        let old = lock(&self.clients).insert(client_id.to_string(), (conn, kick));
        if let Some((_, old_kick)) = old {
            let _ = old_kick.try_send(());
        }
    }

    /// Forget `client_id` if `conn` still holds it.
    pub fn release_client_id(&self, client_id: &str, conn: ConnId) {
        let mut clients = lock(&self.clients);
        if clients.get(client_id).map(|c| c.0) == Some(conn) {
            clients.remove(client_id);
        }
    }
}

/// One member of a queue group: a random one, or, if that one's queue is
/// full, the next (in a random rotation) that has room.
fn pick_member(subs: &subject::FastMap<SubId, Sub>, members: &[SubId]) -> Option<SubId> {
    let n = members.len();
    if n == 0 {
        return None;
    }
    let start = fastrand::usize(..n);
    let has_room = |id: &SubId| match subs.get(id).map(|s| &s.target) {
        Some(Target::Mqtt {
            tx,
            max_queued,
            budget,
            ..
        }) => {
            !tx.is_full() && tx.len() < *max_queued && budget.as_ref().is_none_or(|b| b.has_room())
        }
        Some(Target::Nats { outbox, .. }) => !outbox.is_slow(),
        None => false,
    };
    (0..n)
        .filter_map(|i| members.get((start + i) % n))
        .find(|id| has_room(id))
        .or_else(|| members.get(start))
        .copied()
}

fn is_sid(s: &Sub, sid: u64) -> bool {
    matches!(s.target, Target::Nats { sid: x, .. } if x == sid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smol::channel::bounded;

    fn msg(subject: &str, payload: &[u8]) -> Arc<Msg> {
        Arc::new(Msg {
            subject: subject.into(),
            reply: None,
            headers: None,
            payload: payload.to_vec(),
            publisher: None,
        })
    }

    #[test]
    fn mqtt_overlapping_filters_deliver_once_at_highest_qos() {
        let b = Broker::new(Vec::new());
        let (tx, rx) = bounded(8);
        b.subscribe(1, "a.*".into(), 0, tx.clone());
        b.subscribe(1, "a.>".into(), 1, tx.clone());
        b.subscribe(1, "a.>".into(), 2, tx); // replaces: qos 2
        assert_eq!(b.subscription_count(), 2);
        b.route("a.b", b"x", 2, false);
        let d = rx.try_recv().unwrap();
        assert_eq!((d.subject.as_str(), d.qos), ("a.b", 2));
        assert!(rx.try_recv().is_err(), "delivered once");
        assert!(b.unsubscribe(1, "a.>"));
        assert!(!b.unsubscribe(1, "a.>"));
        b.route("a.b", b"x", 2, false);
        assert_eq!(rx.try_recv().unwrap().qos, 0);
        b.drop_conn(1);
        assert_eq!(b.subscription_count(), 0);
        assert!(!b.has_interest("a.b"));
    }

    #[test]
    fn nats_subscriptions_each_get_a_copy_and_mqtt_sees_nats() {
        let b = Broker::new(Vec::new());
        let ob = Outbox::new(1 << 20);
        assert!(b.subscribe_nats(1, 10, "a.b".into(), None, ob.clone()));
        assert!(b.subscribe_nats(1, 11, "a.>".into(), None, ob.clone()));
        assert!(!b.subscribe_nats(1, 11, "x".into(), None, ob.clone()));
        let (tx, rx) = bounded(8);
        b.subscribe(2, "a.>".into(), 1, tx);
        assert_eq!(b.route_msg(None, msg("a.b", b"hi"), 0), 3);
        let mut sids: Vec<u64> = ob.take(usize::MAX).into_iter().map(|x| x.0).collect();
        sids.sort_unstable();
        assert_eq!(sids, vec![10, 11]);
        let d = rx.try_recv().unwrap();
        assert_eq!((d.payload.as_slice(), d.qos), (&b"hi"[..], 0));
        // MQTT publishes reach NATS subscribers.
        b.route("a.c", b"m", 1, false);
        let got = ob.take(usize::MAX);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1.payload.as_slice()), (11, &b"m"[..]));
    }

    #[test]
    fn remembered_no_interest_ends_with_any_subscription_change() {
        let b = Broker::new(Vec::new());
        let mut seen = NoInterest::default();
        let publish = |seen: &mut NoInterest, subject: &str| {
            let m = Arc::unwrap_or_clone(msg(subject, b"p"));
            if b.publish_unwanted(seen, subject) {
                return 0;
            }
            let (n, back) = b.route_publish(seen, None, m, 0, false);
            assert_eq!(
                (back.subject.as_str(), back.payload.as_slice()),
                (subject, &b"p"[..])
            );
            n
        };
        assert_eq!(publish(&mut seen, "t.a"), 0);
        assert_eq!(publish(&mut seen, "_INBOX.x"), 0);
        assert!(seen.subjects.contains("t.a"));
        assert!(
            !seen.subjects.contains("_INBOX.x"),
            "inboxes are not remembered"
        );
        // A subscription elsewhere (another connection, another subject)
        // makes the memory stale: the next publish looks again.
        let ob = Outbox::new(1 << 20);
        assert!(b.subscribe_nats(2, 1, "t.>".into(), None, ob.clone()));
        assert_eq!(publish(&mut seen, "t.a"), 1);
        assert_eq!(ob.take(usize::MAX).len(), 1);
        assert!(!seen.subjects.contains("t.a"));
        // Unsubscribing does too.
        b.unsubscribe_nats(2, 1, None);
        assert_eq!(publish(&mut seen, "t.a"), 0);
        assert_eq!(publish(&mut seen, "t.a"), 0);
        assert!(seen.subjects.contains("t.a"));
        assert!(b.subscribe_nats(3, 1, "t.a".into(), None, ob.clone()));
        assert_eq!(publish(&mut seen, "t.a"), 1);
        b.drop_conn(3);
        assert_eq!(publish(&mut seen, "t.a"), 0);
        assert!(ob.take(usize::MAX).len() == 1);
    }

    #[test]
    fn echo_off_skips_the_publisher() {
        let b = Broker::new(Vec::new());
        let ob = Outbox::new(1 << 20);
        b.subscribe_nats(1, 1, "a".into(), None, ob.clone());
        let me = Origin {
            conn: 1,
            echo: false,
        };
        assert_eq!(b.route_msg(Some(me), msg("a", b""), 0), 0);
        assert_eq!(
            b.route_msg(Some(Origin { echo: true, ..me }), msg("a", b""), 0),
            1
        );
        assert_eq!(ob.take(usize::MAX).len(), 1);
    }

    #[test]
    fn queue_groups_deliver_once_per_group_and_spread() {
        let b = Broker::new(Vec::new());
        let members: Vec<Arc<Outbox>> = (0..3).map(|_| Outbox::new(1 << 20)).collect();
        for (i, ob) in members.iter().enumerate() {
            b.subscribe_nats(
                i as u64,
                1,
                "job.*".into(),
                Some("workers".into()),
                ob.clone(),
            );
        }
        let other = Outbox::new(1 << 20);
        b.subscribe_nats(9, 1, "job.*".into(), Some("audit".into()), other.clone());
        for _ in 0..300 {
            assert_eq!(b.route_msg(None, msg("job.x", b""), 0), 2);
        }
        let counts: Vec<usize> = members.iter().map(|m| m.take(usize::MAX).len()).collect();
        assert_eq!(counts.iter().sum::<usize>(), 300);
        assert!(counts.iter().all(|&c| c > 50), "spread: {counts:?}");
        assert_eq!(other.take(usize::MAX).len(), 300);
    }

    #[test]
    fn unsub_max_removes_after_n() {
        let b = Broker::new(Vec::new());
        let ob = Outbox::new(1 << 20);
        b.subscribe_nats(1, 1, "a".into(), None, ob.clone());
        b.unsubscribe_nats(1, 1, Some(2));
        for _ in 0..5 {
            b.route_msg(None, msg("a", b""), 0);
        }
        assert_eq!(ob.take(usize::MAX).len(), 2);
        assert_eq!(b.subscription_count(), 0);
        // Already delivered enough: removed at once.
        b.subscribe_nats(1, 2, "a".into(), None, ob.clone());
        b.route_msg(None, msg("a", b""), 0);
        b.unsubscribe_nats(1, 2, Some(1));
        assert_eq!(b.subscription_count(), 0);
    }

    #[test]
    fn full_outbox_marks_slow_and_spares_others() {
        let b = Broker::new(Vec::new());
        let slow = Outbox::new(200);
        let fast = Outbox::new(1 << 20);
        b.subscribe_nats(1, 1, "a".into(), None, slow.clone());
        b.subscribe_nats(2, 1, "a".into(), None, fast.clone());
        for _ in 0..10 {
            b.route_msg(None, msg("a", &[0; 60]), 0);
        }
        assert!(slow.is_slow());
        assert!(slow.pending() <= 200);
        assert!(!fast.is_slow());
        assert_eq!(fast.take(usize::MAX).len(), 10);
        assert!(b.counters.dropped_slow.load(Ordering::Relaxed) > 0);
        slow.close();
        assert_eq!(slow.push(1, msg("a", b"")), Push::Closed);
    }

    #[test]
    fn outbox_take_respects_budget() {
        let ob = Outbox::new(1 << 20);
        for _ in 0..10 {
            ob.push(1, msg("a", &[0; 100]));
        }
        let size = msg("a", &[0; 100]).size();
        assert_eq!(ob.take(size * 3).len(), 3);
        assert_eq!(ob.take(0).len(), 1, "at least one");
        assert_eq!(ob.pending(), size * 6);
        smol::block_on(ob.wait(true));
    }

    #[test]
    fn mqtt_share_group_shares_with_nats_queue_group_and_keeps_plain_copy() {
        let b = Broker::new(Vec::new());
        let (tx1, rx1) = bounded(1000);
        let (tx2, rx2) = bounded(1000);
        b.subscribe_mqtt(1, Some("g".into()), "job.*".into(), 1, tx1.clone(), 1000);
        // The same connection also holds a plain subscription: own copy.
        b.subscribe(1, "job.*".into(), 0, tx1);
        b.subscribe_mqtt(2, Some("g".into()), "job.*".into(), 2, tx2, 1000);
        let nats = Outbox::new(1 << 20);
        b.subscribe_nats(3, 1, "job.*".into(), Some("g".into()), nats.clone());
        for _ in 0..300 {
            // One plain subscription plus one group.
            assert_eq!(b.route_msg(None, msg("job.x", b""), 2), 2);
        }
        let d1: Vec<Arc<Delivery>> = std::iter::from_fn(|| rx1.try_recv().ok()).collect();
        let d2: Vec<Arc<Delivery>> = std::iter::from_fn(|| rx2.try_recv().ok()).collect();
        let plain = d1.iter().filter(|d| !d.shared).count();
        let shared1 = d1.iter().filter(|d| d.shared).count();
        let n = nats.take(usize::MAX).len();
        assert_eq!(plain, 300);
        assert_eq!(shared1 + d2.len() + n, 300);
        assert!(
            shared1 > 30 && d2.len() > 30 && n > 30,
            "{shared1} {} {n}",
            d2.len()
        );
        assert!(
            d1.iter().filter(|d| d.shared).all(|d| d.qos == 1),
            "min(pub, sub)"
        );
        assert!(d2.iter().all(|d| d.qos == 2 && d.shared));
        assert!(b.unsubscribe_mqtt(1, Some("g"), "job.*"));
        assert!(!b.unsubscribe_mqtt(1, Some("g"), "job.*"));
        assert!(b.unsubscribe(1, "job.*"));
        assert_eq!(b.subscription_count(), 2);
    }

    #[test]
    fn queue_member_is_chosen_among_those_who_may_receive() {
        let b = Broker::new(Vec::new());
        let deny = Arc::new(Permissions {
            deny_subscribe: vec!["secret.>".into()],
            ..Permissions::default()
        });
        let (admin_tx, admin_rx) = bounded(1000);
        let (dave_tx, dave_rx) = bounded(1000);
        b.subscribe_mqtt(1, Some("g".into()), "secret.>".into(), 1, admin_tx, 1000);
        b.set_permissions(2, Some(deny.clone()));
        b.subscribe_mqtt(2, Some("g".into()), ">".into(), 1, dave_tx, 1000);
        let nats = Outbox::new(1 << 20);
        b.subscribe_nats(3, 1, ">".into(), Some("g".into()), nats.clone());
        // Permissions set after subscribing apply too.
        b.set_permissions(3, Some(deny.clone()));
        for _ in 0..100 {
            assert_eq!(b.route_msg(None, msg("secret.s", b""), 1), 1);
        }
        assert_eq!(admin_rx.len(), 100, "every one reaches the member allowed");
        assert_eq!((dave_rx.len(), nats.pending()), (0, 0));
        // A group none of whose members may receive it does not get it.
        b.drop_conn(1);
        assert_eq!(b.route_msg(None, msg("secret.s", b""), 1), 0);
        assert_eq!((dave_rx.len(), nats.pending()), (0, 0));
        // Other subjects still spread over the members.
        for _ in 0..100 {
            assert_eq!(b.route_msg(None, msg("a.b", b""), 1), 1);
        }
        let n = nats.take(usize::MAX).len();
        assert_eq!(dave_rx.len() + n, 100);
        assert!(n > 10 && dave_rx.len() > 10, "{n}");
        // A plain subscription that may not receive is not counted (a
        // request gets no-responders) and its UNSUB max is not used up.
        let plain = Outbox::new(1 << 20);
        b.set_permissions(4, Some(deny));
        b.subscribe_nats(4, 1, "secret.>".into(), None, plain.clone());
        b.unsubscribe_nats(4, 1, Some(1));
        assert_eq!(b.route_msg(None, msg("secret.x", b""), 0), 0);
        assert_eq!(b.subscription_count(), 3);
        b.drop_conn(4);
        assert!(!lock(&b.table).deny.contains_key(&4));
    }

    #[test]
    fn dollar_subjects_pick_a_member_whose_filter_names_them() {
        let b = Broker::new(Vec::new());
        let (wild_tx, wild_rx) = bounded(1000);
        let (sys_tx, sys_rx) = bounded(1000);
        b.subscribe_mqtt(1, Some("g".into()), ">".into(), 0, wild_tx, 1000);
        b.subscribe_mqtt(2, Some("g".into()), "$SYS.>".into(), 0, sys_tx, 1000);
        for _ in 0..50 {
            b.route("$SYS.up", b"", 0, false);
        }
        assert_eq!((wild_rx.len(), sys_rx.len()), (0, 50));
        // NATS subscribers match `$` subjects with wildcards (nats-server).
        let ob = Outbox::new(1 << 20);
        b.subscribe_nats(3, 1, ">".into(), None, ob.clone());
        assert_eq!(b.route_msg(None, msg("$SYS.up", b""), 0), 2);
        assert_eq!(ob.take(usize::MAX).len(), 1);
    }

    #[test]
    fn share_group_passes_over_a_full_member() {
        let b = Broker::new(Vec::new());
        let (full_tx, full_rx) = smol::channel::unbounded();
        let (tx, rx) = bounded(1000);
        b.subscribe_mqtt(1, Some("g".into()), "a".into(), 0, full_tx, 1);
        b.subscribe_mqtt(2, Some("g".into()), "a".into(), 0, tx, 1000);
        for _ in 0..100 {
            b.route("a", b"x", 0, false);
        }
        assert_eq!(full_rx.len(), 1);
        assert_eq!(rx.len(), 99, "nothing lost while a member had room");
        assert_eq!(b.counters.dropped_slow.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn mqtt_queue_bytes_are_bounded_and_given_back() {
        let b = Broker::new(Vec::new());
        let (tx, rx) = smol::channel::unbounded();
        let budget = QueueBudget::new(10_000);
        b.limit_mqtt_queue(1, budget.clone());
        b.subscribe_mqtt(1, None, "a".into(), 0, tx, 1000);
        let (fast_tx, fast_rx) = smol::channel::unbounded();
        b.subscribe_mqtt(2, None, "a".into(), 0, fast_tx, 1000);
        // An empty queue takes one message of any size.
        b.route("a", &[0; 50_000], 0, false);
        assert_eq!(rx.len(), 1);
        b.route("a", &[0; 1000], 0, false);
        assert_eq!(rx.len(), 1, "over the budget: dropped");
        assert_eq!(b.counters.dropped_slow.load(Ordering::Relaxed), 1);
        let d = rx.try_recv().unwrap();
        budget.release(d.cost());
        assert_eq!(budget.used(), 0);
        for _ in 0..20 {
            b.route("a", &[0; 1000], 0, false);
        }
        let cost = 1000 + 1 + DELIVERY_OVERHEAD;
        assert_eq!(rx.len(), 10_000 / cost);
        assert!(budget.used() <= 10_000);
        // What the session holds counts too.
        budget.set_held(budget.used());
        while let Ok(d) = rx.try_recv() {
            budget.release(d.cost());
        }
        b.route("a", &[0; 1000], 0, false);
        assert_eq!(rx.len(), 0, "the session holds the whole budget");
        budget.set_held(0);
        b.route("a", &[0; 1000], 0, false);
        assert_eq!(rx.len(), 1);
        // The other subscriber, without a budget, got every message.
        assert_eq!(fast_rx.len(), 24);
        // A connection's budget goes with it.
        b.drop_conn(1);
        assert!(lock(&b.table).budgets.is_empty());
    }

    #[test]
    fn share_group_passes_over_a_member_out_of_bytes() {
        let b = Broker::new(Vec::new());
        let (full_tx, full_rx) = smol::channel::unbounded();
        let (tx, rx) = smol::channel::unbounded();
        b.limit_mqtt_queue(1, QueueBudget::new(100));
        b.subscribe_mqtt(1, Some("g".into()), "a".into(), 0, full_tx, 1000);
        b.subscribe_mqtt(2, Some("g".into()), "a".into(), 0, tx, 1000);
        for _ in 0..100 {
            b.route("a", &[0; 200], 0, false);
        }
        assert!(full_rx.len() <= 1);
        assert_eq!(
            full_rx.len() + rx.len(),
            100,
            "nothing lost while a member had room"
        );
    }
}
