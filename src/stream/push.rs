//! Push consumers: the configuration keys a consumer with a
//! `deliver_subject` adds (deliver group, flow control, idle heartbeats),
//! the delivery options every consumer understands (`headers_only`,
//! `backoff`, `replay_policy`, `rate_limit_bps`), and the push delivery
//! state machine: flow control window, heartbeat timer, rate and replay
//! gate.
//!
//! Sans-IO like [`super::consumer`]: the JetStream service
//! (`server::jsapi::push`) passes `now` (unix ns) and the sizes of what it
//! sends, and routes the status messages built here.
//!
//! Invariants:
//! - At most one flow control request is outstanding ([`PushState::fc_out`]);
//!   a consumer sends no new message while its unanswered bytes reach
//!   [`FC_WINDOW_BYTES`] with a request outstanding (it is *stalled*);
//!   a reply to the outstanding request subtracts the bytes it covered.
//! - `backoff` (when set) has fewer entries than `max_deliver` (when
//!   limited), as nats-server requires; delivery `n` is due again after
//!   `backoff[min(n, len) - 1]`.
//! - Nothing here is persisted except through the config's JSON: the
//!   push state restarts empty (no outstanding flow control) after a restart.

use serde_json::{json, Value};

use super::consumer::{ApiError, Consumer, ConsumerConfig, ReceiverRef};
use crate::subject;

/// Bytes a push consumer with flow control sends before it asks the
/// client for a flow control reply (half of this) and stops until one
/// arrives (all of it).
pub const FC_WINDOW_BYTES: u64 = 1 << 20;

/// The keys of a push consumer (those with a `deliver_subject`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushConfig {
    pub deliver_subject: String,
    pub deliver_group: Option<String>,
    pub flow_control: bool,
    /// 0: none.
    pub idle_heartbeat_ns: u64,
}

/// Delivery options of every consumer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryOptions {
    /// Deliver the headers and `Nats-Msg-Size` only, no payload.
    pub headers_only: bool,
    /// Ack wait per delivery count (ns); empty: `ack_wait` always.
    pub backoff_ns: Vec<u64>,
    /// `replay_policy = "original"`: messages go out spaced as they were stored.
    pub replay_original: bool,
    /// Bits per second; 0: unlimited.
    pub rate_limit_bps: u64,
}

fn err(code: u16, err_code: u16, why: impl Into<String>) -> ApiError {
    ApiError::new(code, err_code, why)
}

fn opt_str<'a>(v: &'a Value, key: &str) -> Result<Option<&'a str>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_request(format!("{key} must be a string"))),
    }
}

fn opt_u64(v: &Value, key: &str) -> Result<u64, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(x) => x
            .as_u64()
            .or_else(|| x.as_i64().map(|_| 0))
            .ok_or_else(|| ApiError::bad_request(format!("{key} must be an integer"))),
    }
}

impl PushConfig {
    /// The push keys of a consumer config (`None`: a pull consumer),
    /// checked as nats-server checks them.
    pub fn from_json(v: &Value) -> Result<Option<PushConfig>, ApiError> {
        let flow_control = v
            .get("flow_control")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let idle_heartbeat_ns = opt_u64(v, "idle_heartbeat")?;
        let deliver_group = opt_str(v, "deliver_group")?.map(str::to_string);
        let Some(ds) = opt_str(v, "deliver_subject")? else {
            if flow_control {
                return Err(err(
                    400,
                    10089,
                    "consumer flow control requires a push based consumer",
                ));
            }
            if idle_heartbeat_ns > 0 {
                return Err(err(
                    400,
                    10088,
                    "consumer idle heartbeat requires a push based consumer",
                ));
            }
            if deliver_group.is_some() {
                return Err(ApiError::bad_request(
                    "consumer deliver_group requires a deliver_subject (push consumer)",
                ));
            }
            return Ok(None);
        };
        if !subject::valid_subject(ds) {
            return Err(err(400, 10079, "consumer deliver subject has wildcards"));
        }
        if ds.starts_with("$JS.API.") || ds.starts_with("$JS.ACK.") || ds.starts_with("$JS.FC.") {
            return Err(err(400, 10081, "consumer deliver subject forms a cycle"));
        }
        if flow_control && idle_heartbeat_ns == 0 {
            return Err(err(
                400,
                10108,
                "consumer with flow control also needs heartbeats",
            ));
        }
        if v.get("max_waiting").and_then(Value::as_i64).unwrap_or(0) > 0 {
            return Err(err(
                400,
                10080,
                "consumer in push mode can not set max waiting",
            ));
        }
        Ok(Some(PushConfig {
            deliver_subject: ds.to_string(),
            deliver_group,
            flow_control,
            idle_heartbeat_ns,
        }))
    }

