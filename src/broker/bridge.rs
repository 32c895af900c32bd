//! MQTT 5 request/reply across protocols: the reply inboxes frond assigns
//! to MQTT 5 requests and the redirect of a reply to its response topic.
//!
//! Owns: the bounded, shared table of reply inboxes ([`Replies`]) and the
//! NATS form of a will's properties. Reads the clock and the OS's
//! randomness (inbox names); the property <-> header mapping itself is
//! [`crate::mqtt::props`], re-exported here for the callers of this path.
//!
//! - Request/reply: an MQTT 5 PUBLISH with a Response Topic and
//!   Correlation Data reaches NATS subscribers with the reply subject
//!   `_INBOX.frond.<n>.<random>`. frond remembers (response topic, correlation
//!   data) under that inbox for [`REPLY_TTL`] (at most [`REPLY_TABLE_MAX`]
//!   entries, oldest evicted); a message published to the inbox (by a
//!   NATS service's `msg.respond`, or an MQTT client) is routed to the
//!   response topic with `Mqtt-Correlation-Data` added. Without
//!   Correlation Data the reply subject is the response topic's subject.
//!   The `_INBOX.` prefix keeps requests' replies out of streams.
//!
//! Authorization of request/reply (the redirect must not let anyone write
//! where they may not; see [`response_topic_allowed`], [`redirect_reply`]):
//! - At request time (an MQTT 5 PUBLISH with a Response Topic) the
//!   requester must be allowed to SUBSCRIBE to the response topic's subject
//!   (it receives there) and to PUBLISH to it (a redirected reply lands
//!   there in the requester's name: a user allowed to subscribe to `cmd.>`
//!   but not to publish there must not write into `cmd.>` by answering its
//!   own request). A response topic in the reserved `$` namespace (the
//!   JetStream API `$JS.API.>`, acks `$JS.ACK.>`, …) is refused for every
//!   user: a redirected reply carries the replier's payload, and must never
//!   become an API call. Otherwise the PUBLISH is refused like one to a
//!   denied topic (MQTT 5 PUBACK/PUBREC 0x87 for QoS 1/2; QoS 0 is dropped
//!   with a debug log line) and no inbox is assigned.
//! - Inboxes end in 96 random bits from the OS: only a client the request
//!   was delivered to knows where to answer.
//! - The replier's publish to the inbox is checked as any publish (its
//!   publish permissions; `allow_responses` for NATS). Then the message
//!   goes to the response subject without a reply subject of its own (and
//!   without an `Mqtt-Response-Topic` header): a replier cannot get an
//!   answer back from wherever the response topic points. A redirect to a
//!   `$` subject is refused here too (dropped, logged), whatever put it in
//!   the table.
//! - A will's Response Topic gets no inbox ([`will_meta`]): when it fires
//!   (possibly after a restart) its client's permissions are not at hand,
//!   so the reply subject is the response topic itself and a replier needs
//!   its own permission to publish there. For the same reason the
//!   JetStream API answers no will ([`will_publisher`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::auth::Permissions;
pub use crate::mqtt::props::{
    headers_to_meta, props_to_headers, response_topic_allowed, stored_headers, with_correlation,
    Meta, CONTENT_TYPE, CORRELATION_DATA, EXPIRY, PAYLOAD_FORMAT, QOS, RESPONSE_TOPIC,
};
use crate::subject::mqtt as topics;
use crate::wire::mqtt::Properties;
use crate::wire::nats::headers::HeaderBlock;

/// Reply subjects frond assigns to MQTT 5 requests start with this.
pub const INBOX_PREFIX: &str = "_INBOX.frond.";
/// How long a request's reply inbox is remembered.
pub const REPLY_TTL: Duration = Duration::from_secs(120);
/// Most reply inboxes remembered at once.
pub const REPLY_TABLE_MAX: usize = 10_000;

/// The NATS form of an MQTT 5 PUBLISH's properties: the header block and
/// the reply subject (an inbox from `replies` when it has Correlation Data).
pub fn publish_meta(
    replies: &Replies,
    p: &Properties,
    now: Instant,
) -> (Option<Vec<u8>>, Option<String>) {
    let headers = props_to_headers(p);
    let reply = p.response_topic.as_ref().map(|t| {
        let subject = topics::topic_to_subject(t);
        match &p.correlation_data {
            Some(cd) => replies.assign(subject, cd.clone(), now),
            None => subject,
        }
    });
    (headers, reply)
}

