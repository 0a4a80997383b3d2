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
