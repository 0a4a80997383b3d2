//! The admin port's `GET /` page, shared by both daemons: one self-contained HTML document
//! (inline style and script, no external asset, so it works inside a VPC with no way out)
//! that renders the daemon's `/status` JSON and fetches it again every few seconds.
//!
//! The first `/status` is embedded in the page as a JSON data block, so the page shows the
//! daemon's state on first paint; the script renders it and every later fetch the same way,
//! building the DOM with `textContent` and never `innerHTML`, so no caller-controlled string
//! (a principal name, an error message) is ever parsed as markup. The few values rendered on
//! the server (the summary shown even without script) go through [`escape_html`], and the
//! embedded JSON through [`script_json`].
//!
//! The response forbids every load but the page's own `/status` fetch:
//! `Content-Security-Policy` with `default-src 'none'`, `connect-src 'self'`, and the inline
//! script and style allowed by a nonce that is fresh for each response. A nonce rather than
//! `'unsafe-inline'`: an element injected into the page, should an escaping mistake ever let
//! one through, cannot know the nonce and so does not run.
//!
//! [`Activity`] is what the pages show that `/metrics` cannot give them: request and error
//! totals to turn into rates between two refreshes, and the last failed requests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use base64::Engine;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS};
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use crate::audit::{AuditRecord, MAX_MESSAGE_CHARS};

/// How many failed requests [`Activity`] keeps for the page.
pub const RECENT_FAILURES: usize = 20;

/// Seconds between two fetches of `/status` by the page.
pub const REFRESH_SECONDS: u32 = 5;

/// What a daemon's `GET /` page shows of its `/status`.
pub struct StatusPage {
    /// The document's title and heading (`xpart agent`).
    pub title: &'static str,
    /// A few `name: value` lines drawn from `/status` on the server, shown even with script
    /// off.
    pub summary: fn(&Value) -> Vec<(String, String)>,
    /// Defines `render(status, rates)` for this daemon's `/status` (see [`COMMON_SCRIPT`]).
    pub script: &'static str,
}

impl StatusPage {
    pub const fn new(
        title: &'static str,
        summary: fn(&Value) -> Vec<(String, String)>,
        script: &'static str,
    ) -> StatusPage {
        StatusPage {
            title,
            summary,
            script,
        }
    }
}

/// The `GET /` response for `status` (the daemon's `/status`, embedded so the page renders it
/// at once): `text/html`, the page's security headers, never cached.
pub fn respond(page: &StatusPage, status: &Value) -> Response<Full<Bytes>> {
    let nonce = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 18]>());
    let body = render(page, status, &nonce);
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // The nonce is base64: always a valid header value.
    if let Ok(policy) = HeaderValue::from_str(&content_security_policy(&nonce)) {
        headers.insert(CONTENT_SECURITY_POLICY, policy);
    }
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

const CONTENT_SECURITY_POLICY: HeaderName = HeaderName::from_static("content-security-policy");
const REFERRER_POLICY: HeaderName = HeaderName::from_static("referrer-policy");

/// Nothing loads but the page's own inline script and style (by `nonce`), the `/status` fetch
/// and the empty `data:` favicon (which keeps browsers from asking for `/favicon.ico`).
pub fn content_security_policy(nonce: &str) -> String {
    format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// `text` as HTML text or a quoted attribute value: the five characters that can end either
/// one become character references.
pub fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// `value` as JSON that can sit inside a `<script>` element: no `<`, `>` or `&` (so no
/// `</script>` or `<!--` can end or change the element), and no U+2028/U+2029. Each becomes
/// JSON's own `\uXXXX` escape (the five occur only inside strings, where the escape is valid),
/// so `JSON.parse` reads the same value back.
pub fn script_json(value: &Value) -> String {
    let text = value.to_string();
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                escaped.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            other => escaped.push(other),
        }
    }
    escaped
}

