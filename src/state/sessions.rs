//! Persistent MQTT session state: two small slot records per session.
//!
//! Owns `<data_dir>/mqtt/sessions/`: per persistent session, two slot
//! files ([`crate::state::write_slot`]) named after the SHA-256 of its
//! client id ([`file_stem`], 64 hex digits), `<sha>.a` and `<sha>.b`, so
//! any client id MQTT allows (up to 65,535 bytes of UTF-8, `/` and `..`
//! included) has a file name of the same short length; the full client id
//! is inside the record and a record holding another id is not this
//! session. Files of earlier versions, named after the hex of the client
//! id ([`legacy_stem`], only possible for ids up to 126 bytes), are still
//! read: `<hex>.a`/`<hex>.b`, and `<hex>` without suffix (JSON written by
//! atomic replace, the oldest state). A session found under its old name
//! is written under the new one from its next save on, and the old files
//! are then deleted. Slots of earlier releases hold JSON (`FSS1`); they
//! are read, and the next save writes the current encoding (`FSS2`,
//! postcard). Saves alternate between the slots (sequence + 1 each time)
//! and overwrite in place with one `fdatasync` — about a sixth of the cost
//! of temp file, fsync, rename and directory fsync, which matters because
//! QoS 2 saves before acknowledgements. Loading takes the valid slot with
//! the highest sequence, so a torn save leaves the previous state. The
//! record ([`StoredSession`]) holds:
//! client id, the owner (the user that created the session: `"anonymous"`
//! or `{"user": name}`; absent when frond runs without `[auth]` and in
//! files of earlier versions), protocol version, subscriptions (keyed by
//! the MQTT filter the client sent and its share name, with granted QoS,
//! No Local, Retain As Published and subscription identifier), the expiry
//! interval, the time of the last disconnect in unix milliseconds (0
//! while connected), per-stream cursors and the inbound QoS 2 packet ids
//! that were PUBREC'd and await PUBREL. The body is format
//! [`SESSION_FORMAT`] (2); records of format 1 (subscriptions as NATS
//! filters, `a/#` as `a` plus `a.>`, identifiers by NATS filter, the
//! disconnect in whole seconds) and their JSON are read and converted,
//! and written in format 2 at the next save.
//!
//! A cursor also holds the outbound QoS 2 state of its stream's messages:
//! each QoS 2 message in flight as `[sequence, packet id, PUBREC
//! received]`, and the sequences above `acked` whose QoS 2 exchange
//! completed (`done`), which are never sent again. The session machine
//! ([`crate::mqtt`]) asks for this record to be written before
//! a QoS 2 PUBLISH, a PUBREL, a PUBREC or a PUBCOMP whose state it records
//! leaves, so what the client was told is always on disk.
//!
//! Invariants:
//! - A save never touches the slot holding the latest state: after a crash
//!   the session is either the old or the new state, never a mix (a slot
//!   file is created, and the directory fsynced, only once). A slot that
//!   does not check out is ignored; a session with none that does is
//!   reported and starts fresh, never fatal.
//! - A save that returned Ok survives a crash; so does a removal.
//! - Saves of one client id are sequential (one connection holds it).
//! - At most one connection holds a session at a time
//!   ([`SessionStore::checkout`] / [`SessionStore::checkin`]): a reconnecting
//!   or taking-over client waits until the previous connection has written
//!   its final state, so nothing it acknowledged is lost or redone.
//! - A session belongs to its owner ([`Owner`], `broker::persist::claim`):
//!   another user never resumes it, deletes it or takes over a live
//!   connection of its client id ([`SessionStore::hold`]); see the module
//!   doc of [`crate::mqtt`] for the rule.
//! - Expiry is judged on the [`Clock`] given at open (the caller's).
//! - Methods that touch files block: call them through `smol::unblock`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{decode, read_all, read_slots, slot_name, write_slot, Body, Clock, Disk};
use crate::store::backend::Backend;

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
    /// PUBREC received, i.e. PUBREL owed). Absent in JSON files of
    /// sessions without QoS 2.
    #[serde(default)]
    pub qos2: Vec<(u64, u16, bool)>,
    /// Sequences above `acked` delivered at QoS 2 and completed (PUBCOMP).
    #[serde(default)]
    pub done: Vec<u64>,
}

