//! A small HTTP/1.1 client for the daemons' admin ports (`/status`, `/readyz`, `/metrics`,
//! the relay's `/drain`), which listen on plain HTTP on a private address.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// An admin base URL: `http://HOST:PORT`, or just `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUrl {
    authority: String,
    base_path: String,
}

#[derive(Debug, Clone)]
pub struct AdminResponse {
    pub status: u16,
    pub body: Bytes,
}

/// An admin address that cannot be used, with what it should look like.
#[derive(Debug, thiserror::Error)]
pub enum AdminUrlError {
    #[error("{text:?} is not an admin address like http://127.0.0.1:9100: {source}")]
    Malformed {
        text: String,
        source: http::uri::InvalidUri,
    },
    #[error("{0:?}: admin ports speak plain http://")]
    NotHttp(String),
    #[error("{0:?} has no host:port")]
    NoHost(String),
    #[error("{0:?} has no port (admin ports have no default)")]
    NoPort(String),
}

/// An admin request that got no answer, naming the URL and the step that failed.
#[derive(Debug, thiserror::Error)]
#[error("{url}: {failure}")]
pub struct AdminError {
    pub url: String,
    pub failure: AdminFailure,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminFailure {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error("cannot build the request: {0}")]
    Build(http::Error),
    #[error("request failed: {0}")]
    Send(hyper::Error),
    #[error("reading the response failed: {0}")]
    Read(hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl AdminUrl {
    pub fn parse(text: &str) -> Result<AdminUrl, AdminUrlError> {
        let with_scheme = if text.contains("://") {
            text.to_string()
        } else {
            format!("http://{text}")
        };
        let uri: http::Uri = with_scheme
            .parse()
            .map_err(|source| AdminUrlError::Malformed {
                text: text.to_string(),
                source,
            })?;
        if uri.scheme_str() != Some("http") {
            return Err(AdminUrlError::NotHttp(text.to_string()));
        }
        let Some(authority) = uri.authority() else {
            return Err(AdminUrlError::NoHost(text.to_string()));
        };
        if authority.port_u16().is_none() {
            return Err(AdminUrlError::NoPort(text.to_string()));
        }
        Ok(AdminUrl {
            authority: authority.to_string(),
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.authority, self.base_path, path)
    }

    pub async fn get(&self, path: &str, timeout: Duration) -> Result<AdminResponse, AdminError> {
        self.request(http::Method::GET, path, timeout).await
    }

    pub async fn post(&self, path: &str, timeout: Duration) -> Result<AdminResponse, AdminError> {
        self.request(http::Method::POST, path, timeout).await
    }

    async fn request(
        &self,
        method: http::Method,
        path: &str,
        timeout: Duration,
    ) -> Result<AdminResponse, AdminError> {
        let failure = match tokio::time::timeout(timeout, self.exchange(method, path)).await {
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(failure)) => failure,
            Err(_) => AdminFailure::Timeout(timeout),
        };
        Err(AdminError {
            url: self.url(path),
            failure,
        })
    }

    async fn exchange(
        &self,
        method: http::Method,
        path: &str,
    ) -> Result<AdminResponse, AdminFailure> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(AdminFailure::Connect)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(AdminFailure::Handshake)?;
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base_path, path))
            .header(http::header::HOST, &self.authority)
            .header(http::header::USER_AGENT, "xpart-cli")
            .body(Empty::<Bytes>::new())
            .map_err(AdminFailure::Build)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(AdminFailure::Send)?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(AdminFailure::Read)?
            .to_bytes();
        Ok(AdminResponse { status, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_bare_host_port_and_http_urls() {
        let bare = AdminUrl::parse("127.0.0.1:9100").unwrap();
        assert_eq!(bare.url("/status"), "http://127.0.0.1:9100/status");
        let full = AdminUrl::parse("http://127.0.0.1:9101/").unwrap();
        assert_eq!(full.url("/drain"), "http://127.0.0.1:9101/drain");
    }

    #[test]
    fn refuses_https_and_missing_ports() {
        let https = AdminUrl::parse("https://127.0.0.1:9100").unwrap_err();
        assert_eq!(
            https.to_string(),
            "\"https://127.0.0.1:9100\": admin ports speak plain http://"
        );
        let portless = AdminUrl::parse("http://127.0.0.1").unwrap_err();
        assert_eq!(
            portless.to_string(),
            "\"http://127.0.0.1\" has no port (admin ports have no default)"
        );
    }
}