/// Where a client publish goes (see [`redirect_reply`]).
pub type Redirected = (String, Option<Vec<u8>>, Option<String>);

/// A publish to `subject` with `headers` and `reply` (from either
/// protocol), already authorized as a publish to `subject`. When `subject`
/// is a live request inbox: `Ok` with the response topic's subject, the
/// headers with the request's correlation data and without
/// `Mqtt-Response-Topic`, and no reply subject; `Err(target)` when the
/// target is in the reserved `$` namespace (drop the message). Otherwise
/// all three unchanged. Cheap for other subjects (a prefix check; no clock
/// read, no lock).
pub fn redirect_reply(
    replies: &Replies,
    subject: String,
    headers: Option<Vec<u8>>,
    reply: Option<String>,
) -> Result<Redirected, String> {
    if !subject.starts_with(INBOX_PREFIX) {
        return Ok((subject, headers, reply));
    }
    match replies.resolve(&subject, Instant::now()) {
        Some((to, _)) if to.starts_with('$') => Err(to),
        Some((to, correlation)) => {
            let headers = without_response_topic(headers);
            Ok((to, with_correlation(headers, &correlation), None))
        }
        None => Ok((subject, headers, reply)),
    }
}

/// `headers` without `Mqtt-Response-Topic` (unchanged when unreadable:
/// then nothing maps it to a response topic either).
fn without_response_topic(headers: Option<Vec<u8>>) -> Option<Vec<u8>> {
    let block = headers.as_deref()?;
    let Ok(mut h) = HeaderBlock::parse(block) else {
        return headers;
    };
    if h.get(RESPONSE_TOPIC).is_none() {
        return headers;
    }
    h.remove(RESPONSE_TOPIC);
    if h.entries.is_empty() {
        return None;
    }
    h.encode().ok().or(headers)
}

/// The [`crate::router::Msg::publisher`] of a will: allowed nothing, so
/// the JetStream API answers no will (its client's permissions are not
/// known when it fires, possibly after a restart).
pub fn will_publisher() -> std::sync::Arc<Permissions> {
    std::sync::Arc::new(Permissions {
        deny_publish: vec![">".into()],
        deny_subscribe: vec![">".into()],
        ..Permissions::default()
    })
}

/// The NATS form of a will's properties: the header block, and the
/// response topic's subject as the reply subject — never a request inbox
/// (see the module doc). A response topic in the `$` namespace is dropped.
pub fn will_meta(p: &Properties) -> (Option<Vec<u8>>, Option<String>) {
    let headers = props_to_headers(p);
    let reply = p
        .response_topic
        .as_ref()
        .map(|t| topics::topic_to_subject(t))
        .filter(|s| !s.starts_with('$'));
    (headers, reply)
}

