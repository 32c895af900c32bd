//! CONNECT and CONNACK: authentication, the will, the persistent session
//! restored from storage, the client id's owner, and DISCONNECT.
//!
//! Wills are authorized at CONNECT (issue 10): with `[auth]`, a will whose
//! topic the user may not publish to, or whose MQTT 5 response topic it may
//! not subscribe to, refuses the CONNECT (5.0: CONNACK 0x87 with a reason
//! string; 3.1.1: return code 0x05), as HiveMQ, EMQX and VerneMQ do, rather
//! than accepting it and dropping the will later as Mosquitto 2 does: the
//! client learns of the mistake when it can still fix it, not when its
//! will silently never arrives. The will records its owner
//! ([`WillMessage::owner`]) so that a will restored after a restart is
//! checked again against the then current `[auth]`
//! ([`crate::broker::wills`]).
//!
//! Persistent sessions (3.1.1 `clean_session = 0`, or a 5.0 session expiry
//! interval > 0, capped by `mqtt.max_session_expiry`, which 3.1.1 persistent
//! sessions use as their expiry):
//! - After CONNECT the machine emits [`Event::Connected`] and waits
//!   (decoding nothing more) until the shell calls [`Session::restore`]
//!   with the stored state, if any: only then is CONNACK sent, with
//!   `session_present` = 1 when a stored session was resumed. Clean
//!   Start 0 resumes the stored session whatever the new Session Expiry
//!   Interval (absent, 0, or any other) [MQTT-3.1.2-5], [MQTT-3.2.2-3]:
//!   the new expiry only says when it ends — with 0, when this connection
//!   closes (§3.1.2.11.2; the shell deletes the stored copy once loaded,
//!   and the session still reads what its stream cursors kept for it,
//!   [`Session::follows_streams`]), as Mosquitto does. The
//!   stored subscriptions come back as an [`Event::Subscribe`] (without
//!   retained messages) and the inbound QoS 2 ids awaiting PUBREL are
//!   restored, so a publisher resending PUBLISH(DUP) or PUBREL after a
//!   reconnect is handled exactly once.
//! - The will is published when its delay passes or when the session
//!   ends, whichever comes first [MQTT-3.1.2-8], §3.1.3.2.2: its delay is
//!   capped by the session expiry at CONNECT (for the durable copy) and
//!   again by the expiry in force when the connection ends (a DISCONNECT
//!   may change it); with expiry 0 the will goes at once.
//! - Sessions belong to a user ([`Session::owner`]: the authenticated
//!   user name, or anonymous; nobody without `[auth]`). The stored
//!   session records its owner. A client id is never handed across
//!   users: while another user's connection holds it, or another user's
//!   stored session exists for it, the CONNECT is refused with "not
//!   authorized" ([`Session::refuse`]: 5.0 0x87, 3.1.1 0x05) — the holder
//!   is not kicked, the stored session is neither resumed nor deleted
//!   (not even by a clean start), and the refused connection's will is
//!   dropped. A session whose owner can no longer log in (removed from
//!   `[auth]`) is discarded and the newcomer starts fresh; one without
//!   owner (written by an earlier version, or without `[auth]`) is
//!   adopted by the first client that resumes it. The rule
//!   ([`crate::broker::persist::claim`]) follows MQTT 5 §5.4.2 (the server
//!   should check the client is authorized to use the client id) and
//!   brokers that enforce it (Azure Event Grid refuses live and kept
//!   sessions of another client; HiveMQ and EMQX leave it to plugins).
//!   Refusing rather than discarding keeps one user from erasing
//!   another's queued messages by guessing a client id.
//! - Restored subscriptions are re-checked against the client's current
//!   permissions (the configuration may have changed since they were
//!   granted): one no longer allowed is dropped, with a warning naming
//!   client id, user and filter.
//! - A 5.0 DISCONNECT with a Session Expiry Interval replaces the expiry
//!   (capped by `mqtt.max_session_expiry`; 0 deletes the stored session);
//!   setting one when CONNECT had 0 is a protocol error (DISCONNECT 0x82,
//!   the will is published; MQTT 5 §3.14.2.2.2).
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CloseReason, Event, Session, State, Sub, SubRequest, Timer, TOPIC_ALIAS_MAX};
use crate::auth::{Permissions, Refusal};
use crate::broker::persist::{log_id, Owner, StoredSession, StoredSub};
use crate::subject::mqtt as topics;
use crate::wire::mqtt::{
    self, reason, return_code, ConnAck, Disconnect, Packet, Properties, Version,
};

/// A will message to publish when the connection ends abnormally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillMessage {
    pub subject: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 will delay interval: publish this long after the connection
    /// ended, unless the same client id connects again first.
    pub delay: Duration,
    /// MQTT 5 will properties carried with the message ([`super::props`]).
    pub props: Option<Box<Properties>>,
    /// Who armed it, for re-checking its permission after a restart;
    /// `None` without `[auth]`.
    pub owner: Option<Owner>,
}

