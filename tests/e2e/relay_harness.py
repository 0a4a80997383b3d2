"""Helpers to run xpart-relay against the Bedrock stand-in on loopback: the binary as a
process, its config, a test DNS server for the upstream name, an ECS-style credentials
endpoint, and clients (boto3 and raw HTTP). The agent's suites may import these."""

import datetime
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "standin"))

import bedrock_standin  # noqa: E402
import certs  # noqa: E402
import dns_server  # noqa: E402
import eventstream  # noqa: E402

UPSTREAM_NAME = "bedrock-runtime.us-east-1.amazonaws.com"
# Resolves to a dead address first, then the stand-in: the relay must try the next one.
MULTI_ADDRESS_NAME = "vpce-0test-multi.bedrock-runtime.us-east-1.vpce.amazonaws.com"
REGION = "us-east-1"
# The relay's own (test) credentials; callers' fake credentials must never reach the stand-in.
RELAY_KEY = ("AKIARELAYTESTKEY0001", "relay-test-secret-key")
CALLER_KEY = ("AKIACALLERKEY9999999", "caller-secret-never-forwarded")
CALLER_TOKEN = "CALLER-SESSION-TOKEN-never-forwarded"


def bin_dir():
    return os.environ.get("XPART_BIN_DIR", os.path.join(REPO, "target", "debug"))


def relay_binary():
    return os.path.join(bin_dir(), "xpart-relay")


