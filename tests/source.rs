//! Source-down (issue 12 §2): a hub stream's messages for this node reach
//! a local stream exactly once and in hub order, with the subject
//! transform applied, and reach local live subscribers (NATS and MQTT,
//! persistent MQTT sessions included) — with the hub up, across link
//! cuts, frond restarts and SIGKILL, a hub stream leader's SIGKILL, and a
//! hub stream recreated. Real nats-server cluster (3 nodes, R3 stream with
//! `allow_direct`), async-nats on the hub, async-nats and rumqttc locally.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const HUB_STREAM: &str = "COMMANDS";
/// The hub subject of this node's commands (node "truck1").
const HUB_SUBJECT: &str = "cmd.truck1.reboot";
/// ... and the local subject after the transform.
const LOCAL_SUBJECT: &str = "cmd.reboot";

/// The frond config for a source of COMMANDS (this node's commands) into
/// the local stream CMD, plus `extra` lines in the source.
fn spec(hub_url: String, extra: &str) -> FrondSpec {
    let mut s = FrondSpec::with_hub(hub_url);
    s.extra_config = format!(
        "\n[[stream]]\nname = \"CMD\"\nsubjects = [\"cmd.>\"]\nsync = \"always\"\n\n[[uplink.source]]\nfrom = \"{HUB_STREAM}\"\nfilter = \"cmd.truck1.>\"\nstream = \"CMD\"\nsubject_transform = {{ from = \"cmd.truck1.>\", to = \"cmd.>\" }}\n{extra}\n"
    );
    s
}

/// Creates the hub stream COMMANDS (`allow_direct`) through `node`.
async fn create_commands(node: &NatsServer, replicas: usize) {
    let js = node.jetstream().await;
    let cfg = async_nats::jetstream::stream::Config {
        name: HUB_STREAM.to_string(),
        subjects: vec!["cmd.>".to_string()],
        num_replicas: replicas,
        allow_direct: true,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let what = "the hub stream COMMANDS is created";
    wait_for(what, LONG, || {
        let (js, cfg) = (js.clone(), cfg.clone());
        async move { js.create_stream(cfg).await.ok() }
    })
    .await;
}

/// Publish on the hub through JetStream, each acknowledged (retried until
/// the stream answers: a cluster may be electing a leader).
async fn hub_publish(node: &NatsServer, subject: &str, payloads: &[String]) {
    let js = node.jetstream().await;
    for p in payloads {
        wait_for(format!("the hub stores {p}"), LONG, || {
            let js = js.clone();
            async move {
                let ack = js
                    .publish(subject.to_string(), p.clone().into())
                    .await
                    .ok()?;
                ack.await.ok()
            }
        })
        .await;
    }
}

fn payloads(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| payload(prefix, i)).collect()
}

/// A message of the local stream.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Local {
    seq: u64,
    subject: String,
    payload: String,
    /// `Nats-Stream-Source`.
    origin: Option<String>,
}

/// Every message of local stream `name`, read through frond's JetStream
/// API; `None` while frond does not answer.
async fn try_read_local(frond: &Frond, name: &str) -> Option<Vec<Local>> {
    let client = async_nats::connect(format!("127.0.0.1:{}", frond.nats_port))
        .await
        .ok()?;
    let js = async_nats::jetstream::new(client);
    let mut s = js.get_stream(name).await.ok()?;
    let info = s.info().await.ok()?;
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return Some(out);
    }
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let m = s.get_raw_message(seq).await.ok()?;
        out.push(Local {
            seq,
            subject: m.subject.to_string(),
            payload: String::from_utf8_lossy(&m.payload).into_owned(),
            origin: m
                .headers
                .get("Nats-Stream-Source")
                .map(|v| v.as_str().to_string()),
        });
    }
    Some(out)
}

/// Waits until local stream CMD holds at least `n` messages; returns them.
async fn wait_local(frond: &Frond, n: usize) -> Vec<Local> {
    let what = format!("local stream CMD holds at least {n} messages");
    wait_for(what, LONG, || async {
        try_read_local(frond, "CMD").await.filter(|v| v.len() >= n)
    })
    .await
}

