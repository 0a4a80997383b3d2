//! The upstreams the relay talks to: one Bedrock endpoint per `[[upstream]]` (service, region,
//! FIPS or not), chosen for a request by [`Upstreams::select`] from what the agent says the
//! caller dialled. Connections go only to a configured endpoint, whatever a request says: resolved with [`UpstreamResolver`],
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

use xpart_bedrock::protocol::Destination;
use xpart_bedrock::Service;

use crate::config::{RelayConfig, UpstreamSection};
use crate::error::{EndpointError, RequestError, StartError};
use crate::resolver::UpstreamResolver;

/// `https://host[:port]` from `[upstream] endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn parse(text: &str) -> Result<Endpoint, EndpointError> {
        let Some(rest) = text.strip_prefix("https://") else {
            return Err(EndpointError::NotHttps(text.to_string()));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains('/') || authority.contains('@') {
            return Err(EndpointError::NotHostOnly(text.to_string()));
        }
        let (host, port) = match authority.rsplit_once(':') {
            // A bare IPv6 literal without brackets has colons but no port.
            Some((host, _)) if !host.ends_with(']') && host.contains(':') => (authority, 443),
            Some((host, port)) => match port.parse::<u16>() {
                Ok(port) => (host, port),
                Err(_) => {
                    return Err(EndpointError::Port {
                        text: text.to_string(),
                        port: port.to_string(),
                    })
                }
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

/// Every configured upstream, in configuration order; the first one's region is the default.
pub struct Upstreams {
    entries: Vec<Upstream>,
}

impl Upstreams {
    pub fn from_config(config: &RelayConfig) -> Result<Upstreams, StartError> {
        let mut entries = Vec::with_capacity(config.upstreams.len());
        for section in &config.upstreams {
            entries.push(Upstream::from_section(config, section)?);
        }
        Ok(Upstreams { entries })
    }

    /// The upstream for `destination`: its service in its region (the default region when it
    /// names none), the FIPS endpoint when the caller dialled a FIPS name and only then.
    pub fn select(&self, destination: &Destination) -> Result<&Upstream, RequestError> {
        let keys: Vec<Key<'_>> = self.entries.iter().map(Upstream::key).collect();
        let index = choose(&keys, destination)?;
        self.entries
            .get(index)
            .ok_or_else(|| RequestError::ServiceNotServed {
                service: destination.service.to_string(),
                region: destination.region.clone().unwrap_or_default(),
            })
    }

    /// The first configured upstream (configuration validation makes sure there is one).
    pub fn primary(&self) -> Option<&Upstream> {
        self.entries.first()
    }

    /// The endpoints, for the log line at start.
    pub fn describe(&self) -> String {
        self.entries
            .iter()
            .map(|up| {
                let fips = if up.fips { " fips" } else { "" };
                format!("{} {}{fips} {}", up.service, up.region, up.endpoint_url())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What an upstream serves: service, region, FIPS.
pub type Key<'a> = (Service, &'a str, bool);

/// [`Upstreams::select`] over the keys alone: the index of the entry that serves
/// `destination`, or why none does. A region no entry serves is 400 naming the regions that
/// are served; a FIPS name without a FIPS entry is 403 (never the non-FIPS entry).
pub fn choose(keys: &[Key<'_>], destination: &Destination) -> Result<usize, RequestError> {
    let Some(&(_, default_region, _)) = keys.first() else {
        return Err(RequestError::ServiceNotServed {
            service: destination.service.to_string(),
            region: destination.region.clone().unwrap_or_default(),
        });
    };
    let region = destination.region.as_deref().unwrap_or(default_region);
    if !keys.iter().any(|&(_, r, _)| r == region) {
        let mut configured: Vec<&str> = Vec::new();
        for &(_, r, _) in keys {
            if !configured.contains(&r) {
                configured.push(r);
            }
        }
        return Err(RequestError::RegionNotServed {
            region: region.to_string(),
            configured: configured.join(", "),
        });
    }
    // A FIPS build sends every request to a FIPS endpoint, whichever name the caller dialled
    // (validation refuses its non-FIPS upstreams).
    let fips = destination.fips || xpart_daemon::crypto::FIPS_MODE;
    let wanted = (destination.service, region, fips);
    if let Some(index) = keys.iter().position(|key| *key == wanted) {
        return Ok(index);
    }
    if fips {
        return Err(RequestError::NoFipsUpstream {
            service: destination.service.to_string(),
            region: region.to_string(),
        });
    }
    Err(RequestError::ServiceNotServed {
        service: destination.service.to_string(),
        region: region.to_string(),
    })
}

pub struct Upstream {
    pub service: Service,
    pub region: String,
    pub fips: bool,
    client: Client<Connector, Full<Bytes>>,
    endpoint: Endpoint,
    /// The validated `[upstream].host_header` (or the endpoint's authority), as text and as
    /// the header value that is sent.
    host: String,
    host_header: http::HeaderValue,
    first_byte_timeout: Duration,
}

impl Upstream {
    /// The first configured upstream.
    #[cfg(test)]
    pub fn from_config(config: &RelayConfig) -> Result<Upstream, StartError> {
        Upstream::from_section(config, &config.primary())
    }

    pub fn from_section(
        config: &RelayConfig,
        up: &UpstreamSection,
    ) -> Result<Upstream, StartError> {
        let endpoint = Endpoint::parse(&up.endpoint)?;
        let extra_ca = up.extra_ca_file.as_ref().map(|f| config.resolve_path(f));
        let tls = tls_connector(extra_ca.as_deref())?;
        let connector = Connector {
            inner: Arc::new(ConnectorInner {
                endpoint: endpoint.clone(),
                resolver: UpstreamResolver::new(&up.resolver)?,
                tls,
                connect_timeout: Duration::from_secs(up.connect_timeout_secs),
            }),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(up.pool_idle_timeout_secs))
            .pool_max_idle_per_host(up.pool_max_idle)
            .build(connector);
        let host = match &up.host_header {
            Some(host) => host.clone(),
            None => endpoint.authority(),
        };
        let host_header = host_header_value(&host)?;
        Ok(Upstream {
            service: up.service,
            region: up.region.clone(),
            fips: up.fips,
            client,
            endpoint,
            host,
            host_header,
            first_byte_timeout: Duration::from_secs(up.first_byte_timeout_secs),
        })
    }

    fn key(&self) -> Key<'_> {
        (self.service, &self.region, self.fips)
    }

    /// The `Host` the relay sends and signs.
    pub fn host_header(&self) -> &str {
        &self.host
    }

    /// [`Upstream::host_header`] as the header value.
    pub fn host_header_value(&self) -> &http::HeaderValue {
        &self.host_header
    }

    /// Absolute URL for `path_and_query` on the configured endpoint (what gets signed).
    pub fn url_for(&self, path_and_query: &str) -> Result<http::Uri, RequestError> {
        // The host was checked to be a valid authority at start, so only the path can make
        // this fail.
        format!("https://{}{path_and_query}", self.host)
            .parse()
            .map_err(|e: http::uri::InvalidUri| RequestError::UpstreamUrl {
                path: path_and_query.to_string(),
                reason: e.to_string(),
            })
    }

    pub fn endpoint_url(&self) -> String {
        self.endpoint.url()
    }

    /// Send a signed request; the response head arrives within the first-byte timeout.
    pub async fn send(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Incoming>, RequestError> {
        let (mut parts, body) = request.into_parts();
        // The pool is keyed by the endpoint, and the connector dials only the endpoint.
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = format!("{}{path}", self.endpoint.url()).parse().map_err(
            |e: http::uri::InvalidUri| RequestError::UpstreamUrl {
                path: path.to_string(),
                reason: e.to_string(),
            },
        )?;
        let request = http::Request::from_parts(parts, Full::new(body));
        match tokio::time::timeout(self.first_byte_timeout, self.client.request(request)).await {
            Err(_) => Err(RequestError::UpstreamTimeout {
                endpoint: self.endpoint.url(),
                seconds: self.first_byte_timeout.as_secs(),
            }),
            Ok(Err(err)) => Err(RequestError::UpstreamUnavailable {
                endpoint: self.endpoint.url(),
                reason: xpart_daemon::error_chain::one_line(&err),
            }),
            Ok(Ok(response)) => Ok(response),
        }
    }
}

/// `Host` must be an authority (a host, optionally with a port) to be sent, signed and put in
/// the URL that is signed.
pub(crate) fn host_header_value(host: &str) -> Result<http::HeaderValue, StartError> {
    let invalid = || StartError::HostHeader {
        host: host.to_string(),
    };
    if host.parse::<http::uri::Authority>().is_err() || host.contains('@') {
        return Err(invalid());
    }
    let value = http::HeaderValue::from_str(host).map_err(|_| invalid())?;
    Ok(value)
}

fn tls_connector(extra_ca: Option<&Path>) -> Result<TlsConnector, StartError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(file) = extra_ca {
        let unreadable = |source| StartError::ExtraCaRead {
            path: file.to_path_buf(),
            source,
        };
        for cert in CertificateDer::pem_file_iter(file).map_err(unreadable)? {
            let cert = cert.map_err(unreadable)?;
            roots
                .add(cert)
                .map_err(|source| StartError::ExtraCaCertificate {
                    path: file.to_path_buf(),
                    source,
                })?;
        }
    }
    let provider = xpart_daemon::crypto::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(StartError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    xpart_daemon::crypto::require_fips(&[(
        "[upstream] (the relay's TLS to Bedrock)",
        config.fips(),
    )])?;
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
        let addrs = self.resolver.resolve(host, self.endpoint.port).await?;
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
    ) -> io::Result<TlsConn> {
        let seconds = self.connect_timeout.as_secs();
        let timed_out = |what: &str| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} timed out after {seconds} s"),
            )
        };
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(timed_out("connect")),
            Ok(Err(err)) => return Err(err),
            Ok(Ok(tcp)) => tcp,
        };
        // Bedrock requests are small writes followed by waiting; Nagle would only add delay.
        let _ = tcp.set_nodelay(true);
        let handshake = self.tls.connect(server_name.clone(), tcp);
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Err(_) => Err(timed_out("TLS handshake")),
            Ok(Err(err)) => Err(io::Error::new(err.kind(), format!("TLS: {err}"))),
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

#[cfg(test)]
mod tests {
    use super::*;
    use xpart_bedrock::ErrorType;

    fn config(upstream_extra: &str) -> RelayConfig {
        let text = format!(
            r#"
[tunnel]
mode = "host"
[[agent]]
name = "agent-a"
tunnel_address = "127.0.0.1"
[service]
listen = "127.0.0.1:0"
[upstream]
region = "us-east-1"
endpoint = "https://bedrock-runtime.us-east-1.amazonaws.com"
resolver = ["127.0.0.1:53"]
{upstream_extra}
[policy]
operations = ["Converse"]
models = ["anthropic.*"]
"#
        );
        RelayConfig::from_toml_str(&text, "relay.toml").unwrap()
    }

    #[tokio::test]
    async fn a_path_that_forms_no_url_is_a_validation_error_not_a_signing_failure() {
        let upstream = Upstream::from_config(&config("")).unwrap();

        let error = upstream.url_for("/model/a b/converse").unwrap_err();

        assert!(
            matches!(&error, RequestError::UpstreamUrl { path, .. } if path == "/model/a b/converse"),
            "{error:?}"
        );
        let bedrock = error.to_bedrock();
        assert_eq!(bedrock.kind, ErrorType::Validation);
        assert!(!bedrock.message.contains("signing"), "{}", bedrock.message);
    }

    #[tokio::test]
    async fn the_url_that_is_signed_names_the_host_header() {
        let upstream = Upstream::from_config(&config(
            "host_header = \"bedrock-runtime.us-east-1.amazonaws.com\"",
        ))
        .unwrap();

        let uri = upstream.url_for("/model/m/converse").unwrap();

        assert_eq!(
            uri.to_string(),
            "https://bedrock-runtime.us-east-1.amazonaws.com/model/m/converse"
        );
        assert_eq!(
            upstream.host_header_value(),
            "bedrock-runtime.us-east-1.amazonaws.com"
        );
    }

    #[test]
    fn a_host_header_that_is_no_host_is_refused_naming_the_field() {
        for bad in ["bedrock runtime", "user@host", "host/path", ""] {
            let error = host_header_value(bad).unwrap_err();
            assert!(
                error.to_string().contains("[upstream].host_header"),
                "{error}"
            );
        }
        assert!(
            host_header_value("vpce-1.bedrock-runtime.us-east-1.vpce.amazonaws.com:8443").is_ok()
        );
    }

    #[test]
    fn config_check_refuses_a_host_header_that_is_no_host() {
        let text = "[tunnel]\nmode = \"host\"\n[[agent]]\nname = \"a\"\ntunnel_address = \"127.0.0.1\"\n\
             [service]\nlisten = \"127.0.0.1:0\"\n[upstream]\nregion = \"us-east-1\"\n\
             endpoint = \"https://bedrock-runtime.us-east-1.amazonaws.com\"\nhost_header = \"a b\"\n\
             [policy]\noperations = [\"Converse\"]\nmodels = [\"anthropic.*\"]\n";

        let problems = RelayConfig::from_toml_str(text, "relay.toml")
            .unwrap_err()
            .to_string();

        assert!(problems.contains("[upstream].host_header"), "{problems}");
    }

    #[test]
    fn upstreams_are_chosen_by_service_region_and_fips() {
        let keys: Vec<Key<'_>> = vec![
            (Service::BedrockRuntime, "us-east-1", false),
            (Service::Bedrock, "us-east-1", false),
            (Service::BedrockRuntime, "us-east-1", true),
            (Service::BedrockRuntime, "us-west-2", false),
        ];
        let to = |service, region: Option<&str>, fips| Destination {
            service,
            region: region.map(str::to_string),
            fips,
        };
        let chosen = |d: Destination| choose(&keys, &d);
        assert_eq!(chosen(Destination::default()).unwrap(), 0);
        assert_eq!(chosen(to(Service::Bedrock, None, false)).unwrap(), 1);
        assert_eq!(
            chosen(to(Service::BedrockRuntime, Some("us-east-1"), true)).unwrap(),
            2
        );
        assert_eq!(
            chosen(to(Service::BedrockRuntime, Some("us-west-2"), false)).unwrap(),
            3
        );

        let unserved = chosen(to(Service::BedrockRuntime, Some("eu-west-1"), false)).unwrap_err();
        let bedrock = unserved.to_bedrock();
        assert_eq!(bedrock.kind, ErrorType::Validation);
        assert!(
            bedrock.message.contains("eu-west-1")
                && bedrock.message.contains("us-east-1, us-west-2"),
            "{}",
            bedrock.message
        );

        let no_fips = chosen(to(Service::BedrockRuntime, Some("us-west-2"), true)).unwrap_err();
        let bedrock = no_fips.to_bedrock();
        assert_eq!(bedrock.kind, ErrorType::AccessDenied);
        assert!(
            bedrock.message.contains("no FIPS endpoint"),
            "{}",
            bedrock.message
        );
        let no_fips_bedrock = chosen(to(Service::Bedrock, Some("us-east-1"), true)).unwrap_err();
        assert!(matches!(
            no_fips_bedrock,
            RequestError::NoFipsUpstream { .. }
        ));

        let no_service = chosen(to(Service::Bedrock, Some("us-west-2"), false)).unwrap_err();
        assert_eq!(no_service.to_bedrock().kind, ErrorType::AccessDenied);
        assert!(matches!(no_service, RequestError::ServiceNotServed { .. }));
    }

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
        assert_eq!(
            Endpoint::parse("http://x").unwrap_err(),
            EndpointError::NotHttps("http://x".into())
        );
        assert!(Endpoint::parse("https://x/model").is_err());
        assert!(Endpoint::parse("https://x:notaport").is_err());
    }
}
