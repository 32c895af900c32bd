//! Appending: the write buffer, segment rolls, tombstone files, flush and
//! sync, mark and rollback, index snapshots, close.
//!
//! Commit protocol (the caller, `stream::owner`, drives it): `mark`, any
//! number of `append`s (buffered; written out past 1 MiB and at a segment
//! roll), then `sync` (or `flush` for the interval and never policies). If
//! an append, flush or sync fails the caller calls `rollback(mark)`: memory
//! state, buffered bytes and file bytes since the mark are undone; file
//! operations that fail are retried before anything else is written
//! (`repairs`), so a half-written batch never stays behind.
//!
//! Segment files grow by appending, and a sync is one `fdatasync` per
//! written file. Writing into already-written blocks (so that `fdatasync`
//! need not log a size change) is faster on ext4 when the disk is quiet:
//! 145–164 µs vs. 256 µs per 8 KiB write + `fdatasync`, 228–276 µs vs.
//! 465 µs per 128 KiB (2026-12-07, between the 2.3–5.7 ms stalls of a
//! busy disk, where the device flush dominates and no mode wins). It is
//! not taken: zero-filling each new segment doubles the bytes written
//! (flash wear on a gateway's eMMC/SD card). The sound form, recycling the
//! segments retention removed, needs a segment generation in every record
//! header so recovery ignores a recycled file's stale records: a format
//! change not made yet. So the format keeps file length = end of the last
//! record.
//!
//! Invariants: bytes are only appended to the newest segment; a tombstone
//! is written only after its segment file exists; an encrypted segment is
//! appended to only by the process that created it and only until its
//! first rollback (`no_append`).

use std::collections::HashMap;
use std::io;

use super::index::{self, SegIndex, Slot};
use super::record::{self, RecordRef, SealInfo, SegHeader};
use super::recover::IDX_SEALED_MAGIC;
use super::segment::{index_name, is_tomb_name, segment_name, tomb_name, SegIds, Segment};
use super::{crypt, AppendError, Mark, NewRecord, Repair, Store, SubjectId, WBUF_FLUSH};

impl Store {
    /// Stored size (prefix and body) of a record with these field lengths
    /// if it were appended now with `timestamp`.
    pub fn next_len(
        &self,
        subject: usize,
        headers: Option<usize>,
        payload: usize,
        timestamp: u64,
    ) -> u64 {
        self.placement(subject, headers, payload, timestamp).1
    }

    /// Whether the next record starts a new segment, and its stored size.
    fn placement(
        &self,
        subject: usize,
        headers: Option<usize>,
        payload: usize,
        timestamp: u64,
    ) -> (bool, u64) {
        let seq = self.last_seq + 1;
        let ts = timestamp.max(self.last_ts);
        let encrypt = self.opts.encrypt && self.opts.key.is_some();
        let rec_len = |base: u64, base_ts: u64| {
            record::record_len(encrypt, seq - base, ts - base_ts, subject, headers, payload) as u64
        };
        let in_active = self.segs.back().and_then(|s| {
            let len = rec_len(s.base, s.base_ts);
            let fits = s.offsets.is_empty() || s.len + len <= self.opts.segment_size;
            let same_kind = s.seal.is_some() == encrypt && !s.no_append;
            (s.end() == seq && fits && same_kind && s.len + len <= u64::from(u32::MAX))
                .then_some(len)
        });
        match in_active {
            Some(len) => (false, len),
            None => (true, rec_len(seq, ts)),
        }
    }

