//! Requests that pass authentication reach the relay with the caller's credentials removed
//! and the principal, request id and source added; answers stream back unchanged.

mod fixture;

use std::time::{Duration, Instant};

use fixture::*;
use http_body_util::BodyExt;
use xpart_agent::AgentHandle;

const CONVERSE: &str = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse";

#[tokio::test]
async fn converse_is_forwarded_without_caller_credentials() {
    let (scratch, relay, agent) = ready_agent_with_one_relay("forward").await;

    let mut caller = Caller::connect(&scratch, agent.front_addr(), false).await;
    let answer = caller
        .post(CONVERSE, Some(TOKEN), br#"{"messages":[]}"#)
        .await;

    assert_eq!(answer.status, 200, "body: {:?}", answer.body);
    assert!(!answer.request_id().is_empty());
    assert_eq!(
        answer.headers["x-amzn-requestid"],
        answer.request_id(),
        "the SDK reports the agent's id, the one both audit lines carry"
    );
    assert_eq!(
        answer.headers["x-xpart-upstream-request-id"], "upstream-request-id",
        "Bedrock's own id passes through beside it"
    );
    let seen = relay.seen();
    assert_eq!(seen.len(), 1);
    let forwarded = &seen[0];
    assert_eq!(forwarded.path, CONVERSE, "path forwarded byte for byte");
    assert_eq!(forwarded.body.as_ref(), br#"{"messages":[]}"#);
    assert_eq!(forwarded.headers["x-xpart-principal"], "lambda");
    assert_eq!(forwarded.headers["x-xpart-source"], "127.0.0.1");
    assert_eq!(forwarded.headers["x-xpart-request-id"], answer.request_id());
    for credential in ["authorization", "x-amz-date"] {
        assert!(
            !forwarded.headers.contains_key(credential),
            "{credential} must not cross the tunnel"
        );
    }

    agent.shutdown().await;
    let audit = audit_lines(&scratch);
    assert_eq!(audit.len(), 1);
    let line = &audit[0];
    assert_eq!(line["service"], "agent");
    assert_eq!(line["principal"], "lambda");
    assert_eq!(line["source"], "127.0.0.1");
    assert_eq!(line["operation"], "Converse");
    assert_eq!(line["model"], "anthropic.claude-3-haiku-20240307-v1:0");
    assert_eq!(line["relay"], "relay-a");
    assert_eq!(line["status"], 200);
    assert_eq!(line["request_id"], answer.request_id());
    assert_eq!(line["bytes_in"], 15);
    assert_eq!(line["bytes_out"], answer.body.len() as u64);
    assert!(line["error_type"].is_null());
}

/// Headers a caller sets for itself, and what the relay receives in their place: the
/// principal and source the agent established, the service and region of the name the caller
/// dialled, and no caller credential or FIPS flag.
const SPOOFED: [(&str, &str, Option<&str>); 6] = [
    ("x-xpart-principal", "admin", Some("lambda")),
    ("x-xpart-source", "10.9.9.9", Some("127.0.0.1")),
    ("x-amz-security-token", "govcloud-session", None),
    ("x-xpart-service", "bedrock", Some("bedrock-runtime")),
    // The region of BEDROCK_NAME, the name the caller dialled.
    ("x-xpart-region", "eu-west-1", Some("us-east-1")),
    ("x-xpart-fips", "1", None),
];

#[tokio::test]
async fn caller_spoofed_xpart_headers_are_replaced() {
    let (scratch, relay, agent) = ready_agent_with_one_relay("spoof").await;

    for h2 in [false, true] {
        let mut caller = Caller::connect(&scratch, agent.front_addr(), h2).await;
        let spoofed: Vec<(&str, &str)> = SPOOFED
            .iter()
            .map(|&(name, value, _)| (name, value))
            .collect();
        let sent = caller.send(CONVERSE, Some(TOKEN), &spoofed, br#"{"messages":[]}"#);
        let answer = Answer::read(sent.await).await;

        assert_eq!(answer.status, 200, "body: {:?}", answer.body);
        let seen = relay.seen();
        let headers = &seen.last().expect("forwarded").headers;
        for (name, _, forwarded) in SPOOFED {
            match forwarded {
                Some(value) => assert_eq!(headers[name], value, "h2: {h2}"),
                None => assert!(!headers.contains_key(name), "h2: {h2}: {headers:?}"),
            }
        }
    }
    assert_eq!(relay.seen().len(), 2);
    agent.shutdown().await;
}

#[tokio::test]
async fn http2_callers_are_served_and_multiplexed() {
    let (scratch, relay, agent) = ready_agent_with_one_relay("h2").await;

    let caller = Caller::connect(&scratch, agent.front_addr(), true).await;
    let caller = std::sync::Arc::new(tokio::sync::Mutex::new(caller));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let caller = caller.clone();
        tasks.push(tokio::spawn(async move {
            caller
                .lock()
                .await
                .post(CONVERSE, Some(TOKEN), b"{}")
                .await
                .status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), 200);
    }
    assert_eq!(relay.seen().len(), 20);
    agent.shutdown().await;
}

#[tokio::test]
async fn streams_arrive_frame_by_frame() {
    let (scratch, _relay, agent) = ready_agent_with_one_relay("stream").await;

    let mut caller = Caller::connect(&scratch, agent.front_addr(), false).await;
    let path = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream";
    let response = caller.send(path, Some(TOKEN), &[], b"{}").await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let start = Instant::now();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("frame");
        if let Some(data) = frame.data_ref() {
            arrivals.push(start.elapsed());
            text.push_str(&String::from_utf8_lossy(data));
        }
    }
    assert_eq!(text, "chunk-0;chunk-1;chunk-2;");
    assert!(
        arrivals.len() >= 3,
        "three separate frames, got {arrivals:?}"
    );
    assert!(
        arrivals[0] < Duration::from_millis(250),
        "first chunk must not wait for the rest: {arrivals:?}"
    );
    assert!(arrivals[arrivals.len() - 1] >= Duration::from_millis(500));
    agent.shutdown().await;
}

#[tokio::test]
async fn upstream_errors_reach_the_caller_unchanged() {
    let (scratch, _relay, agent) = ready_agent_with_one_relay("upstream-error").await;

    let mut caller = Caller::connect(&scratch, agent.front_addr(), false).await;
    let answer = caller
        .post(
            "/model/anthropic.claude-throttle/converse",
            Some(TOKEN),
            b"{}",
        )
        .await;
    assert_eq!(answer.status, 429);
    assert_eq!(answer.error_type(), "ThrottlingException");
    assert_eq!(
        answer.message(),
        "Too many tokens, please wait before trying again."
    );
    agent.shutdown().await;
    let audit = audit_lines(&scratch);
    let last = audit.last().expect("audit line");
    assert_eq!(last["status"], 429);
    assert_eq!(last["error_type"], "ThrottlingException");
}

#[tokio::test]
async fn admin_reports_status_metrics_and_readiness() {
    let scratch = Scratch::new("admin");
    let relay = FakeRelay::start("relay-a").await;
    relay.set(Behaviour::Drained);
    let agent = start_agent(
        &scratch,
        &agent_toml(&scratch, &[&relay], &token_principal("")),
    )
    .await;

    let (status, body) = admin_get(agent.admin_addr(), "/readyz").await;
    assert_eq!(status, 503, "not ready while no relay is healthy: {body}");
    relay.set(Behaviour::Serve);
    wait_ready(&agent).await;

    let mut caller = Caller::connect(&scratch, agent.front_addr(), false).await;
    assert_eq!(caller.post(CONVERSE, Some(TOKEN), b"{}").await.status, 200);
    assert_eq!(caller.post(CONVERSE, None, b"{}").await.status, 403);

    let (status, body) = admin_get(agent.admin_addr(), "/status").await;
    assert_eq!(status, 200);
    let status_json: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(status_json["service"], "agent");
    assert_eq!(status_json["active_relay"], "relay-a");
    assert_eq!(status_json["relays"][0]["state"], "healthy");
    assert_eq!(status_json["tunnel"]["mode"], "host");
    assert_eq!(status_json["principals"][0]["name"], "lambda");

    let (_, metrics) = admin_get(agent.admin_addr(), "/metrics").await;
    assert!(metrics.contains(
        r#"xpart_agent_requests_total{model="anthropic.claude-*",operation="Converse",principal="lambda",status="200"} 1"#
    ), "{metrics}");
    assert!(
        metrics.contains(
            r#"xpart_agent_requests_total{model="denied",operation="-",principal="-",status="403"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"xpart_agent_relay_healthy{relay="relay-a"} 1"#));
    assert!(metrics.contains("xpart_agent_request_duration_seconds_bucket"));
    agent.shutdown().await;
}

#[tokio::test]
async fn certificate_reload_keeps_open_connections() {
    let (scratch, _relay, agent) = ready_agent_with_one_relay("reload").await;

    let mut before = Caller::connect(&scratch, agent.front_addr(), false).await;
    assert_eq!(before.post(CONVERSE, Some(TOKEN), b"{}").await.status, 200);

    let new_der = scratch.issue("cert.pem", "key.pem");
    assert_ne!(before.peer_certificate, new_der);
    agent.reload_certificate().expect("reload");

    let mut after = Caller::connect(&scratch, agent.front_addr(), false).await;
    assert_eq!(
        after.peer_certificate, new_der,
        "new handshakes get the new certificate"
    );
    assert_eq!(
        before.post(CONVERSE, Some(TOKEN), b"{}").await.status,
        200,
        "the connection opened before the reload still works"
    );
    assert_eq!(after.post(CONVERSE, Some(TOKEN), b"{}").await.status, 200);

    std::fs::write(scratch.dir.join("key.pem"), "not a key").expect("corrupt key");
    assert!(agent.reload_certificate().is_err());
    let still = Caller::connect(&scratch, agent.front_addr(), false).await;
    assert_eq!(
        still.peer_certificate, new_der,
        "a failed reload keeps the last good certificate"
    );
    agent.shutdown().await;
}

/// An agent in front of one fake relay, `relay-a`, that knows the `lambda` principal by
/// [`TOKEN`], once the relay is healthy.
async fn ready_agent_with_one_relay(test: &str) -> (Scratch, FakeRelay, AgentHandle) {
    let scratch = Scratch::new(test);
    let relay = FakeRelay::start("relay-a").await;
    let agent = start_agent(
        &scratch,
        &agent_toml(&scratch, &[&relay], &token_principal("")),
    )
    .await;
    wait_ready(&agent).await;
    (scratch, relay, agent)
}
