//! Push and ordered consumers of frond's local streams, driven by
//! async-nats: a durable push consumer with explicit acks and backoff
//! redelivery, a deliver group across two subscribers, flow control and
//! idle heartbeats as a raw subscriber sees them, headers_only,
//! max_ack_pending, an ordered consumer across a SIGKILL restart of frond,
//! and AckSync acknowledgements that survive SIGKILL.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::{push, AckPolicy, DeliverPolicy};
use async_nats::{HeaderMap, StatusCode};
use common::{connect_nats as connect, wait_until, Frond, FrondSpec, LONG};
use smol::stream::StreamExt;

async fn publish_n(js: &jetstream::Context, subject: &str, from: usize, to: usize) {
    for i in from..=to {
        js.publish(subject.to_string(), format!("m{i}").into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
    }
}

/// The next message of `sub` within `LONG`.
async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(LONG, sub.next())
        .await
        .expect("a message within LONG")
        .expect("subscription open")
}

fn text(m: &async_nats::Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

fn header(m: &async_nats::Message, k: &str) -> Option<String> {
    // By name as text: async-nats's `get` with a `&str` misses its
    // standard names (Nats-Last-Consumer…).
    m.headers
        .as_ref()?
        .iter()
        .find(|(n, _)| n.to_string().eq_ignore_ascii_case(k))
        .and_then(|(_, v)| v.first())
        .map(|v| v.as_str().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_push_ack_explicit_and_backoff_redelivery() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let client = connect(&f).await;
    let js = jetstream::new(client.clone());
    publish_n(&js, "telemetry.p", 1, 3).await;
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    let c = stream
        .create_consumer(push::Config {
            durable_name: Some("pd".into()),
            deliver_subject: "push.pd".into(),
            ack_policy: AckPolicy::Explicit,
            backoff: vec![Duration::from_millis(300), Duration::from_millis(600)],
            max_deliver: 3,
            ..Default::default()
        })
        .await
        .expect("create push consumer");
    let mut msgs = c.messages().await.expect("subscribe");
    let mut first = Vec::new();
    for i in 1..=3u64 {
        let m = msgs.next().await.unwrap().unwrap();
        let info = m.info().unwrap();
        assert_eq!(
            (
                text(&m),
                info.stream_sequence,
                info.consumer_sequence,
                info.delivered,
                info.pending
            ),
            (format!("m{i}"), i, i, 1, 3 - i)
        );
        first.push(m);
    }
    let t0 = Instant::now();
    first[0].double_ack().await.unwrap();
    first[2].double_ack().await.unwrap();
    // m2 comes back after backoff[0], then after backoff[1], then never.
    let again = msgs.next().await.unwrap().unwrap();
    let e1 = t0.elapsed();
    let info = again.info().unwrap();
    assert_eq!(
        (text(&again), info.delivered, info.consumer_sequence),
        ("m2".into(), 2, 2)
    );
    assert!(
        e1 >= Duration::from_millis(250),
        "backoff[0] honoured: {e1:?}"
    );
    let t1 = Instant::now();
    let third = msgs.next().await.unwrap().unwrap();
    assert_eq!(
        (text(&third), third.info().unwrap().delivered),
        ("m2".into(), 3)
    );
    assert!(
        t1.elapsed() >= Duration::from_millis(550),
        "backoff[1]: {:?}",
        t1.elapsed()
    );
    // max_deliver reached: once its last ack wait passed, nothing is pending.
    let mut c = c;
    wait_until("m2 given up after max_deliver", LONG, || {
        let mut c = c.clone();
        async move { c.info().await.unwrap().num_ack_pending == 0 }
    })
    .await;
    let ci = c.info().await.unwrap();
    assert_eq!(
        (ci.delivered.stream_sequence, ci.ack_floor.stream_sequence),
        (3, 3)
    );
    // New messages still flow.
    publish_n(&js, "telemetry.p", 4, 4).await;
    let m = msgs.next().await.unwrap().unwrap();
    assert_eq!((text(&m), m.info().unwrap().delivered), ("m4".into(), 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_group_gives_each_message_to_one_member() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let client = connect(&f).await;
    let js = jetstream::new(client.clone());
    let mut a = client
        .queue_subscribe("grp.d", "workers".into())
        .await
        .unwrap();
    let mut b = client
        .queue_subscribe("grp.d", "workers".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    stream
        .create_consumer(push::Config {
            durable_name: Some("grp".into()),
            deliver_subject: "grp.d".into(),
            deliver_group: Some("workers".into()),
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("create");
    publish_n(&js, "telemetry.g", 1, 100).await;
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    while got_a.len() + got_b.len() < 100 {
        tokio::select! {
            m = a.next() => got_a.push(text(&m.unwrap())),
            m = b.next() => got_b.push(text(&m.unwrap())),
            _ = tokio::time::sleep(LONG) => panic!("stalled at {}", got_a.len() + got_b.len()),
        }
    }
    let all: BTreeSet<String> = got_a.iter().chain(got_b.iter()).cloned().collect();
    assert_eq!(all.len(), 100, "no duplicate");
    assert_eq!(all, (1..=100).map(|i| format!("m{i}")).collect());
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both members served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_stalls_until_answered_and_heartbeats_report_it() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let client = connect(&f).await;
    let js = jetstream::new(client.clone());
    let body = vec![b'x'; 16384];
    for _ in 0..100 {
        js.publish("telemetry.fc", body.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut sub = client.subscribe("fc.d").await.unwrap();
    client.flush().await.unwrap();
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    stream
        .create_consumer(push::Config {
            name: Some("fc".into()),
            deliver_subject: "fc.d".into(),
            ack_policy: AckPolicy::None,
            flow_control: true,
            idle_heartbeat: Duration::from_millis(200),
            ..Default::default()
        })
        .await
        .expect("create");
    // 16,396 bytes a message, a 1 MiB window: a request at 512 KiB
    // (message 32), stalled at 1 MiB (message 64); each reply frees what
    // its request covered.
    let mut seqs = Vec::new();
    let mut requests = Vec::new();
    let mut stalls = Vec::new();
    while seqs.len() < 100 {
        let m = next(&mut sub).await;
        match m.status {
            None => seqs.push(m.info_seq()),
            Some(StatusCode::IDLE_HEARTBEAT) if m.reply.is_some() => {
                assert_eq!(m.description.as_deref(), Some("FlowControl Request"));
                requests.push((seqs.len(), m.reply.clone().unwrap().to_string()));
            }
            Some(StatusCode::IDLE_HEARTBEAT) => {
                assert_eq!(m.description.as_deref(), Some("Idle Heartbeat"));
                assert_eq!(
                    header(&m, "Nats-Last-Consumer"),
                    Some(seqs.len().to_string()),
                    "{:?}",
                    m.headers
                );
                if let Some(fc) = header(&m, "Nats-Consumer-Stalled") {
                    stalls.push(seqs.len());
                    client.publish(fc, "".into()).await.unwrap();
                }
            }
            Some(s) => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(seqs, (1..=100).collect::<Vec<u64>>());
    assert_eq!(
        requests.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![32, 65, 97]
    );
    assert_eq!(stalls, vec![64, 96]);
}

trait Seq {
    fn info_seq(&self) -> u64;
}

impl Seq for async_nats::Message {
    /// The stream sequence in the ack reply subject.
    fn info_seq(&self) -> u64 {
        let r = self.reply.as_ref().expect("ack reply");
        r.split('.').nth(5).unwrap().parse().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_only_and_max_ack_pending() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let client = connect(&f).await;
    let js = jetstream::new(client.clone());
    let mut h = HeaderMap::new();
    h.insert("X-Kind", "probe");
    js.publish_with_headers("telemetry.h", h, "hello".into())
        .await
        .unwrap()
        .await
        .unwrap();
    publish_n(&js, "telemetry.h", 2, 5).await;
    let stream = js.get_stream("TELEMETRY").await.unwrap();

    let mut ho = client.subscribe("ho.d").await.unwrap();
    client.flush().await.unwrap();
    stream
        .create_consumer(push::Config {
            name: Some("ho".into()),
            deliver_subject: "ho.d".into(),
            ack_policy: AckPolicy::None,
            headers_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let m = next(&mut ho).await;
    assert!(m.payload.is_empty());
    assert_eq!(header(&m, "Nats-Msg-Size"), Some("5".into()));
    assert_eq!(header(&m, "X-Kind"), Some("probe".into()));

    // max_ack_pending 2: two out, then idle (heartbeats say so) until an ack.
    let mut sub = client.subscribe("map.d").await.unwrap();
    client.flush().await.unwrap();
    stream
        .create_consumer(push::Config {
            durable_name: Some("map".into()),
            deliver_subject: "map.d".into(),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 2,
            idle_heartbeat: Duration::from_millis(100),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut data = Vec::new();
    let mut heartbeat_at = None;
    while heartbeat_at.is_none() {
        let m = next(&mut sub).await;
        if m.status.is_some() {
            heartbeat_at = header(&m, "Nats-Last-Consumer");
        } else {
            data.push(m);
        }
    }
    assert_eq!(heartbeat_at, Some("2".into()), "stalled at max_ack_pending");
    assert_eq!(
        data.iter().map(|m| m.info_seq()).collect::<Vec<_>>(),
        vec![1, 2]
    );
    client
        .publish(data[0].reply.clone().unwrap(), "+ACK".into())
        .await
        .unwrap();
    let m = loop {
        let m = next(&mut sub).await;
        if m.status.is_none() {
            break m;
        }
    };
    assert_eq!(m.info_seq(), 3, "one ack lets exactly the next one out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_consumer_survives_a_restart_of_frond() {
    let mut f = Frond::start_new(FrondSpec::default()).await;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(format!("127.0.0.1:{}", f.nats_port))
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    publish_n(&js, "telemetry.o", 1, 10).await;
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    let c = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: "telemetry.o".into(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut msgs = c.messages().await.unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        let m = msgs.next().await.unwrap().unwrap();
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    f.kill9();
    f.start().await;
    publish_n(&js, "telemetry.o", 11, 15).await;
    while got.len() < 15 {
        let m = tokio::time::timeout(LONG, msgs.next())
            .await
            .expect("ordered consumer resumes")
            .unwrap()
            .unwrap();
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    assert_eq!(got, (1..=15).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_sync_survives_sigkill() {
    let mut f = Frond::start_new(FrondSpec::default()).await;
    {
        let client = connect(&f).await;
        let js = jetstream::new(client);
        publish_n(&js, "telemetry.k", 1, 5).await;
        let stream = js.get_stream("TELEMETRY").await.unwrap();
        let c = stream
            .create_consumer(push::Config {
                durable_name: Some("keep".into()),
                deliver_subject: "keep.d".into(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_millis(500),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = c.messages().await.unwrap();
        for i in 1..=5 {
            let m = msgs.next().await.unwrap().unwrap();
            assert_eq!(m.info().unwrap().stream_sequence, i);
            if i <= 3 {
                m.double_ack().await.unwrap();
            }
        }
    }
    f.kill9();
    f.start().await;
    let client = connect(&f).await;
    let js = jetstream::new(client);
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    let c = stream
        .get_consumer::<push::Config>("keep")
        .await
        .expect("durable push consumer survived");
    let mut msgs = c.messages().await.unwrap();
    publish_n(&js, "telemetry.k", 6, 6).await;
    let mut seen = BTreeSet::new();
    while seen.len() < 3 {
        let m = tokio::time::timeout(LONG, msgs.next())
            .await
            .expect("redelivery")
            .unwrap()
            .unwrap();
        let s = m.info().unwrap().stream_sequence;
        assert!(seen.insert(s), "{s} delivered twice");
        m.double_ack().await.unwrap();
    }
    assert_eq!(
        seen,
        BTreeSet::from([4, 5, 6]),
        "acked ones never come back"
    );
}
