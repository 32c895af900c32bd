//! `uplink.max_rate` and mirror priorities, sans-IO: a token bucket of
//! link bytes and the rule that decides which mirror may publish how much.
//!
//! Owns: [`TokenBucket`] (bytes per second, a burst of a quarter second's
//! worth, at least [`MIN_BURST`]) and [`plan`], the per-pass budget of
//! every mirror.
//!
//! The shell ([`super::run`], `pump_mirrors`) runs one pass per loop
//! turn: it asks [`plan`] for each mirror's budget, hands it to the mirror
//! ([`super::Mirror::handle_budget`]), charges the bytes of every command
//! it then writes to the bucket ([`TokenBucket::take`]) and, when a mirror
//! was held back by the cap, sleeps until [`TokenBucket::ready_at`].
//!
//! Invariants:
//! - The bucket may go into debt by one message (a message is never
//!   split), never more: a budget is only granted while the balance is
//!   positive. So the bytes taken by time `t` after the bucket's creation
//!   are at most `rate × t + burst + one pass's overshoot` (at most one
//!   message per mirror).
//! - Only publishes of stored messages wait for the bucket. PINGs, PONGs
//!   and the hub's acks (which travel the other way) never do; resync
//!   reads and subscriptions are charged but not held back, so they cannot
//!   be starved by a backlog.
//! - Priority is strict: a mirror gets a budget only while no mirror of a
//!   higher priority has unsent messages ([`super::Mirror::has_unsent`]);
//!   mirrors of the same priority take turns at the bucket (the first
//!   place rotates every pass).
//!   A mirror that cannot send (offline, waiting after a fault, hub stream
//!   missing) does not hold lower ones back.

use std::time::{Duration, Instant};

/// The smallest burst: a few typical publishes.
pub const MIN_BURST: u64 = 4096;

/// A token bucket of bytes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Balance in bytes; negative: debt from a message larger than it.
    tokens: i64,
    /// The instant `tokens` was last brought up to date.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `rate` bytes per second (> 0).
    pub fn new(rate: u64, now: Instant) -> TokenBucket {
        let rate = rate.max(1);
        let burst = (rate / 4).max(MIN_BURST);
        TokenBucket {
            rate,
            burst,
            tokens: i64::try_from(burst).unwrap_or(i64::MAX),
            last: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn burst(&self) -> u64 {
        self.burst
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last);
        let add = (dt.as_nanos() * u128::from(self.rate) / 1_000_000_000) as u64;
        if add == 0 {
            return;
        }
        let cap = i64::try_from(self.burst).unwrap_or(i64::MAX);
        let full = self
            .tokens
            .saturating_add(i64::try_from(add).unwrap_or(i64::MAX))
            >= cap;
        self.tokens = self
            .tokens
            .saturating_add(i64::try_from(add).unwrap_or(i64::MAX))
            .min(cap);
        // Credit exactly the time the added bytes stand for, so rounding
        // never creates bytes; a full bucket forgets the rest.
        self.last = if full {
            now
        } else {
            self.last
                + Duration::from_nanos(
                    (u128::from(add) * 1_000_000_000 / u128::from(self.rate)) as u64,
                )
        };
    }

    /// Bytes that may be sent at `now` (0 while in debt).
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        u64::try_from(self.tokens.max(0)).unwrap_or(0)
    }

    /// Charge `n` bytes sent at `now` (may go into debt).
    pub fn take(&mut self, now: Instant, n: u64) {
        self.refill(now);
        self.tokens = self
            .tokens
            .saturating_sub(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The instant at which at least one byte is available again.
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens > 0 {
            return now;
        }
        let need = u128::from(self.tokens.unsigned_abs() + 1);
        let ns = need * 1_000_000_000 / u128::from(self.rate) + 1;
        self.last + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// One mirror as [`plan`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub priority: i32,
    /// [`super::Mirror::has_unsent`].
    pub unsent: bool,
}

/// The budget of each mirror for one pass, given `available` bytes
/// (`None`: no cap), in the order of `wants`: `None` no limit, `Some(0)`
/// hold back, `Some(n)` up to about `n` bytes. A capped budget is the
/// whole balance for every eligible mirror: the shell charges what each
/// one used before asking the next, so it passes the new balance on (see
/// [`order`]).
pub fn plan(wants: &[Want], available: Option<u64>) -> Vec<Option<u64>> {
    let top = wants.iter().filter(|w| w.unsent).map(|w| w.priority).max();
    wants
        .iter()
        .map(|w| match top {
            Some(p) if w.priority < p => Some(0),
            _ => available,
        })
        .collect()
}

/// Indices of `wants` in the order pass number `pass` serves them: higher
/// priority first; among equals the first place rotates with `pass`, so
/// under a cap equal mirrors take turns at the balance.
pub fn order(wants: &[Want], pass: usize) -> Vec<usize> {
    let n = wants.len().max(1);
    let mut idx: Vec<usize> = (0..wants.len()).collect();
    idx.sort_by_key(|&i| (std::cmp::Reverse(wants[i].priority), (i + n - pass % n) % n));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_never_exceeds_rate_times_time_plus_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10_000, t0);
        assert_eq!(b.burst(), MIN_BURST);
        let mut sent = 0u64;
        let mut now = t0;
        // A greedy sender of 300-byte messages polled at odd intervals.
        for step in 0..5_000u64 {
            now += Duration::from_micros(137 + step % 1000);
            while b.available(now) > 0 {
                b.take(now, 300);
                sent += 300;
            }
            let t = now.duration_since(t0).as_secs_f64();
            let bound = 10_000.0 * t + b.burst() as f64 + 300.0;
            assert!((sent as f64) <= bound, "{sent} > {bound} at {t}s");
        }
        // And it does use the rate: within one burst + message of the cap.
        let t = now.duration_since(t0).as_secs_f64();
        assert!(sent as f64 >= 10_000.0 * t - 300.0, "{sent} at {t}s");
    }

    #[test]
    fn ready_at_is_when_the_debt_is_paid() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        b.take(t0, MIN_BURST + 500);
        assert_eq!(b.available(t0), 0);
        let r = b.ready_at(t0);
        assert!(r > t0 + Duration::from_millis(500), "{:?}", r - t0);
        assert!(r <= t0 + Duration::from_millis(502), "{:?}", r - t0);
        assert_eq!(b.clone().available(r - Duration::from_millis(2)), 0);
        assert!(b.available(r) > 0);
    }

    #[test]
    fn higher_priorities_with_unsent_messages_hold_lower_ones() {
        let w = |priority, unsent| Want { priority, unsent };
        let wants = [w(0, true), w(10, true), w(10, false), w(5, true)];
        assert_eq!(
            plan(&wants, Some(100)),
            [Some(0), Some(100), Some(100), Some(0)]
        );
        assert_eq!(plan(&wants, None), [Some(0), None, None, Some(0)]);
        assert_eq!(order(&wants, 0), [1, 2, 3, 0]);
        assert_eq!(order(&wants, 2), [2, 1, 3, 0]);
        let equal = [w(0, true), w(0, true), w(0, true)];
        assert_eq!(order(&equal, 0), [0, 1, 2]);
        assert_eq!(order(&equal, 1), [1, 2, 0]);
        assert_eq!(order(&equal, 5), [2, 0, 1]);
        // The alarm mirror drained: everyone may send.
        let wants = [w(0, true), w(10, false)];
        assert_eq!(plan(&wants, None), [None, None]);
        // Nobody has anything: no limits either.
        assert_eq!(
            plan(&[w(1, false), w(0, false)], Some(5)),
            [Some(5), Some(5)]
        );
    }
}
