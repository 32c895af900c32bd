//! MQTT 5 test clients shared by the test files: [`Raw`], a raw client on
//! frond's own codec for tests that need exact packets (aliases, flow
//! control, reason codes), and [`V5`], a rumqttc v5 client whose event
//! loop runs in a task and hands CONNACK, SUBACK, PUBACK and PUBLISH
//! packets over channels.
//!
//! Invariants: every wait is bounded ([`T`], panicking with what was
//! awaited); a [`V5`]'s event-loop task ends when its connection does, or
//! with the test's runtime (nothing outlives the test).

use std::collections::VecDeque;
use std::time::Duration;

use frond::wire::mqtt::{
    self, Ack, ConnAck, Connect, Packet, Properties, Publish, QoS as WQoS, Subscribe,
    SubscriptionOptions, Version, Will,
};
use rumqttc::v5::mqttbytes::v5::{Packet as RPacket, Publish as RPublish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// How long any one packet may take to come.
const T: Duration = Duration::from_secs(10);

/// A v5 CONNECT with keep-alive 30 s and no credentials.
pub fn connect_packet(id: &str, clean: bool, props: Properties, will: Option<Will>) -> Packet {
    Packet::Connect(Connect {
        version: Version::V5,
        clean_start: clean,
        keep_alive: 30,
        client_id: id.into(),
        will,
        username: None,
        password: None,
        properties: props,
    })
}

/// A QoS 0 PUBLISH, with a topic alias when given.
pub fn raw_publish(topic: &str, alias: Option<u16>, payload: &[u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: WQoS::AtMostOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        properties: Properties {
            topic_alias: alias,
            ..Properties::default()
        },
        payload: payload.to_vec(),
    })
}

