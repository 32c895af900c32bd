//! What the router hands messages to: the MQTT [`Delivery`] and its byte
//! [`QueueBudget`], the NATS [`Msg`] and its connection's [`Outbox`], and a
//! connection's [`NoInterest`] memory.
//!
//! Invariants: an outbox never holds more than its byte limit (a push over
//! it is dropped and marks the outbox slow); a budget admits a delivery
//! while the connection's delivery queue and session together stay within
//! the limit, or when nothing is queued at all.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::lock;
use crate::subject;

/// A message handed to an MQTT subscriber: the routed message, shared by
/// every subscriber it goes to (no copy per subscriber), with what this
/// subscriber gets it as. It travels by value through the connection's
/// delivery queue ([`super::delivery_queue`]): no allocation per
/// subscriber; a queue keeps the slots it grew to (at most
/// [`super::deliveries::KEEP`] once emptied).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message: NATS subject, payload, header block (MQTT 5
    /// properties, see [`bridge`]) and reply subject (an MQTT 5 Response
    /// Topic). Its `publisher` is never shown to the subscriber.
    pub msg: Arc<Msg>,
    /// The publisher's QoS (0 for NATS publishes), capped at the
    /// subscription's.
    pub qos: u8,
    pub retain: bool,
    /// Chosen for a shared subscription (`$share/...`): delivered live
    /// even to a persistent session (see [`session`]).
    pub shared: bool,
    /// When it was routed (MQTT message expiry counts from here).
    pub at: std::time::Instant,
}

impl Delivery {
    /// Bytes this delivery costs while queued (close to what it holds;
    /// the message itself is counted for each subscriber, as if copied).
    pub fn cost(&self) -> usize {
        msg_cost(&self.msg)
    }

    /// The NATS subject.
    pub fn subject(&self) -> &str {
        &self.msg.subject
    }
}

/// What a [`Delivery`] of `m` costs while queued.
pub fn msg_cost(m: &Msg) -> usize {
    DELIVERY_OVERHEAD
        + m.subject.len()
        + m.payload.len()
        + m.headers.as_ref().map_or(0, Vec::len)
        + m.reply.as_ref().map_or(0, String::len)
}

/// What a queued [`Delivery`] costs beyond its message's strings and
/// payload (the struct and its queue slot, the shared [`Msg`]).
pub const DELIVERY_OVERHEAD: usize = 128;

/// The byte budget of one MQTT connection's queued deliveries
/// (`mqtt.max_queued_bytes`), shared by the connection's delivery queue,
/// which charges what the router puts in and releases what the connection
/// takes out, and the connection, which reports what its session still
/// holds in its own queue ([`QueueBudget::set_held`]). A delivery is admitted while both
/// together stay within the limit, or when nothing is queued at all.
#[derive(Debug)]
pub struct QueueBudget {
    max_bytes: usize,
    /// Bytes in the delivery queue.
    queued: AtomicUsize,
    /// Bytes the session holds (QoS 1/2 waiting for the client's window).
    held: AtomicUsize,
}

impl QueueBudget {
    pub fn new(max_bytes: usize) -> Arc<QueueBudget> {
        Arc::new(QueueBudget {
            max_bytes,
            queued: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
        })
    }

    /// Charge `n` bytes if they fit (or nothing is queued); false if not.
    pub fn try_charge(&self, n: usize) -> bool {
        let held = self.held.load(Ordering::Relaxed);
        let mut cur = self.queued.load(Ordering::Relaxed);
        loop {
            let used = cur.saturating_add(held);
            if used > 0 && used.saturating_add(n) > self.max_bytes {
                return false;
            }
            match self.queued.compare_exchange_weak(
                cur,
                cur.saturating_add(n),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// `n` bytes left the delivery queue.
    pub fn release(&self, n: usize) {
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_sub(n))
            });
    }

    /// The session now holds `n` bytes in its own queue.
    pub fn set_held(&self, n: usize) {
        self.held.store(n, Ordering::Relaxed);
    }

    /// Bytes charged: in the delivery queue plus held by the session.
    pub fn used(&self) -> usize {
        self.queued
            .load(Ordering::Relaxed)
            .saturating_add(self.held.load(Ordering::Relaxed))
    }

    /// Whether anything more fits now.
    pub fn has_room(&self) -> bool {
        self.used() < self.max_bytes
    }
}

