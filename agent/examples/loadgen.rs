//! Load generator for `tests/bench/agent.py`: many concurrent HTTP/2 requests over TLS to one
//! URL for a fixed time, printing one JSON line with the count, errors, requests/s and
//! latency percentiles. A Python client cannot drive the agent hard enough on two cores.
//!
//! loadgen --url https://127.0.0.1:8443/model/xpart.echo/converse --server-name localhost \
//!     --ca ca.pem --header "authorization: Bearer T" --body '{"messages":[]}' \
//!     --connections 2 --streams 32 --seconds 5

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    /// TLS server name to verify (the certificate's name).
    #[arg(long)]
    server_name: String,
    /// PEM CA certificate to trust.
    #[arg(long)]
    ca: String,
    /// Extra request header, "name: value" (repeatable).
    #[arg(long)]
    header: Vec<String>,
    #[arg(long, default_value = "{}")]
    body: String,
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Concurrent requests per connection.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let uri: http::Uri = args.url.parse()?;
    let authority = uri.authority().ok_or("url without host:port")?.clone();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_file(&args.ca)?)?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let headers: Vec<(String, String)> = args
        .header
        .iter()
        .filter_map(|h| h.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body = Bytes::from(args.body.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let tcp = tokio::net::TcpStream::connect(authority.as_str()).await?;
        tcp.set_nodelay(true)?;
        let name = rustls_pki_types::ServerName::try_from(args.server_name.clone())?;
        let tls = connector.connect(name, tcp).await?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        for _ in 0..args.streams {
            let mut sender = sender.clone();
            let (uri, headers, body) = (uri.clone(), headers.clone(), body.clone());
            let (stop, ok, errors, latencies) =
                (stop.clone(), ok.clone(), errors.clone(), latencies.clone());
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut request = http::Request::post(uri.clone());
                    for (n, v) in &headers {
                        request = request.header(n, v);
                    }
                    let Ok(request) = request.body(Full::new(body.clone())) else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    let started = Instant::now();
                    let answered = match sender.send_request(request).await {
                        Ok(response) => {
                            let good = response.status() == 200;
                            let read = response.into_body().collect().await.is_ok();
                            good && read
                        }
                        Err(_) => false,
                    };
                    match answered {
                        true => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            mine.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        }
                        false => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies.lock().expect("latencies").extend(mine);
            }));
        }
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for task in tasks {
        let _ = task.await;
    }
    let mut all = latencies.lock().expect("latencies").clone();
    all.sort_unstable();
    let percentile = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let index = ((all.len() as f64 - 1.0) * p).round() as usize;
        f64::from(all[index]) / 1000.0
    };
    let count = ok.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "requests": count,
            "errors": errors.load(Ordering::Relaxed),
            "seconds": elapsed,
            "rps": count as f64 / elapsed,
            "p50_ms": percentile(0.50),
            "p99_ms": percentile(0.99),
        })
    );
    Ok(())
}
