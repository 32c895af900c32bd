//! MQTT 5 conformance (issue 14): session resumption, overlapping
//! subscriptions, will timing, subscription options, session expiry
//! precision, Receive Maximum with QoS 2, topic alias 0. Each test drives
//! frond with a real v5 client — rumqttc where it can express the case, a
//! raw client on a TCP socket where the test needs exact packets — and
//! asserts the packets and deliveries exactly.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::mqtt5::*;
use common::*;
use frond::wire::mqtt::{
    Ack, Disconnect, Packet, Properties, Publish, QoS as WQoS, SubscriptionOptions, Unsubscribe,
    Will,
};
use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Filter};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use tokio::io::AsyncWriteExt;

/// The deliveries `sub` receives (acknowledging QoS 1 ones) until the
/// marker `publ` publishes to `end` after everything else (`sub` must
/// subscribe to `end`): from one publisher, deliveries keep their order.
async fn until_marker(sub: &mut Raw, publ: &mut Raw, marker_id: u16) -> Vec<Publish> {
    publ.publish_q1(marker_id, "end", false, b"end").await;
    let mut got = Vec::new();
    loop {
        let p = publish_of(sub.recv().await);
        if let (WQoS::AtLeastOnce, Some(id)) = (p.qos, p.packet_id) {
            sub.send(&Packet::PubAck(Ack {
                packet_id: id,
                code: 0,
                properties: Properties::default(),
            }))
            .await;
        }
        if p.topic == "end" {
            return got;
        }
        got.push(p);
    }
}

/// (topic, QoS, RETAIN, subscription identifiers, payload) of a delivery.
fn summary(p: &Publish) -> (String, u8, bool, Vec<u32>, Vec<u8>) {
    (
        p.topic.clone(),
        p.qos as u8,
        p.retain,
        p.properties.subscription_identifiers.clone(),
        p.payload.clone(),
    )
}

fn s(
    topic: &str,
    qos: u8,
    retain: bool,
    ids: &[u32],
    payload: &[u8],
) -> (String, u8, bool, Vec<u32>, Vec<u8>) {
    (topic.into(), qos, retain, ids.to_vec(), payload.to_vec())
}

fn pubrel(id: u16) -> Packet {
    Packet::PubRel(Ack {
        packet_id: id,
        code: 0,
        properties: Properties::default(),
    })
}

// ---------------------------------------------------------------------------
// 1. Clean Start 0 resumes an existing session whatever the new expiry.

/// A rumqttc v5 client with clean start 0 (the CONNACK's session present
/// flag is `present`).
async fn rumq(port: u16, id: &str, expiry: Option<u32>) -> V5 {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_start(false);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_connect_properties(ConnectProperties {
        session_expiry_interval: expiry,
        ..Default::default()
    });
    V5::connect_with(opts).await
}

/// A delivery's payload as text.
async fn next_text(c: &mut V5) -> String {
    String::from_utf8(c.next().await.payload.to_vec()).unwrap()
}

#[tokio::test]
async fn clean_start_0_resumes_a_session_without_session_expiry() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let mut c = rumq(f.mqtt_port, "resume-me", Some(99_999)).await;
    assert!(!c.present);
    c.client
        .subscribe("telemetry/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    c.suback().await;
    c.disconnect().await;
    let mut probe = Raw::plain(f.mqtt_port, "resume-probe").await;
    probe.publish_q1(1, "telemetry/a", false, b"m1").await;
    probe.publish_q1(2, "telemetry/b", false, b"m2").await;
    // Clean start 0 without a Session Expiry Interval: resumed.
    let mut c = rumq(f.mqtt_port, "resume-me", None).await;
    assert!(c.present, "session present = 1 [MQTT-3.2.2-3]");
    assert_eq!(
        [next_text(&mut c).await, next_text(&mut c).await],
        ["m1", "m2"],
        "the queued messages, in order"
    );
    // Expiry 0 now: the session ends with this connection.
    c.disconnect().await;
    let c = rumq(f.mqtt_port, "resume-me", Some(60)).await;
    assert!(
        !c.present,
        "the session ended when the expiry-0 connection closed"
    );
}

