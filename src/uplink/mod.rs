//! The hub link, part 1: exactly-once mirror-up of local streams into hub
//! JetStream streams.
//!
//! Owns: the single NATS connection to the hub (connect, auth, PING/PONG
//! liveness, reconnect with jittered exponential backoff), one
//! [`mirror::Mirror`] state machine per configured mirror, the per-mirror
//! cursor files ([`cursor`]) and the shared [`UplinkStatus`].
//!
//! Invariants:
//! - All mirror logic lives in the sans-IO [`mirror`] module; [`run`] only
//!   moves bytes, reads local streams, runs timers and persists cursors.
//! - A cursor file is written (temp + rename) at most once a second per
//!   mirror while it changes, and with fsync at shutdown. A stale cursor
//!   only causes a longer resync, never loss or duplicates.
//! - No lock is held across an `.await`; every channel is bounded by
//!   construction (one outstanding local read per mirror).

pub mod cursor;
pub mod mirror;
pub mod status;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::channel::{Receiver, Sender};
use smol::future::{self, FutureExt};
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::net::TcpStream;
use smol::Timer;

use crate::config::{HubUrl, UplinkConfig};
use crate::stream::{StoredMessage, StreamError, StreamHandle};
use crate::wire::nats::client::{self, ConnectOptions, ServerInfo, ServerOp, PAYLOAD_SLACK};

pub use mirror::{Mirror, MirrorParams, MirrorStatus};
pub use status::UplinkStatus;

/// Our PING interval; two unanswered PINGs close the connection.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
const MAX_PINGS_OUT: u32 = 2;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type ReadAnswer = (usize, u64, Vec<StoredMessage>);

struct Slot {
    mirror: Mirror,
    handle: StreamHandle,
    cursor_path: PathBuf,
    reads: Sender<mirror::ReadRequest>,
}

enum Ended {
    Shutdown,
    Lost { reason: String, was_up: bool },
}

