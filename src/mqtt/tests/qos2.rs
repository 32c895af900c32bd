//! QoS 2 in both directions, across restores.

use super::*;

#[test]
fn qos2_duplicate_is_not_routed_twice() {
    let v = Version::V311;
    let (mut s, now) = connected(v);
    let p = bytes(&publish(QoS::ExactlyOnce, Some(3), "q/2", b"once"), v);
    s.handle_bytes(&p, now);
    assert!(matches!(
        &events(&mut s)[..],
        [Event::Publish {
            qos: 2,
            ack: Some(3),
            ..
        }]
    ));
    s.publish_done(3, Ok(()));
    assert!(matches!(&sent(&mut s, v)[..], [Packet::PubRec(a)] if a.packet_id == 3));
    // The client lost our PUBREC and resends (DUP) before PUBREL.
    s.handle_bytes(&p, now);
    assert_eq!(events(&mut s), vec![Event::AckInOrder(3)]);
    s.publish_done(3, Ok(()));
    assert!(matches!(&sent(&mut s, v)[..], [Packet::PubRec(a)] if a.packet_id == 3));
    let rel = Packet::PubRel(Ack {
        packet_id: 3,
        ..Ack::default()
    });
    s.handle_bytes(&bytes(&rel, v), now);
    assert!(matches!(&sent(&mut s, v)[..], [Packet::PubComp(a)] if a.packet_id == 3));
    // After PUBREL the id is free again: a new message with it is routed.
    s.handle_bytes(&p, now);
    assert!(matches!(&events(&mut s)[..], [Event::Publish { .. }]));
}

#[test]
fn stored_qos2_is_min_of_publisher_and_subscription_and_synced() {
    let v = Version::V311;
    let (mut s, now, _) = persistent(v, None);
    let idx = s.follow("T", 0);
    s.handle_bytes(&bytes(&subscribe_pkt(1, "q2/#", QoS::ExactlyOnce), v), now);
    s.handle_bytes(&bytes(&subscribe_pkt(2, "q1/#", QoS::AtLeastOnce), v), now);
    events(&mut s);
    sent(&mut s, v);
    assert!(!s.take_sync(), "SUBSCRIBE needs no sync");
    let h = qos2_header();
    s.deliver_stored_msg(idx, 1, "q2.a", h.as_deref(), b"1", Duration::ZERO);
    s.deliver_stored_msg(idx, 2, "q1.a", h.as_deref(), b"2", Duration::ZERO);
    s.deliver_stored_msg(idx, 3, "q2.a", None, b"3", Duration::ZERO);
    let got = sent_publishes(&mut s);
    let qos: Vec<QoS> = got.iter().map(|p| p.1).collect();
    assert_eq!(
        qos,
        vec![QoS::ExactlyOnce, QoS::AtLeastOnce, QoS::AtLeastOnce],
        "QoS 2 only when publisher and subscription are 2"
    );
    assert!(s.take_sync(), "a QoS 2 PUBLISH waits for its state on disk");
    assert!(!s.take_sync(), "once");
    let id1 = got[0].0;
    assert_eq!(s.snapshot().cursors[0].qos2, vec![(1, id1, false)]);
    // PUBACK for the QoS 1 ones: no sync needed.
    s.handle_bytes(&ack_pkt(Packet::PubAck, got[1].0), now);
    s.handle_bytes(&ack_pkt(Packet::PubAck, got[2].0), now);
    assert!(!s.take_sync());
    assert_eq!(s.snapshot().cursors[0].acked, 0, "message 1 is in flight");
    // PUBREC: PUBREL, recorded first.
    s.handle_bytes(&ack_pkt(Packet::PubRec, id1), now);
    assert!(matches!(&sent(&mut s, v)[..], [Packet::PubRel(a)] if a.packet_id == id1));
    assert!(s.take_sync());
    assert_eq!(s.snapshot().cursors[0].qos2, vec![(1, id1, true)]);
    // PUBCOMP: done; lazily written.
    s.handle_bytes(&ack_pkt(Packet::PubComp, id1), now);
    assert!(!s.take_sync());
    assert!(s.take_dirty());
    let c = &s.snapshot().cursors[0];
    assert_eq!((c.acked, c.qos2.len(), c.done.len()), (3, 0, 0));
    // A stored QoS 0 publish goes out at QoS 0 to a QoS 2 subscription,
    // and the cursor passes it without an acknowledgement.
    let h0 = crate::mqtt::props::stored_headers(None, 0, false);
    s.deliver_stored_msg(idx, 4, "q2.b", h0.as_deref(), b"4", Duration::ZERO);
    let got = sent_publishes(&mut s);
    assert_eq!(
        got.iter().map(|p| p.1).collect::<Vec<_>>(),
        vec![QoS::AtMostOnce]
    );
    assert_eq!(s.snapshot().cursors[0].acked, 4);
}

