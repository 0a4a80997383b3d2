"""The agent's OpenAI API with the official `openai` Python package: chat completions, plain
and streamed, tools, images, JSON mode, embeddings and the error cases, through agent →
WireGuard (userspace) → relay → the relay's echo models or the Bedrock stand-in. The relay
sees native Converse and InvokeModel calls only."""

import base64
import json
import math
import os
import shutil
import ssl
import struct
import subprocess

import httpx
import openai
import pytest

import agent_harness as a
import relay_harness as h
from agent_harness import start_stack  # noqa: F401  (pytest fixture)

ECHO = "xpart.echo"
ECHO_EMBED = "xpart.echo-embed"
TITAN = "amazon.titan-embed-text-v2:0"
COHERE = "cohere.embed-english-v3"
# The relay signs Titan v2 and Cohere Embed; Titan v1 only the agent allows (the relay refuses).
RELAY_MODELS = ("anthropic.*", "standin.*", "amazon.titan-embed-text-v2*", "cohere.embed-*")
EMBED_TOKENS = h.bedrock_standin.EMBED_TOKENS
NODE_DIR = os.path.join(os.path.dirname(__file__), "..", "node")
# 1×1 transparent PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
def stack(start_stack):  # noqa: F811
    tokens = {"lambda": a.new_token(), "narrow": a.new_token()}
    models = [ECHO, ECHO_EMBED, "amazon.titan-embed-*", "cohere.embed-*", *a.DEFAULT_MODELS]
    principals = a.principal("lambda", token=tokens["lambda"], models=models) + a.principal(
        "narrow", token=tokens["narrow"], models=["anthropic.*"]
    )
    return start_stack(principals=principals, tokens=tokens, relay_options={"models": RELAY_MODELS})


def client(stack, token=None):
    """An OpenAI client configured as a caller would be: base URL, API key, the xpart CA."""
    token = stack.tokens["lambda"] if token is None else token
    return openai.OpenAI(
        base_url=f"{stack.agent.endpoint}/v1",
        api_key=token,
        max_retries=0,
        timeout=30,
        http_client=httpx.Client(verify=ssl.create_default_context(cafile=stack.pki["ca"])),
    )


def test_chat_completion_through_the_whole_path(stack):
    answer = client(stack).chat.completions.create(
        model=ECHO,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello openai"}],
        max_tokens=50,
        temperature=0.1,
        user="alice@example.com",
    )
    assert answer.object == "chat.completion"
    assert answer.model == ECHO
    assert answer.id.startswith("chatcmpl-")
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "hello openai"
    assert choice.finish_reason == "stop"
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.usage.prompt_tokens_details.cached_tokens == 0

    [line] = stack.audit(1)
    assert line["endpoint"] == "openai /v1/chat/completions"
    assert line["operation"] == "Converse"
    assert line["model"] == ECHO
    assert line["principal"] == "lambda"
    assert line["end_user"] == "alice@example.com"
    assert line["status"] == 200
    assert answer.id == f"chatcmpl-{line['request_id']}"
    # The relay saw and audited the native call.
    [relay_line] = h.read_audit(stack.relays[0].audit_path, 1)
    assert relay_line["operation"] == "Converse"
    assert relay_line["request_id"] == line["request_id"]


def test_streamed_chat_arrives_as_chunks_then_done(stack):
    stream = client(stack).chat.completions.create(
        model=ECHO,
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 4, "one chunk per Converse delta, never coalesced"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.total_tokens > 0
    [line] = stack.audit(1)
    assert line["operation"] == "ConverseStream"
    assert line["endpoint"] == "openai /v1/chat/completions"


def test_stream_ends_with_done_on_the_wire(stack):
    response = httpx.post(
        f"{stack.agent.endpoint}/v1/chat/completions",
        headers={"Authorization": f"Bearer {stack.tokens['lambda']}"},
        json={"model": ECHO, "messages": [{"role": "user", "content": "wire"}], "stream": True},
        verify=ssl.create_default_context(cafile=stack.pki["ca"]),
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[0][6:]), "no usage field without include_usage"


def test_tool_call_then_tool_result_round_trip(stack):
    c = client(stack)
    messages = [{"role": "user", "content": 'call get_weather {"city": "Paris"}'}]
    answer = c.chat.completions.create(model=ECHO, messages=messages, tools=[WEATHER_TOOL], tool_choice="auto")
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
    ]
    answer = c.chat.completions.create(model=ECHO, messages=messages, tools=[WEATHER_TOOL])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == f"[tool result {call.id}: 18C and sunny]"


