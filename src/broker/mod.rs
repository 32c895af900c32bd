//! The MQTT session machine and the durable state of MQTT (sessions,
//! wills, retained messages), with the MQTT <-> NATS metadata bridge.
//!
//! The router that used to live here is [`crate::router`]; its items are
//! re-exported at this path for code that still imports them from here.

pub mod bridge;
pub mod persist;
pub mod retained;
// The MQTT machine moved to crate::mqtt; the old path stays while
// broker/wills.rs and doc links in persist.rs and server/mqtt.rs use it.
pub use crate::mqtt as session;
pub mod wills;

pub use crate::router::*;
