//! The JetStream API for local streams: an internal service on the router
//! that answers `$JS.API.…` requests and `$JS.ACK.…` acknowledgements, so
//! local programs use frond's streams with ordinary JetStream clients.
//!
//! Owns: the consumers of every local stream ([`crate::stream::consumer`]),
//! their files (`<stream dir>/consumers/<name>.json`), waiting pull
//! requests, and retention by acknowledgement (`interest`, `workqueue`).
//!
//! Seam: the service subscribes to `$JS.API.>` and `$JS.ACK.>` on the
//! router like a NATS connection (its own [`Outbox`]) and publishes its
//! replies through the router; the NATS shell needs no change. Deliveries
//! to a pull request's inbox keep the stored subject ([`Broker::route_to`]).
//!
//! Supported: `INFO`, `STREAM.NAMES`, `STREAM.LIST`, `STREAM.INFO`,
//! `STREAM.MSG.GET` (seq, last_by_subj, next_by_subj), `STREAM.MSG.DELETE`,
//! `STREAM.PURGE` (filter, seq, keep), `CONSUMER.CREATE`,
//! `CONSUMER.DURABLE.CREATE`, `CONSUMER.INFO`, `CONSUMER.DELETE`,
//! `CONSUMER.NAMES`, `CONSUMER.LIST`, `CONSUMER.MSG.NEXT` (pull: batch,
//! max_bytes, expires, no_wait, idle_heartbeat). Streams are configured in
//! frond.toml: `STREAM.CREATE/UPDATE/DELETE` answer an error saying so.
//! Push consumers are refused.
//!
//! Invariants:
//! - One loop iteration: take requests and acks, expire timers, deliver to
//!   waiting pull requests, apply retention, write changed consumer files,
//!   then publish the replies. So an API answer or a synchronous ack reply
//!   (`AckSync`) is sent only after the consumer state it reports is on
//!   disk (file streams).
//! - Retention: `workqueue` removes a message once a consumer that selects
//!   it processed it (acked, terminated, or gave up after `max_deliver`);
//!   consumers on a workqueue stream must use explicit acks, deliver all and
//!   have disjoint filters. `interest` removes a message once every consumer
//!   that existed when it was stored (and selects it) processed it; with no
//!   consumer at all it is removed at once, as in JetStream.
//! - Edge rule: a stream mirrored to the hub (`[[uplink.mirror]]`) never
//!   loses a message to `interest`/`workqueue` retention before the hub has
//!   acknowledged it (the mirror's cursor counts as one more interested
//!   party), so nothing is removed before it is uplinked.
//! - Limits (max_msgs, max_age…) still apply to every stream.
//!
//! Authorization. Who may call what is decided by the publish permission
//! on the API subject, as in nats-server (checked by the protocol shells).
//! Beyond nats-server, the service also applies the caller's subscribe
//! permissions, which reach it as [`Msg::publisher`]:
//! - Answers go only to a reply subject the caller may subscribe to; a
//!   request whose answer it could not receive is ignored (logged at
//!   debug), so no one can aim API answers at subjects it may not use.
//! - `STREAM.MSG.GET` answers 403 with err_code [`NOT_AUTHORIZED`] for a
//!   message on a subject the caller's `deny_subscribe` covers (and for a
//!   `last_by_subj`/`next_by_subj` filter wholly inside it);
//!   `STREAM.INFO` leaves such subjects out of its `subjects` map. Only
//!   `deny_subscribe` applies: JetStream clients receive on `_INBOX.`
//!   subjects, so `allow_subscribe` rarely lists the stream's subjects.
//! - Consumers: a filter wholly inside the creator's `deny_subscribe` is
//!   refused at create (403); an unfiltered consumer on a stream whose
//!   subjects are all denied likewise; what the deny list covers of the
//!   rest is excluded by the consumer (stepped over like filtered-out
//!   subjects, see [`Consumer::exclusions`]). A pull (`MSG.NEXT`, `+NXT`)
//!   is refused with a 403 status when the consumer can deliver a subject
//!   the puller's `deny_subscribe` covers ([`Consumer::readable_by`]), and
//!   every delivery is checked once more against the puller.
//!   `num_pending` is an upper bound: it counts every stream message after
//!   the consumer's position, including those outside its filter or
//!   excluded, which are stepped over when reached (nats-server counts
//!   filtered messages exactly).
//! - Names that become files (consumer and durable names) pass
//!   [`crate::names`] before anything else; the answers use nats-server's
//!   codes (10127 path separator, 10102 too long, 10103 otherwise).
//! - A stream holds at most [`MAX_CONSUMERS`] consumers, whoever created
//!   them: any user allowed to publish `CONSUMER.CREATE` for a stream can
//!   fill them (as in nats-server without account limits); restrict
//!   `allow_publish` on `$JS.API.CONSUMER.>` to trusted users.
//! - Wills carry permissions that allow nothing, so no will is answered
//!   (see [`crate::broker::bridge::will_publisher`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use smol::channel::Receiver;
use smol::future::FutureExt;

use crate::auth::Permissions;
use crate::broker::{Broker, Msg, Outbox};
use crate::stream::consumer::{
    ack_subject, check_name, parse_ack_subject, AckKind, AckPolicy, ApiError, Consumer,
    ConsumerConfig, DeliverPolicy, PullRequest,
};
use crate::stream::{
    Discard, PurgeRequest, Retention, Storage, StoredMessage, StreamError, StreamHandle,
};
use crate::uplink::UplinkStatus;
use crate::util::unix_nanos;
use crate::wire::nats::base64;

/// Bytes of requests and acks queued for the service before it is "slow".
const INBOX_BYTES: usize = 64 << 20;
/// Messages examined for retention per loop iteration.
const RETENTION_BUDGET: usize = 4096;
/// Consumers per stream (bounds memory and files).
pub const MAX_CONSUMERS: usize = 1024;
/// How often the mirror cursors are looked at (mirrored streams only).
const MIRROR_POLL: Duration = Duration::from_millis(100);

/// A parsed `$JS.API.` subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Info,
    StreamNames,
    StreamList,
    StreamInfo(String),
    StreamCreate(String),
    StreamUpdate(String),
    StreamDelete(String),
    MsgGet(String),
    MsgDelete(String),
    Purge(String),
    ConsumerCreate {
        stream: String,
        name: Option<String>,
        filter: Option<String>,
        durable_api: bool,
    },
    ConsumerInfo(String, String),
    ConsumerDelete(String, String),
    ConsumerNames(String),
    ConsumerList(String),
    Next(String, String),
    Unknown,
}

/// Parse the subject of an API request.
pub fn parse_call(subj: &str) -> Call {
    let Some(rest) = subj.strip_prefix("$JS.API.") else {
        return Call::Unknown;
    };
    let t: Vec<&str> = rest.split('.').collect();
    let s = |i: usize| t.get(i).map(|x| x.to_string()).unwrap_or_default();
    match t.as_slice() {
        ["INFO"] => Call::Info,
        ["STREAM", "NAMES"] => Call::StreamNames,
        ["STREAM", "LIST"] => Call::StreamList,
        ["STREAM", "INFO", _] => Call::StreamInfo(s(2)),
        ["STREAM", "CREATE", _] => Call::StreamCreate(s(2)),
        ["STREAM", "UPDATE", _] => Call::StreamUpdate(s(2)),
        ["STREAM", "DELETE", _] => Call::StreamDelete(s(2)),
        ["STREAM", "MSG", "GET", _] => Call::MsgGet(s(3)),
        ["STREAM", "MSG", "DELETE", _] => Call::MsgDelete(s(3)),
        ["STREAM", "PURGE", _] => Call::Purge(s(2)),
        ["CONSUMER", "CREATE", _] => Call::ConsumerCreate {
            stream: s(2),
            name: None,
            filter: None,
            durable_api: false,
        },
        ["CONSUMER", "CREATE", _, _, ..] => Call::ConsumerCreate {
            stream: s(2),
            name: Some(s(3)),
            filter: (t.len() > 4).then(|| t.get(4..).unwrap_or_default().join(".")),
            durable_api: false,
        },
        ["CONSUMER", "DURABLE", "CREATE", _, _] => Call::ConsumerCreate {
            stream: s(3),
            name: Some(s(4)),
            filter: None,
            durable_api: true,
        },
        ["CONSUMER", "INFO", _, _] => Call::ConsumerInfo(s(2), s(3)),
        ["CONSUMER", "DELETE", _, _] => Call::ConsumerDelete(s(2), s(3)),
        ["CONSUMER", "NAMES", _] => Call::ConsumerNames(s(2)),
        ["CONSUMER", "LIST", _] => Call::ConsumerList(s(2)),
        ["CONSUMER", "MSG", "NEXT", _, _] => Call::Next(s(3), s(4)),
        _ => Call::Unknown,
    }
}

