//! The publish path without sockets: a router over in-memory streams.

use super::*;
use crate::store::MemBackend;
use crate::stream::{open_with_backend, Storage, StreamConfig, SyncPolicy};
use smol::future::block_on;

fn stream(b: &MemBackend, subjects: &[&str]) -> StreamHandle {
    let cfg = StreamConfig {
        storage: Storage::Memory,
        sync: SyncPolicy::Always,
        ..StreamConfig::new("S", subjects)
    };
    open_with_backend(Box::new(b.clone()), cfg, None).unwrap().0
}

fn nats_pub(subject: &str, reply: Option<&str>, no_responders: bool) -> NatsPublish {
    NatsPublish {
        subject: subject.into(),
        reply: reply.map(str::to_string),
        headers: None,
        payload: b"x".to_vec(),
        no_responders,
    }
}

const CLIENT: NatsClient<'static> = NatsClient {
    conn: 1,
    echo: true,
    permissions: None,
};

#[test]
fn acks_leave_in_arrival_order_once_stored() {
    let mem = MemBackend::new();
    let s = stream(&mem, &["t.>"]);
    let broker = Broker::new(vec![s.clone()]);
    let ingest = Ingest::new(&broker);
    let mut q: AckQueue<u16> = AckQueue::default();
    let gate = mem.hold_syncs();
    let p = ingest
        .mqtt("t.a".into(), b"1".to_vec(), 1, false, None, Instant::now())
        .unwrap();
    let (routed, capture) = ingest.route_mqtt(p, None, Instant::now());
    assert!(!routed);
    let c = capture.expect("t.> is captured");
    assert_eq!(c.message.subject, "t.a");
    let w = block_on(c.stream.submit(c.message)).unwrap();
    q.stored(1, w);
    q.ready(2, Ok(()));
    assert!(q.pop().is_none(), "2 is ready but waits for 1");
    assert!(matches!(q.front(), Front::Waiting(_)));
    drop(gate);
    if let Front::Waiting(w) = q.front() {
        block_on(w.wait());
    }
    let (k, r) = q.pop().unwrap();
    assert_eq!(k, 1);
    assert_eq!(r.unwrap().unwrap().seq, 1);
    assert!(matches!(q.front(), Front::Ready));
    assert!(matches!(q.pop(), Some((2, Ok(None)))));
    assert!(q.is_empty());
    assert_eq!(broker.counters.msgs_in.load(Ordering::Relaxed), 1);
}

#[test]
fn a_failed_retained_write_is_the_acknowledgement() {
    let broker = Broker::new(Vec::new());
    let ingest = Ingest::new(&broker);
    let quota = std::io::Error::from(std::io::ErrorKind::QuotaExceeded);
    assert_eq!(ingest.retained(Err(quota)), Err(Refused::RetainedQuota));
    assert_eq!(broker.counters.retained_refused.load(Ordering::Relaxed), 1);
    let disk = std::io::Error::other("disk full");
    let Err(Refused::RetainedFailed(e)) = ingest.retained(Err(disk)) else {
        panic!("an I/O error refuses the publish");
    };
    let mut q: AckQueue<u16> = AckQueue::default();
    q.ready(7, Err(AckError::Retained(e)));
    let (_, r) = q.pop().unwrap();
    assert_eq!(
        r.unwrap_err().to_string(),
        "retained message not stored: disk full"
    );
    assert_eq!(ingest.retained(Ok(())), Ok(()));
}

#[test]
fn nats_requests_to_a_catch_all_stream_are_stored_but_not_answered() {
    let mem = MemBackend::new();
    let broker = Broker::new(vec![stream(&mem, &[">"])]);
    let ingest = Ingest::new(&broker);
    let (mut seen, mut tally) = (NoInterest::default(), Tally::default());
    let now = Instant::now();
    let p = nats_pub("a.b", Some("_INBOX.r"), true);
    let out = ingest.nats(&CLIENT, p, &mut seen, &mut tally, now).unwrap();
    let (c, ack_to) = out.capture.expect("stored");
    assert_eq!(c.message.subject, "a.b");
    assert_eq!(ack_to, None, "a catch-all stream stays silent");
    assert_eq!(out.no_responders, Some(("_INBOX.r".into(), "a.b".into())));
    // Replies and the `$` namespace are never captured.
    for subject in ["_INBOX.r", "$SYS.x"] {
        let p = nats_pub(subject, None, false);
        let out = ingest.nats(&CLIENT, p, &mut seen, &mut tally, now).unwrap();
        assert!(out.capture.is_none(), "{subject} captured");
    }
    assert_eq!(tally.msgs, 3);
    ingest.count(tally);
    assert_eq!(broker.counters.bytes_in.load(Ordering::Relaxed), 3);
}

#[test]
fn only_a_stream_naming_the_dollar_namespace_captures_it() {
    let mem = MemBackend::new();
    let broker = Broker::new(vec![
        stream(&mem, &[">"]),
        stream(&mem, &["$KV.cfg.>", "$JS.API.>"]),
    ]);
    let ingest = Ingest::new(&broker);
    let (mut seen, mut tally) = (NoInterest::default(), Tally::default());
    let now = Instant::now();
    let p = nats_pub("$KV.cfg.a", None, false);
    let out = ingest.nats(&CLIENT, p, &mut seen, &mut tally, now).unwrap();
    let (c, _) = out.capture.expect("a KV bucket captures its subjects");
    assert_eq!(c.message.subject, "$KV.cfg.a");
    for subject in ["$KV.other.a", "$JS.API.INFO", "$SYS.x", "$O.b.C.x"] {
        let p = nats_pub(subject, None, false);
        let out = ingest.nats(&CLIENT, p, &mut seen, &mut tally, now).unwrap();
        assert!(out.capture.is_none(), "{subject} captured");
    }
}

#[test]
fn nats_pub_ack_goes_only_where_the_publisher_may_subscribe() {
    let mem = MemBackend::new();
    let broker = Broker::new(vec![stream(&mem, &["t.>"])]);
    let ingest = Ingest::new(&broker);
    let (mut seen, mut tally) = (NoInterest::default(), Tally::default());
    let perms = Arc::new(Permissions {
        deny_subscribe: vec!["secret.>".into()],
        ..Permissions::default()
    });
    let client = NatsClient {
        permissions: Some(&perms),
        ..CLIENT
    };
    let now = Instant::now();
    for (reply, answered) in [("ok.1", true), ("secret.1", false)] {
        let p = nats_pub("t.x", Some(reply), true);
        let out = ingest.nats(&client, p, &mut seen, &mut tally, now).unwrap();
        let (_, ack_to) = out.capture.unwrap();
        assert_eq!(ack_to.is_some(), answered, "{reply}");
        assert_eq!(out.no_responders, None, "the stream answers");
    }
}

#[test]
fn a_will_keeps_its_subject_and_is_retained_when_flagged() {
    let broker = Broker::new(Vec::new());
    let ingest = Ingest::new(&broker);
    let will = WillMessage {
        subject: "dev.1.gone".into(),
        payload: b"bye".to_vec(),
        qos: 1,
        retain: true,
        delay: std::time::Duration::ZERO,
        props: None,
        owner: None,
    };
    let p = ingest.will(will);
    let (retained, capture) = ingest.route_will(p, Instant::now());
    let r = retained.expect("the retain flag keeps a copy");
    assert_eq!(
        (r.subject.as_str(), &r.payload[..]),
        ("dev.1.gone", &b"bye"[..])
    );
    assert!(capture.is_none());
    assert_eq!(broker.counters.msgs_in.load(Ordering::Relaxed), 0);
}
