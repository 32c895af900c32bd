use std::sync::Arc;

use serde_json::{json, Value};

use super::render::status_msg;
use super::*;
use crate::auth::Permissions;
use crate::stream::consumer::{parse_ack_subject, PullRequest, ReceiverRef};
use crate::stream::{Message, StreamConfig};
use smol::block_on;

fn scfg(name: &str, subject: &str, retention: Retention) -> StreamConfig {
    StreamConfig {
        retention,
        ..StreamConfig::new(name, &[subject])
    }
}

fn open(dir: &Path, c: StreamConfig) -> StreamHandle {
    crate::stream::open(&dir.join(&c.name), c).unwrap().0
}

fn req(subject: &str, reply: &str, body: &str) -> Msg {
    Msg {
        subject: subject.into(),
        reply: Some(reply.into()),
        headers: None,
        payload: body.as_bytes().to_vec(),
        publisher: None,
    }
}

fn publish(h: &StreamHandle, subject: &str) -> u64 {
    block_on(h.publish(Message {
        subject: subject.into(),
        headers: None,
        payload: b"x".to_vec(),
    }))
    .unwrap()
    .seq
}

/// Handle one request and return the JSON answer sent to `r`.
fn call(api: &mut JsApi, subject: &str, body: &str) -> Value {
    block_on(api.handle(&req(subject, "r", body), 1));
    api.persist();
    let out = api.take_out();
    let (to, m) = out.into_iter().find(|(to, _)| to == "r").unwrap();
    assert_eq!(to, m.subject);
    serde_json::from_slice(&m.payload).unwrap()
}

#[test]
fn subjects_times_and_statuses() {
    assert_eq!(parse_call("$JS.API.INFO"), Call::Info);
    assert_eq!(
        parse_call("$JS.API.STREAM.INFO.S"),
        Call::StreamInfo("S".into())
    );
    assert_eq!(
        parse_call("$JS.API.STREAM.MSG.GET.S"),
        Call::MsgGet("S".into())
    );
    assert_eq!(
        parse_call("$JS.API.CONSUMER.CREATE.S.c.a.b.>"),
        Call::ConsumerCreate {
            stream: "S".into(),
            name: Some("c".into()),
            filter: Some("a.b.>".into()),
            durable_api: false
        }
    );
    assert_eq!(
        parse_call("$JS.API.CONSUMER.DURABLE.CREATE.S.d"),
        Call::ConsumerCreate {
            stream: "S".into(),
            name: Some("d".into()),
            filter: None,
            durable_api: true
        }
    );
    assert_eq!(
        parse_call("$JS.API.CONSUMER.MSG.NEXT.S.c"),
        Call::Next("S".into(), "c".into())
    );
    assert_eq!(parse_call("$JS.API.STREAM.INFO"), Call::Unknown);
    assert_eq!(parse_call("foo"), Call::Unknown);
    assert_eq!(rfc3339(0), "0001-01-01T00:00:00Z");
    assert_eq!(
        rfc3339(1_700_000_000_123_456_789),
        "2023-11-14T22:13:20.123456789Z"
    );
    assert_eq!(
        rfc3339(951_782_400 * 1_000_000_000),
        "2000-02-29T00:00:00.000000000Z"
    );
    assert_eq!(
        status_msg(408, "Request Timeout", Some((2, 0))),
        b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 2\r\nNats-Pending-Bytes: 0\r\n\r\n"
    );
}

