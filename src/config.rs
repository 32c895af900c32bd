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
//!   refused). Memory streams do not count. The budget bounds message bytes
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

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::auth::{Auth, Permissions, ResponsePermission, Secret, User};
use crate::store::crypt::Key;
use crate::stream::{Discard, Retention, Storage, StreamConfig, SyncPolicy};
use crate::subject;
use crate::subject::mapping::{parse_weight, Mapping, Mappings};

/// The name of the stream that captures everything when no `[[stream]]` is
/// configured.
pub const DEFAULT_STREAM: &str = "DEFAULT";

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

/// `[uplink]`: the link to the hub.
#[derive(Debug, Clone, PartialEq)]
pub struct UplinkConfig {
    /// `nats://host:port` URLs, tried in turn.
    pub urls: Vec<HubUrl>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// `nkey_seed = "SU…"`: sign the hub's nonce as this nkey user.
    pub nkey_seed: Option<crate::nkey::SeedKey>,
    /// CA for the hub's certificate; `None`: the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// (certificate, key) presented to the hub, if it wants one.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Unacknowledged JetStream publishes in flight per mirror.
    pub max_inflight: usize,
    /// A publish not acknowledged within this time counts as a link fault.
    pub ack_timeout: Duration,
    /// First reconnect delay; doubles (with jitter) up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub mirrors: Vec<MirrorConfig>,
}

/// `[tls]`: PEM files for frond's own TLS listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub ca: Option<PathBuf>,
}

/// One hub address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUrl {
    pub host: String,
    pub port: u16,
    /// Credentials embedded in the URL (`nats://user:pass@host`), if any.
    pub user: Option<String>,
    pub password: Option<String>,
    /// `tls://`: TLS is required even if the hub does not ask for it.
    pub tls: bool,
}

impl fmt::Display for HubUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "tls" } else { "nats" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// `[[uplink.mirror]]`: a local stream copied into a hub stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// Local stream name.
    pub stream: String,
    /// Hub stream name.
    pub to: String,
    /// Prepended to every subject on the hub (for example `"fleet.truck-042."`).
    pub subject_prefix: String,
}

impl Config {
    /// The embedded defaults (what `frond run` uses with no file).
    pub fn defaults() -> Config {
        Config::parse("").unwrap_or_else(unreachable_defaults)
    }

