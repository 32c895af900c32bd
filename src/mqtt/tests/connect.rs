//! CONNECT, CONNACK, authentication, wills, restore and DISCONNECT.

use super::*;

#[test]
fn garbage_closes_with_reason() {
    let now = Instant::now();
    let mut s = Session::new(limits(), now);
    s.handle_bytes(&[0xFF; 16], now);
    assert!(s.is_closed());
    assert!(matches!(&events(&mut s)[..], [Event::Close(_)]));
    // Later input is ignored.
    s.handle_bytes(
        &bytes(&connect(Version::V311, "x", true, 0), Version::V311),
        now,
    );
    assert!(events(&mut s).is_empty());
}

#[test]
fn oversized_packet_closes_before_body_arrives() {
    let (mut s, now) = connected(Version::V311);
    // PUBLISH announcing a 200 MB body.
    s.handle_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0x5F], now);
    assert!(s.is_closed());
    assert!(matches!(
        &events(&mut s)[..],
        [Event::Close(CloseReason::Malformed(_))]
    ));
}

#[test]
fn empty_client_id_rules() {
    let v = Version::V311;
    let now = Instant::now();
    let mut s = Session::new(limits(), now);
    s.handle_bytes(&bytes(&connect(v, "", false, 0), v), now);
    assert!(matches!(&sent(&mut s, v)[..], [Packet::ConnAck(c)] if c.code == 0x02));
    assert!(s.is_closed());

    let mut s = Session::new(limits(), now);
    s.handle_bytes(&bytes(&connect(v, "", true, 0), v), now);
    assert!(
        matches!(&events(&mut s)[..], [Event::Connected { client_id, .. }] if client_id.starts_with("frond-"))
    );
    s.restore(None);
    assert!(matches!(&sent(&mut s, v)[..], [Packet::ConnAck(c)] if c.code == 0));
}

