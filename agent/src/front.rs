//! The TLS front callers connect to: TCP accept, TLS (certificate from [`CertStore`]), then
//! HTTP/1.1 or HTTP/2 as ALPN chose, each request handed to [`pipeline::handle`].
//!
//! A connection costs a socket and memory whether or not it carries requests, so the front
//! bounds what a caller can hold without sending anything: connections are capped in total
//! and per source address ([`ConnectionCaps`], refused at accept), a TLS handshake must
//! finish within `handshake_timeout`, the first request must arrive within
//! `first_request_timeout`, and a connection with no request or response in flight closes
//! after `idle_timeout` (HTTP/2 with a GOAWAY). A response that is still streaming keeps its
//! connection open however long it runs.
//!
//! [`CertStore`]: crate::tls::CertStore

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::pipeline::{self, Agent, CallerBody};

/// HTTP/2 PINGs on a connection that has been quiet this long; a caller that does not
/// answer within [`H2_KEEPALIVE_TIMEOUT`] is gone (a dead NAT mapping, a frozen Lambda) and
/// its connection closes.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams one HTTP/2 connection may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 1000;

/// How the front treats connections, from `[front]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontSettings {
    /// From accept to the end of the TLS handshake.
    pub handshake_timeout: Duration,
    /// From the end of the handshake to the first request's headers.
    pub first_request_timeout: Duration,
    /// With no request or response in flight, the connection closes after this long.
    pub idle_timeout: Duration,
    /// Connections open at once, all sources together.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_connections_per_source: usize,
}

impl Default for FrontSettings {
    fn default() -> FrontSettings {
        FrontSettings {
            handshake_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_connections: 10_000,
            max_connections_per_source: 1_000,
        }
    }
}

/// Accepts callers until `stop` turns true, then stops accepting and ends open connections.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    agent: Arc<Agent>,
    settings: FrontSettings,
    mut stop: watch::Receiver<bool>,
) {
    let metrics = FrontMetrics::new();
    if let Err(error) = metrics.register(&agent.metrics.registry) {
        tracing::warn!(%error, "front metrics not registered");
    }
    let caps = SharedCaps::new(
        ConnectionCaps::new(
            settings.max_connections,
            settings.max_connections_per_source,
        ),
        metrics.clone(),
    );
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        // Reap finished connection tasks so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off briefly instead of spinning.
                tracing::warn!(%error, "accepting a caller failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match caps.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                metrics.refused.with_label_values(&[refusal.label()]).inc();
                tracing::debug!(%peer, reason = refusal.label(), "connection refused at accept");
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            peer,
            acceptor: acceptor.clone(),
            agent: agent.clone(),
            settings,
            metrics: metrics.clone(),
        };
        connections.spawn(connection.serve(tcp, permit));
    }
    connections.shutdown().await;
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapRefusal {
    /// `max_connections` are open.
    Total,
    /// `max_connections_per_source` are open from this address.
    PerSource,
}

impl CapRefusal {
    /// The `reason` label of `xpart_agent_front_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            CapRefusal::Total => "max_connections",
            CapRefusal::PerSource => "max_connections_per_source",
        }
    }
}

