//! Which relays may take traffic.
//!
//! A sans-IO core: [`Health`] is told the outcome of each probe (the relay's
//! `GET /_xpart/health` through the tunnel plus the WireGuard handshake age), of each
//! failed forward and of each passive failure seen while carrying requests, and the current
//! `Instant`; it says which relay to probe next, when to wake, which relays may take
//! requests (which of them takes the next one is `balance`'s choice) and which relays just
//! went up or down. The tokio driver that sends the probes lives in `monitor`.
//!
//! Being wrong about a relay costs differently in each direction, so there are two judgements.
//! Soft: a healthy relay that misses one probe (`probe_timeout`, 500 ms, every `interval`,
//! 250 ms) is `suspect`: new requests go to the relays that answered while there is one, and
//! the next good probe clears it. Nothing is closed, so a relay that only lost a packet or two
//! on a lossy link keeps what it is serving, and a relay that vanished (frozen, powered off,
//! cut off, no FIN) takes no new request within `interval + probe_timeout`, 750 ms.
//! Hard: the relay leaves the rotation and, when it does not answer at all, its requests in
//! flight are ended ([`HealthEvent::Lost`]). Passive signals do it at once
//! ([`Health::on_passive_failure`]): a failed connect, an HTTP/2 connection that breaks or
//! leaves a PING unanswered past its deadline, a stream the relay resets before answering.
//! Probes do it after `fail_after` failures in a row; a healthy relay that fails a probe is
//! probed again at once, so that takes `fail_after × probe_timeout` of silence (2 s with
//! the defaults), long enough that a TCP retransmission or two inside the tunnel does not
//! end requests that would have completed. Either way a relay comes back only after
//! `rise_after` good probes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How probes are paced and judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthSettings {
    /// Time between probes of a relay that answered its last one.
    pub interval: Duration,
    /// A probe that has not answered after this long has failed (enforced by the driver).
    pub probe_timeout: Duration,
    /// Consecutive failures that take a healthy relay out of service.
    pub fail_after: u32,
    /// Consecutive successes that bring a relay that was down back into service.
    pub rise_after: u32,
    /// A WireGuard session older than this cannot carry traffic (REJECT_AFTER_TIME is 180 s
    /// in the WireGuard paper, §6.1), so the relay counts as down whatever its probe said.
    pub handshake_max_age: Duration,
}

impl Default for HealthSettings {
    fn default() -> HealthSettings {
        HealthSettings {
            interval: Duration::from_millis(250),
            probe_timeout: Duration::from_millis(500),
            fail_after: 4,
            rise_after: 2,
            handshake_max_age: Duration::from_secs(180),
        }
    }
}

/// A relay by its place in `[[relay]]` order: the one identity the health core, the balancer,
/// forwarding, the monitor and the metrics share. Only [`Health`] makes them, so each names
/// a configured relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId(usize);

impl RelayId {
    /// The position in `[[relay]]` order, 0 first.
    pub fn index(self) -> usize {
        self.0
    }
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeOutcome {
    /// The relay answered 200; `handshake_age` is `None` when no tunnel is involved
    /// (host networking) and the age of the last WireGuard handshake otherwise.
    Ready { handshake_age: Option<Duration> },
    /// The relay answered but is not ready (503: drained or its upstream is unavailable).
    NotReady(String),
    /// No answer: connect failure, timeout, reset.
    Failed(String),
}

/// A sign, seen while carrying requests, that a relay cannot take more of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassiveFailure {
    /// No connection could be opened: refused, timed out, or the HTTP/2 handshake failed.
    ConnectFailed,
    /// The HTTP/2 connection broke, or did not answer a PING within its deadline.
    ConnectionLost,
    /// The relay reset a request's stream before answering it. The relay still answers, so
    /// what else it is serving goes on.
    StreamReset,
}

impl PassiveFailure {
    /// The `reason` label of `xpart_agent_relay_ejections_total`.
    pub fn label(self) -> &'static str {
        match self {
            PassiveFailure::ConnectFailed => "connect_failed",
            PassiveFailure::ConnectionLost => "connection_lost",
            PassiveFailure::StreamReset => "stream_reset",
        }
    }

    fn relay_answers(self) -> bool {
        match self {
            PassiveFailure::ConnectFailed => false,
            PassiveFailure::ConnectionLost => false,
            PassiveFailure::StreamReset => true,
        }
    }
}

