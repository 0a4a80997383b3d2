"""First boot of an appliance, end to end without AWS: the user data from the CloudFormation
stack, rendered with a deployment's values, feeds images/cloud-init/xpart-boot, which reads the
instance's tag from an IMDSv2 stand-in on 127.0.0.1, fetches secrets and takes the member's
network interface or Elastic IP through a stand-in `aws` command (which answers `--query` with
the real JMESPath, as the AWS CLI does), has a stand-in daemon `--check` the staged
configuration, installs it and starts the units (a stand-in `systemctl` records what it was
asked). When the daemons are built, their own `--check` accepts the configuration the script
wrote.

The tests run with the stacks' FipsMode false (what first boot wrote before FipsMode) unless
they say FipsMode="true": the FIPS tests at the end, whose stand-in daemon says it is a FIPS
build, and whose real-daemon check runs the FIPS build (tests/fips/build) when it is there.
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

pytest.importorskip("cfnlint.decode", reason="cfn-lint not installed (pip install -r tests/requirements.txt)")

from stack_model import evaluate_conditions, load, parameter_values, resolve  # noqa: E402 (needs cfn-lint)

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
BOOT = IMAGES / "cloud-init" / "xpart-boot"
BIN_DIR = Path(os.environ.get("XPART_BIN_DIR", REPO / "target" / "debug"))
# The FIPS build of the daemons, as tests/run exports it, or where tests/fips/build writes it.
FIPS_BIN_DIR = Path(os.environ.get("XPART_FIPS_BIN_DIR") or REPO / "target" / "fips" / "debug")

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


AGENT_NAMES = [f"agent-{m}" for m in "abcdef"]
KEYS = {name: wireguard_keypair() for name in [*AGENT_NAMES, "relay-a", "relay-b"]}
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
    "FipsMode": "false",
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
    "AWS::StackName": "xpart-stack",
    "AgentANetworkInterface": "eni-0aaaaaaaaaaaaaaa1",
    "AgentBNetworkInterface": "eni-0bbbbbbbbbbbbbbb2",
    "RelayAEipAllocationId": "eipalloc-0aaaaaaaaaaaaaaa1",
    "RelayBEipAllocationId": "eipalloc-0bbbbbbbbbbbbbbb2",
}
INSTANCE_ID = "i-0123456789abcdef0"


def render_user_data(stack_file, region, overrides=()):
    """The launch templates' user data with Fn::Sub applied as CloudFormation would: the
    placeholders from the parameters (the stack's defaults, STACK_VALUES, `overrides`) and the
    stand-in IDs of the stack's resources, its variables (the rows of the members that exist
    only with a larger AgentCount) from the conditions those values decide."""
    template = load(stack_file)
    user_data = [r["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]
                 for r in template["Resources"].values() if r["Type"] == "AWS::EC2::LaunchTemplate"]
    assert all(u == user_data[0] for u in user_data), "every member gets the same user data"
    defaults = parameter_values(template, {})
    values = dict(defaults)
    values.update({k: v for k, v in STACK_VALUES.items() if v is not None})
    values["AWS::Region"] = region
    # An override of None is the stack's own default.
    values.update({k: defaults[k] if v is None else v for k, v in overrides})
    return resolve(user_data[0], values, evaluate_conditions(template, values))


def deployment_env(user_data):
    assert user_data.startswith("#cloud-config\n")
    document = yaml.safe_load(user_data)
    (entry,) = document["write_files"]
    assert entry["path"] == "/etc/xpart/deployment.env"
    assert document["runcmd"] == [["systemctl", "start", "--no-block", "xpart-boot.service", "xpart-signal.service"]]
    return entry["content"]


class FakeImds:
    """IMDSv2 on 127.0.0.1: a PUT for a token, then GETs that must present it. `tags` are the
    instance tags; `local_ipv4` the primary private address."""

    def __init__(self, tags, local_ipv4="10.0.1.21"):
        self.metadata = {f"tags/instance/{k}": v for k, v in tags.items()}
        self.metadata["local-ipv4"] = local_ipv4
        self.metadata["instance-id"] = INSTANCE_ID
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
    """A scratch /etc/xpart plus stand-ins for `aws`, `systemctl` and the daemons on PATH.

    `interfaces` is the EC2 state of the agents' member interfaces: {eni: {"status",
    "attached_to", "role"}} (role None: no tag). `check_fails` makes the stand-in daemon's
    `--check` refuse the configuration; `fips_build` makes its `--version` say it is a FIPS
    build, as a daemon built with --features fips does."""

    def __init__(self, root, secrets, interfaces=None, check_fails=False, refused=(), fips_build=False):
        self.conf = root / "etc-xpart"
        self.conf.mkdir()
        self.bin = root / "bin"
        self.bin.mkdir()
        self.daemons = root / "daemons"
        self.daemons.mkdir()
        self.calls = root / "calls.jsonl"
        self.state = root / "ec2.json"
        (root / "secrets.json").write_text(json.dumps(secrets))
        if interfaces is None:
            interfaces = {
                STACK_VALUES["AgentANetworkInterface"]: {"status": "available", "attached_to": None, "role": "active"},
                STACK_VALUES["AgentBNetworkInterface"]: {"status": "available", "attached_to": None, "role": "standby"},
                # Agents c to f exist in multi-az only, where every agent is active.
                **{f"eni-0{m * 16}": {"status": "available", "attached_to": None, "role": "active"} for m in "cdef"},
            }
        self.state.write_text(json.dumps(interfaces))
        aws = self.bin / "aws"
        aws.write_text(
            f"""#!/usr/bin/env python3
import json, sys
import jmespath
args = sys.argv[1:]
with open({str(self.calls)!r}, "a") as log:
    log.write(json.dumps(["aws"] + args) + "\\n")
def opt(name):
    return args[args.index(name) + 1] if name in args else None
def text(value):
    if isinstance(value, list):
        return "\\t".join("None" if v is None else str(v) for v in value)
    return "None" if value is None else str(value)
service, operation = args[0], args[1]
if operation in {sorted(refused)!r}:
    print(f"An error occurred (ValidationError) when calling {{operation}}: refused", file=sys.stderr)
    sys.exit(254)
if service in ("ssm", "secretsmanager"):
    secrets = json.load(open({str(root / "secrets.json")!r}))
    name = opt("--name") or opt("--secret-id")
    if name not in secrets:
        print(f"An error occurred (ParameterNotFound): {{name}}", file=sys.stderr)
        sys.exit(254)
    print(secrets[name])
    sys.exit(0)
state = json.load(open({str(self.state)!r}))
if operation == "describe-network-interfaces":
    eni = opt("--network-interface-ids")
    if eni not in state:
        print(f"An error occurred (InvalidNetworkInterfaceID.NotFound): {{eni}}", file=sys.stderr)
        sys.exit(254)
    s = state[eni]
    interface = {{"NetworkInterfaceId": eni, "Status": s["status"], "TagSet": []}}
    if s["role"] is not None:
        interface["TagSet"].append({{"Key": "xpart:role", "Value": s["role"]}})
    if s["attached_to"]:
        interface["Attachment"] = {{"InstanceId": s["attached_to"], "Status": "attached"}}
    print(text(jmespath.search(opt("--query"), {{"NetworkInterfaces": [interface]}})))
