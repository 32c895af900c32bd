//! A deterministic simulation of source-down ([`super::source`]) against
//! a simulated clustered hub stream, thousands of seeded schedules.
//!
//! The hub: a stream (several subjects, some outside the filter, some the
//! local stream does not capture) whose batched direct gets are answered
//! by any replica, i.e. from a prefix of the stream that may lag behind
//! the leader (a leader change answers from a lagging replica); a wake
//! (core message) per publish on the filter. Faults from the seed:
//! publishes interleaved with link cuts; direct-get replies lost (the rest
//! of that request's replies with it: NATS keeps order per subscription),
//! duplicated or delayed behind other requests' replies; the hub stream
//! deleted and recreated, also while frond is connected and reading (each
//! message has its own `Nats-Time-Stamp`); local appends failing part-way; frond crashing
//! at any point and restarting from its cursor record as last written
//! (fsynced) and the local stream's durable tail.
//!
//! Invariants, checked per schedule:
//! - Every message is stored under the identity (`created`) of the hub
//!   stream incarnation it came from.
//! - Every cursor record written covers only durable data: each hub
//!   message of that stream incarnation the source must store, at or below
//!   the record's `hub_seq`, is in the local stream.
//! - After the schedule settles, the local stream is, per hub stream
//!   incarnation in order, a prefix of the messages the source must store
//!   (matching the filter, captured locally, transformed), in hub order,
//!   without duplicates, complete for the last incarnation; each change of
//!   incarnation in the local stream was detected and counted.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::cursor::SourceCursor;
use super::mirror::Command;
use super::source::*;
use crate::config::SourceStart;
use crate::subject::mapping::Transform;

/// splitmix64, the generator of every schedule (as in the mirror's sim).
pub(super) struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

const FROM: &str = "COMMANDS";
const INBOX_SID: u64 = 1;
const TAILS: [&str; 4] = ["a", "b", "c", "a"];

fn dbg() -> bool {
    std::env::var("SIMDBG").is_ok()
}

/// One hub message: subject, unique id (the payload carries it).
#[derive(Clone)]
struct HubMsg {
    subject: String,
    id: u64,
    pad: usize,
}

/// What the source must store of hub subject `s`, and as which subject.
fn wanted(s: &str) -> Option<String> {
    let rest = s.strip_prefix("cmd.truck-042.")?;
    (rest.starts_with("a.") || rest.starts_with("b.")).then(|| format!("cmd.{rest}"))
}

/// A message on its way to frond: (sid, subject, headers, payload).
#[derive(Clone)]
struct Delivery {
    sid: u64,
    subject: String,
    headers: Option<Vec<u8>>,
    payload: Vec<u8>,
}

struct Hub {
    /// Incarnation number; `created` is derived from it.
    gen: u64,
    exists: bool,
    msgs: Vec<HubMsg>,
    /// Every incarnation's messages, by `gen`.
    history: Vec<Vec<HubMsg>>,
    /// Most messages a replica answering a direct get may lag behind.
    lag: usize,
    /// (sid, filter) of the current connection.
    subs: Vec<(u64, String)>,
    next_id: u64,
}

fn created_of(gen: u64) -> String {
    format!("2026-12-07T10:00:00.{gen:09}Z")
}

fn gen_of(created: &str) -> Option<u64> {
    created
        .strip_prefix("2026-12-07T10:00:00.")?
        .strip_suffix('Z')?
        .parse()
        .ok()
}

impl Hub {
    fn deliver(&self, subject: &str, headers: Option<Vec<u8>>, payload: Vec<u8>) -> Vec<Delivery> {
        self.subs
            .iter()
            .filter(|(_, f)| crate::subject::matches(f, subject))
            .map(|(sid, _)| Delivery {
                sid: *sid,
                subject: subject.to_string(),
                headers: headers.clone(),
                payload: payload.clone(),
            })
            .collect()
    }

