//! What the demo writes before anything starts: the ports, the directory, the WireGuard keys,
//! the CA and the front's certificate (through `xpart ca`'s own code), the caller token, and
//! the two configuration files the daemons are started from.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rand::RngCore;
use xpart_tunnel::PrivateKey;

use crate::{ca, files, token, Error};

pub const ECHO_MODEL: &str = "xpart.echo";
pub const REGION: &str = "us-east-1";
pub const PRINCIPAL: &str = "demo-caller";
const AGENT_TUNNEL_IP: &str = "100.64.0.1";
const AGENT_TUNNEL_ADDRESS: &str = "100.64.0.1/30";
const RELAY_TUNNEL_IP: &str = "100.64.0.2";
const RELAY_TUNNEL_ADDRESS: &str = "100.64.0.2/30";
/// Inside the tunnel only, so it cannot clash with anything on the host.
const RELAY_SERVICE_PORT: u16 = 8080;
/// Short-lived on purpose: these are throwaway credentials.
const CERTIFICATE_DAYS: i64 = 30;
/// Marks a directory as the demo's, so a later run may replace what is in it.
const MARKER: &str = ".xpart-demo";
/// Everything the demo writes besides the marker; a rerun in the same directory removes these.
const GENERATED: [&str; 12] = [
    "agent.key",
    "relay.key",
    "ca/ca.pem",
    "ca/ca.key",
    "front.pem",
    "front.key",
    "caller.env",
    "agent.toml",
    "relay.toml",
    "agent-audit.jsonl",
    "relay-audit.jsonl",
    "ca",
];

/// The host ports the demo uses, all on 127.0.0.1, resolved before the configs are written so
/// that the files, the printed commands and the running daemons agree.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub front: u16,
    pub wireguard: u16,
    pub agent_admin: u16,
    pub relay_admin: u16,
}

/// The paths and secrets the rest of the demo needs.
#[derive(Debug)]
pub struct Material {
    pub dir: PathBuf,
    pub agent_config: PathBuf,
    pub relay_config: PathBuf,
    pub ca_bundle: PathBuf,
    pub caller_env: PathBuf,
    pub token: String,
    agent_public_key: String,
    relay_public_key: String,
}

/// A port given as 0 becomes a free one the system picks. A fixed port that is taken is
/// refused here, naming the flag to change, before anything is written. Every socket stays
/// bound until all four ports are known, so two free picks cannot be the same port.
pub fn choose_ports(front: u16, wireguard: u16, admin: u16) -> Result<Ports, Error> {
    let relay_admin = match admin {
        0 => 0,
        port => port.checked_add(1).ok_or_else(|| {
            Error::Usage("--admin-port 65535 leaves no port for the relay's admin".into())
        })?,
    };
    let front = hold_tcp_port(front, "--front-port")?;
    let wireguard = hold_udp_port(wireguard, "--wg-port")?;
    let agent_admin = hold_tcp_port(admin, "--admin-port")?;
    let relay_admin = hold_tcp_port(relay_admin, "--admin-port")?;
    Ok(Ports {
        front: bound_port(front.local_addr(), "--front-port")?,
        wireguard: bound_port(wireguard.local_addr(), "--wg-port")?,
        agent_admin: bound_port(agent_admin.local_addr(), "--admin-port")?,
        relay_admin: bound_port(relay_admin.local_addr(), "--admin-port")?,
    })
}

fn hold_tcp_port(port: u16, flag: &str) -> Result<TcpListener, Error> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(|err| port_taken("TCP", port, flag, err))
}

fn hold_udp_port(port: u16, flag: &str) -> Result<UdpSocket, Error> {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).map_err(|err| port_taken("UDP", port, flag, err))
}

fn bound_port(address: std::io::Result<SocketAddr>, flag: &str) -> Result<u16, Error> {
    address
        .map(|address| address.port())
        .map_err(|err| Error::Usage(format!("cannot read the port bound for {flag}: {err}")))
}

