//! Store tests over the raw log: recovery from crashes, torn writes, bit
//! flips and ENOSPC through [`MemBackend`]; snapshots, tags, removals and
//! compaction. Compiled twice (see `mod.rs`): plain, and as
//! `tests_encrypted` with every log encrypted. The stream rules on top
//! are tested in `stream::rules_tests`.

use super::segment::tomb_name;
use super::*;

const T0: u64 = 1_700_000_000_000_000_000;
const SEC: u64 = 1_000_000_000;

fn encrypted() -> bool {
    module_path!().ends_with("encrypted")
}

/// The tags these tests give records: header `Id: <id>` and header
/// `Ttl: <seconds>` (a deadline that many seconds after the timestamp).
pub(super) fn test_tags(h: &[u8], ts: u64) -> Tags<'_> {
    let text = std::str::from_utf8(h).unwrap_or("");
    let mut t = Tags::default();
    for line in text.split("\r\n") {
        if let Some(v) = line.strip_prefix("Id: ") {
            t.id = Some(v);
        }
        if let Some(v) = line
            .strip_prefix("Ttl: ")
            .and_then(|v| v.parse::<u64>().ok())
        {
            t.deadline = Some(ts + v * SEC);
        }
    }
    t
}

fn opts() -> StoreOptions {
    let o = StoreOptions {
        tagger: Some(test_tags),
        ..StoreOptions::default()
    };
    if encrypted() {
        StoreOptions {
            key: Some(crypt::Key::from_bytes([0x5a; 32], "test.key")),
            encrypt: true,
            ..o
        }
    } else {
        o
    }
}

/// A record to append.
#[derive(Debug, Clone)]
pub(super) struct Msg {
    pub subject: String,
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

fn msg(i: u64) -> Msg {
    Msg {
        subject: format!("sensors.truck.{i}"),
        headers: None,
        payload: format!("payload-{i}").into_bytes(),
    }
}

/// Appends `m` at `ts` with the tags [`test_tags`] gives it.
pub(super) fn try_put(st: &mut Store, m: &Msg, ts: u64) -> Result<(u64, SubjectId), AppendError> {
    let ts = ts.max(st.last_ts());
    let tags = m
        .headers
        .as_deref()
        .map_or(Tags::default(), |h| test_tags(h, ts));
    st.append(&NewRecord {
        subject: &m.subject,
        headers: m.headers.as_deref(),
        payload: &m.payload,
        timestamp: ts,
        tags,
    })
}

pub(super) fn put(st: &mut Store, m: &Msg, ts: u64) -> u64 {
    try_put(st, m, ts).unwrap().0
}

fn open(b: &MemBackend, o: StoreOptions) -> (Store, RecoveryReport) {
    Store::open(Box::new(b.clone()), o).unwrap()
}

fn fill(st: &mut Store, n: u64) {
    for i in 0..n {
        put(st, &msg(i), T0);
    }
    st.sync().unwrap();
}

fn all(st: &mut Store) -> Vec<Record> {
    st.read(0, usize::MAX, usize::MAX, u64::MAX).unwrap()
}

fn seg_names(b: &MemBackend) -> Vec<String> {
    b.names()
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect()
}

/// What `StreamInfo` reports, from the store.
fn info_of(st: &mut Store) -> (State, Option<u64>, u64, usize) {
    (st.state(), st.first_ts(), st.last_ts(), st.subject_count())
}

fn hmsg(subject: &str, headers: &str, payload: &[u8]) -> Msg {
    Msg {
        subject: subject.into(),
        headers: Some(format!("NATS/1.0\r\n{headers}\r\n\r\n").into_bytes()),
        payload: payload.to_vec(),
    }
}

fn plain(subject: &str, payload: &[u8]) -> Msg {
    Msg {
        subject: subject.into(),
        headers: None,
        payload: payload.to_vec(),
    }
}

#[test]
fn append_read_reopen() {
    let b = MemBackend::new();
    let (mut st, rep) = open(&b, opts());
    assert_eq!(rep, RecoveryReport::default());
    assert_eq!(
        st.state(),
        State {
            first_seq: 1,
            last_seq: 0,
            msgs: 0,
            bytes: 0
        }
    );
    let mut with_hdr = msg(9);
    with_hdr.headers = Some(b"NATS/1.0\r\nA: b\r\n\r\n".to_vec());
    fill(&mut st, 3);
    put(&mut st, &with_hdr, T0 + 5);
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
    let (mut st, _) = Store::open(Box::new(FsBackend::open(&p).unwrap()), o.clone()).unwrap();
    for i in 0..3000 {
        put(&mut st, &msg(i), T0 + i);
    }
    st.close().unwrap();
    let state = st.state();
    drop(st);
    assert!(
        std::fs::read_dir(&p).unwrap().count() > 2,
        "several segments"
    );
    let (mut st, rep) = Store::open(Box::new(FsBackend::open(&p).unwrap()), o).unwrap();
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
    put(st, &msg(i), T0);
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
        assert_eq!(put(&mut st, &msg(7), T0), 5);
    }
}