    fn publish(&mut self, rng: &mut Rng, out: &mut VecDeque<Delivery>) {
        let truck = if rng.chance(800) { "042" } else { "007" };
        let tail = TAILS[rng.below(4) as usize];
        self.next_id += 1;
        let m = HubMsg {
            subject: format!("cmd.truck-{truck}.{tail}.{}", rng.below(3)),
            id: self.next_id,
            pad: rng.below(120) as usize,
        };
        // A wake reaches the subscribers whether a stream stores it or not.
        out.extend(self.deliver(&m.subject, None, payload(&m)));
        if self.exists {
            self.msgs.push(m);
        }
    }

    fn recreate(&mut self) {
        self.history[self.gen as usize] = std::mem::take(&mut self.msgs);
        self.gen += 1;
        self.history.push(Vec::new());
        self.exists = true;
    }

    fn receive(&mut self, c: Command, rng: &mut Rng, out: &mut VecDeque<Delivery>) {
        let (subject, reply, body) = match c {
            Command::Subscribe { subject, sid } => return self.subs.push((sid, subject)),
            Command::Publish {
                subject,
                reply,
                payload,
                ..
            } => (subject, reply, payload),
        };
        if subject == format!("$JS.API.STREAM.INFO.{FROM}") {
            let answer = if self.exists {
                serde_json::json!({
                    "config": {"name": FROM, "subjects": ["cmd.>"], "allow_direct": true},
                    "created": created_of(self.gen),
                    "state": {"last_seq": self.msgs.len()},
                })
            } else {
                serde_json::json!({"error": {"code": 404, "err_code": 10059, "description": "stream not found"}})
            };
            out.extend(self.deliver(&reply, None, answer.to_string().into_bytes()));
        } else if subject == format!("$JS.API.DIRECT.GET.{FROM}") {
            self.direct_get(&reply, &body, rng, out);
        }
    }

    /// A batched direct get, answered by a replica holding a prefix.
    fn direct_get(&self, reply: &str, body: &[u8], rng: &mut Rng, out: &mut VecDeque<Delivery>) {
        let status = |s: &str| Some(format!("NATS/1.0 {s}\r\n\r\n").into_bytes());
        if !self.exists {
            return out.extend(self.deliver(reply, status("503"), Vec::new()));
        }
        let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let num = |k: &str| req.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let (from, batch, max_bytes) = (num("seq").max(1), num("batch"), num("max_bytes"));
        let filter = req
            .get("next_by_subj")
            .and_then(|v| v.as_str())
            .unwrap_or(">");
        let lag = rng.below(self.lag as u64 + 1) as usize;
        let view = &self.msgs[..self.msgs.len().saturating_sub(lag)];
        let matching: Vec<(u64, &HubMsg)> = (view.iter().enumerate())
            .map(|(i, m)| (i as u64 + 1, m))
            .filter(|(s, m)| *s >= from && crate::subject::matches(filter, &m.subject))
            .collect();
        if matching.is_empty() {
            return out.extend(self.deliver(reply, status("404 Message Not Found"), Vec::new()));
        }
        let (mut sent, mut bytes, mut last) = (0usize, 0usize, 0u64);
        for (seq, m) in &matching {
            let p = payload(m);
            let size = m.subject.len() + p.len();
            if sent > 0 && (sent as u64 >= batch || bytes + size > max_bytes as usize) {
                break;
            }
            sent += 1;
            bytes += size;
            let pending = matching.len() - sent;
            let h = format!(
                "NATS/1.0\r\nNats-Stream: {FROM}\r\nNats-Subject: {}\r\nNats-Sequence: {seq}\r\nNats-Time-Stamp: 2026-12-07T10:00:00.{:09}Z\r\nNats-Num-Pending: {pending}\r\nNats-Last-Sequence: {last}\r\n\r\n",
                m.subject, m.id
            );
            out.extend(self.deliver(reply, Some(h.into_bytes()), p));
            last = *seq;
        }
        let eob = format!(
            "NATS/1.0 204 EOB\r\nNats-Num-Pending: {}\r\nNats-Last-Sequence: {last}\r\n\r\n",
            matching.len() - sent
        );
        out.extend(self.deliver(reply, Some(eob.into_bytes()), Vec::new()));
    }
}

