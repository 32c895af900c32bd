//! MQTT session ownership, and the old path of the session store: the
//! store itself is [`crate::state::sessions`] (re-exported here for the
//! code that still imports it from `broker`).
//!
//! Owns [`claim`]: what a connecting client may do with the stored session
//! of its client id, judged against the current `[auth]` (kept out of
//! `state/`, which knows nothing of users).

pub use crate::state::sessions::*;

/// The clock the session store judges expiry on.
pub fn clock() -> crate::state::Clock {
    std::sync::Arc::new(|| crate::util::unix_nanos() / 1_000_000)
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

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
