//! Streams over the API: `STREAM.CREATE`, `STREAM.UPDATE` and
//! `STREAM.DELETE`, with nats-server's answers and error codes.
//!
//! Owns: the streams created through the API — their records on disk
//! ([`crate::state::api_streams`]), their place in the router's registry
//! ([`crate::router::StreamSet`]) and their slots in the service; and the
//! reading of those records at start ([`open_api_streams`]).
//!
//! Rules (see also the README's JetStream section):
//! - frond.toml streams are authoritative: `UPDATE`/`DELETE` of one is
//!   refused (10052, "defined in frond.toml"); `CREATE` of one answers its
//!   info when the config is the same (so `get_or_create` works) and 10058
//!   otherwise. A created stream whose name later appears in frond.toml is
//!   the file's (warned at start, its API record dropped).
//! - Subjects may not overlap another stream's (10065), except a catch-all
//!   stream's (`>`, the default stream when frond.toml has no `[[stream]]`):
//!   it captures only what no other stream captures.
//! - With `max_storage`, a created file stream must set `max_bytes`
//!   (10113, as nats-server with `max_bytes_required`) and the created file
//!   streams' `max_bytes` together must fit in what the frond.toml streams
//!   and retained messages leave of it (10047).
//! - At most `max_streams` streams in all (10027, frond.toml's count); a
//!   memory stream must set `max_bytes` (10113) and the created memory
//!   streams' `max_bytes` together fit in what `max_memory` leaves after
//!   frond.toml's memory streams (10028), so no client allocates unbounded
//!   RAM.
//! - Durable before answered: a create or update answers once the record
//!   is synced and the stream open; a delete once the stream is closed and
//!   its directory gone (renamed to a tombstone first, so a crash leaves
//!   the whole stream or nothing). A deleted stream's consumers go with it.
//! - An update closes the stream and opens it again with the new config
//!   (file streams; the messages stay). A memory stream would lose its
//!   messages, so updating one is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use super::call::body_json;
use super::render::config_json;
use super::stream_cfg::{check_update, invalid, parse};
use super::JsApi;
use crate::router::Broker;
use crate::store::crypt::Key;
use crate::stream::consumer::ApiError;
use crate::stream::{Retention, Storage, StreamConfig, StreamHandle};

/// What the service needs to manage streams over the API.
pub struct Admin {
    pub broker: Arc<Broker>,
    /// `data_dir/streams`.
    pub streams_dir: PathBuf,
    /// Names of the frond.toml streams.
    pub config_streams: Vec<String>,
    /// Bytes of `max_storage` left for created file streams (`None`: no
    /// `max_storage`).
    pub storage_left: Option<u64>,
    /// The key new file streams are encrypted with.
    pub key: Option<Key>,
    /// Streams at most, frond.toml's included (`max_streams`).
    pub max_streams: usize,
    /// Bytes of `max_memory` left for memory streams created over the API.
    pub memory_left: u64,
    /// frond.toml's `max_memory` and `max_storage` (0: none), as
    /// `$JS.API.INFO` reports them.
    pub max_memory: u64,
    pub max_storage: u64,
}

/// Whether a stream captures everything (`>`): it yields to the others.
fn catches_all(c: &StreamConfig) -> bool {
    c.subjects.iter().any(|s| s == ">")
}

fn io_err(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        500,
        10049,
        format!("{what}: {e} (check the disk and data_dir)"),
    )
}

fn open_stream(dir: &Path, cfg: StreamConfig) -> Result<StreamHandle, ApiError> {
    crate::stream::open(dir, cfg)
        .map(|(h, _)| h)
        .map_err(|e| io_err("cannot open the stream", e))
}

impl JsApi {
    /// Manage streams over the API (without this, CREATE, UPDATE and
    /// DELETE answer an error).
    pub fn with_admin(mut self, admin: Admin) -> JsApi {
        self.admin = Some(admin);
        self
    }

    fn admin(&self) -> Result<&Admin, ApiError> {
        self.admin
            .as_ref()
            .ok_or_else(|| invalid("streams cannot be managed over the API here"))
    }

    fn is_config_stream(&self, name: &str) -> bool {
        self.admin
            .as_ref()
            .is_some_and(|a| a.config_streams.iter().any(|n| n == name))
    }

    fn config_refusal(name: &str, what: &str) -> ApiError {
        invalid(format!(
            "stream {name} is defined in frond.toml and cannot be {what} over the API; edit the config file and restart"
        ))
    }

