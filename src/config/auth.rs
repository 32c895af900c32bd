//! `[auth]`: users, passwords or nkeys, and their publish/subscribe/response permissions, validated into [`crate::auth::Auth`].

use std::sync::Arc;

use serde::Deserialize;

use super::values::parse_duration;
use super::{err, ConfigError};
use crate::auth::{Auth, Permissions, ResponsePermission, Secret, User};
use crate::subject;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(default)]
    anonymous: bool,
    #[serde(default)]
    anonymous_permissions: RawPermissions,
    #[serde(default)]
    users: Vec<RawUser>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPermissions {
    #[serde(default)]
    allow_publish: Vec<String>,
    #[serde(default)]
    allow_subscribe: Vec<String>,
    #[serde(default)]
    deny_publish: Vec<String>,
    #[serde(default)]
    deny_subscribe: Vec<String>,
    #[serde(default)]
    allow_responses: Option<RawResponses>,
}

/// `allow_responses = true` or `allow_responses = { max = 1, expires = "2m" }`.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum RawResponses {
    Flag(bool),
    Limits(RawResponseLimits),
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResponseLimits {
    #[serde(default)]
    max: u64,
    #[serde(default)]
    expires: Option<String>,
}

impl RawResponses {
    pub(super) fn validate(self, key: &str) -> Result<Option<ResponsePermission>, ConfigError> {
        match self {
            RawResponses::Flag(false) => Ok(None),
            RawResponses::Flag(true) => Ok(Some(ResponsePermission::default())),
            RawResponses::Limits(RawResponseLimits { max, expires }) => {
                let mut r = ResponsePermission::default();
                if max > 0 {
                    r.max = max;
                }
                if let Some(e) = expires {
                    let d = parse_duration(&e).map_err(|why| {
                        ConfigError(format!("{key}.allow_responses.expires: {why}"))
                    })?;
                    // 0 means the default, as in nats-server.
                    if !d.is_zero() {
                        r.expires = d;
                    }
                }
                Ok(Some(r))
            }
        }
    }
}

/// A user: its credentials and, in the same table, the keys of
/// [`RawPermissions`] (spelled out again rather than `flatten`ed: serde
/// cannot combine `flatten` with `deny_unknown_fields`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUser {
    /// Optional for nkey users (their public key is used in logs).
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    /// A user public key `U…` (NATS clients only) instead of a password.
    nkey: Option<String>,
    #[serde(default)]
    allow_publish: Vec<String>,
    #[serde(default)]
    allow_subscribe: Vec<String>,
    #[serde(default)]
    deny_publish: Vec<String>,
    #[serde(default)]
    deny_subscribe: Vec<String>,
    #[serde(default)]
    allow_responses: Option<RawResponses>,
}

impl RawPermissions {
    pub(super) fn validate(self, key: &str) -> Result<Permissions, ConfigError> {
        let lists = [
            ("allow_publish", &self.allow_publish),
            ("allow_subscribe", &self.allow_subscribe),
            ("deny_publish", &self.deny_publish),
            ("deny_subscribe", &self.deny_subscribe),
        ];
        for (name, list) in lists {
            if let Some(bad) = list.iter().find(|f| !subject::valid_filter(f)) {
                return err(format!(
                    "{key}.{name}: {bad:?} is not a valid NATS subject filter (tokens separated by '.', '*' or a final '>'; MQTT topic a/b is subject a.b)"
                ));
            }
        }
        let responses = match self.allow_responses {
            Some(r) => r.validate(key)?,
            None => None,
        };
        Ok(Permissions {
            allow_publish: self.allow_publish,
            deny_publish: self.deny_publish,
            allow_subscribe: self.allow_subscribe,
            deny_subscribe: self.deny_subscribe,
            responses,
        })
    }
}

