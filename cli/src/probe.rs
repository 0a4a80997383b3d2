//! `xpart probe`: a Converse request through an agent exactly as a caller's SDK sends it
//! (HTTPS to the Bedrock name, the agent's certificate checked against the CA bundle, the
//! bearer token), timed phase by phase: DNS, TCP connect, TLS, first byte, total.
//! `failover watch` and `drill` reuse [`Prober`] for their probe requests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use tokio::net::TcpStream;

use crate::{duration, Error};

/// Where and how to send probe requests; shared by `probe`, `failover watch` and `drill`.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// The Bedrock endpoint callers use. Its host is sent as TLS SNI and Host, and must be
    /// a name in the agent's certificate.
    #[arg(
        long,
        value_name = "URL",
        default_value = "https://bedrock-runtime.us-east-1.amazonaws.com"
    )]
    pub endpoint: String,
    /// Dial this HOST:PORT instead of resolving the endpoint's host (like curl --connect-to).
    #[arg(long, value_name = "HOST:PORT")]
    pub connect: Option<String>,
    /// PEM file with the CA that issued the agent's certificate.
    #[arg(long, env = "AWS_CA_BUNDLE", value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
    /// Bearer token (as a caller's AWS_BEARER_TOKEN_BEDROCK); omit when the agent
    /// authenticates by source address.
    #[arg(long, env = "AWS_BEARER_TOKEN_BEDROCK", hide_env_values = true)]
    pub token: Option<String>,
    /// Model to call: the relay's echo model costs nothing; name a real one to test Bedrock.
    #[arg(long, default_value = "xpart.echo")]
    pub model: String,
    /// The user message to send.
    #[arg(long, default_value = "xpart probe")]
    pub message: String,
    /// Give up on one request after this long.
    #[arg(long, default_value = "5s", value_parser = duration::parse, value_name = "DURATION")]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  xpart probe --ca-bundle ca.pem --token \"$TOKEN\"                      # DNS as callers see it
  xpart probe --connect 127.0.0.1:8443 --endpoint https://bedrock-runtime.us-east-1.amazonaws.com
  xpart probe --model anthropic.claude-3-haiku-20240307-v1:0 --count 10 --interval 500ms --json

Exit 0 when every probe got a Converse answer, 1 when any failed.")]
pub struct ProbeArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Number of probes.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Pause between probes.
    #[arg(long, default_value = "1s", value_parser = duration::parse, value_name = "DURATION")]
    pub interval: Duration,
}

/// Milliseconds spent in each phase of one request; a phase never reached is `None`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub dns_ms: Option<f64>,
    pub connect_ms: Option<f64>,
    pub tls_ms: Option<f64>,
    pub first_byte_ms: Option<f64>,
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeOutcome {
    #[serde(flatten)]
    pub verdict: Verdict,
    pub reply: Option<String>,
    pub request_id: Option<String>,
    pub timings: Timings,
}

impl ProbeOutcome {
    /// A probe that failed before an answer came.
    pub fn failed(phase: &'static str, message: String, timings: Timings) -> ProbeOutcome {
        ProbeOutcome {
            verdict: Verdict {
                ok: false,
                failed_phase: Some(phase),
                status: None,
                error_type: None,
                message: Some(message),
            },
            reply: None,
            request_id: None,
            timings,
        }
    }
}

/// Whether a probe succeeded, and if not, where and with what answer: the part of an outcome
/// that `drill` keeps for each probe.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub ok: bool,
    /// Where it failed: setup, dns, connect, tls, request, response.
    pub failed_phase: Option<&'static str>,
    pub status: Option<u16>,
    /// The code from `x-amzn-ErrorType`, e.g. `AccessDeniedException`.
    pub error_type: Option<String>,
    pub message: Option<String>,
}

impl Verdict {
    /// What went wrong, in a few words: the status and error code when an answer came
    /// (`HTTP 403 AccessDeniedException`), else the phase that failed (`tls failed`).
    pub fn failure(&self) -> String {
        match (self.status, self.error_type.as_deref()) {
            (Some(status), Some(error_type)) => format!("HTTP {status} {error_type}"),
            (Some(status), None) => format!("HTTP {status}"),
            (None, _) => format!("{} failed", self.failed_phase.unwrap_or("request")),
        }
    }
}

/// A probe client with its TLS configuration loaded once.
#[derive(Clone)]
pub struct Prober {
    host: String,
    port: u16,
    connect: Option<String>,
    tls: tokio_rustls::TlsConnector,
    token: Option<String>,
    path: String,
    body: Bytes,
    timeout: Duration,
}

