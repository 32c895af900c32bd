//! The source-down state machine for one `[[uplink.source]]` (sans-IO):
//! hub stream → local stream, exactly once, in hub order.
//!
//! Owns: the cursor (which hub stream, its creation time, the last hub
//! sequence stored locally), the hub stream check (`STREAM.INFO`), the
//! batched reads, the wake-up logic, the subject transform and the
//! reserved-subject check. Inputs come through `handle_*` (with `now`),
//! outputs leave through `poll_*`: [`Command`]s for the hub connection,
//! one [`Batch`] at a time for the shell to append to the local stream,
//! a [`SourceCursor`] to persist, [`Event`]s for the log, a deadline.
//!
//! Mechanism (chosen for fleets: thousands of gateways on one hub stream):
//! frond holds the cursor and the hub keeps **no per-node state**. Reads
//! are batched direct gets, `$JS.API.DIRECT.GET.<stream>` with
//! `{"seq": cursor + 1, "next_by_subj": filter, "batch": N, "max_bytes": M}`
//! (nats-server 2.11+; the hub stream needs `allow_direct: true`). Each
//! reply is one stored message with `Nats-Stream`, `Nats-Subject`,
//! `Nats-Sequence`, `Nats-Time-Stamp`, `Nats-Num-Pending` and
//! `Nats-Last-Sequence` headers; a `204 EOB` status ends the batch, a
//! `404` says nothing matches at or after `seq`. Any replica may answer: a
//! lagging follower holds a prefix of the stream, never a gap, so it can
//! only delay a message, never make the cursor jump over one. A durable
//! consumer per node would instead cost the hub a consumer (state, raft
//! group for R3, timers) per gateway.
//!
//! Wake-up: one core subscription on the filter (or, without one, on the
//! hub stream's subjects) tells the node that something was published.
//! It is in place before the first read of a connection can miss a
//! message (sent before the first `STREAM.INFO`, or followed by a probe
//! when the subjects come from that answer). A
//! wake schedules a fetch (coalesced: at most one request in flight); a
//! fetch after a wake that finds nothing is retried a few times shortly
//! after (a follower may lag), then the hub stream is checked with
//! `STREAM.INFO`. A poll every `poll_interval` (also `STREAM.INFO`, then
//! a fetch when the stream holds more than the cursor) is the safety net
//! for lost wakes. Polls and wake retries are *probes*: with an anchor
//! known, one message after the cursor, unanchored (idle, a 34-byte
//! `404`); what a probe finds is not kept but read again anchored. A
//! stored batch that may not be the last is followed at once by the next
//! request. The wake costs the payload once more on
//! the link (core messages carry it); commands are small.
//!
//! Invariants (the exactly-once argument):
//! - The cursor `hub_seq` only advances in [`Source::handle_stored`], i.e.
//!   after the shell has appended the batch's messages and the local
//!   stream reported them durable (fsynced under `sync = "always"`).
//! - Messages are handed out in ascending hub sequence, each above the
//!   cursor; a reply with a sequence at or below the last one taken is
//!   dropped, so a duplicate or stale reply never lands twice.
//! - Every stored copy carries `Nats-Stream-Source: <hub stream> <seq>`.
//!   At start the shell scans the local stream after the record's local
//!   sequence and passes the highest hub sequence found
//!   ([`origin_of`]); the cursor is the larger of that and the record, so
//!   a crash between append and record neither duplicates nor skips.
//! - One batch in flight per source: at most `batch` messages and about
//!   `max_bytes` (asked of the hub, and enforced here at twice that,
//!   counted as the hub counts it; the first message of a batch is
//!   taken whatever its size, as the hub sends it whatever its size).
//! - A message whose subject (after the transform) is in the `$` or
//!   `_INBOX.` namespace, or outside the local stream's subjects, is never
//!   stored or routed (it could otherwise become a local API call); it is
//!   skipped, counted and logged, and the cursor moves past it.
//! - A hub stream whose `created` differs from the record's (or, with
//!   `created` unknown, whose last sequence is below the cursor) was
//!   recreated: logged as a warning, counted in status (`recreated`), and
//!   the new stream is copied from its first message.
//! - Same `created`, last sequence below the cursor: a lagging replica
//!   answered (an R3 stream without a leader) or the hub lost messages.
//!   Nothing is read, the cursor stays; re-checked every [`ERROR_RETRY`],
//!   an error in status after [`BEHIND_CHECKS`] answers in a row.
//! - Same `created`, another message at the cursor's sequence (the
//!   anchor's time stamp differs): the hub lost messages and re-used
//!   their sequences (*diverged*). Nothing of it is ever stored (the
//!   re-used sequences up to the cursor would be skipped unseen); counted
//!   (`diverged`), an error saying what to do, checked every poll; a
//!   recreation ends it. Without an anchor this is not detectable.
//! - No batch is handed to the shell before it is proven to come from
//!   the cursor's hub stream, so a stream deleted, recreated and grown
//!   past the cursor *while connected*, between two checks, is detected
//!   before anything of it is stored: nothing of the new stream is filed
//!   under the old identity or skipped. The proof, per batch:
//!   - *anchor* (the common case): the read starts at the cursor itself
//!     (`seq: cursor`, one message and [`ANCHOR_MAX_BYTES`] more), and its
//!     first reply must be the message stored last, same sequence and
//!     same `Nats-Time-Stamp` (kept with the cursor, also in the record).
//!     One direct get is answered by one server from one stream, so if
//!     its first reply is our message the whole batch is of our stream.
//!     A recreated stream's message at that sequence was stored later,
//!     with another time stamp.
//!   - *`STREAM.INFO` after the batch* when there is no anchor (the
//!     cursor came from a start policy, a recreation, a partial store, a
//!     scan of the local tail, a message over [`ANCHOR_MAX_BYTES`], a
//!     record of an earlier release) or it was not the first reply (it
//!     expired, was deleted, or the stream was recreated): the batch
//!     waits, and is stored only if the answer, sent after every reply of
//!     the batch, still shows the cursor's `created` (else it is dropped
//!     and the recreation handled). Another message at the cursor's
//!     sequence with nothing after it is checked at once.
//!
//!   Cost on the link per batch (nats-server 2.12.8, measured: a 100-byte
//!   command on a 22-byte subject arrives as 326 bytes, a `STREAM.INFO`
//!   answer is ~1 KB and a round trip): the anchor costs its own size
//!   again, 326 B down for such a command (at most [`ANCHOR_MAX_BYTES`]
//!   plus ~230 B of protocol and headers, else the check is used) and no
//!   round trip; about 1.3 B per message over a 256-message backlog
//!   batch, +57% on a lone live command (576 B → 902 B). Checking every
//!   batch with `STREAM.INFO` instead would cost ~1,060 B and a round trip
//!   each (+184% on a lone command). Idle, nothing is anchored
//!   (probes): per hour at the default 10 s poll, 300 probes answered by
//!   a 34 B `404` (~10 KB) and 60 `STREAM.INFO` (~64 KB), as without the
//!   anchor (anchored idle polls would add ~100-220 KB/hour). A probe that
//!   finds something costs that message once more (one message, at most
//!   ~230 B plus its size) before the anchored read; a wake reads anchored
//!   at once, without a probe. The hub's
//!   `$JS.EVENT.ADVISORY.STREAM.CREATED.<stream>` advisory alone would not
//!   do: a core message, not ordered with the direct get replies on
//!   another subscription, and lost with a link cut; it could only make
//!   the detection earlier.
//!
//! Hub memory per node, measured with `scripts/source-hub-memory 1000`
//! (nats-server 2.12.8, one node, file store, 1,000 nodes): a client
//! connection costs ~45.8 kB of hub RSS per node whatever the mechanism;
//! this source's two subscriptions (wake, reply inbox) add ~5.3 kB; a
//! durable pull consumer per node would add ~48 kB (R1; an R3 consumer is
//! also a raft group on three servers).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::cursor::SourceCursor;
use super::mirror::{Command, ERR_STREAM_NOT_FOUND};
use crate::config::SourceStart;
use crate::stream::Message;
use crate::subject::{self, mapping::Transform};
use crate::wire::nats::headers::HeaderBlock;

