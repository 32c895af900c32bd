//! QoS 2 end to end across frond crashes (SIGKILL), with rumqttc (v5 API)
//! and a raw client on frond's own codec where the test must decide
//! exactly when PUBREC, PUBREL and PUBCOMP go out:
//! - stored messages keep the publisher's QoS 2 for persistent sessions;
//! - outbound QoS 2 state (PUBREL owed, PUBLISH unanswered) survives a
//!   restart with its packet ids;
//! - inbound QoS 2 ids survive a restart (a resent PUBLISH is not stored
//!   twice);
//! - a 5.0 DISCONNECT changes the session expiry (or is a protocol error);
//! - a will owed at a crash keeps its MQTT 5 properties.

mod common;

use std::time::Duration;

use common::*;
use frond::wire::mqtt::{
    self, Ack, ConnAck, Connect, Disconnect, Packet, Properties, Publish, QoS as WQoS, Subscribe,
    SubscriptionOptions, Version, Will,
};
use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Packet as RPacket};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// A raw MQTT client (3.1.1 or 5.0) on frond's codec.

struct Raw {
    sock: TcpStream,
    buf: Vec<u8>,
    v: Version,
}

struct Opts {
    v: Version,
    clean: bool,
    expiry: Option<u32>,
    will: Option<Will>,
}

impl Opts {
    fn persistent(v: Version) -> Opts {
        Opts {
            v,
            clean: false,
            expiry: (v == Version::V5).then_some(3600),
            will: None,
        }
    }
}

impl Raw {
    async fn connect(port: u16, id: &str, o: Opts) -> (Raw, ConnAck) {
        let sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut raw = Raw {
            sock,
            buf: Vec::new(),
            v: o.v,
        };
        raw.send(&Packet::Connect(Connect {
            version: o.v,
            clean_start: o.clean,
            keep_alive: 30,
            client_id: id.into(),
            will: o.will,
            username: None,
            password: None,
            properties: Properties {
                session_expiry_interval: o.expiry,
                ..Properties::default()
            },
        }))
        .await;
        match raw.recv().await {
            Packet::ConnAck(c) => {
                assert_eq!(c.code, 0, "CONNACK accepted");
                (raw, c)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, p: &Packet) {
        let mut out = Vec::new();
        mqtt::encode(p, self.v, &mut out).unwrap();
        self.sock.write_all(&out).await.unwrap();
    }

    /// The next packet, or `None` when frond closed the connection.
    async fn try_recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(T, async {
            loop {
                if let Some((p, used)) = mqtt::decode(&self.buf, Some(self.v), usize::MAX).unwrap()
                {
                    self.buf.drain(..used);
                    return Some(p);
                }
                let mut chunk = [0u8; 4096];
                match self.sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("a packet (or the end of the connection) within 10 s")
    }

    async fn recv(&mut self) -> Packet {
        self.try_recv().await.expect("frond closed the connection")
    }

    async fn subscribe(&mut self, filter: &str, qos: WQoS) {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                filter.into(),
                SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            )],
            properties: Properties::default(),
        }))
        .await;
        match self.recv().await {
            Packet::SubAck(s) => assert_eq!(s.codes, vec![qos as u8], "granted"),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    async fn ack(&mut self, kind: fn(Ack) -> Packet, packet_id: u16) {
        self.send(&kind(Ack {
            packet_id,
            ..Ack::default()
        }))
        .await;
    }

    /// DISCONNECT (with `props`), then wait until frond closed the
    /// connection (it has written the session by then).
    async fn disconnect(mut self, props: Properties) {
        self.send(&Packet::Disconnect(Disconnect {
            code: 0,
            properties: props,
        }))
        .await;
        while self.try_recv().await.is_some() {}
    }
}

fn publish_of(p: Packet) -> Publish {
    match p {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

// ---------------------------------------------------------------------------
// rumqttc v5 QoS 2 publisher with a persistent session.

async fn publish_qos2(port: u16, id: &str, topic: &str, payloads: &[String]) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_clean_start(false);
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(3600);
    opts.set_connect_properties(props);
    let (client, mut el) = AsyncClient::new(opts, 64);
    let list = payloads.to_vec();
    let topic = topic.to_string();
    let c2 = client.clone();
    tokio::spawn(async move {
        for p in list {
            c2.publish(&topic, QoS::ExactlyOnce, false, p)
                .await
                .unwrap();
        }
    });
    let mut done = 0;
    while done < payloads.len() {
        match tokio::time::timeout(T, el.poll()).await {
            Ok(Ok(Event::Incoming(RPacket::PubComp(_)))) => done += 1,
            Ok(Ok(_)) => {}
            other => panic!("{id}: publishing failed after {done} PUBCOMPs: {other:?}"),
        }
    }
    client.disconnect().await.unwrap();
    while let Ok(Ok(ev)) = tokio::time::timeout(T, el.poll()).await {
        if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
}

// ---------------------------------------------------------------------------

/// A QoS 2 publisher's messages wait in the stream for an offline QoS 2
/// persistent subscriber; frond is killed and restarted; the subscriber
/// (rumqttc) gets every message at QoS 2, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_qos2_backlog_survives_sigkill_at_qos2_once_in_order() {
    let mut frond = Frond::start_new(FrondSpec::default()).await;
    let port = frond.mqtt_port;

    let (mut sub, c) = Raw::connect(port, "q2-sub", Opts::persistent(Version::V5)).await;
    assert!(!c.session_present);
    sub.subscribe("telemetry/q2/#", WQoS::ExactlyOnce).await;
    sub.disconnect(Properties::default()).await;

    let n = 300;
    let want: Vec<String> = (0..n).map(|i| payload("q2", i)).collect();
    publish_qos2(port, "q2-pub", "telemetry/q2/a", &want).await;
    frond.kill9();
    frond.start().await;

    let mut opts = MqttOptions::new("q2-sub", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_clean_start(false);
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(3600);
    opts.set_connect_properties(props);
    let (_client, mut el) = AsyncClient::new(opts, 64);
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(RPacket::ConnAck(c))) => {
                    assert!(c.session_present, "session present after the restart");
                }
                Ok(Event::Incoming(RPacket::Publish(p))) => {
                    let s = String::from_utf8_lossy(&p.payload).into_owned();
                    if tx.send((s, p.qos)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber failed: {e}"),
            }
        }
    });
    let mut got = Vec::new();
    for _ in 0..n {
        let (p, qos) = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        assert_eq!(qos, QoS::ExactlyOnce, "{p} delivered at QoS 2");
        got.push(p);
    }
    assert_eq!(got, want, "every message, in order, once");
    // Nothing else pending: the next message is a new one.
    publish_qos2(port, "q2-pub", "telemetry/q2/a", &["end".to_string()]).await;
    let (p, qos) = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert_eq!((p.as_str(), qos), ("end", QoS::ExactlyOnce));
}

