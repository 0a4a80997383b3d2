//! Per-principal request-rate and concurrency limits.
//!
//! A sans-IO core: [`Limits::admit`] takes the current `Instant` and either admits the
//! request (counting it against the principal's concurrency) or says which limit refused it.
//! The caller hands the slot back with [`Limits::release`] when the response has finished
//! streaming; [`SharedLimits`] wraps the core in a mutex and does that with a drop guard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What one principal may do, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitSettings {
    /// Sustained requests per second; `None` leaves the rate unlimited.
    pub requests_per_second: Option<f64>,
    /// Requests that may arrive at once after a quiet spell (the bucket's size).
    pub burst: u32,
    /// Requests in flight at once (until the response body ends); `None` is unlimited.
    pub max_concurrent: Option<u32>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// The token bucket is empty; a token returns after `retry_after`.
    Rate { limit: f64, retry_after: Duration },
    /// The principal already has `limit` requests in flight.
    Concurrency { limit: u32 },
}

/// Token buckets and in-flight counts for every principal.
#[derive(Debug, Default)]
pub struct Limits {
    principals: HashMap<String, PrincipalState>,
}

#[derive(Debug)]
struct PrincipalState {
    settings: LimitSettings,
    tokens: f64,
    refilled_at: Instant,
    in_flight: u32,
}

impl Limits {
    pub fn new() -> Limits {
        Limits::default()
    }

    /// Registers a principal with a full bucket.
    pub fn add_principal(&mut self, name: &str, settings: LimitSettings, now: Instant) {
        self.principals
            .insert(name.to_owned(), PrincipalState::new(settings, now));
    }

    /// Admits one request for `principal` or says which limit it hit. Concurrency is checked
    /// first so that a refused request does not spend a rate token.
    pub fn admit(&mut self, principal: &str, now: Instant) -> Result<(), Refusal> {
        // Unknown principals are never limited here: authentication has already refused them.
        let Some(state) = self.principals.get_mut(principal) else {
            return Ok(());
        };
        if let Some(limit) = state.settings.max_concurrent {
            if state.in_flight >= limit {
                return Err(Refusal::Concurrency { limit });
            }
        }
        if let Some(rate) = state.settings.requests_per_second {
            state.refill(rate, now);
            if state.tokens < 1.0 {
                return Err(Refusal::Rate {
                    limit: rate,
                    retry_after: state.time_to_next_token(rate),
                });
            }
            state.tokens -= 1.0;
        }
        state.in_flight += 1;
        Ok(())
    }

    /// Takes a reloaded principal list: principals that stay keep their requests in flight
    /// and their bucket (trimmed to a smaller burst) under their new settings, new ones start
    /// with a full bucket, and those no longer listed are forgotten (their requests still in
    /// flight release nothing).
    pub fn reconfigure<'a>(
        &mut self,
        principals: impl IntoIterator<Item = (&'a str, LimitSettings)>,
        now: Instant,
    ) {
        let mut kept = HashMap::new();
        for (name, settings) in principals {
            let state = match self.principals.remove(name) {
                Some(mut state) => {
                    state.tokens = state.tokens.min(f64::from(settings.burst.max(1)));
                    state.settings = settings;
                    state
                }
                None => PrincipalState::new(settings, now),
            };
            kept.insert(name.to_owned(), state);
        }
        self.principals = kept;
    }

    /// Gives back the concurrency slot of a request admitted earlier.
    pub fn release(&mut self, principal: &str) {
        if let Some(state) = self.principals.get_mut(principal) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }

    /// Requests in flight for `principal` (for /status).
    pub fn in_flight(&self, principal: &str) -> u32 {
        self.principals.get(principal).map_or(0, |s| s.in_flight)
    }
}

impl PrincipalState {
    /// A principal with a full bucket and nothing in flight.
    fn new(settings: LimitSettings, now: Instant) -> PrincipalState {
        PrincipalState {
            settings,
            tokens: f64::from(settings.burst.max(1)),
            refilled_at: now,
            in_flight: 0,
        }
    }

    /// When the bucket holds a whole token again. Any `rate` gives an answer: one too slow
    /// (or not a number) for a `Duration` waits the longest a `Duration` can say.
    fn time_to_next_token(&self, rate: f64) -> Duration {
        let missing = 1.0 - self.tokens;
        Duration::try_from_secs_f64(missing / rate).unwrap_or(Duration::MAX)
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        let capacity = f64::from(self.settings.burst.max(1));
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        self.refilled_at = now;
    }
}

/// [`Limits`] shared between connections, releasing slots when a [`Slot`] drops.
#[derive(Clone, Default)]
pub struct SharedLimits {
    inner: Arc<Mutex<Limits>>,
}

/// A request's hold on its principal's concurrency; released on drop.
pub struct Slot {
    limits: SharedLimits,
    principal: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits.lock().release(&self.principal);
    }
}

impl SharedLimits {
    pub fn new(limits: Limits) -> SharedLimits {
        SharedLimits {
            inner: Arc::new(Mutex::new(limits)),
        }
    }

    pub fn admit(&self, principal: &str) -> Result<Slot, Refusal> {
        self.lock().admit(principal, Instant::now())?;
        Ok(Slot {
            limits: self.clone(),
            principal: principal.to_owned(),
        })
    }

