//! Persistent sessions: the stream cursors a session follows, what is
//! delivered from them, and the snapshot the shell stores.
//!
//! Persistent sessions (3.1.1 `clean_session = 0`, or a 5.0 session expiry
//! interval > 0, capped by `mqtt.max_session_expiry`, which 3.1.1 persistent
//! sessions use as their expiry):
//! - Every message from a stream cursor passes the same check as a live
//!   delivery ([`Permissions::may_deliver`], i.e. `deny_subscribe`);
//!   one that fails is skipped and the cursor moves past it (it is not for
//!   this client). A restored QoS 2 message in flight that fails it is not
//!   sent again: its packet id is released with a PUBREL.
//! - Durable before acknowledged: a persistent session's SUBACK is held
//!   (and decoding with it) until the shell reports the save through
//!   [`Session::subscribe_done`]; when the save failed, every filter the
//!   SUBSCRIBE would have granted gets 0x80 (3.1.1 failure, 5.0
//!   unspecified error, with a reason string) and the subscriptions are
//!   put back as before it (nothing is added live either). When a save
//!   [`Session::take_sync`] asked for fails, the shell calls
//!   [`Session::sync_failed`]: the pending output (PUBREC, PUBCOMP, a QoS
//!   2 PUBLISH or PUBREL whose state is not on disk) is dropped and the
//!   connection closes (5.0: DISCONNECT 0x80); the client resends what
//!   was not acknowledged. 3.1.1 has no negative PUBREC, so closing is
//!   the one answer that works for both versions. (A failed save after
//!   UNSUBSCRIBE is only logged: the subscription may come back after a
//!   restart.)
//! - Messages on subjects a stream captures come from the streams, not the
//!   router: the shell registers each stream with [`Session::follow`] and
//!   feeds what it reads from [`Session::stream_next`] into
//!   [`Session::deliver_stored`]. The machine filters by its subscriptions
//!   and sends at min(subscription QoS, publisher QoS), the publisher's
//!   QoS being what the stored message carries in `Mqtt-QoS` (MQTT QoS 0
//!   and 2 publishes) and 1 otherwise (MQTT QoS 1, NATS publishes, hub
//!   messages; see
//!   [`super::props`]). Per stream, the cursor ([`Session::snapshot`]) is the
//!   highest sequence such that every matching message at or below it was
//!   sent and acknowledged (PUBACK, PUBCOMP); acknowledgements advance it
//!   contiguously. QoS 1 messages above it are sent again after a
//!   reconnect (new packet ids; DUP = 1 at or below the stored `sent`
//!   mark, 0 above it).
//! - QoS 2 stream messages are exactly once across reconnects and frond
//!   restarts: the stored cursor lists each one in flight with its packet
//!   id and whether PUBREC came, plus the completed ones above the cursor.
//!   [`Session::take_sync`] makes the shell write that before the first
//!   PUBLISH of one or its PUBREL leaves. On resume, a PUBREL is sent for
//!   every PUBREC'd one (the message is not sent again), the others are
//!   resent with DUP and their packet id when the stream is read up to
//!   them, and completed ones are skipped. One removed from the stream
//!   (limits) before its resend gets a PUBREL, releasing its id.
//!
//! Retained messages keep their properties and expiry
//! ([`crate::broker::retained`]); CONNACK says retain is available.
use std::collections::BTreeSet;
use std::time::Duration;

use super::outbound::{Emitted, Outbound};
use super::{CloseReason, Session, State};
use crate::broker::persist::{Cursor, StoredSession, StoredSub};
use crate::subject::mqtt as topics;
use crate::wire::mqtt::{reason, Publish, QoS, Version};

/// One stream a persistent session follows.
#[derive(Debug)]
pub(super) struct Follow {
    stream: String,
    /// The next sequence to read.
    next: u64,
    /// Sequences sent at QoS 1 and not yet acknowledged.
    pub(super) inflight: BTreeSet<u64>,
    /// Highest sequence known sent.
    sent: u64,
    /// Sequences above [`Follow::acked`] whose QoS 2 exchange completed:
    /// never sent again.
    pub(super) done: BTreeSet<u64>,
}

