//! `frond run`: open the streams, start the listeners and the uplink, and
//! shut everything down cleanly on SIGINT/SIGTERM.
//!
//! Owns the process lifecycle. Start-up order: descriptor limit check, data
//! directory lock, streams (recovery is logged), router, listeners, uplink.
//! Shutdown order is the reverse: stop accepting, let the uplink persist
//! its cursors, then close every stream (flush, fsync, files closed).
//!
//! Descriptors: at start the soft `RLIMIT_NOFILE` (read from
//! `/proc/self/limits`) is compared with [`descriptors_needed`], the
//! connection limits of the enabled listeners plus a reserve for streams
//! and files. When it is lower, the soft limit is raised to the hard limit
//! (`setrlimit` through rustix, no `unsafe`; the shipped unit's system
//! call filter refuses it, and its `LimitNOFILE` sets both anyway), and if
//! that is still not enough a warning says what to change.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::channel::{bounded, Receiver};
use smol::future::FutureExt;
use smol::Task;

use crate::broker::persist::SessionStore;
use crate::broker::retained::{Retained, RetainedLimits};
use crate::broker::wills::{unix_ms, StoredWill, WillStore};
use crate::config::Config;
use crate::router::Broker;
use crate::server;
use crate::server::mqtt::DelayedWills;
use crate::stream::{self, StreamHandle};
use crate::uplink::{self, UplinkStatus};

/// Run until a termination signal.
pub fn run(cfg: Config) -> Result<(), String> {
    // smol's global executor reads SMOL_THREADS when the first task is
    // spawned (below); no other thread exists yet. An operator's
    // SMOL_THREADS in the environment wins over `threads`.
    if std::env::var_os("SMOL_THREADS").is_none() {
        std::env::set_var("SMOL_THREADS", cfg.threads.to_string());
    }
    crate::logger::init(&cfg.log);
    for w in cfg.mqtt.auth.iter().flat_map(|a| a.warnings()) {
        log::warn!("{w}");
    }
    log::info!(
        "frond {} starting: node {}, data in {}",
        env!("CARGO_PKG_VERSION"),
        cfg.node,
        cfg.data_dir.display()
    );
    check_descriptor_limit(&cfg);
    std::fs::create_dir_all(cfg.data_dir.join("streams")).map_err(|e| {
        format!(
            "cannot create data directory {}: {e} (set data_dir in the config)",
            cfg.data_dir.display()
        )
    })?;
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let handles = open_streams(&cfg)?;
    let (mqtt, owed_wills) = open_mqtt_state(&cfg)?;
    let broker = Broker::with_mappings(handles.clone(), cfg.mappings.clone());
    publish_owed_wills(&broker, &mqtt.wills, owed_wills);
    let (stop_tx, stop_rx) = bounded::<()>(1);
    install_signals(stop_tx.clone())?;

    let result = smol::block_on(async {
        let uplink_status = cfg.uplink.as_ref().map(|_| Arc::new(UplinkStatus::new()));
        let mut tasks = start_listeners(&cfg, &broker, mqtt, &uplink_status, &stop_rx).await?;
        if let Some(t) = start_uplink(&cfg, &broker, &uplink_status, &stop_rx)? {
            tasks.push(t);
        }
        log::info!("ready");
        let _ = stop_rx.recv().await;
        wait_for_shutdown(tasks, &broker.streams()).await;
        Ok::<(), String>(())
    });
    drop(stop_rx);
    if result.is_ok() {
        log::info!("stopped cleanly");
    }
    result
}

/// Opens every stream (recovering it), logging what it holds: those
/// created over the JetStream API first (they come before the frond.toml
/// streams in capture order, see [`crate::router::StreamSet`]), then the
/// configured ones.
fn open_streams(cfg: &Config) -> Result<Vec<StreamHandle>, String> {
    let mut handles: Vec<StreamHandle> = Vec::new();
    let api = server::jsapi::api_stream_configs(
        &cfg.data_dir.join("streams"),
        &cfg.streams,
        stream_key(cfg).as_ref(),
    );
    for sc in api.iter().chain(&cfg.streams) {
        let dir = crate::stream::names::path_in(&cfg.data_dir.join("streams"), &sc.name, "")
            .map_err(|e| format!("stream name {:?}: {e}", sc.name))?;
        let (h, report) = stream::open(&dir, sc.clone())
            .map_err(|e| format!("cannot open stream {} in {}: {e}", sc.name, dir.display()))?;
        let st = h.state();
        if report.truncated_bytes > 0 || report.lost_records > 0 {
            log::warn!(
                "stream {}: recovered {} records, truncated {} bytes of a torn or corrupt tail, {} records lost",
                sc.name,
                report.records,
                report.truncated_bytes,
                report.lost_records
            );
        } else {
            log::info!(
                "stream {}: {} messages (seq {}..={}), {} bytes",
                sc.name,
                st.msgs,
                st.first_seq,
                st.last_seq,
                st.bytes
            );
        }
        handles.push(h);
    }
    Ok(handles)
}