fn port_taken(protocol: &str, port: u16, flag: &str, err: std::io::Error) -> Error {
    Error::Usage(format!(
        "cannot use {protocol} 127.0.0.1:{port} ({err}); another program (or another demo) has it: \
         choose another with {flag} PORT, or {flag} 0 for any free port"
    ))
}

/// Returns the directory as an absolute path, so the printed commands work from anywhere.
pub fn prepare_dir(requested: Option<&Path>) -> Result<PathBuf, Error> {
    let dir = match requested {
        Some(dir) => claim_dir(dir)?,
        None => new_temp_dir()?,
    };
    let dir = dir
        .canonicalize()
        .map_err(|err| Error::file(&dir, format!("cannot resolve the directory: {err}")))?;
    files::write_public(
        &dir.join(MARKER),
        "Written by `xpart demo`; a later demo run in this directory replaces its files.\n",
        true,
    )?;
    Ok(dir)
}

fn new_temp_dir() -> Result<PathBuf, Error> {
    let mut suffix = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut suffix);
    let suffix: String = suffix.iter().map(|byte| format!("{byte:02x}")).collect();
    let dir = std::env::temp_dir().join(format!("xpart-demo-{suffix}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|err| Error::file(&dir, format!("cannot create the demo directory: {err}")))?;
    Ok(dir)
}

/// A directory the user names is used only when it is new, empty, or an earlier demo's: the
/// demo must never replace someone's real keys or configs.
fn claim_dir(dir: &Path) -> Result<PathBuf, Error> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir)
            .map_err(|err| Error::file(dir, format!("cannot create the demo directory: {err}")))?;
        return Ok(dir.to_path_buf());
    }
    let mut entries = std::fs::read_dir(dir)
        .map_err(|err| Error::file(dir, format!("cannot read the directory: {err}")))?;
    if dir.join(MARKER).is_file() {
        remove_previous_run(dir)?;
    } else if entries.next().is_some() {
        return Err(Error::file(
            dir,
            "is not empty and was not made by `xpart demo`; give a new or empty directory \
             (the demo writes keys and configs there and will not replace files it did not make)",
        ));
    }
    Ok(dir.to_path_buf())
}

fn remove_previous_run(dir: &Path) -> Result<(), Error> {
    for name in GENERATED {
        let path = dir.join(name);
        let removed = if path.is_dir() {
            std::fs::remove_dir(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(Error::file(
                    &path,
                    format!("cannot remove the earlier demo's file: {err}"),
                ))
            }
        }
    }
    Ok(())
}

/// Writes keys, CA and certificate into `dir` (prepared by [`prepare_dir`]); the configs
/// follow from [`write_configs`] once the ports are known.
pub fn generate(dir: &Path) -> Result<Material, Error> {
    let agent_key = write_key(&dir.join("agent.key"))?;
    let relay_key = write_key(&dir.join("relay.key"))?;

    let ca_dir = dir.join("ca");
    ca::init(&ca_dir, "xpart demo CA", CERTIFICATE_DAYS, false)?;
    let front = ca::Leaf::front(
        vec![
            "localhost".into(),
            format!("bedrock-runtime.{REGION}.amazonaws.com"),
        ],
        vec![Ipv4Addr::LOCALHOST.into()],
    );
    ca::issue(&ca_dir, front, &dir.join("front"), CERTIFICATE_DAYS, false)?;

    Ok(Material {
        dir: dir.to_path_buf(),
        agent_config: dir.join("agent.toml"),
        relay_config: dir.join("relay.toml"),
        ca_bundle: ca_dir.join("ca.pem"),
        caller_env: dir.join("caller.env"),
        token: token::generate_token(),
        agent_public_key: agent_key.public_key().to_base64(),
        relay_public_key: relay_key.public_key().to_base64(),
    })
}

