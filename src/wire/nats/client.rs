//! The client side of the NATS protocol: parse what a server sends
//! (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`, `+OK`, `-ERR`) and emit what a
//! client sends (`CONNECT`, `PUB`, `HPUB`, `SUB`, `UNSUB`, `PING`, `PONG`).
//!
//! Invariants: [`parse_server_op`] never panics, returns `Ok(None)` until a
//! whole op is buffered, and rejects control lines over
//! [`MAX_CONTROL_LINE`](super::MAX_CONTROL_LINE) and payloads over the
//! caller's limit as soon as the control line is seen.

use serde::{Deserialize, Serialize};

use super::{check_token, find_line, parse_usize, EncodeError, Malformed};

/// Slack allowed above the server's advertised `max_payload` for payloads
/// the server sends us (the server's own limit applies to what clients
/// publish; replies from the JetStream API wrap a message in JSON).
pub const PAYLOAD_SLACK: usize = 64 * 1024;

/// One operation received from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    /// The raw JSON of `INFO`; see [`ServerInfo::parse`].
    Info(String),
    Msg(MsgOp),
    Ping,
    Pong,
    Ok,
    /// The text of `-ERR`, quotes removed.
    Err(String),
}

/// `MSG` or `HMSG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsgOp {
    pub subject: String,
    pub sid: u64,
    pub reply: Option<String>,
    /// The raw header block of an `HMSG`.
    pub headers: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// The fields of `INFO` the client uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ServerInfo {
    pub server_id: String,
    pub server_name: String,
    pub version: String,
    pub proto: i64,
    pub headers: bool,
    pub max_payload: usize,
    pub jetstream: bool,
    pub auth_required: bool,
    pub tls_required: bool,
    pub tls_available: bool,
    pub nonce: String,
    pub connect_urls: Vec<String>,
}

impl ServerInfo {
    pub fn parse(json: &str) -> Result<ServerInfo, Malformed> {
        serde_json::from_str(json).map_err(|e| Malformed(format!("INFO is not valid JSON: {e}")))
    }
}

