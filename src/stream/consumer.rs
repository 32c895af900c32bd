//! Pull consumers: configuration, delivery and acknowledgement state,
//! persistence, and the retention questions ("may this message go?").
//!
//! Sans-IO: nothing here reads the clock, the store or the network. The
//! JetStream API service (`server::jsapi`) reads messages from the stream,
//! passes them in with `now` (unix ns) and routes what comes out.
//!
//! Model (JetStream's, reduced to what a pull consumer needs):
//! - `delivered` is the highest stream sequence handed out for the first
//!   time, and the consumer sequence of that delivery. Messages the filter
//!   does not match are stepped over (they advance `delivered.stream`).
//! - `pending` holds delivered, unacknowledged messages (ack policy
//!   `explicit` or `all`) with their consumer sequence, delivery count and
//!   ack deadline. A redelivery keeps the consumer sequence.
//! - `redeliver` holds pending messages due again (ack wait expired, or
//!   `-NAK`); they go out before new ones.
//! - A message was *processed* by the consumer when its sequence is at or
//!   below `delivered.stream` and not pending: acked, terminated (`+TERM`,
//!   `max_deliver` reached) or ack policy `none`.
//! - `floor` is where the consumer started (its deliver policy): messages
//!   at or below it were never of interest to it.
//! - What is left to deliver — the `last_per_subject` sequences and the
//!   exact `num_pending` — is [`super::backlog`]'s ([`Consumer::backlog`]).
//!
//! - Authorization (beyond JetStream, which ignores the caller's
//!   `deny_subscribe`): a consumer excludes what its creator's
//!   `deny_subscribe` covers of its filter ([`Consumer::exclusions`],
//!   persisted as `exclude`); excluded messages are stepped over like
//!   filtered-out ones (so they count as not selected for retention). A
//!   client may pull only from a consumer that cannot hand it a subject
//!   its `deny_subscribe` covers ([`Consumer::readable_by`]); each pull
//!   request also carries its client's permissions for a last check per
//!   delivery.
//!
//! Invariants: every key of `pending` is in `(floor, delivered.stream]`;
//! `redeliver` is a subset of `pending`'s keys; with ack policy `none`,
//! `pending` is empty.
//!
//! Persistence ([`Consumer::encode`]/[`Consumer::decode`]): one JSON
//! document, `{"v":1,"name","created","floor","config":{…JetStream consumer
//! config…},"delivered":[cseq,sseq],"pending":[[sseq,cseq,ts,deliveries],…],
//! "exclude":[filter,…]}` (`exclude` may be absent).
//! The service writes it atomically (temp file, fsync, rename, fsync of
//! the directory) before it answers a synchronous ack, so an acknowledged,
//! synced message is never redelivered after a restart; pending messages
//! are redelivered once their ack wait (counted from the last delivery)
//! has passed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde_json::{json, Value};

use super::backlog::Backlog;
use super::push::{DeliveryOptions, PushConfig, PushState};
use crate::subject;

/// JetStream's default ack wait: 30 s.
pub const DEFAULT_ACK_WAIT_NS: u64 = 30_000_000_000;
/// JetStream's default max_ack_pending.
pub const DEFAULT_MAX_ACK_PENDING: i64 = 1000;
/// JetStream's default max_waiting (pull requests held per consumer).
pub const DEFAULT_MAX_WAITING: i64 = 512;
/// Pending messages per consumer never exceed this, even with
/// `max_ack_pending = -1` (keeps memory bounded).
pub const MAX_PENDING_CAP: u64 = 100_000;
/// How long an ephemeral consumer lives without pull requests (JetStream: 5 s).
pub const DEFAULT_INACTIVE_NS: u64 = 5_000_000_000;

/// An API error: HTTP-like code, JetStream error code, description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub err_code: u16,
    pub description: String,
}

impl ApiError {
    pub fn new(code: u16, err_code: u16, description: impl Into<String>) -> ApiError {
        ApiError {
            code,
            err_code,
            description: description.into(),
        }
    }

    pub fn bad_request(why: impl Into<String>) -> ApiError {
        ApiError::new(400, 10003, why)
    }