def test_streamed_tool_call_deltas(stack):
    stream = client(stack).chat.completions.create(
        model=ECHO,
        messages=[{"role": "user", "content": 'call get_weather {"city": "Oslo", "unit": "C"}'}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    calls = [tc for chunk in stream if chunk.choices for tc in (chunk.choices[0].delta.tool_calls or [])]
    first, *fragments = calls
    assert first.index == 0 and first.id and first.function.name == "get_weather"
    assert len(fragments) > 1, "arguments arrive in fragments"
    assert all(f.index == 0 and f.id is None for f in fragments)
    arguments = (first.function.arguments or "") + "".join(f.function.arguments for f in fragments)
    assert json.loads(arguments) == {"city": "Oslo", "unit": "C"}


def test_image_part_reaches_the_model_as_an_image_block(stack):
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    answer = client(stack).chat.completions.create(
        model=ECHO,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this? "},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
    )
    assert answer.choices[0].message.content == f"what is this? [image: png, {len(PNG)} bytes]"


def test_http_image_url_is_refused_and_nothing_is_sent(stack):
    with pytest.raises(openai.BadRequestError) as raised:
        client(stack).chat.completions.create(
            model=ECHO,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}],
        )
    error = raised.value
    assert error.status_code == 400
    assert error.body["type"] == "invalid_request_error"
    assert error.body["param"] == "messages[0].content[0].image_url"
    assert "never fetches" in error.body["message"]
    [line] = stack.audit(1)
    assert line["status"] == 400 and line["endpoint"] == "openai /v1/chat/completions"
    assert h.read_audit(stack.relays[0].audit_path, 0) == []


def test_json_mode_asks_the_model_by_instruction(stack):
    answer = client(stack).chat.completions.create(
        model=ECHO,
        messages=[{"role": "user", "content": '{"answer": 42}'}],
        response_format={"type": "json_object"},
    )
    assert json.loads(answer.choices[0].message.content) == {"answer": 42}


def test_answer_changing_parameter_is_refused(stack):
    with pytest.raises(openai.BadRequestError) as raised:
        client(stack).chat.completions.create(model=ECHO, messages=[{"role": "user", "content": "x"}], n=2)
    assert raised.value.body["param"] == "n"


def test_unknown_token_is_401(stack):
    with pytest.raises(openai.AuthenticationError) as raised:
        client(stack, token="xpt_not_a_known_token").chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": "x"}]
        )
    assert raised.value.status_code == 401
    assert raised.value.body["code"] == "invalid_api_key"
    [line] = stack.audit(1)
    assert line["status"] == 401 and line["principal"] is None


def test_model_not_allowed_is_403_and_nothing_is_sent(stack):
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client(stack, token=stack.tokens["narrow"]).chat.completions.create(
            model=ECHO, messages=[{"role": "user", "content": "x"}]
        )
    assert raised.value.status_code == 403
    assert raised.value.body["code"] == "model_not_allowed"
    [line] = stack.audit(1)
    assert line["status"] == 403 and line["principal"] == "narrow" and line["operation"] == "Converse"
    assert h.read_audit(stack.relays[0].audit_path, 0) == []


def test_unserved_v1_path_is_an_openai_404(stack):
    with pytest.raises(openai.NotFoundError) as raised:
        client(stack).files.list()
    assert raised.value.body["type"] == "invalid_request_error"


# --- embeddings -------------------------------------------------------------------------------

