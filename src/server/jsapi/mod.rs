//! The JetStream API for local streams: an internal service on the router
//! that answers `$JS.API.…` requests and `$JS.ACK.…` acknowledgements, so
//! local programs use frond's streams with ordinary JetStream clients.
//!
//! Owns: the consumers of every local stream ([`crate::stream::consumer`]),
//! their files (`<stream dir>/consumers/<name>.json`), waiting pull
//! requests, and retention by acknowledgement (`interest`, `workqueue`).
//!
//! Seam: the service subscribes to `$JS.API.>`, `$JS.ACK.>` and `$JS.FC.>` on the
//! router like a NATS connection (its own [`Outbox`]) and publishes its
//! replies through the router; the NATS shell needs no change. Deliveries
//! to a pull request's inbox keep the stored subject ([`Broker::route_to`]).
//!
//! Supported: `INFO`, `STREAM.NAMES`, `STREAM.LIST`, `STREAM.INFO`,
//! `STREAM.MSG.GET` (seq, last_by_subj, next_by_subj), `STREAM.MSG.DELETE`,
//! `STREAM.PURGE` (filter, seq, keep), `CONSUMER.CREATE`,
//! `CONSUMER.DURABLE.CREATE`, `CONSUMER.INFO`, `CONSUMER.DELETE`,
//! `CONSUMER.NAMES`, `CONSUMER.LIST`, `CONSUMER.MSG.NEXT` (pull: batch,
//! max_bytes, expires, no_wait, idle_heartbeat), `DIRECT.GET` (streams
//! with `allow_direct`; see `direct`), `STREAM.CREATE`,
//! `STREAM.UPDATE`, `STREAM.DELETE` (streams over the API, see `admin`:
//! frond.toml streams stay authoritative and cannot be updated or deleted
//! over the API). Who may create, update or delete is decided, as for
//! every call, by the publish permission on the API subject
//! (`$JS.API.STREAM.CREATE.<name>`…); as in nats-server, a stream's
//! subjects are not checked against its creator's publish permissions
//! (capture stores what others publish, each publish checked for its own
//! publisher).
//! Push consumers
//! (`deliver_subject`, `deliver_group`, `flow_control` with `$JS.FC.`
//! replies, `idle_heartbeat`, `headers_only`, `rate_limit_bps`, `backoff`,
//! `replay_policy` instant/original; see `push`) and the stock clients'
//! ordered consumers (an ephemeral push consumer its client recreates
//! under the same name at a new start replaces the old one). Deliver
//! policies: all, last, new, by_start_sequence, by_start_time and
//! last_per_subject (resolved against the stream at creation, see
//! `backlog`).
//!
//! Key/Value: the stock clients' KV APIs work on these calls unchanged —
//! a bucket is stream `KV_<b>` on `$KV.<b>.>` (created, inspected and
//! deleted with `STREAM.CREATE/INFO/DELETE`); put, create, update (CAS via
//! `Nats-Expected-Last-Subject-Sequence`, refused with 10071), delete and
//! purge are JetStream publishes with KV headers; get is a direct get
//! (or `STREAM.MSG.GET`); history, keys and the watchers are ordered push
//! consumers (`all`, `last_per_subject` with `headers_only`, `new`,
//! `by_start_sequence`) whose initial phase ends on the delivery with
//! `pending = 0`, so `num_pending` is exact (`backlog`).
//!
//! The stock clients' Object Store needs nothing of its own: a bucket is
//! stream `OBJ_<b>` (chunks on `$O.<b>.C.<nuid>`, one rolled-up info
//! message per object on `$O.<b>.M.<name>`) read back through an ordered
//! push consumer, so streams over the API, rollups, purge by filter and
//! flow control are all it uses (tests/object_store.rs). `sealed` is
//! refused; a put cut short leaves its chunks and no info message (the
//! README says how an operator purges them).
//!
//! Ack reply subjects are nats-server's
//! `$JS.ACK.<stream>.<consumer>.<delivered>.<stream_seq>.<consumer_seq>.<timestamp_ns>.<pending>`,
//! written by one function ([`crate::stream::consumer::ack_subject`]) for
//! pull and push deliveries alike.
//!
//! Layout: [`JsApi`] is the service's state and takes `now` from its
//! caller; it reads no clock, and touches the disk only through `files`
//! (the consumer state, kept by [`crate::state::consumers`]). `call`
//! parses a request subject and dispatches it to `streams`, `admin`
//! (create/update/delete, with `stream_cfg` reading the JSON config),
//! `messages` or `consumers`; `pull` holds pull requests, acks and
//! delivery; `push` delivers push consumers and takes flow control
//! replies; `retention`
//! removes what acknowledgement retention no longer keeps; `render` the
//! JSON shapes; `task` the async loop that drives it all.
//!
//! Invariants:
//! - Bounded in bytes per iteration: requests are taken one by one until
//!   [`REQUEST_BYTES`] are taken or [`ANSWER_BUDGET`] bytes of answers
//!   wait (the rest waits in the inbox for the next iteration, after
//!   these answers are routed); consumer deliveries, pull and push
//!   together, stop at [`DELIVERY_BUDGET`] and resume round-robin with
//!   the next consumer (pull and push take turns going first); lists and `STREAM.INFO` subjects are paged with
//!   nats-server's limits and `offset` (see `streams`).
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
//! - Push consumers deliver on their creator's behalf: creation is refused
//!   (403) when the creator may not subscribe to the `deliver_subject`
//!   (it could aim stream messages where it could not receive them
//!   itself; nats-server checks nothing), and every delivery is checked
//!   against the creator's permissions (a subject its `deny_subscribe`
//!   covers is stepped over). After a restart a durable push consumer
//!   keeps the exclusions fixed at its creation (or last update).
//! - Replacing and updating a consumer: an ephemeral push consumer that a
//!   create request would replace (a new deliver subject or start, as the
//!   ordered consumers do) is replaced only for the user it acts for;
//!   anyone else gets 10013 "consumer name already in use" (nats-server
//!   refuses such a change while the old deliver subject has interest).
//!   A create with the identical config is idempotent for anyone allowed
//!   to read what it delivers. An update (another config under the same
//!   name) needs the same rights as a create — the updater may read all
//!   the consumer delivers and, for a push consumer, may subscribe and
//!   publish to the deliver subject — and from then on the consumer acts
//!   for the updater (deliveries are checked against its permissions and
//!   exclusions). A pull consumer cannot become a push one nor the
//!   reverse (10012, nats-server's texts).
//!   `num_pending` is exact (nats-server's): the messages the consumer
//!   will still deliver, counted with the store's `count_matching` after
//!   each batch read and for `CONSUMER.INFO`/`LIST`/`CREATE`; excluded
//!   subjects are subtracted unless two exclusions overlap (then it is an
//!   upper bound).
//! - Names that become files (consumer and durable names) pass
//!   [`crate::stream::names`] before anything else; the answers use nats-server's
//!   codes (10127 path separator, 10102 too long, 10103 otherwise).
//! - A stream holds at most [`MAX_CONSUMERS`] consumers, whoever created
//!   them: any user allowed to publish `CONSUMER.CREATE` for a stream can
//!   fill them (as in nats-server without account limits); restrict
//!   `allow_publish` on `$JS.API.CONSUMER.>` to trusted users.
//! - Wills carry permissions that allow nothing, so no will is answered
//!   (see [`crate::broker::bridge::will_publisher`]).