elif operation == "attach-network-interface":
    eni = opt("--network-interface-id")
    if state[eni]["status"] != "available":
        print("An error occurred (InvalidParameterValue): in use", file=sys.stderr)
        sys.exit(254)
    state[eni].update(status="in-use", attached_to=opt("--instance-id"))
    json.dump(state, open({str(self.state)!r}, "w"))
    print("eni-attach-0123")
elif operation in ("create-tags", "associate-address", "signal-resource"):
    pass
else:
    print(f"stand-in aws: unexpected {{args}}", file=sys.stderr)
    sys.exit(2)
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
        for role in ("agent", "relay"):
            daemon = self.daemons / f"xpart-{role}"
            daemon.write_text(
                f"""#!/usr/bin/env python3
import json, sys, tomllib
with open({str(self.calls)!r}, "a") as log:
    log.write(json.dumps(["xpart-{role}"] + sys.argv[1:]) + "\\n")
if sys.argv[1:] == ["--version"]:
    print("xpart-{role} 0.1.0" + (" (fips)" if {fips_build!r} else ""))
    sys.exit(0)
config = tomllib.load(open(sys.argv[sys.argv.index("--config") + 1], "rb"))
open(config["tunnel"]["private_key_file"]).read()
if {check_fails!r}:
    print("error: {role}.toml: [tunnel].address: not valid (stand-in refusal)", file=sys.stderr)
    sys.exit(1)
"""
            )
            daemon.chmod(0o755)

    def boot(self, user_data, imds, extra_env=(), args=(), cwd=None):
        (self.conf / "deployment.env").write_text(deployment_env(user_data))
        env = dict(
            os.environ,
            PATH=f"{self.bin}:{os.environ['PATH']}",
            XPART_CONF_DIR=str(self.conf),
            XPART_IMDS_ENDPOINT=imds.endpoint,
            XPART_USER=subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip(),
            XPART_BIN_DIR=str(self.daemons),
            XPART_RETRY_SECONDS="0",
        )
        env.update(dict(extra_env))
        return subprocess.run([str(BOOT), *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd)

    def recorded(self, tool):
        if not self.calls.exists():
            return []
        return [c[1:] for c in map(json.loads, self.calls.read_text().splitlines()) if c[0] == tool]

    def aws_operations(self):
        return [c[1] for c in self.recorded("aws")]

    def interface(self, eni):
        return json.loads(self.state.read_text())[eni]

    def mode(self, name):
        return (self.conf / name).stat().st_mode & 0o777

    def installed(self):
        return sorted(p.name for p in self.conf.iterdir() if p.name != "deployment.env")


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


AGENT_A_ENI = STACK_VALUES["AgentANetworkInterface"]
AGENT_B_ENI = STACK_VALUES["AgentBNetworkInterface"]
DNS_NAMES = [
    "bedrock-runtime.us-east-1.amazonaws.com",
    "bedrock.us-east-1.amazonaws.com",
    "bedrock-runtime-fips.us-east-1.amazonaws.com",
    "bedrock-fips.us-east-1.amazonaws.com",
]


def agent_b_tunnel(conf, **inner_tls):
    """agent-b's [tunnel] as first boot writes it, with `inner_tls` fields in FIPS mode."""
    return {
        "private_key_file": str(conf / "agent.key"),
        "address": "100.64.0.2/24",
        # From the member interface, whose Elastic IP the relays admit.
        "listen": "10.0.1.12:51820",
        "mode": "kernel",
        **inner_tls,
    }


def test_agent_first_boot_writes_keys_and_config_and_starts_the_agent(tmp_path):
    appliance = Appliance(tmp_path, AGENT_SECRETS)
    with FakeImds({"xpart:name": "agent-b"}, local_ipv4="10.0.1.99") as imds:
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
    assert config["tunnel"] == agent_b_tunnel(appliance.conf)
    assert config["relay"] == [
        {"name": "relay-a", "public_key": KEYS["relay-a"][1], "endpoint": "198.51.100.10:51820",
         "tunnel_address": "100.64.0.11", "service_port": 8080},
        {"name": "relay-b", "public_key": KEYS["relay-b"][1], "endpoint": "198.51.100.11:51820",
         "tunnel_address": "100.64.0.12", "service_port": 8080},
    ]
    assert config["dns"] == {
        "listen": "10.0.1.10:53",
        "answer": "10.0.1.10",
        "names": DNS_NAMES,
        "upstream": ["169.254.169.253:53"],
    }
    assert config["front"]["listen"] == "10.0.1.10:443"
    assert config["front"]["cert_file"] == str(appliance.conf / "front.crt")
    assert config["admin"]["listen"] == "10.0.1.12:9100", "the member's fixed address, for the other agent's watch"
    assert config["principal"][0]["name"] == "summarizer-lambda"
    assert config["audit"]["path"] == "/var/log/xpart/audit.jsonl"

    fetched = [c for c in appliance.recorded("aws") if c[0] == "ssm"]
    assert all(c[:2] == ["ssm", "get-parameter"] and "--with-decryption" in c for c in fetched)
    names = sorted(c[c.index("--name") + 1] for c in fetched)
    assert names == sorted(k for k in AGENT_SECRETS if "agent-a" not in k), "agent-b reads its own key only"
    # The member interface is attached here as the second device; the role on it is copied to
    # the instance, where `xpart failover --pair` and the watch read it.
    assert ["ec2", "attach-network-interface", "--network-interface-id", AGENT_B_ENI,
            "--instance-id", INSTANCE_ID, "--device-index", "1"] in appliance.recorded("aws")
    assert appliance.interface(AGENT_B_ENI)["attached_to"] == INSTANCE_ID
    assert ["ec2", "create-tags", "--resources", INSTANCE_ID, "--tags", "Key=xpart:role,Value=standby"] in appliance.recorded("aws")
    started = [c[1] for c in appliance.recorded("systemctl") if c[0] == "restart"]
    assert started == ["xpart-floating-address.service", "xpart-agent.service", "xpart-failover-watch.service"]

    # The watch runs on both members and reads the role tag itself; it watches agent-a.
    assert (appliance.conf / "failover-watch.env").read_text().splitlines() == [
        "AWS_REGION=us-gov-west-1",
        "XPART_PEER_READYZ=http://10.0.1.11:9100/readyz",
        "XPART_PAIR=xpart",
        f"XPART_MEMBER_ENI={AGENT_B_ENI}",
        "XPART_FLOATING_ADDRESS=10.0.1.10",
    ]
    # First its build (FIPS or not, against the stack's FipsMode), then the staged file.
    version, checked = appliance.recorded("xpart-agent")
    assert version == ["--version"]
    assert checked[-1] == "--check"
    assert ".staging." in checked[1], "the daemon checks the staged file before it is installed"
    assert [p.name for p in appliance.conf.iterdir() if p.name.startswith(".")] == [], "staging removed"

    for secret in (KEYS["agent-b"][0], CERT_KEY_PEM.splitlines()[1]):
        assert secret not in result.stdout + result.stderr, "secrets must not reach the log"


def test_the_active_agent_watches_the_standby_only_once_tagged_standby(tmp_path):
    appliance = Appliance(tmp_path, AGENT_SECRETS)
    with FakeImds({"xpart:name": "agent-a"}) as imds:
        result = appliance.boot(agent_user_data(), imds)
    assert result.returncode == 0, result.stderr
    assert tomllib.loads((appliance.conf / "agent.toml").read_text())["tunnel"]["address"] == "100.64.0.1/24"
    assert "XPART_PEER_READYZ=http://10.0.1.12:9100/readyz" in (appliance.conf / "failover-watch.env").read_text()
    assert ["ec2", "create-tags", "--resources", INSTANCE_ID, "--tags", "Key=xpart:role,Value=active"] in appliance.recorded("aws")
    assert ["restart", "xpart-failover-watch.service"] in appliance.recorded("systemctl")


MULTI_AZ = {"DeploymentMode": "multi-az", "FloatingAddress": "", "AgentBPrivateAddress": "10.0.2.12",
            "NlbAddresses": "10.0.1.20,10.0.2.20"}


def multi_az_appliance(tmp_path):
    both_active = {eni: {"status": "available", "attached_to": None, "role": "active"}
                   for eni in (AGENT_A_ENI, AGENT_B_ENI)}
    return Appliance(tmp_path, AGENT_SECRETS, interfaces=both_active)


def test_a_multi_az_agent_serves_on_its_own_address_and_answers_every_balancer_address(tmp_path):
    appliance = multi_az_appliance(tmp_path)
    with FakeImds({"xpart:name": "agent-b"}) as imds:
        result = appliance.boot(agent_user_data(**MULTI_AZ), imds)
    assert result.returncode == 0, result.stderr
    config = tomllib.loads((appliance.conf / "agent.toml").read_text())
    # The balancer's targets and the Resolver rules name the member's own address.
    assert config["dns"]["listen"] == "10.0.2.12:53"
    assert config["dns"]["answer"] == ["10.0.1.20", "10.0.2.20"], "every zone's address in each answer"
    assert config["front"]["listen"] == "10.0.2.12:443"
    assert config["admin"]["listen"] == "10.0.2.12:9100", "the balancer's health check reads /readyz here"
    # No floating address and no failover watch: both agents serve.
    assert not (appliance.conf / "floating-address").exists()
    assert not (appliance.conf / "failover-watch.env").exists()
    assert ["ec2", "create-tags", "--resources", INSTANCE_ID, "--tags", "Key=xpart:role,Value=active"] in appliance.recorded("aws")


def agents_of(count):
    """The stack's values for AgentCount `count` in multi-az: agent k's private address in zone
    k mod 3, the balancer's address in each zone's first agent, its member interface's ID."""
    values = dict(MULTI_AZ, AgentCount=str(count))
    for k, member in enumerate("CDEF", start=2):
        if k >= count:
            break
        values[f"Agent{member}PrivateAddress"] = f"10.0.{k % 3 + 1}.{11 + k}"
        values[f"Agent{member}NetworkInterface"] = f"eni-0{member.lower() * 16}"
        if k < 3:
            values[f"Agent{member}NlbAddress"] = f"10.0.{k % 3 + 1}.20"
    return values


def member_interfaces(values):
    """The member interface IDs, agent-a's first, of the agents `values` (from agents_of) has."""
    every = dict(STACK_VALUES, **values)
    return [every[f"Agent{m}NetworkInterface"] for m in "ABCDEF" if f"Agent{m}NetworkInterface" in every]


@pytest.mark.parametrize("count", [3, 4, 6])
def test_every_agent_of_the_count_boots_on_its_own_address_with_every_balancer_address(tmp_path, count):
    values = agents_of(count)
    user_data = agent_user_data(**values)
    private = ["10.0.1.11", "10.0.2.12"] + [values[f"Agent{m}PrivateAddress"] for m in "CDEF"[:count - 2]]
    interfaces = member_interfaces(values)
    assert len(interfaces) == count
    secrets = dict(AGENT_SECRETS, **{ssm(f"{name}/wireguard-private-key"): KEYS[name][0] for name in AGENT_NAMES})
    for k, name in enumerate(AGENT_NAMES[:count]):
        root = tmp_path / name
        root.mkdir()
        appliance = Appliance(root, secrets, interfaces={
            eni: {"status": "available", "attached_to": None, "role": "active"} for eni in interfaces})
        with FakeImds({"xpart:name": name}) as imds:
            result = appliance.boot(user_data, imds)
        assert result.returncode == 0, result.stderr
        config = tomllib.loads((appliance.conf / "agent.toml").read_text())
        assert config["tunnel"]["address"] == f"100.64.0.{k + 1}/24"
        assert config["tunnel"]["listen"] == f"{private[k]}:51820", "from the member interface and its Elastic IP"
        assert (appliance.conf / "agent.key").read_text().strip() == KEYS[name][0]
        read = sorted(c[c.index("--name") + 1] for c in appliance.recorded("aws") if c[0] == "ssm")
        assert [r for r in read if "wireguard" in r] == [ssm(f"{name}/wireguard-private-key")], "its own key only"
        assert [r["name"] for r in config["relay"]] == ["relay-a", "relay-b"], "every agent peers with every relay"
        # The balancer's targets and the Resolver rules name the member's own address; DNS
        # answers one balancer address per zone (agents after the third share those zones).
        assert config["dns"]["listen"] == f"{private[k]}:53"
        assert config["dns"]["answer"] == ["10.0.1.20", "10.0.2.20", "10.0.3.20"]
        assert config["front"]["listen"] == f"{private[k]}:443"
        assert config["admin"]["listen"] == f"{private[k]}:9100"
        assert ["ec2", "attach-network-interface", "--network-interface-id", interfaces[k],
                "--instance-id", INSTANCE_ID, "--device-index", "1"] in appliance.recorded("aws")
        assert not (appliance.conf / "failover-watch.env").exists()
        assert [c[1] for c in appliance.recorded("systemctl") if c[0] == "restart"] == ["xpart-agent.service"]


@pytest.mark.parametrize("count", [3, 4, 5, 6])
def test_a_relay_peers_with_every_agent_of_the_count(tmp_path, count):
    values = {"AgentCount": str(count)}
    for k, member in enumerate("CDEF", start=2):
        if k < count:
            values[f"Agent{member}PublicIp"] = f"192.0.2.{20 + k}"
            values[f"Agent{member}PublicKey"] = KEYS[f"agent-{member.lower()}"][1]
    appliance = Appliance(tmp_path, RELAY_SECRETS)
    with FakeImds({"xpart:name": "relay-b"}) as imds:
        result = appliance.boot(relay_user_data(**values), imds)
    assert result.returncode == 0, result.stderr
    config = tomllib.loads((appliance.conf / "relay.toml").read_text())
    assert config["agent"] == [
        {"name": name, "public_key": KEYS[name][1], "tunnel_address": f"100.64.0.{k + 1}"}
        for k, name in enumerate(AGENT_NAMES[:count])
    ]


def _with_line(user_data, after, line):
    """The user data with `line` added to deployment.env after the line starting with `after`."""
    return re.sub(rf"(\n( *){re.escape(after)}[^\n]*\n)", lambda m: f"{m.group(1)}{m.group(2)}{line}\n", user_data, count=1)


@pytest.mark.parametrize(
    "role, user_data, message",
    [
        ("agent-a", lambda: _with_line(agent_user_data(), "XPART_PAIR_2=",
                                       f"XPART_PAIR_3=agent-c,100.64.0.3,10.0.1.13,eni-0{'c' * 16},AgentCGroup"),
         "DeploymentMode pair is two agents, XPART_PAIR_1 and XPART_PAIR_2, not 3"),
        ("agent-a", lambda: _with_line(agent_user_data(**agents_of(3)), "XPART_PAIR_3=",
                                       f"XPART_PAIR_5=agent-e,100.64.0.5,10.0.2.15,eni-0{'e' * 16},AgentEGroup"),
         "XPART_PAIR_5 is set but XPART_PAIR_4 is not"),
        ("agent-a", lambda: agent_user_data(**dict(agents_of(3), AgentCTunnelAddress="100.64.0.2")),
         'two XPART_PAIR_n rows have the tunnel address "100.64.0.2"'),
        ("agent-a", lambda: agent_user_data(**dict(agents_of(2), NlbAddresses="10.0.1.20,10.0.2.20,10.0.3.20")),
         "XPART_NLB_ADDRESSES lists 3 balancer addresses for 2 agents"),
        ("relay-a", lambda: _with_line(relay_user_data(), "XPART_AGENT_2=",
                                       f"XPART_AGENT_4=agent-d,100.64.0.4,{KEYS['agent-d'][1]}"),
         "XPART_AGENT_4 is set but XPART_AGENT_3 is not"),
        ("relay-a", lambda: relay_user_data(AgentCount="3", AgentCPublicIp="192.0.2.22", AgentCPublicKey=KEYS["agent-c"][1],
                                            AgentCTunnelAddress="100.64.0.1"),
         'two XPART_AGENT_n rows have the tunnel address "100.64.0.1"'),
    ],
    ids=["pair-with-three-agents", "agent-row-gap", "agent-tunnel-twice", "more-balancer-addresses-than-agents",
         "peer-row-gap", "peer-tunnel-twice"],
)
def test_the_members_rows_are_checked_before_anything_is_fetched(tmp_path, role, user_data, message):
    """A member or peer left out, or two with one tunnel address, would leave a caller or a relay
    without a route: first boot refuses before it fetches or writes anything."""
    secrets = AGENT_SECRETS if role.startswith("agent") else RELAY_SECRETS
    appliance = Appliance(tmp_path, secrets)
    with FakeImds({"xpart:name": role}) as imds:
        result = appliance.boot(user_data(), imds)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert appliance.installed() == [] and appliance.recorded("aws") == []


def test_rotating_a_multi_az_agent_restarts_only_the_agent(tmp_path):
    appliance = multi_az_appliance(tmp_path)
    # A pair member's files from before a switch to multi-az must not start its units again.
    (appliance.conf / "floating-address").write_text("XPART_FLOATING_ADDRESS=10.0.1.10\n")
    (appliance.conf / "failover-watch.env").write_text("XPART_PAIR=xpart\n")
    with FakeImds({"xpart:name": "agent-a"}) as imds:
        result = appliance.boot(agent_user_data(**MULTI_AZ), imds, args=[])
    assert result.returncode == 0, result.stderr
    assert [c[1] for c in appliance.recorded("systemctl") if c[0] == "restart"] == ["xpart-agent.service"]
    assert not (appliance.conf / "floating-address").exists()
    assert not (appliance.conf / "failover-watch.env").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({**MULTI_AZ, "NlbAddresses": ""}, "XPART_NLB_ADDRESSES \"\" must list"),
        ({**MULTI_AZ, "NlbAddresses": "10.0.1.20"}, "XPART_NLB_ADDRESSES \"10.0.1.20\" must list"),
        ({**MULTI_AZ, "NlbAddresses": "10.0.1.20,10.0.2"}, 'XPART_NLB_ADDRESSES: "10.0.2" is not an IPv4 address'),
        ({**MULTI_AZ, "FloatingAddress": "10.0.1.10"}, "multi-az has no floating address"),
        ({"FloatingAddress": ""}, "DeploymentMode pair needs FloatingAddress"),
        ({"DeploymentMode": "active-active"}, 'XPART_DEPLOYMENT_MODE must be "pair" or "multi-az"'),
    ],
)
def test_each_deployment_mode_checks_its_addresses_before_anything_is_fetched(tmp_path, overrides, message):
    appliance = multi_az_appliance(tmp_path)
    with FakeImds({"xpart:name": "agent-a"}) as imds:
        result = appliance.boot(agent_user_data(**overrides), imds)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert appliance.installed() == [] and appliance.recorded("aws") == []


