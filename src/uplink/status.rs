//! Shared, cheap-to-read uplink status for logs, the HTTP endpoint
//! (`/varz` JSON, `/metrics` Prometheus text) and `frond status`.
//!
//! Owns: the link's state (server, since when, reconnects, failovers, last
//! error with its time), each mirror's [`MirrorStatus`] with its [`Lag`],
//! and the rendering of all of it. Times are Unix nanoseconds taken by
//! the shell ([`super::run`]); ages are computed when a document is
//! rendered, so they stay current between updates.
//!
//! [`Lag`] is the one description of "how far behind" for every
//! replication direction: a mirror's local messages not yet on the hub,
//! and (source-down) a hub stream's messages not yet stored locally. A
//! source's status carries a `Lag` and renders it with [`Lag::json`] and
//! [`Lag::metrics`] (label `source="…"`), next to the mirrors.
//!
//! Invariants: the lock is held only to copy small values in or out, never
//! across an `.await`.

use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use super::mirror::MirrorStatus;
use super::source::SourceStatus;

/// How far one replication direction is behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lag {
    /// Messages not yet delivered.
    pub msgs: u64,
    /// Their bytes (for a mirror an estimate: `msgs` times the local
    /// stream's mean stored message size); `None`: unknown.
    pub bytes: Option<u64>,
    /// Unix ns at which the oldest undelivered message was stored;
    /// `None`: nothing undelivered, or not known yet.
    pub oldest_ts: Option<u64>,
}

impl Lag {
    /// The age of the oldest undelivered message at `now` (Unix ns).
    pub fn oldest_age(&self, now: u64) -> Option<Duration> {
        if self.msgs == 0 {
            return None;
        }
        self.oldest_ts
            .map(|t| Duration::from_nanos(now.saturating_sub(t)))
    }

    /// `{"msgs", "bytes", "oldest_age_secs"}` (null: unknown or nothing).
    pub fn json(&self, now: u64) -> Value {
        json!({
            "msgs": self.msgs,
            "bytes": self.bytes,
            "oldest_age_secs": self.oldest_age(now).map(|d| d.as_secs_f64()),
        })
    }

    /// `frond_uplink_<kind>_lag_{messages,bytes,oldest_age_seconds}{labels}`
    /// lines (`kind`: `mirror` or `source`; unknown values are left out).
    pub fn metrics(&self, out: &mut String, kind: &str, labels: &str, now: u64) {
        let _ = writeln!(
            out,
            "frond_uplink_{kind}_lag_messages{{{labels}}} {}",
            self.msgs
        );
        if let Some(b) = self.bytes {
            let _ = writeln!(out, "frond_uplink_{kind}_lag_bytes{{{labels}}} {b}");
        }
        let age = self.oldest_age(now).map_or(0.0, |d| d.as_secs_f64());
        let _ = writeln!(
            out,
            "frond_uplink_{kind}_lag_oldest_age_seconds{{{labels}}} {age:.3}"
        );
    }
}

/// The hub connection as the operator sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// `"connected"`, `"connecting"`, `"disconnected"` or `"error: …"`.
    pub state: String,
    /// The server connected to (or being dialled).
    pub server: Option<String>,
    /// Unix ns of the current connection's start (while connected).
    pub since: Option<u64>,
    /// Connections that came up after the first.
    pub reconnects: u64,
    /// Connections that came up on another server than the one before.
    pub failovers: u64,
    pub last_error: Option<String>,
    /// Unix ns of `last_error`.
    pub last_error_at: Option<u64>,
    /// The server of the last connection that came up.
    last_up: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    link: LinkStatus,
    mirrors: Vec<MirrorStatus>,
    bridge: Option<super::bridge::BridgeStatus>,
    /// Per local stream: Unix ns of the oldest message not on the hub (from
    /// [`UplinkStatus::set_oldest`]).
    oldest: Vec<(String, Option<u64>)>,
    sources: Vec<SourceStatus>,
}

