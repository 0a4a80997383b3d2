//! Carrying requests to the relays: one HTTP/2 connection per relay through the tunnel,
//! multiplexing every request, re-established when it breaks.
//!
//! [`Relays`] pairs those connections with the [`Health`] core: it picks the relay for each
//! request, reports connection failures to the health core, and tells requests in flight
//! when their relay is declared dead so they end at once rather than hang.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::{Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{watch, Notify};
use xpart_tunnel::{Network, PublicKey};

use crate::health::{Health, HealthEvent, HealthSettings, RelayId, RelayReport};
use crate::inner_tls::InnerTls;
use crate::streaming::BoxError;

pub type ForwardBody = UnsyncBoxBody<Bytes, BoxError>;

/// Where a relay listens inside the tunnel, and which WireGuard peer carries it.
#[derive(Debug, Clone)]
pub struct RelayTarget {
    pub name: String,
    pub service_addr: SocketAddr,
    /// The relay's WireGuard key, which names its peer in the tunnel's statistics; `None` when
    /// the host network carries the traffic.
    pub public_key: Option<PublicKey>,
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
    /// Set once at start when `[tunnel] inner_tls = true`.
    inner_tls: std::sync::OnceLock<Arc<InnerTls>>,
}

struct Link {
    target: RelayTarget,
    /// Never held across an await.
    slot: Mutex<Slot>,
    /// Numbers the connect attempts, so a finished one updates only its own slot.
    attempts: AtomicU64,
    /// Bumped every time the relay is declared dead; requests in flight watch it.
    deaths: watch::Sender<u64>,
}

/// The connection to one relay.
enum Slot {
    Idle,
    /// An attempt every request needing a connection waits on together.
    Connecting {
        id: u64,
        pending: PendingConnect,
    },
    Ready(http2::SendRequest<ForwardBody>),
}

type PendingConnect =
    Shared<BoxFuture<'static, Result<http2::SendRequest<ForwardBody>, ConnectError>>>;