def test_a_member_interface_without_a_role_tag_is_an_error_never_active(tmp_path):
    interfaces = {AGENT_A_ENI: {"status": "available", "attached_to": None, "role": None}}
    appliance = Appliance(tmp_path, AGENT_SECRETS, interfaces=interfaces)
    with FakeImds({"xpart:name": "agent-a"}) as imds:
        result = appliance.boot(agent_user_data(), imds)
    assert result.returncode != 0
    assert f"{AGENT_A_ENI} has no xpart:role tag" in result.stderr
    assert appliance.installed() == [], "nothing written"
    assert appliance.recorded("systemctl") == []
    assert "attach-network-interface" not in appliance.aws_operations()
    assert "create-tags" not in appliance.aws_operations()


@pytest.mark.parametrize("role", ["primary", "Active", ""])
def test_a_role_tag_that_is_not_active_or_standby_is_refused(tmp_path, role):
    interfaces = {AGENT_A_ENI: {"status": "available", "attached_to": None, "role": role}}
    appliance = Appliance(tmp_path, AGENT_SECRETS, interfaces=interfaces)
    with FakeImds({"xpart:name": "agent-a"}) as imds:
        result = appliance.boot(agent_user_data(), imds)
    assert result.returncode != 0
    assert AGENT_A_ENI in result.stderr and "xpart:role" in result.stderr
    assert appliance.installed() == []


