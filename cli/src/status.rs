//! `xpart status`: reads the agent's and relay's admin ports (`/status`, `/readyz`,
//! `/metrics`) and shows tunnel peers with handshake ages (both daemons' `tunnel.peers`), the tunnel's drops by reason, relay
//! health, and request rates and errors (from two `/metrics` scrapes a window apart).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::admin::{AdminError, AdminUrl};
use crate::{duration, files, Error};

const AGENT_DEFAULT_ADMIN: &str = "127.0.0.1:9100";

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  xpart status                                   # the local agent's admin port, 127.0.0.1:9100
  xpart status --agent 127.0.0.1:9100 --relay 10.1.0.5:9101 --relay 10.2.0.5:9101
  xpart status --config /etc/xpart/agent.toml --json

Exit 0 when every daemon answers and is ready, 1 otherwise.")]
pub struct StatusArgs {
    /// An agent's admin address (repeatable).
    #[arg(long = "agent", value_name = "URL")]
    agents: Vec<String>,
    /// A relay's admin address (repeatable).
    #[arg(long = "relay", value_name = "URL")]
    relays: Vec<String>,
    /// Take the admin address from this agent.toml or relay.toml's [admin] listen.
    #[arg(long = "config", value_name = "FILE")]
    configs: Vec<PathBuf>,
    /// Time between the two /metrics scrapes that give request rates; 0 shows totals only.
    #[arg(long, default_value = "1s", value_parser = duration::parse, value_name = "DURATION")]
    window: Duration,
    /// Give up on an admin port after this long.
    #[arg(long, default_value = "3s", value_parser = duration::parse, value_name = "DURATION")]
    timeout: Duration,
}

#[derive(Debug, Serialize)]
struct DaemonReport {
    url: String,
    service: Option<String>,
    reachable: bool,
    ready: bool,
    error: Option<String>,
    readiness: Option<Value>,
    /// What a ready daemon wants known about its readiness (the relay's "echo only").
    note: Option<String>,
    peers: Vec<PeerReport>,
    /// Drops by reason, non-zero ones only; `None` when the daemon has no tunnel.
    tunnel_dropped: Option<BTreeMap<String, u64>>,
    relays: Vec<Value>,
    requests: Option<RequestReport>,
    status: Option<Value>,
}

