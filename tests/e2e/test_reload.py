"""SIGHUP on both daemons (the same code path in xpart-daemon): they stay up, keep open
connections, reopen a renamed audit file, take a changed principal, token or policy, and keep
the running configuration when the new file is invalid. Also what the audit line and the
caller's request id say about a completed request, over HTTP/1.1 (boto3) and HTTP/2 (httpx)."""

import http.client
import json
import os
import signal
import ssl
import subprocess
import time

import pytest

import agent_harness as a
import relay_harness as h
from agent_harness import start_stack  # noqa: F401  (pytest fixture)


@pytest.fixture
def stack(start_stack):  # noqa: F811
    return start_stack()


def hup(process):
    process.proc.send_signal(signal.SIGHUP)


def wait_for_log(process, text, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in process.logs():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never logged:\n{process.logs()}")


def reloads_logged(process, text):
    return process.logs().count(text)


def hup_and_wait(process, outcome):
    """SIGHUP and wait until the reload has run to `outcome` ("configuration reloaded" or
    "configuration not reloaded")."""
    before = reloads_logged(process, outcome)
    hup(process)
    deadline = time.monotonic() + 10
    while reloads_logged(process, outcome) == before:
        assert process.proc.poll() is None, f"died on SIGHUP ({process.proc.returncode}):\n{process.logs()}"
        assert time.monotonic() < deadline, f"no {outcome!r} after SIGHUP:\n{process.logs()}"
        time.sleep(0.05)
    assert process.proc.poll() is None


def edit(path, old, new):
    with open(path) as f:
        text = f.read()
    assert old in text, (old, text)
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def relay_config_path(stack):
    return os.path.join(stack.relays[0].directory, "relay.toml")


def agent_config_path(stack):
    return os.path.join(stack.directory, "agent.toml")


def keepalive_converse(conn, token, text):
    """One Converse on an open HTTP/1.1 connection to the agent; (status, headers, body)."""
    body = json.dumps({"messages": [{"role": "user", "content": [{"text": text}]}]})
    path = "/model/" + a.CLAUDE.replace(":", "%3A") + "/converse"
    conn.request("POST", path, body=body, headers={
        "authorization": f"Bearer {token}", "content-type": "application/json",
    })
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def open_connection(stack):
    context = ssl.create_default_context(cafile=stack.pki["ca"])
    return http.client.HTTPSConnection("localhost", stack.agent.front[1], context=context, timeout=30)


def test_both_daemons_survive_sighup_and_keep_open_connections(stack):
    conn = open_connection(stack)
    status, _, body = keepalive_converse(conn, stack.tokens["lambda"], "before")
    assert status == 200, body
    sock = conn.sock

    hup_and_wait(stack.agent, "configuration reloaded")
    hup_and_wait(stack.relays[0].process, "configuration reloaded")

    status, _, body = keepalive_converse(conn, stack.tokens["lambda"], "after")
    assert status == 200, body
    assert conn.sock is sock, "the connection was not reopened"
    assert b"standin:after" in body
    conn.close()


def test_sighup_reopens_renamed_audit_files(stack):
    assert "text" in a.boto3_call(stack.env(), op="converse", model=a.CLAUDE, text="one")
    relay_audit = stack.relays[0].audit_path
    h.read_audit(stack.audit_path, 1)
    h.read_audit(relay_audit, 1)
    os.rename(stack.audit_path, stack.audit_path + ".1")
    os.rename(relay_audit, relay_audit + ".1")

    hup_and_wait(stack.agent, "configuration reloaded")
    hup_and_wait(stack.relays[0].process, "configuration reloaded")
    out = a.boto3_call(stack.env(), op="converse", model=a.CLAUDE, text="two")
    assert out.get("text") == "standin:two", out

    [agent_line] = h.read_audit(stack.audit_path, 1)
    [relay_line] = h.read_audit(relay_audit, 1)
    assert agent_line["request_id"] == relay_line["request_id"] == out["request_id"]
    assert len(h.read_audit(stack.audit_path + ".1", 1)) == 1


def test_token_rotation_and_revoke_take_effect_on_sighup(stack):
    old = stack.tokens["lambda"]
    new = a.new_token()
    path = agent_config_path(stack)
    edit(path, a.token_sha256(old), a.token_sha256(new))
    hup_and_wait(stack.agent, "configuration reloaded")
    assert a.boto3_call(stack.env(token=old), op="converse", model=a.CLAUDE, text="x")["error"] == "UnrecognizedClientException"
    assert a.boto3_call(stack.env(token=new), op="converse", model=a.CLAUDE, text="x")["text"] == "standin:x"

    revoke = subprocess.run(
        [os.path.join(h.bin_dir(), "xpart"), "token", "revoke", "--principal", "lambda", "--config", path],
        capture_output=True, text=True, timeout=30,
    )
    assert revoke.returncode == 0, revoke.stderr
    with open(path) as f:
        assert "lambda" not in f.read()
    # A config without principals is refused or admits nobody; either way the token is gone
    # only once the agent reloads a file that parses: add a different principal.
    other = a.new_token()
    with open(path, "a") as f:
        f.write("\n" + a.principal("other", token=other, models=["standin.*"]))
    hup_and_wait(stack.agent, "configuration reloaded")
    assert a.boto3_call(stack.env(token=new), op="converse", model=a.CLAUDE, text="x")["error"] == "UnrecognizedClientException"
    out = a.boto3_call(stack.env(token=other), op="converse", model=a.CLAUDE, text="x")
    assert out["error"] == "AccessDeniedException", out


def test_relay_policy_changes_on_sighup(stack):
    assert a.boto3_call(stack.env(), op="converse", model=a.CLAUDE, text="x")["text"] == "standin:x"
    edit(relay_config_path(stack), '"anthropic.*", "us.anthropic.*", ', "")
    hup_and_wait(stack.relays[0].process, "configuration reloaded")
    out = a.boto3_call(stack.env(), op="converse", model=a.CLAUDE, text="x")
    assert out["error"] == "AccessDeniedException", out
    assert a.CLAUDE in out["message"]


def test_an_invalid_file_keeps_the_running_configuration(stack):
    for process, path in [(stack.agent, agent_config_path(stack)), (stack.relays[0].process, relay_config_path(stack))]:
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("[admin]", "[admin]\nno_such_field = 1", 1))
        hup_and_wait(process, "configuration not reloaded")
        logs = process.logs()
        assert "reload refused" in logs and "no_such_field" in logs, logs
        assert "fix" in logs
    out = a.boto3_call(stack.env(), op="converse", model=a.CLAUDE, text="still")
    assert out.get("text") == "standin:still", out


