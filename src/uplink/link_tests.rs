//! Tests of the hub link machine: scripted handshakes, and a seeded
//! simulation of a hub cluster whose nodes fail in random ways.

use super::*;

fn url(port: u16) -> HubUrl {
    HubUrl {
        host: "127.0.0.1".into(),
        port,
        user: None,
        password: None,
        tls: false,
        ws: false,
    }
}

fn params(ports: &[u16]) -> LinkParams {
    LinkParams {
        urls: ports.iter().map(|&p| url(p)).collect(),
        name: "frond test".into(),
        user: None,
        password: None,
        token: Some("secret".into()),
        nkey_seed: None,
        jwt: None,
        tls_configured: false,
        discover: true,
        ping_interval: Duration::from_secs(10),
        max_pings_out: 2,
        connect_timeout: Duration::from_secs(10),
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_secs(30),
    }
}

fn info(connect_urls: &[&str]) -> Vec<u8> {
    let urls: Vec<String> = connect_urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "INFO {{\"server_id\":\"S\",\"max_payload\":1048576,\"headers\":true,\"connect_urls\":[{}]}}\r\n",
        urls.join(",")
    )
    .into_bytes()
}

fn out(l: &mut Link) -> String {
    let mut v = Vec::new();
    l.poll_transmit(&mut v);
    String::from_utf8(v).unwrap()
}

fn actions(l: &mut Link) -> Vec<Action> {
    std::iter::from_fn(|| l.poll_action()).collect()
}

fn events(l: &mut Link) -> Vec<LinkEvent> {
    std::iter::from_fn(|| l.poll_event()).collect()
}

/// Dial, INFO, CONNECT + PING, PONG: up.
fn bring_up(l: &mut Link, now: Instant, connect_urls: &[&str]) {
    l.handle_timeout(now);
    assert!(matches!(&actions(l)[..], [Action::Dial(_)]));
    l.handle_dialed(now);
    assert_eq!(out(l), "", "nothing is written before INFO");
    l.handle_bytes(now, &info(connect_urls));
    let w = out(l);
    assert!(w.starts_with("CONNECT {"), "{w}");
    assert!(w.contains("\"auth_token\":\"secret\""), "{w}");
    assert!(w.ends_with("PING\r\n"), "{w}");
    l.handle_bytes(now, b"PONG\r\n");
    assert!(l.is_up());
}

#[test]
fn handshake_then_ping_liveness() {
    let t0 = Instant::now();
    let mut l = Link::new(params(&[4222]), t0, 1);
    let sid = l.subscribe("cmd.>", None).unwrap();
    bring_up(&mut l, t0, &[]);
    assert!(matches!(
        &events(&mut l)[..],
        [LinkEvent::Up {
            max_payload: 1048576,
            ..
        }]
    ));
    assert_eq!(
        out(&mut l),
        format!("SUB cmd.> {sid}\r\n"),
        "subscriptions are sent on connect"
    );
    // The hub's PING is answered.
    l.handle_bytes(t0, b"PING\r\n");
    assert_eq!(out(&mut l), "PONG\r\n");
    // Our PINGs: two unanswered close the connection.
    let t1 = t0 + Duration::from_secs(10);
    assert_eq!(l.poll_deadline(), Some(t1));
    l.handle_timeout(t1);
    assert_eq!(out(&mut l), "PING\r\n");
    l.handle_bytes(t1, b"PONG\r\n");
    let t2 = t1 + Duration::from_secs(10);
    l.handle_timeout(t2);
    l.handle_timeout(t2 + Duration::from_secs(10));
    assert!(l.is_up());
    l.handle_timeout(t2 + Duration::from_secs(20));
    assert!(!l.is_up());
    assert_eq!(actions(&mut l), vec![Action::Close]);
    let ev = events(&mut l);
    assert!(
        matches!(&ev[..], [LinkEvent::Down { was_up: true, reason, .. }] if reason.contains("PINGs")),
        "{ev:?}"
    );
}

