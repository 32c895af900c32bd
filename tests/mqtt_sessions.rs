//! Persistent MQTT sessions through real clients: a backlog survives a
//! SIGKILL of frond, a clean session discards it, QoS 0 and QoS 1
//! publishes reach it in publish order, and inbound QoS 2 stays exactly
//! once across a publisher's reconnect.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LONG: Duration = Duration::from_secs(30);

fn opts(port: u16, id: &str, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_clean_session(clean);
    o
}

/// Poll until CONNACK; returns session_present.
async fn connack(el: &mut EventLoop) -> bool {
    loop {
        match tokio::time::timeout(LONG, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(c)))) => return c.session_present,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connect failed: {e}"),
            Err(_) => panic!("no CONNACK within {LONG:?}"),
        }
    }
}

/// Poll until the next incoming PUBLISH; returns its payload.
async fn next_publish(el: &mut EventLoop) -> String {
    loop {
        match tokio::time::timeout(LONG, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                return String::from_utf8_lossy(&p.payload).into_owned()
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed: {e}"),
            Err(_) => panic!("no PUBLISH within {LONG:?}"),
        }
    }
}

async fn subscribe(client: &AsyncClient, el: &mut EventLoop, filter: &str) {
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    loop {
        match tokio::time::timeout(LONG, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => return,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
}

/// Disconnect cleanly and drive the event loop until the DISCONNECT is out.
async fn disconnect(client: AsyncClient, mut el: EventLoop) {
    client.disconnect().await.unwrap();
    loop {
        match tokio::time::timeout(LONG, el.poll()).await {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("DISCONNECT not sent"),
        }
    }
}

/// Publish `marker` at QoS 1 and wait for its PUBACK.
async fn publish_one(port: u16, topic: &str, marker: &str) {
    Publisher::new(port, "marker-pub", topic, marker)
        .publish(0..1, LONG)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_survives_sigkill_in_order_once() {
    let mut frond = Frond::start_new(FrondSpec::default()).await;
    let port = frond.mqtt_port;

    let (client, mut el) = AsyncClient::new(opts(port, "sub-p", false), 16);
    assert!(!connack(&mut el).await, "a new session is not present");
    subscribe(&client, &mut el, "telemetry/s/#").await;
    disconnect(client, el).await;

    let n = 1000;
    Publisher::new(port, "pub-p", "telemetry/s/1", "m")
        .publish(0..n, LONG)
        .await;
    frond.kill9();
    frond.start().await;

    let (client, mut el) = AsyncClient::new(opts(port, "sub-p", false), 16);
    assert!(connack(&mut el).await, "session_present after the restart");
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(next_publish(&mut el).await);
    }
    let want: Vec<String> = (0..n).map(|i| payload("m", i)).collect();
    assert_eq!(got, want, "all delivered, in order, none twice");
    // Nothing else is pending: the next message is a new one.
    let poll = tokio::spawn(async move {
        let p = next_publish(&mut el).await;
        (p, el)
    });
    publish_one(port, "telemetry/s/2", "end").await;
    let (p, el) = poll.await.unwrap();
    assert_eq!(p, payload("end", 0), "no duplicate after the backlog");
    disconnect(client, el).await;

    // A clean session for the same id gets nothing old, and deletes the
    // stored session.
    publish_one(port, "telemetry/s/3", "old").await;
    let (client, mut el) = AsyncClient::new(opts(port, "sub-p", true), 16);
    assert!(!connack(&mut el).await, "clean session: no session present");
    subscribe(&client, &mut el, "telemetry/s/#").await;
    let poll = tokio::spawn(async move {
        let p = next_publish(&mut el).await;
        (p, el)
    });
    publish_one(port, "telemetry/s/4", "new").await;
    let (p, el) = poll.await.unwrap();
    assert_eq!(p, payload("new", 0), "the clean session got an old message");
    disconnect(client, el).await;
    let (client, mut el) = AsyncClient::new(opts(port, "sub-p", false), 16);
    assert!(
        !connack(&mut el).await,
        "the clean session deleted the stored one"
    );
    disconnect(client, el).await;
}

/// Publish `payload(prefix, i)` for `i` in `range` on `topic`, at QoS 1
/// where `acked(i)`, else QoS 0, from one connection (sent in order); returns
/// once every publish is out and every QoS 1 one acknowledged.
async fn publish_mixed(
    port: u16,
    topic: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
    acked: impl Fn(usize) -> bool,
) {
    let (client, mut el) = AsyncClient::new(opts(port, "pub-mixed", true), range.len() + 1);
    connack(&mut el).await;
    let want_acks = range.clone().filter(|&i| acked(i)).count();
    let (mut sent, mut acks) = (0, 0);
    for i in range.clone() {
        let qos = if acked(i) {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        client
            .publish(topic, qos, false, payload(prefix, i))
            .await
            .unwrap();
    }
    while sent < range.len() || acks < want_acks {
        match tokio::time::timeout(LONG, el.poll()).await {
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_)))) => sent += 1,
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            other => panic!("publishing failed: {other:?}"),
        }
    }
    disconnect(client, el).await;
}