/// The local stream holds exactly `expected`, in order, on the local
/// subject, each with its hub origin `COMMANDS <hub seq>` ascending.
fn assert_exact(local: &[Local], expected: &[String]) {
    let got: Vec<&str> = local.iter().map(|m| m.payload.as_str()).collect();
    let want: Vec<&str> = expected.iter().map(String::as_str).collect();
    if got != want {
        let dups = got.len() - got.iter().collect::<std::collections::BTreeSet<_>>().len();
        let missing: Vec<_> = want.iter().filter(|w| !got.contains(w)).take(5).collect();
        panic!(
            "local stream: {} messages ({dups} duplicated, first missing {missing:?}), want {} in order",
            got.len(),
            want.len()
        );
    }
    let mut last = 0;
    for m in local {
        assert_eq!(m.subject, LOCAL_SUBJECT, "transformed subject of {m:?}");
        let origin = m
            .origin
            .as_deref()
            .unwrap_or_else(|| panic!("no origin header: {m:?}"));
        let (stream, seq) = origin.split_once(' ').expect("origin is `<stream> <seq>`");
        assert_eq!(stream, HUB_STREAM);
        let seq: u64 = seq.parse().expect("hub seq");
        assert!(seq > last, "hub order: {seq} after {last}");
        last = seq;
    }
}

/// What a live subscriber received, shared with its task.
type Received = Arc<Mutex<Vec<(String, String)>>>;

