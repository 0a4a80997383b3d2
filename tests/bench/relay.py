#!/usr/bin/env python3
"""Relay request-path benchmark: small Converse calls to the Bedrock stand-in directly (the
client signs with botocore and speaks TLS) and through xpart-relay (plain HTTP to the relay,
which checks, signs, and forwards over pooled TLS), alternating in one run. Reports latency
p50/p99 of sequential calls, requests/s with concurrent clients, the relay's added latency,
and the relay's peak RSS (VmHWM). Loopback only; no root.

    cargo build --release -p xpart-relay
    XPART_BIN_DIR=target/release python3 tests/bench/relay.py [--rounds 3] [--requests 400]
        [--concurrency 8] [--seconds 5] [--write]

The stand-in is Python (it verifies every signature with botocore), so requests/s are bounded
by it in both columns; the added latency is the relay's cost. --write replaces the relay
section of docs/BENCHMARKS.md with the table.
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
import relay_harness as h  # noqa: E402
from botocore.auth import SigV4Auth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.credentials import Credentials  # noqa: E402

SECTION_START = "<!-- relay-benchmark:start -->"
SECTION_END = "<!-- relay-benchmark:end -->"
MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
PATH = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
BODY = json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}], "inferenceConfig": {"maxTokens": 16}}).encode()


class Direct:
    """Client straight to the stand-in: botocore SigV4 + TLS with the test CA."""

    name = "stand-in alone"

    def __init__(self, port, ca_file):
        self.port = port
        self.context = ssl.create_default_context(cafile=ca_file)
        self.signer = SigV4Auth(Credentials(*h.RELAY_KEY), "bedrock", h.REGION)
        self.host = f"{h.UPSTREAM_NAME}:{port}"
        self.headers = None
        self.signed_at = 0.0

    def connect(self):
        raw = socket.create_connection(("127.0.0.1", self.port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = http.client.HTTPSConnection(h.UPSTREAM_NAME, self.port, context=self.context)
        conn.sock = self.context.wrap_socket(raw, server_hostname=h.UPSTREAM_NAME)
        return conn

    def signed_headers(self):
        # Signed once and reused: the same body and path keep the signature valid for the
        # stand-in's 5-minute window, so the direct path carries no per-request signing cost.
        if self.headers is None or time.monotonic() - self.signed_at > 120:
            request = AWSRequest(method="POST", url=f"https://{self.host}{PATH}", data=BODY,
                                 headers={"content-type": "application/json"})
            self.signer.add_auth(request)
            self.headers = dict(request.headers.items())
            self.signed_at = time.monotonic()
        return self.headers

    def call(self, conn):
        conn.request("POST", PATH, body=BODY, headers=self.signed_headers())
        response = conn.getresponse()
        response.read()
        return response.status


class ThroughRelay:
    name = "through xpart-relay"

    def __init__(self, service):
        self.service = service

    def connect(self):
        conn = http.client.HTTPConnection(*self.service)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def call(self, conn):
        conn.request("POST", PATH, body=BODY, headers={"content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status


def sequential(client, count):
    conn = client.connect()
    for _ in range(20):  # warm the pools
        assert client.call(conn) == 200
    times = []
    for _ in range(count):
        started = time.perf_counter()
        status = client.call(conn)
        times.append(time.perf_counter() - started)
        assert status == 200, status
    conn.close()
    times.sort()
    return times[len(times) // 2] * 1000, times[int(len(times) * 0.99) - 1] * 1000


def throughput(client, concurrency, seconds):
    stop = time.monotonic() + seconds
    counts = [0] * concurrency
    errors = [0] * concurrency

    def worker(i):
        conn = client.connect()
        while time.monotonic() < stop:
            if client.call(conn) == 200:
                counts[i] += 1
            else:
                errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    if sum(errors):
        raise RuntimeError(f"{sum(errors)} failed requests")
    return sum(counts) / elapsed


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]

    binary = h.relay_binary()
    if not os.access(binary, os.X_OK):
        sys.exit(f"xpart-relay not found at {binary}; build it (cargo build --release -p xpart-relay) and set XPART_BIN_DIR")

    work = tempfile.mkdtemp(prefix="xpart-relay-bench-")
    pki = h.certs.make_test_pki(os.path.join(work, "pki"), [h.UPSTREAM_NAME])
    creds = os.path.join(work, "creds.json")
    with open(creds, "w") as f:
        json.dump({h.RELAY_KEY[0]: h.RELAY_KEY[1]}, f)
    dns = h.dns_server.TestDnsServer({h.UPSTREAM_NAME: "127.0.0.1"}).start()
    standin = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "standin" / "bedrock_standin.py"),
         "--cert", pki["cert"], "--key", pki["key"], "--credentials", creds],
        stdout=subprocess.PIPE,
    )
    relay = None
    try:
        port = json.loads(standin.stdout.readline())["port"]
        config = h.relay_config(work, port, dns.address[1], pki["ca"])
        env = h.relay_env(work, static_key=h.RELAY_KEY)
        env["RUST_LOG"] = "warn"
        relay = h.RelayProcess(config, env, os.path.join(work, "relay.log"))
        direct, relayed = Direct(port, pki["ca"]), ThroughRelay(relay.service)
        results = {direct.name: [], relayed.name: []}
        for round_number in range(args.rounds):
            for client in (direct, relayed) if round_number % 2 == 0 else (relayed, direct):
                p50, p99 = sequential(client, args.requests)
                rps = throughput(client, args.concurrency, args.seconds)
                results[client.name].append((p50, p99, rps))
                print(f"round {round_number + 1} {client.name:22} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  {rps:7.1f} req/s", flush=True)
        rss = peak_rss_mib(relay.proc.pid)
    finally:
        if relay:
            relay.stop()
        standin.terminate()
        standin.wait()
        dns.stop()

    med = {name: tuple(statistics.median(r[i] for r in rows) for i in range(3)) for name, rows in results.items()}
    d, r = med[direct.name], med[relayed.name]
    table = [
        "| path | p50 ms | p99 ms | requests/s |",
        "| --- | --- | --- | --- |",
        f"| {direct.name} (pre-signed, TLS, keep-alive) | {d[0]:.2f} | {d[1]:.2f} | {d[2]:.0f} |",
        f"| {relayed.name} (policy, SigV4, pooled TLS) | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.0f} |",
        f"| added by the relay | {r[0] - d[0]:+.2f} | {r[1] - d[1]:+.2f} | ratio {r[2] / d[2]:.2f} |",
        "",
        f"Relay peak RSS (VmHWM) over the run: {rss:.1f} MiB.",
    ]
    print("\n".join(table))
    if args.write:
        write_section(args, table)


def write_section(args, table):
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    section = "\n".join([
        SECTION_START,
        "## Relay",
        "",
        "Small Converse calls (one user message, JSON answer) against the Bedrock stand-in on loopback,",
        "directly and through `xpart-relay` (release build), alternating in one run; medians of",
        f"{args.rounds} rounds of {args.requests} sequential calls (latency) and {args.seconds:g} s with "
        f"{args.concurrency} concurrent keep-alive clients (requests/s).",
        "The stand-in is Python and verifies every SigV4 signature with botocore, so it bounds requests/s",
        "in both rows; the difference in latency is the relay's cost (plain HTTP in, check, SigV4,",
        "pooled TLS out, response relayed). The direct client reuses one signature (same body and path)",
        "and keeps its TLS connection open, so it pays only for the request itself. The load generator",
        "is Python threads in one process, which also caps requests/s; with the relay in the path the",
        "client's work is plain HTTP instead of TLS, so requests/s can come out higher through the relay.",
        "",
        *table,
        "",
        f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()} CPUs ({cpu}), 1-minute load average "
        f"{args.load_before:.1f} at the start (a shared build machine: expect noise, compare rows of one run), with:",
        f"`XPART_BIN_DIR=target/release python3 tests/bench/relay.py --rounds {args.rounds} --requests {args.requests} "
        f"--concurrency {args.concurrency} --seconds {args.seconds:g} --write`",
        SECTION_END,
    ])
    path = REPO / "docs" / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        _, after = rest.split(SECTION_END, 1)
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
