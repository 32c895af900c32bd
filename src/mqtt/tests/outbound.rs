//! Deliveries: QoS, the window and queue, aliases, properties.

use super::*;

#[test]
fn subscribe_maps_filters_and_deliver_uses_min_qos_from_router() {
    let v = Version::V311;
    let (mut s, now) = connected(v);
    let sub = Packet::Subscribe(Subscribe {
        packet_id: 9,
        filters: vec![
            (
                "plant/+/temp".into(),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
            ),
            ("alarm/#".into(), SubscriptionOptions::default()),
        ],
        properties: Properties::default(),
    });
    s.handle_bytes(&bytes(&sub, v), now);
    assert_eq!(
        events(&mut s),
        vec![Event::Subscribe(
            [("plant.*.temp", 1), ("alarm", 0), ("alarm.>", 0)]
                .into_iter()
                .map(|(f, qos)| SubRequest {
                    filter: f.into(),
                    qos,
                    retained: Some(qos),
                    share: None,
                })
                .collect()
        )]
    );
    assert!(matches!(&sent(&mut s, v)[..], [Packet::SubAck(a)] if a.codes == vec![1, 0]));
    s.deliver(&Delivery {
        msg: std::sync::Arc::new(crate::router::Msg {
            subject: "plant.l1.temp".into(),
            reply: None,
            headers: None,
            payload: b"21".to_vec(),
            publisher: None,
        }),
        qos: 1,
        retain: false,
        shared: false,
        at: now,
    });
    match &sent(&mut s, v)[..] {
        [Packet::Publish(p)] => {
            assert_eq!(p.topic, "plant/l1/temp");
            assert_eq!(p.qos, QoS::AtLeastOnce);
            assert!(p.packet_id.is_some());
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[test]
fn retained_messages_respect_deny_subscribe_and_dollar_topics() {
    use crate::auth::{Auth, Permissions, Secret, User};
    let auth = Arc::new(Auth {
        anonymous: false,
        anonymous_permissions: Arc::new(Permissions::default()),
        users: vec![User {
            name: "dave".into(),
            secret: Secret::parse("pw"),
            permissions: Arc::new(Permissions {
                deny_subscribe: vec!["secret.>".into()],
                ..Permissions::default()
            }),
        }],
    });
    let v = Version::V5;
    let now = Instant::now();
    let mut s = Session::new(
        Limits {
            auth: Some(auth),
            ..limits()
        },
        now,
    );
    let Packet::Connect(mut c) = connect(v, "d", true, 10) else {
        unreachable!()
    };
    c.username = Some("dave".into());
    c.password = Some(b"pw".to_vec());
    s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
    events(&mut s);
    s.restore(None);
    sent(&mut s, v);
    subscribe_all(&mut s, now, None);
    for subject in ["secret.x", "$SYS.x", "a.x"] {
        s.deliver_retained(&delivery(subject, 0, None, now));
    }
    let got: Vec<String> = publishes(&mut s).into_iter().map(|p| p.topic).collect();
    assert_eq!(got, vec!["a/x"], "only what dave may receive through #");
}

#[test]
fn v5_outbound_topic_aliases_up_to_the_client_maximum() {
    let (mut s, now) = connected_v5(Properties {
        topic_alias_maximum: Some(1),
        ..Properties::default()
    });
    subscribe_all(&mut s, now, None);
    for subject in ["a.b", "a.b", "c", "a.b"] {
        s.deliver(&delivery(subject, 0, None, now));
    }
    let got: Vec<(String, Option<u16>)> = publishes(&mut s)
        .into_iter()
        .map(|p| (p.topic, p.properties.topic_alias))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a/b".into(), Some(1)),
            (String::new(), Some(1)),
            ("c".into(), None),
            (String::new(), Some(1)),
        ]
    );
}

#[test]
fn v5_receive_maximum_queues_outbound_and_expiry_drops_queued() {
    let v = Version::V5;
    let (mut s, now) = connected_v5(Properties {
        receive_maximum: Some(2),
        ..Properties::default()
    });
    subscribe_all(&mut s, now, None);
    let expiring = crate::mqtt::props::props_to_headers(&Properties {
        message_expiry_interval: Some(5),
        ..Properties::default()
    });
    s.deliver(&delivery("a", 1, None, now));
    s.deliver(&delivery("b", 1, None, now));
    s.deliver(&delivery("c", 1, expiring.clone(), now));
    s.deliver(&delivery("d", 1, expiring, now));
    s.deliver(&delivery("e", 1, None, now));
    let first = publishes(&mut s);
    assert_eq!(first.len(), 2, "window of 2");
    assert_eq!(s.stream_room(), 0);
    // One acknowledged 2 s later: "c" goes out with 3 s left.
    let ack = |id| {
        bytes(
            &Packet::PubAck(Ack {
                packet_id: id,
                ..Ack::default()
            }),
            v,
        )
    };
    let t2 = now + Duration::from_secs(2);
    s.handle_bytes(&ack(first[0].packet_id.unwrap()), t2);
    match &publishes(&mut s)[..] {
        [p] => {
            assert_eq!(p.topic, "c");
            assert_eq!(p.properties.message_expiry_interval, Some(3));
        }
        other => panic!("expected one PUBLISH, got {other:?}"),
    }
    // The next acknowledgement comes after "d" expired: "e" is next.
    s.handle_bytes(
        &ack(first[1].packet_id.unwrap()),
        now + Duration::from_secs(6),
    );
    let next = publishes(&mut s);
    assert_eq!(
        next.iter().map(|p| p.topic.as_str()).collect::<Vec<_>>(),
        vec!["e"]
    );
    assert_eq!(s.expired, 1);
}

#[test]
fn queued_deliveries_are_bounded_in_bytes_too() {
    let (mut s, now) = connected_v5(Properties {
        receive_maximum: Some(1),
        ..Properties::default()
    });
    subscribe_all(&mut s, now, None);
    let big = |subject: &str| with_payload(delivery(subject, 1, None, now), vec![7u8; 300_000]);
    // One in flight; then the queue takes one of any size, and more
    // while under max_queued_bytes (1 MiB in these limits).
    for t in ["a", "b", "c", "d", "e", "f"] {
        s.deliver(&big(t));
    }
    assert_eq!(publishes(&mut s).len(), 1);
    assert_eq!(s.queued_len(), 3, "3 x 300 kB fit in 1 MiB, a fourth not");
    assert_eq!(s.dropped, 2);
    assert_eq!(s.queued_bytes(), 3 * big("x").cost());
    // QoS 0 is never queued.
    s.deliver(&delivery("z", 0, None, now));
    assert_eq!(publishes(&mut s).len(), 1);
    // An empty queue takes a message larger than the limit.
    let mut s2 = connected_v5(Properties {
        receive_maximum: Some(1),
        ..Properties::default()
    })
    .0;
    subscribe_all(&mut s2, now, None);
    s2.deliver(&big("a"));
    s2.deliver(&with_payload(
        delivery("b", 1, None, now),
        vec![1u8; 2 << 20],
    ));
    assert_eq!((s2.queued_len(), s2.dropped), (1, 0));
}

#[test]
fn v5_max_packet_size_drops_only_that_message() {
    let (mut s, now) = connected_v5(Properties {
        maximum_packet_size: Some(64),
        topic_alias_maximum: Some(4),
        ..Properties::default()
    });
    subscribe_all(&mut s, now, None);
    let big = with_payload(delivery("big", 1, None, now), vec![0; 100]);
    s.deliver(&big);
    s.deliver(&delivery("big", 1, None, now));
    let got = publishes(&mut s);
    assert_eq!(s.oversize_dropped, 1);
    assert_eq!(got.len(), 1);
    // The dropped packet did not set the alias: the next one does.
    assert_eq!(got[0].topic, "big");
    assert_eq!(s.stream_room(), 3, "only the sent one is in flight");
}

#[test]
fn v5_subscription_identifiers_and_properties_reach_subscribers() {
    let v = Version::V5;
    let (mut s, now) = connected_v5(Properties::default());
    subscribe_all(&mut s, now, Some(42));
    s.handle_bytes(
        &bytes(
            &Packet::Subscribe(Subscribe {
                packet_id: 2,
                filters: vec![("a/+".into(), SubscriptionOptions::default())],
                properties: Properties {
                    subscription_identifiers: vec![7],
                    ..Properties::default()
                },
            }),
            v,
        ),
        now,
    );
    events(&mut s);
    sent(&mut s, v);
    let headers = crate::mqtt::props::props_to_headers(&Properties {
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        ..Properties::default()
    });
    let mut d = delivery("a.b", 0, headers, now);
    std::sync::Arc::make_mut(&mut d.msg).reply = Some("svc.reply".into());
    s.deliver(&d);
    s.deliver(&delivery("x", 0, None, now));
    let got = publishes(&mut s);
    assert_eq!(got[0].properties.subscription_identifiers, vec![7, 42]);
    assert_eq!(
        got[0].properties.user_properties,
        vec![("k".to_string(), "v".to_string())]
    );
    assert_eq!(
        got[0].properties.content_type.as_deref(),
        Some("text/plain")
    );
    assert_eq!(
        got[0].properties.response_topic.as_deref(),
        Some("svc/reply")
    );
    assert_eq!(got[1].properties.subscription_identifiers, vec![42]);
    let ids: Vec<_> = s.snapshot().subs.iter().map(|x| x.id).collect();
    assert_eq!(ids, vec![Some(42), Some(7)], "# and a/+");
}

/// `d` with another payload.
fn with_payload(mut d: Delivery, payload: Vec<u8>) -> Delivery {
    std::sync::Arc::make_mut(&mut d.msg).payload = payload;
    d
}

/// Plain QoS 0 deliveries (no properties, options or alias: encoded from
/// the shared message) are byte for byte what the general path sends,
/// topics mapped per subject (escapes, a cached topic reused only for its
/// own subject), RETAIN only for retained messages, the client's Maximum
/// Packet Size applied.
#[test]
fn plain_qos0_deliveries_are_the_publish_the_general_path_sends() {
    let want = |topic: &str, retain: bool, payload: &[u8], v: Version| {
        bytes(
            &Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain,
                topic: topic.into(),
                packet_id: None,
                properties: Properties::default(),
                payload: payload.to_vec(),
            }),
            v,
        )
    };
    let (mut s3, now) = connected(Version::V311);
    let (mut s5, _) = connected_v5(Properties {
        maximum_packet_size: Some(64),
        ..Properties::default()
    });
    for (s, v) in [(&mut s3, Version::V311), (&mut s5, Version::V5)] {
        s.deliver(&delivery("a.b", 0, None, now));
        s.deliver(&delivery("a.b", 0, None, now));
        s.deliver(&delivery("x.y//z.%2A.//", 0, None, now));
        s.deliver_retained(&delivery("a.c", 0, None, now));
        let mut expect = want("a/b", false, b"p", v);
        expect.extend(want("a/b", false, b"p", v));
        expect.extend(want("x/y.z/*/.", false, b"p", v));
        expect.extend(want("a/c", true, b"p", v));
        assert_eq!(s.take_output(), expect, "{v:?}");
    }
    // 5.0 with a Maximum Packet Size of 64: only the large one is dropped.
    s5.deliver(&with_payload(delivery("a.b", 0, None, now), vec![0; 100]));
    s5.deliver(&delivery("a.b", 0, None, now));
    assert_eq!(s5.take_output(), want("a/b", false, b"p", Version::V5));
    assert_eq!(s5.oversize_dropped, 1);
}

#[test]
fn an_offered_output_buffer_is_kept_only_when_larger_and_keeps_what_was_queued() {
    let v = Version::V311;
    let (mut s, now) = connected(v);
    let (mut twin, _) = connected(v);
    for s in [&mut s, &mut twin] {
        let _ = s.take_output();
        s.deliver(&delivery("a.b", 0, None, now));
    }
    let before = s.output_len();
    assert!(before > 0);
    // A smaller buffer comes back untouched.
    let small = s.offer_output(Vec::with_capacity(1));
    assert_eq!(small.capacity(), 1);
    // A larger one (with stale bytes) takes the queued output over.
    let mut big = Vec::with_capacity(64 * 1024);
    big.extend_from_slice(b"stale");
    let old = s.offer_output(big);
    assert!(old.capacity() < 64 * 1024);
    assert_eq!(s.output_len(), before);
    for s in [&mut s, &mut twin] {
        s.deliver(&delivery("a.c", 0, None, now));
    }
    let out = s.take_output();
    assert!(out.capacity() >= 64 * 1024);
    assert_eq!(out, twin.take_output());
}
