//! The persisted mirror cursor: `<data_dir>/uplink/<stream>.cursor`.
//!
//! Format (one line of JSON, version 1):
//! `{"v":1,"local_seq":L,"hub_seq":H}` where every local message with
//! sequence <= L is known to be on the hub (or was skipped by policy), and
//! every message of ours with sequence > L that the hub holds has a hub
//! sequence > H (so a resync scans the hub from H + 1).
//!
//! Invariants: a cursor is written to a temporary file and renamed over the
//! old one, so a reader sees either the old or the new cursor. A stale
//! cursor only makes the next resync scan more; a missing file means "start
//! from 0"; a corrupt file is reported so the caller can warn and start
//! from 0 with a full resync.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `(L, H)`; see the module doc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub local_seq: u64,
    pub hub_seq: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    v: u32,
    local_seq: u64,
    hub_seq: u64,
}

impl Cursor {
    pub fn encode(&self) -> Vec<u8> {
        let d = OnDisk {
            v: 1,
            local_seq: self.local_seq,
            hub_seq: self.hub_seq,
        };
        let mut out = serde_json::to_vec(&d).unwrap_or_default();
        out.push(b'\n');
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Cursor, String> {
        let d: OnDisk = serde_json::from_slice(bytes).map_err(|e| format!("not a cursor: {e}"))?;
        if d.v != 1 {
            return Err(format!("unsupported cursor version {}", d.v));
        }
        Ok(Cursor {
            local_seq: d.local_seq,
            hub_seq: d.hub_seq,
        })
    }
}

/// The cursor file for a local stream (an error for a name that cannot
/// be a file name, see [`crate::names`]; configured names always can).
pub fn path(data_dir: &Path, stream: &str) -> Result<PathBuf, crate::names::NameError> {
    crate::names::path_in(&data_dir.join("uplink"), stream, ".cursor")
}

/// Load a cursor. `Ok(None)`: no file. `Err`: unreadable or corrupt.
pub fn load(path: &Path) -> Result<Option<Cursor>, String> {
    match std::fs::read(path) {
        Ok(b) => Cursor::decode(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Atomically replace the cursor file (temp file + rename; `sync` also
/// fsyncs the file and the directory).
pub fn store(path: &Path, c: Cursor, sync: bool) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("cursor.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&c.encode())?;
        if sync {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, path)?;
    if sync {
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode() {
        let c = Cursor {
            local_seq: 42,
            hub_seq: 9_000_000_000,
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        assert_eq!(
            c.encode(),
            b"{\"v\":1,\"local_seq\":42,\"hub_seq\":9000000000}\n"
        );
    }

    #[test]
    fn corrupt_is_an_error() {
        for bad in [
            &b""[..],
            b"{",
            b"{\"v\":2,\"local_seq\":1,\"hub_seq\":1}",
            b"\x00\x01",
            b"{\"v\":1,\"local_seq\":-1,\"hub_seq\":1}",
        ] {
            assert!(Cursor::decode(bad).is_err());
        }
    }

    #[test]
    fn store_and_load() {
        let dir = tempfile::tempdir().unwrap();
        assert!(path(dir.path(), "../x").is_err());
        let p = path(dir.path(), "TELEMETRY").unwrap();
        assert_eq!(load(&p).unwrap(), None);
        let c = Cursor {
            local_seq: 5,
            hub_seq: 7,
        };
        store(&p, c, false).unwrap();
        assert_eq!(load(&p).unwrap(), Some(c));
        store(
            &p,
            Cursor {
                local_seq: 6,
                hub_seq: 8,
            },
            true,
        )
        .unwrap();
        assert_eq!(load(&p).unwrap().unwrap().local_seq, 6);
        std::fs::write(&p, b"garbage").unwrap();
        assert!(load(&p).is_err());
    }
}
