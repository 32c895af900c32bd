//! SUBSCRIBE and UNSUBSCRIBE: filters, quotas and the SUBACK held until a
//! persistent session's state is durable.
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
use std::collections::HashMap;

use super::{Event, Session, State};
use crate::subject::mqtt as topics;
use crate::wire::mqtt::{
    self, reason, return_code, Packet, Properties, SubAck, Subscribe, SubscriptionOptions,
    UnsubAck, Unsubscribe, Version,
};

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

/// A SUBACK of a persistent session, held until its state is durable
/// ([`Session::subscribe_done`]).
#[derive(Debug)]
pub(super) struct PendingSubAck {
    packet_id: u16,
    codes: Vec<u8>,
    /// Indices into `codes` of the filters granted.
    granted: Vec<usize>,
    /// The subscriptions before the SUBSCRIBE, restored if it fails.
    filters: Vec<(String, u8)>,
    shared: Vec<(String, String, u8)>,
    sub_ids: HashMap<String, u32>,
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

    /// Whether adding the NATS filters `nfs` (of one MQTT filter, shared in
    /// `share` or not) would exceed `max_subscriptions`. Replacing an
    /// existing subscription never does; `a/#` (`a` and `a.>`) counts once.
    pub(super) fn over_quota(&self, nfs: &[String], share: Option<&str>) -> bool {
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

    pub(super) fn handle_subscribe(&mut self, s: Subscribe) {
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
        for (filter, opts) in s.filters {
            match self.subscribe_one(&filter, &opts, sub_id, &mut granted) {
                Ok(qos) => {
                    granted_at.push(codes.len());
                    codes.push(qos);
                }
                Err(code) => codes.push(code),
            }
        }
        self.events.push_back(Event::Subscribe(granted));
        match before {
            // Durable before acknowledged: the SUBACK waits for
            // the shell's save, and decoding waits with it.
            Some((filters, shared, sub_ids)) => self.subacks.push_back(Some(PendingSubAck {
                packet_id: s.packet_id,
                codes,
                granted: granted_at,
                filters,
                shared,
                sub_ids,
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

    /// Subscribe one MQTT filter, adding what to subscribe to `granted`:
    /// `Ok` with the granted QoS, or `Err` with the SUBACK failure code.
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
        if self.over_quota(&nfs, share.as_deref()) {
            return Err(refused(v5, reason::QUOTA_EXCEEDED));
        }
        if let Some(name) = share {
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
            return Ok(qos);
        }
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
        Ok(qos)
    }

    pub(super) fn handle_unsubscribe(&mut self, u: Unsubscribe) {
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
            vec![reason::SUCCESS; n]
        } else {
            Vec::new()
        };
        self.send(&Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            codes,
            properties: Properties::default(),
        }));
    }
}
