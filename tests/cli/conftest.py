"""Shared fixtures for the `xpart` CLI suites: the binary, free loopback ports, a moto EC2
server per test module, and a helper that runs the CLI with an isolated AWS environment."""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("XPART_BIN_DIR", REPO / "target" / "debug"))
XPART = BIN_DIR / "xpart"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def aws_env(tmp_path=None):
    """Dummy credentials and no shared config, so nothing real is ever reached."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE="/nonexistent/xpart-test-config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/xpart-test-credentials",
    )
    return env


def run_xpart(*args, env=None, input=None, timeout=60):
    if not XPART.exists():
        pytest.fail(f"{XPART} missing: run `cargo build -p xpart` (or set XPART_BIN_DIR)")
    return subprocess.run(
        [str(XPART), *map(str, args)],
        env=env if env is not None else aws_env(),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_json(*args, **kwargs):
    result = run_xpart("--json", *args, **kwargs)
    try:
        body = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"not JSON (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result, body


@pytest.fixture(scope="module")
def moto_endpoint():
    """A moto_server on a free loopback port for the module; tests reset it."""
    if shutil.which("moto_server") is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def reset_moto(endpoint):
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
