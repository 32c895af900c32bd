//! Stream rule tests: limits, discard policies, the duplicate window,
//! `Nats-Expected-*`, rollups, TTLs, deny flags and acks, with explicit
//! `now`, on a [`Stream`] over a [`MemBackend`]. Compiled twice (see
//! `mod.rs`): plain, and as `rules_tests_encrypted` with every stream
//! encrypted. (Moved here from the store's tests when the rules moved.)

use std::ops::{Deref, DerefMut};

use super::*;
use crate::store::{crypt, MemBackend};

const T0: u64 = 1_700_000_000_000_000_000;
const SEC: u64 = 1_000_000_000;

fn encrypted() -> bool {
    module_path!().ends_with("encrypted")
}

/// A stream configuration plus the store's segment size.
#[derive(Clone)]
struct Opts {
    cfg: StreamConfig,
    segment_size: u64,
}

impl Deref for Opts {
    type Target = StreamConfig;
    fn deref(&self) -> &StreamConfig {
        &self.cfg
    }
}

impl DerefMut for Opts {
    fn deref_mut(&mut self) -> &mut StreamConfig {
        &mut self.cfg
    }
}

/// No limits, no duplicate window, no special headers honoured.
fn opts() -> Opts {
    let mut cfg = StreamConfig {
        storage: Storage::Memory,
        duplicate_window: Duration::ZERO,
        ..StreamConfig::new("", &[">"])
    };
    if encrypted() {
        cfg.key = Some(crypt::Key::from_bytes([0x5a; 32], "test.key"));
        cfg.encrypt = true;
    }
    Opts {
        cfg,
        segment_size: crate::store::DEFAULT_SEGMENT_SIZE,
    }
}

fn msg(i: u64) -> Message {
    Message {
        subject: format!("sensors.truck.{i}"),
        headers: None,
        payload: format!("payload-{i}").into_bytes(),
    }
}

fn open(b: &MemBackend, o: Opts) -> (Stream, RecoveryReport) {
    let so = StoreOptions {
        segment_size: o.segment_size,
        ..store_options(&o.cfg)
    };
    Stream::open(Box::new(b.clone()), &o.cfg, so, T0).unwrap()
}

fn fill(st: &mut Stream, n: u64) {
    for i in 0..n {
        st.publish(&msg(i), T0).unwrap();
    }
    st.sync().unwrap();
}

fn all(st: &mut Stream) -> Vec<StoredMessage> {
    st.read(0, usize::MAX, usize::MAX, u64::MAX).unwrap()
}

fn seg_names(b: &MemBackend) -> Vec<String> {
    b.names()
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect()
}

fn hmsg(subject: &str, headers: &str, payload: &[u8]) -> Message {
    Message {
        subject: subject.into(),
        headers: Some(format!("NATS/1.0\r\n{headers}\r\n\r\n").into_bytes()),
        payload: payload.to_vec(),
    }
}

fn plain(subject: &str, payload: &[u8]) -> Message {
    Message {
        subject: subject.into(),
        headers: None,
        payload: payload.to_vec(),
    }
}

#[test]
fn max_msgs_discard_old_drops_segments() {
    let b = MemBackend::new();
    let mut o = opts();
    o.max_msgs = 50;
    o.segment_size = 1000;
    let (mut st, _) = open(&b, o.clone());
    for i in 0..500 {
        st.publish(&msg(i), T0).unwrap();
        st.sync().unwrap();
        st.enforce_limits(T0);
    }
    let s = st.state();
    assert_eq!((s.first_seq, s.last_seq, s.msgs), (451, 500, 50));
    let got = all(&mut st);
    assert_eq!(got.len(), 50);
    assert_eq!(got[0].seq, 451);
    assert!(
        seg_names(&b).len() <= 4,
        "old segments removed: {:?}",
        seg_names(&b)
    );
    drop(st);
    let (st, _) = open(&b, o);
    assert_eq!(st.state(), s, "limits re-applied on open");
}