#[test]
fn workqueue_consumer_flow_and_persistence() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), scfg("W", "w.>", Retention::WorkQueue));
    let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1);
    let v = call(
        &mut api,
        "$JS.API.CONSUMER.CREATE.W.c",
        r#"{"stream_name":"W","config":{"durable_name":"c","ack_policy":"explicit"}}"#,
    );
    assert_eq!(v["name"], "c", "{v}");
    assert_eq!(
        v["type"],
        "io.nats.jetstream.api.v1.consumer_create_response"
    );
    let v = call(
        &mut api,
        "$JS.API.CONSUMER.CREATE.W.d",
        r#"{"stream_name":"W","config":{"durable_name":"d"}}"#,
    );
    assert_eq!(v["error"]["err_code"], 10099, "{v}");
    let v = call(&mut api, "$JS.API.CONSUMER.INFO.W.nope", "");
    assert_eq!(
        (v["error"]["code"].as_u64(), v["error"]["err_code"].as_u64()),
        (Some(404), Some(10014))
    );
    let v = call(&mut api, "$JS.API.STREAM.INFO.X", "");
    assert_eq!(v["error"]["err_code"], 10059);
    publish(&h, "w.1");
    publish(&h, "w.2");
    block_on(api.handle(
        &req(
            "$JS.API.CONSUMER.MSG.NEXT.W.c",
            "inbox",
            r#"{"batch":3,"no_wait":true}"#,
        ),
        10,
    ));
    block_on(api.deliver(10));
    let out = api.take_out();
    assert_eq!(out.len(), 3, "two messages and the end-of-batch status");
    assert!(out.iter().all(|(to, _)| to == "inbox"));
    let acks: Vec<String> = out.iter().filter_map(|(_, m)| m.reply.clone()).collect();
    assert_eq!(acks.len(), 2);
    assert_eq!(parse_ack_subject(&acks[0]), Some(("W", "c", 1)));
    assert!(out[2]
        .1
        .headers
        .as_deref()
        .unwrap()
        .starts_with(b"NATS/1.0 408"));
    block_on(api.handle(&req(&acks[0], "ackr", "+ACK"), 11));
    block_on(api.apply_retention());
    api.persist();
    assert!(api.take_out().iter().any(|(to, _)| to == "ackr"));
    assert_eq!(h.state().msgs, 1, "the acked message left the workqueue");
    // The consumer, reloaded, still owes message 2.
    let again = JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1);
    let c = again.slots[0].consumers.get("c").unwrap();
    assert_eq!(c.pending.keys().copied().collect::<Vec<_>>(), vec![2]);
    assert_eq!(c.delivered_sseq, 2);
    let v = call(&mut api, "$JS.API.CONSUMER.DELETE.W.c", "");
    assert_eq!(v["success"], true);
    assert!(
        JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1).slots[0]
            .consumers
            .is_empty()
    );
    block_on(h.close());
}

#[test]
fn pull_expiry_heartbeats_and_ephemeral_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), scfg("L", "l.>", Retention::Limits));
    let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1);
    // Ephemeral (no name), created at t=1.
    let v = call(
        &mut api,
        "$JS.API.CONSUMER.CREATE.L",
        r#"{"stream_name":"L","config":{"ack_policy":"explicit"}}"#,
    );
    let name = v["name"].as_str().unwrap().to_string();
    assert_eq!(v["config"]["inactive_threshold"], 5_000_000_000u64);
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.L.{name}");
    block_on(api.handle(
        &req(
            &next,
            "inbox",
            r#"{"batch":2,"expires":1000,"idle_heartbeat":400}"#,
        ),
        10,
    ));
    block_on(api.deliver(10));
    assert!(api.take_out().is_empty(), "nothing to deliver yet");
    assert_eq!(api.next_deadline().0, Some(410));
    api.tick(410, &|_| None);
    let out = api.take_out();
    assert!(out[0]
        .1
        .headers
        .as_deref()
        .unwrap()
        .starts_with(b"NATS/1.0 100 Idle Heartbeat"));
    api.tick(1010, &|_| None);
    let out = api.take_out();
    assert!(out[0]
        .1
        .headers
        .as_deref()
        .unwrap()
        .starts_with(b"NATS/1.0 408 Request Timeout"));
    // Idle for the inactive threshold: removed.
    api.tick(1010 + 5_000_000_000, &|_| None);
    assert!(api.slots[0].consumers.is_empty());
    let v = call(&mut api, &next.replace("MSG.NEXT", "INFO"), "");
    assert_eq!(v["error"]["err_code"], 10014);
    block_on(h.close());
}

