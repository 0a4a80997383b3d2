//! The one HTTP server: shutdown lets a request in flight finish within the grace, does not
//! wait on idle connections, cuts at once with no grace; connections over a cap are refused
//! at accept and counted.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::sync::{oneshot, watch};
use xpart_daemon::serve::{ConnectionMetrics, Limits, Server};

/// A server whose `/hold` requests wait for the test to release them.
struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    release: Arc<Mutex<Vec<oneshot::Sender<()>>>>,
    registry: Registry,
}

impl Running {
    /// Waits for the server task to end, `why` it should within `limit`.
    async fn ends_within(self, limit: Duration, why: &str) {
        tokio::time::timeout(limit, self.task)
            .await
            .unwrap_or_else(|_| panic!("{why}"))
            .expect("server task");
    }
}

/// The default limits with `shutdown_grace` for the requests in flight at shutdown.
fn with_grace(shutdown_grace: Duration) -> Limits {
    Limits {
        shutdown_grace,
        ..Limits::default()
    }
}

async fn start(limits: Limits) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let release = Arc::new(Mutex::new(Vec::new()));
    let holds = release.clone();
    let handler = move |request: Request<Incoming>, _peer: SocketAddr| {
        let holds = holds.clone();
        async move {
            if request.uri().path() == "/hold" {
                let (tx, rx) = oneshot::channel();
                holds.lock().expect("holds").push(tx);
                let _ = rx.await;
            }
            Response::new(Full::new(Bytes::from_static(b"done")))
        }
    };
    let registry = Registry::new();
    let metrics = ConnectionMetrics::new("test_server", "Test").expect("metrics");
    metrics.register(&registry).expect("register");
    let (stop, stopped) = watch::channel(false);
    let server = Server::new(limits).metrics(metrics);
    let task = tokio::spawn(server.serve(listener, handler, stopped));
    Running {
        addr,
        stop,
        task,
        release,
        registry,
    }
}

type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn h2_client(addr: SocketAddr) -> H2Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    sender
}

async fn get(sender: &mut H2Sender, path: &str) -> Result<(StatusCode, Bytes), hyper::Error> {
    let request = Request::get(format!("http://test{path}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

async fn wait_for_holds(running: &Running, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while running.release.lock().expect("holds").len() < count {
        assert!(Instant::now() < deadline, "requests never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn metric(registry: &Registry, series: &str) -> String {
    let mut text = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .expect("encode");
    let text = String::from_utf8(text).expect("utf-8");
    text.lines()
        .find(|line| line.starts_with(series))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .rsplit(' ')
        .next()
        .expect("value")
        .to_owned()
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish_within_the_grace() {
    let running = start(with_grace(Duration::from_secs(10))).await;
    let mut sender = h2_client(running.addr).await;
    let in_flight = tokio::spawn(async move { get(&mut sender, "/hold").await });
    wait_for_holds(&running, 1).await;

    running.stop.send_replace(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !running.task.is_finished(),
        "the server waits for the request in flight"
    );
    assert!(
        tokio::net::TcpStream::connect(running.addr).await.is_err(),
        "no new connections once shutdown began"
    );
    for release in running.release.lock().expect("holds").drain(..) {
        let _ = release.send(());
    }
    let answer = in_flight.await.expect("request task").expect("answer");
    assert_eq!(answer, (StatusCode::OK, Bytes::from_static(b"done")));
    running
        .ends_within(
            Duration::from_secs(2),
            "the server ends once the request is done",
        )
        .await;
}

#[tokio::test]
async fn shutdown_does_not_wait_on_idle_connections() {
    let running = start(with_grace(Duration::from_secs(30))).await;
    let mut sender = h2_client(running.addr).await;
    assert_eq!(
        get(&mut sender, "/").await.expect("answer").0,
        StatusCode::OK
    );

    let began = Instant::now();
    running.stop.send_replace(true);
    running
        .ends_within(
            Duration::from_secs(3),
            "an idle connection does not hold shutdown for the grace",
        )
        .await;
    assert!(began.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn shutdown_without_grace_cuts_requests_in_flight() {
    let running = start(Limits::default()).await;
    let mut sender = h2_client(running.addr).await;
    let in_flight = tokio::spawn(async move { get(&mut sender, "/hold").await });
    wait_for_holds(&running, 1).await;

    running.stop.send_replace(true);
    running
        .ends_within(Duration::from_secs(2), "no grace: the server ends at once")
        .await;
    let answer = in_flight.await.expect("request task");
    assert!(answer.is_err(), "the request was cut: {answer:?}");
}

#[tokio::test]
async fn connections_over_the_per_source_cap_are_refused_and_counted() {
    let running = start(Limits {
        max_connections_per_source: 1,
        ..Limits::default()
    })
    .await;
    let mut first = h2_client(running.addr).await;
    assert_eq!(
        get(&mut first, "/").await.expect("answer").0,
        StatusCode::OK
    );
    assert_eq!(
        metric(&running.registry, "test_server_connections_open"),
        "1"
    );

    let mut second = tokio::net::TcpStream::connect(running.addr)
        .await
        .expect("the kernel accepts; the server closes");
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut second, &mut buf),
    )
    .await
    .expect("closed at accept");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(
        metric(
            &running.registry,
            r#"test_server_connections_refused_total{reason="max_connections_per_source"}"#
        ),
        "1"
    );
    assert_eq!(
        get(&mut first, "/").await.expect("answer").0,
        StatusCode::OK
    );
}
