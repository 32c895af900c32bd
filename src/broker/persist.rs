//! Persistent MQTT session state: two small slot files per session.
//!
//! Owns `<data_dir>/mqtt/sessions/`: per persistent session, two slot
//! files named after the SHA-256 of its client id ([`file_stem`], 64 hex
//! digits), `<sha>.a` and `<sha>.b`, so any client id MQTT allows (up to
//! 65,535 bytes of UTF-8, `/` and `..` included) has a file name of the
//! same short length; the full client id is inside the file and a file
//! holding another id is not this session. Files of earlier versions,
//! named after the hex of the client id ([`legacy_stem`], only possible
//! for ids up to 126 bytes), are still read: `<hex>.a`/`<hex>.b`, and
//! `<hex>` without suffix (written by atomic replace, the oldest state).
//! A session found under its old name is written under the new one from
//! its next save on, and the old files are then deleted. Each slot holds
//! `FSS1`, a sequence number (u64 LE), the length (u32 LE) and crc32c
//! (u32 LE) of the JSON that follows, then that JSON; bytes after it are
//! stale. Saves alternate between the slots (sequence + 1 each time) and
//! overwrite in place with one `fdatasync` — about a sixth of the cost of
//! temp file, fsync, rename and directory fsync, which matters because
//! QoS 2 saves before acknowledgements. Loading takes the valid slot with
//! the highest sequence, so a torn save leaves the previous state. The
//! JSON ([`StoredSession`]) holds:
//! client id, the owner (the user that created the session: `"anonymous"`
//! or `{"user": name}`; absent when frond runs without `[auth]` and in
//! files of earlier versions), protocol version, subscriptions (NATS
//! filters, as the router holds them, with their granted QoS), the expiry
//! interval, the time of
//! the last disconnect (0 while connected), per-stream cursors and the
//! inbound QoS 2 packet ids that were PUBREC'd and await PUBREL.
//!
//! A cursor also holds the outbound QoS 2 state of its stream's messages
//! (fields absent when empty, so files of sessions without QoS 2 look as
//! before): each QoS 2 message in flight as `[sequence, packet id,
//! PUBREC received]`, and the sequences above `acked` whose QoS 2 exchange
//! completed (`done`), which are never sent again. The session machine
//! ([`crate::broker::session`]) asks for this file to be written before a
//! QoS 2 PUBLISH, a PUBREL, a PUBREC or a PUBCOMP whose state it records
//! leaves, so what the client was told is always on disk.
//!
//! Invariants:
//! - A save never touches the slot holding the latest state: after a crash
//!   the session is either the old or the new state, never a mix (a slot
//!   file is created, and the directory fsynced, only once). A slot that
//!   does not check out is ignored; a session with none that does is
//!   reported and starts fresh, never fatal.
//! - Saves of one client id are sequential (one connection holds it).
//! - At most one connection holds a session at a time
//!   ([`SessionStore::checkout`] / [`SessionStore::checkin`]): a reconnecting
//!   or taking-over client waits until the previous connection has written
//!   its final state, so nothing it acknowledged is lost or redone.
//! - A session belongs to its owner ([`Owner`], [`claim`]): another user
//!   never resumes it, deletes it or takes over a live connection of its
//!   client id ([`SessionStore::hold`]); see the module doc of
//!   [`crate::broker::session`] for the rule.
//! - Methods that touch files block: call them through `smol::unblock`.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A stream cursor of one session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The stream's name.
    pub stream: String,
    /// Every message matching the session's subscriptions with a sequence
    /// `<= acked` has been delivered and (QoS 1) acknowledged.
    pub acked: u64,
    /// The highest sequence known to have been sent (a lower bound; used
    /// to set DUP on redelivery).
    pub sent: u64,
    /// QoS 2 messages of this stream in flight: (sequence, packet id,
    /// PUBREC received, i.e. PUBREL owed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qos2: Vec<(u64, u16, bool)>,
    /// Sequences above `acked` delivered at QoS 2 and completed (PUBCOMP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<u64>,
}

/// One subscription (a NATS filter; MQTT `a/#` is stored as `a` and `a.>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSub {
    pub filter: String,
    pub qos: u8,
    /// The share name of a shared subscription (`$share/{name}/...`);
    /// absent in files written before shared subscriptions existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<String>,
}

