//! The mirror and source cursors' files: kept by
//! [`crate::state::cursors`] (re-exported here); this module names them.

use std::path::{Path, PathBuf};

pub use crate::state::cursors::*;

/// The cursor file for a local stream (an error for a name that cannot
/// be a file name, see [`crate::stream::names`]; configured names always can).
pub fn path(data_dir: &Path, stream: &str) -> Result<PathBuf, crate::stream::names::NameError> {
    crate::stream::names::path_in(&data_dir.join("uplink"), stream, ".cursor")
}

/// The cursor file of the source of hub stream `from` into local stream
/// `stream` (both names must be valid file names).
pub fn source_path(
    data_dir: &Path,
    stream: &str,
    from: &str,
) -> Result<PathBuf, crate::stream::names::NameError> {
    crate::stream::names::validate(from)?;
    crate::stream::names::path_in(&data_dir.join("uplink"), stream, &format!(".{from}.source"))
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
        assert!(source_path(dir.path(), "CMD", "../x").is_err());
        let p = source_path(dir.path(), "CMD", "COMMANDS").unwrap();
        assert_eq!(p, dir.path().join("uplink").join("CMD.COMMANDS.source"));
    }
}
