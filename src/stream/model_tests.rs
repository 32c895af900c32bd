//! Model-based test of the stream rules: random operations (publish,
//! delete, purge, limits, time passing, compaction, clean and unclean
//! reopen) applied to a [`Stream`] and to a plain in-memory model; after
//! every step both must hold the same messages and give the same answers.
//! Deterministic: every run uses fixed seeds, and a failure prints the
//! seed and step. (Moved from the store's tests with the limits; the raw
//! log has its own model in `store::model_tests`.)

use std::collections::BTreeMap;

use super::*;
use crate::store::MemBackend;

const T0: u64 = 1_700_000_000_000_000_000;
const SEC: u64 = 1_000_000_000;
const SUBJECTS: [&str; 5] = ["a.1", "a.2", "b.x", "b.y", "c"];

#[derive(Default)]
struct Model {
    msgs: BTreeMap<u64, (String, Vec<u8>, u64)>,
    last_seq: u64,
    last_ts: u64,
    max_msgs: u64,
    per_subject: u64,
    max_age: u64,
}

impl Model {
    fn first_seq(&self) -> u64 {
        self.msgs
            .keys()
            .next()
            .copied()
            .unwrap_or(self.last_seq + 1)
    }

    fn count(&self, subj: &str) -> u64 {
        self.msgs.values().filter(|m| m.0 == subj).count() as u64
    }

    fn publish(&mut self, subj: &str, payload: Vec<u8>, now: u64) -> u64 {
        self.last_seq += 1;
        self.last_ts = self.last_ts.max(now);
        self.msgs
            .insert(self.last_seq, (subj.to_string(), payload, self.last_ts));
        self.limits(now, Some(subj));
        self.last_seq
    }

    fn limits(&mut self, now: u64, subj: Option<&str>) {
        if let (Some(s), true) = (subj, self.per_subject > 0) {
            while self.count(s) > self.per_subject {
                let q = self.msgs.iter().find(|m| m.1 .0 == s).map(|m| *m.0);
                if let Some(q) = q {
                    self.msgs.remove(&q);
                }
            }
        }
        while self.max_msgs > 0 && self.msgs.len() as u64 > self.max_msgs {
            self.msgs.pop_first();
        }
        if self.max_age > 0 {
            let cutoff = now.saturating_sub(self.max_age);
            self.msgs.retain(|_, m| m.2 >= cutoff);
        }
    }

    fn counts(&self) -> Vec<(String, u64)> {
        let mut c: BTreeMap<String, u64> = BTreeMap::new();
        for m in self.msgs.values() {
            *c.entry(m.0.clone()).or_default() += 1;
        }
        c.into_iter().collect()
    }
}

fn check(st: &mut Stream, m: &Model, rng: &mut fastrand::Rng, ctx: &str) {
    // The memoised state_upto (as the owner calls it, with a lagging
    // durable sequence) against a fresh count.
    // A durable sequence that stays put for a while, so most calls hit
    // the memo after appends (and removals) since the previous one.
    let u = (m.last_seq / 16 * 16).saturating_sub(1);
    let memo = st.state_upto(u);
    assert_eq!(
        memo,
        st.store.state_upto_uncached(u).into(),
        "{ctx}: state_upto({u})"
    );
    let s = st.state();
    assert_eq!(
        (s.first_seq, s.last_seq, s.msgs),
        (m.first_seq(), m.last_seq, m.msgs.len() as u64),
        "{ctx}: state"
    );
    assert_eq!(st.subject_counts(">"), m.counts(), "{ctx}: subject counts");
    let info = st.info();
    assert_eq!(
        info.subjects,
        m.counts().len() as u64,
        "{ctx}: info.subjects"
    );
    assert_eq!(
        info.deleted,
        (m.last_seq + 1 - m.first_seq()) - m.msgs.len() as u64,
        "{ctx}: info.deleted"
    );
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
}

/// A stream with `o`'s limits on segments of `o.segment_size` bytes.
struct Opts {
    cfg: StreamConfig,
    segment_size: u64,
}

