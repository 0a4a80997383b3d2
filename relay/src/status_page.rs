//! The relay's `GET /` on the admin port: readiness, the policy it signs under, its AWS
//! credentials and when they expire, the agents (tunnel peers), request and error rates, and
//! the last failed requests, Bedrock's answers and the relay's own refusals. Served and
//! secured by `xpart_daemon::status_page`; this module only says what to show.

use serde_json::Value;
use xpart_daemon::status_page::StatusPage;

/// The page for the relay's `/status` JSON.
pub const PAGE: StatusPage = StatusPage::new("xpart relay", summary, SCRIPT);

/// What the page says before its script runs.
fn summary(status: &Value) -> Vec<(String, String)> {
    let ready = match status["ready"].as_bool() {
        Some(true) => "ready".to_owned(),
        Some(false) => format!(
            "not ready: {}",
            status["not_ready_reason"].as_str().unwrap_or("unknown")
        ),
        None => "unknown".to_owned(),
    };
    let credentials = match status["credentials"]["available"].as_bool() {
        Some(true) => "available",
        Some(false) => "missing",
        None => "unknown",
    };
    let text = |field: &str| status[field].as_str().unwrap_or("?").to_owned();
    vec![
        ("readiness".to_owned(), ready),
        ("version".to_owned(), text("version")),
        ("region".to_owned(), text("region")),
        ("credentials".to_owned(), credentials.to_owned()),
    ]
}

/// `render(status, rates)` for the relay's `/status`.
const SCRIPT: &str = r#"
function list(values) {
  return values && values.length > 0 ? values.join(", ") : "(none)";
}
function credentialsSection(c) {
  if (!c) return section("AWS credentials", empty("unknown"));
  if (!c.available) return section("AWS credentials", el("p", null, badge("missing", "bad"), " " + (c.reason || "")));
  let expiry = "no expiry (static keys)";
  if (c.expires_at !== null && c.expires_at !== undefined) {
    expiry = "expire " + new Date(c.expires_at * 1000).toISOString() +
      (c.expires_in_seconds !== null && c.expires_in_seconds !== undefined ? ", in " + age(c.expires_in_seconds) : "");
  }
  const soon = c.expires_in_seconds !== null && c.expires_in_seconds !== undefined && c.expires_in_seconds < 900;
  return section("AWS credentials", el("p", null, badge(soon ? "expiring" : "available", soon ? "warn" : "good"), " " + expiry));
}
function policySection(p) {
  if (!p) return section("Policy", empty("unknown"));
  return section("Policy", table(["setting", "allowed"], [
    ["agents", list((p.agents || []).map((a) => a.name + " (" + a.tunnel_address + ")"))],
    ["operations", list(p.operations)],
    ["models", list(p.models)],
    ["guardrails", list(p.guardrails)],
    ["service tiers", list(p.service_tiers)],
    ["performance latency", list(p.performance_latency)],
    ["trace", list(p.trace)],
  ]));
}
function render(s, r) {
  const summary = document.getElementById("summary");
  summary.replaceChildren(
    el("li", null, badge(s.ready ? "ready" : "not ready", s.ready ? "good" : "bad"),
      s.ready ? null : " " + (s.not_ready_reason || "")),
    el("li", null, el("span", "k", "version"), " " + s.version),
    el("li", null, el("span", "k", "up"), " " + age(s.uptime_seconds)),
    el("li", null, el("span", "k", "region"), " " + s.region),
    el("li", null, el("span", "k", "upstream"), " " + s.upstream),
    el("li", null, el("span", "k", "echo model"), " " + (s.echo_model || "off")),
    ...(s.draining ? [el("li", null, badge("draining", "warn"))] : []));
  return [
    credentialsSection(s.credentials),
    policySection(s.policy),
    section("Agents", peersTable(s.tunnel && s.tunnel.peers)),
    trafficSection(s.activity, r),
    section("Last upstream errors and refusals", failuresTable(s.activity && s.activity.recent_failures,
      { title: "from", cell: (f) => f.upstream_answered ? "Bedrock" : "relay" })),
  ];
}
"#;

#[cfg(test)]
mod tests {
    use http::header::CONTENT_TYPE;
    use http_body_util::BodyExt;
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn the_page_says_why_the_relay_is_not_ready_escaped() {
        let status = json!({
            "ready": false,
            "not_ready_reason": "no AWS credentials: <imds> timed out",
            "version": "0.1.0",
            "region": "us-east-1",
            "credentials": {"available": false, "reason": "<imds> timed out"},
        });
        let response = xpart_daemon::status_page::respond(&PAGE, &status);
        assert_eq!(response.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        let policy = response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(policy.contains("default-src 'none'"), "{policy}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            html.contains("not ready: no AWS credentials: &lt;imds&gt; timed out"),
            "{html}"
        );
        assert!(
            html.contains("<span class=\"k\">credentials</span> missing"),
            "{html}"
        );
        assert!(!html.contains("<imds>"), "{html}");
        assert!(html.contains("function policySection"), "{html}");
    }
}
