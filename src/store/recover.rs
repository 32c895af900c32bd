//! Opening a log: listing the directory, checking keys, trusting or
//! rejecting index snapshots, scanning segments, cutting torn or corrupt
//! tails, applying tombstones, and rebuilding the in-memory index.
//! The procedure is "Recovery (open)" in `docs/store-format.md`.
//!
//! Invariants: nothing on disk changes before every key check passed; a
//! record is indexed only if it decoded with a matching checksum (or its
//! segment's snapshot matched the file); the report counts every byte cut
//! and every record known lost.

use std::collections::{BTreeSet, HashMap};
use std::io;

use super::index::{self, SegIndex, Slot};
use super::record::{self, SealInfo, SegHeader, SEG_HEADER_LEN};
use super::segment::{
    decode_meta, index_name, parse_name, segment_name, tomb_name, SegIds, Segment, META_NAME,
};
use super::{crypt, read_whole, RecoveryReport, Store};

/// Magic of an encrypted index snapshot: `magic ‖ nonce ‖ ciphertext of
/// the plain snapshot ‖ tag`, the magic as associated data.
pub(super) const IDX_SEALED_MAGIC: &[u8; 8] = b"FRNDIDXE";

/// What recovery collected from one segment (index or scan).
struct Loaded {
    ix: SegIndex,
    seal: Option<SealInfo>,
    indexed: bool,
    tombs: Vec<u32>,
}

/// The directory's files, sorted by kind.
#[derive(Default)]
struct Listing {
    bases: Vec<u64>,
    idx_files: BTreeSet<u64>,
    del_files: BTreeSet<u64>,
    meta: Option<(u64, u64)>,
    keycheck: Option<Vec<u8>>,
}

impl Store {
    fn read_file(&mut self, name: &str) -> io::Result<Vec<u8>> {
        read_whole(&mut *self.backend, name)
    }

