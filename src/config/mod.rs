//! The TOML configuration: every key, its default, and validation.
//!
//! Owns: parsing `frond.toml` into [`Config`], the embedded defaults used when
//! no file is given, and every check that can be made before start-up.
//!
//! Invariants:
//! - Unknown keys and wrong types are errors (serde `deny_unknown_fields`);
//!   the error names the key and, through the TOML parser, the line.
//! - A [`Config`] returned by [`Config::parse`] is valid: stream names are
//!   unique and well formed, stream subjects are valid and do not overlap,
//!   every mirror names a configured stream, sizes and durations are in
//!   range. Later code never re-validates.
//! - `max_storage` (optional, top level) is a budget for all file streams
//!   and the MQTT retained messages: the configured `max_bytes` of file
//!   streams plus twice `mqtt.max_retained_bytes` (the retained log holds
//!   at most about twice its live bytes before it is compacted) must sum
//!   to at most the budget, and every file stream without `max_bytes` gets
//!   an equal share of what is left (at least 64 KiB each, or start-up is
//!   refused). Memory streams do not count: each must set `max_bytes`, and
//!   theirs together fit in `max_memory`. The budget bounds message bytes
//!   as `max_bytes` does; index, snapshot and tombstone files come on top
//!   (a few percent).
//! - Per-client memory is bounded in bytes as well as in messages:
//!   `mqtt.max_queued_bytes` (deliveries waiting for one MQTT connection)
//!   is at least `mqtt.max_packet_size`, as `nats.max_pending` is at least
//!   `nats.max_payload`, so one largest message always fits.
//! - Connection limits default to values that, with the descriptors
//!   streams and files need, fit the shipped systemd unit's
//!   `LimitNOFILE=8192` ([`crate::run`] checks the real limit at start).
//! - `encryption_key_file` (optional, top level) is read at validation: a
//!   bad or missing key file is a configuration error. With it, every file
//!   stream encrypts new records unless it sets `encrypt = false`;
//!   `encrypt = true` without a key file is an error.
//! - Sizes accept integers (bytes) or strings such as `"512MiB"`; durations
//!   accept integers (seconds) or strings such as `"100ms"`, `"30s"`, `"7d"`.
//!
//! Layout: one file per section (`mqtt`, `nats`, `http`, `tls`, `auth`,
//! `streams`, `uplink`, `mappings`), each holding the section's public
//! type, its serde shape and its checks; `values` parses sizes and
//! durations. This file holds [`Config`], the top-level keys and the checks
//! that span sections (TLS listeners, stream overlap, the storage budget).

mod auth;
pub mod creds;
mod de;
mod http;
mod mappings;
mod mqtt;
mod nats;
mod streams;
mod tls;
mod uplink;
mod values;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::store::crypt::Key;
use crate::stream::StreamConfig;
use crate::subject;
use crate::subject::mapping::Mappings;

pub use http::HttpConfig;
pub use mqtt::MqttConfig;
pub use nats::NatsConfig;
pub use streams::MIN_STREAM_SHARE;
pub use tls::TlsFiles;
pub use uplink::{
    parse_hub_url, BridgeSubject, HubUrl, MirrorConfig, SourceConfig, SourceStart, UplinkConfig,
};
pub use values::{parse_duration, parse_size};

use auth::RawAuth;
use http::RawHttp;
use mappings::{validate_mappings, RawMappingDest};
use mqtt::RawMqtt;
use nats::RawNats;
use streams::{apply_storage_budget, default_dup_window, stream_limits, RawStream};
use tls::RawTls;
use uplink::{host_name, RawUplink};
use values::{de_opt_size, de_size};

/// The name of the stream that captures everything when no `[[stream]]` is
/// configured.
pub const DEFAULT_STREAM: &str = "DEFAULT";

/// Default `max_streams`: each stream costs a writer thread, a few
/// descriptors and files, so a client allowed `STREAM.CREATE` cannot
/// exhaust them.
pub const DEFAULT_MAX_STREAMS: usize = 256;
/// Most `max_streams` accepted.
pub const MAX_MAX_STREAMS: usize = 4096;
/// Default `max_memory`: the memory streams' `max_bytes` together.
pub const DEFAULT_MAX_MEMORY: u64 = 64 << 20;

/// Most network threads (`threads`).
pub const MAX_THREADS: usize = 64;

