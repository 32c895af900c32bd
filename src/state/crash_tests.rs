//! Crash injection over the state records, as `store::tests` does for the
//! streams: sessions, wills, retained messages, consumer state and mirror
//! cursors are driven through [`MemBackend`] behind [`Faulty`], which
//! makes the k-th write-side call fail (a crash there: that call and every
//! later one fail, an append or in-place write keeps only a prefix), for
//! every k of an operation; then the store is reopened on what the disk
//! holds after a power cut ([`MemBackend::crash_image`]: unsynced bytes
//! lost). Asserted, per the module docs:
//! - a save that returned Ok survives; a failed one leaves the old state
//!   or the new one, never a mix, and never an error at reopen;
//! - a torn or corrupt record is reported and skipped (the other slot, the
//!   previous state, or nothing), never fatal;
//! - the retained log's torn tail is cut at start;
//! - ENOSPC and a failed fsync fail the save and leave the previous state.
//!
//! [`MemBackend`] makes removals and `write_atomic` durable at once, so
//! what is checked for them is atomicity, not the directory fsync.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::consumers;
use super::cursors::{self, Cursor};
use super::retained::{Retained, RetainedEnv, RetainedLimits, LOG};
use super::sessions::{file_stem, SessionStore, StoredSession};
use super::wills::{StoredWill, WillStore};
use super::{Clock, Disk};
use crate::store::backend::{Backend, MemBackend};
use crate::stream::consumer::{AckKind, Consumer, ConsumerConfig};

const NOW_MS: u64 = 1_700_000_000_000;

/// A [`MemBackend`] whose write-side calls fail from the `fail_at`-th on.
#[derive(Clone)]
struct Faulty {
    mem: MemBackend,
    ops: Arc<AtomicU64>,
    fail_at: Arc<AtomicU64>,
    /// Bytes of the failing append or in-place write that land.
    keep: usize,
}

impl Faulty {
    fn new(mem: &MemBackend, keep: usize) -> Faulty {
        Faulty {
            mem: mem.clone(),
            ops: Arc::new(AtomicU64::new(0)),
            fail_at: Arc::new(AtomicU64::new(u64::MAX)),
            keep,
        }
    }

    /// Crash at the `k`-th write-side call from now.
    fn arm(&self, k: u64) {
        self.ops.store(0, Ordering::SeqCst);
        self.fail_at.store(k, Ordering::SeqCst);
    }

    /// Whether a crash was hit.
    fn crashed(&self) -> bool {
        self.ops.load(Ordering::SeqCst) > self.fail_at.load(Ordering::SeqCst)
    }

    /// `Ok(true)`: go on; `Ok(false)`: this call is the crash (do the
    /// torn part, then fail); `Err`: after the crash.
    fn step(&self) -> io::Result<bool> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        let at = self.fail_at.load(Ordering::SeqCst);
        match n.cmp(&at) {
            std::cmp::Ordering::Less => Ok(true),
            std::cmp::Ordering::Equal => Ok(false),
            std::cmp::Ordering::Greater => Err(crashed()),
        }
    }

    fn disk(&self) -> Disk {
        let f = self.clone();
        Disk::new(3, move || Ok(Box::new(f.clone()) as Box<dyn Backend>)).unwrap()
    }
}

fn crashed() -> io::Error {
    io::Error::other("injected crash")
}

impl Backend for Faulty {
    fn list(&mut self) -> io::Result<Vec<String>> {
        self.mem.list()
    }
    fn len(&mut self, name: &str) -> io::Result<u64> {
        self.mem.len(name)
    }
    fn read_at(&mut self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.mem.read_at(name, offset, buf)
    }
    fn create(&mut self, name: &str) -> io::Result<()> {
        self.step()?
            .then(|| self.mem.create(name))
            .ok_or_else(crashed)?
    }
    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        if self.step()? {
            return self.mem.append(name, data);
        }
        self.mem.append(name, &data[..self.keep.min(data.len())])?;
        Err(crashed())
    }
    fn write_at(&mut self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.step()? {
            return self.mem.write_at(name, offset, data);
        }
        self.mem
            .write_at(name, offset, &data[..self.keep.min(data.len())])?;
        Err(crashed())
    }
    fn sync(&mut self, name: &str) -> io::Result<()> {
        self.step()?
            .then(|| self.mem.sync(name))
            .ok_or_else(crashed)?
    }
    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        self.step()?
            .then(|| self.mem.truncate(name, len))
            .ok_or_else(crashed)?
    }
    fn remove(&mut self, name: &str) -> io::Result<()> {
        self.step()?
            .then(|| self.mem.remove(name))
            .ok_or_else(crashed)?
    }
    fn write_atomic(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.step()?
            .then(|| self.mem.write_atomic(name, data))
            .ok_or_else(crashed)?
    }
    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        self.step()?
            .then(|| self.mem.rename(from, to))
            .ok_or_else(crashed)?
    }
    fn sync_dir(&mut self) -> io::Result<()> {
        self.step()?
            .then(|| self.mem.sync_dir())
            .ok_or_else(crashed)?
    }
}