    pub fn to_json(&self) -> Value {
        json!({"code": self.code, "err_code": self.err_code, "description": self.description})
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckPolicy {
    None,
    All,
    Explicit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliverPolicy {
    All,
    New,
    Last,
    ByStartSequence(u64),
    /// The newest message of each subject, then every new one
    /// (resolved at creation, see [`super::backlog`]).
    LastPerSubject,
    /// From the first message stored at or after `opt_start_time`
    /// (RFC 3339, as the client sent it; resolved at creation).
    ByStartTime(String),
}

/// A consumer's configuration (the subset frond implements; unknown
/// JetStream keys are accepted and ignored, push consumers are refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    pub durable_name: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub deliver_policy: DeliverPolicy,
    pub ack_policy: AckPolicy,
    pub ack_wait_ns: u64,
    /// -1 (or 0 in the request): unlimited.
    pub max_deliver: i64,
    /// Empty: every subject of the stream.
    pub filter_subjects: Vec<String>,
    pub max_waiting: i64,
    pub max_ack_pending: i64,
    /// Ephemeral consumers only.
    pub inactive_threshold_ns: u64,
    /// A push consumer's keys (`None`: pull).
    pub push: Option<PushConfig>,
    /// headers_only, backoff, replay_policy, rate_limit_bps.
    pub opts: DeliveryOptions,
}

/// A consumer or durable name as the API checks it: [`crate::stream::names`]'s
/// rule (it names a file), with nats-server's error codes: 10127 for a
/// path separator, 10102 for a name that is too long, 10103 otherwise.
pub fn check_name(n: &str) -> Result<(), ApiError> {
    use crate::stream::names::{validate, NameError, MAX_NAME_LEN};
    match validate(n) {
        Ok(()) => Ok(()),
        Err(NameError::PathSeparator) => Err(ApiError::new(
            400,
            10127,
            "Consumer name can not contain path separators",
        )),
        Err(NameError::TooLong(_)) => Err(ApiError::new(
            400,
            10102,
            format!("consumer name is too long, maximum allowed is {MAX_NAME_LEN}"),
        )),
        Err(e) => Err(ApiError::new(
            400,
            10103,
            format!("durable name can not contain '.', '*', '>' ({e})"),
        )),
    }
}

fn get_u64(v: &Value, key: &str) -> Result<Option<u64>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) => Ok(Some(n)),
            None if x.as_i64().is_some() => Ok(None), // negative: "unset"
            None => Err(ApiError::bad_request(format!("{key} must be an integer"))),
        },
    }
}

fn get_i64(v: &Value, key: &str) -> Result<Option<i64>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("{key} must be an integer"))),
    }
}

fn get_str<'a>(v: &'a Value, key: &str) -> Result<Option<&'a str>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_request(format!("{key} must be a string"))),
    }
}

