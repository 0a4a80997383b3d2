"""Token usage and token budgets through the whole path: boto3 → xpart-agent → WireGuard
(userspace) → xpart-relay → the Bedrock stand-in, which reports known usage for each of the
four generating operations (bedrock_standin.USAGE). Both daemons' audit lines and counters
must carry exactly those numbers; a stream cut before its usage says so; a principal over its
token budget is refused with 429 ThrottlingException naming the budget and its reset, with
Retry-After, and stays refused after the agent restarts."""

import datetime
import http.client
import json
import re
import ssl
import time

import pytest

import agent_harness as a
import relay_harness as h
from agent_harness import start_stack  # noqa: F401  (pytest fixture)

USAGE = h.bedrock_standin.USAGE

ANTHROPIC_BODY = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 20,
                  "messages": [{"role": "user", "content": "count my tokens"}]}

CALLS = [
    ("Converse", "converse", {"op": "converse", "text": "usage please"}),
    ("ConverseStream", "converse-stream", {"op": "converse_stream", "text": "usage please"}),
    ("InvokeModel", "invoke", {"op": "invoke_model", "body": ANTHROPIC_BODY}),
    ("InvokeModelWithResponseStream", "invoke-with-response-stream",
     {"op": "invoke_model_stream", "body": ANTHROPIC_BODY}),
]
KINDS = ("input", "output", "cache_read", "cache_write")


def tokens_of(line):
    return tuple(line.get(f"{kind}_tokens") for kind in KINDS)


def counters(text, name):
    """{frozenset(labels.items()): value} of one counter in Prometheus text format."""
    found = {}
    for row in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", row)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
            found[frozenset(labels.items())] = float(match[2])
    return found


def relay_metrics(relay):
    _, _, body = h.get(relay.process.admin, "/metrics")
    return body.decode()


