//! MQTT 5 message metadata <-> NATS headers and reply subjects.
//!
//! Owns: the mapping between an MQTT 5 PUBLISH's properties and the NATS
//! header block stored and routed with the message, and the table of reply
//! inboxes frond assigns to MQTT 5 requests. Pure functions plus one
//! bounded table; no I/O.
//!
//! The mapping (one header per property; names are matched
//! case-insensitively; values are text):
//!
//! | MQTT 5 property            | NATS header / field |
//! | --- | --- |
//! | user property `name=value` | header `name: value` (every pair, in order) |
//! | content type               | `Content-Type` |
//! | payload format indicator   | `Mqtt-Payload-Format` (`0` or `1`) |
//! | message expiry interval    | `Mqtt-Expiry` (seconds, counted from when the message was routed or stored) |
//! | response topic             | `Mqtt-Response-Topic` (the MQTT topic), and the NATS reply subject |
//! | correlation data           | `Mqtt-Correlation-Data` (standard base64) |
//! | the publisher's QoS, when 0 or 2 | `Mqtt-QoS: 0` / `Mqtt-QoS: 2` (stored copies only, see below) |
//!
//! The publisher's QoS: a message an MQTT client publishes at QoS 0 or 2
//! is stored in a stream with `Mqtt-QoS: 0` or `2`, so a persistent
//! session that reads it back delivers it at min(publisher QoS, granted
//! QoS), as MQTT requires (26 bytes per record). QoS 1 publishes get no
//! header, and a stored message without it counts as QoS 1 — as do
//! messages NATS clients publish or the hub sources down (a NATS client
//! may set `Mqtt-QoS` itself). The header
//! is added to the stored copy only, not to live deliveries (the router
//! passes the publisher's QoS along). A user property of that name is not
//! carried, so a client cannot raise its own QoS with one.
//!
//! - A user property whose name is not a valid header name (empty, or
//!   containing `:`, whitespace or control characters) or whose value has
//!   CR/LF is not carried (logged at debug). Headers the store acts on
//!   (`Nats-Msg-Id`, `Nats-TTL`, ...) may be set this way, with their
//!   JetStream meaning.
//! - NATS -> MQTT 5: every header other than the names above becomes a
//!   user property; a reply subject becomes the Response Topic (mapped
//!   to a topic) unless `Mqtt-Response-Topic` is present.
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
use crate::subject::mqtt as topics;
use crate::wire::mqtt::Properties;
use crate::wire::nats::base64;
use crate::wire::nats::headers::HeaderBlock;

pub const CONTENT_TYPE: &str = "Content-Type";
pub const PAYLOAD_FORMAT: &str = "Mqtt-Payload-Format";
pub const EXPIRY: &str = "Mqtt-Expiry";
pub const RESPONSE_TOPIC: &str = "Mqtt-Response-Topic";
pub const CORRELATION_DATA: &str = "Mqtt-Correlation-Data";
pub const QOS: &str = "Mqtt-QoS";
/// Reply subjects frond assigns to MQTT 5 requests start with this.
pub const INBOX_PREFIX: &str = "_INBOX.frond.";
/// How long a request's reply inbox is remembered.
pub const REPLY_TTL: Duration = Duration::from_secs(120);
/// Most reply inboxes remembered at once.
pub const REPLY_TABLE_MAX: usize = 10_000;

/// The NATS header block for an MQTT 5 PUBLISH's properties (`None`
/// when nothing maps).
pub fn props_to_headers(p: &Properties) -> Option<Vec<u8>> {
    let mut h = HeaderBlock::new();
    for (k, v) in &p.user_properties {
        let bad_key = k.is_empty() || k.bytes().any(|b| b == b':' || b <= b' ' || b == 0x7f);
        if bad_key || v.contains(['\r', '\n']) || k.eq_ignore_ascii_case(QOS) {
            log::debug!("mqtt: user property {k:?} cannot be a NATS header; not carried");
            continue;
        }
        h.push(k.clone(), v.clone());
    }
    if let Some(ct) = p
        .content_type
        .as_ref()
        .filter(|c| !c.contains(['\r', '\n']))
    {
        h.push(CONTENT_TYPE, ct.clone());
    }
    if let Some(f) = p.payload_format_indicator {
        h.push(PAYLOAD_FORMAT, f.to_string());
    }
    if let Some(e) = p.message_expiry_interval {
        h.push(EXPIRY, e.to_string());
    }
    if let Some(rt) = p
        .response_topic
        .as_ref()
        .filter(|t| !t.contains(['\r', '\n']))
    {
        h.push(RESPONSE_TOPIC, rt.clone());
    }
    if let Some(cd) = &p.correlation_data {
        h.push(CORRELATION_DATA, base64::encode(cd));
    }
    if h.entries.is_empty() {
        return None;
    }
    h.encode().ok()
}