    pub fn in_flight(&self, principal: &str) -> u32 {
        self.lock().in_flight(principal)
    }

    /// See [`Limits::reconfigure`].
    pub fn reconfigure<'a>(&self, principals: impl IntoIterator<Item = (&'a str, LimitSettings)>) {
        self.lock().reconfigure(principals, Instant::now());
    }

    fn lock(&self) -> MutexGuard<'_, Limits> {
        // A panic while holding this lock cannot leave the counters inconsistent in a way
        // that matters more than refusing all traffic would, so keep using the data.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: Option<f64>, burst: u32, concurrent: Option<u32>, now: Instant) -> Limits {
        let mut limits = Limits::new();
        limits.add_principal(
            "lambda",
            LimitSettings {
                requests_per_second: rate,
                burst,
                max_concurrent: concurrent,
            },
            now,
        );
        limits
    }

    #[test]
    fn bucket_admits_burst_then_refuses_until_refilled() {
        let start = Instant::now();
        let mut limits = limits(Some(2.0), 3, None, start);
        let empty = Refusal::Rate {
            limit: 2.0,
            retry_after: Duration::from_millis(500),
        };
        assert_eq!(admit_until_refused(&mut limits, start), (3, empty));

        // Half a second at 2/s refills exactly one token.
        let later = start + Duration::from_millis(500);
        assert_eq!(admit_until_refused(&mut limits, later), (1, empty));
    }

    #[test]
    fn bucket_never_holds_more_than_burst() {
        let start = Instant::now();
        let mut limits = limits(Some(10.0), 2, None, start);
        let much_later = start + Duration::from_secs(3600);
        let (admitted, refusal) = admit_until_refused(&mut limits, much_later);
        assert_eq!(admitted, 2);
        assert!(matches!(refusal, Refusal::Rate { .. }));
    }

    #[test]
    fn concurrency_refuses_then_admits_after_release() {
        let now = Instant::now();
        let mut limits = limits(None, 1, Some(2), now);
        assert_eq!(limits.admit("lambda", now), Ok(()));
        assert_eq!(limits.admit("lambda", now), Ok(()));
        assert_eq!(
            limits.admit("lambda", now),
            Err(Refusal::Concurrency { limit: 2 })
        );
        assert_eq!(limits.in_flight("lambda"), 2);
        limits.release("lambda");
        assert_eq!(limits.admit("lambda", now), Ok(()));
    }

    #[test]
    fn concurrency_refusal_does_not_spend_a_rate_token() {
        let now = Instant::now();
        let mut limits = limits(Some(1.0), 1, Some(1), now);
        assert_eq!(limits.admit("lambda", now), Ok(()));
        // The bucket is now empty and the slot taken; concurrency is reported first.
        assert_eq!(
            limits.admit("lambda", now),
            Err(Refusal::Concurrency { limit: 1 })
        );
        limits.release("lambda");
        let next = now + Duration::from_secs(1);
        assert_eq!(limits.admit("lambda", next), Ok(()));
    }

    #[test]
    fn unlimited_principal_is_always_admitted() {
        let now = Instant::now();
        let mut limits = limits(None, 1, None, now);
        for _ in 0..10_000 {
            assert_eq!(limits.admit("lambda", now), Ok(()));
        }
        assert_eq!(limits.in_flight("lambda"), 10_000);
    }

    #[test]
    fn any_rate_refuses_without_panicking() {
        let start = Instant::now();
        for rate in [
            1e-25,
            f64::MIN_POSITIVE,
            0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            1e300,
        ] {
            let mut limits = limits(Some(rate), 1, None, start);
            let _ = limits.admit("lambda", start);
            limits.release("lambda");
            for later in [start, start + Duration::from_secs(1)] {
                // Admitted or refused, whatever the rate: only a panic fails this test.
                let _ = limits.admit("lambda", later);
                limits.release("lambda");
            }
        }
    }

    #[test]
    fn a_very_slow_rate_says_to_wait_as_long_as_a_duration_can() {
        let start = Instant::now();
        let mut limits = limits(Some(1e-25), 1, None, start);
        assert_eq!(limits.admit("lambda", start), Ok(()));
        let Err(Refusal::Rate { retry_after, .. }) = limits.admit("lambda", start) else {
            panic!("the second request must be rate-limited");
        };
        assert_eq!(retry_after, Duration::MAX);
    }

    #[test]
    fn slot_releases_on_drop() {
        let now = Instant::now();
        let shared = SharedLimits::new(limits(None, 1, Some(1), now));
        let slot = shared.admit("lambda").expect("first request fits");
        assert!(matches!(
            shared.admit("lambda"),
            Err(Refusal::Concurrency { limit: 1 })
        ));
        drop(slot);
        assert_eq!(shared.in_flight("lambda"), 0);
        assert!(shared.admit("lambda").is_ok());
    }

    /// Admits requests at `now`, each released at once, until one is refused; returns how
    /// many were admitted and the refusal.
    fn admit_until_refused(limits: &mut Limits, now: Instant) -> (u32, Refusal) {
        for admitted in 0..1000 {
            if let Err(refusal) = limits.admit("lambda", now) {
                return (admitted, refusal);
            }
            limits.release("lambda");
        }
        panic!("1000 requests in the same instant were all admitted");
    }
}
