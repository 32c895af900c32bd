//! Store tests: recovery from crashes, torn writes, bit flips and ENOSPC
//! through [`MemBackend`]; limits with explicit `now`. Compiled twice (see
//! `mod.rs`): plain, and as `tests_encrypted` with every stream encrypted.

use super::*;

const T0: u64 = 1_700_000_000_000_000_000;
const SEC: u64 = 1_000_000_000;

fn encrypted() -> bool {
    module_path!().ends_with("encrypted")
}

fn opts() -> StoreOptions {
    if encrypted() {
        StoreOptions {
            key: Some(crypt::Key::from_bytes([0x5a; 32], "test.key")),
            encrypt: true,
            ..StoreOptions::default()
        }
    } else {
        StoreOptions::default()
    }
}

fn msg(i: u64) -> Message {
    Message {
        subject: format!("sensors.truck.{i}"),
        headers: None,
        payload: format!("payload-{i}").into_bytes(),
    }
}

fn open(b: &MemBackend, o: StoreOptions) -> (Store, RecoveryReport) {
    Store::open(Box::new(b.clone()), o, T0).unwrap()
}

fn fill(st: &mut Store, n: u64) {
    for i in 0..n {
        st.append(&msg(i), T0).unwrap();
    }
    st.sync().unwrap();
}

fn all(st: &mut Store) -> Vec<StoredMessage> {
    st.read(0, usize::MAX, usize::MAX, u64::MAX).unwrap()
}

fn seg_names(b: &MemBackend) -> Vec<String> {
    b.names()
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect()
}

#[test]
fn append_read_reopen() {
    let b = MemBackend::new();
    let (mut st, rep) = open(&b, opts());
    assert_eq!(rep, RecoveryReport::default());
    assert_eq!(
        st.state(),
        StreamState {
            first_seq: 1,
            last_seq: 0,
            msgs: 0,
            bytes: 0
        }
    );
    let mut with_hdr = msg(9);
    with_hdr.headers = Some(b"NATS/1.0\r\nA: b\r\n\r\n".to_vec());
    fill(&mut st, 3);
    st.append(&with_hdr, T0 + 5).unwrap();
    st.sync().unwrap();
    let got = all(&mut st);
    assert_eq!(got.len(), 4);
    assert_eq!(got[3].headers, with_hdr.headers);
    assert_eq!(got[3].timestamp, T0 + 5);
    assert_eq!(got[1].payload, b"payload-1");
    let state = st.state();
    drop(st);
    let (mut st2, rep) = open(&b, opts());
    assert_eq!(rep.records, 4);
    assert_eq!(rep.truncated_bytes, 0);
    assert_eq!(st2.state(), state);
    assert_eq!(all(&mut st2), got);
    // read windows
    let r = st2.read(2, 2, usize::MAX, u64::MAX).unwrap();
    assert_eq!(r.iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 3]);
    let r = st2.read(2, 10, 1, u64::MAX).unwrap();
    assert_eq!(r.len(), 1, "at least one even over max_bytes");
    let r = st2.read(1, 10, usize::MAX, 2).unwrap();
    assert_eq!(r.len(), 2, "bounded by upto");
    assert!(st2.read(5, 10, usize::MAX, u64::MAX).unwrap().is_empty());
}

#[test]
fn fs_backend_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("stream");
    let mut o = opts();
    o.segment_size = MIN_SEGMENT_SIZE;
    let (mut st, _) = Store::open(Box::new(FsBackend::open(&p).unwrap()), o.clone(), T0).unwrap();
    for i in 0..3000 {
        st.append(&msg(i), T0 + i).unwrap();
    }
    st.close().unwrap();
    let state = st.state();
    drop(st);
    assert!(
        std::fs::read_dir(&p).unwrap().count() > 2,
        "several segments"
    );
    let (mut st, rep) = Store::open(Box::new(FsBackend::open(&p).unwrap()), o, T0).unwrap();
    assert_eq!(rep.records, 3000);
    assert_eq!(st.state(), state);
    let got = all(&mut st);
    assert_eq!(got.len(), 3000);
    assert!(got.iter().enumerate().all(|(i, m)| m.seq == i as u64 + 1
        && m.payload == msg(i as u64).payload
        && m.timestamp == T0 + i as u64));
    assert!(st.disk_usage().unwrap() > state.bytes);
}

/// Builds a stream of 5 records and returns the disk, the segment name, the
/// offset where the last record starts and the file length.
fn five_records() -> (MemBackend, String, usize, usize) {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    fill(&mut st, 4);
    let name = seg_names(&b)[0].clone();
    let start = b.file(&name).unwrap().len();
    fill_one(&mut st, 4);
    let len = b.file(&name).unwrap().len();
    (b, name, start, len)
}

