//! MQTT 3.1.1 (protocol level 4) and 5.0 (protocol level 5) codec: pure
//! functions over byte slices, in the spirit of smoltcp's `wire` module.
//!
//! Owns the byte format of every control packet and the rules the two
//! specifications make checkable on a single packet (reserved bits, QoS 3,
//! DUP on QoS 0, packet identifier 0, wildcards in topic names, topic filter
//! syntax, shared subscription syntax, allowed properties and their values,
//! reason codes valid for the packet type, UTF-8 without U+0000, minimal
//! variable byte integers of at most four bytes). Rules that need connection
//! state (topic alias ranges, receive maximum, a second CONNECT, session
//! expiry on DISCONNECT, ...) belong to the session.
//!
//! Invariants:
//! - No I/O, no clock, no `unsafe`. Allocation only for the owned fields of
//!   the decoded packet (each string/payload copied once from the input) and
//!   for the bytes appended by [`encode`].
//! - These functions never panic, whatever their input: [`decode`],
//!   [`encode`], [`encoded_len`], [`valid_filter`], [`valid_topic_name`],
//!   [`split_shared`], [`Version::from_level`], [`QoS::from_u8`],
//!   [`Properties::is_empty`], [`Packet::name`], [`DecodeError::reason_code`]
//!   and the `Display` impls. (No indexing or `unwrap` is used; the lints
//!   below deny them in this module.)
//! - The same semantic checks run on decode and on encode, so any packet
//!   that [`decode`] returns can be re-encoded with [`encode`] and decodes
//!   back to an equal packet; and what `encode` accepts, `decode` accepts.
//! - Remaining lengths and all variable byte integers must be minimally
//!   encoded (MQTT 5.0 requires it; 3.1.1 encoders never do otherwise), so a
//!   non-minimal length is rejected in both versions.
//!
//! Topic filter syntax is validated by the decoder (SUBSCRIBE, UNSUBSCRIBE)
//! and also exposed as [`valid_filter`] / [`split_shared`].

// Codecs never panic on input (`unsafe` is forbidden crate-wide).
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

mod codec;
mod properties;
#[cfg(test)]
mod tests;

pub use codec::{encode_plain_publish, MAX_VARINT};
use codec::{varint_len, Counter, Reader, Sink};
use properties::Kind;
pub use properties::Properties;

/// The largest Remaining Length the fixed header can carry.
pub const MAX_REMAINING_LENGTH: usize = MAX_VARINT as usize;

/// The protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// MQTT 3.1.1, protocol level 4.
    V311,
    /// MQTT 5.0, protocol level 5.
    V5,
}

impl Version {
    /// The protocol level byte in CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }

    /// The version for a CONNECT protocol level, if supported.
    pub fn from_level(level: u8) -> Option<Version> {
        match level {
            4 => Some(Version::V311),
            5 => Some(Version::V5),
            _ => None,
        }
    }
}

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(u8)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// 0, 1 or 2; anything else is `None`.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// CONNECT. On decode, `version` comes from the packet's protocol level; on
/// encode, `version` must equal the version passed to [`encode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    /// "Clean Session" in 3.1.1, "Clean Start" in 5.0.
    pub clean_start: bool,
    /// Seconds; 0 disables keep alive.
    pub keep_alive: u16,
    /// May be empty (the server then assigns one or refuses, per version).
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    /// 3.1.1 allows a password only together with a username.
    pub password: Option<Vec<u8>>,
    pub properties: Properties,
}

/// The Will Message carried by CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// A topic name: non-empty, no wildcards.
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    /// Will Properties (5.0 only).
    pub properties: Properties,
}

/// CONNACK. `code` is the raw 3.1.1 return code ([`return_code`]) or 5.0
/// reason code ([`reason`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Must be false when `code` is not 0.
    pub session_present: bool,
    pub code: u8,
    pub properties: Properties,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Must be false for QoS 0.
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// A topic name: no wildcards; empty only in 5.0 with a topic alias.
    pub topic: String,
    /// `Some` (and not 0) exactly when `qos` is above 0.
    pub packet_id: Option<u16>,
    pub properties: Properties,
    pub payload: Vec<u8>,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP. In 3.1.1 `code` is 0 on decode and
