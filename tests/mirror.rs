//! Exactly-once mirroring of a local stream into a hub stream (contract 2):
//! with the hub up, across hub restarts and link cuts, and across outages
//! longer than the hub stream's duplicate window.

mod common;

use std::time::{Duration, Instant};

use common::*;

const TOPIC: &str = "telemetry/t1";
const SUBJECT: &str = "fleet.truck1.telemetry.t1";

fn payloads(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| payload("msg", i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_10k_with_hub_up() {
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    let frond = Frond::start_new(FrondSpec::with_hub(hub.url())).await;

    // The monitoring endpoint is up and reports the uplink.
    let (code, body) = wait_for("GET /healthz answers", LONG, || async {
        frond.http_get("/healthz").await
    })
    .await;
    assert_eq!(code, 200, "/healthz status");
    assert_eq!(body.trim(), "ok", "/healthz body");
    let varz = wait_for("GET /varz returns JSON", LONG, || async {
        frond.varz().await
    })
    .await;
    assert!(
        varz.get("uplink").is_some(),
        "/varz has an \"uplink\" entry: {varz}"
    );

    publish_range(frond.mqtt_port, "dev1", TOPIC, "msg", 0..10_000).await;
    hub.wait_count_at_least("FLEET", 10_000, LONG).await;
    let msgs = hub.read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads(0..10_000), "truck1", SUBJECT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_survives_hub_restart_and_link_cuts() {
    let mut hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    let proxy = FaultProxy::start(hub.port).await;
    let frond = Frond::start_new(FrondSpec::with_hub(proxy.url())).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "msg");
    let chunk = |k: usize| k * 1000..(k + 1) * 1000;

    // 0: undisturbed.
    publ.publish(chunk(0), LONG).await;
    hub.wait_count_at_least("FLEET", 1000, LONG).await;

    // 1: three cuts while messages flow (or, if frond mirrored the chunk
    // already, of the idle link); frond reconnects after each.
    let cutter = async {
        for _ in 0..3 {
            let base = hub.try_count("FLEET").await.unwrap_or(0);
            wait_until("the hub grows before the next cut", LONG, || async {
                hub.try_count("FLEET")
                    .await
                    .is_some_and(|c| c >= (base + 200).min(2000))
            })
            .await;
            let links = proxy.forwarded();
            proxy.cut();
            wait_until("frond reconnects after the cut", LONG, || {
                let ok = proxy.forwarded() > links;
                async move { ok }
            })
            .await;
        }
    };
    tokio::join!(publ.publish(chunk(1), LONG), cutter);
    hub.wait_count_at_least("FLEET", 2000, LONG).await;

    // 2: hub down while frond stores locally; the hub comes back on the same
    // port with its store.
    hub.stop();
    publ.publish(chunk(2), LONG).await;
    hub.restart().await;
    hub.wait_count_at_least("FLEET", 3000, LONG).await;

    // 3: hub restarted while mirroring is in flight.
    let restarter = async {
        wait_until("the hub receives part of chunk 3", LONG, || async {
            hub.try_count("FLEET").await.is_some_and(|c| c >= 3100)
        })
        .await;
        let links = proxy.forwarded();
        hub.stop();
        hub.restart().await;
        // frond finds the restarted hub by itself (before phase 4 blocks the
        // link, so that this fault is counted below).
        wait_until("frond reconnects to the restarted hub", LONG, || {
            let ok = proxy.forwarded() > links;
            async move { ok }
        })
        .await;
    };
    tokio::join!(publ.publish(chunk(3), LONG), restarter);
    hub.wait_count_at_least("FLEET", 4000, LONG).await;

    // 4: link blocked (connections refused) while publishing; frond keeps
    // retrying; then unblocked.
    proxy.set_blocked(true);
    proxy.cut();
    publ.publish(chunk(4), LONG).await;
    let accepted = proxy.accepted();
    wait_until("frond retries the blocked link", LONG, || {
        let ok = proxy.accepted() >= accepted + 2;
        async move { ok }
    })
    .await;
    assert_eq!(
        hub.count("FLEET").await,
        4000,
        "nothing passes a blocked link"
    );
    proxy.set_blocked(false);
    hub.wait_count_at_least("FLEET", 5000, LONG).await;

    // 5..9: a cut in every chunk, once part of it reached the hub (so the
    // cut hits a live link); the last one while hub acks are slow.
    for k in 5..10 {
        if k == 9 {
            proxy.set_throttle(None, Some(Duration::from_millis(5)));
        }
        let (_, ()) = tokio::join!(publ.publish(chunk(k), LONG), async {
            wait_until(
                format!("part of chunk {k} reaches the hub"),
                LONG,
                || async {
                    hub.try_count("FLEET")
                        .await
                        .is_some_and(|c| c as usize > k * 1000)
                },
            )
            .await;
            proxy.cut();
        });
    }
    proxy.set_throttle(None, None);

    hub.wait_count_at_least("FLEET", 10_000, LONG).await;
    let msgs = hub.read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads(0..10_000), "truck1", SUBJECT);
    // Each of these faults hit a live link, and frond came back after each:
    // the first link, the three cuts of phase 1, the two hub stops, the
    // block, and the five cuts of phases 5..9 (the last reconnect may
    // follow the final ack).
    wait_until(
        "frond reconnected after every fault (12 links)",
        LONG,
        || {
            let ok = proxy.forwarded() >= 12;
            async move { ok }
        },
    )
    .await;
}

/// The hub's duplicate window (1 s here) cannot protect against resends
/// after a longer outage: messages the hub stored but whose acks were lost
/// in a cut are resent more than 1 s later. frond must learn where the hub
/// is before resending. Hub acks are slowed by the proxy so that many
/// messages are stored on the hub but unacknowledged when the link is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_longer_than_duplicate_window() {
    let window = Duration::from_secs(1);
    let outage = Duration::from_millis(1500);
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], window).await;
    let proxy = FaultProxy::start(hub.port).await;
    let frond = Frond::start_new(FrondSpec::with_hub(proxy.url())).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "msg");

    publ.publish(0..500, LONG).await;
    hub.wait_count_at_least("FLEET", 500, LONG).await;

    let batch = 1500;
    let mut base = 500;
    for round in 0..3 {
        // Link down; a batch is acknowledged to the device (stored locally).
        proxy.set_blocked(true);
        proxy.cut();
        let down_at = Instant::now();
        publ.publish(base..base + batch, LONG).await;
        wait_elapsed(down_at, outage).await;
        assert_eq!(
            hub.count("FLEET").await as usize,
            base,
            "round {round}: the hub must hold exactly the earlier rounds (more means duplicates, or data passed a blocked link)"
        );

        // Link up with slow acks; cut once the hub has part of the batch.
        proxy.set_throttle(None, Some(Duration::from_millis(5)));
        proxy.set_blocked(false);
        wait_until(
            format!("round {round}: the hub receives part of the batch"),
            LONG,
            || async {
                hub.try_count("FLEET")
                    .await
                    .is_some_and(|c| c as usize >= base + 300)
            },
        )
        .await;
        proxy.set_blocked(true);
        proxy.cut();
        let cut_at = Instant::now();
        let stored_at_cut = hub.count("FLEET").await as usize;
        // Outlive the duplicate window of everything stored before the cut.
        wait_elapsed(cut_at, outage).await;
        proxy.set_throttle(None, None);
        proxy.set_blocked(false);
        base += batch;
        hub.wait_count_at_least("FLEET", base as u64, LONG).await;
        eprintln!("round {round}: {stored_at_cut} stored on the hub at the cut");
    }

    let msgs = hub.read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads(0..base), "truck1", SUBJECT);
}
