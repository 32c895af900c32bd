//! The removals the JetStream rules make: rollups, `max_msgs_per_subject`,
//! per-message TTLs, `max_msgs` / `max_bytes` with discard old, `max_age`;
//! purge requests, deletes and retention acks. Each maps onto the store's
//! removal primitives; durability is the store's (tombstones at the next
//! sync, prefix removals through `meta`).

use super::headers::Rollup;
use super::rules::{nanos, Stream};
use super::{Discard, PurgeRequest, Retention, StreamError};

impl Stream {
    /// Applies rollups, max_msgs_per_subject, per-message TTLs,
    /// max_msgs / max_bytes (discard = old) and max_age as of `now`.
    /// Returns how many messages were removed.
    pub fn enforce_limits(&mut self, now: u64) -> u64 {
        let mut removed = 0;
        for (seq, r) in std::mem::take(&mut self.rollups) {
            removed += match r {
                Rollup::All => {
                    let n = self.store.remove_before(seq);
                    // Not derivable at open: record the new first_seq.
                    if let Err(e) = self.store.persist_bounds() {
                        log::error!("recording a rollup in the meta file: {e}");
                    }
                    n
                }
                Rollup::Subject => match self.store.subject_of(seq) {
                    Some(sid) => self.store.remove_subject_before(sid, seq),
                    None => 0,
                },
            };
        }
        let per = self.cfg.max_msgs_per_subject;
        let mut over = std::mem::take(&mut self.over_subjects);
        if per > 0 {
            over.sort_unstable();
            over.dedup();
            for sid in over {
                while self.store.subject(sid).is_some_and(|e| e.count > per) {
                    match self.store.subject_first(sid) {
                        Some(q) if self.store.remove(q) => removed += 1,
                        _ => break,
                    }
                }
            }
        }
        removed += self.store.remove_expired(now);
        if self.cfg.discard == Discard::Old {
            loop {
                let (o, s) = (&self.cfg, self.store.state());
                let over = (o.max_msgs > 0 && s.msgs > o.max_msgs)
                    || (o.max_bytes > 0 && s.bytes > o.max_bytes);
                if !over || !self.store.remove_first() {
                    break;
                }
                removed += 1;
            }
        }
        if !self.cfg.max_age.is_zero() {
            removed += self
                .store
                .remove_older_than(now.saturating_sub(nanos(self.cfg.max_age)));
        }
        removed
    }

    /// Timestamp (unix ns) at which the next message expires (max_age or a
    /// per-message TTL).
    pub fn next_expiry(&mut self) -> Option<u64> {
        let ttl = self.store.next_deadline().map(|(at, _)| at);
        if self.cfg.max_age.is_zero() || self.store.state().msgs == 0 {
            return ttl;
        }
        let age = nanos(self.cfg.max_age);
        let by_age = self.store.first_ts().map(|ts| ts.saturating_add(age));
        match (ttl, by_age) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Deletes one message (tombstoned; durable at the next sync). Returns
    /// false if absent. Internal: ignores `deny_delete`.
    pub fn delete(&mut self, seq: u64) -> bool {
        self.store.remove(seq)
    }

    /// The API delete: honours `deny_delete`; with `secure`, the record's
    /// subject, headers and payload are overwritten on disk (zeros). The
    /// deletion (and the overwrite) is durable when this returns.
    pub fn delete_msg(&mut self, seq: u64, secure: bool) -> Result<bool, StreamError> {
        if self.cfg.deny_delete {
            return Err(StreamError::DeleteDenied);
        }
        if secure {
            return self.store.erase(seq).map_err(StreamError::Io);
        }
        if !self.store.remove(seq) {
            return Ok(false);
        }
        self.store.sync().map_err(StreamError::Io)?;
        Ok(true)
    }

    /// Removes every live message with `seq < before` (and, with `keep`,
    /// not among the newest `keep`), all subjects. Returns the count.
    fn purge_before(&mut self, before: u64, keep: Option<u64>) -> u64 {
        let mut cut = before;
        if let Some(k) = keep {
            // The newest `k` live messages stay.
            let s = self.store.state();
            if s.msgs <= k {
                return 0;
            }
            let kth = match k {
                0 => s.last_seq + 1,
                _ => self.store.nth_newest(k).unwrap_or(0),
            };
            cut = cut.min(kth);
        }
        self.store.remove_before(cut)
    }

    /// The API purge (honours `deny_purge`). Durable when it returns.
    pub fn purge(&mut self, req: &PurgeRequest) -> Result<u64, StreamError> {
        if self.cfg.deny_purge {
            return Err(StreamError::PurgeDenied);
        }
        if req.upto_seq.is_some() && req.keep.is_some() {
            return Err(StreamError::BadRequest(
                "purge: give either a sequence or keep, not both".into(),
            ));
        }
        let before = req.upto_seq.unwrap_or(u64::MAX);
        let n = match &req.subject {
            None => self.purge_before(before, req.keep),
            Some(filter) => {
                let mut seqs = Vec::new();
                for id in self.store.matching(filter) {
                    seqs.extend(self.store.subject_seqs(id));
                }
                seqs.sort_unstable();
                let keep = usize::try_from(req.keep.unwrap_or(0)).unwrap_or(usize::MAX);
                let upto = seqs.len().saturating_sub(keep);
                let mut n = 0;
                for &s in seqs.iter().take(upto) {
                    if s < before && self.store.remove(s) {
                        n += 1;
                    }
                }
                n
            }
        };
        self.store.persist_bounds().map_err(StreamError::Io)?;
        self.store.sync().map_err(StreamError::Io)?;
        Ok(n)
    }

    /// Retention `interest`/`workqueue`: the message was acknowledged by
    /// every interested consumer; it is removed. Returns false if absent.
    pub fn ack(&mut self, seq: u64) -> Result<bool, StreamError> {
        if self.cfg.retention == Retention::Limits {
            return Err(StreamError::BadRequest(
                "ack: the stream has retention = \"limits\"; acknowledgements do not remove messages".into(),
            ));
        }
        Ok(self.store.remove(seq))
    }
}
