//! Security tests: sessions (see tests/security.rs for the cast).
//!
//! Findings 2 (a persistent session taken over by another user), 4
//! (`deny_subscribe` bypassed by a stream cursor), 6 (narrowed
//! permissions not applied to a restored session), 9 (long client ids
//! lose session and will) and 10 (a failed session save acknowledged).

#[allow(unused_imports)]
use super::*;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, Outgoing,
    Packet, QoS, SubscribeReasonCode,
};
use tokio::sync::mpsc;

const LONG: Duration = Duration::from_secs(20);

/// What the event loop of a [`Dev`] saw.
#[derive(Debug)]
enum Ev {
    /// (topic, payload)
    Publish(String, String),
    /// Per filter: granted?
    SubAck(Vec<bool>),
    PubAck,
    PubRec,
    /// The connection ended (clean DISCONNECT sent, or an error).
    Closed(String),
}

/// An MQTT 3.1.1 client (rumqttc) logged in as one user of the cast; its
/// event loop runs in a task that forwards what it sees.
struct Dev {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Ev>,
    present: bool,
    /// Every PUBLISH received so far: (topic, payload).
    got: Vec<(String, String)>,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Why a CONNECT was refused, or the connected client.
async fn connect(
    f: &Frond,
    id: &str,
    user: &str,
    clean: bool,
    will: Option<LastWill>,
) -> Result<Dev, String> {
    let mut o = MqttOptions::new(id, "127.0.0.1", f.mqtt_port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(clean);
    o.set_credentials(user, password(user));
    // Room for a 65,000-byte client id in CONNECT.
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(w) = will {
        o.set_last_will(w);
    }
    let (client, mut el) = AsyncClient::new(o, 64);
    let present = loop {
        match tokio::time::timeout(LONG, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(c)))) => break c.session_present,
            Ok(Ok(_)) => {}
            Ok(Err(ConnectionError::ConnectionRefused(code))) => return Err(format!("{code:?}")),
            Ok(Err(e)) => return Err(format!("connection failed: {e}")),
            Err(_) => panic!("{user}: no CONNACK within {LONG:?}"),
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let ev = match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => Ev::Publish(
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                ),
                Ok(Event::Incoming(Packet::SubAck(s))) => Ev::SubAck(
                    s.return_codes
                        .iter()
                        .map(|c| matches!(c, SubscribeReasonCode::Success(_)))
                        .collect(),
                ),
                Ok(Event::Incoming(Packet::PubAck(_))) => Ev::PubAck,
                Ok(Event::Incoming(Packet::PubRec(_))) => Ev::PubRec,
                Ok(Event::Outgoing(Outgoing::Disconnect)) => Ev::Closed("DISCONNECT sent".into()),
                Ok(_) => continue,
                Err(e) => Ev::Closed(e.to_string()),
            };
            let closed = matches!(ev, Ev::Closed(_));
            if tx.send(ev).is_err() || closed {
                return;
            }
        }
    });
    Ok(Dev {
        client,
        rx,
        present,
        got: Vec::new(),
    })
}

/// [`connect`], which must succeed.
async fn dev(f: &Frond, id: &str, user: &str, clean: bool) -> Dev {
    connect(f, id, user, clean, None)
        .await
        .unwrap_or_else(|e| panic!("{user} connects as {id:.40}: {e}"))
}

impl Dev {
    /// The next event that is not a PUBLISH (PUBLISHes go to `got`).
    async fn next_other(&mut self) -> Ev {
        loop {
            match tokio::time::timeout(LONG, self.rx.recv()).await {
                Ok(Some(Ev::Publish(t, p))) => self.got.push((t, p)),
                Ok(Some(ev)) => return ev,
                Ok(None) => return Ev::Closed("event loop ended".into()),
                Err(_) => panic!("no event within {LONG:?}"),
            }
        }
    }

    /// Subscribe `filter` at QoS 1; whether it was granted.
    async fn subscribe(&mut self, filter: &str) -> bool {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue SUBSCRIBE");
        match self.next_other().await {
            Ev::SubAck(codes) => codes.first().copied().unwrap_or(false),
            other => panic!("expected SUBACK for {filter}, got {other:?}"),
        }
    }

    /// Wait until a PUBLISH with `payload` arrived.
    async fn wait_payload(&mut self, payload: &str) {
        let deadline = tokio::time::Instant::now() + LONG;
        while !self.got.iter().any(|(_, p)| p == payload) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Ev::Publish(t, p))) => self.got.push((t, p)),
                Ok(Some(Ev::Closed(why))) => panic!("closed while waiting for {payload}: {why}"),
                Ok(Some(_)) => {}
                Ok(None) => panic!("event loop ended while waiting for {payload}"),
                Err(_) => panic!("{payload} not received within {LONG:?}; got {:?}", self.got),
            }
        }
    }

    fn received(&self, payload: &str) -> bool {
        self.got.iter().any(|(_, p)| p == payload)
    }

    /// Disconnect cleanly (DISCONNECT sent).
    async fn disconnect(mut self) {
        self.client.disconnect().await.expect("queue DISCONNECT");
        loop {
            match self.next_other().await {
                Ev::Closed(_) => return,
                _ => continue,
            }
        }
    }
}

