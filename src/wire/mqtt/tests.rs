//! Tests for the MQTT codec: round trips of every packet type in both
//! versions, byte vectors written from the specs, partial input, malformed
//! input, early size rejection and a deterministic fuzz loop.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use super::*;

const BIG: usize = 1 << 20;

fn s(x: &str) -> String {
    x.to_owned()
}

fn full_v5_props_publish() -> Properties {
    Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        content_type: Some(s("text/plain")),
        response_topic: Some(s("reply/here")),
        correlation_data: Some(vec![1, 2, 3]),
        subscription_identifiers: vec![1, 268_435_455, 300],
        topic_alias: Some(7),
        user_properties: vec![(s("k"), s("v")), (s("k"), s("v2"))],
        ..Properties::default()
    }
}

fn reason_props() -> Properties {
    Properties {
        reason_string: Some(s("because")),
        user_properties: vec![(s("a"), s("b"))],
        ..Properties::default()
    }
}

/// One or more samples of every packet type. For 3.1.1, properties and
/// 5.0-only fields are left empty so the round trip is exact.
fn samples(v: Version) -> Vec<Packet> {
    let v5 = v == Version::V5;
    let p = |props: Properties| if v5 { props } else { Properties::default() };
    let code = |c: u8| if v5 { c } else { 0 };
    let mut out = vec![
        Packet::Connect(Connect {
            version: v,
            clean_start: true,
            keep_alive: 60,
            client_id: s("dev-1"),
            will: Some(Will {
                topic: s("dev/1/status"),
                payload: b"offline".to_vec(),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: p(Properties {
                    will_delay_interval: Some(5),
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(10),
                    content_type: Some(s("text/plain")),
                    response_topic: Some(s("r")),
                    correlation_data: Some(vec![9]),
                    user_properties: vec![(s("w"), s("x"))],
                    ..Properties::default()
                }),
            }),
            username: Some(s("user")),
            password: Some(b"secret\0bin".to_vec()),
            properties: p(Properties {
                session_expiry_interval: Some(120),
                receive_maximum: Some(10),
                maximum_packet_size: Some(65536),
                topic_alias_maximum: Some(5),
                request_response_information: Some(1),
                request_problem_information: Some(0),
                authentication_method: Some(s("SCRAM-SHA-1")),
                authentication_data: Some(vec![0, 1, 2]),
                user_properties: vec![(s("u"), s("p"))],
                ..Properties::default()
            }),
        }),
        Packet::Connect(Connect {
            version: v,
            clean_start: false,
            keep_alive: 0,
            client_id: String::new(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }),
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: 0,
            properties: p(Properties {
                session_expiry_interval: Some(0),
                assigned_client_identifier: Some(s("auto-1")),
                server_keep_alive: Some(30),
                authentication_method: Some(s("m")),
                authentication_data: Some(vec![4]),
                response_information: Some(s("resp")),
                server_reference: Some(s("other:1883")),
                reason_string: Some(s("ok")),
                receive_maximum: Some(100),
                topic_alias_maximum: Some(10),
                maximum_qos: Some(1),
                retain_available: Some(0),
                user_properties: vec![(s("a"), s("b"))],
                maximum_packet_size: Some(1 << 20),
                wildcard_subscription_available: Some(1),
                subscription_identifier_available: Some(0),
                shared_subscription_available: Some(1),
                ..Properties::default()
            }),
        }),
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: if v5 {
                reason::NOT_AUTHORIZED
            } else {
                return_code::NOT_AUTHORIZED
            },
            properties: Properties::default(),
        }),
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: s("a/b"),
            packet_id: None,
            properties: Properties::default(),
            payload: Vec::new(),
        }),
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: s("sensors/ünïcode/temp"),
            packet_id: Some(65535),
            properties: p(full_v5_props_publish()),
            payload: vec![0xAB; 300],
        }),
        Packet::PubAck(Ack {
            packet_id: 1,
            code: 0,
            properties: Properties::default(),
        }),
        Packet::PubAck(Ack {
            packet_id: 2,
            code: code(reason::NO_MATCHING_SUBSCRIBERS),
            properties: Properties::default(),
        }),
        Packet::PubRec(Ack {
            packet_id: 3,
            code: code(reason::QUOTA_EXCEEDED),
            properties: p(reason_props()),
        }),
        Packet::PubRel(Ack {
            packet_id: 4,
            code: code(reason::PACKET_IDENTIFIER_NOT_FOUND),
            properties: p(reason_props()),
        }),
        Packet::PubComp(Ack {
            packet_id: 5,
            code: 0,
            properties: p(reason_props()),
        }),
        Packet::Subscribe(Subscribe {
            packet_id: 6,
            filters: vec![
                (
                    s("a/+/c"),
                    SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: v5,
                        retain_as_published: v5,
                        retain_handling: code(2),
                    },
                ),
                (s("#"), SubscriptionOptions::default()),
                (
                    s(if v5 { "$share/grp/x/#" } else { "x/#" }),
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        retain_handling: code(1),
                        ..SubscriptionOptions::default()
                    },
                ),
            ],
            properties: p(Properties {
                subscription_identifiers: vec![42],
                user_properties: vec![(s("s"), s("t"))],
                ..Properties::default()
            }),
        }),
        Packet::SubAck(SubAck {
            packet_id: 6,
            codes: vec![0, 1, 2, 0x80],
            properties: p(reason_props()),
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 7,
            filters: vec![s("a/+/c"), s("#")],
            properties: p(Properties {
                user_properties: vec![(s("s"), s("t"))],
                ..Properties::default()
            }),
        }),
        Packet::UnsubAck(UnsubAck {
            packet_id: 7,
            codes: if v5 { vec![0, 0x11] } else { Vec::new() },
            properties: p(reason_props()),
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Disconnect::default()),
    ];
    if v5 {
        out.push(Packet::Disconnect(Disconnect {
            code: reason::DISCONNECT_WITH_WILL_MESSAGE,
            properties: Properties::default(),
        }));
        out.push(Packet::Disconnect(Disconnect {
            code: reason::SERVER_MOVED,
            properties: Properties {
                session_expiry_interval: Some(0),
                server_reference: Some(s("b:1883")),
                reason_string: Some(s("moved")),
                user_properties: vec![(s("a"), s("b"))],
                ..Properties::default()
            },
        }));
        out.push(Packet::Auth(Auth::default()));
        out.push(Packet::Auth(Auth {
            code: reason::CONTINUE_AUTHENTICATION,
            properties: Properties {
                authentication_method: Some(s("SCRAM-SHA-1")),
                authentication_data: Some(vec![1, 2, 3]),
                reason_string: Some(s("more")),
                user_properties: vec![(s("a"), s("b"))],
                ..Properties::default()
            },
        }));
        out.push(Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: String::new(),
            packet_id: Some(9),
            properties: Properties {
                topic_alias: Some(3),
                ..Properties::default()
            },
            payload: b"aliased".to_vec(),
        }));
    }
    out
}

