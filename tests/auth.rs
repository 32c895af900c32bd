//! `[auth]` end to end against the real binary: MQTT credentials and
//! permissions through rumqttc, NATS through async-nats and a raw socket
//! (to read the exact `-ERR` texts).

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

/// "U*U" hashed with bcrypt (published OpenBSD/jBCrypt test vector).
const HASH: &str = "$2b$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW";

fn auth_config(anonymous: bool) -> String {
    format!(
        r#"
[auth]
anonymous = {anonymous}
[auth.anonymous_permissions]
deny_subscribe = ["test.nosubscribe"]
[[auth.users]]
name = "sensor-1"
password = "{HASH}"
allow_publish = ["telemetry.sensor-1.>"]
allow_subscribe = ["cmd.sensor-1.>"]
deny_subscribe = ["cmd.sensor-1.secret"]
[[auth.users]]
name = "admin"
password = "plain-pw"
"#
    )
}

async fn start(anonymous: bool) -> Frond {
    Frond::start_new(FrondSpec {
        extra_config: auth_config(anonymous),
        ..Default::default()
    })
    .await
}

fn mqtt(port: u16, id: &str, creds: Option<(&str, &str)>) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    if let Some((u, p)) = creds {
        o.set_credentials(u, p);
    }
    AsyncClient::new(o, 16)
}