/// The uplink's status, updated by [`super::run`].
#[derive(Debug)]
pub struct UplinkStatus {
    inner: Mutex<Inner>,
}

impl Default for UplinkStatus {
    fn default() -> Self {
        UplinkStatus::new()
    }
}

impl UplinkStatus {
    pub fn new() -> UplinkStatus {
        UplinkStatus {
            inner: Mutex::new(Inner {
                link: LinkStatus {
                    state: "disconnected".into(),
                    ..LinkStatus::default()
                },
                ..Inner::default()
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Set the state string and server (e.g. `"connecting"`).
    pub fn set_link(&self, link: impl Into<String>, url: Option<String>) {
        let link = link.into();
        self.with(|i| {
            if link != "connected" {
                i.link.since = None;
            }
            i.link.state = link;
            i.link.server = url;
        });
    }

    /// A connection to `server` came up at `now` (Unix ns).
    pub fn link_up(&self, server: String, now: u64) {
        self.with(|i| {
            let l = &mut i.link;
            if let Some(prev) = &l.last_up {
                l.reconnects += 1;
                if *prev != server {
                    l.failovers += 1;
                }
            }
            l.last_up = Some(server.clone());
            l.state = "connected".into();
            l.server = Some(server);
            l.since = Some(now);
        });
    }

    /// A connection (or an attempt: `was_up` false) to `server` ended at
    /// `now` for `reason`.
    pub fn link_down(&self, server: String, reason: String, was_up: bool, now: u64) {
        self.with(|i| {
            let l = &mut i.link;
            l.state = if was_up {
                "disconnected".into()
            } else {
                format!("error: {reason}")
            };
            l.server = Some(server);
            l.since = None;
            l.last_error = Some(reason);
            l.last_error_at = Some(now);
        });
    }

    /// New mirror states at `now` (Unix ns): a changed `last_error` is
    /// stamped with `now`; `lag.oldest_ts` comes from [`Self::set_oldest`].
    pub fn set_mirrors(&self, mut mirrors: Vec<MirrorStatus>, now: u64) {
        self.with(|i| {
            for m in mirrors.iter_mut() {
                let prev = i.mirrors.iter().find(|p| p.stream == m.stream);
                m.last_error_at = match (prev, &m.last_error) {
                    (_, None) => None,
                    (Some(p), Some(e)) if p.last_error.as_ref() == Some(e) => p.last_error_at,
                    (_, Some(_)) => Some(now),
                };
                m.lag.oldest_ts = i
                    .oldest
                    .iter()
                    .find(|(s, _)| *s == m.stream)
                    .and_then(|(_, t)| *t);
            }
            i.mirrors = mirrors;
        });
    }

    /// The oldest message of local stream `stream` not yet on the hub was
    /// stored at `ts` (Unix ns; `None`: there is none).
    pub fn set_oldest(&self, stream: &str, ts: Option<u64>) {
        self.with(|i| {
            match i.oldest.iter_mut().find(|(s, _)| s == stream) {
                Some(e) => e.1 = ts,
                None => i.oldest.push((stream.to_string(), ts)),
            }
            if let Some(m) = i.mirrors.iter_mut().find(|m| m.stream == stream) {
                m.lag.oldest_ts = ts;
            }
        });
    }

    /// The live bridge's counters (`[[uplink.export]]`/`[[uplink.import]]`).
    pub fn set_bridge(&self, bridge: super::bridge::BridgeStatus) {
        self.with(|i| i.bridge = Some(bridge));
    }

    /// The live bridge's counters, when it runs.
    pub fn bridge(&self) -> Option<super::bridge::BridgeStatus> {
        self.with(|i| i.bridge.clone())
    }

    pub fn set_sources(&self, sources: Vec<SourceStatus>) {
        self.with(|i| i.sources = sources);
    }

    /// Per-source status copies.
    pub fn sources(&self) -> Vec<SourceStatus> {
        self.with(|i| i.sources.clone())
    }

    /// The link state string.
    pub fn link(&self) -> String {
        self.with(|i| i.link.state.clone())
    }

    /// The link's status.
    pub fn link_status(&self) -> LinkStatus {
        self.with(|i| i.link.clone())
    }

    /// Per-mirror status copies.
    pub fn mirrors(&self) -> Vec<MirrorStatus> {
        self.with(|i| i.mirrors.clone())
    }

    /// The status as JSON at `now` (Unix ns):
    /// `{"link", "url", "since_unix_ms", "connected_secs", "reconnects",
    /// "failovers", "last_error", "last_error_unix_ms",
    /// "last_error_age_secs", "mirrors": [{"stream", "hub_stream",
    /// "priority", "state", "cursor", "hub_seq", "local_last_seq", "lag":
    /// {"msgs", "bytes", "oldest_age_secs"}, "backlog_msgs",
    /// "backlog_bytes", "inflight", "sent", "acked", "skipped", "resyncs",
    /// "last_error", "last_error_unix_ms", "last_error_age_secs"}],
    /// "sources": [{"from", "stream", "filter", "state", "hub_seq",
    /// "hub_last_seq", "pending", "stored", "skipped", "recreated",
    /// "diverged", "hub_created", "last_error"}], "bridge": {counters of [`super::bridge::BridgeStatus`]} (only when
    /// the live bridge runs)}`.
    pub fn snapshot_at(&self, now: u64) -> Value {
        let ms = |t: Option<u64>| t.map(|t| t / 1_000_000);
        let age = |t: Option<u64>| t.map(|t| now.saturating_sub(t) as f64 / 1e9);
        self.with(|i| {
            let mirrors: Vec<Value> = i
                .mirrors
                .iter()
                .map(|m| {
                    json!({
                        "stream": m.stream,
                        "hub_stream": m.hub_stream,
                        "priority": m.priority,
                        "state": m.state,
                        "cursor": m.cursor,
                        "hub_seq": m.hub_seq,
                        "local_last_seq": m.local_last_seq,
                        "lag": m.lag.json(now),
                        "backlog_msgs": m.lag.msgs,
                        "backlog_bytes": m.lag.bytes,
                        "inflight": m.inflight,
                        "sent": m.sent,
                        "acked": m.acked,
                        "skipped": m.skipped,
                        "resyncs": m.resyncs,
                        "recreated": m.recreated,
                        "last_error": m.last_error,
                        "last_error_unix_ms": ms(m.last_error_at),
                        "last_error_age_secs": age(m.last_error_at),
                    })
                })
                .collect();
            let sources: Vec<Value> = i.sources.iter().map(source_json).collect();
            let l = &i.link;
            let mut v = json!({
                "link": l.state,
                "url": l.server,
                "since_unix_ms": ms(l.since),
                "connected_secs": age(l.since),
                "reconnects": l.reconnects,
                "failovers": l.failovers,
                "last_error": l.last_error,
                "last_error_unix_ms": ms(l.last_error_at),
                "last_error_age_secs": age(l.last_error_at),
                "mirrors": mirrors,
                "sources": sources,
            });
            if let Some(b) = &i.bridge {
                v["bridge"] = serde_json::to_value(b).unwrap_or_default();
            }
            v
        })
    }

    /// [`Self::snapshot_at`] now.
    pub fn snapshot(&self) -> Value {
        self.snapshot_at(crate::util::unix_nanos())
    }

    /// Prometheus text lines for the link and every mirror, at `now`.
    pub fn metrics(&self, out: &mut String, now: u64) {
        self.with(|i| {
            let l = &i.link;
            let gauge = |out: &mut String, name: &str, help: &str, v: String| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            };
            let up = u8::from(l.state == "connected");
            gauge(
                out,
                "frond_uplink_connected",
                "1 while the hub link is up",
                up.to_string(),
            );
            let since = l.since.map_or(0.0, |t| t as f64 / 1e9);
            gauge(
                out,
                "frond_uplink_connected_since_seconds",
                "Unix time the current hub connection came up (0: down)",
                format!("{since:.3}"),
            );
            gauge(
                out,
                "frond_uplink_reconnects_total",
                "Hub connections that came up after the first",
                l.reconnects.to_string(),
            );
            gauge(
                out,
                "frond_uplink_failovers_total",
                "Hub connections that came up on another server than the one before",
                l.failovers.to_string(),
            );
            let err_at = l.last_error_at.map_or(0.0, |t| t as f64 / 1e9);
            gauge(
                out,
                "frond_uplink_last_error_seconds",
                "Unix time of the hub link's last error (0: none)",
                format!("{err_at:.3}"),
            );
            for m in &i.mirrors {
                let labels = format!("stream=\"{}\",hub_stream=\"{}\"", m.stream, m.hub_stream);
                m.lag.metrics(out, "mirror", &labels, now);
                for (name, v) in [
                    ("sent_total", m.sent),
                    ("acked_total", m.acked),
                    ("skipped_total", m.skipped),
                    ("resyncs_total", m.resyncs),
                    ("inflight", m.inflight as u64),
                ] {
                    let _ = writeln!(out, "frond_uplink_mirror_{name}{{{labels}}} {v}");
                }
                let err_at = m.last_error_at.map_or(0.0, |t| t as f64 / 1e9);
                let _ = writeln!(
                    out,
                    "frond_uplink_mirror_last_error_seconds{{{labels}}} {err_at:.3}"
                );
            }
        });
    }
}

/// The `uplink` part of `frond status` from `/varz`'s `uplink` document.
pub fn format_text(v: &Value) -> String {
    let mut out = String::new();
    let secs = |x: &Value| x.as_f64().map(|s| format!("{s:.1}s"));
    let _ = write!(
        out,
        "uplink: {} {}",
        v["link"].as_str().unwrap_or("?"),
        v["url"].as_str().unwrap_or("")
    );
    if let Some(s) = secs(&v["connected_secs"]) {
        let _ = write!(out, " for {s}");
    }
    let _ = writeln!(
        out,
        "; {} reconnects, {} failovers",
        v["reconnects"], v["failovers"]
    );
    if let Some(e) = v["last_error"].as_str() {
        let ago = secs(&v["last_error_age_secs"]).unwrap_or_default();
        let _ = writeln!(out, "  last error {ago} ago: {e}");
    }
    for m in v["mirrors"].as_array().into_iter().flatten() {
        let lag = &m["lag"];
        let _ = write!(
            out,
            "  mirror {} -> {} (priority {}): {}; lag {} msgs",
            m["stream"].as_str().unwrap_or("?"),
            m["hub_stream"].as_str().unwrap_or("?"),
            m["priority"],
            m["state"].as_str().unwrap_or("?"),
            lag["msgs"]
        );
        if let Some(b) = lag["bytes"].as_u64() {
            let _ = write!(out, ", ~{b} bytes");
        }
        if let Some(a) = secs(&lag["oldest_age_secs"]) {
            let _ = write!(out, ", oldest {a} old");
        }
        let _ = writeln!(
            out,
            "; cursor {}, hub seq {}, sent {}, acked {}, skipped {}, resyncs {}",
            m["cursor"], m["hub_seq"], m["sent"], m["acked"], m["skipped"], m["resyncs"]
        );
        if let Some(e) = m["last_error"].as_str() {
            let ago = secs(&m["last_error_age_secs"]).unwrap_or_default();
            let _ = writeln!(out, "    last error {ago} ago: {e}");
        }
    }
    out
}

fn source_json(s: &SourceStatus) -> Value {
    json!({
        "from": s.from,
        "stream": s.stream,
        "filter": s.filter,
        "state": s.state,
        "hub_seq": s.hub_seq,
        "hub_last_seq": s.hub_last_seq,
        "pending": s.pending,
        "stored": s.stored,
        "skipped": s.skipped,
        "recreated": s.recreated,
        "diverged": s.diverged,
        "hub_created": s.hub_created,
        "last_error": s.last_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn snapshot_shape() {
        let s = UplinkStatus::new();
        assert_eq!(s.snapshot_at(0)["link"], "disconnected");
        s.link_up("nats://h:4222".into(), 100 * S);
        s.set_mirrors(
            vec![MirrorStatus {
                stream: "T".into(),
                hub_stream: "FLEET".into(),
                cursor: 5,
                local_last_seq: 9,
                lag: Lag {
                    msgs: 4,
                    bytes: Some(400),
                    oldest_ts: None,
                },
                ..MirrorStatus::default()
            }],
            100 * S,
        );
        s.set_oldest("T", Some(97 * S));
        let v = s.snapshot_at(102 * S);
        assert_eq!(v["url"], "nats://h:4222");
        assert_eq!(v["connected_secs"], 2.0);
        assert_eq!(v["since_unix_ms"], 100_000);
        assert_eq!(v["mirrors"][0]["backlog_msgs"], 4);
        assert_eq!(v["mirrors"][0]["lag"]["msgs"], 4);
        assert_eq!(v["mirrors"][0]["lag"]["bytes"], 400);
        assert_eq!(v["mirrors"][0]["lag"]["oldest_age_secs"], 5.0);
        assert_eq!(v["mirrors"][0]["hub_stream"], "FLEET");
        assert!(v["mirrors"][0]["last_error"].is_null());
        let text = format_text(&v);
        assert!(
            text.contains("uplink: connected nats://h:4222 for 2.0s"),
            "{text}"
        );
        assert!(
            text.contains("lag 4 msgs, ~400 bytes, oldest 5.0s old"),
            "{text}"
        );
    }

    #[test]
    fn reconnects_failovers_and_error_times() {
        let s = UplinkStatus::new();
        s.link_up("nats://a:4222".into(), S);
        s.link_down(
            "nats://a:4222".into(),
            "hub did not answer".into(),
            true,
            2 * S,
        );
        s.link_down("nats://a:4222".into(), "refused".into(), false, 3 * S);
        s.link_up("nats://b:4222".into(), 4 * S);
        s.link_down("nats://b:4222".into(), "reset".into(), true, 5 * S);
        s.link_up("nats://b:4222".into(), 6 * S);
        let l = s.link_status();
        assert_eq!((l.reconnects, l.failovers), (2, 1));
        assert_eq!(l.last_error.as_deref(), Some("reset"));
        assert_eq!(l.last_error_at, Some(5 * S));
        let mirror = |e: Option<&str>| MirrorStatus {
            stream: "T".into(),
            last_error: e.map(str::to_string),
            ..MirrorStatus::default()
        };
        // A mirror's error keeps the time it first appeared.
        s.set_mirrors(vec![mirror(Some("x"))], 7 * S);
        s.set_mirrors(vec![mirror(Some("x"))], 8 * S);
        assert_eq!(s.mirrors()[0].last_error_at, Some(7 * S));
        s.set_mirrors(vec![mirror(Some("y"))], 9 * S);
        assert_eq!(s.mirrors()[0].last_error_at, Some(9 * S));
        s.set_mirrors(vec![mirror(None)], 10 * S);
        assert_eq!(s.mirrors()[0].last_error_at, None);
        let mut m = String::new();
        s.metrics(&mut m, 10 * S);
        assert!(m.contains("frond_uplink_connected 1\n"), "{m}");
        assert!(m.contains("frond_uplink_failovers_total 1\n"), "{m}");
        assert!(
            m.contains("frond_uplink_mirror_lag_messages{stream=\"T\",hub_stream=\"\"} 0\n"),
            "{m}"
        );
    }

    #[test]
    fn lag_age_is_none_without_a_backlog() {
        let l = Lag {
            msgs: 0,
            bytes: Some(0),
            oldest_ts: Some(S),
        };
        assert_eq!(l.oldest_age(5 * S), None);
        let mut out = String::new();
        l.metrics(&mut out, "source", "source=\"CMD\"", 5 * S);
        assert!(
            out.contains("frond_uplink_source_lag_oldest_age_seconds{source=\"CMD\"} 0.000"),
            "{out}"
        );
    }
}
