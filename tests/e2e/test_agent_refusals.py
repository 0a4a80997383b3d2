"""Every way the agent turns a caller away, seen from boto3 (configured only by environment
variables) or a raw HTTPS client: the exact status and error code, a message that says what
to do, an audit line, and nothing reaching the stand-in."""

import http.client
import json
import os
import ssl
import threading
import time

import boto3
import botocore.exceptions
import pytest

import agent_harness as a
import relay_harness as h
from agent_harness import start_stack  # noqa: F401  (pytest fixture)

MESSAGES = [{"role": "user", "content": [{"text": "hi"}]}]


@pytest.fixture
def env_client(monkeypatch):
    """A boto3 client built from nothing but the given environment variables."""
    def make(env):
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith("AWS_") or name == "HOME":
                monkeypatch.setenv(name, value)
        return boto3.session.Session().client("bedrock-runtime")
    return make


def client_error(call):
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call()
    response = caught.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"], response["Error"]["Message"]


def raw_post(stack, path, headers, body=b"{}"):
    context = ssl.create_default_context(cafile=stack.pki["ca"])
    conn = http.client.HTTPSConnection("localhost", stack.agent.front[1], context=context, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_no_token_is_refused_with_setup_instructions(start_stack):  # noqa: F811
    stack = start_stack()
    status, headers, body = raw_post(stack, "/model/anthropic.claude-v2/converse", {"content-type": "application/json"})
    assert status == 403
    assert h.error_type(headers) == "UnrecognizedClientException"
    message = json.loads(body)["message"]
    for variable in ("AWS_BEARER_TOKEN_BEDROCK", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME", "AWS_CA_BUNDLE"):
        assert variable in message
    assert headers["x-amzn-requestid"] == headers["x-xpart-request-id"]
    [line] = stack.audit(1)
    assert (line["status"], line["error_type"], line["principal"]) == (403, "UnrecognizedClientException", None)
    assert line["message"] == "no credentials"
    assert stack.standin.requests() == []


def test_wrong_token_is_refused(start_stack, env_client):  # noqa: F811
    stack = start_stack()
    client = env_client(stack.env(token="xpart-not-a-real-token"))
    status, code, message = client_error(lambda: client.converse(modelId=a.CLAUDE, messages=MESSAGES))
    assert (status, code) == (403, "UnrecognizedClientException")
    assert "not one this xpart agent knows" in message
    [line] = stack.audit(1)
    assert line["message"] == "unknown bearer token"
    assert "xpart-not-a-real-token" not in open(stack.audit_path).read()
    assert stack.standin.requests() == []


def test_sigv4_caller_is_told_to_use_a_token(start_stack, env_client):  # noqa: F811
    stack = start_stack()
    env = stack.env(token="", AWS_ACCESS_KEY_ID=h.CALLER_KEY[0], AWS_SECRET_ACCESS_KEY=h.CALLER_KEY[1])
    client = env_client(env)
    status, code, message = client_error(lambda: client.converse(modelId=a.CLAUDE, messages=MESSAGES))
    assert (status, code) == (403, "UnrecognizedClientException")
    assert "SigV4 signatures are not accepted" in message
    assert "AWS_BEARER_TOKEN_BEDROCK" in message
    assert stack.standin.requests() == []


def test_token_from_outside_the_cidrs_is_refused(start_stack, env_client):  # noqa: F811
    token = a.new_token()
    stack = start_stack(tokens={"lambda": token},
                        principals=a.principal("lambda", token=token, cidrs=["10.0.16.0/20"]))
    client = env_client(stack.env())
    status, code, message = client_error(lambda: client.converse(modelId=a.CLAUDE, messages=MESSAGES))
    assert (status, code) == (403, "AccessDeniedException")
    assert "may not call from 127.0.0.1" in message
    [line] = stack.audit(1)
    assert (line["principal"], line["message"]) == ("lambda", "source address not allowed")
    assert stack.standin.requests() == []


def test_cidr_principal_needs_no_token(start_stack, env_client):  # noqa: F811
    stack = start_stack(principals=a.principal("subnet", cidrs=["127.0.0.0/8"], models=["anthropic.*"]))
    # boto3 signs with whatever AWS keys it finds; the agent strips the signature.
    env = stack.env(token="", AWS_ACCESS_KEY_ID=h.CALLER_KEY[0], AWS_SECRET_ACCESS_KEY=h.CALLER_KEY[1])
    out = env_client(env).converse(modelId=a.CLAUDE, messages=MESSAGES)
    assert out["output"]["message"]["content"][0]["text"] == "standin:hi"
    [record] = stack.standin.requests()
    assert record["access_key"] == h.RELAY_KEY[0]
    assert h.CALLER_KEY[0] not in json.dumps(record["headers"])


def test_model_outside_the_allowlist_is_refused(start_stack, env_client):  # noqa: F811
    stack = start_stack()
    client = env_client(stack.env())
    status, code, message = client_error(lambda: client.converse(modelId="amazon.nova-pro-v1:0", messages=MESSAGES))
    assert (status, code) == (403, "AccessDeniedException")
    assert "not allowed to use model amazon.nova-pro-v1:0" in message
    [line] = stack.audit(1)
    assert (line["model"], line["message"]) == ("amazon.nova-pro-v1:0", "model not allowed")
    assert stack.standin.requests() == []


def test_over_the_rate_is_throttled(start_stack, env_client):  # noqa: F811
    token = a.new_token()
    stack = start_stack(tokens={"lambda": token}, principals=a.principal(
        "lambda", token=token, models=["anthropic.*"], requests_per_second=0.5, burst=2))
    client = env_client(stack.env())
    client.converse(modelId=a.CLAUDE, messages=MESSAGES)
    client.converse(modelId=a.CLAUDE, messages=MESSAGES)
    status, code, message = client_error(lambda: client.converse(modelId=a.CLAUDE, messages=MESSAGES))
    assert (status, code) == (429, "ThrottlingException")
    assert "limited to 0.5 requests per second" in message
    assert len(stack.standin.requests()) == 2
    lines = stack.audit(3)
    assert lines[2]["message"] == "over rate limit"


def test_over_concurrency_is_throttled(start_stack, env_client):  # noqa: F811
    token = a.new_token()
    stack = start_stack(tokens={"lambda": token}, principals=a.principal(
        "lambda", token=token, models=["anthropic.*", "standin.*"], max_concurrent=1))
    stack.standin.hold_release.clear()
    stack.standin.hold_first_sent.clear()
    client = env_client(stack.env())
    holder = {}

    def hold():
        out = client.converse_stream(modelId="standin.hold", messages=MESSAGES)
        holder["events"] = [next(iter(e)) for e in out["stream"]]

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert stack.standin.hold_first_sent.wait(30)
        status, code, message = client_error(lambda: client.converse(modelId=a.CLAUDE, messages=MESSAGES))
        assert (status, code) == (429, "ThrottlingException")
        assert "may have 1 in flight" in message
    finally:
        stack.standin.release_hold()
        thread.join(30)
    assert holder["events"][-1] == "metadata"
    # The slot is free again once the stream has ended.
    client.converse(modelId=a.CLAUDE, messages=MESSAGES)
    assert len(stack.standin.requests()) == 2


def test_oversized_body_is_refused(start_stack, env_client):  # noqa: F811
    token = a.new_token()
    stack = start_stack(tokens={"lambda": token}, principals=a.principal(
        "lambda", token=token, models=["anthropic.*"], max_body_bytes=2000))
    client = env_client(stack.env())
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]})
    status, code, message = client_error(lambda: client.invoke_model(modelId="anthropic.claude-v2", body=big))
    assert (status, code) == (400, "ValidationException")
    assert "exceeds the 2000-byte limit" in message
    [line] = stack.audit(1)
    assert line["message"] == "body too large"
    assert stack.standin.requests() == []