#[test]
fn v5_auth_reason_codes() {
    use crate::auth::{Auth, Permissions, Secret, User};
    use std::sync::Arc;
    let v = Version::V5;
    let perms = Permissions {
        allow_publish: vec!["t.ok".into()],
        deny_subscribe: vec!["no".into()],
        ..Permissions::default()
    };
    let auth = Arc::new(Auth {
        anonymous: false,
        anonymous_permissions: Arc::new(Permissions::default()),
        users: vec![User {
            name: "u".into(),
            secret: Secret::parse("pw"),
            permissions: Arc::new(perms),
        }],
    });
    let lim = Limits {
        auth: Some(auth),
        ..limits()
    };
    let with = |user: Option<&str>, pass: &[u8]| {
        let Packet::Connect(mut c) = connect(v, "d", true, 10) else {
            unreachable!()
        };
        c.username = user.map(String::from);
        c.password = user.map(|_| pass.to_vec());
        Packet::Connect(c)
    };
    let now = Instant::now();
    for (user, pass, code) in [(Some("u"), &b"bad"[..], 0x86), (None, &b""[..], 0x87)] {
        let mut s = Session::new(lim.clone(), now);
        s.handle_bytes(&bytes(&with(user, pass), v), now);
        assert!(matches!(&sent(&mut s, v)[..], [Packet::ConnAck(c)] if c.code == code));
        assert!(s.is_closed());
    }
    let mut s = Session::new(lim, now);
    s.handle_bytes(&bytes(&with(Some("u"), b"pw"), v), now);
    events(&mut s);
    s.restore(None);
    assert!(matches!(&sent(&mut s, v)[..], [Packet::ConnAck(c)] if c.code == 0));
    s.handle_bytes(
        &bytes(&publish(QoS::AtLeastOnce, Some(1), "t/denied", b"x"), v),
        now,
    );
    s.handle_bytes(
        &bytes(&publish(QoS::AtLeastOnce, Some(2), "t/ok", b"x"), v),
        now,
    );
    let evs = events(&mut s);
    assert!(matches!(
        &evs[..],
        [Event::AckInOrder(1), Event::Publish { ack: Some(2), .. }]
    ));
    s.publish_done(1, Ok(()));
    s.publish_done(2, Ok(()));
    let acks: Vec<u8> = sent(&mut s, v)
        .iter()
        .filter_map(|p| match p {
            Packet::PubAck(a) => Some(a.code),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![0x87, 0]);
    s.handle_bytes(
        &bytes(
            &Packet::Subscribe(Subscribe {
                packet_id: 3,
                filters: vec![
                    ("no".into(), SubscriptionOptions::default()),
                    ("yes".into(), SubscriptionOptions::default()),
                ],
                properties: Properties::default(),
            }),
            v,
        ),
        now,
    );
    assert!(matches!(&sent(&mut s, v)[..], [Packet::SubAck(a)] if a.codes == vec![0x87, 0]));
}

#[test]
fn will_the_user_may_not_publish_refuses_the_connect() {
    use crate::auth::{Auth, Permissions, Secret, User};
    let perms = Permissions {
        allow_publish: vec!["a.>".into()],
        allow_subscribe: vec!["a.>".into()],
        ..Permissions::default()
    };
    let auth = Arc::new(Auth {
        anonymous: false,
        anonymous_permissions: Arc::new(Permissions::default()),
        users: vec![User {
            name: "alice".into(),
            secret: Secret::parse("pw"),
            permissions: Arc::new(perms),
        }],
    });
    let lim = Limits {
        auth: Some(auth),
        ..limits()
    };
    let with_will = |v: Version, topic: &str, response: Option<&str>| {
        let Packet::Connect(mut c) = connect(v, "d", true, 10) else {
            unreachable!()
        };
        c.username = Some("alice".into());
        c.password = Some(b"pw".to_vec());
        c.will = Some(mqtt::Will {
            topic: topic.into(),
            payload: b"gone".to_vec(),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties {
                response_topic: response.map(String::from),
                ..Properties::default()
            },
        });
        bytes(&Packet::Connect(c), v)
    };
    let now = Instant::now();
    for (v, topic, response, code) in [
        (Version::V5, "secret/will", None, 0x87),
        (Version::V311, "secret/will", None, 0x05),
        (Version::V5, "a/will", Some("secret/replies"), 0x87),
    ] {
        let mut s = Session::new(lim.clone(), now);
        s.handle_bytes(&with_will(v, topic, response), now);
        match &sent(&mut s, v)[..] {
            [Packet::ConnAck(c)] => {
                assert_eq!(c.code, code, "{topic} {response:?}");
                let why = c.properties.reason_string.as_deref();
                assert_eq!(why.is_some(), v == Version::V5, "{why:?}");
            }
            other => panic!("expected a refusing CONNACK, got {other:?}"),
        }
        assert!(s.is_closed());
        assert!(matches!(&events(&mut s)[..], [Event::Close(_)]));
        assert!(s.take_will().is_none(), "nothing to publish");
    }
    // An allowed will is armed with its owner.
    let v = Version::V5;
    let mut s = Session::new(lim, now);
    s.handle_bytes(&with_will(v, "a/will", Some("a/replies")), now);
    assert!(matches!(&events(&mut s)[..], [Event::Connected { .. }]));
    let will = s.will().cloned().expect("armed");
    assert_eq!(will.owner, Some(Owner::User("alice".into())));
    assert_eq!(will.subject, "a.will");
    // Without [auth], no owner is recorded.
    let mut s = Session::new(limits(), now);
    s.handle_bytes(&with_will(v, "secret/will", None), now);
    assert!(matches!(&events(&mut s)[..], [Event::Connected { .. }]));
    assert_eq!(s.will().map(|w| w.owner.clone()), Some(None));
}

#[test]
fn second_connect_with_an_unknown_level_is_a_protocol_error() {
    let v = Version::V5;
    let (mut s, now) = connected(v);
    // CONNECT with protocol level 9.
    let mut c = bytes(&connect(Version::V311, "x", true, 10), Version::V311);
    c[8] = 9;
    s.handle_bytes(&c, now);
    assert!(s.is_closed());
    match &sent(&mut s, v)[..] {
        [Packet::Disconnect(d)] => assert_eq!(d.code, 0x82),
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
    assert!(
        matches!(
            &events(&mut s)[..],
            [Event::Close(CloseReason::Malformed(_))]
        ),
        "no encode error"
    );
}

#[test]
fn input_after_connect_waits_for_restore() {
    let v = Version::V311;
    let now = Instant::now();
    let mut s = Session::new(limits(), now);
    let mut input = bytes(&connect(v, "dev-p", false, 10), v);
    input.extend(bytes(&Packet::PingReq, v));
    s.handle_bytes(&input, now);
    assert!(matches!(&events(&mut s)[..], [Event::Connected { .. }]));
    assert!(!s.has_output());
    s.restore(None);
    // CONNACK first, then the answer to what followed CONNECT.
    assert!(matches!(
        &sent(&mut s, v)[..],
        [Packet::ConnAck(c), Packet::PingResp] if !c.session_present
    ));
}

#[test]
fn clean_and_v5_expiry_decide_persistence() {
    let now = Instant::now();
    // 3.1.1 clean session: not persistent, stored state ignored.
    let mut s = Session::new(limits(), now);
    let v = Version::V311;
    s.handle_bytes(&bytes(&connect(v, "c", true, 0), v), now);
    events(&mut s);
    s.restore(Some(StoredSession::default()));
    assert!(matches!(&sent(&mut s, v)[..], [Packet::ConnAck(c)] if !c.session_present));
    assert!(!s.is_persistent());
    assert!(!s.take_dirty());
    // 5.0: expiry capped by max_session_expiry and told to the client.
    let v = Version::V5;
    let mut s = Session::new(limits(), now);
    let mut c = connect(v, "c5", true, 0);
    if let Packet::Connect(c) = &mut c {
        c.properties.session_expiry_interval = Some(u32::MAX);
    }
    s.handle_bytes(&bytes(&c, v), now);
    assert!(matches!(
        &events(&mut s)[..],
        [Event::Connected { expiry, clean: true, .. }] if *expiry == Duration::from_secs(3600)
    ));
    s.restore(None);
    assert!(matches!(
        &sent(&mut s, v)[..],
        [Packet::ConnAck(c)] if c.properties.session_expiry_interval == Some(3600)
    ));
    assert!(s.is_persistent());
}

#[test]
fn v5_response_information_when_requested() {
    let v = Version::V5;
    let now = Instant::now();
    let mut s = Session::new(limits(), now);
    let Packet::Connect(mut c) = connect(v, "a/b+", true, 10) else {
        unreachable!()
    };
    c.properties.request_response_information = Some(1);
    s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
    events(&mut s);
    s.restore(None);
    assert!(matches!(
        &sent(&mut s, v)[..],
        [Packet::ConnAck(c)]
            if c.properties.response_information.as_deref() == Some("frond/response/a_b_")
    ));
}

#[test]
fn v5_disconnect_changes_the_session_expiry() {
    // 3600 -> 0: no longer persistent, the stored state goes.
    let (mut s, now) = v5_session(3600);
    assert!(s.is_persistent() && !s.discard_stored());
    s.handle_bytes(&disconnect_pkt(Some(0)), now);
    assert!(!s.is_persistent());
    assert!(s.discard_stored());
    assert!(
        s.take_will().is_none(),
        "a normal DISCONNECT drops the will"
    );
    // 3600 -> 60 (and above the maximum: capped).
    let (mut s, now) = v5_session(3600);
    s.handle_bytes(&disconnect_pkt(Some(60)), now);
    assert_eq!(s.snapshot().expiry_secs, 60);
    assert!(!s.discard_stored());
    let (mut s, now) = v5_session(60);
    s.handle_bytes(&disconnect_pkt(Some(u32::MAX)), now);
    assert_eq!(s.snapshot().expiry_secs, 3600);
    // Absent: unchanged.
    let (mut s, now) = v5_session(60);
    s.handle_bytes(&disconnect_pkt(None), now);
    assert_eq!(s.snapshot().expiry_secs, 60);
}

#[test]
fn v5_disconnect_setting_an_expiry_after_connect_zero_is_a_protocol_error() {
    let (mut s, now) = v5_session(0);
    s.handle_bytes(&disconnect_pkt(Some(10)), now);
    match &sent(&mut s, Version::V5)[..] {
        [Packet::Disconnect(d)] => assert_eq!(d.code, 0x82),
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
    assert!(s.is_closed());
    assert!(!s.is_persistent() && !s.discard_stored());
    assert!(
        s.take_will().is_some(),
        "not a valid DISCONNECT: the will stays"
    );
    // Setting 0 again is fine.
    let (mut s, now) = v5_session(0);
    s.handle_bytes(&disconnect_pkt(Some(0)), now);
    assert!(s.is_closed() && s.take_will().is_none());
}

#[test]
fn restore_drops_subscriptions_the_permissions_no_longer_allow() {
    let sub = |f: &str, share: Option<&str>, id: Option<u32>| StoredSub {
        filter: f.into(),
        qos: 1,
        share: share.map(String::from),
        id,
        ..StoredSub::default()
    };
    let stored = StoredSession {
        client_id: "dev-p".into(),
        owner: Some(Owner::User("alice".into())),
        version: 4,
        subs: vec![
            sub("a/#", None, Some(1)),
            sub("a/pub/#", None, Some(2)),
            sub("a/#", Some("g"), None),
        ],
        expiry_secs: 3600,
        disconnected_at_ms: 1,
        ..StoredSession::default()
    };
    let (mut s, _, present) = session_as(Version::V311, "alice", Some(stored));
    assert!(present);
    // `a/pub/#` is `a.pub` plus `a.pub.>`: alice may have the second.
    match &events(&mut s)[..] {
        [Event::Subscribe(r)] => {
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].filter, "a.pub.>");
        }
        other => panic!("expected one Subscribe, got {other:?}"),
    }
    let snap = s.snapshot();
    assert_eq!(snap.subs, vec![sub("a/pub/#", None, Some(2))]);
    assert_eq!(snap.owner, Some(Owner::User("alice".into())));
    let idx = s.follow("T", 0);
    s.deliver_stored(idx, 1, "a.x", b"no");
    s.deliver_stored(idx, 2, "a.pub.x", b"yes");
    let got = sent_publishes(&mut s);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].3, b"yes");
}

