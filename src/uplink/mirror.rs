//! The mirror-up state machine for one local stream (sans-IO).
//!
//! Owns: which local messages are known to be on the hub, the publish
//! window, the resync scan, error policy and the cursor to persist. Inputs
//! come through `handle_*` (with `now` passed in), outputs leave through
//! `poll_*`: [`Command`]s to send on the hub connection, [`ReadRequest`]s
//! for the local stream, [`Event`]s for logs and status, the next deadline
//! and a [`Cursor`] to persist.
//!
//! Invariants (the exactly-once argument):
//! - `L` (cursor.local_seq): every local message <= L is on the hub, was
//!   skipped by policy (can never be stored) or no longer exists locally.
//! - `stored`: local seqs > L known to be on the hub (or skipped); they are
//!   never sent again.
//! - "scan floor" F = min(`latest`, lower bound of every in-flight publish):
//!   every message of ours with local seq > L that the hub holds and that is
//!   not in `stored` has hub seq > F. `latest` is the last hub sequence
//!   observed (an ack, or a message seen by the resync scan); a publish sent
//!   after observing hub seq s is stored above s. The persisted H is
//!   min(F, min hub seq in `stored` - 1), so a restart scanning from H + 1
//!   rediscovers everything it forgot.
//! - After every (re)connect and every publish error or timeout, nothing new
//!   is sent until a resync has scanned the hub stream from F + 1 to its end
//!   (`STREAM.INFO`, then batched direct gets or `MSG.GET` with
//!   `next_by_subj`, see `mirror_scan.rs`), recording every message
//!   whose `Nats-Msg-Id` is `<node>:<stream>:<seq>:<tag>` with a tag that
//!   verifies against its payload (`msgid.rs`: an HMAC under this node's
//!   key, so another hub user cannot forge the evidence or occupy an id
//!   in the duplicate window; ids that do not verify are ignored and
//!   logged as a warning at the end of the resync), and every batch whose
//!   commit's id (`<node>:<stream>:<first>-<last>:<tag>`, ordered mode)
//!   verifies against the messages before it. Then the unsent rest is
//!   published in local order. The hub's duplicate window covers the short
//!   race of a publish stored after the scan passed it; the scan covers
//!   outages of any length.
//! - Order, ordered mode (the hub stream has `allow_atomic`): one atomic
//!   batch or lone publish in flight at a time, so hub order = local order
//!   under any fault (the argument is in `mirror_order.rs`).
//! - Order, window mode (no `allow_atomic`): the hub answers one
//!   connection's publishes in order, so an ack that arrives while an
//!   earlier publish is unanswered means the earlier one was lost (a
//!   stream leader change drops the unreplicated tail of a window while
//!   the new leader stores what follows). The mirror stops sending at that
//!   ack and resyncs, so a resent message lands after at most one window
//!   (`max_inflight`) of later ones, never after more. It is still stored
//!   exactly once.
//! - A recreated hub stream breaks the floor's premise (its sequences
//!   restart: a publish sent after observing s may be stored at or below
//!   s, and its lost ack would leave it below the scan). The resync's
//!   `STREAM.INFO` tells by its `created`, which the cursor record keeps
//!   with H: another `created` than the record's or the last resync's, or
//!   (only while it is unknown, e.g. an earlier release's record) a last
//!   sequence below the floor. The scan then starts at the stream's first
//!   message (warning, `recreated` in status); what the deleted stream
//!   acknowledged is not sent again. The same `created` below the floor
//!   from a replica without a leader (no `cluster.leader`) is a lagging
//!   replica: nothing is sent until there is a leader. From the leader or
//!   a standalone server the hub lost acknowledged messages (a restored
//!   backup, a crash): L drops by the lost count plus one window, the
//!   whole stream is scanned and what it lacks is sent again once
//!   (`mirror_scan.rs`).
//! - Resync cost: the scan reads every hub message matching the filter
//!   after F. With a `subject_prefix` the filter is `<prefix>>`, so only this
//!   node's messages are read even in a shared hub stream; without one it is
//!   `>` and every foreign message after F is read too. A scan stops after
//!   `scan_cap` messages, keeps its progress and continues after a pause.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::cursor::Cursor;
use crate::stream::StoredMessage;
use crate::wire::nats::client;
use crate::wire::nats::headers::HeaderBlock;

/// JetStream error codes the policy distinguishes.
pub const ERR_STREAM_NOT_FOUND: u64 = 10059;
pub const ERR_NO_MESSAGE_FOUND: u64 = 10037;
pub const ERR_MESSAGE_TOO_LARGE: u64 = 10054;
pub const ERR_ATOMIC_DISABLED: u64 = 10174;
pub const ERR_BATCH_INCOMPLETE: u64 = 10176;
pub const ERR_BATCH_TOO_LARGE: u64 = 10199;

/// Most messages in one atomic batch (nats-server's default
/// `max_batch_size`; a hub that allows fewer says so with
/// [`ERR_BATCH_TOO_LARGE`] and the batch is halved).
pub const MAX_BATCH: usize = 1000;
/// Bytes the batch headers add to a message at most (`Nats-Batch-Id`,
/// `Nats-Batch-Sequence`, `Nats-Batch-Commit`, the commit's longer id): a message
/// that would exceed the hub's `max_payload` with them leaves alone.
const BATCH_HEADER_MAX: usize = 160;
/// Messages asked for in one batched direct get of the resync scan.
pub const SCAN_BATCH: usize = 256;
/// Bytes asked for in one batched direct get of the resync scan.
pub const SCAN_BATCH_BYTES: usize = 256 << 10;

