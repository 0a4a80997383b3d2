"""A loopback xpart stack for the CLI suites: relays answering the echo model, and an agent
in front of them, all in tunnel mode "host" (the CLI's drills and probes exercise the
agent's relay failover, not WireGuard). Keys, certificates and tokens come from `xpart`
itself, so the material the CLI makes is what the daemons run on."""

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

from conftest import BIN_DIR, run_json, run_xpart

AGENT = BIN_DIR / "xpart-agent"
RELAY = BIN_DIR / "xpart-relay"
ECHO_MODEL = "xpart.echo"


def binaries_present():
    return AGENT.exists() and RELAY.exists()


class Daemon:
    """A daemon process; its addresses come from the JSON line it prints once listening."""

    def __init__(self, binary, config_path, log_path):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        # Static dummy credentials make the relays ready; only the echo model is ever called,
        # so nothing is signed for or sent upstream.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_LOG": "info",
               "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_ACCESS_KEY_ID": "AKIAXPARTCLITEST0001",
               "AWS_SECRET_ACCESS_KEY": "xpart-cli-test-secret",
               "AWS_CONFIG_FILE": "/nonexistent/config",
               "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials"}
        self.proc = subprocess.Popen(
            [str(binary), "--config", str(config_path)],
            stdout=subprocess.PIPE, stderr=self.log, env=env,
        )
        result = {}
        reader = threading.Thread(
            target=lambda: result.update(line=self.proc.stdout.readline()), daemon=True
        )
        reader.start()
        reader.join(20)
        if not result.get("line"):
            self.stop()
            raise RuntimeError(f"{binary.name} did not start:\n{self.logs()}")
        self.info = json.loads(result["line"])

    def addr(self, key):
        host, port = self.info[key].rsplit(":", 1)
        return host.strip("[]"), int(port)

    @property
    def pid(self):
        return self.proc.pid

    def admin_url(self):
        host, port = self.addr("admin")
        return f"http://{host}:{port}"

    def logs(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def http_json(url, method="GET"):
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


AGENT_TUNNEL = "100.64.0.1"
RELAY_TUNNELS = {"relay-a": "100.64.0.2", "relay-b": "100.64.0.3"}
SERVICE_PORT = 8080


def relay_config(directory, name, service_ip, agent_public=None):
    if agent_public is None:
        tunnel = f"""
[tunnel]
mode = "host"

[[agent]]
name = "agent-test"
tunnel_address = "127.0.0.1"

[service]
listen = "{service_ip}:0"
"""
    else:
        address = RELAY_TUNNELS[name]
        tunnel = f"""
[tunnel]
mode = "userspace"
private_key_file = "{directory / f'{name}.key'}"
address = "{address}/24"
listen_port = 0
bind_address = "127.0.0.1"

[[agent]]
name = "agent-test"
public_key = "{agent_public}"
tunnel_address = "{AGENT_TUNNEL}"

[service]
listen = "{address}:{SERVICE_PORT}"
"""
    text = tunnel + f"""
[upstream]
region = "us-east-1"
endpoint = "https://bedrock-runtime.us-east-1.amazonaws.com"
resolver = ["127.0.0.1:9"]

[policy]
operations = ["Converse", "ConverseStream"]
models = ["{ECHO_MODEL}"]

[echo]
model = "{ECHO_MODEL}"

[admin]
listen = "127.0.0.1:0"

[audit]
path = "{directory / f'{name}-audit.jsonl'}"
"""
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def agent_config(directory, relays, token_hash, health, relay_publics=None):
    if relay_publics is None:
        tunnel = '[tunnel]\nmode = "host"\n'
        relay_tables = "".join(
            f"""
[[relay]]
name = "{name}"
tunnel_address = "{relay.addr('service')[0]}"
service_port = {relay.addr('service')[1]}
"""
            for name, relay in relays
        )
    else:
        tunnel = f"""[tunnel]
mode = "userspace"
private_key_file = "{directory / 'agent.key'}"
address = "{AGENT_TUNNEL}/24"
listen = "127.0.0.1:0"
"""
        relay_tables = "".join(
            f"""
[[relay]]
name = "{name}"
public_key = "{relay_publics[name]}"
endpoint = "127.0.0.1:{relay.addr('udp')[1]}"
tunnel_address = "{RELAY_TUNNELS[name]}"
service_port = {SERVICE_PORT}
persistent_keepalive = 1
"""
            for name, relay in relays
        )
    health_table = "".join(f"{key} = {value}\n" for key, value in health.items())
    text = f"""
{tunnel}
{relay_tables}
[front]
listen = "127.0.0.1:0"
cert_file = "{directory / 'front.pem'}"
key_file = "{directory / 'front.key'}"

[[principal]]
name = "drill"
token_sha256 = "{token_hash}"
models = ["*"]

[admin]
listen = "127.0.0.1:0"

[audit]
path = "{directory / 'agent-audit.jsonl'}"

[health]
{health_table}
"""
    path = directory / "agent.toml"
    path.write_text(text)
    return path


def keygen(path):
    result = run_xpart("keygen", "--out", path)
    result.check_returncode()
    return result.stdout.strip()


class Stack:
    """An agent with relays relay-a (preferred) and relay-b on loopback; in tunnel mode "host"
    by default, or over userspace WireGuard with `wireguard=True`."""

    def __init__(self, directory, health=None, wireguard=False):
        self.directory = directory
        self.daemons = []
        run_xpart("ca", "init", "--dir", directory / "ca").check_returncode()
        run_xpart(
            "ca", "issue", "--ca-dir", directory / "ca", "--region", "us-east-1",
            "--name", "localhost", "--ip", "127.0.0.1", "--out", directory / "front",
        ).check_returncode()
        _, token = run_json("token", "new", "--principal", "drill")
        self.token = token["token"]
        self.ca = directory / "ca" / "ca.pem"
        agent_public = relay_publics = None
        if wireguard:
            agent_public = keygen(directory / "agent.key")
            relay_publics = {name: keygen(directory / f"{name}.key") for name in RELAY_TUNNELS}
        try:
            self.relays = {}
            for name, ip in (("relay-a", "127.0.0.1"), ("relay-b", "127.0.0.2")):
                config = relay_config(directory, name, ip, agent_public)
                relay = Daemon(RELAY, config, directory / f"{name}.log")
                self.daemons.append(relay)
                self.relays[name] = relay
            config = agent_config(
                directory, list(self.relays.items()), token["token_sha256"],
                health or {"interval_ms": 200, "probe_timeout_ms": 500, "fail_after": 2, "rise_after": 2},
                relay_publics,
            )
            self.agent = Daemon(AGENT, config, directory / "agent.log")
            self.daemons.append(self.agent)
            self.wait_ready()
        except Exception:
            self.stop()
            raise

    def wait_ready(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _ = http_json(self.agent.admin_url() + "/readyz")
            if status == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"agent never became ready:\n{self.agent.logs()}")

    def probe_args(self):
        host, port = self.agent.addr("front")
        return [
            "--endpoint", f"https://bedrock-runtime.us-east-1.amazonaws.com:{port}",
            "--connect", f"{host}:{port}",
            "--ca-bundle", self.ca,
            "--token", self.token,
        ]

    def audit(self, name):
        path = self.directory / f"{name}-audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop(self):
        for daemon in reversed(self.daemons):
            daemon.stop()