def test_an_unreadable_member_interface_is_an_error(tmp_path):
    appliance = Appliance(tmp_path, AGENT_SECRETS, interfaces={})
    with FakeImds({"xpart:name": "agent-a"}) as imds:
        result = appliance.boot(agent_user_data(), imds)
    assert result.returncode != 0
    assert f"cannot describe {AGENT_A_ENI}" in result.stderr
    assert appliance.aws_operations().count("describe-network-interfaces") == 4, "retried with back-off"
    assert appliance.installed() == [] and appliance.recorded("systemctl") == []


def test_an_interface_still_held_by_the_old_instance_fails_the_boot_for_a_retry(tmp_path):
    interfaces = {AGENT_A_ENI: {"status": "in-use", "attached_to": "i-0ffffffffffffffff", "role": "active"}}
    appliance = Appliance(tmp_path, AGENT_SECRETS, interfaces=interfaces)
    with FakeImds({"xpart:name": "agent-a"}) as imds:
        result = appliance.boot(agent_user_data(), imds)
    assert result.returncode != 0
    assert "attached to i-0ffffffffffffffff" in result.stderr and "retried" in result.stderr
    assert appliance.installed() == []


def test_an_interface_already_attached_here_is_kept(tmp_path):
    interfaces = {AGENT_A_ENI: {"status": "in-use", "attached_to": INSTANCE_ID, "role": "active"}}
    appliance = Appliance(tmp_path, AGENT_SECRETS, interfaces=interfaces)
    with FakeImds({"xpart:name": "agent-a"}) as imds:
        result = appliance.boot(agent_user_data(), imds)
    assert result.returncode == 0, result.stderr
    assert "attach-network-interface" not in appliance.aws_operations()


