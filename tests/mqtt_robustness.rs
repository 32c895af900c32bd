//! Bad input never takes the broker down (contract 5): a peer sending
//! garbage or announcing an oversized packet loses its own connection, and
//! well-behaved clients are not disturbed.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An MQTT 3.1.1 CONNECT with a clean session and a 60 s keep-alive.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C];
    body.extend((client_id.len() as u16).to_be_bytes());
    body.extend(client_id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

/// Reads until the peer closes; panics if it is still open after 5 s.
/// Returns what was read before the close.
async fn expect_closed(s: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("{what}: frond kept the connection open for 5 s"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend(&buf[..n]),
        }
    }
}

/// Sends a CONNECT and reads the 4-byte CONNACK.
async fn connected_raw(port: u16, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to frond");
    s.write_all(&connect_packet(id))
        .await
        .expect("send CONNECT");
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack))
        .await
        .expect("CONNACK within 5s")
        .expect("read CONNACK");
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_close_only_that_connection() {
    let frond = Frond::start_new(FrondSpec {
        max_packet_size: Some("1MiB".into()),
        ..Default::default()
    })
    .await;
    let port = frond.mqtt_port;
    let mut good = MqttProbe::connect(port, "good-before", "chat/good").await;
    good.roundtrip("hello-0").await;

    // 1. Garbage instead of CONNECT.
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    // A write may fail once frond has already closed; that is fine.
    let _ = s.write_all(&[0xFF; 64]).await;
    expect_closed(&mut s, "garbage before CONNECT").await;
    good.roundtrip("hello-1").await;

    // 2. Garbage after a valid CONNECT.
    let mut s = connected_raw(port, "raw-garbage").await;
    let _ = s.write_all(&[0xFF; 64]).await;
    expect_closed(&mut s, "garbage after CONNECT").await;
    good.roundtrip("hello-2").await;

    // 3. A PUBLISH header announcing ~256 MiB (remaining length
    //    0x0FFFFFFF), far above max_packet_size, and no body: frond must
    //    close at the header, not wait for (or buffer) the body.
    let mut s = connected_raw(port, "raw-huge").await;
    s.write_all(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F])
        .await
        .expect("send header");
    expect_closed(&mut s, "oversized PUBLISH header").await;
    good.roundtrip("hello-3").await;

    // 4. The same as the very first packet (a CONNECT announcing 256 MiB).
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F])
        .await
        .expect("send header");
    expect_closed(&mut s, "oversized CONNECT header").await;

    // 5. A malformed remaining length (a fifth continuation byte).
    let mut s = connected_raw(port, "raw-badlen").await;
    let _ = s.write_all(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).await;
    expect_closed(&mut s, "malformed remaining length").await;

    // 6. A just-too-large real publish (1 MiB + 1 KiB body) is refused too.
    let mut s = connected_raw(port, "raw-big").await;
    let body_len: usize = (1 << 20) + 1024;
    let mut pkt = vec![0x30];
    let mut n = body_len;
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        pkt.push(b);
        if n == 0 {
            break;
        }
    }
    pkt.extend([0x00, 0x06]);
    pkt.extend(b"chat/x");
    pkt.resize(pkt.len() + body_len - 8, b'z');
    // frond may close before reading it all; do not block on a full buffer.
    let _ = tokio::time::timeout(Duration::from_secs(5), s.write_all(&pkt)).await;
    expect_closed(&mut s, "publish larger than max_packet_size").await;

    // The client connected before is still fine, and a new one works.
    assert!(
        !good.is_broken(),
        "the well-behaved client's connection survived"
    );
    good.roundtrip("hello-4").await;
    let mut late = MqttProbe::connect(port, "good-after", "chat/late").await;
    late.roundtrip("late-0").await;
    good.roundtrip("hello-5").await;

    // And frond is still up and healthy.
    let (code, _) = wait_for("GET /healthz answers", LONG, || async {
        frond.http_get("/healthz").await
    })
    .await;
    assert_eq!(code, 200);
}

/// The keep-alive timer is armed once and not moved with every packet
/// (that cost syscalls on the delivery path); a client that stops talking
/// after its deadline moved later must still be disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_closes_a_silent_client_after_activity() {
    let frond = Frond::start_new(FrondSpec::default()).await;
    let mut s = TcpStream::connect(("127.0.0.1", frond.mqtt_port))
        .await
        .expect("connect to frond");
    // CONNECT as connect_packet, with a 1 s keep-alive.
    let mut connect = connect_packet("ka-silent");
    connect[10..12].copy_from_slice(&1u16.to_be_bytes());
    s.write_all(&connect).await.expect("send CONNECT");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.expect("read CONNACK");
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    // Activity moves the deadline later each time.
    for _ in 0..3 {
        s.write_all(&[0xC0, 0x00]).await.expect("send PINGREQ");
        let mut resp = [0u8; 2];
        s.read_exact(&mut resp).await.expect("read PINGRESP");
        assert_eq!(resp, [0xD0, 0x00]);
    }
    // Then silence: frond closes within 1.5 × keep-alive (expect_closed
    // allows 5 s).
    expect_closed(&mut s, "silent client with a 1 s keep-alive").await;
}
