//! One MQTT connection's queue of [`Delivery`]s: the router pushes
//! ([`DeliveryTx::try_send`], never blocking), the connection's task takes
//! them ([`DeliveryRx::try_recv`]) after waiting for the first
//! ([`DeliveryRx::ready`]).
//!
//! Owns: the waiting deliveries, in order, and the waker of the
//! connection's task.
//!
//! Invariants:
//! - At most `max_count` deliveries wait (`mqtt.max_queued`), and, when
//!   the queue has a [`QueueBudget`] (`mqtt.max_queued_bytes`), their
//!   [`Delivery::cost`] is charged to it while they wait: a delivery is
//!   admitted only if the budget takes it (an empty budget takes one of
//!   any size), and its cost is given back when it is taken out or
//!   dropped. A delivery that does not fit is refused ([`Sent::Full`]);
//!   the caller drops it for this subscriber and counts it.
//! - Steady state allocates nothing: the ring keeps its capacity between
//!   bursts (up to [`KEEP`] slots; a longer one shrinks back once
//!   emptied), and the waker is stored only while the task waits on an
//!   empty queue (one wake-up per batch, not per delivery).
//! - Dropping the receiver closes the queue: what waits is dropped (its
//!   bytes given back) and every later send fails with [`Sent::Closed`].
//! - A publisher may hold the wake-ups its routing causes until the end of
//!   its batch ([`Wakes::route`], [`Wakes::wake_all`]): a subscriber then
//!   takes the whole batch in one turn (one write) instead of waking on
//!   its first delivery while the rest are still being routed. The held
//!   wakers belong to the [`Wakes`] (one per queue whose task waited, so
//!   at most one per delivery of the batch) and are woken when it is
//!   dropped at the latest; none is ever lost.

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use super::{lock, Delivery, QueueBudget};

/// Slots a queue keeps once emptied (a burst beyond them gives the rest
/// back).
pub const KEEP: usize = 256;

/// A new queue of at most `max_count` deliveries, charged to `budget`.
pub fn delivery_queue(
    max_count: usize,
    budget: Option<Arc<QueueBudget>>,
) -> (DeliveryTx, DeliveryRx) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        max_count,
        budget,
    });
    (DeliveryTx(shared.clone()), DeliveryRx(shared))
}

struct Shared {
    state: Mutex<State>,
    max_count: usize,
    budget: Option<Arc<QueueBudget>>,
}

#[derive(Default)]
struct State {
    items: VecDeque<Delivery>,
    /// The receiver's task, while it waits on an empty queue.
    waker: Option<Waker>,
    closed: bool,
}

impl Shared {
    fn release(&self, d: &Delivery) {
        if let Some(b) = &self.budget {
            b.release(d.cost());
        }
    }
}

/// The outcome of [`DeliveryTx::try_send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// Over the count or the byte limit: dropped.
    Full,
    /// The connection is gone: dropped.
    Closed,
}

/// The router's side (one clone per subscription).
#[derive(Clone)]
pub struct DeliveryTx(Arc<Shared>);

impl DeliveryTx {
    /// Queue `d` if it fits (see the module doc); never blocks.
    pub fn try_send(&self, d: Delivery) -> Sent {
        let s = &*self.0;
        let mut st = lock(&s.state);
        if st.closed {
            return Sent::Closed;
        }
        if st.items.len() >= s.max_count {
            return Sent::Full;
        }
        if let Some(b) = &s.budget {
            if !b.try_charge(d.cost()) {
                return Sent::Full;
            }
        }
        st.items.push_back(d);
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            wake_or_hold(w);
        }
        Sent::Queued
    }

    /// Whether one more delivery may fit now (count and bytes).
    pub fn has_room(&self) -> bool {
        let s = &*self.0;
        let st = lock(&s.state);
        !st.closed && st.items.len() < s.max_count && s.budget.as_ref().is_none_or(|b| b.has_room())
    }

    /// Deliveries waiting.
    pub fn len(&self) -> usize {
        lock(&self.0.state).items.len()
    }

    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The connection's side; dropping it closes the queue.
pub struct DeliveryRx(Arc<Shared>);

