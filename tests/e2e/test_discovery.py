"""Model discovery and the names a caller dials, end to end: boto3 and the AWS CLI, configured
only by environment variables → xpart-agent → userspace WireGuard → xpart-relay → the Bedrock
stand-in (which verifies the relay's SigV4 for the control plane as for the runtime).

- What a caller lists is what it may call: the relay filters by its policy, the agent by the
  principal's `models`; Get of a refused model is 403; query parameters and pagination work.
- Nothing but the catalogue reads is carried on `bedrock`: writes are refused at the agent and,
  sent straight to the relay's service port, at the relay.
- Region and FIPS come from the name the caller dialled: a second region is served by its own
  upstream (the stand-in sees that region in the credential scope), an unconfigured one is
  refused naming the configured ones, a FIPS name goes only to a FIPS upstream.
- The inference-profile retry is on by default with the region's prefix.

Callers that must dial a real Bedrock name (region and FIPS tests) resolve it through the
agent's own DNS: a sitecustomize on the caller's PYTHONPATH answers getaddrinfo for
*.amazonaws.com from the agent's DNS port, as a VPC resolver rule would."""

import http.client
import json
import os
import subprocess
import sys

import pytest

import agent_harness as a
import relay_harness as h
from agent_harness import start_stack  # noqa: F401  (pytest fixture)

REGION = h.REGION
WEST = "us-west-2"
UNSERVED = "eu-west-1"
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
SONNET = "anthropic.claude-3-5-sonnet-20240620-v1:0"
SONNET_4 = "anthropic.claude-sonnet-4-20250514-v1:0"
LLAMA = "meta.llama3-8b-instruct-v1:0"  # listed by the stand-in, refused by the relay's policy
ANTHROPIC = [SONNET, HAIKU, SONNET_4]

# Two principals: the default one (anthropic.*, us.anthropic.*, standin.*) and one allowed only
# Claude 3 Haiku, directly or through its US profile.
HAIKU_ONLY = ("anthropic.claude-3-haiku-*", "us.anthropic.claude-3-haiku-*")


def runtime(region, **extra):
    return {"service": "bedrock-runtime", "region": region,
            "host_header": f"bedrock-runtime{'-fips' if extra.get('fips') else ''}.{region}.amazonaws.com", **extra}


def control(region, **extra):
    return {"service": "bedrock", "region": region,
            "host_header": f"bedrock{'-fips' if extra.get('fips') else ''}.{region}.amazonaws.com", **extra}


# The stand-in is reached through its own name (test_pki's certificate) while the relay signs
# the real one, as with a vpce-… endpoint and host_header.
ONE_REGION = [runtime(REGION, prefix="us."), control(REGION)]
TWO_REGIONS = [runtime(REGION), control(REGION), runtime(WEST), control(WEST)]
WITH_FIPS = [runtime(REGION), control(REGION), runtime(REGION, fips=True), control(REGION, fips=True)]


# The relay harness's operations plus the discovery reads, which a relay signs only when its
# [policy].operations lists them.
OPERATIONS = ("InvokeModel", "InvokeModelWithResponseStream", "Converse", "ConverseStream", "CountTokens",
              "ListFoundationModels", "GetFoundationModel", "ListInferenceProfiles", "GetInferenceProfile")


def names_for(*regions):
    return [f"{service}{fips}.{region}.amazonaws.com"
            for region in regions for service in ("bedrock-runtime", "bedrock") for fips in ("", "-fips")]


DIALLED_NAMES = names_for(REGION, WEST, UNSERVED)

SITECUSTOMIZE = '''
import os, socket
import dns.exception, dns.resolver

_host, _port = os.environ["XPART_TEST_AGENT_DNS"].rsplit(":", 1)
_resolver = dns.resolver.Resolver(configure=False)
_resolver.nameservers = [_host]
_resolver.port = int(_port)
_resolver.lifetime = 5
_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    name = host.decode() if isinstance(host, bytes) else host
    if isinstance(name, str) and name.lower().rstrip(".").endswith(".amazonaws.com"):
        try:
            answer = _resolver.resolve(name, "A")
        except dns.exception.DNSException as e:
            raise socket.gaierror(socket.EAI_NONAME, f"{name}: the agent's DNS did not answer ({e})")
        return [info for record in answer
                for info in _getaddrinfo(record.address, port, socket.AF_INET, type, proto, flags)]
    return _getaddrinfo(host, port, family, type, proto, flags)


socket.getaddrinfo = getaddrinfo
'''

