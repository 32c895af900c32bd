//! Streams created through the JetStream API, on disk: the stream's
//! config as one atomic record (`<stream dir>/api-stream.rec`, a
//! [`crate::state::write_record`] around nats-server's JSON stream config
//! as `server::jsapi::admin` renders it), and the removal of a deleted
//! stream's directory.
//!
//! Invariants:
//! - A stream directory is an API stream exactly when its record exists;
//!   [`save`] returns only once the record (and the directory entry) is
//!   synced, so an acknowledged create or update survives a crash.
//! - [`remove_dir`] first renames the directory to a tombstone name
//!   (`.deleted-<name>`: stream names hold no `.`, so no stream can be
//!   called that) and syncs the parent, then deletes the tombstone. A
//!   crash leaves the whole stream or nothing visible; tombstones left by
//!   a crash are deleted by [`list`].
//! - Directory names come from [`crate::stream::names::path_in`].

use std::io;
use std::path::{Path, PathBuf};

use super::{read_record, write_record, Body};
use crate::store::backend::{Backend, FsBackend};

/// The record's file name inside the stream directory.
pub const RECORD: &str = "api-stream.rec";
/// Prefix of a deleted stream's directory until it is gone.
const TOMBSTONE: &str = ".deleted-";

/// `streams_dir/<name>`, if `name` may name a directory.
fn stream_dir(streams_dir: &Path, name: &str) -> io::Result<PathBuf> {
    crate::stream::names::path_in(streams_dir, name, "")
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

/// Save the config `json` of API stream `name` (creating its directory).
pub fn save(streams_dir: &Path, name: &str, json: &[u8]) -> io::Result<()> {
    let dir = stream_dir(streams_dir, name)?;
    let new = !dir.is_dir();
    let mut b = FsBackend::open(&dir)?;
    write_record(&mut b, RECORD, json)?;
    if new {
        // The new directory's own entry.
        FsBackend::open(streams_dir)?.sync_dir()?;
    }
    Ok(())
}

/// The API streams in `streams_dir`: (directory name, config JSON).
/// Damaged records are logged and skipped (the directory is left for the
/// operator); leftover tombstones are deleted.
pub fn list(streams_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(streams_dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(TOMBSTONE) {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                log::warn!(
                    "jetstream: cannot finish deleting {}: {err}; remove it by hand",
                    e.path().display()
                );
            }
            continue;
        }
        if !e.path().join(RECORD).is_file() {
            continue;
        }
        let rec = FsBackend::open(&e.path()).and_then(|mut b| read_record(&mut b, RECORD));
        match rec {
            Ok(Some(Body::Current(j) | Body::Json(j))) => out.push((name, j)),
            Ok(None) => {}
            Err(err) => log::error!(
                "jetstream: stream {name}: its config {} is damaged ({err}); not opened — delete the directory or restore the file",
                e.path().join(RECORD).display()
            ),
        }
    }
    out.sort();
    out
}

/// Forget that stream `name` was created through the API (its directory
/// stays: frond.toml now defines it).
pub fn forget(streams_dir: &Path, name: &str) -> io::Result<()> {
    let dir = stream_dir(streams_dir, name)?;
    FsBackend::open(&dir)?.remove(RECORD)?;
    FsBackend::open(&dir)?.sync_dir()
}

/// Delete stream `name`'s directory (the stream must be closed):
/// renamed to a tombstone, synced, then removed.
pub fn remove_dir(streams_dir: &Path, name: &str) -> io::Result<()> {
    let dir = stream_dir(streams_dir, name)?;
    if !dir.exists() {
        return Ok(());
    }
    let tomb = streams_dir.join(format!("{TOMBSTONE}{name}"));
    if tomb.exists() {
        std::fs::remove_dir_all(&tomb)?;
    }
    std::fs::rename(&dir, &tomb)?;
    FsBackend::open(streams_dir)?.sync_dir()?;
    std::fs::remove_dir_all(&tomb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_list_remove() {
        let d = tempfile::tempdir().unwrap();
        save(d.path(), "A", b"{\"name\":\"A\"}").unwrap();
        save(d.path(), "B", b"{}").unwrap();
        std::fs::create_dir(d.path().join("CONF")).unwrap();
        assert_eq!(
            list(d.path()),
            vec![
                ("A".to_string(), b"{\"name\":\"A\"}".to_vec()),
                ("B".to_string(), b"{}".to_vec())
            ]
        );
        remove_dir(d.path(), "A").unwrap();
        assert!(!d.path().join("A").exists());
        forget(d.path(), "B").unwrap();
        assert!(list(d.path()).is_empty());
        assert!(d.path().join("B").is_dir());
        // A crash between rename and removal: the tombstone goes at list.
        std::fs::create_dir_all(d.path().join(".deleted-C/x")).unwrap();
        assert!(list(d.path()).is_empty());
        assert!(!d.path().join(".deleted-C").exists());
        assert!(save(d.path(), "../x", b"{}").is_err());
    }
}
