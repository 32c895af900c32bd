//! What a consumer has left to deliver: the state of the deliver policy
//! `last_per_subject` (the Key/Value watchers' and `keys`' policy) and the
//! exact `num_pending` the clients read to decide that the initial values
//! are done (async-nats `seen_current`, nats-py's `None` marker: both fire
//! on the delivery whose ack subject says `pending = 0`).
//!
//! Sans-IO like [`super::consumer`]: the JetStream service resolves the
//! policy against the stream (the store's `last_per_subject`) and counts
//! (the store's `count_matching`), and hands the results in.
//!
//! Model:
//! - A `last_per_subject` consumer starts with `lss`, the sequences of the
//!   newest message of each subject its filters match, as of `resume` (the
//!   stream's last sequence at creation). It delivers those, ascending,
//!   and every message after `resume`; it steps over the older messages at
//!   or below `resume`.
//! - `num_pending` is the number of messages the consumer will deliver
//!   after `delivered_sseq`. The service sets it from an exact count after
//!   each read of a batch (the batch's wanted messages plus a count of what
//!   follows it) and for `CONSUMER.INFO`; each first delivery takes one
//!   off. It is exact at the moment of the count; a message removed later
//!   (limits, a newer value of a KV key with history 1) is taken out at
//!   the next count. With `deny_subscribe` exclusions that overlap each
//!   other the excluded messages are not subtracted (an upper bound).
//!
//! Invariants: `lss` is ascending and every entry is above
//! `delivered_sseq` (entries are dropped once delivered or stepped over).
//! Nothing here is persisted: a durable `last_per_subject` consumer
//! restored after a restart delivers every message after its position.

use std::collections::VecDeque;

use super::consumer::Consumer;
use crate::subject;

/// Subjects a `last_per_subject` consumer may start with (bounds memory:
/// 8 bytes each).
pub const MAX_LAST_PER_SUBJECT: usize = 1 << 20;

/// A consumer's delivery backlog (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backlog {
    /// `last_per_subject`: sequences still to deliver, ascending.
    pub lss: VecDeque<u64>,
    /// `last_per_subject`: messages at or below this are delivered only
    /// when in `lss` (0: every message is).
    pub resume: u64,
    /// Messages this consumer will deliver after `delivered_sseq`.
    pub num_pending: u64,
}

impl Backlog {
    /// A `last_per_subject` start: `seqs` (ascending) of the newest message
    /// per subject as of stream sequence `resume`.
    pub fn last_per_subject(seqs: Vec<u64>, resume: u64) -> Backlog {
        Backlog {
            num_pending: seqs.len() as u64,
            lss: seqs.into(),
            resume,
        }
    }

    /// The first stream sequence such a consumer delivers.
    pub fn start(&self) -> u64 {
        self.lss
            .front()
            .copied()
            .unwrap_or(self.resume.saturating_add(1))
    }

    /// `lss` entries above `seq`.
    pub fn lss_after(&self, seq: u64) -> u64 {
        let i = self.lss.partition_point(|s| *s <= seq);
        (self.lss.len() - i) as u64
    }

    /// The consumer moved past `seq` (delivered or stepped over).
    pub fn passed(&mut self, seq: u64) {
        while self.lss.front().is_some_and(|s| *s <= seq) {
            self.lss.pop_front();
        }
    }
}

impl Consumer {
    /// Whether this consumer delivers the stream message `seq` on `subj`:
    /// it selects the subject and its deliver policy wants the message.
    pub fn wants(&self, seq: u64, subj: &str) -> bool {
        let b = &self.backlog;
        self.selects(subj) && (seq > b.resume || b.lss.binary_search(&seq).is_ok())
    }

    /// Where the next read of new messages starts.
    pub fn read_from(&self) -> u64 {
        let next = self.delivered_sseq.saturating_add(1);
        match self.backlog.lss.front() {
            Some(s) => next.max(*s),
            None => next.max(self.backlog.resume.saturating_add(1)),
        }
    }

