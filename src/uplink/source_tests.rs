//! Unit tests of the source-down machine: reply parsing, the request
//! flow, wake coalescing, cursor rules, recreate detection, bounds.

use super::*;
use crate::stream::Message;

const INBOX_SID: u64 = 7;
const WAKE_SID: u64 = 8;

fn params(start: SourceStart) -> SourceParams {
    SourceParams {
        from: "COMMANDS".into(),
        filter: Some("cmd.truck-042.>".into()),
        stream: "CMD".into(),
        local_subjects: vec!["cmd.>".into()],
        transform: Some((
            "cmd.truck-042.>".into(),
            Transform::new("cmd.truck-042.>", "cmd.>").unwrap(),
        )),
        start,
        poll_interval: Duration::from_secs(10),
        batch: 4,
        max_bytes: 1 << 16,
    }
}

fn record(created: &str, hub_seq: u64) -> SourceCursor {
    SourceCursor {
        hub_stream: "COMMANDS".into(),
        created: created.into(),
        hub_seq,
        local_seq: 3,
        anchor: None,
    }
}

/// The hub's time stamp of message `seq` in the tests.
fn ts(seq: u64) -> String {
    format!("2026-12-07T03:17:26.{seq}Z")
}

fn msg_headers(seq: u64, subject: &str, pending: u64, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut h = format!(
        "NATS/1.0\r\nNats-Stream: COMMANDS\r\nNats-Subject: {subject}\r\nNats-Sequence: {seq}\r\nNats-Time-Stamp: {}\r\nNats-Num-Pending: {pending}\r\nNats-Last-Sequence: 0\r\n",
        ts(seq)
    );
    for (k, v) in extra {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    h.into_bytes()
}

fn eob(pending: u64) -> Vec<u8> {
    format!("NATS/1.0 204 EOB\r\nNats-Num-Pending: {pending}\r\nNats-Last-Sequence: 5\r\n\r\n")
        .into_bytes()
}

fn stored(done: usize, local_last_seq: u64, error: Option<&str>) -> Stored {
    Stored {
        done,
        refused: 0,
        local_last_seq,
        error: error.map(str::to_string),
    }
}

/// A machine connected at `t0`, and the reply subject prefix.
struct H {
    s: Source,
    t0: Instant,
}

impl H {
    fn new(start: SourceStart, rec: Option<SourceCursor>, tail: Option<u64>) -> H {
        let t0 = Instant::now();
        let mut s = Source::new(params(start), rec, tail);
        s.handle_connected(t0, INBOX_SID, vec![WAKE_SID], "tok");
        H { s, t0 }
    }

    fn commands(&mut self) -> Vec<Command> {
        std::iter::from_fn(|| self.s.poll_command()).collect()
    }

    /// The last publish's (subject, reply, JSON body).
    fn last_request(&mut self) -> (String, String, serde_json::Value) {
        let c = self.commands();
        match c
            .into_iter()
            .rev()
            .find(|c| matches!(c, Command::Publish { .. }))
        {
            Some(Command::Publish {
                subject,
                reply,
                payload,
                ..
            }) => {
                let v = serde_json::from_slice(&payload).unwrap_or(serde_json::Value::Null);
                (subject, reply, v)
            }
            _ => panic!("no request sent"),
        }
    }

    fn info(&mut self, created: &str, last_seq: u64, allow_direct: bool) {
        self.info_at(self.t0, created, last_seq, allow_direct);
    }

    /// Tick at `now`, answer the STREAM.INFO it sends.
    fn info_at(&mut self, now: Instant, created: &str, last_seq: u64, allow_direct: bool) {
        self.s.handle_tick(now);
        let (subj, reply, _) = self.last_request();
        assert_eq!(subj, "$JS.API.STREAM.INFO.COMMANDS");
        let body = serde_json::json!({
            "config": {"name": "COMMANDS", "subjects": ["cmd.>"], "allow_direct": allow_direct},
            "created": created,
            "state": {"last_seq": last_seq},
        });
        self.s
            .handle_msg(now, INBOX_SID, &reply, None, body.to_string().as_bytes());
    }

    fn reply(&mut self, reply: &str, headers: &[u8], payload: &[u8]) {
        self.s
            .handle_msg(self.t0, INBOX_SID, reply, Some(headers), payload);
    }

    fn store_all(&mut self) -> Batch {
        let b = self.s.poll_batch().expect("a batch to store");
        self.s.handle_stored(
            self.t0,
            stored(b.msgs.len(), 100 + b.msgs.len() as u64, None),
        );
        b
    }
}

#[test]
fn replies_parse_and_lose_the_direct_get_headers() {
    let h = msg_headers(3, "cmd.truck-042.reboot", 1, &[("Trace", "x")]);
    match parse_reply(Some(&h), b"go") {
        Reply::Msg {
            seq,
            subject,
            headers,
            payload,
            pending,
            time,
        } => {
            assert_eq!(
                (seq, subject.as_str(), pending),
                (3, "cmd.truck-042.reboot", Some(1))
            );
            assert_eq!(time, Some(ts(3)));
            let hb = headers.unwrap();
            assert_eq!(hb.entries, vec![("Trace".to_string(), "x".to_string())]);
            assert_eq!(payload, b"go");
        }
        other => panic!("{other:?}"),
    }
    let plain = msg_headers(4, "a", 0, &[]);
    assert!(matches!(
        parse_reply(Some(&plain), b""),
        Reply::Msg { headers: None, .. }
    ));
    assert_eq!(
        parse_reply(Some(&eob(3)), b""),
        Reply::End { pending: Some(3) }
    );
    assert_eq!(
        parse_reply(Some(b"NATS/1.0 404 Message Not Found\r\n\r\n"), b""),
        Reply::NotFound
    );
    for bad in [
        &b"NATS/1.0 503\r\nNats-Subject: $JS.API.DIRECT.GET.X\r\n\r\n"[..],
        b"NATS/1.0 408 Bad Request\r\n\r\n",
        b"NATS/1.0\r\nNats-Subject: a\r\n\r\n",
        b"garbage",
    ] {
        assert!(
            matches!(parse_reply(Some(bad), b""), Reply::Fail(_)),
            "{bad:?}"
        );
    }
    assert!(matches!(parse_reply(None, b"{}"), Reply::Fail(_)));
    let why = match parse_reply(Some(b"NATS/1.0 503\r\n\r\n"), b"") {
        Reply::Fail(w) => w,
        _ => unreachable!(),
    };
    assert!(why.contains("allow_direct"), "{why}");
}

#[test]
fn origin_header_round_trip() {
    let h = b"NATS/1.0\r\nNats-Stream-Source: COMMANDS 42\r\n\r\n";
    assert_eq!(origin_of(Some(h), "COMMANDS"), Some(42));
    assert_eq!(origin_of(Some(h), "OTHER"), None);
    assert_eq!(origin_of(None, "COMMANDS"), None);
    assert_eq!(
        origin_of(Some(b"NATS/1.0\r\nX: 1\r\n\r\n"), "COMMANDS"),
        None
    );
}

#[test]
fn check_fetch_store_in_order_with_the_transform() {
    let mut h = H::new(SourceStart::All, None, None);
    // Inbox and wake subscriptions at once, before the check: a message
    // stored after the check's answer wakes the node.
    let cmds = h.commands();
    assert!(
        matches!(&cmds[..], [
        Command::Subscribe { subject: inbox, sid: INBOX_SID },
        Command::Subscribe { subject: wake, sid: WAKE_SID },
    ] if inbox == "_INBOX.tok.*" && wake == "cmd.truck-042.>"),
        "{cmds:?}"
    );
    h.info("T1", 2, true);
    let cmds = h.commands();
    let Some(Command::Publish {
        subject,
        reply,
        payload,
        ..
    }) = cmds.last().cloned()
    else {
        panic!("a fetch follows the check: {cmds:?}")
    };
    assert_eq!(subject, "$JS.API.DIRECT.GET.COMMANDS");
    let body: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(body["seq"], 1);
    assert_eq!(body["next_by_subj"], "cmd.truck-042.>");
    assert_eq!(body["batch"], 4);
    // A record of the hub stream's identity is written at once.
    assert_eq!(h.s.poll_cursor().unwrap().created, "T1");
    h.reply(&reply, &msg_headers(1, "cmd.truck-042.a", 1, &[]), b"p1");
    h.reply(
        &reply,
        &msg_headers(2, "cmd.truck-042.b", 0, &[("K", "v")]),
        b"p2",
    );
    assert!(
        h.s.poll_batch().is_none(),
        "not before the end of the batch"
    );
    h.reply(&reply, &eob(0), b"");
    assert!(
        h.s.poll_batch().is_none(),
        "an unanchored batch waits for the proof of the stream's identity"
    );
    h.info("T1", 2, true);
    let b = h.s.poll_batch().unwrap();
    assert_eq!(b.last_hub_seq, 2);
    let subjects: Vec<_> = b
        .msgs
        .iter()
        .map(|(s, m)| (*s, m.subject.clone()))
        .collect();
    assert_eq!(
        subjects,
        vec![(1, "cmd.a".to_string()), (2, "cmd.b".to_string())]
    );
    let Message {
        headers, payload, ..
    } = &b.msgs[1].1;
    let hb = HeaderBlock::parse(headers.as_deref().unwrap()).unwrap();
    assert_eq!(hb.get(ORIGIN_HEADER), Some("COMMANDS 2"));
    assert_eq!(hb.get("K"), Some("v"));
    assert_eq!(hb.get("Nats-Sequence"), None);
    assert_eq!(payload, b"p2");
    assert_eq!(h.s.hub_seq(), 0, "the cursor waits for durability");
    assert!(h.s.poll_cursor().is_none());
    h.s.handle_stored(h.t0, stored(2, 104, None));
    assert_eq!(h.s.hub_seq(), 2);
    assert_eq!(
        h.s.poll_cursor(),
        Some(SourceCursor {
            hub_stream: "COMMANDS".into(),
            created: "T1".into(),
            hub_seq: 2,
            local_seq: 104,
            anchor: Some(ts(2)),
        })
    );
    assert!(
        h.commands().is_empty(),
        "pending 0: idle until woken or polled"
    );
    assert_eq!(h.s.status().state, "idle");
    assert_eq!(h.s.status().stored, 2);
}

#[test]
fn a_full_batch_is_followed_at_once_and_duplicates_are_dropped() {
    let mut h = H::new(SourceStart::All, Some(record("T1", 10)), Some(12));
    h.info("T1", 30, true);
    let (_, reply, body) = h.last_request();
    assert_eq!(body["seq"], 13, "cursor = max(record, local tail)");
    h.reply(&reply, &msg_headers(13, "cmd.truck-042.a", 5, &[]), b"");
    h.reply(&reply, &msg_headers(13, "cmd.truck-042.a", 5, &[]), b"");
    h.reply(&reply, &msg_headers(12, "cmd.truck-042.a", 5, &[]), b"");
    h.reply(&reply, &eob(5), b"");
    h.info("T1", 30, true);
    let b = h.store_all();
    assert_eq!(b.msgs.len(), 1);
    let (_, reply2, body) = h.last_request();
    assert_eq!(
        (&body["seq"], &body["batch"]),
        (&13.into(), &5.into()),
        "more pending: the next batch at once, from the anchor"
    );
    // A late answer to the earlier request is ignored.
    h.reply(&reply, &msg_headers(14, "cmd.truck-042.a", 0, &[]), b"");
    h.reply(&reply2, b"NATS/1.0 404 Message Not Found\r\n\r\n", b"");
    assert!(h.s.poll_batch().is_none());
    assert_eq!(h.s.hub_seq(), 13);
}

#[test]
fn wakes_coalesce_and_empty_wakes_retry_then_check() {
    let mut h = H::new(SourceStart::All, Some(record("T1", 5)), None);
    h.info("T1", 5, true);
    assert!(h
        .commands()
        .iter()
        .all(|c| !matches!(c, Command::Publish { .. })));
    let t = h.t0;
    h.s.handle_msg(t, WAKE_SID, "cmd.truck-042.a", None, b"x");
    let (_, reply, body) = h.last_request();
    assert_eq!(body["seq"], 6);
    // Three more wakes while the fetch is out: one fetch after it.
    for _ in 0..3 {
        h.s.handle_msg(t, WAKE_SID, "cmd.truck-042.a", None, b"x");
    }
    assert!(h.commands().is_empty(), "one request in flight");
    h.reply(&reply, &msg_headers(6, "cmd.truck-042.a", 0, &[]), b"");
    h.reply(&reply, &eob(0), b"");
    h.info("T1", 6, true);
    h.store_all();
    let (_, reply, body) = h.last_request();
    assert_eq!(body["seq"], 6, "the coalesced wake, from the anchor");
    assert!(h.commands().is_empty());
    // Nothing found after a wake: retried shortly (a follower may lag),
    // then the hub stream is checked.
    h.reply(&reply, b"NATS/1.0 404 Message Not Found\r\n\r\n", b"");
    let mut now = t;
    let mut fetches = 0;
    loop {
        let d = h.s.poll_deadline().unwrap();
        assert!(
            d <= now + Duration::from_secs(1),
            "retries come soon: {:?} after {fetches}",
            d - now
        );
        now = d;
        h.s.handle_tick(now);
        let (subj, reply, _) = h.last_request();
        if subj.starts_with("$JS.API.STREAM.INFO") {
            break;
        }
        fetches += 1;
        h.s.handle_msg(
            now,
            INBOX_SID,
            &reply,
            Some(b"NATS/1.0 404 Message Not Found\r\n\r\n"),
            b"",
        );
    }
    assert_eq!(fetches, WAKE_RETRIES);
}

#[test]
fn the_poll_is_a_direct_get_and_every_few_a_check() {
    let mut h = H::new(SourceStart::All, Some(record("T1", 5)), None);
    h.info("T1", 5, true);
    let mut kinds = Vec::new();
    for _ in 0..INFO_EVERY {
        let now = h.s.poll_deadline().unwrap();
        assert_eq!(
            now - h.t0,
            Duration::from_secs(10) * (kinds.len() as u32 + 1)
        );
        h.s.handle_tick(now);
        let (subj, reply, _) = h.last_request();
        kinds.push(subj.clone());
        if subj.contains("DIRECT") {
            h.s.handle_msg(
                now,
                INBOX_SID,
                &reply,
                Some(b"NATS/1.0 404 Message Not Found\r\n\r\n"),
                b"",
            );
        }
    }
    assert_eq!(
        kinds.iter().filter(|k| k.contains("STREAM.INFO")).count(),
        1
    );
    assert!(kinds.last().unwrap().contains("STREAM.INFO"));
}

#[test]
fn start_policies_apply_only_without_a_cursor() {
    let mut h = H::new(SourceStart::New, None, None);
    h.info("T1", 40, true);
    assert!(h
        .commands()
        .iter()
        .all(|c| !matches!(c, Command::Publish { .. })));
    assert_eq!(h.s.poll_cursor().unwrap().hub_seq, 40);

    let mut h = H::new(SourceStart::Seq(7), None, None);
    h.info("T1", 40, true);
    assert_eq!(h.last_request().2["seq"], 7);

    let mut h = H::new(SourceStart::New, Some(record("T1", 3)), None);
    h.info("T1", 40, true);
    assert_eq!(h.last_request().2["seq"], 4, "a cursor wins over deliver");

    let t = "2026-12-01T08:00:00Z".to_string();
    let mut h = H::new(SourceStart::Time(t.clone()), None, None);
    h.info("T1", 40, true);
    assert!(
        h.s.poll_cursor().is_none(),
        "no cursor before the first batch"
    );
    let (_, reply, body) = h.last_request();
    assert_eq!(body["start_time"], t.as_str());
    assert!(body.get("seq").is_none());
    h.reply(&reply, &msg_headers(31, "cmd.truck-042.a", 0, &[]), b"");
    h.reply(&reply, &eob(0), b"");
    h.info("T1", 40, true);
    h.store_all();
    assert_eq!(h.s.poll_cursor().unwrap().hub_seq, 31);
    h.s.handle_msg(h.t0, WAKE_SID, "cmd.truck-042.a", None, b"");
    assert_eq!(h.last_request().2["seq"], 31, "then by sequence (anchored)");
}

#[test]
fn a_recreated_hub_stream_is_detected_and_copied_from_its_start() {
    // Another created; or, with created unknown (a record of an early
    // release), fewer messages than the cursor.
    for (old, created, last) in [("T1", "T2", 50), ("", "T1", 3)] {
        let mut h = H::new(SourceStart::New, Some(record(old, 10)), None);
        h.info(created, last, true);
        let evs: Vec<_> = std::iter::from_fn(|| h.s.poll_event()).collect();
        assert!(
            evs.iter()
                .any(|e| matches!(e, Event::Recreated { old_seq: 10, .. })),
            "{evs:?}"
        );
        assert_eq!(h.s.status().recreated, 1);
        let c = h.s.poll_cursor().unwrap();
        assert_eq!((c.created.as_str(), c.hub_seq), (created, 0));
        assert_eq!(h.last_request().2["seq"], 1);
    }
    // Same stream: nothing to report.
    let mut h = H::new(SourceStart::All, Some(record("T1", 10)), None);
    h.info("T1", 12, true);
    assert!(std::iter::from_fn(|| h.s.poll_event()).next().is_none());
    // No record but copies in the local tail: the stream is adopted.
    let mut h = H::new(SourceStart::All, None, Some(9));
    h.info("T3", 12, true);
    assert_eq!(h.s.status().recreated, 0);
    assert_eq!(h.last_request().2["seq"], 10);
}

#[test]
fn reserved_and_uncaptured_subjects_are_skipped_and_passed() {
    let mut p = params(SourceStart::All);
    p.filter = None;
    p.transform = None;
    p.local_subjects = vec![">".into()];
    let mut s = Source::new(p, None, None);
    let t = Instant::now();
    s.handle_connected(t, INBOX_SID, vec![WAKE_SID], "tok");
    s.handle_tick(t);
    let _ = std::iter::from_fn(|| s.poll_command()).count();
    s.handle_msg(t, INBOX_SID, "_INBOX.tok.1", None,
        br#"{"config":{"subjects":["$JS.API.>","_INBOX.>","ok.>"],"allow_direct":true},"created":"T","state":{"last_seq":3}}"#);
    for (i, subj) in ["$JS.API.STREAM.DELETE.CMD", "_INBOX.abc", "ok.1"]
        .iter()
        .enumerate()
    {
        let seq = i as u64 + 1;
        s.handle_msg(
            t,
            INBOX_SID,
            "_INBOX.tok.2",
            Some(&msg_headers(seq, subj, 3 - seq, &[])),
            b"",
        );
    }
    s.handle_msg(t, INBOX_SID, "_INBOX.tok.2", Some(&eob(0)), b"");
    s.handle_msg(
        t,
        INBOX_SID,
        "_INBOX.tok.3",
        None,
        br#"{"config":{"allow_direct":true},"created":"T","state":{"last_seq":3}}"#,
    );
    let b = s.poll_batch().unwrap();
    assert_eq!(b.msgs.len(), 1);
    assert_eq!(b.msgs[0].1.subject, "ok.1");
    assert_eq!(b.last_hub_seq, 3);
    assert_eq!(s.status().skipped, 2);
    s.handle_stored(t, stored(1, 1, None));
    assert_eq!(s.hub_seq(), 3, "the cursor passes skipped messages");
}

#[test]
fn hub_errors_are_shown_and_retried() {
    let mut h = H::new(SourceStart::All, None, None);
    h.info("T1", 0, false);
    let st = h.s.status();
    assert_eq!(st.state, "error");
    assert!(st.last_error.unwrap().contains("--allow-direct"));
    let d = h.s.poll_deadline().unwrap();
    assert_eq!(
        d - h.t0,
        Duration::from_secs(10),
        "checked again at the poll interval"
    );

    let mut h = H::new(SourceStart::All, None, None);
    h.s.handle_tick(h.t0);
    let (_, reply, _) = h.last_request();
    h.s.handle_msg(
        h.t0,
        INBOX_SID,
        &reply,
        None,
        br#"{"error":{"code":404,"err_code":10059,"description":"stream not found"}}"#,
    );
    assert!(h.s.status().last_error.unwrap().contains("not found"));

    // A 503 to a direct get: error, then a check shortly after.
    let mut h = H::new(SourceStart::All, Some(record("T1", 1)), None);
    h.info("T1", 5, true);
    let (_, reply, _) = h.last_request();
    h.reply(&reply, b"NATS/1.0 503\r\n\r\n", b"");
    assert_eq!(h.s.status().state, "error");
    let d = h.s.poll_deadline().unwrap();
    h.s.handle_tick(d);
    assert_eq!(h.s.status().state, "error", "still, while checking");
    h.info("T1", 5, true);
    assert_eq!(h.s.status().last_error, None);
    let evs: Vec<_> = std::iter::from_fn(|| h.s.poll_event()).collect();
    assert!(evs.contains(&Event::Recovered), "{evs:?}");

    // No answer at all: a timeout, then a check.
    let mut h = H::new(SourceStart::All, Some(record("T1", 1)), None);
    h.info("T1", 5, true);
    let _ = h.last_request();
    let d = h.s.poll_deadline().unwrap();
    assert_eq!(d - h.t0, REQUEST_TIMEOUT);
    h.s.handle_tick(d);
    assert_eq!(h.s.status().state, "error");
}

#[test]
fn a_failed_store_keeps_the_cursor_at_what_was_stored() {
    let mut h = H::new(SourceStart::All, Some(record("T1", 0)), None);
    h.info("T1", 3, true);
    let (_, reply, _) = h.last_request();
    for seq in 1..=3 {
        h.reply(
            &reply,
            &msg_headers(seq, "cmd.truck-042.a", 3 - seq, &[]),
            b"",
        );
    }
    h.reply(&reply, &eob(0), b"");
    h.info("T1", 3, true);
    let b = h.s.poll_batch().unwrap();
    assert_eq!(b.msgs.len(), 3);
    h.s.handle_stored(h.t0, stored(1, 50, Some("disk full")));
    assert_eq!(h.s.hub_seq(), 1);
    assert_eq!(h.s.poll_cursor().unwrap().hub_seq, 1);
    assert!(h.s.status().last_error.unwrap().contains("disk full"));
    // A disconnect while the batch is with the shell keeps it.
    let mut h = H::new(SourceStart::All, Some(record("T1", 0)), None);
    h.info("T1", 1, true);
    let (_, reply, _) = h.last_request();
    h.reply(&reply, &msg_headers(1, "cmd.truck-042.a", 0, &[]), b"");
    h.reply(&reply, &eob(0), b"");
    h.info("T1", 1, true);
    let b = h.s.poll_batch().unwrap();
    h.s.handle_disconnected();
    h.s.handle_stored(h.t0, stored(b.msgs.len(), 9, None));
    assert_eq!(h.s.hub_seq(), 1);
    assert_eq!(h.s.status().state, "disconnected");
}

#[test]
fn a_hub_sending_more_than_asked_is_refused() {
    let mut h = H::new(SourceStart::All, Some(record("T1", 0)), None);
    h.info("T1", 100, true);
    let (_, reply, _) = h.last_request();
    for seq in 1..=5 {
        h.reply(
            &reply,
            &msg_headers(seq, "cmd.truck-042.a", 100 - seq, &[]),
            b"",
        );
    }
    h.reply(&reply, &eob(0), b"");
    assert!(h.s.poll_batch().is_none());
    assert_eq!(h.s.status().state, "error");
    assert_eq!(h.s.hub_seq(), 0);
}

/// A machine whose cursor (hub seq 5 of "T1") has its anchor.
fn anchored() -> H {
    let rec = SourceCursor {
        anchor: Some(ts(5)),
        ..record("T1", 5)
    };
    let mut h = H::new(SourceStart::All, Some(rec), None);
    h.info("T1", 9, true);
    h
}

#[test]
fn an_anchored_read_that_finds_its_anchor_is_stored_without_a_check() {
    let mut h = anchored();
    let (_, reply, body) = h.last_request();
    assert_eq!((&body["seq"], &body["batch"]), (&5.into(), &5.into()));
    h.reply(&reply, &msg_headers(5, "cmd.truck-042.a", 4, &[]), b"old");
    for seq in 6..=9 {
        h.reply(
            &reply,
            &msg_headers(seq, "cmd.truck-042.a", 9 - seq, &[]),
            b"",
        );
    }
    h.reply(&reply, &eob(0), b"");
    assert!(h.commands().is_empty(), "no STREAM.INFO");
    let b = h.store_all();
    let seqs: Vec<u64> = b.msgs.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, vec![6, 7, 8, 9], "the anchor is not stored again");
    assert_eq!(h.s.poll_cursor().unwrap().anchor, Some(ts(9)));
}

#[test]
fn a_stream_recreated_and_grown_past_the_cursor_while_connected_is_detected() {
    // The new stream's message 5 is another message: nothing of this
    // batch is stored under the old identity; it is copied from 1.
    let mut h = anchored();
    let (_, reply, _) = h.last_request();
    let other = msg_headers(5, "cmd.truck-042.a", 2, &[]);
    let other = String::from_utf8(other)
        .unwrap()
        .replace(&ts(5), "2026-12-08T00:00:00Z");
    h.reply(&reply, other.as_bytes(), b"new 5");
    h.reply(&reply, &msg_headers(6, "cmd.truck-042.a", 1, &[]), b"new 6");
    h.reply(&reply, &eob(0), b"");
    assert!(h.s.poll_batch().is_none());
    h.info("T2", 7, true);
    assert!(h.s.poll_batch().is_none(), "the batch is dropped");
    let evs: Vec<_> = std::iter::from_fn(|| h.s.poll_event()).collect();
    assert!(
        evs.iter()
            .any(|e| matches!(e, Event::Recreated { old_seq: 5, .. })),
        "{evs:?}"
    );
    assert_eq!(h.s.status().recreated, 1);
    let (_, _, body) = h.last_request();
    assert_eq!((&body["seq"], &body["batch"]), (&1.into(), &4.into()));
    // The same seen on an empty read: checked at once.
    let mut h = anchored();
    let (_, reply, _) = h.last_request();
    h.reply(&reply, other.as_bytes(), b"new 5");
    h.reply(&reply, &eob(0), b"");
    h.s.handle_tick(h.t0);
    assert!(h.last_request().0.contains("STREAM.INFO"));
}

#[test]
fn a_missing_anchor_leaves_the_proof_to_stream_info() {
    // Message 5 is gone (max_age): the reads start after it, proven by
    // STREAM.INFO, and may carry one message more than a batch.
    let mut h = anchored();
    let (_, reply, _) = h.last_request();
    for seq in 6..=10 {
        h.reply(
            &reply,
            &msg_headers(seq, "cmd.truck-042.a", 10 - seq, &[]),
            b"",
        );
    }
    h.reply(&reply, &eob(0), b"");
    assert!(h.s.poll_batch().is_none());
    h.info("T1", 10, true);
    let b = h.store_all();
    assert_eq!(b.msgs.len(), 5);
    assert_eq!(h.s.status().recreated, 0);
    assert_eq!(h.s.hub_seq(), 10);
}

#[test]
fn only_a_bucket_stream_takes_its_store_subjects() {
    use super::store_subject_of;
    assert!(store_subject_of("KV_cfg", "$KV.cfg.a"));
    assert!(store_subject_of("KV_cfg", "$KV.cfg.>"));
    assert!(store_subject_of("OBJ_fw", "$O.fw.C.x"));
    assert!(!store_subject_of("KV_cfg", "$KV.cfg2.a"));
    assert!(!store_subject_of("KV_cfg", "$KV.other.a"));
    assert!(!store_subject_of("KV_cfg", "$JS.API.STREAM.DELETE.KV_cfg"));
    assert!(!store_subject_of("CFG", "$KV.cfg.a"));
    assert!(!store_subject_of("KV_", "$KV..a"));
    assert!(!store_subject_of("OBJ_fw", "$KV.fw.a"));
}

/// A direct get reply carries the stored message's own headers first and
/// the server's after them: a message that itself carries `Nats-Sequence`,
/// `Nats-Subject` or `Nats-Time-Stamp` (a RePublish, a forged anchor) must
/// not be taken for another sequence or time.
#[test]
fn the_server_set_headers_are_the_last_occurrence() {
    let forged = format!(
        "NATS/1.0\r\nNats-Sequence: 99\r\nNats-Subject: cmd.other\r\nNats-Time-Stamp: {}\r\nNats-Num-Pending: 7\r\nTrace: x\r\nNats-Stream: COMMANDS\r\nNats-Subject: cmd.a\r\nNats-Sequence: 5\r\nNats-Time-Stamp: {}\r\nNats-Num-Pending: 1\r\nNats-Last-Sequence: 0\r\n\r\n",
        ts(4),
        ts(5)
    );
    match parse_reply(Some(forged.as_bytes()), b"go") {
        Reply::Msg {
            seq,
            subject,
            headers,
            pending,
            time,
            ..
        } => {
            assert_eq!((seq, subject.as_str(), pending), (5, "cmd.a", Some(1)));
            assert_eq!(time, Some(ts(5)));
            let hb = headers.unwrap();
            assert_eq!(hb.entries, vec![("Trace".to_string(), "x".to_string())]);
        }
        other => panic!("{other:?}"),
    }
    // A forger who sets the anchor's time stamp on the message at the
    // cursor's sequence does not pass for the anchor.
    let mut h = anchored();
    let (_, reply, _) = h.last_request();
    let fake = format!(
        "NATS/1.0\r\nNats-Time-Stamp: {}\r\nNats-Stream: COMMANDS\r\nNats-Subject: cmd.truck-042.a\r\nNats-Sequence: 5\r\nNats-Time-Stamp: 2027-01-01T00:00:00Z\r\nNats-Num-Pending: 1\r\n\r\n",
        ts(5)
    );
    h.reply(&reply, fake.as_bytes(), b"old?");
    h.reply(&reply, &msg_headers(6, "cmd.truck-042.a", 0, &[]), b"new");
    h.reply(&reply, &eob(0), b"");
    assert!(h.s.poll_batch().is_none(), "a forged anchor passed");
}

/// An R3 stream without a leader: a follower answers STREAM.INFO with its
/// own lagging state. Same `created`, fewer messages than the cursor: not
/// a recreation (no reset to 0, no copy of the whole stream again); it is
/// re-checked, reported if it persists, and reading goes on once the hub
/// holds the cursor again.
#[test]
fn a_lagging_replica_below_the_cursor_is_waited_for_not_a_recreation() {
    let mut h = H::new(SourceStart::All, Some(record("T1", 10)), None);
    h.info("T1", 7, true);
    assert_eq!(h.s.status().recreated, 0);
    assert_eq!(h.s.hub_seq(), 10);
    assert!(h.s.poll_cursor().is_none(), "the cursor is kept");
    assert!(std::iter::from_fn(|| h.s.poll_event()).next().is_none());
    assert_eq!(h.s.poll_deadline(), Some(h.t0 + ERROR_RETRY));
    let publishes = |h: &mut H| {
        let c = h.commands();
        c.iter()
            .filter(|c| matches!(c, Command::Publish { .. }))
            .count()
    };
    assert_eq!(publishes(&mut h), 0, "nothing read");
    for _ in 1..BEHIND_CHECKS {
        let at = h.s.poll_deadline().unwrap();
        h.info_at(at, "T1", 8, true);
    }
    assert_eq!(h.s.status().state, "error");
    let why = h.s.status().last_error.unwrap();
    assert!(why.contains("lags") && why.contains("leader"), "{why}");
    assert_eq!((h.s.hub_seq(), h.s.status().recreated), (10, 0));
    // The leader is back: reading goes on after the cursor.
    let at = h.s.poll_deadline().unwrap();
    h.info_at(at, "T1", 12, true);
    assert_eq!(h.s.status().last_error, None);
    assert_eq!(h.last_request().2["seq"], 11);
}

/// A hub stream that lost its tail and grew again (same `created`): the
/// message at the cursor's sequence is another one. Nothing is stored
/// (the re-used sequences would be skipped unseen); the source is in
/// error with what to do, counted once, keeps checking, and a recreation
/// ends it.
#[test]
fn a_diverged_hub_stream_is_never_stored_and_reported() {
    let mut h = anchored();
    let (_, reply, _) = h.last_request();
    let other = String::from_utf8(msg_headers(5, "cmd.truck-042.a", 2, &[]))
        .unwrap()
        .replace(&ts(5), "2026-12-08T00:00:00Z");
    h.reply(&reply, other.as_bytes(), b"another 5");
    h.reply(&reply, &msg_headers(6, "cmd.truck-042.a", 1, &[]), b"6");
    h.reply(&reply, &msg_headers(7, "cmd.truck-042.a", 0, &[]), b"7");
    h.reply(&reply, &eob(0), b"");
    assert!(h.s.poll_batch().is_none());
    h.info("T1", 9, true);
    assert!(h.s.poll_batch().is_none(), "nothing of it is stored");
    let st = h.s.status();
    assert_eq!((st.state, st.diverged, st.recreated), ("error", 1, 0));
    let why = st.last_error.unwrap();
    assert!(
        why.contains("re-used") && why.contains("Recreate the hub stream"),
        "{why}"
    );
    let evs: Vec<_> = std::iter::from_fn(|| h.s.poll_event()).collect();
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(h.s.hub_seq(), 5);
    // It keeps checking, reads nothing, counts once.
    for k in 1..=3 {
        let at = h.s.poll_deadline().unwrap();
        assert_eq!(at - h.t0, Duration::from_secs(10) * k);
        h.info_at(at, "T1", 9, true);
        assert!(h.commands().is_empty(), "no read while diverged");
        assert!(h.s.poll_batch().is_none());
    }
    assert_eq!(h.s.status().diverged, 1);
    assert!(std::iter::from_fn(|| h.s.poll_event()).next().is_none());
    // Recreated: copied whole from its first message.
    let at = h.s.poll_deadline().unwrap();
    h.info_at(at, "T2", 3, true);
    assert_eq!(h.s.status().recreated, 1);
    assert_eq!(h.s.status().last_error, None);
    assert_eq!(h.last_request().2["seq"], 1);
}

/// Idle polls and wake retries only ask whether anything follows the
/// cursor (a 34-byte `404` when nothing does), not the anchor; what they
/// find is read again anchored, and never stored from the probe.
#[test]
fn idle_polls_and_wake_retries_are_unanchored_probes() {
    let mut h = anchored();
    let (_, reply, _) = h.last_request();
    h.reply(&reply, &msg_headers(5, "cmd.truck-042.a", 0, &[]), b"old");
    h.reply(&reply, &msg_headers(6, "cmd.truck-042.a", 0, &[]), b"6");
    h.reply(&reply, &eob(0), b"");
    h.store_all();
    assert_eq!(h.s.poll_cursor().unwrap().anchor, Some(ts(6)));
    // The poll: one message after the cursor, no anchor.
    let at = h.s.poll_deadline().unwrap();
    h.s.handle_tick(at);
    let (subj, reply, body) = h.last_request();
    assert!(subj.contains("DIRECT"));
    assert_eq!((&body["seq"], &body["batch"]), (&7.into(), &1.into()));
    h.s.handle_msg(
        at,
        INBOX_SID,
        &reply,
        Some(b"NATS/1.0 404 Message Not Found\r\n\r\n"),
        b"",
    );
    assert!(h.commands().is_empty());
    // A wake: read anchored; it found nothing (a follower lags): the
    // retry is a probe again.
    h.s.handle_msg(at, WAKE_SID, "cmd.truck-042.a", None, b"x");
    let (_, reply, body) = h.last_request();
    assert_eq!(body["seq"], 6);
    h.s.handle_msg(
        at,
        INBOX_SID,
        &reply,
        Some(&msg_headers(6, "cmd.truck-042.a", 0, &[])),
        b"6",
    );
    h.s.handle_msg(at, INBOX_SID, &reply, Some(&eob(0)), b"");
    let at = h.s.poll_deadline().unwrap();
    h.s.handle_tick(at);
    let (_, reply, body) = h.last_request();
    assert_eq!((&body["seq"], &body["batch"]), (&7.into(), &1.into()));
    // The probe finds message 7: it is read again from the anchor.
    h.s.handle_msg(
        at,
        INBOX_SID,
        &reply,
        Some(&msg_headers(7, "cmd.truck-042.a", 0, &[])),
        b"7",
    );
    h.s.handle_msg(at, INBOX_SID, &reply, Some(&eob(0)), b"");
    assert!(h.s.poll_batch().is_none(), "nothing stored from a probe");
    let (_, reply, body) = h.last_request();
    assert_eq!((&body["seq"], &body["batch"]), (&6.into(), &5.into()));
    h.s.handle_msg(
        at,
        INBOX_SID,
        &reply,
        Some(&msg_headers(6, "cmd.truck-042.a", 1, &[])),
        b"6",
    );
    h.s.handle_msg(
        at,
        INBOX_SID,
        &reply,
        Some(&msg_headers(7, "cmd.truck-042.a", 0, &[])),
        b"7",
    );
    h.s.handle_msg(at, INBOX_SID, &reply, Some(&eob(0)), b"");
    let b = h.s.poll_batch().unwrap();
    assert_eq!(b.msgs.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![7]);
}

/// A wake that comes before the connection's first `STREAM.INFO` answer
/// (the wake subscription goes first) reads nothing until the answer
/// proves the hub stream's identity; then it is read at once.
#[test]
fn a_wake_before_the_first_check_waits_for_its_answer() {
    let mut h = H::new(SourceStart::All, Some(record("T1", 2)), None);
    h.commands();
    h.s.handle_msg(h.t0, WAKE_SID, "cmd.truck-042.reboot", None, b"x");
    assert!(
        !h.commands().iter().any(|c| matches!(c,
            Command::Publish { subject, .. } if subject.starts_with("$JS.API.DIRECT.GET"))),
        "no read before the check"
    );
    h.info("T1", 2, true);
    let (subj, _, _) = h.last_request();
    assert_eq!(subj, "$JS.API.DIRECT.GET.COMMANDS", "the wake is served");
}

/// Without a filter the wake subjects come from the first check's
/// answer, so the subscription follows it; a message stored in between
/// would wait for the poll, so a probe follows the subscription.
#[test]
fn without_a_filter_a_probe_follows_the_late_wake_subscription() {
    let mut p = params(SourceStart::All);
    p.filter = None;
    p.transform = None;
    let t0 = Instant::now();
    let mut s = Source::new(p, Some(record("T1", 2)), None);
    s.handle_connected(t0, INBOX_SID, vec![WAKE_SID], "tok");
    let mut h = H { s, t0 };
    let cmds = h.commands();
    assert_eq!(cmds.len(), 1, "only the inbox before the check: {cmds:?}");
    h.info("T1", 2, true);
    let cmds = h.commands();
    let wake = cmds.iter().position(|c| {
        matches!(c,
        Command::Subscribe { subject, sid: WAKE_SID } if subject == "cmd.>")
    });
    let get = cmds.iter().position(|c| {
        matches!(c,
        Command::Publish { subject, .. } if subject == "$JS.API.DIRECT.GET.COMMANDS")
    });
    assert!(
        matches!((wake, get), (Some(w), Some(g)) if w < g),
        "{cmds:?}"
    );
}

/// Copies past the record (a crash between append and record) are
/// recorded at start, before anything new comes: the record must not
/// stay behind copies that retention may remove.
#[test]
fn a_record_behind_the_local_copies_is_written_again_at_start() {
    let mut rec = record("T1", 12);
    rec.local_seq = 10;
    let mut s = Source::new(params(SourceStart::All), Some(rec), Some(14));
    assert!(s.poll_cursor().is_none());
    s.handle_scanned(12);
    let c = s.poll_cursor().expect("a new record");
    assert_eq!((c.created.as_str(), c.hub_seq, c.local_seq), ("T1", 14, 12));
    // Nothing past the record: nothing to write.
    let mut s = Source::new(params(SourceStart::All), Some(record("T1", 12)), None);
    s.handle_scanned(0);
    assert!(s.poll_cursor().is_none());
}
