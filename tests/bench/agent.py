#!/usr/bin/env python3
"""Whole-path benchmark: caller → xpart-agent (TLS front) → WireGuard in userspace mode (UDP on
127.0.0.1) → xpart-relay → Bedrock stand-in, against the stand-in alone, alternating in one run.
Loopback only; no root.

    cargo build --release -p xpart-agent -p xpart-relay
    cargo build --release -p xpart-agent --example loadgen
    XPART_BIN_DIR=target/release python3 tests/bench/agent.py [--rounds 5] [--requests 300]
        [--seconds 5] [--write]

Reports:
  * added latency (p50, p99) of small Converse calls, sequential, HTTP/1.1 keep-alive: the
    two clients alternate request by request and the percentiles are of the per-pair
    differences (whole path minus stand-in alone). The direct client sends a request signed once before timing (the
    stand-in checks the signature but not its reuse), so signing costs nothing in either column;
  * added time to first byte of ConverseStream, measured the same way;
  * requests/s at saturation through agent, tunnel and relay, with the relay's echo model
    answering (the Python stand-in manages a few hundred requests/s, so it would measure
    itself), driven by agent/examples/loadgen.rs over HTTP/2 (2 connections × 32 streams);
  * peak RSS (VmHWM) of each daemon.
--write replaces the "Agent / whole path" section of docs/BENCHMARKS.md.

With --inner-tls it measures instead what `[tunnel] inner_tls = true` costs: two stacks side by
side, the same but for the inner TLS (mutual TLS 1.3 inside WireGuard between agent and relay),
both answered by the relay's echo model so the stand-in does not enter into it:
  * added latency (p50, p99) of small Converse calls, the two stacks alternating request by
    request, percentiles of the per-pair differences (inner TLS on minus off);
  * requests/s at saturation with loadgen, runs alternating between the stacks.
--write then replaces the "Inner TLS" section of docs/BENCHMARKS.md.
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
import agent_harness as a  # noqa: E402
import relay_harness as h  # noqa: E402
from botocore.auth import SigV4Auth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.credentials import Credentials  # noqa: E402

SECTION_START = "<!-- agent-benchmark:start -->"
SECTION_END = "<!-- agent-benchmark:end -->"
INNER_TLS_START = "<!-- inner-tls-benchmark:start -->"
INNER_TLS_END = "<!-- inner-tls-benchmark:end -->"
CONVERSE = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
STREAM = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream"
ECHO = "/model/xpart.echo/converse"
BODY = json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}], "inferenceConfig": {"maxTokens": 16}}).encode()
TOKEN = "xpart-benchmark-token"


class Client:
    """Sequential HTTP/1.1 keep-alive client over TLS with fixed headers per path."""

    def __init__(self, port, ca, headers_for):
        self.port = port
        self.context = ssl.create_default_context(cafile=ca)
        self.headers_for = headers_for
        self.conn = None

    def _conn(self):
        if self.conn is None:
            self.conn = http.client.HTTPSConnection("localhost", self.port, context=self.context, timeout=30)
        return self.conn

    def timed(self, path, first_byte=False):
        """Seconds to the whole answer (or to its first body byte)."""
        conn = self._conn()
        started = time.perf_counter()
        conn.request("POST", path, body=BODY, headers=self.headers_for(path))
        response = conn.getresponse()
        if first_byte:
            response.read(1)
            elapsed = time.perf_counter() - started
            response.read()
        else:
            response.read()
            elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}")
        return elapsed


def presigned(port):
    """Headers signed once with the relay's test key, as the relay would sign them."""
    cache = {}

    def headers_for(path):
        if path not in cache:
            host = f"{h.UPSTREAM_NAME}:{port}"
            request = AWSRequest(method="POST", url=f"https://{host}{path}", data=BODY,
                                 headers={"content-type": "application/json", "host": host})
            SigV4Auth(Credentials(*h.RELAY_KEY), "bedrock", h.REGION).add_auth(request)
            cache[path] = dict(request.headers.items())
        return cache[path]

    return headers_for


def bearer(path):
    return {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * p))]


