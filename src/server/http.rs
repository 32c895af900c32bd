//! The HTTP monitoring endpoint: `/healthz`, `/varz` (JSON) and `/metrics`
//! (Prometheus text).
//!
//! Owns: a deliberately tiny HTTP/1.0 responder. One request per
//! connection; the request head is bounded (8 KiB) and must arrive within
//! `http.header_timeout` (default 5 s), and the answer be written within
//! it again; anything else gets 400/404 and the connection is closed.
//!
//! Invariants:
//! - At most `http.max_connections` (default 64) connections are served
//!   at once: one over the limit is accepted and closed at once (after a
//!   `503` if the socket takes it without waiting), so idle sockets on
//!   this port cannot hold more descriptors than that, and MQTT, NATS and
//!   the streams keep theirs.
//! - A failed accept (EMFILE, ENFILE, ...) is retried after 100 ms, never
//!   in a busy loop, and logged at most every 10 s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::channel::Receiver;
use smol::future::FutureExt;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::{TcpListener, TcpStream};

use super::accept::{self, Accept};
use crate::config::HttpConfig;
use crate::router::Broker;
use crate::uplink::UplinkStatus;

/// Failed accepts and refusals are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// What a connection over `http.max_connections` is told, if it listens.
const BUSY: &[u8] =
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// What the endpoint reports.
pub struct Monitor {
    pub node: String,
    pub started: Instant,
    pub broker: Arc<Broker>,
    pub uplink: Option<Arc<UplinkStatus>>,
}

impl Monitor {
    /// The `/varz` document.
    pub fn varz(&self) -> serde_json::Value {
        let c = &self.broker.counters;
        let streams: Vec<serde_json::Value> = self
            .broker
            .streams()
            .iter()
            .map(|s| {
                let st = s.state();
                serde_json::json!({
                    "name": s.config().name,
                    "subjects": s.config().subjects,
                    "first_seq": st.first_seq,
                    "last_seq": st.last_seq,
                    "messages": st.msgs,
                    "bytes": st.bytes,
                    "unstored": s.unstored(),
                })
            })
            .collect();
        serde_json::json!({
            "server": "frond",
            "version": env!("CARGO_PKG_VERSION"),
            "node": self.node,
            "uptime_secs": self.started.elapsed().as_secs(),
            "mqtt": {
                "connections": c.connections.load(Ordering::Relaxed),
                "total_connections": c.total_connections.load(Ordering::Relaxed),
                "msgs_in": c.msgs_in.load(Ordering::Relaxed),
                "bytes_in": c.bytes_in.load(Ordering::Relaxed),
                "msgs_out": c.msgs_out.load(Ordering::Relaxed),
                "dropped_slow": c.dropped_slow.load(Ordering::Relaxed),
                "retained_refused": c.retained_refused.load(Ordering::Relaxed),
            },
            "streams": streams,
            "uplink": self.uplink.as_ref().map(|u| u.snapshot()),
        })
    }

    fn metrics(&self) -> String {
        use std::fmt::Write;
        let c = &self.broker.counters;
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "frond_mqtt_connections",
            "Open MQTT connections",
            c.connections.load(Ordering::Relaxed),
        );
        gauge(
            "frond_mqtt_msgs_in_total",
            "MQTT PUBLISH packets received",
            c.msgs_in.load(Ordering::Relaxed),
        );
        gauge(
            "frond_mqtt_bytes_in_total",
            "MQTT payload bytes received",
            c.bytes_in.load(Ordering::Relaxed),
        );
        gauge(
            "frond_msgs_out_total",
            "Messages handed to subscribers",
            c.msgs_out.load(Ordering::Relaxed),
        );
        gauge(
            "frond_dropped_slow_total",
            "Deliveries dropped for slow subscribers",
            c.dropped_slow.load(Ordering::Relaxed),
        );
        gauge(
            "frond_mqtt_retained_refused_total",
            "Retained messages not stored: mqtt.max_retained or max_retained_bytes reached",
            c.retained_refused.load(Ordering::Relaxed),
        );
        // The live bridge's counters (issue 12), one line each.
        let bridge = self.uplink.as_ref().and_then(|u| u.bridge());
        if let Some(serde_json::Value::Object(m)) =
            bridge.and_then(|b| serde_json::to_value(b).ok())
        {
            for (k, v) in m {
                let _ = writeln!(out, "frond_uplink_bridge_{k} {v}");
            }
        }
        for s in self.broker.streams().iter() {
            let st = s.state();
            let n = &s.config().name;
            let _ = writeln!(out, "frond_stream_messages{{stream=\"{n}\"}} {}", st.msgs);
            let _ = writeln!(out, "frond_stream_bytes{{stream=\"{n}\"}} {}", st.bytes);
            let _ = writeln!(
                out,
                "frond_stream_last_seq{{stream=\"{n}\"}} {}",
                st.last_seq
            );
            let _ = writeln!(
                out,
                "frond_stream_unstored{{stream=\"{n}\"}} {}",
                s.unstored()
            );
        }
        if let Some(u) = &self.uplink {
            u.metrics(&mut out, crate::util::unix_nanos());
        }
        out
    }
}

