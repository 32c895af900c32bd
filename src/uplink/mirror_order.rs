//! Ordered mode of the mirror-up machine ([`super::Mirror`]): strict hub
//! order through any fault, for hub streams with `allow_atomic: true`
//! (nats-server 2.12+).
//!
//! Why a window cannot keep order: the hub answers a lost publish with
//! silence. When a stream leader dies, the publishes it had not
//! replicated are gone, and a later publish of the same window that
//! reaches the new leader is stored. frond learns of the gap only from a
//! later ack, a timeout or the leader advisory, all of which can arrive
//! after it has already sent more. A RAFT log is a prefix of the old
//! leader's, so a later message is stored before an earlier lost one only
//! if it reached the *new* leader; but with several publishes in flight
//! frond cannot know when that started. nats-server's per-message
//! preconditions do not help a pipelined shared stream:
//! `Nats-Expected-Last-Subject-Sequence` needs the hub sequence of the
//! previous message (unknown until its ack), and the leader refuses a
//! second check on a subject while one is in process;
//! `Nats-Expected-Last-Msg-Id` compares with the stream's last message,
//! which is another node's in a shared stream.
//!
//! The design: one publish or one atomic batch in flight at a time.
//! - The unsent messages leave as one atomic batch of up to `max_inflight`
//!   ([`MAX_BATCH`]) messages, written back to back (pipelined within the
//!   batch): `Nats-Batch-Id` (`<8 chars of the connection token>-<n>`),
//!   `Nats-Batch-Sequence`, and `Nats-Batch-Commit: 1` on the last. Only
//!   the commit carries a reply subject (`<inbox>.b<n>`), so the hub sends
//!   one ack per batch. A lone message leaves as a plain publish.
//! - The hub stores a batch all or nothing, at consecutive sequences, in
//!   batch order; its staging lives only on the leader, so a leader change
//!   drops it whole and the commit is refused (`incomplete`).
//! - No commit is sent until the batch before it is answered (only its
//!   body may be, see "Pipelining"). An ack stores it; an error says
//!   nothing of it was stored; silence (timeout, lost connection, leader
//!   advisory) leads to the usual resync, which finds all of it or none of
//!   it. So no message is ever committed while an earlier one's fate is
//!   unknown, and hub order equals local order.
//! - Exactly once with one tag per batch (`msgid.rs`): a batch is a run of
//!   consecutive local seqs `a..=b`; the commit carries the batch id
//!   `<node>:<stream>:<a>-<b>:<tag>` (HMAC over the range and every
//!   payload's digest), the first message its own id, the others none
//!   (about 9 bytes per message less on a compressed link). The argument:
//!   1. stored: the hub stores a batch whole at consecutive seqs, commit
//!      last, or nothing. The resync (`mirror_scan.rs`) keeps the digests
//!      of the messages it read since the last verified commit (at most
//!      `MAX_BATCH` - 1) and believes a commit only if its tag verifies
//!      against the payloads of exactly the `b - a` messages before it;
//!      then it maps every message of the batch to its hub seq. The scan
//!      floor is never inside a batch (a batch in flight is above the
//!      floor; the persisted cursor stays before the first message not yet
//!      attributed; a paused scan keeps what it read), so a stored batch is
//!      always found whole.
//!   2. not stored twice: a send whose outcome is unknown (no ack, no
//!      refusal) is `pinned`; until the hub answers a send of it or a
//!      resync finds it, the next send is exactly its range with the
//!      same ids (also when the last resync no longer sees the forgery
//!      that made the first send avoid its first message's own id)
//!      ([`Mirror::hold_for_pin`]), so if the first copy is stored after
//!      the resync passed it, the hub's duplicate window holds the same
//!      commit id (and the same first-message id, which any send starting
//!      there carries, also after a restart that lost the pin) and refuses
//!      the resend whole; the next resync finds the first copy.
//!      A `duplicate` ack is not taken as proof of anything (the copy the
//!      hub holds may be a forgery): the resync checks it.
//!   3. forgeries: a hub user with publish rights on the stream cannot make
//!      frond skip (a commit id needs the key and the payloads, a replayed
//!      one verifies only after copies of every payload of the batch) or
//!      send twice (no id frond has not yet sent can be predicted). One who
//!      can also subscribe to frond's subjects sees ids in flight and can
//!      store a copy of one with other content before a lost batch is
//!      resent, so the duplicate window refuses the resend: the resync then
//!      sees the id not verify, marks it occupied, and the next send avoids
//!      it (no first id, the batch one message shorter, a lone message with
//!      the id of a batch of one, `<a>-<a>`); the original
//!      cannot be stored after a forged copy within the window. So a forger
//!      delays a batch by at most one fault backoff plus one resync per
//!      batch whose outcome was unknown (a lost batch: a link or leader
//!      fault), and by scan time for what it publishes into the filter.
//!      Such a user can also hijack a batch: nats-server does not tie a
//!      batch to the connection that opened it, so it can commit frond's
//!      staged body `a..n-1` with a message of its own (same batch id,
//!      the next batch sequence) before frond's commit. The hub then holds
//!      `a` with its verified id, `a+1..n-1` without ids and the forged
//!      tail; frond's commit is refused. The resync attributes the body by
//!      position and content after the verified first id
//!      (`mirror_follow.rs`, which argues why this never makes frond skip
//!      content the hub lacks nor send a range twice), so only `n..b` is
//!      sent again. Pipelining widens the window to a round trip, but a
//!      slow link opens it without pipelining too.
//!   4. older ids (per-message tags, untagged) are recognised as before;
//!      window mode keeps one tagged id per message.
//!   5. hub limits: a commit is checked only against its whole batch, but
//!      a limit can delete single messages of a stored batch
//!      (`max_msgs_per_subject` any of them; `max_age`, and `max_msgs` or
//!      `max_bytes` with `discard: old`, the oldest, cutting the batch at
//!      the stream's head). On such a hub stream (read from `STREAM.INFO`
//!      at each resync) every message of a batch carries its own id, as in
//!      window mode, and the resync finds the survivors one by one; the
//!      one-id saving applies only to streams without those limits (or
//!      with `discard: new`). A manual delete of a recent message of a
//!      stored batch that frond has not seen acknowledged is not in the
//!      config: the rest of that batch is then sent again (duplicates),
//!      as a deleted message is in window mode (sent again once).
//!   6. a pinned range that cannot be sent again as it was (a message of
//!      it deleted locally before the resend): the original may still be
//!      stored late, and a resend with another range shares no id with
//!      it, so the mirror waits until the hub's `duplicate_window` (from
//!      `STREAM.INFO`) has passed since that send, resyncs, and only then
//!      sends. A forgery drops the pin only if it holds an id the pinned
//!      send carried (the exact commit id, or the first message's id if
//!      that send carried it).
//!
//! Pipelining (a batch's round trip would otherwise idle a slow link;
//! `uplink.pipeline`, on by default):
//! while batch k (or a lone message) is unanswered, the body of batch k+1
//! (all but its last message) is sent; its commit, the last message, is
//! held until k's ack. nats-server 2.12 (`processJetStreamBatchMsg`)
//! stages a batch's messages on the stream leader, per batch id, and
//! checks and proposes them only at the commit, so a staged body is never
//! stored on its own, and k+1 is stored after k. If k is refused or its
//! outcome is unknown, k+1's commit is never sent (the window drop
//! abandons it, with a warning) and a [`Kill`] closes it: one empty
//! message with its batch id and a batch sequence that skips the commit's,
//! sent at once (or first thing on the next connection), ahead of the
//! resync's reads. The leader drops the staging on the gap and stores
//! nothing; without the kill it would keep the body until its batch
//! timeout (10 s from its first message, `max_batch_timeout`; a leader
//! that dies drops it with itself), holding one of the stream's open
//! batch slots and open to a hijacker's commit (see below). Until the kill
//! is answered no new body is staged, for at most that timeout. Core NATS
//! subscribers of the node's hub subjects see the kill (an empty message
//! with batch headers) as they see every batch message. An abandoned
//! batch and a later one with another id do not interact. A commit that reaches a new leader finds no staging there and
//! is answered `incomplete`. Batch ids never repeat (a connection token
//! and a counter), so an abandoned body is never committed later. The
//! pin rules above are unchanged: only a committed send is pinned (from
//! its commit on), a staged body never (it cannot be stored), and after
//! any fault the next batch goes alone, as does the first on a connection
//! (its ack, `count` = its size, proves the hub applies atomic batches
//! before a body is staged: a hub that ignored the batch headers would
//! store a body at once). At most one body is staged; the machine holds
//! one held commit and reads the next batch while one is in flight, so
//! at most two batches (`2 * max_inflight` messages) are unanswered on
//! the wire.
//!
//! A hub user who may publish to and subscribe on this node's hub
//! subjects can commit a staged body (with a message of its own) before
//! the batch ahead of it is stored, so that body lands first: order broken.
//! An abandoned body it commits before the kill reaches the leader is a
//! send whose outcome frond cannot know: until the body's first message
//! is known stored, [`Mirror::suspect_floor`] keeps the scan floor below
//! the body (an acknowledgement of frond's own resend can land above a
//! copy the hub applied after the resync read past) and a batch holding
//! that message starts with it and its own id, which the duplicate window
//! refuses while the copy exists; the resync after the refusal finds it.
//! A staged body's first message always carries its own id (one the last
//! resync saw occupied is never staged). Not covered: a restart within
//! the hub's batch timeout of such a fault forgets the body (README,
//! "ordered mode"). Such a user can copy, inject and reorder
//! messages on those subjects anyway; frond guarantees only that it never
//! loses nor duplicates what it sends, and keeps order absent such a user.
//! `uplink.pipeline = false` keeps one batch on the wire for hubs that
//! grant other users those rights (order then holds against them too,
//! except the slow-link hijack of item 3).
//!
//! A commit leaves in a write of its own, the next body in the shell's
//! next turn ([`Mirror::stage_if_due`]): on a `ws://` link each write is
//! one compressed message, which nats-server inflates only whole, so a
//! commit sharing one with a body would be answered a body later.
//!
//! Batch size: `max_inflight` (at most [`MAX_BATCH`]), halved when the hub
//! drops a batch before its commit (`incomplete`: also what a batch that
//! takes longer than the hub's 10 s batch timeout to arrive over a slow
//! link gets) or calls it too large, doubled back after each stored one
//! (a lone message too, so a size halved down to one grows back).
//!
//! Cost: with pipelining, a backlog drains at about line rate (measured in
//! the README). Hub side, a batch is held in memory on the stream leader
//! (R1 file streams: in a file) from its first message to its commit,
//! not counted against stream or account limits. nats-server 2.12 allows
//! 50 open batches per stream and 1,000 per server by default
//! (`max_batch_inflight_per_stream`, `max_batch_inflight_total` in its
//! code); a
//! batch's first message beyond either is not staged and its commit is
//! answered `incomplete`. A draining mirror keeps one batch open nearly
//! all the time (the staged one; the committed one closes at its commit),
//! plus after a fault one abandoned body until its kill reaches the
//! leader (no body is staged before the kill is answered, or 10 s): at
//! most two. So
//! a fleet of more than about 50 nodes draining into one stream at once
//! (25 right after a common fault) hits the limit: a refused batch backs
//! off like any fault (doubling from `retry_min`) and is retried with
//! half the size, down to lone messages, which the limit does not apply
//! to, so such a node keeps draining one message per round trip and grows
//! its batches back as they are stored again. For a larger fleet raise
//! the limits on the hub: nats-server 2.12.8 reads them from
//! `jetstream { limits { batch { max_inflight_per_stream: N,
//! max_inflight_total: M } } }` (checked with `nats-server -t`).

