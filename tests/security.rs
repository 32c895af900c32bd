//! Authorization and resource limits probed as an attacker on the
//! gateway's network would probe them (issue 10): one test per finding,
//! each through real clients (rumqttc v5, async-nats, raw sockets) against
//! the real binary.
//!
//! Every test uses the same cast and streams ([`setup`]):
//! - alice: publish and subscribe `a.>` only;
//! - bob: `a.>` and `_INBOX.>`, both ways;
//! - dave: everything but `secret.>` (deny publish and subscribe);
//! - jsuser: may publish only `$JS.API.CONSUMER.*.A` and
//!   `$JS.API.CONSUMER.*.A.>` (subscribe: anything);
//! - admin: no limits.
//!
//! Streams: `A` captures `a.>`, `SEC` captures `secret.>` (plus the
//! harness's `TELEMETRY`). Anonymous clients are refused.
//!
//! The tests of each area live in `tests/security/<area>.rs`.

#![allow(dead_code)]

mod common;

#[path = "security/limits.rs"]
mod limits;
#[path = "security/model.rs"]
mod model;
#[path = "security/paths.rs"]
mod paths;
#[path = "security/reply.rs"]
mod reply;
#[path = "security/sessions.rs"]
mod sessions;

#[allow(unused_imports)]
use common::*;

/// The `[auth]` users and the two streams of every test here.
pub const SETUP: &str = r#"
[auth]
anonymous = false

[[auth.users]]
name = "alice"
password = "alice-pw"
allow_publish = ["a.>"]
allow_subscribe = ["a.>"]

[[auth.users]]
name = "bob"
password = "bob-pw"
allow_publish = ["a.>", "_INBOX.>"]
allow_subscribe = ["a.>", "_INBOX.>"]

[[auth.users]]
name = "dave"
password = "dave-pw"
deny_publish = ["secret.>"]
deny_subscribe = ["secret.>"]

[[auth.users]]
name = "jsuser"
password = "jsuser-pw"
allow_publish = ["$JS.API.CONSUMER.*.A", "$JS.API.CONSUMER.*.A.>"]

[[auth.users]]
name = "admin"
password = "admin-pw"

[[stream]]
name = "A"
subjects = ["a.>"]

[[stream]]
name = "SEC"
subjects = ["secret.>"]
"#;

/// Starts frond with [`SETUP`] plus `extra` (more TOML appended, e.g. a
/// `[[stream]]`) and `mqtt` (lines for the `[mqtt]` section).
pub async fn setup_with(extra: &str, mqtt: &str) -> Frond {
    Frond::start_new(FrondSpec {
        extra_config: format!("{SETUP}\n{extra}"),
        mqtt_config: mqtt.to_string(),
        ..Default::default()
    })
    .await
}

/// Starts frond with [`SETUP`].
pub async fn setup() -> Frond {
    setup_with("", "").await
}

/// The password of a user of [`SETUP`] (`<name>-pw`).
pub fn password(user: &str) -> String {
    format!("{user}-pw")
}

/// An async-nats client logged in as `user`.
pub async fn nats_as(f: &Frond, user: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password(user))
        .connect(format!("127.0.0.1:{}", f.nats_port))
        .await
        .unwrap_or_else(|e| panic!("{user} connects over NATS: {e}"))
}

/// Messages stored in `stream` (from the JetStream API, as admin).
pub async fn stream_count(f: &Frond, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(nats_as(f, "admin").await);
    let mut s = js
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"));
    s.info().await.expect("stream info").state.messages
}
