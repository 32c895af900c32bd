//! Owner-thread tests: group commit, durability of acks across a simulated
//! power cut, sync policies, failures, close. Nothing here is timed; waits
//! are on events (`wait_for`) or on acks.

use super::*;
use crate::store::MemBackend;
use smol::future::{block_on, poll_once};

fn cfg(sync: SyncPolicy) -> StreamConfig {
    StreamConfig {
        storage: Storage::Memory,
        sync,
        ..StreamConfig::new("t", &["t.>"])
    }
}

fn msg(i: u64) -> Message {
    Message {
        subject: format!("t.{i}"),
        headers: None,
        payload: format!("p{i}").into_bytes(),
    }
}

fn open_mem(b: &MemBackend, c: StreamConfig) -> StreamHandle {
    open_with_backend(Box::new(b.clone()), c, None).unwrap().0
}

#[test]
fn group_commit_shares_fsyncs_and_acks_survive_a_crash() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Always));
    const N: u64 = 100;
    let gate = b.hold_syncs();
    let mut futs: Vec<_> = (0..N).map(|i| Box::pin(h.publish(msg(i)))).collect();
    // One poll each: every publish is queued behind the held fsync.
    for f in futs.iter_mut() {
        assert!(block_on(poll_once(f)).is_none());
    }
    assert_eq!(h.state().last_seq, 0, "nothing visible before the fsync");
    drop(gate);
    let acks: Vec<_> = futs.into_iter().map(|f| block_on(f).unwrap()).collect();
    assert!(acks
        .iter()
        .enumerate()
        .all(|(i, a)| a.seq == i as u64 + 1 && !a.duplicate));
    let syncs = b.sync_count();
    assert!(syncs <= 2, "{syncs} fsyncs for {N} messages");
    assert_eq!(h.state().last_seq, N);
    assert_eq!(h.state().msgs, N);
    // Power cut right now: every acknowledged message is on "disk".
    let img = b.crash_image();
    let (h2, rep) = open_with_backend(Box::new(img), cfg(SyncPolicy::Always), None).unwrap();
    assert_eq!(rep.records, N);
    assert_eq!(rep.truncated_bytes, 0);
    let got = block_on(h2.read(1, usize::MAX, usize::MAX)).unwrap();
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, m)| m.payload == msg(i as u64).payload));
    assert_eq!(got.len() as u64, N);
}

#[test]
fn concurrent_async_publishers_get_ordered_acks() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Always));
    let ex = smol::LocalExecutor::new();
    let tasks: Vec<_> = (0..8u64)
        .map(|p| {
            let h = h.clone();
            ex.spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..25 {
                    let a = h.publish(msg(p * 100 + i)).await.unwrap();
                    // Acked means visible.
                    assert!(h.state().last_seq >= a.seq);
                    seqs.push(a.seq);
                }
                seqs
            })
        })
        .collect();
    let all: Vec<Vec<u64>> = block_on(ex.run(async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await);
        }
        out
    }));
    for seqs in &all {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "each publisher's acks in order"
        );
    }
    let mut flat: Vec<u64> = all.concat();
    flat.sort_unstable();
    assert_eq!(flat, (1..=200).collect::<Vec<_>>());
    let s = h.state();
    assert_eq!((s.first_seq, s.last_seq, s.msgs), (1, 200, 200));
    let got = block_on(h.read(1, 1000, usize::MAX)).unwrap();
    assert_eq!(got.len(), 200);
    assert_eq!(
        s.bytes,
        b.clone().disk_usage().unwrap() - 28 - "limits".len() as u64,
        "bytes = records without the segment header and the retention file"
    );
    assert!(b.sync_count() <= 200);
    block_on(h.close());
}

