//! Model-based test of the raw log: random operations (append, remove,
//! erase, prefix / subject / time removals, compaction, clean and unclean
//! reopen) applied to the [`Store`] and to a plain in-memory model; after
//! every step both must hold the same records and give the same answers.
//! Deterministic: every run uses fixed seeds, and a failure prints the
//! seed and step. (`stream::model_tests` runs the same kind of model with
//! the stream's limits on top.)

use std::collections::BTreeMap;

use super::tests::{put, Msg};
use super::*;

const T0: u64 = 1_700_000_000_000_000_000;
const SEC: u64 = 1_000_000_000;
const SUBJECTS: [&str; 5] = ["a.1", "a.2", "b.x", "b.y", "c"];
/// The age the time-based removal keeps.
const KEEP: u64 = 20 * SEC;

#[derive(Default)]
struct Model {
    msgs: BTreeMap<u64, (String, Vec<u8>, u64)>,
    last_seq: u64,
    last_ts: u64,
}

impl Model {
    fn first_seq(&self) -> u64 {
        self.msgs
            .keys()
            .next()
            .copied()
            .unwrap_or(self.last_seq + 1)
    }

    fn append(&mut self, subj: &str, payload: Vec<u8>, now: u64) -> u64 {
        self.last_seq += 1;
        self.last_ts = self.last_ts.max(now);
        self.msgs
            .insert(self.last_seq, (subj.to_string(), payload, self.last_ts));
        self.last_seq
    }

    fn counts(&self) -> Vec<(String, u64)> {
        let mut c: BTreeMap<String, u64> = BTreeMap::new();
        for m in self.msgs.values() {
            *c.entry(m.0.clone()).or_default() += 1;
        }
        c.into_iter().collect()
    }

    /// Removes what `pred` selects; returns how many.
    fn remove_where(&mut self, pred: impl Fn(u64, &(String, Vec<u8>, u64)) -> bool) -> u64 {
        let before = self.msgs.len();
        self.msgs.retain(|q, m| !pred(*q, m));
        (before - self.msgs.len()) as u64
    }
}

fn check(st: &mut Store, m: &Model, rng: &mut fastrand::Rng, ctx: &str) {
    // The memoised state_upto (as the owner calls it, with a lagging
    // durable sequence) against a fresh count.
    let u = (m.last_seq / 16 * 16).saturating_sub(1);
    let memo = st.state_upto(u);
    assert_eq!(memo, st.state_upto_uncached(u), "{ctx}: state_upto({u})");
    let s = st.state();
    assert_eq!(
        (s.first_seq, s.last_seq, s.msgs),
        (m.first_seq(), m.last_seq, m.msgs.len() as u64),
        "{ctx}: state"
    );
    assert_eq!(st.subject_counts(">"), m.counts(), "{ctx}: subject counts");
    assert_eq!(st.subject_count(), m.counts().len(), "{ctx}: subject_count");
    let all = st.read(0, usize::MAX, usize::MAX, u64::MAX).unwrap();
    let got: Vec<(u64, &str, &[u8], u64)> = all
        .iter()
        .map(|x| (x.seq, x.subject.as_str(), x.payload.as_slice(), x.timestamp))
        .collect();
    let want: Vec<(u64, &str, &[u8], u64)> = m
        .msgs
        .iter()
        .map(|(q, x)| (*q, x.0.as_str(), x.1.as_slice(), x.2))
        .collect();
    assert_eq!(got, want, "{ctx}: contents");
    assert_eq!(
        st.first_ts(),
        m.msgs.values().next().map(|x| x.2),
        "{ctx}: first_ts"
    );
    for subj in SUBJECTS {
        let last = st.last_by_subject(subj).unwrap().map(|x| x.seq);
        let want = m.msgs.iter().rev().find(|x| x.1 .0 == subj).map(|x| *x.0);
        assert_eq!(last, want, "{ctx}: last_by_subject {subj}");
        let from = rng.u64(0..=m.last_seq + 1);
        let next = st.next_by_subject(subj, from).unwrap().map(|x| x.seq);
        let want = m.msgs.range(from..).find(|x| x.1 .0 == subj).map(|x| *x.0);
        assert_eq!(next, want, "{ctx}: next_by_subject {subj} from {from}");
    }
    let wild = st.last_by_subject("a.*").unwrap().map(|x| x.seq);
    let want = m
        .msgs
        .iter()
        .rev()
        .find(|x| x.1 .0.starts_with("a."))
        .map(|x| *x.0);
    assert_eq!(wild, want, "{ctx}: last_by_subject a.*");
    let q = rng.u64(0..=m.last_seq + 1);
    assert_eq!(
        st.get(q).unwrap().map(|x| x.payload),
        m.msgs.get(&q).map(|x| x.1.clone()),
        "{ctx}: get {q}"
    );
    let k = rng.u64(1..=4);
    assert_eq!(
        st.nth_newest(k),
        m.msgs.keys().rev().nth(k as usize - 1).copied(),
        "{ctx}: nth_newest {k}"
    );
}

