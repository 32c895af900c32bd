//! The persisted mirror cursor of a local stream: slot records
//! `<stream>.cursor.a` / `.b` in `<data_dir>/uplink/` (the path comes from
//! `uplink::cursor::path`).
//!
//! A cursor is `(L, H)`: every local message with sequence <= L is known
//! to be on the hub (or was skipped by policy), and every message of ours
//! with sequence > L that the hub holds has a hub sequence > H (so a
//! resync scans the hub from H + 1). With them the hub stream's `created`
//! (STREAM.INFO) when known: the stream H counts in, so a restart tells a
//! recreated hub stream from a lagging replica. Stored as a slot record
//! ([`crate::state::put_slot`], postcard body); records of earlier
//! releases end before `created` and read as "unknown", and earlier
//! releases read a new record (postcard leaves trailing bytes unread).
//! `created` is at most [`CREATED_MAX`] bytes: a longer one is a corrupt
//! record. Earlier releases also wrote one
//! JSON line, `{"v":1,"local_seq":L,"hub_seq":H}`, to `<stream>.cursor`
//! (temp file + rename); it is still read, and deleted by the first slot
//! written.
//!
//! A source cursor ([`SourceCursor`], `<stream>.<hub stream>.source.a`
//! / `.b`) records how far a source-down copied a hub stream: the hub
//! stream's identity (name, creation time) and the last hub sequence
//! stored locally, with the local stream's last sequence at that moment
//! (where a restart starts scanning the local tail for copies the record
//! does not know yet) and the hub time stamp of that message (the anchor
//! that proves the next read is of the same stream; absent in records of
//! earlier releases, which read fine).
//!
//! Invariants: a save overwrites the slot not holding the latest cursor,
//! so a torn save leaves the previous one. Saves are synced only when
//! asked (at shutdown): a stale cursor only makes the next resync scan
//! more; a missing file means "start from 0"; a corrupt one is reported
//! so the caller can warn and start from 0 with a full resync.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{decode, encode, put_slot, read_all, read_slots, Body};
use crate::store::backend::{Backend, FsBackend};

/// `(L, H)` and the hub stream's `created`; see the module doc.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub local_seq: u64,
    pub hub_seq: u64,
    /// The hub stream's `created` (STREAM.INFO, as the hub wrote it) that
    /// `hub_seq` counts in; `None`: unknown (a record of an earlier
    /// release, or no resync got that far).
    pub created: Option<String>,
}

/// Longest `created` a cursor record holds (nats-server writes an RFC 3339
/// time of about 30 bytes).
pub const CREATED_MAX: usize = 64;

/// A cursor record of earlier releases (no `created`).
#[derive(Deserialize)]
struct CursorV1 {
    local_seq: u64,
    hub_seq: u64,
}

/// The JSON of earlier releases.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDiskJson {
    v: u32,
    local_seq: u64,
    hub_seq: u64,
}

impl Cursor {
    /// The record body.
    pub fn encode(&self) -> Vec<u8> {
        encode(self).unwrap_or_default()
    }

    /// A record body (of this release or an earlier one), or the JSON of
    /// earlier releases.
    pub fn decode(bytes: &[u8]) -> Result<Cursor, String> {
        if bytes.first() == Some(&super::VERSION) {
            // A v1 body is exactly `(L, H)`: anything after them that is
            // not a `created` makes the record corrupt, not "unknown".
            let v1 = || match postcard::take_from_bytes::<CursorV1>(&bytes[1..]) {
                Ok((v1, [])) => Some(Cursor {
                    local_seq: v1.local_seq,
                    hub_seq: v1.hub_seq,
                    created: None,
                }),
                _ => None,
            };
            let c = decode(bytes).or_else(|e| v1().ok_or(e))?;
            return match c.created.as_deref().map(str::len) {
                Some(n) if n > CREATED_MAX => Err(format!(
                    "not a cursor: a hub stream creation time of {n} bytes"
                )),
                _ => Ok(c),
            };
        }
        let d: OnDiskJson =
            serde_json::from_slice(bytes).map_err(|e| format!("not a cursor: {e}"))?;
        if d.v != 1 {
            return Err(format!("unsupported cursor version {}", d.v));
        }
        Ok(Cursor {
            local_seq: d.local_seq,
            hub_seq: d.hub_seq,
            created: None,
        })
    }
}

