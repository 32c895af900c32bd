//! nats-server's JSON stream config read into a [`StreamConfig`]: the
//! validation of `STREAM.CREATE`/`STREAM.UPDATE` bodies (and of the
//! configs of API streams read back at start), with nats-server's error
//! codes, and the update rules (what a live stream may not change).
//!
//! Invariants: a config this accepts is one frond can honour exactly; a
//! field frond cannot honour (mirror, sources, subject transforms,
//! republish, replicas > 1, sealed, compression, …) is refused with an
//! error that names it, never silently dropped. Unknown fields are
//! ignored, as nats-server ignores them. Pure: no I/O.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::stream::consumer::ApiError;
use crate::stream::{Discard, Retention, Storage, StreamConfig, SyncPolicy};

/// JetStream's default duplicate window.
const DEFAULT_DUP_WINDOW: Duration = Duration::from_secs(120);

/// 10052: invalid stream config.
pub(super) fn invalid(why: impl std::fmt::Display) -> ApiError {
    ApiError::new(400, 10052, why.to_string())
}

fn int(v: &Map<String, Value>, key: &str) -> Result<i64, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(x) => x
            .as_i64()
            .ok_or_else(|| invalid(format!("{key} must be an integer"))),
    }
}

/// A JetStream limit: -1 or 0 is "unlimited" (0 in frond).
fn limit(v: &Map<String, Value>, key: &str) -> Result<u64, ApiError> {
    let n = int(v, key)?;
    if n < -1 {
        return Err(invalid(format!("{key} must be -1 (unlimited) or more")));
    }
    Ok(u64::try_from(n).unwrap_or(0))
}

fn flag(v: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(format!("{key} must be true or false"))),
    }
}

fn text<'v>(v: &'v Map<String, Value>, key: &str) -> Result<Option<&'v str>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("{key} must be a string"))),
    }
}

fn nanos(v: &Map<String, Value>, key: &str) -> Result<Duration, ApiError> {
    let n = int(v, key)?;
    u64::try_from(n)
        .map(Duration::from_nanos)
        .map_err(|_| invalid(format!("{key} must not be negative")))
}

/// Whether JSON value `x` is absent, null, false, 0, "" or empty.
fn unset(x: Option<&Value>) -> bool {
    match x {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => !b,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
    }
}

/// Fields frond refuses when set, and why.
const REFUSED: &[(&str, &str)] = &[
    ("mirror", "mirrors are not supported on local streams; use [[uplink.source]] in frond.toml to copy a hub stream down"),
    ("sources", "sources are not supported on local streams; use [[uplink.source]] in frond.toml"),
    ("subject_transform", "subject transforms are not supported; use [mappings] in frond.toml"),
    ("republish", "republish is not supported"),
    ("sealed", "sealed streams are not supported; to freeze a stream or object store, allow no one to publish to its subjects or to $JS.API.STREAM.PURGE/MSG.DELETE of it ([auth] permissions)"),
    ("first_seq", "first_seq is not supported"),
    ("subject_delete_marker_ttl", "subject delete markers are not supported"),
    ("allow_msg_counter", "message counters are not supported"),
    ("allow_atomic", "atomic batch publish is not supported"),
    ("allow_msg_schedules", "message schedules are not supported"),
];

