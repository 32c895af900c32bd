//! A one-value channel: one allocation, two uncontended locks.
//!
//! Owns the reply path of every command sent to a stream's owner thread
//! (one per JetStream or MQTT QoS 1 publish, so it is hot): `async-channel`
//! costs several allocations per channel (queue, and an event per side);
//! this costs one `Arc`.
//!
//! Invariants:
//! - The receiver resolves exactly once: with the value, or with
//!   [`Canceled`] when the sender was dropped without sending (an owner
//!   that failed or shut down never leaves a waiter hanging).
//! - Sending never blocks; sending after the receiver is gone drops the
//!   value.
//! - No `unsafe`: the state sits behind a `Mutex` (held for a few
//!   instructions, never across an await).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// The sender went away without sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Canceled;

struct State<T> {
    value: Option<T>,
    waker: Option<Waker>,
    /// The sender sent or was dropped: nothing more will come.
    done: bool,
}

struct Slot<T>(Mutex<State<T>>);

impl<T> Slot<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A new channel.
pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Slot(Mutex::new(State {
        value: None,
        waker: None,
        done: false,
    })));
    (Sender { slot: slot.clone() }, Receiver { slot })
}

/// The sending half.
pub struct Sender<T> {
    slot: Arc<Slot<T>>,
}

impl<T> Sender<T> {
    /// Deliver `value` and wake the receiver.
    pub fn send(self, value: T) {
        self.finish(Some(value));
    }

    fn finish(&self, value: Option<T>) {
        let waker = {
            let mut s = self.slot.lock();
            if s.done {
                return;
            }
            s.done = true;
            s.value = value;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// The receiving half: a future of the value.
pub struct Receiver<T> {
    slot: Arc<Slot<T>>,
}

impl<T> Receiver<T> {
    /// The value if it has arrived (`Some(Err)` when the sender is gone
    /// without sending); `None` while still waiting. After a `Some`, later
    /// calls return `Some(Err(Canceled))`.
    pub fn try_recv(&mut self) -> Option<Result<T, Canceled>> {
        let mut s = self.slot.lock();
        if !s.done {
            return None;
        }
        Some(s.value.take().ok_or(Canceled))
    }
}

impl<T> Future for Receiver<T> {
    type Output = Result<T, Canceled>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.slot.lock();
        if s.done {
            return Poll::Ready(s.value.take().ok_or(Canceled));
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            other => *other = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_arrives_once() {
        let (tx, mut rx) = channel();
        assert_eq!(rx.try_recv(), None);
        tx.send(7u32);
        assert_eq!(rx.try_recv(), Some(Ok(7)));
        assert_eq!(rx.try_recv(), Some(Err(Canceled)));
    }

    #[test]
    fn dropped_sender_cancels() {
        let (tx, rx) = channel::<u32>();
        drop(tx);
        assert_eq!(smol::block_on(rx), Err(Canceled));
    }

    #[test]
    fn waiting_receiver_is_woken_from_another_thread() {
        let (tx, rx) = channel();
        let t = std::thread::spawn(move || tx.send(String::from("done")));
        assert_eq!(smol::block_on(rx), Ok(String::from("done")));
        t.join().unwrap();
    }

    #[test]
    fn send_after_receiver_dropped_is_harmless() {
        let (tx, rx) = channel();
        drop(rx);
        tx.send(vec![1u8]);
    }
}