/// A rumqttc client subscribed to `topic`; `clean` false keeps a
/// persistent session. Returns the client, the received (topic, payload)
/// list and the event loop task.
async fn mqtt_sub(
    port: u16,
    id: &str,
    topic: &str,
    clean: bool,
) -> (AsyncClient, Received, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_clean_session(clean);
    let (client, mut el) = AsyncClient::new(opts, 64);
    let got: Received = Arc::default();
    let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
    let g = got.clone();
    let task = tokio::spawn(async move {
        let mut sub_tx = Some(sub_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = sub_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let text = String::from_utf8_lossy(&p.payload).into_owned();
                    g.lock().unwrap().push((p.topic.clone(), text));
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .await
        .expect("queue SUBSCRIBE");
    tokio::time::timeout(Duration::from_secs(10), sub_rx)
        .await
        .expect("SUBACK in time")
        .expect("SUBACK");
    (client, got, task)
}

fn payloads_of(r: &Received) -> Vec<String> {
    r.lock().unwrap().iter().map(|(_, p)| p.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_the_local_stream_and_live_subscribers_exactly_once() {
    // One hub node behind the proxy, so that a cut is an outage (with a
    // cluster frond would fail over to a node it discovered).
    let hub = NatsServer::start().await;
    create_commands(&hub, 1).await;
    let proxy = FaultProxy::start(hub.port).await;
    // A long poll: without the wake-up subscription this test times out.
    let mut frond = Frond::start_new(spec(proxy.url(), "poll_interval = \"120s\"")).await;

    // Live subscribers: NATS, MQTT, and a persistent MQTT session that is
    // offline while part of the commands arrive.
    let local = async_nats::connect(format!("127.0.0.1:{}", frond.nats_port))
        .await
        .expect("connect to frond");
    let mut nats_sub = local.subscribe("cmd.>").await.expect("subscribe");
    local.flush().await.expect("flush");
    let (mqtt, mqtt_got, mqtt_task) = mqtt_sub(frond.mqtt_port, "live", "cmd/#", true).await;
    let (persist, _, persist_task) = mqtt_sub(frond.mqtt_port, "persist", "cmd/#", false).await;
    persist.disconnect().await.ok();
    persist_task.await.ok();

    // Commands for this node and for another one.
    hub_publish(&hub, "cmd.truck2.reboot", &payloads("other", 0..5)).await;
    hub_publish(&hub, HUB_SUBJECT, &payloads("c", 0..100)).await;
    assert_exact(&wait_local(&frond, 100).await, &payloads("c", 0..100));

    // The link is cut while commands are published: they arrive after.
    proxy.set_blocked(true);
    proxy.cut();
    hub_publish(&hub, HUB_SUBJECT, &payloads("c", 100..200)).await;
    proxy.set_blocked(false);
    assert_exact(&wait_local(&frond, 200).await, &payloads("c", 0..200));

    // frond is stopped while commands are published: they arrive after.
    frond.terminate();
    hub_publish(&hub, HUB_SUBJECT, &payloads("c", 200..300)).await;
    frond.start().await;
    let all = wait_local(&frond, 300).await;
    assert_exact(&all, &payloads("c", 0..300));

    // Live subscribers saw the first 200 (frond was down for the rest),
    // once each, in order, on the local subject.
    let mut nats_got = Vec::new();
    while nats_got.len() < 200 {
        let m = tokio::time::timeout(LONG, smol::stream::StreamExt::next(&mut nats_sub))
            .await
            .expect("NATS subscriber receives the commands")
            .expect("subscription open");
        assert_eq!(m.subject.as_str(), LOCAL_SUBJECT);
        nats_got.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    assert_eq!(nats_got, payloads("c", 0..200), "live NATS subscriber");
    wait_until("the MQTT subscriber has 200 commands", LONG, || async {
        mqtt_got.lock().unwrap().len() >= 200
    })
    .await;
    assert_eq!(
        payloads_of(&mqtt_got),
        payloads("c", 0..200),
        "live MQTT subscriber"
    );
    assert!(mqtt_got
        .lock()
        .unwrap()
        .iter()
        .all(|(t, _)| t == "cmd/reboot"));
    drop(mqtt);
    mqtt_task.abort();

    // The persistent session gets every stored command after it left.
    let (_p, p_got, p_task) = mqtt_sub(frond.mqtt_port, "persist", "cmd/#", false).await;
    wait_until("the persistent session has 300 commands", LONG, || async {
        p_got.lock().unwrap().len() >= 300
    })
    .await;
    assert_eq!(
        payloads_of(&p_got),
        payloads("c", 0..300),
        "persistent MQTT session"
    );
    p_task.abort();

    // Status shows the source.
    let varz = frond.varz().await.expect("/varz");
    let s = &varz["uplink"]["sources"][0];
    assert_eq!(s["from"], HUB_STREAM);
    assert_eq!(s["stream"], "CMD");
    assert!(s["hub_seq"].as_u64().unwrap() >= 305, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_frond_mid_source_neither_loses_nor_duplicates() {
    let hub = NatsCluster::start(3).await;
    create_commands(hub.live(), 3).await;
    let all = payloads("k", 0..3000);
    hub_publish(hub.live(), HUB_SUBJECT, &all).await;
    let mut frond = Frond::start_new(spec(hub.nodes[1].url(), "")).await;
    for round in 0..3 {
        let have = try_read_local(&frond, "CMD").await.map_or(0, |v| v.len());
        let what = format!("round {round}: frond stores more commands");
        wait_until(what, LONG, || async {
            try_read_local(&frond, "CMD")
                .await
                .is_some_and(|v| v.len() > have + 200 || v.len() == all.len())
        })
        .await;
        frond.kill9();
        frond.start().await;
    }
    assert_exact(&wait_local(&frond, all.len()).await, &all);

    // The cursor record is lost: the copies in the local stream say where
    // the source was (else deliver = "all" would copy everything again).
    frond.terminate();
    let dir = frond.data_dir().join("uplink");
    let mut removed = 0;
    for e in std::fs::read_dir(&dir).expect("list the uplink dir") {
        let p = e.expect("dir entry").path();
        if p.to_string_lossy().contains("CMD.COMMANDS.source") {
            std::fs::remove_file(&p).expect("remove the cursor record");
            removed += 1;
        }
    }
    assert!(removed > 0, "a cursor record was written");
    frond.start().await;
    let more = payloads("k", 3000..3010);
    hub_publish(hub.live(), HUB_SUBJECT, &more).await;
    let all: Vec<String> = all.into_iter().chain(more).collect();
    assert_exact(&wait_local(&frond, all.len()).await, &all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_hub_stream_leader_mid_source_neither_loses_nor_duplicates() {
    let mut hub = NatsCluster::start(3).await;
    create_commands(hub.live(), 3).await;
    let first = payloads("l", 0..2000);
    hub_publish(hub.live(), HUB_SUBJECT, &first).await;
    let frond = Frond::start_new(spec(hub.nodes[0].url(), "")).await;
    let leader = wait_for("the hub stream has a leader", LONG, || async {
        hub.leader(HUB_STREAM).await
    })
    .await;
    wait_until("frond stores part of the commands", LONG, || async {
        try_read_local(&frond, "CMD")
            .await
            .is_some_and(|v| v.len() >= 300)
    })
    .await;
    hub.nodes[leader].kill9();
    let more = payloads("l", 2000..2500);
    hub_publish(hub.live(), HUB_SUBJECT, &more).await;
    let all: Vec<String> = first.into_iter().chain(more).collect();
    assert_exact(&wait_local(&frond, all.len()).await, &all);
    hub.nodes[leader].restart().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_hub_stream_is_reported_and_copied_from_its_start() {
    let hub = NatsCluster::start(3).await;
    create_commands(hub.live(), 3).await;
    let frond = Frond::start_new(spec(hub.nodes[0].url(), "poll_interval = \"1s\"")).await;
    hub_publish(hub.live(), HUB_SUBJECT, &payloads("old", 0..20)).await;
    assert_exact(&wait_local(&frond, 20).await, &payloads("old", 0..20));

    let js = hub.live().jetstream().await;
    js.delete_stream(HUB_STREAM)
        .await
        .expect("delete the hub stream");
    wait_until("status shows the hub stream missing", LONG, || async {
        frond.varz().await.is_some_and(|v| {
            v["uplink"]["sources"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("not found") || e.contains("no responders"))
        })
    })
    .await;
    create_commands(hub.live(), 3).await;
    // Fewer messages than the old cursor: the new stream's messages are
    // new, taken from its first.
    hub_publish(hub.live(), HUB_SUBJECT, &payloads("new", 0..5)).await;
    let want: Vec<String> = payloads("old", 0..20)
        .into_iter()
        .chain(payloads("new", 0..5))
        .collect();
    let local = wait_local(&frond, 25).await;
    assert_eq!(
        local.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(),
        want
    );
    let origins: Vec<_> = local[20..]
        .iter()
        .map(|m| m.origin.clone().unwrap())
        .collect();
    assert_eq!(
        origins,
        (1..=5)
            .map(|i| format!("{HUB_STREAM} {i}"))
            .collect::<Vec<_>>()
    );
    let varz = frond.varz().await.expect("/varz");
    let s = &varz["uplink"]["sources"][0];
    assert_eq!(s["recreated"], 1, "{s}");
    assert!(s["last_error"].is_null(), "{s}");
    assert!(frond.log_text().contains("recreated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_new_and_start_seq_choose_where_a_new_source_starts() {
    let hub = NatsCluster::start(3).await;
    create_commands(hub.live(), 3).await;
    hub_publish(hub.live(), HUB_SUBJECT, &payloads("before", 0..10)).await;
    let new = Frond::start_new(spec(hub.nodes[0].url(), "deliver = \"new\"")).await;
    let at4 = Frond::start_new(spec(hub.nodes[1].url(), "start_seq = 4")).await;
    wait_until("both sources checked the hub stream", LONG, || async {
        let mut ok = true;
        for f in [&new, &at4] {
            ok &= f.varz().await.is_some_and(|v| {
                v["uplink"]["sources"][0]["hub_created"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            });
        }
        ok
    })
    .await;
    hub_publish(hub.live(), HUB_SUBJECT, &payloads("after", 0..3)).await;
    assert_exact(&wait_local(&new, 3).await, &payloads("after", 0..3));
    let want: Vec<String> = payloads("before", 3..10)
        .into_iter()
        .chain(payloads("after", 0..3))
        .collect();
    assert_exact(&wait_local(&at4, 10).await, &want);
}

/// The hub stream is deleted, recreated and filled past frond's cursor
/// while frond is connected and sourcing (issue 12: "detect it and say
/// so in status; do not silently skip or replay"). The refill goes in
/// through a stream subject transform (`refill.>` → `cmd.>`, as a
/// restore or a sourced backfill would): no core message on the filter,
/// so no wake tells frond before the stream has grown past its cursor,
/// and the poll (120 s) does not come. The next command's wake reads
/// the new stream at the old cursor: every message of the new stream
/// must arrive once, in order, from its first; none of the old ones again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_stream_recreated_and_grown_past_the_cursor_while_connected_is_copied_whole() {
    let hub = NatsCluster::start(3).await;
    create_commands(hub.live(), 3).await;
    let frond = Frond::start_new(spec(hub.nodes[0].url(), "poll_interval = \"120s\"")).await;
    // Once frond has checked the hub stream, its wake subscription is in
    // place on this node (sent before the check): the next publish wakes it.
    let created = |v: &serde_json::Value| v["uplink"]["sources"][0]["hub_created"] != "";
    wait_until("frond has checked the hub stream", LONG, || async {
        frond.varz().await.is_some_and(|v| created(&v))
    })
    .await;
    hub_publish(hub.live(), HUB_SUBJECT, &payloads("old", 0..20)).await;
    assert_exact(&wait_local(&frond, 20).await, &payloads("old", 0..20));
    let hub_seq = |v: &serde_json::Value| v["uplink"]["sources"][0]["hub_seq"].as_u64();
    wait_until("the cursor reaches 20", LONG, || async {
        frond.varz().await.is_some_and(|v| hub_seq(&v) == Some(20))
    })
    .await;

    let js = hub.live().jetstream().await;
    js.delete_stream(HUB_STREAM)
        .await
        .expect("delete the hub stream");
    let cfg = async_nats::jetstream::stream::Config {
        name: HUB_STREAM.to_string(),
        subjects: vec!["cmd.>".to_string(), "refill.>".to_string()],
        num_replicas: 3,
        allow_direct: true,
        subject_transform: Some(async_nats::jetstream::stream::SubjectTransform {
            source: "refill.>".to_string(),
            destination: "cmd.>".to_string(),
        }),
        ..Default::default()
    };
    wait_for("the hub stream COMMANDS is recreated", LONG, || {
        let (js, cfg) = (js.clone(), cfg.clone());
        async move { js.create_stream(cfg).await.ok() }
    })
    .await;
    hub_publish(hub.live(), "refill.truck1.reboot", &payloads("new", 0..30)).await;
    // A command with a wake: frond reads the new stream.
    hub_publish(hub.live(), HUB_SUBJECT, &payloads("new", 30..35)).await;

    wait_until(
        "frond's cursor reaches the new stream's 35",
        LONG,
        || async { frond.varz().await.is_some_and(|v| hub_seq(&v) == Some(35)) },
    )
    .await;
    let local = try_read_local(&frond, "CMD").await.expect("read CMD");
    let want: Vec<String> = payloads("old", 0..20)
        .into_iter()
        .chain(payloads("new", 0..35))
        .collect();
    let got: Vec<String> = local.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(got, want, "old once, then the whole new stream in order");
    assert_exact(&local[..20], &payloads("old", 0..20));
    assert_exact(&local[20..], &payloads("new", 0..35));
    assert_eq!(local[20].origin.as_deref(), Some("COMMANDS 1"));
    let varz = frond.varz().await.expect("/varz");
    let s = &varz["uplink"]["sources"][0];
    assert_eq!(s["recreated"], 1, "{s}");
    assert_eq!(s["stored"], 55, "{s}");
    assert!(frond.log_text().contains("recreated"));
}