/// How often a changed cursor is handed out for persisting, at most. A
/// restart after a crash rescans (one hub read per round trip) what was
/// acked since the last write, so the cursor is also handed out as soon
/// as its hub sequence moved [`PERSIST_EVERY`] past the persisted one. The
/// write is not synced (the page cache coalesces them into one flash write
/// per writeback), so it costs a few syscalls, only while the cursor
/// moves.
pub const PERSIST_INTERVAL: Duration = Duration::from_millis(100);
/// Hub messages after which a moving cursor is persisted without waiting
/// for [`PERSIST_INTERVAL`]: a restart after SIGKILL rescans at most about
/// this many plus one window (a few hundred ms on a fast link) instead of
/// a whole interval's worth of a fast drain.
pub const PERSIST_EVERY: u64 = 1024;
/// Default cap on hub messages examined by one resync round.
pub const DEFAULT_SCAN_CAP: u64 = 100_000;
/// Longest wait for the answer to one resync read (see
/// [`Mirror::resync_timeout`]).
pub const RESYNC_TIMEOUT: Duration = Duration::from_secs(2);
/// Most hub messages with an untagged id kept for comparison with the
/// local message (about 60 bytes each); more are ignored (their local
/// messages are sent again).
pub const UNTAGGED_MAX: usize = 65_536;
/// Upper bound on the bytes asked for in one local read.
pub const READ_MAX_BYTES: usize = 4 << 20;

/// Static parameters of one mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorParams {
    pub node: String,
    /// Local stream name.
    pub stream: String,
    /// Hub stream name.
    pub hub_stream: String,
    pub subject_prefix: String,
    pub max_inflight: usize,
    /// Ordered mode may stage the next batch's body (`uplink.pipeline`).
    pub pipeline: bool,
    pub ack_timeout: Duration,
    /// Backoff after a publish/resync fault: doubles from `retry_min`.
    pub retry_min: Duration,
    /// Also the pause between checks while the hub stream is missing.
    pub retry_max: Duration,
    pub scan_cap: u64,
    /// The node's key for unforgeable message ids (`msgid.rs`).
    pub id_key: super::msgid::IdKey,
}

/// Something to send on the hub connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Subscribe {
        subject: String,
        sid: u64,
    },
    /// `PUB` when `headers` is empty, else `HPUB`; no reply subject when
    /// `reply` is empty (the non-commit messages of an atomic batch).
    Publish {
        subject: String,
        reply: String,
        headers: Vec<u8>,
        payload: Vec<u8>,
    },
}

impl Command {
    /// Encode on the wire.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), crate::wire::nats::EncodeError> {
        match self {
            Command::Subscribe { subject, sid } => client::subscribe(subject, None, *sid, out),
            Command::Publish {
                subject,
                reply,
                headers,
                payload,
            } => {
                let reply = Some(reply.as_str()).filter(|r| !r.is_empty());
                if headers.is_empty() {
                    client::publish(subject, reply, payload, out)
                } else {
                    client::hpublish(subject, reply, headers, payload, out)
                }
            }
        }
    }
}

/// A read the shell should perform: `StreamHandle::read(from, max_msgs,
/// READ_MAX_BYTES)`, waiting (`wait_for(from)`) while it would be empty.
/// Answer with [`Mirror::handle_messages`] and the same `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    pub from: u64,
    pub max_msgs: usize,
}

/// Things worth logging, with their log level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A resync finished.
    Resynced {
        hub_seq: u64,
        cursor: u64,
        found_above_gap: usize,
        backlog: u64,
    },
    /// A message can never be stored on the hub; it is skipped.
    Skipped { seq: u64, reason: String },
    /// Local messages vanished (limits) before reaching the hub.
    LocalGap { from: u64, to: u64 },
    /// A fault or permanent condition (logged once per change).
    Error(String),
    /// The hub stream was missing and is back.
    StreamFound,
    /// Informational warnings (e.g. an ack from an unexpected stream).
    Warning(String),
}

impl Event {
    pub fn level(&self) -> log::Level {
        match self {
            Event::Resynced { .. } | Event::StreamFound => log::Level::Info,
            Event::LocalGap { .. } | Event::Warning(_) => log::Level::Warn,
            Event::Skipped { .. } | Event::Error(_) => log::Level::Error,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Resynced {
                hub_seq,
                cursor,
                found_above_gap,
                backlog,
            } => write!(
                f,
                "resynced: hub scanned up to seq {hub_seq}, local cursor {cursor}, {found_above_gap} later messages already on the hub, backlog {backlog} msgs"
            ),
            Event::Skipped { seq, reason } => write!(f, "message {seq} can never be stored on the hub and is skipped: {reason}"),
            Event::LocalGap { from, to } => write!(
                f,
                "local messages {from}..={to} are no longer in the local stream (discarded by limits) and were not confirmed on the hub"
            ),
            Event::Error(e) => f.write_str(e),
            Event::StreamFound => f.write_str("hub stream is available again"),
            Event::Warning(w) => f.write_str(w),
        }
    }
}

