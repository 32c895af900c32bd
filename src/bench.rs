//! `frond bench mqtt`: MQTT benchmarks against any broker (frond,
//! Mosquitto, nats-server with MQTT on), built on frond's own codec;
//! `frond bench nats`: publish, fan-out and request/reply against any NATS
//! server ([`NatsBench`]).
//!
//! MQTT modes ([`MqttMode`]):
//! - publish: each publisher is one OS thread with one connection, keeping
//!   up to `inflight` QoS 1 publishes unacknowledged (QoS 0: just writes;
//!   QoS 2: unfinished exchanges, each counted at its PUBCOMP, over a
//!   persistent session (clean session 0, deleted afterwards by a clean
//!   reconnect), as an exactly-once device would use).
//!   The report gives messages per second from the first publish to the
//!   last acknowledgement, across all publishers.
//! - fan-out: `subs` subscribers (QoS 0) on one topic, one QoS 0 publisher
//!   sending `msgs` messages, paced by a PINGREQ round trip every 1,000;
//!   the rate counts deliveries until the last subscriber is done (a
//!   subscriber that sees nothing for 5 s stops; losses are reported).
//! - latency: one publisher, one subscriber at `qos`; the publisher sends
//!   `msgs` messages at a fixed `rate`, each carrying its send time; the
//!   subscriber records publish-to-deliver times (same clock, same
//!   process): p50, p99, max.
//! - idle: `clients` connections (clean session, 60 s keep-alive, each
//!   subscribed at QoS 0 to its own topic) are opened and held; the report gives
//!   the broker's VmRSS (`rss_pid`) before and with them connected.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::wire::mqtt::{self, Connect, Packet, Properties, Publish, QoS, Version};
use crate::wire::nats::client as nc;

/// Benchmark parameters (see `frond --help`).
#[derive(Debug, Clone)]
pub struct MqttBench {
    pub addr: String,
    pub pubs: usize,
    pub msgs: usize,
    pub size: usize,
    pub qos: u8,
    pub inflight: usize,
    pub topic: String,
    pub mode: MqttMode,
    /// Fan-out subscribers.
    pub subs: usize,
    /// Latency mode: messages per second.
    pub rate: u32,
    /// Idle mode: connections to hold.
    pub clients: usize,
    /// Idle mode: the broker's process id, for its VmRSS.
    pub rss_pid: Option<u32>,
}

/// What `frond bench mqtt` measures (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttMode {
    Publish,
    FanOut,
    Latency,
    Idle,
}

impl std::str::FromStr for MqttMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "publish" => Ok(MqttMode::Publish),
            "fanout" => Ok(MqttMode::FanOut),
            "latency" => Ok(MqttMode::Latency),
            "idle" => Ok(MqttMode::Idle),
            other => Err(format!(
                "bench: unknown --mode {other:?}; use publish, fanout, latency or idle"
            )),
        }
    }
}

impl Default for MqttBench {
    fn default() -> Self {
        MqttBench {
            addr: "127.0.0.1:1883".into(),
            pubs: 4,
            msgs: 25_000,
            size: 100,
            qos: 1,
            inflight: 100,
            topic: "bench".into(),
            mode: MqttMode::Publish,
            subs: 4,
            rate: 1000,
            clients: 1000,
            rss_pid: None,
        }
    }
}

impl MqttBench {
    /// Run and return a one-line report.
    pub fn run(&self) -> Result<String, String> {
        match self.mode {
            MqttMode::Publish => self.publish(),
            MqttMode::FanOut => self.fan_out(),
            MqttMode::Latency => self.latency(),
            MqttMode::Idle => self.idle(),
        }
    }

