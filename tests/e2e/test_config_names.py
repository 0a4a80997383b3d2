"""Durations are named with `_secs` or `_ms`. A field's old name still loads: `--check` prints a
warning naming the old and the new field and passes, and a running agent logs the same warning
when it loads the file."""

import json
import os
import subprocess

import pytest

import agent_harness as a

OLD = "\n[health]\nhandshake_max_age_s = 90\n"
NEW = "\n[health]\nhandshake_max_age_secs = 90\n"


def _config(tmp_path, test_pki, health):
    path = a.host_mode_config(str(tmp_path), test_pki, "[]")
    with open(path, "a") as f:
        f.write(health)
    return path


def _check(path):
    return subprocess.run([a.agent_binary(), "--config", path, "--check"], capture_output=True, text=True)


@pytest.fixture
def built():
    if not os.path.exists(a.agent_binary()):
        pytest.skip(f"xpart-agent is not built at {a.agent_binary()}")


def test_check_passes_an_old_name_with_a_warning_naming_both(built, tmp_path, test_pki):
    proc = _check(_config(tmp_path, test_pki, OLD))
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout
    assert "warning: " in proc.stderr, proc.stderr
    assert "[health].handshake_max_age_s" in proc.stderr, proc.stderr
    assert "rename handshake_max_age_s to handshake_max_age_secs" in proc.stderr, proc.stderr


def test_check_is_silent_for_the_new_name(built, tmp_path, test_pki):
    proc = _check(_config(tmp_path, test_pki, NEW))
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr


def test_check_refuses_both_names(built, tmp_path, test_pki):
    proc = _check(_config(tmp_path, test_pki, "\n[health]\nhandshake_max_age_s = 90\nhandshake_max_age_secs = 90\n"))
    assert proc.returncode == 2, proc.stderr
    assert "keep only handshake_max_age_secs" in proc.stderr, proc.stderr


def test_a_running_agent_logs_the_deprecation_at_load(built, tmp_path, test_pki):
    agent = a.AgentProcess(_config(tmp_path, test_pki, OLD), str(tmp_path / "agent.log"))
    try:
        warnings = [
            json.loads(line)
            for line in agent.logs().splitlines()
            if line.startswith("{") and json.loads(line).get("level") == "WARN"
        ]
    finally:
        agent.stop()
    fields = [w.get("field") for w in warnings]
    assert "[health].handshake_max_age_s" in fields, warnings
    message = next(w for w in warnings if w.get("field") == "[health].handshake_max_age_s")["message"]
    assert "handshake_max_age_secs" in message, message
