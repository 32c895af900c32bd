//! The one publish path, sans I/O: every message a client or the server
//! brings in (an MQTT PUBLISH, a NATS PUB/HPUB, an MQTT will) goes through
//! here on its way to live subscribers, retained messages and streams.
//!
//! Owns: the reply redirect of MQTT 5 requests and its check
//! ([`crate::broker::bridge::redirect_reply`]), subject mapping, MQTT 5
//! properties as NATS headers, the `msgs_in`/`bytes_in` counters, the
//! decision a retained write's result implies, routing
//! ([`crate::router`]), the choice of the stream that captures a message
//! and of who is answered, and the in-order acknowledgement queue
//! ([`AckQueue`]).
//!
//! Call order for one publish (the shell does the I/O between steps):
//! 1. [`Ingest::mqtt`], [`Ingest::nats`] or [`Ingest::will`]: the message
//!    as it will be routed, or [`Refused`].
//! 2. MQTT with the retain flag: the shell writes the retained message
//!    (disk) — before routing for a client publish, after it for a will —
//!    and hands the result to [`Ingest::retained`], which says whether the
//!    publish goes on.
//! 3. [`Ingest::route_mqtt`] / [`Ingest::route_will`] (the NATS path
//!    routes in step 1): live delivery; returns the stream that captures
//!    the message with the message to submit, or nothing.
//! 4. The shell submits to the stream and queues the acknowledgement in
//!    the [`AckQueue`]: ready now, or when the stream has stored it; it
//!    completes them in arrival order ([`AckQueue::pop`]) and awaits the
//!    front one's [`AckWaiter`] ([`AckQueue::front`]).
//!
//! Invariants:
//! - Nothing here reads a clock (callers pass `now`), touches a socket or
//!   a file, or blocks.
//! - Per message, nothing is copied or allocated that the shells did not
//!   copy or allocate before: the payload moves from the machine's event
//!   to the stream; the router copies it only for NATS subscribers of an
//!   MQTT publish.
//! - Acknowledgements leave in the order the messages arrived, each only
//!   once its message is durable (or known not to need storage).
//! - A NATS message under `_INBOX.` or `$` is never captured; a stream
//!   that captures everything (`>`) stores requests but never answers
//!   them; a JetStream PubAck goes only to a reply subject the publisher
//!   may subscribe to.
//! - Wills are routed with [`bridge::will_publisher`]'s permissions (none:
//!   the JetStream API answers no will) and are not mapped.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::auth::Permissions;
use crate::broker::bridge;
use crate::mqtt::WillMessage;
use crate::router::{Broker, ConnId, Msg, NoInterest, Origin};
use crate::stream::{AckWaiter, Message, PubAck, StreamError, StreamHandle};
use crate::wire::mqtt::Properties;

/// The publish path over one router (cheap to make: a reference).
#[derive(Clone, Copy)]
pub struct Ingest<'a> {
    broker: &'a Broker,
}

/// An MQTT publish (or will) ready to route.
#[derive(Debug)]
pub struct Publish {
    pub subject: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// The NATS header block (MQTT 5 properties).
    pub headers: Option<Vec<u8>>,
    /// The NATS reply subject (an MQTT 5 Response Topic).
    pub reply: Option<String>,
}

/// Why a publish goes no further.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// A reply to a request whose response subject (`.0`) is in the
    /// reserved `$` namespace: dropped (an MQTT publisher is acknowledged
    /// all the same).
    ReservedReply(String),
    /// The retained message was not stored: over `mqtt.max_retained` or
    /// `max_retained_bytes` (an MQTT 5 QoS 1/2 publish is refused with
    /// 0x97, quota exceeded; others go on without being retained).
    RetainedQuota,
    /// The retained message was not stored (I/O error); the publish is
    /// acknowledged with this error and goes no further.
    RetainedFailed(String),
}

/// Why an acknowledgement reports a failure.
#[derive(Debug)]
pub enum AckError {
    /// The stream did not store the message.
    Stream(StreamError),
    /// The retained message was not stored.
    Retained(String),
}

