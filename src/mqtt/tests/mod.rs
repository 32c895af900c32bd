//! Tests of the MQTT machine, split like the machine. Each drives a
//! [`Session`] with encoded packets and simulated time, no sockets: the
//! helpers here build packets and read what the session wrote; [`pair`]
//! couples an MQTT client with a session and an in-memory stand-in for
//! the shell.

mod connect;
mod flows;
mod inbound;
mod outbound;
mod pair;
mod qos2;
mod stored;
mod subscribe;
mod timers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::broker::persist::{Cursor, StoredSession, StoredSub};
use crate::router::Delivery;
use crate::wire::mqtt::{
    Ack, Connect, Packet, Properties, Publish, QoS, Subscribe, SubscriptionOptions, Unsubscribe,
    Version,
};

fn limits() -> Limits {
    Limits {
        max_packet_size: 1024,
        max_keep_alive: 60,
        connect_timeout: Duration::from_secs(5),
        max_inflight: 4,
        max_queued: 8,
        max_queued_bytes: 1 << 20,
        max_session_expiry: Duration::from_secs(3600),
        auth: None,
        max_subscriptions: 3,
        max_topic_length: 32,
        max_topic_levels: 4,
    }
}

fn bytes(p: &Packet, v: Version) -> Vec<u8> {
    let mut out = Vec::new();
    mqtt::encode(p, v, &mut out).unwrap();
    out
}

fn connect(v: Version, id: &str, clean: bool, keep_alive: u16) -> Packet {
    Packet::Connect(Connect {
        version: v,
        clean_start: clean,
        keep_alive,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    })
}

fn publish(qos: QoS, id: Option<u16>, topic: &str, payload: &[u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: id,
        properties: Properties::default(),
        payload: payload.to_vec(),
    })
}

/// Decode everything the session wrote.
fn sent(s: &mut Session, v: Version) -> Vec<Packet> {
    let out = s.take_output();
    let mut at = 0;
    let mut packets = Vec::new();
    while let Some((p, used)) = mqtt::decode(&out[at..], Some(v), usize::MAX).unwrap() {
        packets.push(p);
        at += used;
    }
    assert_eq!(at, out.len(), "trailing bytes in output");
    packets
}

/// Drain the events as the shell does when every save succeeds: each
/// [`Event::Subscribe`] is answered with [`Session::subscribe_done`].
fn events(s: &mut Session) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(ev) = s.poll_event() {
        if matches!(ev, Event::Subscribe(_)) {
            s.subscribe_done(true);
        }
        out.push(ev);
    }
    out
}

fn connected(v: Version) -> (Session, Instant) {
    let now = Instant::now();
    let mut s = Session::new(limits(), now);
    s.handle_bytes(&bytes(&connect(v, "dev-1", true, 10), v), now);
    assert!(!s.has_output(), "CONNACK waits for restore");
    assert_eq!(
        events(&mut s),
        vec![Event::Connected {
            client_id: "dev-1".into(),
            clean: true,
            expiry: Duration::ZERO,
        }]
    );
    s.restore(None);
    match &sent(&mut s, v)[..] {
        [Packet::ConnAck(c)] => {
            assert_eq!(c.code, 0);
            assert!(!c.session_present);
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    (s, now)
}

fn persistent(v: Version, stored: Option<StoredSession>) -> (Session, Instant, bool) {
    let now = Instant::now();
    let mut s = Session::new(limits(), now);
    s.handle_bytes(&bytes(&connect(v, "dev-p", false, 10), v), now);
    match &events(&mut s)[..] {
        [Event::Connected { expiry, clean, .. }] => {
            assert!(!clean);
            assert_eq!(*expiry, Duration::from_secs(3600), "3.1.1 uses the max");
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    s.restore(stored);
    let present = match &sent(&mut s, v)[..] {
        [Packet::ConnAck(c)] => c.session_present,
        other => panic!("expected CONNACK, got {other:?}"),
    };
    (s, now, present)
}

fn subscribe_pkt(id: u16, filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: id,
        filters: vec![(
            filter.into(),
            SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
        )],
        properties: Properties::default(),
    })
}

fn sub_opts(filters: &[(&str, QoS)], id: u16) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: id,
        filters: filters
            .iter()
            .map(|(f, qos)| {
                (
                    f.to_string(),
                    SubscriptionOptions {
                        qos: *qos,
                        ..SubscriptionOptions::default()
                    },
                )
            })
            .collect(),
        properties: Properties::default(),
    })
}

