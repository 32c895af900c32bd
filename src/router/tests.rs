//! Unit tests of the router.

use super::*;
use std::time::Instant;

fn msg(subject: &str, payload: &[u8]) -> Arc<Msg> {
    Arc::new(Msg {
        subject: subject.into(),
        reply: None,
        headers: None,
        payload: payload.to_vec(),
        publisher: None,
    })
}

#[test]
fn mqtt_overlapping_filters_deliver_once_at_highest_qos() {
    let b = Broker::new(Vec::new());
    let (tx, rx) = delivery_queue(8, None);
    b.subscribe(1, "a.*".into(), 0, tx.clone());
    b.subscribe(1, "a.>".into(), 1, tx.clone());
    b.subscribe(1, "a.>".into(), 2, tx); // replaces: qos 2
    assert_eq!(b.subscription_count(), 2);
    b.route("a.b", b"x", 2, false, Instant::now());
    let d = rx.try_recv().unwrap();
    assert_eq!((d.subject(), d.qos), ("a.b", 2));
    assert!(rx.try_recv().is_none(), "delivered once");
    assert!(b.unsubscribe(1, "a.>"));
    assert!(!b.unsubscribe(1, "a.>"));
    b.route("a.b", b"x", 2, false, Instant::now());
    assert_eq!(rx.try_recv().unwrap().qos, 0);
    b.drop_conn(1);
    assert_eq!(b.subscription_count(), 0);
    assert!(!b.has_interest("a.b"));
}

#[test]
fn nats_subscriptions_each_get_a_copy_and_mqtt_sees_nats() {
    let b = Broker::new(Vec::new());
    let ob = Outbox::new(1 << 20);
    assert!(b.subscribe_nats(1, 10, "a.b".into(), None, ob.clone()));
    assert!(b.subscribe_nats(1, 11, "a.>".into(), None, ob.clone()));
    assert!(!b.subscribe_nats(1, 11, "x".into(), None, ob.clone()));
    let (tx, rx) = delivery_queue(8, None);
    b.subscribe(2, "a.>".into(), 1, tx);
    assert_eq!(b.route_msg(None, msg("a.b", b"hi"), 0, Instant::now()), 3);
    let mut sids: Vec<u64> = ob.take(usize::MAX).into_iter().map(|x| x.0).collect();
    sids.sort_unstable();
    assert_eq!(sids, vec![10, 11]);
    let d = rx.try_recv().unwrap();
    assert_eq!((d.msg.payload.as_slice(), d.qos), (&b"hi"[..], 0));
    // MQTT publishes reach NATS subscribers.
    b.route("a.c", b"m", 1, false, Instant::now());
    let got = ob.take(usize::MAX);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0, got[0].1.payload.as_slice()), (11, &b"m"[..]));
}

#[test]
fn remembered_no_interest_ends_with_any_subscription_change() {
    let b = Broker::new(Vec::new());
    let mut seen = NoInterest::default();
    let publish = |seen: &mut NoInterest, subject: &str| {
        let m = Arc::unwrap_or_clone(msg(subject, b"p"));
        if b.publish_unwanted(seen, subject) {
            return 0;
        }
        let (n, back) = b.route_publish(seen, None, m, 0, false, Instant::now());
        assert_eq!(
            (back.subject.as_str(), back.payload.as_slice()),
            (subject, &b"p"[..])
        );
        n
    };
    assert_eq!(publish(&mut seen, "t.a"), 0);
    assert_eq!(publish(&mut seen, "_INBOX.x"), 0);
    assert!(seen.subjects.contains("t.a"));
    assert!(
        !seen.subjects.contains("_INBOX.x"),
        "inboxes are not remembered"
    );
    // A subscription elsewhere (another connection, another subject)
    // makes the memory stale: the next publish looks again.
    let ob = Outbox::new(1 << 20);
    assert!(b.subscribe_nats(2, 1, "t.>".into(), None, ob.clone()));
    assert_eq!(publish(&mut seen, "t.a"), 1);
    assert_eq!(ob.take(usize::MAX).len(), 1);
    assert!(!seen.subjects.contains("t.a"));
    // Unsubscribing does too.
    b.unsubscribe_nats(2, 1, None);
    assert_eq!(publish(&mut seen, "t.a"), 0);
    assert_eq!(publish(&mut seen, "t.a"), 0);
    assert!(seen.subjects.contains("t.a"));
    assert!(b.subscribe_nats(3, 1, "t.a".into(), None, ob.clone()));
    assert_eq!(publish(&mut seen, "t.a"), 1);
    b.drop_conn(3);
    assert_eq!(publish(&mut seen, "t.a"), 0);
    assert!(ob.take(usize::MAX).len() == 1);
}

