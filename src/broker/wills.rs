//! What a stored will means to the MQTT code, and the old path of the will
//! store: the store itself is [`crate::state::wills`] (re-exported here for
//! the code that still imports it from `broker`).
//!
//! Owns the conversions between the session's will
//! ([`crate::mqtt::WillMessage`]) and its record, and the
//! authorization of a restored will (issue 10): a will is a publish by its
//! client, checked against that user's publish permissions. The CONNECT
//! that carries one the user may not publish is refused
//! ([`crate::mqtt`]). A will left from the last run is checked
//! again at start against the current `[auth]` ([`StoredWill::authorized`]),
//! since the operator may have narrowed the user's permissions or removed
//! the user: one that is no longer allowed, or that has no recorded owner
//! while `[auth]` is on (written by an older frond, or while `[auth]` was
//! off), is deleted with a warning instead of published.

use std::time::Duration;

pub use crate::state::wills::*;

use super::persist::Owner;
use crate::auth::Auth;
use crate::mqtt::WillMessage;
use crate::subject::mqtt as topics;
use crate::wire::mqtt::Properties;
use crate::wire::nats::base64;

/// Unix milliseconds now (the shell's clock).
pub fn unix_ms() -> u64 {
    crate::util::unix_nanos() / 1_000_000
}

impl StoredProps {
    /// The properties worth keeping, or `None` when there are none (the
    /// will delay is stored on its own).
    pub fn from_props(p: &Properties) -> Option<StoredProps> {
        let s = StoredProps {
            payload_format: p.payload_format_indicator,
            message_expiry: p.message_expiry_interval,
            content_type: p.content_type.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.as_deref().map(base64::encode),
            user_properties: p.user_properties.clone(),
        };
        (s != StoredProps::default()).then_some(s)
    }

    /// Back to will properties (a correlation data that is not base64 is
    /// dropped).
    pub fn to_props(&self) -> Properties {
        Properties {
            payload_format_indicator: self.payload_format,
            message_expiry_interval: self.message_expiry,
            content_type: self.content_type.clone(),
            response_topic: self.response_topic.clone(),
            correlation_data: self
                .correlation_data
                .as_ref()
                .and_then(|c| base64::decode(c.as_bytes()).ok()),
            user_properties: self.user_properties.clone(),
            ..Properties::default()
        }
    }
}

impl StoredWill {
    pub fn new(client_id: &str, w: &WillMessage) -> StoredWill {
        StoredWill {
            client_id: client_id.to_string(),
            subject: w.subject.clone(),
            payload: base64::encode(&w.payload),
            qos: w.qos,
            retain: w.retain,
            delay_ms: u64::try_from(w.delay.as_millis()).unwrap_or(u64::MAX),
            due_ms: 0,
            token: fastrand::u64(..),
            props: w.props.as_deref().and_then(StoredProps::from_props),
            owner: w.owner.clone(),
        }
    }

    /// Whether this will may still be published under `auth` (the current
    /// `[auth]`; `None`: everyone may publish anything): its owner must
    /// still exist and may publish to its subject, and subscribe to its
    /// response topic if it has one (a reply to it would otherwise reach
    /// a subject the owner may not read). `Err` says why not.
    pub fn authorized(&self, auth: Option<&Auth>) -> Result<(), String> {
        let Some(auth) = auth else { return Ok(()) };
        let (who, perms) = match &self.owner {
            None => {
                return Err(
                    "it records no owner (armed while [auth] was off, or by an older frond), so its permission cannot be checked".into(),
                )
            }
            Some(Owner::Anonymous) if !auth.anonymous => {
                return Err("it was armed by an anonymous client and anonymous clients are no longer allowed".into())
            }
            Some(Owner::Anonymous) => ("anonymous clients".to_string(), &auth.anonymous_permissions),
            Some(Owner::User(name)) => match auth.users.iter().find(|u| u.name == *name) {
                Some(u) => (format!("user {name:?}"), &u.permissions),
                None => return Err(format!("its user {name:?} no longer exists")),
            },
        };
        if !perms.can_publish(&self.subject) {
            return Err(format!("{who} may no longer publish to {}", self.subject));
        }
        let response = self
            .props
            .as_ref()
            .and_then(|p| p.response_topic.as_deref());
        if let Some(rt) = response {
            let rs = topics::topic_to_subject(rt);
            if !perms.can_subscribe(&rs) {
                return Err(format!(
                    "{who} may no longer subscribe to its response topic {rt}"
                ));
            }
        }
        Ok(())
    }

