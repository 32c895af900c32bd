//! The server side of the NATS protocol: parse what a client sends
//! (`CONNECT`, `PUB`, `HPUB`, `SUB`, `UNSUB`, `PING`, `PONG`) and emit what
//! a server sends (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`, `+OK`, `-ERR`).
//!
//! Invariants: [`parse_client_op`] never panics; it returns `Ok(None)` until
//! a whole op is buffered, and an error as soon as the input can never
//! become a valid op — in particular a control line over the caller's limit
//! and a payload over `max_payload` are refused from the control line
//! alone, before the payload is buffered. Op names are case-insensitive and
//! arguments may be separated by spaces or tabs, as nats-server accepts.
//! Emitters refuse tokens that would break the line framing.
//!
//! The `-ERR` texts are the ones NATS clients know ([`ERR_PARSER`] and
//! friends), so clients react to them as they do with nats-server.

use serde::{Deserialize, Serialize};

use super::{find_line_max, parse_usize, EncodeError, Malformed};

pub const ERR_UNKNOWN_OP: &str = "Unknown Protocol Operation";
pub const ERR_PARSER: &str = "Parser Error";
pub const ERR_CONTROL_LINE: &str = "Maximum Control Line Exceeded";
pub const ERR_MAX_PAYLOAD: &str = "Maximum Payload Violation";
pub const ERR_SLOW_CONSUMER: &str = "Slow Consumer";
pub const ERR_STALE: &str = "Stale Connection";
pub const ERR_MAX_CONNECTIONS: &str = "Maximum Connections Exceeded";
pub const ERR_INVALID_SUBJECT: &str = "Invalid Subject";
pub const ERR_INVALID_PUB_SUBJECT: &str = "Invalid Publish Subject";
pub const ERR_AUTH: &str = "Authorization Violation";
pub const ERR_AUTH_TIMEOUT: &str = "Authorization Timeout";
pub const ERR_NO_HEADERS: &str = "Headers Not Supported";
pub const ERR_MAX_SUBS: &str = "Maximum Subscriptions Exceeded";
/// frond's own: nats-server does not check sids.
pub const ERR_INVALID_SID: &str = "Invalid Subscription ID";

/// One operation received from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp<'a> {
    Connect(Box<ConnectInfo>),
    Pub(PubOp<'a>),
    Sub {
        subject: String,
        queue: Option<String>,
        sid: String,
    },
    Unsub {
        sid: String,
        max: Option<u64>,
    },
    Ping,
    Pong,
}

/// `PUB` or `HPUB`, borrowed from the input: a publish nobody will see
/// costs no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubOp<'a> {
    pub subject: &'a str,
    pub reply: Option<&'a str>,
    /// The raw header block of an `HPUB`.
    pub headers: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

/// The `CONNECT` options frond looks at; unknown fields are ignored, and
/// `null` (which some clients send, e.g. `"name":null`) means the default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ConnectInfo {
    #[serde(deserialize_with = "null_default")]
    pub verbose: bool,
    #[serde(deserialize_with = "null_default")]
    pub pedantic: bool,
    #[serde(deserialize_with = "null_true")]
    pub echo: bool,
    #[serde(deserialize_with = "null_default")]
    pub headers: bool,
    #[serde(deserialize_with = "null_default")]
    pub no_responders: bool,
    #[serde(deserialize_with = "null_default")]
    pub name: String,
    #[serde(deserialize_with = "null_default")]
    pub lang: String,
    #[serde(deserialize_with = "null_default")]
    pub version: String,
    #[serde(deserialize_with = "null_default")]
    pub protocol: i64,
    pub user: Option<String>,
    pub pass: Option<String>,
    pub auth_token: Option<String>,
    /// nkey authentication: the user public key and the signed nonce.
    pub nkey: Option<String>,
    pub sig: Option<String>,
    #[serde(deserialize_with = "null_default")]
    pub tls_required: bool,
}

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn null_true<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(true))
}

impl Default for ConnectInfo {
    fn default() -> Self {
        ConnectInfo {
            verbose: false,
            pedantic: false,
            // Absent means "echo on" in the NATS protocol.
            echo: true,
            headers: false,
            no_responders: false,
            name: String::new(),
            lang: String::new(),
            version: String::new(),
            protocol: 0,
            user: None,
            pass: None,
            auth_token: None,
            nkey: None,
            sig: None,
            tls_required: false,
        }
    }
}

