//! How a connection's bytes travel, below the protocol: the [`Transport`]
//! trait the connection shells read and write through, [`Plain`] for a
//! byte stream (TCP, or TLS over TCP), [`Tcp`], the accepted socket, and
//! [`Link`], the one transport type an accepted MQTT connection is served
//! over. WebSocket framing is [`super::ws::Ws`].
//!
//! Invariants: a shell never runs a read and a write of one transport
//! concurrently, so implementations may keep one state for both. The
//! listener hands every connection over as a [`Link`] of a boxed
//! [`Stream`], so the connection code (the largest generic code in the
//! binary) is compiled once, not once per stream and framing (TCP, TLS,
//! WebSocket, WebSocket over TLS: four copies of about 28 KiB each).
//! Every accepted socket is a [`Tcp`] (under TLS and WebSocket too): once
//! a read found nothing, the next one waits for the reactor to report the
//! socket readable before it reads, so a connection woken for something
//! else (deliveries to write) issues no read that finds nothing. Its one
//! reader is the connection's task (the reactor keeps one waker per
//! direction).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::Async;

use super::ws::Ws;

/// A byte stream a listener accepted: TCP, or TLS over TCP.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for S {}

/// Any accepted byte stream, behind one type (one indirect call per read
/// or write, next to a system call).
pub type Stream = Box<dyn ByteStream>;

/// An accepted TCP socket, read by readiness (see the module doc).
pub struct Tcp {
    sock: Arc<Async<std::net::TcpStream>>,
    /// The last read found nothing: read again once the reactor reports
    /// the socket readable (it registered the interest then).
    drained: bool,
}

impl From<smol::net::TcpStream> for Tcp {
    fn from(sock: smol::net::TcpStream) -> Tcp {
        Tcp {
            sock: sock.into(),
            drained: false,
        }
    }
}

impl AsyncRead for Tcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.drained {
            // No system call until the reactor saw the socket readable.
            ready!(this.sock.poll_readable(cx))?;
            this.drained = false;
        }
        let read = Pin::new(&mut &*this.sock).poll_read(cx, buf);
        this.drained = read.is_pending();
        read
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.sock).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.sock.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

/// How a connection's bytes travel: plain TCP, or WebSocket frames
/// ([`super::ws`]). Reads and writes never run concurrently.
pub trait Transport {
    /// Read some bytes; `Ok(0)` is the end of the stream. Cancel-safe.
    fn read(&mut self, buf: &mut [u8]) -> impl std::future::Future<Output = io::Result<usize>>;
    /// Write all of `data`.
    fn write_all(&mut self, data: &[u8]) -> impl std::future::Future<Output = io::Result<()>>;
}

/// MQTT bytes straight on a byte stream (TCP, or TLS over TCP).
pub struct Plain<S>(pub S);

impl<S: AsyncRead + AsyncWrite + Unpin> Transport for Plain<S> {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        AsyncReadExt::read(&mut self.0, buf).await
    }
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        AsyncWriteExt::write_all(&mut self.0, data).await?;
        // TLS buffers records; TCP's flush is a no-op.
        self.0.flush().await
    }
}

/// An accepted connection's transport: MQTT bytes straight on the stream,
/// or in WebSocket frames.
pub enum Link {
    Plain(Plain<Stream>),
    Ws(Ws<Stream>),
}

impl Transport for Link {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Plain(t) => t.read(buf).await,
            Link::Ws(t) => t.read(buf).await,
        }
    }
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Link::Plain(t) => t.write_all(data).await,
            Link::Ws(t) => t.write_all(data).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::task::Waker;

    /// A connected pair: frond's side as a [`Tcp`], the peer blocking.
    fn pair() -> (Tcp, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        let ours = smol::net::TcpStream::try_from(ours).unwrap();
        (Tcp::from(ours), peer)
    }

    #[test]
    fn a_drained_socket_is_read_again_once_readable() {
        let (mut tcp, mut peer) = pair();
        let mut buf = [0u8; 16];
        let mut cx = Context::from_waker(Waker::noop());
        // Nothing to read: pending, and from then on by readiness.
        assert!(Pin::new(&mut tcp).poll_read(&mut cx, &mut buf).is_pending());
        assert!(tcp.drained);
        assert!(Pin::new(&mut tcp).poll_read(&mut cx, &mut buf).is_pending());
        // Bytes that arrive while nobody polls are seen (the reactor
        // reports the socket readable).
        peer.write_all(b"hello").unwrap();
        let n = smol::block_on(AsyncReadExt::read(&mut tcp, &mut buf)).unwrap();
        assert_eq!(buf.get(..n), Some(&b"hello"[..]));
        assert!(!tcp.drained);
        // Writes go through; the peer's close reads as the end.
        smol::block_on(Transport::write_all(&mut Plain(&mut tcp), b"back")).unwrap();
        let mut got = [0u8; 4];
        std::io::Read::read_exact(&mut peer, &mut got).unwrap();
        assert_eq!(&got, b"back");
        drop(peer);
        let n = smol::block_on(AsyncReadExt::read(&mut tcp, &mut buf)).unwrap();
        assert_eq!(n, 0);
    }
}
