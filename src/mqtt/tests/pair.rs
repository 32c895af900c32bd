//! A socket-free harness in the style of quinn-proto's `tests/util.rs`:
//! MQTT clients (the `wire::mqtt` codec plus automatic acknowledgements)
//! each coupled with a broker-side [`Session`], and an in-memory stand-in
//! for what the shell does — route publishes to the matching
//! subscriptions, keep retained messages, capture every publish in one
//! log that persistent sessions follow as a stream, save and load
//! session snapshots, publish wills. Time is simulated: nothing sleeps.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::mqtt::props as bridge;

/// A client's half of a connection.
pub(super) struct Client {
    pub(super) version: Version,
    /// Bytes the broker wrote, not yet decoded.
    inbox: Vec<u8>,
    /// Bytes for the broker.
    outbox: Vec<u8>,
    /// Packets received, in order.
    pub(super) received: Vec<Packet>,
    /// Answer PUBLISH/PUBREC/PUBREL as a client library does.
    pub(super) auto_ack: bool,
}

impl Client {
    pub(super) fn send(&mut self, p: &Packet) {
        mqtt::encode(p, self.version, &mut self.outbox).expect("client packet encodes");
    }

    fn receive(&mut self, bytes: &[u8]) {
        self.inbox.extend_from_slice(bytes);
        let mut at = 0;
        while let Some((p, used)) =
            mqtt::decode(&self.inbox[at..], Some(self.version), usize::MAX).expect("broker output")
        {
            at += used;
            if self.auto_ack {
                self.answer(&p);
            }
            self.received.push(p);
        }
        self.inbox.drain(..at);
    }

    fn answer(&mut self, p: &Packet) {
        let ack = |packet_id| Ack {
            packet_id,
            code: 0,
            properties: Properties::default(),
        };
        match p {
            Packet::Publish(p) => match (p.qos, p.packet_id) {
                (QoS::AtLeastOnce, Some(id)) => self.send(&Packet::PubAck(ack(id))),
                (QoS::ExactlyOnce, Some(id)) => self.send(&Packet::PubRec(ack(id))),
                _ => {}
            },
            Packet::PubRec(a) => self.send(&Packet::PubRel(ack(a.packet_id))),
            Packet::PubRel(a) => self.send(&Packet::PubComp(ack(a.packet_id))),
            _ => {}
        }
    }

    /// The PUBLISH packets received, taken.
    pub(super) fn publishes(&mut self) -> Vec<Publish> {
        let mut out = Vec::new();
        for p in std::mem::take(&mut self.received) {
            if let Packet::Publish(p) = p {
                out.push(p);
            }
        }
        out
    }
}

/// One connection: the client, the session, and the shell's state for it.
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) session: Session,
    /// Live subscriptions (NATS filter, granted QoS).
    subs: Vec<(String, u8)>,
    /// The follow index of the log, for a persistent session.
    follow: Option<usize>,
    /// Why the session closed (or the socket dropped: `None` still).
    pub(super) closed: Option<CloseReason>,
    /// The socket is gone: nothing more is exchanged.
    gone: bool,
}

/// A message in the in-memory log (every publish is captured).
struct Logged {
    subject: String,
    payload: Vec<u8>,
    headers: Option<Vec<u8>>,
}

/// The clients, their sessions and the shell stand-in.
pub(super) struct World {
    pub(super) now: Instant,
    pub(super) conns: Vec<Conn>,
    limits: Limits,
    retained: BTreeMap<String, (Vec<u8>, u8)>,
    log: Vec<Logged>,
    /// Saved persistent sessions, by client id.
    pub(super) saved: HashMap<String, StoredSession>,
    /// Every routed publish: (subject, payload), for exactly-once checks.
    pub(super) routed: Vec<(String, Vec<u8>)>,
}

