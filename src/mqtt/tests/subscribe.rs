//! SUBSCRIBE: shared subscriptions, quotas, the held SUBACK.

use super::*;

#[test]
fn shared_subscriptions_both_versions() {
    // 5.0 advertises them.
    let v = Version::V5;
    let now = Instant::now();
    let mut s = Session::new(limits(), now);
    s.handle_bytes(&bytes(&connect(v, "d", true, 10), v), now);
    events(&mut s);
    s.restore(None);
    assert!(matches!(
        &sent(&mut s, v)[..],
        [Packet::ConnAck(c)] if c.properties.shared_subscription_available == Some(1)
    ));
    for v in [Version::V5, Version::V311] {
        let (mut s, now) = connected(v);
        let sub = sub_opts(
            &[("$share/g/a/#", QoS::AtLeastOnce), ("a/b", QoS::AtMostOnce)],
            1,
        );
        s.handle_bytes(&bytes(&sub, v), now);
        let req = |f: &str, qos, share: Option<&str>| SubRequest {
            filter: f.into(),
            qos,
            retained: share.is_none().then_some(qos),
            share: share.map(String::from),
        };
        assert_eq!(
            events(&mut s),
            vec![Event::Subscribe(vec![
                req("a", 1, Some("g")),
                req("a.>", 1, Some("g")),
                req("a.b", 0, None),
            ])]
        );
        assert_eq!(suback_codes(&mut s, v), vec![1, 0]);
        assert_eq!(s.subscription_count(), 2);
        let stored = s.snapshot().subs;
        assert_eq!(stored.iter().filter(|x| x.share.is_some()).count(), 1);
        // A shared delivery of a `$` topic is not refused by the
        // non-wildcard check, and arrives at the router's QoS.
        s.deliver(&Delivery {
            msg: std::sync::Arc::new(crate::router::Msg {
                subject: "a.c".into(),
                reply: None,
                headers: None,
                payload: b"x".to_vec(),
                publisher: None,
            }),
            qos: 1,
            retain: false,
            shared: true,
            at: now,
        });
        assert!(matches!(&sent(&mut s, v)[..], [Packet::Publish(p)] if p.qos == QoS::AtLeastOnce));
        let unsub = Packet::Unsubscribe(mqtt::Unsubscribe {
            packet_id: 2,
            filters: vec!["$share/g/a/#".into()],
            properties: Properties::default(),
        });
        s.handle_bytes(&bytes(&unsub, v), now);
        assert_eq!(
            events(&mut s),
            vec![
                Event::UnsubscribeShared(vec![
                    ("g".into(), "a".into()),
                    ("g".into(), "a.>".into())
                ]),
                Event::Unsubscribe(vec![])
            ]
        );
        assert_eq!(s.subscription_count(), 1);
    }
    // 3.1.1 has no grammar for them: checked by the session.
    let v = Version::V311;
    let (mut s, now) = connected(v);
    let sub = sub_opts(
        &[
            ("$share/g", QoS::AtMostOnce),
            ("$share//a", QoS::AtMostOnce),
        ],
        1,
    );
    s.handle_bytes(&bytes(&sub, v), now);
    assert_eq!(suback_codes(&mut s, v), vec![0x80, 0x80]);
    assert_eq!(events(&mut s), vec![Event::Subscribe(vec![])]);
}

#[test]
fn persistent_shared_subscription_is_live_only_and_restored() {
    let v = Version::V311;
    let (mut s, now, _) = persistent(v, None);
    let idx = s.follow("T", 0);
    s.handle_bytes(
        &bytes(&subscribe_pkt(1, "$share/g/t/x", QoS::AtLeastOnce), v),
        now,
    );
    events(&mut s);
    sent(&mut s, v);
    s.deliver_stored(idx, 1, "t.x", b"from the stream");
    assert!(
        !s.has_output(),
        "shared subscriptions are not served from cursors"
    );
    let snap = s.snapshot();
    let (s2, _, present) = persistent(v, Some(snap));
    assert!(present);
    let subs: Vec<_> = s2
        .subs
        .iter()
        .map(|x| (x.share.as_deref(), x.filter.as_str(), x.qos))
        .collect();
    assert_eq!(subs, vec![(Some("g"), "t/x", 1)]);
}