/// Run `op` with a crash at every write-side call k = 0, 1, ... (and each
/// torn length in `keeps`) until it runs through; `check` gets the disk
/// after the power cut and whether `op` returned Ok. Returns how many
/// crash points were tried.
fn every_crash<S>(
    keeps: &[usize],
    setup: impl Fn(&Faulty) -> S,
    op: impl Fn(&S) -> io::Result<()>,
    check: impl Fn(MemBackend, bool, &str),
) -> u64 {
    let mut tried = 0;
    for &keep in keeps {
        for k in 0.. {
            let f = Faulty::new(&MemBackend::new(), keep);
            let s = setup(&f);
            f.arm(k);
            let ok = op(&s).is_ok();
            let hit = f.crashed();
            check(
                f.mem.crash_image(),
                ok,
                &format!("crash at call {k}, keep {keep}"),
            );
            tried += 1;
            if !hit {
                assert!(ok, "no crash, yet failed (k {k})");
                break;
            }
        }
    }
    tried
}

fn clock() -> Clock {
    Arc::new(|| NOW_MS)
}

fn mem_disk(mem: &MemBackend) -> Disk {
    let m = mem.clone();
    Disk::new(2, move || Ok(Box::new(m.clone()) as Box<dyn Backend>)).unwrap()
}

fn session(n: u16) -> StoredSession {
    StoredSession {
        client_id: "dev/1".into(),
        version: 5,
        expiry_secs: 3600,
        disconnected_at_ms: NOW_MS,
        // Grows and shrinks: in-place writes over longer and shorter data.
        qos2_in: (0..(n % 3) * 40).map(|i| i + n).collect(),
        ..StoredSession::default()
    }
}

#[test]
fn sessions_survive_a_crash_at_every_step_of_a_save() {
    let tried = every_crash(
        &[0, 7, 25, 100],
        |f| {
            let (st, _, _) = SessionStore::open_on(f.disk(), "mem", clock()).unwrap();
            for n in 1..=3 {
                st.save(&session(n)).unwrap();
            }
            st
        },
        |st| st.save(&session(4)),
        |img, ok, ctx| {
            let (st, kept, _) = SessionStore::open_on(mem_disk(&img), "mem", clock()).unwrap();
            assert_eq!(kept, 1, "{ctx}");
            let got = st.load("dev/1").expect(ctx);
            if ok {
                assert_eq!(got, session(4), "{ctx}: a save that returned Ok survives");
            } else {
                assert!(got == session(3) || got == session(4), "{ctx}: {got:?}");
            }
            // And it goes on from there.
            st.save(&session(5)).unwrap();
            let (st, _, _) = SessionStore::open_on(mem_disk(&img), "mem", clock()).unwrap();
            assert_eq!(st.load("dev/1"), Some(session(5)), "{ctx}");
        },
    );
    assert!(tried >= 8, "{tried}");
}

#[test]
fn a_new_session_and_a_removal_are_all_or_nothing() {
    every_crash(
        &[0, 30],
        |f| SessionStore::open_on(f.disk(), "mem", clock()).unwrap().0,
        |st| st.save(&session(1)),
        |img, ok, ctx| {
            let (st, _, _) = SessionStore::open_on(mem_disk(&img), "mem", clock()).unwrap();
            match st.load("dev/1") {
                Some(s) => assert_eq!(s, session(1), "{ctx}"),
                None => assert!(!ok, "{ctx}: a save that returned Ok survives"),
            }
        },
    );
    every_crash(
        &[0],
        |f| {
            let st = SessionStore::open_on(f.disk(), "mem", clock()).unwrap().0;
            st.save(&session(1)).unwrap();
            st.save(&session(2)).unwrap();
            st
        },
        |st| st.remove("dev/1"),
        |img, ok, ctx| {
            let (st, _, _) = SessionStore::open_on(mem_disk(&img), "mem", clock()).unwrap();
            // Never an older state than the latest.
            if let Some(s) = st.load("dev/1") {
                assert!(!ok && s == session(2), "{ctx}");
            }
        },
    );
}

