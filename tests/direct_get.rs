//! Direct get (`$JS.API.DIRECT.GET.<stream>[.<subject>]`) on frond's local
//! streams, through async-nats: raw requests for every form (seq,
//! last_by_subj, next_by_subj, start_time, the subject form, batch with
//! its EOB, max_bytes, multi_last with up_to_seq), the status answers
//! (404, 408, 503 without `allow_direct`), async-nats's own `direct_get*`
//! methods, and the caller's `deny_subscribe`.

mod common;

use std::time::Duration;

use async_nats::{HeaderMap, Message};
use common::{Frond, FrondSpec};
use smol::stream::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

const CONFIG: &str = r#"
[auth]
anonymous = false

[[auth.users]]
name = "admin"
password = "admin-pw"

[[auth.users]]
name = "reader"
password = "reader-pw"
deny_subscribe = ["d.secret"]

[[stream]]
name = "D"
subjects = ["d.>"]
allow_direct = true

[[stream]]
name = "N"
subjects = ["n.>"]

[[stream]]
name = "KV_cfg"
subjects = ["$KV.cfg.>"]
max_msgs_per_subject = 5
allow_rollup = true
allow_direct = true
"#;

async fn start() -> Frond {
    Frond::start_new(FrondSpec {
        extra_config: CONFIG.into(),
        ..Default::default()
    })
    .await
}

async fn connect(f: &Frond, user: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), format!("{user}-pw"))
        .connect(format!("127.0.0.1:{}", f.nats_port))
        .await
        .expect("connect to frond")
}