impl Follow {
    /// The cursor: every matching message at or below it was sent and
    /// acknowledged.
    pub(super) fn acked(&self) -> u64 {
        match self.inflight.first() {
            Some(s) => s.saturating_sub(1),
            None => self.next.saturating_sub(1),
        }
    }
}

impl Session {
    /// The save [`Session::take_sync`] asked for failed: what the output
    /// holds must not leave (a PUBREC or PUBCOMP the disk does not back,
    /// a QoS 2 PUBLISH whose packet id is not recorded). It is dropped and
    /// the connection closes (5.0: DISCONNECT 0x80); the client resends
    /// what was not acknowledged after reconnecting.
    pub fn sync_failed(&mut self, why: &str) {
        self.out.clear();
        self.close_with(
            reason::UNSPECIFIED_ERROR,
            CloseReason::SyncFailed(why.to_string()),
        );
    }

    /// Follow stream `name` (persistent sessions): resume from the stored
    /// cursor, or after `last_seq` (the stream's tail) for a stream the
    /// session did not know. Returns the follow index.
    ///
    /// QoS 2 messages of the stream that were in flight come back in the
    /// in-flight window with their packet ids: a PUBREL is sent now for
    /// each one the client had PUBREC'd; the others are resent (DUP) when
    /// the stream is read up to them.
    pub fn follow(&mut self, name: &str, last_seq: u64) -> usize {
        let idx = self.follows.len();
        let cursor = self.restored_cursors.iter().find(|c| c.stream == name);
        let (acked, sent) = cursor.map_or((last_seq, last_seq), |c| (c.acked, c.sent));
        let qos2 = cursor.map(|c| c.qos2.clone()).unwrap_or_default();
        let done = cursor.map(|c| c.done.clone()).unwrap_or_default();
        let mut f = Follow {
            stream: name.to_string(),
            next: acked.saturating_add(1),
            inflight: BTreeSet::new(),
            sent,
            done: done.into_iter().filter(|&d| d > acked).collect(),
        };
        let mut rels = Vec::new();
        for (seq, packet_id, released) in qos2 {
            if packet_id == 0 || self.outbound.iter().any(|o| o.packet_id == packet_id) {
                log::warn!(
                    "mqtt: {}: stored QoS 2 state of stream {name} reuses packet id {packet_id}; ignored",
                    self.client_id
                );
                continue;
            }
            // An entry at or below the cursor is never read again: release
            // its packet id at the client instead of resending.
            let released = released || seq <= acked;
            if released {
                rels.push(packet_id);
            } else {
                self.resends += 1;
            }
            f.inflight.insert(seq);
            self.outbound.push_back(Outbound {
                packet_id,
                released,
                origin: Some((idx, seq)),
                exactly_once: true,
                awaiting_resend: !released,
            });
        }
        self.follows.push(f);
        for packet_id in rels {
            self.send_pubrel(packet_id);
        }
        idx
    }

    /// Whether a stream capturing `subjects` can hold messages for this
    /// session: one of its subscriptions (shared ones are live only)
    /// overlaps one of them. The shell follows only such streams, so a
    /// session's cost is that of the streams its filters reach, not of
    /// every stream ([`Session::follow`]).
    pub fn wants_stream(&self, subjects: &[String]) -> bool {
        self.subs
            .iter()
            .filter(|s| s.share.is_none())
            .flat_map(|s| &s.nats)
            .any(|f| {
                subjects
                    .iter()
                    .any(|x| crate::subject::filters_overlap(f, x))
            })
    }

    /// Whether stream `name` must be followed whatever the subscriptions:
    /// its stored cursor has QoS 2 messages in flight (their packet ids are
    /// released or the messages resent as the stream is read).
    pub fn owes_stream(&self, name: &str) -> bool {
        self.restored_cursors
            .iter()
            .any(|c| c.stream == name && !c.qos2.is_empty())
    }

    /// Whether stream `name` is followed.
    pub fn follows_stream(&self, name: &str) -> bool {
        self.follows.iter().any(|f| f.stream == name)
    }

    /// Configured stream `name` is not followed at resume (no subscription
    /// reaches it): its stored cursor is dropped, so a subscription made
    /// later that reaches it starts at the stream's tail, as a new
    /// subscription does, not at a stale cursor.
    pub fn not_followed(&mut self, name: &str) {
        self.restored_cursors.retain(|c| c.stream != name);
    }

