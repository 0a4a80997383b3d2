"""xpart-relay end to end on loopback: real clients (boto3, curl) → relay → Bedrock stand-in
over TLS, which checks every SigV4 signature with botocore, reached through a test DNS server.
See relay_harness.py and conftest.py for the stack."""

import json
import shutil
import subprocess
import time

import pytest

import relay_harness as h

HEADERS = {"x-xpart-principal": "summarizer-lambda", "x-xpart-request-id": "req-0001"}


def assert_no_caller_credentials(record):
    """The stand-in saw only the relay's signature: none of the caller's credentials."""
    flat = json.dumps(record["headers"])
    assert h.CALLER_KEY[0] not in flat
    assert h.CALLER_TOKEN not in flat
    assert "Bearer" not in flat
    assert "cookie" not in record["headers"]
    assert not any(name.startswith("x-xpart-") for name in record["headers"])
    assert record["access_key"] == h.RELAY_KEY[0]
    assert record["verified"] is True


# --- each allowed operation -------------------------------------------------------------------

def test_converse_is_signed_by_the_relay_and_audited(relay):
    client = relay.client(extra_headers=HEADERS)
    out = client.converse(
        modelId="anthropic.claude-3-haiku-20240307-v1:0",
        messages=[{"role": "user", "content": [{"text": "ping"}]}],
    )
    assert out["output"]["message"]["content"][0]["text"] == "standin:ping"
    [record] = relay.standin.requests()
    assert_no_caller_credentials(record)
    assert record["path"] == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    assert record["headers"]["host"] == f"{h.UPSTREAM_NAME}:{relay.standin.port}"
    assert relay.dns.queries.get(h.UPSTREAM_NAME, 0) >= 1, "resolved through the configured resolver"
    [line] = relay.audit(1)
    assert line["service"] == "relay"
    assert line["request_id"] == "req-0001"
    assert line["principal"] == "summarizer-lambda"
    assert line["operation"] == "Converse"
    assert line["model"] == "anthropic.claude-3-haiku-20240307-v1:0"
    assert line["status"] == 200
    assert line["error_type"] is None
    assert line["upstream_latency_ms"] is not None and line["upstream_latency_ms"] >= 0
    assert line["bytes_in"] > 0 and line["bytes_out"] > 0


def test_converse_stream_through_boto3(relay):
    out = relay.client().converse_stream(
        modelId="anthropic.claude-3-haiku-20240307-v1:0",
        messages=[{"role": "user", "content": [{"text": "stream me"}]}],
    )
    events = list(out["stream"])
    kinds = [next(iter(e)) for e in events]
    assert kinds == ["messageStart", "contentBlockDelta", "contentBlockDelta", "contentBlockStop", "messageStop", "metadata"]
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    assert text == "standin:stream me"
    [record] = relay.standin.requests()
    assert_no_caller_credentials(record)
    assert record["path"].endswith("/converse-stream")


def test_invoke_model(relay):
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 20,
                       "messages": [{"role": "user", "content": "invoke me"}]})
    out = relay.client().invoke_model(modelId="anthropic.claude-v2", body=body,
                                      contentType="application/json", accept="application/json")
    answer = json.loads(out["body"].read())
    assert answer["content"][0]["text"] == "standin:invoke me"
    [record] = relay.standin.requests()
    assert_no_caller_credentials(record)
    assert record["headers"]["content-type"] == "application/json"
    assert record["headers"]["accept"] == "application/json"


def test_invoke_model_with_response_stream(relay):
    body = json.dumps({"messages": [{"role": "user", "content": "chunks"}]})
    out = relay.client().invoke_model_with_response_stream(modelId="anthropic.claude-v2", body=body)
    chunks = [json.loads(e["chunk"]["bytes"]) for e in out["body"]]
    assert [c["type"] for c in chunks] == ["message_start", "content_block_delta", "message_stop"]
    assert chunks[1]["delta"]["text"] == "standin:chunks"
    [record] = relay.standin.requests()
    assert_no_caller_credentials(record)


def test_count_tokens(relay):
    out = relay.client().count_tokens(
        modelId="anthropic.claude-3-haiku-20240307-v1:0",
        input={"converse": {"messages": [{"role": "user", "content": [{"text": "count"}]}]}},
    )
    assert out["inputTokens"] == 11
    [record] = relay.standin.requests()
    assert_no_caller_credentials(record)
    assert record["path"].endswith("/count-tokens")


