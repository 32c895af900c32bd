//! Persistent sessions: stream cursors, restore, the snapshot.

use super::*;

#[test]
fn stream_delivery_filters_caps_qos_and_advances_cursor_contiguously() {
    let v = Version::V311;
    let (mut s, now, present) = persistent(v, None);
    assert!(!present);
    assert!(s.is_persistent());
    let idx = s.follow("T", 10);
    assert_eq!(s.stream_next(idx), Some(11));
    s.handle_bytes(&bytes(&subscribe_pkt(1, "t/#", QoS::ExactlyOnce), v), now);
    assert!(matches!(&events(&mut s)[..], [Event::Subscribe(_)]));
    sent(&mut s, v);
    assert!(s.take_dirty());
    s.deliver_stored(idx, 11, "t.a", b"1");
    s.deliver_stored(idx, 12, "other", b"x"); // no match: skipped
    s.deliver_stored(idx, 13, "t.b", b"3");
    s.deliver_stored(idx, 13, "t.b", b"3"); // already read: ignored
    let ids: Vec<u16> = sent(&mut s, v)
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => {
                assert_eq!(p.qos, QoS::AtLeastOnce, "capped at 1");
                assert!(!p.dup);
                p.packet_id.unwrap()
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        })
        .collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(s.stream_next(idx), Some(14));
    assert_eq!(s.snapshot().cursors[0].acked, 10, "nothing acknowledged");
    assert_eq!(s.stream_room(), 2, "window 4, two in flight");
    // Acknowledge the second first: the cursor must not pass the first.
    let ack = |id| {
        bytes(
            &Packet::PubAck(Ack {
                packet_id: id,
                ..Ack::default()
            }),
            v,
        )
    };
    s.handle_bytes(&ack(ids[1]), now);
    assert_eq!(s.snapshot().cursors[0].acked, 10);
    s.handle_bytes(&ack(ids[0]), now);
    let snap = s.snapshot();
    assert_eq!(snap.cursors[0].acked, 13);
    assert_eq!(snap.cursors[0].sent, 13);
    assert_eq!(
        snap.subs,
        vec![StoredSub {
            filter: "t/#".into(),
            qos: 2,
            ..StoredSub::default()
        }]
    );
    assert!(s.take_dirty());
    s.stream_skip_to(idx, 20);
    assert_eq!(s.snapshot().cursors[0].acked, 19);
}

#[test]
fn restore_resumes_subscriptions_cursor_dup_and_qos2_ids() {
    let v = Version::V311;
    let stored = StoredSession {
        client_id: "dev-p".into(),
        owner: None,
        version: 4,
        subs: vec![StoredSub {
            filter: "t/+".into(),
            qos: 1,
            ..StoredSub::default()
        }],
        expiry_secs: 3600,
        disconnected_at_ms: 1,
        cursors: vec![Cursor {
            stream: "T".into(),
            acked: 5,
            sent: 6,
            ..Cursor::default()
        }],
        qos2_in: vec![9],
    };
    let (mut s, now, present) = persistent(v, Some(stored));
    assert!(present, "session_present");
    assert_eq!(
        events(&mut s),
        vec![Event::Subscribe(vec![SubRequest {
            filter: "t.*".into(),
            qos: 1,
            retained: None,
            share: None,
        }])]
    );
    let idx = s.follow("T", 100);
    assert_eq!(s.stream_next(idx), Some(6), "resume after the cursor");
    let other = s.follow("NEW", 100);
    assert_eq!(s.stream_next(other), Some(101), "a new stream: its tail");
    s.deliver_stored(idx, 6, "t.a", b"6");
    s.deliver_stored(idx, 7, "t.a", b"7");
    let dups: Vec<bool> = sent(&mut s, v)
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => p.dup,
            other => panic!("expected PUBLISH, got {other:?}"),
        })
        .collect();
    assert_eq!(dups, vec![true, false], "DUP only for what was sent");
    // The publisher resends QoS 2 id 9 (DUP): not routed again.
    s.handle_bytes(
        &bytes(&publish(QoS::ExactlyOnce, Some(9), "t/x", b"q"), v),
        now,
    );
    assert_eq!(events(&mut s), vec![Event::AckInOrder(9)]);
    s.publish_done(9, Ok(()));
    let rel = Packet::PubRel(Ack {
        packet_id: 9,
        ..Ack::default()
    });
    s.handle_bytes(&bytes(&rel, v), now);
    assert!(matches!(
        &sent(&mut s, v)[..],
        [Packet::PubRec(_), Packet::PubComp(c)] if c.packet_id == 9
    ));
    assert!(s.snapshot().qos2_in.is_empty());
}