/// Run the uplink until `shutdown` fires (or its sender is dropped).
pub async fn run(
    cfg: UplinkConfig,
    node: String,
    data_dir: PathBuf,
    streams: Vec<StreamHandle>,
    status: Arc<UplinkStatus>,
    shutdown: Receiver<()>,
) {
    let (answers_tx, answers_rx) =
        smol::channel::bounded::<ReadAnswer>(cfg.mirrors.len().max(1) * 2);
    let mut slots = Vec::new();
    let mut readers = Vec::new();
    for mc in &cfg.mirrors {
        let Some(handle) = streams
            .iter()
            .find(|h| h.config().name == mc.stream)
            .cloned()
        else {
            log::error!(
                "mirror of stream {} skipped: no such local stream is open",
                mc.stream
            );
            continue;
        };
        let path = match cursor::path(&data_dir, &mc.stream) {
            Ok(p) => p,
            Err(e) => {
                log::error!("mirror of stream {:?} skipped: {e}", mc.stream);
                continue;
            }
        };
        let start = match cursor::load(&path) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("cursor for stream {} is unusable ({e}); starting from 0 with a full resync of hub stream {}", mc.stream, mc.to);
                None
            }
        };
        let params = MirrorParams {
            node: node.clone(),
            stream: mc.stream.clone(),
            hub_stream: mc.to.clone(),
            subject_prefix: mc.subject_prefix.clone(),
            max_inflight: cfg.max_inflight.max(1),
            ack_timeout: cfg.ack_timeout,
            retry_min: cfg.reconnect_min,
            retry_max: cfg.reconnect_max,
            scan_cap: mirror::DEFAULT_SCAN_CAP,
        };
        let m = Mirror::new(params, start);
        if let Some(c) = start {
            let last = handle.state().last_seq;
            if last < c.local_seq {
                log::warn!(
                    "cursor of stream {} ({}) is ahead of the local stream (last seq {last}); was the local stream recreated?",
                    mc.stream, c.local_seq
                );
            }
        }
        let (tx, rx) = smol::channel::unbounded();
        let idx = slots.len();
        readers.push(smol::spawn(reader(
            handle.clone(),
            idx,
            rx,
            answers_tx.clone(),
        )));
        slots.push(Slot {
            mirror: m,
            handle,
            cursor_path: path,
            reads: tx,
        });
    }
    let mut backoff = cfg.reconnect_min;
    let mut url_idx = 0usize;
    let mut tls = TlsClient::new(&cfg);
    'outer: loop {
        let Some(url) = cfg.urls.get(url_idx % cfg.urls.len().max(1)).cloned() else {
            log::error!("no hub URLs configured");
            break;
        };
        url_idx = url_idx.wrapping_add(1);
        status.set_link("connecting", Some(url.to_string()));
        publish_status(&slots, &status);
        let ended = session(
            &cfg,
            &node,
            &url,
            &mut tls,
            &mut slots,
            &answers_rx,
            &status,
            &shutdown,
        )
        .await;
        for s in slots.iter_mut() {
            s.mirror.handle_disconnected();
        }
        persist(&mut slots, Instant::now(), false);
        match ended {
            Ended::Shutdown => break,
            Ended::Lost { reason, was_up } => {
                if was_up {
                    log::info!("disconnected from {url}: {reason}");
                    backoff = cfg.reconnect_min;
                    status.set_link("disconnected", Some(url.to_string()));
                } else {
                    log::warn!("cannot connect to {url}: {reason}");
                    status.set_link(format!("error: {reason}"), Some(url.to_string()));
                }
            }
        }
        publish_status(&slots, &status);
        let jittered = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
        backoff = backoff.saturating_mul(2).min(cfg.reconnect_max);
        let stop = async {
            let _ = shutdown.recv().await;
            true
        }
        .or(async {
            Timer::after(jittered).await;
            false
        })
        .await;
        if stop {
            break 'outer;
        }
    }
    for s in slots.iter_mut() {
        s.mirror.handle_disconnected();
    }
    persist(&mut slots, Instant::now(), true);
    status.set_link("disconnected", None);
    publish_status(&slots, &status);
    drop(slots);
    for r in readers {
        r.cancel().await;
    }
}

/// Serve read requests for one mirror: read, or wait until the stream has
/// `from` (a newer request supersedes a waiting one).
async fn reader(
    h: StreamHandle,
    idx: usize,
    rx: Receiver<mirror::ReadRequest>,
    tx: Sender<ReadAnswer>,
) {
    let Ok(mut req) = rx.recv().await else { return };
    loop {
        match h.read(req.from, req.max_msgs, mirror::READ_MAX_BYTES).await {
            Ok(v) if !v.is_empty() => {
                if tx.send((idx, req.from, v)).await.is_err() {
                    return;
                }
                match rx.recv().await {
                    Ok(r) => req = r,
                    Err(_) => return,
                }
                continue;
            }
            Ok(_) => {}
            Err(StreamError::Closed) => return,
            Err(e) => {
                log::warn!("reading local stream {}: {e}; retrying", h.config().name);
                Timer::after(Duration::from_secs(1)).await;
                continue;
            }
        }
        let from = req.from;
        let newer = async {
            h.wait_for(from).await;
            Some(None)
        }
        .or(async { rx.recv().await.ok().map(Some) })
        .await;
        match newer {
            None => return,
            Some(Some(r)) => req = r,
            Some(None) => {}
        }
    }
}

fn persist(slots: &mut [Slot], now: Instant, force: bool) {
    for s in slots.iter_mut() {
        if let Some(c) = s.mirror.poll_cursor(now, force) {
            if let Err(e) = cursor::store(&s.cursor_path, c, force) {
                log::warn!("cannot write cursor {}: {e}", s.cursor_path.display());
            }
        }
    }
}