impl std::fmt::Display for AckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AckError::Stream(e) => write!(f, "{e}"),
            AckError::Retained(e) => write!(f, "retained message not stored: {e}"),
        }
    }
}

/// What a routed publish asks of the shell: submit `message` to
/// `stream`.
pub struct Capture {
    pub stream: StreamHandle,
    pub message: Message,
}

/// A NATS client publish.
pub struct NatsPublish {
    pub subject: String,
    pub reply: Option<String>,
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// The client wants a no-responders status when nobody receives it.
    pub no_responders: bool,
}

/// Who publishes on a NATS connection.
pub struct NatsClient<'p> {
    pub conn: ConnId,
    /// Whether its own subscriptions receive its messages.
    pub echo: bool,
    pub permissions: Option<&'p Arc<Permissions>>,
}

/// What became of a NATS publish.
pub struct NatsRouted {
    /// Nobody received a request whose client asked to be told: the shell
    /// answers `(reply, subject)` with a no-responders status.
    pub no_responders: Option<(String, String)>,
    /// The stream that stores it, and the reply subject its PubAck goes
    /// to (if it is a JetStream publish the publisher may be answered on).
    pub capture: Option<(Capture, Option<String>)>,
}

/// Messages and bytes brought in, counted by the shell over a batch and
/// added to the router's counters at once ([`Ingest::count`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub msgs: u64,
    pub bytes: u64,
}