/// Poll until the CONNACK; its outcome.
async fn connack(el: &mut EventLoop) -> Result<(), ConnectReturnCode> {
    loop {
        match timeout(WAIT, el.poll()).await.expect("CONNACK within 10 s") {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
            Ok(_) => {}
            Err(ConnectionError::ConnectionRefused(code)) => return Err(code),
            Err(e) => panic!("unexpected MQTT error: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_credentials_are_checked() {
    let frond = start(false).await;
    let port = frond.mqtt_port;
    let (_c, mut el) = mqtt(port, "good", Some(("sensor-1", "U*U")));
    assert_eq!(connack(&mut el).await, Ok(()));
    let (_c, mut el) = mqtt(port, "plain", Some(("admin", "plain-pw")));
    assert_eq!(connack(&mut el).await, Ok(()));
    let (_c, mut el) = mqtt(port, "bad", Some(("sensor-1", "U*V")));
    assert_eq!(
        connack(&mut el).await,
        Err(ConnectReturnCode::BadUserNamePassword)
    );
    let (_c, mut el) = mqtt(port, "unknown", Some(("nobody", "U*U")));
    assert_eq!(
        connack(&mut el).await,
        Err(ConnectReturnCode::BadUserNamePassword)
    );
    let (_c, mut el) = mqtt(port, "anon", None);
    assert_eq!(
        connack(&mut el).await,
        Err(ConnectReturnCode::NotAuthorized)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_permissions_deny_subscribe_and_drop_publish() {
    let frond = start(false).await;
    let port = frond.mqtt_port;

    // A watcher that may see everything.
    let (watch, mut wel) = mqtt(port, "watcher", Some(("admin", "plain-pw")));
    assert_eq!(connack(&mut wel).await, Ok(()));
    watch.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
    let (sub_tx, mut sub_rx) = tokio::sync::mpsc::channel::<()>(4);
    tokio::spawn(async move {
        while let Ok(ev) = wel.poll().await {
            match ev {
                Event::Incoming(Packet::SubAck(_)) => {
                    let _ = sub_tx.send(()).await;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send(p.topic.clone()).await;
                }
                _ => {}
            }
        }
    });
    timeout(WAIT, sub_rx.recv()).await.unwrap();

    let (dev, mut el) = mqtt(port, "sensor", Some(("sensor-1", "U*U")));
    assert_eq!(connack(&mut el).await, Ok(()));
    dev.subscribe("cmd/sensor-1/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    dev.subscribe("cmd/other", QoS::AtLeastOnce).await.unwrap();
    dev.subscribe("cmd/sensor-1/secret", QoS::AtLeastOnce)
        .await
        .unwrap();
    // Denied first, then allowed: the watcher must see only the allowed one.
    dev.publish("telemetry/sensor-2/x", QoS::AtLeastOnce, false, "no")
        .await
        .unwrap();
    dev.publish("telemetry/sensor-1/x", QoS::AtLeastOnce, false, "yes")
        .await
        .unwrap();
    let mut subacks = Vec::new();
    let mut pubacks = 0;
    while subacks.len() < 3 || pubacks < 2 {
        match timeout(WAIT, el.poll()).await.expect("acks within 10 s") {
            Ok(Event::Incoming(Packet::SubAck(a))) => subacks.push(a.return_codes),
            Ok(Event::Incoming(Packet::PubAck(_))) => pubacks += 1,
            Ok(_) => {}
            Err(e) => panic!("sensor connection failed: {e}"),
        }
    }
    assert_eq!(
        subacks,
        vec![
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            vec![SubscribeReasonCode::Failure],
            vec![SubscribeReasonCode::Failure],
        ]
    );
    let first = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(
        first, "telemetry/sensor-1/x",
        "denied publish was delivered"
    );

    // Deliveries: allowed command arrives, the denied subject (inside the
    // allowed wildcard) is filtered at delivery.
    watch
        .publish("cmd/sensor-1/secret", QoS::AtLeastOnce, false, "s")
        .await
        .unwrap();
    watch
        .publish("cmd/sensor-1/go", QoS::AtLeastOnce, false, "g")
        .await
        .unwrap();
    loop {
        match timeout(WAIT, el.poll())
            .await
            .expect("delivery within 10 s")
        {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                assert_eq!(p.topic, "cmd/sensor-1/go", "denied subject delivered");
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("sensor connection failed: {e}"),
        }
    }
}

/// Raw NATS connection: send `text`, read until `want` appears (or EOF).
async fn nats_raw(port: u16, text: &str, want: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(text.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&got).contains(want) {
                return;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_auth_and_permissions() {
    let frond = start(true).await;
    let port = frond.nats_port;
    let url = format!("nats://127.0.0.1:{port}");

    // async-nats: wrong password is refused, the right one works.
    let bad = async_nats::ConnectOptions::with_user_and_password("sensor-1".into(), "x".into())
        .connect(&url)
        .await;
    assert!(bad.is_err(), "wrong password accepted");
    let good =
        async_nats::ConnectOptions::with_user_and_password("admin".into(), "plain-pw".into())
            .connect(&url)
            .await
            .expect("admin connects");
    good.flush().await.unwrap();

    // INFO says auth_required; a wrong password gets the nats-server text.
    let out = nats_raw(
        port,
        "CONNECT {\"user\":\"sensor-1\",\"pass\":\"nope\"}\r\nPING\r\n",
        "Authorization Violation",
    )
    .await;
    assert!(out.contains("\"auth_required\":true"), "{out}");
    assert!(out.contains("-ERR 'Authorization Violation'"), "{out}");
    assert!(!out.contains("PONG"), "{out}");
    // An op before CONNECT is refused too.
    let out = nats_raw(port, "PING\r\n", "Authorization Violation").await;
    assert!(out.contains("-ERR 'Authorization Violation'"), "{out}");

    // Permission violations keep the connection.
    let out = nats_raw(
        port,
        "CONNECT {\"user\":\"sensor-1\",\"pass\":\"U*U\"}\r\nPUB telemetry.sensor-2.x 1\r\nx\r\nSUB cmd.> 1\r\nSUB cmd.sensor-1.* 2\r\nPING\r\n",
        "PONG",
    )
    .await;
    assert!(
        out.contains("-ERR 'Permissions Violation for Publish to \"telemetry.sensor-2.x\"'"),
        "{out}"
    );
    assert!(
        out.contains("-ERR 'Permissions Violation for Subscription to \"cmd.>\"'"),
        "{out}"
    );
    assert!(!out.contains("cmd.sensor-1.*"), "{out}");
    assert!(out.contains("PONG"), "{out}");

    // Anonymous (allowed here) with anonymous_permissions, and a token.
    let out = nats_raw(
        port,
        "CONNECT {}\r\nSUB test.nosubscribe 1\r\nSUB test.ok 2\r\nPING\r\n",
        "PONG",
    )
    .await;
    assert!(
        out.contains("-ERR 'Permissions Violation for Subscription to \"test.nosubscribe\"'"),
        "{out}"
    );
    assert!(!out.contains("test.ok"), "{out}");
    let tok = async_nats::ConnectOptions::with_token("plain-pw".into())
        .connect(&url)
        .await
        .expect("token connects");
    tok.flush().await.unwrap();
}