    /// How many more stream messages may be sent now (the in-flight window).
    pub fn stream_room(&self) -> usize {
        if self.state != State::Connected {
            return 0;
        }
        // Entries awaiting a resend need the stream read to go on.
        let busy = self.outbound.len().saturating_sub(self.resends);
        self.window().saturating_sub(busy + self.queued.len())
    }

    /// The next sequence to read from followed stream `idx`.
    pub fn stream_next(&self, idx: usize) -> Option<u64> {
        self.follows.get(idx).map(|f| f.next)
    }

    /// Messages below `seq` of stream `idx` are gone (stream limits):
    /// continue from `seq`.
    pub fn stream_skip_to(&mut self, idx: usize, seq: u64) {
        if let Some(f) = self.follows.get_mut(idx) {
            if seq > f.next {
                f.next = seq;
                self.dirty = true;
            }
        }
        self.release_unsent(idx, seq);
    }

    /// A message read from followed stream `idx` (in sequence order, from
    /// [`Session::stream_next`] on). Sends it if a subscription matches.
    pub fn deliver_stored(&mut self, idx: usize, seq: u64, subject: &str, payload: &[u8]) {
        self.deliver_stored_msg(idx, seq, subject, None, payload, Duration::ZERO)
    }

    /// [`Session::deliver_stored`] with the stored header block (MQTT 5
    /// properties, see [`super::props`]) and the message's age (time since it
    /// was stored), against which its message expiry is checked.
    pub fn deliver_stored_msg(
        &mut self,
        idx: usize,
        seq: u64,
        subject: &str,
        headers: Option<&[u8]>,
        payload: &[u8],
        age: Duration,
    ) {
        if self.state != State::Connected {
            return;
        }
        let Some(f) = self.follows.get_mut(idx) else {
            return;
        };
        if seq < f.next {
            return;
        }
        f.next = seq.saturating_add(1);
        let done = f.done.contains(&seq);
        // Only a restored QoS 2 entry is in flight when read: the stream
        // is read past everything sent on this connection.
        let restored = f.inflight.contains(&seq);
        self.dirty = true;
        self.release_unsent(idx, seq);
        if done {
            // Delivered exactly once already.
            return;
        }
        if self.perms.as_ref().is_some_and(|p| !p.may_deliver(subject)) {
            // Not for this client (deny_subscribe, as on the live path);
            // the cursor moves past it. A QoS 2 one in flight from before
            // is not sent again: its packet id is released.
            if restored {
                if let Some(o) = self.outbound.iter().find(|o| o.origin == Some((idx, seq))) {
                    if o.awaiting_resend {
                        let packet_id = o.packet_id;
                        self.release_restored(packet_id);
                    }
                }
            }
            return;
        }
        let entry = match restored {
            true => self.outbound.iter().find(|o| o.origin == Some((idx, seq))),
            false => None,
        };
        if let Some(o) = entry {
            if o.awaiting_resend {
                let packet_id = o.packet_id;
                self.resend_stored(packet_id, subject, headers, payload);
            }
            // Otherwise in flight already (a PUBREL was sent for it).
            return;
        }
        let dollar_ok = !subject.starts_with('$') || self.dollar_subscribed(subject);
        if !dollar_ok {
            return;
        }
        // Not shared: shared subscriptions are served live only. `None`:
        // no subscription matches, or only No Local ones and the client
        // published it.
        let Some(o) = self.outgoing(subject, headers, None, false, true) else {
            return;
        };
        let granted = o.granted.unwrap_or(0);
        // The publisher's QoS: recorded for MQTT QoS 0 and 2; everything
        // else in a stream counts as QoS 1 (see [`super::props`]).
        let qos = granted.min(o.published.unwrap_or(1));
        // Retain As Published: the publisher's RETAIN, as recorded.
        let retain = o.stored_retain && o.retain_as_published;
        let (properties, deadline) = (o.props, o.life);
        let deadline = match deadline {
            Some(life) if life <= age => {
                self.expired += 1;
                return;
            }
            Some(life) => Some(self.now + (life - age)),
            None => None,
        };
        let mut publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain,
            topic: topics::subject_to_topic(subject),
            packet_id: None,
            properties,
            payload: payload.to_vec(),
        };
        if qos >= 1 {
            publish.qos = if qos >= 2 {
                QoS::ExactlyOnce
            } else {
                QoS::AtLeastOnce
            };
            if let Some(f) = self.follows.get(idx) {
                publish.dup = seq <= f.sent;
            }
        }
        if self.emit(publish, deadline, Some((idx, seq))) == Emitted::Sent && qos >= 1 {
            if let Some(f) = self.follows.get_mut(idx) {
                f.sent = f.sent.max(seq);
                f.inflight.insert(seq);
            }
            if qos >= 2 {
                // Its packet id is recorded before it leaves, so after a
                // restart it is resent with the same id, never as new.
                self.sync = true;
            }
        }
    }

    /// Send again, with DUP and its packet id, a QoS 2 stream message
    /// restored from the stored session. Its expiry is not checked: the
    /// client may hold it already. One too large for the client now gets
    /// a PUBREL instead (releasing the id).
    pub(super) fn resend_stored(
        &mut self,
        packet_id: u16,
        subject: &str,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) {
        let properties = self
            .outgoing(subject, headers, None, false, false)
            .map(|o| o.props)
            .unwrap_or_default();
        let publish = Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: topics::subject_to_topic(subject),
            packet_id: Some(packet_id),
            properties,
            payload: payload.to_vec(),
        };
        if self.emit(publish, None, None) == Emitted::Sent {
            return;
        }
        self.release_restored(packet_id);
    }

    /// True (once) if the persistent state changed since the last call.
    #[must_use]
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty) && self.is_persistent()
    }

    /// True (once) if the output holds a packet whose state must be
    /// durable before it leaves: the shell writes [`Session::snapshot`]
    /// first (one write for everything queued). Set by a PUBREC (the
    /// inbound QoS 2 id) or PUBCOMP (its removal) to the client, and by a
    /// QoS 2 stream message's first PUBLISH (its packet id) or PUBREL (the
    /// PUBREC received). Only for persistent sessions; never for QoS 0/1.
    #[must_use]
    pub fn take_sync(&mut self) -> bool {
        std::mem::take(&mut self.sync) && self.is_persistent()
    }

    /// Whether the stored state of this session must be deleted now that
    /// its connection ended: it was persistent, and a 5.0 DISCONNECT set
    /// its expiry to 0.
    pub fn discard_stored(&self) -> bool {
        self.was_persistent && !self.is_persistent()
    }

    /// The state to store for a persistent session (`disconnected_at_ms`
    /// is 0: the shell sets it at disconnect).
    pub fn snapshot(&self) -> StoredSession {
        let mut cursors: Vec<Cursor> = self
            .follows
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let acked = f.acked();
                Cursor {
                    stream: f.stream.clone(),
                    acked,
                    sent: f.sent,
                    qos2: self
                        .outbound
                        .iter()
                        .filter(|o| o.exactly_once)
                        .filter_map(|o| match o.origin {
                            Some((x, seq)) if x == i => Some((seq, o.packet_id, o.released)),
                            _ => None,
                        })
                        .collect(),
                    done: f.done.iter().copied().filter(|&d| d > acked).collect(),
                }
            })
            .collect();
        // Keep cursors of streams not followed now (not configured at the
        // moment) so they survive a configuration round trip.
        for c in &self.restored_cursors {
            if !cursors.iter().any(|k| k.stream == c.stream) {
                cursors.push(c.clone());
            }
        }
        let mut qos2_in: Vec<u16> = self.qos2_in.iter().copied().collect();
        qos2_in.sort_unstable();
        StoredSession {
            client_id: self.client_id.clone(),
            owner: self.owner.clone(),
            version: if self.version == Some(Version::V5) {
                5
            } else {
                4
            },
            subs: self
                .subs
                .iter()
                .map(|s| StoredSub {
                    filter: s.filter.clone(),
                    qos: s.qos,
                    share: s.share.clone(),
                    no_local: s.no_local,
                    retain_as_published: s.retain_as_published,
                    id: s.id,
                })
                .collect(),
            expiry_secs: self.expiry.as_secs(),
            disconnected_at_ms: 0,
            cursors,
            qos2_in,
        }
    }
}
