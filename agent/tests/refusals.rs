//! Every refusal: exact status and error type, a message that says what to do, an audit
//! line, and nothing forwarded to the relay.

mod fixture;

use fixture::*;

const CONVERSE: &str = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse";

async fn setup(test: &str, principals: &str) -> Stack {
    Stack::start(test, principals, "").await
}

impl Stack {
    /// One POST on a connection of its own: a refusal over HTTP/1.1 closes the connection.
    async fn post(&self, path: &str, token: Option<&str>, body: &[u8]) -> Answer {
        self.caller().await.post(path, token, body).await
    }

    /// Shuts down, checks that the relay saw nothing, and returns the audit lines.
    async fn finish_unforwarded(self) -> Vec<serde_json::Value> {
        let (seen, audit) = self.finish().await;
        assert!(seen.is_empty(), "forwarded: {seen:?}");
        audit
    }
}

/// A `[[principal]]` known by `token`, allowed the models matching one pattern.
fn principal(name: &str, token: &str, models: &str) -> String {
    let hash = xpart_agent::token_sha256_hex(token);
    format!(
        "\n[[principal]]\nname = \"{name}\"\ntoken_sha256 = \"{hash}\"\nmodels = [\"{models}\"]\n"
    )
}

const UNRECOGNIZED: (u16, &str) = (403, "UnrecognizedClientException");
const DENIED: (u16, &str) = (403, "AccessDeniedException");
const THROTTLED: (u16, &str) = (429, "ThrottlingException");
const INVALID: (u16, &str) = (400, "ValidationException");

fn assert_refused(answer: &Answer, (status, error_type): (u16, &str), message_part: &str) {
    assert_eq!(answer.status, status, "body: {:?}", answer.body);
    assert_eq!(answer.error_type(), error_type);
    assert!(
        answer.message().contains(message_part),
        "message {:?} should mention {message_part:?}",
        answer.message()
    );
    assert_eq!(
        answer.headers["x-amzn-requestid"],
        answer.request_id(),
        "xpart's own errors carry the request id as x-amzn-RequestId"
    );
}

#[tokio::test]
async fn missing_token_is_refused_with_setup_instructions() {
    let s = setup("no-token", &token_principal("")).await;
    let answer = s.post(CONVERSE, None, b"{}").await;
    assert_refused(&answer, UNRECOGNIZED, "AWS_BEARER_TOKEN_BEDROCK");
    assert!(answer.message().contains("AWS_CA_BUNDLE"));
    let audit = s.finish_unforwarded().await;
    assert_eq!(audit[0]["status"], 403);
    assert_eq!(audit[0]["error_type"], "UnrecognizedClientException");
    assert!(audit[0]["principal"].is_null());
    assert_eq!(audit[0]["source"], "127.0.0.1");
    assert_eq!(audit[0]["message"], "no credentials");
}

#[tokio::test]
async fn wrong_token_is_refused() {
    let s = setup("wrong-token", &token_principal("")).await;
    let answer = s.post(CONVERSE, Some("not-the-token"), b"{}").await;
    assert_refused(&answer, UNRECOGNIZED, "not one this xpart agent knows");
    let audit = s.finish_unforwarded().await;
    assert_eq!(audit[0]["message"], "unknown bearer token");
    let line = serde_json::to_string(&audit[0]).expect("json");
    assert!(!line.contains("not-the-token"), "tokens are never logged");
}

#[tokio::test]
async fn sigv4_signed_request_is_told_to_use_a_token() {
    let s = setup("sigv4", &token_principal("")).await;
    let signature = "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/20260101/us-gov-west-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature=abcd";
    let mut caller = s.caller().await;
    let signed = [("authorization", signature)];
    let answer = Answer::read(caller.send(CONVERSE, None, &signed, b"{}").await).await;
    assert_refused(&answer, UNRECOGNIZED, "SigV4 signatures are not accepted");
    s.finish_unforwarded().await;
}