/// 96 random bits from the OS, in hex: an inbox cannot be guessed, so only
/// a client the request was delivered to can answer it (a guessed inbox
/// would let anyone write to the requester's response topic).
fn inbox_secret() -> String {
    use std::fmt::Write;
    let mut b = [0u8; 12];
    if getrandom::getrandom(&mut b).is_err() {
        // No OS randomness: still not sequential.
        for c in b.chunks_mut(4) {
            c.copy_from_slice(&fastrand::u32(..).to_le_bytes());
        }
    }
    b.iter().fold(String::with_capacity(24), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

struct Pending {
    /// The NATS subject of the response topic.
    subject: String,
    correlation: Vec<u8>,
    at: Instant,
}

/// Reply inboxes assigned to MQTT 5 requests (bounded by count and age).
#[derive(Default)]
pub struct Replies {
    inner: Mutex<RepliesInner>,
}

#[derive(Default)]
struct RepliesInner {
    map: HashMap<String, Pending>,
    order: VecDeque<String>,
    next: u64,
}

impl Replies {
    /// A fresh inbox whose replies go to `subject` with `correlation`.
    pub fn assign(&self, subject: String, correlation: Vec<u8>, now: Instant) -> String {
        let secret = inbox_secret();
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.expire(now);
        while t.map.len() >= REPLY_TABLE_MAX {
            match t.order.pop_front() {
                Some(old) => {
                    t.map.remove(&old);
                }
                None => break,
            }
        }
        t.next += 1;
        let inbox = format!("{INBOX_PREFIX}{:x}.{secret}", t.next);
        t.map.insert(
            inbox.clone(),
            Pending {
                subject,
                correlation,
                at: now,
            },
        );
        t.order.push_back(inbox.clone());
        inbox
    }

    /// Where a message published to `subject` goes: `Some((response
    /// subject, correlation data))` when `subject` is a live inbox.
    pub fn resolve(&self, subject: &str, now: Instant) -> Option<(String, Vec<u8>)> {
        if !subject.starts_with(INBOX_PREFIX) {
            return None;
        }
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.expire(now);
        t.map
            .get(subject)
            .map(|p| (p.subject.clone(), p.correlation.clone()))
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RepliesInner {
    fn expire(&mut self, now: Instant) {
        while let Some(front) = self.order.front() {
            let old = self
                .map
                .get(front)
                .is_none_or(|p| now.saturating_duration_since(p.at) >= REPLY_TTL);
            if !old {
                break;
            }
            if let Some(k) = self.order.pop_front() {
                self.map.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_table_is_bounded_and_expires() {
        let r = Replies::default();
        let now = Instant::now();
        let inbox = r.assign("resp.me".into(), b"c".to_vec(), now);
        assert!(inbox.starts_with(INBOX_PREFIX));
        assert_eq!(
            r.resolve(&inbox, now),
            Some(("resp.me".to_string(), b"c".to_vec()))
        );
        assert_eq!(r.resolve("_INBOX.frond.nope", now), None);
        assert_eq!(r.resolve(&inbox, now + REPLY_TTL), None, "expired");
        assert!(r.is_empty());
        for i in 0..REPLY_TABLE_MAX + 5 {
            r.assign(format!("s{i}"), Vec::new(), now);
        }
        assert_eq!(r.len(), REPLY_TABLE_MAX);
    }

    #[test]
    fn a_redirected_reply_loses_its_own_reply_subject() {
        let r = Replies::default();
        let now = Instant::now();
        let inbox = r.assign("a.resp".into(), b"c1".to_vec(), now);
        let own = props_to_headers(&Properties {
            response_topic: Some("back/to/me".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Properties::default()
        });
        let (to, h, reply) = redirect_reply(&r, inbox, own, Some("_INBOX.mine".into())).unwrap();
        assert_eq!(to, "a.resp");
        assert_eq!(reply, None);
        let m = headers_to_meta(h.as_deref(), None);
        assert_eq!(m.props.response_topic, None, "no way back for the replier");
        assert_eq!(m.props.correlation_data.as_deref(), Some(&b"c1"[..]));
        assert_eq!(m.props.user_properties, vec![("k".into(), "v".into())]);
        // Other subjects pass unchanged.
        let same = redirect_reply(&r, "x.y".into(), None, Some("r".into())).unwrap();
        assert_eq!(same, ("x.y".to_string(), None, Some("r".to_string())));
        // A reserved target is refused, whatever put it in the table.
        let bad = r.assign("$JS.API.STREAM.PURGE.SEC".into(), b"c".to_vec(), now);
        assert_eq!(
            redirect_reply(&r, bad, None, None),
            Err("$JS.API.STREAM.PURGE.SEC".to_string())
        );
    }

    #[test]
    fn wills_get_no_inbox_and_no_api() {
        let r = Replies::default();
        let p = Properties {
            response_topic: Some("a/resp".into()),
            correlation_data: Some(b"c".to_vec()),
            ..Properties::default()
        };
        let (h, reply) = will_meta(&p);
        assert_eq!(reply.as_deref(), Some("a.resp"), "the topic itself");
        assert!(h.is_some());
        assert!(r.is_empty());
        let p = Properties {
            response_topic: Some("$JS/API/X".into()),
            ..Properties::default()
        };
        assert_eq!(will_meta(&p).1, None);
        let w = will_publisher();
        assert!(!w.can_subscribe("_INBOX.x") && !w.can_publish("a"));
    }
}