#[derive(Debug, Serialize)]
struct PeerReport {
    name: String,
    endpoint: Option<String>,
    handshake_age_s: Option<f64>,
    rx_bytes: Option<u64>,
    tx_bytes: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
struct RequestReport {
    total: u64,
    errors: u64,
    per_second: Option<f64>,
    errors_per_second: Option<f64>,
}

pub async fn run(args: StatusArgs, json: bool) -> Result<ExitCode, Error> {
    let mut targets = Vec::new();
    for text in args.agents.iter().chain(&args.relays) {
        targets.push(AdminUrl::parse(text)?);
    }
    for config in &args.configs {
        targets.push(admin_from_config(config)?);
    }
    if targets.is_empty() {
        targets.push(AdminUrl::parse(AGENT_DEFAULT_ADMIN)?);
    }

    let mut first_scrapes = Vec::new();
    for target in &targets {
        first_scrapes.push(scrape_requests(target, args.timeout).await);
    }
    if !args.window.is_zero() {
        tokio::time::sleep(args.window).await;
    }
    let mut reports = Vec::new();
    for (target, first) in targets.iter().zip(first_scrapes) {
        reports.push(daemon_report(target, first, &args).await);
    }

    if json {
        println!("{}", serde_json::json!({ "daemons": reports }));
    } else {
        for report in &reports {
            print_report(report);
        }
    }
    let unhealthy = reports.iter().filter(|report| !report.ready).count();
    if unhealthy > 0 {
        return Err(Error::CheckFailed(format!(
            "{unhealthy} of {} daemon(s) unreachable or not ready",
            reports.len()
        )));
    }
    Ok(ExitCode::SUCCESS)
}

fn admin_from_config(path: &PathBuf) -> Result<AdminUrl, Error> {
    let text = files::read_text(path, "an agent.toml or relay.toml")?;
    let table: toml::Table = text
        .parse()
        .map_err(|err| Error::file(path, format!("not TOML: {err}")))?;
    let listen = table
        .get("admin")
        .and_then(|admin| admin.get("listen"))
        .and_then(|listen| listen.as_str());
    let is_agent = table.contains_key("relay") || table.contains_key("front");
    match (listen, is_agent) {
        (Some(listen), _) => AdminUrl::parse(listen)
            .map_err(|err| Error::file(path, format!("[admin].listen: {err}"))),
        (None, true) => Ok(AdminUrl::parse(AGENT_DEFAULT_ADMIN)?),
        (None, false) => Err(Error::file(
            path,
            "has no [admin] listen, so the relay serves no admin port; add one or pass --relay URL",
        )),
    }
}

async fn daemon_report(
    target: &AdminUrl,
    first: Result<RequestReport, ScrapeError>,
    args: &StatusArgs,
) -> DaemonReport {
    let url = target.url("");
    let status = fetch(target, "/status", args.timeout)
        .await
        .and_then(|body| {
            serde_json::from_slice::<Value>(&body).map_err(|source| ScrapeError::NotJson {
                path: "/status",
                source,
            })
        });
    let status = match status {
        Ok(status) => status,
        Err(error) => {
            return DaemonReport {
                url,
                service: None,
                reachable: false,
                ready: false,
                error: Some(error.to_string()),
                readiness: None,
                note: None,
                peers: Vec::new(),
                tunnel_dropped: None,
                relays: Vec::new(),
                requests: None,
                status: None,
            }
        }
    };
    let (ready, readiness) = match target.get("/readyz", args.timeout).await {
        Ok(response) => (
            response.status == 200,
            serde_json::from_slice::<Value>(&response.body).ok(),
        ),
        Err(_) => (false, None),
    };
    let requests = match (first, args.window.is_zero()) {
        (Ok(first), true) => Some(first),
        (Ok(first), false) => scrape_requests(target, args.timeout)
            .await
            .ok()
            .map(|second| with_rates(first, second, args.window)),
        (Err(_), _) => None,
    };
    let service = status
        .get("service")
        .and_then(Value::as_str)
        .map(str::to_string);
    let note = readiness
        .as_ref()
        .and_then(|readiness| readiness.get("note"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let peers = peer_reports(&status);
    let tunnel_dropped = tunnel_dropped(&status);
    let relays = status
        .get("relays")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    DaemonReport {
        url,
        service,
        reachable: true,
        ready,
        error: None,
        readiness,
        note,
        peers,
        tunnel_dropped,
        relays,
        requests,
        status: Some(status),
    }
}

/// `/tunnel/peers` in either daemon's `/status`; the handshake age is the daemon's own
/// (`handshake_age_seconds`), so this host's clock does not enter into it.
fn peer_reports(status: &Value) -> Vec<PeerReport> {
    let Some(peers) = status.pointer("/tunnel/peers").and_then(Value::as_array) else {
        return Vec::new();
    };
    peers
        .iter()
        .map(|peer| PeerReport {
            name: peer
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
            endpoint: peer
                .get("endpoint")
                .and_then(Value::as_str)
                .map(str::to_string),
            handshake_age_s: peer
                .get("handshake_age_seconds")
                .and_then(Value::as_f64)
                .map(|age| (age.max(0.0) * 10.0).round() / 10.0),
            rx_bytes: peer.get("rx_bytes").and_then(Value::as_u64),
            tx_bytes: peer.get("tx_bytes").and_then(Value::as_u64),
        })
        .collect()
}

/// `fips_mode`, `fips_module` and `tunnel.inner_tls` in either daemon's `/status`, in one line;
/// `None` from a daemon that reports none of them.
fn crypto_line(status: &Value) -> Option<String> {
    let fips = status.get("fips_mode").and_then(Value::as_bool);
    let inner_tls = status.pointer("/tunnel/inner_tls").and_then(Value::as_bool);
    if fips.is_none() && inner_tls.is_none() {
        return None;
    }
    let module = status
        .pointer("/fips_module/version")
        .and_then(Value::as_str);
    let certificate = status
        .pointer("/fips_module/certificate")
        .and_then(Value::as_str);
    let fips = match (fips, module, certificate) {
        (Some(true), Some(module), Some(certificate)) => {
            format!("FIPS mode ({module}, FIPS 140-3 certificate {certificate}, on every TLS hop)")
        }
        (Some(true), Some(module), None) => format!(
            "FIPS mode ({module} on every TLS hop; no FIPS 140-3 certificate names this version)"
        ),
        (Some(true), None, _) => "FIPS mode (AWS-LC FIPS module on every TLS hop)".to_string(),
        (Some(false) | None, _, _) => "not FIPS mode".to_string(),
    };
    let inner_tls = match inner_tls {
        Some(true) => "inner TLS on",
        Some(false) | None => "inner TLS off",
    };
    Some(format!("crypto: {fips}, {inner_tls}"))
}

/// `/tunnel/dropped` in either daemon's `/status`: the reasons with drops, by name.
fn tunnel_dropped(status: &Value) -> Option<BTreeMap<String, u64>> {
    let dropped = status.pointer("/tunnel/dropped")?.as_object()?;
    Some(
        dropped
            .iter()
            .filter_map(|(reason, count)| Some((reason.clone(), count.as_u64()?)))
            .filter(|(_, count)| *count > 0)
            .collect(),
    )
}

/// Why a daemon's admin page could not be read.
#[derive(Debug, thiserror::Error)]
enum ScrapeError {
    #[error(transparent)]
    Unreachable(#[from] AdminError),
    #[error("{path} answered HTTP {status}")]
    Status { path: &'static str, status: u16 },
    #[error("{path} is not JSON: {source}")]
    NotJson {
        path: &'static str,
        source: serde_json::Error,
    },
}

/// The body of admin page `path`, which must answer 200.
async fn fetch(
    target: &AdminUrl,
    path: &'static str,
    timeout: Duration,
) -> Result<bytes::Bytes, ScrapeError> {
    let response = target.get(path, timeout).await?;
    if response.status != 200 {
        return Err(ScrapeError::Status {
            path,
            status: response.status,
        });
    }
    Ok(response.body)
}

async fn scrape_requests(
    target: &AdminUrl,
    timeout: Duration,
) -> Result<RequestReport, ScrapeError> {
    let body = fetch(target, "/metrics", timeout).await?;
    Ok(count_requests(&String::from_utf8_lossy(&body)))
}

/// Sums every `xpart_*_requests_total` sample; a `status` label of 400 or more is an error.
fn count_requests(metrics: &str) -> RequestReport {
    let mut report = RequestReport::default();
    for line in metrics.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or_default();
        if !(name.starts_with("xpart_") && name.ends_with("_requests_total")) {
            continue;
        }
        let Ok(count) = value.trim().parse::<f64>() else {
            continue;
        };
        let count = count as u64;
        report.total += count;
        if status_label(series).is_some_and(|status| status >= 400) {
            report.errors += count;
        }
    }
    report
}

fn status_label(series: &str) -> Option<u16> {
    let labels = series.split_once('{')?.1;
    let start = labels.find("status=\"")? + "status=\"".len();
    let rest = &labels[start..];
    rest[..rest.find('"')?].parse().ok()
}

fn with_rates(first: RequestReport, second: RequestReport, window: Duration) -> RequestReport {
    let seconds = window.as_secs_f64();
    let rate = |later: u64, earlier: u64| {
        (((later.saturating_sub(earlier)) as f64 / seconds) * 100.0).round() / 100.0
    };
    RequestReport {
        total: second.total,
        errors: second.errors,
        per_second: Some(rate(second.total, first.total)),
        errors_per_second: Some(rate(second.errors, first.errors)),
    }
}

fn print_report(report: &DaemonReport) {
    let service = report.service.as_deref().unwrap_or("daemon");
    if !report.reachable {
        println!(
            "{service} {}: UNREACHABLE ({})",
            report.url,
            report.error.as_deref().unwrap_or("no answer")
        );
        println!();
        return;
    }
    let readiness = if report.ready { "ready" } else { "NOT READY" };
    println!("{service} {}: {readiness}", report.url);
    if let Some(line) = report.status.as_ref().and_then(crypto_line) {
        println!("  {line}");
    }
    if !report.ready {
        if let Some(reason) = report
            .readiness
            .as_ref()
            .and_then(|readiness| readiness.get("reason"))
            .and_then(Value::as_str)
        {
            println!("  reason: {reason}");
        }
    }
    if let Some(note) = &report.note {
        println!("  note: {note}");
    }
    if let Some(status) = &report.status {
        if let Some(draining) = status.get("draining").and_then(Value::as_bool) {
            println!("  draining: {}", if draining { "yes" } else { "no" });
        }
        if let Some(active) = status.get("active_relay").and_then(Value::as_str) {
            println!("  active relay: {active}");
        }
    }
    if !report.relays.is_empty() {
        println!(
            "  {:<16} {:<8} {:<7} {:>8}  last error",
            "RELAY", "STATE", "ACTIVE", "FAILURES"
        );
        for relay in &report.relays {
            let text = |key: &str| {
                relay
                    .get(key)
                    .and_then(Value::as_str)
                    .unwrap_or("-")
                    .to_string()
            };
            let active = relay
                .get("active")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let failures = relay
                .get("consecutive_failures")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            println!(
                "  {:<16} {:<8} {:<7} {:>8}  {}",
                text("name"),
                text("state"),
                if active { "yes" } else { "" },
                failures,
                text("last_error")
            );
        }
    }
    if !report.peers.is_empty() {
        println!(
            "  {:<16} {:<22} {:>14} {:>12} {:>12}",
            "PEER", "ENDPOINT", "HANDSHAKE AGO", "RX BYTES", "TX BYTES"
        );
        for peer in &report.peers {
            let age = peer
                .handshake_age_s
                .map_or_else(|| "never".to_string(), |age| format!("{age:.1}s"));
            let bytes =
                |value: Option<u64>| value.map_or_else(|| "-".to_string(), |v| v.to_string());
            println!(
                "  {:<16} {:<22} {:>14} {:>12} {:>12}",
                peer.name,
                peer.endpoint.as_deref().unwrap_or("-"),
                age,
                bytes(peer.rx_bytes),
                bytes(peer.tx_bytes)
            );
        }
    }
    if let Some(dropped) = &report.tunnel_dropped {
        println!("  tunnel drops: {}", drops_line(dropped));
    }
    if let Some(requests) = report.requests {
        print!(
            "  requests: {} total, {} errors",
            requests.total, requests.errors
        );
        if let (Some(rate), Some(errors)) = (requests.per_second, requests.errors_per_second) {
            print!("; now {rate:.2}/s, {errors:.2} errors/s");
        }
        println!();
    }
    println!();
}

/// `2900 under_load, 3 garbage`, largest first; `none` when nothing was dropped.
fn drops_line(dropped: &BTreeMap<String, u64>) -> String {
    if dropped.is_empty() {
        return "none".to_string();
    }
    let mut counts: Vec<(&String, &u64)> = dropped.iter().collect();
    counts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    counts
        .iter()
        .map(|(reason, count)| format!("{count} {reason}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crypto_line_says_fips_mode_and_inner_tls() {
        let fips = serde_json::json!({ "fips_mode": true, "tunnel": { "inner_tls": true } });
        assert_eq!(
            crypto_line(&fips).as_deref(),
            Some("crypto: FIPS mode (AWS-LC FIPS module on every TLS hop), inner TLS on")
        );
        let plain = serde_json::json!({ "fips_mode": false, "tunnel": { "inner_tls": false } });
        assert_eq!(
            crypto_line(&plain).as_deref(),
            Some("crypto: not FIPS mode, inner TLS off")
        );
        assert_eq!(crypto_line(&serde_json::json!({ "tunnel": {} })), None);
    }

    #[test]
    fn the_crypto_line_names_the_module_and_its_certificate_or_says_it_has_none() {
        let certified = serde_json::json!({
            "fips_mode": true,
            "fips_module": { "version": "AWS-LC FIPS 3.1.0", "certificate": "#5314" },
            "tunnel": { "inner_tls": true },
        });
        assert_eq!(
            crypto_line(&certified).as_deref(),
            Some("crypto: FIPS mode (AWS-LC FIPS 3.1.0, FIPS 140-3 certificate #5314, on every TLS hop), inner TLS on")
        );
        let uncertified = serde_json::json!({
            "fips_mode": true,
            "fips_module": { "version": "AWS-LC FIPS 4.2.0", "certificate": null },
            "tunnel": { "inner_tls": true },
        });
        assert_eq!(
            crypto_line(&uncertified).as_deref(),
            Some("crypto: FIPS mode (AWS-LC FIPS 4.2.0 on every TLS hop; no FIPS 140-3 certificate names this version), inner TLS on")
        );
    }

    const METRICS: &str = "\
# HELP xpart_agent_requests_total Bedrock requests handled
# TYPE xpart_agent_requests_total counter
xpart_agent_requests_total{model=\"xpart.echo\",operation=\"Converse\",principal=\"p\",status=\"200\"} 7
xpart_agent_requests_total{model=\"xpart.echo\",operation=\"Converse\",principal=\"p\",status=\"403\"} 2
xpart_agent_requests_total{model=\"m\",operation=\"Converse\",principal=\"p\",status=\"503\"} 1
xpart_agent_request_duration_seconds_count 10
xpart_tunnel_peer_bytes_total{direction=\"rx\",peer=\"relay-a\"} 1234
";

    #[test]
    fn counts_requests_and_errors_by_status_label() {
        let report = count_requests(METRICS);
        assert_eq!(report.total, 10);
        assert_eq!(report.errors, 3);
    }

    #[test]
    fn rates_come_from_the_difference_over_the_window() {
        let first = RequestReport {
            total: 10,
            errors: 3,
            ..Default::default()
        };
        let second = RequestReport {
            total: 30,
            errors: 4,
            ..Default::default()
        };
        let report = with_rates(first, second, Duration::from_secs(2));
        assert_eq!(report.per_second, Some(10.0));
        assert_eq!(report.errors_per_second, Some(0.5));
    }

    #[test]
    fn tunnel_drops_are_read_from_either_daemon_and_shown_largest_first() {
        let agent = serde_json::json!({
            "tunnel": { "peers": [], "dropped": { "garbage": 3, "under_load": 2900, "replay": 0 } }
        });
        let dropped = tunnel_dropped(&agent).unwrap();
        assert_eq!(
            dropped,
            BTreeMap::from([("garbage".to_string(), 3), ("under_load".to_string(), 2900)])
        );
        assert_eq!(drops_line(&dropped), "2900 under_load, 3 garbage");
        let quiet = serde_json::json!({ "peers": [], "tunnel": { "dropped": { "garbage": 0 } } });
        assert_eq!(drops_line(&tunnel_dropped(&quiet).unwrap()), "none");
        let host_mode = serde_json::json!({ "tunnel": { "dropped": null } });
        assert_eq!(tunnel_dropped(&host_mode), None);
    }

    #[test]
    fn peers_and_their_handshake_ages_are_read_from_either_daemons_tunnel_object() {
        let status = serde_json::json!({
            "tunnel": { "peers": [
                { "name": "agent-a", "endpoint": "127.0.0.1:5", "handshake_age_seconds": 30.04, "rx_bytes": 1, "tx_bytes": 2 },
                { "name": "agent-b", "endpoint": null, "last_handshake": null, "handshake_age_seconds": null }
            ] }
        });
        let peers = peer_reports(&status);
        assert_eq!(peers[0].handshake_age_s, Some(30.0));
        assert_eq!(peers[0].rx_bytes, Some(1));
        assert_eq!(peers[0].endpoint.as_deref(), Some("127.0.0.1:5"));
        assert_eq!(peers[1].handshake_age_s, None);
        assert_eq!(peers[1].name, "agent-b");
        assert!(peer_reports(&serde_json::json!({ "tunnel": { "dropped": null } })).is_empty());
    }
}
