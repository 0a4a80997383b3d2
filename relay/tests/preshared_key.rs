//! A WireGuard preshared key on both sides: the relay reads `[[agent]] preshared_key_file`
//! from the same peer schema as the agent's `[[relay]]`, so a tunnel with a PSK completes its
//! handshake and carries requests, and one whose keys differ carries nothing. The agent's
//! side is built from an agent-style `[tunnel]` and `[[relay]]` through the code path the
//! agent uses. Loopback only, no AWS credentials.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use xpart_daemon::tunnel_config::{tunnel_config, PeerSection, Side, TunnelSection};
use xpart_relay::config::RelayConfig;
use xpart_tunnel::{keys, PrivateKey, Tunnel};

const SERVICE: &str = "100.64.0.2:8080";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_relay_with_the_same_preshared_key_carry_a_request() {
    keep_credentials_lookups_on_loopback();
    let dir = scratch("same");
    let relay_key = PrivateKey::generate();
    let agent_key = PrivateKey::generate();
    let psk = write_psk(&dir, "shared.psk", &[7; 32]);
    let config = relay_config(&dir, &relay_key, &agent_key, &psk);
    let relay = xpart_relay::start(config).await.unwrap();
    let relay_udp = relay.udp_addr().expect("userspace mode has a UDP socket");

    let agent = start_agent_side(&dir, &agent_key, &relay_key, relay_udp, &psk).await;
    let conn = within(agent.network().connect(SERVICE.parse().unwrap()))
        .await
        .expect("the tunnel carries a TCP connection to the relay's service");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(conn))
            .await
            .unwrap();
    tokio::spawn(connection);
    let converse = http::Request::post(format!("http://{SERVICE}/model/xpart.echo/converse"))
        .header("content-type", "application/json")
        .header("x-xpart-principal", "tester")
        .body(Full::new(Bytes::from_static(
            br#"{"messages":[{"role":"user","content":[{"text":"with a preshared key"}]}]}"#,
        )))
        .unwrap();
    let response = within(sender.send_request(converse)).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        answer["output"]["message"]["content"][0]["text"],
        "with a preshared key"
    );
    let peers = agent.peer_stats();
    assert!(peers[0].last_handshake.is_some(), "{peers:?}");

    drop(sender);
    within(relay.shutdown()).await;
    agent.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_preshared_key_differs_completes_no_handshake() {
    keep_credentials_lookups_on_loopback();
    let dir = scratch("differs");
    let relay_key = PrivateKey::generate();
    let agent_key = PrivateKey::generate();
    let relay_psk = write_psk(&dir, "relay.psk", &[7; 32]);
    let agent_psk = write_psk(&dir, "agent.psk", &[8; 32]);
    let config = relay_config(&dir, &relay_key, &agent_key, &relay_psk);
    let relay = xpart_relay::start(config).await.unwrap();
    let relay_udp = relay.udp_addr().expect("userspace mode has a UDP socket");

    let agent = start_agent_side(&dir, &agent_key, &relay_key, relay_udp, &agent_psk).await;
    let network = agent.network();
    let connect = network.connect(SERVICE.parse().unwrap());
    let outcome = tokio::time::timeout(Duration::from_secs(3), connect).await;
    assert!(
        !matches!(outcome, Ok(Ok(_))),
        "a connection crossed a tunnel whose preshared keys differ"
    );
    let peers = agent.peer_stats();
    assert!(peers[0].last_handshake.is_none(), "{peers:?}");

    within(relay.shutdown()).await;
    agent.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_accepts_a_relay_config_with_a_preshared_key() {
    let dir = scratch("check");
    let relay_key = PrivateKey::generate();
    let agent_key = PrivateKey::generate();
    let psk = write_psk(&dir, "agent-a.psk", &[7; 32]);
    let file = dir.join("relay.toml");
    std::fs::write(&file, relay_toml(&dir, &relay_key, &agent_key, &psk)).unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xpart-relay"))
        .args(["--config", &file.display().to_string(), "--check"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The key is held to the private key's rules: a file others can read is refused.
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xpart-relay"))
        .args(["--config", &file.display().to_string(), "--check"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("[[agent]][0].preshared_key_file"),
        "{stderr}"
    );
    assert!(stderr.contains("chmod 600"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The agent's side: `[tunnel]` and `[[relay]]` as an agent.toml writes them.
#[derive(Deserialize)]
struct AgentSide {
    tunnel: TunnelSection,
    relay: Vec<PeerSection>,
}

async fn start_agent_side(
    dir: &Path,
    agent_key: &PrivateKey,
    relay_key: &PrivateKey,
    relay_udp: SocketAddr,
    psk: &Path,
) -> Tunnel {
    keys::write_private_key_file(dir.join("agent.key"), agent_key).expect("write agent.key");
    let text = format!(
        r#"
[tunnel]
mode = "userspace"
private_key_file = "{key}"
address = "100.64.0.1/30"
listen = "127.0.0.1:0"

[[relay]]
name = "relay-a"
public_key = "{relay_pub}"
endpoint = "{relay_udp}"
tunnel_address = "100.64.0.2"
preshared_key_file = "{psk}"
"#,
        key = dir.join("agent.key").display(),
        relay_pub = relay_key.public_key().to_base64(),
        psk = psk.display(),
    );
    let side: AgentSide = toml::from_str(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
    let config = tunnel_config(Side::Agent, &side.tunnel, &side.relay, Path::to_path_buf)
        .unwrap_or_else(|problems| panic!("{problems}"))
        .expect("userspace mode has a tunnel");
    assert!(config.peers[0].preshared_key.is_some());
    Tunnel::start(config)
        .await
        .expect("the agent side's tunnel starts")
}

fn relay_config(
    dir: &Path,
    relay_key: &PrivateKey,
    agent_key: &PrivateKey,
    psk: &Path,
) -> RelayConfig {
    RelayConfig::from_toml_str(&relay_toml(dir, relay_key, agent_key, psk), "relay.toml")
        .unwrap_or_else(|problems| panic!("{problems}"))
}

fn relay_toml(dir: &Path, relay_key: &PrivateKey, agent_key: &PrivateKey, psk: &Path) -> String {
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
preshared_key_file = "{psk}"

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
"#,
        key = dir.join("relay.key").display(),
        agent_pub = agent_key.public_key().to_base64(),
        psk = psk.display(),
    )
}

fn write_psk(dir: &Path, name: &str, key: &[u8; 32]) -> PathBuf {
    use base64::Engine as _;
    let path = dir.join(name);
    let text = base64::engine::general_purpose::STANDARD.encode(key);
    std::fs::write(&path, format!("{text}\n")).expect("write the preshared key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    path
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xpart-relay-psk-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

/// The default credential chain must not reach for IMDS (169.254.169.254) or real profiles.
fn keep_credentials_lookups_on_loopback() {
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

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .expect("timed out")
}