def wait_for(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_each_operation_records_exactly_the_usage_bedrock_reported(start_stack):  # noqa: F811
    stack = start_stack()
    for operation, standin_op, call in CALLS:
        out = a.boto3_call(stack.env(), model=a.CLAUDE, **call)
        assert "error" not in out and "stream_error" not in out, (operation, out)

    agent_lines = stack.audit(4)
    relay_lines = h.read_audit(stack.relays[0].audit_path, 4)
    assert [line["operation"] for line in agent_lines] == [op for op, _, _ in CALLS]
    assert [line["operation"] for line in relay_lines] == [op for op, _, _ in CALLS]
    for (operation, standin_op, _), agent_line, relay_line in zip(CALLS, agent_lines, relay_lines):
        assert agent_line["status"] == 200, agent_line
        assert tokens_of(agent_line) == USAGE[standin_op], (operation, agent_line)
        assert agent_line["usage_complete"] is True, agent_line
        assert relay_line["request_id"] == agent_line["request_id"]
        assert tokens_of(relay_line) == USAGE[standin_op], (operation, relay_line)
        assert relay_line["usage_complete"] is True, relay_line

    totals = [sum(USAGE[op][i] for _, op, _ in CALLS) for i in range(4)]
    agent_tokens = counters(stack.agent.metrics(), "xpart_agent_tokens_total")
    for kind, total in zip(KINDS, totals):
        key = frozenset({"principal": "lambda", "model_family": "anthropic.claude", "kind": kind}.items())
        assert agent_tokens.get(key) == total, (kind, agent_tokens)
    assert len(agent_tokens) == 4, agent_tokens
    relay_tokens = counters(relay_metrics(stack.relays[0]), "xpart_relay_tokens_total")
    for kind, total in zip(KINDS, totals):
        key = frozenset({"model": "anthropic.*", "kind": kind}.items())
        assert relay_tokens.get(key) == total, (kind, relay_tokens)
    assert len(relay_tokens) == 4, relay_tokens

    _, status = stack.agent.admin_json("/status")
    usage = status["usage"]
    assert usage["day"] == datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    [lambda_usage] = usage["principals"]
    assert lambda_usage == {
        "principal": "lambda", "requests": 4, "errors": 0,
        "input_tokens": totals[0], "output_tokens": totals[1],
        "cache_read_tokens": totals[2], "cache_write_tokens": totals[3],
        "tokens_per_minute": None, "tokens_per_day": None,
    }


@pytest.mark.parametrize("call", [
    {"op": "converse_stream", "text": "cut me off"},
    {"op": "invoke_model_stream", "body": ANTHROPIC_BODY},
], ids=["ConverseStream", "InvokeModelWithResponseStream"])
def test_a_stream_cut_before_its_usage_records_what_is_known_and_says_so(start_stack, call):  # noqa: F811
    stack = start_stack()
    # The caller's SDK raises one way or another (a broken stream or connection); what
    # matters here is what the daemons recorded.
    try:
        a.boto3_call(stack.env(), model="standin.cut", **call)
    except AssertionError:
        pass

    [agent_line] = stack.audit(1)
    [relay_line] = h.read_audit(stack.relays[0].audit_path, 1)
    for line in (agent_line, relay_line):
        assert line["usage_complete"] is False, line
        assert tokens_of(line) == (None, None, None, None), line
        assert line["message"], line
    assert "broke off" in relay_line["message"], relay_line
    assert counters(stack.agent.metrics(), "xpart_agent_tokens_total") == {}
    assert counters(relay_metrics(stack.relays[0]), "xpart_relay_tokens_total") == {}


def raw_converse(stack, token, model=a.CLAUDE):
    """One Converse call as plain HTTPS, so the test sees every header of a refusal."""
    context = ssl.create_default_context(cafile=stack.pki["ca"])
    connection = http.client.HTTPSConnection("localhost", stack.agent.front[1], context=context, timeout=30)
    body = json.dumps({"messages": [{"role": "user", "content": [{"text": "spend"}]}]})
    path = "/model/" + model.replace(":", "%3A") + "/converse"
    connection.request("POST", path, body=body, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    response = connection.getresponse()
    answer = (response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read() or b"{}"))
    connection.close()
    return answer


def converse_tokens():
    input_tokens, output_tokens, _, _ = USAGE["converse"]
    return input_tokens + output_tokens


def test_a_principal_over_its_day_budget_is_refused_until_midnight_also_after_a_restart(start_stack):  # noqa: F811
    token, other = a.new_token(), a.new_token()
    budget = 2 * converse_tokens() - 1
    principals = (a.principal("lambda", token=token, models=a.DEFAULT_MODELS, tokens_per_day=budget)
                  + a.principal("other", token=other, models=a.DEFAULT_MODELS, tokens_per_day=budget))
    stack = start_stack(principals=principals, tokens={"lambda": token})
    for _ in range(2):
        status, _, answer = raw_converse(stack, token)
        assert status == 200, answer
    assert wait_for(lambda: len(stack.audit(2)) == 2)

    def assert_refused():
        status, headers, answer = raw_converse(stack, token)
        assert status == 429, answer
        assert h.error_type(headers) == "ThrottlingException"
        message = answer["message"]
        tomorrow = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)).strftime("%Y-%m-%d")
        assert "principal lambda" in message, message
        assert f"used {2 * converse_tokens()} of its tokens_per_day of {budget}" in message, message
        assert f"resets at {tomorrow}T00:00:00.000Z" in message, message
        retry_after = int(headers["retry-after"])
        now = datetime.datetime.now(datetime.timezone.utc)
        midnight = datetime.datetime.combine(now.date() + datetime.timedelta(days=1), datetime.time(),
                                             tzinfo=datetime.timezone.utc)
        assert abs(retry_after - (midnight - now).total_seconds()) <= 5, (retry_after, message)

    assert_refused()
    # Another principal's budget is its own.
    status, _, answer = raw_converse(stack, other)
    assert status == 200, answer
    refusal = stack.audit(4)[2]
    assert (refusal["principal"], refusal["status"], refusal["error_type"]) == ("lambda", 429, "ThrottlingException")
    assert refusal["message"] == "over tokens_per_day budget"
    assert len(stack.standin.requests()) == 3, "the refused request never reached Bedrock"

    _, status = stack.agent.admin_json("/status")
    by_name = {p["principal"]: p for p in status["usage"]["principals"]}
    assert by_name["lambda"]["tokens_per_day"] == {"used": 2 * converse_tokens(), "limit": budget}
    assert by_name["lambda"]["tokens_per_minute"] is None
    assert (by_name["lambda"]["requests"], by_name["lambda"]["errors"]) == (3, 1)

    # A restarted agent rebuilds today's counts from its audit file.
    config = stack.agent.proc.args[2]
    stack.agent.stop()
    stack.agent = a.AgentProcess(config, stack.directory + "/agent-restarted.log")
    try:
        stack.agent.wait_ready()
        assert_refused()
        _, status = stack.agent.admin_json("/status")
        by_name = {p["principal"]: p for p in status["usage"]["principals"]}
        assert by_name["lambda"]["tokens_per_day"] == {"used": 2 * converse_tokens(), "limit": budget}
        assert by_name["other"]["input_tokens"] == USAGE["converse"][0]
    finally:
        stack.agent.stop()