impl Session {
    pub(super) fn handle_connect(&mut self, mut c: mqtt::Connect, _now: Instant) {
        self.version = Some(c.version);
        let v5 = c.version == Version::V5;
        let will = c.will.take();
        if v5 && c.properties.authentication_method.is_some() {
            // Enhanced authentication (§4.12) is not supported: CONNACK
            // 0x8C and close [MQTT-4.12.0-1], as Mosquitto does without an
            // authentication plugin.
            let why = "enhanced authentication (an Authentication Method) is not supported";
            self.refuse_connect(
                reason::BAD_AUTHENTICATION_METHOD,
                Some(why.into()),
                CloseReason::Unsupported("enhanced authentication"),
            );
            return;
        }
        if !self.authenticate(&c, v5) || !self.accept_will(will, c.username.as_deref(), v5) {
            return;
        }
        let mut client_id = std::mem::take(&mut c.client_id);
        let mut props = Properties::default();
        if v5 {
            let cp = &c.properties;
            self.client_receive_max = usize::from(cp.receive_maximum.unwrap_or(65_535).max(1));
            self.alias_out_max = cp.topic_alias_maximum.unwrap_or(0);
            self.client_max_packet = cp.maximum_packet_size.and_then(|m| usize::try_from(m).ok());
            self.problem_info = cp.request_problem_information != Some(0);
        }
        if client_id.is_empty() {
            if !c.clean_start && !v5 {
                // 3.1.1 §3.1.3-8: an empty id needs CleanSession = 1.
                self.refuse_connect(
                    return_code::IDENTIFIER_REJECTED,
                    None,
                    CloseReason::Refused("empty client id without clean session".into()),
                );
                return;
            }
            client_id = format!("frond-{:016x}", fastrand::u64(..));
            if v5 {
                props.assigned_client_identifier = Some(client_id.clone());
            }
        }
        self.negotiate(&c, &client_id, &mut props);
        self.state = State::Restoring;
        self.pending_connack = Some(props);
        self.client_id = client_id.clone();
        self.clean_start = c.clean_start;
        self.events.push_back(Event::Connected {
            client_id,
            clean: c.clean_start,
            expiry: self.expiry,
        });
    }

    /// Check the credentials when `[auth]` is configured; refuses the
    /// CONNECT (CONNACK, then close) and returns false when they fail.
    fn authenticate(&mut self, c: &mqtt::Connect, v5: bool) -> bool {
        let Some(auth) = &self.limits.auth else {
            return true;
        };
        match auth.authenticate(c.username.as_deref(), c.password.as_deref()) {
            Ok(p) => {
                self.logged_in(p, c.username.as_deref());
                true
            }
            Err(r) => {
                let code = match (r, v5) {
                    (Refusal::BadCredentials, false) => return_code::BAD_USER_NAME_OR_PASSWORD,
                    (Refusal::NotAuthorized, false) => return_code::NOT_AUTHORIZED,
                    (Refusal::BadCredentials, true) => reason::BAD_USER_NAME_OR_PASSWORD,
                    (Refusal::NotAuthorized, true) => reason::NOT_AUTHORIZED,
                };
                let why = CloseReason::AuthFailed {
                    user: c.username.clone().unwrap_or_default(),
                    refusal: format!("{r:?}"),
                };
                self.refuse_connect(code, None, why);
                false
            }
        }
    }

