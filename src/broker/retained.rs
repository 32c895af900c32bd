//! The old path of the retained message store, [`crate::state::retained`]
//! (re-exported here for the code that still imports it from `broker`),
//! and what that store needs from the MQTT side: the clock and the
//! message expiry of a header block ([`env`]).

pub use crate::state::retained::*;

/// The MQTT 5 message expiry (seconds) in a NATS header block.
pub fn expiry_secs(headers: &[u8]) -> Option<u32> {
    super::bridge::headers_to_meta(Some(headers), None).expiry
}

/// The live environment of the retained store: the wall clock and
/// [`expiry_secs`].
pub fn env() -> RetainedEnv {
    RetainedEnv {
        now_ms: std::sync::Arc::new(|| crate::util::unix_nanos() / 1_000_000),
        expiry_secs,
    }
}
