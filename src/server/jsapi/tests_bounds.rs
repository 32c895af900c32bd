//! Resource bounds of the service, driven directly: answer bytes per loop
//! iteration, the shared delivery budget, paged lists, stream and memory
//! limits, and who may replace or update a consumer.

use std::sync::Arc;

use serde_json::{json, Value};
use smol::block_on;

use super::direct::DIRECT_MAX_BYTES;
use super::task::take_requests;
use super::*;
use crate::router::Outbox;
use crate::stream::{Message, StreamConfig};

fn mem_stream(dir: &Path, name: &str, subject: &str) -> StreamHandle {
    let c = StreamConfig {
        storage: Storage::Memory,
        allow_direct: true,
        ..StreamConfig::new(name, &[subject])
    };
    crate::stream::open(&dir.join(name), c).unwrap().0
}

fn put(h: &StreamHandle, subject: &str, size: usize) {
    block_on(h.publish(Message {
        subject: subject.into(),
        headers: None,
        payload: vec![b'x'; size],
    }))
    .unwrap();
}

fn request(subject: &str, reply: &str, body: &str) -> Arc<Msg> {
    Arc::new(Msg {
        subject: subject.into(),
        reply: Some(reply.into()),
        headers: None,
        payload: body.as_bytes().to_vec(),
        publisher: None,
    })
}

#[test]
fn answers_held_per_iteration_are_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let h = mem_stream(dir.path(), "D", "d.>");
    for _ in 0..10 {
        put(&h, "d.a", 1 << 20);
    }
    let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1);
    let inbox = Outbox::new(INBOX_BYTES);
    // 20 batched direct gets, each answered with 8 MiB: 160 MiB if all
    // were answered in one iteration.
    for i in 0..20 {
        let m = request(
            "$JS.API.DIRECT.GET.D",
            &format!("r.{i}"),
            r#"{"seq":1,"batch":100}"#,
        );
        inbox.push(1, m);
    }
    let mut answered = 0;
    let mut rounds = 0;
    while inbox.pending() > 0 {
        block_on(take_requests(&mut api, &inbox, 1));
        let held = api.out_bytes();
        assert!(
            held <= ANSWER_BUDGET + DIRECT_MAX_BYTES + (64 << 10),
            "one iteration holds {held} bytes of answers"
        );
        let out = api.take_out();
        answered += out.iter().filter(|(_, m)| m.payload.is_empty()).count();
        rounds += 1;
    }
    // Every request got its answer (an EOB each), over several iterations.
    assert_eq!(answered, 20);
    assert!(rounds >= 5, "{rounds} iterations");
    block_on(h.close());
}

#[test]
fn pipelined_direct_gets_are_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // 20 MiB of 1 MiB messages, no max_msg_size: any one may be asked for.
    let h = mem_stream(dir.path(), "D", "d.>");
    for _ in 0..20 {
        put(&h, "d.a", 1 << 20);
    }
    let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1);
    let inbox = Outbox::new(INBOX_BYTES);
    for i in 0..100 {
        let body = format!(r#"{{"seq":{}}}"#, i % 20 + 1);
        inbox.push(1, request("$JS.API.DIRECT.GET.D", &format!("r.{i}"), &body));
    }
    let mut answered = 0;
    while inbox.pending() > 0 {
        block_on(take_requests(&mut api, &inbox, 1));
        block_on(api.finish_direct());
        let held = api.out_bytes();
        assert!(
            held <= ANSWER_BUDGET + (1 << 20) + (64 << 10),
            "one iteration holds {held} bytes of answers"
        );
        answered += api.take_out().len();
    }
    assert_eq!(answered, 100);
    // Small messages (a KV bucket) still pipeline: the 64 gets of a burst
    // are pending together.
    let k = mem_stream(dir.path(), "K", "k.>");
    put(&k, "k.a", 100);
    let mut api = JsApi::open(std::slice::from_ref(&k), dir.path(), &[], 1);
    for i in 0..64 {
        let m = request("$JS.API.DIRECT.GET.K.k.a", &format!("r.{i}"), "");
        block_on(api.handle(&m, 1));
    }
    assert_eq!(api.direct.futs().len(), 64);
    block_on(api.finish_direct());
    assert_eq!(api.take_out().len(), 64);
    block_on(h.close());
    block_on(k.close());
}

