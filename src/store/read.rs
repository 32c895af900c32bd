//! Reading: records by sequence range, by subject, single records, the
//! oldest timestamp, state as of a sequence, and the lookups the other
//! parts use (which segment holds a sequence, the previous or next live
//! record of a subject).
//!
//! Invariants: a record is returned only if it decodes with a matching
//! checksum and has the sequence the index says; one that does not is
//! logged and removed (tombstoned), never returned.

use std::io;

use super::record;
use super::segment::{sealing, segment_name, SegIds};
use super::{Record, State, Store, SubjectId};

/// Live records and bytes with `upto < seq <= scanned`, valid while
/// `removals` is unchanged.
#[derive(Debug, Clone, Copy)]
pub(super) struct UptoMemo {
    upto: u64,
    scanned: u64,
    removals: u64,
    msgs: u64,
    bytes: u64,
}

impl Store {
    /// The state as if nothing after `seq` had been appended yet.
    ///
    /// Called after every batch with the last durable sequence; with
    /// `sync = "<interval>"` that can lag by many records, so the live
    /// records after `seq` are counted incrementally (only the records
    /// appended since the previous call), unless something was removed or
    /// rolled back since.
    pub fn state_upto(&self, seq: u64) -> State {
        let mut s = self.state();
        if seq >= self.last_seq {
            return s;
        }
        let (mut msgs, mut bytes, from) = match self.upto_memo.get() {
            Some(m)
                if m.upto == seq && m.removals == self.removals && m.scanned <= self.last_seq =>
            {
                (m.msgs, m.bytes, m.scanned + 1)
            }
            _ => (0, 0, seq + 1),
        };
        for seg in self.segs.iter().rev() {
            if seg.end() <= from {
                break;
            }
            let start = from.max(seg.base).max(self.first_seq);
            for q in start..seg.end() {
                let i = (q - seg.base) as usize;
                if !seg.is_deleted(i) {
                    msgs += 1;
                    bytes += seg.rec_size(i);
                }
            }
        }
        self.upto_memo.set(Some(UptoMemo {
            upto: seq,
            scanned: self.last_seq,
            removals: self.removals,
            msgs,
            bytes,
        }));
        s.msgs = s.msgs.saturating_sub(msgs);
        s.bytes = s.bytes.saturating_sub(bytes);
        s.last_seq = seq;
        s.first_seq = s.first_seq.min(seq + 1);
        s
    }

    /// [`Store::state_upto`] without the memo (for tests).
    #[cfg(test)]
    pub(crate) fn state_upto_uncached(&self, seq: u64) -> State {
        self.upto_memo.set(None);
        self.state_upto(seq)
    }

    pub(super) fn seg_index(&self, seq: u64) -> Option<usize> {
        let i = self
            .segs
            .partition_point(|s| s.base <= seq)
            .checked_sub(1)?;
        (seq < self.segs.get(i)?.end()).then_some(i)
    }

    /// Segment and slot of live record `seq`.
    pub(super) fn is_live(&self, seq: u64) -> Option<(usize, usize)> {
        if seq < self.first_seq || seq > self.last_seq {
            return None;
        }
        let si = self.seg_index(seq)?;
        let i = (seq - self.segs[si].base) as usize;
        (!self.segs[si].is_deleted(i)).then_some((si, i))
    }

    /// The newest live record of subject `sid` below `before`.
    pub(super) fn find_prev(&self, sid: u32, before: u64) -> Option<u64> {
        let lo = self.first_seq;
        let mut q = before.checked_sub(1)?;
        while q >= lo {
            match self.seg_index(q) {
                Some(si) => {
                    let seg = &self.segs[si];
                    let i0 = (q - seg.base) as usize;
                    for i in (0..=i0).rev() {
                        let s = seg.base + i as u64;
                        if s < lo {
                            return None;
                        }
                        if seg.sid(i) == sid && !seg.is_deleted(i) {
                            return Some(s);
                        }
                    }
                    q = seg.base.checked_sub(1)?;
                }
                None => {
                    // In a gap between segments: jump to the previous one.
                    let k = self.segs.partition_point(|s| s.base <= q);
                    let prev = self.segs.get(k.checked_sub(1)?)?;
                    q = prev.end().checked_sub(1)?;
                }
            }
        }
        None
    }