fn payload(m: &HubMsg) -> Vec<u8> {
    let mut p = format!("id:{}:", m.id).into_bytes();
    p.resize(p.len() + m.pad, b'x');
    p
}

/// A message of the local stream: local seq, subject, hub gen, hub seq,
/// id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Local {
    lseq: u64,
    subject: String,
    origin: Option<u64>,
    id: u64,
}

fn id_of(p: &[u8]) -> u64 {
    let s = String::from_utf8_lossy(p);
    s.split(':')
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Sim {
    src: Source,
    params: SourceParams,
    hub: Hub,
    rng: Rng,
    /// The local stream's durable messages.
    local: Vec<Local>,
    /// The cursor record as last written (with sync).
    record: Option<SourceCursor>,
    /// The batch the shell is storing.
    storing: Option<Batch>,
    to_hub: VecDeque<Command>,
    to_client: VecDeque<Delivery>,
    connected: bool,
    conns: u64,
    /// Recreations counted by the machine, over its restarts.
    recreated: u64,
    seed: u64,
    /// Settling: no more faults.
    calm: bool,
    /// Restarts skip [`Source::handle_scanned`] (the shell before the
    /// fix of seed 300).
    stale_scan: bool,
    /// The first cursor record that passed undurable data, or the first
    /// message stored under another incarnation's identity.
    violation: Option<String>,
    t0: Instant,
    t: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let params = SourceParams {
            from: FROM.into(),
            filter: Some("cmd.truck-042.>".into()),
            stream: "CMD".into(),
            local_subjects: vec!["cmd.a.>".into(), "cmd.b.>".into()],
            transform: Transform::new("cmd.truck-042.>", "cmd.>")
                .ok()
                .map(|t| ("cmd.truck-042.>".to_string(), t)),
            start: SourceStart::All,
            poll_interval: Duration::from_millis(500 + rng.below(5_000)),
            batch: 1 + rng.below(8) as usize,
            max_bytes: 40 + rng.below(600) as usize,
        };
        let hub = Hub {
            gen: 0,
            exists: true,
            msgs: Vec::new(),
            history: vec![Vec::new()],
            lag: rng.below(6) as usize,
            subs: Vec::new(),
            next_id: 0,
        };
        Sim {
            src: Source::new(params.clone(), None, None),
            params,
            hub,
            rng,
            local: Vec::new(),
            record: None,
            storing: None,
            to_hub: VecDeque::new(),
            to_client: VecDeque::new(),
            connected: false,
            conns: 0,
            recreated: 0,
            seed,
            calm: false,
            stale_scan: false,
            violation: None,
            t0: Instant::now(),
            t: 0,
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.t)
    }

    /// The shell's pump: commands to the hub, the batch to the storer,
    /// the cursor to disk (checked), events to the log.
    fn drain(&mut self) {
        while let Some(c) = self.src.poll_command() {
            if self.connected {
                self.to_hub.push_back(c);
            }
        }
        if let Some(b) = self.src.poll_batch() {
            assert!(self.storing.is_none(), "seed {}: two batches", self.seed);
            self.storing = Some(b);
        }
        if let Some(c) = self.src.poll_cursor() {
            self.check_record(&c);
            self.record = Some(c);
        }
        while let Some(e) = self.src.poll_event() {
            if dbg() {
                eprintln!("t={} event {e}", self.t);
            }
        }
    }

    /// The hub messages of incarnation `gen` the source must store, as
    /// (seq, local subject, id).
    fn expected(&self, gen: u64) -> Vec<(u64, String, u64)> {
        let msgs = if gen == self.hub.gen {
            &self.hub.msgs
        } else {
            &self.hub.history[gen as usize]
        };
        (msgs.iter().enumerate())
            .filter_map(|(i, m)| wanted(&m.subject).map(|s| (i as u64 + 1, s, m.id)))
            .collect()
    }

    /// Which incarnation a hub message id belongs to.
    fn gen_of_id(&self, id: u64) -> u64 {
        if self.hub.msgs.iter().any(|m| m.id == id) {
            return self.hub.gen;
        }
        (0..self.hub.history.len() as u64)
            .find(|g| self.hub.history[*g as usize].iter().any(|m| m.id == id))
            .unwrap_or(u64::MAX)
    }

    /// A cursor about to be written covers only durable messages.
    fn check_record(&mut self, c: &SourceCursor) {
        let Some(gen) = gen_of(&c.created) else {
            return;
        };
        for (seq, _, id) in self.expected(gen) {
            if seq <= c.hub_seq && !self.local.iter().any(|l| l.id == id) {
                let why = format!("cursor {c:?} passes hub message {seq} (gen {gen}) not stored");
                self.violation.get_or_insert(why);
            }
        }
    }

    fn connect(&mut self) {
        self.conns += 1;
        self.connected = true;
        let now = self.now();
        let wake = (2..2 + MAX_WAKE_SUBS as u64).collect();
        let token = format!("tok{}", self.conns);
        self.src.handle_connected(now, INBOX_SID, wake, &token);
        self.drain();
    }

    fn disconnect(&mut self) {
        // The hub processed part of what was on the wire; nothing of its
        // answers arrives.
        let processed = self.rng.below(self.to_hub.len() as u64 + 1);
        let mut sink = VecDeque::new();
        for _ in 0..processed {
            if let Some(c) = self.to_hub.pop_front() {
                self.hub.receive(c, &mut self.rng, &mut sink);
            }
        }
        self.to_hub.clear();
        self.to_client.clear();
        self.hub.subs.clear();
        self.connected = false;
        self.src.handle_disconnected();
        self.drain();
    }

    /// Store the batch with the shell: all of it, or a prefix and an
    /// error, or a prefix and a crash before the answer.
    fn store(&mut self) -> bool {
        let Some(b) = self.storing.take() else {
            return false;
        };
        let n = b.msgs.len();
        let r = if self.calm { 0 } else { self.rng.below(100) };
        let (k, error) = match r {
            0..=79 => (n, None),
            80..=94 => (self.rng.below(n as u64 + 1) as usize, Some("io")),
            _ => {
                let k = self.rng.below(n as u64 + 1) as usize;
                self.append(&b, k);
                self.crash();
                return true;
            }
        };
        self.append(&b, k);
        if dbg() {
            let seqs: Vec<u64> = b.msgs.iter().map(|(s, _)| *s).collect();
            eprintln!(
                "t={} stored {k} of {seqs:?} (to {}) {error:?}",
                self.t, b.last_hub_seq
            );
        }
        let stored = Stored {
            done: k,
            refused: 0,
            local_last_seq: self.local.len() as u64,
            error: error.map(str::to_string),
        };
        let now = self.now();
        self.src.handle_stored(now, stored);
        self.drain();
        true
    }

    fn append(&mut self, b: &Batch, k: usize) {
        let under = gen_of(&self.src.status().hub_created);
        for (seq, m) in b.msgs.iter().take(k) {
            let gen = self.gen_of_id(id_of(&m.payload));
            if under != Some(gen) {
                let why = format!("hub message {seq} of gen {gen} stored under gen {under:?}");
                self.violation.get_or_insert(why);
            }
            self.local.push(Local {
                lseq: self.local.len() as u64 + 1,
                subject: m.subject.clone(),
                origin: origin_of(m.headers.as_deref(), FROM),
                id: id_of(&m.payload),
            });
        }
    }

    /// frond dies: the record as last written and the durable local
    /// stream survive; the shell scans the tail after the record.
    fn crash(&mut self) {
        if dbg() {
            eprintln!("t={} crash, record {:?}", self.t, self.record);
        }
        self.recreated += self.src.status().recreated;
        self.storing = None;
        self.to_hub.clear();
        self.to_client.clear();
        self.hub.subs.clear();
        self.connected = false;
        let after = self.record.as_ref().map_or(0, |r| r.local_seq);
        let tail = (self.local.iter())
            .filter(|l| l.lseq > after)
            .filter_map(|l| l.origin)
            .max();
        self.src = Source::new(self.params.clone(), self.record.clone(), tail);
        if !self.stale_scan {
            self.src.handle_scanned(self.local.len() as u64);
        }
        self.drain();
    }

    fn hub_step(&mut self) -> bool {
        let Some(c) = self.to_hub.pop_front() else {
            return false;
        };
        self.hub.receive(c, &mut self.rng, &mut self.to_client);
        true
    }

    fn client_step(&mut self) -> bool {
        let Some(d) = self.to_client.pop_front() else {
            return false;
        };
        let now = self.now();
        self.src
            .handle_msg(now, d.sid, &d.subject, d.headers.as_deref(), &d.payload);
        self.drain();
        true
    }

    fn tick(&mut self, ms: u64) {
        self.t += ms;
        let now = self.now();
        self.src.handle_tick(now);
        self.drain();
    }

    /// Lose, duplicate or delay a reply on its way to frond.
    fn reply_fault(&mut self) {
        let n = self.to_client.len() as u64;
        if n == 0 {
            return;
        }
        let i = self.rng.below(n) as usize;
        match self.rng.below(3) {
            0 => {
                // Lost, and the rest of its request's replies with it.
                let subj = self.to_client[i].subject.clone();
                let mut k = 0;
                self.to_client.retain(|d| {
                    k += 1;
                    k <= i || d.subject != subj
                });
            }
            1 => {
                let d = self.to_client[i].clone();
                let at = i + 1 + self.rng.below(n - i as u64) as usize;
                self.to_client.insert(at, d);
            }
            _ => {
                // Delayed behind the replies of later requests and
                // wakes (its own request's order is kept).
                let subj = self.to_client[i].subject.clone();
                let moved: Vec<Delivery> = (self.to_client.iter().skip(i))
                    .filter(|d| d.subject == subj)
                    .cloned()
                    .collect();
                let mut k = 0;
                self.to_client.retain(|d| {
                    k += 1;
                    k <= i || d.subject != subj
                });
                self.to_client.extend(moved);
            }
        }
    }

    /// One random step of a faulty schedule.
    fn step(&mut self) {
        let r = self.rng.below(1000);
        if dbg() && r >= 790 {
            eprintln!(
                "t={} step {r} exists={} gen={}",
                self.t, self.hub.exists, self.hub.gen
            );
        }
        match r {
            0..=249 => {
                self.hub_step();
            }
            250..=499 => {
                self.client_step();
            }
            500..=599 => {
                self.store();
            }
            600..=699 => {
                self.hub.publish(&mut self.rng, &mut self.to_client);
            }
            700..=759 => {
                let ms = 1 + self.rng.below(2_000);
                self.tick(ms);
            }
            760..=789 => self.reply_fault(),
            790..=799 if self.connected => self.disconnect(),
            790..=829 if !self.connected => self.connect(),
            830..=834 => self.crash(),
            835..=836 if self.hub.exists => self.hub.exists = false,
            835..=846 => self.hub.recreate(),
            847..=866 => self.hub.lag = self.rng.below(8) as usize,
            _ => {}
        }
    }

    /// No more faults: the stream exists, replicas catch up, frond is
    /// connected; deliver, store and let time pass until caught up.
    fn settle(&mut self) -> Result<(), String> {
        if !self.hub.exists {
            self.hub.recreate();
        }
        self.hub.lag = 0;
        self.calm = true;
        if !self.connected {
            self.connect();
        }
        // The cursor reaches the last message matching the filter.
        let last = (self.hub.msgs.iter().enumerate())
            .rfind(|(_, m)| m.subject.starts_with("cmd.truck-042."))
            .map_or(0, |(i, _)| i as u64 + 1);
        for _ in 0..100_000 {
            let progressed = self.hub_step() || self.client_step() || self.store();
            if progressed {
                continue;
            }
            let caught_up = self
                .record
                .as_ref()
                .is_some_and(|r| r.created == created_of(self.hub.gen) && r.hub_seq >= last)
                || (last == 0 && self.record.is_some());
            if caught_up && self.src.status().state == "idle" {
                return Ok(());
            }
            self.tick(1_000);
        }
        Err(format!(
            "did not settle: {:?} record {:?}",
            self.src.status(),
            self.record
        ))
    }

    /// The local stream against the hub's history.
    fn check(&self) -> Result<(), String> {
        if let Some(v) = &self.violation {
            return Err(v.clone());
        }
        let mut gens: Vec<u64> = Vec::new();
        let mut parts: Vec<Vec<&Local>> = Vec::new();
        for l in &self.local {
            let g = self.gen_of_id(l.id);
            if gens.last() != Some(&g) {
                if gens.last().is_some_and(|p| *p > g) {
                    return Err(format!("incarnations interleave locally: {:?}", self.local));
                }
                gens.push(g);
                parts.push(Vec::new());
            }
            if let Some(p) = parts.last_mut() {
                p.push(l);
            }
        }
        for (g, part) in gens.iter().zip(&parts) {
            let want = self.expected(*g);
            let got: Vec<(u64, String, u64)> = (part.iter())
                .map(|l| (l.origin.unwrap_or(0), l.subject.clone(), l.id))
                .collect();
            if got.len() > want.len() || want[..got.len()] != got[..] {
                return Err(format!(
                    "gen {g}: local {got:?} is not a prefix of the hub's {want:?}"
                ));
            }
        }
        let last = self.expected(self.hub.gen);
        let n = parts.last().map_or(0, Vec::len);
        if !last.is_empty() && (gens.last() != Some(&self.hub.gen) || n != last.len()) {
            return Err(format!(
                "the last incarnation is incomplete: {n} of {}",
                last.len()
            ));
        }
        let counted = self.recreated + self.src.status().recreated;
        if (counted as usize) + 1 < gens.len() {
            return Err(format!(
                "{} incarnations stored locally, {counted} recreations counted",
                gens.len()
            ));
        }
        Ok(())
    }
}

