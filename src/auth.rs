//! Client authentication and subject permissions (the `[auth]` section),
//! shared by MQTT and NATS clients.
//!
//! Owns: the user table (names, bcrypt or plain-text secrets), the
//! anonymous policy, and the permission checks on NATS subjects (an MQTT
//! topic `a/b` is checked as subject `a.b`).
//!
//! NATS clients may instead prove an nkey (`[[auth.users]]` with `nkey =
//! "U…"`): `INFO` then carries a random nonce, and `CONNECT` must carry
//! the public key and its Ed25519 signature of that nonce (see
//! [`crate::nkey`]). MQTT `CONNECT` has no way to sign a nonce, so nkey
//! users cannot log in over MQTT.
//!
//! Semantics follow nats-server:
//! - An empty allow list allows everything; a deny entry always wins.
//! - Publish: the literal subject must match an allow filter and no deny
//!   filter.
//! - `allow_responses`: the client may publish to the reply subject of a
//!   request it received, at most `max` times (default 1) within `expires`
//!   (default 2 minutes) of receiving it, even where the publish lists say
//!   no. Setting it without `allow_publish` denies every other publish
//!   (an explicit `allow_publish` still applies). NATS clients only; the
//!   per-connection bookkeeping lives in the NATS connection machine.
//! - Subscribe: a filter is allowed when it lies inside an allow filter
//!   (every subject it can match is matched by that allow filter, e.g.
//!   `a.*` inside `a.>`, but not `a.>` inside `a.*`), and refused when it
//!   lies inside a deny filter. A wildcard filter that only partly overlaps
//!   a deny filter is accepted, and the denied subjects are filtered out at
//!   delivery ([`Permissions::may_deliver`]) — nats-server does the same.
//!
//! Invariants:
//! - Passwords are compared in constant time (bcrypt via the `bcrypt`
//!   crate's `subtle` comparison, plain text here); a wrong user name and a
//!   wrong password give the same answer.
//! - Nothing here logs or prints a secret (`Debug` hides it).
//!
//! bcrypt verification costs 2^cost rounds on the connecting task (cost 10
//! is tens of milliseconds on an ARM gateway); keep the cost modest.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::subject;
use crate::subject::filter_within;

/// What a client may publish and subscribe to (NATS subjects / filters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub allow_publish: Vec<String>,
    pub deny_publish: Vec<String>,
    pub allow_subscribe: Vec<String>,
    pub deny_subscribe: Vec<String>,
    /// `allow_responses` (nats-server semantics, see the module doc).
    pub responses: Option<ResponsePermission>,
}

/// How often and how long a client may answer a request it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsePermission {
    /// Publishes per received reply subject (at least 1).
    pub max: u64,
    /// How long after the request arrived (non-zero).
    pub expires: Duration,
}

impl ResponsePermission {
    /// nats-server's defaults: one response within two minutes.
    pub const DEFAULT_MAX: u64 = 1;
    pub const DEFAULT_EXPIRES: Duration = Duration::from_secs(120);
}

impl Default for ResponsePermission {
    fn default() -> Self {
        ResponsePermission {
            max: Self::DEFAULT_MAX,
            expires: Self::DEFAULT_EXPIRES,
        }
    }
}

impl Permissions {
    /// May a message be published to the literal `subject` by the publish
    /// lists? (A reply under `allow_responses` is checked by the caller.)
    pub fn can_publish(&self, subject: &str) -> bool {
        let no_list_allows = self.allow_publish.is_empty() && self.responses.is_none();
        (no_list_allows
            || self
                .allow_publish
                .iter()
                .any(|f| subject::matches(f, subject)))
            && !self
                .deny_publish
                .iter()
                .any(|f| subject::matches(f, subject))
    }

    /// May the client subscribe to `filter` (a NATS filter)?
    pub fn can_subscribe(&self, filter: &str) -> bool {
        (self.allow_subscribe.is_empty()
            || self
                .allow_subscribe
                .iter()
                .any(|a| filter_within(filter, a)))
            && !self.deny_subscribe.iter().any(|d| filter_within(filter, d))
    }

    /// May a message on `subject` be delivered through an (accepted)
    /// subscription? False only when a deny-subscribe filter matches it.
    pub fn may_deliver(&self, subject: &str) -> bool {
        !self
            .deny_subscribe
            .iter()
            .any(|d| subject::matches(d, subject))
    }

    /// Everything allowed: no checks needed.
    pub fn is_unrestricted(&self) -> bool {
        self.allow_publish.is_empty()
            && self.deny_publish.is_empty()
            && self.allow_subscribe.is_empty()
            && self.deny_subscribe.is_empty()
            && self.responses.is_none()
    }
}

