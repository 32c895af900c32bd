//! NATS nkey authentication end to end, with keys generated here from
//! random bytes (frond's own encoder; no network, no `nk` tool):
//! - async-nats logs in to frond's NATS port with `ConnectOptions::with_nkey`
//!   and gets its user's permissions; a wrong seed is refused.
//! - frond's uplink logs in to a real nats-server hub that accepts only an
//!   nkey user (`uplink.nkey_seed`) and mirrors messages to it.

mod common;

use std::time::Duration;

use common::*;
use frond::nkey::SeedKey;
use smol::stream::StreamExt;

const WAIT: Duration = Duration::from_secs(10);
const LONG: Duration = Duration::from_secs(30);

fn random_seed() -> SeedKey {
    let mut b = [0u8; 32];
    for x in b.iter_mut() {
        *x = fastrand::u8(..);
    }
    SeedKey::from_bytes(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_nats_logs_in_with_an_nkey_and_a_wrong_seed_is_refused() {
    let seed = random_seed();
    let public = seed.public_key();
    let frond = Frond::start_new(FrondSpec {
        extra_config: format!(
            "\n[auth]\n[[auth.users]]\nname = \"dev\"\nnkey = \"{public}\"\nallow_publish = [\"dev.>\"]\n"
        ),
        ..Default::default()
    })
    .await;
    let url = format!("nats://127.0.0.1:{}", frond.nats_port);

    let client = async_nats::ConnectOptions::with_nkey(seed.encode())
        .connect(&url)
        .await
        .expect("the nkey user logs in");
    let mut sub = client.subscribe("dev.>").await.unwrap();
    client.publish("dev.x", "hello".into()).await.unwrap();
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("message delivered in time")
        .expect("subscription open");
    assert_eq!(&m.payload[..], b"hello");
    assert_eq!(m.subject.as_str(), "dev.x");
    // The user's permissions apply: a publish outside dev.> is refused
    // (and so never delivered).
    let mut all = client.subscribe(">").await.unwrap();
    client.publish("other", "no".into()).await.unwrap();
    client.publish("dev.y", "yes".into()).await.unwrap();
    let m = tokio::time::timeout(WAIT, all.next())
        .await
        .expect("message delivered in time")
        .expect("subscription open");
    assert_eq!(m.subject.as_str(), "dev.y", "'other' was not allowed");

    // Another key, and no credentials at all, are refused.
    let wrong = random_seed();
    let err = async_nats::connect(&url).await;
    assert!(err.is_err(), "no credentials must not log in");
    let err = async_nats::ConnectOptions::with_nkey(wrong.encode())
        .connect(&url)
        .await
        .expect_err("a wrong seed is refused");
    assert!(
        err.to_string().to_lowercase().contains("authorization"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_signs_the_hub_nonce_with_its_nkey_seed() {
    let seed = random_seed();
    let hub = NatsServer::start_with_nkey_user(&seed.public_key(), &seed.encode()).await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    // The hub really requires the nkey.
    assert!(
        async_nats::connect(hub.url()).await.is_err(),
        "the hub must refuse clients without the nkey"
    );
    let frond = Frond::start_new(FrondSpec {
        uplink_extra: format!("nkey_seed = \"{}\"\n", seed.encode()),
        ..FrondSpec::with_hub(hub.url())
    })
    .await;
    publish_range(frond.mqtt_port, "dev1", "telemetry/t1", "msg", 0..50).await;
    hub.wait_count_at_least("FLEET", 50, LONG).await;
    let msgs = hub.read_all("FLEET").await;
    assert_eq!(msgs.len(), 50);
    let want: Vec<String> = (0..50).map(|i| payload("msg", i)).collect();
    let got: Vec<String> = msgs.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(got, want);
    assert!(
        !frond.log_text().contains("Authorization"),
        "{}",
        frond.log_text()
    );
}