#[test]
fn max_bytes_discard_old_and_new() {
    let b = MemBackend::new();
    let mut o = opts();
    o.max_bytes = 1000;
    let (mut st, _) = open(&b, o.clone());
    for i in 0..100 {
        st.publish(&msg(i), T0).unwrap();
        st.enforce_limits(T0);
        assert!(st.state().bytes <= 1000);
    }
    assert!(st.state().msgs > 10 && st.state().msgs < 100);
    assert!(matches!(
        st.publish(
            &Message {
                subject: "a".into(),
                headers: None,
                payload: vec![0; 2000]
            },
            T0
        ),
        Err(StreamError::Full(_))
    ));

    let b = MemBackend::new();
    o.discard = Discard::New;
    let (mut st, _) = open(&b, o.clone());
    let mut stored = 0;
    let err = loop {
        match st.publish(&msg(stored), T0) {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&err, StreamError::Full(why) if why.contains("max_bytes")),
        "{err}"
    );
    assert_eq!(st.state().msgs, stored);
    assert!(st.state().bytes <= 1000);

    let mut o = opts();
    o.max_msgs = 3;
    o.discard = Discard::New;
    let (mut st, _) = open(&MemBackend::new(), o);
    fill(&mut st, 3);
    assert!(matches!(st.publish(&msg(3), T0), Err(StreamError::Full(w)) if w.contains("max_msgs")));
    assert_eq!(st.enforce_limits(T0), 0);
    assert_eq!(st.state().msgs, 3);
}

#[test]
fn max_msg_size() {
    let mut o = opts();
    o.max_msg_size = 10;
    let (mut st, _) = open(&MemBackend::new(), o);
    let m = Message {
        subject: "a".into(),
        headers: Some(vec![0; 4]),
        payload: vec![0; 7],
    };
    assert!(matches!(
        st.publish(&m, T0),
        Err(StreamError::TooLarge { size: 11, max: 10 })
    ));
    assert_eq!(st.state().last_seq, 0);
}

#[test]
fn max_age_with_explicit_now_and_no_seq_reuse() {
    let b = MemBackend::new();
    let mut o = opts();
    o.max_age = Duration::from_secs(10);
    o.segment_size = 1000;
    let (mut st, _) = open(&b, o.clone());
    for i in 0..100u64 {
        st.publish(&msg(i), T0 + i * SEC).unwrap(); // one per second
    }
    st.sync().unwrap();
    assert_eq!(st.next_expiry(), Some(T0 + 10 * SEC));
    st.enforce_limits(T0 + 99 * SEC);
    let s = st.state();
    assert_eq!((s.first_seq, s.last_seq, s.msgs), (90, 100, 11));
    assert_eq!(st.next_expiry(), Some(T0 + 99 * SEC));
    // Everything expires; files go, but sequences never restart.
    st.enforce_limits(T0 + 1000 * SEC);
    assert_eq!(
        st.state(),
        StreamState {
            first_seq: 101,
            last_seq: 100,
            msgs: 0,
            bytes: 0
        }
    );
    assert!(seg_names(&b).is_empty());
    assert_eq!(st.next_expiry(), None);
    drop(st);
    let (mut st, _) = open(&b, o.clone());
    assert_eq!(st.state().last_seq, 100);
    assert_eq!(st.publish(&msg(1), T0 + 1001 * SEC).unwrap().seq, 101);
    // A clock that goes backwards does not make timestamps decrease.
    st.publish(&msg(2), T0).unwrap();
    let got = all(&mut st);
    assert_eq!(got[1].timestamp, T0 + 1001 * SEC);
}

#[test]
fn duplicate_window() {
    let mut o = opts();
    o.duplicate_window = Duration::from_secs(60);
    let (mut st, _) = open(&MemBackend::new(), o);
    let with_id = |id: &str| Message {
        subject: "orders".into(),
        headers: Some(format!("NATS/1.0\r\nX: y\r\nNats-Msg-Id: {id}\r\n\r\n").into_bytes()),
        payload: b"x".to_vec(),
    };
    assert_eq!(
        st.publish(&with_id("a"), T0).unwrap(),
        PubAck {
            seq: 1,
            duplicate: false
        }
    );
    assert_eq!(
        st.publish(&with_id("b"), T0).unwrap(),
        PubAck {
            seq: 2,
            duplicate: false
        }
    );
    assert_eq!(
        st.publish(&with_id("a"), T0 + 59 * SEC).unwrap(),
        PubAck {
            seq: 1,
            duplicate: true
        }
    );
    assert_eq!(st.state().msgs, 2);
    assert_eq!(
        st.publish(&with_id("a"), T0 + 61 * SEC).unwrap(),
        PubAck {
            seq: 3,
            duplicate: false
        }
    );
    assert_eq!(msg_id(b"NATS/1.0\r\nnats-msg-id:  z \r\n\r\n"), Some("z"));
    assert_eq!(msg_id(b"NATS/1.0\r\nNats-Msg-Idx: z\r\n\r\n"), None);
    assert_eq!(
        msg_id(b"Nats-Msg-Id: z\r\n"),
        None,
        "first line is the status line"
    );
}