def test_agent_certificate_problem_keeps_the_running_configuration(stack):
    path = agent_config_path(stack)
    new = a.new_token()
    edit(path, a.token_sha256(stack.tokens["lambda"]), a.token_sha256(new))
    edit(path, f'cert_file = "{stack.pki["cert"]}"', 'cert_file = "/nonexistent/cert.pem"')
    hup_and_wait(stack.agent, "configuration not reloaded")
    assert "[front].cert_file" in stack.agent.logs()
    # Nothing of the refused file took effect: the old token still works, the new does not.
    assert a.boto3_call(stack.env(), op="converse", model=a.CLAUDE, text="x")["text"] == "standin:x"
    assert a.boto3_call(stack.env(token=new), op="converse", model=a.CLAUDE, text="x")["error"] == "UnrecognizedClientException"


# --- what the audit line and the request id say ------------------------------------------------

@pytest.fixture
def echo_stack(start_stack):  # noqa: F811
    token = a.new_token()
    models = a.DEFAULT_MODELS + ("xpart.echo",)
    return start_stack(principals=a.principal("lambda", token=token, models=models), tokens={"lambda": token})


def test_completed_http1_requests_are_audited_as_complete_with_the_callers_request_id(echo_stack):
    stack = echo_stack
    out = a.boto3_call(stack.env(), op="converse", model=a.CLAUDE, text="h1")
    assert out["text"] == "standin:h1"
    streamed = a.boto3_call(stack.env(), op="converse_stream", model=a.CLAUDE, text="h1 stream")
    assert streamed.get("events"), streamed
    echo = a.boto3_call(stack.env(), op="converse", model="xpart.echo", text="echo")
    refused = a.boto3_call(stack.env(), op="converse", model="meta.llama3-70b", text="no")
    assert refused["error"] == "AccessDeniedException"

    lines = stack.audit(4)
    relay_lines = h.read_audit(stack.relays[0].audit_path, 3)
    for line in lines + relay_lines:
        assert line.get("message") is None or line["status"] >= 400, line
    assert [line["status"] for line in lines] == [200, 200, 200, 403]
    ids = [out["request_id"], streamed["headers"]["x-amzn-requestid"], echo["request_id"], refused["request_id"]]
    assert all(ids), ids
    assert [line["request_id"] for line in lines] == ids
    assert [line["request_id"] for line in relay_lines] == ids[:3]


def test_completed_http2_requests_are_audited_as_complete(echo_stack):
    stack = echo_stack
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("h2")
    body = json.dumps({"messages": [{"role": "user", "content": [{"text": "h2"}]}]})
    headers = {"authorization": f"Bearer {stack.tokens['lambda']}", "content-type": "application/json"}
    ids = []
    with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=stack.pki["ca"])) as client:
        for model in (a.CLAUDE, "xpart.echo"):
            for operation in ("converse", "converse-stream"):
                if model == "xpart.echo" and operation == "converse-stream":
                    continue
                url = f"{stack.agent.endpoint}/model/{model.replace(':', '%3A')}/{operation}"
                response = client.post(url, content=body, headers=headers)
                assert response.http_version == "HTTP/2"
                assert response.status_code == 200, response.text
                ids.append(response.headers["x-amzn-requestid"])
    lines = stack.audit(3)
    assert [line["request_id"] for line in lines] == ids
    for line in lines:
        assert line["status"] == 200 and line.get("message") is None, line
    for line in h.read_audit(stack.relays[0].audit_path, 3):
        assert line["status"] == 200 and line.get("message") is None, line