def relay_config(
    directory,
    standin_port,
    dns_port,
    ca_file,
    *,
    first_byte_timeout=30,
    idle_timeout=30,
    refresh_before_expiry=300,
    operations=("InvokeModel", "InvokeModelWithResponseStream", "Converse", "ConverseStream", "CountTokens"),
    models=("anthropic.*", "us.anthropic.*", "standin.*", "us.standin.*", "arn:aws:bedrock:*"),
    agent_address="127.0.0.1",
    upstream_host=UPSTREAM_NAME,
    credentials_source="chain",
    guardrails=(),
    service_tiers=("default",),
    performance_latency=("standard",),
    trace=("ENABLED", "DISABLED", "ENABLED_FULL"),
    max_buffered_body_bytes=None,
    upstreams=None,
):
    """Write relay.toml for a loopback test (tunnel mode "host") and return its path.

    `upstreams`: several `[[upstream]]` entries instead of the one `[upstream]`, each a dict
    with `service`, `region` and optionally `fips`, `host_header` (the name signed and sent,
    e.g. bedrock.us-west-2.amazonaws.com) and `prefix` (inference_profile_prefix; absent: not
    written); all reach the stand-in through `upstream_host`."""
    audit = os.path.join(directory, "audit.jsonl")
    limits = "" if max_buffered_body_bytes is None else f"[limits]\nmax_buffered_body_bytes = {max_buffered_body_bytes}\n\n"
    text = f"""
[tunnel]
mode = "host"

[[agent]]
name = "agent-test"
tunnel_address = "{agent_address}"

[service]
listen = "127.0.0.1:0"

{upstream_tables(upstreams, upstream_host, standin_port, dns_port, ca_file, first_byte_timeout, idle_timeout)}
[policy]
operations = {json.dumps(list(operations))}
models = {json.dumps(list(models))}
guardrails = {json.dumps(list(guardrails))}
service_tiers = {json.dumps(list(service_tiers))}
performance_latency = {json.dumps(list(performance_latency))}
trace = {json.dumps(list(trace))}

[[rewrite.rule]]
from = "arn:aws-us-gov:bedrock:us-gov-west-1:111122223333:"
to = "arn:aws:bedrock:us-east-1:444455556666:"

[[rewrite.rule]]
from = "us-gov."
to = "us."

[echo]
model = "xpart.echo"

[credentials]
source = "{credentials_source}"
refresh_before_expiry_secs = {refresh_before_expiry}
fetch_timeout_secs = 5

{limits}[admin]
listen = "127.0.0.1:0"

[audit]
path = "{audit}"
"""
    path = os.path.join(directory, "relay.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def relay_env(home, *, static_key=None, container_uri=None):
    """A clean environment: only the credential source the test chooses, no IMDS, no profiles."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": home,
        "RUST_LOG": os.environ.get("XPART_TEST_RUST_LOG", "info"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.path.join(home, "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "no-aws-credentials"),
    }
    if static_key:
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = static_key
    if container_uri:
        env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = container_uri
    return env


class RelayProcess:
    """xpart-relay started from its binary; addresses read from its first stdout line."""

    def __init__(self, config_path, env, log_path):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [relay_binary(), "--config", config_path],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
        )
        line = self._first_line(timeout=20)
        info = json.loads(line)
        host, port = info["service"].rsplit(":", 1)
        self.service = (host, int(port))
        self.admin = None
        if info.get("admin"):
            host, port = info["admin"].rsplit(":", 1)
            self.admin = (host, int(port))

    def _first_line(self, timeout):
        result = {}

        def read():
            result["line"] = self.proc.stdout.readline()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not result.get("line"):
            self.stop()
            raise RuntimeError(f"xpart-relay did not start; its log:\n{self.logs()}")
        return result["line"]

    @property
    def endpoint(self):
        return f"http://{self.service[0]}:{self.service[1]}"

    def logs(self):
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


class ContainerCredentials:
    """An ECS-style credentials endpoint on 127.0.0.1 (AWS_CONTAINER_CREDENTIALS_FULL_URI) that
    issues a fresh short-lived key on each call and registers it with the stand-in."""

    def __init__(self, store, lifetime_seconds):
        self.store = store
        self.lifetime = lifetime_seconds
        self.issued = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                key = "ASIA" + secrets.token_hex(8).upper()
                secret = secrets.token_hex(20)
                token = "token-" + secrets.token_hex(16)
                expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=outer.lifetime)
                outer.store.add(key, secret, token, expiry)
                outer.issued.append((key, expiry))
                body = json.dumps({
                    "AccessKeyId": key,
                    "SecretAccessKey": secret,
                    "Token": token,
                    "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}/v2/credentials"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def upstream_tables(upstreams, upstream_host, standin_port, dns_port, ca_file, first_byte_timeout, idle_timeout):
    common = f"""endpoint = "https://{upstream_host}:{standin_port}"
resolver = ["127.0.0.1:{dns_port}"]
extra_ca_file = "{ca_file}"
connect_timeout_secs = 2
first_byte_timeout_secs = {first_byte_timeout}
idle_timeout_secs = {idle_timeout}
"""
    if upstreams is None:
        return f'[upstream]\nregion = "{REGION}"\ninference_profile_prefix = "us."\n{common}'
    tables = []
    for up in upstreams:
        lines = ["[[upstream]]", f'service = "{up["service"]}"', f'region = "{up["region"]}"']
        if up.get("fips"):
            lines.append("fips = true")
        if up.get("host_header"):
            lines.append(f'host_header = "{up["host_header"]}"')
        if up.get("prefix") is not None:
            lines.append(f'inference_profile_prefix = "{up["prefix"]}"')
        tables.append("\n".join(lines) + "\n" + common)
    return "\n".join(tables)


def bedrock_client(endpoint, extra_headers=None, read_timeout=30):
    """A boto3 bedrock-runtime client aimed at the relay, holding the caller's (fake)
    credentials, as a caller's SDK would present them; retries off so errors show as sent."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=CALLER_KEY[0],
        aws_secret_access_key=CALLER_KEY[1],
        aws_session_token=CALLER_TOKEN,
        region_name=REGION,
    )
    client = session.client(
        "bedrock-runtime",
        endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=read_timeout, connect_timeout=5),
    )
    if extra_headers:
        def add(request, **_):
            for name, value in extra_headers.items():
                request.headers[name] = value
        client.meta.events.register("before-send.bedrock-runtime.*", add)
    return client


def post(address, path, body=b"", headers=None, source=None, timeout=30):
    """A raw HTTP/1.1 POST; returns (status, headers dict lowercased, body bytes)."""
    conn = http.client.HTTPConnection(
        address[0], address[1], timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def get(address, path, method="GET", source=None, timeout=10):
    conn = http.client.HTTPConnection(
        address[0], address[1], timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def converse_body(text="hello"):
    return json.dumps({"messages": [{"role": "user", "content": [{"text": text}]}]}).encode()


def read_audit(path, count, timeout=5.0):
    """The audit log's lines once at least `count` are written."""
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            if len(lines) >= count:
                return lines
        time.sleep(0.05)
    return lines


def error_type(headers):
    return headers.get("x-amzn-errortype", "").split(":")[0]