#[test]
fn refuse_answers_not_authorized_and_keeps_nothing() {
    for (v, code) in [(Version::V311, 0x05), (Version::V5, 0x87)] {
        let now = Instant::now();
        let mut s = Session::new(cast(), now);
        let Packet::Connect(mut c) = connect(v, "dev-p", false, 10) else {
            unreachable!()
        };
        c.username = Some("alice".into());
        c.password = Some(b"pw".to_vec());
        c.properties.session_expiry_interval = Some(60);
        c.will = Some(mqtt::Will {
            topic: "a/pub/w".into(),
            payload: b"w".to_vec(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        });
        s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
        events(&mut s);
        assert!(s.is_persistent() && s.will().is_some());
        s.refuse("held by another user".into());
        match &sent(&mut s, v)[..] {
            [Packet::ConnAck(a)] => assert_eq!((a.code, a.session_present), (code, false)),
            other => panic!("expected CONNACK {code:#x}, got {other:?}"),
        }
        assert!(s.is_closed());
        assert!(
            !s.is_persistent() && !s.discard_stored(),
            "nothing saved or deleted"
        );
        assert!(s.take_will().is_none(), "no will for a refused connection");
        assert!(matches!(&events(&mut s)[..], [Event::Close(_)]));
    }
}

// Issue 14: MQTT 5 conformance of sessions, wills and authentication.

#[test]
fn clean_start_0_resumes_whatever_the_new_expiry() {
    let v = Version::V5;
    for expiry in [None, Some(0)] {
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        let Packet::Connect(mut c) = connect(v, "r", false, 10) else {
            unreachable!()
        };
        c.properties.session_expiry_interval = expiry;
        s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
        assert!(matches!(
            &events(&mut s)[..],
            [Event::Connected { clean: false, expiry, .. }] if expiry.is_zero()
        ));
        let stored = StoredSession {
            client_id: "r".into(),
            version: 5,
            subs: vec![StoredSub {
                filter: "t/+".into(),
                qos: 1,
                ..StoredSub::default()
            }],
            expiry_secs: 600,
            ..StoredSession::default()
        };
        s.restore(Some(stored));
        assert!(matches!(&sent(&mut s, v)[..], [Packet::ConnAck(c)] if c.session_present));
        // Not persistent (nothing is saved; it ends with the connection),
        // but it reads what the streams kept for it.
        assert!(!s.is_persistent() && s.follows_streams());
        assert!(!s.take_dirty() && !s.discard_stored());
        assert_eq!(events(&mut s).len(), 1, "its subscriptions come back");
        let idx = s.follow("T", 10);
        s.deliver_stored(idx, 11, "t.a", b"kept");
        assert_eq!(publishes(&mut s)[0].payload, b"kept");
    }
}

#[test]
fn the_will_delay_is_capped_by_the_session_expiry() {
    // Will delay 5 s (v5_session's will has none: set one).
    let will_with_delay = |expiry: u32| {
        let v = Version::V5;
        let now = Instant::now();
        let mut s = Session::new(limits(), now);
        let Packet::Connect(mut c) = connect(v, "w", true, 10) else {
            unreachable!()
        };
        c.properties.session_expiry_interval = Some(expiry);
        c.will = Some(mqtt::Will {
            topic: "w".into(),
            payload: b"gone".to_vec(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties {
                will_delay_interval: Some(5),
                ..Properties::default()
            },
        });
        s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
        events(&mut s);
        s.restore(None);
        sent(&mut s, v);
        (s, now)
    };
    let secs = Duration::from_secs;
    for (expiry, delay) in [(0, 0), (2, 2), (60, 5)] {
        let (mut s, _) = will_with_delay(expiry);
        // The durable copy armed at CONNECT already has the capped delay.
        assert_eq!(s.will().unwrap().delay, secs(delay));
        // Ends without DISCONNECT (keep-alive timeout): the will is owed.
        s.handle_timeout(Instant::now() + secs(3600));
        assert!(s.is_closed());
        assert_eq!(s.take_will().unwrap().delay, secs(delay), "expiry {expiry}");
    }
    // A DISCONNECT (0x04: with will) that shortens the session.
    let (mut s, now) = will_with_delay(60);
    let mut d = disconnect_pkt(Some(1));
    d[2] = 0x04;
    s.handle_bytes(&d, now);
    assert_eq!(s.take_will().unwrap().delay, secs(1));
}

#[test]
fn enhanced_authentication_is_refused_with_bad_authentication_method() {
    let v = Version::V5;
    let now = Instant::now();
    let mut s = Session::new(limits(), now);
    let Packet::Connect(mut c) = connect(v, "ea", true, 10) else {
        unreachable!()
    };
    c.properties.authentication_method = Some("SCRAM-SHA-1".into());
    s.handle_bytes(&bytes(&Packet::Connect(c), v), now);
    assert!(matches!(&sent(&mut s, v)[..], [Packet::ConnAck(a)] if a.code == 0x8C));
    assert!(s.is_closed());
}