impl ConsumerConfig {
    /// Parse a JetStream consumer config object.
    pub fn from_json(v: &Value) -> Result<ConsumerConfig, ApiError> {
        if !v.is_object() {
            return Err(ApiError::new(400, 10078, "consumer config required"));
        }
        let push = PushConfig::from_json(v)?;
        let (durable_name, name) = ConsumerConfig::names_of(v)?;
        let deliver_policy = ConsumerConfig::deliver_policy_of(v)?;
        let ack_policy = ConsumerConfig::ack_policy_of(v)?;
        let filter_subjects = ConsumerConfig::filters_of(v)?;
        let ack_wait_ns = get_u64(v, "ack_wait")?
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_ACK_WAIT_NS);
        let max_deliver = match get_i64(v, "max_deliver")? {
            None | Some(0) => -1,
            Some(n) if n < -1 => -1,
            Some(n) => n,
        };
        let max_ack_pending = match get_i64(v, "max_ack_pending")? {
            None | Some(0) => DEFAULT_MAX_ACK_PENDING,
            Some(n) => n,
        };
        let max_waiting = match get_i64(v, "max_waiting")? {
            None | Some(0) => DEFAULT_MAX_WAITING,
            Some(n) if n < 0 => {
                return Err(ApiError::new(
                    400,
                    10087,
                    "consumer max waiting needs to be positive",
                ))
            }
            Some(n) => n,
        };
        let inactive_threshold_ns = get_u64(v, "inactive_threshold")?
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_INACTIVE_NS);
        let opts = DeliveryOptions::from_json(v, max_deliver)?;
        Ok(ConsumerConfig {
            durable_name,
            name,
            description: get_str(v, "description")?.map(str::to_string),
            deliver_policy,
            ack_policy,
            ack_wait_ns,
            max_deliver,
            filter_subjects,
            max_waiting,
            max_ack_pending,
            inactive_threshold_ns,
            push,
            opts,
        })
    }

    /// `durable_name` and `name` (the durable name when absent): checked,
    /// and equal when both are given.
    fn names_of(v: &Value) -> Result<(Option<String>, Option<String>), ApiError> {
        let durable_name = get_str(v, "durable_name")?.map(str::to_string);
        let name = get_str(v, "name")?
            .map(str::to_string)
            .or_else(|| durable_name.clone());
        for n in durable_name.iter().chain(name.iter()) {
            check_name(n)?;
        }
        if let (Some(d), Some(n)) = (&durable_name, &name) {
            if d != n {
                return Err(ApiError::new(
                    400,
                    10132,
                    "consumer durable and name have to be equal if both are provided",
                ));
            }
        }
        Ok((durable_name, name))
    }

    fn deliver_policy_of(v: &Value) -> Result<DeliverPolicy, ApiError> {
        let policy = match get_str(v, "deliver_policy")?.unwrap_or("all") {
            "all" => DeliverPolicy::All,
            "new" => DeliverPolicy::New,
            "last" => DeliverPolicy::Last,
            "by_start_sequence" => match get_u64(v, "opt_start_seq")? {
                Some(n) if n > 0 => DeliverPolicy::ByStartSequence(n),
                _ => {
                    return Err(ApiError::new(
                        400,
                        10094,
                        "consumer deliver policy by_start_sequence needs opt_start_seq",
                    ))
                }
            },
            "last_per_subject" => DeliverPolicy::LastPerSubject,
            "by_start_time" => match get_str(v, "opt_start_time")? {
                Some(t) => DeliverPolicy::ByStartTime(t.to_string()),
                None => {
                    return Err(ApiError::new(
                        400,
                        10094,
                        "consumer deliver policy by_start_time needs opt_start_time",
                    ))
                }
            },
            other => {
                return Err(ApiError::new(
                    400,
                    10094,
                    format!("deliver policy {other:?} is not supported by frond (all, new, last, by_start_sequence, by_start_time, last_per_subject)"),
                ))
            }
        };
        Ok(policy)
    }

    fn ack_policy_of(v: &Value) -> Result<AckPolicy, ApiError> {
        let policy = match get_str(v, "ack_policy")?.unwrap_or("explicit") {
            "none" => AckPolicy::None,
            "all" => AckPolicy::All,
            "explicit" => AckPolicy::Explicit,
            other => {
                return Err(ApiError::new(
                    400,
                    10094,
                    format!("unknown ack policy {other:?}"),
                ))
            }
        };
        Ok(policy)
    }

    /// `filter_subject` and `filter_subjects`: sorted, deduplicated, valid
    /// and not overlapping.
    fn filters_of(v: &Value) -> Result<Vec<String>, ApiError> {
        let mut filter_subjects: Vec<String> = Vec::new();
        if let Some(f) = get_str(v, "filter_subject")? {
            filter_subjects.push(f.to_string());
        }
        if let Some(list) = v.get("filter_subjects").and_then(Value::as_array) {
            for f in list {
                match f.as_str() {
                    Some(s) if !s.is_empty() => filter_subjects.push(s.to_string()),
                    _ => return Err(ApiError::bad_request("filter_subjects must be subjects")),
                }
            }
        }
        filter_subjects.sort();
        filter_subjects.dedup();
        for f in &filter_subjects {
            if !subject::valid_filter(f) {
                return Err(ApiError::new(
                    400,
                    10093,
                    format!("consumer filter subject {f:?} is not a valid subject filter"),
                ));
            }
        }
        for (i, a) in filter_subjects.iter().enumerate() {
            for b in filter_subjects.iter().skip(i + 1) {
                if subject::filters_overlap(a, b) {
                    return Err(ApiError::new(
                        400,
                        10136,
                        format!("consumer subject filters cannot overlap ({a}, {b})"),
                    ));
                }
            }
        }
        Ok(filter_subjects)
    }

    /// The JetStream JSON shape (in responses and on disk).
    pub fn to_json(&self, name: &str) -> Value {
        let mut v = json!({
            "name": name,
            "deliver_policy": match self.deliver_policy {
                DeliverPolicy::All => "all",
                DeliverPolicy::New => "new",
                DeliverPolicy::Last => "last",
                DeliverPolicy::ByStartSequence(_) => "by_start_sequence",
                DeliverPolicy::LastPerSubject => "last_per_subject",
                DeliverPolicy::ByStartTime(_) => "by_start_time",
            },
            "ack_policy": match self.ack_policy {
                AckPolicy::None => "none",
                AckPolicy::All => "all",
                AckPolicy::Explicit => "explicit",
            },
            "ack_wait": self.ack_wait_ns,
            "max_deliver": self.max_deliver,
            "max_waiting": self.max_waiting,
            "max_ack_pending": self.max_ack_pending,
            "num_replicas": 0,
        });
        match &self.deliver_policy {
            DeliverPolicy::ByStartSequence(n) => v["opt_start_seq"] = json!(n),
            DeliverPolicy::ByStartTime(t) => v["opt_start_time"] = json!(t),
            _ => {}
        }
        if let Some(d) = &self.durable_name {
            v["durable_name"] = json!(d);
        } else {
            v["inactive_threshold"] = json!(self.inactive_threshold_ns);
        }
        if let Some(d) = &self.description {
            v["description"] = json!(d);
        }
        match self.filter_subjects.as_slice() {
            [] => {}
            [one] => v["filter_subject"] = json!(one),
            many => v["filter_subjects"] = json!(many),
        }
        self.opts.render(&mut v);
        if let Some(p) = &self.push {
            p.render(&mut v);
        }
        v
    }

    /// Whether this consumer sees `subj`.
    pub fn matches(&self, subj: &str) -> bool {
        self.filter_subjects.is_empty()
            || self
                .filter_subjects
                .iter()
                .any(|f| subject::matches(f, subj))
    }

    /// Whether two consumers' filters can select the same subject (for
    /// the workqueue uniqueness rule).
    pub fn overlaps(&self, other: &ConsumerConfig) -> bool {
        if self.filter_subjects.is_empty() || other.filter_subjects.is_empty() {
            return true;
        }
        self.filter_subjects.iter().any(|a| {
            other
                .filter_subjects
                .iter()
                .any(|b| subject::filters_overlap(a, b))
        })
    }
}