#[test]
fn echo_off_skips_the_publisher() {
    let b = Broker::new(Vec::new());
    let ob = Outbox::new(1 << 20);
    b.subscribe_nats(1, 1, "a".into(), None, ob.clone());
    let me = Origin {
        conn: 1,
        echo: false,
    };
    assert_eq!(b.route_msg(Some(me), msg("a", b""), 0, Instant::now()), 0);
    assert_eq!(
        b.route_msg(
            Some(Origin { echo: true, ..me }),
            msg("a", b""),
            0,
            Instant::now()
        ),
        1
    );
    assert_eq!(ob.take(usize::MAX).len(), 1);
}

#[test]
fn queue_groups_deliver_once_per_group_and_spread() {
    let b = Broker::new(Vec::new());
    let members: Vec<Arc<Outbox>> = (0..3).map(|_| Outbox::new(1 << 20)).collect();
    for (i, ob) in members.iter().enumerate() {
        b.subscribe_nats(
            i as u64,
            1,
            "job.*".into(),
            Some("workers".into()),
            ob.clone(),
        );
    }
    let other = Outbox::new(1 << 20);
    b.subscribe_nats(9, 1, "job.*".into(), Some("audit".into()), other.clone());
    for _ in 0..300 {
        assert_eq!(b.route_msg(None, msg("job.x", b""), 0, Instant::now()), 2);
    }
    let counts: Vec<usize> = members.iter().map(|m| m.take(usize::MAX).len()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 300);
    assert!(counts.iter().all(|&c| c > 50), "spread: {counts:?}");
    assert_eq!(other.take(usize::MAX).len(), 300);
}

#[test]
fn unsub_max_removes_after_n() {
    let b = Broker::new(Vec::new());
    let ob = Outbox::new(1 << 20);
    b.subscribe_nats(1, 1, "a".into(), None, ob.clone());
    b.unsubscribe_nats(1, 1, Some(2));
    for _ in 0..5 {
        b.route_msg(None, msg("a", b""), 0, Instant::now());
    }
    assert_eq!(ob.take(usize::MAX).len(), 2);
    assert_eq!(b.subscription_count(), 0);
    // Already delivered enough: removed at once.
    b.subscribe_nats(1, 2, "a".into(), None, ob.clone());
    b.route_msg(None, msg("a", b""), 0, Instant::now());
    b.unsubscribe_nats(1, 2, Some(1));
    assert_eq!(b.subscription_count(), 0);
}

#[test]
fn full_outbox_marks_slow_and_spares_others() {
    let b = Broker::new(Vec::new());
    let slow = Outbox::new(200);
    let fast = Outbox::new(1 << 20);
    b.subscribe_nats(1, 1, "a".into(), None, slow.clone());
    b.subscribe_nats(2, 1, "a".into(), None, fast.clone());
    for _ in 0..10 {
        b.route_msg(None, msg("a", &[0; 60]), 0, Instant::now());
    }
    assert!(slow.is_slow());
    assert!(slow.pending() <= 200);
    assert!(!fast.is_slow());
    assert_eq!(fast.take(usize::MAX).len(), 10);
    assert!(b.counters.dropped_slow.load(Ordering::Relaxed) > 0);
    slow.close();
    assert_eq!(slow.push(1, msg("a", b"")), Push::Closed);
}

#[test]
fn outbox_take_respects_budget() {
    let ob = Outbox::new(1 << 20);
    for _ in 0..10 {
        ob.push(1, msg("a", &[0; 100]));
    }
    let size = msg("a", &[0; 100]).size();
    assert_eq!(ob.take(size * 3).len(), 3);
    assert_eq!(ob.take(0).len(), 1, "at least one");
    assert_eq!(ob.pending(), size * 6);
    smol::block_on(ob.wait(true));
}

