//! Pulls and acks: `CONSUMER.MSG.NEXT` requests waiting on a consumer,
//! `$JS.ACK.` acknowledgements (with `+NXT` and AckSync), the timers of
//! waiting requests and consumers, and delivery to waiting requests.
//!
//! Every delivery is checked once more against the puller's permissions
//! (the [`Receiver`] of its request).

use super::call::may_answer;
use super::render::status_msg;
use super::{JsApi, OutBuf, StatusOut};
use crate::auth::Permissions;
use crate::router::Msg;
use crate::stream::consumer::{
    ack_subject, parse_ack_subject, AckKind, Consumer, PullRequest, Receiver, ReceiverRef,
};
use crate::stream::{Retention, StoredMessage, StreamHandle};

pub(super) async fn deliver_consumer(
    h: &StreamHandle,
    stream: &str,
    c: &mut Consumer,
    now: u64,
    out: &mut OutBuf,
) {
    loop {
        if c.waiting.is_empty() || out.delivery_full() {
            // Budget used up: the rest (and the end of no_wait requests)
            // next iteration.
            return;
        }
        if let Some(&s) = c.redeliver.iter().next() {
            match h.get(s).await {
                Ok(Some(m)) if !receiver_may_read(c, &m.subject, out) => {}
                Ok(Some(m)) => send(stream, c, m, now, out),
                Ok(None) => c.forget(s),
                Err(_) => return,
            }
            continue;
        }
        if !c.may_deliver_new() {
            break;
        }
        let want = c
            .waiting
            .front()
            .map_or(1, |r| r.batch.saturating_sub(r.sent))
            .clamp(1, 256);
        let end = h.state().last_seq;
        let msgs = match h.read(c.read_from(), want, 1 << 20).await {
            Ok(m) => m,
            Err(_) => return,
        };
        if msgs.is_empty() {
            break;
        }
        super::backlog::after_read(h, c, &msgs, end).await;
        for m in msgs {
            if !c.wants(m.seq, &m.subject) {
                c.skip(m.seq);
                continue;
            }
            if c.waiting.is_empty() || !c.may_deliver_new() || out.delivery_full() {
                break;
            }
            if !receiver_may_read(c, &m.subject, out) {
                break;
            }
            send(stream, c, m, now, out);
        }
    }
    // Nothing more to hand out now: no_wait requests end here.
    let mut keep = std::collections::VecDeque::new();
    while let Some(r) = c.waiting.pop_front() {
        if !r.no_wait {
            keep.push_back(r);
            continue;
        }
        let (code, text) = if r.sent == 0 {
            (404, "No Messages")
        } else {
            (408, "Request Timeout")
        };
        let left = (
            r.batch.saturating_sub(r.sent),
            r.max_bytes.saturating_sub(r.sent_bytes),
        );
        out.push((
            r.reply.clone(),
            Msg {
                subject: r.reply.clone(),
                reply: None,
                headers: Some(status_msg(code, text, Some(left))),
                payload: Vec::new(),
                publisher: None,
            },
        ));
    }
    c.waiting = keep;
}

/// The last check per delivery: whether the client of the first waiting
/// pull request may receive a message on `subject`. A request whose client
/// may not is ended with a 403 status (pulls are authorized when they
/// arrive, so this only guards against a consumer that changed since); the
/// message stays for another request.
pub(super) fn receiver_may_read(c: &mut Consumer, subject: &str, out: &mut OutBuf) -> bool {
    let Some(r) = c.waiting.front() else {
        return false;
    };
    if r.receiver.as_ref().is_none_or(|r| r.0.may_receive(subject)) {
        return true;
    }
    if let Some(r) = c.waiting.pop_front() {
        log::warn!(
            "jetstream: pull request of consumer {} ended: its client may not receive {subject:?}",
            c.name
        );
        out.push((
            r.reply.clone(),
            Msg {
                subject: r.reply,
                reply: None,
                headers: Some(status_msg(403, "Not Authorized", None)),
                payload: Vec::new(),
                publisher: None,
            },
        ));
    }
    false
}

pub(super) fn send(stream: &str, c: &mut Consumer, m: StoredMessage, now: u64, out: &mut OutBuf) {
    let (cseq, n) = c.record_delivery(m.seq, now);
    let pending = c.backlog.num_pending;
    let reply = ack_subject(stream, &c.name, n, m.seq, cseq, m.timestamp, pending);
    let size = m.subject.len() + m.payload.len() + m.headers.as_ref().map_or(0, Vec::len);
    let Some(r) = c.waiting.front_mut() else {
        return;
    };
    r.sent += 1;
    r.sent_bytes += size;
    let to = r.reply.clone();
    if r.sent >= r.batch || (r.max_bytes > 0 && r.sent_bytes >= r.max_bytes) {
        c.waiting.pop_front();
    }
    out.deliver((
        to,
        Msg {
            subject: m.subject,
            reply: Some(reply),
            headers: m.headers,
            payload: m.payload,
            publisher: None,
        },
    ));
}