    /// The filters to count this consumer's messages with: those to add
    /// (its filter subjects, or every subject) and those to subtract (its
    /// exclusions, when no two of them overlap; else none, an upper bound).
    pub fn count_filters(&self) -> (Vec<String>, Vec<String>) {
        let plus = match self.cfg.filter_subjects.as_slice() {
            [] => vec![">".to_string()],
            f => f.to_vec(),
        };
        let mut minus: Vec<String> = Vec::new();
        for x in &self.exclude {
            if !self
                .exclude
                .iter()
                .any(|y| y != x && subject::filter_within(x, y))
                && !minus.contains(x)
            {
                minus.push(x.clone());
            }
        }
        let disjoint = minus.iter().enumerate().all(|(i, a)| {
            minus
                .iter()
                .skip(i + 1)
                .all(|b| !subject::filters_overlap(a, b))
        });
        (plus, if disjoint { minus } else { Vec::new() })
    }

    /// After a read of new messages: `wanted` of them are for this
    /// consumer, and `rest` more follow the last one read.
    pub fn set_pending(&mut self, wanted: u64, rest: u64) {
        self.backlog.num_pending = wanted.saturating_add(rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::consumer::ConsumerConfig;
    use serde_json::json;

    fn consumer(v: serde_json::Value) -> Consumer {
        Consumer::new("c".into(), ConsumerConfig::from_json(&v).unwrap(), 1, 0)
    }

    #[test]
    fn last_per_subject_delivers_the_newest_per_subject_then_everything() {
        // Stream: 1 a, 2 b, 3 a, 4 c, 5 b; newest per subject: 3, 4, 5.
        let mut c = consumer(json!({"deliver_policy": "last_per_subject"}));
        c.backlog = Backlog::last_per_subject(vec![3, 4, 5], 5);
        assert_eq!(c.backlog.start(), 3);
        assert_eq!(c.read_from(), 3);
        assert!(!c.wants(1, "a") && !c.wants(2, "b"));
        assert!(c.wants(3, "a") && c.wants(5, "b"));
        c.record_delivery(3, 0);
        assert_eq!(c.backlog.lss_after(3), 2);
        assert_eq!(c.read_from(), 4);
        c.record_delivery(4, 0);
        c.record_delivery(5, 0);
        assert!(c.backlog.lss.is_empty());
        assert_eq!(c.read_from(), 6);
        assert!(c.wants(6, "a"), "new messages after resume");
        assert_eq!(c.backlog.num_pending, 0);
    }

    #[test]
    fn an_empty_last_per_subject_start_resumes_after_the_stream() {
        let mut c = consumer(json!({"deliver_policy": "last_per_subject"}));
        c.backlog = Backlog::last_per_subject(Vec::new(), 9);
        assert_eq!(c.backlog.start(), 10);
        assert_eq!(c.read_from(), 10);
        assert!(!c.wants(9, "a") && c.wants(10, "a"));
    }

    #[test]
    fn pending_counts_down_per_first_delivery() {
        let mut c = consumer(json!({"filter_subject": "a.>"}));
        c.set_pending(2, 3);
        let _ = c.record_delivery(1, 0);
        assert_eq!(c.backlog.num_pending, 4);
        let _ = c.record_delivery(1, 0);
        assert_eq!(c.backlog.num_pending, 4, "a redelivery is not new");
        assert_eq!(c.count_filters(), (vec!["a.>".to_string()], Vec::new()));
    }

    #[test]
    fn overlapping_exclusions_are_not_subtracted() {
        let mut c = consumer(json!({}));
        c.exclude = vec!["a.*.c".into(), "a.b.*".into()];
        assert!(c.count_filters().1.is_empty());
        c.exclude = vec!["a.>".into(), "a.b".into(), "x".into()];
        assert_eq!(c.count_filters().1, vec!["a.>".to_string(), "x".into()]);
    }
}
