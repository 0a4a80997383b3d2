//! The admin HTTP server each daemon runs on a local port: `GET /metrics` (Prometheus
//! text), `GET /healthz` (the process answers), `GET /readyz` (200 or 503 with the reason),
//! `GET /status` (JSON), `GET /` (the daemon's [`StatusPage`] of that JSON), and whatever else
//! the daemon adds through [`AdminHandler::extra`] (the relay's `POST /drain`, for instance).
//!
//! The daemon supplies the content through an [`AdminHandler`]; this module owns the
//! listener, routing and the response shapes, served by [`crate::serve`] with
//! [`Limits::admin`] (HTTP/1.1, modest connection caps, a request expected at once). Both daemons export the tunnel the
//! same way: [`register_tunnel_peers`] and [`register_tunnel_drops`] for `/metrics`, and
//! [`tunnel_peers_json`] and [`tunnel_dropped_json`] for `/status` (`tunnel.peers`,
//! `tunnel.dropped`), so dashboards, alerts and `xpart status` read one shape.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;
use xpart_tunnel::PeerStats;

use crate::serve::Limits;
use crate::status_page::StatusPage;

/// Largest request body an admin route accepts.
pub const MAX_ADMIN_BODY_BYTES: usize = 64 * 1024;

/// Every datagram or packet the tunnel dropped, by reason (`xpart_tunnel::DropReason` names,
/// a fixed set), whether or not a peer could be named; the per-peer share is also in each
/// daemon's per-peer drop gauges.
pub const TUNNEL_DROPPED_METRIC: &str = "xpart_tunnel_dropped_total";

/// Reads the tunnel's drop counts by reason (`xpart_tunnel::Tunnel::dropped`); `None` while
/// the daemon has no tunnel of its own.
pub type DropSource = Arc<dyn Fn() -> Option<BTreeMap<String, u64>> + Send + Sync>;

/// Per-peer tunnel metrics, labelled by the peer's configured name (`peer`); see
/// [`register_tunnel_peers`].
pub const TUNNEL_PEER_BYTES_METRIC: &str = "xpart_tunnel_peer_bytes_total";
pub const TUNNEL_PEER_PACKETS_METRIC: &str = "xpart_tunnel_peer_packets_total";
pub const TUNNEL_PEER_DROPPED_METRIC: &str = "xpart_tunnel_peer_dropped_total";
pub const TUNNEL_PEER_HANDSHAKE_AGE_METRIC: &str = "xpart_tunnel_peer_handshake_age_seconds";
pub const TUNNEL_PEER_UP_METRIC: &str = "xpart_tunnel_peer_up";

/// How long a WireGuard session lasts without a new handshake (Reject-After-Time, WireGuard
/// paper §6.1): a peer whose last handshake is older carries no data until it shakes hands
/// again.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);

/// Reads the tunnel's per-peer counters (`xpart_tunnel::Tunnel::peer_stats`); empty while
/// the daemon has no tunnel of its own.
pub type PeerSource = Arc<dyn Fn() -> Vec<PeerStats> + Send + Sync>;

/// A daemon's answers to the admin routes.
#[async_trait]
pub trait AdminHandler: Send + Sync + 'static {
    /// The registry `/metrics` exposes.
    fn registry(&self) -> &Registry;

    /// Whether the daemon should receive traffic, and why (JSON detail for `/readyz`).
    async fn ready(&self) -> (bool, serde_json::Value);

    /// The daemon's state for `/status` and `xpart status`.
    async fn status(&self) -> serde_json::Value;

    /// The page `GET /` renders `/status` with; `None` leaves `/` to [`AdminHandler::extra`].
    fn status_page(&self) -> Option<&StatusPage> {
        None
    }

    /// Answer a route the built-in ones do not cover (the body read whole, at most
    /// [`MAX_ADMIN_BODY_BYTES`]); `None` gives 404.
    async fn extra(&self, request: Request<Bytes>) -> Option<Response<Full<Bytes>>> {
        let _ = request;
        None
    }
}