/// Open connections, in total and per source address, against their caps.
#[derive(Debug)]
pub struct ConnectionCaps {
    max_total: usize,
    max_per_source: usize,
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl ConnectionCaps {
    pub fn new(max_total: usize, max_per_source: usize) -> ConnectionCaps {
        ConnectionCaps {
            max_total,
            max_per_source,
            total: 0,
            per_source: HashMap::new(),
        }
    }

    /// Counts a new connection from `source`, or says which cap it would exceed.
    pub fn admit(&mut self, source: IpAddr) -> Result<(), CapRefusal> {
        let source = source.to_canonical();
        if self.total >= self.max_total {
            return Err(CapRefusal::Total);
        }
        let from_source = self.per_source.entry(source).or_insert(0);
        if *from_source >= self.max_per_source {
            return Err(CapRefusal::PerSource);
        }
        *from_source += 1;
        self.total += 1;
        Ok(())
    }

    /// Forgets a connection admitted earlier.
    pub fn release(&mut self, source: IpAddr) {
        let source = source.to_canonical();
        if let Some(from_source) = self.per_source.get_mut(&source) {
            *from_source = from_source.saturating_sub(1);
            if *from_source == 0 {
                // Sources come and go; keep only the ones with connections open.
                self.per_source.remove(&source);
            }
            self.total = self.total.saturating_sub(1);
        }
    }

    pub fn open(&self) -> usize {
        self.total
    }

    /// Connections open from `source`.
    pub fn open_from(&self, source: IpAddr) -> usize {
        self.per_source
            .get(&source.to_canonical())
            .copied()
            .unwrap_or(0)
    }

    /// Source addresses with at least one connection open.
    pub fn sources(&self) -> usize {
        self.per_source.len()
    }
}

/// The front's own Prometheus series, registered on the agent's registry.
#[derive(Clone)]
struct FrontMetrics {
    open: IntGauge,
    refused: IntCounterVec,
    closed: IntCounterVec,
}

impl FrontMetrics {
    fn new() -> FrontMetrics {
        let open = IntGauge::new(
            "xpart_agent_front_connections_open",
            "Caller connections open at the TLS front",
        )
        .expect("static metric definition");
        let refused = IntCounterVec::new(
            Opts::new(
                "xpart_agent_front_connections_refused_total",
                "Caller connections closed at accept because a cap was reached",
            ),
            &["reason"],
        )
        .expect("static metric definition");
        let closed = IntCounterVec::new(
            Opts::new(
                "xpart_agent_front_connections_closed_total",
                "Caller connections the front closed for sending nothing in time",
            ),
            &["reason"],
        )
        .expect("static metric definition");
        for reason in [CapRefusal::Total, CapRefusal::PerSource] {
            refused.with_label_values(&[reason.label()]);
        }
        for reason in [
            Quiet::Handshake,
            Quiet::FirstRequest,
            Quiet::Idle,
            Quiet::IdleAfterGoaway,
        ] {
            closed.with_label_values(&[reason.label()]);
        }
        FrontMetrics {
            open,
            refused,
            closed,
        }
    }

    fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.open.clone()))?;
        registry.register(Box::new(self.refused.clone()))?;
        registry.register(Box::new(self.closed.clone()))?;
        Ok(())
    }
}

/// [`ConnectionCaps`] shared by the accept loop and the connection tasks.
#[derive(Clone)]
struct SharedCaps {
    inner: Arc<Mutex<ConnectionCaps>>,
    metrics: FrontMetrics,
}

/// A connection's place under the caps; given back on drop.
struct Permit {
    caps: SharedCaps,
    source: IpAddr,
}

impl SharedCaps {
    fn new(caps: ConnectionCaps, metrics: FrontMetrics) -> SharedCaps {
        SharedCaps {
            inner: Arc::new(Mutex::new(caps)),
            metrics,
        }
    }

