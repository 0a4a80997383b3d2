"""`xpart probe` and `xpart status` against a real agent with two relays on loopback, plus
fake servers for the failure modes (wrong CA, silent TLS, closed port, unreachable admin)."""

import base64
import hashlib
import json
import os
import re
import socket
import struct
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import daemons
from conftest import free_port, run_json, run_xpart

pytestmark = pytest.mark.skipif(
    not daemons.binaries_present(),
    reason="xpart-agent/xpart-relay not built (cargo build --workspace --bins)",
)


@pytest.fixture
def stack(tmp_path):
    stack = daemons.Stack(tmp_path)
    yield stack
    stack.stop()


# --- probe -------------------------------------------------------------------------------


def test_probe_gets_the_echo_through_the_agent_with_a_latency_breakdown(stack):
    result, report = run_json("probe", *stack.probe_args(), "--message", "hello drill")
    assert result.returncode == 0, result.stderr
    assert report["sent"] == 1 and report["failed"] == 0
    probe = report["probes"][0]
    assert probe["ok"] is True
    assert probe["status"] == 200
    assert probe["reply"] == "hello drill"
    timings = probe["timings"]
    for phase in ("dns_ms", "connect_ms", "tls_ms", "first_byte_ms"):
        assert timings[phase] is not None and timings[phase] >= 0, phase
        assert timings[phase] <= timings["total_ms"]
    audit = stack.audit("agent")
    assert [(a["principal"], a["operation"], a["model"], a["status"]) for a in audit] == [
        ("drill", "Converse", "xpart.echo", 200)
    ]

    text = run_xpart("probe", *stack.probe_args(), "--count", "3", "--interval", "50ms")
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("ok xpart.echo replied") == 3
    assert "dns " in text.stdout and "tls " in text.stdout and "first byte" in text.stdout
    assert "3 sent, 0 failed" in text.stdout


def test_probe_reports_a_refusal_with_its_error_type(stack):
    args = stack.probe_args()
    args[args.index("--token") + 1] = "xpt_wrong"
    result, report = run_json("probe", *args)
    assert result.returncode == 1
    probe = report["probes"][0]
    assert probe["ok"] is False
    assert probe["status"] == 403
    assert probe["error_type"].endswith("Exception")
    assert probe["message"]


def test_probe_of_a_model_the_relay_does_not_allow_fails(stack):
    result, report = run_json("probe", *stack.probe_args(), "--model", "anthropic.claude-v2")
    assert result.returncode == 1
    assert report["probes"][0]["status"] >= 400


def test_probe_refuses_a_certificate_from_another_ca(stack, tmp_path):
    run_xpart("ca", "init", "--dir", tmp_path / "other").check_returncode()
    args = stack.probe_args()
    args[args.index("--ca-bundle") + 1] = tmp_path / "other" / "ca.pem"
    result, report = run_json("probe", *args)
    assert result.returncode == 1
    assert report["probes"][0]["failed_phase"] == "tls"
    assert stack.audit("agent") == []


def test_probe_checks_the_name_in_the_certificate(stack):
    args = stack.probe_args()
    port = stack.agent.addr("front")[1]
    args[args.index("--endpoint") + 1] = f"https://bedrock-runtime.eu-west-1.amazonaws.com:{port}"
    result, report = run_json("probe", *args)
    assert result.returncode == 1
    assert report["probes"][0]["failed_phase"] == "tls"


def test_probe_of_a_closed_port_fails_fast_in_connect(tmp_path):
    run_xpart("ca", "init", "--dir", tmp_path).check_returncode()
    started = time.monotonic()
    result, report = run_json(
        "probe", "--connect", f"127.0.0.1:{free_port()}", "--ca-bundle", tmp_path / "ca.pem"
    )
    assert result.returncode == 1
    assert report["probes"][0]["failed_phase"] == "connect"
    assert time.monotonic() - started < 5


