//! Unit tests of the consumer state machine (`super`).

use super::*;

/// The JSON file earlier releases wrote for `k`.
pub(crate) fn legacy_json(k: &Consumer) -> Vec<u8> {
    let s = k.saved();
    let config: Value = serde_json::from_str(&s.config).unwrap();
    let mut v = json!({
        "v": 1,
        "name": s.name,
        "created": s.created,
        "floor": s.floor,
        "config": config,
        "delivered": [s.delivered.0, s.delivered.1],
        "pending": s.pending,
        "exclude": s.exclude,
    })
    .to_string()
    .into_bytes();
    v.push(b'\n');
    v
}

fn cfg(v: Value) -> ConsumerConfig {
    ConsumerConfig::from_json(&v).unwrap()
}

#[test]
fn config_parse_and_render() {
    let c = cfg(
        json!({"durable_name": "d", "ack_policy": "explicit", "ack_wait": 1000,
        "deliver_policy": "by_start_sequence", "opt_start_seq": 5, "filter_subject": "a.>",
        "max_deliver": 3, "replay_policy": "instant", "unknown_key": 1}),
    );
    assert_eq!(c.deliver_policy, DeliverPolicy::ByStartSequence(5));
    assert_eq!(c.ack_wait_ns, 1000);
    assert_eq!(c.max_deliver, 3);
    assert!(c.matches("a.b") && !c.matches("b"));
    let back = ConsumerConfig::from_json(&c.to_json("d")).unwrap();
    assert_eq!(back, c);
    let e = ConsumerConfig::from_json(&json!({"durable_name": "a.b"})).unwrap_err();
    assert_eq!(e.err_code, 10103);
    assert!(ConsumerConfig::from_json(&json!({"deliver_subject": "x"}))
        .unwrap()
        .push
        .is_some());
    let e = ConsumerConfig::from_json(&json!({"filter_subjects": ["a.>", "a.b"]})).unwrap_err();
    assert_eq!(e.err_code, 10136);
    let e = ConsumerConfig::from_json(&json!({"deliver_policy": "by_start_sequence"})).unwrap_err();
    assert_eq!(e.err_code, 10094);
    assert_eq!(cfg(json!({})).max_deliver, -1);
    let a = cfg(json!({"filter_subject": "a.*"}));
    let b = cfg(json!({"filter_subject": "a.b"}));
    let c2 = cfg(json!({"filter_subject": "c"}));
    assert!(a.overlaps(&b) && !a.overlaps(&c2) && cfg(json!({})).overlaps(&c2));
}