/// One subscription, keyed by the MQTT filter the client sent (and its
/// share name): `a` and `a/#` are two subscriptions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSub {
    /// The MQTT filter (after `$share/{name}/` for a shared one).
    pub filter: String,
    pub qos: u8,
    /// The share name of a shared subscription (`$share/{name}/...`).
    pub share: Option<String>,
    /// MQTT 5 No Local.
    pub no_local: bool,
    /// MQTT 5 Retain As Published.
    pub retain_as_published: bool,
    /// MQTT 5 subscription identifier.
    pub id: Option<u32>,
}

/// A subscription as records of format 1 (and JSON) hold it: a NATS
/// filter; an MQTT `a/#` was stored as `a` and `a.>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredSubV1 {
    filter: String,
    qos: u8,
    /// Absent in files written before shared subscriptions existed.
    #[serde(default)]
    share: Option<String>,
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

/// Everything a persistent session keeps between connections (record
/// format [`SESSION_FORMAT`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    pub client_id: String,
    /// The user that created it (`None`: frond runs without `[auth]`, or
    /// a file of an earlier version).
    pub owner: Option<Owner>,
    /// 4 (3.1.1) or 5 (5.0).
    pub version: u8,
    pub subs: Vec<StoredSub>,
    /// Seconds the session outlives a disconnect.
    pub expiry_secs: u64,
    /// Unix milliseconds of the last disconnect; 0 while connected.
    pub disconnected_at_ms: u64,
    pub cursors: Vec<Cursor>,
    /// Inbound QoS 2 packet ids stored and PUBREC'd, awaiting PUBREL.
    pub qos2_in: Vec<u16>,
}

/// The record of format 1 and of the JSON files of earlier releases.
/// (Fields with `default` are absent from JSON files of earlier
/// versions.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StoredSessionV1 {
    client_id: String,
    #[serde(default)]
    owner: Option<Owner>,
    version: u8,
    subs: Vec<StoredSubV1>,
    expiry_secs: u64,
    /// Unix seconds of the last disconnect; 0 while connected.
    disconnected_at: u64,
    cursors: Vec<Cursor>,
    qos2_in: Vec<u16>,
    /// MQTT 5 subscription identifiers: (NATS filter, identifier).
    #[serde(default)]
    sub_ids: Vec<(String, u32)>,
}

/// The body version of session records this release writes (the other
/// state records are [`super::VERSION`], 1): 2 keys subscriptions by
/// their MQTT filter with their options, and records the disconnect in
/// milliseconds. Format 1 records are read and converted
/// ([`StoredSessionV1`]); a release that knows only format 1 reports
/// these as of an unknown version and starts such a session fresh.
pub const SESSION_FORMAT: u8 = 2;

/// An MQTT filter back from the NATS filter format 1 stored (`*` is `+`,
/// `>` is `#`, other tokens are topic levels).
fn nats_to_mqtt_filter(nats: &str) -> String {
    nats.split('.')
        .map(|token| match token {
            "*" => "+".to_string(),
            ">" => "#".to_string(),
            t => crate::subject::mqtt::subject_to_topic(t),
        })
        .collect::<Vec<_>>()
        .join("/")
}

