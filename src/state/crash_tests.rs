//! Crash injection over the state records.
