//! Names that become file or directory names.
//!
//! Owns: the one rule every name frond turns into a path must pass —
//! stream names (a directory under `data_dir/streams`, an uplink cursor
//! file), consumer and durable names (`<stream dir>/consumers/<name>.json`)
//! — and [`path_in`], the only way such a name is joined to a directory.
//! MQTT client ids are not names in this sense: their session and will
//! files are named by a hash (see `broker::persist`, `broker::wills`).
//!
//! The rule is nats-server's for stream and consumer names
//! (`isValidAssetName`: not empty, none of space, tab, CR, LF, FF, `.`,
//! `*`, `>`, `/`, `\`), made stricter where a file name needs it:
//! - no control character at all (NUL included) and no Unicode whitespace;
//! - no `.` anywhere, so `.`, `..` and hidden files cannot be named;
//! - at most [`MAX_NAME_LEN`] bytes: 255 (the usual file-name limit, and
//!   nats-server's `JSMaxNameLen`) minus room for the longest suffix frond
//!   adds to a name (`.json.tmp`, 9 bytes), rounded down.
//!
//! Invariant: a name that passes [`validate`] is one path component, so
//! `dir.join(name + suffix)` names a file directly inside `dir`.

use std::fmt;
use std::path::{Path, PathBuf};

/// Longest valid name, in bytes.
pub const MAX_NAME_LEN: usize = 240;

/// Why a name cannot name a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    Empty,
    /// Longer than [`MAX_NAME_LEN`] bytes (the length).
    TooLong(usize),
    /// Holds `/` or `\`.
    PathSeparator,
    /// Holds a character that is not allowed (`.`, `*`, `>`, whitespace or
    /// a control character).
    BadChar(char),
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => f.write_str("the name is empty"),
            NameError::TooLong(n) => {
                write!(f, "the name is {n} bytes long; at most {MAX_NAME_LEN} are allowed")
            }
            NameError::PathSeparator => f.write_str("the name contains a path separator ('/' or '\\')"),
            NameError::BadChar(c) => write!(
                f,
                "the name contains {c:?}; '.', '*', '>', whitespace and control characters are not allowed"
            ),
        }
    }
}

impl std::error::Error for NameError {}

/// Whether `name` may be a stream, consumer or durable name (and so a
/// file or directory name); see the module doc.
pub fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    if name.contains(['/', '\\']) {
        return Err(NameError::PathSeparator);
    }
    match name
        .chars()
        .find(|&c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
    {
        Some(c) => Err(NameError::BadChar(c)),
        None => Ok(()),
    }
}

/// `dir/<name><suffix>`, once `name` passed [`validate`]. `suffix` is
/// frond's own (`.json`, `.cursor`, or empty for a directory).
pub fn path_in(dir: &Path, name: &str, suffix: &str) -> Result<PathBuf, NameError> {
    validate(name)?;
    Ok(dir.join(format!("{name}{suffix}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_names_pass() {
        for n in [
            "A",
            "TELEMETRY",
            "my-durable_1",
            "Ünïcode",
            "x".repeat(240).as_str(),
        ] {
            assert_eq!(validate(n), Ok(()), "{n:?}");
        }
        assert_eq!(
            path_in(Path::new("/d"), "c1", ".json"),
            Ok(PathBuf::from("/d/c1.json"))
        );
    }

    #[test]
    fn traversal_and_absolute_paths_are_refused() {
        assert_eq!(validate(".."), Err(NameError::BadChar('.')));
        assert_eq!(validate("."), Err(NameError::BadChar('.')));
        assert_eq!(validate(".hidden"), Err(NameError::BadChar('.')));
        assert_eq!(validate("a/b"), Err(NameError::PathSeparator));
        assert_eq!(validate("/etc/passwd"), Err(NameError::PathSeparator));
        assert_eq!(validate("/tmp/victim"), Err(NameError::PathSeparator));
        assert_eq!(validate("..\\x"), Err(NameError::PathSeparator));
        assert_eq!(validate("c:\\x"), Err(NameError::PathSeparator));
        assert_eq!(validate("////"), Err(NameError::PathSeparator));
        assert!(path_in(Path::new("/d"), "/abs/victim", ".json").is_err());
        assert!(path_in(Path::new("/d"), "..", "").is_err());
    }

    #[test]
    fn control_whitespace_wildcards_empty_and_long_are_refused() {
        assert_eq!(validate(""), Err(NameError::Empty));
        assert_eq!(validate("a\0b"), Err(NameError::BadChar('\0')));
        assert_eq!(validate("a\nb"), Err(NameError::BadChar('\n')));
        assert_eq!(validate("a\x7fb"), Err(NameError::BadChar('\x7f')));
        assert_eq!(validate("a\x1bb"), Err(NameError::BadChar('\x1b')));
        assert_eq!(validate("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(validate("a\tb"), Err(NameError::BadChar('\t')));
        assert_eq!(validate("a\u{a0}b"), Err(NameError::BadChar('\u{a0}')));
        assert_eq!(validate("a*"), Err(NameError::BadChar('*')));
        assert_eq!(validate(">"), Err(NameError::BadChar('>')));
        assert_eq!(validate("a.b"), Err(NameError::BadChar('.')));
        assert_eq!(validate(&"x".repeat(241)), Err(NameError::TooLong(241)));
        // Multi-byte characters count in bytes.
        assert_eq!(validate(&"é".repeat(121)), Err(NameError::TooLong(242)));
        assert!(NameError::TooLong(300).to_string().contains("240"));
    }

    #[test]
    fn config_refuses_stream_names_that_are_paths() {
        for name in ["../x", "/abs", "a.b", "", "a b"] {
            let toml = format!("[[stream]]\nname = \"{name}\"\nsubjects = [\"x.>\"]\n");
            let e = crate::config::Config::parse(&toml).unwrap_err().to_string();
            assert!(
                e.contains("stream[0]") && e.contains(".name"),
                "{name:?}: {e}"
            );
        }
    }
}