/// Why client input was refused. Every variant closes the connection;
/// [`ParseError::err_text`] is what to send in `-ERR` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    UnknownOp(String),
    ControlLine(usize),
    MaxPayload { size: usize, max: usize },
    Malformed(Malformed),
}

impl ParseError {
    /// The nats-server `-ERR` text for this error.
    pub fn err_text(&self) -> &'static str {
        match self {
            ParseError::UnknownOp(_) => ERR_UNKNOWN_OP,
            ParseError::ControlLine(_) => ERR_CONTROL_LINE,
            ParseError::MaxPayload { .. } => ERR_MAX_PAYLOAD,
            ParseError::Malformed(_) => ERR_PARSER,
        }
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::UnknownOp(op) => write!(f, "unknown operation {op:?}"),
            ParseError::ControlLine(max) => write!(f, "control line longer than {max} bytes"),
            ParseError::MaxPayload { size, max } => {
                write!(f, "payload of {size} bytes exceeds max_payload {max}")
            }
            ParseError::Malformed(m) => write!(f, "{m}"),
        }
    }
}

fn malformed(why: impl Into<String>) -> ParseError {
    ParseError::Malformed(Malformed(why.into()))
}

/// Parse one client op from the front of `buf`; returns it and the bytes
/// it used. `max_control_line` bounds the op line (CRLF excluded),
/// `max_payload` the `PUB`/`HPUB` total size.
pub fn parse_client_op(
    buf: &[u8],
    max_control_line: usize,
    max_payload: usize,
) -> Result<Option<(ClientOp<'_>, usize)>, ParseError> {
    let eol = match find_line_max(buf, max_control_line) {
        Ok(Some(i)) => i,
        Ok(None) => {
            // Reject a line that can already not be a known op.
            return match check_prefix(buf) {
                Some(e) => Err(e),
                None => Ok(None),
            };
        }
        Err(_) => return Err(ParseError::ControlLine(max_control_line)),
    };
    let line = buf.get(..eol).unwrap_or_default();
    let after_line = eol + 2;
    let (op, args) = split_op(line);
    // Per-message path: no allocation for the op name or the fields.
    let mut upper = [0u8; 8];
    let name_len = op.len().min(upper.len());
    if let (Some(dst), Some(src)) = (upper.get_mut(..name_len), op.get(..name_len)) {
        dst.copy_from_slice(src);
        dst.make_ascii_uppercase();
    }
    let upper: &[u8] = if op.len() <= 7 {
        upper.get(..name_len).unwrap_or_default()
    } else {
        b""
    };
    match upper {
        b"PING" => Ok(Some((ClientOp::Ping, after_line))),
        b"PONG" => Ok(Some((ClientOp::Pong, after_line))),
        b"CONNECT" => parse_connect(args).map(|op| Some((op, after_line))),
        b"SUB" => parse_sub(args).map(|op| Some((op, after_line))),
        b"UNSUB" => parse_unsub(args).map(|op| Some((op, after_line))),
        b"PUB" => parse_pub(buf, args, after_line, false, max_payload),
        b"HPUB" => parse_pub(buf, args, after_line, true, max_payload),
        _ => Err(ParseError::UnknownOp(
            String::from_utf8_lossy(op.get(..op.len().min(16)).unwrap_or_default()).into_owned(),
        )),
    }
}

/// `CONNECT {json}`.
fn parse_connect(args: &[u8]) -> Result<ClientOp<'_>, ParseError> {
    let json = std::str::from_utf8(args)
        .map_err(|_| malformed("CONNECT is not UTF-8"))?
        .trim();
    let info: ConnectInfo = serde_json::from_str(json)
        .map_err(|e| malformed(format!("CONNECT is not valid JSON: {e}")))?;
    Ok(ClientOp::Connect(Box::new(info)))
}

/// `SUB subject [queue] sid`.
fn parse_sub(args: &[u8]) -> Result<ClientOp<'_>, ParseError> {
    let f = Fields::split(args);
    let (subject, queue, sid) = match f.as_slice() {
        [s, sid] => (*s, None, *sid),
        [s, q, sid] => (*s, Some(*q), *sid),
        _ => return Err(malformed(format!("SUB has {} arguments", f.len()))),
    };
    Ok(ClientOp::Sub {
        subject: utf8(subject, "subject")?,
        queue: queue.map(|q| utf8(q, "queue group")).transpose()?,
        sid: utf8(sid, "sid")?,
    })
}

