//! What one MQTT connection owes its client, bounded in bytes: live
//! deliveries from the router and the retained messages of new
//! subscriptions ([`Outbound`]; used by [`super::mqtt::connection`]).
//!
//! Owns: the connection's [`QueueBudget`] (`mqtt.max_queued_bytes`), the
//! retained-message scans waiting to be read, and moving both into the
//! [`Session`] at the pace the client reads.
//!
//! Invariants:
//! - The connection's delivery queue ([`crate::router::delivery_queue`])
//!   and the session's queue of QoS 1/2 messages waiting for the client's
//!   window share one byte budget ([`QueueBudget`]: the queue charges
//!   what the router puts in and releases what is taken out,
//!   [`Outbound::take`] reports what the session holds); a client that does not
//!   read loses deliveries (counted in `dropped_slow`, the session's own
//!   drops too), never stalls a publisher.
//! - Deliveries and retained messages go into the session's output only
//!   while it holds less than [`WRITE_BUDGET`]; the shell writes it before
//!   taking more. Per connection, memory for deliveries is thus at most
//!   `max_queued_bytes` plus about two write budgets and one largest
//!   message (and, for a persistent session, one 1 MiB stream read).
//!   Written output buffers are reused: each network thread keeps at most
//!   [`SPARE_BUFFERS`] of at most [`SPARE_MAX`] bytes; an idle connection
//!   keeps none.
//! - At the limit QoS 0 messages are dropped, and so are live QoS 1/2
//!   messages of a clean session (at most once for a subscriber that does
//!   not keep up, as at Mosquitto's `max_queued_messages`); a persistent
//!   session loses nothing a stream captures: it reads those from its
//!   stream cursors at its own pace.
//! - Retained messages of a new subscription are read from the store in
//!   batches of about [`WRITE_BUDGET`] ([`RetainedScan`]) and only while
//!   the session's queue is empty (they wait on disk, not in memory),
//!   before any live delivery that came after the SUBSCRIBE. At most
//!   [`MAX_RETAINED_SCANS`] scans wait; subscriptions beyond them get no
//!   retained messages (with a warning).
//! - Key/Value bridge: a new subscription to `$KV/<bucket>/<key>` (NATS
//!   filter `$KV.<bucket>.<key…>`, wildcards allowed in the key) that
//!   gets retained messages also gets the current value of every matching
//!   key of bucket `<bucket>` (stream `KV_<bucket>`: the newest message of
//!   each subject), as retained messages, in sequence order; deleted or
//!   purged keys (`KV-Operation: DEL`/`PURGE`) have no current value and
//!   are left out. Only the sequences wait in memory (at most
//!   [`MAX_KV_KEYS`] per connection); each message is read when the
//!   session has room, and passes the same permission check as every
//!   delivery ([`Session::deliver_retained`]: `deny_subscribe` per key).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::broker::retained::{Retained, RetainedScan};
use crate::mqtt::Session;
use crate::router::{Broker, Delivery, DeliveryRx, Msg, QueueBudget};
use crate::stream::StreamHandle;

/// Deliveries (and retained messages) are moved into the session's output
/// only while it holds less than this many bytes.
pub const WRITE_BUDGET: usize = 64 * 1024;
/// Retained-message scans (one per filter of a SUBSCRIBE) that may wait
/// per connection; subscriptions beyond them get no retained messages.
pub const MAX_RETAINED_SCANS: usize = 1024;
/// Current KV values (keys) that may wait per connection.
pub const MAX_KV_KEYS: usize = 65_536;

/// Spare output buffers kept per network thread, and the largest kept.
const SPARE_BUFFERS: usize = 2;
const SPARE_MAX: usize = 2 * WRITE_BUDGET;