impl DeliveryRx {
    /// The oldest waiting delivery, its bytes given back to the budget.
    pub fn try_recv(&self) -> Option<Delivery> {
        let s = &*self.0;
        let mut st = lock(&s.state);
        let d = st.items.pop_front()?;
        if st.items.is_empty() && st.items.capacity() > KEEP {
            st.items.shrink_to(KEEP);
        }
        drop(st);
        s.release(&d);
        Some(d)
    }

    /// Deliveries waiting.
    pub fn len(&self) -> usize {
        lock(&self.0.state).items.len()
    }

    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once a delivery waits (at once if one does). One waiting
    /// task at a time: the receiver is not shared.
    pub fn ready(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            let mut st = lock(&self.0.state);
            if !st.items.is_empty() {
                st.waker = None;
                return Poll::Ready(());
            }
            match &mut st.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }
}

thread_local! {
    /// The wakers held for the publisher routing on this thread now
    /// (inside [`Wakes::route`], which never awaits), or `None`: wake at
    /// once.
    static HELD: Cell<Option<Vec<Waker>>> = const { Cell::new(None) };
}

fn wake_or_hold(w: Waker) {
    HELD.with(|held| match held.take() {
        Some(mut v) => {
            v.push(w);
            held.set(Some(v));
        }
        None => w.wake(),
    });
}

/// The wake-ups a publisher's batch caused, held until its end (see the
/// module doc). Normally one waker per delivery queue filled: a queue's
/// waker is taken by the first delivery that finds it, and its task
/// stores another only if it is polled again before the batch ends.
#[derive(Default)]
pub struct Wakes(Vec<Waker>);

impl Wakes {
    /// Run `route` (synchronous: it cannot await), holding the wake-ups of
    /// the queues it fills here instead of waking their tasks.
    pub fn route<R>(&mut self, route: impl FnOnce() -> R) -> R {
        /// Puts the thread's previous state back, also on a panic.
        struct Restore<'a> {
            mine: &'a mut Vec<Waker>,
            prev: Option<Vec<Waker>>,
        }
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                if let Some(v) = HELD.with(|h| h.replace(self.prev.take())) {
                    *self.mine = v;
                }
            }
        }
        let held = std::mem::take(&mut self.0);
        let prev = HELD.with(|h| h.replace(Some(held)));
        let _restore = Restore {
            mine: &mut self.0,
            prev,
        };
        route()
    }

    /// Wake every task held so far.
    pub fn wake_all(&mut self) {
        for w in self.0.drain(..) {
            w.wake();
        }
    }
}

impl Drop for Wakes {
    fn drop(&mut self) {
        self.wake_all();
    }
}

