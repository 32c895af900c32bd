//! The connection driver: the one loop every connection shell (MQTT,
//! NATS) runs ([`run`] over a [`Shell`]), and what the shells share in it:
//! the timer of the machine's next deadline ([`Deadline`]) and the wait
//! for the in-order acknowledgement queue's front
//! ([`crate::ingest::AckQueue`]).
//!
//! The race of one sleep stays each shell's: NATS writes partially while
//! it reads (a TCP socket in two halves), MQTT writes whole frames through
//! its [`super::transport::Transport`] (TCP, TLS, WebSocket) raced only
//! with a takeover.
//!
//! Invariant: a timer is re-armed only when the deadline comes earlier.
//! Keep-alive deadlines move later with every packet and re-arming costs
//! the reactor several syscalls; a timer that fires early is harmless
//! (the machines' `handle_timeout` checks the time) and is re-armed at the
//! current deadline on the next turn.

use std::future::Future;
use std::time::Instant;

use smol::channel::Receiver;
use smol::future::FutureExt;
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

/// What every shell's sleep waits for besides its own sources.
pub enum Common {
    /// The front acknowledgement is known.
    Stored,
    Shutdown,
    /// The deadline timer fired.
    Timer,
}

/// Race the front acknowledgement of `acks`, `shutdown` and `timer`: the
/// part of a sleep every shell shares.
pub async fn wait_common<K>(
    acks: &mut AckQueue<K>,
    shutdown: &Receiver<()>,
    timer: &mut Deadline,
) -> Common {
    async {
        ack_front(acks).await;
        Common::Stored
    }
    .or(async {
        let _ = shutdown.recv().await;
        Common::Shutdown
    })
    .or(async {
        timer.wait().await;
        Common::Timer
    })
    .await
}

/// Resolve when the front acknowledgement of `acks` is known (at once if
/// it is; never while the queue is empty).
async fn ack_front<K>(acks: &mut AckQueue<K>) {
    match acks.front() {
        Front::Empty => std::future::pending().await,
        Front::Ready => {}
        Front::Waiting(w) => w.wait().await,
    }
}

/// Where one turn of a connection leaves it.
pub enum Turn {
    /// More to do at once (events, buffered input, deliveries).
    Again,
    /// Nothing to do until something happens: sleep.
    Sleep,
    /// The connection ends, for this reason.
    Close(String),
}

/// A connection shell: a protocol machine with the socket and everything
/// it talks to. [`run`] calls, in a loop: [`Shell::turn`] (act on the
/// machine's events, complete acknowledgements in order, pass deliveries
/// on, write), then, when it says [`Turn::Sleep`], [`Shell::sleep`] (race
/// the socket, deliveries, the front acknowledgement, the timer and
/// shutdown) and [`Shell::woke`] (feed what happened to the machine).
pub trait Shell {
    /// What ended a sleep.
    type Wake;
    fn turn(&mut self) -> impl Future<Output = Turn>;
    fn sleep(&mut self) -> impl Future<Output = Self::Wake>;
    /// `Err`: why the connection ends.
    fn woke(&mut self, wake: Self::Wake) -> impl Future<Output = Result<(), String>>;
}

/// Drive `shell` until its connection ends; returns why.
pub async fn run<S: Shell>(shell: &mut S) -> String {
    loop {
        match shell.turn().await {
            Turn::Again => continue,
            Turn::Close(why) => return why,
            Turn::Sleep => {}
        }
        let wake = shell.sleep().await;
        if let Err(why) = shell.woke(wake).await {
            return why;
        }
    }
}
