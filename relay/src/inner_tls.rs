//! The relay's side of the inner TLS (`[tunnel] inner_tls = true`, see
//! [`xpart_daemon::inner_tls`]): the service listener speaks mutual TLS 1.3 before HTTP, and a
//! connection is served only when the agent's certificate names the `[[agent]]` whose tunnel
//! address the connection came from. WireGuard guarantees that address belongs to that agent's
//! key, so the TLS peer and the WireGuard peer are the same agent; a mismatch (one agent's
//! certificate used through another agent's tunnel) is closed after the handshake, logged and
//! counted in `xpart_relay_inner_tls_refused_total`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use prometheus::{IntCounter, Registry};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use xpart_daemon::inner_tls::{self, InnerTlsError};
use xpart_daemon::serve::{Accept, Handshake};

use crate::config::RelayConfig;

/// The inner-TLS server and the agents it admits, by tunnel address.
#[derive(Clone)]
pub struct InnerTls {
    acceptor: TlsAcceptor,
    agents: Arc<HashMap<IpAddr, String>>,
    refused: IntCounter,
}

impl InnerTls {
    /// `None` when `[tunnel] inner_tls` is off.
    pub fn from_config(config: &RelayConfig) -> Result<Option<InnerTls>, InnerTlsError> {
        let Some(files) = config
            .tunnel
            .inner_tls_files(|path| config.resolve_path(path))
        else {
            return Ok(None);
        };
        let server = inner_tls::server_config(&files)?;
        let agents = config
            .agents
            .iter()
            .map(|agent| (agent.tunnel_address, inner_tls::agent_name(&agent.name)))
            .collect();
        let refused = IntCounter::new(
            "xpart_relay_inner_tls_refused_total",
            "Inner-TLS connections closed because the agent certificate does not name the [[agent]] whose tunnel address carried it",
        )
        .map_err(|e| InnerTlsError::Tls(rustls::Error::General(e.to_string())))?;
        Ok(Some(InnerTls {
            acceptor: TlsAcceptor::from(server),
            agents: Arc::new(agents),
            refused,
        }))
    }

    /// Whether rustls reports the server configuration as FIPS.
    pub fn fips(&self) -> bool {
        self.acceptor.config().fips()
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.refused.clone()))
    }

    /// `listener` with every connection through the inner TLS and the peer check.
    pub fn listener<L: Accept>(&self, listener: L) -> Listener<L> {
        Listener {
            inner: listener,
            tls: self.clone(),
        }
    }

    /// The agent certificate name the connection from `peer` must carry, and whether the
    /// handshake's end-entity certificate carries it.
    fn admits(&self, peer: SocketAddr, stream: &TlsStream<impl Sized>) -> Result<(), Refusal> {
        let Some(expected) = self.agents.get(&peer.ip()) else {
            return Err(Refusal::UnknownAgent(peer.ip()));
        };
        let (_, connection) = stream.get_ref();
        if inner_tls::peer_certificate_names(connection.peer_certificates(), expected) {
            return Ok(());
        }
        Err(Refusal::OtherAgent {
            expected: expected.clone(),
            peer: peer.ip(),
        })
    }
}

/// Why a connection is closed after its handshake.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("no [[agent]] has tunnel_address {0}, so no agent certificate can match it")]
    UnknownAgent(IpAddr),
    #[error("the certificate does not name {expected}, the agent whose tunnel address {peer} carried the connection")]
    OtherAgent { expected: String, peer: IpAddr },
}

/// A listener whose connections run the inner TLS before HTTP.
pub struct Listener<L> {
    inner: L,
    tls: InnerTls,
}

impl<L: Accept> Accept for Listener<L> {
    type Conn = (L::Conn, SocketAddr);
    type Io = TlsStream<L::Io>;

    async fn accept(&self) -> io::Result<(Self::Conn, SocketAddr)> {
        let (conn, peer) = self.inner.accept().await?;
        Ok(((conn, peer), peer))
    }

    fn handshake(&self, (conn, peer): Self::Conn) -> Handshake<Self::Io> {
        let inner = self.inner.handshake(conn);
        let tls = self.tls.clone();
        Box::pin(async move {
            let stream = tls.acceptor.accept(inner.await?).await?;
            if let Err(reason) = tls.admits(peer, &stream) {
                tls.refused.inc();
                tracing::warn!(%peer, %reason, "inner TLS: agent refused");
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, reason));
            }
            Ok(stream)
        })
    }
}