#[test]
fn torn_tail_via_crash_torn() {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    fill(&mut st, 3);
    put(&mut st, &msg(3), T0);
    st.flush().unwrap(); // written, never synced
    b.crash_torn(5);
    drop(st);
    let (mut st, rep) = open(&b, opts());
    assert_eq!(rep.truncated_bytes, 5);
    assert_eq!(rep.cut_records, 1, "a torn record counts");
    assert_eq!(all(&mut st).len(), 3);
}

#[test]
fn a_cut_tail_counts_the_records_it_held() {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    fill(&mut st, 3);
    st.sync().unwrap();
    let name = b.names()[0].clone();
    let damaged = b.file(&name).unwrap().len();
    for i in 3..6 {
        put(&mut st, &msg(i), T0);
    }
    st.sync().unwrap();
    drop(st);
    // The first of the three newest records is damaged: all three are cut.
    b.flip_bit(&name, damaged + 12, 0);
    let (mut st, rep) = open(&b, opts());
    assert_eq!(all(&mut st).len(), 3);
    assert!(rep.truncated_bytes > 0);
    // Plain records are walked by their length prefixes; an encrypted
    // tail counts as at least one.
    let want = if encrypted() { 1 } else { 3 };
    assert_eq!((rep.cut_records, rep.lost_records), (want, 0));
    // A zero-filled hole (a write lost by the disk) ends the walk.
    assert_eq!(recover::records_in(&[0; 40], false), 0);
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
    assert_eq!(put(&mut st, &msg(0), T0), 101);
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
    assert_eq!(put(&mut st, &msg(1), T0), 1);
}