fn open(b: &MemBackend, o: &Opts, now: u64) -> Stream {
    let so = StoreOptions {
        segment_size: o.segment_size,
        ..store_options(&o.cfg)
    };
    Stream::open(Box::new(b.clone()), &o.cfg, so, now)
        .unwrap()
        .0
}

fn run(seed: u64, steps: usize, o: Opts) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let b = MemBackend::new();
    let mut now = T0;
    let mut st = open(&b, &o, now);
    let mut m = Model {
        max_msgs: o.cfg.max_msgs,
        per_subject: o.cfg.max_msgs_per_subject,
        max_age: u64::try_from(o.cfg.max_age.as_nanos()).unwrap_or(0),
        ..Model::default()
    };
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        match rng.u32(0..100) {
            0..=54 => {
                let subj = SUBJECTS[rng.usize(0..SUBJECTS.len())];
                let len = rng.usize(0..60);
                let payload: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                let ack = st
                    .publish(
                        &Message {
                            subject: subj.into(),
                            headers: None,
                            payload: payload.clone(),
                        },
                        now,
                    )
                    .unwrap();
                st.enforce_limits(now);
                let want = m.publish(subj, payload, now);
                assert_eq!(ack.seq, want, "{ctx}: seq");
            }
            55..=69 => {
                let q = rng.u64(0..=m.last_seq + 1);
                let secure = rng.bool();
                let ok = st.delete_msg(q, secure).unwrap();
                assert_eq!(ok, m.msgs.remove(&q).is_some(), "{ctx}: delete {q}");
            }
            70..=74 => {
                let subject = rng
                    .bool()
                    .then(|| SUBJECTS[rng.usize(0..SUBJECTS.len())].to_string());
                let (upto_seq, keep) = match rng.u32(0..3) {
                    0 => (None, None),
                    1 => (Some(rng.u64(0..=m.last_seq + 2)), None),
                    _ => (None, Some(rng.u64(0..5))),
                };
                let n = st
                    .purge(&PurgeRequest {
                        subject: subject.clone(),
                        upto_seq,
                        keep,
                    })
                    .unwrap();
                let mut cand: Vec<u64> = m
                    .msgs
                    .iter()
                    .filter(|x| subject.as_ref().is_none_or(|s| &x.1 .0 == s))
                    .map(|x| *x.0)
                    .collect();
                let k = keep.unwrap_or(0) as usize;
                cand.truncate(cand.len().saturating_sub(k));
                cand.retain(|q| upto_seq.is_none_or(|u| *q < u));
                for q in &cand {
                    m.msgs.remove(q);
                }
                assert_eq!(n, cand.len() as u64, "{ctx}: purge count");
            }
            75..=84 => {
                now += rng.u64(0..3 * SEC);
                st.enforce_limits(now);
                m.limits(now, None);
            }
            85..=89 => {
                while st.needs_maintenance() {
                    st.maintain().unwrap();
                }
            }
            90..=94 => {
                st.close().unwrap();
                drop(st);
                st = open(&b, &o, now);
                m.limits(now, None);
            }
            _ => {
                // kill -9 after a sync: no close, no snapshot of the
                // active segment, then a power cut.
                st.sync().unwrap();
                drop(st);
                b.crash();
                st = open(&b, &o, now);
                m.limits(now, None);
            }
        }
        check(&mut st, &m, &mut rng, &ctx);
    }
}

/// No limits, segments of 1500 bytes.
fn small() -> Opts {
    Opts {
        cfg: StreamConfig {
            storage: Storage::Memory,
            ..StreamConfig::new("M", &[">"])
        },
        segment_size: 1500,
    }
}

/// [`small`] with limits.
fn limits(max_msgs: u64, max_msgs_per_subject: u64, max_age: Duration) -> Opts {
    let mut o = small();
    o.cfg.max_msgs = max_msgs;
    o.cfg.max_msgs_per_subject = max_msgs_per_subject;
    o.cfg.max_age = max_age;
    o
}

#[test]
fn model_no_limits() {
    run(1, 3000, small());
}

#[test]
fn model_max_msgs_and_per_subject() {
    run(2, 3000, limits(40, 6, Duration::ZERO));
}

#[test]
fn model_max_age() {
    run(3, 3000, limits(0, 3, Duration::from_secs(20)));
}
