//! A WireGuard preshared key on both sides: the relay reads `[[agent]] preshared_key_file`
//! from the same peer schema as the agent's `[[relay]]`, so a tunnel with a PSK completes its
//! handshake and carries requests, and one whose keys differ carries nothing. The agent's
//! side is built from an agent-style `[tunnel]` and `[[relay]]` through the code path the
//! agent uses. Loopback only, no AWS credentials.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use xpart_daemon::tunnel_config::{tunnel_config, PeerSection, Side, TunnelSection};
use xpart_relay::config::RelayConfig;
use xpart_relay::RelayHandle;
use xpart_tunnel::{keys, PrivateKey, Tunnel};

use support::{echo, http2, keep_credentials_lookups_on_loopback, within, SERVICE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_relay_with_the_same_preshared_key_carry_a_request() {
    let pair = Pair::start("same", [7; 32], [7; 32]).await;
    let conn = within(pair.agent.network().connect(SERVICE.parse().unwrap()))
        .await
        .expect("the tunnel carries a TCP connection to the relay's service");
    let mut sender = http2(conn).await;
    echo(&mut sender, "with a preshared key").await;
    let peers = pair.agent.peer_stats();
    assert!(peers[0].last_handshake.is_some(), "{peers:?}");

    drop(sender);
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_preshared_key_differs_completes_no_handshake() {
    let pair = Pair::start("differs", [7; 32], [8; 32]).await;
    let network = pair.agent.network();
    let connect = network.connect(SERVICE.parse().unwrap());
    let outcome = tokio::time::timeout(Duration::from_secs(3), connect).await;
    assert!(
        !matches!(outcome, Ok(Ok(_))),
        "a connection crossed a tunnel whose preshared keys differ"
    );
    let peers = pair.agent.peer_stats();
    assert!(peers[0].last_handshake.is_none(), "{peers:?}");

    pair.shutdown().await;
}

/// A relay and an agent-side tunnel on loopback, each with its own preshared key file.
struct Pair {
    dir: PathBuf,
    relay: RelayHandle,
    agent: Tunnel,
}

impl Pair {
    async fn start(name: &str, relay_psk: [u8; 32], agent_psk: [u8; 32]) -> Pair {
        keep_credentials_lookups_on_loopback();
        let dir = scratch(name);
        let relay_key = PrivateKey::generate();
        let agent_key = PrivateKey::generate();
        let relay_psk = write_psk(&dir, "relay.psk", &relay_psk);
        let agent_psk = write_psk(&dir, "agent.psk", &agent_psk);
        let config = relay_config(&dir, &relay_key, &agent_key, &relay_psk);
        let relay = xpart_relay::start(config).await.expect("the relay starts");
        let relay_udp = relay.udp_addr().expect("userspace mode has a UDP socket");
        let agent = start_agent_side(&dir, &agent_key, &relay_key, relay_udp, &agent_psk).await;
        Pair { dir, relay, agent }
    }

    async fn shutdown(self) {
        within(self.relay.shutdown()).await;
        self.agent.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn check_accepts_a_relay_config_with_a_preshared_key() {
    let dir = scratch("check");
    let relay_key = PrivateKey::generate();
    let agent_key = PrivateKey::generate();
    let psk = write_psk(&dir, "agent-a.psk", &[7; 32]);
    let file = dir.join("relay.toml");
    std::fs::write(&file, relay_toml(&dir, &relay_key, &agent_key, &psk)).unwrap();

    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_xpart-relay"))
            .args(["--config", &file.display().to_string(), "--check"])
            .output()
            .unwrap()
    };
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The key is held to the private key's rules: a file others can read is refused.
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check();
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
    let peer = format!("preshared_key_file = \"{}\"", psk.display());
    support::relay_toml(dir, relay_key, agent_key, &peer, "")
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
