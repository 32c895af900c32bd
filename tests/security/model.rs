//! The permission model as a property: users with random permissions run
//! random MQTT and NATS operations (subscriptions plain, shared and in
//! persistent sessions, publishes with and without retain, MQTT 5 requests
//! answered by NATS services through frond's reply inboxes, wills of
//! dropped connections), and two invariants are checked on what really
//! moved — every delivery each client received and every message stored:
//!
//! 1. no user receives a message on a subject its `allow_subscribe` /
//!    `deny_subscribe` excludes;
//! 2. no message lands on a subject its originating user may not publish
//!    to (for a reply frond redirected to an MQTT 5 response topic, the
//!    originator is the requester, who named the destination: it must be
//!    allowed to publish and to subscribe there).
//!
//! The payload of every message names its author and kind
//! (`pub:<user>:<n>`, `will:…`, `req:…`, `rep:<replier>:<request n>`), so
//! the checks need no knowledge of frond's internals. The run is also
//! checked for teeth: allowed publishes must have landed, and the random
//! schedule must have tried forbidden ones.
//!
//! Synchronisation is by fences, never sleeps: each client subscribes to
//! its own `fence.<id>` (every user may), publishers wait for their last
//! acknowledgement (MQTT) or flush (NATS), and at the end admin publishes
//! each fence — a client's deliveries are ordered, so everything routed to
//! it before the fence has arrived when the fence has.
//!
//! Seeds: `FROND_MODEL_SEEDS` (default 3) schedules of `FROND_MODEL_OPS`
//! (default 60) operations; a failure names its seed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, PublishProperties};
use rumqttc::v5::{AsyncClient as AsyncClient5, Event as Event5, MqttOptions as MqttOptions5};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};

use super::*;

const SUBJECTS: [&str; 8] = [
    "a.x.1", "a.x.2", "a.y.1", "a.y.2", "s.x.1", "s.x.2", "s.y.1", "s.y.2",
];
/// Filters for allow lists (`>` = everything).
const ALLOW: [&str; 8] = [
    "a.>", "s.>", "a.x.*", "s.*.1", "*.x.>", "a.y.2", "s.x.1", ">",
];
/// Filters for deny lists (never `>` and never `fence.>`: every user may
/// receive its fences).
const DENY: [&str; 5] = ["s.>", "a.y.*", "*.*.2", "s.x.1", "*.y.>"];
/// Subscription filters, NATS form (MQTT clients use the topic form).
const FILTERS: [&str; 7] = ["a.x.1", "a.>", "s.>", "*.*.1", ">", "s.x.*", "*.y.>"];
const USERS: usize = 4;
const WAIT: Duration = Duration::from_secs(20);

