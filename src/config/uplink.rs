//! `[uplink]`: the hub URLs, credentials, timers and `[[uplink.mirror]]`
//! list; every mirror names a configured stream. `creds` is read and
//! checked here, at configuration time ([`super::creds`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::values::{de_duration, de_opt_size};
use super::{err, ConfigError};
use crate::stream::StreamConfig;
use crate::subject;

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
    /// `creds = "/path/user.creds"`: log in with this user JWT, signing
    /// the nonce with its seed (hubs in operator mode).
    pub creds: Option<super::creds::Creds>,
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
    /// A PING every interval; a hub silent for two intervals is a dead
    /// (half-open) link.
    pub ping_interval: Duration,
    /// `max_rate`: bytes per second the mirrors' publishes may use on the
    /// link (`None`: no cap).
    pub max_rate: Option<u64>,
    /// `pipeline` (default `true`): ordered-mode mirrors send the next
    /// atomic batch's body while the previous batch is unanswered (see
    /// `uplink/mirror_order.rs`, "Pipelining"). `false` keeps one batch on
    /// the wire: a hub user who may both publish to and subscribe on this
    /// node's hub subjects can commit a staged body early and so store it
    /// before the batch ahead of it (such a user can copy and reorder
    /// messages on those subjects anyway).
    pub pipeline: bool,
    pub mirrors: Vec<MirrorConfig>,
    /// `[[uplink.export]]`: local subjects hub clients may reach (live).
    pub exports: Vec<BridgeSubject>,
    /// `[[uplink.import]]`: hub subjects local clients receive and publish
    /// to (live).
    pub imports: Vec<BridgeSubject>,
    /// `[[uplink.source]]`: hub streams copied down (see [`SourceConfig`]).
    pub sources: Vec<SourceConfig>,
}

/// One subject of `[[uplink.export]]` or `[[uplink.import]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSubject {
    /// The local subject filter.
    pub subject: String,
    /// Prepended on the hub (`""`, or tokens ending in `.`).
    pub hub_prefix: String,
}

/// Most subjects of `[[uplink.export]]` and `[[uplink.import]]` together
/// (each is one subscription on the hub).
pub const MAX_BRIDGE_SUBJECTS: usize = 1024;

/// One hub address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUrl {
    pub host: String,
    pub port: u16,
    /// Credentials embedded in the URL (`nats://user:pass@host`), if any.
    pub user: Option<String>,
    pub password: Option<String>,
    /// `tls://`: TLS is required even if the hub does not ask for it.
    /// With `ws`: `wss://`, TLS under the WebSocket.
    pub tls: bool,
    /// `ws://` / `wss://`: NATS over WebSocket (with permessage-deflate
    /// when the hub offers it; see `uplink::ws`).
    pub ws: bool,
}

impl fmt::Display for HubUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match (self.ws, self.tls) {
            (true, true) => "wss",
            (true, false) => "ws",
            (false, true) => "tls",
            (false, false) => "nats",
        };
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
    /// Higher drains first: a mirror sends only while no mirror of a
    /// higher priority has unsent messages.
    pub priority: i32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUplink {
    urls: Vec<String>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    nkey_seed: Option<String>,
    creds: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    /// Default: [`default_uplink_inflight`] for the URLs given.
    max_inflight: Option<usize>,
    #[serde(default = "default_ack_timeout", deserialize_with = "de_duration")]
    ack_timeout: Duration,
    #[serde(default = "default_reconnect_min", deserialize_with = "de_duration")]
    reconnect_min: Duration,
    #[serde(default = "default_reconnect_max", deserialize_with = "de_duration")]
    reconnect_max: Duration,
    #[serde(default = "default_ping_interval", deserialize_with = "de_duration")]
    ping_interval: Duration,
    #[serde(default, deserialize_with = "de_opt_size")]
    max_rate: Option<u64>,
    #[serde(default = "default_pipeline")]
    pipeline: bool,
    #[serde(default)]
    mirror: Vec<RawMirror>,
    #[serde(default)]
    source: Vec<RawSource>,
    #[serde(default)]
    export: Vec<RawBridge>,
    #[serde(default)]
    import: Vec<RawBridge>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBridge {
    subjects: Vec<String>,
    #[serde(default)]
    hub_prefix: String,
}

/// 256 publishes in flight; 1024 when every hub URL is `ws://`/`wss://`:
/// compressed publishes are about 4x smaller, so the same bytes are in
/// flight, and a window refilled in halves (see `uplink::mirror`) must
/// span twice a slow link's bandwidth-delay product in messages (a
/// 1 Mbit/s, 150 ms RTT link holds about 300 compressed publishes).
pub(super) fn default_uplink_inflight(urls: &[HubUrl]) -> usize {
    if !urls.is_empty() && urls.iter().all(|u| u.ws) {
        1024
    } else {
        256
    }
}

fn default_pipeline() -> bool {
    true
}

fn default_ack_timeout() -> Duration {
    Duration::from_secs(10)
}
pub(super) fn default_reconnect_min() -> Duration {
    Duration::from_millis(250)
}
pub(super) fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}
pub(super) fn default_ping_interval() -> Duration {
    Duration::from_secs(10)
}
/// The smallest `max_rate`: below it one publish of a few hundred bytes
/// would take most of a second and PING replies would queue behind it.
pub const MIN_RATE: u64 = 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMirror {
    stream: String,
    to: String,
    #[serde(default)]
    subject_prefix: String,
    #[serde(default)]
    priority: i32,
}

