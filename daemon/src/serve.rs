//! The one HTTP server every xpart listener runs: the agent's TLS front, the relay's service
//! address inside the tunnel, and both admin ports.
//!
//! [`serve`] accepts from anything that implements [`Accept`] (a Tokio `TcpListener`, the
//! tunnel's `xpart_tunnel::TcpListener`, or either wrapped in [`Tls`]), admits each connection
//! under the [`Limits`] caps (in total and per source address; refused at accept), finishes its
//! handshake within `handshake_timeout`, then speaks HTTP/1.1 or HTTP/2 (ALPN, or the HTTP/2
//! preface on plain TCP) and hands each request to the [`Handler`].
//!
//! A connection costs a socket and memory whether or not it carries requests, so the server
//! bounds what a client can hold without sending anything: the first request must arrive within
//! `first_request_timeout`, and a connection with no request or response in flight closes after
//! `idle_timeout` (HTTP/2 with a GOAWAY). A response that is still streaming keeps its
//! connection open however long it runs. [`ConnectionMetrics`], when given, counts open,
//! refused and closed connections.
//!
//! On shutdown the server stops accepting, asks every connection to close gracefully
//! (HTTP/1.1 after the response in progress, HTTP/2 with a GOAWAY), and waits for at most
//! `shutdown_grace`; it stops waiting as soon as no request is in flight, since an idle HTTP/2
//! connection can take the whole grace period to close (the GOAWAY's PING goes unanswered by a
//! peer that already stopped). What remains is cut.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// HTTP/2 PINGs on a connection that has been quiet this long; a peer that does not answer
/// within [`H2_KEEPALIVE_TIMEOUT`] is gone (a dead NAT mapping, a frozen Lambda) and its
/// connection closes.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams one HTTP/2 connection may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 1000;
/// After an accept error (out of file descriptors and the like), wait this long rather than
/// spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Once shutdown begins, lets the GOAWAY frames just queued reach peers that are still there,
/// and requests already received start, before "nothing in flight" may end the wait.
const SHUTDOWN_SETTLE: Duration = Duration::from_millis(100);

/// What one server lets a connection hold, and how long shutdown waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From accept to the end of the handshake (TLS; a plain listener has none).
    pub handshake_timeout: Duration,
    /// From the end of the handshake to the first request's headers.
    pub first_request_timeout: Duration,
    /// With no request or response in flight, the connection closes after this long.
    pub idle_timeout: Duration,
    /// Connections open at once, all sources together.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_connections_per_source: usize,
    /// How long requests in flight may run on after shutdown begins; zero cuts them at once.
    pub shutdown_grace: Duration,
    /// HTTP/1.1 only (the admin ports); otherwise HTTP/2 is spoken too.
    pub http1_only: bool,
}

impl Default for Limits {
    /// The agent front's defaults: enough for a fleet of SDK clients behind one address.
    fn default() -> Limits {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_connections: 10_000,
            max_connections_per_source: 1_000,
            shutdown_grace: Duration::ZERO,
            http1_only: false,
        }
    }
}

impl Limits {
    /// An admin port: HTTP/1.1, a few scrapers and operators, a request expected at once.
    pub fn admin() -> Limits {
        Limits {
            first_request_timeout: Duration::from_secs(10),
            max_connections: 256,
            max_connections_per_source: 64,
            http1_only: true,
            ..Limits::default()
        }
    }
}

/// A listener [`serve`] accepts connections from.
pub trait Accept: Send + Sync + 'static {
    /// What `accept` yields, before any handshake.
    type Conn: Send + 'static;
    /// What HTTP runs over once the handshake is done.
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;

    /// The next connection and its peer address.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, SocketAddr)>> + Send;

    /// The handshake that turns a connection into something HTTP can run over; it runs in
    /// the connection's own task, under `handshake_timeout`.
    fn handshake(&self, conn: Self::Conn) -> Handshake<Self::Io>;
}

/// A connection's handshake, ready to run in its own task.
pub type Handshake<Io> = Pin<Box<dyn Future<Output = io::Result<Io>> + Send>>;

impl Accept for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    type Io = tokio::net::TcpStream;

    async fn accept(&self) -> io::Result<(Self::Conn, SocketAddr)> {
        let (tcp, peer) = tokio::net::TcpListener::accept(self).await?;
        // Small request and response heads go out at once; a connection that cannot take the
        // option still works.
        let _ = tcp.set_nodelay(true);
        Ok((tcp, peer))
    }

    fn handshake(&self, conn: Self::Conn) -> Handshake<Self::Io> {
        Box::pin(std::future::ready(Ok(conn)))
    }
}

impl Accept for xpart_tunnel::TcpListener {
    type Conn = xpart_tunnel::TcpConn;
    type Io = xpart_tunnel::TcpConn;

