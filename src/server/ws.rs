//! MQTT over WebSocket (RFC 6455, subprotocol `mqtt`), for browser
//! dashboards.
//!
//! Owns: the HTTP/1.1 upgrade handshake and the frame codec. MQTT bytes
//! travel in binary frames and may be split across or packed into frames
//! arbitrarily; [`Ws`] presents them as a byte stream to the MQTT shell.
//!
//! Limits: the request head is at most 8 KiB; a frame larger than the
//! configured maximum is refused and closes the connection; text frames are
//! refused (MQTT requires binary); client frames must be masked. Pings are
//! answered with pongs; a close frame ends the stream.
//!
//! Framing rules (RFC 6455 §5.2, §5.4, §5.5), each broken one closing the
//! connection with a Close frame carrying its status code and then an
//! error from [`Transport::read`]: reserved bits or opcodes, an unmasked
//! client frame, a continuation frame with no fragmented message before
//! it, a new data frame inside a fragmented message, a control frame that
//! is fragmented or carries more than 125 bytes, and a close frame with a
//! one-byte body are protocol errors (1002); a text frame is unsupported
//! data (1003); a frame over the maximum is too big (1009). Control frames
//! may come between the fragments of a message.

use std::io;

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::transport::Transport;
use crate::wire::nats::base64;

/// Read the upgrade request from `sock` and answer it. On error the
/// connection is answered with 400 (when possible) and must be closed.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(sock: &mut S) -> Result<(), String> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed during the WebSocket handshake".into());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 8192 {
            return refuse(sock, "request head larger than 8 KiB").await;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request = lines.next().unwrap_or("");
    if !request.starts_with("GET ") {
        return refuse(sock, "WebSocket upgrade must be a GET").await;
    }
    let mut key = None;
    let mut upgrade = false;
    let mut protocols = String::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "sec-websocket-key" => key = Some(value.to_string()),
            "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
            "sec-websocket-protocol" => protocols = value.to_string(),
            _ => {}
        }
    }
    let (Some(key), true) = (key, upgrade) else {
        return refuse(sock, "not a WebSocket upgrade request").await;
    };
    let offered: Vec<&str> = protocols.split(',').map(str::trim).collect();
    let chosen = ["mqtt", "mqttv3.1"]
        .into_iter()
        .find(|p| offered.contains(p));
    if !protocols.is_empty() && chosen.is_none() {
        return refuse(sock, "WebSocket subprotocol must be mqtt").await;
    }
    let accept = accept_key(&key);
    let mut resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = chosen {
        resp.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    resp.push_str("\r\n");
    sock.write_all(resp.as_bytes())
        .await
        .map_err(|e| e.to_string())
}

async fn refuse<S: AsyncWrite + Unpin>(sock: &mut S, why: &str) -> Result<(), String> {
    let body = format!("{why}\n");
    let resp = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    Err(why.to_string())
}

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut input = key.trim().as_bytes().to_vec();
    input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::encode(&sha1(&input))
}

/// One decoded frame header (client to server).
#[derive(Debug, PartialEq, Eq)]
struct FrameHead {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    header_len: usize,
}

/// Decode a frame header; `Ok(None)` means more bytes are needed.
fn decode_head(b: &[u8]) -> Result<Option<FrameHead>, &'static str> {
    let (Some(&b0), Some(&b1)) = (b.first(), b.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err("reserved bits set (no extensions were negotiated)");
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => match b.get(2..4) {
            Some(x) => (u64::from(u16::from_be_bytes([x[0], x[1]])), 4),
            None => return Ok(None),
        },
        127 => match b.get(2..10) {
            Some(x) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(x);
                (u64::from_be_bytes(a), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        match b.get(at..at + 4) {
            Some(m) => {
                at += 4;
                Some([m[0], m[1], m[2], m[3]])
            }
            None => return Ok(None),
        }
    } else {
        None
    };
    Ok(Some(FrameHead {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        mask,
        len,
        header_len: at,
    }))
}

/// Encode one unmasked server frame.
fn encode_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Close status codes (RFC 6455 §7.4.1).
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
const CLOSE_TOO_BIG: u16 = 1009;

/// Largest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// A frame the peer may not send: the connection is closed with `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Violation {
    code: u16,
    why: &'static str,
}

fn protocol_error(why: &'static str) -> Violation {
    Violation {
        code: CLOSE_PROTOCOL_ERROR,
        why,
    }
}