/// A QoS 2 message PUBREC'd by the subscriber (frond answered PUBREL)
/// and one not yet answered, then SIGKILL: after the restart frond sends
/// PUBREL for the first (not the message) and resends the second with DUP
/// and its packet id; neither comes again afterwards, not even after one
/// more restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_qos2_state_survives_sigkill() {
    let mut frond = Frond::start_new(FrondSpec::default()).await;
    let port = frond.mqtt_port;
    let v = Version::V311;

    let (mut sub, _) = Raw::connect(port, "rel-sub", Opts::persistent(v)).await;
    sub.subscribe("telemetry/rel/#", WQoS::ExactlyOnce).await;
    publish_qos2(
        port,
        "rel-pub",
        "telemetry/rel/a",
        &["m1".into(), "m2".into()],
    )
    .await;
    let m1 = publish_of(sub.recv().await);
    let m2 = publish_of(sub.recv().await);
    assert_eq!(
        (text(&m1).as_str(), m1.qos, m1.dup),
        ("m1", WQoS::ExactlyOnce, false)
    );
    assert_eq!((text(&m2).as_str(), m2.qos), ("m2", WQoS::ExactlyOnce));
    let (id1, id2) = (m1.packet_id.unwrap(), m2.packet_id.unwrap());
    sub.ack(Packet::PubRec, id1).await;
    match sub.recv().await {
        Packet::PubRel(a) => assert_eq!(a.packet_id, id1),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    // PUBCOMP never sent; m2 never answered.
    frond.kill9();
    drop(sub);
    frond.start().await;

    let (mut sub, c) = Raw::connect(port, "rel-sub", Opts::persistent(v)).await;
    assert!(c.session_present);
    let mut rel = None;
    let mut resent = None;
    for _ in 0..2 {
        match sub.recv().await {
            Packet::PubRel(a) => rel = Some(a.packet_id),
            Packet::Publish(p) => resent = Some(p),
            other => panic!("expected PUBREL and PUBLISH, got {other:?}"),
        }
    }
    assert_eq!(rel, Some(id1), "PUBREL owed for the PUBREC'd message");
    let resent = resent.expect("the unanswered message again");
    assert_eq!(text(&resent), "m2");
    assert_eq!(
        (resent.packet_id, resent.dup, resent.qos),
        (Some(id2), true, WQoS::ExactlyOnce),
        "resent with DUP and the same packet id"
    );
    sub.ack(Packet::PubComp, id1).await;
    sub.ack(Packet::PubRec, id2).await;
    match sub.recv().await {
        Packet::PubRel(a) => assert_eq!(a.packet_id, id2),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    sub.ack(Packet::PubComp, id2).await;

    // The next message is a new one.
    publish_qos2(port, "rel-pub", "telemetry/rel/a", &["m3".into()]).await;
    let m3 = publish_of(sub.recv().await);
    assert_eq!((text(&m3).as_str(), m3.dup), ("m3", false));
    let id3 = m3.packet_id.unwrap();
    sub.ack(Packet::PubRec, id3).await;
    assert!(matches!(sub.recv().await, Packet::PubRel(a) if a.packet_id == id3));
    sub.ack(Packet::PubComp, id3).await;
    sub.disconnect(Properties::default()).await;

    // And after one more crash, nothing of it comes back.
    frond.kill9();
    frond.start().await;
    let (mut sub, c) = Raw::connect(port, "rel-sub", Opts::persistent(v)).await;
    assert!(c.session_present);
    publish_qos2(port, "rel-pub", "telemetry/rel/a", &["m4".into()]).await;
    let next = publish_of(sub.recv().await);
    assert_eq!(
        (text(&next).as_str(), next.dup),
        ("m4", false),
        "no PUBREL, no resend"
    );
}

/// An inbound QoS 2 PUBLISH is PUBREC'd, frond is killed before PUBREL,
/// the publisher resends it (DUP) after the restart: answered, not stored
/// again. A persistent subscriber gets it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_qos2_id_survives_sigkill() {
    let mut frond = Frond::start_new(FrondSpec::default()).await;
    let port = frond.mqtt_port;
    let v = Version::V311;

    let (mut sub, _) = Raw::connect(port, "in-sub", Opts::persistent(v)).await;
    sub.subscribe("telemetry/in/#", WQoS::AtLeastOnce).await;
    sub.disconnect(Properties::default()).await;

    let (mut publ, _) = Raw::connect(port, "in-pub", Opts::persistent(v)).await;
    let first = Publish {
        dup: false,
        qos: WQoS::ExactlyOnce,
        retain: false,
        topic: "telemetry/in/a".into(),
        packet_id: Some(9),
        properties: Properties::default(),
        payload: b"once".to_vec(),
    };
    publ.send(&Packet::Publish(first.clone())).await;
    assert!(matches!(publ.recv().await, Packet::PubRec(a) if a.packet_id == 9));
    frond.kill9();
    drop(publ);
    frond.start().await;

    let (mut publ, c) = Raw::connect(port, "in-pub", Opts::persistent(v)).await;
    assert!(c.session_present);
    publ.send(&Packet::Publish(Publish {
        dup: true,
        ..first.clone()
    }))
    .await;
    assert!(matches!(publ.recv().await, Packet::PubRec(a) if a.packet_id == 9));
    publ.ack(Packet::PubRel, 9).await;
    assert!(matches!(publ.recv().await, Packet::PubComp(a) if a.packet_id == 9));
    // The id is free again: reused for a new message, which is stored.
    publ.send(&Packet::Publish(Publish {
        payload: b"next".to_vec(),
        ..first.clone()
    }))
    .await;
    assert!(matches!(publ.recv().await, Packet::PubRec(a) if a.packet_id == 9));
    publ.ack(Packet::PubRel, 9).await;
    assert!(matches!(publ.recv().await, Packet::PubComp(a) if a.packet_id == 9));

    let (mut sub, _) = Raw::connect(port, "in-sub", Opts::persistent(v)).await;
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("next") {
        let p = publish_of(sub.recv().await);
        sub.ack(Packet::PubAck, p.packet_id.unwrap()).await;
        got.push(text(&p));
    }
    assert_eq!(
        got,
        vec!["once".to_string(), "next".to_string()],
        "stored once"
    );
}

