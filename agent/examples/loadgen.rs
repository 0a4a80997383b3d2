//! Load generator for `tests/bench/agent.py`: many concurrent HTTP/2 requests over TLS to one
//! URL for a fixed time, printing one JSON line with the count, errors, requests/s and
//! latency percentiles. A Python client cannot drive the agent hard enough on two cores.
//! With `--first-byte` the latency is the time to the first body bytes (an event stream's
//! first frame); with `--interval` a JSON line for each window comes first (`tests/bench/soak.py`).
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
    /// Time each request to its first body bytes instead of to its end.
    #[arg(long)]
    first_byte: bool,
    /// Also print a JSON line with the figures of every window of this many seconds.
    #[arg(long)]
    interval: Option<f64>,
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
    let window = Arc::new(Mutex::new(Window::default()));
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
            let (stop, ok, errors, latencies, window) = (
                stop.clone(),
                ok.clone(),
                errors.clone(),
                latencies.clone(),
                window.clone(),
            );
            let first_byte = args.first_byte;
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
                            let mut body = response.into_body();
                            let mut first = None;
                            if first_byte {
                                while let Some(Ok(frame)) = body.frame().await {
                                    if frame.is_data() {
                                        first = Some(started.elapsed());
                                        break;
                                    }
                                }
                            }
                            let read = body.collect().await.is_ok();
                            match (good && read, first_byte) {
                                (true, false) => Some(started.elapsed()),
                                (true, true) => first,
                                (false, _) => None,
                            }
                        }
                        Err(_) => None,
                    };
                    match answered {
                        Some(elapsed) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            let micros = elapsed.as_micros().min(u32::MAX as u128) as u32;
                            mine.push(micros);
                            window.lock().expect("window").record(Some(micros));
                        }
                        None => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            window.lock().expect("window").record(None);
                        }
                    }
                }
                latencies.lock().expect("latencies").extend(mine);
            }));
        }
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    if let Some(interval) = args.interval.filter(|i| *i > 0.0) {
        let mut next = started;
        loop {
            next += Duration::from_secs_f64(interval);
            if next > deadline {
                break;
            }
            tokio::time::sleep_until(next.into()).await;
            let done = std::mem::take(&mut *window.lock().expect("window"));
            println!("{}", done.report(started.elapsed().as_secs_f64(), interval));
        }
    }
    tokio::time::sleep_until(deadline.into()).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for task in tasks {
        let _ = task.await;
    }
    let mut all = latencies.lock().expect("latencies").clone();
    all.sort_unstable();
    let percentile = |p: f64| percentile_ms(&all, p);
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

/// Requests finished in one `--interval` window.
#[derive(Default)]
struct Window {
    micros: Vec<u32>,
    errors: u64,
}

impl Window {
    fn record(&mut self, micros: Option<u32>) {
        match micros {
            Some(micros) => self.micros.push(micros),
            None => self.errors += 1,
        }
    }

    fn report(mut self, at: f64, seconds: f64) -> serde_json::Value {
        self.micros.sort_unstable();
        serde_json::json!({
            "window_end": at,
            "requests": self.micros.len(),
            "errors": self.errors,
            "rps": self.micros.len() as f64 / seconds,
            "p50_ms": percentile_ms(&self.micros, 0.50),
            "p99_ms": percentile_ms(&self.micros, 0.99),
        })
    }
}

/// The `p` percentile of sorted microseconds, in milliseconds (0 when there are none).
fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[index]) / 1000.0
}