pub async fn run(args: ProbeArgs, json: bool) -> Result<ExitCode, Error> {
    if args.count == 0 {
        return Err(Error::Usage("--count must be at least 1".into()));
    }
    let prober = Prober::new(&args.target)?;
    let mut outcomes = Vec::new();
    for index in 0..args.count {
        if index > 0 {
            tokio::time::sleep(args.interval).await;
        }
        let outcome = prober.probe().await;
        if !json {
            print_outcome(index + 1, &args.target.model, &outcome);
        }
        outcomes.push(outcome);
    }
    let failed = outcomes
        .iter()
        .filter(|outcome| !outcome.verdict.ok)
        .count();
    if json {
        let report = serde_json::json!({
            "endpoint": args.target.endpoint,
            "model": args.target.model,
            "sent": outcomes.len(),
            "failed": failed,
            "probes": outcomes,
        });
        println!("{report}");
    } else if outcomes.len() > 1 {
        print_summary(&outcomes);
    }
    if failed > 0 {
        return Err(Error::CheckFailed(format!(
            "{failed} of {} probes failed",
            outcomes.len()
        )));
    }
    Ok(ExitCode::SUCCESS)
}

impl Prober {
    pub fn new(target: &TargetArgs) -> Result<Prober, Error> {
        let uri: http::Uri = target.endpoint.parse().map_err(|err| {
            Error::Usage(format!(
                "--endpoint {:?} is not a URL: {err}",
                target.endpoint
            ))
        })?;
        if uri.scheme_str() != Some("https") {
            return Err(Error::Usage(format!(
                "--endpoint {:?} must be https:// (callers reach the agent over TLS)",
                target.endpoint
            )));
        }
        let Some(host) = uri.host() else {
            return Err(Error::Usage(format!(
                "--endpoint {:?} has no host",
                target.endpoint
            )));
        };
        let Some(ca_bundle) = &target.ca_bundle else {
            return Err(Error::Usage(
                "pass --ca-bundle FILE (or set AWS_CA_BUNDLE) with the CA that issued the agent's certificate".into(),
            ));
        };
        let tls = tls_connector(ca_bundle)?;
        let body = serde_json::json!({
            "messages": [{ "role": "user", "content": [{ "text": target.message }] }],
            "inferenceConfig": { "maxTokens": 64 },
        });
        Ok(Prober {
            host: host.to_string(),
            port: uri.port_u16().unwrap_or(443),
            connect: target.connect.clone(),
            tls,
            token: target.token.clone(),
            path: format!(
                "/model/{}/converse",
                xpart_bedrock::encode_unreserved(&target.model)
            ),
            body: Bytes::from(body.to_string()),
            timeout: target.timeout,
        })
    }

    /// Never fails: a failure is an outcome, with the phase it happened in.
    pub async fn probe(&self) -> ProbeOutcome {
        let started = Instant::now();
        let mut timings = Timings::default();
        let result = self.exchange(started, &mut timings).await;
        timings.total_ms = millis(started.elapsed());
        match result {
            Ok(answer) => answer.into_outcome(timings),
            Err(failure) => ProbeOutcome::failed(failure.phase, failure.message, timings),
        }
    }

    async fn exchange(&self, started: Instant, timings: &mut Timings) -> Result<Answer, Failure> {
        let deadline = started + self.timeout;

        let phase = Instant::now();
        let address = within(deadline, "dns", self.resolve()).await??;
        timings.dns_ms = Some(millis(phase.elapsed()));

        let phase = Instant::now();
        let tcp = within(deadline, "connect", TcpStream::connect(address))
            .await?
            .map_err(|err| Failure::new("connect", format!("{address}: {err}")))?;
        let _ = tcp.set_nodelay(true);
        timings.connect_ms = Some(millis(phase.elapsed()));

        let phase = Instant::now();
        let server_name = ServerName::try_from(self.host.clone()).map_err(|err| {
            Failure::new(
                "tls",
                format!("{:?} is not a TLS server name: {err}", self.host),
            )
        })?;
        let tls = within(deadline, "tls", self.tls.connect(server_name, tcp))
            .await?
            .map_err(|err| Failure::new("tls", err.to_string()))?;
        timings.tls_ms = Some(millis(phase.elapsed()));

        let phase = Instant::now();
        let (mut sender, connection) = within(
            deadline,
            "request",
            hyper::client::conn::http1::handshake(TokioIo::new(tls)),
        )
        .await?
        .map_err(|err| Failure::new("request", err.to_string()))?;
        tokio::spawn(connection);
        let request = self.request()?;
        let response = within(deadline, "response", sender.send_request(request))
            .await?
            .map_err(|err| Failure::new("response", err.to_string()))?;
        timings.first_byte_ms = Some(millis(phase.elapsed()));

        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_string)
        };
        let error_type = xpart_bedrock::error_code(response.headers()).map(str::to_owned);
        let request_id = header(xpart_bedrock::AMZN_REQUEST_ID_HEADER)
            .or_else(|| header(xpart_bedrock::protocol::REQUEST_ID_HEADER));
        let body = within(deadline, "response", response.into_body().collect())
            .await?
            .map_err(|err| Failure::new("response", err.to_string()))?
            .to_bytes();
        Ok(Answer {
            status,
            error_type,
            request_id,
            body,
        })
    }

    async fn resolve(&self) -> Result<SocketAddr, Failure> {
        let target = match &self.connect {
            Some(connect) => connect.clone(),
            None => format!("{}:{}", self.host, self.port),
        };
        let mut addresses = tokio::net::lookup_host(&target)
            .await
            .map_err(|err| Failure::new("dns", format!("{target}: {err}")))?;
        addresses
            .next()
            .ok_or_else(|| Failure::new("dns", format!("{target}: no addresses")))
    }

    fn request(&self) -> Result<http::Request<Full<Bytes>>, Failure> {
        let authority = if self.port == 443 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut builder = http::Request::builder()
            .method(http::Method::POST)
            .uri(&self.path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "xpart-probe");
        if let Some(token) = &self.token {
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        builder
            .body(Full::new(self.body.clone()))
            .map_err(|err| Failure::new("request", err.to_string()))
    }
}

