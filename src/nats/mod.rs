//! The NATS client protocol, server side: one connection's sans-IO state
//! machine ([`Conn`]). The socket shell that drives it is
//! [`crate::server::nats`]; the bytes are [`crate::wire::nats`].
//!
//! Nothing here reads a clock, touches a socket or panics on peer input.

mod conn;

pub use conn::{Conn, Event, Limits, MAX_TRACKED_REPLIES};