use std::time::{Duration, Instant};

use super::{
    classify_pub_reply, Command, Conn, Event, Inflight, Mirror, Phase, Reply, BATCH_HEADER_MAX,
    ERR_ATOMIC_DISABLED, ERR_BATCH_INCOMPLETE, ERR_BATCH_TOO_LARGE, ERR_MESSAGE_TOO_LARGE,
    ERR_STREAM_NOT_FOUND, MAX_BATCH,
};
use crate::stream::StoredMessage;
use crate::uplink::msgid::payload_digest;
use crate::wire::nats::headers::HeaderBlock;

/// The hub's default `max_batch_timeout` (nats-server 2.12: the time from
/// a batch's first message to its commit, not reset by later messages;
/// the hub then drops the staged batch).
pub(super) const HUB_BATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long after a commit is queued the next body may be: just enough
/// for the shell to write the commit first, on its own.
const STAGE_AFTER: Duration = Duration::from_micros(100);

/// A batch whose body (all but its last message) is on the wire while
/// the batch before it is unanswered; its commit (the last message) is
/// held here until that one is stored.
#[derive(Debug)]
pub(super) struct Staged {
    no: u64,
    seqs: Vec<u64>,
    commit: Command,
    /// When the body was queued.
    sent_at: Instant,
    /// Whether the first message carries its own id (`pin_sent`).
    keep_first: bool,
    /// Its `Nats-Batch-Id`.
    bid: String,
    /// The hub seq observed before the body was sent: a copy a hijacker
    /// commits lands above it.
    lower_bound: u64,
}