#[test]
fn messages_and_later_subscriptions() {
    let t0 = Instant::now();
    let mut l = Link::new(params(&[4222]), t0, 1);
    bring_up(&mut l, t0, &[]);
    let _ = events(&mut l);
    let sid = l.subscribe("a.b", Some("q")).unwrap();
    assert_eq!(out(&mut l), format!("SUB a.b q {sid}\r\n"));
    l.handle_bytes(t0, format!("MSG a.b {sid} 5\r\nhel").as_bytes());
    assert!(events(&mut l).is_empty(), "a partial message waits");
    l.handle_bytes(t0, b"lo\r\n");
    match &events(&mut l)[..] {
        [LinkEvent::Msg(m)] => {
            assert_eq!(
                (m.sid, m.subject.as_str(), &m.payload[..]),
                (sid, "a.b", &b"hello"[..])
            )
        }
        other => panic!("{other:?}"),
    }
    l.unsubscribe(sid);
    assert_eq!(out(&mut l), format!("UNSUB {sid}\r\n"));
    // A permissions violation is reported, the link stays up.
    l.handle_bytes(t0, b"-ERR 'Permissions Violation for Publish to \"x\"'\r\n");
    assert!(l.is_up());
    assert!(matches!(&events(&mut l)[..], [LinkEvent::HubError(_)]));
    // Any other -ERR ends it.
    l.handle_bytes(t0, b"-ERR 'Stale Connection'\r\n");
    assert!(!l.is_up());
}

#[test]
fn refused_credentials_say_what_to_check() {
    let t0 = Instant::now();
    let mut l = Link::new(params(&[4222]), t0, 1);
    l.handle_timeout(t0);
    let _ = actions(&mut l);
    l.handle_dialed(t0);
    l.handle_bytes(t0, &info(&[]));
    let _ = out(&mut l);
    l.handle_bytes(t0, b"-ERR 'Authorization Violation'\r\n");
    let ev = events(&mut l);
    assert!(
        matches!(&ev[..], [LinkEvent::Down { was_up: false, reason, .. }] if reason.contains("check uplink user/password/token/nkey_seed")),
        "{ev:?}"
    );
}

#[test]
fn tls_upgrade_before_connect() {
    let t0 = Instant::now();
    let mut p = params(&[4222]);
    p.urls[0].host = "hub.example".into();
    p.urls[0].tls = true;
    let mut l = Link::new(p, t0, 1);
    l.handle_timeout(t0);
    let _ = actions(&mut l);
    l.handle_dialed(t0);
    l.handle_bytes(
        t0,
        b"INFO {\"tls_required\":true,\"connect_urls\":[\"10.0.0.2:4222\"]}\r\n",
    );
    assert_eq!(out(&mut l), "", "CONNECT waits for TLS");
    assert_eq!(
        actions(&mut l),
        vec![Action::StartTls {
            server_name: "hub.example".into()
        }]
    );
    l.handle_tls_ready(t0);
    assert!(out(&mut l).starts_with("CONNECT"));
    // The discovered IP verifies the name of the URL it came through.
    let d = &l.servers()[1];
    assert_eq!(
        (d.url.host.as_str(), d.tls_name.as_str(), d.url.tls),
        ("10.0.0.2", "hub.example", true)
    );
}

#[test]
fn tls_asked_but_not_offered_is_an_error() {
    let t0 = Instant::now();
    let mut p = params(&[4222]);
    p.urls[0].tls = true;
    let mut l = Link::new(p, t0, 1);
    l.handle_timeout(t0);
    let _ = actions(&mut l);
    l.handle_dialed(t0);
    l.handle_bytes(t0, &info(&[]));
    let ev = events(&mut l);
    assert!(
        matches!(&ev[..], [LinkEvent::Down { reason, .. }] if reason.contains("does not offer it")),
        "{ev:?}"
    );
}

#[test]
fn fails_over_to_discovered_servers_at_once() {
    let t0 = Instant::now();
    let mut l = Link::new(params(&[4222]), t0, 7);
    bring_up(
        &mut l,
        t0,
        &["127.0.0.1:4222", "127.0.0.1:4223", "[::1]:4224"],
    );
    let ev = events(&mut l);
    assert!(
        matches!(&ev[..], [LinkEvent::Discovered(d), LinkEvent::Up { .. }] if d.len() == 2),
        "{ev:?}"
    );
    assert_eq!(l.servers().len(), 3);
    assert_eq!(l.servers()[2].url.host, "::1");
    // A later INFO adds a node.
    l.handle_bytes(t0, &info(&["127.0.0.1:4225"]));
    assert_eq!(l.servers().len(), 4);
    // The node dies: the next server is dialled within retry_min.
    l.handle_io_error(t0, "connection reset".into());
    let until = l.poll_deadline().unwrap();
    assert!(until <= t0 + Duration::from_millis(100), "{:?}", until - t0);
    l.handle_timeout(until);
    match &actions(&mut l)[..] {
        [Action::Close, Action::Dial(s)] => assert_eq!(s.url.port, 4223),
        other => panic!("{other:?}"),
    }
    // Every dial fails: only after the whole list failed is the backoff
    // waited, and it doubles per round.
    let mut now = until;
    let mut waits = Vec::new();
    for _ in 0..12 {
        l.handle_io_error(now, "connection refused".into());
        let next = l.poll_deadline().unwrap();
        waits.push(next - now);
        now = next;
        l.handle_timeout(now);
        let _ = actions(&mut l);
    }
    let long: Vec<_> = waits
        .iter()
        .filter(|w| **w >= Duration::from_millis(50))
        .collect();
    assert!(waits.iter().all(|w| *w <= Duration::from_secs(30)));
    assert_eq!(
        long.len(),
        3,
        "one backoff per round of 4 servers: {waits:?}"
    );
    assert!(long[2] > long[0], "the backoff grows: {waits:?}");
}