impl RawUplink {
    /// `creds`, `ping_interval` and `max_rate`: the creds file read and
    /// checked, and alone among the credentials.
    fn validate_ops(&self) -> Result<Option<super::creds::Creds>, ConfigError> {
        let creds = match &self.creds {
            Some(p) => {
                Some(super::creds::load(p).map_err(|e| ConfigError(format!("uplink.creds: {e}")))?)
            }
            None => None,
        };
        if creds.is_some()
            && (self.nkey_seed.is_some()
                || self.token.is_some()
                || self.user.is_some()
                || self.password.is_some())
        {
            return err(
                "uplink: give either creds or nkey_seed or user/password or token, not several",
            );
        }
        if self.ping_interval < Duration::from_millis(100)
            || self.ping_interval > Duration::from_secs(600)
        {
            return err("uplink.ping_interval: must be between 100ms and 10m (a half-open link is noticed after two intervals)");
        }
        if let Some(r) = self.max_rate {
            if r < MIN_RATE {
                return err(format!("uplink.max_rate: {r} bytes/s is below the minimum of {MIN_RATE} (1KiB); omit the key for no cap"));
            }
        }
        Ok(creds)
    }

    pub(super) fn validate(self, streams: &[StreamConfig]) -> Result<UplinkConfig, ConfigError> {
        let creds = self.validate_ops()?;
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
        let max_inflight = self
            .max_inflight
            .unwrap_or_else(|| default_uplink_inflight(&urls));
        if max_inflight == 0 || max_inflight > 65_536 {
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
                priority: m.priority,
            });
        }
        let exports = bridge_subjects("uplink.export", self.export)?;
        let imports = bridge_subjects("uplink.import", self.import)?;
        if exports.len() + imports.len() > MAX_BRIDGE_SUBJECTS {
            return err(format!("uplink.export/uplink.import: at most {MAX_BRIDGE_SUBJECTS} subjects in all (each is a subscription on the hub); use wildcards"));
        }
        let sources = validate_sources(self.source, streams, &mirrors)?;
        Ok(UplinkConfig {
            exports,
            imports,
            urls,
            user: self.user,
            password: self.password,
            token: self.token,
            nkey_seed,
            creds,
            tls_ca: self.tls_ca,
            tls_client: self.tls_cert.zip(self.tls_key),
            max_inflight,
            ack_timeout: self.ack_timeout,
            reconnect_min: self.reconnect_min,
            reconnect_max: self.reconnect_max,
            ping_interval: self.ping_interval,
            max_rate: self.max_rate,
            pipeline: self.pipeline,
            mirrors,
            sources,
        })
    }
}

