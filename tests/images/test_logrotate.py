"""The images' logrotate configuration, run for real against a running xpart-agent and
xpart-relay: its postrotate reloads each unit, and `systemctl reload` runs the unit's own
ExecReload with the daemon's pid. Both daemons must survive it and write to the new file.

Uses the loopback stack of tests/e2e (built binaries, the Bedrock stand-in); skips when
logrotate or the binaries are missing.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
E2E = REPO / "tests" / "e2e"

sys.path.insert(0, str(E2E))
import agent_harness as a  # noqa: E402
import relay_harness as h  # noqa: E402
from agent_harness import start_stack  # noqa: E402,F401  (pytest fixture)

_spec = importlib.util.spec_from_file_location("e2e_fixtures", E2E / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
relay_bin = _fixtures.relay_bin
test_pki = _fixtures.test_pki
upstream_dns = _fixtures.upstream_dns
credential_store = _fixtures.credential_store
standin = _fixtures.standin

UNITS = {"xpart-agent.service": "agent", "xpart-relay.service": "relay"}


def exec_reload(unit):
    """The ExecReload command line of one of the images' units."""
    lines = (IMAGES / "systemd" / unit).read_text().splitlines()
    [command] = [line.split("=", 1)[1] for line in lines if line.startswith("ExecReload=")]
    return command


def test_units_reload_with_sighup():
    for unit in UNITS:
        assert exec_reload(unit) == "/bin/kill -HUP $MAINPID", unit


def test_logrotate_postrotate_reloads_both_running_daemons(start_stack, tmp_path):  # noqa: F811
    if shutil.which("logrotate") is None:
        pytest.skip("logrotate not installed (apt-get install logrotate)")
    stack = start_stack()
    relay = stack.relays[0]
    first = a.boto3_call(stack.env(), op="converse", model=a.CLAUDE, text="before rotation")
    assert first.get("text") == "standin:before rotation", first
    h.read_audit(stack.audit_path, 1)
    h.read_audit(relay.audit_path, 1)

    # systemctl as the appliance has it: both units active, reload = the unit's ExecReload.
    pids = {"xpart-agent.service": stack.agent.proc.pid, "xpart-relay.service": relay.process.proc.pid}
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "systemctl.calls"
    cases = "".join(
        f'  "--quiet is-active {unit}") exit 0 ;;\n'
        f'  "reload {unit}") MAINPID={pid}; {exec_reload(unit)} ;;\n'
        for unit, pid in pids.items()
    )
    systemctl = fake_bin / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncase "$*" in\n{cases}  *) exit 3 ;;\nesac\n')
    systemctl.chmod(0o755)

    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
    text = (IMAGES / "logrotate.d" / "xpart").read_text()
    assert "/var/log/xpart/audit.jsonl" in text
    text = text.replace("/var/log/xpart/audit.jsonl", f"{stack.audit_path} {relay.audit_path}")
    text = text.replace("su xpart xpart", f"su {user} {group}")
    text = text.replace("create 0640 xpart xpart", f"create 0640 {user} {group}")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text)
    conf.chmod(0o644)

    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    result = subprocess.run(
        ["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "reload xpart-agent.service" in calls.read_text()
    assert "reload xpart-relay.service" in calls.read_text()

    for process, name in [(stack.agent, "agent"), (relay.process, "relay")]:
        # The reload is asynchronous to logrotate; it has run once the log says so.
        _wait_for(lambda: "configuration reloaded" in process.logs(), f"{name} reload")
        assert process.proc.poll() is None, f"xpart-{name} died on logrotate's reload:\n{process.logs()}"

    second = a.boto3_call(stack.env(), op="converse", model=a.CLAUDE, text="after rotation")
    assert second.get("text") == "standin:after rotation", second
    for path in (stack.audit_path, relay.audit_path):
        [line] = h.read_audit(path, 1)
        assert line["request_id"] == second["request_id"], path
        rotated = [p for p in Path(path).parent.iterdir() if p.name.startswith("audit.jsonl-")]
        assert len(rotated) == 1, rotated
        assert first["request_id"] in rotated[0].read_text()
        assert second["request_id"] not in rotated[0].read_text()


def _wait_for(condition, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