#[tokio::test]
async fn clean_start_0_with_session_expiry_0_resumes_too() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let expiry = |s| Properties {
        session_expiry_interval: Some(s),
        ..Properties::default()
    };
    let (mut c, ack) = Raw::connect(
        f.mqtt_port,
        connect_packet("resume-0", false, expiry(600), None),
    )
    .await;
    assert!(!ack.session_present);
    c.subscribe(1, "telemetry/z", WQoS::AtLeastOnce, Some(4))
        .await;
    c.send(&Packet::Disconnect(Disconnect::default())).await;
    assert_eq!(c.recv_or_eof().await, None);
    let mut p = Raw::plain(f.mqtt_port, "resume-0-pub").await;
    p.publish_q1(1, "telemetry/z", false, b"queued").await;
    let (mut c, ack) = Raw::connect(
        f.mqtt_port,
        connect_packet("resume-0", false, expiry(0), None),
    )
    .await;
    assert!(ack.session_present, "session present = 1 [MQTT-3.2.2-3]");
    let got = publish_of(c.recv().await);
    assert_eq!(summary(&got), s("telemetry/z", 1, false, &[4], b"queued"));
}

// ---------------------------------------------------------------------------
// 2. Subscriptions are keyed by the MQTT filter the client sent.

#[tokio::test]
async fn overlapping_subscriptions_are_separate() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let mut sub = Raw::plain(f.mqtt_port, "ov-sub").await;
    sub.subscribe(9, "end", WQoS::AtMostOnce, None).await;
    sub.subscribe(1, "ov", WQoS::AtLeastOnce, Some(2)).await;
    // Adding `ov/#` at QoS 0 does not downgrade `ov` [MQTT-3.8.4-3].
    sub.subscribe(2, "ov/#", WQoS::AtMostOnce, Some(3)).await;
    let mut publ = Raw::plain(f.mqtt_port, "ov-pub").await;
    publ.publish_q1(1, "ov", false, b"a").await;
    publ.publish_q1(2, "ov/x", false, b"b").await;
    let got = until_marker(&mut sub, &mut publ, 100).await;
    let summaries: Vec<_> = got.iter().map(summary).collect();
    // One PUBLISH for both matches, with both identifiers, at the highest
    // QoS [MQTT-3.3.4-2], [MQTT-3.3.4-4].
    assert_eq!(
        summaries,
        vec![
            s("ov", 1, false, &[2, 3], b"a"),
            s("ov/x", 0, false, &[3], b"b")
        ]
    );
    // UNSUBSCRIBE `ov/#` leaves `ov` [MQTT-3.10.4-1].
    sub.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 3,
        filters: vec!["ov/#".into()],
        properties: Properties::default(),
    }))
    .await;
    match sub.recv().await {
        Packet::UnsubAck(u) => assert_eq!((u.packet_id, u.codes), (3, vec![0])),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    publ.publish_q1(3, "ov", false, b"c").await;
    publ.publish_q1(4, "ov/y", false, b"d").await;
    let got = until_marker(&mut sub, &mut publ, 101).await;
    let summaries: Vec<_> = got.iter().map(summary).collect();
    assert_eq!(summaries, vec![s("ov", 1, false, &[2], b"c")]);
    // Re-subscribing `ov/#` at QoS 0, then `ov` at QoS 0 too: both QoS 0.
    sub.subscribe(4, "ov/#", WQoS::AtMostOnce, None).await;
    sub.subscribe(5, "ov", WQoS::AtMostOnce, None).await;
    publ.publish_q1(5, "ov", false, b"e").await;
    let got = until_marker(&mut sub, &mut publ, 102).await;
    let summaries: Vec<_> = got.iter().map(summary).collect();
    assert_eq!(summaries, vec![s("ov", 0, false, &[], b"e")]);
}

// ---------------------------------------------------------------------------
// 3. The will delay is capped by the end of the session.