/// Publish at QoS 1 as `user` and wait for the PUBACK (the message is
/// stored when a stream captures it).
async fn publish(f: &Frond, user: &str, topic: &str, payload: &str) {
    let id = format!("pub-{}", SEQ.fetch_add(1, Ordering::Relaxed));
    let mut p = dev(f, &id, user, true).await;
    p.client
        .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
        .await
        .expect("queue PUBLISH");
    match p.next_other().await {
        Ev::PubAck => {}
        other => panic!("no PUBACK for {topic}: {other:?}"),
    }
    p.disconnect().await;
}

/// Finding 2: alice cannot take over admin's persistent session
/// `plant-controller` (subscribed to `secret/#`), neither while admin is
/// connected (she would kick him and get his live messages) nor while he
/// is away (she would get the queued ones): CONNACK 0x05 (not
/// authorized), and admin keeps his connection and his session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_02_persistent_session_belongs_to_its_user() {
    let f = setup().await;
    let mut admin = dev(&f, "plant-controller", "admin", false).await;
    assert!(admin.subscribe("secret/#").await);

    // Live: refused, and admin is not disconnected.
    let live = connect(&f, "plant-controller", "alice", false, None).await;
    assert!(
        matches!(&live, Err(code) if code == &format!("{:?}", ConnectReturnCode::NotAuthorized)),
        "alice must be refused while admin holds plant-controller; got {:?}",
        live.as_ref().map(|d| d.present)
    );
    publish(&f, "admin", "secret/live", "live-1").await;
    admin.wait_payload("live-1").await;
    admin.disconnect().await;

    // Stored: refused too (a clean start would delete admin's session).
    publish(&f, "admin", "secret/queued", "queued-1").await;
    for clean in [false, true] {
        let r = connect(&f, "plant-controller", "alice", clean, None).await;
        if let Ok(mut alice) = r {
            let present = alice.present;
            // Whatever she gets within a marker's round trip is a leak.
            publish(&f, "admin", "a/marker", "marker").await;
            let _ =
                tokio::time::timeout(Duration::from_secs(2), alice.wait_payload("queued-1")).await;
            panic!(
                "alice (clean = {clean}) took over admin's stored session: session present = {present}, got {:?}",
                alice.got
            );
        }
    }

    // admin's session is intact.
    let mut admin = dev(&f, "plant-controller", "admin", false).await;
    assert!(admin.present, "admin's session survived alice's attempts");
    admin.wait_payload("queued-1").await;
    admin.disconnect().await;
}

/// Finding 4: dave (deny_subscribe `secret.>`) subscribes `#` in a
/// persistent session; messages on `secret/...` that stream SEC holds must
/// not reach him from his session's stream cursor, live or queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_04_stream_cursor_honours_deny_subscribe() {
    let f = setup().await;
    let mut dave = dev(&f, "dave-dev", "dave", false).await;
    assert!(
        dave.subscribe("#").await,
        "`#` partly overlaps the deny list"
    );

    // Live. The secret is stored (PUBACK) before the marker is published;
    // the session reads every stream it follows when any grows, so once the
    // marker is here, SEC was read past the secret.
    publish(&f, "admin", "secret/s", "secret-live").await;
    publish(&f, "admin", "a/m", "marker-live").await;
    dave.wait_payload("marker-live").await;
    assert!(!dave.received("secret-live"), "dave got {:?}", dave.got);
    dave.disconnect().await;

    // Queued while dave is away.
    publish(&f, "admin", "secret/s", "secret-queued").await;
    publish(&f, "admin", "a/m", "marker-queued").await;
    let mut dave = dev(&f, "dave-dev", "dave", false).await;
    assert!(dave.present);
    dave.wait_payload("marker-queued").await;
    publish(&f, "admin", "a/m", "marker-after").await;
    dave.wait_payload("marker-after").await;
    assert!(
        !dave.received("secret-queued") && !dave.received("secret-live"),
        "dave got {:?}",
        dave.got
    );
    dave.disconnect().await;
}