    /// Appends one record (buffered; see [`Store::flush`], [`Store::sync`])
    /// and returns its sequence and subject.
    pub fn append(&mut self, rec: &NewRecord<'_>) -> Result<(u64, SubjectId), AppendError> {
        let hdr_len = rec.headers.map(<[u8]>::len);
        let (roll, len) =
            self.placement(rec.subject.len(), hdr_len, rec.payload.len(), rec.timestamp);
        let body = len - record::PREFIX_LEN as u64;
        if body > record::MAX_BODY as u64 {
            return Err(AppendError::TooLarge {
                len,
                max: record::MAX_BODY as u64,
            });
        }
        let seq = self.last_seq + 1;
        let ts = rec.timestamp.max(self.last_ts);
        if roll {
            self.roll(seq, ts).map_err(AppendError::Io)?;
        }
        let sid = self.subjects.add(rec.subject, seq);
        let Some(seg) = self.segs.back_mut() else {
            return Err(AppendError::Io(io::Error::other("no active segment")));
        };
        let offset = seg.len as u32;
        let seal = match (&self.opts.key, &seg.seal) {
            (Some(k), Some(si)) => Some((k, &si.salt)),
            _ => None,
        };
        record::encode_any(
            &mut self.wbuf,
            seg.base,
            seg.base_ts,
            &RecordRef {
                seq,
                timestamp: ts,
                subject: rec.subject.as_bytes(),
                headers: rec.headers,
                payload: rec.payload,
            },
            seal,
            offset,
        );
        let slot = seg.offsets.len() as u32;
        seg.offsets.push(offset);
        seg.sids.push(sid);
        seg.len += len;
        seg.last_ts = ts;
        seg.live += 1;
        if let (Some(id), Some(ids)) = (rec.tags.id, seg.ids.as_mut()) {
            ids.push((slot, ts, id.to_string()));
        }
        self.last_seq = seq;
        self.last_ts = ts;
        self.msgs += 1;
        self.bytes += len;
        if let Some(at) = rec.tags.deadline {
            self.deadlines.insert((at, seq));
            self.deadline_of.insert(seq, at);
        }
        if self.wbuf.len() >= WBUF_FLUSH {
            self.flush().map_err(AppendError::Io)?;
        }
        Ok((seq, SubjectId(sid)))
    }

    /// Seals the active segment (writes its snapshot) and starts a new one
    /// whose first record is `seq` at `ts`.
    fn roll(&mut self, seq: u64, ts: u64) -> io::Result<()> {
        self.flush()?;
        if let Some(prev) = self.segs.len().checked_sub(1) {
            self.write_index(prev);
            if let Some(p) = self.segs.get(prev) {
                if p.deleted.is_some() {
                    self.compact.insert(p.base);
                }
            }
        }
        let seal = self.new_seal()?;
        record::encode_header(
            SegHeader {
                base_seq: seq,
                base_ts: ts,
                seal,
            },
            &mut self.wbuf,
        );
        self.segs.push_back(Segment::new(seq, ts, seal));
        Ok(())
    }

    /// Header fields of a new segment file: a fresh random salt when the
    /// log encrypts.
    fn new_seal(&self) -> io::Result<Option<SealInfo>> {
        if !self.opts.encrypt {
            return Ok(None);
        }
        self.new_seal_always()
    }

    /// A fresh salt under the configured key (for rewriting an encrypted
    /// segment, whether or not the log still encrypts new ones).
    pub(super) fn new_seal_always(&self) -> io::Result<Option<SealInfo>> {
        let Some(key) = &self.opts.key else {
            return Ok(None);
        };
        let mut salt = [0u8; crypt::SALT_LEN];
        crypt::random(&mut salt)?;
        Ok(Some(SealInfo {
            salt,
            check: key.check_value(&salt),
        }))
    }