GUARDRAIL_CALL = dict(guardrailIdentifier="gr-1234", guardrailVersion="1", source="INPUT",
                      content=[{"text": {"text": "hi"}}])


def test_apply_guardrail_is_refused_for_a_principal_without_the_operation(start_stack, env_client):  # noqa: F811
    """The default operations are the invoke, converse and CountTokens ones: a principal allowed
    only the echo model cannot spend on guardrails, even though ApplyGuardrail names no model."""
    token = a.new_token()
    relay_options = {"operations": ("Converse", "ApplyGuardrail"), "guardrails": ("gr-1234:1",)}
    stack = start_stack(tokens={"lambda": token}, relay_options=relay_options,
                        principals=a.principal("lambda", token=token, models=["xpart.echo"]))
    client = env_client(stack.env())
    status, code, message = client_error(lambda: client.apply_guardrail(**GUARDRAIL_CALL))
    assert (status, code) == (403, "AccessDeniedException")
    assert "Principal lambda is not allowed to call ApplyGuardrail" in message
    [line] = stack.audit(1)
    assert (line["principal"], line["operation"], line["message"]) == ("lambda", "ApplyGuardrail", "operation not allowed")
    assert stack.standin.requests() == []


def test_apply_guardrail_listed_in_operations_reaches_bedrock(start_stack, env_client):  # noqa: F811
    token = a.new_token()
    relay_options = {"operations": ("Converse", "ApplyGuardrail"), "guardrails": ("gr-1234:1",)}
    stack = start_stack(tokens={"lambda": token}, relay_options=relay_options, principals=a.principal(
        "lambda", token=token, models=["anthropic.*"], operations='["Converse", "ApplyGuardrail"]'))
    client = env_client(stack.env())
    out = client.apply_guardrail(**GUARDRAIL_CALL)
    assert out["action"] == "NONE"
    [record] = stack.standin.requests()
    assert record["path"] == "/guardrail/gr-1234/version/1/apply"
    # ConverseStream is not in this principal's list.
    status, code, _ = client_error(lambda: client.converse_stream(modelId=a.CLAUDE, messages=MESSAGES))
    assert (status, code) == (403, "AccessDeniedException")
    assert len(stack.standin.requests()) == 1