/// A copy of the mirror's state for status output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorStatus {
    pub stream: String,
    pub hub_stream: String,
    pub state: String,
    pub cursor: u64,
    pub hub_seq: u64,
    pub local_last_seq: u64,
    /// Local messages not yet on the hub: `msgs` from the machine, `bytes`
    /// (an estimate) and `oldest_ts` filled in by the shell.
    pub lag: super::status::Lag,
    /// The configured priority (filled in by the shell).
    pub priority: i32,
    pub inflight: usize,
    pub sent: u64,
    pub acked: u64,
    pub skipped: u64,
    pub resyncs: u64,
    /// Resyncs that found the hub stream recreated or missing
    /// acknowledged messages (same `created`, its leader's last sequence
    /// below the scan floor).
    pub recreated: u64,
    pub last_error: Option<String>,
    /// Unix ns at which `last_error` first appeared (filled in by
    /// [`super::UplinkStatus`]).
    pub last_error_at: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Inflight {
    sent_at: Instant,
    /// The hub stores this publish above this sequence.
    lower_bound: u64,
}

/// The request a resync waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// `STREAM.INFO`: what the hub stream allows (atomic, direct).
    Info,
    /// `MSG.GET` after `latest`, answered by the stream leader.
    Get,
    /// A batched direct get after `latest` (any replica answers); `got`
    /// messages of it arrived so far.
    Direct { got: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Offline,
    /// Waiting for the reply to a resync request (`step`).
    Resync {
        scanned: u64,
        sent_at: Instant,
        step: Step,
    },
    Streaming,
    /// Connected but pausing before the next resync.
    Wait {
        until: Instant,
    },
}

#[derive(Debug, Clone)]
struct Conn {
    inbox: String,
    max_payload: usize,
}