fn render(page: &StatusPage, status: &Value, nonce: &str) -> String {
    let title = escape_html(page.title);
    let summary: String = (page.summary)(status)
        .iter()
        .map(|(name, value)| {
            format!(
                "<li><span class=\"k\">{}</span> {}</li>",
                escape_html(name),
                escape_html(value)
            )
        })
        .collect();
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><link rel=\"icon\" href=\"data:,\">\
         <style nonce=\"{nonce}\">{COMMON_STYLE}</style></head>\n<body>\
         <header><h1>{title}</h1><span id=\"updated\" class=\"muted\"></span></header>\
         <ul id=\"summary\" class=\"summary\">{summary}</ul>\
         <noscript><p>This page refreshes with script; without it, <a href=\"status\">status</a> \
         has the same data as JSON.</p></noscript>\
         <main id=\"main\"></main>\
         <script type=\"application/json\" id=\"initial-status\">{initial}</script>\
         <script nonce=\"{nonce}\">const REFRESH_MS = {refresh};\n{COMMON_SCRIPT}\n{script}\nstart();</script>\
         </body></html>\n",
        initial = script_json(status),
        refresh = REFRESH_SECONDS * 1000,
        script = page.script,
    )
}

/// Requests a daemon finished, and the last ones that failed.
#[derive(Debug, Default)]
pub struct Activity {
    requests: AtomicU64,
    errors: AtomicU64,
    recent: Mutex<VecDeque<Value>>,
}

impl Activity {
    pub fn new() -> Activity {
        Activity::default()
    }

    /// Count a finished request; one answered 400 or above joins the recent failures, the
    /// oldest leaving once there are [`RECENT_FAILURES`].
    pub fn record(&self, record: &AuditRecord) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if record.status < 400 {
            return;
        }
        self.errors.fetch_add(1, Ordering::Relaxed);
        let entry = json!({
            "time": record.time,
            "request_id": record.request_id,
            "principal": record.principal,
            "operation": record.operation.map(|op| op.name()),
            "model": record.model.as_ref().map(|model| model.as_str()),
            "relay": record.relay,
            "status": record.status,
            "error_type": record.error_type,
            "message": record
                .message
                .as_deref()
                .map(|m| m.chars().take(MAX_MESSAGE_CHARS).collect::<String>()),
            "upstream_answered": record.upstream_latency_ms.is_some(),
        });
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if recent.len() == RECENT_FAILURES {
            recent.pop_front();
        }
        recent.push_back(entry);
    }

    /// `{"requests", "errors", "recent_failures": [newest first]}` for `/status`.
    pub fn json(&self) -> Value {
        let recent: Vec<Value> = self
            .recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .rev()
            .cloned()
            .collect();
        json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "errors": self.errors.load(Ordering::Relaxed),
            "recent_failures": recent,
        })
    }
}