#[test]
fn subscription_quota_and_topic_limits() {
    for v in [Version::V5, Version::V311] {
        let (mut s, now) = connected(v);
        let quota = if v == Version::V5 { 0x97 } else { 0x80 };
        let invalid = if v == Version::V5 { 0x8F } else { 0x80 };
        let q0 = QoS::AtMostOnce;
        // `a/#` counts once: three fit.
        s.handle_bytes(
            &bytes(&sub_opts(&[("a/#", q0), ("b", q0), ("c", q0)], 1), v),
            now,
        );
        assert_eq!(suback_codes(&mut s, v), vec![0, 0, 0]);
        let sub = sub_opts(&[("d", q0), ("b", QoS::AtLeastOnce), ("$share/g/e", q0)], 2);
        s.handle_bytes(&bytes(&sub, v), now);
        assert_eq!(
            suback_codes(&mut s, v),
            vec![quota, 1, quota],
            "replacing is fine"
        );
        s.handle_bytes(&bytes(&sub_opts(&[("x/x/x/x/x", q0)], 3), v), now);
        assert_eq!(suback_codes(&mut s, v), vec![invalid], "5 levels");
        let long = "l".repeat(33);
        s.handle_bytes(&bytes(&sub_opts(&[(long.as_str(), q0)], 4), v), now);
        assert_eq!(suback_codes(&mut s, v), vec![invalid], "33 bytes");
        assert_eq!(s.subscription_count(), 3);
        events(&mut s);
        // PUBLISH over the limits.
        let p = publish(QoS::AtLeastOnce, Some(5), "p/p/p/p/p", b"x");
        s.handle_bytes(&bytes(&p, v), now);
        if v == Version::V5 {
            assert_eq!(events(&mut s), vec![Event::AckInOrder(5)]);
            s.publish_done(5, Ok(()));
            assert!(matches!(&sent(&mut s, v)[..], [Packet::PubAck(a)] if a.code == 0x90));
            let p = publish(QoS::AtMostOnce, None, &long, b"x");
            s.handle_bytes(&bytes(&p, v), now);
            assert!(matches!(&sent(&mut s, v)[..], [Packet::Disconnect(d)] if d.code == 0x90));
        }
        assert!(s.is_closed());
    }
}

#[test]
fn suback_waits_for_the_save_and_a_failed_save_refuses_it() {
    for v in [Version::V311, Version::V5] {
        let (mut s, now) = if v == Version::V311 {
            let (s, now, _) = persistent(v, None);
            (s, now)
        } else {
            v5_session(60)
        };
        assert!(s.is_persistent());
        let mut input = bytes(&sub_opts(&[("a/#", QoS::AtLeastOnce)], 1), v);
        input.extend(bytes(&Packet::PingReq, v));
        s.handle_bytes(&input, now);
        assert!(matches!(&raw_events(&mut s)[..], [Event::Subscribe(r)] if r.len() == 2));
        assert!(
            !s.has_output(),
            "no SUBACK (nor anything after it) before the save"
        );
        assert_eq!(s.snapshot().subs.len(), 1, "what the save writes");
        assert!(!s.subscribe_done(false), "not added after a failed save");
        match &sent(&mut s, v)[..] {
            [Packet::SubAck(a), Packet::PingResp] => {
                assert_eq!(a.codes, vec![0x80]);
                if v == Version::V5 {
                    assert!(a.properties.reason_string.is_some());
                }
            }
            other => panic!("expected SUBACK 0x80 then PINGRESP, got {other:?}"),
        }
        assert!(s.snapshot().subs.is_empty(), "rolled back");
        // Saved: granted.
        s.handle_bytes(&bytes(&sub_opts(&[("a/#", QoS::AtLeastOnce)], 2), v), now);
        raw_events(&mut s);
        assert!(s.subscribe_done(true));
        assert_eq!(suback_codes(&mut s, v), vec![1]);
        // A failed upgrade to QoS 2 keeps QoS 1; a refused filter
        // (over max_topic_length) keeps its own code.
        let long = "z".repeat(40);
        s.handle_bytes(
            &bytes(
                &sub_opts(&[("a/#", QoS::ExactlyOnce), (&long, QoS::AtMostOnce)], 3),
                v,
            ),
            now,
        );
        raw_events(&mut s);
        assert!(!s.subscribe_done(false));
        let codes = suback_codes(&mut s, v);
        assert_eq!(codes[0], 0x80);
        assert!(codes[1] >= 0x80);
        assert!(s.snapshot().subs.iter().all(|x| x.qos == 1));
    }
    // Not persistent: nothing to save, the SUBACK leaves at once.
    let (mut s, now) = connected(Version::V311);
    s.handle_bytes(
        &bytes(&subscribe_pkt(1, "a", QoS::AtMostOnce), Version::V311),
        now,
    );
    assert_eq!(suback_codes(&mut s, Version::V311), vec![0]);
    raw_events(&mut s);
    assert!(s.subscribe_done(false));
}

// Issue 14: subscriptions keyed by the MQTT filter, and their options.

