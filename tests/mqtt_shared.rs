//! Shared subscriptions (`$share/{group}/{filter}`) with real clients: an
//! MQTT 3.1.1 member (rumqttc v4), an MQTT 5 member (rumqttc v5) and a NATS
//! queue subscriber of the same group (async-nats) split the messages of
//! one subject, each message to exactly one of them; a plain subscriber
//! still gets everything; retained messages are not sent to shared
//! subscriptions; UNSUBSCRIBE of the shared filter takes a member out.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use smol::stream::StreamExt;
use tokio::sync::mpsc;

/// What a v4 client's event loop reports.
enum Got {
    Msg(String),
    Acked,
}

/// A rumqttc v4 client whose SUBACK/UNSUBACK/PUBACK and payloads arrive on
/// a channel.
async fn v4(port: u16, id: &str) -> (AsyncClient, mpsc::UnboundedReceiver<Got>) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let id = id.to_string();
    tokio::spawn(async move {
        loop {
            let got = match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    Got::Msg(String::from_utf8_lossy(&p.payload).into_owned())
                }
                Ok(Event::Incoming(
                    Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PubAck(_),
                )) => Got::Acked,
                Ok(_) => continue,
                Err(e) => panic!("{id}: {e}"),
            };
            if tx.send(got).is_err() {
                return;
            }
        }
    });
    (client, rx)
}

async fn acked(rx: &mut mpsc::UnboundedReceiver<Got>) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Got::Acked)) => return,
            Ok(Some(Got::Msg(_))) => {}
            other => panic!(
                "no SUBACK/UNSUBACK/PUBACK within 10 s ({:?})",
                other.is_ok()
            ),
        }
    }
}

/// Payloads received so far.
fn drain(rx: &mut mpsc::UnboundedReceiver<Got>, into: &mut Vec<String>) {
    while let Ok(g) = rx.try_recv() {
        if let Got::Msg(m) = g {
            into.push(m);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_v4_v5_and_nats_queue_members_share_a_group() {
    let frond = Frond::start_new(FrondSpec::default()).await;
    let port = frond.mqtt_port;

    // A retained message from before anyone subscribed.
    let (publisher, mut pub_rx) = v4(port, "publisher").await;
    publisher
        .publish("jobs/old", QoS::AtLeastOnce, true, "retained")
        .await
        .unwrap();
    // Stored (PUBACK) before anyone subscribes, so it is not routed live.
    acked(&mut pub_rx).await;

    // Members: MQTT 3.1.1, MQTT 5, NATS queue group "g".
    let (m4, mut m4_rx) = v4(port, "member-v4").await;
    m4.subscribe("$share/g/jobs/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    acked(&mut m4_rx).await;

    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    let mut opts = rumqttc::v5::MqttOptions::new("member-v5", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (m5, mut el5) = rumqttc::v5::AsyncClient::new(opts, 64);
    let (m5_tx, mut m5_rx) = mpsc::unbounded_channel::<P5>();
    tokio::spawn(async move {
        loop {
            match el5.poll().await {
                Ok(rumqttc::v5::Event::Incoming(p)) => {
                    if m5_tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("member-v5: {e}"),
            }
        }
    });
    m5.subscribe("$share/g/jobs/+", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut v5_got = Vec::new();
    let mut shared_available = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), m5_rx.recv()).await {
            Ok(Some(P5::ConnAck(c))) => {
                shared_available = c.properties.and_then(|p| p.shared_subscription_available)
            }
            Ok(Some(P5::SubAck(s))) => {
                assert_eq!(format!("{:?}", s.return_codes), "[Success(AtLeastOnce)]");
                break;
            }
            Ok(Some(P5::Publish(p))) => v5_got.push(String::from_utf8_lossy(&p.payload).into()),
            Ok(Some(_)) => {}
            other => panic!("member-v5: no SUBACK within 10 s ({:?})", other.is_ok()),
        }
    }
    assert_eq!(
        shared_available,
        Some(1),
        "CONNACK advertises shared subscriptions"
    );

    let nats = async_nats::connect(format!("127.0.0.1:{}", frond.nats_port))
        .await
        .expect("NATS connect");
    let mut queue = nats
        .queue_subscribe("jobs.*", "g".into())
        .await
        .expect("queue subscribe");
    let (queue_tx, mut queue_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = queue.next().await {
            let _ = queue_tx.send(String::from_utf8_lossy(&m.payload).into_owned());
        }
    });
    // A round trip through frond: the SUB before it is registered.
    let inbox = nats.new_inbox();
    let mut sync = nats.subscribe(inbox.clone()).await.unwrap();
    nats.publish(inbox, "".into()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), sync.next())
        .await
        .expect("NATS round trip within 10 s");

    // A plain subscriber sees everything (and the retained message).
    let (plain, mut plain_rx) = v4(port, "plain").await;
    plain.subscribe("jobs/+", QoS::AtLeastOnce).await.unwrap();
    acked(&mut plain_rx).await;

    const N: usize = 300;
    for i in 0..N {
        publisher
            .publish("jobs/a", QoS::AtLeastOnce, false, format!("job-{i}"))
            .await
            .unwrap();
    }
    let mut plain_got = Vec::new();
    wait_until("the plain subscriber got all jobs", LONG, || {
        drain(&mut plain_rx, &mut plain_got);
        let n = plain_got.len();
        async move { n == N + 1 }
    })
    .await;
    assert_eq!(plain_got[0], "retained");

    let mut v4_got = Vec::new();
    let mut nats_got = Vec::new();
    wait_until("the group got every job once", LONG, || {
        drain(&mut m4_rx, &mut v4_got);
        while let Ok(p) = m5_rx.try_recv() {
            if let P5::Publish(p) = p {
                v5_got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
        }
        while let Ok(m) = queue_rx.try_recv() {
            nats_got.push(m);
        }
        let n = v4_got.len() + v5_got.len() + nats_got.len();
        async move { n >= N }
    })
    .await;
    let all: Vec<&String> = v4_got.iter().chain(&v5_got).chain(&nats_got).collect();
    let distinct: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(all.len(), N, "each job once: {}", all.len());
    assert_eq!(distinct.len(), N);
    assert!(
        !distinct.contains(&"retained".to_string()),
        "no retained for shared"
    );
    // Random choice: a member with none of 300 would be a broken spread.
    assert!(
        !v4_got.is_empty() && !v5_got.is_empty() && !nats_got.is_empty(),
        "spread: v4 {} v5 {} nats {}",
        v4_got.len(),
        v5_got.len(),
        nats_got.len()
    );

    // UNSUBSCRIBE of the shared filter: the v4 member leaves the group.
    m4.unsubscribe("$share/g/jobs/+").await.unwrap();
    acked(&mut m4_rx).await;
    drain(&mut m4_rx, &mut v4_got);
    let before = v4_got.len();
    for i in 0..50 {
        publisher
            .publish("jobs/a", QoS::AtLeastOnce, false, format!("late-{i}"))
            .await
            .unwrap();
    }
    wait_until("the plain subscriber got the late jobs", LONG, || {
        drain(&mut plain_rx, &mut plain_got);
        let n = plain_got.len();
        async move { n == N + 51 }
    })
    .await;
    // The publisher's PUBACKs are in (routing happens before the ack).
    drain(&mut pub_rx, &mut Vec::new());
    drain(&mut m4_rx, &mut v4_got);
    assert_eq!(v4_got.len(), before, "nothing after UNSUBSCRIBE");
}
