"""Helpers to run the whole path on loopback: caller → xpart-agent → WireGuard (userspace
mode, UDP on 127.0.0.1) → xpart-relay → Bedrock stand-in (which checks the relay's SigV4
with botocore). Callers are boto3 and the AWS CLI configured only through environment
variables, run as separate processes with a clean environment.

Builds on relay_harness (stand-in, test PKI, relay process) and adds: WireGuard keys, the
relay's userspace tunnel config, the agent's config and process, and caller processes."""

import base64
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import pytest

import relay_harness as h

AGENT_TUNNEL = "100.64.0.1"
# Agent and relays share one tunnel network (each relay accepts only agents inside its own
# network); the agent routes to each relay by that peer's allowed IP.
TUNNEL_PREFIX = 24
RELAY_TUNNELS = ["100.64.0.2", "100.64.0.3", "100.64.0.4"]
SERVICE_PORT = 8080
CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"


def agent_binary():
    return os.path.join(h.bin_dir(), "xpart-agent")


def wg_keypair():
    """(private, public) WireGuard keys in base64, as `wg genkey | wg pubkey` prints them."""
    key = X25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(private).decode(), base64.b64encode(public).decode()


def write_key(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def token_sha256(token):
    return hashlib.sha256(token.encode()).hexdigest()


# --- relay in userspace mode ------------------------------------------------------------------

def relay_userspace_config(directory, standin_port, dns_port, ca_file, *, private_key_file,
                           tunnel_address, agent_public_key, **relay_options):
    """The relay harness's loopback config with its [tunnel], [[agent]] and [service] moved from
    host mode onto a userspace WireGuard tunnel."""
    path = h.relay_config(directory, standin_port, dns_port, ca_file, **relay_options)
    with open(path) as f:
        text = f.read()
    host_sections = (
        '[tunnel]\nmode = "host"\n\n'
        '[[agent]]\nname = "agent-test"\ntunnel_address = "127.0.0.1"\n\n'
        '[service]\nlisten = "127.0.0.1:0"\n'
    )
    assert host_sections in text, "relay_harness.relay_config changed shape; update agent_harness"
    tunnel_sections = f"""[tunnel]
mode = "userspace"
private_key_file = "{private_key_file}"
address = "{tunnel_address}/{TUNNEL_PREFIX}"
listen_port = 0
bind_address = "127.0.0.1"

[[agent]]
name = "agent-test"
public_key = "{agent_public_key}"
tunnel_address = "{AGENT_TUNNEL}"

[service]
listen = "{tunnel_address}:{SERVICE_PORT}"
"""
    with open(path, "w") as f:
        f.write(text.replace(host_sections, tunnel_sections))
    return path


class Relay:
    """One xpart-relay process on its own tunnel address."""

    def __init__(self, name, directory, process, tunnel_address, public_key):
        self.name = name
        self.directory = directory
        self.process = process
        self.tunnel_address = tunnel_address
        self.public_key = public_key
        self.audit_path = os.path.join(directory, "audit.jsonl")

    @property
    def udp(self):
        return self.process.udp

    def kill(self):
        """SIGKILL: the relay vanishes without closing anything, like a dead instance."""
        if self.process.proc.poll() is None:
            self.process.proc.kill()
            self.process.proc.wait()

    def stop(self):
        self.process.stop()


class RelayProcess(h.RelayProcess):
    """relay_harness.RelayProcess plus the UDP address of its WireGuard socket."""

    def _first_line(self, timeout):
        line = super()._first_line(timeout)
        info = json.loads(line)
        host, port = info["udp"].rsplit(":", 1)
        self.udp = ("127.0.0.1" if host in ("0.0.0.0", "127.0.0.1") else host, int(port))
        return line


# --- the agent --------------------------------------------------------------------------------

def agent_config(directory, *, relays, private_key_file, cert, key, principals,
                 dns_upstream=(), health=None, mode="userspace", dns_names=(h.UPSTREAM_NAME,)):
    """Write agent.toml for a loopback stack and return its path."""
    relay_tables = "".join(
        f"""
[[relay]]
name = "{r.name}"
public_key = "{r.public_key}"
endpoint = "{r.udp[0]}:{r.udp[1]}"
tunnel_address = "{r.tunnel_address}"
service_port = {SERVICE_PORT}
persistent_keepalive = 1
"""
        for r in relays
    )
    health_table = ""
    if health:
        health_table = "\n[health]\n" + "".join(f"{k} = {v}\n" for k, v in health.items())
    text = f"""
[tunnel]
private_key_file = "{private_key_file}"
address = "{AGENT_TUNNEL}/{TUNNEL_PREFIX}"
mode = "{mode}"
listen = "127.0.0.1:0"
{relay_tables}
[dns]
listen = "127.0.0.1:0"
answer = "127.0.0.1"
answer_v6 = "::1"
names = {json.dumps(list(dns_names))}
upstream = {json.dumps([f"{a}:{p}" for a, p in dns_upstream])}
ttl = 30

[front]
listen = "127.0.0.1:0"
cert_file = "{cert}"
key_file = "{key}"

{principals}

[admin]
listen = "127.0.0.1:0"

[audit]
path = "{os.path.join(directory, 'audit.jsonl')}"
{health_table}
"""
    path = os.path.join(directory, "agent.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def principal(name, *, token=None, cidrs=None, models=("*",), **limits):
    lines = [f'[[principal]]\nname = "{name}"']
    if token is not None:
        lines.append(f'token_sha256 = "{token_sha256(token)}"')
    if cidrs is not None:
        lines.append(f"source_cidrs = {json.dumps(list(cidrs))}")
    lines.append(f"models = {json.dumps(list(models))}")
    for field, value in limits.items():
        lines.append(f"{field} = {value}")
    return "\n".join(lines) + "\n"


class AgentProcess:
    """xpart-agent started from its binary; addresses read from its first stdout line."""

    def __init__(self, config_path, log_path):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_LOG": os.environ.get("RUST_LOG", "info")}
        self.proc = subprocess.Popen(
            [agent_binary(), "--config", config_path], stdout=subprocess.PIPE, stderr=self.log, env=env
        )
        result = {}
        reader = threading.Thread(target=lambda: result.update(line=self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(20)
        if not result.get("line"):
            self.stop()
            with open(log_path, "rb") as f:
                log = f.read().decode(errors="replace")
            raise RuntimeError(f"xpart-agent did not start; its log:\n{log}")
        info = json.loads(result["line"])
        self.front = _addr(info["front"])
        self.dns = _addr(info["dns"]) if info.get("dns") else None
        self.admin = _addr(info["admin"])

    @property
    def endpoint(self):
        # The test certificate names localhost and 127.0.0.1 besides the Bedrock name.
        return f"https://localhost:{self.front[1]}"

    def admin_json(self, path):
        status, _, body = h.get(self.admin, path)
        return status, json.loads(body) if body.strip().startswith(b"{") else body.decode()

    def metrics(self):
        _, _, body = h.get(self.admin, "/metrics")
        return body.decode()

    def wait_ready(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _, _ = h.get(self.admin, "/readyz")
            if status == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"agent never became ready: {self.admin_json('/status')}\n{self.logs()}")

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
        if not self.log.closed:
            self.log.close()


def _addr(text):
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


class Stack:
    """A running agent with its relays, stand-in and PKI."""

    def __init__(self, directory, agent, relays, standin, pki, tokens):
        self.directory = directory
        self.agent = agent
        self.relays = relays
        self.standin = standin
        self.pki = pki
        self.tokens = tokens
        self.audit_path = os.path.join(directory, "audit.jsonl")

    def env(self, token=None, **extra):
        """The caller's whole configuration: environment variables only."""
        token = self.tokens["lambda"] if token is None else token
        return caller_env(self.agent.endpoint, self.pki["ca"], token, **extra)

    def audit(self, count, timeout=5.0):
        return h.read_audit(self.audit_path, count, timeout)


def caller_env(endpoint, ca_file, token, **extra):
    home = os.environ.get("XPART_CALLER_HOME", "/nonexistent")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": home,
        "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": endpoint,
        "AWS_CA_BUNDLE": ca_file,
        "AWS_DEFAULT_REGION": h.REGION,
        "AWS_CONFIG_FILE": "/nonexistent/config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
    }
    if token:
        env["AWS_BEARER_TOKEN_BEDROCK"] = token
    env.update(extra)
    return env


BOTO3_CALLER = r"""
import json, sys, time, boto3, botocore.exceptions
call = json.loads(sys.argv[1])
client = boto3.client("bedrock-runtime")
out = {}
try:
    op = call["op"]
    started = time.monotonic()
    if op == "converse":
        r = client.converse(modelId=call["model"], messages=[{"role": "user", "content": [{"text": call["text"]}]}])
        out = {"text": r["output"]["message"]["content"][0]["text"], "request_id": r["ResponseMetadata"]["RequestId"],
               "headers": r["ResponseMetadata"]["HTTPHeaders"]}
    elif op == "converse_stream":
        r = client.converse_stream(modelId=call["model"], messages=[{"role": "user", "content": [{"text": call["text"]}]}])
        events = []
        for event in r["stream"]:
            events.append({"kind": next(iter(event)), "event": event, "at": time.monotonic() - started})
        out = {"events": events, "headers": r["ResponseMetadata"]["HTTPHeaders"]}
    elif op == "invoke_model":
        r = client.invoke_model(modelId=call["model"], body=json.dumps(call["body"]),
                                contentType="application/json", accept="application/json")
        out = {"body": json.loads(r["body"].read())}
    elif op == "invoke_model_stream":
        r = client.invoke_model_with_response_stream(modelId=call["model"], body=json.dumps(call["body"]),
                                                     contentType="application/json", accept="application/json")
        chunks = []
        for event in r["body"]:
            chunks.append({"chunk": json.loads(event["chunk"]["bytes"]), "at": time.monotonic() - started})
        out = {"chunks": chunks}
    elif op == "count_tokens":
        r = client.count_tokens(modelId=call["model"], input={"converse": {"messages": [{"role": "user", "content": [{"text": call["text"]}]}]}})
        out = {"inputTokens": r["inputTokens"]}
    else:
        raise SystemExit("unknown op " + op)
except botocore.exceptions.EventStreamError as e:  # a ClientError subclass: test it first
    out = {"stream_error": e.response["Error"]["Code"], "message": e.response["Error"].get("Message", "")}
except botocore.exceptions.ClientError as e:
    out = {"error": e.response["Error"]["Code"], "message": e.response["Error"].get("Message", ""),
           "status": e.response["ResponseMetadata"].get("HTTPStatusCode"),
           "request_id": e.response["ResponseMetadata"].get("RequestId")}
print(json.dumps(out, default=str))
"""


def boto3_call(env, timeout=60, **call):
    """Runs one bedrock-runtime call in a fresh Python process configured only by `env`."""
    proc = subprocess.run(
        [sys.executable, "-c", BOTO3_CALLER, json.dumps(call)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"boto3 caller failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def aws_cli(env, *args, timeout=60):
    """`aws bedrock-runtime …` configured only by `env`; returns (exit code, stdout, stderr)."""
    proc = subprocess.run(
        ["aws", "bedrock-runtime", *args, "--output", "json"],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


def new_token():
    return "xpart-" + secrets.token_urlsafe(24)


def host_mode_config(directory, test_pki, upstream):
    """An agent that only needs its DNS and front: host mode, a relay nobody listens for."""
    text = f"""
[tunnel]
mode = "host"

[[relay]]
name = "relay-a"
tunnel_address = "127.0.0.1"
service_port = 9

[dns]
listen = "127.0.0.1:0"
answer = "127.0.0.1"
answer_v6 = "::1"
names = ["{h.UPSTREAM_NAME}", "bedrock-runtime-fips.us-east-1.amazonaws.com"]
upstream = {upstream}
ttl = 30

[front]
listen = "127.0.0.1:0"
cert_file = "{test_pki['cert']}"
key_file = "{test_pki['key']}"

{principal("lambda", token="t")}

[admin]
listen = "127.0.0.1:0"
"""
    path = os.path.join(directory, "agent.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


# --- the fixture ------------------------------------------------------------------------------

DEFAULT_MODELS = ("anthropic.*", "us.anthropic.*", "standin.*")


@pytest.fixture
def start_stack(relay_bin, tmp_path, test_pki, upstream_dns, standin):
    """start_stack(relays=1, principals=None, health=None, tokens=None) → Stack.

    `principals` is agent.toml text; by default one principal "lambda" with a fresh token
    (Stack.tokens["lambda"]) allowed the stand-in's and Claude models."""
    if not os.access(agent_binary(), os.X_OK):
        pytest.skip(f"xpart-agent is not built at {agent_binary()} (cargo build -p xpart-agent, or set XPART_BIN_DIR)")
    started = []

    def start(relays=1, principals=None, health=None, tokens=None, relay_options=None, front_pki=None,
              dns_names=(h.UPSTREAM_NAME,)):
        # front_pki: the agent front's certificate (make_test_pki's dict) when callers dial
        # names test_pki does not hold; Stack.pki is then that one, for the callers' trust.
        front_pki = front_pki or test_pki
        directory = tmp_path / f"stack{len(started)}"
        directory.mkdir()
        agent_private, agent_public = wg_keypair()
        agent_key = write_key(str(directory / "agent.key"), agent_private)
        running = []
        for i in range(relays):
            relay_dir = directory / f"relay-{'abc'[i]}"
            relay_dir.mkdir()
            private, public = wg_keypair()
            config = relay_userspace_config(
                str(relay_dir), standin.port, upstream_dns.address[1], test_pki["ca"],
                private_key_file=write_key(str(relay_dir / "relay.key"), private),
                tunnel_address=RELAY_TUNNELS[i], agent_public_key=agent_public,
                **(relay_options or {}),
            )
            process = RelayProcess(config, h.relay_env(str(relay_dir), static_key=h.RELAY_KEY),
                                   str(relay_dir / "relay.log"))
            relay = Relay(f"relay-{'abc'[i]}", str(relay_dir), process, RELAY_TUNNELS[i], public)
            running.append(relay)
            started.append(relay)
        tokens = dict(tokens or {"lambda": new_token()})
        if principals is None:
            principals = principal("lambda", token=tokens["lambda"], models=DEFAULT_MODELS)
        config = agent_config(
            str(directory), relays=running, private_key_file=agent_key,
            cert=front_pki["cert"], key=front_pki["key"], principals=principals, health=health,
            dns_names=dns_names,
        )
        agent = AgentProcess(config, str(directory / "agent.log"))
        started.append(agent)
        agent.wait_ready()
        return Stack(str(directory), agent, running, standin, front_pki, tokens)

    yield start
    for process in reversed(started):
        process.stop()
