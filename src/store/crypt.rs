//! Encryption at rest: the stream key, the per-record AEAD and the key
//! check values. Pure functions over byte slices (plus [`random`] and the
//! key file helpers); the layout is in `docs/store-format.md`.
//!
//! The AEAD is XChaCha20-Poly1305 (pure Rust, `chacha20poly1305`). Its
//! 24-byte nonce is a 16-byte random salt followed by a 64-bit counter;
//! XChaCha first derives a subkey from (key, salt) with HChaCha20, so each
//! salt is in effect its own key and the counter only has to be unique
//! under one salt.
//!
//! Invariants (kept by the store, see the format doc):
//! - every segment file gets a fresh random salt when it is created (also
//!   the file a compaction writes);
//! - inside a segment the counter is the record's file offset (low 32
//!   bits) and a kind (high 32 bits: 0 = record, 1 = secure-erase
//!   overwrite), so two records never share a nonce while bytes are only
//!   appended; an encrypted segment is never appended to again once it
//!   was truncated or reopened (the next record starts a new segment);
//! - blobs (index snapshots, the key check file) use a random 24-byte
//!   nonce each time they are written.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};

pub const KEY_LEN: usize = 32;
pub const SALT_LEN: usize = 16;
pub const TAG_LEN: usize = 16;
/// Counter kind of a secure-erase overwrite (in the high 32 bits).
pub const KIND_ERASED: u64 = 1 << 32;
/// Counter reserved for the segment header's key check value.
const CHECK_COUNTER: u64 = u64::MAX;
/// Name of the key check file in a stream directory.
pub const KEYCHECK_NAME: &str = "keycheck";
const KEYCHECK_MAGIC: &[u8; 8] = b"FRNDKEY1";

/// A 256-bit stream key and where it came from (for error messages).
#[derive(Clone)]
pub struct Key {
    bytes: [u8; KEY_LEN],
    source: String,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.source)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.bytes == other.bytes && self.source == other.source
    }
}

/// Fills `buf` from the operating system's random source.
pub fn random(buf: &mut [u8]) -> io::Result<()> {
    getrandom::getrandom(buf)
        .map_err(|e| io::Error::other(format!("no random numbers from the OS: {e}")))
}