/// A pending (delivered, unacknowledged) message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub cseq: u64,
    /// Unix ns of the last delivery.
    pub ts: u64,
    pub deliveries: u64,
    /// Unix ns at which it is due again.
    pub deadline: u64,
}

/// A waiting pull request (`CONSUMER.MSG.NEXT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub reply: String,
    pub batch: usize,
    /// 0: unlimited.
    pub max_bytes: usize,
    pub no_wait: bool,
    /// Unix ns; None: until the batch is filled.
    pub expires: Option<u64>,
    /// Idle heartbeat interval in ns (0: none) and when the next is due.
    pub heartbeat: u64,
    pub next_heartbeat: u64,
    pub sent: usize,
    pub sent_bytes: usize,
    /// The client that asked (`None`: unrestricted); nothing it may not
    /// receive is delivered to it.
    pub receiver: Option<ReceiverRef>,
}

/// Who a pull request delivers to, as far as this module needs to know:
/// which subjects it may receive. The API shell implements it for its
/// permissions type (this module knows no auth types).
pub trait Receiver: std::fmt::Debug + Send + Sync {
    /// Whether a message on `subject` may be delivered to it.
    fn may_receive(&self, subject: &str) -> bool;
}

/// A shared [`Receiver`]; two are equal when they are the same one.
#[derive(Debug, Clone)]
pub struct ReceiverRef(pub Arc<dyn Receiver>);

impl PartialEq for ReceiverRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ReceiverRef {}

impl PullRequest {
    /// Parse a pull request body (a number, empty, or JSON).
    pub fn parse(reply: &str, body: &[u8], now: u64) -> Result<PullRequest, ApiError> {
        let body = std::str::from_utf8(body)
            .map_err(|_| ApiError::new(400, 10025, "invalid JSON"))?
            .trim();
        let mut req = PullRequest {
            reply: reply.to_string(),
            batch: 1,
            max_bytes: 0,
            no_wait: false,
            expires: None,
            heartbeat: 0,
            next_heartbeat: 0,
            sent: 0,
            sent_bytes: 0,
            receiver: None,
        };
        if body.is_empty() {
            return Ok(req);
        }
        if let Ok(n) = body.parse::<usize>() {
            req.batch = n.max(1);
            return Ok(req);
        }
        let v: Value =
            serde_json::from_str(body).map_err(|_| ApiError::new(400, 10025, "invalid JSON"))?;
        if let Some(b) = get_i64(&v, "batch")? {
            if b < 0 {
                return Err(ApiError::new(
                    400,
                    10114,
                    "consumer max request batch needs to be > 0",
                ));
            }
            req.batch = usize::try_from(b).unwrap_or(usize::MAX).max(1);
        }
        if let Some(b) = get_u64(&v, "max_bytes")? {
            req.max_bytes = usize::try_from(b).unwrap_or(usize::MAX);
        }
        req.no_wait = v.get("no_wait").and_then(Value::as_bool).unwrap_or(false);
        if let Some(e) = get_u64(&v, "expires")?.filter(|e| *e > 0) {
            req.expires = Some(now.saturating_add(e));
        }
        if let Some(h) = get_u64(&v, "idle_heartbeat")?.filter(|h| *h > 0) {
            req.heartbeat = h;
            req.next_heartbeat = now.saturating_add(h);
        }
        Ok(req)
    }
}

