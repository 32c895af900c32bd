//! Sizes (`"512MiB"` or bytes) and durations (`"30s"` or seconds) as the
//! file writes them, and their serde adapters.

use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::stream::SyncPolicy;

pub(super) fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

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
pub(super) enum IntOrStr {
    Int(i64),
    Str(String),
}

pub(super) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match IntOrStr::deserialize(d)? {
        IntOrStr::Int(i) if i >= 0 => Ok(i as u64),
        IntOrStr::Int(i) => Err(de::Error::custom(format!("size {i} is negative"))),
        IntOrStr::Str(s) => parse_size(&s).map_err(de::Error::custom),
    }
}

/// [`de_size`] for a key whose absence means "derived from other keys".
pub(super) fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match IntOrStr::deserialize(d)? {
        IntOrStr::Int(i) if i >= 0 => Ok(Duration::from_secs(i as u64)),
        IntOrStr::Int(i) => Err(de::Error::custom(format!("duration {i} is negative"))),
        IntOrStr::Str(s) => parse_duration(&s).map_err(de::Error::custom),
    }
}

pub(super) fn de_sync<'de, D: Deserializer<'de>>(d: D) -> Result<SyncPolicy, D::Error> {
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
}
