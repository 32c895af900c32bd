//! Content attribution after a verified first id (ordered mode of the
//! mirror-up machine, [`super::Mirror`]): the resync's answer to a
//! hijacked atomic batch.
//!
//! The attack: nats-server does not tie an atomic batch to the
//! connection that opened it. A hub user with publish rights on the hub
//! stream and subscribe rights on frond's subjects sees a batch's body
//! live (headers included, before the commit), and publishes a message
//! of its own with that `Nats-Batch-Id`, the next `Nats-Batch-Sequence`
//! and `Nats-Batch-Commit: 1`. The hub stores frond's `a..n-1` followed
//! by the forger's message; frond's commit is answered `incomplete`. The
//! resync then sees `a`'s own verified id, `a+1..n-1` without ids, and no
//! commit that verifies: without more, `a+1..n-1` are sent again
//! (duplicates, repeatable for every batch).
//!
//! What this module owns: runs. When the scan meets a message whose own
//! id verifies for local `a` (the first message of a batch), the hub
//! messages at the hub seqs directly after it that carry no id are
//! recorded, in order, as candidates for local `a+1, a+2, …` (subject and
//! payload digest, [`content_digest`]; at most [`MAX_BATCH`] - 1 of them).
//! When frond reads local message `m` and the run's previous local seq
//! was the anchor or matched, `m` is stored at the candidate's hub seq if
//! subject (with the `subject_prefix`) and payload are equal; the first
//! mismatch or local gap ends the run. A commit that verifies attributes
//! as before (and ends the run).
//!
//! Soundness, against the threat model of `mirror_order.rs` (point 3):
//! - Skip: a local message is taken as stored only if the hub holds its
//!   exact subject and payload, at its own position in the run (one hub
//!   message per local message, so repeated identical payloads are
//!   counted exactly), right after frond's own verified first message.
//!   Whoever published that copy, the content is on the hub once. Headers
//!   are not compared, as the batch tag covers payloads only.
//! - Frond sending twice: only a frond send whose outcome is unknown
//!   could still store a second copy of a message attributed here. In one
//!   process there is at most one such send, the pinned one (point 2;
//!   a staged body is never committed later): no candidate is recorded
//!   for a local seq inside an unresolved pinned range, so that range is
//!   still resent exactly as it was and the duplicate window refuses a
//!   late copy. A send that started at the anchor carries the anchor's
//!   id, which the hub holds: its late copy is refused whole.
//! - Restart: a send from before a restart is not pinned any more, and a
//!   run that ended at the stream's end may since have been extended (a
//!   forger appends copies of the lost send's body), so a resync could
//!   start the next send later than the lost one started, sharing no id
//!   with it. So runs are only recorded once the hub's `duplicate_window`
//!   has passed since this machine's first resync: by then no send from
//!   before the restart can be stored (the assumption of point 6).
//! - Replays of a first id after the window: the copy with the genuine
//!   id and payload is content frond sent; what follows is attributed
//!   only if it is also frond's content, in order; nothing frond has in
//!   flight can still land (above).
//! - Scan floor and `recent`: runs only add attributions; `recent` and
//!   commit checks are unchanged. A resync's scan resumes after what the
//!   last one read, so runs up to there are kept; a scan that reads a
//!   position again (a lower floor, a recreated stream) drops them all
//!   and records them anew as it reads their anchors again (also an
//!   anchor the cursor has passed: the run after it may not be).
//! - Not covered, pipelining only: a forger can commit the body of a
//!   batch whose commit frond holds (batch k+1 while k is unanswered):
//!   k+1 is then stored before k (out of order; exactly once). And
//! - abandoned bodies: a forger can also commit a body
//!   frond abandoned (pipelining, after a fault) while the hub still
//!   stages it: until frond's kill of it reaches the leader (sent at once,
//!   ahead of the resync's reads; up to the hub's 10 s batch timeout when
//!   the kill is lost with the link). The resend of such a body starts
//!   with its first message and that message's own id, and the scan
//!   floor stays below the body until that message is known stored
//!   (`mirror_order.rs`, [`Mirror::suspect_floor`]), so a copy is refused
//!   or found, not stored twice; only a restart in between forgets it.
//! - Window mode and streams whose batches carry an id per message
//!   (`own_ids`) record no runs.

use std::time::Instant;

use super::super::msgid::content_digest;
use super::{Mirror, MAX_BATCH};
use crate::stream::StoredMessage;

/// Most runs kept per resync.
const RUNS_MAX: usize = 64;