    /// The will to publish, its delay being what remains at `now_ms`.
    pub fn owed(&self, now_ms: u64) -> Option<WillMessage> {
        let payload = base64::decode(self.payload.as_bytes()).ok()?;
        let wait_ms = if self.due_ms == 0 {
            self.delay_ms
        } else {
            self.due_ms.saturating_sub(now_ms)
        };
        Some(WillMessage {
            subject: self.subject.clone(),
            payload,
            qos: self.qos.min(2),
            retain: self.retain,
            delay: Duration::from_millis(wait_ms),
            props: self
                .props
                .as_ref()
                .map(|p| Box::new(p.to_props()))
                .filter(|p| !p.is_empty()),
            owner: self.owner.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn will(delay_ms: u64) -> WillMessage {
        WillMessage {
            subject: "dev.status".into(),
            payload: b"\x00gone\xff".to_vec(),
            qos: 1,
            retain: true,
            delay: Duration::from_millis(delay_ms),
            props: None,
            owner: None,
        }
    }

    #[test]
    fn owed_wills_come_back_with_their_remaining_delay() {
        let dir = tempfile::tempdir().unwrap();
        let (store, owed) = WillStore::open(dir.path()).unwrap();
        assert!(owed.is_empty());
        // Alive at the crash: the full delay from the start.
        store.save(&StoredWill::new("a", &will(5_000))).unwrap();
        // Waiting out its delay, long due: now.
        let mut b = StoredWill::new("b", &will(5_000));
        b.due_ms = 1;
        store.save(&b).unwrap();
        // Discarded.
        store.save(&StoredWill::new("c", &will(0))).unwrap();
        store.remove("c").unwrap();
        store.remove("never-there").unwrap();
        std::fs::write(dir.path().join("junk"), b"{").unwrap();
        drop(store);

        let (store, mut owed) = WillStore::open(dir.path()).unwrap();
        owed.sort_by(|x, y| x.client_id.cmp(&y.client_id));
        assert_eq!(owed.len(), 2, "{owed:?}");
        let now = unix_ms();
        let a = owed[0].owed(now).unwrap();
        assert_eq!(owed[0].client_id, "a");
        assert_eq!(a.delay, Duration::from_millis(5_000));
        assert_eq!(a.payload, b"\x00gone\xff");
        assert!(a.retain && a.qos == 1);
        assert_eq!(owed[1].client_id, "b");
        assert_eq!(owed[1].owed(now).unwrap().delay, Duration::ZERO);
        assert!(
            !dir.path().join("junk").exists(),
            "a corrupt file is deleted"
        );

        assert_eq!(a.props, None);

        // Settling with another arming's token leaves the file alone.
        store.settle("a", owed[0].token.wrapping_add(1)).unwrap();
        assert_eq!(WillStore::open(dir.path()).unwrap().1.len(), 2);
        store.settle("a", owed[0].token).unwrap();
        assert_eq!(WillStore::open(dir.path()).unwrap().1.len(), 1);
    }

    #[test]
    fn restored_wills_are_checked_against_the_current_auth() {
        use crate::auth::{Permissions, Secret, User};
        use std::sync::Arc;
        let user = |name: &str, allow: &[&str]| User {
            name: name.into(),
            secret: Secret::parse("pw"),
            permissions: Arc::new(Permissions {
                allow_publish: allow.iter().map(|s| s.to_string()).collect(),
                allow_subscribe: allow.iter().map(|s| s.to_string()).collect(),
                ..Permissions::default()
            }),
        };
        let auth = Auth {
            anonymous: false,
            anonymous_permissions: Arc::new(Permissions::default()),
            users: vec![user("alice", &["dev.>"]), user("bob", &["other.>"])],
        };
        let stored = |owner: Option<Owner>| {
            let mut w = will(0);
            w.owner = owner;
            StoredWill::new("c", &w)
        };
        let alice = stored(Some(Owner::User("alice".into())));
        assert_eq!(alice.authorized(Some(&auth)), Ok(()));
        assert_eq!(alice.authorized(None), Ok(()), "no [auth]: anything");
        for (w, why) in [
            (
                stored(Some(Owner::User("bob".into()))),
                "may no longer publish",
            ),
            (
                stored(Some(Owner::User("carol".into()))),
                "no longer exists",
            ),
            (stored(Some(Owner::Anonymous)), "anonymous"),
            (stored(None), "no owner"),
        ] {
            let e = w.authorized(Some(&auth)).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
        // Anonymous clients, when allowed, use their permissions.
        let open = Auth {
            anonymous: true,
            ..auth.clone()
        };
        assert_eq!(
            stored(Some(Owner::Anonymous)).authorized(Some(&open)),
            Ok(())
        );
        // The response topic must still be readable by the owner.
        let mut w = will(0);
        w.owner = Some(Owner::User("alice".into()));
        w.props = Some(Box::new(Properties {
            response_topic: Some("secret/replies".into()),
            ..Properties::default()
        }));
        let e = StoredWill::new("c", &w)
            .authorized(Some(&auth))
            .unwrap_err();
        assert!(e.contains("response topic"), "{e}");
        // The owner survives the file; files without one still load.
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = WillStore::open(dir.path()).unwrap();
        store.save(&alice).unwrap();
        let (_, owed) = WillStore::open(dir.path()).unwrap();
        assert_eq!(owed[0].owner, Some(Owner::User("alice".into())));
        assert_eq!(
            owed[0].owed(unix_ms()).unwrap().owner,
            Some(Owner::User("alice".into()))
        );
        // JSON files of earlier releases keep theirs.
        let json = r#"{"client_id":"c","subject":"s","payload":"","qos":0,"retain":false,"delay_ms":0,"due_ms":0,"token":1,"owner":"anonymous"}"#;
        let w: StoredWill = serde_json::from_str(json).unwrap();
        assert_eq!(w.owner, Some(Owner::Anonymous));
    }

    #[test]
    fn any_client_id_has_a_will_file_and_old_names_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = WillStore::open(dir.path()).unwrap();
        let long = format!("../ü/{}", "x".repeat(65_000));
        let w = StoredWill::new(&long, &will(0));
        store.save(&w).unwrap();
        // A will of an earlier version, under the hex of its id.
        let old = StoredWill::new("old-dev", &will(0));
        std::fs::write(
            dir.path().join(super::super::persist::hex("old-dev")),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        let (store, mut owed) = WillStore::open(dir.path()).unwrap();
        owed.sort_by_key(|x| x.client_id.len());
        assert_eq!(owed.len(), 2);
        assert_eq!(owed[0].client_id, "old-dev");
        assert_eq!(owed[1].client_id, long);
        // Settled under either name.
        store.settle("old-dev", old.token).unwrap();
        store.settle(&long, w.token).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A new arming of an old client id replaces the old file.
        std::fs::write(
            dir.path().join(super::super::persist::hex("old-dev")),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        store.save(&StoredWill::new("old-dev", &will(0))).unwrap();
        let (_, owed) = WillStore::open(dir.path()).unwrap();
        assert_eq!(owed.len(), 1);
        assert_ne!(owed[0].token, old.token);
    }

    #[test]
    fn will_properties_survive_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = WillStore::open(dir.path()).unwrap();
        let mut w = will(0);
        let props = Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(30),
            content_type: Some("text/plain".into()),
            response_topic: Some("resp/x".into()),
            correlation_data: Some(vec![0, 1, 0xff]),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            will_delay_interval: Some(9),
            ..Properties::default()
        };
        w.props = Some(Box::new(props.clone()));
        store.save(&StoredWill::new("p", &w)).unwrap();
        // Only a will delay: nothing else to keep.
        let mut bare = will(0);
        bare.props = Some(Box::new(Properties {
            will_delay_interval: Some(5),
            ..Properties::default()
        }));
        store.save(&StoredWill::new("q", &bare)).unwrap();
        let (_, mut owed) = WillStore::open(dir.path()).unwrap();
        owed.sort_by(|x, y| x.client_id.cmp(&y.client_id));
        let got = owed[0].owed(unix_ms()).unwrap().props.unwrap();
        let want = Properties {
            will_delay_interval: None,
            ..props
        };
        assert_eq!(*got, want);
        assert_eq!(owed[1].props, None);
        assert_eq!(owed[1].owed(unix_ms()).unwrap().props, None);
        // A file from before properties were kept loads without them.
        let old = br#"{"client_id":"o","subject":"s","payload":"","qos":0,"retain":false,"delay_ms":0,"due_ms":0,"token":1}"#;
        let parsed: StoredWill = serde_json::from_slice(old).unwrap();
        assert_eq!(parsed.props, None);
        assert_eq!(parsed.owner, None);
    }
}
