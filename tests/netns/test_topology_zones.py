"""The multi-az deployment in network namespaces: three agents, all serving, behind a load balancer
standing in for the stack's internal NLB (topology_balancer.py: health checks on /readyz, new
connections to healthy agents, connections to an agent taken out ended), and three relays that
every agent peers with and balances over. Real binaries, kernel-mode WireGuard, boto3.

The caller resolves the Bedrock name through the agents' DNS (every agent is a nameserver, as the
stack's Resolver rules target every agent) and gets the balancer's two addresses in one answer.
Then, under a steady load of Converse calls:

  zone lost   agent-a and relay-a vanish at once (their links go down: no FIN, no RST, no ICMP,
              the processes live on): the balancer takes agent-b out, the other agents take
              relay-b out; every call is accounted for, success resumes within seconds, and from
              1 s after the loss no call fails on or waits for the lost relay

The table gives, per phase: calls sent, succeeded, failed by error, silent (must be none), the
time from the loss until calls succeeded again, and the 1 s rule. Root only.

    python3 -m pytest -q -rs tests/netns/test_topology_zones.py
"""

import time

import pytest

import topology_daemons as xd
import topology_load as tl
import topology_network as net

_missing = net.missing_prerequisite() or xd.missing_binary()
pytestmark = pytest.mark.skipif(_missing is not None, reason=str(_missing))

RECOVERY_BUDGET_S = 8.0
STABLE_CALLS = 15
ONE_SECOND_RULE_S = 1.0
# A call on a connection the balancer carried to the lost agent ends when the balancer takes the
# agent out (the connection closes under it) or, if sent before, with the caller's read timeout.
ZONE_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "SSLError", "ServiceUnavailableException",
}
# The zone that carries the traffic at this load (the balancer's first choice, the agents' first
# relay at equal load), and the first nameserver: the worst zone to lose.
LOST_AGENT, LOST_RELAY = "agent-a", "relay-a"


class Zones:
    def __init__(self, topo, secrets):
        self.topo = topo
        self.secrets = secrets
        self.procs = {}
        self.phases = []
        self.notes = []


@pytest.fixture(scope="module")
def zones():
    with net.Topology(zones=True) as topo:
        secrets = xd.Secrets(topo.tmp, topo)
        z = Zones(topo, secrets)
        z.procs["vpc"], dns = xd.start_vpc(topo, secrets)
        for relay in topo.relays:
            z.procs[relay] = xd.start_relay(topo, secrets, relay, dns)
        for agent in topo.agents:
            z.procs[agent] = xd.start_agent(topo, secrets, agent)
        daemons = [z.procs[name] for name in (*topo.relays, *topo.agents)]
        every_relay = {relay: "healthy" for relay in topo.relays}
        for agent in topo.agents:
            net.wait_for(lambda: xd.relay_states(topo, agent) == every_relay,
                         f"{agent} to see every relay healthy through the tunnel", timeout=30, procs=daemons)
        z.procs["lb"] = xd.start_balancer(topo)
        net.wait_for(lambda: all(t["healthy"] for t in xd.balancer_status(z.procs["lb"]).values()),
                     "the balancer to find every agent ready", timeout=15, procs=[*daemons, z.procs["lb"]])
        z.load = tl.Load(topo, xd.caller_env(secrets))
        try:
            yield z
        finally:
            z.load.close()


def test_every_agent_serves_behind_the_balancer_and_every_relay_carries(zones):
    resolved = zones.load.ask("resolve", "resolved")
    assert resolved["addresses"] == sorted(net.BALANCER), "every zone's address in one answer"

    baseline = zones.load.run_phase("baseline (3 zones)", tl.at_least(30), timeout=20)
    zones.phases.append(baseline)
    assert baseline.succeeded == baseline.sent >= 30, baseline.failures
    assert baseline.silent == []
    records = xd.standin_records(zones.procs["vpc"])
    assert all(r["verified"] for r in records)
    by_relay = {relay: sum(r["access_key"] == key for r in records) for relay, (key, _) in xd.RELAY_KEYS.items()}
    by_agent = {agent: sum(a["status"] == 200 for a in xd.audit_lines(zones.secrets, agent))
                for agent in zones.topo.agents}
    zones.notes.append(f"baseline carried by relay: {by_relay}; served by agent: {by_agent}")
    # Each agent peers with every relay, and the balancer's checks admit every agent.
    for agent in zones.topo.agents:
        assert xd.relay_states(zones.topo, agent) == {relay: "healthy" for relay in zones.topo.relays}


