//! A deterministic simulation of the live bridge ([`super::bridge`]) on a
//! real [`Link`] against a simulated hub, thousands of seeded schedules.
//!
//! Hub requesters call exported subjects and local requesters imported
//! ones (the entries overlap, so the hub delivers several copies of one
//! message); responders on both sides answer once, late (after the reply
//! TTL) or never; answers are delayed behind others; the link is cut with
//! what was on the wire lost and comes back (the down buffer is flushed);
//! time passes. Tables are small, so they evict.
//!
//! Invariants, checked per schedule: every request gets at most one
//! answer, and only its own (no answer reaches another requester's
//! inbox); the reply tables stay within their entry and byte bounds; the
//! down buffer sent at reconnect stays within its bound; nothing loops (a
//! hub message never goes back up, a local one never comes back down).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::bridge::*;
use super::link::{Action, Link, LinkParams};
use super::source_sim::Rng;
use crate::config::HubUrl;
use crate::wire::nats::client::MsgOp;

/// A message in flight to frond: from the hub, or a local answer or
/// request (local sid, message).
enum Ev {
    Hub(MsgOp),
    Local(u64, LocalMsg),
}

struct Sim {
    b: Bridge,
    link: Link,
    rng: Rng,
    /// Hub subscriptions of the current connection: (sid, filter).
    subs: Vec<(u64, String)>,
    /// Deliveries to frond (hub side and local side).
    q: VecDeque<Ev>,
    /// Answers each requester got: requester inbox -> payloads.
    answers: HashMap<String, Vec<Vec<u8>>>,
    params: BridgeParams,
    next: u64,
    seed: u64,
    t0: Instant,
    t: u64,
}

fn params(rng: &mut Rng) -> BridgeParams {
    let e = |s: &str, p: &str| Entry {
        subject: s.into(),
        hub_prefix: p.into(),
    };
    let mut p = BridgeParams::new(
        vec![e("svc.>", "truck."), e("svc.diag", "truck.")],
        vec![e("fleet.>", "truck."), e("fleet.q.>", "truck.")],
    );
    p.max_replies = 1 + rng.below(12) as usize;
    p.max_reply_bytes = 200 + rng.below(2_000) as usize;
    p.reply_ttl = Duration::from_millis(500 + rng.below(5_000));
    p.buffer_bytes = rng.below(600) as usize;
    p
}

fn link_params() -> LinkParams {
    LinkParams {
        urls: vec![HubUrl {
            host: "127.0.0.1".into(),
            port: 4222,
            user: None,
            password: None,
            tls: false,
            ws: false,
        }],
        name: "frond sim".into(),
        user: None,
        password: None,
        token: None,
        nkey_seed: None,
        jwt: None,
        tls_configured: false,
        discover: false,
        ping_interval: Duration::from_secs(3600),
        max_pings_out: 2,
        connect_timeout: Duration::from_secs(10),
        retry_min: Duration::from_millis(10),
        retry_max: Duration::from_millis(10),
    }
}

/// `(subject, reply, payload)` of each PUB/HPUB, and `(sid, subject)` of
/// each SUB, in frond's output.
type Pub = (String, Option<String>, Vec<u8>);