#[test]
fn session_slots_under_bit_flips_enospc_and_failed_fsync() {
    let mem = MemBackend::new();
    let (st, _, _) = SessionStore::open_on(mem_disk(&mem), "mem", clock()).unwrap();
    st.save(&session(1)).unwrap();
    st.save(&session(2)).unwrap();
    // A flipped bit anywhere in the newest slot: the previous state.
    let newest = super::slot_name(&file_stem("dev/1"), 2);
    let len = mem.file(&newest).unwrap().len();
    for at in (0..len).step_by(7) {
        let img = mem.crash_image();
        img.flip_bit(&newest, at, (at % 8) as u8);
        let (st, _, _) = SessionStore::open_on(mem_disk(&img), "mem", clock()).unwrap();
        assert_eq!(st.load("dev/1"), Some(session(1)), "flip at {at}");
    }
    // Both slots corrupt: reported, the session starts fresh.
    let img = mem.crash_image();
    img.flip_bit(&newest, 30, 1);
    img.flip_bit(&super::slot_name(&file_stem("dev/1"), 1), 30, 1);
    let (st, kept, _) = SessionStore::open_on(mem_disk(&img), "mem", clock()).unwrap();
    assert_eq!((kept, st.load("dev/1")), (0, None));
    // ENOSPC and a failed fsync: the save fails, the state before stays.
    mem.set_space_limit(Some(mem.clone().disk_usage().unwrap()));
    assert!(st_save(&mem, 5).is_err(), "grows: needs room");
    mem.set_space_limit(None);
    mem.set_fail_sync(true);
    assert!(st_save(&mem, 5).is_err(), "grows: needs room");
    mem.set_fail_sync(false);
    let (st, _, _) = SessionStore::open_on(mem_disk(&mem.crash_image()), "mem", clock()).unwrap();
    assert_eq!(st.load("dev/1"), Some(session(2)));
    drop(st);
}

/// Save `session(n)` through a store opened now on `mem`.
fn st_save(mem: &MemBackend, n: u16) -> io::Result<()> {
    let (st, _, _) = SessionStore::open_on(mem_disk(mem), "mem", clock()).unwrap();
    st.save(&session(n))
}

fn will(token: u64) -> StoredWill {
    StoredWill {
        client_id: "dev/1".into(),
        subject: "dev.status".into(),
        payload: "Z29uZQ==".into(),
        qos: 1,
        retain: false,
        delay_ms: 0,
        due_ms: 0,
        token,
        props: None,
        owner: None,
    }
}

#[test]
fn wills_survive_a_crash_at_every_step() {
    every_crash(
        &[0],
        |f| {
            let (ws, _) = WillStore::open_on(f.disk()).unwrap();
            ws.save(&will(1)).unwrap();
            ws
        },
        |ws| {
            ws.save(&will(2))?;
            ws.settle("dev/1", 2)
        },
        |img, ok, ctx| {
            let (_, owed) = WillStore::open_on(mem_disk(&img)).unwrap();
            assert!(owed.len() <= 1, "{ctx}");
            if ok {
                assert!(owed.is_empty(), "{ctx}: settled");
            } else if let Some(w) = owed.first() {
                assert!(*w == will(1) || *w == will(2), "{ctx}");
            }
        },
    );
    // A corrupt will record is reported and deleted, never fatal.
    let mem = MemBackend::new();
    let (ws, _) = WillStore::open_on(mem_disk(&mem)).unwrap();
    ws.save(&will(1)).unwrap();
    mem.flip_bit(&file_stem("dev/1"), 20, 2);
    let (_, owed) = WillStore::open_on(mem_disk(&mem)).unwrap();
    assert!(owed.is_empty());
    assert!(mem.names().is_empty());
}

