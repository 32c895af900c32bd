//! The MQTT ↔ Key/Value bridge: MQTT devices (rumqttc, 3.1.1 and 5.0)
//! subscribe to `$KV/<bucket>/<key>` (wildcards allowed) and get the
//! current value of each matching key at once, as retained messages, then
//! every update live; deletes arrive as empty payloads (5.0: with the user
//! property `KV-Operation`); `deny_subscribe` applies per key; devices put
//! by publishing to `$KV/<bucket>/<key>` under their publish permission; a
//! persistent session gets the updates made while it was away.
//!
//! The bucket is a KV-shaped stream from frond.toml (`KV_cfg`), written
//! with async-nats publishes carrying KV headers, as the KV clients write.

mod common;

use std::time::Duration;

use async_nats::HeaderMap;
use common::{Frond, FrondSpec};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

const LONG: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[auth]
anonymous = false

[[auth.users]]
name = "admin"
password = "admin-pw"

[[auth.users]]
name = "dev"
password = "dev-pw"
deny_subscribe = ["$KV.cfg.secret"]
deny_publish = ["$KV.cfg.ro"]

[[stream]]
name = "KV_cfg"
subjects = ["$KV.cfg.>"]
max_msgs_per_subject = 5
allow_rollup = true
allow_direct = true
"#;

async fn start() -> Frond {
    Frond::start_new(FrondSpec {
        extra_config: CONFIG.into(),
        ..Default::default()
    })
    .await
}

async fn admin(f: &Frond) -> async_nats::jetstream::Context {
    let c = async_nats::ConnectOptions::with_user_and_password("admin".into(), "admin-pw".into())
        .connect(format!("127.0.0.1:{}", f.nats_port))
        .await
        .expect("connect to frond");
    async_nats::jetstream::new(c)
}

/// A KV put (`op` None) or delete/purge marker, acknowledged by the stream.
async fn kv(js: &async_nats::jetstream::Context, key: &str, value: &str, op: Option<&str>) {
    let mut h = HeaderMap::new();
    if let Some(op) = op {
        h.insert("KV-Operation", op);
    }
    js.publish_with_headers(format!("$KV.cfg.{key}"), h, value.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("PubAck");
}

async fn v4(f: &Frond, id: &str, clean: bool) -> (AsyncClient, EventLoop, bool) {
    let mut o = MqttOptions::new(id, "127.0.0.1", f.mqtt_port);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_clean_session(clean);
    o.set_credentials("dev", "dev-pw");
    let (c, mut el) = AsyncClient::new(o, 16);
    loop {
        match tokio::time::timeout(LONG, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => return (c, el, a.session_present),
            Ok(Ok(_)) => {}
            other => panic!("no CONNACK: {other:?}"),
        }
    }
}

/// The next packet of interest: a PUBLISH as (topic, payload, retain), or
/// a SUBACK/PUBACK as ("suback"/"puback", "", false).
async fn next(el: &mut EventLoop) -> (String, String, bool) {
    // One deadline for the packet (keep-alive traffic does not extend it).
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                return (
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                    p.retain,
                )
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                return ("suback".into(), "".into(), false)
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                return ("puback".into(), "".into(), false)
            }
            Ok(Ok(_)) => {}
            other => panic!("connection: {other:?}"),
        }
    }
}