/// Who a session belongs to: the authenticated user that created it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    /// A client without credentials (`[auth] anonymous = true`).
    Anonymous,
    /// An `[[auth.users]]` user, by name.
    User(String),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Anonymous => f.write_str("anonymous"),
            Owner::User(u) => write!(f, "user {u:?}"),
        }
    }
}

/// What a connecting client may do with the stored session of its client
/// id ([`claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Its own (or nobody's): resume it, or delete it for a clean start.
    Resume,
    /// Another user's: refuse the connection (CONNACK not authorized);
    /// the session stays as it is.
    Refuse,
    /// Another user's, who can no longer log in (removed from `[auth]`,
    /// or anonymous clients are no longer allowed): delete it, the
    /// connection starts fresh.
    Discard,
}

/// Whether a client logged in as `me` may take a stored session owned by
/// `stored`. `me` is `None` when frond runs without `[auth]` (nobody is
/// authenticated, everything is allowed: no ownership). A session without
/// owner (written without `[auth]`, or by a version before owners were
/// kept) goes to the first client that takes it, which becomes its owner;
/// its subscriptions are re-checked against that client's permissions at
/// restore, like every restored subscription.
pub fn claim(
    stored: Option<&Owner>,
    me: Option<&Owner>,
    auth: Option<&crate::auth::Auth>,
) -> Claim {
    let (Some(stored), Some(me), Some(auth)) = (stored, me, auth) else {
        return Claim::Resume;
    };
    if stored == me {
        return Claim::Resume;
    }
    let can_log_in = match stored {
        Owner::Anonymous => auth.anonymous,
        Owner::User(u) => auth.users.iter().any(|x| x.name == *u),
    };
    if can_log_in {
        Claim::Refuse
    } else {
        Claim::Discard
    }
}

/// Everything a persistent session keeps between connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    pub client_id: String,
    /// The user that created it (`None`: frond runs without `[auth]`, or
    /// a file of an earlier version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// 4 (3.1.1) or 5 (5.0).
    pub version: u8,
    pub subs: Vec<StoredSub>,
    /// Seconds the session outlives a disconnect.
    pub expiry_secs: u64,
    /// Unix seconds of the last disconnect; 0 while connected.
    pub disconnected_at: u64,
    pub cursors: Vec<Cursor>,
    /// Inbound QoS 2 packet ids stored and PUBREC'd, awaiting PUBREL.
    pub qos2_in: Vec<u16>,
    /// MQTT 5 subscription identifiers: (NATS filter, identifier).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sub_ids: Vec<(String, u32)>,
}