def test_probe_of_a_silent_server_times_out_in_tls(tmp_path):
    run_xpart("ca", "init", "--dir", tmp_path).check_returncode()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    try:
        started = time.monotonic()
        result, report = run_json(
            "probe", "--connect", f"127.0.0.1:{listener.getsockname()[1]}",
            "--ca-bundle", tmp_path / "ca.pem", "--timeout", "700ms",
        )
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert result.returncode == 1
    probe = report["probes"][0]
    assert probe["failed_phase"] == "tls"
    assert probe["message"] == "timed out"
    assert 0.6 < probe["timings"]["total_ms"] / 1000 < 2
    assert elapsed < 5


def test_probe_input_errors(tmp_path):
    missing = run_xpart("probe", "--ca-bundle", tmp_path / "none.pem", "--connect", "127.0.0.1:1")
    assert missing.returncode == 2
    assert "none.pem" in missing.stderr
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    empty = run_xpart("probe", "--ca-bundle", tmp_path / "empty.pem", "--connect", "127.0.0.1:1")
    assert empty.returncode == 2
    assert "CA" in empty.stderr


# --- status ------------------------------------------------------------------------------


def status_args(stack):
    return [
        "--agent", stack.agent.admin_url(),
        "--relay", stack.relays["relay-a"].admin_url(),
        "--relay", stack.relays["relay-b"].admin_url(),
    ]


def test_status_shows_relay_health_and_request_rates(stack):
    for _ in range(4):
        run_xpart("probe", *stack.probe_args()).check_returncode()
    result, report = run_json("status", *status_args(stack), "--window", "200ms")
    assert result.returncode == 0, result.stderr
    agent, relay_a, relay_b = report["daemons"]
    assert agent["service"] == "agent" and agent["ready"] is True
    relays = {r["name"]: r for r in agent["relays"]}
    assert relays["relay-a"]["active"] is True
    assert relays["relay-a"]["state"] == "healthy"
    assert relays["relay-b"]["state"] == "healthy"
    assert agent["requests"]["total"] == 4
    assert agent["requests"]["errors"] == 0
    assert agent["requests"]["per_second"] == 0
    assert relay_a["service"] == "relay" and relay_a["requests"]["total"] == 4
    assert relay_b["requests"]["total"] == 0

    text = run_xpart("status", *status_args(stack), "--window", "0")
    assert text.returncode == 0, text.stderr
    assert "active relay: relay-a" in text.stdout
    assert "requests: 4 total, 0 errors" in text.stdout


def test_status_of_a_drained_relay_and_a_dead_admin_port_fails(stack):
    status, body = daemons.http_json(stack.relays["relay-b"].admin_url() + "/drain", "POST")
    assert status == 200 and body["draining"] is True
    dead = f"127.0.0.1:{free_port()}"
    result, report = run_json("status", *status_args(stack), "--relay", dead, "--window", "0")
    assert result.returncode == 1
    by_url = {d["url"]: d for d in report["daemons"]}
    relay_b = by_url[stack.relays["relay-b"].admin_url()]
    assert relay_b["ready"] is False
    assert relay_b["status"]["draining"] is True
    gone = by_url[f"http://{dead}"]
    assert gone["reachable"] is False
    assert "cannot connect" in gone["error"]

    text = run_xpart("status", *status_args(stack), "--window", "0")
    assert text.returncode == 1
    assert "draining: yes" in text.stdout


def test_status_reads_the_admin_address_from_a_config(stack, tmp_path):
    host, port = stack.agent.addr("admin")
    config = tmp_path / "agent-copy.toml"
    config.write_text(f'[[relay]]\nname = "x"\n[admin]\nlisten = "{host}:{port}"\n')
    result, report = run_json("status", "--config", config, "--window", "0")
    assert result.returncode == 0, result.stderr
    assert report["daemons"][0]["service"] == "agent"

    no_admin = tmp_path / "relay-no-admin.toml"
    no_admin.write_text('[[agent]]\nname = "a"\n')
    refused = run_xpart("status", "--config", no_admin)
    assert refused.returncode == 2
    assert "[admin]" in refused.stderr


