"""The xpart side of the whole-topology test: keys, the CA and the front certificate, the caller's
token, the agents' and relays' configuration files (kernel-mode WireGuard), and starting the real
`xpart-agent` / `xpart-relay` binaries in their namespaces.

Each relay signs with its own static test key, which the Bedrock stand-in knows, so the stand-in's
records show which relay carried each request.
"""

import json
import os
import sys
from pathlib import Path

import topology_network as net

REPO = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
BEDROCK_NAME = f"bedrock-runtime.{REGION}.amazonaws.com"
PRINCIPAL = "topology-lambda"
RELAY_KEYS = {
    "relay-a": ("AKIATOPOLOGYRELAYA01", "topology-relay-a-secret"),
    "relay-b": ("AKIATOPOLOGYRELAYB02", "topology-relay-b-secret"),
    "relay-c": ("AKIATOPOLOGYRELAYC03", "topology-relay-c-secret"),
}
AGENT_ADMIN = ("127.0.0.1", 9100)
RELAY_ADMIN = ("127.0.0.1", 9101)
SERVICE_PORT = 8080
BINARIES = ("xpart", "xpart-agent", "xpart-relay")


def bin_dir():
    return Path(os.environ.get("XPART_BIN_DIR", REPO / "target" / "debug"))


def missing_binary():
    for name in BINARIES:
        if not os.access(bin_dir() / name, os.X_OK):
            return (f"needs {bin_dir() / name} (cargo build --workspace --bins, or set XPART_BIN_DIR)")
    return None


def xpart(*args):
    return net.run(str(bin_dir() / "xpart"), *args).stdout


def caller_env(secrets):
    """What a Lambda function is given: a CA bundle, a bearer token, a region. No endpoint."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(secrets.dir),
        "AWS_REGION": REGION,
        "AWS_CA_BUNDLE": str(secrets.caller_ca),
        "AWS_BEARER_TOKEN_BEDROCK": secrets.token,
        "AWS_CONFIG_FILE": "/nonexistent/config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class Secrets:
    """Everything generated for one run, under `directory`."""

    def __init__(self, directory, topo=None):
        self.dir = Path(directory)
        self.public_keys = {}
        members = (*topo.agents, *topo.relays) if topo else ("agent-a", "agent-b", "relay-a", "relay-b")
        for name in members:
            self.public_keys[name] = xpart("keygen", "--out", str(self.dir / f"{name}.key")).strip()
        xpart("ca", "init", "--dir", str(self.dir / "ca"), "--name", "xpart topology test CA")
        xpart("ca", "issue", "--ca-dir", str(self.dir / "ca"), "--region", REGION,
              "--ip", net.FLOATING, "--out", str(self.dir / "front"))
        self.caller_ca = self.dir / "ca" / "ca.pem"
        token = json.loads(xpart("--json", "token", "new", "--principal", PRINCIPAL,
                                 "--model", "anthropic.*"))
        self.token, self.token_sha256 = token["token"], token["token_sha256"]
        sys.path.insert(0, str(REPO / "tests" / "standin"))
        import certs  # the stand-in's own PKI, separate from the agent's

        self.upstream = certs.make_test_pki(str(self.dir / "upstream-pki"), [BEDROCK_NAME],
                                            ip_addresses=(net.VPC_HOST,))
        self.standin_credentials = self.dir / "standin-credentials.json"
        self.standin_credentials.write_text(json.dumps(dict(RELAY_KEYS.values())))


def agent_config(secrets, agent, topo=None):
    """pair: DNS and front on the floating address; zones (`topo.zones`): on the agent's own
    address, answering the balancer's addresses, admin reachable by the balancer's checks."""
    path = secrets.dir / f"{agent}.toml"
    relay_names = topo.relays if topo else ("relay-a", "relay-b")
    zones = topo is not None and topo.zones
    service = net.AGENT_LAN[agent] if zones else net.FLOATING
    answer = json.dumps(list(net.BALANCER)) if zones else f'"{net.FLOATING}"'
    admin = f"0.0.0.0:{AGENT_ADMIN[1]}" if zones else f"{AGENT_ADMIN[0]}:{AGENT_ADMIN[1]}"
    relays = "".join(f"""
[[relay]]
name = "{relay}"
public_key = "{secrets.public_keys[relay]}"
endpoint = "{net.RELAY_WAN[relay][1]}:{net.WG_PORT}"
tunnel_address = "{net.RELAY_TUNNEL[relay]}"
service_port = {SERVICE_PORT}
""" for relay in relay_names)
    path.write_text(f"""
[tunnel]
mode = "kernel"
private_key_file = "{secrets.dir / (agent + '.key')}"
address = "{net.AGENT_TUNNEL[agent]}/{net.TUNNEL_PREFIX}"
interface_name = "xpart0"
{relays}
[dns]
listen = "{service}:53"
answer = {answer}
names = ["{BEDROCK_NAME}"]
upstream = []

[front]
listen = "{service}:443"
cert_file = "{secrets.dir / 'front.pem'}"
key_file = "{secrets.dir / 'front.key'}"