#[test]
fn pull_request_and_ack_parsing() {
    let r = PullRequest::parse(
        "_INBOX.x",
        br#"{"batch":10,"expires":500,"no_wait":true,"idle_heartbeat":100}"#,
        1000,
    )
    .unwrap();
    assert_eq!(
        (r.batch, r.no_wait, r.expires, r.next_heartbeat),
        (10, true, Some(1500), 1100)
    );
    assert_eq!(PullRequest::parse("r", b"", 0).unwrap().batch, 1);
    assert_eq!(PullRequest::parse("r", b"7", 0).unwrap().batch, 7);
    assert_eq!(
        PullRequest::parse("r", b"{", 0).unwrap_err().err_code,
        10025
    );
    assert_eq!(AckKind::parse(b"+ACK"), Some(AckKind::Ack));
    assert_eq!(AckKind::parse(b""), Some(AckKind::Ack));
    assert_eq!(AckKind::parse(b"-NAK"), Some(AckKind::Nak(0)));
    assert_eq!(
        AckKind::parse(br#"-NAK {"delay":5}"#),
        Some(AckKind::Nak(5))
    );
    assert_eq!(AckKind::parse(b"+WPI"), Some(AckKind::Progress));
    assert_eq!(AckKind::parse(b"+TERM reason"), Some(AckKind::Term));
    assert_eq!(
        AckKind::parse(br#"+NXT {"batch":3}"#),
        Some(AckKind::Next(3))
    );
    assert_eq!(AckKind::parse(b"junk"), None);
    assert_eq!(
        ack_subject("ST", "c1", 1, 0, 10, u64::MAX, 907),
        format!("$JS.ACK.ST.c1.1.0.10.{}.907", u64::MAX)
    );
    let s = ack_subject("S", "c", 2, 10, 4, 99, 0);
    assert_eq!(parse_ack_subject(&s), Some(("S", "c", 10)));
    assert_eq!(parse_ack_subject("$JS.ACK.S.c.1.x.1.1.1"), None);
    assert_eq!(parse_ack_subject("$JS.ACK.S.c"), None);
}

#[test]
fn delivery_ack_redelivery_and_floor() {
    let c = cfg(json!({"durable_name": "d", "ack_wait": 100, "max_deliver": 2}));
    let mut k = Consumer::new("d".into(), c, 1, 0);
    assert_eq!(k.record_delivery(1, 0), (1, 1));
    assert_eq!(k.record_delivery(2, 0), (2, 1));
    k.skip(3);
    assert_eq!(k.record_delivery(4, 0), (3, 1));
    assert_eq!(k.ack_floor(), (0, 0));
    assert_eq!(k.ack(2, &AckKind::Ack, 10), vec![2]);
    assert!(k.processed(2) && k.processed(3) && !k.processed(1) && !k.processed(5));
    assert_eq!(k.ack(1, &AckKind::Ack, 10), vec![1]);
    assert_eq!(k.ack_floor(), (2, 3));
    assert_eq!(k.next_deadline(), Some(100));
    assert!(k.handle_timeout(99).is_empty() && k.redeliver.is_empty());
    assert!(k.handle_timeout(100).is_empty());
    assert!(k.redeliver.contains(&4));
    // Redelivery keeps the consumer sequence.
    assert_eq!(k.record_delivery(4, 100), (3, 2));
    assert_eq!(k.num_redelivered(), 1);
    // max_deliver reached: dropped, processed.
    assert_eq!(k.handle_timeout(200), vec![4]);
    assert!(k.processed(4));
    // -NAK redelivers at once; +WPI extends.
    k.record_delivery(5, 300);
    k.ack(5, &AckKind::Nak(0), 301);
    assert!(k.redeliver.contains(&5));
    k.record_delivery(5, 302);
    k.ack(5, &AckKind::Progress, 350);
    assert_eq!(k.pending[&5].deadline, 450);
    assert_eq!(k.ack(5, &AckKind::Term, 351), vec![5]);
}

#[test]
fn ack_all_and_none() {
    let mut k = Consumer::new("d".into(), cfg(json!({"ack_policy": "all"})), 1, 0);
    for s in 1..=3 {
        k.record_delivery(s, 0);
    }
    assert_eq!(k.ack(2, &AckKind::Ack, 0), vec![1, 2]);
    assert_eq!(k.pending.len(), 1);
    let mut n = Consumer::new("n".into(), cfg(json!({"ack_policy": "none"})), 1, 0);
    n.record_delivery(1, 0);
    assert!(n.pending.is_empty() && n.processed(1));
}

#[test]
fn interest_questions() {
    let k = Consumer::new("d".into(), cfg(json!({"filter_subject": "a.>"})), 11, 0);
    assert!(k.done_with(10, "a.b"), "before its start");
    assert!(k.done_with(11, "b"), "not selected");
    assert!(!k.done_with(11, "a.b"), "not yet delivered");
}

#[test]
fn max_ack_pending_stops_new_deliveries() {
    let mut k = Consumer::new("d".into(), cfg(json!({"max_ack_pending": 2})), 1, 0);
    k.record_delivery(1, 0);
    assert!(k.may_deliver_new());
    k.record_delivery(2, 0);
    assert!(!k.may_deliver_new());
    k.ack(1, &AckKind::Ack, 0);
    assert!(k.may_deliver_new());
}

#[test]
fn persist_round_trip() {
    let mut k = Consumer::new(
        "d".into(),
        cfg(json!({"durable_name": "d", "ack_wait": 50, "filter_subjects": ["a", "b"]})),
        3,
        7,
    );
    k.record_delivery(3, 10);
    k.record_delivery(5, 10);
    k.ack(3, &AckKind::Ack, 11);
    let back = Consumer::decode(&legacy_json(&k), 20).unwrap();
    assert_eq!(back.cfg, k.cfg);
    assert_eq!(
        (back.floor, back.delivered_cseq, back.delivered_sseq),
        (2, 2, 5)
    );
    assert_eq!(back.pending, k.pending);
    assert_eq!(back.created, 7);
    for bad in [&b""[..], b"{}", b"{\"v\":2}", b"\xff"] {
        assert!(Consumer::decode(bad, 0).is_err());
    }
    let mut corrupt: Value = serde_json::from_slice(&legacy_json(&k)).unwrap();
    corrupt["pending"] = json!([[99, 1, 1, 1]]);
    assert!(Consumer::decode(corrupt.to_string().as_bytes(), 0).is_err());
}

#[test]
fn names_get_nats_server_error_codes() {
    assert_eq!(check_name("ok-1"), Ok(()));
    let code = |n: &str| check_name(n).unwrap_err().err_code;
    assert_eq!(code("/abs/victim"), 10127);
    assert_eq!(code("a\\b"), 10127);
    assert_eq!(code(".."), 10103);
    assert_eq!(code("a*"), 10103);
    assert_eq!(code(""), 10103);
    assert_eq!(code(&"x".repeat(300)), 10102);
    let e = ConsumerConfig::from_json(&json!({"durable_name": "../x"})).unwrap_err();
    assert_eq!(e.err_code, 10127);
    // A stored file with a bad name is refused at load.
    let k = Consumer::new("d".into(), cfg(json!({"durable_name": "d"})), 1, 0);
    let mut v: Value = serde_json::from_slice(&legacy_json(&k)).unwrap();
    v["name"] = json!("/etc/x");
    assert!(Consumer::decode(v.to_string().as_bytes(), 0).is_err());
}

#[test]
fn exclusions_follow_the_creators_deny_list() {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let dave = s(&["secret.>"]);
    // Explicit filters inside the deny list are refused.
    assert_eq!(
        Consumer::exclusions(&s(&["secret.a"]), true, &dave),
        Err("secret.a".into())
    );
    // A stream whose every subject is denied: refused too.
    assert!(Consumer::exclusions(&s(&["secret.>"]), false, &dave).is_err());
    // Partly denied: excluded.
    assert_eq!(
        Consumer::exclusions(&s(&[">"]), false, &dave),
        Ok(s(&["secret.>"]))
    );
    assert_eq!(
        Consumer::exclusions(&s(&["*.x"]), true, &dave),
        Ok(s(&["secret.x"]))
    );
    assert_eq!(Consumer::exclusions(&s(&["a.>"]), true, &dave), Ok(vec![]));

    let mut k = Consumer::new("d".into(), cfg(json!({"durable_name": "d"})), 1, 0);
    let stream = s(&[">"]);
    assert!(!k.readable_by(&stream, &dave), "can deliver secret.>");
    assert!(
        k.readable_by(&s(&["a.>"]), &dave),
        "the stream has no secret"
    );
    assert!(k.readable_by(&stream, &[]));
    k.exclude = s(&["secret.>"]);
    assert!(k.readable_by(&stream, &dave));
    assert!(!k.selects("secret.x") && k.selects("a.x"));
    assert!(k.done_with(5, "secret.x"), "excluded: not selected");
    let back = Consumer::decode(&legacy_json(&k), 0).unwrap();
    assert_eq!(back.exclude, k.exclude);
    // Narrower exclusion than the deny list, on a narrower filter.
    let mut f = Consumer::new("f".into(), cfg(json!({"filter_subject": "*.x"})), 1, 0);
    assert!(!f.readable_by(&stream, &dave));
    f.exclude = s(&["secret.x"]);
    assert!(f.readable_by(&stream, &dave));
}