/// `UNSUB sid [max]`.
fn parse_unsub(args: &[u8]) -> Result<ClientOp<'_>, ParseError> {
    let f = Fields::split(args);
    let (sid, max) = match f.as_slice() {
        [sid] => (*sid, None),
        [sid, max] => (
            *sid,
            Some(parse_usize(max, "max").map_err(ParseError::Malformed)?),
        ),
        _ => return Err(malformed(format!("UNSUB has {} arguments", f.len()))),
    };
    Ok(ClientOp::Unsub {
        sid: utf8(sid, "sid")?,
        max: max.map(|m| m as u64),
    })
}

/// `PUB subject [reply] size` or `HPUB subject [reply] hdr_size size`
/// (`with_headers`), with its body from `buf` at `after_line`: the
/// per-message path, borrowing subject, reply and body from `buf`.
#[inline]
fn parse_pub<'a>(
    buf: &'a [u8],
    args: &'a [u8],
    after_line: usize,
    with_headers: bool,
    max_payload: usize,
) -> Result<Option<(ClientOp<'a>, usize)>, ParseError> {
    let name = if with_headers { "HPUB" } else { "PUB" };
    let f = Fields::split(args);
    let sizes = if with_headers { 2 } else { 1 };
    if f.len() != 1 + sizes && f.len() != 2 + sizes {
        return Err(malformed(format!("{name} has {} arguments", f.len())));
    }
    let field = |i: usize| f.get(i).copied().unwrap_or_default();
    let subject = utf8_ref(field(0), "subject")?;
    let reply = if f.len() == 2 + sizes {
        Some(utf8_ref(field(1), "reply subject")?)
    } else {
        None
    };
    let n = f.len();
    let total = parse_usize(field(n - 1), "size").map_err(ParseError::Malformed)?;
    let hdr = if with_headers {
        let h = parse_usize(field(n - 2), "header size").map_err(ParseError::Malformed)?;
        if h > total {
            return Err(malformed(format!(
                "HPUB header size {h} exceeds total size {total}"
            )));
        }
        Some(h)
    } else {
        None
    };
    if total > max_payload {
        return Err(ParseError::MaxPayload {
            size: total,
            max: max_payload,
        });
    }
    let (headers, payload, end) = match super::take_body(buf, after_line, total, hdr) {
        super::Body::Incomplete => return Ok(None),
        super::Body::NoCrlf => {
            return Err(malformed(format!("{name} payload is not followed by CRLF")))
        }
        super::Body::Ready(h, p, end) => (h, p, end),
    };
    Ok(Some((
        ClientOp::Pub(PubOp {
            subject,
            reply,
            headers,
            payload,
        }),
        end,
    )))
}

/// Up to [`Fields::MAX`] space/tab separated arguments, without a heap
/// allocation; `len()` counts all of them (so too many are detected).
struct Fields<'a> {
    items: [&'a [u8]; Fields::MAX],
    count: usize,
}

impl<'a> Fields<'a> {
    const MAX: usize = 5;

    fn split(args: &'a [u8]) -> Fields<'a> {
        let mut f = Fields {
            items: [&[]; Fields::MAX],
            count: 0,
        };
        for field in args
            .split(|b| *b == b' ' || *b == b'\t')
            .filter(|f| !f.is_empty())
        {
            if let Some(slot) = f.items.get_mut(f.count) {
                *slot = field;
            }
            f.count += 1;
        }
        f
    }

    fn len(&self) -> usize {
        self.count
    }

    fn as_slice(&self) -> &[&'a [u8]] {
        self.items.get(..self.count).unwrap_or(&self.items)
    }

    fn get(&self, i: usize) -> Option<&&'a [u8]> {
        self.as_slice().get(i)
    }
}

fn split_op(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|b| *b == b' ' || *b == b'\t') {
        Some(i) => (
            line.get(..i).unwrap_or_default(),
            line.get(i + 1..).unwrap_or_default(),
        ),
        None => (line, &b""[..]),
    }
}

/// An incomplete line whose op name is already complete and unknown.
fn check_prefix(buf: &[u8]) -> Option<ParseError> {
    let end = buf
        .iter()
        .position(|b| *b == b' ' || *b == b'\t' || *b == b'\r')?;
    let op = buf.get(..end)?.to_ascii_uppercase();
    const OPS: [&[u8]; 7] = [
        b"PING", b"PONG", b"CONNECT", b"SUB", b"UNSUB", b"PUB", b"HPUB",
    ];
    if OPS.contains(&op.as_slice()) {
        None
    } else {
        Some(ParseError::UnknownOp(
            String::from_utf8_lossy(op.get(..op.len().min(16)).unwrap_or_default()).into_owned(),
        ))
    }
}

