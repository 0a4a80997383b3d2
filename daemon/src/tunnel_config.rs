//! The `[tunnel]` section as both daemons read it: its [`TunnelMode`], and [`tunnel_config`],
//! which turns this side's settings and the peer tables (`[[relay]]` on the agent, `[[agent]]`
//! on the relay) into the [`TunnelConfig`] that brings WireGuard up.
//!
//! Each daemon keeps its own `[tunnel]` table, because their UDP settings differ (the agent's
//! `listen`, the relay's `listen_port` and `bind_address`), and its own validation messages.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use xpart_tunnel::keys::KeyError;
use xpart_tunnel::{Mode, PeerConfig, PublicKey, TunnelConfig};

/// `[tunnel] mode`: how a daemon reaches its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelMode {
    /// WireGuard through a Linux TUN interface (needs CAP_NET_ADMIN).
    Kernel,
    /// WireGuard with an embedded TCP/IP stack (no privileges).
    Userspace,
    /// No WireGuard of the daemon's own: peers' tunnel addresses are reached through the
    /// host's network. The agent uses it where WireGuard is managed outside xpart; the relay
    /// accepts it only with a loopback `[service] listen`, for tests on one machine.
    Host,
}

impl TunnelMode {
    /// The WireGuard backend, or `None` in host mode.
    pub fn wireguard(self) -> Option<Mode> {
        match self {
            TunnelMode::Kernel => Some(Mode::Kernel),
            TunnelMode::Userspace => Some(Mode::Userspace),
            TunnelMode::Host => None,
        }
    }
}

/// This side of the tunnel, from `[tunnel]`.
#[derive(Debug, Clone)]
pub struct LocalSide {
    pub mode: Mode,
    /// Already resolved against the config file's directory.
    pub private_key_file: Option<PathBuf>,
    pub address: Option<IpNet>,
    /// UDP bind address; `None` binds an ephemeral port.
    pub listen: Option<SocketAddr>,
    pub mtu: u16,
    pub interface_name: Option<String>,
}

/// One peer table: a `[[relay]]` on the agent, an `[[agent]]` on the relay.
#[derive(Debug, Clone)]
pub struct PeerTable<'a> {
    pub name: &'a str,
    pub public_key: Option<&'a str>,
    pub endpoint: Option<SocketAddr>,
    pub tunnel_address: IpAddr,
    pub persistent_keepalive: Option<u16>,
    pub preshared_key: Option<[u8; 32]>,
}

/// Why a config that passed validation still cannot bring a tunnel up (a key file changed
/// in between, or a caller skipped validation).
#[derive(Debug, thiserror::Error)]
pub enum TunnelConfigError {
    #[error("[tunnel].private_key_file is missing")]
    MissingPrivateKeyFile,
    #[error("[tunnel].private_key_file: {0}")]
    PrivateKey(#[from] xpart_tunnel::keys::KeyError),
    #[error("[tunnel].address is missing")]
    MissingAddress,
    #[error("peer {peer}: public_key is missing")]
    MissingPublicKey { peer: String },
    #[error("peer {peer}: public_key: {source}")]
    PublicKey {
        peer: String,
        source: xpart_tunnel::keys::KeyError,
    },
}

/// Reads the private key and builds one WireGuard peer per table, routing its tunnel address.
pub fn tunnel_config<'a>(
    local: LocalSide,
    peers: impl IntoIterator<Item = PeerTable<'a>>,
) -> Result<TunnelConfig, TunnelConfigError> {
    let key_file = local
        .private_key_file
        .ok_or(TunnelConfigError::MissingPrivateKeyFile)?;
    let private_key = xpart_tunnel::keys::read_private_key_file(&key_file)?;
    let address = local.address.ok_or(TunnelConfigError::MissingAddress)?;
    let peers = peers
        .into_iter()
        .map(peer_config)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TunnelConfig {
        private_key,
        address,
        mode: local.mode,
        listen: local.listen,
        mtu: local.mtu,
        interface_name: local.interface_name,
        peers,
    })
}

/// Reads a WireGuard preshared key file (`wg genpsk`: base64 of 32 bytes), refusing one that
/// group or others can access with the same message as a private key: anyone who reads it
/// removes the post-quantum layer it adds to the handshake.
pub fn read_preshared_key_file(path: &Path) -> Result<[u8; 32], KeyError> {
    use base64::Engine as _;
    let file_error = |reason: &str| KeyError::File {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
        fix: "write 32 random bytes as base64 with `wg genpsk > FILE` and chmod 600 it",
    };
    let contents = xpart_tunnel::keys::read_owner_only_file(path)?;
    let text = std::str::from_utf8(&contents).map_err(|_| file_error("is not text"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| file_error("is not base64"))?;
    let key = <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| file_error("does not hold 32 bytes (a preshared key is 32 bytes)"))?;
    Ok(key)
}

/// `[tunnel] mtu` when the file leaves it out.
pub fn default_mtu() -> u16 {
    xpart_tunnel::DEFAULT_MTU
}

fn peer_config(table: PeerTable<'_>) -> Result<PeerConfig, TunnelConfigError> {
    let Some(key) = table.public_key else {
        return Err(TunnelConfigError::MissingPublicKey {
            peer: table.name.to_owned(),
        });
    };
    let public_key =
        PublicKey::from_base64(key).map_err(|source| TunnelConfigError::PublicKey {
            peer: table.name.to_owned(),
            source,
        })?;
    Ok(PeerConfig {
        name: table.name.to_owned(),
        public_key,
        endpoint: table.endpoint,
        allowed_ips: vec![IpNet::from(table.tunnel_address)],
        persistent_keepalive: table.persistent_keepalive,
        preshared_key: table.preshared_key,
    })
}