fn fill_one(st: &mut Store, i: u64) {
    st.append(&msg(i), T0).unwrap();
    st.sync().unwrap();
}

#[test]
fn torn_tail_at_every_offset_of_last_record() {
    let (b, name, start, len) = five_records();
    let full = b.file(&name).unwrap();
    for k in start..len {
        let disk = MemBackend::new();
        disk.set_file(&name, full[..k].to_vec());
        let (mut st, rep) = open(&disk, opts());
        assert_eq!(rep.truncated_bytes, (k - start) as u64, "cut at {k}");
        assert_eq!(rep.records, 4);
        assert_eq!(rep.lost_records, 0);
        assert_eq!(disk.file(&name).unwrap().len(), start, "file truncated");
        let got = all(&mut st);
        assert_eq!(got.len(), 4);
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.payload, msg(i as u64).payload);
        }
        // The next append reuses seq 5 (it was never acknowledged).
        assert_eq!(st.append(&msg(7), T0).unwrap().seq, 5);
    }
}

#[test]
fn torn_tail_via_crash_torn() {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    fill(&mut st, 3);
    st.append(&msg(3), T0).unwrap();
    st.flush().unwrap(); // written, never synced
    b.crash_torn(5);
    drop(st);
    let (mut st, rep) = open(&b, opts());
    assert_eq!(rep.truncated_bytes, 5);
    assert_eq!(all(&mut st).len(), 3);
}

#[test]
fn bit_flip_anywhere_in_last_record() {
    let (b, name, start, len) = five_records();
    let full = b.file(&name).unwrap();
    for byte in start..len {
        for bit in [0u8, 3, 7] {
            let disk = MemBackend::new();
            disk.set_file(&name, full.clone());
            disk.flip_bit(&name, byte, bit);
            let (mut st, rep) = open(&disk, opts());
            assert_eq!(
                rep.truncated_bytes,
                (len - start) as u64,
                "flip {byte}:{bit}"
            );
            let got = all(&mut st);
            assert_eq!(got.len(), 4);
            assert!(got
                .iter()
                .enumerate()
                .all(|(i, m)| m.payload == msg(i as u64).payload));
        }
    }
}

#[test]
fn corrupt_record_in_older_segment_cuts_only_that_segment() {
    let b = MemBackend::new();
    let mut o = opts();
    o.segment_size = 1000; // ~25 records per segment
    let (mut st, _) = open(&b, o.clone());
    fill(&mut st, 100);
    let names = seg_names(&b);
    assert!(names.len() >= 3);
    // Flip a bit inside the 3rd record of the first segment.
    let seg = &st.segs[0];
    let per_seg = seg.offsets.len() as u64;
    let off = seg.offsets[2] as usize + 10;
    drop(st);
    b.flip_bit(&names[0], off, 1);
    // With the index snapshot the segment is not scanned: the damage is
    // found on read, and only that record is lost.
    let snapshot = b.names();
    assert!(snapshot.iter().any(|n| n.ends_with(".idx")));
    let (mut st, rep) = open(&b, o.clone());
    assert_eq!(
        rep,
        RecoveryReport {
            records: 100,
            ..Default::default()
        }
    );
    let got = all(&mut st);
    assert_eq!(got.len(), 99);
    assert!(got.iter().all(|m| m.seq != 3));
    drop(st);
    // Without snapshots the scan cuts the segment at the damage.
    b.flip_bit(&names[0], off, 1);
    for n in b.names() {
        if n.ends_with(".idx") || n.ends_with(".del") {
            let mut bb = b.clone();
            bb.remove(&n).unwrap();
        }
    }
    b.flip_bit(&names[0], off, 1);
    let (mut st, rep) = open(&b, o);
    assert_eq!(rep.lost_records, per_seg - 2);
    assert!(rep.truncated_bytes > 0);
    let got = all(&mut st);
    assert_eq!(got.len() as u64, 100 - (per_seg - 2));
    assert_eq!(got[2].seq, per_seg + 1, "resumes at the next segment");
    assert_eq!(st.state().last_seq, 100);
    assert_eq!(st.append(&msg(0), T0).unwrap().seq, 101);
}

