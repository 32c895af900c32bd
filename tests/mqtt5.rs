//! MQTT 5 features and the MQTT <-> NATS metadata bridge, with real peers:
//! rumqttc (v5 API), mosquitto_pub/mosquitto_sub (`-V mqttv5` and
//! `-V mqttv311`), async-nats, and a raw MQTT 5 client built on frond's
//! own codec where a test needs byte-exact control (topic aliases, flow
//! control, packet size limits).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::mqtt5::*;
use common::*;
use frond::wire::mqtt::{self, Ack, Packet, Properties, Publish, QoS as WQoS, Version};
use rumqttc::v5::mqttbytes::v5::{Packet as RPacket, Publish as RPublish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use smol::stream::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const T: Duration = Duration::from_secs(10);

fn props(p: &RPublish) -> PublishProperties {
    p.properties.clone().unwrap_or_default()
}

async fn nats(f: &Frond) -> async_nats::Client {
    async_nats::connect(format!("127.0.0.1:{}", f.nats_port))
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn topic_aliases_both_ways() {
    let f = Frond::start_new(FrondSpec::default()).await;
    // Receiver: accepts 2 aliases from frond.
    let (mut sub, _) = Raw::with_props(
        f.mqtt_port,
        "alias-sub",
        Properties {
            topic_alias_maximum: Some(2),
            ..Properties::default()
        },
    )
    .await;
    sub.subscribe(1, "al/#", WQoS::AtMostOnce, None).await;
    // Publisher: frond advertises its maximum and resolves our aliases.
    let (mut publ, connack) =
        Raw::with_props(f.mqtt_port, "alias-pub", Properties::default()).await;
    let max = connack.topic_alias_maximum.expect("Topic Alias Maximum");
    assert!(max >= 1);
    publ.send(&raw_publish("al/one", Some(1), b"1")).await;
    publ.send(&raw_publish("", Some(1), b"2")).await;
    publ.send(&raw_publish("al/two", Some(max), b"3")).await;
    publ.send(&raw_publish("", Some(max), b"4")).await;
    publ.send(&raw_publish("al/three", None, b"5")).await;
    publ.send(&raw_publish("al/three", None, b"6")).await;
    let got: Vec<(String, Option<u16>, Vec<u8>)> = futures_collect(&mut sub, 6)
        .await
        .into_iter()
        .map(|p| (p.topic, p.properties.topic_alias, p.payload))
        .collect();
    let want: Vec<(String, Option<u16>, Vec<u8>)> = vec![
        ("al/one".into(), Some(1), b"1".to_vec()),
        (String::new(), Some(1), b"2".to_vec()),
        ("al/two".into(), Some(2), b"3".to_vec()),
        (String::new(), Some(2), b"4".to_vec()),
        ("al/three".into(), None, b"5".to_vec()),
        ("al/three".into(), None, b"6".to_vec()),
    ];
    assert_eq!(got, want, "inbound aliases resolved, outbound up to 2");

    // rumqttc resolves frond's aliases too.
    let mut opts = MqttOptions::new("alias-rumqttc", "127.0.0.1", f.mqtt_port);
    opts.set_topic_alias_max(Some(4));
    let (client, mut el) = AsyncClient::new(opts, 16);
    client.subscribe("al/#", QoS::AtMostOnce).await.unwrap();
    let mut seen = Vec::new();
    let mut published = false;
    tokio::time::timeout(T, async {
        while seen.len() < 2 {
            match el.poll().await.unwrap() {
                Event::Incoming(RPacket::SubAck(_)) if !published => {
                    published = true;
                    publ.send(&raw_publish("al/r", Some(1), b"a")).await;
                    publ.send(&raw_publish("", Some(1), b"b")).await;
                }
                Event::Incoming(RPacket::Publish(p)) => seen.push((
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    props(&p).topic_alias,
                )),
                _ => {}
            }
        }
    })
    .await
    .expect("rumqttc gets both");
    assert_eq!(
        seen,
        vec![("al/r".to_string(), Some(1)), ("al/r".to_string(), Some(1))]
    );

    // The raw subscriber got those too, without an alias (its 2 are used).
    for want in [&b"a"[..], b"b"] {
        let p = publish_of(sub.recv().await);
        assert_eq!((p.topic.as_str(), p.payload.as_slice()), ("al/r", want));
        assert_eq!(p.properties.topic_alias, None);
    }

    // mosquitto_pub sets an alias with its topic: accepted.
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &f.mqtt_port.to_string()])
        .args(["-V", "mqttv5", "-t", "al/mosq", "-m", "m"])
        .args(["-D", "publish", "topic-alias", "1"])
        .status()
        .expect("mosquitto_pub (apt install mosquitto-clients)");
    assert!(status.success());
    let p = publish_of(sub.recv().await);
    assert_eq!(p.payload, b"m");

    // An alias above frond's maximum is a protocol error (0x94).
    publ.send(&raw_publish("al/x", Some(max + 1), b"x")).await;
    match publ.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.code, 0x94),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

