"""xpart's tunnel against a standard WireGuard peer (Debian's wireguard-go configured with `wg`),
in two network namespaces joined by veth. Root only; skipped with the reason otherwise.

    left  namespace: xpart-tunnel-peer   tunnel 100.64.0.1, underlay 192.0.2.1
    right namespace: wireguard-go + wg   tunnel 100.64.0.2, underlay 192.0.2.2
"""

import json
import os
import subprocess

import pytest

import tunnel_netns as tn
from tunnel_netns import LEFT_TUNNEL, RIGHT_TUNNEL, LEFT_UNDERLAY, RIGHT_UNDERLAY, WG_PORT

pytestmark = pytest.mark.skipif(tn.missing_prerequisite() is not None,
                                reason=str(tn.missing_prerequisite()))

TCP_BYTES = 2 * 1024 * 1024


@pytest.fixture
def topo():
    with tn.Topology() as topology:
        yield topology


def start_pair(topo, mode, extra=()):
    """xpart (left, `mode`) and wireguard-go (right), each knowing the other's endpoint."""
    xpart_private, xpart_public = tn.genkey()
    wg_private, wg_public = tn.genkey()
    tag = topo.left.split("-l")[-1]
    wg_interface = f"xptwg{tag}"
    topo.start_wireguard_go(topo.right, wg_interface, wg_private, xpart_public,
                            f"{RIGHT_TUNNEL}/30", f"{LEFT_UNDERLAY}:{WG_PORT}", f"{LEFT_TUNNEL}/32")
    xpart = topo.start_xpart(topo.left, mode, xpart_private, wg_public, f"{LEFT_TUNNEL}/30",
                             f"{RIGHT_UNDERLAY}:{WG_PORT}", f"{RIGHT_TUNNEL}/32",
                             interface=f"xptk{tag}" if mode == "kernel" else None, extra=extra)
    return xpart, wg_interface


def echo_server(topo, ns, host, port):
    proc = topo.spawn(ns, "python3", tn.tcp_script(), "echo", host, str(port), name=f"echo-{ns}-{port}")
    assert proc.stdout.readline().strip() == "listening", proc.log_path.read_text()
    return proc


def tcp_check(topo, ns, host, port, nbytes=TCP_BYTES):
    result = topo.exec(ns, "python3", tn.tcp_script(), "check", host, str(port), str(nbytes),
                       check=False, timeout=60)
    assert result.returncode == 0, f"TCP {ns} -> {host}:{port}: {result.stdout}{result.stderr}"
    assert result.stdout.strip() == f"ok {nbytes}"


