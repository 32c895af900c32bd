//! The local store under SIGKILL (issue 5): acknowledged means durable.
//!
//! Several QoS 1 devices publish into frond while it is killed with SIGKILL
//! five times and restarted each time. Afterwards frond is stopped cleanly
//! and the stream's files are read offline through frond's own library
//! (`frond::stream::open`), which is the ground truth of what is stored.
//!
//! What must hold (with `sync = "always"`):
//! - every start-up succeeds, and no recovery reports lost records (a torn
//!   tail of unacknowledged writes may be cut; that is not a loss);
//! - every PUBACKed payload is in the stream, under its device's subject,
//!   byte for byte;
//! - nothing else is: every stored message is one of the published
//!   payloads, at most once plus once per resend (QoS 1 is at least once);
//! - sequences are 1..=N without gaps (nothing reused or skipped after a
//!   crash) and, per device, first appearances are in publish order.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use frond::stream::{self, StreamConfig};
use rumqttc::v5::mqttbytes::v5::PubAckReason;

/// The configuration the offline reader opens the stream with: no limits,
/// so opening it removes nothing.
fn offline_cfg() -> StreamConfig {
    StreamConfig::new("TELEMETRY", &["telemetry.>"])
}

/// Parses frond's start-up recovery warning for the stream, if any:
/// `stream TELEMETRY: recovered R records, truncated T bytes ..., L records lost`.
fn lost_records_in(log: &str) -> u64 {
    let mut lost = 0;
    for line in log.lines() {
        if !line.contains("stream TELEMETRY: recovered") {
            continue;
        }
        let Some(head) = line.rsplit(", ").next() else {
            continue;
        };
        let n = head
            .trim()
            .strip_suffix("records lost")
            .map(str::trim)
            .and_then(|s| s.parse::<u64>().ok());
        match n {
            Some(n) => lost += n,
            None => panic!("unparsable recovery line: {line}"),
        }
    }
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_keeps_every_acknowledged_message() {
    sigkill_loop(false).await;
}

/// The same with the stream encrypted at rest (`encryption_key_file`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_keeps_every_acknowledged_message_encrypted() {
    sigkill_loop(true).await;
}

