//! How a connection's bytes travel, below the protocol: the [`Transport`]
//! trait the connection shells read and write through, [`Plain`] for a
//! byte stream (TCP, or TLS over TCP), and [`Link`], the one transport
//! type an accepted MQTT connection is served over. WebSocket framing is
//! [`super::ws::Ws`].
//!
//! Invariants: a shell never runs a read and a write of one transport
//! concurrently, so implementations may keep one state for both. The
//! listener hands every connection over as a [`Link`] of a boxed
//! [`Stream`], so the connection code (the largest generic code in the
//! binary) is compiled once, not once per stream and framing (TCP, TLS,
//! WebSocket, WebSocket over TLS: four copies of about 28 KiB each).

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ws::Ws;

/// A byte stream a listener accepted: TCP, or TLS over TCP.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for S {}

/// Any accepted byte stream, behind one type (one indirect call per read
/// or write, next to a system call).
pub type Stream = Box<dyn ByteStream>;

/// How a connection's bytes travel: plain TCP, or WebSocket frames
/// ([`super::ws`]). Reads and writes never run concurrently.
pub trait Transport {
    /// Read some bytes; `Ok(0)` is the end of the stream. Cancel-safe.
    fn read(&mut self, buf: &mut [u8])
        -> impl std::future::Future<Output = std::io::Result<usize>>;
    /// Write all of `data`.
    fn write_all(&mut self, data: &[u8]) -> impl std::future::Future<Output = std::io::Result<()>>;
}

/// MQTT bytes straight on a byte stream (TCP, or TLS over TCP).
pub struct Plain<S>(pub S);

impl<S: AsyncRead + AsyncWrite + Unpin> Transport for Plain<S> {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        AsyncReadExt::read(&mut self.0, buf).await
    }
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
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
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(t) => t.read(buf).await,
            Link::Ws(t) => t.read(buf).await,
        }
    }
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Link::Plain(t) => t.write_all(data).await,
            Link::Ws(t) => t.write_all(data).await,
        }
    }
}
