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

/// frond's messages in the hub stream `FLEET`, by local sequence, in hub
/// order (other nodes' messages left out).
fn ours(msgs: &[HubMsg]) -> Vec<(u64, String)> {
    msgs.iter()
        .filter_map(|m| {
            let seq = msg_id_seq(m.msg_id.as_deref()?, "truck1", "TELEMETRY")?;
            Some((seq, m.payload.clone()))
        })
        .collect()
}

/// The hub stream is deleted and recreated while frond is connected and
/// idle. frond publishes 10 more messages into the new stream (the hub
/// stores them; the proxy holds their acks back) and is stopped: its
/// cursor record says "50 on the hub", in the old stream. Another
/// publisher grows the new stream past the cursor, and the duplicate
/// window (1 s) passes. frond starts again with 5 more local messages.
/// Its first resync knows the old stream's `created` from the cursor
/// record, sees another one and scans the new stream from its first
/// message: it finds 51..60 there, so the new stream holds 51..65 once
/// each, in order. (Before the record kept `created`, the scan started
/// after the old stream's sequence 50 and 51..60 were stored twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_stream_recreated_and_grown_past_the_cursor_while_frond_is_stopped_holds_each_message_once(
) {
    let window = Duration::from_secs(1);
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], window).await;
    let proxy = FaultProxy::start(hub.port).await;
    let mut spec = FrondSpec::with_hub(proxy.url());
    // No PINGs during the test (their PONGs would pass the proxy first,
    // see below); a live import to push one message down the link.
    spec.uplink_extra =
        "ping_interval = \"10m\"\n[[uplink.import]]\nsubjects = [\"probe.>\"]\n".into();
    let mut frond = Frond::start_new(spec).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "msg");
    publ.publish(0..50, LONG).await;
    hub.wait_count_at_least("FLEET", 50, LONG).await;
    let cursor = |v: &serde_json::Value| v["uplink"]["mirrors"][0]["cursor"].as_u64();
    wait_until("frond's cursor reaches 50", LONG, || async {
        frond.varz().await.is_some_and(|v| cursor(&v) == Some(50))
    })
    .await;

    let js = hub.jetstream().await;
    js.delete_stream("FLEET")
        .await
        .expect("delete the hub stream");
    hub.create_stream("FLEET", &["fleet.>"], window).await;
    // Hold every hub→frond byte from now on. The proxy reads the delay
    // before it waits for the next chunk, so the chunk it waits for now
    // passes: a probe message, once it reached frond, is that chunk.
    proxy.set_throttle(None, Some(Duration::from_secs(3600)));
    let local = connect_nats(&frond).await;
    let mut probe = local.subscribe("probe.>").await.expect("subscribe");
    local.flush().await.expect("flush");
    let on_hub = hub.client().await;
    let deadline = Instant::now() + LONG;
    loop {
        on_hub
            .publish("probe.x", "p".into())
            .await
            .expect("publish");
        on_hub.flush().await.expect("flush");
        let next = smol::stream::StreamExt::next(&mut probe);
        if tokio::time::timeout(Duration::from_millis(200), next)
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "no probe crossed the link");
    }
    publ.publish(50..60, LONG).await;
    hub.wait_count_at_least("FLEET", 10, LONG).await;
    frond.terminate();
    let stored_at = Instant::now();
    let other: Vec<String> = (0..100).map(|i| payload("other", i)).collect();
    hub.js_publish("fleet.truck2.telemetry.t1", &other).await;
    // Outlive the duplicate window of 51..60.
    wait_elapsed(stored_at, window + Duration::from_millis(500)).await;
    proxy.set_throttle(None, None);

    frond.start().await;
    let publ = Publisher::new(frond.mqtt_port, "dev2", TOPIC, "msg");
    publ.publish(60..65, LONG).await;
    let status = wait_for("frond's mirror is drained", LONG, || async {
        let v = frond.varz().await?;
        let m = v["uplink"]["mirrors"][0].clone();
        (m["cursor"] == 65 && m["inflight"] == 0).then_some(m)
    })
    .await;
    let msgs = hub.read_all("FLEET").await;
    let want: Vec<(u64, String)> = (51..=65)
        .map(|s| (s, payload("msg", s as usize - 1)))
        .collect();
    assert_eq!(
        ours(&msgs),
        want,
        "frond's messages in the new stream: once each, in order"
    );
    assert_eq!(msgs.len(), 115, "10 + 100 others + 5");
    assert_eq!(status["recreated"], 1, "{status}");
    assert!(
        frond.log_text().contains("was recreated"),
        "the warning is logged"
    );
}