/// One mirror's state machine.
#[derive(Debug)]
pub struct Mirror {
    p: MirrorParams,
    phase: Phase,
    conn: Option<Conn>,
    epoch: u64,
    l: u64,
    latest: u64,
    stored: BTreeMap<u64, Option<u64>>,
    absent: BTreeMap<u64, u64>,
    inflight: BTreeMap<u64, Inflight>,
    pending: VecDeque<StoredMessage>,
    next_read: u64,
    read_from: Option<u64>,
    read_issued: bool,
    fail_streak: u32,
    stream_missing: bool,
    warned_other_stream: bool,
    last_error: Option<String>,
    local_last_seq: u64,
    sent: u64,
    acked: u64,
    skipped: u64,
    resyncs: u64,
    /// The hub stream's `created` as the last resync (or the cursor
    /// record) saw it, how often it changed, and how many resyncs in a
    /// row found it below the floor (`mirror_scan.rs`).
    hub_created: Option<String>,
    recreated: u64,
    behind: u32,
    persisted: Cursor,
    last_persist: Option<Instant>,
    commands: VecDeque<Command>,
    events: VecDeque<Event>,
    /// Bytes of publishes the shell allows now ([`Mirror::handle_budget`]);
    /// `None`: no limit.
    budget: Option<u64>,
    /// The hub stream allows atomic batches (`allow_atomic`, from
    /// `STREAM.INFO` at each resync): ordered mode.
    atomic: bool,
    /// The hub stream allows direct gets (batched resync reads).
    direct: bool,
    /// A direct get failed or went unanswered on this connection (e.g. the
    /// hub user may not publish to `$JS.API.DIRECT.GET.>`): `MSG.GET`
    /// until the next connection.
    direct_failed: bool,
    /// Ordered mode: the local seqs of the publish or batch in flight, in
    /// order; the last one carries the commit (and the only reply).
    batch: Vec<u64>,
    /// Ordered mode: the largest batch to send (halved when the hub says
    /// a batch is too large).
    batch_cap: usize,
    /// Ordered mode: send the next message alone (a batch was refused for
    /// the size of one of its messages).
    single_next: bool,
    batches: u64,
    warned_unordered: bool,
    /// This resync: hub messages naming a local message > L whose id does
    /// not verify, and the hub seq of the first.
    unverified: u64,
    first_unverified: Option<u64>,
    /// Hub messages with an untagged id (a frond before the tags) naming
    /// local seq > L: `(local seq, hub seq)` -> [`super::msgid::content_digest`]
    /// of the hub message. Decided when the local message is read
    /// (`mirror_scan.rs`); at most [`UNTAGGED_MAX`] entries.
    untagged: BTreeMap<(u64, u64), [u8; 32]>,
    /// Ordered mode: the range of the last batch (or lone publish) sent
    /// whose outcome is unknown; the next send repeats it
    /// (`mirror_order.rs`).
    pinned: Option<(u64, u64)>,
    /// When the pinned range was last sent, and whether that send carried
    /// its first message's own id (`mirror_order.rs`).
    pin_sent: Option<(Instant, bool)>,
    /// A read from inside the pinned range found nothing: its end was
    /// deleted locally.
    pin_gone: bool,
    /// Ordered mode: every message of a batch keeps its own id (the hub
    /// stream has a limit that can remove single messages of a stored
    /// batch, so a commit may not find its batch whole;
    /// `mirror_order.rs`). From `STREAM.INFO` at each resync.
    own_ids: bool,
    /// The hub stream's `duplicate_window` (from `STREAM.INFO`; nats-server's
    /// default until read).
    dup_window: std::time::Duration,
    /// The resync's last [`MAX_BATCH`] - 1 hub messages (hub seq, payload
    /// digest) since the last verified batch commit: a commit's id is
    /// checked against those before it (`mirror_scan.rs`).
    recent: VecDeque<(u64, [u8; 32])>,
    /// Ids naming a local message > L that did not verify in this resync
    /// (at most [`UNTAGGED_MAX`]): a forgery holds them in the duplicate
    /// window, so ordered mode avoids sending exactly these ids.
    occupied: std::collections::BTreeSet<String>,
    /// Ordered mode: the next batch's body staged on the hub while the
    /// batch before it is unanswered, its commit held (`mirror_order.rs`).
    pipe: order::Pipe,
    /// Runs of id-less hub messages after a verified first id, matched
    /// against local content as it is read (`mirror_follow.rs`).
    follow: follow::Follow,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u64,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct PubAckJson {
    #[serde(default)]
    stream: String,
    #[serde(default)]
    seq: u64,
    /// Messages stored by an atomic batch's commit.
    #[serde(default)]
    count: u64,
    /// The hub already holds a message with this publish's id.
    #[serde(default)]
    duplicate: bool,
    error: Option<ApiError>,
}

enum Reply {
    Ok {
        stream: String,
        seq: u64,
        count: u64,
    },
    /// Not stored: the hub holds a message with the same id at `seq`. Not
    /// proof that it is ours (a hub user who saw the id in flight may
    /// have stored other content with it): the resync checks its tag.
    Duplicate {
        seq: u64,
    },
    ApiErr(ApiError),
    NoResponders,
    Garbage(String),
}

fn classify_pub_reply(headers: Option<&[u8]>, payload: &[u8]) -> Reply {
    if let Some(h) = headers {
        if let Ok(hb) = HeaderBlock::parse(h) {
            if hb.status == Some(503) {
                return Reply::NoResponders;
            }
        }
    }
    match serde_json::from_slice::<PubAckJson>(payload) {
        Ok(PubAckJson { error: Some(e), .. }) => Reply::ApiErr(e),
        Ok(a) if a.seq > 0 && a.duplicate => Reply::Duplicate { seq: a.seq },
        Ok(a) if a.seq > 0 => Reply::Ok {
            stream: a.stream,
            seq: a.seq,
            count: a.count,
        },
        Ok(_) => Reply::Garbage("publish reply has no sequence".into()),
        Err(e) => Reply::Garbage(format!("publish reply is not a JetStream ack: {e}")),
    }
}

impl Mirror {
    /// A mirror resuming from `cursor` (`None`: start from 0, full resync).
    pub fn new(p: MirrorParams, cursor: Option<Cursor>) -> Mirror {
        let c = cursor.unwrap_or_default();
        Mirror {
            p,
            phase: Phase::Offline,
            conn: None,
            epoch: 0,
            l: c.local_seq,
            latest: c.hub_seq,
            stored: BTreeMap::new(),
            absent: BTreeMap::new(),
            inflight: BTreeMap::new(),
            pending: VecDeque::new(),
            next_read: c.local_seq + 1,
            read_from: None,
            read_issued: false,
            fail_streak: 0,
            stream_missing: false,
            warned_other_stream: false,
            last_error: None,
            local_last_seq: 0,
            sent: 0,
            acked: 0,
            skipped: 0,
            resyncs: 0,
            hub_created: c.created.clone(),
            recreated: 0,
            behind: 0,
            persisted: c,
            last_persist: None,
            commands: VecDeque::new(),
            events: VecDeque::new(),
            budget: None,
            atomic: false,
            direct: false,
            direct_failed: false,
            batch: Vec::new(),
            batch_cap: MAX_BATCH,
            single_next: false,
            batches: 0,
            warned_unordered: false,
            unverified: 0,
            first_unverified: None,
            untagged: BTreeMap::new(),
            pinned: None,
            pin_sent: None,
            pin_gone: false,
            own_ids: false,
            dup_window: std::time::Duration::from_secs(120),
            recent: VecDeque::new(),
            occupied: Default::default(),
            pipe: Default::default(),
            follow: Default::default(),
        }
    }

    pub fn params(&self) -> &MirrorParams {
        &self.p
    }

    /// The cursor as it would be persisted now.
    pub fn cursor(&self) -> Cursor {
        let mut h = self.floor();
        // A batch whose commit the scan has not reached yet starts after
        // the last verified commit: a restart must read it whole.
        let untagged = self.untagged.keys().map(|k| k.1);
        let untagged = untagged.chain(self.recent.front().map(|r| r.0));
        if let Some(min_stored) = self
            .stored
            .values()
            .flatten()
            .copied()
            .chain(untagged)
            .min()
        {
            h = h.min(min_stored.saturating_sub(1));
        }
        Cursor {
            local_seq: self.l,
            hub_seq: h,
            created: self.hub_created.clone(),
        }
    }