    /// Parse and validate a configuration file's text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
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

/// `"source" = "dest"` or `"source" = [{destination, weight}, …]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawMappingDest {
    One(String),
    Weighted(Vec<RawWeighted>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeighted {
    destination: String,
    /// `"10%"`, `"10"` or `10`; default 100%.
    weight: Option<IntOrStr>,
}

fn validate_mappings(
    raw: std::collections::BTreeMap<String, RawMappingDest>,
) -> Result<Mappings, ConfigError> {
    let mut list = Vec::new();
    for (source, dest) in raw {
        let dests = match dest {
            RawMappingDest::One(d) => vec![(d, 100)],
            RawMappingDest::Weighted(ws) => {
                let mut v = Vec::new();
                for w in ws {
                    let weight = match w.weight {
                        None => Ok(100),
                        Some(IntOrStr::Int(i)) => u8::try_from(i)
                            .ok()
                            .filter(|i| *i <= 100)
                            .ok_or_else(|| format!("weight {i} must be from 0 to 100 (percent)")),
                        Some(IntOrStr::Str(s)) => parse_weight(&s).map_err(|e| e.0),
                    };
                    match weight {
                        Ok(weight) => v.push((w.destination, weight)),
                        Err(e) => return err(format!("mappings.{source:?}: {e}")),
                    }
                }
                v
            }
        };
        match Mapping::new(&source, &dests) {
            Ok(m) => list.push(m),
            Err(e) => return err(format!("mappings.{source:?}: {e}")),
        }
    }
    Mappings::new(list).map_err(|e| ConfigError(format!("mappings: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMqtt {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawNats {
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
    fn validate(self) -> Result<NatsConfig, ConfigError> {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHttp {
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
    fn validate(self) -> Result<HttpConfig, ConfigError> {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    name: String,
    subjects: Vec<String>,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default = "default_sync", deserialize_with = "de_sync")]
    sync: SyncPolicy,
    #[serde(default)]
    max_msgs: u64,
    #[serde(default, deserialize_with = "de_size")]
    max_bytes: u64,
    #[serde(default, deserialize_with = "de_duration")]
    max_age: Duration,
    #[serde(default)]
    max_msgs_per_subject: u64,
    #[serde(default, deserialize_with = "de_size")]
    max_msg_size: u64,
    #[serde(default)]
    discard: RawDiscard,
    #[serde(default = "default_dup_window", deserialize_with = "de_duration")]
    duplicate_window: Duration,
    #[serde(default)]
    discard_new_per_subject: bool,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    allow_rollup: bool,
    #[serde(default)]
    deny_delete: bool,
    #[serde(default)]
    deny_purge: bool,
    #[serde(default)]
    allow_msg_ttl: bool,
    encrypt: Option<bool>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawRetention {
    #[default]
    Limits,
    Interest,
    Workqueue,
}

fn default_sync() -> SyncPolicy {
    SyncPolicy::Always
}

fn default_dup_window() -> Duration {
    Duration::from_secs(120)
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawStorage {
    #[default]
    File,
    Memory,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawDiscard {
    #[default]
    Old,
    New,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    urls: Vec<String>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    nkey_seed: Option<String>,
    creds: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default = "default_uplink_inflight")]
    max_inflight: usize,
    #[serde(default = "default_ack_timeout", deserialize_with = "de_duration")]
    ack_timeout: Duration,
    #[serde(default = "default_reconnect_min", deserialize_with = "de_duration")]
    reconnect_min: Duration,
    #[serde(default = "default_reconnect_max", deserialize_with = "de_duration")]
    reconnect_max: Duration,
    #[serde(default)]
    mirror: Vec<RawMirror>,
    #[serde(default)]
    source: Vec<toml::Value>,
}

fn default_uplink_inflight() -> usize {
    256
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_reconnect_min() -> Duration {
    Duration::from_millis(250)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    anonymous: bool,
    #[serde(default)]
    anonymous_permissions: RawPermissions,
    #[serde(default)]
    users: Vec<RawUser>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPermissions {
    #[serde(default)]
    allow_publish: Vec<String>,
    #[serde(default)]
    allow_subscribe: Vec<String>,
    #[serde(default)]
    deny_publish: Vec<String>,
    #[serde(default)]
    deny_subscribe: Vec<String>,
    #[serde(default)]
    allow_responses: Option<RawResponses>,
}

/// `allow_responses = true` or `allow_responses = { max = 1, expires = "2m" }`.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RawResponses {
    Flag(bool),
    Limits(RawResponseLimits),
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawResponseLimits {
    #[serde(default)]
    max: u64,
    #[serde(default)]
    expires: Option<String>,
}

impl RawResponses {
    fn validate(self, key: &str) -> Result<Option<ResponsePermission>, ConfigError> {
        match self {
            RawResponses::Flag(false) => Ok(None),
            RawResponses::Flag(true) => Ok(Some(ResponsePermission::default())),
            RawResponses::Limits(RawResponseLimits { max, expires }) => {
                let mut r = ResponsePermission::default();
                if max > 0 {
                    r.max = max;
                }
                if let Some(e) = expires {
                    let d = parse_duration(&e).map_err(|why| {
                        ConfigError(format!("{key}.allow_responses.expires: {why}"))
                    })?;
                    // 0 means the default, as in nats-server.
                    if !d.is_zero() {
                        r.expires = d;
                    }
                }
                Ok(Some(r))
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    /// Optional for nkey users (their public key is used in logs).
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    /// A user public key `U…` (NATS clients only) instead of a password.
    nkey: Option<String>,
    #[serde(default)]
    allow_publish: Vec<String>,
    #[serde(default)]
    allow_subscribe: Vec<String>,
    #[serde(default)]
    deny_publish: Vec<String>,
    #[serde(default)]
    deny_subscribe: Vec<String>,
    #[serde(default)]
    allow_responses: Option<RawResponses>,
}

impl RawPermissions {
    fn validate(self, key: &str) -> Result<Permissions, ConfigError> {
        let lists = [
            ("allow_publish", &self.allow_publish),
            ("allow_subscribe", &self.allow_subscribe),
            ("deny_publish", &self.deny_publish),
            ("deny_subscribe", &self.deny_subscribe),
        ];
        for (name, list) in lists {
            if let Some(bad) = list.iter().find(|f| !subject::valid_filter(f)) {
                return err(format!(
                    "{key}.{name}: {bad:?} is not a valid NATS subject filter (tokens separated by '.', '*' or a final '>'; MQTT topic a/b is subject a.b)"
                ));
            }
        }
        let responses = match self.allow_responses {
            Some(r) => r.validate(key)?,
            None => None,
        };
        Ok(Permissions {
            allow_publish: self.allow_publish,
            deny_publish: self.deny_publish,
            allow_subscribe: self.allow_subscribe,
            deny_subscribe: self.deny_subscribe,
            responses,
        })
    }
}

impl RawAuth {
    fn validate(self) -> Result<Auth, ConfigError> {
        let anonymous_permissions = Arc::new(
            self.anonymous_permissions
                .validate("auth.anonymous_permissions")?,
        );
        let mut users: Vec<User> = Vec::new();
        for (i, mut u) in self.users.into_iter().enumerate() {
            let key = format!("auth.users[{i}] ({:?})", u.name);
            let nkey = match &u.nkey {
                Some(_) if !u.password.is_empty() => {
                    return err(format!(
                        "{key}: give either password or nkey, not both"
                    ))
                }
                Some(k) => match crate::nkey::decode_user_public(k) {
                    Ok(raw) => {
                        if u.name.is_empty() {
                            u.name = k.clone();
                        }
                        Some(raw)
                    }
                    Err(e) => {
                        return err(format!(
                            "{key}.nkey: {e}; give the user's public key (56 characters starting with 'U', e.g. from `nsc describe user` or `nk -gen user -pubout`), never its seed"
                        ))
                    }
                },
                None => None,
            };
            if u.name.is_empty() {
                return err(format!("{key}.name: must not be empty"));
            }
            if users.iter().any(|x| x.name == u.name) {
                return err(format!("{key}.name: user {:?} is defined twice", u.name));
            }
            if nkey.is_some()
                && users
                    .iter()
                    .any(|x| matches!(&x.secret, Secret::Nkey(k) if Some(*k) == nkey))
            {
                return err(format!("{key}.nkey: this public key is defined twice"));
            }
            if nkey.is_none() && u.password.is_empty() {
                return err(format!(
                    "{key}.password: must not be empty (or give nkey = \"U…\" for a NATS nkey user)"
                ));
            }
            let secret = match nkey {
                Some(k) => Secret::Nkey(k),
                None => Secret::parse(&u.password),
            };
            if matches!(&secret, Secret::Plain(p) if p.starts_with("$2")) {
                return err(format!(
                    "{key}.password: looks like a bcrypt hash but is not one ($2a$/$2b$/$2y$, cost, then 53 characters); check for truncation"
                ));
            }
            users.push(User {
                permissions: Arc::new(
                    RawPermissions {
                        allow_publish: u.allow_publish,
                        allow_subscribe: u.allow_subscribe,
                        deny_publish: u.deny_publish,
                        deny_subscribe: u.deny_subscribe,
                        allow_responses: u.allow_responses,
                    }
                    .validate(&key)?,
                ),
                name: u.name,
                secret,
            });
        }
        if !self.anonymous && users.is_empty() {
            return err("[auth]: no [[auth.users]] and anonymous = false would refuse every client; add a user or set anonymous = true");
        }
        Ok(Auth {
            anonymous: self.anonymous,
            anonymous_permissions,
            users,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    stream: String,
    to: String,
    #[serde(default)]
    subject_prefix: String,
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let tls = self.tls.map(|t| TlsFiles {
            cert: t.cert,
            key: t.key,
            ca: t.ca,
        });
        let wants_tls = [&self.mqtt.tls_listen, &self.mqtt.wss_listen]
            .iter()
            .any(|l| l.as_deref().is_some_and(|l| !l.is_empty()));
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

/// The smallest share of `max_storage` a file stream without `max_bytes`
/// may get (one minimum-size segment).
pub const MIN_STREAM_SHARE: u64 = crate::store::MIN_SEGMENT_SIZE;

/// Checks the file streams' `max_bytes` plus `retained` (the bytes the
/// retained messages' log may take: twice `mqtt.max_retained_bytes`)
/// against `budget` (0: no budget) and gives every file stream without
/// `max_bytes` an equal share of the rest.
fn apply_storage_budget(
    budget: u64,
    retained: u64,
    streams: &mut [StreamConfig],
) -> Result<(), ConfigError> {
    if budget == 0 {
        return Ok(());
    }
    let files = || streams.iter().filter(|s| s.storage == Storage::File);
    let fixed: u64 = files()
        .map(|s| s.max_bytes)
        .fold(retained, u64::saturating_add);
    if fixed > budget {
        let mut list: Vec<String> = files()
            .filter(|s| s.max_bytes > 0)
            .map(|s| format!("{} = {}", s.name, s.max_bytes))
            .collect();
        list.push(format!(
            "retained messages = {retained} (twice mqtt.max_retained_bytes)"
        ));
        return err(format!(
            "max_storage: the file streams' max_bytes and the retained messages add up to {fixed} bytes ({}), more than max_storage = {budget} bytes; lower some max_bytes or mqtt.max_retained_bytes, or raise max_storage",
            list.join(", ")
        ));
    }
    let open = files().filter(|s| s.max_bytes == 0).count() as u64;
    if open == 0 {
        return Ok(());
    }
    let share = (budget - fixed) / open;
    if share < MIN_STREAM_SHARE {
        return err(format!(
            "max_storage: {} bytes are left for {open} file stream(s) without max_bytes, less than {MIN_STREAM_SHARE} bytes each; give them max_bytes or raise max_storage",
            budget - fixed
        ));
    }
    for s in streams.iter_mut() {
        if s.storage == Storage::File && s.max_bytes == 0 {
            s.max_bytes = share;
        }
    }
    Ok(())
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

impl RawMqtt {
    fn validate(self) -> Result<MqttConfig, ConfigError> {
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

impl RawStream {
    fn validate(self, i: usize, crypt_key: Option<&Key>) -> Result<StreamConfig, ConfigError> {
        let key = format!("stream[{i}] ({:?})", self.name);
        // The name is a directory name ([`crate::names`]); the charset
        // below is stricter still (it is also a subject token on the hub).
        if let Err(e) = crate::names::validate(&self.name) {
            return err(format!(
                "{key}.name: {e} (it names a directory; use 1-64 letters, digits, '-' or '_')"
            ));
        }
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return err(format!(
                "{key}.name: must be 1-64 letters, digits, '-' or '_' (it names a directory)"
            ));
        }
        if self.subjects.is_empty() {
            return err(format!("{key}.subjects: list at least one subject"));
        }
        for s in &self.subjects {
            if !subject::valid_filter(s) {
                return err(format!("{key}.subjects: {s:?} is not a valid NATS subject"));
            }
        }
        if self.discard_new_per_subject
            && (self.max_msgs_per_subject == 0 || matches!(self.discard, RawDiscard::Old))
        {
            return err(format!(
                "{key}.discard_new_per_subject: needs discard = \"new\" and max_msgs_per_subject > 0"
            ));
        }
        if self.allow_rollup && self.deny_purge {
            return err(format!(
                "{key}.allow_rollup: a rollup purges, so it cannot be combined with deny_purge = true"
            ));
        }
        let memory = matches!(self.storage, RawStorage::Memory);
        let encrypt = match self.encrypt {
            Some(true) if memory => {
                return err(format!(
                    "{key}.encrypt: a memory stream is never written to disk; remove encrypt"
                ))
            }
            Some(true) if crypt_key.is_none() => {
                return err(format!(
                    "{key}.encrypt: needs the top-level encryption_key_file (create one with `frond keygen FILE`)"
                ))
            }
            Some(e) => e,
            None => crypt_key.is_some() && !memory,
        };
        Ok(StreamConfig {
            name: self.name,
            subjects: self.subjects,
            storage: match self.storage {
                RawStorage::File => Storage::File,
                RawStorage::Memory => Storage::Memory,
            },
            sync: self.sync,
            max_msgs: self.max_msgs,
            max_bytes: self.max_bytes,
            max_age: self.max_age,
            max_msgs_per_subject: self.max_msgs_per_subject,
            max_msg_size: self.max_msg_size,
            discard: match self.discard {
                RawDiscard::Old => Discard::Old,
                RawDiscard::New => Discard::New,
            },
            discard_new_per_subject: self.discard_new_per_subject,
            duplicate_window: self.duplicate_window,
            retention: match self.retention {
                RawRetention::Limits => Retention::Limits,
                RawRetention::Interest => Retention::Interest,
                RawRetention::Workqueue => Retention::WorkQueue,
            },
            allow_rollup: self.allow_rollup,
            deny_delete: self.deny_delete,
            deny_purge: self.deny_purge,
            allow_msg_ttl: self.allow_msg_ttl,
            key: crypt_key.cloned(),
            encrypt,
        })
    }
}

impl RawUplink {
    fn validate(self, streams: &[StreamConfig]) -> Result<UplinkConfig, ConfigError> {
        if self.creds.is_some() {
            return err("uplink.creds: .creds files (JWT authentication) are not supported yet (planned); use nkey_seed = \"SU…\" (an nkey user on the hub), user/password or token");
        }
        let nkey_seed = match &self.nkey_seed {
            Some(s) => Some(crate::nkey::SeedKey::parse(s).map_err(|e| {
                ConfigError(format!(
                    "uplink.nkey_seed: {e}; give the user's seed (58 characters starting with \"SU\"), as stored by `nsc` or printed by `nk -gen user`"
                ))
            })?),
            None => None,
        };
        if nkey_seed.is_some()
            && (self.token.is_some() || self.user.is_some() || self.password.is_some())
        {
            return err("uplink: give either nkey_seed or user/password or token, not several");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return err("uplink.tls_cert and uplink.tls_key go together");
        }
        if !self.source.is_empty() {
            return err("uplink.source: source-down is not supported yet (planned); remove [[uplink.source]]");
        }
        if self.urls.is_empty() {
            return err("uplink.urls: list at least one hub URL, e.g. [\"nats://hub:4222\"]");
        }
        let mut urls = Vec::new();
        for u in &self.urls {
            urls.push(
                parse_hub_url(u).map_err(|e| ConfigError(format!("uplink.urls: {u:?}: {e}")))?,
            );
        }
        if self.token.is_some() && (self.user.is_some() || self.password.is_some()) {
            return err("uplink: give either token or user/password, not both");
        }
        if self.user.is_some() != self.password.is_some() {
            return err("uplink: user and password go together");
        }
        if self.max_inflight == 0 || self.max_inflight > 65_536 {
            return err("uplink.max_inflight: must be between 1 and 65536");
        }
        if self.ack_timeout.is_zero() {
            return err("uplink.ack_timeout: must be more than 0");
        }
        if self.reconnect_min.is_zero() || self.reconnect_max < self.reconnect_min {
            return err(
                "uplink.reconnect_min/reconnect_max: need 0 < reconnect_min <= reconnect_max",
            );
        }
        let mut mirrors = Vec::new();
        for (i, m) in self.mirror.into_iter().enumerate() {
            let key = format!("uplink.mirror[{i}]");
            if !streams.iter().any(|s| s.name == m.stream) {
                return err(format!(
                    "{key}.stream: no local stream named {:?}; configure it with [[stream]]",
                    m.stream
                ));
            }
            if mirrors.iter().any(|x: &MirrorConfig| x.stream == m.stream) {
                return err(format!(
                    "{key}.stream: stream {:?} is mirrored twice",
                    m.stream
                ));
            }
            if m.to.is_empty() || m.to.contains(['.', ' ', '*', '>']) {
                return err(format!(
                    "{key}.to: {:?} is not a valid hub stream name",
                    m.to
                ));
            }
            if !m.subject_prefix.is_empty() {
                let probe = format!("{}x", m.subject_prefix);
                if !m.subject_prefix.ends_with('.') || !subject::valid_subject(&probe) {
                    return err(format!(
                        "{key}.subject_prefix: {:?} must be subject tokens ending in '.', e.g. \"fleet.truck-042.\"",
                        m.subject_prefix
                    ));
                }
            }
            mirrors.push(MirrorConfig {
                stream: m.stream,
                to: m.to,
                subject_prefix: m.subject_prefix,
            });
        }
        Ok(UplinkConfig {
            urls,
            user: self.user,
            password: self.password,
            token: self.token,
            nkey_seed,
            tls_ca: self.tls_ca,
            tls_client: self.tls_cert.zip(self.tls_key),
            max_inflight: self.max_inflight,
            ack_timeout: self.ack_timeout,
            reconnect_min: self.reconnect_min,
            reconnect_max: self.reconnect_max,
            mirrors,
        })
    }
}

/// Parse `nats://[user:pass@]host[:port]` (port default 4222). A bare
/// `host:port` is accepted too.
pub fn parse_hub_url(u: &str) -> Result<HubUrl, String> {
    let (tls, rest) = if let Some(r) = u.strip_prefix("nats://") {
        (false, r)
    } else if let Some(r) = u.strip_prefix("tls://") {
        (true, r)
    } else if u.contains("://") {
        return Err("use nats://host:port or tls://host:port".into());
    } else {
        (false, u)
    };
    let rest = rest.trim_end_matches('/');
    let (auth, hostport) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let (user, password) = match auth {
        None => (None, None),
        Some(a) => match a.split_once(':') {
            Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
            None => (Some(a.to_string()), None),
        },
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        // [v6]:port
        let (h, p) = h.split_once(']').ok_or("unclosed '[' in IPv6 address")?;
        let port = match p.strip_prefix(':') {
            Some(p) => p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?,
            None => 4222,
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?,
            ),
            None => (hostport.to_string(), 4222),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    Ok(HubUrl {
        host,
        port,
        user,
        password,
        tls,
    })
}

fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let cleaned: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "frond".into()
    } else {
        cleaned
    }
}

// ---------------------------------------------------------------------------
// Sizes and durations.

/// Parse `"512MiB"`, `"64KB"`, `"1G"`, `"100"` into bytes. Binary (KiB) and
/// decimal (KB) suffixes are both accepted; a bare `K`/`M`/`G` is binary.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("{s:?} is not a size; use e.g. 1048576, \"512KiB\", \"64MiB\", \"1GiB\"")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1_000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "{s:?}: unknown size unit {other:?}; use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parse `"100ms"`, `"30s"`, `"5m"`, `"2h"`, `"7d"`, `"1.5s"` or `"30"`
/// (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad =
        || format!("{s:?} is not a duration; use e.g. \"100ms\", \"30s\", \"5m\", \"2h\", \"7d\"");
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs_per: f64 = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "us" => 0.000_001,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(bad()),
    };
    let secs = n * secs_per;
    if !secs.is_finite() || !(0.0..=1e10).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrStr {
    Int(i64),
    Str(String),
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match IntOrStr::deserialize(d)? {
        IntOrStr::Int(i) if i >= 0 => Ok(i as u64),
        IntOrStr::Int(i) => Err(de::Error::custom(format!("size {i} is negative"))),
        IntOrStr::Str(s) => parse_size(&s).map_err(de::Error::custom),
    }
}

/// [`de_size`] for a key whose absence means "derived from other keys".
fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match IntOrStr::deserialize(d)? {
        IntOrStr::Int(i) if i >= 0 => Ok(Duration::from_secs(i as u64)),
        IntOrStr::Int(i) => Err(de::Error::custom(format!("duration {i} is negative"))),
        IntOrStr::Str(s) => parse_duration(&s).map_err(de::Error::custom),
    }
}

fn de_sync<'de, D: Deserializer<'de>>(d: D) -> Result<SyncPolicy, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "always" => Ok(SyncPolicy::Always),
        "never" => Ok(SyncPolicy::Never),
        other => match parse_duration(other) {
            Ok(dur) if !dur.is_zero() => Ok(SyncPolicy::Interval(dur)),
            _ => Err(de::Error::custom(format!(
                "sync = {other:?}: use \"always\", \"never\" or an interval such as \"100ms\""
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn max_storage_budget() {
        let two = "[[stream]]\nname = \"A\"\nsubjects = [\"a.>\"]\nmax_bytes = \"3GiB\"\n\n[[stream]]\nname = \"B\"\nsubjects = [\"b.>\"]\n\n[[stream]]\nname = \"C\"\nsubjects = [\"c.>\"]\n\n[[stream]]\nname = \"M\"\nsubjects = [\"m.>\"]\nstorage = \"memory\"\n";
        let c = Config::parse(&format!("max_storage = \"8GiB\"\n{two}")).unwrap();
        assert_eq!(c.max_storage, 8 << 30);
        let by = |n: &str| c.streams.iter().find(|s| s.name == n).unwrap().max_bytes;
        assert_eq!(by("A"), 3 << 30);
        // The retained messages' log takes twice mqtt.max_retained_bytes.
        let retained = 2 * DEFAULT_MAX_RETAINED_BYTES;
        assert_eq!(by("B"), ((5 << 30) - retained) / 2);
        assert_eq!(by("C"), ((5 << 30) - retained) / 2);
        assert_eq!(by("M"), 0, "memory streams are outside the budget");
        // Without a budget nothing changes.
        let c = Config::parse(two).unwrap();
        assert_eq!(c.max_storage, 0);
        assert_eq!(c.streams[1].max_bytes, 0);
        // Over budget: refused, naming the key and the streams.
        let e = Config::parse(&format!("max_storage = \"2GiB\"\n{two}"))
            .unwrap_err()
            .0;
        assert!(e.contains("max_storage") && e.contains("A = "), "{e}");
        // Nothing (or too little) left for the streams without max_bytes.
        let e = Config::parse(&format!(
            "max_storage = {}\n{two}",
            (3u64 << 30) + 2 * DEFAULT_MAX_RETAINED_BYTES + 65_536
        ))
        .unwrap_err()
        .0;
        assert!(e.contains("without max_bytes"), "{e}");
        // The catch-all default stream takes the whole budget but the
        // retained messages' share.
        let c = Config::parse("max_storage = \"100MiB\"\n").unwrap();
        assert_eq!(c.streams[0].max_bytes, (100 << 20) - retained);
        let c = Config::parse("max_storage = \"100MiB\"\n[mqtt]\nmax_retained_bytes = \"1MiB\"\n")
            .unwrap();
        assert_eq!(c.streams[0].max_bytes, 98 << 20);
        // Retained messages alone over the budget: refused, naming them.
        let e = Config::parse("max_storage = \"16MiB\"\n[[stream]]\nname = \"A\"\nsubjects = [\"a\"]\nmax_bytes = \"1MiB\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("retained messages = "), "{e}");
        assert_eq!(Config::parse("").unwrap().streams[0].max_bytes, 1 << 30);
        assert!(Config::parse("max_storage = \"lots\"\n").is_err());
    }

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

    #[test]
    fn auth_section() {
        assert!(Config::parse("").unwrap().mqtt.auth.is_none());
        let c = Config::parse(
            r#"
[auth]
[auth.anonymous_permissions]
deny_subscribe = ["test.nosubscribe"]
[[auth.users]]
name = "sensor-1"
password = "$2b$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"
allow_publish = ["telemetry.sensor-1.>"]
allow_subscribe = ["cmd.sensor-1.>"]
[[auth.users]]
name = "plain"
password = "pw"
"#,
        )
        .unwrap();
        let a = c.mqtt.auth.clone().unwrap();
        assert_eq!(c.nats.auth, c.mqtt.auth);
        assert!(!a.anonymous);
        assert_eq!(a.users.len(), 2);
        assert_eq!(a.warnings().len(), 1);
        let p = a.authenticate(Some("sensor-1"), Some(b"U*U")).unwrap();
        assert!(p.can_publish("telemetry.sensor-1.x"));
        assert!(!p.can_publish("telemetry.sensor-2.x"));
        for bad in [
            "[auth]\n",
            "[auth]\nanonymous = true\n[auth.anonymous_permissions]\nallow_publish = [\"a..b\"]\n",
            "[auth]\n[[auth.users]]\nname = \"a\"\npassword = \"$2b$10$short\"\n",
            "[auth]\n[[auth.users]]\nname = \"a\"\npassword = \"x\"\n[[auth.users]]\nname = \"a\"\npassword = \"y\"\n",
            "[auth]\n[[auth.users]]\nname = \"a\"\npassword = \"x\"\nallow = []\n",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
        assert!(Config::parse("[auth]\nanonymous = true\n").is_ok());
    }

    #[test]
    fn auth_nkey_users() {
        use crate::nkey::SeedKey;
        let seed = SeedKey::from_bytes([5u8; 32]);
        let public = seed.public_key();
        let c = Config::parse(&format!(
            "[auth]\n[[auth.users]]\nnkey = \"{public}\"\nallow_publish = [\"a.>\"]\n[[auth.users]]\nname = \"plain\"\npassword = \"pw\"\n"
        ))
        .unwrap();
        let a = c.nats.auth.unwrap();
        assert!(a.has_nkeys());
        assert_eq!(a.users[0].name, public, "the key names an unnamed user");
        let nonce = "abc";
        let p = a
            .authenticate_nkey(&public, &seed.sign(nonce.as_bytes()), nonce)
            .unwrap();
        assert!(p.can_publish("a.b") && !p.can_publish("b"));
        assert!(a
            .authenticate_nkey(&public, &seed.sign(b"other"), nonce)
            .is_err());
        // An nkey user has no password (also not over MQTT).
        assert!(a.authenticate(Some(&public), Some(b"")).is_err());
        assert!(a.authenticate_token("").is_err());
        let seed_text = seed.encode();
        let mut bad_sum = public.clone().into_bytes();
        bad_sum[5] = if bad_sum[5] == b'A' { b'B' } else { b'A' };
        let bad_sum = String::from_utf8(bad_sum).unwrap();
        for bad in [
            format!("[auth]\n[[auth.users]]\nnkey = \"{seed_text}\"\n"),
            format!("[auth]\n[[auth.users]]\nnkey = \"{bad_sum}\"\n"),
            format!("[auth]\n[[auth.users]]\nnkey = \"{public}\"\npassword = \"x\"\n"),
            format!("[auth]\n[[auth.users]]\nnkey = \"{public}\"\n[[auth.users]]\nname = \"b\"\nnkey = \"{public}\"\n"),
            "[auth]\n[[auth.users]]\nname = \"a\"\n".to_string(),
        ] {
            assert!(Config::parse(&bad).is_err(), "{bad}");
        }
        let e = Config::parse(&format!("[auth]\n[[auth.users]]\nnkey = \"{seed_text}\"\n"))
            .unwrap_err();
        assert!(!e.to_string().contains(&seed_text[4..]), "{e}");
    }

    #[test]
    fn allow_responses_forms() {
        let user = |extra: &str| {
            Config::parse(&format!(
                "[auth]\n[[auth.users]]\nname = \"svc\"\npassword = \"pw\"\n{extra}\n"
            ))
            .map(|c| c.nats.auth.unwrap().users[0].permissions.responses)
        };
        assert_eq!(user("").unwrap(), None);
        assert_eq!(user("allow_responses = false").unwrap(), None);
        assert_eq!(
            user("allow_responses = true").unwrap(),
            Some(ResponsePermission {
                max: 1,
                expires: Duration::from_secs(120)
            })
        );
        assert_eq!(
            user("allow_responses = { max = 5, expires = \"1s\" }").unwrap(),
            Some(ResponsePermission {
                max: 5,
                expires: Duration::from_secs(1)
            })
        );
        // 0 means the default, as in nats-server.
        assert_eq!(
            user("allow_responses = { max = 0 }").unwrap(),
            Some(ResponsePermission::default())
        );
        assert!(user("allow_responses = { expires = \"soon\" }").is_err());
        assert!(user("allow_responses = \"yes\"").is_err());
        assert!(user("allow_responses = { maxx = 2 }").is_err());
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
    fn uplink_nkey_seed_and_creds() {
        let seed = crate::nkey::SeedKey::from_bytes([6u8; 32]);
        let up =
            |extra: &str| Config::parse(&format!("[uplink]\nurls = [\"nats://h\"]\n{extra}\n"));
        let c = up(&format!("nkey_seed = \"{}\"", seed.encode())).unwrap();
        assert_eq!(c.uplink.unwrap().nkey_seed, Some(seed.clone()));
        let e = up(&format!("nkey_seed = \"{}\"", seed.public_key())).unwrap_err();
        assert!(e.0.contains("uplink.nkey_seed"), "{e}");
        let e = up(&format!("nkey_seed = \"{}\"\ntoken = \"t\"", seed.encode())).unwrap_err();
        assert!(e.0.contains("not several"), "{e}");
        let e = up("creds = \"/etc/frond/hub.creds\"").unwrap_err();
        assert!(e.0.contains("nkey_seed"), "{e}");
    }

    #[test]
    fn stream_semantics_keys() {
        let base = "[[stream]]\nname = \"KV\"\nsubjects = [\"kv.>\"]\n";
        let c = Config::parse(&format!(
            "{base}max_msgs_per_subject = 1\ndiscard = \"new\"\ndiscard_new_per_subject = true\nretention = \"workqueue\"\nallow_rollup = true\ndeny_delete = true\nallow_msg_ttl = true\n"
        ))
        .unwrap();
        let s = &c.streams[0];
        assert_eq!(s.max_msgs_per_subject, 1);
        assert!(s.discard_new_per_subject && s.allow_rollup && s.deny_delete && s.allow_msg_ttl);
        assert!(!s.deny_purge);
        assert_eq!(s.retention, Retention::WorkQueue);
        let e = Config::parse(&format!("{base}discard_new_per_subject = true\n")).unwrap_err();
        assert!(e.0.contains("discard_new_per_subject"), "{e}");
        let e =
            Config::parse(&format!("{base}allow_rollup = true\ndeny_purge = true\n")).unwrap_err();
        assert!(e.0.contains("allow_rollup"), "{e}");
        let e = Config::parse(&format!("{base}retention = \"forever\"\n")).unwrap_err();
        assert!(e.0.contains("forever"), "{e}");
    }

    #[test]
    fn encryption_keys() {
        let d = tempfile::tempdir().unwrap();
        let kf = d.path().join("frond.key");
        crate::store::crypt::generate_key_file(&kf).unwrap();
        let top = format!("encryption_key_file = {:?}\n", kf.to_str().unwrap());
        let stream = |name: &str, extra: &str| {
            format!("[[stream]]\nname = \"{name}\"\nsubjects = [\"{name}.>\"]\n{extra}")
        };
        // Global: every file stream encrypts unless it opts out.
        let c = Config::parse(&format!(
            "{top}{}{}{}",
            stream("a", ""),
            stream("b", "encrypt = false\n"),
            stream("m", "storage = \"memory\"\n")
        ))
        .unwrap();
        let enc: Vec<_> = c
            .streams
            .iter()
            .map(|s| (s.encrypt, s.key.is_some()))
            .collect();
        assert_eq!(enc, [(true, true), (false, true), (false, true)]);
        let c = Config::parse(&top).unwrap();
        assert!(c.streams[0].encrypt, "the DEFAULT stream too");
        // Without a key file nothing encrypts; asking for it is an error.
        let c = Config::parse(&stream("a", "")).unwrap();
        assert!(!c.streams[0].encrypt && c.streams[0].key.is_none());
        let e = Config::parse(&stream("a", "encrypt = true\n")).unwrap_err();
        assert!(
            e.0.contains("encrypt") && e.0.contains("encryption_key_file"),
            "{e}"
        );
        let e = Config::parse(&format!(
            "{top}{}",
            stream("m", "storage = \"memory\"\nencrypt = true\n")
        ))
        .unwrap_err();
        assert!(e.0.contains("memory"), "{e}");
        let e = Config::parse("encryption_key_file = \"/nonexistent/k\"\n").unwrap_err();
        assert!(
            e.0.contains("encryption_key_file") && e.0.contains("/nonexistent/k"),
            "{e}"
        );
        std::fs::write(&kf, "not a key").unwrap();
        let e = Config::parse(&top).unwrap_err();
        assert!(e.0.contains("64 hex digits"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1kb").unwrap(), 1000);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("-1").is_err());
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn hub_urls() {
        let u = parse_hub_url("nats://127.0.0.1:4333").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 4333));
        let t = parse_hub_url("tls://hub.example:4443").unwrap();
        assert!(t.tls && !u.tls);
        assert_eq!(t.to_string(), "tls://hub.example:4443");
        assert!(parse_hub_url("wss://h").is_err());
        assert!(parse_hub_url("nats://h:notaport").is_err());
    }

    #[test]
    fn readme_example_is_valid() {
        let readme = include_str!("../README.md");
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

    #[test]
    fn mappings() {
        let c = Config::parse(
            r#"
[mappings]
"orders.*" = "orders.{{partition(3,1)}}.{{wildcard(1)}}"
"svc" = [{destination = "svc.v1", weight = "90%"}, {destination = "svc.v2", weight = 10}]
"#,
        )
        .unwrap();
        assert_eq!(
            c.mappings.apply("orders.7", || 0).as_deref(),
            Some("orders.0.7") // fnv1a32("7") % 3
        );
        assert_eq!(c.mappings.apply("svc", || 95).as_deref(), Some("svc.v2"));
        assert!(Config::parse("").unwrap().mappings.is_empty());
        let e = Config::parse("[mappings]\n\"a.*\" = \"b.{{wildcard(2)}}\"\n").unwrap_err();
        assert!(
            e.0.contains("mappings.\"a.*\"") && e.0.contains("wildcard 2"),
            "{e}"
        );
        let e = Config::parse(
            "[mappings]\n\"s\" = [{destination = \"a\", weight = \"60%\"}, {destination = \"b\", weight = \"50%\"}]\n",
        )
        .unwrap_err();
        assert!(e.0.contains("more than 100%"), "{e}");
        let e = Config::parse("[mappings]\n\"s\" = [{destination = \"a\", weight = \"x\"}]\n")
            .unwrap_err();
        assert!(
            e.0.contains("mappings.\"s\"") && e.0.contains("percentage"),
            "{e}"
        );
    }
}
