//! Encryption at rest end to end (issue 5): a key from `frond keygen`, an
//! encrypted stream fed over MQTT across a SIGKILL and a clean restart,
//! read back offline with the key; the payloads and subjects never appear
//! in the stream's files; a wrong key makes `frond run` exit with a message
//! naming the stream and the key file, and changes nothing on disk.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use frond::store::crypt::Key;
use frond::stream::{self, StreamConfig};

fn keygen(path: &Path) -> std::process::Output {
    Command::new(frond_bin())
        .arg("keygen")
        .arg(path)
        .output()
        .expect("run frond keygen")
}

/// Points the config's top-level `encryption_key_file` at `key`.
fn set_key(frond: &Frond, key: &Path) {
    let cfg = std::fs::read_to_string(frond.config_path()).unwrap();
    let rest: Vec<&str> = cfg
        .lines()
        .filter(|l| !l.starts_with("encryption_key_file"))
        .collect();
    let text = format!(
        "encryption_key_file = {:?}\n{}\n",
        key.to_str().unwrap(),
        rest.join("\n")
    );
    std::fs::write(frond.config_path(), text).unwrap();
}

fn stream_files(frond: &Frond) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(frond.stream_dir("TELEMETRY"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_stream_survives_restarts_and_refuses_a_wrong_key() {
    let mut frond = Frond::start_new(FrondSpec::default()).await;
    frond.terminate();
    let dir = frond.config_path().parent().unwrap().to_path_buf();

    // keygen: a new 0600 key file, never overwritten.
    let key = dir.join("stream.key");
    let out = keygen(&key);
    assert!(out.status.success(), "keygen: {out:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let key_bytes = std::fs::read(&key).unwrap();
    assert!(
        !keygen(&key).status.success(),
        "keygen refuses to overwrite"
    );
    assert_eq!(std::fs::read(&key).unwrap(), key_bytes);

    // Publish over MQTT into the encrypted stream, with a SIGKILL between
    // two batches and a clean restart after.
    set_key(&frond, &key);
    frond.start().await;
    let topic = "telemetry/secretplant/line1";
    publish_range(frond.mqtt_port, "dev-a", topic, "CONFIDENTIAL", 0..300).await;
    frond.kill9();
    frond.start().await;
    publish_range(frond.mqtt_port, "dev-a", topic, "CONFIDENTIAL", 300..600).await;
    frond.terminate();
    frond.start().await;
    frond.terminate();
    let log = frond.log_text();
    assert!(!log.contains("records lost"), "log:\n{log}");

    // Nothing in clear in any file of the stream.
    let files = stream_files(&frond);
    assert!(files.iter().any(|(n, _)| n.ends_with(".seg")));
    for (name, data) in &files {
        for needle in [&b"CONFIDENTIAL"[..], b"secretplant"] {
            assert!(
                !contains(data, needle),
                "{name} holds {:?} in clear",
                String::from_utf8_lossy(needle)
            );
        }
    }

    // Read back offline with the key: every payload, in order.
    let cfg = StreamConfig {
        key: Some(Key::from_file(&key).unwrap()),
        encrypt: true,
        ..StreamConfig::new("TELEMETRY", &["telemetry.>"])
    };
    let (h, report) = stream::open(&frond.stream_dir("TELEMETRY"), cfg.clone()).unwrap();
    assert_eq!((report.lost_records, report.truncated_bytes), (0, 0));
    let msgs = h.read(1, 10_000, usize::MAX).await.unwrap();
    h.close().await;
    let mut got: Vec<String> = msgs
        .iter()
        .map(|m| String::from_utf8(m.payload.clone()).unwrap())
        .collect();
    got.dedup(); // QoS 1: a resend after the kill may store a copy
    let want: Vec<String> = (0..600).map(|i| payload("CONFIDENTIAL", i)).collect();
    assert_eq!(got, want);
    assert!(msgs
        .iter()
        .all(|m| m.subject == "telemetry.secretplant.line1"));

    // Without the key the offline open is refused too.
    let no_key = StreamConfig {
        key: None,
        encrypt: false,
        ..cfg
    };
    let e = stream::open(&frond.stream_dir("TELEMETRY"), no_key)
        .err()
        .expect("no key, no open");
    assert!(e.to_string().contains("encryption_key_file"), "{e}");

    // A wrong key file: frond exits at start with a message naming the
    // stream and the key file, and leaves the files alone.
    let before = stream_files(&frond);
    let other = dir.join("other.key");
    assert!(keygen(&other).status.success());
    set_key(&frond, &other);
    let mut child = Command::new(frond_bin())
        .arg("run")
        .arg("--config")
        .arg(frond.config_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("frond kept running with a wrong key");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!status.success());
    assert!(
        text.contains("TELEMETRY") && text.contains(other.to_str().unwrap()),
        "message: {text}"
    );
    assert_eq!(
        stream_files(&frond),
        before,
        "a refused start changes nothing"
    );
}