#[test]
fn enospc_fails_the_batch_then_recovers() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Always));
    block_on(h.publish(msg(1))).unwrap();
    b.set_space_limit(Some(b.clone().disk_usage().unwrap() + 5));
    let err = block_on(h.publish(msg(2))).unwrap_err();
    assert!(
        matches!(&err, StreamError::Io(e) if e.to_string().contains("not stored")),
        "{err}"
    );
    assert_eq!(h.state().last_seq, 1);
    b.set_space_limit(None);
    assert_eq!(block_on(h.publish(msg(3))).unwrap().seq, 2);
    let got = block_on(h.read(1, 10, usize::MAX)).unwrap();
    assert_eq!(
        got.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(),
        [b"p1".to_vec(), b"p3".to_vec()]
    );
    // Failed fsync: same rule.
    b.set_fail_sync(true);
    assert!(matches!(
        block_on(h.publish(msg(4))),
        Err(StreamError::Io(_))
    ));
    b.set_fail_sync(false);
    assert_eq!(block_on(h.publish(msg(5))).unwrap().seq, 3);
    block_on(h.close());
    let (h2, rep) =
        open_with_backend(Box::new(b.crash_image()), cfg(SyncPolicy::Always), None).unwrap();
    assert_eq!(rep.records, 3);
    assert_eq!(rep.truncated_bytes, 0);
    assert_eq!(h2.state().last_seq, 3);
}

#[test]
fn interval_policy_acks_early_but_shows_only_synced() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Interval(Duration::from_millis(5))));
    for i in 0..5 {
        assert_eq!(block_on(h.publish(msg(i))).unwrap().seq, i + 1);
    }
    // The owner's timer makes them durable without any further command.
    block_on(h.wait_for(5));
    assert!(b.sync_count() >= 1);
    assert_eq!(
        b.crash_image().file(&crate::store::segment_name(1)),
        b.file(&crate::store::segment_name(1))
    );
    assert_eq!(block_on(h.read(1, 10, usize::MAX)).unwrap().len(), 5);
}

#[test]
fn never_policy_syncs_only_at_close() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Never));
    for i in 0..5 {
        block_on(h.publish(msg(i))).unwrap();
    }
    assert_eq!(h.state().last_seq, 5);
    assert_eq!(b.sync_count(), 0);
    block_on(h.close());
    assert!(b.sync_count() >= 1);
}

#[test]
fn limits_dedup_and_errors_through_the_handle() {
    let b = MemBackend::new();
    let mut c = cfg(SyncPolicy::Always);
    c.max_msgs = 3;
    c.discard = Discard::New;
    c.max_msg_size = 50;
    let h = open_mem(&b, c);
    let with_id = Message {
        subject: "t.x".into(),
        headers: Some(b"NATS/1.0\r\nNats-Msg-Id: abc\r\n\r\n".to_vec()),
        payload: b"x".to_vec(),
    };
    assert_eq!(
        block_on(h.publish(with_id.clone())).unwrap(),
        PubAck {
            seq: 1,
            duplicate: false
        }
    );
    assert_eq!(
        block_on(h.publish(with_id)).unwrap(),
        PubAck {
            seq: 1,
            duplicate: true
        }
    );
    block_on(h.publish(msg(2))).unwrap();
    block_on(h.publish(msg(3))).unwrap();
    assert!(matches!(
        block_on(h.publish(msg(4))),
        Err(StreamError::Full(_))
    ));
    let big = Message {
        subject: "t".into(),
        headers: None,
        payload: vec![0; 51],
    };
    assert!(matches!(
        block_on(h.publish(big)),
        Err(StreamError::TooLarge { size: 51, max: 50 })
    ));
    assert_eq!(h.state().msgs, 3);
}

