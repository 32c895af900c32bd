//! The one accept loop of every listener (MQTT, NATS, HTTP monitoring).
//!
//! Owns: accepting until shutdown, the connection limit, and the logging
//! of failures and refusals.
//!
//! Invariants:
//! - A connection is counted in [`Accept::open`] before its task exists,
//!   so a flood of accepts cannot overshoot `max_connections`; the task
//!   gives the slot back when it ends.
//! - A connection over the limit is told why ([`Accept::refusal`], only
//!   if its fresh socket takes the bytes at once) and closed at once:
//!   refusals hold no descriptors.
//! - A failed accept (EMFILE, ENFILE, ...) is retried after 100 ms, never
//!   in a busy loop.
//! - Failures and refusals are each logged at most every
//!   [`Accept::failure_log_every`] / [`Accept::refusal_log_every`]
//!   (flash wear), with their counts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use smol::channel::Receiver;
use smol::future::FutureExt;
use smol::io::AsyncWriteExt;
use smol::net::{TcpListener, TcpStream};
use smol::Timer;

/// Wait after a failed accept.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// What a listener's accept loop needs to know.
pub struct Accept<'a> {
    /// The log prefix (`mqtt`, `nats`, `http`).
    pub name: &'static str,
    /// Connections open now; the loop adds one per accepted connection,
    /// the connection's task subtracts it when it ends.
    pub open: &'a AtomicU64,
    pub max_connections: usize,
    /// The config key named when the limit is reached.
    pub limit_key: &'static str,
    /// Bytes a refused connection gets (may be empty).
    pub refusal: &'a [u8],
    /// Refusals are logged at most this often ...
    pub refusal_log_every: Duration,
    /// ... and failed accepts at most this often.
    pub failure_log_every: Duration,
    /// Appended to the log line of a failed accept.
    pub failure_hint: &'static str,
}

/// Rate-limited counting log of one kind of event.
struct Quiet {
    count: u64,
    last: Option<Instant>,
}

impl Quiet {
    /// Count one; true (and reset) when it is time to log the count.
    fn due(&mut self, every: Duration) -> Option<u64> {
        self.count += 1;
        if self.last.is_some_and(|t| t.elapsed() < every) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.count))
    }
}

/// Accept connections on `listener` until `shutdown` fires, handing each
/// admitted one to `start` (which spawns its task; that task must
/// decrement [`Accept::open`] when it ends).
pub async fn serve(
    listener: &TcpListener,
    shutdown: &Receiver<()>,
    a: Accept<'_>,
    mut start: impl FnMut(TcpStream, SocketAddr),
) {
    let mut failed = Quiet {
        count: 0,
        last: None,
    };
    let mut refused = Quiet {
        count: 0,
        last: None,
    };
    loop {
        let accepted = async { Some(listener.accept().await) }
            .or(async {
                let _ = shutdown.recv().await;
                None
            })
            .await;
        let (mut sock, peer) = match accepted {
            None => return,
            Some(Ok(x)) => x,
            Some(Err(e)) => {
                if let Some(n) = failed.due(a.failure_log_every) {
                    log::warn!(
                        "{}: accept failed {n} time(s): {e}; retrying every 100ms{}",
                        a.name,
                        a.failure_hint
                    );
                }
                Timer::after(RETRY_AFTER).await;
                continue;
            }
        };
        let current = a.open.fetch_add(1, Ordering::Relaxed);
        if current as usize >= a.max_connections {
            a.open.fetch_sub(1, Ordering::Relaxed);
            if let Some(n) = refused.due(a.refusal_log_every) {
                log::warn!(
                    "{}: refused {n} connection(s) (latest from {peer}): {} ({}) reached",
                    a.name,
                    a.limit_key,
                    a.max_connections
                );
            }
            if !a.refusal.is_empty() {
                let _ = smol::future::poll_once(sock.write(a.refusal)).await;
            }
            continue;
        }
        start(sock, peer);
    }
}