fn msg(topic: &str, payload: &str, retain: bool) -> (String, String, bool) {
    (topic.into(), payload.into(), retain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_current_values_then_live_updates_deletes_and_puts() {
    let mut f = start().await;
    let js = admin(&f).await;
    kv(&js, "a", "a1", None).await;
    kv(&js, "b", "b1", None).await;
    kv(&js, "secret", "s1", None).await;
    kv(&js, "a", "a2", None).await;
    kv(&js, "gone", "g1", None).await;
    kv(&js, "gone", "", Some("DEL")).await;
    kv(&js, "deep.x", "dx", None).await;

    let (c, mut el, _) = v4(&f, "kv-dev", true).await;
    c.subscribe("$KV/cfg/+", QoS::AtLeastOnce).await.unwrap();
    // SUBACK, then the current values in sequence order: no secret (denied
    // to this user), no deleted key, no deeper key (`+` is one level).
    assert_eq!(next(&mut el).await.0, "suback");
    assert_eq!(next(&mut el).await, msg("$KV/cfg/b", "b1", true));
    assert_eq!(next(&mut el).await, msg("$KV/cfg/a", "a2", true));
    // Live: updates, a denied key's update skipped, a delete as empty.
    kv(&js, "secret", "s2", None).await;
    kv(&js, "a", "a3", None).await;
    assert_eq!(next(&mut el).await, msg("$KV/cfg/a", "a3", false));
    kv(&js, "b", "", Some("PURGE")).await;
    assert_eq!(next(&mut el).await, msg("$KV/cfg/b", "", false));

    // Puts by the device: through the stream, under its publish permission.
    c.publish("$KV/cfg/ro", QoS::AtLeastOnce, false, "no")
        .await
        .unwrap();
    c.publish("$KV/cfg/dev1", QoS::AtLeastOnce, false, "reported")
        .await
        .unwrap();
    // Its own put comes back to it live (it subscribed to `+`); the
    // refused one, published first, would have come before it.
    let (mut pubacks, mut pubs) = (0, Vec::new());
    while pubacks < 2 || pubs.is_empty() {
        let m = next(&mut el).await;
        match m.0.as_str() {
            "puback" => pubacks += 1,
            _ => pubs.push(m),
        }
    }
    assert_eq!(pubs, vec![msg("$KV/cfg/dev1", "reported", false)]);
    let s = js.get_stream("KV_cfg").await.expect("KV_cfg");
    let got = s
        .direct_get_last_for_subject("$KV.cfg.dev1")
        .await
        .expect("dev1 stored");
    assert_eq!(&got.payload[..], b"reported");
    assert!(
        s.direct_get_last_for_subject("$KV.cfg.ro").await.is_err(),
        "ro refused"
    );
    f.terminate();
}

async fn next5(el: &mut rumqttc::v5::EventLoop) -> rumqttc::v5::mqttbytes::v5::Publish {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::Event as E5;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(E5::Incoming(P5::Publish(p)))) => return p,
            Ok(Ok(_)) => {}
            other => panic!("connection: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_gets_values_and_delete_markers_with_kv_operation() {
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient as C5, MqttOptions as O5};
    let mut f = start().await;
    let js = admin(&f).await;
    kv(&js, "x.one", "1", None).await;
    kv(&js, "x.two", "2", None).await;
    kv(&js, "y", "y", None).await;
    let mut o = O5::new("kv-v5", "127.0.0.1", f.mqtt_port);
    o.set_credentials("dev", "dev-pw");
    let (c, mut el) = C5::new(o, 16);
    c.subscribe("$KV/cfg/x/#", Q5::AtLeastOnce).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let p = next5(&mut el).await;
        got.push((
            String::from_utf8_lossy(&p.topic).into_owned(),
            p.payload.to_vec(),
            p.retain,
        ));
    }
    assert_eq!(
        got,
        vec![
            ("$KV/cfg/x/one".to_string(), b"1".to_vec(), true),
            ("$KV/cfg/x/two".to_string(), b"2".to_vec(), true)
        ]
    );
    kv(&js, "x.one", "", Some("DEL")).await;
    let p = next5(&mut el).await;
    assert_eq!(
        (&p.topic[..], &p.payload[..], p.retain),
        (&b"$KV/cfg/x/one"[..], &b""[..], false)
    );
    let props = p.properties.expect("properties");
    assert!(
        props
            .user_properties
            .contains(&("KV-Operation".to_string(), "DEL".to_string())),
        "{props:?}"
    );
    f.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_gets_what_changed_while_away() {
    let mut f = start().await;
    let js = admin(&f).await;
    kv(&js, "a", "a1", None).await;
    let (c, mut el, present) = v4(&f, "kv-twin", false).await;
    assert!(!present);
    c.subscribe("$KV/cfg/a", QoS::AtLeastOnce).await.unwrap();
    assert_eq!(next(&mut el).await.0, "suback");
    assert_eq!(next(&mut el).await, msg("$KV/cfg/a", "a1", true));
    c.disconnect().await.unwrap();
    while tokio::time::timeout(LONG, el.poll())
        .await
        .expect("closes")
        .is_ok()
    {}
    kv(&js, "a", "a2", None).await;
    kv(&js, "b", "b1", None).await;
    kv(&js, "a", "a3", None).await;
    let (_c, mut el, present) = v4(&f, "kv-twin", false).await;
    assert!(present);
    // Every change of the key since, in order; nothing sent twice.
    assert_eq!(next(&mut el).await, msg("$KV/cfg/a", "a2", false));
    assert_eq!(next(&mut el).await, msg("$KV/cfg/a", "a3", false));
    kv(&js, "a", "a4", None).await;
    assert_eq!(next(&mut el).await, msg("$KV/cfg/a", "a4", false));
    f.terminate();
}
