"""The agent's TLS front as a process: SIGHUP swaps the certificate for new connections while
connections already open keep working; a bad certificate on SIGHUP keeps the old one; and
`--check` reports configuration problems with file, field and fix."""

import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import http.client

import pytest

import agent_harness as a
import relay_harness as h


@pytest.fixture
def agent_with_own_cert(tmp_path, test_pki):
    if not os.access(a.agent_binary(), os.X_OK):
        pytest.skip(f"xpart-agent is not built at {a.agent_binary()}")
    # The agent serves copies, so the test can replace them.
    pki = dict(test_pki)
    for key in ("cert", "key"):
        copy = tmp_path / os.path.basename(test_pki[key])
        shutil.copy(test_pki[key], copy)
        os.chmod(copy, 0o600)
        pki[key] = str(copy)
    agent = a.AgentProcess(a.host_mode_config(str(tmp_path), pki, "[]"), str(tmp_path / "agent.log"))
    yield agent, pki, tmp_path
    agent.stop()


def fingerprint_of(conn):
    return hashlib.sha256(conn.sock.getpeercert(binary_form=True)).hexdigest()


def connect(port, cafile):
    context = ssl.create_default_context(cafile=cafile)
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    conn.connect()
    return conn


def ask(conn):
    conn.request("POST", "/model/anthropic.claude-v2/converse", body=b"{}", headers={"authorization": "Bearer t"})
    response = conn.getresponse()
    response.read()
    return response.status


def test_sighup_reloads_the_certificate_without_dropping_connections(agent_with_own_cert, tmp_path):
    agent, pki, _ = agent_with_own_cert
    # A new CA too: once the new certificate is served, only the new CA verifies it.
    fresh = h.certs.make_test_pki(str(tmp_path / "fresh"), [h.UPSTREAM_NAME, "localhost"])

    # Opened and left idle across the reload: its first request comes after SIGHUP. (Without a
    # relay every answer is a 503 that closes an HTTP/1.1 connection, so no request goes on it
    # before.)
    before = connect(agent.front[1], pki["ca"])
    old_fingerprint = fingerprint_of(before)

    shutil.copy(fresh["cert"], pki["cert"])
    shutil.copy(fresh["key"], pki["key"])
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while True:
        try:
            after = connect(agent.front[1], fresh["ca"])
            break
        except ssl.SSLCertVerificationError:
            assert time.monotonic() < deadline, "new connections never got the new certificate"
            time.sleep(0.1)
    new_fingerprint = fingerprint_of(after)
    assert new_fingerprint != old_fingerprint
    assert ask(after) in (200, 503)
    # http.client sends on the socket it holds (it reopens only a socket it closed itself), so
    # an answer here is an answer on the connection of before.
    assert before.sock is not None
    assert ask(before) in (200, 503), "the connection opened before SIGHUP still works"
    assert agent.proc.poll() is None

    # A broken key on the next SIGHUP keeps the certificate that works.
    with open(pki["key"], "w") as f:
        f.write("not a key\n")
    agent.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    again = connect(agent.front[1], fresh["ca"])
    assert fingerprint_of(again) == new_fingerprint
    assert "configuration not reloaded" in agent.logs()


def test_an_http1_answer_that_leaves_the_body_unread_says_the_connection_closes(agent_with_own_cert):
    # No relay: the agent answers 503 without reading the body, and hyper will not reuse the
    # connection; a client must be told, or its next request goes into the close.
    agent, pki, _ = agent_with_own_cert
    conn = connect(agent.front[1], pki["ca"])
    conn.request("POST", "/model/anthropic.claude-v2/converse", body=b"{}",
                 headers={"authorization": "Bearer t"})
    response = conn.getresponse()
    response.read()
    assert response.status in (401, 403, 503)
    assert response.getheader("connection") == "close"
    # http.client honours it: the next request opens a new connection and is answered.
    assert ask(conn) in (401, 403, 503)