    fn publish(&self) -> Result<String, String> {
        if self.qos > 2 {
            return Err("bench: --qos must be 0, 1 or 2".into());
        }
        if self.inflight == 0 || self.inflight > 65_000 || self.pubs == 0 {
            return Err(
                "bench: --pubs and --inflight must be at least 1 (inflight at most 65000)".into(),
            );
        }
        let start = Instant::now();
        let threads: Vec<_> = (0..self.pubs)
            .map(|i| {
                let b = self.clone();
                std::thread::spawn(move || b.publisher(i))
            })
            .collect();
        let mut total = 0usize;
        for t in threads {
            total += t
                .join()
                .map_err(|_| "bench: a publisher thread panicked".to_string())??;
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(format!(
            "mqtt qos{} {} publishers x {} msgs of {} bytes to {}: {:.0} msgs/s ({:.1} MB/s), {:.2}s",
            self.qos,
            self.pubs,
            self.msgs,
            self.size,
            self.addr,
            total as f64 / secs,
            (total * self.size) as f64 / secs / 1e6,
            secs
        ))
    }

    fn publisher(&self, i: usize) -> Result<usize, String> {
        let mut chunk = vec![0u8; 64 * 1024];
        let (mut s, mut inbuf) = self.publisher_connect(i, &mut chunk)?;
        let mut out = Vec::with_capacity(64 * 1024);
        let payload = vec![b'x'; self.size];
        let topic = format!("{}/{i}", self.topic);
        let (mut sent, mut acked, mut inflight) = (0usize, 0usize, 0usize);
        let mut next_id: u16 = 1;
        while acked < self.msgs {
            out.clear();
            while sent < self.msgs
                && (self.qos == 0 || inflight < self.inflight)
                && out.len() < 60_000
            {
                let packet_id = if self.qos >= 1 {
                    let id = next_id;
                    next_id = if next_id == u16::MAX { 1 } else { next_id + 1 };
                    Some(id)
                } else {
                    None
                };
                let p = Packet::Publish(Publish {
                    dup: false,
                    qos: match self.qos {
                        0 => QoS::AtMostOnce,
                        1 => QoS::AtLeastOnce,
                        _ => QoS::ExactlyOnce,
                    },
                    retain: false,
                    topic: topic.clone(),
                    packet_id,
                    properties: Properties::default(),
                    payload: payload.clone(),
                });
                mqtt::encode(&p, Version::V311, &mut out).map_err(|e| e.to_string())?;
                sent += 1;
                inflight += 1;
            }
            if !out.is_empty() {
                s.write_all(&out)
                    .map_err(|e| format!("bench: write: {e}"))?;
            }
            if self.qos == 0 {
                acked = sent;
                continue;
            }
            read_acks(
                &mut s,
                &mut inbuf,
                &mut chunk,
                &mut out,
                &mut acked,
                &mut inflight,
            )?;
        }
        if self.qos == 0 {
            ping_round_trip(&mut s, &mut out, &mut chunk)?;
        }
        let mut bye = Vec::new();
        let _ = mqtt::encode(
            &Packet::Disconnect(mqtt::Disconnect {
                code: 0,
                properties: Properties::default(),
            }),
            Version::V311,
            &mut bye,
        );
        let _ = s.write_all(&bye);
        if self.qos == 2 {
            // Delete the persistent session: reconnect clean.
            drop(s);
            let mut c = MqttConn::connect(&self.addr, &i.to_string())?;
            let _ = c.send(&Packet::Disconnect(mqtt::Disconnect {
                code: 0,
                properties: Properties::default(),
            }));
        }
        Ok(acked)
    }

    /// Connects publisher `i` (a clean session unless QoS 2) and waits for
    /// its CONNACK; returns the socket and what was read past it.
    fn publisher_connect(
        &self,
        i: usize,
        chunk: &mut [u8],
    ) -> Result<(TcpStream, Vec<u8>), String> {
        let mut s = TcpStream::connect(&self.addr)
            .map_err(|e| format!("bench: cannot connect to {}: {e}", self.addr))?;
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let mut out = Vec::new();
        let connect = Packet::Connect(Connect {
            version: Version::V311,
            clean_start: self.qos < 2,
            keep_alive: 60,
            client_id: format!("frond-bench-{}-{i}", std::process::id()),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        });
        mqtt::encode(&connect, Version::V311, &mut out).map_err(|e| e.to_string())?;
        s.write_all(&out)
            .map_err(|e| format!("bench: write: {e}"))?;
        let mut inbuf: Vec<u8> = Vec::with_capacity(64 * 1024);
        // CONNACK
        loop {
            match mqtt::decode(&inbuf, Some(Version::V311), 1 << 20) {
                Ok(Some((Packet::ConnAck(c), used))) => {
                    if c.code != 0 {
                        return Err(format!(
                            "bench: broker refused CONNECT with code {}",
                            c.code
                        ));
                    }
                    inbuf.drain(..used);
                    break;
                }
                Ok(Some((p, _))) => return Err(format!("bench: expected CONNACK, got {p:?}")),
                Ok(None) => {}
                Err(e) => return Err(format!("bench: bad CONNACK: {e}")),
            }
            let n = s.read(chunk).map_err(|e| format!("bench: read: {e}"))?;
            if n == 0 {
                return Err("bench: broker closed the connection".into());
            }
            inbuf.extend_from_slice(&chunk[..n]);
        }
        Ok((s, inbuf))
    }
}

impl MqttBench {
    fn fan_out(&self) -> Result<String, String> {
        if self.subs == 0 || self.msgs == 0 {
            return Err("bench: --subs and --msgs must be at least 1".into());
        }
        let topic = format!("{}/fan", self.topic);
        let mut subs = Vec::new();
        for i in 0..self.subs {
            let mut c = MqttConn::connect(&self.addr, &format!("fan-sub-{i}"))?;
            c.subscribe(&topic, 0)?;
            subs.push(c);
        }
        let msgs = self.msgs;
        let readers: Vec<_> = subs
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || -> Result<(usize, Instant), String> {
                    c.s.set_read_timeout(Some(Duration::from_secs(5)))
                        .map_err(|e| format!("bench: {e}"))?;
                    let mut got = 0;
                    let mut last = Instant::now();
                    while got < msgs {
                        match c.next_packet() {
                            Ok(Packet::Publish(_)) => {
                                got += 1;
                                last = Instant::now();
                            }
                            Ok(_) => {}
                            Err(_) if got > 0 => break, // idle: the rest was lost
                            Err(e) => return Err(e),
                        }
                    }
                    Ok((got, last))
                })
            })
            .collect();
        let mut p = MqttConn::connect(&self.addr, "fan-pub")?;
        let payload = vec![b'x'; self.size];
        let start = Instant::now();
        for i in 0..msgs {
            p.send(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: topic.clone(),
                packet_id: None,
                properties: Properties::default(),
                payload: payload.clone(),
            }))?;
            if i % 1000 == 999 || i + 1 == msgs {
                p.ping()?;
            }
        }
        let (mut total, mut end) = (0, start);
        for r in readers {
            let (got, last) = r
                .join()
                .map_err(|_| "bench: a subscriber thread panicked".to_string())??;
            total += got;
            end = end.max(last);
        }
        let secs = end.duration_since(start).as_secs_f64().max(1e-6);
        let want = msgs * self.subs;
        Ok(format!(
            "mqtt fan-out: 1 -> {} subscribers, {} msgs of {} bytes to {}: {:.0} deliveries/s, {:.2}s, {} lost",
            self.subs,
            msgs,
            self.size,
            self.addr,
            total as f64 / secs,
            secs,
            want - total
        ))
    }

    fn latency(&self) -> Result<String, String> {
        if self.qos > 1 || self.msgs == 0 || self.rate == 0 {
            return Err("bench: latency needs --qos 0|1, --msgs and --rate at least 1".into());
        }
        let topic = format!("{}/lat", self.topic);
        let mut sub = MqttConn::connect(&self.addr, "lat-sub")?;
        sub.subscribe(&topic, self.qos)?;
        let base = Instant::now();
        let msgs = self.msgs;
        let reader = std::thread::spawn(move || -> Result<Vec<u64>, String> {
            sub.s
                .set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| format!("bench: {e}"))?;
            let mut lat = Vec::with_capacity(msgs);
            while lat.len() < msgs {
                match sub.next_packet() {
                    Ok(Packet::Publish(p)) => {
                        let now = base.elapsed().as_nanos() as u64;
                        let sent = p
                            .payload
                            .get(..8)
                            .and_then(|b| b.try_into().ok())
                            .map_or(now, u64::from_be_bytes);
                        lat.push(now.saturating_sub(sent));
                        if let Some(id) = p.packet_id {
                            sub.send(&Packet::PubAck(mqtt::Ack {
                                packet_id: id,
                                code: 0,
                                properties: Properties::default(),
                            }))?;
                        }
                    }
                    Ok(_) => {}
                    Err(_) if !lat.is_empty() => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(lat)
        });
        let mut p = MqttConn::connect(&self.addr, "lat-pub")?;
        let mut payload = vec![b'x'; self.size.max(8)];
        let interval = Duration::from_secs_f64(1.0 / f64::from(self.rate));
        let start = Instant::now();
        let mut id: u16 = 0;
        for i in 0..msgs {
            let due = start + interval * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let now = base.elapsed().as_nanos() as u64;
            payload[..8].copy_from_slice(&now.to_be_bytes());
            id = if id == u16::MAX { 1 } else { id + 1 };
            p.send(&Packet::Publish(Publish {
                dup: false,
                qos: if self.qos == 1 {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                },
                retain: false,
                topic: topic.clone(),
                packet_id: (self.qos == 1).then_some(id),
                properties: Properties::default(),
                payload: payload.clone(),
            }))?;
            if self.qos == 1 {
                p.drain_acks()?;
            }
        }
        let mut lat = reader
            .join()
            .map_err(|_| "bench: the subscriber thread panicked".to_string())??;
        lat.sort_unstable();
        let pct = |q: f64| {
            let i = ((lat.len() as f64 * q).ceil() as usize).saturating_sub(1);
            lat.get(i).copied().unwrap_or(0) as f64 / 1000.0
        };
        Ok(format!(
            "mqtt latency qos{}: {} msgs of {} bytes at {}/s to {}: p50 {:.0} us, p99 {:.0} us, max {:.0} us, {} lost",
            self.qos,
            msgs,
            self.size.max(8),
            self.rate,
            self.addr,
            pct(0.50),
            pct(0.99),
            pct(1.0),
            msgs - lat.len()
        ))
    }

    fn idle(&self) -> Result<String, String> {
        let pid = self
            .rss_pid
            .ok_or("bench: --mode idle needs --rss-pid (the broker's process id)")?;
        let before = rss_kib(pid)?;
        let mut conns = Vec::with_capacity(self.clients);
        for i in 0..self.clients {
            let mut c = MqttConn::connect(&self.addr, &format!("idle-{i}"))?;
            c.subscribe(&format!("{}/idle/{i}", self.topic), 0)?;
            conns.push(c);
        }
        // Let the broker settle (allocations after the last SUBACK).
        std::thread::sleep(Duration::from_millis(500));
        let after = rss_kib(pid)?;
        drop(conns);
        Ok(format!(
            "mqtt idle: RSS {before} KiB before, {after} KiB with {} clients connected and subscribed ({:.1} MiB; +{} bytes each)",
            self.clients,
            after as f64 / 1024.0,
            after.saturating_sub(before) * 1024 / self.clients.max(1) as u64
        ))
    }
}