#[test]
fn interest_retention_waits_for_the_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(dir.path(), scfg("M", "m.>", Retention::Interest));
    let p = open(dir.path(), scfg("P", "p.>", Retention::Interest));
    let mut api = JsApi::open(&[m.clone(), p.clone()], dir.path(), &["M".to_string()], 1);
    publish(&m, "m.1");
    publish(&m, "m.2");
    publish(&p, "p.1");
    let cursor = std::cell::Cell::new(None);
    let run = |api: &mut JsApi| {
        api.tick(5, &|_| cursor.get());
        block_on(api.apply_retention());
    };
    run(&mut api);
    assert_eq!(p.state().msgs, 0, "no consumer, not mirrored: removed");
    assert_eq!(m.state().msgs, 2, "not yet on the hub: kept");
    cursor.set(Some(1));
    run(&mut api);
    assert_eq!(m.state().msgs, 1);
    assert_eq!(m.state().first_seq, 2);
    cursor.set(Some(2));
    run(&mut api);
    assert_eq!(m.state().msgs, 0);
    block_on(m.close());
    block_on(p.close());
}

fn dave() -> Arc<Permissions> {
    Arc::new(Permissions {
        deny_publish: vec!["secret.>".into()],
        deny_subscribe: vec!["secret.>".into()],
        ..Permissions::default()
    })
}

/// Like [`call`], for a caller with permissions `who`; `None` when
/// nothing was answered.
fn call_as(api: &mut JsApi, subject: &str, body: &str, who: &Arc<Permissions>) -> Option<Value> {
    let mut m = req(subject, "r", body);
    m.publisher = Some(who.clone());
    block_on(api.handle(&m, 1));
    api.persist();
    let out = api.take_out();
    let (_, m) = out.into_iter().find(|(to, _)| to == "r")?;
    Some(serde_json::from_slice(&m.payload).unwrap())
}

/// A pull of up to `batch` messages (no_wait) by `who`: the subjects
/// delivered, and the status line that ended it.
fn pull_as(
    api: &mut JsApi,
    stream: &str,
    consumer: &str,
    batch: usize,
    who: Option<&Arc<Permissions>>,
) -> (Vec<String>, String) {
    let mut m = req(
        &format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
        "inbox",
        &format!(r#"{{"batch":{batch},"no_wait":true}}"#),
    );
    m.publisher = who.cloned();
    block_on(api.handle(&m, 10));
    block_on(api.deliver(10));
    let out = api.take_out();
    let subjects = out
        .iter()
        .filter(|(_, m)| m.headers.is_none())
        .map(|(_, m)| m.subject.clone())
        .collect();
    let status = out
        .iter()
        .filter_map(|(_, m)| m.headers.as_deref())
        .map(|h| {
            String::from_utf8_lossy(h)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .next()
        .unwrap_or_default();
    (subjects, status)
}

#[test]
fn names_that_are_paths_touch_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), scfg("A", "a.>", Retention::Limits));
    let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1);
    let victim_dir = tempfile::Builder::new().prefix("victim").tempdir().unwrap();
    let victim = victim_dir.path().join("victim.json");
    std::fs::write(&victim, b"{}").unwrap();
    let abs = victim.with_extension("");
    let abs = abs.to_str().unwrap();
    let v = call(
        &mut api,
        &format!("$JS.API.CONSUMER.CREATE.A.{abs}"),
        r#"{"stream_name":"A","config":{"ack_policy":"explicit"}}"#,
    );
    assert_eq!(v["error"]["err_code"], 10127, "{v}");
    let v = call(&mut api, &format!("$JS.API.CONSUMER.DELETE.A.{abs}"), "");
    assert_eq!(v["error"]["err_code"], 10127, "{v}");
    let v = call(&mut api, &format!("$JS.API.CONSUMER.INFO.A.{abs}"), "");
    assert_eq!(v["error"]["err_code"], 10127, "{v}");
    assert!(victim.exists());
    // Names from the request body.
    for (name, code) in [("..", 10103), ("a/../b", 10127), ("a\u{0}b", 10103)] {
        let body = json!({"stream_name": "A", "config": {"durable_name": name}});
        let v = call(&mut api, "$JS.API.CONSUMER.CREATE.A", &body.to_string());
        assert_eq!(v["error"]["err_code"], code, "{name:?}: {v}");
    }
    let long = "x".repeat(crate::stream::names::MAX_NAME_LEN + 1);
    let v = call(
        &mut api,
        &format!("$JS.API.CONSUMER.DURABLE.CREATE.A.{long}"),
        r#"{"stream_name":"A","config":{}}"#,
    );
    assert_eq!(v["error"]["err_code"], 10102, "{v}");
    assert!(api.slots[0].consumers.is_empty());
    // Nothing was written outside the stream's consumers directory.
    assert_eq!(std::fs::read_dir(victim_dir.path()).unwrap().count(), 1);
    block_on(h.close());
}

