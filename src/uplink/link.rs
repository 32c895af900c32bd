//! The hub connection as a sans-IO state machine: which server to dial,
//! the NATS handshake, liveness, reconnect backoff and server discovery.
//!
//! Owns: the server list (the configured URLs, then the servers the hub
//! announces in `INFO.connect_urls`, at most [`MAX_SERVERS`]), the choice
//! of the next server and the delay before dialling it, the handshake
//! (`INFO` → optional TLS → `CONNECT` + `PING` → `PONG`), authentication
//! (token, user/password, nkey signature of the nonce, user JWT from a
//! `.creds` file with the nonce signed by its seed), PING/PONG
//! liveness, the decode buffer, sid allocation, the subscriptions that
//! outlive a connection ([`Link::subscribe`]) and the write buffer.
//!
//! The shell performs what [`Link::poll_action`] asks (dial a server,
//! upgrade to TLS, close the socket), feeds what happens back
//! ([`Link::handle_dialed`], [`Link::handle_tls_ready`],
//! [`Link::handle_bytes`], [`Link::handle_io_error`],
//! [`Link::handle_timeout`]), writes [`Link::poll_transmit`] to the socket
//! and sleeps until [`Link::poll_deadline`]. Nothing here reads a clock,
//! touches a socket or draws randomness from anywhere but the seeded
//! generator it is given, so simulation tests replay any schedule from
//! its seed.
//!
//! Failover: a connection that fails or drops moves to the next server of
//! the list at once (a short jitter of at most `retry_min`), so a cluster
//! whose node died is served by another node within one dial. Only when
//! every known server failed since the last successful connection does
//! the link wait out the backoff (jittered, doubling from `retry_min` to
//! `retry_max`). A connection that reached `Up` resets the backoff.
//! Servers learned from `connect_urls` (initial and later `INFO`s) are
//! dialled with the credentials and TLS settings of the configured URLs;
//! when a discovered address is an IP, TLS verifies the host name of the
//! configured URL it was learned through (as the NATS clients do).
//!
//! Invariants:
//! - Nothing is written before the server's `INFO`; `CONNECT` is written
//!   after the TLS upgrade when there is one.
//! - Application bytes ([`Link::send`]) are accepted only while `Up`;
//!   everything buffered for a connection is dropped with it.
//! - Every state but `Up` and `Waiting` has a deadline (`connect_timeout`
//!   for the whole handshake); `Up` ends when the hub has sent nothing for
//!   `max_pings_out + 1` PING intervals (a PING is sent every interval;
//!   any bytes from the hub, not only a PONG, count as a sign of life).
//! - Exactly one [`LinkEvent::Down`] follows every [`LinkEvent::Up`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::HubUrl;
use crate::wire::nats::client::{self, ConnectOptions, MsgOp, ServerInfo, ServerOp, PAYLOAD_SLACK};
use crate::wire::nats::EncodeError;

/// At most this many servers are remembered (configured + discovered), so
/// a hub cannot grow the list without bound.
pub const MAX_SERVERS: usize = 32;
/// `max_payload` assumed until the hub says otherwise.
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// What the link needs to know, fixed for its life.
#[derive(Clone)]
pub struct LinkParams {
    /// Configured hub URLs, dialled first and in this order.
    pub urls: Vec<HubUrl>,
    /// The client name sent in `CONNECT`.
    pub name: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// Signs the hub's nonce: an nkey user's seed, or with `jwt` the seed
    /// of the `.creds` file.
    pub nkey_seed: Option<crate::nkey::SeedKey>,
    /// The user JWT of a `.creds` file (operator mode): sent in `CONNECT`
    /// instead of the public key.
    pub jwt: Option<String>,
    /// A CA or client certificate is configured: use TLS whenever the hub
    /// offers it.
    pub tls_configured: bool,
    /// Add the servers of `INFO.connect_urls` to the list.
    pub discover: bool,
    pub ping_interval: Duration,
    pub max_pings_out: u32,
    /// Deadline for dial, INFO, TLS and PONG together.
    pub connect_timeout: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

/// One server the link may dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub url: HubUrl,
    /// The name TLS verifies (the URL's host, or for a discovered IP the
    /// host of the configured URL it was learned through).
    pub tls_name: String,
    pub discovered: bool,
}

/// Work for the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to this server, then call
    /// [`Link::handle_dialed`] or [`Link::handle_io_error`].
    Dial(Server),
    /// Upgrade the socket to TLS verifying `server_name`, then call
    /// [`Link::handle_tls_ready`] or [`Link::handle_io_error`].
    StartTls { server_name: String },
    /// Close the socket (the link already counts it as gone).
    Close,
}