async fn futures_collect(raw: &mut Raw, n: usize) -> Vec<Publish> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(publish_of(raw.recv().await));
    }
    out
}

#[tokio::test]
async fn receive_maximum_is_respected_and_advertised() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let (mut sub, connack) = Raw::with_props(
        f.mqtt_port,
        "rm-sub",
        Properties {
            receive_maximum: Some(2),
            ..Properties::default()
        },
    )
    .await;
    assert_eq!(connack.receive_maximum, Some(1024), "frond's max_inflight");
    sub.subscribe(1, "telemetry/rm/#", WQoS::AtLeastOnce, None)
        .await;
    // Captured NATS publishes: delivered at QoS 1.
    let nc = nats(&f).await;
    for i in 0..5 {
        nc.publish("telemetry.rm.x", format!("m{i}").into())
            .await
            .unwrap();
    }
    nc.flush().await.unwrap();
    // All five are at frond's MQTT connection once the NATS flush returned;
    // anything it would send is written before the PINGRESP.
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(sub.ping().await.into_iter().map(publish_of));
    }
    assert_eq!(got.len(), 2, "only the client's Receive Maximum in flight");
    assert!(sub.ping().await.is_empty(), "nothing more before an ack");
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    let mut inflight: Vec<u16> = Vec::new();
    for p in got {
        assert_eq!(p.qos, WQoS::AtLeastOnce);
        inflight.push(p.packet_id.unwrap());
        payloads.push(p.payload);
    }
    while payloads.len() < 5 {
        let id = inflight.remove(0);
        sub.send(&Packet::PubAck(Ack {
            packet_id: id,
            ..Ack::default()
        }))
        .await;
        let p = publish_of(sub.recv().await);
        inflight.push(p.packet_id.unwrap());
        payloads.push(p.payload);
        assert!(inflight.len() <= 2);
    }
    let want: Vec<Vec<u8>> = (0..5).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(payloads, want, "queued in order");

    // frond's own Receive Maximum, exceeded by a client: 0x93.
    let (mut greedy, _) = Raw::with_props(f.mqtt_port, "rm-greedy", Properties::default()).await;
    let mut burst = Vec::new();
    for id in 1..=1025u16 {
        mqtt::encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: WQoS::AtLeastOnce,
                retain: false,
                topic: "telemetry/rm/greedy".into(),
                packet_id: Some(id),
                properties: Properties::default(),
                payload: b"g".to_vec(),
            }),
            Version::V5,
            &mut burst,
        )
        .unwrap();
    }
    // Hold frond's acks back from the client's view: frond must not need
    // them; it only counts what it has not acknowledged when a PUBLISH is
    // decoded. Acks that were already sent make a disconnect impossible,
    // so accept either a clean run or a 0x93 DISCONNECT, never anything
    // else.
    greedy.sock.write_all(&burst).await.unwrap();
    let mut acks = 0;
    loop {
        match greedy.recv().await {
            Packet::PubAck(_) => {
                acks += 1;
                if acks == 1025 {
                    break;
                }
            }
            Packet::Disconnect(d) => {
                assert_eq!(d.code, 0x93);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn maximum_packet_size_drops_only_oversized_messages() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let (mut sub, connack) = Raw::with_props(
        f.mqtt_port,
        "mps-sub",
        Properties {
            maximum_packet_size: Some(128),
            ..Properties::default()
        },
    )
    .await;
    assert_eq!(connack.maximum_packet_size, Some(1 << 20));
    sub.subscribe(1, "mps/#", WQoS::AtLeastOnce, None).await;
    let pb = V5::connect(f.mqtt_port, "mps-pub").await;
    pb.client
        .publish("mps/a", QoS::AtLeastOnce, false, vec![b'x'; 500])
        .await
        .unwrap();
    pb.client
        .publish("mps/a", QoS::AtLeastOnce, false, b"small".to_vec())
        .await
        .unwrap();
    // Ordered: the small one arrives, and the large one never came first.
    let p = publish_of(sub.recv().await);
    assert_eq!(p.payload, b"small");
    sub.send(&Packet::PubAck(Ack {
        packet_id: p.packet_id.unwrap(),
        ..Ack::default()
    }))
    .await;
    assert!(
        sub.ping().await.is_empty(),
        "connection still up, nothing else"
    );
    drop(pb);
}

#[tokio::test]
async fn subscription_identifiers_and_properties_reach_v5_subscribers() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let mut sub = V5::connect(f.mqtt_port, "sid-sub").await;
    sub.subscribe("sid/#", QoS::AtLeastOnce, Some(5)).await;
    sub.subscribe("sid/+/x", QoS::AtLeastOnce, Some(9)).await;
    let pb = V5::connect(f.mqtt_port, "sid-pub").await;
    let pp = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("text/plain".into()),
        user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
        message_expiry_interval: Some(100),
        ..PublishProperties::default()
    };
    pb.client
        .publish_with_properties("sid/q/x", QoS::AtLeastOnce, false, "hello", pp)
        .await
        .unwrap();
    let p = sub.next().await;
    let got = props(&p);
    let mut ids = got.subscription_identifiers.clone();
    ids.sort_unstable();
    assert_eq!(ids, vec![5, 9]);
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        got.user_properties,
        vec![
            ("a".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string())
        ]
    );
    let left = got.message_expiry_interval.expect("expiry forwarded");
    assert!((1..=100).contains(&left), "remaining time, got {left}");
}

