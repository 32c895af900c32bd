//! The hub link's shell: mirror-up of local streams into hub JetStream
//! streams and source-down of hub streams into local streams
//! ([`source`], its I/O in [`source_io`]), exactly once, over one NATS
//! connection to the hub cluster.
//!
//! Owns: the socket (TCP, TLS), the reader task per mirror, the per-mirror
//! cursor files ([`cursor`]) and the shared [`UplinkStatus`]. The logic
//! lives in two sans-IO machines this shell only moves bytes for:
//! [`link::Link`] (which server, handshake, auth, PING/PONG, reconnect
//! backoff, failover to servers discovered from `INFO.connect_urls`) and
//! one [`mirror::Mirror`] per configured mirror; the live bridge
//! ([`bridge::Bridge`], with its router connection in [`bridge_io`]) sees
//! every link event first and takes the hub messages of its own
//! subscriptions. Which mirror may publish how much (`max_rate`,
//! `priority`) is [`rate`]'s decision; [`probe`] reads the age of each
//! backlog for [`status`].
//!
//! Invariants:
//! - [`run`] only dials, upgrades, reads, writes, reads local streams,
//!   runs timers and persists cursors; every decision is the machines'.
//! - A cursor ([`crate::state::cursors`]) is written at most every
//!   [`mirror::PERSIST_INTERVAL`] (100 ms)
//!   per mirror while it changes, and with fsync at shutdown. A stale cursor
//!   only causes a longer resync, never loss or duplicates.
//! - No lock is held across an `.await`; every channel is bounded by
//!   construction (one outstanding local read per mirror).

pub mod bridge;
pub mod bridge_io;
#[cfg(test)]
mod bridge_sim;
pub mod cursor;
pub mod link;
pub mod mirror;
pub mod msgid;
pub mod probe;
pub mod rate;
pub mod source;
pub mod source_io;
#[cfg(test)]
mod source_sim;
pub mod status;
pub mod ws;
mod ws_io;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::channel::{Receiver, Sender};
use smol::future::{self, FutureExt};
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::net::TcpStream;
use smol::Timer;

use crate::config::UplinkConfig;
use crate::router::Broker;
use crate::stream::{StoredMessage, StreamError, StreamHandle};

pub use link::{Action, Link, LinkEvent, LinkParams};
pub use mirror::{Mirror, MirrorParams, MirrorStatus};
pub use status::UplinkStatus;

/// A hub silent for two PING intervals (`uplink.ping_interval`, default
/// 10 s: a PING sent and not answered within the next) is a dead link: a
/// half-open connection is detected within 20 s.
const MAX_PINGS_OUT: u32 = 1;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type ReadAnswer = (usize, u64, Vec<StoredMessage>);

struct Slot {
    mirror: Mirror,
    handle: StreamHandle,
    cursor_path: PathBuf,
    reads: Sender<mirror::ReadRequest>,
    priority: i32,
    /// The sid of the hub stream's leader-elected advisory subscription.
    leader_sid: Option<u64>,
}