fn utf8(b: &[u8], what: &str) -> Result<String, ParseError> {
    utf8_ref(b, what).map(str::to_string)
}

fn utf8_ref<'a>(b: &'a [u8], what: &str) -> Result<&'a str, ParseError> {
    std::str::from_utf8(b).map_err(|_| malformed(format!("{what} is not UTF-8")))
}

/// What frond says in `INFO`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InfoOut {
    pub server_id: String,
    pub server_name: String,
    pub version: String,
    pub proto: u8,
    pub go: String,
    pub host: String,
    pub port: u16,
    pub headers: bool,
    pub max_payload: usize,
    pub client_id: u64,
    pub client_ip: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub auth_required: bool,
    /// Only sent when the client must sign it (nkey authentication).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// Emit `INFO {json}\r\n`.
pub fn info(i: &InfoOut, out: &mut Vec<u8>) {
    out.extend_from_slice(b"INFO ");
    // A struct of strings, numbers and bools always serialises.
    let _ = serde_json::to_writer(&mut *out, i);
    out.extend_from_slice(b"\r\n");
}

/// Emit `MSG subject sid [reply] size\r\npayload\r\n`.
pub fn msg(
    subject: &str,
    sid: &str,
    reply: Option<&str>,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    super::emit_message("MSG", subject, Some(sid), reply, None, payload, out)
}

/// Emit `HMSG subject sid [reply] hdr_size total_size\r\nheaders payload\r\n`.
pub fn hmsg(
    subject: &str,
    sid: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    super::emit_message(
        "HMSG",
        subject,
        Some(sid),
        reply,
        Some(headers),
        payload,
        out,
    )
}

pub fn ping(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PING\r\n");
}

pub fn pong(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PONG\r\n");
}

pub fn ok(out: &mut Vec<u8>) {
    out.extend_from_slice(b"+OK\r\n");
}