impl From<StoredSessionV1> for StoredSession {
    /// `a` and `a.>` of one share come back as the one `a/#` they were
    /// stored for; identifiers go to the subscription of their filter.
    fn from(v1: StoredSessionV1) -> StoredSession {
        let mut subs: Vec<StoredSub> = Vec::new();
        for s in &v1.subs {
            let parent = s.filter.strip_suffix(".>");
            let merged_into_hash =
                parent.is_some_and(|p| v1.subs.iter().any(|o| o.filter == p && o.share == s.share));
            let is_parent_of_hash = v1.subs.iter().any(|o| {
                o.share == s.share && o.filter.strip_suffix(".>") == Some(s.filter.as_str())
            });
            if is_parent_of_hash {
                // Folded into the `a/#` of its `a.>`.
                continue;
            }
            let id = v1
                .sub_ids
                .iter()
                .find(|(f, _)| *f == s.filter)
                .map(|(_, i)| *i);
            let qos = match (merged_into_hash, parent) {
                (true, Some(p)) => v1
                    .subs
                    .iter()
                    .filter(|o| o.filter == p && o.share == s.share)
                    .map(|o| o.qos)
                    .fold(s.qos, u8::max),
                _ => s.qos,
            };
            subs.push(StoredSub {
                filter: nats_to_mqtt_filter(&s.filter),
                qos,
                share: s.share.clone(),
                no_local: false,
                retain_as_published: false,
                id,
            });
        }
        StoredSession {
            client_id: v1.client_id,
            owner: v1.owner,
            version: v1.version,
            subs,
            expiry_secs: v1.expiry_secs,
            disconnected_at_ms: v1.disconnected_at.saturating_mul(1000),
            cursors: v1.cursors,
            qos2_in: v1.qos2_in,
        }
    }
}

impl StoredSession {
    /// Whether the session expired by `now_ms` (unix milliseconds): the
    /// expiry is measured from the disconnect to the millisecond, so a
    /// session is never ended early [MQTT-4.1.0-2].
    pub fn expired(&self, now_ms: u64) -> bool {
        self.disconnected_at_ms != 0
            && now_ms
                >= self
                    .disconnected_at_ms
                    .saturating_add(self.expiry_secs.saturating_mul(1000))
    }
}

pub struct SessionStore {
    disk: Disk,
    /// Where the files are, for log lines.
    place: String,
    clock: Clock,
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
    pub fn open(dir: &Path, clock: Clock) -> io::Result<(SessionStore, usize, usize)> {
        SessionStore::open_on(Disk::fs(dir)?, &dir.display().to_string(), clock)
    }

