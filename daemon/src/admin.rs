//! The admin HTTP server each daemon runs on a local port: `GET /metrics` (Prometheus
//! text), `GET /healthz` (the process answers), `GET /readyz` (200 or 503 with the reason),
//! `GET /status` (JSON), and whatever else the daemon adds through
//! [`AdminHandler::extra`] (the relay's `POST /drain`, for instance).
//!
//! The daemon supplies the content through an [`AdminHandler`]; this module owns the
//! listener, HTTP/1.1, routing and the response shapes. Both daemons export the tunnel's
//! drops the same way: [`register_tunnel_drops`] for `/metrics`, [`tunnel_dropped_json`]
//! for `/status`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Largest request body an admin route accepts.
pub const MAX_ADMIN_BODY_BYTES: usize = 64 * 1024;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Every datagram or packet the tunnel dropped, by reason (`xpart_tunnel::DropReason` names,
/// a fixed set), whether or not a peer could be named; the per-peer share is also in each
/// daemon's per-peer drop gauges.
pub const TUNNEL_DROPPED_METRIC: &str = "xpart_tunnel_dropped_total";

/// Reads the tunnel's drop counts by reason (`xpart_tunnel::Tunnel::dropped`); `None` while
/// the daemon has no tunnel of its own.
pub type DropSource = Arc<dyn Fn() -> Option<BTreeMap<String, u64>> + Send + Sync>;

/// A daemon's answers to the admin routes.
#[async_trait]
pub trait AdminHandler: Send + Sync + 'static {
    /// The registry `/metrics` exposes.
    fn registry(&self) -> &Registry;

    /// Whether the daemon should receive traffic, and why (JSON detail for `/readyz`).
    async fn ready(&self) -> (bool, serde_json::Value);

    /// The daemon's state for `/status` and `xpart status`.
    async fn status(&self) -> serde_json::Value;

    /// Answer a route the built-in ones do not cover; `None` gives 404.
    async fn extra(
        &self,
        method: &Method,
        path: &str,
        body: Bytes,
    ) -> Option<Response<Full<Bytes>>> {
        let _ = (method, path, body);
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

/// Bind `listen` and serve the admin routes from `handler`. Must be called inside a Tokio
/// runtime; binding errors (address in use, permission) are returned at once.
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
    let task = runtime.spawn(accept_loop(listener, handler, stopped));
    Ok(AdminServer {
        local_addr,
        stop,
        task: Some(task),
    })
}

async fn accept_loop(
    listener: TcpListener,
    handler: Arc<dyn AdminHandler>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            changed = stopped.changed() => {
                // A send of `true` or a dropped sender both mean stop.
                if changed.is_err() || *stopped.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(err) => {
                        // Per-connection failures (the peer reset before accept, fd
                        // exhaustion) must not end the server; back off briefly.
                        tracing::warn!(error = %err, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let handler = handler.clone();
                connections.spawn(serve_connection(stream, handler));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

async fn serve_connection(stream: tokio::net::TcpStream, handler: Arc<dyn AdminHandler>) {
    let service = service_fn(move |request| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(route(handler.as_ref(), request).await) }
    });
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = result {
        tracing::debug!(error = %err, "admin connection ended with an error");
    }
}

/// Dispatch one admin request.
async fn route(handler: &dyn AdminHandler, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
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
    let body = match Limited::new(request.into_body(), MAX_ADMIN_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or unreadable",
            )
        }
    };
    if let Some(response) = handler.extra(&method, &path, body).await {
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

    fn scrape(registry: &Registry) -> String {
        let mut body = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut body)
            .unwrap();
        String::from_utf8(body).unwrap()
    }
}
