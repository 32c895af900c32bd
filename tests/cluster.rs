//! The hub link against a 3-node nats-server JetStream cluster with an R3
//! hub stream: frond is given one node's URL, learns the others from
//! `INFO.connect_urls`, and keeps mirroring exactly once, in order, when
//! that node dies and when the stream's leader dies.

mod common;

use std::time::Duration;

use common::*;

const TOPIC: &str = "telemetry/t1";
const SUBJECT: &str = "fleet.truck1.telemetry.t1";

fn payloads(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| payload("msg", i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_discovered_nodes_exactly_once() {
    let mut hub = NatsCluster::start(3).await;
    hub.create_stream("FLEET", &["fleet.>"], 3, Duration::from_secs(120))
        .await;
    // Only node 0 is configured.
    let frond = Frond::start_new(FrondSpec::with_hub(hub.nodes[0].url())).await;
    let publ = Publisher::new(frond.mqtt_port, "dev1", TOPIC, "msg");
    let chunk = |k: usize| k * 1000..(k + 1) * 1000;

    publ.publish(chunk(0), LONG).await;
    hub.wait_count_at_least("FLEET", 1000, LONG).await;

    // The configured node dies: frond must reach the stream through the
    // nodes it was told about.
    hub.nodes[0].kill9();
    publ.publish(chunk(1), LONG).await;
    hub.wait_count_at_least("FLEET", 2000, LONG).await;
    let msgs = hub.live().read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads(0..2000), "truck1", SUBJECT);

    // Node 0 comes back; then the stream's leader dies while frond
    // mirrors.
    hub.nodes[0].restart().await;
    let leader = wait_for("the hub stream has a leader", LONG, || async {
        hub.leader("FLEET").await
    })
    .await;
    let killer = async {
        wait_until("the hub receives part of chunk 2", LONG, || async {
            hub.try_count("FLEET").await.is_some_and(|c| c >= 2100)
        })
        .await;
        hub.nodes[leader].kill9();
    };
    tokio::join!(publ.publish(chunk(2), LONG), killer);
    hub.wait_count_at_least("FLEET", 3000, LONG).await;
    let msgs = hub.live().read_all("FLEET").await;
    assert_exact_mirror(&msgs, &payloads(0..3000), "truck1", SUBJECT);
}
