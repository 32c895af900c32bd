//! MQTT 5.0 properties (spec section 2.2.2): one typed field per property.
//!
//! Decoding rejects unknown identifiers and repeats of the properties that may
//! appear once; [`Properties::check`] (run by both decode and encode) rejects
//! properties the packet type does not allow and values the spec forbids.
//! Encoding writes the present properties in identifier order. In 3.1.1 the
//! struct stays empty and encoding ignores it.

use super::codec::{Counter, Reader, Sink, MAX_VARINT};
use super::{valid_topic_name, DecodeError, EncodeError};

/// Every MQTT 5.0 property. Byte-valued properties keep their raw `u8`
/// (e.g. `retain_available: Some(0)`); absent means "not sent".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties {
    /// 0x01, PUBLISH and Will: 0 = unspecified bytes, 1 = UTF-8.
    pub payload_format_indicator: Option<u8>,
    /// 0x02, PUBLISH and Will: seconds.
    pub message_expiry_interval: Option<u32>,
    /// 0x03, PUBLISH and Will.
    pub content_type: Option<String>,
    /// 0x08, PUBLISH and Will: a topic name (no wildcards).
    pub response_topic: Option<String>,
    /// 0x09, PUBLISH and Will.
    pub correlation_data: Option<Vec<u8>>,
    /// 0x0B, PUBLISH (any number) and SUBSCRIBE (at most one): 1..=268435455.
    pub subscription_identifiers: Vec<u32>,
    /// 0x11, CONNECT, CONNACK, DISCONNECT: seconds.
    pub session_expiry_interval: Option<u32>,
    /// 0x12, CONNACK.
    pub assigned_client_identifier: Option<String>,
    /// 0x13, CONNACK: seconds.
    pub server_keep_alive: Option<u16>,
    /// 0x15, CONNECT, CONNACK, AUTH.
    pub authentication_method: Option<String>,
    /// 0x16, CONNECT, CONNACK, AUTH (only with a method).
    pub authentication_data: Option<Vec<u8>>,
    /// 0x17, CONNECT: 0 or 1.
    pub request_problem_information: Option<u8>,
    /// 0x18, Will: seconds.
    pub will_delay_interval: Option<u32>,
    /// 0x19, CONNECT: 0 or 1.
    pub request_response_information: Option<u8>,
    /// 0x1A, CONNACK.
    pub response_information: Option<String>,
    /// 0x1C, CONNACK, DISCONNECT.
    pub server_reference: Option<String>,
    /// 0x1F, every packet with a reason code.
    pub reason_string: Option<String>,
    /// 0x21, CONNECT, CONNACK: not 0.
    pub receive_maximum: Option<u16>,
    /// 0x22, CONNECT, CONNACK.
    pub topic_alias_maximum: Option<u16>,
    /// 0x23, PUBLISH: not 0.
    pub topic_alias: Option<u16>,
    /// 0x24, CONNACK: 0 or 1.
    pub maximum_qos: Option<u8>,
    /// 0x25, CONNACK: 0 or 1.
    pub retain_available: Option<u8>,
    /// 0x26, every packet and Will; order kept, repeats allowed.
    pub user_properties: Vec<(String, String)>,
    /// 0x27, CONNECT, CONNACK: bytes, not 0.
    pub maximum_packet_size: Option<u32>,
    /// 0x28, CONNACK: 0 or 1.
    pub wildcard_subscription_available: Option<u8>,
    /// 0x29, CONNACK: 0 or 1.
    pub subscription_identifier_available: Option<u8>,
    /// 0x2A, CONNACK: 0 or 1.
    pub shared_subscription_available: Option<u8>,
}

/// Which packet (or the Will) a property set belongs to; a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Kind(u16);

