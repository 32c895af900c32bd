//! Removing records: one record (a tombstone, or moving `first_seq` for
//! the oldest), a prefix, a subject's records below a sequence, records
//! older than a time, records whose deadline passed; secure erase; and
//! deleting segment files once nothing in them is live.
//!
//! Invariants: every removal of a live record updates the totals, the
//! subject table and the deadline index together ([`Store::unlink`]); a
//! segment file is deleted only after `meta` records a `first_seq` past
//! all its records; an erased record's tombstone is durable before its
//! bytes are overwritten. Removals happen between batches, never between
//! a mark and its sync.

use std::io;

use super::record;
use super::segment::{encode_meta, index_name, sealing, segment_name, META_NAME};
use super::{Store, SubjectId};

impl Store {
    pub(super) fn forget_deadline(&mut self, seq: u64) {
        if !self.deadline_of.is_empty() {
            if let Some(at) = self.deadline_of.remove(&seq) {
                self.deadlines.remove(&(at, seq));
            }
        }
    }

    /// Bookkeeping for removing live record `i` of segment `si`.
    fn unlink(&mut self, si: usize, i: usize) {
        self.removals += 1;
        let seg = &mut self.segs[si];
        let seq = seg.base + i as u64;
        let sid = seg.sid(i);
        self.bytes = self.bytes.saturating_sub(seg.rec_size(i));
        seg.live = seg.live.saturating_sub(1);
        self.msgs = self.msgs.saturating_sub(1);
        let was_last = self.subjects.entry(sid).is_some_and(|e| e.last == seq);
        if self.subjects.remove(sid, seq) > 0 && was_last {
            // Not on the hot path (removing a subject's newest record).
            let prev = self.find_prev(sid, seq);
            if let Some(e) = self.subjects.entry_mut(sid) {
                e.last = prev.unwrap_or(e.first);
                if e.count == 1 {
                    e.first = e.last;
                }
            }
        }
        self.forget_deadline(seq);
    }

    /// Removes the oldest record, without deleting emptied segment files.
    fn pop_first(&mut self) -> bool {
        if self.msgs == 0 {
            return false;
        }
        let Some(si) = self.seg_index(self.first_seq) else {
            return false;
        };
        let i = (self.first_seq - self.segs[si].base) as usize;
        self.unlink(si, i);
        self.first_seq += 1;
        self.advance_first();
        true
    }

    /// Removes live record `seq` (an interior tombstone, or moving
    /// `first_seq` for the oldest), without deleting emptied segment files.
    fn remove_one(&mut self, seq: u64) -> bool {
        let Some((si, i)) = self.is_live(seq) else {
            return false;
        };
        self.unlink(si, i);
        let seg = &mut self.segs[si];
        seg.set_deleted(i);
        let base = seg.base;
        self.tombs.push((base, i as u32));
        if si + 1 < self.segs.len() {
            self.compact.insert(base);
        }
        if seq == self.first_seq {
            self.advance_first();
        }
        true
    }

    /// Removes the oldest record. Returns false if the log is empty.
    pub fn remove_first(&mut self) -> bool {
        let ok = self.pop_first();
        self.drop_dead_segments();
        ok
    }

    /// Removes live record `seq` (tombstoned; durable at the next sync).
    /// Returns false if it is not live.
    pub fn remove(&mut self, seq: u64) -> bool {
        let ok = self.remove_one(seq);
        if ok {
            self.drop_dead_segments();
        }
        ok
    }

    /// Removes every live record with `seq < before` by moving `first_seq`
    /// (no tombstones: see [`Store::persist_bounds`]). Returns the count.
    pub fn remove_before(&mut self, before: u64) -> u64 {
        let cut = before.min(self.last_seq + 1);
        let mut n = 0;
        while self.first_seq < cut && self.msgs > 0 {
            if !self.pop_first() {
                break;
            }
            n += 1;
        }
        if self.first_seq < cut && self.msgs == 0 {
            self.first_seq = self.last_seq + 1;
        }
        self.drop_dead_segments();
        n
    }

    /// Removes the live records of a subject below `before`. Returns the
    /// count.
    pub fn remove_subject_before(&mut self, id: SubjectId, before: u64) -> u64 {
        let mut n = 0;
        while let Some(q) = self.subject_first(id) {
            if q >= before || !self.remove_one(q) {
                break;
            }
            n += 1;
        }
        self.drop_dead_segments();
        n
    }

    /// Removes the records with a timestamp before `cutoff` (a prefix:
    /// timestamps never decrease). Returns the count.
    pub fn remove_older_than(&mut self, cutoff: u64) -> u64 {
        let mut removed = 0;
        // Whole segments first (no reads), then record by record.
        while let Some(si) = self.seg_index(self.first_seq) {
            if self.segs[si].last_ts >= cutoff {
                break;
            }
            let before = removed;
            while self.seg_index(self.first_seq) == Some(si) && self.pop_first() {
                removed += 1;
            }
            if removed == before {
                break;
            }
        }
        while self.first_ts().is_some_and(|ts| ts < cutoff) && self.pop_first() {
            removed += 1;
        }
        self.drop_dead_segments();
        removed
    }

