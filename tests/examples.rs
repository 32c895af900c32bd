//! The programs in `examples/` work against a real frond, as an
//! integrator would run them (`cargo test --all-targets` builds them
//! before this test runs), and the example configuration is valid.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

/// `target/<profile>/examples/<name>`, next to this test's own binary.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo test --all-targets` (or `cargo build --examples`) first",
        path.display()
    );
    path
}

fn run(name: &str, args: &[String]) -> String {
    let out = Command::new(example(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run example {name}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "example {name} failed: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn gateway_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway-uplink.toml");
    let out = Command::new(frond_bin())
        .args(["check-config", path])
        .output()
        .expect("run frond check-config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_reader_and_service_examples() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let mqtt = format!("127.0.0.1:{}", f.mqtt_port);
    let nats = format!("127.0.0.1:{}", f.nats_port);

    // A device publishes 10 readings; each PUBACK means stored.
    let (m, n) = (mqtt.clone(), nats.clone());
    let out = tokio::task::spawn_blocking(move || {
        run("mqtt_device", &[m, "truck-042".into(), "10".into()])
    })
    .await
    .unwrap();
    assert!(out.contains("10 readings acknowledged"), "{out}");

    // The reader gets all ten from the TELEMETRY stream.
    let out = tokio::task::spawn_blocking(move || {
        run("stream_reader", &[n, "TELEMETRY".into(), "10".into()])
    })
    .await
    .unwrap();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("telemetry.truck-042.temp"))
        .collect();
    assert_eq!(lines.len(), 10, "{out}");
    assert!(
        lines[0].starts_with("#1 ") && lines[9].starts_with("#10 "),
        "{out}"
    );

    // The service answers one request, then exits.
    let n = nats.clone();
    let service = tokio::task::spawn_blocking(move || run("nats_service", &[n, "1".into()]));
    let client = async_nats::connect(&nats).await.unwrap();
    let answer = wait_for(
        "the example service answers",
        Duration::from_secs(20),
        || {
            let client = client.clone();
            async move {
                // Before the service subscribed: no responders, try again.
                client.request("svc.time", "".into()).await.ok()
            }
        },
    )
    .await;
    let secs: u64 = String::from_utf8_lossy(&answer.payload).parse().unwrap();
    assert!(secs > 1_700_000_000, "unix time, got {secs}");
    service.await.unwrap();
}
