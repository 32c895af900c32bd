//! The live bridge (`[[uplink.export]]`, `[[uplink.import]]`) end to end:
//! a real nats-server hub (a 3-node cluster where failover matters) with
//! async-nats clients on it, frond with async-nats and rumqttc v5 clients
//! locally. Every test counts exact message sets on both sides, closed by
//! a fence message through the same path.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use common::mqtt5::*;
use common::*;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, MqttOptions};
use smol::stream::StreamExt;
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

/// `[[uplink.export]]`/`[[uplink.import]]` tables.
fn bridge_config(exports: &[&str], imports: &[&str]) -> String {
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut c = String::new();
    if !exports.is_empty() {
        c.push_str(&format!(
            "\n[[uplink.export]]\nsubjects = [{}]\n",
            list(exports)
        ));
    }
    if !imports.is_empty() {
        c.push_str(&format!(
            "\n[[uplink.import]]\nsubjects = [{}]\n",
            list(imports)
        ));
    }
    c
}

async fn start_frond(hub_url: String, extra: String) -> Frond {
    let mut spec = FrondSpec::with_hub(hub_url);
    spec.extra_config = extra;
    Frond::start_new(spec).await
}

async fn hub_with_stream() -> NatsServer {
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.truck1.>"], Duration::from_secs(60))
        .await;
    hub
}

async fn local_nats(f: &Frond) -> async_nats::Client {
    async_nats::connect(format!("127.0.0.1:{}", f.nats_port))
        .await
        .unwrap()
}

/// Everything a subscription receives: (subject, payload).
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, String)>>>);

impl Seen {
    fn push(&self, subject: &str, payload: &[u8]) {
        let p = String::from_utf8_lossy(payload).into_owned();
        self.0.lock().unwrap().push((subject.to_string(), p));
    }

    fn payloads(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().map(|m| m.1.clone()).collect()
    }

    /// Payloads without the readiness probes.
    fn real(&self) -> Vec<String> {
        let mut v = self.payloads();
        v.retain(|p| !p.starts_with("probe"));
        v
    }

    fn has(&self, payload: &str) -> bool {
        self.payloads().iter().any(|p| p == payload)
    }

    fn any_probe(&self) -> bool {
        self.payloads().iter().any(|p| p.starts_with("probe"))
    }
}

/// Collect a NATS subscription into a [`Seen`] (stops with the client).
fn collect(mut sub: async_nats::Subscriber) -> Seen {
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            s.push(m.subject.as_str(), &m.payload);
        }
    });
    seen
}

/// A rumqttc v5 client, with credentials when given.
async fn v5(port: u16, id: &str, creds: Option<(&str, &str)>) -> V5 {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    if let Some((u, p)) = creds {
        opts.set_credentials(u, p);
    }
    V5::connect_with(opts).await
}

/// Collect what `c` receives into a [`Seen`] (topic as subject).
fn collect_v5(c: V5) -> (AsyncClient, Seen, tokio::task::JoinHandle<()>) {
    let seen = Seen::default();
    let s = seen.clone();
    let mut rx = c.rx;
    tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            s.push(&String::from_utf8_lossy(&p.topic), &p.payload);
        }
    });
    (c.client, seen, c.task)
}

/// Publish probes on the hub until `seen` got one: the bridge's hub
/// subscription is in place.
async fn until_bridged_down(hub: &async_nats::Client, subject: &str, seen: &[&Seen]) {
    let mut k = 0;
    wait_until(
        format!("hub messages on {subject} arrive locally"),
        LONG,
        || {
            k += 1;
            let hub = hub.clone();
            let subject = subject.to_string();
            async move {
                hub.publish(subject, format!("probe-{k}").into())
                    .await
                    .unwrap();
                hub.flush().await.unwrap();
                seen.iter().all(|s| s.any_probe())
            }
        },
    )
    .await;
}