thread_local! {
    /// Output buffers of this thread's MQTT connections, written and
    /// emptied, for the next batch of deliveries of any of them (at most
    /// [`SPARE_BUFFERS`] of at most [`SPARE_MAX`] bytes; an idle
    /// connection holds none). A fresh buffer of about [`WRITE_BUDGET`]
    /// per batch cost a large allocation and its free each time, each one
    /// also sorting the allocator's bins of small freed chunks.
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An output buffer that was written: kept for reuse (emptied) if it is
/// of a useful size and fewer than [`SPARE_BUFFERS`] larger ones wait.
pub fn recycle_output(mut buf: Vec<u8>) {
    if !(1024..=SPARE_MAX).contains(&buf.capacity()) {
        return;
    }
    buf.clear();
    SPARE.with(|s| {
        let mut spare = s.borrow_mut();
        if spare.len() < SPARE_BUFFERS {
            spare.push(buf);
        } else if let Some(small) = spare.iter_mut().min_by_key(|b| b.capacity()) {
            if small.capacity() < buf.capacity() {
                *small = buf;
            }
        }
    });
}

/// Lend `session` the largest spare output buffer before a batch of
/// deliveries is encoded into it (it comes back through
/// [`recycle_output`] once written).
fn lend_output(session: &mut Session) {
    let Some(buf) = SPARE.with(|s| {
        let mut spare = s.borrow_mut();
        let (i, _) = spare.iter().enumerate().max_by_key(|(_, b)| b.capacity())?;
        Some(spare.swap_remove(i))
    }) else {
        return;
    };
    recycle_output(session.offer_output(buf));
}

/// The current values of KV keys owed to one new subscription.
struct KvScan {
    stream: StreamHandle,
    /// Sequences still to read: the newest message of each matching key.
    seqs: VecDeque<u64>,
    granted: u8,
}

/// The bucket of a NATS filter `$KV.<bucket>.<key…>` (a literal bucket).
fn kv_bucket(filter: &str) -> Option<&str> {
    let (bucket, key) = filter.strip_prefix("$KV.")?.split_once('.')?;
    let literal = !bucket.is_empty() && !matches!(bucket, "*" | ">");
    (literal && !key.is_empty()).then_some(bucket)
}

/// One connection's owed deliveries (see the module doc).
pub struct Outbound {
    budget: Arc<QueueBudget>,
    /// Retained messages owed to new subscriptions, with the granted QoS.
    scans: VecDeque<(RetainedScan, u8)>,
    /// Current KV values owed to new `$KV.` subscriptions.
    kv: VecDeque<KvScan>,
    /// The session's `dropped` already added to the counters.
    dropped_seen: u64,
    /// Most messages in one retained batch (`mqtt.max_queued`).
    max_queued: usize,
}

impl Outbound {
    /// A connection's owed deliveries, bounded by `max_bytes` (give
    /// [`Outbound::budget`] to its delivery queue).
    pub fn new(max_queued: usize, max_bytes: usize) -> Outbound {
        let budget = QueueBudget::new(max_bytes);
        Outbound {
            budget,
            scans: VecDeque::new(),
            kv: VecDeque::new(),
            dropped_seen: 0,
            max_queued,
        }
    }

    /// The byte budget the connection's delivery queue is charged to.
    pub fn budget(&self) -> Arc<QueueBudget> {
        self.budget.clone()
    }

    /// A SUBSCRIBE's filters that get retained messages (NATS filters,
    /// with their granted QoS): owe them.
    pub async fn owe_retained(
        &mut self,
        retained: &Arc<Retained>,
        filters: Vec<String>,
        granted: Vec<u8>,
        client_id: &str,
    ) {
        if filters.is_empty() {
            return;
        }
        let store = retained.clone();
        let scans = smol::unblock(move || match store.is_empty() {
            true => Vec::new(),
            false => store.scans(filters),
        })
        .await;
        let room = MAX_RETAINED_SCANS.saturating_sub(self.scans.len());
        if scans.len() > room {
            log::warn!(
                "mqtt: {client_id}: more than {MAX_RETAINED_SCANS} subscriptions wait for their retained messages; {} get none",
                scans.len() - room
            );
        }
        self.scans.extend(scans.into_iter().zip(granted).take(room));
    }

    /// A SUBSCRIBE's filters that get retained messages: owe the current
    /// values of the KV keys the `$KV.<bucket>.…` ones match.
    pub async fn owe_kv(
        &mut self,
        broker: &Broker,
        filters: &[String],
        granted: &[u8],
        client_id: &str,
    ) {
        for (f, &q) in filters.iter().zip(granted) {
            let Some(bucket) = kv_bucket(f) else {
                continue;
            };
            let name = format!("KV_{bucket}");
            let Some(h) = broker.stream_set().find(|h| h.config().name == name) else {
                continue;
            };
            let owed: usize = self.kv.iter().map(|k| k.seqs.len()).sum();
            let room = MAX_KV_KEYS.saturating_sub(owed);
            match h.last_per_subject(std::slice::from_ref(f), u64::MAX, room).await {
                Ok(Some(seqs)) if seqs.is_empty() => {}
                Ok(Some(seqs)) => self.kv.push_back(KvScan {
                    stream: h.clone(),
                    seqs: seqs.into(),
                    granted: q,
                }),
                Ok(None) => log::warn!(
                    "mqtt: {client_id}: {f} matches more KV keys than may wait ({MAX_KV_KEYS} per connection); no current values sent for it (subscribe to fewer keys)"
                ),
                Err(e) => log::warn!(
                    "mqtt: {client_id}: current KV values for {f}: {e}; none sent"
                ),
            }
        }
    }

    /// Move owed KV values into the session while it has room.
    async fn pump_kv(&mut self, session: &mut Session) {
        while session.output_len() < WRITE_BUDGET && session.queued_len() == 0 {
            let Some(scan) = self.kv.front_mut() else {
                break;
            };
            let Some(seq) = scan.seqs.pop_front() else {
                self.kv.pop_front();
                continue;
            };
            let m = match scan.stream.get(seq).await {
                Ok(Some(m)) => m,
                // Removed since (a newer value follows live), or closing.
                Ok(None) | Err(_) => continue,
            };
            let op = m
                .headers
                .as_deref()
                .and_then(|h| crate::stream::headers::header(h, "KV-Operation"));
            if matches!(op, Some("DEL" | "PURGE")) {
                continue;
            }
            let msg = Msg {
                subject: m.subject,
                reply: None,
                headers: m.headers,
                payload: m.payload,
                publisher: None,
            };
            session.deliver_retained(&Delivery {
                msg: Arc::new(msg),
                qos: scan.granted.min(1),
                retain: true,
                shared: false,
                at: super::mqtt::retained_at(m.timestamp / 1_000_000),
            });
        }
    }

    /// Move what is owed into the session while its output is under
    /// [`WRITE_BUDGET`]: retained messages first (read from disk), then
    /// live deliveries waiting in `rx`.
    pub async fn pump(
        &mut self,
        session: &mut Session,
        broker: &Broker,
        retained: &Arc<Retained>,
        rx: &DeliveryRx,
    ) {
        while session.output_len() < WRITE_BUDGET && session.queued_len() == 0 {
            let Some((mut scan, granted)) = self.scans.pop_front() else {
                break;
            };
            let (store, max) = (retained.clone(), self.max_queued);
            let (scan, msgs) = smol::unblock(move || {
                let msgs = store.next_batch(&mut scan, WRITE_BUDGET, max);
                (scan, msgs)
            })
            .await;
            for m in msgs {
                let msg = Msg {
                    subject: m.subject,
                    reply: None,
                    headers: m.headers,
                    payload: m.payload,
                    publisher: None,
                };
                session.deliver_retained(&Delivery {
                    msg: Arc::new(msg),
                    qos: m.qos.min(granted),
                    retain: true,
                    shared: false,
                    // Expiry counts from when it was set.
                    at: super::mqtt::retained_at(m.stored_ms),
                });
            }
            if !scan.is_done() {
                self.scans.push_front((scan, granted));
            }
        }
        if self.scans.is_empty() {
            self.pump_kv(session).await;
        }
        let mut first = true;
        while !self.retained_waiting() && session.output_len() < WRITE_BUDGET {
            let Some(d) = rx.try_recv() else { break };
            if std::mem::take(&mut first) {
                lend_output(session);
                // Room for the batch (what waits, up to the write budget)
                // in one allocation; `cost` is above the encoded size.
                let batch = (rx.len() + 1).saturating_mul(d.cost());
                session.reserve_output(batch.min(WRITE_BUDGET) + d.cost());
            }
            self.take(session, broker, &d);
        }
        self.settle(session, broker);
    }

    /// Hand a delivery taken from the queue (which gave its bytes back to
    /// the budget) to the session (for a persistent session, captured
    /// subjects come from the streams it follows instead, except for
    /// shared subscriptions, which are always live; a stream created
    /// through the API after the session's last SUBSCRIBE is not followed
    /// yet, so its messages come live).
    fn take(&mut self, session: &mut Session, broker: &Broker, d: &Delivery) {
        let from_stream = session.follows_streams()
            && broker
                .capture(d.subject())
                .is_some_and(|s| session.follows_stream(&s.config().name));
        if d.shared || !from_stream {
            session.deliver(d);
        }
        self.settle(session, broker);
    }

    /// Report what the session holds to the budget, and what it dropped
    /// since the last time to `dropped_slow`.
    fn settle(&mut self, session: &Session, broker: &Broker) {
        self.budget.set_held(session.queued_bytes());
        if session.dropped > self.dropped_seen {
            broker
                .counters
                .dropped_slow
                .fetch_add(session.dropped - self.dropped_seen, Ordering::Relaxed);
            self.dropped_seen = session.dropped;
        }
    }

    /// Retained messages are owed: live deliveries wait behind them.
    pub fn retained_waiting(&self) -> bool {
        !self.scans.is_empty() || !self.kv.is_empty()
    }

    /// Retained messages can be read now (the session's queue is empty;
    /// an acknowledgement read from the socket empties it).
    pub fn retained_ready(&self, session: &Session) -> bool {
        self.retained_waiting() && session.queued_len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spare_capacities() -> Vec<usize> {
        SPARE.with(|s| s.borrow().iter().map(Vec::capacity).collect())
    }

    #[test]
    fn spare_output_buffers_are_bounded_in_number_and_size() {
        // Too small to be worth keeping, or larger than the limit: dropped.
        recycle_output(Vec::with_capacity(100));
        recycle_output(Vec::with_capacity(SPARE_MAX + 1));
        assert!(spare_capacities().is_empty());
        // Kept emptied; beyond two, only a larger one replaces the smallest.
        let mut used = Vec::with_capacity(4096);
        used.extend_from_slice(b"written");
        recycle_output(used);
        recycle_output(Vec::with_capacity(8192));
        recycle_output(Vec::with_capacity(2048));
        recycle_output(Vec::with_capacity(WRITE_BUDGET));
        let mut caps = spare_capacities();
        caps.sort_unstable();
        assert_eq!(caps.len(), SPARE_BUFFERS);
        assert!(caps[0] >= 8192 && caps[1] >= WRITE_BUDGET, "{caps:?}");
        assert!(SPARE.with(|s| s.borrow().iter().all(Vec::is_empty)));
    }
}