/// The encryption key of new file streams (`encryption_key_file`; every
/// configured stream carries it).
fn stream_key(cfg: &Config) -> Option<crate::store::crypt::Key> {
    cfg.streams.iter().find_map(|s| s.key.clone())
}

/// What `max_storage` leaves for file streams created over the API: the
/// budget less the frond.toml file streams' `max_bytes` and the retained
/// messages' share (`None`: no `max_storage`).
fn storage_left(cfg: &Config) -> Option<u64> {
    (cfg.max_storage > 0).then(|| {
        let fixed = cfg
            .streams
            .iter()
            .filter(|s| s.storage == stream::Storage::File)
            .map(|s| s.max_bytes)
            .fold(
                cfg.mqtt.max_retained_bytes.saturating_mul(2),
                u64::saturating_add,
            );
        cfg.max_storage.saturating_sub(fixed)
    })
}

/// The MQTT state that outlives connections.
struct MqttState {
    retained: Arc<Retained>,
    sessions: Arc<SessionStore>,
    wills: Arc<DelayedWills>,
}

/// Opens the retained messages, persistent sessions and wills; returns
/// them and the wills owed from the last run that the current `[auth]`
/// still allows.
fn open_mqtt_state(cfg: &Config) -> Result<(MqttState, Vec<StoredWill>), String> {
    let mqtt_dir = cfg.data_dir.join("mqtt");
    let limits = RetainedLimits {
        max_msgs: cfg.mqtt.max_retained,
        max_bytes: cfg.mqtt.max_retained_bytes,
    };
    let env = crate::broker::retained::env();
    let (retained, rep) = Retained::open_limited(&mqtt_dir, limits, env).map_err(|e| {
        format!(
            "cannot open retained messages in {}: {e}",
            mqtt_dir.display()
        )
    })?;
    if rep.truncated_bytes > 0 {
        log::warn!(
            "retained: {} messages, truncated {} bytes of a torn tail",
            rep.messages,
            rep.truncated_bytes
        );
    }
    let retained = Arc::new(retained);
    let sessions_dir = mqtt_dir.join("sessions");
    let clock = crate::broker::persist::clock();
    let (sessions, kept, expired) = SessionStore::open(&sessions_dir, clock).map_err(|e| {
        format!(
            "cannot open MQTT sessions in {}: {e} (check that the directory is writable)",
            sessions_dir.display()
        )
    })?;
    if kept + expired > 0 {
        log::info!("mqtt: {kept} persistent sessions, {expired} expired ones deleted");
    }
    let sessions = Arc::new(sessions);
    let wills_dir = mqtt_dir.join("wills");
    let (will_store, owed_wills) = WillStore::open(&wills_dir).map_err(|e| {
        format!(
            "cannot open MQTT wills in {}: {e} (check that the directory is writable)",
            wills_dir.display()
        )
    })?;
    // Permissions may have been narrowed (or users removed) since a will
    // was armed: each is checked again against the current `[auth]`.
    let mut owed_wills = owed_wills;
    owed_wills.retain(|w| match w.authorized(cfg.mqtt.auth.as_deref()) {
        Ok(()) => true,
        Err(why) => {
            log::warn!(
                "mqtt: the will of client {:?} on {} from the last run is not published: {why}",
                w.client_id,
                w.subject
            );
            if let Err(e) = will_store.settle(&w.client_id, w.token) {
                log::warn!("mqtt: cannot delete a refused will's file: {e}");
            }
            false
        }
    });
    let wills = Arc::new(DelayedWills::with_store(will_store, retained.clone()));
    Ok((
        MqttState {
            retained,
            sessions,
            wills,
        },
        owed_wills,
    ))
}

/// Publishes (or schedules, when delayed) the wills of connections that
/// ended with the last run.
fn publish_owed_wills(
    broker: &Arc<Broker>,
    wills: &Arc<DelayedWills>,
    owed_wills: Vec<StoredWill>,
) {
    if !owed_wills.is_empty() {
        log::info!(
            "mqtt: {} wills of connections that ended with the last run are published when due",
            owed_wills.len()
        );
    }
    let now_ms = unix_ms();
    for w in owed_wills {
        if let Some(will) = w.owed(now_ms) {
            server::mqtt::publish_will(broker, wills, Some((w.client_id, w.token)), will);
        }
    }
}

