//! How a connection's bytes travel, below the protocol: the [`Transport`]
//! trait the connection shells read and write through, and [`Plain`] for
//! a byte stream (TCP, or TLS over TCP). WebSocket framing is
//! [`super::ws::Ws`].
//!
//! Invariant: a shell never runs a read and a write of one transport
//! concurrently, so implementations may keep one state for both.

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