fn suback_codes(s: &mut Session, v: Version) -> Vec<u8> {
    match &sent(s, v)[..] {
        [Packet::SubAck(a)] => a.codes.clone(),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn connected_v5(props: Properties) -> (Session, Instant) {
    let v = Version::V5;
    let now = Instant::now();
    let mut s = Session::new(limits(), now);
    let Packet::Connect(mut c) = connect(v, "dev-5", true, 10) else {
        unreachable!()
    };
    c.properties = props;
    s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
    events(&mut s);
    s.restore(None);
    match &sent(&mut s, v)[..] {
        [Packet::ConnAck(c)] => {
            assert_eq!(c.properties.topic_alias_maximum, Some(TOPIC_ALIAS_MAX));
            assert_eq!(c.properties.receive_maximum, Some(4));
            assert_eq!(c.properties.subscription_identifier_available, None);
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    (s, now)
}

fn delivery(subject: &str, qos: u8, headers: Option<Vec<u8>>, at: Instant) -> Delivery {
    Delivery {
        msg: std::sync::Arc::new(crate::router::Msg {
            subject: subject.into(),
            reply: None,
            headers,
            payload: b"p".to_vec(),
            publisher: None,
        }),
        qos,
        retain: false,
        shared: false,
        at,
    }
}

fn publishes(s: &mut Session) -> Vec<Publish> {
    sent(s, Version::V5)
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        })
        .collect()
}

fn subscribe_all(s: &mut Session, now: Instant, id: Option<u32>) {
    let Packet::Subscribe(mut sub) = subscribe_pkt(1, "#", QoS::AtLeastOnce) else {
        unreachable!()
    };
    sub.properties.subscription_identifiers = id.into_iter().collect();
    s.handle_bytes(&bytes(&Packet::Subscribe(sub), Version::V5), now);
    events(s);
    sent(s, Version::V5);
}

fn aliased(qos: QoS, id: Option<u16>, topic: &str, alias: u16) -> Packet {
    let Packet::Publish(mut p) = publish(qos, id, topic, b"x") else {
        unreachable!()
    };
    p.properties.topic_alias = Some(alias);
    Packet::Publish(p)
}

fn ack_pkt(kind: fn(Ack) -> Packet, id: u16) -> Vec<u8> {
    bytes(
        &kind(Ack {
            packet_id: id,
            ..Ack::default()
        }),
        Version::V311,
    )
}

fn qos2_header() -> Option<Vec<u8>> {
    crate::mqtt::props::stored_headers(None, 2, false)
}

/// Publishes sent, as (packet id, QoS, DUP, payload).
fn sent_publishes(s: &mut Session) -> Vec<(u16, QoS, bool, Vec<u8>)> {
    sent(s, Version::V311)
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => (p.packet_id.unwrap_or(0), p.qos, p.dup, p.payload),
            other => panic!("expected PUBLISH, got {other:?}"),
        })
        .collect()
}

/// A stored 3.1.1 session of `dev-p` subscribed to `q/#` at QoS 2,
/// with one stream cursor.
fn qos2_session(cursor: Cursor) -> StoredSession {
    StoredSession {
        client_id: "dev-p".into(),
        owner: None,
        version: 4,
        subs: vec![StoredSub {
            filter: "q/#".into(),
            qos: 2,
            ..StoredSub::default()
        }],
        expiry_secs: 3600,
        disconnected_at_ms: 1,
        cursors: vec![cursor],
        qos2_in: Vec::new(),
    }
}

fn v5_session(expiry: u32) -> (Session, Instant) {
    let v = Version::V5;
    let now = Instant::now();
    let mut s = Session::new(limits(), now);
    let Packet::Connect(mut c) = connect(v, "dev-x", false, 10) else {
        unreachable!()
    };
    c.properties.session_expiry_interval = Some(expiry);
    c.will = Some(mqtt::Will {
        topic: "w".into(),
        payload: b"gone".to_vec(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    });
    s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
    events(&mut s);
    s.restore(None);
    sent(&mut s, v);
    (s, now)
}

fn disconnect_pkt(expiry: Option<u32>) -> Vec<u8> {
    bytes(
        &Packet::Disconnect(Disconnect {
            code: 0,
            properties: Properties {
                session_expiry_interval: expiry,
                ..Properties::default()
            },
        }),
        Version::V5,
    )
}

// Issue 10: sessions belong to a user, stored deliveries pass the
// permission check, and nothing unsaved is acknowledged.

/// Users `alice` (subscribe `a.pub.>` only) and `dave` (deny subscribe
/// `secret.>`), password `pw`.
fn cast() -> Limits {
    use crate::auth::{Auth, Secret, User};
    let user = |name: &str, p: Permissions| User {
        name: name.into(),
        secret: Secret::parse("pw"),
        permissions: Arc::new(p),
    };
    let auth = Auth {
        anonymous: false,
        anonymous_permissions: Arc::new(Permissions::default()),
        users: vec![
            user(
                "alice",
                Permissions {
                    allow_subscribe: vec!["a.pub.>".into()],
                    ..Permissions::default()
                },
            ),
            user(
                "dave",
                Permissions {
                    deny_subscribe: vec!["secret.>".into()],
                    ..Permissions::default()
                },
            ),
        ],
    };
    Limits {
        auth: Some(Arc::new(auth)),
        ..limits()
    }
}

/// A persistent session of `user` (of [`cast`]), restored from
/// `stored`: (session, now, session present).
fn session_as(v: Version, user: &str, stored: Option<StoredSession>) -> (Session, Instant, bool) {
    let now = Instant::now();
    let mut s = Session::new(cast(), now);
    let Packet::Connect(mut c) = connect(v, "dev-p", false, 10) else {
        unreachable!()
    };
    c.username = Some(user.into());
    c.password = Some(b"pw".to_vec());
    if v == Version::V5 {
        c.properties.session_expiry_interval = Some(3600);
    }
    s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
    assert!(matches!(&events(&mut s)[..], [Event::Connected { .. }]));
    assert_eq!(s.owner(), Some(&Owner::User(user.into())));
    s.restore(stored);
    let present = match &sent(&mut s, v)[..] {
        [Packet::ConnAck(c)] => c.session_present,
        other => panic!("expected CONNACK, got {other:?}"),
    };
    (s, now, present)
}

/// The events, without answering any (the shell's save not done yet).
fn raw_events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}