def test_apply_guardrail_when_allowed(start_relay):
    stack = start_relay(operations=("Converse", "ApplyGuardrail"), guardrails=("gr-abc123:DRAFT",))
    out = stack.client().apply_guardrail(
        guardrailIdentifier="gr-abc123", guardrailVersion="DRAFT", source="INPUT",
        content=[{"text": {"text": "check me"}}],
    )
    assert out["action"] == "NONE"
    [record] = stack.standin.requests()
    assert_no_caller_credentials(record)
    assert record["path"] == "/guardrail/gr-abc123/version/DRAFT/apply"


def test_bedrock_headers_pass_and_upstream_errors_come_back_unchanged(start_relay):
    relay = start_relay(guardrails=("gr-1:1",))
    status, headers, body = h.post(
        relay.relay.service,
        "/model/standin.error.throttling/converse",
        h.converse_body(),
        {"content-type": "application/json", "x-amzn-bedrock-trace": "ENABLED",
         "x-amzn-bedrock-guardrailidentifier": "gr-1", "x-amzn-bedrock-guardrailversion": "1"},
    )
    assert status == 429
    assert h.error_type(headers) == "ThrottlingException"
    assert headers["x-amzn-requestid"] == headers["x-xpart-request-id"], "one id, the audited one"
    assert headers["x-xpart-upstream-request-id"] == "standin-error", "upstream's request id passes through beside it"
    [record] = relay.standin.requests()
    for name in ("x-amzn-bedrock-trace", "x-amzn-bedrock-guardrailidentifier", "x-amzn-bedrock-guardrailversion"):
        assert name in record["headers"]
        assert name in record["headers"]["authorization"], "Bedrock headers are signed"
    [line] = relay.audit(1)
    assert (line["status"], line["error_type"]) == (429, "ThrottlingException")


def test_http2_prior_knowledge(relay):
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_version} %{http_code}",
         "-H", "content-type: application/json", "--data-binary", h.converse_body("over h2").decode(),
         f"{relay.relay.endpoint}/model/anthropic.claude-v2/converse"],
        capture_output=True, text=True, timeout=30,
    )
    body, _, trailer = out.stdout.rpartition("\n")
    assert trailer == "2 200", out.stderr
    assert json.loads(body)["output"]["message"]["content"][0]["text"] == "standin:over h2"


# --- streaming: frames reach the caller as they are produced ---------------------------------

def test_stream_frames_arrive_before_the_last_is_sent(relay):
    out = relay.client().converse_stream(
        modelId="standin.hold", messages=[{"role": "user", "content": [{"text": "held"}]}]
    )
    stream = iter(out["stream"])
    first = next(stream)
    assert "messageStart" in first
    assert relay.standin.hold_first_sent.is_set()
    assert not relay.standin.hold_last_sent.is_set(), "the first frame arrived while the stand-in held the rest"
    relay.standin.release_hold()
    rest = list(stream)
    assert relay.standin.hold_last_sent.is_set()
    assert "metadata" in rest[-1]
    assert len(rest) == 5


