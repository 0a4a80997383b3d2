//! The TLS front under callers that hold connections without using them: a TLS handshake, a
//! first request and an idle keep-alive each have a deadline, a response that is still
//! streaming is never cut, and connections over the total or per-source cap are closed at
//! accept and counted. Also: the front's key file must be private, like a WireGuard key.

mod fixture;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fixture::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use xpart_agent::AgentConfig;

const CONVERSE: &str = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse";
/// A stream whose relay sends its headers and a first chunk, then nothing.
const STALLED_STREAM: &str = "/model/anthropic.claude-partial/converse-stream";

/// One second for every deadline, so a test sees each fire quickly.
const SHORT_DEADLINES: &str =
    "handshake_timeout_secs = 1\nfirst_request_timeout_secs = 1\nidle_timeout_secs = 1\n";

/// An agent whose `[front]` section also holds `front` (TOML lines).
async fn setup(test: &str, front: &str) -> Stack {
    Stack::start(test, &token_principal(""), front).await
}

impl Stack {
    /// `xpart_agent_front_connections_closed_total` for one reason.
    async fn connections_closed(&self, reason: &str) -> f64 {
        let series = format!("xpart_agent_front_connections_closed_total{{reason=\"{reason}\"}}");
        self.metric(&series).await
    }

    /// `xpart_agent_front_connections_refused_total` for one reason.
    async fn connections_refused(&self, reason: &str) -> f64 {
        let series = format!("xpart_agent_front_connections_refused_total{{reason=\"{reason}\"}}");
        self.metric(&series).await
    }

    async fn metric(&self, series: &str) -> f64 {
        let (_, text) = admin_get(self.agent.admin_addr(), "/metrics").await;
        metric_value(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }
}

#[tokio::test]
async fn a_connection_that_never_starts_tls_is_closed_after_the_handshake_timeout() {
    let s = setup("handshake-timeout", SHORT_DEADLINES).await;
    let mut tcp = TcpStream::connect(s.agent.front_addr())
        .await
        .expect("connect");
    let opened = Instant::now();

    let closed_after = wait_closed(&mut tcp, Duration::from_secs(5)).await;

    assert!(
        closed_after >= Duration::from_millis(900),
        "closed too early: {closed_after:?}"
    );
    assert!(opened.elapsed() < Duration::from_secs(3));
    assert_eq!(s.connections_closed("handshake_timeout").await, 1.0);
}

#[tokio::test]
async fn a_tls_connection_without_a_request_is_closed_after_the_first_request_timeout() {
    let s = setup("first-request-h1", SHORT_DEADLINES).await;
    for alpn in ["http/1.1", "h2"] {
        let mut tls = tls_connect(&s.scratch, s.agent.front_addr(), None, alpn)
            .await
            .expect("handshake");
        let closed_after = wait_closed(&mut tls, Duration::from_secs(5)).await;
        assert!(
            closed_after >= Duration::from_millis(900),
            "{alpn}: closed too early: {closed_after:?}"
        );
    }
    assert_eq!(s.connections_closed("first_request_timeout").await, 2.0);
}

#[tokio::test]
async fn an_http2_connection_that_never_opens_a_stream_is_closed() {
    let s = setup("first-request-h2", SHORT_DEADLINES).await;
    let tls = tls_connect(&s.scratch, s.agent.front_addr(), None, "h2")
        .await
        .expect("handshake");
    // A real HTTP/2 client: preface, SETTINGS and PING answers, but no request.
    let (_sender, connection) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the front closes an HTTP/2 connection with no stream")
        .expect("closed with GOAWAY, not torn down");
    assert!(started.elapsed() >= Duration::from_millis(800));
}

#[tokio::test]
async fn idle_keep_alive_connections_close_after_the_idle_timeout() {
    let s = setup("idle", SHORT_DEADLINES).await;
    for h2 in [false, true] {
        let (mut sender, connection) = raw_caller(&s, h2).await;
        let connection = tokio::spawn(connection);
        let answer = sender.post(CONVERSE).await;
        assert_eq!(answer, 200);
        let idle_from = Instant::now();

        // A second request inside the idle timeout keeps the connection.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(sender.post(CONVERSE).await, 200, "h2: {h2}");
        let idle_from_again = Instant::now();

        tokio::time::timeout(Duration::from_secs(5), connection)
            .await
            .unwrap_or_else(|_| panic!("h2 {h2}: idle connection never closed"))
            .expect("connection task");
        assert!(
            idle_from_again.elapsed() >= Duration::from_millis(900),
            "h2 {h2}: closed {:?} after the last request",
            idle_from_again.elapsed()
        );
        assert!(idle_from.elapsed() >= Duration::from_millis(1500));
    }
    assert_eq!(s.connections_closed("idle_timeout").await, 2.0);
}

#[tokio::test]
async fn a_response_still_streaming_keeps_its_connection_past_the_idle_timeout() {
    let s = setup("streaming", SHORT_DEADLINES).await;
    for h2 in [false, true] {
        let mut caller = Caller::connect(&s.scratch, s.agent.front_addr(), h2).await;
        // Headers and half a document, then nothing for longer than the idle timeout.
        let response = caller.send(STALLED_STREAM, Some(TOKEN), &[], b"{}").await;
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "{\"output\":");

        let next = tokio::time::timeout(Duration::from_millis(2500), body.frame()).await;
        assert!(
            next.is_err(),
            "h2 {h2}: the stream ended or failed while a response was in flight: {next:?}"
        );
        if h2 {
            // The same connection still takes new streams.
            let answer = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
            assert_eq!(answer.status, 200);
        }
    }
    assert_eq!(s.connections_closed("idle_timeout").await, 0.0);
}

