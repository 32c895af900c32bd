//! Fuzz target for the MQTT codec (`frond::wire::mqtt`).
//!
//! Feeds arbitrary bytes to `decode` before CONNECT (version unknown) and
//! for each protocol version, with a generous and a tight size limit. Any
//! packet that decodes must re-encode, and the encoding must decode to an
//! equal packet consuming exactly the encoded length. Run with
//! `cargo fuzz run mqtt_decode` from the crate root.

#![no_main]

use frond::wire::mqtt::{decode, encode, DecodeError, Packet, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for version in [None, Some(Version::V311), Some(Version::V5)] {
        // A tight limit must only ever add TooLarge errors.
        let _ = decode(data, version, 64);
        let Ok(Some((packet, consumed))) = decode(data, version, usize::MAX) else {
            continue;
        };
        assert!(consumed > 0 && consumed <= data.len());
        // The same packet decodes from exactly its own bytes, and every
        // shorter prefix asks for more.
        let own = data.get(..consumed).unwrap_or_default();
        assert_eq!(
            decode(own, version, usize::MAX),
            Ok(Some((packet.clone(), consumed)))
        );
        assert_eq!(
            decode(data.get(..consumed - 1).unwrap_or_default(), version, usize::MAX),
            Ok(None)
        );
        assert_eq!(
            decode(data, version, consumed - 1),
            Err(DecodeError::TooLarge {
                size: consumed,
                max: consumed - 1
            })
        );
        let encode_version = match (&packet, version) {
            (Packet::Connect(connect), _) => connect.version,
            (_, Some(v)) => v,
            (_, None) => panic!("decoded {} before CONNECT", packet.name()),
        };
        let mut out = Vec::new();
        if let Err(e) = encode(&packet, encode_version, &mut out) {
            panic!("decoded packet does not re-encode: {e}: {packet:?}");
        }
        let again = decode(&out, Some(encode_version), usize::MAX);
        assert_eq!(again, Ok(Some((packet, out.len()))));
    }
});