/// What an ack message asks for (the payload on `$JS.ACK…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckKind {
    Ack,
    /// Redeliver, after a delay in ns (0: at once).
    Nak(u64),
    Progress,
    Term,
    /// Ack, then a pull request for this many messages.
    Next(usize),
}

impl AckKind {
    pub fn parse(body: &[u8]) -> Option<AckKind> {
        let s = std::str::from_utf8(body).ok()?.trim();
        let (word, rest) = match s.find(|c: char| c.is_whitespace()) {
            Some(i) => (s.get(..i)?, s.get(i..)?.trim()),
            None => (s, ""),
        };
        Some(match word {
            "" | "+ACK" => AckKind::Ack,
            "-NAK" => {
                let delay = serde_json::from_str::<Value>(rest)
                    .ok()
                    .and_then(|v| v.get("delay").and_then(Value::as_u64))
                    .unwrap_or(0);
                AckKind::Nak(delay)
            }
            "+WPI" => AckKind::Progress,
            "+TERM" => AckKind::Term,
            "+NXT" => {
                let batch = rest
                    .parse::<usize>()
                    .ok()
                    .or_else(|| {
                        serde_json::from_str::<Value>(rest)
                            .ok()
                            .and_then(|v| v.get("batch").and_then(Value::as_u64))
                            .and_then(|b| usize::try_from(b).ok())
                    })
                    .unwrap_or(1);
                AckKind::Next(batch.max(1))
            }
            _ => return None,
        })
    }
}

/// The parts of an ack subject frond needs:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`.
pub fn parse_ack_subject(subj: &str) -> Option<(&str, &str, u64)> {
    let rest = subj.strip_prefix("$JS.ACK.")?;
    let t: Vec<&str> = rest.split('.').collect();
    if t.len() != 7 {
        return None;
    }
    let sseq = t.get(3)?.parse().ok()?;
    Some((t.first()?, t.get(1)?, sseq))
}

/// The reply subject of a delivery.
pub fn ack_subject(
    stream: &str,
    consumer: &str,
    deliveries: u64,
    sseq: u64,
    cseq: u64,
    ts: u64,
    pending: u64,
) -> String {
    // Built by hand, sized once (no formatting machinery): this runs per
    // delivered message.
    let mut s = String::with_capacity(10 + stream.len() + consumer.len() + 5 * 20);
    s.push_str("$JS.ACK.");
    s.push_str(stream);
    s.push('.');
    s.push_str(consumer);
    for n in [deliveries, sseq, cseq, ts, pending] {
        s.push('.');
        push_u64(&mut s, n);
    }
    s
}

/// Appends `n` in decimal (not inlined: five calls per ack subject).
#[inline(never)]
fn push_u64(s: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        if let Some(d) = digits.get_mut(i) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    s.push_str(std::str::from_utf8(digits.get(i..).unwrap_or_default()).unwrap_or_default());
}

/// One consumer's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    pub name: String,
    pub cfg: ConsumerConfig,
    /// Unix ns.
    pub created: u64,
    pub floor: u64,
    pub delivered_cseq: u64,
    pub delivered_sseq: u64,
    pub pending: BTreeMap<u64, Pending>,
    pub redeliver: BTreeSet<u64>,
    pub waiting: VecDeque<PullRequest>,
    /// Unix ns of the last pull request or ack (ephemeral clean-up).
    pub last_active: u64,
    /// Persisted state is behind.
    pub dirty: bool,
    /// Subjects this consumer never delivers (a frond extension): the part
    /// of its filter that its creator's `deny_subscribe` covers, fixed at
    /// creation ([`Consumer::exclusions`]) and persisted. Messages on them
    /// are stepped over like subjects outside the filter.
    pub exclude: Vec<String>,
    /// Push delivery state (unused by pull consumers).
    pub push: PushState,
    /// What is left to deliver: `last_per_subject` state, `num_pending`.
    pub backlog: Backlog,
}

