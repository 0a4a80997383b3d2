//! The health core's driver: sends each due probe through the tunnel, feeds the outcomes
//! back, applies the resulting up/down events and keeps the relay and tunnel gauges current.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::sync::{mpsc, watch};

use crate::forward::Relays;
use crate::health::{HealthEvent, ProbeOutcome};
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
    let (results_tx, mut results) = mpsc::channel::<(usize, ProbeOutcome)>(relays.len().max(1) * 2);
    for target in relays.targets() {
        metrics
            .relay_healthy
            .with_label_values(&[&target.name])
            .set(0);
    }
    loop {
        let due: Vec<usize> = {
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
                let failed = !matches!(outcome, ProbeOutcome::Ready { .. });
                relays.health().on_probe(relay, outcome, Instant::now());
                if failed {
                    relays.forget_connection(relay);
                }
            }
            () = tokio::time::sleep_until(wake.into()) => {}
            () = relays.probe_requested().notified() => {}
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return;
                }
            }
        }
        for event in relays.apply_events() {
            let (relay, up) = match event {
                HealthEvent::Up { relay } => (relay, 1),
                HealthEvent::Down { relay, .. } => (relay, 0),
                HealthEvent::Lost { .. } => continue,
            };
            metrics
                .relay_healthy
                .with_label_values(&[relays.name(relay)])
                .set(up);
        }
    }
}

async fn probe(relays: &Relays, relay: usize, peers: Option<&PeerSource>) -> ProbeOutcome {
    let timeout = relays.health().settings().probe_timeout;
    let answer = tokio::time::timeout(timeout, health_request(relays, relay)).await;
    let status = match answer {
        Err(_) => return ProbeOutcome::Failed(format!("health check timed out after {timeout:?}")),
        Ok(Err(reason)) => return ProbeOutcome::Failed(reason),
        Ok(Ok(status)) => status,
    };
    if status != StatusCode::OK {
        return ProbeOutcome::NotReady(format!("health check answered {status}"));
    }
    let handshake_age = peers.map(|peers| {
        peers()
            .into_iter()
            .find(|p| p.name == relays.name(relay))
            .and_then(|p| p.last_handshake)
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            // No handshake recorded although the probe crossed the tunnel: count it as fresh.
            .unwrap_or_default()
    });
    ProbeOutcome::Ready { handshake_age }
}

async fn health_request(relays: &Relays, relay: usize) -> Result<StatusCode, String> {
    let sender = relays
        .ready_sender(relay)
        .await
        .map_err(|e| e.to_string())?;
    let request = Request::builder()
        .method(Method::GET)
        .uri(xpart_daemon::protocol::HEALTH_PATH)
        .body(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .map_err(|e| e.to_string())?;
    let response = relays
        .send(relay, sender, request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    // Drain the small body so the stream closes cleanly.
    let _ = response.into_body().collect().await;
    Ok(status)
}