fn publish_status(slots: &[Slot], status: &UplinkStatus) {
    status.set_mirrors(
        slots
            .iter()
            .map(|s| {
                let mut st = s.mirror.status();
                let local = s.handle.state();
                let backlog = st.local_last_seq.saturating_sub(st.cursor);
                st.backlog_bytes = Some(match local.msgs {
                    0 => 0,
                    n => backlog.saturating_mul(local.bytes / n),
                });
                st
            })
            .collect(),
    );
}

fn credentials(cfg: &UplinkConfig, url: &HubUrl) -> ConnectOptions {
    let mut o = ConnectOptions::default();
    if cfg.token.is_some() {
        o.auth_token = cfg.token.clone();
    } else if cfg.user.is_some() {
        o.user = cfg.user.clone();
        o.pass = cfg.password.clone();
    } else if let (Some(u), Some(p)) = (&url.user, &url.password) {
        o.user = Some(u.clone());
        o.pass = Some(p.clone());
    } else if let Some(t) = &url.user {
        o.auth_token = Some(t.clone());
    }
    o
}

enum Ev {
    Data(std::io::Result<usize>),
    Read(ReadAnswer),
    Timer,
    Shutdown,
}

/// Write all of `data` and flush it (TLS buffers records).
async fn write_flush(sock: &mut Box<dyn HubIo>, data: &[u8]) -> std::io::Result<()> {
    sock.write_all(data).await?;
    sock.flush().await
}

/// The hub connection's byte stream: TCP, or TLS over TCP.
trait HubIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> HubIo for T {}

/// Upgrade to TLS after the hub's INFO when the hub requires it, the URL
/// says `tls://`, or the hub offers TLS and a CA or client certificate is
/// configured.
async fn maybe_tls(
    sock: TcpStream,
    info: &ServerInfo,
    url: &HubUrl,
    tls: &mut TlsClient,
    deadline: Instant,
) -> Result<Box<dyn HubIo>, String> {
    let offered = info.tls_required || info.tls_available;
    if !(info.tls_required || url.tls || (offered && tls.configured)) {
        return Ok(Box::new(sock));
    }
    if !offered {
        return Err(format!(
            "{url} asks for TLS but the hub does not offer it (its INFO has no tls_required/tls_available)"
        ));
    }
    let config = tls.config()?;
    let name = rustls::pki_types::ServerName::try_from(url.host.clone())
        .map_err(|e| format!("{:?} is not a valid TLS server name: {e}", url.host))?;
    let connector = futures_rustls::TlsConnector::from(config);
    let stream = async {
        connector
            .connect(name, sock)
            .await
            .map_err(|e| format!("TLS handshake with the hub failed: {e}"))
    }
    .or(async {
        Timer::at(deadline).await;
        Err("TLS handshake timed out".to_string())
    })
    .await?;
    Ok(Box::new(stream))
}

/// The uplink's TLS client settings, built on first use.
struct TlsClient {
    ca: Option<std::path::PathBuf>,
    client: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// A CA or client certificate was configured: use TLS whenever the hub
    /// offers it.
    configured: bool,
    built: Option<Arc<rustls::ClientConfig>>,
}

impl TlsClient {
    fn new(cfg: &UplinkConfig) -> TlsClient {
        TlsClient {
            ca: cfg.tls_ca.clone(),
            client: cfg.tls_client.clone(),
            configured: cfg.tls_ca.is_some() || cfg.tls_client.is_some(),
            built: None,
        }
    }

    fn config(&mut self) -> Result<Arc<rustls::ClientConfig>, String> {
        if let Some(c) = &self.built {
            return Ok(c.clone());
        }
        let client = self
            .client
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        let c = crate::tls::client_config(self.ca.as_deref(), client)?;
        self.built = Some(c.clone());
        Ok(c)
    }
}