/// Runs one schedule; the first broken invariant.
fn run(seed: u64) -> Result<(), String> {
    run_with(seed, false)
}

fn run_with(seed: u64, stale_scan: bool) -> Result<(), String> {
    let mut s = Sim::new(seed);
    s.stale_scan = stale_scan;
    for _ in 0..s.rng.below(30) {
        s.hub.publish(&mut s.rng, &mut VecDeque::new());
    }
    s.connect();
    let steps = 300 + s.rng.below(1_200);
    for _ in 0..steps {
        s.step();
    }
    s.settle()?;
    s.check()
}

#[test]
fn source_down_is_exactly_once_in_hub_order_under_faults() {
    let seeds: u64 = std::env::var("SOURCE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    for seed in 0..seeds {
        if let Err(e) = run(seed) {
            panic!("seed {seed}: {e}");
        }
    }
}

/// Seed 300 found it: frond stored part of a batch and crashed (the
/// record's local sequence now precedes those copies), restarted, saw the
/// hub stream recreated and wrote a record for the new stream with that
/// stale local sequence; after the next crash the scan took the old
/// stream's copies for the new one's and the cursor skipped new messages.
/// The shell now passes the scanned local tail ([`Source::handle_scanned`]).
/// (Since reads are proven against the hub stream's identity and the
/// stream may also be recreated while connected, the schedules changed:
/// seed 251 was the first that found it; since the wake subscription
/// goes before the first check of a connection, seed 196.)
#[test]
fn a_record_after_a_recreation_covers_the_old_copies() {
    let e = run_with(196, true).expect_err("the stale local sequence skips");
    assert!(e.contains("passes hub message"), "{e}");
    run_with(196, false).unwrap();
}

#[test]
#[ignore]
fn source_one_seed() {
    let seed = std::env::var("SEED").unwrap().parse().unwrap();
    if let Err(e) = run(seed) {
        panic!("seed {seed}: {e}");
    }
}
