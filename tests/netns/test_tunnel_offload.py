"""Kernel mode's TUN offloads, between two xpart peers in network namespaces joined by veth.
Root only; skipped with the reason otherwise.

The host hands the tunnel TCP super-packets (TSO) that xpart splits before encrypting, and
xpart hands the host coalesced super-packets (GRO) after decrypting. A bulk transfer must
arrive byte for byte, and the interface counters must show that both offloads carried it.

    left  namespace: xpart kernel mode   tunnel 100.64.0.1 or fd00:7870::1, underlay 192.0.2.1
    right namespace: xpart kernel mode   tunnel 100.64.0.2 or fd00:7870::2, underlay 192.0.2.2
"""

import json

import pytest

import tunnel_netns as tn
from test_tunnel_interop import echo_server, ping, tcp_check
from tunnel_netns import LEFT_TUNNEL, LEFT_UNDERLAY, RIGHT_TUNNEL, RIGHT_UNDERLAY, WG_PORT

pytestmark = pytest.mark.skipif(tn.missing_prerequisite() is not None,
                                reason=str(tn.missing_prerequisite()))

BULK_BYTES = 8 * 1024 * 1024
MTU = 1420
# A unique-local prefix, used only inside the test's namespaces.
LEFT_TUNNEL6, RIGHT_TUNNEL6 = "fd00:7870::1", "fd00:7870::2"


@pytest.fixture
def topo():
    with tn.Topology() as topology:
        yield topology


def start_kernel_pair(topo, left_tunnel, right_tunnel, prefix):
    left_private, left_public = tn.genkey()
    right_private, right_public = tn.genkey()
    host_prefix = 128 if ":" in left_tunnel else 32
    tag = topo.left.split("-l")[-1]
    interfaces = {topo.left: f"xpol{tag}", topo.right: f"xpor{tag}"}
    topo.start_xpart(topo.right, "kernel", right_private, left_public, f"{right_tunnel}/{prefix}",
                     f"{LEFT_UNDERLAY}:{WG_PORT}", f"{left_tunnel}/{host_prefix}",
                     interface=interfaces[topo.right])
    topo.start_xpart(topo.left, "kernel", left_private, right_public, f"{left_tunnel}/{prefix}",
                     f"{RIGHT_UNDERLAY}:{WG_PORT}", f"{right_tunnel}/{host_prefix}",
                     interface=interfaces[topo.left])
    return interfaces


def counters(topo, ns, interface):
    """The interface's byte and packet counters. TX is what the host wrote into the tunnel
    (xpart's reads), RX what xpart wrote into the host."""
    (link,) = json.loads(topo.exec(ns, "ip", "-j", "-s", "link", "show", "dev", interface).stdout)
    return link["stats64"]


@pytest.mark.parametrize("left_tunnel,right_tunnel,prefix", [
    (LEFT_TUNNEL, RIGHT_TUNNEL, 30),
    (LEFT_TUNNEL6, RIGHT_TUNNEL6, 126),
], ids=["ipv4", "ipv6"])
def test_bulk_tcp_crosses_as_super_packets_and_arrives_intact(topo, left_tunnel, right_tunnel, prefix):
    interfaces = start_kernel_pair(topo, left_tunnel, right_tunnel, prefix)
    for ns, interface in interfaces.items():
        details = topo.exec(ns, "ip", "-d", "link", "show", "dev", interface).stdout
        assert "vnet_hdr on" in details, details

    ping(topo, topo.left, right_tunnel)
    echo_server(topo, topo.right, right_tunnel, 5000)
    tcp_check(topo, topo.left, right_tunnel, 5000, nbytes=BULK_BYTES)
    echo_server(topo, topo.left, left_tunnel, 5001)
    tcp_check(topo, topo.right, left_tunnel, 5001, nbytes=BULK_BYTES)

    for ns, interface in interfaces.items():
        stats = counters(topo, ns, interface)
        # Two echoed transfers pass each interface both ways: 2 x 8 MiB in each direction.
        assert stats["tx"]["bytes"] > 2 * BULK_BYTES and stats["rx"]["bytes"] > 2 * BULK_BYTES, stats
        # Without offloads every packet is at most the MTU, so the averages could not exceed it.
        assert stats["tx"]["bytes"] / stats["tx"]["packets"] > 2 * MTU, f"no TSO reads: {stats}"
        assert stats["rx"]["bytes"] / stats["rx"]["packets"] > 2 * MTU, f"no GRO writes: {stats}"