/// A verified first message at local `anchor` and the hub messages
/// without ids right after it.
#[derive(Debug)]
struct Run {
    anchor: u64,
    /// The last local seq of the run taken as stored (`anchor` at first).
    matched: u64,
    /// The hub seq the next candidate must have.
    next_hub: u64,
    /// (hub seq, content digest) of the candidates for `anchor + 1 + i`.
    cands: Vec<(u64, [u8; 32])>,
    /// The scan may still extend it.
    open: bool,
}

/// The runs of the current resync (see the module doc).
#[derive(Debug, Default)]
pub(super) struct Follow {
    runs: Vec<Run>,
    /// This machine's first resync: runs are recorded only once the
    /// duplicate window has passed since.
    born: Option<Instant>,
}

impl Mirror {
    /// A resync starts: its scan resumes after `latest`, so runs up to
    /// there stay (an open one may go on).
    pub(super) fn follow_reset(&mut self, now: Instant) {
        let latest = self.latest;
        self.follow.runs.retain(|r| r.next_hub <= latest + 1);
        if self.follow.born.is_none() {
            self.follow.born = Some(now);
            self.pipe.restart_floor = Some(latest);
        }
    }

    /// The scan read `hub_seq`: one before a run's end (a rescan from an
    /// earlier floor, a recreated stream) drops every run.
    fn follow_seen(&mut self, hub_seq: u64) {
        if self.follow.runs.iter().any(|r| hub_seq < r.next_hub) {
            self.follow.runs.clear();
        }
    }

    /// The scan met a message whose own id verifies for local `local`, at
    /// `hub_seq`: a run may start there.
    pub(super) fn follow_anchor(&mut self, now: Instant, local: u64, hub_seq: u64) {
        self.follow_seen(hub_seq);
        self.follow_close();
        let settled = self.follow_settled(now);
        if !self.atomic || self.own_ids || !settled || self.follow.runs.len() >= RUNS_MAX {
            return;
        }
        self.follow.runs.push(Run {
            anchor: local,
            matched: local,
            next_hub: hub_seq + 1,
            cands: Vec::new(),
            open: true,
        });
    }

    /// The scan met a message without an id: the open run takes it if it
    /// is next in hub order, else the run ends.
    pub(super) fn follow_extend(&mut self, hub_seq: u64, subject: &str, payload: &[u8]) {
        self.follow_seen(hub_seq);
        let pinned = self.pinned;
        let Some(run) = self.follow.runs.last_mut().filter(|r| r.open) else {
            return;
        };
        let local = run.anchor + 1 + run.cands.len() as u64;
        let in_pin = pinned.is_some_and(|(a, b)| (a..=b).contains(&local));
        if hub_seq != run.next_hub || in_pin || run.cands.len() + 1 >= MAX_BATCH {
            run.open = false;
            return;
        }
        run.cands.push((hub_seq, content_digest(subject, payload)));
        run.next_hub += 1;
    }

    /// Any other message (one with an id, a verified commit): the open
    /// run ends.
    pub(super) fn follow_close(&mut self) {
        if let Some(run) = self.follow.runs.last_mut() {
            run.open = false;
        }
    }

    /// Local message `m` was read: the hub seq of its copy in a run, if
    /// the run holds it at its position with the same subject and
    /// payload and every local message of the run before it matched.
    pub(super) fn take_follow(&mut self, m: &StoredMessage) -> Option<u64> {
        if self.follow.runs.is_empty() {
            return None;
        }
        let subject = format!("{}{}", self.p.subject_prefix, m.subject);
        let want = content_digest(&subject, &m.payload);
        let mut hit = None;
        for run in &mut self.follow.runs {
            if run.matched + 1 != m.seq {
                continue;
            }
            let i = (m.seq - run.anchor - 1) as usize;
            match run.cands.get(i) {
                Some(&(hub_seq, d)) if d == want && hit.is_none() => {
                    run.matched = m.seq;
                    hit = Some(hub_seq);
                }
                _ => run.cands.clear(),
            }
        }
        let l = m.seq;
        self.follow
            .runs
            .retain(|r| r.anchor + (r.cands.len() as u64) > l && r.matched + 1 >= l);
        hit
    }
}

impl Mirror {
    /// Whether the hub's duplicate window has passed since this machine's
    /// first resync: runs are recorded from then on (the simulation's
    /// hijacker waits for it).
    /// Scripted tests of the steady state: as if this process had made
    /// its start check (`restart_floor` in `mirror_order.rs`) at `now`.
    #[cfg(test)]
    pub(super) fn assume_started(&mut self, now: Instant) {
        self.follow.born = Some(now);
    }

    pub(super) fn follow_settled(&self, now: Instant) -> bool {
        self.follow.born.is_some_and(|b| now >= b + self.dup_window)
    }
}