/// Read ops until `want` says stop, with a deadline.
async fn next_op<S: AsyncRead + Unpin + ?Sized>(
    sock: &mut S,
    buf: &mut Vec<u8>,
    limit: usize,
    deadline: Instant,
) -> Result<ServerOp, String> {
    loop {
        match client::parse_server_op(buf, limit) {
            Ok(Some((op, used))) => {
                buf.drain(..used);
                return Ok(op);
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let mut tmp = [0u8; 16 * 1024];
        let n = async { sock.read(&mut tmp).await.map_err(|e| e.to_string()) }
            .or(async {
                Timer::at(deadline).await;
                Err("timed out waiting for the server".to_string())
            })
            .await?;
        if n == 0 {
            return Err("connection closed by the hub".into());
        }
        buf.extend_from_slice(tmp.get(..n).unwrap_or_default());
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &UplinkConfig,
    node: &str,
    url: &HubUrl,
    tls: &mut TlsClient,
    slots: &mut [Slot],
    answers: &Receiver<ReadAnswer>,
    status: &UplinkStatus,
    shutdown: &Receiver<()>,
) -> Ended {
    let lost = |reason: String, was_up: bool| Ended::Lost { reason, was_up };
    let addr = format!("{}:{}", url.host, url.port);
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let connected = async {
        TcpStream::connect(addr.as_str())
            .await
            .map_err(|e| e.to_string())
    }
    .or(async {
        Timer::at(deadline).await;
        Err("TCP connect timed out".to_string())
    })
    .await;
    let mut tcp = match connected {
        Ok(s) => s,
        Err(e) => return lost(e, false),
    };
    let _ = tcp.set_nodelay(true);
    let mut buf = Vec::new();
    let mut limit = (1 << 20) + PAYLOAD_SLACK;
    let info = match next_op(&mut tcp, &mut buf, limit, deadline).await {
        Ok(ServerOp::Info(j)) => match ServerInfo::parse(&j) {
            Ok(i) => i,
            Err(e) => return lost(e.to_string(), false),
        },
        Ok(other) => return lost(format!("expected INFO, got {other:?}"), false),
        Err(e) => return lost(e, false),
    };
    if !buf.is_empty() {
        return lost("the hub sent more than INFO before CONNECT".into(), false);
    }
    let mut sock = match maybe_tls(tcp, &info, url, tls, deadline).await {
        Ok(s) => s,
        Err(e) => return lost(e, false),
    };
    let max_payload = if info.max_payload > 0 {
        info.max_payload
    } else {
        1 << 20
    };
    limit = max_payload + PAYLOAD_SLACK;
    let mut out = Vec::new();
    let mut opts = credentials(cfg, url);
    opts.name = format!("frond {node}");
    if let Some(seed) = &cfg.nkey_seed {
        // The hub checks this signature of the nonce it just sent.
        opts.nkey = Some(seed.public_key());
        opts.sig = Some(seed.sign(info.nonce.as_bytes()));
    }
    client::connect(&opts, &mut out);
    client::ping(&mut out);
    if let Err(e) = write_flush(&mut sock, &out).await {
        return lost(e.to_string(), false);
    }
    out.clear();
    loop {
        match next_op(&mut *sock, &mut buf, limit, deadline).await {
            Ok(ServerOp::Pong) => break,
            Ok(ServerOp::Err(e)) => {
                let hint = if e.to_ascii_lowercase().contains("authorization") {
                    " (check uplink user/password/token/nkey_seed)"
                } else {
                    ""
                };
                return lost(format!("hub refused the connection: {e}{hint}"), false);
            }
            Ok(ServerOp::Ping) => client::pong(&mut out),
            Ok(_) => {}
            Err(e) => return lost(e, false),
        }
    }
    log::info!(
        "connected to {url} (server {} {})",
        info.server_name,
        info.version
    );
    status.set_link("connected", Some(url.to_string()));
    let now = Instant::now();
    for (i, s) in slots.iter_mut().enumerate() {
        let token = format!("{:016x}", fastrand::u64(..));
        s.mirror
            .handle_connected(now, i as u64 + 1, &token, max_payload);
    }
    let mut next_ping = now + PING_INTERVAL;
    let mut pings_out = 0u32;
    loop {
        let now = Instant::now();
        // Outputs of every mirror.
        for s in slots.iter_mut() {
            s.mirror.handle_local_state(s.handle.state().last_seq);
            while let Some(c) = s.mirror.poll_command() {
                if let Err(e) = c.encode(&mut out) {
                    log::error!("dropping unencodable command: {e}");
                }
            }
            while let Some(ev) = s.mirror.poll_event() {
                log::log!(
                    ev.level(),
                    "mirror {} -> {}: {ev}",
                    s.mirror.params().stream,
                    s.mirror.params().hub_stream
                );
            }
            if let Some(r) = s.mirror.poll_read() {
                let _ = s.reads.try_send(r);
            }
        }
        persist(slots, now, false);
        publish_status(slots, status);
        if !out.is_empty() {
            if let Err(e) = write_flush(&mut sock, &out).await {
                return lost(e.to_string(), true);
            }
            out.clear();
        }
        let deadline = slots
            .iter()
            .filter_map(|s| s.mirror.poll_deadline())
            .fold(next_ping, Instant::min);
        let mut tmp = [0u8; 16 * 1024];
        let ev = async { Ev::Data(sock.read(&mut tmp).await) }
            .or(async {
                match answers.recv().await {
                    Ok(a) => Ev::Read(a),
                    Err(_) => future::pending().await,
                }
            })
            .or(async {
                let _ = shutdown.recv().await;
                Ev::Shutdown
            })
            .or(async {
                Timer::at(deadline).await;
                Ev::Timer
            })
            .await;
        let now = Instant::now();
        match ev {
            Ev::Shutdown => return Ended::Shutdown,
            Ev::Data(Err(e)) => return lost(e.to_string(), true),
            Ev::Data(Ok(0)) => return lost("connection closed by the hub".into(), true),
            Ev::Data(Ok(n)) => {
                buf.extend_from_slice(tmp.get(..n).unwrap_or_default());
                loop {
                    match client::parse_server_op(&buf, limit) {
                        Ok(None) => break,
                        Err(e) => return lost(e.to_string(), true),
                        Ok(Some((op, used))) => {
                            buf.drain(..used);
                            match op {
                                ServerOp::Ping => client::pong(&mut out),
                                ServerOp::Pong => pings_out = 0,
                                ServerOp::Msg(m) => {
                                    let idx = usize::try_from(m.sid).unwrap_or(0).wrapping_sub(1);
                                    if let Some(s) = slots.get_mut(idx) {
                                        s.mirror.handle_reply(
                                            now,
                                            &m.subject,
                                            m.headers.as_deref(),
                                            &m.payload,
                                        );
                                    }
                                }
                                ServerOp::Err(e) => {
                                    let l = e.to_ascii_lowercase();
                                    if l.contains("permissions violation") {
                                        log::error!("hub says: {e} (grant this user publish/subscribe permissions)");
                                    } else {
                                        return lost(format!("hub error: {e}"), true);
                                    }
                                }
                                ServerOp::Info(_) | ServerOp::Ok => {}
                            }
                        }
                    }
                }
            }
            Ev::Read((idx, from, msgs)) => {
                if let Some(s) = slots.get_mut(idx) {
                    s.mirror.handle_messages(now, from, msgs);
                }
            }
            Ev::Timer => {}
        }
        for s in slots.iter_mut() {
            s.mirror.handle_tick(now);
        }
        if now >= next_ping {
            if pings_out >= MAX_PINGS_OUT {
                return lost(format!("hub did not answer {MAX_PINGS_OUT} PINGs"), true);
            }
            client::ping(&mut out);
            pings_out += 1;
            next_ping = now + PING_INTERVAL;
        }
    }
}