def test_a_configuration_the_daemon_refuses_is_never_installed_or_restarted_onto(tmp_path):
    appliance = Appliance(tmp_path, RELAY_SECRETS, check_fails=True)
    (appliance.conf / "relay.toml").write_text("# the configuration the relay runs on\n")
    (appliance.conf / "relay.key").write_text("old key\n")
    with FakeImds({"xpart:name": "relay-a"}) as imds:
        result = appliance.boot(relay_user_data(), imds)
    assert result.returncode != 0
    assert "--check refused the new configuration" in result.stderr
    assert "stand-in refusal" in result.stderr, "the daemon's own words reach the log"
    assert "nothing installed" in result.stderr
    assert (appliance.conf / "relay.toml").read_text() == "# the configuration the relay runs on\n"
    assert (appliance.conf / "relay.key").read_text() == "old key\n"
    assert appliance.recorded("systemctl") == []
    assert [p.name for p in appliance.conf.iterdir() if p.name.startswith(".")] == [], "staging removed"
    assert "done" not in result.stderr


@pytest.mark.parametrize(
    "models, message",
    [
        ("anthropic.claude-* evil]", 'XPART_MODELS: "evil]" has characters a model pattern cannot have'),
        ('anthropic.claude-* evil"]', "XPART_MODELS has quotes"),
        ("anthropic.claude-* $(touch /tmp/xpart-owned)", "XPART_MODELS has quotes, backquotes, $"),
    ],
)
def test_a_value_that_fails_validation_stops_boot_before_anything_is_fetched(tmp_path, models, message):
    """A check inside a command substitution does not stop a `set -e` script, and a sourced
    file runs what it holds: deployment.env is read as data and every value is validated in
    the main shell before anything is fetched or rendered."""
    appliance = Appliance(tmp_path, RELAY_SECRETS)
    with FakeImds({"xpart:name": "relay-a"}) as imds:
        result = appliance.boot(relay_user_data(RelayModels=models), imds)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert appliance.installed() == []
    assert appliance.recorded("aws") == [] and appliance.recorded("systemctl") == []
    assert not Path("/tmp/xpart-owned").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"FloatingAddress": "10.0.1.300"}, "XPART_FLOATING_ADDRESS"),
        ({"RelayAPublicKey": "not-a-key"}, "XPART_RELAY_1"),
        ({"RelayAPublicIp": "198.51.100.10:1"}, "XPART_RELAY_1"),
        ({"AgentBPrivateAddress": "10.0.1"}, "XPART_PAIR_2"),
        ({"BedrockRegion": "us-east-1 evil_name"}, "XPART_DNS_NAMES"),
        ({"TunnelPrefixLength": "64"}, "XPART_TUNNEL_PREFIX_LENGTH"),
        ({"ParameterPrefix": "xpart/$(reboot)"}, "XPART_PARAMETER_PREFIX has quotes"),
        ({"ParameterPrefix": "xpart//prod"}, "XPART_PARAMETER_PREFIX \"/xpart//prod\" must be a path"),
    ],
)
def test_every_agent_value_is_validated_before_rendering(tmp_path, overrides, message):
    appliance = Appliance(tmp_path, AGENT_SECRETS)
    with FakeImds({"xpart:name": "agent-a"}) as imds:
        result = appliance.boot(agent_user_data(**overrides), imds)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert appliance.installed() == [] and appliance.recorded("aws") == []


def test_model_patterns_are_never_expanded_against_files(tmp_path):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    for name in ("anthropic.claude-3-haiku", "anthropic.claude-x", "README"):
        (workdir / name).write_text("")
    appliance = Appliance(tmp_path, RELAY_SECRETS)
    with FakeImds({"xpart:name": "relay-a"}) as imds:
        result = appliance.boot(relay_user_data(RelayModels="* anthropic.claude-*"), imds, cwd=workdir)
    assert result.returncode == 0, result.stderr
    config = tomllib.loads((appliance.conf / "relay.toml").read_text())
    assert config["policy"]["models"] == ["*", "anthropic.claude-*"]


def test_at_boot_the_script_installs_and_leaves_starting_to_systemd(tmp_path):
    appliance = Appliance(tmp_path, AGENT_SECRETS)
    with FakeImds({"xpart:name": "agent-a"}) as imds:
        result = appliance.boot(agent_user_data(), imds, args=["--at-boot"])
    assert result.returncode == 0, result.stderr
    assert (appliance.conf / "agent.toml").exists()
    # The daemon's unit requires xpart-boot.service and is ordered after it: a restart from
    # inside the boot unit would wait on itself.
    assert appliance.recorded("systemctl") == []


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
    assert config["tunnel"]["private_key_file"] == str(appliance.conf / "relay.key")
    assert config["service"] == {"listen": "100.64.0.11:8080"}
    assert [(a["name"], a["tunnel_address"], a["public_key"]) for a in config["agent"]] == [
        ("agent-a", "100.64.0.1", KEYS["agent-a"][1]),
        ("agent-b", "100.64.0.2", KEYS["agent-b"][1]),
    ]
    # One upstream per interface endpoint of the stack's region: the runtime and the control
    # plane (model discovery), both through the VPC resolver that knows their private DNS.
    assert [(u["service"], u["region"], u["endpoint"]) for u in config["upstream"]] == [
        ("bedrock-runtime", "us-east-1", "https://bedrock-runtime.us-east-1.amazonaws.com"),
        ("bedrock", "us-east-1", "https://bedrock.us-east-1.amazonaws.com"),
    ]
    assert all(u["resolver"] == ["169.254.169.253:53"] for u in config["upstream"]), config["upstream"]
    # No prefix written: the relay derives us. from the region, so the retry is on by default.
    assert all("inference_profile_prefix" not in u for u in config["upstream"]), config["upstream"]
    # The stack's operations, then the discovery reads its bedrock endpoint admits.
    assert config["policy"]["operations"] == [
        "InvokeModel", "InvokeModelWithResponseStream", "Converse", "ConverseStream",
        "ListFoundationModels", "GetFoundationModel", "ListInferenceProfiles", "GetInferenceProfile"]
    assert config["policy"]["models"] == ["xpart.echo", "anthropic.claude-*", "us.anthropic.claude-*"]
    assert config["rewrite"]["rule"] == [{"from": "us-gov.", "to": "us."}]
    # The relay takes its Elastic IP once it is up; the other relay serves meanwhile.
    assert ["ec2", "associate-address", "--allocation-id", STACK_VALUES["RelayAEipAllocationId"],
            "--instance-id", INSTANCE_ID, "--allow-reassociation"] in appliance.recorded("aws")
    assert appliance.recorded("systemctl")[-1] == ["restart", "xpart-relay.service"]
    assert KEYS["relay-a"][0] not in result.stdout + result.stderr


