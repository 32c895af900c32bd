//! Named timers (connect timeout, keep-alive), each set or stopped with
//! `now`, and the one deadline the shell sleeps until (quinn-proto's
//! `connection/timer.rs`).
//!
//! - [`Timer::Connect`] runs from the connection's start until CONNECT is
//!   accepted and the stored session restored ([`Session::restore`]):
//!   bytes trickling in do not move it.
//! - [`Timer::KeepAlive`] runs while connected with a keep-alive: 1.5 ×
//!   the keep-alive after the latest packet (MQTT 3.1.1 §3.1.2.10).
//! - Closing stops every timer: a closed session has no deadline.

use std::time::Instant;

use super::{CloseReason, Session};
use crate::wire::mqtt::reason;

/// The session's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// No complete CONNECT (and restore) within `connect_timeout`.
    Connect = 0,
    /// Nothing from the client within 1.5 × its keep-alive.
    KeepAlive = 1,
}

impl Timer {
    const ALL: [Timer; 2] = [Timer::Connect, Timer::KeepAlive];
}

/// When each [`Timer`] expires (`None`: stopped).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct TimerTable {
    at: [Option<Instant>; 2],
}

impl TimerTable {
    pub(super) fn set(&mut self, timer: Timer, when: Instant) {
        self.at[timer as usize] = Some(when);
    }

    pub(super) fn stop(&mut self, timer: Timer) {
        self.at[timer as usize] = None;
    }

    pub(super) fn stop_all(&mut self) {
        self.at = [None; 2];
    }

    /// The earliest running timer's expiry.
    pub(super) fn next(&self) -> Option<Instant> {
        self.at.iter().flatten().min().copied()
    }

    /// A timer expired at `now`, if any (stopping it).
    fn take_expired(&mut self, now: Instant) -> Option<Timer> {
        let t = Timer::ALL
            .into_iter()
            .find(|&t| self.at[t as usize].is_some_and(|at| at <= now))?;
        self.stop(t);
        Some(t)
    }
}

impl Session {
    /// (Re)start the keep-alive timer from the latest packet.
    pub(super) fn arm_keep_alive(&mut self) {
        if let Some(ka) = self.keep_alive {
            self.timers
                .set(Timer::KeepAlive, self.last_packet + ka + ka / 2);
        }
    }

    /// The next time [`Session::handle_timeout`] must be called.
    #[must_use]
    pub fn poll_deadline(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Time passed: close on an expired timer.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.timers.take_expired(now) {
            Some(Timer::Connect) => self.closed(CloseReason::ConnectTimeout),
            Some(Timer::KeepAlive) => {
                self.close_with(reason::KEEP_ALIVE_TIMEOUT, CloseReason::KeepAliveTimeout)
            }
            None => {}
        }
    }
}