/// A running admin server. Dropping it, or [`AdminServer::shutdown`], stops it.
pub struct AdminServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl AdminServer {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stop accepting, end open connections and wait for the server task.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Adds [`TUNNEL_DROPPED_METRIC`] to `registry`, read from `source` at every scrape, so the
/// counts are as fresh as the scrape and the tunnel's core stays the only place that counts.
pub fn register_tunnel_drops(registry: &Registry, source: DropSource) -> prometheus::Result<()> {
    let counters = IntCounterVec::new(
        Opts::new(
            TUNNEL_DROPPED_METRIC,
            "Tunnel datagrams and packets dropped, by reason, with or without a known peer",
        ),
        &["reason"],
    )?;
    registry.register(Box::new(TunnelDrops {
        counters,
        source,
        updating: std::sync::Mutex::new(()),
    }))
}

/// The `tunnel.dropped` object of `/status`: drop counts by reason, `null` without a tunnel.
pub fn tunnel_dropped_json(source: &DropSource) -> serde_json::Value {
    match source() {
        Some(dropped) => serde_json::json!(dropped),
        None => serde_json::Value::Null,
    }
}

/// Adds the per-peer tunnel metrics to `registry`, read from `source` at every scrape:
/// - `xpart_tunnel_peer_bytes_total{peer,direction}` and `xpart_tunnel_peer_packets_total{peer,direction}`
///   (`direction` is `rx` or `tx`): WireGuard datagrams on the wire, as `wg show` counts them;
/// - `xpart_tunnel_peer_dropped_total{peer,reason}`: the drops that could be put down to the peer
///   (their sum over peers and the unattributed ones is `xpart_tunnel_dropped_total`);
/// - `xpart_tunnel_peer_handshake_age_seconds{peer}`: seconds since the last handshake, absent
///   before the first;
/// - `xpart_tunnel_peer_up{peer}`: 1 while the last handshake is within [`SESSION_LIFETIME`].
pub fn register_tunnel_peers(registry: &Registry, source: PeerSource) -> prometheus::Result<()> {
    registry.register(Box::new(TunnelPeers::new(source)?))
}

/// The `tunnel.peers` array of `/status`: each peer's counters as the tunnel reports them
/// (`last_handshake` as serde writes a `SystemTime`), and `handshake_age_seconds` as this
/// host's clock sees it, `null` before the first handshake.
pub fn tunnel_peers_json(peers: &[PeerStats], now: SystemTime) -> serde_json::Value {
    let peers = peers
        .iter()
        .map(|peer| {
            let mut value = serde_json::json!(peer);
            if let Some(object) = value.as_object_mut() {
                object.insert(
                    "handshake_age_seconds".to_owned(),
                    serde_json::json!(handshake_age(peer, now).map(|age| age.as_secs_f64())),
                );
            }
            value
        })
        .collect();
    serde_json::Value::Array(peers)
}

fn handshake_age(peer: &PeerStats, now: SystemTime) -> Option<Duration> {
    let at = peer.last_handshake?;
    // A handshake stamped after `now` (the wall clock stepped back) is as fresh as can be.
    Some(now.duration_since(at).unwrap_or_default())
}

/// The per-peer families, filled afresh from the tunnel at each scrape: the tunnel's core
/// stays the only place that counts, and a tunnel started again reads as a counter reset.
struct TunnelPeers {
    source: PeerSource,
    bytes: IntCounterVec,
    packets: IntCounterVec,
    dropped: IntCounterVec,
    handshake_age: GaugeVec,
    up: IntGaugeVec,
}

impl TunnelPeers {
    fn new(source: PeerSource) -> prometheus::Result<TunnelPeers> {
        let peers = TunnelPeers {
            source,
            bytes: IntCounterVec::new(
                Opts::new(
                    TUNNEL_PEER_BYTES_METRIC,
                    "WireGuard bytes on the wire, by peer and direction (rx, tx)",
                ),
                &["peer", "direction"],
            )?,
            packets: IntCounterVec::new(
                Opts::new(
                    TUNNEL_PEER_PACKETS_METRIC,
                    "WireGuard datagrams, by peer and direction (rx, tx)",
                ),
                &["peer", "direction"],
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    TUNNEL_PEER_DROPPED_METRIC,
                    "Tunnel datagrams and packets dropped, by peer and reason",
                ),
                &["peer", "reason"],
            )?,
            handshake_age: GaugeVec::new(
                Opts::new(
                    TUNNEL_PEER_HANDSHAKE_AGE_METRIC,
                    "Seconds since the last WireGuard handshake with the peer (absent before the first)",
                ),
                &["peer"],
            )?,
            up: IntGaugeVec::new(
                Opts::new(
                    TUNNEL_PEER_UP_METRIC,
                    "1 while the last WireGuard handshake with the peer is under 180 s old",
                ),
                &["peer"],
            )?,
        };
        Ok(peers)
    }