/// ignored (with `properties`) on encode. In 5.0 the short forms are decoded
/// and produced when `code` is 0 and/or there are no properties.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ack {
    /// Not 0.
    pub packet_id: u16,
    pub code: u8,
    pub properties: Properties,
}

/// The options byte of one SUBSCRIBE entry. In 3.1.1 only `qos` exists:
/// the others are false/0 on decode and ignored on encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0 = send retained at subscribe, 1 = only if new, 2 = never.
    pub retain_handling: u8,
}

/// SUBSCRIBE: at least one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    pub filters: Vec<(String, SubscriptionOptions)>,
    pub properties: Properties,
}

/// SUBACK: one code per filter (granted QoS or failure), at least one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    pub codes: Vec<u8>,
    pub properties: Properties,
}

/// UNSUBSCRIBE: at least one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub filters: Vec<String>,
    pub properties: Properties,
}

/// UNSUBACK: in 5.0 one code per filter (at least one); in 3.1.1 `codes` is
/// empty on decode and ignored on encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub codes: Vec<u8>,
    pub properties: Properties,
}

/// DISCONNECT. In 3.1.1 `code` is 0 on decode and ignored on encode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    pub code: u8,
    pub properties: Properties,
}

/// AUTH (5.0 only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    pub code: u8,
    pub properties: Properties,
}

/// Any MQTT control packet.
///
/// Large (about 800 bytes, because [`Properties`] holds every 5.0 property
/// inline and CONNECT has two sets): fine for one packet in flight; box it
/// before queueing many.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    /// The packet type name as the specs write it, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

/// MQTT 3.1.1 CONNACK return codes (and the SUBACK failure code).
pub mod return_code {
    pub const ACCEPTED: u8 = 0x00;
    pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
    pub const IDENTIFIER_REJECTED: u8 = 0x02;
    pub const SERVER_UNAVAILABLE: u8 = 0x03;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x04;
    pub const NOT_AUTHORIZED: u8 = 0x05;
    /// SUBACK: the subscription failed.
    pub const SUBACK_FAILURE: u8 = 0x80;
}

/// MQTT 5.0 reason codes (spec section 2.4).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const NORMAL_DISCONNECTION: u8 = 0x00;
    pub const GRANTED_QOS_0: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    pub const DISCONNECT_WITH_WILL_MESSAGE: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
    pub const RE_AUTHENTICATE: u8 = 0x19;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BANNED: u8 = 0x8A;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
    pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const USE_ANOTHER_SERVER: u8 = 0x9C;
    pub const SERVER_MOVED: u8 = 0x9D;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;
}

/// Reason codes each 5.0 packet type may carry (spec section 2.4 table).
mod allowed_codes {
    pub(super) const CONNACK: &[u8] = &[
        0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95,
        0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
    ];
    pub(super) const PUBACK: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
    pub(super) const PUBREL: &[u8] = &[0x00, 0x92];
    pub(super) const SUBACK: &[u8] = &[
        0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
    ];
    pub(super) const SUBACK_V311: &[u8] = &[0x00, 0x01, 0x02, 0x80];
    pub(super) const UNSUBACK: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
    pub(super) const DISCONNECT: &[u8] = &[
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8C, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
        0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    ];
    pub(super) const AUTH: &[u8] = &[0x00, 0x18, 0x19];
}