#[tokio::test]
async fn expired_stored_message_is_not_delivered() {
    let f = Frond::start_new(FrondSpec::default()).await;
    // A persistent session subscribes, then goes away.
    let mut opts = MqttOptions::new("exp-sub", "127.0.0.1", f.mqtt_port);
    opts.set_clean_start(false);
    opts.set_connect_properties(rumqttc::v5::mqttbytes::v5::ConnectProperties {
        session_expiry_interval: Some(600),
        ..Default::default()
    });
    let mut sub = V5::connect_with(opts.clone()).await;
    sub.subscribe("telemetry/exp/#", QoS::AtLeastOnce, None)
        .await;
    sub.disconnect().await;
    // Stored while it is away: one with a 1 s expiry, then one without.
    let publish = |msg: &str, extra: &[&str]| {
        let status = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &f.mqtt_port.to_string()])
            .args([
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-t",
                "telemetry/exp/a",
                "-m",
                msg,
            ])
            .args(extra)
            .status()
            .expect("mosquitto_pub");
        assert!(status.success());
    };
    publish("old", &["-D", "publish", "message-expiry-interval", "1"]);
    // mosquitto_pub -q 1 exits after the PUBACK, sent once it was stored.
    let stored_at = Instant::now();
    publish("long", &["-D", "publish", "message-expiry-interval", "300"]);
    publish("keep", &[]);
    // The passing of time is what is tested here.
    wait_elapsed(stored_at, Duration::from_millis(1200)).await;
    let mut sub = V5::connect_with(opts).await;
    let first = sub.next().await;
    assert_eq!(&first.payload[..], b"long", "the expired one is skipped");
    let left = props(&first).message_expiry_interval.unwrap();
    assert!(left < 300 && left > 200, "remaining time, got {left}");
    let second = sub.next().await;
    assert_eq!(&second.payload[..], b"keep");
    assert_eq!(props(&second).message_expiry_interval, None);
}

