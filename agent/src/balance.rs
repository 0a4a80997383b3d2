//! Which healthy relay takes the next request.
//!
//! Relays are grouped by `priority`, lower first: requests go to the first group with a
//! healthy relay, and a group further down takes traffic only while none above it can. Inside
//! the group, the relay with the fewest requests outstanding for its `weight` takes the
//! request: the lowest `(outstanding + 1) / weight`, the share it would carry with this
//! request added, so a relay of weight 3 carries three requests for every one a relay of
//! weight 1 carries while they overlap. Ties go to the relay listed first, so a caller that
//! sends one request at a time stays on the first relay of the group. A relay that is slow
//! or stuck keeps its requests outstanding and gets fewer new ones.
//!
//! Outstanding counts are claimed with [`Balancer::claim`] and given back when the returned
//! [`Outstanding`] is dropped, at the end of the request whichever way it ends. No clock, no
//! IO: the balancer is told which relays may take the request (healthy, not yet tried).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::health::RelayId;

/// A relay's place in the balancing, from its `[[relay]]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// The relay's group; lower is preferred.
    pub priority: u32,
    /// Its share of the group's requests; at least 1.
    pub weight: u32,
}

impl Default for Share {
    fn default() -> Share {
        Share {
            priority: DEFAULT_PRIORITY,
            weight: DEFAULT_WEIGHT,
        }
    }
}

/// Every relay in one group unless the config says otherwise: they share the load.
pub const DEFAULT_PRIORITY: u32 = 0;
pub const DEFAULT_WEIGHT: u32 = 1;

/// The relays' shares and their outstanding requests, in `[[relay]]` order.
#[derive(Debug)]
pub struct Balancer {
    relays: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    share: Share,
    outstanding: Arc<AtomicUsize>,
}

/// One request counted against a relay until this is dropped.
#[derive(Debug)]
pub struct Outstanding {
    counter: Arc<AtomicUsize>,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    pub fn new(shares: impl IntoIterator<Item = Share>) -> Balancer {
        let relays = shares
            .into_iter()
            .map(|share| Entry {
                share: Share {
                    weight: share.weight.max(1),
                    ..share
                },
                outstanding: Arc::new(AtomicUsize::new(0)),
            })
            .collect();
        Balancer { relays }
    }

    /// The relay among `eligible` that takes the next request.
    pub fn choose(&self, eligible: impl IntoIterator<Item = RelayId>) -> Option<RelayId> {
        let mut best: Option<(RelayId, u32, u128, u128)> = None;
        for relay in eligible {
            let Some(entry) = self.relays.get(relay.index()) else {
                continue;
            };
            let load = self.outstanding(relay) as u128 + 1;
            let weight = u128::from(entry.share.weight);
            let priority = entry.share.priority;
            let better = match best {
                None => true,
                Some((chosen, best_priority, best_load, best_weight)) => {
                    match priority.cmp(&best_priority) {
                        std::cmp::Ordering::Less => true,
                        std::cmp::Ordering::Greater => false,
                        // load / weight < best_load / best_weight, without division.
                        std::cmp::Ordering::Equal => {
                            match (load * best_weight).cmp(&(best_load * weight)) {
                                std::cmp::Ordering::Less => true,
                                std::cmp::Ordering::Greater => false,
                                std::cmp::Ordering::Equal => relay.index() < chosen.index(),
                            }
                        }
                    }
                }
            };
            if better {
                best = Some((relay, priority, load, weight));
            }
        }
        best.map(|(relay, ..)| relay)
    }

    /// The relays among `eligible` in the best group: those that take requests now.
    pub fn active(&self, eligible: impl IntoIterator<Item = RelayId>) -> Vec<RelayId> {
        let eligible: Vec<RelayId> = eligible
            .into_iter()
            .filter(|relay| relay.index() < self.relays.len())
            .collect();
        let best = eligible
            .iter()
            .map(|relay| self.relays[relay.index()].share.priority)
            .min();
        eligible
            .into_iter()
            .filter(|relay| Some(self.relays[relay.index()].share.priority) == best)
            .collect()
    }

    /// Counts one request against `relay` until the result is dropped.
    pub fn claim(&self, relay: RelayId) -> Option<Outstanding> {
        let counter = self.relays.get(relay.index())?.outstanding.clone();
        counter.fetch_add(1, Ordering::Relaxed);
        Some(Outstanding { counter })
    }

    /// Requests claimed against `relay` and not yet given back.
    pub fn outstanding(&self, relay: RelayId) -> usize {
        self.relays
            .get(relay.index())
            .map_or(0, |entry| entry.outstanding.load(Ordering::Relaxed))
    }