/// Why bytes could not be decoded. Every variant means: close the
/// connection (in 5.0, after a DISCONNECT/CONNACK with [`Self::reason_code`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes break the packet format (5.0 "Malformed Packet").
    Malformed(&'static str),
    /// Well-formed bytes that break a rule of the spec (5.0 "Protocol Error").
    Protocol(&'static str),
    /// The packet is (at least) `size` bytes, above the `max` we accept.
    /// Reported as soon as the fixed header shows it.
    TooLarge { size: usize, max: usize },
    /// CONNECT with a protocol level (or 3.1 "MQIsdp" name) we do not
    /// speak; 3.1.1 wants CONNACK return code 1, 5.0 reason 0x84.
    UnsupportedVersion(u8),
}

impl DecodeError {
    /// The MQTT 5.0 reason code that names this error.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedVersion(_) => reason::UNSUPPORTED_PROTOCOL_VERSION,
        }
    }
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::Malformed(why) => write!(f, "malformed MQTT packet: {why}"),
            DecodeError::Protocol(why) => write!(f, "MQTT protocol error: {why}"),
            DecodeError::TooLarge { size, max } => write!(
                f,
                "MQTT packet of {size} bytes exceeds the maximum packet size of {max} bytes"
            ),
            DecodeError::UnsupportedVersion(level) => write!(
                f,
                "unsupported MQTT protocol level {level} (only 4 = 3.1.1 and 5 = 5.0 are supported)"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Why a packet could not be encoded. Always a bug or misuse on our side:
/// fix the packet before sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// A string or binary field is longer than 65,535 bytes.
    TooLong(&'static str),
    /// A length or variable byte integer exceeds 268,435,455.
    TooLarge { size: usize, max: usize },
    /// The packet breaks a rule of the spec (the same rules decode checks).
    Invalid(&'static str),
}

impl core::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EncodeError::TooLong(field) => {
                write!(f, "cannot encode MQTT {field}: longer than 65535 bytes")
            }
            EncodeError::TooLarge { size, max } => write!(
                f,
                "cannot encode MQTT packet: {size} exceeds the limit of {max}"
            ),
            EncodeError::Invalid(why) => write!(f, "cannot encode invalid MQTT packet: {why}"),
        }
    }
}

impl std::error::Error for EncodeError {}

/// A topic name as PUBLISH, Will and Response Topic carry it: at least one
/// byte, no `+` or `#`.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.bytes().any(|b| b == b'+' || b == b'#')
}

/// A topic filter's syntax: at least one byte; `+` only as a whole level;
/// `#` only as a whole, last level. Does not interpret `$share/`; see
/// [`split_shared`].
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') {
            return level == "#" && levels.peek().is_none();
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// For a 5.0 shared subscription `$share/{name}/{filter}`, the share name
/// and the inner filter; `None` when `filter` does not start with `$share/`.
/// The parts are not validated here (decode checks that the name is
/// non-empty without `+`/`#` and the inner filter is [`valid_filter`]).
pub fn split_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    Some(rest.split_once('/').unwrap_or((rest, "")))
}

fn check_filter(filter: &str, version: Version) -> Result<bool, &'static str> {
    if version == Version::V5 {
        if let Some((name, inner)) = split_shared(filter) {
            if name.is_empty() || name.contains(['+', '#']) {
                return Err("invalid shared subscription name");
            }
            if !valid_filter(inner) {
                return Err("invalid topic filter in shared subscription");
            }
            return Ok(true);
        }
    }
    if valid_filter(filter) {
        Ok(false)
    } else {
        Err("invalid topic filter")
    }
}

// Packet type numbers (fixed header, high nibble).
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

fn protocol(why: &'static str) -> DecodeError {
    DecodeError::Protocol(why)
}

fn malformed(why: &'static str) -> DecodeError {
    DecodeError::Malformed(why)
}

/// Parses the fixed header's Remaining Length from `buf` (which starts with
/// the first byte). `Ok(None)`: need more bytes. Rejects a packet whose
/// size is already known (or bounded below) to exceed `max`.
fn fixed_header(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value: usize = 0;
    let mut shift = 0u32;
    for i in 1..=4usize {
        let Some(&b) = buf.get(i) else {
            // Incomplete. A minimal encoding's next byte is not 0, so the
            // length is at least value + 128^(i-1) and the header i+1 bytes.
            if i > 1 {
                let lower = (i + 1)
                    .saturating_add(value)
                    .saturating_add(1usize << shift);
                if lower > max {
                    return Err(DecodeError::TooLarge { size: lower, max });
                }
            }
            return Ok(None);
        };
        value |= usize::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            if b == 0 && i > 1 {
                return Err(malformed("remaining length not minimally encoded"));
            }
            let size = value.saturating_add(i + 1);
            if size > max {
                return Err(DecodeError::TooLarge { size, max });
            }
            return Ok(Some((value, i + 1)));
        }
        shift += 7;
    }
    Err(malformed("remaining length longer than 4 bytes"))
}

