//! The agent's side of the inner TLS (`[tunnel] inner_tls = true`, see
//! [`xpart_daemon::inner_tls`]): each connection to a relay is wrapped in mutual TLS 1.3 before
//! HTTP/2 starts, and the relay must present the certificate issued for its `[[relay]].name`.

use std::io;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use xpart_daemon::inner_tls::{self, InnerTlsError, InnerTlsFiles};
use xpart_tunnel::TcpConn;

/// What HTTP/2 to a relay runs over: the tunnel connection itself, or TLS on it.
pub trait RelayIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> RelayIo for T {}

/// The inner-TLS client, shared by every relay connection.
#[derive(Clone)]
pub struct InnerTls {
    connector: TlsConnector,
    fips: bool,
}

impl InnerTls {
    pub fn new(files: &InnerTlsFiles) -> Result<InnerTls, InnerTlsError> {
        let config = inner_tls::client_config(files)?;
        Ok(InnerTls {
            fips: config.fips(),
            connector: TlsConnector::from(config),
        })
    }

    /// Whether rustls reports the client configuration as FIPS.
    pub fn fips(&self) -> bool {
        self.fips
    }
}

/// `conn` as it is used for HTTP/2 to `relay`: through the handshake with the relay's
/// certificate checked, or as it is without inner TLS.
pub async fn wrap(
    tls: Option<&InnerTls>,
    conn: TcpConn,
    relay: &str,
) -> io::Result<Box<dyn RelayIo>> {
    let Some(tls) = tls else {
        return Ok(Box::new(conn));
    };
    let name = ServerName::try_from(inner_tls::relay_name(relay))
        .map_err(|e| io::Error::other(format!("inner TLS name for relay {relay}: {e}")))?;
    let stream = tls
        .connector
        .connect(name, conn)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("inner TLS: {e}")))?;
    Ok(Box::new(stream))
}
