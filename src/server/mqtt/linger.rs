//! Write coalescing for an MQTT subscriber that the network thread is
//! behind on (`mqtt.delivery_linger`), sans-IO: the connection's task
//! tells it what each turn takes and when it writes; it says until when
//! the next deliveries may wait.
//!
//! A write is *busy* when it carried at least [`MIN_BATCH`] deliveries
//! and the oldest of them had waited at least [`BUSY_LAG`] for its turn
//! (counted from the end of the linger when the turn lingered): the
//! thread is behind, deliveries pile up faster than they are written.
//! After a busy write, the next deliveries wait until `time` after it, or
//! until `count` deliveries or `bytes` of them wait (the task waits with
//! [`crate::router::DeliveryRx::filled`]), and go in one write. A
//! subscriber that gets a message now and then, or a burst while the
//! thread keeps up, is written at once.
//!
//! Why: each write costs this process a system call and the subscriber a
//! wake-up and a read; under load, fewer and larger writes leave more of
//! the machine to the work itself (measured in README, MQTT table).
//! Cost: while it lingers, a subscriber's deliveries wait up to `time`
//! longer (plus the timer's lateness).
//!
//! Invariant: `count` and `bytes` stay at half the subscriber's queue
//! limits or below, so lingering never makes a delivery be dropped.

use std::time::{Duration, Instant};

/// Deliveries a write must carry to be busy.
pub const MIN_BATCH: usize = 32;
/// How long the oldest of them must have waited for their turn.
pub const BUSY_LAG: Duration = Duration::from_micros(100);
/// A lingering batch is written once this many bytes of it wait.
pub const MAX_BYTES: usize = 64 * 1024;

pub struct Linger {
    time: Duration,
    /// The batch that ends a linger early: deliveries, bytes.
    pub count: usize,
    pub bytes: usize,
    last_write: Instant,
    last_busy: bool,
    /// Whether what this turn took is busy.
    busy: bool,
    /// The end of the linger now waited for, if any.
    deadline: Option<Instant>,
}

impl Linger {
    /// For a subscriber queue of `max_queued` deliveries and
    /// `max_queued_bytes`; `time` 0 never lingers.
    pub fn new(time: Duration, max_queued: usize, max_queued_bytes: usize, now: Instant) -> Self {
        Linger {
            time,
            count: (max_queued / 2).max(1),
            bytes: (max_queued_bytes / 2).clamp(1, MAX_BYTES),
            last_write: now,
            last_busy: false,
            busy: false,
            deadline: None,
        }
    }

    /// This turn takes `n` deliveries, the oldest routed at `oldest`.
    pub fn took(&mut self, n: usize, oldest: Option<Instant>, now: Instant) {
        self.busy = match oldest {
            Some(at) if n >= MIN_BATCH => {
                let from = self.deadline.map_or(at, |d| d.max(at));
                now.saturating_duration_since(from) >= BUSY_LAG
            }
            _ => false,
        };
    }

    /// The turn wrote (whatever it carried).
    pub fn wrote(&mut self, now: Instant) {
        self.last_write = now;
        self.last_busy = std::mem::take(&mut self.busy);
    }

    /// Until when the next deliveries wait (`None`: written at once).
    pub fn until(&mut self, now: Instant) -> Option<Instant> {
        self.deadline = (self.last_busy && !self.time.is_zero())
            .then(|| self.last_write + self.time)
            .filter(|&t| t > now);
        self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIME: Duration = Duration::from_micros(500);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn only_a_busy_write_lingers_and_only_for_its_time() {
        let t0 = Instant::now();
        let mut l = Linger::new(TIME, 10_000, 8 << 20, t0);
        assert_eq!((l.count, l.bytes), (5_000, MAX_BYTES));
        // A few deliveries, or many taken at once: written at once.
        l.took(3, Some(t0), t0 + us(500));
        l.wrote(t0 + us(510));
        assert_eq!(l.until(t0 + us(520)), None, "too few");
        l.took(MIN_BATCH, Some(t0 + us(600)), t0 + us(620));
        l.wrote(t0 + us(630));
        assert_eq!(l.until(t0 + us(640)), None, "taken without delay");
        // Many that waited: the next ones linger until TIME after it.
        l.took(MIN_BATCH, Some(t0 + us(700)), t0 + us(700) + BUSY_LAG);
        l.wrote(t0 + us(900));
        assert_eq!(l.until(t0 + us(950)), Some(t0 + us(900) + TIME));
        // Past that time: at once.
        assert_eq!(l.until(t0 + us(900) + TIME), None);
    }

    #[test]
    fn a_lingered_turn_stays_busy_only_if_it_is_late_after_the_linger() {
        let t0 = Instant::now();
        let mut l = Linger::new(TIME, 10_000, 8 << 20, t0);
        l.took(64, Some(t0), t0 + us(200));
        l.wrote(t0 + us(200));
        let end = l.until(t0 + us(210)).expect("lingers");
        // Its deliveries waited for the linger itself: that is no sign.
        l.took(64, Some(t0 + us(300)), end + us(10));
        l.wrote(end + us(20));
        assert_eq!(l.until(end + us(30)), None, "the thread kept up");
        // Late after a linger: still behind.
        l.took(64, Some(t0), t0 + us(2_000));
        l.wrote(t0 + us(2_000));
        let end = l.until(t0 + us(2_010)).expect("lingers");
        l.took(64, Some(end - us(300)), end + BUSY_LAG);
        l.wrote(end + BUSY_LAG);
        assert!(l.until(end + BUSY_LAG).is_some());
    }

    #[test]
    fn zero_time_never_lingers_and_the_batch_stays_under_the_limits() {
        let t0 = Instant::now();
        let mut l = Linger::new(Duration::ZERO, 1, 100, t0);
        assert_eq!((l.count, l.bytes), (1, 50));
        l.took(1_000, Some(t0), t0 + us(10_000));
        l.wrote(t0 + us(10_000));
        assert_eq!(l.until(t0 + us(10_001)), None);
    }
}