/// Reads once from the broker: PUBACK/PUBCOMP count in `acked` and free
/// an `inflight` slot; a PUBREC is answered with PUBREL.
fn read_acks(
    s: &mut TcpStream,
    inbuf: &mut Vec<u8>,
    chunk: &mut [u8],
    out: &mut Vec<u8>,
    acked: &mut usize,
    inflight: &mut usize,
) -> Result<(), String> {
    let n = s.read(chunk).map_err(|e| format!("bench: read: {e}"))?;
    if n == 0 {
        return Err("bench: broker closed the connection".into());
    }
    inbuf.extend_from_slice(&chunk[..n]);
    let mut start = 0;
    out.clear();
    loop {
        match mqtt::decode(&inbuf[start..], Some(Version::V311), 1 << 20) {
            Ok(Some((Packet::PubAck(_) | Packet::PubComp(_), used))) => {
                start += used;
                *acked += 1;
                *inflight -= 1;
            }
            Ok(Some((Packet::PubRec(a), used))) => {
                start += used;
                let rel = Packet::PubRel(mqtt::Ack {
                    packet_id: a.packet_id,
                    ..mqtt::Ack::default()
                });
                mqtt::encode(&rel, Version::V311, out).map_err(|e| e.to_string())?;
            }
            Ok(Some((_, used))) => start += used,
            Ok(None) => break,
            Err(e) => return Err(format!("bench: bad packet from broker: {e}")),
        }
    }
    inbuf.drain(..start);
    if !out.is_empty() {
        s.write_all(out).map_err(|e| format!("bench: write: {e}"))?;
    }
    Ok(())
}

