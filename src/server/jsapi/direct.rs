//! Direct get: `$JS.API.DIRECT.GET.<stream>` with a JSON body, and
//! `$JS.API.DIRECT.GET.<stream>.<subject>` (the last message of that
//! subject, what KV `get` uses), answered as nats-server 2.12 answers them:
//! the stored message itself, its headers extended with `Nats-Stream`,
//! `Nats-Subject`, `Nats-Sequence` and `Nats-Time-Stamp` (plus
//! `Nats-Num-Pending` and `Nats-Last-Sequence` in a batch or `multi_last`
//! answer, which ends with a `204 EOB` status message), or a status message
//! alone: `404 Message Not Found`, `404 No Results`, `408 Empty Request`,
//! `408 Malformed Request`, `408 Bad Request`, `413 Too Many Results`.
//!
//! Owns: the parsing and validation of a request ([`parse_body`],
//! [`parse_key`]), the building of its answer from a stream
//! ([`answer`]), and the single-message gets in flight together
//! ([`Pending`]: a KV client's pipelined `get`s cost one owner-thread
//! round trip per burst, not one each).
//!
//! Invariants:
//! - Only a stream with `allow_direct` answers; for any other name the
//!   requester gets `503` (no responders), as from nats-server, where such
//!   a stream does not subscribe to the subject at all.
//! - Authorization is STREAM.MSG.GET's (see the module doc of
//!   [`crate::server::jsapi`]): nothing is sent to a reply subject the
//!   caller may not subscribe to; a filter wholly inside the caller's
//!   `deny_subscribe`, or a single message on a denied subject, answers
//!   `403 Not Authorized`; in a batch or `multi_last` answer denied
//!   messages are left out (still counted in `Nats-Num-Pending`).
//! - Bounded: an answer stops once its stored bytes reach `max_bytes`
//!   (nats-server's rule) and never holds more than [`DIRECT_MAX_BYTES`]
//!   of messages and headers, whatever `max_bytes` and `batch` say;
//!   `multi_last` answers at most [`MULTI_MAX`] subjects (else 413);
//!   at most [`DIRECT_PIPELINE`] single-message answers are pending, and
//!   only while the largest each may be (its stream's `max_msg_size`, and
//!   never more than the stream's bytes) adds up to at most
//!   [`super::ANSWER_BUDGET`] (one at least): a burst of gets on a stream
//!   of large messages is not held all at once.
//! - Read-your-writes: a get is read from the stream's owner thread,
//!   which acknowledges a publish only after applying it, so a get sent
//!   after an acknowledged put (from any connection) sees it.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use serde_json::Value;

use super::call::{may_answer, may_read};
use super::render::rfc3339;
use super::JsApi;
use crate::auth::Permissions;
use crate::router::Msg;
use crate::stream::{StoredMessage, StreamError, StreamHandle};

/// Bytes of one direct get answer (headers and payloads), at most.
pub const DIRECT_MAX_BYTES: usize = 8 << 20;
/// Subjects a `multi_last` request may answer (nats-server's limit).
pub const MULTI_MAX: usize = 1024;
/// Single-message direct gets answered together, at most (each answer is
/// one stored message, so [`Pending`] holds at most this many).
pub const DIRECT_PIPELINE: usize = 64;
/// Bytes an answer adds to its stored message, about: the `Nats-*`
/// headers and the reply subject.
const ANSWER_OVERHEAD: usize = 1024;
/// Subjects of direct gets (they may join [`Pending`]).
pub const DIRECT_PREFIX: &str = "$JS.API.DIRECT.GET.";

type Answer = (String, Vec<Part>);
type AnswerFut = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// Single-message direct gets (no `batch`, `multi_last` or `start_time`)
/// accepted but not yet answered, at most [`DIRECT_PIPELINE`]. Any other
/// API call first answers them ([`JsApi::finish_direct`]), so a call sees
/// the effects of the gets before it, as when each was answered at once.
/// (In a mutex only to make the service `Sync`: reached only through
/// `&mut`, never locked.)
#[derive(Default)]
pub struct Pending {
    futs: std::sync::Mutex<Vec<AnswerFut>>,
    /// The most bytes the pending answers may come to ([`answer_bound`]).
    bound: usize,
}

