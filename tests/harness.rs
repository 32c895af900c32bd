//! Self-tests of the test harness that need no frond: the nats-server hub
//! (start, stop, restart on the same port and store) and the fault proxy
//! (forwarding, cut, refuse, blackhole).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_restart_keeps_stream_data() {
    let mut hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    let payloads: Vec<String> = (0..20).map(|i| payload("h", i)).collect();
    hub.js_publish("fleet.x.telemetry.t1", &payloads).await;
    assert_eq!(hub.count("FLEET").await, 20);

    let port = hub.port;
    hub.stop();
    assert!(!hub.is_running());
    assert!(
        !accepts_tcp(port).await,
        "stopped hub still accepts connections"
    );
    assert_eq!(
        hub.try_count("FLEET").await,
        None,
        "a stopped hub has no count"
    );

    hub.restart().await;
    assert_eq!(hub.port, port, "restart keeps the port");
    let msgs = hub.read_all("FLEET").await;
    let got: Vec<&str> = msgs.iter().map(|m| m.payload.as_str()).collect();
    let want: Vec<&str> = payloads.iter().map(|s| s.as_str()).collect();
    assert_eq!(got, want, "stream contents survive a restart, in order");
    assert!(msgs.iter().all(|m| m.subject == "fleet.x.telemetry.t1"));
    assert!(msgs.iter().all(|m| m.msg_id.is_none()));
    let seqs: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_dedups_by_msg_id_and_read_all_returns_it() {
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(1))
        .await;
    let js = hub.jetstream().await;
    for (i, id) in ["n:S:1", "n:S:2", "n:S:2", "n:S:3"].iter().enumerate() {
        let mut h = async_nats::HeaderMap::new();
        h.insert(async_nats::header::NATS_MESSAGE_ID, *id);
        js.publish_with_headers("fleet.n.a", h, format!("p{i}").into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
    }
    let msgs = hub.read_all("FLEET").await;
    let ids: Vec<Option<&str>> = msgs.iter().map(|m| m.msg_id.as_deref()).collect();
    assert_eq!(ids, vec![Some("n:S:1"), Some("n:S:2"), Some("n:S:3")]);
    assert_eq!(msg_id_seq("n:S:3", "n", "S"), Some(3));
    assert_eq!(msg_id_seq("n:T:3", "n", "S"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_and_cut_breaks_the_connection() {
    let hub = NatsServer::start().await;
    let proxy = FaultProxy::start(hub.port).await;

    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let ev_tx = Arc::new(ev_tx);
    let client = async_nats::ConnectOptions::new()
        .event_callback(move |ev| {
            let tx = ev_tx.clone();
            async move {
                let _ = tx.send(ev.to_string());
            }
        })
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .connect(proxy.url())
        .await
        .expect("connect through the proxy");
    assert_eq!(proxy.forwarded(), 1);
    assert_eq!(proxy.active(), 1);

    // Round trip through the proxy.
    let mut sub = client.subscribe("probe").await.expect("subscribe");
    client
        .publish("probe", "one".into())
        .await
        .expect("publish");
    {
        use smol::stream::StreamExt;
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("message within 5s")
            .expect("subscription open");
        assert_eq!(&m.payload[..], b"one");
    }

    // Cut: the client sees a disconnect, then reconnects through the proxy.
    proxy.cut();
    wait_for("the client reports a disconnect", LONG, || {
        let got = matches!(ev_rx.try_recv(), Ok(ref e) if e.contains("disconnected"));
        async move { got.then_some(()) }
    })
    .await;
    wait_until("the client reconnects through the proxy", LONG, || {
        let ok = proxy.forwarded() >= 2
            && client.connection_state() == async_nats::connection::State::Connected;
        async move { ok }
    })
    .await;
    client.flush().await.expect("flush after reconnect");

    // Blocked: new connections are refused, existing ones cut.
    proxy.set_blocked(true);
    proxy.cut();
    let accepted = proxy.accepted();
    wait_until("the client retries against the blocked proxy", LONG, || {
        let ok = proxy.accepted() >= accepted + 2;
        async move { ok }
    })
    .await;
    assert_ne!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
    let forwarded = proxy.forwarded();
    proxy.set_blocked(false);
    wait_until("the client reconnects after unblocking", LONG, || {
        let ok = client.connection_state() == async_nats::connection::State::Connected;
        async move { ok }
    })
    .await;
    assert!(proxy.forwarded() > forwarded);
    client.flush().await.expect("flush after unblock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refuse_and_blackhole_modes() {
    // A plain TCP echo target.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let tport = target.local_addr().expect("addr").port();
    let echo = tokio::spawn(async move {
        while let Ok((mut s, _)) = target.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let proxy = FaultProxy::start(tport).await;

    let mut s = TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .expect("connect");
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo within 5s")
        .expect("read echo");
    assert_eq!(&buf, b"ping");

    // Refuse: accepted then closed at once.
    proxy.set_blocked(true);
    let mut one = [0u8; 1];
    // The reset may already be seen by connect() itself.
    if let Ok(mut r) = TcpStream::connect(("127.0.0.1", proxy.port)).await {
        let n = tokio::time::timeout(Duration::from_secs(5), r.read(&mut one))
            .await
            .expect("refused connection closes within 5s");
        assert!(
            matches!(n, Ok(0) | Err(_)),
            "refused connection must close, got {n:?}"
        );
    }
    assert_eq!(
        proxy.forwarded(),
        1,
        "a refused connection is not forwarded"
    );
    // The established connection is untouched until cut.
    s.write_all(b"pong").await.expect("write");
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo within 5s")
        .expect("read echo");
    assert_eq!(&buf, b"pong");
    proxy.cut();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut one))
        .await
        .expect("cut connection closes within 5s");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "cut connection must close, got {n:?}"
    );

    // Blackhole: accepted and held, nothing comes back.
    proxy.set_mode(ProxyMode::Blackhole);
    let mut b = TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .expect("connect");
    b.write_all(b"lost").await.expect("write");
    wait_until("the blackholed connection is held", LONG, || {
        let ok = proxy.active() == 1;
        async move { ok }
    })
    .await;
    let held = tokio::time::timeout(Duration::from_millis(300), b.read(&mut one)).await;
    assert!(
        held.is_err(),
        "a blackholed connection must stay silent, got {held:?}"
    );
    proxy.set_mode(ProxyMode::Forward);
    let n = tokio::time::timeout(Duration::from_secs(5), b.read(&mut one))
        .await
        .expect("held connection closes when the blackhole ends");
    assert!(matches!(n, Ok(0) | Err(_)));
    echo.abort();
}

/// A mosquitto broker (if installed) to check the MQTT helpers against a
/// broker nobody here wrote. The tests below skip when it is missing.
struct Mosquitto {
    port: u16,
    _dir: tempfile::TempDir,
    conf: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl Mosquitto {
    async fn start() -> Option<Mosquitto> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\n"),
        )
        .expect("write mosquitto.conf");
        let mut m = Mosquitto {
            port,
            _dir: dir,
            conf,
            child: None,
        };
        m.spawn(bin).await;
        Some(m)
    }

    async fn spawn(&mut self, bin: &str) {
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let port = self.port;
        wait_until("mosquitto accepts connections", LONG, || accepts_tcp(port)).await;
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_and_probe_against_mosquitto() {
    let Some(broker) = Mosquitto::start().await else {
        eprintln!("mosquitto not installed (apt-get install mosquitto); skipping");
        return;
    };
    let mut probe = MqttProbe::connect(broker.port, "probe", "t/probe").await;
    probe.roundtrip("a").await;
    let publ = Publisher::new(broker.port, "pub", "t/load", "x");
    let log = publ.publish(0..3000, LONG).await;
    assert_eq!(log.acked, (0..3000).collect());
    assert!(log.resent.is_empty());
    assert_eq!(log.sessions, 1);
    assert_eq!(
        publ.progress.load(std::sync::atomic::Ordering::SeqCst),
        3000
    );
    probe.roundtrip("b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_reconnects_across_a_broker_kill() {
    let Some(mut broker) = Mosquitto::start().await else {
        eprintln!("mosquitto not installed (apt-get install mosquitto); skipping");
        return;
    };
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("mosquitto binary");
    let mut publ = Publisher::new(broker.port, "pub", "t/load", "x").reconnecting();
    publ.inflight = 16;
    let p2 = publ.clone();
    let task = tokio::spawn(async move { p2.publish(0..20_000, LONG).await });
    wait_until("some PUBACKs", LONG, || {
        let n = publ.progress.load(std::sync::atomic::Ordering::SeqCst);
        async move { n >= 2000 }
    })
    .await;
    broker.kill9();
    broker.spawn(bin).await;
    let log = task.await.expect("publisher task");
    assert_eq!(log.acked, (0..20_000).collect(), "every index acknowledged");
    assert!(log.sessions >= 2, "the kill forced a reconnect");
    eprintln!("sessions {}, resent {}", log.sessions, log.resent.len());
}

/// The premise of `outage_longer_than_duplicate_window`: once the hub's
/// duplicate window has passed, a resent Nats-Msg-Id is stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_duplicate_window_expires() {
    let hub = NatsServer::start().await;
    let window = Duration::from_secs(1);
    hub.create_stream("FLEET", &["fleet.>"], window).await;
    let js = hub.jetstream().await;
    let publish = |text: &'static str| {
        let js = js.clone();
        async move {
            let mut h = async_nats::HeaderMap::new();
            h.insert(async_nats::header::NATS_MESSAGE_ID, "n:S:1");
            js.publish_with_headers("fleet.n.a", h, text.into())
                .await
                .expect("publish")
                .await
                .expect("PubAck")
        }
    };
    let first = std::time::Instant::now();
    assert!(!publish("a").await.duplicate);
    assert!(
        publish("b").await.duplicate,
        "within the window: a duplicate"
    );
    wait_elapsed(first, Duration::from_millis(1500)).await;
    assert!(
        !publish("c").await.duplicate,
        "after the window: stored again"
    );
    assert_eq!(hub.count("FLEET").await, 2);
}
