//! Push delivery: every push consumer (one with a `deliver_subject`)
//! sends its messages, idle heartbeats and flow control requests to its
//! deliver subject through the router ([`crate::router::Broker::route_to`]),
//! so plain subscribers each get a copy and a queue group (the consumer's
//! `deliver_group`) one member; flow control replies (`$JS.FC.…`) reach
//! the service here.
//!
//! Invariants:
//! - A push consumer delivers only while its deliver subject has a
//!   subscriber (as nats-server); an ephemeral one without one for its
//!   `inactive_threshold` is removed. One waiting for a subscriber is
//!   looked at again when a subscription is added (the task waits on
//!   [`crate::router::Broker::on_subscribe`]), not on a timer.
//! - Every delivery is checked against the user the consumer acts for (its
//!   creator, [`crate::stream::push::PushState::creator`]): a message on a
//!   subject that user may not receive is stepped over like a filtered-out
//!   one. After a restart a durable push consumer keeps the exclusions
//!   fixed at its creation ([`Consumer::exclusions`]).
//! - At most [`PUSH_BUDGET`] messages per consumer per loop iteration, so
//!   API requests and acks are not starved; the rest goes next iteration.
//! - All consumers together send at most about [`super::DELIVERY_BUDGET`]
//!   bytes per iteration (one message past it at most); the next
//!   iteration resumes with the consumer after the last one served, so N
//!   consumers cannot make one iteration hold N times a large backlog;
//!   push and pull consumers take turns going first
//!   ([`JsApi::deliver_all`]), so neither kind starves the other.

use super::render::status_msg;
use super::{JsApi, Out, OutBuf};
use crate::router::Msg;
use crate::stream::consumer::{ack_subject, Consumer};
use crate::stream::push::with_msg_size;
use crate::stream::{Retention, StoredMessage, StreamHandle};

/// Messages one push consumer sends per loop iteration.
const PUSH_BUDGET: usize = 1024;
/// About the most bytes one read of a push consumer brings in.
const READ_BYTES: usize = 1 << 20;

fn control(to: &str, headers: Vec<u8>, reply: Option<String>) -> Out {
    (
        to.to_string(),
        Msg {
            subject: to.to_string(),
            reply,
            headers: Some(headers),
            payload: Vec::new(),
            publisher: None,
        },
    )
}

/// Whether the user `c` acts for may receive a message on `subject`.
fn creator_may(c: &Consumer, subject: &str) -> bool {
    c.push
        .creator
        .as_ref()
        .is_none_or(|r| r.0.may_receive(subject))
}

fn send_push(
    stream: &str,
    c: &mut Consumer,
    to: &str,
    m: StoredMessage,
    now: u64,
    out: &mut OutBuf,
) {
    let (cseq, n) = c.record_delivery(m.seq, now);
    let pending = c.backlog.num_pending;
    let reply = ack_subject(stream, &c.name, n, m.seq, cseq, m.timestamp, pending);
    let size = m.subject.len() + m.payload.len() + m.headers.as_ref().map_or(0, Vec::len);
    let (headers, payload) = if c.cfg.opts.headers_only {
        (
            Some(with_msg_size(m.headers.as_deref(), m.payload.len())),
            Vec::new(),
        )
    } else {
        (m.headers, m.payload)
    };
    c.push_sent(size, m.timestamp, now);
    out.deliver((
        to.to_string(),
        Msg {
            subject: m.subject,
            reply: Some(reply),
            headers,
            payload,
            publisher: None,
        },
    ));
    if let Some(fc) = c.flow_request(stream) {
        out.push(control(
            to,
            status_msg(100, "FlowControl Request", None),
            Some(fc),
        ));
    }
}

