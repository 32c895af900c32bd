//! Security tests: paths (see tests/security.rs for the cast). Every path a
//! message or a frame takes is checked: wills (finding 3), shared
//! subscriptions (12), the two log-spam cases (13) and WebSocket framing.

#[allow(unused_imports)]
use super::*;

use std::time::Duration;

use frond::wire::mqtt::{self as wire, Connect, Packet as WPacket, Properties, Version, Will};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

/// An MQTT 3.1.1 client (rumqttc) logged in as a user of the cast, with
/// what it receives in channels.
struct Mqtt {
    client: AsyncClient,
    msgs: mpsc::UnboundedReceiver<Publish>,
    subacks: mpsc::UnboundedReceiver<Vec<rumqttc::SubscribeReasonCode>>,
}

impl Mqtt {
    async fn connect(f: &Frond, user: &str, id: &str) -> Mqtt {
        let mut o = MqttOptions::new(id, "127.0.0.1", f.mqtt_port);
        o.set_credentials(user, password(user));
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(o, 256);
        loop {
            match timeout(T, el.poll()).await.expect("CONNACK within 10 s") {
                Ok(Event::Incoming(Packet::ConnAck(c))) => {
                    assert_eq!(c.code, ConnectReturnCode::Success, "{user} connects");
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("{user} cannot connect over MQTT: {e}"),
            }
        }
        let (msg_tx, msgs) = mpsc::unbounded_channel();
        let (sub_tx, subacks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(ev) = el.poll().await {
                match ev {
                    Event::Incoming(Packet::Publish(p)) => {
                        let _ = msg_tx.send(p);
                    }
                    Event::Incoming(Packet::SubAck(a)) => {
                        let _ = sub_tx.send(a.return_codes);
                    }
                    _ => {}
                }
            }
        });
        Mqtt {
            client,
            msgs,
            subacks,
        }
    }

    /// Subscribe at QoS 1 and wait for the grant.
    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue SUBSCRIBE");
        let codes = timeout(T, self.subacks.recv())
            .await
            .expect("SUBACK within 10 s")
            .expect("connection alive");
        assert_eq!(
            codes,
            vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            "{filter} granted"
        );
    }

    /// Messages received until (and without) the first on `topic` with
    /// `payload`.
    async fn until(&mut self, topic: &str, payload: &[u8]) -> Vec<Publish> {
        let mut before = Vec::new();
        loop {
            let p = timeout(T, self.msgs.recv())
                .await
                .unwrap_or_else(|_| panic!("{topic} {payload:?} within 10 s; got {before:?}"))
                .expect("connection alive");
            if p.topic == topic && p.payload.as_ref() == payload {
                return before;
            }
            before.push(p);
        }
    }
}

/// The MQTT packets frond sends on `sock` until it closes it (or 10 s).
async fn packets_until_closed(sock: &mut TcpStream, v: Version) -> Vec<WPacket> {
    let mut buf = Vec::new();
    let mut got = Vec::new();
    let _ = timeout(T, async {
        loop {
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            while let Ok(Some((p, used))) = wire::decode(&buf, Some(v), usize::MAX) {
                buf.drain(..used);
                got.push(p);
            }
        }
    })
    .await;
    got
}

/// Lines of `log` at WARN or ERROR level.
fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

