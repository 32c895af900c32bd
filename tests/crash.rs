//! Crashes are routine (contracts 1, 2 and 6): SIGKILL under load, and a
//! torn tail found and cut off on start.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::time::Duration;

use common::*;

/// Several devices publish while frond is killed with SIGKILL twice.
///
/// What may legally happen: a message can be stored (and mirrored) while its
/// PUBACK never reaches the device; the device then publishes it again after
/// reconnecting, and frond stores it a second time under a new local
/// sequence. That is MQTT QoS 1 (at least once), not a mirror duplicate.
/// So, per payload, the hub may hold it once plus once per resend the
/// publisher made. What must hold:
/// - every payload (all are eventually PUBACKed) is on the hub;
/// - no Nats-Msg-Id appears twice, and the local sequences they carry are
///   exactly 1..=N in hub order: the hub holds the local stream, in order,
///   with no gap (a lost acknowledged record, or a sequence reused after the
///   crash, would show as a gap or a missing payload) and no mirror
///   duplicate;
/// - per device, first appearances are in publish order (MQTT keeps one
///   client's order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream() {
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    let mut frond = Frond::start_new(FrondSpec::with_hub(hub.url())).await;

    let devices = 3;
    let per_device = 3000;
    let (pubs, tasks) = spawn_devices(frond.mqtt_port, devices, per_device);
    let acked = || total_acked(&pubs);

    for (kill, at) in [(1, 1500), (2, 5000)] {
        wait_until(format!("{at} PUBACKs before kill {kill}"), LONG, || {
            let n = acked();
            async move { n >= at }
        })
        .await;
        frond.kill9();
        frond.start().await;
    }

    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.expect("publisher task"));
    }
    for (d, log) in logs.iter().enumerate() {
        assert_eq!(log.acked.len(), per_device, "dev{d}: all acknowledged");
    }
    let total_sessions: usize = logs.iter().map(|l| l.sessions).sum();
    assert!(
        total_sessions > devices,
        "the kills broke the devices' connections"
    );

    // Wait until every payload is on the hub. The mirror is in local order,
    // so then the whole local stream is there.
    let all: BTreeSet<String> = (0..devices)
        .flat_map(|d| (0..per_device).map(move |i| payload(&format!("p{d}"), i)))
        .collect();
    let msgs = wait_for("every payload is on the hub", LONG, || {
        let all = &all;
        let hub = &hub;
        async move {
            let n = hub.try_count("FLEET").await?;
            if (n as usize) < all.len() {
                return None;
            }
            let msgs = hub.read_all("FLEET").await;
            let got: BTreeSet<&str> = msgs.iter().map(|m| m.payload.as_str()).collect();
            all.iter().all(|p| got.contains(p.as_str())).then_some(msgs)
        }
    })
    .await;

    // Nats-Msg-Ids: unique, and local seqs 1..=N in order.
    for (i, m) in msgs.iter().enumerate() {
        let id = m
            .msg_id
            .as_deref()
            .unwrap_or_else(|| panic!("hub seq {} has no Nats-Msg-Id", m.seq));
        let seq = msg_id_seq(id, "truck1", "TELEMETRY").unwrap_or_else(|| {
            panic!(
                "hub seq {}: Nats-Msg-Id {id:?} is not truck1:TELEMETRY:<seq>",
                m.seq
            )
        });
        assert_eq!(
            seq,
            i as u64 + 1,
            "hub message {} carries local seq {seq}",
            i + 1
        );
    }

    // Per payload: at most once plus once per resend.
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &msgs {
        *count.entry(m.payload.as_str()).or_insert(0) += 1;
    }
    for (d, log) in logs.iter().enumerate() {
        let prefix = format!("p{d}");
        for i in 0..per_device {
            let p = payload(&prefix, i);
            let n = count.get(p.as_str()).copied().unwrap_or(0);
            let allowed = 1 + log.resent.get(&i).copied().unwrap_or(0);
            assert!(n >= 1, "{p} was acknowledged but is not on the hub");
            assert!(
                n <= allowed,
                "{p} is on the hub {n} times but was published {allowed} times"
            );
        }
        // First appearances in publish order.
        let mut seen = BTreeSet::new();
        let firsts: Vec<&str> = msgs
            .iter()
            .filter(|m| m.subject == format!("fleet.truck1.telemetry.p{d}"))
            .map(|m| m.payload.as_str())
            .filter(|p| seen.insert(*p))
            .collect();
        let mut sorted = firsts.clone();
        sorted.sort_unstable();
        assert!(
            firsts == sorted,
            "dev{d}: messages reached the hub out of publish order"
        );
        assert_eq!(firsts.len(), per_device);
    }
    let extra = msgs.len() - all.len();
    eprintln!(
        "{} hub messages, {extra} legal QoS 1 re-publications, {total_sessions} sessions",
        msgs.len()
    );
}

/// Garbage after the last record of the last segment (a torn write) is cut
/// off on start and reported; nothing before it is lost, and everything is
/// mirrored exactly once: both the part mirrored before the restart and the
/// part stored while the link was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_recovered_on_start() {
    let hub = NatsServer::start().await;
    hub.create_stream("FLEET", &["fleet.>"], Duration::from_secs(120))
        .await;
    let proxy = FaultProxy::start(hub.port).await;
    let mut frond = Frond::start_new(FrondSpec::with_hub(proxy.url())).await;
    let topic = "telemetry/t1";

    publish_range(frond.mqtt_port, "dev1", topic, "msg", 0..50).await;
    hub.wait_count_at_least("FLEET", 50, LONG).await;
    // Link down: the next 50 are only stored locally.
    proxy.set_blocked(true);
    proxy.cut();
    publish_range(frond.mqtt_port, "dev1", topic, "msg", 50..100).await;
    frond.terminate();

    let seg = frond.last_segment("TELEMETRY");
    let before = std::fs::metadata(&seg).expect("segment metadata").len();
    assert!(before > 0, "the last segment holds the records");
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&seg)
            .expect("open the last segment");
        // A plausible torn record: a length prefix followed by junk.
        let mut junk = vec![0x40, 0x00, 0x00, 0x00];
        junk.extend(std::iter::repeat_n(0xA5u8, 37));
        f.write_all(&junk).expect("append garbage");
        f.sync_all().expect("sync");
    }

    frond.start().await;
    let log = frond.current_log();
    assert!(
        log.contains("truncated"),
        "the start-up log reports the truncated tail; log:\n{log}"
    );

    proxy.set_blocked(false);
    publish_range(frond.mqtt_port, "dev1", topic, "msg", 100..150).await;
    hub.wait_count_at_least("FLEET", 150, LONG).await;
    let msgs = hub.read_all("FLEET").await;
    let want: Vec<String> = (0..150).map(|i| payload("msg", i)).collect();
    assert_exact_mirror(&msgs, &want, "truck1", "fleet.truck1.telemetry.t1");
    frond.terminate();
}
