//! The shell half of a `ws://` / `wss://` hub connection: performs the
//! upgrade on a connected (and, for `wss`, TLS) socket and presents the
//! WebSocket as the plain byte stream the rest of the shell reads and
//! writes. Every decision is [`super::ws::WsClient`]'s; this file only
//! moves bytes.
//!
//! Invariants: each `write` of the shell becomes exactly one WebSocket
//! message (the codec compresses per message, so the shell's batching is
//! what compression works on); a read that returns data has consumed
//! exactly what it returns (dropping a pending read loses nothing); pongs
//! and close frames the codec queued go out before the next message.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ws::{self, WsClient};

/// Largest WebSocket message accepted from the hub (after inflating): the
/// hub batches protocol messages into one frame per flush, so this is a
/// multiple of its 1 MiB default `max_payload`.
pub const MAX_MESSAGE: usize = 8 << 20;

/// A WebSocket connection as a byte stream.
pub struct WsIo<S> {
    inner: S,
    codec: WsClient,
    /// Decoded bytes not yet returned by `read`, from `app_pos`.
    app: Vec<u8>,
    app_pos: usize,
    /// Framed bytes not yet written, from `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    tmp: Box<[u8]>,
}

/// Upgrade `sock` to a WebSocket to `host:port` (the `Host` header).
pub async fn upgrade<S>(mut sock: S, host: &str, port: u16) -> Result<WsIo<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut seed = [0u8; 24];
    getrandom::getrandom(&mut seed)
        .map_err(|e| format!("no randomness for WebSocket keys: {e}"))?;
    let mut key = [0u8; 16];
    key.copy_from_slice(&seed[..16]);
    let mask_seed = u64::from_le_bytes(<[u8; 8]>::try_from(&seed[16..]).unwrap_or_default());
    let (req, accept) = ws::upgrade_request(host, port, key);
    let e = |e: io::Error| format!("WebSocket upgrade: {e}");
    sock.write_all(&req).await.map_err(e)?;
    sock.flush().await.map_err(e)?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = sock.read(&mut buf).await.map_err(e)?;
        if n == 0 {
            return Err("the hub closed the connection during the WebSocket upgrade".into());
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
        if let Some((len, deflate)) = ws::parse_upgrade_response(&head, &accept)? {
            if !deflate {
                log::warn!("the hub's websocket listener does not compress (set `compression: true` in its websocket block); the link carries uncompressed bytes");
            }
            let mut codec = WsClient::new(deflate, MAX_MESSAGE, mask_seed);
            codec
                .handle_bytes(head.get(len..).unwrap_or_default())
                .map_err(|e| e.to_string())?;
            let mut app = Vec::new();
            codec.take_app(&mut app);
            return Ok(WsIo {
                inner: sock,
                codec,
                app,
                app_pos: 0,
                wbuf: Vec::new(),
                wpos: 0,
                tmp: vec![0u8; 16 * 1024].into_boxed_slice(),
            });
        }
    }
}

impl<S: AsyncWrite + Unpin> WsIo<S> {
    /// Write out `wbuf`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let rest = self.wbuf.get(self.wpos..).unwrap_or_default();
            match Pin::new(&mut self.inner).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.wpos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.app_pos < this.app.len() {
                let src = this.app.get(this.app_pos..).unwrap_or_default();
                let n = src.len().min(buf.len());
                buf[..n].copy_from_slice(&src[..n]);
                this.app_pos += n;
                if this.app_pos == this.app.len() {
                    this.app.clear();
                    this.app_pos = 0;
                }
                return Poll::Ready(Ok(n));
            }
            // Pongs and close frames: best effort now, else before the
            // next write.
            this.codec.poll_transmit(&mut this.wbuf);
            if !this.wbuf.is_empty() {
                if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if this.codec.is_closed() {
                return Poll::Ready(Ok(0));
            }
            let n = match Pin::new(&mut this.inner).poll_read(cx, &mut this.tmp) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            let data = this.tmp.get(..n).unwrap_or_default();
            if let Err(e) = this.codec.handle_bytes(data) {
                this.codec.poll_transmit(&mut this.wbuf);
                let _ = this.poll_drain(cx);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    e.to_string(),
                )));
            }
            this.codec.take_app(&mut this.app);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other.map_ok(|()| 0),
        }
        this.codec.poll_transmit(&mut this.wbuf);
        this.codec.encode(data, &mut this.wbuf);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_close(cx),
            other => other,
        }
    }
}