/// Finding 6: alice's persistent subscription `a/#` was allowed; frond
/// restarts with alice narrowed to `a.pub.>`: the restored `a.>` is
/// dropped (and logged), `a/pub/#` keeps delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_06_restored_subscriptions_are_rechecked() {
    let mut f = setup().await;
    let mut alice = dev(&f, "alice-dev", "alice", false).await;
    assert!(alice.subscribe("a/#").await);
    assert!(alice.subscribe("a/pub/#").await);
    alice.disconnect().await;
    f.terminate();

    let cfg = std::fs::read_to_string(f.config_path()).expect("read config");
    let narrowed = cfg.replacen(
        "allow_subscribe = [\"a.>\"]\n",
        "allow_subscribe = [\"a.pub.>\"]\n",
        1,
    );
    assert_ne!(cfg, narrowed, "alice's allow_subscribe found in the config");
    std::fs::write(f.config_path(), narrowed).expect("write config");
    f.start().await;

    // Stream A, in this order: the forbidden one, then the marker.
    publish(&f, "admin", "a/x", "no-longer-allowed").await;
    publish(&f, "admin", "a/pub/m", "marker").await;
    let mut alice = dev(&f, "alice-dev", "alice", false).await;
    assert!(alice.present, "alice's session is restored");
    alice.wait_payload("marker").await;
    assert!(
        !alice.received("no-longer-allowed"),
        "a restored subscription outside alice's current permissions delivered: {:?}",
        alice.got
    );
    alice.disconnect().await;
    let log = f.current_log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("alice-dev") && l.contains("a.>")),
        "the dropped subscription is logged at warn with client id and filter"
    );
}

/// Finding 9: client ids of 300 and 65,000 bytes (with `/`, `..` and
/// non-ASCII) keep their session (session present, queued messages) and
/// their will across a SIGKILL of frond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_09_long_client_ids_keep_session_and_will() {
    let mut f = setup().await;
    let id = |n: usize| {
        let head = "../dev/ü/";
        format!("{head}{}", "x".repeat(n - head.len()))
    };
    let ids = [id(300), id(65_000)];
    assert_eq!((ids[0].len(), ids[1].len()), (300, 65_000));

    // A watcher whose own session collects the wills from stream A.
    let mut watch = dev(&f, "will-watch", "admin", false).await;
    assert!(watch.subscribe("a/will/#").await);
    watch.disconnect().await;

    let mut alive = Vec::new();
    for (k, id) in ids.iter().enumerate() {
        let mut d = dev(&f, id, "admin", false).await;
        assert!(!d.present, "a new session");
        assert!(d.subscribe(&format!("a/q/{k}/#")).await);
        d.disconnect().await;
        publish(&f, "admin", &format!("a/q/{k}/1"), &format!("queued-{k}")).await;
        let will = LastWill::new(
            format!("a/will/{k}"),
            format!("gone-{k}"),
            QoS::AtLeastOnce,
            false,
        );
        let mut d = connect(&f, id, "admin", false, Some(will))
            .await
            .unwrap_or_else(|e| panic!("client id of {} bytes: {e}", id.len()));
        assert!(
            d.present,
            "a {}-byte client id keeps its session across a reconnect",
            id.len()
        );
        d.wait_payload(&format!("queued-{k}")).await;
        alive.push(d);
    }

    f.kill9();
    drop(alive);
    f.start().await;

    let mut watch = dev(&f, "will-watch", "admin", false).await;
    assert!(watch.present);
    watch.wait_payload("gone-0").await;
    watch.wait_payload("gone-1").await;
    watch.disconnect().await;

    for (k, id) in ids.iter().enumerate() {
        publish(&f, "admin", &format!("a/q/{k}/2"), &format!("after-{k}")).await;
        let mut d = dev(&f, id, "admin", false).await;
        assert!(
            d.present,
            "a {}-byte client id keeps its session across a SIGKILL",
            id.len()
        );
        d.wait_payload(&format!("after-{k}")).await;
        d.disconnect().await;
    }
}

/// Finding 10: with the session directory unusable (a file in its place,
/// so every session write fails for real), a persistent SUBSCRIBE is
/// refused (SUBACK failure, and nothing delivered through it), and an
/// inbound QoS 2 PUBLISH gets no PUBREC (the connection is closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_10_failed_session_save_is_not_acknowledged() {
    let f = setup().await;
    let mut d = dev(&f, "durable-dev", "admin", false).await;
    assert!(d.subscribe("a/ok/#").await, "saved while the disk works");

    let dir = f.data_dir().join("mqtt").join("sessions");
    std::fs::remove_dir_all(&dir).expect("remove the session directory");
    std::fs::write(&dir, b"not a directory").expect("a file in its place");

    assert!(
        !d.subscribe("a/d/#").await,
        "SUBACK must refuse a subscription that could not be saved"
    );
    // Not live either: stream A, in this order.
    publish(&f, "admin", "a/d/x", "refused-sub").await;
    publish(&f, "admin", "a/ok/m", "marker").await;
    d.wait_payload("marker").await;
    assert!(!d.received("refused-sub"), "got {:?}", d.got);

    // QoS 2: stored in stream A, but its packet id cannot be: no PUBREC.
    d.client
        .publish("a/d/q2", QoS::ExactlyOnce, false, b"q2".to_vec())
        .await
        .expect("queue PUBLISH");
    match d.next_other().await {
        Ev::Closed(_) => {}
        other => panic!("expected the connection to close without PUBREC, got {other:?}"),
    }
}