#[tokio::test]
async fn user_properties_and_nats_headers_both_ways() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let nc = nats(&f).await;
    // MQTT 5 -> NATS.
    let mut nsub = nc.subscribe("up.>").await.unwrap();
    nc.flush().await.unwrap();
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &f.mqtt_port.to_string()])
        .args(["-V", "mqttv5", "-t", "up/x", "-m", "hi"])
        .args(["-D", "publish", "user-property", "site", "north"])
        .args(["-D", "publish", "content-type", "text/plain"])
        .args(["-D", "publish", "correlation-data", "cid-1"])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());
    let m = tokio::time::timeout(T, nsub.next()).await.unwrap().unwrap();
    let h = m.headers.expect("headers");
    assert_eq!(h.get("site").map(|v| v.as_str()), Some("north"));
    assert_eq!(
        h.get("Content-Type").map(|v| v.as_str()),
        Some("text/plain")
    );
    assert_eq!(
        h.get("Mqtt-Correlation-Data").map(|v| v.as_str()),
        Some("Y2lkLTE=")
    );

    // NATS -> MQTT 5 (mosquitto_sub prints the user properties) and
    // MQTT 3.1.1 (no properties, same message).
    let spawn_sub = |version: &str, fmt: &str| {
        let mut child = tokio::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &f.mqtt_port.to_string()])
            .args(["-V", version, "-t", "down/#", "-C", "1", "-F", fmt])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub");
        let out = BufReader::new(child.stdout.take().unwrap());
        (child, out.lines())
    };
    let (_c5, mut l5) = spawn_sub("mqttv5", "%t|%C|%P|%p");
    let (_c3, mut l3) = spawn_sub("mqttv311", "%t|%p");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("k", "v");
    headers.insert("Content-Type", "application/json");
    // Publish until both subscribers (whose SUBSCRIBE time we cannot see)
    // printed a line.
    let mut line5 = None;
    let mut line3 = None;
    let deadline = Instant::now() + T;
    while line5.is_none() || line3.is_none() {
        assert!(
            Instant::now() < deadline,
            "mosquitto_sub v5 and v3.1.1 print the NATS message"
        );
        nc.publish_with_headers("down.x", headers.clone(), "{}".into())
            .await
            .unwrap();
        nc.flush().await.unwrap();
        let poll = Duration::from_millis(100);
        if line5.is_none() {
            if let Ok(Ok(Some(l))) = tokio::time::timeout(poll, l5.next_line()).await {
                line5 = Some(l);
            }
        }
        if line3.is_none() {
            if let Ok(Ok(Some(l))) = tokio::time::timeout(poll, l3.next_line()).await {
                line3 = Some(l);
            }
        }
    }
    assert_eq!(line5.unwrap(), "down/x|application/json|k:v|{}");
    assert_eq!(line3.unwrap(), "down/x|{}");
}

#[tokio::test]
async fn mqtt5_client_calls_a_nats_service() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let nc = nats(&f).await;
    // A plain NATS service: replies with msg.respond semantics (no headers).
    let mut svc = nc.subscribe("svc.echo").await.unwrap();
    nc.flush().await.unwrap();
    let nc2 = nc.clone();
    tokio::spawn(async move {
        while let Some(m) = svc.next().await {
            if let Some(reply) = m.reply {
                let mut out = b"echo:".to_vec();
                out.extend_from_slice(&m.payload);
                nc2.publish(reply, out.into()).await.unwrap();
            }
        }
    });
    let mut cl = V5::connect(f.mqtt_port, "requester").await;
    cl.subscribe("resp/requester", QoS::AtLeastOnce, None).await;
    for (i, corr) in [&b"corr-1"[..], &b"\x00\xffbin"[..]]
        .into_iter()
        .enumerate()
    {
        let pp = PublishProperties {
            response_topic: Some("resp/requester".into()),
            correlation_data: Some(corr.to_vec().into()),
            ..PublishProperties::default()
        };
        cl.client
            .publish_with_properties("svc/echo", QoS::AtLeastOnce, false, format!("q{i}"), pp)
            .await
            .unwrap();
        let r = cl.next().await;
        assert_eq!(String::from_utf8_lossy(&r.topic), "resp/requester");
        assert_eq!(&r.payload[..], format!("echo:q{i}").as_bytes());
        assert_eq!(props(&r).correlation_data.as_deref(), Some(corr));
    }
}