    /// Adds its keys to a config's JSON.
    pub fn render(&self, v: &mut Value) {
        v["deliver_subject"] = json!(self.deliver_subject);
        if let Some(g) = &self.deliver_group {
            v["deliver_group"] = json!(g);
        }
        if self.flow_control {
            v["flow_control"] = json!(true);
        }
        if self.idle_heartbeat_ns > 0 {
            v["idle_heartbeat"] = json!(self.idle_heartbeat_ns);
        }
        if let Some(o) = v.as_object_mut() {
            o.remove("max_waiting");
        }
    }
}

impl DeliveryOptions {
    /// The delivery options of a consumer config; `max_deliver` is the
    /// parsed limit (-1: none).
    pub fn from_json(v: &Value, max_deliver: i64) -> Result<DeliveryOptions, ApiError> {
        let mut backoff_ns = Vec::new();
        if let Some(list) = v.get("backoff").filter(|b| !b.is_null()) {
            for b in list.as_array().map_or(&[][..], Vec::as_slice) {
                match b.as_u64() {
                    Some(n) if n > 0 => backoff_ns.push(n),
                    _ => return Err(ApiError::bad_request("backoff must be positive durations")),
                }
            }
            if !list.is_array() {
                return Err(ApiError::bad_request("backoff must be a list of durations"));
            }
        }
        if !backoff_ns.is_empty() && max_deliver > 0 && max_deliver as usize <= backoff_ns.len() {
            return Err(err(
                400,
                10116,
                "max deliver is required to be > length of backoff values",
            ));
        }
        let replay_original = match opt_str(v, "replay_policy")?.unwrap_or("instant") {
            "instant" => false,
            "original" => true,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown replay policy {other:?} (instant, original)"
                )))
            }
        };
        Ok(DeliveryOptions {
            headers_only: v
                .get("headers_only")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            backoff_ns,
            replay_original,
            rate_limit_bps: opt_u64(v, "rate_limit_bps")?,
        })
    }

    /// Adds its keys to a config's JSON.
    pub fn render(&self, v: &mut Value) {
        v["replay_policy"] = json!(if self.replay_original {
            "original"
        } else {
            "instant"
        });
        if self.headers_only {
            v["headers_only"] = json!(true);
        }
        if !self.backoff_ns.is_empty() {
            v["backoff"] = json!(self.backoff_ns);
        }
        if self.rate_limit_bps > 0 {
            v["rate_limit_bps"] = json!(self.rate_limit_bps);
        }
    }
}

/// The run-time state of a push consumer (not persisted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushState {
    /// The outstanding flow control request: its reply subject and the
    /// unanswered bytes it covers.
    pub fc_out: Option<(String, u64)>,
    fc_count: u64,
    /// Bytes sent and not yet covered by a flow control reply.
    pub unanswered: u64,
    /// Unix ns the next idle heartbeat is due (0: not started).
    pub next_heartbeat: u64,
    /// No new message goes out before this (rate limit, replay original).
    pub not_before: u64,
    /// Replay original: (stored timestamp, wall time) of the first message sent.
    pub replay_base: Option<(u64, u64)>,
    /// Look again then: the pass's budget ran out (now), or the deliver
    /// subject has no subscriber and an ephemeral consumer is removed then
    /// (a new subscriber wakes the service at once).
    pub recheck_at: Option<u64>,
    /// The user the consumer acts for (its creator, while frond runs):
    /// every delivery is checked against it.
    pub creator: Option<ReceiverRef>,
}

impl Consumer {
    /// The push configuration, if this is a push consumer.
    pub fn push_cfg(&self) -> Option<&PushConfig> {
        self.cfg.push.as_ref()
    }

    /// Whether flow control holds new messages back.
    pub fn stalled(&self) -> bool {
        self.push_cfg().is_some_and(|p| p.flow_control)
            && self.push.fc_out.is_some()
            && self.push.unanswered >= FC_WINDOW_BYTES
    }

    /// Whether a push consumer may send a message now (flow control, rate
    /// limit, replay spacing).
    pub fn push_ready(&self, now: u64) -> bool {
        !self.stalled() && now >= self.push.not_before
    }

    /// When a message stored at `ts` may go out under replay original
    /// (unix ns; `now` when it may go now).
    pub fn replay_due(&self, ts: u64, now: u64) -> u64 {
        if !self.cfg.opts.replay_original {
            return now;
        }
        match self.push.replay_base {
            Some((base_ts, wall)) => wall.saturating_add(ts.saturating_sub(base_ts)),
            None => now,
        }
    }