/// QoS 0: a PINGREQ round trip, so the broker has read everything.
fn ping_round_trip(s: &mut TcpStream, out: &mut Vec<u8>, chunk: &mut [u8]) -> Result<(), String> {
    out.clear();
    mqtt::encode(&Packet::PingReq, Version::V311, out).map_err(|e| e.to_string())?;
    s.write_all(out).map_err(|e| format!("bench: write: {e}"))?;
    loop {
        let n = s.read(chunk).map_err(|e| format!("bench: read: {e}"))?;
        if n == 0 || chunk[..n].contains(&0xD0) {
            break;
        }
    }
    Ok(())
}

/// A bench client socket: no Nagle delay, reads give up after 30 s.
fn dial(addr: &str) -> Result<TcpStream, String> {
    let s =
        TcpStream::connect(addr).map_err(|e| format!("bench: cannot connect to {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    Ok(s)
}

/// One blocking MQTT 3.1.1 client connection (bench helper).
struct MqttConn {
    s: TcpStream,
    /// Received bytes; `inbuf[pos..]` is not decoded yet. Consumed bytes
    /// are dropped once per read, not once per packet (which made
    /// decoding a 64 KiB read quadratic: the more deliveries a broker
    /// wrote at once, the slower this client read them).
    inbuf: Vec<u8>,
    pos: usize,
    chunk: Vec<u8>,
    out: Vec<u8>,
    next_id: u16,
}

impl MqttConn {
    fn connect(addr: &str, name: &str) -> Result<MqttConn, String> {
        let s = dial(addr)?;
        let mut c = MqttConn {
            s,
            inbuf: Vec::new(),
            pos: 0,
            chunk: vec![0u8; 64 * 1024],
            out: Vec::new(),
            next_id: 1,
        };
        c.send(&Packet::Connect(Connect {
            version: Version::V311,
            clean_start: true,
            keep_alive: 60,
            client_id: format!("frond-bench-{}-{name}", std::process::id()),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }))?;
        match c.next_packet()? {
            Packet::ConnAck(a) if a.code == 0 => Ok(c),
            Packet::ConnAck(a) => Err(format!(
                "bench: broker refused CONNECT with code {}",
                a.code
            )),
            p => Err(format!("bench: expected CONNACK, got {}", p.name())),
        }
    }

    fn send(&mut self, p: &Packet) -> Result<(), String> {
        self.out.clear();
        mqtt::encode(p, Version::V311, &mut self.out).map_err(|e| e.to_string())?;
        self.s
            .write_all(&self.out)
            .map_err(|e| format!("bench: write: {e}"))
    }

    fn next_packet(&mut self) -> Result<Packet, String> {
        loop {
            let undecoded = self.inbuf.get(self.pos..).unwrap_or_default();
            match mqtt::decode(undecoded, Some(Version::V311), 1 << 28) {
                Ok(Some((p, used))) => {
                    self.pos += used;
                    return Ok(p);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("bench: bad packet from broker: {e}")),
            }
            let n = self
                .s
                .read(&mut self.chunk)
                .map_err(|e| format!("bench: read: {e}"))?;
            if n == 0 {
                return Err("bench: broker closed the connection".into());
            }
            self.inbuf.drain(..self.pos.min(self.inbuf.len()));
            self.pos = 0;
            self.inbuf
                .extend_from_slice(self.chunk.get(..n).unwrap_or_default());
        }
    }

    fn subscribe(&mut self, filter: &str, qos: u8) -> Result<(), String> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&Packet::Subscribe(mqtt::Subscribe {
            packet_id: id,
            filters: vec![(
                filter.to_string(),
                mqtt::SubscriptionOptions {
                    qos: if qos == 1 {
                        QoS::AtLeastOnce
                    } else {
                        QoS::AtMostOnce
                    },
                    ..mqtt::SubscriptionOptions::default()
                },
            )],
            properties: Properties::default(),
        }))?;
        loop {
            if let Packet::SubAck(a) = self.next_packet()? {
                return match a.codes.first() {
                    Some(c) if *c < 0x80 => Ok(()),
                    _ => Err(format!("bench: SUBSCRIBE {filter} refused: {:?}", a.codes)),
                };
            }
        }
    }

    /// PINGREQ and wait for the PINGRESP (the broker read what came before).
    fn ping(&mut self) -> Result<(), String> {
        self.send(&Packet::PingReq)?;
        loop {
            if let Packet::PingResp = self.next_packet()? {
                return Ok(());
            }
        }
    }

    /// Read and drop whatever acknowledgements have arrived, without
    /// blocking.
    fn drain_acks(&mut self) -> Result<(), String> {
        self.s
            .set_nonblocking(true)
            .map_err(|e| format!("bench: {e}"))?;
        let r = loop {
            match self.s.read(&mut self.chunk) {
                Ok(0) => break Err("bench: broker closed the connection".to_string()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) => break Err(format!("bench: read: {e}")),
            }
        };
        self.s
            .set_nonblocking(false)
            .map_err(|e| format!("bench: {e}"))?;
        r
    }
}