#[test]
fn max_age_timer_expires_while_idle() {
    let b = MemBackend::new();
    let mut c = cfg(SyncPolicy::Always);
    c.max_age = Duration::from_millis(20);
    let h = open_mem(&b, c);
    for i in 0..3 {
        block_on(h.publish(msg(i))).unwrap();
    }
    // Wait (on events, not a sleep) until the timer empties the stream.
    block_on(async {
        loop {
            let l = h.inner.shared.changed.listen();
            if h.state().msgs == 0 {
                break;
            }
            l.await;
        }
    });
    assert_eq!(h.state().first_seq, 4);
    assert!(block_on(h.read(1, 10, usize::MAX)).unwrap().is_empty());
}

#[test]
fn close_is_idempotent_and_later_calls_fail() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Always));
    let h2 = h.clone();
    block_on(h.publish(msg(1))).unwrap();
    block_on(h.close());
    block_on(h2.close());
    assert!(matches!(
        block_on(h2.publish(msg(2))),
        Err(StreamError::Closed)
    ));
    assert!(matches!(
        block_on(h2.read(1, 1, 1)),
        Err(StreamError::Closed)
    ));
    block_on(h2.wait_for(100)); // returns: closed
    assert!(b.names().contains(&"meta".to_string()));
}

#[test]
fn dropping_all_handles_stops_and_syncs() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Never));
    block_on(h.publish(msg(1))).unwrap();
    let h2 = h.clone();
    drop(h);
    assert!(
        !b.names().contains(&"meta".to_string()),
        "one handle still alive"
    );
    drop(h2);
    assert!(b.names().contains(&"meta".to_string()));
    let (h3, rep) =
        open_with_backend(Box::new(b.crash_image()), cfg(SyncPolicy::Never), None).unwrap();
    assert_eq!(rep.records, 1);
    assert_eq!(h3.state().last_seq, 1);
}

#[test]
fn file_storage_open_publish_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(SyncPolicy::Always);
    c.storage = Storage::File;
    let (h, rep) = open(dir.path(), c.clone()).unwrap();
    assert_eq!(rep, RecoveryReport::default());
    for i in 0..10 {
        block_on(h.publish(msg(i))).unwrap();
    }
    assert!(block_on(h.disk_usage()).unwrap() > 0);
    block_on(h.close());
    let (h, rep) = open(dir.path(), c).unwrap();
    assert_eq!(rep.records, 10);
    assert_eq!(h.state().last_seq, 10);
    let got = block_on(h.read(3, 2, usize::MAX)).unwrap();
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4]);
}