/// What happened, for the link's users.
#[derive(Debug)]
pub enum LinkEvent {
    /// Connected and authenticated; application traffic may flow.
    Up {
        server: Server,
        info: Box<ServerInfo>,
        max_payload: usize,
    },
    /// The connection ended (or a dial failed: `was_up` false).
    Down {
        server: Server,
        reason: String,
        was_up: bool,
    },
    /// A message for subscription `sid`.
    Msg(MsgOp),
    /// An `-ERR` the hub sends without closing (permissions violation).
    HubError(String),
    /// Servers added from `connect_urls`.
    Discovered(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting until `until` before dialling `servers[cur]`.
    Waiting {
        until: Instant,
    },
    Dialing {
        deadline: Instant,
    },
    AwaitInfo {
        deadline: Instant,
    },
    Tls {
        deadline: Instant,
    },
    AwaitPong {
        deadline: Instant,
    },
    Up {
        next_ping: Instant,
        pings_out: u32,
    },
    Stopped,
}

/// A subscription that is sent again on every connection.
#[derive(Debug, Clone)]
struct Sub {
    sid: u64,
    subject: String,
    queue: Option<String>,
}

/// The hub link's state machine.
pub struct Link {
    p: LinkParams,
    rng: fastrand::Rng,
    servers: Vec<Server>,
    cur: usize,
    /// Servers that failed since the last connection that came up.
    failed_in_round: usize,
    backoff: Duration,
    state: State,
    buf: Vec<u8>,
    limit: usize,
    max_payload: usize,
    out: Vec<u8>,
    actions: VecDeque<Action>,
    events: VecDeque<LinkEvent>,
    next_sid: u64,
    subs: Vec<Sub>,
    /// The nonce of this connection's INFO (signed with the nkey).
    nonce: String,
    /// This connection's INFO, handed out with [`LinkEvent::Up`].
    pending_info: Option<Box<ServerInfo>>,
}

impl Link {
    /// A link that dials its first server at `now`. `seed` drives every
    /// random choice (jitter).
    pub fn new(p: LinkParams, now: Instant, seed: u64) -> Link {
        let servers = p
            .urls
            .iter()
            .take(MAX_SERVERS)
            .map(|u| Server {
                url: u.clone(),
                tls_name: u.host.clone(),
                discovered: false,
            })
            .collect();
        let backoff = p.retry_min;
        Link {
            p,
            rng: fastrand::Rng::with_seed(seed),
            servers,
            cur: 0,
            failed_in_round: 0,
            backoff,
            state: State::Waiting { until: now },
            buf: Vec::new(),
            limit: DEFAULT_MAX_PAYLOAD + PAYLOAD_SLACK,
            max_payload: DEFAULT_MAX_PAYLOAD,
            out: Vec::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            next_sid: 1,
            subs: Vec::new(),
            nonce: String::new(),
            pending_info: None,
        }
    }

    /// Known servers, configured first.
    pub fn servers(&self) -> &[Server] {
        &self.servers
    }

    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    /// The server dialled or connected to (or dialled next).
    pub fn server(&self) -> Option<&Server> {
        self.servers.get(self.cur)
    }

    /// The hub's `max_payload` on the current connection.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// A fresh subscription id (for subscriptions a user re-creates on
    /// every connection itself).
    pub fn alloc_sid(&mut self) -> u64 {
        let s = self.next_sid;
        self.next_sid += 1;
        s
    }

    /// Subscribe now (when up) and again on every later connection. A
    /// subject or queue that cannot be written on a `SUB` line is refused.
    pub fn subscribe(&mut self, subject: &str, queue: Option<&str>) -> Result<u64, EncodeError> {
        // Validate once; later writes of the same strings cannot fail.
        client::subscribe(subject, queue, 0, &mut Vec::new())?;
        let sid = self.alloc_sid();
        let sub = Sub {
            sid,
            subject: subject.to_string(),
            queue: queue.map(str::to_string),
        };
        if self.is_up() {
            write_sub(&sub, &mut self.out);
        }
        self.subs.push(sub);
        Ok(sid)
    }

    /// Drop a subscription made with [`Link::subscribe`].
    pub fn unsubscribe(&mut self, sid: u64) {
        self.subs.retain(|s| s.sid != sid);
        if self.is_up() {
            client::unsubscribe(sid, None, &mut self.out);
        }
    }