/// MQTT 5 DISCONNECT with a Session Expiry Interval: 3600 -> 0 ends the
/// session; no property keeps it; setting one after CONNECT had 0 is a
/// protocol error (DISCONNECT 0x82).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_disconnect_session_expiry() {
    let frond = Frond::start_new(FrondSpec::default()).await;
    let port = frond.mqtt_port;
    let v = Version::V5;

    let (mut s, c) = Raw::connect(port, "exp", Opts::persistent(v)).await;
    assert!(!c.session_present);
    s.subscribe("telemetry/exp", WQoS::AtLeastOnce).await;
    s.disconnect(Properties::default()).await;
    let (s, c) = Raw::connect(port, "exp", Opts::persistent(v)).await;
    assert!(c.session_present, "kept without a DISCONNECT expiry");
    s.disconnect(Properties {
        session_expiry_interval: Some(0),
        ..Properties::default()
    })
    .await;
    let (s, c) = Raw::connect(port, "exp", Opts::persistent(v)).await;
    assert!(!c.session_present, "DISCONNECT set the expiry to 0");
    s.disconnect(Properties::default()).await;

    // CONNECT with 0, DISCONNECT with 60: protocol error, and the will
    // goes out (it was not a valid DISCONNECT).
    let (mut watch, _) = Raw::connect(
        port,
        "exp-watch",
        Opts {
            v,
            clean: true,
            expiry: None,
            will: None,
        },
    )
    .await;
    watch.subscribe("exp/will", WQoS::AtMostOnce).await;
    let (mut s, _) = Raw::connect(
        port,
        "exp0",
        Opts {
            v,
            clean: true,
            expiry: None,
            will: Some(Will {
                topic: "exp/will".into(),
                payload: b"gone".to_vec(),
                qos: WQoS::AtMostOnce,
                retain: false,
                properties: Properties::default(),
            }),
        },
    )
    .await;
    s.send(&Packet::Disconnect(Disconnect {
        code: 0,
        properties: Properties {
            session_expiry_interval: Some(60),
            ..Properties::default()
        },
    }))
    .await;
    match s.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.code, 0x82, "protocol error"),
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
    assert!(s.try_recv().await.is_none(), "and the connection closes");
    assert_eq!(text(&publish_of(watch.recv().await)), "gone");
}