fn enc(p: &Packet, v: Version) -> Vec<u8> {
    let mut out = Vec::new();
    encode(p, v, &mut out).unwrap_or_else(|e| panic!("encode {}: {e}", p.name()));
    out
}

/// Decodes with the version a server would have at that point.
fn dec(buf: &[u8], v: Version) -> Result<Option<(Packet, usize)>, DecodeError> {
    let known = if buf.first().map(|b| b >> 4) == Some(1) {
        None
    } else {
        Some(v)
    };
    decode(buf, known, BIG)
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.put_len(body.len()).unwrap();
    out.extend_from_slice(body);
    out
}

fn assert_err(buf: &[u8], v: Option<Version>, what: &str) {
    match decode(buf, v, BIG) {
        Err(_) => {}
        other => panic!("{what}: expected an error for {buf:02x?}, got {other:?}"),
    }
}

#[test]
fn round_trip_every_packet_both_versions() {
    for v in [Version::V311, Version::V5] {
        let list = samples(v);
        assert!(list.len() >= 18);
        for p in list {
            let bytes = enc(&p, v);
            assert_eq!(encoded_len(&p, v).unwrap(), bytes.len(), "{}", p.name());
            let (q, n) = dec(&bytes, v)
                .unwrap_or_else(|e| panic!("{:?} {}: {e}", v, p.name()))
                .unwrap_or_else(|| panic!("{:?} {}: incomplete", v, p.name()));
            assert_eq!(q, p, "{v:?}");
            assert_eq!(n, bytes.len(), "{v:?} {}", p.name());
            // Trailing bytes of the next packet are not consumed.
            let mut more = bytes.clone();
            more.extend_from_slice(&[0xC0, 0x00]);
            let (q, n) = dec(&more, v).unwrap().unwrap();
            assert_eq!((q, n), (p, bytes.len()));
        }
    }
}

#[test]
fn every_packet_type_is_covered() {
    let mut seen = std::collections::BTreeSet::new();
    for v in [Version::V311, Version::V5] {
        for p in samples(v) {
            seen.insert(enc(&p, v)[0] >> 4);
        }
    }
    assert_eq!(seen.len(), 15);
}