    /// The first live sequence >= `from` whose subject id `want`s, up to
    /// `upto`.
    pub(super) fn find_next(
        &self,
        from: u64,
        upto: u64,
        want: &dyn Fn(u32) -> bool,
    ) -> Option<u64> {
        let mut q = from.max(self.first_seq);
        let upto = upto.min(self.last_seq);
        while q <= upto {
            let Some(si) = self.seg_index(q) else {
                let k = self.segs.partition_point(|s| s.base <= q);
                q = self.segs.get(k)?.base;
                continue;
            };
            let seg = &self.segs[si];
            let i0 = (q - seg.base) as usize;
            for i in i0..seg.offsets.len() {
                let s = seg.base + i as u64;
                if s > upto {
                    return None;
                }
                if !seg.is_deleted(i) && want(seg.sid(i)) {
                    return Some(s);
                }
            }
            q = seg.end();
        }
        None
    }

    /// Exact first live sequence of a subject (fixes the hint).
    pub fn subject_first(&mut self, id: SubjectId) -> Option<u64> {
        let sid = id.0;
        let e = self.subjects.entry(sid)?;
        if e.count == 1 {
            return Some(e.last);
        }
        let (hint, last) = (e.first, e.last);
        let first = self.find_next(hint, last, &|s| s == sid)?;
        if let Some(e) = self.subjects.entry_mut(sid) {
            e.first = first;
        }
        Some(first)
    }

    /// Every live sequence of a subject, ascending.
    pub fn subject_seqs(&mut self, id: SubjectId) -> Vec<u64> {
        let mut out = Vec::new();
        let Some(mut q) = self.subject_first(id) else {
            return out;
        };
        let last = self.subjects.entry(id.0).map_or(0, |e| e.last);
        while let Some(s) = self.find_next(q, last, &|x| x == id.0) {
            out.push(s);
            q = s + 1;
        }
        out
    }

    /// The sequence of the `n`-th newest live record (`n = 1`: the newest),
    /// if there are that many.
    pub fn nth_newest(&self, n: u64) -> Option<u64> {
        if n == 0 || self.msgs < n {
            return None;
        }
        let mut left = n;
        let mut q = self.last_seq;
        while q >= self.first_seq {
            if self.is_live(q).is_some() {
                left -= 1;
                if left == 0 {
                    return Some(q);
                }
            }
            q = q.checked_sub(1)?;
        }
        None
    }

    /// Reads the raw bytes of records `i..j` of segment `si` into scratch.
    pub(super) fn read_span(&mut self, si: usize, i: usize, j: usize) -> io::Result<()> {
        let seg = &self.segs[si];
        let (start, end) = (seg.offset(i), seg.offset(j));
        let name = segment_name(seg.base);
        self.scratch.clear();
        self.scratch
            .resize(usize::try_from(end - start).unwrap_or(0), 0);
        self.backend.read_at(&name, start, &mut self.scratch)
    }

    /// The ids of segment `si`'s records, read from the file with the
    /// tagger (records that fail their check have none).
    pub(super) fn read_ids(&mut self, si: usize) -> io::Result<SegIds> {
        let Some(tagger) = self.opts.tagger else {
            return Ok(Vec::new());
        };
        let n = self.segs[si].offsets.len();
        self.read_span(si, 0, n)?;
        let seg = &self.segs[si];
        let seal = sealing(&self.opts.key, seg);
        let start = seg.offset(0);
        let mut ids = Vec::new();
        for i in 0..n {
            let (a, b) = (
                (seg.offset(i) - start) as usize,
                (seg.offset(i + 1) - start) as usize,
            );
            let Some(bytes) = self.scratch.get_mut(a..b).filter(|b| !b.is_empty()) else {
                continue;
            };
            if let Ok((rec, _)) =
                record::decode_any(bytes, seg.base, seg.base_ts, seal, seg.offset(i))
            {
                if let Some(id) = rec.headers.and_then(|h| tagger(h, rec.timestamp).id) {
                    ids.push((i as u32, rec.timestamp, id.to_string()));
                }
            }
        }
        Ok(ids)
    }

    /// Timestamp of the oldest live record.
    pub fn first_ts(&mut self) -> Option<u64> {
        let si = self.seg_index(self.first_seq)?;
        let i = (self.first_seq - self.segs[si].base) as usize;
        if self.segs[si].offset(i) >= self.segs[si].flushed {
            // Not on disk yet: it is as new as the newest record.
            return Some(self.segs[si].last_ts);
        }
        if let Err(e) = self.read_span(si, i, i + 1) {
            log::warn!("reading the oldest record's timestamp: {e}");
            return None;
        }
        let seg = &self.segs[si];
        let off = seg.offset(i);
        let seal = sealing(&self.opts.key, seg);
        match record::decode_any(&mut self.scratch, seg.base, seg.base_ts, seal, off) {
            Ok((r, _)) => Some(r.timestamp),
            // A damaged oldest record: treat it as expired.
            Err(_) => Some(0),
        }
    }