    fn admit(&self, source: IpAddr) -> Result<Permit, CapRefusal> {
        let mut caps = self.lock();
        caps.admit(source)?;
        self.metrics.open.set(gauge_value(caps.open()));
        Ok(Permit {
            caps: self.clone(),
            source,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnectionCaps> {
        // Counters left behind by a panicking holder are still the best count there is.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut caps = self.caps.lock();
        caps.release(self.source);
        self.caps.metrics.open.set(gauge_value(caps.open()));
    }
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Why the front closed a connection that was sending nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quiet {
    /// The TLS handshake did not finish within `handshake_timeout`.
    Handshake,
    /// No request arrived within `first_request_timeout` of the handshake.
    FirstRequest,
    /// Nothing in flight for `idle_timeout`.
    Idle,
    /// Still open and idle `idle_timeout` after the graceful close began (a caller that
    /// ignores GOAWAY).
    IdleAfterGoaway,
}

impl Quiet {
    /// The `reason` label of `xpart_agent_front_connections_closed_total`.
    fn label(self) -> &'static str {
        match self {
            Quiet::Handshake => "handshake_timeout",
            Quiet::FirstRequest => "first_request_timeout",
            Quiet::Idle => "idle_timeout",
            Quiet::IdleAfterGoaway => "idle_after_goaway",
        }
    }
}

/// One caller connection and what it needs.
struct Connection {
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    agent: Arc<Agent>,
    settings: FrontSettings,
    metrics: FrontMetrics,
}

impl Connection {
    /// Runs the connection to its end; `_permit` holds its place under the caps until then.
    async fn serve(self, tcp: tokio::net::TcpStream, _permit: Permit) {
        let peer = self.peer;
        let handshake = self.acceptor.accept(tcp);
        let tls = match tokio::time::timeout(self.settings.handshake_timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                self.count_closed(Quiet::Handshake);
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let activity = Activity::new();
        let source = peer.ip();
        let agent = self.agent.clone();
        let in_flight = activity.clone();
        let service = service_fn(move |request| {
            let agent = agent.clone();
            // Counted from the moment the request's headers are in until its response body
            // has ended or been dropped.
            let guard = InFlight::start(&in_flight);
            async move {
                let response = pipeline::handle(agent, request, source).await;
                Ok::<_, std::convert::Infallible>(response.map(|body| Tracked {
                    body,
                    _in_flight: guard,
                }))
            }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // The front's own timers (below) bound header reads and idle keep-alive on
        // HTTP/1.1, so hyper's 30 s header timer would only cut `idle_timeout` short.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .keep_alive_interval(Some(H2_KEEPALIVE_INTERVAL))
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
        let connection = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(connection);

        let mut closing = false;
        loop {
            let quiet = activity.quiet(self.settings);
            let reason = tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(error) = ended {
                        tracing::debug!(%peer, %error, "caller connection ended with an error");
                    }
                    return;
                }
                reason = quiet => reason,
            };
            if closing {
                self.count_closed(Quiet::IdleAfterGoaway);
                tracing::debug!(%peer, "caller kept an idle connection open after GOAWAY");
                return;
            }
            self.count_closed(reason);
            tracing::debug!(%peer, reason = reason.label(), "closing a quiet caller connection");
            // HTTP/2 sends GOAWAY and lets a stream that raced in finish; HTTP/1.1 closes at
            // once, as nothing is in flight; before the first byte, the read is abandoned.
            connection.as_mut().graceful_shutdown();
            closing = true;
        }
    }

    fn count_closed(&self, reason: Quiet) {
        self.metrics
            .closed
            .with_label_values(&[reason.label()])
            .inc();
    }
}

/// Requests in flight on one connection, and whether any has arrived yet.
#[derive(Clone)]
struct Activity {
    state: Arc<watch::Sender<InFlightCount>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct InFlightCount {
    open: usize,
    started: u64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            state: Arc::new(watch::Sender::new(InFlightCount::default())),
        }
    }

    /// Resolves once the connection has gone quiet: no first request within
    /// `first_request_timeout`, or nothing in flight for `idle_timeout`.
    async fn quiet(&self, settings: FrontSettings) -> Quiet {
        let mut state = self.state.subscribe();
        let first = state.wait_for(|s| s.started > 0);
        if tokio::time::timeout(settings.first_request_timeout, first)
            .await
            .is_err()
        {
            return Quiet::FirstRequest;
        }
        loop {
            // The sender lives as long as `self`, so neither wait can see it closed.
            let _ = state.wait_for(|s| s.open == 0).await;
            // Any change (a request starting or ending) restarts the idle clock.
            if tokio::time::timeout(settings.idle_timeout, state.changed())
                .await
                .is_err()
            {
                return Quiet::Idle;
            }
        }
    }
}

/// One request's hold on its connection's activity; released on drop.
struct InFlight {
    activity: Activity,
}

impl InFlight {
    fn start(activity: &Activity) -> InFlight {
        activity.state.send_modify(|s| {
            s.open += 1;
            s.started += 1;
        });
        InFlight {
            activity: activity.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity
            .state
            .send_modify(|s| s.open = s.open.saturating_sub(1));
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
struct Tracked {
    body: CallerBody,
    /// Held for its `Drop`.
    _in_flight: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = <CallerBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn per_source_cap_refuses_that_source_only() {
        let mut caps = ConnectionCaps::new(10, 2);
        assert_eq!(caps.admit(v4(1)), Ok(()));
        assert_eq!(caps.admit(v4(1)), Ok(()));
        assert_eq!(caps.admit(v4(1)), Err(CapRefusal::PerSource));
        assert_eq!(caps.admit(v4(2)), Ok(()));
        assert_eq!(caps.open(), 3);
        assert_eq!(caps.open_from(v4(1)), 2);
    }

    #[test]
    fn total_cap_refuses_every_source() {
        let mut caps = ConnectionCaps::new(3, 2);
        assert_eq!(caps.admit(v4(1)), Ok(()));
        assert_eq!(caps.admit(v4(2)), Ok(()));
        assert_eq!(caps.admit(v4(3)), Ok(()));
        assert_eq!(caps.admit(v4(4)), Err(CapRefusal::Total));
        caps.release(v4(2));
        assert_eq!(caps.admit(v4(4)), Ok(()));
    }

    #[test]
    fn released_sources_are_forgotten() {
        let mut caps = ConnectionCaps::new(1000, 1);
        for last in 0..=255 {
            assert_eq!(caps.admit(v4(last)), Ok(()));
        }
        for last in 0..=255 {
            caps.release(v4(last));
        }
        assert_eq!(caps.open(), 0);
        assert_eq!(caps.sources(), 0);
        // Releasing what was never admitted changes nothing.
        caps.release(v4(9));
        assert_eq!(caps.open(), 0);
    }

    #[test]
    fn ipv4_mapped_ipv6_counts_as_the_ipv4_source() {
        let mut caps = ConnectionCaps::new(10, 1);
        assert_eq!(caps.admit(v4(7)), Ok(()));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("address");
        assert_eq!(caps.admit(mapped), Err(CapRefusal::PerSource));
        caps.release(mapped);
        assert_eq!(caps.open_from(v4(7)), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn no_first_request_is_quiet_after_first_request_timeout() {
        let settings = FrontSettings::default();
        let activity = Activity::new();
        let started = tokio::time::Instant::now();
        assert_eq!(activity.quiet(settings).await, Quiet::FirstRequest);
        assert_eq!(started.elapsed(), settings.first_request_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_idle() {
        let settings = FrontSettings::default();
        let activity = Activity::new();
        let request = InFlight::start(&activity);
        let watching = activity.clone();
        let quiet = tokio::spawn(async move { watching.quiet(settings).await });
        tokio::time::sleep(settings.idle_timeout * 10).await;
        assert!(
            !quiet.is_finished(),
            "a long response must keep the connection"
        );

        let ended = tokio::time::Instant::now();
        drop(request);
        assert_eq!(quiet.await.expect("quiet task"), Quiet::Idle);
        assert_eq!(ended.elapsed(), settings.idle_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_restarts_the_idle_clock() {
        let settings = FrontSettings::default();
        let activity = Activity::new();
        drop(InFlight::start(&activity));
        let watching = activity.clone();
        let quiet = tokio::spawn(async move { watching.quiet(settings).await });
        tokio::time::sleep(settings.idle_timeout - Duration::from_secs(1)).await;
        drop(InFlight::start(&activity));
        let last = tokio::time::Instant::now();
        assert_eq!(quiet.await.expect("quiet task"), Quiet::Idle);
        assert_eq!(last.elapsed(), settings.idle_timeout);
    }
}