struct Answer {
    status: u16,
    error_type: Option<String>,
    request_id: Option<String>,
    body: Bytes,
}

impl Answer {
    fn into_outcome(self, timings: Timings) -> ProbeOutcome {
        let json: Option<serde_json::Value> = serde_json::from_slice(&self.body).ok();
        let ok = self.status == 200;
        let reply = ok.then(|| converse_text(json.as_ref())).flatten();
        let message = if ok {
            None
        } else {
            json.as_ref()
                .and_then(|value| value.get("message").or_else(|| value.get("Message")))
                .and_then(|value| value.as_str())
                .map(str::to_string)
                .or_else(|| {
                    Some(
                        String::from_utf8_lossy(&self.body)
                            .chars()
                            .take(200)
                            .collect(),
                    )
                })
        };
        ProbeOutcome {
            verdict: Verdict {
                ok,
                failed_phase: (!ok).then_some("response"),
                status: Some(self.status),
                error_type: self.error_type,
                message,
            },
            reply,
            request_id: self.request_id,
            timings,
        }
    }
}

/// The assistant text of a Converse response: `output.message.content[].text`.
fn converse_text(json: Option<&serde_json::Value>) -> Option<String> {
    let content = json?.pointer("/output/message/content")?.as_array()?;
    let text: Vec<&str> = content
        .iter()
        .filter_map(|block| block.get("text")?.as_str())
        .collect();
    Some(text.join(""))
}

struct Failure {
    phase: &'static str,
    message: String,
}

impl Failure {
    fn new(phase: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            phase,
            message: message.into(),
        }
    }
}

async fn within<F: std::future::Future>(
    deadline: Instant,
    phase: &'static str,
    future: F,
) -> Result<F::Output, Failure> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(remaining, future)
        .await
        .map_err(|_| Failure::new(phase, "timed out"))
}

fn tls_connector(ca_bundle: &std::path::Path) -> Result<tokio_rustls::TlsConnector, Error> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_bundle)
        .map_err(|err| Error::file(ca_bundle, format!("cannot read the CA bundle: {err}")))?
        .collect::<Result<_, _>>()
        .map_err(|err| Error::file(ca_bundle, format!("not a PEM CA bundle: {err}")))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(Error::file(
            ca_bundle,
            "holds no usable CA certificate (expected the ca.pem from `xpart ca init`)",
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| Error::Usage(format!("TLS setup failed: {err}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

fn print_outcome(index: u32, model: &str, outcome: &ProbeOutcome) {
    let t = &outcome.timings;
    let phases = format!(
        "dns {} | connect {} | tls {} | first byte {} | total {:.1} ms",
        phase_ms(t.dns_ms),
        phase_ms(t.connect_ms),
        phase_ms(t.tls_ms),
        phase_ms(t.first_byte_ms),
        t.total_ms
    );
    let verdict = &outcome.verdict;
    if verdict.ok {
        println!(
            "probe {index}: ok {model} replied {:?}",
            outcome.reply.as_deref().unwrap_or("")
        );
    } else {
        let what = verdict.failure();
        println!(
            "probe {index}: FAILED {what}: {}",
            verdict.message.as_deref().unwrap_or("")
        );
    }
    println!("  {phases}");
    if let Some(request_id) = &outcome.request_id {
        println!("  request id {request_id}");
    }
}

fn print_summary(outcomes: &[ProbeOutcome]) {
    let mut totals: Vec<f64> = outcomes
        .iter()
        .filter(|outcome| outcome.verdict.ok)
        .map(|outcome| outcome.timings.total_ms)
        .collect();
    totals.sort_by(f64::total_cmp);
    let failed = outcomes.len() - totals.len();
    print!("{} sent, {failed} failed", outcomes.len());
    if let (Some(min), Some(max)) = (totals.first(), totals.last()) {
        let median = totals[totals.len() / 2];
        print!("; total ms min {min:.1} / median {median:.1} / max {max:.1}");
    }
    println!();
}

fn phase_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |ms| format!("{ms:.1}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converse_text_joins_the_text_blocks() {
        let body = serde_json::json!({
            "output": { "message": { "role": "assistant", "content": [{ "text": "hel" }, { "text": "lo" }] } },
            "stopReason": "end_turn",
        });
        assert_eq!(converse_text(Some(&body)).as_deref(), Some("hello"));
        assert_eq!(converse_text(Some(&serde_json::json!({}))), None);
    }
}
