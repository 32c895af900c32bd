//! Compaction: a sealed segment whose live records use at most a quarter
//! of its record bytes is rewritten with only those records, one segment
//! per call, between batches ("Compaction" in `docs/store-format.md`).
//!
//! Invariants: the rewrite goes to `<name>.tmp`, is fdatasynced and
//! renamed over the segment (`write_atomic`), so a crash leaves the old
//! file or the new one; live records keep their bytes (plain) or are
//! re-sealed under a fresh salt (encrypted: new offsets must never reuse
//! a nonce); removed records become zero-size gaps. The active segment is
//! never compacted.

use std::io;

use super::record::{self, SealInfo, SegHeader};
use super::segment::{index_name, sealing, segment_name, tomb_name};
use super::{Store, COMPACT_RATIO};

impl Store {
    /// True when [`Store::maintain`] has work (segment compaction).
    pub fn needs_maintenance(&self) -> bool {
        !self.compact.is_empty()
    }

    /// One step of background work: compacts at most one mostly-deleted
    /// sealed segment (rewritten to a new file, swapped atomically).
    pub fn maintain(&mut self) -> io::Result<()> {
        let Some(base) = self.compact.pop_first() else {
            return Ok(());
        };
        let Some(si) = self.segs.iter().position(|s| s.base == base) else {
            return Ok(());
        };
        if si + 1 >= self.segs.len() {
            return Ok(()); // the active segment is never compacted
        }
        let seg = &self.segs[si];
        let data = seg.len - seg.header_len();
        let mut live_bytes = 0;
        for i in 0..seg.offsets.len() {
            if !seg.is_deleted(i) && seg.base + i as u64 >= self.first_seq {
                live_bytes += seg.rec_size(i);
            }
        }
        if live_bytes * COMPACT_RATIO > data {
            return Ok(());
        }
        self.flush()?;
        if live_bytes == 0 && self.segs[si].live == 0 {
            // Nothing left: drop the whole file.
            self.remove_segment_files(base)?;
            self.segs.remove(si);
            return Ok(());
        }
        // The ids of every record (removed ones too) go into the new
        // snapshot; read them while the old file is still there.
        let ids = match self.segs[si].ids.take() {
            Some(ids) => ids,
            None => self.read_ids(si)?,
        };
        let n = self.segs[si].offsets.len();
        self.read_span(si, 0, n)?;
        // An encrypted segment is rewritten under a new salt: its records
        // move to new offsets, which must never be reused with the old one.
        let new_seal = match self.segs[si].seal {
            Some(_) => match self.new_seal_always()? {
                Some(ns) => Some(ns),
                None => return Ok(()), // no key: open refuses such a log
            },
            None => None,
        };
        let (out, offsets, dead) = self.rewrite(si, new_seal, live_bytes)?;
        let saved = self.segs[si].len - out.len() as u64;
        self.backend.write_atomic(&segment_name(base), &out)?;
        let seg = &mut self.segs[si];
        seg.offsets = offsets;
        seg.seal = new_seal;
        seg.len = out.len() as u64;
        seg.flushed = seg.len;
        seg.indexed = false;
        seg.ids = Some(ids);
        for i in dead {
            seg.set_deleted(i);
        }
        self.backend.remove(&index_name(base))?;
        self.write_index(si);
        if self.segs[si].indexed {
            // Gaps now carry the deletions: the tombstones are redundant.
            self.backend.remove(&tomb_name(base))?;
            self.segs[si].has_tombs = false;
        }
        log::debug!("compacted segment {base}: {saved} bytes freed");
        Ok(())
    }

    /// The new file of segment `si` (read into scratch) holding only its
    /// live records: its bytes, each slot's new offset, and the slots that
    /// became gaps.
    fn rewrite(
        &mut self,
        si: usize,
        new_seal: Option<SealInfo>,
        live_bytes: u64,
    ) -> io::Result<(Vec<u8>, Vec<u32>, Vec<usize>)> {
        let seg = &self.segs[si];
        let base = seg.base;
        let n = seg.offsets.len();
        let mut out = Vec::with_capacity(live_bytes as usize + record::SEALED_HEADER_LEN);
        record::encode_header(
            SegHeader {
                base_seq: seg.base,
                base_ts: seg.base_ts,
                seal: new_seal,
            },
            &mut out,
        );
        let start = seg.offset(0);
        let mut offsets = Vec::with_capacity(n);
        let mut dead = Vec::new();
        let old_seal = sealing(&self.opts.key, seg);
        for i in 0..n {
            offsets.push(out.len() as u32);
            let alive = !seg.is_deleted(i) && seg.base + i as u64 >= self.first_seq;
            if !alive {
                dead.push(i);
                continue;
            }
            let a = (seg.offset(i) - start) as usize;
            let b = (seg.offset(i + 1) - start) as usize;
            let Some(bytes) = self.scratch.get_mut(a..b) else {
                continue;
            };
            match (old_seal, &new_seal) {
                (Some((key, _)), Some(ns)) => {
                    let at = out.len() as u32;
                    match record::decode_any(bytes, seg.base, seg.base_ts, old_seal, seg.offset(i))
                    {
                        Ok((rec, _)) => record::encode_any(
                            &mut out,
                            seg.base,
                            seg.base_ts,
                            &rec,
                            Some((key, &ns.salt)),
                            at,
                        ),
                        Err(_) => {
                            return Err(io::Error::other(format!(
                                "segment {base}: record {} is damaged; not compacting",
                                seg.base + i as u64
                            )))
                        }
                    }
                }
                _ => out.extend_from_slice(bytes),
            }
        }
        Ok((out, offsets, dead))
    }
}
