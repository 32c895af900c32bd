//! Durable state outside the stream store: MQTT sessions ([`sessions`]),
//! pending wills ([`wills`]), retained messages ([`retained`]), JetStream
//! consumer state ([`consumers`]) and mirror cursors ([`cursors`]), all on
//! the store's [`Backend`] trait, so the crash-injection backend
//! ([`crate::store::backend::MemBackend`]) drives them as it drives the
//! streams (`crash_tests.rs`).
//!
//! This module is the one small record facility they share:
//! - [`Disk`]: a directory as a few [`Backend`] instances; every file of a
//!   key (a session, a will) always goes through the same instance, so a
//!   backend's cached file handles never outlive a removal made through
//!   another, and saves of different keys run in parallel.
//! - Slot records ([`write_slot`], [`read_slots`]): two files `<stem>.a` and
//!   `<stem>.b`, written alternately in place with one `fdatasync`, the
//!   valid one with the higher sequence wins. For state saved on the hot
//!   path (an MQTT session is saved before QoS 2 acknowledgements): about a
//!   sixth of the cost of an atomic replace.
//! - Atomic records ([`write_record`], [`read_record`]): one file replaced
//!   by [`Backend::write_atomic`] (temp file, fsync, rename, directory
//!   fsync — the only place that is written). For state saved rarely
//!   (wills, consumers, cursors).
//!
//! Record layouts (little endian), also in `docs/store-format.md`:
//! - slot: [`SLOT_MAGIC`], `seq: u64`, `len: u32`, `crc32c: u32` of
//!   `seq`, `len` and the body, body; bytes after the body are stale.
//!   [`SLOT_MAGIC_JSON`] marks the JSON slots of earlier releases, read
//!   for upgrade (their checksum covers the body only, so a write torn
//!   inside their header could pass: the new checksum covers it).
//! - atomic record: [`REC_MAGIC`], `len: u32`, `crc32c: u32`, body. A file
//!   that does not start with the magic is a JSON file of an earlier
//!   release, read for upgrade.
//! - body: [`VERSION`], then the value in postcard ([`encode`]).
//!
//! Invariants:
//! - A record whose checksum, length or body does not check out is
//!   reported to the caller (who logs it and skips it), never fatal.
//! - State written in an earlier format is read, and written in the
//!   current one at its next save.
//! - Nothing here reads a clock: callers pass `now`, or a [`Clock`].

pub mod api_streams;
pub mod consumers;
pub mod cursors;
pub mod retained;
pub mod sessions;
pub mod wills;

#[cfg(test)]
mod crash_tests;

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::backend::{Backend, FsBackend};

/// Unix milliseconds, given by the caller (the shells read the clock).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The version byte leading every record body this release writes.
pub const VERSION: u8 = 1;
/// Slot record (postcard body).
pub const SLOT_MAGIC: &[u8; 4] = b"FSS2";
/// Slot record of earlier releases (JSON body).
pub const SLOT_MAGIC_JSON: &[u8; 4] = b"FSS1";
/// Slot header: magic, `seq: u64` at 4, `len: u32` at 12, `crc32c: u32`
/// at 16 (of bytes 4..16 and the body).
pub const SLOT_HEADER: usize = 20;
/// Atomic record (postcard body).
pub const REC_MAGIC: &[u8; 4] = b"FSR1";
/// Atomic record header: magic, `len: u32` at 4, `crc32c: u32` at 8.
pub const REC_HEADER: usize = 12;

/// Backend instances of one directory (see the module doc).
pub struct Disk {
    shards: Vec<Mutex<Box<dyn Backend>>>,
    make: Box<dyn Fn() -> io::Result<Box<dyn Backend>> + Send + Sync>,
}

/// Instances of a directory on the file system: saves of this many keys
/// may wait on their fsync at once.
const FS_SHARDS: usize = 8;

impl Disk {
    /// `dir` on the file system (created if needed).
    pub fn fs(dir: &Path) -> io::Result<Disk> {
        let dir = dir.to_path_buf();
        Disk::new(FS_SHARDS, move || {
            FsBackend::open(&dir).map(|b| Box::new(b) as Box<dyn Backend>)
        })
    }

    /// `n` instances made by `make` (which a scan also uses for a
    /// short-lived one).
    pub fn new(
        n: usize,
        make: impl Fn() -> io::Result<Box<dyn Backend>> + Send + Sync + 'static,
    ) -> io::Result<Disk> {
        let shards = (0..n.max(1))
            .map(|_| make().map(Mutex::new))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Disk {
            shards,
            make: Box::new(make),
        })
    }

    /// The instance of `key`'s files; its file handles are closed when the
    /// guard drops (a directory of many sessions holds no descriptors
    /// between saves).
    pub fn lock(&self, key: &str) -> Held<'_> {
        // FNV-1a: stable, cheap, good enough to spread keys.
        let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let i = usize::try_from(h % self.shards.len() as u64).unwrap_or(0);
        let shard = self.shards.get(i).unwrap_or(&self.shards[0]);
        Held(shard.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A fresh instance for a scan at start (dropped after, with its file
    /// handles).
    pub fn scratch(&self) -> io::Result<Box<dyn Backend>> {
        (self.make)()
    }
}

/// One instance of a [`Disk`], locked.
pub struct Held<'a>(MutexGuard<'a, Box<dyn Backend>>);