impl RawAuth {
    pub(super) fn validate(self) -> Result<Auth, ConfigError> {
        let anonymous_permissions = Arc::new(
            self.anonymous_permissions
                .validate("auth.anonymous_permissions")?,
        );
        let mut users: Vec<User> = Vec::new();
        for (i, mut u) in self.users.into_iter().enumerate() {
            let key = format!("auth.users[{i}] ({:?})", u.name);
            let nkey = match &u.nkey {
                Some(_) if !u.password.is_empty() => {
                    return err(format!(
                        "{key}: give either password or nkey, not both"
                    ))
                }
                Some(k) => match crate::nkey::decode_user_public(k) {
                    Ok(raw) => {
                        if u.name.is_empty() {
                            u.name = k.clone();
                        }
                        Some(raw)
                    }
                    Err(e) => {
                        return err(format!(
                            "{key}.nkey: {e}; give the user's public key (56 characters starting with 'U', e.g. from `nsc describe user` or `nk -gen user -pubout`), never its seed"
                        ))
                    }
                },
                None => None,
            };
            if u.name.is_empty() {
                return err(format!("{key}.name: must not be empty"));
            }
            if users.iter().any(|x| x.name == u.name) {
                return err(format!("{key}.name: user {:?} is defined twice", u.name));
            }
            if nkey.is_some()
                && users
                    .iter()
                    .any(|x| matches!(&x.secret, Secret::Nkey(k) if Some(*k) == nkey))
            {
                return err(format!("{key}.nkey: this public key is defined twice"));
            }
            if nkey.is_none() && u.password.is_empty() {
                return err(format!(
                    "{key}.password: must not be empty (or give nkey = \"U…\" for a NATS nkey user)"
                ));
            }
            let secret = match nkey {
                Some(k) => Secret::Nkey(k),
                None => Secret::parse(&u.password),
            };
            if matches!(&secret, Secret::Plain(p) if p.starts_with("$2")) {
                return err(format!(
                    "{key}.password: looks like a bcrypt hash but is not one ($2a$/$2b$/$2y$, cost, then 53 characters); check for truncation"
                ));
            }
            let permissions = RawPermissions {
                allow_publish: u.allow_publish,
                allow_subscribe: u.allow_subscribe,
                deny_publish: u.deny_publish,
                deny_subscribe: u.deny_subscribe,
                allow_responses: u.allow_responses,
            };
            users.push(User {
                permissions: Arc::new(permissions.validate(&key)?),
                name: u.name,
                secret,
            });
        }
        if !self.anonymous && users.is_empty() {
            return err("[auth]: no [[auth.users]] and anonymous = false would refuse every client; add a user or set anonymous = true");
        }
        Ok(Auth {
            anonymous: self.anonymous,
            anonymous_permissions,
            users,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::*;

    #[test]
    fn a_user_key_that_is_no_permission_is_refused_by_name() {
        let e = Config::parse(
            "[auth]\n[[auth.users]]\nname = \"a\"\npassword = \"p\"\nalow_publish = [\"x\"]\n",
        )
        .unwrap_err();
        assert!(e.0.contains("auth.users[0]"), "{e}");
        assert!(e.0.contains("alow_publish"), "{e}");
        let e = Config::parse(
            "[auth]\n[[auth.users]]\nname = \"a\"\npassword = \"p\"\nallow_publish = \"x\"\n",
        )
        .unwrap_err();
        assert!(e.0.contains("allow_publish"), "wrong type named: {e}");
    }

    #[test]
    fn auth_section() {
        assert!(Config::parse("").unwrap().mqtt.auth.is_none());
        let c = Config::parse(
            r#"
[auth]
[auth.anonymous_permissions]
deny_subscribe = ["test.nosubscribe"]
[[auth.users]]
name = "sensor-1"
password = "$2b$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"
allow_publish = ["telemetry.sensor-1.>"]
allow_subscribe = ["cmd.sensor-1.>"]
[[auth.users]]
name = "plain"
password = "pw"
"#,
        )
        .unwrap();
        let a = c.mqtt.auth.clone().unwrap();
        assert_eq!(c.nats.auth, c.mqtt.auth);
        assert!(!a.anonymous);
        assert_eq!(a.users.len(), 2);
        assert_eq!(a.warnings().len(), 1);
        let p = a.authenticate(Some("sensor-1"), Some(b"U*U")).unwrap();
        assert!(p.can_publish("telemetry.sensor-1.x"));
        assert!(!p.can_publish("telemetry.sensor-2.x"));
        for bad in [
            "[auth]\n",
            "[auth]\nanonymous = true\n[auth.anonymous_permissions]\nallow_publish = [\"a..b\"]\n",
            "[auth]\n[[auth.users]]\nname = \"a\"\npassword = \"$2b$10$short\"\n",
            "[auth]\n[[auth.users]]\nname = \"a\"\npassword = \"x\"\n[[auth.users]]\nname = \"a\"\npassword = \"y\"\n",
            "[auth]\n[[auth.users]]\nname = \"a\"\npassword = \"x\"\nallow = []\n",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
        assert!(Config::parse("[auth]\nanonymous = true\n").is_ok());
    }

    #[test]
    fn auth_nkey_users() {
        use crate::nkey::SeedKey;
        let seed = SeedKey::from_bytes([5u8; 32]);
        let public = seed.public_key();
        let c = Config::parse(&format!(
            "[auth]\n[[auth.users]]\nnkey = \"{public}\"\nallow_publish = [\"a.>\"]\n[[auth.users]]\nname = \"plain\"\npassword = \"pw\"\n"
        ))
        .unwrap();
        let a = c.nats.auth.unwrap();
        assert!(a.has_nkeys());
        assert_eq!(a.users[0].name, public, "the key names an unnamed user");
        let nonce = "abc";
        let p = a
            .authenticate_nkey(&public, &seed.sign(nonce.as_bytes()), nonce)
            .unwrap();
        assert!(p.can_publish("a.b") && !p.can_publish("b"));
        assert!(a
            .authenticate_nkey(&public, &seed.sign(b"other"), nonce)
            .is_err());
        // An nkey user has no password (also not over MQTT).
        assert!(a.authenticate(Some(&public), Some(b"")).is_err());
        assert!(a.authenticate_token("").is_err());
        let seed_text = seed.encode();
        let mut bad_sum = public.clone().into_bytes();
        bad_sum[5] = if bad_sum[5] == b'A' { b'B' } else { b'A' };
        let bad_sum = String::from_utf8(bad_sum).unwrap();
        for bad in [
            format!("[auth]\n[[auth.users]]\nnkey = \"{seed_text}\"\n"),
            format!("[auth]\n[[auth.users]]\nnkey = \"{bad_sum}\"\n"),
            format!("[auth]\n[[auth.users]]\nnkey = \"{public}\"\npassword = \"x\"\n"),
            format!("[auth]\n[[auth.users]]\nnkey = \"{public}\"\n[[auth.users]]\nname = \"b\"\nnkey = \"{public}\"\n"),
            "[auth]\n[[auth.users]]\nname = \"a\"\n".to_string(),
        ] {
            assert!(Config::parse(&bad).is_err(), "{bad}");
        }
        let e = Config::parse(&format!("[auth]\n[[auth.users]]\nnkey = \"{seed_text}\"\n"))
            .unwrap_err();
        assert!(!e.to_string().contains(&seed_text[4..]), "{e}");
    }

    #[test]
    fn allow_responses_forms() {
        let user = |extra: &str| {
            Config::parse(&format!(
                "[auth]\n[[auth.users]]\nname = \"svc\"\npassword = \"pw\"\n{extra}\n"
            ))
            .map(|c| c.nats.auth.unwrap().users[0].permissions.responses)
        };
        assert_eq!(user("").unwrap(), None);
        assert_eq!(user("allow_responses = false").unwrap(), None);
        assert_eq!(
            user("allow_responses = true").unwrap(),
            Some(ResponsePermission {
                max: 1,
                expires: Duration::from_secs(120)
            })
        );
        assert_eq!(
            user("allow_responses = { max = 5, expires = \"1s\" }").unwrap(),
            Some(ResponsePermission {
                max: 5,
                expires: Duration::from_secs(1)
            })
        );
        // 0 means the default, as in nats-server.
        assert_eq!(
            user("allow_responses = { max = 0 }").unwrap(),
            Some(ResponsePermission::default())
        );
        assert!(user("allow_responses = { expires = \"soon\" }").is_err());
        assert!(user("allow_responses = \"yes\"").is_err());
        assert!(user("allow_responses = { maxx = 2 }").is_err());
    }
}
