//! `[auth]` `allow_responses` end to end: a service user that may publish
//! only answers to requests it received (async-nats on both sides), and
//! the exact refusals when it answers twice or publishes elsewhere (a raw
//! socket, to read the `-ERR` texts).

mod common;

use std::time::Duration;

use common::*;
use smol::stream::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

const CONFIG: &str = r#"
[auth]
[[auth.users]]
name = "svc"
password = "svc-pw"
allow_subscribe = ["svc.>"]
allow_responses = { max = 1, expires = "1m" }
[[auth.users]]
name = "client"
password = "client-pw"
"#;

/// A raw NATS connection that reads until a marker appears.
struct Raw {
    s: TcpStream,
    got: String,
}

impl Raw {
    async fn connect(port: u16, user: &str, pass: &str) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut r = Raw {
            s,
            got: String::new(),
        };
        r.send(&format!(
            "CONNECT {{\"user\":\"{user}\",\"pass\":\"{pass}\"}}\r\nPING\r\n"
        ))
        .await;
        r.read_until("PONG").await;
        r
    }

    async fn send(&mut self, text: &str) {
        self.s.write_all(text.as_bytes()).await.unwrap();
    }

    /// Read until `want` is in what arrived since the last call; returns
    /// that text.
    async fn read_until(&mut self, want: &str) -> String {
        let mut buf = [0u8; 4096];
        timeout(WAIT, async {
            while !self.got.contains(want) {
                let n = self.s.read(&mut buf).await.unwrap();
                assert!(n > 0, "frond closed the connection: {}", self.got);
                self.got.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {want:?} in {:?}", self.got));
        std::mem::take(&mut self.got)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_may_answer_each_request_it_received_once() {
    let frond = Frond::start_new(FrondSpec {
        extra_config: CONFIG.into(),
        ..Default::default()
    })
    .await;
    let port = frond.nats_port;
    let url = format!("nats://127.0.0.1:{port}");
    let client =
        async_nats::ConnectOptions::with_user_and_password("client".into(), "client-pw".into())
            .connect(&url)
            .await
            .expect("client connects");

    // async-nats on both sides: request/reply works although the service
    // has no publish permission at all.
    let svc = async_nats::ConnectOptions::with_user_and_password("svc".into(), "svc-pw".into())
        .connect(&url)
        .await
        .expect("service connects");
    let mut requests = svc.subscribe("svc.echo").await.unwrap();
    svc.flush().await.unwrap();
    let responder = tokio::spawn(async move {
        for _ in 0..2 {
            let m = requests.next().await.expect("a request");
            let reply = m.reply.expect("a reply subject");
            svc.publish(reply, m.payload).await.unwrap();
        }
        svc.flush().await.unwrap();
    });
    for text in ["one", "two"] {
        let answer = timeout(WAIT, client.request("svc.echo", text.into()))
            .await
            .expect("answered in time")
            .expect("answered");
        assert_eq!(answer.payload, text.as_bytes());
    }
    timeout(WAIT, responder).await.unwrap().unwrap();

    // A raw service: the second answer to one request and a publish to
    // any other subject are refused with nats-server's texts, and the
    // connection stays up.
    let mut raw = Raw::connect(port, "svc", "svc-pw").await;
    raw.send("SUB svc.raw 1\r\nPING\r\n").await;
    raw.read_until("PONG").await;
    let mut answers = client.subscribe("_INBOX.raw.>").await.unwrap();
    client.flush().await.unwrap();
    client
        .publish_with_reply("svc.raw", "_INBOX.raw.1", "q1".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    raw.read_until("MSG svc.raw 1 _INBOX.raw.1 2\r\nq1\r\n")
        .await;
    raw.send("PUB _INBOX.raw.1 5\r\nfirst\r\nPUB _INBOX.raw.1 6\r\nsecond\r\nPUB other 1\r\nx\r\nPING\r\n")
        .await;
    let out = raw.read_until("PONG").await;
    assert!(
        out.contains("-ERR 'Permissions Violation for Publish to \"_INBOX.raw.1\"'"),
        "{out}"
    );
    assert!(
        out.contains("-ERR 'Permissions Violation for Publish to \"other\"'"),
        "{out}"
    );
    // A fresh request can be answered; the client sees "first" and then
    // "third" from the same connection, so "second" was dropped.
    client
        .publish_with_reply("svc.raw", "_INBOX.raw.2", "q2".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    raw.read_until("MSG svc.raw 1 _INBOX.raw.2 2\r\nq2\r\n")
        .await;
    raw.send("PUB _INBOX.raw.2 5\r\nthird\r\nPING\r\n").await;
    raw.read_until("PONG").await;
    for want in ["first", "third"] {
        let m = timeout(WAIT, answers.next())
            .await
            .expect("an answer in time")
            .expect("an answer");
        assert_eq!(m.payload, want.as_bytes());
    }
}
