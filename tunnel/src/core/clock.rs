//! The time seam between the engine and boringtun.
//!
//! The engine's notion of time is the `now` its caller passes. boringtun reads a clock of its
//! own inside every call; with the `sim-clock` feature that clock is `mock_instant`'s
//! thread-local one, and [`Clock::advance_to`] sets it to the time elapsed since the engine
//! was created before every call into boringtun. Tests then move boringtun's timers by
//! passing simulated instants, and the driver's real-time tests still see real time.
//! Without the feature boringtun reads the real monotonic clock, which `now` follows anyway.

use std::time::{Instant, SystemTime};

pub(super) struct Clock {
    epoch: Instant,
    wall_epoch: SystemTime,
    latest: Instant,
}

impl Clock {
    pub(super) fn new(now: Instant) -> Clock {
        let clock = Clock {
            epoch: now,
            wall_epoch: SystemTime::now(),
            latest: now,
        };
        clock.sync_boringtun();
        clock
    }

    /// Moves to `now` and returns the engine's time, which never goes backwards: boringtun
    /// subtracts instants and durations without checking and would panic on a step back.
    pub(super) fn advance_to(&mut self, now: Instant) -> Instant {
        if now > self.latest {
            self.latest = now;
        }
        self.sync_boringtun();
        self.latest
    }

    pub(super) fn now(&self) -> Instant {
        self.latest
    }

    /// The wall-clock time of an engine instant, for reporting (e.g. last handshake).
    pub(super) fn wall_time(&self, at: Instant) -> SystemTime {
        self.wall_epoch + at.saturating_duration_since(self.epoch)
    }

    #[cfg(feature = "sim-clock")]
    fn sync_boringtun(&self) {
        mock_instant::MockClock::set_time(self.latest - self.epoch);
    }

    #[cfg(not(feature = "sim-clock"))]
    fn sync_boringtun(&self) {}
}