/// Decodes one packet from the front of `buf`.
///
/// `version` is `None` until CONNECT has been seen: then only CONNECT is
/// accepted, and [`Connect::version`] tells the version. A CONNECT is always
/// decoded with its own protocol level. `max_packet_size` bounds the whole
/// packet (fixed header included) and is checked as soon as the fixed header
/// is known, before waiting for the body.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((packet, consumed)))`.
/// `Err`: the connection must be closed. Never panics.
pub fn decode(
    buf: &[u8],
    version: Option<Version>,
    max_packet_size: usize,
) -> Result<Option<(Packet, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let ptype = first >> 4;
    let flags = first & 0x0F;
    match (ptype, version) {
        (0, _) => return Err(malformed("reserved packet type 0")),
        (CONNECT, _) => {}
        (_, None) => return Err(protocol("the first packet must be CONNECT")),
        (AUTH, Some(Version::V311)) => return Err(malformed("AUTH does not exist in MQTT 3.1.1")),
        _ => {}
    }
    let expected_flags = match ptype {
        PUBLISH => flags,
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => 0b0010,
        _ => 0,
    };
    if flags != expected_flags {
        return Err(malformed("reserved fixed header flags are wrong"));
    }
    let Some((remaining, header_len)) = fixed_header(buf, max_packet_size)? else {
        return Ok(None);
    };
    let total = header_len.saturating_add(remaining);
    let Some(body) = buf.get(header_len..total) else {
        return Ok(None);
    };
    let mut r = Reader::new(body);
    let v = match version {
        Some(v) => v,
        // Only CONNECT gets here without a version; it reads its own.
        None => Version::V311,
    };
    let packet = match ptype {
        CONNECT => Packet::Connect(read_connect(&mut r)?),
        CONNACK => Packet::ConnAck(read_connack(&mut r, v)?),
        PUBLISH => Packet::Publish(read_publish(&mut r, v, flags)?),
        PUBACK => Packet::PubAck(read_ack(&mut r, v)?),
        PUBREC => Packet::PubRec(read_ack(&mut r, v)?),
        PUBREL => Packet::PubRel(read_ack(&mut r, v)?),
        PUBCOMP => Packet::PubComp(read_ack(&mut r, v)?),
        SUBSCRIBE => Packet::Subscribe(read_subscribe(&mut r, v)?),
        SUBACK => Packet::SubAck(read_suback(&mut r, v)?),
        UNSUBSCRIBE => Packet::Unsubscribe(read_unsubscribe(&mut r, v)?),
        UNSUBACK => Packet::UnsubAck(read_unsuback(&mut r, v)?),
        PINGREQ => Packet::PingReq,
        PINGRESP => Packet::PingResp,
        DISCONNECT => Packet::Disconnect(read_disconnect(&mut r, v)?),
        _ => Packet::Auth(read_auth(&mut r)?),
    };
    if !r.is_empty() {
        return Err(malformed("bytes left over after the packet's fields"));
    }
    check(&packet, v).map_err(DecodeError::Protocol)?;
    Ok(Some((packet, total)))
}

fn read_props(r: &mut Reader<'_>, v: Version) -> Result<Properties, DecodeError> {
    match v {
        Version::V5 => Properties::read(r),
        Version::V311 => Ok(Properties::default()),
    }
}

fn read_qos(bits: u8) -> Result<QoS, DecodeError> {
    QoS::from_u8(bits).ok_or(malformed("QoS 3 is not allowed"))
}

