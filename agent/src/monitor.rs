//! The health core's driver: sends each due probe through the tunnel, feeds the outcomes
//! back and applies the resulting up/down events ([`Relays::apply_events`]: logs, relay
//! gauges, requests in flight on a dead relay). A relay's tunnel statistics are found by its
//! WireGuard key, the peer's identity in the tunnel.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::sync::{mpsc, watch};
use xpart_tunnel::{PeerStats, PublicKey};

use crate::forward::{ForwardError, Relays};
use crate::health::{ProbeOutcome, RelayId};
use crate::metrics::Metrics;

/// Reads the tunnel's per-peer counters; absent when the host network carries the traffic.
pub use xpart_daemon::admin::PeerSource;

/// Probes until `shutdown` turns true.
pub async fn run(
    relays: Arc<Relays>,
    peers: Option<PeerSource>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let (results_tx, mut results) =
        mpsc::channel::<(RelayId, ProbeOutcome)>(relays.len().max(1) * 2);
    for target in relays.targets() {
        metrics
            .relay_healthy
            .with_label_values(&[&target.name])
            .set(0);
    }
    loop {
        let due: Vec<RelayId> = {
            let mut health = relays.health();
            let now = Instant::now();
            std::iter::from_fn(|| health.poll_probe(now)).collect()
        };
        for relay in due {
            let relays = relays.clone();
            let peers = peers.clone();
            let results = results_tx.clone();
            tokio::spawn(async move {
                let outcome = probe(&relays, relay, peers.as_ref()).await;
                let _ = results.send((relay, outcome)).await;
            });
        }
        let wake = relays
            .health()
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            Some((relay, outcome)) = results.recv() => {
                relays.health().on_probe(relay, outcome, Instant::now());
            }
            () = tokio::time::sleep_until(wake.into()) => {}
            () = relays.probe_requested().notified() => {}
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return;
                }
            }
        }
        relays.apply_events();
    }
}

async fn probe(relays: &Relays, relay: RelayId, peers: Option<&PeerSource>) -> ProbeOutcome {
    let timeout = relays.health().settings().probe_timeout;
    let answer = tokio::time::timeout(timeout, health_request(relays, relay)).await;
    let status = match answer {
        Err(_) => return ProbeOutcome::Failed(format!("health check timed out after {timeout:?}")),
        Ok(Err(reason)) => return ProbeOutcome::Failed(reason.to_string()),
        Ok(Ok(status)) => status,
    };
    if status != StatusCode::OK {
        return ProbeOutcome::NotReady(format!("health check answered {status}"));
    }
    let public_key = relays.target(relay).and_then(|t| t.public_key.as_ref());
    let handshake_age = peers.map(|peers| handshake_age(&peers(), public_key, SystemTime::now()));
    ProbeOutcome::Ready { handshake_age }
}

/// How long ago the tunnel last shook hands with the relay whose WireGuard key is
/// `public_key`, the key that names a peer in the tunnel whatever the config calls it. A probe
/// that crossed the tunnel without a handshake on record counts as fresh.
fn handshake_age(peers: &[PeerStats], public_key: Option<&PublicKey>, now: SystemTime) -> Duration {
    let Some(key) = public_key.map(PublicKey::to_base64) else {
        return Duration::ZERO;
    };
    peers
        .iter()
        .find(|peer| peer.public_key == key)
        .and_then(|peer| peer.last_handshake)
        .and_then(|at| now.duration_since(at).ok())
        .unwrap_or_default()
}

async fn health_request(relays: &Relays, relay: RelayId) -> Result<StatusCode, ForwardError> {
    let sender = relays.ready_sender(relay).await?;
    let mut request = Request::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *request.method_mut() = Method::GET;
    // A constant path, checked by every health test.
    *request.uri_mut() = http::Uri::from_static(xpart_bedrock::protocol::HEALTH_PATH);
    let response = relays.send(relay, sender, request).await?;
    let status = response.status();
    // Drain the small body so the stream closes cleanly.
    let _ = response.into_body().collect().await;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use xpart_tunnel::PrivateKey;

    use super::*;

    #[test]
    fn handshake_age_is_found_by_the_relays_key_not_its_name() {
        let now = SystemTime::now();
        let relay_a = PrivateKey::generate().public_key();
        let relay_b = PrivateKey::generate().public_key();
        // The tunnel's labels need not match the [[relay]] names.
        let peers = [
            stats("relay-a", &relay_b, Some(now - Duration::from_secs(400))),
            stats(
                "tunnel-peer-0",
                &relay_a,
                Some(now - Duration::from_secs(7)),
            ),
        ];
        assert_eq!(
            handshake_age(&peers, Some(&relay_a), now),
            Duration::from_secs(7)
        );
        assert_eq!(
            handshake_age(&peers, Some(&relay_b), now),
            Duration::from_secs(400)
        );
        let unknown = PrivateKey::generate().public_key();
        assert_eq!(handshake_age(&peers, Some(&unknown), now), Duration::ZERO);
        assert_eq!(handshake_age(&peers, None, now), Duration::ZERO);
    }

    fn stats(name: &str, key: &PublicKey, last_handshake: Option<SystemTime>) -> PeerStats {
        PeerStats {
            name: name.to_owned(),
            public_key: key.to_base64(),
            endpoint: None,
            last_handshake,
            rx_bytes: 0,
            tx_bytes: 0,
            rx_packets: 0,
            tx_packets: 0,
            drops: BTreeMap::new(),
        }
    }
}
