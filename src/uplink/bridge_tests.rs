//! Tests of the live bridge machine: reply tables, the overlap rule, the
//! request/reply mapping both ways, reserved subjects, the down buffer.

use super::*;
use crate::config::HubUrl;
use crate::uplink::link::{Action, LinkParams};

fn entry(subject: &str, hub_prefix: &str) -> Entry {
    Entry {
        subject: subject.into(),
        hub_prefix: hub_prefix.into(),
    }
}

fn bridge(exports: &[Entry], imports: &[Entry]) -> Bridge {
    let mut n = 0u8;
    Bridge::new(
        BridgeParams::new(exports.to_vec(), imports.to_vec()),
        Box::new(move || {
            n = n.wrapping_add(1);
            [n; 12]
        }),
    )
}

fn link(now: Instant) -> Link {
    let p = LinkParams {
        urls: vec![HubUrl {
            host: "127.0.0.1".into(),
            port: 4222,
            user: None,
            password: None,
            tls: false,
            ws: false,
        }],
        name: "frond test".into(),
        user: None,
        password: None,
        token: None,
        nkey_seed: None,
        jwt: None,
        tls_configured: false,
        discover: false,
        ping_interval: Duration::from_secs(10),
        max_pings_out: 2,
        connect_timeout: Duration::from_secs(10),
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_secs(30),
    };
    Link::new(p, now, 1)
}

fn out(l: &mut Link) -> String {
    let mut v = Vec::new();
    l.poll_transmit(&mut v);
    String::from_utf8(v).unwrap()
}

fn bring_up(l: &mut Link, now: Instant) {
    l.handle_timeout(now);
    assert!(matches!(l.poll_action(), Some(Action::Dial(_))));
    l.handle_dialed(now);
    l.handle_bytes(
        now,
        b"INFO {\"server_id\":\"S\",\"max_payload\":1000,\"headers\":true}\r\n",
    );
    let w = out(l);
    assert!(w.contains("\"echo\":false"), "{w}");
    l.handle_bytes(now, b"PONG\r\n");
    assert!(l.is_up());
    while l.poll_event().is_some() {}
}

/// A bridge attached to a link that is up; the SUB lines written.
fn up(exports: &[Entry], imports: &[Entry]) -> (Bridge, Link, String, Instant) {
    let now = Instant::now();
    let mut b = bridge(exports, imports);
    let mut l = link(now);
    b.attach(&mut l).unwrap();
    bring_up(&mut l, now);
    let subs = out(&mut l);
    (b, l, subs, now)
}

fn hub_msg(sid: u64, subject: &str, reply: Option<&str>, payload: &[u8]) -> MsgOp {
    MsgOp {
        subject: subject.into(),
        sid,
        reply: reply.map(str::to_string),
        headers: None,
        payload: payload.to_vec(),
    }
}

fn local(subject: &str, reply: Option<&str>, payload: &[u8]) -> LocalMsg {
    LocalMsg {
        subject: subject.into(),
        reply: reply.map(str::to_string),
        headers: None,
        payload: payload.to_vec(),
    }
}

