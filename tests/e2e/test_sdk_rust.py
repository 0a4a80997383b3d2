"""The AWS SDK for Rust as a caller: tests/sdk-rust's example (aws-sdk-bedrockruntime and
aws-sdk-bedrock on aws-config's own TLS) runs Converse, ConverseStream and ListFoundationModels
through agent → userspace tunnel → relay → the Bedrock stand-in, configured only by
environment variables.

The Rust SDK reads no AWS_CA_BUNDLE (awslabs/aws-sdk-rust#1362); its TLS client takes its
roots from SSL_CERT_FILE instead, which is what an application using it would set."""

import os
import subprocess

import pytest

import agent_harness as a
import relay_harness as h
from agent_harness import start_stack  # noqa: F401  (pytest fixture)

# What the stand-in's catalogue lists that both the relay's policy (anthropic.*, standin.*, …)
# and the default principal (anthropic.*, us.anthropic.*, standin.*) allow.
ALLOWED_MODELS = [
    "anthropic.claude-3-5-sonnet-20240620-v1:0",
    "anthropic.claude-3-haiku-20240307-v1:0",
    "anthropic.claude-sonnet-4-20250514-v1:0",
]


@pytest.fixture(scope="module")
def sdk_client():
    path = os.path.join(h.bin_dir(), "examples", "sdk_client")
    if not os.access(path, os.X_OK):
        pytest.skip(f"the Rust SDK caller is not built at {path} (cargo build -p xpart-sdk-tests --examples)")
    return path


def run_sdk(path, env, model):
    done = subprocess.run([path, model], env=env, capture_output=True, text=True, timeout=120)
    results = dict(line.split("\t", 1) for line in done.stdout.splitlines() if "\t" in line)
    return done, results


# The runtime and the control plane of the stand-in's region; the control plane is reached
# through the stand-in's name and signs the real one (as a vpce-… endpoint with host_header).
UPSTREAMS = [
    {"service": "bedrock-runtime", "region": h.REGION},
    {"service": "bedrock", "region": h.REGION, "host_header": f"bedrock.{h.REGION}.amazonaws.com"},
]


OPERATIONS = ("InvokeModel", "InvokeModelWithResponseStream", "Converse", "ConverseStream", "ListFoundationModels")


def sdk_env(stack, **extra):
    """stack.env() as the Rust SDK reads it: the same endpoints, the CA through SSL_CERT_FILE."""
    return stack.env(
        AWS_ENDPOINT_URL_BEDROCK=stack.agent.endpoint,
        AWS_REGION=h.REGION,
        SSL_CERT_FILE=stack.pki["ca"],
        **extra,
    )


def test_rust_sdk_converse_stream_and_model_listing_through_the_whole_path(start_stack, sdk_client):  # noqa: F811
    stack = start_stack(relay_options={"upstreams": UPSTREAMS, "operations": OPERATIONS})

    done, results = run_sdk(sdk_client, sdk_env(stack), a.CLAUDE)

    assert done.returncode == 0, done
    assert results["converse"] == "standin:hello from rust", done
    assert results["converse-stream"] == "standin:streamed from rust", done
    assert results["models"].split(",") == ALLOWED_MODELS, done
    records = stack.standin.requests()
    assert [r["path"].split("?")[0] for r in records] == [
        "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse",
        "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream",
        "/foundation-models",
    ], records
    for record in records:
        # Signed by the relay with its own key, for the stand-in's region; the caller's bearer
        # token never left the agent.
        assert record["verified"] is True, record.get("problem")
        assert record["access_key"] == h.RELAY_KEY[0]
        assert record["region"] == h.REGION and record["service"] == "bedrock"
        assert stack.tokens["lambda"] not in str(record["headers"])
    audit = stack.audit(3)
    assert [(line["principal"], line["operation"], line["status"]) for line in audit] == [
        ("lambda", "Converse", 200),
        ("lambda", "ConverseStream", 200),
        ("lambda", "ListFoundationModels", 200),
    ], audit


def test_rust_sdk_without_the_token_is_refused_at_the_agent(start_stack, sdk_client):  # noqa: F811
    stack = start_stack(relay_options={"upstreams": UPSTREAMS, "operations": OPERATIONS})
    env = sdk_env(stack)
    env["AWS_BEARER_TOKEN_BEDROCK"] = "xpart-not-the-token"

    done, results = run_sdk(sdk_client, env, a.CLAUDE)

    assert done.returncode == 1, done
    assert "converse" not in results
    assert "UnrecognizedClientException" in done.stderr, done.stderr
    assert stack.standin.requests() == []
