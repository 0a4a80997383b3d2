//! The tokio driver (placeholder until the engine lands): `Tunnel::start` refuses to start.

use std::net::SocketAddr;

use crate::{Error, Network, PeerStats, TunnelConfig};

/// A running WireGuard tunnel.
#[derive(Debug)]
pub struct Tunnel {
    network: Network,
    local_udp: SocketAddr,
}

impl Tunnel {
    pub async fn start(_config: TunnelConfig) -> Result<Tunnel, Error> {
        Err(Error::Config("the tunnel driver is not built yet".into()))
    }

    pub fn network(&self) -> Network {
        self.network.clone()
    }

    pub fn local_udp_addr(&self) -> SocketAddr {
        self.local_udp
    }

    pub fn peer_stats(&self) -> Vec<PeerStats> {
        Vec::new()
    }

    pub async fn shutdown(self) {}
}
