//! The mirror cursor's file: kept by [`crate::state::cursors`]
//! (re-exported here); this module names the file.

use std::path::{Path, PathBuf};

pub use crate::state::cursors::*;

/// The cursor file for a local stream (an error for a name that cannot
/// be a file name, see [`crate::stream::names`]; configured names always can).
pub fn path(data_dir: &Path, stream: &str) -> Result<PathBuf, crate::stream::names::NameError> {
    crate::stream::names::path_in(&data_dir.join("uplink"), stream, ".cursor")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_files_are_named_after_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        assert!(path(dir.path(), "../x").is_err());
        let p = path(dir.path(), "TELEMETRY").unwrap();
        assert_eq!(p, dir.path().join("uplink").join("TELEMETRY.cursor"));
    }
}
