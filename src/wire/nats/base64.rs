//! Standard base64 (RFC 4648, `+/`, `=` padding), as used by the JetStream
//! API for message `hdrs` and `data`.
//!
//! Invariants: decoding never panics; it accepts padded and unpadded input,
//! ignores nothing (whitespace is an error) and rejects bad characters,
//! impossible lengths and non-zero trailing bits.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn value(c: u8) -> Option<u32> {
    match c {
        b'A'..=b'Z' => Some(u32::from(c - b'A')),
        b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
        b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decode standard base64.
pub fn decode(input: &[u8]) -> Result<Vec<u8>, String> {
    let trimmed = match input {
        [rest @ .., b'=', b'='] => rest,
        [rest @ .., b'='] => rest,
        _ => input,
    };
    if !input.len().is_multiple_of(4) && trimmed.len() != input.len() {
        return Err("base64: padded input length is not a multiple of 4".into());
    }
    if trimmed.len() % 4 == 1 {
        return Err("base64: impossible input length".into());
    }
    let mut out = Vec::with_capacity(trimmed.len() / 4 * 3 + 2);
    for chunk in trimmed.chunks(4) {
        let mut acc: u32 = 0;
        for &c in chunk {
            let v =
                value(c).ok_or_else(|| format!("base64: invalid character {:?}", char::from(c)))?;
            acc = (acc << 6) | v;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]),
            3 => {
                if acc & 0x3 != 0 {
                    return Err("base64: non-zero trailing bits".into());
                }
                let acc = acc >> 2;
                out.extend_from_slice(&[(acc >> 8) as u8, acc as u8]);
            }
            2 => {
                if acc & 0xf != 0 {
                    return Err("base64: non-zero trailing bits".into());
                }
                out.push((acc >> 4) as u8);
            }
            _ => return Err("base64: impossible input length".into()),
        }
    }
    Ok(out)
}

/// Encode standard base64 with padding.
pub fn encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sym = |shift: u32| {
            // `& 63`: always inside the 64-symbol alphabet.
            ALPHABET
                .get(((n >> shift) & 63) as usize)
                .map_or('=', |&c| char::from(c))
        };
        out.push(sym(18));
        out.push(sym(12));
        out.push(if chunk.len() > 1 { sym(6) } else { '=' });
        out.push(if chunk.len() > 2 { sym(0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]

    use super::*;

    #[test]
    fn known_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("hello", "aGVsbG8="),
        ] {
            assert_eq!(encode(plain.as_bytes()), enc);
            assert_eq!(decode(enc.as_bytes()).unwrap(), plain.as_bytes());
            assert_eq!(
                decode(enc.trim_end_matches('=').as_bytes()).unwrap(),
                plain.as_bytes()
            );
        }
        // The header block nats-server 2.12 returned in an experiment.
        let h = decode(b"TkFUUy8xLjANCk5hdHMtTXNnLUlkOiBuOlM6MQ0KRm9vOiBiYXINCg0K").unwrap();
        assert_eq!(h, b"NATS/1.0\r\nNats-Msg-Id: n:S:1\r\nFoo: bar\r\n\r\n");
    }

    #[test]
    fn round_trip_random() {
        let mut rng = fastrand::Rng::with_seed(7);
        for len in 0..200 {
            let v: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            assert_eq!(decode(encode(&v).as_bytes()).unwrap(), v);
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(decode(b"Zg=").is_err());
        assert!(decode(b"Z").is_err());
        assert!(decode(b"Zh==").is_err()); // trailing bits
        assert!(decode(b"Zm9v\n").is_err());
        assert!(decode(b"Zm-v").is_err());
        assert!(decode(b"====").is_err());
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..2000 {
            let v: Vec<u8> = (0..rng.usize(0..12)).map(|_| rng.u8(..)).collect();
            let _ = decode(&v);
        }
    }
}