impl Drop for DeliveryRx {
    fn drop(&mut self) {
        let s = &*self.0;
        let mut st = lock(&s.state);
        st.closed = true;
        st.waker = None;
        let items = std::mem::take(&mut st.items);
        drop(st);
        for d in &items {
            s.release(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{Msg, DELIVERY_OVERHEAD};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Wake};
    use std::time::Instant;

    fn delivery(payload: usize) -> Delivery {
        Delivery {
            msg: Arc::new(Msg {
                subject: "a".into(),
                reply: None,
                headers: None,
                payload: vec![0; payload],
                publisher: None,
            }),
            qos: 0,
            retain: false,
            shared: false,
            at: Instant::now(),
        }
    }

    #[derive(Default)]
    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn count_bound_holds_and_order_is_kept() {
        let (tx, rx) = delivery_queue(3, None);
        for i in 0..5 {
            let want = if i < 3 { Sent::Queued } else { Sent::Full };
            assert_eq!(tx.try_send(delivery(i)), want, "send {i}");
        }
        assert_eq!((tx.len(), rx.len(), tx.has_room()), (3, 3, false));
        let sizes: Vec<usize> = std::iter::from_fn(|| rx.try_recv())
            .map(|d| d.msg.payload.len())
            .collect();
        assert_eq!(sizes, [0, 1, 2]);
        assert!(tx.has_room() && tx.is_empty() && rx.is_empty());
        assert_eq!(tx.try_send(delivery(9)), Sent::Queued);
    }

    #[test]
    fn byte_bound_holds_and_bytes_come_back() {
        let budget = QueueBudget::new(10_000);
        let (tx, rx) = delivery_queue(1000, Some(budget.clone()));
        // An empty queue takes one delivery of any size.
        assert_eq!(tx.try_send(delivery(50_000)), Sent::Queued);
        assert_eq!(tx.try_send(delivery(1)), Sent::Full);
        assert!(!tx.has_room());
        assert!(rx.try_recv().is_some());
        assert_eq!(budget.used(), 0, "taken out: given back");
        let cost = 1000 + 1 + DELIVERY_OVERHEAD;
        let queued = (0..20)
            .filter(|_| tx.try_send(delivery(1000)) == Sent::Queued)
            .count();
        assert_eq!(queued, 10_000 / cost);
        assert_eq!(budget.used(), queued * cost);
        // What the session holds counts too.
        budget.set_held(10_000);
        assert!(rx.try_recv().is_some());
        assert_eq!(tx.try_send(delivery(1000)), Sent::Full);
        budget.set_held(0);
        drop(rx);
        assert_eq!(budget.used(), 0, "dropped with the queue: given back");
    }

    #[test]
    fn a_push_wakes_the_waiting_task_once() {
        let (tx, rx) = delivery_queue(10, None);
        let wakes = Arc::new(CountWakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut ready = Box::pin(rx.ready());
        assert!(ready.as_mut().poll(&mut cx).is_pending());
        assert!(ready.as_mut().poll(&mut cx).is_pending(), "polled again");
        assert_eq!(tx.try_send(delivery(1)), Sent::Queued);
        assert_eq!(tx.try_send(delivery(1)), Sent::Queued);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "one wake per batch");
        assert!(ready.as_mut().poll(&mut cx).is_ready());
        drop(ready);
        // Something waits: ready at once, no waker kept.
        assert!(smol::future::block_on(smol::future::poll_once(rx.ready())).is_some());
        while rx.try_recv().is_some() {}
        let mut ready = Box::pin(rx.ready());
        assert!(ready.as_mut().poll(&mut cx).is_pending());
        assert_eq!(tx.try_send(delivery(1)), Sent::Queued);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_batch_holds_its_wakes_until_wake_all() {
        let (tx, rx) = delivery_queue(10, None);
        let wakes = Arc::new(CountWakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut ready = Box::pin(rx.ready());
        assert!(ready.as_mut().poll(&mut cx).is_pending());
        let mut held = Wakes::default();
        for _ in 0..3 {
            assert_eq!(held.route(|| tx.try_send(delivery(1))), Sent::Queued);
        }
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "held");
        assert_eq!(held.0.len(), 1, "one waker per queue");
        held.wake_all();
        held.wake_all();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        // Outside `route`, a delivery wakes at once.
        while rx.try_recv().is_some() {}
        assert!(ready.as_mut().poll(&mut cx).is_pending());
        assert_eq!(tx.try_send(delivery(1)), Sent::Queued);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        // Held wakes are not lost when the holder goes away.
        while rx.try_recv().is_some() {}
        assert!(ready.as_mut().poll(&mut cx).is_pending());
        held.route(|| tx.try_send(delivery(1)));
        drop(held);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn dropping_the_receiver_closes_the_queue() {
        let (tx, rx) = delivery_queue(10, None);
        let d = delivery(1);
        let msg = d.msg.clone();
        assert_eq!(tx.try_send(d), Sent::Queued);
        drop(rx);
        assert_eq!(Arc::strong_count(&msg), 1, "what waited was dropped");
        assert_eq!(tx.try_send(delivery(1)), Sent::Closed);
        assert!(!tx.has_room() && tx.is_empty());
    }

    #[test]
    fn a_burst_gives_its_slots_back() {
        let (tx, rx) = delivery_queue(10_000, None);
        for _ in 0..(4 * KEEP) {
            assert_eq!(tx.try_send(delivery(0)), Sent::Queued);
        }
        while rx.try_recv().is_some() {}
        assert!(lock(&rx.0.state).items.capacity() <= KEEP);
    }
}