#[test]
fn deny_subscribe_applies_to_reads_and_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), scfg("M", ">", Retention::Limits));
    let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1);
    let dave = dave();
    publish(&h, "a.1");
    publish(&h, "secret.1");
    publish(&h, "a.2");
    // MSG.GET
    let get = |api: &mut JsApi, body: &str| {
        call_as(api, "$JS.API.STREAM.MSG.GET.M", body, &dave).unwrap()
    };
    assert_eq!(get(&mut api, r#"{"seq":1}"#)["message"]["subject"], "a.1");
    let v = get(&mut api, r#"{"seq":2}"#);
    assert_eq!(
        (v["error"]["code"].as_u64(), v["error"]["err_code"].as_u64()),
        (Some(403), Some(u64::from(NOT_AUTHORIZED))),
        "{v}"
    );
    assert!(v.to_string().find("secret.1").is_none(), "{v}");
    let v = get(&mut api, r#"{"last_by_subj":"secret.1"}"#);
    assert_eq!(v["error"]["code"], 403, "{v}");
    let v = get(&mut api, r#"{"next_by_subj":">","seq":2}"#);
    assert_eq!(v["error"]["code"], 403, "{v}");
    let v = call(&mut api, "$JS.API.STREAM.MSG.GET.M", r#"{"seq":2}"#);
    assert_eq!(v["message"]["subject"], "secret.1", "unrestricted: {v}");
    let v = call_as(
        &mut api,
        "$JS.API.STREAM.INFO.M",
        r#"{"subjects_filter":">"}"#,
        &dave,
    )
    .unwrap();
    let subjects = v["state"]["subjects"].as_object().unwrap();
    assert_eq!(subjects.len(), 2, "{v}");
    assert!(!subjects.contains_key("secret.1"));
    // An answer goes only where the caller may subscribe.
    let mut m = req("$JS.API.STREAM.MSG.GET.M", "secret.inbox", r#"{"seq":1}"#);
    m.publisher = Some(dave.clone());
    block_on(api.handle(&m, 1));
    assert!(api.take_out().is_empty(), "no answer to secret.inbox");

    // Consumers: a filter inside the deny list is refused ...
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.M",
        r#"{"stream_name":"M","config":{"durable_name":"s","filter_subject":"secret.>"}}"#,
        &dave,
    )
    .unwrap();
    assert_eq!(v["error"]["code"], 403, "{v}");
    // ... an unfiltered one excludes it, durably.
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.M",
        r#"{"stream_name":"M","config":{"durable_name":"dv"}}"#,
        &dave,
    )
    .unwrap();
    assert_eq!(v["name"], "dv", "{v}");
    let (got, _) = pull_as(&mut api, "M", "dv", 5, Some(&dave));
    assert_eq!(got, vec!["a.1", "a.2"]);
    let again = JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1);
    assert_eq!(again.slots[0].consumers["dv"].exclude, vec!["secret.>"]);
    // A consumer that can deliver secret.> is not for dave to pull ...
    let v = call(
        &mut api,
        "$JS.API.CONSUMER.CREATE.M",
        r#"{"stream_name":"M","config":{"durable_name":"adm"}}"#,
    );
    assert_eq!(v["name"], "adm", "{v}");
    let (got, status) = pull_as(&mut api, "M", "adm", 5, Some(&dave));
    assert!(got.is_empty(), "{got:?}");
    assert!(status.starts_with("NATS/1.0 403"), "{status}");
    // ... nor to take over by creating it again ...
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.M",
        r#"{"stream_name":"M","config":{"durable_name":"adm"}}"#,
        &dave,
    )
    .unwrap();
    assert_eq!(v["error"]["code"], 403, "{v}");
    // ... and its messages are still all there for its owner.
    let (got, _) = pull_as(&mut api, "M", "adm", 5, None);
    assert_eq!(got, vec!["a.1", "secret.1", "a.2"]);
    // The last check per delivery: a pull request whose client may
    // not receive the next message ends (the message stays).
    let mut r = PullRequest::parse("inbox", b"", 10).unwrap();
    r.receiver = Some(ReceiverRef(dave.clone()));
    let c = api.slots[0].consumers.get_mut("adm").unwrap();
    c.redeliver.insert(2);
    c.waiting.push_back(r);
    block_on(api.deliver(10));
    let out = api.take_out();
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(out[0]
        .1
        .headers
        .as_deref()
        .unwrap()
        .starts_with(b"NATS/1.0 403"));
    assert!(api.slots[0].consumers["adm"].redeliver.contains(&2));
    block_on(h.close());
}

#[test]
fn a_push_consumer_delivers_only_where_its_creator_may_publish() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), scfg("A", "a.>", Retention::Limits));
    let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1);
    // May subscribe everywhere, may not publish device commands: a push
    // consumer must not become a way to publish them.
    let eve = Arc::new(Permissions {
        deny_publish: vec!["cmd.>".into()],
        ..Permissions::default()
    });
    let body = |deliver: &str| {
        format!(
            r#"{{"stream_name":"A","config":{{"name":"p","deliver_subject":"{deliver}","ack_policy":"explicit"}}}}"#
        )
    };
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.A.p",
        &body("cmd.device1"),
        &eve,
    )
    .expect("answered");
    assert_eq!(v["error"]["code"], 403, "{v}");
    let v = call_as(
        &mut api,
        "$JS.API.CONSUMER.CREATE.A.p",
        &body("mine.d"),
        &eve,
    )
    .expect("answered");
    assert!(v.get("error").is_none(), "{v}");
    block_on(h.close());
}