#[test]
fn damaged_segment_header_and_garbage_files() {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    fill(&mut st, 2);
    drop(st);
    let name = seg_names(&b)[0].clone();
    b.flip_bit(&name, 3, 0);
    b.set_file("meta.tmp", b"junk".to_vec());
    let (mut st, rep) = open(&b, opts());
    assert_eq!(rep.records, 0);
    assert!(rep.truncated_bytes > 0);
    assert!(all(&mut st).is_empty());
    assert!(!b.names().contains(&"meta.tmp".to_string()));
    // Half-written header (crash right after creating a segment).
    let b = MemBackend::new();
    b.set_file(&segment_name(1), vec![b'F', b'R']);
    let (mut st, rep) = open(&b, opts());
    assert_eq!(rep.truncated_bytes, 2);
    assert_eq!(st.append(&msg(1), T0).unwrap().seq, 1);
}

#[test]
fn crash_loses_only_unsynced_appends() {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    fill(&mut st, 10);
    for i in 10..15 {
        st.append(&msg(i), T0).unwrap();
    }
    st.flush().unwrap();
    b.crash();
    drop(st);
    let (mut st, rep) = open(&b, opts());
    assert_eq!(rep.records, 10);
    assert_eq!(all(&mut st).len(), 10);
    assert_eq!(st.state().last_seq, 10);
}