impl World {
    pub(super) fn new() -> World {
        World {
            now: Instant::now(),
            conns: Vec::new(),
            limits: limits(),
            retained: BTreeMap::new(),
            log: Vec::new(),
            saved: HashMap::new(),
            routed: Vec::new(),
        }
    }

    /// Connect a client (CONNECT `c`), run until quiet; returns its index.
    pub(super) fn connect(&mut self, c: Connect) -> usize {
        let mut client = Client {
            version: c.version,
            inbox: Vec::new(),
            outbox: Vec::new(),
            received: Vec::new(),
            auto_ack: true,
        };
        client.send(&Packet::Connect(c));
        self.conns.push(Conn {
            client,
            session: Session::new(self.limits.clone(), self.now),
            subs: Vec::new(),
            follow: None,
            closed: None,
            gone: false,
        });
        self.run();
        self.conns.len() - 1
    }

    /// The client of `i` sends `p`; run until quiet.
    pub(super) fn send(&mut self, i: usize, p: Packet) {
        self.conns[i].client.send(&p);
        self.run();
    }

    /// Subscribe client `i` to `filter` at `qos`.
    pub(super) fn subscribe(&mut self, i: usize, filter: &str, qos: QoS) {
        self.send(i, sub_opts(&[(filter, qos)], 1));
    }

    /// Move the clock on and fire the sessions' timers.
    pub(super) fn advance(&mut self, d: Duration) {
        self.now += d;
        for i in 0..self.conns.len() {
            let c = &mut self.conns[i];
            if !c.gone && c.session.poll_deadline().is_some_and(|t| t <= self.now) {
                c.session.handle_timeout(self.now);
            }
        }
        self.run();
    }

    /// The socket of `i` breaks (no DISCONNECT): the shell's end of a
    /// connection — will published, persistent state saved.
    pub(super) fn drop_socket(&mut self, i: usize) {
        self.end(i);
        self.run();
    }