#[test]
fn crash_loses_only_unsynced_appends() {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    fill(&mut st, 10);
    for i in 10..15 {
        put(&mut st, &msg(i), T0);
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
fn failed_fsync_rolls_back() {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    fill(&mut st, 3);
    let mark = st.mark();
    put(&mut st, &msg(3), T0);
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
    assert!(st.remove(1));
    assert!(!st.remove(1));
    assert_eq!(st.state().first_seq, 2);
}

#[test]
fn state_upto_hides_the_unsynced_suffix() {
    let (mut st, _) = open(&MemBackend::new(), opts());
    fill(&mut st, 3);
    let s3 = st.state();
    put(&mut st, &msg(3), T0);
    assert_eq!(st.state_upto(3), s3);
    assert_eq!(st.state_upto(4), st.state());
}

#[test]
fn many_records_scan() {
    // Not timed: checks a larger multi-segment recovery stays exact.
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    let m = Msg {
        subject: "sensors.truck.00".into(),
        headers: None,
        payload: vec![1; 100],
    };
    for i in 0..20_000 {
        put(&mut st, &m, T0 + i);
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

#[test]
fn snapshots_are_used_and_a_bad_one_falls_back_to_scanning() {
    let b = MemBackend::new();
    let mut o = opts();
    o.segment_size = 1000;
    let (mut st, _) = open(&b, o.clone());
    for i in 0..200u64 {
        put(
            &mut st,
            &plain(["x.a", "x.b", "y"][i as usize % 3], b"0123456789"),
            T0 + i,
        );
    }
    st.remove(5);
    st.close().unwrap();
    let want = all(&mut st);
    let counts = st.subject_counts(">");
    let info = info_of(&mut st);
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
    assert_eq!(info_of(&mut st), info);
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
    assert_eq!(info_of(&mut st), info);
}

#[test]
fn compaction_rewrites_a_mostly_deleted_segment() {
    let b = MemBackend::new();
    let mut o = opts();
    o.segment_size = 2000;
    let (mut st, _) = open(&b, o.clone());
    for i in 0..200u64 {
        put(
            &mut st,
            &plain(if i % 10 == 0 { "keep" } else { "drop" }, &[7; 20]),
            T0,
        );
    }
    st.sync().unwrap();
    let before = st.disk_usage().unwrap();
    let drop_id = st.subject_id("drop").unwrap();
    let n = st.remove_subject_before(drop_id, u64::MAX);
    assert_eq!(n, 180);
    st.sync().unwrap();
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
    put(&mut st, &plain("keep", b"new"), T0);
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
    put(&mut st, &plain("secret.subject", b"TOP-SECRET-PAYLOAD"), T0);
    put(&mut st, &plain("other", b"public"), T0);
    st.sync().unwrap();
    assert!(st.erase(1).unwrap());
    let seg = b.file(&seg_names(&b)[0]).unwrap();
    let has = |needle: &[u8]| seg.windows(needle.len()).any(|w| w == needle);
    assert!(!has(b"TOP-SECRET") && !has(b"secret.subject"));
    assert_eq!(has(b"public"), !encrypted(), "encrypted: nothing in clear");
    drop(st);
    let (mut st, rep) = open(&b, opts());
    assert_eq!(rep.truncated_bytes, 0, "the erased record still checks out");
    assert_eq!(all(&mut st).len(), 1);
    assert!(!st.erase(1).unwrap());
    assert!(!st.remove(1));
}

#[test]
fn enospc_rolls_back_then_recovers() {
    let b = MemBackend::new();
    let mut o = opts();
    o.segment_size = 1000;
    let (mut st, _) = open(&b, o.clone());
    fill(&mut st, 30);
    let before = st.state();
    let usage = b.clone().disk_usage().unwrap();
    b.set_space_limit(Some(usage + 100));
    let mark = st.mark();
    let mut dup = msg(99);
    dup.headers = Some(b"NATS/1.0\r\nId: k\r\nTtl: 9\r\n\r\n".to_vec());
    put(&mut st, &dup, T0);
    // Rolls into new segments too; the roll's flush may already fail.
    let failed = (0..40).any(|i| try_put(&mut st, &msg(i), T0).is_err());
    assert!(failed || st.sync().is_err());
    st.rollback(mark);
    assert_eq!(st.state(), before);
    assert_eq!(
        b.clone().disk_usage().unwrap(),
        usage,
        "no half-written bytes stay"
    );
    b.set_space_limit(None);
    assert_eq!(st.next_deadline(), None, "rolled back with its record");
    assert_eq!(put(&mut st, &dup, T0), 31);
    fill(&mut st, 40);
    assert_eq!(st.state().last_seq, 71);
    drop(st);
    let (mut st, rep) = open(&b, o);
    assert_eq!(rep.truncated_bytes, 0);
    assert_eq!(rep.records, 71);
    let got = all(&mut st);
    assert!(got.iter().enumerate().all(|(i, m)| m.seq == i as u64 + 1));
}

/// Every id the store reports at open, in order.
fn open_ids(b: &MemBackend, o: StoreOptions) -> (Store, Vec<(u64, u64, String)>) {
    let mut ids = Vec::new();
    let (st, _) = Store::open_visiting_ids(Box::new(b.clone()), o, &mut |q, ts, id| {
        ids.push((q, ts, id.to_string()))
    })
    .unwrap();
    (st, ids)
}

#[test]
fn tags_survive_snapshots_scans_compaction_and_rollback() {
    let b = MemBackend::new();
    let mut o = opts();
    o.segment_size = 1000;
    let (mut st, _) = open(&b, o.clone());
    let mut want_ids = Vec::new();
    for i in 0..120u64 {
        let m = match i % 4 {
            0 => hmsg("t.id", &format!("Id: id-{i}"), b"x"),
            1 => hmsg("t.ttl", &format!("Ttl: {}", 1000 - i), b"x"),
            2 => hmsg("t.other", "Other: 1", b"x"),
            _ => plain("t.plain", b"x"),
        };
        let seq = put(&mut st, &m, T0 + i);
        if i % 4 == 0 {
            want_ids.push((seq, T0 + i, format!("id-{i}")));
        }
    }
    st.sync().unwrap();
    assert!(seg_names(&b).len() >= 4, "several segments");
    // The earliest deadline: record i = 117 (1000 - 117 s after T0 + 117).
    let first_deadline = (T0 + 117 + 883 * SEC, 118);
    assert_eq!(st.next_deadline(), Some(first_deadline));
    // A rolled-back record leaves no tags behind.
    let mark = st.mark();
    put(&mut st, &hmsg("t.id", "Id: gone\r\nTtl: 1", b"x"), T0 + 200);
    st.rollback(mark);
    assert_eq!(st.next_deadline(), Some(first_deadline));
    drop(st); // kill -9: sealed segments from snapshots, the last scanned
    let (mut st, ids) = open_ids(&b, o.clone());
    assert_eq!(ids, want_ids);
    assert_eq!(st.next_deadline(), Some(first_deadline));
    st.close().unwrap();
    drop(st);
    let (st, ids) = open_ids(&b, o.clone());
    assert_eq!(ids, want_ids, "after a clean close");
    assert_eq!(st.next_deadline(), Some(first_deadline));
    drop(st);
    for n in b.names() {
        if n.ends_with(".idx") {
            b.clone().remove(&n).unwrap();
        }
    }
    let (mut st, ids) = open_ids(&b, o.clone());
    assert_eq!(ids, want_ids, "full scan");
    // Compaction keeps the ids (of removed records too) and the deadlines
    // of the live ones.
    let first_seg = st.segs[0].offsets.len() as u64;
    for q in 1..first_seg {
        if q % 4 != 2 {
            st.remove(q);
        }
    }
    st.sync().unwrap();
    while st.needs_maintenance() {
        st.maintain().unwrap();
    }
    st.close().unwrap();
    let live_deadlines = st.deadlines.clone();
    drop(st);
    let (mut st, ids) = open_ids(&b, o.clone());
    assert_eq!(ids, want_ids, "after compaction");
    assert_eq!(st.deadlines, live_deadlines);
    // Deadlines expire.
    let n = st.remove_expired(T0 + 1000 * SEC);
    assert_eq!(n, live_deadlines.len() as u64);
    assert_eq!(st.next_deadline(), None);
}

#[test]
fn removal_primitives() {
    let b = MemBackend::new();
    let mut o = opts();
    o.segment_size = 600;
    let (mut st, _) = open(&b, o.clone());
    for i in 0..60u64 {
        put(
            &mut st,
            &plain(["a", "b", "c"][i as usize % 3], b"0123"),
            T0 + i * SEC,
        );
    }
    st.sync().unwrap();
    assert_eq!(st.nth_newest(1), Some(60));
    assert_eq!(st.nth_newest(3), Some(58));
    assert_eq!(st.nth_newest(61), None);
    let a = st.subject_id("a").unwrap();
    assert_eq!(st.subject_seqs(a), (1..=58).step_by(3).collect::<Vec<_>>());
    assert_eq!(st.subject(a).map(|s| (s.last, s.count)), Some((58, 20)));
    assert_eq!(st.remove_subject_before(a, 30), 10);
    assert_eq!(st.subject_first(a), Some(31));
    assert_eq!(st.subject_of(31), Some(a));
    assert_eq!(st.subject_of(1), None);
    // A prefix: not durable until the bounds are persisted.
    assert_eq!(st.remove_before(11), 6, "1..=10 minus the 4 of subject a");
    assert_eq!(st.state().first_seq, 11);
    st.sync().unwrap();
    drop(st);
    let (mut st, _) = open(&b, o.clone());
    assert!(
        st.state().first_seq < 11,
        "prefix removal is not durable yet"
    );
    st.remove_before(11);
    st.persist_bounds().unwrap();
    drop(st);
    let (mut st, _) = open(&b, o.clone());
    assert_eq!(st.state().first_seq, 11);
    // By time: records 0..=29 are older than T0 + 30 s.
    let n = st.remove_older_than(T0 + 30 * SEC);
    assert_eq!(st.state().first_seq, 31);
    assert_eq!(n, 20 - 6, "11..=30 minus a's 13..=28 removed before");
    assert!(st.remove_first());
    assert_eq!(st.state().first_seq, 32);
    assert_eq!(st.first_ts(), Some(T0 + 31 * SEC));
    assert_eq!(st.remove_before(u64::MAX), 29);
    let s = st.state();
    assert_eq!((s.first_seq, s.last_seq, s.msgs, s.bytes), (61, 60, 0, 0));
    assert!(!st.remove_first());
    assert!(seg_names(&b).len() <= 1, "dead segments deleted");
}

#[test]
fn count_matching_and_last_per_subject_agree_with_a_scan() {
    let b = MemBackend::new();
    let mut o = opts();
    o.segment_size = 600;
    let (mut st, _) = open(&b, o);
    let subjects = ["k.a", "k.b", "k.c.x", "other"];
    for i in 0..120u64 {
        put(
            &mut st,
            &plain(subjects[(i * 7 % 5) as usize % 4], b"v"),
            T0 + i,
        );
    }
    for seq in [1, 2, 17, 40, 41, 42, 99] {
        st.remove(seq);
    }
    // (seq, subject) of every live record, from the records themselves.
    let live: Vec<(u64, String)> = all(&mut st)
        .into_iter()
        .map(|r| (r.seq, r.subject.to_string()))
        .collect();
    assert!(st.segs.len() > 2, "spans several segments");
    for f in ["k.a", "k.*", "k.>", ">", "none"] {
        // Short ranges (fewer records than subjects) match records.
        for (from, upto) in [
            (0, u64::MAX),
            (30, 80),
            (41, 41),
            (100, 110),
            (118, 119),
            (119, u64::MAX),
        ] {
            let want = live
                .iter()
                .filter(|(s, n)| *s >= from && *s <= upto && crate::subject::matches(f, n))
                .count() as u64;
            assert_eq!(
                st.count_matching(f, from, upto),
                want,
                "{f} {from}..={upto}"
            );
        }
    }
    for upto in [10, 41, 77, u64::MAX] {
        let filters = vec!["k.*".to_string(), "k.a".to_string()];
        let mut want: Vec<u64> = ["k.a", "k.b"]
            .iter()
            .filter_map(|n| {
                live.iter()
                    .filter(|(s, m)| m == n && *s <= upto)
                    .map(|(s, _)| *s)
                    .max()
            })
            .collect();
        want.sort_unstable();
        assert_eq!(
            st.last_per_subject(&filters, upto, 10),
            Some(want),
            "upto {upto}"
        );
    }
    assert_eq!(
        st.last_per_subject(&[">".into()], u64::MAX, 3),
        None,
        "4 subjects > max 3"
    );
}

#[test]
fn sync_appends_makes_records_durable_and_leaves_tombstones_to_sync() {
    let b = MemBackend::new();
    let (mut st, _) = open(&b, opts());
    fill(&mut st, 4);
    assert!(st.remove(2));
    put(&mut st, &msg(4), T0);
    st.sync_appends().unwrap();
    assert!(st.tombs_unsynced());
    // A crash now keeps the appended record and loses the tombstone.
    let img = b.crash_image();
    let (mut st2, _) = open(&img, opts());
    let seqs: Vec<u64> = all(&mut st2).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    st.sync().unwrap();
    assert!(!st.tombs_unsynced());
    let img = b.crash_image();
    let (mut st3, _) = open(&img, opts());
    let seqs: Vec<u64> = all(&mut st3).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 3, 4, 5]);
}
