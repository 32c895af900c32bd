//! Persistent MQTT session state: one small file per session.
//!
//! Owns `<data_dir>/mqtt/sessions/`, one file per persistent session named
//! after the hex of its client id. A file is JSON ([`StoredSession`]):
//! client id, protocol version, subscriptions (NATS filters, as the router
//! holds them, with their granted QoS), the expiry interval, the time of
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
//! - A file is replaced atomically (temp file, fsync, rename, directory
//!   fsync): after a crash it holds either the old or the new state, never
//!   a mix. A file that does not parse is reported and ignored (the session
//!   starts fresh), never fatal.
//! - At most one connection holds a session at a time
//!   ([`SessionStore::checkout`] / [`SessionStore::checkin`]): a reconnecting
//!   or taking-over client waits until the previous connection has written
//!   its final state, so nothing it acknowledged is lost or redone.
//! - Methods that touch files block: call them through `smol::unblock`.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
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

/// Everything a persistent session keeps between connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    pub client_id: String,
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
}

pub(crate) fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

impl SessionStore {
    /// Open (create) the directory and delete expired sessions; returns the
    /// store and how many sessions were kept and expired.
    pub fn open(dir: &Path) -> io::Result<(SessionStore, usize, usize)> {
        fs::create_dir_all(dir)?;
        let now = unix_now();
        let (mut kept, mut expired) = (0, 0);
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            match read(&path) {
                Some(mut s) if s.disconnected_at == 0 => {
                    // Connected when frond stopped: it disconnected now.
                    s.disconnected_at = now.max(1);
                    kept += 1;
                    write(dir, &path, &s)?;
                }
                Some(s) if !s.expired(now) => kept += 1,
                Some(_) => {
                    expired += 1;
                    fs::remove_file(&path)?;
                }
                None => {}
            }
        }
        let store = SessionStore {
            dir: dir.to_path_buf(),
            busy: Mutex::new(HashSet::new()),
            released: event_listener::Event::new(),
        };
        Ok((store, kept, expired))
    }

    fn path(&self, client_id: &str) -> PathBuf {
        self.dir.join(hex(client_id))
    }

    /// The stored session of `client_id`, if any and not expired (an
    /// expired one is deleted).
    pub fn load(&self, client_id: &str) -> Option<StoredSession> {
        let path = self.path(client_id);
        let s = read(&path)?;
        if s.client_id != client_id {
            log::warn!(
                "mqtt: session file {} names another client; ignored",
                path.display()
            );
            return None;
        }
        if s.expired(unix_now()) {
            log::info!("mqtt: session of {client_id} expired; starting fresh");
            let _ = fs::remove_file(&path);
            return None;
        }
        Some(s)
    }

    /// Write `s` atomically and durably.
    pub fn save(&self, s: &StoredSession) -> io::Result<()> {
        write(&self.dir, &self.path(&s.client_id), s)
    }

    /// Delete the stored session of `client_id` (durably); fine if none.
    pub fn remove(&self, client_id: &str) -> io::Result<()> {
        match fs::remove_file(self.path(client_id)) {
            Ok(()) => File::open(&self.dir)?.sync_all(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
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
