//! Encryption-specific store tests: wrong or missing key, nothing in clear
//! on disk, fresh salts after reopen, rollback and compaction, switching
//! encryption on and off. (Every other store test also runs encrypted, as
//! `tests_encrypted`.)

use super::tests::{put, Msg};
use super::*;

const T0: u64 = 1_700_000_000_000_000_000;

fn key(b: u8, file: &str) -> Key {
    Key::from_bytes([b; 32], file)
}

fn enc(k: Key) -> StoreOptions {
    StoreOptions {
        name: "SECRET".into(),
        key: Some(k),
        encrypt: true,
        tagger: Some(super::tests::test_tags),
        ..StoreOptions::default()
    }
}

/// With an id and a deadline, so the snapshots hold both.
fn msg(i: u64) -> Msg {
    Msg {
        subject: format!("plant.line{i}.temp"),
        headers: Some(b"NATS/1.0\r\nId: hidden-id\r\nTtl: 100\r\n\r\n".to_vec()),
        payload: format!("CONFIDENTIAL-{i:04}").into_bytes(),
    }
}

fn open(b: &MemBackend, o: StoreOptions) -> io::Result<(Store, RecoveryReport)> {
    Store::open(Box::new(b.clone()), o)
}

fn all(st: &mut Store) -> Vec<Record> {
    st.read(0, usize::MAX, usize::MAX, u64::MAX).unwrap()
}

fn snapshot(b: &MemBackend) -> Vec<(String, Vec<u8>)> {
    b.names()
        .into_iter()
        .map(|n| {
            let d = b.file(&n).unwrap();
            (n, d)
        })
        .collect()
}

fn salts(b: &MemBackend) -> Vec<[u8; 16]> {
    b.names()
        .iter()
        .filter(|n| n.ends_with(".seg"))
        .map(|n| {
            let h = record::decode_header(&b.file(n).unwrap()).unwrap();
            h.seal.expect("encrypted segment").salt
        })
        .collect()
}

#[test]
fn nothing_in_clear_and_reopen_reads_back() {
    let b = MemBackend::new();
    let o = enc(key(1, "k1"));
    let (mut st, _) = open(&b, o.clone()).unwrap();
    for i in 0..50 {
        put(&mut st, &msg(i), T0 + i);
    }
    st.close().unwrap();
    let want = all(&mut st);
    drop(st);
    for (name, data) in snapshot(&b) {
        for needle in [&b"CONFIDENTIAL"[..], b"plant.line", b"hidden-id"] {
            assert!(
                !data.windows(needle.len()).any(|w| w == needle),
                "{name} holds {:?} in clear",
                String::from_utf8_lossy(needle)
            );
        }
    }
    assert!(b.names().iter().any(|n| n.ends_with(".idx")));
    assert!(b.names().iter().any(|n| n == crypt::KEYCHECK_NAME));
    let mut ids = 0;
    let (mut st, rep) = Store::open_visiting_ids(Box::new(b.clone()), o, &mut |_, _, id| {
        assert_eq!(id, "hidden-id");
        ids += 1;
    })
    .unwrap();
    assert_eq!(
        rep,
        RecoveryReport {
            records: 50,
            ..Default::default()
        }
    );
    assert_eq!(ids, 50, "the ids were in the (sealed) snapshots");
    assert_eq!(st.next_deadline().map(|(_, q)| q), Some(1));
    assert_eq!(all(&mut st), want);
}

#[test]
fn wrong_or_missing_key_is_refused_and_changes_nothing() {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, enc(key(1, "good.key"))).unwrap();
    for i in 0..5 {
        put(&mut st, &msg(i), T0);
    }
    st.sync().unwrap();
    drop(st); // a crash: no snapshot, the segment must be scanned
    let before = snapshot(&b);
    let e = open(&b, enc(key(2, "bad.key"))).err().unwrap().to_string();
    assert!(e.contains("SECRET") && e.contains("bad.key"), "{e}");
    // Without the key check file, the segment header's check catches it.
    b.clone().remove(crypt::KEYCHECK_NAME).unwrap();
    let e = open(&b, enc(key(2, "bad.key"))).err().unwrap().to_string();
    assert!(
        e.contains("SECRET") && e.contains("bad.key") && e.contains(".seg"),
        "{e}"
    );
    let mut o = enc(key(2, "bad.key"));
    o.encrypt = false;
    assert!(open(&b, o).is_err(), "reading needs the right key too");
    let o = StoreOptions {
        name: "SECRET".into(),
        ..StoreOptions::default()
    };
    let e = open(&b, o).err().unwrap().to_string();
    assert!(
        e.contains("SECRET") && e.contains("no encryption_key_file"),
        "{e}"
    );
    let after: Vec<_> = snapshot(&b)
        .into_iter()
        .filter(|(n, _)| n != crypt::KEYCHECK_NAME)
        .collect();
    let before: Vec<_> = before
        .into_iter()
        .filter(|(n, _)| n != crypt::KEYCHECK_NAME)
        .collect();
    assert_eq!(after, before, "a refused open leaves the files alone");
    let (mut st, rep) = open(&b, enc(key(1, "good.key"))).unwrap();
    assert_eq!(rep.records, 5);
    assert_eq!(all(&mut st).len(), 5);
}