def test_http1_and_http2_by_alpn(agent_with_own_cert):
    agent, pki, _ = agent_with_own_cert
    for protocols, expected in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
        context = ssl.create_default_context(cafile=pki["ca"])
        context.set_alpn_protocols(protocols)
        with socket.create_connection(agent.front, timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() == expected


def test_check_reports_problems_with_file_field_and_fix(tmp_path):
    if not os.access(a.agent_binary(), os.X_OK):
        pytest.skip(f"xpart-agent is not built at {a.agent_binary()}")
    path = tmp_path / "agent.toml"
    path.write_text("""
[tunnel]
mode = "userspace"
private_key_file = "missing.key"
address = "100.64.0.1/24"

[front]
listen = "127.0.0.1:0"
cert_file = "missing.pem"
key_file = "missing.key"
""")
    proc = subprocess.run([a.agent_binary(), "--config", str(path), "--check"], capture_output=True, text=True)
    assert proc.returncode == 2
    for expected in ("[tunnel].private_key_file", "[front].cert_file", "[[relay]]", "[[principal]]", "fix:"):
        assert expected in proc.stderr, proc.stderr
    assert str(path) in proc.stderr


def _closed_within(sock, seconds):
    """Seconds until the peer closes `sock` (EOF or reset); fails after `seconds`."""
    sock.settimeout(seconds)
    started = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    except socket.timeout:
        pytest.fail(f"the agent kept a silent connection open for {seconds} s")
    return time.monotonic() - started


@pytest.fixture
def agent_with_short_deadlines(tmp_path, test_pki):
    if not os.access(a.agent_binary(), os.X_OK):
        pytest.skip(f"xpart-agent is not built at {a.agent_binary()}")
    path = a.host_mode_config(str(tmp_path), test_pki, "[]")
    with open(path) as f:
        text = f.read()
    knobs = "handshake_timeout_secs = 1\nfirst_request_timeout_secs = 2\nidle_timeout_secs = 1\nmax_connections_per_source = 2\n"
    with open(path, "w") as f:
        f.write(text.replace("[front]\n", "[front]\n" + knobs, 1))
    agent = a.AgentProcess(path, str(tmp_path / "agent.log"))
    yield agent, test_pki
    agent.stop()


def test_connections_that_send_nothing_are_closed_and_caps_refuse_at_accept(agent_with_short_deadlines):
    agent, pki = agent_with_short_deadlines
    context = ssl.create_default_context(cafile=pki["ca"])

    # No TLS at all: closed after the handshake timeout.
    with socket.create_connection(agent.front, timeout=5) as raw:
        assert 0.8 <= _closed_within(raw, 5) < 3

    # Two TLS connections from 127.0.0.1 fill its per-source cap: a third is closed at accept.
    held = [context.wrap_socket(socket.create_connection(agent.front, timeout=5), server_hostname="localhost") for _ in range(2)]
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        with socket.create_connection(agent.front, timeout=5) as raw:
            context.wrap_socket(raw, server_hostname="localhost").close()
    # Then each is closed for sending no request.
    for tls in held:
        assert _closed_within(tls, 5) < 3
        tls.close()

    # (Idle keep-alive after a request, and streams outliving idle_timeout_secs, need a relay:
    # agent/tests/front_limits.rs covers them.)
    metrics = agent.metrics()
    for series in (
        'xpart_agent_front_connections_closed_total{reason="handshake_timeout"} 1',
        'xpart_agent_front_connections_closed_total{reason="first_request_timeout"} 2',
        'xpart_agent_front_connections_refused_total{reason="max_connections_per_source"} 1',
        "xpart_agent_front_connections_open 0",
    ):
        assert series in metrics, metrics


def test_check_refuses_a_front_key_that_group_or_others_can_read(tmp_path, test_pki):
    if not os.access(a.agent_binary(), os.X_OK):
        pytest.skip(f"xpart-agent is not built at {a.agent_binary()}")
    key = tmp_path / "front.key"
    shutil.copy(test_pki["key"], key)
    os.chmod(key, 0o644)
    path = a.host_mode_config(str(tmp_path), dict(test_pki, key=str(key)), "[]")
    proc = subprocess.run([a.agent_binary(), "--config", path, "--check"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "[front].key_file" in proc.stderr, proc.stderr
    assert f"{key}: private key file is accessible by group or others (mode 0644) — fix: chmod 600 {key}" in proc.stderr