    pub fn share(&self, relay: RelayId) -> Option<Share> {
        self.relays.get(relay.index()).map(|entry| entry.share)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::health::{Health, HealthSettings};

    #[test]
    fn overlapping_requests_spread_by_outstanding_count() {
        let (ids, balancer) = relays(&[(0, 1), (0, 1), (0, 1)]);
        let mut held = Vec::new();
        let mut order = Vec::new();
        for _ in 0..6 {
            let relay = balancer.choose(ids.iter().copied()).expect("a relay");
            order.push(relay.index());
            held.push(balancer.claim(relay).expect("configured"));
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
        assert_eq!(counts(&balancer, &ids), [2, 2, 2]);
    }

    #[test]
    fn a_finished_request_frees_its_relay_for_the_next() {
        let (ids, balancer) = relays(&[(0, 1), (0, 1)]);
        let first = balancer.claim(ids[0]).expect("configured");
        let _second = balancer.claim(ids[1]).expect("configured");
        let _third = balancer.claim(ids[1]).expect("configured");
        assert_eq!(balancer.choose(ids.iter().copied()), Some(ids[0]));
        let _fourth = balancer.claim(ids[0]).expect("configured");
        drop(first);
        assert_eq!(counts(&balancer, &ids), [1, 2]);
        assert_eq!(balancer.choose(ids.iter().copied()), Some(ids[0]));
    }

    #[test]
    fn one_request_at_a_time_stays_on_the_first_relay() {
        let (ids, balancer) = relays(&[(0, 1), (0, 1)]);
        for _ in 0..5 {
            let relay = balancer.choose(ids.iter().copied()).expect("a relay");
            assert_eq!(relay, ids[0]);
            drop(balancer.claim(relay));
        }
        assert_eq!(counts(&balancer, &ids), [0, 0]);
    }

    #[test]
    fn weights_set_the_share_of_overlapping_requests() {
        let (ids, balancer) = relays(&[(0, 1), (0, 3)]);
        let held: Vec<Outstanding> = (0..8)
            .map(|_| {
                let relay = balancer.choose(ids.iter().copied()).expect("a relay");
                balancer.claim(relay).expect("configured")
            })
            .collect();
        assert_eq!(counts(&balancer, &ids), [2, 6]);
        drop(held);
        // Idle, the heavier relay takes the first request: it would carry 1/3 of a request.
        assert_eq!(balancer.choose(ids.iter().copied()), Some(ids[1]));
    }

    #[test]
    fn a_lower_group_takes_traffic_only_while_no_relay_above_it_can() {
        let (ids, balancer) = relays(&[(1, 1), (0, 1), (0, 1), (1, 5)]);
        let held: Vec<Outstanding> = (0..10)
            .map(|_| {
                let relay = balancer.choose(ids.iter().copied()).expect("a relay");
                balancer.claim(relay).expect("configured")
            })
            .collect();
        assert_eq!(counts(&balancer, &ids), [0, 5, 5, 0], "however loaded");
        assert_eq!(balancer.active(ids.iter().copied()), [ids[1], ids[2]]);

        // Group 0 out (its relays are not eligible): group 1 shares by weight.
        let group_one = [ids[0], ids[3]];
        let more: Vec<Outstanding> = (0..6)
            .map(|_| {
                let relay = balancer.choose(group_one).expect("a relay");
                balancer.claim(relay).expect("configured")
            })
            .collect();
        assert_eq!(counts(&balancer, &ids), [1, 5, 5, 5]);
        assert_eq!(balancer.active(group_one), group_one);
        drop((held, more));
        assert_eq!(balancer.choose([]), None);
    }

    #[test]
    fn a_weight_of_zero_counts_as_one() {
        let (ids, balancer) = relays(&[(0, 0), (0, 1)]);
        assert_eq!(balancer.share(ids[0]).map(|s| s.weight), Some(1));
        let _a = balancer.claim(ids[0]);
        assert_eq!(balancer.choose(ids.iter().copied()), Some(ids[1]));
    }

    #[test]
    fn a_suspect_relay_gets_no_new_request_while_another_answers_however_idle_it_is() {
        use crate::health::ProbeOutcome;
        let start = Instant::now();
        let settings = HealthSettings::default();
        let mut health = Health::new(vec!["relay-a".into(), "relay-b".into()], settings, start);
        let ids: Vec<RelayId> = health.ids().collect();
        let ready = || ProbeOutcome::Ready {
            handshake_age: None,
        };
        for relay in &ids {
            assert!(health.poll_probe(start).is_some());
            health.on_probe(*relay, ready(), start);
        }
        let balancer = Balancer::new([Share::default(), Share::default()]);
        let _busy: Vec<Outstanding> = (0..3).filter_map(|_| balancer.claim(ids[1])).collect();
        assert_eq!(balancer.choose(health.eligible(&[])), Some(ids[0]), "idle");

        let missed = start + settings.interval;
        assert_eq!(health.poll_probe(missed), Some(ids[0]));
        health.on_probe(ids[0], ProbeOutcome::Failed("timed out".into()), missed);
        assert_eq!(balancer.choose(health.eligible(&[])), Some(ids[1]));
        assert_eq!(balancer.active(health.eligible(&[])), [ids[1]]);
        // relay-b already tried: the suspect relay is better than none.
        assert_eq!(balancer.choose(health.eligible(&[ids[1]])), Some(ids[0]));

        assert_eq!(health.poll_probe(missed), Some(ids[0]));
        health.on_probe(ids[0], ready(), missed);
        assert_eq!(balancer.choose(health.eligible(&[])), Some(ids[0]));
    }

    /// Relay ids (made by the health core, their one maker) and a balancer for `shares`
    /// given as (priority, weight).
    fn relays(shares: &[(u32, u32)]) -> (Vec<RelayId>, Balancer) {
        let names = (0..shares.len()).map(|i| format!("relay-{i}")).collect();
        let health = Health::new(names, HealthSettings::default(), Instant::now());
        let balancer = Balancer::new(
            shares
                .iter()
                .map(|&(priority, weight)| Share { priority, weight }),
        );
        (health.ids().collect(), balancer)
    }

    fn counts(balancer: &Balancer, ids: &[RelayId]) -> Vec<usize> {
        ids.iter()
            .map(|relay| balancer.outstanding(*relay))
            .collect()
    }
}