impl Receiver for Permissions {
    fn may_receive(&self, subject: &str) -> bool {
        self.may_deliver(subject)
    }
}

impl JsApi {
    pub(super) fn handle_next(&mut self, stream: &str, consumer: &str, m: &Msg, now: u64) {
        let Some(reply) = m.reply.clone() else {
            return;
        };
        let caller = m.publisher.as_ref();
        if !may_answer(caller.map(|p| &**p), &reply) {
            log::debug!(
                "jetstream: pull request ignored: its caller may not subscribe to {reply:?}"
            );
            return;
        }
        let slot = self
            .slots
            .iter_mut()
            .find(|s| s.handle.config().name == stream);
        let Some((c, subjects)) =
            slot.and_then(|s| Some((s.consumers.get_mut(consumer)?, &s.handle.config().subjects)))
        else {
            self.status(&reply, 409, "Consumer Deleted", None);
            return;
        };
        if c.cfg.push.is_some() {
            self.status(&reply, 409, "Consumer is push based", None);
            return;
        }
        if caller.is_some_and(|p| !c.readable_by(subjects, &p.deny_subscribe)) {
            log::debug!("jetstream: pull from {stream}/{consumer} refused: it can deliver subjects its caller may not subscribe to");
            self.status(&reply, 403, "Not Authorized", None);
            return;
        }
        match PullRequest::parse(&reply, &m.payload, now) {
            Ok(mut r) => {
                r.receiver = caller.map(|p| ReceiverRef(p.clone()));
                c.last_active = now;
                if c.waiting.len() as i64 >= c.cfg.max_waiting {
                    self.status(&reply, 409, "Exceeded MaxWaiting", None);
                } else {
                    c.waiting.push_back(r);
                }
            }
            Err(e) => self.status(&reply, 400, &e.description, None),
        }
    }

    pub(super) fn handle_ack(&mut self, m: &Msg, now: u64) {
        let Some((stream, consumer, sseq)) = parse_ack_subject(&m.subject) else {
            return;
        };
        let Some(kind) = AckKind::parse(&m.payload) else {
            log::debug!(
                "jetstream: unknown ack {:?}",
                String::from_utf8_lossy(&m.payload)
            );
            return;
        };
        let Some(slot) = self
            .slots
            .iter_mut()
            .find(|s| s.handle.config().name == stream)
        else {
            return;
        };
        let Some(c) = slot.consumers.get_mut(consumer) else {
            return;
        };
        let done = c.ack(sseq, &kind, now);
        let mut sync_reply = None;
        let caller = m.publisher.as_ref();
        // The reply of an ack (a `+NXT` pull, an AckSync answer) is
        // authorized like a pull request (see `handle_next`).
        let reply = m.reply.clone().filter(|r| {
            let ok = may_answer(caller.map(|p| &**p), r);
            if !ok {
                log::debug!("jetstream: no answer to the ack's reply {r:?}: its caller may not subscribe to it");
            }
            ok
        });
        if let (AckKind::Next(batch), Some(reply)) = (&kind, &reply) {
            let readable = caller
                .is_none_or(|p| c.readable_by(&slot.handle.config().subjects, &p.deny_subscribe));
            match PullRequest::parse(reply, b"", now) {
                Ok(mut r) if readable => {
                    r.batch = *batch;
                    r.receiver = caller.map(|p| ReceiverRef(p.clone()));
                    c.waiting.push_back(r);
                }
                Ok(_) => log::debug!("jetstream: +NXT on {stream}/{consumer} refused: it can deliver subjects its caller may not subscribe to"),
                Err(_) => {}
            }
        } else if let Some(reply) = reply {
            sync_reply = Some(reply);
        }
        if slot.handle.config().retention != Retention::Limits {
            slot.check.extend(done.into_iter().map(|s| (s, s)));
        }
        if let Some(reply) = sync_reply {
            // AckSync: answered after the state is on disk.
            self.reply(&reply, Vec::new());
        }
    }

