//! Listeners: the thin async shell between sockets and the sans-IO
//! protocol machines. Each submodule owns one listener.

pub mod accept;
pub mod driver;
pub mod http;
pub mod jsapi;
pub mod mqtt;
pub mod nats;
pub mod outbound;
pub mod transport;
pub mod ws;