/// The metadata an MQTT subscriber gets for a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// PUBLISH properties (message expiry as published, not yet reduced).
    pub props: Properties,
    /// `Mqtt-Expiry`: seconds the message lives after it was routed/stored.
    pub expiry: Option<u32>,
    /// `Mqtt-QoS`: the publisher's QoS (only 2 is ever written).
    pub qos: Option<u8>,
}

/// MQTT metadata from a NATS header block and reply subject.
pub fn headers_to_meta(headers: Option<&[u8]>, reply: Option<&str>) -> Meta {
    let mut m = Meta::default();
    if let Some(block) = headers {
        match HeaderBlock::parse(block) {
            Ok(h) => {
                for (k, v) in h.entries {
                    let is = |n: &str| k.eq_ignore_ascii_case(n);
                    if is(CONTENT_TYPE) {
                        m.props.content_type.get_or_insert(v);
                    } else if is(PAYLOAD_FORMAT) {
                        m.props.payload_format_indicator =
                            m.props.payload_format_indicator.or(match v.trim() {
                                "0" => Some(0),
                                "1" => Some(1),
                                _ => None,
                            });
                    } else if is(EXPIRY) {
                        m.expiry = m.expiry.or(v.trim().parse().ok());
                    } else if is(QOS) {
                        m.qos = m.qos.or(v.trim().parse::<u8>().ok().map(|q| q.min(2)));
                    } else if is(RESPONSE_TOPIC) {
                        if crate::wire::mqtt::valid_topic_name(&v) {
                            m.props.response_topic.get_or_insert(v);
                        }
                    } else if is(CORRELATION_DATA) {
                        if m.props.correlation_data.is_none() {
                            m.props.correlation_data = base64::decode(v.trim().as_bytes()).ok();
                        }
                    } else {
                        m.props.user_properties.push((k, v));
                    }
                }
            }
            Err(e) => log::debug!("mqtt: unreadable header block not mapped: {e:?}"),
        }
    }
    if m.props.response_topic.is_none() {
        if let Some(r) = reply {
            let t = topics::subject_to_topic(r);
            if crate::wire::mqtt::valid_topic_name(&t) {
                m.props.response_topic = Some(t);
            }
        }
    }
    m.props.message_expiry_interval = m.expiry;
    m
}

/// Add `Mqtt-Correlation-Data` to a header block unless it has one.
pub fn with_correlation(headers: Option<Vec<u8>>, data: &[u8]) -> Option<Vec<u8>> {
    let mut h = match &headers {
        Some(b) => match HeaderBlock::parse(b) {
            Ok(h) => h,
            Err(_) => return headers,
        },
        None => HeaderBlock::new(),
    };
    if h.get(CORRELATION_DATA).is_some() {
        return headers;
    }
    h.push(CORRELATION_DATA, base64::encode(data));
    h.encode().ok().or(headers)
}

/// The header block to store with a message published at `qos`: `headers`
/// plus `Mqtt-QoS: 0` or `Mqtt-QoS: 2`, unchanged for QoS 1 (see the
/// module doc). QoS 0 is recorded so that a persistent session receives a
/// stored QoS 0 message at QoS 0 (delivery QoS is the minimum of publish
/// and subscription QoS); it costs 26 bytes per such record.
pub fn stored_headers(headers: Option<Vec<u8>>, qos: u8) -> Option<Vec<u8>> {
    match (qos, &headers) {
        (1, _) => return headers,
        // The common case, without building a block.
        (0, None) => return Some(b"NATS/1.0\r\nMqtt-QoS: 0\r\n\r\n".to_vec()),
        _ => {}
    }
    let mut h = match &headers {
        Some(b) => match HeaderBlock::parse(b) {
            Ok(h) => h,
            Err(_) => return headers,
        },
        None => HeaderBlock::new(),
    };
    h.set(QOS, if qos == 0 { "0" } else { "2" });
    h.encode().ok().or(headers)
}

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