#[path = "source_reply.rs"]
mod reply;
use reply::InfoReply;
pub use reply::{origin_of, parse_reply, store_subject_of, Event, Reply};

/// The header a stored copy carries: `<hub stream> <hub seq>`.
pub const ORIGIN_HEADER: &str = "Nats-Stream-Source";
/// Messages asked for in one direct get.
pub const BATCH_MSGS: usize = 256;
/// Bytes asked for in one direct get.
pub const BATCH_BYTES: usize = 256 * 1024;
/// Longest wait for an answer from the hub.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries of an empty fetch after a wake (a follower may lag), the
/// first after this delay, doubling.
pub const WAKE_RETRY: Duration = Duration::from_millis(50);
pub const WAKE_RETRIES: u32 = 4;
/// Pause after a failed request before trying again.
pub const ERROR_RETRY: Duration = Duration::from_secs(1);

/// Static parameters of one source.
#[derive(Debug, Clone)]
pub struct SourceParams {
    /// Hub stream name.
    pub from: String,
    /// `None`: every message of the hub stream.
    pub filter: Option<String>,
    /// Local stream name and its subjects.
    pub stream: String,
    pub local_subjects: Vec<String>,
    /// `(from filter, transform)`.
    pub transform: Option<(String, Transform)>,
    pub start: SourceStart,
    pub poll_interval: Duration,
    pub batch: usize,
    pub max_bytes: usize,
}

/// Messages to append to the local stream, in this order; then call
/// [`Source::handle_stored`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `(hub seq, message)`.
    pub msgs: Vec<(u64, Message)>,
    /// The hub sequence the cursor reaches when all are stored (skipped
    /// messages included).
    pub last_hub_seq: u64,
}

/// What became of a [`Batch`]: the first `done` messages are durable or
/// were refused for good (`refused` of them: the local stream will never
/// take them, e.g. over its `max_msg_size`); `error` says why the rest
/// was not stored (retried). `local_last_seq`: the local stream's last
/// sequence afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    pub done: usize,
    pub refused: usize,
    pub local_last_seq: u64,
    pub error: Option<String>,
}

