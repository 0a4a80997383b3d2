"""The whole path on loopback with real, unmodified clients: boto3 and the AWS CLI, configured
only by environment variables (AWS_ENDPOINT_URL_BEDROCK_RUNTIME, AWS_CA_BUNDLE,
AWS_BEARER_TOKEN_BEDROCK) → xpart-agent (TLS front) → WireGuard in userspace mode →
xpart-relay → the Bedrock stand-in, which verifies the relay's SigV4 with botocore."""

import json
import threading
import time

import pytest

import agent_harness as a
import relay_harness as h
from agent_harness import start_stack  # noqa: F401  (pytest fixture)


def assert_clean_upstream(record):
    """Only the relay's own credentials reached the stand-in."""
    flat = json.dumps(record["headers"])
    assert record["verified"] is True, record.get("problem")
    assert record["access_key"] == h.RELAY_KEY[0]
    assert "Bearer" not in flat
    assert "xpart-" not in flat.replace("xpart.echo", "")
    assert not any(name.startswith("x-xpart-") for name in record["headers"])


@pytest.fixture
def stack(start_stack):  # noqa: F811
    return start_stack()


def test_converse_through_the_whole_path(stack):
    out = a.boto3_call(stack.env(), op="converse", model=a.CLAUDE, text="hello over the tunnel")
    assert out.get("text") == "standin:hello over the tunnel", out
    [record] = stack.standin.requests()
    assert_clean_upstream(record)
    assert record["path"] == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    assert stack.tokens["lambda"] not in json.dumps(record)

    [line] = stack.audit(1)
    assert line["service"] == "agent"
    assert line["principal"] == "lambda"
    assert line["source"] == "127.0.0.1"
    assert line["operation"] == "Converse"
    assert line["model"] == a.CLAUDE
    assert line["relay"] == "relay-a"
    assert line["status"] == 200
    assert line["request_id"] == out["headers"]["x-xpart-request-id"]
    assert line["bytes_in"] > 0 and line["bytes_out"] > 0
    # The relay audited the same request under the agent's id and principal.
    [relay_line] = h.read_audit(stack.relays[0].audit_path, 1)
    assert relay_line["request_id"] == line["request_id"]
    assert relay_line["principal"] == "lambda"


def test_converse_stream_arrives_frame_by_frame(stack):
    stack.standin.hold_release.clear()
    stack.standin.hold_first_sent.clear()
    result = {}

    def call():
        result["out"] = a.boto3_call(stack.env(), op="converse_stream", model="standin.hold", text="streamed")

    caller = threading.Thread(target=call)
    caller.start()
    assert stack.standin.hold_first_sent.wait(30), "the stand-in never started streaming"
    time.sleep(1.0)
    stack.standin.release_hold()
    caller.join(60)
    events = result["out"]["events"]
    kinds = [e["kind"] for e in events]
    assert kinds == ["messageStart", "contentBlockDelta", "contentBlockDelta", "contentBlockStop", "messageStop", "metadata"]
    text = "".join(e["event"]["contentBlockDelta"]["delta"]["text"] for e in events if e["kind"] == "contentBlockDelta")
    assert text == "standin:streamed"
    # The first event reached the caller while the stand-in was still holding the rest.
    assert events[1]["at"] - events[0]["at"] >= 0.8, events


def test_invoke_model(stack):
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 20,
            "messages": [{"role": "user", "content": "invoke me"}]}
    out = a.boto3_call(stack.env(), op="invoke_model", model="anthropic.claude-v2", body=body)
    assert out["body"]["content"][0]["text"] == "standin:invoke me", out
    [record] = stack.standin.requests()
    assert_clean_upstream(record)
    assert record["headers"]["content-type"] == "application/json"


def test_invoke_model_with_response_stream_frame_by_frame(stack):
    stack.standin.hold_release.clear()
    stack.standin.hold_first_sent.clear()
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 20,
            "messages": [{"role": "user", "content": "stream chunks"}]}
    result = {}

    def call():
        result["out"] = a.boto3_call(stack.env(), op="invoke_model_stream", model="standin.hold", body=body)

    caller = threading.Thread(target=call)
    caller.start()
    assert stack.standin.hold_first_sent.wait(30)
    time.sleep(1.0)
    stack.standin.release_hold()
    caller.join(60)
    chunks = result["out"]["chunks"]
    assert [c["chunk"]["type"] for c in chunks] == ["message_start", "content_block_delta", "message_stop"]
    assert chunks[1]["chunk"]["delta"]["text"] == "standin:stream chunks"
    assert chunks[1]["at"] - chunks[0]["at"] >= 0.8, chunks


