//! The hub connection over WebSocket with permessage-deflate (RFC 6455,
//! RFC 7692), client side, sans-IO: a `ws://` / `wss://` hub URL.
//!
//! Why: a metered link pays per byte, and NATS text protocol plus JSON
//! telemetry compresses several-fold. nats-server accepts WebSocket
//! clients with compression (`websocket { compression: true }`) but
//! negotiates `server_no_context_takeover; client_no_context_takeover`:
//! every message is compressed on its own, so [`WsClient::encode`] makes
//! each write of the shell (everything the link produced in one turn, a
//! window of publishes) one message, and larger messages compress better.
//!
//! Owns: the upgrade request and the check of its answer
//! ([`upgrade_request`], [`parse_upgrade_response`]), the frame codec and
//! the deflate/inflate of messages. The shell ([`super::ws_io`]) only
//! moves bytes between the socket and this codec.
//!
//! Invariants:
//! - Every frame we send is masked with a fresh key (client frames must
//!   be); every frame we accept is unmasked (a masked server frame is a
//!   protocol error).
//! - A data message (all its fragments, and after inflating) larger than
//!   `max_message` is refused before it is buffered or inflated beyond
//!   that size: the codec's memory is bounded by `max_message` plus one
//!   frame header.
//! - Control frames (ping, pong, close) may come between the fragments of
//!   a message; a ping is answered with a pong carrying its payload; a
//!   close is answered with a close and ends the stream.
//! - Protocol violations (reserved bits, unknown opcodes, fragmented or
//!   oversized control frames, a continuation without a message, a new
//!   message inside a fragmented one, a compressed frame when deflate was
//!   not negotiated) queue a Close with status 1002 (1009 for too big)
//!   and return an error; nothing more is decoded after it.

use miniz_oxide::deflate::core::{
    compress_to_output, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush, TDEFLStatus,
};

use crate::wire::nats::base64;

/// Largest upgrade response head accepted.
pub const MAX_HEAD: usize = 8192;
/// Messages smaller than this are sent uncompressed (deflate would not
/// pay for its own block header).
pub const COMPRESS_MIN: usize = 64;
/// Deflate level (miniz 0..=10). On the link-bench backlog in batches of
/// 1,000 publishes (`ws_tests.rs` `deflate_levels`, 2-core x86_64 under
/// load 12): level 6 leaves 18.6% of the input at 14.3 MB/s, 9 leaves
/// 18.2% (about 1 B per message less) at 7.1 MB/s; 7 and 8 are slower
/// than 9, 10 is no smaller. A metered link pays for bytes, and 7 MB/s
/// of publishes (a few MB/s on an ARM gateway) is far above the
/// compressed link rates it is for.
const LEVEL: i32 = 9;
/// The tail a sync flush leaves, removed on send and restored on receive
/// (RFC 7692 §7.2.1); followed by an empty final block so that a raw
/// inflate ends cleanly.
const SYNC_TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
const FINAL_EMPTY: [u8; 5] = [1, 0, 0, 0xff, 0xff];

const OP_CONT: u8 = 0;
const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

/// The HTTP upgrade request for `host:port` with the 16 random bytes of
/// `key`, and the `Sec-WebSocket-Accept` value the answer must carry.
/// Asks for permessage-deflate without context takeover (what nats-server
/// grants).
pub fn upgrade_request(host: &str, port: u16, key: [u8; 16]) -> (Vec<u8>, String) {
    let key = base64::encode(&key);
    let host = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n\r\n"
    );
    (req.into_bytes(), accept_key(&key))
}

/// `base64(SHA-1(key + GUID))` (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let input = format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, input.as_bytes());
    base64::encode(d.as_ref())
}

/// The hub's answer to the upgrade: `Ok(None)` while the head is
/// incomplete, else the head's length and whether permessage-deflate was
/// granted. Bytes after the head are already WebSocket frames.
pub fn parse_upgrade_response(buf: &[u8], accept: &str) -> Result<Option<(usize, bool)>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(format!(
                "the hub's WebSocket upgrade answer is longer than {MAX_HEAD} bytes"
            ));
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("101") {
        return Err(format!(
            "the hub refused the WebSocket upgrade ({status:?}); is this the hub's websocket port?"
        ));
    }
    let (mut accepted, mut deflate) = (false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "sec-websocket-accept" => accepted = value == accept,
            "sec-websocket-extensions" => {
                deflate |= value
                    .split(',')
                    .any(|e| e.split(';').next().map(str::trim) == Some("permessage-deflate"))
            }
            _ => {}
        }
    }
    if !accepted {
        return Err("the hub's WebSocket upgrade answer has a wrong Sec-WebSocket-Accept".into());
    }
    Ok(Some((end + 4, deflate)))
}