class FakeRelayAdmin:
    """A relay admin port reporting WireGuard peers, as a userspace/kernel relay does."""

    def __init__(self, peers):
        body = json.dumps({"service": "relay", "draining": False,
                           "tunnel": {"peers": peers, "dropped": {}}}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                payload = {"/status": body, "/readyz": b'{"ready":true}',
                           "/metrics": b"xpart_relay_requests_total{status=\"200\"} 3\n"}.get(self.path)
                if payload is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_status_shows_tunnel_peers_with_handshake_ages():
    now = int(time.time())
    admin = FakeRelayAdmin([
        {"name": "agent-a", "public_key": "k", "endpoint": "127.0.0.1:40000",
         "last_handshake": {"secs_since_epoch": now - 42, "nanos_since_epoch": 0},
         "handshake_age_seconds": 42.0, "rx_bytes": 1000, "tx_bytes": 2000, "rx_packets": 1, "tx_packets": 2, "drops": {}},
        {"name": "agent-b", "public_key": "k2", "endpoint": None, "last_handshake": None,
         "handshake_age_seconds": None, "rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0, "drops": {}},
    ])
    try:
        result, report = run_json("status", "--relay", admin.url, "--window", "0")
        text = run_xpart("status", "--relay", admin.url, "--window", "0")
    finally:
        admin.close()
    assert result.returncode == 0, result.stderr
    peers = {p["name"]: p for p in report["daemons"][0]["peers"]}
    assert 41 <= peers["agent-a"]["handshake_age_s"] <= 45
    assert peers["agent-b"]["handshake_age_s"] is None
    assert report["daemons"][0]["requests"]["total"] == 3
    assert "never" in text.stdout
    assert "127.0.0.1:40000" in text.stdout


def test_status_over_wireguard_shows_peers_with_recent_handshakes(tmp_path):
    stack = daemons.Stack(tmp_path, wireguard=True)
    try:
        run_xpart("probe", *stack.probe_args()).check_returncode()
        result, report = run_json("status", *status_args(stack), "--window", "0")
        text = run_xpart("status", *status_args(stack), "--window", "0")
    finally:
        stack.stop()
    assert result.returncode == 0, result.stderr
    agent, relay_a, relay_b = report["daemons"]
    assert agent["status"]["tunnel"]["mode"] == "userspace"
    agent_peers = {p["name"]: p for p in agent["peers"]}
    assert set(agent_peers) == {"relay-a", "relay-b"}
    for name, peer in agent_peers.items():
        assert peer["handshake_age_s"] is not None and peer["handshake_age_s"] < 30, (name, peer)
        assert peer["tx_bytes"] > 0 and peer["rx_bytes"] > 0
        assert peer["endpoint"] == f"127.0.0.1:{stack.relays[name].addr('udp')[1]}"
    relay_peer = relay_a["peers"][0]
    assert relay_peer["name"] == "agent-test"
    assert relay_peer["handshake_age_s"] is not None
    assert "HANDSHAKE AGO" in text.stdout and "relay-b" in text.stdout


# --- tunnel drops ----------------------------------------------------------------------------

def test_tunnel_junk_and_a_handshake_flood_are_counted_on_both_daemons(tmp_path):
    """Datagrams no peer can be blamed for (not WireGuard, an unknown receiver index, a bad
    mac1, a flood of 3,000 initiations with a valid mac1 answered with cookie replies) show in
    both daemons' `xpart_tunnel_dropped_total{reason}`, `/status` and `xpart status`."""
    stack = daemons.Stack(tmp_path, wireguard=True)
    try:
        relay = stack.relays["relay-a"]
        _, agent_status = daemons.http_json(stack.agent.admin_url() + "/status")
        relay_public = next(
            p["public_key"] for p in agent_status["tunnel"]["peers"] if p["name"] == "relay-a"
        )
        _, relay_status = daemons.http_json(relay.admin_url() + "/status")
        agent_host, agent_port = relay_status["tunnel"]["peers"][0]["endpoint"].rsplit(":", 1)
        targets = {"relay": relay.addr("udp"), "agent": (agent_host, int(agent_port))}

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            attacker.bind(("127.0.0.1", 0))
            for target in targets.values():
                for junk in JUNK:
                    attacker.sendto(junk, target)
                attacker.sendto(wireguard_data(receiver_index=0x5EED0001), target)
                attacker.sendto(b"\x01\x00\x00\x00" + os.urandom(144), target)
            flood = [initiation(relay_public) for _ in range(3000)]
            for datagram in flood:
                attacker.sendto(datagram, targets["relay"])
            cookies = cookie_replies(attacker)

            relay_drops = wait_for_drops(relay.admin_url(), lambda d: d.get("under_load", 0) >= 1000)
            agent_drops = wait_for_drops(stack.agent.admin_url(), lambda d: d.get("bad_mac", 0) >= 1)
        _, relay_status = daemons.http_json(relay.admin_url() + "/status")
        _, agent_status = daemons.http_json(stack.agent.admin_url() + "/status")
        result, report = run_json("status", *status_args(stack), "--window", "0")
        text = run_xpart("status", *status_args(stack), "--window", "0")
    finally:
        stack.stop()

    for drops in (relay_drops, agent_drops):
        assert drops["garbage"] >= len(JUNK), drops
        assert drops["unknown_index"] >= 1, drops
        assert drops["bad_mac"] >= 1, drops
    # The limiter lets its budget through (each fails to decrypt: no real key behind it) and
    # answers the rest with cookie replies.
    assert relay_drops["decrypt_failed"] >= 1, relay_drops
    assert relay_drops["under_load"] >= 1000, relay_drops
    assert cookies >= 100, cookies
    # /status carries the same counts, and every reason is listed, zeros included.
    assert relay_status["tunnel"]["dropped"]["under_load"] >= relay_drops["under_load"]
    assert agent_status["tunnel"]["dropped"]["bad_mac"] >= 1
    assert set(relay_drops) == set(relay_status["tunnel"]["dropped"])
    assert result.returncode == 0, result.stderr
    agent, relay_a, _ = report["daemons"]
    assert relay_a["tunnel_dropped"]["under_load"] >= 1000
    assert agent["tunnel_dropped"]["garbage"] >= len(JUNK)
    assert "tunnel drops:" in text.stdout and "under_load" in text.stdout, text.stdout


# Not WireGuard: empty, too short for any type, an unknown type, a data header cut short.
JUNK = [b"", b"\x01", b"GET / HTTP/1.1\r\n\r\n", b"\x04\x00\x00\x00\x01\x02"]


def wireguard_data(receiver_index):
    """A data message (type 4) naming `receiver_index`, with a counter and a tag of junk."""
    return struct.pack("<II", 4, receiver_index) + os.urandom(8 + 16 + 16)


def initiation(responder_public_b64):
    """A handshake initiation with a valid mac1 for the responder and random contents, as a
    flood built from the public key alone looks: it passes the mac1 check, never decrypts."""
    responder = base64.b64decode(responder_public_b64)
    body = struct.pack("<II", 1, int.from_bytes(os.urandom(4), "little")) + os.urandom(32 + 48 + 28)
    mac1_key = hashlib.blake2s(b"mac1----" + responder).digest()
    mac1 = hashlib.blake2s(body, key=mac1_key, digest_size=16).digest()
    return body + mac1 + bytes(16)


def cookie_replies(sock):
    """Cookie replies (type 3) that reach `sock` within a second of the last one."""
    sock.settimeout(1.0)
    count = 0
    try:
        while True:
            datagram = sock.recv(2048)
            count += datagram[:1] == b"\x03"
    except socket.timeout:
        return count


def wait_for_drops(admin_url, done, timeout=10.0):
    """`xpart_tunnel_dropped_total` by reason from `/metrics`, once `done(drops)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(admin_url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        drops = {
            match.group(1): int(float(match.group(2)))
            for match in re.finditer(r'^xpart_tunnel_dropped_total\{reason="([a-z_]+)"\} (\S+)$', text, re.M)
        }
        if done(drops) or time.monotonic() > deadline:
            assert "# TYPE xpart_tunnel_dropped_total counter" in text, text
            return drops
        time.sleep(0.1)