    /// The write buffer of the live connection, for application traffic;
    /// `None` while not up.
    pub fn send(&mut self) -> Option<&mut Vec<u8>> {
        if self.is_up() {
            Some(&mut self.out)
        } else {
            None
        }
    }

    /// Stop for good: close the connection (a `Down` event if it was up).
    pub fn stop(&mut self) {
        self.fail("shutting down".into());
        self.state = State::Stopped;
    }

    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// Move the bytes to write into `into` (appended).
    pub fn poll_transmit(&mut self, into: &mut Vec<u8>) {
        into.append(&mut self.out);
    }

    #[must_use]
    pub fn has_transmit(&self) -> bool {
        !self.out.is_empty()
    }

    #[must_use]
    pub fn poll_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Waiting { until } => Some(until),
            State::Dialing { deadline }
            | State::AwaitInfo { deadline }
            | State::Tls { deadline }
            | State::AwaitPong { deadline } => Some(deadline),
            State::Up { next_ping, .. } => Some(next_ping),
            State::Stopped => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Waiting { until } if now >= until => self.dial(now),
            State::Dialing { deadline } if now >= deadline => {
                self.fail_at(now, "TCP connect timed out".into())
            }
            State::AwaitInfo { deadline } if now >= deadline => {
                self.fail_at(now, "timed out waiting for the hub's INFO".into())
            }
            State::Tls { deadline } if now >= deadline => {
                self.fail_at(now, "TLS handshake timed out".into())
            }
            State::AwaitPong { deadline } if now >= deadline => self.fail_at(
                now,
                "timed out waiting for the hub to accept CONNECT".into(),
            ),
            State::Up {
                next_ping,
                pings_out,
            } if now >= next_ping => {
                if pings_out >= self.p.max_pings_out {
                    let why = format!("hub did not answer {} PINGs", self.p.max_pings_out);
                    self.fail_at(now, why);
                } else {
                    client::ping(&mut self.out);
                    self.state = State::Up {
                        next_ping: now + self.p.ping_interval,
                        pings_out: pings_out + 1,
                    };
                }
            }
            _ => {}
        }
    }

    /// The TCP connection asked for by [`Action::Dial`] is open.
    pub fn handle_dialed(&mut self, _now: Instant) {
        if let State::Dialing { deadline } = self.state {
            self.state = State::AwaitInfo { deadline };
        }
    }

    /// The TLS upgrade asked for by [`Action::StartTls`] is done.
    pub fn handle_tls_ready(&mut self, now: Instant) {
        if let State::Tls { deadline } = self.state {
            self.send_connect(now, deadline);
        }
    }

    /// The socket failed (dial, TLS, read or write) or reached EOF.
    pub fn handle_io_error(&mut self, now: Instant, reason: String) {
        if !matches!(self.state, State::Waiting { .. } | State::Stopped) {
            self.fail_at(now, reason);
        }
    }

    /// Bytes read from the socket.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        if matches!(
            self.state,
            State::Waiting { .. } | State::Stopped | State::Dialing { .. }
        ) {
            return;
        }
        if let State::Up { next_ping, .. } = self.state {
            // Bytes from the hub prove the link alive, also when our PING
            // waits behind a slow link's backlog of publishes.
            if !data.is_empty() {
                self.state = State::Up {
                    next_ping,
                    pings_out: 0,
                };
            }
        }
        self.buf.extend_from_slice(data);
        let mut used_total = 0;
        loop {
            let rest = self.buf.get(used_total..).unwrap_or_default();
            match client::parse_server_op(rest, self.limit) {
                Ok(None) => break,
                Err(e) => {
                    self.buf.clear();
                    self.fail_at(now, e.to_string());
                    return;
                }
                Ok(Some((op, used))) => {
                    used_total += used;
                    let more = self.buf.len() > used_total;
                    if !self.handle_op(now, op, more) {
                        self.buf.clear();
                        return;
                    }
                }
            }
        }
        self.buf.drain(..used_total);
    }

    /// One server op; false when the connection ended.
    fn handle_op(&mut self, now: Instant, op: ServerOp, more: bool) -> bool {
        match (self.state, op) {
            (State::AwaitInfo { deadline }, ServerOp::Info(json)) => {
                self.handle_first_info(now, deadline, &json, more)
            }
            (State::AwaitInfo { .. }, other) => {
                self.fail_at(now, format!("expected INFO, got {other:?}"));
                false
            }
            (State::Tls { .. }, _) => {
                self.fail_at(now, "the hub sent data during the TLS upgrade".into());
                false
            }
            (_, ServerOp::Ping) => {
                client::pong(&mut self.out);
                true
            }
            (State::AwaitPong { .. }, ServerOp::Pong) => {
                self.come_up(now);
                true
            }
            (State::AwaitPong { .. }, ServerOp::Err(e)) => {
                let hint = if e.to_ascii_lowercase().contains("authorization") {
                    " (check uplink user/password/token/nkey_seed/creds; with creds: is the user's account known to the hub's resolver, and the JWT not expired or revoked?)"
                } else {
                    ""
                };
                self.fail_at(now, format!("hub refused the connection: {e}{hint}"));
                false
            }
            (State::Up { next_ping, .. }, ServerOp::Pong) => {
                self.state = State::Up {
                    next_ping,
                    pings_out: 0,
                };
                true
            }
            (State::Up { .. }, ServerOp::Msg(m)) => {
                self.events.push_back(LinkEvent::Msg(m));
                true
            }
            (State::Up { .. }, ServerOp::Err(e)) => {
                if e.to_ascii_lowercase().contains("permissions violation") {
                    self.events.push_back(LinkEvent::HubError(e));
                    true
                } else {
                    self.fail_at(now, format!("hub error: {e}"));
                    false
                }
            }
            (_, ServerOp::Info(json)) => {
                if let Ok(info) = ServerInfo::parse(&json) {
                    self.discover(&info);
                }
                true
            }
            _ => true,
        }
    }

    fn handle_first_info(
        &mut self,
        now: Instant,
        deadline: Instant,
        json: &str,
        more: bool,
    ) -> bool {
        let info = match ServerInfo::parse(json) {
            Ok(i) => i,
            Err(e) => {
                self.fail_at(now, e.to_string());
                return false;
            }
        };
        if more {
            self.fail_at(now, "the hub sent more than INFO before CONNECT".into());
            return false;
        }
        let Some(server) = self.servers.get(self.cur).cloned() else {
            self.fail_at(now, "no hub server".into());
            return false;
        };
        self.max_payload = if info.max_payload > 0 {
            info.max_payload
        } else {
            DEFAULT_MAX_PAYLOAD
        };
        self.limit = self.max_payload + PAYLOAD_SLACK;
        let offered = info.tls_required || info.tls_available;
        // Over WebSocket, TLS (wss) is below the upgrade, done before INFO.
        let want = !server.url.ws
            && (info.tls_required || server.url.tls || (offered && self.p.tls_configured));
        let nonce = info.nonce.clone();
        self.discover(&info);
        self.pending_info = Some(Box::new(info));
        if want && !offered {
            self.fail_at(
                now,
                format!("{} asks for TLS but the hub does not offer it (its INFO has no tls_required/tls_available)", server.url),
            );
            return false;
        }
        self.nonce = nonce;
        if want {
            self.state = State::Tls { deadline };
            self.actions.push_back(Action::StartTls {
                server_name: server.tls_name,
            });
        } else {
            self.send_connect(now, deadline);
        }
        true
    }

    fn send_connect(&mut self, _now: Instant, deadline: Instant) {
        let Some(server) = self.servers.get(self.cur) else {
            return;
        };
        let mut o = credentials(&self.p, &server.url);
        o.name = self.p.name.clone();
        if let Some(seed) = &self.p.nkey_seed {
            // The hub checks this signature of the nonce it just sent
            // against the nkey, or the JWT's subject.
            match &self.p.jwt {
                Some(jwt) => o.jwt = Some(jwt.clone()),
                None => o.nkey = Some(seed.public_key()),
            }
            o.sig = Some(seed.sign(self.nonce.as_bytes()));
        }
        client::connect(&o, &mut self.out);
        client::ping(&mut self.out);
        self.state = State::AwaitPong { deadline };
    }

    fn come_up(&mut self, now: Instant) {
        self.failed_in_round = 0;
        self.backoff = self.p.retry_min;
        self.state = State::Up {
            next_ping: now + self.p.ping_interval,
            pings_out: 0,
        };
        for s in &self.subs {
            write_sub(s, &mut self.out);
        }
        let Some(server) = self.servers.get(self.cur).cloned() else {
            return;
        };
        let info = self.pending_info.take().unwrap_or_default();
        self.events.push_back(LinkEvent::Up {
            server,
            info,
            max_payload: self.max_payload,
        });
    }

    /// Add the servers of `info.connect_urls` not known yet.
    fn discover(&mut self, info: &ServerInfo) {
        if !self.p.discover {
            return;
        }
        let Some(via) = self.servers.get(self.cur).cloned() else {
            return;
        };
        let mut added = Vec::new();
        for s in &info.connect_urls {
            if self.servers.len() >= MAX_SERVERS {
                break;
            }
            let Some((host, port)) = split_host_port(s) else {
                continue;
            };
            if self
                .servers
                .iter()
                .any(|k| k.url.port == port && k.url.host.eq_ignore_ascii_case(&host))
            {
                continue;
            }
            let is_ip = host.parse::<core::net::IpAddr>().is_ok();
            let tls_name = if is_ip {
                via.tls_name.clone()
            } else {
                host.clone()
            };
            self.servers.push(Server {
                url: HubUrl {
                    host,
                    port,
                    user: via.url.user.clone(),
                    password: via.url.password.clone(),
                    tls: via.url.tls,
                    ws: via.url.ws,
                },
                tls_name,
                discovered: true,
            });
            added.push(s.clone());
        }
        if !added.is_empty() {
            self.events.push_back(LinkEvent::Discovered(added));
        }
    }

    fn dial(&mut self, now: Instant) {
        let Some(server) = self.servers.get(self.cur).cloned() else {
            self.state = State::Stopped;
            return;
        };
        self.buf.clear();
        self.out.clear();
        self.nonce.clear();
        self.pending_info = None;
        self.state = State::Dialing {
            deadline: now + self.p.connect_timeout,
        };
        self.actions.push_back(Action::Dial(server));
    }

    /// The connection failed (or was stopped): report it and schedule the
    /// next dial.
    fn fail_at(&mut self, now: Instant, reason: String) {
        let was_up = self.is_up();
        self.fail(reason);
        if self.state == State::Stopped {
            return;
        }
        let n = self.servers.len().max(1);
        self.cur = (self.cur + 1) % n;
        let delay = if was_up {
            self.failed_in_round = 0;
            self.backoff = self.p.retry_min;
            self.jitter(self.p.retry_min)
        } else {
            self.failed_in_round += 1;
            if self.failed_in_round >= n {
                self.failed_in_round = 0;
                let d = self.jitter(self.backoff);
                self.backoff = self.backoff.saturating_mul(2).min(self.p.retry_max);
                d
            } else {
                self.jitter(self.p.retry_min) / 2
            }
        };
        self.state = State::Waiting { until: now + delay };
    }

    /// Report the end of the current attempt (no state change besides
    /// buffers) and ask the shell to close the socket.
    fn fail(&mut self, reason: String) {
        let was_up = self.is_up();
        let live = !matches!(self.state, State::Waiting { .. } | State::Stopped);
        self.buf.clear();
        self.out.clear();
        if !live {
            return;
        }
        self.actions.push_back(Action::Close);
        if let Some(server) = self.servers.get(self.cur).cloned() {
            self.events.push_back(LinkEvent::Down {
                server,
                reason,
                was_up,
            });
        }
    }

    /// `d` scaled by a random factor in [0.5, 1).
    fn jitter(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.5 + self.rng.f64() * 0.5)
    }
}

/// Write a SUB validated by [`Link::subscribe`].
fn write_sub(s: &Sub, out: &mut Vec<u8>) {
    if client::subscribe(&s.subject, s.queue.as_deref(), s.sid, out).is_err() {
        debug_assert!(false, "validated in subscribe");
    }
}

/// `host:port` or `[v6]:port` from `connect_urls`.
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let s = s
        .strip_prefix("nats://")
        .or_else(|| s.strip_prefix("tls://"))
        .unwrap_or(s);
    let (host, port) = s.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

/// The credentials to present to `url`: the uplink's own settings first,
/// then those embedded in the URL.
fn credentials(p: &LinkParams, url: &HubUrl) -> ConnectOptions {
    let mut o = ConnectOptions::default();
    if p.token.is_some() {
        o.auth_token = p.token.clone();
    } else if p.user.is_some() {
        o.user = p.user.clone();
        o.pass = p.password.clone();
    } else if let (Some(u), Some(pw)) = (&url.user, &url.password) {
        o.user = Some(u.clone());
        o.pass = Some(pw.clone());
    } else if let Some(t) = &url.user {
        o.auth_token = Some(t.clone());
    }
    o
}

#[cfg(test)]
#[path = "link_tests.rs"]
mod tests;
