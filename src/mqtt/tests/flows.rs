//! Whole exchanges between clients through their sessions and the shell
//! stand-in of [`super::pair`]: QoS 1 and 2 both ways, retained messages,
//! wills, keep-alive, persistent sessions resumed with QoS 2 in flight.

use super::pair::World;
use super::*;
use crate::wire::mqtt::Will;

const V3: Version = Version::V311;
const V5: Version = Version::V5;

fn hello(v: Version, id: &str, clean: bool, keep_alive: u16) -> Connect {
    Connect {
        version: v,
        clean_start: clean,
        keep_alive,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

fn ack(kind: fn(Ack) -> Packet, packet_id: u16) -> Packet {
    kind(Ack {
        packet_id,
        code: 0,
        properties: Properties::default(),
    })
}

/// The packets client `i` received, taken.
fn received(w: &mut World, i: usize) -> Vec<Packet> {
    std::mem::take(&mut w.conns[i].client.received)
}

/// A subscriber on `filter` at `qos` and a publisher, both connected.
fn sub_and_pub(filter: &str, qos: QoS) -> (World, usize, usize) {
    let mut w = World::new();
    let sub = w.connect(hello(V5, "sub", true, 30));
    let publ = w.connect(hello(V3, "pub", true, 30));
    w.subscribe(sub, filter, qos);
    received(&mut w, sub);
    received(&mut w, publ);
    (w, sub, publ)
}

#[test]
fn qos1_both_ways_acked_and_window_freed() {
    let (mut w, sub, publ) = sub_and_pub("t/#", QoS::AtLeastOnce);
    w.send(publ, publish(QoS::AtLeastOnce, Some(7), "t/a", b"one"));
    match &received(&mut w, publ)[..] {
        [Packet::PubAck(a)] => assert_eq!((a.packet_id, a.code), (7, 0)),
        other => panic!("expected PUBACK 7, got {other:?}"),
    }
    let got = w.conns[sub].client.publishes();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].qos, got[0].topic.as_str()),
        (QoS::AtLeastOnce, "t/a")
    );
    assert_eq!(got[0].payload, b"one");
    assert!(
        w.conns[sub].session.outbound.is_empty(),
        "the client's PUBACK freed the window"
    );
    // A QoS 2 publish reaches a QoS 1 subscription at QoS 1.
    w.send(publ, publish(QoS::ExactlyOnce, Some(8), "t/b", b"two"));
    let got = w.conns[sub].client.publishes();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    assert_eq!(w.routed.len(), 2);
}

#[test]
fn qos2_both_ways_exactly_once_with_a_resend() {
    let (mut w, sub, publ) = sub_and_pub("t/#", QoS::ExactlyOnce);
    w.conns[publ].client.auto_ack = false;
    w.send(publ, publish(QoS::ExactlyOnce, Some(9), "t/x", b"once"));
    assert!(matches!(&received(&mut w, publ)[..], [Packet::PubRec(a)] if a.packet_id == 9));
    // The publisher missed the PUBREC and resends: answered, not routed.
    let mut dup = publish(QoS::ExactlyOnce, Some(9), "t/x", b"once");
    if let Packet::Publish(p) = &mut dup {
        p.dup = true;
    }
    w.send(publ, dup);
    assert!(matches!(&received(&mut w, publ)[..], [Packet::PubRec(a)] if a.packet_id == 9));
    w.send(publ, ack(Packet::PubRel, 9));
    assert!(matches!(&received(&mut w, publ)[..], [Packet::PubComp(a)] if a.packet_id == 9));
    assert_eq!(w.routed.len(), 1, "routed exactly once");
    assert!(w.conns[publ].session.qos2_in.is_empty());

    // The subscriber's side: PUBLISH, PUBREC (client), PUBREL, PUBCOMP
    // (client).
    let got = received(&mut w, sub);
    match &got[..] {
        [Packet::Publish(p), Packet::PubRel(r)] => {
            assert_eq!(p.qos, QoS::ExactlyOnce);
            assert_eq!(p.packet_id, Some(r.packet_id));
        }
        other => panic!("expected PUBLISH then PUBREL, got {other:?}"),
    }
    assert!(w.conns[sub].session.outbound.is_empty(), "PUBCOMP ended it");
}

#[test]
fn retained_message_on_subscribe() {
    let mut w = World::new();
    let publ = w.connect(hello(V3, "pub", true, 30));
    let mut p = publish(QoS::AtLeastOnce, Some(1), "cfg/a", b"on");
    if let Packet::Publish(x) = &mut p {
        x.retain = true;
    }
    w.send(publ, p);
    let sub = w.connect(hello(V5, "sub", true, 30));
    received(&mut w, sub);
    w.subscribe(sub, "cfg/+", QoS::AtLeastOnce);
    let got = w.conns[sub].client.publishes();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].retain,
        "sent because of the subscription: RETAIN set"
    );
    assert_eq!(
        (got[0].topic.as_str(), &got[0].payload[..]),
        ("cfg/a", &b"on"[..])
    );
    // A live publish after that has RETAIN clear.
    w.send(publ, publish(QoS::AtMostOnce, None, "cfg/a", b"off"));
    let got = w.conns[sub].client.publishes();
    assert!(!got[0].retain);
}