/// Finding 3: a will is a publish by its client. alice may publish only
/// `a.>`; her will on `secret/will` (QoS 1, retain) must never be
/// published: frond refuses her CONNECT (3.1.1 return code 5, as HiveMQ,
/// EMQX and VerneMQ do), so dropping the TCP connection publishes nothing,
/// stores nothing in SEC and leaves no retained message. A will owed
/// across a crash is checked again against the configuration frond
/// restarts with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_to_a_denied_topic_is_never_published() {
    let f = setup().await;
    let mut admin = Mqtt::connect(&f, "admin", "admin-watch").await;
    admin.subscribe("secret/#").await;

    let mut sock = TcpStream::connect(("127.0.0.1", f.mqtt_port))
        .await
        .expect("connect to MQTT");
    let mut out = Vec::new();
    let connect = WPacket::Connect(Connect {
        version: Version::V311,
        clean_start: true,
        keep_alive: 30,
        client_id: "alice-dev".into(),
        will: Some(Will {
            topic: "secret/will".into(),
            payload: b"alice-gone".to_vec(),
            qos: wire::QoS::AtLeastOnce,
            retain: true,
            properties: Properties::default(),
        }),
        username: Some("alice".into()),
        password: Some(password("alice").into_bytes()),
        properties: Properties::default(),
    });
    wire::encode(&connect, Version::V311, &mut out).expect("encode CONNECT");
    sock.write_all(&out).await.expect("send CONNECT");
    // The CONNACK, whatever it says; then the TCP connection is dropped.
    let mut first = [0u8; 4];
    let connack = timeout(T, sock.read_exact(&mut first))
        .await
        .expect("CONNACK within 10 s")
        .map(|_| first);
    drop(sock);
    wait_until("alice's connection is gone", T, || async {
        f.varz()
            .await
            .is_some_and(|v| v["mqtt"]["connections"].as_u64() == Some(1))
    })
    .await;

    // A later message on the same path proves the will's absence.
    admin
        .client
        .publish("secret/marker", QoS::AtLeastOnce, false, "m")
        .await
        .expect("queue marker");
    let before = admin.until("secret/marker", b"m").await;
    assert!(
        before.iter().all(|p| p.topic != "secret/will"),
        "admin received alice's will: {before:?}"
    );
    wait_until("the marker is in SEC", T, || async {
        stream_count(&f, "SEC").await >= 1
    })
    .await;
    assert_eq!(stream_count(&f, "SEC").await, 1, "only the marker in SEC");

    // No retained message on secret/will: a new subscriber gets only the
    // live marker.
    let mut late = Mqtt::connect(&f, "admin", "admin-late").await;
    late.subscribe("secret/will").await;
    admin
        .client
        .publish("secret/will", QoS::AtLeastOnce, false, "m2")
        .await
        .expect("queue marker");
    let before = late.until("secret/will", b"m2").await;
    assert!(before.is_empty(), "retained will delivered: {before:?}");

    // How frond said no: CONNACK with return code 5 (not authorized).
    let connack = connack.expect("a CONNACK, not a closed connection");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x05], "CONNACK refused 0x05");

    // A will armed while allowed and owed across a crash is checked again
    // against the configuration frond restarts with: the operator narrowed
    // alice to `a.only`, so her will on `a/will` is not published.
    let mut sock = TcpStream::connect(("127.0.0.1", f.mqtt_port))
        .await
        .expect("connect to MQTT");
    let mut out = Vec::new();
    let connect = WPacket::Connect(Connect {
        version: Version::V311,
        clean_start: true,
        keep_alive: 30,
        client_id: "alice-dev".into(),
        will: Some(Will {
            topic: "a/will".into(),
            payload: b"alice-gone".to_vec(),
            qos: wire::QoS::AtLeastOnce,
            retain: true,
            properties: Properties::default(),
        }),
        username: Some("alice".into()),
        password: Some(password("alice").into_bytes()),
        properties: Properties::default(),
    });
    wire::encode(&connect, Version::V311, &mut out).expect("encode CONNECT");
    sock.write_all(&out).await.expect("send CONNECT");
    let mut connack = [0u8; 4];
    timeout(T, sock.read_exact(&mut connack))
        .await
        .expect("CONNACK within 10 s")
        .expect("CONNACK");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "allowed will accepted");
    let mut f = f;
    f.kill9();
    drop(sock);
    let cfg = std::fs::read_to_string(f.config_path()).expect("read config");
    let narrowed = cfg.replacen(
        "allow_publish = [\"a.>\"]\n",
        "allow_publish = [\"a.only\"]\n",
        1,
    );
    assert_ne!(cfg, narrowed, "alice's allow_publish found");
    std::fs::write(f.config_path(), narrowed).expect("write config");
    f.start().await;
    wait_until("the owed will is settled", T, || async {
        f.current_log().contains("is not published") || stream_count(&f, "A").await > 0
    })
    .await;
    assert_eq!(stream_count(&f, "A").await, 0, "the will was published");
    let mut late = Mqtt::connect(&f, "admin", "admin-after").await;
    late.subscribe("a/will").await;
    late.client
        .publish("a/will", QoS::AtLeastOnce, false, "m3")
        .await
        .expect("queue marker");
    let before = late.until("a/will", b"m3").await;
    assert!(before.is_empty(), "retained will delivered: {before:?}");
}