/// Status for `frond status` and `/varz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStatus {
    pub from: String,
    pub stream: String,
    pub filter: String,
    /// `"disconnected"`, `"checking"`, `"fetching"`, `"storing"`, `"idle"`,
    /// `"error"`.
    pub state: &'static str,
    /// Last hub sequence stored locally.
    pub hub_seq: u64,
    /// The hub stream's last sequence, as last seen.
    pub hub_last_seq: u64,
    /// Matching hub messages not yet stored, as last seen.
    pub pending: u64,
    pub stored: u64,
    pub skipped: u64,
    pub recreated: u64,
    /// Times the hub stream, same `created`, was found holding another
    /// message at the cursor's sequence (it lost messages and re-used
    /// their sequences): see [`Source`]'s module doc.
    pub diverged: u64,
    pub hub_created: String,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Disconnected,
    /// `STREAM.INFO` request `req` in flight.
    Info {
        req: u64,
        deadline: Instant,
    },
    /// Direct get `req` in flight.
    Fetch {
        req: u64,
        deadline: Instant,
    },
    /// A batch is with the shell.
    Store,
    /// Nothing in flight; `next` is when to act (fetch or check).
    Idle,
}

/// What to do at `Source::timer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Fetch,
    Info,
}

/// The source-down machine.
pub struct Source {
    p: SourceParams,
    hub_seq: u64,
    /// The hub stream's `created` the cursor belongs to ("": not known).
    created: String,
    /// Whether a cursor exists (from a record, the local tail or the start
    /// policy applied); without one the start policy decides.
    have_cursor: bool,
    /// The hub's `Nats-Time-Stamp` of message `hub_seq`, if known and
    /// worth re-reading (see the module doc: the anchor).
    anchor: Option<String>,
    local_seq: u64,
    phase: Phase,
    connected: bool,
    in_error: bool,
    /// When to act next while idle, and what.
    timer: Option<(Instant, Due)>,
    next_poll: Option<Instant>,
    /// Polls since the last `STREAM.INFO`.
    polls: u32,
    next_req: u64,
    /// The connection's reply-subject prefix and subscription ids.
    inbox: String,
    inbox_sid: u64,
    wake_sids: Vec<u64>,
    wake_subscribed: bool,
    /// This connection's first `STREAM.INFO` was answered.
    checked: bool,
    /// A wake came while a request was in flight.
    woken: bool,
    /// Empty fetches left to retry after the last wake; `after_wake`:
    /// the fetches since the last wake found nothing yet.
    wake_retries: u32,
    after_wake: bool,
    /// The batch being collected: messages, bytes, replies, last seq.
    got: Vec<(u64, Message)>,
    got_bytes: usize,
    got_replies: usize,
    got_last: u64,
    batch_pending: Option<u64>,
    /// The anchor the fetch in flight re-reads (`None`: unanchored), and
    /// what became of it: `Some(true)` found, `Some(false)` a first
    /// reply that is not it; then the time stamp of `got_last` (`None`
    /// when unknown or too large to serve as the next anchor).
    fetch_anchor: Option<String>,
    anchor_found: Option<bool>,
    got_last_time: Option<String>,
    /// The fetch in flight only asks whether anything follows the cursor
    /// (one message, unanchored); what it finds is read again anchored.
    probe: bool,
    /// The anchored read found another message at the cursor's sequence
    /// (`suspect`, the next `STREAM.INFO` decides), and the hub stream,
    /// same `created`, diverged from what was copied (`diverged`:
    /// nothing is read until it is recreated).
    suspect: bool,
    diverged: bool,
    /// `STREAM.INFO` answers in a row with the cursor's `created` and a
    /// last sequence below the cursor (a lagging replica answered).
    behind: u32,
    /// A collected batch waiting for the `STREAM.INFO` that proves it
    /// belongs to the cursor's hub stream (its anchor was not found).
    unproven: Option<Batch>,
    /// A batch ready for the shell, and the one it is storing (its seqs,
    /// its last hub seq and that message's time stamp).
    ready: Option<Batch>,
    ready_anchor: Option<String>,
    storing: Option<(Vec<u64>, u64, Option<String>)>,
    commands: VecDeque<Command>,
    events: VecDeque<Event>,
    cursor_out: Option<SourceCursor>,
    st: SourceStatus,
}

/// Wake subscriptions at most (without a filter, one per subject of the
/// hub stream; beyond this many, messages arrive by the poll).
pub const MAX_WAKE_SUBS: usize = 8;
/// Every this many polls, the poll is a `STREAM.INFO` (about 1 KB on the
/// link) instead of a direct get (a `404` is 34 bytes).
pub const INFO_EVERY: u32 = 6;
/// The largest message (subject, headers and payload, as the hub counts
/// `max_bytes`) kept as the next anchor: re-reading it costs about as
/// much as a `STREAM.INFO` (module doc). An anchored read asks for this
/// many bytes more.
pub const ANCHOR_MAX_BYTES: usize = 512;
/// `STREAM.INFO` answers in a row showing the cursor's `created` and a
/// last sequence below the cursor before it is reported as an error
/// (they are re-asked every [`ERROR_RETRY`] meanwhile).
pub const BEHIND_CHECKS: u32 = 3;

