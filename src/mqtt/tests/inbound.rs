//! PUBLISH from the client: acks in order, limits, aliases, refusals.

use super::*;

#[test]
fn qos1_acks_only_after_storage_and_in_order() {
    let v = Version::V311;
    let (mut s, now) = connected(v);
    let mut input = bytes(&publish(QoS::AtLeastOnce, Some(7), "a/b", b"one"), v);
    input.extend(bytes(&publish(QoS::AtLeastOnce, Some(8), "a/c", b"two"), v));
    // Split the input at an awkward place: decoding must resume.
    s.handle_bytes(&input[..5], now);
    s.handle_bytes(&input[5..], now);
    let ev = events(&mut s);
    assert_eq!(ev.len(), 2);
    assert!(matches!(&ev[0], Event::Publish { subject, ack: Some(7), .. } if subject == "a.b"));
    assert!(matches!(&ev[1], Event::Publish { subject, ack: Some(8), .. } if subject == "a.c"));
    assert!(
        !s.has_output(),
        "nothing may be acknowledged before storage"
    );
    assert_eq!(s.awaiting_storage(), 2);
    s.publish_done(7, Ok(()));
    s.publish_done(8, Ok(()));
    let acks: Vec<u16> = sent(&mut s, v)
        .into_iter()
        .map(|p| match p {
            Packet::PubAck(a) => a.packet_id,
            other => panic!("expected PUBACK, got {other:?}"),
        })
        .collect();
    assert_eq!(acks, vec![7, 8]);
}

#[test]
fn inflight_limit_stops_reading() {
    let v = Version::V311;
    let (mut s, now) = connected(v);
    // Six publishes in one read; the limit is 4.
    let mut input = Vec::new();
    for id in 1..=6 {
        input.extend(bytes(&publish(QoS::AtLeastOnce, Some(id), "t", b"x"), v));
    }
    s.handle_bytes(&input, now);
    assert_eq!(events(&mut s).len(), 4);
    assert!(!s.wants_input());
    s.publish_done(1, Ok(()));
    // The fifth was waiting in the buffer and is decoded now.
    assert!(matches!(
        &events(&mut s)[..],
        [Event::Publish { ack: Some(5), .. }]
    ));
    assert!(!s.wants_input());
    s.publish_done(2, Ok(()));
    assert!(matches!(
        &events(&mut s)[..],
        [Event::Publish { ack: Some(6), .. }]
    ));
    s.publish_done(3, Ok(()));
    assert!(s.wants_input());
    assert!(!s.is_closed());
}

#[test]
fn v5_store_failure_is_a_negative_puback() {
    let v = Version::V5;
    let (mut s, now) = connected(v);
    s.handle_bytes(
        &bytes(&publish(QoS::AtLeastOnce, Some(1), "t", b"x"), v),
        now,
    );
    events(&mut s);
    s.publish_done(1, Err("stream full".into()));
    match &sent(&mut s, v)[..] {
        [Packet::PubAck(a)] => {
            assert_eq!(a.code, 0x80);
            assert_eq!(a.properties.reason_string.as_deref(), Some("stream full"));
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
    assert!(!s.is_closed());
}

#[test]
fn v311_store_failure_closes_the_connection() {
    let v = Version::V311;
    let (mut s, now) = connected(v);
    s.handle_bytes(
        &bytes(&publish(QoS::AtLeastOnce, Some(1), "t", b"x"), v),
        now,
    );
    events(&mut s);
    s.publish_done(1, Err("disk full".into()));
    assert!(s.is_closed());
    assert!(
        !s.has_output(),
        "no PUBACK for a message that was not stored"
    );
}

#[test]
fn v5_inbound_topic_alias_set_reused_and_refused() {
    let v = Version::V5;
    let (mut s, now) = connected_v5(Properties::default());
    s.handle_bytes(&bytes(&aliased(QoS::AtMostOnce, None, "a/b", 3), v), now);
    s.handle_bytes(&bytes(&aliased(QoS::AtMostOnce, None, "", 3), v), now);
    let subjects: Vec<String> = events(&mut s)
        .into_iter()
        .map(|e| match e {
            Event::Publish { subject, props, .. } => {
                assert!(props.is_none(), "the alias is not carried");
                subject
            }
            other => panic!("expected Publish, got {other:?}"),
        })
        .collect();
    assert_eq!(subjects, vec!["a.b", "a.b"]);
    // Unknown alias: protocol error.
    s.handle_bytes(&bytes(&aliased(QoS::AtMostOnce, None, "", 4), v), now);
    assert!(s.is_closed());
    assert!(matches!(&sent(&mut s, v)[..], [Packet::Disconnect(d)] if d.code == 0x82));
    // Above the maximum: 0x94.
    let (mut s, now) = connected_v5(Properties::default());
    s.handle_bytes(
        &bytes(&aliased(QoS::AtMostOnce, None, "t", TOPIC_ALIAS_MAX + 1), v),
        now,
    );
    assert!(matches!(&sent(&mut s, v)[..], [Packet::Disconnect(d)] if d.code == 0x94));
}

#[test]
fn refused_publish_gets_its_reason_code_in_5_only() {
    let v = Version::V5;
    let (mut s, now) = connected_v5(Properties::default());
    s.handle_bytes(
        &bytes(&publish(QoS::AtLeastOnce, Some(3), "r", b"x"), v),
        now,
    );
    assert!(matches!(
        &events(&mut s)[..],
        [Event::Publish { ack: Some(3), .. }]
    ));
    assert!(s.refuse_publish(3, 0x97));
    s.publish_done(3, Ok(()));
    match &sent(&mut s, v)[..] {
        [Packet::PubAck(a)] => assert_eq!((a.packet_id, a.code), (3, 0x97)),
        other => panic!("expected PUBACK 0x97, got {other:?}"),
    }
    let (mut s, _) = connected(Version::V311);
    assert!(!s.refuse_publish(3, 0x97), "3.1.1 has no negative ack");
}

#[test]
fn v5_receive_maximum_exceeded_by_client_is_0x93() {
    let v = Version::V5;
    let (mut s, now) = connected_v5(Properties::default());
    let mut input = Vec::new();
    for id in 1..=5 {
        input.extend(bytes(&publish(QoS::AtLeastOnce, Some(id), "t", b"x"), v));
    }
    s.handle_bytes(&input, now);
    assert!(s.is_closed());
    assert!(matches!(&sent(&mut s, v)[..], [Packet::Disconnect(d)] if d.code == 0x93));
}

#[test]
fn v5_request_problem_information_zero_hides_reason_strings() {
    let v = Version::V5;
    let (mut s, now) = connected_v5(Properties {
        request_problem_information: Some(0),
        request_response_information: Some(1),
        ..Properties::default()
    });
    s.handle_bytes(
        &bytes(&publish(QoS::AtLeastOnce, Some(1), "t", b"x"), v),
        now,
    );
    events(&mut s);
    s.publish_done(1, Err("stream full".into()));
    assert!(matches!(
        &sent(&mut s, v)[..],
        [Packet::PubAck(a)] if a.code == 0x80 && a.properties.reason_string.is_none()
    ));
}
