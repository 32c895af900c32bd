//! Durable will messages: a will survives a frond restart or power cut.
//!
//! Owns `<data_dir>/mqtt/wills/`, one atomic record
//! ([`crate::state::write_record`], postcard [`StoredWill`]) per client id
//! whose will is not settled yet, named after the SHA-256 of the client id
//! ([`file_stem`]), so any valid client id (up to 65,535 bytes) has a
//! file; the client id is inside, and a record holding another id is not
//! this client's. A file of an earlier version (named after the hex of
//! the id, [`legacy_stem`]) is still read at start and settled or removed
//! like the new one; the next save of that client id deletes it. Files of
//! earlier releases hold JSON; they are read, and rewritten in the current
//! encoding at their next save:
//! - armed when a connection with a will is accepted, before its CONNACK
//!   leaves (`due_ms` = 0: the connection is alive);
//! - rewritten with its due time when the connection ends abnormally and
//!   the will waits out an MQTT 5 will delay;
//! - removed when the will is discarded (clean DISCONNECT, the same client
//!   id connecting again) or once the published will is stored.
//!
//! At start, every record left is a will frond owes: its connection ended
//! with the crash (publish after its delay, counted from the start) or it
//! was waiting out its delay (publish at the due time, or now if that has
//! passed). So a will is published at least once, never lost; a crash
//! between publishing and removing the file publishes it again.
//!
//! Kept: topic (subject), payload, QoS, retain, delay, the MQTT 5 will
//! properties a published will carries ([`StoredProps`]: payload format,
//! message expiry, content type, response topic, correlation data, user
//! properties; absent from JSON files written before they were kept), and
//! who armed it ([`Owner`]). What a will means — built from and turned
//! back into the session's will, checked against `[auth]` — is the MQTT
//! code's (`broker::wills`); this module only keeps it.
//!
//! Invariants: a save that returned Ok survives a crash (atomic replace);
//! a record that does not check out is reported and deleted at start.
//! Methods block: call them through `smol::unblock`.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::sessions::{file_stem, legacy_stem, Owner};
use super::{decode, encode, read_record, write_record, Body, Disk};
use crate::store::backend::Backend;

/// The MQTT 5 will properties kept with a stored will.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StoredProps {
    pub payload_format: Option<u8>,
    /// Seconds the will lives once published.
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    /// Base64.
    pub correlation_data: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

/// One will as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredWill {
    pub client_id: String,
    /// The NATS subject the will is published to.
    pub subject: String,
    /// The payload, base64.
    pub payload: String,
    pub qos: u8,
    pub retain: bool,
    pub delay_ms: u64,
    /// Unix milliseconds at which the will is due; 0 while its connection
    /// is alive.
    pub due_ms: u64,
    /// Random per arming: a settled will removes its file only if the file
    /// still holds this arming (a newer connection may have armed its own).
    pub token: u64,
    /// MQTT 5 will properties, if any.
    #[serde(default)]
    pub props: Option<StoredProps>,
    /// Who armed it; `None` when frond ran without `[auth]` (and in files
    /// written before owners were kept).
    #[serde(default)]
    pub owner: Option<Owner>,
}

/// A will record, in the current encoding or the JSON of earlier versions.
fn decode_will(body: &Body) -> Result<StoredWill, String> {
    match body {
        Body::Current(b) => decode(b),
        Body::Json(j) => serde_json::from_slice(j).map_err(|e| format!("bad JSON: {e}")),
    }
}

/// The directory of unsettled wills.
pub struct WillStore {
    disk: Disk,
}

impl std::fmt::Debug for WillStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WillStore")
    }
}

impl WillStore {
    /// Open (create) the directory; returns the store and the wills owed
    /// from before.
    pub fn open(dir: &Path) -> io::Result<(WillStore, Vec<StoredWill>)> {
        WillStore::open_on(Disk::fs(dir)?)
    }

    /// [`WillStore::open`] on `disk`.
    pub fn open_on(disk: Disk) -> io::Result<(WillStore, Vec<StoredWill>)> {
        let mut b = disk.scratch()?;
        let mut owed = Vec::new();
        for name in b.list()? {
            if name.ends_with(".tmp") {
                b.remove(&name)?;
                continue;
            }
            let parsed = read_record(&mut *b, &name)
                .map_err(|e| e.to_string())
                .and_then(|r| r.ok_or_else(|| "vanished".to_string()))
                .and_then(|body| decode_will(&body));
            match parsed {
                Ok(w) => owed.push(w),
                Err(why) => {
                    log::warn!("mqtt: will file {name} is unreadable ({why}); deleted");
                    b.remove(&name)?;
                }
            }
        }
        b.sync_dir()?;
        Ok((WillStore { disk }, owed))
    }