    /// Up to `max_msgs` records with `from <= seq <= upto`, about
    /// `max_bytes` of records (at least one if any). Records that fail their
    /// checksum are deleted and skipped (logged), never returned.
    pub fn read(
        &mut self,
        from: u64,
        max_msgs: usize,
        max_bytes: usize,
        upto: u64,
    ) -> io::Result<Vec<Record>> {
        let upto = upto.min(self.last_seq);
        let mut seq = from.max(self.first_seq);
        let mut out = Vec::new();
        let mut used = 0u64;
        let mut bad = Vec::new();
        if self.segs.back().is_some_and(|s| s.flushed < s.len) && upto >= seq {
            self.flush()?;
        }
        while seq <= upto && out.len() < max_msgs {
            let si = match self.seg_index(seq) {
                Some(si) => si,
                None => match self.segs.iter().position(|s| s.base > seq) {
                    Some(si) => {
                        seq = self.segs[si].base;
                        continue;
                    }
                    None => break,
                },
            };
            let seg = &self.segs[si];
            let i0 = (seq - seg.base) as usize;
            let mut j = i0;
            let mut n = out.len();
            while j < seg.offsets.len() && seg.base + (j as u64) <= upto && n < max_msgs {
                let sz = seg.rec_size(j);
                if n > 0 && used + sz > max_bytes as u64 {
                    break;
                }
                if !seg.is_deleted(j) {
                    used += sz;
                    n += 1;
                }
                j += 1;
            }
            if j == i0 {
                break;
            }
            self.read_span(si, i0, j)?;
            self.decode_span(si, i0, j, &mut out, &mut bad);
            seq = self.segs[si].base + j as u64;
            if out.len() >= max_msgs || (used >= max_bytes as u64 && !out.is_empty()) {
                break;
            }
        }
        for q in bad {
            log::error!("record {q} fails its checksum on read; deleting it");
            self.remove(q);
        }
        Ok(out)
    }

    /// Decodes the live records `i0..j` of segment `si` from scratch into
    /// `out`; the sequences of those that fail go to `bad`.
    fn decode_span(
        &mut self,
        si: usize,
        i0: usize,
        j: usize,
        out: &mut Vec<Record>,
        bad: &mut Vec<u64>,
    ) {
        let seg = &self.segs[si];
        let start = seg.offset(i0);
        for i in i0..j {
            if seg.is_deleted(i) {
                continue;
            }
            let at = (seg.offset(i) - start) as usize;
            let q = seg.base + i as u64;
            let seal = sealing(&self.opts.key, seg);
            let decoded = self
                .scratch
                .get_mut(at..)
                .ok_or(record::DecodeError::Incomplete)
                .and_then(|b| record::decode_any(b, seg.base, seg.base_ts, seal, start + at as u64))
                .ok()
                .filter(|(r, _)| r.seq == q)
                .and_then(|(r, _)| {
                    Some(Record {
                        seq: r.seq,
                        timestamp: r.timestamp,
                        subject: String::from_utf8(r.subject.to_vec()).ok()?,
                        headers: r.headers.map(<[u8]>::to_vec),
                        payload: r.payload.to_vec(),
                    })
                });
            match decoded {
                Some(m) => out.push(m),
                None => bad.push(q),
            }
        }
    }

    /// The record with sequence `seq`, if live.
    pub fn get(&mut self, seq: u64) -> io::Result<Option<Record>> {
        if self.is_live(seq).is_none() {
            return Ok(None);
        }
        Ok(self.read(seq, 1, usize::MAX, seq)?.pop())
    }

    /// Subjects matching a filter (a literal subject or a wildcard), sorted.
    pub fn matching(&self, filter: &str) -> Vec<SubjectId> {
        self.matching_raw(filter)
            .into_iter()
            .map(SubjectId)
            .collect()
    }

    fn matching_raw(&self, filter: &str) -> Vec<u32> {
        if !filter.contains(['*', '>']) {
            return self.subjects.get(filter).into_iter().collect();
        }
        let mut v: Vec<u32> = self
            .subjects
            .iter()
            .filter(|(_, e)| crate::subject::matches(filter, &e.name))
            .map(|(id, _)| id)
            .collect();
        v.sort_unstable();
        v
    }

    /// The newest live record whose subject matches `filter`.
    pub fn last_by_subject(&mut self, filter: &str) -> io::Result<Option<Record>> {
        let last = self
            .matching_raw(filter)
            .into_iter()
            .filter_map(|id| self.subjects.entry(id).map(|e| e.last))
            .max();
        match last {
            Some(seq) => self.get(seq),
            None => Ok(None),
        }
    }

