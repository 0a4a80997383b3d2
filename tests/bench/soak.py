#!/usr/bin/env python3
"""Soak: CONCURRENCY ConverseStream calls on the relay's echo model kept in flight for MINUTES,
caller → xpart-agent (TLS front) → WireGuard in userspace mode (UDP on 127.0.0.1) →
xpart-relay, the same loopback stack as tests/bench/agent.py (whose setup it reuses). No root.

    cargo build --release -p xpart-agent -p xpart-relay
    cargo build --release -p xpart-agent --example loadgen
    XPART_BIN_DIR=target/release python3 tests/bench/soak.py [--minutes 10] [--concurrency 1000]
        [--connections 10] [--write]

agent/examples/loadgen.rs keeps the calls in flight over HTTP/2 (CONNECTIONS connections, an
equal share of the streams on each, every stream starting its next call as soon as the last
one ends) and times each call to its first event-stream bytes. Every 10 s the script records
the calls finished, errors, TTFB p50 / p99 of that window, and both daemons' resident memory
(VmRSS). Verdict: errors must be 0, and memory is flat when each daemon's peak RSS in the last
minute is within 10 % of its peak in the second minute (the first minute is warm-up: pools,
buffers and allocator arenas grow to the load). Runs shorter than 3 minutes are not judged.
Exits 1 when there were errors or memory was not flat.

--write replaces the "Soak" section of docs/BENCHMARKS.md.
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import agent as bench  # noqa: E402  (tests/bench/agent.py: stack setup and helpers)

a, h = bench.a, bench.h
REPO = bench.REPO
SECTION_START = "<!-- soak-benchmark:start -->"
SECTION_END = "<!-- soak-benchmark:end -->"
ECHO_STREAM = "/model/xpart.echo/converse-stream"
INTERVAL = 10.0
FLAT_TOLERANCE = 0.10


def vm_rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def loadgen_command(agent_port, ca, args, streams):
    binary = Path(h.bin_dir()) / "examples" / "loadgen"
    if not binary.exists():
        sys.exit(f"soak: {binary} is missing (cargo build --release -p xpart-agent --example loadgen)")
    return [
        str(binary), "--url", f"https://127.0.0.1:{agent_port}{ECHO_STREAM}", "--server-name", "localhost",
        "--ca", ca, "--header", f"authorization: Bearer {bench.TOKEN}",
        "--header", "content-type: application/json", "--body", bench.BODY.decode(),
        "--connections", str(args.connections), "--streams", str(streams),
        "--seconds", str(args.minutes * 60), "--interval", str(INTERVAL), "--first-byte",
    ]


def soak(agent, relay, ca, args, streams):
    """Run the load, sampling memory at each window the load generator reports."""
    command = loadgen_command(agent.front[1], ca, args, streams)
    samples = []
    total = None
    started = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as load:
        for line in load.stdout:
            record = json.loads(line)
            if "window_end" not in record:
                total = record
                continue
            record["agent_rss"] = vm_rss_mb(agent.proc.pid)
            record["relay_rss"] = vm_rss_mb(relay.proc.pid)
            samples.append(record)
            print(row(record), flush=True)
            if agent.proc.poll() is not None or relay.proc.poll() is not None:
                load.kill()
                sys.exit("soak: a daemon exited during the run (see its log above)")
    if load.returncode != 0 or total is None:
        sys.exit(f"soak: the load generator failed with status {load.returncode}")
    total["elapsed"] = time.monotonic() - started
    return samples, total


def row(s):
    return (f"| {s['window_end']:.0f} | {s['requests']} | {s['errors']} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} "
            f"| {s['agent_rss']:.1f} | {s['relay_rss']:.1f} |")


def verdict(samples, minutes):
    """Per daemon: (peak RSS in the second minute, in the last minute, flat?), or None when the run
    is too short to have a second minute apart from the last."""
    if minutes < 3:
        return None
    end = minutes * 60
    second = [s for s in samples if 60 < s["window_end"] <= 120 + 1]
    last = [s for s in samples if end - 60 < s["window_end"]]
    if not second or not last:
        return None
    judged = {}
    for daemon in ("agent", "relay"):
        early = max(s[f"{daemon}_rss"] for s in second)
        late = max(s[f"{daemon}_rss"] for s in last)
        judged[daemon] = (early, late, late <= early * (1 + FLAT_TOLERANCE))
    return judged


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=1000, help="calls kept in flight")
    parser.add_argument("--connections", type=int, default=10, help="HTTP/2 connections sharing them")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.write and Path(h.bin_dir()).name != "release":
        sys.exit("soak: --write records figures only from a release build (XPART_BIN_DIR=target/release)")
    if args.concurrency < 1 or args.connections < 1 or args.minutes <= 0:
        sys.exit("soak: --minutes, --concurrency and --connections must be positive")
    streams = math.ceil(args.concurrency / args.connections)
    in_flight = streams * args.connections
    for binary in (a.agent_binary(), h.relay_binary()):
        if not os.access(binary, os.X_OK):
            sys.exit(f"soak: {binary} is missing (build with --release, set XPART_BIN_DIR)")

    with tempfile.TemporaryDirectory(prefix="xpart-soak-") as directory:
        pki = h.certs.make_test_pki(os.path.join(directory, "pki"), [h.UPSTREAM_NAME, "localhost"])
        dns = h.dns_server.TestDnsServer({h.UPSTREAM_NAME: "127.0.0.1"}).start()
        store = h.bedrock_standin.CredentialStore()
        store.add(*h.RELAY_KEY)
        # The relay needs an upstream to start; the echo model never reaches it.
        standin = h.bedrock_standin.BedrockStandin(pki["cert"], pki["key"], store, h.REGION).start()
        agent, relay = bench.start_stack(directory, standin.port, dns.address[1], pki)
        try:
            print(f"soak: {in_flight} ConverseStream calls in flight ({args.connections} connections × "
                  f"{streams} streams) for {args.minutes:g} min", flush=True)
            print("| t (s) | calls | errors | TTFB p50 / p99 (ms) | agent RSS (MiB) | relay RSS (MiB) |", flush=True)
            samples, total = soak(agent, relay, pki["ca"], args, streams)
            audit_mb = {
                "agent": os.path.getsize(os.path.join(directory, "audit.jsonl")) / 2**20,
                "relay": os.path.getsize(os.path.join(directory, "relay", "audit.jsonl")) / 2**20,
            }
        finally:
            agent.stop()
            relay.stop()
            standin.stop()
            dns.stop()

    judged = verdict(samples, args.minutes)
    errors = total["errors"]
    table = report(args, in_flight, streams, samples, total, judged, audit_mb)
    print()
    print(table)
    if args.write:
        bench.write_section(table, SECTION_START, SECTION_END, "Soak")
    flat = judged is None or all(ok for _, _, ok in judged.values())
    sys.exit(0 if errors == 0 and flat else 1)


def report(args, in_flight, streams, samples, total, judged, audit_mb):
    errors = total["errors"]
    lines = [
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPUs "
        f"({bench.cpu_model()}), {platform.system()} {platform.release()}.",
        "",
        f"Command: `XPART_BIN_DIR={bin_dir_shown()} python3 tests/bench/soak.py --minutes {args.minutes:g} "
        f"--concurrency {args.concurrency} --connections {args.connections} --write` ({build_kind()} build; agent and "
        "relay in userspace WireGuard mode over 127.0.0.1; the relay's echo model answers; the load generator "
        "is agent/examples/loadgen.rs on the same machine).",
        "",
        "| figure | value | target |",
        "| --- | --- | --- |",
        f"| ConverseStream calls in flight ({args.connections} HTTP/2 connections × {streams} streams) "
        f"| {in_flight} | 1,000 |",
        f"| calls completed in {total['seconds']:.0f} s | {total['requests']:,} "
        f"({total['rps']:.0f}/s) | — |",
        f"| errors | **{errors}** | 0 |",
        f"| TTFB over the whole run, p50 / p99 (ms) | {total['p50_ms']:.1f} / {total['p99_ms']:.1f} | — |",
    ]
    if judged is None:
        lines.append("| memory flat (last minute's peak RSS within 10 % of the second minute's) "
                     "| not judged: the run is shorter than 3 minutes | flat |")
    else:
        for daemon, (early, late, ok) in judged.items():
            change = (late / early - 1) * 100 if early else float("nan")
            lines.append(f"| xpart-{daemon} peak RSS, second minute → last minute (MiB) "
                         f"| {early:.1f} → {late:.1f} ({change:+.1f} %): **{'flat' if ok else 'GROWING'}** "
                         f"| within 10 % |")
    lines.append(f"| audit log written, agent / relay (MiB) | {audit_mb['agent']:.0f} / {audit_mb['relay']:.0f} | — |")
    lines += [
        "",
        "Every 10 s (calls and TTFB of that window; RSS sampled at its end):",
        "",
        "| t (s) | calls | errors | TTFB p50 / p99 (ms) | agent RSS (MiB) | relay RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [row(s) for s in samples]
    return "\n".join(lines)


def build_kind():
    return "release" if Path(h.bin_dir()).name == "release" else "DEBUG (not a benchmark figure)"


def bin_dir_shown():
    directory = Path(h.bin_dir()).resolve()
    try:
        return str(directory.relative_to(REPO))
    except ValueError:
        return str(directory)


if __name__ == "__main__":
    main()