// ---------------------------------------------------------------------------
// NATS

/// `frond bench nats`: publish rate, 1 -> N fan-out rate and request/reply
/// round trips against any NATS server (frond or nats-server), on frond's
/// own NATS client codec ([`crate::wire::nats::client`]) and OS threads.
///
/// - publish: `pubs` connections each publish `msgs` messages of `size`
///   bytes to `bench.pub.<i>` (nobody subscribes), then a PING; the clock
///   stops at the last PONG, when the server has processed everything;
/// - fan-out: `subs` connections subscribe to `bench.fan`, one connection
///   publishes `msgs` messages; the clock stops when every subscriber has
///   all of them; the rate counts deliveries;
/// - request/reply: one responder, one requester sending `reqs` requests
///   one at a time; the rate is round trips per second;
/// - with `subscriptions` > 0 and `rss_pid`, also: the server's resident
///   memory (VmRSS of that pid) before and after one connection makes that
///   many subscriptions to distinct subjects.
#[derive(Debug, Clone)]
pub struct NatsBench {
    pub addr: String,
    pub pubs: usize,
    pub subs: usize,
    pub msgs: usize,
    pub size: usize,
    pub reqs: usize,
    pub subscriptions: usize,
    pub rss_pid: Option<u32>,
    /// JetStream mode: only publish `msgs` messages with reply inboxes on
    /// `js_subjects` subjects `bench.device.NNN`, at most `window` awaiting
    /// their PubAck (works against nats-server JetStream and frond).
    pub js: bool,
    pub window: usize,
    pub js_subjects: usize,
    /// Run only this part: `publish`, `fanout` or `request` (all if None).
    pub only: Option<String>,
}