#[test]
fn mqtt_share_group_shares_with_nats_queue_group_and_keeps_plain_copy() {
    let b = Broker::new(Vec::new());
    let (tx1, rx1) = delivery_queue(1000, None);
    let (tx2, rx2) = delivery_queue(1000, None);
    b.subscribe_mqtt(1, Some("g".into()), "job.*".into(), 1, tx1.clone());
    // The same connection also holds a plain subscription: own copy.
    b.subscribe(1, "job.*".into(), 0, tx1);
    b.subscribe_mqtt(2, Some("g".into()), "job.*".into(), 2, tx2);
    let nats = Outbox::new(1 << 20);
    b.subscribe_nats(3, 1, "job.*".into(), Some("g".into()), nats.clone());
    for _ in 0..300 {
        // One plain subscription plus one group.
        assert_eq!(b.route_msg(None, msg("job.x", b""), 2, Instant::now()), 2);
    }
    let d1: Vec<Delivery> = std::iter::from_fn(|| rx1.try_recv()).collect();
    let d2: Vec<Delivery> = std::iter::from_fn(|| rx2.try_recv()).collect();
    let plain = d1.iter().filter(|d| !d.shared).count();
    let shared1 = d1.iter().filter(|d| d.shared).count();
    let n = nats.take(usize::MAX).len();
    assert_eq!(plain, 300);
    assert_eq!(shared1 + d2.len() + n, 300);
    assert!(
        shared1 > 30 && d2.len() > 30 && n > 30,
        "{shared1} {} {n}",
        d2.len()
    );
    assert!(
        d1.iter().filter(|d| d.shared).all(|d| d.qos == 1),
        "min(pub, sub)"
    );
    assert!(d2.iter().all(|d| d.qos == 2 && d.shared));
    assert!(b.unsubscribe_mqtt(1, Some("g"), "job.*"));
    assert!(!b.unsubscribe_mqtt(1, Some("g"), "job.*"));
    assert!(b.unsubscribe(1, "job.*"));
    assert_eq!(b.subscription_count(), 2);
}

#[test]
fn queue_member_is_chosen_among_those_who_may_receive() {
    let b = Broker::new(Vec::new());
    let deny = Arc::new(Permissions {
        deny_subscribe: vec!["secret.>".into()],
        ..Permissions::default()
    });
    let (admin_tx, admin_rx) = delivery_queue(1000, None);
    let (dave_tx, dave_rx) = delivery_queue(1000, None);
    b.subscribe_mqtt(1, Some("g".into()), "secret.>".into(), 1, admin_tx);
    b.set_permissions(2, Some(deny.clone()));
    b.subscribe_mqtt(2, Some("g".into()), ">".into(), 1, dave_tx);
    let nats = Outbox::new(1 << 20);
    b.subscribe_nats(3, 1, ">".into(), Some("g".into()), nats.clone());
    // Permissions set after subscribing apply too.
    b.set_permissions(3, Some(deny.clone()));
    for _ in 0..100 {
        assert_eq!(
            b.route_msg(None, msg("secret.s", b""), 1, Instant::now()),
            1
        );
    }
    assert_eq!(admin_rx.len(), 100, "every one reaches the member allowed");
    assert_eq!((dave_rx.len(), nats.pending()), (0, 0));
    // A group none of whose members may receive it does not get it.
    b.drop_conn(1);
    assert_eq!(
        b.route_msg(None, msg("secret.s", b""), 1, Instant::now()),
        0
    );
    assert_eq!((dave_rx.len(), nats.pending()), (0, 0));
    // Other subjects still spread over the members.
    for _ in 0..100 {
        assert_eq!(b.route_msg(None, msg("a.b", b""), 1, Instant::now()), 1);
    }
    let n = nats.take(usize::MAX).len();
    assert_eq!(dave_rx.len() + n, 100);
    assert!(n > 10 && dave_rx.len() > 10, "{n}");
    // A plain subscription that may not receive is not counted (a
    // request gets no-responders) and its UNSUB max is not used up.
    let plain = Outbox::new(1 << 20);
    b.set_permissions(4, Some(deny));
    b.subscribe_nats(4, 1, "secret.>".into(), None, plain.clone());
    b.unsubscribe_nats(4, 1, Some(1));
    assert_eq!(
        b.route_msg(None, msg("secret.x", b""), 0, Instant::now()),
        0
    );
    assert_eq!(b.subscription_count(), 3);
    b.drop_conn(4);
    assert!(!lock(&b.table).deny.contains_key(&4));
}

#[test]
fn dollar_subjects_pick_a_member_whose_filter_names_them() {
    let b = Broker::new(Vec::new());
    let (wild_tx, wild_rx) = delivery_queue(1000, None);
    let (sys_tx, sys_rx) = delivery_queue(1000, None);
    b.subscribe_mqtt(1, Some("g".into()), ">".into(), 0, wild_tx);
    b.subscribe_mqtt(2, Some("g".into()), "$SYS.>".into(), 0, sys_tx);
    for _ in 0..50 {
        b.route("$SYS.up", b"", 0, false, Instant::now());
    }
    assert_eq!((wild_rx.len(), sys_rx.len()), (0, 50));
    // NATS subscribers match `$` subjects with wildcards (nats-server).
    let ob = Outbox::new(1 << 20);
    b.subscribe_nats(3, 1, ">".into(), None, ob.clone());
    assert_eq!(b.route_msg(None, msg("$SYS.up", b""), 0, Instant::now()), 2);
    assert_eq!(ob.take(usize::MAX).len(), 1);
}