    /// CONNACK with the failure `code` (and a 5.0 reason string), then
    /// close.
    fn refuse_connect(&mut self, code: u8, reason_string: Option<String>, why: CloseReason) {
        self.send(&Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: Properties {
                reason_string,
                ..Properties::default()
            },
        }));
        self.closed(why);
    }

    /// Keep-alive, session expiry and the 5.0 CONNACK properties
    /// (frond's limits, response information) for an accepted CONNECT.
    fn negotiate(&mut self, c: &mqtt::Connect, client_id: &str, props: &mut Properties) {
        let v5 = c.version == Version::V5;
        let max_ka = self.limits.max_keep_alive;
        let ka = if c.keep_alive > max_ka || (c.keep_alive == 0 && v5) {
            if v5 {
                props.server_keep_alive = Some(max_ka);
                max_ka
            } else {
                c.keep_alive
            }
        } else {
            c.keep_alive
        };
        self.keep_alive = (ka > 0).then(|| Duration::from_secs(u64::from(ka)));
        if v5 {
            props.maximum_packet_size = u32::try_from(self.limits.max_packet_size).ok();
            props.receive_maximum = u16::try_from(self.limits.max_inflight).ok();
            props.topic_alias_maximum = Some(TOPIC_ALIAS_MAX);
            props.shared_subscription_available = Some(1);
            if c.properties.request_response_information == Some(1) {
                // A per-client topic prefix for response topics.
                let id: String = client_id
                    .chars()
                    .map(|ch| match ch {
                        '+' | '#' | '/' | '\0' => '_',
                        other => other,
                    })
                    .collect();
                props.response_information = Some(format!("frond/response/{id}"));
            }
        }
        let max_exp = self.limits.max_session_expiry;
        self.expiry = if v5 {
            match c.properties.session_expiry_interval.unwrap_or(0) {
                0 => Duration::ZERO,
                s => {
                    let granted = Duration::from_secs(u64::from(s)).min(max_exp);
                    if granted.as_secs() < u64::from(s) {
                        props.session_expiry_interval =
                            Some(u32::try_from(granted.as_secs()).unwrap_or(u32::MAX));
                    }
                    granted
                }
            }
        } else if c.clean_start {
            Duration::ZERO
        } else {
            max_exp
        };
    }

    /// Arm the will of CONNECT, owned by who logged in. A will is a
    /// publish by this client: one it may not make refuses the CONNECT (as
    /// HiveMQ, EMQX and VerneMQ do; CONNACK not authorized, then close),
    /// so the client learns at once rather than when its will is dropped.
    /// Returns whether the CONNECT goes on.
    pub(super) fn accept_will(
        &mut self,
        will: Option<mqtt::Will>,
        user: Option<&str>,
        v5: bool,
    ) -> bool {
        let owner = self.owner.clone();
        self.will = will.map(|w| WillMessage {
            subject: topics::topic_to_subject(&w.topic),
            delay: Duration::from_secs(u64::from(w.properties.will_delay_interval.unwrap_or(0))),
            payload: w.payload,
            qos: w.qos as u8,
            retain: w.retain,
            props: (!w.properties.is_empty()).then(|| Box::new(w.properties)),
            owner,
        });
        let Some(why) = self.will_refused() else {
            return true;
        };
        self.will = None;
        let code = match v5 {
            true => reason::NOT_AUTHORIZED,
            false => return_code::NOT_AUTHORIZED,
        };
        let log = format!(
            "CONNECT refused for user {:?}: {why}",
            user.unwrap_or_default()
        );
        self.refuse_connect(code, v5.then_some(why), CloseReason::Refused(log));
        false
    }

    /// Why the will from CONNECT may not be armed, if so: its client may
    /// not publish to its topic, or not subscribe to its response topic
    /// (the reply would reach a subject the client may not read).
    pub(super) fn will_refused(&self) -> Option<String> {
        let (Some(w), Some(p)) = (&self.will, &self.perms) else {
            return None;
        };
        if !p.can_publish(&w.subject) {
            let topic = topics::subject_to_topic(&w.subject);
            return Some(format!("not authorized to publish the will to {topic}"));
        }
        let response = w.props.as_ref().and_then(|x| x.response_topic.as_deref());
        match response {
            Some(rt) if !p.can_subscribe(&topics::topic_to_subject(rt)) => Some(format!(
                "not authorized to subscribe to the will's response topic {rt}"
            )),
            _ => None,
        }
    }

    /// Authenticated as `user` (`None`: anonymous) with permissions `p`.
    pub(super) fn logged_in(&mut self, p: Arc<Permissions>, user: Option<&str>) {
        self.perms = (!p.is_unrestricted()).then_some(p);
        self.owner = Some(user.map_or(Owner::Anonymous, |u| Owner::User(u.into())));
    }

    /// Finish CONNECT: `stored` is the persistent state found for this
    /// client id (None for a clean session or when there was none). Sends
    /// CONNACK and resumes decoding.
    pub fn restore(&mut self, stored: Option<StoredSession>) {
        if self.state != State::Restoring {
            return;
        }
        let props = self.pending_connack.take().unwrap_or_default();
        // Clean Start 0 resumes a stored session whatever the new expiry
        // (the shell passes one only then): with expiry 0 it ends when
        // this connection closes [MQTT-3.1.2-5], §3.1.2.11.2.
        let stored = stored.filter(|_| !self.clean_start);
        let present = stored.is_some();
        if let Some(st) = stored {
            self.resumed = true;
            self.qos2_in = st.qos2_in.into_iter().collect();
            self.subs = self.recheck_restored(st.subs);
            self.subs_changed();
            self.restored_cursors = st.cursors;
            let subs: Vec<SubRequest> = self
                .registrations()
                .into_iter()
                .map(|(share, filter, qos)| SubRequest {
                    filter,
                    qos,
                    retained: None,
                    share,
                })
                .collect();
            if !subs.is_empty() {
                self.events.push_back(Event::Subscribe(subs));
                self.subacks.push_back(None);
            }
        }
        // The will goes when its delay passes or the session ends,
        // whichever is first [MQTT-3.1.2-8], §3.1.3.2.2.
        let expiry = self.expiry;
        if let Some(w) = &mut self.will {
            w.delay = w.delay.min(expiry);
        }
        self.state = State::Connected;
        self.timers.stop(Timer::Connect);
        self.arm_keep_alive();
        self.dirty = self.is_persistent();
        self.was_persistent = self.is_persistent();
        self.send(&Packet::ConnAck(ConnAck {
            session_present: present,
            code: return_code::ACCEPTED,
            properties: props,
        }));
        self.process(self.now);
    }

    /// The client's permissions once CONNECT is accepted (`None`:
    /// unrestricted, or before CONNECT).
    pub fn permissions(&self) -> Option<&Arc<Permissions>> {
        self.perms.as_ref()
    }

    /// The restored subscriptions, mapped to the NATS filters the client's
    /// current permissions allow (the configuration may have changed since
    /// they were granted): one none of whose filters is allowed any more is
    /// dropped, and logged.
    pub(super) fn recheck_restored(&self, stored: Vec<StoredSub>) -> Vec<Sub> {
        let mut subs = Vec::with_capacity(stored.len());
        for s in stored {
            let all = topics::filter_to_subjects(&s.filter);
            let mut nats = all.clone();
            if let Some(p) = &self.perms {
                nats.retain(|f| p.can_subscribe(f));
            }
            if nats.is_empty() {
                log::warn!(
                    "mqtt: {}: restored subscription {}{} (subjects {}) is no longer allowed for {}; dropped",
                    log_id(&self.client_id),
                    s.share
                        .as_ref()
                        .map_or(String::new(), |g| format!("(share {g}) ")),
                    s.filter,
                    all.join(", "),
                    self.owner
                        .as_ref()
                        .map_or("this client".into(), |o| o.to_string()),
                );
                continue;
            }
            subs.push(Sub {
                filter: s.filter,
                share: s.share.clone(),
                nats,
                qos: s.qos.min(2),
                no_local: s.no_local && s.share.is_none(),
                retain_as_published: s.retain_as_published,
                id: s.id,
            });
        }
        subs
    }

    /// Refuse the CONNECT (after [`Event::Connected`], instead of
    /// [`Session::restore`]): the client id belongs to another user's
    /// session. CONNACK "not authorized" (5.0 0x87, 3.1.1 0x05), then
    /// close; the will is dropped and nothing of this connection is stored.
    pub fn refuse(&mut self, why: String) {
        if self.state != State::Restoring {
            return;
        }
        let code = match self.version {
            Some(Version::V5) => reason::NOT_AUTHORIZED,
            _ => return_code::NOT_AUTHORIZED,
        };
        self.will = None;
        self.expiry = Duration::ZERO;
        self.was_persistent = false;
        self.refuse_connect(code, None, CloseReason::Refused(why));
    }

    /// Who logged in (`None` when frond runs without `[auth]`).
    pub fn owner(&self) -> Option<&Owner> {
        self.owner.as_ref()
    }

    /// The will to publish now that the connection ended (taken; `None`
    /// after a normal DISCONNECT or when CONNECT had no will).
    /// Call only once the connection has ended.
    #[must_use]
    pub fn take_will(&mut self) -> Option<WillMessage> {
        let mut w = self.will.take()?;
        // A DISCONNECT may have shortened the session: the will goes when
        // the session ends if that comes before its delay (§3.1.3.2.2).
        w.delay = w.delay.min(self.expiry);
        Some(w)
    }

    /// The will that an abnormal end would publish, if any.
    pub fn will(&self) -> Option<&WillMessage> {
        self.will.as_ref()
    }

    pub(super) fn handle_disconnect(&mut self, d: &Disconnect) {
        if let Some(secs) = d.properties.session_expiry_interval {
            if self.expiry.is_zero() && secs != 0 {
                // MQTT 5 §3.14.2.2.2: not a valid DISCONNECT (the
                // will stays armed).
                self.close_with(
                    reason::PROTOCOL_ERROR,
                    CloseReason::ProtocolError(
                        "DISCONNECT sets a session expiry, but CONNECT had 0".into(),
                    ),
                );
                return;
            }
            let granted = Duration::from_secs(u64::from(secs)).min(self.limits.max_session_expiry);
            if granted != self.expiry {
                self.expiry = granted;
                self.dirty = true;
            }
        }
        // MQTT 5 reason 0x04: disconnect *with* will message.
        if d.code != reason::DISCONNECT_WITH_WILL_MESSAGE {
            self.will = None;
        }
        self.closed(CloseReason::ClientDisconnect);
    }
}
