//! The duplicate window: `Nats-Msg-Id`s seen within `duplicate_window`,
//! each with the sequence it was stored at. Pure data, no I/O, no clock.
//!
//! Invariants: `order` is in timestamp order (appends never go back in
//! time); an id maps to the sequence of its newest entry in `order`;
//! [`Dedup::expire`] drops everything older than the window as of `now`.

use std::collections::{HashMap, VecDeque};

/// Recently seen message ids.
#[derive(Debug, Default)]
pub(super) struct Dedup {
    /// Unix ns; 0 disables the window.
    pub window: u64,
    ids: HashMap<String, u64>,
    order: VecDeque<(u64, u64, String)>,
}

impl Dedup {
    pub fn new(window: u64) -> Dedup {
        Dedup {
            window,
            ..Dedup::default()
        }
    }

    /// The sequence `id` was stored at, if within the window as of `now`.
    pub fn find(&mut self, id: &str, now: u64) -> Option<u64> {
        self.expire(now);
        self.ids.get(id).copied()
    }

    fn expire(&mut self, now: u64) {
        while let Some((ts, seq)) = self.order.front().map(|(t, q, _)| (*t, *q)) {
            if ts.saturating_add(self.window) >= now {
                break;
            }
            if let Some((_, _, id)) = self.order.pop_front() {
                if self.ids.get(&id) == Some(&seq) {
                    self.ids.remove(&id);
                }
            }
        }
    }

    pub fn insert(&mut self, id: &str, ts: u64, seq: u64) {
        self.ids.insert(id.to_string(), seq);
        self.order.push_back((ts, seq, id.to_string()));
    }

    /// Forgets the ids of sequences after `last_seq` (a rolled-back batch).
    pub fn forget_after(&mut self, last_seq: u64) {
        while self.order.back().is_some_and(|(_, seq, _)| *seq > last_seq) {
            if let Some((_, seq, id)) = self.order.pop_back() {
                if self.ids.get(&id) == Some(&seq) {
                    self.ids.remove(&id);
                }
            }
        }
    }
}