def test_a_principal_over_its_budget_may_still_discover_models(start_stack):  # noqa: F811
    """Listing and looking up models spends no tokens: only calls that do are refused."""
    token = a.new_token()
    principals = a.principal("lambda", token=token, models=a.DEFAULT_MODELS,
                             tokens_per_day=converse_tokens() - 1)
    discovery = ("Converse", "ListFoundationModels", "GetFoundationModel", "ListInferenceProfiles")
    upstreams = [{"service": service, "region": h.REGION, "host_header": f"{service}.{h.REGION}.amazonaws.com"}
                 for service in ("bedrock-runtime", "bedrock")]
    stack = start_stack(principals=principals, tokens={"lambda": token},
                        relay_options={"upstreams": upstreams, "operations": discovery})
    status, _, answer = raw_converse(stack, token)
    assert status == 200, answer
    assert wait_for(lambda: len(stack.audit(1)) == 1)
    status, headers, answer = raw_converse(stack, token)
    assert (status, h.error_type(headers)) == (429, "ThrottlingException"), answer

    context = ssl.create_default_context(cafile=stack.pki["ca"])
    for host, path in ((f"bedrock.{h.REGION}.amazonaws.com", "/foundation-models"), ("localhost", "/v1/models")):
        connection = http.client.HTTPSConnection("localhost", stack.agent.front[1], context=context, timeout=30)
        connection.request("GET", path, headers={"Host": host, "Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        listed = json.loads(response.read() or b"{}")
        connection.close()
        assert response.status == 200, (path, listed)
        assert listed.get("modelSummaries") or listed.get("data"), (path, listed)


def test_a_principal_over_its_minute_budget_is_refused_until_the_next_minute(start_stack):  # noqa: F811
    token = a.new_token()
    principals = a.principal("lambda", token=token, models=a.DEFAULT_MODELS,
                             tokens_per_minute=converse_tokens())
    stack = start_stack(principals=principals, tokens={"lambda": token})
    # Both calls must fall in one minute.
    second = datetime.datetime.now(datetime.timezone.utc).second
    if second >= 45:
        time.sleep(61 - second)
    status, _, answer = raw_converse(stack, token)
    assert status == 200, answer
    assert wait_for(lambda: stack.audit(1))
    status, headers, answer = raw_converse(stack, token)
    assert status == 429, answer
    assert h.error_type(headers) == "ThrottlingException"
    assert f"used {converse_tokens()} of its tokens_per_minute of {converse_tokens()}" in answer["message"]
    now = datetime.datetime.now(datetime.timezone.utc)
    next_minute = (now.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1))
    assert f"resets at {next_minute.strftime('%Y-%m-%dT%H:%M')}:00.000Z" in answer["message"], answer
    assert 1 <= int(headers["retry-after"]) <= 60 - now.second + 1


def test_the_relays_echo_model_reports_usage_like_bedrock(relay):
    """The echo model answers on the relay itself; its usage is counted there the same way."""
    text = "echo my usage"  # 13 characters: 4 tokens by the echo model's estimate
    messages = [{"role": "user", "content": [{"text": text}]}]
    client = relay.client()
    answer = client.converse(modelId="xpart.echo", messages=messages)
    assert answer["usage"]["inputTokens"] == 4 and answer["usage"]["outputTokens"] == 4, answer["usage"]
    list(client.converse_stream(modelId="xpart.echo", messages=messages)["stream"])
    lines = relay.audit(2)
    for line in lines:
        assert (line["input_tokens"], line["output_tokens"], line["usage_complete"]) == (4, 4, True), line
    _, _, body = h.get(relay.relay.admin, "/metrics")
    tokens = counters(body.decode(), "xpart_relay_tokens_total")
    assert tokens[frozenset({"model": "xpart.echo", "kind": "input"}.items())] == 8, tokens
    assert tokens[frozenset({"model": "xpart.echo", "kind": "output"}.items())] == 8, tokens