/// The message that closes an abandoned staged batch on the hub: the
/// same batch id, a `Nats-Batch-Sequence` one past the held commit's. The
/// leader sees the gap, drops what it staged, stores nothing and answers
/// `incomplete` (nats-server 2.12 `processJetStreamBatchMsg`; a batch it
/// no longer holds gets the same answer), so nobody can commit the body
/// later and its slot among the stream's open batches is free at once.
#[derive(Debug)]
pub(super) struct Kill {
    no: u64,
    bid: String,
    subject: String,
    batch_seq: usize,
}

/// Ordered mode's pipelining state (see the module doc, "Pipelining").
#[derive(Debug, Default)]
pub(super) struct Pipe {
    pub(super) staged: Option<Staged>,
    /// A batch was stored whole (`count` = its size) since the last fault
    /// on this connection: the hub applies atomic batches, so a staged
    /// body is only staged, never stored on its own.
    proven: bool,
    /// When the last abandoned body was queued: nothing is staged until
    /// its kill is answered or the hub dropped it ([`HUB_BATCH_TIMEOUT`]),
    /// so at most two batches of this mirror are open on the hub stream.
    abandoned_at: Option<Instant>,
    /// A commit was just queued: the next body is staged from this instant
    /// on, in a later write of the shell (see [`Mirror::stage_if_due`]).
    stage_at: Option<Instant>,
    /// The kill of the last abandoned body, not yet sent (no connection).
    kill: Option<Kill>,
    /// The batch number of the last kill sent, until it is answered.
    kill_sent: Option<u64>,
    /// Bodies staged and commits released (tests, status), abandoned
    /// bodies closed by a kill the hub answered.
    pub(super) staged_total: u64,
    pub(super) released_total: u64,
    pub(super) killed_total: u64,
    /// Abandoned bodies a hijacker may have committed before their kill
    /// reached the leader: first local seq -> the body's `lower_bound`.
    /// Until the first message is known stored (acknowledged or found by
    /// a resync), the scan floor stays at or below that bound and a batch
    /// holding it starts with it ([`Mirror::suspect_floor`]).
    suspects: std::collections::BTreeMap<u64, u64>,
    /// The scan floor this process started from (its cursor record's):
    /// a send of the process before (its state is lost) may be stored
    /// late, above that floor, after this process's first resync passed
    /// it. The hub stores a stream's proposals in order, so once a send of
    /// this process is acknowledged, every such copy is stored below it:
    /// one more resync from this floor (`verifying`) finds them all, and
    /// the floor goes. Until then messages leave one at a time, each with
    /// its own id: the first message the first resync did not find, `m`,
    /// can be in a late batch only as its first message (everything
    /// before `m` is on the hub), which carries `m`'s own id, so the hub
    /// answers the resend "duplicate" with the copy's seq and the resync
    /// after it scans from there.
    pub(super) restart_floor: Option<u64>,
    /// The resync that ends `restart_floor` is under way.
    verifying: bool,
}