/// Run the uplink until `shutdown` fires (or its sender is dropped).
pub async fn run(
    cfg: UplinkConfig,
    node: String,
    data_dir: PathBuf,
    broker: Arc<Broker>,
    status: Arc<UplinkStatus>,
    shutdown: Receiver<()>,
) {
    let streams = broker.streams();
    let (answers_tx, answers_rx) =
        smol::channel::bounded::<ReadAnswer>(cfg.mirrors.len().max(1) * 2);
    let (mut slots, readers, broken) = open_mirrors(&cfg, &node, &data_dir, &streams, &answers_tx);
    let (stored_tx, stored_rx) = smol::channel::bounded(cfg.sources.len().max(1));
    let (mut sources, storers) = source_io::open(&cfg, &data_dir, &broker, &stored_tx).await;
    let params = link_params(&cfg, &node);
    let mut link = Link::new(params, Instant::now(), fastrand::u64(..));
    watch_leaders(&mut slots, &mut link);
    let mut bridge = bridge_io::BridgeIo::start(&cfg, &broker, &mut link);
    let mut tls = TlsClient::new(&cfg);
    let mut sock: Option<Box<dyn HubIo>> = None;
    // Mirror index by the sid of its reply subscription on this connection.
    let mut by_sid: Vec<(u64, usize)> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    let mut bucket = cfg
        .max_rate
        .map(|r| rate::TokenBucket::new(r, Instant::now()));
    let mut pass = 0usize;
    let handles = slots.iter().map(|s| s.handle.clone()).collect();
    let prober = smol::spawn(probe::run(handles, status.clone()));
    loop {
        drive_actions(&mut link, &mut sock, &mut tls, &status, &shutdown).await;
        let now = Instant::now();
        while let Some(ev) = link.poll_event() {
            source_io::on_event(&mut link, &ev, now, &mut sources);
            let Some(ev) = on_bridge_event(bridge.as_mut(), &mut link, ev, now) else {
                continue;
            };
            on_link_event(&mut link, ev, now, &mut slots, &mut by_sid, &status);
        }
        if let Some(b) = bridge.as_mut() {
            b.pump(now, &mut link);
            status.set_bridge(b.status());
        }
        let rate_wake = if link.is_up() {
            pass = pass.wrapping_add(1);
            pump_mirrors(&mut link, &mut slots, bucket.as_mut(), pass, now)
        } else {
            None
        };
        source_io::pump(&mut link, &mut sources);
        persist(&mut slots, now, false);
        publish_status(&slots, &broken, &status);
        status.set_sources(source_io::statuses(&sources));
        link.poll_transmit(&mut out);
        if !out.is_empty() {
            if let Some(s) = sock.as_mut() {
                if let Err(e) = write_flush(s, &out).await {
                    link.handle_io_error(Instant::now(), e.to_string());
                }
            }
            out.clear();
            continue;
        }
        let deadline = slots
            .iter()
            .filter_map(|s| s.mirror.poll_deadline())
            .chain(link.poll_deadline())
            .chain(rate_wake)
            .chain(source_io::deadline(&sources))
            .min();
        let local = bridge.as_ref().map(|b| b.outbox());
        let chans = (&answers_rx, &stored_rx);
        let ev = wait(sock.as_mut(), &mut buf, chans, local, &shutdown, deadline).await;
        let now = Instant::now();
        match ev {
            Ev::Shutdown => break,
            Ev::Data(Err(e)) => link.handle_io_error(now, e.to_string()),
            Ev::Data(Ok(0)) => link.handle_io_error(now, "connection closed by the hub".into()),
            Ev::Data(Ok(n)) => link.handle_bytes(now, buf.get(..n).unwrap_or_default()),
            Ev::Read((idx, from, msgs)) => {
                if let Some(s) = slots.get_mut(idx) {
                    s.mirror.handle_messages(now, from, msgs);
                }
            }
            Ev::Stored(a) => source_io::on_stored(&mut sources, now, a),
            Ev::Timer => {}
        }
        link.handle_timeout(now);
        source_io::tick(&mut sources, now);
        for s in slots.iter_mut() {
            s.mirror.handle_tick(now);
        }
    }
    link.stop();
    while link.poll_action().is_some() {}
    drop(sock);
    for s in slots.iter_mut() {
        s.mirror.handle_disconnected();
    }
    persist(&mut slots, Instant::now(), true);
    status.set_link("disconnected", None);
    publish_status(&slots, &broken, &status);
    drop(slots);
    prober.cancel().await;
    for r in readers {
        r.cancel().await;
    }
    source_io::on_down(&mut sources);
    status.set_sources(source_io::statuses(&sources));
    drop(sources);
    for t in storers {
        t.cancel().await;
    }
}

/// A configured mirror that cannot run (the id key is unusable): shown in
/// status, `/varz` and `/metrics` with the error, its lag kept current.
struct Broken {
    status: MirrorStatus,
    handle: Option<StreamHandle>,
}

