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

impl AdminUrl {
    pub fn parse(text: &str) -> Result<AdminUrl, String> {
        let with_scheme = if text.contains("://") {
            text.to_string()
        } else {
            format!("http://{text}")
        };
        let uri: http::Uri = with_scheme.parse().map_err(|err| {
            format!("{text:?} is not an admin address like http://127.0.0.1:9100: {err}")
        })?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("{text:?}: admin ports speak plain http://"));
        }
        let Some(authority) = uri.authority() else {
            return Err(format!("{text:?} has no host:port"));
        };
        if authority.port_u16().is_none() {
            return Err(format!(
                "{text:?} has no port (admin ports have no default)"
            ));
        }
        Ok(AdminUrl {
            authority: authority.to_string(),
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.authority, self.base_path, path)
    }

    pub async fn get(&self, path: &str, timeout: Duration) -> Result<AdminResponse, String> {
        self.request(http::Method::GET, path, timeout).await
    }

    pub async fn post(&self, path: &str, timeout: Duration) -> Result<AdminResponse, String> {
        self.request(http::Method::POST, path, timeout).await
    }

    async fn request(
        &self,
        method: http::Method,
        path: &str,
        timeout: Duration,
    ) -> Result<AdminResponse, String> {
        let url = self.url(path);
        match tokio::time::timeout(timeout, self.exchange(method, path)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => Err(format!("{url}: {err}")),
            Err(_) => Err(format!("{url}: no answer within {timeout:?}")),
        }
    }

    async fn exchange(&self, method: http::Method, path: &str) -> Result<AdminResponse, String> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|err| format!("cannot connect: {err}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|err| format!("HTTP handshake failed: {err}"))?;
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base_path, path))
            .header(http::header::HOST, &self.authority)
            .header(http::header::USER_AGENT, "xpart-cli")
            .body(Empty::<Bytes>::new())
            .map_err(|err| format!("cannot build the request: {err}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|err| format!("request failed: {err}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("reading the response failed: {err}"))?
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
        assert!(AdminUrl::parse("https://127.0.0.1:9100").is_err());
        assert!(AdminUrl::parse("http://127.0.0.1").is_err());
    }
}