#[test]
fn v5_subscription_identifiers_survive_in_stored_sessions() {
    let v = Version::V5;
    let now = Instant::now();
    let stored = StoredSession {
        client_id: "sid".into(),
        version: 5,
        subs: vec![StoredSub {
            filter: "a/+".into(),
            qos: 0,
            id: Some(11),
            ..StoredSub::default()
        }],
        expiry_secs: 60,
        ..StoredSession::default()
    };
    let mut s = Session::new(limits(), now);
    let Packet::Connect(mut c) = connect(v, "sid", false, 10) else {
        unreachable!()
    };
    c.properties.session_expiry_interval = Some(60);
    s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
    events(&mut s);
    s.restore(Some(stored));
    events(&mut s);
    sent(&mut s, v);
    s.deliver(&delivery("a.b", 0, None, now));
    assert_eq!(
        publishes(&mut s)[0].properties.subscription_identifiers,
        vec![11]
    );
    assert_eq!(s.snapshot().subs[0].id, Some(11));
}

#[test]
fn v5_stored_message_expiry_uses_its_age() {
    let v = Version::V5;
    let now = Instant::now();
    let mut s = Session::new(limits(), now);
    let Packet::Connect(mut c) = connect(v, "p5", false, 10) else {
        unreachable!()
    };
    c.properties.session_expiry_interval = Some(60);
    s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
    events(&mut s);
    s.restore(None);
    sent(&mut s, v);
    let idx = s.follow("T", 0);
    subscribe_all(&mut s, now, None);
    let h = crate::mqtt::props::props_to_headers(&Properties {
        message_expiry_interval: Some(10),
        ..Properties::default()
    });
    s.deliver_stored_msg(idx, 1, "t", h.as_deref(), b"old", Duration::from_secs(11));
    s.deliver_stored_msg(idx, 2, "t", h.as_deref(), b"new", Duration::from_secs(4));
    match &publishes(&mut s)[..] {
        [p] => {
            assert_eq!(p.payload, b"new");
            assert_eq!(p.properties.message_expiry_interval, Some(6));
        }
        other => panic!("expected one PUBLISH, got {other:?}"),
    }
    assert_eq!(s.expired, 1);
    assert_eq!(s.stream_next(idx), Some(3));
}

#[test]
fn a_failed_sync_drops_the_ack_and_closes() {
    for v in [Version::V311, Version::V5] {
        let (mut s, now) = if v == Version::V311 {
            let (s, now, _) = persistent(v, None);
            (s, now)
        } else {
            v5_session(60)
        };
        s.handle_bytes(
            &bytes(&publish(QoS::ExactlyOnce, Some(7), "a", b"2"), v),
            now,
        );
        events(&mut s);
        s.publish_done(7, Ok(()));
        assert!(s.take_sync());
        s.sync_failed("disk full");
        assert!(s.is_closed());
        match (&sent(&mut s, v)[..], v) {
            ([], Version::V311) => {}
            ([Packet::Disconnect(d)], Version::V5) => assert_eq!(d.code, 0x80),
            (other, _) => panic!("no PUBREC may leave; got {other:?}"),
        }
        assert!(matches!(&events(&mut s)[..], [Event::Close(_)]));
    }
}

#[test]
fn stored_messages_pass_deny_subscribe_and_the_cursor_moves_on() {
    let v = Version::V311;
    let (mut s, now, _) = session_as(v, "dave", None);
    let idx = s.follow("T", 10);
    s.handle_bytes(&bytes(&subscribe_pkt(1, "#", QoS::AtLeastOnce), v), now);
    events(&mut s);
    assert_eq!(suback_codes(&mut s, v), vec![1]);
    s.deliver_stored(idx, 11, "secret.s", b"no");
    s.deliver_stored(idx, 12, "a.b", b"yes");
    let got = sent_publishes(&mut s);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].3, b"yes");
    s.handle_bytes(&ack_pkt(Packet::PubAck, got[0].0), now);
    assert_eq!(s.snapshot().cursors[0].acked, 12, "skipped, not stuck");

    // A QoS 2 one in flight from before the permissions changed is
    // not sent again: its packet id is released.
    let mut stored = qos2_session(Cursor {
        stream: "T".into(),
        acked: 5,
        sent: 7,
        qos2: vec![(6, 30, false), (7, 31, false)],
        done: vec![],
    });
    stored.subs[0].filter = ">".into();
    let (mut s, now, present) = session_as(v, "dave", Some(stored));
    assert!(present);
    events(&mut s);
    let idx = s.follow("T", 100);
    let h = qos2_header();
    s.deliver_stored_msg(idx, 6, "secret.x", h.as_deref(), b"no", Duration::ZERO);
    s.deliver_stored_msg(idx, 7, "q.x", h.as_deref(), b"yes", Duration::ZERO);
    match &sent(&mut s, v)[..] {
        [Packet::PubRel(r), Packet::Publish(p)] => {
            assert_eq!(r.packet_id, 30);
            assert_eq!(
                (p.packet_id, p.dup, &p.payload[..]),
                (Some(31), true, &b"yes"[..])
            );
        }
        other => panic!("expected PUBREL 30 and the resend of 31, got {other:?}"),
    }
    s.handle_bytes(&ack_pkt(Packet::PubComp, 30), now);
    s.handle_bytes(&ack_pkt(Packet::PubRec, 31), now);
    s.handle_bytes(&ack_pkt(Packet::PubComp, 31), now);
    assert_eq!(s.snapshot().cursors[0].acked, 7);
}
