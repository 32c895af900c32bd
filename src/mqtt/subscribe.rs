//! SUBSCRIBE and UNSUBSCRIBE: filters, quotas, subscription options and
//! the SUBACK held until a persistent session's state is durable.
//!
//! Subscriptions are keyed by the MQTT filter the client sent, and its
//! share name ([`Sub`]): `x` and `x/#` are two subscriptions, although
//! `x/#` maps to the NATS filters `x` and `x.>` (MQTT 5 §4.8, [MQTT-3.8.4-3],
//! [MQTT-3.10.4-1]). The router holds NATS filters, one registration per
//! (share name, NATS filter) of the connection, at the highest QoS of the
//! subscriptions that map to it; it hands a message to the connection
//! once, and the machine decides its delivery from the subscriptions that
//! match it: the highest of their QoS [MQTT-3.3.4-2], all their
//! subscription identifiers [MQTT-3.3.4-4], RETAIN kept if one has Retain
//! As Published [MQTT-3.3.1-13], and none of those with No Local when the
//! client published the message itself [MQTT-3.8.3-3] (the publishing
//! session marks its message with [`super::props::ORIGIN`] when one of its No
//! Local subscriptions matches it, so the rule holds for messages read
//! back from a stream too). UNSUBSCRIBE of one filter leaves the others;
//! a NATS filter is unregistered when no subscription maps to it any
//! more, and re-registered at a lower QoS when the highest one went. 5.0
//! UNSUBACK says 0x11 (no subscription existed) for a filter the client
//! did not hold, as Mosquitto does.
//!
//! Limits (`[mqtt]`): `max_subscriptions` per client (an MQTT `a/#` counts
//! once; refused filters get SUBACK 0x97, 3.1.1: 0x80), and
//! `max_topic_length`/`max_topic_levels` for topic names and filters (a
//! filter over them: SUBACK 0x8F / 0x80; a PUBLISH: 5.0 PUBACK/PUBREC 0x90,
//! or DISCONNECT 0x90 for QoS 0; 3.1.1 closes the connection). The connect
//! timeout is a deadline for the complete CONNECT counted from the
//! connection's start: bytes trickling in do not move it.
//!
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
use super::{Event, Session, State};
use crate::subject::mqtt as topics;
use crate::wire::mqtt::{
    self, reason, return_code, Packet, Properties, SubAck, Subscribe, SubscriptionOptions,
    UnsubAck, Unsubscribe, Version,
};

/// One subscription: the MQTT filter the client sent (after
/// `$share/{name}/`) with its share name and options, and the NATS
/// filters it is registered under (those the client may subscribe to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sub {
    pub(super) filter: String,
    pub(super) share: Option<String>,
    pub(super) nats: Vec<String>,
    pub(super) qos: u8,
    pub(super) no_local: bool,
    pub(super) retain_as_published: bool,
    pub(super) id: Option<u32>,
}

impl Sub {
    /// Whether this subscription matches NATS subject `subject`.
    pub(super) fn matches(&self, subject: &str) -> bool {
        self.nats
            .iter()
            .any(|f| crate::subject::matches(f, subject))
    }
}

/// One router registration to add or update: a NATS filter at the
/// highest QoS of the connection's subscriptions that map to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubRequest {
    pub filter: String,
    pub qos: u8,
    /// The retained messages matching `filter` are owed, at this QoS (the
    /// new subscription's; MQTT 5 retain handling: 0 always, 1 only for a
    /// new subscription, 2 never; never for a shared subscription).
    pub retained: Option<u8>,
    /// The share name of a shared subscription (`$share/{name}/...`).
    pub share: Option<String>,
}

/// A SUBACK of a persistent session, held until its state is durable
/// ([`Session::subscribe_done`]).
#[derive(Debug)]
pub(super) struct PendingSubAck {
    packet_id: u16,
    codes: Vec<u8>,
    /// Indices into `codes` of the filters granted.
    granted: Vec<usize>,
    /// The subscriptions before the SUBSCRIBE, restored if it fails.
    subs: Vec<Sub>,
}