fn parse_out(bytes: &[u8]) -> (Vec<Pub>, Vec<(u64, String)>) {
    let (mut pubs, mut subs) = (Vec::new(), Vec::new());
    let mut rest = bytes;
    while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&rest[..i]).into_owned();
        rest = &rest[i + 2..];
        let w: Vec<&str> = line.split(' ').collect();
        match w[0] {
            "SUB" => subs.push((w[w.len() - 1].parse().unwrap_or(0), w[1].to_string())),
            "PUB" | "HPUB" => {
                let total: usize = w[w.len() - 1].parse().unwrap_or(0);
                let hdr: usize = if w[0] == "HPUB" {
                    w[w.len() - 2].parse().unwrap_or(0)
                } else {
                    0
                };
                let reply_at = if w[0] == "HPUB" { 4 } else { 3 };
                let reply = (w.len() > reply_at).then(|| w[2].to_string());
                let payload = rest[hdr..total].to_vec();
                rest = &rest[total + 2..];
                pubs.push((w[1].to_string(), reply, payload));
            }
            _ => {}
        }
    }
    (pubs, subs)
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let params = params(&mut rng);
        let mut e = Rng(seed ^ 0x5eed);
        let entropy = Box::new(move || {
            let mut a = [0u8; 12];
            a[..8].copy_from_slice(&e.next().to_le_bytes());
            a
        });
        let t0 = Instant::now();
        let mut b = Bridge::new(params.clone(), entropy);
        let mut link = Link::new(link_params(), t0, seed);
        b.attach(&mut link).expect("attach");
        Sim {
            b,
            link,
            rng,
            subs: Vec::new(),
            q: VecDeque::new(),
            answers: HashMap::new(),
            params,
            next: 0,
            seed,
            t0,
            t: 0,
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.t)
    }

    fn connect(&mut self) {
        let now = self.now();
        self.link.handle_timeout(now);
        let actions: Vec<Action> = std::iter::from_fn(|| self.link.poll_action()).collect();
        if !actions.iter().any(|a| matches!(a, Action::Dial(_))) {
            return;
        }
        self.link.handle_dialed(now);
        let info = b"INFO {\"server_id\":\"S\",\"max_payload\":300,\"headers\":true}\r\n";
        self.link.handle_bytes(now, info);
        let mut out = Vec::new();
        self.link.poll_transmit(&mut out);
        self.link.handle_bytes(now, b"PONG\r\n");
        assert!(self.link.is_up(), "seed {}: link up", self.seed);
        while self.link.poll_event().is_some() {}
        self.link.poll_transmit(&mut out);
        let (pubs, subs) = parse_out(&out);
        assert!(pubs.is_empty());
        self.subs = subs;
        self.b.handle_up(&mut self.link);
        let mut buf = Vec::new();
        self.link.poll_transmit(&mut buf);
        assert!(
            buf.len() <= self.params.buffer_bytes,
            "seed {}: {} bytes buffered while down, bound {}",
            self.seed,
            buf.len(),
            self.params.buffer_bytes
        );
        self.hub_receive(&buf);
    }

    fn cut(&mut self) {
        let now = self.now();
        // What frond wrote is lost with the connection, and so is what
        // the hub was sending.
        let mut lost = Vec::new();
        self.link.poll_transmit(&mut lost);
        self.link.handle_io_error(now, "cut".into());
        while self.link.poll_event().is_some() {}
        self.q.retain(|e| matches!(e, Ev::Local(..)));
        self.subs.clear();
        self.t += 20;
    }

    /// What frond sent up: answers reach their requester, requests on
    /// imported subjects get a hub responder (answering once, or never).
    fn hub_receive(&mut self, out: &[u8]) {
        let (pubs, _) = parse_out(out);
        for (subject, reply, payload) in pubs {
            let tag = String::from_utf8_lossy(&payload).into_owned();
            assert!(
                !tag.starts_with('H'),
                "seed {}: hub message {tag} sent back up",
                self.seed
            );
            if subject.starts_with("_INBOX.hreq.") {
                self.answers.entry(subject).or_default().push(payload);
            } else if let Some(r) = reply {
                if self.rng.chance(850) {
                    let answer = format!("H-ans-{}", &tag[2..]);
                    self.hub_send(&r, None, answer.into_bytes());
                }
            }
        }
    }

    /// The hub delivers a message to frond, one copy per matching sub.
    fn hub_send(&mut self, subject: &str, reply: Option<&str>, payload: Vec<u8>) {
        for (sid, f) in &self.subs {
            if crate::subject::matches(f, subject) {
                self.q.push_back(Ev::Hub(MsgOp {
                    subject: subject.into(),
                    sid: *sid,
                    reply: reply.map(str::to_string),
                    headers: None,
                    payload: payload.clone(),
                }));
            }
        }
    }

    fn hub_request(&mut self) {
        self.next += 1;
        let n = self.next;
        let subject = [
            "truck.svc.diag",
            "truck.svc.x.y",
            "truck.fleet.q.a",
            "truck.fleet.b",
        ][self.rng.below(4) as usize];
        let reply = self.rng.chance(800).then(|| format!("_INBOX.hreq.{n}"));
        let payload = format!("H-{n}").into_bytes();
        self.hub_send(subject, reply.as_deref(), payload);
    }

    fn local_request(&mut self) {
        self.next += 1;
        let n = self.next;
        let subject = ["fleet.q.a", "fleet.b", "fleet.q.c.d"][self.rng.below(3) as usize];
        let msg = LocalMsg {
            subject: subject.into(),
            reply: self.rng.chance(800).then(|| format!("_INBOX.lreq.{n}")),
            headers: None,
            payload: format!("L-{n}").into_bytes(),
        };
        // The local router delivers one copy per matching import.
        for (sid, f) in self.b.local_subscriptions() {
            if sid != LOCAL_INBOX_SID && crate::subject::matches(&f, subject) {
                self.q.push_back(Ev::Local(sid, msg.clone()));
            }
        }
    }

    /// frond handles one delivery; what it publishes locally is checked
    /// and answered by a local responder (once, or never).
    fn deliver(&mut self) -> bool {
        let Some(ev) = self.q.pop_front() else {
            return false;
        };
        let now = self.now();
        match ev {
            Ev::Hub(m) => {
                let local = self.b.handle_hub_msg(now, m).expect("the bridge's sid");
                if let Some(l) = local {
                    self.local_publish(l);
                }
            }
            Ev::Local(sid, m) => self.b.handle_local(now, &mut self.link, sid, m),
        }
        let mut out = Vec::new();
        self.link.poll_transmit(&mut out);
        self.hub_receive(&out);
        self.check_bounds();
        true
    }

    fn local_publish(&mut self, l: LocalMsg) {
        let tag = String::from_utf8_lossy(&l.payload).into_owned();
        assert!(!tag.starts_with('L'), "seed {}: {tag} came back", self.seed);
        if let Some(rest) = l.subject.strip_prefix("_INBOX.lreq.") {
            assert_eq!(
                tag,
                format!("H-ans-{rest}"),
                "seed {}: wrong answer",
                self.seed
            );
            self.answers.entry(l.subject).or_default().push(l.payload);
        } else if let Some(r) = l.reply {
            if self.rng.chance(850) {
                let answer = LocalMsg {
                    subject: r,
                    reply: None,
                    headers: None,
                    payload: format!("L-ans-{}", &tag[2..]).into_bytes(),
                };
                self.q.push_back(Ev::Local(LOCAL_INBOX_SID, answer));
            }
        }
    }

    fn check_bounds(&self) {
        let st = self.b.status();
        let max = self.params.max_replies;
        assert!(
            st.pending_hub_requests <= max && st.pending_local_requests <= max,
            "seed {}: reply tables over {max} entries: {st:?}",
            self.seed
        );
        // An entry costs at least its two inbox names (> 40 bytes each)
        // and the overhead; one entry may exceed the bound alone.
        for n in [st.pending_hub_requests, st.pending_local_requests] {
            assert!(
                n <= 1 || n * 144 <= self.params.max_reply_bytes,
                "seed {}: {n} entries cannot fit {} bytes",
                self.seed,
                self.params.max_reply_bytes
            );
        }
    }

    fn step(&mut self) {
        match self.rng.below(1000) {
            0..=399 => {
                self.deliver();
            }
            400..=549 => self.hub_request(),
            550..=699 => self.local_request(),
            700..=799 if self.q.len() >= 2 => {
                // Delayed behind what follows it.
                let i = self.rng.below(self.q.len() as u64 - 1) as usize;
                self.q.swap(i, i + 1);
            }
            800..=899 => {
                self.t += 1 + self.rng.below(1_500);
                let now = self.now();
                self.b.handle_tick(now);
            }
            900..=919 if self.link.is_up() => self.cut(),
            900..=979 if !self.link.is_up() => self.connect(),
            _ => {}
        }
    }

    /// Every requester got at most one answer, its own.
    fn check(&self) {
        for (inbox, got) in &self.answers {
            let n = inbox.rsplit('.').next().unwrap_or("");
            assert!(got.len() <= 1, "seed {}: {inbox} got {got:?}", self.seed);
            let want = if inbox.starts_with("_INBOX.hreq.") {
                format!("L-ans-{n}")
            } else {
                format!("H-ans-{n}")
            };
            assert_eq!(got[0], want.as_bytes(), "seed {}: {inbox}", self.seed);
        }
    }
}

fn run(seed: u64) -> usize {
    let mut s = Sim::new(seed);
    s.connect();
    for _ in 0..200 + s.rng.below(800) {
        s.step();
    }
    if !s.link.is_up() {
        s.connect();
    }
    while s.deliver() {}
    s.check();
    s.answers.len()
}

#[test]
fn bridge_routes_each_answer_once_to_its_requester_under_faults() {
    let seeds: u64 = std::env::var("BRIDGE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    let answered: usize = (0..seeds).map(run).sum();
    // The schedules do get answers through (the test can fail).
    assert!(answered as u64 > seeds * 10, "{answered} answers");
}