/// Every configured mirror as a [`Broken`] one failing with `why`.
fn broken_mirrors(
    cfg: &UplinkConfig,
    data_dir: &std::path::Path,
    streams: &[StreamHandle],
    why: &str,
) -> Vec<Broken> {
    let broken = cfg.mirrors.iter().map(|mc| {
        let c = cursor::path(data_dir, &mc.stream)
            .ok()
            .and_then(|p| cursor::load(&p).ok().flatten())
            .unwrap_or_default();
        let status = MirrorStatus {
            stream: mc.stream.clone(),
            hub_stream: mc.to.clone(),
            state: "error".into(),
            cursor: c.local_seq,
            hub_seq: c.hub_seq,
            priority: mc.priority,
            last_error: Some(format!("not mirrored up: {why}")),
            ..MirrorStatus::default()
        };
        let handle = streams.iter().find(|h| h.config().name == mc.stream);
        Broken {
            status,
            handle: handle.cloned(),
        }
    });
    broken.collect()
}

type Opened = (Vec<Slot>, Vec<smol::Task<()>>, Vec<Broken>);

/// One [`Slot`] (mirror machine, stream, cursor file, reader task) per
/// configured mirror whose local stream is open and whose cursor path is
/// valid; the others are logged and skipped. Without a usable id key,
/// every mirror is [`Broken`].
fn open_mirrors(
    cfg: &UplinkConfig,
    node: &str,
    data_dir: &std::path::Path,
    streams: &[StreamHandle],
    answers_tx: &Sender<ReadAnswer>,
) -> Opened {
    let mut slots = Vec::new();
    let mut readers = Vec::new();
    let id_key = match msgid::load_or_create(data_dir) {
        Ok(k) => k,
        Err(e) if !cfg.mirrors.is_empty() => {
            log::error!("no stream is mirrored up: {e}");
            let broken = broken_mirrors(cfg, data_dir, streams, &e);
            return (slots, readers, broken);
        }
        Err(_) => return (slots, readers, Vec::new()),
    };
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
        let path = match cursor::path(data_dir, &mc.stream) {
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
            node: node.to_string(),
            stream: mc.stream.clone(),
            hub_stream: mc.to.clone(),
            subject_prefix: mc.subject_prefix.clone(),
            max_inflight: cfg.max_inflight.max(1),
            pipeline: cfg.pipeline,
            ack_timeout: cfg.ack_timeout,
            retry_min: cfg.reconnect_min,
            retry_max: cfg.reconnect_max,
            scan_cap: mirror::DEFAULT_SCAN_CAP,
            id_key: id_key.clone(),
        };
        let priority = mc.priority;
        let m = Mirror::new(params, start.clone());
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
            priority,
            leader_sid: None,
        });
    }
    (slots, readers, Vec::new())
}

fn link_params(cfg: &UplinkConfig, node: &str) -> LinkParams {
    LinkParams {
        urls: cfg.urls.clone(),
        name: format!("frond {node}"),
        user: cfg.user.clone(),
        password: cfg.password.clone(),
        token: cfg.token.clone(),
        nkey_seed: cfg
            .creds
            .as_ref()
            .map(|c| c.seed.clone())
            .or_else(|| cfg.nkey_seed.clone()),
        jwt: cfg.creds.as_ref().map(|c| c.jwt.clone()),
        tls_configured: cfg.tls_ca.is_some() || cfg.tls_client.is_some(),
        discover: true,
        ping_interval: cfg.ping_interval,
        max_pings_out: MAX_PINGS_OUT,
        connect_timeout: CONNECT_TIMEOUT,
        retry_min: cfg.reconnect_min,
        retry_max: cfg.reconnect_max,
    }
}