#[test]
fn completed_qos2_above_the_cursor_is_remembered() {
    let v = Version::V311;
    let (mut s, now, _) = persistent(v, None);
    let idx = s.follow("T", 0);
    s.handle_bytes(&bytes(&subscribe_pkt(1, "q/#", QoS::ExactlyOnce), v), now);
    events(&mut s);
    sent(&mut s, v);
    let h = qos2_header();
    for seq in 1..=3 {
        s.deliver_stored_msg(idx, seq, "q.a", h.as_deref(), b"x", Duration::ZERO);
    }
    let ids: Vec<u16> = sent_publishes(&mut s).iter().map(|p| p.0).collect();
    // The third completes first; the first is still unanswered.
    s.handle_bytes(&ack_pkt(Packet::PubRec, ids[2]), now);
    s.handle_bytes(&ack_pkt(Packet::PubComp, ids[2]), now);
    s.handle_bytes(&ack_pkt(Packet::PubRec, ids[1]), now);
    let c = s.snapshot().cursors[0].clone();
    assert_eq!(c.acked, 0);
    assert_eq!(c.done, vec![3]);
    assert_eq!(c.qos2, vec![(1, ids[0], false), (2, ids[1], true)]);
    s.handle_bytes(&ack_pkt(Packet::PubRec, ids[0]), now);
    s.handle_bytes(&ack_pkt(Packet::PubComp, ids[0]), now);
    s.handle_bytes(&ack_pkt(Packet::PubComp, ids[1]), now);
    let c = s.snapshot().cursors[0].clone();
    assert_eq!((c.acked, c.done, c.qos2), (3, vec![], vec![]));
}

#[test]
fn restored_qos2_gets_pubrel_or_dup_resend_with_its_id_never_twice() {
    let v = Version::V311;
    let stored = qos2_session(Cursor {
        stream: "T".into(),
        acked: 5,
        sent: 8,
        qos2: vec![(6, 30, true), (7, 31, false), (9, 32, false)],
        done: vec![8],
    });
    let (mut s, now, present) = persistent(v, Some(stored));
    assert!(present);
    events(&mut s);
    let idx = s.follow("T", 100);
    // PUBREL for the one the client PUBREC'd, at once.
    assert!(matches!(&sent(&mut s, v)[..], [Packet::PubRel(a)] if a.packet_id == 30));
    assert_eq!(s.stream_next(idx), Some(6));
    assert_eq!(s.stream_room(), 3, "window 4, the PUBREL'd one in flight");
    let h = qos2_header();
    for seq in 6..=10 {
        s.deliver_stored_msg(idx, seq, "q.a", h.as_deref(), &[seq as u8], Duration::ZERO);
    }
    let got = sent_publishes(&mut s);
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!((got[0].0, got[0].2, got[0].3.clone()), (31, true, vec![7]));
    assert_eq!((got[1].0, got[1].2, got[1].3.clone()), (32, true, vec![9]));
    assert!(
        ![30, 31, 32].contains(&got[2].0),
        "a new id for a new message"
    );
    assert_eq!((got[2].2, got[2].3.clone()), (false, vec![10]));
    assert!(s.take_sync(), "the new message's id is recorded first");
    // Completing them moves the cursor over the done one.
    s.handle_bytes(&ack_pkt(Packet::PubComp, 30), now);
    for id in [31, 32, got[2].0] {
        s.handle_bytes(&ack_pkt(Packet::PubRec, id), now);
        s.handle_bytes(&ack_pkt(Packet::PubComp, id), now);
    }
    let c = s.snapshot().cursors[0].clone();
    assert_eq!((c.acked, c.done, c.qos2), (10, vec![], vec![]));
}