def ping(topo, ns, address):
    result = topo.exec(ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", address, check=False, timeout=30)
    assert result.returncode == 0, f"ping {ns} -> {address}: {result.stdout}{result.stderr}"
    assert " 0% packet loss" in result.stdout, result.stdout


def stats_on_exit(proc):
    output = tn.stop(proc)
    lines = [line for line in output.splitlines() if line.startswith("[")]
    assert lines, f"no statistics printed: {output!r}"
    (peer,) = json.loads(lines[-1])
    return peer


def wg_transfer(topo, interface):
    """(rx, tx) bytes wireguard-go reports for its one peer."""
    line = topo.exec(topo.right, "wg", "show", interface, "transfer").stdout.split()
    return int(line[1]), int(line[2])


def test_kernel_mode_ping_and_tcp_both_ways(topo):
    xpart, wg_interface = start_pair(topo, "kernel")

    ping(topo, topo.left, RIGHT_TUNNEL)
    ping(topo, topo.right, LEFT_TUNNEL)

    echo_server(topo, topo.right, RIGHT_TUNNEL, 5000)
    tcp_check(topo, topo.left, RIGHT_TUNNEL, 5000)
    echo_server(topo, topo.left, LEFT_TUNNEL, 5001)
    tcp_check(topo, topo.right, LEFT_TUNNEL, 5001)

    wg_rx, wg_tx = wg_transfer(topo, wg_interface)
    peer = stats_on_exit(xpart)
    # Two echo checks: 2 x 2 MiB each way through the tunnel, plus headers.
    assert peer["rx_bytes"] > 2 * TCP_BYTES and peer["tx_bytes"] > 2 * TCP_BYTES, peer
    assert wg_rx > 2 * TCP_BYTES and wg_tx > 2 * TCP_BYTES, (wg_rx, wg_tx)
    assert peer["last_handshake"] is not None
    assert peer["endpoint"] == f"{RIGHT_UNDERLAY}:{WG_PORT}"


def test_kernel_mode_interface_goes_away_with_the_process(topo):
    xpart, _ = start_pair(topo, "kernel")
    tag = topo.left.split("-l")[-1]
    assert topo.exec(topo.left, "ip", "link", "show", f"xptk{tag}", check=False).returncode == 0
    routes = topo.exec(topo.left, "ip", "route", "show", "dev", f"xptk{tag}").stdout
    assert RIGHT_TUNNEL in routes or "100.64.0.0/30" in routes, routes
    tn.stop(xpart)
    assert topo.exec(topo.left, "ip", "link", "show", f"xptk{tag}", check=False).returncode != 0


def test_userspace_mode_connects_to_and_accepts_from_the_wireguard_go_side(topo):
    # Host port 7000 (left) -> tunnel 100.64.0.2:5000 (a server behind wireguard-go);
    # tunnel port 6000 on 100.64.0.1 (accepted by xpart's stack) -> host 127.0.0.1:6001 (left).
    xpart, wg_interface = start_pair(topo, "userspace", extra=(
        "--forward", "127.0.0.1:7000=100.64.0.2:5000",
        "--reverse", "6000=127.0.0.1:6001"))
    # Userspace mode creates no interface: the left namespace cannot reach 100.64.0.2 itself.
    assert topo.exec(topo.left, "ip", "route", "get", RIGHT_TUNNEL, check=False).returncode != 0

    echo_server(topo, topo.right, RIGHT_TUNNEL, 5000)
    tcp_check(topo, topo.left, "127.0.0.1", 7000)

    echo_server(topo, topo.left, "127.0.0.1", 6001)
    tcp_check(topo, topo.right, LEFT_TUNNEL, 6000)

    peer = stats_on_exit(xpart)
    assert peer["rx_bytes"] > 2 * TCP_BYTES and peer["tx_bytes"] > 2 * TCP_BYTES, peer
    assert peer["drops"]["not_allowed_source"] == 0


def test_userspace_mode_refuses_a_tunnel_port_nobody_listens_on(topo):
    start_pair(topo, "userspace", extra=("--reverse", "6000=127.0.0.1:6001"))
    result = topo.exec(topo.right, "python3", "-c",
                       "import socket,sys\n"
                       "try:\n socket.create_connection(('100.64.0.1', 6999), timeout=10)\n"
                       "except ConnectionRefusedError:\n sys.exit(0)\n"
                       "sys.exit(1)\n", check=False, timeout=30)
    assert result.returncode == 0, result.stderr


def test_kernel_mode_without_cap_net_admin_fails_with_a_clear_error(topo):
    """Started as an unprivileged user, the peer must refuse with the fix, not half-start."""
    if subprocess.run(["which", "setpriv"], capture_output=True).returncode != 0:
        pytest.skip("needs setpriv (util-linux) to drop privileges")
    private, _ = tn.genkey()
    _, peer_public = tn.genkey()
    key = topo.key_file("unprivileged", private)
    os.chown(key, 65534, 65534)
    topo.tmp.chmod(0o755)
    result = topo.exec(topo.left, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                       "--inh-caps=-all", str(tn.peer_binary()), "--mode", "kernel",
                       "--private-key-file", str(key), "--address", f"{LEFT_TUNNEL}/30",
                       "--interface", "xptnoperm", "--peer-public-key", peer_public,
                       "--allowed-ip", f"{RIGHT_TUNNEL}/32", check=False, timeout=30)
    assert result.returncode != 0
    assert "CAP_NET_ADMIN" in result.stderr and "userspace" in result.stderr, result.stderr
    assert topo.exec(topo.left, "ip", "link", "show", "xptnoperm", check=False).returncode != 0