#[test]
fn discovery_is_bounded_and_can_be_off() {
    let t0 = Instant::now();
    let mut l = Link::new(params(&[4222]), t0, 1);
    let many: Vec<String> = (0..100).map(|i| format!("10.0.0.{i}:4222")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    bring_up(&mut l, t0, &refs);
    assert_eq!(l.servers().len(), MAX_SERVERS);
    let mut p = params(&[4222]);
    p.discover = false;
    let mut l = Link::new(p, t0, 1);
    bring_up(&mut l, t0, &refs);
    assert_eq!(l.servers().len(), 1);
}

#[test]
fn garbage_and_early_data_end_the_attempt() {
    let t0 = Instant::now();
    let mut l = Link::new(params(&[4222, 4223]), t0, 1);
    l.handle_timeout(t0);
    let _ = actions(&mut l);
    l.handle_dialed(t0);
    let mut b = info(&[]);
    b.extend_from_slice(b"PING\r\n");
    l.handle_bytes(t0, &b);
    let ev = events(&mut l);
    assert!(
        matches!(&ev[..], [LinkEvent::Down { reason, .. }] if reason.contains("more than INFO")),
        "{ev:?}"
    );
    let next = l.poll_deadline().unwrap();
    l.handle_timeout(next);
    l.handle_dialed(next);
    l.handle_bytes(next, b"HELLO\r\n");
    assert!(matches!(&events(&mut l)[..], [LinkEvent::Down { .. }]));
    assert!(out(&mut l).is_empty());
}

/// One simulated hub node's behaviour on the next connection.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Healthy,
    Refuse,
    /// Accept TCP, never send INFO.
    Silent,
    /// Send INFO, never answer CONNECT.
    Mute,
    /// Come up, then drop after a while.
    DropLater,
    Garbage,
}