/// A WebSocket connection presenting MQTT bytes as a stream.
pub struct Ws<S> {
    sock: S,
    max_frame: u64,
    /// Raw bytes read from the socket, not yet decoded.
    raw: Vec<u8>,
    /// Decoded MQTT bytes not yet returned by `read`.
    data: Vec<u8>,
    /// Control frames (pong, close) to send with the next write or read.
    control: Vec<u8>,
    closed: bool,
    /// A fragmented data message is in progress (its first frame had FIN
    /// clear): only continuation and control frames may come until FIN.
    fragmented: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Ws<S> {
    pub fn new(sock: S, max_frame: usize) -> Ws<S> {
        Ws {
            sock,
            max_frame: max_frame as u64,
            raw: Vec::new(),
            data: Vec::new(),
            control: Vec::new(),
            closed: false,
            fragmented: false,
        }
    }

    /// Decode complete frames from `raw` into `data`/`control`. A frame
    /// breaking the rules is refused as soon as its header shows it.
    fn decode(&mut self) -> Result<(), Violation> {
        while !self.closed {
            let Some(h) = decode_head(&self.raw).map_err(protocol_error)? else {
                return Ok(());
            };
            let control = h.opcode & 0x8 != 0;
            if control && !h.fin {
                return Err(protocol_error("fragmented control frame"));
            }
            if control && h.len > MAX_CONTROL_PAYLOAD {
                return Err(protocol_error("control frame payload over 125 bytes"));
            }
            match h.opcode {
                0x0 if !self.fragmented => {
                    return Err(protocol_error(
                        "continuation frame without a fragmented message before it",
                    ))
                }
                0x1 => {
                    return Err(Violation {
                        code: CLOSE_UNSUPPORTED_DATA,
                        why: "text frames are not allowed; MQTT uses binary frames",
                    })
                }
                0x2 if self.fragmented => {
                    return Err(protocol_error(
                        "new data frame before the fragmented message ended",
                    ))
                }
                0x0 | 0x2 | 0x8 | 0x9 | 0xA => {}
                _ => return Err(protocol_error("reserved WebSocket opcode")),
            }
            if h.len > self.max_frame {
                return Err(Violation {
                    code: CLOSE_TOO_BIG,
                    why: "WebSocket frame larger than mqtt.max_packet_size",
                });
            }
            let Some(mask) = h.mask else {
                return Err(protocol_error("client WebSocket frames must be masked"));
            };
            // Fits: h.len <= max_frame, a usize.
            let total = h.header_len + h.len as usize;
            let Some(body) = self.raw.get(h.header_len..total) else {
                return Ok(());
            };
            let mut payload: Vec<u8> = body.to_vec();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            self.raw.drain(..total);
            match h.opcode {
                // binary, or continuation of a binary message
                0x2 | 0x0 => {
                    self.data.extend_from_slice(&payload);
                    self.fragmented = !h.fin;
                }
                0x8 if payload.len() == 1 => {
                    return Err(protocol_error("close frame with a one-byte body"))
                }
                0x8 => {
                    encode_frame(0x8, &[], &mut self.control);
                    self.closed = true;
                }
                0x9 => encode_frame(0xA, &payload, &mut self.control),
                _ => {} // pong
            }
        }
        Ok(())
    }

    /// Refuse the peer's framing: queue a Close frame with the status code
    /// and reason, send it (best effort) and end the stream.
    async fn refuse(&mut self, v: Violation) -> io::Error {
        let mut body = v.code.to_be_bytes().to_vec();
        body.extend_from_slice(v.why.as_bytes());
        body.truncate(MAX_CONTROL_PAYLOAD as usize);
        encode_frame(0x8, &body, &mut self.control);
        self.closed = true;
        self.raw.clear();
        let _ = self.flush_control().await;
        invalid(v.why)
    }

    async fn flush_control(&mut self) -> io::Result<()> {
        if !self.control.is_empty() {
            let c = std::mem::take(&mut self.control);
            self.sock.write_all(&c).await?;
            self.sock.flush().await?;
        }
        Ok(())
    }
}

fn invalid(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Transport for Ws<S> {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.data.is_empty() {
                let n = buf.len().min(self.data.len());
                buf[..n].copy_from_slice(&self.data[..n]);
                self.data.drain(..n);
                return Ok(n);
            }
            if self.closed {
                let _ = self.flush_control().await;
                return Ok(0);
            }
            // The caller's buffer doubles as the socket read buffer: a
            // local one would sit in every connection's future.
            if buf.is_empty() {
                return Ok(0);
            }
            let n = self.sock.read(buf).await?;
            if n == 0 {
                return Ok(0);
            }
            self.raw.extend_from_slice(&buf[..n]);
            if let Err(v) = self.decode() {
                self.data.clear();
                return Err(self.refuse(v).await);
            }
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let mut out = std::mem::take(&mut self.control);
        encode_frame(0x2, data, &mut out);
        self.sock.write_all(&out).await?;
        self.sock.flush().await
    }
}

/// SHA-1, only for the handshake's accept key (ring's legacy digest).
fn sha1(data: &[u8]) -> [u8; 20] {
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, data);
    let mut out = [0u8; 20];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_accept_key_example() {
        // The example in RFC 6455 §1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn sha1_known_vectors() {
        let hex = |b: [u8; 20]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(hex(sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
    }

    #[test]
    fn frame_heads() {
        assert_eq!(decode_head(&[0x82]), Ok(None));
        let h = decode_head(&[0x82, 0x85, 1, 2, 3, 4]).unwrap().unwrap();
        assert_eq!(
            h,
            FrameHead {
                fin: true,
                opcode: 2,
                mask: Some([1, 2, 3, 4]),
                len: 5,
                header_len: 6
            }
        );
        assert_eq!(decode_head(&[0x82, 0xFE, 0x01]), Ok(None));
        let h = decode_head(&[0x02, 0xFE, 0x01, 0x00, 9, 9, 9, 9])
            .unwrap()
            .unwrap();
        assert_eq!((h.fin, h.len, h.header_len), (false, 256, 8));
        assert!(decode_head(&[0xC2, 0x80]).is_err());
        let mut out = Vec::new();
        encode_frame(2, &[7; 300], &mut out);
        assert_eq!(&out[..4], &[0x82, 126, 1, 44]);
    }

    /// A socket in memory: reads `input`, collects what is written.
    struct Mem {
        input: Vec<u8>,
        pos: usize,
        output: Vec<u8>,
    }

    impl AsyncRead for Mem {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let rest = &self.input[self.pos..];
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            self.pos += n;
            std::task::Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Mem {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.output.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A masked client frame (header only when `body` is false).
    fn frame(fin: bool, opcode: u8, payload: &[u8], body: bool) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        if body {
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        f
    }

    /// Read everything `input` yields: the bytes, or the error, and what
    /// was written back.
    fn read_all(input: Vec<u8>) -> (Result<Vec<u8>, io::Error>, Vec<u8>) {
        let mem = Mem {
            input,
            pos: 0,
            output: Vec::new(),
        };
        let mut ws = Ws::new(mem, 1024);
        let mut got = Vec::new();
        let res = smol::block_on(async {
            let mut buf = [0u8; 64];
            loop {
                match ws.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(e),
                }
            }
        });
        (res.map(|()| got), ws.sock.output)
    }

    /// The status code of the close frame at the start of `out`.
    fn close_code(out: &[u8]) -> Option<u16> {
        match out {
            [0x88, len, hi, lo, ..] if *len >= 2 && *len <= 125 => {
                Some(u16::from_be_bytes([*hi, *lo]))
            }
            _ => None,
        }
    }

    #[test]
    fn fragments_and_interleaved_control_frames_are_a_stream() {
        let mut input = frame(false, 0x2, b"ab", true);
        input.extend(frame(true, 0x9, b"p", true));
        input.extend(frame(false, 0x0, b"cd", true));
        input.extend(frame(true, 0x0, b"e", true));
        input.extend(frame(true, 0x2, b"f", true));
        input.extend(frame(true, 0x8, &1000u16.to_be_bytes(), true));
        let (got, out) = read_all(input);
        assert_eq!(got.unwrap(), b"abcdef");
        // The pong, then the answering close.
        assert_eq!(out, [0x8A, 1, b'p', 0x88, 0]);
    }

    #[test]
    fn framing_violations_close_with_their_status_code() {
        let big = [0u8; 126];
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            (
                "continuation with nothing before",
                frame(true, 0x0, b"x", true),
                1002,
            ),
            (
                "ping over 125 bytes (refused from its header)",
                frame(true, 0x9, &big, false),
                1002,
            ),
            ("close over 125 bytes", frame(true, 0x8, &big, true), 1002),
            ("fragmented ping", frame(false, 0x9, b"p", true), 1002),
            ("fragmented close", frame(false, 0x8, b"", true), 1002),
            (
                "new message inside a fragmented one",
                [frame(false, 0x2, b"a", true), frame(true, 0x2, b"b", true)].concat(),
                1002,
            ),
            ("reserved opcode", frame(true, 0x3, b"", true), 1002),
            ("reserved control opcode", frame(true, 0xB, b"", true), 1002),
            ("reserved bits", vec![0xC2, 0x80, 1, 2, 3, 4], 1002),
            ("unmasked", vec![0x82, 0x01, 0x10], 1002),
            ("one-byte close body", frame(true, 0x8, b"x", true), 1002),
            ("text frame", frame(true, 0x1, b"hi", true), 1003),
            (
                "over the maximum",
                frame(true, 0x2, &[0; 2000], false),
                1009,
            ),
        ];
        for (what, input, code) in cases {
            let (got, out) = read_all(input);
            let e = got.expect_err(what);
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}");
            assert_eq!(close_code(&out), Some(code), "{what}: {out:?}");
            assert_eq!(out.len(), 2 + usize::from(out[1]), "{what}: one frame");
        }
    }
}
