//! The programs in `examples/` work against a real frond, as an
//! integrator would run them, and the example configuration is valid.
//! Each example's `run` is the code its `main` runs; it is compiled in
//! here so that `cargo test` alone tests it.

mod common;

#[allow(dead_code)]
#[path = "../examples/mqtt_device.rs"]
mod mqtt_device;
#[allow(dead_code)]
#[path = "../examples/nats_service.rs"]
mod nats_service;
#[allow(dead_code)]
#[path = "../examples/stream_reader.rs"]
mod stream_reader;

use std::process::Command;
use std::time::Duration;

use common::*;

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
    let acked = mqtt_device::run(vec![mqtt, "truck-042".into(), "10".into()])
        .await
        .expect("the device example runs");
    assert_eq!(acked, 10);

    // The reader gets all ten from the TELEMETRY stream.
    let lines = stream_reader::run(vec![nats.clone(), "TELEMETRY".into(), "10".into()])
        .await
        .expect("the reader example runs");
    assert_eq!(lines.len(), 10, "{lines:?}");
    assert!(
        lines.iter().all(|l| l.contains("telemetry.truck-042.temp")),
        "{lines:?}"
    );
    assert!(
        lines[0].starts_with("#1 ") && lines[9].starts_with("#10 "),
        "{lines:?}"
    );

    // The service answers one request, then returns.
    let n = nats.clone();
    let service = tokio::spawn(async move {
        nats_service::run(vec![n, "1".into()])
            .await
            .map_err(|e| e.to_string())
    });
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
    assert_eq!(service.await.unwrap(), Ok(1));
}
