//! The JetStream API of frond's local streams, driven by async-nats's
//! `jetstream` client: stream info, get, delete, purge, durable pull
//! consumers (fetch, ack, redelivery, restart), workqueue and interest
//! retention, and the edge rule that a mirrored stream keeps messages
//! until the hub has acknowledged them.

mod common;

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use common::{wait_until, Frond, FrondSpec, NatsServer, LONG};
use smol::stream::StreamExt;

async fn connect_js(f: &Frond) -> jetstream::Context {
    let c = async_nats::connect(format!("127.0.0.1:{}", f.nats_port))
        .await
        .expect("connect to frond's NATS port");
    jetstream::new(c)
}

async fn publish(js: &jetstream::Context, subject: &str, payloads: &[&str]) -> Vec<u64> {
    let mut seqs = Vec::new();
    for p in payloads {
        let ack = js
            .publish(subject.to_string(), p.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
        seqs.push(ack.sequence);
    }
    seqs
}

async fn messages(js: &jetstream::Context, stream: &str) -> u64 {
    let mut s = js.get_stream(stream).await.expect("stream exists");
    s.info().await.expect("stream info").state.messages
}

/// Fetch up to `n` messages (waiting at most `wait` for the first).
async fn fetch(c: &PullConsumer, n: usize, wait: Duration) -> Vec<jetstream::Message> {
    let mut batch = c
        .fetch()
        .max_messages(n)
        .expires(wait)
        .messages()
        .await
        .expect("fetch");
    let mut out = Vec::new();
    while let Some(m) = batch.next().await {
        out.push(m.expect("a message"));
    }
    out
}

/// Batch (waits for messages, up to `wait`) of up to `n`.
async fn pull_wait(c: &PullConsumer, n: usize, wait: Duration) -> Vec<jetstream::Message> {
    let mut batch = c
        .batch()
        .max_messages(n)
        .expires(wait)
        .messages()
        .await
        .expect("batch");
    let mut out = Vec::new();
    while let Some(m) = batch.next().await {
        out.push(m.expect("a message"));
        if out.len() == n {
            break;
        }
    }
    out
}

fn text(m: &jetstream::Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

fn durable(name: &str, ack_wait: Duration) -> pull::Config {
    pull::Config {
        durable_name: Some(name.into()),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_api_and_durable_pull_consumer() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let js = connect_js(&f).await;
    let seqs = publish(&js, "telemetry.a", &["a1", "a2", "a3"]).await;
    assert_eq!(seqs, vec![1, 2, 3]);
    publish(&js, "telemetry.b", &["b1", "b2"]).await;

    let info = js.query_account().await.expect("account info");
    assert_eq!(info.streams, 1);
    let mut stream = js.get_stream("TELEMETRY").await.expect("stream info");
    let i = stream.info().await.unwrap().clone();
    assert_eq!(i.config.subjects, vec!["telemetry.>".to_string()]);
    assert_eq!(
        (
            i.state.messages,
            i.state.first_sequence,
            i.state.last_sequence
        ),
        (5, 1, 5)
    );
    let e = js.get_stream("NOPE").await.unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");

    let m = stream.get_raw_message(2).await.expect("get seq 2");
    assert_eq!(
        (m.subject.as_str(), &m.payload[..]),
        ("telemetry.a", &b"a2"[..])
    );
    let m = stream
        .get_last_raw_message_by_subject("telemetry.a")
        .await
        .unwrap();
    assert_eq!(m.sequence, 3);
    assert!(stream.get_raw_message(99).await.is_err());

    // A durable pull consumer: fetch, ack (synchronously), info.
    let c: PullConsumer = stream
        .create_consumer(durable("d", Duration::from_secs(30)))
        .await
        .expect("create consumer");
    let got = fetch(&c, 3, Duration::from_secs(2)).await;
    assert_eq!(
        got.iter().map(text).collect::<Vec<_>>(),
        vec!["a1", "a2", "a3"]
    );
    assert_eq!(got[0].info().unwrap().stream_sequence, 1);
    for m in &got {
        m.double_ack().await.expect("ack sync");
    }
    let mut c = stream
        .get_consumer::<pull::Config>("d")
        .await
        .expect("lookup");
    let ci = c.info().await.unwrap().clone();
    assert_eq!(ci.ack_floor.stream_sequence, 3);
    assert_eq!(ci.delivered.consumer_sequence, 3);
    assert_eq!(ci.num_pending, 2);
    assert_eq!(ci.num_ack_pending, 0);
    let rest = fetch(&c, 10, Duration::from_millis(300)).await;
    assert_eq!(rest.iter().map(text).collect::<Vec<_>>(), vec!["b1", "b2"]);
    // Nothing more: a no_wait fetch ends at once, empty.
    assert!(fetch(&c, 1, Duration::from_secs(5)).await.is_empty());
    let names: Vec<String> = stream.consumer_names().map(|n| n.unwrap()).collect().await;
    assert_eq!(names, vec!["d".to_string()]);

    // Delete and purge.
    assert!(stream.delete_message(1).await.expect("delete"));
    let p = stream.purge().filter("telemetry.b").await.expect("purge");
    assert_eq!(p.purged, 2);
    assert_eq!(messages(&js, "TELEMETRY").await, 2);
    let p = stream.purge().keep(1).await.expect("purge keep");
    assert_eq!(p.purged, 1);
    assert_eq!(messages(&js, "TELEMETRY").await, 1);
    assert!(stream.delete_consumer("d").await.unwrap().success);
    assert!(stream.get_consumer::<pull::Config>("d").await.is_err());
    // frond.toml streams are not deleted over the API (tests/streams_api.rs
    // covers streams created over it).
    let e = js.delete_stream("TELEMETRY").await.err().expect("refused");
    assert!(e.to_string().contains("frond.toml"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_are_redelivered_after_ack_wait() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let js = connect_js(&f).await;
    publish(&js, "telemetry.x", &["one", "two"]).await;
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    let c: PullConsumer = stream
        .create_consumer(durable("r", Duration::from_millis(300)))
        .await
        .unwrap();
    let first = fetch(&c, 2, Duration::from_secs(2)).await;
    assert_eq!(first.len(), 2);
    first[1].double_ack().await.unwrap();
    // "one" was not acked: it comes back once the ack wait is over.
    let again = pull_wait(&c, 1, LONG).await;
    assert_eq!(again.len(), 1);
    let info = again[0].info().unwrap();
    assert_eq!(
        (
            text(&again[0]).as_str(),
            info.delivered,
            info.consumer_sequence
        ),
        ("one", 2, 1)
    );
    // -NAK: at once; +TERM: never again.
    again[0].ack_with(AckKind::Nak(None)).await.unwrap();
    let third = pull_wait(&c, 1, LONG).await;
    assert_eq!(third[0].info().unwrap().delivered, 3);
    third[0].ack_with(AckKind::Term).await.unwrap();
    let mut c = c;
    wait_until(
        "the terminated message leaves the pending list",
        LONG,
        || {
            let mut c = c.clone();
            async move {
                c.info()
                    .await
                    .map(|i| i.num_ack_pending == 0)
                    .unwrap_or(false)
            }
        },
    )
    .await;
    assert_eq!(c.info().await.unwrap().ack_floor.stream_sequence, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_survives_restart_and_sigkill() {
    let mut f = Frond::start_new(FrondSpec::default()).await;
    {
        let js = connect_js(&f).await;
        publish(&js, "telemetry.k", &["m1", "m2", "m3", "m4"]).await;
        let stream = js.get_stream("TELEMETRY").await.unwrap();
        let c: PullConsumer = stream
            .create_consumer(durable("keep", Duration::from_millis(500)))
            .await
            .unwrap();
        let got = fetch(&c, 4, Duration::from_secs(2)).await;
        assert_eq!(got.len(), 4);
        got[0].double_ack().await.unwrap();
        got[2].double_ack().await.unwrap();
    }
    f.kill9();
    f.start().await;
    let js = connect_js(&f).await;
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    let mut c = stream
        .get_consumer::<pull::Config>("keep")
        .await
        .expect("consumer survived");
    let ci = c.info().await.unwrap().clone();
    assert_eq!((ci.num_ack_pending, ci.delivered.stream_sequence), (2, 4));
    // The unacked ones come back (after their ack wait), the acked never.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        for m in pull_wait(&c, 2, LONG).await {
            seen.push(text(&m));
            m.double_ack().await.unwrap();
        }
    }
    seen.sort();
    assert_eq!(seen, vec!["m2", "m4"]);
    // Clean restart: nothing pending, nothing redelivered.
    f.terminate();
    f.start().await;
    let js = connect_js(&f).await;
    publish(&js, "telemetry.k", &["m5"]).await;
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    let c = stream.get_consumer::<pull::Config>("keep").await.unwrap();
    let next = pull_wait(&c, 1, LONG).await;
    assert_eq!(text(&next[0]), "m5");
}

const RETENTION_STREAMS: &str = "
[[stream]]
name = \"JOBS\"
subjects = [\"jobs.>\"]
retention = \"workqueue\"

[[stream]]
name = \"EVENTS\"
subjects = [\"events.>\"]
retention = \"interest\"
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workqueue_and_interest_retention() {
    let f = Frond::start_new(FrondSpec {
        extra_config: RETENTION_STREAMS.into(),
        ..Default::default()
    })
    .await;
    let js = connect_js(&f).await;

    // Workqueue: acked messages go; overlapping consumers are refused.
    let jobs = js.get_stream("JOBS").await.unwrap();
    let w: PullConsumer = jobs
        .create_consumer(durable("worker", Duration::from_secs(30)))
        .await
        .unwrap();
    let e = jobs
        .create_consumer(durable("other", Duration::from_secs(30)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("non-filtered"), "{e}");
    publish(&js, "jobs.a", &["j1", "j2", "j3"]).await;
    let got = fetch(&w, 3, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 3);
    got[0].double_ack().await.unwrap();
    got[2].double_ack().await.unwrap();
    assert_eq!(messages(&js, "JOBS").await, 1, "acked jobs are removed");
    let left = js
        .get_stream("JOBS")
        .await
        .unwrap()
        .get_raw_message(2)
        .await
        .unwrap();
    assert_eq!(&left.payload[..], b"j2");

    // Interest without consumers: nothing keeps a message (as JetStream).
    publish(&js, "events.x", &["lost"]).await;
    wait_until("an unwanted interest message is removed", LONG, || {
        let js = js.clone();
        async move { messages(&js, "EVENTS").await == 0 }
    })
    .await;
    // Two consumers: a message goes when both acked it.
    let events = js.get_stream("EVENTS").await.unwrap();
    let a: PullConsumer = events
        .create_consumer(durable("a", Duration::from_secs(30)))
        .await
        .unwrap();
    let b: PullConsumer = events
        .create_consumer(pull::Config {
            filter_subject: "events.x".into(),
            ..durable("b", Duration::from_secs(30))
        })
        .await
        .unwrap();
    publish(&js, "events.x", &["e1", "e2"]).await;
    publish(&js, "events.y", &["only-a"]).await;
    for m in fetch(&a, 3, Duration::from_secs(2)).await {
        m.double_ack().await.unwrap();
    }
    assert_eq!(messages(&js, "EVENTS").await, 2, "b has not acked e1, e2");
    for m in fetch(&b, 3, Duration::from_secs(2)).await {
        m.double_ack().await.unwrap();
    }
    assert_eq!(messages(&js, "EVENTS").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_interest_stream_keeps_messages_until_the_hub_has_them() {
    let mut hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    hub.create_stream("HUBEV", &["hubev.>"], Duration::from_secs(120))
        .await;
    hub.stop();
    let mut spec = FrondSpec::with_hub(hub.url());
    spec.extra_config = "
[[stream]]
name = \"EVENTS\"
subjects = [\"events.>\"]
retention = \"interest\"

[[uplink.mirror]]
stream = \"EVENTS\"
to = \"HUBEV\"
subject_prefix = \"hubev.truck1.\"
"
    .into();
    let f = Frond::start_new(spec).await;
    let js = connect_js(&f).await;
    let events = js.get_stream("EVENTS").await.unwrap();
    let c: PullConsumer = events
        .create_consumer(durable("c", Duration::from_secs(30)))
        .await
        .unwrap();
    publish(&js, "events.e", &["e1", "e2", "e3"]).await;
    for m in fetch(&c, 3, Duration::from_secs(2)).await {
        // The sync ack is answered after retention looked at the message.
        m.double_ack().await.unwrap();
    }
    assert_eq!(
        messages(&js, "EVENTS").await,
        3,
        "acked by every consumer but not yet on the hub: kept"
    );
    hub.restart().await;
    hub.wait_count_at_least("HUBEV", 3, LONG).await;
    wait_until("the uplinked, consumed messages are removed", LONG, || {
        let js = js.clone();
        async move { messages(&js, "EVENTS").await == 0 }
    })
    .await;
    let on_hub: Vec<String> = hub
        .read_all("HUBEV")
        .await
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(on_hub, vec!["e1", "e2", "e3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_py_jetstream_client() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/nats_py_js_check.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(f.nats_port.to_string())
        .output()
        .await
        .expect("run python3 (install nats-py: pip install nats-py==2.16.0)");
    assert!(
        out.status.success(),
        "nats-py JetStream against frond failed: {}\n{}\n--- frond log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        f.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_pull_with_messages_stream() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let js = connect_js(&f).await;
    let stream = js.get_stream("TELEMETRY").await.unwrap();
    let c: PullConsumer = stream
        .create_consumer(durable("live", Duration::from_secs(30)))
        .await
        .unwrap();
    let mut msgs = c.messages().await.expect("messages stream");
    // Messages published while the pull request waits are delivered.
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            let payloads: Vec<String> = (0..50).map(|i| format!("live-{i}")).collect();
            let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
            publish(&js, "telemetry.live", &refs).await;
        })
    };
    let mut got = Vec::new();
    while got.len() < 50 {
        let m = tokio::time::timeout(LONG, msgs.next())
            .await
            .expect("a message within the deadline")
            .expect("stream open")
            .expect("a message");
        m.ack().await.unwrap();
        got.push(text(&m));
    }
    publisher.await.unwrap();
    let want: Vec<String> = (0..50).map(|i| format!("live-{i}")).collect();
    assert_eq!(got, want);
}

/// Throughput of a workqueue drained by one pull consumer (fetch 100,
/// ack each, until the stream is empty). Run by hand:
/// `cargo test --test jetstream workqueue_drain_rate -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn workqueue_drain_rate() {
    const N: usize = 5000;
    let f = Frond::start_new(FrondSpec {
        extra_config: RETENTION_STREAMS.into(),
        ..Default::default()
    })
    .await;
    let js = connect_js(&f).await;
    let mut acks = Vec::new();
    for i in 0..N {
        acks.push(js.publish("jobs.x", format!("{i}").into()).await.unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
    let jobs = js.get_stream("JOBS").await.unwrap();
    let w: PullConsumer = jobs
        .create_consumer(durable("w", Duration::from_secs(30)))
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let mut n = 0;
    while n < N {
        let batch = fetch(&w, 100, Duration::from_secs(5)).await;
        for m in &batch {
            m.ack().await.unwrap();
        }
        n += batch.len();
    }
    let fetched = start.elapsed();
    wait_until("the workqueue is empty", LONG, || {
        let js = js.clone();
        async move { messages(&js, "JOBS").await == 0 }
    })
    .await;
    let drained = start.elapsed();
    println!(
        "workqueue: {N} messages fetched+acked in {fetched:?} ({:.0}/s), removed in {drained:?} ({:.0}/s)",
        N as f64 / fetched.as_secs_f64(),
        N as f64 / drained.as_secs_f64()
    );
}

/// Non-prefix removals on a workqueue: 10,000 messages fetched by one
/// consumer, the even sequences acked first (each removal leaves a kept
/// message before it, so none is a prefix purge), timed until the 5,000
/// are gone. Run by hand:
/// `cargo test --test jetstream workqueue_out_of_order_removal_rate -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn workqueue_out_of_order_removal_rate() {
    const N: usize = 10_000;
    let f = Frond::start_new(FrondSpec {
        extra_config: RETENTION_STREAMS.into(),
        ..Default::default()
    })
    .await;
    let js = connect_js(&f).await;
    let mut acks = Vec::new();
    for i in 0..N {
        acks.push(js.publish("jobs.x", format!("{i}").into()).await.unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
    let jobs = js.get_stream("JOBS").await.unwrap();
    let w: PullConsumer = jobs
        .create_consumer(pull::Config {
            max_ack_pending: -1,
            ..durable("w", Duration::from_secs(300))
        })
        .await
        .unwrap();
    let mut all = Vec::new();
    while all.len() < N {
        all.extend(fetch(&w, 1000, Duration::from_secs(5)).await);
    }
    let start = std::time::Instant::now();
    for m in all
        .iter()
        .filter(|m| m.info().unwrap().stream_sequence % 2 == 0)
    {
        m.ack().await.unwrap();
    }
    wait_until("the even half is removed", LONG, || {
        let js = js.clone();
        async move {
            // The service may be too busy to answer in the client's timeout.
            match js.get_stream("JOBS").await {
                Ok(mut s) => s
                    .info()
                    .await
                    .is_ok_and(|i| i.state.messages == (N / 2) as u64),
                Err(_) => false,
            }
        }
    })
    .await;
    let t = start.elapsed();
    println!(
        "workqueue: {} out-of-order removals in {t:?} ({:.0}/s)",
        N / 2,
        (N / 2) as f64 / t.as_secs_f64()
    );
}
