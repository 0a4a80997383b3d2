//! What the relay's integration tests share: a relay.toml on loopback, an HTTP/2 client over
//! a tunnel connection, the echo model's round trip, and a credential chain kept off the
//! network.

#![allow(dead_code)] // each test crate uses a different part

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use xpart_tunnel::{keys, PrivateKey};

/// The relay's service address on the tunnel.
pub const SERVICE: &str = "100.64.0.2:8080";

/// A userspace relay on 127.0.0.1 serving one agent, whose key it writes to `dir/relay.key`.
/// `peer` adds lines to the `[[agent]]` table and `sections` whole sections at the end.
pub fn relay_toml(
    dir: &Path,
    relay_key: &PrivateKey,
    agent_key: &PrivateKey,
    peer: &str,
    sections: &str,
) -> String {
    keys::write_private_key_file(dir.join("relay.key"), relay_key).expect("write relay.key");
    format!(
        r#"
[tunnel]
mode = "userspace"
private_key_file = "{key}"
address = "100.64.0.2/30"
listen_port = 0
bind_address = "127.0.0.1"

[[agent]]
name = "agent-a"
public_key = "{agent_pub}"
tunnel_address = "100.64.0.1"
{peer}

[service]
listen = "{SERVICE}"

[upstream]
region = "us-east-1"
endpoint = "https://127.0.0.1:9"
resolver = ["127.0.0.1:9"]

[policy]
operations = ["Converse"]
models = ["anthropic.*"]

[credentials]
fetch_timeout_secs = 2
{sections}"#,
        key = dir.join("relay.key").display(),
        agent_pub = agent_key.public_key().to_base64(),
    )
}

/// An HTTP/2 (prior knowledge) client on a connection through the tunnel.
pub async fn http2<T>(conn: T) -> SendRequest<Full<Bytes>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(conn))
        .await
        .expect("HTTP/2 handshake with the relay's service");
    tokio::spawn(connection);
    sender
}

/// Sends `text` to the echo model with Converse, asserts it comes back, and returns the
/// answer's headers.
pub async fn echo(sender: &mut SendRequest<Full<Bytes>>, text: &str) -> http::HeaderMap {
    let body = serde_json::json!({"messages": [{"role": "user", "content": [{"text": text}]}]});
    let converse = http::Request::post(format!("http://{SERVICE}/model/xpart.echo/converse"))
        .header("content-type", "application/json")
        .header("x-xpart-principal", "tester")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("Converse request");
    let response = within(sender.send_request(converse))
        .await
        .expect("the relay answers");
    assert_eq!(response.status(), 200);
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the answer body").to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).expect("a JSON answer");
    assert_eq!(answer["output"]["message"]["content"][0]["text"], text);
    parts.headers
}

/// The default credential chain must not reach for IMDS (169.254.169.254) or real profiles.
pub fn keep_credentials_lookups_on_loopback() {
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/xpart-test-aws-config");
    std::env::set_var(
        "AWS_SHARED_CREDENTIALS_FILE",
        "/nonexistent/xpart-test-aws-credentials",
    );
    for name in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ] {
        std::env::remove_var(name);
    }
}

pub async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .expect("timed out")
}