    /// Store (replace) the will of `w.client_id`.
    pub fn save(&self, w: &StoredWill) -> io::Result<()> {
        let stem = file_stem(&w.client_id);
        let body = encode(w)?;
        let mut b = self.disk.lock(&stem);
        write_record(&mut **b, &stem, &body)?;
        if let Some(old) = legacy_stem(&w.client_id) {
            b.remove(&old)?;
        }
        Ok(())
    }

    /// Forget the will of `client_id` (absent is fine).
    pub fn remove(&self, client_id: &str) -> io::Result<()> {
        let stem = file_stem(client_id);
        let mut b = self.disk.lock(&stem);
        remove_both(&mut **b, client_id, &stem)
    }

    /// Forget the will of `client_id` if the file still holds arming
    /// `token` (it was settled; no newer connection armed its own).
    pub fn settle(&self, client_id: &str, token: u64) -> io::Result<()> {
        let stem = file_stem(client_id);
        let mut b = self.disk.lock(&stem);
        let b = &mut **b;
        let mut read = |name: &str| {
            read_record(b, name)
                .ok()
                .flatten()
                .and_then(|body| decode_will(&body).ok())
                .filter(|w| w.client_id == client_id)
        };
        let held = read(&stem).or_else(|| legacy_stem(client_id).and_then(|o| read(&o)));
        match held {
            Some(w) if w.token == token => remove_both(b, client_id, &stem),
            _ => Ok(()),
        }
    }
}

/// Delete the will files of `client_id` (new and old name).
fn remove_both(b: &mut dyn Backend, client_id: &str, stem: &str) -> io::Result<()> {
    if let Some(old) = legacy_stem(client_id) {
        b.remove(&old)?;
    }
    b.remove(stem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::sessions::hex;
    use crate::store::backend::MemBackend;

    pub(crate) fn mem_disk(mem: &MemBackend) -> Disk {
        let m = mem.clone();
        Disk::new(2, move || Ok(Box::new(m.clone()) as Box<dyn Backend>)).unwrap()
    }

    #[test]
    fn json_wills_of_earlier_releases_are_read_and_rewritten() {
        let mem = MemBackend::new();
        let json = br#"{"client_id":"old-dev","subject":"s","payload":"AAE=","qos":1,"retain":true,"delay_ms":5,"due_ms":0,"token":7,"props":{"content_type":"t"},"owner":{"user":"u"}}"#;
        mem.set_file(&hex("old-dev"), json.to_vec());
        mem.set_file(&file_stem("n"), br#"{"client_id":"n","subject":"s","payload":"","qos":0,"retain":false,"delay_ms":0,"due_ms":0,"token":1}"#.to_vec());
        mem.set_file("x.tmp", b"half".to_vec());
        let (store, mut owed) = WillStore::open_on(mem_disk(&mem)).unwrap();
        owed.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        assert_eq!(owed.len(), 2);
        assert_eq!(mem.file("x.tmp"), None, "temp files go");
        let w = owed[1].clone();
        assert_eq!((w.client_id.as_str(), w.token), ("old-dev", 7));
        assert_eq!(w.props.as_ref().unwrap().content_type.as_deref(), Some("t"));
        assert_eq!(w.owner, Some(Owner::User("u".into())));
        assert_eq!(owed[0].props, None);
        // The next save writes the current encoding under the new name.
        store.save(&w).unwrap();
        assert_eq!(mem.file(&hex("old-dev")), None);
        let rec = mem.file(&file_stem("old-dev")).unwrap();
        assert_eq!(&rec[..4], crate::state::REC_MAGIC);
        assert!(rec.len() < json.len());
        let (store, owed) = WillStore::open_on(mem_disk(&mem)).unwrap();
        assert!(owed.contains(&w));
        store.settle("old-dev", 7).unwrap();
        store.settle("n", 2).unwrap(); // another arming: kept
        assert_eq!(mem.names(), vec![file_stem("n")]);
    }
}