    /// How long a resync read may go unanswered. The hub drops a
    /// `MSG.GET` silently while the stream has no leader (an election after
    /// a node died), so waiting the whole `ack_timeout` would stall the
    /// recovery; a resend costs one small request.
    fn resync_timeout(&self) -> Duration {
        self.p.ack_timeout.min(RESYNC_TIMEOUT)
    }

    fn floor(&self) -> u64 {
        self.inflight
            .values()
            .map(|i| i.lower_bound)
            .fold(self.latest.min(self.suspect_floor()), u64::min)
    }

    /// The hub subject filter used by the resync scan.
    pub fn filter(&self) -> String {
        if self.p.subject_prefix.is_empty() {
            ">".into()
        } else {
            format!("{}>", self.p.subject_prefix)
        }
    }

    fn msg_id(&self, m: &StoredMessage) -> String {
        self.p
            .id_key
            .msg_id(&self.p.node, &self.p.stream, m.seq, &m.payload)
    }

    /// The local sequence a hub message with this id and payload proves
    /// stored: `Some(Ok(seq))` only if its tag verifies (`msgid.rs`),
    /// `Some(Err(seq))` if it names one of ours but does not verify.
    fn our_seq(&self, msg_id: &str, payload: &[u8]) -> Option<Result<u64, u64>> {
        self.p
            .id_key
            .verify(&self.p.node, &self.p.stream, msg_id, payload)
    }

    // ------------------------------------------------------------------
    // Inputs.

    /// The connection is up (CONNECT accepted). `sid` is this mirror's
    /// subscription id, `inbox_token` a fresh random token for this
    /// connection, `max_payload` the server's limit from INFO.
    pub fn handle_connected(
        &mut self,
        now: Instant,
        sid: u64,
        inbox_token: &str,
        max_payload: usize,
    ) {
        self.conn = None; // a kill of the old connection's body goes on this one
        self.drop_window();
        self.direct_failed = false;
        let inbox = format!("_INBOX.{inbox_token}");
        self.commands.push_back(Command::Subscribe {
            subject: format!("{inbox}.*"),
            sid,
        });
        self.conn = Some(Conn { inbox, max_payload });
        self.flush_kill();
        self.start_resync(now);
    }

    /// The connection is gone.
    pub fn handle_disconnected(&mut self) {
        self.conn = None; // first: a kill waits for the next connection
        self.drop_window();
        self.phase = Phase::Offline;
    }

    /// The bytes of publishes this mirror may queue from now on (`None`: no
    /// limit), set by the shell's rate cap and priority scheduling; sends
    /// what it allows at once. The last publish may overshoot the budget
    /// (a message is never split); once it is used up nothing is sent
    /// until the next call. Resync reads are not limited.
    pub fn handle_budget(&mut self, now: Instant, budget: Option<u64>) {
        self.budget = budget;
        self.pump(now);
    }

    /// Whether local messages wait to be published on this connection (so
    /// lower-priority mirrors should wait): streaming with messages read
    /// but unsent or not read yet, or about to stream (resyncing) with a
    /// backlog. False while offline, pausing after a fault or while the hub
    /// stream is missing, so a broken mirror does not hold the others.
    pub fn has_unsent(&self) -> bool {
        match self.phase {
            Phase::Streaming => !self.pending.is_empty() || self.local_last_seq >= self.next_read,
            Phase::Resync { .. } => self.local_last_seq > self.l,
            Phase::Offline | Phase::Wait { .. } => false,
        }
    }

    /// The local stream's last sequence (for status and [`Mirror::has_unsent`]).
    pub fn handle_local_state(&mut self, last_seq: u64) {
        self.local_last_seq = last_seq;
    }

    /// The answer to a [`ReadRequest`] with this `from`: the stored
    /// messages with seq >= from, in order (gaps are deleted messages).
    pub fn handle_messages(&mut self, now: Instant, from: u64, msgs: Vec<StoredMessage>) {
        if self.read_from != Some(from) {
            return; // superseded request
        }
        self.read_from = None;
        self.read_issued = false;
        if from != self.next_read || self.phase != Phase::Streaming {
            return;
        }
        if msgs.is_empty() {
            // Nothing from `from` on (deleted): the reader keeps waiting
            // for a newer message; a pinned range that ends there cannot
            // be read whole again (`mirror_order.rs`).
            self.pin_gone |= self.pinned.is_some_and(|(_, b)| from <= b);
            self.read_from = Some(from);
            self.read_issued = true;
            return self.pump(now);
        }
        for m in msgs {
            if m.seq < self.next_read {
                continue;
            }
            if m.seq > self.next_read {
                let start = self.next_read.max(self.l + 1);
                let end = m.seq - 1;
                if start <= end {
                    self.absent.insert(start, end);
                    self.events.push_back(Event::LocalGap {
                        from: start,
                        to: end,
                    });
                }
            }
            self.local_last_seq = self.local_last_seq.max(m.seq);
            self.next_read = m.seq + 1;
            if let Some(hub_seq) = self.take_untagged(&m).or_else(|| self.take_follow(&m)) {
                self.stored.insert(m.seq, Some(hub_seq));
                continue;
            }
            self.pending.push_back(m);
        }
        self.advance();
        self.pump(now);
    }