async fn sigkill_loop(encrypted: bool) {
    let mut frond = Frond::start_new(FrondSpec::default()).await;
    let mut cfg = offline_cfg();
    if encrypted {
        // The key is a top-level setting: restart with it prepended.
        frond.terminate();
        let key = frond.config_path().with_file_name("stream.key");
        frond::store::crypt::generate_key_file(&key).unwrap();
        let text = std::fs::read_to_string(frond.config_path()).unwrap();
        let text = format!("encryption_key_file = {:?}\n{text}", key.to_str().unwrap());
        std::fs::write(frond.config_path(), text).unwrap();
        frond.start().await;
        cfg.key = Some(frond::store::crypt::Key::from_file(&key).unwrap());
        cfg.encrypt = true;
    }

    let devices = 4;
    let per_device = 2500;
    let (pubs, tasks) = spawn_devices(frond.mqtt_port, devices, per_device);
    let acked = || total_acked(&pubs);

    let mut lost = 0;
    let mut kills = 0;
    for at in [800, 2500, 4500, 6500, 8500] {
        wait_until(format!("{at} PUBACKs before a kill"), LONG, || {
            let n = acked();
            async move { n >= at }
        })
        .await;
        frond.kill9();
        kills += 1;
        // Start-up must succeed every time (Frond::start panics otherwise).
        frond.start().await;
        lost += lost_records_in(&frond.current_log());
    }
    assert_eq!(kills, 5);

    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.expect("publisher task"));
    }
    for (d, log) in logs.iter().enumerate() {
        assert_eq!(log.acked.len(), per_device, "dev{d}: all acknowledged");
    }
    assert!(
        logs.iter().map(|l| l.sessions).sum::<usize>() > devices,
        "the kills broke the devices' connections"
    );
    assert_eq!(lost, 0, "recovery reported lost records with sync always");

    frond.terminate();
    let log = frond.log_text();
    assert!(
        !log.contains("records lost") || lost_records_in(&log) == 0,
        "a start-up reported lost records"
    );

    // Read the stream offline.
    if encrypted {
        for seg in frond.segments("TELEMETRY") {
            let head = std::fs::read(&seg).unwrap();
            assert_eq!(head.get(..8), Some(&b"FRNDSEGE"[..]), "{}", seg.display());
        }
    }
    let (h, report) = stream::open(&frond.stream_dir("TELEMETRY"), cfg)
        .expect("open the stream offline after a clean stop");
    assert_eq!(report.lost_records, 0, "offline open: {report:?}");
    assert_eq!(report.truncated_bytes, 0, "clean stop leaves no torn tail");
    let mut msgs = Vec::new();
    let mut from = 1;
    loop {
        let batch = h.read(from, 1000, 1 << 20).await.expect("read stream");
        let Some(last) = batch.last() else { break };
        from = last.seq + 1;
        msgs.extend(batch);
    }
    h.close().await;

    // Sequences 1..=N, no gap.
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(
            m.seq,
            i as u64 + 1,
            "stored message {} has seq {}",
            i,
            m.seq
        );
    }

    // No garbage: each message is a known payload under its device subject.
    let mut count: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let mut firsts: Vec<Vec<usize>> = vec![Vec::new(); devices];
    for m in &msgs {
        let text = String::from_utf8(m.payload.clone())
            .unwrap_or_else(|_| panic!("seq {}: payload is not UTF-8", m.seq));
        let (prefix, idx) = text
            .split_once('-')
            .unwrap_or_else(|| panic!("seq {}: unexpected payload {text:?}", m.seq));
        let d: usize = prefix
            .strip_prefix('p')
            .and_then(|s| s.parse().ok())
            .filter(|d| *d < devices)
            .unwrap_or_else(|| panic!("seq {}: unexpected payload {text:?}", m.seq));
        let i: usize = idx
            .parse()
            .ok()
            .filter(|i| *i < per_device)
            .unwrap_or_else(|| panic!("seq {}: unexpected payload {text:?}", m.seq));
        assert_eq!(text, payload(&format!("p{d}"), i), "seq {}", m.seq);
        assert_eq!(m.subject, format!("telemetry.p{d}"), "seq {}", m.seq);
        assert!(m.headers.is_none(), "seq {}: unexpected headers", m.seq);
        let c = count.entry((d, i)).or_insert(0);
        if *c == 0 {
            firsts[d].push(i);
        }
        *c += 1;
    }

    // Every acknowledged payload is there, at most once per publish.
    for (d, log) in logs.iter().enumerate() {
        for &i in &log.acked {
            let n = count.get(&(d, i)).copied().unwrap_or(0);
            let allowed = 1 + log.resent.get(&i).copied().unwrap_or(0);
            assert!(n >= 1, "p{d}-{i:06} was PUBACKed but is not stored");
            assert!(
                n <= allowed,
                "p{d}-{i:06} stored {n} times but published {allowed} times"
            );
        }
        let sorted: Vec<usize> = {
            let mut s = firsts[d].clone();
            s.sort_unstable();
            s
        };
        assert_eq!(firsts[d], sorted, "dev{d}: first appearances out of order");
        let distinct: BTreeSet<usize> = firsts[d].iter().copied().collect();
        assert_eq!(distinct.len(), per_device, "dev{d}: distinct payloads");
    }
    eprintln!(
        "store_crash: {} messages stored for {} published, {kills} SIGKILLs",
        msgs.len(),
        devices * per_device
    );
}

// ---------------------------------------------------------------------------
// ENOSPC on a real (small) file system

/// A tmpfs mounted on a directory; unmounted on drop.
struct TmpfsMount(std::path::PathBuf);

impl TmpfsMount {
    /// `mount -t tmpfs -o size=<size> tmpfs <dir>`; Err(reason) when this
    /// machine does not allow it (not root, no CAP_SYS_ADMIN, no mount).
    fn mount(dir: &std::path::Path, size: &str) -> Result<TmpfsMount, String> {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(TmpfsMount(dir.to_path_buf()))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// One MQTT 5 QoS 1 publisher that waits for each PUBACK's reason code.
/// rumqttc turns a failure PUBACK into an event-loop error and drops the
/// connection, so after one the next publish connects again.
struct V5Pub {
    port: u16,
    id: String,
    conn: Option<(rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop)>,
}

impl V5Pub {
    fn new(port: u16, id: &str) -> V5Pub {
        V5Pub {
            port,
            id: id.into(),
            conn: None,
        }
    }

    async fn connect(&self) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
        use rumqttc::v5::{mqttbytes::v5::Packet, AsyncClient, Event, MqttOptions};
        let mut opts = MqttOptions::new(self.id.clone(), "127.0.0.1", self.port);
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut el) = AsyncClient::new(opts, 16);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{}: MQTT 5 connect failed: {e}", self.id),
                Err(_) => panic!("{}: no CONNACK within 10s", self.id),
            }
        }
        (client, el)
    }

    /// Publishes one QoS 1 message; the PUBACK's reason code.
    async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> PubAckReason {
        use rumqttc::v5::{
            mqttbytes::{v5::Packet, QoS},
            ConnectionError, Event, StateError,
        };
        let (client, mut el) = match self.conn.take() {
            Some(c) => c,
            None => self.connect().await,
        };
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queue publish");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                    self.conn = Some((client, el));
                    return a.reason;
                }
                Ok(Ok(_)) => {}
                Ok(Err(ConnectionError::MqttState(StateError::PubAckFail { reason }))) => {
                    return reason
                }
                Ok(Err(e)) => panic!("MQTT 5 connection broke: {e}"),
                Err(_) => panic!("no PUBACK within 10s"),
            }
        }
    }
}

