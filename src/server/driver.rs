//! What the connection shells share in their loop: the timer of the
//! machine's next deadline and the wait for the in-order acknowledgement
//! queue's front ([`crate::ingest::AckQueue`]).
//!
//! Invariant: a timer is re-armed only when the deadline comes earlier.
//! Keep-alive deadlines move later with every packet and re-arming costs
//! the reactor several syscalls; a timer that fires early is harmless
//! (the machines' `handle_timeout` checks the time) and is re-armed at the
//! current deadline on the next turn.

use std::time::Instant;

use smol::Timer;

use crate::ingest::{AckQueue, Front};

/// The timer of a connection's next deadline.
pub struct Deadline {
    timer: Timer,
    /// What `timer` is armed for; `None` once it fired.
    at: Option<Instant>,
}

impl Default for Deadline {
    fn default() -> Self {
        Deadline {
            timer: Timer::never(),
            at: None,
        }
    }
}

impl Deadline {
    /// Arm for `deadline` if it comes before what the timer is armed for.
    pub fn set(&mut self, deadline: Option<Instant>) {
        if let Some(d) = deadline {
            if self.at.is_none_or(|t| d < t) {
                self.timer.set_at(d);
                self.at = Some(d);
            }
        }
    }

    /// Resolve when the timer fires (never, if it is not armed).
    pub async fn wait(&mut self) {
        (&mut self.timer).await;
    }

    /// The timer fired: the next [`Deadline::set`] re-arms it.
    pub fn fired(&mut self) {
        self.at = None;
    }
}

/// Resolve when the front acknowledgement of `acks` is known (at once if
/// it is; never while the queue is empty).
pub async fn ack_front<K>(acks: &mut AckQueue<K>) {
    match acks.front() {
        Front::Empty => std::future::pending().await,
        Front::Ready => {}
        Front::Waiting(w) => w.wait().await,
    }
}