#[test]
fn enospc_rolls_back_then_recovers() {
    let b = MemBackend::new();
    let mut o = opts();
    o.duplicate_window = Duration::from_secs(60);
    o.segment_size = 1000;
    let (mut st, _) = open(&b, o.clone());
    fill(&mut st, 30);
    let before = st.state();
    let usage = b.clone().disk_usage().unwrap();
    b.set_space_limit(Some(usage + 100));
    let mark = st.mark();
    let mut dup = msg(99);
    dup.headers = Some(b"NATS/1.0\r\nNats-Msg-Id: k\r\n\r\n".to_vec());
    st.publish(&dup, T0).unwrap();
    // Rolls into new segments too; the roll's flush may already fail.
    let failed = (0..40).any(|i| st.publish(&msg(i), T0).is_err());
    assert!(failed || st.sync().is_err());
    st.rollback(mark);
    assert_eq!(st.state(), before);
    assert_eq!(
        b.clone().disk_usage().unwrap(),
        usage,
        "no half-written bytes stay"
    );
    b.set_space_limit(None);
    assert_eq!(
        st.publish(&dup, T0).unwrap(),
        PubAck {
            seq: 31,
            duplicate: false
        }
    );
    fill(&mut st, 40);
    assert_eq!(st.state().last_seq, 71);
    drop(st);
    let (mut st, rep) = open(&b, o);
    assert_eq!(rep.truncated_bytes, 0);
    assert_eq!(rep.records, 71);
    let got = all(&mut st);
    assert!(got.iter().enumerate().all(|(i, m)| m.seq == i as u64 + 1));
}

#[test]
fn per_subject_limit_and_discard_new_per_subject() {
    let mut o = opts();
    o.max_msgs_per_subject = 2;
    let (mut st, _) = open(&MemBackend::new(), o.clone());
    for i in 0..5u64 {
        st.publish(&plain("k.a", &[i as u8]), T0).unwrap();
        st.publish(&plain("k.b", &[i as u8]), T0).unwrap();
        st.enforce_limits(T0);
    }
    assert_eq!(
        st.subject_counts("k.*"),
        [("k.a".into(), 2), ("k.b".into(), 2)]
    );
    assert_eq!(st.last_by_subject("k.a").unwrap().unwrap().payload, [4]);
    assert_eq!(st.next_by_subject("k.a", 0).unwrap().unwrap().payload, [3]);
    o.discard = Discard::New;
    o.discard_new_per_subject = true;
    let (mut st, _) = open(&MemBackend::new(), o);
    st.publish(&plain("k.a", b"1"), T0).unwrap();
    st.publish(&plain("k.a", b"2"), T0).unwrap();
    let e = st.publish(&plain("k.a", b"3"), T0).unwrap_err();
    assert!(matches!(e, StreamError::SubjectFull { .. }), "{e}");
    assert_eq!(e.code(), Some(10077));
    st.publish(&plain("k.b", b"1"), T0).unwrap();
}

#[test]
fn expected_headers() {
    let mut o = opts();
    o.name = "S".into();
    o.duplicate_window = Duration::from_secs(60);
    let (mut st, _) = open(&MemBackend::new(), o);
    let e = st
        .publish(&hmsg("a", "Nats-Expected-Stream: T", b""), T0)
        .unwrap_err();
    assert_eq!(e.code(), Some(10060));
    st.publish(&hmsg("a", "Nats-Expected-Stream: S", b""), T0)
        .unwrap();
    let e = st
        .publish(&hmsg("a", "Nats-Expected-Last-Sequence: 5", b""), T0)
        .unwrap_err();
    assert!(
        matches!(
            e,
            StreamError::WrongLastSequence {
                expected: 5,
                last: 1
            }
        ),
        "{e}"
    );
    assert_eq!(e.code(), Some(10071));
    st.publish(&hmsg("a", "Nats-Expected-Last-Sequence: 1", b""), T0)
        .unwrap();
    st.publish(
        &hmsg("b", "Nats-Expected-Last-Subject-Sequence: 0", b""),
        T0,
    )
    .unwrap();
    let e = st
        .publish(
            &hmsg("a", "Nats-Expected-Last-Subject-Sequence: 1", b""),
            T0,
        )
        .unwrap_err();
    assert!(
        matches!(e, StreamError::WrongLastSubjectSequence { last: 2, .. }),
        "{e}"
    );
    st.publish(
        &hmsg("a", "Nats-Expected-Last-Subject-Sequence: 2", b""),
        T0,
    )
    .unwrap();
    st.publish(&hmsg("a", "Nats-Msg-Id: m1", b""), T0).unwrap();
    let e = st
        .publish(&hmsg("a", "Nats-Expected-Last-Msg-Id: m0", b""), T0)
        .unwrap_err();
    assert_eq!(e.code(), Some(10070));
    st.publish(&hmsg("a", "Nats-Expected-Last-Msg-Id: m1", b""), T0)
        .unwrap();
    let e = st
        .publish(&hmsg("a", "Nats-Expected-Last-Sequence: x", b""), T0)
        .unwrap_err();
    assert!(matches!(e, StreamError::BadHeader(_)));
    let e = st
        .publish(&hmsg("a", "Nats-Rollup: sub", b""), T0)
        .unwrap_err();
    assert_eq!(e.code(), Some(10111));
    let e = st.publish(&hmsg("a", "Nats-TTL: 5s", b""), T0).unwrap_err();
    assert_eq!(e.code(), Some(10166));
}