#[test]
fn spec_connect_311() {
    // The 3.1.1 spec's CONNECT variable header example (flags 0xCE,
    // keep alive 10) with a payload of client id, will, user and password.
    let bytes = [
        0x10, 29, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xCE, 0x00, 0x0A, 0x00, 0x03, b'c',
        b'i', b'd', 0x00, 0x02, b'w', b't', 0x00, 0x02, b'w', b'm', 0x00, 0x01, b'u', 0x00, 0x01,
        b'p',
    ];
    let (p, n) = decode(&bytes, None, BIG).unwrap().unwrap();
    assert_eq!(n, bytes.len());
    let expected = Packet::Connect(Connect {
        version: Version::V311,
        clean_start: true,
        keep_alive: 10,
        client_id: s("cid"),
        will: Some(Will {
            topic: s("wt"),
            payload: b"wm".to_vec(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        }),
        username: Some(s("u")),
        password: Some(b"p".to_vec()),
        properties: Properties::default(),
    });
    assert_eq!(p, expected);
    assert_eq!(enc(&expected, Version::V311), bytes);
}

#[test]
fn spec_connect_5() {
    // The 5.0 spec's CONNECT variable header example: flags 0xCE, keep alive
    // 10, properties = Session Expiry Interval 10.
    let bytes = [
        0x10, 36, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0xCE, 0x00, 0x0A, 0x05, 0x11, 0x00,
        0x00, 0x00, 0x0A, 0x00, 0x03, b'c', b'i', b'd', 0x00, 0x00, 0x02, b'w', b't', 0x00, 0x02,
        b'w', b'm', 0x00, 0x01, b'u', 0x00, 0x01, b'p',
    ];
    let (p, n) = decode(&bytes, None, BIG).unwrap().unwrap();
    assert_eq!(n, bytes.len());
    let Packet::Connect(c) = &p else {
        panic!("not a CONNECT: {p:?}")
    };
    assert_eq!(c.version, Version::V5);
    assert_eq!(c.keep_alive, 10);
    assert_eq!(c.properties.session_expiry_interval, Some(10));
    assert_eq!(c.will.as_ref().unwrap().qos, QoS::AtLeastOnce);
    assert_eq!(enc(&p, Version::V5), bytes);
}

#[test]
fn known_small_vectors() {
    use Version::{V311, V5};
    let cases: Vec<(Version, Vec<u8>, Packet)> = vec![
        (V311, vec![0xC0, 0x00], Packet::PingReq),
        (V5, vec![0xD0, 0x00], Packet::PingResp),
        (
            V311,
            vec![0xE0, 0x00],
            Packet::Disconnect(Disconnect::default()),
        ),
        (
            V311,
            vec![0x20, 0x02, 0x01, 0x00],
            Packet::ConnAck(ConnAck {
                session_present: true,
                code: 0,
                properties: Properties::default(),
            }),
        ),
        (
            V5,
            vec![0x20, 0x03, 0x00, 0x86, 0x00],
            Packet::ConnAck(ConnAck {
                session_present: false,
                code: reason::BAD_USER_NAME_OR_PASSWORD,
                properties: Properties::default(),
            }),
        ),
        (
            V311,
            vec![
                0x33, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, b'h', b'i',
            ],
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: true,
                topic: s("a/b"),
                packet_id: Some(10),
                properties: Properties::default(),
                payload: b"hi".to_vec(),
            }),
        ),
        (
            V5,
            vec![0x40, 0x02, 0x00, 0x01],
            Packet::PubAck(Ack {
                packet_id: 1,
                ..Ack::default()
            }),
        ),
        (
            V5,
            vec![0x50, 0x03, 0x00, 0x01, 0x10],
            Packet::PubRec(Ack {
                packet_id: 1,
                code: 0x10,
                ..Ack::default()
            }),
        ),
        (
            V311,
            vec![0x62, 0x02, 0x00, 0x01],
            Packet::PubRel(Ack {
                packet_id: 1,
                ..Ack::default()
            }),
        ),
        (
            V311,
            vec![0x82, 0x08, 0x00, 0x0A, 0x00, 0x03, b'a', b'/', b'#', 0x01],
            Packet::Subscribe(Subscribe {
                packet_id: 10,
                filters: vec![(
                    s("a/#"),
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..SubscriptionOptions::default()
                    },
                )],
                properties: Properties::default(),
            }),
        ),
        (
            V311,
            vec![0x90, 0x03, 0x00, 0x0A, 0x01],
            Packet::SubAck(SubAck {
                packet_id: 10,
                codes: vec![1],
                properties: Properties::default(),
            }),
        ),
        (
            V311,
            vec![0xB0, 0x02, 0x00, 0x0A],
            Packet::UnsubAck(UnsubAck {
                packet_id: 10,
                codes: Vec::new(),
                properties: Properties::default(),
            }),
        ),
        (
            V5,
            vec![0xE0, 0x01, 0x04],
            Packet::Disconnect(Disconnect {
                code: 0x04,
                properties: Properties::default(),
            }),
        ),
        (V5, vec![0xF0, 0x00], Packet::Auth(Auth::default())),
    ];
    for (v, bytes, expected) in cases {
        let (p, n) = decode(&bytes, Some(v), BIG).unwrap().unwrap();
        assert_eq!(p, expected, "{bytes:02x?}");
        assert_eq!(n, bytes.len());
        assert_eq!(enc(&p, v), bytes, "{}", p.name());
    }
}