    /// Empty families with this collector's names, help and labels.
    fn fresh(&self) -> prometheus::Result<TunnelPeers> {
        TunnelPeers::new(self.source.clone())
    }

    /// Every family, in the order `/metrics` lists them.
    fn families(&self) -> [&dyn Collector; 5] {
        [
            &self.bytes,
            &self.packets,
            &self.dropped,
            &self.handshake_age,
            &self.up,
        ]
    }
}

impl Collector for TunnelPeers {
    fn desc(&self) -> Vec<&Desc> {
        self.families()
            .into_iter()
            .flat_map(|family| family.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let peers = (self.source)();
        // The definitions were accepted once in `new`, so they are accepted again.
        let Ok(fresh) = self.fresh() else {
            return Vec::new();
        };
        let now = SystemTime::now();
        for peer in &peers {
            let name = peer.name.as_str();
            let counts = [
                (&fresh.bytes, "rx", peer.rx_bytes),
                (&fresh.bytes, "tx", peer.tx_bytes),
                (&fresh.packets, "rx", peer.rx_packets),
                (&fresh.packets, "tx", peer.tx_packets),
            ];
            for (counter, direction, count) in counts {
                counter.with_label_values(&[name, direction]).inc_by(count);
            }
            for (reason, count) in &peer.drops {
                fresh
                    .dropped
                    .with_label_values(&[name, reason.as_str()])
                    .inc_by(*count);
            }
            let age = handshake_age(peer, now);
            if let Some(age) = age {
                fresh
                    .handshake_age
                    .with_label_values(&[name])
                    .set(age.as_secs_f64());
            }
            let up = age.is_some_and(|age| age < SESSION_LIFETIME);
            fresh.up.with_label_values(&[name]).set(i64::from(up));
        }
        fresh
            .families()
            .into_iter()
            .flat_map(|family| family.collect())
            .collect()
    }
}

/// The tunnel's own counters copied into a Prometheus counter family at scrape time.
struct TunnelDrops {
    counters: IntCounterVec,
    source: DropSource,
    /// Two scrapes at once must not both add the same difference.
    updating: std::sync::Mutex<()>,
}

impl Collector for TunnelDrops {
    fn desc(&self) -> Vec<&Desc> {
        self.counters.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(dropped) = (self.source)() else {
            return Vec::new();
        };
        let _updating = self
            .updating
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (reason, count) in dropped {
            let counter = self.counters.with_label_values(&[reason.as_str()]);
            let seen = counter.get();
            // A tunnel started again counts from zero; Prometheus reads the drop as a reset.
            if count < seen {
                counter.reset();
            }
            counter.inc_by(count - counter.get());
        }
        self.counters.collect()
    }
}

/// Bind `listen` and serve the admin routes from `handler` ([`crate::serve`] with
/// [`Limits::admin`]). Must be called inside a Tokio runtime; binding errors (address in use,
/// permission) are returned at once.
pub fn serve(listen: SocketAddr, handler: Arc<dyn AdminHandler>) -> io::Result<AdminServer> {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return Err(io::Error::other("the admin server needs a Tokio runtime"));
    };
    let std_listener = std::net::TcpListener::bind(listen)?;
    std_listener.set_nonblocking(true)?;
    let local_addr = std_listener.local_addr()?;
    let listener = {
        let _entered = runtime.enter();
        TcpListener::from_std(std_listener)?
    };
    let (stop, stopped) = watch::channel(false);
    let answer = move |request, _peer| {
        let handler = handler.clone();
        async move { route(handler.as_ref(), request).await }
    };
    let task = runtime.spawn(crate::serve::serve(
        listener,
        answer,
        Limits::admin(),
        stopped,
    ));
    Ok(AdminServer {
        local_addr,
        stop,
        task: Some(task),
    })
}