/// Creates `path` (which must not exist) with mode 0600 holding a new
/// random key as 64 hex digits and a newline.
pub fn generate_key_file(path: &Path) -> Result<(), String> {
    let mut k = [0u8; KEY_LEN];
    random(&mut k).map_err(|e| e.to_string())?;
    let mut text: String = k.iter().map(|b| format!("{b:02x}")).collect();
    text.push('\n');
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o
        .open(path)
        .map_err(|e| format!("cannot create key file {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write key file {}: {e}", path.display()))
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Key {
    /// A key from its raw bytes; `source` names it in messages.
    pub fn from_bytes(bytes: [u8; KEY_LEN], source: &str) -> Key {
        Key {
            bytes,
            source: source.to_string(),
        }
    }

    /// Reads a key file: exactly 32 raw bytes, or 64 hex digits
    /// (surrounding whitespace allowed).
    pub fn from_file(path: &Path) -> Result<Key, String> {
        let shown = path.display();
        let b = std::fs::read(path).map_err(|e| format!("cannot read key file {shown}: {e}"))?;
        Key::parse(&b, &shown.to_string())
    }

    fn parse(b: &[u8], source: &str) -> Result<Key, String> {
        let mut k = [0u8; KEY_LEN];
        if b.len() == KEY_LEN {
            k.copy_from_slice(b);
            return Ok(Key::from_bytes(k, source));
        }
        let text = b.trim_ascii();
        let bad = || {
            format!(
                "key file {source} must hold 32 bytes, raw or as 64 hex digits \
                 (create one with `frond keygen {source}`)"
            )
        };
        if text.len() != 2 * KEY_LEN {
            return Err(bad());
        }
        for (i, pair) in text.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(bad)?;
            let lo = hex_val(pair[1]).ok_or_else(bad)?;
            k[i] = (hi << 4) | lo;
        }
        Ok(Key::from_bytes(k, source))
    }

    /// Where the key came from (the key file path).
    pub fn source(&self) -> &str {
        &self.source
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.bytes.into())
    }

    fn nonce(salt: &[u8; SALT_LEN], counter: u64) -> XNonce {
        let mut n = [0u8; 24];
        n[..SALT_LEN].copy_from_slice(salt);
        n[SALT_LEN..].copy_from_slice(&counter.to_le_bytes());
        n.into()
    }

    /// Encrypts `buf` in place; returns the tag.
    pub fn seal(&self, salt: &[u8; SALT_LEN], counter: u64, buf: &mut [u8]) -> [u8; TAG_LEN] {
        match self
            .cipher()
            .encrypt_in_place_detached(&Key::nonce(salt, counter), &[], buf)
        {
            Ok(t) => t.into(),
            // Only for messages over 256 GiB, which the store never builds.
            Err(_) => [0u8; TAG_LEN],
        }
    }

    /// Verifies and decrypts `buf` in place. On failure `buf` is unchanged.
    pub fn open(&self, salt: &[u8; SALT_LEN], counter: u64, buf: &mut [u8], tag: &[u8]) -> bool {
        if tag.len() != TAG_LEN {
            return false;
        }
        let tag = Tag::clone_from_slice(tag);
        self.cipher()
            .decrypt_in_place_detached(&Key::nonce(salt, counter), &[], buf, &tag)
            .is_ok()
    }

    /// The 8-byte key check value stored in an encrypted segment header.
    pub fn check_value(&self, salt: &[u8; SALT_LEN]) -> [u8; 8] {
        let t = self.seal(salt, CHECK_COUNTER, &mut []);
        let mut c = [0u8; 8];
        c.copy_from_slice(&t[..8]);
        c
    }

    /// `magic ‖ nonce (24 random bytes) ‖ ciphertext ‖ tag`.
    pub fn seal_blob(&self, magic: &[u8; 8], plain: &[u8]) -> io::Result<Vec<u8>> {
        let mut nonce = [0u8; 24];
        random(&mut nonce)?;
        let mut out = Vec::with_capacity(8 + 24 + plain.len() + TAG_LEN);
        out.extend_from_slice(magic);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .cipher()
            .encrypt_in_place_detached(&nonce.into(), magic, &mut out[32..])
            .map_err(|_| io::Error::other("blob too large to encrypt"))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// The plaintext of a [`Key::seal_blob`] output, if it is authentic.
    pub fn open_blob(&self, magic: &[u8; 8], b: &[u8]) -> Option<Vec<u8>> {
        if b.len() < 32 + TAG_LEN || b.get(..8)? != magic {
            return None;
        }
        let nonce = XNonce::clone_from_slice(&b[8..32]);
        let (ct, tag) = b[32..].split_at(b.len() - 32 - TAG_LEN);
        let mut plain = ct.to_vec();
        let tag = Tag::clone_from_slice(tag);
        self.cipher()
            .decrypt_in_place_detached(&nonce, magic, &mut plain, &tag)
            .ok()?;
        Some(plain)
    }

    /// Contents of a new key check file for this key.
    pub fn keycheck(&self) -> io::Result<Vec<u8>> {
        self.seal_blob(KEYCHECK_MAGIC, &[])
    }

    /// Does a key check file match this key? `None`: not a key check file.
    pub fn matches_keycheck(&self, b: &[u8]) -> Option<bool> {
        if b.len() != 32 + TAG_LEN || b.get(..8)? != KEYCHECK_MAGIC {
            return None;
        }
        Some(self.open_blob(KEYCHECK_MAGIC, b).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let k = Key::from_bytes([7; 32], "t");
        let salt = [1u8; 16];
        let mut buf = b"hello world".to_vec();
        let tag = k.seal(&salt, 42, &mut buf);
        assert_ne!(&buf, b"hello world");
        let ct = buf.clone();
        assert!(!k.open(&salt, 43, &mut buf, &tag));
        assert_eq!(buf, ct, "failed open leaves the buffer unchanged");
        assert!(!k.open(&[2u8; 16], 42, &mut buf, &tag));
        let other = Key::from_bytes([8; 32], "u");
        assert!(!other.open(&salt, 42, &mut buf, &tag));
        assert!(k.open(&salt, 42, &mut buf, &tag));
        assert_eq!(&buf, b"hello world");
        assert_ne!(k.check_value(&salt), other.check_value(&salt));
    }

    #[test]
    fn blobs_and_keycheck() {
        let k = Key::from_bytes([7; 32], "t");
        let b = k.seal_blob(b"FRNDTEST", b"subjects").unwrap();
        assert_eq!(k.open_blob(b"FRNDTEST", &b).unwrap(), b"subjects");
        assert!(k.open_blob(b"FRNDTES2", &b).is_none());
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert!(k.open_blob(b"FRNDTEST", &bad).is_none());
        let kc = k.keycheck().unwrap();
        assert_eq!(k.matches_keycheck(&kc), Some(true));
        let other = Key::from_bytes([8; 32], "u");
        assert_eq!(other.matches_keycheck(&kc), Some(false));
        assert_eq!(other.matches_keycheck(b"junk"), None);
    }

    #[test]
    fn key_files_raw_hex_and_generated() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        generate_key_file(&p).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let k = Key::from_file(&p).unwrap();
        assert!(generate_key_file(&p).is_err(), "never overwrites a key");
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.trim().len(), 64);
        let raw = d.path().join("raw");
        std::fs::write(&raw, k.bytes).unwrap();
        assert!(Key::from_file(&raw).unwrap().bytes == k.bytes);
        std::fs::write(&raw, b"short").unwrap();
        let e = Key::from_file(&raw).unwrap_err();
        assert!(e.contains("32 bytes") && e.contains("keygen"), "{e}");
        assert!(Key::from_file(&d.path().join("missing")).is_err());
    }
}
