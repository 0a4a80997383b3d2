//! The one upstream the relay talks to: the Bedrock Runtime endpoint named in `[upstream]`.
//! Connections go only there, whatever a request says: resolved with [`UpstreamResolver`],
//! each address tried in turn, TLS with rustls (webpki roots plus an optional extra CA file),
//! HTTP/1.1, pooled. A request gets its response head within the first-byte timeout or a
//! prompt error naming the endpoint.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::RelayConfig;
use crate::error::Error;
use crate::resolver::UpstreamResolver;

/// `https://host[:port]` from `[upstream] endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        let Some(rest) = text.strip_prefix("https://") else {
            return Err(format!("{text:?} must start with https://"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains('/') || authority.contains('@') {
            return Err(format!(
                "{text:?} must be a scheme and host only, without a path or user"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            // A bare IPv6 literal without brackets has colons but no port.
            Some((host, _)) if !host.ends_with(']') && host.contains(':') => (authority, 443),
            Some((host, port)) => match port.parse::<u16>() {
                Ok(port) => (host, port),
                Err(_) => return Err(format!("{text:?} has an invalid port {port:?}")),
            },
            None => (authority, 443),
        };
        Ok(Endpoint {
            host: host.to_string(),
            port,
        })
    }

    /// `host` or `host:port`, as it goes in a URL or a `Host` header.
    pub fn authority(&self) -> String {
        match self.port {
            443 => self.host.clone(),
            port => format!("{}:{port}", self.host),
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.authority())
    }
}

pub struct Upstream {
    client: Client<Connector, Full<Bytes>>,
    endpoint: Endpoint,
    host_header: String,
    first_byte_timeout: Duration,
}

impl Upstream {
    pub fn from_config(config: &RelayConfig) -> Result<Upstream, Error> {
        let up = &config.upstream;
        let endpoint = Endpoint::parse(&up.endpoint).map_err(Error::UpstreamSetup)?;
        let extra_ca = up.extra_ca_file.as_ref().map(|f| config.resolve_path(f));
        let tls = tls_connector(extra_ca.as_deref())?;
        let connector = Connector {
            inner: Arc::new(ConnectorInner {
                endpoint: endpoint.clone(),
                resolver: UpstreamResolver::new(&up.resolver)?,
                tls,
                connect_timeout: config.connect_timeout(),
            }),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(up.pool_idle_timeout_secs))
            .pool_max_idle_per_host(up.pool_max_idle)
            .build(connector);
        let host_header = match &up.host_header {
            Some(host) => host.clone(),
            None => endpoint.authority(),
        };
        Ok(Upstream {
            client,
            endpoint,
            host_header,
            first_byte_timeout: config.first_byte_timeout(),
        })
    }

    /// The `Host` the relay sends and signs.
    pub fn host_header(&self) -> &str {
        &self.host_header
    }

    /// Absolute URL for `path_and_query` on the configured endpoint (what gets signed).
    pub fn url_for(&self, path_and_query: &str) -> String {
        format!("https://{}{path_and_query}", self.host_header)
    }

    pub fn endpoint_url(&self) -> String {
        self.endpoint.url()
    }

    /// Send a signed request; the response head arrives within the first-byte timeout.
    pub async fn send(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Incoming>, Error> {
        let (mut parts, body) = request.into_parts();
        // The pool is keyed by the endpoint, and the connector dials only the endpoint.
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = format!("{}{path}", self.endpoint.url())
            .parse()
            .map_err(|e: http::uri::InvalidUri| Error::UpstreamSetup(e.to_string()))?;
        let request = http::Request::from_parts(parts, Full::new(body));
        match tokio::time::timeout(self.first_byte_timeout, self.client.request(request)).await {
            Err(_) => Err(Error::UpstreamTimeout {
                endpoint: self.endpoint.url(),
                seconds: self.first_byte_timeout.as_secs(),
            }),
            Ok(Err(err)) => Err(Error::UpstreamUnavailable {
                endpoint: self.endpoint.url(),
                reason: describe(&err),
            }),
            Ok(Ok(response)) => Ok(response),
        }
    }
}

fn tls_connector(extra_ca: Option<&Path>) -> Result<TlsConnector, Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(file) = extra_ca {
        let certs = CertificateDer::pem_file_iter(file)
            .map_err(|e| Error::UpstreamSetup(format!("{}: {e}", file.display())))?;
        for cert in certs {
            let cert =
                cert.map_err(|e| Error::UpstreamSetup(format!("{}: {e}", file.display())))?;
            roots
                .add(cert)
                .map_err(|e| Error::UpstreamSetup(format!("{}: {e}", file.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::UpstreamSetup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

#[derive(Clone)]
struct Connector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    endpoint: Endpoint,
    resolver: UpstreamResolver,
    tls: TlsConnector,
    connect_timeout: Duration,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TlsConn;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsConn>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.connect().await })
    }
}

impl ConnectorInner {
    async fn connect(&self) -> io::Result<TlsConn> {
        let host = &self.endpoint.host;
        let addrs = self
            .resolver
            .resolve(host, self.endpoint.port)
            .await
            .map_err(io::Error::other)?;
        tracing::debug!(host = %host, addresses = ?addrs, "upstream resolved");
        let server_name = ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        )
        .map_err(|e| io::Error::other(format!("{host}: {e}")))?;
        let mut failures = Vec::new();
        for addr in addrs {
            match self.try_address(addr, &server_name).await {
                Ok(conn) => return Ok(conn),
                Err(failure) => {
                    tracing::warn!(%addr, %failure, "upstream address failed; trying the next");
                    failures.push(format!("{addr}: {failure}"));
                }
            }
        }
        Err(io::Error::other(failures.join("; ")))
    }

    async fn try_address(
        &self,
        addr: SocketAddr,
        server_name: &ServerName<'static>,
    ) -> Result<TlsConn, String> {
        let seconds = self.connect_timeout.as_secs();
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(format!("connect timed out after {seconds} s")),
            Ok(Err(err)) => return Err(err.to_string()),
            Ok(Ok(tcp)) => tcp,
        };
        // Bedrock requests are small writes followed by waiting; Nagle would only add delay.
        let _ = tcp.set_nodelay(true);
        let handshake = self.tls.connect(server_name.clone(), tcp);
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Err(_) => Err(format!("TLS handshake timed out after {seconds} s")),
            Ok(Err(err)) => Err(format!("TLS: {err}")),
            Ok(Ok(tls)) => Ok(TlsConn {
                io: TokioIo::new(tls),
            }),
        }
    }
}

struct TlsConn {
    io: TokioIo<TlsStream<TcpStream>>,
}

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The error and its causes on one line; hyper's top-level message alone ("client error
/// (Connect)") does not say what happened.
pub fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parsing() {
        let e = Endpoint::parse("https://bedrock-runtime.us-east-1.amazonaws.com").unwrap();
        assert_eq!(e.port, 443);
        assert_eq!(e.authority(), "bedrock-runtime.us-east-1.amazonaws.com");
        let e = Endpoint::parse("https://bedrock-runtime.us-east-1.amazonaws.com:8443/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port),
            ("bedrock-runtime.us-east-1.amazonaws.com", 8443)
        );
        assert_eq!(
            e.authority(),
            "bedrock-runtime.us-east-1.amazonaws.com:8443"
        );
        assert!(Endpoint::parse("http://x")
            .unwrap_err()
            .contains("https://"));
        assert!(Endpoint::parse("https://x/model").is_err());
        assert!(Endpoint::parse("https://x:notaport").is_err());
    }
}