def test_a_lost_zone_costs_seconds_and_no_silent_call(zones, capsys):
    try:
        phase = zones.load.run_phase("zone lost", tl.stable_after_fault(STABLE_CALLS), timeout=40,
                                     fault=lambda: lose_zone(zones))
        zones.phases.append(phase)
        assert phase.silent == [], f"calls with no outcome: {phase.silent}"
        for failure in phase.failures:
            assert failure["error"] in ZONE_ERRORS and failure["message"], failure
        assert len(phase.successes_after_last_failure()) >= STABLE_CALLS, phase.failures[-5:]
        assert phase.recovery_seconds() < RECOVERY_BUDGET_S, phase.failures[-5:]

        # The 1 s rule, for the lost relay: no call sent a second or more after the loss was
        # refused for want of a relay (the agents' 503), and the surviving agents have taken it out.
        late = [r for r in phase.results if r["sent"] >= phase.fault_at + ONE_SECOND_RULE_S]
        relay_failures = [r for r in late if r["error"] == "ServiceUnavailableException"]
        started = time.monotonic()
        assert zones.load.ask("resolve", "resolved")["addresses"] == sorted(net.BALANCER)
        lookup = time.monotonic() - started
        zones.notes.append(
            f"zone lost: {len(relay_failures)} calls from +1 s refused for want of a relay; the balancer took "
            f"{LOST_AGENT} out {zones.lb_out_after:.1f} s after the loss; a name lookup now takes {lookup:.2f} s "
            f"(the first nameserver is the lost agent), which a new connection's first call pays")
        assert relay_failures == [], relay_failures
        for agent in zones.topo.agents:
            if agent != LOST_AGENT:
                assert xd.relay_states(zones.topo, agent)[LOST_RELAY] != "healthy"
        # Served after the loss only by the agents and relays of the zones still standing.
        after = [r for r in xd.standin_records(zones.procs["vpc"]) if r["time"] > zones.lost_at + ONE_SECOND_RULE_S]
        assert after, "nothing reached Bedrock after the loss"
        carried = {relay: sum(r["access_key"] == key for r in after) for relay, (key, _) in xd.RELAY_KEYS.items()}
        zones.notes.append(f"after the loss, carried by relay: {carried}")
        assert xd.RELAY_KEYS[LOST_RELAY][0] not in {r["access_key"] for r in after}
    except BaseException:
        with capsys.disabled():
            for name in (*zones.topo.agents, *zones.topo.relays, "lb"):
                print(f"\n--- last lines of {name}'s log ---\n{net.log_tail(zones.procs[name], 15)}")
        raise
    finally:
        with capsys.disabled():
            print("\n\nxpart topology, three zones: every call accounted for\n" + tl.table(zones.phases))
            print("\n".join(zones.notes) + "\n")


def lose_zone(zones):
    zones.lost_at = time.time()
    lost = time.monotonic()
    zones.topo.cut(LOST_AGENT, "lan0")
    zones.topo.cut(LOST_RELAY, "wan0", "vpc0")
    out = net.wait_for(lambda: xd.balancer_status(zones.procs["lb"])[net.AGENT_LAN[LOST_AGENT]]["out_at"],
                       f"the balancer to take {LOST_AGENT} out", timeout=10)
    zones.lb_out_after = out - lost
    return f"{LOST_AGENT} and {LOST_RELAY} cut off (links down)"