#[test]
fn empty_stream_with_wrong_key_is_refused() {
    let b = MemBackend::new();
    drop(open(&b, enc(key(1, "a.key"))).unwrap());
    let e = open(&b, enc(key(2, "b.key"))).err().unwrap().to_string();
    assert!(
        e.contains("b.key") && e.contains(crypt::KEYCHECK_NAME),
        "{e}"
    );
}

#[test]
fn every_reopen_and_rollback_starts_a_segment_with_a_fresh_salt() {
    let b = MemBackend::new();
    let o = enc(key(1, "k"));
    let (mut st, _) = open(&b, o.clone()).unwrap();
    put(&mut st, &msg(0), T0);
    st.sync().unwrap();
    // Torn, unacknowledged tail: cut at open; the next record must not be
    // sealed at the offset the cut bytes used.
    put(&mut st, &msg(1), T0);
    st.flush().unwrap();
    b.crash_torn(10);
    drop(st);
    let (mut st, rep) = open(&b, o.clone()).unwrap();
    assert!(rep.truncated_bytes > 0);
    put(&mut st, &msg(2), T0);
    st.sync().unwrap();
    assert_eq!(salts(&b).len(), 2, "a new segment after the reopen");
    // A rolled-back batch: same rule.
    let mark = st.mark();
    put(&mut st, &msg(3), T0);
    st.flush().unwrap();
    st.rollback(mark);
    put(&mut st, &msg(4), T0);
    st.sync().unwrap();
    let s = salts(&b);
    assert_eq!(s.len(), 3, "a new segment after the rollback");
    assert!(s[0] != s[1] && s[1] != s[2] && s[0] != s[2]);
    let got: Vec<_> = all(&mut st).iter().map(|m| m.payload.clone()).collect();
    assert_eq!(got, [msg(0).payload, msg(2).payload, msg(4).payload]);
    drop(st);
    let (mut st, _) = open(&b, o).unwrap();
    assert_eq!(all(&mut st).len(), 3);
}

#[test]
fn compaction_reencrypts_under_a_new_salt() {
    let b = MemBackend::new();
    let mut o = enc(key(1, "k"));
    o.segment_size = 2000;
    let (mut st, _) = open(&b, o.clone()).unwrap();
    for i in 0..100u64 {
        let mut m = msg(i);
        m.subject = if i % 10 == 0 {
            "keep".into()
        } else {
            "drop".into()
        };
        put(&mut st, &m, T0);
    }
    st.sync().unwrap();
    let first = segment_name(st.segs[0].base);
    let old = record::decode_header(&b.file(&first).unwrap()).unwrap();
    let drop_id = st.subject_id("drop").unwrap();
    st.remove_subject_before(drop_id, u64::MAX);
    st.sync().unwrap();
    while st.needs_maintenance() {
        st.maintain().unwrap();
    }
    let new = record::decode_header(&b.file(&first).unwrap()).unwrap();
    assert_ne!(old.seal.unwrap().salt, new.seal.unwrap().salt);
    let want = all(&mut st);
    assert_eq!(want.len(), 10);
    drop(st);
    for n in b.names() {
        if n.ends_with(".idx") {
            b.clone().remove(&n).unwrap(); // scan the rewritten files
        }
    }
    let (mut st, rep) = open(&b, o).unwrap();
    assert_eq!(rep.truncated_bytes, 0);
    assert_eq!(all(&mut st), want);
}

#[test]
fn switching_encryption_on_and_off_keeps_everything_readable() {
    let b = MemBackend::new();
    let plain = StoreOptions::default();
    let (mut st, _) = open(&b, plain.clone()).unwrap();
    put(&mut st, &msg(0), T0);
    st.close().unwrap();
    drop(st);
    let (mut st, _) = open(&b, enc(key(1, "k"))).unwrap();
    put(&mut st, &msg(1), T0);
    st.close().unwrap();
    drop(st);
    let kinds: Vec<bool> = b
        .names()
        .iter()
        .filter(|n| n.ends_with(".seg"))
        .map(|n| {
            record::decode_header(&b.file(n).unwrap())
                .unwrap()
                .seal
                .is_some()
        })
        .collect();
    assert_eq!(kinds, [false, true]);
    let mut off = enc(key(1, "k"));
    off.encrypt = false;
    let (mut st, _) = open(&b, off).unwrap();
    put(&mut st, &msg(2), T0);
    st.sync().unwrap();
    let got: Vec<_> = all(&mut st).into_iter().map(|m| m.payload).collect();
    assert_eq!(got, [msg(0).payload, msg(1).payload, msg(2).payload]);
}

#[test]
fn secure_erase_of_an_encrypted_record_survives_reopen() {
    let b = MemBackend::new();
    let o = enc(key(1, "k"));
    let (mut st, _) = open(&b, o.clone()).unwrap();
    for i in 0..3 {
        put(&mut st, &msg(i), T0);
    }
    st.sync().unwrap();
    assert!(st.erase(3).unwrap());
    assert!(st.erase(1).unwrap());
    drop(st);
    let (mut st, rep) = open(&b, o).unwrap();
    assert_eq!(rep.truncated_bytes, 0, "erased records still authenticate");
    let got: Vec<_> = all(&mut st).iter().map(|m| m.seq).collect();
    assert_eq!(got, [2]);
}