    /// Removes every live record whose deadline is at or before `now`.
    /// Returns the count.
    pub fn remove_expired(&mut self, now: u64) -> u64 {
        let mut removed = 0;
        while let Some(&(at, seq)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            self.deadline_of.remove(&seq);
            if self.remove_one(seq) {
                removed += 1;
            }
        }
        self.drop_dead_segments();
        removed
    }

    /// Moves `first_seq` past gaps and deleted records.
    pub(super) fn advance_first(&mut self) {
        while self.first_seq <= self.last_seq {
            match self.seg_index(self.first_seq) {
                Some(si) => {
                    let seg = &self.segs[si];
                    if !seg.is_deleted((self.first_seq - seg.base) as usize) {
                        return;
                    }
                    self.first_seq += 1;
                }
                None => {
                    let next = self
                        .segs
                        .iter()
                        .find(|s| s.base > self.first_seq && !s.offsets.is_empty())
                        .map(|s| s.base);
                    self.first_seq = next.unwrap_or(self.last_seq + 1);
                }
            }
        }
    }

    /// Records `first_seq` and `last_seq` durably (the `meta` file), which
    /// makes prefix removals durable.
    pub fn persist_bounds(&mut self) -> io::Result<()> {
        let meta = encode_meta(self.first_seq, self.last_seq);
        self.backend.write_atomic(META_NAME, &meta)
    }

    /// Deletes front segments with no live records (meta first).
    pub(super) fn drop_dead_segments(&mut self) {
        while let Some(seg) = self.segs.front() {
            let dead = seg.live == 0 && seg.end() <= self.first_seq;
            if !dead {
                return;
            }
            if self.segs.len() == 1 {
                // The active segment: its buffered bytes go with it.
                self.wbuf.clear();
            }
            let base = seg.base;
            if seg.created {
                if let Err(e) = self.persist_bounds() {
                    log::warn!(
                        "cannot write the log's meta file: {e}; keeping segment {base} for now"
                    );
                    return;
                }
                if let Err(e) = self.remove_segment_files(base) {
                    log::warn!("cannot remove segment {base}: {e}; will retry");
                    return;
                }
            }
            self.segs.pop_front();
        }
    }

    /// Removes live record `seq` durably and overwrites its bytes on disk
    /// with a valid record of the same length whose subject, headers and
    /// payload are zeros. Returns false if it is not live.
    pub fn erase(&mut self, seq: u64) -> io::Result<bool> {
        let Some((si, i)) = self.is_live(seq) else {
            return Ok(false);
        };
        let base = self.segs[si].base;
        // The tombstone is durable before the bytes change, so a crash in
        // between never shows an erased record as a live one.
        self.remove_one(seq);
        self.sync()?;
        self.overwrite(base, i)?;
        self.drop_dead_segments();
        Ok(true)
    }

    /// Overwrites record `i` of segment `base` in place with a valid record
    /// of the same length whose subject, headers and payload are zeros, and
    /// syncs.
    fn overwrite(&mut self, base: u64, i: usize) -> io::Result<()> {
        let Some(si) = self.segs.iter().position(|s| s.base == base) else {
            return Ok(());
        };
        if self.segs[si].offset(i + 1) > self.segs[si].flushed {
            self.flush()?;
        }
        self.read_span(si, i, i + 1)?;
        let seg = &self.segs[si];
        let seq = seg.base + i as u64;
        let off = seg.offset(i);
        let seal = sealing(&self.opts.key, seg);
        let peek = record::peek_len_sealed(&self.scratch);
        let damaged = || io::Error::other(format!("record {seq} is damaged; cannot erase it"));
        let (rec, n) = record::decode_any(&mut self.scratch, seg.base, seg.base_ts, seal, off)
            .map_err(|_| damaged())?;
        let (seq_delta, ts_delta) = (rec.seq - seg.base, rec.timestamp - seg.base_ts);
        let out = match seal {
            Some((key, salt)) => {
                let lens = peek.map_err(|_| damaged())?;
                record::encode_erased_sealed(seq_delta, ts_delta, lens, key, salt, off as u32)
                    .ok_or_else(damaged)?
            }
            None => record::encode_erased(seq_delta, ts_delta, n),
        };
        let name = segment_name(seg.base);
        let last = i + 1 == seg.offsets.len();
        if seg.indexed && last {
            // The snapshot checks the last record's crc: it must go first.
            self.backend.remove(&index_name(base))?;
            if let Some(seg) = self.segs.get_mut(si) {
                seg.indexed = false;
            }
        }
        self.backend.write_at(&name, off, &out)?;
        self.backend.sync(&name)
    }
}