/// A relay's place in the rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not probed yet; takes no traffic.
    Unknown,
    Healthy,
    Down,
}

/// A change the driver acts on (metrics, logs, aborting requests in flight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthEvent {
    Up {
        relay: RelayId,
    },
    /// Out of the rotation: new requests go elsewhere.
    Down {
        relay: RelayId,
        reason: String,
    },
    /// Out of the rotation and not answering at all: requests in flight there will never
    /// complete and are ended. A relay that answers "not ready" (drained) is only `Down`, so
    /// what it is already serving finishes.
    Lost {
        relay: RelayId,
    },
}

/// One relay's health as shown on /status.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RelayReport {
    pub name: String,
    pub state: State,
    /// Healthy but missed its last probe: takes new requests only when no other relay can.
    pub suspect: bool,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// Seconds since the state last changed.
    pub state_age_seconds: f64,
    /// Seconds since the relay last passed a probe; `None` before the first.
    pub last_success_age_seconds: Option<f64>,
}

/// Health of every relay, in `[[relay]]` order (index 0 first).
#[derive(Debug)]
pub struct Health {
    settings: HealthSettings,
    relays: Vec<RelayHealth>,
    events: VecDeque<HealthEvent>,
}

#[derive(Debug)]
struct RelayHealth {
    name: String,
    state: State,
    state_since: Instant,
    /// Missed its last probe: still in the rotation, but new requests go to a relay that
    /// answered while there is one. Cleared by the next good probe.
    suspect: bool,
    failures: u32,
    successes: u32,
    next_probe: Instant,
    probing: bool,
    last_error: Option<String>,
    last_success: Option<Instant>,
    /// `Lost` has been reported since the relay last answered.
    lost: bool,
}

impl Health {
    pub fn new(names: Vec<String>, settings: HealthSettings, now: Instant) -> Health {
        let relays = names
            .into_iter()
            .map(|name| RelayHealth {
                name,
                state: State::Unknown,
                state_since: now,
                suspect: false,
                failures: 0,
                successes: 0,
                next_probe: now,
                probing: false,
                last_error: None,
                last_success: None,
                lost: false,
            })
            .collect();
        Health {
            settings,
            relays,
            events: VecDeque::new(),
        }
    }

    pub fn settings(&self) -> HealthSettings {
        self.settings
    }

    /// Every relay, in `[[relay]]` order.
    pub fn ids(&self) -> impl Iterator<Item = RelayId> {
        (0..self.relays.len()).map(RelayId)
    }

    pub fn is_healthy(&self, relay: RelayId) -> bool {
        self.relays
            .get(relay.0)
            .is_some_and(|r| r.state == State::Healthy)
    }

    /// Healthy, but its last probe went unanswered.
    pub fn is_suspect(&self, relay: RelayId) -> bool {
        self.relays
            .get(relay.0)
            .is_some_and(|r| r.state == State::Healthy && r.suspect)
    }

    /// The healthy relays outside `exclude` that may take a new request: those not suspect
    /// when there is one, else the suspect ones, since a relay that missed a probe is a better
    /// bet than no relay at all.
    pub fn eligible(&self, exclude: &[RelayId]) -> Vec<RelayId> {
        let healthy: Vec<RelayId> = self
            .ids()
            .filter(|relay| !exclude.contains(relay) && self.is_healthy(*relay))
            .collect();
        let answering: Vec<RelayId> = healthy
            .iter()
            .copied()
            .filter(|relay| !self.is_suspect(*relay))
            .collect();
        if answering.is_empty() {
            healthy
        } else {
            answering
        }
    }

    #[cfg(test)]
    pub fn any_healthy(&self) -> bool {
        self.ids().any(|relay| self.is_healthy(relay))
    }

