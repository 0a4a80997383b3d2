//! The agent's `GET /` on the admin port: readiness, relays, tunnel peers, request and error
//! rates, today's top principals and the budgets nearest their limit (from `/status.usage`),
//! and the last failed requests. Served and secured by `xpart_daemon::status_page`; this
//! module only says what to show.

use serde_json::Value;
use xpart_daemon::status_page::StatusPage;

/// The page for the agent's `/status` JSON.
pub const PAGE: StatusPage = StatusPage::new("xpart agent", summary, SCRIPT);

/// What the page says before its script runs: readiness and each relay's state.
fn summary(status: &Value) -> Vec<(String, String)> {
    let ready = match status["ready"].as_bool() {
        Some(true) => "ready",
        Some(false) => "not ready",
        None => "unknown",
    };
    let mut lines = vec![
        ("readiness".to_owned(), ready.to_owned()),
        (
            "version".to_owned(),
            status["version"].as_str().unwrap_or("?").to_owned(),
        ),
    ];
    for relay in status["relays"].as_array().into_iter().flatten() {
        lines.push((
            format!("relay {}", relay["name"].as_str().unwrap_or("?")),
            relay["state"].as_str().unwrap_or("?").to_owned(),
        ));
    }
    lines
}

/// `render(status, rates)` for the agent's `/status`.
const SCRIPT: &str = r#"
function stateKind(state) {
  return state === "healthy" ? "good" : state === "down" ? "bad" : "warn";
}
function relaysSection(relays) {
  if (!relays || relays.length === 0) return section("Relays", empty("no relay configured"));
  return section("Relays", table(
    ["relay", "address", "state", "in state for", "last good probe", "failures", "last error"],
    relays.map((r) => [
      el("span", null, r.name, r.active ? " " : null, r.active ? badge("active", "good") : null),
      r.service_addr || "—", badge(r.state, stateKind(r.state)), age(r.state_age_seconds),
      r.last_success_age_seconds === null || r.last_success_age_seconds === undefined
        ? "never" : age(r.last_success_age_seconds) + " ago",
      count(r.consecutive_failures), r.last_error || "—"]),
    [5]));
}
function tokens(p) {
  return (p.input_tokens || 0) + (p.output_tokens || 0);
}
function topPrincipalsSection(usage) {
  const title = "Top principals today" + (usage && usage.day ? " (" + usage.day + ", UTC)" : "");
  const used = ((usage && usage.principals) || []).filter((p) => p.requests > 0);
  if (used.length === 0) return section(title, empty("no usage yet"));
  const top = used.sort((a, b) =>
    (b.requests - a.requests) || (tokens(b) - tokens(a))).slice(0, 10);
  return section(title, table(
    ["principal", "requests", "errors", "input tokens", "output tokens", "tokens", "cache read", "cache write"],
    top.map((p) => [p.principal, count(p.requests), count(p.errors), count(p.input_tokens),
      count(p.output_tokens), count(tokens(p)), count(p.cache_read_tokens), count(p.cache_write_tokens)]),
    [1, 2, 3, 4, 5, 6, 7]));
}
function budgetsSection(usage) {
  const budgets = [];
  for (const p of (usage && usage.principals) || []) {
    for (const [name, budget] of [["tokens per minute", p.tokens_per_minute], ["tokens per day", p.tokens_per_day]]) {
      if (budget && budget.limit > 0) budgets.push({ principal: p.principal, name, used: budget.used, limit: budget.limit });
    }
  }
  if (budgets.length === 0) return section("Budgets nearest their limit", empty(usage ? "no token budget configured" : "no usage yet"));
  budgets.sort((a, b) => b.used / b.limit - a.used / a.limit);
  return section("Budgets nearest their limit", table(["principal", "budget", "used", "limit", "share"],
    budgets.slice(0, 10).map((b) => {
      const share = b.used / b.limit;
      const fill = el("span");
      fill.style.width = Math.min(100, share * 100).toFixed(1) + "%";
      const bar = el("span", "bar" + (share >= 0.9 ? " high" : share >= 0.7 ? " mid" : ""), fill);
      return [b.principal, b.name, count(b.used), count(b.limit),
        el("span", null, bar, " " + (share * 100).toFixed(0) + "%")];
    }), [2, 3]));
}
function render(s, r) {
  const ready = badge(s.ready ? "ready" : "not ready", s.ready ? "good" : "bad");
  const summary = document.getElementById("summary");
  summary.replaceChildren(
    el("li", null, ready),
    el("li", null, el("span", "k", "version"), " " + s.version),
    el("li", null, el("span", "k", "up"), " " + age(s.uptime_seconds)),
    el("li", null, el("span", "k", "active relay"), " " + (s.active_relay || "none")),
    el("li", null, el("span", "k", "front"), " " + s.front),
    el("li", null, el("span", "k", "tunnel"), " " + ((s.tunnel && s.tunnel.mode) || "—")),
    el("li", null, el("span", "k", "audit lines"), " " + count(s.audit && s.audit.written) +
      " written, " + count(s.audit && s.audit.dropped) + " dropped"));
  return [
    relaysSection(s.relays),
    section("Tunnel peers", peersTable(s.tunnel && s.tunnel.peers)),
    trafficSection(s.activity, r),
    topPrincipalsSection(s.usage),
    budgetsSection(s.usage),
    section("Last refusals and errors", failuresTable(s.activity && s.activity.recent_failures,
      { title: "relay", cell: (f) => f.relay || "—" })),
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
    async fn the_page_embeds_the_status_and_escapes_what_it_renders_itself() {
        let status = json!({
            "ready": false,
            "version": "0.1.0",
            "relays": [{"name": "relay-<a>", "state": "down"}],
            "activity": {"requests": 1, "errors": 1, "recent_failures": [
                {"principal": "</script><script>alert(1)</script>", "status": 403}
            ]},
        });
        let response = xpart_daemon::status_page::respond(&PAGE, &status);
        assert_eq!(response.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
        let policy = response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(policy.contains("default-src 'none'"), "{policy}");
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(html.contains("relay relay-&lt;a&gt;</span> down"), "{html}");
        assert!(html.contains("not ready"), "{html}");
        assert!(!html.contains("</script><script>alert"), "{html}");
        assert!(html.contains("\\u003c/script\\u003e"), "{html}");
        assert!(html.contains("function relaysSection"), "{html}");
    }
}