/// Binds and starts every enabled listener (MQTT in its four framings,
/// NATS, HTTP monitoring) and the JetStream API service.
async fn start_listeners(
    cfg: &Config,
    broker: &Arc<Broker>,
    mqtt: MqttState,
    uplink_status: &Option<Arc<UplinkStatus>>,
    stop_rx: &Receiver<()>,
) -> Result<Vec<Task<()>>, String> {
    let mut tasks = Vec::new();
    start_mqtt_listeners(cfg, broker, mqtt, stop_rx, &mut tasks).await?;
    // The JetStream API and consumers of the local streams (also runs
    // interest/workqueue retention, so it starts without a NATS port);
    // subscribed before the NATS port opens.
    let admin = server::jsapi::Admin {
        broker: broker.clone(),
        streams_dir: cfg.data_dir.join("streams"),
        config_streams: cfg.streams.iter().map(|s| s.name.clone()).collect(),
        storage_left: storage_left(cfg),
        key: stream_key(cfg),
        max_streams: cfg.max_streams,
        max_memory: cfg.max_memory,
        max_storage: cfg.max_storage,
        memory_left: cfg.max_memory.saturating_sub(
            cfg.streams
                .iter()
                .filter(|s| s.storage == stream::Storage::Memory)
                .map(|s| s.max_bytes)
                .fold(0, u64::saturating_add),
        ),
    };
    let mirrored: Vec<String> = cfg
        .uplink
        .iter()
        .flat_map(|u| u.mirrors.iter().map(|m| m.stream.clone()))
        .collect();
    tasks.push(smol::spawn(server::jsapi::serve(
        broker.clone(),
        cfg.data_dir.join("streams"),
        mirrored,
        admin,
        uplink_status.clone(),
        stop_rx.clone(),
    )));
    if let Some(addr) = &cfg.nats.listen {
        let l = smol::net::TcpListener::bind(addr.as_str())
            .await
            .map_err(|e| format!("nats.listen {addr}: cannot listen: {e}"))?;
        log::info!("nats: listening on {addr}");
        tasks.push(smol::spawn(server::nats::serve(
            l,
            broker.clone(),
            cfg.nats.clone(),
            cfg.node.clone(),
            stop_rx.clone(),
        )));
    }
    if let Some(addr) = &cfg.http.listen {
        let l = smol::net::TcpListener::bind(addr.as_str())
            .await
            .map_err(|e| format!("http.listen {addr}: cannot listen: {e}"))?;
        log::info!("http: monitoring on http://{addr}/varz");
        let monitor = Arc::new(server::http::Monitor {
            node: cfg.node.clone(),
            started: Instant::now(),
            broker: broker.clone(),
            uplink: uplink_status.clone(),
        });
        tasks.push(smol::spawn(server::http::serve(
            l,
            monitor,
            cfg.http.clone(),
            stop_rx.clone(),
        )));
    }
    Ok(tasks)
}

/// The MQTT listeners: TCP, WebSocket, TLS and WebSocket over TLS.
async fn start_mqtt_listeners(
    cfg: &Config,
    broker: &Arc<Broker>,
    mqtt: MqttState,
    stop_rx: &Receiver<()>,
    tasks: &mut Vec<Task<()>>,
) -> Result<(), String> {
    let acceptor = match &cfg.tls {
        None => None,
        Some(t) => Some(futures_rustls::TlsAcceptor::from(
            crate::tls::server_config(&t.cert, &t.key, t.ca.as_deref())?,
        )),
    };
    let mqtt_shared = server::mqtt::Shared {
        broker: broker.clone(),
        retained: mqtt.retained,
        sessions: mqtt.sessions,
        wills: mqtt.wills,
    };
    let mqtt_listeners = [
        ("listen", &cfg.mqtt.listen, false, false, "mqtt://"),
        ("ws_listen", &cfg.mqtt.ws_listen, false, true, "ws://"),
        ("tls_listen", &cfg.mqtt.tls_listen, true, false, "mqtts://"),
        ("wss_listen", &cfg.mqtt.wss_listen, true, true, "wss://"),
    ];
    for (key, addr, tls, websocket, scheme) in mqtt_listeners {
        let Some(addr) = addr else { continue };
        let l = smol::net::TcpListener::bind(addr.as_str())
            .await
            .map_err(|e| format!("mqtt.{key} {addr}: cannot listen: {e}"))?;
        let ws = if websocket {
            "/ (WebSocket, subprotocol mqtt)"
        } else {
            ""
        };
        log::info!("mqtt: listening on {scheme}{addr}{ws}");
        let framing = server::mqtt::Framing {
            tls: if tls { acceptor.clone() } else { None },
            websocket,
        };
        tasks.push(smol::spawn(server::mqtt::serve(
            l,
            mqtt_shared.clone(),
            cfg.mqtt.clone(),
            stop_rx.clone(),
            framing,
        )));
    }
    Ok(())
}