def test_secrets_manager_store_reads_secret_ids_without_the_leading_slash(tmp_path):
    secrets = {name.lstrip("/"): value for name, value in RELAY_SECRETS.items()}
    appliance = Appliance(tmp_path, secrets)
    with FakeImds({"xpart:name": "relay-b"}) as imds:
        result = appliance.boot(relay_user_data(SecretStore="secretsmanager"), imds)
    assert result.returncode == 0, result.stderr
    assert [c for c in appliance.recorded("aws") if c[0] == "secretsmanager"] == [
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
    assert "associate-address" not in appliance.aws_operations()


def test_a_missing_parameter_is_named_and_nothing_is_written_or_taken(tmp_path):
    secrets = {k: v for k, v in AGENT_SECRETS.items() if not k.endswith("principals")}
    appliance = Appliance(tmp_path, secrets)
    with FakeImds({"xpart:name": "agent-a"}) as imds:
        result = appliance.boot(agent_user_data(), imds)
    assert result.returncode != 0
    assert "cannot read SSM parameter /xpart/prod/agent/principals" in result.stderr
    assert appliance.installed() == []
    assert [p.name for p in appliance.conf.iterdir() if p.name.startswith(".")] == [], "no temporary file left"
    assert appliance.recorded("systemctl") == []
    # Fetched everything before taking anything: the interface stays where it was.
    assert "attach-network-interface" not in appliance.aws_operations()


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


class Readyz:
    def __init__(self, status):
        self.status = status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(inner):
                inner.send_response(status)
                inner.send_header("Content-Length", "0")
                inner.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/readyz"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status, outcome", [(200, "SUCCESS"), (503, "FAILURE")])
def test_the_member_signals_the_stack_once_ready_and_fails_the_update_otherwise(tmp_path, status, outcome):
    readyz = Readyz(status)
    appliance = Appliance(tmp_path, RELAY_SECRETS)
    try:
        with FakeImds({"xpart:name": "relay-b"}) as imds:
            result = appliance.boot(
                relay_user_data(), imds, args=["--signal-when-ready"],
                extra_env={"XPART_READYZ_URL": readyz.url, "XPART_READY_TIMEOUT_SECONDS": "0" if status != 200 else "30"},
            )
    finally:
        readyz.close()
    assert (result.returncode == 0) == (outcome == "SUCCESS"), result.stderr
    assert appliance.recorded("aws") == [[
        "cloudformation", "signal-resource", "--stack-name", "xpart-stack", "--logical-resource-id",
        "RelayBGroup", "--unique-id", INSTANCE_ID, "--status", outcome,
    ]]
    assert appliance.installed() == [], "signalling writes nothing"


def test_a_signal_the_stack_does_not_wait_for_is_no_failure(tmp_path):
    """After a reboot no create or update waits for the member: the stack refuses the signal."""
    readyz = Readyz(200)
    appliance = Appliance(tmp_path, RELAY_SECRETS, refused={"signal-resource"})
    try:
        with FakeImds({"xpart:name": "relay-a"}) as imds:
            result = appliance.boot(relay_user_data(), imds, args=["--signal-when-ready"],
                                    extra_env={"XPART_READYZ_URL": readyz.url})
    finally:
        readyz.close()
    assert result.returncode == 0, result.stderr
    assert "the stack took no signal for RelayAGroup" in result.stderr