    /// Writes the `.idx` snapshot of segment `si` (which must be flushed).
    /// Failure only costs a scan at the next open. Once a sealed segment's
    /// snapshot is written, its ids are dropped from memory.
    pub(super) fn write_index(&mut self, si: usize) {
        let Some(seg) = self.segs.get_mut(si) else {
            return;
        };
        if seg.indexed || !seg.created || seg.flushed != seg.len {
            return;
        }
        let base = seg.base;
        let ids = match seg.ids.take() {
            Some(ids) => ids,
            None => match self.read_ids(si) {
                Ok(ids) => ids,
                Err(e) => {
                    log::warn!(
                        "segment {base}: cannot read its records for an index snapshot: {e}"
                    );
                    return;
                }
            },
        };
        let (ix, complete) = self.snapshot_of(si, ids);
        let written = complete && self.write_snapshot(si, &ix);
        let active = si + 1 == self.segs.len();
        if let Some(seg) = self.segs.get_mut(si) {
            seg.indexed = written;
            if !written || active {
                seg.ids = Some(ix.msg_ids);
            }
        }
    }

    /// Encodes (and, for an encrypted log or segment, seals) snapshot `ix`
    /// of segment `si` and writes it atomically. False if it was not.
    fn write_snapshot(&mut self, si: usize, ix: &SegIndex) -> bool {
        let base = ix.base;
        let sealed = self.segs[si].seal.is_some();
        let mut bytes = index::encode_index(ix);
        // Subjects and ids are content: sealed when the log (or this
        // segment) is encrypted.
        if let Some(k) = self
            .opts
            .key
            .as_ref()
            .filter(|_| sealed || self.opts.encrypt)
        {
            match k.seal_blob(IDX_SEALED_MAGIC, &bytes) {
                Ok(b) => bytes = b,
                Err(e) => {
                    log::warn!("segment {base}: cannot encrypt its index snapshot: {e}");
                    return false;
                }
            }
        }
        match self.backend.write_atomic(&index_name(base), &bytes) {
            Ok(()) => true,
            Err(e) => {
                log::warn!(
                    "cannot write index snapshot for segment {base}: {e}; the next open scans it"
                );
                false
            }
        }
    }

    /// The snapshot of segment `si` with record ids `ids`, and whether it
    /// is complete (false if its last record could not be read).
    fn snapshot_of(&mut self, si: usize, ids: SegIds) -> (SegIndex, bool) {
        let seg = &self.segs[si];
        let mut ix = SegIndex {
            base: seg.base,
            base_ts: seg.base_ts,
            last_ts: seg.last_ts,
            len: seg.len,
            msg_ids: ids,
            ..SegIndex::default()
        };
        let mut local: HashMap<u32, u32> = HashMap::new();
        for i in 0..seg.offsets.len() {
            let size = seg.rec_size(i) as u32;
            let seq = seg.base + i as u64;
            if seg.is_deleted(i) || seq < self.first_seq {
                ix.slots.push(Slot::Dead { size });
                continue;
            }
            let gid = seg.sid(i);
            let name = self.subjects.entry(gid).map_or("", |e| &e.name);
            let next = local.len() as u32;
            let subject = *local.entry(gid).or_insert_with(|| {
                ix.subjects.push(name.to_string());
                next
            });
            ix.slots.push(Slot::Live { size, subject });
            if let Some(&at) = self.deadline_of.get(&seq) {
                ix.ttls.push((i as u32, at));
            }
        }
        let last = (0..seg.offsets.len()).rev().find(|&i| seg.rec_size(i) > 0);
        let (base, sealed) = (seg.base, seg.seal.is_some());
        if let Some(i) = last {
            let (off, size) = (seg.offset(i), seg.rec_size(i));
            match self.record_check(base, sealed, off, size) {
                Ok((_, check)) => ix.last_crc = check,
                Err(e) => {
                    log::warn!("segment {base}: cannot read for its index snapshot: {e}");
                    return (ix, false);
                }
            }
        }
        (ix, true)
    }

    fn run_repairs(&mut self) -> io::Result<()> {
        while let Some(r) = self.repairs.first().cloned() {
            match &r {
                Repair::Truncate(name, len) => {
                    self.backend.truncate(name, *len)?;
                    self.backend.sync(name)?;
                }
                Repair::Remove(name) => self.backend.remove(name)?,
            }
            self.repairs.remove(0);
        }
        Ok(())
    }