/// Parse one server op from the front of `buf`.
///
/// `max_payload`: the largest `MSG`/`HMSG` total size accepted (pass the
/// server's `max_payload` plus [`PAYLOAD_SLACK`]). Returns the op and the
/// number of bytes consumed.
pub fn parse_server_op(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<(ServerOp, usize)>, Malformed> {
    let Some(eol) = find_line(buf)? else {
        // A partial line that already cannot be an op is rejected early.
        return Ok(None);
    };
    let line = buf.get(..eol).unwrap_or_default();
    let after_line = eol + 2;
    let (op, args) = match line.iter().position(|b| *b == b' ' || *b == b'\t') {
        Some(i) => (
            line.get(..i).unwrap_or_default(),
            line.get(i + 1..).unwrap_or_default(),
        ),
        None => (line, &b""[..]),
    };
    let upper = op.to_ascii_uppercase();
    match upper.as_slice() {
        b"PING" => Ok(Some((ServerOp::Ping, after_line))),
        b"PONG" => Ok(Some((ServerOp::Pong, after_line))),
        b"+OK" => Ok(Some((ServerOp::Ok, after_line))),
        b"-ERR" => {
            let text = String::from_utf8_lossy(args).trim().to_string();
            let text = text
                .strip_prefix('\'')
                .and_then(|t| t.strip_suffix('\''))
                .map(str::to_string)
                .unwrap_or(text);
            Ok(Some((ServerOp::Err(text), after_line)))
        }
        b"INFO" => {
            let json = std::str::from_utf8(args)
                .map_err(|_| Malformed("INFO is not UTF-8".into()))?
                .trim();
            Ok(Some((ServerOp::Info(json.to_string()), after_line)))
        }
        b"MSG" | b"HMSG" => {
            let with_headers = upper.as_slice() == b"HMSG";
            let fields: Vec<&[u8]> = args
                .split(|b| *b == b' ' || *b == b'\t')
                .filter(|f| !f.is_empty())
                .collect();
            let name = if with_headers { "HMSG" } else { "MSG" };
            let sizes = if with_headers { 2 } else { 1 };
            if fields.len() != 2 + sizes && fields.len() != 3 + sizes {
                return Err(Malformed(format!("{name} has {} arguments", fields.len())));
            }
            let field = |i: usize| fields.get(i).copied().unwrap_or_default();
            let subject = utf8_token(field(0), "subject")?;
            let sid = parse_usize(field(1), "sid")? as u64;
            let reply = if fields.len() == 3 + sizes {
                Some(utf8_token(field(2), "reply subject")?)
            } else {
                None
            };
            let n = fields.len();
            let total = parse_usize(field(n - 1), "size")?;
            let hdr = if with_headers {
                let h = parse_usize(field(n - 2), "header size")?;
                if h > total {
                    return Err(Malformed(format!(
                        "HMSG header size {h} exceeds total size {total}"
                    )));
                }
                Some(h)
            } else {
                None
            };
            if total > max_payload {
                return Err(Malformed(format!(
                    "{name} of {total} bytes exceeds the limit of {max_payload}"
                )));
            }
            let (headers, payload, end) = match super::take_body(buf, after_line, total, hdr) {
                super::Body::Incomplete => return Ok(None),
                super::Body::NoCrlf => {
                    return Err(Malformed(format!("{name} payload is not followed by CRLF")))
                }
                super::Body::Ready(h, p, end) => (h.map(<[u8]>::to_vec), p.to_vec(), end),
            };
            Ok(Some((
                ServerOp::Msg(MsgOp {
                    subject,
                    sid,
                    reply,
                    headers,
                    payload,
                }),
                end,
            )))
        }
        _ => Err(Malformed(format!(
            "unknown operation {:?}",
            String::from_utf8_lossy(op.get(..op.len().min(16)).unwrap_or_default())
        ))),
    }
}

fn utf8_token(b: &[u8], what: &str) -> Result<String, Malformed> {
    std::str::from_utf8(b)
        .map(str::to_string)
        .map_err(|_| Malformed(format!("{what} is not UTF-8")))
}

/// What goes into `CONNECT`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    pub name: String,
    pub user: Option<String>,
    pub pass: Option<String>,
    pub auth_token: Option<String>,
    /// nkey authentication: the user public key and the signed nonce.
    pub nkey: Option<String>,
    pub sig: Option<String>,
    /// JWT authentication (operator mode): the user JWT; `sig` signs the
    /// nonce with the user's seed.
    pub jwt: Option<String>,
}

#[derive(Serialize)]
struct ConnectJson<'a> {
    verbose: bool,
    pedantic: bool,
    headers: bool,
    no_responders: bool,
    lang: &'static str,
    version: &'static str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nkey: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sig: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt: Option<&'a str>,
    protocol: u8,
    echo: bool,
}

/// Emit `CONNECT {json}\r\n`.
pub fn connect(opts: &ConnectOptions, out: &mut Vec<u8>) {
    let json = ConnectJson {
        verbose: false,
        pedantic: false,
        headers: true,
        no_responders: true,
        lang: "frond",
        version: env!("CARGO_PKG_VERSION"),
        name: &opts.name,
        user: opts.user.as_deref(),
        pass: opts.pass.as_deref(),
        auth_token: opts.auth_token.as_deref(),
        nkey: opts.nkey.as_deref(),
        sig: opts.sig.as_deref(),
        jwt: opts.jwt.as_deref(),
        protocol: 1,
        echo: false,
    };
    out.extend_from_slice(b"CONNECT ");
    // Serialising a struct of strings and bools cannot fail.
    let _ = serde_json::to_writer(&mut *out, &json);
    out.extend_from_slice(b"\r\n");
}

/// Emit `PUB subject [reply] size\r\npayload\r\n`.
pub fn publish(
    subject: &str,
    reply: Option<&str>,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    super::emit_message("PUB", subject, None, reply, None, payload, out)
}

/// Emit `HPUB subject [reply] hdr_size total_size\r\nheaders payload\r\n`.
pub fn hpublish(
    subject: &str,
    reply: Option<&str>,
    headers: &[u8],
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    super::emit_message("HPUB", subject, None, reply, Some(headers), payload, out)
}