/// Direct gets of one burst are answered together (`direct::Pending`) but
/// exactly as if one after another: every get is answered, in arrival
/// order, and a call after a get (here a delete) is applied after it.
#[test]
fn pipelined_direct_gets_keep_their_order_against_other_calls() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(
        dir.path(),
        StreamConfig {
            allow_direct: true,
            ..scfg("S", "s.>", Retention::Limits)
        },
    );
    let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[], 1);
    let seq = publish(&h, "s.a");
    let n = direct::DIRECT_PIPELINE + 10;
    let mut burst: Vec<Msg> = (0..n)
        .map(|i| req("$JS.API.DIRECT.GET.S.s.a", &format!("g{i}"), ""))
        .collect();
    let del = format!(r#"{{"seq":{seq}}}"#);
    burst.push(req("$JS.API.STREAM.MSG.DELETE.S", "del", &del));
    burst.push(req("$JS.API.DIRECT.GET.S.s.a", "after", ""));
    block_on(async {
        for m in &burst {
            api.handle(m, 1).await;
        }
        api.finish_direct().await;
    });
    let out = api.take_out();
    let to: Vec<&str> = out.iter().map(|(to, _)| to.as_str()).collect();
    let mut want: Vec<String> = (0..n).map(|i| format!("g{i}")).collect();
    want.extend(["del".to_string(), "after".to_string()]);
    assert_eq!(to, want);
    for (to, m) in &out[..n] {
        assert_eq!(m.payload, b"x", "{to}");
        let hdr = String::from_utf8_lossy(m.headers.as_deref().unwrap());
        assert!(
            hdr.contains(&format!("Nats-Sequence: {seq}\r\n")),
            "{to}: {hdr}"
        );
    }
    let v: Value = serde_json::from_slice(&out[n].1.payload).unwrap();
    assert_eq!(v["success"], true, "{v}");
    let hdr = String::from_utf8_lossy(out[n + 1].1.headers.as_deref().unwrap());
    assert!(hdr.starts_with("NATS/1.0 404"), "{hdr}");
}
