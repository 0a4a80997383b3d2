"""First boot of an appliance, end to end without AWS: the user data from the CloudFormation
stack, rendered with a deployment's values, feeds images/cloud-init/xpart-boot, which reads the
instance's tag from an IMDSv2 stand-in on 127.0.0.1, fetches secrets through a stand-in `aws`
command, writes the keys and the daemon's configuration, and starts the units (a stand-in
`systemctl` records what it was asked). When the daemons are built, their own `--check`
accepts the configuration the script wrote.
"""

import base64
import datetime
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import NameOID

decode = pytest.importorskip("cfnlint.decode", reason="cfn-lint not installed (pip install -r tests/requirements.txt)").decode

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
BOOT = IMAGES / "cloud-init" / "xpart-boot"
BIN_DIR = Path(os.environ.get("XPART_BIN_DIR", REPO / "target" / "debug"))

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed (apt-get install curl)")


def wireguard_keypair():
    private = x25519.X25519PrivateKey.generate()
    raw_private = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw_public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw_private).decode(), base64.b64encode(raw_public).decode()


def front_certificate(name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


KEYS = {name: wireguard_keypair() for name in ["agent-a", "agent-b", "relay-a", "relay-b"]}
CERT_PEM, CERT_KEY_PEM = front_certificate("bedrock-runtime.us-east-1.amazonaws.com")
PRINCIPALS = """[[principal]]
name = "summarizer-lambda"
token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
source_cidrs = ["10.0.16.0/20"]
models = ["anthropic.claude-*"]
requests_per_second = 50
max_concurrent = 20"""

# What an operator passes to the stacks (documentation addresses only; nothing is contacted).
STACK_VALUES = {
    "AWS::Region": None,
    "ParameterPrefix": "xpart/prod",
    "SecretStore": "ssm",
    "AgentAPublicKey": KEYS["agent-a"][1],
    "AgentBPublicKey": KEYS["agent-b"][1],
    "RelayAPublicKey": KEYS["relay-a"][1],
    "RelayBPublicKey": KEYS["relay-b"][1],
    "RelayAPublicIp": "198.51.100.10",
    "RelayBPublicIp": "198.51.100.11",
    "FloatingAddress": "10.0.1.10",
    "AgentAPrivateAddress": "10.0.1.11",
    "AgentBPrivateAddress": "10.0.1.12",
}


def render_user_data(stack_file, region, overrides=()):
    """The launch template's user data with Fn::Sub applied as CloudFormation would."""
    template, problems = decode(str(stack_file))
    assert not problems
    (lt,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::EC2::LaunchTemplate"]
    text = lt["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]
    values = {name: str(p["Default"]) for name, p in template["Parameters"].items() if "Default" in p}
    values.update({k: v for k, v in STACK_VALUES.items() if v is not None})
    values["AWS::Region"] = region
    values.update(dict(overrides))

    def substitute(match):
        name = match.group(1)
        assert name in values, f"no value for placeholder {name}"
        return values[name]

    return re.sub(r"\$\{([^}!]+)\}", substitute, text)


def deployment_env(user_data):
    assert user_data.startswith("#cloud-config\n")
    document = yaml.safe_load(user_data)
    (entry,) = document["write_files"]
    assert entry["path"] == "/etc/xpart/deployment.env"
    assert document["runcmd"] == [["/usr/local/libexec/xpart/xpart-boot"]]
    return entry["content"]


class FakeImds:
    """IMDSv2 on 127.0.0.1: a PUT for a token, then GETs that must present it. `tags` are the
    instance tags; `local_ipv4` the primary private address."""

    def __init__(self, tags, local_ipv4="10.0.1.21"):
        self.metadata = {f"tags/instance/{k}": v for k, v in tags.items()}
        self.metadata["local-ipv4"] = local_ipv4
        self.token = "test-token-0123456789"
        self.unauthenticated_gets = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self._reply(200, outer.token)
                else:
                    self._reply(400, "")

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != outer.token:
                    outer.unauthenticated_gets += 1
                    self._reply(401, "")
                    return
                prefix = "/latest/meta-data/"
                key = self.path[len(prefix):] if self.path.startswith(prefix) else None
                if key in outer.metadata:
                    self._reply(200, outer.metadata[key])
                else:
                    self._reply(404, "")

            def _reply(self, status, body):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class Appliance:
    """A scratch /etc/xpart plus stand-ins for `aws` and `systemctl` on PATH."""

    def __init__(self, root, secrets):
        self.conf = root / "etc-xpart"
        self.conf.mkdir()
        self.bin = root / "bin"
        self.bin.mkdir()
        self.calls = root / "calls.jsonl"
        (root / "secrets.json").write_text(json.dumps(secrets))
        aws = self.bin / "aws"
        aws.write_text(
            f"""#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
with open({str(self.calls)!r}, "a") as log:
    log.write(json.dumps(["aws"] + args) + "\\n")
secrets = json.load(open({str(root / "secrets.json")!r}))
name = args[args.index("--name") + 1] if "--name" in args else args[args.index("--secret-id") + 1]
if name not in secrets:
    print(f"An error occurred (ParameterNotFound): {{name}}", file=sys.stderr)
    sys.exit(254)
print(secrets[name])
"""
        )
        systemctl = self.bin / "systemctl"
        systemctl.write_text(
            f"""#!/usr/bin/env python3
import json, sys
with open({str(self.calls)!r}, "a") as log:
    log.write(json.dumps(["systemctl"] + sys.argv[1:]) + "\\n")
"""
        )
        for tool in (aws, systemctl):
            tool.chmod(0o755)

    def boot(self, user_data, imds, extra_env=()):
        (self.conf / "deployment.env").write_text(deployment_env(user_data))
        env = dict(
            os.environ,
            PATH=f"{self.bin}:{os.environ['PATH']}",
            XPART_CONF_DIR=str(self.conf),
            XPART_IMDS_ENDPOINT=imds.endpoint,
            XPART_USER=subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip(),
            XPART_RETRY_SECONDS="0",
        )
        env.update(dict(extra_env))
        return subprocess.run([str(BOOT)], capture_output=True, text=True, timeout=60, env=env)

    def recorded(self, tool):
        if not self.calls.exists():
            return []
        return [c[1:] for c in map(json.loads, self.calls.read_text().splitlines()) if c[0] == tool]

    def mode(self, name):
        return (self.conf / name).stat().st_mode & 0o777


def ssm(name):
    return f"/xpart/prod/{name}"


AGENT_SECRETS = {
    ssm("agent-a/wireguard-private-key"): KEYS["agent-a"][0],
    ssm("agent-b/wireguard-private-key"): KEYS["agent-b"][0],
    ssm("agent/tls-private-key"): CERT_KEY_PEM.strip(),
    ssm("agent/tls-certificate"): CERT_PEM.strip(),
    ssm("agent/principals"): PRINCIPALS,
}
RELAY_SECRETS = {
    ssm("relay-a/wireguard-private-key"): KEYS["relay-a"][0],
    ssm("relay-b/wireguard-private-key"): KEYS["relay-b"][0],
}


def agent_user_data(**overrides):
    return render_user_data(IMAGES / "cloudformation" / "govcloud.yaml", "us-gov-west-1", overrides.items())


def relay_user_data(**overrides):
    return render_user_data(IMAGES / "cloudformation" / "commercial.yaml", "us-east-1", overrides.items())


def test_agent_first_boot_writes_keys_and_config_and_starts_the_agent(tmp_path):
    appliance = Appliance(tmp_path, AGENT_SECRETS)
    with FakeImds({"xpart:name": "agent-b", "xpart:role": "standby"}, local_ipv4="10.0.1.12") as imds:
        result = appliance.boot(agent_user_data(), imds)
    assert result.returncode == 0, result.stderr
    assert imds.unauthenticated_gets == 0, "every metadata read carries the IMDSv2 token"

    assert (appliance.conf / "agent.key").read_text().strip() == KEYS["agent-b"][0]
    assert appliance.mode("agent.key") == 0o600
    assert (appliance.conf / "front.key").read_text().strip() == CERT_KEY_PEM.strip()
    assert appliance.mode("front.key") == 0o600
    assert appliance.mode("agent.toml") == 0o640
    assert (appliance.conf / "floating-address").read_text() == "XPART_FLOATING_ADDRESS=10.0.1.10\n"

    config = tomllib.loads((appliance.conf / "agent.toml").read_text())
    assert config["tunnel"] == {
        "private_key_file": str(appliance.conf / "agent.key"),
        "address": "100.64.0.2/24",
        "mode": "kernel",
    }
    assert config["relay"] == [
        {"name": "relay-a", "public_key": KEYS["relay-a"][1], "endpoint": "198.51.100.10:51820",
         "tunnel_address": "100.64.0.11", "service_port": 8080},
        {"name": "relay-b", "public_key": KEYS["relay-b"][1], "endpoint": "198.51.100.11:51820",
         "tunnel_address": "100.64.0.12", "service_port": 8080},
    ]
    assert config["dns"] == {
        "listen": "10.0.1.10:53",
        "answer": "10.0.1.10",
        "names": ["bedrock-runtime.us-east-1.amazonaws.com"],
        "upstream": ["169.254.169.253:53"],
    }
    assert config["front"]["listen"] == "10.0.1.10:443"
    assert config["admin"]["listen"] == "10.0.1.12:9100", "reachable by the other agent's watch"
    assert config["principal"][0]["name"] == "summarizer-lambda"
    assert config["audit"]["path"] == "/var/log/xpart/audit.jsonl"

    fetched = appliance.recorded("aws")
    assert all(c[:2] == ["ssm", "get-parameter"] and "--with-decryption" in c for c in fetched)
    names = sorted(c[c.index("--name") + 1] for c in fetched)
    assert names == sorted(k for k in AGENT_SECRETS if "agent-a" not in k), "agent-b reads its own key only"
    started = [c[1] for c in appliance.recorded("systemctl") if c[0] == "restart"]
    assert started == ["xpart-floating-address.service", "xpart-agent.service", "xpart-failover-watch.service"]

    # agent-b is the standby: it watches agent-a and would move the floating address here.
    assert (appliance.conf / "failover-watch.env").read_text().splitlines() == [
        "AWS_REGION=us-gov-west-1",
        "XPART_ACTIVE_READYZ=http://10.0.1.11:9100/readyz",
        "XPART_PAIR=xpart",
        "XPART_FLOATING_ADDRESS=10.0.1.10",
    ]

    for secret in (KEYS["agent-b"][0], CERT_KEY_PEM.splitlines()[1]):
        assert secret not in result.stdout + result.stderr, "secrets must not reach the cloud-init log"


def test_the_active_agent_runs_no_failover_watch(tmp_path):
    appliance = Appliance(tmp_path, AGENT_SECRETS)
    (appliance.conf / "failover-watch.env").write_text("left over from when it was the standby\n")
    with FakeImds({"xpart:name": "agent-a", "xpart:role": "active"}, local_ipv4="10.0.1.11") as imds:
        result = appliance.boot(agent_user_data(), imds)
    assert result.returncode == 0, result.stderr
    assert tomllib.loads((appliance.conf / "agent.toml").read_text())["tunnel"]["address"] == "100.64.0.1/24"
    assert not (appliance.conf / "failover-watch.env").exists()
    calls = appliance.recorded("systemctl")
    assert ["stop", "xpart-failover-watch.service"] in calls
    assert ["restart", "xpart-failover-watch.service"] not in calls


def test_relay_first_boot_writes_policy_rewrites_and_agents(tmp_path):
    appliance = Appliance(tmp_path, RELAY_SECRETS)
    with FakeImds({"xpart:name": "relay-a"}) as imds:
        result = appliance.boot(relay_user_data(), imds)
    assert result.returncode == 0, result.stderr

    assert (appliance.conf / "relay.key").read_text().strip() == KEYS["relay-a"][0]
    assert appliance.mode("relay.key") == 0o600
    config = tomllib.loads((appliance.conf / "relay.toml").read_text())
    assert config["tunnel"]["address"] == "100.64.0.11/24"
    assert config["tunnel"]["listen_port"] == 51820
    assert config["service"] == {"listen": "100.64.0.11:8080"}
    assert [(a["name"], a["tunnel_address"], a["public_key"]) for a in config["agent"]] == [
        ("agent-a", "100.64.0.1", KEYS["agent-a"][1]),
        ("agent-b", "100.64.0.2", KEYS["agent-b"][1]),
    ]
    assert config["upstream"]["region"] == "us-east-1"
    assert config["upstream"]["endpoint"] == "https://bedrock-runtime.us-east-1.amazonaws.com"
    assert config["policy"]["operations"] == ["InvokeModel", "InvokeModelWithResponseStream", "Converse", "ConverseStream"]
    assert config["policy"]["models"] == ["xpart.echo", "anthropic.claude-*", "us.anthropic.claude-*"]
    assert config["rewrite"]["rule"] == [{"from": "us-gov.", "to": "us."}]
    assert appliance.recorded("systemctl")[-1] == ["restart", "xpart-relay.service"]
    assert KEYS["relay-a"][0] not in result.stdout + result.stderr


def test_secrets_manager_store_reads_secret_ids_without_the_leading_slash(tmp_path):
    secrets = {name.lstrip("/"): value for name, value in RELAY_SECRETS.items()}
    appliance = Appliance(tmp_path, secrets)
    with FakeImds({"xpart:name": "relay-b"}) as imds:
        result = appliance.boot(relay_user_data(SecretStore="secretsmanager"), imds)
    assert result.returncode == 0, result.stderr
    assert appliance.recorded("aws") == [
        ["secretsmanager", "get-secret-value", "--secret-id", "xpart/prod/relay-b/wireguard-private-key",
         "--query", "SecretString", "--output", "text"]
    ]
    assert (appliance.conf / "relay.key").read_text().strip() == KEYS["relay-b"][0]


def test_a_parameter_that_is_not_a_wireguard_key_stops_boot_before_anything_starts(tmp_path):
    secrets = dict(RELAY_SECRETS)
    secrets[ssm("relay-a/wireguard-private-key")] = "-----BEGIN PRIVATE KEY-----"
    appliance = Appliance(tmp_path, secrets)
    with FakeImds({"xpart:name": "relay-a"}) as imds:
        result = appliance.boot(relay_user_data(), imds)
    assert result.returncode != 0
    assert "/xpart/prod/relay-a/wireguard-private-key does not hold a WireGuard private key" in result.stderr
    assert not (appliance.conf / "relay.key").exists()
    assert not (appliance.conf / "relay.toml").exists()
    assert appliance.recorded("systemctl") == []


def test_a_missing_parameter_is_named_and_nothing_is_half_written(tmp_path):
    secrets = {k: v for k, v in AGENT_SECRETS.items() if not k.endswith("principals")}
    appliance = Appliance(tmp_path, secrets)
    with FakeImds({"xpart:name": "agent-a"}) as imds:
        result = appliance.boot(agent_user_data(), imds)
    assert result.returncode != 0
    assert "cannot read SSM parameter /xpart/prod/agent/principals" in result.stderr
    assert not (appliance.conf / "agent.toml").exists()
    assert [p.name for p in appliance.conf.iterdir() if p.name.startswith(".")] == [], "no temporary file left"
    assert appliance.recorded("systemctl") == []


def test_an_instance_without_its_name_tag_says_how_to_fix_it(tmp_path):
    appliance = Appliance(tmp_path, AGENT_SECRETS)
    with FakeImds({}) as imds:
        result = appliance.boot(agent_user_data(), imds)
    assert result.returncode != 0
    assert "InstanceMetadataTags" in result.stderr and "xpart:name" in result.stderr
    assert appliance.recorded("aws") == [] and appliance.recorded("systemctl") == []


def test_a_name_tag_outside_the_pair_is_refused(tmp_path):
    appliance = Appliance(tmp_path, AGENT_SECRETS)
    with FakeImds({"xpart:name": "agent-c"}) as imds:
        result = appliance.boot(agent_user_data(), imds)
    assert result.returncode != 0
    assert 'no XPART_PAIR_n entry in deployment.env is named "agent-c"' in result.stderr


@pytest.mark.parametrize(
    "role, name, user_data, secrets",
    [
        ("agent", "agent-a", agent_user_data, AGENT_SECRETS),
        ("relay", "relay-b", relay_user_data, RELAY_SECRETS),
    ],
    ids=["agent", "relay"],
)
def test_the_daemon_accepts_the_configuration_first_boot_writes(tmp_path, role, name, user_data, secrets):
    daemon = BIN_DIR / f"xpart-{role}"
    if not daemon.is_file():
        pytest.skip(f"{daemon} not built (cargo build --bins; XPART_BIN_DIR points elsewhere)")
    appliance = Appliance(tmp_path, secrets)
    with FakeImds({"xpart:name": name}) as imds:
        result = appliance.boot(user_data(), imds)
    assert result.returncode == 0, result.stderr
    check = subprocess.run(
        [str(daemon), "--config", str(appliance.conf / f"{role}.toml"), "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
