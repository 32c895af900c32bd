//! The consumer state on disk ([`crate::state::consumers`]): loading it at
//! start, saving changed durable consumers (atomically, synced) before an
//! iteration's answers go out, removing a deleted one. The only disk I/O
//! of the service.

use std::path::Path;

use super::JsApi;
use crate::stream::consumer::Consumer;

/// The consumers saved in `dir` for stream `stream`.
pub(super) fn load_consumers(dir: &Path, stream: &str, now: u64) -> Vec<Consumer> {
    crate::state::consumers::load(dir, stream, now)
}

/// Removes consumer `name`'s state from `dir` (a failure is logged: the
/// consumer is gone from memory either way).
pub(super) fn remove_consumer(dir: &Path, name: &str) {
    if let Err(e) = crate::state::consumers::remove(dir, name) {
        log::warn!(
            "jetstream: cannot remove consumer {name} in {}: {e}",
            dir.display()
        );
    }
}

impl JsApi {
    /// Write the state of changed durable consumers (atomically, synced).
    pub fn persist(&mut self) {
        for slot in &mut self.slots {
            for c in slot.consumers.values_mut() {
                if !c.dirty {
                    continue;
                }
                c.dirty = false;
                let (Some(dir), true) = (&slot.dir, c.durable()) else {
                    continue;
                };
                if let Err(e) = crate::state::consumers::save(dir, c) {
                    c.dirty = true;
                    log::error!(
                        "jetstream: cannot save consumer {} in {}: {e}; its acknowledgements may be redelivered after a restart (check the disk)",
                        c.name,
                        dir.display()
                    );
                }
            }
        }
    }
}

/// Save the config record of API stream `name` (atomically, synced).
pub(super) fn save_api_stream(streams_dir: &Path, name: &str, json: &[u8]) -> std::io::Result<()> {
    crate::state::api_streams::save(streams_dir, name, json)
}

/// Undo a create whose stream did not open (a failure is logged).
pub(super) fn remove_api_stream(streams_dir: &Path, name: &str) {
    if let Err(e) = crate::state::api_streams::remove_dir(streams_dir, name) {
        log::warn!("jetstream: stream {name}: cannot remove its directory: {e}");
    }
}

/// Remove the directory of deleted (closed) API stream `name`.
pub(super) fn delete_api_stream(streams_dir: &Path, name: &str) -> std::io::Result<()> {
    crate::state::api_streams::remove_dir(streams_dir, name)
}
