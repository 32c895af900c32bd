//! Key/Value through the stock async-nats 0.38 KV API against frond,
//! unmodified: bucket create/get/delete, put/get/entry, create (only if
//! absent, also after a delete), update (CAS on the revision), delete,
//! purge, per-key history, keys, watch (new, all, with history, from a
//! revision), TTL (max_age), max_value_size and status, with exact values
//! and revisions; puts acknowledged before SIGKILL survive it; an MQTT
//! device subscribed to `$KV/cfg/#` sees values put through the KV API.
//!
//! async-nats watchers and `history`/`keys` are ordered push consumers
//! that end their initial phase on the delivery whose ack subject says
//! `pending = 0`: these tests hang (and time out) without exact pending
//! counts and the `last_per_subject` deliver policy.

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use common::*;
use smol::stream::StreamExt;

const STEP: Duration = Duration::from_secs(10);

async fn js(f: &Frond) -> jetstream::Context {
    let c = async_nats::connect(format!("127.0.0.1:{}", f.nats_port))
        .await
        .expect("connect to frond");
    jetstream::new(c)
}

async fn bucket(js: &jetstream::Context, name: &str, history: i64) -> kv::Store {
    js.create_key_value(kv::Config {
        bucket: name.into(),
        history,
        max_value_size: 64,
        ..Default::default()
    })
    .await
    .expect("create_key_value")
}

/// The next entry of a watcher (within [`STEP`]).
async fn next(w: &mut kv::Watch) -> kv::Entry {
    tokio::time::timeout(STEP, w.next())
        .await
        .expect("watch entry in time")
        .expect("watch open")
        .expect("watch entry")
}

/// (key, value, revision, operation) of an entry.
fn e(x: &kv::Entry) -> (String, String, u64, kv::Operation) {
    (
        x.key.clone(),
        String::from_utf8_lossy(&x.value).into_owned(),
        x.revision,
        x.operation,
    )
}

fn put(k: &str, v: &str, rev: u64) -> (String, String, u64, kv::Operation) {
    (k.into(), v.into(), rev, kv::Operation::Put)
}

async fn history(s: &kv::Store, key: &str) -> Vec<(String, String, u64, kv::Operation)> {
    let h = s.history(key).await.expect("history");
    let all: Vec<_> = tokio::time::timeout(STEP, h.collect::<Vec<_>>())
        .await
        .expect("history ends (pending reaches 0)");
    all.iter().map(|x| e(x.as_ref().expect("entry"))).collect()
}