def test_random_model_ids_add_no_metric_series(start_stack, env_client):  # noqa: F811
    """Metric labels come from the config: the matched `models` entry, or denied/other."""
    token = a.new_token()
    stack = start_stack(tokens={"lambda": token}, principals=a.principal("lambda", token=token, models=["anthropic.*"]))
    client = env_client(stack.env())
    for i in range(100):
        model = f"made-up-{i}-{os.urandom(4).hex()}"
        status, code, _ = client_error(lambda: client.converse(modelId=model, messages=MESSAGES))
        assert (status, code) == (403, "AccessDeniedException")
    client.converse(modelId=a.CLAUDE, messages=MESSAGES)
    metrics = stack.agent.metrics()
    series = [line for line in metrics.splitlines() if line.startswith("xpart_agent_requests_total{")]
    assert "made-up" not in metrics
    assert len(series) == 2, series
    assert any('model="denied"' in s and s.endswith(" 100") for s in series), series
    assert any('model="anthropic.*"' in s and s.endswith(" 1") for s in series), series


# Larger than the loopback socket buffers on both ends, so a caller that writes the whole body
# before reading the answer (http.client, urllib3, boto3) is still sending when it is refused.
LARGE_UPLOAD = 16 * 1024 * 1024


def large_converse_body():
    text = "x" * LARGE_UPLOAD
    return json.dumps({"messages": [{"role": "user", "content": [{"text": text}]}]}).encode()


def upload_headers(token):
    return {"content-type": "application/json", "authorization": f"Bearer {token}"}


def test_large_upload_to_a_denied_model_reads_the_refusal(start_stack):  # noqa: F811
    """The agent answers before reading the body; the rest is read and dropped so that the
    caller, still sending, gets the 403 rather than a reset connection."""
    stack = start_stack()
    status, headers, body = raw_post(stack, "/model/amazon.nova-pro-v1:0/converse",
                                     upload_headers(stack.tokens["lambda"]), large_converse_body())
    assert status == 403
    assert h.error_type(headers) == "AccessDeniedException"
    assert "not allowed to use model amazon.nova-pro-v1:0" in json.loads(body)["message"]
    assert headers["connection"] == "close"
    [line] = stack.audit(1)
    assert (line["status"], line["message"]) == (403, "model not allowed")
    assert stack.standin.requests() == []


def test_large_upload_over_the_rate_reads_the_throttling(start_stack, env_client):  # noqa: F811
    token = a.new_token()
    stack = start_stack(tokens={"lambda": token}, principals=a.principal(
        "lambda", token=token, models=["anthropic.*"], requests_per_second=0.01, burst=1))
    env_client(stack.env()).converse(modelId=a.CLAUDE, messages=MESSAGES)
    status, headers, body = raw_post(stack, f"/model/{a.CLAUDE}/converse", upload_headers(token),
                                     large_converse_body())
    assert status == 429
    assert h.error_type(headers) == "ThrottlingException"
    assert "requests per second" in json.loads(body)["message"]
    assert len(stack.standin.requests()) == 1


def test_boto3_large_image_to_a_denied_model_raises_access_denied(start_stack, env_client):  # noqa: F811
    stack = start_stack()
    client = env_client(stack.env())
    image = {"image": {"format": "png", "source": {"bytes": os.urandom(LARGE_UPLOAD // 2)}}}
    messages = [{"role": "user", "content": [{"text": "what is this?"}, image]}]
    status, code, message = client_error(lambda: client.converse(modelId="amazon.nova-pro-v1:0", messages=messages))
    [line] = stack.audit(1)
    assert (status, code, line["message"]) == (403, "AccessDeniedException", "model not allowed")
    assert "not allowed to use model amazon.nova-pro-v1:0" in message
    assert stack.standin.requests() == []


def test_large_upload_with_no_relay_reads_the_unavailable(start_stack):  # noqa: F811
    stack = start_stack()
    stack.relays[0].kill()
    deadline = time.monotonic() + 15
    while h.get(stack.agent.admin, "/readyz")[0] == 200:
        assert time.monotonic() < deadline, "the agent still counts the killed relay healthy"
        time.sleep(0.05)
    status, headers, body = raw_post(stack, f"/model/{a.CLAUDE}/converse",
                                     upload_headers(stack.tokens["lambda"]), large_converse_body())
    assert status == 503
    assert h.error_type(headers) == "ServiceUnavailableException"
    assert json.loads(body)["message"]
    assert headers["connection"] == "close"