    async fn accept(&self) -> io::Result<(Self::Conn, SocketAddr)> {
        xpart_tunnel::TcpListener::accept(self).await
    }

    fn handshake(&self, conn: Self::Conn) -> Handshake<Self::Io> {
        Box::pin(std::future::ready(Ok(conn)))
    }
}

/// TLS over another listener: the handshake (certificate and ALPN from the acceptor's
/// configuration) runs in each connection's task under `handshake_timeout`.
pub struct Tls<L> {
    inner: L,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl<L> Tls<L> {
    pub fn new(inner: L, acceptor: tokio_rustls::TlsAcceptor) -> Tls<L> {
        Tls { inner, acceptor }
    }
}

impl<L: Accept> Accept for Tls<L> {
    type Conn = L::Conn;
    type Io = tokio_rustls::server::TlsStream<L::Io>;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, SocketAddr)>> + Send {
        self.inner.accept()
    }

    fn handshake(&self, conn: Self::Conn) -> Handshake<Self::Io> {
        let inner = self.inner.handshake(conn);
        let acceptor = self.acceptor.clone();
        Box::pin(async move { acceptor.accept(inner.await?).await })
    }
}

/// What answers each request: any `Fn(request, peer) -> future of a response`.
pub trait Handler: Send + Sync + 'static {
    type Body: Body<Data = Bytes, Error = Self::Error> + Send + Unpin + 'static;
    type Error: Into<Box<dyn std::error::Error + Send + Sync>>;
    type Future: Future<Output = Response<Self::Body>> + Send + 'static;

    fn call(&self, request: Request<Incoming>, peer: SocketAddr) -> Self::Future;
}

impl<F, Fut, B> Handler for F
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Body = B;
    type Error = B::Error;
    type Future = Fut;

    fn call(&self, request: Request<Incoming>, peer: SocketAddr) -> Fut {
        self(request, peer)
    }
}

/// Serve `listener` with `handler` under `limits` until `shutdown` turns true (or its sender
/// is dropped); returns once every connection has ended or been cut.
pub async fn serve<L: Accept, H: Handler>(
    listener: L,
    handler: H,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) {
    Server::new(limits).serve(listener, handler, shutdown).await;
}

/// [`serve`] with its metrics: `Server::new(limits).metrics(metrics).serve(…)`.
pub struct Server {
    limits: Limits,
    metrics: Option<ConnectionMetrics>,
}

impl Server {
    pub fn new(limits: Limits) -> Server {
        Server {
            limits,
            metrics: None,
        }
    }

    /// Count connections in `metrics` (register them on the daemon's registry first).
    pub fn metrics(mut self, metrics: ConnectionMetrics) -> Server {
        self.metrics = Some(metrics);
        self
    }

    /// See [`serve`].
    pub async fn serve<L: Accept, H: Handler>(
        self,
        listener: L,
        handler: H,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let limits = self.limits;
        let handler = Arc::new(handler);
        let caps = SharedCaps::new(
            ConnectionCaps::new(limits.max_connections, limits.max_connections_per_source),
            self.metrics.clone(),
        );
        let in_flight = Arc::new(watch::Sender::new(0usize));
        let (closing, closing_seen) = watch::channel(false);
        let mut connections = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                stop = shutdown.wait_for(|stop| *stop) => {
                    // Err: the sender is gone, which means stop too.
                    let _ = stop;
                    break;
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let (conn, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // A failed accept (the peer reset first, descriptors exhausted) must not end
                    // the server.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let permit = match caps.admit(peer.ip()) {
                Ok(permit) => permit,
                Err(refusal) => {
                    if let Some(metrics) = &self.metrics {
                        metrics.refused.with_label_values(&[refusal.label()]).inc();
                    }
                    tracing::debug!(%peer, reason = refusal.label(), "connection refused at accept");
                    continue;
                }
            };
            let connection = Connection {
                peer,
                handler: handler.clone(),
                limits,
                metrics: self.metrics.clone(),
                server_in_flight: in_flight.clone(),
                closing: closing_seen.clone(),
            };
            connections.spawn(connection.serve(listener.handshake(conn), permit));
        }
        drop(listener);
        if connections.is_empty() {
            return;
        }
        let _ = closing.send(true);
        let drained = async { while connections.join_next().await.is_some() {} };
        let idle = async {
            tokio::time::sleep(SHUTDOWN_SETTLE).await;
            let mut count = in_flight.subscribe();
            // The sender is held here, so the wait cannot see it closed.
            let _ = count.wait_for(|open| *open == 0).await;
        };
        tokio::select! {
            () = drained => {}
            () = idle => {}
            () = tokio::time::sleep(limits.shutdown_grace) => {
                if !limits.shutdown_grace.is_zero() {
                    tracing::warn!(
                        grace_secs = limits.shutdown_grace.as_secs(),
                        "requests still running when the shutdown grace ran out; stopping them"
                    );
                }
            }
        }
        connections.shutdown().await;
    }
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
    /// The `reason` label of `<prefix>_connections_refused_total`.
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

/// A server's connection series: `<prefix>_connections_open`,
/// `<prefix>_connections_refused_total{reason}` ([`CapRefusal::label`]) and
/// `<prefix>_connections_closed_total{reason}` (`handshake_timeout`, `first_request_timeout`,
/// `idle_timeout`, `idle_after_goaway`).
#[derive(Clone)]
pub struct ConnectionMetrics {
    open: IntGauge,
    refused: IntCounterVec,
    closed: IntCounterVec,
}

impl ConnectionMetrics {
    /// `prefix` names the server (`xpart_agent_front`); `clients` says whose connections they
    /// are in the help text (`"Caller"`).
    pub fn new(prefix: &str, clients: &str) -> prometheus::Result<ConnectionMetrics> {
        let open = IntGauge::new(
            format!("{prefix}_connections_open"),
            format!("{clients} connections open"),
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_connections_refused_total"),
                format!("{clients} connections closed at accept because a cap was reached"),
            ),
            &["reason"],
        )?;
        let closed = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_connections_closed_total"),
                format!("{clients} connections closed for sending nothing in time"),
            ),
            &["reason"],
        )?;
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
        Ok(ConnectionMetrics {
            open,
            refused,
            closed,
        })
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
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
    metrics: Option<ConnectionMetrics>,
}

