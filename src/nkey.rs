//! NATS nkeys: Ed25519 keys in their text form, and the nonce
//! challenge-response used by NATS `CONNECT` (`nkey` + `sig`).
//!
//! Owns: the nkey text encoding, signing (the uplink, from a seed) and
//! verifying (the NATS port, against a configured user public key). The
//! Ed25519 arithmetic is `ring`'s (already linked for TLS).
//!
//! Encoding (nats-io nkeys): RFC 4648 base32 without padding of
//! `prefix || key || crc16` where crc16 is CRC-16/XMODEM (polynomial
//! 0x1021, initial value 0) of the bytes before it, stored little-endian.
//! - Public keys: one prefix byte (users: `20 << 3`, text starts `U`) and
//!   the 32-byte Ed25519 public key (56 characters).
//! - Seeds: two prefix bytes, `18 << 3 | type >> 5` and `(type & 31) << 3`
//!   (text starts `S` then the type letter, e.g. `SU` for a user), and the
//!   32-byte Ed25519 seed (58 characters).
//! - Signatures travel as base64url without padding (standard base64 is
//!   also accepted when verifying).
//!
//! Invariants: decoding never panics on any input and checks the
//! checksum, the prefix and the length; [`SeedKey`] never prints its
//! secret (`Debug` hides it).

use std::fmt;

use ring::signature::{self, Ed25519KeyPair, KeyPair as _};

/// Prefix byte of an encoded seed (`S`).
const PREFIX_SEED: u8 = 18 << 3;
/// Prefix byte of a user public key (`U`); also the type in a user seed.
pub const PREFIX_USER: u8 = 20 << 3;

/// Why an nkey string was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NkeyError {
    /// Not base32 (A-Z, 2-7) or the wrong length.
    Encoding,
    /// The checksum does not match (a typo or a truncated key).
    Checksum,
    /// A valid nkey of another kind (e.g. an account key `A…` where a user
    /// key `U…` belongs).
    Kind,
    /// `ring` refused the key material.
    Key,
}

impl fmt::Display for NkeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NkeyError::Encoding => "not an nkey (base32 letters A-Z and 2-7 of the right length)",
            NkeyError::Checksum => "checksum mismatch (mistyped or truncated key?)",
            NkeyError::Kind => {
                "an nkey of the wrong kind (need a user key: public 'U…', seed 'SU…')"
            }
            NkeyError::Key => "invalid Ed25519 key material",
        })
    }
}

/// CRC-16/XMODEM.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