/// Publish through JetStream (acknowledged); returns the sequences.
async fn put(c: &async_nats::Client, items: &[(&str, &str)]) -> Vec<u64> {
    let js = async_nats::jetstream::new(c.clone());
    let mut seqs = Vec::new();
    for (subject, payload) in items {
        let ack = js
            .publish(subject.to_string(), payload.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
        seqs.push(ack.sequence);
    }
    seqs
}

/// Send one direct get request and collect its answer: one message, or
/// (with `batch`) every message up to and including the 204 EOB.
async fn raw(c: &async_nats::Client, subject: &str, body: &str, batch: bool) -> Vec<Message> {
    let inbox = c.new_inbox();
    let mut sub = c.subscribe(inbox.clone()).await.expect("subscribe");
    c.publish_with_reply(subject.to_string(), inbox, body.to_string().into())
        .await
        .expect("publish request");
    let mut out = Vec::new();
    loop {
        let m = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("an answer in time")
            .expect("subscription open");
        let eob = m.status.map(u16::from) == Some(204);
        out.push(m);
        if !batch || eob {
            return out;
        }
    }
}

/// Header `k` of `m` (async-nats parses known names into their own
/// variants, so compare by text).
fn try_hdr(m: &Message, k: &str) -> Option<String> {
    let h: &HeaderMap = m.headers.as_ref()?;
    h.iter()
        .find(|(name, _)| name.to_string() == k)
        .and_then(|(_, v)| v.first())
        .map(|v| v.as_str().to_string())
}

fn hdr(m: &Message, k: &str) -> String {
    try_hdr(m, k).unwrap_or_else(|| panic!("header {k} missing in {m:?}"))
}

fn status(m: &Message) -> (u16, String) {
    (
        m.status.map(u16::from).unwrap_or(0),
        m.description.clone().unwrap_or_default(),
    )
}

/// (subject header, sequence, payload) of each data message.
fn data(ms: &[Message]) -> Vec<(String, u64, String)> {
    ms.iter()
        .filter(|m| m.status.is_none())
        .map(|m| {
            (
                hdr(m, "Nats-Subject"),
                hdr(m, "Nats-Sequence").parse().expect("a sequence"),
                String::from_utf8_lossy(&m.payload).into_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_form_answers_as_nats_server() {
    let mut f = start().await;
    let c = connect(&f, "admin").await;
    put(
        &c,
        &[("d.a", "a1"), ("d.b", "b1"), ("d.a", "a2"), ("d.c", "c1")],
    )
    .await;
    let g = "$JS.API.DIRECT.GET.D";

    // By sequence: the raw message with the four headers, no pending.
    let m = &raw(&c, g, r#"{"seq":2}"#, false).await[0];
    assert!(m.subject.as_str().starts_with("_INBOX."));
    assert_eq!(&m.payload[..], b"b1");
    assert_eq!(hdr(m, "Nats-Stream"), "D");
    assert_eq!(hdr(m, "Nats-Subject"), "d.b");
    assert_eq!(hdr(m, "Nats-Sequence"), "2");
    assert!(hdr(m, "Nats-Time-Stamp").ends_with('Z'));
    assert_eq!(try_hdr(m, "Nats-Num-Pending"), None);

    let last = raw(&c, g, r#"{"last_by_subj":"d.a"}"#, false).await;
    assert_eq!(data(&last), vec![("d.a".into(), 3, "a2".into())]);
    let next = raw(&c, g, r#"{"seq":2,"next_by_subj":"d.a"}"#, false).await;
    assert_eq!(data(&next), vec![("d.a".into(), 3, "a2".into())]);
    let wild = raw(&c, g, r#"{"next_by_subj":"d.*"}"#, false).await;
    assert_eq!(data(&wild), vec![("d.a".into(), 1, "a1".into())]);
    let subj = raw(&c, "$JS.API.DIRECT.GET.D.d.c", "", false).await;
    assert_eq!(data(&subj), vec![("d.c".into(), 4, "c1".into())]);
    let ts = hdr(
        &raw(&c, g, r#"{"seq":3}"#, false).await[0],
        "Nats-Time-Stamp",
    );
    let from_time = raw(&c, g, &format!(r#"{{"start_time":"{ts}"}}"#), false).await;
    assert_eq!(data(&from_time), vec![("d.a".into(), 3, "a2".into())]);

    // Status answers.
    let st = |body: &'static str| {
        let c = c.clone();
        async move { status(&raw(&c, g, body, false).await[0]) }
    };
    assert_eq!(st(r#"{"seq":99}"#).await, (404, "Message Not Found".into()));
    assert_eq!(
        st(r#"{"last_by_subj":"d.zz"}"#).await,
        (404, "Message Not Found".into())
    );
    assert_eq!(st("").await, (408, "Empty Request".into()));
    assert_eq!(st("{}").await, (408, "Empty Request".into()));
    assert_eq!(st("{nope").await, (408, "Malformed Request".into()));
    assert_eq!(
        st(r#"{"seq":1,"last_by_subj":"d.a"}"#).await,
        (408, "Bad Request".into())
    );
    let with_body = raw(&c, "$JS.API.DIRECT.GET.D.d.a", r#"{"seq":1}"#, false).await;
    assert_eq!(status(&with_body[0]), (408, "Bad Request".into()));
    // A stream without allow_direct (or no stream) has no responder.
    let no = c
        .request("$JS.API.DIRECT.GET.N", r#"{"seq":1}"#.into())
        .await;
    assert_eq!(
        no.expect_err("no responders").kind(),
        async_nats::RequestErrorKind::NoResponders
    );
    let no = c.request("$JS.API.DIRECT.GET.NOPE.x", "".into()).await;
    assert!(no.is_err(), "{no:?}");

    // async-nats's own direct get methods.
    let js = async_nats::jetstream::new(c.clone());
    let s = js.get_stream("D").await.expect("stream D");
    assert!(s.cached_info().config.allow_direct);
    let sm = s.direct_get(2).await.expect("direct_get");
    assert_eq!(
        (sm.subject.as_str(), sm.sequence, &sm.payload[..]),
        ("d.b", 2, &b"b1"[..])
    );
    let sm = s.direct_get_last_for_subject("d.a").await.expect("last");
    assert_eq!((sm.sequence, &sm.payload[..]), (3, &b"a2"[..]));
    let m = s
        .direct_get_next_for_subject("d.a", Some(2))
        .await
        .expect("next");
    assert_eq!(&m.payload[..], b"a2");
    let m = s.direct_get_first_for_subject("d.c").await.expect("first");
    assert_eq!(&m.payload[..], b"c1");
    let e = s.direct_get(99).await.expect_err("absent");
    assert_eq!(
        e.kind(),
        async_nats::jetstream::stream::DirectGetErrorKind::NotFound
    );
    f.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_end_with_eob_and_respect_max_bytes() {
    let mut f = start().await;
    let c = connect(&f, "admin").await;
    put(
        &c,
        &[
            ("d.a", "1"),
            ("d.b", "2"),
            ("d.a", "3"),
            ("d.b", "4"),
            ("d.a", "5"),
            ("d.a", "6"),
        ],
    )
    .await;
    let g = "$JS.API.DIRECT.GET.D";

    let ms = raw(&c, g, r#"{"seq":2,"batch":2,"next_by_subj":"d.a"}"#, true).await;
    assert_eq!(ms.len(), 3, "{ms:?}");
    assert_eq!(
        data(&ms),
        vec![("d.a".into(), 3, "3".into()), ("d.a".into(), 5, "5".into())]
    );
    assert_eq!(hdr(&ms[0], "Nats-Num-Pending"), "2");
    assert_eq!(hdr(&ms[0], "Nats-Last-Sequence"), "0");
    assert_eq!(hdr(&ms[1], "Nats-Num-Pending"), "1");
    assert_eq!(hdr(&ms[1], "Nats-Last-Sequence"), "3");
    assert_eq!(status(&ms[2]), (204, "EOB".into()));
    assert_eq!(hdr(&ms[2], "Nats-Num-Pending"), "1");
    assert_eq!(hdr(&ms[2], "Nats-Last-Sequence"), "5");

    // Unfiltered from a sequence, more than there is: all, then EOB 0.
    let ms = raw(&c, g, r#"{"seq":4,"batch":10}"#, true).await;
    let seqs: Vec<u64> = data(&ms).iter().map(|d| d.1).collect();
    assert_eq!(seqs, vec![4, 5, 6]);
    assert_eq!(hdr(ms.last().unwrap(), "Nats-Num-Pending"), "0");
    assert_eq!(hdr(ms.last().unwrap(), "Nats-Last-Sequence"), "6");

    // max_bytes: stops once subject + payload reach it (3 + 1 per message).
    let ms = raw(&c, g, r#"{"seq":1,"batch":10,"max_bytes":8}"#, true).await;
    assert_eq!(data(&ms).len(), 2, "{ms:?}");
    assert_eq!(hdr(ms.last().unwrap(), "Nats-Num-Pending"), "4");

    // A batch starting past the end answers 404, like a single get.
    let ms = raw(&c, g, r#"{"seq":50,"batch":3}"#, false).await;
    assert_eq!(status(&ms[0]), (404, "Message Not Found".into()));
    f.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_last_answers_the_newest_of_each_subject() {
    let mut f = start().await;
    let c = connect(&f, "admin").await;
    put(
        &c,
        &[
            ("$KV.cfg.a", "a1"),
            ("$KV.cfg.b", "b1"),
            ("$KV.cfg.a", "a2"),
            ("$KV.cfg.c.x", "cx"),
            ("$KV.cfg.b", "b2"),
        ],
    )
    .await;
    let g = "$JS.API.DIRECT.GET.KV_cfg";
    let ms = raw(&c, g, r#"{"multi_last":["$KV.cfg.*"]}"#, true).await;
    assert_eq!(
        data(&ms),
        vec![
            ("$KV.cfg.a".into(), 3, "a2".into()),
            ("$KV.cfg.b".into(), 5, "b2".into())
        ]
    );
    assert_eq!(hdr(&ms[0], "Nats-Num-Pending"), "1");
    let eob = ms.last().unwrap();
    assert_eq!(status(eob), (204, "EOB".into()));
    assert_eq!(hdr(eob, "Nats-UpTo-Sequence"), "5");
    assert_eq!(hdr(eob, "Nats-Last-Sequence"), "5");

    // As of sequence 3: b's value then was b1.
    let ms = raw(&c, g, r#"{"multi_last":["$KV.cfg.>"],"up_to_seq":3}"#, true).await;
    assert_eq!(
        data(&ms),
        vec![
            ("$KV.cfg.b".into(), 2, "b1".into()),
            ("$KV.cfg.a".into(), 3, "a2".into())
        ]
    );
    assert_eq!(hdr(ms.last().unwrap(), "Nats-UpTo-Sequence"), "3");
    let ms = raw(&c, g, r#"{"multi_last":["$KV.other.>"]}"#, false).await;
    assert_eq!(status(&ms[0]), (404, "No Results".into()));

    // The subject form is what KV get uses: the stored KV headers stay.
    let js = async_nats::jetstream::new(c.clone());
    let mut h = HeaderMap::new();
    h.insert("KV-Operation", "DEL");
    js.publish_with_headers("$KV.cfg.a", h, "".into())
        .await
        .expect("publish")
        .await
        .expect("PubAck");
    let m = &raw(&c, "$JS.API.DIRECT.GET.KV_cfg.$KV.cfg.a", "", false).await[0];
    assert_eq!(hdr(m, "KV-Operation"), "DEL");
    assert_eq!(hdr(m, "Nats-Sequence"), "6");
    f.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_subscribe_applies_to_direct_gets() {
    let mut f = start().await;
    let admin = connect(&f, "admin").await;
    put(
        &admin,
        &[("d.open", "o1"), ("d.secret", "s1"), ("d.open", "o2")],
    )
    .await;
    let r = connect(&f, "reader").await;
    let g = "$JS.API.DIRECT.GET.D";
    let forbidden = (403, "Not Authorized".to_string());
    assert_eq!(
        status(&raw(&r, g, r#"{"seq":2}"#, false).await[0]),
        forbidden
    );
    assert_eq!(
        status(&raw(&r, g, r#"{"last_by_subj":"d.secret"}"#, false).await[0]),
        forbidden
    );
    assert_eq!(
        status(&raw(&r, "$JS.API.DIRECT.GET.D.d.secret", "", false).await[0]),
        forbidden
    );
    // A batch leaves the denied message out; the rest is answered.
    let ms = raw(&r, g, r#"{"seq":1,"batch":5}"#, true).await;
    let seqs: Vec<u64> = data(&ms).iter().map(|d| d.1).collect();
    assert_eq!(seqs, vec![1, 3]);
    let ms = raw(&r, g, r#"{"multi_last":["d.*"]}"#, true).await;
    assert_eq!(data(&ms), vec![("d.open".into(), 3, "o2".into())]);
    // The same requests by admin see the secret.
    let ms = raw(&admin, g, r#"{"seq":2}"#, false).await;
    assert_eq!(data(&ms), vec![("d.secret".into(), 2, "s1".into())]);
    f.terminate();
}
