//! `uplink.creds`: a NATS credentials file (user JWT + user nkey seed, as
//! `nsc` and the `nats` CLI write it) for hubs in operator (JWT) mode.
//!
//! Owns: reading the file once at configuration time, its permission
//! check and parsing it into a [`Creds`].
//!
//! File shape: two armoured blocks, each a `-----BEGIN …-----` line, one
//! line of content and an `------END …------` line; the block whose
//! label names a JWT holds the user JWT (`header.claims.signature`,
//! base64url), the one whose label names an NKEY SEED holds the user seed
//! (`SU…`). Everything outside the blocks (the "IMPORTANT" banner) is
//! ignored.
//!
//! Invariants:
//! - A file that other users may read or write (mode `o+r` or `o+w`) is
//!   refused: the seed is the user's secret (the NATS tools warn about
//!   this; frond refuses because a warning in a gateway's log is read by
//!   nobody).
//! - The JWT's subject is the seed's public key, so a seed that does not
//!   belong to the JWT is a configuration error, not a mysterious
//!   "Authorization Violation" from the hub. The JWT's signature is the
//!   hub's business and is not checked here.
//! - The seed never appears in an error message or in `Debug` output.

use std::path::Path;

use crate::nkey::SeedKey;

/// A parsed credentials file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    /// The user JWT, sent in `CONNECT`.
    pub jwt: String,
    /// The user's seed: signs the hub's nonce.
    pub seed: SeedKey,
}

/// Read, check and parse the credentials file at `path`.
pub fn load(path: &Path) -> Result<Creds, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        format!("cannot read {shown}: {e}; give the .creds file `nsc` or `nats` wrote for this node's hub user")
    })?;
    check_mode(path, &meta)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    parse(&text).map_err(|e| format!("{shown}: {e}"))
}

#[cfg(unix)]
fn check_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode();
    if mode & 0o006 != 0 {
        return Err(format!(
            "{} is readable or writable by every user (mode {:o}) and holds the hub user's secret seed; run `chmod 600 {}` (or 640 with frond's group)",
            path.display(),
            mode & 0o777,
            path.display()
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_path: &Path, _meta: &std::fs::Metadata) -> Result<(), String> {
    Ok(())
}

/// Parse the text of a credentials file.
pub fn parse(text: &str) -> Result<Creds, String> {
    let mut jwt = None;
    let mut seed = None;
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = armour(line, "BEGIN") else {
            continue;
        };
        let content = lines.by_ref().find(|l| !l.is_empty()).unwrap_or("");
        let end = lines.next().unwrap_or("");
        if armour(content, "END").is_some() || armour(end, "END").is_none() {
            return Err(format!(
                "the block {line:?} must hold exactly one line followed by an END line"
            ));
        }
        if label.contains("JWT") {
            jwt = Some(content.to_string());
        } else if label.contains("SEED") {
            seed = Some(content.to_string());
        }
    }
    let jwt = jwt.ok_or("no -----BEGIN NATS USER JWT----- block; is this a .creds file?")?;
    let seed = seed.ok_or("no -----BEGIN USER NKEY SEED----- block; is this a .creds file?")?;
    let seed = SeedKey::parse(&seed)
        .map_err(|e| format!("the NKEY SEED block is not a user seed (SU…): {e}"))?;
    let sub = jwt_subject(&jwt)?;
    if sub != seed.public_key() {
        return Err(format!(
            "the seed does not belong to the JWT's user {sub} (it is the seed of {}); the JWT and the seed must come from the same `nsc` user",
            seed.public_key()
        ));
    }
    Ok(Creds { jwt, seed })
}

/// `Some(label)` for an armour line `-----BEGIN label-----` (`which` =
/// `"BEGIN"` or `"END"`).
fn armour<'a>(line: &'a str, which: &str) -> Option<&'a str> {
    let inner = line.trim_matches('-');
    if inner.len() + 6 > line.len() || !line.starts_with("---") || !line.ends_with("---") {
        return None;
    }
    inner.strip_prefix(which)?.strip_prefix(' ')
}

/// The `sub` claim of a user JWT.
fn jwt_subject(jwt: &str) -> Result<String, String> {
    let mut parts = jwt.split('.');
    let (Some(_), Some(claims), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the JWT block is not a JWT (three base64url parts separated by '.')".into());
    };
    let raw = crate::nkey::base64_decode(claims).ok_or("the JWT's claims are not base64url")?;
    let v: serde_json::Value =
        serde_json::from_slice(&raw).map_err(|e| format!("the JWT's claims are not JSON: {e}"))?;
    if let Some(t) = v["nats"]["type"].as_str() {
        if t != "user" {
            return Err(format!(
                "the JWT is an {t} JWT; uplink.creds needs a user's .creds file"
            ));
        }
    }
    v["sub"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "the JWT has no \"sub\" (user public key) claim".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt_for(sub: &str, kind: &str) -> String {
        let b = crate::nkey::base64url_encode;
        let claims = serde_json::json!({"sub": sub, "nats": {"type": kind, "version": 2}});
        format!(
            "{}.{}.{}",
            b(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
            b(claims.to_string().as_bytes()),
            b(b"sig")
        )
    }

    fn file(jwt: &str, seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\nNKEY Seed printed below can be used to sign and prove identity.\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n*************************************************************\n"
        )
    }

    #[test]
    fn parses_what_nsc_writes() {
        let seed = SeedKey::from_bytes([7u8; 32]);
        let jwt = jwt_for(&seed.public_key(), "user");
        let c = parse(&file(&jwt, &seed.encode())).unwrap();
        assert_eq!(c.jwt, jwt);
        assert_eq!(c.seed, seed);
        // CRLF line ends too.
        let crlf = file(&jwt, &seed.encode()).replace('\n', "\r\n");
        assert_eq!(parse(&crlf).unwrap(), c);
    }

    #[test]
    fn malformed_files_say_what_is_wrong() {
        let seed = SeedKey::from_bytes([7u8; 32]);
        let other = SeedKey::from_bytes([8u8; 32]);
        let jwt = jwt_for(&seed.public_key(), "user");
        let e = parse("hello").unwrap_err();
        assert!(e.contains("no -----BEGIN NATS USER JWT"), "{e}");
        let e = parse(&file(&jwt, "SUNOTASEED")).unwrap_err();
        assert!(e.contains("not a user seed"), "{e}");
        let e = parse(&file(&jwt_for(&other.public_key(), "user"), &seed.encode())).unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
        let e = parse(&file(
            &jwt_for(&seed.public_key(), "account"),
            &seed.encode(),
        ))
        .unwrap_err();
        assert!(e.contains("account JWT"), "{e}");
        let e = parse(&file("notajwt", &seed.encode())).unwrap_err();
        assert!(e.contains("not a JWT"), "{e}");
        let truncated = "-----BEGIN NATS USER JWT-----\nabc\n";
        let e = parse(truncated).unwrap_err();
        assert!(e.contains("END line"), "{e}");
        let leaked = format!("{:?}", parse(&file(&jwt, &seed.encode())).unwrap());
        assert!(!leaked.contains(&seed.encode()));
    }

    #[cfg(unix)]
    #[test]
    fn world_readable_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let seed = SeedKey::from_bytes([7u8; 32]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hub.creds");
        std::fs::write(
            &p,
            file(&jwt_for(&seed.public_key(), "user"), &seed.encode()),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&p).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load(&p).unwrap().seed, seed);
        let e = load(&dir.path().join("missing.creds")).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
    }
}