#[tokio::test]
async fn nats_requester_calls_an_mqtt5_responder() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let mut responder = V5::connect(f.mqtt_port, "responder").await;
    responder.subscribe("rpc/add", QoS::AtMostOnce, None).await;
    let client = responder.client.clone();
    tokio::spawn(async move {
        while let Some(req) = responder.rx.recv().await {
            let p = props(&req);
            let Some(to) = p.response_topic else { continue };
            let back = PublishProperties {
                correlation_data: p.correlation_data,
                ..PublishProperties::default()
            };
            let mut out = b"sum:".to_vec();
            out.extend_from_slice(&req.payload);
            client
                .publish_with_properties(to, QoS::AtMostOnce, false, out, back)
                .await
                .unwrap();
        }
    });
    let nc = nats(&f).await;
    let r = tokio::time::timeout(T, nc.request("rpc.add", "1+2".into()))
        .await
        .expect("reply within 10 s")
        .expect("a reply");
    assert_eq!(&r.payload[..], b"sum:1+2");

    // And an MQTT 5 requester calling the same MQTT 5 responder keeps
    // its correlation data.
    let mut req = V5::connect(f.mqtt_port, "mqtt-req").await;
    req.subscribe("back/me", QoS::AtMostOnce, None).await;
    let pp = PublishProperties {
        response_topic: Some("back/me".into()),
        correlation_data: Some(b"c9".to_vec().into()),
        ..PublishProperties::default()
    };
    req.client
        .publish_with_properties("rpc/add", QoS::AtMostOnce, false, "3+4", pp)
        .await
        .unwrap();
    let r = req.next().await;
    assert_eq!(&r.payload[..], b"sum:3+4");
    assert_eq!(props(&r).correlation_data.as_deref(), Some(&b"c9"[..]));
}

#[tokio::test]
async fn captured_nats_publish_reaches_mqtt_at_qos1_uncaptured_at_qos0() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let mut sub = V5::connect(f.mqtt_port, "qos-sub").await;
    sub.subscribe("telemetry/q/#", QoS::ExactlyOnce, None).await;
    sub.subscribe("live/q/#", QoS::ExactlyOnce, None).await;
    let mut low = V5::connect(f.mqtt_port, "qos-low").await;
    low.subscribe("telemetry/q/#", QoS::AtMostOnce, None).await;
    let nc = nats(&f).await;
    nc.publish("telemetry.q.a", "stored".into()).await.unwrap();
    nc.publish("live.q.a", "live".into()).await.unwrap();
    nc.flush().await.unwrap();
    let a = sub.next().await;
    let b = sub.next().await;
    assert_eq!((&a.payload[..], a.qos), (&b"stored"[..], QoS::AtLeastOnce));
    assert_eq!((&b.payload[..], b.qos), (&b"live"[..], QoS::AtMostOnce));
    let c = low.next().await;
    assert_eq!(c.qos, QoS::AtMostOnce, "capped by the subscription");
}

#[tokio::test]
async fn message_expiring_while_queued_for_a_full_window_is_dropped() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let (mut sub, _) = Raw::with_props(
        f.mqtt_port,
        "q-exp-sub",
        Properties {
            receive_maximum: Some(1),
            ..Properties::default()
        },
    )
    .await;
    // Not captured by a stream: these come from the router and wait in
    // the session's queue while the window (1) is full.
    sub.subscribe(1, "live/exp/#", WQoS::AtLeastOnce, None)
        .await;
    let pb = V5::connect(f.mqtt_port, "q-exp-pub").await;
    let expiring = PublishProperties {
        message_expiry_interval: Some(1),
        ..PublishProperties::default()
    };
    pb.client
        .publish("live/exp/a", QoS::AtLeastOnce, false, "first")
        .await
        .unwrap();
    let first = publish_of(sub.recv().await);
    assert_eq!(first.payload, b"first");
    // A NATS subscriber sees when "short" was routed (its expiry counts
    // from then).
    let nc = nats(&f).await;
    let mut routed = nc.subscribe("live.exp.>").await.unwrap();
    nc.flush().await.unwrap();
    pb.client
        .publish_with_properties("live/exp/a", QoS::AtLeastOnce, false, "short", expiring)
        .await
        .unwrap();
    let m = tokio::time::timeout(T, routed.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"short");
    let queued_at = Instant::now();
    pb.client
        .publish("live/exp/a", QoS::AtLeastOnce, false, "last")
        .await
        .unwrap();
    // The passing of time is what is tested: hold the window until the
    // queued "short" message is past its 1 s expiry.
    wait_elapsed(queued_at, Duration::from_millis(1200)).await;
    sub.send(&Packet::PubAck(Ack {
        packet_id: first.packet_id.unwrap(),
        ..Ack::default()
    }))
    .await;
    let next = publish_of(sub.recv().await);
    assert_eq!(
        next.payload, b"last",
        "the expired queued message is skipped"
    );
}

