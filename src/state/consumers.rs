//! JetStream consumer state: one atomic record per durable consumer of a
//! file-storage stream, `<stream dir>/consumers/<name>.state`
//! ([`crate::state::write_record`], postcard [`SavedConsumer`]).
//!
//! Earlier releases wrote `<name>.json` (JSON, temp file + rename); such a
//! file is still read, and replaced by `<name>.state` at the consumer's
//! next save. When both exist (a crash between the two steps) the
//! `.state` record is the newer.
//!
//! Invariants: a save that returned Ok survives a crash, and so does a
//! removal; a record that does not check out (checksum, version, or a
//! state [`Consumer::restore`] refuses) is reported and skipped — the
//! consumer is not loaded, its file is left for the operator. Consumer
//! names are checked ([`crate::stream::names`]) before they become file names.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use super::{decode, encode, read_all, read_record, write_record, Body};
use crate::store::backend::{Backend, FsBackend};
use crate::stream::consumer::{Consumer, SavedConsumer};

/// Suffix of a consumer record.
pub const SUFFIX: &str = ".state";
/// Suffix of the JSON files of earlier releases.
pub const LEGACY_SUFFIX: &str = ".json";

/// The consumers persisted in `dir` (none if it does not exist); `stream`
/// and `now` (unix ns) as for [`load_on`].
pub fn load(dir: &Path, stream: &str, now: u64) -> Vec<Consumer> {
    if !dir.is_dir() {
        return Vec::new();
    }
    match FsBackend::open(dir) {
        Ok(mut b) => load_on(&mut b, stream, now),
        Err(e) => {
            log::error!("jetstream: cannot read consumers in {}: {e}", dir.display());
            Vec::new()
        }
    }
}

/// Save consumer `c` in `dir` (created if needed), durably.
pub fn save(dir: &Path, c: &Consumer) -> io::Result<()> {
    save_on(&mut FsBackend::open(dir)?, c)
}

/// Remove consumer `name` from `dir`, durably; fine if absent.
pub fn remove(dir: &Path, name: &str) -> io::Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    remove_on(&mut FsBackend::open(dir)?, name)
}

/// A consumer record's file name stem, if `name` may be one.
fn checked(name: &str) -> io::Result<&str> {
    crate::stream::names::validate(name)
        .map(|()| name)
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("consumer name {name:?}: {e}"),
            )
        })
}

/// The consumers on `b`, each logged; unusable records are reported and
/// skipped. Temporary files of an interrupted save are deleted.
pub fn load_on(b: &mut dyn Backend, stream: &str, now: u64) -> Vec<Consumer> {
    let names = match b.list() {
        Ok(n) => n,
        Err(e) => {
            log::error!("jetstream: cannot list the consumers of stream {stream}: {e}");
            return Vec::new();
        }
    };
    // By consumer name: the file to read (a record wins over old JSON).
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for f in names {
        if f.ends_with(".tmp") {
            let _ = b.remove(&f);
        } else if let Some(n) = f.strip_suffix(SUFFIX) {
            files.insert(n.to_string(), f);
        } else if let Some(n) = f.strip_suffix(LEGACY_SUFFIX) {
            files.entry(n.to_string()).or_insert(f);
        }
    }
    let mut out = Vec::new();
    for file in files.into_values() {
        match read_one(b, &file).and_then(|s| Consumer::restore(s, now)) {
            Ok(c) => {
                log::info!(
                    "jetstream: consumer {} of stream {stream}: delivered {}, {} pending",
                    c.name,
                    c.delivered_sseq,
                    c.pending.len()
                );
                out.push(c)
            }
            Err(e) => log::error!(
                "jetstream: consumer file {file} of stream {stream} is unusable ({e}); the consumer is skipped — move the file away and recreate the consumer"
            ),
        }
    }
    out
}

/// The saved state in file `file`.
fn read_one(b: &mut dyn Backend, file: &str) -> Result<SavedConsumer, String> {
    if file.ends_with(LEGACY_SUFFIX) {
        let bytes = read_all(b, file)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        return SavedConsumer::from_json(&bytes);
    }
    match read_record(b, file).map_err(|e| e.to_string())? {
        Some(Body::Current(body)) => decode(&body),
        Some(Body::Json(j)) => SavedConsumer::from_json(&j),
        None => Err("vanished".into()),
    }
}

/// [`save`] on a backend; deletes the JSON file of an earlier release.
pub fn save_on(b: &mut dyn Backend, c: &Consumer) -> io::Result<()> {
    let name = checked(&c.name)?;
    write_record(b, &format!("{name}{SUFFIX}"), &encode(&c.saved())?)?;
    let old = format!("{name}{LEGACY_SUFFIX}");
    if b.len(&old).is_ok() {
        b.remove(&old)?;
        b.sync_dir()?;
    }
    Ok(())
}

/// [`remove`] on a backend.
pub fn remove_on(b: &mut dyn Backend, name: &str) -> io::Result<()> {
    let name = checked(name)?;
    b.remove(&format!("{name}{SUFFIX}"))?;
    b.remove(&format!("{name}{LEGACY_SUFFIX}"))?;
    b.sync_dir()
}