/// Drive a link against a simulated 3-node cluster for one seed: faults
/// for a random while, then all nodes healthy. Checks the invariants on
/// every step and that the link is up within a bounded time after the
/// faults end.
fn simulate(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let t0 = Instant::now();
    let ports = [4222u16, 4223, 4224];
    // Only the first node is configured; the others are discovered.
    let mut l = Link::new(params(&ports[..1]), t0, seed);
    let sid = l.subscribe("cmd.>", None).unwrap();
    let urls = ["127.0.0.1:4222", "127.0.0.1:4223", "127.0.0.1:4224"];
    let faults_end = t0 + Duration::from_secs(rng.u64(0..600));
    let mut now = t0;
    let mut conn: Option<(u16, Fault)> = None;
    let mut drop_at: Option<Instant> = None;
    let mut up = false;
    let mut ups = 0;
    for _step in 0..5000 {
        while let Some(a) = l.poll_action() {
            match a {
                Action::Dial(s) => {
                    assert!(conn.is_none(), "seed {seed}: dial while connected");
                    let fault = if now >= faults_end {
                        Fault::Healthy
                    } else {
                        [
                            Fault::Healthy,
                            Fault::Refuse,
                            Fault::Silent,
                            Fault::Mute,
                            Fault::DropLater,
                            Fault::Garbage,
                        ][rng.usize(0..6)]
                    };
                    if fault == Fault::Refuse {
                        l.handle_io_error(now, "connection refused".into());
                        continue;
                    }
                    l.handle_dialed(now);
                    conn = Some((s.url.port, fault));
                    match fault {
                        Fault::Silent => {}
                        Fault::Garbage => l.handle_bytes(now, b"XYZ\r\n"),
                        _ => l.handle_bytes(now, &info(&urls)),
                    }
                }
                Action::StartTls { .. } => panic!("seed {seed}: no TLS here"),
                Action::Close => {
                    conn = None;
                    drop_at = None;
                }
            }
        }
        while let Some(e) = l.poll_event() {
            match e {
                LinkEvent::Up { server, .. } => {
                    assert!(!up, "seed {seed}: Up twice");
                    assert_eq!(Some(server.url.port), conn.map(|c| c.0));
                    up = true;
                    ups += 1;
                }
                LinkEvent::Down { was_up, .. } => {
                    assert_eq!(was_up, up, "seed {seed}: Down without matching Up");
                    up = false;
                }
                _ => {}
            }
        }
        let mut w = Vec::new();
        l.poll_transmit(&mut w);
        let w = String::from_utf8(w).unwrap();
        if let Some((_, fault)) = conn {
            if w.contains("PING\r\n") && fault != Fault::Mute {
                let was_up = l.is_up();
                l.handle_bytes(now, b"PONG\r\n");
                if !was_up && l.is_up() {
                    assert!(l.poll_event().is_some(), "seed {seed}: Up event after PONG");
                    up = true;
                    ups += 1;
                    let mut s = Vec::new();
                    l.poll_transmit(&mut s);
                    assert_eq!(
                        String::from_utf8(s).unwrap(),
                        format!("SUB cmd.> {sid}\r\n")
                    );
                    if fault == Fault::DropLater {
                        drop_at = Some(now + Duration::from_secs(rng.u64(1..60)));
                    }
                }
                continue;
            }
        } else {
            assert!(
                w.is_empty(),
                "seed {seed}: bytes written with no connection: {w}"
            );
        }
        if up && now >= faults_end + Duration::from_secs(120) {
            break;
        }
        let mut next = l.poll_deadline().expect("a deadline");
        if let Some(d) = drop_at {
            next = next.min(d);
        }
        assert!(next >= now, "seed {seed}: deadline in the past");
        now = next.max(now);
        if drop_at.is_some_and(|d| now >= d) {
            drop_at = None;
            l.handle_io_error(now, "connection reset".into());
        } else {
            l.handle_timeout(now);
        }
    }
    assert!(up, "seed {seed}: not up 120 s after the faults ended");
    assert!(ups >= 1);
    assert_eq!(l.servers().len(), 3, "seed {seed}: discovered the cluster");
}

#[test]
fn simulated_cluster_faults_many_seeds() {
    for seed in 0..2000 {
        simulate(seed);
    }
}

#[test]
fn any_bytes_from_the_hub_count_as_liveness() {
    let t0 = Instant::now();
    let mut p = params(&[4222]);
    p.max_pings_out = 1;
    let mut l = Link::new(p, t0, 1);
    bring_up(&mut l, t0, &[]);
    let _ = events(&mut l);
    let s = Duration::from_secs(10);
    l.handle_timeout(t0 + s);
    assert_eq!(out(&mut l), "PING\r\n");
    // No PONG (it waits behind our backlog), but a message arrives.
    l.handle_bytes(t0 + s, b"MSG x 1 0\r\n\r\n");
    l.handle_timeout(t0 + 2 * s);
    assert!(l.is_up(), "data reset the count");
    assert_eq!(out(&mut l), "PING\r\n");
    // Silence for the next interval: dead, 2 intervals after the last
    // sign of life (a half-open link).
    l.handle_timeout(t0 + 3 * s);
    assert!(!l.is_up());
}

#[test]
fn creds_send_the_jwt_and_sign_the_nonce() {
    let t0 = Instant::now();
    let seed = crate::nkey::SeedKey::from_bytes([9u8; 32]);
    let mut p = params(&[4222]);
    p.token = None;
    p.nkey_seed = Some(seed.clone());
    p.jwt = Some("hdr.claims.sig".into());
    let mut l = Link::new(p, t0, 1);
    l.handle_timeout(t0);
    let _ = actions(&mut l);
    l.handle_dialed(t0);
    l.handle_bytes(
        t0,
        b"INFO {\"server_id\":\"S\",\"max_payload\":1048576,\"nonce\":\"n0nc3\"}\r\n",
    );
    let w = out(&mut l);
    let json: serde_json::Value = serde_json::from_str(
        w.strip_prefix("CONNECT ")
            .and_then(|r| r.split("\r\n").next())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(json["jwt"], "hdr.claims.sig");
    assert!(json.get("nkey").is_none(), "the JWT names the user: {w}");
    let public = crate::nkey::decode_user_public(&seed.public_key()).unwrap();
    assert!(crate::nkey::verify(
        &public,
        b"n0nc3",
        json["sig"].as_str().unwrap()
    ));
}
