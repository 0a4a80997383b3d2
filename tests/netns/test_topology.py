"""The whole xpart topology in network namespaces, kernel-mode WireGuard, real binaries, real SDK.

A "Lambda" caller resolves bedrock-runtime.us-east-1.amazonaws.com through the active agent's
private DNS and calls it with boto3 (no endpoint override: only AWS_CA_BUNDLE,
AWS_BEARER_TOKEN_BEDROCK and AWS_REGION). The agent forwards through the tunnel, across an
"internet" router, to the first of two relays, which signs with its own credentials and calls
the Bedrock stand-in in the Commercial VPC (found through that VPC's DNS; the stand-in checks
every SigV4 signature with botocore). Then, under a steady load of Converse calls:

  loss + delay     5% loss and 50 ms delay on the internet link: every call still succeeds
  relay killed     SIGKILL the relay in use: traffic moves to the other relay; each failure is a
                   Bedrock-shaped ServiceUnavailableException, and success resumes within seconds
  agent failover   SIGKILL the active agent and move the floating address to the standby (as the
                   EC2 failover does); each failure is an error the caller sees, success resumes

Every call is accounted for (succeeded, failed with which error, or lost silently: must be none)
and the table is printed. Root only; topology and addresses in topology_network.py.

    python3 -m pytest -q -rs tests/netns/test_topology.py
"""

import json
import time

import pytest

import topology_daemons as xd
import topology_load as tl
import topology_network as net
from topology_impair import Impairment

_missing = net.missing_prerequisite() or xd.missing_binary()
pytestmark = pytest.mark.skipif(_missing is not None, reason=str(_missing))

# "Success resumes within a few seconds": new calls succeed again this soon after the fault.
RECOVERY_BUDGET_S = 8.0
STABLE_CALLS = 10
# Errors a caller can see while the address it calls moves to another machine: the old agent is
# gone (refused, reset or timed out connections), or the request reached an agent that answered
# with a Bedrock error. Each is an exception raised to the caller, never a silent loss.
FAILOVER_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "SSLError", "ServiceUnavailableException",
}


class Stack:
    def __init__(self, topo, secrets):
        self.topo = topo
        self.secrets = secrets
        self.procs = {}
        self.phases = []
        self.relay_killed_at = None  # wall clock, to compare with the stand-in's records

    def records(self):
        return xd.standin_records(self.procs["vpc"])


@pytest.fixture(scope="module")
def stack():
    with net.Topology() as topo:
        secrets = xd.Secrets(topo.tmp)
        s = Stack(topo, secrets)
        s.procs["vpc"], dns = xd.start_vpc(topo, secrets)
        for relay in ("relay-a", "relay-b"):
            s.procs[relay] = xd.start_relay(topo, secrets, relay, dns)
        for agent in ("agent-a", "agent-b"):
            s.procs[agent] = xd.start_agent(topo, secrets, agent)
        daemons = [s.procs[name] for name in ("relay-a", "relay-b", "agent-a", "agent-b")]
        for agent in ("agent-a", "agent-b"):
            net.wait_for(lambda: xd.relay_states(topo, agent) == {"relay-a": "healthy", "relay-b": "healthy"},
                         f"{agent} to see both relays healthy through the tunnel", timeout=20, procs=daemons)
        s.load = tl.Load(topo, xd.caller_env(secrets))
        try:
            yield s
        finally:
            s.load.close()


def test_caller_reaches_bedrock_through_private_dns_tunnel_and_relay(stack):
    resolved = stack.load.ask("resolve", "resolved")
    assert resolved["addresses"] == [net.FLOATING]

    streamed = stack.load.ask("stream", "streamed")
    assert streamed["text"] == streamed["expected"]

    baseline = stack.load.run_phase("baseline", tl.at_least(10), timeout=15)
    stack.phases.append(baseline)
    assert baseline.sent >= 10
    assert baseline.succeeded == baseline.sent, baseline.failures
    assert baseline.silent == []

    records = stack.records()
    assert len(records) >= baseline.succeeded + 1
    assert all(r["verified"] for r in records), [r.get("problem") for r in records if not r["verified"]]
    # The preferred relay carried everything, signing with its own key, never the caller's token.
    assert {r["access_key"] for r in records} == {xd.RELAY_KEYS["relay-a"][0]}
    assert stack.secrets.token not in json.dumps(records)
    assert all(not r["headers"]["authorization"].startswith("Bearer") for r in records)

    def audit_written():
        lines = xd.audit_lines(stack.secrets, "agent-a")
        return lines if len(lines) >= baseline.sent + 1 else None

    audit = net.wait_for(audit_written, "agent-a's audit lines for the stream and the baseline", timeout=5)
    assert {(a["principal"], a["relay"], a["source"], a["status"]) for a in audit} == \
        {(xd.PRINCIPAL, "relay-a", net.CALLER, 200)}