/// RFC 3339 (UTC, nanoseconds) for a unix time in ns; 0 is Go's zero time,
/// as nats-server sends it.
pub fn rfc3339(ns: u64) -> String {
    if ns == 0 {
        return "0001-01-01T00:00:00Z".into();
    }
    let secs = ns / 1_000_000_000;
    let nanos = ns % 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `n`, or -1 for 0 ("unlimited" in JetStream's JSON).
fn limit(n: u64) -> i64 {
    if n == 0 {
        -1
    } else {
        i64::try_from(n).unwrap_or(i64::MAX)
    }
}

/// The JetStream stream config of a frond stream.
pub fn stream_config_json(h: &StreamHandle) -> Value {
    let c = h.config();
    json!({
        "name": c.name,
        "subjects": c.subjects,
        "retention": match c.retention {
            Retention::Limits => "limits",
            Retention::Interest => "interest",
            Retention::WorkQueue => "workqueue",
        },
        "max_consumers": -1,
        "max_msgs": limit(c.max_msgs),
        "max_bytes": limit(c.max_bytes),
        "max_age": u64::try_from(c.max_age.as_nanos()).unwrap_or(u64::MAX),
        "max_msgs_per_subject": limit(c.max_msgs_per_subject),
        "max_msg_size": limit(c.max_msg_size).min(i64::from(i32::MAX)),
        "discard": match c.discard { Discard::Old => "old", Discard::New => "new" },
        "discard_new_per_subject": c.discard_new_per_subject,
        "storage": match c.storage { Storage::File => "file", Storage::Memory => "memory" },
        "num_replicas": 1,
        "duplicate_window": u64::try_from(c.duplicate_window.as_nanos()).unwrap_or(u64::MAX),
        "allow_rollup_hdrs": c.allow_rollup,
        "deny_delete": c.deny_delete,
        "deny_purge": c.deny_purge,
        "allow_msg_ttl": c.allow_msg_ttl,
        "allow_direct": false,
        "mirror_direct": false,
        "sealed": false,
    })
}

/// A stream error as an API error.
fn stream_err(e: StreamError) -> ApiError {
    let code = match &e {
        StreamError::Io(_) | StreamError::Closed => 500,
        _ => 400,
    };
    ApiError::new(code, e.code().unwrap_or(10003), e.to_string())
}

fn not_found_stream() -> ApiError {
    ApiError::new(404, 10059, "stream not found")
}

fn not_found_consumer() -> ApiError {
    ApiError::new(404, 10014, "consumer not found")
}

/// frond's error code for an API call its caller's subscribe permissions
/// do not allow (JetStream has none: nats-server does not check them).
pub const NOT_AUTHORIZED: u16 = 10403;

fn not_authorized(why: impl std::fmt::Display) -> ApiError {
    ApiError::new(403, NOT_AUTHORIZED, format!("not authorized: {why}"))
}

/// Whether a caller with `perms` (`None`: unrestricted) may receive a
/// stored message on `subject` (its `deny_subscribe`, see the module doc).
fn may_read(perms: Option<&Permissions>, subject: &str) -> bool {
    perms.is_none_or(|p| p.may_deliver(subject))
}

/// Whether a caller with `perms` may subscribe to `reply`, where its
/// answer would go.
fn may_answer(perms: Option<&Permissions>, reply: &str) -> bool {
    perms.is_none_or(|p| p.can_subscribe(reply))
}

fn body_json(body: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::new(400, 10025, "invalid JSON"))?;
    if text.trim().is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_str(text).map_err(|_| ApiError::new(400, 10025, "invalid JSON"))
}

/// A status message (`NATS/1.0 <code> <text>`) for a pull request.
fn status_msg(code: u16, text: &str, pending: Option<(usize, usize)>) -> Vec<u8> {
    let mut h = format!("NATS/1.0 {code} {text}\r\n");
    if let Some((msgs, bytes)) = pending {
        h.push_str(&format!(
            "Nats-Pending-Messages: {msgs}\r\nNats-Pending-Bytes: {bytes}\r\n"
        ));
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// One local stream and its consumers.
struct Slot {
    handle: StreamHandle,
    /// `<stream dir>/consumers` for file streams; memory streams keep
    /// their consumers in memory only.
    dir: Option<PathBuf>,
    consumers: BTreeMap<String, Consumer>,
    mirrored: bool,
    /// Every local message up to here is on the hub.
    mirror_cursor: u64,
    /// Sequence ranges to examine for retention.
    check: Vec<(u64, u64)>,
    /// Highest sequence seen (interest: new messages are examined).
    seen_last: u64,
}

/// Something to publish once the iteration's state is on disk:
/// (subject routed to, message).
type Out = (String, Msg);

/// A status message for a pull request: (inbox, code, text, pending).
type StatusOut = (String, u16, &'static str, Option<(usize, usize)>);

/// The service's state.
pub struct JsApi {
    slots: Vec<Slot>,
    started: u64,
    api_total: u64,
    api_errors: u64,
    out: Vec<Out>,
}

impl JsApi {
    /// Load the consumers of every stream. `streams_dir` holds one
    /// directory per stream; `mirrored` names the streams mirrored to the hub.
    pub fn open(streams: &[StreamHandle], streams_dir: &Path, mirrored: &[String]) -> JsApi {
        let now = unix_nanos();
        let mut slots = Vec::new();
        for h in streams {
            let name = h.config().name.clone();
            let dir = (h.config().storage == Storage::File)
                .then(|| crate::names::path_in(streams_dir, &name, ""))
                .and_then(|d| match d {
                    Ok(d) => Some(d.join("consumers")),
                    Err(e) => {
                        log::error!(
                            "jetstream: stream {name:?}: {e}; its consumers are not persisted"
                        );
                        None
                    }
                });
            let mut consumers = BTreeMap::new();
            if let Some(d) = &dir {
                for c in crate::state::consumers::load(d, &name, now) {
                    consumers.insert(c.name.clone(), c);
                }
            }
            let st = h.state();
            let check = if h.config().retention == Retention::Limits || st.msgs == 0 {
                Vec::new()
            } else {
                vec![(st.first_seq, st.last_seq)]
            };
            slots.push(Slot {
                handle: h.clone(),
                dir,
                consumers,
                mirrored: mirrored.contains(&name),
                mirror_cursor: 0,
                check,
                seen_last: st.last_seq,
            });
        }
        JsApi {
            slots,
            started: now,
            api_total: 0,
            api_errors: 0,
            out: Vec::new(),
        }
    }

    fn slot(&self, name: &str) -> Result<&Slot, ApiError> {
        self.slots
            .iter()
            .find(|s| s.handle.config().name == name)
            .ok_or_else(not_found_stream)
    }

    fn slot_idx(&self, name: &str) -> Result<usize, ApiError> {
        self.slots
            .iter()
            .position(|s| s.handle.config().name == name)
            .ok_or_else(not_found_stream)
    }

    /// Handle one message routed to the service.
    pub async fn handle(&mut self, m: &Msg, now: u64) {
        if m.subject.starts_with("$JS.ACK.") {
            self.handle_ack(m, now);
            return;
        }
        let call = parse_call(&m.subject);
        if let Call::Next(stream, consumer) = &call {
            self.handle_next(stream, consumer, m, now);
            return;
        }
        let Some(reply) = m.reply.clone() else {
            return;
        };
        let caller = m.publisher.as_deref();
        if !may_answer(caller, &reply) {
            log::debug!(
                "jetstream: {} ignored: its caller may not subscribe to the reply subject {reply:?}",
                m.subject
            );
            return;
        }
        self.api_total += 1;
        let (kind, res) = self.api(call, &m.payload, now, caller).await;
        let v = match res {
            Ok(mut v) => {
                v["type"] = json!(format!("io.nats.jetstream.api.v1.{kind}"));
                v
            }
            Err(e) => {
                self.api_errors += 1;
                json!({"type": format!("io.nats.jetstream.api.v1.{kind}"), "error": e.to_json()})
            }
        };
        self.reply(&reply, v.to_string().into_bytes());
    }

    fn reply(&mut self, to: &str, payload: Vec<u8>) {
        self.out.push((
            to.to_string(),
            Msg {
                subject: to.to_string(),
                reply: None,
                headers: None,
                payload,
                publisher: None,
            },
        ));
    }

    fn status(&mut self, to: &str, code: u16, text: &str, pending: Option<(usize, usize)>) {
        self.out.push((
            to.to_string(),
            Msg {
                subject: to.to_string(),
                reply: None,
                headers: Some(status_msg(code, text, pending)),
                payload: Vec::new(),
                publisher: None,
            },
        ));
    }

    async fn api(
        &mut self,
        call: Call,
        body: &[u8],
        now: u64,
        caller: Option<&Permissions>,
    ) -> (&'static str, Result<Value, ApiError>) {
        match call {
            Call::Info => ("account_info_response", Ok(self.account_info())),
            Call::StreamNames => ("stream_names_response", self.stream_names(body)),
            Call::StreamList => ("stream_list_response", self.stream_list().await),
            Call::StreamInfo(s) => (
                "stream_info_response",
                self.stream_info(&s, body, caller).await,
            ),
            Call::StreamCreate(_) => (
                "stream_create_response",
                Err(ApiError::new(500, 10049, "stream create failed: frond's streams are configured in frond.toml ([[stream]]); edit it and restart")),
            ),
            Call::StreamUpdate(_) => (
                "stream_update_response",
                Err(ApiError::new(500, 10069, "stream update failed: frond's streams are configured in frond.toml ([[stream]]); edit it and restart")),
            ),
            Call::StreamDelete(_) => (
                "stream_delete_response",
                Err(ApiError::new(500, 10050, "stream delete failed: frond's streams are configured in frond.toml ([[stream]]); remove it there")),
            ),
            Call::MsgGet(s) => (
                "stream_msg_get_response",
                self.msg_get(&s, body, caller).await,
            ),
            Call::MsgDelete(s) => ("stream_msg_delete_response", self.msg_delete(&s, body).await),
            Call::Purge(s) => ("stream_purge_response", self.purge(&s, body).await),
            Call::ConsumerCreate {
                stream,
                name,
                filter,
                durable_api,
            } => (
                "consumer_create_response",
                self.consumer_create(&stream, name, filter, durable_api, body, now, caller)
                    .await,
            ),
            Call::ConsumerInfo(s, c) => ("consumer_info_response", self.consumer_info(&s, &c)),
            Call::ConsumerDelete(s, c) => {
                ("consumer_delete_response", self.consumer_delete(&s, &c))
            }
            Call::ConsumerNames(s) => ("consumer_names_response", self.consumer_names(&s)),
            Call::ConsumerList(s) => ("consumer_list_response", self.consumer_list(&s)),
            Call::Next(..) | Call::Unknown => (
                "error_response",
                Err(ApiError::bad_request("unknown JetStream API request")),
            ),
        }
    }

    fn account_info(&self) -> Value {
        let storage: u64 = self.slots.iter().map(|s| s.handle.state().bytes).sum();
        let consumers: usize = self.slots.iter().map(|s| s.consumers.len()).sum();
        json!({
            "memory": 0,
            "storage": storage,
            "streams": self.slots.len(),
            "consumers": consumers,
            "limits": {
                "max_memory": -1, "max_storage": -1, "max_streams": -1, "max_consumers": -1,
                "max_ack_pending": -1, "memory_max_stream_bytes": -1,
                "storage_max_stream_bytes": -1, "max_bytes_required": false
            },
            "api": {"total": self.api_total, "errors": self.api_errors},
        })
    }

    fn stream_names(&self, body: &[u8]) -> Result<Value, ApiError> {
        let req = body_json(body)?;
        let filter = req
            .get("subject")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let names: Vec<&str> = self
            .slots
            .iter()
            .map(|s| s.handle.config())
            .filter(|c| {
                filter.is_none_or(|f| {
                    c.subjects
                        .iter()
                        .any(|s| crate::subject::filters_overlap(s, f))
                })
            })
            .map(|c| c.name.as_str())
            .collect();
        Ok(json!({"total": names.len(), "offset": 0, "limit": 1024, "streams": names}))
    }

    async fn stream_list(&self) -> Result<Value, ApiError> {
        let mut infos = Vec::new();
        for s in &self.slots {
            infos.push(self.info_of(s, None).await?);
        }
        Ok(
            json!({"total": infos.len(), "offset": 0, "limit": 256, "streams": infos, "missing": []}),
        )
    }

    async fn stream_info(
        &self,
        name: &str,
        body: &[u8],
        caller: Option<&Permissions>,
    ) -> Result<Value, ApiError> {
        let req = body_json(body)?;
        let filter = req
            .get("subjects_filter")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let v = self
            .info_of(self.slot(name)?, filter.map(|f| (f, caller)))
            .await?;
        Ok(v)
    }

    /// `subjects`: the `subjects_filter` of a `STREAM.INFO` and its caller
    /// (subjects the caller may not read are left out of the answer).
    async fn info_of(
        &self,
        s: &Slot,
        subjects: Option<(&str, Option<&Permissions>)>,
    ) -> Result<Value, ApiError> {
        let i = s.handle.info().await.map_err(stream_err)?;
        let mut state = json!({
            "messages": i.msgs,
            "bytes": i.bytes,
            "first_seq": i.first_seq,
            "first_ts": rfc3339(i.first_ts),
            "last_seq": i.last_seq,
            "last_ts": rfc3339(i.last_ts),
            "num_subjects": i.subjects,
            "num_deleted": i.deleted,
            "consumer_count": s.consumers.len(),
        });
        if let Some((f, caller)) = subjects {
            let counts = s.handle.subject_counts(f).await.map_err(stream_err)?;
            let map: serde_json::Map<String, Value> = counts
                .into_iter()
                .filter(|(k, _)| may_read(caller, k))
                .map(|(k, n)| (k, json!(n)))
                .collect();
            state["subjects"] = Value::Object(map);
        }
        Ok(json!({
            "config": stream_config_json(&s.handle),
            "created": rfc3339(self.started),
            "state": state,
            "ts": rfc3339(unix_nanos()),
        }))
    }

    async fn msg_get(
        &self,
        name: &str,
        body: &[u8],
        caller: Option<&Permissions>,
    ) -> Result<Value, ApiError> {
        let h = &self.slot(name)?.handle;
        let req = body_json(body)?;
        let seq = req.get("seq").and_then(Value::as_u64);
        for key in ["last_by_subj", "next_by_subj"] {
            let denied = |f: &str| {
                caller.is_some_and(|p| {
                    p.deny_subscribe
                        .iter()
                        .any(|d| crate::auth::filter_within(f, d))
                })
            };
            if let Some(f) = req.get(key).and_then(Value::as_str).filter(|f| denied(f)) {
                return Err(not_authorized(format!(
                    "{key} {f:?} is denied to this user"
                )));
            }
        }
        let found = if let Some(subj) = req.get("last_by_subj").and_then(Value::as_str) {
            h.last_by_subject(subj).await
        } else if let Some(subj) = req.get("next_by_subj").and_then(Value::as_str) {
            h.next_by_subject(subj, seq.unwrap_or(0).max(1)).await
        } else if let Some(seq) = seq {
            h.get(seq).await
        } else {
            return Err(ApiError::bad_request(
                "request must name seq, last_by_subj or next_by_subj",
            ));
        }
        .map_err(stream_err)?;
        let m = found.ok_or_else(|| ApiError::new(404, 10037, "no message found"))?;
        if !may_read(caller, &m.subject) {
            return Err(not_authorized(format!(
                "message {} is on a subject this user may not subscribe to",
                m.seq
            )));
        }
        let mut msg = json!({
            "subject": m.subject,
            "seq": m.seq,
            "data": base64::encode(&m.payload),
            "time": rfc3339(m.timestamp),
        });
        if let Some(hd) = &m.headers {
            msg["hdrs"] = json!(base64::encode(hd));
        }
        Ok(json!({"message": msg}))
    }

    async fn msg_delete(&self, name: &str, body: &[u8]) -> Result<Value, ApiError> {
        let h = &self.slot(name)?.handle;
        let req = body_json(body)?;
        let seq = req
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| ApiError::bad_request("request must name seq"))?;
        let no_erase = req
            .get("no_erase")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        match h.delete(seq, !no_erase).await.map_err(stream_err)? {
            true => Ok(json!({"success": true})),
            false => Err(ApiError::new(400, 10057, "no message found")),
        }
    }

    async fn purge(&self, name: &str, body: &[u8]) -> Result<Value, ApiError> {
        let h = &self.slot(name)?.handle;
        let req = body_json(body)?;
        let p = PurgeRequest {
            subject: req
                .get("filter")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            upto_seq: req.get("seq").and_then(Value::as_u64).filter(|n| *n > 0),
            keep: req.get("keep").and_then(Value::as_u64).filter(|n| *n > 0),
        };
        if p.upto_seq.is_some() && p.keep.is_some() {
            return Err(ApiError::bad_request(
                "sequence and keep can not both be set",
            ));
        }
        let purged = h.purge(p).await.map_err(stream_err)?;
        Ok(json!({"success": true, "purged": purged}))
    }

    fn consumer_json(&self, s: &Slot, c: &Consumer) -> Value {
        let last = s.handle.state().last_seq;
        let (af_c, af_s) = c.ack_floor();
        json!({
            "stream_name": s.handle.config().name,
            "name": c.name,
            "created": rfc3339(c.created),
            "config": c.cfg.to_json(&c.name),
            "delivered": {"consumer_seq": c.delivered_cseq, "stream_seq": c.delivered_sseq},
            "ack_floor": {"consumer_seq": af_c, "stream_seq": af_s},
            "num_ack_pending": c.pending.len(),
            "num_redelivered": c.num_redelivered(),
            "num_waiting": c.waiting.len(),
            "num_pending": last.saturating_sub(c.delivered_sseq),
            "ts": rfc3339(unix_nanos()),
        })
    }

    fn consumer_info(&self, stream: &str, name: &str) -> Result<Value, ApiError> {
        check_name(name)?;
        let s = self.slot(stream)?;
        let c = s.consumers.get(name).ok_or_else(not_found_consumer)?;
        Ok(self.consumer_json(s, c))
    }

    fn consumer_names(&self, stream: &str) -> Result<Value, ApiError> {
        let s = self.slot(stream)?;
        let names: Vec<&String> = s.consumers.keys().collect();
        Ok(json!({"total": names.len(), "offset": 0, "limit": 1024, "consumers": names}))
    }

    fn consumer_list(&self, stream: &str) -> Result<Value, ApiError> {
        let s = self.slot(stream)?;
        let list: Vec<Value> = s
            .consumers
            .values()
            .map(|c| self.consumer_json(s, c))
            .collect();
        Ok(
            json!({"total": list.len(), "offset": 0, "limit": 256, "consumers": list, "missing": []}),
        )
    }

    fn consumer_delete(&mut self, stream: &str, name: &str) -> Result<Value, ApiError> {
        check_name(name)?;
        let i = self.slot_idx(stream)?;
        let slot = self.slots.get_mut(i).ok_or_else(not_found_stream)?;
        let c = slot.consumers.remove(name).ok_or_else(not_found_consumer)?;
        if let Some(d) = slot.dir.as_deref() {
            if let Err(e) = crate::state::consumers::remove(d, name) {
                log::warn!(
                    "jetstream: cannot remove consumer {name} in {}: {e}",
                    d.display()
                );
            }
        }
        let st = slot.handle.state();
        if slot.handle.config().retention == Retention::Interest && st.msgs > 0 {
            slot.check.push((st.first_seq, st.last_seq));
        }
        let waiting: Vec<String> = c.waiting.iter().map(|r| r.reply.clone()).collect();
        for r in waiting {
            self.status(&r, 409, "Consumer Deleted", None);
        }
        Ok(json!({"success": true}))
    }

    #[allow(clippy::too_many_arguments)]
    async fn consumer_create(
        &mut self,
        stream: &str,
        subj_name: Option<String>,
        subj_filter: Option<String>,
        durable_api: bool,
        body: &[u8],
        now: u64,
        caller: Option<&Permissions>,
    ) -> Result<Value, ApiError> {
        // The name becomes a file name: checked before anything else
        // (nats-server's order and error codes).
        if let Some(n) = &subj_name {
            check_name(n)?;
        }
        let i = self.slot_idx(stream)?;
        let req = body_json(body)?;
        if let Some(sn) = req.get("stream_name").and_then(Value::as_str) {
            if sn != stream {
                return Err(ApiError::new(
                    400,
                    10056,
                    "stream name in subject does not match request",
                ));
            }
        }
        let mut raw = req.get("config").cloned().unwrap_or(Value::Null);
        if durable_api {
            if let Some(obj) = raw.as_object_mut() {
                obj.entry("durable_name")
                    .or_insert_with(|| json!(subj_name.clone().unwrap_or_default()));
            }
        }
        let cfg = ConsumerConfig::from_json(&raw)?;
        if let Some(n) = &subj_name {
            if cfg.name.as_deref().is_some_and(|c| c != n) {
                return Err(ApiError::new(
                    400,
                    10017,
                    "consumer name in subject does not match durable name in request",
                ));
            }
        }
        if let Some(f) = &subj_filter {
            if cfg.filter_subjects.as_slice() != [f.clone()] {
                return Err(ApiError::new(
                    400,
                    10131,
                    "consumer create request did not match filtered subject from create subject",
                ));
            }
        }
        let name = subj_name.or_else(|| cfg.name.clone()).unwrap_or_else(|| {
            (0..8)
                .map(|_| fastrand::alphanumeric().to_ascii_uppercase())
                .collect()
        });
        check_name(&name)?;
        let action = req.get("action").and_then(Value::as_str).unwrap_or("");
        let slot = self.slots.get(i).ok_or_else(not_found_stream)?;
        let scfg = slot.handle.config();
        for f in &cfg.filter_subjects {
            if !scfg
                .subjects
                .iter()
                .any(|s| crate::subject::filters_overlap(s, f))
            {
                return Err(ApiError::new(
                    400,
                    10093,
                    "consumer filter subject is not a valid subset of the interest subjects",
                ));
            }
        }
        // The caller's deny_subscribe: a filter wholly inside it is
        // refused; what it covers of the rest is excluded.
        let exclude = match caller {
            Some(p) => {
                let explicit = !cfg.filter_subjects.is_empty();
                let filters = if explicit {
                    &cfg.filter_subjects
                } else {
                    &scfg.subjects
                };
                Consumer::exclusions(filters, explicit, p)
                    .map_err(|f| not_authorized(format!("this user may not subscribe to {f:?}")))?
            }
            None => Vec::new(),
        };
        if let Some(old) = slot.consumers.get(&name) {
            if let Some(p) = caller {
                if !old.readable_by(&scfg.subjects, p) {
                    return Err(not_authorized(format!(
                        "consumer {name} can deliver subjects this user may not subscribe to"
                    )));
                }
            }
            if action == "create" && old.cfg != cfg {
                return Err(ApiError::new(400, 10148, "consumer already exists"));
            }
            let same_kind = old.cfg.filter_subjects == cfg.filter_subjects
                && old.cfg.ack_policy == cfg.ack_policy
                && old.cfg.deliver_policy == cfg.deliver_policy
                && old.cfg.durable_name == cfg.durable_name;
            if !same_kind {
                return Err(ApiError::new(400, 10012, "consumer create failed: a consumer of that name exists with another filter, ack or deliver policy; delete it first"));
            }
            let slot = self.slots.get_mut(i).ok_or_else(not_found_stream)?;
            let c = slot
                .consumers
                .get_mut(&name)
                .ok_or_else(not_found_consumer)?;
            if c.cfg != cfg {
                c.cfg = cfg;
                c.dirty = true;
            }
            let slot = self.slots.get(i).ok_or_else(not_found_stream)?;
            let c = slot.consumers.get(&name).ok_or_else(not_found_consumer)?;
            return Ok(self.consumer_json(slot, c));
        }
        if action == "update" {
            return Err(ApiError::new(400, 10149, "consumer does not exist"));
        }
        if slot.consumers.len() >= MAX_CONSUMERS {
            return Err(ApiError::new(
                400,
                10026,
                format!("maximum consumers limit reached ({MAX_CONSUMERS} per stream); delete unused consumers"),
            ));
        }
        if scfg.retention == Retention::WorkQueue {
            if cfg.ack_policy != AckPolicy::Explicit {
                return Err(ApiError::new(
                    400,
                    10098,
                    "workqueue stream requires explicit ack",
                ));
            }
            if cfg.deliver_policy != DeliverPolicy::All {
                return Err(ApiError::new(
                    400,
                    10101,
                    "consumer must be deliver all on workqueue stream",
                ));
            }
            for other in slot.consumers.values() {
                if cfg.filter_subjects.is_empty() || other.cfg.filter_subjects.is_empty() {
                    return Err(ApiError::new(
                        400,
                        10099,
                        "multiple non-filtered consumers not allowed on workqueue stream",
                    ));
                }
                if cfg.overlaps(&other.cfg) {
                    return Err(ApiError::new(
                        400,
                        10100,
                        "filtered consumer not unique on workqueue stream",
                    ));
                }
            }
        }
        let st = slot.handle.state();
        let start = match cfg.deliver_policy {
            DeliverPolicy::All => 1,
            DeliverPolicy::New => st.last_seq + 1,
            DeliverPolicy::ByStartSequence(n) => n,
            DeliverPolicy::Last => match cfg.filter_subjects.as_slice() {
                [] => st.last_seq.max(1),
                [f] => slot
                    .handle
                    .last_by_subject(f)
                    .await
                    .map_err(stream_err)?
                    .map_or(st.last_seq + 1, |m| m.seq),
                many => {
                    let mut best = 0;
                    for f in many {
                        if let Some(m) = slot.handle.last_by_subject(f).await.map_err(stream_err)? {
                            best = best.max(m.seq);
                        }
                    }
                    if best == 0 {
                        st.last_seq + 1
                    } else {
                        best
                    }
                }
            },
        };
        let mut c = Consumer::new(name.clone(), cfg, start, now);
        c.exclude = exclude;
        let slot = self.slots.get_mut(i).ok_or_else(not_found_stream)?;
        slot.consumers.insert(name.clone(), c);
        let slot = self.slots.get(i).ok_or_else(not_found_stream)?;
        let c = slot.consumers.get(&name).ok_or_else(not_found_consumer)?;
        log::info!("jetstream: consumer {name} created on stream {stream}");
        Ok(self.consumer_json(slot, c))
    }

    fn handle_next(&mut self, stream: &str, consumer: &str, m: &Msg, now: u64) {
        let Some(reply) = m.reply.clone() else {
            return;
        };
        let caller = m.publisher.as_ref();
        if !may_answer(caller.map(|p| &**p), &reply) {
            log::debug!(
                "jetstream: pull request ignored: its caller may not subscribe to {reply:?}"
            );
            return;
        }
        let slot = self
            .slots
            .iter_mut()
            .find(|s| s.handle.config().name == stream);
        let Some((c, subjects)) =
            slot.and_then(|s| Some((s.consumers.get_mut(consumer)?, &s.handle.config().subjects)))
        else {
            self.status(&reply, 409, "Consumer Deleted", None);
            return;
        };
        if caller.is_some_and(|p| !c.readable_by(subjects, p)) {
            log::debug!("jetstream: pull from {stream}/{consumer} refused: it can deliver subjects its caller may not subscribe to");
            self.status(&reply, 403, "Not Authorized", None);
            return;
        }
        match PullRequest::parse(&reply, &m.payload, now) {
            Ok(mut r) => {
                r.receiver = caller.cloned();
                c.last_active = now;
                if c.waiting.len() as i64 >= c.cfg.max_waiting {
                    self.status(&reply, 409, "Exceeded MaxWaiting", None);
                } else {
                    c.waiting.push_back(r);
                }
            }
            Err(e) => self.status(&reply, 400, &e.description, None),
        }
    }

    fn handle_ack(&mut self, m: &Msg, now: u64) {
        let Some((stream, consumer, sseq)) = parse_ack_subject(&m.subject) else {
            return;
        };
        let Some(kind) = AckKind::parse(&m.payload) else {
            log::debug!(
                "jetstream: unknown ack {:?}",
                String::from_utf8_lossy(&m.payload)
            );
            return;
        };
        let Some(slot) = self
            .slots
            .iter_mut()
            .find(|s| s.handle.config().name == stream)
        else {
            return;
        };
        let Some(c) = slot.consumers.get_mut(consumer) else {
            return;
        };
        let done = c.ack(sseq, &kind, now);
        let mut sync_reply = None;
        let caller = m.publisher.as_ref();
        // The reply of an ack (a `+NXT` pull, an AckSync answer) is
        // authorized like a pull request (see `handle_next`).
        let reply = m.reply.clone().filter(|r| {
            let ok = may_answer(caller.map(|p| &**p), r);
            if !ok {
                log::debug!("jetstream: no answer to the ack's reply {r:?}: its caller may not subscribe to it");
            }
            ok
        });
        if let (AckKind::Next(batch), Some(reply)) = (&kind, &reply) {
            let readable = caller.is_none_or(|p| c.readable_by(&slot.handle.config().subjects, p));
            match PullRequest::parse(reply, b"", now) {
                Ok(mut r) if readable => {
                    r.batch = *batch;
                    r.receiver = caller.cloned();
                    c.waiting.push_back(r);
                }
                Ok(_) => log::debug!("jetstream: +NXT on {stream}/{consumer} refused: it can deliver subjects its caller may not subscribe to"),
                Err(_) => {}
            }
        } else if let Some(reply) = reply {
            sync_reply = Some(reply);
        }
        if slot.handle.config().retention != Retention::Limits {
            slot.check.extend(done.into_iter().map(|s| (s, s)));
        }
        if let Some(reply) = sync_reply {
            // AckSync: answered after the state is on disk.
            self.reply(&reply, Vec::new());
        }
    }

    /// Timers: ack waits, pull request expiry and heartbeats, idle
    /// ephemeral consumers; new messages and mirror progress for
    /// retention. `cursors` gives the hub-acknowledged local sequence of
    /// mirrored streams.
    pub fn tick(&mut self, now: u64, cursors: &dyn Fn(&str) -> Option<u64>) {
        let mut statuses: Vec<StatusOut> = Vec::new();
        for slot in &mut self.slots {
            let retention = slot.handle.config().retention;
            let mut gone = Vec::new();
            for c in slot.consumers.values_mut() {
                let dropped = c.handle_timeout(now);
                if retention != Retention::Limits {
                    slot.check.extend(dropped.into_iter().map(|s| (s, s)));
                }
                let mut keep = std::collections::VecDeque::new();
                while let Some(mut r) = c.waiting.pop_front() {
                    if r.expires.is_some_and(|e| e <= now) {
                        let left = (
                            r.batch - r.sent.min(r.batch),
                            r.max_bytes.saturating_sub(r.sent_bytes),
                        );
                        statuses.push((r.reply.clone(), 408, "Request Timeout", Some(left)));
                        c.last_active = now;
                        continue;
                    }
                    if r.heartbeat > 0 && r.next_heartbeat <= now {
                        statuses.push((r.reply.clone(), 100, "Idle Heartbeat", None));
                        r.next_heartbeat = now.saturating_add(r.heartbeat);
                    }
                    keep.push_back(r);
                }
                c.waiting = keep;
                if !c.durable()
                    && c.waiting.is_empty()
                    && now >= c.last_active.saturating_add(c.cfg.inactive_threshold_ns)
                {
                    gone.push(c.name.clone());
                }
            }
            for g in gone {
                log::debug!("jetstream: ephemeral consumer {g} removed after inactivity");
                slot.consumers.remove(&g);
                let st = slot.handle.state();
                if retention == Retention::Interest && st.msgs > 0 {
                    slot.check.push((st.first_seq, st.last_seq));
                }
            }
            if retention == Retention::Limits {
                continue;
            }
            let last = slot.handle.state().last_seq;
            if retention == Retention::Interest && last > slot.seen_last {
                slot.check.push((slot.seen_last + 1, last));
            }
            slot.seen_last = slot.seen_last.max(last);
            if slot.mirrored {
                let cur = cursors(&slot.handle.config().name).unwrap_or(0);
                if cur > slot.mirror_cursor {
                    slot.check.push((slot.mirror_cursor + 1, cur));
                    slot.mirror_cursor = cur;
                }
            }
        }
        for (to, code, text, pending) in statuses {
            self.status(&to, code, text, pending);
        }
    }

    /// Hand messages to waiting pull requests.
    pub async fn deliver(&mut self, now: u64) {
        for slot in &mut self.slots {
            let h = slot.handle.clone();
            let stream = h.config().name.clone();
            for c in slot.consumers.values_mut() {
                if c.waiting.is_empty() {
                    continue;
                }
                deliver_consumer(&h, &stream, c, now, &mut self.out).await;
            }
        }
    }

    /// Remove messages that retention no longer keeps (bounded work per call).
    pub async fn apply_retention(&mut self) {
        let mut budget = RETENTION_BUDGET;
        for slot in &mut self.slots {
            if slot.check.is_empty() {
                continue;
            }
            let retention = slot.handle.config().retention;
            if retention == Retention::Limits {
                slot.check.clear();
                continue;
            }
            let mut ranges = std::mem::take(&mut slot.check);
            ranges.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (a, b) in ranges {
                match merged.last_mut() {
                    Some(l) if a <= l.1.saturating_add(1) => l.1 = l.1.max(b),
                    _ => merged.push((a, b)),
                }
            }
            let h = slot.handle.clone();
            let first = h.state().first_seq;
            // Removable messages that start at the stream's first sequence
            // with no kept message among them go in one purge (one fsync);
            // the others one by one.
            let mut prefix = !h.config().deny_purge;
            let mut prefix_seqs: Vec<u64> = Vec::new();
            let mut singles: Vec<u64> = Vec::new();
            let mut left = Vec::new();
            let mut next_expected = first;
            for (a, b) in merged {
                let mut from = a.max(first);
                if from > next_expected {
                    prefix = false;
                }
                while from <= b && budget > 0 {
                    let want = usize::try_from(b - from + 1).unwrap_or(usize::MAX).min(256);
                    let msgs = match h.read(from, want, 4 << 20).await {
                        Ok(m) => m,
                        Err(e) => {
                            // Not retried in a loop: the next ack, mirror
                            // step or restart looks at these again.
                            log::warn!(
                                "jetstream: retention read of {} failed: {e}",
                                h.config().name
                            );
                            from = b.saturating_add(1);
                            break;
                        }
                    };
                    if msgs.is_empty() {
                        from = b + 1;
                        break;
                    }
                    for m in msgs {
                        if m.seq > b {
                            from = b + 1;
                            break;
                        }
                        from = m.seq + 1;
                        budget = budget.saturating_sub(1);
                        if removable(slot, retention, m.seq, &m.subject) {
                            if prefix {
                                prefix_seqs.push(m.seq);
                            } else {
                                singles.push(m.seq);
                            }
                        } else {
                            prefix = false;
                        }
                    }
                }
                if from <= b {
                    left.push((from, b));
                    prefix = false;
                }
                next_expected = b.saturating_add(1);
            }
            if let Some(&last) = prefix_seqs.last() {
                let purge = PurgeRequest {
                    subject: None,
                    upto_seq: Some(last + 1),
                    keep: None,
                };
                if let Err(e) = h.purge(purge).await {
                    log::debug!("jetstream: retention purge refused ({e}); removing one by one");
                    singles.extend(prefix_seqs);
                }
            }
            for seq in singles {
                if let Err(e) = h.ack(seq).await {
                    log::warn!(
                        "jetstream: cannot remove message {seq} of {}: {e}",
                        h.config().name
                    );
                }
            }
            slot.check = left;
        }
    }

    /// Write the files of changed durable consumers (atomically, synced).
    pub fn persist(&mut self) {
        for slot in &mut self.slots {
            for c in slot.consumers.values_mut() {
                if !c.dirty {
                    continue;
                }
                c.dirty = false;
                let (Some(dir), true) = (&slot.dir, c.durable()) else {
                    continue;
                };
                if let Err(e) = crate::state::consumers::save(dir, c) {
                    c.dirty = true;
                    log::error!(
                        "jetstream: cannot save consumer {} in {}: {e}; its acknowledgements may be redelivered after a restart (check the disk)",
                        c.name,
                        dir.display()
                    );
                }
            }
        }
    }

    /// Replies and deliveries of this iteration.
    pub fn take_out(&mut self) -> Vec<Out> {
        std::mem::take(&mut self.out)
    }

    /// Earliest timer (unix ns), and whether retention work is left.
    pub fn next_deadline(&self) -> (Option<u64>, bool) {
        let t = self
            .slots
            .iter()
            .flat_map(|s| s.consumers.values())
            .filter_map(Consumer::next_deadline)
            .min();
        (t, self.slots.iter().any(|s| !s.check.is_empty()))
    }

    /// Whether a consumer of stream `i` waits for messages past what it has.
    fn hungry(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.consumers.values().any(|c| !c.waiting.is_empty()))
    }

    fn any_mirrored(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.mirrored && s.handle.config().retention != Retention::Limits)
    }
}

fn removable(slot: &Slot, retention: Retention, seq: u64, subj: &str) -> bool {
    if slot.mirrored && seq > slot.mirror_cursor {
        return false;
    }
    match retention {
        Retention::Limits => false,
        Retention::Interest => slot.consumers.values().all(|c| c.done_with(seq, subj)),
        Retention::WorkQueue => slot
            .consumers
            .values()
            .any(|c| c.selects(subj) && seq > c.floor && c.processed(seq)),
    }
}

async fn deliver_consumer(
    h: &StreamHandle,
    stream: &str,
    c: &mut Consumer,
    now: u64,
    out: &mut Vec<Out>,
) {
    loop {
        if c.waiting.is_empty() {
            return;
        }
        if let Some(&s) = c.redeliver.iter().next() {
            match h.get(s).await {
                Ok(Some(m)) if !receiver_may_read(c, &m.subject, out) => {}
                Ok(Some(m)) => send(h, stream, c, m, now, out),
                Ok(None) => c.forget(s),
                Err(_) => return,
            }
            continue;
        }
        if !c.may_deliver_new() {
            break;
        }
        let want = c
            .waiting
            .front()
            .map_or(1, |r| r.batch.saturating_sub(r.sent))
            .clamp(1, 256);
        let msgs = match h
            .read(c.delivered_sseq.saturating_add(1), want, 1 << 20)
            .await
        {
            Ok(m) => m,
            Err(_) => return,
        };
        if msgs.is_empty() {
            break;
        }
        for m in msgs {
            if !c.selects(&m.subject) {
                c.skip(m.seq);
                continue;
            }
            if c.waiting.is_empty() || !c.may_deliver_new() {
                break;
            }
            if !receiver_may_read(c, &m.subject, out) {
                break;
            }
            send(h, stream, c, m, now, out);
        }
    }
    // Nothing more to hand out now: no_wait requests end here.
    let mut keep = std::collections::VecDeque::new();
    while let Some(r) = c.waiting.pop_front() {
        if !r.no_wait {
            keep.push_back(r);
            continue;
        }
        let (code, text) = if r.sent == 0 {
            (404, "No Messages")
        } else {
            (408, "Request Timeout")
        };
        let left = (
            r.batch.saturating_sub(r.sent),
            r.max_bytes.saturating_sub(r.sent_bytes),
        );
        out.push((
            r.reply.clone(),
            Msg {
                subject: r.reply.clone(),
                reply: None,
                headers: Some(status_msg(code, text, Some(left))),
                payload: Vec::new(),
                publisher: None,
            },
        ));
    }
    c.waiting = keep;
}

/// The last check per delivery: whether the client of the first waiting
/// pull request may receive a message on `subject`. A request whose client
/// may not is ended with a 403 status (pulls are authorized when they
/// arrive, so this only guards against a consumer that changed since); the
/// message stays for another request.
fn receiver_may_read(c: &mut Consumer, subject: &str, out: &mut Vec<Out>) -> bool {
    let Some(r) = c.waiting.front() else {
        return false;
    };
    if may_read(r.receiver.as_deref(), subject) {
        return true;
    }
    if let Some(r) = c.waiting.pop_front() {
        log::warn!(
            "jetstream: pull request of consumer {} ended: its client may not receive {subject:?}",
            c.name
        );
        out.push((
            r.reply.clone(),
            Msg {
                subject: r.reply,
                reply: None,
                headers: Some(status_msg(403, "Not Authorized", None)),
                payload: Vec::new(),
                publisher: None,
            },
        ));
    }
    false
}

fn send(
    h: &StreamHandle,
    stream: &str,
    c: &mut Consumer,
    m: StoredMessage,
    now: u64,
    out: &mut Vec<Out>,
) {
    let (cseq, n) = c.record_delivery(m.seq, now);
    let pending = h.state().last_seq.saturating_sub(c.delivered_sseq);
    let reply = ack_subject(stream, &c.name, n, m.seq, cseq, m.timestamp, pending);
    let size = m.subject.len() + m.payload.len() + m.headers.as_ref().map_or(0, Vec::len);
    let Some(r) = c.waiting.front_mut() else {
        return;
    };
    r.sent += 1;
    r.sent_bytes += size;
    let to = r.reply.clone();
    if r.sent >= r.batch || (r.max_bytes > 0 && r.sent_bytes >= r.max_bytes) {
        c.waiting.pop_front();
    }
    out.push((
        to,
        Msg {
            subject: m.subject,
            reply: Some(reply),
            headers: m.headers,
            payload: m.payload,
            publisher: None,
        },
    ));
}

fn subscribe(broker: &Broker) -> (u64, Arc<Outbox>) {
    let conn = broker.new_conn_id();
    let outbox = Outbox::new(INBOX_BYTES);
    broker.subscribe_nats(conn, 1, "$JS.API.>".into(), None, outbox.clone());
    broker.subscribe_nats(conn, 2, "$JS.ACK.>".into(), None, outbox.clone());
    (conn, outbox)
}

enum Wake {
    Input,
    Stream,
    Timer,
    Shutdown,
}

/// Run the service until `shutdown` fires. `streams_dir` holds the stream
/// directories; `mirrored` names the streams mirrored to the hub, whose
/// progress `uplink` reports.
///
/// The consumers are loaded and the API subscriptions registered when this
/// is called (before the returned future first runs), so requests sent
/// right after start-up wait in the service's inbox instead of meeting
/// "no responders".
pub fn serve(
    broker: Arc<Broker>,
    streams_dir: PathBuf,
    mirrored: Vec<String>,
    uplink: Option<Arc<UplinkStatus>>,
    shutdown: Receiver<()>,
) -> impl std::future::Future<Output = ()> {
    let api = JsApi::open(broker.streams(), &streams_dir, &mirrored);
    let (conn, outbox) = subscribe(&broker);
    run(api, conn, outbox, broker, uplink, shutdown)
}

async fn run(
    mut api: JsApi,
    mut conn: u64,
    mut outbox: Arc<Outbox>,
    broker: Arc<Broker>,
    uplink: Option<Arc<UplinkStatus>>,
    shutdown: Receiver<()>,
) {
    // One watcher per stream wakes the loop when messages arrive.
    let (wake_tx, wake_rx) = smol::channel::bounded::<()>(1);
    let _watchers: Vec<smol::Task<()>> = broker
        .streams()
        .iter()
        .cloned()
        .map(|h| {
            let tx = wake_tx.clone();
            smol::spawn(async move {
                let mut seen = h.state().last_seq;
                loop {
                    h.wait_for(seen + 1).await;
                    let last = h.state().last_seq;
                    if last <= seen {
                        return; // closed
                    }
                    seen = last;
                    let _ = tx.try_send(());
                }
            })
        })
        .collect();
    let cursors = |name: &str| -> Option<u64> {
        uplink
            .as_ref()?
            .mirrors()
            .into_iter()
            .find(|m| m.stream == name)
            .map(|m| m.cursor)
    };
    loop {
        if shutdown.is_closed() {
            break;
        }
        let now = unix_nanos();
        if outbox.is_slow() {
            log::warn!("jetstream: API requests arrived faster than they were served; some were dropped (clients retry)");
            broker.drop_conn(conn);
            outbox.close();
            (conn, outbox) = subscribe(&broker);
        }
        for (_, m) in outbox.take(1 << 20) {
            api.handle(&m, now).await;
        }
        api.tick(now, &cursors);
        api.deliver(now).await;
        api.apply_retention().await;
        api.persist();
        for (to, m) in api.take_out() {
            broker.route_to(&to, Arc::new(m), std::time::Instant::now());
        }
        if outbox.pending() > 0 {
            continue;
        }
        let (deadline, more_work) = api.next_deadline();
        if more_work {
            smol::future::yield_now().await;
            continue;
        }
        let mut sleep = deadline.map(|d| Duration::from_nanos(d.saturating_sub(unix_nanos())));
        if api.any_mirrored() {
            sleep = Some(sleep.map_or(MIRROR_POLL, |s| s.min(MIRROR_POLL)));
        }
        let hungry = api.hungry()
            || api
                .slots
                .iter()
                .any(|s| s.handle.config().retention == Retention::Interest);
        let wake = async {
            outbox.wait(true).await;
            Wake::Input
        }
        .or(async {
            if hungry {
                let _ = wake_rx.recv().await;
                Wake::Stream
            } else {
                std::future::pending().await
            }
        })
        .or(async {
            match sleep {
                Some(d) => {
                    smol::Timer::after(d).await;
                    Wake::Timer
                }
                None => std::future::pending().await,
            }
        })
        .or(async {
            let _ = shutdown.recv().await;
            Wake::Shutdown
        })
        .await;
        match wake {
            Wake::Shutdown => break,
            Wake::Input | Wake::Stream | Wake::Timer => {}
        }
    }
    api.persist();
    broker.drop_conn(conn);
    outbox.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{Message, StreamConfig};
    use smol::block_on;

    fn scfg(name: &str, subject: &str, retention: Retention) -> StreamConfig {
        StreamConfig {
            retention,
            ..StreamConfig::new(name, &[subject])
        }
    }

    fn open(dir: &Path, c: StreamConfig) -> StreamHandle {
        crate::stream::open(&dir.join(&c.name), c).unwrap().0
    }

    fn req(subject: &str, reply: &str, body: &str) -> Msg {
        Msg {
            subject: subject.into(),
            reply: Some(reply.into()),
            headers: None,
            payload: body.as_bytes().to_vec(),
            publisher: None,
        }
    }

    fn publish(h: &StreamHandle, subject: &str) -> u64 {
        block_on(h.publish(Message {
            subject: subject.into(),
            headers: None,
            payload: b"x".to_vec(),
        }))
        .unwrap()
        .seq
    }

    /// Handle one request and return the JSON answer sent to `r`.
    fn call(api: &mut JsApi, subject: &str, body: &str) -> Value {
        block_on(api.handle(&req(subject, "r", body), 1));
        api.persist();
        let out = api.take_out();
        let (to, m) = out.into_iter().find(|(to, _)| to == "r").unwrap();
        assert_eq!(to, m.subject);
        serde_json::from_slice(&m.payload).unwrap()
    }

    #[test]
    fn subjects_times_and_statuses() {
        assert_eq!(parse_call("$JS.API.INFO"), Call::Info);
        assert_eq!(
            parse_call("$JS.API.STREAM.INFO.S"),
            Call::StreamInfo("S".into())
        );
        assert_eq!(
            parse_call("$JS.API.STREAM.MSG.GET.S"),
            Call::MsgGet("S".into())
        );
        assert_eq!(
            parse_call("$JS.API.CONSUMER.CREATE.S.c.a.b.>"),
            Call::ConsumerCreate {
                stream: "S".into(),
                name: Some("c".into()),
                filter: Some("a.b.>".into()),
                durable_api: false
            }
        );
        assert_eq!(
            parse_call("$JS.API.CONSUMER.DURABLE.CREATE.S.d"),
            Call::ConsumerCreate {
                stream: "S".into(),
                name: Some("d".into()),
                filter: None,
                durable_api: true
            }
        );
        assert_eq!(
            parse_call("$JS.API.CONSUMER.MSG.NEXT.S.c"),
            Call::Next("S".into(), "c".into())
        );
        assert_eq!(parse_call("$JS.API.STREAM.INFO"), Call::Unknown);
        assert_eq!(parse_call("foo"), Call::Unknown);
        assert_eq!(rfc3339(0), "0001-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456789Z"
        );
        assert_eq!(
            rfc3339(951_782_400 * 1_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
        assert_eq!(
            status_msg(408, "Request Timeout", Some((2, 0))),
            b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 2\r\nNats-Pending-Bytes: 0\r\n\r\n"
        );
    }

    #[test]
    fn workqueue_consumer_flow_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(dir.path(), scfg("W", "w.>", Retention::WorkQueue));
        let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[]);
        let v = call(
            &mut api,
            "$JS.API.CONSUMER.CREATE.W.c",
            r#"{"stream_name":"W","config":{"durable_name":"c","ack_policy":"explicit"}}"#,
        );
        assert_eq!(v["name"], "c", "{v}");
        assert_eq!(
            v["type"],
            "io.nats.jetstream.api.v1.consumer_create_response"
        );
        let v = call(
            &mut api,
            "$JS.API.CONSUMER.CREATE.W.d",
            r#"{"stream_name":"W","config":{"durable_name":"d"}}"#,
        );
        assert_eq!(v["error"]["err_code"], 10099, "{v}");
        let v = call(&mut api, "$JS.API.CONSUMER.INFO.W.nope", "");
        assert_eq!(
            (v["error"]["code"].as_u64(), v["error"]["err_code"].as_u64()),
            (Some(404), Some(10014))
        );
        let v = call(&mut api, "$JS.API.STREAM.INFO.X", "");
        assert_eq!(v["error"]["err_code"], 10059);
        publish(&h, "w.1");
        publish(&h, "w.2");
        block_on(api.handle(
            &req(
                "$JS.API.CONSUMER.MSG.NEXT.W.c",
                "inbox",
                r#"{"batch":3,"no_wait":true}"#,
            ),
            10,
        ));
        block_on(api.deliver(10));
        let out = api.take_out();
        assert_eq!(out.len(), 3, "two messages and the end-of-batch status");
        assert!(out.iter().all(|(to, _)| to == "inbox"));
        let acks: Vec<String> = out.iter().filter_map(|(_, m)| m.reply.clone()).collect();
        assert_eq!(acks.len(), 2);
        assert_eq!(parse_ack_subject(&acks[0]), Some(("W", "c", 1)));
        assert!(out[2]
            .1
            .headers
            .as_deref()
            .unwrap()
            .starts_with(b"NATS/1.0 408"));
        block_on(api.handle(&req(&acks[0], "ackr", "+ACK"), 11));
        block_on(api.apply_retention());
        api.persist();
        assert!(api.take_out().iter().any(|(to, _)| to == "ackr"));
        assert_eq!(h.state().msgs, 1, "the acked message left the workqueue");
        // The consumer, reloaded, still owes message 2.
        let again = JsApi::open(std::slice::from_ref(&h), dir.path(), &[]);
        let c = again.slots[0].consumers.get("c").unwrap();
        assert_eq!(c.pending.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(c.delivered_sseq, 2);
        let v = call(&mut api, "$JS.API.CONSUMER.DELETE.W.c", "");
        assert_eq!(v["success"], true);
        assert!(
            JsApi::open(std::slice::from_ref(&h), dir.path(), &[]).slots[0]
                .consumers
                .is_empty()
        );
        block_on(h.close());
    }

    #[test]
    fn pull_expiry_heartbeats_and_ephemeral_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(dir.path(), scfg("L", "l.>", Retention::Limits));
        let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[]);
        // Ephemeral (no name), created at t=1.
        let v = call(
            &mut api,
            "$JS.API.CONSUMER.CREATE.L",
            r#"{"stream_name":"L","config":{"ack_policy":"explicit"}}"#,
        );
        let name = v["name"].as_str().unwrap().to_string();
        assert_eq!(v["config"]["inactive_threshold"], 5_000_000_000u64);
        let next = format!("$JS.API.CONSUMER.MSG.NEXT.L.{name}");
        block_on(api.handle(
            &req(
                &next,
                "inbox",
                r#"{"batch":2,"expires":1000,"idle_heartbeat":400}"#,
            ),
            10,
        ));
        block_on(api.deliver(10));
        assert!(api.take_out().is_empty(), "nothing to deliver yet");
        assert_eq!(api.next_deadline().0, Some(410));
        api.tick(410, &|_| None);
        let out = api.take_out();
        assert!(out[0]
            .1
            .headers
            .as_deref()
            .unwrap()
            .starts_with(b"NATS/1.0 100 Idle Heartbeat"));
        api.tick(1010, &|_| None);
        let out = api.take_out();
        assert!(out[0]
            .1
            .headers
            .as_deref()
            .unwrap()
            .starts_with(b"NATS/1.0 408 Request Timeout"));
        // Idle for the inactive threshold: removed.
        api.tick(1010 + 5_000_000_000, &|_| None);
        assert!(api.slots[0].consumers.is_empty());
        let v = call(&mut api, &next.replace("MSG.NEXT", "INFO"), "");
        assert_eq!(v["error"]["err_code"], 10014);
        block_on(h.close());
    }

    #[test]
    fn interest_retention_waits_for_the_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), scfg("M", "m.>", Retention::Interest));
        let p = open(dir.path(), scfg("P", "p.>", Retention::Interest));
        let mut api = JsApi::open(&[m.clone(), p.clone()], dir.path(), &["M".to_string()]);
        publish(&m, "m.1");
        publish(&m, "m.2");
        publish(&p, "p.1");
        let cursor = std::cell::Cell::new(None);
        let run = |api: &mut JsApi| {
            api.tick(5, &|_| cursor.get());
            block_on(api.apply_retention());
        };
        run(&mut api);
        assert_eq!(p.state().msgs, 0, "no consumer, not mirrored: removed");
        assert_eq!(m.state().msgs, 2, "not yet on the hub: kept");
        cursor.set(Some(1));
        run(&mut api);
        assert_eq!(m.state().msgs, 1);
        assert_eq!(m.state().first_seq, 2);
        cursor.set(Some(2));
        run(&mut api);
        assert_eq!(m.state().msgs, 0);
        block_on(m.close());
        block_on(p.close());
    }

    fn dave() -> Arc<Permissions> {
        Arc::new(Permissions {
            deny_publish: vec!["secret.>".into()],
            deny_subscribe: vec!["secret.>".into()],
            ..Permissions::default()
        })
    }

    /// Like [`call`], for a caller with permissions `who`; `None` when
    /// nothing was answered.
    fn call_as(
        api: &mut JsApi,
        subject: &str,
        body: &str,
        who: &Arc<Permissions>,
    ) -> Option<Value> {
        let mut m = req(subject, "r", body);
        m.publisher = Some(who.clone());
        block_on(api.handle(&m, 1));
        api.persist();
        let out = api.take_out();
        let (_, m) = out.into_iter().find(|(to, _)| to == "r")?;
        Some(serde_json::from_slice(&m.payload).unwrap())
    }

    /// A pull of up to `batch` messages (no_wait) by `who`: the subjects
    /// delivered, and the status line that ended it.
    fn pull_as(
        api: &mut JsApi,
        stream: &str,
        consumer: &str,
        batch: usize,
        who: Option<&Arc<Permissions>>,
    ) -> (Vec<String>, String) {
        let mut m = req(
            &format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
            "inbox",
            &format!(r#"{{"batch":{batch},"no_wait":true}}"#),
        );
        m.publisher = who.cloned();
        block_on(api.handle(&m, 10));
        block_on(api.deliver(10));
        let out = api.take_out();
        let subjects = out
            .iter()
            .filter(|(_, m)| m.headers.is_none())
            .map(|(_, m)| m.subject.clone())
            .collect();
        let status = out
            .iter()
            .filter_map(|(_, m)| m.headers.as_deref())
            .map(|h| {
                String::from_utf8_lossy(h)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .next()
            .unwrap_or_default();
        (subjects, status)
    }

    #[test]
    fn names_that_are_paths_touch_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(dir.path(), scfg("A", "a.>", Retention::Limits));
        let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[]);
        let victim_dir = tempfile::Builder::new().prefix("victim").tempdir().unwrap();
        let victim = victim_dir.path().join("victim.json");
        std::fs::write(&victim, b"{}").unwrap();
        let abs = victim.with_extension("");
        let abs = abs.to_str().unwrap();
        let v = call(
            &mut api,
            &format!("$JS.API.CONSUMER.CREATE.A.{abs}"),
            r#"{"stream_name":"A","config":{"ack_policy":"explicit"}}"#,
        );
        assert_eq!(v["error"]["err_code"], 10127, "{v}");
        let v = call(&mut api, &format!("$JS.API.CONSUMER.DELETE.A.{abs}"), "");
        assert_eq!(v["error"]["err_code"], 10127, "{v}");
        let v = call(&mut api, &format!("$JS.API.CONSUMER.INFO.A.{abs}"), "");
        assert_eq!(v["error"]["err_code"], 10127, "{v}");
        assert!(victim.exists());
        // Names from the request body.
        for (name, code) in [("..", 10103), ("a/../b", 10127), ("a\u{0}b", 10103)] {
            let body = json!({"stream_name": "A", "config": {"durable_name": name}});
            let v = call(&mut api, "$JS.API.CONSUMER.CREATE.A", &body.to_string());
            assert_eq!(v["error"]["err_code"], code, "{name:?}: {v}");
        }
        let long = "x".repeat(crate::names::MAX_NAME_LEN + 1);
        let v = call(
            &mut api,
            &format!("$JS.API.CONSUMER.DURABLE.CREATE.A.{long}"),
            r#"{"stream_name":"A","config":{}}"#,
        );
        assert_eq!(v["error"]["err_code"], 10102, "{v}");
        assert!(api.slots[0].consumers.is_empty());
        // Nothing was written outside the stream's consumers directory.
        assert_eq!(std::fs::read_dir(victim_dir.path()).unwrap().count(), 1);
        block_on(h.close());
    }

    #[test]
    fn deny_subscribe_applies_to_reads_and_consumers() {
        let dir = tempfile::tempdir().unwrap();
        let h = open(dir.path(), scfg("M", ">", Retention::Limits));
        let mut api = JsApi::open(std::slice::from_ref(&h), dir.path(), &[]);
        let dave = dave();
        publish(&h, "a.1");
        publish(&h, "secret.1");
        publish(&h, "a.2");
        // MSG.GET
        let get = |api: &mut JsApi, body: &str| {
            call_as(api, "$JS.API.STREAM.MSG.GET.M", body, &dave).unwrap()
        };
        assert_eq!(get(&mut api, r#"{"seq":1}"#)["message"]["subject"], "a.1");
        let v = get(&mut api, r#"{"seq":2}"#);
        assert_eq!(
            (v["error"]["code"].as_u64(), v["error"]["err_code"].as_u64()),
            (Some(403), Some(u64::from(NOT_AUTHORIZED))),
            "{v}"
        );
        assert!(v.to_string().find("secret.1").is_none(), "{v}");
        let v = get(&mut api, r#"{"last_by_subj":"secret.1"}"#);
        assert_eq!(v["error"]["code"], 403, "{v}");
        let v = get(&mut api, r#"{"next_by_subj":">","seq":2}"#);
        assert_eq!(v["error"]["code"], 403, "{v}");
        let v = call(&mut api, "$JS.API.STREAM.MSG.GET.M", r#"{"seq":2}"#);
        assert_eq!(v["message"]["subject"], "secret.1", "unrestricted: {v}");
        let v = call_as(
            &mut api,
            "$JS.API.STREAM.INFO.M",
            r#"{"subjects_filter":">"}"#,
            &dave,
        )
        .unwrap();
        let subjects = v["state"]["subjects"].as_object().unwrap();
        assert_eq!(subjects.len(), 2, "{v}");
        assert!(!subjects.contains_key("secret.1"));
        // An answer goes only where the caller may subscribe.
        let mut m = req("$JS.API.STREAM.MSG.GET.M", "secret.inbox", r#"{"seq":1}"#);
        m.publisher = Some(dave.clone());
        block_on(api.handle(&m, 1));
        assert!(api.take_out().is_empty(), "no answer to secret.inbox");

        // Consumers: a filter inside the deny list is refused ...
        let v = call_as(
            &mut api,
            "$JS.API.CONSUMER.CREATE.M",
            r#"{"stream_name":"M","config":{"durable_name":"s","filter_subject":"secret.>"}}"#,
            &dave,
        )
        .unwrap();
        assert_eq!(v["error"]["code"], 403, "{v}");
        // ... an unfiltered one excludes it, durably.
        let v = call_as(
            &mut api,
            "$JS.API.CONSUMER.CREATE.M",
            r#"{"stream_name":"M","config":{"durable_name":"dv"}}"#,
            &dave,
        )
        .unwrap();
        assert_eq!(v["name"], "dv", "{v}");
        let (got, _) = pull_as(&mut api, "M", "dv", 5, Some(&dave));
        assert_eq!(got, vec!["a.1", "a.2"]);
        let again = JsApi::open(std::slice::from_ref(&h), dir.path(), &[]);
        assert_eq!(again.slots[0].consumers["dv"].exclude, vec!["secret.>"]);
        // A consumer that can deliver secret.> is not for dave to pull ...
        let v = call(
            &mut api,
            "$JS.API.CONSUMER.CREATE.M",
            r#"{"stream_name":"M","config":{"durable_name":"adm"}}"#,
        );
        assert_eq!(v["name"], "adm", "{v}");
        let (got, status) = pull_as(&mut api, "M", "adm", 5, Some(&dave));
        assert!(got.is_empty(), "{got:?}");
        assert!(status.starts_with("NATS/1.0 403"), "{status}");
        // ... nor to take over by creating it again ...
        let v = call_as(
            &mut api,
            "$JS.API.CONSUMER.CREATE.M",
            r#"{"stream_name":"M","config":{"durable_name":"adm"}}"#,
            &dave,
        )
        .unwrap();
        assert_eq!(v["error"]["code"], 403, "{v}");
        // ... and its messages are still all there for its owner.
        let (got, _) = pull_as(&mut api, "M", "adm", 5, None);
        assert_eq!(got, vec!["a.1", "secret.1", "a.2"]);
        // The last check per delivery: a pull request whose client may
        // not receive the next message ends (the message stays).
        let mut r = PullRequest::parse("inbox", b"", 10).unwrap();
        r.receiver = Some(dave.clone());
        let c = api.slots[0].consumers.get_mut("adm").unwrap();
        c.redeliver.insert(2);
        c.waiting.push_back(r);
        block_on(api.deliver(10));
        let out = api.take_out();
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0]
            .1
            .headers
            .as_deref()
            .unwrap()
            .starts_with(b"NATS/1.0 403"));
        assert!(api.slots[0].consumers["adm"].redeliver.contains(&2));
        block_on(h.close());
    }
}