    /// Record a push delivery of `size` bytes stored at `ts`.
    pub fn push_sent(&mut self, size: usize, ts: u64, now: u64) {
        self.last_active = now;
        self.push.unanswered = self.push.unanswered.saturating_add(size as u64);
        if self.cfg.opts.replay_original && self.push.replay_base.is_none() {
            self.push.replay_base = Some((ts, now));
        }
        if let Some(p) = self.push_cfg() {
            if p.idle_heartbeat_ns > 0 {
                self.push.next_heartbeat = now.saturating_add(p.idle_heartbeat_ns);
            }
        }
        let bps = self.cfg.opts.rate_limit_bps;
        if bps > 0 {
            let wait = (size as u128 * 8 * 1_000_000_000) / u128::from(bps);
            self.push.not_before = now.saturating_add(u64::try_from(wait).unwrap_or(u64::MAX));
        }
    }

    /// A flow control request to send now, if one is due: its reply subject
    /// (`$JS.FC.<stream>.<consumer>.<n>`).
    pub fn flow_request(&mut self, stream: &str) -> Option<String> {
        let fc = self.push_cfg().is_some_and(|p| p.flow_control);
        if !fc || self.push.fc_out.is_some() || self.push.unanswered < FC_WINDOW_BYTES / 2 {
            return None;
        }
        self.push.fc_count += 1;
        let subj = format!("$JS.FC.{stream}.{}.{}", self.name, self.push.fc_count);
        self.push.fc_out = Some((subj.clone(), self.push.unanswered));
        Some(subj)
    }

    /// A reply to flow control request `subj`; whether it was the
    /// outstanding one.
    pub fn flow_reply(&mut self, subj: &str, now: u64) -> bool {
        match &self.push.fc_out {
            Some((s, covered)) if s == subj => {
                self.push.unanswered = self.push.unanswered.saturating_sub(*covered);
                self.push.fc_out = None;
                self.last_active = now;
                true
            }
            _ => false,
        }
    }

    /// An idle heartbeat due now: its header block
    /// (`NATS/1.0 100 Idle Heartbeat` with `Nats-Last-Consumer`,
    /// `Nats-Last-Stream` and, while stalled, `Nats-Consumer-Stalled`).
    pub fn heartbeat_due(&mut self, now: u64) -> Option<Vec<u8>> {
        let hb = self.push_cfg().map_or(0, |p| p.idle_heartbeat_ns);
        if hb == 0 {
            return None;
        }
        if self.push.next_heartbeat == 0 {
            self.push.next_heartbeat = now.saturating_add(hb);
            return None;
        }
        if now < self.push.next_heartbeat {
            return None;
        }
        self.push.next_heartbeat = now.saturating_add(hb);
        let mut h = format!(
            "NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: {}\r\nNats-Last-Stream: {}\r\n",
            self.delivered_cseq, self.delivered_sseq
        );
        if let (true, Some((s, _))) = (self.stalled(), &self.push.fc_out) {
            h.push_str(&format!("Nats-Consumer-Stalled: {s}\r\n"));
        }
        h.push_str("\r\n");
        Some(h.into_bytes())
    }

    /// The next instant a push consumer needs the service (heartbeat,
    /// rate/replay gate, more to send, ephemeral removal).
    pub fn push_deadline(&self) -> Option<u64> {
        self.push_cfg()?;
        let hb = (self.push.next_heartbeat > 0).then_some(self.push.next_heartbeat);
        let gate = (self.push.not_before > 0).then_some(self.push.not_before);
        [hb, gate, self.push.recheck_at].into_iter().flatten().min()
    }

    /// The ack wait of delivery number `n` (1-based): the backoff entry
    /// for it (the last one past the list), else `ack_wait`.
    pub fn ack_wait_for(&self, n: u64) -> u64 {
        ack_wait_of(&self.cfg, n)
    }
}

/// [`Consumer::ack_wait_for`] of a consumer config.
pub fn ack_wait_of(cfg: &ConsumerConfig, n: u64) -> u64 {
    let b = &cfg.opts.backoff_ns;
    match usize::try_from(n.saturating_sub(1)) {
        Ok(i) if !b.is_empty() => b.get(i).or(b.last()).copied().unwrap_or(0),
        _ => cfg.ack_wait_ns,
    }
}