impl Pending {
    pub(super) fn futs(&mut self) -> &mut Vec<AnswerFut> {
        self.futs.get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

/// The most bytes a single-message answer from `h` may take: its
/// `max_msg_size` if set, and never more than all the stream holds.
fn answer_bound(h: &StreamHandle) -> usize {
    let held = h.state().bytes;
    let max = match h.config().max_msg_size {
        0 => held,
        m => m.min(held),
    };
    usize::try_from(max)
        .unwrap_or(usize::MAX)
        .saturating_add(ANSWER_OVERHEAD)
}

/// Runs `futs` concurrently; their outputs in the order of `futs`.
async fn join_all(mut futs: Vec<AnswerFut>) -> Vec<Answer> {
    let mut done: Vec<Option<Answer>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut ready = true;
        for (f, d) in futs.iter_mut().zip(done.iter_mut()) {
            if d.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *d = Some(v),
                    Poll::Pending => ready = false,
                }
            }
        }
        if ready {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

/// A parsed direct get request (nats-server's `JSApiMsgGetRequest`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Req {
    pub seq: u64,
    pub last_by_subj: Option<String>,
    pub next_by_subj: Option<String>,
    pub batch: usize,
    pub max_bytes: usize,
    /// Unix ns.
    pub start_time: Option<u64>,
    pub multi_last: Vec<String>,
    pub up_to_seq: u64,
    /// Unix ns.
    pub up_to_time: Option<u64>,
    pub no_hdr: bool,
}

/// A status-only answer: code and text.
pub type Status = (u16, &'static str);

const EMPTY: Status = (408, "Empty Request");
const MALFORMED: Status = (408, "Malformed Request");
const BAD: Status = (408, "Bad Request");
const NOT_FOUND: Status = (404, "Message Not Found");
const NO_RESULTS: Status = (404, "No Results");
const FORBIDDEN: Status = (403, "Not Authorized");

/// One message of an answer: (header block or none, payload).
pub type Part = (Option<Vec<u8>>, Vec<u8>);

fn fields(body: &[u8]) -> Result<Req, Status> {
    let v: Value = serde_json::from_slice(body).map_err(|_| MALFORMED)?;
    let o = v.as_object().ok_or(MALFORMED)?;
    let num = |k: &str| match o.get(k) {
        None | Some(Value::Null) => Ok(0),
        Some(n) => n.as_u64().ok_or(MALFORMED),
    };
    let text = |k: &str| match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone()).filter(|s| !s.is_empty())),
        Some(_) => Err(MALFORMED),
    };
    let time = |k: &str| match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_rfc3339(s).map(Some).ok_or(MALFORMED),
        Some(_) => Err(MALFORMED),
    };
    let multi_last = match o.get("multi_last") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or(MALFORMED))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(MALFORMED),
    };
    let usize_of = |n: u64| usize::try_from(n).map_err(|_| MALFORMED);
    Ok(Req {
        seq: num("seq")?,
        last_by_subj: text("last_by_subj")?,
        next_by_subj: text("next_by_subj")?,
        batch: usize_of(num("batch")?)?,
        max_bytes: usize_of(num("max_bytes")?)?,
        start_time: time("start_time")?,
        multi_last,
        up_to_seq: num("up_to_seq")?,
        up_to_time: time("up_to_time")?,
        no_hdr: o.get("no_hdr").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// The request of `$JS.API.DIRECT.GET.<stream>`: its JSON body, checked
/// as nats-server checks it.
pub fn parse_body(body: &[u8]) -> Result<Req, Status> {
    if body.is_empty() {
        return Err(EMPTY);
    }
    let r = fields(body)?;
    if r.seq == 0
        && r.last_by_subj.is_none()
        && r.next_by_subj.is_none()
        && r.multi_last.is_empty()
        && r.start_time.is_none()
    {
        return Err(EMPTY);
    }
    let (last, next) = (r.last_by_subj.is_some(), r.next_by_subj.is_some());
    let multi = !r.multi_last.is_empty();
    if (r.seq > 0 && (last || r.start_time.is_some()))
        || (r.start_time.is_some() && last)
        || (last && (next || r.batch > 0 || multi))
        || (next && multi)
        || (r.up_to_seq > 0 && r.up_to_time.is_some())
    {
        return Err(BAD);
    }
    Ok(r)
}

/// The request of `$JS.API.DIRECT.GET.<stream>.<key>`: the last message
/// of `key`; a body may only carry the options that make sense here.
pub fn parse_key(key: &str, body: &[u8]) -> Result<Req, Status> {
    let mut r = if body.is_empty() {
        Req::default()
    } else {
        fields(body)?
    };
    if key.is_empty()
        || r.last_by_subj.is_some()
        || r.next_by_subj.is_some()
        || !r.multi_last.is_empty()
        || r.seq != 0
        || r.batch != 0
        || r.start_time.is_some()
        || r.up_to_seq != 0
        || r.up_to_time.is_some()
    {
        return Err(BAD);
    }
    r.last_by_subj = Some(key.to_string());
    Ok(r)
}

/// A unix time in ns from RFC 3339 (`2026-12-01T08:00:00.5+01:00`).
pub fn parse_rfc3339(t: &str) -> Option<u64> {
    let b = t.as_bytes();
    let n = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = t.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let (y, mo, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (h, mi, s) = (n(11..13)?, n(14..16)?, n(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = t.get(start..i)?;
        if digits.is_empty() {
            return None;
        }
        for (k, c) in digits.bytes().take(9).enumerate() {
            nanos += i64::from(c - b'0') * 10i64.pow(8 - k as u32);
        }
    }
    let offset = match t.get(i..)? {
        "Z" | "z" => 0,
        // Bytes, not string slices: a multi-byte character from the peer
        // must not panic (the release build aborts on panic).
        o if o.len() == 6 && matches!(o.as_bytes()[0], b'+' | b'-') && o.as_bytes()[3] == b':' => {
            let secs = n(i + 1..i + 3)? * 3600 + n(i + 4..i + 6)? * 60;
            if o.starts_with('-') {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    // Days from civil (H. Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s - offset;
    u64::try_from(secs.checked_mul(1_000_000_000)?.checked_add(nanos)?).ok()
}

/// Go's `time.RFC3339Nano` (trailing zeros of the fraction dropped), as
/// nats-server writes `Nats-Time-Stamp`.
pub fn rfc3339_nano(ns: u64) -> String {
    let full = rfc3339(ns);
    match full.split_once('.') {
        Some((head, frac)) => {
            let digits = frac.trim_end_matches('Z').trim_end_matches('0');
            if digits.is_empty() {
                format!("{head}Z")
            } else {
                format!("{head}.{digits}Z")
            }
        }
        None => full,
    }
}

/// The header block of one answered message: the stored headers (or a
/// fresh block) with the direct get headers appended; `batch` adds
/// `Nats-Num-Pending` and `Nats-Last-Sequence`.
pub fn message_headers(stream: &str, m: &StoredMessage, batch: Option<(u64, u64)>) -> Vec<u8> {
    let mut h = match m.headers.as_deref() {
        Some(b) if b.len() > 2 => b[..b.len() - 2].to_vec(),
        _ => b"NATS/1.0\r\n".to_vec(),
    };
    let mut line = |k: &str, v: &str| {
        h.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    };
    line("Nats-Stream", stream);
    line("Nats-Subject", &m.subject);
    line("Nats-Sequence", &m.seq.to_string());
    line("Nats-Time-Stamp", &rfc3339_nano(m.timestamp));
    if let Some((np, lseq)) = batch {
        line("Nats-Num-Pending", &np.to_string());
        line("Nats-Last-Sequence", &lseq.to_string());
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// A status message alone (`NATS/1.0 <code> <text>`).
pub fn status_part((code, text): Status) -> Part {
    (
        Some(format!("NATS/1.0 {code} {text}\r\n\r\n").into_bytes()),
        Vec::new(),
    )
}

fn eob(np: u64, lseq: u64, up_to: Option<u64>) -> Part {
    let mut h =
        format!("NATS/1.0 204 EOB\r\nNats-Num-Pending: {np}\r\nNats-Last-Sequence: {lseq}\r\n");
    if let Some(u) = up_to {
        h.push_str(&format!("Nats-UpTo-Sequence: {u}\r\n"));
    }
    h.push_str("\r\n");
    (Some(h.into_bytes()), Vec::new())
}

/// Whether `filter` lies wholly inside the caller's `deny_subscribe`.
fn denied(caller: Option<&Permissions>, filter: &str) -> bool {
    caller.is_some_and(|p| {
        p.deny_subscribe
            .iter()
            .any(|d| crate::subject::filter_within(filter, d))
    })
}

/// The first live sequence stored at or after `t` (unix ns), or
/// `last_seq + 1` if none (nats-server's `GetSeqFromTime`): a binary
/// search, timestamps growing with sequences.
pub(super) async fn seq_from_time(h: &StreamHandle, t: u64) -> Result<u64, StreamError> {
    let st = h.state();
    let (mut lo, mut hi) = (st.first_seq.max(1), st.last_seq + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match h.next_by_subject(">", mid).await? {
            Some(m) if m.timestamp < t => lo = m.seq + 1,
            _ => hi = mid,
        }
    }
    Ok(match h.next_by_subject(">", lo).await? {
        Some(m) => m.seq,
        None => st.last_seq + 1,
    })
}

/// Tracks the size of an answer against `max_bytes` (nats-server counts
/// the stored subject, headers and payload) and [`DIRECT_MAX_BYTES`]
/// (everything sent).
struct Budget {
    max: usize,
    counted: usize,
    sent: usize,
}

impl Budget {
    fn new(max_bytes: usize) -> Budget {
        let max = match max_bytes {
            0 => DIRECT_MAX_BYTES,
            n => n.min(DIRECT_MAX_BYTES),
        };
        Budget {
            max,
            counted: 0,
            sent: 0,
        }
    }

    /// Account for one message; false once the answer must stop.
    fn take(&mut self, stored: usize, part: &Part) -> bool {
        self.counted += stored;
        self.sent += part.0.as_ref().map_or(0, Vec::len) + part.1.len();
        self.counted < self.max && self.sent < DIRECT_MAX_BYTES
    }
}

/// One answered message and its stored size (subject, headers, payload).
fn part(stream: &str, m: StoredMessage, no_hdr: bool, batch: Option<(u64, u64)>) -> (Part, usize) {
    let stored = m.subject.len() + m.headers.as_ref().map_or(0, Vec::len) + m.payload.len();
    let h = (!no_hdr).then(|| message_headers(stream, &m, batch));
    ((h, m.payload), stored)
}

/// The answer to a valid request on stream `h`.
pub async fn answer(
    h: &StreamHandle,
    req: &Req,
    caller: Option<&Permissions>,
) -> Result<Vec<Part>, StreamError> {
    let filters = req
        .last_by_subj
        .iter()
        .chain(&req.next_by_subj)
        .chain(&req.multi_last);
    if filters.clone().count() > 0 && filters.clone().all(|f| denied(caller, f)) {
        return Ok(vec![status_part(FORBIDDEN)]);
    }
    if !req.multi_last.is_empty() {
        return multi_last(h, req, caller).await;
    }
    let name = h.config().name.clone();
    let mut seq = match req.start_time {
        Some(t) => seq_from_time(h, t).await?,
        None => req.seq,
    };
    let batched = req.batch > 0;
    let filter = req.next_by_subj.as_deref().unwrap_or(">");
    let valid_through = h.state().last_seq;
    let mut np = if batched {
        h.count_matching(filter, seq, u64::MAX).await?
    } else {
        0
    };
    let (mut out, mut lseq, mut budget) = (Vec::new(), 0, Budget::new(req.max_bytes));
    for i in 0..req.batch.max(1) {
        let found = if let Some(last) = &req.last_by_subj {
            h.last_by_subject(last).await?
        } else if seq > 0 && req.next_by_subj.is_none() && i == 0 && !batched {
            h.get(seq).await?
        } else if seq == 0 && req.next_by_subj.is_none() {
            h.last_by_subject(">").await?
        } else {
            h.next_by_subject(filter, seq).await?
        };
        let Some(m) = found else {
            if batched && i > 0 {
                break;
            }
            return Ok(vec![status_part(NOT_FOUND)]);
        };
        seq = m.seq + 1;
        np = np.saturating_sub(u64::from(batched));
        if !may_read(caller, &m.subject) {
            if !batched {
                return Ok(vec![status_part(FORBIDDEN)]);
            }
            continue;
        }
        let mseq = m.seq;
        let (p, stored) = part(&name, m, req.no_hdr, batched.then_some((np, lseq)));
        lseq = mseq;
        let more = budget.take(stored, &p);
        out.push(p);
        if !more {
            break;
        }
    }
    if batched {
        if h.state().last_seq > valid_through {
            np = h.count_matching(filter, seq, u64::MAX).await?;
        }
        out.push(eob(np, lseq, None));
    }
    Ok(out)
}

/// `multi_last`: the newest message of every matching subject up to
/// `up_to_seq`/`up_to_time`, then an EOB naming that sequence.
async fn multi_last(
    h: &StreamHandle,
    req: &Req,
    caller: Option<&Permissions>,
) -> Result<Vec<Part>, StreamError> {
    let name = h.config().name.clone();
    let mut up_to = req.up_to_seq;
    if let Some(t) = req.up_to_time {
        let s = seq_from_time(h, t).await?;
        if s <= h.state().first_seq {
            return Ok(vec![status_part(NO_RESULTS)]);
        }
        up_to = s - 1;
    }
    if up_to == 0 {
        up_to = h.state().last_seq;
    }
    let Some(seqs) = h
        .last_per_subject(&req.multi_last, up_to, MULTI_MAX)
        .await?
    else {
        return Ok(vec![status_part((413, "Too Many Results"))]);
    };
    if seqs.is_empty() {
        return Ok(vec![status_part(NO_RESULTS)]);
    }
    let mut np = seqs.len() as u64;
    let (mut out, mut lseq, mut budget, mut sent) = (Vec::new(), 0, Budget::new(req.max_bytes), 0);
    for s in seqs {
        np -= 1;
        if s < req.seq {
            continue;
        }
        let Some(m) = h.get(s).await? else {
            return Ok(vec![status_part(NOT_FOUND)]);
        };
        if !may_read(caller, &m.subject) {
            continue;
        }
        let (p, stored) = part(&name, m, req.no_hdr, Some((np, lseq)));
        lseq = s;
        let more = budget.take(stored, &p);
        out.push(p);
        sent += 1;
        if !more || (req.batch > 0 && sent >= req.batch) {
            break;
        }
    }
    out.push(eob(np, lseq, Some(up_to)));
    Ok(out)
}

impl JsApi {
    /// Answer a direct get on `stream`; `key` for the subject form. A
    /// single-message request joins [`Pending`] (answered by
    /// [`JsApi::finish_direct`]); any other is answered now.
    pub(super) async fn handle_direct(&mut self, stream: &str, key: Option<&str>, m: &Msg) {
        let Some(reply) = m.reply.clone() else {
            return;
        };
        let caller = m.publisher.clone();
        if !may_answer(caller.as_deref(), &reply) {
            log::debug!(
                "jetstream: {} ignored: its caller may not subscribe to the reply subject {reply:?}",
                m.subject
            );
            return;
        }
        let h = match self.slot(stream) {
            Ok(s) if s.handle.config().allow_direct => s.handle.clone(),
            _ => {
                self.push_parts(
                    &reply,
                    vec![(Some(b"NATS/1.0 503\r\n\r\n".to_vec()), Vec::new())],
                );
                return;
            }
        };
        let req = match key {
            Some(k) => parse_key(k, &m.payload),
            None => parse_body(&m.payload),
        };
        let req = match req {
            Err(st) => return self.push_parts(&reply, vec![status_part(st)]),
            Ok(req) => req,
        };
        let single = req.batch == 0 && req.multi_last.is_empty() && req.start_time.is_none();
        let bound = answer_bound(&h);
        if !single
            || self.direct.futs().len() >= DIRECT_PIPELINE
            || self.direct.bound.saturating_add(bound) > super::ANSWER_BUDGET
        {
            self.finish_direct().await;
        }
        self.direct.bound = self.direct.bound.saturating_add(bound);
        let stream = stream.to_string();
        let fut = async move {
            let parts = match answer(&h, &req, caller.as_deref()).await {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("jetstream: direct get on stream {stream:?}: {e}");
                    vec![status_part((500, "Internal Server Error"))]
                }
            };
            (reply, parts)
        };
        self.direct.futs().push(Box::pin(fut));
        if !single {
            self.finish_direct().await;
        }
    }

    /// Answer every pending direct get: their reads reach the owner
    /// threads together (one queue drain per stream instead of one
    /// round trip each), and their answers are queued in arrival order.
    pub async fn finish_direct(&mut self) {
        if self.direct.futs().is_empty() {
            return;
        }
        let futs = std::mem::take(self.direct.futs());
        self.direct.bound = 0;
        for (reply, parts) in join_all(futs).await {
            self.push_parts(&reply, parts);
        }
    }

    fn push_parts(&mut self, reply: &str, parts: Vec<Part>) {
        for (headers, payload) in parts {
            self.out.push((
                reply.to_string(),
                Msg {
                    subject: reply.to_string(),
                    reply: None,
                    headers,
                    payload,
                    publisher: None,
                },
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_checked_as_nats_server_checks_them() {
        assert_eq!(parse_body(b""), Err(EMPTY));
        assert_eq!(parse_body(b"{}"), Err(EMPTY));
        assert_eq!(parse_body(b"{"), Err(MALFORMED));
        assert_eq!(parse_body(br#"{"seq":"x"}"#), Err(MALFORMED));
        assert_eq!(parse_body(br#"{"seq":1,"last_by_subj":"a"}"#), Err(BAD));
        assert_eq!(parse_body(br#"{"last_by_subj":"a","batch":2}"#), Err(BAD));
        assert_eq!(
            parse_body(br#"{"next_by_subj":"a","multi_last":["a"]}"#),
            Err(BAD)
        );
        assert_eq!(
            parse_body(
                br#"{"multi_last":["a"],"up_to_seq":1,"up_to_time":"2026-01-01T00:00:00Z"}"#
            ),
            Err(BAD)
        );
        let r = parse_body(br#"{"seq":3,"batch":2,"max_bytes":10,"next_by_subj":"a.*"}"#).unwrap();
        assert_eq!((r.seq, r.batch, r.max_bytes), (3, 2, 10));
        assert_eq!(r.next_by_subj.as_deref(), Some("a.*"));
        assert_eq!(parse_key("", b""), Err(BAD));
        assert_eq!(parse_key("a.b", br#"{"seq":1}"#), Err(BAD));
        assert_eq!(
            parse_key("a.b", b"").unwrap().last_by_subj.as_deref(),
            Some("a.b")
        );
    }

    #[test]
    fn times_round_trip_in_go_format() {
        let t = parse_rfc3339("2026-12-07T06:14:39.5Z").unwrap();
        assert_eq!(rfc3339_nano(t), "2026-12-07T06:14:39.5Z");
        assert_eq!(parse_rfc3339("2026-12-07T07:14:39.5+01:00"), Some(t));
        assert_eq!(rfc3339_nano(t - 500_000_000), "2026-12-07T06:14:39Z");
        assert_eq!(
            parse_rfc3339("1970-01-01T00:00:01.000000001Z"),
            Some(1_000_000_001)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(parse_rfc3339("2026-13-07T06:14:39Z"), None);
        // Multi-byte characters where the offset's sign or colon would be
        // are refused, not a panic (a peer sends these).
        for t in [
            "2026-12-07T06:14:39é1234",
            "2026-12-07T06:14:39+0é:0",
            "2026-12-07T06:14:39€:00",
            "2026-12-07T06:14:39.5é1234",
        ] {
            assert_eq!(parse_rfc3339(t), None, "{t}");
        }
    }

    #[test]
    fn stored_headers_are_extended() {
        let m = StoredMessage {
            seq: 7,
            timestamp: 1_000_000_000,
            subject: "a.b".into(),
            headers: Some(b"NATS/1.0\r\nKV-Operation: DEL\r\n\r\n".to_vec()),
            payload: Vec::new(),
        };
        let h = String::from_utf8(message_headers("S", &m, Some((2, 5)))).unwrap();
        assert_eq!(
            h,
            "NATS/1.0\r\nKV-Operation: DEL\r\nNats-Stream: S\r\nNats-Subject: a.b\r\nNats-Sequence: 7\r\nNats-Time-Stamp: 1970-01-01T00:00:01Z\r\nNats-Num-Pending: 2\r\nNats-Last-Sequence: 5\r\n\r\n"
        );
    }
}
