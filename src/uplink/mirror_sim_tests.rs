//! Scripted ordered-mode cases on the simulated hub of
//! `mirror_sim.rs` (its child module: same harness, fixed schedules).

use std::collections::VecDeque;

use super::*;

fn batch_sizes(s: &Sim) -> Vec<(Option<String>, bool, bool)> {
    s.to_hub
        .iter()
        .filter_map(|c| match c {
            Command::Publish { reply, headers, .. } => {
                let h = hdr(headers);
                Some((
                    h.get("Nats-Batch-Sequence").map(str::to_string),
                    h.get("Nats-Batch-Commit").is_some(),
                    !reply.is_empty(),
                ))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn ordered_mode_sends_one_atomic_batch_at_a_time_and_adapts_its_size() {
    let mut s = ordered_sim(8, 30);
    s.connect();
    quiet(&mut s, true);
    // One batch of 8: sequences 1..=8, the commit (and the only reply
    // subject) on the last; nothing more while it is unanswered.
    let sent = batch_sizes(&s);
    assert_eq!(sent.len(), 8, "{sent:?}");
    for (i, (seq, commit, reply)) in sent.iter().enumerate() {
        assert_eq!(seq.as_deref(), Some((i + 1).to_string().as_str()));
        assert_eq!((*commit, *reply), (i == 7, i == 7));
    }
    // The leader dies with half of it staged: the rest reaches the new
    // leader, which refuses the commit (incomplete).
    for _ in 0..4 {
        s.hub_step();
    }
    s.hub.kill_leader(&mut s.rng);
    s.hub.staging.clear();
    s.hub.elect(s.t, &mut s.rng, &mut s.to_client);
    quiet(&mut s, false);
    assert!(s.hub.stored.is_empty());
    assert_eq!(s.m.batch_cap, 4, "halved after an incomplete batch");
    // After the backoff and a resync the next batch has 4 messages; each
    // stored batch doubles the size back.
    s.t += 1_000;
    let now = s.now();
    s.m.handle_tick(now);
    s.drain();
    quiet(&mut s, true);
    assert_eq!(batch_sizes(&s).len(), 4);
    s.settle();
    assert_eq!(s.hub.ours(&s.local), (1..=30).collect::<Vec<u64>>());
    assert!(s.m.batch_cap >= 8, "grown back: {}", s.m.batch_cap);
    // A lone message leaves as a plain publish.
    s.push_local(31..=31);
    let now = s.now();
    s.m.handle_local_state(31);
    s.m.handle_tick(now);
    s.drain();
    quiet(&mut s, true);
    assert_eq!(batch_sizes(&s), vec![(None, false, true)]);
}

/// A hub stream that allows direct gets to a user who may not send them
/// (nats-server answers only `-ERR`): the resync times out once, then
/// reads with `MSG.GET` on this connection and drains.
#[test]
fn unanswered_direct_gets_fall_back_to_msg_get() {
    let mut s = ordered_sim(8, 20);
    s.hub.direct = true;
    s.hub.direct_silent = true;
    s.connect();
    s.settle();
    assert_eq!(s.hub.ours(&s.local), (1..=20).collect::<Vec<u64>>());
    assert!(s.m.direct_failed);
}

/// The ids of a batch: the first message's own, none in the middle, and
/// on the commit the batch's (range and tag). A batch whose outcome is
/// unknown (the link died with it in flight) is sent again with the same
/// range, so its ids are the ones the hub's duplicate window may hold,
/// even when more local messages arrived meanwhile.
#[test]
fn an_unresolved_batch_is_resent_with_the_same_range_and_ids() {
    let mut s = ordered_sim(8, 5);
    s.connect();
    quiet(&mut s, true);
    let ids = |s: &Sim| -> Vec<Option<String>> {
        let hs = s.wire_headers();
        hs.iter()
            .map(|h| h.get("Nats-Msg-Id").map(str::to_string))
            .collect()
    };
    let first = ids(&s);
    assert_eq!(first.len(), 5, "{first:?}");
    assert!(first[0].as_deref().unwrap().starts_with("n1:S:1:"));
    assert!(first[1..4].iter().all(Option::is_none), "{first:?}");
    assert!(first[4].as_deref().unwrap().starts_with("n1:S:1-5:"));
    // The link dies with the batch on the wire; three more messages.
    s.to_hub.clear();
    s.connected = false;
    s.m.handle_disconnected();
    s.push_local(6..=8);
    s.m.handle_local_state(8);
    s.connect();
    quiet(&mut s, true);
    assert_eq!(ids(&s), first, "the same range, the same ids");
    s.settle();
    assert_eq!(s.hub.ours(&s.local), (1..=8).collect::<Vec<u64>>());
}

fn msg(seq: u64, subject: &str) -> StoredMessage {
    StoredMessage {
        seq,
        timestamp: seq,
        subject: subject.into(),
        headers: None,
        payload: format!("p{seq}").into_bytes(),
    }
}

/// Sends one batch of `s.local`; the hub takes it into its log (stored
/// later, with `commit`) and the link dies before the ack.
fn batch_then_link_dies(s: &mut Sim) {
    s.connect();
    quiet(s, true);
    while s.hub_step() {}
    s.to_client.clear();
    s.connected = false;
    s.m.handle_disconnected();
    s.drain();
}

/// A hub stream with `max_msgs_per_subject: 1` deletes message 1 of a
/// stored batch (message 2 has its subject); the ack is lost. A commit id
/// cannot be checked without its whole batch, so on such a stream every
/// message of a batch carries its own id and the resync finds the
/// survivors: none is stored twice.
#[test]
fn a_hub_limit_that_splits_a_stored_batch_does_not_make_duplicates() {
    let mut s = ordered_sim(8, 0);
    s.hub.window = 60_000;
    s.hub.per_subject = 1;
    for (seq, subject) in [(1, "a"), (2, "a"), (3, "b"), (4, "c")] {
        s.local.push(msg(seq, subject));
    }
    s.m.handle_local_state(4);
    // The first resync read the stream config: own ids in batches.
    batch_then_link_dies(&mut s);
    let n = s.hub.log.len();
    s.hub.commit(n, s.t, &mut VecDeque::new());
    s.settle();
    // Message 1 was deleted by the hub; frond cannot tell it from lost
    // and sends it again after the window (which deletes message 2).
    assert_eq!(s.hub.ours(&s.local), vec![3, 4, 1]);
}

/// A batch whose ack was lost is stored late (after the resync); its
/// first message was deleted locally meanwhile, so the range cannot be
/// sent again with the same ids: frond waits out the duplicate window,
/// resyncs, finds the batch and sends nothing twice.
#[test]
fn an_unrepeatable_pinned_batch_waits_out_the_duplicate_window() {
    for deleted in [1, 5] {
        let mut s = ordered_sim(8, 5);
        s.hub.window = 2_000;
        batch_then_link_dies(&mut s);
        s.local.retain(|m| m.seq != deleted);
        s.connect();
        quiet(&mut s, false);
        let sent = s
            .to_hub
            .iter()
            .filter(
                |c| matches!(c, Command::Publish { subject, .. } if !subject.starts_with("$JS.")),
            )
            .count();
        assert_eq!(sent, 0, "deleted {deleted}: nothing sent within the window");
        // The original is stored late.
        let n = s.hub.log.len();
        s.hub.commit(n, s.t, &mut VecDeque::new());
        s.settle();
        assert_eq!(
            s.hub.ours(&s.local),
            vec![1, 2, 3, 4, 5],
            "deleted {deleted}"
        );
    }
}

/// A lone message whose own id a forgery occupies leaves with the id of
/// a batch of one (`<1>-<1>`); the link dies with it unanswered. The next
/// resync starts after the forgery, so it no longer sees that id
/// occupied: the resend still carries `<1>-<1>`, the id the duplicate
/// window may hold, and the original, stored late, is not stored twice
/// (simulation seed 24243 of 200,000: the resend carried the message's
/// own id and was stored again).
#[test]
fn a_pinned_resend_carries_the_ids_of_the_first_send() {
    let mut s = ordered_sim(8, 1);
    s.hub.window = 60_000;
    // The genuine id of message 1 (seen in flight) on other content.
    let forged = Some(super::super::tests::genuine(1, b"x"));
    s.hub
        .stored
        .push((format!("{PREFIX}forged"), forged, 0, vec![]));
    s.m.handle_local_state(1);
    let ids = |s: &Sim| -> Vec<Option<String>> {
        let hs = s.wire_headers();
        hs.iter()
            .map(|h| h.get("Nats-Msg-Id").map(str::to_string))
            .collect()
    };
    s.connect();
    quiet(&mut s, true);
    let first = ids(&s);
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(
        first[0].as_deref().unwrap().starts_with("n1:S:1-1:"),
        "{first:?}"
    );
    // Proposed, not yet stored, when the link dies.
    while s.hub_step() {}
    s.to_client.clear();
    s.connected = false;
    s.m.handle_disconnected();
    s.drain();
    s.connect();
    quiet(&mut s, true);
    assert_eq!(ids(&s), first, "the same id again");
    let n = s.hub.log.len();
    s.hub.commit(n, s.t, &mut VecDeque::new());
    s.settle();
    assert_eq!(s.hub.ours(&s.local), vec![1]);
}

/// frond stores 1..=3, the hub stream is recreated, frond sends 4 into the
/// new stream and dies before the hub stores it; its cursor record lags
/// (local 0, the old stream). The next process sends 1..=3 again (they
/// were acknowledged by the deleted stream only) but one message at a
/// time until its first acknowledgement, then scans the new stream from
/// its start once more: the predecessor's 4, stored late, is found and
/// not sent again (simulation seed 27595 of 200,000: the new process's
/// first batch, 1..=4, carried no id of 4 and stored it a second time).
#[test]
fn a_predecessor_s_send_stored_late_is_found_not_sent_again() {
    let mut s = ordered_sim(8, 3);
    s.hub.window = 60_000;
    s.connect();
    s.settle();
    s.hub.recreate();
    let cut = |s: &mut Sim| {
        s.to_client.clear();
        s.connected = false;
        s.m.handle_disconnected();
        s.drain();
    };
    cut(&mut s);
    s.connect();
    quiet(&mut s, false);
    s.push_local(4..=4);
    s.m.handle_local_state(4);
    let now = s.now();
    s.m.handle_tick(now);
    s.drain();
    quiet(&mut s, true);
    assert_eq!(s.wire_headers().len(), 1, "4 on the wire");
    while s.hub_step() {}
    assert!(s.hub.stored.is_empty(), "4 proposed, not yet stored");
    cut(&mut s);
    let record = Cursor {
        local_seq: 0,
        hub_seq: 0,
        created: Some("T0".into()),
    };
    s.m = Mirror::new(s.m.params().clone(), Some(record));
    s.connect();
    quiet(&mut s, true);
    let sent = s.wire_headers();
    assert_eq!(sent.len(), 1, "one message until the first ack: {sent:?}");
    let n = s.hub.log.len();
    s.hub.commit(n, s.t, &mut VecDeque::new());
    s.settle();
    let mut ours = s.hub.ours(&s.local);
    ours.sort_unstable();
    assert_eq!(ours, vec![1, 2, 3, 4], "each once in the new stream");
}
