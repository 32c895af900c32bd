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
//! - MQTT sessions register filters with their connection's queue of
//!   [`Delivery`] ([`delivery_queue`]), bounded by count (`max_queued`)
//!   and by bytes (its [`QueueBudget`], `mqtt.max_queued_bytes`); a
//!   connection subscribed through several overlapping filters receives a message once, at the highest granted
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
//! - At most one stream captures a subject (config and API refuse
//!   overlaps; a catch-all `>` stream captures only what no other stream
//!   does, see [`StreamSet`]).
//! - Subject mappings ([`Broker::map_subject`]) are applied once, by the
//!   protocol shells, to each incoming publish before routing and capture.
//!
//! MQTT <-> NATS metadata: MQTT 5 properties are NATS headers on the
//! routed and stored message, a Response Topic is a reply subject, and
//! replies to MQTT 5 requests are redirected through [`Broker::replies`]
//! (see [`bridge`]). A NATS publish that a stream captures is durable, so
//! MQTT subscribers get it at QoS 1 (capped by their subscription); an
//! uncaptured one at QoS 0.

mod deliveries;
mod queues;
mod route;
mod streams;
mod table;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use smol::channel::Sender;

use crate::auth::Permissions;
use crate::broker::bridge;
use crate::stream::StreamHandle;
use crate::subject::mapping::Mappings;

pub use deliveries::{delivery_queue, DeliveryRx, DeliveryTx, Sent, Wakes};
use queues::NO_INTEREST_MAX;
pub use queues::{Delivery, Msg, NoInterest, Outbox, Push, QueueBudget, DELIVERY_OVERHEAD};
pub use streams::StreamSet;
use table::{is_sid, mqtt_dollar_blind, Sub, Table, Target};

/// Identifies one connection.
pub type ConnId = u64;

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

/// The router shared by every listener task.
pub struct Broker {
    streams: StreamSet,
    table: Mutex<Table>,
    /// The table's generation, readable without its lock.
    generation: Arc<AtomicU64>,
    /// The table's "a subscription was added" event.
    subscribed: Arc<event_listener::Event>,
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
            streams: StreamSet::new(streams),
            generation: table.generation.clone(),
            subscribed: table.subscribed.clone(),
            table: Mutex::new(table),
            clients: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            counters: Counters::default(),
            replies: bridge::Replies::default(),
        })
    }

    /// The streams now (a snapshot: streams are created and deleted at
    /// run time through the JetStream API).
    pub fn streams(&self) -> Arc<[StreamHandle]> {
        self.streams.snapshot()
    }

    /// The stream registry, for lookups.
    pub fn stream_set(&self) -> &StreamSet {
        &self.streams
    }

    /// Add stream `h` (or replace the one of its name): the JetStream API
    /// created or reopened it. Connections forget the subjects they
    /// remembered as reaching nobody ([`NoInterest`]).
    pub fn add_stream(&self, h: StreamHandle) {
        self.streams.insert(h);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Remove stream `name` (the caller closes it).
    pub fn remove_stream(&self, name: &str) -> Option<StreamHandle> {
        let h = self.streams.remove(name);
        self.generation.fetch_add(1, Ordering::Release);
        h
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
    pub fn capture(&self, subj: &str) -> Option<StreamHandle> {
        self.streams.capture(subj)
    }

    /// Add an MQTT subscription for `conn`; replaces an identical filter of
    /// the same connection (MQTT semantics).
    pub fn subscribe(&self, conn: ConnId, filter: String, qos: u8, tx: DeliveryTx) {
        self.subscribe_mqtt(conn, None, filter, qos, tx)
    }

    /// Add an MQTT subscription for `conn`, shared in queue group `share`
    /// when given (`$share/{share}/...`); replaces the same (share, filter)
    /// of the same connection. What does not fit in `tx` (its count and
    /// byte bounds) is dropped for this subscriber.
    pub fn subscribe_mqtt(
        &self,
        conn: ConnId,
        share: Option<String>,
        filter: String,
        qos: u8,
        tx: DeliveryTx,
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
        t.add(Sub {
            conn,
            dollar_blind: mqtt_dollar_blind(&filter),
            filter,
            queue: share,
            target: Target::Mqtt { tx, qos },
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

    /// Remove every subscription of a connection.
    pub fn drop_conn(&self, conn: ConnId) {
        let mut t = lock(&self.table);
        t.deny.remove(&conn);
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

    /// Changes with every subscription added or removed (and stream
    /// added or removed): read it before a [`Broker::has_interest`] check,
    /// compare after [`Broker::on_subscribe`], and no subscription is missed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Fires when a subscription is added after this call (push consumers
    /// waiting for a subscriber on their deliver subject wait on it).
    pub fn on_subscribe(&self) -> event_listener::EventListener {
        self.subscribed.listen()
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