    /// The first live record with `seq >= from` whose subject matches
    /// `filter`.
    pub fn next_by_subject(&mut self, filter: &str, from: u64) -> io::Result<Option<Record>> {
        let ids = self.matching_raw(filter);
        let start = ids
            .iter()
            .filter_map(|&id| self.subjects.entry(id).map(|e| e.first))
            .min();
        let Some(start) = start else {
            return Ok(None);
        };
        let found = self.find_next(from.max(start), u64::MAX, &|s| {
            ids.binary_search(&s).is_ok()
        });
        match found {
            Some(seq) => self.get(seq),
            None => Ok(None),
        }
    }

    /// Calls `f(seq, subject id)` for every live record with
    /// `from <= seq <= upto`, in order (the in-memory index only).
    fn walk_live(&self, from: u64, upto: u64, f: &mut dyn FnMut(u64, u32)) {
        let mut q = from.max(self.first_seq);
        let upto = upto.min(self.last_seq);
        while q <= upto {
            let Some(si) = self.seg_index(q) else {
                let k = self.segs.partition_point(|s| s.base <= q);
                match self.segs.get(k) {
                    Some(seg) => q = seg.base,
                    None => return,
                }
                continue;
            };
            let seg = &self.segs[si];
            for i in (q - seg.base) as usize..seg.offsets.len() {
                let s = seg.base + i as u64;
                if s > upto {
                    return;
                }
                if !seg.is_deleted(i) {
                    f(s, seg.sid(i));
                }
            }
            q = seg.end();
        }
    }

    /// Live records with `from <= seq <= upto` whose subject matches
    /// `filter` (exact). A wildcard filter over a range holding fewer
    /// records than the stream has subjects (a live consumer counting what
    /// follows its batch) matches the range's records; otherwise the
    /// matching subjects' counts are summed, walking the index only when a
    /// matching subject has records on both sides of the range.
    pub fn count_matching(&self, filter: &str, from: u64, upto: u64) -> u64 {
        let span = upto
            .min(self.last_seq)
            .saturating_add(1)
            .saturating_sub(from.max(self.first_seq));
        if filter.contains(['*', '>']) && span < self.subjects.len() as u64 {
            let mut n = 0;
            self.walk_live(from, upto, &mut |_, sid| {
                let hit = self.subjects.entry(sid).map(|e| e.name.as_ref());
                n += u64::from(hit.is_some_and(|s| crate::subject::matches(filter, s)));
            });
            return n;
        }
        let ids = self.matching_raw(filter);
        let (mut total, mut inside) = (0, true);
        for e in ids.iter().filter_map(|&id| self.subjects.entry(id)) {
            total += e.count;
            // `first` is a hint no later than the real first record.
            inside &= e.first >= from && e.last <= upto;
        }
        if inside {
            return total;
        }
        let mut n = 0;
        self.walk_live(from, upto, &mut |_, sid| {
            n += u64::from(ids.binary_search(&sid).is_ok());
        });
        n
    }

    /// The sequence of the newest live record with `seq <= upto` of every
    /// subject matching one of `filters`, ascending; `None` if there are
    /// more than `max` of them.
    pub fn last_per_subject(&self, filters: &[String], upto: u64, max: usize) -> Option<Vec<u64>> {
        let mut ids: Vec<u32> = filters.iter().flat_map(|f| self.matching_raw(f)).collect();
        ids.sort_unstable();
        ids.dedup();
        let (mut seqs, mut older) = (Vec::new(), Vec::new());
        let mut from = u64::MAX;
        for id in ids {
            let Some(e) = self.subjects.entry(id) else {
                continue;
            };
            if e.last <= upto {
                seqs.push(e.last);
            } else if e.first <= upto {
                older.push(id);
                from = from.min(e.first);
            }
            if seqs.len() > max {
                return None;
            }
        }
        if !older.is_empty() {
            let mut last = std::collections::BTreeMap::new();
            self.walk_live(from, upto, &mut |s, sid| {
                if older.binary_search(&sid).is_ok() {
                    last.insert(sid, s);
                }
            });
            seqs.extend(last.into_values());
        }
        seqs.sort_unstable();
        (seqs.len() <= max).then_some(seqs)
    }

    /// Live record counts of the subjects matching `filter`, sorted.
    pub fn subject_counts(&self, filter: &str) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .matching_raw(filter)
            .into_iter()
            .filter_map(|id| {
                self.subjects
                    .entry(id)
                    .map(|e| (e.name.to_string(), e.count))
            })
            .collect();
        v.sort();
        v
    }
}