    /// A message delivered on this mirror's subscription.
    pub fn handle_reply(
        &mut self,
        now: Instant,
        subject: &str,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) {
        let Some(conn) = &self.conn else { return };
        let Some(tail) = subject
            .strip_prefix(conn.inbox.as_str())
            .and_then(|t| t.strip_prefix('.'))
        else {
            return;
        };
        if let Some(epoch) = tail.strip_prefix('r') {
            if epoch.parse::<u64>().ok() == Some(self.epoch) {
                self.handle_resync_reply(now, headers, payload);
            }
        } else if let Some(no) = tail.strip_prefix('b').and_then(|b| b.parse().ok()) {
            self.handle_batch_reply(now, no, headers, payload);
        } else if let Some(no) = tail.strip_prefix('k').and_then(|b| b.parse().ok()) {
            self.handle_kill_reply(no);
        } else if let Ok(seq) = tail.parse::<u64>() {
            self.handle_pub_reply(now, seq, headers, payload);
        }
    }

    /// The subject of the hub's advisory that `hub_stream` has a new
    /// leader; the shell subscribes to it and calls
    /// [`Mirror::handle_leader_elected`] for each message on it.
    pub fn leader_advisory_subject(&self) -> String {
        format!(
            "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{}",
            self.p.hub_stream
        )
    }

    /// The hub stream has a new leader. A resync read sent during the
    /// election was dropped by the hub, and publishes in flight may have
    /// died with the old leader: resync at once (window dropped, no
    /// backoff) instead of waiting for the resync or ack timeout (a hub
    /// stream just created also gets a leader: the wait for it ends too).
    /// While offline, or streaming with nothing in flight, nothing changes.
    pub fn handle_leader_elected(&mut self, now: Instant) {
        if self.conn.is_none() {
            return;
        }
        match self.phase {
            Phase::Resync { .. } | Phase::Wait { .. } => {}
            Phase::Streaming if !self.inflight.is_empty() => {}
            Phase::Streaming | Phase::Offline => return,
        }
        self.drop_window();
        self.start_resync(now);
    }

    /// Timers: ack and resync timeouts, the end of a pause.
    pub fn handle_tick(&mut self, now: Instant) {
        match self.phase {
            Phase::Wait { until } if now >= until && self.conn.is_some() => self.start_resync(now),
            Phase::Resync { sent_at, step, .. } if now >= sent_at + self.resync_timeout() => {
                let t = self.resync_timeout();
                if matches!(step, Step::Direct { .. }) {
                    self.direct_failed = true;
                }
                self.fault(
                    now,
                    format!(
                        "hub did not answer a resync request for stream {} within {t:?}",
                        self.p.hub_stream
                    ),
                );
            }
            Phase::Streaming => {
                self.stage_if_due(now);
                if let Some((seq, i)) = self.inflight.iter().min_by_key(|(_, i)| i.sent_at) {
                    if now >= i.sent_at + self.p.ack_timeout {
                        let (seq, t) = (*seq, self.p.ack_timeout);
                        self.fault(now, format!("publish of message {seq} not acknowledged within {t:?}; treating as a link fault"));
                    }
                }
            }
            _ => {}
        }
    }

    // ------------------------------------------------------------------
    // Outputs.

    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// A local read to perform, returned once per request.
    pub fn poll_read(&mut self) -> Option<ReadRequest> {
        if self.read_issued {
            return None;
        }
        let from = self.read_from?;
        self.read_issued = true;
        // Ordered mode reads the next batch while one is in flight.
        let busy = if self.atomic { 0 } else { self.inflight.len() };
        let room = self
            .p
            .max_inflight
            .saturating_sub(busy + self.pending.len());
        Some(ReadRequest {
            from,
            max_msgs: room.max(1),
        })
    }