/// Whether a client with `perms` (`None`: unrestricted) may make a request
/// whose replies go to the MQTT topic `response_topic`: it may subscribe
/// and publish to its subject, which is not in the reserved `$` namespace
/// (see the module doc).
pub fn response_topic_allowed(perms: Option<&Permissions>, response_topic: &str) -> bool {
    let subject = topics::topic_to_subject(response_topic);
    !subject.starts_with('$')
        && perms.is_none_or(|p| p.can_subscribe(&subject) && p.can_publish(&subject))
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

/// The [`crate::broker::Msg::publisher`] of a will: allowed nothing, so
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
    fn properties_round_trip_through_headers() {
        let p = Properties {
            user_properties: vec![
                ("site".into(), "north".into()),
                ("bad key".into(), "x".into()),
                ("site".into(), "second".into()),
            ],
            content_type: Some("application/json".into()),
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(30),
            response_topic: Some("resp/me".into()),
            correlation_data: Some(vec![0, 1, 255]),
            ..Properties::default()
        };
        let h = props_to_headers(&p).unwrap();
        let text = String::from_utf8(h.clone()).unwrap();
        assert!(text.contains("site: north\r\n"));
        assert!(text.contains("Content-Type: application/json\r\n"));
        assert!(text.contains("Mqtt-Expiry: 30\r\n"));
        assert!(!text.contains("bad key"));
        let m = headers_to_meta(Some(&h), Some("ignored.reply"));
        assert_eq!(m.expiry, Some(30));
        assert_eq!(
            m.props.user_properties,
            vec![
                ("site".to_string(), "north".to_string()),
                ("site".to_string(), "second".to_string())
            ]
        );
        assert_eq!(m.props.response_topic.as_deref(), Some("resp/me"));
        assert_eq!(m.props.correlation_data, Some(vec![0, 1, 255]));
        assert_eq!(m.props.payload_format_indicator, Some(1));
        assert_eq!(props_to_headers(&Properties::default()), None);
    }

    #[test]
    fn reply_subject_becomes_response_topic() {
        let m = headers_to_meta(None, Some("_INBOX.abc.1"));
        assert_eq!(m.props.response_topic.as_deref(), Some("_INBOX/abc/1"));
        assert_eq!(headers_to_meta(Some(b"garbage"), None), Meta::default());
    }

    #[test]
    fn correlation_added_once() {
        let h = with_correlation(None, b"id-1").unwrap();
        let m = headers_to_meta(Some(&h), None);
        assert_eq!(m.props.correlation_data.as_deref(), Some(&b"id-1"[..]));
        let again = with_correlation(Some(h.clone()), b"other").unwrap();
        assert_eq!(again, h);
    }

    #[test]
    fn qos_is_recorded_for_stored_copies_unless_1() {
        assert_eq!(stored_headers(None, 1), None);
        let h0 = stored_headers(None, 0).unwrap();
        assert_eq!(h0, b"NATS/1.0\r\nMqtt-QoS: 0\r\n\r\n");
        assert_eq!(headers_to_meta(Some(&h0), None).qos, Some(0));
        let h = stored_headers(None, 2).unwrap();
        assert_eq!(h, b"NATS/1.0\r\nMqtt-QoS: 2\r\n\r\n");
        let m = headers_to_meta(Some(&h), None);
        assert_eq!(m.qos, Some(2));
        assert!(m.props.user_properties.is_empty(), "not a user property");
        // Added to existing metadata, kept once.
        let p = Properties {
            user_properties: vec![("k".into(), "v".into()), ("mqtt-qos".into(), "2".into())],
            ..Properties::default()
        };
        let base = props_to_headers(&p).unwrap();
        assert!(
            !String::from_utf8_lossy(&base).contains("qos"),
            "a user property cannot set the QoS"
        );
        let h = stored_headers(Some(base), 2).unwrap();
        let h = stored_headers(Some(h), 2).unwrap();
        let m = headers_to_meta(Some(&h), None);
        assert_eq!(m.qos, Some(2));
        assert_eq!(m.props.user_properties, vec![("k".into(), "v".into())]);
        assert_eq!(headers_to_meta(None, None).qos, None);
    }

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
    fn response_topic_needs_both_permissions_and_no_dollar() {
        let p = |sub: &[&str], publ: &[&str]| Permissions {
            allow_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            allow_publish: publ.iter().map(|s| s.to_string()).collect(),
            ..Permissions::default()
        };
        let bob = p(&["a.>", "_INBOX.>"], &["a.>", "_INBOX.>"]);
        assert!(response_topic_allowed(Some(&bob), "a/resp"));
        assert!(!response_topic_allowed(Some(&bob), "secret/x"));
        assert!(!response_topic_allowed(
            Some(&bob),
            "$JS/API/STREAM/PURGE/SEC"
        ));
        // Subscribe alone is not enough: the reply lands there in the
        // requester's name.
        assert!(!response_topic_allowed(
            Some(&p(&["cmd.>"], &["a.>"])),
            "cmd/x"
        ));
        assert!(response_topic_allowed(None, "anything/at/all"));
        assert!(!response_topic_allowed(None, "$JS/API/STREAM/PURGE/SEC"));
        assert!(!response_topic_allowed(None, "$JS/ACK/S/C/1/1/1/1/0"));
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