/// Why a connection to a relay did not open. Clone, because every request waiting on the one
/// attempt gets the outcome.
#[derive(Debug, Clone, thiserror::Error)]
enum ConnectError {
    #[error("connect timed out after {0:?}")]
    TimedOut(Duration),
    #[error("{0}")]
    Connect(Arc<std::io::Error>),
    #[error("HTTP/2 handshake: {0}")]
    Handshake(Arc<hyper::Error>),
    #[error("{0}")]
    NotReady(Arc<hyper::Error>),
    #[error("connect task failed: {0}")]
    Task(Arc<tokio::task::JoinError>),
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
                slot: Mutex::new(Slot::Idle),
                attempts: AtomicU64::new(0),
                deaths: watch::channel(0).0,
            })
            .collect();
        Relays {
            links,
            health: Mutex::new(Health::new(names, settings, Instant::now())),
            network,
            connect_timeout,
            probe_now: Notify::new(),
            inner_tls: std::sync::OnceLock::new(),
        }
    }

    /// The relay for the next request, if any is healthy.
    pub fn pick(&self) -> Option<RelayId> {
        self.health().pick()
    }

    /// The first healthy relay by priority that is not in `tried`.
    pub fn pick_excluding(&self, tried: &[RelayId]) -> Option<RelayId> {
        let health = self.health();
        let mut ids = health.ids();
        ids.find(|r| !tried.contains(r) && health.is_healthy(*r))
    }

    pub fn name(&self, relay: RelayId) -> &str {
        self.target(relay)
            .map_or("unknown", |target| target.name.as_str())
    }

    pub fn target(&self, relay: RelayId) -> Option<&RelayTarget> {
        self.links.get(relay.index()).map(|l| &l.target)
    }

    pub fn targets(&self) -> impl Iterator<Item = &RelayTarget> {
        self.links.iter().map(|l| &l.target)
    }

    pub fn report(&self) -> Vec<RelayReport> {
        self.health().report(Instant::now())
    }

    /// A future that resolves when `relay` is next declared dead.
    pub fn death_of(
        &self,
        relay: RelayId,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let receiver = self.links.get(relay.index()).map(|l| l.deaths.subscribe());
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
    ///
    /// Waits at most about `connect_timeout`: every caller needing a new connection joins
    /// the one attempt in progress (which is itself bounded by `connect_timeout`) rather than
    /// queueing for attempts of its own, and all of them give up together as soon as the
    /// health monitor declares the relay dead.
    pub async fn ready_sender(
        &self,
        relay: RelayId,
    ) -> Result<http2::SendRequest<ForwardBody>, ForwardError> {
        let link = &self.links[relay.index()];
        // Subscribed before looking at the connection, so a death declared in between counts.
        let death = self.death_of(relay);
        let (attempt, pending) = match self.join_or_start_attempt(link) {
            Ok(sender) => return Ok(sender),
            Err(joined) => joined,
        };
        let outcome = tokio::select! {
            outcome = pending => outcome,
            () = death => {
                return Err(unreachable(
                    &link.target,
                    "declared dead while waiting for a connection".to_owned(),
                ))
            }
        };
        let mut slot = link.lock_slot();
        if matches!(&*slot, Slot::Connecting { id, .. } if *id == attempt) {
            *slot = match &outcome {
                Ok(sender) => Slot::Ready(sender.clone()),
                Err(_) => Slot::Idle,
            };
        }
        outcome.map_err(|reason| unreachable(&link.target, reason.to_string()))
    }

    /// Sends `request` to `relay` over a connection from [`Relays::ready_sender`], ending
    /// with [`ForwardError::Lost`] as soon as the relay is declared dead.
    pub async fn send(
        &self,
        relay: RelayId,
        mut sender: http2::SendRequest<ForwardBody>,
        mut request: Request<ForwardBody>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let link = &self.links[relay.index()];
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
    /// An attempt in progress is kept: it is fresh, and bounded by `connect_timeout`.
    pub fn forget_connection(&self, relay: RelayId) {
        if let Some(link) = self.links.get(relay.index()) {
            let mut slot = link.lock_slot();
            if matches!(&*slot, Slot::Ready(_)) {
                *slot = Slot::Idle;
            }
        }
    }

    /// A request-level failure that says the relay's connection is broken.
    pub fn report_failure(&self, relay: RelayId, reason: String) {
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
                    if let Some(link) = self.links.get(relay.index()) {
                        // Emptied first, so a request that misses the death joins no stale attempt.
                        *link.lock_slot() = Slot::Idle;
                        link.deaths.send_modify(|n| *n += 1);
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

    /// Wraps every relay connection opened from now on in the inner TLS
    /// ([`crate::inner_tls`]); called once at start, before any connection.
    pub fn use_inner_tls(&self, tls: InnerTls) {
        let _ = self.inner_tls.set(Arc::new(tls));
    }

    /// Whether relay connections run over the inner TLS.
    pub fn inner_tls(&self) -> bool {
        self.inner_tls.get().is_some()
    }

    pub(crate) fn len(&self) -> usize {
        self.links.len()
    }

    /// A live cached connection, or the (possibly new) shared attempt to open one with its id.
    fn join_or_start_attempt(
        &self,
        link: &Link,
    ) -> Result<http2::SendRequest<ForwardBody>, (u64, PendingConnect)> {
        let mut slot = link.lock_slot();
        match &*slot {
            Slot::Ready(sender) if !sender.is_closed() => return Ok(sender.clone()),
            Slot::Connecting { id, pending } => return Err((*id, pending.clone())),
            Slot::Ready(_) | Slot::Idle => {}
        }
        let id = link.attempts.fetch_add(1, Ordering::Relaxed);
        // Spawned so the attempt runs to its end even if every waiter goes away, and so that
        // no waiter's lock is held while it runs.
        let task = tokio::spawn(connect(
            self.network.clone(),
            link.target.clone(),
            self.connect_timeout,
            self.inner_tls.get().cloned(),
        ));
        let pending = async move {
            task.await
                .unwrap_or_else(|e| Err(ConnectError::Task(Arc::new(e))))
        }
        .boxed()
        .shared();
        *slot = Slot::Connecting {
            id,
            pending: pending.clone(),
        };
        Err((id, pending))
    }
}

impl Link {
    fn lock_slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        // Every write replaces the whole slot, so a poisoned one is still consistent.
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Opens a connection to `target` and completes the HTTP/2 handshake, all within `timeout`.
async fn connect(
    network: Network,
    target: RelayTarget,
    timeout: Duration,
    inner_tls: Option<Arc<InnerTls>>,
) -> Result<http2::SendRequest<ForwardBody>, ConnectError> {
    let open = open_http2(&network, &target, inner_tls.as_deref());
    tokio::time::timeout(timeout, open)
        .await
        .unwrap_or(Err(ConnectError::TimedOut(timeout)))
}

async fn open_http2(
    network: &Network,
    target: &RelayTarget,
    inner_tls: Option<&InnerTls>,
) -> Result<http2::SendRequest<ForwardBody>, ConnectError> {
    let conn = network
        .connect(target.service_addr)
        .await
        .map_err(|e| ConnectError::Connect(Arc::new(e)))?;
    let conn = crate::inner_tls::wrap(inner_tls, conn, &target.name)
        .await
        .map_err(|e| ConnectError::Connect(Arc::new(e)))?;
    let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(conn))
        .await
        .map_err(|e| ConnectError::Handshake(Arc::new(e)))?;
    let name = target.name.clone();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(relay = %name, %error, "relay connection ended");
        }
    });
    sender
        .ready()
        .await
        .map_err(|e| ConnectError::NotReady(Arc::new(e)))?;
    Ok(sender)
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

    /// A loopback address whose accept queue is full, so connection attempts get no answer.
    async fn blackhole() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut filler = Vec::new();
        while let Ok(stream) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            filler.push(stream.expect("fill accept queue"));
            assert!(filler.len() < 64, "accept queue never filled");
        }
        (listener, filler)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_for_a_connection_all_give_up_when_the_relay_is_declared_dead() {
        let (hole, _filler) = blackhole().await;
        let relays = std::sync::Arc::new(Relays::new(
            vec![RelayTarget {
                name: "relay-a".into(),
                service_addr: hole.local_addr().expect("addr"),
                public_key: None,
            }],
            HealthSettings::default(),
            Network::host(),
            // Far longer than the test may take: only the death can end the waits.
            Duration::from_secs(30),
        ));
        let relay = relays.health().ids().next().expect("one relay");
        relays.health().on_probe(
            relay,
            crate::health::ProbeOutcome::Ready {
                handshake_age: None,
            },
            Instant::now(),
        );
        relays.apply_events();
        let waiters: Vec<_> = (0..32)
            .map(|_| {
                let relays = relays.clone();
                tokio::spawn(async move { relays.ready_sender(relay).await.map(|_| ()) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let declared = Instant::now();
        relays.report_failure(relay, "probe timed out".into());
        relays.report_failure(relay, "probe timed out".into());
        for waiter in waiters {
            let outcome = tokio::time::timeout(Duration::from_secs(2), waiter)
                .await
                .expect("a waiter outlived the relay's death")
                .expect("waiter task");
            assert!(
                matches!(&outcome, Err(ForwardError::Unreachable { reason, .. }) if reason.contains("declared dead")),
                "{outcome:?}"
            );
        }
        assert!(declared.elapsed() < Duration::from_millis(500));
    }
}