/// The directory and the file stem of a cursor path.
fn split(path: &Path) -> Result<(&Path, &str), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let stem = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{}: not a cursor file name", path.display()))?;
    Ok((dir, stem))
}

/// Load the cursor at `path`. `Ok(None)`: none. `Err`: unreadable or
/// corrupt.
pub fn load(path: &Path) -> Result<Option<Cursor>, String> {
    let (dir, stem) = split(path)?;
    let mut b = FsBackend::open(dir).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    load_on(&mut b, stem).map_err(|e| format!("{}: {e}", path.display()))
}

/// The latest valid cursor `stem` on `b`, with its sequence.
fn latest(b: &mut dyn Backend, stem: &str) -> Result<Option<(Cursor, u64)>, String> {
    let slots = read_slots(b, stem);
    match slots.best {
        Some((Body::Current(body), seq)) => return Ok(Some((Cursor::decode(&body)?, seq))),
        Some((Body::Json(body), seq)) => return Ok(Some((Cursor::decode(&body)?, seq))),
        None => {}
    }
    if let Some((name, why)) = slots.bad.first() {
        return Err(format!("{name}: {why}"));
    }
    match read_all(b, stem) {
        Ok(Some(old)) => Cursor::decode(&old).map(|c| Some((c, 0))),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("cannot read: {e}")),
    }
}

/// [`load`] on a backend.
pub fn load_on(b: &mut dyn Backend, stem: &str) -> Result<Option<Cursor>, String> {
    latest(b, stem).map(|c| c.map(|(c, _)| c))
}

/// Save cursor `c` at `path`; `sync` makes it durable.
pub fn store(path: &Path, c: Cursor, sync: bool) -> std::io::Result<()> {
    let (dir, stem) = split(path).map_err(std::io::Error::other)?;
    let mut b = FsBackend::open(dir)?;
    store_on(&mut b, stem, c, sync)
}

/// [`store`] on a backend.
pub fn store_on(b: &mut dyn Backend, stem: &str, c: Cursor, sync: bool) -> std::io::Result<()> {
    let seq = latest(b, stem).ok().flatten().map_or(0, |(_, q)| q);
    if put_slot(b, stem, seq + 1, &c.encode(), sync)? {
        // The first slot replaces the file of earlier releases.
        b.remove(stem)?;
        if sync {
            b.sync_dir()?;
        }
    }
    Ok(())
}

/// How far a source-down got; see the module doc.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCursor {
    pub hub_stream: String,
    /// The hub stream's `created` (STREAM.INFO), as the hub wrote it.
    pub created: String,
    /// Every hub message <= this (matching the filter) is stored locally.
    pub hub_seq: u64,
    /// The local stream's last sequence when `hub_seq` was stored.
    pub local_seq: u64,
    /// The hub's `Nats-Time-Stamp` of message `hub_seq`, when known: the
    /// anchor a batched read checks the hub stream's identity with.
    /// Records of earlier releases end before it (read as `None`); earlier
    /// releases ignore it (postcard leaves trailing bytes unread).
    pub anchor: Option<String>,
}

/// A source cursor of earlier releases (no anchor).
#[derive(Deserialize)]
struct SourceCursorV1 {
    hub_stream: String,
    created: String,
    hub_seq: u64,
    local_seq: u64,
}

/// A source cursor body, of this release or an earlier one.
fn decode_source(body: &[u8]) -> Result<SourceCursor, String> {
    decode(body).or_else(|e| match decode::<SourceCursorV1>(body) {
        Ok(v1) => Ok(SourceCursor {
            hub_stream: v1.hub_stream,
            created: v1.created,
            hub_seq: v1.hub_seq,
            local_seq: v1.local_seq,
            anchor: None,
        }),
        Err(_) => Err(e),
    })
}

/// Load the source cursor at `path`. `Ok(None)`: none. `Err`: corrupt.
pub fn load_source(path: &Path) -> Result<Option<SourceCursor>, String> {
    let (dir, stem) = split(path)?;
    let mut b = FsBackend::open(dir).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    load_source_on(&mut b, stem).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`load_source`] on a backend, with the slot sequence.
