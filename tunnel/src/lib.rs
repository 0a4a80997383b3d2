//! `xpart-tunnel` has one job: carry the TCP traffic between agents and relays over standard
//! WireGuard, so either side can also talk to a stock `wg`/wireguard-go peer.
//!
//! Data flows through three layers. A network backend produces IP packets: the kernel's TUN
//! device in [`Mode::Kernel`], an embedded smoltcp TCP/IP stack in [`Mode::Userspace`]. The
//! tokio driver (`driver`) hands them to the sans-IO [`core`] engine, which routes each to the
//! peer whose allowed IPs hold its destination, encrypts it with boringtun and returns the UDP
//! datagram that the driver sends to that peer's endpoint. Datagrams received on the UDP socket
//! go the other way: engine (find the peer, decrypt, check the inner source against the
//! peer's allowed IPs) → backend. Callers never see packets: they describe the tunnel with a
//! [`TunnelConfig`] and its [`PeerConfig`]s, open and accept TCP connections on tunnel
//! addresses through a [`Network`], and read per-peer counters with [`Tunnel::peer_stats`]
//! and drops by reason, with or without a peer, with [`Tunnel::dropped`].

pub mod core;
pub mod keys;

mod driver;
mod kernel;
mod net;
mod udp;
mod userspace;

use std::net::SocketAddr;

pub use core::{DropReason, PeerConfig, PeerStats};
pub use driver::Tunnel;
pub use keys::{PrivateKey, PublicKey};
pub use net::{Network, TcpConn, TcpListener};

/// Default tunnel MTU: 1500 minus the largest WireGuard overhead (IPv6 outer header 40 +
/// UDP 8 + WireGuard data header 16 + Poly1305 tag 16 = 80).
pub const DEFAULT_MTU: u16 = 1420;

/// Default TUN interface name in kernel mode.
pub const DEFAULT_INTERFACE_NAME: &str = "xpart0";

/// Which network backend carries the tunnel's IP packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A Linux TUN interface; the host's own TCP/IP stack routes through it. Needs CAP_NET_ADMIN.
    Kernel,
    /// An embedded TCP/IP stack inside the process; no privileges.
    Userspace,
}

/// Everything needed to bring up one side of a tunnel.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    pub private_key: PrivateKey,
    /// This side's tunnel address with prefix, e.g. `100.64.0.1/30`.
    pub address: ipnet::IpNet,
    pub mode: Mode,
    /// UDP bind address; `None` binds `0.0.0.0:0` (an ephemeral port).
    pub listen: Option<SocketAddr>,
    pub mtu: u16,
    /// Kernel mode only; `None` means [`DEFAULT_INTERFACE_NAME`].
    pub interface_name: Option<String>,
    pub peers: Vec<PeerConfig>,
}

/// Why a tunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tunnel config: {0}")]
    Config(String),
    #[error("binding the WireGuard UDP socket on {addr}: {source}")]
    UdpBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "kernel mode needs CAP_NET_ADMIN to create TUN interface {interface} ({source}); \
         run as root, grant the capability (e.g. systemd AmbientCapabilities=CAP_NET_ADMIN), \
         or use mode = \"userspace\""
    )]
    NeedsNetAdmin {
        interface: String,
        source: std::io::Error,
    },
    #[error("kernel mode is only available on Linux; use mode = \"userspace\"")]
    KernelModeUnsupported,
    #[error("creating TUN interface {interface}: {source}")]
    Tun {
        interface: String,
        source: std::io::Error,
    },
    #[error("configuring interface {interface} with `{command}`: {message}")]
    InterfaceSetup {
        interface: String,
        command: String,
        message: String,
    },
}