/// Default `mqtt.max_connections`. With [`DEFAULT_NATS_MAX_CONNECTIONS`],
/// [`DEFAULT_HTTP_MAX_CONNECTIONS`] and the descriptors the streams and
/// files need, it fits the shipped systemd unit's `LimitNOFILE=8192`.
pub const DEFAULT_MQTT_MAX_CONNECTIONS: usize = 4096;
/// Default `nats.max_connections` (the NATS port serves local programs).
pub const DEFAULT_NATS_MAX_CONNECTIONS: usize = 1024;
/// Default `http.max_connections` (monitoring scrapers, `frond status`).
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 64;
/// Default `mqtt.max_queued_bytes`: 8 MiB per connection holds eight
/// largest (1 MiB) messages, or the whole `max_queued` count of messages
/// up to 800 bytes, while one subscriber that stops reading costs a
/// 256 MB board at most that (raised to `max_packet_size` if larger).
pub const DEFAULT_MAX_QUEUED_BYTES: u64 = 8 << 20;
/// Default `mqtt.max_retained`: the last value of 10,000 topics; the
/// in-memory index costs about 100 bytes plus the topic per message.
pub const DEFAULT_MAX_RETAINED: usize = 10_000;
/// Default `mqtt.max_retained_bytes` (on disk; payloads are read from
/// there when a subscription needs them, never all held in memory).
pub const DEFAULT_MAX_RETAINED_BYTES: u64 = 16 << 20;

/// A configuration error, worded for the operator.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's name; default: the host name.
    pub node: String,
    pub data_dir: PathBuf,
    /// Budget for all file streams' `max_bytes` (0: none); already applied
    /// to [`Config::streams`].
    pub max_storage: u64,
    /// Streams at most, frond.toml's and those created over the API
    /// (`max_streams`, default [`DEFAULT_MAX_STREAMS`]).
    pub max_streams: usize,
    /// Budget for the memory streams' `max_bytes` (`max_memory`, default
    /// [`DEFAULT_MAX_MEMORY`]); a memory stream created over the API must
    /// set `max_bytes` and fit in what frond.toml's memory streams leave.
    pub max_memory: u64,
    pub log: String,
    /// Threads that run the network tasks (`threads`, default 1). One
    /// thread gives the lowest latency (a request and its reply never
    /// cross threads); more spread many publishing connections over more
    /// cores. Stream writers have their own threads either way.
    pub threads: usize,
    pub mqtt: MqttConfig,
    pub nats: NatsConfig,
    pub http: HttpConfig,
    /// `[tls]`: the server certificate for `mqtt.tls_listen` and
    /// `mqtt.wss_listen`.
    pub tls: Option<TlsFiles>,
    pub streams: Vec<StreamConfig>,
    pub uplink: Option<UplinkConfig>,
    /// `[mappings]`: subject rewrites applied to every incoming publish.
    pub mappings: Mappings,
}

impl Config {
    /// The embedded defaults (what `frond run` uses with no file).
    pub fn defaults() -> Config {
        Config::parse("").unwrap_or_else(unreachable_defaults)
    }

    /// Parse and validate a configuration file's text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = de::from_str(text).map_err(ConfigError)?;
        raw.validate()
    }

    /// Read and parse a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        Config::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }
}

#[cold]
fn unreachable_defaults(e: ConfigError) -> Config {
    // The empty document is always valid; a failure here is a bug in this
    // file, caught by the `defaults_are_valid` test.
    panic!("embedded default configuration is invalid: {e}")
}