/// Finding 12: admin holds `$share/G/secret/#` and dave (denied
/// `secret.>`) `$share/G/#`. Every message to `secret/s` must reach
/// admin: the member is chosen among those allowed to receive it, never
/// chosen as dave and then dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_picks_a_member_allowed_to_receive() {
    let f = setup().await;
    let mut admin = Mqtt::connect(&f, "admin", "admin-share").await;
    admin.subscribe("$share/G/secret/#").await;
    let mut dave = Mqtt::connect(&f, "dave", "dave-share").await;
    dave.subscribe("$share/G/#").await;

    let nc = nats_as(&f, "admin").await;
    for i in 0..100 {
        nc.publish("secret.s", format!("{i}").into())
            .await
            .expect("publish secret.s");
    }
    nc.flush().await.expect("flush");
    let mut got = Vec::new();
    while got.len() < 100 {
        let p = timeout(T, admin.msgs.recv())
            .await
            .unwrap_or_else(|_| panic!("admin got only {} of 100 messages", got.len()))
            .expect("admin connection alive");
        assert_eq!(p.topic, "secret/s");
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    let want: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "all 100, in order");

    // dave got none of them: a later message only his filter matches.
    nc.publish("x.marker", "m".into()).await.expect("marker");
    nc.flush().await.expect("flush");
    let before = dave.until("x/marker", b"m").await;
    assert!(before.is_empty(), "dave received {before:?}");
}

/// Finding 13 (a): a second CONNECT with protocol level 9 after a 5.0
/// CONNECT is a protocol error: DISCONNECT 0x82 and close, with no ERROR
/// in the log (0x84 is a CONNACK code and cannot be encoded in a
/// DISCONNECT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connect_with_an_unknown_level_is_a_quiet_protocol_error() {
    let f = setup().await;
    let mut sock = TcpStream::connect(("127.0.0.1", f.mqtt_port))
        .await
        .expect("connect to MQTT");
    let connect = |v: Version| {
        let mut out = Vec::new();
        let p = WPacket::Connect(Connect {
            version: v,
            clean_start: true,
            keep_alive: 30,
            client_id: "twice".into(),
            will: None,
            username: Some("admin".into()),
            password: Some(password("admin").into_bytes()),
            properties: Properties::default(),
        });
        wire::encode(&p, v, &mut out).expect("encode CONNECT");
        out
    };
    sock.write_all(&connect(Version::V5))
        .await
        .expect("CONNECT");
    let mut second = connect(Version::V311);
    assert_eq!(second[8], 4, "protocol level byte");
    second[8] = 9;
    let before = f.log_text().len();
    sock.write_all(&second).await.expect("second CONNECT");
    let got = packets_until_closed(&mut sock, Version::V5).await;
    assert!(
        matches!(&got[..], [WPacket::ConnAck(c), WPacket::Disconnect(d)] if c.code == 0 && d.code == 0x82),
        "CONNACK then DISCONNECT 0x82, got {got:?}"
    );
    let log = f.log_text();
    let tail = log.get(before..).unwrap_or_default();
    assert!(warnings(tail).is_empty(), "{tail}");
}