/// A will with MQTT 5 properties owed when frond is killed is published
/// after the restart with those properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_properties_survive_sigkill() {
    let mut frond = Frond::start_new(FrondSpec::default()).await;
    let port = frond.mqtt_port;
    let v = Version::V5;

    let (mut sub, _) = Raw::connect(port, "will-sub", Opts::persistent(v)).await;
    sub.subscribe("telemetry/will/#", WQoS::AtLeastOnce).await;
    sub.disconnect(Properties::default()).await;

    let props = Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        content_type: Some("text/plain".into()),
        response_topic: Some("resp/dev".into()),
        correlation_data: Some(vec![1, 2, 0xff]),
        user_properties: vec![("reason".into(), "power".into())],
        ..Properties::default()
    };
    let (_dev, _) = Raw::connect(
        port,
        "will-dev",
        Opts {
            v,
            clean: true,
            expiry: None,
            will: Some(Will {
                topic: "telemetry/will/dev".into(),
                payload: b"offline".to_vec(),
                qos: WQoS::AtLeastOnce,
                retain: false,
                properties: props.clone(),
            }),
        },
    )
    .await;
    frond.kill9();
    frond.start().await;

    let (mut sub, c) = Raw::connect(port, "will-sub", Opts::persistent(v)).await;
    assert!(c.session_present);
    let w = publish_of(sub.recv().await);
    assert_eq!(
        (w.topic.as_str(), text(&w).as_str()),
        ("telemetry/will/dev", "offline")
    );
    let got = &w.properties;
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.content_type.as_deref(), Some("text/plain"));
    assert_eq!(got.response_topic.as_deref(), Some("resp/dev"));
    assert_eq!(got.correlation_data.as_deref(), Some(&[1u8, 2, 0xff][..]));
    assert_eq!(got.user_properties, props.user_properties);
    let left = got.message_expiry_interval.expect("message expiry");
    assert!((3500..=3600).contains(&left), "remaining expiry {left}");
}