#[test]
fn retention_changes_follow_jetstream_rules_across_opens() {
    let dir = tempfile::tempdir().unwrap();
    let with = |r: Retention| StreamConfig {
        retention: r,
        ..StreamConfig::new("t", &["t.>"])
    };
    let reopen = |r: Retention| match open(dir.path(), with(r)) {
        Ok((h, _)) => {
            block_on(h.close());
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    };
    // limits <-> interest is allowed.
    reopen(Retention::Limits).unwrap();
    reopen(Retention::Interest).unwrap();
    reopen(Retention::Limits).unwrap();
    // to workqueue is refused, naming the stream and both policies.
    let e = reopen(Retention::WorkQueue).unwrap_err();
    assert!(
        e.contains("stream t") && e.contains("\"limits\" to \"workqueue\""),
        "{e}"
    );
    // A new stream may be a workqueue, and then it stays one.
    let dir2 = tempfile::tempdir().unwrap();
    let (h, _) = open(dir2.path(), with(Retention::WorkQueue)).unwrap();
    block_on(h.close());
    let e = open(dir2.path(), with(Retention::Interest)).err().unwrap();
    assert!(e.to_string().contains("from \"workqueue\""), "{e}");
}

#[test]
fn handle_operations_delete_purge_get_info_ack() {
    let b = MemBackend::new();
    let mut c = cfg(SyncPolicy::Always);
    c.max_msgs_per_subject = 3;
    c.retention = Retention::WorkQueue;
    let h = open_mem(&b, c.clone());
    block_on(async {
        for i in 0..10 {
            h.publish(msg(i % 4)).await.unwrap();
        }
        let counts = h.subject_counts("t.*").await.unwrap();
        assert_eq!(counts.iter().map(|c| c.1).sum::<u64>(), 10);
        assert!(h.delete(1, true).await.unwrap());
        assert!(!h.delete(1, false).await.unwrap());
        assert_eq!(h.get(2).await.unwrap().unwrap().subject, "t.1");
        assert!(h.get(1).await.unwrap().is_none());
        assert_eq!(h.last_by_subject("t.1").await.unwrap().unwrap().seq, 10);
        assert_eq!(h.next_by_subject("t.1", 3).await.unwrap().unwrap().seq, 6);
        assert!(h.ack(2).await.unwrap());
        let n = h
            .purge(PurgeRequest {
                subject: Some("t.3".into()),
                ..PurgeRequest::default()
            })
            .await
            .unwrap();
        assert_eq!(n, 2);
        let info = h.info().await.unwrap();
        assert_eq!((info.msgs, info.first_seq, info.last_seq), (6, 3, 10));
        assert_eq!(info.deleted, 2);
        assert_eq!(info.subjects, 3);
        assert_eq!(h.state().msgs, 6);
        h.close().await;
    });
    let h = open_mem(&b, c);
    assert_eq!(h.state().msgs, 6, "deletes and purges survive a reopen");
}

#[test]
fn queued_publishes_are_bounded_in_bytes() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Always));
    let big = |i| Message {
        payload: vec![0; 1 << 20],
        ..msg(i)
    };
    let gate = b.hold_syncs();
    let mut futs: Vec<_> = (0..16).map(|i| Box::pin(h.publish(big(i)))).collect();
    for f in futs.iter_mut() {
        assert!(block_on(poll_once(f)).is_none());
    }
    let reserved = h
        .inner
        .shared
        .queued_bytes
        .load(std::sync::atomic::Ordering::Acquire);
    assert!(
        (3 << 20..=QUEUE_BYTES + big(0).size()).contains(&reserved),
        "{reserved} bytes queued"
    );
    drop(gate);
    for f in futs {
        block_on(f).unwrap();
    }
    // Given back after each batch (just after its acks): once a later
    // publish is acknowledged, at most that one is still counted.
    block_on(h.publish(msg(99))).unwrap();
    let left = h
        .inner
        .shared
        .queued_bytes
        .load(std::sync::atomic::Ordering::Acquire);
    assert!(left <= msg(99).size(), "{left} bytes still reserved");
    assert_eq!(h.state().msgs, 17);
}