impl Consumer {
    /// A new consumer; `start` is the stream sequence it delivers first
    /// (from its deliver policy, resolved by the caller).
    pub fn new(name: String, cfg: ConsumerConfig, start: u64, now: u64) -> Consumer {
        let floor = start.saturating_sub(1);
        Consumer {
            name,
            cfg,
            created: now,
            floor,
            delivered_cseq: 0,
            delivered_sseq: floor,
            pending: BTreeMap::new(),
            redeliver: BTreeSet::new(),
            waiting: VecDeque::new(),
            last_active: now,
            dirty: true,
            exclude: Vec::new(),
            push: PushState::default(),
            backlog: Backlog::default(),
        }
    }

    /// What a consumer created by a client whose `deny_subscribe` filters
    /// are `deny` on `filters` (its filter subjects, or the stream's
    /// subjects when it has none) must exclude: the intersections of each
    /// filter with each `deny` filter. `Err(filter)` when `explicit` (the client
    /// named the filters) and one lies wholly inside a denied filter, or
    /// when every filter does: the consumer could deliver nothing the
    /// client may receive.
    pub fn exclusions(
        filters: &[String],
        explicit: bool,
        deny: &[String],
    ) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut open = false;
        for f in filters {
            let denied = deny.iter().any(|d| subject::filter_within(f, d));
            if denied && explicit {
                return Err(f.clone());
            }
            open |= !denied;
            for d in deny {
                if let Some(x) = subject::filter_intersection(f, d) {
                    if !out.contains(&x) {
                        out.push(x);
                    }
                }
            }
        }
        match (open, filters.first()) {
            (false, Some(f)) => Err(f.clone()),
            _ => Ok(out),
        }
    }

    /// Whether a client whose `deny_subscribe` filters are `deny` may
    /// receive everything this consumer can deliver (`stream_subjects`:
    /// the stream's, for a consumer without filter): every subject a
    /// `deny` filter shares with the consumer's filters is one the
    /// consumer excludes.
    pub fn readable_by(&self, stream_subjects: &[String], deny: &[String]) -> bool {
        let filters = match self.cfg.filter_subjects.as_slice() {
            [] => stream_subjects,
            f => f,
        };
        deny.iter().all(|d| {
            filters
                .iter()
                .filter_map(|f| subject::filter_intersection(f, d))
                .all(|i| self.exclude.iter().any(|x| subject::filter_within(&i, x)))
        })
    }

    /// Whether this consumer delivers `subj`: its filter matches and it
    /// does not exclude it.
    pub fn selects(&self, subj: &str) -> bool {
        self.cfg.matches(subj) && !self.exclude.iter().any(|x| subject::matches(x, subj))
    }

    pub fn durable(&self) -> bool {
        self.cfg.durable_name.is_some()
    }

    /// Ack floor: (consumer seq, stream seq) below which everything is done.
    pub fn ack_floor(&self) -> (u64, u64) {
        match self.pending.iter().next() {
            Some((s, p)) => (p.cseq.saturating_sub(1), s.saturating_sub(1)),
            None => (self.delivered_cseq, self.delivered_sseq),
        }
    }

    /// Whether new (not redelivered) messages may go out now.
    pub fn may_deliver_new(&self) -> bool {
        let max = u64::try_from(self.cfg.max_ack_pending)
            .map_or(MAX_PENDING_CAP, |m| m.min(MAX_PENDING_CAP));
        self.cfg.ack_policy == AckPolicy::None || (self.pending.len() as u64) < max
    }

    /// Step over a stream message the filter does not match.
    pub fn skip(&mut self, sseq: u64) {
        self.backlog.passed(sseq);
        if sseq > self.delivered_sseq {
            self.delivered_sseq = sseq;
            self.dirty = true;
        }
    }

    /// Record a delivery of `sseq` (new or redelivery); returns
    /// `(cseq, deliveries)` for the ack subject.
    pub fn record_delivery(&mut self, sseq: u64, now: u64) -> (u64, u64) {
        self.dirty = true;
        self.redeliver.remove(&sseq);
        let n = self.pending.get(&sseq).map_or(1, |p| p.deliveries + 1);
        let deadline = now.saturating_add(self.ack_wait_for(n));
        if let Some(p) = self.pending.get_mut(&sseq) {
            p.deliveries = n;
            p.ts = now;
            p.deadline = deadline;
            return (p.cseq, p.deliveries);
        }
        self.delivered_cseq += 1;
        self.backlog.passed(sseq);
        self.backlog.num_pending = self.backlog.num_pending.saturating_sub(1);
        if sseq > self.delivered_sseq {
            self.delivered_sseq = sseq;
        }
        let cseq = self.delivered_cseq;
        if self.cfg.ack_policy != AckPolicy::None {
            self.pending.insert(
                sseq,
                Pending {
                    cseq,
                    ts: now,
                    deliveries: 1,
                    deadline,
                },
            );
        }
        (cseq, 1)
    }

    /// A redelivery candidate whose message no longer exists.
    pub fn forget(&mut self, sseq: u64) {
        self.redeliver.remove(&sseq);
        if self.pending.remove(&sseq).is_some() {
            self.dirty = true;
        }
    }

    /// Apply an ack for `sseq`. Returns the stream sequences that became
    /// processed (for retention).
    pub fn ack(&mut self, sseq: u64, kind: &AckKind, now: u64) -> Vec<u64> {
        self.last_active = now;
        match kind {
            AckKind::Ack | AckKind::Next(_) | AckKind::Term => {
                let done: Vec<u64> =
                    if self.cfg.ack_policy == AckPolicy::All && !matches!(kind, AckKind::Term) {
                        self.pending.range(..=sseq).map(|(s, _)| *s).collect()
                    } else if self.pending.contains_key(&sseq) {
                        vec![sseq]
                    } else {
                        Vec::new()
                    };
                for s in &done {
                    self.pending.remove(s);
                    self.redeliver.remove(s);
                }
                if !done.is_empty() {
                    self.dirty = true;
                }
                done
            }
            AckKind::Nak(delay) => {
                if let Some(p) = self.pending.get_mut(&sseq) {
                    if *delay == 0 {
                        self.redeliver.insert(sseq);
                    } else {
                        p.deadline = now.saturating_add(*delay);
                    }
                }
                Vec::new()
            }
            AckKind::Progress => {
                if let Some(p) = self.pending.get_mut(&sseq) {
                    p.deadline = now.saturating_add(self.cfg.ack_wait_ns);
                }
                Vec::new()
            }
        }
    }

    /// Ack waits that expired: due messages join `redeliver`; those that
    /// reached `max_deliver` are dropped from pending (returned, as they
    /// are now processed).
    pub fn handle_timeout(&mut self, now: u64) -> Vec<u64> {
        let mut dropped = Vec::new();
        for (s, p) in &self.pending {
            if p.deadline <= now && !self.redeliver.contains(s) {
                if self.cfg.max_deliver > 0 && p.deliveries >= self.cfg.max_deliver as u64 {
                    dropped.push(*s);
                } else {
                    self.redeliver.insert(*s);
                }
            }
        }
        for s in &dropped {
            self.pending.remove(s);
            self.dirty = true;
        }
        dropped
    }

    /// The next instant (unix ns) this consumer needs a timeout call.
    pub fn next_deadline(&self) -> Option<u64> {
        let acks = self
            .pending
            .iter()
            .filter(|(s, _)| !self.redeliver.contains(s))
            .map(|(_, p)| p.deadline)
            .min();
        let reqs = self
            .waiting
            .iter()
            .flat_map(|r| {
                r.expires
                    .into_iter()
                    .chain((r.heartbeat > 0).then_some(r.next_heartbeat))
            })
            .min();
        let idle = (!self.durable() && self.waiting.is_empty()).then(|| {
            self.last_active
                .saturating_add(self.cfg.inactive_threshold_ns)
        });
        [acks, reqs, idle, self.push_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether this consumer is done with `sseq` (subject `subj`): it does
    /// not select it, started after it, or processed it.
    pub fn done_with(&self, sseq: u64, subj: &str) -> bool {
        !self.selects(subj) || sseq <= self.floor || self.processed(sseq)
    }

    /// Delivered and no longer pending.
    pub fn processed(&self, sseq: u64) -> bool {
        sseq <= self.delivered_sseq && !self.pending.contains_key(&sseq)
    }

    /// Messages delivered more than once and still pending.
    pub fn num_redelivered(&self) -> usize {
        self.pending.values().filter(|p| p.deliveries > 1).count()
    }

    /// What is persisted of this consumer (see [`crate::state::consumers`]).
    pub fn saved(&self) -> SavedConsumer {
        SavedConsumer {
            name: self.name.clone(),
            created: self.created,
            floor: self.floor,
            config: self.cfg.to_json(&self.name).to_string(),
            delivered: (self.delivered_cseq, self.delivered_sseq),
            pending: self
                .pending
                .iter()
                .map(|(s, p)| [*s, p.cseq, p.ts, p.deliveries])
                .collect(),
            exclude: self.exclude.clone(),
        }
    }

    /// Load a persisted consumer of an earlier release (JSON).
    pub fn decode(bytes: &[u8], now: u64) -> Result<Consumer, String> {
        Consumer::restore(SavedConsumer::from_json(bytes)?, now)
    }

    /// A persisted consumer, checked. Pending messages become due one ack
    /// wait after their last delivery.
    pub fn restore(s: SavedConsumer, now: u64) -> Result<Consumer, String> {
        if crate::stream::names::validate(&s.name).is_err() {
            return Err("missing or bad name".into());
        }
        let v: Value = serde_json::from_str(&s.config).map_err(|e| format!("bad config: {e}"))?;
        let cfg =
            ConsumerConfig::from_json(&v).map_err(|e| format!("bad config: {}", e.description))?;
        let (floor, (delivered_cseq, delivered_sseq)) = (s.floor, s.delivered);
        let mut pending = BTreeMap::new();
        for [seq, c, ts, n] in s.pending {
            if seq <= floor || seq > delivered_sseq {
                return Err(format!(
                    "pending sequence {seq} outside ({floor}, {delivered_sseq}]"
                ));
            }
            let deadline = ts.saturating_add(super::push::ack_wait_of(&cfg, n));
            let p = Pending {
                cseq: c,
                ts,
                deliveries: n,
                deadline,
            };
            pending.insert(seq, p);
        }
        if s.exclude.iter().any(|f| !subject::valid_filter(f)) {
            return Err("bad exclude entry".into());
        }
        Ok(Consumer {
            name: s.name,
            cfg,
            created: s.created,
            floor,
            delivered_cseq,
            delivered_sseq,
            pending,
            redeliver: BTreeSet::new(),
            waiting: VecDeque::new(),
            last_active: now,
            dirty: false,
            exclude: s.exclude,
            push: PushState::default(),
            backlog: Backlog::default(),
        })
    }
}

/// The persisted state of a consumer: what [`Consumer::restore`] needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedConsumer {
    pub name: String,
    /// Unix ns of its creation.
    pub created: u64,
    pub floor: u64,
    /// Its configuration as the API's JSON (checked again at restore).
    pub config: String,
    /// (consumer sequence, stream sequence) of the last first delivery.
    pub delivered: (u64, u64),
    /// Pending messages: stream sequence, consumer sequence, last delivery
    /// (unix ns), deliveries.
    pub pending: Vec<[u64; 4]>,
    /// Filters excluded for its creator ([`Consumer::exclusions`]).
    pub exclude: Vec<String>,
}

