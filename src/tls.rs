//! TLS: turning certificate and key files into rustls configurations.
//!
//! Owns: reading PEM files (certificate chains, private keys, CA bundles),
//! building the server configuration for the MQTT TLS listeners
//! (`mqtt.tls_listen`, `mqtt.wss_listen`) and the client configuration for
//! the uplink (`uplink.tls_ca`, `uplink.tls_cert`/`tls_key`, `tls://` URLs).
//!
//! Choices (see DESIGN.md § Dependencies): rustls with the `ring` provider
//! only — it cross-compiles to aarch64/armv7 with a C compiler and needs no
//! cmake; TLS 1.2 and 1.3; no session tickets are persisted. Without a
//! configured CA the uplink trusts the operating system's roots
//! (`rustls-native-certs`: `SSL_CERT_FILE`, `/etc/ssl/certs`, …).
//!
//! Invariants: every error names the file and says what to fix; nothing
//! here panics on file contents.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The crypto provider every configuration uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {}: cannot read: {e}", path.display()))?;
    let certs: Vec<_> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} {}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no \"BEGIN CERTIFICATE\" block found; give a PEM file",
            path.display()
        ));
    }
    Ok(certs)
}

fn key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "{what} {}: no usable private key ({e}); give a PEM file with a PKCS#8, PKCS#1 (RSA) or SEC1 (EC) key",
            path.display()
        )
    })
}

fn roots(ca: &Path, what: &str) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for c in certs(ca, what)? {
        store
            .add(c)
            .map_err(|e| format!("{what} {}: bad CA certificate: {e}", ca.display()))?;
    }
    Ok(store)
}

/// The server side: `cert` (chain, leaf first) and `key`; with `ca`,
/// clients must present a certificate signed by it.
pub fn server_config(
    cert: &Path,
    key_file: &Path,
    ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, String> {
    let chain = certs(cert, "tls.cert")?;
    let key = key(key_file, "tls.key")?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca, "tls.ca")?),
                provider(),
            )
            .build()
            .map_err(|e| format!("tls.ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let cfg = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "tls.cert/tls.key ({}, {}): {e}; the key must belong to the first certificate",
            cert.display(),
            key_file.display()
        )
    })?;
    Ok(Arc::new(cfg))
}

/// The uplink side: trust `ca` (or the system roots), and present
/// `client` = (certificate, key) when given.
pub fn client_config(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, String> {
    let store = match ca {
        Some(ca) => roots(ca, "uplink.tls_ca")?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!(
                    "uplink: no system CA certificates found ({}); set uplink.tls_ca to the hub's CA file",
                    found
                        .errors
                        .first()
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "empty store".into())
                ));
            }
            store
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("uplink tls: {e}"))?
        .with_root_certificates(store);
    let cfg = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key_file)) => builder
            .with_client_auth_cert(
                certs(cert, "uplink.tls_cert")?,
                key(key_file, "uplink.tls_key")?,
            )
            .map_err(|e| {
                format!(
                    "uplink.tls_cert/tls_key ({}, {}): {e}",
                    cert.display(),
                    key_file.display()
                )
            })?,
    };
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_malformed_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = server_config(&missing, &missing, None).unwrap_err();
        assert!(e.contains("tls.cert") && e.contains("nope.pem"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all\n").unwrap();
        let e = server_config(&junk, &junk, None).unwrap_err();
        assert!(e.contains("no \"BEGIN CERTIFICATE\""), "{e}");
        let e = client_config(Some(&junk), None).unwrap_err();
        assert!(e.contains("uplink.tls_ca") && e.contains("junk.pem"), "{e}");
    }
}
