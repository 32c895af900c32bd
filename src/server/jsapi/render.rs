//! JetStream's JSON renderings of frond's values: times (RFC 3339),
//! limits, a stream's config, and the status messages of pull requests.

use serde_json::{json, Value};

use crate::stream::{Discard, Retention, Storage, StreamConfig, StreamHandle};

/// RFC 3339 (UTC, nanoseconds) for a unix time in ns; 0 is Go's zero time,
/// as nats-server sends it.
pub fn rfc3339(ns: u64) -> String {
    if ns == 0 {
        return "0001-01-01T00:00:00Z".into();
    }
    let secs = ns / 1_000_000_000;
    let nanos = ns % 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `n`, or -1 for 0 ("unlimited" in JetStream's JSON).
pub(super) fn limit(n: u64) -> i64 {
    if n == 0 {
        -1
    } else {
        i64::try_from(n).unwrap_or(i64::MAX)
    }
}

/// The JetStream stream config of a frond stream.
pub fn stream_config_json(h: &StreamHandle) -> Value {
    config_json(h.config())
}

/// The JetStream JSON of a stream config (what `STREAM.INFO` renders and
/// what an API stream's record holds).
pub fn config_json(c: &StreamConfig) -> Value {
    let mut v = json!({
        "name": c.name,
        "subjects": c.subjects,
        "retention": match c.retention {
            Retention::Limits => "limits",
            Retention::Interest => "interest",
            Retention::WorkQueue => "workqueue",
        },
        "max_consumers": -1,
        "max_msgs": limit(c.max_msgs),
        "max_bytes": limit(c.max_bytes),
        "max_age": u64::try_from(c.max_age.as_nanos()).unwrap_or(u64::MAX),
        "max_msgs_per_subject": limit(c.max_msgs_per_subject),
        "max_msg_size": limit(c.max_msg_size).min(i64::from(i32::MAX)),
        "discard": match c.discard { Discard::Old => "old", Discard::New => "new" },
        "discard_new_per_subject": c.discard_new_per_subject,
        "storage": match c.storage { Storage::File => "file", Storage::Memory => "memory" },
        "num_replicas": 1,
        "duplicate_window": u64::try_from(c.duplicate_window.as_nanos()).unwrap_or(u64::MAX),
        "allow_rollup_hdrs": c.allow_rollup,
        "deny_delete": c.deny_delete,
        "deny_purge": c.deny_purge,
        "allow_msg_ttl": c.allow_msg_ttl,
        "allow_direct": c.allow_direct,
        "mirror_direct": c.mirror_direct,
        "sealed": false,
    });
    if !c.metadata.is_empty() {
        v["metadata"] = c
            .metadata
            .iter()
            .map(|(k, x)| (k.clone(), Value::String(x.clone())))
            .collect::<serde_json::Map<String, Value>>()
            .into();
    }
    v
}

/// A status message (`NATS/1.0 <code> <text>`) for a pull request.
pub(super) fn status_msg(code: u16, text: &str, pending: Option<(usize, usize)>) -> Vec<u8> {
    let mut h = format!("NATS/1.0 {code} {text}\r\n");
    if let Some((msgs, bytes)) = pending {
        h.push_str(&format!(
            "Nats-Pending-Messages: {msgs}\r\nNats-Pending-Bytes: {bytes}\r\n"
        ));
    }
    h.push_str("\r\n");
    h.into_bytes()
}
