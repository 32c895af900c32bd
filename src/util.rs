//! Small helpers shared by several modules.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in nanoseconds (0 if the clock is before 1970).
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