/// The uplink to the hub, when configured (its TLS files checked first).
fn start_uplink(
    cfg: &Config,
    broker: &Arc<Broker>,
    uplink_status: &Option<Arc<UplinkStatus>>,
    stop_rx: &Receiver<()>,
) -> Result<Option<Task<()>>, String> {
    if let (Some(u), Some(status)) = (&cfg.uplink, &uplink_status) {
        if u.tls_ca.is_some() || u.tls_client.is_some() {
            // Bad certificate files stop the start, not each reconnect.
            let client = u
                .tls_client
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path()));
            crate::tls::client_config(u.tls_ca.as_deref(), client)?;
        }
        return Ok(Some(smol::spawn(uplink::run(
            u.clone(),
            cfg.node.clone(),
            cfg.data_dir.clone(),
            broker.clone(),
            status.clone(),
            stop_rx.clone(),
        ))));
    }
    Ok(None)
}

/// After the stop signal: waits for every task (at most 10 s each; the
/// uplink persists its cursors), then closes every stream.
async fn wait_for_shutdown(tasks: Vec<Task<()>>, handles: &[StreamHandle]) {
    log::info!("shutting down");
    for t in tasks {
        // Listeners stop at once; the uplink persists its cursors.
        let done = async {
            t.await;
            true
        }
        .or(async {
            smol::Timer::after(Duration::from_secs(10)).await;
            false
        })
        .await;
        if !done {
            log::warn!("a task did not stop within 10s; closing anyway");
        }
    }
    for h in handles {
        h.close().await;
    }
}

/// Descriptors kept for everything but connections: listeners, the event
/// loop, signal pipe, log, retained log, session and will files being
/// written, the uplink, and slack.
pub const FD_RESERVE: u64 = 64;
/// Descriptors per stream: up to 16 cached segment handles, the
/// directory, index snapshots and tombstone files being written.
pub const FD_PER_STREAM: u64 = 20;

/// Descriptors frond may need with every enabled listener at its
/// connection limit: `(connections, reserve)`.
pub fn descriptors_needed(cfg: &Config) -> (u64, u64) {
    let m = &cfg.mqtt;
    let mqtt = [&m.listen, &m.ws_listen, &m.tls_listen, &m.wss_listen]
        .iter()
        .any(|l| l.is_some());
    let conns = [
        (mqtt, cfg.mqtt.max_connections),
        (cfg.nats.listen.is_some(), cfg.nats.max_connections),
        (cfg.http.listen.is_some(), cfg.http.max_connections),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| *n as u64)
    .sum();
    let reserve = FD_RESERVE + FD_PER_STREAM * cfg.streams.len() as u64;
    (conns, reserve)
}

/// The soft and hard `RLIMIT_NOFILE` from the text of `/proc/self/limits`
/// (`u64::MAX` for "unlimited").
pub fn parse_nofile(limits: &str) -> Option<(u64, u64)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line.strip_prefix("Max open files")?.split_whitespace();
    let value = |f: Option<&str>| match f? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    };
    Some((value(fields.next())?, value(fields.next())?))
}

/// Warn (after trying to raise the soft limit to the hard one) when the
/// descriptor limit is below what the configured connection limits and
/// the streams may need.
fn check_descriptor_limit(cfg: &Config) {
    let (conns, reserve) = descriptors_needed(cfg);
    let need = conns + reserve;
    let limits = match std::fs::read_to_string("/proc/self/limits") {
        Ok(t) => t,
        Err(e) => {
            log::debug!("cannot read /proc/self/limits ({e}); descriptor limit not checked");
            return;
        }
    };
    let Some((mut soft, hard)) = parse_nofile(&limits) else {
        log::debug!("no \"Max open files\" in /proc/self/limits; descriptor limit not checked");
        return;
    };
    if soft < need && hard > soft {
        let to = if hard == u64::MAX { need } else { hard };
        let new = rustix::process::Rlimit {
            current: Some(to),
            maximum: (hard != u64::MAX).then_some(hard),
        };
        match rustix::process::setrlimit(rustix::process::Resource::Nofile, new) {
            Ok(()) => {
                log::info!("raised the open-file limit (RLIMIT_NOFILE) from {soft} to {to}");
                soft = to;
            }
            Err(e) => log::info!(
                "cannot raise the open-file limit (RLIMIT_NOFILE) from {soft} to its hard limit {hard}: {e}"
            ),
        }
    }
    if soft < need {
        log::warn!(
            "the open-file limit (RLIMIT_NOFILE) is {soft}, but mqtt.max_connections ({}) + nats.max_connections ({}) + http.max_connections ({}) of the enabled listeners + {reserve} for streams and files need {need}: under load, connections and stream writes fail with \"too many open files\"; raise LimitNOFILE= in the systemd unit (or ulimit -n), or lower the connection limits",
            cfg.mqtt.max_connections,
            cfg.nats.max_connections,
            cfg.http.max_connections
        );
    } else {
        log::debug!("open-file limit {soft}, {need} needed at most");
    }
}