    /// 10065 when `cfg`'s subjects overlap another stream's (but `except`).
    fn check_overlap(&self, cfg: &StreamConfig, except: Option<&str>) -> Result<(), ApiError> {
        for s in &self.slots {
            let o = s.handle.config();
            if Some(o.name.as_str()) == except || (catches_all(o) && !catches_all(cfg)) {
                continue;
            }
            for a in &cfg.subjects {
                if let Some(b) = o
                    .subjects
                    .iter()
                    .find(|b| crate::subject::filters_overlap(a, b))
                {
                    return Err(ApiError::new(
                        400,
                        10065,
                        format!(
                            "subjects overlap with an existing stream: {a:?} of {} overlaps {b:?} of stream {}",
                            cfg.name, o.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The `max_storage` rules for created file streams (`except`: the
    /// stream being updated).
    fn check_storage(&self, cfg: &StreamConfig, except: Option<&str>) -> Result<(), ApiError> {
        let admin = self.admin()?;
        let Some(left) = admin.storage_left else {
            return Ok(());
        };
        if cfg.storage != Storage::File {
            return Ok(());
        }
        if cfg.max_bytes == 0 {
            return Err(ApiError::new(
                400,
                10113,
                "account requires a stream config to have max bytes set (frond.toml sets max_storage; give the stream max_bytes)",
            ));
        }
        let used: u64 = self
            .slots
            .iter()
            .map(|s| s.handle.config())
            .filter(|c| c.storage == Storage::File && Some(c.name.as_str()) != except)
            .filter(|c| !admin.config_streams.contains(&c.name))
            .map(|c| c.max_bytes)
            .sum();
        if used.saturating_add(cfg.max_bytes) > left {
            return Err(ApiError::new(
                500,
                10047,
                format!(
                    "insufficient storage resources available: max_storage leaves {left} bytes for streams created over the API, {used} are taken, the stream asks max_bytes {}; lower max_bytes, delete a stream or raise max_storage",
                    cfg.max_bytes
                ),
            ));
        }
        Ok(())
    }

    /// The limits on what a created stream may cost: at most
    /// `max_streams` streams (10027), and a memory stream must set
    /// `max_bytes` (10113) within what `max_memory` leaves (10028).
    fn check_limits(&self, cfg: &StreamConfig) -> Result<(), ApiError> {
        let admin = self.admin()?;
        if self.slots.len() >= admin.max_streams {
            return Err(ApiError::new(
                400,
                10027,
                format!(
                    "maximum number of streams reached ({}, frond.toml's max_streams); delete a stream or raise max_streams",
                    admin.max_streams
                ),
            ));
        }
        if cfg.storage != Storage::Memory {
            return Ok(());
        }
        if cfg.max_bytes == 0 {
            return Err(ApiError::new(
                400,
                10113,
                "account requires a stream config to have max bytes set (a memory stream created over the API must set max_bytes)",
            ));
        }
        let used: u64 = self
            .slots
            .iter()
            .map(|s| s.handle.config())
            .filter(|c| c.storage == Storage::Memory && !admin.config_streams.contains(&c.name))
            .map(|c| c.max_bytes)
            .fold(0, u64::saturating_add);
        if used.saturating_add(cfg.max_bytes) > admin.memory_left {
            return Err(ApiError::new(
                500,
                10028,
                format!(
                    "insufficient memory resources available: max_memory leaves {} bytes for memory streams created over the API, {used} are taken, the stream asks max_bytes {}; lower max_bytes, delete a stream or raise max_memory",
                    admin.memory_left, cfg.max_bytes
                ),
            ));
        }
        Ok(())
    }

    /// `STREAM.CREATE.<name>`.
    pub(super) async fn stream_create(
        &mut self,
        name: &str,
        body: &[u8],
        now: u64,
    ) -> Result<Value, ApiError> {
        let req = body_json(body)?;
        let cfg = parse(name, &req, self.admin()?.key.as_ref())?;
        if let Ok(i) = self.slot_idx(name) {
            if config_json(self.slots[i].handle.config()) == config_json(&cfg) {
                return self.info_of(&self.slots[i], None, now).await;
            }
            return Err(ApiError::new(
                400,
                10058,
                "stream name already in use with a different configuration",
            ));
        }
        self.check_limits(&cfg)?;
        self.check_overlap(&cfg, None)?;
        self.check_storage(&cfg, None)?;
        let admin = self.admin()?;
        let dir = crate::stream::names::path_in(&admin.streams_dir, name, "")
            .map_err(|e| invalid(format!("invalid name: {e}")))?;
        // No stream of this name is open, so files in its directory were
        // left by another stream (one removed from frond.toml): a create
        // must not adopt its messages and durable consumers.
        if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
            log::warn!(
                "jetstream: STREAM.CREATE.{name} refused: {} holds the data of an earlier stream of that name; remove it to reuse the name",
                dir.display()
            );
            return Err(ApiError::new(
                400,
                10058,
                "stream name already in use: its directory holds an earlier stream's data (the operator must remove it)",
            ));
        }
        let record = config_json(&cfg).to_string();
        super::files::save_api_stream(&admin.streams_dir, name, record.as_bytes())
            .map_err(|e| io_err("cannot save the stream's config", e))?;
        let h = match open_stream(&dir, cfg) {
            Ok(h) => h,
            Err(e) => {
                super::files::remove_api_stream(&admin.streams_dir, name);
                return Err(e);
            }
        };
        admin.broker.add_stream(h.clone());
        log::info!("jetstream: stream {name} created over the API");
        let streams_dir = admin.streams_dir.clone();
        self.slots.push(super::new_slot(&h, &streams_dir, &[], now));
        self.created.push(h);
        let i = self.slots.len() - 1;
        self.info_of(&self.slots[i], None, now).await
    }

    /// `STREAM.UPDATE.<name>`.
    pub(super) async fn stream_update(
        &mut self,
        name: &str,
        body: &[u8],
        now: u64,
    ) -> Result<Value, ApiError> {
        let req = body_json(body)?;
        let i = self.slot_idx(name)?;
        if self.is_config_stream(name) {
            return Err(Self::config_refusal(name, "updated"));
        }
        let cfg = parse(name, &req, self.admin()?.key.as_ref())?;
        let old = self.slots[i].handle.config().clone();
        check_update(&old, &cfg)?;
        if config_json(&old) == config_json(&cfg) {
            return self.info_of(&self.slots[i], None, now).await;
        }
        if cfg.storage == Storage::Memory {
            return Err(invalid(
                "frond cannot update a memory stream without losing its messages; delete and create it again",
            ));
        }
        self.check_overlap(&cfg, Some(name))?;
        self.check_storage(&cfg, Some(name))?;
        let admin = self.admin()?;
        let dir = crate::stream::names::path_in(&admin.streams_dir, name, "")
            .map_err(|e| invalid(format!("invalid name: {e}")))?;
        let record = config_json(&cfg).to_string();
        let streams_dir = admin.streams_dir.clone();
        let broker = admin.broker.clone();
        // Close first: closing fsyncs the tombstones the old limits wrote
        // (they may wait up to a second), so a crash after the new record
        // is saved cannot bring back what the old limits removed.
        self.slots[i].handle.close().await;
        let saved = super::files::save_api_stream(&streams_dir, name, record.as_bytes());
        let h = match saved {
            Ok(()) => open_stream(&dir, cfg)?,
            Err(e) => {
                // Unchanged: reopen with the old configuration.
                let h = open_stream(&dir, old)?;
                broker.add_stream(h.clone());
                self.slots[i].handle = h.clone();
                self.created.push(h);
                return Err(io_err("cannot save the stream's config", e));
            }
        };
        broker.add_stream(h.clone());
        let slot = &mut self.slots[i];
        slot.handle = h.clone();
        let st = h.state();
        if h.config().retention != Retention::Limits && st.msgs > 0 {
            slot.check = vec![(st.first_seq, st.last_seq)];
        }
        self.created.push(h);
        log::info!("jetstream: stream {name} updated over the API");
        self.info_of(&self.slots[i], None, now).await
    }

    /// `STREAM.DELETE.<name>`: the stream, its messages and consumers.
    pub(super) async fn stream_delete(&mut self, name: &str) -> Result<Value, ApiError> {
        let i = self.slot_idx(name)?;
        if self.is_config_stream(name) {
            return Err(Self::config_refusal(name, "deleted"));
        }
        let admin = self.admin()?;
        admin.broker.remove_stream(name);
        let streams_dir = admin.streams_dir.clone();
        let slot = self.slots.remove(i);
        slot.handle.close().await;
        super::files::delete_api_stream(&streams_dir, name)
            .map_err(|e| io_err("the stream is closed but its directory was not removed", e))?;
        log::info!(
            "jetstream: stream {name} deleted over the API ({} consumers with it)",
            slot.consumers.len()
        );
        Ok(json!({"success": true}))
    }
}

/// The configs of the streams created over the API that are in
/// `streams_dir`, except those frond.toml defines (`config_streams`:
/// their records are dropped, with a warning) and those overlapping a
/// frond.toml stream (not opened, with an error).
pub fn api_stream_configs(
    streams_dir: &Path,
    config_streams: &[StreamConfig],
    key: Option<&Key>,
) -> Vec<StreamConfig> {
    let mut out: Vec<StreamConfig> = Vec::new();
    for (name, record) in crate::state::api_streams::list(streams_dir) {
        if config_streams.iter().any(|c| c.name == name) {
            log::warn!(
                "stream {name} was created over the API and is now defined in frond.toml: the file wins; the API config is dropped"
            );
            if let Err(e) = crate::state::api_streams::forget(streams_dir, &name) {
                log::warn!("stream {name}: cannot drop its API config: {e}");
            }
            continue;
        }
        let cfg = serde_json::from_slice::<Value>(&record)
            .map_err(|e| invalid(e.to_string()))
            .and_then(|v| parse(&name, &v, key));
        let cfg = match cfg {
            Ok(c) => c,
            Err(e) => {
                log::error!(
                    "stream {name}: its API config is not valid ({}); not opened — delete {} or fix it",
                    e.description,
                    streams_dir.join(&name).display()
                );
                continue;
            }
        };
        let clash = config_streams
            .iter()
            .chain(&out)
            .filter(|o| !catches_all(o) || catches_all(&cfg))
            .find(|o| {
                cfg.subjects.iter().any(|a| {
                    o.subjects
                        .iter()
                        .any(|b| crate::subject::filters_overlap(a, b))
                })
            });
        if let Some(o) = clash {
            log::error!(
                "stream {name} (created over the API) is not opened: its subjects overlap stream {} of frond.toml; change one of them",
                o.name
            );
            continue;
        }
        out.push(cfg);
    }
    out
}
