//! `[mqtt]`: the MQTT listeners and per-client limits.
//!
//! Invariant: `max_queued_bytes` and `max_retained_bytes` are at least
//! `max_packet_size`, so one largest message always fits.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::values::{de_duration, de_opt_size, de_size, non_empty};
use super::{
    err, ConfigError, DEFAULT_MAX_QUEUED_BYTES, DEFAULT_MAX_RETAINED, DEFAULT_MAX_RETAINED_BYTES,
    DEFAULT_MQTT_MAX_CONNECTIONS,
};
use crate::auth::Auth;

#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    /// `None` disables the MQTT TCP listener.
    pub listen: Option<String>,
    /// MQTT over WebSocket (subprotocol `mqtt`); `None`: off (the default).
    pub ws_listen: Option<String>,
    /// MQTT over TLS (needs `[tls]`); `None`: off (the default).
    pub tls_listen: Option<String>,
    /// MQTT over WebSocket over TLS (needs `[tls]`); `None`: off.
    pub wss_listen: Option<String>,
    pub max_packet_size: usize,
    pub max_connections: usize,
    /// Largest accepted client keep-alive (seconds); 0 from a client is
    /// allowed and means "no keep-alive".
    pub max_keep_alive: u16,
    /// A peer that opens a socket must send CONNECT within this time.
    pub connect_timeout: Duration,
    /// QoS 1 publishes from one client awaiting their PUBACK (stored but not
    /// yet acknowledged); further reads wait.
    pub max_inflight: usize,
    /// Messages queued for delivery to one subscriber before QoS 0 messages
    /// are dropped for it.
    pub max_queued: usize,
    /// Bytes of deliveries queued for one MQTT connection (in the router's
    /// channel and the session's queue together) before more are dropped
    /// for it; at least `max_packet_size`.
    pub max_queued_bytes: usize,
    /// Most retained messages (topics with one); a new one beyond it is
    /// refused (see [`crate::broker::retained`]).
    pub max_retained: usize,
    /// Most bytes of retained messages (records: topic, properties,
    /// payload, 11 bytes); at least `max_packet_size`.
    pub max_retained_bytes: u64,
    /// Longest a persistent session outlives its connection (MQTT 5
    /// session expiry is capped to it; 3.1.1 `clean_session = 0` sessions
    /// use it). 0 disables persistent sessions.
    pub max_session_expiry: Duration,
    /// `[auth]`; `None`: every client is accepted with every permission.
    pub auth: Option<Arc<Auth>>,
    /// Subscriptions one client may hold (0: unlimited); more are refused
    /// in the SUBACK (5.0: 0x97 quota exceeded; 3.1.1: 0x80).
    pub max_subscriptions: usize,
    /// Longest PUBLISH topic name or SUBSCRIBE filter, in bytes.
    pub max_topic_length: usize,
    /// Most levels (`/`-separated) in a topic name or filter.
    pub max_topic_levels: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMqtt {
    listen: String,
    ws_listen: Option<String>,
    tls_listen: Option<String>,
    wss_listen: Option<String>,
    #[serde(deserialize_with = "de_size")]
    max_packet_size: u64,
    max_connections: usize,
    #[serde(deserialize_with = "de_duration")]
    max_keep_alive: Duration,
    #[serde(deserialize_with = "de_duration")]
    connect_timeout: Duration,
    max_inflight: usize,
    max_queued: usize,
    /// `None`: [`DEFAULT_MAX_QUEUED_BYTES`], or `max_packet_size` if larger.
    #[serde(deserialize_with = "de_opt_size")]
    max_queued_bytes: Option<u64>,
    max_retained: usize,
    /// `None`: [`DEFAULT_MAX_RETAINED_BYTES`], or `max_packet_size` if larger.
    #[serde(deserialize_with = "de_opt_size")]
    max_retained_bytes: Option<u64>,
    #[serde(deserialize_with = "de_duration")]
    max_session_expiry: Duration,
    max_subscriptions: usize,
    #[serde(deserialize_with = "de_size")]
    max_topic_length: u64,
    max_topic_levels: usize,
}

impl Default for RawMqtt {
    fn default() -> Self {
        RawMqtt {
            listen: "127.0.0.1:1883".into(),
            ws_listen: None,
            tls_listen: None,
            wss_listen: None,
            max_packet_size: 1 << 20,
            max_connections: DEFAULT_MQTT_MAX_CONNECTIONS,
            max_keep_alive: Duration::from_secs(65_535),
            connect_timeout: Duration::from_secs(10),
            max_inflight: 1024,
            max_queued: 10_000,
            max_queued_bytes: None,
            max_retained: DEFAULT_MAX_RETAINED,
            max_retained_bytes: None,
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            max_subscriptions: 1000,
            max_topic_length: 4096,
            max_topic_levels: 64,
        }
    }
}

impl RawMqtt {
    /// Whether a TLS listener (`tls_listen` or `wss_listen`) is set.
    pub(super) fn wants_tls(&self) -> bool {
        [&self.tls_listen, &self.wss_listen]
            .iter()
            .any(|l| l.as_deref().is_some_and(|l| !l.is_empty()))
    }