impl Pipe {
    /// A fault or a new connection: a staged body is never committed (its
    /// [`Kill`] closes it on the hub), and the next batch goes alone until
    /// one is stored whole.
    fn abandon(&mut self) -> Option<(u64, u64)> {
        self.proven = false;
        self.stage_at = None;
        let s = self.staged.take()?;
        self.abandoned_at = Some(s.sent_at);
        if let Some(&a) = s.seqs.first() {
            let lb = self.suspects.entry(a).or_insert(s.lower_bound);
            *lb = (*lb).min(s.lower_bound);
        }
        if let Command::Publish { subject, .. } = &s.commit {
            self.kill = Some(Kill {
                no: s.no,
                bid: s.bid,
                subject: subject.clone(),
                batch_seq: s.seqs.len() + 1,
            });
        }
        Some((*s.seqs.first()?, *s.seqs.last()?))
    }
}

impl Mirror {
    /// The window is dropped (a fault, a new connection): a staged body
    /// is never committed ([`Pipe::abandon`]).
    pub(super) fn abandon_staged(&mut self) {
        let mut suspects = std::mem::take(&mut self.pipe.suspects);
        suspects.retain(|&a, _| self.unresolved(a));
        self.pipe.suspects = suspects;
        if let Some((a, b)) = self.pipe.abandon() {
            self.events.push_back(Event::Warning(format!(
                "the next batch (messages {a}..={b}) was staged on hub stream {} but not committed: it is closed on the hub and sent again after the resync",
                self.p.hub_stream
            )));
        }
    }

    /// Send the kill of an abandoned body ([`Kill`]) when connected: on
    /// the connection that staged it or, if that one is gone, on the next
    /// (the hub keeps a staged body per stream, not per connection, until
    /// its batch timeout or a leader change).
    pub(super) fn flush_kill(&mut self) {
        let Some(conn) = &self.conn else { return };
        let Some(k) = self.pipe.kill.take() else {
            return;
        };
        let mut hb = HeaderBlock::new();
        hb.push("Nats-Batch-Id", k.bid);
        hb.push("Nats-Batch-Sequence", k.batch_seq.to_string());
        let Ok(headers) = hb.encode() else { return };
        self.commands.push_back(Command::Publish {
            subject: k.subject,
            reply: format!("{}.k{}", conn.inbox, k.no),
            headers,
            payload: Vec::new(),
        });
        self.pipe.kill_sent = Some(k.no);
    }

    /// The hub answered the kill of abandoned batch `no`: whatever the
    /// answer (`incomplete` as a rule), the leader holds no staging for
    /// it any more, so a body may be staged again without waiting out the
    /// hub's batch timeout.
    pub(super) fn handle_kill_reply(&mut self, no: u64) {
        if self.pipe.kill_sent == Some(no) {
            self.pipe.kill_sent = None;
            self.pipe.abandoned_at = None;
            self.pipe.killed_total += 1;
        }
    }

