//! `[http]`: the monitoring endpoint.

use std::time::Duration;

use serde::Deserialize;

use super::values::{de_duration, non_empty};
use super::{err, ConfigError, DEFAULT_HTTP_MAX_CONNECTIONS};

#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// `None` disables the monitoring endpoint.
    pub listen: Option<String>,
    /// Connections served at once; more are closed at once (a short 503
    /// if the socket takes it without waiting).
    pub max_connections: usize,
    /// The request head must arrive within this time (and the answer be
    /// written within it again), else the connection is closed.
    pub header_timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHttp {
    listen: String,
    max_connections: usize,
    #[serde(deserialize_with = "de_duration")]
    header_timeout: Duration,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            listen: "127.0.0.1:8222".into(),
            max_connections: DEFAULT_HTTP_MAX_CONNECTIONS,
            header_timeout: Duration::from_secs(5),
        }
    }
}

impl RawHttp {
    pub(super) fn validate(self) -> Result<HttpConfig, ConfigError> {
        if self.max_connections == 0 {
            return err("http.max_connections: must be at least 1");
        }
        if self.header_timeout.is_zero() {
            return err("http.header_timeout: must be more than 0");
        }
        Ok(HttpConfig {
            listen: non_empty(self.listen),
            max_connections: self.max_connections,
            header_timeout: self.header_timeout,
        })
    }
}