#[tokio::test]
async fn connections_over_the_per_source_and_total_caps_are_refused_at_accept() {
    let s = setup(
        "caps",
        "max_connections = 3\nmax_connections_per_source = 2\n",
    )
    .await;
    let front = s.agent.front_addr();
    let local = |last: u8| Some(IpAddr::from([127, 0, 0, last]));
    let first = tls_connect(&s.scratch, front, local(1), "h2")
        .await
        .expect("first");
    let _second = tls_connect(&s.scratch, front, local(1), "h2")
        .await
        .expect("second");

    let started = Instant::now();
    let refused = tls_connect(&s.scratch, front, local(1), "h2").await;
    assert!(
        refused.is_err(),
        "a third connection from one source is refused"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );

    let _other = tls_connect(&s.scratch, front, local(2), "h2")
        .await
        .expect("another source still gets in");
    let refused = tls_connect(&s.scratch, front, local(3), "h2").await;
    assert!(refused.is_err(), "a fourth connection overall is refused");

    assert_eq!(s.metric("xpart_agent_front_connections_open").await, 3.0);
    assert_eq!(
        s.connections_refused("max_connections_per_source").await,
        1.0
    );
    assert_eq!(s.connections_refused("max_connections").await, 1.0);

    // A closed connection gives its place back.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(3);
    while s.metric("xpart_agent_front_connections_open").await > 2.0 {
        assert!(
            Instant::now() < deadline,
            "the closed connection was never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut caller = Caller::connect(&s.scratch, front, false).await;
    assert_eq!(caller.post(CONVERSE, Some(TOKEN), b"{}").await.status, 200);
}

#[test]
fn a_front_key_readable_by_group_or_others_is_refused_like_a_wireguard_key() {
    let scratch = Scratch::new("key-mode");
    let toml = agent_toml(&scratch, &[], &token_principal(""));
    let front_key = scratch.dir.join("key.pem");
    let tunnel_key = scratch.dir.join("agent.key");
    for key in [&front_key, &tunnel_key] {
        std::fs::set_permissions(key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
    }

    let error = AgentConfig::from_toml_str(&toml, &scratch.path("agent.toml"))
        .expect_err("world-readable keys are refused");
    let front = problem(&error, "[front].key_file").message.as_str();
    assert_eq!(
        front,
        format!(
            "{p}: private key file is accessible by group or others (mode 0644) — fix: chmod 600 {p}",
            p = front_key.display()
        )
    );
    assert_eq!(
        front.replace(&front_key.display().to_string(), "KEY"),
        problem(&error, "[tunnel].private_key_file")
            .message
            .replace(&tunnel_key.display().to_string(), "KEY"),
    );
}

#[test]
fn a_preshared_key_readable_by_group_or_others_is_refused_like_a_wireguard_key() {
    let scratch = Scratch::new("psk-mode");
    let psk = scratch.dir.join("relay.psk");
    std::fs::write(&psk, "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n").expect("psk");
    std::fs::set_permissions(&psk, std::os::unix::fs::PermissionsExt::from_mode(0o640))
        .expect("chmod");
    let error =
        AgentConfig::from_toml_str(&with_relay_psk(&scratch, &psk), &scratch.path("agent.toml"))
            .expect_err("a group-readable preshared key is refused");
    let problem = error
        .problems()
        .iter()
        .find(|p| p.field.ends_with(".preshared_key_file"))
        .unwrap_or_else(|| panic!("no preshared_key_file problem in {error}"));
    assert_eq!(
        problem.message,
        format!(
            "{p}: private key file is accessible by group or others (mode 0640) — fix: chmod 600 {p}",
            p = psk.display()
        )
    );

    std::fs::set_permissions(&psk, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    AgentConfig::from_toml_str(&with_relay_psk(&scratch, &psk), &scratch.path("agent.toml"))
        .unwrap_or_else(|d| panic!("a 0600 preshared key is accepted: {d}"));
}

/// A config with one relay that uses the preshared key at `psk`.
fn with_relay_psk(scratch: &Scratch, psk: &std::path::Path) -> String {
    let relay_key = xpart_tunnel::PrivateKey::generate()
        .public_key()
        .to_base64();
    format!(
        r#"{base}
[[relay]]
name = "relay-a"
public_key = "{relay_key}"
endpoint = "127.0.0.1:51820"
tunnel_address = "100.64.0.2"
preshared_key_file = "{psk}"
{principal}"#,
        base = agent_toml(scratch, &[], ""),
        psk = psk.display(),
        principal = token_principal(""),
    )
}

/// Waits until the peer closes `stream` (EOF or reset); returns how long that took.
async fn wait_closed<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(started + within, stream.read(&mut buf)).await {
            Err(_) => panic!("the front kept the connection open for {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            // HTTP/2 SETTINGS, GOAWAY and the like: keep reading until the close.
            Ok(Ok(_)) => {}
        }
    }
}

/// A TLS connection to the front from `local` (any loopback address), offering `alpn`.
async fn tls_connect(
    scratch: &Scratch,
    front: SocketAddr,
    local: Option<IpAddr>,
    alpn: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let config = scratch.client_tls(alpn);
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(local) = local {
        socket.bind(SocketAddr::new(local, 0))?;
    }
    let tcp = socket.connect(front).await?;
    let name = rustls_pki_types::ServerName::try_from(BEDROCK_NAME).expect("name");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// A caller whose connection task the test owns, so it can see the connection end.
enum RawSender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl RawSender {
    async fn post(&mut self, path: &str) -> u16 {
        let request = http::Request::post(format!("https://{BEDROCK_NAME}{path}"))
            .header("host", BEDROCK_NAME)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json");
        let response = match self {
            RawSender::H1(sender) => {
                let request = request
                    .uri(path)
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .expect("request");
                sender.ready().await.expect("h1 ready");
                sender.send_request(request).await.expect("h1 answer")
            }
            RawSender::H2(sender) => {
                let request = request
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .expect("request");
                sender.send_request(request).await.expect("h2 answer")
            }
        };
        let status = response.status().as_u16();
        response.into_body().collect().await.expect("body");
        status
    }
}

async fn raw_caller(
    s: &Stack,
    h2: bool,
) -> (
    RawSender,
    std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) {
    let alpn = if h2 { "h2" } else { "http/1.1" };
    let tls = tls_connect(&s.scratch, s.agent.front_addr(), None, alpn)
        .await
        .expect("handshake");
    let io = TokioIo::new(tls);
    if h2 {
        let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        let connection = Box::pin(async move {
            let _ = connection.await;
        });
        (RawSender::H2(sender), connection)
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        let connection = Box::pin(async move {
            let _ = connection.await;
        });
        (RawSender::H1(sender), connection)
    }
}

/// The value of one series in Prometheus text.
fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}