#[test]
fn per_subject_removals_share_the_append_fsync_and_are_derived_again_after_a_crash() {
    // A KV bucket with history 1: every put removes the key's previous
    // revision.
    let b = MemBackend::new();
    let mut c = cfg(SyncPolicy::Always);
    c.max_msgs_per_subject = 1;
    let h = open_mem(&b, c.clone());
    let put = |i: u64| Message {
        subject: "t.k".into(),
        headers: None,
        payload: format!("v{i}").into_bytes(),
    };
    block_on(h.publish(put(0))).unwrap();
    let before = b.sync_count();
    for i in 1..=10 {
        block_on(h.publish(put(i))).unwrap();
    }
    // One fsync per put (the append); the tombstones wait for a later
    // one (at most one more, should the deferred sync fall in the loop).
    let syncs = b.sync_count() - before;
    assert!(syncs <= 11, "{syncs} fsyncs for 10 puts");
    assert_eq!(h.state().msgs, 1);
    // Power cut now: the tombstones may be lost, the limit removes the
    // old revisions again at open.
    let img = b.crash_image();
    let (h2, _) = open_with_backend(Box::new(img), c.clone(), None).unwrap();
    let got = block_on(h2.read(1, usize::MAX, usize::MAX)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].seq, &got[0].payload[..]), (11, &b"v10"[..]));
    drop(h2);
    // Idle, the owner fsyncs the tombstones within TOMB_SYNC_AFTER: the
    // raw log (no limits applied) then holds only the newest revision.
    let synced = b.sync_count();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while b.sync_count() == synced {
        assert!(
            std::time::Instant::now() < deadline,
            "tombstones never fsynced"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let img = b.crash_image();
    let (log, _) = crate::store::Store::open(Box::new(img), store_options(&c)).unwrap();
    assert_eq!(log.state().msgs, 1);
}

/// Whether `b`'s first segment holds the bytes `what`.
fn holds(b: &MemBackend, what: &[u8]) -> bool {
    b.file(&crate::store::segment_name(1))
        .is_some_and(|f| f.windows(what.len()).any(|w| w == what))
}

/// Poll (bounded) until `b`'s first segment holds `what`.
fn wait_written(b: &MemBackend, what: &[u8]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !holds(b, what) {
        assert!(std::time::Instant::now() < deadline, "never written");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn unacknowledged_publishes_get_no_fsync_of_their_own_and_keep_their_order() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Always));
    const N: u64 = 50;
    let start = std::time::Instant::now();
    for i in 0..N {
        // Each written before the next is queued: one batch each.
        block_on(h.store(msg(i))).unwrap();
        wait_written(&b, &msg(i).payload);
    }
    let syncs = b.sync_count();
    let elapsed = start.elapsed();
    // At most one lazy fsync per LAZY_SYNC_AFTER (and one on its way),
    // where each batch had its own before.
    let lazy = elapsed.as_millis() / LAZY_SYNC_AFTER.as_millis() + 2;
    assert!(
        u128::from(syncs) <= lazy,
        "{syncs} fsyncs for {N} unacknowledged publishes in {elapsed:?}"
    );
    // With nothing else coming, the owner's timer makes them durable.
    block_on(h.wait_for(N));
    // An acknowledged publish is fsynced with every write before it: a
    // power cut right after its ack keeps all of them, in order.
    block_on(h.store(msg(N))).unwrap();
    assert_eq!(block_on(h.publish(msg(N + 1))).unwrap().seq, N + 2);
    let (h2, rep) =
        open_with_backend(Box::new(b.crash_image()), cfg(SyncPolicy::Always), None).unwrap();
    assert_eq!(rep.records, N + 2);
    let got = block_on(h2.read(1, usize::MAX, usize::MAX)).unwrap();
    let want: Vec<_> = (0..N + 2).map(|i| msg(i).payload).collect();
    let got: Vec<_> = got.into_iter().map(|m| m.payload).collect();
    assert_eq!(got, want);
}

#[test]
fn unacknowledged_publishes_are_visible_only_once_fsynced() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Always));
    let seg = crate::store::segment_name(1);
    let gate = b.hold_syncs();
    let mut futs: Vec<_> = (0..10).map(|i| Box::pin(h.store(msg(i)))).collect();
    for f in futs.iter_mut() {
        assert!(block_on(poll_once(f)).is_some(), "queued at once");
    }
    wait_written(&b, b"p9");
    // Written, not fsynced: no reader sees them yet.
    assert_eq!(h.state().last_seq, 0);
    assert!(!holds(&b.crash_image(), b"p9"));
    drop(gate);
    block_on(h.wait_for(10));
    assert_eq!(block_on(h.read(1, 20, usize::MAX)).unwrap().len(), 10);
    assert_eq!(b.crash_image().file(&seg), b.file(&seg));
}

#[test]
fn an_acknowledged_duplicate_makes_its_unacknowledged_original_durable() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Always));
    let with_id = || Message {
        headers: Some(b"NATS/1.0\r\nNats-Msg-Id: a\r\n\r\n".to_vec()),
        ..msg(0)
    };
    block_on(h.store(with_id())).unwrap();
    wait_written(&b, b"p0");
    // Its PubAck names the stored original (not fsynced yet, unless the
    // lazy fsync came first): that one must be on disk.
    let ack = block_on(h.publish(with_id())).unwrap();
    assert_eq!((ack.seq, ack.duplicate), (1, true));
    let (_, rep) =
        open_with_backend(Box::new(b.crash_image()), cfg(SyncPolicy::Always), None).unwrap();
    assert_eq!(rep.records, 1);
}