/// `headers` with `Nats-Msg-Size: <size>` added (a new block when none).
pub fn with_msg_size(headers: Option<&[u8]>, size: usize) -> Vec<u8> {
    let line = format!("Nats-Msg-Size: {size}\r\n\r\n");
    match headers {
        Some(h) if h.ends_with(b"\r\n\r\n") => {
            let mut v = h.get(..h.len() - 2).unwrap_or_default().to_vec();
            v.extend_from_slice(line.as_bytes());
            v
        }
        _ => format!("NATS/1.0\r\n{line}").into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(v: Value) -> Consumer {
        let cfg = ConsumerConfig::from_json(&v).unwrap();
        Consumer::new("p".into(), cfg, 1, 0)
    }

    #[test]
    fn config_checks_match_nats_server() {
        let code = |v: Value| ConsumerConfig::from_json(&v).unwrap_err().err_code;
        assert_eq!(code(json!({"flow_control": true})), 10089);
        assert_eq!(code(json!({"idle_heartbeat": 5})), 10088);
        assert_eq!(code(json!({"deliver_subject": "a.*"})), 10079);
        assert_eq!(
            code(json!({"deliver_subject": "d", "flow_control": true})),
            10108
        );
        assert_eq!(code(json!({"backoff": [1, 2, 3], "max_deliver": 3})), 10116);
        let c = ConsumerConfig::from_json(
            &json!({"name": "p", "deliver_subject": "d", "deliver_group": "g",
            "flow_control": true, "idle_heartbeat": 7, "headers_only": true,
            "backoff": [5, 10], "max_deliver": 3, "replay_policy": "original",
            "rate_limit_bps": 800}),
        )
        .unwrap();
        assert_eq!(ConsumerConfig::from_json(&c.to_json("p")).unwrap(), c);
    }

    #[test]
    fn flow_control_stalls_until_the_reply() {
        let mut k =
            push(json!({"deliver_subject": "d", "flow_control": true, "idle_heartbeat": 10}));
        k.push_sent((FC_WINDOW_BYTES / 2) as usize, 0, 1);
        let fc = k.flow_request("S").unwrap();
        assert_eq!(fc, "$JS.FC.S.p.1");
        assert!(k.flow_request("S").is_none(), "one outstanding");
        assert!(k.push_ready(1));
        k.push_sent((FC_WINDOW_BYTES / 2) as usize, 0, 2);
        assert!(k.stalled() && !k.push_ready(2));
        let hb = String::from_utf8(k.heartbeat_due(100).unwrap()).unwrap();
        assert!(hb.contains("Nats-Consumer-Stalled: $JS.FC.S.p.1"), "{hb}");
        assert!(!k.flow_reply("$JS.FC.S.p.9", 3));
        assert!(k.flow_reply(&fc, 3));
        assert!(!k.stalled() && k.push.unanswered == FC_WINDOW_BYTES / 2);
    }

    #[test]
    fn heartbeats_rate_backoff_and_headers_only() {
        let mut k = push(json!({"deliver_subject": "d", "idle_heartbeat": 10,
            "rate_limit_bps": 8000, "backoff": [100, 200], "ack_wait": 50}));
        assert!(k.heartbeat_due(0).is_none(), "starts the timer");
        assert!(k.heartbeat_due(9).is_none());
        let hb = String::from_utf8(k.heartbeat_due(10).unwrap()).unwrap();
        assert!(hb.starts_with("NATS/1.0 100 Idle Heartbeat\r\n"));
        assert!(hb.contains("Nats-Last-Consumer: 0\r\nNats-Last-Stream: 0\r\n"));
        k.push_sent(1000, 0, 20);
        assert_eq!(k.push.not_before, 20 + 1_000_000_000);
        assert_eq!(k.push.next_heartbeat, 30);
        assert_eq!(
            (k.ack_wait_for(1), k.ack_wait_for(2), k.ack_wait_for(5)),
            (100, 200, 200)
        );
        assert_eq!(
            with_msg_size(None, 5),
            b"NATS/1.0\r\nNats-Msg-Size: 5\r\n\r\n"
        );
        assert_eq!(
            with_msg_size(Some(b"NATS/1.0\r\nA: b\r\n\r\n"), 7),
            b"NATS/1.0\r\nA: b\r\nNats-Msg-Size: 7\r\n\r\n"
        );
    }

    #[test]
    fn replay_original_spaces_as_stored() {
        let mut k = push(json!({"deliver_subject": "d", "replay_policy": "original"}));
        assert_eq!(k.replay_due(1000, 5), 5);
        k.push_sent(1, 1000, 5);
        assert_eq!(k.replay_due(1300, 6), 305);
    }
}
