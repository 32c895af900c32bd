//! Mirror-up over a `ws://` hub URL: NATS over WebSocket with
//! permessage-deflate to a real nats-server (`websocket { compression:
//! true }`), exactly once, also across link cuts mid-window, and over
//! `wss://` (TLS below the WebSocket, verified against `uplink.tls_ca`).

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

const TOPIC: &str = "telemetry/t1";
const SUBJECT: &str = "fleet.truck1.telemetry.t1";

fn payloads(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| payload("msg", i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_over_compressed_websocket() {
    let hub = NatsServer::start_with_ws(None).await;
    hub.create_stream("FLEET", &["fleet.>"], std::time::Duration::from_secs(120))
        .await;
    let frond = Frond::start_new(FrondSpec::with_hub(hub.ws_url())).await;
    publish_range(frond.mqtt_port, "dev1", TOPIC, "msg", 0..10_000).await;
    hub.wait_count_at_least("FLEET", 10_000, LONG).await;
    let msgs = hub.read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads(0..10_000), "truck1", SUBJECT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_link_cut_mid_window() {
    let hub = NatsServer::start_with_ws(None).await;
    hub.create_stream("FLEET", &["fleet.>"], std::time::Duration::from_secs(120))
        .await;
    let proxy = FaultProxy::start(hub.ws_port.expect("ws port")).await;
    let url = proxy.url().replacen("nats://", "ws://", 1);
    let frond = Frond::start_new(FrondSpec::with_hub(url)).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "msg");
    for k in 0..5usize {
        let range = k * 1000..(k + 1) * 1000;
        let (_, ()) = tokio::join!(publ.publish(range, LONG), async {
            wait_until(
                format!("part of chunk {k} reaches the hub"),
                LONG,
                || async {
                    hub.try_count("FLEET")
                        .await
                        .is_some_and(|c| c as usize > k * 1000)
                },
            )
            .await;
            proxy.cut();
        });
    }
    hub.wait_count_at_least("FLEET", 5000, LONG).await;
    let msgs = hub.read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads(0..5000), "truck1", SUBJECT);
    wait_until("frond reconnected after every cut", LONG, || {
        let ok = proxy.forwarded() >= 5;
        async move { ok }
    })
    .await;
}

/// A CA and a server certificate for 127.0.0.1 it signed, as PEM files:
/// (dir, cert, key, ca).
fn pki() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    let p = |f: &str| dir.path().join(f);
    std::fs::write(p("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(p("server.pem"), cert.pem()).unwrap();
    std::fs::write(p("server.key"), key.serialize_pem()).unwrap();
    let (c, k, a) = (p("server.pem"), p("server.key"), p("ca.pem"));
    (dir, c, k, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_over_wss() {
    let (_dir, cert, key, ca) = pki();
    let hub = NatsServer::start_with_ws(Some((cert, key, ca.clone()))).await;
    hub.create_stream("FLEET", &["fleet.>"], std::time::Duration::from_secs(120))
        .await;
    let mut spec = FrondSpec::with_hub(hub.ws_url());
    spec.uplink_extra = format!("tls_ca = \"{}\"\n", ca.display());
    let frond = Frond::start_new(spec).await;
    publish_range(frond.mqtt_port, "dev1", TOPIC, "msg", 0..2000).await;
    hub.wait_count_at_least("FLEET", 2000, LONG).await;
    let msgs = hub.read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads(0..2000), "truck1", SUBJECT);
}