/// The subjects of `[[uplink.export]]` or `[[uplink.import]]` (`key`),
/// one entry per subject. Refused: invalid filters, filters that can reach
/// reserved subjects (`$JS.>`, `$SYS.>`, `_INBOX.>`, or a first token that
/// is a wildcard, which matches those too), bad or reserved prefixes.
fn bridge_subjects(key: &str, raw: Vec<RawBridge>) -> Result<Vec<BridgeSubject>, ConfigError> {
    let mut out = Vec::new();
    for (i, b) in raw.into_iter().enumerate() {
        let key = format!("{key}[{i}]");
        if b.subjects.is_empty() {
            return err(format!(
                "{key}.subjects: list at least one subject, e.g. [\"svc.truck-042.>\"]"
            ));
        }
        let p = &b.hub_prefix;
        if !p.is_empty() {
            let probe = format!("{p}x");
            if !p.ends_with('.') || !subject::valid_subject(&probe) || bridge_reserved(&probe) {
                return err(format!(
                    "{key}.hub_prefix: {p:?} must be subject tokens ending in '.', not starting with '$' or '_INBOX', e.g. \"fleet.\""
                ));
            }
        }
        for s in b.subjects {
            if !subject::valid_filter(&s) {
                return err(format!(
                    "{key}.subjects: {s:?} is not a valid subject filter"
                ));
            }
            if bridge_reserved(&s) {
                return err(format!(
                    "{key}.subjects: {s:?} reaches reserved subjects ($JS, $SYS, _INBOX) or everything; the bridge carries application subjects only: name a first token, e.g. \"svc.truck-042.>\""
                ));
            }
            out.push(BridgeSubject {
                subject: s,
                hub_prefix: b.hub_prefix.clone(),
            });
        }
    }
    Ok(out)
}

/// Whether a bridge filter can match a reserved subject: it starts with
/// `$` or `_INBOX`, or its first token is a wildcard.
fn bridge_reserved(filter: &str) -> bool {
    let first = filter.split('.').next().unwrap_or_default();
    first.starts_with('$') || first == "_INBOX" || first == "*" || first == ">"
}

/// Parse `nats://[user:pass@]host[:port]` (port default 4222), `tls://`
/// likewise, `ws://` / `wss://` (port default 80 / 443). A bare
/// `host:port` is accepted too.
pub fn parse_hub_url(u: &str) -> Result<HubUrl, String> {
    let (tls, ws, rest) = if let Some(r) = u.strip_prefix("nats://") {
        (false, false, r)
    } else if let Some(r) = u.strip_prefix("tls://") {
        (true, false, r)
    } else if let Some(r) = u.strip_prefix("ws://") {
        (false, true, r)
    } else if let Some(r) = u.strip_prefix("wss://") {
        (true, true, r)
    } else if u.contains("://") {
        return Err(
            "use nats://host:port, tls://host:port, ws://host:port or wss://host:port".into(),
        );
    } else {
        (false, false, u)
    };
    let default_port = match (ws, tls) {
        (true, true) => 443,
        (true, false) => 80,
        _ => 4222,
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
            None => default_port,
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?,
            ),
            None => (hostport.to_string(), default_port),
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
        ws,
    })
}

pub(super) fn host_name() -> String {
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

/// `[[uplink.source]]`: a hub stream copied into a local stream, exactly
/// once and in order ([`crate::uplink::source`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    /// Hub stream name.
    pub from: String,
    /// What this node takes from it (`None`: every message).
    pub filter: Option<String>,
    /// Local stream name.
    pub stream: String,
    /// `(from, to)`: subjects rewritten on the way down.
    pub transform: Option<(String, String)>,
    /// Where a source without a cursor starts.
    pub start: SourceStart,
    /// The safety-net poll (and hub stream check) interval.
    pub poll_interval: Duration,
}

/// Where a source starts when it has no cursor yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceStart {
    /// `deliver = "all"`: the hub stream's first message.
    All,
    /// `deliver = "new"`: after the hub stream's last message at first contact.
    New,
    /// `start_seq = N`: hub sequence N.
    Seq(u64),
    /// `start_time = "RFC 3339"`: the first message stored at or after it.
    Time(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    from: String,
    filter: Option<String>,
    stream: String,
    subject_transform: Option<RawTransform>,
    deliver: Option<String>,
    start_seq: Option<u64>,
    start_time: Option<String>,
    #[serde(default = "default_poll_interval", deserialize_with = "de_duration")]
    poll_interval: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTransform {
    from: String,
    to: String,
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(10)
}

fn validate_sources(
    raw: Vec<RawSource>,
    streams: &[StreamConfig],
    mirrors: &[MirrorConfig],
) -> Result<Vec<SourceConfig>, ConfigError> {
    let mut out: Vec<SourceConfig> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = format!("uplink.source[{i}]");
        let s = validate_source(&key, r, streams, mirrors)?;
        if out.iter().any(|o| o.from == s.from && o.stream == s.stream) {
            return err(format!(
                "{key}: hub stream {:?} is already sourced into {:?}; use one source with a wider filter",
                s.from, s.stream
            ));
        }
        out.push(s);
    }
    Ok(out)
}