#[test]
fn overlapping_filters_are_separate_subscriptions() {
    let v = Version::V5;
    let (mut s, now) = connected(v);
    let req = |f: &str, qos, retained: Option<u8>| SubRequest {
        filter: f.into(),
        qos,
        retained,
        share: None,
    };
    s.handle_bytes(&bytes(&subscribe_pkt(1, "x", QoS::ExactlyOnce), v), now);
    assert_eq!(
        events(&mut s),
        vec![Event::Subscribe(vec![req("x", 2, Some(2))])]
    );
    suback_codes(&mut s, v);
    // `x/#` at QoS 0: `x` stays registered at QoS 2.
    s.handle_bytes(&bytes(&subscribe_pkt(2, "x/#", QoS::AtMostOnce), v), now);
    assert_eq!(
        events(&mut s),
        vec![Event::Subscribe(vec![
            req("x", 2, Some(0)),
            req("x.>", 0, Some(0))
        ])]
    );
    suback_codes(&mut s, v);
    assert_eq!(s.subscription_count(), 2);
    // UNSUBSCRIBE `x/#` removes `x.>` only; `x` is still wanted.
    let unsub = |id: u16, f: &str| {
        bytes(
            &Packet::Unsubscribe(Unsubscribe {
                packet_id: id,
                filters: vec![f.into()],
                properties: Properties::default(),
            }),
            v,
        )
    };
    s.handle_bytes(&unsub(3, "x/#"), now);
    assert_eq!(events(&mut s), vec![Event::Unsubscribe(vec!["x.>".into()])]);
    assert!(matches!(&sent(&mut s, v)[..], [Packet::UnsubAck(u)] if u.codes == vec![0]));
    // A filter it does not hold: 0x11 (as Mosquitto).
    s.handle_bytes(&unsub(4, "x/#"), now);
    assert_eq!(events(&mut s), vec![Event::Unsubscribe(Vec::new())]);
    assert!(matches!(&sent(&mut s, v)[..], [Packet::UnsubAck(u)] if u.codes == vec![0x11]));
    // `x/#` at QoS 0 again, then UNSUBSCRIBE `x`: `x` re-registered at 0.
    s.handle_bytes(&bytes(&subscribe_pkt(5, "x/#", QoS::AtMostOnce), v), now);
    events(&mut s);
    suback_codes(&mut s, v);
    s.handle_bytes(&unsub(6, "x"), now);
    assert_eq!(
        events(&mut s),
        vec![
            Event::Unsubscribe(Vec::new()),
            Event::Subscribe(vec![req("x", 0, None)])
        ]
    );
    assert!(s.subscribe_done(true));
}

#[test]
fn no_local_marks_own_publishes_and_skips_them() {
    let v = Version::V5;
    let (mut s, now) = connected(v);
    let sub = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![
            (
                "a/+".into(),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    ..SubscriptionOptions::default()
                },
            ),
            (
                "a/#".into(),
                SubscriptionOptions {
                    qos: QoS::AtMostOnce,
                    retain_as_published: true,
                    ..SubscriptionOptions::default()
                },
            ),
        ],
        properties: Properties::default(),
    });
    s.handle_bytes(&bytes(&sub, v), now);
    events(&mut s);
    suback_codes(&mut s, v);
    // Its own publish carries its client id; a spoofed one is dropped.
    let mut p = publish(QoS::AtMostOnce, None, "a/b", b"own");
    if let Packet::Publish(p) = &mut p {
        p.properties.user_properties = vec![(props::ORIGIN.into(), "someone".into())];
    }
    s.handle_bytes(&bytes(&p, v), now);
    let Some(Event::Publish {
        props: Some(pr), ..
    }) = events(&mut s).pop()
    else {
        panic!("expected a Publish with properties");
    };
    let id = s.client_id().to_string();
    assert_eq!(
        pr.user_properties,
        vec![(props::ORIGIN.to_string(), id.clone())]
    );
    // Back from the router (QoS 1: the highest registration): only `a/#`
    // delivers it, at its QoS 0, with RETAIN kept (Retain As Published).
    let headers = props::props_to_headers(&pr);
    let mut d = delivery("a.b", 1, headers, now);
    d.retain = true;
    s.deliver(&d);
    let got = publishes(&mut s);
    assert_eq!(
        (got.len(), got[0].qos, got[0].retain),
        (1, QoS::AtMostOnce, true)
    );
    assert!(
        got[0].properties.user_properties.is_empty(),
        "the marker is not shown"
    );
    // Someone else's: both, at QoS 1.
    s.deliver(&delivery("a.b", 1, None, now));
    assert_eq!(publishes(&mut s)[0].qos, QoS::AtLeastOnce);
    // Only the No Local subscription matches: not delivered at all.
    let own = props::props_to_headers(&Properties {
        user_properties: vec![(props::ORIGIN.into(), id)],
        ..Properties::default()
    });
    s.handle_bytes(&bytes(&subscribe_pkt(2, "a/#", QoS::AtMostOnce), v), now);
    let unsub = Packet::Unsubscribe(Unsubscribe {
        packet_id: 3,
        filters: vec!["a/#".into()],
        properties: Properties::default(),
    });
    s.handle_bytes(&bytes(&unsub, v), now);
    events(&mut s);
    sent(&mut s, v);
    s.deliver(&delivery("a.b", 1, own, now));
    assert!(publishes(&mut s).is_empty());
}