fn latest_source(b: &mut dyn Backend, stem: &str) -> Result<Option<(SourceCursor, u64)>, String> {
    let slots = read_slots(b, stem);
    match slots.best {
        Some((Body::Current(body), seq)) => Ok(Some((decode_source(&body)?, seq))),
        Some((Body::Json(_), _)) => Err("not a source cursor".into()),
        None => match slots.bad.first() {
            Some((name, why)) => Err(format!("{name}: {why}")),
            None => Ok(None),
        },
    }
}

/// [`load_source`] on a backend.
pub fn load_source_on(b: &mut dyn Backend, stem: &str) -> Result<Option<SourceCursor>, String> {
    latest_source(b, stem).map(|c| c.map(|(c, _)| c))
}

/// Save source cursor `c` at `path`; `sync` makes it durable.
pub fn store_source(path: &Path, c: &SourceCursor, sync: bool) -> std::io::Result<()> {
    let (dir, stem) = split(path).map_err(std::io::Error::other)?;
    let mut b = FsBackend::open(dir)?;
    store_source_on(&mut b, stem, c, sync)
}

/// [`store_source`] on a backend.
pub fn store_source_on(
    b: &mut dyn Backend,
    stem: &str,
    c: &SourceCursor,
    sync: bool,
) -> std::io::Result<()> {
    let seq = latest_source(b, stem).ok().flatten().map_or(0, |(_, q)| q);
    put_slot(b, stem, seq + 1, &encode(c)?, sync).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::super::VERSION;
    use super::*;
    use crate::store::backend::MemBackend;

    fn cur(local_seq: u64, hub_seq: u64, created: Option<&str>) -> Cursor {
        Cursor {
            local_seq,
            hub_seq,
            created: created.map(str::to_string),
        }
    }

    #[test]
    fn encode_decode_and_the_json_of_earlier_releases() {
        let c = cur(42, 9_000_000_000, None);
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        assert!(c.encode().len() < 12);
        let old = b"{\"v\":1,\"local_seq\":42,\"hub_seq\":9000000000}\n";
        assert_eq!(Cursor::decode(old).unwrap(), c);
        let c = cur(42, 7, Some("2026-12-07T03:00:00.123456789Z"));
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        assert!(c.encode().len() < 40, "{}", c.encode().len());
    }

    /// A slot record of earlier releases is `(L, H)` alone: it reads with
    /// `created` unknown; an earlier release reads a new record's `(L, H)`.
    #[test]
    fn a_cursor_record_of_earlier_releases_reads_without_created() {
        #[derive(Serialize)]
        struct V1(u64, u64);
        let old = encode(&V1(42, 9_000_000_000)).unwrap();
        assert_eq!(Cursor::decode(&old).unwrap(), cur(42, 9_000_000_000, None));
        let new = cur(42, 7, Some("2026-12-07T03:00:00Z")).encode();
        let v1: CursorV1 = decode(&new).unwrap();
        assert_eq!((v1.local_seq, v1.hub_seq), (42, 7));
        // Through the slot files: a v1 slot, then a new one over it.
        let mem = MemBackend::new();
        let mut b = mem.clone();
        put_slot(&mut b, "T.cursor", 1, &old, true).unwrap();
        assert_eq!(
            load_on(&mut b, "T.cursor").unwrap(),
            Some(cur(42, 9_000_000_000, None))
        );
        let c = cur(43, 9_000_000_001, Some("2026-12-07T03:00:00Z"));
        store_on(&mut b, "T.cursor", c.clone(), true).unwrap();
        assert_eq!(load_on(&mut b, "T.cursor").unwrap(), Some(c));
    }

    #[test]
    fn a_created_time_over_the_bound_is_corrupt() {
        let at_bound = cur(1, 2, Some(&"x".repeat(CREATED_MAX)));
        assert_eq!(Cursor::decode(&at_bound.encode()).unwrap(), at_bound);
        let over = cur(1, 2, Some(&"x".repeat(CREATED_MAX + 1))).encode();
        assert!(Cursor::decode(&over).unwrap_err().contains("65 bytes"));
        // A length prefix beyond the record is an error, not an allocation.
        let huge = [VERSION, 1, 2, 1, 0xff, 0xff, 0xff, 0xff, 0x0f, b'x'];
        assert!(Cursor::decode(&huge).is_err());
        assert!(
            Cursor::decode(&[VERSION, 1, 2, 2]).is_err(),
            "not an Option"
        );
    }

    #[test]
    fn corrupt_is_an_error() {
        for bad in [
            &b""[..],
            b"{",
            b"{\"v\":2,\"local_seq\":1,\"hub_seq\":1}",
            b"\x00\x01",
            b"\x01",
            b"{\"v\":1,\"local_seq\":-1,\"hub_seq\":1}",
        ] {
            assert!(Cursor::decode(bad).is_err());
        }
    }

    #[test]
    fn store_load_and_upgrade() {
        let mem = MemBackend::new();
        let mut b = mem.clone();
        assert_eq!(load_on(&mut b, "T.cursor").unwrap(), None);
        mem.set_file(
            "T.cursor",
            b"{\"v\":1,\"local_seq\":5,\"hub_seq\":7}\n".to_vec(),
        );
        assert_eq!(load_on(&mut b, "T.cursor").unwrap(), Some(cur(5, 7, None)));
        let c = cur(6, 8, Some("2026-12-07T03:00:00Z"));
        store_on(&mut b, "T.cursor", c.clone(), true).unwrap();
        assert_eq!(mem.file("T.cursor"), None, "the old file goes");
        assert_eq!(load_on(&mut b, "T.cursor").unwrap(), Some(c));
        mem.set_file("T.cursor.b", b"garbage".to_vec());
        assert!(load_on(&mut b, "T.cursor").is_err());
    }

    #[test]
    fn store_and_load_on_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("uplink").join("TELEMETRY.cursor");
        assert_eq!(load(&p).unwrap(), None);
        for i in 0..3 {
            let c = cur(i, i + 1, (i > 0).then_some("2026-12-07T03:00:00Z"));
            store(&p, c.clone(), i == 2).unwrap();
            assert_eq!(load(&p).unwrap(), Some(c));
        }
    }

    #[test]
    fn source_cursor_store_load_and_torn_slot() {
        let mem = MemBackend::new();
        let mut b = mem.clone();
        assert_eq!(load_source_on(&mut b, "CMD.COMMANDS.source").unwrap(), None);
        let stem = "CMD.COMMANDS.source";
        let c = |n: u64| SourceCursor {
            hub_stream: "COMMANDS".into(),
            created: "2026-12-07T03:00:00.123Z".into(),
            hub_seq: 40 + n,
            local_seq: n,
            anchor: (n > 1).then(|| format!("2026-12-07T03:00:0{n}.5Z")),
        };
        for n in 1..=3 {
            store_source_on(&mut b, stem, &c(n), true).unwrap();
            assert_eq!(load_source_on(&mut b, stem).unwrap(), Some(c(n)));
        }
        // A torn latest slot (sequence 3 is in `.b`) leaves the one before.
        let mut f = mem.file("CMD.COMMANDS.source.b").unwrap();
        f.truncate(f.len() / 2);
        mem.set_file("CMD.COMMANDS.source.b", f);
        assert_eq!(load_source_on(&mut b, stem).unwrap(), Some(c(2)));
    }

    #[test]
    fn a_source_cursor_of_earlier_releases_reads_without_anchor() {
        #[derive(Serialize)]
        struct V1<'a>(&'a str, &'a str, u64, u64);
        let old = encode(&V1("COMMANDS", "2026-12-07T03:00:00Z", 41, 7)).unwrap();
        let want = SourceCursor {
            hub_stream: "COMMANDS".into(),
            created: "2026-12-07T03:00:00Z".into(),
            hub_seq: 41,
            local_seq: 7,
            anchor: None,
        };
        assert_eq!(decode_source(&old).unwrap(), want);
        // An earlier release reads a new record (the anchor trails).
        let new = SourceCursor {
            anchor: Some("2026-12-07T03:00:01Z".into()),
            ..want.clone()
        };
        let v1: SourceCursorV1 = decode(&encode(&new).unwrap()).unwrap();
        assert_eq!((v1.hub_seq, v1.local_seq), (41, 7));
        assert_eq!(decode_source(&encode(&new).unwrap()).unwrap(), new);
        assert!(decode_source(&[1, 200]).is_err());
    }
}