/// One frond per data directory: a second one would corrupt the streams.
fn lock_data_dir(dir: &Path) -> Result<File, String> {
    let path = dir.join("LOCK");
    let f = File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "data directory {} is in use by another frond process",
            dir.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// SIGINT/SIGTERM close the stop channel, which every task watches.
fn install_signals(stop: smol::channel::Sender<()>) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig} received");
                stop.close();
            }
        })
        .map_err(|e| format!("cannot start signal thread: {e}"))?;
    Ok(())
}

/// Render `/varz` for `frond status`.
pub fn format_status(varz_json: &str) -> String {
    use std::fmt::Write;
    let v: serde_json::Value = match serde_json::from_str(varz_json) {
        Ok(v) => v,
        Err(_) => return varz_json.to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "frond {} node {} up {}s",
        v["version"].as_str().unwrap_or("?"),
        v["node"].as_str().unwrap_or("?"),
        v["uptime_secs"]
    );
    let _ = writeln!(
        out,
        "mqtt: {} connections, {} messages in",
        v["mqtt"]["connections"], v["mqtt"]["msgs_in"]
    );
    if let Some(streams) = v["streams"].as_array() {
        for s in streams {
            let _ = writeln!(
                out,
                "stream {}: {} messages, {} bytes, seq {}..={}",
                s["name"].as_str().unwrap_or("?"),
                s["messages"],
                s["bytes"],
                s["first_seq"],
                s["last_seq"]
            );
        }
    }
    if v["uplink"].is_null() {
        let _ = writeln!(out, "uplink: not configured");
    } else {
        out.push_str(&crate::uplink::status::format_text(&v["uplink"]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_open_file_limit() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \nMax cpu time              unlimited            unlimited            seconds   \nMax open files            1024                 524288               files     \n";
        assert_eq!(parse_nofile(text), Some((1024, 524_288)));
        let text = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_nofile(text), Some((u64::MAX, u64::MAX)));
        assert_eq!(parse_nofile("Max processes 1 2 processes\n"), None);
        assert_eq!(parse_nofile("Max open files  lots  1 files\n"), None);
    }

    /// The defaults fit the shipped unit's LimitNOFILE, and every board's
    /// frond.toml its board.env's LIMIT_NOFILE.
    #[test]
    fn connection_limits_fit_the_shipped_descriptor_limits() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("boards");
        let unit = std::fs::read_to_string(root.join("frond.service")).unwrap();
        let unit_limit: u64 = unit
            .lines()
            .find_map(|l| l.strip_prefix("LimitNOFILE="))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let (c, r) = descriptors_needed(&Config::defaults());
        assert!(
            c + r <= unit_limit,
            "defaults need {c} + {r} > {unit_limit}"
        );
        let mut boards = 0;
        for entry in std::fs::read_dir(&root).unwrap() {
            let dir = entry.unwrap().path();
            let (Ok(toml), Ok(env)) = (
                std::fs::read_to_string(dir.join("frond.toml")),
                std::fs::read_to_string(dir.join("board.env")),
            ) else {
                continue;
            };
            let limit: u64 = env
                .lines()
                .find_map(|l| l.strip_prefix("LIMIT_NOFILE="))
                .unwrap_or_else(|| panic!("{}: no LIMIT_NOFILE", dir.display()))
                .trim()
                .parse()
                .unwrap();
            let cfg = Config::parse(&toml).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let (c, r) = descriptors_needed(&cfg);
            assert!(
                c + r <= limit,
                "{}: connection limits {c} + reserve {r} exceed LIMIT_NOFILE {limit}",
                dir.display()
            );
            boards += 1;
        }
        assert!(boards >= 5, "found {boards} boards");
    }
}
