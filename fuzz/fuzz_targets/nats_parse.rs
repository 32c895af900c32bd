//! Fuzz target for the NATS codec (`frond::wire::nats`).
//!
//! Feeds arbitrary bytes to both op parsers (the server side parses what
//! clients send, the client side — the uplink — what servers send), with a
//! generous and a tight limit, and to the header-block parser and base64
//! decoder. Nothing may panic; a parsed op consumes at least one byte and no
//! more than the input, and every shorter prefix of it asks for more input
//! or fails (a parser must never accept half an op). A header block that
//! parses must re-encode to a block that parses to the same headers. Run
//! with `cargo fuzz run nats_parse` from the crate root.

#![no_main]

use frond::wire::nats::{base64, client, headers::HeaderBlock, server};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for (line, payload) in [(4096, 1 << 20), (16, 8)] {
        if let Ok(Some((_, used))) = server::parse_client_op(data, line, payload) {
            assert!(used > 0 && used <= data.len());
            let short = data.get(..used - 1).unwrap_or_default();
            assert!(!matches!(
                server::parse_client_op(short, line, payload),
                Ok(Some(_))
            ));
        }
        if let Ok(Some((_, used))) = client::parse_server_op(data, payload) {
            assert!(used > 0 && used <= data.len());
            let short = data.get(..used - 1).unwrap_or_default();
            assert!(!matches!(client::parse_server_op(short, payload), Ok(Some(_))));
        }
    }
    if let Ok(h) = HeaderBlock::parse(data) {
        if let Ok(again) = h.encode() {
            let reparsed = HeaderBlock::parse(&again).expect("an encoded block parses");
            assert_eq!(reparsed, h);
        }
    }
    let _ = base64::decode(data);
});