#[test]
fn restored_qos2_gone_from_the_stream_is_released() {
    let v = Version::V311;
    let stored = qos2_session(Cursor {
        stream: "T".into(),
        acked: 5,
        sent: 7,
        qos2: vec![(6, 40, false), (7, 41, false)],
        done: Vec::new(),
    });
    let (mut s, now, _) = persistent(v, Some(stored));
    events(&mut s);
    let idx = s.follow("T", 100);
    assert!(sent(&mut s, v).is_empty());
    // Limits removed 6; 7 is read.
    let h = qos2_header();
    s.deliver_stored_msg(idx, 7, "q.a", h.as_deref(), b"7", Duration::ZERO);
    match &sent(&mut s, v)[..] {
        [Packet::PubRel(r), Packet::Publish(p)] => {
            assert_eq!(r.packet_id, 40);
            assert_eq!((p.packet_id, p.dup), (Some(41), true));
        }
        other => panic!("expected PUBREL 40 and PUBLISH 41, got {other:?}"),
    }
    assert!(s.take_sync());
    s.handle_bytes(&ack_pkt(Packet::PubComp, 40), now);
    assert_eq!(s.snapshot().cursors[0].acked, 6);
}

#[test]
fn restored_qos2_before_a_completed_one_is_released_when_gone() {
    let v = Version::V311;
    let stored = qos2_session(Cursor {
        stream: "T".into(),
        acked: 5,
        sent: 8,
        qos2: vec![(6, 40, false), (7, 41, false)],
        done: vec![8],
    });
    let (mut s, _, _) = persistent(v, Some(stored));
    events(&mut s);
    let idx = s.follow("T", 100);
    // 6 and 7 were removed; 8 (completed) is the first read.
    let h = qos2_header();
    s.deliver_stored_msg(idx, 8, "q.a", h.as_deref(), b"8", Duration::ZERO);
    let rels: Vec<u16> = sent(&mut s, v)
        .into_iter()
        .map(|p| match p {
            Packet::PubRel(a) => a.packet_id,
            other => panic!("expected PUBREL, got {other:?}"),
        })
        .collect();
    assert_eq!(rels, vec![40, 41]);
}

#[test]
fn inbound_qos2_id_and_its_removal_are_synced_qos1_never() {
    let v = Version::V311;
    let (mut s, now, _) = persistent(v, None);
    s.handle_bytes(
        &bytes(&publish(QoS::AtLeastOnce, Some(1), "a", b"1"), v),
        now,
    );
    events(&mut s);
    s.publish_done(1, Ok(()));
    assert!(!s.take_sync(), "QoS 1 costs no session write");
    s.handle_bytes(
        &bytes(&publish(QoS::ExactlyOnce, Some(2), "a", b"2"), v),
        now,
    );
    events(&mut s);
    s.publish_done(2, Ok(()));
    assert!(s.take_sync(), "the id is durable before the PUBREC");
    assert_eq!(s.snapshot().qos2_in, vec![2]);
    s.handle_bytes(&ack_pkt(Packet::PubRel, 2), now);
    assert!(s.take_sync(), "and its removal before the PUBCOMP");
    s.handle_bytes(&ack_pkt(Packet::PubRel, 2), now);
    assert!(!s.take_sync(), "an unknown id changes nothing");
    assert!(matches!(
        &sent(&mut s, v)[..],
        [
            Packet::PubAck(_),
            Packet::PubRec(_),
            Packet::PubComp(_),
            Packet::PubComp(_)
        ]
    ));
}
