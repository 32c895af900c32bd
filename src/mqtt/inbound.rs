//! PUBLISH from the client: topic aliases, topic limits, permissions,
//! Receive Maximum, the QoS 2 duplicate check, and acknowledgements in
//! arrival order once the shell has stored each message.
//!
//! A QoS 1/2 PUBLISH frond refuses (permissions, topic limits, or the
//! shell through [`Session::refuse_publish`]) still takes its place in the
//! acknowledgement order: a success in 3.1.1 (which has no negative ack),
//! its reason code in 5.0.

use super::{CloseReason, Event, Session, State, TOPIC_ALIAS_MAX};
use crate::mqtt::props;
use crate::subject::mqtt as topics;
use crate::wire::mqtt::{reason, Ack, Packet, Properties, Publish, QoS, Version};

impl Session {
    /// Whether inbound publishes awaiting storage stop decoding: 3.1.1
    /// clients are slowed through TCP; 5.0 clients are told the Receive
    /// Maximum and disconnected (0x93) when they exceed it, counting QoS 1
    /// publishes not yet PUBACK'd and QoS 2 ones not yet PUBCOMP'd (those
    /// awaiting storage, and those awaiting PUBREL; §3.3.4, §4.9).
    pub(super) fn inflight_blocks(&self) -> bool {
        self.version != Some(Version::V5) && self.pending_acks.len() >= self.limits.max_inflight
    }

    /// Resolve an MQTT 5 topic alias into `p.topic` (recording a new one);
    /// closes the connection and returns false for a bad alias or an
    /// empty topic without one.
    fn resolve_alias(&mut self, p: &mut Publish) -> bool {
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias == 0 || alias > TOPIC_ALIAS_MAX {
                self.close_with(
                    reason::TOPIC_ALIAS_INVALID,
                    CloseReason::ProtocolError(format!(
                        "topic alias {alias} is outside 1..={TOPIC_ALIAS_MAX}"
                    )),
                );
                return false;
            }
            if p.topic.is_empty() {
                match self.alias_in.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        self.close_with(
                            reason::PROTOCOL_ERROR,
                            CloseReason::ProtocolError(format!(
                                "topic alias {alias} was never set"
                            )),
                        );
                        return false;
                    }
                }
            } else {
                self.alias_in.insert(alias, p.topic.clone());
            }
        }
        if p.topic.is_empty() {
            self.close_with(
                reason::PROTOCOL_ERROR,
                CloseReason::ProtocolError("PUBLISH with an empty topic and no alias".into()),
            );
            return false;
        }
        true
    }

    /// A QoS 1/2 publish acknowledged in order without being stored: with
    /// 5.0 reason `code` when given (a refusal), else as a success.
    fn ack_unstored(&mut self, id: u16, qos: u8, code: Option<u8>) {
        if let Some(code) = code {
            self.denied.insert(id, code);
        }
        self.pending_acks.push_back((id, qos));
        self.events.push_back(Event::AckInOrder(id));
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2).
    fn send_ack(&mut self, qos: u8, ack: Ack) {
        if qos == 2 {
            self.send(&Packet::PubRec(ack));
        } else {
            self.send(&Packet::PubAck(ack));
        }
    }

    pub(super) fn handle_publish(&mut self, mut p: Publish) {
        if !self.resolve_alias(&mut p) {
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
                    self.ack_unstored(id, qos, Some(reason::TOPIC_NAME_INVALID))
                }
                _ => self.close_with(reason::TOPIC_NAME_INVALID, CloseReason::PublishRefused(why)),
            }
            return;
        }
        // A QoS 2 packet id already stored (or being stored): the client
        // resent it; it takes no new place in the window.
        let resent = qos == 2
            && p.packet_id.is_some_and(|id| {
                self.qos2_in.contains(&id)
                    || self.pending_acks.iter().any(|&(p, q)| p == id && q == 2)
            });
        if qos > 0
            && !resent
            && self.version == Some(Version::V5)
            && self.pending_acks.len() + self.qos2_in.len() >= self.limits.max_inflight
        {
            // Every one of those is still unfinished (QoS 1 not yet
            // PUBACK'd, QoS 2 not yet PUBCOMP'd, §4.9): the client cannot
            // have seen room for this one.
            self.close_with(
                reason::RECEIVE_MAXIMUM_EXCEEDED,
                CloseReason::ReceiveMaximumExceeded(self.limits.max_inflight),
            );
            return;
        }
        let mut props =
            (!p.properties.is_empty()).then(|| Box::new(std::mem::take(&mut p.properties)));
        let subject = topics::topic_into_subject(std::mem::take(&mut p.topic));
        self.mark_origin(&mut props, &subject);
        // An MQTT 5 request's Response Topic is checked as the requester's
        // own publish and subscribe ([`props::response_topic_allowed`]).
        let bad_response = props
            .as_ref()
            .and_then(|p| p.response_topic.as_deref())
            .filter(|t| !props::response_topic_allowed(self.perms.as_deref(), t));
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
                let v5 = self.version == Some(Version::V5);
                self.ack_unstored(id, qos, v5.then_some(reason::NOT_AUTHORIZED));
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
            (QoS::ExactlyOnce, Some(id)) if resent => {
                // Already stored (or being stored); the client resent it.
                // Answer again in order, without routing it twice.
                self.ack_unstored(id, 2, None);
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
            (_, None) => self.close_with(
                reason::MALFORMED_PACKET,
                CloseReason::ProtocolError("QoS > 0 PUBLISH without packet id".into()),
            ),
        }
    }

    /// No Local [MQTT-3.8.3-3]: when one of this client's No Local
    /// subscriptions matches its own publish, the message carries
    /// [`props::ORIGIN`] (its client id), so that no delivery to this
    /// client id through such a subscription happens, live or from a
    /// stream. A user property of that name from the client is dropped:
    /// it cannot hide its messages from another client.
    fn mark_origin(&self, props: &mut Option<Box<Properties>>, subject: &str) {
        if let Some(p) = props.as_mut().filter(|p| !p.user_properties.is_empty()) {
            p.user_properties
                .retain(|(k, _)| !k.eq_ignore_ascii_case(props::ORIGIN));
        }
        if self.no_local && self.subs.iter().any(|s| s.no_local && s.matches(subject)) {
            props
                .get_or_insert_with(Default::default)
                .user_properties
                .push((props::ORIGIN.into(), self.client_id.clone()));
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
                    code: self.denied.remove(&id).unwrap_or(reason::UNSPECIFIED_ERROR),
                    properties: Properties::default(),
                };
                self.send_ack(qos, ack);
            }
            Ok(()) => {
                let ack = Ack {
                    packet_id: id,
                    code: reason::SUCCESS,
                    properties: Properties::default(),
                };
                if qos == 2 {
                    // Durable before the PUBREC leaves ([`Session::take_sync`]).
                    self.qos2_in.insert(id);
                    self.dirty = true;
                    self.sync = true;
                }
                self.send_ack(qos, ack);
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
                        code: reason::UNSPECIFIED_ERROR, // not stored
                        properties: props,
                    };
                    self.send_ack(qos, ack);
                } else {
                    // 3.1.1 has no negative acknowledgement: closing the
                    // connection is the only way to say "not stored"; the
                    // client resends after reconnecting.
                    self.close_with(reason::UNSPECIFIED_ERROR, CloseReason::NotStored(why));
                }
            }
        }
        if !self.inbuf.is_empty() {
            self.process(self.now);
        }
    }

    /// Why a PUBLISH topic name exceeds `max_topic_length`/`max_topic_levels`.
    pub(super) fn topic_too_big(&self, topic: &str) -> Option<String> {
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