def test_invoke_stream_frames_arrive_before_the_last_is_sent_raw(relay):
    """The same proof with a raw HTTP/1.1 reader decoding frames as bytes arrive."""
    import http.client

    conn = http.client.HTTPConnection(*relay.relay.service, timeout=30)
    conn.request("POST", "/model/standin.hold/invoke-with-response-stream",
                 body=json.dumps({"messages": [{"role": "user", "content": "x"}]}),
                 headers={"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("content-type") == "application/vnd.amazon.eventstream"
    decoder = h.eventstream.FrameDecoder()
    frames = []
    while not frames:
        frames += decoder.feed(response.read1(65536))
    assert len(frames) == 1
    assert not relay.standin.hold_last_sent.is_set()
    relay.standin.release_hold()
    while True:
        data = response.read1(65536)
        if not data:
            break
        frames += decoder.feed(data)
    conn.close()
    assert [f[0][":event-type"] for f in frames] == ["chunk", "chunk", "chunk"]


def test_stream_that_goes_quiet_is_stopped_after_the_idle_timeout(start_relay):
    stack = start_relay(idle_timeout=1)
    out = stack.client().converse_stream(
        modelId="standin.hold", messages=[{"role": "user", "content": [{"text": "quiet"}]}]
    )
    stream = iter(out["stream"])
    assert "messageStart" in next(stream)
    started = time.monotonic()
    with pytest.raises(Exception):
        list(stream)
    assert time.monotonic() - started < 5, "the relay cut the stream instead of waiting for upstream"
    stack.standin.release_hold()
    [line] = stack.audit(1)
    assert line["status"] == 200 and "sent nothing for 1 s" in line["message"]
    _, _, metrics = h.get(stack.relay.admin, "/metrics")
    assert 'xpart_relay_upstream_errors_total{kind="idle_timeout"} 1' in metrics.decode()


def test_stream_frames_arrive_one_by_one_over_http2(relay):
    """The agent's protocol (HTTP/2 prior knowledge), read with curl -N as bytes arrive."""
    import os
    import select

    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    proc = subprocess.Popen(
        ["curl", "-sS", "-N", "--http2-prior-knowledge", "-H", "content-type: application/json",
         "--data-binary", h.converse_body("h2 stream").decode(),
         f"{relay.relay.endpoint}/model/standin.hold/converse-stream"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        decoder = h.eventstream.FrameDecoder()
        frames = []
        deadline = time.monotonic() + 10
        while not frames and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                frames += decoder.feed(os.read(proc.stdout.fileno(), 65536))
        assert [f[0][":event-type"] for f in frames] == ["messageStart"]
        assert not relay.standin.hold_last_sent.is_set()
        relay.standin.release_hold()
        rest, _ = proc.communicate(timeout=10)
        frames += decoder.feed(rest)
    finally:
        proc.kill()
    assert [f[0][":event-type"] for f in frames][-1] == "metadata"
    assert len(frames) == 6


# --- inference-profile retry -------------------------------------------------------------------

def test_on_demand_refusal_is_retried_once_with_the_profile_and_remembered(relay):
    relay.standin.on_demand_refused.add("anthropic.needs-profile")
    client = relay.client()
    out = client.converse(modelId="anthropic.needs-profile", messages=[{"role": "user", "content": [{"text": "a"}]}])
    assert out["output"]["message"]["content"][0]["text"] == "standin:a"
    paths = [r["path"] for r in relay.standin.requests()]
    assert paths == ["/model/anthropic.needs-profile/converse", "/model/us.anthropic.needs-profile/converse"]
    relay.standin.clear()
    client.converse(modelId="anthropic.needs-profile", messages=[{"role": "user", "content": [{"text": "b"}]}])
    assert [r["path"] for r in relay.standin.requests()] == ["/model/us.anthropic.needs-profile/converse"]
    lines = relay.audit(2)
    assert [l["model"] for l in lines] == ["us.anthropic.needs-profile", "us.anthropic.needs-profile"]
    assert all(l["status"] == 200 for l in lines)


def test_other_validation_errors_are_not_retried(relay):
    status, headers, body = h.post(relay.relay.service, "/model/standin.error.validation/converse", h.converse_body())
    assert status == 400 and h.error_type(headers) == "ValidationException"
    assert len(relay.standin.requests()) == 1


# --- GovCloud model ids ------------------------------------------------------------------------

def test_govcloud_profile_id_is_rewritten_by_rule(relay):
    out = relay.client().converse(modelId="us-gov.anthropic.claude-3-haiku",
                                  messages=[{"role": "user", "content": [{"text": "gov"}]}])
    assert out["output"]["message"]["content"][0]["text"] == "standin:gov"
    [record] = relay.standin.requests()
    assert record["path"] == "/model/us.anthropic.claude-3-haiku/converse"


def test_govcloud_arn_is_rewritten_by_rule(relay):
    arn = "arn:aws-us-gov:bedrock:us-gov-west-1:111122223333:inference-profile/us-gov.anthropic.claude-3-haiku"
    relay.client().converse(modelId=arn, messages=[{"role": "user", "content": [{"text": "arn"}]}])
    [record] = relay.standin.requests()
    assert record["model"] == "arn:aws:bedrock:us-east-1:444455556666:inference-profile/us.anthropic.claude-3-haiku"


# --- refusals: exact status and error type, nothing forwarded ------------------------------------

def refused(relay, status, code, fragment, response):
    got_status, headers, body = response
    assert got_status == status, body
    assert h.error_type(headers) == code
    assert headers["content-type"] == "application/json"
    assert headers["x-amzn-requestid"] == headers["x-xpart-request-id"]
    message = json.loads(body)["message"]
    assert fragment in message, message
    assert relay.standin.requests() == [], "nothing reached the upstream"
    return message


def test_refuses_operation_not_allowed(relay):
    refused(relay, 403, "AccessDeniedException", "ApplyGuardrail",
            h.post(relay.relay.service, "/guardrail/gr-1/version/1/apply", b'{"source":"INPUT","content":[]}'))
    refused(relay, 403, "AccessDeniedException", "StartAsyncInvoke",
            h.post(relay.relay.service, "/async-invoke", b"{}"))
    [a, b] = relay.audit(2)
    assert (a["status"], a["error_type"], a["operation"]) == (403, "AccessDeniedException", "ApplyGuardrail")
    assert "not allowed" in a["message"]


def test_refuses_model_not_allowed(relay):
    refused(relay, 403, "AccessDeniedException", "meta.llama3-8b-instruct-v1:0",
            h.post(relay.relay.service, "/model/meta.llama3-8b-instruct-v1%3A0/converse", h.converse_body()))
    [line] = relay.audit(1)
    assert line["model"] == "meta.llama3-8b-instruct-v1:0" and line["status"] == 403


def test_refuses_non_agent_source(relay):
    refused(relay, 403, "AccessDeniedException", "127.0.0.2",
            h.post(relay.relay.service, "/model/anthropic.claude-v2/converse", h.converse_body(), source="127.0.0.2"))
    status, _, _ = h.get(relay.relay.service, "/_xpart/health", source="127.0.0.2")
    assert status == 403


def test_refuses_unknown_paths_and_never_signs_for_another_host(relay):
    refused(relay, 404, "UnknownOperationException", "",
            h.post(relay.relay.service, "/v1/chat/completions", b"{}"))
    refused(relay, 404, "UnknownOperationException", "",
            h.post(relay.relay.service, "/model/anthropic.claude-v2/../../iam/converse", b"{}"))
    # A Host naming another service changes nothing: the request goes to, and is signed for,
    # the configured endpoint only.
    status, _, _ = h.post(relay.relay.service, "/model/anthropic.claude-v2/converse", h.converse_body(),
                          {"host": "sts.amazonaws.com"})
    assert status == 200
    [record] = relay.standin.requests()
    assert record["headers"]["host"] == f"{h.UPSTREAM_NAME}:{relay.standin.port}"


def test_refuses_wrong_method(relay):
    status, headers, _ = h.get(relay.relay.service, "/model/anthropic.claude-v2/converse")
    assert status == 404 and h.error_type(headers) == "UnknownOperationException"
    status, headers, _ = h.get(relay.relay.service, "/model/anthropic.claude-v2/converse", method="PUT")
    assert status == 404 and h.error_type(headers) == "UnknownOperationException"
    assert relay.standin.requests() == []


def test_refuses_govcloud_id_without_rule(relay):
    arn = "arn%3Aaws-us-gov%3Abedrock%3Aus-gov-east-1%3A999999999999%3Ainference-profile%2Fx.model"
    message = refused(relay, 400, "ValidationException", "GovCloud",
                      h.post(relay.relay.service, f"/model/{arn}/converse", h.converse_body()))
    assert "[rewrite]" in message


def test_caller_credentials_and_cookies_never_reach_upstream(relay):
    status, _, _ = h.post(
        relay.relay.service, "/model/anthropic.claude-v2/converse", h.converse_body(),
        {"authorization": "Bearer bedrock-api-key-CALLERSECRET", "x-amz-security-token": h.CALLER_TOKEN,
         "x-amz-date": "20200101T000000Z", "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
         "cookie": "session=CALLERSECRET", "x-xpart-principal": "p", "x-xpart-source": "10.0.0.9",
         "proxy-authorization": "Basic CALLERSECRET", "content-type": "application/json"},
    )
    assert status == 200
    [record] = relay.standin.requests()
    assert_no_caller_credentials(record)
    assert "CALLERSECRET" not in json.dumps(record["headers"])
    assert record["headers"]["x-amz-date"] != "20200101T000000Z"


# --- the relay signs only what its policy allows (issue 10) ------------------------------------

def test_inference_profile_the_policy_does_not_allow_is_never_signed(start_relay):
    stack = start_relay(models=("anthropic.*",))
    stack.standin.on_demand_refused.add("anthropic.needs-profile")
    status, headers, body = h.post(stack.relay.service, "/model/anthropic.needs-profile/converse", h.converse_body())
    assert status == 403 and h.error_type(headers) == "AccessDeniedException"
    assert "us.anthropic.needs-profile" in json.loads(body)["message"]
    assert [r["path"] for r in stack.standin.requests()] == ["/model/anthropic.needs-profile/converse"]
    # Nothing was remembered: the next call asks for the model itself again, and is refused again.
    stack.standin.clear()
    status, _, _ = h.post(stack.relay.service, "/model/anthropic.needs-profile/converse", h.converse_body())
    assert status == 403
    assert [r["path"] for r in stack.standin.requests()] == ["/model/anthropic.needs-profile/converse"]
    lines = stack.audit(2)
    assert [(l["status"], l["error_type"]) for l in lines] == [(403, "AccessDeniedException")] * 2


@pytest.mark.parametrize("models", [("anthropic.claude-*",), ("*",)])
def test_model_ids_outside_bedrocks_grammar_are_refused_before_signing(start_relay, models):
    stack = start_relay(models=models)
    for raw in ("anthropic.claude-x%2F..%2F..%2Fmodel%2Fmeta.llama3-70b", "anthropic.claude-x;meta.llama3",
                "anthropic.claude-x%252F..%252Fmeta.llama3", "anthropic.claude-x%20y"):
        refused(stack, 400, "ValidationException", "modelId",
                h.post(stack.relay.service, f"/model/{raw}/converse", h.converse_body()))


def test_the_upstream_path_is_rebuilt_from_the_validated_id(relay):
    status, _, _ = h.post(relay.relay.service, "/model/%61nthropic.claude-v2%3a1/converse", h.converse_body())
    assert status == 200
    [record] = relay.standin.requests()
    assert record["path"] == "/model/anthropic.claude-v2%3A1/converse" and record["verified"]


def test_query_parameters_and_unknown_bedrock_headers_are_not_signed(relay):
    status, _, _ = h.post(
        relay.relay.service,
        "/model/anthropic.claude-v2/converse?X%2DAmz%2DSecurity%2DToken=CALLERSECRET&X-Amz-Credential=x",
        h.converse_body(),
        {"content-type": "application/json", "x-amzn-bedrock-something-new": "1",
         "x-amzn-bedrock-service-tier": "default", "content-encoding": "identity", "x-forwarded-for": "10.0.0.1"},
    )
    assert status == 200
    [record] = relay.standin.requests()
    assert record["path"] == "/model/anthropic.claude-v2/converse"
    assert "x-amzn-bedrock-something-new" not in record["headers"]
    assert "content-encoding" not in record["headers"] and "x-forwarded-for" not in record["headers"]
    assert record["headers"]["x-amzn-bedrock-service-tier"] == "default"
    assert "x-amzn-bedrock-service-tier" in record["headers"]["authorization"]


@pytest.mark.parametrize("extra, fragment", [
    ({"x-amzn-bedrock-service-tier": "priority"}, "service_tiers"),
    ({"x-amzn-bedrock-performanceconfig-latency": "optimized"}, "performance_latency"),
    ({"x-amzn-bedrock-guardrailidentifier": "gr-other", "x-amzn-bedrock-guardrailversion": "1"}, "gr-other:1"),
])
def test_cost_and_policy_headers_pass_only_at_allowed_values(relay, extra, fragment):
    refused(relay, 403, "AccessDeniedException", fragment,
            h.post(relay.relay.service, "/model/anthropic.claude-v2/invoke", h.converse_body(),
                   {"content-type": "application/json", **extra}))


@pytest.mark.parametrize("settings, fragment", [
    ({"serviceTier": {"type": "priority"}}, "serviceTier.type"),
    ({"performanceConfig": {"latency": "optimized"}}, "performanceConfig.latency"),
    ({"guardrailConfig": {"guardrailIdentifier": "gr-other", "guardrailVersion": "1"}}, "gr-other:1"),
])
def test_cost_and_policy_settings_in_a_converse_body_pass_only_at_allowed_values(relay, settings, fragment):
    body = json.loads(h.converse_body())
    body.update(settings)
    refused(relay, 403, "AccessDeniedException", fragment,
            h.post(relay.relay.service, "/model/anthropic.claude-v2/converse", json.dumps(body).encode(),
                   {"content-type": "application/json"}))


def test_a_converse_body_with_a_setting_given_twice_is_never_signed(relay):
    body = h.converse_body()[:-1] + b', "serviceTier": {"type": "default"}, "serviceTier": {"type": "priority"}}'
    refused(relay, 400, "ValidationException", "serviceTier",
            h.post(relay.relay.service, "/model/anthropic.claude-v2/converse", body,
                   {"content-type": "application/json"}))


def test_apply_guardrail_needs_the_guardrail_on_the_relays_list(start_relay):
    stack = start_relay(operations=("Converse", "ApplyGuardrail"), guardrails=("gr-abc123:1",))
    refused(stack, 403, "AccessDeniedException", "gr-abc123:DRAFT",
            h.post(stack.relay.service, "/guardrail/gr-abc123/version/DRAFT/apply", b'{"source":"INPUT","content":[]}'))
    refused(stack, 403, "AccessDeniedException", "gr-other:1",
            h.post(stack.relay.service, "/guardrail/gr-other/version/1/apply", b'{"source":"INPUT","content":[]}'))


def test_metric_labels_never_carry_caller_chosen_ids(start_relay):
    import secrets

    stack = start_relay(models=("*",))
    for _ in range(10):
        h.post(stack.relay.service, f"/model/rand-{secrets.token_hex(6)}/converse", h.converse_body())
        h.post(stack.relay.service, f"/model/rand;{secrets.token_hex(6)}/converse", h.converse_body())
    stack.audit(20)
    _, _, metrics = h.get(stack.relay.admin, "/metrics")
    series = [line for line in metrics.decode().splitlines() if line.startswith("xpart_relay_requests_total")]
    assert not any("rand" in line for line in series), series
    assert 'xpart_relay_requests_total{model="*",operation="Converse",status="200"} 10' in series
    assert 'xpart_relay_requests_total{model="other",operation="-",status="400"} 10' in series


def test_buffered_body_budget_refuses_with_503_and_counts(start_relay):
    import socket

    stack = start_relay(max_buffered_body_bytes=25_000_000)
    holder = socket.create_connection(stack.relay.service, timeout=10)
    holder.sendall(b"POST /model/anthropic.claude-v2/converse HTTP/1.1\r\nhost: relay\r\n"
                   b"content-type: application/json\r\ncontent-length: 20000000\r\n\r\n{")
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            _, _, metrics = h.get(stack.relay.admin, "/metrics")
            if "xpart_relay_buffered_body_bytes 20000000" in metrics.decode():
                break
            time.sleep(0.05)
        else:
            pytest.fail("the first body was never reserved")
        second = socket.create_connection(stack.relay.service, timeout=10)
        second.sendall(b"POST /model/anthropic.claude-v2/converse HTTP/1.1\r\nhost: relay\r\n"
                       b"content-type: application/json\r\ncontent-length: 6000000\r\n\r\n{")
        reply = second.recv(65536).decode(errors="replace")
        second.close()
        assert reply.startswith("HTTP/1.1 503"), reply[:300]
        assert "ServiceUnavailableException" in reply and "max_buffered_body_bytes" in reply
        _, _, metrics = h.get(stack.relay.admin, "/metrics")
        assert "xpart_relay_body_budget_refused_total 1" in metrics.decode()
    finally:
        holder.close()
    # The reservation goes with the request: the budget is whole again.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status, _, _ = h.post(stack.relay.service, "/model/anthropic.claude-v2/converse", h.converse_body())
        if status != 503:
            break
        time.sleep(0.1)
    assert status == 200


# --- body limit --------------------------------------------------------------------------------

def test_oversized_body_refused_from_content_length_before_reading(relay):
    import socket

    sock = socket.create_connection(relay.relay.service, timeout=10)
    sock.sendall(b"POST /model/anthropic.claude-v2/converse HTTP/1.1\r\nhost: relay\r\n"
                 b"content-type: application/json\r\ncontent-length: 25000001\r\n\r\n{")
    started = time.monotonic()
    reply = sock.recv(65536).decode(errors="replace")
    sock.close()
    assert time.monotonic() - started < 5, "answered without waiting for 25 MB"
    assert reply.startswith("HTTP/1.1 400")
    assert "ValidationException" in reply and "25000000" in reply
    assert relay.standin.requests() == []


def test_oversized_chunked_body_refused_by_count(relay):
    import socket

    sock = socket.create_connection(relay.relay.service, timeout=20)
    sock.sendall(b"POST /model/anthropic.claude-v2/converse HTTP/1.1\r\nhost: relay\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")
    chunk = b"x" * (1 << 20)
    sent = 0
    try:
        while sent <= 26_000_000:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(10)
    reply = sock.recv(65536).decode(errors="replace")
    sock.close()
    assert reply.startswith("HTTP/1.1 400"), reply[:200]
    assert "ValidationException" in reply
    assert relay.standin.requests() == []


def test_body_at_the_limit_is_accepted(relay):
    padding = "y" * (25_000_000 - 100)
    body = json.dumps({"messages": [{"role": "user", "content": [{"text": "big"}]}], "pad": padding}).encode()
    assert len(body) <= 25_000_000
    status, _, _ = h.post(relay.relay.service, "/model/anthropic.claude-v2/converse", body, timeout=60)
    assert status == 200
    [record] = relay.standin.requests()
    assert record["body_length"] == len(body) and record["verified"]


# --- upstream down or slow -----------------------------------------------------------------------

def test_upstream_down_gives_prompt_service_unavailable(relay):
    relay.standin.stop()
    started = time.monotonic()
    status, headers, body = h.post(relay.relay.service, "/model/anthropic.claude-v2/converse", h.converse_body())
    assert time.monotonic() - started < 5
    assert status == 503 and h.error_type(headers) == "ServiceUnavailableException"
    message = json.loads(body)["message"]
    assert f"https://{h.UPSTREAM_NAME}:{relay.standin.port}" in message
    [line] = relay.audit(1)
    assert (line["status"], line["error_type"]) == (503, "ServiceUnavailableException")
    _, _, metrics = h.get(relay.relay.admin, "/metrics")
    assert 'xpart_relay_upstream_errors_total{kind="unavailable"} 1' in metrics.decode()


def test_upstream_slow_times_out_at_first_byte(start_relay):
    stack = start_relay(first_byte_timeout=1)
    stack.standin.slow_seconds = 6
    started = time.monotonic()
    status, headers, body = h.post(stack.relay.service, "/model/standin.slow/converse", h.converse_body())
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 3, elapsed
    assert status == 503 and h.error_type(headers) == "ServiceUnavailableException"
    assert "did not start answering within 1 s" in json.loads(body)["message"]


def test_next_address_is_tried_when_one_fails(start_relay):
    stack = start_relay(upstream_host=h.MULTI_ADDRESS_NAME)
    out = stack.client().converse(modelId="anthropic.claude-v2", messages=[{"role": "user", "content": [{"text": "n"}]}])
    assert out["output"]["message"]["content"][0]["text"] == "standin:n"
    [record] = stack.standin.requests()
    assert record["headers"]["host"] == f"{h.MULTI_ADDRESS_NAME}:{stack.standin.port}"
    assert "127.0.0.2" in stack.relay.logs() and "trying the next" in stack.relay.logs()


def test_unresolvable_upstream_name_gives_service_unavailable(start_relay):
    stack = start_relay(upstream_host="bedrock-runtime.nowhere.invalid")
    status, headers, body = h.post(stack.relay.service, "/model/anthropic.claude-v2/converse", h.converse_body())
    assert status == 503 and h.error_type(headers) == "ServiceUnavailableException"
    assert "bedrock-runtime.nowhere.invalid" in json.loads(body)["message"]


# --- credentials ---------------------------------------------------------------------------------

def test_short_lived_credentials_are_refreshed_before_they_expire(start_relay, credential_store):
    creds = h.ContainerCredentials(credential_store, lifetime_seconds=8)
    try:
        stack = start_relay(credentials=creds, refresh_before_expiry=5)
        client = stack.client()
        keys = []
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            client.converse(modelId="anthropic.claude-v2", messages=[{"role": "user", "content": [{"text": "k"}]}])
            keys.append(stack.standin.requests()[-1]["access_key"])
            time.sleep(0.5)
        # Every request verified with a key the endpoint issued, and the key changed while the
        # requests kept succeeding: refreshed before expiry, never sent expired.
        assert all(r["verified"] for r in stack.standin.requests())
        issued = [k for k, _ in creds.issued]
        assert len(set(keys)) >= 2, keys
        assert set(keys) <= set(issued)
    finally:
        creds.stop()


def test_starts_without_credentials_echo_works_and_readyz_says_why(start_relay):
    stack = start_relay(credentials="none")
    out = stack.client().converse(modelId="xpart.echo", messages=[{"role": "user", "content": [{"text": "echo me"}]}])
    assert out["output"]["message"]["content"][0]["text"] == "echo me"
    status, headers, body = h.post(stack.relay.service, "/model/anthropic.claude-v2/converse", h.converse_body())
    assert status == 503 and h.error_type(headers) == "ServiceUnavailableException"
    assert "no AWS credentials" in json.loads(body)["message"]
    assert stack.standin.requests() == []
    status, _, body = h.get(stack.relay.admin, "/readyz")
    assert status == 503
    assert "no AWS credentials" in body.decode()
    # The chain is asked again every 10 s; the warning is for the state, not for each retry.
    time.sleep(11)
    logs = stack.relay.logs()
    assert logs.count("starting without AWS credentials") == 1, logs
    assert logs.count("ServiceUnavailableException until credentials appear") == 1, logs


def test_credentials_source_none_asks_nothing_and_serves_echo(start_relay, credential_store):
    creds = h.ContainerCredentials(credential_store, lifetime_seconds=600)
    try:
        # The container endpoint is offered in the environment, and must not be asked.
        stack = start_relay(credentials=creds, credentials_source="none")
        out = stack.client().converse(modelId="xpart.echo", messages=[{"role": "user", "content": [{"text": "quiet"}]}])
        assert out["output"]["message"]["content"][0]["text"] == "quiet"
        status, headers, body = h.post(stack.relay.service, "/model/anthropic.claude-v2/converse", h.converse_body())
        assert status == 503 and 'source = \\"none\\"' in body.decode()
        # Echo only is what this relay is configured for: ready, with a note saying so.
        status, _, body = h.get(stack.relay.admin, "/readyz")
        readiness = json.loads(body)
        assert status == 200 and readiness["ready"] is True, body
        assert readiness["note"].startswith("echo only"), body
        assert creds.issued == []
        assert stack.standin.requests() == []
        logs = stack.relay.logs()
        assert logs.count("signing is off by configuration") == 1, logs
        assert "INFO" in logs.split("signing is off by configuration")[0].splitlines()[-1], logs
        assert "WARN" not in logs, logs
    finally:
        creds.stop()


# --- echo model ------------------------------------------------------------------------------------

def test_echo_model_answers_every_operation_without_upstream(relay):
    client = relay.client()
    messages = [{"role": "user", "content": [{"text": "hello relay"}]}]
    assert client.converse(modelId="xpart.echo", messages=messages)["output"]["message"]["content"][0]["text"] == "hello relay"
    events = list(client.converse_stream(modelId="xpart.echo", messages=messages)["stream"])
    assert "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e) == "hello relay"
    body = json.dumps({"messages": [{"role": "user", "content": "invoke echo"}]})
    answer = json.loads(client.invoke_model(modelId="xpart.echo", body=body)["body"].read())
    assert answer["content"][0]["text"] == "invoke echo"
    chunks = [json.loads(e["chunk"]["bytes"]) for e in client.invoke_model_with_response_stream(modelId="xpart.echo", body=body)["body"]]
    assert "".join(c["delta"]["text"] for c in chunks if c["type"] == "content_block_delta") == "invoke echo"
    assert client.count_tokens(modelId="xpart.echo", input={"converse": {"messages": messages}})["inputTokens"] > 0
    assert relay.standin.requests() == []
    lines = relay.audit(5)
    assert [l["operation"] for l in lines] == ["Converse", "ConverseStream", "InvokeModel", "InvokeModelWithResponseStream", "CountTokens"]


# --- admin -----------------------------------------------------------------------------------------

def test_admin_metrics_health_drain(relay):
    relay.client().converse(modelId="anthropic.claude-v2", messages=[{"role": "user", "content": [{"text": "m"}]}])
    relay.audit(1)
    _, _, metrics = h.get(relay.relay.admin, "/metrics")
    text = metrics.decode()
    assert 'xpart_relay_requests_total{model="anthropic.*",operation="Converse",status="200"} 1' in text
    assert "xpart_relay_request_duration_seconds_bucket" in text
    assert "xpart_relay_in_flight 0" in text
    assert "xpart_relay_credentials_available 1" in text
    status, _, _ = h.get(relay.relay.admin, "/readyz")
    assert status == 200
    status, _, body = h.get(relay.relay.service, "/_xpart/health")
    assert status == 200 and json.loads(body)["ready"] is True
    status, _, _ = h.get(relay.relay.admin, "/drain", method="POST")
    assert status == 200
    status, _, body = h.get(relay.relay.service, "/_xpart/health")
    assert status == 503 and json.loads(body)["draining"] is True
    status, _, _ = h.get(relay.relay.admin, "/readyz")
    assert status == 503
    h.get(relay.relay.admin, "/undrain", method="POST")
    status, _, _ = h.get(relay.relay.service, "/_xpart/health")
    assert status == 200
    status, _, body = h.get(relay.relay.admin, "/status")
    status_json = json.loads(body)
    assert status_json["upstream"] == f"https://{h.UPSTREAM_NAME}:{relay.standin.port}"
    assert status_json["credentials"]["available"] is True


def test_sigterm_lets_a_stream_in_flight_finish(relay):
    import signal

    out = relay.client().converse_stream(
        modelId="standin.hold", messages=[{"role": "user", "content": [{"text": "finish me"}]}]
    )
    stream = iter(out["stream"])
    assert "messageStart" in next(stream)
    relay.relay.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert relay.relay.proc.poll() is None, "still running while a stream is in flight"
    with pytest.raises(OSError):
        h.get(relay.relay.service, "/_xpart/health", timeout=2)
    relay.standin.release_hold()
    rest = list(stream)
    assert "metadata" in rest[-1]
    assert relay.relay.proc.wait(timeout=10) == 0
    [line] = relay.audit(1)
    assert line["status"] == 200 and line["operation"] == "ConverseStream"


# --- configuration -----------------------------------------------------------------------------------

def test_check_reports_every_problem_with_file_field_and_fix(relay_bin, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("""
[tunnel]
mode = "host"
[service]
listen = "0.0.0.0:8080"
[upstream]
region = "us-east-1"
endpoint = "http://bedrock-runtime.us-east-1.amazonaws.com"
[policy]
operations = ["Converse", "InvokeModelWithBidirectionalStream", "Chat"]
models = []
""")
    out = subprocess.run([relay_bin, "--config", str(path), "--check"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 2
    err = out.stderr
    for fragment in ("[tunnel].mode", "[[agent]]", "[upstream].endpoint", "[policy].operations[1]",
                     "[policy].operations[2]", "[policy].models", "fix:", str(path)):
        assert fragment in err, err


def test_check_accepts_the_example_configs(relay_bin):
    for name in ("config/relay.example.toml", "config/demo/relay.toml"):
        out = subprocess.run([relay_bin, "--config", f"{h.REPO}/{name}", "--check"],
                             capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
