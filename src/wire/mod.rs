//! Pure protocol codecs. Nothing here does I/O, reads a clock or panics on
//! any input: decoders return "need more bytes", "malformed: reason" or a
//! frame.

pub mod mqtt;
pub mod nats;
