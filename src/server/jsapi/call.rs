//! One API call: the `$JS.API.` subject parsed into a [`Call`], the
//! caller's right to the reply subject, the dispatch to the handler and
//! the answer (`io.nats.jetstream.api.v1.<kind>` JSON or a status
//! message); the API errors shared by the handlers.

use std::sync::Arc;

use serde_json::{json, Value};

use super::direct::DIRECT_PREFIX;
use super::render::status_msg;
use super::JsApi;
use crate::auth::Permissions;
use crate::router::Msg;
use crate::stream::consumer::ApiError;
use crate::stream::StreamError;

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
    /// `DIRECT.GET.<stream>` and `DIRECT.GET.<stream>.<key>`.
    DirectGet(String, Option<String>),
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
        ["DIRECT", "GET", _] => Call::DirectGet(s(2), None),
        ["DIRECT", "GET", _, ..] => {
            Call::DirectGet(s(2), Some(t.get(3..).unwrap_or_default().join(".")))
        }
        _ => Call::Unknown,
    }
}

pub(super) fn body_json(body: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::new(400, 10025, "invalid JSON"))?;
    if text.trim().is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_str(text).map_err(|_| ApiError::new(400, 10025, "invalid JSON"))
}

/// A stream error as an API error.
pub(super) fn stream_err(e: StreamError) -> ApiError {
    let code = match &e {
        StreamError::Io(_) | StreamError::Closed => 500,
        _ => 400,
    };
    ApiError::new(code, e.code().unwrap_or(10003), e.to_string())
}

pub(super) fn not_found_stream() -> ApiError {
    ApiError::new(404, 10059, "stream not found")
}

pub(super) fn not_found_consumer() -> ApiError {
    ApiError::new(404, 10014, "consumer not found")
}

/// frond's error code for an API call its caller's subscribe permissions
/// do not allow (JetStream has none: nats-server does not check them).
pub const NOT_AUTHORIZED: u16 = 10403;

pub(super) fn not_authorized(why: impl std::fmt::Display) -> ApiError {
    ApiError::new(403, NOT_AUTHORIZED, format!("not authorized: {why}"))
}

/// Whether a caller with `perms` (`None`: unrestricted) may receive a
/// stored message on `subject` (its `deny_subscribe`, see the module doc).
pub(super) fn may_read(perms: Option<&Permissions>, subject: &str) -> bool {
    perms.is_none_or(|p| p.may_deliver(subject))
}

/// Whether a caller with `perms` may subscribe to `reply`, where its
/// answer would go.
pub(super) fn may_answer(perms: Option<&Permissions>, reply: &str) -> bool {
    perms.is_none_or(|p| p.can_subscribe(reply))
}

impl JsApi {
    /// Handle one message routed to the service.
    pub async fn handle(&mut self, m: &Msg, now: u64) {
        if !m.subject.starts_with(DIRECT_PREFIX) {
            // Anything else is handled after the direct gets before it.
            self.finish_direct().await;
        }
        if m.subject.starts_with("$JS.FC.") {
            self.handle_flow(&m.subject, now);
            return;
        }
        if m.subject.starts_with("$JS.ACK.") {
            self.handle_ack(m, now);
            return;
        }
        let call = parse_call(&m.subject);
        if let Call::Next(stream, consumer) = &call {
            self.handle_next(stream, consumer, m, now);
            return;
        }
        if let Call::DirectGet(stream, key) = &call {
            self.handle_direct(stream, key.as_deref(), m).await;
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
        let (kind, res) = self.api(call, &m.payload, now, m.publisher.as_ref()).await;
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

    pub(super) fn reply(&mut self, to: &str, payload: Vec<u8>) {
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

    pub(super) fn status(
        &mut self,
        to: &str,
        code: u16,
        text: &str,
        pending: Option<(usize, usize)>,
    ) {
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

    pub(super) async fn api(
        &mut self,
        call: Call,
        body: &[u8],
        now: u64,
        user: Option<&Arc<Permissions>>,
    ) -> (&'static str, Result<Value, ApiError>) {
        let caller = user.map(|p| &**p);
        match call {
            Call::Info => ("account_info_response", Ok(self.account_info())),
            Call::StreamNames => ("stream_names_response", self.stream_names(body)),
            Call::StreamList => ("stream_list_response", self.stream_list(body, now).await),
            Call::StreamInfo(s) => (
                "stream_info_response",
                self.stream_info(&s, body, caller, now).await,
            ),
            Call::StreamCreate(s) => (
                "stream_create_response",
                self.stream_create(&s, body, now).await,
            ),
            Call::StreamUpdate(s) => (
                "stream_update_response",
                self.stream_update(&s, body, now).await,
            ),
            Call::StreamDelete(s) => ("stream_delete_response", self.stream_delete(&s).await),
            Call::MsgGet(s) => (
                "stream_msg_get_response",
                self.msg_get(&s, body, caller).await,
            ),
            Call::MsgDelete(s) => (
                "stream_msg_delete_response",
                self.msg_delete(&s, body).await,
            ),
            Call::Purge(s) => ("stream_purge_response", self.purge(&s, body).await),
            Call::ConsumerCreate {
                stream,
                name,
                filter,
                durable_api,
            } => (
                "consumer_create_response",
                self.consumer_create(&stream, name, filter, durable_api, body, now, user)
                    .await,
            ),
            Call::ConsumerInfo(s, c) => (
                "consumer_info_response",
                self.consumer_info(&s, &c, now).await,
            ),
            Call::ConsumerDelete(s, c) => {
                ("consumer_delete_response", self.consumer_delete(&s, &c))
            }
            Call::ConsumerNames(s) => ("consumer_names_response", self.consumer_names(&s, body)),
            Call::ConsumerList(s) => (
                "consumer_list_response",
                self.consumer_list(&s, body, now).await,
            ),
            Call::Next(..) | Call::DirectGet(..) | Call::Unknown => (
                "error_response",
                Err(ApiError::bad_request("unknown JetStream API request")),
            ),
        }
    }
}