fn validate_source(
    key: &str,
    r: RawSource,
    streams: &[StreamConfig],
    mirrors: &[MirrorConfig],
) -> Result<SourceConfig, ConfigError> {
    if r.from.is_empty() || r.from.contains(['.', ' ', '*', '>']) {
        return err(format!(
            "{key}.from: {:?} is not a valid hub stream name",
            r.from
        ));
    }
    let Some(local) = streams.iter().find(|s| s.name == r.stream) else {
        return err(format!(
            "{key}.stream: no local stream named {:?}; configure it with [[stream]]",
            r.stream
        ));
    };
    if let Some(f) = &r.filter {
        if !subject::valid_filter(f) {
            return err(format!("{key}.filter: {f:?} is not a valid subject filter"));
        }
    }
    let filter = r.filter.clone().unwrap_or_else(|| ">".into());
    // The subjects that arrive locally, as a filter.
    let image = match &r.subject_transform {
        None => filter.clone(),
        Some(t) => {
            crate::subject::mapping::Transform::new(&t.from, &t.to)
                .map_err(|e| ConfigError(format!("{key}.subject_transform: {e}")))?;
            if !subject::filter_within(&filter, &t.from) {
                return err(format!(
                    "{key}.subject_transform.from: {:?} must match every subject of the filter {filter:?}",
                    t.from
                ));
            }
            transform_image(&t.to).ok_or_else(|| {
                ConfigError(format!(
                    "{key}.subject_transform.to: {:?}: only literal tokens, $n / {{{{wildcard(n)}}}}, {{{{partition(…)}}}} and a final '>' are supported here",
                    t.to
                ))
            })?
        }
    };
    if !local
        .subjects
        .iter()
        .any(|s| subject::filter_within(&image, s))
    {
        return err(format!(
            "{key}: the subjects it stores locally ({image:?}) are not all captured by stream {:?} (subjects {:?}); add {image:?} to its subjects or narrow the filter/transform",
            r.stream, local.subjects
        ));
    }
    if (image.starts_with('$') && !crate::uplink::source::store_subject_of(&r.stream, &image))
        || image.starts_with("_INBOX.")
    {
        return err(format!(
            "{key}: sourced subjects {image:?} would land in the reserved $ / _INBOX. namespace (only a KV_<b> stream may take $KV.<b>.>, an OBJ_<b> stream $O.<b>.>)"
        ));
    }
    if mirrors
        .iter()
        .any(|m| m.stream == r.stream && m.to == r.from)
    {
        return err(format!(
            "{key}: stream {:?} is mirrored up to hub stream {:?} and sourced down from it: a loop; source into another local stream",
            r.stream, r.from
        ));
    }
    let start = match (r.deliver.as_deref(), r.start_seq, r.start_time) {
        (None | Some("all"), None, None) => SourceStart::All,
        (Some("new"), None, None) => SourceStart::New,
        (None, Some(0), None) => return err(format!("{key}.start_seq: sequences start at 1")),
        (None, Some(n), None) => SourceStart::Seq(n),
        (None, None, Some(t)) => {
            if !looks_like_rfc3339(&t) {
                return err(format!(
                    "{key}.start_time: {t:?} is not an RFC 3339 time such as \"2026-12-01T08:00:00Z\""
                ));
            }
            SourceStart::Time(t)
        }
        (Some(d), None, None) => {
            return err(format!("{key}.deliver: {d:?}: use \"all\" or \"new\""))
        }
        _ => {
            return err(format!(
                "{key}: give at most one of deliver, start_seq and start_time"
            ))
        }
    };
    if r.poll_interval < Duration::from_millis(100) {
        return err(format!("{key}.poll_interval: must be at least 100ms"));
    }
    Ok(SourceConfig {
        from: r.from,
        filter: r.filter.filter(|f| f != ">"),
        stream: r.stream,
        transform: r.subject_transform.map(|t| (t.from, t.to)),
        start,
        poll_interval: r.poll_interval,
    })
}

