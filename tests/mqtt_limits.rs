//! Per-connection resources are bounded and one bad peer never hurts the
//! others (contract 5, issue 3 "Limits"): a connection flood beyond
//! `mqtt.max_connections`, slowloris clients trickling their CONNECT, and
//! a subscriber that stops reading while a publisher sends QoS 1 at full
//! speed. Real peers: rumqttc and raw TCP sockets.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An MQTT 3.1.1 CONNECT with a clean session and a 60 s keep-alive.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C];
    body.extend((client_id.len() as u16).to_be_bytes());
    body.extend(client_id.as_bytes());
    assert!(body.len() < 128);
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

/// What a raw client got for its CONNECT.
#[derive(Debug, PartialEq)]
enum Answer {
    Accepted,
    /// Closed (EOF or reset) without a CONNACK.
    Closed,
}

/// Sends CONNECT on `s` and waits (10 s) for a CONNACK or the close.
async fn try_connect(s: &mut TcpStream, id: &str) -> Answer {
    if s.write_all(&connect_packet(id)).await.is_err() {
        return Answer::Closed;
    }
    let mut ack = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ack)).await {
        Err(_) => panic!("{id}: neither CONNACK nor close within 10 s"),
        Ok(Err(_)) => Answer::Closed,
        Ok(Ok(_)) => {
            assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "{id}: CONNACK accepted");
            Answer::Accepted
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_is_refused_and_established_clients_keep_working() {
    const MAX: usize = 20;
    let frond = Frond::start_new(FrondSpec {
        mqtt_config: format!("max_connections = {MAX}\n"),
        ..Default::default()
    })
    .await;
    let port = frond.mqtt_port;
    let mut good = MqttProbe::connect(port, "good", "flood/good").await;
    good.roundtrip("before").await;

    // Three times as many sockets as allowed, all opened before any of
    // them says CONNECT.
    let mut socks = Vec::new();
    for _ in 0..3 * MAX {
        socks.push(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("TCP connect (the kernel accepts; frond decides)"),
        );
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    for (i, mut s) in socks.into_iter().enumerate() {
        match try_connect(&mut s, &format!("flood-{i}")).await {
            Answer::Accepted => accepted.push(s),
            Answer::Closed => refused += 1,
        }
    }
    // The probe holds one slot.
    assert!(
        accepted.len() < MAX,
        "at most max_connections in total: {} accepted",
        accepted.len()
    );
    assert!(refused >= 2 * MAX, "the excess was refused: {refused}");
    good.roundtrip("during").await;
    // The accepted flood connections are real sessions (PINGREQ answered).
    for s in &mut accepted {
        s.write_all(&[0xC0, 0x00]).await.expect("PINGREQ");
        let mut resp = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut resp))
            .await
            .expect("PINGRESP within 10 s")
            .expect("read PINGRESP");
        assert_eq!(resp, [0xD0, 0x00]);
    }

    // Once the flood goes away, its slots are free again.
    drop(accepted);
    wait_until("a new client is accepted again", LONG, || async {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
            return false;
        };
        try_connect(&mut s, "after-flood").await == Answer::Accepted
    })
    .await;
    good.roundtrip("after").await;
    assert!(!good.is_broken());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connect_is_cut_at_connect_timeout() {
    let frond = Frond::start_new(FrondSpec {
        mqtt_config: "connect_timeout = \"1s\"\n".into(),
        ..Default::default()
    })
    .await;
    let port = frond.mqtt_port;
    let mut good = MqttProbe::connect(port, "good", "loris/good").await;

    // Each slowloris sends its CONNECT one byte every 100 ms: about 10 s
    // for the whole packet. If every byte pushed the deadline back, the
    // CONNECT would complete and be answered with a CONNACK.
    let id = "x".repeat(90);
    let packet = connect_packet(&id);
    assert!(packet.len() > 100);
    let mut lorises = Vec::new();
    for _ in 0..5 {
        let packet = packet.clone();
        lorises.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("TCP connect");
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for (i, b) in packet.iter().enumerate() {
                tick.tick().await;
                if s.write_all(&[*b]).await.is_err() {
                    return i;
                }
                // Closed by frond? (A read that neither ends nor errors
                // within a tick means still open.)
                let mut buf = [0u8; 16];
                match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return i,
                    Ok(Ok(n)) => panic!("slowloris got {n} bytes (a CONNACK?): {:?}", &buf[..n]),
                    Err(_) => {}
                }
            }
            panic!("the whole CONNECT trickled in and the connection is still open");
        }));
    }
    // Meanwhile the well-behaved client is served.
    for i in 0..5 {
        good.roundtrip(&format!("while-trickling-{i}")).await;
    }
    for l in lorises {
        let sent = l.await.expect("slowloris task");
        assert!(sent < packet.len(), "cut after {sent} bytes");
    }
    good.roundtrip("after").await;
    assert!(!good.is_broken());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_stalls_nobody() {
    const N: usize = 2000;
    const SIZE: usize = 16 * 1024; // 32 MiB in all: more than socket buffers hold
    let frond = Frond::start_new(FrondSpec {
        // The good subscriber's QoS 1 window and queue hold the whole
        // burst, so what it gets does not depend on how fast it
        // acknowledges or reads (the default max_queued_bytes, 8 MiB,
        // would drop for a reader more than 8 MiB behind).
        mqtt_config: "max_inflight = 4096\nmax_queued_bytes = \"64MiB\"\n".into(),
        max_packet_size: Some("1MiB".into()),
        ..Default::default()
    })
    .await;
    let port = frond.mqtt_port;

    // The stalled subscriber: subscribes, then never reads again.
    let mut stalled = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    assert_eq!(try_connect(&mut stalled, "stalled").await, Answer::Accepted);
    let topic = b"load/x";
    let mut sub = vec![0x82, (2 + 2 + topic.len() + 1) as u8, 0x00, 0x01];
    sub.extend((topic.len() as u16).to_be_bytes());
    sub.extend(topic);
    sub.push(0x01); // QoS 1
    stalled.write_all(&sub).await.expect("SUBSCRIBE");
    let mut suback = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), stalled.read_exact(&mut suback))
        .await
        .expect("SUBACK within 10 s")
        .expect("read SUBACK");
    assert_eq!(suback, [0x90, 0x03, 0x00, 0x01, 0x01]);

    // The good subscriber.
    let mut opts = MqttOptions::new("reader", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (reader, mut reader_el) = AsyncClient::new(opts, 16);
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let (sub_tx, mut sub_rx) = tokio::sync::mpsc::channel(1);
    let reader_task = tokio::spawn(async move {
        loop {
            match reader_el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = sub_tx.send(()).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = got_tx.send(p.payload[..8].to_vec());
                }
                Ok(_) => {}
                Err(e) => panic!("reader: {e}"),
            }
        }
    });
    reader
        .subscribe("load/x", QoS::AtLeastOnce)
        .await
        .expect("queue SUBSCRIBE");
    tokio::time::timeout(Duration::from_secs(10), sub_rx.recv())
        .await
        .expect("reader SUBACK within 10 s");

    // The publisher: QoS 1 as fast as rumqttc's window allows.
    let mut opts = MqttOptions::new("writer", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_inflight(100);
    let (writer, mut writer_el) = AsyncClient::new(opts, 256);
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let writer_task = tokio::spawn(async move {
        loop {
            match writer_el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    let _ = ack_tx.send(());
                }
                Ok(_) => {}
                Err(e) => panic!("writer: {e}"),
            }
        }
    });
    let feeder = tokio::spawn(async move {
        for i in 0..N {
            let mut body = vec![b'.'; SIZE];
            body[..8].copy_from_slice(format!("{i:08}").as_bytes());
            writer
                .publish("load/x", QoS::AtLeastOnce, false, body)
                .await
                .expect("queue PUBLISH");
        }
        writer
    });

    let mut acks = 0;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acks < N || got.len() < N {
        tokio::select! {
            Some(()) = ack_rx.recv() => acks += 1,
            Some(p) = got_rx.recv() => got.push(p),
            _ = tokio::time::sleep_until(deadline) => panic!(
                "after 60 s: {acks}/{N} PUBACKs, {}/{N} delivered to the reader", got.len()
            ),
        }
    }
    let want: Vec<Vec<u8>> = (0..N).map(|i| format!("{i:08}").into_bytes()).collect();
    assert_eq!(got, want, "the reader got everything, in order, once");
    let _writer = feeder.await.expect("feeder");

    // frond is still healthy, and the stalled connection is still open
    // (nothing forced it; it just does not read).
    let mut probe = MqttProbe::connect(port, "probe", "load/probe").await;
    probe.roundtrip("still fine").await;
    drop(stalled);
    reader_task.abort();
    writer_task.abort();
}