#[test]
fn long_forms_decode_and_short_forms_encode() {
    // PUBACK with code 0 and an empty property list: 4 bytes in, 2 bytes out.
    let long = [0x40, 0x04, 0x00, 0x01, 0x00, 0x00];
    let (p, n) = decode(&long, Some(Version::V5), BIG).unwrap().unwrap();
    assert_eq!(n, 6);
    assert_eq!(enc(&p, Version::V5), [0x40, 0x02, 0x00, 0x01]);
    // DISCONNECT with code 0 and empty properties.
    let long = [0xE0, 0x02, 0x00, 0x00];
    let (p, _) = decode(&long, Some(Version::V5), BIG).unwrap().unwrap();
    assert_eq!(p, Packet::Disconnect(Disconnect::default()));
    assert_eq!(enc(&p, Version::V5), [0xE0, 0x00]);
    // 3.1.1 ignores 5.0-only fields on encode.
    let ack = Packet::PubAck(Ack {
        packet_id: 5,
        code: 0x80,
        properties: reason_props(),
    });
    assert_eq!(enc(&ack, Version::V311), [0x40, 0x02, 0x00, 0x05]);
}

#[test]
fn every_prefix_needs_more() {
    for v in [Version::V311, Version::V5] {
        for p in samples(v) {
            let bytes = enc(&p, v);
            for k in 0..bytes.len() {
                assert_eq!(
                    dec(&bytes[..k], v),
                    Ok(None),
                    "{v:?} {} prefix {k} of {}",
                    p.name(),
                    bytes.len()
                );
            }
        }
    }
}

#[test]
fn oversized_rejected_from_the_header() {
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: s("t"),
        packet_id: None,
        properties: Properties::default(),
        payload: vec![7; 2000],
    });
    let bytes = enc(&p, Version::V311);
    assert_eq!(bytes.len(), 2 + 1 + 3 + 2000);
    // Full header, no body: rejected.
    assert_eq!(
        decode(&bytes[..3], Some(Version::V311), 1000),
        Err(DecodeError::TooLarge {
            size: bytes.len(),
            max: 1000
        })
    );
    // Only the first length byte (continuation set): bounded below by 3+127+128.
    assert!(matches!(
        decode(&bytes[..2], Some(Version::V311), 200),
        Err(DecodeError::TooLarge { .. })
    ));
    // ... but a larger limit waits.
    assert_eq!(decode(&bytes[..2], Some(Version::V311), 1000), Ok(None));
    // Exactly at the limit is accepted.
    let (q, n) = decode(&bytes, Some(Version::V311), bytes.len())
        .unwrap()
        .unwrap();
    assert_eq!((q, n), (p, bytes.len()));
    assert!(decode(&bytes, Some(Version::V311), bytes.len() - 1).is_err());
    // A CONNECT before the version is known, too.
    assert!(matches!(
        decode(&[0x10, 0xFF, 0xFF, 0x7F], None, 1 << 16),
        Err(DecodeError::TooLarge { .. })
    ));
    assert_eq!(
        DecodeError::TooLarge { size: 1, max: 0 }.reason_code(),
        reason::PACKET_TOO_LARGE
    );
}

/// A 5.0 QoS 0 PUBLISH to "a" with the given raw property bytes.
fn v5_publish_props(props: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01, b'a'];
    body.put_len(props.len()).unwrap();
    body.extend_from_slice(props);
    frame(0x30, &body)
}

/// A 5.0 CONNECT with the given raw property bytes.
fn v5_connect_props(props: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x00];
    body.put_len(props.len()).unwrap();
    body.extend_from_slice(props);
    body.extend_from_slice(&[0x00, 0x01, b'c']);
    frame(0x10, &body)
}

/// A SUBSCRIBE (packet id 1) with one filter and options byte.
fn subscribe(v: Version, filter: &str, options: u8) -> Vec<u8> {
    let mut body = vec![0x00, 0x01];
    if v == Version::V5 {
        body.push(0x00);
    }
    body.put_bin(filter.as_bytes(), "f").unwrap();
    body.push(options);
    frame(0x82, &body)
}

fn connect311(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 0x00];
    body.extend_from_slice(payload);
    frame(0x10, &body)
}