/// A connection's place under the caps; given back on drop.
struct Permit {
    caps: SharedCaps,
    source: IpAddr,
}

impl SharedCaps {
    fn new(caps: ConnectionCaps, metrics: Option<ConnectionMetrics>) -> SharedCaps {
        SharedCaps {
            inner: Arc::new(Mutex::new(caps)),
            metrics,
        }
    }

    fn admit(&self, source: IpAddr) -> Result<Permit, CapRefusal> {
        let mut caps = self.lock();
        caps.admit(source)?;
        self.show_open(&caps);
        Ok(Permit {
            caps: self.clone(),
            source,
        })
    }

    fn show_open(&self, caps: &ConnectionCaps) {
        if let Some(metrics) = &self.metrics {
            metrics
                .open
                .set(i64::try_from(caps.open()).unwrap_or(i64::MAX));
        }
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
        self.caps.show_open(&caps);
    }
}

/// Why the server closed a connection that was sending nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quiet {
    /// The handshake did not finish within `handshake_timeout`.
    Handshake,
    /// No request arrived within `first_request_timeout` of the handshake.
    FirstRequest,
    /// Nothing in flight for `idle_timeout`.
    Idle,
    /// Still open and idle `idle_timeout` after the graceful close began (a peer that
    /// ignores GOAWAY).
    IdleAfterGoaway,
}

impl Quiet {
    /// The `reason` label of `<prefix>_connections_closed_total`.
    fn label(self) -> &'static str {
        match self {
            Quiet::Handshake => "handshake_timeout",
            Quiet::FirstRequest => "first_request_timeout",
            Quiet::Idle => "idle_timeout",
            Quiet::IdleAfterGoaway => "idle_after_goaway",
        }
    }
}

/// One accepted connection and what it needs.
struct Connection<H> {
    peer: SocketAddr,
    handler: Arc<H>,
    limits: Limits,
    metrics: Option<ConnectionMetrics>,
    /// Requests in flight on the whole server, for shutdown.
    server_in_flight: Arc<watch::Sender<usize>>,
    /// Turns true when the server shuts down.
    closing: watch::Receiver<bool>,
}