fn env() -> RetainedEnv {
    RetainedEnv {
        now_ms: clock(),
        expiry_secs: |_| None,
    }
}

fn open_retained(b: Box<dyn Backend>) -> Retained {
    Retained::open_on(b, RetainedLimits::default(), env())
        .unwrap()
        .0
}

#[test]
fn retained_survives_a_crash_at_every_step_of_a_set_and_a_compaction() {
    let big = vec![5u8; 40 * 1024];
    every_crash(
        &[0, 3, 11, 30],
        |f| {
            let r = open_retained(Box::new(f.clone()));
            r.set("a", b"one", 1).unwrap();
            r.set("b", &big, 1).unwrap();
            r
        },
        |r| {
            // Replacing the big one twice makes dead records outweigh live
            // ones: the last set compacts.
            r.set("b", &big, 0)?;
            r.set("a", b"", 0)?;
            r.set("b", b"small", 1)
        },
        |img, ok, ctx| {
            let (r, rep) =
                Retained::open_on(Box::new(img.clone()), RetainedLimits::default(), env()).unwrap();
            let a = r.matching("a");
            let b = r.matching("b");
            assert_eq!(b.len(), 1, "{ctx}");
            if ok {
                // (A failed compaction is logged; the set stands.)
                assert!(a.is_empty(), "{ctx}");
                assert_eq!(b[0].payload, b"small", "{ctx}");
            } else {
                assert!(b[0].payload == big || b[0].payload == b"small", "{ctx}");
                assert!(a.len() <= 1, "{ctx}");
            }
            assert!(
                img.file(super::retained::TMP).is_none(),
                "{ctx}: temp removed"
            );
            // The torn tail was cut: a second start finds none.
            drop(r);
            let (_, again) =
                Retained::open_on(Box::new(img), RetainedLimits::default(), env()).unwrap();
            assert_eq!(again.truncated_bytes, 0, "{ctx}");
            assert_eq!(again.messages, rep.messages, "{ctx}");
        },
    );
}

#[test]
fn retained_compacts_when_nothing_fails() {
    let mem = MemBackend::new();
    let r = open_retained(Box::new(mem.clone()));
    let big = vec![5u8; 40 * 1024];
    r.set("b", &big, 1).unwrap();
    r.set("b", &big, 0).unwrap();
    r.set("b", b"small", 1).unwrap();
    assert!(mem.file(LOG).unwrap().len() < 1024, "compacted");
    assert_eq!(r.matching("b")[0].payload, b"small");
}

#[test]
fn retained_log_under_torn_tails_bit_flips_enospc_and_failed_fsync() {
    let mem = MemBackend::new();
    let r = open_retained(Box::new(mem.clone()));
    r.set("x", b"keep", 1).unwrap();
    let synced = mem.file(LOG).unwrap().len();
    r.set("y", b"second", 1).unwrap();
    // A torn append (a crash before the sync of a longer log).
    let full = mem.file(LOG).unwrap();
    for cut in 1..full.len() - synced {
        let img = MemBackend::new();
        img.set_file(LOG, full[..full.len() - cut].to_vec());
        let (r, rep) = Retained::open_on(Box::new(img), RetainedLimits::default(), env()).unwrap();
        assert_eq!(
            (rep.messages, rep.truncated_bytes),
            (1, (full.len() - synced - cut) as u64)
        );
        assert_eq!(r.matching("x")[0].payload, b"keep");
    }
    // A bit flipped in a record read back: that message is skipped.
    mem.flip_bit(LOG, synced + 12, 0);
    assert!(r.matching("y").is_empty());
    assert_eq!(r.matching("x").len(), 1);
    // At start the corrupt record and all after it are cut, reported.
    let (r2, rep) = Retained::open_on(
        Box::new(mem.crash_image()),
        RetainedLimits::default(),
        env(),
    )
    .unwrap();
    assert_eq!(rep.messages, 1);
    assert!(rep.truncated_bytes > 0);
    drop(r2);
    // ENOSPC: the set fails, nothing half-written stays.
    let mem = MemBackend::new();
    let r = open_retained(Box::new(mem.clone()));
    r.set("x", b"keep", 1).unwrap();
    let used = mem.file(LOG).unwrap().len() as u64;
    mem.set_space_limit(Some(used + 5));
    assert!(r.set("y", b"no room for this", 1).is_err());
    assert_eq!(mem.file(LOG).unwrap().len() as u64, used);
    mem.set_space_limit(None);
    mem.set_fail_sync(true);
    assert!(r.set("y", b"unsynced", 1).is_err());
    mem.set_fail_sync(false);
    assert!(r.matching("y").is_empty(), "a failed set is not applied");
    r.set("z", b"later", 1).unwrap();
    let (r, rep) = Retained::open_on(
        Box::new(mem.crash_image()),
        RetainedLimits::default(),
        env(),
    )
    .unwrap();
    assert_eq!((rep.messages, rep.truncated_bytes), (2, 0));
    assert_eq!(r.matching("z")[0].payload, b"later");
}

