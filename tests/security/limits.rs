//! Security tests: limits (see tests/security.rs for the cast).
//!
//! Findings 7 (a subscriber that stops reading), 8 (retained messages
//! without a cap, all loaded at start) and 11 (descriptors taken by idle
//! HTTP sockets). The clients are raw MQTT clients on frond's own codec
//! (`frond::wire::mqtt`), which can stop reading at will and show the
//! exact reason code of an acknowledgement, and plain TCP sockets.

#[allow(unused_imports)]
use super::*;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use frond::wire::mqtt::{
    self, Connect, Packet, Properties, Publish, QoS, Subscribe, SubscriptionOptions, Version,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(20);

/// A raw MQTT client logged in as a user of the cast.
struct Mq {
    sock: TcpStream,
    buf: Vec<u8>,
    v: Version,
    /// Packets received while waiting for something else.
    early: std::collections::VecDeque<Packet>,
}

impl Mq {
    async fn connect(port: u16, v: Version, id: &str, user: &str) -> Mq {
        let sock = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("{id}: cannot connect: {e}"));
        let mut c = Mq {
            sock,
            buf: Vec::new(),
            v,
            early: Default::default(),
        };
        c.send(&Packet::Connect(Connect {
            version: v,
            clean_start: true,
            keep_alive: 0,
            client_id: id.into(),
            will: None,
            username: Some(user.into()),
            password: Some(password(user).into_bytes()),
            properties: Properties::default(),
        }))
        .await;
        match c.recv().await {
            Packet::ConnAck(a) if a.code == 0 => c,
            other => panic!("{id}: expected CONNACK 0, got {other:?}"),
        }
    }

    async fn send(&mut self, p: &Packet) {
        let mut out = Vec::new();
        mqtt::encode(p, self.v, &mut out).expect("encode");
        self.sock.write_all(&out).await.expect("write to frond");
    }

    /// The next packet; panics after [`T`] or when frond closes.
    async fn recv(&mut self) -> Packet {
        if let Some(p) = self.early.pop_front() {
            return p;
        }
        tokio::time::timeout(T, async {
            loop {
                match mqtt::decode(&self.buf, Some(self.v), usize::MAX) {
                    Ok(Some((p, used))) => {
                        self.buf.drain(..used);
                        return p;
                    }
                    Ok(None) => {}
                    Err(e) => panic!("undecodable packet from frond: {e}"),
                }
                let mut chunk = vec![0u8; 64 * 1024];
                let n = self.sock.read(&mut chunk).await.expect("read from frond");
                assert!(n > 0, "frond closed the connection");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("a packet from frond in time")
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                filter.into(),
                SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            )],
            properties: Properties::default(),
        }))
        .await;
        match self.recv().await {
            Packet::SubAck(a) => assert!(a.codes.iter().all(|c| *c < 0x80), "{a:?}"),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool, id: u16) {
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic: topic.into(),
            packet_id: (qos != QoS::AtMostOnce).then_some(id),
            properties: Properties::default(),
            payload: payload.to_vec(),
        }))
        .await;
    }

    /// Publish at QoS 1 and return the PUBACK's reason code (0 in 3.1.1).
    async fn publish_acked(&mut self, topic: &str, payload: &[u8], retain: bool, id: u16) -> u8 {
        self.publish(topic, payload, QoS::AtLeastOnce, retain, id)
            .await;
        let mut early = std::collections::VecDeque::new();
        let code = loop {
            match self.recv().await {
                Packet::PubAck(a) if a.packet_id == id => break a.code,
                p @ Packet::Publish(_) => early.push_back(p),
                other => panic!("expected PUBACK {id}, got {other:?}"),
            }
        };
        self.early.extend(early);
        code
    }

    /// PINGREQ and wait for the PINGRESP: frond has handled every packet
    /// sent before it.
    async fn sync(&mut self) {
        self.send(&Packet::PingReq).await;
        loop {
            if let Packet::PingResp = self.recv().await {
                return;
            }
        }
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Open descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
}