/// The stream config in request body `body` for stream `name` (the name
/// in the API subject). `key`: the encryption key new file streams use.
pub(super) fn parse(
    name: &str,
    body: &Value,
    key: Option<&crate::store::crypt::Key>,
) -> Result<StreamConfig, ApiError> {
    let v = body
        .as_object()
        .ok_or_else(|| invalid("the request must be a JSON object"))?;
    match text(v, "name")? {
        Some(n) if n != name => {
            return Err(ApiError::new(
                400,
                10056,
                "stream name in subject does not match request",
            ))
        }
        _ => {}
    }
    crate::stream::names::validate(name).map_err(|e| invalid(format!("invalid name: {e}")))?;
    for (field, why) in REFUSED {
        if !unset(v.get(*field)) {
            return Err(invalid(format!("{field}: {why}")));
        }
    }
    match text(v, "compression")? {
        None | Some("none") => {}
        Some(c) => {
            return Err(invalid(format!(
                "compression {c:?} is not supported; use \"none\""
            )))
        }
    }
    let replicas = int(v, "num_replicas")?;
    if replicas > 1 {
        return Err(ApiError::new(
            500,
            10074,
            "replicas > 1 not supported in non-clustered mode",
        ));
    }
    let max_consumers = int(v, "max_consumers")?;
    if max_consumers > 0 {
        return Err(invalid(format!(
            "max_consumers {max_consumers}: only -1 (unlimited, at most {} per stream in frond) is supported",
            super::MAX_CONSUMERS
        )));
    }
    let mut cfg = StreamConfig::new(name, &[]);
    cfg.subjects = subjects(v, name)?;
    cfg.retention = match text(v, "retention")? {
        None | Some("limits") => Retention::Limits,
        Some("interest") => Retention::Interest,
        Some("workqueue") => Retention::WorkQueue,
        Some(r) => {
            return Err(invalid(format!(
                "retention {r:?}: use limits, interest or workqueue"
            )))
        }
    };
    cfg.storage = match text(v, "storage")? {
        None | Some("file") => Storage::File,
        Some("memory") => Storage::Memory,
        Some(s) => return Err(invalid(format!("storage {s:?}: use file or memory"))),
    };
    cfg.discard = match text(v, "discard")? {
        None | Some("old") => Discard::Old,
        Some("new") => Discard::New,
        Some(d) => return Err(invalid(format!("discard {d:?}: use old or new"))),
    };
    cfg.sync = SyncPolicy::Always;
    cfg.max_msgs = limit(v, "max_msgs")?;
    cfg.max_bytes = limit(v, "max_bytes")?;
    cfg.max_msgs_per_subject = limit(v, "max_msgs_per_subject")?;
    cfg.max_msg_size = limit(v, "max_msg_size")?;
    cfg.max_age = nanos(v, "max_age")?;
    cfg.discard_new_per_subject = flag(v, "discard_new_per_subject")?;
    cfg.allow_rollup = flag(v, "allow_rollup_hdrs")?;
    cfg.deny_delete = flag(v, "deny_delete")?;
    cfg.deny_purge = flag(v, "deny_purge")?;
    cfg.allow_direct = flag(v, "allow_direct")?;
    cfg.mirror_direct = flag(v, "mirror_direct")?;
    cfg.allow_msg_ttl = flag(v, "allow_msg_ttl")?;
    cfg.metadata = metadata(v)?;
    cfg.duplicate_window = nanos(v, "duplicate_window")?;
    if cfg.duplicate_window.is_zero() {
        cfg.duplicate_window = DEFAULT_DUP_WINDOW;
        if !cfg.max_age.is_zero() {
            cfg.duplicate_window = cfg.duplicate_window.min(cfg.max_age);
        }
    } else if !cfg.max_age.is_zero() && cfg.duplicate_window > cfg.max_age {
        return Err(invalid("duplicates window can not be larger then max age"));
    }
    if cfg.discard_new_per_subject {
        if cfg.discard != Discard::New {
            return Err(invalid(
                "discard new per subject requires discard new policy to be set",
            ));
        }
        if cfg.max_msgs_per_subject == 0 {
            return Err(invalid(
                "discard new per subject requires max msgs per subject > 0",
            ));
        }
    }
    if cfg.allow_rollup && cfg.deny_purge {
        return Err(invalid("roll-ups require the purge permission"));
    }
    cfg.encrypt = cfg.storage == Storage::File && key.is_some();
    cfg.key = key.cloned();
    Ok(cfg)
}