/// Writes (or, when the demo retries with other ports, rewrites) `agent.toml` and
/// `relay.toml` for `ports`.
pub fn write_configs(material: &Material, ports: &Ports) -> Result<(), Error> {
    files::write_public(
        &material.relay_config,
        &relay_toml(&material.agent_public_key, ports),
        true,
    )?;
    files::write_public(
        &material.agent_config,
        &agent_toml(
            &material.relay_public_key,
            &token::sha256_hex(&material.token),
            ports,
        ),
        true,
    )
}

fn write_key(path: &Path) -> Result<PrivateKey, Error> {
    let key = PrivateKey::generate();
    xpart_tunnel::keys::write_private_key_file(path, &key)?;
    Ok(key)
}

/// The opening both demo configurations share: where they came from and a userspace tunnel.
fn config_head(daemon: &str, description: &str, address: &str) -> String {
    format!(
        r#"# Written by `xpart demo`: {description} of the loopback demo. Every field is
# described in config/{daemon}.example.toml. Paths are relative to this file.

[tunnel]
# WireGuard with an embedded TCP/IP stack: no root, no interface on the host.
mode = "userspace"
private_key_file = "{daemon}.key"
address = "{address}"
"#
    )
}

fn relay_toml(agent_public_key: &str, ports: &Ports) -> String {
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.relay_admin));
    let head = config_head("relay", "the Commercial-side relay", RELAY_TUNNEL_ADDRESS);
    format!(
        r#"{head}bind_address = "127.0.0.1"
listen_port = {wireguard}

[[agent]]
name = "demo-agent"
public_key = "{agent_public_key}"
tunnel_address = "{AGENT_TUNNEL_IP}"
# No endpoint: the relay learns the agent's UDP address from its handshake.

[service]
# On the tunnel address, reachable only through WireGuard.
listen = "{RELAY_TUNNEL_IP}:{RELAY_SERVICE_PORT}"

[upstream]
# Never contacted: the policy below admits only the echo model, which the relay answers itself.
region = "{REGION}"
endpoint = "https://bedrock-runtime.{REGION}.amazonaws.com"

[credentials]
# No AWS credentials and no lookups for them (instance metadata included): the echo model
# needs none.
source = "none"

[policy]
# The discovery reads list and describe the echo model, answered by the relay itself.
operations = ["InvokeModel", "InvokeModelWithResponseStream", "Converse", "ConverseStream", "CountTokens",
              "ListFoundationModels", "GetFoundationModel", "ListInferenceProfiles", "GetInferenceProfile"]
models = ["{ECHO_MODEL}"]

[echo]
model = "{ECHO_MODEL}"

[admin]
listen = "{admin}"

[audit]
path = "relay-audit.jsonl"
"#,
        wireguard = ports.wireguard,
    )
}

fn agent_toml(relay_public_key: &str, token_sha256: &str, ports: &Ports) -> String {
    let front = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.front));
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.agent_admin));
    let relay_endpoint = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.wireguard));
    let head = config_head("agent", "the GovCloud-side agent", AGENT_TUNNEL_ADDRESS);
    format!(
        r#"{head}listen = "127.0.0.1:0"

[[relay]]
name = "demo-relay"
public_key = "{relay_public_key}"
endpoint = "{relay_endpoint}"
tunnel_address = "{RELAY_TUNNEL_IP}"
service_port = {RELAY_SERVICE_PORT}

[front]
# Callers set AWS_ENDPOINT_URL_BEDROCK_RUNTIME (and AWS_ENDPOINT_URL_BEDROCK, for model
# discovery) to https://localhost:{front_port} and trust ca/ca.pem.
listen = "{front}"
cert_file = "front.pem"
key_file = "front.key"

[[principal]]
# The token itself is in caller.env; the agent keeps only its SHA-256.
name = "{PRINCIPAL}"
token_sha256 = "{token_sha256}"
models = ["{ECHO_MODEL}"]

[admin]
listen = "{admin}"

[audit]
path = "agent-audit.jsonl"
"#,
        front_port = ports.front,
    )
}
