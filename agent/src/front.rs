//! The TLS front callers connect to: TCP accept, TLS (certificate from [`CertStore`]), then
//! HTTP/1.1 or HTTP/2 as ALPN chose, each request handed to [`pipeline::handle`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::pipeline::{self, Agent};

/// A TLS handshake that has not finished by then is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts callers until `stop` turns true, then stops accepting and ends open connections.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    agent: Arc<Agent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        // Reap finished connection tasks so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off briefly instead of spinning.
                tracing::warn!(%error, "accepting a caller failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        connections.spawn(serve_connection(tcp, peer, acceptor.clone(), agent.clone()));
    }
    connections.shutdown().await;
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    agent: Arc<Agent>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let source = peer.ip();
    let service = service_fn(move |request| {
        let agent = agent.clone();
        async move { Ok::<_, std::convert::Infallible>(pipeline::handle(agent, request, source).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1000)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    if let Err(error) = builder.serve_connection(TokioIo::new(tls), service).await {
        tracing::debug!(%peer, %error, "caller connection ended with an error");
    }
}