def test_embeddings_float_and_base64_are_the_same_unit_vectors(stack):
    c = client(stack)
    floats = c.embeddings.create(model=ECHO_EMBED, input=["alpha", "beta gamma"], encoding_format="float",
                                 user="bob@example.com")
    assert floats.object == "list" and floats.model == ECHO_EMBED
    assert [d.index for d in floats.data] == [0, 1]
    for d in floats.data:
        assert d.object == "embedding" and len(d.embedding) == 1024
        assert math.isclose(math.sqrt(sum(x * x for x in d.embedding)), 1.0, rel_tol=1e-4)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens

    # Base64 on the wire: the little-endian f32s of the same vectors.
    raw = c.embeddings.create(model=ECHO_EMBED, input=["alpha", "beta gamma"], encoding_format="base64")
    for as_float, as_base64 in zip(floats.data, raw.data):
        packed = base64.b64decode(as_base64.embedding)
        decoded = struct.unpack(f"<{len(packed) // 4}f", packed)
        assert len(decoded) == 1024
        assert all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(decoded, as_float.embedding))
    # The SDK's default: it asks for base64 and decodes it itself.
    default = c.embeddings.create(model=ECHO_EMBED, input="alpha", dimensions=256)
    assert len(default.data[0].embedding) == 256
    again = c.embeddings.create(model=ECHO_EMBED, input="alpha", dimensions=256, encoding_format="float")
    assert all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
               for x, y in zip(default.data[0].embedding, again.data[0].embedding)), "deterministic"

    first = stack.audit(4)[0]
    assert first["endpoint"] == "openai /v1/embeddings"
    assert first["operation"] == "InvokeModel" and first["model"] == ECHO_EMBED
    assert first["status"] == 200 and first["end_user"] == "bob@example.com"
    relay_lines = h.read_audit(stack.relays[0].audit_path, 2 + 2 + 1 + 1)
    assert {l["operation"] for l in relay_lines} == {"InvokeModel"}
    assert relay_lines[0]["request_id"] == relay_lines[1]["request_id"] == first["request_id"]


def test_titan_fans_out_one_invoke_model_per_input(stack):
    texts = ["a", "bbb", "cc"]
    answer = client(stack).embeddings.create(model=TITAN, input=texts, dimensions=512, encoding_format="float")
    calls = embed_calls(stack, TITAN)
    assert sorted(call["inputText"] for call in calls) == sorted(texts)
    assert all(call["dimensions"] == 512 and call["normalize"] is True for call in calls), calls
    # Answers come back in input order, whatever order the calls finished in.
    assert [round(d.embedding[0] * 100) for d in answer.data] == [len(t) for t in texts]
    assert all(len(d.embedding) == 512 for d in answer.data)
    assert answer.usage.prompt_tokens == EMBED_TOKENS * len(texts)
    [line] = stack.audit(1)
    assert (line["operation"], line["model"], line["status"]) == ("InvokeModel", TITAN, 200)
    assert line["input_tokens"] == EMBED_TOKENS * len(texts), "counted against the principal's budgets"


def test_cohere_batches_inputs_with_its_input_type(stack):
    texts = [f"text {i:03d}" + "x" * (i % 5) for i in range(100)]
    answer = client(stack).embeddings.create(model=COHERE, input=texts, encoding_format="float")
    calls = embed_calls(stack, COHERE)
    assert sorted(len(call["texts"]) for call in calls) == [4, 96]
    assert all(call["input_type"] == "search_document" for call in calls), "Cohere's default for stored text"
    assert [round(d.embedding[0] * 100) for d in answer.data] == [len(t) for t in texts]
    assert answer.usage.prompt_tokens == EMBED_TOKENS * len(texts), "from X-Amzn-Bedrock-Input-Token-Count"

    client(stack).embeddings.create(model=COHERE, input="query", extra_body={"input_type": "search_query"})
    assert embed_calls(stack, COHERE)[-1]["input_type"] == "search_query"