/// Handle one API request and return its JSON answer (sent to `r`).
fn call(api: &mut JsApi, subject: &str, body: Value) -> Value {
    let m = request(subject, "r", &body.to_string());
    block_on(api.handle(&m, 1));
    api.persist();
    let out = api.take_out();
    let (_, m) = out.into_iter().find(|(to, _)| to == "r").unwrap();
    serde_json::from_slice(&m.payload).unwrap()
}

/// Stream `S` (memory) with `n` messages of 64 KiB on `s.a`, and an API.
fn big_backlog(dir: &Path, n: usize) -> (StreamHandle, JsApi) {
    let h = mem_stream(dir, "S", "s.>");
    for _ in 0..n {
        put(&h, "s.a", 64 << 10);
    }
    let api = JsApi::open(std::slice::from_ref(&h), dir, &[], 1);
    (h, api)
}

/// Runs delivery passes until nothing more goes out; checks every pass
/// against the shared budget and returns the stream sequences each
/// destination received, in order.
fn drain(api: &mut JsApi, passes: usize) -> BTreeMap<String, Vec<u64>> {
    let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for _ in 0..passes {
        block_on(api.deliver_all(1, &|_| true));
        let held = api.out_bytes();
        assert!(
            held <= DELIVERY_BUDGET + (65 << 10) + 1024,
            "one pass holds {held} bytes of deliveries"
        );
        for (to, m) in api.take_out() {
            let Some(r) = m.reply.as_deref() else {
                continue;
            };
            let (_, _, sseq) = crate::stream::consumer::parse_ack_subject(r).unwrap();
            got.entry(to).or_default().push(sseq);
        }
    }
    got
}

#[test]
fn push_consumers_share_one_byte_budget_per_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (h, mut api) = big_backlog(dir.path(), 200);
    for i in 0..4 {
        let v = call(
            &mut api,
            &format!("$JS.API.CONSUMER.CREATE.S.p{i}"),
            json!({"stream_name": "S", "config": {"name": format!("p{i}"),
                "deliver_subject": format!("to.{i}"), "ack_policy": "none"}}),
        );
        assert_eq!(v["name"], format!("p{i}"), "{v}");
    }
    // The first pass stops at the budget: fewer than 200 messages.
    let first = drain(&mut api, 1);
    let sent: usize = first.values().map(Vec::len).sum();
    assert!(sent > 0 && sent < 200, "{sent} messages in one pass");
    assert!(api.next_deadline().1, "more work is reported");
    // Round-robin: all four get everything, in order, exactly once.
    let mut all = first;
    for (to, s) in drain(&mut api, 20) {
        all.entry(to).or_default().extend(s);
    }
    let want: Vec<u64> = (1..=200).collect();
    for i in 0..4 {
        assert_eq!(all.get(&format!("to.{i}")), Some(&want), "to.{i}");
    }
    block_on(h.close());
}

#[test]
fn pull_deliveries_share_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (h, mut api) = big_backlog(dir.path(), 200);
    for i in 0..3 {
        let v = call(
            &mut api,
            &format!("$JS.API.CONSUMER.CREATE.S.c{i}"),
            json!({"stream_name": "S", "config": {"durable_name": format!("c{i}"),
                "ack_policy": "none"}}),
        );
        assert_eq!(v["name"], format!("c{i}"), "{v}");
        let next = request(
            &format!("$JS.API.CONSUMER.MSG.NEXT.S.c{i}"),
            &format!("in.{i}"),
            r#"{"batch":1000}"#,
        );
        block_on(api.handle(&next, 1));
    }
    let all = drain(&mut api, 20);
    let want: Vec<u64> = (1..=200).collect();
    for i in 0..3 {
        assert_eq!(all.get(&format!("in.{i}")), Some(&want), "in.{i}");
    }
    block_on(h.close());
}