#[test]
fn max_msgs_discard_old_drops_segments() {
    let b = MemBackend::new();
    let mut o = opts();
    o.max_msgs = 50;
    o.segment_size = 1000;
    let (mut st, _) = open(&b, o.clone());
    for i in 0..500 {
        st.append(&msg(i), T0).unwrap();
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
        st.append(&msg(i), T0).unwrap();
        st.enforce_limits(T0);
        assert!(st.state().bytes <= 1000);
    }
    assert!(st.state().msgs > 10 && st.state().msgs < 100);
    assert!(matches!(
        st.append(
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
        match st.append(&msg(stored), T0) {
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
    assert!(matches!(st.append(&msg(3), T0), Err(StreamError::Full(w)) if w.contains("max_msgs")));
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
        st.append(&m, T0),
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
        st.append(&msg(i), T0 + i * SEC).unwrap(); // one per second
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
    assert_eq!(st.append(&msg(1), T0 + 1001 * SEC).unwrap().seq, 101);
    // A clock that goes backwards does not make timestamps decrease.
    st.append(&msg(2), T0).unwrap();
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
        st.append(&with_id("a"), T0).unwrap(),
        PubAck {
            seq: 1,
            duplicate: false
        }
    );
    assert_eq!(
        st.append(&with_id("b"), T0).unwrap(),
        PubAck {
            seq: 2,
            duplicate: false
        }
    );
    assert_eq!(
        st.append(&with_id("a"), T0 + 59 * SEC).unwrap(),
        PubAck {
            seq: 1,
            duplicate: true
        }
    );
    assert_eq!(st.state().msgs, 2);
    assert_eq!(
        st.append(&with_id("a"), T0 + 61 * SEC).unwrap(),
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
    st.append(&dup, T0).unwrap();
    // Rolls into new segments too; the roll's flush may already fail.
    let failed = (0..40).any(|i| st.append(&msg(i), T0).is_err());
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
        st.append(&dup, T0).unwrap(),
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
fn failed_fsync_rolls_back() {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    fill(&mut st, 3);
    let mark = st.mark();
    st.append(&msg(3), T0).unwrap();
    b.set_fail_sync(true);
    assert!(st.sync().is_err());
    st.rollback(mark);
    b.set_fail_sync(false);
    assert_eq!(st.state().last_seq, 3);
    fill(&mut st, 1);
    b.crash();
    drop(st);
    let (mut st, _) = open(&b, opts());
    assert_eq!(all(&mut st).len(), 4);
}

#[test]
fn read_skips_and_deletes_a_record_damaged_after_open() {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    fill(&mut st, 5);
    let name = seg_names(&b)[0].clone();
    let off = st.segs[0].offsets[2] as usize + 9;
    b.flip_bit(&name, off, 2);
    let got = all(&mut st);
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 4, 5]);
    assert_eq!(st.state().msgs, 4);
    assert!(st.delete(1));
    assert!(!st.delete(1));
    assert_eq!(st.state().first_seq, 2);
}

#[test]
fn state_upto_hides_the_unsynced_suffix() {
    let (mut st, _) = open(&MemBackend::new(), opts());
    fill(&mut st, 3);
    let s3 = st.state();
    st.append(&msg(3), T0).unwrap();
    assert_eq!(st.state_upto(3), s3);
    assert_eq!(st.state_upto(4), st.state());
}

#[test]
fn many_records_scan() {
    // Not timed: checks a larger multi-segment recovery stays exact.
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    let m = Message {
        subject: "sensors.truck.00".into(),
        headers: None,
        payload: vec![1; 100],
    };
    for i in 0..20_000 {
        st.append(&m, T0 + i).unwrap();
    }
    st.sync().unwrap();
    let state = st.state();
    drop(st);
    let (st, rep) = open(&b, opts());
    assert_eq!(rep.records, 20_000);
    assert_eq!(st.state(), state);
    let per = state.bytes as f64 / 20_000.0;
    // Encrypted: a 16-byte tag replaces the 4-byte crc, the length is a
    // varint (2 bytes here instead of 4).
    let overhead = if encrypted() { 30.0 } else { 20.0 };
    assert!(per <= 116.0 + overhead, "{per} bytes per record");
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
fn snapshots_are_used_and_a_bad_one_falls_back_to_scanning() {
    let b = MemBackend::new();
    let mut o = opts();
    o.segment_size = 1000;
    let (mut st, _) = open(&b, o.clone());
    for i in 0..200u64 {
        st.append(
            &plain(["x.a", "x.b", "y"][i as usize % 3], b"0123456789"),
            T0 + i,
        )
        .unwrap();
    }
    st.delete(5);
    st.close().unwrap();
    let want = all(&mut st);
    let counts = st.subject_counts(">");
    let info = st.info();
    drop(st);
    let idx: Vec<String> = b
        .names()
        .into_iter()
        .filter(|n| n.ends_with(".idx"))
        .collect();
    assert_eq!(
        idx.len(),
        seg_names(&b).len(),
        "one snapshot per segment after close"
    );
    let (mut st, rep) = open(&b, o.clone());
    assert_eq!(rep.records, 199);
    assert_eq!(all(&mut st), want);
    assert_eq!(st.subject_counts(">"), counts);
    assert_eq!(st.info(), info);
    drop(st);
    // A damaged snapshot and a snapshot that no longer matches its file.
    b.flip_bit(&idx[0], 12, 0);
    let seg1 = seg_names(&b)[1].clone();
    let mut data = b.file(&seg1).unwrap();
    let len = data.len();
    b.set_file(&idx[1], b.file(&idx[2]).unwrap());
    data.truncate(len);
    let (mut st, rep) = open(&b, o);
    assert_eq!(rep.truncated_bytes, 0);
    assert_eq!(all(&mut st), want);
    assert_eq!(st.subject_counts(">"), counts);
    assert_eq!(st.info(), info);
}

#[test]
fn per_subject_limit_and_discard_new_per_subject() {
    let mut o = opts();
    o.max_msgs_per_subject = 2;
    let (mut st, _) = open(&MemBackend::new(), o.clone());
    for i in 0..5u64 {
        st.append(&plain("k.a", &[i as u8]), T0).unwrap();
        st.append(&plain("k.b", &[i as u8]), T0).unwrap();
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
    st.append(&plain("k.a", b"1"), T0).unwrap();
    st.append(&plain("k.a", b"2"), T0).unwrap();
    let e = st.append(&plain("k.a", b"3"), T0).unwrap_err();
    assert!(matches!(e, StreamError::SubjectFull { .. }), "{e}");
    assert_eq!(e.code(), Some(10077));
    st.append(&plain("k.b", b"1"), T0).unwrap();
}

#[test]
fn expected_headers() {
    let mut o = opts();
    o.stream_name = "S".into();
    o.duplicate_window = Duration::from_secs(60);
    let (mut st, _) = open(&MemBackend::new(), o);
    let e = st
        .append(&hmsg("a", "Nats-Expected-Stream: T", b""), T0)
        .unwrap_err();
    assert_eq!(e.code(), Some(10060));
    st.append(&hmsg("a", "Nats-Expected-Stream: S", b""), T0)
        .unwrap();
    let e = st
        .append(&hmsg("a", "Nats-Expected-Last-Sequence: 5", b""), T0)
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
    st.append(&hmsg("a", "Nats-Expected-Last-Sequence: 1", b""), T0)
        .unwrap();
    st.append(
        &hmsg("b", "Nats-Expected-Last-Subject-Sequence: 0", b""),
        T0,
    )
    .unwrap();
    let e = st
        .append(
            &hmsg("a", "Nats-Expected-Last-Subject-Sequence: 1", b""),
            T0,
        )
        .unwrap_err();
    assert!(
        matches!(e, StreamError::WrongLastSubjectSequence { last: 2, .. }),
        "{e}"
    );
    st.append(
        &hmsg("a", "Nats-Expected-Last-Subject-Sequence: 2", b""),
        T0,
    )
    .unwrap();
    st.append(&hmsg("a", "Nats-Msg-Id: m1", b""), T0).unwrap();
    let e = st
        .append(&hmsg("a", "Nats-Expected-Last-Msg-Id: m0", b""), T0)
        .unwrap_err();
    assert_eq!(e.code(), Some(10070));
    st.append(&hmsg("a", "Nats-Expected-Last-Msg-Id: m1", b""), T0)
        .unwrap();
    let e = st
        .append(&hmsg("a", "Nats-Expected-Last-Sequence: x", b""), T0)
        .unwrap_err();
    assert!(matches!(e, StreamError::BadHeader(_)));
    let e = st
        .append(&hmsg("a", "Nats-Rollup: sub", b""), T0)
        .unwrap_err();
    assert_eq!(e.code(), Some(10111));
    let e = st.append(&hmsg("a", "Nats-TTL: 5s", b""), T0).unwrap_err();
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
        st.append(&plain("r.a", &[i]), T0).unwrap();
        st.append(&plain("r.b", &[i]), T0).unwrap();
    }
    st.append(&hmsg("r.a", "Nats-Rollup: sub", b"A"), T0)
        .unwrap();
    st.enforce_limits(T0);
    assert_eq!(
        st.subject_counts(">"),
        [("r.a".into(), 1), ("r.b".into(), 4)]
    );
    st.append(&hmsg("r.c", "Nats-Rollup: all", b"C"), T0)
        .unwrap();
    st.enforce_limits(T0);
    assert_eq!(st.subject_counts(">"), [("r.c".into(), 1)]);
    let e = st
        .append(&hmsg("t", "Nats-TTL: 0.5s", b""), T0)
        .unwrap_err();
    assert_eq!(e.code(), Some(10165));
    st.append(&hmsg("t", "Nats-TTL: 10s\r\nNats-Msg-Id: id-7", b"x"), T0)
        .unwrap();
    st.append(&hmsg("t", "Nats-TTL: 1h", b"y"), T0).unwrap();
    assert_eq!(st.next_expiry(), Some(T0 + 10 * SEC));
    st.sync().unwrap();
    drop(st); // no clean close: the active segment is scanned
    let (mut st, _) = open(&b, o.clone());
    let dup = st
        .append(&hmsg("t", "Nats-Msg-Id: id-7", b"again"), T0 + SEC)
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
fn compaction_rewrites_a_mostly_deleted_segment() {
    let b = MemBackend::new();
    let mut o = opts();
    o.segment_size = 2000;
    let (mut st, _) = open(&b, o.clone());
    for i in 0..200u64 {
        st.append(
            &plain(if i % 10 == 0 { "keep" } else { "drop" }, &[7; 20]),
            T0,
        )
        .unwrap();
    }
    st.sync().unwrap();
    let before = st.disk_usage().unwrap();
    let n = st
        .purge(&PurgeRequest {
            subject: Some("drop".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(n, 180);
    assert!(st.needs_maintenance());
    while st.needs_maintenance() {
        st.maintain().unwrap();
    }
    let after = st.disk_usage().unwrap();
    assert!(after * 2 < before, "{after} vs {before}");
    assert!(!b
        .names()
        .iter()
        .any(|n| n.ends_with(".del") && n != &tomb_name(st.segs.back().unwrap().base)));
    let want = all(&mut st);
    assert_eq!(want.len(), 20);
    st.append(&plain("keep", b"new"), T0).unwrap();
    st.sync().unwrap();
    drop(st);
    for n in b.names() {
        if n.ends_with(".idx") {
            b.clone().remove(&n).unwrap(); // force scanning compacted files
        }
    }
    let (mut st, _) = open(&b, o);
    let got = all(&mut st);
    assert_eq!(&got[..20], &want[..]);
    assert_eq!(got.len(), 21);
    assert_eq!(st.state().last_seq, 201);
}

#[test]
fn secure_delete_overwrites_the_bytes() {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    st.append(&plain("secret.subject", b"TOP-SECRET-PAYLOAD"), T0)
        .unwrap();
    st.append(&plain("other", b"public"), T0).unwrap();
    st.sync().unwrap();
    assert!(st.delete_msg(1, true).unwrap());
    let seg = b.file(&seg_names(&b)[0]).unwrap();
    let has = |needle: &[u8]| seg.windows(needle.len()).any(|w| w == needle);
    assert!(!has(b"TOP-SECRET") && !has(b"secret.subject"));
    assert_eq!(has(b"public"), !encrypted(), "encrypted: nothing in clear");
    drop(st);
    let (mut st, rep) = open(&b, opts());
    assert_eq!(rep.truncated_bytes, 0, "the erased record still checks out");
    assert_eq!(all(&mut st).len(), 1);
    assert!(!st.delete_msg(1, false).unwrap());
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
