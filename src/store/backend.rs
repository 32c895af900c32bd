//! The storage backend: the only place where store bytes meet a disk.
//!
//! A backend is one flat directory of named files. [`FsBackend`] is the real
//! filesystem; [`MemBackend`] keeps files in memory, counts fsyncs, and can
//! simulate what a disk holds after a crash (unsynced data lost or torn),
//! bit flips and ENOSPC. Crash tests drive the store through it.
//!
//! Durability contract the store relies on: after `sync(name)` returns Ok,
//! the bytes appended to `name` so far, the file's existence, and earlier
//! removals survive a crash. `write_atomic` is durable when it returns.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A directory of append-only files.
pub trait Backend: Send + 'static {
    /// Names of the files present (unordered).
    fn list(&mut self) -> io::Result<Vec<String>>;
    /// Current length of `name`, unsynced appends included.
    fn len(&mut self, name: &str) -> io::Result<u64>;
    /// Create `name` empty (an existing file is truncated to 0).
    fn create(&mut self, name: &str) -> io::Result<()>;
    /// Append `data` at the end of `name`. On error, any prefix of `data`
    /// may have been written; the caller truncates back.
    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Overwrite bytes of `name` at `offset` (inside the file; used only by
    /// secure delete). Not durable until `sync`.
    fn write_at(&mut self, name: &str, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Fill `buf` from `name` at `offset` (an error if the file is shorter).
    fn read_at(&mut self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Make everything appended to `name` (and directory changes) durable.
    fn sync(&mut self, name: &str) -> io::Result<()>;
    /// Cut `name` to `len` bytes.
    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()>;
    /// Delete `name` (not an error if it is missing).
    fn remove(&mut self, name: &str) -> io::Result<()>;
    /// Replace `name` with `data` atomically and durably.
    fn write_atomic(&mut self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Replace `to` with the synced file `from`, atomically and durably
    /// (used by `state::retained` to swap in a compacted log).
    fn rename(&mut self, from: &str, to: &str) -> io::Result<()>;
    /// Make earlier creations and removals durable (`sync` does too, but
    /// needs a file to sync).
    fn sync_dir(&mut self) -> io::Result<()>;
    /// Close cached file handles (a backend kept idle between rare
    /// operations holds no descriptors).
    fn release(&mut self) {}
    /// Bytes used by all files.
    fn disk_usage(&mut self) -> io::Result<u64> {
        let mut total = 0;
        for n in self.list()? {
            total += self.len(&n)?;
        }
        Ok(total)
    }
}

/// Files in a real directory. Keeps a few file handles open.
pub struct FsBackend {
    dir: PathBuf,
    handles: HashMap<String, File>,
    /// A file was created, renamed or removed since the directory was last
    /// synced.
    dir_dirty: bool,
}

const MAX_OPEN_HANDLES: usize = 16;

impl FsBackend {
    /// Opens `dir`, creating it (and its parents) if needed.
    pub fn open(dir: &Path) -> io::Result<FsBackend> {
        std::fs::create_dir_all(dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create stream directory {}: {e}", dir.display()),
            )
        })?;
        Ok(FsBackend {
            dir: dir.to_path_buf(),
            handles: HashMap::new(),
            dir_dirty: true,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn handle(&mut self, name: &str) -> io::Result<&mut File> {
        if !self.handles.contains_key(name) {
            if self.handles.len() >= MAX_OPEN_HANDLES {
                self.handles.clear();
            }
            let f = OpenOptions::new()
                .read(true)
                .append(true)
                .open(self.path(name))?;
            self.handles.insert(name.to_string(), f);
        }
        self.handles
            .get_mut(name)
            .ok_or_else(|| io::Error::other("file handle vanished"))
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        if self.dir_dirty {
            File::open(&self.dir)?.sync_all()?;
            self.dir_dirty = false;
        }
        Ok(())
    }
}

impl Backend for FsBackend {
    fn list(&mut self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(n) = entry.file_name().to_str() {
                    out.push(n.to_string());
                }
            }
        }
        Ok(out)
    }

    fn len(&mut self, name: &str) -> io::Result<u64> {
        Ok(self.handle(name)?.metadata()?.len())
    }

    fn create(&mut self, name: &str) -> io::Result<()> {
        self.handles.remove(name);
        File::create(self.path(name))?;
        self.dir_dirty = true;
        Ok(())
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.handle(name)?.write_all(data)
    }

    fn write_at(&mut self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        // The cached handles append; overwriting needs its own.
        let f = OpenOptions::new().write(true).open(self.path(name))?;
        #[cfg(unix)]
        {
            std::os::unix::fs::FileExt::write_all_at(&f, data, offset)
        }
        #[cfg(not(unix))]
        {
            use std::io::{Seek, SeekFrom};
            let mut f = f;
            f.seek(SeekFrom::Start(offset))?;
            f.write_all(data)
        }
    }

    fn read_at(&mut self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let f = self.handle(name)?;
        #[cfg(unix)]
        {
            std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
        }
        #[cfg(not(unix))]
        {
            use std::io::{Read, Seek, SeekFrom};
            f.seek(SeekFrom::Start(offset))?;
            f.read_exact(buf)
        }
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        self.handle(name)?.sync_data()?;
        self.sync_dir()
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        self.handle(name)?.set_len(len)
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        self.handles.remove(name);
        match std::fs::remove_file(self.path(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.dir_dirty = true;
        Ok(())
    }

    fn write_atomic(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = self.path(&format!("{name}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_data()?;
        }
        self.handles.remove(name);
        std::fs::rename(&tmp, self.path(name))?;
        self.dir_dirty = true;
        self.sync_dir()
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        self.handles.remove(from);
        self.handles.remove(to);
        std::fs::rename(self.path(from), self.path(to))?;
        self.dir_dirty = true;
        FsBackend::sync_dir(self)
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        FsBackend::sync_dir(self)
    }

    fn release(&mut self) {
        self.handles.clear();
    }
}

/// One simulated file: `data[..synced]` is what survives a crash, with
/// zeros in `lost` (ranges a failed sync dropped, see
/// [`MemBackend::set_fail_sync_losing`]).
#[derive(Debug, Clone, Default)]
struct MemFile {
    data: Vec<u8>,
    synced: usize,
    lost: Vec<(usize, usize)>,
}

impl MemFile {
    /// What a crash leaves, keeping `keep` unsynced bytes.
    fn after_crash(&self, keep: usize) -> Vec<u8> {
        let len = self.data.len().min(self.synced.saturating_add(keep));
        let mut out = self.data.get(..len).unwrap_or(&self.data).to_vec();
        for &(a, b) in &self.lost {
            if let Some(r) = out.get_mut(a..b.min(len)) {
                r.fill(0);
            }
        }
        out
    }
}

#[derive(Debug, Default)]
struct MemDisk {
    files: BTreeMap<String, MemFile>,
    syncs: u64,
    /// Total bytes the disk may hold (ENOSPC beyond).
    space: Option<u64>,
    fail_sync: bool,
    /// A failed sync loses the unsynced bytes (see `set_fail_sync_losing`).
    fail_loses: bool,
}

/// In-memory files with crash simulation. Clones share the same disk, so a
/// test keeps one clone to inspect or damage what the store wrote.
#[derive(Debug, Clone, Default)]
pub struct MemBackend {
    disk: Arc<Mutex<MemDisk>>,
    /// Held by a test to make every `sync` wait.
    gate: Arc<Mutex<()>>,
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no file {name}"))
}

impl MemBackend {
    pub fn new() -> MemBackend {
        MemBackend::default()
    }

    fn disk(&self) -> MutexGuard<'_, MemDisk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// While the returned guard lives, every `sync` blocks (lets a test
    /// queue work behind a slow fsync deterministically).
    pub fn hold_syncs(&self) -> MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a disk would hold after a power cut now: a new, independent
    /// backend with only the synced bytes of every file.
    pub fn crash_image(&self) -> MemBackend {
        let img = MemBackend::new();
        for (name, f) in &self.disk().files {
            img.set_file(name, f.after_crash(0));
        }
        img
    }

    /// Number of successful `sync` calls so far.
    pub fn sync_count(&self) -> u64 {
        self.disk().syncs
    }

    /// Crash: every file loses what was written since its last sync.
    pub fn crash(&self) {
        self.crash_torn(0);
    }

    /// Crash with a torn write: every file keeps only the first `keep`
    /// bytes of its unsynced data.
    pub fn crash_torn(&self, keep: usize) {
        for f in self.disk().files.values_mut() {
            f.data = f.after_crash(keep);
            f.synced = f.data.len();
            f.lost.clear();
        }
    }

    /// Flip one bit of a file (no-op past its end).
    pub fn flip_bit(&self, name: &str, offset: usize, bit: u8) {
        if let Some(b) = self
            .disk()
            .files
            .get_mut(name)
            .and_then(|f| f.data.get_mut(offset))
        {
            *b ^= 1 << (bit % 8);
        }
    }

    /// Limit the total bytes stored; writes beyond fail with ENOSPC after
    /// writing what fits. `None` removes the limit.
    pub fn set_space_limit(&self, bytes: Option<u64>) {
        self.disk().space = bytes;
    }

    /// Make every `sync` fail (as an EIO from fsync).
    pub fn set_fail_sync(&self, fail: bool) {
        let mut d = self.disk();
        d.fail_sync = fail;
        d.fail_loses = false;
    }

    /// Make every `sync` fail as Linux's fsync may ("fsyncgate"): the
    /// unsynced bytes of the file are lost but marked clean, so reads still
    /// see them, a later sync succeeds without writing them, and a crash
    /// image holds zeros there.
    pub fn set_fail_sync_losing(&self, fail: bool) {
        let mut d = self.disk();
        d.fail_sync = fail;
        d.fail_loses = fail;
    }

    /// A copy of a file's current bytes.
    pub fn file(&self, name: &str) -> Option<Vec<u8>> {
        self.disk().files.get(name).map(|f| f.data.clone())
    }

    /// Replace a file's bytes (all considered synced).
    pub fn set_file(&self, name: &str, data: Vec<u8>) {
        let synced = data.len();
        self.disk().files.insert(
            name.to_string(),
            MemFile {
                data,
                synced,
                lost: Vec::new(),
            },
        );
    }

    /// File names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.disk().files.keys().cloned().collect()
    }
}

impl Backend for MemBackend {
    fn list(&mut self) -> io::Result<Vec<String>> {
        Ok(self.names())
    }

    fn len(&mut self, name: &str) -> io::Result<u64> {
        let d = self.disk();
        let f = d.files.get(name).ok_or_else(|| not_found(name))?;
        Ok(f.data.len() as u64)
    }

    fn create(&mut self, name: &str) -> io::Result<()> {
        self.disk()
            .files
            .insert(name.to_string(), MemFile::default());
        Ok(())
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let mut d = self.disk();
        let used: u64 = d.files.values().map(|f| f.data.len() as u64).sum();
        let room = d.space.map_or(usize::MAX, |s| {
            usize::try_from(s.saturating_sub(used)).unwrap_or(usize::MAX)
        });
        let f = d.files.get_mut(name).ok_or_else(|| not_found(name))?;
        if data.len() > room {
            f.data.extend_from_slice(&data[..room]);
            return Err(io::Error::other(
                "No space left on device (os error 28, injected ENOSPC)",
            ));
        }
        f.data.extend_from_slice(data);
        Ok(())
    }

    fn write_at(&mut self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.disk();
        let f = d.files.get_mut(name).ok_or_else(|| not_found(name))?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let dst = start
            .checked_add(data.len())
            .and_then(|end| f.data.get_mut(start..end))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "write past end of file")
            })?;
        // Simulated as durable at once (a crash keeps the new bytes).
        dst.copy_from_slice(data);
        Ok(())
    }

    fn read_at(&mut self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.disk();
        let f = d.files.get(name).ok_or_else(|| not_found(name))?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let src = start
            .checked_add(buf.len())
            .and_then(|end| f.data.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        drop(self.gate.lock().unwrap_or_else(|e| e.into_inner()));
        let mut d = self.disk();
        if d.fail_sync {
            if d.fail_loses {
                if let Some(f) = d.files.get_mut(name) {
                    f.lost.push((f.synced, f.data.len()));
                    f.synced = f.data.len();
                }
            }
            return Err(io::Error::other(
                "Input/output error (injected fsync failure)",
            ));
        }
        let f = d.files.get_mut(name).ok_or_else(|| not_found(name))?;
        f.synced = f.data.len();
        d.syncs += 1;
        Ok(())
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        let mut d = self.disk();
        let f = d.files.get_mut(name).ok_or_else(|| not_found(name))?;
        let len = usize::try_from(len).unwrap_or(usize::MAX).min(f.data.len());
        f.data.truncate(len);
        f.synced = f.synced.min(len);
        f.lost.retain(|&(a, _)| a < len);
        Ok(())
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        self.disk().files.remove(name);
        Ok(())
    }

    fn write_atomic(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.set_file(name, data.to_vec());
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        let mut d = self.disk();
        let f = d.files.remove(from).ok_or_else(|| not_found(from))?;
        d.files.insert(to.to_string(), f);
        Ok(())
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        // Creations and removals are durable at once here.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(b: &mut dyn Backend) {
        b.create("a").unwrap();
        b.append("a", b"hello ").unwrap();
        b.append("a", b"world").unwrap();
        assert_eq!(b.len("a").unwrap(), 11);
        let mut buf = [0u8; 5];
        b.read_at("a", 6, &mut buf).unwrap();
        assert_eq!(&buf, b"world");
        assert!(b.read_at("a", 8, &mut buf).is_err());
        b.sync("a").unwrap();
        b.truncate("a", 5).unwrap();
        b.append("a", b"!").unwrap();
        let mut all = [0u8; 6];
        b.read_at("a", 0, &mut all).unwrap();
        assert_eq!(&all, b"hello!");
        b.write_atomic("m", b"meta").unwrap();
        b.write_atomic("r", b"x").unwrap();
        b.rename("r", "m").unwrap();
        b.sync_dir().unwrap();
        let mut one = [0u8; 1];
        b.read_at("m", 0, &mut one).unwrap();
        assert_eq!(&one, b"x");
        b.write_atomic("m", b"meta").unwrap();
        let mut names = b.list().unwrap();
        names.sort();
        assert_eq!(names, ["a", "m"]);
        assert_eq!(b.disk_usage().unwrap(), 10);
        b.remove("a").unwrap();
        b.remove("a").unwrap();
        assert_eq!(b.list().unwrap(), ["m"]);
    }

    #[test]
    fn fs_backend_basics() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = FsBackend::open(&dir.path().join("s")).unwrap();
        exercise(&mut b);
    }

    #[test]
    fn mem_backend_basics_and_crashes() {
        let mut b = MemBackend::new();
        exercise(&mut b);
        b.create("x").unwrap();
        b.append("x", b"abc").unwrap();
        b.sync("x").unwrap();
        b.append("x", b"defg").unwrap();
        b.crash_torn(2);
        assert_eq!(b.file("x").unwrap(), b"abcde");
        b.append("x", b"zz").unwrap();
        b.crash();
        assert_eq!(b.file("x").unwrap(), b"abcde");
        let used = b.disk_usage().unwrap();
        b.set_space_limit(Some(used + 2));
        assert!(b.append("x", b"1234").is_err());
        assert_eq!(b.file("x").unwrap(), b"abcde12");
        b.flip_bit("x", 0, 0);
        assert_eq!(b.file("x").unwrap()[0], b'a' ^ 1);
        b.set_fail_sync(true);
        assert!(b.sync("x").is_err());
        // fsyncgate: the failed sync loses the unsynced "12!!"; a later one
        // does not save them.
        b.set_space_limit(None);
        b.set_fail_sync_losing(true);
        b.append("x", b"!!").unwrap();
        assert!(b.sync("x").is_err());
        b.set_fail_sync_losing(false);
        b.append("x", b"?").unwrap();
        b.sync("x").unwrap();
        assert_eq!(b.file("x").unwrap(), b"`bcde12!!?");
        assert_eq!(b.crash_image().file("x").unwrap(), b"`bcde\0\0\0\0?");
    }
}