    /// Exchange bytes and handle events until nothing moves.
    pub(super) fn run(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            for i in 0..self.conns.len() {
                moved |= self.step(i);
            }
            if !moved {
                return;
            }
        }
        panic!("the world did not settle");
    }

    fn step(&mut self, i: usize) -> bool {
        if self.conns[i].gone {
            return false;
        }
        let now = self.now;
        let c = &mut self.conns[i];
        let input = std::mem::take(&mut c.client.outbox);
        let mut moved = !input.is_empty();
        if !input.is_empty() {
            c.session.handle_bytes(&input, now);
        }
        while let Some(ev) = self.conns[i].session.poll_event() {
            moved = true;
            self.handle_event(i, ev);
        }
        moved |= self.pump_log(i);
        let c = &mut self.conns[i];
        if c.session.take_sync() || c.session.take_dirty() {
            let snap = c.session.snapshot();
            self.saved.insert(snap.client_id.clone(), snap);
        }
        let c = &mut self.conns[i];
        let out = c.session.take_output();
        if !out.is_empty() {
            moved = true;
            c.client.receive(&out);
        }
        if c.closed.is_some() {
            self.end(i);
        }
        moved
    }

    fn handle_event(&mut self, i: usize, ev: Event) {
        let s = &mut self.conns[i].session;
        match ev {
            Event::Connected {
                client_id, clean, ..
            } => {
                if clean {
                    self.saved.remove(&client_id);
                }
                let stored = self.saved.get(&client_id).cloned();
                s.restore(stored);
                if s.is_persistent() {
                    self.conns[i].follow = Some(s.follow("log", self.log.len() as u64));
                }
            }
            Event::Publish {
                subject,
                payload,
                qos,
                retain,
                ack,
                props,
            } => {
                let headers = props.as_deref().and_then(bridge::props_to_headers);
                self.route(&subject, &payload, qos, retain, headers);
                if let Some(id) = ack {
                    self.conns[i].session.publish_done(id, Ok(()));
                }
            }
            Event::AckInOrder(id) => s.publish_done(id, Ok(())),
            Event::Subscribe(reqs) => {
                if s.subscribe_done(true) {
                    self.add_subs(i, reqs);
                }
            }
            Event::Unsubscribe(fs) => self.conns[i].subs.retain(|(f, _)| !fs.contains(f)),
            Event::UnsubscribeShared(_) => {}
            Event::Close(why) => self.conns[i].closed = Some(why),
        }
    }

    fn add_subs(&mut self, i: usize, reqs: Vec<SubRequest>) {
        for r in reqs {
            let c = &mut self.conns[i];
            c.subs.retain(|(f, _)| *f != r.filter);
            c.subs.push((r.filter.clone(), r.qos));
            let Some(granted) = r.retained else {
                continue;
            };
            for (subject, (payload, qos)) in &self.retained {
                if crate::subject::matches(&r.filter, subject) {
                    let d = delivery(subject, payload, (*qos).min(granted), None, self.now);
                    c.session.deliver_retained(&d);
                }
            }
        }
    }

    /// The router: live deliveries to connected non-persistent sessions,
    /// capture into the log (which persistent sessions follow).
    fn route(&mut self, subject: &str, payload: &[u8], qos: u8, retain: bool, h: Option<Vec<u8>>) {
        self.routed.push((subject.into(), payload.to_vec()));
        if retain {
            self.retained
                .insert(subject.into(), (payload.to_vec(), qos));
        }
        for c in self
            .conns
            .iter_mut()
            .filter(|c| !c.gone && c.follow.is_none())
        {
            let granted = c
                .subs
                .iter()
                .filter(|(f, _)| crate::subject::matches(f, subject));
            if let Some(sub_qos) = granted.map(|(_, q)| *q).max() {
                let d = delivery(subject, payload, qos.min(sub_qos), h.clone(), self.now);
                c.session.deliver(&d);
            }
        }
        self.log.push(Logged {
            subject: subject.into(),
            payload: payload.to_vec(),
            headers: bridge::stored_headers(h, qos, false),
        });
    }

    /// Feed a persistent session from the log while its window has room.
    fn pump_log(&mut self, i: usize) -> bool {
        let Some(idx) = self.conns[i].follow else {
            return false;
        };
        let mut moved = false;
        let s = &mut self.conns[i].session;
        while s.stream_room() > 0 {
            let Some(seq) = s.stream_next(idx) else { break };
            let at = usize::try_from(seq).ok().and_then(|n| n.checked_sub(1));
            let Some(m) = at.and_then(|n| self.log.get(n)) else {
                break;
            };
            s.deliver_stored_msg(
                idx,
                seq,
                &m.subject,
                m.headers.as_deref(),
                &m.payload,
                Duration::ZERO,
            );
            moved = true;
        }
        moved
    }

    /// The shell's end of connection `i`: the will goes out, a persistent
    /// session is saved (or deleted).
    fn end(&mut self, i: usize) {
        if self.conns[i].gone {
            return;
        }
        self.conns[i].gone = true;
        let s = &mut self.conns[i].session;
        if let Some(w) = s.take_will() {
            let headers = w.props.as_deref().and_then(bridge::props_to_headers);
            self.route(&w.subject, &w.payload, w.qos, w.retain, headers);
        }
        let s = &self.conns[i].session;
        if s.discard_stored() {
            self.saved.remove(s.client_id());
        } else if s.is_persistent() {
            let snap = s.snapshot();
            self.saved.insert(snap.client_id.clone(), snap);
        }
    }
}

fn delivery(subject: &str, payload: &[u8], qos: u8, h: Option<Vec<u8>>, at: Instant) -> Delivery {
    Delivery {
        msg: std::sync::Arc::new(crate::router::Msg {
            subject: subject.into(),
            reply: None,
            headers: h,
            payload: payload.to_vec(),
            publisher: None,
        }),
        qos,
        retain: false,
        shared: false,
        at,
    }
}