/// NATS subject match of a literal subject against a filter.
fn matches(filter: &str, subject: &str) -> bool {
    let mut s = subject.split('.');
    for f in filter.split('.') {
        match (f, s.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    s.next().is_none()
}

fn allowed(allow: &[String], deny: &[String], subject: &str) -> bool {
    (allow.is_empty() || allow.iter().any(|f| matches(f, subject)))
        && !deny.iter().any(|f| matches(f, subject))
}

#[derive(Debug, Clone)]
struct User {
    name: String,
    allow_pub: Vec<String>,
    deny_pub: Vec<String>,
    allow_sub: Vec<String>,
    deny_sub: Vec<String>,
}

impl User {
    fn random(rng: &mut fastrand::Rng, i: usize) -> User {
        let mut pick = |from: &[&str], max: usize| -> Vec<String> {
            let n = rng.usize(..=max);
            (0..n)
                .map(|_| from[rng.usize(..from.len())].to_string())
                .collect()
        };
        let mut allow_pub = pick(&ALLOW, 2);
        let deny_pub = pick(&DENY, 1);
        let mut allow_sub = pick(&ALLOW, 2);
        let deny_sub = pick(&DENY, 1);
        if !allow_pub.is_empty() && rng.bool() {
            // NATS services answer requests through `_INBOX.>`.
            allow_pub.push("_INBOX.>".into());
        }
        if !allow_pub.is_empty() {
            allow_pub.push("fence.>".into());
        }
        if !allow_sub.is_empty() {
            allow_sub.push("fence.>".into());
        }
        User {
            name: format!("u{i}"),
            allow_pub,
            deny_pub,
            allow_sub,
            deny_sub,
        }
    }

    fn may_publish(&self, subject: &str) -> bool {
        allowed(&self.allow_pub, &self.deny_pub, subject)
    }

    fn may_receive(&self, subject: &str) -> bool {
        allowed(&self.allow_sub, &self.deny_sub, subject)
    }

    fn toml(&self) -> String {
        let list = |v: &[String]| {
            let q: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
            format!("[{}]", q.join(", "))
        };
        format!(
            "[[auth.users]]\nname = \"{}\"\npassword = \"{}\"\nallow_publish = {}\ndeny_publish = {}\nallow_subscribe = {}\ndeny_subscribe = {}\n\n",
            self.name,
            password(&self.name),
            list(&self.allow_pub),
            list(&self.deny_pub),
            list(&self.allow_sub),
            list(&self.deny_sub),
        )
    }
}

/// One message a client received.
#[derive(Debug, Clone)]
struct Got {
    user: String,
    client: String,
    subject: String,
    payload: String,
}

type Log = Arc<Mutex<Vec<Got>>>;

fn record(log: &Log, user: &str, client: &str, subject: String, payload: &[u8]) {
    let g = Got {
        user: user.to_string(),
        client: client.to_string(),
        subject,
        payload: String::from_utf8_lossy(payload).into_owned(),
    };
    log.lock().unwrap().push(g);
}

fn fenced(log: &Log, client: &str) -> bool {
    let fence = format!("fence.{client}");
    log.lock()
        .unwrap()
        .iter()
        .any(|g| g.client == client && g.subject == fence)
}

fn topic(subject: &str) -> String {
    subject.replace('.', "/")
}

fn mqtt_filter(filter: &str) -> String {
    filter.replace('.', "/").replace('>', "#").replace('*', "+")
}

/// An MQTT 5 client whose event loop runs in a task, recording what it
/// receives and counting its acknowledgements.
struct Mqtt {
    id: String,
    user: String,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
    sent_qos1: usize,
    acks: Arc<AtomicUsize>,
}

impl Mqtt {
    async fn connect(
        f: &Frond,
        user: &str,
        id: &str,
        persistent: bool,
        will: Option<LastWill>,
        log: &Log,
    ) -> Mqtt {
        let mut o = MqttOptions::new(id, "127.0.0.1", f.mqtt_port);
        o.set_credentials(user, password(user));
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(!persistent);
        if let Some(w) = will {
            o.set_last_will(w);
        }
        let (client, mut ev) = AsyncClient::new(o, 256);
        let acks = Arc::new(AtomicUsize::new(0));
        let connected = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let task = {
            let (log, user, id) = (log.clone(), user.to_string(), id.to_string());
            let (acks, connected, refused) = (acks.clone(), connected.clone(), refused.clone());
            tokio::spawn(async move {
                loop {
                    match ev.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let subject = p.topic.replace('/', ".");
                            record(&log, &user, &id, subject, &p.payload);
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            connected.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        Err(rumqttc::ConnectionError::ConnectionRefused(_)) => {
                            // E.g. a will the user may not publish.
                            refused.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        // Reconnect pacing after an error, not synchronisation.
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        };
        wait_until(format!("{id} connects or is refused"), WAIT, || {
            let (c, r) = (connected.clone(), refused.clone());
            async move { c.load(Ordering::SeqCst) + r.load(Ordering::SeqCst) > 0 }
        })
        .await;
        let m = Mqtt {
            id: id.to_string(),
            user: user.to_string(),
            client,
            task,
            sent_qos1: 0,
            acks,
        };
        m.client
            .subscribe(format!("fence/{id}"), QoS::AtLeastOnce)
            .await
            .unwrap();
        m
    }

    async fn publish(&mut self, subject: &str, qos: QoS, retain: bool, payload: String) {
        if qos == QoS::AtLeastOnce {
            self.sent_qos1 += 1;
        }
        self.client
            .publish(topic(subject), qos, retain, payload)
            .await
            .unwrap();
    }

    /// Waits until frond has handled everything this client sent: one more
    /// QoS 1 publish, then every acknowledgement (3.1.1 acknowledges a
    /// denied publish too).
    async fn settle(&mut self) {
        self.publish("fence.sync", QoS::AtLeastOnce, false, "sync".into())
            .await;
        let (acks, want) = (self.acks.clone(), self.sent_qos1);
        wait_until(format!("{}: {want} PUBACKs", self.id), WAIT, || {
            let a = acks.clone();
            async move { a.load(Ordering::SeqCst) >= want }
        })
        .await;
    }

    /// Drops the TCP connection without DISCONNECT (the will is owed).
    fn drop_link(self) {
        self.task.abort();
    }
}

/// An MQTT 5 client that only makes requests (QoS 0 PUBLISH with a
/// Response Topic and Correlation Data). rumqttc's 5.0 client drops the
/// connection on a negative PUBACK or SUBACK, so the other MQTT clients
/// here speak 3.1.1 and this one never subscribes.
struct Requester {
    client: AsyncClient5,
    task: tokio::task::JoinHandle<()>,
    acks: Arc<AtomicUsize>,
    sent_qos1: usize,
}

impl Requester {
    async fn connect(f: &Frond, user: &str) -> Requester {
        let mut o = MqttOptions5::new(format!("r-{user}"), "127.0.0.1", f.mqtt_port);
        o.set_credentials(user, password(user));
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut ev) = AsyncClient5::new(o, 256);
        let acks = Arc::new(AtomicUsize::new(0));
        let connected = Arc::new(AtomicUsize::new(0));
        let task = {
            let (acks, connected) = (acks.clone(), connected.clone());
            tokio::spawn(async move {
                loop {
                    match ev.poll().await {
                        Ok(Event5::Incoming(Packet5::PubAck(_))) => {
                            acks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event5::Incoming(Packet5::ConnAck(_))) => {
                            connected.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        // Reconnect pacing after an error, not synchronisation.
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        };
        wait_until(format!("r-{user} connects"), WAIT, || {
            let c = connected.clone();
            async move { c.load(Ordering::SeqCst) > 0 }
        })
        .await;
        Requester {
            client,
            task,
            acks,
            sent_qos1: 0,
        }
    }

    async fn request(&mut self, subject: &str, response: &str, payload: String, n: usize) {
        let props = PublishProperties {
            response_topic: Some(topic(response)),
            correlation_data: Some(format!("c{n}").into_bytes().into()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                topic(subject),
                rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                false,
                payload,
                props,
            )
            .await
            .unwrap();
    }

    /// As [`Mqtt::settle`] (the sync subject is one every user may publish to).
    async fn settle(&mut self) {
        self.sent_qos1 += 1;
        self.client
            .publish(
                topic("fence.sync"),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                "sync",
            )
            .await
            .unwrap();
        let (acks, want) = (self.acks.clone(), self.sent_qos1);
        wait_until(format!("requester: {want} PUBACKs"), WAIT, || {
            let a = acks.clone();
            async move { a.load(Ordering::SeqCst) >= want }
        })
        .await;
    }
}

/// A NATS client recording what its subscriptions receive; a message
/// with a reply subject is answered (`rep:<user>:<n>`), with a reply
/// subject of its own, as an attacker would.
struct Nats {
    id: String,
    client: async_nats::Client,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Nats {
    async fn connect(f: &Frond, user: &str, id: &str, log: &Log) -> Nats {
        let client = nats_as(f, user).await;
        let mut n = Nats {
            id: id.to_string(),
            client,
            tasks: Vec::new(),
        };
        n.subscribe(user, &format!("fence.{id}"), None, log).await;
        n
    }

    async fn subscribe(&mut self, user: &str, filter: &str, queue: Option<&str>, log: &Log) {
        use smol::stream::StreamExt;
        let sub = match queue {
            Some(q) => {
                self.client
                    .queue_subscribe(filter.to_string(), q.into())
                    .await
            }
            None => self.client.subscribe(filter.to_string()).await,
        };
        let Ok(mut sub) = sub else { return };
        let (log, user, id, client) = (
            log.clone(),
            user.to_string(),
            self.id.clone(),
            self.client.clone(),
        );
        self.tasks.push(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                record(&log, &user, &id, m.subject.to_string(), &m.payload);
                let text = String::from_utf8_lossy(&m.payload).into_owned();
                if let (Some(reply), Some(n)) = (&m.reply, text.strip_prefix("req:")) {
                    let n = n.rsplit(':').next().unwrap_or("?");
                    let answer = format!("rep:{user}:{n}");
                    let _ = client
                        .publish_with_reply(reply.to_string(), "s.y.2".to_string(), answer.into())
                        .await;
                }
            }
        }));
    }
}

/// The payload's author and kind: `(kind, user, n)`.
fn tag(payload: &str) -> Option<(&str, &str, &str)> {
    let mut p = payload.splitn(3, ':');
    Some((p.next()?, p.next()?, p.next()?))
}

/// Requests made: number -> (requester, redirected through an inbox).
type Requests = HashMap<String, String>;

/// Checks one message that landed on `subject` (delivered or stored).
fn check_origin(
    users: &HashMap<String, User>,
    requests: &Requests,
    subject: &str,
    payload: &str,
    seed: u64,
) {
    let Some((kind, author, n)) = tag(payload) else {
        return; // fences and sync markers
    };
    let Some(u) = users.get(author) else {
        return;
    };
    match kind {
        "pub" | "will" | "req" => assert!(
            u.may_publish(subject),
            "seed {seed}: {payload:?} by {author} landed on {subject}, which {author} may not publish to ({u:?})"
        ),
        "rep" => {
            // A reply lands either on the responder's own target (NATS
            // request) or on the MQTT requester's response topic.
            let requester = requests.get(n).and_then(|r| users.get(r));
            let ok = u.may_publish(subject)
                || requester.is_some_and(|r| r.may_publish(subject) && r.may_receive(subject));
            assert!(
                ok,
                "seed {seed}: reply {payload:?} landed on {subject}: neither the responder {author} nor the requester {requester:?} may publish there"
            );
        }
        _ => {}
    }
}

/// One schedule; returns (forbidden publishes tried, allowed QoS 1
/// publishes that landed), for the test's check of its own teeth.
async fn run(seed: u64, ops: usize) -> (usize, usize) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let users: Vec<User> = (0..USERS).map(|i| User::random(&mut rng, i)).collect();
    let mut cfg = String::from("[auth]\nanonymous = false\n\n[[auth.users]]\nname = \"admin\"\npassword = \"admin-pw\"\n\n");
    for u in &users {
        cfg.push_str(&u.toml());
    }
    cfg.push_str("[[stream]]\nname = \"M\"\nsubjects = [\"a.>\", \"s.>\", \"fence.>\"]\n");
    let f = Frond::start_new(FrondSpec {
        extra_config: cfg,
        ..Default::default()
    })
    .await;
    let log: Log = Arc::default();
    let by_name: HashMap<String, User> =
        users.iter().map(|u| (u.name.clone(), u.clone())).collect();

    // Each user: one plain MQTT client, one persistent one, one NATS client.
    let mut mqtt: Vec<Mqtt> = Vec::new();
    let mut persistent: Vec<Option<Mqtt>> = Vec::new();
    let mut nats: Vec<Nats> = Vec::new();
    let mut requesters: Vec<Requester> = Vec::new();
    for u in &users {
        requesters.push(Requester::connect(&f, &u.name).await);
        mqtt.push(Mqtt::connect(&f, &u.name, &format!("m-{}", u.name), false, None, &log).await);
        persistent.push(Some(
            Mqtt::connect(&f, &u.name, &format!("p-{}", u.name), true, None, &log).await,
        ));
        nats.push(Nats::connect(&f, &u.name, &format!("n-{}", u.name), &log).await);
    }

    let mut requests = Requests::new();
    let mut tried_forbidden = 0usize;
    let mut acked_allowed: Vec<(String, String)> = Vec::new();
    for n in 0..ops {
        let i = rng.usize(..USERS);
        let u = &users[i];
        let subject = SUBJECTS[rng.usize(..SUBJECTS.len())];
        let filter = FILTERS[rng.usize(..FILTERS.len())];
        match rng.u8(..10) {
            0 => {
                let share = if rng.bool() { "$share/g/" } else { "" };
                let f = format!("{share}{}", mqtt_filter(filter));
                let _ = mqtt[i].client.subscribe(f, QoS::AtLeastOnce).await;
            }
            1 => {
                if let Some(p) = &persistent[i] {
                    let _ = p
                        .client
                        .subscribe(mqtt_filter(filter), QoS::AtLeastOnce)
                        .await;
                }
            }
            2 => {
                let queue = rng.bool().then_some("g");
                nats[i].subscribe(&u.name, filter, queue, &log).await;
            }
            3 | 4 => {
                let payload = format!("pub:{}:{n}", u.name);
                let qos = if rng.bool() {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                let retain = rng.u8(..4) == 0;
                if u.may_publish(subject) {
                    if qos == QoS::AtLeastOnce {
                        acked_allowed.push((subject.to_string(), payload.clone()));
                    }
                } else {
                    tried_forbidden += 1;
                }
                mqtt[i].publish(subject, qos, retain, payload).await;
            }
            5 => {
                let payload = format!("pub:{}:{n}", u.name);
                tried_forbidden += usize::from(!u.may_publish(subject));
                let _ = nats[i]
                    .client
                    .publish(subject.to_string(), payload.into())
                    .await;
            }
            6 => {
                // An MQTT 5 request whose answer frond redirects.
                let response = SUBJECTS[rng.usize(..SUBJECTS.len())];
                requests.insert(n.to_string(), u.name.clone());
                let payload = format!("req:{}:{n}", u.name);
                requesters[i].request(subject, response, payload, n).await;
            }
            7 => {
                // A NATS request: the responder answers to `response`.
                let response = SUBJECTS[rng.usize(..SUBJECTS.len())];
                let payload = format!("req:{}:{n}", u.name);
                let _ = nats[i]
                    .client
                    .publish_with_reply(subject.to_string(), response.to_string(), payload.into())
                    .await;
            }
            8 => {
                // A will, owed when the link drops.
                let w = LastWill::new(
                    topic(subject),
                    format!("will:{}:{n}", u.name),
                    QoS::AtLeastOnce,
                    rng.bool(),
                );
                tried_forbidden += usize::from(!u.may_publish(subject));
                let c = Mqtt::connect(
                    &f,
                    &u.name,
                    &format!("w-{}-{n}", u.name),
                    false,
                    Some(w),
                    &log,
                )
                .await;
                c.drop_link();
            }
            _ => {
                // The persistent session goes away (no DISCONNECT) or comes back.
                match persistent[i].take() {
                    Some(p) => p.drop_link(),
                    None => {
                        persistent[i] = Some(
                            Mqtt::connect(&f, &u.name, &format!("p-{}", u.name), true, None, &log)
                                .await,
                        )
                    }
                }
            }
        }
    }

    // Settle: every persistent session back, every publisher acknowledged,
    // every will's connection gone, then the fences.
    for (i, u) in users.iter().enumerate() {
        if persistent[i].is_none() {
            persistent[i] =
                Some(Mqtt::connect(&f, &u.name, &format!("p-{}", u.name), true, None, &log).await);
        }
    }
    for m in mqtt.iter_mut().chain(persistent.iter_mut().flatten()) {
        m.settle().await;
    }
    for r in &mut requesters {
        r.settle().await;
    }
    for n in &nats {
        n.client.flush().await.unwrap();
    }
    let live = mqtt.len() + persistent.len() + requesters.len();
    wait_until(
        "only the clients' MQTT connections remain (wills published)",
        WAIT,
        || {
            let f = &f;
            async move {
                f.varz()
                    .await
                    .is_some_and(|v| v["mqtt"]["connections"].as_u64() == Some(live as u64))
            }
        },
    )
    .await;
    let admin = nats_as(&f, "admin").await;
    let clients: Vec<String> = mqtt
        .iter()
        .chain(persistent.iter().flatten())
        .map(|m| m.id.clone())
        .chain(nats.iter().map(|n| n.id.clone()))
        .collect();
    for c in &clients {
        admin
            .publish(format!("fence.{c}"), "fence".into())
            .await
            .unwrap();
    }
    admin.flush().await.unwrap();
    for c in &clients {
        wait_until(format!("seed {seed}: fence of {c}"), WAIT, || {
            let log = log.clone();
            let c = c.clone();
            async move { fenced(&log, &c) }
        })
        .await;
    }

    // Invariant 1 and 2 over every delivery.
    let got = log.lock().unwrap().clone();
    for g in &got {
        let u = &by_name[&g.user];
        assert!(
            u.may_receive(&g.subject),
            "seed {seed}: {} ({}) received {:?} on {}, which it may not receive ({u:?})",
            g.user,
            g.client,
            g.payload,
            g.subject
        );
        check_origin(&by_name, &requests, &g.subject, &g.payload, seed);
    }

    // Invariant 2 over the stream, and the allowed QoS 1 publishes landed.
    let js = async_nats::jetstream::new(admin.clone());
    let mut stream = js.get_stream("M").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut stored = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            stored.push((
                m.subject.to_string(),
                String::from_utf8_lossy(&m.payload).into_owned(),
            ));
        }
    }
    for (subject, payload) in &stored {
        check_origin(&by_name, &requests, subject, payload, seed);
    }
    for want in &acked_allowed {
        assert!(
            stored.contains(want),
            "seed {seed}: allowed, acknowledged publish {want:?} is not in the stream"
        );
    }
    for m in mqtt.into_iter().chain(persistent.into_iter().flatten()) {
        m.task.abort();
    }
    for r in requesters {
        r.task.abort();
    }
    for n in nats {
        for t in n.tasks {
            t.abort();
        }
    }
    (tried_forbidden, acked_allowed.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_users_and_operations_never_cross_permissions() {
    let seeds: u64 = std::env::var("FROND_MODEL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let ops: usize = std::env::var("FROND_MODEL_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let base: u64 = std::env::var("FROND_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let (mut forbidden, mut allowed) = (0, 0);
    for seed in base..base + seeds {
        let (f, a) = run(seed, ops).await;
        forbidden += f;
        allowed += a;
    }
    assert!(
        forbidden > 0 && allowed > 0,
        "the schedules must try forbidden and allowed publishes ({forbidden} forbidden, {allowed} allowed)"
    );
}