#[test]
fn malformed_inputs() {
    use Version::{V311, V5};
    let both = [Some(V311), Some(V5)];
    for v in both {
        assert_err(&[0x00, 0x00], v, "packet type 0");
        assert_err(&[0x60, 0x02, 0x00, 0x01], v, "PUBREL flags 0");
        assert_err(
            &[0x80, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],
            v,
            "SUBSCRIBE flags 0",
        );
        assert_err(&[0xC1, 0x00], v, "PINGREQ flags");
        assert_err(&[0x41, 0x02, 0x00, 0x01], v, "PUBACK flags");
        assert_err(&[0xC0, 0x01, 0x00], v, "PINGREQ with a body");
        assert_err(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01], v, "QoS 3");
        assert_err(&[0x40, 0x02, 0x00, 0x00], v, "PUBACK id 0");
        assert_err(&[0xC0, 0x80, 0x00], v, "non-minimal remaining length");
        assert_err(
            &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            v,
            "5-byte remaining length",
        );
        assert_err(
            &[0x30, 0x80, 0x80, 0x80, 0x80],
            v,
            "5-byte remaining length, cut",
        );
        assert_err(&[0x32, 0x03, 0x00, 0x05, b'a'], v, "string past the end");
        assert_err(&[0x32, 0x04, 0x00, 0x01, b'a', 0x00], v, "packet id cut");
        // 5.0 bodies carry an (empty) property length after the packet id.
        let pl: &[u8] = if v == Some(V5) { &[0x00] } else { &[] };
        let with_props = |first: u8, head: &[u8], tail: &[u8]| {
            let mut body = head.to_vec();
            body.extend_from_slice(pl);
            body.extend_from_slice(tail);
            frame(first, &body)
        };
        let no_filter = with_props(0x82, &[0x00, 0x01], &[]);
        assert_err(&no_filter, v, "SUBSCRIBE without filters");
        let no_filter = with_props(0xA2, &[0x00, 0x01], &[]);
        assert_err(&no_filter, v, "UNSUBSCRIBE without filters");
        let no_code = with_props(0x90, &[0x00, 0x01], &[]);
        assert_err(&no_code, v, "SUBACK without codes");
        let id0 = with_props(0x32, &[0x00, 0x01, b'a', 0x00, 0x00], b"x");
        assert_err(&id0, v, "PUBLISH id 0");
        let id0 = with_props(0x82, &[0x00, 0x00], &[0x00, 0x01, b'a', 0x00]);
        assert_err(&id0, v, "SUBSCRIBE id 0");
        let id0 = with_props(0xA2, &[0x00, 0x00], &[0x00, 0x01, b'a']);
        assert_err(&id0, v, "UNSUBSCRIBE id 0");
        let id0 = with_props(0x90, &[0x00, 0x00], &[0x00]);
        assert_err(&id0, v, "SUBACK id 0");
        let id0 = with_props(
            0xB0,
            &[0x00, 0x00],
            if v == Some(V5) { &[0x00] } else { &[] },
        );
        assert_err(&id0, v, "UNSUBACK id 0");
        assert_err(&[0x20, 0x02, 0x02, 0x00], v, "CONNACK reserved flags");
    }
    // PUBLISH bodies (5.0 needs a property length after the topic).
    for (v, extra) in [(V311, &[][..]), (V5, &[0x00][..])] {
        let publish = |topic: &[u8], first: u8| {
            let mut body = vec![0x00, topic.len() as u8];
            body.extend_from_slice(topic);
            body.extend_from_slice(extra);
            frame(first, &body)
        };
        assert_err(&publish(b"a", 0x38), Some(v), "DUP on QoS 0");
        assert_err(&publish(b"#", 0x30), Some(v), "wildcard topic #");
        assert_err(&publish(b"a/+", 0x30), Some(v), "wildcard topic +");
        assert_err(&publish(b"", 0x30), Some(v), "empty topic");
        assert_err(&publish(&[0xC3, 0x28], 0x30), Some(v), "invalid UTF-8");
        assert_err(&publish(&[0xED, 0xA0, 0x80], 0x30), Some(v), "surrogate");
        assert_err(&publish(b"a\0b", 0x30), Some(v), "U+0000");
        // Not CONNECT first.
        assert_err(&publish(b"a", 0x30), None, "PUBLISH before CONNECT");
    }
    assert_err(&[0xF0, 0x00], Some(V311), "AUTH in 3.1.1");
    assert_err(&[0xC0, 0x00], None, "PINGREQ before CONNECT");
    assert_err(
        &[0x20, 0x02, 0x00, 0x06],
        Some(V311),
        "reserved return code",
    );
    assert_err(
        &[0x20, 0x02, 0x01, 0x05],
        Some(V311),
        "session present + failure",
    );
    assert_err(
        &[0x20, 0x03, 0x00, 0x00, 0x00],
        Some(V311),
        "CONNACK too long",
    );
    assert_err(
        &[0x40, 0x03, 0x00, 0x01, 0x00],
        Some(V311),
        "3.1.1 PUBACK too long",
    );
    assert_err(
        &[0xB0, 0x03, 0x00, 0x01, 0x00],
        Some(V311),
        "3.1.1 UNSUBACK codes",
    );
    assert_err(&[0xE0, 0x01, 0x00], Some(V311), "3.1.1 DISCONNECT body");
    assert_err(&[0x90, 0x03, 0x00, 0x01, 0x03], Some(V311), "SUBACK code 3");
    assert_err(
        &[0x40, 0x03, 0x00, 0x01, 0x92],
        Some(V5),
        "PUBACK code 0x92",
    );
    assert_err(
        &[0x62, 0x03, 0x00, 0x01, 0x10],
        Some(V5),
        "PUBREL code 0x10",
    );
    assert_err(&[0xE0, 0x01, 0x05], Some(V5), "DISCONNECT code 5");
    assert_err(&[0xF0, 0x01, 0x01], Some(V5), "AUTH code 1");
    assert_err(
        &[0xB0, 0x03, 0x00, 0x01, 0x00],
        Some(V5),
        "5.0 UNSUBACK no codes",
    );
    assert_err(
        &[0x40, 0x05, 0x00, 0x01, 0x00, 0x05, 0x1F],
        Some(V5),
        "property length past the end",
    );

    // Topic filters.
    for v in [V311, V5] {
        for f in [
            "", "a/#/b", "a#", "#a", "a/b#", "a+", "+a/b", "a/+b", "a/\u{0}",
        ] {
            assert_err(&subscribe(v, f, 0x00), Some(v), f);
            let mut body = vec![0x00, 0x01];
            if v == V5 {
                body.push(0x00);
            }
            body.put_bin(f.as_bytes(), "f").unwrap();
            assert_err(&frame(0xA2, &body), Some(v), f);
        }
        assert_err(&subscribe(v, "a", 0x03), Some(v), "subscribe QoS 3");
        assert_err(&subscribe(v, "a", 0xC0), Some(v), "reserved option bits");
    }
    assert_err(
        &subscribe(V311, "a", 0x04),
        Some(V311),
        "3.1.1 no-local bit",
    );
    assert_err(&subscribe(V5, "a", 0x30), Some(V5), "retain handling 3");
    assert_err(
        &subscribe(V5, "$share/g/a", 0x04),
        Some(V5),
        "no local shared",
    );
    assert_err(
        &subscribe(V5, "$share//a", 0x00),
        Some(V5),
        "empty share name",
    );
    assert_err(
        &subscribe(V5, "$share/g", 0x00),
        Some(V5),
        "share without filter",
    );
    assert_err(
        &subscribe(V5, "$share/g+/a", 0x00),
        Some(V5),
        "wildcard share name",
    );
    assert!(decode(&subscribe(V5, "$share/g/a/#", 0x02), Some(V5), BIG).is_ok_and(|p| p.is_some()));
    // In 3.1.1 "$share/g" is just a filter.
    assert!(decode(&subscribe(V311, "$share/g", 0x00), Some(V311), BIG).is_ok_and(|p| p.is_some()));

    // Properties.
    let props_cases: &[(&[u8], &str)] = &[
        (
            &[0x23, 0x00, 0x01, 0x23, 0x00, 0x02],
            "duplicate topic alias",
        ),
        (&[0x01, 0x02], "payload format indicator 2"),
        (
            &[0x01, 0x00, 0x01, 0x00],
            "duplicate payload format indicator",
        ),
        (&[0x11, 0x00, 0x00, 0x00, 0x01], "session expiry in PUBLISH"),
        (&[0x05, 0x00], "unknown property"),
        (&[0x0B, 0x00], "subscription identifier 0"),
        (&[0x0B, 0x80, 0x00], "non-minimal subscription identifier"),
        (&[0x08, 0x00, 0x01, b'#'], "wildcard response topic"),
        (&[0x03, 0x00, 0x02, 0xC3], "content type cut"),
        (&[0x26, 0x00, 0x01, b'k'], "user property without value"),
        (&[0x02, 0x00, 0x00], "message expiry cut"),
        (&[0x1F, 0x00, 0x01, b'x'], "reason string in PUBLISH"),
    ];
    for (props, what) in props_cases {
        assert_err(&v5_publish_props(props), Some(V5), what);
    }
    assert!(decode(&v5_publish_props(&[0x23, 0x00, 0x01]), Some(V5), BIG).is_ok());
    // Topic Alias 0 decodes: the session refuses it with its own reason
    // code, 0x94 Topic Alias invalid (§3.3.2.3.4), not 0x82.
    assert!(decode(&v5_publish_props(&[0x23, 0x00, 0x00]), Some(V5), BIG).is_ok());
    let connect_cases: &[(&[u8], &str)] = &[
        (&[0x21, 0x00, 0x00], "receive maximum 0"),
        (&[0x27, 0x00, 0x00, 0x00, 0x00], "maximum packet size 0"),
        (&[0x17, 0x02], "request problem information 2"),
        (&[0x19, 0x02], "request response information 2"),
        (
            &[0x16, 0x00, 0x01, 0x01],
            "authentication data without method",
        ),
        (
            &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 1],
            "duplicate session expiry",
        ),
        (&[0x23, 0x00, 0x01], "topic alias in CONNECT"),
        (&[0x24, 0x01], "maximum QoS in CONNECT"),
    ];
    for (props, what) in connect_cases {
        assert_err(&v5_connect_props(props), None, what);
    }
    assert!(decode(&v5_connect_props(&[0x21, 0x00, 0x01]), None, BIG).is_ok());
    let mut two_ids = vec![0x00, 0x01, 0x04, 0x0B, 0x01, 0x0B, 0x02];
    two_ids.put_str("a", "f").unwrap();
    two_ids.push(0);
    assert_err(
        &frame(0x82, &two_ids),
        Some(V5),
        "two subscription identifiers",
    );
    assert_err(
        &[0x20, 0x05, 0x00, 0x00, 0x02, 0x24, 0x02],
        Some(V5),
        "maximum QoS 2",
    );

    // CONNECT.
    assert_err(
        &connect311(0x01, &[0x00, 0x00]),
        None,
        "reserved connect flag",
    );
    assert_err(
        &connect311(0x08, &[0x00, 0x00]),
        None,
        "will QoS without will",
    );
    assert_err(
        &connect311(0x20, &[0x00, 0x00]),
        None,
        "will retain without will",
    );
    assert_err(
        &connect311(0x1C, &[0x00, 0x00, 0x00, 0x01, b'a', 0x00, 0x00]),
        None,
        "will QoS 3",
    );
    assert_err(
        &connect311(0x04, &[0x00, 0x00, 0x00, 0x01, b'#', 0x00, 0x00]),
        None,
        "will topic wildcard",
    );
    assert_err(
        &connect311(0x40, &[0x00, 0x00, 0x00, 0x01, b'p']),
        None,
        "password without user name",
    );
    assert_err(
        &connect311(0x00, &[0x00, 0x00, 0x00]),
        None,
        "trailing byte",
    );
    assert_err(&connect311(0x00, &[0x00]), None, "client id cut");
    let mut c = connect311(0x00, &[0x00, 0x00]);
    c[8] = 6;
    assert_eq!(
        decode(&c, None, BIG),
        Err(DecodeError::UnsupportedVersion(6))
    );
    let mut body = vec![0x00, 0x06];
    body.extend_from_slice(b"MQIsdp");
    body.extend_from_slice(&[0x03, 0x02, 0x00, 0x3C, 0x00, 0x00]);
    assert_eq!(
        decode(&frame(0x10, &body), None, BIG),
        Err(DecodeError::UnsupportedVersion(3))
    );
    let mut c = connect311(0x00, &[0x00, 0x00]);
    c[4] = b'X';
    assert_err(&c, None, "protocol name");
    // 5.0 allows a password without a user name.
    let mut body = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x40, 0x00, 0x00, 0x00,
    ];
    body.extend_from_slice(&[0x00, 0x00, 0x00, 0x01, b'p']);
    assert!(decode(&frame(0x10, &body), None, BIG).is_ok_and(|p| p.is_some()));
}

