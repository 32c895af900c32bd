//! QoS 2 in both directions: PUBREC/PUBREL/PUBCOMP handling and the
//! release of restored stream messages that cannot be resent.
//!
//! - Outbound QoS 2 of router deliveries (subjects no stream captures,
//!   shared subscriptions) keeps its PUBREC state in memory: after a
//!   reconnect such a message is not resent.
//! - The inbound QoS 2 ids are durable before the PUBREC that reports
//!   one leaves, and their removal before the PUBCOMP ([`Session::take_sync`]),
//!   so a PUBLISH(DUP) resent after a frond crash is not stored twice and
//!   an id the client reuses is never taken for a duplicate. Left open: a
//!   crash after the message is in the stream but before its id is
//!   written (the PUBREC never left) stores the client's resend again.

use super::Session;
use crate::wire::mqtt::{reason, Ack, Packet, Properties, Version};

impl Session {
    /// PUBREC for an outbound QoS 2 message: PUBREL (recorded first for a
    /// stream message), or the end of the exchange for a failure.
    pub(super) fn handle_pubrec(&mut self, a: &Ack) {
        if a.code >= reason::UNSPECIFIED_ERROR {
            // MQTT 5 §4.3.3: a failed PUBREC ends the exchange;
            // the message is not sent again.
            self.outbound_done(a.packet_id);
            return;
        }
        if let Some(o) = self
            .outbound
            .iter_mut()
            .find(|o| o.packet_id == a.packet_id)
        {
            if o.awaiting_resend {
                // The client had it from before: no resend.
                o.awaiting_resend = false;
                self.resends = self.resends.saturating_sub(1);
            }
            if !o.released && o.origin.is_some() {
                // A stream message: the PUBREL owed is recorded
                // before it leaves (after a restart frond sends
                // PUBREL, never the message again).
                self.sync = true;
                self.dirty = true;
            }
            o.released = true;
        }
        self.send_pubrel(a.packet_id);
    }

    /// PUBREL for an inbound QoS 2 message: forget its id, PUBCOMP.
    pub(super) fn handle_pubrel(&mut self, a: &Ack) {
        let known = self.qos2_in.remove(&a.packet_id);
        if known {
            // Durable before the PUBCOMP: once the client has it,
            // it may reuse the id for a new message, which a stale
            // id restored after a crash would drop as a duplicate.
            self.dirty = true;
            self.sync = true;
        }
        // 5.0: an id frond does not hold gets 0x92 (Packet Identifier not
        // found, §3.7.2.1), as Mosquitto answers; the exchange still ends.
        let code = match known || self.version != Some(Version::V5) {
            true => reason::SUCCESS,
            false => reason::PACKET_IDENTIFIER_NOT_FOUND,
        };
        self.send(&Packet::PubComp(Ack {
            packet_id: a.packet_id,
            code,
            properties: Properties::default(),
        }));
    }

    pub(super) fn send_pubrel(&mut self, packet_id: u16) {
        self.send(&Packet::PubRel(Ack {
            packet_id,
            code: reason::SUCCESS,
            properties: Properties::default(),
        }));
    }

    /// Restored QoS 2 messages of stream `idx` below `seq` that the stream
    /// no longer holds (its limits removed them) cannot be resent: release
    /// their packet ids at the client with a PUBREL.
    pub(super) fn release_unsent(&mut self, idx: usize, seq: u64) {
        if self.resends == 0 {
            return;
        }
        let mut rels = Vec::new();
        for o in &mut self.outbound {
            if o.awaiting_resend && o.origin.is_some_and(|(i, s)| i == idx && s < seq) {
                o.awaiting_resend = false;
                o.released = true;
                rels.push(o.packet_id);
            }
        }
        for packet_id in rels {
            log::warn!(
                "mqtt: {}: a QoS 2 message in flight (packet id {packet_id}) left its stream before it could be resent",
                self.client_id
            );
            self.resends = self.resends.saturating_sub(1);
            self.sync = true;
            self.dirty = true;
            self.send_pubrel(packet_id);
        }
    }

    /// A restored QoS 2 stream message awaiting its resend is not sent
    /// again: PUBREL releases its packet id at the client.
    pub(super) fn release_restored(&mut self, packet_id: u16) {
        if let Some(o) = self
            .outbound
            .iter_mut()
            .find(|o| o.packet_id == packet_id && o.awaiting_resend)
        {
            o.awaiting_resend = false;
            o.released = true;
            self.resends = self.resends.saturating_sub(1);
            self.sync = true;
            self.dirty = true;
            self.send_pubrel(packet_id);
        }
    }
}
