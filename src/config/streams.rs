//! `[[stream]]`: each local stream's subjects, limits and storage, and the
//! `max_storage` budget shared by the file streams.

use std::time::Duration;

use serde::Deserialize;

use super::values::{de_duration, de_size, de_sync};
use super::{err, ConfigError};
use crate::store::crypt::Key;
use crate::stream::{Discard, Retention, Storage, StreamConfig, SyncPolicy};
use crate::subject;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStream {
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
    #[serde(default)]
    allow_direct: bool,
    encrypt: Option<bool>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawRetention {
    #[default]
    Limits,
    Interest,
    Workqueue,
}

pub(super) fn default_sync() -> SyncPolicy {
    SyncPolicy::Always
}

pub(super) fn default_dup_window() -> Duration {
    Duration::from_secs(120)
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawStorage {
    #[default]
    File,
    Memory,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawDiscard {
    #[default]
    Old,
    New,
}

/// The smallest share of `max_storage` a file stream without `max_bytes`
/// may get (one minimum-size segment).
pub const MIN_STREAM_SHARE: u64 = crate::store::MIN_SEGMENT_SIZE;

/// `max_streams` and `max_memory` with their defaults, checked against the
/// frond.toml streams: at most `max_streams` of them (1 to
/// [`super::MAX_MAX_STREAMS`]), and their memory streams' `max_bytes`
/// within `max_memory`.
pub(super) fn stream_limits(
    max_streams: Option<usize>,
    max_memory: Option<u64>,
    streams: &[StreamConfig],
) -> Result<(usize, u64), ConfigError> {
    let max_streams = max_streams.unwrap_or(super::DEFAULT_MAX_STREAMS);
    if !(1..=super::MAX_MAX_STREAMS).contains(&max_streams) {
        return err(format!(
            "max_streams = {max_streams}: must be 1 to {} (each stream costs a thread and files)",
            super::MAX_MAX_STREAMS
        ));
    }
    if streams.len() > max_streams {
        return err(format!(
            "max_streams = {max_streams}, but {} streams are configured; raise max_streams",
            streams.len()
        ));
    }
    let max_memory = max_memory.unwrap_or(super::DEFAULT_MAX_MEMORY);
    let memory: u64 = streams
        .iter()
        .filter(|s| s.storage == Storage::Memory)
        .map(|s| s.max_bytes)
        .fold(0, u64::saturating_add);
    if memory > max_memory {
        return err(format!(
            "max_memory = {max_memory} bytes, but the memory streams' max_bytes add up to {memory}; raise max_memory or lower their max_bytes"
        ));
    }
    Ok((max_streams, max_memory))
}

/// Checks the file streams' `max_bytes` plus `retained` (the bytes the
/// retained messages' log may take: twice `mqtt.max_retained_bytes`)
/// against `budget` (0: no budget) and gives every file stream without
/// `max_bytes` an equal share of the rest.
pub(super) fn apply_storage_budget(
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

impl RawStream {
    pub(super) fn validate(
        self,
        i: usize,
        crypt_key: Option<&Key>,
    ) -> Result<StreamConfig, ConfigError> {
        let key = format!("stream[{i}] ({:?})", self.name);
        // The name is a directory name ([`crate::stream::names`]); the charset
        // below is stricter still (it is also a subject token on the hub).
        if let Err(e) = crate::stream::names::validate(&self.name) {
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
        if memory && self.max_bytes == 0 {
            return err(format!(
                "{key}.max_bytes: a memory stream must set max_bytes (the RAM it may take, e.g. max_bytes = \"16MiB\"); the memory streams' max_bytes together must fit in max_memory (default 64MiB)"
            ));
        }
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
            allow_direct: self.allow_direct,
            key: crypt_key.cloned(),
            encrypt,
            mirror_direct: false,
            metadata: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

    #[test]
    fn max_streams_and_max_memory() {
        let c = Config::parse("").unwrap();
        assert_eq!((c.max_streams, c.max_memory), (256, 64 << 20));
        let c = Config::parse("max_streams = 10\nmax_memory = \"1GiB\"\n").unwrap();
        assert_eq!((c.max_streams, c.max_memory), (10, 1 << 30));
        for bad in [
            "max_streams = 0",
            "max_streams = 100000",
            "max_memory = \"lots\"",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
        // A memory stream without max_bytes would be unbounded RAM.
        let e =
            Config::parse("[[stream]]\nname = \"M\"\nsubjects = [\"m\"]\nstorage = \"memory\"\n")
                .unwrap_err()
                .0;
        assert!(
            e.contains("stream[0] (\"M\").max_bytes") && e.contains("must set max_bytes"),
            "{e}"
        );
        let two = "[[stream]]\nname = \"A\"\nsubjects = [\"a\"]\n[[stream]]\nname = \"B\"\nsubjects = [\"b\"]\nstorage = \"memory\"\nmax_bytes = \"2MiB\"\n";
        let e = Config::parse(&format!("max_streams = 1\n{two}"))
            .unwrap_err()
            .0;
        assert!(
            e.contains("max_streams = 1") && e.contains("2 streams"),
            "{e}"
        );
        let e = Config::parse(&format!("max_memory = \"1MiB\"\n{two}"))
            .unwrap_err()
            .0;
        assert!(e.contains("max_memory"), "{e}");
        assert!(Config::parse(&format!("max_streams = 2\n{two}")).is_ok());
    }

    #[test]
    fn max_storage_budget() {
        let two = "[[stream]]\nname = \"A\"\nsubjects = [\"a.>\"]\nmax_bytes = \"3GiB\"\n\n[[stream]]\nname = \"B\"\nsubjects = [\"b.>\"]\n\n[[stream]]\nname = \"C\"\nsubjects = [\"c.>\"]\n\n[[stream]]\nname = \"M\"\nsubjects = [\"m.>\"]\nstorage = \"memory\"\nmax_bytes = \"1MiB\"\n";
        let c = Config::parse(&format!("max_storage = \"8GiB\"\n{two}")).unwrap();
        assert_eq!(c.max_storage, 8 << 30);
        let by = |n: &str| c.streams.iter().find(|s| s.name == n).unwrap().max_bytes;
        assert_eq!(by("A"), 3 << 30);
        // The retained messages' log takes twice mqtt.max_retained_bytes.
        let retained = 2 * DEFAULT_MAX_RETAINED_BYTES;
        assert_eq!(by("B"), ((5 << 30) - retained) / 2);
        assert_eq!(by("C"), ((5 << 30) - retained) / 2);
        assert_eq!(by("M"), 1 << 20, "memory streams are outside the budget");
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
    fn stream_semantics_keys() {
        let base = "[[stream]]\nname = \"KV\"\nsubjects = [\"kv.>\"]\n";
        let c = Config::parse(&format!(
            "{base}max_msgs_per_subject = 1\ndiscard = \"new\"\ndiscard_new_per_subject = true\nretention = \"workqueue\"\nallow_rollup = true\ndeny_delete = true\nallow_msg_ttl = true\nallow_direct = true\n"
        ))
        .unwrap();
        let s = &c.streams[0];
        assert_eq!(s.max_msgs_per_subject, 1);
        assert!(s.discard_new_per_subject && s.allow_rollup && s.deny_delete && s.allow_msg_ttl);
        assert!(s.allow_direct);
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
            stream("m", "storage = \"memory\"\nmax_bytes = \"1MiB\"\n")
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
            stream(
                "m",
                "storage = \"memory\"\nmax_bytes = \"1MiB\"\nencrypt = true\n"
            )
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
}