    pub(super) fn recover(
        &mut self,
        visit: &mut dyn FnMut(u64, u64, &str),
    ) -> io::Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        let files = self.list_files()?;
        let write_keycheck = self.check_keycheck(files.keycheck.clone())?;
        // Every encrypted segment's key check first: a wrong key must not
        // get as far as cutting "corrupt" records anywhere.
        for &base in &files.bases {
            let name = segment_name(base);
            let len = self.backend.len(&name)?;
            let mut h = vec![0u8; len.min(record::SEALED_HEADER_LEN as u64) as usize];
            self.backend.read_at(&name, 0, &mut h)?;
            if let Ok(hd) = record::decode_header(&h) {
                self.check_seal(&name, &hd.seal)?;
            }
        }
        let loaded = self.load_segments(&files, &mut report)?;
        // Orphan snapshots and tombstones (their segment is gone).
        for base in files.idx_files.iter().chain(files.del_files.iter()) {
            if !loaded.iter().any(|l| l.ix.base == *base) {
                self.backend.remove(&index_name(*base))?;
                self.backend.remove(&tomb_name(*base))?;
            }
        }
        let (meta_first, meta_last) = files.meta.unwrap_or((1, 0));
        let seg_last = loaded.last().map_or(0, |l| {
            (l.ix.base + l.ix.slots.len() as u64).saturating_sub(1)
        });
        self.last_seq = meta_last.max(seg_last);
        self.last_ts = loaded.last().map_or(0, |l| l.ix.last_ts);
        self.first_seq = meta_first
            .max(loaded.first().map_or(1, |l| l.ix.base))
            .max(1)
            .min(self.last_seq + 1);
        let n = loaded.len();
        for (k, l) in loaded.into_iter().enumerate() {
            self.install(l, k + 1 == n, visit);
        }
        report.records = self.msgs;
        if let (true, Some(k)) = (write_keycheck, &self.opts.key) {
            let b = k.keycheck()?;
            self.backend.write_atomic(crypt::KEYCHECK_NAME, &b)?;
        }
        if let Some(seg) = self.segs.back_mut() {
            // Its tail may have held other bytes before a crash (a torn or
            // lost write): never encrypt new records at those offsets.
            seg.no_append = seg.seal.is_some();
        }
        self.advance_first();
        self.drop_dead_segments();
        Ok(report)
    }

    /// Lists the directory (deleting leftover `*.tmp` files) and reads
    /// `meta` and `keycheck`.
    fn list_files(&mut self) -> io::Result<Listing> {
        let mut f = Listing::default();
        for name in self.backend.list()? {
            match parse_name(&name) {
                Some((base, "seg")) => f.bases.push(base),
                Some((base, "idx")) => {
                    f.idx_files.insert(base);
                }
                Some((base, "del")) => {
                    f.del_files.insert(base);
                }
                _ if name == META_NAME => {
                    let b = self.read_file(&name)?;
                    f.meta = decode_meta(&b);
                    if f.meta.is_none() {
                        log::warn!("log {}: meta file is damaged; ignoring it (sequences are recovered from the segments)", self.opts.name);
                    }
                }
                _ if name == crypt::KEYCHECK_NAME => f.keycheck = Some(self.read_file(&name)?),
                _ if name.ends_with(".tmp") => self.backend.remove(&name)?,
                _ => {}
            }
        }
        f.bases.sort_unstable();
        Ok(f)
    }

    /// Each segment, in order: from its snapshot if trusted, else scanned.
    fn load_segments(
        &mut self,
        files: &Listing,
        report: &mut RecoveryReport,
    ) -> io::Result<Vec<Loaded>> {
        let mut loaded: Vec<Loaded> = Vec::new();
        for (k, &base) in files.bases.iter().enumerate() {
            let name = segment_name(base);
            let next_base = files.bases.get(k + 1).copied();
            let is_last = next_base.is_none();
            let len = self.backend.len(&name)?;
            let prev_end = loaded
                .last()
                .map_or(0, |l| l.ix.base + l.ix.slots.len() as u64);
            let mut ix = None;
            if files.idx_files.contains(&base) {
                ix = self.try_index(base, len, prev_end)?;
                if ix.is_none() {
                    log::info!("segment {name}: index snapshot does not match; scanning");
                }
                if is_last || ix.is_none() {
                    // The active segment changes from now on: its snapshot
                    // is rewritten when it is sealed or at close.
                    self.backend.remove(&index_name(base))?;
                }
            }
            let indexed = ix.is_some() && !is_last;
            let (ix, header) = match ix {
                Some(ix) => ix,
                None => {
                    let buf = self.read_file(&name)?;
                    match self.scan(&name, base, buf, prev_end, next_base, report)? {
                        Some(ix) => ix,
                        None => continue,
                    }
                }
            };
            if ix.slots.is_empty() && !is_last {
                self.remove_segment_files(base)?;
                continue;
            }
            let tombs = if files.del_files.contains(&base) {
                let b = self.read_file(&tomb_name(base))?;
                let (t, damaged) = index::decode_tombs(base, &b);
                if damaged {
                    log::warn!("segment {name}: tombstone file damaged after {} entries; deleted records past that may reappear", t.len());
                }
                t
            } else {
                Vec::new()
            };
            loaded.push(Loaded {
                ix,
                seal: header.seal,
                indexed,
                tombs,
            });
        }
        Ok(loaded)
    }

    /// Uses `<base>.idx` if it matches the segment file exactly.
    fn try_index(
        &mut self,
        base: u64,
        len: u64,
        prev_end: u64,
    ) -> io::Result<Option<(SegIndex, SegHeader)>> {
        let raw = self.read_file(&index_name(base))?;
        let plain = if raw.starts_with(IDX_SEALED_MAGIC) {
            match &self.opts.key {
                Some(k) => k.open_blob(IDX_SEALED_MAGIC, &raw),
                None => None,
            }
        } else {
            Some(raw)
        };
        let Some(ix) = plain.and_then(|p| index::decode_index(&p)) else {
            return Ok(None);
        };
        if ix.base != base || ix.len != len || base < prev_end || len < SEG_HEADER_LEN as u64 {
            return Ok(None);
        }
        let mut h = vec![0u8; (len as usize).min(record::SEALED_HEADER_LEN)];
        self.backend.read_at(&segment_name(base), 0, &mut h)?;
        let hd = match record::decode_header(&h) {
            Ok(hd) if hd.base_seq == base && hd.base_ts == ix.base_ts => hd,
            _ => return Ok(None),
        };
        self.check_seal(&segment_name(base), &hd.seal)?;
        let total: u64 = ix.slots.iter().map(|s| u64::from(s.size())).sum();
        if hd.header_len() as u64 + total != len {
            return Ok(None);
        }
        let last = ix
            .slots
            .iter()
            .rev()
            .find_map(|s| (s.size() > 0).then_some(s.size()));
        if let Some(size) = last {
            let size = u64::from(size);
            let (total, check) = self.record_check(base, hd.seal.is_some(), len - size, size)?;
            if total != size || check != ix.last_crc {
                return Ok(None);
            }
        } else if ix.last_crc != 0 {
            return Ok(None);
        }
        Ok(Some((ix, hd)))
    }

    /// Length (from its length field) and check word (plain: the crc;
    /// encrypted: the last 4 bytes of the tag) of the record of `size`
    /// bytes at `off` in segment `base`.
    pub(super) fn record_check(
        &mut self,
        base: u64,
        sealed: bool,
        off: u64,
        size: u64,
    ) -> io::Result<(u64, u32)> {
        let name = segment_name(base);
        if !sealed {
            let mut p = [0u8; record::PREFIX_LEN];
            self.backend.read_at(&name, off, &mut p)?;
            let word = |r: std::ops::Range<usize>| {
                u32::from_le_bytes([p[r.start], p[r.start + 1], p[r.start + 2], p[r.start + 3]])
            };
            let (body, crc) = (word(record::REC_BODY_LEN), word(record::REC_CRC));
            return Ok((u64::from(body) + record::PREFIX_LEN as u64, crc));
        }
        if size < 4 {
            return Ok((0, 0));
        }
        let mut p = vec![0u8; size.min(5) as usize];
        self.backend.read_at(&name, off, &mut p)?;
        let total = record::peek_len_sealed(&p).map_or(0, |(_, t)| t as u64);
        let mut t = [0u8; 4];
        self.backend.read_at(&name, off + size - 4, &mut t)?;
        Ok((total, u32::from_le_bytes(t)))
    }

    /// Refuses an encrypted segment the configured key did not write:
    /// reading on would find every record "corrupt" and cut them.
    fn check_seal(&self, name: &str, seal: &Option<SealInfo>) -> io::Result<()> {
        let Some(si) = seal else {
            return Ok(());
        };
        let stream = &self.opts.name;
        match &self.opts.key {
            None => Err(io::Error::other(format!(
                "stream {stream}: segment {name} is encrypted but no encryption_key_file is \
                 configured; configure the key file the stream was written with"
            ))),
            Some(k) if k.check_value(&si.salt) != si.check => Err(io::Error::other(format!(
                "stream {stream}: the key in {} is not the key segment {name} was encrypted \
                 with; configure the right encryption_key_file (nothing was changed on disk)",
                k.source()
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Checks the log's key check file against the configured key.
    /// `Ok(true)`: a log that encrypts and has no (valid) file; write one
    /// once the segments were accepted.
    fn check_keycheck(&mut self, file: Option<Vec<u8>>) -> io::Result<bool> {
        let Some(key) = self.opts.key.clone() else {
            return Ok(false);
        };
        let stream = &self.opts.name;
        match file.as_deref().map(|b| key.matches_keycheck(b)) {
            Some(Some(true)) => Ok(false),
            Some(Some(false)) if self.opts.encrypt => Err(io::Error::other(format!(
                "stream {stream}: the key in {} is not the key this stream was encrypted with \
                 (its {} file says so); configure the right encryption_key_file, or delete that \
                 file if the stream holds no encrypted data any more",
                key.source(),
                crypt::KEYCHECK_NAME
            ))),
            Some(Some(false)) => Ok(false),
            _ if self.opts.encrypt => {
                if file.is_some() {
                    log::warn!(
                        "stream {stream}: {} file damaged; rewriting it",
                        crypt::KEYCHECK_NAME
                    );
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Reads a segment record by record, cutting it at the first record
    /// that fails. `None`: the file was unusable and removed.
    fn scan(
        &mut self,
        name: &str,
        base: u64,
        mut buf: Vec<u8>,
        prev_end: u64,
        next_base: Option<u64>,
        report: &mut RecoveryReport,
    ) -> io::Result<Option<(SegIndex, SegHeader)>> {
        let len = buf.len() as u64;
        let header = record::decode_header(&buf)
            .ok()
            .filter(|h| h.base_seq == base && base >= prev_end);
        let Some(h) = header else {
            if let Some(nb) = next_base {
                report.lost_records += nb.saturating_sub(base);
            }
            report.truncated_bytes += len;
            log::error!("segment {name}: header damaged; removing the file ({len} bytes)");
            self.remove_segment_files(base)?;
            return Ok(None);
        };
        self.check_seal(name, &h.seal)?;
        let (ix, pos, cut) = self.scan_records(&mut buf, &h);
        if let Some(why) = cut {
            let dropped = len - pos as u64;
            report.truncated_bytes += dropped;
            if next_base.is_none() {
                let tail = buf.get(pos..).unwrap_or(&[]);
                report.cut_records += records_in(tail, h.seal.is_some());
            }
            if let Some(nb) = next_base {
                report.lost_records += nb.saturating_sub(base + ix.slots.len() as u64);
            }
            let tail = if next_base.is_none() {
                " (the tail: not fsynced at a crash?)"
            } else {
                ""
            };
            log::warn!("segment {name}: {why} at offset {pos}; cutting {dropped} bytes{tail}");
            self.backend.truncate(name, pos as u64)?;
            self.backend.sync(name)?;
        }
        Ok(Some((ix, h)))
    }

    /// The index of the valid records of a segment read into `buf`, the
    /// offset where they end, and why the rest (if any) is cut.
    fn scan_records(
        &self,
        buf: &mut [u8],
        h: &SegHeader,
    ) -> (SegIndex, usize, Option<&'static str>) {
        let base = h.base_seq;
        let mut ix = SegIndex {
            base,
            base_ts: h.base_ts,
            last_ts: h.base_ts,
            ..SegIndex::default()
        };
        let seal = match (&self.opts.key, &h.seal) {
            (Some(k), Some(si)) => Some((k, &si.salt)),
            _ => None,
        };
        let tagger = self.opts.tagger;
        let mut local: HashMap<String, u32> = HashMap::new();
        let mut pos = h.header_len();
        let mut cut = None;
        while pos < buf.len() {
            let expect = base + ix.slots.len() as u64;
            let (rec, n) =
                match record::decode_any(&mut buf[pos..], base, h.base_ts, seal, pos as u64) {
                    Ok((rec, n)) if rec.seq >= expect && u32::try_from(pos + n).is_ok() => (rec, n),
                    Ok(_) => {
                        cut = Some("record out of sequence");
                        break;
                    }
                    Err(record::DecodeError::Incomplete) => {
                        cut = Some("record incomplete (torn write)");
                        break;
                    }
                    Err(record::DecodeError::Corrupt(why)) => {
                        cut = Some(why);
                        break;
                    }
                };
            // A gap: slots removed by compaction.
            let gap = usize::try_from(rec.seq - expect).unwrap_or(usize::MAX);
            if gap > u32::MAX as usize {
                cut = Some("record sequence out of range");
                break;
            }
            ix.slots
                .resize(ix.slots.len() + gap, Slot::Dead { size: 0 });
            let subj = String::from_utf8_lossy(rec.subject);
            let next = local.len() as u32;
            let subject = *local.entry(subj.into_owned()).or_insert(next);
            let slot = ix.slots.len() as u32;
            ix.slots.push(Slot::Live {
                size: n as u32,
                subject,
            });
            ix.last_ts = ix.last_ts.max(rec.timestamp);
            if let (Some(hd), Some(tag)) = (rec.headers, tagger) {
                let t = tag(hd, rec.timestamp);
                if let Some(at) = t.deadline {
                    ix.ttls.push((slot, at));
                }
                if let Some(id) = t.id {
                    ix.msg_ids.push((slot, rec.timestamp, id.to_string()));
                }
            }
            // Plain: the crc; encrypted: the tag's last 4 bytes.
            let w = if seal.is_some() {
                pos + n - 4
            } else {
                pos + record::REC_CRC.start
            };
            ix.last_crc = buf
                .get(w..w + 4)
                .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            pos += n;
        }
        let mut subjects = vec![String::new(); local.len()];
        for (s, i) in local {
            if let Some(slot) = subjects.get_mut(i as usize) {
                *slot = s;
            }
        }
        ix.subjects = subjects;
        ix.len = pos as u64;
        (ix, pos, cut)
    }

    /// Turns a loaded segment into memory state (first/last seq known).
    /// Reports its ids to `visit`; keeps them if the segment may need a
    /// snapshot later (the active one).
    fn install(&mut self, l: Loaded, is_last: bool, visit: &mut dyn FnMut(u64, u64, &str)) {
        let mut ix = l.ix;
        let mut seg = Segment::new(ix.base, ix.base_ts, l.seal);
        seg.last_ts = ix.last_ts;
        seg.len = ix.len;
        seg.flushed = ix.len;
        seg.created = true;
        seg.indexed = l.indexed;
        seg.has_tombs = !l.tombs.is_empty();
        seg.offsets.reserve_exact(ix.slots.len());
        seg.sids.reserve_exact(ix.slots.len());
        let mut off = seg.header_len();
        for (i, s) in ix.slots.iter().enumerate() {
            seg.offsets.push(off as u32);
            off += u64::from(s.size());
            match *s {
                Slot::Live { subject, .. } => seg.sids.push(subject),
                Slot::Dead { .. } => {
                    seg.sids.push(u32::MAX);
                    seg.set_deleted(i);
                }
            }
        }
        for &t in &l.tombs {
            if (t as usize) < seg.offsets.len() {
                seg.set_deleted(t as usize);
            }
        }
        self.index_subjects(&mut seg, &ix.subjects);
        for &(slot, at) in &ix.ttls {
            let i = slot as usize;
            let seq = seg.base + u64::from(slot);
            if i < seg.offsets.len() && !seg.is_deleted(i) && seq >= self.first_seq {
                self.deadlines.insert((at, seq));
                self.deadline_of.insert(seq, at);
            }
        }
        for (slot, ts, id) in &ix.msg_ids {
            visit(seg.base + u64::from(*slot), *ts, id);
        }
        // Only the active segment keeps its ids (for its snapshot); a
        // sealed one without a snapshot reads them back if it gets one.
        seg.ids = is_last.then(|| std::mem::take(&mut ix.msg_ids) as SegIds);
        self.segs.push_back(seg);
    }

    /// Local subject ids of a loaded segment -> global, counting its live
    /// records into the subject table and the totals.
    fn index_subjects(&mut self, seg: &mut Segment, names: &[String]) {
        let mut map: Vec<Option<u32>> = vec![None; names.len()];
        for i in 0..seg.offsets.len() {
            let seq = seg.base + i as u64;
            if seq < self.first_seq || seg.is_deleted(i) {
                continue;
            }
            let local = seg.sids[i] as usize;
            let gid = match map.get(local).copied().flatten() {
                Some(g) => {
                    if let Some(e) = self.subjects.entry_mut(g) {
                        if e.count == 0 {
                            e.first = seq;
                        }
                        e.count += 1;
                        e.last = seq;
                    }
                    g
                }
                None => {
                    let name = names.get(local).map_or("", String::as_str);
                    let g = self.subjects.add(name, seq);
                    if let Some(m) = map.get_mut(local) {
                        *m = Some(g);
                    }
                    g
                }
            };
            seg.sids[i] = gid;
            seg.live += 1;
            self.bytes += seg.rec_size(i);
        }
        self.msgs += seg.live;
    }

    pub(super) fn remove_segment_files(&mut self, base: u64) -> io::Result<()> {
        self.backend.remove(&segment_name(base))?;
        self.backend.remove(&index_name(base))?;
        self.backend.remove(&tomb_name(base))
    }
}

/// A lower bound of the records in `tail`, bytes cut from a segment: the
/// plain records whose length prefixes chain from its start (a zero-filled
/// hole ends the walk), and at least one if any byte is not zero.
pub(super) fn records_in(tail: &[u8], sealed: bool) -> u64 {
    if tail.iter().all(|&b| b == 0) {
        return 0;
    }
    if sealed {
        return 1;
    }
    let mut n = 0u64;
    let mut pos = 0usize;
    while let Some(p) = tail.get(pos..pos.saturating_add(4)) {
        let body = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
        if !(record::MIN_BODY..=record::MAX_BODY).contains(&body) {
            break;
        }
        n += 1;
        pos = pos.saturating_add(record::PREFIX_LEN + body);
    }
    n.max(1)
}