CONTROL_CALLER = r"""
import json, sys, boto3, botocore.exceptions
call = json.loads(sys.argv[1])
client = boto3.client(call.get("service", "bedrock"))
try:
    if call.get("paginate"):
        pages = list(client.get_paginator(call["op"]).paginate(**call.get("args", {})))
        out = {"pages": [{k: v for k, v in p.items() if k != "ResponseMetadata"} for p in pages]}
    else:
        r = getattr(client, call["op"])(**call.get("args", {}))
        out = {k: v for k, v in r.items() if k != "ResponseMetadata"}
        out["status"] = r["ResponseMetadata"]["HTTPStatusCode"]
except botocore.exceptions.ClientError as e:
    out = {"error": e.response["Error"]["Code"], "message": e.response["Error"].get("Message", ""),
           "status": e.response["ResponseMetadata"].get("HTTPStatusCode")}
print(json.dumps(out, default=str))
"""


@pytest.fixture
def front_pki(tmp_path):
    """The agent front's certificate for every name the tests dial (and localhost)."""
    return h.certs.make_test_pki(str(tmp_path / "front-pki"), [*DIALLED_NAMES, "localhost"])


@pytest.fixture
def served(standin):
    """The stand-in accepts signatures scoped to the second region too (one port, both)."""
    standin.regions.add(WEST)
    return standin


def principals(tokens):
    return (a.principal("lambda", token=tokens["lambda"], models=a.DEFAULT_MODELS)
            + a.principal("haiku", token=tokens["haiku"], models=HAIKU_ONLY))


def start(start_stack, front_pki, upstreams, **relay_options):  # noqa: F811
    tokens = {"lambda": a.new_token(), "haiku": a.new_token()}
    return start_stack(
        principals=principals(tokens), tokens=tokens, front_pki=front_pki, dns_names=DIALLED_NAMES,
        relay_options={"upstreams": upstreams, "operations": OPERATIONS, **relay_options},
    )


