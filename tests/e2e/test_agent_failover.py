"""Relay failover through the real tunnel: two relays in userspace mode sharing the load, one
killed (SIGKILL, so its tunnel just goes silent) while boto3 callers keep the agent busy.
Every request either succeeds or ends with a clear 503 (both counted); from 3 s after the
kill every request succeeds through the other relay (test_balance.py holds three relays to
the 1 s rule). A drained relay hands over without failing anything."""

import os
import threading
import time

import boto3
import pytest

import agent_harness as a
import relay_harness as h
from agent_harness import start_stack  # noqa: F401  (pytest fixture)
from converse_load import Load



@pytest.fixture
def env_session(monkeypatch):
    """boto3 sessions built from nothing but the given environment variables."""
    def make(env):
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)
        return boto3.session.Session()
    return make


def test_killed_relay_under_load_fails_over_within_three_seconds(start_stack, env_session):  # noqa: F811
    stack = start_stack(relays=2)
    session = env_session(stack.env())
    # Both relays healthy, in one group: they share the load, relay-a first when idle.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, status = stack.agent.admin_json("/status")
        if all(r["state"] == "healthy" for r in status["relays"]):
            break
        time.sleep(0.1)
    assert status["active_relay"] == "relay-a", status

    with Load(session, workers=4, text="keep going") as load:
        time.sleep(1.5)
        killed_at = time.monotonic()
        stack.relays[0].kill()
        time.sleep(5.5)
    results = load.results

    ok = [r for r in results if r[2][0] == "ok"]
    failed = [r for r in results if r[2][0] != "ok"]
    print(f"\nfailover under load: {len(results)} requests, {len(ok)} succeeded, {len(failed)} failed with 503")
    assert all(r[2][0] == "ServiceUnavailableException" for r in failed), failed
    assert all("relay-a" in r[2][1] for r in failed), failed
    assert all(r[1] - r[0] < 5.0 for r in results), "no request hung"
    late = [r for r in results if r[0] >= killed_at + 3.0]
    assert late, "load continued after the failover"
    assert all(r[2][0] == "ok" for r in late), [r for r in late if r[2][0] != "ok"]
    before = [r for r in ok if r[1] < killed_at]
    assert before, "requests succeeded before the kill"

    lines = {line["request_id"]: line for line in stack.audit(len(results), timeout=10)}
    assert all(lines[r[2][1]]["relay"] == "relay-b" for r in late)
    assert {lines[r[2][1]]["relay"] for r in before} == {"relay-a", "relay-b"}
    _, status = stack.agent.admin_json("/status")
    assert status["active_relay"] == "relay-b"
    assert [r["state"] for r in status["relays"]] == ["down", "healthy"]
    assert 'xpart_agent_relay_healthy{relay="relay-a"} 0' in stack.agent.metrics()


def test_drained_relay_hands_over_without_failures(start_stack, env_session):  # noqa: F811
    stack = start_stack(relays=2)
    session = env_session(stack.env())
    with Load(session, workers=2, text="keep going") as load:
        time.sleep(1.0)
        status, _, _ = h.post(stack.relays[0].process.admin, "/drain")
        assert status == 200
        time.sleep(3.5)
    results = load.results
    assert results and all(r[2][0] == "ok" for r in results), [r for r in results if r[2][0] != "ok"]
    _, status = stack.agent.admin_json("/status")
    assert status["active_relay"] == "relay-b"


def test_stream_cut_by_a_dead_relay_ends_with_a_service_unavailable_event(start_stack):  # noqa: F811
    stack = start_stack(relays=2)
    stack.standin.hold_release.clear()
    stack.standin.hold_first_sent.clear()
    result = {}

    def call():
        result["out"] = a.boto3_call(stack.env(), op="converse_stream", model="standin.hold", text="cut")

    caller = threading.Thread(target=call)
    started = time.monotonic()
    caller.start()
    try:
        assert stack.standin.hold_first_sent.wait(30)
        time.sleep(0.3)
        stack.relays[0].kill()
        caller.join(30)
    finally:
        stack.standin.release_hold()
    out = result["out"]
    assert out.get("stream_error") == "serviceUnavailableException", out
    assert "relay stopped answering" in out["message"]
    assert time.monotonic() - started < 15
    # The next stream goes through relay-b in full.
    stack.standin.release_hold()
    out = a.boto3_call(stack.env(), op="converse_stream", model=a.CLAUDE, text="again")
    assert [e["kind"] for e in out["events"]][-1] == "metadata"