/// Emit `-ERR 'text'\r\n` (CR, LF and quotes in `text` become spaces).
pub fn err(text: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"-ERR '");
    for c in text.chars() {
        match c {
            '\r' | '\n' | '\'' => out.push(b' '),
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out.extend_from_slice(b"'\r\n");
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]

    use super::super::client::{self, parse_server_op, ServerOp};
    use super::*;

    const LINE: usize = 4096;
    const MAX: usize = 1 << 20;

    fn one(buf: &[u8]) -> ClientOp<'_> {
        let (op, used) = parse_client_op(buf, LINE, MAX).unwrap().unwrap();
        assert_eq!(used, buf.len());
        op
    }

    #[test]
    fn simple_ops() {
        assert_eq!(one(b"PING\r\n"), ClientOp::Ping);
        assert_eq!(one(b"pong\r\n"), ClientOp::Pong);
        assert_eq!(
            one(b"SUB foo.* 1\r\n"),
            ClientOp::Sub {
                subject: "foo.*".into(),
                queue: None,
                sid: "1".into()
            }
        );
        assert_eq!(
            one(b"sub foo\tworkers  abc\r\n"),
            ClientOp::Sub {
                subject: "foo".into(),
                queue: Some("workers".into()),
                sid: "abc".into()
            }
        );
        assert_eq!(
            one(b"UNSUB 1 5\r\n"),
            ClientOp::Unsub {
                sid: "1".into(),
                max: Some(5)
            }
        );
        assert_eq!(
            one(b"UNSUB 1\r\n"),
            ClientOp::Unsub {
                sid: "1".into(),
                max: None
            }
        );
        let ClientOp::Connect(c) = one(b"CONNECT {\"verbose\":true,\"headers\":true,\"no_responders\":true,\"name\":\"x\",\"extra\":[1]}\r\n") else {
            panic!("not connect")
        };
        assert!(c.verbose && c.headers && c.no_responders && c.echo);
        assert_eq!(c.name, "x");
        // What async-nats 0.38 sends (nulls included).
        let ClientOp::Connect(c) = one(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"jwt\":null,\"nkey\":null,\"sig\":null,\"name\":null,\"echo\":true,\"lang\":\"rust\",\"version\":\"0.38.0\",\"protocol\":1,\"tls_required\":false,\"user\":null,\"pass\":null,\"auth_token\":null,\"headers\":true,\"no_responders\":true}\r\n") else {
            panic!("not connect")
        };
        assert!(c.echo && c.headers && c.no_responders && c.name.is_empty());
        let ClientOp::Connect(c) = one(b"CONNECT {\"echo\":false}\r\n") else {
            panic!("not connect")
        };
        assert!(!c.echo);
    }

    #[test]
    fn pub_and_hpub() {
        assert_eq!(
            one(b"PUB a.b _INBOX.1 5\r\nhello\r\n"),
            ClientOp::Pub(PubOp {
                subject: "a.b",
                reply: Some("_INBOX.1"),
                headers: None,
                payload: b"hello"
            })
        );
        assert_eq!(
            one(b"PUB a 0\r\n\r\n"),
            ClientOp::Pub(PubOp {
                subject: "a",
                reply: None,
                headers: None,
                payload: b""
            })
        );
        let ClientOp::Pub(p) = one(b"HPUB a 12 14\r\nNATS/1.0\r\n\r\nhi\r\n") else {
            panic!("not pub")
        };
        assert_eq!(p.headers, Some(&b"NATS/1.0\r\n\r\n"[..]));
        assert_eq!(p.payload, b"hi");
        // Binary payloads may contain CRLF.
        let ClientOp::Pub(p) = one(b"PUB a 4\r\n\r\n\r\n\r\n") else {
            panic!("not pub")
        };
        assert_eq!(p.payload, b"\r\n\r\n");
    }

    #[test]
    fn incremental_and_pipelined() {
        let wire: &[u8] =
            b"CONNECT {}\r\nSUB a 1\r\nPUB a r 3\r\nabc\r\nHPUB a 12 14\r\nNATS/1.0\r\n\r\nhi\r\nUNSUB 1\r\nPING\r\n";
        let mut pos = 0;
        let mut n = 0;
        while pos < wire.len() {
            // Every strict prefix of an op asks for more; the whole op
            // parses and uses exactly its bytes.
            let mut used = None;
            for end in pos + 1..=wire.len() {
                if let Some((_, u)) = parse_client_op(&wire[pos..end], LINE, MAX).unwrap() {
                    assert_eq!(pos + u, end, "an op uses exactly its bytes");
                    used = Some(u);
                    break;
                }
            }
            pos += used.expect("a complete op");
            n += 1;
        }
        assert_eq!(n, 6);
    }

    #[test]
    fn errors_carry_nats_server_texts() {
        let e = parse_client_op(b"PUB a 2000000\r\n", LINE, MAX).unwrap_err();
        assert_eq!(e.err_text(), "Maximum Payload Violation");
        let e = parse_client_op(b"HPUB a 10 2000000\r\n", LINE, MAX).unwrap_err();
        assert_eq!(e.err_text(), "Maximum Payload Violation");
        let e = parse_client_op(b"FOO bar\r\n", LINE, MAX).unwrap_err();
        assert_eq!(e.err_text(), "Unknown Protocol Operation");
        // Known to be unknown before the line ends.
        let e = parse_client_op(b"GET / HTTP/1.1", LINE, MAX).unwrap_err();
        assert_eq!(e.err_text(), "Unknown Protocol Operation");
        let long = vec![b'P'; LINE + 10];
        let e = parse_client_op(&long, LINE, MAX).unwrap_err();
        assert_eq!(e.err_text(), "Maximum Control Line Exceeded");
        for bad in [
            &b"PUB a\r\n"[..],
            b"PUB a b c 3\r\nabc\r\n",
            b"PUB a x\r\n",
            b"PUB a 3\r\nabcd\r\n",
            b"HPUB a 5 3\r\nabc\r\n",
            b"SUB\r\n",
            b"SUB a b c d\r\n",
            b"UNSUB\r\n",
            b"UNSUB 1 x\r\n",
            b"CONNECT {nope\r\n",
            b"CONNECT {\"verbose\":\"yes\"}\r\n",
            b"SUB \xff 1\r\n",
        ] {
            let e = parse_client_op(bad, LINE, MAX).unwrap_err();
            assert_eq!(
                e.err_text(),
                "Parser Error",
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(5);
        let pieces: [&[u8]; 14] = [
            b"PUB ",
            b"HPUB ",
            b"SUB ",
            b"UNSUB ",
            b"CONNECT {}",
            b"PING",
            b"\r\n",
            b" ",
            b"1",
            b"12",
            b"a.b",
            b"NATS/1.0",
            b"x",
            b"\t",
        ];
        for _ in 0..20_000 {
            let mut v = Vec::new();
            for _ in 0..rng.usize(0..8) {
                v.extend_from_slice(pieces[rng.usize(..pieces.len())]);
            }
            let mut pos = 0;
            while let Ok(Some((_, used))) = parse_client_op(&v[pos..], 64, 64) {
                assert!(used > 0);
                pos += used;
            }
        }
    }

    /// What the server emits parses with the client-side parser, and what
    /// the client side emits parses here.
    #[test]
    fn round_trips_with_the_client_side() {
        let mut out = Vec::new();
        info(
            &InfoOut {
                server_id: "S".into(),
                headers: true,
                max_payload: 1024,
                proto: 1,
                ..InfoOut::default()
            },
            &mut out,
        );
        msg("a.b", "7", Some("r.1"), b"hello", &mut out).unwrap();
        hmsg("a.b", "8", None, b"NATS/1.0 503\r\n\r\n", b"", &mut out).unwrap();
        ping(&mut out);
        pong(&mut out);
        ok(&mut out);
        err("Slow Consumer", &mut out);
        let mut ops = Vec::new();
        let mut pos = 0;
        while let Some((op, used)) = parse_server_op(&out[pos..], MAX).unwrap() {
            ops.push(op);
            pos += used;
        }
        assert_eq!(pos, out.len());
        let ServerOp::Info(json) = &ops[0] else {
            panic!("not info")
        };
        let i = client::ServerInfo::parse(json).unwrap();
        assert_eq!((i.max_payload, i.headers, i.proto), (1024, true, 1));
        assert!(!json.contains("nonce") && !json.contains("auth_required"));
        assert!(
            matches!(&ops[1], ServerOp::Msg(m) if m.sid == 7 && m.reply.as_deref() == Some("r.1") && m.payload == b"hello")
        );
        assert!(
            matches!(&ops[2], ServerOp::Msg(m) if m.sid == 8 && m.headers.as_deref() == Some(&b"NATS/1.0 503\r\n\r\n"[..]))
        );
        assert_eq!(
            &ops[3..],
            &[
                ServerOp::Ping,
                ServerOp::Pong,
                ServerOp::Ok,
                ServerOp::Err("Slow Consumer".into())
            ]
        );

        let mut out = Vec::new();
        client::connect(&client::ConnectOptions::default(), &mut out);
        client::hpublish("a", Some("r"), b"NATS/1.0\r\nK: v\r\n\r\n", b"x", &mut out).unwrap();
        client::publish("a", None, b"yz", &mut out).unwrap();
        client::subscribe("a.>", Some("q"), 9, &mut out).unwrap();
        client::unsubscribe(9, Some(2), &mut out);
        let mut ops = Vec::new();
        let mut pos = 0;
        while let Some((op, used)) = parse_client_op(&out[pos..], LINE, MAX).unwrap() {
            ops.push(op);
            pos += used;
        }
        assert_eq!(pos, out.len());
        assert!(matches!(&ops[0], ClientOp::Connect(c) if c.headers && !c.echo));
        assert!(
            matches!(&ops[1], ClientOp::Pub(p) if p.payload == b"x" && p.headers.map(<[u8]>::len) == Some(18))
        );
        assert!(matches!(&ops[2], ClientOp::Pub(p) if p.payload == b"yz" && p.headers.is_none()));
        assert!(
            matches!(&ops[3], ClientOp::Sub { subject, queue: Some(q), sid } if subject == "a.>" && q == "q" && sid == "9")
        );
        assert!(matches!(&ops[4], ClientOp::Unsub { sid, max: Some(2) } if sid == "9"));
    }

    #[test]
    fn emitters_refuse_bad_tokens() {
        assert!(msg("a b", "1", None, b"", &mut Vec::new()).is_err());
        assert!(msg("a", "", None, b"", &mut Vec::new()).is_err());
        assert!(hmsg("a", "1", Some("r\n"), b"", b"", &mut Vec::new()).is_err());
        let mut out = Vec::new();
        err("it's\r\nbad", &mut out);
        assert_eq!(out, b"-ERR 'it s  bad'\r\n");
    }
}
