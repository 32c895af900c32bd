//! The subscription table: every subscription by id, by connection and
//! in the interest trie, and the choice of a queue group's member.
//!
//! Invariants: a subscription is in `by_conn`, and in the trie under its
//! filter, exactly while it is in `subs`; every change of the trie bumps
//! `generation` (under the table's lock).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{ConnId, DeliveryTx, Outbox};
use crate::auth::Permissions;
use crate::subject::{self, SubjectTrie};

/// Identifies one subscription inside the router.
pub(super) type SubId = u64;

pub(super) enum Target {
    Mqtt {
        /// The connection's queue, bounded by count and bytes.
        tx: DeliveryTx,
        qos: u8,
    },
    Nats {
        outbox: Arc<Outbox>,
        sid: u64,
    },
}

pub(super) struct Sub {
    pub(super) conn: ConnId,
    pub(super) filter: String,
    pub(super) queue: Option<String>,
    pub(super) target: Target,
    /// Remove after this many deliveries (NATS `UNSUB sid max`).
    pub(super) max: Option<u64>,
    pub(super) delivered: u64,
    /// The connection's permissions when they deny some subjects
    /// (`deny_subscribe`); `None`: it may receive whatever it matches.
    pub(super) deny: Option<Arc<Permissions>>,
    /// An MQTT filter starting with a wildcard: it does not match subjects
    /// starting with `$` (MQTT 3.1.1 §4.7.2).
    pub(super) dollar_blind: bool,
}

impl Sub {
    /// Whether this subscription may receive a message on `subj`
    /// (`dollar`: `subj` starts with `$`).
    #[inline]
    pub(super) fn may_receive(&self, subj: &str, dollar: bool) -> bool {
        !(dollar && self.dollar_blind) && self.deny.as_ref().is_none_or(|p| p.may_deliver(subj))
    }
}

/// Whether an MQTT subscription to NATS filter `filter` must not receive
/// `$` subjects.
pub(super) fn mqtt_dollar_blind(filter: &str) -> bool {
    filter.starts_with('*') || filter.starts_with('>')
}

#[derive(Default)]
pub(super) struct Table {
    pub(super) trie: SubjectTrie<SubId>,
    pub(super) subs: subject::FastMap<SubId, Sub>,
    pub(super) by_conn: subject::FastMap<ConnId, Vec<SubId>>,
    /// Connections whose permissions deny some subjects
    /// ([`Broker::set_permissions`]).
    pub(super) deny: subject::FastMap<ConnId, Arc<Permissions>>,
    pub(super) next: SubId,
    /// Bumped (under the table's lock) by every change of `trie`;
    /// [`NoInterest`] memories are valid only while it stays the same.
    pub(super) generation: Arc<AtomicU64>,
    /// Notified (under the table's lock) when a subscription is added
    /// ([`super::Broker::on_subscribe`]).
    pub(super) subscribed: Arc<event_listener::Event>,
    /// Routing's working lists, kept between publishes (empty between
    /// them) so that routing one allocates nothing: the chosen
    /// subscriptions, and the MQTT connections' copies.
    pub(super) chosen: Vec<SubId>,
    pub(super) copies: Vec<MqttCopy>,
}

/// One MQTT connection's copy of a message: (connection, through a shared
/// subscription, QoS, the subscription that gives it).
pub(super) type MqttCopy = (ConnId, bool, u8, SubId);

/// Working lists longer than this are not kept between publishes.
pub(super) const SCRATCH_KEEP: usize = 1024;

impl Table {
    pub(super) fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(super) fn add(&mut self, mut sub: Sub) -> SubId {
        sub.deny = self.deny.get(&sub.conn).cloned();
        self.next += 1;
        let id = self.next;
        self.changed();
        self.trie.insert(&sub.filter, id);
        self.by_conn.entry(sub.conn).or_default().push(id);
        self.subs.insert(id, sub);
        self.subscribed.notify(usize::MAX);
        id
    }

    pub(super) fn remove(&mut self, id: SubId) {
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

    pub(super) fn find(&self, conn: ConnId, pred: impl Fn(&Sub) -> bool) -> Option<SubId> {
        self.by_conn
            .get(&conn)?
            .iter()
            .copied()
            .find(|id| self.subs.get(id).is_some_and(&pred))
    }
}

/// One member of a queue group: a random one, or, if that one's queue is
/// full, the next (in a random rotation) that has room.
pub(super) fn pick_member(subs: &subject::FastMap<SubId, Sub>, members: &[SubId]) -> Option<SubId> {
    let n = members.len();
    if n == 0 {
        return None;
    }
    let start = fastrand::usize(..n);
    let has_room = |id: &SubId| match subs.get(id).map(|s| &s.target) {
        Some(Target::Mqtt { tx, .. }) => tx.has_room(),
        Some(Target::Nats { outbox, .. }) => !outbox.is_slow(),
        None => false,
    };
    (0..n)
        .filter_map(|i| members.get((start + i) % n))
        .find(|id| has_room(id))
        .or_else(|| members.get(start))
        .copied()
}

pub(super) fn is_sid(s: &Sub, sid: u64) -> bool {
    matches!(s.target, Target::Nats { sid: x, .. } if x == sid)
}