impl Kind {
    pub(super) const CONNECT: Kind = Kind(1 << 0);
    pub(super) const CONNACK: Kind = Kind(1 << 1);
    pub(super) const PUBLISH: Kind = Kind(1 << 2);
    /// PUBACK, PUBREC, PUBREL and PUBCOMP allow the same properties.
    pub(super) const ACK: Kind = Kind(1 << 3);
    pub(super) const SUBSCRIBE: Kind = Kind(1 << 4);
    pub(super) const SUBACK: Kind = Kind(1 << 5);
    pub(super) const UNSUBSCRIBE: Kind = Kind(1 << 6);
    pub(super) const UNSUBACK: Kind = Kind(1 << 7);
    pub(super) const DISCONNECT: Kind = Kind(1 << 8);
    pub(super) const AUTH: Kind = Kind(1 << 9);
    pub(super) const WILL: Kind = Kind(1 << 10);
}

const PUB_OR_WILL: u16 = Kind::PUBLISH.0 | Kind::WILL.0;
const WITH_REASON: u16 = Kind::CONNACK.0
    | Kind::ACK.0
    | Kind::SUBACK.0
    | Kind::UNSUBACK.0
    | Kind::DISCONNECT.0
    | Kind::AUTH.0;

macro_rules! once {
    ($slot:expr, $value:expr, $name:literal) => {{
        let v = $value;
        if $slot.is_some() {
            return Err(DecodeError::Malformed(concat!(
                "property appears twice: ",
                $name
            )));
        }
        $slot = Some(v);
    }};
}

impl Properties {
    /// True when no property is set.
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    /// Reads a Property Length and the properties it covers.
    pub(super) fn read(r: &mut Reader<'_>) -> Result<Properties, DecodeError> {
        let len = r.varint()?;
        let mut r = Reader::new(r.take(len as usize)?);
        let mut p = Properties::default();
        while !r.is_empty() {
            match r.varint()? {
                0x01 => once!(
                    p.payload_format_indicator,
                    r.u8()?,
                    "payload_format_indicator"
                ),
                0x02 => once!(
                    p.message_expiry_interval,
                    r.u32()?,
                    "message_expiry_interval"
                ),
                0x03 => once!(p.content_type, r.str()?, "content_type"),
                0x08 => once!(p.response_topic, r.str()?, "response_topic"),
                0x09 => once!(p.correlation_data, r.bin()?, "correlation_data"),
                0x0B => {
                    let v = r.varint()?;
                    p.subscription_identifiers.push(v);
                }
                0x11 => once!(
                    p.session_expiry_interval,
                    r.u32()?,
                    "session_expiry_interval"
                ),
                0x12 => once!(
                    p.assigned_client_identifier,
                    r.str()?,
                    "assigned_client_identifier"
                ),
                0x13 => once!(p.server_keep_alive, r.u16()?, "server_keep_alive"),
                0x15 => once!(p.authentication_method, r.str()?, "authentication_method"),
                0x16 => once!(p.authentication_data, r.bin()?, "authentication_data"),
                0x17 => once!(
                    p.request_problem_information,
                    r.u8()?,
                    "request_problem_information"
                ),
                0x18 => once!(p.will_delay_interval, r.u32()?, "will_delay_interval"),
                0x19 => once!(
                    p.request_response_information,
                    r.u8()?,
                    "request_response_information"
                ),
                0x1A => once!(p.response_information, r.str()?, "response_information"),
                0x1C => once!(p.server_reference, r.str()?, "server_reference"),
                0x1F => once!(p.reason_string, r.str()?, "reason_string"),
                0x21 => once!(p.receive_maximum, r.u16()?, "receive_maximum"),
                0x22 => once!(p.topic_alias_maximum, r.u16()?, "topic_alias_maximum"),
                0x23 => once!(p.topic_alias, r.u16()?, "topic_alias"),
                0x24 => once!(p.maximum_qos, r.u8()?, "maximum_qos"),
                0x25 => once!(p.retain_available, r.u8()?, "retain_available"),
                0x26 => {
                    let k = r.str()?;
                    let v = r.str()?;
                    p.user_properties.push((k, v));
                }
                0x27 => once!(p.maximum_packet_size, r.u32()?, "maximum_packet_size"),
                0x28 => once!(
                    p.wildcard_subscription_available,
                    r.u8()?,
                    "wildcard_subscription_available"
                ),
                0x29 => once!(
                    p.subscription_identifier_available,
                    r.u8()?,
                    "subscription_identifier_available"
                ),
                0x2A => once!(
                    p.shared_subscription_available,
                    r.u8()?,
                    "shared_subscription_available"
                ),
                _ => return Err(DecodeError::Malformed("unknown property identifier")),
            }
        }
        Ok(p)
    }