/// Connect with a will (delay 5 s) and session `expiry`, then DISCONNECT
/// 0x04 (with will) setting the expiry to `new_expiry` if given; returns
/// how long the will took to reach a subscriber.
async fn will_after(f: &Frond, id: &str, expiry: Option<u32>, new_expiry: Option<u32>) -> Duration {
    let topic = format!("will/{id}");
    let mut watch = Raw::plain(f.mqtt_port, &format!("{id}-watch")).await;
    watch.subscribe(1, &topic, WQoS::AtMostOnce, None).await;
    let will = Will {
        topic: topic.clone(),
        payload: b"gone".to_vec(),
        qos: WQoS::AtMostOnce,
        retain: false,
        properties: Properties {
            will_delay_interval: Some(5),
            ..Properties::default()
        },
    };
    let props = Properties {
        session_expiry_interval: expiry,
        ..Properties::default()
    };
    let (mut c, _) = Raw::connect(f.mqtt_port, connect_packet(id, true, props, Some(will))).await;
    c.send(&Packet::Disconnect(Disconnect {
        code: 0x04,
        properties: Properties {
            session_expiry_interval: new_expiry,
            ..Properties::default()
        },
    }))
    .await;
    let at = Instant::now();
    assert_eq!(c.recv_or_eof().await, None, "closed after DISCONNECT");
    let p = publish_of(watch.recv().await);
    assert_eq!(
        (p.topic.as_str(), p.payload.as_slice()),
        (topic.as_str(), &b"gone"[..])
    );
    at.elapsed()
}

#[tokio::test]
async fn will_delay_is_capped_by_the_session_expiry() {
    let f = Frond::start_new(FrondSpec::default()).await;
    // Session expiry 0: the session ends at the disconnect, the will goes
    // at once [MQTT-3.1.2-8], §3.1.3.2.2.
    let t = will_after(&f, "w0", None, None).await;
    assert!(
        t < Duration::from_millis(1500),
        "expiry 0: at once, took {t:?}"
    );
    // Expiry 2: the session ends after 2 s, before the 5 s will delay.
    let t = will_after(&f, "w2", Some(2), None).await;
    assert!(
        t >= Duration::from_secs(2) && t < Duration::from_millis(3500),
        "expiry 2: took {t:?}"
    );
    // A DISCONNECT that sets the expiry to 1 moves the will to 1 s.
    let t = will_after(&f, "w1", Some(60), Some(1)).await;
    assert!(
        t >= Duration::from_secs(1) && t < Duration::from_millis(2500),
        "expiry 1 at DISCONNECT: took {t:?}"
    );
}

// ---------------------------------------------------------------------------
// 4. No Local and Retain As Published.

#[tokio::test]
async fn no_local_and_retain_as_published() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let mut a = Raw::plain(f.mqtt_port, "nl-a").await;
    a.subscribe(9, "end", WQoS::AtMostOnce, None).await;
    let nl = SubscriptionOptions {
        qos: WQoS::AtLeastOnce,
        no_local: true,
        ..SubscriptionOptions::default()
    };
    assert_eq!(a.subscribe_with(1, "nl/t", nl, Some(1)).await, vec![1]);
    let rap = SubscriptionOptions {
        qos: WQoS::AtLeastOnce,
        retain_as_published: true,
        retain_handling: 2,
        ..SubscriptionOptions::default()
    };
    assert_eq!(a.subscribe_with(2, "rap/+", rap, Some(2)).await, vec![1]);
    let mut b = Raw::plain(f.mqtt_port, "nl-b").await;
    b.subscribe(9, "end", WQoS::AtMostOnce, None).await;
    let plain = SubscriptionOptions {
        qos: WQoS::AtLeastOnce,
        retain_handling: 2,
        ..SubscriptionOptions::default()
    };
    assert_eq!(b.subscribe_with(1, "rap/+", plain, None).await, vec![1]);
    // A's own publish does not come back on its No Local subscription
    // [MQTT-3.8.3-3]; B's does.
    a.publish_q1(10, "nl/t", false, b"own").await;
    b.publish_q1(10, "nl/t", false, b"other").await;
    // Retain As Published keeps RETAIN = 1 on a live delivery
    // [MQTT-3.3.1-13]; without it RETAIN is 0 [MQTT-3.3.1-12].
    b.publish_q1(11, "rap/x", true, b"kept").await;
    a.publish_q1(11, "rap/y", false, b"plain").await;
    let got = until_marker(&mut a, &mut b, 100).await;
    let summaries: Vec<_> = got.iter().map(summary).collect();
    assert_eq!(
        summaries,
        vec![
            s("nl/t", 1, false, &[1], b"other"),
            s("rap/x", 1, true, &[2], b"kept"),
            s("rap/y", 1, false, &[2], b"plain"),
        ]
    );
    let got = until_marker(&mut b, &mut a, 101).await;
    let summaries: Vec<_> = got.iter().map(summary).collect();
    assert_eq!(
        summaries,
        vec![
            s("rap/x", 1, false, &[], b"kept"),
            s("rap/y", 1, false, &[], b"plain")
        ]
    );
}

