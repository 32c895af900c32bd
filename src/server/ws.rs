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

use std::io;

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::mqtt::Transport;
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
        }
    }

    /// Decode complete frames from `raw` into `data`/`control`.
    fn decode(&mut self) -> io::Result<()> {
        loop {
            let Some(h) = decode_head(&self.raw).map_err(invalid)? else {
                return Ok(());
            };
            if h.len > self.max_frame {
                return Err(invalid("WebSocket frame larger than mqtt.max_packet_size"));
            }
            let Some(mask) = h.mask else {
                return Err(invalid("client WebSocket frames must be masked"));
            };
            let total = h.header_len + h.len as usize;
            if self.raw.len() < total {
                return Ok(());
            }
            let mut payload: Vec<u8> = self.raw[h.header_len..total].to_vec();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            self.raw.drain(..total);
            match h.opcode {
                // binary, or continuation of a binary message
                0x2 | 0x0 => self.data.extend_from_slice(&payload),
                0x1 => {
                    return Err(invalid(
                        "text frames are not allowed; MQTT uses binary frames",
                    ))
                }
                0x8 => {
                    encode_frame(0x8, &[], &mut self.control);
                    self.closed = true;
                    return Ok(());
                }
                0x9 => encode_frame(0xA, &payload, &mut self.control),
                0xA => {}
                _ => return Err(invalid("unknown WebSocket opcode")),
            }
            let _ = h.fin; // fragmentation needs no bookkeeping: bytes are a stream
        }
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
            let mut chunk = [0u8; 8192];
            let n = self.sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(0);
            }
            self.raw.extend_from_slice(&chunk[..n]);
            self.decode()?;
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
}