#[tokio::test]
async fn will_properties_reach_mqtt5_and_nats_subscribers() {
    use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties};
    let f = Frond::start_new(FrondSpec::default()).await;
    let mut sub = V5::connect(f.mqtt_port, "will-sub").await;
    sub.subscribe("wills/#", QoS::AtLeastOnce, None).await;
    let nc = nats(&f).await;
    let mut nsub = nc.subscribe("wills.>").await.unwrap();
    nc.flush().await.unwrap();
    let mut opts = MqttOptions::new("will-dev", "127.0.0.1", f.mqtt_port);
    let wp = LastWillProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("reason".into(), "lost".into())],
        delay_interval: None,
        payload_format_indicator: None,
        message_expiry_interval: None,
        response_topic: None,
        correlation_data: None,
    };
    opts.set_last_will(LastWill::new(
        "wills/dev",
        "gone",
        QoS::AtLeastOnce,
        false,
        Some(wp),
    ));
    let (_client, mut el) = AsyncClient::new(opts, 8);
    tokio::time::timeout(T, async {
        loop {
            if let Event::Incoming(RPacket::ConnAck(_)) = el.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("CONNACK");
    // Dropping the event loop closes the socket without DISCONNECT.
    drop(el);
    let w = sub.next().await;
    assert_eq!(&w.payload[..], b"gone");
    let p = props(&w);
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        p.user_properties,
        vec![("reason".to_string(), "lost".to_string())]
    );
    let m = tokio::time::timeout(T, nsub.next()).await.unwrap().unwrap();
    let h = m.headers.expect("headers");
    assert_eq!(h.get("reason").map(|v| v.as_str()), Some("lost"));
}

#[tokio::test]
async fn retained_messages_keep_properties_across_restart_and_expire() {
    let mut f = Frond::start_new(FrondSpec::default()).await;
    let publish = |port: u16, topic: &str, extra: &[&str]| {
        let status = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-V", "mqttv5", "-q", "1", "-r", "-t", topic, "-m", "r"])
            .args(extra)
            .status()
            .expect("mosquitto_pub");
        assert!(status.success());
    };
    publish(
        f.mqtt_port,
        "ret/keep",
        &["-D", "publish", "user-property", "unit", "C"],
    );
    publish(
        f.mqtt_port,
        "ret/short",
        &["-D", "publish", "message-expiry-interval", "1"],
    );
    // mosquitto_pub -q 1 -r returns once the retained message is durable.
    let set_at = Instant::now();
    f.terminate();
    f.start().await;
    wait_elapsed(set_at, Duration::from_millis(1200)).await;
    let (mut sub, _) = Raw::with_props(f.mqtt_port, "ret-sub", Properties::default()).await;
    sub.subscribe(1, "ret/#", WQoS::AtMostOnce, None).await;
    // Retained messages are written with the SUBACK; the PINGRESP after.
    let got: Vec<Publish> = sub.ping().await.into_iter().map(publish_of).collect();
    assert_eq!(got.len(), 1, "the expired retained message is not sent");
    assert_eq!(got[0].topic, "ret/keep");
    assert!(got[0].retain);
    assert_eq!(
        got[0].properties.user_properties,
        vec![("unit".to_string(), "C".to_string())]
    );
}