impl std::ops::Deref for Held<'_> {
    type Target = Box<dyn Backend>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// `v` as a record body: [`VERSION`], then postcard.
pub fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    postcard::to_extend(v, vec![VERSION]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// A record body written by [`encode`].
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    match body.split_first() {
        Some((&VERSION, rest)) => {
            postcard::from_bytes(rest).map_err(|e| format!("bad record: {e}"))
        }
        Some((v, _)) => Err(format!("unknown record version {v}")),
        None => Err("empty record".into()),
    }
}

/// What a record file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// A body of this release ([`decode`] it).
    Current(Vec<u8>),
    /// JSON written by an earlier release.
    Json(Vec<u8>),
}

/// The whole of file `name`; `None` if it does not exist.
pub fn read_all(b: &mut dyn Backend, name: &str) -> io::Result<Option<Vec<u8>>> {
    let len = match b.len(name) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = usize::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    let mut buf = vec![0u8; len];
    b.read_at(name, 0, &mut buf)?;
    Ok(Some(buf))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn corrupt(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// Replace record `name` with `body` atomically and durably.
pub fn write_record(b: &mut dyn Backend, name: &str, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| corrupt("record too large"))?;
    let mut data = Vec::with_capacity(REC_HEADER + body.len());
    data.extend_from_slice(REC_MAGIC);
    data.extend_from_slice(&len.to_le_bytes());
    data.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    data.extend_from_slice(body);
    b.write_atomic(name, &data)
}

/// Record `name`: `None` if absent, an error of kind `InvalidData` if it
/// fails its checksum.
pub fn read_record(b: &mut dyn Backend, name: &str) -> io::Result<Option<Body>> {
    let Some(data) = read_all(b, name)? else {
        return Ok(None);
    };
    if data.get(..4) != Some(&REC_MAGIC[..]) {
        return Ok(Some(Body::Json(data)));
    }
    let len = u32_at(&data, 4).ok_or_else(|| corrupt("torn header"))? as usize;
    let crc = u32_at(&data, 8).ok_or_else(|| corrupt("torn header"))?;
    let body = REC_HEADER
        .checked_add(len)
        .and_then(|end| data.get(REC_HEADER..end))
        .ok_or_else(|| corrupt("shorter than its length"))?;
    if crc32c::crc32c(body) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(Some(Body::Current(body.to_vec())))
}

/// The slot file of sequence `seq`.
pub fn slot_name(stem: &str, seq: u64) -> String {
    format!("{stem}.{}", if seq.is_multiple_of(2) { "a" } else { "b" })
}

/// Write `body` as sequence `seq` into its slot, in place, then sync (a
/// new slot file also gets its directory entry synced). True when the
/// slot file was created.
pub fn write_slot(b: &mut dyn Backend, stem: &str, seq: u64, body: &[u8]) -> io::Result<bool> {
    put_slot(b, stem, seq, body, true)
}

/// [`write_slot`], synced only if `sync` (unsynced, a crash may leave the
/// slot torn: it then fails its checksum and the other slot is used).
pub fn put_slot(
    b: &mut dyn Backend,
    stem: &str,
    seq: u64,
    body: &[u8],
    sync: bool,
) -> io::Result<bool> {
    let len = u32::try_from(body.len()).map_err(|_| corrupt("record too large"))?;
    let mut data = Vec::with_capacity(SLOT_HEADER + body.len());
    data.extend_from_slice(SLOT_MAGIC);
    data.extend_from_slice(&seq.to_le_bytes());
    data.extend_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&data[4..16]), body);
    data.extend_from_slice(&crc.to_le_bytes());
    data.extend_from_slice(body);
    write_slot_bytes(b, &slot_name(stem, seq), &data, sync)
}

/// Overwrite slot file `name` with `data` from offset 0 (created if new;
/// then true).
fn write_slot_bytes(b: &mut dyn Backend, name: &str, data: &[u8], sync: bool) -> io::Result<bool> {
    let (held, created) = match b.len(name) {
        Ok(n) => (usize::try_from(n).unwrap_or(usize::MAX), false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            b.create(name)?;
            (0, true)
        }
        Err(e) => return Err(e),
    };
    let (over, tail) = data.split_at(held.min(data.len()));
    if !over.is_empty() {
        b.write_at(name, 0, over)?;
    }
    if !tail.is_empty() {
        b.append(name, tail)?;
    }
    if sync {
        b.sync(name)?;
    }
    Ok(created)
}