impl SavedConsumer {
    /// The JSON file of earlier releases: `{"v":1,"name","created",
    /// "floor","config":{..},"delivered":[c,s],"pending":[[s,c,ts,n],..],
    /// "exclude":[..]}` (`exclude` absent before exclusions existed).
    pub fn from_json(bytes: &[u8]) -> Result<SavedConsumer, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        if v.get("v").and_then(Value::as_u64) != Some(1) {
            return Err("unsupported consumer state version".into());
        }
        let num = |k: &str| {
            v.get(k)
                .and_then(Value::as_u64)
                .ok_or(format!("missing {k}"))
        };
        let list = |k: &str| v.get(k).and_then(Value::as_array);
        let nums = |x: &Value| -> Vec<u64> {
            x.as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default()
        };
        let delivered = match nums(v.get("delivered").unwrap_or(&Value::Null)).as_slice() {
            [c, s] => (*c, *s),
            _ => return Err("missing or bad delivered".into()),
        };
        let mut pending = Vec::new();
        for p in list("pending").ok_or("missing pending")? {
            match nums(p).as_slice() {
                [s, c, ts, n] => pending.push([*s, *c, *ts, *n]),
                _ => return Err("bad pending entry".into()),
            }
        }
        let mut exclude = Vec::new();
        for x in list("exclude").map_or(&[][..], Vec::as_slice) {
            exclude.push(x.as_str().ok_or("bad exclude entry")?.to_string());
        }
        if v.get("exclude").is_some_and(|x| !x.is_array()) {
            return Err("bad exclude".into());
        }
        Ok(SavedConsumer {
            name: v
                .get("name")
                .and_then(Value::as_str)
                .ok_or("missing or bad name")?
                .to_string(),
            created: num("created")?,
            floor: num("floor")?,
            config: v.get("config").unwrap_or(&Value::Null).to_string(),
            delivered,
            pending,
            exclude,
        })
    }
}

#[cfg(test)]
#[path = "consumer_tests.rs"]
pub(crate) mod tests;