#[tokio::test]
async fn no_local_and_retain_as_published_hold_for_a_persistent_session() {
    let f = Frond::start_new(FrondSpec::default()).await;
    // rumqttc with No Local and Retain As Published filters on captured
    // subjects, in a persistent session: its messages come from the
    // TELEMETRY stream, not the router.
    let mut c = rumq(f.mqtt_port, "nl-persist", Some(600)).await;
    let mut nl = Filter::new("telemetry/nl", QoS::AtLeastOnce);
    nl.nolocal = true;
    let mut rap = Filter::new("telemetry/rap", QoS::AtLeastOnce);
    rap.preserve_retain = true;
    let plain = Filter::new("telemetry/plain", QoS::AtLeastOnce);
    c.client.subscribe_many([nl, rap, plain]).await.unwrap();
    c.suback().await;
    c.client
        .publish("telemetry/nl", QoS::AtLeastOnce, false, "own")
        .await
        .unwrap();
    assert_eq!(c.puback().await, "Success");
    let mut other = Raw::plain(f.mqtt_port, "nl-persist-other").await;
    other.publish_q1(1, "telemetry/nl", false, b"after").await;
    other.publish_q1(2, "telemetry/rap", true, b"r1").await;
    other.publish_q1(3, "telemetry/rap", false, b"r0").await;
    other.publish_q1(4, "telemetry/plain", true, b"p").await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let p = c.next().await;
        got.push((String::from_utf8(p.payload.to_vec()).unwrap(), p.retain));
    }
    let want = [("after", false), ("r1", true), ("r0", false), ("p", false)];
    let want: Vec<_> = want.iter().map(|(p, r)| (p.to_string(), *r)).collect();
    // Not its own message [MQTT-3.8.3-3]; RETAIN kept only with Retain
    // As Published [MQTT-3.3.1-12], [MQTT-3.3.1-13].
    assert_eq!(got, want);
}

// ---------------------------------------------------------------------------
// 5. Session expiry in milliseconds.

#[tokio::test]
async fn session_expiry_is_measured_in_milliseconds() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let props = Properties {
        session_expiry_interval: Some(600),
        ..Properties::default()
    };
    let (mut c, _) = Raw::connect(
        f.mqtt_port,
        connect_packet("ms", false, props.clone(), None),
    )
    .await;
    c.subscribe(1, "telemetry/ms", WQoS::AtLeastOnce, None)
        .await;
    // Disconnect late in a wall-clock second (.85–.95 s), setting the
    // expiry to 5 s, so that whole seconds would expire the session 4.1 s
    // later. Waiting for the clock is what this test is about.
    loop {
        let sub = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_millis();
        if (850..950).contains(&sub) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.send(&Packet::Disconnect(Disconnect {
        code: 0,
        properties: Properties {
            session_expiry_interval: Some(5),
            ..Properties::default()
        },
    }))
    .await;
    let at = Instant::now();
    assert_eq!(c.recv_or_eof().await, None);
    wait_elapsed(at, Duration::from_millis(4200)).await;
    let (_c, ack) = Raw::connect(f.mqtt_port, connect_packet("ms", false, props, None)).await;
    assert!(
        ack.session_present,
        "4.2 s after a DISCONNECT with expiry 5 the session is there"
    );
}

