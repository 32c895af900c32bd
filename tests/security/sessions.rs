//! Security tests: sessions (see tests/security.rs for the cast).

#[allow(unused_imports)]
use super::*;