    /// Hands buffered appends and tombstones to the backend (no fsync).
    pub fn flush(&mut self) -> io::Result<()> {
        self.run_repairs()?;
        if self.wbuf.is_empty() {
            return self.flush_tombs();
        }
        let Some(seg) = self.segs.back_mut() else {
            self.wbuf.clear();
            return self.flush_tombs();
        };
        let name = segment_name(seg.base);
        if !seg.created {
            self.backend.create(&name)?;
            seg.created = true;
        }
        if !self.unsynced.contains(&name) {
            self.unsynced.push(name.clone());
        }
        self.backend.append(&name, &self.wbuf)?;
        seg.flushed += self.wbuf.len() as u64;
        self.wbuf.clear();
        // Tombstones after the records they name exist on disk.
        self.flush_tombs()
    }

    fn flush_tombs(&mut self) -> io::Result<()> {
        if self.tombs.is_empty() {
            return Ok(());
        }
        let mut tombs = std::mem::take(&mut self.tombs);
        tombs.sort_unstable();
        let mut k = 0;
        while k < tombs.len() {
            let base = tombs[k].0;
            let mut buf = Vec::new();
            while let Some(&(b, i)) = tombs.get(k) {
                if b != base {
                    break;
                }
                index::encode_tomb(base, i, &mut buf);
                k += 1;
            }
            let Some(seg) = self.segs.iter_mut().find(|s| s.base == base && s.created) else {
                continue; // segment gone (or never written): nothing to mark
            };
            let name = tomb_name(base);
            let res = (|| {
                if !seg.has_tombs {
                    self.backend.create(&name)?;
                    seg.has_tombs = true;
                }
                self.backend.append(&name, &buf)
            })();
            if let Err(e) = res {
                // Keep the rest for the next try (a torn entry is ignored
                // at open).
                self.tombs.extend_from_slice(&tombs[k..]);
                return Err(e);
            }
            if !self.unsynced.contains(&name) {
                self.unsynced.push(name);
            }
        }
        Ok(())
    }