#[tokio::test]
async fn token_from_an_address_outside_the_cidrs_is_refused() {
    let s = setup(
        "cidr",
        &token_principal(r#"source_cidrs = ["10.0.16.0/20"]"#),
    )
    .await;
    let answer = s.post(CONVERSE, Some(TOKEN), b"{}").await;
    assert_refused(&answer, DENIED, "may not call from 127.0.0.1");
    let audit = s.finish_unforwarded().await;
    assert_eq!(audit[0]["principal"], "lambda");
    assert_eq!(audit[0]["message"], "source address not allowed");
}

#[tokio::test]
async fn address_alone_identifies_a_token_less_principal() {
    let principals = r#"
[[principal]]
name = "subnet"
source_cidrs = ["127.0.0.0/8"]
models = ["*"]
"#;
    let s = setup("cidr-only", principals).await;
    let answer = s.post(CONVERSE, None, b"{}").await;
    assert_eq!(answer.status, 200);
    let (seen, _) = s.finish().await;
    assert_eq!(seen[0].headers["x-xpart-principal"], "subnet");
}

#[tokio::test]
async fn model_outside_the_allowlist_is_refused() {
    let s = setup("model", &token_principal("")).await;
    let answer = s
        .post("/model/amazon.nova-pro-v1%3A0/converse", Some(TOKEN), b"{}")
        .await;
    assert_refused(
        &answer,
        DENIED,
        "not allowed to use model amazon.nova-pro-v1:0",
    );
    let audit = s.finish_unforwarded().await;
    assert_eq!(audit[0]["model"], "amazon.nova-pro-v1:0");
    assert_eq!(audit[0]["operation"], "Converse");
}

#[tokio::test]
async fn unknown_operation_is_refused_as_bedrock_would() {
    let s = setup("route", &token_principal("")).await;
    let answer = s.post("/model/x/explode", Some(TOKEN), b"{}").await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.error_type(), "UnknownOperationException");
    s.finish_unforwarded().await;
}

#[tokio::test]
async fn over_the_rate_is_throttled() {
    let s = setup(
        "rate",
        &token_principal("requests_per_second = 1\nburst = 2"),
    )
    .await;
    let mut caller = s.caller().await;
    assert_eq!(caller.post(CONVERSE, Some(TOKEN), b"{}").await.status, 200);
    assert_eq!(caller.post(CONVERSE, Some(TOKEN), b"{}").await.status, 200);
    let answer = caller.post(CONVERSE, Some(TOKEN), b"{}").await;
    assert_refused(&answer, THROTTLED, "limited to 1 requests per second");
    let (seen, audit) = s.finish().await;
    assert_eq!(seen.len(), 2, "the throttled request was not forwarded");
    assert_eq!(audit[2]["message"], "over rate limit");
}

#[tokio::test]
async fn over_concurrency_is_throttled_and_the_slot_returns() {
    let s = setup("concurrency", &token_principal("max_concurrent = 1")).await;
    let mut first = s.caller().await;
    // A stream that takes 600 ms holds the only slot.
    let stream = first
        .send(
            "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream",
            Some(TOKEN),
            &[],
            b"{}",
        )
        .await;
    assert_eq!(stream.status(), 200);
    let answer = s.post(CONVERSE, Some(TOKEN), b"{}").await;
    assert_refused(&answer, THROTTLED, "may have 1 in flight");

    use http_body_util::BodyExt;
    let streamed = stream.into_body().collect().await.expect("stream");
    let streamed = streamed.to_bytes();
    assert_eq!(streamed.as_ref(), b"chunk-0;chunk-1;chunk-2;");
    // The slot is freed when the body ends.
    let mut ok = false;
    for _ in 0..20 {
        if s.caller()
            .await
            .post(CONVERSE, Some(TOKEN), b"{}")
            .await
            .status
            == 200
        {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok, "the slot came back after the stream ended");
    let (seen, _) = s.finish().await;
    assert_eq!(seen.len(), 2);
}

#[tokio::test]
async fn oversized_body_is_refused_before_forwarding() {
    let s = setup("body", &token_principal("max_body_bytes = 1000")).await;
    let answer = s.post(CONVERSE, Some(TOKEN), &[b'x'; 1001]).await;
    assert_refused(&answer, INVALID, "exceeds the 1000-byte limit");
    let ok = s.post(CONVERSE, Some(TOKEN), &[b'x'; 1000]).await;
    assert_eq!(ok.status, 200);
    let (seen, audit) = s.finish().await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.len(), 1000);
    assert_eq!(audit[0]["message"], "body too large");
}

const APPLY_GUARDRAIL: &str = "/guardrail/gr-1234/version/1/apply";

