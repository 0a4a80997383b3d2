//! Carrying requests to the relays: one HTTP/2 connection per relay through the tunnel,
//! multiplexing every request, re-established when it breaks.
//!
//! [`Relays`] pairs those connections with the [`Health`] core and the [`Balancer`]: it picks
//! the relay for each request, counts it against that relay until it ends, reports what the
//! connections show to the health core, and tells requests in flight when their relay is
//! declared dead so they end at once rather than hang.
//!
//! The connections watch themselves: after `ping_interval` without a frame from the relay the
//! agent sends an HTTP/2 PING, and a PING unanswered within `ping_timeout` ends the
//! connection. A connection that ends with an error, a connect that fails and a stream the
//! relay resets before answering are passive failures: the relay leaves the rotation at once
//! rather than after `fail_after` failed probes. The PING deadline is the hard one, which ends
//! the requests in flight, so it is set for a lossy WAN (1 s + 2 s); a relay that vanished
//! without a word stops taking new requests sooner, when it misses one probe and becomes
//! suspect (see [`crate::health`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::{Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use tokio::sync::{watch, Notify};
use xpart_tunnel::{Network, PublicKey};

use crate::balance::{Balancer, Outstanding, Share};
use crate::health::{Health, HealthEvent, HealthSettings, PassiveFailure, RelayId, RelayReport};
use crate::inner_tls::InnerTls;
use crate::metrics::Metrics;
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
    /// Its group and weight in the balancing.
    pub share: Share,
}

/// How the connections to the relays are opened and watched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionSettings {
    /// Opening a connection (TCP and the HTTP/2 handshake) takes at most this long.
    pub connect_timeout: Duration,
    /// Silence on a connection after which the agent sends a PING.
    pub ping_interval: Duration,
    /// A PING unanswered this long ends the connection, its requests in flight and the relay's
    /// place in the rotation: long enough that a healthy relay over a lossy link, whose
    /// answers a TCP retransmission or two delays, keeps what it is serving.
    pub ping_timeout: Duration,
}

impl Default for ConnectionSettings {
    fn default() -> ConnectionSettings {
        ConnectionSettings {
            connect_timeout: Duration::from_millis(1000),
            ping_interval: Duration::from_millis(1000),
            ping_timeout: Duration::from_millis(2000),
        }
    }
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

/// A request the relays took: which one, its count against that relay (held until the
/// answer ends), when it went out, and the answer's head.
pub struct Dispatched {
    pub relay: RelayId,
    pub load: RelayLoad,
    pub sent_at: Instant,
    pub response: Response<Incoming>,
}

/// Why [`Relays::dispatch`] has no answer.
#[derive(Debug)]
pub enum DispatchError {
    /// Nothing was sent: no relay was healthy (`None`), or none of those tried could take it.
    NotSent(Option<ForwardError>),
    /// The request went to `relay`, which failed before answering.
    Failed { relay: RelayId, error: ForwardError },
}

/// One request counted against a relay (and its `xpart_agent_relay_outstanding` gauge) until
/// this is dropped.
pub struct RelayLoad {
    _claim: Outstanding,
    gauge: IntGauge,
}

impl Drop for RelayLoad {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Every relay, in `[[relay]]` order, with its connection and health.
pub struct Relays {
    links: Vec<Link>,
    health: Mutex<Health>,
    balancer: Balancer,
    network: Network,
    connection: ConnectionSettings,
    metrics: Metrics,
    /// Wakes the health monitor when a forward failure asks for an immediate probe.
    probe_now: Notify,
    /// For the connection tasks, which report back when their connection ends.
    me: Weak<Relays>,
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
    outstanding: IntGauge,
}

/// The connection to one relay.
enum Slot {
    Idle,
    /// An attempt every request needing a connection waits on together.
    Connecting {
        id: u64,
        pending: PendingConnect,
    },
    Ready {
        id: u64,
        sender: http2::SendRequest<ForwardBody>,
    },
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

/// How one attempt to send on a connection ended, when it did not bring an answer.
enum SendError {
    /// The connection closed before the request went out; here it is back.
    NotSent {
        request: Box<Request<ForwardBody>>,
        reason: String,
    },
    Failed(hyper::Error),
    /// The relay was declared dead first.
    Lost,
}

impl Relays {
    pub fn new(
        targets: Vec<RelayTarget>,
        settings: HealthSettings,
        connection: ConnectionSettings,
        network: Network,
        metrics: Metrics,
    ) -> Arc<Relays> {
        let names = targets.iter().map(|t| t.name.clone()).collect();
        let balancer = Balancer::new(targets.iter().map(|t| t.share));
        let links = targets
            .into_iter()
            .map(|target| Link {
                outstanding: metrics.relay_outstanding.with_label_values(&[&target.name]),
                target,
                slot: Mutex::new(Slot::Idle),
                attempts: AtomicU64::new(0),
                deaths: watch::channel(0).0,
            })
            .collect();
        Arc::new_cyclic(|me| Relays {
            links,
            health: Mutex::new(Health::new(names, settings, Instant::now())),
            balancer,
            network,
            connection,
            metrics,
            probe_now: Notify::new(),
            me: me.clone(),
            inner_tls: std::sync::OnceLock::new(),
        })
    }

