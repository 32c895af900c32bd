//! Message requests on one stream: `STREAM.MSG.GET` (by sequence,
//! `last_by_subj`, `next_by_subj`; the caller's `deny_subscribe` applies),
//! `STREAM.MSG.DELETE` and `STREAM.PURGE`.

use serde_json::{json, Value};

use super::call::{body_json, may_read, not_authorized, stream_err};
use super::render::rfc3339;
use super::JsApi;
use crate::auth::Permissions;
use crate::stream::consumer::ApiError;
use crate::stream::PurgeRequest;
use crate::wire::nats::base64;

impl JsApi {
    pub(super) async fn msg_get(
        &self,
        name: &str,
        body: &[u8],
        caller: Option<&Permissions>,
    ) -> Result<Value, ApiError> {
        let h = &self.slot(name)?.handle;
        let req = body_json(body)?;
        let seq = req.get("seq").and_then(Value::as_u64);
        for key in ["last_by_subj", "next_by_subj"] {
            let denied = |f: &str| {
                caller.is_some_and(|p| {
                    p.deny_subscribe
                        .iter()
                        .any(|d| crate::subject::filter_within(f, d))
                })
            };
            if let Some(f) = req.get(key).and_then(Value::as_str).filter(|f| denied(f)) {
                return Err(not_authorized(format!(
                    "{key} {f:?} is denied to this user"
                )));
            }
        }
        let found = if let Some(subj) = req.get("last_by_subj").and_then(Value::as_str) {
            h.last_by_subject(subj).await
        } else if let Some(subj) = req.get("next_by_subj").and_then(Value::as_str) {
            h.next_by_subject(subj, seq.unwrap_or(0).max(1)).await
        } else if let Some(seq) = seq {
            h.get(seq).await
        } else {
            return Err(ApiError::bad_request(
                "request must name seq, last_by_subj or next_by_subj",
            ));
        }
        .map_err(stream_err)?;
        let m = found.ok_or_else(|| ApiError::new(404, 10037, "no message found"))?;
        if !may_read(caller, &m.subject) {
            return Err(not_authorized(format!(
                "message {} is on a subject this user may not subscribe to",
                m.seq
            )));
        }
        let mut msg = json!({
            "subject": m.subject,
            "seq": m.seq,
            "data": base64::encode(&m.payload),
            "time": rfc3339(m.timestamp),
        });
        if let Some(hd) = &m.headers {
            msg["hdrs"] = json!(base64::encode(hd));
        }
        Ok(json!({"message": msg}))
    }

    pub(super) async fn msg_delete(&self, name: &str, body: &[u8]) -> Result<Value, ApiError> {
        let h = &self.slot(name)?.handle;
        let req = body_json(body)?;
        let seq = req
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| ApiError::bad_request("request must name seq"))?;
        let no_erase = req
            .get("no_erase")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        match h.delete(seq, !no_erase).await.map_err(stream_err)? {
            true => Ok(json!({"success": true})),
            false => Err(ApiError::new(400, 10057, "no message found")),
        }
    }

    pub(super) async fn purge(&self, name: &str, body: &[u8]) -> Result<Value, ApiError> {
        let h = &self.slot(name)?.handle;
        let req = body_json(body)?;
        let p = PurgeRequest {
            subject: req
                .get("filter")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            upto_seq: req.get("seq").and_then(Value::as_u64).filter(|n| *n > 0),
            keep: req.get("keep").and_then(Value::as_u64).filter(|n| *n > 0),
        };
        if p.upto_seq.is_some() && p.keep.is_some() {
            return Err(ApiError::bad_request(
                "sequence and keep can not both be set",
            ));
        }
        let purged = h.purge(p).await.map_err(stream_err)?;
        Ok(json!({"success": true, "purged": purged}))
    }
}