/// Dispatch one admin request.
async fn route(handler: &dyn AdminHandler, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (head, body) = request.into_parts();
    let method = head.method.clone();
    let path = head.uri.path().to_string();
    let builtin = matches!(
        path.as_str(),
        "/metrics" | "/healthz" | "/readyz" | "/status"
    );
    if builtin && (method == Method::GET || method == Method::HEAD) {
        return match path.as_str() {
            "/metrics" => metrics(handler.registry()),
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => readiness(handler).await,
            _ => json(StatusCode::OK, &handler.status().await),
        };
    }
    let body = match Limited::new(body, MAX_ADMIN_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or unreadable",
            )
        }
    };
    if path == "/" && (method == Method::GET || method == Method::HEAD) {
        if let Some(page) = handler.status_page() {
            return crate::status_page::respond(page, &handler.status().await);
        }
    }
    if let Some(response) = handler.extra(Request::from_parts(head, body)).await {
        return response;
    }
    if builtin {
        let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    error(
        StatusCode::NOT_FOUND,
        &format!("no admin route {method} {path}"),
    )
}

fn metrics(registry: &Registry) -> Response<Full<Bytes>> {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    if let Err(err) = encoder.encode(&registry.gather(), &mut body) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode metrics: {err}"),
        );
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    if let Ok(content_type) = HeaderValue::from_str(encoder.format_type()) {
        response.headers_mut().insert(CONTENT_TYPE, content_type);
    }
    response
}

/// `/readyz`: the handler's detail with `"ready"` set, 503 when not ready.
async fn readiness(handler: &dyn AdminHandler) -> Response<Full<Bytes>> {
    let (ready, detail) = handler.ready().await;
    let body = match detail {
        serde_json::Value::Object(mut fields) => {
            fields.insert("ready".to_string(), serde_json::Value::Bool(ready));
            serde_json::Value::Object(fields)
        }
        serde_json::Value::Null => serde_json::json!({ "ready": ready }),
        other => serde_json::json!({ "ready": ready, "detail": other }),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &body)
}

/// A JSON response; also for [`AdminHandler::extra`] implementations.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = value.to_string();
    body.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A plain-text response; also for [`AdminHandler::extra`] implementations.