@pytest.mark.parametrize(
    "role, name, user_data, secrets",
    [
        ("agent", "agent-a", agent_user_data, AGENT_SECRETS),
        ("agent", "agent-a", lambda: agent_user_data(**MULTI_AZ), AGENT_SECRETS),
        ("agent", "agent-f", lambda: agent_user_data(**agents_of(6)),
         dict(AGENT_SECRETS, **{ssm("agent-f/wireguard-private-key"): KEYS["agent-f"][0]})),
        ("relay", "relay-b", relay_user_data, RELAY_SECRETS),
        ("relay", "relay-b", lambda: relay_user_data(AgentCount="6", **{
            f"Agent{m}{field}": value for m in "CDEF" for field, value in (
                ("PublicIp", f"192.0.2.{ord(m)}"), ("PublicKey", KEYS[f"agent-{m.lower()}"][1]))}), RELAY_SECRETS),
    ],
    ids=["agent", "agent-multi-az", "agent-f-of-six", "relay", "relay-of-six-agents"],
)
def test_the_daemon_accepts_the_configuration_first_boot_writes(tmp_path, role, name, user_data, secrets):
    daemon = BIN_DIR / f"xpart-{role}"
    if not daemon.is_file():
        pytest.skip(f"{daemon} not built (cargo build --bins; XPART_BIN_DIR points elsewhere)")
    appliance = Appliance(tmp_path, secrets)
    with FakeImds({"xpart:name": name}) as imds:
        # The script runs the real daemon's --check on the staged file before installing it.
        result = appliance.boot(user_data(), imds, extra_env={"XPART_BIN_DIR": str(BIN_DIR)})
    assert result.returncode == 0, result.stderr
    check = subprocess.run(
        [str(daemon), "--config", str(appliance.conf / f"{role}.toml"), "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


# ---------------------------------------------------------------------------------------------
# FIPS mode (the stacks' FipsMode true): the inner TLS and the FIPS endpoints


def inner_tls_ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xpart test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def inner_tls_leaf(ca, dns_name, usage):
    """What `xpart ca issue --agent NAME` / `--relay NAME` writes: ECDSA P-256, the one DNS
    name the other side pins, client or server authentication."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return chain.decode().strip(), key_pem.strip()


INNER_CA = inner_tls_ca()
INNER_CA_PEM = INNER_CA[0].public_bytes(serialization.Encoding.PEM).decode().strip()
INNER_LEAVES = {
    name: inner_tls_leaf(INNER_CA, f"{name}.{name.split('-')[0]}.xpart",
                         x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if name.startswith("agent")
                         else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH)
    for name in [*AGENT_NAMES, "relay-a", "relay-b"]
}


def inner_tls_secrets(*members):
    secrets = {}
    for member in members:
        cert, key = INNER_LEAVES[member]
        secrets[ssm(f"{member}/inner-tls-certificate")] = cert
        secrets[ssm(f"{member}/inner-tls-private-key")] = key
        secrets[ssm(f"{member}/inner-tls-ca-certificate")] = INNER_CA_PEM
    return secrets


FIPS_AGENT_SECRETS = dict(AGENT_SECRETS, **inner_tls_secrets("agent-a", "agent-b"))
FIPS_RELAY_SECRETS = dict(RELAY_SECRETS, **inner_tls_secrets("relay-a", "relay-b"))
INNER_TLS_FILES = {"inner-tls.crt": 0o640, "inner-tls.key": 0o600, "inner-tls-ca.crt": 0o640}


def test_the_stacks_default_to_fips_mode_and_carry_it_to_first_boot():
    for user_data in (agent_user_data(FipsMode=None), relay_user_data(FipsMode=None)):
        assert "XPART_FIPS_MODE=true\n" in deployment_env(user_data)
    assert "XPART_FIPS_MODE=false\n" in deployment_env(relay_user_data())


def test_fips_mode_agent_first_boot_installs_its_inner_tls_files_and_turns_the_inner_tls_on(tmp_path):
    appliance = Appliance(tmp_path, FIPS_AGENT_SECRETS, fips_build=True)
    with FakeImds({"xpart:name": "agent-b"}) as imds:
        result = appliance.boot(agent_user_data(FipsMode="true"), imds)
    assert result.returncode == 0, result.stderr
    cert, key = INNER_LEAVES["agent-b"]
    assert (appliance.conf / "inner-tls.crt").read_text().strip() == cert
    assert (appliance.conf / "inner-tls.key").read_text().strip() == key
    assert (appliance.conf / "inner-tls-ca.crt").read_text().strip() == INNER_CA_PEM
    for name, mode in INNER_TLS_FILES.items():
        assert appliance.mode(name) == mode, name
    config = tomllib.loads((appliance.conf / "agent.toml").read_text())
    assert config["tunnel"] == agent_b_tunnel(
        appliance.conf,
        inner_tls=True,
        inner_tls_cert_file=str(appliance.conf / "inner-tls.crt"),
        inner_tls_key_file=str(appliance.conf / "inner-tls.key"),
        inner_tls_ca_file=str(appliance.conf / "inner-tls-ca.crt"),
    )
    # The relays' names are the names their inner-TLS certificates carry (relay-a.relay.xpart).
    assert [r["name"] for r in config["relay"]] == ["relay-a", "relay-b"]
    fetched = sorted(c[c.index("--name") + 1] for c in appliance.recorded("aws") if c[0] == "ssm")
    assert fetched == sorted(k for k in FIPS_AGENT_SECRETS if "agent-a" not in k), "agent-b reads its own only"
    assert key not in result.stdout + result.stderr


def test_fips_mode_relay_first_boot_turns_the_inner_tls_on_and_sends_to_the_fips_endpoints(tmp_path):
    appliance = Appliance(tmp_path, FIPS_RELAY_SECRETS, fips_build=True)
    with FakeImds({"xpart:name": "relay-a"}) as imds:
        result = appliance.boot(relay_user_data(FipsMode="true"), imds)
    assert result.returncode == 0, result.stderr
    for name, mode in INNER_TLS_FILES.items():
        assert appliance.mode(name) == mode, name
    assert (appliance.conf / "inner-tls.crt").read_text().strip() == INNER_LEAVES["relay-a"][0]
    config = tomllib.loads((appliance.conf / "relay.toml").read_text())
    assert config["tunnel"]["inner_tls"] is True
    assert config["tunnel"]["inner_tls_key_file"] == str(appliance.conf / "inner-tls.key")
    assert config["tunnel"]["inner_tls_ca_file"] == str(appliance.conf / "inner-tls-ca.crt")
    assert [a["name"] for a in config["agent"]] == ["agent-a", "agent-b"]
    # The FIPS interface endpoints' private DNS answers these names inside the VPC.
    assert [(u["service"], u["region"], u.get("fips"), u["endpoint"]) for u in config["upstream"]] == [
        ("bedrock-runtime", "us-east-1", True, "https://bedrock-runtime-fips.us-east-1.amazonaws.com"),
        ("bedrock", "us-east-1", True, "https://bedrock-fips.us-east-1.amazonaws.com"),
    ]
    assert all(u["resolver"] == ["169.254.169.253:53"] for u in config["upstream"])


def test_fips_mode_off_writes_no_inner_tls_and_removes_the_files_of_an_earlier_fips_boot(tmp_path):
    appliance = Appliance(tmp_path, RELAY_SECRETS)
    for name in INNER_TLS_FILES:
        (appliance.conf / name).write_text("from an earlier FIPS boot\n")
    with FakeImds({"xpart:name": "relay-b"}) as imds:
        result = appliance.boot(relay_user_data(FipsMode="false"), imds)
    assert result.returncode == 0, result.stderr
    config = tomllib.loads((appliance.conf / "relay.toml").read_text())
    assert not any(key.startswith("inner_tls") for key in config["tunnel"])
    assert [u["endpoint"] for u in config["upstream"]] == [
        "https://bedrock-runtime.us-east-1.amazonaws.com", "https://bedrock.us-east-1.amazonaws.com"]
    assert all("fips" not in u for u in config["upstream"])
    assert appliance.installed() == ["relay.key", "relay.toml"]
    assert not any("inner-tls" in c[c.index("--name") + 1] for c in appliance.recorded("aws") if c[0] == "ssm")


@pytest.mark.parametrize("role, member", [("agent", "agent-a"), ("relay", "relay-b")])
@pytest.mark.parametrize("parameter", ["inner-tls-certificate", "inner-tls-private-key", "inner-tls-ca-certificate"])
def test_a_missing_inner_tls_parameter_stops_first_boot_and_names_it(tmp_path, role, member, parameter):
    secrets = FIPS_AGENT_SECRETS if role == "agent" else FIPS_RELAY_SECRETS
    secrets = {k: v for k, v in secrets.items() if k != ssm(f"{member}/{parameter}")}
    appliance = Appliance(tmp_path, secrets, fips_build=True)
    user_data = agent_user_data(FipsMode="true") if role == "agent" else relay_user_data(FipsMode="true")
    with FakeImds({"xpart:name": member}) as imds:
        result = appliance.boot(user_data, imds)
    assert result.returncode != 0
    assert f"cannot read SSM parameter /xpart/prod/{member}/{parameter}" in result.stderr, result.stderr
    assert appliance.installed() == [] and appliance.recorded("systemctl") == []
    # Fetched before anything is taken: the interface and the Elastic IP stay where they were.
    assert not {"attach-network-interface", "associate-address"} & set(appliance.aws_operations())


@pytest.mark.parametrize(
    "replace, message",
    [
        ({"relay-a/inner-tls-certificate": INNER_LEAVES["relay-b"][0]},
         "/xpart/prod/relay-a/inner-tls-certificate does not name relay-a.relay.xpart"),
        ({"relay-a/inner-tls-certificate": INNER_LEAVES["agent-a"][0]},
         "/xpart/prod/relay-a/inner-tls-certificate does not name relay-a.relay.xpart"),
        ({"relay-a/inner-tls-private-key": INNER_LEAVES["relay-b"][1]},
         "/xpart/prod/relay-a/inner-tls-private-key is not the key of /xpart/prod/relay-a/inner-tls-certificate"),
        ({"relay-a/inner-tls-private-key": KEYS["relay-a"][0]},
         "/xpart/prod/relay-a/inner-tls-private-key holds no PEM private key"),
        ({"relay-a/inner-tls-ca-certificate": "ca.key by mistake"},
         "/xpart/prod/relay-a/inner-tls-ca-certificate holds no PEM certificate"),
    ],
    ids=["another-relays-certificate", "an-agents-certificate", "another-key", "not-pem", "no-ca"],
)
def test_an_inner_tls_parameter_of_another_member_or_shape_stops_first_boot(tmp_path, replace, message):
    """The daemon reads the inner-TLS files only when it starts, so its --check would pass
    them and every connection would fail after."""
    if "does not name" in message or "is not the key" in message:
        if shutil.which("openssl") is None:
            pytest.skip("openssl not installed (apt-get install openssl); Amazon Linux 2023 has it")
    secrets = dict(FIPS_RELAY_SECRETS, **{ssm(k): v for k, v in replace.items()})
    appliance = Appliance(tmp_path, secrets, fips_build=True)
    with FakeImds({"xpart:name": "relay-a"}) as imds:
        result = appliance.boot(relay_user_data(FipsMode="true"), imds)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert appliance.installed() == []
    assert "associate-address" not in appliance.aws_operations()


@pytest.mark.parametrize(
    "fips_mode, fips_build, message",
    [
        ("true", False, "the stack's FipsMode is true (XPART_FIPS_MODE in "),
        ("false", True, "is a FIPS build (\"xpart-relay 0.1.0 (fips)\"), but "),
    ],
    ids=["fips-stack-plain-binary", "plain-stack-fips-binary"],
)
def test_a_stack_and_a_daemon_that_disagree_on_fips_stop_first_boot_before_anything_is_fetched(
        tmp_path, fips_mode, fips_build, message):
    appliance = Appliance(tmp_path, FIPS_RELAY_SECRETS, fips_build=fips_build)
    with FakeImds({"xpart:name": "relay-a"}) as imds:
        result = appliance.boot(relay_user_data(FipsMode=fips_mode), imds)
    assert result.returncode != 0
    assert message in result.stderr and "FipsMode" in result.stderr, result.stderr
    assert appliance.recorded("aws") == [] and appliance.installed() == []


def test_the_default_build_is_refused_by_a_fips_stack(tmp_path):
    """What a stack with FipsMode true says of a real daemon built without --features fips."""
    daemon = BIN_DIR / "xpart-relay"
    if not daemon.is_file():
        pytest.skip(f"{daemon} not built (cargo build --bins; XPART_BIN_DIR points elsewhere)")
    if "(fips)" in subprocess.run([str(daemon), "--version"], capture_output=True, text=True).stdout:
        pytest.skip(f"{daemon} is a FIPS build; this test needs the default one")
    appliance = Appliance(tmp_path, FIPS_RELAY_SECRETS)
    with FakeImds({"xpart:name": "relay-a"}) as imds:
        result = appliance.boot(relay_user_data(FipsMode="true"), imds, extra_env={"XPART_BIN_DIR": str(BIN_DIR)})
    assert result.returncode != 0
    assert f"{daemon} is not a FIPS build" in result.stderr, result.stderr
    assert appliance.recorded("aws") == []


def fips_build_present():
    return all((FIPS_BIN_DIR / f"xpart-{role}").is_file() for role in ("agent", "relay"))


@pytest.mark.parametrize(
    "role, name, user_data, secrets",
    [
        ("agent", "agent-a", lambda: agent_user_data(FipsMode="true"), FIPS_AGENT_SECRETS),
        ("agent", "agent-f", lambda: agent_user_data(FipsMode="true", **agents_of(6)),
         dict(FIPS_AGENT_SECRETS, **{ssm("agent-f/wireguard-private-key"): KEYS["agent-f"][0]},
              **inner_tls_secrets("agent-f"))),
        ("relay", "relay-b", lambda: relay_user_data(FipsMode="true"), FIPS_RELAY_SECRETS),
    ],
    ids=["agent", "agent-f-of-six", "relay"],
)
def test_the_daemon_accepts_the_fips_configuration_first_boot_writes(tmp_path, record_property, role, name,
                                                                    user_data, secrets):
    """With the FIPS build (tests/fips/build; XPART_FIPS_BIN_DIR): first boot runs it, so its
    --version passes the mode check and its --check, which requires the inner TLS and FIPS
    upstreams, accepts the staged file. Without it: first boot runs the stand-in FIPS daemon,
    and the default build's --check reads what was installed (every field and file the same;
    only the FIPS-build rules are not applied). The test records which it ran."""
    appliance = Appliance(tmp_path, secrets, fips_build=True)
    extra_env = {}
    if fips_build_present():
        checker, extra_env = FIPS_BIN_DIR, {"XPART_BIN_DIR": str(FIPS_BIN_DIR)}
    else:
        checker = BIN_DIR
        if not (checker / f"xpart-{role}").is_file():
            pytest.skip(f"neither {FIPS_BIN_DIR} (tests/fips/build) nor {BIN_DIR} (cargo build --bins) has xpart-{role}")
    record_property("checked_by", str(checker / f"xpart-{role}"))
    with FakeImds({"xpart:name": name}) as imds:
        result = appliance.boot(user_data(), imds, extra_env=extra_env)
    assert result.returncode == 0, result.stderr
    check = subprocess.run(
        [str(checker / f"xpart-{role}"), "--config", str(appliance.conf / f"{role}.toml"), "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_certificates_xpart_ca_issue_writes_pass_first_boot(tmp_path):
    """The operator's path of images/README.md, section 2: `xpart ca init`, then
    `xpart ca issue --relay relay-a`, its .pem, .key and ca.pem put as the three parameters."""
    cli = BIN_DIR / "xpart"
    if not cli.is_file():
        pytest.skip(f"{cli} not built (cargo build -p xpart)")
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for args in (["ca", "init", "--dir", "ca"], ["ca", "issue", "--ca-dir", "ca", "--relay", "relay-a", "--out", "inner-relay-a"]):
        issued = subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=60, cwd=secrets_dir)
        assert issued.returncode == 0, issued.stderr
    secrets = dict(RELAY_SECRETS, **{
        ssm("relay-a/inner-tls-certificate"): (secrets_dir / "inner-relay-a.pem").read_text().strip(),
        ssm("relay-a/inner-tls-private-key"): (secrets_dir / "inner-relay-a.key").read_text().strip(),
        ssm("relay-a/inner-tls-ca-certificate"): (secrets_dir / "ca" / "ca.pem").read_text().strip(),
    })
    (tmp_path / "appliance").mkdir()
    appliance = Appliance(tmp_path / "appliance", secrets, fips_build=True)
    with FakeImds({"xpart:name": "relay-a"}) as imds:
        result = appliance.boot(relay_user_data(FipsMode="true"), imds)
    assert result.returncode == 0, result.stderr
    assert (appliance.conf / "inner-tls.key").read_text() == (secrets_dir / "inner-relay-a.key").read_text()