    /// Sends `request` to a healthy relay the balancer picks and waits for the answer's head.
    /// While nothing has been sent (no connection could be opened, or the connection closed
    /// before the request went out) it moves on to the next relay, each tried once. A failure
    /// after the request went out is reported to the health core unless `caller_failed` says
    /// the caller's own upload broke it.
    pub async fn dispatch(
        &self,
        mut request: Request<ForwardBody>,
        caller_failed: impl Fn() -> bool,
    ) -> Result<Dispatched, DispatchError> {
        let mut tried = Vec::new();
        let mut last_error = None;
        while let Some((relay, load)) = self.claim(&tried) {
            tried.push(relay);
            let sender = match self.ready_sender(relay).await {
                Ok(sender) => sender,
                Err(error) => {
                    last_error = Some(error);
                    continue;
                }
            };
            let sent_at = Instant::now();
            let connection = sender.clone();
            let error = match self.send_once(relay, sender, request).await {
                Ok(response) => {
                    return Ok(Dispatched {
                        relay,
                        load,
                        sent_at,
                        response,
                    })
                }
                Err(SendError::NotSent {
                    request: unsent,
                    reason,
                }) => {
                    request = *unsent;
                    last_error = Some(unreachable(&self.links[relay.index()].target, reason));
                    continue;
                }
                Err(SendError::Lost) => ForwardError::Lost {
                    relay: self.name(relay).to_owned(),
                },
                Err(SendError::Failed(error)) => {
                    if !caller_failed() {
                        self.report_send_failure(relay, &error, connection.is_closed());
                    }
                    ForwardError::Failed {
                        relay: self.name(relay).to_owned(),
                        reason: error.to_string(),
                    }
                }
            };
            return Err(DispatchError::Failed { relay, error });
        }
        Err(DispatchError::NotSent(last_error))
    }

    /// The relays of the best group among those that may take a new request (healthy, and
    /// not suspect while a relay that answered exists): those sharing new requests.
    pub fn active(&self) -> Vec<RelayId> {
        let eligible = self.health().eligible(&[]);
        self.balancer.active(eligible)
    }

    /// Requests counted against `relay` now.
    pub fn outstanding(&self, relay: RelayId) -> usize {
        self.balancer.outstanding(relay)
    }