#[test]
fn encode_rejects_what_decode_would() {
    use Version::{V311, V5};
    let publish = |qos, packet_id, topic: &str| {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: s(topic),
            packet_id,
            properties: Properties::default(),
            payload: Vec::new(),
        })
    };
    let mut out = vec![0xAA];
    let bad = [
        (publish(QoS::AtLeastOnce, None, "a"), V5),
        (publish(QoS::AtMostOnce, Some(1), "a"), V5),
        (publish(QoS::AtLeastOnce, Some(0), "a"), V311),
        (publish(QoS::AtMostOnce, None, "a/#"), V311),
        (publish(QoS::AtMostOnce, None, ""), V5),
        (publish(QoS::AtMostOnce, None, "a\0"), V5),
        (Packet::Auth(Auth::default()), V311),
        (
            Packet::PubAck(Ack {
                packet_id: 1,
                code: 0,
                properties: Properties {
                    topic_alias: Some(1),
                    ..Properties::default()
                },
            }),
            V5,
        ),
        (
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: Vec::new(),
                properties: Properties::default(),
            }),
            V5,
        ),
        (samples(V5).remove(0), V311),
    ];
    for (p, v) in bad {
        assert!(
            matches!(encode(&p, v, &mut out), Err(EncodeError::Invalid(_))),
            "{p:?}"
        );
        assert_eq!(out, [0xAA], "nothing appended on error");
    }
    let long = publish(QoS::AtMostOnce, None, &"x".repeat(65536));
    assert_eq!(
        encode(&long, V311, &mut out),
        Err(EncodeError::TooLong("topic name"))
    );
    assert_eq!(out, [0xAA]);
    let ok = publish(QoS::AtMostOnce, None, &"x".repeat(65535));
    encode(&ok, V311, &mut out).unwrap();
    assert_eq!(out.len(), 1 + 1 + 3 + 2 + 65535);
    assert_eq!(decode(&out[1..], Some(V311), BIG).unwrap().unwrap().0, ok);
    let mut ids = Properties::default();
    ids.subscription_identifiers.push(MAX_VARINT + 1);
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: s("a"),
        packet_id: None,
        properties: ids,
        payload: Vec::new(),
    });
    assert!(encode(&p, V5, &mut out).is_err());
}

