//! The resync of the mirror-up machine ([`super::Mirror`]): which hub
//! messages after the scan floor are ours.
//!
//! Steps, each one request with its own reply subject (`<inbox>.r<n>`, so
//! a late answer to an abandoned request is ignored):
//! 1. `STREAM.INFO` (the stream leader answers; without a leader a
//!    replica may, its answer then has no `cluster.leader`): whether the
//!    hub stream allows atomic batches (ordered mode, see
//!    `mirror_order.rs`) and direct gets, and its identity
//!    ([`Mirror::check_identity`]: recreated, a lagging replica, or
//!    acknowledged messages lost); a missing stream is reported and
//!    waited for.
//! 2. The scan from `latest + 1` over the mirror's filter (the floor,
//!    `Mirror::floor`; lowered to a copy's hub seq when a resend is
//!    answered "duplicate" with a seq below it: a copy stored after an
//!    earlier scan passed that position, e.g. a publish in flight across a
//!    recreation of the hub stream, or a hijacked abandoned body, see
//!    `mirror_order.rs`, is then checked instead of stored again once the
//!    duplicate window passed): batched direct
//!    gets (`$JS.API.DIRECT.GET.<stream>`, [`SCAN_BATCH`] messages or
//!    [`SCAN_BATCH_BYTES`] per round trip, replies parsed by
//!    [`super::super::source::parse_reply`]) when the stream allows them,
//!    else `MSG.GET` (one message per round trip).
//!
//! Invariant: the scan ends only on a leader's word. Any replica answers
//! a direct get once it is about 90% caught up, so it holds a prefix of
//! the stream: the messages it returns are true, but its "nothing more"
//! is not. When a direct batch ends with nothing pending, a `MSG.GET`
//! after the last message seen (answered by the leader) decides: nothing
//! found ends the scan, a message found is recorded and the batched scan
//! goes on after it. A direct get that fails (no responders, an old
//! server) or goes unanswered (a hub user without publish rights on
//! `$JS.API.DIRECT.GET.<stream>` gets only an `-ERR`) turns direct gets
//! off until the next connection.
//!
//! Permissions: the hub user needs publish on `$JS.API.STREAM.INFO.<hub>`,
//! `$JS.API.STREAM.MSG.GET.<hub>` (and `$JS.API.DIRECT.GET.<hub>` for
//! batched reads) and on the mirrored subjects, and subscribe on
//! `_INBOX.>`. nats-server answers a denied publish with an `-ERR
//! 'Permissions Violation for Publish to "<subject>"'` and nothing on the
//! reply subject; [`Mirror::handle_hub_error`] turns one on a subject of
//! this mirror into a status error naming the permission to grant and a
//! pause of `retry_max` before the next try (a permission does not come
//! back by itself), instead of a resync timeout that looks like a slow
//! hub. A denied direct get only turns direct gets off.

use std::time::Instant;

use serde::Deserialize;

use super::super::msgid::{batch_range, content_digest, payload_digest, untagged_seq};
use super::{
    ApiError, Command, Event, Mirror, Phase, Step, ERR_NO_MESSAGE_FOUND, ERR_STREAM_NOT_FOUND,
    MAX_BATCH, SCAN_BATCH, SCAN_BATCH_BYTES, UNTAGGED_MAX,
};
use crate::stream::StoredMessage;
use crate::uplink::cursor::CREATED_MAX;
use crate::uplink::source::{parse_reply, Reply, BEHIND_CHECKS, ERROR_RETRY};
use crate::wire::nats::base64;
use crate::wire::nats::headers::HeaderBlock;

