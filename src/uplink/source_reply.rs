//! Parsing of what source-down reads from the hub (part of
//! [`super::Source`]'s module, split for size): direct-get replies, the
//! origin header of stored copies, the store subjects a source may write,
//! the `STREAM.INFO` answer, the events to log.
//!
//! Invariant: the headers the server sets on a direct-get reply
//! (`Nats-Sequence`, `Nats-Subject`, `Nats-Time-Stamp`,
//! `Nats-Num-Pending`) are read at their LAST occurrence: nats-server
//! appends them after the stored message's own headers, which may carry
//! the same names (a RePublish, a forger).

use std::fmt;

use serde::Deserialize;

use super::ORIGIN_HEADER;
use crate::wire::nats::headers::HeaderBlock;

/// Headers removed from a copy: those a direct get adds, and the
/// expectations of the hub publish (the local stream would check them
/// against itself and refuse the copy).
const STRIPPED_HEADERS: [&str; 10] = [
    "Nats-Stream",
    "Nats-Subject",
    "Nats-Sequence",
    "Nats-Time-Stamp",
    "Nats-Num-Pending",
    "Nats-Last-Sequence",
    "Nats-Expected-Stream",
    "Nats-Expected-Last-Sequence",
    "Nats-Expected-Last-Subject-Sequence",
    "Nats-Expected-Last-Msg-Id",
];

/// Whether `subj` is a Key/Value or Object Store subject of the local
/// stream `stream` (`$KV.<b>.…` of `KV_<b>`, `$O.<b>.…` of `OBJ_<b>`):
/// the one part of the `$` namespace a source may write, so a bucket
/// sourced down from the hub works as a local bucket.
pub fn store_subject_of(stream: &str, subj: &str) -> bool {
    let owned = |prefix: &str, name: Option<&str>| {
        name.is_some_and(|b| {
            !b.is_empty()
                && subj
                    .strip_prefix(prefix)
                    .and_then(|r| r.strip_prefix(b))
                    .is_some_and(|r| r.starts_with('.'))
        })
    };
    owned("$KV.", stream.strip_prefix("KV_")) || owned("$O.", stream.strip_prefix("OBJ_"))
}

/// One reply of a direct get, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A stored message: hub seq, subject, headers without the direct-get
    /// ones (`None` if there are none left), payload, pending after it,
    /// its `Nats-Time-Stamp`.
    Msg {
        seq: u64,
        subject: String,
        headers: Option<HeaderBlock>,
        payload: Vec<u8>,
        pending: Option<u64>,
        time: Option<String>,
    },
    /// `204 EOB`: the batch is complete.
    End { pending: Option<u64> },
    /// `404`: nothing at or after the sequence.
    NotFound,
    /// Any other status (`408` bad request, `503` no responders…), or a
    /// reply that cannot be understood.
    Fail(String),
}

/// Parse one direct-get reply.
pub fn parse_reply(headers: Option<&[u8]>, payload: &[u8]) -> Reply {
    let Some(h) = headers else {
        return Reply::Fail("a direct get reply without headers".into());
    };
    let mut hb = match HeaderBlock::parse(h) {
        Ok(hb) => hb,
        Err(e) => return Reply::Fail(format!("unreadable direct get reply: {}", e.0)),
    };
    // The server appends these after the stored message's own headers,
    // which may carry the same names (a RePublish, a forger): the last
    // occurrence is the server's.
    let pending = hb
        .get_last("Nats-Num-Pending")
        .and_then(|v| v.trim().parse().ok());
    match hb.status {
        Some(204) => return Reply::End { pending },
        Some(404) => return Reply::NotFound,
        Some(503) => {
            return Reply::Fail(
                "no responders for the direct get (is allow_direct set on the hub stream? does it have a leader?)".into(),
            )
        }
        Some(408) => {
            return Reply::Fail(format!(
                "the hub refused the batched direct get ({}); nats-server 2.11 or later is needed",
                hb.description
            ))
        }
        Some(code) => return Reply::Fail(format!("direct get failed: {code} {}", hb.description)),
        None => {}
    }
    let seq = hb
        .get_last("Nats-Sequence")
        .and_then(|v| v.trim().parse::<u64>().ok());
    let subject = hb.get_last("Nats-Subject").map(str::to_string);
    let time = hb.get_last("Nats-Time-Stamp").map(|t| t.trim().to_string());
    let (Some(seq), Some(subject)) = (seq, subject) else {
        return Reply::Fail("a direct get reply without Nats-Sequence or Nats-Subject".into());
    };
    for k in STRIPPED_HEADERS {
        hb.remove(k);
    }
    Reply::Msg {
        seq,
        subject,
        headers: (!hb.entries.is_empty()).then_some(hb),
        payload: payload.to_vec(),
        pending,
        time,
    }
}

/// The hub sequence a stored copy came from, if it came from hub stream
/// `from` (its [`ORIGIN_HEADER`]).
pub fn origin_of(headers: Option<&[u8]>, from: &str) -> Option<u64> {
    let hb = HeaderBlock::parse(headers?).ok()?;
    let v = hb.get(ORIGIN_HEADER)?;
    let mut it = v.split_ascii_whitespace();
    if it.next()? != from {
        return None;
    }
    it.next()?.parse().ok()
}

/// Things worth logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The hub stream was recreated: another `created`, or (only while
    /// `created` is not known yet) a last sequence below the cursor.
    Recreated {
        old_created: String,
        created: String,
        old_seq: u64,
        last_seq: u64,
    },
    /// A message was not stored: (hub seq, subject, why).
    Skipped(u64, String, &'static str),
    /// Something failed; retried.
    Error(String),
    /// The error state is over.
    Recovered,
}

impl Event {
    pub fn level(&self) -> log::Level {
        match self {
            Event::Recovered => log::Level::Info,
            Event::Error(_) => log::Level::Warn,
            Event::Recreated { .. } | Event::Skipped(..) => log::Level::Warn,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Recreated { old_created, created, old_seq, last_seq } => write!(
                f,
                "the hub stream was recreated (created {old_created:?}, now {created:?}; cursor was {old_seq}, the stream's last sequence is {last_seq}): copying the new stream from its first message"
            ),
            Event::Skipped(seq, subj, why) => write!(f, "hub message {seq} ({subj}) not stored: {why}"),
            Event::Error(e) => write!(f, "{e}"),
            Event::Recovered => write!(f, "reading the hub stream again"),
        }
    }
}

/// The parts of a `STREAM.INFO` answer used here.
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub(super) struct InfoReply {
    pub(super) config: Option<InfoConfig>,
    pub(super) created: String,
    pub(super) state: InfoState,
    pub(super) error: Option<ApiError>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub(super) struct InfoConfig {
    pub(super) subjects: Vec<String>,
    pub(super) allow_direct: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub(super) struct InfoState {
    pub(super) last_seq: u64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub(super) struct ApiError {
    pub(super) code: u64,
    pub(super) err_code: u64,
    pub(super) description: String,
}
