//! Why a protocol machine ends its connection ([`CloseReason`]).
//!
//! Owns: the closed set of reasons the MQTT machine ([`crate::mqtt`])
//! produces, each with its `Display` text. That text is the log line of the
//! shell and, for MQTT 5, the reason string of the DISCONNECT frond sends:
//! changing it changes what clients see. Defined outside `mqtt/` so that
//! the NATS machine can share it. No I/O.

use std::fmt;

/// Why a connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client ended it normally (MQTT DISCONNECT).
    ClientDisconnect,
    /// The input could not be decoded (the decoder's error text).
    Malformed(String),
    /// A packet that is not allowed here (what was wrong).
    ProtocolError(String),
    /// A feature frond does not support was asked for.
    Unsupported(&'static str),
    /// The credentials were refused: `user` and the refusal.
    AuthFailed { user: String, refusal: String },
    /// CONNECT refused (the will's permissions, a client id of another
    /// user, an empty client id without clean session): why.
    Refused(String),
    /// A PUBLISH frond cannot take and cannot refuse with an
    /// acknowledgement (3.1.1, or QoS 0): why.
    PublishRefused(String),
    /// A 5.0 client sent more unacknowledged QoS 1/2 publishes than
    /// frond's Receive Maximum (the maximum).
    ReceiveMaximumExceeded(usize),
    /// A 3.1.1 publish could not be stored (no negative ack exists): why.
    NotStored(String),
    /// The session state could not be saved before an acknowledgement
    /// that depends on it: why.
    SyncFailed(String),
    /// No complete CONNECT within `connect_timeout`.
    ConnectTimeout,
    /// Nothing from the client within 1.5 × its keep-alive.
    KeepAliveTimeout,
    /// frond could not encode its own packet (a bug, contained to this
    /// connection).
    Internal(String),
    /// Another connection took over the client id (MQTT 5: 0x8E).
    TakenOver,
    /// The server is shutting down (MQTT 5: 0x8B).
    ShuttingDown,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClientDisconnect => f.write_str("client sent DISCONNECT"),
            Self::Malformed(e) => write!(f, "protocol error: {e}"),
            Self::ProtocolError(why) | Self::Refused(why) => f.write_str(why),
            Self::Unsupported(what) => write!(f, "{what} not supported"),
            Self::AuthFailed { user, refusal } => {
                write!(f, "authentication failed for user {user:?} ({refusal})")
            }
            Self::PublishRefused(why) => write!(f, "PUBLISH refused: {why}"),
            Self::ReceiveMaximumExceeded(max) => write!(
                f,
                "more than the Receive Maximum ({max}) unacknowledged QoS 1/2 publishes"
            ),
            Self::NotStored(why) => write!(f, "message not stored: {why}"),
            Self::SyncFailed(why) => write!(
                f,
                "session state could not be saved ({why}); nothing unsaved is acknowledged"
            ),
            Self::ConnectTimeout => f.write_str("no CONNECT within connect_timeout"),
            Self::KeepAliveTimeout => f.write_str("keep-alive timeout"),
            Self::Internal(e) => write!(f, "internal encode error: {e}"),
            Self::TakenOver => f.write_str("another connection took over the client id"),
            Self::ShuttingDown => f.write_str("server shutting down"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CloseReason::*;

    /// The texts are what 5.0 clients get as the DISCONNECT reason string
    /// and what the log says: they must not drift.
    #[test]
    fn display_texts() {
        let cases = [
            (ClientDisconnect, "client sent DISCONNECT"),
            (Malformed("bad".into()), "protocol error: bad"),
            (ProtocolError("second CONNECT".into()), "second CONNECT"),
            (Unsupported("AUTH"), "AUTH not supported"),
            (
                AuthFailed {
                    user: "u".into(),
                    refusal: "BadCredentials".into(),
                },
                "authentication failed for user \"u\" (BadCredentials)",
            ),
            (Refused("no".into()), "no"),
            (TakenOver, "another connection took over the client id"),
            (ShuttingDown, "server shutting down"),
            (
                PublishRefused("too long".into()),
                "PUBLISH refused: too long",
            ),
            (
                ReceiveMaximumExceeded(4),
                "more than the Receive Maximum (4) unacknowledged QoS 1/2 publishes",
            ),
            (NotStored("disk".into()), "message not stored: disk"),
            (
                SyncFailed("write failed".into()),
                "session state could not be saved (write failed); nothing unsaved is acknowledged",
            ),
            (ConnectTimeout, "no CONNECT within connect_timeout"),
            (KeepAliveTimeout, "keep-alive timeout"),
            (Internal("x".into()), "internal encode error: x"),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
    }
}
