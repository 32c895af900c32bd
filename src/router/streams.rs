//! The stream registry: which local streams exist right now.
//!
//! Owns: the set of open [`StreamHandle`]s, as an immutable snapshot
//! (`Arc<[StreamHandle]>`) swapped whole under a lock when a stream is
//! created, replaced or deleted through the JetStream API
//! (`server::jsapi::admin`). Readers take the snapshot (one read lock and
//! one reference count) or look a subject up under the read lock; nobody
//! holds the lock across an `.await`, and writers only swap a pointer.
//!
//! Invariants:
//! - Names are unique.
//! - Order is the capture order: streams created through the API come
//!   before the frond.toml streams, so a catch-all stream (`>`, the
//!   default stream) captures only what no other stream captures. Apart
//!   from catch-all streams, subjects of two streams never overlap (the
//!   config and the API refuse it), so the first match is the only one.
//! - A handle removed from the registry is closed by whoever removed it;
//!   holders of an older snapshot see `StreamError::Closed` from it.

use std::sync::{Arc, RwLock};

use crate::stream::StreamHandle;
use crate::subject;

/// The current set of streams.
pub struct StreamSet {
    snap: RwLock<Arc<[StreamHandle]>>,
}

impl StreamSet {
    pub fn new(streams: Vec<StreamHandle>) -> StreamSet {
        StreamSet {
            snap: RwLock::new(streams.into()),
        }
    }

    /// The streams now.
    pub fn snapshot(&self) -> Arc<[StreamHandle]> {
        self.snap.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The first stream (in capture order) for which `pick` holds.
    pub fn find(&self, pick: impl Fn(&StreamHandle) -> bool) -> Option<StreamHandle> {
        let g = self.snap.read().unwrap_or_else(|p| p.into_inner());
        g.iter().find(|s| pick(s)).cloned()
    }

    /// The stream that captures `subj`, if any.
    pub fn capture(&self, subj: &str) -> Option<StreamHandle> {
        self.find(|s| {
            s.config()
                .subjects
                .iter()
                .any(|f| subject::matches(f, subj))
        })
    }

    /// The stream that captures `subj` of the reserved `$` namespace: only
    /// one naming it explicitly (a filter starting with `$`, as `$KV.<b>.>`),
    /// so a `>` stream does not swallow it.
    pub fn capture_reserved(&self, subj: &str) -> Option<StreamHandle> {
        self.find(|s| {
            s.config()
                .subjects
                .iter()
                .any(|f| f.starts_with('$') && subject::matches(f, subj))
        })
    }

    /// Add `h` in front of the frond.toml streams, or replace the stream
    /// of the same name in place.
    pub fn insert(&self, h: StreamHandle) {
        let mut g = self.snap.write().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<StreamHandle> = g.iter().cloned().collect();
        match v.iter().position(|s| s.config().name == h.config().name) {
            Some(i) => v[i] = h,
            None => v.insert(0, h),
        }
        *g = v.into();
    }

    /// Remove stream `name`; the caller closes the handle.
    pub fn remove(&self, name: &str) -> Option<StreamHandle> {
        let mut g = self.snap.write().unwrap_or_else(|p| p.into_inner());
        let i = g.iter().position(|s| s.config().name == name)?;
        let mut v: Vec<StreamHandle> = g.iter().cloned().collect();
        let h = v.remove(i);
        *g = v.into();
        Some(h)
    }
}