// ---------------------------------------------------------------------------
// The raw, serde-facing shape of the file.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Option<String>,
    data_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_size")]
    max_storage: u64,
    max_streams: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_size")]
    max_memory: Option<u64>,
    encryption_key_file: Option<PathBuf>,
    log: Option<String>,
    threads: Option<usize>,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default)]
    nats: RawNats,
    #[serde(default)]
    http: RawHttp,
    tls: Option<RawTls>,
    auth: Option<RawAuth>,
    #[serde(default)]
    stream: Vec<RawStream>,
    uplink: Option<RawUplink>,
    #[serde(default)]
    mappings: std::collections::BTreeMap<String, RawMappingDest>,
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let tls = self.tls.map(RawTls::validate);
        let wants_tls = self.mqtt.wants_tls();
        if wants_tls && tls.is_none() {
            return err("mqtt.tls_listen/wss_listen: need a [tls] section with cert and key");
        }
        if !wants_tls && tls.is_some() {
            return err("[tls]: no TLS listener uses it; set mqtt.tls_listen or mqtt.wss_listen (or remove [tls])");
        }
        let node = match self.node {
            Some(n) => n,
            None => host_name(),
        };
        if node.is_empty()
            || !node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return err(format!(
                "node: {node:?} must be non-empty and use only letters, digits, '-' and '_' (it is part of message ids on the hub)"
            ));
        }
        let log = self.log.unwrap_or_else(|| "info".into());
        if crate::logger::parse_level(&log).is_none() {
            return err(format!(
                "log: {log:?} is not a level; use error, warn, info, debug or trace"
            ));
        }
        let mut mqtt = self.mqtt.validate()?;
        let mut nats = self.nats.validate()?;
        let http = self.http.validate()?;
        let key = match &self.encryption_key_file {
            None => None,
            Some(p) => Some(
                Key::from_file(p).map_err(|e| ConfigError(format!("encryption_key_file: {e}")))?,
            ),
        };
        let mut streams = Vec::new();
        if self.stream.is_empty() {
            streams.push(StreamConfig {
                // With a budget, the catch-all stream gets all of it.
                max_bytes: if self.max_storage > 0 { 0 } else { 1 << 30 },
                duplicate_window: default_dup_window(),
                encrypt: key.is_some(),
                key: key.clone(),
                ..StreamConfig::new(DEFAULT_STREAM, &[">"])
            });
        }
        for (i, s) in self.stream.into_iter().enumerate() {
            streams.push(s.validate(i, key.as_ref())?);
        }
        for (i, a) in streams.iter().enumerate() {
            for b in &streams[..i] {
                if a.name == b.name {
                    return err(format!("stream {:?} is configured twice", a.name));
                }
                for sa in &a.subjects {
                    for sb in &b.subjects {
                        if subject::filters_overlap(sa, sb) {
                            return err(format!(
                                "stream {:?} subject {sa:?} overlaps stream {:?} subject {sb:?}; a message may be captured by one stream only",
                                a.name, b.name
                            ));
                        }
                    }
                }
            }
        }
        let (max_streams, max_memory) = stream_limits(self.max_streams, self.max_memory, &streams)?;
        apply_storage_budget(
            self.max_storage,
            mqtt.max_retained_bytes.saturating_mul(2),
            &mut streams,
        )?;
        let uplink = match self.uplink {
            None => None,
            Some(u) => Some(u.validate(&streams)?),
        };
        let mappings = validate_mappings(self.mappings)?;
        let threads = self.threads.unwrap_or(1);
        if !(1..=MAX_THREADS).contains(&threads) {
            return err(format!(
                "threads = {threads}: must be 1 to {MAX_THREADS} (about one per core; 1 is the default)"
            ));
        }
        if let Some(a) = self.auth {
            let a = Arc::new(a.validate()?);
            mqtt.auth = Some(a.clone());
            nats.auth = Some(a);
        }
        Ok(Config {
            node,
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from("./frond-data")),
            max_storage: self.max_storage,
            max_streams,
            max_memory,
            log,
            threads,
            mqtt,
            nats,
            http,
            tls,
            streams,
            uplink,
            mappings,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stream::{Discard, SyncPolicy};

    #[test]
    fn defaults_are_valid() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.mqtt.listen.as_deref(), Some("127.0.0.1:1883"));
        assert_eq!(c.nats.listen.as_deref(), Some("127.0.0.1:4222"));
        assert_eq!(c.nats.max_payload, 1 << 20);
        assert_eq!(c.data_dir, PathBuf::from("./frond-data"));
        assert_eq!(c.streams.len(), 1);
        assert_eq!(c.streams[0].subjects, vec![">".to_string()]);
        assert_eq!(c.streams[0].sync, SyncPolicy::Always);
        assert!(c.uplink.is_none());
        assert_eq!(c.mqtt.max_subscriptions, 1000);
        assert_eq!(c.mqtt.max_topic_length, 4096);
        assert_eq!(c.mqtt.max_topic_levels, 64);
        assert_eq!(c.mqtt.max_queued_bytes, 8 << 20);
        assert_eq!(
            (c.mqtt.max_retained, c.mqtt.max_retained_bytes),
            (10_000, 16 << 20)
        );
        assert_eq!(
            (c.http.max_connections, c.http.header_timeout),
            (64, Duration::from_secs(5))
        );
        assert_eq!(
            (c.mqtt.max_connections, c.nats.max_connections),
            (4096, 1024)
        );
    }

    #[test]
    fn threads_in_range() {
        assert_eq!(Config::parse("").unwrap().threads, 1);
        assert_eq!(Config::parse("threads = 2").unwrap().threads, 2);
        let e = Config::parse("threads = 0").unwrap_err().to_string();
        assert!(e.contains("threads = 0"), "{e}");
        assert!(Config::parse("threads = 65").is_err());
    }

    #[test]
    fn full_example_parses() {
        let c = Config::parse(
            r#"
node = "truck-042"
data_dir = "/var/lib/frond"
log = "debug"
[mqtt]
listen = "0.0.0.0:1883"
[http]
listen = "127.0.0.1:8222"
[[stream]]
name = "TELEMETRY"
subjects = ["telemetry.>"]
sync = "100ms"
max_msgs = 1000000
max_bytes = "512MiB"
max_age = "7d"
discard = "new"
duplicate_window = "2m"
[uplink]
urls = ["nats://hub-1:4222", "nats://u:p@hub-2"]
user = "truck-042"
password = "x"
[[uplink.mirror]]
stream = "TELEMETRY"
to = "FLEET"
subject_prefix = "fleet.truck-042."
"#,
        )
        .unwrap();
        let s = &c.streams[0];
        assert_eq!(s.max_bytes, 512 << 20);
        assert_eq!(s.max_age, Duration::from_secs(7 * 86_400));
        assert_eq!(s.sync, SyncPolicy::Interval(Duration::from_millis(100)));
        assert_eq!(s.discard, Discard::New);
        let u = c.uplink.unwrap();
        assert_eq!(u.urls[1].host, "hub-2");
        assert_eq!(u.urls[1].port, 4222);
        assert_eq!(u.urls[1].user.as_deref(), Some("u"));
        assert_eq!(u.mirrors[0].subject_prefix, "fleet.truck-042.");
    }

    #[test]
    fn unknown_key_is_named_with_line() {
        let e = Config::parse("node = \"a\"\n[mqtt]\nlistne = \"x\"\n").unwrap_err();
        assert!(e.0.contains("listne"), "{e}");
        assert!(e.0.contains("line 3"), "{e}");
    }

    #[test]
    fn wrong_type_and_bad_values() {
        let e = Config::parse(
            "[[stream]]\nname = \"A\"\nsubjects = [\"a\"]\nmax_bytes = \"12 parsecs\"\n",
        )
        .unwrap_err();
        assert!(e.0.contains("parsecs") && e.0.contains("line 4"), "{e}");
        let e = Config::parse("[[stream]]\nname = \"A\"\nsubjects = [\"a.>\"]\n[[stream]]\nname = \"B\"\nsubjects = [\"a.b\"]\n").unwrap_err();
        assert!(e.0.contains("overlaps"), "{e}");
        let e = Config::parse(
            "[uplink]\nurls = [\"nats://h\"]\n[[uplink.mirror]]\nstream = \"NOPE\"\nto = \"X\"\n",
        )
        .unwrap_err();
        assert!(e.0.contains("NOPE"), "{e}");
        let e =
            Config::parse("[[stream]]\nname = \"A\"\nsubjects = [\"a\"]\nsync = \"sometimes\"\n")
                .unwrap_err();
        assert!(e.0.contains("sometimes"), "{e}");
    }

    #[test]
    fn readme_example_is_valid() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n").expect("README has a toml example") + 8;
        let len = readme[start..].find("```").expect("closed toml block");
        if let Err(e) = Config::parse(&readme[start..start + len]) {
            panic!("README's configuration example is invalid: {e}");
        }
    }

    #[test]
    fn board_profiles_are_valid() {
        for board in [
            "generic",
            "rpi4-5",
            "rpi3-zero2-armv7",
            "beaglebone-black",
            "gateway-256mb",
        ] {
            let path = format!("{}/boards/{board}/frond.toml", env!("CARGO_MANIFEST_DIR"));
            if let Err(e) = Config::load(std::path::Path::new(&path)) {
                panic!("{e}");
            }
        }
    }
}