#[test]
fn share_group_passes_over_a_full_member() {
    let b = Broker::new(Vec::new());
    let (full_tx, full_rx) = delivery_queue(1, None);
    let (tx, rx) = delivery_queue(1000, None);
    b.subscribe_mqtt(1, Some("g".into()), "a".into(), 0, full_tx);
    b.subscribe_mqtt(2, Some("g".into()), "a".into(), 0, tx);
    for _ in 0..100 {
        b.route("a", b"x", 0, false, Instant::now());
    }
    assert_eq!(full_rx.len(), 1);
    assert_eq!(rx.len(), 99, "nothing lost while a member had room");
    assert_eq!(b.counters.dropped_slow.load(Ordering::Relaxed), 0);
}

#[test]
fn mqtt_queue_bytes_are_bounded_and_given_back() {
    let b = Broker::new(Vec::new());
    let budget = QueueBudget::new(10_000);
    let (tx, rx) = delivery_queue(1000, Some(budget.clone()));
    b.subscribe_mqtt(1, None, "a".into(), 0, tx);
    let (fast_tx, fast_rx) = delivery_queue(1000, None);
    b.subscribe_mqtt(2, None, "a".into(), 0, fast_tx);
    // An empty queue takes one message of any size.
    b.route("a", &[0; 50_000], 0, false, Instant::now());
    assert_eq!(rx.len(), 1);
    b.route("a", &[0; 1000], 0, false, Instant::now());
    assert_eq!(rx.len(), 1, "over the budget: dropped");
    assert_eq!(b.counters.dropped_slow.load(Ordering::Relaxed), 1);
    assert!(rx.try_recv().is_some());
    assert_eq!(budget.used(), 0, "taken out: given back");
    for _ in 0..20 {
        b.route("a", &[0; 1000], 0, false, Instant::now());
    }
    let cost = 1000 + 1 + DELIVERY_OVERHEAD;
    assert_eq!(rx.len(), 10_000 / cost);
    assert!(budget.used() <= 10_000);
    // What the session holds counts too.
    budget.set_held(budget.used());
    while rx.try_recv().is_some() {}
    b.route("a", &[0; 1000], 0, false, Instant::now());
    assert_eq!(rx.len(), 0, "the session holds the whole budget");
    budget.set_held(0);
    b.route("a", &[0; 1000], 0, false, Instant::now());
    assert_eq!(rx.len(), 1);
    // The other subscriber, without a budget, got every message.
    assert_eq!(fast_rx.len(), 24);
    // A connection's queue goes with it, and what waited gives its bytes back.
    drop(rx);
    assert_eq!(budget.used(), 0);
}

#[test]
fn share_group_passes_over_a_member_out_of_bytes() {
    let b = Broker::new(Vec::new());
    let (full_tx, full_rx) = delivery_queue(1000, Some(QueueBudget::new(100)));
    let (tx, rx) = delivery_queue(1000, None);
    b.subscribe_mqtt(1, Some("g".into()), "a".into(), 0, full_tx);
    b.subscribe_mqtt(2, Some("g".into()), "a".into(), 0, tx);
    for _ in 0..100 {
        b.route("a", &[0; 200], 0, false, Instant::now());
    }
    assert!(full_rx.len() <= 1);
    assert_eq!(
        full_rx.len() + rx.len(),
        100,
        "nothing lost while a member had room"
    );
}

#[test]
fn on_subscribe_fires_when_a_subscription_is_added() {
    let b = Broker::new(Vec::new());
    let ob = Outbox::new(1 << 20);
    let mut l = b.on_subscribe();
    let g = b.generation();
    assert!(smol::future::block_on(smol::future::poll_once(&mut l)).is_none());
    assert!(b.subscribe_nats(1, 1, "deliver.x".into(), None, ob));
    assert_ne!(b.generation(), g, "a check after listening sees the change");
    assert!(
        smol::future::block_on(smol::future::poll_once(&mut l)).is_some(),
        "a waiting push consumer wakes"
    );
    b.unsubscribe_nats(1, 1, None);
    let mut l = b.on_subscribe();
    b.unsubscribe_nats(1, 1, None);
    assert!(smol::future::block_on(smol::future::poll_once(&mut l)).is_none());
}