pub fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "message": message }))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn tunnel_drops_are_counters_read_from_the_source_at_each_scrape() {
        let counts = Arc::new(Mutex::new(None::<BTreeMap<String, u64>>));
        let reading = counts.clone();
        let source: DropSource = Arc::new(move || reading.lock().unwrap().clone());
        let registry = Registry::new();
        register_tunnel_drops(&registry, source.clone()).unwrap();

        // Without a tunnel there is nothing to report.
        assert!(scrape(&registry).is_empty());
        assert_eq!(tunnel_dropped_json(&source), serde_json::Value::Null);

        let set = |garbage: u64, under_load: u64| {
            *counts.lock().unwrap() = Some(BTreeMap::from([
                ("garbage".to_string(), garbage),
                ("under_load".to_string(), under_load),
            ]));
        };
        set(3, 0);
        let text = scrape(&registry);
        assert!(
            text.contains("# TYPE xpart_tunnel_dropped_total counter"),
            "{text}"
        );
        assert!(
            text.contains("xpart_tunnel_dropped_total{reason=\"garbage\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("xpart_tunnel_dropped_total{reason=\"under_load\"} 0"),
            "{text}"
        );

        set(5, 2900);
        let text = scrape(&registry);
        assert!(text.contains("{reason=\"garbage\"} 5"), "{text}");
        assert!(text.contains("{reason=\"under_load\"} 2900"), "{text}");
        assert_eq!(
            tunnel_dropped_json(&source),
            serde_json::json!({"garbage": 5, "under_load": 2900})
        );

        // A tunnel started again counts from zero: the counter follows it down.
        set(1, 0);
        let text = scrape(&registry);
        assert!(text.contains("{reason=\"garbage\"} 1"), "{text}");
    }

    #[test]
    fn peer_metrics_and_status_read_the_tunnel_at_each_scrape() {
        let stats = Arc::new(Mutex::new(Vec::<PeerStats>::new()));
        let reading = stats.clone();
        let source: PeerSource = Arc::new(move || reading.lock().unwrap().clone());
        let registry = Registry::new();
        register_tunnel_peers(&registry, source).unwrap();
        assert!(scrape(&registry).is_empty(), "no tunnel, no series");

        let now = SystemTime::now();
        *stats.lock().unwrap() = vec![
            peer("relay-a", Some(now - Duration::from_secs(30)), 1234),
            peer("relay-b", None, 0),
            peer("relay-c", Some(now - Duration::from_secs(600)), 7),
        ];
        let text = scrape(&registry);
        for line in [
            "# TYPE xpart_tunnel_peer_bytes_total counter",
            "xpart_tunnel_peer_bytes_total{direction=\"rx\",peer=\"relay-a\"} 1234",
            "xpart_tunnel_peer_bytes_total{direction=\"tx\",peer=\"relay-a\"} 2468",
            "xpart_tunnel_peer_packets_total{direction=\"rx\",peer=\"relay-a\"} 2",
            "xpart_tunnel_peer_dropped_total{peer=\"relay-a\",reason=\"replay\"} 4",
            "xpart_tunnel_peer_up{peer=\"relay-a\"} 1",
            "xpart_tunnel_peer_up{peer=\"relay-b\"} 0",
            "xpart_tunnel_peer_up{peer=\"relay-c\"} 0",
            "# TYPE xpart_tunnel_peer_handshake_age_seconds gauge",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        let age = sample(
            &text,
            "xpart_tunnel_peer_handshake_age_seconds{peer=\"relay-a\"}",
        );
        assert!((30.0..35.0).contains(&age), "{age}");
        assert!(
            !text.contains("xpart_tunnel_peer_handshake_age_seconds{peer=\"relay-b\"}"),
            "no age before the first handshake: {text}"
        );

        // A tunnel started again counts from zero: the counter follows it down.
        *stats.lock().unwrap() = vec![peer("relay-a", None, 5)];
        let text = scrape(&registry);
        assert!(
            text.contains("xpart_tunnel_peer_bytes_total{direction=\"rx\",peer=\"relay-a\"} 5"),
            "{text}"
        );
        assert!(!text.contains("relay-b"), "{text}");

        let json = tunnel_peers_json(
            &[peer("relay-a", Some(now - Duration::from_secs(30)), 1)],
            now,
        );
        assert_eq!(json[0]["name"], "relay-a");
        assert_eq!(json[0]["rx_bytes"], 1);
        assert_eq!(json[0]["handshake_age_seconds"], 30.0);
        assert!(json[0]["last_handshake"]["secs_since_epoch"].is_u64());
        let json = tunnel_peers_json(&[peer("relay-b", None, 0)], now);
        assert_eq!(json[0]["handshake_age_seconds"], serde_json::Value::Null);
    }

    fn peer(name: &str, last_handshake: Option<SystemTime>, rx_bytes: u64) -> PeerStats {
        PeerStats {
            name: name.to_owned(),
            public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned(),
            endpoint: None,
            last_handshake,
            rx_bytes,
            tx_bytes: rx_bytes * 2,
            rx_packets: 2,
            tx_packets: 3,
            drops: BTreeMap::from([("replay".to_owned(), 4), ("garbage".to_owned(), 0)]),
        }
    }

    fn sample(text: &str, series: &str) -> f64 {
        let line = text
            .lines()
            .find(|line| line.starts_with(series))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    fn scrape(registry: &Registry) -> String {
        let mut body = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut body)
            .unwrap();
        String::from_utf8(body).unwrap()
    }
}
