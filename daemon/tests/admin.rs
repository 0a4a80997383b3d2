//! The admin server over real HTTP/1.1 on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, Registry};
use xpart_daemon::admin::{self, AdminHandler};
use xpart_daemon::status_page::StatusPage;

struct Daemon {
    registry: Registry,
    requests: IntCounter,
    drained: AtomicBool,
}

impl Daemon {
    fn new() -> Arc<Daemon> {
        let registry = Registry::new();
        let requests = IntCounter::new("xpart_test_requests_total", "Requests seen")
            .expect("a valid metric name");
        registry
            .register(Box::new(requests.clone()))
            .expect("register the counter once");
        requests.inc_by(7);
        Arc::new(Daemon {
            registry,
            requests,
            drained: AtomicBool::new(false),
        })
    }
}

#[async_trait]
impl AdminHandler for Daemon {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    async fn ready(&self) -> (bool, serde_json::Value) {
        if self.drained.load(Ordering::SeqCst) {
            return (false, serde_json::json!({"reason": "drained"}));
        }
        (true, serde_json::json!({"relays_up": 1}))
    }

    async fn status(&self) -> serde_json::Value {
        serde_json::json!({"service": "test", "requests": self.requests.get()})
    }

    fn status_page(&self) -> Option<&StatusPage> {
        Some(&PAGE)
    }

    async fn extra(&self, request: Request<Bytes>) -> Option<Response<Full<Bytes>>> {
        match (request.method(), request.uri().path()) {
            (&Method::POST, "/drain") => {
                self.drained.store(true, Ordering::SeqCst);
                Some(admin::json(
                    StatusCode::OK,
                    &serde_json::json!({"drained": true}),
                ))
            }
            (&Method::POST, "/echo") => Some(admin::text(
                StatusCode::OK,
                &String::from_utf8_lossy(request.body()),
            )),
            _ => None,
        }
    }
}

const PAGE: StatusPage = StatusPage {
    title: "xpart test",
    summary: |status| vec![("requests".to_owned(), status["requests"].to_string())],
    script: "function render() { return []; }",
};

async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &'static str,
) -> (StatusCode, http::HeaderMap, String) {
    let stream = tokio::net::TcpStream::connect(addr).await;
    let io = TokioIo::new(stream.expect("connect to the admin server"));
    let handshake = hyper::client::conn::http1::handshake(io).await;
    let (mut sender, connection) = handshake.expect("HTTP/1.1 handshake with the admin server");
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("admin request");
    let response = sender.send_request(request).await.expect("admin response");
    let (head, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .expect("admin response body")
        .to_bytes();
    let body = String::from_utf8(body.to_vec()).expect("admin answers in UTF-8");
    (head.status, head.headers, body)
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[tokio::test]
async fn builtin_routes_answer() {
    let server = admin::serve(loopback(), Daemon::new()).unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);

    let (status, _, body) = call(addr, Method::GET, "/healthz", "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));

    let (status, headers, body) = call(addr, Method::GET, "/metrics", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    assert!(
        body.contains("# TYPE xpart_test_requests_total counter"),
        "{body}"
    );
    assert!(body.contains("xpart_test_requests_total 7"), "{body}");

    let (status, headers, body) = call(addr, Method::GET, "/status", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    let status_json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        status_json,
        serde_json::json!({"service": "test", "requests": 7})
    );

    let (status, _, body) = call(addr, Method::GET, "/readyz", "").await;
    assert_eq!(status, StatusCode::OK);
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready, serde_json::json!({"ready": true, "relays_up": 1}));

    let (status, headers, body) = call(addr, Method::GET, "/", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert!(body.contains("<title>xpart test</title>"), "{body}");
    assert!(body.contains("requests</span> 7</li>"), "{body}");

    server.shutdown().await;
}

#[tokio::test]
async fn extra_routes_change_readiness() {
    let daemon = Daemon::new();
    let server = admin::serve(loopback(), daemon.clone()).unwrap();
    let addr = server.local_addr();

    let (status, _, body) = call(addr, Method::POST, "/drain", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"drained": true})
    );

    let (status, _, body) = call(addr, Method::GET, "/readyz", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"ready": false, "reason": "drained"})
    );

    let (status, _, body) = call(addr, Method::POST, "/echo", "hello admin").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello admin"));
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_are_refused() {
    let server = admin::serve(loopback(), Daemon::new()).unwrap();
    let addr = server.local_addr();

    let (status, _, body) = call(addr, Method::GET, "/nope", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["message"], "no admin route GET /nope");

    let (status, headers, _) = call(addr, Method::POST, "/metrics", "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "GET, HEAD");

    let (status, _, _) = call(addr, Method::GET, "/drain", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The status page answers GET and HEAD; other methods on `/` are left to `extra`.
    let (status, _, _) = call(addr, Method::POST, "/", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_admin_body_is_refused() {
    let server = admin::serve(loopback(), Daemon::new()).unwrap();
    let big: &'static str = Box::leak("x".repeat(admin::MAX_ADMIN_BODY_BYTES + 1).into_boxed_str());
    let (status, _, _) = call(server.local_addr(), Method::POST, "/echo", big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    server.shutdown().await;
}

#[tokio::test]
async fn address_in_use_is_an_error_and_shutdown_frees_the_port() {
    let server = admin::serve(loopback(), Daemon::new()).unwrap();
    let addr = server.local_addr();
    let err = admin::serve(addr, Daemon::new())
        .err()
        .expect("second bind must fail");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);

    server.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener still open after shutdown"
    );
    let again = admin::serve(addr, Daemon::new()).unwrap();
    let (status, _, _) = call(again.local_addr(), Method::GET, "/healthz", "").await;
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn serve_outside_a_runtime_is_an_error_not_a_panic() {
    let err = admin::serve(loopback(), Daemon::new())
        .err()
        .expect("needs a runtime");
    assert!(err.to_string().contains("Tokio runtime"), "{err}");
}