    /// Flushes and fsyncs every file written since the last sync.
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        self.sync_files(|_| true)
    }

    /// Flushes everything but fsyncs only the segment files: appended
    /// records are durable, tombstones written since the last [`Store::sync`]
    /// are not yet (they stay queued for it; see [`Store::tombs_unsynced`]).
    /// For removals the caller can derive again from the records after a
    /// crash (limits), so that a group commit costs one fsync, not two.
    pub fn sync_appends(&mut self) -> io::Result<()> {
        self.flush()?;
        self.sync_files(|name| !is_tomb_name(name))
    }

    /// True when tombstone files were written but not fsynced.
    pub fn tombs_unsynced(&self) -> bool {
        !self.tombs.is_empty() || self.unsynced.iter().any(|n| is_tomb_name(n))
    }

    /// Fsyncs the unsynced files that `pick` selects, in write order.
    fn sync_files(&mut self, pick: impl Fn(&str) -> bool) -> io::Result<()> {
        let mut k = 0;
        while let Some(name) = self.unsynced.get(k) {
            if !pick(name) {
                k += 1;
                continue;
            }
            match self.backend.sync(name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.unsynced.remove(k);
        }
        Ok(())
    }

    /// The current position, for [`Store::rollback`].
    pub fn mark(&self) -> Mark {
        Mark {
            last_seq: self.last_seq,
            last_ts: self.last_ts,
            seg_last_ts: self.segs.back().map(|s| s.last_ts),
        }
    }

    /// Undoes every append after `mark`: memory state, buffered bytes and
    /// file bytes. If the file operations fail they are retried before the
    /// next write, so half-written records never stay.
    pub fn rollback(&mut self, mark: Mark) {
        self.removals += 1;
        // Per-record state first (subjects, deadlines), newest first.
        let mut q = self.last_seq;
        while q > mark.last_seq {
            if let Some(si) = self.seg_index(q) {
                let i = (q - self.segs[si].base) as usize;
                if !self.segs[si].is_deleted(i) && q >= self.first_seq {
                    let sid = self.segs[si].sid(i);
                    self.subjects.remove(sid, q);
                    if let Some(e) = self.subjects.entry(sid) {
                        if e.last >= q {
                            let prev = self.find_prev(sid, q);
                            if let Some(e) = self.subjects.entry_mut(sid) {
                                e.last = prev.unwrap_or(e.first);
                            }
                        }
                    }
                }
            }
            self.forget_deadline(q);
            q -= 1;
        }
        while self.segs.back().is_some_and(|s| s.base > mark.last_seq) {
            if let Some(seg) = self.segs.pop_back() {
                self.msgs = self.msgs.saturating_sub(seg.live);
                let n = seg.offsets.len();
                self.bytes = self
                    .bytes
                    .saturating_sub(seg.offset(n).saturating_sub(seg.offset(0)));
                self.wbuf.clear();
                if seg.created {
                    self.repairs.push(Repair::Remove(segment_name(seg.base)));
                    self.repairs.push(Repair::Remove(tomb_name(seg.base)));
                }
            }
        }
        if let Some(keep) = self.segs.back().map(|seg| seg_keep(seg, mark.last_seq)) {
            self.cut_active(keep, mark.seg_last_ts);
        }
        self.last_seq = mark.last_seq;
        self.last_ts = mark.last_ts;
        self.first_seq = self.first_seq.min(self.last_seq + 1);
        if let Err(e) = self.run_repairs() {
            log::error!("rolling back a failed write: {e}; will retry before the next write");
        }
    }

    /// Cuts the active segment back to its first `keep` records.
    fn cut_active(&mut self, keep: usize, seg_last_ts: Option<u64>) {
        let Some(seg) = self.segs.back_mut() else {
            return;
        };
        for i in keep..seg.offsets.len() {
            if !seg.is_deleted(i) && seg.base + i as u64 >= self.first_seq {
                seg.live = seg.live.saturating_sub(1);
                self.msgs = self.msgs.saturating_sub(1);
                self.bytes = self.bytes.saturating_sub(seg.rec_size(i));
            }
        }
        let new_len = seg.offset(keep);
        seg.offsets.truncate(keep);
        seg.sids.truncate(keep);
        if let Some(ids) = seg.ids.as_mut() {
            ids.retain(|(slot, _, _)| (*slot as usize) < keep);
        }
        if new_len < seg.flushed {
            self.wbuf.clear();
            seg.flushed = new_len;
        } else {
            self.wbuf
                .truncate(usize::try_from(new_len - seg.flushed).unwrap_or(usize::MAX));
        }
        seg.len = new_len;
        if let Some(t) = seg_last_ts {
            seg.last_ts = t;
        }
        if seg.indexed {
            seg.indexed = false;
            self.repairs.push(Repair::Remove(index_name(seg.base)));
        }
        if seg.created {
            // The backend may hold a partial write beyond `flushed`.
            self.repairs
                .push(Repair::Truncate(segment_name(seg.base), seg.flushed));
        }
        // Offsets past the cut may have held other sealed bytes.
        seg.no_append |= seg.seal.is_some();
    }

    /// Flush, sync, record first/last sequence in `meta` and write the
    /// index snapshots of segments that have none.
    pub fn close(&mut self) -> io::Result<()> {
        self.sync()?;
        for si in 0..self.segs.len() {
            self.write_index(si);
        }
        self.persist_bounds()
    }
}

/// How many records of `seg` are at or below `last_seq`.
fn seg_keep(seg: &Segment, last_seq: u64) -> usize {
    usize::try_from((last_seq + 1).saturating_sub(seg.base))
        .unwrap_or(usize::MAX)
        .min(seg.offsets.len())
}