#[test]
fn busy_pull_consumers_do_not_starve_push_ones() {
    let dir = tempfile::tempdir().unwrap();
    // 25 MiB of backlog: a pull request for all of it fills the delivery
    // budget for several passes.
    let (h, mut api) = big_backlog(dir.path(), 400);
    let v = call(
        &mut api,
        "$JS.API.CONSUMER.CREATE.S.c",
        json!({"stream_name": "S", "config": {"durable_name": "c", "ack_policy": "none"}}),
    );
    assert_eq!(v["name"], "c", "{v}");
    let next = request("$JS.API.CONSUMER.MSG.NEXT.S.c", "in", r#"{"batch":1000}"#);
    block_on(api.handle(&next, 1));
    let v = call(
        &mut api,
        "$JS.API.CONSUMER.CREATE.S.w",
        json!({"stream_name": "S", "config": {"name": "w",
            "deliver_subject": "watch", "ack_policy": "none"}}),
    );
    assert_eq!(v["name"], "w", "{v}");
    // Both kinds get messages within two passes.
    let mut all = drain(&mut api, 2);
    for to in ["in", "watch"] {
        assert!(all.get(to).is_some_and(|s| !s.is_empty()), "{to}: {all:?}");
    }
    for (to, s) in drain(&mut api, 20) {
        all.entry(to).or_default().extend(s);
    }
    let want: Vec<u64> = (1..=400).collect();
    assert_eq!(all.get("in"), Some(&want));
    assert_eq!(all.get("watch"), Some(&want));
    block_on(h.close());
}

fn err_code(v: &Value) -> u64 {
    v["error"]["err_code"].as_u64().unwrap_or(0)
}

#[test]
fn created_streams_are_limited_in_number_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let admin = Admin {
        broker: crate::router::Broker::new(Vec::new()),
        streams_dir: dir.path().to_path_buf(),
        config_streams: Vec::new(),
        storage_left: None,
        key: None,
        max_streams: 2,
        memory_left: 1 << 20,
        max_memory: 1 << 20,
        max_storage: 0,
    };
    let mut api = JsApi::open(&[], dir.path(), &[], 1).with_admin(admin);
    let create = |api: &mut JsApi, name: &str, extra: Value| {
        let mut cfg = json!({"name": name, "subjects": [format!("{}.>", name.to_lowercase())]});
        if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        call(api, &format!("$JS.API.STREAM.CREATE.{name}"), cfg)
    };
    // A memory stream must say how much RAM it may take, within max_memory.
    let v = create(&mut api, "M", json!({"storage": "memory"}));
    assert_eq!(err_code(&v), 10113, "{v}");
    let v = create(
        &mut api,
        "M",
        json!({"storage": "memory", "max_bytes": 2 << 20}),
    );
    assert_eq!(err_code(&v), 10028, "{v}");
    assert_eq!(v["error"]["code"], 500, "{v}");
    let v = create(
        &mut api,
        "M",
        json!({"storage": "memory", "max_bytes": 1 << 20}),
    );
    assert!(v.get("error").is_none(), "{v}");
    let v = create(&mut api, "F", json!({}));
    assert!(v.get("error").is_none(), "{v}");
    // max_streams = 2: a third is refused with nats-server's code.
    let v = create(&mut api, "G", json!({}));
    assert_eq!(err_code(&v), 10027, "{v}");
    let v = call(&mut api, "$JS.API.INFO", json!({}));
    assert_eq!(v["limits"]["max_streams"], 2, "{v}");
    // The limits enforced are the limits reported (no max_storage: -1).
    assert_eq!(v["limits"]["max_memory"], 1 << 20, "{v}");
    assert_eq!(v["limits"]["max_storage"], -1, "{v}");
    assert_eq!(v["limits"]["max_bytes_required"], false, "{v}");
    assert_eq!(v["memory"], 0, "{v}");
    assert_eq!(v["streams"], 2, "{v}");
    for s in ["M", "F"] {
        let v = call(&mut api, &format!("$JS.API.STREAM.DELETE.{s}"), json!({}));
        assert_eq!(v["success"], true, "{v}");
    }
}

#[test]
fn lists_are_paged_as_nats_server_pages_them() {
    let dir = tempfile::tempdir().unwrap();
    let h = mem_stream(dir.path(), "S", "s.>");
    for i in 0..300 {
        put(&h, &format!("s.{i:03}"), 1);
    }
    let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1);
    for i in 0..300 {
        let v = call(
            &mut api,
            &format!("$JS.API.CONSUMER.CREATE.S.c{i:03}"),
            json!({"stream_name": "S", "config": {"durable_name": format!("c{i:03}")}}),
        );
        assert!(v.get("error").is_none(), "{v}");
    }
    let v = call(&mut api, "$JS.API.CONSUMER.LIST.S", json!({}));
    assert_eq!(
        (v["total"].as_u64(), v["limit"].as_u64()),
        (Some(300), Some(256))
    );
    assert_eq!(v["consumers"].as_array().map(Vec::len), Some(256));
    let v = call(&mut api, "$JS.API.CONSUMER.LIST.S", json!({"offset": 256}));
    let names: Vec<&str> = v["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names.len(), 44);
    assert_eq!((names[0], v["offset"].as_u64()), ("c256", Some(256)));
    let v = call(&mut api, "$JS.API.CONSUMER.NAMES.S", json!({"offset": 299}));
    assert_eq!(v["consumers"], json!(["c299"]), "{v}");
    let v = call(&mut api, "$JS.API.STREAM.NAMES", json!({"offset": 5}));
    assert_eq!(
        (v["total"].as_u64(), v["streams"].as_array().map(Vec::len)),
        (Some(1), Some(0))
    );
    // STREAM.INFO subjects: total, offset, limit; the page from offset.
    let v = call(
        &mut api,
        "$JS.API.STREAM.INFO.S",
        json!({"subjects_filter": ">", "offset": 298}),
    );
    assert_eq!(
        (v["total"].as_u64(), v["offset"].as_u64()),
        (Some(300), Some(298))
    );
    assert_eq!(v["limit"].as_u64(), Some(100_000));
    assert_eq!(
        v["state"]["subjects"],
        json!({"s.298": 1, "s.299": 1}),
        "{v}"
    );
    block_on(h.close());
}