#[derive(Deserialize)]
struct GetJson {
    message: Option<GetMessage>,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct GetMessage {
    seq: u64,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct InfoJson {
    config: Option<InfoConfig>,
    created: String,
    state: Option<InfoState>,
    /// Absent on a standalone server (its answer is authoritative).
    cluster: Option<InfoCluster>,
    error: Option<ApiError>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct InfoCluster {
    /// Empty while the stream has no leader: a replica answered.
    leader: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct InfoState {
    last_seq: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct InfoConfig {
    allow_atomic: bool,
    allow_direct: bool,
    max_msgs_per_subject: i64,
    max_msgs: i64,
    max_bytes: i64,
    /// Nanoseconds, as are `duplicate_window`'s.
    max_age: u64,
    duplicate_window: u64,
    discard: String,
}

impl InfoConfig {
    /// Whether a limit of the stream can remove some messages of a stored
    /// atomic batch and keep others: a per-subject limit (any message), an
    /// age limit, or a count or size limit that discards old messages (the
    /// oldest batch, cut at the stream's head). `discard: new` refuses new
    /// messages instead of removing old ones.
    fn can_split_batches(&self) -> bool {
        let discard_old = !self.discard.eq_ignore_ascii_case("new");
        self.max_msgs_per_subject > 0
            || self.max_age > 0
            || (discard_old && (self.max_msgs > 0 || self.max_bytes > 0))
    }
}

fn no_responders(headers: Option<&[u8]>) -> bool {
    headers
        .and_then(|h| HeaderBlock::parse(h).ok())
        .and_then(|hb| hb.status)
        == Some(503)
}

impl Mirror {
    pub(super) fn start_resync(&mut self, now: Instant) {
        self.resyncs += 1;
        // What the scan read up to `latest` stays: it resumes after it.
        let latest = self.latest;
        self.recent.retain(|r| r.0 <= latest);
        self.occupied.clear();
        self.follow_reset(now);
        self.unverified = 0;
        self.first_unverified = None;
        self.phase = Phase::Resync {
            scanned: 0,
            sent_at: now,
            step: Step::Info,
        };
        let subject = format!("$JS.API.STREAM.INFO.{}", self.p.hub_stream);
        self.request(now, subject, Vec::new(), Step::Info);
    }

    /// Send one resync request with a fresh reply subject.
    fn request(&mut self, now: Instant, subject: String, payload: Vec<u8>, step: Step) {
        let Some(conn) = &self.conn else { return };
        self.epoch += 1;
        self.commands.push_back(Command::Publish {
            subject,
            reply: format!("{}.r{}", conn.inbox, self.epoch),
            headers: Vec::new(),
            payload,
        });
        if let Phase::Resync {
            sent_at, step: s, ..
        } = &mut self.phase
        {
            *sent_at = now;
            *s = step;
        }
    }

    fn send_get(&mut self, now: Instant) {
        let body = serde_json::json!({"seq": self.latest + 1, "next_by_subj": self.filter()});
        let subject = format!("$JS.API.STREAM.MSG.GET.{}", self.p.hub_stream);
        self.request(now, subject, body.to_string().into_bytes(), Step::Get);
    }

    fn send_direct(&mut self, now: Instant) {
        let body = serde_json::json!({
            "seq": self.latest + 1, "next_by_subj": self.filter(),
            "batch": SCAN_BATCH, "max_bytes": SCAN_BATCH_BYTES,
        });
        let subject = format!("$JS.API.DIRECT.GET.{}", self.p.hub_stream);
        self.request(
            now,
            subject,
            body.to_string().into_bytes(),
            Step::Direct { got: 0 },
        );
    }

    /// The next scan request: batched when the hub stream allows it.
    fn scan_on(&mut self, now: Instant) {
        if self.direct {
            self.send_direct(now)
        } else {
            self.send_get(now)
        }
    }

    /// An answer on the current resync request's reply subject.
    pub(super) fn handle_resync_reply(
        &mut self,
        now: Instant,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) {
        match self.phase {
            Phase::Resync {
                step: Step::Info, ..
            } => self.on_info(now, headers, payload),
            Phase::Resync {
                step: Step::Get, ..
            } => self.on_get(now, headers, payload),
            Phase::Resync {
                step: Step::Direct { got },
                ..
            } => self.on_direct(now, got, headers, payload),
            _ => {}
        }
    }

    fn on_info(&mut self, now: Instant, headers: Option<&[u8]>, payload: &[u8]) {
        if no_responders(headers) {
            return self.fault(
                now,
                "the hub's JetStream API did not respond (no responders); is JetStream enabled?"
                    .into(),
            );
        }
        let info: InfoJson = match serde_json::from_slice(payload) {
            Ok(i) => i,
            Err(e) => {
                return self.fault(
                    now,
                    format!("unexpected STREAM.INFO reply from the hub: {e}"),
                )
            }
        };
        if info.error.is_none() {
            let last_seq = info.state.as_ref().map(|s| s.last_seq);
            let leader = info.cluster.as_ref().is_none_or(|c| !c.leader.is_empty());
            if !self.check_identity(now, &info.created, last_seq, leader) {
                return;
            }
        }
        let hub = &self.p.hub_stream;
        if let Some(e) = info.error {
            if e.err_code == ERR_STREAM_NOT_FOUND {
                return self.stream_missing(now);
            }
            let why = format!(
                "hub refused STREAM.INFO for stream {hub}: {} (code {}, err_code {}); the hub user needs $JS.API.STREAM.INFO.{hub} and $JS.API.STREAM.MSG.GET.{hub}",
                e.description, e.code, e.err_code
            );
            return self.fault(now, why);
        }
        let config = info.config.unwrap_or_default();
        self.atomic = config.allow_atomic;
        self.own_ids = config.can_split_batches();
        if config.duplicate_window > 0 {
            self.dup_window = std::time::Duration::from_nanos(config.duplicate_window);
        }
        self.direct = config.allow_direct && !self.direct_failed;
        if !self.atomic && !self.warned_unordered {
            self.warned_unordered = true;
            self.events.push_back(Event::Warning(format!(
                "hub stream {hub} does not allow atomic batches: a stream leader change can store a message up to max_inflight ({}) places late; for strict order set allow_atomic on it (nats-server 2.12+)",
                self.p.max_inflight
            )));
        }
        self.scan_on(now);
    }

    /// A hub stream recreated since the last resync or the cursor record
    /// (another `created`, or, while `created` is unknown, fewer messages
    /// than the scan floor) holds none of the old stream's messages, and
    /// ours published into it since may lie below the floor (acks lost):
    /// the scan starts at its first message. The same `created` with
    /// fewer messages is [`Mirror::behind`] when no leader answered
    /// (`leader` false), else [`Mirror::hub_lost`]. False: the resync
    /// waits.
    fn check_identity(
        &mut self,
        now: Instant,
        created: &str,
        last_seq: Option<u64>,
        leader: bool,
    ) -> bool {
        // An implausible `created` is not kept (nor put in the record).
        let created = if created.len() > CREATED_MAX {
            ""
        } else {
            created
        };
        let known = self.hub_created.as_deref().filter(|_| !created.is_empty());
        let fewer = last_seq.is_some_and(|l| l < self.latest);
        let other = known.is_some_and(|c| c != created);
        if fewer && known == Some(created) {
            if !leader {
                self.behind(now, last_seq.unwrap_or(0));
                return false;
            }
            self.hub_lost(last_seq.unwrap_or(0));
        }
        self.behind = 0;
        // Only while `created` is unknown: a lagging replica answering
        // STREAM.INFO (no leader) also shows fewer messages.
        let shorter = self.hub_created.is_none() && fewer;
        if other || shorter {
            self.recreated += 1;
            let (hub, old) = (&self.p.hub_stream, self.hub_created.as_deref());
            let what = if other {
                format!(
                    "was recreated (created {:?}, now {created:?})",
                    old.unwrap_or("")
                )
            } else {
                format!(
                    "holds fewer messages than this mirror saw (last sequence {}, scan floor {}): it was recreated or lost messages",
                    last_seq.unwrap_or(0),
                    self.latest
                )
            };
            self.events.push_back(Event::Warning(format!(
                "hub stream {hub} {what}; local messages up to {} were acknowledged by the old stream and are not sent again; scanning the stream from its first message",
                self.l
            )));
            self.latest = 0;
            self.rebase_floors();
        }
        if !created.is_empty() {
            self.hub_created = Some(created.to_string());
        }
        true
    }

    /// Without a leader, a replica that lags answered STREAM.INFO (same
    /// `created`, a last sequence below the scan floor). Not a recreation:
    /// nothing is sent, and the check is repeated after [`ERROR_RETRY`] (at
    /// once on a leader advisory), for as long as the stream has no leader
    /// (it cannot store anything meanwhile either); an error in status
    /// after [`BEHIND_CHECKS`] answers in a row.
    fn behind(&mut self, now: Instant, last_seq: u64) {
        self.behind = self.behind.saturating_add(1);
        let retry = ERROR_RETRY.min(self.p.retry_max);
        if self.behind >= BEHIND_CHECKS {
            let (hub, floor) = (&self.p.hub_stream, self.latest);
            let created = self.hub_created.as_deref().unwrap_or("");
            self.set_error(format!(
                "hub stream {hub} (created {created}) has no leader: a replica answered that it ends at sequence {last_seq}, below the {floor} this mirror saw; nothing is sent until the stream has a leader again (check the hub cluster: a majority of the stream's peers must be up), checking every {retry:?}"
            ));
        }
        self.phase = Phase::Wait { until: now + retry };
    }

    /// The stream's leader (or a standalone server) says the hub stream,
    /// same `created`, ends at `last_seq`, below the scan floor: the hub
    /// lost acknowledged messages (restored from a backup, a memory stream
    /// after a cluster restart, a crash losing its unsynced tail). A purge
    /// keeps the last sequence, so this is a loss. The lost hub messages
    /// were the last `floor - last_seq` (ours among them): L drops by that
    /// many plus one window (window mode may have stored a resent message
    /// up to a window late), and the whole stream is scanned (ours above
    /// the new L that survived are found, so nothing is stored twice); the
    /// rest is sent again once.
    fn hub_lost(&mut self, last_seq: u64) {
        let lost = self.latest - last_seq;
        let old_l = self.l;
        let margin = lost.saturating_add(self.p.max_inflight as u64);
        self.l = self.l.saturating_sub(margin);
        self.recreated += 1;
        // Hub seqs seen above `last_seq` are gone; the scan finds again
        // whatever survived, so only the skips (never storable) stay.
        self.stored.retain(|_, h| h.is_none());
        self.untagged.clear();
        self.recent.clear();
        let (hub, floor) = (&self.p.hub_stream, self.latest);
        let created = self.hub_created.as_deref().unwrap_or("");
        self.events.push_back(Event::Warning(format!(
            "hub stream {hub} (created {created}) lost acknowledged messages: its leader says it ends at sequence {last_seq}, below the {floor} this mirror saw (restored from a backup, memory storage restarted, or a crash lost its unsynced tail); local messages {}..={old_l} that it lacks are sent again, scanning the stream from its first message",
            self.l + 1
        )));
        self.latest = 0;
        self.rebase_floors();
    }

    fn on_get(&mut self, now: Instant, headers: Option<&[u8]>, payload: &[u8]) {
        if no_responders(headers) {
            return self.fault(
                now,
                "the hub's JetStream API did not respond (no responders); is JetStream enabled?"
                    .into(),
            );
        }
        let reply: GetJson = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                return self.fault(now, format!("unexpected MSG.GET reply from the hub: {e}"))
            }
        };
        if let Some(e) = reply.error {
            if e.err_code == ERR_STREAM_NOT_FOUND {
                return self.stream_missing(now);
            }
            if e.code == 404 || e.err_code == ERR_NO_MESSAGE_FOUND {
                return self.finish_resync(now);
            }
            return self.fault(
                now,
                format!(
                    "hub refused resync read on stream {}: {} (code {}, err_code {})",
                    self.p.hub_stream, e.description, e.code, e.err_code
                ),
            );
        }
        let Some(m) = reply.message else {
            return self.fault(now, "MSG.GET reply has neither message nor error".into());
        };
        let id = m
            .hdrs
            .as_deref()
            .and_then(|h| base64::decode(h.as_bytes()).ok())
            .and_then(|raw| HeaderBlock::parse(&raw).ok())
            .and_then(|hb| hb.get("Nats-Msg-Id").map(str::to_string));
        let data = match m.data.as_deref().map(|d| base64::decode(d.as_bytes())) {
            Some(Ok(d)) => d,
            None => Vec::new(),
            Some(Err(e)) => return self.fault(now, format!("MSG.GET reply with bad data: {e}")),
        };
        if self.record(now, (m.seq, &m.subject), id.as_deref(), &data) {
            self.scan_on(now);
        }
    }

    fn on_direct(&mut self, now: Instant, got: u64, headers: Option<&[u8]>, payload: &[u8]) {
        match parse_reply(headers, payload) {
            Reply::Msg {
                seq,
                subject,
                headers,
                payload,
                ..
            } => {
                let id = headers.as_ref().and_then(|hb| hb.get("Nats-Msg-Id"));
                if self.record(now, (seq, &subject), id, &payload) {
                    // The rest of the batch is on its way.
                    if let Phase::Resync { sent_at, step, .. } = &mut self.phase {
                        *sent_at = now;
                        *step = Step::Direct { got: got + 1 };
                    }
                }
            }
            Reply::End { pending } if got > 0 && pending.is_some_and(|p| p > 0) => {
                self.send_direct(now)
            }
            // The replica found nothing more: the leader confirms.
            Reply::End { .. } | Reply::NotFound => self.send_get(now),
            Reply::Fail(why) => {
                self.direct = false;
                self.direct_failed = true;
                self.events.push_back(Event::Warning(format!(
                    "batched resync read of hub stream {} failed ({why}); reading one message per round trip on this connection",
                    self.p.hub_stream
                )));
                self.send_get(now);
            }
        }
    }

    /// An `-ERR` the hub sent on this connection (which stays up). Returns
    /// whether it concerned this mirror (then it is in status and events).
    pub fn handle_hub_error(&mut self, now: Instant, text: &str) -> bool {
        let Some(subject) = text
            .split_once("Publish to \"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(s, _)| s.to_string())
        else {
            return false;
        };
        let hub = self.p.hub_stream.clone();
        let api = |op: &str| format!("$JS.API.{op}.{hub}");
        let resync = [api("STREAM.INFO"), api("STREAM.MSG.GET")].contains(&subject);
        let data = !self.p.subject_prefix.is_empty() && subject.starts_with(&self.p.subject_prefix);
        if subject == api("DIRECT.GET") {
            let reading = matches!(
                self.phase,
                Phase::Resync {
                    step: Step::Direct { .. },
                    ..
                }
            );
            self.direct = false;
            self.direct_failed = true;
            self.events.push_back(Event::Warning(format!(
                "the hub user may not publish to {subject}: resyncs read one message per round trip; grant it for batched reads"
            )));
            if reading {
                self.send_get(now);
            }
            return true;
        }
        if !resync && !data {
            return false;
        }
        let what = if resync {
            format!(
                "publish on {} and {} (and {} for batched resync reads)",
                api("STREAM.INFO"),
                api("STREAM.MSG.GET"),
                api("DIRECT.GET")
            )
        } else {
            format!("publish on {}>", self.p.subject_prefix)
        };
        let e = format!(
            "the hub user may not publish to {subject} (permissions violation), so mirror {} -> {hub} cannot {}: grant the hub user {what}; retrying every {:?}",
            self.p.stream,
            if resync { "resync" } else { "send" },
            self.p.retry_max
        );
        self.drop_window();
        self.fail_streak = self.fail_streak.saturating_add(1);
        self.set_error(e);
        self.phase = Phase::Wait {
            until: now + self.p.retry_max,
        };
        true
    }

    /// A hub message at `hub_seq` with `subject` seen by the scan. Returns
    /// whether the scan goes on (false: it faulted or paused at the scan
    /// cap). Only an id whose tag verifies against the message's payload
    /// counts as ours; an untagged one (a frond before the tags) is kept
    /// for comparison with the local message ([`Mirror::take_untagged`]);
    /// a tagged one that does not verify is forged (or made with another
    /// key) and only counted.
    fn record(
        &mut self,
        now: Instant,
        (hub_seq, subject): (u64, &str),
        msg_id: Option<&str>,
        payload: &[u8],
    ) -> bool {
        let Phase::Resync { scanned, .. } = self.phase else {
            return false;
        };
        if hub_seq <= self.latest {
            let e = format!(
                "hub returned seq {hub_seq} for a request after {}",
                self.latest
            );
            self.fault(now, e);
            return false;
        }
        let digest = payload_digest(payload);
        if let Some(range) = msg_id.and_then(|id| batch_range(&self.p.node, &self.p.stream, id)) {
            if self.record_commit(hub_seq, msg_id.unwrap_or_default(), range, digest) {
                self.follow_close();
                return self.scanned(now, hub_seq, scanned);
            }
        }
        self.recent.push_back((hub_seq, digest));
        if self.recent.len() >= MAX_BATCH {
            self.recent.pop_front();
        }
        if msg_id.is_none() {
            self.follow_extend(hub_seq, subject, payload);
        } else {
            self.follow_close();
        }
        match msg_id.and_then(|id| self.our_seq(id, payload)) {
            Some(Ok(local)) if local > self.l => {
                self.found_pinned(local, local);
                self.stored.insert(local, Some(hub_seq));
                self.follow_anchor(now, local, hub_seq);
            }
            // Read again from a lower floor (a rescan drops the runs): the
            // run after it may still hold messages after the cursor.
            Some(Ok(local)) => self.follow_anchor(now, local, hub_seq),
            Some(Err(local)) if local > self.l => {
                let (node, stream) = (&self.p.node, &self.p.stream);
                let untagged = msg_id.and_then(|id| untagged_seq(node, stream, id));
                if untagged.is_some() && self.untagged.len() < UNTAGGED_MAX {
                    let digest = content_digest(subject, payload);
                    self.untagged.insert((local, hub_seq), digest);
                    return self.scanned(now, hub_seq, scanned);
                }
                self.unverified += 1;
                self.first_unverified.get_or_insert(hub_seq);
                if let Some(id) = msg_id.filter(|_| self.occupied.len() < UNTAGGED_MAX) {
                    self.occupied.insert(id.to_string());
                }
            }
            _ => {}
        }
        self.scanned(now, hub_seq, scanned)
    }

    /// A hub message at `hub_seq` whose id names the batch of local
    /// messages `first..=last`. It is the commit of that batch, stored
    /// whole at the hub seqs just before it, only if those were all read
    /// by this scan (`recent`) and the id's tag verifies against their
    /// payloads and this one's ([`super::super::msgid::IdKey::verify_batch`]):
    /// then every message of the batch is recorded as stored and true
    /// returned. Otherwise the message is treated as any other (and a
    /// range above the cursor counted as unverified: forged, or another
    /// key). An atomic batch is never split by the hub, and the scan
    /// floor is never inside one (a scan resumes before `recent`), so a
    /// genuine commit always finds its batch in `recent`.
    fn record_commit(
        &mut self,
        hub_seq: u64,
        id: &str,
        (first, last): (u64, u64),
        digest: [u8; 32],
    ) -> bool {
        let n = (last - first + 1) as usize;
        let k = self.recent.len();
        let base = hub_seq.checked_sub(n as u64 - 1);
        let tail = k
            .checked_sub(n - 1)
            .map(|skip| self.recent.iter().skip(skip));
        let verified = match (base, tail) {
            (Some(base), Some(tail)) => {
                let tail: Vec<(u64, [u8; 32])> = tail.copied().collect();
                let consecutive = tail.iter().enumerate().all(|(i, r)| r.0 == base + i as u64);
                let mut digests: Vec<[u8; 32]> = tail.iter().map(|r| r.1).collect();
                digests.push(digest);
                consecutive
                    && self
                        .p
                        .id_key
                        .verify_batch(&self.p.node, &self.p.stream, id, &digests)
            }
            _ => false,
        };
        let Some(base) = base.filter(|_| verified) else {
            if last > self.l {
                self.unverified += 1;
                self.first_unverified.get_or_insert(hub_seq);
                if self.occupied.len() < UNTAGGED_MAX {
                    self.occupied.insert(id.to_string());
                }
            }
            return false;
        };
        self.found_pinned(first, last);
        for (i, local) in (first..=last).enumerate() {
            if local > self.l {
                self.stored.insert(local, Some(base + i as u64));
            }
        }
        // Nothing before a commit belongs to a later batch.
        self.recent.clear();
        true
    }

    /// Local messages `first..=last` were found stored: a pinned send that
    /// holds any of them is resolved (a batch is stored whole or not at
    /// all).
    fn found_pinned(&mut self, first: u64, last: u64) {
        if self.pinned.is_some_and(|(a, b)| first <= b && last >= a) {
            self.pinned = None;
        }
    }

    /// The scan passed `hub_seq`, the `scanned`th message of this round.
    fn scanned(&mut self, now: Instant, hub_seq: u64, scanned: u64) -> bool {
        self.latest = hub_seq;
        let scanned = scanned + 1;
        if scanned >= self.p.scan_cap {
            self.advance();
            let e = format!(
                "resync of hub stream {} examined {scanned} messages without reaching the end (progress kept, continuing after a pause); set a subject_prefix so the scan only reads this node's messages",
                self.p.hub_stream
            );
            self.set_error(e);
            self.phase = Phase::Wait {
                until: now + self.p.retry_max,
            };
            return false;
        }
        if let Phase::Resync { scanned: s, .. } = &mut self.phase {
            *s = scanned;
        }
        true
    }

    /// Local message `m` was read: the hub seq of a hub message with an
    /// untagged id naming it and the same subject (after the
    /// `subject_prefix`) and payload, which proves `m` reached the hub
    /// (from a frond before the tags). Every untagged candidate for `m`
    /// is decided; those with other content are forged and logged.
    pub(super) fn take_untagged(&mut self, m: &StoredMessage) -> Option<u64> {
        if self.untagged.is_empty() {
            return None;
        }
        let subject = format!("{}{}", self.p.subject_prefix, m.subject);
        let want = content_digest(&subject, &m.payload);
        let found: Vec<((u64, u64), bool)> = self
            .untagged
            .range((m.seq, 0)..=(m.seq, u64::MAX))
            .map(|(&k, d)| (k, *d == want))
            .collect();
        let mut hit = None;
        for ((local, hub_seq), same) in found {
            self.untagged.remove(&(local, hub_seq));
            if same {
                hit = hit.or(Some(hub_seq));
                continue;
            }
            self.events.push_back(Event::Warning(format!(
                "hub stream {} holds a message at hub seq {hub_seq} whose Nats-Msg-Id (old format, no signature) names local message {local} of stream {} but whose subject or payload differ: ignored, the local message is sent. Another hub user may forge frond's ids: check who may publish to {}",
                self.p.hub_stream, self.p.stream, self.filter()
            )));
        }
        hit
    }

    fn finish_resync(&mut self, now: Instant) {
        if self.unverified > 0 {
            let (n, first) = (self.unverified, self.first_unverified.unwrap_or(0));
            self.events.push_back(Event::Warning(format!(
                "hub stream {} holds {n} message(s) (first at hub seq {first}) whose Nats-Msg-Id names a not yet confirmed message of local stream {} but whose signature does not verify: ignored, the local messages are sent. Either another hub user forges frond's ids (check who may publish to {}), or the uplink id key (<data_dir>/uplink/node.key) was replaced",
                self.p.hub_stream, self.p.stream, self.filter()
            )));
            self.unverified = 0;
            self.first_unverified = None;
        }
        if self.stream_missing {
            self.stream_missing = false;
            self.events.push_back(Event::StreamFound);
        }
        if self.fail_streak == 0 {
            self.last_error = None;
        }
        // The stream's end is a batch boundary (batches are stored whole).
        self.recent.clear();
        self.advance();
        self.resync_done();
        self.events.push_back(Event::Resynced {
            hub_seq: self.latest,
            cursor: self.l,
            found_above_gap: self.stored.len(),
            backlog: self.local_last_seq.saturating_sub(self.l),
        });
        self.phase = Phase::Streaming;
        self.batch.clear();
        self.pending.clear();
        self.next_read = self.l + 1;
        self.pump(now);
    }
}