/// What [`read_slots`] found.
#[derive(Debug, Default)]
pub struct Slots {
    /// The valid slot with the highest sequence: body and sequence.
    pub best: Option<(Body, u64)>,
    /// Whether any slot file exists.
    pub found: bool,
    /// Slot files that did not check out (torn or corrupt), with why.
    pub bad: Vec<(String, String)>,
}

/// Read both slots of `stem`.
pub fn read_slots(b: &mut dyn Backend, stem: &str) -> Slots {
    let mut out = Slots::default();
    for seq in [0u64, 1] {
        let name = slot_name(stem, seq);
        let data = match read_all(b, &name) {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                out.found = true;
                out.bad.push((name, format!("unreadable: {e}")));
                continue;
            }
        };
        out.found = true;
        match decode_slot(&data) {
            Ok((body, q)) => {
                if out.best.as_ref().is_none_or(|(_, b)| q > *b) {
                    out.best = Some((body, q));
                }
            }
            Err(why) => out.bad.push((name, why.into())),
        }
    }
    out
}

/// A slot's body and sequence, or why it does not check out.
fn decode_slot(data: &[u8]) -> Result<(Body, u64), &'static str> {
    let magic = data.get(..4).ok_or("torn header")?;
    let json = match magic {
        m if m == SLOT_MAGIC => false,
        m if m == SLOT_MAGIC_JSON => true,
        _ => return Err("not a slot"),
    };
    let seq = u64_at(data, 4).ok_or("torn header")?;
    let len = u32_at(data, 12).ok_or("torn header")? as usize;
    let crc = u32_at(data, 16).ok_or("torn header")?;
    let body = SLOT_HEADER
        .checked_add(len)
        .and_then(|end| data.get(SLOT_HEADER..end))
        .ok_or("shorter than its length")?;
    let sum = match json {
        true => crc32c::crc32c(body),
        false => crc32c::crc32c_append(crc32c::crc32c(data.get(4..16).ok_or("torn")?), body),
    };
    if sum != crc {
        return Err("checksum mismatch");
    }
    let body = body.to_vec();
    Ok((
        if json {
            Body::Json(body)
        } else {
            Body::Current(body)
        },
        seq,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backend::MemBackend;

    #[test]
    fn records_round_trip_and_report_corruption() {
        let mem = MemBackend::new();
        let mut b = mem.clone();
        let body = encode(&("x", 7u64)).unwrap();
        assert_eq!(body[0], VERSION);
        write_record(&mut b, "r", &body).unwrap();
        let Some(Body::Current(got)) = read_record(&mut b, "r").unwrap() else {
            panic!("not current")
        };
        assert_eq!(decode::<(String, u64)>(&got).unwrap(), ("x".into(), 7));
        assert!(decode::<(String, u64)>(&[9, 1]).is_err(), "unknown version");
        assert_eq!(read_record(&mut b, "none").unwrap(), None);
        mem.flip_bit("r", REC_HEADER + 1, 3);
        let e = read_record(&mut b, "r").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        mem.set_file("old", b"{\"v\":1}".to_vec());
        assert_eq!(
            read_record(&mut b, "old").unwrap(),
            Some(Body::Json(b"{\"v\":1}".to_vec()))
        );
    }

    #[test]
    fn slots_alternate_in_place_and_the_newest_valid_wins() {
        let mem = MemBackend::new();
        let mut b = mem.clone();
        write_slot(&mut b, "s", 1, b"first, longer").unwrap();
        write_slot(&mut b, "s", 2, b"second").unwrap();
        write_slot(&mut b, "s", 3, b"3").unwrap(); // shorter than its slot held
        let r = read_slots(&mut b, "s");
        assert_eq!(r.best, Some((Body::Current(b"3".to_vec()), 3)));
        assert!(r.bad.is_empty());
        // A torn newest slot: the other one.
        mem.flip_bit("s.b", SLOT_HEADER, 0);
        let r = read_slots(&mut b, "s");
        assert_eq!(r.best, Some((Body::Current(b"second".to_vec()), 2)));
        assert_eq!(r.bad.len(), 1);
        // JSON slots of earlier releases are told apart.
        let mut old = SLOT_MAGIC_JSON.to_vec();
        old.extend_from_slice(&9u64.to_le_bytes());
        old.extend_from_slice(&2u32.to_le_bytes());
        old.extend_from_slice(&crc32c::crc32c(b"{}").to_le_bytes());
        old.extend_from_slice(b"{}");
        mem.set_file("s.b", old);
        assert_eq!(
            read_slots(&mut b, "s").best,
            Some((Body::Json(b"{}".to_vec()), 9))
        );
        assert!(!read_slots(&mut b, "none").found);
    }
}