mod admin;
mod backlog;
mod call;
mod consumers;
mod direct;
mod files;
mod messages;
mod pull;
mod push;
mod render;
mod retention;
mod stream_cfg;
mod streams;
mod task;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_bounds;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::router::Msg;
use crate::stream::consumer::{ApiError, Consumer};
use crate::stream::{Retention, Storage, StreamHandle};

pub use admin::{api_stream_configs, Admin};
pub use call::{parse_call, Call, NOT_AUTHORIZED};
pub use render::{rfc3339, stream_config_json};
pub use task::serve;

use call::not_found_stream;
use files::load_consumers;

/// Bytes of requests and acks queued for the service before it is "slow".
const INBOX_BYTES: usize = 64 << 20;
/// Bytes of requests and acks taken per loop iteration.
const REQUEST_BYTES: usize = 1 << 20;
/// Bytes of answers waiting to be routed past which the loop takes no
/// more requests this iteration: with the largest single answer
/// ([`direct::DIRECT_MAX_BYTES`], a list page) or the pipelined
/// single-message direct gets (at most [`direct::DIRECT_PIPELINE`] stored
/// messages whose largest possible sizes add up to at most this budget, or
/// one message) on top, one iteration holds a bounded number of answer
/// bytes, whatever the peers ask.
const ANSWER_BUDGET: usize = 16 << 20;
/// Bytes of messages all consumers (pull and push together) deliver per
/// loop iteration; each consumer's turn starts where the last iteration
/// stopped, so none is starved.
const DELIVERY_BUDGET: usize = 8 << 20;
/// Messages examined for retention per loop iteration.
const RETENTION_BUDGET: usize = 4096;
/// Consumers per stream (bounds memory and files).
pub const MAX_CONSUMERS: usize = 1024;
/// How often the mirror cursors are looked at (mirrored streams only).
const MIRROR_POLL: Duration = Duration::from_millis(100);

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