def test_embedding_refusals_are_openai_shaped_and_send_nothing(stack):
    c = client(stack)
    cases = [
        ({"input": [[1, 2, 3]]}, "input", "Token arrays"),
        ({"input": [1, 2, 3]}, "input", "Token arrays"),
        ({"input": "x", "dimensions": 300}, "dimensions", "256, 512, 1024"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "base64"),
    ]
    for arguments, param, said in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            c.embeddings.create(model=TITAN, **arguments)
        body = raised.value.body
        assert (body["type"], body["param"]) == ("invalid_request_error", param), body
        assert said in body["message"], body
    with pytest.raises(openai.BadRequestError) as raised:
        c.embeddings.create(model="anthropic.claude-3-haiku-20240307-v1:0", input="x")
    assert raised.value.body["param"] == "model"
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client(stack, token=stack.tokens["narrow"]).embeddings.create(model=TITAN, input="x")
    assert raised.value.body["code"] == "model_not_allowed"
    with pytest.raises(openai.AuthenticationError):
        client(stack, token="xpt_not_a_known_token").embeddings.create(model=TITAN, input="x")
    lines = stack.audit(len(cases) + 3)
    assert all(l["endpoint"] == "openai /v1/embeddings" for l in lines), lines
    assert [l["status"] for l in lines] == [400] * (len(cases) + 1) + [403, 401]
    assert embed_calls(stack, TITAN) == []
    assert h.read_audit(stack.relays[0].audit_path, 0) == []


def test_a_relay_refusal_becomes_an_openai_error(stack):
    """Titan v1 passes the agent's allowlist but not the relay's policy: the relay's Bedrock
    AccessDeniedException reaches the caller as OpenAI's permission_error, status kept."""
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client(stack).embeddings.create(model="amazon.titan-embed-text-v1", input=["x", "y"])
    assert raised.value.status_code == 403
    assert raised.value.body["type"] == "permission_error"
    [line] = stack.audit(1)
    assert line["status"] == 403 and line["error_type"] == "AccessDeniedException"
    assert line["endpoint"] == "openai /v1/embeddings"


def embed_calls(stack, model):
    """The InvokeModel bodies the stand-in received for `model`."""
    return [r["embed_request"] for r in stack.standin.requests()
            if r.get("model") == model and "embed_request" in r]


# --- the openai npm package -------------------------------------------------------------------

