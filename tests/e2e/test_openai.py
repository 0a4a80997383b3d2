"""The agent's OpenAI API with the official `openai` Python package: chat completions, plain
and streamed, tools, images, JSON mode and the error cases, through agent → WireGuard
(userspace) → relay → the relay's echo model. The relay sees native Converse calls only."""

import base64
import json
import ssl

import httpx
import openai
import pytest

import agent_harness as a
import relay_harness as h
from agent_harness import start_stack  # noqa: F401  (pytest fixture)

ECHO = "xpart.echo"
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
    principals = a.principal("lambda", token=tokens["lambda"], models=[ECHO, *a.DEFAULT_MODELS]) + a.principal(
        "narrow", token=tokens["narrow"], models=["anthropic.*"]
    )
    return start_stack(principals=principals, tokens=tokens)


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