/// The replies and deliveries of one iteration and their bytes (what the
/// loop bounds, see [`ANSWER_BUDGET`] and [`DELIVERY_BUDGET`]).
#[derive(Default)]
struct OutBuf {
    items: Vec<Out>,
    bytes: usize,
    /// Of `bytes`, those of consumer deliveries.
    delivered: usize,
}

impl OutBuf {
    fn push(&mut self, o: Out) {
        self.bytes = self.bytes.saturating_add(o.0.len() + o.1.size());
        self.items.push(o);
    }

    /// A consumer's delivery (counted against [`DELIVERY_BUDGET`]).
    fn deliver(&mut self, o: Out) {
        let before = self.bytes;
        self.push(o);
        self.delivered += self.bytes - before;
    }

    /// Whether this iteration's deliveries have used [`DELIVERY_BUDGET`].
    fn delivery_full(&self) -> bool {
        self.delivered >= DELIVERY_BUDGET
    }
}

/// A status message for a pull request: (inbox, code, text, pending).
type StatusOut = (String, u16, &'static str, Option<(usize, usize)>);

/// The service's state.
pub struct JsApi {
    slots: Vec<Slot>,
    started: u64,
    api_total: u64,
    api_errors: u64,
    out: OutBuf,
    /// Managing streams over the API ([`admin`]).
    admin: Option<Admin>,
    /// Streams opened since the task last looked ([`JsApi::take_created`]).
    created: Vec<StreamHandle>,
    /// Single-message direct gets in flight together (see [`direct`]).
    direct: direct::Pending,
    /// Where the next iteration's pull and push deliveries start (an index
    /// into all consumers, in stream and name order), so the consumers
    /// share [`DELIVERY_BUDGET`] round-robin.
    pull_turn: usize,
    push_turn: usize,
    /// Push consumers deliver before pull ones this iteration (alternates,
    /// see [`JsApi::deliver_all`]).
    push_first: bool,
    /// The last delivery pass stopped at [`DELIVERY_BUDGET`]: run again
    /// without waiting.
    budget_cut: bool,
}

/// The slot of stream `h`: its consumers loaded from `streams_dir`.
fn new_slot(h: &StreamHandle, streams_dir: &Path, mirrored: &[String], now: u64) -> Slot {
    let name = h.config().name.clone();
    let dir = (h.config().storage == Storage::File)
        .then(|| crate::stream::names::path_in(streams_dir, &name, ""))
        .and_then(|d| match d {
            Ok(d) => Some(d.join("consumers")),
            Err(e) => {
                log::error!("jetstream: stream {name:?}: {e}; its consumers are not persisted");
                None
            }
        });
    let mut consumers = BTreeMap::new();
    if let Some(d) = &dir {
        for c in load_consumers(d, &name, now) {
            consumers.insert(c.name.clone(), c);
        }
    }
    let st = h.state();
    let check = if h.config().retention == Retention::Limits || st.msgs == 0 {
        Vec::new()
    } else {
        vec![(st.first_seq, st.last_seq)]
    };
    Slot {
        handle: h.clone(),
        dir,
        consumers,
        mirrored: mirrored.contains(&name),
        mirror_cursor: 0,
        check,
        seen_last: st.last_seq,
    }
}

impl JsApi {
    /// Load the consumers of every stream. `streams_dir` holds one
    /// directory per stream; `mirrored` names the streams mirrored to the hub.
    pub fn open(
        streams: &[StreamHandle],
        streams_dir: &Path,
        mirrored: &[String],
        now: u64,
    ) -> JsApi {
        let slots = streams
            .iter()
            .map(|h| new_slot(h, streams_dir, mirrored, now))
            .collect();
        JsApi {
            slots,
            started: now,
            api_total: 0,
            api_errors: 0,
            out: OutBuf::default(),
            admin: None,
            created: Vec::new(),
            direct: direct::Pending::default(),
            pull_turn: 0,
            push_turn: 0,
            push_first: false,
            budget_cut: false,
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

    /// Streams created or reopened over the API since the last call (the
    /// task watches them for new messages).
    pub fn take_created(&mut self) -> Vec<StreamHandle> {
        std::mem::take(&mut self.created)
    }

    /// Replies and deliveries of this iteration.
    pub fn take_out(&mut self) -> Vec<Out> {
        std::mem::take(&mut self.out).items
    }

    /// Bytes of replies and deliveries waiting for [`JsApi::take_out`].
    pub fn out_bytes(&self) -> usize {
        self.out.bytes
    }

    /// Whether the loop may take another request this iteration: the
    /// answers waiting are under [`ANSWER_BUDGET`].
    pub fn takes_requests(&self) -> bool {
        self.out.bytes < ANSWER_BUDGET
    }

    /// Earliest timer (unix ns), and whether retention work is left.
    pub fn next_deadline(&self) -> (Option<u64>, bool) {
        let t = self
            .slots
            .iter()
            .flat_map(|s| s.consumers.values())
            .filter_map(Consumer::next_deadline)
            .min();
        let more = self.budget_cut || self.slots.iter().any(|s| !s.check.is_empty());
        (t, more)
    }

    /// Every consumer as (slot index, name), in stream and name order,
    /// rotated to start at `turn` (round-robin over iterations).
    fn consumers_from(&self, turn: usize, pick: fn(&Consumer) -> bool) -> Vec<(usize, String)> {
        let mut all: Vec<(usize, String)> = self
            .slots
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                s.consumers
                    .values()
                    .filter(|c| pick(c))
                    .map(move |c| (i, c.name.clone()))
            })
            .collect();
        if !all.is_empty() {
            let n = all.len();
            all.rotate_left(turn % n);
        }
        all
    }

    /// Whether a consumer of stream `i` waits for messages past what it has.
    fn hungry(&self) -> bool {
        self.slots.iter().any(|s| {
            s.consumers
                .values()
                .any(|c| !c.waiting.is_empty() || c.cfg.push.is_some())
        })
    }

    fn any_mirrored(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.mirrored && s.handle.config().retention != Retention::Limits)
    }
}
