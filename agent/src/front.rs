//! The TLS front callers connect to: TCP accept, TLS (certificate from [`CertStore`]), then
//! HTTP/1.1 or HTTP/2 as ALPN chose, each request handed to [`pipeline::handle`].
//!
//! The connection handling is the daemons' one HTTP server ([`xpart_daemon::serve`]) over a
//! [`Tls`] listener, with the limits from `[front]`: connections are capped in total and per
//! source address (refused at accept), a TLS handshake must finish within
//! `handshake_timeout`, the first request must arrive within `first_request_timeout`, and a
//! connection with no request or response in flight closes after `idle_timeout` (HTTP/2 with
//! a GOAWAY). A response that is still streaming keeps its connection open however long it
//! runs. Connections are counted in `xpart_agent_front_connections_*`.
//!
//! [`CertStore`]: crate::tls::CertStore

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use xpart_daemon::serve::{ConnectionMetrics, Limits, Server, Tls};

use crate::pipeline::{self, Agent};

/// The prefix of the front's connection series.
const METRICS_PREFIX: &str = "xpart_agent_front";

/// How the front treats connections, from `[front]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontSettings {
    /// From accept to the end of the TLS handshake.
    pub handshake_timeout: Duration,
    /// From the end of the handshake to the first request's headers.
    pub first_request_timeout: Duration,
    /// With no request or response in flight, the connection closes after this long.
    pub idle_timeout: Duration,
    /// Connections open at once, all sources together.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_connections_per_source: usize,
}

impl Default for FrontSettings {
    fn default() -> FrontSettings {
        let limits = Limits::default();
        FrontSettings {
            handshake_timeout: limits.handshake_timeout,
            first_request_timeout: limits.first_request_timeout,
            idle_timeout: limits.idle_timeout,
            max_connections: limits.max_connections,
            max_connections_per_source: limits.max_connections_per_source,
        }
    }
}

impl FrontSettings {
    /// The server limits for these settings. Shutdown cuts requests in flight at once: the
    /// agent stops only when asked to, and callers retry on another connection.
    pub fn limits(&self) -> Limits {
        Limits {
            handshake_timeout: self.handshake_timeout,
            first_request_timeout: self.first_request_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
            shutdown_grace: Duration::ZERO,
            http1_only: false,
        }
    }
}

/// Accepts callers until `stop` turns true, then stops accepting and ends open connections.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    agent: Arc<Agent>,
    settings: FrontSettings,
    stop: watch::Receiver<bool>,
) {
    let mut server = Server::new(settings.limits());
    match ConnectionMetrics::new(METRICS_PREFIX, "Caller") {
        Ok(metrics) => {
            if let Err(error) = metrics.register(&agent.metrics.registry) {
                tracing::warn!(%error, "front metrics not registered");
            }
            server = server.metrics(metrics);
        }
        Err(error) => tracing::warn!(%error, "front metrics not defined"),
    }
    let handler = move |request, peer: std::net::SocketAddr| {
        pipeline::handle(agent.clone(), request, peer.ip())
    };
    server
        .serve(Tls::new(listener, acceptor), handler, stop)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_settings_become_the_server_limits_with_no_shutdown_grace() {
        let settings = FrontSettings {
            handshake_timeout: Duration::from_secs(1),
            first_request_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(3),
            max_connections: 4,
            max_connections_per_source: 5,
        };
        let limits = settings.limits();
        assert_eq!(limits.handshake_timeout, Duration::from_secs(1));
        assert_eq!(limits.first_request_timeout, Duration::from_secs(2));
        assert_eq!(limits.idle_timeout, Duration::from_secs(3));
        assert_eq!(limits.max_connections, 4);
        assert_eq!(limits.max_connections_per_source, 5);
        assert_eq!(limits.shutdown_grace, Duration::ZERO);
        assert!(!limits.http1_only);
        assert_eq!(FrontSettings::default().limits(), Limits::default());
    }
}