/// Perform what the link asks: dial, TLS upgrade, close.
async fn drive_actions(
    link: &mut Link,
    sock: &mut Option<Box<dyn HubIo>>,
    tls: &mut TlsClient,
    status: &UplinkStatus,
    shutdown: &Receiver<()>,
) {
    while let Some(a) = link.poll_action() {
        match a {
            Action::Dial(server) => {
                status.set_link("connecting", Some(server.url.to_string()));
                let deadline = link.poll_deadline().unwrap_or_else(Instant::now);
                let addr = format!("{}:{}", server.url.host, server.url.port);
                let r = async {
                    TcpStream::connect(addr.as_str())
                        .await
                        .map_err(|e| e.to_string())
                }
                .or(async {
                    Timer::at(deadline).await;
                    Err("TCP connect timed out".to_string())
                })
                .or(async {
                    let _ = shutdown.recv().await;
                    Err("shutting down".to_string())
                })
                .await;
                let r = match r {
                    Ok(tcp) if server.url.ws => ws_connect(tcp, &server, tls, deadline).await,
                    Ok(tcp) => {
                        let _ = tcp.set_nodelay(true);
                        Ok(Box::new(tcp) as Box<dyn HubIo>)
                    }
                    Err(e) => Err(e),
                };
                match r {
                    Ok(s) => {
                        *sock = Some(s);
                        link.handle_dialed(Instant::now());
                    }
                    Err(e) => link.handle_io_error(Instant::now(), e),
                }
            }
            Action::StartTls { server_name } => {
                let deadline = link.poll_deadline().unwrap_or_else(Instant::now);
                let r = match sock.take() {
                    Some(s) => start_tls(s, &server_name, tls, deadline).await,
                    None => Err("no socket to upgrade".to_string()),
                };
                match r {
                    Ok(s) => {
                        *sock = Some(s);
                        link.handle_tls_ready(Instant::now());
                    }
                    Err(e) => link.handle_io_error(Instant::now(), e),
                }
            }
            Action::Close => *sock = None,
        }
    }
}

/// Subscribes each mirror to its hub stream's leader-elected advisory: a
/// new leader ends a resync wait at once (see
/// [`Mirror::handle_leader_elected`]). A hub user without permission for
/// advisories gets an `-ERR` and the timeouts still recover.
fn watch_leaders(slots: &mut [Slot], link: &mut Link) {
    for s in slots.iter_mut() {
        s.leader_sid = link
            .subscribe(&s.mirror.leader_advisory_subject(), None)
            .ok();
    }
}

/// Apply one link event to the mirrors, the status and the log.
fn on_link_event(
    link: &mut Link,
    ev: LinkEvent,
    now: Instant,
    slots: &mut [Slot],
    by_sid: &mut Vec<(u64, usize)>,
    status: &UplinkStatus,
) {
    match ev {
        LinkEvent::Up {
            server,
            info,
            max_payload,
        } => {
            log::info!(
                "connected to {} (server {} {})",
                server.url,
                info.server_name,
                info.version
            );
            status.link_up(server.url.to_string(), crate::util::unix_nanos());
            by_sid.clear();
            for (i, s) in slots.iter_mut().enumerate() {
                let sid = link.alloc_sid();
                by_sid.push((sid, i));
                let token = format!("{:016x}", fastrand::u64(..));
                s.mirror.handle_connected(now, sid, &token, max_payload);
            }
        }
        LinkEvent::Down {
            server,
            reason,
            was_up,
        } => {
            by_sid.clear();
            for s in slots.iter_mut() {
                s.mirror.handle_disconnected();
            }
            persist(slots, now, false);
            if was_up {
                log::info!("disconnected from {}: {reason}", server.url);
            } else {
                log::warn!("cannot connect to {}: {reason}", server.url);
            }
            let at = crate::util::unix_nanos();
            status.link_down(server.url.to_string(), reason, was_up, at);
        }
        LinkEvent::Msg(m) => {
            if let Some(s) = slots.iter_mut().find(|s| s.leader_sid == Some(m.sid)) {
                log::info!("{}: resyncing mirror at once", m.subject);
                s.mirror.handle_leader_elected(now);
            } else if let Some(&(_, i)) = by_sid.iter().find(|(sid, _)| *sid == m.sid) {
                if let Some(s) = slots.get_mut(i) {
                    s.mirror
                        .handle_reply(now, &m.subject, m.headers.as_deref(), &m.payload);
                }
            }
        }
        LinkEvent::HubError(e) => {
            let mut ours = false;
            for s in slots.iter_mut() {
                ours |= s.mirror.handle_hub_error(now, &e);
            }
            if !ours {
                log::error!("hub says: {e} (grant this user publish/subscribe permissions)")
            }
        }
        LinkEvent::Discovered(urls) => {
            log::info!("hub cluster servers discovered: {}", urls.join(", "))
        }
    }
}