impl<'a> Ingest<'a> {
    pub fn new(broker: &'a Broker) -> Ingest<'a> {
        Ingest { broker }
    }

    /// Step 1 of an MQTT client publish: mapped subject, MQTT 5 properties
    /// as headers and reply subject (a publish to a request inbox gets no
    /// reply subject of its own, so a reply gets no inbox either), and the
    /// reply redirect. Counted in `msgs_in`/`bytes_in` unless refused.
    pub fn mqtt(
        &self,
        subject: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
        props: Option<&Properties>,
        now: Instant,
    ) -> Result<Publish, Refused> {
        let b = self.broker;
        let subject = b.map_subject(subject);
        let (headers, reply) = match props {
            Some(p) if subject.starts_with(bridge::INBOX_PREFIX) => {
                (bridge::props_to_headers(p), None)
            }
            Some(p) => bridge::publish_meta(&b.replies, p, now),
            None => (None, None),
        };
        let (subject, headers, reply) = bridge::redirect_reply(&b.replies, subject, headers, reply)
            .map_err(Refused::ReservedReply)?;
        b.counters.msgs_in.fetch_add(1, Ordering::Relaxed);
        let bytes = payload.len() as u64;
        b.counters.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        Ok(Publish {
            subject,
            payload,
            qos,
            retain,
            headers,
            reply,
        })
    }

    /// Step 1 of a will: its properties as headers and reply subject (the
    /// response topic's subject, never a request inbox; see
    /// [`bridge::will_meta`]). Not mapped, not counted.
    pub fn will(&self, will: WillMessage) -> Publish {
        let (headers, reply) = match &will.props {
            Some(p) => bridge::will_meta(p),
            None => (None, None),
        };
        Publish {
            subject: will.subject,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            headers,
            reply,
        }
    }

    /// Step 2: what the result of writing a retained message means. `Ok`:
    /// go on (stored, or not stored over the quota for a client that gets
    /// no refusal: the caller decides with [`Refused::RetainedQuota`]).
    /// Refusals over the quota are counted (`retained_refused`).
    pub fn retained(&self, written: std::io::Result<()>) -> Result<(), Refused> {
        match written {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::QuotaExceeded => {
                // Logged (rate-limited) by the retained store.
                let c = &self.broker.counters;
                c.retained_refused.fetch_add(1, Ordering::Relaxed);
                Err(Refused::RetainedQuota)
            }
            Err(e) => Err(Refused::RetainedFailed(e.to_string())),
        }
    }

    /// Step 3 of an MQTT client publish: route it with the publisher's
    /// permissions (NATS subscribers such as the JetStream API see them);
    /// returns whether anyone got it, and its capture. The stored message
    /// keeps the publisher's QoS when 0 or 2 ([`bridge::stored_headers`]).
    pub fn route_mqtt(
        &self,
        p: Publish,
        publisher: Option<Arc<Permissions>>,
        now: Instant,
    ) -> (bool, Option<Capture>) {
        let b = self.broker;
        let routed = b.route_mqtt_as(
            publisher,
            &p.subject,
            &p.payload,
            p.qos,
            p.retain,
            p.headers.clone(),
            p.reply,
            now,
        );
        let capture = b.capture(&p.subject).map(|stream| Capture {
            stream,
            message: Message {
                subject: p.subject,
                headers: bridge::stored_headers(p.headers, p.qos, p.retain),
                payload: p.payload,
            },
        });
        (routed > 0, capture)
    }

    /// Step 3 of a will (before its retained write, step 2): routed as
    /// [`Ingest::route_mqtt`] with no permissions at all
    /// ([`bridge::will_publisher`]). Returns the retained copy's parts when
    /// it has the retain flag (subject, payload, QoS, headers), and its
    /// capture.
    pub fn route_will(&self, p: Publish, now: Instant) -> (Option<Publish>, Option<Capture>) {
        let retained = p.retain.then(|| Publish {
            subject: p.subject.clone(),
            payload: p.payload.clone(),
            qos: p.qos,
            retain: true,
            headers: p.headers.clone(),
            reply: None,
        });
        let (_, capture) = self.route_mqtt(p, Some(bridge::will_publisher()), now);
        (retained, capture)
    }

    /// A NATS client publish, whole: mapping, the reply redirect, routing
    /// (echo, no-interest memory `seen`), and the capture decision. A
    /// captured message is durable, so MQTT subscribers get it at QoS 1
    /// (capped by their subscription). Counted into `tally`.
    pub fn nats(
        &self,
        client: &NatsClient<'_>,
        p: NatsPublish,
        seen: &mut NoInterest,
        tally: &mut Tally,
        now: Instant,
    ) -> Result<NatsRouted, Refused> {
        let b = self.broker;
        let subject = b.map_subject(p.subject);
        // A reply to an MQTT 5 request goes to its response topic, with
        // its correlation data and without a reply subject of its own.
        let (subject, headers, reply) =
            bridge::redirect_reply(&b.replies, subject, p.headers, p.reply)
                .map_err(Refused::ReservedReply)?;
        tally.msgs += 1;
        tally.bytes += p.payload.len() as u64;
        let stream = nats_capture(b, &subject);
        // Who answers a request: a subscriber, or a stream that
        // acknowledges (a catch-all stream cannot tell JetStream publishes
        // from requests: it stays silent).
        let acking = stream.as_ref().is_some_and(|s| !catches_all(s));
        let msg = Msg {
            subject,
            reply,
            headers,
            payload: p.payload,
            publisher: client.permissions.cloned(),
        };
        let origin = Origin {
            conn: client.conn,
            echo: client.echo,
        };
        let qos = u8::from(stream.is_some());
        let captured = stream.is_some();
        let (receivers, m) = b.route_publish(seen, Some(origin), msg, qos, captured, now);
        log::trace!(
            "nats: conn {} PUB {} -> {receivers}",
            client.conn,
            m.subject
        );
        let no_responders = match (&m.reply, receivers, p.no_responders, acking) {
            (Some(r), 0, true, false) => Some((r.clone(), m.subject.clone())),
            _ => None,
        };
        let capture = stream.map(|stream| {
            // A PubAck goes only where the publisher may subscribe (it is
            // the publisher's answer).
            let ack_to = m.reply.filter(|_| acking).filter(|r| {
                let ok = client.permissions.is_none_or(|p| p.can_subscribe(r));
                if !ok {
                    log::debug!(
                        "nats: conn {}: no PubAck to {r:?}: the publisher may not subscribe to it",
                        client.conn
                    );
                }
                ok
            });
            let message = Message {
                subject: m.subject,
                headers: m.headers,
                payload: m.payload,
            };
            (Capture { stream, message }, ack_to)
        });
        Ok(NatsRouted {
            no_responders,
            capture,
        })
    }

    /// Add a batch's [`Tally`] to the router's counters.
    pub fn count(&self, tally: Tally) {
        if tally.msgs > 0 {
            let c = &self.broker.counters;
            c.msgs_in.fetch_add(tally.msgs, Ordering::Relaxed);
            c.bytes_in.fetch_add(tally.bytes, Ordering::Relaxed);
        }
    }
}

/// The stream a NATS publish is captured into. Reply subjects (`_INBOX.`)
/// are transient traffic and never captured. The reserved `$` namespace is
/// captured only by a stream that names it explicitly (a filter starting
/// with `$`, as Key/Value buckets `$KV.<bucket>.>` and object stores
/// `$O.<bucket>.>` do) and never for the API, acks or system subjects
/// (`$JS.`, `$SYS.`): a `>` stream does not swallow them.
fn nats_capture(broker: &Broker, subject: &str) -> Option<StreamHandle> {
    if subject.starts_with("_INBOX.") {
        return None;
    }
    if subject.starts_with('$') {
        if subject.starts_with("$JS.") || subject.starts_with("$SYS.") {
            return None;
        }
        return broker.stream_set().capture_reserved(subject);
    }
    broker.capture(subject)
}

/// Whether a stream captures every subject (the default stream does).
fn catches_all(stream: &StreamHandle) -> bool {
    stream.config().subjects.iter().any(|s| s == ">")
}

/// The result an acknowledgement reports: the stream's PubAck (`None`
/// when nothing was stored), or why it failed.
pub type Acked = Result<Option<PubAck>, AckError>;

/// One queued acknowledgement.
enum Pending {
    /// Known now (nothing to store, or refused).
    Ready(Result<(), AckError>),
    /// When the stream has stored the message.
    Stored(AckWaiter),
}

/// Acknowledgements in the order their messages arrived; `K` says whom to
/// answer (an MQTT packet id, a NATS reply subject).
pub struct AckQueue<K> {
    q: VecDeque<(K, Pending)>,
}

/// What the front of an [`AckQueue`] waits for.
pub enum Front<'q> {
    Empty,
    /// Ready now: [`AckQueue::pop`] returns it.
    Ready,
    /// The stream's answer: await it, then pop.
    Waiting(&'q mut AckWaiter),
}

impl<K> Default for AckQueue<K> {
    fn default() -> Self {
        AckQueue { q: VecDeque::new() }
    }
}

impl<K> AckQueue<K> {
    /// Queue an acknowledgement that is known now.
    pub fn ready(&mut self, k: K, r: Result<(), AckError>) {
        self.q.push_back((k, Pending::Ready(r)));
    }

    /// Queue an acknowledgement due when the stream has stored the
    /// message.
    pub fn stored(&mut self, k: K, w: AckWaiter) {
        self.q.push_back((k, Pending::Stored(w)));
    }

    /// The first acknowledgement if it is known (in arrival order: a later
    /// one that is known waits for the first).
    pub fn pop(&mut self) -> Option<(K, Acked)> {
        let result = match &mut self.q.front_mut()?.1 {
            Pending::Ready(r) => match std::mem::replace(r, Ok(())) {
                Ok(()) => Ok(None),
                Err(e) => Err(e),
            },
            Pending::Stored(w) => match w.try_take()? {
                Ok(ack) => Ok(Some(ack)),
                Err(e) => Err(AckError::Stream(e)),
            },
        };
        let (k, _) = self.q.pop_front()?;
        Some((k, result))
    }

    pub fn front(&mut self) -> Front<'_> {
        match self.q.front_mut() {
            None => Front::Empty,
            Some((_, Pending::Ready(_))) => Front::Ready,
            Some((_, Pending::Stored(w))) => Front::Waiting(w),
        }
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
}

#[cfg(test)]
mod tests;