    /// Writes the Property Length and then the properties.
    pub(super) fn write<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        let mut c = Counter::default();
        self.write_body(&mut c)?;
        s.put_len(c.0)?;
        self.write_body(s)
    }

    fn write_body<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        if let Some(v) = self.payload_format_indicator {
            s.put_u8(0x01);
            s.put_u8(v);
        }
        if let Some(v) = self.message_expiry_interval {
            s.put_u8(0x02);
            s.put_u32(v);
        }
        if let Some(v) = &self.content_type {
            s.put_u8(0x03);
            s.put_str(v, "content_type")?;
        }
        if let Some(v) = &self.response_topic {
            s.put_u8(0x08);
            s.put_str(v, "response_topic")?;
        }
        if let Some(v) = &self.correlation_data {
            s.put_u8(0x09);
            s.put_bin(v, "correlation_data")?;
        }
        for &v in &self.subscription_identifiers {
            s.put_u8(0x0B);
            s.put_varint(v)?;
        }
        if let Some(v) = self.session_expiry_interval {
            s.put_u8(0x11);
            s.put_u32(v);
        }
        if let Some(v) = &self.assigned_client_identifier {
            s.put_u8(0x12);
            s.put_str(v, "assigned_client_identifier")?;
        }
        if let Some(v) = self.server_keep_alive {
            s.put_u8(0x13);
            s.put_u16(v);
        }
        if let Some(v) = &self.authentication_method {
            s.put_u8(0x15);
            s.put_str(v, "authentication_method")?;
        }
        if let Some(v) = &self.authentication_data {
            s.put_u8(0x16);
            s.put_bin(v, "authentication_data")?;
        }
        if let Some(v) = self.request_problem_information {
            s.put_u8(0x17);
            s.put_u8(v);
        }
        if let Some(v) = self.will_delay_interval {
            s.put_u8(0x18);
            s.put_u32(v);
        }
        if let Some(v) = self.request_response_information {
            s.put_u8(0x19);
            s.put_u8(v);
        }
        if let Some(v) = &self.response_information {
            s.put_u8(0x1A);
            s.put_str(v, "response_information")?;
        }
        if let Some(v) = &self.server_reference {
            s.put_u8(0x1C);
            s.put_str(v, "server_reference")?;
        }
        if let Some(v) = &self.reason_string {
            s.put_u8(0x1F);
            s.put_str(v, "reason_string")?;
        }
        if let Some(v) = self.receive_maximum {
            s.put_u8(0x21);
            s.put_u16(v);
        }
        if let Some(v) = self.topic_alias_maximum {
            s.put_u8(0x22);
            s.put_u16(v);
        }
        if let Some(v) = self.topic_alias {
            s.put_u8(0x23);
            s.put_u16(v);
        }
        if let Some(v) = self.maximum_qos {
            s.put_u8(0x24);
            s.put_u8(v);
        }
        if let Some(v) = self.retain_available {
            s.put_u8(0x25);
            s.put_u8(v);
        }
        for (k, v) in &self.user_properties {
            s.put_u8(0x26);
            s.put_str(k, "user property name")?;
            s.put_str(v, "user property value")?;
        }
        if let Some(v) = self.maximum_packet_size {
            s.put_u8(0x27);
            s.put_u32(v);
        }
        if let Some(v) = self.wildcard_subscription_available {
            s.put_u8(0x28);
            s.put_u8(v);
        }
        if let Some(v) = self.subscription_identifier_available {
            s.put_u8(0x29);
            s.put_u8(v);
        }
        if let Some(v) = self.shared_subscription_available {
            s.put_u8(0x2A);
            s.put_u8(v);
        }
        Ok(())
    }

    /// The rules a property set must follow in packet `kind`: only allowed
    /// properties, only allowed values. Shared by decode and encode.
    pub(super) fn check(&self, kind: Kind) -> Result<(), &'static str> {
        macro_rules! allow {
            ($field:ident, $mask:expr) => {
                if self.$field.is_some() && kind.0 & ($mask) == 0 {
                    return Err(concat!(
                        "property not allowed in this packet: ",
                        stringify!($field)
                    ));
                }
            };
        }
        macro_rules! boolean {
            ($field:ident) => {
                if matches!(self.$field, Some(v) if v > 1) {
                    return Err(concat!(stringify!($field), " must be 0 or 1"));
                }
            };
        }
        const C: u16 = Kind::CONNECT.0;
        const CA: u16 = Kind::CONNACK.0;
        allow!(payload_format_indicator, PUB_OR_WILL);
        allow!(message_expiry_interval, PUB_OR_WILL);
        allow!(content_type, PUB_OR_WILL);
        allow!(response_topic, PUB_OR_WILL);
        allow!(correlation_data, PUB_OR_WILL);
        allow!(session_expiry_interval, C | CA | Kind::DISCONNECT.0);
        allow!(assigned_client_identifier, CA);
        allow!(server_keep_alive, CA);
        allow!(authentication_method, C | CA | Kind::AUTH.0);
        allow!(authentication_data, C | CA | Kind::AUTH.0);
        allow!(request_problem_information, C);
        allow!(will_delay_interval, Kind::WILL.0);
        allow!(request_response_information, C);
        allow!(response_information, CA);
        allow!(server_reference, CA | Kind::DISCONNECT.0);
        allow!(reason_string, WITH_REASON);
        allow!(receive_maximum, C | CA);
        allow!(topic_alias_maximum, C | CA);
        allow!(topic_alias, Kind::PUBLISH.0);
        allow!(maximum_qos, CA);
        allow!(retain_available, CA);
        allow!(maximum_packet_size, C | CA);
        allow!(wildcard_subscription_available, CA);
        allow!(subscription_identifier_available, CA);
        allow!(shared_subscription_available, CA);

        match self.subscription_identifiers.len() {
            0 => {}
            1 if kind == Kind::SUBSCRIBE => {}
            _ if kind == Kind::PUBLISH => {}
            _ if kind == Kind::SUBSCRIBE => {
                return Err("SUBSCRIBE carries more than one subscription_identifier")
            }
            _ => return Err("property not allowed in this packet: subscription_identifier"),
        }
        if self
            .subscription_identifiers
            .iter()
            .any(|&v| v == 0 || v > MAX_VARINT)
        {
            return Err("subscription_identifier must be 1..=268435455");
        }

        boolean!(payload_format_indicator);
        boolean!(request_problem_information);
        boolean!(request_response_information);
        boolean!(maximum_qos);
        boolean!(retain_available);
        boolean!(wildcard_subscription_available);
        boolean!(subscription_identifier_available);
        boolean!(shared_subscription_available);
        if self.receive_maximum == Some(0) {
            return Err("receive_maximum must not be 0");
        }
        if self.maximum_packet_size == Some(0) {
            return Err("maximum_packet_size must not be 0");
        }
        // Topic Alias 0 is left to the session, whose reason code for it is
        // 0x94 Topic Alias invalid (§3.3.2.3.4), not malformed (0x82).
        if self.authentication_data.is_some() && self.authentication_method.is_none() {
            return Err("authentication_data without authentication_method");
        }
        if let Some(t) = &self.response_topic {
            if !valid_topic_name(t) {
                return Err("response_topic is not a valid topic name");
            }
        }
        Ok(())
    }
}
