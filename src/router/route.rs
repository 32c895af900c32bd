//! Routing: hand one message to every subscription that matches and may
//! receive it — every plain subscription, one member per queue group, each
//! MQTT connection once at its highest granted QoS.
//!
//! Nothing here blocks or reads a clock: the caller passes `now`, the
//! routing time MQTT deliveries carry (message expiry counts from it).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::table::{pick_member, MqttCopy, Sub, SubId, Table, Target, SCRATCH_KEEP};
use super::{lock, Broker, ConnId, Delivery, Msg, NoInterest, Origin, Push, Sent, NO_INTEREST_MAX};

impl Broker {
    /// Hand an MQTT publish to every matching subscriber (live delivery).
    pub fn route(&self, subj: &str, payload: &[u8], qos: u8, retain: bool, now: Instant) {
        let _ = self.route_mqtt_as(None, subj, payload, qos, retain, None, None, now);
    }

    /// [`Broker::route`] for a client publish, with the NATS header block
    /// and reply subject an MQTT 5 publish maps to
    /// ([`crate::broker::bridge`]): NATS subscribers (the JetStream API
    /// service among them) see the publisher's permissions
    /// ([`Msg::publisher`]). The payload is copied only if a NATS
    /// subscriber takes the message. Returns how many subscriptions it was
    /// handed to, as [`Broker::route_msg`].
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
        now: Instant,
    ) -> usize {
        let mut headers = headers;
        let mut reply = reply;
        let mut publisher = publisher;
        self.route_inner(None, subj, qos, retain, now, &mut || {
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
    pub fn route_msg(&self, origin: Option<Origin>, msg: Arc<Msg>, qos: u8, now: Instant) -> usize {
        let shared = &msg;
        self.route_inner(origin, &msg.subject, qos, false, now, &mut || {
            shared.clone()
        })
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
        now: Instant,
    ) -> (usize, Msg) {
        seen.refresh(self.generation.load(Ordering::Acquire));
        let msg = Arc::new(msg);
        let shared = &msg;
        let routed = self.route_inner(origin, &msg.subject, qos, false, now, &mut || {
            shared.clone()
        });
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
    pub fn route_to(&self, to: &str, msg: Arc<Msg>, now: Instant) -> usize {
        self.route_inner(None, to, 0, false, now, &mut || msg.clone())
            .unwrap_or(0)
    }

    /// Route to the subscriptions of `subj`; `None` when none matches.
    /// `make` builds the shared message, at most once and only if some
    /// subscriber takes it.
    fn route_inner(
        &self,
        origin: Option<Origin>,
        subj: &str,
        qos: u8,
        retain: bool,
        now: Instant,
        make: &mut dyn FnMut() -> Arc<Msg>,
    ) -> Option<usize> {
        let mut t = lock(&self.table);
        let ids = t.trie.matches(subj);
        if ids.is_empty() {
            return None;
        }
        let mut chosen = std::mem::take(&mut t.chosen);
        choose(&t, &ids, origin, subj, &mut chosen);
        let count = chosen.len();
        let mut msg: Option<Arc<Msg>> = None;
        let mut mqtt = std::mem::take(&mut t.copies);
        let mut finished: Vec<SubId> = Vec::new();
        // Counted once per publish, not per subscriber.
        let (mut out, mut dropped) = (0, 0);
        for &id in &chosen {
            let Some(s) = t.subs.get_mut(&id) else {
                continue;
            };
            s.delivered += 1;
            if s.max.is_some_and(|m| s.delivered >= m) {
                finished.push(id);
            }
            match &s.target {
                Target::Mqtt { qos: sub_qos, .. } => {
                    mqtt_copy(&mut mqtt, s.conn, s.queue.is_some(), qos.min(*sub_qos), id)
                }
                Target::Nats { outbox, sid } => {
                    let m = msg.get_or_insert_with(&mut *make).clone();
                    match outbox.push(*sid, m) {
                        Push::Queued => out += 1,
                        Push::Slow => dropped += 1,
                        Push::Closed => {}
                    };
                }
            }
        }
        for &(_, shared, q, id) in &mqtt {
            let Some(sub) = t.subs.get(&id) else { continue };
            let m = msg.get_or_insert_with(&mut *make);
            match self.send_mqtt(sub, shared, q, retain, now, m) {
                Some(true) => out += 1,
                Some(false) => dropped += 1,
                None => {}
            }
        }
        if out > 0 {
            self.counters.msgs_out.fetch_add(out, Ordering::Relaxed);
        }
        if dropped > 0 {
            self.counters
                .dropped_slow
                .fetch_add(dropped, Ordering::Relaxed);
        }
        for id in finished {
            t.remove(id);
        }
        // Kept for the next publish unless one matched very many.
        if chosen.capacity() <= SCRATCH_KEEP {
            chosen.clear();
            t.chosen = chosen;
        }
        if mqtt.capacity() <= SCRATCH_KEEP {
            mqtt.clear();
            t.copies = mqtt;
        }
        Some(count)
    }

    /// Queue one MQTT delivery of `m` for `sub` if its queue takes it
    /// (count and bytes, [`super::DeliveryTx::try_send`]). `Some(true)`: queued;
    /// `Some(false)`: dropped (the caller counts it in `dropped_slow`);
    /// `None`: the connection is gone.
    fn send_mqtt(
        &self,
        sub: &Sub,
        shared: bool,
        qos: u8,
        retain: bool,
        now: Instant,
        m: &Arc<Msg>,
    ) -> Option<bool> {
        let Target::Mqtt { tx, .. } = &sub.target else {
            return None;
        };
        let d = Delivery {
            msg: m.clone(),
            qos,
            retain,
            shared,
            at: now,
        };
        match tx.try_send(d) {
            Sent::Queued => Some(true),
            Sent::Full => Some(false),
            Sent::Closed => None,
        }
    }
}

/// The recipients among the subscriptions `ids` that may receive `subj`,
/// into `chosen` (empty): every plain one, one member per queue group (the
/// publisher's own subscriptions left out when it does not want its echo).
fn choose(t: &Table, ids: &[SubId], origin: Option<Origin>, subj: &str, chosen: &mut Vec<SubId>) {
    let skip_conn = origin.filter(|o| !o.echo).map(|o| o.conn);
    let dollar = subj.starts_with('$');
    chosen.reserve(ids.len());
    let mut groups: Vec<(&str, Vec<SubId>)> = Vec::new();
    for id in ids {
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
}

/// MQTT: once per connection at the highest QoS (and once more for a
/// shared subscription of that connection).
fn mqtt_copy(mqtt: &mut Vec<MqttCopy>, conn: ConnId, shared: bool, q: u8, id: SubId) {
    match mqtt.iter_mut().find(|h| h.0 == conn && h.1 == shared) {
        Some(h) => {
            if q > h.2 {
                h.2 = q;
                h.3 = id;
            }
        }
        None => mqtt.push((conn, shared, q, id)),
    }
}