impl Default for NatsBench {
    fn default() -> Self {
        NatsBench {
            addr: "127.0.0.1:4222".into(),
            pubs: 4,
            subs: 4,
            msgs: 100_000,
            size: 100,
            reqs: 10_000,
            subscriptions: 0,
            rss_pid: None,
            js: false,
            window: 1000,
            js_subjects: 100,
            only: None,
        }
    }
}

/// One blocking client connection.
struct NatsConn {
    s: TcpStream,
    /// Received bytes; `inbuf[pos..]` is not parsed yet. Consumed bytes
    /// are dropped once per read, not once per op (which would make
    /// parsing a big read quadratic and the client the bottleneck).
    inbuf: Vec<u8>,
    pos: usize,
    chunk: Vec<u8>,
    out: Vec<u8>,
    max_payload: usize,
}

impl NatsConn {
    fn connect(addr: &str, name: &str) -> Result<NatsConn, String> {
        let s = dial(addr)?;
        let mut c = NatsConn {
            s,
            inbuf: Vec::with_capacity(256 * 1024),
            pos: 0,
            chunk: vec![0u8; 256 * 1024],
            out: Vec::with_capacity(256 * 1024),
            max_payload: 1 << 20,
        };
        match c.next_op()? {
            nc::ServerOp::Info(json) => {
                let info = nc::ServerInfo::parse(&json).map_err(|e| format!("bench: {e}"))?;
                if info.max_payload > 0 {
                    c.max_payload = info.max_payload;
                }
            }
            op => return Err(format!("bench: expected INFO, got {op:?}")),
        }
        nc::connect(
            &nc::ConnectOptions {
                name: name.to_string(),
                ..Default::default()
            },
            &mut c.out,
        );
        c.round_trip()?;
        Ok(c)
    }

    fn flush(&mut self) -> Result<(), String> {
        if !self.out.is_empty() {
            self.s
                .write_all(&self.out)
                .map_err(|e| format!("bench: write: {e}"))?;
            self.out.clear();
        }
        Ok(())
    }

    /// The next op other than PING (answered) and +OK.
    fn next_op(&mut self) -> Result<nc::ServerOp, String> {
        loop {
            if let Some(op) = self.buffered_op()? {
                return Ok(op);
            }
            let n = self
                .s
                .read(&mut self.chunk)
                .map_err(|e| format!("bench: read: {e}"))?;
            if n == 0 {
                return Err("bench: the server closed the connection (slow consumer?)".into());
            }
            self.inbuf.drain(..self.pos.min(self.inbuf.len()));
            self.pos = 0;
            self.inbuf
                .extend_from_slice(self.chunk.get(..n).unwrap_or_default());
        }
    }

    /// The next op already received, if any (no read); PINGs are answered
    /// and +OKs skipped on the way.
    fn buffered_op(&mut self) -> Result<Option<nc::ServerOp>, String> {
        loop {
            let unparsed = self.inbuf.get(self.pos..).unwrap_or_default();
            match nc::parse_server_op(unparsed, self.max_payload + nc::PAYLOAD_SLACK) {
                Ok(Some((op, used))) => {
                    self.pos += used;
                    match op {
                        nc::ServerOp::Ping => {
                            nc::pong(&mut self.out);
                            self.flush()?;
                        }
                        nc::ServerOp::Ok => {}
                        nc::ServerOp::Err(e) => return Err(format!("bench: server said -ERR {e}")),
                        op => return Ok(Some(op)),
                    }
                }
                Ok(None) => return Ok(None),
                Err(e) => return Err(format!("bench: {e}")),
            }
        }
    }

    /// Send what is buffered plus a PING and wait for the PONG; messages
    /// arriving meanwhile are counted and returned.
    fn round_trip(&mut self) -> Result<usize, String> {
        nc::ping(&mut self.out);
        self.flush()?;
        let mut msgs = 0;
        loop {
            match self.next_op()? {
                nc::ServerOp::Pong => return Ok(msgs),
                nc::ServerOp::Msg(_) => msgs += 1,
                _ => {}
            }
        }
    }
}