    /// A relay whose probe is due; the caller sends it and reports back with [`Health::on_probe`].
    pub fn poll_probe(&mut self, now: Instant) -> Option<RelayId> {
        let index = self
            .relays
            .iter()
            .position(|r| !r.probing && r.next_probe <= now)?;
        self.relays[index].probing = true;
        Some(RelayId(index))
    }

    /// When the next probe falls due (`None` while every relay has a probe out).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.relays
            .iter()
            .filter(|r| !r.probing)
            .map(|r| r.next_probe)
            .min()
    }

    pub fn poll_event(&mut self) -> Option<HealthEvent> {
        self.events.pop_front()
    }

    pub fn on_probe(&mut self, relay: RelayId, outcome: ProbeOutcome, now: Instant) {
        let settings = self.settings;
        let Some(r) = self.relays.get_mut(relay.0) else {
            return;
        };
        r.probing = false;
        let (reason, answered) = match outcome {
            ProbeOutcome::Ready {
                handshake_age: Some(age),
            } if age > settings.handshake_max_age => (
                format!(
                    "last WireGuard handshake {}s ago (limit {}s)",
                    age.as_secs(),
                    settings.handshake_max_age.as_secs()
                ),
                false,
            ),
            ProbeOutcome::Ready { .. } => return self.record_success(relay, now),
            ProbeOutcome::NotReady(reason) => (format!("relay not ready: {reason}"), true),
            ProbeOutcome::Failed(reason) => {
                r.suspect = true;
                (reason, false)
            }
        };
        self.record_failure(relay, reason, answered, now);
    }

    /// A forward to `relay` failed at the connection level (refused, reset, h2 error).
    /// Counts as a failed probe and asks for a probe at once, so a relay that died between
    /// probes leaves the rotation without waiting for the next tick.
    pub fn on_forward_failed(&mut self, relay: RelayId, reason: String, now: Instant) {
        if let Some(r) = self.relays.get_mut(relay.0) {
            r.suspect = true;
            self.record_failure(relay, reason, false, now);
        }
    }

    /// A passive failure of `relay`: out of the rotation at once, whatever `fail_after` says,
    /// and back after `rise_after` good probes like any relay that was down. Returns whether
    /// this took the relay out (it was healthy or not yet probed).
    pub fn on_passive_failure(
        &mut self,
        relay: RelayId,
        failure: PassiveFailure,
        reason: String,
        now: Instant,
    ) -> bool {
        let interval = self.settings.interval;
        let Some(r) = self.relays.get_mut(relay.0) else {
            return false;
        };
        r.successes = 0;
        r.failures = r.failures.saturating_add(1);
        r.last_error = Some(reason.clone());
        let ejected = r.state != State::Down;
        if ejected {
            r.state = State::Down;
            r.state_since = now;
            r.next_probe = r.next_probe.max(now + interval);
            self.events.push_back(HealthEvent::Down { relay, reason });
        }
        if !failure.relay_answers() && !r.lost {
            r.lost = true;
            self.events.push_back(HealthEvent::Lost { relay });
        }
        ejected
    }

    pub fn report(&self, now: Instant) -> Vec<RelayReport> {
        self.relays
            .iter()
            .map(|r| RelayReport {
                name: r.name.clone(),
                state: r.state,
                suspect: r.state == State::Healthy && r.suspect,
                consecutive_failures: r.failures,
                last_error: r.last_error.clone(),
                state_age_seconds: now.saturating_duration_since(r.state_since).as_secs_f64(),
                last_success_age_seconds: r
                    .last_success
                    .map(|at| now.saturating_duration_since(at).as_secs_f64()),
            })
            .collect()
    }

    fn record_success(&mut self, relay: RelayId, now: Instant) {
        let interval = self.settings.interval;
        let rise_after = self.settings.rise_after.max(1);
        let r = &mut self.relays[relay.0];
        r.failures = 0;
        r.suspect = false;
        r.lost = false;
        r.last_success = Some(now);
        r.successes = r.successes.saturating_add(1);
        r.next_probe = now + interval;
        let comes_up = match r.state {
            State::Healthy => false,
            // A relay that was never in service has nothing to flap back from.
            State::Unknown => true,
            State::Down => r.successes >= rise_after,
        };
        if comes_up {
            r.state = State::Healthy;
            r.state_since = now;
            r.last_error = None;
            self.events.push_back(HealthEvent::Up { relay });
        }
    }

    /// `answered`: the relay replied (not ready), as opposed to not replying at all.
    fn record_failure(&mut self, relay: RelayId, reason: String, answered: bool, now: Instant) {
        let settings = self.settings;
        let r = &mut self.relays[relay.0];
        r.successes = 0;
        r.failures = r.failures.saturating_add(1);
        r.last_error = Some(reason.clone());
        let goes_down = match r.state {
            State::Healthy => r.failures >= settings.fail_after.max(1),
            State::Unknown => true,
            State::Down => false,
        };
        if goes_down {
            r.state = State::Down;
            r.state_since = now;
            r.next_probe = now + settings.interval;
            self.events.push_back(HealthEvent::Down { relay, reason });
        } else if r.state == State::Healthy {
            r.next_probe = now;
        } else {
            r.next_probe = now + settings.interval;
        }
        if r.state == State::Down && !answered && !r.lost {
            r.lost = true;
            self.events.push_back(HealthEvent::Lost { relay });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READY: ProbeOutcome = ProbeOutcome::Ready {
        handshake_age: Some(Duration::from_secs(5)),
    };

    const RESET: &str = "stream reset by the relay: INTERNAL_ERROR";

    #[test]
    fn relays_take_no_traffic_until_a_probe_succeeds() {
        let (mut health, start) = relays(2);
        assert!(healthy(&health).is_empty());
        assert_eq!(health.poll_probe(start), Some(RelayId(0)));
        assert_eq!(health.poll_probe(start), Some(RelayId(1)));
        assert_eq!(health.poll_probe(start), None, "both probes are out");
        health.on_probe(RelayId(1), READY, start);
        assert_eq!(healthy(&health), [1]);
        health.on_probe(RelayId(0), READY, start);
        assert_eq!(healthy(&health), [0, 1]);
        assert_eq!(events(&mut health), [up(1), up(0)]);
    }

    #[test]
    fn probes_follow_the_interval() {
        let interval = HealthSettings::default().interval;
        let (mut health, start) = healthy_relays(2);
        assert_eq!(health.poll_timeout(), Some(start + interval));
        assert_eq!(
            health.poll_probe(start + interval - Duration::from_millis(1)),
            None
        );
        assert_eq!(health.poll_probe(start + interval), Some(RelayId(0)));
    }

    #[test]
    fn dead_primary_fails_over_within_three_seconds() {
        let settings = HealthSettings::default();
        let (mut health, start) = healthy_relays(2);

        // relay-a dies just after answering at `start`. Its next probe goes out one interval
        // later and times out; each immediate re-probe times out too.
        let mut t = start + settings.interval;
        for failure in 1..settings.fail_after {
            t = probe_times_out(&mut health, RelayId(0), t);
            assert_eq!(
                healthy(&health),
                [0, 1],
                "{failure} failure(s) are not enough"
            );
        }
        let last_fails = probe_times_out(&mut health, RelayId(0), t);

        assert_eq!(healthy(&health), [1]);
        assert!(last_fails - start <= Duration::from_secs(3));
        assert_eq!(events(&mut health), [down(0, "timed out"), lost(0)]);

        // Further failures do not repeat the loss; an answer re-arms it.
        probe(
            &mut health,
            RelayId(0),
            last_fails + settings.interval,
            failed(),
        );
        assert_eq!(health.poll_event(), None);
    }

    #[test]
    fn drained_relay_leaves_the_rotation_but_is_not_lost() {
        let (mut health, start) = healthy_relays(2);
        let t = start + Duration::from_secs(1);
        probe_all(&mut health, t, |relay| match relay.index() {
            0 => ProbeOutcome::NotReady("draining".into()),
            _ => READY,
        });
        assert_eq!(healthy(&health), [1]);
        assert_eq!(
            events(&mut health),
            [down(0, "relay not ready: draining")],
            "requests in flight on a drained relay finish"
        );

        // If the drained relay then stops answering, what it still holds is ended.
        probe(
            &mut health,
            RelayId(0),
            t + Duration::from_secs(1),
            failed(),
        );
        assert_eq!(events(&mut health), [lost(0)]);
    }

    #[test]
    fn forward_failure_counts_and_triggers_an_immediate_probe() {
        let (mut health, start) = healthy_relays(2);
        let later = start + Duration::from_millis(100);
        health.on_forward_failed(RelayId(0), "connection refused".into(), later);
        assert!(
            health.is_suspect(RelayId(0)),
            "new requests go elsewhere at once"
        );
        for _ in 1..HealthSettings::default().fail_after {
            probe(&mut health, RelayId(0), later, failed());
        }
        assert_eq!(healthy(&health), [1]);
    }

    #[test]
    fn a_lost_connection_takes_the_relay_out_at_once_and_probes_bring_it_back() {
        let settings = HealthSettings::default();
        let (mut health, start) = healthy_relays(2);

        let lost_at = start + settings.interval / 2;
        let ejected = health.on_passive_failure(
            RelayId(0),
            PassiveFailure::ConnectionLost,
            "keep-alive timed out".into(),
            lost_at,
        );
        assert!(ejected);
        assert_eq!(healthy(&health), [1], "no probe needed");
        assert_eq!(
            events(&mut health),
            [down(0, "keep-alive timed out"), lost(0)],
            "its requests in flight are ended"
        );

        // The same loss seen again by other requests changes nothing.
        let again = health.on_passive_failure(
            RelayId(0),
            PassiveFailure::ConnectFailed,
            "connection refused".into(),
            lost_at,
        );
        assert!(!again);
        assert_eq!(health.poll_event(), None);

        // Back after rise_after good probes, at the usual interval.
        assert_eq!(
            health.poll_probe(lost_at),
            None,
            "not probed before the interval"
        );
        let mut t = lost_at + settings.interval;
        for round in 1..=settings.rise_after {
            probe_all(&mut health, t, |_| READY);
            let expected: &[usize] = match round == settings.rise_after {
                true => &[0, 1],
                false => &[1],
            };
            assert_eq!(healthy(&health), expected, "after {round} good probe(s)");
            t += settings.interval;
        }
        assert_eq!(events(&mut health), [up(0)]);
    }

    #[test]
    fn a_stream_reset_takes_the_relay_out_but_lets_its_other_requests_finish() {
        let (mut health, start) = healthy_relays(2);
        let t = start + Duration::from_millis(100);
        let ejected =
            health.on_passive_failure(RelayId(1), PassiveFailure::StreamReset, RESET.into(), t);
        assert!(ejected);
        assert_eq!(healthy(&health), [0]);
        assert_eq!(
            events(&mut health),
            [down(1, RESET)],
            "not lost: it still answers"
        );
        assert_eq!(health.report(t)[1].state, State::Down);
    }

    #[test]
    fn a_failed_connect_to_a_relay_not_yet_probed_keeps_it_out() {
        let (mut health, start) = relays(2);
        assert!(health.on_passive_failure(
            RelayId(0),
            PassiveFailure::ConnectFailed,
            "connection refused".into(),
            start,
        ));
        assert_eq!(health.report(start)[0].state, State::Down);
        probe_all(&mut health, start, |_| READY);
        assert_eq!(healthy(&health), [1], "relay-a needs rise_after probes");
    }

    #[test]
    fn one_slow_probe_does_not_move_traffic() {
        let (mut health, start) = healthy_relays(2);
        let t = start + Duration::from_secs(1);
        probe(&mut health, RelayId(0), t, failed());
        probe(&mut health, RelayId(0), t, READY);
        assert_eq!(healthy(&health), [0, 1]);
        assert_eq!(health.poll_event(), None, "no down/up churn");
    }

    #[test]
    fn a_missed_probe_makes_a_relay_suspect_and_new_requests_avoid_it_until_it_answers() {
        let settings = HealthSettings::default();
        let (mut health, start) = healthy_relays(3);
        assert_eq!(ids(&health.eligible(&[])), [0, 1, 2]);

        // relay-a misses one probe: still healthy, nothing closed, no new request.
        let t = start + settings.interval;
        let missed = probe_times_out(&mut health, RelayId(0), t);
        assert!(health.is_healthy(RelayId(0)));
        assert!(health.is_suspect(RelayId(0)));
        assert_eq!(health.poll_event(), None, "soft: no down, no loss");
        assert_eq!(ids(&health.eligible(&[])), [1, 2]);
        assert_eq!(ids(&health.eligible(&[RelayId(1)])), [2]);
        let report = health.report(t);
        assert!(report[0].suspect && !report[1].suspect);

        // With every relay that answered already tried, the suspect one still takes it.
        assert_eq!(ids(&health.eligible(&[RelayId(1), RelayId(2)])), [0]);

        // The next good probe, sent at once, clears it with no rise_after wait.
        probe(&mut health, RelayId(0), missed, READY);
        assert!(!health.is_suspect(RelayId(0)));
        assert_eq!(ids(&health.eligible(&[])), [0, 1, 2]);
        assert_eq!(health.poll_event(), None, "no down/up churn");
    }

    #[test]
    fn a_lone_suspect_relay_still_takes_requests() {
        let settings = HealthSettings::default();
        let (mut health, start) = relays(2);
        probe_all(&mut health, start, |relay| match relay.index() {
            0 => READY,
            _ => ProbeOutcome::NotReady("drained".into()),
        });
        assert_eq!(healthy(&health), [0]);
        probe(&mut health, RelayId(0), start + settings.interval, failed());
        assert!(health.is_suspect(RelayId(0)));
        assert_eq!(
            ids(&health.eligible(&[])),
            [0],
            "better than no relay at all"
        );
    }

    #[test]
    fn a_relay_silent_for_fail_after_probes_is_lost_but_a_shorter_stall_is_not() {
        let settings = HealthSettings::default();
        let (mut health, start) = healthy_relays(2);

        // A stall shorter than fail_after probe deadlines (a retransmission or two on a lossy
        // link): suspect, but the requests in flight are left to finish.
        let stalled = (1..settings.fail_after).fold(start + settings.interval, |t, _| {
            probe_times_out(&mut health, RelayId(0), t)
        });
        assert!(health.is_healthy(RelayId(0)) && health.is_suspect(RelayId(0)));
        assert_eq!(health.poll_event(), None);
        let stall = stalled - start;
        assert!(stall >= Duration::from_millis(1500), "{stall:?}");

        // One more: silent for fail_after × probe_timeout, it is down and lost.
        let silence = probe_times_out(&mut health, RelayId(0), stalled) - start;
        assert_eq!(healthy(&health), [1]);
        assert!(!health.is_suspect(RelayId(0)), "down, not suspect");
        assert_eq!(events(&mut health), [down(0, "timed out"), lost(0)]);
        assert!(silence <= Duration::from_millis(2500), "{silence:?}");
    }

    #[test]
    fn stale_handshake_takes_relay_down_even_if_probe_answered() {
        let start = Instant::now();
        let mut health = Health::new(
            vec!["relay-a".into()],
            HealthSettings {
                fail_after: 1,
                ..HealthSettings::default()
            },
            start,
        );
        probe_all(&mut health, start, |_| READY);
        let t = start + Duration::from_secs(1);
        probe_all(&mut health, t, |_| ProbeOutcome::Ready {
            handshake_age: Some(Duration::from_secs(181)),
        });
        assert!(healthy(&health).is_empty());
        let report = health.report(t);
        assert_eq!(report[0].state, State::Down);
        assert!(report[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("handshake")));
    }

    #[test]
    fn drained_relay_goes_down_and_needs_two_successes_to_return() {
        let (mut health, start) = healthy_relays(2);
        let mut t = start + Duration::from_secs(1);
        probe_all(&mut health, t, |relay| match relay.index() {
            0 => ProbeOutcome::NotReady("draining".into()),
            _ => READY,
        });
        assert_eq!(healthy(&health), [1]);

        t += Duration::from_secs(1);
        probe_all(&mut health, t, |_| READY);
        assert_eq!(healthy(&health), [1], "one success is not enough");
        t += Duration::from_secs(1);
        probe_all(&mut health, t, |_| READY);
        assert_eq!(healthy(&health), [0, 1], "back in the rotation");
    }

    #[test]
    fn unknown_relay_that_fails_is_down_and_probed_on_interval() {
        let (mut health, start) = relays(2);
        probe_all(&mut health, start, |_| failed());
        assert!(healthy(&health).is_empty());
        assert_eq!(
            health.poll_timeout(),
            Some(start + HealthSettings::default().interval)
        );
        assert!(!health.any_healthy());
    }

    #[test]
    fn the_report_says_how_long_ago_each_relay_last_passed_a_probe() {
        let (mut health, start) = relays(2);
        assert_eq!(health.report(start)[0].last_success_age_seconds, None);
        probe_all(&mut health, start, |relay| match relay.index() {
            0 => READY,
            _ => failed(),
        });
        let later = start + Duration::from_secs(7);
        let report = health.report(later);
        assert_eq!(report[0].last_success_age_seconds, Some(7.0));
        assert_eq!(report[1].last_success_age_seconds, None);
        assert_eq!(report[1].last_error.as_deref(), Some("timed out"));
    }

    fn failed() -> ProbeOutcome {
        ProbeOutcome::Failed("timed out".into())
    }

    /// `count` relays named relay-a, relay-b, ... with the default settings, none probed yet,
    /// and the moment they were set up.
    fn relays(count: usize) -> (Health, Instant) {
        let start = Instant::now();
        let names = (b'a'..).take(count).map(|c| format!("relay-{}", c as char));
        let health = Health::new(names.collect(), HealthSettings::default(), start);
        (health, start)
    }

    /// `count` relays that each answered their first probe when set up, their `Up` events read.
    fn healthy_relays(count: usize) -> (Health, Instant) {
        let (mut health, start) = relays(count);
        probe_all(&mut health, start, |_| READY);
        events(&mut health);
        (health, start)
    }

    /// Answers every due probe with `outcome(relay)` at `now`.
    fn probe_all(health: &mut Health, now: Instant, outcome: impl Fn(RelayId) -> ProbeOutcome) {
        while let Some(relay) = health.poll_probe(now) {
            health.on_probe(relay, outcome(relay), now);
        }
    }

    /// Sends `relay`'s probe, which must be the one due at `at`, and answers it at once.
    fn probe(health: &mut Health, relay: RelayId, at: Instant, outcome: ProbeOutcome) {
        assert_eq!(
            health.poll_probe(at),
            Some(relay),
            "the probe due at {at:?}"
        );
        health.on_probe(relay, outcome, at);
    }

    /// Sends `relay`'s probe, which must be the one due at `sent`, and fails it when its
    /// deadline passes unanswered; returns that deadline.
    fn probe_times_out(health: &mut Health, relay: RelayId, sent: Instant) -> Instant {
        assert_eq!(
            health.poll_probe(sent),
            Some(relay),
            "the probe due at {sent:?}"
        );
        let deadline = sent + health.settings().probe_timeout;
        health.on_probe(relay, failed(), deadline);
        deadline
    }

    /// Every event not read yet, oldest first.
    fn events(health: &mut Health) -> Vec<HealthEvent> {
        std::iter::from_fn(|| health.poll_event()).collect()
    }

    fn up(index: usize) -> HealthEvent {
        HealthEvent::Up {
            relay: RelayId(index),
        }
    }

    fn down(index: usize, reason: &str) -> HealthEvent {
        HealthEvent::Down {
            relay: RelayId(index),
            reason: reason.into(),
        }
    }

    fn lost(index: usize) -> HealthEvent {
        HealthEvent::Lost {
            relay: RelayId(index),
        }
    }

    /// The indices of the relays that may take requests.
    fn healthy(health: &Health) -> Vec<usize> {
        health
            .ids()
            .filter(|relay| health.is_healthy(*relay))
            .map(RelayId::index)
            .collect()
    }

    fn ids(relays: &[RelayId]) -> Vec<usize> {
        relays.iter().map(|relay| relay.index()).collect()
    }
}
