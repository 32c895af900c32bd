//! `[nats]`: the NATS client port and its limits.
//!
//! Invariant: `max_pending` is at least `max_payload`.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::values::{de_duration, de_size, non_empty};
use super::{err, ConfigError, DEFAULT_NATS_MAX_CONNECTIONS};
use crate::auth::Auth;

/// `[nats]`: the NATS client port.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsConfig {
    /// `None` disables the NATS listener.
    pub listen: Option<String>,
    /// Largest PUB/HPUB a client may send (advertised in INFO).
    pub max_payload: usize,
    /// Bytes queued for one client before it is disconnected as a slow
    /// consumer.
    pub max_pending: usize,
    pub max_connections: usize,
    pub max_control_line: usize,
    /// Subscriptions per connection (0: unlimited).
    pub max_subscriptions: usize,
    pub ping_interval: Duration,
    /// Unanswered PINGs before the connection is closed as stale.
    pub max_pings_out: u32,
    /// `[auth]` (the same as `mqtt.auth`).
    pub auth: Option<Arc<Auth>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawNats {
    listen: String,
    #[serde(deserialize_with = "de_size")]
    max_payload: u64,
    #[serde(deserialize_with = "de_size")]
    max_pending: u64,
    max_connections: usize,
    #[serde(deserialize_with = "de_size")]
    max_control_line: u64,
    max_subscriptions: usize,
    #[serde(deserialize_with = "de_duration")]
    ping_interval: Duration,
    max_pings_out: u32,
}

impl Default for RawNats {
    /// nats-server's defaults, except a bound on subscriptions.
    fn default() -> Self {
        RawNats {
            listen: "127.0.0.1:4222".into(),
            max_payload: 1 << 20,
            max_pending: 64 << 20,
            max_connections: DEFAULT_NATS_MAX_CONNECTIONS,
            max_control_line: 4096,
            max_subscriptions: 100_000,
            ping_interval: Duration::from_secs(120),
            max_pings_out: 2,
        }
    }
}

impl RawNats {
    pub(super) fn validate(self) -> Result<NatsConfig, ConfigError> {
        if !(1..=64 << 20).contains(&self.max_payload) {
            return err("nats.max_payload: must be between 1 byte and 64MiB");
        }
        if self.max_pending < self.max_payload {
            return err("nats.max_pending: must be at least nats.max_payload");
        }
        if self.max_connections == 0 {
            return err("nats.max_connections: must be at least 1");
        }
        if !(256..=1 << 20).contains(&self.max_control_line) {
            return err("nats.max_control_line: must be between 256 bytes and 1MiB");
        }
        if self.ping_interval.is_zero() {
            return err("nats.ping_interval: must be more than 0");
        }
        if self.max_pings_out == 0 {
            return err("nats.max_pings_out: must be at least 1");
        }
        Ok(NatsConfig {
            listen: non_empty(self.listen),
            max_payload: self.max_payload as usize,
            max_pending: usize::try_from(self.max_pending).unwrap_or(usize::MAX),
            max_connections: self.max_connections,
            max_control_line: self.max_control_line as usize,
            max_subscriptions: self.max_subscriptions,
            ping_interval: self.ping_interval,
            max_pings_out: self.max_pings_out,
            auth: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

    #[test]
    fn nats_section() {
        let c = Config::parse(
            "[nats]\nlisten = \"0.0.0.0:4333\"\nmax_payload = \"64KiB\"\nmax_pending = \"1MiB\"\nping_interval = \"30s\"\n",
        )
        .unwrap();
        assert_eq!(c.nats.listen.as_deref(), Some("0.0.0.0:4333"));
        assert_eq!((c.nats.max_payload, c.nats.max_pending), (65_536, 1 << 20));
        assert_eq!(c.nats.ping_interval, Duration::from_secs(30));
        let off = Config::parse("[nats]\nlisten = \"\"\n").unwrap();
        assert_eq!(off.nats.listen, None);
        for bad in [
            "[nats]\nmax_payload = 0\n",
            "[nats]\nmax_payload = \"1MiB\"\nmax_pending = \"64KiB\"\n",
            "[nats]\nping_interval = 0\n",
            "[nats]\nnope = 1\n",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
    }
}