def test_count_tokens(stack):
    out = a.boto3_call(stack.env(), op="count_tokens", model=a.CLAUDE, text="count me")
    assert out == {"inputTokens": 11}
    [record] = stack.standin.requests()
    assert_clean_upstream(record)
    assert record["path"].endswith("/count-tokens")


@pytest.mark.parametrize(
    "kind,status,code",
    [
        ("throttling", 429, "ThrottlingException"),
        ("validation", 400, "ValidationException"),
        ("access-denied", 403, "AccessDeniedException"),
        ("model-timeout", 408, "ModelTimeoutException"),
        ("model-error", 424, "ModelErrorException"),
        ("internal", 500, "InternalServerException"),
        ("unavailable", 503, "ServiceUnavailableException"),
        ("not-found", 404, "ResourceNotFoundException"),
    ],
)
def test_stand_in_errors_reach_boto3_with_their_codes(stack, kind, status, code):
    out = a.boto3_call(stack.env(), op="converse", model=f"standin.error.{kind}", text="x")
    assert out["error"] == code, out
    assert out["status"] == status
    assert out["message"] == h.bedrock_standin.ERRORS[kind][2]
    [line] = stack.audit(1)
    assert line["status"] == status
    assert line["error_type"] == code


def test_aws_cli_converse_invoke_and_count_tokens(stack):
    env = stack.env()
    messages = json.dumps([{"role": "user", "content": [{"text": "from the cli"}]}])
    code, out, err = a.aws_cli(env, "converse", "--model-id", a.CLAUDE, "--messages", messages)
    assert code == 0, err
    assert json.loads(out)["output"]["message"]["content"][0]["text"] == "standin:from the cli"

    code, out, err = a.aws_cli(
        env, "count-tokens", "--model-id", a.CLAUDE,
        "--input", json.dumps({"converse": {"messages": [{"role": "user", "content": [{"text": "n"}]}]}}),
    )
    assert code == 0, err
    assert json.loads(out)["inputTokens"] == 11

    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5,
                       "messages": [{"role": "user", "content": "cli invoke"}]})
    outfile = f"{stack.directory}/invoke-out.json"
    code, out, err = a.aws_cli(env, "invoke-model", "--model-id", "anthropic.claude-v2", "--body", body,
                               outfile)
    assert code == 0, err
    with open(outfile) as f:
        assert json.load(f)["content"][0]["text"] == "standin:cli invoke"

    for record in stack.standin.requests():
        assert_clean_upstream(record)
    assert len(stack.standin.requests()) == 3


def test_aws_cli_sees_stand_in_error_codes(stack):
    messages = json.dumps([{"role": "user", "content": [{"text": "x"}]}])
    code, _, err = a.aws_cli(stack.env(), "converse", "--model-id", "standin.error.throttling", "--messages", messages)
    assert code != 0
    assert "ThrottlingException" in err


def test_aws_cli_without_token_is_told_how_to_configure(stack):
    env = stack.env(token="")
    messages = json.dumps([{"role": "user", "content": [{"text": "x"}]}])
    code, _, err = a.aws_cli(env, "converse", "--model-id", a.CLAUDE, "--messages", messages)
    assert code != 0
    # Without a token or AWS credentials the CLI cannot even sign; with dummy AWS keys it
    # signs with SigV4 and the agent explains what to set instead.
    env = stack.env(token="", AWS_ACCESS_KEY_ID=h.CALLER_KEY[0], AWS_SECRET_ACCESS_KEY=h.CALLER_KEY[1])
    code, _, err = a.aws_cli(env, "converse", "--model-id", a.CLAUDE, "--messages", messages)
    assert code != 0
    assert "UnrecognizedClientException" in err
    assert "AWS_BEARER_TOKEN_BEDROCK" in err
    assert stack.standin.requests() == []


def test_status_and_metrics_show_the_tunnel(stack):
    a.boto3_call(stack.env(), op="converse", model=a.CLAUDE, text="m")
    status, body = stack.agent.admin_json("/status")
    assert status == 200
    assert body["ready"] is True
    assert body["active_relay"] == "relay-a"
    assert body["tunnel"]["mode"] == "userspace"
    [peer] = body["tunnel"]["peers"]
    assert peer["name"] == "relay-a"
    assert peer["last_handshake"] is not None
    assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0
    metrics = stack.agent.metrics()
    assert 'xpart_agent_relay_healthy{relay="relay-a"} 1' in metrics
    assert 'operation="Converse",principal="lambda",status="200"} 1' in metrics
    assert 'xpart_tunnel_peer_bytes_total{direction="rx",peer="relay-a"}' in metrics
    assert 'xpart_tunnel_peer_up{peer="relay-a"} 1' in metrics