/// One of the prefix, subject and oldest-record removals.
fn remove_some(st: &mut Store, m: &mut Model, rng: &mut fastrand::Rng, ctx: &str) {
    match rng.u32(0..3) {
        0 => {
            let before = rng.u64(0..=m.last_seq + 2);
            let n = st.remove_before(before);
            assert_eq!(n, m.remove_where(|q, _| q < before), "{ctx}: remove_before");
        }
        1 => {
            let subj = SUBJECTS[rng.usize(0..SUBJECTS.len())];
            let before = rng.u64(0..=m.last_seq + 2);
            let n = st
                .subject_id(subj)
                .map_or(0, |id| st.remove_subject_before(id, before));
            let want = m.remove_where(|q, x| x.0 == subj && q < before);
            assert_eq!(n, want, "{ctx}: remove_subject_before");
        }
        _ => {
            let ok = st.remove_first();
            assert_eq!(ok, m.msgs.pop_first().is_some(), "{ctx}: remove_first");
        }
    }
    // Prefix removals are durable once the bounds are.
    st.persist_bounds().unwrap();
}

fn run(seed: u64, steps: usize, o: StoreOptions) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let b = MemBackend::new();
    let mut now = T0;
    let (mut st, _) = Store::open(Box::new(b.clone()), o.clone()).unwrap();
    let mut m = Model::default();
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        match rng.u32(0..100) {
            0..=54 => {
                let subj = SUBJECTS[rng.usize(0..SUBJECTS.len())];
                let len = rng.usize(0..60);
                let payload: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                let rec = Msg {
                    subject: subj.into(),
                    headers: None,
                    payload: payload.clone(),
                };
                let seq = put(&mut st, &rec, now);
                st.sync().unwrap();
                let want = m.append(subj, payload, now);
                assert_eq!(seq, want, "{ctx}: seq");
            }
            55..=69 => {
                let q = rng.u64(0..=m.last_seq + 1);
                let ok = if rng.bool() {
                    st.erase(q).unwrap()
                } else {
                    let ok = st.remove(q);
                    st.sync().unwrap();
                    ok
                };
                assert_eq!(ok, m.msgs.remove(&q).is_some(), "{ctx}: remove {q}");
            }
            70..=74 => remove_some(&mut st, &mut m, &mut rng, &ctx),
            75..=84 => {
                now += rng.u64(0..3 * SEC);
                let cutoff = now.saturating_sub(KEEP);
                let n = st.remove_older_than(cutoff);
                assert_eq!(n, m.remove_where(|_, x| x.2 < cutoff), "{ctx}: by age");
                st.persist_bounds().unwrap();
            }
            85..=89 => {
                while st.needs_maintenance() {
                    st.maintain().unwrap();
                }
            }
            90..=94 => {
                st.close().unwrap();
                drop(st);
                st = Store::open(Box::new(b.clone()), o.clone()).unwrap().0;
            }
            _ => {
                // kill -9 after a sync: no close, no snapshot of the
                // active segment, then a power cut.
                st.sync().unwrap();
                drop(st);
                b.crash();
                st = Store::open(Box::new(b.clone()), o.clone()).unwrap().0;
            }
        }
        check(&mut st, &m, &mut rng, &ctx);
    }
}

fn small() -> StoreOptions {
    StoreOptions {
        segment_size: 1500,
        ..StoreOptions::default()
    }
}

#[test]
fn model_raw_log() {
    run(1, 3000, small());
}

#[test]
fn model_raw_log_tiny_segments() {
    run(
        2,
        3000,
        StoreOptions {
            segment_size: 300,
            ..StoreOptions::default()
        },
    );
}

#[test]
fn model_raw_log_encrypted() {
    run(
        3,
        2000,
        StoreOptions {
            key: Some(crypt::Key::from_bytes([7; 32], "model.key")),
            encrypt: true,
            ..small()
        },
    );
}