// ---------------------------------------------------------------------------
// 6. Receive Maximum counts QoS 2 publishes awaiting PUBREL.

#[tokio::test]
async fn receive_maximum_counts_qos2_awaiting_pubrel() {
    let spec = FrondSpec {
        mqtt_config: "max_inflight = 4\n".into(),
        ..FrondSpec::default()
    };
    let f = Frond::start_new(spec).await;
    let (mut c, ack) = Raw::connect(
        f.mqtt_port,
        connect_packet("rm2", true, Properties::default(), None),
    )
    .await;
    assert_eq!(ack.properties.receive_maximum, Some(4));
    let q2 = |id: u16| {
        Packet::Publish(Publish {
            dup: false,
            qos: WQoS::ExactlyOnce,
            retain: false,
            topic: "rm2/t".into(),
            packet_id: Some(id),
            properties: Properties::default(),
            payload: vec![id as u8],
        })
    };
    for id in 1..=4 {
        c.send(&q2(id)).await;
        match c.recv().await {
            Packet::PubRec(a) => assert_eq!((a.packet_id, a.code), (id, 0)),
            other => panic!("expected PUBREC, got {other:?}"),
        }
    }
    // One completed frees one place.
    c.send(&pubrel(1)).await;
    match c.recv().await {
        Packet::PubComp(a) => assert_eq!(a.packet_id, 1),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    c.send(&q2(5)).await;
    assert!(matches!(c.recv().await, Packet::PubRec(a) if a.packet_id == 5));
    // A resent duplicate is not a new one.
    c.send(&q2(5)).await;
    assert!(matches!(c.recv().await, Packet::PubRec(a) if a.packet_id == 5));
    // The fifth unfinished one exceeds the Receive Maximum (§3.3.4, §4.9).
    c.send(&q2(6)).await;
    match c.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.code, 0x93, "Receive Maximum exceeded"),
        other => panic!("expected DISCONNECT 0x93, got {other:?}"),
    }
    assert_eq!(c.recv_or_eof().await, None);
}

#[tokio::test]
async fn pubrel_of_an_unknown_packet_id_is_0x92() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let mut c = Raw::plain(f.mqtt_port, "rel").await;
    c.send(&pubrel(77)).await;
    match c.recv().await {
        Packet::PubComp(a) => assert_eq!((a.packet_id, a.code), (77, 0x92), "§3.7.2.1"),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 7. Topic Alias 0.

#[tokio::test]
async fn topic_alias_0_is_topic_alias_invalid() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let mut c = Raw::plain(f.mqtt_port, "alias0").await;
    // PUBLISH QoS 0 to `a` with Topic Alias 0, written by hand.
    let bytes = [0x30, 8, 0, 1, b'a', 3, 0x23, 0, 0, b'x'];
    c.sock.write_all(&bytes).await.unwrap();
    match c.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.code, 0x94, "Topic Alias invalid (§3.3.2.3.4)"),
        other => panic!("expected DISCONNECT 0x94, got {other:?}"),
    }
    assert_eq!(c.recv_or_eof().await, None);
}

// ---------------------------------------------------------------------------
// DISCONNECT reason codes frond sends on its own.

#[tokio::test]
async fn takeover_and_shutdown_are_told_with_their_reason_codes() {
    let mut f = Frond::start_new(FrondSpec::default()).await;
    let mut old = Raw::plain(f.mqtt_port, "taken").await;
    let mut new = Raw::plain(f.mqtt_port, "taken").await;
    // [MQTT-3.1.4-3]: DISCONNECT 0x8E to the existing client.
    match old.recv_or_eof().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, 0x8E, "Session taken over"),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert_eq!(old.recv_or_eof().await, None);
    f.terminate();
    match new.recv_or_eof().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, 0x8B, "Server shutting down"),
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
}
