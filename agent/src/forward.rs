//! Carrying requests to the relays: one HTTP/2 connection per relay through the tunnel,
//! multiplexing every request, re-established when it breaks.
//!
//! [`Relays`] pairs those connections with the [`Health`] core: it picks the relay for each
//! request, reports connection failures to the health core, and tells requests in flight
//! when their relay is declared dead so they end at once rather than hang.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{watch, Notify};
use xpart_tunnel::Network;

use crate::health::{Health, HealthEvent, HealthSettings, RelayReport};
use crate::streaming::BoxError;

pub type ForwardBody = UnsyncBoxBody<Bytes, BoxError>;

/// Where a relay listens inside the tunnel.
#[derive(Debug, Clone)]
pub struct RelayTarget {
    pub name: String,
    pub service_addr: SocketAddr,
}

/// Why a forward failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No connection could be made or kept; nothing was sent.
    #[error("relay {relay} unreachable: {reason}")]
    Unreachable { relay: String, reason: String },
    /// The request went out but the relay was declared dead before it answered.
    #[error("relay {relay} stopped answering while the request was in flight")]
    Lost { relay: String },
    /// The relay's connection failed after the request went out.
    #[error("relay {relay} failed the request: {reason}")]
    Failed { relay: String, reason: String },
}

/// Every relay, in priority order, with its connection and health.
pub struct Relays {
    links: Vec<Link>,
    health: Mutex<Health>,
    network: Network,
    connect_timeout: Duration,
    /// Wakes the health monitor when a forward failure asks for an immediate probe.
    probe_now: Notify,
}

struct Link {
    target: RelayTarget,
    sender: tokio::sync::Mutex<Option<http2::SendRequest<ForwardBody>>>,
    /// Bumped every time the relay is declared dead; requests in flight watch it.
    deaths: watch::Sender<u64>,
}

impl Relays {
    pub fn new(
        targets: Vec<RelayTarget>,
        settings: HealthSettings,
        network: Network,
        connect_timeout: Duration,
    ) -> Relays {
        let names = targets.iter().map(|t| t.name.clone()).collect();
        let links = targets
            .into_iter()
            .map(|target| Link {
                target,
                sender: tokio::sync::Mutex::new(None),
                deaths: watch::channel(0).0,
            })
            .collect();
        Relays {
            links,
            health: Mutex::new(Health::new(names, settings, Instant::now())),
            network,
            connect_timeout,
            probe_now: Notify::new(),
        }
    }

    /// The relay for the next request, if any is healthy.
    pub fn pick(&self) -> Option<usize> {
        self.health().pick()
    }

    pub fn any_healthy(&self) -> bool {
        self.health().any_healthy()
    }

    pub fn name(&self, relay: usize) -> &str {
        self.links
            .get(relay)
            .map_or("unknown", |l| l.target.name.as_str())
    }

    pub fn targets(&self) -> impl Iterator<Item = &RelayTarget> {
        self.links.iter().map(|l| &l.target)
    }

    pub fn report(&self) -> Vec<RelayReport> {
        self.health().report(Instant::now())
    }