/// QoS 0 publishes are stored without an fsync of their own (the stream
/// fsyncs them with the next acknowledged publish, or a little later),
/// while a persistent session reads captured subjects from the stream:
/// mixed with QoS 1 publishes, connected or not, they still arrive once
/// each, in publish order, the trailing QoS 0 ones (which no acknowledged
/// publish follows) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_and_qos1_reach_a_persistent_session_in_publish_order() {
    let frond = Frond::start_new(FrondSpec::default()).await;
    let port = frond.mqtt_port;
    let (client, mut el) = AsyncClient::new(opts(port, "sub-mixed", false), 16);
    assert!(!connack(&mut el).await);
    subscribe(&client, &mut el, "telemetry/mixed/#").await;
    // Connected: runs of QoS 0 between QoS 1 publishes, QoS 0 at the end.
    let n = 300;
    let publisher = tokio::spawn(publish_mixed(
        port,
        "telemetry/mixed/1",
        "live",
        0..n,
        move |i| i % 7 == 3 && i < n - 20,
    ));
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(next_publish(&mut el).await);
    }
    publisher.await.unwrap();
    let want: Vec<String> = (0..n).map(|i| payload("live", i)).collect();
    assert_eq!(got, want, "all delivered, in publish order, none twice");
    disconnect(client, el).await;

    // Offline: the backlog, again ending with QoS 0 publishes.
    let m = 100;
    publish_mixed(port, "telemetry/mixed/2", "offline", 0..m, |i| {
        i % 5 == 0 && i < 90
    })
    .await;
    let (client, mut el) = AsyncClient::new(opts(port, "sub-mixed", false), 16);
    assert!(connack(&mut el).await, "session present");
    let mut got = Vec::new();
    for _ in 0..m {
        got.push(next_publish(&mut el).await);
    }
    let want: Vec<String> = (0..m).map(|i| payload("offline", i)).collect();
    assert_eq!(got, want, "the backlog, in publish order, none twice");
    disconnect(client, el).await;
}

// Raw MQTT 3.1.1 packets, so the QoS 2 exchange can be cut exactly where
// the test wants.

fn remaining_len(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    remaining_len(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn str16(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn connect_pkt(id: &str) -> Vec<u8> {
    let mut b = Vec::new();
    str16("MQTT", &mut b);
    b.extend_from_slice(&[4, 0x00, 0, 30]); // level 4, clean_session = 0
    str16(id, &mut b);
    packet(0x10, &b)
}

fn publish_qos2(id: u16, topic: &str, payload: &[u8], dup: bool) -> Vec<u8> {
    let mut b = Vec::new();
    str16(topic, &mut b);
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(payload);
    packet(if dup { 0x3C } else { 0x34 }, &b)
}

/// Read one packet: (first byte, body).
async fn read_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
    tokio::time::timeout(LONG, async {
        let first = s.read_u8().await.unwrap();
        let (mut len, mut mult) = (0usize, 1usize);
        loop {
            let b = s.read_u8().await.unwrap();
            len += (b & 0x7F) as usize * mult;
            mult *= 128;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body).await.unwrap();
        (first, body)
    })
    .await
    .expect("a packet from frond")
}

async fn raw_connect(port: u16, id: &str) -> (TcpStream, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&connect_pkt(id)).await.unwrap();
    let (first, body) = read_packet(&mut s).await;
    assert_eq!(first, 0x20, "CONNACK");
    assert_eq!(body.get(1), Some(&0), "CONNACK accepted");
    (s, body.first() == Some(&1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_qos2_exactly_once_across_reconnect() {
    let frond = Frond::start_new(FrondSpec::default()).await;
    let port = frond.mqtt_port;
    let (client, mut el) = AsyncClient::new(opts(port, "sub-q2", true), 16);
    connack(&mut el).await;
    subscribe(&client, &mut el, "telemetry/q2").await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let p = next_publish(&mut el).await;
            if tx.send(p).await.is_err() {
                return;
            }
        }
    });

    // PUBLISH QoS 2, PUBREC arrives, the connection drops before PUBREL.
    let (mut s, present) = raw_connect(port, "pub-q2").await;
    assert!(!present);
    let pubq2 = publish_qos2(7, "telemetry/q2", b"once", false);
    s.write_all(&pubq2).await.unwrap();
    assert_eq!(read_packet(&mut s).await, (0x50, vec![0, 7]), "PUBREC");
    drop(s);

    // Reconnect: the session (with packet id 7 awaiting PUBREL) is back.
    // The client resends the PUBLISH with DUP (it may not have seen the
    // PUBREC), then PUBREL.
    let (mut s, present) = raw_connect(port, "pub-q2").await;
    assert!(present, "session_present on reconnect");
    s.write_all(&publish_qos2(7, "telemetry/q2", b"once", true))
        .await
        .unwrap();
    assert_eq!(
        read_packet(&mut s).await,
        (0x50, vec![0, 7]),
        "PUBREC again"
    );
    s.write_all(&packet(0x62, &[0, 7])).await.unwrap();
    assert_eq!(read_packet(&mut s).await, (0x70, vec![0, 7]), "PUBCOMP");
    drop(s);

    // Reconnect once more and resend PUBREL only (PUBCOMP lost): answered,
    // nothing routed.
    let (mut s, _) = raw_connect(port, "pub-q2").await;
    s.write_all(&packet(0x62, &[0, 7])).await.unwrap();
    assert_eq!(read_packet(&mut s).await, (0x70, vec![0, 7]), "PUBCOMP");
    drop(s);

    publish_one(port, "telemetry/q2", "end").await;
    let mut got = Vec::new();
    loop {
        let p = tokio::time::timeout(LONG, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if p == payload("end", 0) {
            break;
        }
        got.push(p);
    }
    assert_eq!(got, vec!["once".to_string()], "delivered exactly once");
}
