//! Security tests: reply redirection, names that become files, and the
//! JetStream API's authorization (findings 1 and 5 of issue 10 and the
//! JetStream-API weaknesses; see tests/security.rs for the cast).

#[allow(unused_imports)]
use super::*;

use std::time::Duration;

use async_nats::jetstream;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
use smol::stream::StreamExt;
use tokio::sync::mpsc;

/// How long a single expected event may take.
const T: Duration = Duration::from_secs(20);

/// An MQTT 5 client (rumqttc) logged in as one of the cast.
struct V5 {
    client: AsyncClient,
    publishes: mpsc::UnboundedReceiver<Publish>,
    subacks: mpsc::UnboundedReceiver<()>,
    /// Reasons of negative PUBACKs (rumqttc reports them as errors).
    refusals: mpsc::UnboundedReceiver<PubAckReason>,
}

impl V5 {
    async fn connect(f: &Frond, user: &str, client_id: &str) -> V5 {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", f.mqtt_port);
        o.set_credentials(user, password(user));
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(o, 64);
        let (ptx, publishes) = mpsc::unbounded_channel();
        let (stx, subacks) = mpsc::unbounded_channel();
        let (rtx, refusals) = mpsc::unbounded_channel();
        let (ctx, mut connected) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = ctx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = ptx.send(p);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = stx.send(());
                    }
                    Ok(_) => {}
                    Err(ConnectionError::MqttState(StateError::PubAckFail { reason })) => {
                        // rumqttc drops the connection; the next poll
                        // reconnects.
                        if rtx.send(reason).is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        if rtx.is_closed() {
                            return;
                        }
                        // Back-off between reconnect attempts.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        tokio::time::timeout(T, connected.recv())
            .await
            .unwrap_or_else(|_| panic!("{user} connects over MQTT 5"));
        V5 {
            client,
            publishes,
            subacks,
            refusals,
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue SUBSCRIBE");
        tokio::time::timeout(T, self.subacks.recv())
            .await
            .expect("SUBACK");
    }

    /// PUBLISH `payload` to `topic`, as a request when `response_topic`.
    async fn request(
        &self,
        topic: &str,
        qos: QoS,
        payload: &str,
        response_topic: Option<&str>,
        correlation: &[u8],
    ) {
        let props = PublishProperties {
            response_topic: response_topic.map(String::from),
            correlation_data: response_topic.map(|_| correlation.to_vec().into()),
            ..PublishProperties::default()
        };
        self.client
            .publish_with_properties(topic, qos, false, payload.to_string(), props)
            .await
            .expect("queue PUBLISH");
    }

    async fn next_publish(&mut self) -> Publish {
        tokio::time::timeout(T, self.publishes.recv())
            .await
            .expect("a PUBLISH within the deadline")
            .expect("the event loop is running")
    }
}

/// The next message of `sub`, within [`T`].
async fn next(sub: &mut async_nats::Subscriber, what: &str) -> async_nats::Message {
    tokio::time::timeout(T, sub.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("subscription ended waiting for {what}"))
}

/// A JetStream API request over plain NATS: the JSON answer.
async fn api(nc: &async_nats::Client, subject: &str, body: &str) -> serde_json::Value {
    let m = tokio::time::timeout(T, nc.request(subject.to_string(), body.to_string().into()))
        .await
        .unwrap_or_else(|_| panic!("{subject}: no answer"))
        .unwrap_or_else(|e| panic!("{subject}: {e}"));
    serde_json::from_slice(&m.payload)
        .unwrap_or_else(|e| panic!("{subject}: answer is not JSON ({e})"))
}

/// Store `payload` on `subject` through JetStream (acknowledged) as admin.
async fn store(f: &Frond, subject: &str, payload: &str) {
    let js = jetstream::new(nats_as(f, "admin").await);
    js.publish(subject.to_string(), payload.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("PubAck");
}

/// Finding 1: bob asks (MQTT 5) for replies to go where he may not
/// write, then answers his own request (NATS) with a reply subject of his
/// own. Nothing may land in SEC or reach secret.> subscribers, SEC must
/// keep its messages and bob must get none of them.
#[tokio::test]
async fn reply_redirection_stays_within_the_requesters_permissions() {
    let f = setup().await;
    store(&f, "secret.doc", "top-secret").await;
    let admin = nats_as(&f, "admin").await;
    let mut watcher = admin.subscribe("secret.>").await.expect("watch secret.>");
    admin.flush().await.expect("flush");

    let bob = nats_as(&f, "bob").await;
    let mut requests = bob.subscribe("a.req").await.expect("bob subscribes a.req");
    let mut answers = bob
        .subscribe("_INBOX.bob.>")
        .await
        .expect("bob subscribes his inbox");
    bob.flush().await.expect("flush");

    // Response topic -> what bob's reply carries.
    let attacks = [
        ("$JS/API/STREAM/MSG/GET/SEC", r#"{"seq":1}"#),
        ("secret/x", "written-by-bob"),
        ("$JS/API/STREAM/PURGE/SEC", "{}"),
    ];
    let mut mq = V5::connect(&f, "bob", "bob-mqtt").await;
    for (i, (response_topic, _)) in attacks.iter().enumerate() {
        mq.request(
            "a/req",
            QoS::AtMostOnce,
            &format!("attack-{i}"),
            Some(response_topic),
            b"corr",
        )
        .await;
    }
    // Same connection, same path: it arrives after whatever got through.
    mq.request("a/req", QoS::AtLeastOnce, "marker", None, b"")
        .await;

    // bob's NATS side answers every request that reaches it.
    let mut delivered = Vec::new();
    loop {
        let m = next(&mut requests, "the marker request on a.req").await;
        let text = String::from_utf8_lossy(&m.payload).to_string();
        if text == "marker" {
            break;
        }
        let i: usize = text
            .strip_prefix("attack-")
            .and_then(|n| n.parse().ok())
            .expect("an attack request");
        if let Some(reply) = m.reply {
            bob.publish_with_reply(
                reply,
                format!("_INBOX.bob.{i}"),
                attacks[i].1.to_string().into(),
            )
            .await
            .expect("bob replies");
        }
        delivered.push(text);
    }
    // frond has routed bob's replies once the flush returns; the API
    // serves admin's requests below after them.
    bob.flush().await.expect("flush");

    let left = stream_count(&f, "SEC").await;
    let first = api(&admin, "$JS.API.STREAM.MSG.GET.SEC", r#"{"seq":1}"#).await;
    // Markers behind everything on bob's inbox and on secret.>.
    admin
        .publish("_INBOX.bob.end", "end".into())
        .await
        .expect("publish");
    admin
        .publish("secret.end", "end".into())
        .await
        .expect("publish");
    admin.flush().await.expect("flush");
    let mut bob_got = Vec::new();
    loop {
        let m = next(&mut answers, "the end marker on bob's inbox").await;
        if m.subject.as_str() == "_INBOX.bob.end" {
            break;
        }
        bob_got.push(String::from_utf8_lossy(&m.payload).to_string());
    }
    let mut secret_seen = Vec::new();
    loop {
        let m = next(&mut watcher, "the end marker on secret.>").await;
        if m.subject.as_str() == "secret.end" {
            break;
        }
        secret_seen.push(format!(
            "{}: {}",
            m.subject,
            String::from_utf8_lossy(&m.payload)
        ));
    }

    assert!(
        secret_seen.is_empty(),
        "a reply landed on secret.>: {secret_seen:?}"
    );
    assert_eq!(
        first["message"]["data"].as_str(),
        Some("dG9wLXNlY3JldA=="),
        "SEC lost its message: {first}"
    );
    assert_eq!(
        left, 1,
        "SEC must hold exactly its one message (nothing written, nothing purged)"
    );
    assert!(
        bob_got.is_empty(),
        "bob got answers from the JetStream API: {bob_got:?}"
    );
    assert!(
        delivered.is_empty(),
        "requests with a response topic bob may not use were delivered: {delivered:?}"
    );

    // At QoS 1 the refusal is a PUBACK with reason 0x87 (Not authorized).
    mq.request(
        "a/req",
        QoS::AtLeastOnce,
        "attack-q1",
        Some("secret/x"),
        b"c",
    )
    .await;
    let reason = tokio::time::timeout(T, mq.refusals.recv())
        .await
        .expect("a negative PUBACK for a request answering to secret/x");
    assert_eq!(reason, Some(PubAckReason::NotAuthorized));
}

/// A request whose response topic the requester may use still works, with
/// its correlation data; the replier's own reply subject is not passed on.
#[tokio::test]
async fn request_reply_within_permissions_keeps_correlation_data() {
    let f = setup().await;
    let bob = nats_as(&f, "bob").await;
    let mut service = bob.subscribe("a.req").await.expect("subscribe a.req");
    bob.flush().await.expect("flush");
    let mut mq = V5::connect(&f, "bob", "bob-requester").await;
    mq.subscribe("a/resp").await;
    mq.request("a/req", QoS::AtLeastOnce, "q1", Some("a/resp"), b"corr-42")
        .await;
    let req = next(&mut service, "the request on a.req").await;
    let reply = req.reply.expect("the request has a reply subject");
    assert!(reply.starts_with("_INBOX.frond."), "{reply}");
    bob.publish_with_reply(reply, "_INBOX.bob.mine", "answer-q1".into())
        .await
        .expect("reply");
    let r = mq.next_publish().await;
    assert_eq!(&r.topic[..], b"a/resp");
    assert_eq!(&r.payload[..], b"answer-q1");
    let props = r.properties.unwrap_or_default();
    assert_eq!(props.correlation_data.as_deref(), Some(&b"corr-42"[..]));
    assert_eq!(
        props.response_topic, None,
        "the replier's own reply subject is dropped"
    );
}

/// Finding 5: a consumer name is a file name; jsuser must not create or
/// delete files outside the store through one.
#[tokio::test]
async fn consumer_names_cannot_reach_files_outside_the_store() {
    let f = setup().await;
    let victim_dir = tempfile::Builder::new()
        .prefix("frondvictim")
        .tempdir()
        .expect("temp dir");
    let victim = victim_dir.path().join("victim.json");
    std::fs::write(&victim, b"{\"precious\":true}").expect("write victim");
    let target = victim_dir.path().join("victim");
    let target = target.to_str().expect("utf-8 temp path");
    assert!(
        !target.contains('.'),
        "the temp dir path {target:?} has a '.', which splits subject tokens; set TMPDIR"
    );
    let js = nats_as(&f, "jsuser").await;
    let create = api(
        &js,
        &format!("$JS.API.CONSUMER.CREATE.A.{target}"),
        r#"{"stream_name":"A","config":{"ack_policy":"explicit"}}"#,
    )
    .await;
    let delete = api(&js, &format!("$JS.API.CONSUMER.DELETE.A.{target}"), "").await;
    // And with `..`, in the only place a name can hold a '.': the body.
    let depth = f.stream_dir("A").components().count() + 1;
    let up = "../".repeat(depth);
    let dotdot = serde_json::json!({
        "stream_name": "A",
        "config": {"durable_name": format!("{up}{}", &target[1..])},
    });
    let relative = api(&js, "$JS.API.CONSUMER.CREATE.A", &dotdot.to_string()).await;
    let bare = api(
        &js,
        "$JS.API.CONSUMER.CREATE.A",
        r#"{"stream_name":"A","config":{"durable_name":".."}}"#,
    )
    .await;

    assert_eq!(
        std::fs::read(&victim).ok().as_deref(),
        Some(&b"{\"precious\":true}"[..]),
        "victim.json was deleted or changed"
    );
    assert_eq!(create["error"]["err_code"], 10127, "create: {create}");
    assert_eq!(delete["error"]["err_code"], 10127, "delete: {delete}");
    assert_eq!(relative["error"]["err_code"], 10127, "../: {relative}");
    assert_eq!(bare["error"]["err_code"], 10103, "..: {bare}");
    let names = api(&nats_as(&f, "admin").await, "$JS.API.CONSUMER.NAMES.A", "").await;
    assert_eq!(names["consumers"], serde_json::json!([]), "{names}");
    assert_eq!(
        std::fs::read_dir(victim_dir.path()).map(|d| d.count()).ok(),
        Some(1),
        "nothing new next to the victim"
    );
}

/// The JetStream API applies dave's `deny_subscribe` (secret.>) to
/// `STREAM.MSG.GET`: he cannot read SEC's message, but can read A's.
#[tokio::test]
async fn msg_get_refuses_subjects_the_caller_may_not_subscribe_to() {
    let f = setup().await;
    store(&f, "secret.doc", "top-secret").await;
    store(&f, "a.doc", "open").await;
    let dave = nats_as(&f, "dave").await;
    let by_seq = api(&dave, "$JS.API.STREAM.MSG.GET.SEC", r#"{"seq":1}"#).await;
    let by_subject = api(
        &dave,
        "$JS.API.STREAM.MSG.GET.SEC",
        r#"{"last_by_subj":"secret.doc"}"#,
    )
    .await;
    let open = api(&dave, "$JS.API.STREAM.MSG.GET.A", r#"{"seq":1}"#).await;
    let js = jetstream::new(dave.clone());
    let mut sec = js.get_stream("SEC").await.expect("dave may see SEC's info");
    let raw = sec.get_raw_message(1).await;
    let info = sec.info().await.expect("info").state.messages;

    for v in [&by_seq, &by_subject] {
        assert!(
            !v.to_string().contains("dG9wLXNlY3JldA"),
            "dave read the secret: {v}"
        );
        assert_eq!(v["error"]["code"], 403, "{v}");
    }
    assert!(raw.is_err(), "the client API refuses too: {raw:?}");
    assert_eq!(info, 1);
    assert_eq!(open["message"]["data"], "b3Blbg==", "{open}");
}

/// A consumer on SEC never delivers to dave: he cannot create one, and
/// cannot pull from admin's. (His connection drops live deliveries on
/// secret.> anyway; before the fix the consumer still handed the message
/// out to him, so admin's consumer lost it until the ack wait.)
#[tokio::test]
async fn consumers_do_not_deliver_denied_subjects() {
    let f = setup().await;
    store(&f, "secret.doc", "top-secret").await;
    store(&f, "a.doc", "open").await;
    let dave = nats_as(&f, "dave").await;
    let unfiltered = api(
        &dave,
        "$JS.API.CONSUMER.CREATE.SEC.DV",
        r#"{"stream_name":"SEC","config":{"name":"DV","ack_policy":"explicit"}}"#,
    )
    .await;
    let filtered = api(
        &dave,
        "$JS.API.CONSUMER.DURABLE.CREATE.SEC.DV2",
        r#"{"stream_name":"SEC","config":{"durable_name":"DV2","filter_subject":"secret.doc"}}"#,
    )
    .await;
    assert_eq!(unfiltered["error"]["code"], 403, "{unfiltered}");
    assert_eq!(filtered["error"]["code"], 403, "{filtered}");
    let admin = jetstream::new(nats_as(&f, "admin").await);
    let sec = admin.get_stream("SEC").await.expect("SEC");
    let adm: jetstream::consumer::PullConsumer = sec
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("ADM".into()),
            ..Default::default()
        })
        .await
        .expect("admin creates ADM");
    // dave pulls from admin's consumer: the first answer decides.
    let mut inbox = dave.subscribe("_INBOX.dave.pull").await.expect("subscribe");
    dave.publish_with_reply(
        "$JS.API.CONSUMER.MSG.NEXT.SEC.ADM",
        "_INBOX.dave.pull",
        r#"{"batch":2,"no_wait":true}"#.into(),
    )
    .await
    .expect("pull");
    let first = next(&mut inbox, "an answer to dave's pull").await;
    assert_ne!(
        &first.payload[..],
        b"top-secret",
        "dave pulled a secret message from admin's consumer"
    );
    assert_eq!(
        first.status.map(|s| s.as_u16()),
        Some(403),
        "the pull is refused: {first:?}"
    );
    // And dave's own consumer on A works.
    let mine = api(
        &dave,
        "$JS.API.CONSUMER.CREATE.A.DA",
        r#"{"stream_name":"A","config":{"name":"DA","ack_policy":"none"}}"#,
    )
    .await;
    dave.publish_with_reply(
        "$JS.API.CONSUMER.MSG.NEXT.A.DA",
        "_INBOX.dave.pull",
        r#"{"batch":1}"#.into(),
    )
    .await
    .expect("pull A");
    let from_a = next(&mut inbox, "a message of A for dave").await;
    // admin's consumer still holds the secret for admin.
    let mut batch = adm
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("admin fetches");
    let admins = tokio::time::timeout(T, batch.next())
        .await
        .expect("admin's fetch answers")
        .expect("a message")
        .expect("not an error");

    assert_eq!(mine["name"], "DA", "{mine}");
    assert_eq!(&from_a.payload[..], b"open");
    assert_eq!(&admins.payload[..], b"top-secret");
}
