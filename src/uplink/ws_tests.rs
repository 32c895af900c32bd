use super::*;

/// An unmasked server frame.
fn sframe(fin: bool, rsv1: bool, op: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(fin) << 7 | u8::from(rsv1) << 6 | op];
    let n = payload.len();
    if n < 126 {
        out.push(n as u8);
    } else if n <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// A client frame decoded as the server would: (fin, rsv1, opcode,
/// unmasked payload, frame length). Panics if it is not masked.
fn cframe(b: &[u8]) -> (bool, bool, u8, Vec<u8>, usize) {
    assert_eq!(b[1] & 0x80, 0x80, "client frames are masked");
    let (len, mut at) = match b[1] & 0x7f {
        126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 => (
            u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let key = [b[at], b[at + 1], b[at + 2], b[at + 3]];
    at += 4;
    let payload = b[at..at + len]
        .iter()
        .zip(key.iter().cycle())
        .map(|(x, k)| x ^ k)
        .collect();
    (
        b[0] & 0x80 != 0,
        b[0] & 0x40 != 0,
        b[0] & 0x0f,
        payload,
        at + len,
    )
}

/// Raw deflate of `data` ending in a sync flush with its tail removed, as
/// nats-server (Go's compress/flate) sends it.
fn server_deflate(data: &[u8]) -> Vec<u8> {
    let mut c = CompressorOxide::new(comp_flags());
    let mut out = Vec::new();
    compress_to_output(&mut c, data, TDEFLFlush::Sync, |b| {
        out.extend_from_slice(b);
        true
    });
    assert!(out.ends_with(&SYNC_TAIL));
    out.truncate(out.len() - 4);
    out
}

fn inflate(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    v.extend_from_slice(&SYNC_TAIL);
    v.extend_from_slice(&FINAL_EMPTY);
    miniz_oxide::inflate::decompress_to_vec(&v).unwrap()
}

fn app(c: &mut WsClient) -> Vec<u8> {
    let mut v = Vec::new();
    c.take_app(&mut v);
    v
}

fn sent(c: &mut WsClient) -> Vec<u8> {
    let mut v = Vec::new();
    c.poll_transmit(&mut v);
    v
}

fn telemetry(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let p = format!(
            "{{\"ts\":{},\"v\":{}.{}}}",
            1_765_080_000_000u64 + i as u64 * 17,
            i * 7 % 500,
            i % 10
        );
        out.extend_from_slice(
            format!("HPUB fleet.n1.telemetry.dev{:03}.rpm _INBOX.abc.{i} 34 {}\r\nNATS/1.0\r\nNats-Msg-Id: n1:T:{i}\r\n\r\n{p}\r\n", i % 300, 34 + p.len()).as_bytes(),
        );
    }
    out
}

#[test]
fn upgrade_request_and_answer() {
    // RFC 6455 §1.3's example key.
    assert_eq!(
        accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    let (req, accept) = upgrade_request("hub.example", 8080, *b"the sample nonce");
    let req = String::from_utf8(req).unwrap();
    assert!(
        req.starts_with("GET / HTTP/1.1\r\nHost: hub.example:8080\r\n"),
        "{req}"
    );
    assert!(
        req.contains("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
        "{req}"
    );
    assert!(req.contains("permessage-deflate"), "{req}");
    assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");

    let head = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n\r\n");
    let mut buf = head.clone().into_bytes();
    buf.extend_from_slice(&sframe(true, false, OP_BINARY, b"INFO {}\r\n"));
    for cut in 0..head.len() {
        assert_eq!(
            parse_upgrade_response(&buf[..cut], &accept),
            Ok(None),
            "cut at {cut}"
        );
    }
    assert_eq!(
        parse_upgrade_response(&buf, &accept),
        Ok(Some((head.len(), true)))
    );
    let plain = head.replace("Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n", "");
    assert_eq!(
        parse_upgrade_response(plain.as_bytes(), &accept),
        Ok(Some((plain.len(), false)))
    );
    let wrong = head.replace(&accept, "AAAAAAAAAAAAAAAAAAAAAAAAAAA=");
    assert!(parse_upgrade_response(wrong.as_bytes(), &accept).is_err());
    let refused = "HTTP/1.1 400 Bad Request\r\n\r\n";
    let e = parse_upgrade_response(refused.as_bytes(), &accept).unwrap_err();
    assert!(e.contains("websocket port"), "{e}");
    assert!(parse_upgrade_response(&vec![b'x'; MAX_HEAD + 1], &accept).is_err());
}

#[test]
fn client_frames_are_masked_and_compressed_per_message() {
    let mut c = WsClient::new(true, 1 << 20, 7);
    let data = telemetry(200);
    let mut out = Vec::new();
    c.encode(&data, &mut out);
    let (fin, rsv1, op, payload, len) = cframe(&out);
    assert!(fin && rsv1 && op == OP_BINARY);
    assert_eq!(len, out.len(), "one frame per write");
    assert!(
        payload.len() * 4 < data.len(),
        "compresses: {} of {}",
        payload.len(),
        data.len()
    );
    assert_eq!(
        inflate(&payload),
        data,
        "each message inflates on its own (no context takeover)"
    );
    // A second message does not depend on the first.
    let mut out2 = Vec::new();
    c.encode(&data, &mut out2);
    let (_, _, _, p2, _) = cframe(&out2);
    assert_eq!(inflate(&p2), data);
    assert_ne!(out[2..6], out2[2..6], "a fresh masking key per frame");
    // Small writes go uncompressed; without deflate nothing is compressed.
    let mut small = Vec::new();
    c.encode(b"PING\r\n", &mut small);
    assert!(!cframe(&small).1, "small writes are not compressed");
    assert_eq!(cframe(&small).3, b"PING\r\n");
    let mut plain = WsClient::new(false, 1 << 20, 7);
    let mut o = Vec::new();
    plain.encode(&data, &mut o);
    let (_, rsv1, _, p, _) = cframe(&o);
    assert!(!rsv1);
    assert_eq!(p, data);
    // Extended lengths: 16-bit and 64-bit.
    let big = vec![b'a'; 70_000];
    let mut o = Vec::new();
    plain.encode(&big, &mut o);
    assert_eq!(o[1] & 0x7f, 127);
    assert_eq!(cframe(&o).3, big);
}

#[test]
fn fragments_with_control_frames_between_them() {
    let data = telemetry(50);
    let z = server_deflate(&data);
    let (a, b) = z.split_at(z.len() / 3);
    let (b, d) = b.split_at(b.len() / 2);
    let mut wire = Vec::new();
    wire.extend(sframe(true, false, OP_BINARY, b"INFO {}\r\n"));
    wire.extend(sframe(false, true, OP_BINARY, a));
    wire.extend(sframe(true, false, OP_PING, b"hi"));
    wire.extend(sframe(false, false, OP_CONT, b));
    wire.extend(sframe(true, false, OP_PONG, b""));
    wire.extend(sframe(true, false, OP_CONT, d));
    wire.extend(sframe(false, false, OP_TEXT, b"PO"));
    wire.extend(sframe(true, false, OP_CONT, b"NG\r\n"));
    let mut want = b"INFO {}\r\n".to_vec();
    want.extend_from_slice(&data);
    want.extend_from_slice(b"PONG\r\n");
    // All at once, and one byte at a time.
    let mut c = WsClient::new(true, 1 << 20, 1);
    c.handle_bytes(&wire).unwrap();
    assert_eq!(app(&mut c), want);
    let pong = sent(&mut c);
    let (fin, _, op, payload, len) = cframe(&pong);
    assert!(fin && op == OP_PONG && payload == b"hi" && len == pong.len());
    let mut c = WsClient::new(true, 1 << 20, 1);
    let mut got = Vec::new();
    for byte in &wire {
        c.handle_bytes(std::slice::from_ref(byte)).unwrap();
        c.take_app(&mut got);
    }
    assert_eq!(got, want);
}

#[test]
fn violations_close_with_their_status_code() {
    let big_head = {
        let mut h = vec![0x82, 127];
        h.extend_from_slice(&(1u64 << 40).to_be_bytes());
        h
    };
    let cases: Vec<(&str, Vec<u8>, u16, bool)> = vec![
        ("reserved bits", vec![0xa2, 0], 1002, true),
        (
            "masked server frame",
            vec![0x82, 0x81, 1, 2, 3, 4, 5],
            1002,
            true,
        ),
        ("unknown opcode", sframe(true, false, 3, b""), 1002, true),
        (
            "fragmented ping",
            sframe(false, false, OP_PING, b""),
            1002,
            true,
        ),
        (
            "oversized ping",
            sframe(true, false, OP_PING, &[0; 126]),
            1002,
            true,
        ),
        (
            "continuation without message",
            sframe(true, false, OP_CONT, b"x"),
            1002,
            true,
        ),
        (
            "data inside fragmented message",
            [
                sframe(false, false, OP_BINARY, b"a"),
                sframe(true, false, OP_BINARY, b"b"),
            ]
            .concat(),
            1002,
            true,
        ),
        (
            "RSV1 without deflate",
            sframe(true, true, OP_BINARY, b"x"),
            1002,
            false,
        ),
        (
            "RSV1 on a continuation",
            [
                sframe(false, true, OP_BINARY, b"a"),
                sframe(true, true, OP_CONT, b"b"),
            ]
            .concat(),
            1002,
            true,
        ),
        // Refused from the head alone: no payload is sent or buffered.
        ("oversized frame", big_head, 1009, true),
        (
            "oversized fragments",
            [
                sframe(false, false, OP_BINARY, &[b'a'; 600]),
                sframe(true, false, OP_CONT, &[b'a'; 600]),
            ]
            .concat(),
            1009,
            true,
        ),
        (
            "inflates past the limit",
            sframe(true, true, OP_BINARY, &server_deflate(&[b'a'; 5000])),
            1009,
            true,
        ),
        (
            "bad deflate data",
            sframe(true, true, OP_BINARY, &[0xff; 20]),
            1007,
            true,
        ),
        (
            "one-byte close",
            sframe(true, false, OP_CLOSE, b"x"),
            1002,
            true,
        ),
    ];
    for (what, wire, code, deflate) in cases {
        let mut c = WsClient::new(deflate, 1000, 3);
        let e = c.handle_bytes(&wire).expect_err(what);
        assert_eq!(e.code, code, "{what}: {e}");
        let close = sent(&mut c);
        let (_, _, op, payload, _) = cframe(&close);
        assert_eq!(
            (op, payload),
            (OP_CLOSE, code.to_be_bytes().to_vec()),
            "{what}"
        );
        assert!(c.is_closed(), "{what}");
        // Nothing is decoded after a violation.
        c.handle_bytes(&sframe(true, false, OP_BINARY, b"late"))
            .unwrap();
        assert!(app(&mut c).is_empty(), "{what}");
    }
}

#[test]
fn a_close_from_the_hub_is_answered_and_ends_the_stream() {
    let mut c = WsClient::new(true, 1000, 4);
    let mut wire = sframe(true, false, OP_BINARY, b"+OK\r\n");
    wire.extend(sframe(true, false, OP_CLOSE, &1001u16.to_be_bytes()));
    wire.extend(sframe(true, false, OP_BINARY, b"after"));
    c.handle_bytes(&wire).unwrap();
    assert_eq!(app(&mut c), b"+OK\r\n");
    assert!(c.is_closed());
    let (_, _, op, payload, _) = cframe(&sent(&mut c));
    assert_eq!((op, payload), (OP_CLOSE, 1001u16.to_be_bytes().to_vec()));
}

/// Compressed size and speed of the deflate levels on a file of
/// publishes (`WS_BENCH_FILE`, e.g. written by `scripts/link-floor
/// --write-frames`), cut into `WS_BENCH_CHUNK` byte messages (default
/// 180,000: one ordered-mode batch of the link-bench backlog).
/// `cargo test --release --lib uplink::ws::tests::deflate_levels -- --ignored --nocapture`
#[test]
#[ignore]
fn deflate_levels() {
    let Ok(path) = std::env::var("WS_BENCH_FILE") else {
        return;
    };
    let data = std::fs::read(path).unwrap();
    let chunk: usize = std::env::var("WS_BENCH_CHUNK")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(180_000);
    for level in [1, 3, 6, 7, 8, 9, 10] {
        let mut c = CompressorOxide::new(create_comp_flags_from_zip_params(level, -15, 0));
        let t = std::time::Instant::now();
        let mut out = 0usize;
        for _ in 0..3 {
            out = 0;
            for part in data.chunks(chunk) {
                c.reset();
                compress_to_output(&mut c, part, TDEFLFlush::Sync, |b| {
                    out += b.len();
                    true
                });
            }
        }
        let secs = t.elapsed().as_secs_f64() / 3.0;
        println!(
            "level {level:2}: {:.3} of the input, {:.1} MB/s",
            out as f64 / data.len() as f64,
            data.len() as f64 / secs / 1e6
        );
    }
}