/// A stored secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// A `$2a$`, `$2b$` or `$2y$` bcrypt hash.
    Bcrypt(String),
    /// A plain-text password (accepted, warned about at start-up).
    Plain(String),
    /// A user's Ed25519 public key (an nkey user; no password matches).
    Nkey([u8; 32]),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Bcrypt(_) => f.write_str("Bcrypt(..)"),
            Secret::Plain(_) => f.write_str("Plain(..)"),
            Secret::Nkey(k) => write!(f, "Nkey({})", crate::nkey::encode_user_public(k)),
        }
    }
}

impl Secret {
    /// A bcrypt hash when `s` looks like one, plain text otherwise.
    pub fn parse(s: &str) -> Secret {
        let is_hash = s.len() == 60
            && (s.starts_with("$2a$") || s.starts_with("$2b$") || s.starts_with("$2y$"));
        if is_hash {
            Secret::Bcrypt(s.to_string())
        } else {
            Secret::Plain(s.to_string())
        }
    }

    /// Does `password` match? Constant time in the password's content.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            Secret::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
            Secret::Plain(p) => ct_eq(p.as_bytes(), password),
            Secret::Nkey(_) => false,
        }
    }
}

/// Constant-time equality (the length is not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub secret: Secret,
    pub permissions: Arc<Permissions>,
}

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown user or wrong password (MQTT 0x04 / 0x86).
    BadCredentials,
    /// No credentials and anonymous clients are not allowed (MQTT 0x05 /
    /// 0x87).
    NotAuthorized,
}

/// The `[auth]` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Clients without credentials are accepted (with
    /// `anonymous_permissions`).
    pub anonymous: bool,
    pub anonymous_permissions: Arc<Permissions>,
    pub users: Vec<User>,
}