def test_loss_relay_death_and_agent_failover_lose_nothing(stack, capsys):
    try:
        with Impairment(stack.topo, loss_percent=5, delay_ms=50) as impairment:
            lossy = stack.load.run_phase("loss 5% + 50 ms", tl.at_least(40), timeout=20)
        lossy.fault = f"{impairment.method}: {impairment.dropped} packets dropped"
        stack.phases.append(lossy)
        assert impairment.dropped > 0, "the impairment dropped nothing: the phase proved nothing"
        assert lossy.sent >= 40
        assert lossy.failures == [], lossy.failures
        assert lossy.silent == []

        relay_phase = stack.load.run_phase("relay killed", tl.stable_after_fault(STABLE_CALLS), timeout=25,
                                           fault=lambda: kill_relay(stack, "relay-a"))
        stack.phases.append(relay_phase)
        # The agent, not the caller's patience, ends every call the dead relay had: a
        # Bedrock-shaped 503 saying what happened, never a hang until the caller gives up.
        for failure in relay_phase.failures:
            assert failure["error"] == "ServiceUnavailableException" and failure["message"], failure
        check_recovered(relay_phase)
        assert xd.agent_status(stack.topo, "agent-a")["active_relay"] == "relay-b"
        after_kill = [r for r in stack.records() if r["time"] > stack.relay_killed_at]
        assert len(after_kill) >= STABLE_CALLS
        assert {r["access_key"] for r in after_kill} == {xd.RELAY_KEYS["relay-b"][0]}
        assert all(r["verified"] for r in after_kill)

        agent_phase = stack.load.run_phase("agent failover", tl.stable_after_fault(STABLE_CALLS), timeout=25,
                                           fault=lambda: fail_over_agent(stack))
        stack.phases.append(agent_phase)
        for failure in agent_phase.failures:
            assert failure["error"] in FAILOVER_ERRORS and failure["message"], failure
        check_recovered(agent_phase)
        served_by_standby = [a for a in xd.audit_lines(stack.secrets, "agent-b") if a["status"] == 200]
        assert len(served_by_standby) >= STABLE_CALLS
        assert {(a["principal"], a["relay"]) for a in served_by_standby} == {(xd.PRINCIPAL, "relay-b")}
        # The gratuitous ARP moved the caller's neighbour entry, as the standby's announcement would.
        assert stack.topo.neighbour_mac("caller", net.FLOATING) == stack.topo.mac("agent-b", "lan0")
        # The name now resolves through the standby's DNS on the same address.
        assert stack.load.ask("resolve", "resolved")["addresses"] == [net.FLOATING]
    except BaseException:
        with capsys.disabled():
            for name in ("agent-a", "agent-b", "relay-a", "relay-b"):
                print(f"\n--- last lines of {name}'s log ---\n{net.log_tail(stack.procs[name], 15)}")
        raise
    finally:
        with capsys.disabled():
            print("\n\nxpart topology: every call accounted for\n" + tl.table(stack.phases) + "\n")


def check_recovered(phase):
    assert phase.silent == [], f"{phase.name}: calls with no outcome: {phase.silent}"
    assert len(phase.successes_after_last_failure()) >= STABLE_CALLS, \
        f"{phase.name}: success did not resume; failures: {phase.failures[-5:]}"
    assert phase.recovery_seconds() < RECOVERY_BUDGET_S, f"{phase.name}: {phase.failures[-5:]}"


def kill_relay(stack, relay):
    net.kill(stack.procs[relay])
    stack.relay_killed_at = time.time()
    return f"SIGKILL {relay}"


def fail_over_agent(stack):
    """The active instance dies without a word (its link goes first, so no FIN or RST reaches the
    caller), then the floating address moves to the standby as `xpart failover` would move it."""
    stack.topo.ip("agent-a", "link", "set", "lan0", "down")
    net.kill(stack.procs["agent-a"])
    stack.topo.move_floating("agent-b")
    return "agent-a cut off + SIGKILL, address to agent-b"