impl Source {
    /// A machine resuming from `record` (the persisted cursor) and `tail`
    /// (the highest hub sequence of this source found in the local
    /// stream after the record's local sequence).
    pub fn new(p: SourceParams, record: Option<SourceCursor>, tail: Option<u64>) -> Source {
        let record = record.filter(|r| r.hub_stream == p.from);
        let have_cursor = record.is_some() || tail.is_some();
        let hub_seq = record
            .as_ref()
            .map_or(0, |r| r.hub_seq)
            .max(tail.unwrap_or(0));
        let created = record
            .as_ref()
            .map(|r| r.created.clone())
            .unwrap_or_default();
        let local_seq = record.as_ref().map_or(0, |r| r.local_seq);
        // Copies past the record (found by the scan) leave the anchor
        // unknown.
        let anchor = record
            .as_ref()
            .filter(|r| r.hub_seq == hub_seq)
            .and_then(|r| r.anchor.clone());
        let st = SourceStatus {
            from: p.from.clone(),
            stream: p.stream.clone(),
            filter: p.filter.clone().unwrap_or_else(|| ">".into()),
            state: "disconnected",
            hub_seq,
            hub_created: created.clone(),
            ..SourceStatus::default()
        };
        Source {
            p,
            hub_seq,
            created,
            have_cursor,
            anchor,
            local_seq,
            phase: Phase::Disconnected,
            connected: false,
            in_error: false,
            timer: None,
            next_poll: None,
            polls: 0,
            next_req: 1,
            inbox: String::new(),
            inbox_sid: 0,
            wake_sids: Vec::new(),
            wake_subscribed: false,
            checked: false,
            woken: false,
            wake_retries: 0,
            after_wake: false,
            got: Vec::new(),
            got_bytes: 0,
            got_replies: 0,
            got_last: 0,
            batch_pending: None,
            fetch_anchor: None,
            anchor_found: None,
            got_last_time: None,
            probe: false,
            suspect: false,
            diverged: false,
            behind: 0,
            unproven: None,
            ready: None,
            ready_anchor: None,
            storing: None,
            commands: VecDeque::new(),
            events: VecDeque::new(),
            cursor_out: None,
            st,
        }
    }

    /// The local stream's last sequence found by the scan at start: what
    /// the next record says besides the cursor (the record's own local
    /// sequence is stale when copies follow it, and a record written
    /// after a recreation must not let the next scan take those copies
    /// of the old stream for the new one's).
    ///
    /// A record that the local stream has grown past (a crash between
    /// append and record) is written again at once: else, with nothing
    /// new to copy, it stays behind, and once retention removed those
    /// copies a restart would copy them again.
    pub fn handle_scanned(&mut self, local_last_seq: u64) {
        let grew = local_last_seq > self.local_seq;
        self.local_seq = self.local_seq.max(local_last_seq);
        if grew && self.have_cursor && !self.created.is_empty() {
            self.persist();
        }
    }

    pub fn params(&self) -> &SourceParams {
        &self.p
    }

    /// The last hub sequence stored locally.
    pub fn hub_seq(&self) -> u64 {
        self.hub_seq
    }

    /// The hub connection is up: `inbox_sid` and `wake_sids` (up to
    /// [`MAX_WAKE_SUBS`]) are fresh subscription ids, `token` makes the
    /// reply subjects unique. The hub stream is checked first.
    pub fn handle_connected(
        &mut self,
        now: Instant,
        inbox_sid: u64,
        wake_sids: Vec<u64>,
        token: &str,
    ) {
        self.connected = true;
        self.inbox = format!("_INBOX.{token}");
        self.inbox_sid = inbox_sid;
        self.wake_sids = wake_sids;
        self.wake_subscribed = false;
        self.checked = false;
        self.commands.push_back(Command::Subscribe {
            subject: format!("{}.*", self.inbox),
            sid: inbox_sid,
        });
        // With a filter the wake subscription goes before the first
        // `STREAM.INFO`: a message stored after that answer wakes us.
        if self.p.filter.is_some() {
            self.subscribe_wake(&[]);
        }
        if !self.is_storing() {
            self.phase = Phase::Idle;
        }
        self.timer = Some((now, Due::Info));
    }

    /// The hub connection is gone: what was in flight is forgotten (a
    /// batch with the shell stays).
    pub fn handle_disconnected(&mut self) {
        self.connected = false;
        self.commands.clear();
        self.got.clear();
        self.got_bytes = 0;
        self.unproven = None;
        self.timer = None;
        self.next_poll = None;
        if !self.is_storing() {
            self.phase = Phase::Disconnected;
        }
    }

    fn is_storing(&self) -> bool {
        self.phase == Phase::Store
    }