fn encode_err(e: crate::wire::nats::EncodeError) -> String {
    format!("bench: {e}")
}

impl NatsBench {
    /// Run every benchmark; one report line each.
    pub fn run(&self) -> Result<String, String> {
        if self.js {
            return self.js_publish();
        }
        if self.pubs == 0 || self.subs == 0 || self.msgs == 0 || self.reqs == 0 {
            return Err("bench: --pubs, --subs, --msgs and --reqs must be at least 1".into());
        }
        // Memory first, on the server as it started: the rate parts leave
        // each server's allocator holding its high-water mark.
        let mut lines = Vec::new();
        if self.subscriptions > 0 {
            lines.push(self.subscription_memory()?);
        }
        match self.only.as_deref() {
            None => lines.extend([self.publish()?, self.fan_out()?, self.request_reply()?]),
            Some("publish") => lines.push(self.publish()?),
            Some("fanout") => lines.push(self.fan_out()?),
            Some("request") => lines.push(self.request_reply()?),
            Some(other) => {
                return Err(format!(
                    "bench: --only {other:?}: say publish, fanout or request"
                ))
            }
        }
        Ok(lines.join("\n"))
    }

    /// JetStream publishes with PubAcks, windowed, on one connection.
    fn js_publish(&self) -> Result<String, String> {
        if self.msgs == 0 || self.window == 0 || self.js_subjects == 0 {
            return Err("bench: --msgs, --window and --js-subjects must be at least 1".into());
        }
        let payload = vec![b'x'; self.size];
        let subjects: Vec<String> = (0..self.js_subjects)
            .map(|i| format!("bench.device.{i:03}"))
            .collect();
        let mut c = NatsConn::connect(&self.addr, "bench-js")?;
        let inbox = format!("_INBOX.bench{}", std::process::id());
        nc::subscribe(&format!("{inbox}.*"), None, 1, &mut c.out).map_err(encode_err)?;
        c.round_trip()?;
        let (mut sent, mut acked, mut errors) = (0usize, 0usize, 0usize);
        let mut first_error = None;
        let start = Instant::now();
        while acked < self.msgs {
            while sent < self.msgs && sent - acked < self.window {
                let subject = &subjects[sent % subjects.len()];
                let reply = format!("{inbox}.{sent}");
                nc::publish(subject, Some(&reply), &payload, &mut c.out).map_err(encode_err)?;
                sent += 1;
                if c.out.len() >= 64 * 1024 {
                    c.flush()?;
                }
            }
            c.flush()?;
            // Every PubAck already received, then refill the window with
            // one write (as asynchronous clients coalesce their writes).
            let mut op = Some(c.next_op()?);
            while let Some(o) = op {
                if let nc::ServerOp::Msg(m) = o {
                    acked += 1;
                    let body = String::from_utf8_lossy(&m.payload);
                    if body.contains("\"error\"") || !body.contains("\"seq\"") {
                        errors += 1;
                        first_error.get_or_insert_with(|| body.into_owned());
                    }
                }
                op = c.buffered_op()?;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        if let Some(e) = first_error {
            return Err(format!(
                "bench: {errors} of {} publishes refused, e.g. {e}",
                self.msgs
            ));
        }
        Ok(format!(
            "js publish: {} msgs of {} bytes on {} subjects, window {}: {:.0} msgs/s, {:.3}s",
            self.msgs,
            self.size,
            subjects.len(),
            self.window,
            self.msgs as f64 / secs,
            secs
        ))
    }

    fn publish(&self) -> Result<String, String> {
        let payload = vec![b'x'; self.size];
        let mut conns = (0..self.pubs)
            .map(|i| NatsConn::connect(&self.addr, &format!("bench-pub-{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let start = Instant::now();
        let threads: Vec<_> = conns
            .drain(..)
            .enumerate()
            .map(|(i, mut c)| {
                let (payload, msgs) = (payload.clone(), self.msgs);
                std::thread::spawn(move || -> Result<(), String> {
                    let subject = format!("bench.pub.{i}");
                    for _ in 0..msgs {
                        nc::publish(&subject, None, &payload, &mut c.out).map_err(encode_err)?;
                        if c.out.len() >= 64 * 1024 {
                            c.flush()?;
                        }
                    }
                    c.round_trip().map(|_| ())
                })
            })
            .collect();
        for t in threads {
            t.join()
                .map_err(|_| "bench: a publisher thread panicked".to_string())??;
        }
        let secs = start.elapsed().as_secs_f64();
        let total = self.pubs * self.msgs;
        Ok(format!(
            "nats publish: {} publishers x {} msgs of {} bytes: {:.0} msgs/s ({:.1} MB/s), {:.2}s",
            self.pubs,
            self.msgs,
            self.size,
            total as f64 / secs,
            (total * self.size) as f64 / secs / 1e6,
            secs
        ))
    }

    fn fan_out(&self) -> Result<String, String> {
        let mut subs = Vec::new();
        for i in 0..self.subs {
            let mut c = NatsConn::connect(&self.addr, &format!("bench-sub-{i}"))?;
            nc::subscribe("bench.fan", None, 1, &mut c.out).map_err(encode_err)?;
            c.round_trip()?;
            subs.push(c);
        }
        let msgs = self.msgs;
        let readers: Vec<_> = subs
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || -> Result<(), String> {
                    let mut got = 0;
                    while got < msgs {
                        if let nc::ServerOp::Msg(_) = c.next_op()? {
                            got += 1;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        let mut p = NatsConn::connect(&self.addr, "bench-fan-pub")?;
        let payload = vec![b'x'; self.size];
        let start = Instant::now();
        for i in 0..msgs {
            nc::publish("bench.fan", None, &payload, &mut p.out).map_err(encode_err)?;
            // Pace the publisher by a round trip now and then, so neither
            // server queues nor subscribers are simply overrun.
            if i % 1000 == 999 {
                p.round_trip()?;
            }
        }
        p.round_trip()?;
        for r in readers {
            r.join()
                .map_err(|_| "bench: a subscriber thread panicked".to_string())??;
        }
        let secs = start.elapsed().as_secs_f64();
        let total = msgs * self.subs;
        Ok(format!(
            "nats fan-out: 1 -> {} subscribers, {} msgs of {} bytes: {:.0} deliveries/s, {:.2}s",
            self.subs,
            msgs,
            self.size,
            total as f64 / secs,
            secs
        ))
    }

    fn request_reply(&self) -> Result<String, String> {
        let mut responder = NatsConn::connect(&self.addr, "bench-responder")?;
        nc::subscribe("bench.req", None, 1, &mut responder.out).map_err(encode_err)?;
        responder.round_trip()?;
        let reqs = self.reqs;
        let resp = std::thread::spawn(move || -> Result<(), String> {
            let mut done = 0;
            while done < reqs {
                if let nc::ServerOp::Msg(m) = responder.next_op()? {
                    if let Some(r) = &m.reply {
                        nc::publish(r, None, &m.payload, &mut responder.out).map_err(encode_err)?;
                        responder.flush()?;
                    }
                    done += 1;
                }
            }
            Ok(())
        });
        let mut c = NatsConn::connect(&self.addr, "bench-requester")?;
        nc::subscribe("_INBOX.bench.*", None, 1, &mut c.out).map_err(encode_err)?;
        c.round_trip()?;
        let payload = vec![b'x'; self.size];
        let start = Instant::now();
        for i in 0..reqs {
            let reply = format!("_INBOX.bench.{i}");
            nc::publish("bench.req", Some(&reply), &payload, &mut c.out).map_err(encode_err)?;
            c.flush()?;
            loop {
                if let nc::ServerOp::Msg(m) = c.next_op()? {
                    if m.subject == reply {
                        break;
                    }
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        resp.join()
            .map_err(|_| "bench: the responder thread panicked".to_string())??;
        Ok(format!(
            "nats request/reply: {reqs} requests of {} bytes: {:.0} round trips/s ({:.0} us each), {:.2}s",
            self.size,
            reqs as f64 / secs,
            secs * 1e6 / reqs as f64,
            secs
        ))
    }

    fn subscription_memory(&self) -> Result<String, String> {
        let pid = self
            .rss_pid
            .ok_or("bench: --subscriptions needs --rss-pid (the server's process id)")?;
        let before = rss_kib(pid)?;
        let mut c = NatsConn::connect(&self.addr, "bench-subscriptions")?;
        for i in 0..self.subscriptions {
            nc::subscribe(&format!("bench.subs.{i}.x"), None, i as u64 + 1, &mut c.out)
                .map_err(encode_err)?;
            if c.out.len() >= 64 * 1024 {
                c.flush()?;
            }
        }
        c.round_trip()?;
        let after = rss_kib(pid)?;
        Ok(format!(
            "nats subscriptions: RSS {before} KiB before, {after} KiB with {} subscriptions (+{} bytes each)",
            self.subscriptions,
            after.saturating_sub(before) * 1024 / self.subscriptions as u64
        ))
    }
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("bench: cannot read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("bench: no VmRSS in /proc/{pid}/status"))
}
