//! A tiny logger for the `log` facade: `LEVEL target: message` lines on
//! stderr with a UTC timestamp. The level comes from config `log` and is
//! overridden by the `FROND_LOG` environment variable.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

struct Logger;

static LOGGER: Logger = Logger;

/// Parse a level name.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    match s.trim().to_ascii_lowercase().as_str() {
        "off" => Some(LevelFilter::Off),
        "error" => Some(LevelFilter::Error),
        "warn" | "warning" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// Install the logger. `configured` is the config's level; `FROND_LOG` wins.
pub fn init(configured: &str) {
    let level = std::env::var("FROND_LOG")
        .ok()
        .and_then(|v| parse_level(&v))
        .or_else(|| parse_level(configured))
        .unwrap_or(LevelFilter::Info);
    // A second init (tests) keeps the first logger; that is fine.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (secs, ms) = (now.as_secs(), now.subsec_millis());
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let target = r.target().strip_prefix("frond::").unwrap_or(r.target());
        let line = format!(
            "{h:02}:{m:02}:{s:02}.{ms:03} {:<5} {target}: {}\n",
            r.level(),
            r.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}
