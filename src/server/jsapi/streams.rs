//! Stream requests: `INFO` (the account), `STREAM.NAMES`, `STREAM.LIST`
//! and `STREAM.INFO`.
//!
//! Bounded as nats-server bounds them: `NAMES` answers at most
//! [`NAMES_LIMIT`] names, `LIST` at most [`LIST_LIMIT`] infos, and the
//! `subjects` of a `STREAM.INFO` with `subjects_filter` at most
//! [`SUBJECTS_LIMIT`] subjects, each from the request's `offset`, with
//! `total`, `offset` and `limit` in the answer so clients page.

use serde_json::{json, Value};

use super::call::{body_json, may_read, stream_err};
use super::render::{rfc3339, stream_config_json};
use super::{JsApi, Slot};
use crate::auth::Permissions;
use crate::stream::consumer::ApiError;
use crate::stream::Storage;

/// Names per `STREAM.NAMES`/`CONSUMER.NAMES` answer (nats-server's).
pub(super) const NAMES_LIMIT: usize = 1024;
/// Infos per `STREAM.LIST`/`CONSUMER.LIST` answer (nats-server's).
pub(super) const LIST_LIMIT: usize = 256;
/// Subjects per `STREAM.INFO` answer with `subjects_filter` (nats-server's).
pub(super) const SUBJECTS_LIMIT: usize = 100_000;

/// The `offset` of a paged request (0 if absent), at most `total`.
pub(super) fn offset(req: &Value, total: usize) -> usize {
    req.get("offset")
        .and_then(Value::as_u64)
        .and_then(|o| usize::try_from(o).ok())
        .unwrap_or(0)
        .min(total)
}

impl JsApi {
    pub(super) fn account_info(&self) -> Value {
        let bytes = |st: Storage| -> u64 {
            self.slots
                .iter()
                .filter(|s| s.handle.config().storage == st)
                .map(|s| s.handle.state().bytes)
                .sum()
        };
        let consumers: usize = self.slots.iter().map(|s| s.consumers.len()).sum();
        // -1: no limit, as nats-server reports an unlimited account.
        let limit = |n: u64| match n {
            0 => -1,
            n => i64::try_from(n).unwrap_or(i64::MAX),
        };
        let a = self.admin.as_ref();
        let max_streams = a.map_or(-1, |a| limit(a.max_streams as u64));
        let max_memory = a.map_or(-1, |a| limit(a.max_memory));
        let max_storage = a.map_or(-1, |a| limit(a.max_storage));
        // With max_storage every stream must set max_bytes (memory ones
        // always must).
        let required = a.is_some_and(|a| a.max_storage > 0);
        json!({
            "memory": bytes(Storage::Memory),
            "storage": bytes(Storage::File),
            "streams": self.slots.len(),
            "consumers": consumers,
            "limits": {
                "max_memory": max_memory, "max_storage": max_storage,
                "max_streams": max_streams, "max_consumers": -1,
                "max_ack_pending": -1, "memory_max_stream_bytes": -1,
                "storage_max_stream_bytes": -1, "max_bytes_required": required
            },
            "api": {"total": self.api_total, "errors": self.api_errors},
        })
    }

    pub(super) fn stream_names(&self, body: &[u8]) -> Result<Value, ApiError> {
        let req = body_json(body)?;
        let filter = req
            .get("subject")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let names: Vec<&str> = self
            .slots
            .iter()
            .map(|s| s.handle.config())
            .filter(|c| {
                filter.is_none_or(|f| {
                    c.subjects
                        .iter()
                        .any(|s| crate::subject::filters_overlap(s, f))
                })
            })
            .map(|c| c.name.as_str())
            .collect();
        let mut names = names;
        names.sort_unstable();
        let (total, from) = (names.len(), offset(&req, names.len()));
        let page: Vec<&str> = names.into_iter().skip(from).take(NAMES_LIMIT).collect();
        Ok(json!({"total": total, "offset": from, "limit": NAMES_LIMIT, "streams": page}))
    }

    pub(super) async fn stream_list(&self, body: &[u8], now: u64) -> Result<Value, ApiError> {
        let req = body_json(body)?;
        let mut slots: Vec<&Slot> = self.slots.iter().collect();
        slots.sort_unstable_by(|a, b| a.handle.config().name.cmp(&b.handle.config().name));
        let (total, from) = (slots.len(), offset(&req, slots.len()));
        let mut infos = Vec::new();
        for s in slots.into_iter().skip(from).take(LIST_LIMIT) {
            infos.push(self.info_of(s, None, now).await?);
        }
        Ok(
            json!({"total": total, "offset": from, "limit": LIST_LIMIT, "streams": infos, "missing": []}),
        )
    }

    pub(super) async fn stream_info(
        &self,
        name: &str,
        body: &[u8],
        caller: Option<&Permissions>,
        now: u64,
    ) -> Result<Value, ApiError> {
        let req = body_json(body)?;
        let filter = req
            .get("subjects_filter")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let mut v = self
            .info_of(self.slot(name)?, filter.map(|f| (f, caller)), now)
            .await?;
        // Page the subjects (sorted, as the stream returns them).
        let total = v["state"]["subjects"].as_object().map_or(0, |m| m.len());
        if total > 0 {
            let from = offset(&req, total);
            if let Some(m) = v["state"]["subjects"].as_object_mut() {
                let page: serde_json::Map<String, Value> = std::mem::take(m)
                    .into_iter()
                    .skip(from)
                    .take(SUBJECTS_LIMIT)
                    .collect();
                *m = page;
            }
            v["total"] = json!(total);
            v["offset"] = json!(from);
            v["limit"] = json!(SUBJECTS_LIMIT);
        }
        Ok(v)
    }

    /// `subjects`: the `subjects_filter` of a `STREAM.INFO` and its caller
    /// (subjects the caller may not read are left out of the answer).
    pub(super) async fn info_of(
        &self,
        s: &Slot,
        subjects: Option<(&str, Option<&Permissions>)>,
        now: u64,
    ) -> Result<Value, ApiError> {
        let i = s.handle.info().await.map_err(stream_err)?;
        let mut state = json!({
            "messages": i.msgs,
            "bytes": i.bytes,
            "first_seq": i.first_seq,
            "first_ts": rfc3339(i.first_ts),
            "last_seq": i.last_seq,
            "last_ts": rfc3339(i.last_ts),
            "num_subjects": i.subjects,
            "num_deleted": i.deleted,
            "consumer_count": s.consumers.len(),
        });
        if let Some((f, caller)) = subjects {
            let counts = s.handle.subject_counts(f).await.map_err(stream_err)?;
            let map: serde_json::Map<String, Value> = counts
                .into_iter()
                .filter(|(k, _)| may_read(caller, k))
                .map(|(k, n)| (k, json!(n)))
                .collect();
            state["subjects"] = Value::Object(map);
        }
        Ok(json!({
            "config": stream_config_json(&s.handle),
            "created": rfc3339(self.started),
            "state": state,
            "ts": rfc3339(now),
        }))
    }
}
