//! MQTT over WebSocket with a real browser-style peer (paho-mqtt's
//! websockets transport, Python).

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_round_trip_over_websocket() {
    let frond = Frond::start_new(FrondSpec {
        ws: true,
        ..FrondSpec::default()
    })
    .await;
    wait_until("WebSocket port accepts", LONG, || {
        accepts_tcp(frond.ws_port)
    })
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/ws_roundtrip.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(frond.ws_port.to_string())
        .output()
        .await
        .expect("run python3 (install paho-mqtt: pip install paho-mqtt==2.1.0)");
    assert!(
        out.status.success(),
        "paho over WebSocket failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The plain TCP port keeps working alongside.
    let mut probe = MqttProbe::connect(frond.mqtt_port, "tcp-probe", "probe/t").await;
    probe.roundtrip("after-ws").await;
}
