//! MQTT 5 message metadata <-> NATS headers.
//!
//! Owns: the mapping between an MQTT 5 PUBLISH's properties and the NATS
//! header block stored and routed with the message, the publisher's QoS
//! recorded on stored copies, and the permission check of a Response
//! Topic. Pure functions; no I/O, no clock. The reply inboxes of MQTT 5
//! requests, and how a reply is redirected, are
//! [`crate::broker::bridge`]'s.
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
//! | the publisher's client id, when one of its No Local subscriptions matches | `Mqtt-Origin` |
//! | RETAIN, on the stored copy of a retained publish | `Mqtt-Retain: 1` (for Retain As Published) |
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
//! - `Mqtt-Origin` (the client id of an MQTT publisher that holds a No
//!   Local subscription matching its own message) is added by the
//!   publishing session only then, so a subscriber with No Local never
//!   gets its own messages, live or read back from a stream (MQTT 5
//!   §3.8.3.1). MQTT subscribers do not see it; NATS subscribers and the
//!   hub do. A client's user property of that name is not carried.
//! - A user property whose name is not a valid header name (empty, or
//!   containing `:`, whitespace or control characters) or whose value has
//!   CR/LF is not carried (logged at debug). Headers the store acts on
//!   (`Nats-Msg-Id`, `Nats-TTL`, ...) may be set this way, with their
//!   JetStream meaning.
//! - NATS -> MQTT 5: every header other than the names above becomes a
//!   user property; a reply subject becomes the Response Topic (mapped
//!   to a topic) unless `Mqtt-Response-Topic` is present.

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

pub const ORIGIN: &str = "Mqtt-Origin";

pub const RETAIN: &str = "Mqtt-Retain";

/// The NATS header block for an MQTT 5 PUBLISH's properties (`None`
/// when nothing maps).
pub fn props_to_headers(p: &Properties) -> Option<Vec<u8>> {
    let mut h = HeaderBlock::new();
    for (k, v) in &p.user_properties {
        let bad_key = k.is_empty() || k.bytes().any(|b| b == b':' || b <= b' ' || b == 0x7f);
        let reserved = k.eq_ignore_ascii_case(QOS) || k.eq_ignore_ascii_case(RETAIN);
        if bad_key || v.contains(['\r', '\n']) || reserved {
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
    /// `Mqtt-Origin`: the publisher's client id (No Local).
    pub origin: Option<String>,
    /// `Mqtt-Retain: 1`: a stored copy of a publish with RETAIN set.
    pub retain: bool,
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
                    } else if is(RETAIN) {
                        m.retain |= v.trim() == "1";
                    } else if is(ORIGIN) {
                        m.origin.get_or_insert(v);
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
///
/// A publish with the RETAIN flag is stored with `Mqtt-Retain: 1`, so a
/// subscription with Retain As Published reading it back from a stream
/// gets RETAIN = 1 as a live one does [MQTT-3.3.1-13] (20 bytes per
/// retained publish; nothing for the others).
pub fn stored_headers(headers: Option<Vec<u8>>, qos: u8, retain: bool) -> Option<Vec<u8>> {
    match (qos, &headers, retain) {
        (1, _, false) => return headers,
        // The common case, without building a block.
        (0, None, false) => return Some(b"NATS/1.0\r\nMqtt-QoS: 0\r\n\r\n".to_vec()),
        _ => {}
    }
    let mut h = match &headers {
        Some(b) => match HeaderBlock::parse(b) {
            Ok(h) => h,
            Err(_) => return headers,
        },
        None => HeaderBlock::new(),
    };
    if qos != 1 {
        h.set(QOS, if qos == 0 { "0" } else { "2" });
    }
    if retain {
        h.set(RETAIN, "1");
    }
    h.encode().ok().or(headers)
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
        assert_eq!(stored_headers(None, 1, false), None);
        let h0 = stored_headers(None, 0, false).unwrap();
        assert_eq!(h0, b"NATS/1.0\r\nMqtt-QoS: 0\r\n\r\n");
        assert_eq!(headers_to_meta(Some(&h0), None).qos, Some(0));
        let h = stored_headers(None, 2, false).unwrap();
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
        let h = stored_headers(Some(base), 2, false).unwrap();
        let h = stored_headers(Some(h), 2, false).unwrap();
        let m = headers_to_meta(Some(&h), None);
        assert_eq!(m.qos, Some(2));
        assert_eq!(m.props.user_properties, vec![("k".into(), "v".into())]);
        assert_eq!(headers_to_meta(None, None).qos, None);
    }

    #[test]
    fn retain_is_recorded_for_stored_copies_and_cannot_be_forged() {
        let h = stored_headers(None, 1, true).unwrap();
        assert_eq!(h, b"NATS/1.0\r\nMqtt-Retain: 1\r\n\r\n");
        let m = headers_to_meta(Some(&h), None);
        assert!(m.retain && m.qos.is_none() && m.props.user_properties.is_empty());
        let h0 = stored_headers(None, 0, true).unwrap();
        let m = headers_to_meta(Some(&h0), None);
        assert_eq!((m.retain, m.qos), (true, Some(0)));
        assert!(!headers_to_meta(stored_headers(None, 0, false).as_deref(), None).retain);
        let p = Properties {
            user_properties: vec![("Mqtt-Retain".into(), "1".into())],
            ..Properties::default()
        };
        assert_eq!(props_to_headers(&p), None, "not from a user property");
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
}