fn read_connect(r: &mut Reader<'_>) -> Result<Connect, DecodeError> {
    let name = r.bin_slice()?;
    let level = r.u8()?;
    let version = match name {
        b"MQTT" => Version::from_level(level).ok_or(DecodeError::UnsupportedVersion(level))?,
        b"MQIsdp" => return Err(DecodeError::UnsupportedVersion(level)),
        _ => return Err(protocol("unknown protocol name in CONNECT")),
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(malformed("reserved CONNECT flag is set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = read_qos((flags >> 3) & 0x03)?;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(malformed("will QoS or retain set without a will"));
    }
    if version == Version::V311 && has_password && !has_username {
        return Err(malformed("password flag without user name flag in 3.1.1"));
    }
    let keep_alive = r.u16()?;
    let properties = read_props(r, version)?;
    let client_id = r.str()?;
    let will = if will_flag {
        let properties = read_props(r, version)?;
        let topic = r.str()?;
        let payload = r.bin()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username { Some(r.str()?) } else { None };
    let password = if has_password { Some(r.bin()?) } else { None };
    Ok(Connect {
        version,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn read_connack(r: &mut Reader<'_>, v: Version) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(malformed("reserved CONNACK flags are set"));
    }
    let code = r.u8()?;
    let properties = read_props(r, v)?;
    Ok(ConnAck {
        session_present: flags & 0x01 != 0,
        code,
        properties,
    })
}

fn read_publish(r: &mut Reader<'_>, v: Version, flags: u8) -> Result<Publish, DecodeError> {
    let qos = read_qos((flags >> 1) & 0x03)?;
    let topic = r.str()?;
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(r.u16()?)
    };
    let properties = read_props(r, v)?;
    let payload = r.rest().to_vec();
    Ok(Publish {
        dup: flags & 0x08 != 0,
        qos,
        retain: flags & 0x01 != 0,
        topic,
        packet_id,
        properties,
        payload,
    })
}

fn read_ack(r: &mut Reader<'_>, v: Version) -> Result<Ack, DecodeError> {
    let packet_id = r.u16()?;
    let (code, properties) = match v {
        Version::V311 => (0, Properties::default()),
        // 5.0: Remaining Length 2 means code 0 and no properties; 3 means
        // a code and no properties.
        Version::V5 if r.is_empty() => (0, Properties::default()),
        Version::V5 => {
            let code = r.u8()?;
            let properties = if r.is_empty() {
                Properties::default()
            } else {
                Properties::read(r)?
            };
            (code, properties)
        }
    };
    Ok(Ack {
        packet_id,
        code,
        properties,
    })
}

fn read_options(b: u8, v: Version) -> Result<SubscriptionOptions, DecodeError> {
    let reserved = match v {
        Version::V311 => 0xFC,
        Version::V5 => 0xC0,
    };
    if b & reserved != 0 {
        return Err(malformed("reserved subscription option bits are set"));
    }
    let retain_handling = (b >> 4) & 0x03;
    if retain_handling == 3 {
        return Err(protocol("retain handling 3 is not allowed"));
    }
    Ok(SubscriptionOptions {
        qos: read_qos(b & 0x03)?,
        no_local: b & 0x04 != 0,
        retain_as_published: b & 0x08 != 0,
        retain_handling,
    })
}

fn read_subscribe(r: &mut Reader<'_>, v: Version) -> Result<Subscribe, DecodeError> {
    let packet_id = r.u16()?;
    let properties = read_props(r, v)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.str()?;
        let options = read_options(r.u8()?, v)?;
        filters.push((filter, options));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

fn read_suback(r: &mut Reader<'_>, v: Version) -> Result<SubAck, DecodeError> {
    let packet_id = r.u16()?;
    let properties = read_props(r, v)?;
    let codes = r.rest().to_vec();
    Ok(SubAck {
        packet_id,
        codes,
        properties,
    })
}

fn read_unsubscribe(r: &mut Reader<'_>, v: Version) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.u16()?;
    let properties = read_props(r, v)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.str()?);
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn read_unsuback(r: &mut Reader<'_>, v: Version) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.u16()?;
    let properties = read_props(r, v)?;
    let codes = match v {
        Version::V311 => Vec::new(),
        Version::V5 => r.rest().to_vec(),
    };
    Ok(UnsubAck {
        packet_id,
        codes,
        properties,
    })
}

/// DISCONNECT and AUTH (5.0): an empty body means code 0 and no properties,
/// one byte means a code and no properties.
fn read_code_props(r: &mut Reader<'_>) -> Result<(u8, Properties), DecodeError> {
    if r.is_empty() {
        return Ok((0, Properties::default()));
    }
    let code = r.u8()?;
    if r.is_empty() {
        return Ok((code, Properties::default()));
    }
    Ok((code, Properties::read(r)?))
}

fn read_disconnect(r: &mut Reader<'_>, v: Version) -> Result<Disconnect, DecodeError> {
    let (code, properties) = match v {
        Version::V311 => (0, Properties::default()),
        Version::V5 => read_code_props(r)?,
    };
    Ok(Disconnect { code, properties })
}

fn read_auth(r: &mut Reader<'_>) -> Result<Auth, DecodeError> {
    let (code, properties) = read_code_props(r)?;
    Ok(Auth { code, properties })
}

/// The semantic rules of one packet, shared by decode and encode. For
/// CONNECT the packet's own version is used.
fn check(packet: &Packet, v: Version) -> Result<(), &'static str> {
    let v5 = v == Version::V5;
    let props = |p: &Properties, kind: Kind| if v5 { p.check(kind) } else { Ok(()) };
    let code_in = |code: u8, list: &[u8], why: &'static str| {
        if !v5 || list.contains(&code) {
            Ok(())
        } else {
            Err(why)
        }
    };
    let nonzero = |id: u16| {
        if id == 0 {
            Err("packet identifier must not be 0")
        } else {
            Ok(())
        }
    };
    match packet {
        Packet::Connect(c) => {
            let v5 = c.version == Version::V5;
            if v5 {
                c.properties.check(Kind::CONNECT)?;
            } else if c.password.is_some() && c.username.is_none() {
                return Err("3.1.1 allows a password only with a user name");
            }
            if let Some(w) = &c.will {
                if !valid_topic_name(&w.topic) {
                    return Err("will topic is not a valid topic name");
                }
                if v5 {
                    w.properties.check(Kind::WILL)?;
                }
            }
        }
        Packet::ConnAck(c) => {
            if v5 {
                code_in(
                    c.code,
                    allowed_codes::CONNACK,
                    "reason code not allowed in CONNACK",
                )?;
            } else if c.code > return_code::NOT_AUTHORIZED {
                return Err("reserved CONNACK return code");
            }
            if c.session_present && c.code != 0 {
                return Err("session present with a failure code in CONNACK");
            }
            props(&c.properties, Kind::CONNACK)?;
        }
        Packet::Publish(p) => {
            match (p.qos, p.packet_id) {
                (QoS::AtMostOnce, None) => {}
                (QoS::AtMostOnce, Some(_)) => return Err("QoS 0 PUBLISH with a packet identifier"),
                (_, None) => return Err("QoS 1/2 PUBLISH without a packet identifier"),
                (_, Some(id)) => nonzero(id)?,
            }
            if p.dup && p.qos == QoS::AtMostOnce {
                return Err("DUP set on a QoS 0 PUBLISH");
            }
            if p.topic.is_empty() {
                if !v5 || p.properties.topic_alias.is_none() {
                    return Err("empty topic name without a topic alias");
                }
            } else if !valid_topic_name(&p.topic) {
                return Err("wildcard in PUBLISH topic name");
            }
            props(&p.properties, Kind::PUBLISH)?;
        }
        Packet::PubAck(a) | Packet::PubRec(a) => {
            nonzero(a.packet_id)?;
            code_in(
                a.code,
                allowed_codes::PUBACK,
                "reason code not allowed in PUBACK/PUBREC",
            )?;
            props(&a.properties, Kind::ACK)?;
        }
        Packet::PubRel(a) | Packet::PubComp(a) => {
            nonzero(a.packet_id)?;
            code_in(
                a.code,
                allowed_codes::PUBREL,
                "reason code not allowed in PUBREL/PUBCOMP",
            )?;
            props(&a.properties, Kind::ACK)?;
        }
        Packet::Subscribe(s) => {
            nonzero(s.packet_id)?;
            if s.filters.is_empty() {
                return Err("SUBSCRIBE without topic filters");
            }
            for (filter, o) in &s.filters {
                let shared = check_filter(filter, v)?;
                if v5 {
                    if shared && o.no_local {
                        return Err("no local on a shared subscription");
                    }
                    if o.retain_handling > 2 {
                        return Err("retain handling above 2");
                    }
                }
            }
            props(&s.properties, Kind::SUBSCRIBE)?;
        }
        Packet::SubAck(s) => {
            nonzero(s.packet_id)?;
            if s.codes.is_empty() {
                return Err("SUBACK without return codes");
            }
            let list = if v5 {
                allowed_codes::SUBACK
            } else {
                allowed_codes::SUBACK_V311
            };
            if s.codes.iter().any(|c| !list.contains(c)) {
                return Err("reason code not allowed in SUBACK");
            }
            props(&s.properties, Kind::SUBACK)?;
        }
        Packet::Unsubscribe(u) => {
            nonzero(u.packet_id)?;
            if u.filters.is_empty() {
                return Err("UNSUBSCRIBE without topic filters");
            }
            for filter in &u.filters {
                check_filter(filter, v)?;
            }
            props(&u.properties, Kind::UNSUBSCRIBE)?;
        }
        Packet::UnsubAck(u) => {
            nonzero(u.packet_id)?;
            if v5 {
                if u.codes.is_empty() {
                    return Err("UNSUBACK without reason codes");
                }
                if u.codes.iter().any(|c| !allowed_codes::UNSUBACK.contains(c)) {
                    return Err("reason code not allowed in UNSUBACK");
                }
            }
            props(&u.properties, Kind::UNSUBACK)?;
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            code_in(
                d.code,
                allowed_codes::DISCONNECT,
                "reason code not allowed in DISCONNECT",
            )?;
            props(&d.properties, Kind::DISCONNECT)?;
        }
        Packet::Auth(a) => {
            if !v5 {
                return Err("AUTH does not exist in MQTT 3.1.1");
            }
            code_in(
                a.code,
                allowed_codes::AUTH,
                "reason code not allowed in AUTH",
            )?;
            props(&a.properties, Kind::AUTH)?;
        }
    }
    Ok(())
}

fn first_byte(packet: &Packet) -> u8 {
    let (ptype, flags) = match packet {
        Packet::Connect(_) => (CONNECT, 0),
        Packet::ConnAck(_) => (CONNACK, 0),
        Packet::Publish(p) => (
            PUBLISH,
            (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain),
        ),
        Packet::PubAck(_) => (PUBACK, 0),
        Packet::PubRec(_) => (PUBREC, 0),
        Packet::PubRel(_) => (PUBREL, 0b0010),
        Packet::PubComp(_) => (PUBCOMP, 0),
        Packet::Subscribe(_) => (SUBSCRIBE, 0b0010),
        Packet::SubAck(_) => (SUBACK, 0),
        Packet::Unsubscribe(_) => (UNSUBSCRIBE, 0b0010),
        Packet::UnsubAck(_) => (UNSUBACK, 0),
        Packet::PingReq => (PINGREQ, 0),
        Packet::PingResp => (PINGRESP, 0),
        Packet::Disconnect(_) => (DISCONNECT, 0),
        Packet::Auth(_) => (AUTH, 0),
    };
    (ptype << 4) | flags
}

fn write_props<S: Sink>(s: &mut S, p: &Properties, v: Version) -> Result<(), EncodeError> {
    match v {
        Version::V5 => p.write(s),
        Version::V311 => Ok(()),
    }
}

/// 5.0 short forms: nothing when code 0 and no properties (if `may_omit`),
/// the code alone when there are no properties.
fn write_code_props<S: Sink>(
    s: &mut S,
    code: u8,
    p: &Properties,
    may_omit: bool,
) -> Result<(), EncodeError> {
    let empty = p.is_empty();
    if empty && code == 0 && may_omit {
        return Ok(());
    }
    s.put_u8(code);
    if empty {
        return Ok(());
    }
    p.write(s)
}

fn write_body<S: Sink>(packet: &Packet, v: Version, s: &mut S) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(c) => {
            s.put_str("MQTT", "protocol name")?;
            s.put_u8(c.version.level());
            let mut flags = u8::from(c.clean_start) << 1;
            if let Some(w) = &c.will {
                flags |= 0x04 | ((w.qos as u8) << 3) | (u8::from(w.retain) << 5);
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            s.put_u8(flags);
            s.put_u16(c.keep_alive);
            write_props(s, &c.properties, v)?;
            s.put_str(&c.client_id, "client identifier")?;
            if let Some(w) = &c.will {
                write_props(s, &w.properties, v)?;
                s.put_str(&w.topic, "will topic")?;
                s.put_bin(&w.payload, "will payload")?;
            }
            if let Some(u) = &c.username {
                s.put_str(u, "user name")?;
            }
            if let Some(p) = &c.password {
                s.put_bin(p, "password")?;
            }
        }
        Packet::ConnAck(c) => {
            s.put_u8(u8::from(c.session_present));
            s.put_u8(c.code);
            write_props(s, &c.properties, v)?;
        }
        Packet::Publish(p) => {
            s.put_str(&p.topic, "topic name")?;
            if let Some(id) = p.packet_id {
                s.put_u16(id);
            }
            write_props(s, &p.properties, v)?;
            s.put(&p.payload);
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            s.put_u16(a.packet_id);
            if v == Version::V5 {
                write_code_props(s, a.code, &a.properties, true)?;
            }
        }
        Packet::Subscribe(sub) => {
            s.put_u16(sub.packet_id);
            write_props(s, &sub.properties, v)?;
            for (filter, o) in &sub.filters {
                s.put_str(filter, "topic filter")?;
                let mut b = o.qos as u8;
                if v == Version::V5 {
                    b |= (u8::from(o.no_local) << 2)
                        | (u8::from(o.retain_as_published) << 3)
                        | ((o.retain_handling & 0x03) << 4);
                }
                s.put_u8(b);
            }
        }
        Packet::SubAck(a) => {
            s.put_u16(a.packet_id);
            write_props(s, &a.properties, v)?;
            s.put(&a.codes);
        }
        Packet::Unsubscribe(u) => {
            s.put_u16(u.packet_id);
            write_props(s, &u.properties, v)?;
            for filter in &u.filters {
                s.put_str(filter, "topic filter")?;
            }
        }
        Packet::UnsubAck(u) => {
            s.put_u16(u.packet_id);
            if v == Version::V5 {
                u.properties.write(s)?;
                s.put(&u.codes);
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v == Version::V5 {
                write_code_props(s, d.code, &d.properties, true)?;
            }
        }
        Packet::Auth(a) => write_code_props(s, a.code, &a.properties, true)?,
    }
    Ok(())
}

/// Checks `packet` and measures its body (Remaining Length).
fn body_len(packet: &Packet, version: Version) -> Result<usize, EncodeError> {
    if let Packet::Connect(c) = packet {
        if c.version != version {
            return Err(EncodeError::Invalid(
                "CONNECT version differs from the encoding version",
            ));
        }
    }
    check(packet, version).map_err(EncodeError::Invalid)?;
    let mut c = Counter::default();
    write_body(packet, version, &mut c)?;
    if c.0 > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge {
            size: c.0,
            max: MAX_REMAINING_LENGTH,
        });
    }
    Ok(c.0)
}

/// The number of bytes [`encode`] would append (compare with the peer's
/// maximum packet size before sending). Never panics.
pub fn encoded_len(packet: &Packet, version: Version) -> Result<usize, EncodeError> {
    let len = body_len(packet, version)?;
    Ok(1 + varint_len(len) + len)
}

/// Appends the encoding of `packet` for a `version` connection to `out`.
/// On error nothing is appended. Properties, and the reason codes of acks
/// and DISCONNECT, are ignored for 3.1.1. Never panics.
pub fn encode(packet: &Packet, version: Version, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let len = body_len(packet, version)?;
    let start = out.len();
    out.reserve(1 + varint_len(len) + len);
    out.push(first_byte(packet));
    let written = out
        .put_len(len)
        .and_then(|()| write_body(packet, version, out));
    if written.is_err() {
        out.truncate(start);
    }
    written
}