/// One push consumer's turn: interest, heartbeat, redeliveries, then new
/// messages while flow control, rate, replay spacing and
/// `max_ack_pending` allow. Returns false when it is an ephemeral
/// consumer whose deliver subject has had no subscriber for its
/// inactive threshold (the caller removes it); sets `waiting` when its
/// deliver subject has no subscriber.
async fn push_consumer(
    h: &StreamHandle,
    stream: &str,
    c: &mut Consumer,
    now: u64,
    interest: &(dyn Fn(&str) -> bool + Sync),
    out: &mut OutBuf,
    waiting: &mut bool,
) -> bool {
    let Some(to) = c.push_cfg().map(|p| p.deliver_subject.clone()) else {
        return true;
    };
    c.push.recheck_at = None;
    if c.push.not_before <= now {
        c.push.not_before = 0;
    }
    if !interest(&to) {
        log::trace!(
            "jetstream: push consumer {} waits for a subscriber on {to}",
            c.name
        );
        c.push.next_heartbeat = 0;
        c.push.not_before = 0;
        let expires = c.last_active.saturating_add(c.cfg.inactive_threshold_ns);
        if !c.durable() && now >= expires {
            return false;
        }
        c.push.recheck_at = (!c.durable()).then_some(expires);
        *waiting = true;
        return true;
    }
    c.last_active = now;
    log::trace!(
        "jetstream: push consumer {} at {} (stream last {})",
        c.name,
        c.delivered_sseq,
        h.state().last_seq
    );
    if let Some(hb) = c.heartbeat_due(now) {
        out.push(control(&to, hb, None));
    }
    let mut budget = PUSH_BUDGET;
    'outer: while budget > 0 && c.push_ready(now) && !out.delivery_full() {
        if let Some(&s) = c.redeliver.iter().next() {
            match h.get(s).await {
                Ok(Some(m)) if creator_may(c, &m.subject) => {
                    budget -= 1;
                    send_push(stream, c, &to, m, now, out);
                }
                Ok(_) => c.forget(s),
                Err(_) => return true,
            }
            continue;
        }
        if !c.may_deliver_new() {
            break;
        }
        // One read for the pass's whole budget (bounded in bytes): each
        // read is a round trip to the stream's owner, which answers after
        // its current group commit.
        let end = h.state().last_seq;
        let msgs = match h.read(c.read_from(), budget, READ_BYTES).await {
            Ok(m) => m,
            Err(_) => return true,
        };
        if msgs.is_empty() {
            break;
        }
        super::backlog::after_read(h, c, &msgs, end).await;
        for m in msgs {
            if !c.wants(m.seq, &m.subject) || !creator_may(c, &m.subject) {
                c.skip(m.seq);
                continue;
            }
            if budget == 0 || !c.push_ready(now) || !c.may_deliver_new() || out.delivery_full() {
                break 'outer;
            }
            let due = c.replay_due(m.timestamp, now);
            if due > now {
                c.push.not_before = due;
                break 'outer;
            }
            budget -= 1;
            send_push(stream, c, &to, m, now, out);
        }
    }
    if budget == 0 || out.delivery_full() {
        c.push.recheck_at = Some(now);
    }
    true
}

impl JsApi {
    /// Deliver for every push consumer; `interest` says whether a subject
    /// has a subscriber. The consumers share [`super::DELIVERY_BUDGET`]
    /// with the pull deliveries of this iteration (which go first every
    /// other iteration, see [`JsApi::deliver_all`]); the next iteration
    /// starts after the last consumer served, so all get their turn.
    /// Returns whether some push consumer waits for a subscriber on its
    /// deliver subject.
    pub async fn deliver_push(
        &mut self,
        now: u64,
        interest: &(dyn Fn(&str) -> bool + Sync),
    ) -> bool {
        let mut waiting = false;
        let order = self.consumers_from(self.push_turn, |c| c.cfg.push.is_some());
        let n = order.len();
        for (k, (i, name)) in order.into_iter().enumerate() {
            if self.out.delivery_full() {
                self.budget_cut = true;
                self.push_turn = (self.push_turn + k) % n.max(1);
                return waiting;
            }
            let Some(slot) = self.slots.get_mut(i) else {
                continue;
            };
            let h = slot.handle.clone();
            let stream = h.config().name.clone();
            let Some(c) = slot.consumers.get_mut(&name) else {
                continue;
            };
            if push_consumer(&h, &stream, c, now, interest, &mut self.out, &mut waiting).await {
                continue;
            }
            log::debug!("jetstream: ephemeral push consumer {name} removed: no subscriber on its deliver subject");
            slot.consumers.remove(&name);
            let st = h.state();
            if h.config().retention == Retention::Interest && st.msgs > 0 {
                slot.check.push((st.first_seq, st.last_seq));
            }
        }
        self.budget_cut |= self.out.delivery_full();
        waiting
    }

    /// A flow control reply (`$JS.FC.<stream>.<consumer>.<n>`).
    pub(super) fn handle_flow(&mut self, subject: &str, now: u64) {
        let Some(rest) = subject.strip_prefix("$JS.FC.") else {
            return;
        };
        let mut t = rest.splitn(3, '.');
        let (Some(stream), Some(consumer)) = (t.next(), t.next()) else {
            return;
        };
        let c = self
            .slots
            .iter_mut()
            .find(|s| s.handle.config().name == stream)
            .and_then(|s| s.consumers.get_mut(consumer));
        if let Some(c) = c {
            c.flow_reply(subject, now);
        }
    }
}