/// Emit `SUB subject [queue] sid\r\n`.
pub fn subscribe(
    subject: &str,
    queue: Option<&str>,
    sid: u64,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    check_token(subject, "subject")?;
    if let Some(q) = queue {
        check_token(q, "queue group")?;
    }
    out.extend_from_slice(b"SUB ");
    out.extend_from_slice(subject.as_bytes());
    if let Some(q) = queue {
        out.push(b' ');
        out.extend_from_slice(q.as_bytes());
    }
    out.extend_from_slice(format!(" {sid}\r\n").as_bytes());
    Ok(())
}

/// Emit `UNSUB sid [max]\r\n`.
pub fn unsubscribe(sid: u64, max: Option<u64>, out: &mut Vec<u8>) {
    match max {
        Some(m) => out.extend_from_slice(format!("UNSUB {sid} {m}\r\n").as_bytes()),
        None => out.extend_from_slice(format!("UNSUB {sid}\r\n").as_bytes()),
    }
}

pub fn ping(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PING\r\n");
}

pub fn pong(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PONG\r\n");
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

    const MAX: usize = 1 << 20;

    fn one(buf: &[u8]) -> ServerOp {
        let (op, used) = parse_server_op(buf, MAX).unwrap().unwrap();
        assert_eq!(used, buf.len());
        op
    }

    #[test]
    fn simple_ops() {
        assert_eq!(one(b"PING\r\n"), ServerOp::Ping);
        assert_eq!(one(b"pong\r\n"), ServerOp::Pong);
        assert_eq!(one(b"+OK\r\n"), ServerOp::Ok);
        assert_eq!(
            one(b"-ERR 'Authorization Violation'\r\n"),
            ServerOp::Err("Authorization Violation".into())
        );
        let info = one(b"INFO {\"server_id\":\"X\",\"max_payload\":1048576,\"headers\":true,\"jetstream\":true} \r\n");
        let ServerOp::Info(json) = info else {
            panic!("not info")
        };
        let i = ServerInfo::parse(&json).unwrap();
        assert_eq!(
            (i.max_payload, i.headers, i.jetstream),
            (1_048_576, true, true)
        );
        assert!(ServerInfo::parse("{nope").is_err());
    }

    #[test]
    fn msg_and_hmsg() {
        let op = one(b"MSG a.b 7 _INBOX.x.1 5\r\nhello\r\n");
        assert_eq!(
            op,
            ServerOp::Msg(MsgOp {
                subject: "a.b".into(),
                sid: 7,
                reply: Some("_INBOX.x.1".into()),
                headers: None,
                payload: b"hello".to_vec()
            })
        );
        let op = one(b"MSG a 1 0\r\n\r\n");
        assert!(matches!(op, ServerOp::Msg(m) if m.payload.is_empty() && m.reply.is_none()));
        // Exactly what nats-server 2.12 sends for "no responders".
        let op =
            one(b"HMSG _INBOX.x.1 1 40 40\r\nNATS/1.0 503\r\nNats-Subject: nosuch.x\r\n\r\n\r\n");
        let ServerOp::Msg(m) = op else {
            panic!("not msg")
        };
        assert_eq!(
            m.headers.as_deref(),
            Some(&b"NATS/1.0 503\r\nNats-Subject: nosuch.x\r\n\r\n"[..])
        );
        assert!(m.payload.is_empty());
    }

    #[test]
    fn incremental_and_pipelined() {
        let wire = b"PING\r\nMSG s 1 r 3\r\nabc\r\nHMSG s 2 12 14\r\nNATS/1.0\r\n\r\nhi\r\n+OK\r\n";
        // Every strict prefix of the first op's bytes asks for more.
        let mut ops = Vec::new();
        let mut pos = 0;
        while pos < wire.len() {
            let mut got = None;
            for end in pos + 1..=wire.len() {
                match parse_server_op(&wire[pos..end], MAX).unwrap() {
                    None => continue,
                    Some((op, used)) => {
                        assert_eq!(pos + used, end, "op must use exactly its bytes");
                        got = Some((op, used));
                        break;
                    }
                }
            }
            let (op, used) = got.expect("an op");
            ops.push(op);
            pos += used;
        }
        assert_eq!(ops.len(), 4);
        assert!(
            matches!(&ops[2], ServerOp::Msg(m) if m.payload == b"hi" && m.headers.as_ref().map(Vec::len) == Some(12))
        );
    }

    #[test]
    fn malformed_inputs() {
        for bad in [
            &b"FOO\r\n"[..],
            b"MSG a\r\n",
            b"MSG a b 3\r\nabc\r\n",
            b"MSG a 1 x\r\n",
            b"MSG a 1 3\r\nabcd\r\n",
            b"HMSG a 1 5 3\r\nabc\r\n",
            b"MSG a 1 r s 3\r\nabc\r\n",
            b"MSG a 1 -3\r\n",
            b"MSG a 1 99999999999\r\n",
        ] {
            assert!(
                parse_server_op(bad, MAX).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Oversized payload is rejected from the control line alone.
        assert!(parse_server_op(b"MSG a 1 2000000\r\n", MAX).is_err());
        let mut long = b"INFO ".to_vec();
        long.resize(70_000, b'x');
        assert!(parse_server_op(&long, MAX).is_err());
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(11);
        let pieces: [&[u8]; 12] = [
            b"MSG ",
            b"HMSG ",
            b"PING",
            b"\r\n",
            b" ",
            b"1",
            b"12",
            b"a.b",
            b"-ERR '",
            b"INFO {}",
            b"NATS/1.0",
            b"x",
        ];
        for _ in 0..20_000 {
            let mut v = Vec::new();
            for _ in 0..rng.usize(0..8) {
                v.extend_from_slice(pieces[rng.usize(..pieces.len())]);
            }
            let mut pos = 0;
            while let Ok(Some((_, used))) = parse_server_op(&v[pos..], 64) {
                assert!(used > 0);
                pos += used;
            }
        }
    }

    #[test]
    fn emit_round_trips_through_a_parser_view() {
        let mut out = Vec::new();
        connect(
            &ConnectOptions {
                name: "frond truck-042".into(),
                user: Some("u".into()),
                pass: Some("p\"q".into()),
                auth_token: None,
                nkey: None,
                sig: None,
                jwt: None,
            },
            &mut out,
        );
        let line = std::str::from_utf8(&out).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(line.strip_prefix("CONNECT ").unwrap().trim_end()).unwrap();
        assert_eq!(json["pass"], "p\"q");
        assert_eq!(json["headers"], true);
        assert_eq!(json["no_responders"], true);
        assert_eq!(json["echo"], false);
        assert_eq!(json["lang"], "frond");
        assert!(json.get("auth_token").is_none());

        let mut out = Vec::new();
        hpublish(
            "a.b",
            Some("_INBOX.t.9"),
            b"NATS/1.0\r\nA: 1\r\n\r\n",
            b"xyz",
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out,
            b"HPUB a.b _INBOX.t.9 18 21\r\nNATS/1.0\r\nA: 1\r\n\r\nxyz\r\n"
        );
        let mut out = Vec::new();
        publish("a", None, b"", &mut out).unwrap();
        assert_eq!(out, b"PUB a 0\r\n\r\n");
        let mut out = Vec::new();
        subscribe("_INBOX.t.*", None, 3, &mut out).unwrap();
        unsubscribe(3, Some(1), &mut out);
        ping(&mut out);
        pong(&mut out);
        assert_eq!(out, b"SUB _INBOX.t.* 3\r\nUNSUB 3 1\r\nPING\r\nPONG\r\n");
        assert!(publish("a b", None, b"", &mut Vec::new()).is_err());
        assert!(publish("", None, b"", &mut Vec::new()).is_err());
        assert!(hpublish("a", Some("r\r\n"), b"", b"", &mut Vec::new()).is_err());
    }

    #[test]
    fn hpub_as_hmsg_round_trip() {
        // Turn an emitted HPUB into the HMSG a server would deliver and parse it.
        let mut out = Vec::new();
        hpublish(
            "a.b",
            Some("r.1"),
            b"NATS/1.0\r\nK: v\r\n\r\n",
            b"data",
            &mut out,
        )
        .unwrap();
        let text = out.strip_prefix(b"HPUB a.b r.1 ").unwrap();
        let mut wire = b"HMSG a.b 5 r.1 ".to_vec();
        wire.extend_from_slice(text);
        let ServerOp::Msg(m) = one(&wire) else {
            panic!("not msg")
        };
        assert_eq!(m.headers.as_deref(), Some(&b"NATS/1.0\r\nK: v\r\n\r\n"[..]));
        assert_eq!(m.payload, b"data");
        assert_eq!(m.sid, 5);
    }
}
