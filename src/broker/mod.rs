//! What is left of the old `broker/` after the restructure of issue 11:
//! the MQTT-facing rules around durable state that are neither the
//! protocol machine ([`crate::mqtt`]) nor the records ([`crate::state`]):
//! the reply-inbox table and request/reply redirect ([`bridge`]), who owns
//! a stored session ([`persist`]: `claim`), a stored will's meaning and
//! authorization ([`wills`]) and retained-message expiry ([`retained`]).
//! The router that used to live here is [`crate::router`].
//!
//! Still to do: these four belong with their users (ingest, the MQTT shell,
//! state), and the module should then go.

pub mod bridge;
pub mod persist;
pub mod retained;
pub mod wills;