fn consumer(acked: u64) -> Consumer {
    let v = serde_json::json!({"durable_name": "d", "ack_wait": 50});
    let cfg = ConsumerConfig::from_json(&v).unwrap();
    let mut c = Consumer::new("d".into(), cfg, 0, 7);
    for s in 1..=5 {
        c.record_delivery(s, 10);
    }
    for s in 1..=acked {
        c.ack(s, &AckKind::Ack, 11);
    }
    c
}

fn pending(c: &Consumer) -> Vec<u64> {
    c.pending.keys().copied().collect()
}

#[test]
fn consumer_state_survives_a_crash_at_every_step() {
    every_crash(
        &[0],
        |f| {
            let mut b = f.clone();
            consumers::save_on(&mut b, &consumer(1)).unwrap();
            b
        },
        |b| consumers::save_on(&mut b.clone(), &consumer(3)),
        |img, ok, ctx| {
            let got = consumers::load_on(&mut img.clone(), "S", 20);
            assert_eq!(got.len(), 1, "{ctx}");
            let p = pending(&got[0]);
            if ok {
                assert_eq!(p, vec![4, 5], "{ctx}");
            } else {
                assert!(p == vec![4, 5] || p == vec![2, 3, 4, 5], "{ctx}");
            }
        },
    );
    // An earlier release's JSON file, upgraded by a save that crashes.
    every_crash(
        &[0],
        |f| {
            let json = crate::stream::consumer::tests::legacy_json(&consumer(1));
            f.mem.set_file("d.json", json);
            f.clone()
        },
        |b| consumers::save_on(&mut b.clone(), &consumer(2)),
        |img, ok, ctx| {
            let got = consumers::load_on(&mut img.clone(), "S", 20);
            assert_eq!(got.len(), 1, "{ctx}");
            let p = pending(&got[0]);
            assert!(
                p == vec![3, 4, 5] || (!ok && p == vec![2, 3, 4, 5]),
                "{ctx}"
            );
        },
    );
    // Removal, and a corrupt record: reported and skipped.
    let mem = MemBackend::new();
    let mut b = mem.clone();
    consumers::save_on(&mut b, &consumer(1)).unwrap();
    mem.flip_bit("d.state", 15, 3);
    assert!(consumers::load_on(&mut b, "S", 20).is_empty());
    consumers::remove_on(&mut b, "d").unwrap();
    assert!(mem.names().is_empty());
    assert!(
        consumers::save_on(&mut b, &Consumer::new("../x".into(), consumer(0).cfg, 0, 0)).is_err()
    );
}

#[test]
fn cursors_survive_a_crash_at_every_step_synced_or_not() {
    let c = |n: u64| Cursor {
        local_seq: n,
        hub_seq: n * 10,
        created: (n > 2).then(|| "2026-12-07T03:00:00Z".to_string()),
    };
    for sync in [true, false] {
        every_crash(
            &[0, 5],
            |f| {
                let mut b = f.clone();
                for n in 1..=3 {
                    cursors::store_on(&mut b, "T.cursor", c(n), true).unwrap();
                }
                b
            },
            |b| cursors::store_on(&mut b.clone(), "T.cursor", c(4), sync),
            |img, ok, ctx| {
                let got = cursors::load_on(&mut img.clone(), "T.cursor")
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"))
                    .expect(ctx);
                if ok && sync {
                    assert_eq!(got, c(4), "{ctx}");
                } else {
                    assert!(got == c(3) || got == c(4), "{ctx}: {got:?}");
                }
            },
        );
    }
}