/// The PUBLISH in `p` (panics on any other packet).
pub fn publish_of(p: Packet) -> Publish {
    match p {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// A raw MQTT 5 client on frond's codec.
pub struct Raw {
    pub sock: TcpStream,
    buf: Vec<u8>,
    /// Packets read while waiting for another one, in order.
    pending: VecDeque<Packet>,
}

impl Raw {
    /// Connect and return the CONNACK (which must accept).
    pub async fn connect(port: u16, connect: Packet) -> (Raw, ConnAck) {
        let sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut raw = Raw {
            sock,
            buf: Vec::new(),
            pending: VecDeque::new(),
        };
        raw.send(&connect).await;
        match raw.recv().await {
            Packet::ConnAck(c) => {
                assert_eq!(c.code, 0, "CONNACK accepted");
                (raw, c)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connect with a clean start and these CONNECT properties; the
    /// CONNACK's properties.
    pub async fn with_props(port: u16, id: &str, props: Properties) -> (Raw, Properties) {
        let (raw, connack) = Raw::connect(port, connect_packet(id, true, props, None)).await;
        (raw, connack.properties)
    }

    /// Connect with a clean start and no properties.
    pub async fn plain(port: u16, id: &str) -> Raw {
        Raw::with_props(port, id, Properties::default()).await.0
    }

    pub async fn send(&mut self, p: &Packet) {
        let mut out = Vec::new();
        mqtt::encode(p, Version::V5, &mut out).unwrap();
        self.sock.write_all(&out).await.unwrap();
    }

    /// The next packet (panics after 10 s or on EOF).
    pub async fn recv(&mut self) -> Packet {
        if let Some(p) = self.pending.pop_front() {
            return p;
        }
        self.recv_within(T)
            .await
            .expect("a packet from frond within 10 s")
    }

    /// The next packet, or `None` when the connection closed; panics
    /// when nothing came within 10 s.
    pub async fn recv_or_eof(&mut self) -> Option<Packet> {
        if let Some(p) = self.pending.pop_front() {
            return Some(p);
        }
        loop {
            if let Some((p, used)) = mqtt::decode(&self.buf, Some(Version::V5), usize::MAX).unwrap()
            {
                self.buf.drain(..used);
                return Some(p);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(T, self.sock.read(&mut chunk))
                .await
                .expect("frond answers within 10 s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next packet if one comes within `t` (panics on EOF).
    pub async fn recv_within(&mut self, t: Duration) -> Option<Packet> {
        tokio::time::timeout(t, async {
            loop {
                if let Some((p, used)) =
                    mqtt::decode(&self.buf, Some(Version::V5), usize::MAX).unwrap()
                {
                    self.buf.drain(..used);
                    return p;
                }
                let mut chunk = [0u8; 4096];
                let n = self.sock.read(&mut chunk).await.unwrap();
                assert!(n > 0, "frond closed the connection");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .ok()
    }

    /// SUBSCRIBE one filter; the SUBACK's reason codes.
    pub async fn subscribe_with(
        &mut self,
        packet_id: u16,
        filter: &str,
        o: SubscriptionOptions,
        id: Option<u32>,
    ) -> Vec<u8> {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id,
            filters: vec![(filter.into(), o)],
            properties: Properties {
                subscription_identifiers: id.into_iter().collect(),
                ..Properties::default()
            },
        }))
        .await;
        match self.recv().await {
            Packet::SubAck(s) => {
                assert_eq!(s.packet_id, packet_id);
                s.codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// SUBSCRIBE one filter at `qos`, which must be granted.
    pub async fn subscribe(&mut self, packet_id: u16, filter: &str, qos: WQoS, id: Option<u32>) {
        let o = SubscriptionOptions {
            qos,
            ..SubscriptionOptions::default()
        };
        let codes = self.subscribe_with(packet_id, filter, o, id).await;
        assert_eq!(codes, vec![qos as u8], "granted");
    }

    /// Publish at QoS 1 and wait for the PUBACK (the message is routed);
    /// deliveries that come first are kept for [`Raw::recv`].
    pub async fn publish_q1(&mut self, packet_id: u16, topic: &str, retain: bool, payload: &[u8]) {
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos: WQoS::AtLeastOnce,
            retain,
            topic: topic.into(),
            packet_id: Some(packet_id),
            properties: Properties::default(),
            payload: payload.to_vec(),
        }))
        .await;
        let mut before = Vec::new();
        loop {
            match self.recv_within(T).await.expect("PUBACK within 10 s") {
                Packet::PubAck(a) => {
                    assert_eq!((a.packet_id, a.code), (packet_id, 0));
                    break;
                }
                p @ Packet::Publish(_) => before.push(p),
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
        self.pending.extend(before);
    }

    /// PUBACK `packet_id`.
    pub async fn puback(&mut self, packet_id: u16) {
        self.send(&Packet::PubAck(Ack {
            packet_id,
            code: 0,
            properties: Properties::default(),
        }))
        .await;
    }

    /// PINGREQ, then every packet until the PINGRESP.
    pub async fn ping(&mut self) -> Vec<Packet> {
        self.send(&Packet::PingReq).await;
        let mut before = Vec::new();
        loop {
            match self.recv().await {
                Packet::PingResp => return before,
                p => before.push(p),
            }
        }
    }
}

/// A rumqttc v5 client whose event loop runs in a task: its deliveries
/// come through `rx`, a unit per SUBACK through `subacks`, the PUBACK
/// reason codes (or the error that ended the loop: rumqttc ends it on a
/// PUBACK error code) through `acks`.
pub struct V5 {
    pub client: AsyncClient,
    /// The CONNACK's session present flag.
    pub present: bool,
    pub rx: mpsc::Receiver<RPublish>,
    pub subacks: mpsc::UnboundedReceiver<()>,
    pub acks: mpsc::UnboundedReceiver<String>,
    pub task: tokio::task::JoinHandle<()>,
}

impl V5 {
    /// Connect with a clean start and keep-alive 10 s.
    pub async fn connect(port: u16, id: &str) -> V5 {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        V5::connect_with(opts).await
    }

    /// Connect with `opts`; returns once the CONNACK came (within 10 s).
    pub async fn connect_with(opts: MqttOptions) -> V5 {
        let (client, mut el) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::channel(1024);
        // Acknowledgements nobody reads must not stall the loop.
        let (sub_tx, subacks) = mpsc::unbounded_channel();
        let (up_tx, mut up_rx) = mpsc::channel(1);
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(RPacket::ConnAck(c))) => {
                        let _ = up_tx.send(c.session_present).await;
                    }
                    Ok(Event::Incoming(RPacket::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(RPacket::Publish(p))) => {
                        let _ = tx.send(p).await;
                    }
                    Ok(Event::Incoming(RPacket::PubAck(a))) => {
                        let _ = ack_tx.send(format!("{:?}", a.reason));
                    }
                    Ok(Event::Incoming(RPacket::Disconnect(_))) => return,
                    Ok(_) => {}
                    Err(e) => {
                        let _ = ack_tx.send(format!("{e:?}"));
                        return;
                    }
                }
            }
        });
        let present = tokio::time::timeout(T, up_rx.recv())
            .await
            .expect("CONNACK within 10 s")
            .expect("event loop alive");
        V5 {
            client,
            present,
            rx,
            subacks,
            acks,
            task,
        }
    }

    /// SUBSCRIBE `filter` at `qos` (with a subscription identifier when
    /// given) and wait for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS, id: Option<usize>) {
        match id {
            Some(id) => {
                let props = rumqttc::v5::mqttbytes::v5::SubscribeProperties {
                    id: Some(id),
                    user_properties: Vec::new(),
                };
                self.client
                    .subscribe_with_properties(filter, qos, props)
                    .await
            }
            None => self.client.subscribe(filter, qos).await,
        }
        .unwrap();
        self.suback().await;
    }

    /// Wait for the next SUBACK.
    pub async fn suback(&mut self) {
        tokio::time::timeout(T, self.subacks.recv())
            .await
            .expect("SUBACK within 10 s");
    }

    /// Wait for the next PUBACK; its reason code (or the loop's error).
    pub async fn puback(&mut self) -> String {
        tokio::time::timeout(T, self.acks.recv())
            .await
            .expect("PUBACK within 10 s")
            .expect("event loop alive")
    }

    /// The next delivery.
    pub async fn next(&mut self) -> RPublish {
        tokio::time::timeout(T, self.rx.recv())
            .await
            .expect("a PUBLISH within 10 s")
            .expect("event loop alive")
    }

    /// DISCONNECT, and wait until the event loop ended.
    pub async fn disconnect(self) {
        self.client.disconnect().await.unwrap();
        tokio::time::timeout(T, self.task)
            .await
            .expect("event loop ends")
            .expect("event loop did not panic");
    }
}