/// The look of both pages: system fonts only, readable without a web font.
pub const COMMON_STYLE: &str = r#"
:root { color-scheme: light dark; --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --line: #d0d7de; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1rem 1.5rem; }
header { display: flex; align-items: baseline; gap: 1rem; }
h1 { font-size: 1.4rem; margin: 0 0 .5rem; }
h2 { font-size: 1.1rem; margin: 1.2rem 0 .4rem; }
.summary { list-style: none; padding: 0; margin: 0 0 .5rem; display: flex; flex-wrap: wrap; gap: .3rem 1.2rem; }
.k, .muted { color: #6e7781; }
table { border-collapse: collapse; width: 100%; margin-bottom: .5rem; }
th, td { text-align: left; padding: .25rem .5rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; }
.n { text-align: right; font-variant-numeric: tabular-nums; }
td:first-child { white-space: nowrap; }
.badge { display: inline-block; padding: 0 .45rem; border-radius: .6rem; font-weight: 600; color: #fff; background: #6e7781; }
.good { background: var(--ok); } .bad { background: var(--bad); } .warn { background: var(--warn); }
.bar { background: var(--line); width: 8rem; height: .6rem; display: inline-block; vertical-align: middle; }
.bar > span { display: block; height: 100%; background: var(--ok); }
.bar.high > span { background: var(--bad); } .bar.mid > span { background: var(--warn); }
.error { color: var(--bad); }
.empty { color: #6e7781; font-style: italic; }
code { font-size: .9em; }
"#;

/// Helpers both pages use and the refresh loop. The daemon's script defines
/// `render(status, rates)`, returning the nodes that fill `<main>`.
pub const COMMON_SCRIPT: &str = r#"
"use strict";
// Builds an element; children that are not nodes become text nodes, never markup.
function el(tag, cls, ...children) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
function section(title, ...content) { return el("section", null, el("h2", null, title), ...content); }
function empty(text) { return el("p", "empty", text); }
function table(headers, rows, numeric) {
  const head = el("tr", null, ...headers.map((h, i) => el("th", numeric && numeric.includes(i) ? "n" : null, h)));
  const body = rows.map((row) => el("tr", null, ...row.map((cell, i) =>
    el("td", numeric && numeric.includes(i) ? "n" : null, cell))));
  return el("table", null, el("thead", null, head), el("tbody", null, ...body));
}
function badge(text, kind) { return el("span", "badge " + (kind || ""), text); }
function age(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}
function count(n) { return n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"); }
function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(n), unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return (unit === 0 ? value : value.toFixed(1)) + " " + units[unit];
}
function perMinute(n) { return n === null ? "—" : (n * 60).toFixed(n * 60 < 10 ? 2 : 0) + "/min"; }
function peersTable(peers) {
  if (!peers || peers.length === 0) return empty("no tunnel peers (host mode)");
  return table(["peer", "endpoint", "handshake", "received", "sent", "state"], peers.map((p) => {
    const fresh = p.handshake_age_seconds !== null && p.handshake_age_seconds < 180;
    return [p.name, p.endpoint || "—",
      p.handshake_age_seconds === null ? "never" : age(p.handshake_age_seconds) + " ago",
      bytes(p.rx_bytes), bytes(p.tx_bytes), badge(fresh ? "up" : "stale", fresh ? "good" : "bad")];
  }), [3, 4]);
}
function failuresTable(failures, extra) {
  if (!failures || failures.length === 0) return empty("none since start");
  return table(["time", "principal", "status", "error type", "message"].concat(extra ? [extra.title] : []),
    failures.map((f) => [f.time, f.principal || "(none)", String(f.status), f.error_type || "—",
      f.message || "—"].concat(extra ? [extra.cell(f)] : [])), [2]);
}
// Requests and errors per second between the two last fetches; since start on the first.
let previous = null;
function rates(activity, uptime) {
  const now = Date.now();
  let result = { requests: null, errors: null, window: null };
  if (activity) {
    if (previous && now > previous.at && activity.requests >= previous.requests) {
      const seconds = (now - previous.at) / 1000;
      result = { requests: (activity.requests - previous.requests) / seconds,
        errors: (activity.errors - previous.errors) / seconds, window: seconds };
    } else if (uptime > 0) {
      result = { requests: activity.requests / uptime, errors: activity.errors / uptime, window: uptime };
    }
    previous = { at: now, requests: activity.requests, errors: activity.errors };
  }
  return result;
}
function trafficSection(activity, r) {
  if (!activity) return section("Requests", empty("no request counts"));
  return section("Requests", table(["requests", "errors", "request rate", "error rate", "rate over the last"],
    [[count(activity.requests), count(activity.errors), perMinute(r.requests), perMinute(r.errors),
      r.window === null ? "—" : age(r.window)]], [0, 1, 2, 3]));
}
function show(status) {
  document.getElementById("main").replaceChildren(...render(status, rates(status.activity, status.uptime_seconds)));
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  document.getElementById("updated").className = "muted";
}
async function refresh() {
  try {
    const response = await fetch("status", { cache: "no-store", headers: { accept: "application/json" } });
    if (!response.ok) throw new Error("HTTP " + response.status);
    show(await response.json());
  } catch (error) {
    const updated = document.getElementById("updated");
    updated.textContent = "refresh failed (" + error.message + "); showing older data";
    updated.className = "error";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}
function start() {
  show(JSON.parse(document.getElementById("initial-status").textContent));
  setTimeout(refresh, REFRESH_MS);
}
"#;

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::audit::Service;

    #[test]
    fn markup_in_text_is_escaped() {
        assert_eq!(
            escape_html(r#"<img src=x onerror="alert('1')">&amp;"#),
            "&lt;img src=x onerror=&quot;alert(&#39;1&#39;)&quot;&gt;&amp;amp;"
        );
        assert_eq!(escape_html("plain relay-a"), "plain relay-a");
    }

    #[test]
    fn embedded_json_cannot_close_its_script_element_and_reads_back_the_same() {
        let value = json!({"message": "</script><script>alert(1)</script><!-- & \u{2028}"});
        let text = script_json(&value);
        for forbidden in ["<", ">", "&", "\u{2028}"] {
            assert!(!text.contains(forbidden), "{forbidden:?} in {text}");
        }
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), value);
    }

    #[tokio::test]
    async fn the_page_is_html_with_a_policy_that_allows_only_its_own_nonce() {
        let status = json!({"principal": "<b>mallory</b>"});
        let page = StatusPage {
            title: "xpart agent",
            summary: |_| vec![("relay <a>".to_owned(), "down & \"out\"".to_owned())],
            script: "function render() { return []; }",
        };
        let response = respond(&page, &status);
        let headers = response.headers();
        assert_eq!(headers[CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers[CACHE_CONTROL], "no-store");
        let policy = headers[CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(policy.starts_with("default-src 'none';"), "{policy}");
        assert!(policy.contains("connect-src 'self'"), "{policy}");
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        let nonce = policy
            .split("'nonce-")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .unwrap()
            .to_owned();
        assert!(nonce.len() >= 24, "{nonce}");

        let body = response.into_body().collect().await.unwrap().to_bytes();
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            html.contains(&format!("<script nonce=\"{nonce}\">")),
            "{html}"
        );
        assert!(
            html.contains(&format!("<style nonce=\"{nonce}\">")),
            "{html}"
        );
        assert!(html.contains("relay &lt;a&gt;"), "{html}");
        assert!(html.contains("down &amp; &quot;out&quot;"), "{html}");
        assert!(!html.contains("<b>mallory"), "{html}");
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "{html}"
        );
        // Every element that runs carries the nonce.
        assert_eq!(html.matches("<script").count(), 2, "{html}");
        assert_eq!(html.matches("<script nonce=").count(), 1, "{html}");

        let again = respond(&page, &status);
        assert_ne!(
            again.headers()[CONTENT_SECURITY_POLICY].to_str().unwrap(),
            policy,
            "a fresh nonce per response"
        );
    }

    #[test]
    fn activity_counts_every_request_and_keeps_the_last_failures_newest_first() {
        let activity = Activity::new();
        let mut ok = AuditRecord::new(Service::Agent, "ok");
        ok.status = 200;
        activity.record(&ok);
        for i in 0..RECENT_FAILURES + 5 {
            let mut failed = AuditRecord::new(Service::Agent, format!("r{i}"));
            failed.status = 429;
            failed.principal = Some("lambda".to_owned());
            failed.error_type = Some("ThrottlingException".to_owned());
            failed.message = Some("x".repeat(MAX_MESSAGE_CHARS + 50));
            activity.record(&failed);
        }
        let json = activity.json();
        assert_eq!(json["requests"], RECENT_FAILURES as u64 + 6);
        assert_eq!(json["errors"], RECENT_FAILURES as u64 + 5);
        let recent = json["recent_failures"].as_array().unwrap();
        assert_eq!(recent.len(), RECENT_FAILURES);
        assert_eq!(recent[0]["request_id"], format!("r{}", RECENT_FAILURES + 4));
        assert_eq!(recent[RECENT_FAILURES - 1]["request_id"], "r5");
        assert_eq!(recent[0]["status"], 429);
        assert_eq!(recent[0]["error_type"], "ThrottlingException");
        assert_eq!(
            recent[0]["message"].as_str().unwrap().chars().count(),
            MAX_MESSAGE_CHARS
        );
    }
}
