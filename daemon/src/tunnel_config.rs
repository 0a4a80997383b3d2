//! The `[tunnel]` section and the peer tables (`[[relay]]` on the agent, `[[agent]]` on the
//! relay) as both daemons read them: one [`TunnelSection`] and one [`PeerSection`], whose
//! fields mean the same on either side. Where the sides differ it is in a default, named by
//! [`Side`]: the relay listens on UDP 51820 and the agent on an ephemeral port; the agent
//! keeps its NAT mapping alive every 25 s and the relay waits to be reached. [`check`] adds
//! the problems the two sides share to a daemon's validation, and [`tunnel_config`] turns the
//! sections into the [`TunnelConfig`] that brings WireGuard up, preshared keys included.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use xpart_tunnel::keys::KeyError;
use xpart_tunnel::{Mode, PeerConfig, PublicKey, TunnelConfig};

use crate::config::Diagnostics;

/// The UDP port the relay listens on when `[tunnel]` names none.
pub const RELAY_LISTEN_PORT: u16 = 51820;

/// Seconds between the agent's keepalives when its `[[relay]]` names none: under the
/// shortest common NAT and stateful-firewall UDP timeout (30 s).
pub const AGENT_KEEPALIVE_SECS: u16 = 25;

/// The relay's `[service]` port when a `[[relay]]` names none.
pub const DEFAULT_SERVICE_PORT: u16 = 8080;

/// Which daemon reads the sections: it picks the defaults and the peer table's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `agent.toml`: the peers are `[[relay]]` tables.
    Agent,
    /// `relay.toml`: the peers are `[[agent]]` tables.
    Relay,
}

impl Side {
    /// The peer table's name as written in the file.
    pub fn peer_table(self) -> &'static str {
        match self {
            Side::Agent => "[[relay]]",
            Side::Relay => "[[agent]]",
        }
    }

    fn default_listen_port(self) -> Option<u16> {
        match self {
            Side::Agent => None,
            Side::Relay => Some(RELAY_LISTEN_PORT),
        }
    }

    fn default_keepalive(self) -> Option<u16> {
        match self {
            Side::Agent => Some(AGENT_KEEPALIVE_SECS),
            Side::Relay => None,
        }
    }
}

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

/// `[tunnel]`: this side of the tunnel.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelSection {
    #[serde(default = "default_mode")]
    pub mode: TunnelMode,
    /// Required unless `mode = "host"`.
    pub private_key_file: Option<PathBuf>,
    /// This side's tunnel address with its prefix. Required unless `mode = "host"`.
    pub address: Option<IpNet>,
    /// The WireGuard UDP socket's address; or give [`TunnelSection::bind_address`] and
    /// [`TunnelSection::listen_port`], not both (see [`TunnelSection::udp_listen`]).
    pub listen: Option<SocketAddr>,
    pub listen_port: Option<u16>,
    pub bind_address: Option<IpAddr>,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Kernel mode only.
    pub interface_name: Option<String>,
    /// Mutual TLS 1.3 for the agent→relay HTTP/2 inside the tunnel ([`crate::inner_tls`]);
    /// required in FIPS mode.
    #[serde(default)]
    pub inner_tls: bool,
    /// This side's inner-TLS certificate (`xpart ca issue --relay NAME` / `--agent NAME`).
    pub inner_tls_cert_file: Option<PathBuf>,
    pub inner_tls_key_file: Option<PathBuf>,
    /// The deployment CA that issued the other side's certificate.
    pub inner_tls_ca_file: Option<PathBuf>,
}

impl TunnelSection {
    /// Where the WireGuard UDP socket binds: `listen`, else `bind_address` (all IPv4
    /// addresses by default) on `listen_port` (the side's default port); `None` binds an
    /// ephemeral port, the agent's default.
    pub fn udp_listen(&self, side: Side) -> Option<SocketAddr> {
        if let Some(listen) = self.listen {
            return Some(listen);
        }
        let port = self.listen_port.or(side.default_listen_port());
        if port.is_none() && self.bind_address.is_none() {
            return None;
        }
        let ip = self
            .bind_address
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        Some(SocketAddr::new(ip, port.unwrap_or(0)))
    }