#[tokio::test]
async fn operation_outside_the_principals_list_is_refused() {
    // The default operations: invoke, converse and CountTokens, never ApplyGuardrail.
    let principals = principal("echo-only", TOKEN, "xpart.echo");
    let s = setup("operation", &principals).await;
    // A refusal over HTTP/1.1 closes the connection: one caller per request.
    let answer = s.post(APPLY_GUARDRAIL, Some(TOKEN), b"{}").await;
    assert_refused(
        &answer,
        DENIED,
        "Principal echo-only is not allowed to call ApplyGuardrail",
    );
    let start_async = s.post("/async-invoke", Some(TOKEN), b"{}").await;
    assert_refused(&start_async, DENIED, "not allowed to call StartAsyncInvoke");
    let count = s
        .post("/model/xpart.echo/count-tokens", Some(TOKEN), b"{}")
        .await;
    assert_eq!(count.status, 200, "CountTokens is a default operation");
    let (seen, audit) = s.finish().await;
    assert_eq!(seen.len(), 1, "only CountTokens was forwarded: {seen:?}");
    assert_eq!(seen[0].path, "/model/xpart.echo/count-tokens");
    assert_eq!(audit[0]["operation"], "ApplyGuardrail");
    assert_eq!(audit[0]["principal"], "echo-only");
    assert_eq!(audit[0]["message"], "operation not allowed");
    assert_eq!(audit[1]["operation"], "StartAsyncInvoke");
    assert_eq!(audit[1]["message"], "operation not allowed");
}

#[tokio::test]
async fn a_listed_operation_without_a_model_is_forwarded() {
    let s = setup(
        "operation-listed",
        &token_principal(r#"operations = ["Converse", "ApplyGuardrail"]"#),
    )
    .await;
    let mut caller = s.caller().await;
    assert_eq!(
        caller
            .post(APPLY_GUARDRAIL, Some(TOKEN), b"{}")
            .await
            .status,
        200
    );
    assert_eq!(caller.post(CONVERSE, Some(TOKEN), b"{}").await.status, 200);
    let stream = caller
        .post(
            "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream",
            Some(TOKEN),
            b"{}",
        )
        .await;
    assert_refused(&stream, DENIED, "not allowed to call ConverseStream");
    let (seen, _) = s.finish().await;
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path, APPLY_GUARDRAIL);
}

#[tokio::test]
async fn random_model_ids_add_no_metric_series() {
    let principals = principal("any-model", TOKEN, "*")
        + &principal("claude-only", "claude-token", "anthropic.claude-*");
    let s = setup("metric-labels", &principals).await;
    let mut allowed = s.caller().await;
    for i in 0..60u32 {
        let model = format!("made-up.model-{i}-{:08x}", rand_bits());
        let path = format!("/model/{model}/converse");
        assert_eq!(allowed.post(&path, Some(TOKEN), b"{}").await.status, 200);
        let mut caller = s.caller().await;
        let refused = caller.post(&path, Some("claude-token"), b"{}").await;
        assert_eq!(refused.status, 403);
        let mut caller = s.caller().await;
        let unknown = caller.post(&path, Some("no-such-token"), b"{}").await;
        assert_eq!(unknown.status, 403);
    }
    let (status, metrics) = admin_get(s.agent.admin_addr(), "/metrics").await;
    assert_eq!(status, 200);
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("xpart_agent_requests_total{"))
        .collect();
    assert_eq!(series.len(), 3, "{series:#?}");
    assert!(!metrics.contains("made-up.model"), "no caller-chosen label");
    let value = |principal: &str, operation: &str, model: &str, status: u16| {
        let labels = format!(
            r#"model="{model}",operation="{operation}",principal="{principal}",status="{status}""#
        );
        series
            .iter()
            .find(|l| l.contains(&labels))
            .unwrap_or_else(|| panic!("no series with {labels}: {series:#?}"))
            .rsplit(' ')
            .next()
            .map(str::to_owned)
    };
    let converse = "Converse";
    assert_eq!(
        value("any-model", converse, "*", 200).as_deref(),
        Some("60")
    );
    assert_eq!(
        value("claude-only", converse, "denied", 403).as_deref(),
        Some("60")
    );
    // Unauthenticated requests are not routed, so their operation is unknown too.
    assert_eq!(value("-", "-", "denied", 403).as_deref(), Some("60"));
    s.finish().await;
}

fn rand_bits() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(0);
    hasher.finish() as u32
}

#[tokio::test]
async fn refusals_over_http1_announce_that_the_connection_closes() {
    // The body is left unread; without the header a client would reuse a connection the
    // agent is closing, and its next request would fail.
    let s = setup("close", &token_principal("")).await;
    let answer = s
        .post(CONVERSE, Some("not-the-token"), &[b'x'; 64 * 1024])
        .await;
    assert_eq!(answer.status, 403);
    assert_eq!(answer.headers["connection"], "close");
    let ok = s.post(CONVERSE, Some(TOKEN), b"{}").await;
    assert_eq!(ok.status, 200);
    assert!(!ok.headers.contains_key("connection"), "{:?}", ok.headers);
    s.finish().await;
}