    /// A message for subscription `sid` (ours or not: others are ignored).
    pub fn handle_msg(
        &mut self,
        now: Instant,
        sid: u64,
        subject: &str,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) {
        if !self.connected {
            return;
        }
        if self.wake_sids.contains(&sid) {
            self.handle_wake(now);
            return;
        }
        if sid != self.inbox_sid {
            return;
        }
        let req = subject
            .strip_prefix(self.inbox.as_str())
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.parse::<u64>().ok());
        match (self.phase, req) {
            (Phase::Info { req, .. }, Some(r)) if r == req => self.on_info(now, payload),
            (Phase::Fetch { req, .. }, Some(r)) if r == req => {
                let reply = parse_reply(headers, payload);
                self.on_reply(now, reply);
            }
            _ => {} // A late answer to an abandoned request.
        }
    }

    /// Something was published on the filter: fetch now, or right after
    /// what is in flight (coalesced).
    fn handle_wake(&mut self, now: Instant) {
        self.wake_retries = WAKE_RETRIES;
        self.after_wake = true;
        // Before this connection's first `STREAM.INFO` answer the hub
        // stream's identity is unproven: the wake waits for it.
        if self.phase == Phase::Idle && !self.in_error && self.checked {
            self.timer = self.timer.filter(|(_, d)| *d == Due::Info);
            self.fetch(now);
        } else {
            self.woken = true;
        }
    }

    /// The shell appended the batch it took with [`Source::poll_batch`].
    pub fn handle_stored(&mut self, now: Instant, r: Stored) {
        let Some((seqs, last, last_time)) = self.storing.take() else {
            return;
        };
        let (done, anchor) = match &r.error {
            None => (Some(last), last_time),
            // A part: its last time stamp is not kept (the next batch is
            // proven by STREAM.INFO).
            Some(_) => (
                r.done.checked_sub(1).and_then(|i| seqs.get(i)).copied(),
                None,
            ),
        };
        if let Some(seq) = done {
            if seq > self.hub_seq {
                self.anchor = anchor;
            }
            self.hub_seq = self.hub_seq.max(seq);
            self.local_seq = r.local_last_seq;
            self.persist();
        }
        let done = r.done.min(seqs.len());
        self.st.stored += done.saturating_sub(r.refused) as u64;
        self.st.skipped += r.refused as u64;
        let error = r.error;
        self.st.hub_seq = self.hub_seq;
        self.st.pending = self.batch_pending.unwrap_or(self.st.pending);
        self.phase = if self.connected {
            Phase::Idle
        } else {
            Phase::Disconnected
        };
        if let Some(e) = error {
            let why = format!("cannot store into local stream {}: {e}", self.p.stream);
            return self.fail(now, why);
        }
        if self.phase == Phase::Idle && (self.batch_pending != Some(0) || self.woken) {
            self.woken = false;
            self.fetch(now);
        }
    }

    /// Act on timers.
    pub fn handle_tick(&mut self, now: Instant) {
        match self.phase {
            Phase::Info { deadline, .. } if now >= deadline => {
                let why = format!(
                    "no answer from the hub to STREAM.INFO {} within {REQUEST_TIMEOUT:?}",
                    self.p.from
                );
                self.fail(now, why);
            }
            Phase::Fetch { deadline, .. } if now >= deadline => {
                self.got.clear();
                self.got_bytes = 0;
                let why = format!(
                    "no answer from the hub to a direct get on {} within {REQUEST_TIMEOUT:?}",
                    self.p.from
                );
                self.fail(now, why);
            }
            Phase::Idle => {
                if let Some((at, due)) = self.timer {
                    if now >= at {
                        self.timer = None;
                        match due {
                            Due::Info => self.check(now),
                            Due::Fetch => self.probe(now),
                        }
                        return;
                    }
                }
                if self.next_poll.is_some_and(|t| now >= t) {
                    self.polls += 1;
                    if self.polls >= INFO_EVERY || self.in_error {
                        self.check(now);
                    } else {
                        self.probe(now);
                    }
                }
            }
            _ => {}
        }
    }

    #[must_use]
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The batch to append, in order (handed out once); answer with
    /// [`Source::handle_stored`].
    #[must_use]
    pub fn poll_batch(&mut self) -> Option<Batch> {
        let b = self.ready.take()?;
        let seqs = b.msgs.iter().map(|(s, _)| *s).collect();
        self.storing = Some((seqs, b.last_hub_seq, self.ready_anchor.take()));
        Some(b)
    }

    /// A cursor to persist (with sync): after every stored batch and when
    /// the hub stream's identity or the start position was settled.
    #[must_use]
    pub fn poll_cursor(&mut self) -> Option<SourceCursor> {
        self.cursor_out.take()
    }

    #[must_use]
    pub fn poll_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Info { deadline, .. } | Phase::Fetch { deadline, .. } => Some(deadline),
            Phase::Idle => [self.timer.map(|(t, _)| t), self.next_poll]
                .into_iter()
                .flatten()
                .min(),
            Phase::Store | Phase::Disconnected => None,
        }
    }

    pub fn status(&self) -> SourceStatus {
        let mut st = self.st.clone();
        st.state = match self.phase {
            Phase::Store => "storing",
            Phase::Disconnected => "disconnected",
            _ if self.in_error => "error",
            Phase::Info { .. } => "checking",
            Phase::Fetch { .. } => "fetching",
            Phase::Idle => "idle",
        };
        st
    }

    fn persist(&mut self) {
        self.cursor_out = Some(SourceCursor {
            hub_stream: self.p.from.clone(),
            created: self.created.clone(),
            hub_seq: self.hub_seq,
            local_seq: self.local_seq,
            anchor: self.anchor.clone(),
        });
    }

    /// Log and show `why`; check the hub stream again shortly.
    fn fail(&mut self, now: Instant, why: String) {
        self.fail_for(now, why, ERROR_RETRY.min(self.p.poll_interval));
    }

    fn fail_for(&mut self, now: Instant, why: String, retry: Duration) {
        if self.st.last_error.as_deref() != Some(why.as_str()) {
            self.events.push_back(Event::Error(why.clone()));
        }
        self.in_error = true;
        self.unproven = None;
        self.st.last_error = Some(why);
        self.phase = if self.connected {
            Phase::Idle
        } else {
            Phase::Disconnected
        };
        self.timer = Some((now + retry, Due::Info));
    }

    fn recovered(&mut self) {
        if self.in_error {
            self.in_error = false;
            self.st.last_error = None;
            self.events.push_back(Event::Recovered);
        }
    }

    fn request_id(&mut self) -> (u64, String) {
        let r = self.next_req;
        self.next_req += 1;
        (r, format!("{}.{r}", self.inbox))
    }

    /// Send `STREAM.INFO`.
    fn check(&mut self, now: Instant) {
        let (req, reply) = self.request_id();
        self.commands.push_back(Command::Publish {
            subject: format!("$JS.API.STREAM.INFO.{}", self.p.from),
            reply,
            headers: Vec::new(),
            payload: Vec::new(),
        });
        self.polls = 0;
        self.after_wake = false;
        self.phase = Phase::Info {
            req,
            deadline: now + REQUEST_TIMEOUT,
        };
        self.next_poll = Some(now + self.p.poll_interval);
    }

    /// Ask whether anything follows the cursor: with an anchor known, one
    /// message unanchored (a `404` when idle, 34 bytes, instead of the
    /// anchor); else the batch itself (proven by `STREAM.INFO`).
    fn probe(&mut self, now: Instant) {
        self.fetch_as(now, true);
    }

    /// Send a direct get for the next batch.
    fn fetch(&mut self, now: Instant) {
        self.fetch_as(now, false);
    }

    fn fetch_as(&mut self, now: Instant, probe: bool) {
        let (req, reply) = self.request_id();
        let filter = self.p.filter.as_deref().unwrap_or(">");
        let anchor = self.anchor.clone().filter(|_| self.have_cursor);
        self.probe = probe && anchor.is_some();
        self.fetch_anchor = anchor.filter(|_| !self.probe);
        self.anchor_found = None;
        self.suspect = false;
        self.got_last_time = None;
        self.unproven = None;
        let body = match (&self.p.start, self.have_cursor, &self.fetch_anchor) {
            _ if self.probe => serde_json::json!({
                "seq": self.hub_seq + 1, "next_by_subj": filter, "batch": 1,
            }),
            (SourceStart::Time(t), false, _) => serde_json::json!({
                "start_time": t, "next_by_subj": filter,
                "batch": self.p.batch, "max_bytes": self.p.max_bytes,
            }),
            // From the anchor, one message and its bytes more.
            (_, _, Some(_)) => serde_json::json!({
                "seq": self.hub_seq, "next_by_subj": filter,
                "batch": self.p.batch + 1, "max_bytes": self.p.max_bytes + ANCHOR_MAX_BYTES,
            }),
            _ => serde_json::json!({
                "seq": self.hub_seq + 1, "next_by_subj": filter,
                "batch": self.p.batch, "max_bytes": self.p.max_bytes,
            }),
        };
        self.commands.push_back(Command::Publish {
            subject: format!("$JS.API.DIRECT.GET.{}", self.p.from),
            reply,
            headers: Vec::new(),
            payload: body.to_string().into_bytes(),
        });
        self.got.clear();
        self.got_bytes = 0;
        self.got_replies = 0;
        self.got_last = self.hub_seq;
        self.batch_pending = None;
        self.phase = Phase::Fetch {
            req,
            deadline: now + REQUEST_TIMEOUT,
        };
        self.next_poll = Some(now + self.p.poll_interval);
    }

    fn on_info(&mut self, now: Instant, payload: &[u8]) {
        let info: InfoReply = match serde_json::from_slice(payload) {
            Ok(i) => i,
            Err(e) => return self.fail(now, format!("unreadable STREAM.INFO answer: {e}")),
        };
        let (from, every) = (&self.p.from, self.p.poll_interval);
        if let Some(e) = info.error {
            let why = if e.err_code == ERR_STREAM_NOT_FOUND || e.code == 404 {
                format!("hub stream {from} not found; create it (with allow_direct: true) or fix uplink.source.from; checking again every {every:?}")
            } else {
                format!("STREAM.INFO {from}: {} (code {}); the hub user needs publish permission for $JS.API.STREAM.INFO.{from} and $JS.API.DIRECT.GET.{from}", e.description, e.err_code)
            };
            return self.fail_for(now, why, every);
        }
        let config = info.config.unwrap_or_default();
        if !config.allow_direct {
            let why = format!("hub stream {from} does not allow direct gets, which source-down reads with; enable them on the hub: nats stream edit {from} --allow-direct");
            return self.fail_for(now, why, every);
        }
        let last = info.state.last_seq;
        self.st.hub_last_seq = last;
        // Without a filter the wake subjects are the stream's, known only
        // now: a message stored between this answer and the subscription
        // would wait for the poll, so a probe follows the subscription.
        self.checked = true;
        let late_wake = !self.wake_subscribed;
        if late_wake {
            self.subscribe_wake(&config.subjects);
        }
        if self.have_cursor
            && !self.created.is_empty()
            && self.created == info.created
            && last < self.hub_seq
        {
            return self.behind(now);
        }
        self.behind = 0;
        let recreated = self.settle_identity(&info.created, last);
        if recreated {
            self.suspect = false;
            self.diverged = false;
        } else if self.suspect || self.diverged {
            return self.diverge(now);
        }
        self.recovered();
        self.phase = Phase::Idle;
        // A batch read before this answer belongs to the stream it
        // describes; after a recreation it is not the cursor's: dropped.
        if let Some(b) = self.unproven.take() {
            if !recreated {
                return self.hand_out(b);
            }
        }
        let start_time = matches!(self.p.start, SourceStart::Time(_)) && !self.have_cursor;
        if last > self.hub_seq || start_time || self.woken {
            self.woken = false;
            self.fetch(now);
        } else if late_wake {
            self.probe(now);
        } else {
            self.st.pending = 0;
        }
    }

    /// The hub stream, same `created`, says it ends below the cursor: a
    /// replica that lags answered (an R3 stream without a leader), or the
    /// hub lost messages. Not a recreation: nothing is read, the check is
    /// repeated, and reported if it persists.
    fn behind(&mut self, now: Instant) {
        self.unproven = None;
        self.behind += 1;
        let retry = ERROR_RETRY.min(self.p.poll_interval);
        if self.behind < BEHIND_CHECKS && !self.in_error {
            self.phase = Phase::Idle;
            self.timer = Some((now + retry, Due::Info));
            return;
        }
        let (from, seq, created) = (&self.p.from, self.hub_seq, &self.created);
        let why = format!(
            "hub stream {from} (created {created}) reports fewer messages than the {seq} already copied: a replica that lags answered (does the stream have a leader?) or the hub lost messages; nothing is copied until it holds sequence {seq} again, checking every {retry:?}"
        );
        self.fail_for(now, why, retry);
    }

    /// The hub stream, same `created`, holds another message at the
    /// cursor's sequence than the one copied: it lost messages and
    /// re-used their sequences. Nothing of it is stored (its messages up
    /// to the cursor would be skipped unseen); the stream is checked every
    /// poll, and a recreation ends this.
    fn diverge(&mut self, now: Instant) {
        self.unproven = None;
        self.suspect = false;
        if !self.diverged {
            self.diverged = true;
            self.st.diverged += 1;
        }
        let (from, seq, every) = (&self.p.from, self.hub_seq, self.p.poll_interval);
        let (stream, created) = (&self.p.stream, &self.created);
        let why = format!(
            "hub stream {from} (created {created}) holds another message at sequence {seq} than the one copied into {stream}: the hub lost messages and re-used their sequences; nothing more is copied (its messages up to {seq} would be skipped unseen), checking every {every:?}. Recreate the hub stream to copy it whole, or, to skip them, stop frond and delete uplink/{stream}.{from}.source.a and .b in the data directory (copying resumes after hub sequence {seq})"
        );
        self.fail_for(now, why, every);
    }

    /// Compare the hub stream's identity with the cursor's (whether it
    /// was recreated); apply the start policy to a source without a
    /// cursor.
    fn settle_identity(&mut self, created: &str, last: u64) -> bool {
        // With `created` unknown (a record of an early release, a scan
        // of the local tail), fewer messages than the cursor is the sign.
        let recreated = self.have_cursor
            && if self.created.is_empty() {
                last < self.hub_seq
            } else {
                self.created != created
            };
        if recreated {
            self.events.push_back(Event::Recreated {
                old_created: self.created.clone(),
                created: created.to_string(),
                old_seq: self.hub_seq,
                last_seq: last,
            });
            self.st.recreated += 1;
            self.hub_seq = 0;
            self.anchor = None;
        } else if !self.have_cursor {
            self.anchor = None;
            match &self.p.start {
                SourceStart::All | SourceStart::Time(_) => self.hub_seq = 0,
                SourceStart::New => self.hub_seq = last,
                SourceStart::Seq(n) => self.hub_seq = n.saturating_sub(1),
            }
        }
        let changed = recreated || self.created != created || !self.have_cursor;
        self.created = created.to_string();
        self.st.hub_created = self.created.clone();
        self.st.hub_seq = self.hub_seq;
        // A start_time source has its cursor once the first batch came.
        if !matches!(self.p.start, SourceStart::Time(_)) {
            self.have_cursor = true;
        }
        if changed && self.have_cursor {
            self.persist();
        }
        recreated
    }

    fn subscribe_wake(&mut self, stream_subjects: &[String]) {
        let subjects: Vec<String> = match &self.p.filter {
            Some(f) => vec![f.clone()],
            None => stream_subjects.to_vec(),
        };
        let valid = subjects.into_iter().filter(|s| subject::valid_filter(s));
        for (s, sid) in valid.zip(self.wake_sids.clone()) {
            self.commands
                .push_back(Command::Subscribe { subject: s, sid });
        }
        self.wake_subscribed = true;
    }

    fn on_reply(&mut self, now: Instant, reply: Reply) {
        match reply {
            Reply::Msg {
                seq,
                subject,
                headers,
                payload,
                pending,
                time,
            } => {
                if self.probe {
                    // Something follows the cursor: read it anchored
                    // (`complete`); this copy is not kept.
                    self.got_last = self.got_last.max(seq);
                    return;
                }
                if self.fetch_anchor.is_some() && self.anchor_found.is_none() {
                    // The first reply of an anchored read: the message
                    // stored last, or the proof is left to STREAM.INFO;
                    // another message at its sequence is a recreation or
                    // a divergence (`on_info` tells which).
                    let found = seq == self.hub_seq && time == self.fetch_anchor;
                    self.anchor_found = Some(found);
                    self.suspect = !found && seq == self.hub_seq;
                    if found || self.suspect {
                        return;
                    }
                }
                if self.suspect {
                    return; // Not stored, whatever follows.
                }
                if seq <= self.got_last {
                    return; // Not above what we have: a duplicate.
                }
                self.got_last = seq;
                self.got_replies += 1;
                self.batch_pending = pending;
                // Counted as the hub counts `max_bytes` (not with the
                // origin header added here); the hub sends one message
                // whatever its size.
                let size = subject.len() + payload.len();
                self.got_bytes += size;
                // As the hub counts it, with the stored headers.
                let hdr = headers.as_ref().map_or(0, |h| {
                    let kv = h.entries.iter().map(|(k, v)| k.len() + v.len() + 4);
                    12 + kv.sum::<usize>()
                });
                self.got_last_time = time.filter(|_| size + hdr <= ANCHOR_MAX_BYTES);
                self.take(seq, subject, headers, payload);
                // An anchored read asked for one message (and its bytes)
                // more.
                let anchored = usize::from(self.fetch_anchor.is_some());
                let unfound = anchored * usize::from(self.anchor_found != Some(true));
                let max_bytes = self.p.max_bytes + anchored * ANCHOR_MAX_BYTES;
                if self.got_replies > self.p.batch + unfound
                    || (self.got_replies > 1 && self.got_bytes > max_bytes.saturating_mul(2))
                {
                    self.got.clear();
                    self.got_bytes = 0;
                    self.fail(now, "the hub sent more than the batch asked for".into());
                }
            }
            Reply::End { pending } => {
                if pending.is_some() {
                    self.batch_pending = pending;
                }
                self.complete(now);
            }
            Reply::NotFound => {
                self.batch_pending = Some(0);
                self.complete(now);
            }
            Reply::Fail(why) => {
                self.got.clear();
                self.got_bytes = 0;
                self.fail(now, why);
            }
        }
    }

    /// The local subject of hub message `subj`, or why it is not stored.
    fn local_subject(&self, subj: &str) -> Result<String, &'static str> {
        let filter = self.p.filter.as_deref().unwrap_or(">");
        if !subject::matches(filter, subj) {
            return Err("outside the source's filter");
        }
        let s = match &self.p.transform {
            Some((from, t)) if subject::matches(from, subj) => t
                .apply(subj)
                .ok_or("the subject transform does not apply")?,
            _ => subj.to_string(),
        };
        if (s.starts_with('$') && !store_subject_of(&self.p.stream, &s)) || s.starts_with("_INBOX.")
        {
            Err("its subject is in the reserved $ / _INBOX. namespace")
        } else if !subject::valid_subject(&s) {
            Err("not a valid subject")
        } else if !self
            .p
            .local_subjects
            .iter()
            .any(|f| subject::matches(f, &s))
        {
            Err("the local stream does not capture its subject")
        } else {
            Ok(s)
        }
    }

    /// Add one hub message to the batch being collected (or skip it).
    fn take(&mut self, seq: u64, subj: String, headers: Option<HeaderBlock>, payload: Vec<u8>) {
        let local = match self.local_subject(&subj) {
            Ok(s) => s,
            Err(why) => {
                self.st.skipped += 1;
                self.events.push_back(Event::Skipped(seq, subj, why));
                return;
            }
        };
        let mut hb = headers.unwrap_or_default();
        hb.set(ORIGIN_HEADER, format!("{} {seq}", self.p.from));
        let Ok(block) = hb.encode() else {
            self.st.skipped += 1;
            let why = "its headers cannot be re-encoded";
            self.events.push_back(Event::Skipped(seq, subj, why));
            return;
        };
        let m = Message {
            subject: local,
            headers: Some(block),
            payload,
        };
        self.got.push((seq, m));
    }

    /// Give batch `b` (proven to be of the cursor's hub stream) to the
    /// shell.
    fn hand_out(&mut self, b: Batch) {
        // Establishes the cursor of a start_time source too.
        self.have_cursor = true;
        self.st.hub_last_seq = self.st.hub_last_seq.max(b.last_hub_seq);
        self.ready_anchor = self.got_last_time.take();
        self.ready = Some(b);
        self.phase = Phase::Store;
    }

    /// The batch is complete: hand it out (or prove it first), or decide
    /// what an empty one means.
    fn complete(&mut self, now: Instant) {
        if self.suspect {
            // Another message at the cursor's sequence: nothing of this
            // read is stored; STREAM.INFO says recreated or diverged.
            self.got.clear();
            self.got_bytes = 0;
            let after_wake = self.after_wake;
            self.check(now);
            self.after_wake = after_wake;
            return;
        }
        self.recovered();
        if self.probe {
            self.probe = false;
            if self.got_last > self.hub_seq {
                return self.fetch(now);
            }
        } else if self.got_last > self.hub_seq {
            if !self.woken {
                self.after_wake = false;
            }
            let b = Batch {
                msgs: std::mem::take(&mut self.got),
                last_hub_seq: self.got_last,
            };
            self.got_bytes = 0;
            if self.anchor_found == Some(true) {
                self.hand_out(b);
            } else {
                // Not proven to be the cursor's stream: ask the hub (a
                // check that leaves a pending wake's retries as they are).
                self.unproven = Some(b);
                let after_wake = self.after_wake;
                self.check(now);
                self.after_wake = after_wake;
            }
            return;
        }
        self.phase = Phase::Idle;
        self.st.pending = 0;
        if self.woken {
            self.woken = false;
            self.fetch(now);
        } else if self.wake_retries > 0 {
            // A follower may lag behind the publish that woke us.
            let k = WAKE_RETRIES - self.wake_retries;
            self.wake_retries -= 1;
            self.timer = Some((now + WAKE_RETRY * (1 << k), Due::Fetch));
        } else if self.after_wake {
            // Woken, and nothing above the cursor: the stream may have
            // been recreated below it.
            self.timer = Some((now, Due::Info));
        }
    }
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
