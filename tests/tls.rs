//! TLS with real peers: mosquitto_pub/mosquitto_sub over `mqtt.tls_listen`
//! (server certificate, then client certificates required by `tls.ca`),
//! paho-mqtt over `mqtt.wss_listen`, and the uplink to a nats-server hub
//! that requires TLS. Certificates are made per test with rcgen.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// A CA and, signed by it, a server certificate for 127.0.0.1/localhost
/// and a client certificate; all as PEM files in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "frond test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        for (name, sans) in [
            (
                "server",
                vec!["127.0.0.1".to_string(), "localhost".to_string()],
            ),
            ("client", vec!["device-1".to_string()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let params = CertificateParams::new(sans).unwrap();
            let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// The `[tls]` section for frond; `require_client` adds `ca`.
    fn frond_section(&self, require_client: bool) -> String {
        let mut s = format!(
            "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            self.path("server.pem").display(),
            self.path("server.key").display()
        );
        if require_client {
            s.push_str(&format!("ca = \"{}\"\n", self.path("ca.pem").display()));
        }
        s
    }
}

/// Runs a mosquitto client over TLS trusting `ca` (presenting `client`
/// when given) and asserts that it succeeds (`ok`) or fails; returns its
/// output.
async fn mosquitto(
    ok: bool,
    tool: &str,
    port: u16,
    ca: &Path,
    client: Option<(&Path, &Path)>,
    args: &[&str],
) -> Output {
    let mut cmd = tokio::process::Command::new(tool);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .arg("--cafile")
        .arg(ca);
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let o = cmd
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {tool} (apt-get install mosquitto-clients): {e}"));
    let want = if ok { "succeed" } else { "fail" };
    assert_eq!(
        o.status.success(),
        ok,
        "{tool} {args:?} should {want}: {}",
        text(&o)
    );
    o
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn frond_with_tls(pki: &Pki, require_client: bool) -> (Frond, u16, u16) {
    let tls_port = free_port();
    let wss_port = free_port();
    let spec = FrondSpec {
        mqtt_config: format!(
            "tls_listen = \"127.0.0.1:{tls_port}\"\nwss_listen = \"127.0.0.1:{wss_port}\"\n"
        ),
        extra_config: pki.frond_section(require_client),
        ..FrondSpec::default()
    };
    let frond = Frond::start_new(spec).await;
    wait_until("the TLS port accepts", LONG, || accepts_tcp(tls_port)).await;
    (frond, tls_port, wss_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_mosquitto_clients() {
    let pki = Pki::new();
    let (frond, port, _) = frond_with_tls(&pki, false).await;
    let ca = pki.path("ca.pem");

    // A retained QoS 1 publish over TLS, then a subscriber over TLS gets it.
    let publish = ["-q", "1", "-r", "-t", "telemetry/tls", "-m", "secret-1"];
    mosquitto(true, "mosquitto_pub", port, &ca, None, &publish).await;
    let subscribe = ["-q", "1", "-t", "telemetry/tls", "-C", "1", "-W", "10"];
    let o = mosquitto(true, "mosquitto_sub", port, &ca, None, &subscribe).await;
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "secret-1");

    // The plain TCP listener keeps working alongside.
    let mut probe = MqttProbe::connect(frond.mqtt_port, "plain", "telemetry/tls").await;
    probe.roundtrip("plain-after-tls").await;

    // A client that trusts another CA refuses frond's certificate.
    let other = Pki::new().path("ca.pem");
    let publish = ["-q", "1", "-t", "x", "-m", "m"];
    mosquitto(false, "mosquitto_pub", port, &other, None, &publish).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_required_when_tls_ca_is_set() {
    let pki = Pki::new();
    let (_frond, port, _) = frond_with_tls(&pki, true).await;
    let ca = pki.path("ca.pem");
    let publish = ["-q", "1", "-t", "t", "-m", "m"];
    // Without a client certificate: refused.
    mosquitto(false, "mosquitto_pub", port, &ca, None, &publish).await;
    // With one signed by tls.ca: accepted.
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    mosquitto(
        true,
        "mosquitto_pub",
        port,
        &ca,
        Some((&cert, &key)),
        &publish,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_round_trip_over_wss() {
    let pki = Pki::new();
    let (_frond, _, wss_port) = frond_with_tls(&pki, false).await;
    wait_until("the wss port accepts", LONG, || accepts_tcp(wss_port)).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/ws_roundtrip.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(wss_port.to_string())
        .arg(pki.path("ca.pem"))
        .output()
        .await
        .expect("run python3 (install paho-mqtt: pip install paho-mqtt==2.1.0)");
    assert!(
        out.status.success(),
        "paho over wss failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The hub requires TLS (its INFO says so); frond upgrades after INFO,
/// verifies the hub against `uplink.tls_ca` and mirrors exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_mirrors_to_a_hub_that_requires_tls() {
    let pki = Pki::new();
    let hub = NatsServer::start_with_tls(Some((
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    )))
    .await;
    hub.create_stream("FLEET", &["fleet.>"], std::time::Duration::from_secs(120))
        .await;
    let mut spec = FrondSpec::with_hub(hub.url());
    spec.uplink_extra = format!("tls_ca = \"{}\"\n", pki.path("ca.pem").display());
    let frond = Frond::start_new(spec).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", "telemetry/truck1/gps", "msg");
    publ.publish(0..200, LONG).await;
    hub.wait_count_at_least("FLEET", 200, LONG).await;
    let msgs = hub.read_all("FLEET").await;
    assert_eq!(msgs.len(), 200, "exactly once");
    assert!(
        frond.log_text().contains("connected to nats://127.0.0.1"),
        "{}",
        frond.log_text()
    );
}