/// A 1000-byte payload whose first bytes name the index.
fn big_payload(i: usize) -> Vec<u8> {
    padded(&format!("f-{i:06}-"))
}

/// `head` padded to 1000 bytes (tmpfs allocates whole pages, so a small
/// record may still fit when a 1000-byte one does not).
fn padded(head: &str) -> Vec<u8> {
    let mut p = head.as_bytes().to_vec();
    p.resize(1000, b'x');
    p
}

/// Publishes with MQTT 3.1.1 QoS 1 and reports whether a PUBACK came
/// (`true`) or the connection closed without one (`false`).
async fn v311_publish_acked(port: u16, id: &str, topic: &str, payload: Vec<u8>) -> bool {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = AsyncClient::new(opts, 16);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .expect("queue publish");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => return true,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return false,
            Err(_) => panic!("{id}: neither PUBACK nor close within 10s"),
        }
    }
}

/// The data directory on a 2 MiB tmpfs: publishes are refused once it is
/// full (MQTT 5: PUBACK 0x80 with a reason string; 3.1.1: the connection
/// closes without PUBACK), nothing acknowledged is lost, and once space is
/// freed publishes succeed again without restarting frond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_on_a_full_tmpfs_refuses_then_recovers() {
    let mut frond = Frond::start_new(FrondSpec::default()).await;
    frond.terminate();
    let data = frond.data_dir();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::create_dir(&data).unwrap();
    let _mount = match TmpfsMount::mount(&data, "2m") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED enospc_on_a_full_tmpfs_refuses_then_recovers: {why}");
            return;
        }
    };
    // A filler the test can remove later to free space.
    let filler = data.join("filler");
    std::fs::write(&filler, vec![0u8; 512 << 10]).unwrap();
    frond.start().await;

    let topic = "telemetry/fill";
    let mut acked: Vec<usize> = Vec::new();
    let mut p = V5Pub::new(frond.mqtt_port, "filler5");
    let mut i = 0;
    let refused_reason = loop {
        assert!(
            i < 5000,
            "2 MiB tmpfs never filled after {i} KB-sized publishes"
        );
        let reason = p.publish(topic, big_payload(i)).await;
        match reason {
            PubAckReason::Success => {
                acked.push(i);
                i += 1;
            }
            other => break other,
        }
    };
    eprintln!(
        "tmpfs full after {} acknowledged publishes: {:?}",
        acked.len(),
        refused_reason
    );
    assert_eq!(refused_reason, PubAckReason::UnspecifiedError);
    assert!(acked.len() > 100, "something was stored before it filled");

    // Still full: the next MQTT 5 publish is refused too, and a 3.1.1
    // publisher is disconnected without PUBACK.
    let again = p.publish(topic, big_payload(i)).await;
    assert_ne!(again, PubAckReason::Success);
    assert!(
        !v311_publish_acked(frond.mqtt_port, "probe311", topic, padded("refused-311")).await,
        "MQTT 3.1.1 publish acknowledged on a full disk"
    );
    assert!(frond.is_running(), "frond survives a full disk");

    // Free space: publishes succeed again, same frond process.
    std::fs::remove_file(&filler).unwrap();
    for _ in 0..50 {
        let reason = p.publish(topic, big_payload(i)).await;
        assert_eq!(
            reason,
            PubAckReason::Success,
            "publish {i} after freeing space"
        );
        acked.push(i);
        i += 1;
    }
    assert!(
        v311_publish_acked(frond.mqtt_port, "ok311", topic, padded("ok-311")).await,
        "MQTT 3.1.1 publish after freeing space"
    );

    frond.terminate();
    let (h, report) = stream::open(&frond.stream_dir("TELEMETRY"), offline_cfg())
        .expect("open the stream offline");
    assert_eq!(report.lost_records, 0, "{report:?}");
    let mut msgs = Vec::new();
    let mut from = 1;
    loop {
        let batch = h.read(from, 1000, 1 << 20).await.expect("read stream");
        let Some(last) = batch.last() else { break };
        from = last.seq + 1;
        msgs.extend(batch);
    }
    h.close().await;
    // Exactly the acknowledged messages, in order, then the 3.1.1 one; no
    // refused message and no partial record.
    let mut expected: Vec<Vec<u8>> = acked.iter().map(|&i| big_payload(i)).collect();
    expected.push(padded("ok-311"));
    let got: Vec<Vec<u8>> = msgs.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(got.len(), expected.len(), "stored count");
    assert!(
        got == expected,
        "stored payloads differ from the acknowledged ones"
    );
    for (k, m) in msgs.iter().enumerate() {
        assert_eq!(m.seq, k as u64 + 1);
        assert_eq!(m.subject, "telemetry.fill");
    }
}