/// Finding 13 (b): a NATS `SUB` whose sid holds a control character is
/// refused with `-ERR` (the connection stays usable), so no delivery can
/// fail on it and log a warning per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sub_with_a_control_character_sid_is_refused() {
    let f = setup().await;
    let mut sock = TcpStream::connect(("127.0.0.1", f.nats_port))
        .await
        .expect("connect to NATS");
    let before = f.log_text().len();
    let mut script = format!(
        "CONNECT {{\"user\":\"admin\",\"pass\":\"{}\",\"verbose\":false}}\r\nSUB a.x x\x01y\r\nSUB a.x 7\r\n",
        password("admin")
    );
    for _ in 0..5 {
        script.push_str("PUB a.x 2\r\nhi\r\n");
    }
    script.push_str("PING\r\n");
    sock.write_all(script.as_bytes()).await.expect("send");
    let mut text = String::new();
    timeout(T, async {
        let mut chunk = [0u8; 4096];
        while !text.contains("PONG\r\n") {
            let n = sock.read(&mut chunk).await.expect("read");
            assert!(n > 0, "frond closed the connection: {text:?}");
            text.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("PONG within 10 s: {text:?}"));
    assert!(
        text.contains("-ERR 'Invalid Subscription ID'\r\n"),
        "SUB refused: {text:?}"
    );
    assert_eq!(
        text.matches("MSG a.x 7 2\r\nhi\r\n").count(),
        5,
        "the valid subscription works: {text:?}"
    );
    assert!(
        !text.contains('\x01'),
        "no delivery on the bad sid: {text:?}"
    );
    let log = f.log_text();
    let tail = log.get(before..).unwrap_or_default();
    assert!(warnings(tail).is_empty(), "{tail}");
}

/// Send one masked client frame on a fresh WebSocket connection and
/// return what frond sends back until it closes the connection.
async fn ws_answer_to(f: &Frond, frame: &[u8]) -> Vec<u8> {
    let mut sock = TcpStream::connect(("127.0.0.1", f.ws_port))
        .await
        .expect("connect to the WebSocket port");
    let req = "GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";
    sock.write_all(req.as_bytes()).await.expect("upgrade");
    let mut head = Vec::new();
    timeout(T, async {
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            sock.read_exact(&mut b).await.expect("response head");
            head.push(b[0]);
        }
    })
    .await
    .expect("upgrade answered within 10 s");
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    sock.write_all(frame).await.expect("send frame");
    let mut back = Vec::new();
    let _ = timeout(Duration::from_secs(5), sock.read_to_end(&mut back)).await;
    back
}

/// A masked client frame.
fn ws_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// WebSocket framing (RFC 6455 §5.4, §5.5): a continuation frame with no
/// message before it, a control frame over 125 bytes and a fragmented
/// control frame each close the connection with status 1002 (protocol
/// error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_framing_violations_close_with_1002() {
    let f = Frond::start_new(FrondSpec {
        ws: true,
        extra_config: SETUP.to_string(),
        ..Default::default()
    })
    .await;
    wait_until("the WebSocket port accepts", T, || accepts_tcp(f.ws_port)).await;
    let cases = [
        ("continuation first", ws_frame(true, 0x0, &[0x10, 0x00])),
        ("ping of 126 bytes", ws_frame(true, 0x9, &[7; 126])),
        ("fragmented ping", ws_frame(false, 0x9, b"p")),
    ];
    for (what, frame) in cases {
        let back = ws_answer_to(&f, &frame).await;
        assert!(
            back.len() >= 4 && back[0] == 0x88 && back[2..4] == 1002u16.to_be_bytes(),
            "{what}: expected a close frame with 1002, got {back:?}"
        );
        assert_eq!(back.len(), 2 + usize::from(back[1]), "{what}: then EOF");
    }
}