    /// The inner-TLS files when `inner_tls = true` and all three are given (resolved with
    /// `resolve`); [`check`] reports any that is missing.
    pub fn inner_tls_files(
        &self,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Option<crate::inner_tls::InnerTlsFiles> {
        if !self.inner_tls {
            return None;
        }
        Some(crate::inner_tls::InnerTlsFiles {
            cert_file: resolve(self.inner_tls_cert_file.as_deref()?),
            key_file: resolve(self.inner_tls_key_file.as_deref()?),
            ca_file: resolve(self.inner_tls_ca_file.as_deref()?),
        })
    }
}

/// One peer table: a `[[relay]]` on the agent, an `[[agent]]` on the relay.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub name: String,
    /// Base64, as `xpart pubkey` or `wg pubkey` prints it. Required unless `mode = "host"`.
    pub public_key: Option<String>,
    /// The peer's public UDP address; `None` learns it from the peer's first authenticated
    /// datagram (the relay's way with agents behind NAT).
    pub endpoint: Option<SocketAddr>,
    /// The peer's tunnel address (without prefix), the one address it is routed.
    pub tunnel_address: IpAddr,
    /// Seconds between keepalives; 0 turns them off (see [`PeerSection::keepalive`]).
    pub persistent_keepalive: Option<u16>,
    /// A WireGuard preshared key file (`wg genpsk`), the same key on both sides.
    pub preshared_key_file: Option<PathBuf>,
    /// Agent side only: the relay's `[service]` port on its tunnel address.
    pub service_port: Option<u16>,
    /// Agent side only: the relay's group; requests go to the lowest group with a healthy
    /// relay.
    pub priority: Option<u32>,
    /// Agent side only: the relay's share of requests within its group.
    pub weight: Option<u32>,
}

impl PeerSection {
    /// Seconds between keepalives to this peer, `None` for none.
    pub fn keepalive(&self, side: Side) -> Option<u16> {
        self.persistent_keepalive
            .or(side.default_keepalive())
            .filter(|seconds| *seconds > 0)
    }

    /// The relay's service port (agent side).
    pub fn service_port(&self) -> u16 {
        self.service_port.unwrap_or(DEFAULT_SERVICE_PORT)
    }
}

/// Adds the problems both sides check the same way to `diagnostics`: the UDP address given
/// twice, an MTU below IPv6's minimum, a preshared key file that cannot be used, and a
/// `service_port`, `priority` or `weight` in the relay's `[[agent]]` tables. `peer_field`
/// names a field of the `i`th peer table in the daemon's style; `resolve` takes a path
/// relative to the config file.
pub fn check(
    side: Side,
    tunnel: &TunnelSection,
    peers: &[PeerSection],
    peer_field: impl Fn(usize, &PeerSection, &str) -> String,
    resolve: impl Fn(&Path) -> PathBuf,
    diagnostics: &mut Diagnostics,
) {
    if tunnel.listen.is_some() && (tunnel.listen_port.is_some() || tunnel.bind_address.is_some()) {
        diagnostics.push(
            "[tunnel].listen",
            "is given together with listen_port or bind_address",
            "give the UDP address once: either listen = \"ADDRESS:PORT\", or bind_address and listen_port",
        );
    }
    if tunnel.mode != TunnelMode::Host && tunnel.mtu < 1280 {
        diagnostics.push(
            "[tunnel].mtu",
            format!("{} is below 1280, the IPv6 minimum", tunnel.mtu),
            "leave it out to use 1420",
        );
    }
    check_inner_tls(side, tunnel, peers, &peer_field, diagnostics);
    for (i, peer) in peers.iter().enumerate() {
        if let Some(psk) = &peer.preshared_key_file {
            if let Err(error) = read_preshared_key_file(&resolve(psk)) {
                diagnostics.push(
                    peer_field(i, peer, "preshared_key_file"),
                    error.to_string(),
                    "write 32 random bytes as base64 with `wg genpsk` (the file must be mode 0600), the same key on both sides",
                );
            }
        }
        if side == Side::Relay && peer.service_port.is_some() {
            diagnostics.push(
                peer_field(i, peer, "service_port"),
                "is the port an agent reaches a relay on, and an [[agent]] serves none",
                "remove it; the relay's port is its [service].listen",
            );
        }
        for (field, given) in [
            ("priority", peer.priority.is_some()),
            ("weight", peer.weight.is_some()),
        ] {
            if side == Side::Relay && given {
                diagnostics.push(
                    peer_field(i, peer, field),
                    "is how an agent shares requests among its relays, and a relay sends none to its agents",
                    "remove it; set it on the agent's [[relay]] tables",
                );
            }
        }
    }
}