/// Serve the endpoint until `shutdown` fires, with `cfg`'s connection
/// limit and header timeout.
pub async fn serve(
    listener: TcpListener,
    monitor: Arc<Monitor>,
    cfg: HttpConfig,
    shutdown: Receiver<()>,
) {
    let open = Arc::new(AtomicU64::new(0));
    let accept = Accept {
        name: "http",
        open: &open,
        max_connections: cfg.max_connections,
        limit_key: "http.max_connections",
        refusal: BUSY,
        refusal_log_every: LOG_EVERY,
        failure_log_every: LOG_EVERY,
        failure_hint: "",
    };
    accept::serve(&listener, &shutdown, accept, |sock, _| {
        let m = monitor.clone();
        let open = open.clone();
        let timeout = cfg.header_timeout;
        smol::spawn(async move {
            let _ = respond(sock, &m, timeout).await;
            open.fetch_sub(1, Ordering::Relaxed);
        })
        .detach();
    })
    .await
}

/// Read the request head within `timeout`, then answer within `timeout`.
async fn respond(mut sock: TcpStream, m: &Monitor, timeout: Duration) -> std::io::Result<()> {
    let head = read_head(&mut sock)
        .or(async {
            smol::Timer::after(timeout).await;
            Err(std::io::ErrorKind::TimedOut.into())
        })
        .await?;
    answer(&mut sock, m, head)
        .or(async {
            smol::Timer::after(timeout).await;
            Err(std::io::ErrorKind::TimedOut.into())
        })
        .await
}

/// What the client sent up to the end of its request head; `None` when
/// it closed first or sent too much (answered with 400 then).
async fn read_head(sock: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 8192 {
            reply(sock, "400 Bad Request", "text/plain", "request too large\n").await?;
            return Ok(None);
        }
    }
    Ok(Some(head))
}

async fn answer(sock: &mut TcpStream, m: &Monitor, head: Option<Vec<u8>>) -> std::io::Result<()> {
    let Some(head) = head else { return Ok(()) };
    let line = head.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return reply(sock, "405 Method Not Allowed", "text/plain", "GET only\n").await;
    }
    match path.split('?').next().unwrap_or("") {
        "/healthz" => reply(sock, "200 OK", "text/plain", "ok\n").await,
        "/varz" | "/" => {
            let body = serde_json::to_string_pretty(&m.varz()).unwrap_or_default() + "\n";
            reply(sock, "200 OK", "application/json", &body).await
        }
        "/metrics" => reply(sock, "200 OK", "text/plain; version=0.0.4", &m.metrics()).await,
        _ => {
            reply(
                sock,
                "404 Not Found",
                "text/plain",
                "try /healthz, /varz or /metrics\n",
            )
            .await
        }
    }
}

async fn reply(sock: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    let msg = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(msg.as_bytes()).await?;
    sock.flush().await
}

/// A blocking `GET path` against `addr` (used by `frond status`).
pub fn get(addr: &str, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)
        .map_err(|e| format!("cannot reach frond's HTTP endpoint at {addr}: {e} (is frond running, and [http] listen set?)"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.to_string()),
        Some((head, _)) => Err(format!(
            "unexpected answer: {}",
            head.lines().next().unwrap_or("")
        )),
        None => Err("malformed HTTP answer".into()),
    }
}