/// A request that is retried until it is answered (the bridge may not be
/// subscribed yet: the hub then says "no responders").
async fn request_until_answered(
    c: &async_nats::Client,
    subject: &str,
    headers: Option<HeaderMap>,
    payload: &str,
) -> async_nats::Message {
    wait_for(format!("an answer to a request on {subject}"), LONG, || {
        let c = c.clone();
        let subject = subject.to_string();
        let headers = headers.clone();
        let payload = payload.to_string();
        async move {
            let req = async_nats::Request::new()
                .payload(payload.into())
                .timeout(Some(Duration::from_secs(2)));
            let req = match headers {
                Some(h) => req.headers(h),
                None => req,
            };
            c.send_request(subject, req).await.ok()
        }
    })
    .await
}

/// A local NATS service on `subject` answering `<tag>:<payload>`.
async fn serve(c: &async_nats::Client, subject: &str, tag: &'static str) -> Seen {
    let mut sub = c.subscribe(subject.to_string()).await.unwrap();
    c.flush().await.unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    let c = c.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            s.push(m.subject.as_str(), &m.payload);
            if let Some(reply) = m.reply {
                let mut out = format!("{tag}:").into_bytes();
                out.extend_from_slice(&m.payload);
                let _ = c.publish(reply, out.into()).await;
            }
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_requests_are_answered_by_local_nats_and_mqtt5_services() {
    let hub = hub_with_stream().await;
    let f = start_frond(hub.url(), bridge_config(&["svc.truck1.>"], &[])).await;
    let local = local_nats(&f).await;
    let served = serve(&local, "svc.truck1.diag", "diag").await;
    // An MQTT 5 responder: answers on the Response Topic it is given,
    // with the request's Correlation Data.
    let mut responder = v5(f.mqtt_port, "responder", None).await;
    responder
        .subscribe("svc/truck1/mqtt", QoS::AtMostOnce, None)
        .await;
    let client = responder.client.clone();
    let (topics_tx, mut topics) = mpsc::channel::<(String, Option<Vec<u8>>)>(64);
    let mut rx = std::mem::replace(&mut responder.rx, mpsc::channel(1).1);
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            let p = req.properties.clone().unwrap_or_default();
            let Some(to) = p.response_topic.clone() else {
                continue;
            };
            let corr = p.correlation_data.as_ref().map(|b| b.to_vec());
            let _ = topics_tx.send((to.clone(), corr)).await;
            let back = PublishProperties {
                correlation_data: p.correlation_data,
                ..PublishProperties::default()
            };
            let mut out = b"mqtt:".to_vec();
            out.extend_from_slice(&req.payload);
            client
                .publish_with_properties(to, QoS::AtMostOnce, false, out, back)
                .await
                .unwrap();
        }
    });

    let app = hub.client().await;
    let first = request_until_answered(&app, "svc.truck1.diag", None, "warmup").await;
    assert_eq!(&first.payload[..], b"diag:warmup");
    for i in 0..20 {
        let r = tokio::time::timeout(T, app.request("svc.truck1.diag", format!("q{i}").into()))
            .await
            .expect("answer within 10 s")
            .expect("an answer");
        assert_eq!(String::from_utf8_lossy(&r.payload), format!("diag:q{i}"));
    }
    let mut expect: Vec<String> = vec!["warmup".into()];
    expect.extend((0..20).map(|i| format!("q{i}")));
    let got: Vec<String> = served.payloads();
    // Retries before the bridge was subscribed never reached the service.
    assert_eq!(got, expect, "each request reached the local service once");

    // MQTT 5: the hub's Mqtt-Correlation-Data header comes back.
    for i in 0..5 {
        let mut h = HeaderMap::new();
        h.insert("Mqtt-Correlation-Data", "Y29yci0x"); // "corr-1"
        let r = request_until_answered(&app, "svc.truck1.mqtt", Some(h), &format!("m{i}")).await;
        assert_eq!(String::from_utf8_lossy(&r.payload), format!("mqtt:m{i}"));
        let corr = r
            .headers
            .as_ref()
            .and_then(|h| h.get("Mqtt-Correlation-Data"));
        assert_eq!(corr.map(|v| v.as_str()), Some("Y29yci0x"));
        let (topic, corr) = topics.recv().await.unwrap();
        assert!(topic.starts_with("_INBOX/frond/hub/"), "{topic}");
        assert_eq!(corr.as_deref(), Some(&b"corr-1"[..]));
    }
    assert!(topics.try_recv().is_err(), "no request reached MQTT twice");
    let v = f.varz().await.unwrap();
    assert_eq!(v["uplink"]["bridge"]["replies_up"], 26, "{}", v["uplink"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_requests_on_an_import_are_answered_from_the_hub() {
    let hub = hub_with_stream().await;
    let f = start_frond(hub.url(), bridge_config(&[], &["cloud.svc.>"])).await;
    let app = hub.client().await;
    let served = serve(&app, "cloud.svc.time", "hub").await;
    let local = local_nats(&f).await;
    let r = request_until_answered(&local, "cloud.svc.time", None, "now?").await;
    assert_eq!(&r.payload[..], b"hub:now?");
    // An MQTT 5 requester: the answer comes to its Response Topic with its
    // Correlation Data.
    let mut req = v5(f.mqtt_port, "mqtt-req", None).await;
    req.subscribe("back/me", QoS::AtMostOnce, None).await;
    for i in 0..5 {
        let pp = PublishProperties {
            response_topic: Some("back/me".into()),
            correlation_data: Some(format!("c{i}").into_bytes().into()),
            ..PublishProperties::default()
        };
        req.client
            .publish_with_properties(
                "cloud/svc/time",
                QoS::AtLeastOnce,
                false,
                format!("m{i}"),
                pp,
            )
            .await
            .unwrap();
        let a = tokio::time::timeout(T, req.rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&a.topic[..], b"back/me");
        assert_eq!(String::from_utf8_lossy(&a.payload), format!("hub:m{i}"));
        let corr = a.properties.unwrap_or_default().correlation_data;
        assert_eq!(corr.as_deref(), Some(format!("c{i}").as_bytes()));
    }
    let real: Vec<String> = served.payloads();
    assert_eq!(real.last().map(String::as_str), Some("m4"));
    assert_eq!(real.iter().filter(|p| p.starts_with('m')).count(), 5);
    // Nobody on the hub: the local requester hears "no responders" at once
    // (the hub's 503 status goes back through the inbox).
    let e = tokio::time::timeout(T, local.request("cloud.svc.none", "x".into()))
        .await
        .expect("an answer within 10 s");
    assert!(
        matches!(&e, Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_broadcast_reaches_each_local_subscriber_once() {
    let hub = hub_with_stream().await;
    let f = start_frond(hub.url(), bridge_config(&[], &["fleet.broadcast.>"])).await;
    let local = local_nats(&f).await;
    let nats_seen = collect(local.subscribe("fleet.broadcast.>").await.unwrap());
    local.flush().await.unwrap();
    let mut m = v5(f.mqtt_port, "bsub", None).await;
    m.subscribe("fleet/broadcast/#", QoS::AtMostOnce, None)
        .await;
    let (_mc, mqtt_seen, _t) = collect_v5(m);
    let app = hub.client().await;
    until_bridged_down(&app, "fleet.broadcast.probe", &[&nats_seen, &mqtt_seen]).await;
    // The mirror shares the hub connection: telemetry goes up meanwhile.
    let port = f.mqtt_port;
    let telemetry = tokio::spawn(async move {
        publish_range(port, "dev1", "telemetry/t1", "msg", 0..500).await;
    });
    let expect: Vec<String> = (0..100).map(|i| payload("b", i)).collect();
    for p in &expect {
        app.publish("fleet.broadcast.all", p.clone().into())
            .await
            .unwrap();
    }
    app.publish("fleet.broadcast.all", "fence".into())
        .await
        .unwrap();
    app.flush().await.unwrap();
    wait_until("both local subscribers see the fence", LONG, || async {
        nats_seen.has("fence") && mqtt_seen.has("fence")
    })
    .await;
    let mut with_fence = expect.clone();
    with_fence.push("fence".into());
    assert_eq!(nats_seen.real(), with_fence, "NATS: exactly once, in order");
    assert_eq!(mqtt_seen.real(), with_fence, "MQTT: exactly once, in order");
    // The counters are in /metrics (and `frond status`).
    let (_, metrics) = f.http_get("/metrics").await.unwrap();
    let down: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("frond_uplink_bridge_msgs_down "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no bridge counters in /metrics:\n{metrics}"));
    assert!(down > 101, "{down}");
    telemetry.await.unwrap();
    hub.wait_count_at_least("FLEET", 500, LONG).await;
    let msgs = hub.read_all("FLEET").await;
    let sent: Vec<String> = (0..500).map(|i| payload("msg", i)).collect();
    assert_exact_mirror(&msgs, &sent, "truck1", "fleet.truck1.telemetry.t1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_import_and_export_pass_one_copy_each_way_without_loops() {
    let hub = hub_with_stream().await;
    // import ov.> and export ov.b: the hub has two subscriptions of frond's
    // matching ov.b.
    let f = start_frond(hub.url(), bridge_config(&["ov.b"], &["ov.>"])).await;
    let app = hub.client().await;
    let hub_seen = collect(app.subscribe("ov.>").await.unwrap());
    app.flush().await.unwrap();
    let local_pub = local_nats(&f).await;
    let local_sub = local_nats(&f).await;
    let local_seen = collect(local_sub.subscribe("ov.>").await.unwrap());
    local_sub.flush().await.unwrap();
    until_bridged_down(&app, "ov.b", &[&local_seen]).await;
    // Local -> hub is ready once a local probe reaches the hub.
    let mut k = 0;
    wait_until("local messages on ov.b reach the hub", LONG, || {
        k += 1;
        let c = local_pub.clone();
        let hub_seen = hub_seen.clone();
        async move {
            c.publish("ov.b", format!("probe-up-{k}").into())
                .await
                .unwrap();
            c.flush().await.unwrap();
            hub_seen
                .payloads()
                .iter()
                .any(|p| p.starts_with("probe-up"))
        }
    })
    .await;
    for round in 0..2 {
        for i in 0..20 {
            app.publish("ov.b", format!("h{round}-{i}").into())
                .await
                .unwrap();
            local_pub
                .publish("ov.b", format!("l{round}-{i}").into())
                .await
                .unwrap();
        }
        app.publish("ov.b", format!("hfence{round}").into())
            .await
            .unwrap();
        local_pub
            .publish("ov.b", format!("lfence{round}").into())
            .await
            .unwrap();
        app.flush().await.unwrap();
        local_pub.flush().await.unwrap();
        let (h, l) = (format!("hfence{round}"), format!("lfence{round}"));
        wait_until("both fences on both sides", LONG, || async {
            hub_seen.has(&h) && hub_seen.has(&l) && local_seen.has(&h) && local_seen.has(&l)
        })
        .await;
    }
    // Each side saw every message of both origins exactly once, each
    // origin's messages in order.
    for (side, seen) in [("hub", &hub_seen), ("local", &local_seen)] {
        let real = seen.real();
        for origin in ['h', 'l'] {
            let got: Vec<&String> = real.iter().filter(|p| p.starts_with(origin)).collect();
            let mut want = Vec::new();
            for round in 0..2 {
                want.extend((0..20).map(|i| format!("{origin}{round}-{i}")));
                want.push(format!("{origin}fence{round}"));
            }
            let want: Vec<&String> = want.iter().collect();
            assert_eq!(got, want, "{side} side, messages from {origin}");
        }
        assert_eq!(real.len(), 84, "{side}: nothing else, nothing twice");
    }
    let v = f.varz().await.unwrap();
    let dups = v["uplink"]["bridge"]["duplicates"].as_u64().unwrap();
    assert!(dups >= 42, "the hub's second copies were dropped: {dups}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_reaches_only_exported_subjects_and_no_hub_api() {
    let hub = hub_with_stream().await;
    hub.create_stream("KEEP", &["keep.>"], Duration::from_secs(60))
        .await;
    let f = start_frond(
        hub.url(),
        bridge_config(&["svc.truck1.>"], &["fleet.broadcast.>"]),
    )
    .await;
    let local = local_nats(&f).await;
    // A local subscriber to everything, and a responder that answers
    // whatever reaches it.
    let all = collect(local.subscribe(">").await.unwrap());
    let served = serve(&local, "svc.truck1.>", "ok").await;
    let app = hub.client().await;
    until_bridged_down(&app, "svc.truck1.probe", &[&all]).await;
    for s in [
        "svc.truck2.diag",
        "svc.truck1",
        "cmd.truck1.reboot",
        "fleet.other",
        "_INBOX.frond.hub.1.000000000000000000000000",
        "TELEMETRY.x",
    ] {
        app.publish(s, "intruder".into()).await.unwrap();
    }
    // A request whose reply subject is the hub's JetStream API: the local
    // answer must not become a call that deletes a hub stream.
    app.publish_with_reply("svc.truck1.diag", "$JS.API.STREAM.DELETE.KEEP", "x".into())
        .await
        .unwrap();
    app.publish("svc.truck1.fence", "fence".into())
        .await
        .unwrap();
    app.flush().await.unwrap();
    wait_until("the fence arrives locally", LONG, || async {
        all.has("fence")
    })
    .await;
    let real = all.real();
    assert!(
        !real.iter().any(|p| p == "intruder" || p == "x"),
        "nothing outside the export list, no request answering into the API: {real:?}"
    );
    assert!(!served.real().iter().any(|p| p == "x"));
    // The hub stream is still there.
    let js = hub.jetstream().await;
    assert!(
        js.get_stream("KEEP").await.is_ok(),
        "hub stream KEEP deleted"
    );
    let v = f.varz().await.unwrap();
    assert_eq!(
        v["uplink"]["bridge"]["dropped_reserved"], 1,
        "{}",
        v["uplink"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_user_without_publish_permission_does_not_reach_the_hub() {
    let hub = hub_with_stream().await;
    let auth = r#"
[auth]
anonymous = false
[[auth.users]]
name = "limited"
password = "pw-limited"
allow_publish = ["other.>"]
[[auth.users]]
name = "asker"
password = "pw-asker"
allow_publish = ["fleet.up.>"]
allow_subscribe = ["_INBOX.>"]
[[auth.users]]
name = "ok"
password = "pw-ok"
"#;
    let extra = format!("{}{auth}", bridge_config(&[], &["fleet.up.>"]));
    let f = start_frond(hub.url(), extra).await;
    let app = hub.client().await;
    let hub_seen = collect(app.subscribe("fleet.up.>").await.unwrap());
    app.flush().await.unwrap();
    let connect = |u: &'static str, p: &'static str| {
        let port = f.nats_port;
        async move {
            async_nats::ConnectOptions::with_user_and_password(u.into(), p.into())
                .connect(format!("127.0.0.1:{port}"))
                .await
                .unwrap()
        }
    };
    let ok = connect("ok", "pw-ok").await;
    let limited = connect("limited", "pw-limited").await;
    let mut k = 0;
    wait_until("local messages reach the hub", LONG, || {
        k += 1;
        let ok = ok.clone();
        let hub_seen = hub_seen.clone();
        async move {
            ok.publish("fleet.up.x", format!("probe-{k}").into())
                .await
                .unwrap();
            ok.flush().await.unwrap();
            hub_seen.any_probe()
        }
    })
    .await;
    for i in 0..10 {
        limited
            .publish("fleet.up.x", format!("denied-{i}").into())
            .await
            .unwrap();
    }
    // The flush's PONG comes after frond handled (refused) them all.
    limited.flush().await.unwrap();
    // MQTT: the same user, QoS 1: refused with a PUBACK error code.
    let mut m = v5(f.mqtt_port, "limited-mqtt", Some(("limited", "pw-limited"))).await;
    m.client
        .publish("fleet/up/x", QoS::AtLeastOnce, false, "denied-mqtt")
        .await
        .unwrap();
    let ack = tokio::time::timeout(T, m.acks.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(ack.contains("NotAuthorized"), "{ack}");
    // A request whose reply subject its sender may not subscribe to: the
    // hub's answer would land there in frond's name. Refused.
    let asker = connect("asker", "pw-asker").await;
    asker
        .publish_with_reply("fleet.up.q", "cmd.victim", "bad-reply".into())
        .await
        .unwrap();
    asker
        .publish_with_reply("fleet.up.q", "_INBOX.asker.1", "good-reply".into())
        .await
        .unwrap();
    asker.flush().await.unwrap();
    ok.publish("fleet.up.x", "fence".into()).await.unwrap();
    ok.flush().await.unwrap();
    wait_until("the fence reaches the hub", LONG, || async {
        hub_seen.has("fence")
    })
    .await;
    assert_eq!(hub_seen.real(), vec!["good-reply", "fence"]);
    let v = f.varz().await.unwrap();
    assert_eq!(v["uplink"]["bridge"]["refused"], 1, "{}", v["uplink"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_works_again_after_the_hub_link_is_cut() {
    let hub = NatsCluster::start(3).await;
    hub.create_stream("FLEET", &["fleet.truck1.>"], 3, Duration::from_secs(60))
        .await;
    let proxy = FaultProxy::start(hub.nodes[0].port).await;
    let f = start_frond(
        proxy.url(),
        bridge_config(&["svc.truck1.>"], &["cloud.svc.>"]),
    )
    .await;
    let local = local_nats(&f).await;
    let served = serve(&local, "svc.truck1.diag", "diag").await;
    // The hub application and the hub service sit on other nodes.
    let requester = hub.nodes[2].client().await;
    let hub_svc = hub.nodes[1].client().await;
    let hub_served = serve(&hub_svc, "cloud.svc.time", "hub").await;
    let both_ways = |tag: String| {
        let requester = requester.clone();
        let local = local.clone();
        async move {
            let r = request_until_answered(&requester, "svc.truck1.diag", None, &tag).await;
            assert_eq!(String::from_utf8_lossy(&r.payload), format!("diag:{tag}"));
            let r = request_until_answered(&local, "cloud.svc.time", None, &tag).await;
            assert_eq!(String::from_utf8_lossy(&r.payload), format!("hub:{tag}"));
        }
    };
    both_ways("before".into()).await;
    // Cut: frond reconnects through the proxy.
    proxy.cut();
    both_ways("after-cut".into()).await;
    // Cut and refuse: frond fails over to a node it learned from INFO,
    // and its bridge subscriptions come with it.
    proxy.set_blocked(true);
    proxy.cut();
    both_ways("after-failover".into()).await;
    for seen in [&served, &hub_served] {
        let p = seen.payloads();
        for tag in ["before", "after-cut", "after-failover"] {
            assert_eq!(p.iter().filter(|x| *x == tag).count(), 1, "{tag}: {p:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_prefixes_map_subjects_both_ways() {
    let hub = hub_with_stream().await;
    let extra = r#"
[[uplink.export]]
subjects = ["svc.truck1.>"]
hub_prefix = "edge."
[[uplink.import]]
subjects = ["cfg.truck1.>"]
hub_prefix = "hubside."
"#;
    let f = start_frond(hub.url(), extra.to_string()).await;
    let local = local_nats(&f).await;
    let served = serve(&local, "svc.truck1.diag", "diag").await;
    let local_seen = collect(local.subscribe("cfg.truck1.>").await.unwrap());
    local.flush().await.unwrap();
    let app = hub.client().await;
    let hub_seen = collect(app.subscribe("hubside.cfg.truck1.>").await.unwrap());
    app.flush().await.unwrap();
    let r = request_until_answered(&app, "edge.svc.truck1.diag", None, "q").await;
    assert_eq!(&r.payload[..], b"diag:q");
    // Without the prefix the hub reaches nothing.
    let e = app.request("svc.truck1.diag", "bare".into()).await;
    assert!(e.is_err(), "{e:?}");
    until_bridged_down(&app, "hubside.cfg.truck1.probe", &[&local_seen]).await;
    assert!(local_seen
        .0
        .lock()
        .unwrap()
        .iter()
        .all(|(s, _)| s == "cfg.truck1.probe"));
    local.publish("cfg.truck1.ack", "up".into()).await.unwrap();
    local.flush().await.unwrap();
    wait_until("the local publish reaches the hub", LONG, || async {
        hub_seen.has("up")
    })
    .await;
    let on_hub = hub_seen.0.lock().unwrap().clone();
    let up: Vec<&(String, String)> = on_hub.iter().filter(|m| m.1 == "up").collect();
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].0, "hubside.cfg.truck1.ack");
    assert_eq!(served.real(), vec!["q".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_link_is_down_a_small_buffer_then_counted_drops() {
    let hub = hub_with_stream().await;
    let proxy = FaultProxy::start(hub.port).await;
    let f = start_frond(proxy.url(), bridge_config(&[], &["up.>"])).await;
    let app = hub.client().await;
    let hub_seen = collect(app.subscribe("up.>").await.unwrap());
    app.flush().await.unwrap();
    let local = local_nats(&f).await;
    let mut k = 0;
    wait_until("local messages reach the hub", LONG, || {
        k += 1;
        let local = local.clone();
        let hub_seen = hub_seen.clone();
        async move {
            local
                .publish("up.x", format!("probe-{k}").into())
                .await
                .unwrap();
            local.flush().await.unwrap();
            hub_seen.any_probe()
        }
    })
    .await;
    // A standalone hub announces no other server: frond cannot fail over.
    proxy.set_blocked(true);
    proxy.cut();
    wait_until("frond sees the link down", LONG, || async {
        f.varz()
            .await
            .is_some_and(|v| v["uplink"]["link"] != "connected")
    })
    .await;
    let n = 1000;
    let pad = "x".repeat(1000);
    for i in 0..n {
        local
            .publish("up.x", format!("m{i:04}-{pad}").into())
            .await
            .unwrap();
    }
    local.flush().await.unwrap();
    // Every message is accounted for before the link returns: kept in the
    // 64 KiB buffer or counted as dropped.
    let kept = wait_for("all 1000 messages handled by the bridge", LONG, || async {
        let v = f.varz().await?;
        let b = &v["uplink"]["bridge"];
        let dropped = b["dropped_link_down"].as_u64()? + b["dropped_local_overflow"].as_u64()?;
        let up = b["msgs_up"].as_u64()?;
        (dropped + up == n + k as u64).then_some((up, dropped))
    })
    .await;
    proxy.set_blocked(false);
    local.publish("up.x", "fence".into()).await.unwrap();
    local.flush().await.unwrap();
    wait_until("the fence reaches the hub", LONG, || async {
        hub_seen.has("fence")
    })
    .await;
    let got: Vec<String> = hub_seen
        .real()
        .into_iter()
        .filter(|p| p.starts_with('m'))
        .map(|p| p[..5].to_string())
        .collect();
    let want: Vec<String> = (0..got.len()).map(|i| format!("m{i:04}")).collect();
    assert_eq!(got, want, "the first messages, in order, once each");
    assert!(
        (40..=64).contains(&got.len()),
        "about 64 KiB kept: {}",
        got.len()
    );
    let v = f.varz().await.unwrap();
    let b = &v["uplink"]["bridge"];
    let dropped =
        b["dropped_link_down"].as_u64().unwrap() + b["dropped_local_overflow"].as_u64().unwrap();
    assert_eq!(got.len() as u64 + dropped, n, "{b} {kept:?}");
}