@pytest.fixture(scope="module")
def node_openai(tmp_path_factory):
    """tests/node's locked `openai` package installed (npm ci) into a scratch directory."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the openai npm package test needs Node.js and npm")
    npm = shutil.which("npm")
    assert npm is not None, "node is installed but npm is not (Debian: apt-get install npm)"
    directory = tmp_path_factory.mktemp("node")
    for name in ("package.json", "package-lock.json", "openai_check.mjs"):
        shutil.copy(os.path.join(NODE_DIR, name), directory / name)
    done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=directory,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done
    return directory


def test_openai_npm_package_streams_chat_and_embeds(stack, node_openai):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(node_openai),
        "OPENAI_BASE_URL": f"{stack.agent.endpoint}/v1",
        "OPENAI_API_KEY": stack.tokens["lambda"],
        "NODE_EXTRA_CA_CERTS": stack.pki["ca"],
    }
    done = subprocess.run(["node", "openai_check.mjs", ECHO, ECHO_EMBED], cwd=node_openai, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done
    seen = json.loads(done.stdout)
    assert seen["text"] == "hello from node"
    assert seen["contentChunks"] >= 3, "one chunk per Converse delta"
    assert seen["finishReason"] == "stop"
    assert seen["usage"]["total_tokens"] > 0
    assert seen["embeddings"] == [{"index": 0, "length": 256}, {"index": 1, "length": 256}]
    assert all(math.isclose(n, 1.0, rel_tol=1e-4) for n in seen["norms"]), seen
    assert seen["embeddingUsage"]["prompt_tokens"] > 0
    lines = stack.audit(2)
    assert [(l["endpoint"], l["operation"]) for l in lines] == [
        ("openai /v1/chat/completions", "ConverseStream"),
        ("openai /v1/embeddings", "InvokeModel"),
    ]


# --- models -----------------------------------------------------------------------------------

# The relay signs the control plane's discovery reads only when [policy].operations lists them,
# for a [[upstream]] of service bedrock.
DISCOVERY_OPERATIONS = ("InvokeModel", "InvokeModelWithResponseStream", "Converse", "ConverseStream", "CountTokens",
                        "ListFoundationModels", "GetFoundationModel", "ListInferenceProfiles", "GetInferenceProfile")
UPSTREAMS = [{"service": service, "region": h.REGION, "host_header": f"{service}.{h.REGION}.amazonaws.com"}
             for service in ("bedrock-runtime", "bedrock")]
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


@pytest.fixture
def discovery_stack(start_stack):  # noqa: F811
    tokens = {"lambda": a.new_token(), "haiku": a.new_token()}
    principals = a.principal("lambda", token=tokens["lambda"], models=[ECHO, "amazon.titan-embed-*", *a.DEFAULT_MODELS]) \
        + a.principal("haiku", token=tokens["haiku"], models=["anthropic.claude-3-haiku-*", "us.anthropic.claude-3-haiku-*"])
    relay = {"models": (*RELAY_MODELS, "us.anthropic.*"), "upstreams": UPSTREAMS, "operations": DISCOVERY_OPERATIONS}
    return start_stack(principals=principals, tokens=tokens, relay_options=relay)


def test_models_list_what_the_principal_may_call(discovery_stack):
    stack = discovery_stack
    models = client(stack).models.list()
    ids = [m.id for m in models.data]
    assert HAIKU in ids and "amazon.titan-embed-text-v2:0" in ids, ids
    assert f"us.{HAIKU}" in ids, "inference profiles are listed too"
    # Listed by the stand-in but refused by the relay's policy or the principal's models.
    for refused in ("meta.llama3-8b-instruct-v1:0", "amazon.nova-lite-v1:0", "cohere.command-r-v1:0"):
        assert refused not in ids, ids
    assert len(ids) == len(set(ids))
    haiku = next(m for m in models.data if m.id == HAIKU)
    assert (haiku.object, haiku.owned_by, haiku.created) == ("model", "Anthropic", 0)
    profile = next(m for m in models.data if m.id == f"us.{HAIKU}")
    assert profile.owned_by == "aws" and profile.created == 1724976000  # 2024-08-30T00:00:00Z

    narrow = [m.id for m in client(stack, token=stack.tokens["haiku"]).models.list().data]
    assert sorted(narrow) == sorted([HAIKU, f"us.{HAIKU}"]), narrow

    lines = stack.audit(2)
    assert [(l["endpoint"], l["operation"], l["status"]) for l in lines] == [("openai /v1/models", "ListFoundationModels", 200)] * 2
    relay_ops = sorted(l["operation"] for l in h.read_audit(stack.relays[0].audit_path, 4))
    assert relay_ops == ["ListFoundationModels"] * 2 + ["ListInferenceProfiles"] * 2


def test_model_retrieval_and_404_for_unknown_or_unallowed(discovery_stack):
    stack = discovery_stack
    model = client(stack).models.retrieve(HAIKU)
    assert (model.id, model.object, model.owned_by) == (HAIKU, "model", "Anthropic")
    with pytest.raises(openai.NotFoundError) as raised:
        client(stack).models.retrieve("meta.llama3-8b-instruct-v1:0")
    assert raised.value.body["code"] == "model_not_found"
    assert raised.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client(stack, token=stack.tokens["haiku"]).models.retrieve("amazon.titan-embed-text-v2:0")
    lines = stack.audit(3)
    assert [(l["endpoint"], l["status"]) for l in lines] == [("openai /v1/models", 200), ("openai /v1/models", 404),
                                                             ("openai /v1/models", 404)]