/// The `subjects` (the stream's name when none are given, as in
/// nats-server), each a valid filter, no duplicates, none in `$JS.API.`.
fn subjects(v: &Map<String, Value>, name: &str) -> Result<Vec<String>, ApiError> {
    let list: Vec<String> = match v.get("subjects") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| invalid("subjects must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("subjects must be a list of strings")),
    };
    if list.is_empty() {
        return Ok(vec![name.to_string()]);
    }
    for (i, s) in list.iter().enumerate() {
        if !crate::subject::valid_filter(s) {
            return Err(invalid(format!("invalid subject {s:?}")));
        }
        if list[..i].contains(s) {
            return Err(invalid(format!("duplicate subjects detected: {s:?}")));
        }
        if crate::subject::filters_overlap(s, "$JS.API.>") {
            return Err(invalid(format!(
                "subject {s:?} overlaps the JetStream API ($JS.API.>)"
            )));
        }
    }
    Ok(list)
}

fn metadata(v: &Map<String, Value>) -> Result<Vec<(String, String)>, ApiError> {
    match v.get("metadata") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, x)| {
                x.as_str()
                    .map(|s| (k.clone(), s.to_string()))
                    .ok_or_else(|| invalid("metadata values must be strings"))
            })
            .collect(),
        Some(_) => Err(invalid("metadata must be an object of strings")),
    }
}

/// What a live stream may not change (nats-server's update rules).
pub(super) fn check_update(old: &StreamConfig, new: &StreamConfig) -> Result<(), ApiError> {
    if new.storage != old.storage {
        return Err(invalid(
            "stream configuration update can not change storage type",
        ));
    }
    if new.retention != old.retention
        && (old.retention == Retention::WorkQueue || new.retention == Retention::WorkQueue)
    {
        return Err(invalid(
            "stream configuration update can not change retention policy to/from workqueue",
        ));
    }
    if old.deny_delete && !new.deny_delete {
        return Err(invalid(
            "stream configuration update can not cancel deny message deletes",
        ));
    }
    if old.deny_purge && !new.deny_purge {
        return Err(invalid(
            "stream configuration update can not cancel deny purge",
        ));
    }
    if old.allow_msg_ttl && !new.allow_msg_ttl {
        return Err(invalid("message TTL status can not be disabled"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn defaults_and_limits() {
        let c = parse(
            "S",
            &json!({"name": "S", "max_msgs": -1, "max_age": 0}),
            None,
        )
        .unwrap();
        assert_eq!(c.subjects, vec!["S".to_string()]);
        assert_eq!(c.max_msgs, 0);
        assert_eq!(c.duplicate_window, DEFAULT_DUP_WINDOW);
        let c = parse("S", &json!({"max_age": 1_000_000_000u64}), None).unwrap();
        assert_eq!(c.duplicate_window, Duration::from_secs(1));
    }

    #[test]
    fn refusals_carry_codes() {
        let code = |v: Value| parse("S", &v, None).unwrap_err().err_code;
        assert_eq!(code(json!({"name": "T"})), 10056);
        assert_eq!(code(json!({"num_replicas": 3})), 10074);
        assert_eq!(code(json!({"mirror": {"name": "X"}})), 10052);
        assert_eq!(code(json!({"subjects": ["a", "a"]})), 10052);
        assert_eq!(code(json!({"subjects": ["$JS.API.>"]})), 10052);
        assert_eq!(code(json!({"storage": "tape"})), 10052);
        assert_eq!(code(json!({"discard_new_per_subject": true})), 10052);
        assert_eq!(parse("a.b", &json!({}), None).unwrap_err().err_code, 10052);
    }

    #[test]
    fn immutable_fields() {
        let old = parse("S", &json!({"deny_delete": true}), None).unwrap();
        let new = parse(
            "S",
            &json!({"storage": "memory", "deny_delete": true}),
            None,
        )
        .unwrap();
        assert!(check_update(&old, &new).is_err());
        let new = parse("S", &json!({}), None).unwrap();
        assert!(check_update(&old, &new).is_err());
        let new = parse("S", &json!({"deny_delete": true, "max_msgs": 5}), None).unwrap();
        assert!(check_update(&old, &new).is_ok());
    }
}