def env_for(stack, principal="lambda", dialled=None, region=REGION, **extra):
    """The caller's environment. Without `dialled`, both services at the front's localhost URL
    (as the demo's caller.env); with it, the real names of that region (and FIPS form),
    resolved through the agent's DNS."""
    if dialled is None:
        endpoints = {"AWS_ENDPOINT_URL_BEDROCK": stack.agent.endpoint}
    else:
        port = stack.agent.front[1]
        endpoints = {
            "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": f"https://bedrock-runtime{dialled}.{region}.amazonaws.com:{port}",
            "AWS_ENDPOINT_URL_BEDROCK": f"https://bedrock{dialled}.{region}.amazonaws.com:{port}",
        }
        hooks = os.path.join(stack.directory, "caller-hooks")
        os.makedirs(hooks, exist_ok=True)
        with open(os.path.join(hooks, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        endpoints["PYTHONPATH"] = hooks
        endpoints["XPART_TEST_AGENT_DNS"] = f"{stack.agent.dns[0]}:{stack.agent.dns[1]}"
    env = stack.env(token=stack.tokens[principal], AWS_DEFAULT_REGION=region, AWS_REGION=region, **endpoints, **extra)
    return env


def boto3(env, op, service="bedrock", paginate=False, **args):
    call = {"op": op, "args": args, "service": service, "paginate": paginate}
    proc = subprocess.run([sys.executable, "-c", CONTROL_CALLER, json.dumps(call)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def aws(env, *args):
    proc = subprocess.run(["aws", *args, "--output", "json"], env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else None), proc.stderr


def converse(env, model=HAIKU, text="hi"):
    return boto3(env, "converse", service="bedrock-runtime", modelId=model,
                 messages=[{"role": "user", "content": [{"text": text}]}])


def model_ids(out):
    return [m["modelId"] for m in out["modelSummaries"]]


def profile_ids(out):
    return [p["inferenceProfileId"] for p in out["inferenceProfileSummaries"]]


def host_of(record):
    """The name the relay signed, without the port an endpoint's URL may add."""
    return record["host"].rsplit(":", 1)[0] if record["host"].count(":") == 1 else record["host"]


def control_records(standin):
    return [r for r in standin.requests() if "operation" in r]


# --- what a caller lists is what it may call ----------------------------------------------------

def test_lists_are_filtered_by_the_relays_policy_and_the_principals_models(start_stack, front_pki, served):  # noqa: F811
    stack = start(start_stack, front_pki, ONE_REGION)

    everything = boto3(env_for(stack), "list_foundation_models")
    haiku = boto3(env_for(stack, "haiku"), "list_foundation_models")
    profiles = boto3(env_for(stack), "list_inference_profiles")
    haiku_profiles = boto3(env_for(stack, "haiku"), "list_inference_profiles")

    # The stand-in lists Amazon, Meta, Stability and Cohere models too; the relay's policy
    # admits only anthropic.* (and standin.*), the haiku principal only Claude 3 Haiku.
    assert model_ids(everything) == ANTHROPIC, everything
    assert model_ids(haiku) == [HAIKU], haiku
    assert profile_ids(profiles) == ["us." + m for m in ANTHROPIC], profiles
    assert profile_ids(haiku_profiles) == ["us." + HAIKU], haiku_profiles
    # The summaries pass through whole.
    (summary,) = haiku["modelSummaries"]
    assert summary["modelArn"] == f"arn:aws:bedrock:{REGION}::foundation-model/{HAIKU}"
    assert summary["providerName"] == "Anthropic" and summary["inferenceTypesSupported"] == ["ON_DEMAND", "INFERENCE_PROFILE"]
    (profile,) = haiku_profiles["inferenceProfileSummaries"]
    assert profile["type"] == "SYSTEM_DEFINED" and profile["status"] == "ACTIVE"
    assert [m["modelArn"].split(":")[3] for m in profile["models"]] == ["us-east-1", "us-east-2", "us-west-2"]
    records = control_records(served)
    assert [r["operation"] for r in records] == ["ListFoundationModels", "ListFoundationModels",
                                                "ListInferenceProfiles", "ListInferenceProfiles"]
    for record in records:
        assert record["verified"] is True and record["access_key"] == h.RELAY_KEY[0], record
        assert record["service"] == "bedrock" and record["region"] == REGION
        assert host_of(record) == f"bedrock.{REGION}.amazonaws.com"
        assert not any(name.startswith("x-xpart-") for name in record["headers"])
        assert "Bearer" not in json.dumps(record["headers"])
    audit = stack.audit(4)
    assert [(line["principal"], line["operation"], line["status"]) for line in audit] == [
        ("lambda", "ListFoundationModels", 200), ("haiku", "ListFoundationModels", 200),
        ("lambda", "ListInferenceProfiles", 200), ("haiku", "ListInferenceProfiles", 200)]


def test_list_query_parameters_and_pagination_work_as_bedrocks(start_stack, front_pki, served):  # noqa: F811
    stack = start(start_stack, front_pki, ONE_REGION)
    env = env_for(stack)

    by_provider = boto3(env, "list_foundation_models", byProvider="anthropic", byOutputModality="TEXT")
    amazon = boto3(env, "list_foundation_models", byProvider="Amazon")
    system = boto3(env, "list_inference_profiles", typeEquals="SYSTEM_DEFINED")
    paged = boto3(env, "list_inference_profiles", paginate=True, PaginationConfig={"PageSize": 1})
    bad = boto3(env, "list_inference_profiles", typeEquals="SYSTEM_DEFINED", nextToken="not-a-token")

    assert model_ids(by_provider) == ANTHROPIC
    # Amazon's models exist upstream but the relay's policy admits none of them.
    assert model_ids(amazon) == []
    assert profile_ids(system) == ["us." + m for m in ANTHROPIC]
    pages = paged["pages"]
    assert [p["inferenceProfileId"] for page in pages for p in page["inferenceProfileSummaries"]] == [
        "us." + m for m in ANTHROPIC], pages
    assert all(len(page["inferenceProfileSummaries"]) <= 1 for page in pages), pages
    assert bad["status"] == 400 and bad["error"] == "ValidationException", bad
    # The parameters reached Bedrock as the caller sent them.
    sent = [r["path"] for r in control_records(served)]
    assert "byProvider=anthropic" in sent[0] and "byOutputModality=TEXT" in sent[0], sent
    assert "type=SYSTEM_DEFINED" in sent[2], sent
    assert any("maxResults=1" in p and "nextToken=" in p for p in sent[3:]), sent


def test_the_aws_cli_lists_with_only_the_environment(start_stack, front_pki, served):  # noqa: F811
    stack = start(start_stack, front_pki, ONE_REGION)

    code, models, err = aws(env_for(stack, "haiku"), "bedrock", "list-foundation-models", "--by-provider", "anthropic")
    assert code == 0, err
    assert model_ids(models) == [HAIKU]
    code, profiles, err = aws(env_for(stack), "bedrock", "list-inference-profiles")
    assert code == 0, err
    assert profile_ids(profiles) == ["us." + m for m in ANTHROPIC]
    code, details, err = aws(env_for(stack), "bedrock", "get-foundation-model", "--model-identifier", SONNET)
    assert code == 0, err
    assert details["modelDetails"]["modelId"] == SONNET


def test_get_of_an_allowed_model_works_and_of_a_refused_one_is_403(start_stack, front_pki, served):  # noqa: F811
    stack = start(start_stack, front_pki, ONE_REGION)

    allowed = boto3(env_for(stack, "haiku"), "get_foundation_model", modelIdentifier=HAIKU)
    profile = boto3(env_for(stack, "haiku"), "get_inference_profile", inferenceProfileIdentifier="us." + HAIKU)
    served.clear()
    by_principal = boto3(env_for(stack, "haiku"), "get_foundation_model", modelIdentifier=SONNET)
    profile_by_principal = boto3(env_for(stack, "haiku"), "get_inference_profile",
                                 inferenceProfileIdentifier="us." + SONNET)
    by_relay = boto3(env_for(stack), "get_foundation_model", modelIdentifier=LLAMA)
    by_arn = boto3(env_for(stack), "get_foundation_model",
                   modelIdentifier=f"arn:aws:bedrock:{REGION}::foundation-model/{LLAMA}")

    assert allowed["modelDetails"]["modelId"] == HAIKU and allowed["status"] == 200, allowed
    assert profile["inferenceProfileId"] == "us." + HAIKU, profile
    for refused in (by_principal, profile_by_principal, by_relay, by_arn):
        assert refused["status"] == 403 and refused["error"] == "AccessDeniedException", refused
    # Refused before signing: Bedrock never heard of them.
    assert control_records(served) == []


def test_writes_on_bedrock_are_refused_at_the_agent(start_stack, front_pki, served):  # noqa: F811
    stack = start(start_stack, front_pki, ONE_REGION)
    env = env_for(stack)

    created = boto3(env, "create_inference_profile", inferenceProfileName="mine",
                    modelSource={"copyFrom": f"arn:aws:bedrock:{REGION}::foundation-model/{HAIKU}"})
    deleted = boto3(env, "delete_guardrail", guardrailIdentifier="gr-1")
    profile_deleted = boto3(env, "delete_inference_profile", inferenceProfileIdentifier="us." + HAIKU)
    code, _, err = aws(env, "bedrock", "delete-guardrail", "--guardrail-identifier", "gr-1")

    for refused in (created, deleted, profile_deleted):
        assert refused["status"] in (403, 404), refused
        assert refused["error"] in ("AccessDeniedException", "UnknownOperationException"), refused
    assert code != 0 and ("AccessDeniedException" in err or "UnknownOperationException" in err), err
    assert served.requests() == []
    # The relay never saw them either: nothing reached its audit.
    assert h.read_audit(stack.relays[0].audit_path, 1, timeout=0.5) == []


def test_writes_sent_straight_to_the_relay_are_refused_there(start_relay, served):
    """An agent (or anything on the tunnel) that sends a control-plane write to the relay's
    service port gets it refused: the relay signs only the catalogue reads on `bedrock`."""
    stack = start_relay(upstreams=ONE_REGION, operations=OPERATIONS)
    headers = {"x-xpart-principal": "lambda", "x-xpart-request-id": "req-disc-1",
               "x-xpart-service": "bedrock", "x-xpart-region": REGION, "content-type": "application/json"}

    read = relay_request(stack.relay.service, "GET", "/foundation-models", headers=headers)
    served.clear()
    writes = [
        relay_request(stack.relay.service, "POST", "/inference-profiles",
                      json.dumps({"inferenceProfileName": "mine", "modelSource": {"copyFrom": HAIKU}}).encode(), headers),
        relay_request(stack.relay.service, "DELETE", "/guardrails/gr-1", headers=headers),
        relay_request(stack.relay.service, "DELETE", f"/inference-profiles/us.{HAIKU}", headers=headers),
        relay_request(stack.relay.service, "PUT", "/logging/modelinvocations", b"{}", headers),
        relay_request(stack.relay.service, "POST", "/model-customization-jobs", b"{}", headers),
        # A read's path under another method is not that read.
        relay_request(stack.relay.service, "POST", "/foundation-models", b"{}", headers),
    ]

    assert read[0] == 200, read
    # The relay filters by its own policy only (the echo model, which it answers itself, is
    # listed too); the principal's filter is the agent's.
    listed = model_ids(json.loads(read[2]))
    assert [m for m in listed if m != "xpart.echo"] == ANTHROPIC and "xpart.echo" in listed, listed
    for status, response_headers, body in writes:
        assert status in (403, 404, 405), (status, body)
        assert h.error_type(response_headers) in ("AccessDeniedException", "UnknownOperationException"), response_headers
        assert "message" in json.loads(body)
    assert served.requests() == []


def relay_request(address, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection(address[0], address[1], timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# --- regions and FIPS names ---------------------------------------------------------------------

def test_a_second_region_is_served_by_its_own_upstream(start_stack, front_pki, served):  # noqa: F811
    stack = start(start_stack, front_pki, TWO_REGIONS)

    east = converse(env_for(stack, dialled="", region=REGION), text="east")
    west = converse(env_for(stack, dialled="", region=WEST), text="west")
    west_models = boto3(env_for(stack, dialled="", region=WEST), "list_foundation_models")

    assert east["output"]["message"]["content"][0]["text"] == "standin:east", east
    assert west["output"]["message"]["content"][0]["text"] == "standin:west", west
    assert {m["modelArn"].split(":")[3] for m in west_models["modelSummaries"]} == {WEST}, west_models
    seen = [(host_of(r), r["region"], r["verified"]) for r in served.requests()]
    assert seen == [
        (f"bedrock-runtime.{REGION}.amazonaws.com", REGION, True),
        (f"bedrock-runtime.{WEST}.amazonaws.com", WEST, True),
        (f"bedrock.{WEST}.amazonaws.com", WEST, True),
    ], seen


def test_an_unconfigured_region_is_refused_naming_the_configured_ones(start_stack, front_pki, served):  # noqa: F811
    stack = start(start_stack, front_pki, TWO_REGIONS)

    refused = converse(env_for(stack, dialled="", region=UNSERVED))
    listed = boto3(env_for(stack, dialled="", region=UNSERVED), "list_foundation_models")

    for out in (refused, listed):
        assert 400 <= out["status"] < 500, out
        assert UNSERVED in out["message"], out
        assert REGION in out["message"] and WEST in out["message"], out
    assert served.requests() == []


def test_a_fips_name_goes_to_the_fips_upstream(start_stack, front_pki, served):  # noqa: F811
    stack = start(start_stack, front_pki, WITH_FIPS)

    plain = converse(env_for(stack, dialled="", region=REGION), text="plain")
    fips = converse(env_for(stack, dialled="-fips", region=REGION), text="fips")
    fips_models = boto3(env_for(stack, dialled="-fips", region=REGION), "list_foundation_models")

    assert plain["output"]["message"]["content"][0]["text"] == "standin:plain", plain
    assert fips["output"]["message"]["content"][0]["text"] == "standin:fips", fips
    assert model_ids(fips_models) == ANTHROPIC
    assert [host_of(r) for r in served.requests()] == [
        f"bedrock-runtime.{REGION}.amazonaws.com",
        f"bedrock-runtime-fips.{REGION}.amazonaws.com",
        f"bedrock-fips.{REGION}.amazonaws.com",
    ]


def test_a_fips_name_without_a_fips_upstream_is_403_never_the_plain_endpoint(start_stack, front_pki, served):  # noqa: F811
    stack = start(start_stack, front_pki, ONE_REGION)

    refused = converse(env_for(stack, dialled="-fips", region=REGION))
    listed = boto3(env_for(stack, dialled="-fips", region=REGION), "list_foundation_models")

    for out in (refused, listed):
        assert out["status"] == 403 and out["error"] == "AccessDeniedException", out
        assert "FIPS" in out["message"], out
    assert served.requests() == []


# --- inference profiles by default --------------------------------------------------------------

def test_the_profile_retry_uses_the_regions_prefix_with_none_configured(start_stack, front_pki, served):  # noqa: F811
    stack = start(start_stack, front_pki, [runtime(REGION), control(REGION)])
    served.on_demand_refused.add(HAIKU)

    out = converse(env_for(stack), text="retry")

    assert out["output"]["message"]["content"][0]["text"] == "standin:retry", out
    assert [r["path"] for r in served.requests()] == [
        f"/model/{HAIKU.replace(':', '%3A')}/converse",
        f"/model/us.{HAIKU.replace(':', '%3A')}/converse",
    ]


def test_none_turns_the_profile_retry_off(start_stack, front_pki, served):  # noqa: F811
    stack = start(start_stack, front_pki, [runtime(REGION, prefix="none"), control(REGION)])
    served.on_demand_refused.add(HAIKU)

    out = converse(env_for(stack))

    assert out["status"] == 400 and out["error"] == "ValidationException", out
    assert "on-demand throughput" in out["message"]
    assert len(served.requests()) == 1