/// `inner_tls`: required in FIPS mode; when on, its three files are given and every peer's
/// name can be the name in its certificate.
fn check_inner_tls(
    side: Side,
    tunnel: &TunnelSection,
    peers: &[PeerSection],
    peer_field: &impl Fn(usize, &PeerSection, &str) -> String,
    diagnostics: &mut Diagnostics,
) {
    if crate::crypto::FIPS_MODE && !tunnel.inner_tls {
        diagnostics.push(
            "[tunnel].inner_tls",
            "is off, and this is a FIPS build: the agent→relay hop would be protected by WireGuard alone, whose cryptography is not FIPS-approved",
            "set inner_tls = true with inner_tls_cert_file, inner_tls_key_file and inner_tls_ca_file (`xpart ca issue --relay NAME` / `--agent NAME`), or run the default (non-FIPS) build",
        );
    }
    let any_file = tunnel.inner_tls_cert_file.is_some()
        || tunnel.inner_tls_key_file.is_some()
        || tunnel.inner_tls_ca_file.is_some();
    if !tunnel.inner_tls {
        if any_file {
            diagnostics.push(
                "[tunnel].inner_tls",
                "is off, but inner_tls_cert_file, inner_tls_key_file or inner_tls_ca_file is given",
                "set inner_tls = true to use them (on the agent and its relays alike), or remove them",
            );
        }
        return;
    }
    let (own, peer_flag) = match side {
        Side::Agent => ("--agent", "--relay"),
        Side::Relay => ("--relay", "--agent"),
    };
    let files = [
        ("inner_tls_cert_file", &tunnel.inner_tls_cert_file),
        ("inner_tls_key_file", &tunnel.inner_tls_key_file),
        ("inner_tls_ca_file", &tunnel.inner_tls_ca_file),
    ];
    for (field, value) in files {
        if value.is_none() {
            diagnostics.push(
                format!("[tunnel].{field}"),
                "is missing (inner_tls = true)",
                format!("issue this side's certificate with `xpart ca issue {own} NAME` and give its .pem, its .key and the CA's ca.pem"),
            );
        }
    }
    for (i, peer) in peers.iter().enumerate() {
        if !crate::inner_tls::is_valid_peer_name(&peer.name) {
            diagnostics.push(
                peer_field(i, peer, "name"),
                format!("{:?} cannot be the name in an inner-TLS certificate (one DNS label: lowercase letters, digits and '-', at most 63)", peer.name),
                format!("rename it, and issue its certificate with `xpart ca issue {peer_flag} NAME` under the same name"),
            );
        }
    }
}

/// Why a config that passed validation still cannot bring a tunnel up (a key file changed
/// in between, or a caller skipped validation).
#[derive(Debug, thiserror::Error)]
pub enum TunnelConfigError {
    #[error("[tunnel].private_key_file is missing")]
    MissingPrivateKeyFile,
    #[error("[tunnel].private_key_file: {0}")]
    PrivateKey(#[from] KeyError),
    #[error("[tunnel].address is missing")]
    MissingAddress,
    #[error("peer {peer}: public_key is missing")]
    MissingPublicKey { peer: String },
    #[error("peer {peer}: public_key: {source}")]
    PublicKey { peer: String, source: KeyError },
    #[error("peer {peer}: preshared_key_file: {source}")]
    PresharedKey { peer: String, source: KeyError },
}

/// Reads the private key and the preshared keys and builds one WireGuard peer per table,
/// routing its tunnel address; `None` in host mode, which has no WireGuard of its own.
/// `resolve` takes a path relative to the config file.
pub fn tunnel_config(
    side: Side,
    tunnel: &TunnelSection,
    peers: &[PeerSection],
    resolve: impl Fn(&Path) -> PathBuf,
) -> Result<Option<TunnelConfig>, TunnelConfigError> {
    let Some(mode) = tunnel.mode.wireguard() else {
        return Ok(None);
    };
    let key_file = tunnel
        .private_key_file
        .as_deref()
        .ok_or(TunnelConfigError::MissingPrivateKeyFile)?;
    let private_key = xpart_tunnel::keys::read_private_key_file(resolve(key_file))?;
    let address = tunnel.address.ok_or(TunnelConfigError::MissingAddress)?;
    let peers = peers
        .iter()
        .map(|peer| peer_config(side, peer, &resolve))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(TunnelConfig {
        private_key,
        address,
        mode,
        listen: tunnel.udp_listen(side),
        mtu: tunnel.mtu,
        interface_name: tunnel.interface_name.clone(),
        peers,
    }))
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

fn default_mode() -> TunnelMode {
    TunnelMode::Kernel
}

fn peer_config(
    side: Side,
    peer: &PeerSection,
    resolve: &impl Fn(&Path) -> PathBuf,
) -> Result<PeerConfig, TunnelConfigError> {
    let Some(key) = &peer.public_key else {
        return Err(TunnelConfigError::MissingPublicKey {
            peer: peer.name.clone(),
        });
    };
    let public_key =
        PublicKey::from_base64(key).map_err(|source| TunnelConfigError::PublicKey {
            peer: peer.name.clone(),
            source,
        })?;
    let preshared_key = match &peer.preshared_key_file {
        Some(path) => Some(read_preshared_key_file(&resolve(path)).map_err(|source| {
            TunnelConfigError::PresharedKey {
                peer: peer.name.clone(),
                source,
            }
        })?),
        None => None,
    };
    Ok(PeerConfig {
        name: peer.name.clone(),
        public_key,
        endpoint: peer.endpoint,
        allowed_ips: vec![IpNet::from(peer.tunnel_address)],
        persistent_keepalive: peer.keepalive(side),
        preshared_key,
    })
}