    /// Timers: ack waits, pull request expiry and heartbeats, idle
    /// ephemeral consumers; new messages and mirror progress for
    /// retention. `cursors` gives the hub-acknowledged local sequence of
    /// mirrored streams.
    pub fn tick(&mut self, now: u64, cursors: &dyn Fn(&str) -> Option<u64>) {
        let mut statuses: Vec<StatusOut> = Vec::new();
        for slot in &mut self.slots {
            let retention = slot.handle.config().retention;
            let mut gone = Vec::new();
            for c in slot.consumers.values_mut() {
                let dropped = c.handle_timeout(now);
                if retention != Retention::Limits {
                    slot.check.extend(dropped.into_iter().map(|s| (s, s)));
                }
                let mut keep = std::collections::VecDeque::new();
                while let Some(mut r) = c.waiting.pop_front() {
                    if r.expires.is_some_and(|e| e <= now) {
                        let left = (
                            r.batch - r.sent.min(r.batch),
                            r.max_bytes.saturating_sub(r.sent_bytes),
                        );
                        statuses.push((r.reply.clone(), 408, "Request Timeout", Some(left)));
                        c.last_active = now;
                        continue;
                    }
                    if r.heartbeat > 0 && r.next_heartbeat <= now {
                        statuses.push((r.reply.clone(), 100, "Idle Heartbeat", None));
                        r.next_heartbeat = now.saturating_add(r.heartbeat);
                    }
                    keep.push_back(r);
                }
                c.waiting = keep;
                if !c.durable()
                    && c.cfg.push.is_none()
                    && c.waiting.is_empty()
                    && now >= c.last_active.saturating_add(c.cfg.inactive_threshold_ns)
                {
                    gone.push(c.name.clone());
                }
            }
            for g in gone {
                log::debug!("jetstream: ephemeral consumer {g} removed after inactivity");
                slot.consumers.remove(&g);
                let st = slot.handle.state();
                if retention == Retention::Interest && st.msgs > 0 {
                    slot.check.push((st.first_seq, st.last_seq));
                }
            }
            if retention == Retention::Limits {
                continue;
            }
            let last = slot.handle.state().last_seq;
            if retention == Retention::Interest && last > slot.seen_last {
                slot.check.push((slot.seen_last + 1, last));
            }
            slot.seen_last = slot.seen_last.max(last);
            if slot.mirrored {
                let cur = cursors(&slot.handle.config().name).unwrap_or(0);
                if cur > slot.mirror_cursor {
                    slot.check.push((slot.mirror_cursor + 1, cur));
                    slot.mirror_cursor = cur;
                }
            }
        }
        for (to, code, text, pending) in statuses {
            self.status(&to, code, text, pending);
        }
    }

    /// One iteration's deliveries: pull ([`JsApi::deliver`]) and push
    /// ([`JsApi::deliver_push`]) consumers share
    /// [`super::DELIVERY_BUDGET`], and the kind that goes first alternates
    /// from one iteration to the next, so busy pull consumers cannot hold
    /// the whole budget every iteration and starve push ones (KV
    /// watchers), nor the reverse. Returns [`JsApi::deliver_push`]'s
    /// answer: whether some push consumer waits for a subscriber.
    pub async fn deliver_all(
        &mut self,
        now: u64,
        interest: &(dyn Fn(&str) -> bool + Sync),
    ) -> bool {
        self.budget_cut = false;
        self.push_first = !self.push_first;
        if self.push_first {
            let waiting = self.deliver_push(now, interest).await;
            self.deliver(now).await;
            waiting
        } else {
            self.deliver(now).await;
            self.deliver_push(now, interest).await
        }
    }

    /// Hand messages to waiting pull requests. The consumers share
    /// [`super::DELIVERY_BUDGET`] (with the push deliveries of the same
    /// iteration, see [`JsApi::deliver_all`]); the next iteration starts
    /// with the consumer after the last one served.
    pub async fn deliver(&mut self, now: u64) {
        let order = self.consumers_from(self.pull_turn, |c| !c.waiting.is_empty());
        let n = order.len();
        for (k, (i, name)) in order.into_iter().enumerate() {
            if self.out.delivery_full() {
                self.budget_cut = true;
                self.pull_turn = (self.pull_turn + k) % n.max(1);
                return;
            }
            let Some(slot) = self.slots.get_mut(i) else {
                continue;
            };
            let h = slot.handle.clone();
            let stream = h.config().name.clone();
            if let Some(c) = slot.consumers.get_mut(&name) {
                deliver_consumer(&h, &stream, c, now, &mut self.out).await;
            }
        }
        self.budget_cut |= self.out.delivery_full();
    }
}