#[test]
fn will_on_keep_alive_timeout_not_on_disconnect() {
    let mut w = World::new();
    let watcher = w.connect(hello(V5, "watch", true, 0));
    w.subscribe(watcher, "will/#", QoS::AtLeastOnce);
    received(&mut w, watcher);
    let mut c = hello(V3, "dev", true, 10);
    c.will = Some(Will {
        topic: "will/dev".into(),
        payload: b"gone".to_vec(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
    });
    let mut polite = c.clone();
    polite.client_id = "polite".into();
    let dev = w.connect(c);
    let polite = w.connect(polite);
    w.send(polite, Packet::Disconnect(Disconnect::default()));
    assert_eq!(w.conns[polite].closed, Some(CloseReason::ClientDisconnect));
    assert!(w.conns[watcher].client.publishes().is_empty(), "no will");

    // Keep-alive 10 s: silent for 1.5 x that closes it.
    w.advance(Duration::from_secs(14));
    assert!(w.conns[dev].closed.is_none());
    w.advance(Duration::from_secs(1));
    assert_eq!(w.conns[dev].closed, Some(CloseReason::KeepAliveTimeout));
    let got = w.conns[watcher].client.publishes();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].topic.as_str(), &got[0].payload[..]),
        ("will/dev", &b"gone"[..])
    );
}

#[test]
fn inbound_qos2_in_flight_survives_a_reconnect() {
    let (mut w, _sub, _) = sub_and_pub("t", QoS::AtMostOnce);
    let dev = w.connect(hello(V3, "dev", false, 30));
    w.conns[dev].client.auto_ack = false;
    received(&mut w, dev);
    w.send(dev, publish(QoS::ExactlyOnce, Some(3), "t", b"x"));
    assert!(matches!(&received(&mut w, dev)[..], [Packet::PubRec(_)]));
    w.drop_socket(dev);
    assert_eq!(
        w.saved["dev"].qos2_in,
        vec![3],
        "saved before the PUBREC left"
    );

    let dev = w.connect(hello(V3, "dev", false, 30));
    w.conns[dev].client.auto_ack = false;
    match &received(&mut w, dev)[..] {
        [Packet::ConnAck(c)] => assert!(c.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let mut dup = publish(QoS::ExactlyOnce, Some(3), "t", b"x");
    if let Packet::Publish(p) = &mut dup {
        p.dup = true;
    }
    w.send(dev, dup);
    assert!(matches!(&received(&mut w, dev)[..], [Packet::PubRec(a)] if a.packet_id == 3));
    assert_eq!(w.routed.len(), 1, "the resend is not routed again");
    w.send(dev, ack(Packet::PubRel, 3));
    assert!(matches!(&received(&mut w, dev)[..], [Packet::PubComp(_)]));
    assert!(w.saved["dev"].qos2_in.is_empty(), "its removal saved too");
}

/// A persistent QoS 2 subscriber that does not acknowledge by itself,
/// with one QoS 2 message of the log delivered to it: (world, its index,
/// the packet id).
fn persistent_sub_with_a_qos2_message() -> (World, usize, u16) {
    let mut w = World::new();
    let sub = w.connect(hello(V3, "ps", false, 30));
    w.conns[sub].client.auto_ack = false;
    w.subscribe(sub, "t", QoS::ExactlyOnce);
    received(&mut w, sub);
    let publ = w.connect(hello(V3, "pub", true, 30));
    w.send(publ, publish(QoS::ExactlyOnce, Some(1), "t", b"m"));
    let got = w.conns[sub].client.publishes();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos, QoS::ExactlyOnce);
    assert!(!got[0].dup);
    let id = got[0].packet_id.expect("QoS 2 has a packet id");
    assert_eq!(w.saved["ps"].cursors[0].qos2, vec![(1, id, false)]);
    (w, sub, id)
}

#[test]
fn outbound_qos2_unacknowledged_is_resent_with_dup_and_its_id() {
    let (mut w, sub, id) = persistent_sub_with_a_qos2_message();
    w.drop_socket(sub);
    let sub = w.connect(hello(V3, "ps", false, 30));
    w.conns[sub].client.auto_ack = false;
    let got = w.conns[sub].client.publishes();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].dup);
    assert_eq!(got[0].packet_id, Some(id));
    w.send(sub, ack(Packet::PubRec, id));
    assert!(matches!(&received(&mut w, sub)[..], [Packet::PubRel(a)] if a.packet_id == id));
    w.send(sub, ack(Packet::PubComp, id));
    let cursor = &w.saved["ps"].cursors[0];
    assert_eq!((cursor.acked, cursor.qos2.len()), (1, 0));
}

#[test]
fn outbound_qos2_pubrecd_gets_only_a_pubrel_after_a_reconnect() {
    let (mut w, sub, id) = persistent_sub_with_a_qos2_message();
    w.send(sub, ack(Packet::PubRec, id));
    assert!(matches!(&received(&mut w, sub)[..], [Packet::PubRel(_)]));
    assert_eq!(w.saved["ps"].cursors[0].qos2, vec![(1, id, true)]);
    w.drop_socket(sub);
    let sub = w.connect(hello(V3, "ps", false, 30));
    w.conns[sub].client.auto_ack = false;
    match &received(&mut w, sub)[..] {
        [Packet::ConnAck(c), Packet::PubRel(r)] => {
            assert!(c.session_present);
            assert_eq!(r.packet_id, id);
        }
        other => panic!("expected CONNACK and PUBREL, got {other:?}"),
    }
    w.send(sub, ack(Packet::PubComp, id));
    assert!(
        w.conns[sub].client.publishes().is_empty(),
        "never sent twice"
    );
    assert!(w.saved["ps"].cursors[0].qos2.is_empty());
}