/// The live bridge's part of a link event: `Up` flushes what it kept
/// while down, its hub messages are published locally. Returns the event
/// for the others (`None`: it was the bridge's message).
fn on_bridge_event(
    bridge: Option<&mut bridge_io::BridgeIo>,
    link: &mut Link,
    ev: LinkEvent,
    now: Instant,
) -> Option<LinkEvent> {
    let Some(b) = bridge else { return Some(ev) };
    match ev {
        LinkEvent::Msg(m) => b.handle_hub_msg(now, m).err().map(LinkEvent::Msg),
        ev => {
            match &ev {
                LinkEvent::Up { .. } => b.handle_up(link),
                LinkEvent::HubError(e) => b.handle_hub_error(e),
                _ => {}
            }
            Some(ev)
        }
    }
}

/// Move every mirror's commands into the link's write buffer and hand its
/// read requests to its reader. Mirrors are served by priority, each with
/// the publish budget [`rate::plan`] gives it; the bytes written are
/// charged to `bucket` (`uplink.max_rate`). Returns when to come back if
/// the cap held a mirror back.
fn pump_mirrors(
    link: &mut Link,
    slots: &mut [Slot],
    mut bucket: Option<&mut rate::TokenBucket>,
    pass: usize,
    now: Instant,
) -> Option<Instant> {
    let wants: Vec<rate::Want> = slots
        .iter_mut()
        .map(|s| {
            s.mirror.handle_local_state(s.handle.state().last_seq);
            rate::Want {
                priority: s.priority,
                unsent: s.mirror.has_unsent(),
            }
        })
        .collect();
    let mut wake = None;
    for i in rate::order(&wants, pass) {
        let available = bucket.as_mut().map(|b| b.available(now));
        let budget = rate::plan(&wants, available).get(i).copied().flatten();
        let Some(s) = slots.get_mut(i) else { continue };
        s.mirror.handle_budget(now, budget);
        while let Some(c) = s.mirror.poll_command() {
            let Some(out) = link.send() else { break };
            let before = out.len();
            if let Err(e) = c.encode(out) {
                log::error!("dropping unencodable command: {e}");
            }
            let n = out.len().saturating_sub(before) as u64;
            if let Some(b) = bucket.as_mut() {
                b.take(now, n);
            }
        }
        // Between passes (acks arrive), a capped or held-back mirror waits
        // for the next pass; an unrestricted one keeps its window full.
        if budget.is_some() {
            s.mirror.handle_budget(now, Some(0));
            if s.mirror.has_unsent() && available == Some(0) {
                wake = bucket.as_mut().map(|b| b.ready_at(now));
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
    wake
}

/// Wait for the first of: socket data, a local read's answer, a stored
/// batch, shutdown, the deadline.
async fn wait(
    sock: Option<&mut Box<dyn HubIo>>,
    buf: &mut [u8],
    (answers, stored): (&Receiver<ReadAnswer>, &Receiver<source_io::StoreAnswer>),
    local: Option<&crate::router::Outbox>,
    shutdown: &Receiver<()>,
    deadline: Option<Instant>,
) -> Ev {
    async {
        match sock {
            Some(s) => Ev::Data(s.read(buf).await),
            None => future::pending().await,
        }
    }
    .or(async {
        match answers.recv().await {
            Ok(a) => Ev::Read(a),
            Err(_) => future::pending().await,
        }
    })
    .or(async {
        match local {
            Some(o) => {
                o.wait(true).await;
                Ev::Timer
            }
            None => future::pending().await,
        }
    })
    .or(async {
        match stored.recv().await {
            Ok(a) => Ev::Stored(a),
            Err(_) => future::pending().await,
        }
    })
    .or(async {
        let _ = shutdown.recv().await;
        Ev::Shutdown
    })
    .or(async {
        match deadline {
            Some(d) => {
                Timer::at(d).await;
                Ev::Timer
            }
            None => future::pending().await,
        }
    })
    .await
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
        // Nothing from `from` on although the stream reached it (deleted
        // messages): say so once, then wait for a newer message, not for
        // `from` (which is already there: a busy loop).
        let last = h.state().last_seq;
        if req.from <= last && tx.send((idx, req.from, Vec::new())).await.is_err() {
            return;
        }
        let from = req.from.max(last + 1);
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

/// The local stream's side of a mirror's status: last seq and lag.
fn local_view(st: &mut MirrorStatus, handle: &StreamHandle) {
    let local = handle.state();
    // Also while the link is down (the machine learns the local state
    // only when it may send).
    st.local_last_seq = st.local_last_seq.max(local.last_seq);
    st.lag.msgs = st.local_last_seq.saturating_sub(st.cursor);
    st.lag.bytes = Some(match local.msgs {
        0 => 0,
        n => st.lag.msgs.saturating_mul(local.bytes / n),
    });
}

fn publish_status(slots: &[Slot], broken: &[Broken], status: &UplinkStatus) {
    let running = slots.iter().map(|s| {
        let mut st = s.mirror.status();
        local_view(&mut st, &s.handle);
        st.priority = s.priority;
        st
    });
    let broken = broken.iter().map(|b| {
        let mut st = b.status.clone();
        if let Some(h) = &b.handle {
            local_view(&mut st, h);
        }
        st
    });
    status.set_mirrors(running.chain(broken).collect(), crate::util::unix_nanos());
}

enum Ev {
    Data(std::io::Result<usize>),
    Read(ReadAnswer),
    Stored(source_io::StoreAnswer),
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

/// A `ws://` / `wss://` hub: TLS first for `wss`, then the WebSocket
/// upgrade, all before `deadline`.
async fn ws_connect(
    tcp: TcpStream,
    server: &link::Server,
    tls: &mut TlsClient,
    deadline: Instant,
) -> Result<Box<dyn HubIo>, String> {
    let _ = tcp.set_nodelay(true);
    let (host, port) = (server.url.host.as_str(), server.url.port);
    let sock: Box<dyn HubIo> = if server.url.tls {
        start_tls(Box::new(tcp), &server.tls_name, tls, deadline).await?
    } else {
        Box::new(tcp)
    };
    async { Ok(Box::new(ws_io::upgrade(sock, host, port).await?) as Box<dyn HubIo>) }
        .or(async {
            Timer::at(deadline).await;
            Err("WebSocket upgrade timed out".to_string())
        })
        .await
}

/// Upgrade the hub connection to TLS, verifying `server_name`.
async fn start_tls(
    sock: Box<dyn HubIo>,
    server_name: &str,
    tls: &mut TlsClient,
    deadline: Instant,
) -> Result<Box<dyn HubIo>, String> {
    let config = tls.config()?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("{server_name:?} is not a valid TLS server name: {e}"))?;
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
    built: Option<Arc<rustls::ClientConfig>>,
}

impl TlsClient {
    fn new(cfg: &UplinkConfig) -> TlsClient {
        TlsClient {
            ca: cfg.tls_ca.clone(),
            client: cfg.tls_client.clone(),
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