/// Finding 7: `max_queued` counted messages, so a subscriber that stops
/// reading could hold up to 10,000 large messages in frond's memory. With
/// `max_queued_bytes`, its queue (router channel and session queue
/// together) stays within the limit: frond's RSS stays within a bound
/// derived from it while 100 MiB are published to it, the drops show in
/// /varz, and a subscriber that reads still gets the messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_costs_at_most_max_queued_bytes() {
    const LIMIT_KIB: u64 = 1024;
    const MSGS: usize = 400;
    const SIZE: usize = 256 * 1024;
    let f = setup_with("", "max_queued_bytes = \"1MiB\"\n").await;
    let pid = f.pid().expect("frond runs");
    let v = Version::V311;
    // Subscribes, then never reads again (its socket buffers fill, then
    // frond's queue for it).
    let mut stuck = Mq::connect(f.mqtt_port, v, "stuck", "admin").await;
    stuck.subscribe("x/big", QoS::AtMostOnce).await;
    // Reads everything, counting, until the end marker.
    let mut reader = Mq::connect(f.mqtt_port, v, "reader", "admin").await;
    reader.subscribe("x/big", QoS::AtMostOnce).await;
    let (got, ended) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let (g, e) = (got.clone(), ended.clone());
    let reading = tokio::spawn(async move {
        loop {
            if let Packet::Publish(p) = reader.recv().await {
                if p.payload == b"end" {
                    e.store(true, Ordering::SeqCst);
                    return;
                }
                g.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let mut publisher = Mq::connect(f.mqtt_port, v, "pub", "admin").await;
    publisher.sync().await;
    let base = rss_kib(pid);
    // Sample frond's RSS while it works.
    let (peak, stop) = (
        Arc::new(AtomicU64::new(base)),
        Arc::new(AtomicBool::new(false)),
    );
    let (pk, st) = (peak.clone(), stop.clone());
    let sampler = tokio::spawn(async move {
        while !st.load(Ordering::SeqCst) {
            pk.fetch_max(rss_kib(pid), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let payload = vec![0x5a; SIZE];
    for _ in 0..MSGS {
        publisher
            .publish("x/big", &payload, QoS::AtMostOnce, false, 0)
            .await;
    }
    publisher.sync().await;
    publisher
        .publish("x/big", b"end", QoS::AtMostOnce, false, 0)
        .await;
    wait_until("the reading subscriber gets the end marker", LONG, || {
        let e = ended.clone();
        async move { e.load(Ordering::SeqCst) }
    })
    .await;
    peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.await;
    let _ = reading.await;
    let peak = peak.load(Ordering::SeqCst);
    // The stuck subscriber's queue (LIMIT), the reader's (LIMIT), each
    // connection's write buffer and read buffer (a few 256 KiB messages),
    // and the allocator's slack. Without the byte limit the stuck queue
    // alone holds the whole 100 MiB.
    let bound = base + 4 * LIMIT_KIB + 16 * 1024;
    eprintln!("frond RSS: {base} KiB before, peak {peak} KiB, bound {bound} KiB");
    assert!(
        peak <= bound,
        "frond's RSS rose from {base} KiB to {peak} KiB (bound {bound} KiB) with one subscriber not reading"
    );
    let varz = f.varz().await.expect("/varz");
    let dropped = varz["mqtt"]["dropped_slow"].as_u64().unwrap_or(0);
    assert!(
        dropped > 0,
        "drops for the stuck subscriber are counted: {varz}"
    );
    assert!(
        got.load(Ordering::SeqCst) > 0,
        "the reading subscriber got messages"
    );
    drop(stuck);
}

/// Finding 8: retained messages had no cap and were all loaded into
/// memory at start. Past `mqtt.max_retained_bytes` or `mqtt.max_retained`
/// a retained publish is refused: MQTT 5 QoS 1 with PUBACK 0x97 (not
/// routed), MQTT 3.1.1 acknowledged and routed but not retained. After a
/// restart, RSS does not grow with the ~33 MB retained, and a new
/// subscription gets exactly the stored ones, intact, read from disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_capped_and_read_from_disk_after_a_restart() {
    const BIG: usize = 1_000_000;
    // 33 records of ~1,000,019 bytes fit in 32 MiB, a 34th does not; 35
    // messages at most.
    let mut f = setup_with("", "max_retained = 35\nmax_retained_bytes = \"32MiB\"\n").await;
    let base = rss_kib(f.pid().expect("frond runs"));
    let mut watch = Mq::connect(f.mqtt_port, Version::V5, "watch", "admin").await;
    watch.subscribe("r/s/#", QoS::AtMostOnce).await;
    let mut p5 = Mq::connect(f.mqtt_port, Version::V5, "p5", "admin").await;
    for i in 0..33u16 {
        let code = p5
            .publish_acked(&format!("r/big/{i}"), &vec![i as u8; BIG], true, i + 1)
            .await;
        assert_eq!(code, 0, "retained r/big/{i} accepted");
    }
    let code = p5
        .publish_acked("r/big/33", &vec![33u8; BIG], true, 34)
        .await;
    assert_eq!(code, 0x97, "over max_retained_bytes: PUBACK quota exceeded");
    let mut p3 = Mq::connect(f.mqtt_port, Version::V311, "p3", "admin").await;
    for (i, t) in ["r/s/0", "r/s/1", "r/s/2"].iter().enumerate() {
        // 3.1.1 has no negative PUBACK: r/s/2 (over max_retained) is
        // acknowledged and routed, just not retained.
        p3.publish_acked(t, t.as_bytes(), true, i as u16 + 1).await;
    }
    let mut live = Vec::new();
    while live.len() < 3 {
        if let Packet::Publish(p) = watch.recv().await {
            live.push(p.topic);
        }
    }
    assert_eq!(live, ["r/s/0", "r/s/1", "r/s/2"], "routed live, also r/s/2");
    let varz = f.varz().await.expect("/varz");
    assert_eq!(varz["mqtt"]["retained_refused"].as_u64(), Some(2), "{varz}");
    drop((watch, p5, p3));

    f.terminate();
    f.start().await;
    let after = rss_kib(f.pid().expect("frond runs"));
    eprintln!("frond RSS: {base} KiB at first start, {after} KiB after the restart");
    assert!(
        after < base + 16 * 1024,
        "RSS after a restart with ~33 MB retained: {after} KiB (a fresh start: {base} KiB)"
    );
    let mut late = Mq::connect(f.mqtt_port, Version::V5, "late", "admin").await;
    late.subscribe("r/#", QoS::AtMostOnce).await;
    let mut p5 = Mq::connect(f.mqtt_port, Version::V5, "p5", "admin").await;
    let mut retained = std::collections::BTreeMap::new();
    while retained.len() < 35 {
        match late.recv().await {
            Packet::Publish(p) => {
                assert!(p.retain, "{} arrives as a retained message", p.topic);
                assert!(
                    retained.insert(p.topic.clone(), p.payload).is_none(),
                    "{} twice",
                    p.topic
                );
            }
            other => panic!("expected retained PUBLISH, got {other:?}"),
        }
    }
    // Nothing else is retained: the next message is a live marker.
    p5.publish("r/marker", b"m", QoS::AtMostOnce, false, 0)
        .await;
    match late.recv().await {
        Packet::Publish(p) => assert_eq!((p.topic.as_str(), p.retain), ("r/marker", false)),
        other => panic!("expected the marker, got {other:?}"),
    }
    for i in 0..33u8 {
        let p = retained
            .get(&format!("r/big/{i}"))
            .unwrap_or_else(|| panic!("r/big/{i} retained"));
        assert!(
            p.len() == BIG && p.iter().all(|b| *b == i),
            "r/big/{i} intact"
        );
    }
    assert_eq!(
        retained.get("r/s/0").map(Vec::as_slice),
        Some(&b"r/s/0"[..])
    );
    assert_eq!(
        retained.get("r/s/1").map(Vec::as_slice),
        Some(&b"r/s/1"[..])
    );
    assert!(!retained.contains_key("r/big/33") && !retained.contains_key("r/s/2"));
}

/// Finding 11: the HTTP port accepted every socket, so idle ones could
/// take all of frond's descriptors before any login and lock MQTT out
/// (`accept: EMFILE`) and fail stream writes. With `http.max_connections
/// = 16` and the descriptor limit lowered to what frond uses plus room
/// for those 16 and a few more, 66 idle HTTP sockets leave MQTT working
/// (connect, subscribe, a QoS 1 publish stored in stream A), and
/// `/healthz` answers once they are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http_sockets_cannot_take_the_descriptors() {
    const HTTP_MAX: usize = 16;
    let mut f = setup().await;
    // The harness writes one [http] table; add the limit to it. The
    // idle sockets are held for as long as a test runs.
    f.terminate();
    let cfg = std::fs::read_to_string(f.config_path()).expect("read config");
    let cfg = cfg.replacen(
        "[http]\n",
        &format!("[http]\nmax_connections = {HTTP_MAX}\nheader_timeout = \"60s\"\n"),
        1,
    );
    std::fs::write(f.config_path(), cfg).expect("write config");
    f.start().await;
    let pid = f.pid().expect("frond runs");
    assert!(f.http_get("/healthz").await.is_some_and(|(c, _)| c == 200));
    let base = open_fds(pid);
    let limit = base + HTTP_MAX + 24;
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit --nofile={limit} failed");

    let mut idle = Vec::new();
    for _ in 0..HTTP_MAX + 50 {
        idle.push(
            TcpStream::connect(("127.0.0.1", f.http_port))
                .await
                .expect("connect to the HTTP port"),
        );
    }
    // frond took what it would (all of them, before the fix).
    wait_until(
        "frond accepted the idle HTTP sockets it keeps",
        LONG,
        || async { open_fds(pid) >= base + HTTP_MAX },
    )
    .await;
    // MQTT is served within a few seconds: connect (as admin), subscribe,
    // and a QoS 1 publish that stream A stores.
    let mqtt = async {
        let mut c = Mq::connect(f.mqtt_port, Version::V5, "after-idle", "admin").await;
        c.subscribe("a/x", QoS::AtMostOnce).await;
        let code = c.publish_acked("a/x", b"stored", false, 1).await;
        (c, code)
    };
    let (mut c, code) = tokio::time::timeout(Duration::from_secs(3), mqtt)
        .await
        .expect("MQTT connect, subscribe and publish within 3 s with 66 idle HTTP sockets open");
    assert_eq!(code, 0, "the publish is stored");
    match c.recv().await {
        Packet::Publish(p) => assert_eq!(p.payload, b"stored"),
        other => panic!("expected the message back, got {other:?}"),
    }
    assert_eq!(stream_count(&f, "A").await, 1);
    drop(idle);
    wait_until(
        "/healthz answers once the idle sockets are closed",
        LONG,
        || async { f.http_get("/healthz").await.is_some_and(|(c, _)| c == 200) },
    )
    .await;
}