#[test]
fn rollup_ttl_and_dedup_survive_reopen() {
    let b = MemBackend::new();
    let mut o = opts();
    o.allow_rollup = true;
    o.allow_msg_ttl = true;
    o.duplicate_window = Duration::from_secs(60);
    let (mut st, _) = open(&b, o.clone());
    for i in 0..4u8 {
        st.publish(&plain("r.a", &[i]), T0).unwrap();
        st.publish(&plain("r.b", &[i]), T0).unwrap();
    }
    st.publish(&hmsg("r.a", "Nats-Rollup: sub", b"A"), T0)
        .unwrap();
    st.enforce_limits(T0);
    assert_eq!(
        st.subject_counts(">"),
        [("r.a".into(), 1), ("r.b".into(), 4)]
    );
    st.publish(&hmsg("r.c", "Nats-Rollup: all", b"C"), T0)
        .unwrap();
    st.enforce_limits(T0);
    assert_eq!(st.subject_counts(">"), [("r.c".into(), 1)]);
    let e = st
        .publish(&hmsg("t", "Nats-TTL: 0.5s", b""), T0)
        .unwrap_err();
    assert_eq!(e.code(), Some(10165));
    st.publish(&hmsg("t", "Nats-TTL: 10s\r\nNats-Msg-Id: id-7", b"x"), T0)
        .unwrap();
    st.publish(&hmsg("t", "Nats-TTL: 1h", b"y"), T0).unwrap();
    assert_eq!(st.next_expiry(), Some(T0 + 10 * SEC));
    st.sync().unwrap();
    drop(st); // no clean close: the active segment is scanned
    let (mut st, _) = open(&b, o.clone());
    let dup = st
        .publish(&hmsg("t", "Nats-Msg-Id: id-7", b"again"), T0 + SEC)
        .unwrap();
    assert!(
        dup.duplicate,
        "dedup window rebuilt from the stored headers"
    );
    assert_eq!(dup.seq, 11);
    st.enforce_limits(T0 + 11 * SEC);
    assert!(st.get(11).unwrap().is_none(), "expired by its TTL");
    assert!(st.get(12).unwrap().is_some());
    st.close().unwrap();
    drop(st);
    let (mut st, _) = open(&b, o);
    assert_eq!(
        st.next_expiry(),
        Some(T0 + 3600 * SEC),
        "TTL kept in the snapshot"
    );
    assert_eq!(
        all(&mut st).iter().map(|m| m.seq).collect::<Vec<_>>(),
        [10, 12]
    );
}

#[test]
fn deny_flags_and_ack() {
    let mut o = opts();
    o.deny_delete = true;
    o.deny_purge = true;
    let (mut st, _) = open(&MemBackend::new(), o);
    fill(&mut st, 3);
    assert_eq!(st.delete_msg(1, false).unwrap_err().code(), Some(10057));
    assert_eq!(
        st.purge(&PurgeRequest::default()).unwrap_err().code(),
        Some(10110)
    );
    assert!(st.ack(1).is_err(), "limits retention");
    let mut o = opts();
    o.retention = Retention::WorkQueue;
    let b = MemBackend::new();
    let (mut st, _) = open(&b, o.clone());
    fill(&mut st, 3);
    assert!(st.ack(2).unwrap());
    assert!(!st.ack(2).unwrap());
    st.sync().unwrap();
    drop(st);
    let (st, _) = open(&b, o);
    assert_eq!(
        st.state().msgs,
        2,
        "acked message stays removed (tombstone)"
    );
}