fn user() -> Arc<crate::auth::Permissions> {
    Arc::new(crate::auth::Permissions::default())
}

/// Handle one request from `who`; its JSON answer.
fn call_as(
    api: &mut JsApi,
    subject: &str,
    body: Value,
    who: &Arc<crate::auth::Permissions>,
) -> Value {
    let mut m = (*request(subject, "r", &body.to_string())).clone();
    m.publisher = Some(who.clone());
    block_on(api.handle(&m, 1));
    api.persist();
    let out = api.take_out();
    let (_, m) = out.into_iter().find(|(to, _)| to == "r").unwrap();
    serde_json::from_slice(&m.payload).unwrap()
}

#[test]
fn consumers_are_replaced_and_updated_only_as_the_rules_say() {
    let dir = tempfile::tempdir().unwrap();
    let h = mem_stream(dir.path(), "S", "s.>");
    let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1);
    let (alice, bob) = (user(), user());
    let push = |name: &str, to: &str, durable: bool| {
        let key = if durable { "durable_name" } else { "name" };
        json!({"stream_name": "S", "config": {key: name, "deliver_subject": to}})
    };
    // (a) An ephemeral push consumer: Bob, who learnt its name, cannot
    // take it over; Alice (an ordered consumer's reset) can.
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.S.o",
        push("o", "a.1", false),
        &alice,
    );
    assert!(v.get("error").is_none(), "{v}");
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.S.o",
        push("o", "b.1", false),
        &bob,
    );
    assert_eq!(err_code(&v), 10013, "{v}");
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.S.o",
        push("o", "a.1", false),
        &bob,
    );
    assert!(
        v.get("error").is_none(),
        "an identical create is idempotent: {v}"
    );
    assert_eq!(v["config"]["deliver_subject"], "a.1");
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.S.o",
        push("o", "a.2", false),
        &alice,
    );
    assert_eq!(v["config"]["deliver_subject"], "a.2", "{v}");
    // (b) A pull consumer stays pull, a push one push.
    let pull = json!({"stream_name": "S", "config": {"durable_name": "d"}});
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.S.d",
        pull.clone(),
        &alice,
    );
    assert!(v.get("error").is_none(), "{v}");
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.S.d",
        push("d", "a.3", true),
        &alice,
    );
    assert_eq!(err_code(&v), 10012, "{v}");
    assert_eq!(
        v["error"]["description"],
        "can not update pull consumer to push based"
    );
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.S.p",
        push("p", "a.4", true),
        &alice,
    );
    assert!(v.get("error").is_none(), "{v}");
    let mut to_pull = pull.clone();
    to_pull["config"]["durable_name"] = json!("p");
    let v = call_as(&mut api, "$JS.API.CONSUMER.CREATE.S.p", to_pull, &alice);
    assert_eq!(
        v["error"]["description"],
        "can not update push consumer to pull based"
    );
    // (c) Bob updates Alice's durable push consumer: it now acts for Bob.
    let creator = |api: &JsApi| api.slots[0].consumers["p"].push.creator.clone();
    let as_user = |u: &Arc<crate::auth::Permissions>| {
        let r: Arc<dyn crate::stream::consumer::Receiver> = u.clone();
        Some(crate::stream::consumer::ReceiverRef(r))
    };
    assert_eq!(creator(&api), as_user(&alice));
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.S.p",
        push("p", "b.4", true),
        &bob,
    );
    assert_eq!(v["config"]["deliver_subject"], "b.4", "{v}");
    assert_eq!(creator(&api), as_user(&bob));
    block_on(h.close());
}
