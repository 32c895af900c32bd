//! `[tls]`: the certificate of frond's own TLS listeners.

use std::path::PathBuf;

use serde::Deserialize;

/// `[tls]`: PEM files for frond's own TLS listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub ca: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
}

impl RawTls {
    pub(super) fn validate(self) -> TlsFiles {
        TlsFiles {
            cert: self.cert,
            key: self.key,
            ca: self.ca,
        }
    }
}
