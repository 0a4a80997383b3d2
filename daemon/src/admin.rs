//! The admin HTTP server each daemon runs on a local port: `GET /metrics` (Prometheus
//! text), `GET /healthz` (the process answers), `GET /readyz` (200 or 503 with the reason),
//! `GET /status` (JSON), and whatever else the daemon adds through
//! [`AdminHandler::extra`] (the relay's `POST /drain`, for instance).
//!
//! The daemon supplies the content through an [`AdminHandler`]; this module owns the
//! listener, HTTP/1.1, routing and the response shapes.

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
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Largest request body an admin route accepts.
pub const MAX_ADMIN_BODY_BYTES: usize = 64 * 1024;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

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
