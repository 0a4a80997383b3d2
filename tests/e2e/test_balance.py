"""Balancing and fast relay loss through the real tunnel: one agent, three relays in userspace
WireGuard mode, all in one group, under steady concurrent load from boto3 callers.

Requests spread over the three relays. Then one relay is lost without a word, SIGKILLed (its
tunnel goes silent: no FIN reaches the agent through WireGuard) or SIGSTOPped (frozen). The
agent notices when the relay misses one probe (every 250 ms, 500 ms to answer) and sends it no
new call, well within a second, so: from 1 s after the loss every call succeeds and none waits
on the lost relay. Calls in flight there end with a 503 once the silence outlasts the hard
deadline (4 missed probes, or the 1 s + 2 s PING deadline), or succeed; every call is
accounted for (sent = ok + 503).
Each test prints its figures (calls, failures, time from the loss to the last failure)."""

import os
import signal
import time

import boto3
import pytest

from agent_harness import start_stack  # noqa: F401  (pytest fixture)
from converse_load import Load

WORKERS = 8
# How long the agent may take over a call from 1 s after the loss (its audit line's
# latency_ms, from the request to the end of the answer). Waiting on the lost relay costs more
# (a connect timeout, 1 s; a probe timeout, 500 ms); a call to the stand-in takes tens of
# milliseconds, a few hundred on a test machine busy with builds.
SETTLED_CALL_BOUND = 0.5
# The same call as the caller times it, boto3 and a busy test machine included.
SETTLED_CALLER_BOUND = 1.0
# How long a call in flight on the lost relay may take to end: sent up to 750 ms after the loss
# (until the missed probe), ended by the hard deadline about 2 s into the silence, with room for
# a busy machine. A hang shows as a call reaching the caller's own timeout instead.
IN_FLIGHT_BOUND = 3.0


@pytest.fixture
def caller_env(monkeypatch):
    """Puts a stack's caller environment (AWS_* variables only) in place for boto3."""
    def use(stack):
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        for name, value in stack.env().items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)
    return use


