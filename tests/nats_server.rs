//! The NATS port against real clients: async-nats (the official Rust
//! client), rumqttc for MQTT <-> NATS, and a raw TCP socket where a client
//! library would refuse to misbehave (oversized payloads, not reading).
//!
//! Each test starts its own `frond run` on free ports with a config in a
//! temporary directory and kills it on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use smol::stream::StreamExt;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

struct Frond {
    child: Child,
    nats: u16,
    mqtt: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

impl Frond {
    /// Start frond; `nats` goes into `[nats]`, `rest` after it.
    fn start(nats: &str, rest: &str) -> Frond {
        let dir = tempfile::tempdir().expect("tempdir");
        let (np, mp) = (free_port(), free_port());
        let cfg = format!(
            "data_dir = {data:?}\nlog = \"warn\"\n[mqtt]\nlisten = \"127.0.0.1:{mp}\"\n[http]\nlisten = \"\"\n[nats]\nlisten = \"127.0.0.1:{np}\"\n{nats}\n{rest}\n",
            data = dir.path().join("data")
        );
        let path = dir.path().join("frond.toml");
        std::fs::write(&path, cfg).expect("write config");
        let log = std::fs::File::create(dir.path().join("frond.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_frond"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn frond");
        let mut f = Frond {
            child,
            nats: np,
            mqtt: mp,
            dir,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if TcpStream::connect(("127.0.0.1", np)).is_ok()
                && TcpStream::connect(("127.0.0.1", mp)).is_ok()
            {
                return f;
            }
            if let Ok(Some(status)) = f.child.try_wait() {
                panic!("frond exited with {status}: {}", f.log());
            }
            assert!(Instant::now() < deadline, "frond not ready: {}", f.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.nats)
    }

    fn log(&self) -> String {
        let p: PathBuf = self.dir.path().join("frond.log");
        std::fs::read_to_string(p).unwrap_or_default()
    }

    async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.expect("connect")
    }
}

impl Drop for Frond {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- frond log ---\n{}", self.log());
        }
    }
}

/// A round trip through the server: once it returns, the server has
/// processed everything `c` sent before (async-nats's `flush` only flushes
/// the client's socket buffer).
async fn sync(c: &async_nats::Client) {
    let inbox = c.new_inbox();
    let mut s = c.subscribe(inbox.clone()).await.unwrap();
    c.publish(inbox, "".into()).await.unwrap();
    next(&mut s).await;
}

async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    timeout(WAIT, sub.next())
        .await
        .expect("a message within the deadline")
        .expect("subscription open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_sub_wildcards_headers_and_queue_groups() {
    let f = Frond::start("", "");
    let a = f.client().await;
    let b = f.client().await;
    let mut all = a.subscribe("plant.>").await.unwrap();
    let mut temps = a.subscribe("plant.*.temp").await.unwrap();
    let mut exact = a.subscribe("plant.line1.temp").await.unwrap();
    sync(&a).await;

    b.publish("plant.line1.temp", "21.5".into()).await.unwrap();
    b.publish("plant.line1.pressure", "1.2".into())
        .await
        .unwrap();
    sync(&b).await;
    assert_eq!(next(&mut all).await.payload, "21.5");
    assert_eq!(next(&mut all).await.payload, "1.2");
    assert_eq!(next(&mut temps).await.subject.as_str(), "plant.line1.temp");
    assert_eq!(next(&mut exact).await.payload, "21.5");

    // Headers pass through.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Trace-Id", "abc-1");
    b.publish_with_headers("plant.line2.temp", h, "19".into())
        .await
        .unwrap();
    let m = next(&mut temps).await;
    let got = m.headers.expect("headers");
    assert_eq!(got.get("Trace-Id").map(|v| v.as_str()), Some("abc-1"));
    assert_eq!(next(&mut all).await.subject.as_str(), "plant.line2.temp");

    // A queue group gets each message once, spread over its members.
    let mut w1 = a.queue_subscribe("work.*", "workers".into()).await.unwrap();
    let mut w2 = b.queue_subscribe("work.*", "workers".into()).await.unwrap();
    sync(&a).await;
    sync(&b).await;
    let c = f.client().await;
    for i in 0..200 {
        c.publish(format!("work.{i}"), "job".into()).await.unwrap();
    }
    c.flush().await.unwrap();
    let (mut n1, mut n2) = (0, 0);
    let deadline = Instant::now() + WAIT;
    while n1 + n2 < 200 {
        assert!(Instant::now() < deadline, "only {n1}+{n2} of 200 arrived");
        tokio::select! {
            Some(_) = w1.next() => n1 += 1,
            Some(_) = w2.next() => n2 += 1,
        }
    }
    assert!(n1 > 20 && n2 > 20, "spread: {n1} / {n2}");
    // Nothing extra arrives (each message went to one member only).
    c.publish("work.end", "x".into()).await.unwrap();
    c.flush().await.unwrap();
    let extra = tokio::select! {
        Some(m) = w1.next() => m,
        Some(m) = w2.next() => m,
    };
    assert_eq!(extra.subject.as_str(), "work.end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_and_no_responders() {
    let f = Frond::start("", "");
    let svc = f.client().await;
    let mut reqs = svc.subscribe("svc.echo").await.unwrap();
    sync(&svc).await;
    let responder = tokio::spawn(async move {
        while let Some(m) = reqs.next().await {
            if let Some(r) = m.reply {
                let mut body = b"echo: ".to_vec();
                body.extend_from_slice(&m.payload);
                svc.publish(r, body.into()).await.unwrap();
            }
        }
    });
    let c = f.client().await;
    for i in 0..20 {
        let resp = timeout(WAIT, c.request("svc.echo", format!("{i}").into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.payload, format!("echo: {i}"));
    }
    // Nobody listens: the server answers 503 (a timeout would be another
    // error kind).
    let err = timeout(WAIT, c.request("nobody.home", "x".into()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
    responder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_publish_gets_a_puback_once_stored() {
    let f = Frond::start(
        "",
        "[[stream]]\nname = \"TELEMETRY\"\nsubjects = [\"telemetry.>\"]\n",
    );
    let c = f.client().await;
    let js = async_nats::jetstream::new(c.clone());
    for want in 1..=3u64 {
        let ack = timeout(WAIT, async {
            js.publish("telemetry.truck.speed", "88".into())
                .await
                .unwrap()
                .await
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(ack.stream, "TELEMETRY");
        assert_eq!(ack.sequence, want);
    }
    // A subject no stream captures: no PubAck, and nobody listens.
    let err = timeout(WAIT, async {
        js.publish("other.subject", "x".into()).await.unwrap().await
    })
    .await
    .unwrap();
    assert!(err.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_and_nats_see_each_other() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let f = Frond::start("", "");
    let nc = f.client().await;
    let mut plant = nc.subscribe("plant.>").await.unwrap();
    let mut exact = nc.subscribe("plant.line1.temp").await.unwrap();
    sync(&nc).await;

    let mut opts = MqttOptions::new("dev-1", "127.0.0.1", f.mqtt);
    opts.set_keep_alive(Duration::from_secs(30));
    let (mc, mut ev) = AsyncClient::new(opts, 16);
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let pump = tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            if let Event::Incoming(p) = e {
                if tx.send(p).await.is_err() {
                    break;
                }
            }
        }
    });
    mc.subscribe("cmd/#", QoS::AtLeastOnce).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let p = timeout(deadline - Instant::now(), rx.recv())
            .await
            .unwrap()
            .unwrap();
        if matches!(p, Packet::SubAck(_)) {
            break;
        }
    }
    // MQTT -> NATS.
    mc.publish("plant/line1/temp", QoS::AtLeastOnce, false, "22.1")
        .await
        .unwrap();
    let m = next(&mut plant).await;
    assert_eq!(
        (m.subject.as_str(), &m.payload[..]),
        ("plant.line1.temp", &b"22.1"[..])
    );
    assert_eq!(next(&mut exact).await.payload, "22.1");
    // NATS -> MQTT (cmd/# also matches the parent level `cmd`).
    nc.publish("cmd.dev-1.reboot", "now".into()).await.unwrap();
    nc.publish("cmd", "parent".into()).await.unwrap();
    sync(&nc).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let p = timeout(deadline - Instant::now(), rx.recv())
            .await
            .unwrap()
            .unwrap();
        if let Packet::Publish(p) = p {
            got.push((p.topic.clone(), p.payload.to_vec()));
        }
    }
    assert_eq!(
        got,
        vec![
            ("cmd/dev-1/reboot".to_string(), b"now".to_vec()),
            ("cmd".to_string(), b"parent".to_vec())
        ]
    );
    pump.abort();
}

/// Read from a raw socket until `pat` appears or the peer closes; returns
/// everything read.
fn read_until(s: &mut TcpStream, pat: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        if got.windows(pat.len()).any(|w| w == pat) {
            return got;
        }
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(&got)),
        }
    }
}

#[test]
fn max_payload_violation_closes_with_the_nats_error() {
    let f = Frond::start("max_payload = \"1KiB\"", "");
    let mut s = TcpStream::connect(("127.0.0.1", f.nats)).unwrap();
    let info = read_until(&mut s, b"\r\n");
    let text = String::from_utf8_lossy(&info);
    assert!(text.starts_with("INFO {"), "{text}");
    assert!(text.contains("\"max_payload\":1024"), "{text}");
    s.write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
        .unwrap();
    read_until(&mut s, b"PONG\r\n");
    s.write_all(b"PUB big 2048\r\n").unwrap();
    let got = read_until(&mut s, b"\xff-never-");
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("-ERR 'Maximum Payload Violation'"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_disconnected_without_stalling_others() {
    let f = Frond::start("max_pending = \"1MiB\"", "");
    // A raw client that subscribes and then never reads.
    let mut slow = TcpStream::connect(("127.0.0.1", f.nats)).unwrap();
    slow.write_all(b"CONNECT {}\r\nSUB big 1\r\nPING\r\n")
        .unwrap();
    read_until(&mut slow, b"PONG\r\n");

    let fast = f.client().await;
    let mut sub = fast.subscribe("big").await.unwrap();
    sync(&fast).await;
    let p = f.client().await;
    let payload = vec![b'x'; 256 * 1024];
    let n = 200; // 50 MiB: far more than socket buffers plus max_pending.
                 // Lockstep with the fast subscriber, so that only the slow one falls
                 // behind (a publisher faster than every subscriber would overflow
                 // them all).
    for _ in 0..n {
        p.publish("big", payload.clone().into()).await.unwrap();
        assert_eq!(next(&mut sub).await.payload.len(), payload.len());
    }

    // The slow client was cut off: what it can still read ends early.
    let got = tokio::task::spawn_blocking(move || read_until(&mut slow, b"\xff-never-"))
        .await
        .unwrap();
    assert!(
        got.len() < n * payload.len() / 2,
        "read {} bytes: not disconnected",
        got.len()
    );
    // The server is fine.
    let c = f.client().await;
    sync(&c).await;
}
