//! Shared, cheap-to-read uplink status for logs, the HTTP endpoint and
//! `frond status`.
//!
//! Invariants: the lock is held only to copy small values in or out, never
//! across an `.await`.

use std::sync::Mutex;

use serde_json::{json, Value};

use super::mirror::MirrorStatus;

#[derive(Debug, Default)]
struct Inner {
    link: String,
    url: Option<String>,
    mirrors: Vec<MirrorStatus>,
    bridge: Option<super::bridge::BridgeStatus>,
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
                link: "disconnected".into(),
                ..Inner::default()
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// `"connected"`, `"connecting"`, `"disconnected"` or `"error: …"`.
    pub fn set_link(&self, link: impl Into<String>, url: Option<String>) {
        let link = link.into();
        self.with(|i| {
            i.link = link;
            i.url = url;
        });
    }

    pub fn set_mirrors(&self, mirrors: Vec<MirrorStatus>) {
        self.with(|i| i.mirrors = mirrors);
    }

    /// The live bridge's counters (`[[uplink.export]]`/`[[uplink.import]]`).
    pub fn set_bridge(&self, bridge: super::bridge::BridgeStatus) {
        self.with(|i| i.bridge = Some(bridge));
    }

    /// The live bridge's counters, when it runs.
    pub fn bridge(&self) -> Option<super::bridge::BridgeStatus> {
        self.with(|i| i.bridge.clone())
    }

    /// The link state string.
    pub fn link(&self) -> String {
        self.with(|i| i.link.clone())
    }

    /// Per-mirror status copies.
    pub fn mirrors(&self) -> Vec<MirrorStatus> {
        self.with(|i| i.mirrors.clone())
    }

    /// The status as JSON:
    /// `{"link": .., "url": .., "mirrors": [{"stream", "hub_stream", "state",
    /// "cursor", "hub_seq", "local_last_seq", "backlog_msgs",
    /// "backlog_bytes" (an estimate; null: unknown), "inflight", "sent", "acked",
    /// "skipped", "resyncs", "last_error"}], "bridge": {counters of
    /// [`super::bridge::BridgeStatus`]} (only when the live bridge runs)}`.
    pub fn snapshot(&self) -> Value {
        self.with(|i| {
            let mirrors: Vec<Value> = i
                .mirrors
                .iter()
                .map(|m| {
                    json!({
                        "stream": m.stream,
                        "hub_stream": m.hub_stream,
                        "state": m.state,
                        "cursor": m.cursor,
                        "hub_seq": m.hub_seq,
                        "local_last_seq": m.local_last_seq,
                        "backlog_msgs": m.local_last_seq.saturating_sub(m.cursor),
                        "backlog_bytes": m.backlog_bytes,
                        "inflight": m.inflight,
                        "sent": m.sent,
                        "acked": m.acked,
                        "skipped": m.skipped,
                        "resyncs": m.resyncs,
                        "last_error": m.last_error,
                    })
                })
                .collect();
            let mut v = json!({"link": i.link, "url": i.url, "mirrors": mirrors});
            if let Some(b) = &i.bridge {
                v["bridge"] = serde_json::to_value(b).unwrap_or_default();
            }
            v
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_shape() {
        let s = UplinkStatus::new();
        assert_eq!(s.snapshot()["link"], "disconnected");
        s.set_link("connected", Some("nats://h:4222".into()));
        s.set_mirrors(vec![MirrorStatus {
            stream: "T".into(),
            hub_stream: "FLEET".into(),
            cursor: 5,
            local_last_seq: 9,
            ..MirrorStatus::default()
        }]);
        let v = s.snapshot();
        assert_eq!(v["url"], "nats://h:4222");
        assert_eq!(v["mirrors"][0]["backlog_msgs"], 4);
        assert_eq!(v["mirrors"][0]["hub_stream"], "FLEET");
        assert!(v["mirrors"][0]["last_error"].is_null());
    }
}