/// The SUBACK code refusing a filter: the 5.0 `code`, or the one 3.1.1
/// failure code.
fn refused(v5: bool, code: u8) -> u8 {
    match v5 {
        true => code,
        false => return_code::SUBACK_FAILURE,
    }
}

impl Session {
    /// The router registrations the subscriptions need: (share name, NATS
    /// filter, highest QoS).
    pub(super) fn registrations(&self) -> Vec<(Option<String>, String, u8)> {
        let mut regs: Vec<(Option<String>, String, u8)> = Vec::new();
        for s in &self.subs {
            for nf in &s.nats {
                match regs.iter_mut().find(|r| r.0 == s.share && r.1 == *nf) {
                    Some(r) => r.2 = r.2.max(s.qos),
                    None => regs.push((s.share.clone(), nf.clone(), s.qos)),
                }
            }
        }
        regs
    }

    /// The QoS the router registration (`share`, `nf`) needs.
    fn registration_qos(&self, share: Option<&str>, nf: &str) -> u8 {
        self.subs
            .iter()
            .filter(|s| s.share.as_deref() == share && s.nats.iter().any(|f| f == nf))
            .map(|s| s.qos)
            .max()
            .unwrap_or(0)
    }

    /// Recompute what deliveries must look at after the subscriptions
    /// changed.
    pub(super) fn subs_changed(&mut self) {
        self.sub_opts = self
            .subs
            .iter()
            .any(|s| s.no_local || s.retain_as_published || s.id.is_some());
        self.no_local = self.subs.iter().any(|s| s.no_local);
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
                    *c = reason::UNSPECIFIED_ERROR;
                }
            }
            self.subs = p.subs;
            self.subs_changed();
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

    /// Check a SUBSCRIBE filter (the part after `$share/{name}/` for a
    /// shared one); `Err` is the 5.0 SUBACK reason code. The 5.0 decoder
    /// already refused malformed shared filters; 3.1.1 has no shared
    /// subscriptions in its grammar, so they are checked here.
    pub(super) fn check_filter(&self, share: Option<&str>, inner: &str) -> Result<(), u8> {
        if let Some(name) = share {
            if name.is_empty() || name.contains(['+', '#']) || !mqtt::valid_filter(inner) {
                return Err(reason::TOPIC_FILTER_INVALID);
            }
        }
        match self.topic_too_big(inner) {
            Some(why) => {
                log::debug!("mqtt: SUBSCRIBE refused: {why}");
                Err(reason::TOPIC_FILTER_INVALID)
            }
            None => Ok(()),
        }
    }

    /// Whether adding subscription (`share`, `filter`) would exceed
    /// `max_subscriptions`. Replacing an existing subscription never does.
    pub(super) fn over_quota(&self, filter: &str, share: Option<&str>) -> bool {
        let max = self.limits.max_subscriptions;
        if max == 0 {
            return false;
        }
        let exists = self
            .subs
            .iter()
            .any(|s| s.filter == filter && s.share.as_deref() == share);
        !exists && self.subscription_count() >= max
    }

    /// Subscriptions held (MQTT filters; `a/#` is one).
    pub fn subscription_count(&self) -> usize {
        self.subs.len()
    }

    pub(super) fn handle_subscribe(&mut self, s: Subscribe) {
        let sub_id = s.properties.subscription_identifiers.first().copied();
        let mut granted = Vec::new();
        let mut codes = Vec::new();
        let mut granted_at = Vec::new();
        let before = self.is_persistent().then(|| self.subs.clone());
        for (filter, opts) in s.filters {
            match self.subscribe_one(&filter, &opts, sub_id, &mut granted) {
                Ok(qos) => {
                    granted_at.push(codes.len());
                    codes.push(qos);
                }
                Err(code) => codes.push(code),
            }
        }
        self.subs_changed();
        self.events.push_back(Event::Subscribe(granted));
        match before {
            // Durable before acknowledged: the SUBACK waits for
            // the shell's save, and decoding waits with it.
            Some(subs) => self.subacks.push_back(Some(PendingSubAck {
                packet_id: s.packet_id,
                codes,
                granted: granted_at,
                subs,
            })),
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

    /// Subscribe one MQTT filter (adding it, or replacing the subscription
    /// of the same filter and share name), adding the router registrations
    /// it needs to `granted`: `Ok` with the granted QoS, or `Err` with the
    /// SUBACK failure code.
    fn subscribe_one(
        &mut self,
        filter: &str,
        opts: &SubscriptionOptions,
        sub_id: Option<u32>,
        granted: &mut Vec<SubRequest>,
    ) -> Result<u8, u8> {
        let v5 = self.version == Some(Version::V5);
        let qos = (opts.qos as u8).min(2);
        let (share, inner) = match mqtt::split_shared(filter) {
            Some((name, inner)) => (Some(name.to_string()), inner),
            None => (None, filter),
        };
        self.check_filter(share.as_deref(), inner)
            .map_err(|code| refused(v5, code))?;
        let mut nfs = topics::filter_to_subjects(inner);
        if let Some(p) = &self.perms {
            // `a/#` is `a.>` plus `a`: granted if either is
            // allowed, subscribing only the allowed ones.
            nfs.retain(|f| p.can_subscribe(f));
            if nfs.is_empty() {
                return Err(refused(v5, reason::NOT_AUTHORIZED));
            }
        }
        if self.over_quota(inner, share.as_deref()) {
            return Err(refused(v5, reason::QUOTA_EXCEEDED));
        }
        let sub = Sub {
            filter: inner.to_string(),
            share: share.clone(),
            nats: nfs.clone(),
            qos,
            // The 5.0 decoder refuses No Local on a shared subscription.
            no_local: opts.no_local && share.is_none(),
            retain_as_published: opts.retain_as_published,
            id: sub_id,
        };
        let existing = self
            .subs
            .iter()
            .position(|s| s.filter == sub.filter && s.share == sub.share);
        let new = existing.is_none();
        match existing.and_then(|i| self.subs.get_mut(i)) {
            Some(s) => *s = sub,
            None => self.subs.push(sub),
        }
        self.dirty = true;
        // MQTT 5 §4.8.2: no retained messages for a shared subscription.
        let send_retained = share.is_none()
            && match opts.retain_handling {
                0 => true,
                1 => new,
                _ => false,
            };
        for nf in nfs {
            granted.push(SubRequest {
                qos: self.registration_qos(share.as_deref(), &nf),
                filter: nf,
                retained: send_retained.then_some(qos),
                share: share.clone(),
            });
        }
        Ok(qos)
    }

    pub(super) fn handle_unsubscribe(&mut self, u: Unsubscribe) {
        let before = self.registrations();
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in u.filters {
            let (share, inner) = match mqtt::split_shared(&f) {
                Some((name, inner)) => (Some(name), inner),
                None => (None, f.as_str()),
            };
            let n = self.subs.len();
            self.subs
                .retain(|s| !(s.filter == inner && s.share.as_deref() == share));
            codes.push(match self.subs.len() < n {
                true => reason::SUCCESS,
                false => reason::NO_SUBSCRIPTION_EXISTED,
            });
        }
        self.subs_changed();
        self.dirty = true;
        let after = self.registrations();
        let mut gone = Vec::new();
        let mut gone_shared = Vec::new();
        let mut lowered = Vec::new();
        for (share, nf, q) in before {
            match after.iter().find(|r| r.0 == share && r.1 == nf) {
                None => match share {
                    Some(g) => gone_shared.push((g, nf)),
                    None => gone.push(nf),
                },
                Some(r) if r.2 != q => lowered.push(SubRequest {
                    filter: nf,
                    qos: r.2,
                    retained: None,
                    share,
                }),
                Some(_) => {}
            }
        }
        if !gone_shared.is_empty() {
            self.events.push_back(Event::UnsubscribeShared(gone_shared));
        }
        self.events.push_back(Event::Unsubscribe(gone));
        if !lowered.is_empty() {
            // The highest QoS on a NATS filter went with the removed
            // subscription: re-registered at what the others need.
            self.events.push_back(Event::Subscribe(lowered));
            self.subacks.push_back(None);
        }
        if self.version != Some(Version::V5) {
            codes.clear();
        }
        self.send(&Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            codes,
            properties: Properties::default(),
        }));
    }
}
