//! Deliveries to the client: PUBLISH encoding with MQTT 5 properties and
//! topic aliases, packet ids, the in-flight window and the bounded queue
//! behind it, and the acknowledgements that free the window.
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
//!   to the connection's [`crate::router::QueueBudget`], so its delivery
//!   queue and this queue share one byte limit, and moves deliveries in
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
//!   ([`props`]); subscribers on 5.0 get them back as
//!   properties, plus the identifiers of every matching subscription
//!   (kept in stored sessions). Subscription options (No Local, Retain As
//!   Published, identifiers) are applied per delivery from the
//!   subscriptions it matches ([`Session::outgoing`]; see `subscribe.rs`). Message expiry counts from the routing
//!   time (router deliveries, also while queued) or the stored timestamp
//!   (stream messages); an expired message is not sent to anyone, and the
//!   interval sent is the remaining time.
//! - Live QoS 0 deliveries without properties, subscription options or
//!   topic alias (the common case) are encoded straight from the shared
//!   message ([`crate::wire::mqtt::encode_plain_publish`]): no copy of
//!   topic or payload per subscriber.
//! - Request Problem Information = 0: no reason string on acks. Request
//!   Response Information = 1: CONNACK Response Information
//!   `frond/response/<client id>` (`+`, `#`, `/` replaced by `_`).
use std::time::{Duration, Instant};

use super::{CloseReason, Session, State};
use crate::mqtt::props;
use crate::router::Delivery;
use crate::subject::mqtt as topics;
use crate::wire::mqtt::{self, Packet, Properties, Publish, QoS, Version};

/// An outbound QoS 1/2 message awaiting the client's acknowledgement.
#[derive(Debug)]
pub(super) struct Outbound {
    pub(super) packet_id: u16,
    /// For QoS 2: PUBREC seen, PUBREL sent, awaiting PUBCOMP.
    pub(super) released: bool,
    /// (follow index, stream sequence) for a message from a stream.
    pub(super) origin: Option<(usize, u64)>,
    /// Sent at QoS 2.
    pub(super) exactly_once: bool,
    /// Restored from the stored session, not yet sent again on this
    /// connection: resent (DUP, same packet id) when the stream is read
    /// up to it.
    pub(super) awaiting_resend: bool,
}

/// A QoS 1/2 delivery waiting for room in the client's window.
#[derive(Debug)]
pub(super) struct Queued {
    publish: Publish,
    /// When it expires (MQTT 5 message expiry).
    deadline: Option<Instant>,
    /// What it counts against `max_queued_bytes`.
    cost: usize,
}

/// How one message goes to this client ([`Session::outgoing`]).
#[derive(Debug, Default)]
pub(super) struct Outgoing {
    /// PUBLISH properties (5.0): from the message's headers, with the
    /// identifiers of the matching subscriptions; no message expiry yet.
    pub(super) props: Properties,
    /// How long the message lives (`Mqtt-Expiry`).
    pub(super) life: Option<Duration>,
    /// The publisher's QoS, when recorded (`Mqtt-QoS`).
    pub(super) published: Option<u8>,
    /// The highest QoS of the matching subscriptions (`None`: they were
    /// not looked at, or none matches).
    pub(super) granted: Option<u8>,
    /// A matching subscription has Retain As Published.
    pub(super) retain_as_published: bool,
    /// The stored copy of a retained publish (`Mqtt-Retain: 1`).
    pub(super) stored_retain: bool,
}

/// What [`Session::emit`] did with a PUBLISH.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Emitted {
    Sent,
    Expired,
    TooLarge,
}

impl Session {
    /// The outbound QoS 1/2 window: frond's `max_inflight`, capped by the
    /// client's Receive Maximum.
    pub(super) fn window(&self) -> usize {
        self.limits
            .max_inflight
            .min(self.client_receive_max)
            .min(65_535)
    }

    /// How a message on `subject` goes to this client (see [`Outgoing`]),
    /// from its NATS headers and reply subject and the subscriptions it
    /// matches (shared ones for a `shared` delivery, the others otherwise).
    /// `None`: not for this client — every matching subscription has No
    /// Local and the client published it, or (`need_match`, for stream
    /// messages) no subscription matches. Without subscription options
    /// and `need_match`, the subscriptions are not looked at (the live
    /// path of most clients costs what it did before options existed).
    pub(super) fn outgoing(
        &self,
        subject: &str,
        headers: Option<&[u8]>,
        reply: Option<&str>,
        shared: bool,
        need_match: bool,
    ) -> Option<Outgoing> {
        let mut out = Outgoing::default();
        if headers.is_none() && reply.is_none() && !self.sub_opts && !need_match {
            return Some(out);
        }
        let meta = props::headers_to_meta(headers, reply);
        out.life = meta.expiry.map(|e| Duration::from_secs(u64::from(e)));
        out.published = meta.qos;
        out.stored_retain = meta.retain;
        let mut ids = Vec::new();
        if self.sub_opts || need_match {
            let own = meta.origin.as_deref() == Some(self.client_id.as_str());
            let mut skipped = false;
            for s in &self.subs {
                if s.share.is_some() != shared || !s.matches(subject) {
                    continue;
                }
                if own && s.no_local {
                    skipped = true;
                    continue;
                }
                out.granted = out.granted.max(Some(s.qos.min(2)));
                out.retain_as_published |= s.retain_as_published;
                ids.extend(s.id);
            }
            if out.granted.is_none() && (skipped || need_match) {
                return None;
            }
        }
        if self.version != Some(Version::V5) {
            return Some(out);
        }
        out.props = meta.props;
        out.props.message_expiry_interval = None;
        ids.sort_unstable();
        ids.dedup();
        out.props.subscription_identifiers = ids;
        Some(out)
    }

