//! The router: who is connected, who subscribes to what, and which stream
//! captures a subject.
//!
//! Owns: the subscription table (NATS filters, whatever protocol the
//! subscriber speaks), the client-id registry used for MQTT session
//! takeover, and the subject -> stream capture map.
//!
//! Invariants:
//! - Delivery never blocks a publisher: each subscriber has a bounded queue;
//!   when it is full, the message is dropped for that subscriber only and
//!   counted (the subscriber is slow; the publisher and the other
//!   subscribers are not affected).
//! - The table's lock is never held across an `.await` or while sending on
//!   a channel that could block.
//! - At most one stream captures a subject (config refuses overlaps).

pub mod retained;
pub mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use smol::channel::{Sender, TrySendError};

use crate::stream::StreamHandle;
use crate::subject;

/// A message handed to subscribers. Shared between all of them.
#[derive(Debug)]
pub struct Delivery {
    /// The NATS subject.
    pub subject: String,
    pub payload: Vec<u8>,
    /// The publisher's QoS (0 for NATS publishes).
    pub qos: u8,
    pub retain: bool,
}

/// Identifies one connection.
pub type ConnId = u64;

struct Sub {
    conn: ConnId,
    filter: String,
    qos: u8,
    tx: Sender<Arc<Delivery>>,
}

/// Counters for monitoring.
#[derive(Default)]
pub struct Counters {
    pub msgs_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub msgs_out: AtomicU64,
    pub dropped_slow: AtomicU64,
    pub connections: AtomicU64,
    pub total_connections: AtomicU64,
}

/// The router shared by every listener task.
pub struct Broker {
    streams: Vec<StreamHandle>,
    subs: Mutex<Vec<Sub>>,
    clients: Mutex<HashMap<String, (ConnId, Sender<()>)>>,
    next_conn: AtomicU64,
    pub counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these tables half
    // updated in a way that matters more than stopping would; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Broker {
    pub fn new(streams: Vec<StreamHandle>) -> Arc<Broker> {
        Arc::new(Broker {
            streams,
            subs: Mutex::new(Vec::new()),
            clients: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            counters: Counters::default(),
        })
    }

    pub fn streams(&self) -> &[StreamHandle] {
        &self.streams
    }

    pub fn new_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The stream that captures `subject`, if any.
    pub fn capture(&self, subj: &str) -> Option<&StreamHandle> {
        self.streams.iter().find(|s| {
            s.config()
                .subjects
                .iter()
                .any(|f| subject::matches(f, subj))
        })
    }

    /// Add a subscription for `conn`; replaces an identical filter of the
    /// same connection (MQTT semantics).
    pub fn subscribe(&self, conn: ConnId, filter: String, qos: u8, tx: Sender<Arc<Delivery>>) {
        let mut subs = lock(&self.subs);
        if let Some(s) = subs
            .iter_mut()
            .find(|s| s.conn == conn && s.filter == filter)
        {
            s.qos = qos;
            return;
        }
        subs.push(Sub {
            conn,
            filter,
            qos,
            tx,
        });
    }

    pub fn unsubscribe(&self, conn: ConnId, filter: &str) -> bool {
        let mut subs = lock(&self.subs);
        let before = subs.len();
        subs.retain(|s| !(s.conn == conn && s.filter == filter));
        subs.len() != before
    }

    /// Remove every subscription of a connection.
    pub fn drop_conn(&self, conn: ConnId) {
        lock(&self.subs).retain(|s| s.conn != conn);
    }

    /// Hand a message to every matching subscriber (live delivery). A
    /// connection subscribed through several overlapping filters receives
    /// it once, at the highest granted QoS (MQTT 3.1.1 §3.3.5).
    pub fn route(&self, subj: &str, payload: &[u8], qos: u8, retain: bool) {
        let subs = lock(&self.subs);
        let mut hits: Vec<(ConnId, u8, &Sender<Arc<Delivery>>)> = Vec::new();
        for s in subs.iter() {
            if subject::matches(&s.filter, subj) {
                match hits.iter_mut().find(|h| h.0 == s.conn) {
                    Some(h) => h.1 = h.1.max(s.qos),
                    None => hits.push((s.conn, s.qos, &s.tx)),
                }
            }
        }
        if hits.is_empty() {
            return;
        }
        for (_, sub_qos, tx) in hits {
            let d = Arc::new(Delivery {
                subject: subj.to_string(),
                payload: payload.to_vec(),
                qos: qos.min(sub_qos),
                retain,
            });
            match tx.try_send(d) {
                Ok(()) => {
                    self.counters.msgs_out.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Full(_)) => {
                    self.counters.dropped_slow.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Register `client_id` for `conn`. If another connection holds it,
    /// that one is told to close (session takeover).
    pub fn claim_client_id(&self, client_id: &str, conn: ConnId, kick: Sender<()>) {
        let old = lock(&self.clients).insert(client_id.to_string(), (conn, kick));
        if let Some((_, old_kick)) = old {
            let _ = old_kick.try_send(());
        }
    }

    /// Forget `client_id` if `conn` still holds it.
    pub fn release_client_id(&self, client_id: &str, conn: ConnId) {
        let mut clients = lock(&self.clients);
        if clients.get(client_id).map(|c| c.0) == Some(conn) {
            clients.remove(client_id);
        }
    }
}