fn base32_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in data {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(B32[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(B32[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

fn base32_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 5 / 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        acc = ((acc << 5) | u32::from(v)) & 0xFFFF;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64url without padding.
pub fn base64url_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in data {
        acc = ((acc << 8) | u32::from(b)) & 0xFFFF;
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(char::from(B64URL[((acc >> bits) & 63) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(B64URL[((acc << (6 - bits)) & 63) as usize]));
    }
    out
}

/// Base64url or standard base64, padding optional.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = ((acc << 6) | u32::from(v)) & 0xFFFF;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// `prefix || key || crc16 (LE)`, base32.
fn encode(prefix: &[u8], key: &[u8; 32]) -> String {
    let mut raw = Vec::with_capacity(prefix.len() + 34);
    raw.extend_from_slice(prefix);
    raw.extend_from_slice(key);
    let crc = crc16(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    base32_encode(&raw)
}

/// Base32-decode and check the trailing checksum; the bytes before it.
fn decode_checked(s: &str) -> Result<Vec<u8>, NkeyError> {
    let mut raw = base32_decode(s).ok_or(NkeyError::Encoding)?;
    if raw.len() < 4 {
        return Err(NkeyError::Encoding);
    }
    let n = raw.len() - 2;
    let want = u16::from_le_bytes([raw[n], raw[n + 1]]);
    raw.truncate(n);
    if crc16(&raw) != want {
        return Err(NkeyError::Checksum);
    }
    Ok(raw)
}

/// The text form of a user public key (`U…`).
pub fn encode_user_public(key: &[u8; 32]) -> String {
    encode(&[PREFIX_USER], key)
}

/// The raw Ed25519 public key of a user public key `U…`.
pub fn decode_user_public(s: &str) -> Result<[u8; 32], NkeyError> {
    let raw = decode_checked(s)?;
    match raw.split_first() {
        Some((&PREFIX_USER, key)) => key.try_into().map_err(|_| NkeyError::Encoding),
        Some(_) => Err(NkeyError::Kind),
        None => Err(NkeyError::Encoding),
    }
}

/// The text form of a user seed (`SU…`).
pub fn encode_user_seed(seed: &[u8; 32]) -> String {
    let b1 = PREFIX_SEED | (PREFIX_USER >> 5);
    let b2 = (PREFIX_USER & 31) << 3;
    encode(&[b1, b2], seed)
}

/// A user seed (`SU…`): signs nonces. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SeedKey {
    seed: [u8; 32],
}

impl fmt::Debug for SeedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SeedKey(..)")
    }
}

impl SeedKey {
    /// Parse a user seed `SU…`.
    pub fn parse(s: &str) -> Result<SeedKey, NkeyError> {
        let raw = decode_checked(s.trim())?;
        let [b1, b2, key @ ..] = raw.as_slice() else {
            return Err(NkeyError::Encoding);
        };
        if b1 & 0xF8 != PREFIX_SEED {
            return Err(NkeyError::Kind);
        }
        let kind = ((b1 & 7) << 5) | (b2 >> 3);
        if kind != PREFIX_USER {
            return Err(NkeyError::Kind);
        }
        let seed: [u8; 32] = key.try_into().map_err(|_| NkeyError::Encoding)?;
        // Check that ring accepts it now rather than at first use.
        Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| NkeyError::Key)?;
        Ok(SeedKey { seed })
    }

    /// A seed from 32 raw bytes (tests, key generation).
    pub fn from_bytes(seed: [u8; 32]) -> SeedKey {
        SeedKey { seed }
    }

    fn pair(&self) -> Option<Ed25519KeyPair> {
        Ed25519KeyPair::from_seed_unchecked(&self.seed).ok()
    }

    /// The text form of the seed (`SU…`).
    pub fn encode(&self) -> String {
        encode_user_seed(&self.seed)
    }

    /// The user public key `U…` (empty if ring refuses the seed, which
    /// [`SeedKey::parse`] already ruled out).
    pub fn public_key(&self) -> String {
        self.pair()
            .and_then(|p| <[u8; 32]>::try_from(p.public_key().as_ref()).ok())
            .map(|k| encode_user_public(&k))
            .unwrap_or_default()
    }

    /// The base64url signature of `msg` (empty if ring refuses the seed).
    pub fn sign(&self, msg: &[u8]) -> String {
        self.pair()
            .map(|p| base64url_encode(p.sign(msg).as_ref()))
            .unwrap_or_default()
    }
}

/// Does `sig` (base64) sign `msg` for the raw public key?
pub fn verify(public: &[u8; 32], msg: &[u8], sig: &str) -> bool {
    let Some(sig) = base64_decode(sig) else {
        return false;
    };
    signature::UnparsedPublicKey::new(&signature::ED25519, public)
        .verify(msg, &sig)
        .is_ok()
}

/// A fresh random nonce for `INFO` (16 bytes, base64url: 22 characters).
pub fn nonce() -> String {
    let mut b = [0u8; 16];
    if getrandom::getrandom(&mut b).is_err() {
        // No OS randomness: still unpredictable enough to not repeat.
        for c in b.chunks_mut(8) {
            let r = fastrand::u64(..).to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
    }
    base64url_encode(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_xmodem_check_value() {
        // The standard check value of CRC-16/XMODEM.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn base_encodings_round_trip() {
        for n in 0..40u8 {
            let data: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
            assert_eq!(base64_decode(&base64url_encode(&data)).unwrap(), data);
            let b32 = base32_encode(&data);
            assert_eq!(base32_decode(&b32).unwrap(), data, "{b32}");
        }
        // RFC 4648 test vectors (padding stripped).
        assert_eq!(base32_encode(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base64url_encode(b"foob"), "Zm9vYg");
        assert_eq!(base64_decode("Zm9vYg==").unwrap(), b"foob");
        assert_eq!(base64_decode("-_8").unwrap(), base64_decode("+/8").unwrap());
        assert!(base64_decode("a b").is_none());
        assert!(base32_decode("abc").is_none());
    }

    #[test]
    fn keys_encode_with_their_prefix_letters_and_decode() {
        let seed = SeedKey::from_bytes([7u8; 32]);
        let s = seed.encode();
        assert_eq!(s.len(), 58);
        assert!(s.starts_with("SU"), "{s}");
        assert_eq!(SeedKey::parse(&s).unwrap(), seed);
        let public = seed.public_key();
        assert_eq!(public.len(), 56);
        assert!(public.starts_with('U'), "{public}");
        let raw = decode_user_public(&public).unwrap();
        assert_eq!(encode_user_public(&raw), public);
        // A seed is not a public key and the other way round.
        assert_eq!(decode_user_public(&s), Err(NkeyError::Kind));
        assert!(SeedKey::parse(&public).is_err());
        // An account key ('A', prefix 0) is the wrong kind.
        assert_eq!(
            decode_user_public(&encode(&[0], &raw)),
            Err(NkeyError::Kind)
        );
        assert!(encode(&[0], &raw).starts_with('A'));
        assert!(format!("{seed:?}").contains(".."));
        assert!(!format!("{seed:?}").contains(&s));
    }

    #[test]
    fn published_operator_key_pair_vector() {
        // From the nkeys.net README: an operator seed and its public key.
        let raw =
            decode_checked("SOAELH6NJCEK4HST5644G4HK7TOAFZGRRJHNM4EUKUY7PPNDLIKO5IH4JM").unwrap();
        let (b1, b2) = (raw[0], raw[1]);
        assert_eq!(b1 & 0xF8, PREFIX_SEED);
        let kind = ((b1 & 7) << 5) | (b2 >> 3);
        assert_eq!(kind, 14 << 3, "operator");
        let seed: [u8; 32] = raw[2..].try_into().unwrap();
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        let public: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
        assert_eq!(
            encode(&[kind], &public),
            "ODPWIBQJVIQ42462QAFI2RKJC4RZHCQSIVPRDDHWFCJAP52NRZK6Z2YC"
        );
        // Not a user seed.
        assert_eq!(
            SeedKey::parse("SOAELH6NJCEK4HST5644G4HK7TOAFZGRRJHNM4EUKUY7PPNDLIKO5IH4JM"),
            Err(NkeyError::Kind)
        );
    }

    #[test]
    fn bad_checksum_and_garbage_are_refused() {
        let public = SeedKey::from_bytes([9u8; 32]).public_key();
        // Change one character inside the key: the checksum catches it.
        let mut bad: Vec<u8> = public.clone().into_bytes();
        bad[10] = if bad[10] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        assert_eq!(decode_user_public(&bad), Err(NkeyError::Checksum));
        assert_eq!(decode_user_public(&public[..40]), Err(NkeyError::Checksum));
        assert_eq!(decode_user_public("u-lower"), Err(NkeyError::Encoding));
        assert_eq!(decode_user_public(""), Err(NkeyError::Encoding));
        assert_eq!(decode_user_public("UA"), Err(NkeyError::Encoding));
        let seed = SeedKey::from_bytes([9u8; 32]).encode();
        let mut bad_seed = seed.into_bytes();
        bad_seed[20] = if bad_seed[20] == b'C' { b'D' } else { b'C' };
        assert_eq!(
            SeedKey::parse(std::str::from_utf8(&bad_seed).unwrap()),
            Err(NkeyError::Checksum)
        );
    }

    #[test]
    fn sign_and_verify_a_nonce() {
        let seed = SeedKey::from_bytes([3u8; 32]);
        let public = decode_user_public(&seed.public_key()).unwrap();
        let n = nonce();
        assert_eq!(n.len(), 22);
        assert_ne!(n, nonce());
        let sig = seed.sign(n.as_bytes());
        assert!(verify(&public, n.as_bytes(), &sig));
        assert!(!verify(&public, b"another nonce", &sig));
        let other = decode_user_public(&SeedKey::from_bytes([4u8; 32]).public_key()).unwrap();
        assert!(!verify(&other, n.as_bytes(), &sig));
        assert!(!verify(&public, n.as_bytes(), "not base64!"));
        assert!(!verify(&public, n.as_bytes(), ""));
    }
}