impl StoredSession {
    /// Whether the session expired by `now` (unix seconds).
    pub fn expired(&self, now: u64) -> bool {
        self.disconnected_at != 0 && now >= self.disconnected_at.saturating_add(self.expiry_secs)
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub struct SessionStore {
    dir: PathBuf,
    /// Client ids held by a live connection.
    busy: Mutex<HashSet<String>>,
    released: event_listener::Event,
    /// The sequence of the latest slot written or read, by client id.
    seqs: Mutex<HashMap<String, u64>>,
    /// Client ids whose state was found under the old file name: those
    /// files are deleted after the next save under the new name.
    legacy: Mutex<HashSet<String>>,
    /// The connection holding each client id, and its owner (`None`
    /// without `[auth]`), for [`SessionStore::hold`].
    holders: Mutex<HashMap<String, (u64, Option<Owner>)>>,
}

const SLOT_MAGIC: &[u8; 4] = b"FSS1";
const SLOT_HEADER: usize = 20;

pub(crate) fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The file name stem of the session or will of `client_id`: the hex of
/// its SHA-256 (64 bytes, whatever the id's length or characters).
pub(crate) fn file_stem(client_id: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, client_id.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `client_id` for a log line: quoted, and cut after 64 characters (a
/// client id may be 65,535 bytes; the log is on flash).
pub(crate) fn log_id(client_id: &str) -> String {
    match client_id.char_indices().nth(64) {
        None => format!("{client_id:?}"),
        Some((at, _)) => format!(
            "{:?}… ({} bytes)",
            client_id.get(..at).unwrap_or_default(),
            client_id.len()
        ),
    }
}

/// The stem earlier versions used (the hex of the client id), when such a
/// file could exist: `<hex>.tmp` had to fit in 255 bytes.
pub(crate) fn legacy_stem(client_id: &str) -> Option<String> {
    (client_id.len() <= 125).then(|| hex(client_id))
}

impl SessionStore {
    /// Open (create) the directory and delete expired sessions; returns the
    /// store and how many sessions were kept and expired.
    pub fn open(dir: &Path) -> io::Result<(SessionStore, usize, usize)> {
        fs::create_dir_all(dir)?;
        let now = unix_now();
        let (mut kept, mut expired) = (0, 0);
        let mut stems = std::collections::BTreeSet::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let stem = name
                .strip_suffix(".a")
                .or_else(|| name.strip_suffix(".b"))
                .unwrap_or(name);
            stems.insert(stem.to_string());
        }
        for stem in stems {
            match read_best(dir, &stem) {
                Some((mut s, seq)) if s.disconnected_at == 0 => {
                    // Connected when frond stopped: it disconnected now.
                    s.disconnected_at = now.max(1);
                    kept += 1;
                    write_slot(dir, &stem, seq + 1, &s)?;
                }
                Some((s, _)) if !s.expired(now) => kept += 1,
                Some(_) => {
                    expired += 1;
                    remove_files(dir, &stem)?;
                }
                None => {}
            }
        }
        let store = SessionStore {
            dir: dir.to_path_buf(),
            busy: Mutex::new(HashSet::new()),
            released: event_listener::Event::new(),
            seqs: Mutex::new(HashMap::new()),
            legacy: Mutex::new(HashSet::new()),
            holders: Mutex::new(HashMap::new()),
        };
        Ok((store, kept, expired))
    }

    fn seqs(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.seqs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn legacy(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.legacy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored session of `client_id`, if any and not expired (an
    /// expired one is deleted). Looked up under its file name, then under
    /// the name of earlier versions.
    pub fn load(&self, client_id: &str) -> Option<StoredSession> {
        let legacy = legacy_stem(client_id);
        let mut stem = file_stem(client_id);
        let mut found = read_best(&self.dir, &stem);
        if let Some(old) = &legacy {
            match found {
                // Saved under the new name, then crashed before the old
                // files were deleted: the new name holds the newer state.
                Some(_) if has_files(&self.dir, old) => {
                    self.legacy().insert(client_id.to_string());
                }
                Some(_) => {}
                None => {
                    found = read_best(&self.dir, old);
                    if found.is_some() {
                        stem = old.clone();
                        self.legacy().insert(client_id.to_string());
                    }
                }
            }
        }
        let (s, seq) = found?;
        self.seqs().insert(client_id.to_string(), seq);
        if s.client_id != client_id {
            log::warn!(
                "mqtt: session file {} names another client; ignored",
                self.dir.join(&stem).display()
            );
            return None;
        }
        if s.expired(unix_now()) {
            log::info!(
                "mqtt: session of {} expired; starting fresh",
                log_id(client_id)
            );
            let _ = self.remove(client_id);
            return None;
        }
        Some(s)
    }

    /// Write `s` durably (the slot not holding the latest state).
    pub fn save(&self, s: &StoredSession) -> io::Result<()> {
        let stem = file_stem(&s.client_id);
        let known = self.seqs().get(&s.client_id).copied();
        let last = match known {
            Some(q) => q,
            None => read_best(&self.dir, &stem).map_or(0, |(_, q)| q),
        };
        write_slot(&self.dir, &stem, last + 1, s)?;
        self.seqs().insert(s.client_id.clone(), last + 1);
        if self.legacy().remove(&s.client_id) {
            if let Some(old) = legacy_stem(&s.client_id) {
                if let Err(e) = remove_files(&self.dir, &old) {
                    log::warn!(
                        "mqtt: cannot delete the session files {}.a/.b of an earlier version: {e}",
                        self.dir.join(&old).display()
                    );
                }
            }
        }
        Ok(())
    }

    /// Delete the stored session of `client_id` (durably); fine if none.
    pub fn remove(&self, client_id: &str) -> io::Result<()> {
        self.seqs().remove(client_id);
        self.legacy().remove(client_id);
        if let Some(old) = legacy_stem(client_id) {
            remove_files(&self.dir, &old)?;
        }
        remove_files(&self.dir, &file_stem(client_id))
    }

    /// Record that connection `conn`, logged in as `owner`, holds
    /// `client_id` (before the shell kicks an older connection of it).
    /// Refused, with the holder's owner, when another user's connection
    /// holds it: a live connection is never taken over across users.
    /// `owner` `None` (no `[auth]`) never conflicts.
    pub fn hold(&self, client_id: &str, conn: u64, owner: Option<&Owner>) -> Result<(), Owner> {
        let mut h = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, Some(held))) = h.get(client_id) {
            if owner.is_some_and(|o| o != held) {
                return Err(held.clone());
            }
        }
        h.insert(client_id.to_string(), (conn, owner.cloned()));
        Ok(())
    }

    /// Connection `conn` ended: forget it as the holder of `client_id`
    /// (unless a newer connection holds it).
    pub fn unhold(&self, client_id: &str, conn: u64) {
        let mut h = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        if h.get(client_id).is_some_and(|(c, _)| *c == conn) {
            h.remove(client_id);
        }
    }

    /// Take `client_id` for one connection, waiting (up to `timeout`) for
    /// the previous holder's [`SessionStore::checkin`]. False on timeout.
    pub async fn checkout(&self, client_id: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let listener = self.released.listen();
            {
                let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
                if busy.insert(client_id.to_string()) {
                    return true;
                }
            }
            let timed_out = smol::future::or(
                async {
                    listener.await;
                    false
                },
                async {
                    smol::Timer::at(deadline).await;
                    true
                },
            )
            .await;
            if timed_out {
                return false;
            }
        }
    }

    /// Release `client_id` (after its final state was written).
    pub fn checkin(&self, client_id: &str) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.remove(client_id);
        drop(busy);
        self.released.notify(usize::MAX);
    }
}

/// Replace `path` with `s` as JSON: temp file, fsync, rename, directory
/// fsync (after a crash the file is the old or the new value, never a mix).
pub(crate) fn write<T: Serialize>(dir: &Path, path: &Path, s: &T) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let data = serde_json::to_vec(s).map_err(io::Error::other)?;
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// The slot file of sequence `seq`.
fn slot_path(dir: &Path, stem: &str, seq: u64) -> PathBuf {
    dir.join(format!(
        "{stem}.{}",
        if seq.is_multiple_of(2) { "a" } else { "b" }
    ))
}

/// Write `s` as sequence `seq` into its slot, in place, then fdatasync
/// (a new slot file also gets its directory entry synced).
fn write_slot(dir: &Path, stem: &str, seq: u64, s: &StoredSession) -> io::Result<()> {
    let json = serde_json::to_vec(s).map_err(io::Error::other)?;
    let len = u32::try_from(json.len()).map_err(io::Error::other)?;
    let mut data = Vec::with_capacity(SLOT_HEADER + json.len());
    data.extend_from_slice(SLOT_MAGIC);
    data.extend_from_slice(&seq.to_le_bytes());
    data.extend_from_slice(&len.to_le_bytes());
    data.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    data.extend_from_slice(&json);
    let path = slot_path(dir, stem, seq);
    let new = !path.exists();
    let f = File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    f.write_all_at(&data, 0)?;
    f.sync_data()?;
    if new {
        File::open(dir)?.sync_all()?;
        // The file of an earlier version is older than any slot.
        let _ = fs::remove_file(dir.join(stem));
    }
    Ok(())
}

/// Decode a slot: (session, sequence), or `None` if it does not check out.
fn decode_slot(data: &[u8]) -> Option<(StoredSession, u64)> {
    if data.get(..4)? != SLOT_MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(data.get(4..12)?.try_into().ok()?);
    let len = u32::from_le_bytes(data.get(12..16)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(data.get(16..20)?.try_into().ok()?);
    let json = data.get(SLOT_HEADER..SLOT_HEADER.checked_add(len)?)?;
    if crc32c::crc32c(json) != crc {
        return None;
    }
    Some((serde_json::from_slice(json).ok()?, seq))
}

/// The latest valid state of session `stem`: its slots, or the file of an
/// earlier version (sequence 0).
fn read_best(dir: &Path, stem: &str) -> Option<(StoredSession, u64)> {
    let mut best: Option<(StoredSession, u64)> = read(&dir.join(stem)).map(|s| (s, 0));
    let mut found = false;
    for seq in [0u64, 1] {
        let path = slot_path(dir, stem, seq);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                log::warn!("mqtt: cannot read session file {}: {e}", path.display());
                continue;
            }
        };
        found = true;
        match decode_slot(&data) {
            Some((s, q)) if best.as_ref().is_none_or(|(_, b)| q > *b) => best = Some((s, q)),
            Some(_) => {}
            None => log::info!(
                "mqtt: session slot {} is torn or corrupt; the other one is used",
                path.display()
            ),
        }
    }
    if found && best.is_none() {
        log::warn!(
            "mqtt: no readable state in the session files {}.a/.b; the session starts fresh",
            dir.join(stem).display()
        );
    }
    best
}

/// Whether any file of session `stem` exists.
fn has_files(dir: &Path, stem: &str) -> bool {
    [stem.to_string(), format!("{stem}.a"), format!("{stem}.b")]
        .iter()
        .any(|n| dir.join(n).exists())
}

/// Delete every file of session `stem` (durably); fine if none.
fn remove_files(dir: &Path, stem: &str) -> io::Result<()> {
    let mut removed = false;
    for name in [stem.to_string(), format!("{stem}.a"), format!("{stem}.b")] {
        match fs::remove_file(dir.join(name)) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if removed {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read(path: &Path) -> Option<StoredSession> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!(
                "mqtt: cannot read session file {}: {e}; ignored",
                path.display()
            );
            return None;
        }
    };
    match serde_json::from_slice(&data) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!(
                "mqtt: session file {} is corrupt ({e}); the session starts fresh",
                path.display()
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("frond-persist-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn save_load_remove_and_expiry_sweep() {
        let dir = tmpdir("basic");
        let (st, kept, expired) = SessionStore::open(&dir).unwrap();
        assert_eq!((kept, expired), (0, 0));
        let mut s = StoredSession {
            client_id: "dev 1/ü".into(),
            owner: Some(Owner::User("alice".into())),
            version: 4,
            subs: vec![StoredSub {
                filter: "telemetry.>".into(),
                qos: 1,
                share: None,
            }],
            expiry_secs: 60,
            disconnected_at: unix_now(),
            cursors: vec![Cursor {
                stream: "T".into(),
                acked: 5,
                sent: 7,
                qos2: vec![(6, 3, true), (7, 4, false)],
                done: vec![9],
            }],
            qos2_in: vec![3],
            sub_ids: vec![("telemetry.>".into(), 7)],
        };
        st.save(&s).unwrap();
        assert_eq!(st.load("dev 1/ü"), Some(s.clone()));
        // Files written before the QoS 2 fields existed still load.
        let old = br#"{"client_id":"o","version":4,"subs":[],"expiry_secs":9,"disconnected_at":0,"cursors":[{"stream":"T","acked":1,"sent":2}],"qos2_in":[]}"#;
        let parsed: StoredSession = serde_json::from_slice(old).unwrap();
        assert_eq!(parsed.cursors[0].qos2, Vec::new());
        let text = serde_json::to_string(&parsed).unwrap();
        assert!(
            !text.contains("qos2\""),
            "empty QoS 2 state is not written: {text}"
        );
        s.client_id = "old".into();
        s.disconnected_at = 1;
        st.save(&s).unwrap();
        fs::write(dir.join(hex("bad")), b"{not json").unwrap();
        assert_eq!(st.load("bad"), None);
        let (st, kept, expired) = SessionStore::open(&dir).unwrap();
        assert_eq!((kept, expired), (1, 1));
        assert_eq!(st.load("old"), None);
        st.remove("dev 1/ü").unwrap();
        st.remove("dev 1/ü").unwrap();
        assert_eq!(st.load("dev 1/ü"), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn slots_alternate_and_a_torn_save_leaves_the_previous_state() {
        let dir = tmpdir("slots");
        let (st, _, _) = SessionStore::open(&dir).unwrap();
        let mut s = StoredSession {
            client_id: "c".into(),
            version: 5,
            expiry_secs: 60,
            disconnected_at: unix_now(),
            ..StoredSession::default()
        };
        // A file of an earlier version (atomic replace) is read ...
        write(&dir, &dir.join(hex("c")), &s).unwrap();
        assert_eq!(st.load("c"), Some(s.clone()));
        // ... and replaced by the slots.
        s.qos2_in = vec![1];
        st.save(&s).unwrap();
        assert!(!dir.join(hex("c")).exists());
        s.qos2_in = vec![1, 2, 3, 4, 5, 6];
        st.save(&s).unwrap();
        s.qos2_in = vec![7];
        st.save(&s).unwrap(); // shorter than what its slot held
        let (st, _, _) = SessionStore::open(&dir).unwrap();
        assert_eq!(st.load("c").unwrap().qos2_in, vec![7]);
        // Tear the next save: the state before it comes back.
        s.qos2_in = vec![8];
        st.save(&s).unwrap();
        let latest = slot_path(&dir, &file_stem("c"), 4);
        let mut data = fs::read(&latest).unwrap();
        data[SLOT_HEADER + 2] ^= 0xff;
        fs::write(&latest, &data).unwrap();
        let (st, _, _) = SessionStore::open(&dir).unwrap();
        assert_eq!(st.load("c").unwrap().qos2_in, vec![7]);
        // Saving again goes on from there and wins.
        s.qos2_in = vec![9];
        st.save(&s).unwrap();
        let (st, _, _) = SessionStore::open(&dir).unwrap();
        assert_eq!(st.load("c").unwrap().qos2_in, vec![9]);
        st.remove("c").unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "all files gone");
        assert_eq!(st.load("c"), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn any_client_id_has_a_file_and_old_names_are_still_found() {
        let dir = tmpdir("names");
        let (st, _, _) = SessionStore::open(&dir).unwrap();
        let session = |id: &str, qos2_in: Vec<u16>| StoredSession {
            client_id: id.into(),
            owner: Some(Owner::Anonymous),
            version: 4,
            expiry_secs: 60,
            disconnected_at: unix_now(),
            qos2_in,
            ..StoredSession::default()
        };
        // Long, with `/`, `..` and non-ASCII: a 64-digit name each.
        let long = format!("../ü/{}", "x".repeat(65_000));
        for id in ["a/../b", &"y".repeat(300), &long] {
            st.save(&session(id, vec![1])).unwrap();
            assert_eq!(st.load(id), Some(session(id, vec![1])), "{:.20}", id);
        }
        for e in fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert_eq!(name.len(), 66, "{name}");
        }
        // A file that holds another client id is not this session.
        fs::copy(
            slot_path(&dir, &file_stem("a/../b"), 1),
            slot_path(&dir, &file_stem("other"), 1),
        )
        .unwrap();
        assert_eq!(st.load("other"), None);

        // Slots of an earlier version (hex of the id) are found ...
        let old = session("old-dev", vec![5]);
        write_slot(&dir, &hex("old-dev"), 7, &old).unwrap();
        let (st, kept, _) = SessionStore::open(&dir).unwrap();
        assert_eq!(kept, 5);
        assert_eq!(st.load("old-dev"), Some(old.clone()));
        // ... and moved to the new name by the next save.
        st.save(&session("old-dev", vec![6])).unwrap();
        assert!(!has_files(&dir, &hex("old-dev")), "old files deleted");
        let (st, _, _) = SessionStore::open(&dir).unwrap();
        assert_eq!(st.load("old-dev").unwrap().qos2_in, vec![6]);
        // Both names present (a crash between the save and the delete):
        // the new one holds the newer state, the old files go next time.
        write_slot(&dir, &hex("old-dev"), 9, &old).unwrap();
        let (st, _, _) = SessionStore::open(&dir).unwrap();
        assert_eq!(st.load("old-dev").unwrap().qos2_in, vec![6]);
        st.save(&session("old-dev", vec![7])).unwrap();
        assert!(!has_files(&dir, &hex("old-dev")));
        st.remove("old-dev").unwrap();
        st.remove(&long).unwrap();
        assert_eq!(st.load("old-dev"), None);
        assert_eq!(st.load(&long), None);
        // Ids too long for an old name are never looked up under one.
        assert_eq!(legacy_stem(&"z".repeat(126)), None);
        assert_eq!(legacy_stem("ab"), Some("6162".into()));
        assert_eq!(log_id("a/b"), "\"a/b\"");
        assert!(
            log_id(&long).ends_with("… (65006 bytes)"),
            "{}",
            log_id(&long)
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn sessions_belong_to_their_owner() {
        use crate::auth::{Auth, Permissions, Secret, User};
        let user = |n: &str| User {
            name: n.into(),
            secret: Secret::parse("pw"),
            permissions: std::sync::Arc::new(Permissions::default()),
        };
        let auth = Auth {
            anonymous: false,
            anonymous_permissions: std::sync::Arc::new(Permissions::default()),
            users: vec![user("admin"), user("alice")],
        };
        let (admin, alice) = (Owner::User("admin".into()), Owner::User("alice".into()));
        let gone = Owner::User("removed".into());
        let a = Some(&auth);
        assert_eq!(claim(Some(&admin), Some(&admin), a), Claim::Resume);
        assert_eq!(claim(Some(&admin), Some(&alice), a), Claim::Refuse);
        assert_eq!(claim(Some(&gone), Some(&alice), a), Claim::Discard);
        // anonymous = false: an anonymous session has no one to return.
        assert_eq!(
            claim(Some(&Owner::Anonymous), Some(&alice), a),
            Claim::Discard
        );
        let anon_ok = Auth {
            anonymous: true,
            ..auth.clone()
        };
        assert_eq!(
            claim(Some(&Owner::Anonymous), Some(&alice), Some(&anon_ok)),
            Claim::Refuse
        );
        // No owner recorded (earlier version, or no [auth]), or no [auth]
        // now: nobody to protect it from.
        assert_eq!(claim(None, Some(&alice), a), Claim::Resume);
        assert_eq!(claim(Some(&admin), None, None), Claim::Resume);
        // The owner is kept in the file.
        let json = serde_json::to_string(&StoredSession {
            owner: Some(alice.clone()),
            ..StoredSession::default()
        })
        .unwrap();
        assert!(json.contains(r#""owner":{"user":"alice"}"#), "{json}");
        let json = serde_json::to_string(&StoredSession {
            owner: Some(Owner::Anonymous),
            ..StoredSession::default()
        })
        .unwrap();
        assert!(json.contains(r#""owner":"anonymous""#), "{json}");

        // Live connections: another user's is never taken over.
        let dir = tmpdir("hold");
        let (st, _, _) = SessionStore::open(&dir).unwrap();
        assert_eq!(st.hold("c", 1, Some(&admin)), Ok(()));
        assert_eq!(st.hold("c", 2, Some(&alice)), Err(admin.clone()));
        assert_eq!(
            st.hold("c", 3, Some(&admin)),
            Ok(()),
            "same user takes over"
        );
        st.unhold("c", 1); // an older connection: no effect
        assert_eq!(st.hold("c", 4, Some(&alice)), Err(admin.clone()));
        st.unhold("c", 3);
        assert_eq!(st.hold("c", 5, Some(&alice)), Ok(()));
        assert_eq!(st.hold("d", 6, None), Ok(()));
        assert_eq!(st.hold("d", 7, None), Ok(()), "no [auth]: no owners");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn checkout_waits_for_checkin() {
        let dir = tmpdir("checkout");
        let (st, _, _) = SessionStore::open(&dir).unwrap();
        smol::block_on(async {
            assert!(st.checkout("a", Duration::from_secs(1)).await);
            assert!(!st.checkout("a", Duration::from_millis(20)).await);
            assert!(st.checkout("b", Duration::from_millis(20)).await);
            st.checkin("a");
            assert!(st.checkout("a", Duration::from_millis(20)).await);
        });
        let _ = fs::remove_dir_all(&dir);
    }
}