/// The filter covering every subject a transform's destination yields
/// (`None` when a token may expand to several tokens).
fn transform_image(to: &str) -> Option<String> {
    let toks: Vec<&str> = to
        .split('.')
        .map(|t| {
            let f = t.to_ascii_lowercase();
            if t == ">" {
                Some(">")
            } else if t.starts_with('$')
                || f.starts_with("{{wildcard(")
                || f.starts_with("{{partition(")
            {
                Some("*")
            } else if t.contains("{{") {
                None
            } else {
                Some(t)
            }
        })
        .collect::<Option<_>>()?;
    Some(toks.join("."))
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`; the hub parses it.
fn looks_like_rfc3339(t: &str) -> bool {
    let b = t.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    let head = digits(0..4)
        && at(4, b'-')
        && digits(5..7)
        && at(7, b'-')
        && digits(8..10)
        && (at(10, b'T') || at(10, b't'))
        && digits(11..13)
        && at(13, b':')
        && digits(14..16)
        && at(16, b':')
        && digits(17..19);
    let mut rest = t.get(19..).unwrap_or("");
    if let Some(f) = rest.strip_prefix('.') {
        let n = f.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = f.get(n..).unwrap_or("");
    }
    let zone = rest == "Z"
        || rest == "z"
        || (rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && rest.as_bytes().get(3) == Some(&b':')
            && rest
                .bytes()
                .enumerate()
                .all(|(i, c)| i == 0 || i == 3 || c.is_ascii_digit()));
    head && zone
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

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
        let e = up("creds = \"/nonexistent/hub.creds\"").unwrap_err();
        assert!(e.0.contains("uplink.creds: cannot read"), "{e}");
    }

    fn source_cfg(source: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!(
            "[[stream]]\nname = \"CMD\"\nsubjects = [\"cmd.>\"]\n[[stream]]\nname = \"T\"\nsubjects = [\"t.>\"]\n[uplink]\nurls = [\"nats://h\"]\n[[uplink.mirror]]\nstream = \"T\"\nto = \"FLEET\"\n[[uplink.source]]\n{source}\n"
        ))
    }

    #[test]
    fn uplink_sources() {
        let base = "from = \"COMMANDS\"\nstream = \"CMD\"\nfilter = \"cmd.truck-042.>\"\n";
        let c = source_cfg(&format!(
            "{base}subject_transform = {{ from = \"cmd.truck-042.>\", to = \"cmd.>\" }}"
        ))
        .unwrap();
        let s = &c.uplink.unwrap().sources[0];
        assert_eq!(s.filter.as_deref(), Some("cmd.truck-042.>"));
        assert_eq!(
            s.transform,
            Some(("cmd.truck-042.>".into(), "cmd.>".into()))
        );
        assert_eq!(
            (s.start.clone(), s.poll_interval),
            (SourceStart::All, Duration::from_secs(10))
        );
        let start = |extra: &str| {
            source_cfg(&format!("{base}{extra}"))
                .map(|c| c.uplink.unwrap().sources[0].start.clone())
        };
        assert_eq!(start("deliver = \"new\"").unwrap(), SourceStart::New);
        assert_eq!(start("start_seq = 9").unwrap(), SourceStart::Seq(9));
        let t = "2026-12-01T08:00:00.5+01:00";
        assert_eq!(
            start(&format!("start_time = \"{t}\"")).unwrap(),
            SourceStart::Time(t.into())
        );
        for (bad, why) in [
            ("deliver = \"last\"", "\"all\" or \"new\""),
            ("deliver = \"new\"\nstart_seq = 3", "at most one"),
            ("start_seq = 0", "start at 1"),
            ("start_time = \"yesterday\"", "RFC 3339"),
            ("poll_interval = \"1ms\"", "at least 100ms"),
            ("bogus = 1", "bogus"),
        ] {
            let e = start(bad).unwrap_err();
            assert!(e.0.contains(why), "{bad}: {e}");
        }
        for (bad, why) in [
            // The local stream must capture what arrives.
            ("from = \"COMMANDS\"\nstream = \"CMD\"", "not all captured"),
            ("from = \"COMMANDS\"\nstream = \"CMD\"\nfilter = \"x.>\"", "not all captured"),
            (&format!("{base}subject_transform = {{ from = \"cmd.truck-042.>\", to = \"x.>\" }}"), "not all captured"),
            (&format!("{base}subject_transform = {{ from = \"cmd.other.>\", to = \"cmd.>\" }}"), "must match every subject"),
            (&format!("{base}subject_transform = {{ from = \"cmd.*.>\", to = \"cmd.{{{{split(1,-)}}}}.>\" }}"), "only literal tokens"),
            ("from = \"COMMANDS\"\nstream = \"NOPE\"", "no local stream"),
            ("from = \"A.B\"\nstream = \"CMD\"\nfilter = \"cmd.>\"", "not a valid hub stream"),
            // A loop: T is mirrored up to FLEET.
            ("from = \"FLEET\"\nstream = \"T\"\nfilter = \"t.>\"", "loop"),
        ] {
            let e = source_cfg(bad).unwrap_err();
            assert!(e.0.contains(why), "{bad}: {e}");
        }
        let twice = format!("{base}\n[[uplink.source]]\n{base}");
        assert!(source_cfg(&twice)
            .unwrap_err()
            .0
            .contains("already sourced"));
        assert_eq!(
            transform_image("cmd.$1.{{partition(4,1)}}.>").as_deref(),
            Some("cmd.*.*.>")
        );
    }

    #[test]
    fn bridge_export_and_import() {
        let up =
            |extra: &str| Config::parse(&format!("[uplink]\nurls = [\"nats://h\"]\n{extra}\n"));
        let c = up("[[uplink.export]]\nsubjects = [\"svc.t.>\", \"cfg.t\"]\n[[uplink.import]]\nsubjects = [\"fleet.broadcast.>\"]\nhub_prefix = \"hub.\"").unwrap();
        let u = c.uplink.unwrap();
        assert_eq!(
            u.exports,
            vec![
                BridgeSubject {
                    subject: "svc.t.>".into(),
                    hub_prefix: String::new()
                },
                BridgeSubject {
                    subject: "cfg.t".into(),
                    hub_prefix: String::new()
                },
            ]
        );
        assert_eq!(u.imports[0].hub_prefix, "hub.");
        for bad in [
            "$JS.>",
            "$SYS.>",
            "_INBOX.>",
            ">",
            "*.x",
            "$JS.API.STREAM.INFO.X",
            "a..b",
            "",
        ] {
            let e = up(&format!("[[uplink.export]]\nsubjects = [{bad:?}]")).unwrap_err();
            assert!(e.0.contains("uplink.export[0].subjects"), "{bad}: {e}");
            let e = up(&format!("[[uplink.import]]\nsubjects = [{bad:?}]")).unwrap_err();
            assert!(e.0.contains("uplink.import[0].subjects"), "{bad}: {e}");
        }
        let e = up("[[uplink.import]]\nsubjects = [\"a\"]\nhub_prefix = \"$JS.API.\"").unwrap_err();
        assert!(e.0.contains("uplink.import[0].hub_prefix"), "{e}");
        let e = up("[[uplink.import]]\nsubjects = [\"a\"]\nhub_prefix = \"hub\"").unwrap_err();
        assert!(e.0.contains("hub_prefix"), "{e}");
        let e = up("[[uplink.export]]\nsubjects = []").unwrap_err();
        assert!(e.0.contains("at least one"), "{e}");
        let e = up("[[uplink.export]]\nsubjects = [\"a\"]\nqueue = \"q\"").unwrap_err();
        assert!(e.0.contains("queue"), "{e}");
    }

    #[test]
    fn max_rate_priority_and_ping_interval() {
        let up = |extra: &str, mirror: &str| {
            Config::parse(&format!(
                "[[stream]]\nname = \"T\"\nsubjects = [\"t.>\"]\n[uplink]\nurls = [\"nats://h\"]\n{extra}\n[[uplink.mirror]]\nstream = \"T\"\nto = \"H\"\n{mirror}\n"
            ))
        };
        let u = up("", "").unwrap().uplink.unwrap();
        assert_eq!(u.max_rate, None);
        assert_eq!(u.ping_interval, Duration::from_secs(10));
        assert_eq!(u.mirrors[0].priority, 0);
        assert!(u.pipeline, "pipelining is on by default");
        assert!(!up("pipeline = false", "").unwrap().uplink.unwrap().pipeline);
        assert!(up("pipeline = \"yes\"", "").is_err());
        let u = up(
            "max_rate = \"256KiB\"\nping_interval = \"2s\"",
            "priority = 7",
        )
        .unwrap()
        .uplink
        .unwrap();
        assert_eq!(u.max_rate, Some(256 * 1024));
        assert_eq!(u.ping_interval, Duration::from_secs(2));
        assert_eq!(u.mirrors[0].priority, 7);
        assert_eq!(
            up("max_rate = 4096", "").unwrap().uplink.unwrap().max_rate,
            Some(4096)
        );
        let e = up("max_rate = 100", "").unwrap_err();
        assert!(
            e.0.contains("uplink.max_rate") && e.0.contains("minimum"),
            "{e}"
        );
        assert!(up("max_rate = \"fast\"", "").is_err());
        let e = up("ping_interval = \"10ms\"", "").unwrap_err();
        assert!(e.0.contains("uplink.ping_interval"), "{e}");
        assert!(up("", "priority = \"high\"").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn creds_go_alone() {
        use std::os::unix::fs::PermissionsExt;
        let seed = crate::nkey::SeedKey::from_bytes([5u8; 32]);
        let b = crate::nkey::base64url_encode;
        let claims = format!("{{\"sub\":\"{}\"}}", seed.public_key());
        let jwt = format!("{}.{}.{}", b(b"{}"), b(claims.as_bytes()), b(b"s"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.creds");
        std::fs::write(
            &p,
            format!("-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n", seed.encode()),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let up = |extra: &str| {
            Config::parse(&format!(
                "[uplink]\nurls = [\"nats://h\"]\ncreds = \"{}\"\n{extra}\n",
                p.display()
            ))
        };
        let c = up("").unwrap().uplink.unwrap().creds.unwrap();
        assert_eq!((c.jwt.as_str(), &c.seed), (jwt.as_str(), &seed));
        let e = up("token = \"t\"").unwrap_err();
        assert!(e.0.contains("creds or nkey_seed"), "{e}");
    }

    #[test]
    fn hub_urls() {
        let u = parse_hub_url("nats://127.0.0.1:4333").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 4333));
        let t = parse_hub_url("tls://hub.example:4443").unwrap();
        assert!(t.tls && !u.tls);
        assert_eq!(t.to_string(), "tls://hub.example:4443");
        let w = parse_hub_url("ws://hub.example:8080").unwrap();
        assert!(w.ws && !w.tls && w.port == 8080, "{w:?}");
        assert_eq!(w.to_string(), "ws://hub.example:8080");
        let w = parse_hub_url("wss://hub.example").unwrap();
        assert!(w.ws && w.tls && w.port == 443, "{w:?}");
        assert!(parse_hub_url("http://h").is_err());
        assert!(parse_hub_url("nats://h:notaport").is_err());
    }

    #[test]
    fn max_inflight_default_follows_the_transport() {
        let up = |urls: &str, extra: &str| {
            Config::parse(&format!("[uplink]\nurls = [{urls}]\n{extra}\n"))
                .map(|c| c.uplink.unwrap().max_inflight)
                .map_err(|e| e.0)
        };
        assert_eq!(up("\"nats://h\"", ""), Ok(256));
        assert_eq!(up("\"ws://h:8080\", \"wss://g\"", ""), Ok(1024));
        assert_eq!(up("\"ws://h:8080\", \"nats://g\"", ""), Ok(256));
        assert_eq!(up("\"ws://h:8080\"", "max_inflight = 64"), Ok(64));
        let e = up("\"ws://h\"", "max_inflight = 0").unwrap_err();
        assert!(e.contains("uplink.max_inflight"), "{e}");
    }
}
