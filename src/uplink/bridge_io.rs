//! The live bridge's shell: connects the [`Bridge`] machine to the local
//! router. Owns the bridge's router connection (a [`ConnId`] with a
//! bounded [`Outbox`] subscribed to [`Bridge::local_subscriptions`]) and
//! the OS randomness for inbox names.
//!
//! Invariants:
//! - Hub messages are published into the router with echo off from the
//!   connection that holds the local import subscriptions, so they never
//!   go back up; they carry the permissions of nobody
//!   ([`crate::broker::bridge::will_publisher`]), so the local JetStream
//!   API never acts on them; they are routed, not stored (core NATS
//!   semantics), at QoS 0 for MQTT subscribers.
//! - A local request on an imported subject is forwarded with its reply
//!   subject mapped only if its publisher may subscribe to that reply
//!   subject (or it is an MQTT 5 request inbox, checked when it was
//!   assigned); otherwise it is refused and counted.
//! - The outbox is bounded in bytes ([`LOCAL_QUEUE_BYTES`]); when it
//!   overflowed (the hub link could not keep up) the dropped messages are
//!   counted and the subscriptions are made afresh.

use std::sync::Arc;
use std::time::Instant;

use super::bridge::{Bridge, BridgeParams, BridgeStatus, Entry, LocalMsg};
use super::link::Link;
use crate::auth::Permissions;
use crate::broker::bridge as replies;
use crate::config::{BridgeSubject, UplinkConfig};
use crate::router::{Broker, ConnId, Msg, Origin, Outbox};
use crate::wire::nats::client::MsgOp;

/// Bytes of local messages waiting for the hub link.
pub const LOCAL_QUEUE_BYTES: usize = 1 << 20;
/// Bytes taken from the outbox per turn of the uplink loop.
const BATCH_BYTES: usize = 64 << 10;

/// The bridge machine and its router connection.
pub struct BridgeIo {
    machine: Bridge,
    broker: Arc<Broker>,
    conn: ConnId,
    outbox: Arc<Outbox>,
    hub_publisher: Arc<Permissions>,
}

fn entries(v: &[BridgeSubject]) -> Vec<Entry> {
    v.iter()
        .map(|b| Entry {
            subject: b.subject.clone(),
            hub_prefix: b.hub_prefix.clone(),
        })
        .collect()
}

/// 96 bits from the OS (a time-seeded generator if it has none).
fn os_entropy() -> [u8; 12] {
    let mut b = [0u8; 12];
    if getrandom::getrandom(&mut b).is_err() {
        for c in b.chunks_mut(4) {
            c.copy_from_slice(&fastrand::u32(..).to_le_bytes());
        }
    }
    b
}

impl BridgeIo {
    /// The bridge of `cfg`, its hub subscriptions made on `link` and its
    /// local ones on `broker`; `None` without exports and imports.
    pub fn start(cfg: &UplinkConfig, broker: &Arc<Broker>, link: &mut Link) -> Option<BridgeIo> {
        if cfg.exports.is_empty() && cfg.imports.is_empty() {
            return None;
        }
        let p = BridgeParams::new(entries(&cfg.exports), entries(&cfg.imports));
        let mut machine = Bridge::new(p, Box::new(os_entropy));
        if let Err(e) = machine.attach(link) {
            log::error!("live bridge disabled: {e}");
            return None;
        }
        let (conn, outbox) = subscribe(broker, &machine);
        Some(BridgeIo {
            machine,
            broker: broker.clone(),
            conn,
            outbox,
            hub_publisher: replies::will_publisher(),
        })
    }

    /// The queue of local messages (the loop waits on it).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    pub fn status(&self) -> BridgeStatus {
        self.machine.status()
    }

    /// An `-ERR` from the hub that did not close the connection.
    pub fn handle_hub_error(&mut self, text: &str) {
        if let Some(f) = self.machine.handle_hub_error(text) {
            log::error!("bridge: the hub refuses frond's subscription to {f:?}: grant the uplink's hub user permission to subscribe to it");
        }
    }

    /// The link came up.
    pub fn handle_up(&mut self, link: &mut Link) {
        self.machine.handle_up(link);
    }

    /// A hub message: published locally if it is the bridge's; `Err`
    /// hands back another user's message.
    pub fn handle_hub_msg(&mut self, now: Instant, m: MsgOp) -> Result<(), MsgOp> {
        if let Some(local) = self.machine.handle_hub_msg(now, m)? {
            self.publish_local(local, now);
        }
        Ok(())
    }

    fn publish_local(&mut self, m: LocalMsg, now: Instant) {
        // An answer to an MQTT 5 requester goes to its response topic.
        let (subject, headers, reply) =
            match replies::redirect_reply(&self.broker.replies, m.subject, m.headers, m.reply) {
                Ok(r) => r,
                Err(to) => {
                    log::debug!("bridge: hub answer to reserved subject {to:?} dropped");
                    return;
                }
            };
        let msg = Msg {
            subject,
            reply,
            headers,
            payload: m.payload,
            publisher: Some(self.hub_publisher.clone()),
        };
        let origin = Origin {
            conn: self.conn,
            echo: false,
        };
        self.broker.route_msg(Some(origin), Arc::new(msg), 0, now);
    }

    /// Hand one batch of local messages to the machine (hub-bound bytes go
    /// into `link`).
    pub fn pump(&mut self, now: Instant, link: &mut Link) {
        self.machine.handle_tick(now);
        if self.outbox.is_slow() {
            self.broker.drop_conn(self.conn);
            self.outbox.close();
            let lost = self.outbox.dropped();
            log::warn!("bridge: {lost} local messages dropped: the hub link did not keep up");
            self.machine.count_local_overflow(lost);
            (self.conn, self.outbox) = subscribe(&self.broker, &self.machine);
        }
        for (sid, m) in self.outbox.take(BATCH_BYTES) {
            let m = Arc::unwrap_or_clone(m);
            let reply_ok = m.reply.as_deref().is_none_or(|r| {
                m.publisher.as_ref().is_none_or(|p| p.can_subscribe(r))
                    || self.broker.replies.resolve(r, now).is_some()
            });
            if !reply_ok {
                log::debug!(
                    "bridge: request on {} not forwarded: its publisher may not subscribe to the reply subject",
                    m.subject
                );
                self.machine.count_refused();
                continue;
            }
            let local = LocalMsg {
                subject: m.subject,
                reply: m.reply,
                headers: m.headers,
                payload: m.payload,
            };
            self.machine.handle_local(now, link, sid, local);
        }
    }
}

impl Drop for BridgeIo {
    fn drop(&mut self) {
        self.broker.drop_conn(self.conn);
        self.outbox.close();
    }
}

/// A fresh router connection subscribed to the bridge's local subjects.
fn subscribe(broker: &Broker, machine: &Bridge) -> (ConnId, Arc<Outbox>) {
    let conn = broker.new_conn_id();
    let outbox = Outbox::new(LOCAL_QUEUE_BYTES);
    for (sid, filter) in machine.local_subscriptions() {
        broker.subscribe_nats(conn, sid, filter, None, outbox.clone());
    }
    (conn, outbox)
}