    /// Send one PUBLISH: sets the remaining message expiry, a topic alias
    /// (when the client accepts them) and, for QoS 1/2, a packet id and the
    /// in-flight entry. Not sent when expired, or (MQTT 5 §3.1.2.11.4) when
    /// larger than the client's Maximum Packet Size.
    pub(super) fn emit(
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
        if self.unsend_if_too_large(start) {
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

    /// Send a QoS 0 PUBLISH without properties or topic alias, encoded
    /// straight from the shared message (no copy of topic or payload):
    /// the common live delivery. Not sent when larger than the client's
    /// Maximum Packet Size, as in [`Session::emit`].
    fn emit_plain(&mut self, subject: &str, payload: &[u8], retain: bool) {
        let (of, topic) = &mut **self.topic_of.get_or_insert_with(Default::default);
        if of != subject || topic.is_empty() {
            topics::subject_to_topic_into(subject, topic);
            of.clear();
            of.push_str(subject);
        }
        let v = self.version.unwrap_or(Version::V311);
        let start = self.out.len();
        if let Err(e) = mqtt::encode_plain_publish(&mut self.out, v, retain, topic, payload) {
            // As in `send`: our own packet; a failure is contained here.
            log::error!("cannot encode a PUBLISH to {subject}: {e}");
            self.closed(CloseReason::Internal(e.to_string()));
            return;
        }
        self.unsend_if_too_large(start);
    }

    /// Take the PUBLISH written at `start` back out of the output when it
    /// is larger than the client's Maximum Packet Size (counted in
    /// `oversize_dropped`); whether it was.
    fn unsend_if_too_large(&mut self, start: usize) -> bool {
        let size = self.out.len().saturating_sub(start);
        if self.client_max_packet.is_none_or(|max| size <= max) {
            return false;
        }
        self.out.truncate(start);
        self.oversize_dropped += 1;
        log::debug!(
            "mqtt: {}: a {size}-byte PUBLISH exceeds the client's maximum packet size; not sent",
            self.client_id
        );
        true
    }

    /// Send queued deliveries while the window has room.
    pub(super) fn pump(&mut self) {
        while self.state == State::Connected && self.outbound.len() < self.window() {
            let Some(q) = self.queued.pop_front() else {
                break;
            };
            self.queued_bytes = self.queued_bytes.saturating_sub(q.cost);
            self.emit(q.publish, q.deadline, None);
        }
    }

    pub(super) fn outbound_done(&mut self, packet_id: u16) {
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
            .is_some_and(|p| !p.may_deliver(d.subject()))
        {
            return;
        }
        let m = &*d.msg;
        if m.subject.starts_with('$') && !self.dollar_subscribed(&m.subject) {
            // MQTT 3.1.1 §4.7.2: a filter starting with a wildcard does not
            // match topics starting with `$`.
            return;
        }
        // `now` may be older than the routing time when no input came for a
        // while; expiry is counted from `d.at`.
        self.now = self.now.max(d.at);
        let (headers, reply) = (m.headers.as_deref(), m.reply.as_deref());
        if d.qos == 0 && headers.is_none() && reply.is_none() && !self.sub_opts {
            // No properties, options or expiry to apply: what `outgoing`
            // and `emit` would make, without an owned copy.
            let v5 = self.version == Some(Version::V5);
            if !(v5 && self.alias_out_max > 0) {
                self.emit_plain(&m.subject, &m.payload, retain);
                return;
            }
        }
        let Some(o) = self.outgoing(&m.subject, headers, reply, d.shared, false) else {
            return;
        };
        // The router sends at the highest QoS of the connection's
        // subscriptions on the subject; No Local may have left fewer.
        let qos = match o.granted.map_or(d.qos, |g| g.min(d.qos)) {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let publish = Publish {
            dup: false,
            qos,
            // A retained message owed to a new subscription has RETAIN
            // set; a live one keeps the publisher's flag only for Retain
            // As Published [MQTT-3.3.1-12], [MQTT-3.3.1-13].
            retain: retain || (d.retain && o.retain_as_published),
            topic: topics::subject_to_topic(&m.subject),
            packet_id: None,
            properties: o.props,
            payload: m.payload.clone(),
        };
        let deadline = o.life.map(|l| d.at + l);
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
    pub(super) fn dollar_subscribed(&self, subject: &str) -> bool {
        self.subs.iter().flat_map(|s| &s.nats).any(|f| {
            !(f.starts_with('*') || f.starts_with('>')) && crate::subject::matches(f, subject)
        })
    }

    pub(super) fn alloc_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.outbound.iter().any(|o| o.packet_id == id) {
                return id;
            }
        }
    }
}