/// A WebSocket protocol violation by the hub (a Close frame with `code` is
/// queued for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsError {
    pub code: u16,
    pub reason: String,
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebSocket: {} (close {})", self.reason, self.code)
    }
}

/// One frame head: (fin, rsv1, opcode, payload length, head length).
type Head = (bool, bool, u8, usize, usize);

/// The client side of one WebSocket connection after the upgrade.
pub struct WsClient {
    deflate: Option<Box<CompressorOxide>>,
    max_message: usize,
    rng: fastrand::Rng,
    /// Received bytes not yet decoded (at most one frame).
    rbuf: Vec<u8>,
    /// Fragments of the data message being received, and whether it is
    /// compressed; `None` outside a fragmented message.
    partial: Option<(Vec<u8>, bool)>,
    /// Decoded application bytes.
    app: Vec<u8>,
    /// Frames to send that the hub asked for (pong, close).
    control: Vec<u8>,
    closed: bool,
}

impl WsClient {
    /// `deflate`: permessage-deflate was granted. `seed` drives the
    /// masking keys.
    pub fn new(deflate: bool, max_message: usize, seed: u64) -> WsClient {
        WsClient {
            deflate: deflate.then(|| Box::new(CompressorOxide::new(comp_flags()))),
            max_message,
            rng: fastrand::Rng::with_seed(seed),
            rbuf: Vec::new(),
            partial: None,
            app: Vec::new(),
            control: Vec::new(),
            closed: false,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Frame `data` as one binary message (compressed when negotiated and
    /// worth it) into `out`.
    pub fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let mut body;
        let mut rsv1 = false;
        let payload = match self.deflate.as_mut() {
            Some(c) if data.len() >= COMPRESS_MIN => {
                body = Vec::with_capacity(data.len() / 2 + 16);
                c.reset();
                let (status, _) = compress_to_output(c, data, TDEFLFlush::Sync, |chunk| {
                    body.extend_from_slice(chunk);
                    true
                });
                if status == TDEFLStatus::Okay && body.ends_with(&SYNC_TAIL) {
                    body.truncate(body.len() - SYNC_TAIL.len());
                    rsv1 = true;
                    body.as_slice()
                } else {
                    data
                }
            }
            _ => data,
        };
        let key = self.rng.u32(..).to_be_bytes();
        frame(true, rsv1, OP_BINARY, payload, key, out);
    }

    /// Decode bytes from the hub. Application bytes are then in
    /// [`WsClient::take_app`], frames to answer in
    /// [`WsClient::poll_transmit`].
    pub fn handle_bytes(&mut self, data: &[u8]) -> Result<(), WsError> {
        if self.closed {
            return Ok(());
        }
        self.rbuf.extend_from_slice(data);
        let mut used = 0;
        let r = loop {
            let buf = self.rbuf.get(used..).unwrap_or_default();
            let (fin, rsv1, op, len, hl) = match self.head(buf) {
                Ok(Some(h)) => h,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            if buf.len() < hl + len {
                break Ok(());
            }
            let payload = buf[hl..hl + len].to_vec();
            used += hl + len;
            if let Err(e) = self.frame_in(fin, rsv1, op, payload) {
                break Err(e);
            }
            if self.closed {
                break Ok(());
            }
        };
        self.rbuf.drain(..used.min(self.rbuf.len()));
        if let Err(e) = &r {
            self.fail(e);
        }
        r
    }

    /// Move the decoded application bytes into `into`.
    pub fn take_app(&mut self, into: &mut Vec<u8>) {
        into.append(&mut self.app);
    }

    /// Move the frames to send (pongs, close) into `into`.
    pub fn poll_transmit(&mut self, into: &mut Vec<u8>) {
        into.append(&mut self.control);
    }

    fn fail(&mut self, e: &WsError) {
        let key = self.rng.u32(..).to_be_bytes();
        frame(
            true,
            false,
            OP_CLOSE,
            &e.code.to_be_bytes(),
            key,
            &mut self.control,
        );
        self.closed = true;
        self.rbuf.clear();
        self.partial = None;
    }

    /// Parse a frame head; `None` while incomplete. Checks what can be
    /// checked before the payload arrives (so an oversized frame is
    /// refused without buffering it).
    fn head(&self, b: &[u8]) -> Result<Option<Head>, WsError> {
        let (Some(&b0), Some(&b1)) = (b.first(), b.get(1)) else {
            return Ok(None);
        };
        let (fin, rsv1, op) = (b0 & 0x80 != 0, b0 & 0x40 != 0, b0 & 0x0f);
        if b0 & 0x30 != 0 {
            return Err(violation(1002, "reserved bits set"));
        }
        if b1 & 0x80 != 0 {
            return Err(violation(1002, "masked frame from the server"));
        }
        let (len, hl) = match b1 & 0x7f {
            126 => match b.get(2..4) {
                Some(l) => (u16::from_be_bytes([l[0], l[1]]) as u64, 4),
                None => return Ok(None),
            },
            127 => match b.get(2..10).and_then(|l| <[u8; 8]>::try_from(l).ok()) {
                Some(l) => (u64::from_be_bytes(l), 10),
                None => return Ok(None),
            },
            n => (n as u64, 2),
        };
        match op {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin || len > 125 || rsv1 {
                    return Err(violation(
                        1002,
                        "fragmented, compressed or oversized control frame",
                    ));
                }
            }
            OP_CONT | OP_TEXT | OP_BINARY => {
                if rsv1 && (self.deflate.is_none() || op == OP_CONT) {
                    return Err(violation(
                        1002,
                        "RSV1 set without permessage-deflate at a message start",
                    ));
                }
                let so_far = self.partial.as_ref().map_or(0, |(p, _)| p.len()) as u64;
                if len.saturating_add(so_far) > self.max_message as u64 {
                    return Err(violation(1009, "message larger than the limit"));
                }
            }
            _ => return Err(violation(1002, "unknown opcode")),
        }
        Ok(Some((fin, rsv1, op, len as usize, hl)))
    }

    fn frame_in(&mut self, fin: bool, rsv1: bool, op: u8, payload: Vec<u8>) -> Result<(), WsError> {
        match op {
            OP_PING => {
                let key = self.rng.u32(..).to_be_bytes();
                frame(true, false, OP_PONG, &payload, key, &mut self.control);
            }
            OP_PONG => {}
            OP_CLOSE => {
                if payload.len() == 1 {
                    return Err(violation(1002, "close frame with a one-byte body"));
                }
                let key = self.rng.u32(..).to_be_bytes();
                frame(
                    true,
                    false,
                    OP_CLOSE,
                    payload.get(..2).unwrap_or_default(),
                    key,
                    &mut self.control,
                );
                self.closed = true;
            }
            OP_CONT => {
                let Some((mut msg, compressed)) = self.partial.take() else {
                    return Err(violation(1002, "continuation frame without a message"));
                };
                msg.extend_from_slice(&payload);
                if fin {
                    self.deliver(msg, compressed)?;
                } else {
                    self.partial = Some((msg, compressed));
                }
            }
            _ => {
                if self.partial.is_some() {
                    return Err(violation(
                        1002,
                        "new data frame inside a fragmented message",
                    ));
                }
                if fin {
                    self.deliver(payload, rsv1)?;
                } else {
                    self.partial = Some((payload, rsv1));
                }
            }
        }
        Ok(())
    }

    fn deliver(&mut self, mut msg: Vec<u8>, compressed: bool) -> Result<(), WsError> {
        if !compressed {
            self.app.extend_from_slice(&msg);
            return Ok(());
        }
        msg.extend_from_slice(&SYNC_TAIL);
        msg.extend_from_slice(&FINAL_EMPTY);
        match miniz_oxide::inflate::decompress_to_vec_with_limit(&msg, self.max_message) {
            Ok(plain) => {
                self.app.extend_from_slice(&plain);
                Ok(())
            }
            Err(e) if e.status == miniz_oxide::inflate::TINFLStatus::HasMoreOutput => Err(
                violation(1009, "message larger than the limit once inflated"),
            ),
            Err(e) => Err(violation(
                1007,
                &format!("bad deflate data: {:?}", e.status),
            )),
        }
    }
}

fn comp_flags() -> u32 {
    create_comp_flags_from_zip_params(LEVEL, -15, 0)
}

fn violation(code: u16, reason: &str) -> WsError {
    WsError {
        code,
        reason: reason.to_string(),
    }
}

/// Encode one masked client frame.
fn frame(fin: bool, rsv1: bool, op: u8, payload: &[u8], key: [u8; 4], out: &mut Vec<u8>) {
    out.push(u8::from(fin) << 7 | u8::from(rsv1) << 6 | op);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
}

#[cfg(test)]
#[path = "ws_tests.rs"]
mod tests;
