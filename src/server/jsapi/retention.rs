//! Retention by acknowledgement (`interest`, `workqueue`): which
//! examined messages no consumer (and no mirror still uplinking) needs,
//! removed in one purge where they form a prefix, the others of one loop
//! iteration with one write and one fsync ([`StreamHandle::ack_many`]).
//!
//! [`StreamHandle::ack_many`]: crate::stream::StreamHandle::ack_many

use super::{JsApi, Slot, RETENTION_BUDGET};
use crate::stream::{PurgeRequest, Retention};

pub(super) fn removable(slot: &Slot, retention: Retention, seq: u64, subj: &str) -> bool {
    if slot.mirrored && seq > slot.mirror_cursor {
        return false;
    }
    match retention {
        Retention::Limits => false,
        Retention::Interest => slot.consumers.values().all(|c| c.done_with(seq, subj)),
        Retention::WorkQueue => slot
            .consumers
            .values()
            .any(|c| c.selects(subj) && seq > c.floor && c.processed(seq)),
    }
}

impl JsApi {
    /// Remove messages that retention no longer keeps (bounded work per call).
    pub async fn apply_retention(&mut self) {
        let mut budget = RETENTION_BUDGET;
        for slot in &mut self.slots {
            if slot.check.is_empty() {
                continue;
            }
            let retention = slot.handle.config().retention;
            if retention == Retention::Limits {
                slot.check.clear();
                continue;
            }
            let mut ranges = std::mem::take(&mut slot.check);
            ranges.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (a, b) in ranges {
                match merged.last_mut() {
                    Some(l) if a <= l.1.saturating_add(1) => l.1 = l.1.max(b),
                    _ => merged.push((a, b)),
                }
            }
            let h = slot.handle.clone();
            let first = h.state().first_seq;
            // Removable messages that start at the stream's first sequence
            // with no kept message among them go in one purge (one fsync);
            // the others one by one.
            let mut prefix = !h.config().deny_purge;
            let mut prefix_seqs: Vec<u64> = Vec::new();
            let mut singles: Vec<u64> = Vec::new();
            let mut left = Vec::new();
            let mut next_expected = first;
            for (a, b) in merged {
                let mut from = a.max(first);
                if from > next_expected {
                    prefix = false;
                }
                while from <= b && budget > 0 {
                    let want = usize::try_from(b - from + 1).unwrap_or(usize::MAX).min(256);
                    let msgs = match h.read(from, want, 4 << 20).await {
                        Ok(m) => m,
                        Err(e) => {
                            // Not retried in a loop: the next ack, mirror
                            // step or restart looks at these again.
                            log::warn!(
                                "jetstream: retention read of {} failed: {e}",
                                h.config().name
                            );
                            from = b.saturating_add(1);
                            break;
                        }
                    };
                    if msgs.is_empty() {
                        from = b + 1;
                        break;
                    }
                    for m in msgs {
                        if m.seq > b {
                            from = b + 1;
                            break;
                        }
                        from = m.seq + 1;
                        budget = budget.saturating_sub(1);
                        if removable(slot, retention, m.seq, &m.subject) {
                            if prefix {
                                prefix_seqs.push(m.seq);
                            } else {
                                singles.push(m.seq);
                            }
                        } else {
                            prefix = false;
                        }
                    }
                }
                if from <= b {
                    left.push((from, b));
                    prefix = false;
                }
                next_expected = b.saturating_add(1);
            }
            if let Some(&last) = prefix_seqs.last() {
                let purge = PurgeRequest {
                    subject: None,
                    upto_seq: Some(last + 1),
                    keep: None,
                };
                if let Err(e) = h.purge(purge).await {
                    log::debug!("jetstream: retention purge refused ({e}); removing one by one");
                    singles.extend(prefix_seqs);
                }
            }
            // One write and one fsync for all of this iteration's
            // non-prefix removals.
            if !singles.is_empty() {
                let n = singles.len();
                if let Err(e) = h.ack_many(singles).await {
                    log::warn!(
                        "jetstream: cannot remove {n} messages of {}: {e}",
                        h.config().name
                    );
                }
            }
            slot.check = left;
        }
    }
}
