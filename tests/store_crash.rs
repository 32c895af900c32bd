//! The local store under SIGKILL (issue 5): acknowledged means durable.
//!
//! Several QoS 1 devices publish into frond while it is killed with SIGKILL
//! five times and restarted each time. Afterwards frond is stopped cleanly
//! and the stream's files are read offline through frond's own library
//! (`frond::stream::open`), which is the ground truth of what is stored.
//!
//! What must hold (with `sync = "always"`):
//! - every start-up succeeds, and no recovery reports lost records (a torn
//!   tail of unacknowledged writes may be cut; that is not a loss);
//! - every PUBACKed payload is in the stream, under its device's subject,
//!   byte for byte;
//! - nothing else is: every stored message is one of the published
//!   payloads, at most once plus once per resend (QoS 1 is at least once);
//! - sequences are 1..=N without gaps (nothing reused or skipped after a
//!   crash) and, per device, first appearances are in publish order.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use frond::stream::{self, Discard, Retention, Storage, StreamConfig, SyncPolicy};

/// The configuration the offline reader opens the stream with: no limits,
/// so opening it removes nothing.
fn offline_cfg() -> StreamConfig {
    StreamConfig {
        name: "TELEMETRY".into(),
        subjects: vec!["telemetry.>".into()],
        storage: Storage::File,
        sync: SyncPolicy::Always,
        max_msgs: 0,
        max_bytes: 0,
        max_age: Duration::ZERO,
        max_msgs_per_subject: 0,
        max_msg_size: 0,
        discard: Discard::Old,
        discard_new_per_subject: false,
        duplicate_window: Duration::from_secs(120),
        retention: Retention::Limits,
        allow_rollup: false,
        deny_delete: false,
        deny_purge: false,
        allow_msg_ttl: false,
    }
}

/// Parses frond's start-up recovery warning for the stream, if any:
/// `stream TELEMETRY: recovered R records, truncated T bytes ..., L records lost`.
fn lost_records_in(log: &str) -> u64 {
    let mut lost = 0;
    for line in log.lines() {
        if !line.contains("stream TELEMETRY: recovered") {
            continue;
        }
        let Some(head) = line.rsplit(", ").next() else {
            continue;
        };
        let n = head
            .trim()
            .strip_suffix("records lost")
            .map(str::trim)
            .and_then(|s| s.parse::<u64>().ok());
        match n {
            Some(n) => lost += n,
            None => panic!("unparsable recovery line: {line}"),
        }
    }
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_keeps_every_acknowledged_message() {
    let mut frond = Frond::start_new(FrondSpec::default()).await;

    let devices = 4;
    let per_device = 2500;
    let mut pubs = Vec::new();
    let mut tasks = Vec::new();
    for d in 0..devices {
        let mut p = Publisher::new(
            frond.mqtt_port,
            &format!("dev{d}"),
            &format!("telemetry/p{d}"),
            &format!("p{d}"),
        )
        .reconnecting();
        p.inflight = 32;
        pubs.push(p.clone());
        tasks.push(tokio::spawn(
            async move { p.publish(0..per_device, LONG).await },
        ));
    }
    let acked = || {
        pubs.iter()
            .map(|p| p.progress.load(Ordering::SeqCst))
            .sum::<usize>()
    };

    let mut lost = 0;
    let mut kills = 0;
    for at in [800, 2500, 4500, 6500, 8500] {
        wait_until(format!("{at} PUBACKs before a kill"), LONG, || {
            let n = acked();
            async move { n >= at }
        })
        .await;
        frond.kill9();
        kills += 1;
        // Start-up must succeed every time (Frond::start panics otherwise).
        frond.start().await;
        lost += lost_records_in(&frond.current_log());
    }
    assert_eq!(kills, 5);

    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.expect("publisher task"));
    }
    for (d, log) in logs.iter().enumerate() {
        assert_eq!(log.acked.len(), per_device, "dev{d}: all acknowledged");
    }
    assert!(
        logs.iter().map(|l| l.sessions).sum::<usize>() > devices,
        "the kills broke the devices' connections"
    );
    assert_eq!(lost, 0, "recovery reported lost records with sync always");

    frond.terminate();
    let log = frond.log_text();
    assert!(
        !log.contains("records lost") || lost_records_in(&log) == 0,
        "a start-up reported lost records"
    );

    // Read the stream offline.
    let (h, report) = stream::open(&frond.stream_dir("TELEMETRY"), offline_cfg())
        .expect("open the stream offline after a clean stop");
    assert_eq!(report.lost_records, 0, "offline open: {report:?}");
    assert_eq!(report.truncated_bytes, 0, "clean stop leaves no torn tail");
    let mut msgs = Vec::new();
    let mut from = 1;
    loop {
        let batch = h.read(from, 1000, 1 << 20).await.expect("read stream");
        let Some(last) = batch.last() else { break };
        from = last.seq + 1;
        msgs.extend(batch);
    }
    h.close().await;

    // Sequences 1..=N, no gap.
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(
            m.seq,
            i as u64 + 1,
            "stored message {} has seq {}",
            i,
            m.seq
        );
    }

    // No garbage: each message is a known payload under its device subject.
    let mut count: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let mut firsts: Vec<Vec<usize>> = vec![Vec::new(); devices];
    for m in &msgs {
        let text = String::from_utf8(m.payload.clone())
            .unwrap_or_else(|_| panic!("seq {}: payload is not UTF-8", m.seq));
        let (prefix, idx) = text
            .split_once('-')
            .unwrap_or_else(|| panic!("seq {}: unexpected payload {text:?}", m.seq));
        let d: usize = prefix
            .strip_prefix('p')
            .and_then(|s| s.parse().ok())
            .filter(|d| *d < devices)
            .unwrap_or_else(|| panic!("seq {}: unexpected payload {text:?}", m.seq));
        let i: usize = idx
            .parse()
            .ok()
            .filter(|i| *i < per_device)
            .unwrap_or_else(|| panic!("seq {}: unexpected payload {text:?}", m.seq));
        assert_eq!(text, payload(&format!("p{d}"), i), "seq {}", m.seq);
        assert_eq!(m.subject, format!("telemetry.p{d}"), "seq {}", m.seq);
        assert!(m.headers.is_none(), "seq {}: unexpected headers", m.seq);
        let c = count.entry((d, i)).or_insert(0);
        if *c == 0 {
            firsts[d].push(i);
        }
        *c += 1;
    }

    // Every acknowledged payload is there, at most once per publish.
    for (d, log) in logs.iter().enumerate() {
        for &i in &log.acked {
            let n = count.get(&(d, i)).copied().unwrap_or(0);
            let allowed = 1 + log.resent.get(&i).copied().unwrap_or(0);
            assert!(n >= 1, "p{d}-{i:06} was PUBACKed but is not stored");
            assert!(
                n <= allowed,
                "p{d}-{i:06} stored {n} times but published {allowed} times"
            );
        }
        let sorted: Vec<usize> = {
            let mut s = firsts[d].clone();
            s.sort_unstable();
            s
        };
        assert_eq!(firsts[d], sorted, "dev{d}: first appearances out of order");
        let distinct: BTreeSet<usize> = firsts[d].iter().copied().collect();
        assert_eq!(distinct.len(), per_device, "dev{d}: distinct payloads");
    }
    eprintln!(
        "store_crash: {} messages stored for {} published, {kills} SIGKILLs",
        msgs.len(),
        devices * per_device
    );
}