async fn keys(s: &kv::Store) -> Vec<String> {
    let k = s.keys().await.expect("keys");
    let mut all: Vec<String> = tokio::time::timeout(STEP, k.collect::<Vec<_>>())
        .await
        .expect("keys end (pending reaches 0)")
        .into_iter()
        .map(|k| k.expect("key"))
        .collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_create_update_delete_purge_history_keys() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let js = js(&f).await;
    let s = bucket(&js, "cfg", 5).await;
    assert_eq!(s.put("a", "1".into()).await.expect("put"), 1);
    assert_eq!(s.put("b", "2".into()).await.expect("put"), 2);
    assert_eq!(s.put("a", "3".into()).await.expect("put"), 3);
    assert_eq!(s.get("a").await.expect("get"), Some("3".into()));
    assert_eq!(s.get("nope").await.expect("get"), None);
    let a = s.entry("a").await.expect("entry").expect("a exists");
    assert_eq!(e(&a), put("a", "3", 3));

    // create: only if absent.
    let err = s.create("a", "x".into()).await.expect_err("a exists");
    assert_eq!(err.kind(), kv::CreateErrorKind::AlreadyExists, "{err:?}");
    assert_eq!(s.create("c", "c1".into()).await.expect("create c"), 4);
    // update: CAS on the revision.
    let err = s.update("a", "4".into(), 1).await.expect_err("stale");
    assert_eq!(
        err.kind(),
        kv::UpdateErrorKind::WrongLastRevision,
        "{err:?}"
    );
    assert_eq!(s.update("a", "4".into(), 3).await.expect("update"), 5);
    // delete, then create again.
    s.delete("b").await.expect("delete");
    assert_eq!(s.get("b").await.expect("get"), None);
    let b = s.entry("b").await.expect("entry").expect("delete marker");
    assert_eq!((b.revision, b.operation), (6, kv::Operation::Delete));
    assert_eq!(
        s.create("b", "b2".into())
            .await
            .expect("create after delete"),
        7
    );
    // purge: one marker left of c's history.
    s.purge("c").await.expect("purge");
    let hc = history(&s, "c").await;
    assert_eq!(
        hc,
        vec![("c".to_string(), String::new(), 8, kv::Operation::Purge)]
    );
    // history of a: every revision, in order.
    assert_eq!(
        history(&s, "a").await,
        vec![put("a", "1", 1), put("a", "3", 3), put("a", "4", 5)]
    );
    // keys: deleted and purged keys left out.
    assert_eq!(keys(&s).await, vec!["a", "b"]);
    // per-key history limit (5).
    for i in 0..7 {
        s.put("h", format!("h{i}").into()).await.expect("put h");
    }
    let hh = history(&s, "h").await;
    let want: Vec<_> = (2..7).map(|i| put("h", &format!("h{i}"), 9 + i)).collect();
    assert_eq!(hh, want);
    // max_value_size (64) refused.
    let big = "x".repeat(65);
    s.put("big", big.into())
        .await
        .expect_err("value over max_value_size");
    s.put("fits", "y".repeat(64).into())
        .await
        .expect("64 bytes fit");
    // status from a fresh lookup.
    let st = js
        .get_key_value("cfg")
        .await
        .expect("get_key_value")
        .status()
        .await
        .expect("status");
    assert_eq!((st.bucket(), st.history()), ("cfg", 5));
    // a: 1 3 4; b: 2, its delete marker, b2 (a delete keeps the history);
    // c: its purge marker; h: h2..h6; fits.
    assert_eq!(st.values(), 3 + 3 + 1 + 5 + 1);

    js.delete_key_value("cfg").await.expect("delete bucket");
    assert!(js.get_key_value("cfg").await.is_err(), "bucket gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_initial_values_then_updates() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let js = js(&f).await;
    let s = bucket(&js, "cfg", 10).await;
    s.put("a", "a1".into()).await.expect("put");
    s.put("b", "b1".into()).await.expect("put");
    s.put("a", "a2".into()).await.expect("put");
    s.put("c.x", "cx".into()).await.expect("put");

    // watch_with_history on all keys: the newest value per key, the last
    // one marked current, then updates.
    let mut all = s.watch_with_history(">").await.expect("watch_with_history");
    let first = [
        next(&mut all).await,
        next(&mut all).await,
        next(&mut all).await,
    ];
    let got: Vec<_> = first.iter().map(e).collect();
    assert_eq!(
        got,
        vec![put("b", "b1", 2), put("a", "a2", 3), put("c.x", "cx", 4)]
    );
    assert_eq!(
        first
            .iter()
            .map(|x| (x.delta, x.seen_current))
            .collect::<Vec<_>>(),
        vec![(2, false), (1, false), (0, true)]
    );
    // A single key with history: its newest value only.
    let mut one = s.watch_with_history("a").await.expect("watch a");
    assert_eq!(e(&next(&mut one).await), put("a", "a2", 3));
    // From a revision: everything from there that matches.
    let mut from = s.watch_from_revision("a", 2).await.expect("from revision");
    assert_eq!(e(&next(&mut from).await), put("a", "a2", 3));
    // New only.
    let mut new = s.watch("a").await.expect("watch");
    let mut every = s.watch_all().await.expect("watch_all");

    s.put("a", "a3".into()).await.expect("put");
    s.delete("b").await.expect("delete");
    for w in [&mut all, &mut every] {
        assert_eq!(e(&next(w).await), put("a", "a3", 5));
        let d = next(w).await;
        assert_eq!(
            (d.key.as_str(), d.revision, d.operation),
            ("b", 6, kv::Operation::Delete)
        );
    }
    for w in [&mut one, &mut from, &mut new] {
        let x = next(w).await;
        assert_eq!((e(&x), x.seen_current), (put("a", "a3", 5), true));
    }
    // An empty bucket: keys is empty, watch_with_history ends at once.
    let empty = bucket(&js, "empty", 1).await;
    assert!(keys(&empty).await.is_empty());
    let mut w = empty.watch_with_history(">").await.expect("watch empty");
    assert!(tokio::time::timeout(STEP, w.next())
        .await
        .expect("ends")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expires_values() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let js = js(&f).await;
    let s = js
        .create_key_value(kv::Config {
            bucket: "ttl".into(),
            max_age: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .expect("create_key_value with max_age");
    assert_eq!(s.put("k", "v".into()).await.expect("put"), 1);
    assert_eq!(s.get("k").await.expect("get"), Some("v".into()));
    wait_until("k expires", LONG, || async {
        s.get("k").await.expect("get").is_none()
    })
    .await;
    let st = js.get_key_value("ttl").await.expect("get_key_value");
    assert_eq!(
        st.status().await.expect("status").max_age(),
        Duration::from_secs(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_sigkill_with_their_revisions() {
    let mut f = Frond::start_new(FrondSpec::default()).await;
    let mut acked = Vec::new();
    {
        let js = js(&f).await;
        let s = bucket(&js, "crash", 3).await;
        for i in 0..300u64 {
            let key = format!("k{}", i % 40);
            let rev = s.put(&key, format!("v{i}").into()).await.expect("put");
            acked.push((key, format!("v{i}"), rev));
        }
        f.kill9();
    }
    f.start().await;
    let js = js(&f).await;
    let s = js
        .get_key_value("crash")
        .await
        .expect("bucket after restart");
    // The newest acknowledged revision of each key is its entry.
    let mut newest = std::collections::BTreeMap::new();
    for (k, v, rev) in &acked {
        newest.insert(k.clone(), (v.clone(), *rev));
    }
    assert_eq!(acked.last().map(|a| a.2), Some(300));
    for (k, (v, rev)) in &newest {
        let x = s.entry(k.as_str()).await.expect("entry").expect("key kept");
        assert_eq!(e(&x), put(k, v, *rev));
    }
    // And the history kept per key (3) is the last three acknowledged.
    let h: Vec<_> = history(&s, "k7").await;
    let k7: Vec<_> = acked.iter().filter(|a| a.0 == "k7").collect();
    let want: Vec<_> = k7[k7.len() - 3..]
        .iter()
        .map(|a| put(&a.0, &a.1, a.2))
        .collect();
    assert_eq!(h, want);
    assert_eq!(keys(&s).await.len(), 40);
    // Revisions go on after the restart.
    assert_eq!(s.put("k0", "after".into()).await.expect("put"), 301);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_device_sees_values_put_through_the_kv_api() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let f = Frond::start_new(FrondSpec::default()).await;
    let js = js(&f).await;
    let s = bucket(&js, "cfg", 5).await;
    s.put("mode", "eco".into()).await.expect("put");
    s.put("fan.speed", "3".into()).await.expect("put");

    let mut o = MqttOptions::new("kv-device", "127.0.0.1", f.mqtt_port);
    o.set_keep_alive(Duration::from_secs(10));
    let (c, mut el) = AsyncClient::new(o, 16);
    c.subscribe("$KV/cfg/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut got = Vec::new();
    let mut put_live = false;
    while got.len() < 4 {
        match tokio::time::timeout(LONG, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push((
                p.topic.clone(),
                String::from_utf8_lossy(&p.payload).into_owned(),
                p.retain,
            )),
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {}
            Ok(Ok(_)) => {}
            other => panic!("MQTT connection: {other:?}"),
        }
        if got.len() == 2 && !put_live {
            put_live = true;
            s.put("mode", "boost".into()).await.expect("put");
            s.update("fan.speed", "4".into(), 2).await.expect("update");
        }
    }
    let m = |t: &str, v: &str, r: bool| (t.to_string(), v.to_string(), r);
    assert_eq!(
        got,
        vec![
            m("$KV/cfg/mode", "eco", true),
            m("$KV/cfg/fan/speed", "3", true),
            m("$KV/cfg/mode", "boost", false),
            m("$KV/cfg/fan/speed", "4", false),
        ]
    );
    c.disconnect().await.ok();
}

/// A bucket sourced down from the hub (`[[uplink.source]]` from the hub's
/// `KV_cfg` into the local `KV_cfg` of frond.toml) works as a local
/// bucket: `get` and a local `watch_with_history` see the hub's puts and
/// deletes as they arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_sourced_from_the_hub_is_watched_locally() {
    let hub = NatsServer::start().await;
    let hjs = hub.jetstream().await;
    let hkv = wait_for("hub bucket created", LONG, || {
        let hjs = hjs.clone();
        async move {
            hjs.create_key_value(kv::Config {
                bucket: "cfg".into(),
                history: 5,
                ..Default::default()
            })
            .await
            .ok()
        }
    })
    .await;
    hkv.put("mode", "eco".into()).await.expect("hub put");
    let mut spec = FrondSpec::with_hub(hub.url());
    spec.extra_config = r#"
[[stream]]
name = "KV_cfg"
subjects = ["$KV.cfg.>"]
max_msgs_per_subject = 5
allow_rollup = true
allow_direct = true

[[uplink.source]]
from = "KV_cfg"
stream = "KV_cfg"
filter = "$KV.cfg.>"
"#
    .into();
    let f = Frond::start_new(spec).await;
    let js = js(&f).await;
    let s = js.get_key_value("cfg").await.expect("local bucket");
    wait_until("the hub's value arrives", LONG, || async {
        s.get("mode").await.ok().flatten() == Some("eco".into())
    })
    .await;
    let mut w = s.watch_with_history(">").await.expect("watch");
    let x = next(&mut w).await;
    assert_eq!((e(&x), x.seen_current), (put("mode", "eco", 1), true));
    hkv.put("mode", "boost".into()).await.expect("hub put");
    hkv.put("fan", "3".into()).await.expect("hub put");
    hkv.delete("mode").await.expect("hub delete");
    assert_eq!(e(&next(&mut w).await), put("mode", "boost", 2));
    assert_eq!(e(&next(&mut w).await), put("fan", "3", 3));
    let d = next(&mut w).await;
    assert_eq!(
        (d.key.as_str(), d.revision, d.operation),
        ("mode", 4, kv::Operation::Delete)
    );
    assert_eq!(s.get("mode").await.expect("get"), None);
    assert_eq!(s.get("fan").await.expect("get"), Some("3".into()));
}

/// `by_start_time` (here on a KV stream, with the time of a revision as
/// async-nats reports it): the consumer starts at the first message
/// stored at or after it, and its `num_pending` counts exactly what it
/// will deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_by_start_time_starts_at_that_time() {
    use jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let f = Frond::start_new(FrondSpec::default()).await;
    let js = js(&f).await;
    let s = bucket(&js, "t", 5).await;
    s.put("a", "1".into()).await.expect("put");
    s.put("a", "2".into()).await.expect("put");
    s.put("b", "3".into()).await.expect("put");
    let t = s.entry("a").await.expect("entry").expect("a").created;
    let stream = js.get_stream("KV_t").await.expect("stream");
    let mut c = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::ByStartTime { start_time: t },
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("by_start_time consumer");
    assert_eq!(c.info().await.expect("info").num_pending, 2);
    let msgs: Vec<_> = c
        .fetch()
        .max_messages(10)
        .messages()
        .await
        .expect("fetch")
        .collect()
        .await;
    let got: Vec<(String, Vec<u8>)> = msgs
        .into_iter()
        .map(|m| {
            let m = m.expect("message");
            (m.subject.to_string(), m.payload.to_vec())
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("$KV.t.a".to_string(), b"2".to_vec()),
            ("$KV.t.b".to_string(), b"3".to_vec())
        ]
    );
}