impl<H: Handler> Connection<H> {
    /// Runs the connection to its end; `_permit` holds its place under the caps until then.
    async fn serve<Io>(mut self, handshake: Handshake<Io>, _permit: Permit)
    where
        Io: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let peer = self.peer;
        let io = match tokio::time::timeout(self.limits.handshake_timeout, handshake).await {
            Ok(Ok(io)) => io,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "handshake failed");
                return;
            }
            Err(_) => {
                self.count_closed(Quiet::Handshake);
                tracing::debug!(%peer, "handshake timed out");
                return;
            }
        };
        let activity = Activity::new(self.server_in_flight.clone());
        let handler = self.handler.clone();
        let in_flight = activity.clone();
        let service = service_fn(move |request| {
            // Counted from the moment the request's headers are in until its response body
            // has ended or been dropped.
            let guard = InFlight::start(&in_flight);
            let response = handler.call(request, peer);
            async move {
                let response = response.await;
                Ok::<_, std::convert::Infallible>(response.map(|body| Tracked {
                    body,
                    _in_flight: guard,
                }))
            }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // The server's own timers (below) bound header reads and idle keep-alive on HTTP/1.1,
        // so hyper's 30 s header timer would only cut `idle_timeout` short.
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
        if self.limits.http1_only {
            builder = builder.http1_only();
        }
        let connection = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);

        let mut closing = false;
        let mut shutting_down = false;
        loop {
            let quiet = activity.quiet(self.limits);
            let reason = tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(error) = ended {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                    return;
                }
                reason = quiet => reason,
                _ = self.closing.wait_for(|closing| *closing), if !shutting_down => {
                    shutting_down = true;
                    if !closing {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    continue;
                }
            };
            if closing {
                self.count_closed(Quiet::IdleAfterGoaway);
                tracing::debug!(%peer, "peer kept an idle connection open after GOAWAY");
                return;
            }
            self.count_closed(reason);
            tracing::debug!(%peer, reason = reason.label(), "closing a quiet connection");
            // HTTP/2 sends GOAWAY and lets a stream that raced in finish; HTTP/1.1 closes at
            // once, as nothing is in flight; before the first byte, the read is abandoned.
            connection.as_mut().graceful_shutdown();
            closing = true;
        }
    }

    fn count_closed(&self, reason: Quiet) {
        if let Some(metrics) = &self.metrics {
            metrics.closed.with_label_values(&[reason.label()]).inc();
        }
    }
}

/// Requests in flight on one connection, and whether any has arrived yet.
#[derive(Clone)]
struct Activity {
    state: Arc<watch::Sender<InFlightCount>>,
    server: Arc<watch::Sender<usize>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct InFlightCount {
    open: usize,
    started: u64,
}

impl Activity {
    fn new(server: Arc<watch::Sender<usize>>) -> Activity {
        Activity {
            state: Arc::new(watch::Sender::new(InFlightCount::default())),
            server,
        }
    }

    /// Resolves once the connection has gone quiet: no first request within
    /// `first_request_timeout`, or nothing in flight for `idle_timeout`.
    async fn quiet(&self, limits: Limits) -> Quiet {
        let mut state = self.state.subscribe();
        let first = state.wait_for(|s| s.started > 0);
        if tokio::time::timeout(limits.first_request_timeout, first)
            .await
            .is_err()
        {
            return Quiet::FirstRequest;
        }
        loop {
            // The sender lives as long as `self`, so neither wait can see it closed.
            let _ = state.wait_for(|s| s.open == 0).await;
            // Any change (a request starting or ending) restarts the idle clock.
            if tokio::time::timeout(limits.idle_timeout, state.changed())
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
        activity.server.send_modify(|open| *open += 1);
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
        self.activity
            .server
            .send_modify(|open| *open = open.saturating_sub(1));
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
struct Tracked<B> {
    body: B,
    /// Held for its `Drop`.
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
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

    fn activity() -> Activity {
        Activity::new(Arc::new(watch::Sender::new(0)))
    }

    #[tokio::test(start_paused = true)]
    async fn no_first_request_is_quiet_after_first_request_timeout() {
        let limits = Limits::default();
        let activity = activity();
        let started = tokio::time::Instant::now();
        assert_eq!(activity.quiet(limits).await, Quiet::FirstRequest);
        assert_eq!(started.elapsed(), limits.first_request_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_idle() {
        let limits = Limits::default();
        let activity = activity();
        let request = InFlight::start(&activity);
        let watching = activity.clone();
        let quiet = tokio::spawn(async move { watching.quiet(limits).await });
        tokio::time::sleep(limits.idle_timeout * 10).await;
        assert!(
            !quiet.is_finished(),
            "a long response must keep the connection"
        );

        let ended = tokio::time::Instant::now();
        drop(request);
        assert_eq!(quiet.await.expect("quiet task"), Quiet::Idle);
        assert_eq!(ended.elapsed(), limits.idle_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_restarts_the_idle_clock() {
        let limits = Limits::default();
        let activity = activity();
        drop(InFlight::start(&activity));
        let watching = activity.clone();
        let quiet = tokio::spawn(async move { watching.quiet(limits).await });
        tokio::time::sleep(limits.idle_timeout - Duration::from_secs(1)).await;
        drop(InFlight::start(&activity));
        let last = tokio::time::Instant::now();
        assert_eq!(quiet.await.expect("quiet task"), Quiet::Idle);
        assert_eq!(last.elapsed(), limits.idle_timeout);
    }

    #[test]
    fn requests_in_flight_are_counted_for_the_whole_server() {
        let server = Arc::new(watch::Sender::new(0));
        let one = Activity::new(server.clone());
        let two = Activity::new(server.clone());
        let a = InFlight::start(&one);
        let b = InFlight::start(&two);
        assert_eq!(*server.borrow(), 2);
        drop(a);
        assert_eq!(*server.borrow(), 1);
        drop(b);
        assert_eq!(*server.borrow(), 0);
    }
}
