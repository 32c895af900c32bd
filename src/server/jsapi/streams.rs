//! Stream requests: `INFO` (the account), `STREAM.NAMES`, `STREAM.LIST`
//! and `STREAM.INFO`. Streams themselves are configured in frond.toml.

use serde_json::{json, Value};

use super::call::{body_json, may_read, stream_err};
use super::render::{rfc3339, stream_config_json};
use super::{JsApi, Slot};
use crate::auth::Permissions;
use crate::stream::consumer::ApiError;

impl JsApi {
    pub(super) fn account_info(&self) -> Value {
        let storage: u64 = self.slots.iter().map(|s| s.handle.state().bytes).sum();
        let consumers: usize = self.slots.iter().map(|s| s.consumers.len()).sum();
        json!({
            "memory": 0,
            "storage": storage,
            "streams": self.slots.len(),
            "consumers": consumers,
            "limits": {
                "max_memory": -1, "max_storage": -1, "max_streams": -1, "max_consumers": -1,
                "max_ack_pending": -1, "memory_max_stream_bytes": -1,
                "storage_max_stream_bytes": -1, "max_bytes_required": false
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
        Ok(json!({"total": names.len(), "offset": 0, "limit": 1024, "streams": names}))
    }

    pub(super) async fn stream_list(&self, now: u64) -> Result<Value, ApiError> {
        let mut infos = Vec::new();
        for s in &self.slots {
            infos.push(self.info_of(s, None, now).await?);
        }
        Ok(
            json!({"total": infos.len(), "offset": 0, "limit": 256, "streams": infos, "missing": []}),
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
        let v = self
            .info_of(self.slot(name)?, filter.map(|f| (f, caller)), now)
            .await?;
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