    /// [`SessionStore::open`] on `disk`; `place` names it in log lines.
    pub fn open_on(
        disk: Disk,
        place: &str,
        clock: Clock,
    ) -> io::Result<(SessionStore, usize, usize)> {
        let now = clock();
        let (mut kept, mut expired) = (0, 0);
        let mut b = disk.scratch()?;
        let mut stems = BTreeSet::new();
        for name in b.list()? {
            if name.ends_with(".tmp") {
                let _ = b.remove(&name);
                continue;
            }
            let stem = name
                .strip_suffix(".a")
                .or_else(|| name.strip_suffix(".b"))
                .unwrap_or(&name);
            stems.insert(stem.to_string());
        }
        for stem in stems {
            match read_best(&mut *b, place, &stem) {
                Some((mut s, seq)) if s.disconnected_at_ms == 0 => {
                    // Connected when frond stopped: it disconnected now.
                    s.disconnected_at_ms = now.max(1);
                    kept += 1;
                    save_slot(&mut *b, &stem, seq + 1, &s)?;
                }
                Some((s, _)) if !s.expired(now) => kept += 1,
                Some(_) => {
                    expired += 1;
                    remove_files(&mut *b, &stem)?;
                }
                None => {}
            }
        }
        let store = SessionStore {
            disk,
            place: place.to_string(),
            clock,
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
        let found = {
            let mut b = self.disk.lock(&stem);
            let b = &mut **b;
            let mut found = read_best(b, &self.place, &stem);
            if let Some(old) = &legacy {
                match found {
                    // Saved under the new name, then crashed before the old
                    // files were deleted: the new name holds the newer state.
                    Some(_) if has_files(b, old) => {
                        self.legacy().insert(client_id.to_string());
                    }
                    Some(_) => {}
                    None => {
                        found = read_best(b, &self.place, old);
                        if found.is_some() {
                            stem = old.clone();
                            self.legacy().insert(client_id.to_string());
                        }
                    }
                }
            }
            found
        };
        let (s, seq) = found?;
        self.seqs().insert(client_id.to_string(), seq);
        if s.client_id != client_id {
            log::warn!(
                "mqtt: session file {}/{stem} names another client; ignored",
                self.place
            );
            return None;
        }
        if s.expired((self.clock)()) {
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
        let mut b = self.disk.lock(&stem);
        let b = &mut **b;
        let known = self.seqs().get(&s.client_id).copied();
        let last = match known {
            Some(q) => q,
            None => read_best(b, &self.place, &stem).map_or(0, |(_, q)| q),
        };
        save_slot(b, &stem, last + 1, s)?;
        self.seqs().insert(s.client_id.clone(), last + 1);
        if self.legacy().remove(&s.client_id) {
            if let Some(old) = legacy_stem(&s.client_id) {
                if let Err(e) = remove_files(b, &old) {
                    log::warn!(
                        "mqtt: cannot delete the session files {}/{old}.a/.b of an earlier version: {e}",
                        self.place
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
        let stem = file_stem(client_id);
        let mut b = self.disk.lock(&stem);
        if let Some(old) = legacy_stem(client_id) {
            remove_files(&mut **b, &old)?;
        }
        remove_files(&mut **b, &stem)
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
        let mut timer = smol::Timer::after(timeout);
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
                    (&mut timer).await;
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

/// Write `s` as sequence `seq` into its slot; the first write of a slot
/// file deletes the file of the oldest version (older than any slot).
fn save_slot(b: &mut dyn Backend, stem: &str, seq: u64, s: &StoredSession) -> io::Result<()> {
    if write_slot(b, stem, seq, &encode_session(s)?)? {
        b.remove(stem)?;
    }
    Ok(())
}

/// `s` as a record body: [`SESSION_FORMAT`], then postcard.
fn encode_session(s: &StoredSession) -> io::Result<Vec<u8>> {
    postcard::to_extend(s, vec![SESSION_FORMAT])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// A session record: format 2, format 1 ([`decode`]), or the JSON of
/// earlier releases (format 1's fields).
fn decode_session(body: &Body) -> Result<StoredSession, String> {
    match body {
        Body::Current(b) => match b.split_first() {
            Some((&SESSION_FORMAT, rest)) => {
                postcard::from_bytes(rest).map_err(|e| format!("bad record: {e}"))
            }
            _ => decode::<StoredSessionV1>(b).map(StoredSession::from),
        },
        Body::Json(j) => serde_json::from_slice::<StoredSessionV1>(j)
            .map(StoredSession::from)
            .map_err(|e| format!("bad JSON: {e}")),
    }
}

/// The latest valid state of session `stem`: its slots, or the file of an
/// earlier version (sequence 0). What does not check out is reported.
fn read_best(b: &mut dyn Backend, place: &str, stem: &str) -> Option<(StoredSession, u64)> {
    let mut best = read_oldest(b, place, stem).map(|s| (s, 0));
    let slots = read_slots(b, stem);
    for (name, why) in &slots.bad {
        log::info!(
            "mqtt: session slot {place}/{name} is torn or corrupt ({why}); the other one is used"
        );
    }
    if let Some((body, q)) = slots.best {
        match decode_session(&body) {
            Ok(s) if best.as_ref().is_none_or(|(_, b)| q > *b) => best = Some((s, q)),
            Ok(_) => {}
            Err(e) => log::warn!("mqtt: session {place}/{stem}: {e}"),
        }
    }
    if slots.found && best.is_none() {
        log::warn!(
            "mqtt: no readable state in the session files {place}/{stem}.a/.b; the session starts fresh"
        );
    }
    best
}

/// Whether any file of session `stem` exists.
fn has_files(b: &mut dyn Backend, stem: &str) -> bool {
    [stem.to_string(), format!("{stem}.a"), format!("{stem}.b")]
        .iter()
        .any(|n| b.len(n).is_ok())
}

/// Delete every file of session `stem` (durably); fine if none. Oldest
/// first, so a crash part-way leaves the latest state, never an older one.
fn remove_files(b: &mut dyn Backend, stem: &str) -> io::Result<()> {
    if !has_files(b, stem) {
        return Ok(());
    }
    let newest = read_slots(b, stem).best.map_or(0, |(_, q)| q);
    let oldest_first = [
        stem.to_string(),
        slot_name(stem, newest + 1),
        slot_name(stem, newest),
    ];
    for name in oldest_first {
        b.remove(&name)?;
    }
    b.sync_dir()
}

/// The file of the oldest version: JSON, no suffix.
fn read_oldest(b: &mut dyn Backend, place: &str, stem: &str) -> Option<StoredSession> {
    let data = match read_all(b, stem) {
        Ok(d) => d?,
        Err(e) => {
            log::warn!("mqtt: cannot read session file {place}/{stem}: {e}; ignored");
            return None;
        }
    };
    match serde_json::from_slice::<StoredSessionV1>(&data) {
        Ok(s) => Some(s.into()),
        Err(e) => {
            log::warn!(
                "mqtt: session file {place}/{stem} is corrupt ({e}); the session starts fresh"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{slot_name, SLOT_HEADER, SLOT_MAGIC_JSON};
    use crate::store::backend::MemBackend;
    use std::sync::Arc;

    const NOW: u64 = 1_700_000_000;

    pub(crate) fn mem_disk(mem: &MemBackend) -> Disk {
        let m = mem.clone();
        Disk::new(3, move || Ok(Box::new(m.clone()) as Box<dyn Backend>)).unwrap()
    }

    fn open(mem: &MemBackend) -> (SessionStore, usize, usize) {
        SessionStore::open_on(mem_disk(mem), "mem", Arc::new(|| NOW * 1000)).unwrap()
    }

    /// A slot of an earlier release: `FSS1` and JSON (format 1 fields).
    pub(crate) fn json_slot(seq: u64, s: &StoredSession) -> Vec<u8> {
        json_slot_of(seq, &v1(s))
    }

    fn json_slot_of<T: Serialize>(seq: u64, v: &T) -> Vec<u8> {
        let json = serde_json::to_vec(v).unwrap();
        let mut d = SLOT_MAGIC_JSON.to_vec();
        d.extend_from_slice(&seq.to_le_bytes());
        d.extend_from_slice(&(json.len() as u32).to_le_bytes());
        d.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
        d.extend_from_slice(&json);
        d
    }

    /// How format 1 held `s` (plain filters without `#` or `+`; no
    /// subscription options; the disconnect in whole seconds).
    fn v1(s: &StoredSession) -> StoredSessionV1 {
        StoredSessionV1 {
            client_id: s.client_id.clone(),
            owner: s.owner.clone(),
            version: s.version,
            subs: s
                .subs
                .iter()
                .map(|x| StoredSubV1 {
                    filter: x.filter.replace('/', "."),
                    qos: x.qos,
                    share: x.share.clone(),
                })
                .collect(),
            expiry_secs: s.expiry_secs,
            disconnected_at: s.disconnected_at_ms / 1000,
            cursors: s.cursors.clone(),
            qos2_in: s.qos2_in.clone(),
            sub_ids: s
                .subs
                .iter()
                .filter_map(|x| Some((x.filter.replace('/', "."), x.id?)))
                .collect(),
        }
    }

    fn full() -> StoredSession {
        StoredSession {
            client_id: "dev 1/ü".into(),
            owner: Some(Owner::User("alice".into())),
            version: 4,
            subs: vec![StoredSub {
                filter: "telemetry/x".into(),
                qos: 1,
                share: Some("g".into()),
                id: Some(7),
                ..StoredSub::default()
            }],
            expiry_secs: 60,
            disconnected_at_ms: NOW * 1000,
            cursors: vec![Cursor {
                stream: "T".into(),
                acked: 5,
                sent: 7,
                qos2: vec![(6, 3, true), (7, 4, false)],
                done: vec![9],
            }],
            qos2_in: vec![3],
        }
    }

    #[test]
    fn save_load_remove_and_expiry_sweep() {
        let mem = MemBackend::new();
        let (st, kept, expired) = open(&mem);
        assert_eq!((kept, expired), (0, 0));
        let mut s = full();
        st.save(&s).unwrap();
        assert_eq!(st.load("dev 1/ü"), Some(s.clone()));
        s.client_id = "old".into();
        s.disconnected_at_ms = 1;
        st.save(&s).unwrap();
        mem.set_file(&hex("bad"), b"{not json".to_vec());
        assert_eq!(st.load("bad"), None);
        let (st, kept, expired) = open(&mem);
        assert_eq!((kept, expired), (1, 1));
        assert_eq!(st.load("old"), None);
        st.remove("dev 1/ü").unwrap();
        st.remove("dev 1/ü").unwrap();
        assert_eq!(st.load("dev 1/ü"), None);
        // Connected when frond stopped: disconnected at the next start.
        let mut c = full();
        c.disconnected_at_ms = 0;
        st.save(&c).unwrap();
        let (st, kept, _) = open(&mem);
        assert_eq!(kept, 1);
        assert_eq!(st.load("dev 1/ü").unwrap().disconnected_at_ms, NOW * 1000);
    }

    #[test]
    fn expiry_is_measured_in_milliseconds() {
        // Disconnected at .9 s with expiry 5: alive 4.2 s later (whole
        // seconds would have ended it at 5.0), gone at 5.9 s.
        let s = StoredSession {
            expiry_secs: 5,
            disconnected_at_ms: NOW * 1000 + 900,
            ..StoredSession::default()
        };
        assert!(!s.expired(NOW * 1000 + 900 + 4_200));
        assert!(!s.expired(NOW * 1000 + 900 + 4_999));
        assert!(s.expired(NOW * 1000 + 900 + 5_000));
        let connected = StoredSession {
            disconnected_at_ms: 0,
            ..s
        };
        assert!(!connected.expired(u64::MAX));
    }

    #[test]
    fn format_1_records_are_read_and_converted() {
        // `a/#` was stored as `a` + `a.>`, identifiers by NATS filter,
        // the disconnect in seconds.
        let old = StoredSessionV1 {
            client_id: "f1".into(),
            owner: None,
            version: 5,
            subs: vec![
                StoredSubV1 {
                    filter: "a".into(),
                    qos: 1,
                    share: None,
                },
                StoredSubV1 {
                    filter: "a.>".into(),
                    qos: 1,
                    share: None,
                },
                StoredSubV1 {
                    filter: "b.*.c".into(),
                    qos: 2,
                    share: Some("g".into()),
                },
                StoredSubV1 {
                    filter: "/.x//y".into(),
                    qos: 0,
                    share: None,
                },
            ],
            expiry_secs: 9,
            disconnected_at: NOW,
            cursors: Vec::new(),
            qos2_in: vec![4],
            sub_ids: vec![("a.>".into(), 3), ("a".into(), 3)],
        };
        let want = StoredSession {
            client_id: "f1".into(),
            version: 5,
            subs: vec![
                StoredSub {
                    filter: "a/#".into(),
                    qos: 1,
                    id: Some(3),
                    ..StoredSub::default()
                },
                StoredSub {
                    filter: "b/+/c".into(),
                    qos: 2,
                    share: Some("g".into()),
                    ..StoredSub::default()
                },
                StoredSub {
                    filter: "/x.y".into(),
                    qos: 0,
                    ..StoredSub::default()
                },
            ],
            expiry_secs: 9,
            disconnected_at_ms: NOW * 1000,
            qos2_in: vec![4],
            ..StoredSession::default()
        };
        let mem = MemBackend::new();
        let stem = file_stem("f1");
        // Format 1: postcard with body version 1.
        let body = crate::state::encode(&old).unwrap();
        assert_eq!(body[0], 1);
        write_slot(&mut mem.clone(), &stem, 3, &body).unwrap();
        let (st, kept, _) = open(&mem);
        assert_eq!(kept, 1);
        assert_eq!(st.load("f1"), Some(want.clone()));
        // Saved again: format 2, read back the same.
        st.save(&want).unwrap();
        let new = mem.file(&slot_name(&stem, 4)).unwrap();
        assert_eq!(new[SLOT_HEADER], SESSION_FORMAT);
        let (st, _, _) = open(&mem);
        assert_eq!(st.load("f1"), Some(want.clone()));
        // The JSON of earlier releases converts the same way.
        let mem = MemBackend::new();
        mem.set_file(&slot_name(&stem, 1), json_slot_of(1, &old));
        let (st, _, _) = open(&mem);
        assert_eq!(st.load("f1"), Some(want));
    }

    #[test]
    fn json_sessions_of_earlier_releases_are_read_and_rewritten() {
        let mem = MemBackend::new();
        let s = full();
        let stem = file_stem(&s.client_id);
        mem.set_file(&slot_name(&stem, 3), json_slot(3, &s));
        // Written before the QoS 2 fields, owners and ids existed.
        let old = br#"{"client_id":"o","version":4,"subs":[{"filter":"a","qos":1}],"expiry_secs":9,"disconnected_at":0,"cursors":[{"stream":"T","acked":1,"sent":2}],"qos2_in":[]}"#;
        let parsed: StoredSessionV1 = serde_json::from_slice(old).unwrap();
        assert_eq!(parsed.cursors[0].qos2, Vec::new());
        assert_eq!(
            (parsed.owner.clone(), parsed.subs[0].share.clone()),
            (None, None)
        );
        mem.set_file(&slot_name(&file_stem("o"), 0), json_slot_of(0, &parsed));
        let (st, kept, _) = open(&mem);
        assert_eq!(kept, 2);
        // "o" was connected at the stop: rewritten at open, in postcard.
        let now_o = mem.file(&slot_name(&file_stem("o"), 1)).unwrap();
        assert_eq!(&now_o[..4], crate::state::SLOT_MAGIC);
        assert_eq!(st.load(&s.client_id), Some(s.clone()));
        st.save(&s).unwrap();
        let new = mem.file(&slot_name(&stem, 4)).unwrap();
        assert_eq!(&new[..4], crate::state::SLOT_MAGIC);
        assert_eq!(new[SLOT_HEADER], SESSION_FORMAT);
        assert!(new.len() < json_slot(3, &s).len(), "smaller than JSON");
        let (st, _, _) = open(&mem);
        assert_eq!(st.load(&s.client_id), Some(s));
        // The owner as earlier releases wrote it.
        let j = r#"{"client_id":"a","owner":{"user":"alice"},"version":4,"subs":[],"expiry_secs":1,"disconnected_at":0,"cursors":[],"qos2_in":[]}"#;
        let p: StoredSessionV1 = serde_json::from_str(j).unwrap();
        assert_eq!(p.owner, Some(Owner::User("alice".into())));
        let j = j.replace(r#"{"user":"alice"}"#, r#""anonymous""#);
        let p: StoredSessionV1 = serde_json::from_str(&j).unwrap();
        assert_eq!(p.owner, Some(Owner::Anonymous));
    }

    #[test]
    fn slots_alternate_and_a_torn_save_leaves_the_previous_state() {
        let mem = MemBackend::new();
        let (st, _, _) = open(&mem);
        let mut s = StoredSession {
            client_id: "c".into(),
            version: 5,
            expiry_secs: 60,
            disconnected_at_ms: NOW * 1000,
            ..StoredSession::default()
        };
        // A file of the oldest version (JSON, atomic replace) is read ...
        mem.set_file(&hex("c"), serde_json::to_vec(&v1(&s)).unwrap());
        assert_eq!(st.load("c"), Some(s.clone()));
        // ... and replaced by the slots.
        s.qos2_in = vec![1];
        st.save(&s).unwrap();
        assert_eq!(mem.file(&hex("c")), None);
        s.qos2_in = vec![1, 2, 3, 4, 5, 6];
        st.save(&s).unwrap();
        s.qos2_in = vec![7];
        st.save(&s).unwrap(); // shorter than what its slot held
        let (st, _, _) = open(&mem);
        assert_eq!(st.load("c").unwrap().qos2_in, vec![7]);
        // Tear the next save: the state before it comes back.
        s.qos2_in = vec![8];
        st.save(&s).unwrap();
        mem.flip_bit(&slot_name(&file_stem("c"), 4), SLOT_HEADER + 2, 7);
        let (st, _, _) = open(&mem);
        assert_eq!(st.load("c").unwrap().qos2_in, vec![7]);
        // Saving again goes on from there and wins.
        s.qos2_in = vec![9];
        st.save(&s).unwrap();
        let (st, _, _) = open(&mem);
        assert_eq!(st.load("c").unwrap().qos2_in, vec![9]);
        st.remove("c").unwrap();
        assert!(mem.names().is_empty(), "all files gone");
        assert_eq!(st.load("c"), None);
    }

    #[test]
    fn any_client_id_has_a_file_and_old_names_are_still_found() {
        let mem = MemBackend::new();
        let (st, _, _) = open(&mem);
        let session = |id: &str, qos2_in: Vec<u16>| StoredSession {
            client_id: id.into(),
            owner: Some(Owner::Anonymous),
            version: 4,
            expiry_secs: 60,
            disconnected_at_ms: NOW * 1000,
            qos2_in,
            ..StoredSession::default()
        };
        // Long, with `/`, `..` and non-ASCII: a 64-digit name each.
        let long = format!("../ü/{}", "x".repeat(65_000));
        for id in ["a/../b", &"y".repeat(300), &long] {
            st.save(&session(id, vec![1])).unwrap();
            assert_eq!(st.load(id), Some(session(id, vec![1])), "{:.20}", id);
        }
        for name in mem.names() {
            assert_eq!(name.len(), 66, "{name}");
        }
        // A file that holds another client id is not this session.
        let copy = mem.file(&slot_name(&file_stem("a/../b"), 1)).unwrap();
        mem.set_file(&slot_name(&file_stem("other"), 1), copy);
        assert_eq!(st.load("other"), None);

        // Slots of an earlier version (hex of the id) are found ...
        let old = session("old-dev", vec![5]);
        mem.set_file(&slot_name(&hex("old-dev"), 7), json_slot(7, &old));
        let (st, kept, _) = open(&mem);
        assert_eq!(kept, 5);
        assert_eq!(st.load("old-dev"), Some(old.clone()));
        // ... and moved to the new name by the next save.
        st.save(&session("old-dev", vec![6])).unwrap();
        let mut b = mem.clone();
        assert!(!has_files(&mut b, &hex("old-dev")), "old files deleted");
        let (st, _, _) = open(&mem);
        assert_eq!(st.load("old-dev").unwrap().qos2_in, vec![6]);
        // Both names present (a crash between the save and the delete):
        // the new one holds the newer state, the old files go next time.
        mem.set_file(&slot_name(&hex("old-dev"), 9), json_slot(9, &old));
        let (st, _, _) = open(&mem);
        assert_eq!(st.load("old-dev").unwrap().qos2_in, vec![6]);
        st.save(&session("old-dev", vec![7])).unwrap();
        assert!(!has_files(&mut b, &hex("old-dev")));
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
    }

    #[test]
    fn sessions_on_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let clock: Clock = Arc::new(|| NOW * 1000);
        let (st, _, _) = SessionStore::open(dir.path(), clock.clone()).unwrap();
        let s = full();
        for i in 0..3u16 {
            let mut s = s.clone();
            s.qos2_in = vec![i];
            st.save(&s).unwrap();
        }
        let names = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(names, 2, "two slot files");
        let (st, kept, _) = SessionStore::open(dir.path(), clock).unwrap();
        assert_eq!(kept, 1);
        assert_eq!(st.load(&s.client_id).unwrap().qos2_in, vec![2]);
        st.remove(&s.client_id).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn live_connections_of_another_user_are_not_taken_over() {
        let (admin, alice) = (Owner::User("admin".into()), Owner::User("alice".into()));
        let (st, _, _) = open(&MemBackend::new());
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
    }

    #[test]
    fn checkout_waits_for_checkin() {
        let (st, _, _) = open(&MemBackend::new());
        smol::block_on(async {
            assert!(st.checkout("a", Duration::from_secs(1)).await);
            assert!(!st.checkout("a", Duration::from_millis(20)).await);
            assert!(st.checkout("b", Duration::from_millis(20)).await);
            st.checkin("a");
            assert!(st.checkout("a", Duration::from_millis(20)).await);
        });
    }
}