def vm_hwm_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def inner_tls_files(directory):
    """A deployment CA and the two inner-TLS certificates, as `xpart ca issue --relay relay-a` and
    `--agent agent-test` make them (ECDSA P-256, names relay-a.relay.xpart / agent-test.agent.xpart)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench inner-TLS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_file = os.path.join(directory, "ca.pem")
    with open(ca_file, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    files = {}
    for side, name, usage in (("relay", "relay-a.relay.xpart", ExtendedKeyUsageOID.SERVER_AUTH),
                              ("agent", "agent-test.agent.xpart", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_file = os.path.join(directory, f"{side}.pem")
        with open(cert_file, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        key_file = a.write_key(os.path.join(directory, f"{side}.key"), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode())
        files[side] = (f'inner_tls = true\ninner_tls_cert_file = "{cert_file}"\n'
                       f'inner_tls_key_file = "{key_file}"\ninner_tls_ca_file = "{ca_file}"\n')
    return files


def with_inner_tls(path, lines):
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("[tunnel]\n", "[tunnel]\n" + lines, 1))


def start_stack(directory, standin_port, dns_port, pki, inner_tls=None):
    agent_private, agent_public = a.wg_keypair()
    agent_key = a.write_key(os.path.join(directory, "agent.key"), agent_private)
    relay_dir = os.path.join(directory, "relay")
    os.mkdir(relay_dir)
    private, public = a.wg_keypair()
    config = a.relay_userspace_config(
        relay_dir, standin_port, dns_port, pki["ca"],
        private_key_file=a.write_key(os.path.join(relay_dir, "relay.key"), private),
        tunnel_address=a.RELAY_TUNNELS[0], agent_public_key=agent_public,
        models=("anthropic.*", "xpart.echo"),
    )
    if inner_tls:
        with_inner_tls(config, inner_tls["relay"])
    env = h.relay_env(relay_dir, static_key=h.RELAY_KEY)
    env["RUST_LOG"] = "warn"
    relay = a.RelayProcess(config, env, os.path.join(relay_dir, "relay.log"))
    relay_obj = a.Relay("relay-a", relay_dir, relay, a.RELAY_TUNNELS[0], public)
    agent_config = a.agent_config(
        directory, relays=[relay_obj], private_key_file=agent_key, cert=pki["cert"], key=pki["key"],
        principals=a.principal("bench", token=TOKEN, models=["*"]),
    )
    if inner_tls:
        with_inner_tls(agent_config, inner_tls["agent"])
    os.environ["RUST_LOG"] = "warn"
    agent = a.AgentProcess(agent_config, os.path.join(directory, "agent.log"))
    agent.wait_ready()
    return agent, relay


def loadgen(agent_port, ca, seconds):
    binary = Path(h.bin_dir()) / "examples" / "loadgen"
    if not binary.exists():
        sys.exit(f"agent benchmark: {binary} is missing (cargo build --release -p xpart-agent --example loadgen)")
    out = subprocess.run(
        [str(binary), "--url", f"https://127.0.0.1:{agent_port}{ECHO}", "--server-name", "localhost",
         "--ca", ca, "--header", f"authorization: Bearer {TOKEN}", "--header", "content-type: application/json",
         "--body", BODY.decode(), "--connections", "2", "--streams", "32", "--seconds", str(seconds)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per column per round")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each saturation run")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--inner-tls", action="store_true", help="compare the whole path with the inner TLS on and off")
    args = parser.parse_args()
    for binary in (a.agent_binary(), h.relay_binary()):
        if not os.access(binary, os.X_OK):
            sys.exit(f"agent benchmark: {binary} is missing (build with --release, set XPART_BIN_DIR)")
    if args.inner_tls:
        return inner_tls_main(args)

    with tempfile.TemporaryDirectory(prefix="xpart-agent-bench-") as directory:
        pki = h.certs.make_test_pki(os.path.join(directory, "pki"), [h.UPSTREAM_NAME, "localhost"])
        dns = h.dns_server.TestDnsServer({h.UPSTREAM_NAME: "127.0.0.1"}).start()
        store = h.bedrock_standin.CredentialStore()
        store.add(*h.RELAY_KEY)
        standin = h.bedrock_standin.BedrockStandin(pki["cert"], pki["key"], store, h.REGION).start()
        agent, relay = start_stack(directory, standin.port, dns.address[1], pki)
        try:
            direct = Client(standin.port, pki["ca"], presigned(standin.port))
            whole = Client(agent.front[1], pki["ca"], bearer)
            for client in (direct, whole):  # warm up connections, pools, handshakes
                for path in (CONVERSE, STREAM):
                    for _ in range(20):
                        client.timed(path)
            # Request by request, alternating, so both columns see the same moments of a noisy
            # shared machine; the added latency is taken from the pairs.
            latency = {"direct": [], "whole": []}
            ttfb = {"direct": [], "whole": []}
            for _ in range(args.rounds):
                for i in range(args.requests):
                    latency["direct"].append(direct.timed(CONVERSE))
                    latency["whole"].append(whole.timed(CONVERSE))
                    if i % 3 == 0:
                        ttfb["direct"].append(direct.timed(STREAM, first_byte=True))
                        ttfb["whole"].append(whole.timed(STREAM, first_byte=True))
            standin.clear()
            saturation = [loadgen(agent.front[1], pki["ca"], args.seconds) for _ in range(max(1, args.rounds // 2))]
            rss = {"agent": vm_hwm_mb(agent.proc.pid), "relay": vm_hwm_mb(relay.proc.pid)}
        finally:
            agent.stop()
            relay.stop()
            standin.stop()
            dns.stop()

    ms = lambda s: s * 1000  # noqa: E731
    rows = []
    for label, data in (("Converse, whole request", latency), ("ConverseStream, first byte", ttfb)):
        d50, d99 = ms(percentile(data["direct"], 0.5)), ms(percentile(data["direct"], 0.99))
        w50, w99 = ms(percentile(data["whole"], 0.5)), ms(percentile(data["whole"], 0.99))
        added = [w - d for d, w in zip(data["direct"], data["whole"])]
        a50, a99 = ms(percentile(added, 0.5)), ms(percentile(added, 0.99))
        rows.append((label, d50, d99, w50, w99, a50, a99, len(data["whole"])))
    best = max(saturation, key=lambda r: r["rps"])
    rps_runs = ", ".join(f"{r['rps']:.0f}" for r in saturation)

    lines = [
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPUs "
        f"({cpu_model()}), {platform.system()} {platform.release()}.",
        "",
        f"Command: `XPART_BIN_DIR=target/release python3 tests/bench/agent.py --rounds {args.rounds} "
        f"--requests {args.requests} --seconds {args.seconds:g}` (release build; agent and relay in userspace "
        "WireGuard mode over 127.0.0.1; the stand-in is Python and checks every SigV4 signature).",
        "",
        "| small calls, sequential, HTTP/1.1 keep-alive, the two columns alternating request by request "
        "| stand-in alone p50 / p99 (ms) | whole path p50 / p99 (ms) "
        "| added p50 / p99 (ms, of the per-pair differences) | target added | pairs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, d50, d99, w50, w99, a50, a99, n in rows:
        target = "≤ 1 / ≤ 5" if label.startswith("Converse,") else "—"
        lines.append(f"| {label} | {d50:.2f} / {d99:.2f} | {w50:.2f} / {w99:.2f} | **{a50:.2f} / {a99:.2f}** | {target} | {n} |")
    lines += [
        "",
        "| saturation (echo model at the relay, HTTP/2, 2 connections × 32 streams) | figure | target |",
        "| --- | --- | --- |",
        f"| requests/s through agent → tunnel → relay (best of runs: {rps_runs}) | **{best['rps']:.0f}** | ≥ 2,000 |",
        f"| latency under that load p50 / p99 (ms) | {best['p50_ms']:.1f} / {best['p99_ms']:.1f} | — |",
        f"| errors during the runs | {sum(r['errors'] for r in saturation)} | 0 |",
        f"| peak RSS, xpart-agent / xpart-relay (MiB, VmHWM) | {rss['agent']:.1f} / {rss['relay']:.1f} | — |",
    ]
    lines += [
        "",
        "The whole path adds, per request: the agent's TLS termination, authentication and limits, HTTP/2 "
        "through two userspace WireGuard endpoints (each with its own TCP/IP stack) on one 2-core machine, "
        "the relay's policy check and SigV4 signing, and the relay's pooled TLS to the stand-in. The "
        "saturation figure uses the relay's echo model, so it measures agent, tunnel and relay without "
        "the Python stand-in, which manages only a few hundred signed requests per second.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(table, SECTION_START, SECTION_END, "Agent / whole path")


def inner_tls_main(args):
    with tempfile.TemporaryDirectory(prefix="xpart-inner-tls-bench-") as directory:
        pki = h.certs.make_test_pki(os.path.join(directory, "pki"), [h.UPSTREAM_NAME, "localhost"])
        dns = h.dns_server.TestDnsServer({h.UPSTREAM_NAME: "127.0.0.1"}).start()
        store = h.bedrock_standin.CredentialStore()
        store.add(*h.RELAY_KEY)
        standin = h.bedrock_standin.BedrockStandin(pki["cert"], pki["key"], store, h.REGION).start()
        stacks = {}
        try:
            for label, files in (("off", None), ("on", inner_tls_files(os.path.join(directory, "inner")))):
                stack_dir = os.path.join(directory, label)
                os.mkdir(stack_dir)
                stacks[label] = start_stack(stack_dir, standin.port, dns.address[1], pki, inner_tls=files)
            clients = {label: Client(agent.front[1], pki["ca"], bearer) for label, (agent, _) in stacks.items()}
            for client in clients.values():
                for _ in range(50):
                    client.timed(ECHO)
            latency = {"off": [], "on": []}
            for _ in range(args.rounds):
                for _ in range(args.requests):
                    for label in ("off", "on"):
                        latency[label].append(clients[label].timed(ECHO))
            rps = {"off": [], "on": []}
            for _ in range(max(1, args.rounds // 2)):
                for label in ("off", "on"):
                    rps[label].append(loadgen(stacks[label][0].front[1], pki["ca"], args.seconds))
        finally:
            for agent, relay in stacks.values():
                agent.stop()
                relay.stop()
            standin.stop()
            dns.stop()

    ms = lambda s: s * 1000  # noqa: E731
    added = [on - off for off, on in zip(latency["off"], latency["on"])]
    best = {label: max(runs, key=lambda r: r["rps"]) for label, runs in rps.items()}
    runs = {label: ", ".join(f"{r['rps']:.0f}" for r in runs) for label, runs in rps.items()}
    lines = [
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPUs "
        f"({cpu_model()}), {platform.system()} {platform.release()}.",
        "",
        f"Command: `XPART_BIN_DIR={os.path.relpath(h.bin_dir(), REPO)} python3 tests/bench/agent.py --inner-tls "
        f"--rounds {args.rounds} --requests {args.requests} --seconds {args.seconds:g}` (two stacks, agent and relay "
        "in userspace WireGuard mode over 127.0.0.1, the relay's echo model answering; the default build: ring).",
        "",
        "| small Converse calls, sequential, HTTP/1.1 keep-alive, alternating | inner TLS off p50 / p99 (ms) "
        "| inner TLS on p50 / p99 (ms) | added p50 / p99 (ms, per-pair differences) | pairs |",
        "| --- | --- | --- | --- | --- |",
        f"| echo model, whole path | {ms(percentile(latency['off'], 0.5)):.2f} / {ms(percentile(latency['off'], 0.99)):.2f} "
        f"| {ms(percentile(latency['on'], 0.5)):.2f} / {ms(percentile(latency['on'], 0.99)):.2f} "
        f"| **{ms(percentile(added, 0.5)):.2f} / {ms(percentile(added, 0.99)):.2f}** | {len(added)} |",
        "",
        "| saturation (echo model, HTTP/2, 2 connections × 32 streams) | inner TLS off | inner TLS on |",
        "| --- | --- | --- |",
        f"| requests/s, best of runs ({runs['off']} / {runs['on']}) | **{best['off']['rps']:.0f}** | **{best['on']['rps']:.0f}** |",
        f"| latency under that load p50 / p99 (ms) | {best['off']['p50_ms']:.1f} / {best['off']['p99_ms']:.1f} "
        f"| {best['on']['p50_ms']:.1f} / {best['on']['p99_ms']:.1f} |",
        f"| errors during the runs | {sum(r['errors'] for r in rps['off'])} | {sum(r['errors'] for r in rps['on'])} |",
        "",
        "The agent keeps one HTTP/2 connection per relay, so the inner TLS handshake happens once per "
        "connection; what a request pays is AES-GCM over its bytes on both sides and TLS records "
        "inside the tunnel's TCP.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(table, INNER_TLS_START, INNER_TLS_END, "Inner TLS (agent → relay)")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_section(table, start, end, heading):
    path = REPO / "docs" / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + section + after
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + section + "\n"
    path.write_text(text)
    print(f"\nwrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
