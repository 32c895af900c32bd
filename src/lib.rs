//! frond: a small-footprint edge broker.
//!
//! MQTT devices and NATS programs publish into crash-safe local streams;
//! streams are mirrored exactly once to a NATS JetStream hub. See
//! `README.md` for the user view and `../shared/DESIGN.md` for the contract.
//!
//! Layout (each module's doc says what it owns and its invariants):
//! - [`config`]: the TOML configuration, defaults and validation.
//! - [`subject`]: NATS subject syntax, wildcard matching, MQTT topic mapping.
//! - [`wire`]: pure codecs (MQTT, NATS client protocol); no I/O, never panic.
//! - [`store`]: the raw segmented, checksummed log (append, read, remove,
//!   compaction, recovery, per-subject index); imports only [`subject`].
//! - [`stream`]: the JetStream rules as a sans-IO [`stream::Stream`] on the
//!   store, consumers, and the owner thread that gives group commit.
//! - [`router`]: who subscribes to what; hands each message to its
//!   subscribers and says which stream captures it.
//! - [`ingest`]: the one sans-IO publish path (MQTT, NATS, wills): mapping,
//!   reply redirects, routing, capture, in-order acknowledgements.
//! - [`nats`]: the NATS connection state machine.
//! - [`broker`]: MQTT's durable state (sessions, wills, retained).
//! - [`mqtt`]: the sans-IO MQTT protocol machine (one per connection).
//! - [`close`]: why a protocol machine closes its connection.
//! - [`server`]: listeners (MQTT, NATS, HTTP monitoring) — the thin smol
//!   shell: one accept loop, transports, the connection loops — and the
//!   JetStream API service for local streams.
//! - [`uplink`]: the hub link: NATS client, mirror-up state machine.

#![forbid(unsafe_code)]

pub mod auth;
pub mod bench;
pub mod broker;
pub mod close;
pub mod config;
pub mod ingest;
pub mod logger;
pub mod mqtt;
pub mod nats;
pub mod nkey;
pub use stream::oneshot;
pub mod router;
pub mod run;
pub mod server;
pub mod state;
pub mod store;
pub mod stream;
pub mod subject;
pub mod tls;
pub mod uplink;
pub mod util;
pub mod wire;
