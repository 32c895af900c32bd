//! Consumer requests: `CONSUMER.CREATE` / `DURABLE.CREATE` (with the
//! workqueue, filter and authorization checks), `INFO`, `NAMES`, `LIST`
//! and `DELETE`.

use std::sync::Arc;

use serde_json::{json, Value};

use super::backlog;
use super::call::{body_json, not_authorized, not_found_consumer, not_found_stream, stream_err};
use super::files::remove_consumer;
use super::render::rfc3339;
use super::streams::{offset, LIST_LIMIT, NAMES_LIMIT};
use super::{JsApi, Slot, MAX_CONSUMERS};
use crate::auth::Permissions;
use crate::stream::consumer::{
    check_name, AckPolicy, ApiError, Consumer, ConsumerConfig, DeliverPolicy, ReceiverRef,
};
use crate::stream::Retention;

impl JsApi {
    pub(super) fn consumer_json(&self, s: &Slot, c: &Consumer, now: u64) -> Value {
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
            "num_pending": c.backlog.num_pending,
            "ts": rfc3339(now),
        })
    }

    pub(super) async fn consumer_info(
        &mut self,
        stream: &str,
        name: &str,
        now: u64,
    ) -> Result<Value, ApiError> {
        check_name(name)?;
        let i = self.slot_idx(stream)?;
        if let Some(s) = self.slots.get_mut(i) {
            if let Some(c) = s.consumers.get_mut(name) {
                backlog::refresh(&s.handle, c).await;
            }
        }
        let s = self.slot(stream)?;
        let c = s.consumers.get(name).ok_or_else(not_found_consumer)?;
        Ok(self.consumer_json(s, c, now))
    }

    /// `CONSUMER.NAMES`: a page of [`NAMES_LIMIT`] names from `offset`.
    pub(super) fn consumer_names(&self, stream: &str, body: &[u8]) -> Result<Value, ApiError> {
        let req = body_json(body)?;
        let s = self.slot(stream)?;
        let (total, from) = (s.consumers.len(), offset(&req, s.consumers.len()));
        let names: Vec<&String> = s.consumers.keys().skip(from).take(NAMES_LIMIT).collect();
        Ok(json!({"total": total, "offset": from, "limit": NAMES_LIMIT, "consumers": names}))
    }

    /// `CONSUMER.LIST`: a page of [`LIST_LIMIT`] infos from `offset`.
    pub(super) async fn consumer_list(
        &mut self,
        stream: &str,
        body: &[u8],
        now: u64,
    ) -> Result<Value, ApiError> {
        let req = body_json(body)?;
        let i = self.slot_idx(stream)?;
        let from = offset(&req, self.slots.get(i).map_or(0, |s| s.consumers.len()));
        if let Some(s) = self.slots.get_mut(i) {
            for c in s.consumers.values_mut().skip(from).take(LIST_LIMIT) {
                backlog::refresh(&s.handle, c).await;
            }
        }
        let s = self.slot(stream)?;
        let list: Vec<Value> = s
            .consumers
            .values()
            .skip(from)
            .take(LIST_LIMIT)
            .map(|c| self.consumer_json(s, c, now))
            .collect();
        Ok(
            json!({"total": s.consumers.len(), "offset": from, "limit": LIST_LIMIT, "consumers": list, "missing": []}),
        )
    }

    pub(super) fn consumer_delete(&mut self, stream: &str, name: &str) -> Result<Value, ApiError> {
        check_name(name)?;
        let i = self.slot_idx(stream)?;
        let slot = self.slots.get_mut(i).ok_or_else(not_found_stream)?;
        let c = slot.consumers.remove(name).ok_or_else(not_found_consumer)?;
        if let Some(d) = slot.dir.as_deref() {
            remove_consumer(d, name);
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

    /// `CONSUMER.CREATE` / `DURABLE.CREATE`: the request read and
    /// checked ([`create_request`]), then an existing consumer updated or
    /// a new one checked against the stream and started.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn consumer_create(
        &mut self,
        stream: &str,
        subj_name: Option<String>,
        subj_filter: Option<String>,
        durable_api: bool,
        body: &[u8],
        now: u64,
        user: Option<&Arc<Permissions>>,
    ) -> Result<Value, ApiError> {
        let caller = user.map(|p| &**p);
        // The name becomes a file name: checked before anything else
        // (nats-server's order and error codes).
        if let Some(n) = &subj_name {
            check_name(n)?;
        }
        let i = self.slot_idx(stream)?;
        let req = create_request(stream, subj_name, subj_filter, durable_api, body)?;
        let slot = self.slots.get(i).ok_or_else(not_found_stream)?;
        let exclude = creator_exclusions(slot, &req.cfg, caller)?;
        if let Some(old) = slot.consumers.get(&req.name) {
            if !replaces_ephemeral_push(old, &req.cfg) {
                return self.update_consumer(i, req, exclude, now, user);
            }
            // An ordered consumer recreated by its client at a new start
            // (async-nats reuses the name): a new consumer in its place,
            // but only for the user it acts for — anyone else who learnt
            // the name must not take over its deliveries.
            if old.push.creator != receiver(user) {
                return Err(ApiError::new(
                    400,
                    10013,
                    "consumer name already in use (by another user's push consumer)",
                ));
            }
            log::debug!("jetstream: ephemeral push consumer {} recreated", req.name);
            if let Some(s) = self.slots.get_mut(i) {
                s.consumers.remove(&req.name);
            }
        }
        let slot = self.slots.get(i).ok_or_else(not_found_stream)?;
        if req.action == "update" {
            return Err(ApiError::new(400, 10149, "consumer does not exist"));
        }
        check_new_consumer(slot, &req.cfg)?;
        let resolved = backlog::resolve_start(&slot.handle, &req.cfg).await?;
        let start = match &resolved {
            Some((s, _)) => *s,
            None => start_seq(slot, &req.cfg).await?,
        };
        let name = req.name;
        let mut c = Consumer::new(name.clone(), req.cfg, start, now);
        c.exclude = exclude;
        if let Some((_, b)) = resolved {
            c.backlog = b;
        }
        backlog::refresh(&slot.handle, &mut c).await;
        c.push.creator = receiver(user);
        let slot = self.slots.get_mut(i).ok_or_else(not_found_stream)?;
        slot.consumers.insert(name.clone(), c);
        let slot = self.slots.get(i).ok_or_else(not_found_stream)?;
        let c = slot.consumers.get(&name).ok_or_else(not_found_consumer)?;
        log::info!("jetstream: consumer {name} created on stream {stream}");
        Ok(self.consumer_json(slot, c, now))
    }

    /// A create request for consumer `req.name`, which exists on stream
    /// `i`: refused unless the caller may read all it delivers and it is
    /// of the same kind (a pull consumer stays pull, a push one push);
    /// its config replaced otherwise, and from then on it acts for the
    /// caller (`exclude`: the caller's exclusions, see
    /// [`creator_exclusions`], which checked its rights on the deliver
    /// subject).
    fn update_consumer(
        &mut self,
        i: usize,
        req: CreateRequest,
        exclude: Vec<String>,
        now: u64,
        user: Option<&Arc<Permissions>>,
    ) -> Result<Value, ApiError> {
        let caller = user.map(|p| &**p);
        let CreateRequest { name, cfg, action } = req;
        let slot = self.slots.get(i).ok_or_else(not_found_stream)?;
        let old = slot.consumers.get(&name).ok_or_else(not_found_consumer)?;
        if let Some(p) = caller {
            if !old.readable_by(&slot.handle.config().subjects, &p.deny_subscribe) {
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
        match (&old.cfg.push, &cfg.push) {
            (None, Some(_)) => {
                return Err(ApiError::new(
                    500,
                    10012,
                    "can not update pull consumer to push based",
                ))
            }
            (Some(_), None) => {
                return Err(ApiError::new(
                    500,
                    10012,
                    "can not update push consumer to pull based",
                ))
            }
            _ => {}
        }
        let slot = self.slots.get_mut(i).ok_or_else(not_found_stream)?;
        let c = slot
            .consumers
            .get_mut(&name)
            .ok_or_else(not_found_consumer)?;
        if c.cfg != cfg {
            c.cfg = cfg;
            c.dirty = true;
            // Deliveries now act for the user who updated it.
            c.push.creator = receiver(user);
            c.exclude = exclude;
        }
        let slot = self.slots.get(i).ok_or_else(not_found_stream)?;
        let c = slot.consumers.get(&name).ok_or_else(not_found_consumer)?;
        Ok(self.consumer_json(slot, c, now))
    }
}

/// The user a consumer created or updated by `user` acts for.
fn receiver(user: Option<&Arc<Permissions>>) -> Option<ReceiverRef> {
    user.map(|p| {
        let r: Arc<dyn crate::stream::consumer::Receiver> = p.clone();
        ReceiverRef(r)
    })
}

/// Whether a create request for an existing consumer `old` replaces it
/// rather than updating it: `old` is an ephemeral push consumer and the
/// request moves its deliver subject or start (the ordered consumers of
/// the stock clients recreate themselves so after a gap or a reconnect).
fn replaces_ephemeral_push(old: &Consumer, cfg: &ConsumerConfig) -> bool {
    let (Some(a), Some(b)) = (&old.cfg.push, &cfg.push) else {
        return false;
    };
    !old.durable()
        && cfg.durable_name.is_none()
        && (a.deliver_subject != b.deliver_subject || old.cfg.deliver_policy != cfg.deliver_policy)
}

/// A consumer create request, read and checked against its subject.
struct CreateRequest {
    name: String,
    cfg: ConsumerConfig,
    /// `"create"`, `"update"` or empty (either).
    action: String,
}

/// Reads the body of a create request on `stream` and checks it against
/// the name and filter of the request subject; an unnamed consumer gets a
/// random name.
fn create_request(
    stream: &str,
    subj_name: Option<String>,
    subj_filter: Option<String>,
    durable_api: bool,
    body: &[u8],
) -> Result<CreateRequest, ApiError> {
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
    let action = req
        .get("action")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Ok(CreateRequest { name, cfg, action })
}

/// The filters must lie in the stream's subjects; the creator's
/// `deny_subscribe` refuses a filter wholly inside it and gives what it
/// covers of the rest, which the consumer excludes.
fn creator_exclusions(
    slot: &Slot,
    cfg: &ConsumerConfig,
    caller: Option<&Permissions>,
) -> Result<Vec<String>, ApiError> {
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
    let Some(p) = caller else {
        return Ok(Vec::new());
    };
    if let Some(push) = &cfg.push {
        // The consumer delivers on its creator's behalf: only where the
        // creator could receive itself, and could publish itself (else a
        // consumer would be a way to publish to subjects the creator may
        // not, e.g. an MQTT device's command topic).
        if !p.can_subscribe(&push.deliver_subject) {
            return Err(not_authorized(format!(
                "this user may not subscribe to the deliver subject {:?}",
                push.deliver_subject
            )));
        }
        if !p.can_publish(&push.deliver_subject) {
            return Err(not_authorized(format!(
                "this user may not publish to the deliver subject {:?}",
                push.deliver_subject
            )));
        }
    }
    let explicit = !cfg.filter_subjects.is_empty();
    let filters = if explicit {
        &cfg.filter_subjects
    } else {
        &scfg.subjects
    };
    Consumer::exclusions(filters, explicit, &p.deny_subscribe)
        .map_err(|f| not_authorized(format!("this user may not subscribe to {f:?}")))
}

/// A new consumer fits: the stream has room for it and, on a workqueue
/// stream, it acks explicitly, delivers all and shares no subject with
/// another consumer.
fn check_new_consumer(slot: &Slot, cfg: &ConsumerConfig) -> Result<(), ApiError> {
    if slot.consumers.len() >= MAX_CONSUMERS {
        return Err(ApiError::new(
            400,
            10026,
            format!("maximum consumers limit reached ({MAX_CONSUMERS} per stream); delete unused consumers"),
        ));
    }
    if slot.handle.config().retention != Retention::WorkQueue {
        return Ok(());
    }
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
    Ok(())
}

/// The first stream sequence a new consumer delivers, from its deliver
/// policy.
async fn start_seq(slot: &Slot, cfg: &ConsumerConfig) -> Result<u64, ApiError> {
    let st = slot.handle.state();
    Ok(match cfg.deliver_policy {
        DeliverPolicy::All => 1,
        DeliverPolicy::New => st.last_seq + 1,
        DeliverPolicy::ByStartSequence(n) => n,
        // Resolved by `backlog::resolve_start`.
        DeliverPolicy::LastPerSubject | DeliverPolicy::ByStartTime(_) => st.last_seq + 1,
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
    })
}