[[principal]]
name = "{PRINCIPAL}"
token_sha256 = "{secrets.token_sha256}"
source_cidrs = ["{net.LAN}"]
models = ["anthropic.*"]

[admin]
listen = "{admin}"

[audit]
path = "{secrets.dir / (agent + '-audit.jsonl')}"
""")
    return path


def relay_config(secrets, relay, dns, agents=("agent-a", "agent-b")):
    path = secrets.dir / f"{relay}.toml"
    agents = "".join(f"""
[[agent]]
name = "{agent}"
public_key = "{secrets.public_keys[agent]}"
tunnel_address = "{net.AGENT_TUNNEL[agent]}"
""" for agent in agents)
    path.write_text(f"""
[tunnel]
mode = "kernel"
private_key_file = "{secrets.dir / (relay + '.key')}"
address = "{net.RELAY_TUNNEL[relay]}/{net.TUNNEL_PREFIX}"
listen_port = {net.WG_PORT}
interface_name = "xpart0"
{agents}
[service]
listen = "{net.RELAY_TUNNEL[relay]}:{SERVICE_PORT}"

[upstream]
region = "{REGION}"
endpoint = "https://{BEDROCK_NAME}"
resolver = ["{dns}"]
extra_ca_file = "{secrets.upstream['ca']}"
connect_timeout_secs = 2
first_byte_timeout_secs = 10
idle_timeout_secs = 10

[policy]
operations = ["Converse", "ConverseStream"]
models = ["anthropic.*"]

[admin]
listen = "{RELAY_ADMIN[0]}:{RELAY_ADMIN[1]}"

[audit]
path = "{secrets.dir / (relay + '-audit.jsonl')}"
""")
    return path


def daemon_env(home, static_key=None):
    """A clean environment: no AWS profile, no IMDS, only the credentials the test chooses."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(home),
        "RUST_LOG": "info",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(Path(home) / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(Path(home) / "no-aws-credentials"),
    }
    if static_key:
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = static_key
    return env


def start_vpc(topo, secrets):
    """The stand-in and its DNS in the vpc namespace; returns (process, dns "ip:port")."""
    proc = topo.spawn("vpc", [sys.executable, str(Path(__file__).with_name("topology_vpc.py")),
                              "--address", net.VPC_HOST, "--cert", secrets.upstream["cert"],
                              "--key", secrets.upstream["key"], "--name", BEDROCK_NAME,
                              "--credentials", str(secrets.standin_credentials)],
                      name="vpc", stdin=True)
    info = json.loads(net.read_line(proc, 20, "the Bedrock stand-in starting"))
    return proc, info["dns"]


def standin_records(vpc):
    vpc.stdin.write("records\n")
    vpc.stdin.flush()
    return json.loads(net.read_line(vpc, 10, "the stand-in's records"))["records"]


def start_relay(topo, secrets, relay, dns):
    config = relay_config(secrets, relay, dns, topo.agents)
    proc = topo.spawn(relay, [str(bin_dir() / "xpart-relay"), "--config", str(config)], name=relay,
                      env=daemon_env(secrets.dir, RELAY_KEYS[relay]))
    _expect_listening(proc, relay)
    return proc


def start_agent(topo, secrets, agent):
    config = agent_config(secrets, agent, topo)
    proc = topo.spawn(agent, [str(bin_dir() / "xpart-agent"), "--config", str(config)], name=agent,
                      env=daemon_env(secrets.dir))
    _expect_listening(proc, agent)
    return proc


def _expect_listening(proc, name):
    line = net.read_line(proc, 30, f"{name} starting")
    event = json.loads(line)
    if event.get("event") != "listening":
        raise AssertionError(f"{name} printed {line!r} instead of its listening line")


def start_balancer(topo):
    """The NLB's stand-in (topology_balancer.py) in the lb namespace, in front of every agent."""
    targets = [f"--target={net.AGENT_LAN[a]}:443:{AGENT_ADMIN[1]}" for a in topo.agents]
    proc = topo.spawn("lb", [sys.executable, str(Path(__file__).with_name("topology_balancer.py")),
                             *(f"--listen={address}" for address in net.BALANCER), *targets],
                      name="lb", stdin=True)
    _expect_listening(proc, "lb")
    return proc


def balancer_status(lb):
    lb.stdin.write("status\n")
    lb.stdin.flush()
    return json.loads(net.read_line(lb, 10, "the balancer's status"))["targets"]


def agent_status(topo, agent):
    status, body = topo.http_json(agent, *AGENT_ADMIN, "/status")
    return body if status == 200 else None


def relay_states(topo, agent):
    """{relay name: state} as `agent` sees it."""
    status = agent_status(topo, agent)
    return {relay["name"]: relay["state"] for relay in (status or {}).get("relays", [])}


def relay_ready(topo, relay):
    status, _ = topo.http(relay, *RELAY_ADMIN, "/readyz")
    return status == 200


def audit_lines(secrets, name):
    path = secrets.dir / f"{name}-audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