#[test]
fn filter_and_topic_helpers() {
    for f in [
        "#", "+", "a", "a/b", "a/+", "+/+", "a/#", "/", "/a", "a/", "+/#", "$SYS/#",
    ] {
        assert!(valid_filter(f), "{f}");
    }
    for f in ["", "a#", "a/#/b", "#/a", "a+", "a/b+", "++", "##"] {
        assert!(!valid_filter(f), "{f}");
    }
    assert!(valid_topic_name("a/b"));
    assert!(valid_topic_name("/"));
    assert!(!valid_topic_name(""));
    assert!(!valid_topic_name("a/+"));
    assert_eq!(split_shared("$share/g/a/b"), Some(("g", "a/b")));
    assert_eq!(split_shared("$share/g"), Some(("g", "")));
    assert_eq!(split_shared("$shared/g/a"), None);
    assert_eq!(split_shared("a/b"), None);
}

#[test]
fn plain_publish_is_encode_of_the_same_publish() {
    let big = vec![7u8; 200_000];
    for v in [Version::V311, Version::V5] {
        for (topic, payload, retain) in [
            ("a/b", &b"x"[..], false),
            ("a", &b""[..], true),
            ("/", &big[..], false),
            ("\u{e9}t\u{e9}/\u{1f600}", &b"p"[..], true),
        ] {
            let p = Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain,
                topic: topic.into(),
                packet_id: None,
                properties: Properties::default(),
                payload: payload.to_vec(),
            });
            let mut out = b"before".to_vec();
            encode_plain_publish(&mut out, v, retain, topic, payload).unwrap();
            assert_eq!(&out[..6], b"before");
            assert_eq!(out[6..], enc(&p, v)[..], "{topic} {v:?}");
        }
        // Refused as `encode` refuses them, appending nothing.
        for topic in ["", "a/+", "a/#", "a\0b", &"t".repeat(70_000)] {
            let mut out = b"x".to_vec();
            assert!(encode_plain_publish(&mut out, v, false, topic, b"p").is_err());
            assert_eq!(out, b"x");
        }
    }
}