    /// The lowest hub seq at which an abandoned body whose first message
    /// is not yet known stored may have been committed by a hijacker
    /// (`u64::MAX`: none). The scan floor stays at or below it, so the
    /// resync that follows the duplicate-window refusal of the resend
    /// (which starts with that first message and its own id, see
    /// [`Mirror::pick`]) finds the hijacked copy, however far frond's own
    /// acknowledgements moved on.
    pub(super) fn suspect_floor(&self) -> u64 {
        let restart = self.pipe.restart_floor.filter(|_| self.atomic);
        self.pipe
            .suspects
            .iter()
            .filter(|(&a, _)| self.unresolved(a))
            .map(|(_, &lb)| lb)
            .chain(restart)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// A resync ended: the one that checked below this process's first
    /// acknowledgement ends `restart_floor`.
    pub(super) fn resync_done(&mut self) {
        if std::mem::take(&mut self.pipe.verifying) {
            self.pipe.restart_floor = None;
        }
    }

    /// The hub stream was recreated or lost messages: its sequences
    /// restarted, so the floors kept for late copies start at 0 too.
    pub(super) fn rebase_floors(&mut self) {
        self.pipe.suspects.values_mut().for_each(|lb| *lb = 0);
        if let Some(f) = &mut self.pipe.restart_floor {
            *f = 0;
        }
    }

    /// Whether `seq` is the first message of an abandoned body not yet
    /// known stored: a batch holding it must start with it.
    fn suspect_start(&self, seq: u64) -> bool {
        self.pipe.suspects.contains_key(&seq) && self.unresolved(seq)
    }

    /// Whether local `seq` is not yet known to be on the hub.
    fn unresolved(&self, seq: u64) -> bool {
        seq > self.l && !self.stored.contains_key(&seq)
    }

    /// The shell's next turn after a commit was queued: stage the next
    /// body. The commit thus leaves in a write of its own, one WebSocket
    /// message on a `ws://` link (`ws.rs`): nats-server inflates a
    /// compressed message only whole, so a commit sharing a message with
    /// the next body would be answered only after that body arrived, and
    /// the link would idle for a round trip per batch.
    pub(super) fn stage_if_due(&mut self, now: Instant) {
        if self.pipe.stage_at.is_some_and(|t| now >= t) {
            self.pipe.stage_at = None;
            self.pump(now);
        }
    }

    /// When [`Mirror::stage_if_due`] wants a tick.
    pub(super) fn stage_deadline(&self) -> Option<Instant> {
        self.pipe.stage_at
    }

    /// Ordered mode's pump: when nothing is in flight, commit the staged
    /// batch or send the next batch (or lone message) from `pending`;
    /// while a batch is in flight, stage the next one's body; ask for
    /// more.
    pub(super) fn pump_ordered(&mut self, now: Instant) {
        if self.phase != Phase::Streaming {
            return;
        }
        let Some(conn) = self.conn.clone() else {
            return;
        };
        if self.pipe.restart_floor.is_some()
            && !self.pipe.verifying
            && self.acked > 0
            && self.inflight.is_empty()
            && self.pipe.staged.is_none()
        {
            // This process's first acknowledgement: check below it once.
            self.pipe.verifying = true;
            self.drop_window();
            return self.start_resync(now);
        }
        if self.inflight.is_empty() {
            if let Some(s) = self.pipe.staged.take() {
                self.release_staged(now, s);
            }
        }
        if !self.inflight.is_empty() {
            self.stage_next(now, &conn);
            return self.read_more();
        }
        self.batch.clear();
        // Until this process's first acknowledgement, one message at a
        // time (`restart_floor`).
        let cap = if self.single_next || self.pipe.restart_floor.is_some() {
            1
        } else {
            self.batch_cap.min(self.p.max_inflight).clamp(1, MAX_BATCH)
        };
        let pin = self.pinned;
        let cap = pin.map_or(cap, |(a, b)| (b - a + 1) as usize);
        let mut picked = self.pick(&conn, cap, pin.is_some());
        if self.hold_for_pin(now, &mut picked) {
            if self.phase == Phase::Streaming {
                self.read_more();
            }
            return;
        }
        self.trim_occupied(&mut picked, self.pinned.is_some());
        if !picked.is_empty() {
            self.send_ordered(now, &conn.inbox, picked, false);
            self.pipe.stage_at = Some(now + STAGE_AFTER);
        }
        self.read_more();
    }

    /// Stage the next batch's body behind the batch in flight, its commit
    /// held: only after a batch was stored whole on this connection, not
    /// within the hub's batch timeout of an abandoned body, one at a time,
    /// a full batch (or all there is), at least two messages.
    fn stage_next(&mut self, now: Instant, conn: &Conn) {
        let quiet = self
            .pipe
            .abandoned_at
            .is_some_and(|t| now < t + HUB_BATCH_TIMEOUT);
        if !self.p.pipeline
            || self.pipe.staged.is_some()
            || !self.pipe.proven
            || self.single_next
            || quiet
        {
            return;
        }
        if self.pipe.stage_at.is_some_and(|t| now < t) {
            return; // the commit's own write first
        }
        let cap = self.batch_cap.min(self.p.max_inflight).clamp(1, MAX_BATCH);
        if self.pending.len() < cap && self.next_read <= self.local_last_seq {
            return; // more to read first
        }
        let mut picked = self.pick(conn, cap, false);
        self.trim_occupied(&mut picked, false);
        if picked.len() < 2 {
            for (m, _) in picked.into_iter().rev() {
                self.pending.push_front(m);
            }
            return;
        }
        self.send_ordered(now, &conn.inbox, picked, true);
    }

    /// The batch before the staged one is stored: send its commit. From
    /// now on it is the batch in flight (pinned until answered).
    fn release_staged(&mut self, now: Instant, s: Staged) {
        let (Some(&first), Some(&last)) = (s.seqs.first(), s.seqs.last()) else {
            return;
        };
        self.commands.push_back(s.commit);
        for &seq in &s.seqs {
            self.inflight.insert(
                seq,
                Inflight {
                    sent_at: now,
                    lower_bound: self.latest,
                },
            );
        }
        self.batch = s.seqs;
        self.batches = s.no;
        self.pinned = Some((first, last));
        self.pin_sent = Some((now, s.keep_first));
        self.pin_gone = false;
        self.sent += 1;
        self.pipe.released_total += 1;
        self.pipe.stage_at = Some(now + STAGE_AFTER);
    }

    /// Up to `cap` messages from `pending` for one batch: consecutive
    /// local seqs, within the budget (a pinned range, `whole`, is taken
    /// whole once the budget lets it start), skipping what can never be
    /// stored.
    fn pick(&mut self, conn: &Conn, cap: usize, whole: bool) -> Vec<(StoredMessage, HeaderBlock)> {
        let mut picked: Vec<(StoredMessage, HeaderBlock)> = Vec::new();
        let mut bytes = 0u64;
        while picked.len() < cap
            && (self.budget.is_none_or(|b| b > bytes) || (whole && !picked.is_empty()))
        {
            let Some(m) = self.pending.pop_front() else {
                break;
            };
            if m.seq <= self.l || self.stored.contains_key(&m.seq) {
                continue;
            }
            // A batch is a run of consecutive local seqs: its id names
            // them by range.
            // An abandoned body's first message starts a batch: its own
            // id lets the hub's duplicate window refuse the resend if a
            // hijacker committed the body (`suspect_floor`).
            if picked.last().is_some_and(|(p, _)| p.seq + 1 != m.seq)
                || (!picked.is_empty() && !whole && self.suspect_start(m.seq))
            {
                self.pending.push_front(m);
                break;
            }
            let hb = self.header_block(&m);
            let wire = match self.encode_publish(&m, &hb, "-") {
                Ok(w) => w,
                Err(e) => {
                    self.skip(m.seq, e);
                    continue;
                }
            };
            let size = wire.1;
            if size > conn.max_payload {
                let max = conn.max_payload;
                let e = format!("{size} bytes with headers exceed the hub's max_payload of {max}");
                self.skip(m.seq, e);
                continue;
            }
            // A message too big to carry the batch headers leaves alone.
            let alone = size + BATCH_HEADER_MAX > conn.max_payload;
            if alone && !picked.is_empty() {
                self.pending.push_front(m);
                break;
            }
            bytes += wire.0 as u64;
            picked.push((m, hb));
            if alone {
                break;
            }
        }
        picked
    }

    /// A range whose commit id a forgery occupies in the duplicate window
    /// (seen by the last resync) would be refused until the window
    /// expires: end the batch one message earlier. A first message whose
    /// own id a forgery occupies leaves alone (with the id of a batch of
    /// one), unless the range is pinned: a batch body without a verified
    /// first id could be hijacked (`mirror_follow.rs`) with nothing to
    /// attribute it by.
    fn trim_occupied(&mut self, picked: &mut Vec<(StoredMessage, HeaderBlock)>, pinned: bool) {
        let (first_held, commit_held) = self.ids_occupied(picked);
        if picked.len() > 1 && first_held && !pinned && !self.own_ids {
            for (m, _) in picked.drain(1..).rev() {
                self.pending.push_front(m);
            }
            return;
        }
        if picked.len() > 2 && commit_held {
            if let Some((m, _)) = picked.pop() {
                self.pending.push_front(m);
            }
        }
    }

    /// The rule for a send whose outcome is unknown (`pinned`: no ack, no
    /// refusal, e.g. the link or the leader died with it in flight): until
    /// a resync finds it or the hub answers a send of it, the next batch is
    /// exactly its range, so its commit id (and its first message's id)
    /// are the ones the hub's duplicate window may hold. Returns true when
    /// nothing is to be sent now (`picked` goes back to `pending`, or the
    /// mirror waits). The pin is dropped when a resync finds a message of
    /// the range stored (`mirror_scan.rs`), or a forgery holds an id that send carried (the exact
    /// commit id, or the first message's id if that send carried it: the
    /// original cannot be stored later within the window either). When
    /// the range cannot be sent again as it was (a message of it deleted
    /// locally), the original may still be stored late: the mirror waits
    /// until the hub's `duplicate_window` has passed since that send, then
    /// resyncs (which finds it if it was stored) and sends anew.
    fn hold_for_pin(
        &mut self,
        now: Instant,
        picked: &mut Vec<(StoredMessage, HeaderBlock)>,
    ) -> bool {
        let Some((a, b)) = self.pinned else {
            return false;
        };
        let first = picked.first().map_or(0, |p| p.0.seq);
        let end = picked.last().map_or(0, |p| p.0.seq);
        let unread = self.next_read <= b && !self.pin_gone;
        if first == a && end < b && self.pending.is_empty() && unread {
            for (m, _) in picked.drain(..).rev() {
                self.pending.push_front(m);
            }
            return true;
        }
        if first == a && end == b {
            let (first_held, commit_held) = self.ids_occupied(picked);
            let carried_first = self.pin_sent.is_some_and(|p| p.1);
            if commit_held || (first_held && carried_first) {
                self.pinned = None;
            }
            return false;
        }
        if picked.is_empty() && !self.pin_gone {
            return false;
        }
        // The range cannot be repeated: wait out the duplicate window.
        let until = self.pin_sent.map_or(now, |p| p.0 + self.dup_window);
        self.pin_gone = false;
        if now >= until {
            self.pinned = None;
            return false;
        }
        picked.clear();
        self.drop_window();
        self.set_error(format!(
            "messages {a}..={b} were sent to hub stream {} without an answer and cannot be sent again as they were (deleted locally): waiting out the hub's duplicate window ({:?}) before resyncing and sending on, so a late copy is not stored twice",
            self.p.hub_stream, self.dup_window
        ));
        self.phase = Phase::Wait { until };
        true
    }

    /// The ids a send of `picked` would carry: the first message's own and
    /// (more than one message) the batch's commit id.
    fn send_ids(
        &self,
        picked: &[(StoredMessage, HeaderBlock)],
    ) -> (Option<String>, Option<String>) {
        let (node, stream) = (&self.p.node, &self.p.stream);
        let first = picked.first().map(|(m, _)| self.msg_id(m));
        let commit = match (picked.first(), picked.last()) {
            (Some(f), Some(l)) if picked.len() > 1 && !self.own_ids => {
                let digests: Vec<[u8; 32]> = picked
                    .iter()
                    .map(|(m, _)| payload_digest(&m.payload))
                    .collect();
                Some(
                    self.p
                        .id_key
                        .batch_id(node, stream, (f.0.seq, l.0.seq), &digests),
                )
            }
            _ => None,
        };
        (first, commit)
    }

    /// Whether the last resync found a forgery holding the first message's
    /// id, and the commit id, of a send of `picked`.
    fn ids_occupied(&self, picked: &[(StoredMessage, HeaderBlock)]) -> (bool, bool) {
        if self.occupied.is_empty() {
            return (false, false);
        }
        let (first, commit) = self.send_ids(picked);
        let held = |id: Option<String>| id.is_some_and(|i| self.occupied.contains(&i));
        (held(first), held(commit))
    }

    /// Ask for more local messages when fewer than a batch wait.
    fn read_more(&mut self) {
        let want = match self.pinned {
            Some((a, b)) => (b - a + 1) as usize,
            None => self.batch_cap.min(self.p.max_inflight).max(1),
        };
        if self.pending.len() < want && self.read_from.is_none() {
            self.read_from = Some(self.next_read);
            self.read_issued = false;
        }
    }

    /// The wire size of `m` published with `hb`, and the size the hub
    /// counts against `max_payload` (headers + payload).
    fn encode_publish(
        &self,
        m: &StoredMessage,
        hb: &HeaderBlock,
        reply: &str,
    ) -> Result<(usize, usize), String> {
        let headers = hb.encode().map_err(|e| format!("bad header: {e}"))?;
        let size = headers.len() + m.payload.len();
        let cmd = Command::Publish {
            subject: format!("{}{}", self.p.subject_prefix, m.subject),
            reply: reply.to_string(),
            headers,
            payload: Vec::new(),
        };
        let mut wire = Vec::new();
        cmd.encode(&mut wire)
            .map_err(|e| format!("cannot be sent: {e}"))?;
        Ok((wire.len() + m.payload.len(), size))
    }

    fn send_ordered(
        &mut self,
        now: Instant,
        inbox: &str,
        picked: Vec<(StoredMessage, HeaderBlock)>,
        stage: bool,
    ) {
        let n = picked.len();
        self.batches += 1;
        // A staged body's commit is held: `stage` needs a batch (n > 1).
        let stage = stage && n > 1;
        // Short: compressed, every message repeats it. Unique among the
        // batches open on the stream with 48 random bits per connection;
        // a collision only makes both batches incomplete (retried).
        let token = inbox.strip_prefix("_INBOX.").unwrap_or(inbox);
        let id = format!("{}-{}", &token[..token.len().min(8)], self.batches);
        let (first, last_seq) = match (picked.first(), picked.last()) {
            (Some(f), Some(l)) => (f.0.seq, l.0.seq),
            _ => return,
        };
        // A lone message whose own id a forgery occupies leaves with the
        // id of a batch of one (`<a>-<a>`), which the forgery cannot hold.
        // The pinned range goes again with the ids it carried, whatever
        // the last resync saw occupied (the duplicate window holds those).
        let keep_first = match (self.pinned, self.pin_sent) {
            (Some(p), Some((_, kept))) if p == (first, last_seq) && !stage => kept,
            _ => !self.ids_occupied(&picked).0,
        };
        // A hub stream whose limits can split a stored batch: every
        // message keeps its own id (a commit needs its batch whole).
        let commit_id = ((n > 1 && !self.own_ids) || !keep_first).then(|| {
            let digests: Vec<[u8; 32]> = picked
                .iter()
                .map(|(m, _)| payload_digest(&m.payload))
                .collect();
            let (node, stream) = (&self.p.node, &self.p.stream);
            self.p
                .id_key
                .batch_id(node, stream, (first, last_seq), &digests)
        });
        // The first message keeps its own id (identical in any send that
        // starts with it) unless a forgery occupies it. A staged body is
        // pinned when its commit leaves.
        if !stage {
            self.pinned = Some((first, last_seq));
            self.pin_sent = Some((now, keep_first));
            self.pin_gone = false;
        }
        let mut seqs = Vec::with_capacity(n);
        for (i, (m, mut hb)) in picked.into_iter().enumerate() {
            let last = i + 1 == n;
            if let Some(cid) = &commit_id {
                let own = if i == 0 { keep_first } else { self.own_ids };
                if last || !own {
                    hb.entries
                        .retain(|(k, _)| !k.eq_ignore_ascii_case("Nats-Msg-Id"));
                }
                if last {
                    hb.push("Nats-Msg-Id", cid.clone());
                }
            }
            let reply = match (n, last) {
                (1, _) => format!("{inbox}.{}", m.seq),
                (_, true) => format!("{inbox}.b{}", self.batches),
                (_, false) => String::new(),
            };
            if n > 1 {
                hb.push("Nats-Batch-Id", id.clone());
                hb.push("Nats-Batch-Sequence", (i + 1).to_string());
                if last {
                    hb.push("Nats-Batch-Commit", "1".to_string());
                }
            }
            let headers = match hb.encode() {
                Ok(h) => h,
                // Checked without the batch headers, which are plain ASCII.
                Err(e) => return self.fault(now, format!("cannot encode batch headers: {e}")),
            };
            let cmd = Command::Publish {
                subject: format!("{}{}", self.p.subject_prefix, m.subject),
                reply,
                headers,
                payload: m.payload,
            };
            if let Some(b) = &mut self.budget {
                let mut wire = Vec::new();
                let _ = cmd.encode(&mut wire);
                *b = b.saturating_sub(wire.len() as u64);
            }
            if stage && last {
                seqs.push(m.seq);
                self.pipe.staged = Some(Staged {
                    no: self.batches,
                    seqs: std::mem::take(&mut seqs),
                    commit: cmd,
                    sent_at: now,
                    keep_first,
                    bid: id.clone(),
                    lower_bound: self.latest,
                });
                self.pipe.staged_total += 1;
                return;
            }
            self.commands.push_back(cmd);
            self.sent += 1;
            if stage {
                seqs.push(m.seq);
                continue;
            }
            self.inflight.insert(
                m.seq,
                Inflight {
                    sent_at: now,
                    lower_bound: self.latest,
                },
            );
            self.batch.push(m.seq);
        }
        self.single_next = false;
    }

    /// The answer to batch `no`'s commit. An answer to an older batch is
    /// ignored: that batch was dropped, and the resync that followed finds
    /// what it stored.
    pub(super) fn handle_batch_reply(
        &mut self,
        now: Instant,
        no: u64,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) {
        // While a body is staged, the batch in flight is the one before.
        let current = self.batches - u64::from(self.pipe.staged.is_some());
        if no != current || self.batch.len() < 2 || self.phase != Phase::Streaming {
            return;
        }
        let n = self.batch.len() as u64;
        let (first, last) = (self.batch[0], self.batch[self.batch.len() - 1]);
        let hub = self.p.hub_stream.clone();
        let reply = classify_pub_reply(headers, payload);
        if !matches!(reply, Reply::Garbage(_)) {
            // Stored, or refused whole: its fate is known.
            self.pinned = None;
        }
        match reply {
            Reply::Ok { seq, count, .. } if count == n && seq >= n => {
                let base = seq - n + 1;
                for (i, local) in std::mem::take(&mut self.batch).into_iter().enumerate() {
                    self.inflight.remove(&local);
                    if local > self.l {
                        self.stored.insert(local, Some(base + i as u64));
                    }
                }
                self.latest = seq;
                self.acked += n;
                self.pipe.proven = true;
                self.batch_cap = self.batch_cap.saturating_mul(2).min(MAX_BATCH);
                self.fail_streak = 0;
                self.last_error = None;
                self.advance();
                self.pump(now);
            }
            Reply::Ok { count, .. } => self.fault(
                now,
                format!("hub stream {hub} acknowledged the batch of messages {first}..={last} as {count} messages, not {n}: the hub does not apply atomic batches (nats-server 2.12+ needed)"),
            ),
            Reply::ApiErr(e) if e.err_code == ERR_MESSAGE_TOO_LARGE => {
                // Which message is too large is unknown: send one at a
                // time until the batch's first message is through.
                self.single_next = true;
                self.restream(now);
            }
            Reply::ApiErr(e) if e.err_code == ERR_BATCH_TOO_LARGE => {
                self.batch_cap = (self.batch.len() / 2).max(1);
                self.restream(now);
            }
            Reply::ApiErr(e) if e.err_code == ERR_ATOMIC_DISABLED => {
                self.atomic = false;
                self.events.push_back(Event::Warning(format!(
                    "hub stream {hub} no longer allows atomic batches: publishing with a window (order through a leader change not guaranteed)"
                )));
                self.restream(now);
            }
            Reply::ApiErr(e) if e.err_code == ERR_STREAM_NOT_FOUND => self.stream_missing(now),
            Reply::ApiErr(e) if e.err_code == ERR_BATCH_INCOMPLETE => {
                // A leader change lost the staging, too many batches are
                // open on the stream, or the batch took longer than the
                // hub's batch timeout (10 s) to arrive over a slow link:
                // smaller batches, after the fault's backoff.
                self.batch_cap = (self.batch.len() / 2).max(1);
                self.fault(
                    now,
                    format!(
                        "hub dropped the atomic batch of messages {first}..={last} before its commit ({}; a leader change, too many open batches on stream {hub}, or a slow link): retrying with batches of {}",
                        e.description, self.batch_cap
                    ),
                )
            }
            Reply::ApiErr(e) => self.fault(
                now,
                format!(
                    "hub refused the atomic batch of messages {first}..={last} for stream {hub}: {} (code {}, err_code {})",
                    e.description, e.code, e.err_code
                ),
            ),
            Reply::Duplicate { seq } => {
                // The resync checks the copy, wherever the floor is.
                self.latest = self.latest.min(seq.saturating_sub(n));
                self.fault(
                now,
                format!("hub stream {hub} already holds the id of the batch of messages {first}..={last}; resyncing"),
            )
            }
            Reply::NoResponders => self.fault(
                now,
                format!("no JetStream stream answered the batch of messages {first}..={last}: hub stream {hub} is unavailable or does not capture this subject"),
            ),
            Reply::Garbage(g) => self.fault(now, g),
        }
    }

    /// A batch was refused whole (nothing of it stored): send again from
    /// the cursor.
    fn restream(&mut self, now: Instant) {
        self.drop_window();
        self.next_read = self.l + 1;
        self.pump(now);
    }
}