/// A routed message as NATS subscribers see it; shared by all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub subject: String,
    pub reply: Option<String>,
    /// A raw `NATS/1.0` header block.
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// The permissions of the client that published it, when it has
    /// restrictions (`None`: an unrestricted client, or frond itself). The
    /// JetStream API service authorizes its callers with them
    /// (`server::jsapi`); subscribers never see them.
    pub publisher: Option<Arc<crate::auth::Permissions>>,
}

impl Msg {
    /// Bytes this message costs in an outbox (close to its wire size).
    pub fn size(&self) -> usize {
        self.subject.len()
            + self.reply.as_ref().map_or(0, String::len)
            + self.headers.as_ref().map_or(0, Vec::len)
            + self.payload.len()
            + 32
    }
}

/// The outcome of [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Over the byte limit: dropped, and the outbox is now marked slow.
    Slow,
    /// The connection is gone.
    Closed,
}

/// Messages waiting for one NATS connection, bounded by bytes.
///
/// The router pushes (never blocking); the connection's task takes them.
/// When a push would exceed the limit, the message is dropped and the
/// outbox is marked slow: the connection must then be closed as a slow
/// consumer.
pub struct Outbox {
    state: Mutex<OutboxState>,
    max_bytes: usize,
    ready: event_listener::Event,
}

#[derive(Default)]
struct OutboxState {
    items: VecDeque<(u64, Arc<Msg>)>,
    bytes: usize,
    slow: bool,
    closed: bool,
    /// Pushes dropped (over the limit, or while slow).
    dropped: u64,
}

impl Outbox {
    pub fn new(max_bytes: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutboxState::default()),
            max_bytes,
            ready: event_listener::Event::new(),
        })
    }

    /// Queue `msg` for subscription `sid`.
    pub fn push(&self, sid: u64, msg: Arc<Msg>) -> Push {
        let mut st = lock(&self.state);
        if st.closed {
            return Push::Closed;
        }
        let size = msg.size();
        if st.slow || st.bytes.saturating_add(size) > self.max_bytes {
            let first = !st.slow;
            st.slow = true;
            st.dropped += 1;
            drop(st);
            if first {
                self.ready.notify(usize::MAX);
            }
            return Push::Slow;
        }
        st.bytes += size;
        st.items.push_back((sid, msg));
        drop(st);
        self.ready.notify(usize::MAX);
        Push::Queued
    }

    /// Take queued messages, about `budget` bytes (at least one if any).
    pub fn take(&self, budget: usize) -> Vec<(u64, Arc<Msg>)> {
        let mut st = lock(&self.state);
        let mut out = Vec::new();
        let mut used = 0;
        while used < budget.max(1) {
            let Some((sid, m)) = st.items.pop_front() else {
                break;
            };
            let size = m.size();
            used += size;
            st.bytes = st.bytes.saturating_sub(size);
            out.push((sid, m));
        }
        out
    }

    /// Bytes waiting.
    pub fn pending(&self) -> usize {
        lock(&self.state).bytes
    }

    pub fn is_slow(&self) -> bool {
        lock(&self.state).slow
    }

    /// Messages dropped so far because the outbox was full or slow.
    pub fn dropped(&self) -> u64 {
        lock(&self.state).dropped
    }

    /// Refuse further pushes and drop what is queued.
    pub fn close(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        st.items.clear();
        st.bytes = 0;
    }

    /// Resolve once the outbox is slow, or (with `items`) once something
    /// is queued.
    pub async fn wait(&self, items: bool) {
        loop {
            let ready = |st: &OutboxState| (items && !st.items.is_empty()) || st.slow;
            if ready(&lock(&self.state)) {
                return;
            }
            let listener = self.ready.listen();
            if ready(&lock(&self.state)) {
                return;
            }
            listener.await;
        }
    }
}

/// Most subjects one [`NoInterest`] remembers.
pub(super) const NO_INTEREST_MAX: usize = 256;

/// A connection's memory of subjects no subscription matched, so that
/// publishing to them again costs neither the router's lock nor a lookup
/// (the common case for telemetry nobody is watching live). Valid only
/// while the router's subscriptions are unchanged: any subscribe or
/// unsubscribe anywhere empties it at the next publish. Reply inboxes are
/// never remembered (each is used once).
#[derive(Debug, Default)]
pub struct NoInterest {
    generation: u64,
    pub(super) subjects: subject::FastSet<Box<str>>,
}

impl NoInterest {
    /// Forget everything if the router's subscriptions changed since the
    /// memory was made; whether it is still valid.
    pub(super) fn refresh(&mut self, generation: u64) -> bool {
        if self.generation == generation {
            return true;
        }
        self.subjects.clear();
        self.generation = generation;
        false
    }
}