/// Payloads of every message a power cut right now leaves, and how many
/// bytes recovery cut.
fn after_power_cut(b: &MemBackend) -> (Vec<Vec<u8>>, u64) {
    let (h, rep) =
        open_with_backend(Box::new(b.crash_image()), cfg(SyncPolicy::Always), None).unwrap();
    let got = block_on(h.read(1, usize::MAX, usize::MAX)).unwrap();
    (
        got.into_iter().map(|m| m.payload).collect(),
        rep.truncated_bytes,
    )
}

#[test]
fn a_failed_fsync_drops_earlier_unacknowledged_writes_so_later_acks_survive() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Always));
    assert_eq!(block_on(h.publish(msg(0))).unwrap().seq, 1);
    // The disk fails as Linux may: the failed fsync loses the pages it
    // could not write and a later fsync succeeds without them.
    b.set_fail_sync_losing(true);
    block_on(h.store(msg(1))).unwrap();
    wait_written(&b, b"p1");
    // The acknowledged publish that sees the failure is rejected.
    let err = block_on(h.publish(msg(2))).unwrap_err();
    assert!(matches!(&err, StreamError::Io(_)), "{err}");
    b.set_fail_sync_losing(false);
    let ack = block_on(h.publish(msg(3))).unwrap();
    // A power cut now keeps every acknowledged message (without the
    // rollback the lost p1 reads as zeros and recovery cuts p3 with it).
    let want = [msg(0).payload, msg(3).payload];
    assert_eq!(after_power_cut(&b), (want.to_vec(), 0));
    // p1 was never acknowledged: dropped (counted), its sequence reused.
    assert_eq!(ack.seq, 2);
    assert_eq!(h.unstored(), 1);
    let got = block_on(h.read(1, 10, usize::MAX)).unwrap();
    assert_eq!(got.into_iter().map(|m| m.payload).collect::<Vec<_>>(), want);
}

#[test]
fn a_failed_lazy_fsync_drops_the_unacknowledged_writes() {
    let b = MemBackend::new();
    let h = open_mem(&b, cfg(SyncPolicy::Always));
    block_on(h.publish(msg(0))).unwrap();
    b.set_fail_sync_losing(true);
    block_on(h.store(msg(1))).unwrap();
    block_on(h.store(msg(2))).unwrap();
    // The owner's own fsync (LAZY_SYNC_AFTER later) fails: both dropped.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while h.unstored() < 2 {
        assert!(std::time::Instant::now() < deadline, "never dropped");
        std::thread::sleep(Duration::from_millis(1));
    }
    b.set_fail_sync_losing(false);
    assert_eq!(h.unstored(), 2);
    assert_eq!(block_on(h.publish(msg(3))).unwrap().seq, 2);
    let want = vec![msg(0).payload, msg(3).payload];
    assert_eq!(after_power_cut(&b), (want, 0));
    assert_eq!(h.state().last_seq, 2);
}

#[test]
fn refused_unacknowledged_publishes_are_counted() {
    let b = MemBackend::new();
    let mut c = cfg(SyncPolicy::Always);
    c.max_msgs = 1;
    c.discard = Discard::New;
    let h = open_mem(&b, c);
    block_on(h.publish(msg(0))).unwrap();
    block_on(h.store(msg(1))).unwrap();
    block_on(h.store(msg(2))).unwrap();
    // Handled in order: once info answers, both stores were refused.
    block_on(h.info()).unwrap();
    assert_eq!(h.unstored(), 2);
    assert_eq!(h.state().msgs, 1);
}