/// The sid the link gave to hub subscription `subject`.
fn sid_of(subs: &str, subject: &str) -> u64 {
    subs.lines()
        .find_map(|l| {
            let mut w = l.split(' ');
            (w.next() == Some("SUB") && w.next() == Some(subject))
                .then(|| w.next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no SUB {subject} in {subs:?}"))
}

#[test]
fn reply_tables_are_bounded_in_entries_bytes_and_time() {
    let now = Instant::now();
    let ttl = Duration::from_secs(10);
    let mut t = Inboxes::new(3, 1 << 20, ttl);
    for i in 0..5 {
        t.insert(now, format!("i{i}"), format!("to{i}"));
    }
    assert_eq!(t.len(), 3);
    assert_eq!(t.get(now, "i0"), None, "oldest evicted");
    assert_eq!(t.get(now, "i4"), Some("to4"));
    // Bytes: each entry costs 2 * inbox + to + overhead.
    let one = 2 * 2 + 3 + ENTRY_OVERHEAD;
    let mut t = Inboxes::new(100, 2 * one, ttl);
    assert_eq!(t.insert(now, "a1".into(), "to1".into()), 0);
    assert_eq!(t.insert(now, "a2".into(), "to2".into()), 0);
    assert_eq!(t.insert(now, "a3".into(), "to3".into()), 1, "one evicted");
    assert_eq!(t.len(), 2);
    assert!(t.bytes() <= 2 * one);
    // An entry larger than the bound fits alone.
    let big = "x".repeat(4 * one);
    t.insert(now, "b".into(), big.clone());
    assert_eq!(t.len(), 1);
    assert_eq!(t.get(now, "b"), Some(big.as_str()));
    // Time: gone after ttl, and its bytes with it.
    let later = now + ttl;
    assert_eq!(t.get(later, "b"), None);
    assert!(t.is_empty());
    assert_eq!(t.bytes(), 0);
}

#[test]
fn the_lowest_matching_subscription_passes_a_message_on() {
    let subs = [(3, "a.>"), (5, "a.b"), (1, "c.*")];
    assert_eq!(first_match(subs, "a.b"), Some(3));
    assert_eq!(first_match(subs, "a.x.y"), Some(3));
    assert_eq!(first_match(subs, "c.d"), Some(1));
    assert_eq!(first_match(subs, "d"), None);
    assert!(reserved("$JS.API.INFO") && reserved("_INBOX.x") && reserved("_INBOX"));
    assert!(!reserved("svc.x") && !reserved("_INBOXES.x"));
}

#[test]
fn hub_request_answered_locally_goes_back_to_the_hub_reply() {
    let (mut b, mut l, subs, now) = up(&[entry("svc.truck.>", "")], &[]);
    let sid = sid_of(&subs, "svc.truck.>");
    let m = hub_msg(sid, "svc.truck.diag", Some("_INBOX.hubapp.1"), b"ping");
    let got = b.handle_hub_msg(now, m).unwrap().unwrap();
    assert_eq!(got.subject, "svc.truck.diag");
    assert_eq!(got.payload, b"ping");
    let inbox = got.reply.unwrap();
    assert!(inbox.starts_with(LOCAL_INBOX_PREFIX), "{inbox}");
    assert_eq!(inbox.len(), LOCAL_INBOX_PREFIX.len() + 2 + 24, "{inbox}");
    // The local answer goes to the hub's reply subject, with no reply.
    b.handle_local(now, &mut l, LOCAL_INBOX_SID, local(&inbox, None, b"pong"));
    assert_eq!(out(&mut l), "PUB _INBOX.hubapp.1 4\r\npong\r\n");
    // A second answer (several responders) goes too, until it expires.
    b.handle_local(now, &mut l, LOCAL_INBOX_SID, local(&inbox, None, b"pong2"));
    assert_eq!(out(&mut l), "PUB _INBOX.hubapp.1 5\r\npong2\r\n");
    assert_eq!(b.status().pending_hub_requests, 1);
    b.handle_tick(now + Duration::from_secs(119));
    assert_eq!(b.status().pending_hub_requests, 1);
    b.handle_tick(now + Duration::from_secs(120));
    assert_eq!(b.status().pending_hub_requests, 0, "expired");
    let late = now + Duration::from_secs(120);
    b.handle_local(late, &mut l, LOCAL_INBOX_SID, local(&inbox, None, b"late"));
    assert_eq!(out(&mut l), "");
    // A guessed inbox goes nowhere.
    let guess = format!("{LOCAL_INBOX_PREFIX}1.000000000000000000000000");
    b.handle_local(now, &mut l, LOCAL_INBOX_SID, local(&guess, None, b"x"));
    assert_eq!(out(&mut l), "");
    let st = b.status();
    assert_eq!(
        (st.msgs_down, st.replies_up, st.dropped_no_inbox),
        (1, 2, 2)
    );
    // Not the bridge's subscription: handed back.
    assert!(b.handle_hub_msg(now, hub_msg(999, "x", None, b"")).is_err());
}

#[test]
fn local_request_on_an_import_is_answered_from_the_hub() {
    let (mut b, mut l, subs, now) = up(&[], &[entry("fleet.>", "hub.")]);
    assert!(subs.contains("SUB hub.fleet.> "), "{subs}");
    let wildcard = subs
        .lines()
        .find_map(|s| s.strip_prefix("SUB _INBOX."))
        .unwrap();
    let token = wildcard.split('.').next().unwrap().to_string();
    assert_eq!(token.len(), 24);
    let reply_sid = sid_of(&subs, &format!("_INBOX.{token}.>"));
    assert_eq!(
        b.local_subscriptions(),
        vec![
            (LOCAL_INBOX_SID, "_INBOX.frond.hub.>".to_string()),
            (1, "fleet.>".to_string())
        ]
    );
    b.handle_local(now, &mut l, 1, local("fleet.q", Some("_INBOX.me.7"), b"q"));
    let w = out(&mut l);
    let hub_inbox = w
        .strip_prefix("PUB hub.fleet.q ")
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .to_string();
    assert!(hub_inbox.starts_with(&format!("_INBOX.{token}.")), "{w}");
    assert!(w.ends_with(" 1\r\nq\r\n"), "{w}");
    let ans = b
        .handle_hub_msg(now, hub_msg(reply_sid, &hub_inbox, None, b"a"))
        .unwrap()
        .unwrap();
    assert_eq!(ans, local("_INBOX.me.7", None, b"a"));
    // A plain publish goes up without a reply.
    b.handle_local(now, &mut l, 1, local("fleet.x", None, b"p"));
    assert_eq!(out(&mut l), "PUB hub.fleet.x 1\r\np\r\n");
    // An answer to an unknown hub inbox is dropped.
    let bogus = format!("_INBOX.{token}.99.abc");
    assert_eq!(
        b.handle_hub_msg(now, hub_msg(reply_sid, &bogus, None, b"x")),
        Ok(None)
    );
    // Hub messages on the import come down with the prefix taken off.
    let sid = sid_of(&subs, "hub.fleet.>");
    let down = b.handle_hub_msg(now, hub_msg(sid, "hub.fleet.all", None, b"b"));
    assert_eq!(down, Ok(Some(local("fleet.all", None, b"b"))));
    let st = b.status();
    assert_eq!(
        (
            st.msgs_up,
            st.replies_down,
            st.msgs_down,
            st.dropped_no_inbox
        ),
        (2, 1, 1, 1)
    );
    assert_eq!(st.pending_local_requests, 1);
}

#[test]
fn overlapping_entries_pass_one_copy_each_way() {
    let (mut b, mut l, subs, now) = up(&[entry("a.b", "")], &[entry("a.>", ""), entry("a.b", "")]);
    let exp = sid_of(&subs, "a.b");
    let imp = sid_of(&subs, "a.>");
    assert!(exp < imp, "exports first");
    // The hub sends a.b once per matching subscription (three).
    let sids: Vec<u64> = subs
        .lines()
        .filter(|s| s.starts_with("SUB a."))
        .map(|s| s.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(sids.len(), 3);
    let mut delivered = 0;
    for sid in &sids {
        if let Ok(Some(_)) = b.handle_hub_msg(now, hub_msg(*sid, "a.b", None, b"1")) {
            delivered += 1;
        }
    }
    assert_eq!(delivered, 1);
    // a.c matches only the import a.> on the hub: delivered once.
    assert!(matches!(
        b.handle_hub_msg(now, hub_msg(imp, "a.c", None, b"2")),
        Ok(Some(_))
    ));
    // The local router hands a.b to both import subscriptions (1, 2).
    b.handle_local(now, &mut l, 1, local("a.b", None, b"up"));
    b.handle_local(now, &mut l, 2, local("a.b", None, b"up"));
    assert_eq!(out(&mut l), "PUB a.b 2\r\nup\r\n");
    assert_eq!(b.status().duplicates, 3);
}

#[test]
fn reserved_subjects_and_replies_are_dropped() {
    // An entry that (unlike any config would allow) reaches `$`.
    let (mut b, mut l, subs, now) = up(&[entry("svc.>", ""), entry("*.>", "")], &[]);
    let wild = sid_of(&subs, "*.>");
    let svc = sid_of(&subs, "svc.>");
    let m = hub_msg(wild, "$JS.API.STREAM.DELETE.X", None, b"{}");
    assert_eq!(b.handle_hub_msg(now, m), Ok(None));
    let m = hub_msg(wild, "_INBOX.frond.hub.1.x", None, b"{}");
    assert_eq!(b.handle_hub_msg(now, m), Ok(None));
    // A hub request whose reply is a hub API subject: dropped, not
    // delivered with a way to answer into the hub's API.
    let m = hub_msg(svc, "svc.x", Some("$JS.API.STREAM.DELETE.FLEET"), b"q");
    assert_eq!(b.handle_hub_msg(now, m), Ok(None));
    assert_eq!(b.status().dropped_reserved, 3);
    assert_eq!(b.status().pending_hub_requests, 0);
    // Prefixed export: a hub subject must carry the prefix.
    let (mut b, _, subs, _) = up(&[entry("svc.>", "p.")], &[]);
    let sid = sid_of(&subs, "p.svc.>");
    let m = hub_msg(sid, "svc.other", None, b"");
    assert_eq!(b.handle_hub_msg(now, m), Ok(None), "no prefix: not ours");
    // A local request on an import whose reply is a `$` subject.
    let (mut b, mut l2, _, _) = up(&[], &[entry("fleet.>", "")]);
    let m = local("fleet.q", Some("$JS.API.STREAM.PURGE.X"), b"q");
    b.handle_local(now, &mut l2, 1, m);
    assert_eq!(out(&mut l2), "");
    assert_eq!(b.status().dropped_reserved, 1);
    let _ = out(&mut l);
}

#[test]
fn hub_messages_lose_their_response_topic_header() {
    let (mut b, _l, subs, now) = up(&[entry("svc.>", "")], &[]);
    let sid = sid_of(&subs, "svc.>");
    let mut h = HeaderBlock::new();
    h.push("Mqtt-Response-Topic", "cmd/other");
    h.push("Mqtt-Correlation-Data", "YWJj");
    let mut m = hub_msg(sid, "svc.x", Some("_INBOX.r"), b"q");
    m.headers = Some(h.encode().unwrap());
    let got = b.handle_hub_msg(now, m).unwrap().unwrap();
    let back = HeaderBlock::parse(got.headers.as_deref().unwrap()).unwrap();
    assert_eq!(back.get("Mqtt-Response-Topic"), None);
    assert_eq!(back.get("Mqtt-Correlation-Data"), Some("YWJj"));
}

#[test]
fn while_down_a_small_buffer_then_drops_and_oversize_never_goes() {
    let now = Instant::now();
    let mut b = bridge(&[], &[entry("t.>", "")]);
    b.p.buffer_bytes = 20;
    let mut l = link(now);
    b.attach(&mut l).unwrap();
    b.handle_local(now, &mut l, 1, local("t.a", None, b"one"));
    b.handle_local(now, &mut l, 1, local("t.b", None, b"two"));
    b.handle_local(now, &mut l, 1, local("t.c", None, b"three"));
    assert_eq!(b.status().dropped_link_down, 2, "over 20 bytes");
    bring_up(&mut l, now);
    b.handle_up(&mut l);
    let w = out(&mut l);
    assert!(w.ends_with("PUB t.a 3\r\none\r\n"), "{w}");
    assert!(!w.contains("t.b"));
    // Over the hub's max_payload (1000 in this INFO): dropped.
    b.handle_local(now, &mut l, 1, local("t.big", None, &[b'x'; 1001]));
    assert_eq!(out(&mut l), "");
    assert_eq!(b.status().dropped_too_big, 1);
    assert_eq!(b.status().msgs_up, 1);
}

#[test]
fn a_subscription_the_hub_refuses_leaves_the_overlap_to_the_others() {
    let (mut b, _l, subs, now) = up(&[entry("a.b", "")], &[entry("a.>", "")]);
    let imp = sid_of(&subs, "a.>");
    assert_eq!(
        b.handle_hub_msg(now, hub_msg(imp, "a.b", None, b"")),
        Ok(None)
    );
    let e = "Permissions Violation for Subscription to \"a.b\"";
    assert_eq!(b.handle_hub_error(e).as_deref(), Some("a.b"));
    assert_eq!(
        b.handle_hub_error("Permissions Violation for Publish to \"x\""),
        None
    );
    assert!(matches!(
        b.handle_hub_msg(now, hub_msg(imp, "a.b", None, b"")),
        Ok(Some(_))
    ));
}
