//! The age of each mirror's oldest message not yet on the hub, for status.
//!
//! Owns: one small task that, every [`PROBE_INTERVAL`], reads the first
//! local message after each mirror's cursor (one message, from the
//! stream's owner thread) and records its timestamp in the
//! [`UplinkStatus`]. It only reads; it never delays the mirrors (its own
//! task, one read per mirror per interval).
//!
//! Invariants: a mirror without a backlog reports no age; a stream that
//! fails to read reports no age and is tried again next interval.

use std::sync::Arc;
use std::time::Duration;

use super::UplinkStatus;
use crate::stream::StreamHandle;

/// How often the ages are refreshed (the age itself is computed when the
/// status is read, so it does not go stale between probes).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Probe `streams` until the task is cancelled (by [`super::run`] on its
/// way out).
pub async fn run(streams: Vec<StreamHandle>, status: Arc<UplinkStatus>) {
    loop {
        let mirrors = status.mirrors();
        for h in &streams {
            let name = &h.config().name;
            let Some(m) = mirrors.iter().find(|m| &m.stream == name) else {
                continue;
            };
            let ts = if h.state().last_seq > m.cursor {
                match h.read(m.cursor + 1, 1, 1).await {
                    Ok(v) => v.first().map(|msg| msg.timestamp),
                    Err(_) => None,
                }
            } else {
                None
            };
            status.set_oldest(name, ts);
        }
        smol::Timer::after(PROBE_INTERVAL).await;
    }
}