    /// A future that resolves when `relay` is next declared dead.
    pub fn death_of(&self, relay: usize) -> impl std::future::Future<Output = ()> + Send + 'static {
        let receiver = self.links.get(relay).map(|l| l.deaths.subscribe());
        async move {
            match receiver {
                Some(mut receiver) => {
                    // An error means the relay set is gone (shutdown): treat as death.
                    let _ = receiver.changed().await;
                }
                None => std::future::pending().await,
            }
        }
    }

    /// An open, ready connection to `relay`; nothing has been sent when this fails.
    pub async fn ready_sender(
        &self,
        relay: usize,
    ) -> Result<http2::SendRequest<ForwardBody>, ForwardError> {
        let link = &self.links[relay];
        let mut slot = link.sender.lock().await;
        if let Some(sender) = slot.as_mut() {
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Ok(sender.clone());
            }
        }
        *slot = None;
        let mut sender = self.connect(&link.target).await?;
        sender
            .ready()
            .await
            .map_err(|e| unreachable(&link.target, e.to_string()))?;
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// Sends `request` to `relay` over a connection from [`Relays::ready_sender`], ending
    /// with [`ForwardError::Lost`] as soon as the relay is declared dead.
    pub async fn send(
        &self,
        relay: usize,
        mut sender: http2::SendRequest<ForwardBody>,
        mut request: Request<ForwardBody>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let link = &self.links[relay];
        *request.uri_mut() = absolute_uri(link.target.service_addr, request.uri());
        let death = self.death_of(relay);
        tokio::select! {
            response = sender.send_request(request) => response.map_err(|e| ForwardError::Failed {
                relay: link.target.name.clone(),
                reason: e.to_string(),
            }),
            () = death => Err(ForwardError::Lost { relay: link.target.name.clone() }),
        }
    }

    /// Drops the cached connection to `relay`, so the next use connects afresh (a connection
    /// through a tunnel whose peer vanished can stay open but silent).
    pub async fn forget_connection(&self, relay: usize) {
        if let Some(link) = self.links.get(relay) {
            *link.sender.lock().await = None;
        }
    }

    /// A request-level failure that says the relay's connection is broken.
    pub fn report_failure(&self, relay: usize, reason: String) {
        self.health()
            .on_forward_failed(relay, reason, Instant::now());
        self.probe_now.notify_one();
        self.apply_events();
    }

    /// Applies health changes: a relay declared dead loses its connection and its requests
    /// in flight. Returns the events for logging and metrics.
    pub fn apply_events(&self) -> Vec<HealthEvent> {
        let events: Vec<HealthEvent> = {
            let mut health = self.health();
            std::iter::from_fn(|| health.poll_event()).collect()
        };
        for event in &events {
            match event {
                HealthEvent::Down { relay, reason } => {
                    tracing::warn!(relay = self.name(*relay), %reason, "relay down");
                }
                HealthEvent::Lost { relay } => {
                    tracing::warn!(
                        relay = self.name(*relay),
                        "relay not answering; ending its requests in flight"
                    );
                    if let Some(link) = self.links.get(*relay) {
                        link.deaths.send_modify(|n| *n += 1);
                        if let Ok(mut slot) = link.sender.try_lock() {
                            *slot = None;
                        }
                    }
                }
                HealthEvent::Up { relay } => {
                    tracing::info!(relay = self.name(*relay), "relay up");
                }
            }
        }
        events
    }

    pub(crate) fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        // The health core has no invariants a panic elsewhere could half-update.
        self.health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn probe_requested(&self) -> &Notify {
        &self.probe_now
    }

    pub(crate) fn len(&self) -> usize {
        self.links.len()
    }

    async fn connect(
        &self,
        target: &RelayTarget,
    ) -> Result<http2::SendRequest<ForwardBody>, ForwardError> {
        let conn = tokio::time::timeout(
            self.connect_timeout,
            self.network.connect(target.service_addr),
        )
        .await
        .map_err(|_| {
            unreachable(
                target,
                format!("connect timed out after {:?}", self.connect_timeout),
            )
        })?
        .map_err(|e| unreachable(target, e.to_string()))?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .keep_alive_interval(Some(Duration::from_secs(5)))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(conn))
            .await
            .map_err(|e| unreachable(target, format!("HTTP/2 handshake: {e}")))?;
        let name = target.name.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(relay = %name, %error, "relay connection ended");
            }
        });
        Ok(sender)
    }
}

fn unreachable(target: &RelayTarget, reason: String) -> ForwardError {
    ForwardError::Unreachable {
        relay: target.name.clone(),
        reason,
    }
}

/// `http://<relay service address><path and query as the caller sent them>`.
fn absolute_uri(addr: SocketAddr, original: &Uri) -> Uri {
    let path = original.path_and_query().map_or("/", |pq| pq.as_str());
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = http::uri::Authority::try_from(addr.to_string()).ok();
    parts.path_and_query = http::uri::PathAndQuery::try_from(path).ok();
    // Every part comes from a valid URI or a socket address, so this cannot fail; fall back
    // to the original rather than panic if it somehow does.
    Uri::from_parts(parts).unwrap_or_else(|_| original.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_uri_keeps_path_and_query_byte_for_byte() {
        let original: Uri = "/model/us.anthropic.claude-3-5-haiku-20241022-v1%3A0/converse?x=1"
            .parse()
            .expect("valid");
        let uri = absolute_uri("100.64.0.2:8080".parse().expect("addr"), &original);
        assert_eq!(
            uri.to_string(),
            "http://100.64.0.2:8080/model/us.anthropic.claude-3-5-haiku-20241022-v1%3A0/converse?x=1"
        );
    }
}