    pub fn share(&self, relay: RelayId) -> Share {
        self.balancer.share(relay).unwrap_or_default()
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

    /// An open, ready connection to `relay`; nothing has been sent when this fails. A connect
    /// that fails takes the relay out of the rotation at once.
    ///
    /// Waits at most about `connect_timeout`: every caller needing a new connection joins
    /// the one attempt in progress (which is itself bounded by `connect_timeout`) rather than
    /// queueing for attempts of its own, and all of them give up together as soon as the
    /// relay is declared dead.
    pub async fn ready_sender(
        &self,
        relay: RelayId,
    ) -> Result<http2::SendRequest<ForwardBody>, ForwardError> {
        let link = &self.links[relay.index()];
        // Subscribed before looking at the connection, so a death declared in between counts.
        let death = self.death_of(relay);
        let (attempt, pending) = match self.join_or_start_attempt(relay, link) {
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
        // The first waiter to see the outcome files it, and reports a failure once.
        let first = {
            let mut slot = link.lock_slot();
            let first = matches!(&*slot, Slot::Connecting { id, .. } if *id == attempt);
            if first {
                *slot = match &outcome {
                    Ok(sender) => Slot::Ready {
                        id: attempt,
                        sender: sender.clone(),
                    },
                    Err(_) => Slot::Idle,
                };
            }
            first
        };
        match outcome {
            Ok(sender) => Ok(sender),
            Err(reason) => {
                if first {
                    self.passive_failure(
                        relay,
                        PassiveFailure::ConnectFailed,
                        format!("connect failed: {reason}"),
                    );
                }
                Err(unreachable(&link.target, reason.to_string()))
            }
        }
    }

    /// Sends `request` to `relay` over a connection from [`Relays::ready_sender`], ending
    /// with [`ForwardError::Lost`] as soon as the relay is declared dead.
    pub async fn send(
        &self,
        relay: RelayId,
        sender: http2::SendRequest<ForwardBody>,
        request: Request<ForwardBody>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let name = || self.name(relay).to_owned();
        match self.send_once(relay, sender, request).await {
            Ok(response) => Ok(response),
            Err(SendError::NotSent { reason, .. }) => Err(ForwardError::Unreachable {
                relay: name(),
                reason,
            }),
            Err(SendError::Failed(error)) => Err(ForwardError::Failed {
                relay: name(),
                reason: error.to_string(),
            }),
            Err(SendError::Lost) => Err(ForwardError::Lost { relay: name() }),
        }
    }

    /// A request-level failure that may say the relay's connection is broken: counts as a
    /// failed probe and asks for a probe at once.
    pub fn report_failure(&self, relay: RelayId, reason: String) {
        self.health()
            .on_forward_failed(relay, reason, Instant::now());
        self.probe_now.notify_one();
        self.apply_events();
    }

    /// An answer's body from `relay` failed. When its connection broke with it, the relay is
    /// lost at once, before the body's error reaches the caller, so a stream ends as a loss.
    /// A reset of the one stream is the relay passing on a failed upstream stream and says
    /// nothing about the relay.
    pub fn body_failed(&self, relay: RelayId, error: &hyper::Error) {
        let Some(link) = self.links.get(relay.index()) else {
            return;
        };
        if passive_failure_of(error, false) == Some(PassiveFailure::StreamReset) {
            return;
        }
        let connection_gone = match &*link.lock_slot() {
            Slot::Ready { sender, .. } => sender.is_closed(),
            Slot::Connecting { .. } | Slot::Idle => true,
        };
        if connection_gone {
            self.passive_failure(
                relay,
                PassiveFailure::ConnectionLost,
                xpart_daemon::error_chain::one_line(error),
            );
        }
    }

    /// Takes `relay` out of the rotation at once (see [`Health::on_passive_failure`]).
    pub fn passive_failure(&self, relay: RelayId, failure: PassiveFailure, reason: String) {
        let ejected = self
            .health()
            .on_passive_failure(relay, failure, reason, Instant::now());
        if ejected {
            self.metrics
                .relay_ejections
                .with_label_values(&[self.name(relay), failure.label()])
                .inc();
        }
        self.apply_events();
    }

    /// Applies health changes: logs them, sets the relay gauges, and ends the connection and
    /// the requests in flight of a relay declared dead. Returns the events.
    pub fn apply_events(&self) -> Vec<HealthEvent> {
        let events: Vec<HealthEvent> = {
            let mut health = self.health();
            std::iter::from_fn(|| health.poll_event()).collect()
        };
        for event in &events {
            match event {
                HealthEvent::Down { relay, reason } => {
                    tracing::warn!(relay = self.name(*relay), %reason, "relay down");
                    self.set_healthy_gauge(*relay, 0);
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
                    self.set_healthy_gauge(*relay, 1);
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

    fn set_healthy_gauge(&self, relay: RelayId, value: i64) {
        self.metrics
            .relay_healthy
            .with_label_values(&[self.name(relay)])
            .set(value);
    }

    /// The relay the balancer picks among those not in `tried` that may take a new request
    /// ([`Health::eligible`]), with one request counted against it.
    fn claim(&self, tried: &[RelayId]) -> Option<(RelayId, RelayLoad)> {
        let health = self.health();
        let relay = self.balancer.choose(health.eligible(tried))?;
        // Claimed under the health lock, so requests picking together see each other's claims.
        let claim = self.balancer.claim(relay)?;
        drop(health);
        let gauge = self.links[relay.index()].outstanding.clone();
        gauge.inc();
        Some((
            relay,
            RelayLoad {
                _claim: claim,
                gauge,
            },
        ))
    }

    /// One try on one connection: a request hyper hands back unsent is returned with
    /// [`SendError::NotSent`], so the caller can take it elsewhere.
    async fn send_once(
        &self,
        relay: RelayId,
        mut sender: http2::SendRequest<ForwardBody>,
        mut request: Request<ForwardBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let link = &self.links[relay.index()];
        *request.uri_mut() = absolute_uri(link.target.service_addr, request.uri());
        let death = self.death_of(relay);
        tokio::select! {
            response = sender.try_send_request(request) => match response {
                Ok(response) => Ok(response),
                Err(mut error) => match error.take_message() {
                    Some(request) => Err(SendError::NotSent {
                        request: Box::new(request),
                        reason: error.into_error().to_string(),
                    }),
                    None => Err(SendError::Failed(error.into_error())),
                },
            },
            () = death => Err(SendError::Lost),
        }
    }

    /// Files what a failed request says about its relay: a reset before any answer is a
    /// passive failure; other errors count like a failed probe (a broken connection is also
    /// reported by its own task when it ends).
    fn report_send_failure(&self, relay: RelayId, error: &hyper::Error, connection_closed: bool) {
        match passive_failure_of(error, connection_closed) {
            Some(failure) => {
                self.passive_failure(relay, failure, xpart_daemon::error_chain::one_line(error))
            }
            None => self.report_failure(relay, error.to_string()),
        }
    }

    /// A connection to `relay` ended. One that ends with an error (a PING unanswered, a
    /// reset, a protocol error) takes the relay out, unless a newer connection is already up.
    fn connection_ended(&self, relay: RelayId, attempt: u64, outcome: Result<(), hyper::Error>) {
        let Some(link) = self.links.get(relay.index()) else {
            return;
        };
        let newer_is_up = {
            let mut slot = link.lock_slot();
            match &*slot {
                Slot::Ready { id, .. } if *id == attempt => {
                    *slot = Slot::Idle;
                    false
                }
                Slot::Ready { .. } => true,
                Slot::Connecting { .. } | Slot::Idle => false,
            }
        };
        match outcome {
            Ok(()) => tracing::debug!(relay = self.name(relay), "relay connection closed"),
            Err(error) if newer_is_up => {
                tracing::debug!(relay = self.name(relay), %error, "earlier relay connection ended");
            }
            Err(error) => self.passive_failure(
                relay,
                PassiveFailure::ConnectionLost,
                format!(
                    "HTTP/2 connection lost: {}",
                    xpart_daemon::error_chain::one_line(&error)
                ),
            ),
        }
    }

    /// A live cached connection, or the (possibly new) shared attempt to open one with its id.
    fn join_or_start_attempt(
        &self,
        relay: RelayId,
        link: &Link,
    ) -> Result<http2::SendRequest<ForwardBody>, (u64, PendingConnect)> {
        let mut slot = link.lock_slot();
        match &*slot {
            Slot::Ready { sender, .. } if !sender.is_closed() => return Ok(sender.clone()),
            Slot::Connecting { id, pending } => return Err((*id, pending.clone())),
            Slot::Ready { .. } | Slot::Idle => {}
        }
        let id = link.attempts.fetch_add(1, Ordering::Relaxed);
        let relays = self.me.clone();
        let on_end = move |outcome| {
            if let Some(relays) = relays.upgrade() {
                relays.connection_ended(relay, id, outcome);
            }
        };
        // Spawned so the attempt runs to its end even if every waiter goes away, and so that
        // no waiter's lock is held while it runs.
        let task = tokio::spawn(connect(
            self.network.clone(),
            link.target.clone(),
            self.connection,
            self.inner_tls.get().cloned(),
            on_end,
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

/// What a request's error says about the relay, when it says something for sure: the relay
/// reset the stream before answering (it answers refusals with a status, never a reset), or
/// the connection under it broke (`connection_closed`: it is gone after the error).
fn passive_failure_of(error: &hyper::Error, connection_closed: bool) -> Option<PassiveFailure> {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            match (h2.is_reset(), h2.is_go_away(), h2.is_remote(), h2.reason()) {
                (true, _, true, _) => return Some(PassiveFailure::StreamReset),
                // A GOAWAY without error: the relay is shutting down cleanly.
                (_, true, true, Some(h2::Reason::NO_ERROR)) => return None,
                (_, true, true, _) => return Some(PassiveFailure::ConnectionLost),
                _ if h2.is_io() => return Some(PassiveFailure::ConnectionLost),
                _ => break,
            }
        }
        source = cause.source();
    }
    connection_closed.then_some(PassiveFailure::ConnectionLost)
}

/// Opens a connection to `target` and completes the HTTP/2 handshake, all within
/// `settings.connect_timeout`; `on_end` hears how the connection ended.
async fn connect(
    network: Network,
    target: RelayTarget,
    settings: ConnectionSettings,
    inner_tls: Option<Arc<InnerTls>>,
    on_end: impl FnOnce(Result<(), hyper::Error>) + Send + 'static,
) -> Result<http2::SendRequest<ForwardBody>, ConnectError> {
    let timeout = settings.connect_timeout;
    let open = open_http2(&network, &target, settings, inner_tls.as_deref(), on_end);
    tokio::time::timeout(timeout, open)
        .await
        .unwrap_or(Err(ConnectError::TimedOut(timeout)))
}

async fn open_http2(
    network: &Network,
    target: &RelayTarget,
    settings: ConnectionSettings,
    inner_tls: Option<&InnerTls>,
    on_end: impl FnOnce(Result<(), hyper::Error>) + Send + 'static,
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
        .keep_alive_interval(Some(settings.ping_interval))
        .keep_alive_timeout(settings.ping_timeout)
        // Probes keep every connection busy anyway; PINGs fill the gaps between them.
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(conn))
        .await
        .map_err(|e| ConnectError::Handshake(Arc::new(e)))?;
    tokio::spawn(async move { on_end(connection.await) });
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
        let relays = Relays::new(
            vec![RelayTarget {
                name: "relay-a".into(),
                service_addr: hole.local_addr().expect("addr"),
                public_key: None,
                share: Share::default(),
            }],
            HealthSettings::default(),
            ConnectionSettings {
                // Far longer than the test may take: only the death can end the waits.
                connect_timeout: Duration::from_secs(30),
                ..ConnectionSettings::default()
            },
            Network::host(),
            Metrics::new(),
        );
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
        for _ in 0..HealthSettings::default().fail_after {
            relays.report_failure(relay, "probe timed out".into());
        }
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
