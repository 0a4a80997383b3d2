//! The admin port's `GET /`: an HTML page with its security headers, the agent's `/status`
//! embedded so the first paint shows it, and the refusals the pipeline just answered.

mod fixture;

use std::net::SocketAddr;

use bytes::Bytes;
use fixture::*;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

const CONVERSE: &str = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse";

#[tokio::test]
async fn the_status_page_is_self_contained_html_showing_relays_and_refusals() {
    let s = Stack::start("status-page", &token_principal(""), "").await;
    let allowed = s.caller().await.post(CONVERSE, Some(TOKEN), b"{}").await;
    assert_eq!(allowed.status, 200);
    let refused = s
        .caller()
        .await
        .post(CONVERSE, Some("not-the-token"), b"{}")
        .await;
    assert_eq!(refused.status, 403);

    let (status, headers, html) = get(s.agent.admin_addr(), "/").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let policy = headers["content-security-policy"].to_str().expect("ascii");
    for directive in [
        "default-src 'none'",
        "connect-src 'self'",
        "script-src 'nonce-",
        "style-src 'nonce-",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{directive} missing: {policy}");
    }
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "no external asset: {html}"
    );
    assert!(html.contains("relay relay-a</span> healthy"), "{html}");

    let (_, _, json) = get(s.agent.admin_addr(), "/status").await;
    let json: serde_json::Value = serde_json::from_str(&json).expect("status is JSON");
    assert_eq!(json["activity"]["requests"], 2, "{json}");
    assert_eq!(json["activity"]["errors"], 1, "{json}");
    let failure = &json["activity"]["recent_failures"][0];
    assert_eq!(failure["status"], 403);
    assert_eq!(failure["error_type"], "UnrecognizedClientException");
    assert_eq!(failure["message"], "unknown bearer token");
    assert_eq!(failure["request_id"], refused.request_id());
    assert!(json["relays"][0]["last_success_age_seconds"].is_number());
    assert!(
        html.contains(&format!("\"request_id\":\"{}\"", refused.request_id())),
        "the page embeds the same status: {html}"
    );
    s.finish().await;
}

async fn get(addr: SocketAddr, path: &str) -> (u16, HeaderMap, String) {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin connect");
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("admin handshake");
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("admin answer");
    let (head, body) = response.into_parts();
    let body = body.collect().await.expect("admin body").to_bytes();
    (
        head.status.as_u16(),
        head.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}