    /// The earliest instant at which [`Mirror::handle_tick`] or
    /// [`Mirror::poll_cursor`] has something to do.
    pub fn poll_deadline(&self) -> Option<Instant> {
        let timer = match self.phase {
            Phase::Offline => None,
            Phase::Wait { until } => Some(until),
            Phase::Resync { sent_at, .. } => Some(sent_at + self.resync_timeout()),
            Phase::Streaming => self
                .inflight
                .values()
                .map(|i| i.sent_at)
                .min()
                .map(|t| t + self.p.ack_timeout)
                .into_iter()
                .chain(self.stage_deadline())
                .min(),
        };
        // Never persisted: the next poll_cursor call (after any input)
        // writes it, so no deadline is needed.
        let persist = if self.cursor() != self.persisted {
            self.last_persist.map(|t| t + PERSIST_INTERVAL)
        } else {
            None
        };
        match (timer, persist) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A cursor to persist, if it changed and the last write is at least
    /// [`PERSIST_INTERVAL`] old, or its hub sequence moved
    /// [`PERSIST_EVERY`] (or `force`, e.g. at shutdown).
    pub fn poll_cursor(&mut self, now: Instant, force: bool) -> Option<Cursor> {
        let c = self.cursor();
        if c == self.persisted {
            return None;
        }
        let due = force
            || c.hub_seq >= self.persisted.hub_seq.saturating_add(PERSIST_EVERY)
            || self
                .last_persist
                .is_none_or(|t| now >= t + PERSIST_INTERVAL);
        if !due {
            return None;
        }
        self.persisted = c.clone();
        self.last_persist = Some(now);
        Some(c)
    }

    pub fn status(&self) -> MirrorStatus {
        let state = match self.phase {
            Phase::Offline => "offline".to_string(),
            Phase::Resync { .. } => "resyncing".to_string(),
            Phase::Streaming => "streaming".to_string(),
            Phase::Wait { .. } if self.stream_missing => "hub stream missing".to_string(),
            Phase::Wait { .. } => "waiting to retry".to_string(),
        };
        MirrorStatus {
            stream: self.p.stream.clone(),
            hub_stream: self.p.hub_stream.clone(),
            state,
            cursor: self.l,
            hub_seq: self.cursor().hub_seq,
            local_last_seq: self.local_last_seq,
            lag: super::status::Lag {
                msgs: self.local_last_seq.saturating_sub(self.l),
                ..Default::default()
            },
            priority: 0,
            inflight: self.inflight.len(),
            sent: self.sent,
            acked: self.acked,
            skipped: self.skipped,
            resyncs: self.resyncs,
            recreated: self.recreated,
            last_error: self.last_error.clone(),
            last_error_at: None,
        }
    }

    // ------------------------------------------------------------------
    // Internals.

    /// Forget the window: in-flight publishes become unknown, so the scan
    /// floor drops to cover them.
    fn drop_window(&mut self) {
        self.abandon_staged();
        self.flush_kill();
        self.latest = self.floor();
        self.inflight.clear();
        self.batch.clear();
        self.pending.clear();
        self.read_from = None;
        self.read_issued = false;
    }

    fn set_error(&mut self, e: String) {
        if self.last_error.as_deref() != Some(e.as_str()) {
            self.events.push_back(Event::Error(e.clone()));
        }
        self.last_error = Some(e);
    }

    /// A link or hub fault: drop the window, pause (with backoff), resync.
    fn fault(&mut self, now: Instant, reason: String) {
        self.drop_window();
        self.fail_streak = self.fail_streak.saturating_add(1);
        let exp = self.fail_streak.saturating_sub(1).min(16);
        let delay = self
            .p
            .retry_min
            .saturating_mul(1u32 << exp)
            .min(self.p.retry_max);
        self.set_error(reason);
        self.phase = Phase::Wait { until: now + delay };
    }

    fn stream_missing(&mut self, now: Instant) {
        self.drop_window();
        if !self.stream_missing {
            self.stream_missing = true;
        }
        let e = format!(
            "hub stream {} does not exist; create it on the hub (checking again every {:?})",
            self.p.hub_stream, self.p.retry_max
        );
        self.set_error(e);
        self.phase = Phase::Wait {
            until: now + self.p.retry_max,
        };
    }

    fn handle_pub_reply(&mut self, now: Instant, seq: u64, headers: Option<&[u8]>, payload: &[u8]) {
        let current = self.inflight.contains_key(&seq) && self.phase == Phase::Streaming;
        let reply = classify_pub_reply(headers, payload);
        if current && self.pinned == Some((seq, seq)) && !matches!(reply, Reply::Garbage(_)) {
            self.pinned = None;
        }
        match reply {
            Reply::Ok {
                stream,
                seq: hub_seq,
                ..
            } => {
                if stream != self.p.hub_stream && !self.warned_other_stream {
                    self.warned_other_stream = true;
                    self.events.push_back(Event::Warning(format!(
                        "message {seq} was stored in hub stream {stream:?}, not {:?}: the hub stream's subjects overlap; resync will not see it",
                        self.p.hub_stream
                    )));
                }
                // An ack is a fact even when it is late.
                if seq > self.l {
                    self.stored.insert(seq, Some(hub_seq));
                }
                if current {
                    self.inflight.remove(&seq);
                    self.latest = hub_seq;
                    self.acked += 1;
                    if let Some(&first) = self.inflight.keys().next().filter(|&&f| f < seq) {
                        // The hub answers a connection's publishes in
                        // order: an earlier one still unanswered was lost
                        // (a leader change drops the unreplicated part of
                        // a window). Sending on would store later
                        // messages before it; stop now and resync.
                        self.advance();
                        return self.fault(
                            now,
                            format!(
                                "hub acknowledged message {seq} while message {first} is unanswered (lost in the hub, e.g. by a leader change); resyncing before sending more"
                            ),
                        );
                    }
                    self.fail_streak = 0;
                    self.last_error = None;
                    // Ordered mode: a lone message stored also doubles a
                    // batch size halved down to one back.
                    self.batch_cap = self.batch_cap.saturating_mul(2).min(MAX_BATCH);
                }
                self.advance();
                self.pump(now);
            }
            Reply::ApiErr(e) if e.err_code == ERR_MESSAGE_TOO_LARGE => {
                self.inflight.remove(&seq);
                self.skip(
                    seq,
                    format!("hub: {} (err_code {})", e.description, e.err_code),
                );
                self.pump(now);
            }
            _ if !current => {} // a stale error: the window was already dropped
            Reply::Duplicate { seq: hub_seq } => {
                // The copy may lie below the floor (stored late): scan it.
                self.latest = self.latest.min(hub_seq.saturating_sub(1));
                self.fault(
                    now,
                    format!("hub stream {} already holds the id of message {seq} (hub seq {hub_seq}); resyncing to check that copy before sending more", self.p.hub_stream),
                )
            }
            Reply::ApiErr(e) if e.err_code == ERR_STREAM_NOT_FOUND => self.stream_missing(now),
            Reply::ApiErr(e) => self.fault(
                now,
                format!(
                    "hub rejected message {seq} for stream {}: {} (code {}, err_code {})",
                    self.p.hub_stream, e.description, e.code, e.err_code
                ),
            ),
            Reply::NoResponders => {
                let subject = format!("{}…", self.p.subject_prefix);
                self.fault(
                    now,
                    format!(
                        "no JetStream stream answered a publish of message {seq} ({subject}): hub stream {} is unavailable or does not capture this subject",
                        self.p.hub_stream
                    ),
                )
            }
            Reply::Garbage(g) => self.fault(now, g),
        }
    }

    fn skip(&mut self, seq: u64, reason: String) {
        if seq > self.l && !matches!(self.stored.get(&seq), Some(Some(_))) {
            self.stored.insert(seq, None);
            self.skipped += 1;
            self.events.push_back(Event::Skipped { seq, reason });
        }
        self.advance();
    }

    /// Move L over everything contiguous that is known stored, skipped or
    /// absent.
    fn advance(&mut self) {
        loop {
            let n = self.l + 1;
            if self.stored.remove(&n).is_some() {
                self.l = n;
                continue;
            }
            if let Some((&s, &e)) = self.absent.range(..=n).next_back() {
                self.absent.remove(&s);
                if e >= n {
                    self.l = e;
                }
                continue;
            }
            break;
        }
        let l = self.l;
        self.stored.retain(|&k, _| k > l);
        self.absent.retain(|_, e| *e > l);
        self.untagged.retain(|&(k, _), _| k > l);
    }

    /// Send from `pending` while the window has room; ask for more.
    ///
    /// The window refills in halves: nothing is sent or read while more
    /// than half of it is in flight. A backlog then leaves in batches of
    /// half a window, written as one chunk (one compressed WebSocket
    /// message on a `ws://` link, where a few publishes per message would
    /// compress poorly); a lone live message still leaves at once.
    fn pump(&mut self, now: Instant) {
        if self.atomic {
            return self.pump_ordered(now);
        }
        if self.phase != Phase::Streaming
            || self.inflight.len() + (self.p.max_inflight / 2).max(1) > self.p.max_inflight
        {
            return;
        }
        let Some(conn) = self.conn.clone() else {
            return;
        };
        while self.inflight.len() < self.p.max_inflight && self.budget != Some(0) {
            let Some(m) = self.pending.pop_front() else {
                break;
            };
            if m.seq <= self.l
                || self.stored.contains_key(&m.seq)
                || self.inflight.contains_key(&m.seq)
            {
                continue;
            }
            let headers = match self.headers_for(&m) {
                Ok(h) => h,
                Err(e) => {
                    self.skip(m.seq, e);
                    continue;
                }
            };
            let size = headers.len() + m.payload.len();
            if size > conn.max_payload {
                let max = conn.max_payload;
                self.skip(
                    m.seq,
                    format!("{size} bytes with headers exceed the hub's max_payload of {max}"),
                );
                continue;
            }
            let subject = format!("{}{}", self.p.subject_prefix, m.subject);
            let cmd = Command::Publish {
                subject,
                reply: format!("{}.{}", conn.inbox, m.seq),
                headers,
                payload: m.payload,
            };
            let mut wire = Vec::new();
            if let Err(e) = cmd.encode(&mut wire) {
                self.skip(m.seq, format!("cannot be sent: {e}"));
                continue;
            }
            if let Some(b) = &mut self.budget {
                *b = b.saturating_sub(wire.len() as u64);
            }
            self.commands.push_back(cmd);
            self.inflight.insert(
                m.seq,
                Inflight {
                    sent_at: now,
                    lower_bound: self.latest,
                },
            );
            self.sent += 1;
        }
        if self.pending.is_empty()
            && self.read_from.is_none()
            && self.inflight.len() < self.p.max_inflight
        {
            self.read_from = Some(self.next_read);
            self.read_issued = false;
        }
    }

    /// The original headers (minus `Nats-Msg-Id` and `Nats-Expected-*`,
    /// which address the local stream) plus our `Nats-Msg-Id`.
    fn headers_for(&self, m: &StoredMessage) -> Result<Vec<u8>, String> {
        self.header_block(m)
            .encode()
            .map_err(|e| format!("bad header: {e}"))
    }

    fn header_block(&self, m: &StoredMessage) -> HeaderBlock {
        let mut hb = match &m.headers {
            Some(raw) => HeaderBlock::parse(raw).unwrap_or_default(),
            None => HeaderBlock::new(),
        };
        hb.status = None;
        hb.description.clear();
        hb.entries.retain(|(k, _)| {
            !k.eq_ignore_ascii_case("Nats-Msg-Id")
                && !k.to_ascii_lowercase().starts_with("nats-expected-")
        });
        hb.push("Nats-Msg-Id", self.msg_id(m));
        hb
    }
}

#[path = "mirror_follow.rs"]
mod follow;
#[path = "mirror_order.rs"]
mod order;
#[path = "mirror_scan.rs"]
mod scan;

#[cfg(test)]
#[path = "mirror_sim.rs"]
mod sim;
#[cfg(test)]
#[path = "mirror_tests.rs"]
mod tests;