impl Auth {
    /// Check a client's credentials; on success, its permissions.
    /// `user = None` is an anonymous client (a password alone is refused).
    pub fn authenticate(
        &self,
        user: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Arc<Permissions>, Refusal> {
        let Some(name) = user else {
            return if self.anonymous && password.is_none() {
                Ok(self.anonymous_permissions.clone())
            } else if password.is_some() {
                Err(Refusal::BadCredentials)
            } else {
                Err(Refusal::NotAuthorized)
            };
        };
        let pass = password.unwrap_or_default();
        match self.users.iter().find(|u| u.name == name) {
            Some(u) if u.secret.verify(pass) => Ok(u.permissions.clone()),
            Some(_) => Err(Refusal::BadCredentials),
            None => {
                // Spend the same time as for a known user.
                let _ = self.users.first().map(|u| u.secret.verify(pass));
                Err(Refusal::BadCredentials)
            }
        }
    }

    /// Start-up warnings for the operator (plain-text passwords).
    pub fn warnings(&self) -> Vec<String> {
        self.users
            .iter()
            .filter(|u| matches!(u.secret, Secret::Plain(_)))
            .map(|u| {
                format!(
                    "auth: user {:?} has a plain-text password; store a bcrypt hash instead (e.g. from `htpasswd -nbBC 10 \"\" PASSWORD`)",
                    u.name
                )
            })
            .collect()
    }

    /// Are there nkey users (then `INFO` must carry a nonce)?
    pub fn has_nkeys(&self) -> bool {
        self.users
            .iter()
            .any(|u| matches!(u.secret, Secret::Nkey(_)))
    }

    /// A NATS client's nkey proof: `nkey` (a user public key `U…`) and
    /// `sig` (base64url Ed25519 signature of the `nonce` sent in `INFO`).
    pub fn authenticate_nkey(
        &self,
        nkey: &str,
        sig: &str,
        nonce: &str,
    ) -> Result<Arc<Permissions>, Refusal> {
        let Ok(key) = crate::nkey::decode_user_public(nkey) else {
            return Err(Refusal::BadCredentials);
        };
        let user = self
            .users
            .iter()
            .find(|u| matches!(&u.secret, Secret::Nkey(k) if *k == key));
        match user {
            Some(u) if crate::nkey::verify(&key, nonce.as_bytes(), sig) => {
                Ok(u.permissions.clone())
            }
            _ => Err(Refusal::BadCredentials),
        }
    }

    /// A NATS `auth_token`: accepted when it is the password of a user
    /// (that user's permissions apply).
    pub fn authenticate_token(&self, token: &str) -> Result<Arc<Permissions>, Refusal> {
        self.users
            .iter()
            .find(|u| u.secret.verify(token.as_bytes()))
            .map(|u| u.permissions.clone())
            .ok_or(Refusal::BadCredentials)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(ap: &[&str], dp: &[&str], asub: &[&str], ds: &[&str]) -> Permissions {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        Permissions {
            allow_publish: v(ap),
            deny_publish: v(dp),
            allow_subscribe: v(asub),
            deny_subscribe: v(ds),
            responses: None,
        }
    }

    #[test]
    fn allow_responses_denies_other_publishes_unless_listed() {
        let mut p = perms(&[], &[], &[], &[]);
        p.responses = Some(ResponsePermission::default());
        assert!(!p.is_unrestricted());
        assert!(!p.can_publish("anything"), "implicit deny");
        p.allow_publish = vec!["events.>".into()];
        assert!(p.can_publish("events.x"), "explicit allow still applies");
        assert!(!p.can_publish("other"));
    }

    #[test]
    fn publish_allow_and_deny() {
        let p = perms(&["telemetry.>", "x.*"], &["telemetry.secret"], &[], &[]);
        assert!(p.can_publish("telemetry.a.b"));
        assert!(p.can_publish("x.y"));
        assert!(!p.can_publish("x.y.z"));
        assert!(!p.can_publish("telemetry.secret"));
        assert!(!p.can_publish("other"));
        let all = Permissions::default();
        assert!(all.can_publish("anything.at.all"));
        assert!(all.is_unrestricted());
        let deny_only = perms(&[], &["a.>"], &[], &[]);
        assert!(deny_only.can_publish("b"));
        assert!(!deny_only.can_publish("a.b"));
    }

    #[test]
    fn subscribe_wildcards_must_lie_inside_allow() {
        let p = perms(&[], &[], &["cmd.s1.>", "cfg.*"], &[]);
        assert!(p.can_subscribe("cmd.s1.>"));
        assert!(p.can_subscribe("cmd.s1.*"));
        assert!(p.can_subscribe("cmd.s1.a.b"));
        assert!(p.can_subscribe("cmd.s1.*.b"));
        assert!(!p.can_subscribe("cmd.>"));
        assert!(!p.can_subscribe("cmd.*.x"));
        assert!(!p.can_subscribe("cmd.s1"));
        assert!(p.can_subscribe("cfg.*"));
        assert!(p.can_subscribe("cfg.a"));
        assert!(!p.can_subscribe("cfg.>"));
        assert!(!p.can_subscribe(">"));
    }

    #[test]
    fn subscribe_deny_wins_and_partial_overlap_filters_at_delivery() {
        let p = perms(&[], &[], &[], &["test.nosubscribe", "secret.>"]);
        assert!(!p.can_subscribe("test.nosubscribe"));
        assert!(!p.can_subscribe("secret.a"));
        assert!(!p.can_subscribe("secret.>"));
        // Partly overlapping wildcards are accepted; delivery filters.
        assert!(p.can_subscribe("test.*"));
        assert!(p.can_subscribe(">"));
        assert!(!p.may_deliver("test.nosubscribe"));
        assert!(!p.may_deliver("secret.x.y"));
        assert!(p.may_deliver("test.ok"));
        let both = perms(&[], &[], &["a.>"], &["a.b"]);
        assert!(!both.can_subscribe("a.b"));
        assert!(both.can_subscribe("a.c"));
    }

    // A published bcrypt test vector (OpenBSD / jBCrypt test suite):
    // password "U*U", salt "CCCCCCCCCCCCCCCCCCCCC.", cost 5.
    const VECTOR: &str = "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW";

    #[test]
    fn bcrypt_vectors_verify() {
        let s = Secret::parse(VECTOR);
        assert!(matches!(s, Secret::Bcrypt(_)));
        assert!(s.verify(b"U*U"));
        assert!(!s.verify(b"U*V"));
        assert!(!s.verify(b""));
        // $2b$ and $2y$ prefixes hash the same for short passwords.
        for prefix in ["$2b$", "$2y$"] {
            let h = format!("{prefix}{}", &VECTOR[4..]);
            assert!(Secret::parse(&h).verify(b"U*U"), "{h}");
        }
        // A malformed hash never verifies (and does not panic).
        assert!(!Secret::Bcrypt("$2b$99$xx".into()).verify(b"U*U"));
        assert!(format!("{s:?}").contains(".."));
        assert!(!format!("{s:?}").contains("CCCC"));
    }

    #[test]
    fn plain_text_and_users() {
        let auth = Auth {
            anonymous: false,
            anonymous_permissions: Arc::new(Permissions::default()),
            users: vec![User {
                name: "sensor-1".into(),
                secret: Secret::parse("s3cret"),
                permissions: Arc::new(perms(&["t.>"], &[], &[], &[])),
            }],
        };
        assert!(auth.authenticate(Some("sensor-1"), Some(b"s3cret")).is_ok());
        assert_eq!(
            auth.authenticate(Some("sensor-1"), Some(b"s3creT")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.authenticate(Some("nobody"), Some(b"s3cret")),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(auth.authenticate(None, None), Err(Refusal::NotAuthorized));
        assert!(auth.authenticate_token("s3cret").is_ok());
        assert!(auth.authenticate_token("nope").is_err());
        let anon = Auth {
            anonymous: true,
            ..auth
        };
        assert!(anon.authenticate(None, None).is_ok());
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