def wait_all_healthy(stack, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, status = stack.agent.admin_json("/status")
        if all(r["state"] == "healthy" for r in status["relays"]):
            return status
        time.sleep(0.1)
    raise AssertionError(f"relays never all healthy: {status}")


def run_loss(stack, lose, before=2.0, after=4.0):
    """Load for `before` seconds, `lose()`, load for `after` more; returns (results, lost_at)."""
    wait_all_healthy(stack)
    with Load(boto3.session.Session(), WORKERS, text="balance") as load:
        time.sleep(before)
        lost_at = time.monotonic()
        lose()
        time.sleep(after)
    return load.results, lost_at


def check_loss(stack, results, lost_at, lost_name, label):
    ok = [r for r in results if r[2][0] == "ok"]
    failed = [r for r in results if r[2][0] != "ok"]
    last_failure = max((r[1] - lost_at for r in failed), default=None)
    settled = [r for r in results if r[0] >= lost_at + 1.0]
    assert all(r[2][0] == "ok" for r in settled), [r for r in settled if r[2][0] != "ok"]
    # The agent writes an audit line for every call, 503s included.
    lines = {line["request_id"]: line for line in stack.audit(len(results), timeout=10)}
    agent_seconds = [lines[r[2][1]]["latency_ms"] / 1000 for r in settled]
    print(f"\n{label}: {len(results)} calls, {len(ok)} ok, {len(failed)} failed with 503; "
          f"last failure answered {_s(last_failure)} s after the loss; from 1 s after the loss, "
          f"{len(settled)} calls, slowest {_s(max(agent_seconds, default=None))} s at the agent, "
          f"{_s(max((r[1] - r[0] for r in settled), default=None))} s at the caller")

    # Every call accounted for: an answer or a clear 503 naming the lost relay.
    assert len(ok) + len(failed) == len(results)
    assert all(r[2][0] == "ServiceUnavailableException" for r in failed), failed
    assert all(lost_name in r[2][1] for r in failed), failed
    assert all(r[0] < lost_at + 1.0 for r in failed), "a call failed 1 s after the loss"
    # No call is silent: those in flight at the loss end within the hard deadline too.
    assert all(r[1] - r[0] < IN_FLIGHT_BOUND for r in results), max(r[1] - r[0] for r in results)

    assert len(settled) > 50, f"load went on after the loss: {len(settled)} calls"
    slow = [(_s(s), lines[r[2][1]]) for r, s in zip(settled, agent_seconds) if s > SETTLED_CALL_BOUND]
    assert not slow, f"calls waited at the agent 1 s after the loss: {slow}"
    slow = [(_s(r[1] - r[0]), r[2]) for r in settled if r[1] - r[0] > SETTLED_CALLER_BOUND]
    assert not slow, f"calls waited 1 s after the loss: {slow}"

    # Before the loss the three relays shared the load; after it, the two left carried it all.
    before = [lines[r[2][1]]["relay"] for r in ok if r[1] < lost_at]
    assert {"relay-a", "relay-b", "relay-c"} <= set(before), {n: before.count(n) for n in set(before)}
    after = {lines[r[2][1]]["relay"] for r in settled}
    assert after == {"relay-a", "relay-b", "relay-c"} - {lost_name}, after

    _, status = stack.agent.admin_json("/status")
    states = {r["name"]: r["state"] for r in status["relays"]}
    assert states[lost_name] == "down", states
    metrics = stack.agent.metrics()
    assert f'xpart_agent_relay_healthy{{relay="{lost_name}"}} 0' in metrics


def _s(seconds):
    return None if seconds is None else round(seconds, 3)


def test_killed_relay_under_load_costs_under_a_second(start_stack, caller_env):  # noqa: F811
    stack = start_stack(relays=3)
    caller_env(stack)
    lost = stack.relays[0]
    results, lost_at = run_loss(stack, lost.kill)
    check_loss(stack, results, lost_at, lost.name, "relay SIGKILLed under load")


def test_frozen_relay_under_load_costs_under_a_second(start_stack, caller_env):  # noqa: F811
    stack = start_stack(relays=3)
    caller_env(stack)
    frozen = stack.relays[1]
    pid = frozen.process.proc.pid
    try:
        results, lost_at = run_loss(stack, lambda: os.kill(pid, signal.SIGSTOP))
    finally:
        os.kill(pid, signal.SIGCONT)
    check_loss(stack, results, lost_at, frozen.name, "relay SIGSTOPped (frozen) under load")


def test_a_frozen_relay_returns_after_good_probes(start_stack):  # noqa: F811
    stack = start_stack(relays=3)
    wait_all_healthy(stack)
    frozen = stack.relays[2]
    pid = frozen.process.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        # Soft first: one missed probe and it takes no new call, though still healthy.
        status = wait_status(stack, lambda st: st["active_relays"] == ["relay-a", "relay-b"], frozen_at + 1)
        assert status["active_relays"] == ["relay-a", "relay-b"], status
        # Hard once the silence outlasts fail_after probes: down.
        status = wait_status(stack, lambda st: st["relays"][2]["state"] == "down", frozen_at + 3)
        assert status["relays"][2]["state"] == "down", status
        assert status["active_relays"] == ["relay-a", "relay-b"], status
    finally:
        os.kill(pid, signal.SIGCONT)
    status = wait_all_healthy(stack)
    assert status["active_relays"] == ["relay-a", "relay-b", "relay-c"], status


def wait_status(stack, condition, deadline):
    """The agent's /status once `condition` holds of it, or the last one at `deadline`."""
    while True:
        _, status = stack.agent.admin_json("/status")
        if condition(status) or time.monotonic() >= deadline:
            return status
        time.sleep(0.05)