#[test]
fn errors_display() {
    let e = DecodeError::Malformed("x");
    assert_eq!(e.to_string(), "malformed MQTT packet: x");
    assert_eq!(e.reason_code(), reason::MALFORMED_PACKET);
    assert!(DecodeError::UnsupportedVersion(3).to_string().contains('3'));
    assert!(EncodeError::TooLong("topic name")
        .to_string()
        .contains("topic name"));
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Decodes with each version; a decoded packet must re-encode to bytes that
/// decode to the same packet.
fn fuzz_one(buf: &[u8]) -> usize {
    let mut decoded = 0;
    for v in [None, Some(Version::V311), Some(Version::V5)] {
        if let Ok(Some((p, n))) = decode(buf, v, 4096) {
            decoded += 1;
            assert!(n <= buf.len());
            let ev = match (&p, v) {
                (Packet::Connect(c), _) => c.version,
                (_, Some(v)) => v,
                (_, None) => panic!("non-CONNECT decoded without a version"),
            };
            let mut out = Vec::new();
            encode(&p, ev, &mut out).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            let again = decode(&out, Some(ev), usize::MAX).unwrap().unwrap();
            assert_eq!(again, (p, out.len()));
        }
    }
    decoded
}

#[test]
fn fuzz_no_panic_and_round_trip() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let seeds: Vec<Vec<u8>> = [Version::V311, Version::V5]
        .into_iter()
        .flat_map(|v| samples(v).into_iter().map(move |p| enc(&p, v)))
        .collect();
    let mut decoded = 0;
    let mut buf = Vec::with_capacity(512);
    for i in 0..200_000 {
        buf.clear();
        if i % 4 == 0 {
            // Random bytes with a plausible first byte and short length.
            let len = rng.below(40);
            for _ in 0..len {
                buf.push(rng.next() as u8);
            }
            if let Some(b) = buf.get_mut(1) {
                *b = (len as u8).saturating_sub(2);
            }
        } else {
            buf.extend_from_slice(&seeds[rng.below(seeds.len())]);
            for _ in 0..1 + rng.below(3) {
                match rng.below(5) {
                    0 | 1 if !buf.is_empty() => {
                        let at = rng.below(buf.len());
                        buf[at] ^= 1 << rng.below(8);
                    }
                    2 if !buf.is_empty() => {
                        let at = rng.below(buf.len());
                        buf[at] = rng.next() as u8;
                    }
                    3 if !buf.is_empty() => {
                        let at = rng.below(buf.len());
                        buf.truncate(at);
                    }
                    _ => {
                        let at = rng.below(buf.len() + 1);
                        buf.insert(at, rng.next() as u8);
                    }
                }
            }
        }
        decoded += fuzz_one(&buf);
    }
    // The mutations must reach the decoder's success paths, not only errors.
    assert!(decoded > 10_000, "only {decoded} decoded");
}