    pub(super) fn validate(self) -> Result<MqttConfig, ConfigError> {
        if !(16..=268_435_455).contains(&self.max_packet_size) {
            return err("mqtt.max_packet_size: must be between 16 bytes and 256MiB");
        }
        if self.max_connections == 0 {
            return err("mqtt.max_connections: must be at least 1");
        }
        if self.max_inflight == 0 || self.max_inflight > 65_535 {
            return err("mqtt.max_inflight: must be between 1 and 65535");
        }
        if self.max_queued == 0 {
            return err("mqtt.max_queued: must be at least 1");
        }
        let max_queued_bytes = match self.max_queued_bytes {
            None => DEFAULT_MAX_QUEUED_BYTES.max(self.max_packet_size),
            Some(b) if b < self.max_packet_size => {
                return err(format!(
                    "mqtt.max_queued_bytes: must be at least mqtt.max_packet_size ({} bytes), so that one largest message can be queued",
                    self.max_packet_size
                ))
            }
            Some(b) => b,
        };
        if self.max_retained == 0 {
            return err("mqtt.max_retained: must be at least 1");
        }
        let max_retained_bytes = match self.max_retained_bytes {
            None => DEFAULT_MAX_RETAINED_BYTES.max(self.max_packet_size),
            Some(b) if b < self.max_packet_size => {
                return err(format!(
                    "mqtt.max_retained_bytes: must be at least mqtt.max_packet_size ({} bytes), so that one largest message can be retained",
                    self.max_packet_size
                ))
            }
            Some(b) => b,
        };
        let ka = self.max_keep_alive.as_secs();
        if ka == 0 || ka > 65_535 {
            return err("mqtt.max_keep_alive: must be between 1s and 65535s");
        }
        if self.connect_timeout.is_zero() {
            return err("mqtt.connect_timeout: must be more than 0");
        }
        if !(1..=65_535).contains(&self.max_topic_length) {
            return err("mqtt.max_topic_length: must be between 1 and 65535 bytes");
        }
        if self.max_topic_levels == 0 {
            return err("mqtt.max_topic_levels: must be at least 1");
        }
        Ok(MqttConfig {
            listen: non_empty(self.listen),
            ws_listen: self.ws_listen.and_then(non_empty),
            tls_listen: self.tls_listen.and_then(non_empty),
            wss_listen: self.wss_listen.and_then(non_empty),
            max_packet_size: self.max_packet_size as usize,
            max_connections: self.max_connections,
            max_keep_alive: ka as u16,
            connect_timeout: self.connect_timeout,
            max_inflight: self.max_inflight,
            max_queued: self.max_queued,
            max_queued_bytes: usize::try_from(max_queued_bytes).unwrap_or(usize::MAX),
            max_retained: self.max_retained,
            max_retained_bytes,
            max_session_expiry: self.max_session_expiry,
            auth: None,
            max_subscriptions: self.max_subscriptions,
            max_topic_length: self.max_topic_length as usize,
            max_topic_levels: self.max_topic_levels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

    #[test]
    fn byte_limits_for_queues_and_retained_messages() {
        let c = Config::parse(
            "[mqtt]\nmax_queued_bytes = \"2MiB\"\nmax_retained = 5\nmax_retained_bytes = \"3MiB\"\n[http]\nmax_connections = 3\nheader_timeout = \"1s\"\n",
        )
        .unwrap();
        assert_eq!(c.mqtt.max_queued_bytes, 2 << 20);
        assert_eq!(
            (c.mqtt.max_retained, c.mqtt.max_retained_bytes),
            (5, 3 << 20)
        );
        assert_eq!(
            (c.http.max_connections, c.http.header_timeout),
            (3, Duration::from_secs(1))
        );
        // Unset, they grow with a larger max_packet_size.
        let c = Config::parse("[mqtt]\nmax_packet_size = \"32MiB\"\n").unwrap();
        assert_eq!(c.mqtt.max_queued_bytes, 32 << 20);
        assert_eq!(c.mqtt.max_retained_bytes, 32 << 20);
        for (bad, key) in [
            (
                "[mqtt]\nmax_queued_bytes = \"512KiB\"\n",
                "mqtt.max_queued_bytes",
            ),
            (
                "[mqtt]\nmax_retained_bytes = 1000\n",
                "mqtt.max_retained_bytes",
            ),
            ("[mqtt]\nmax_retained = 0\n", "mqtt.max_retained"),
            ("[http]\nmax_connections = 0\n", "http.max_connections"),
            ("[http]\nheader_timeout = 0\n", "http.header_timeout"),
        ] {
            let e = Config::parse(bad).unwrap_err().0;
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn mqtt_client_limits() {
        let c = Config::parse(
            "[mqtt]\nmax_subscriptions = 0\nmax_topic_length = \"1KiB\"\nmax_topic_levels = 8\n",
        )
        .unwrap();
        assert_eq!(c.mqtt.max_subscriptions, 0);
        assert_eq!(c.mqtt.max_topic_length, 1024);
        assert_eq!(c.mqtt.max_topic_levels, 8);
        for bad in [
            "[mqtt]\nmax_topic_length = 0\n",
            "[mqtt]\nmax_topic_length = 70000\n",
            "[mqtt]\nmax_topic_levels = 0\n",
        ] {
            let e = Config::parse(bad).unwrap_err();
            assert!(e.0.contains("mqtt.max_topic"), "{e}");
        }
    }
}
