#!/usr/bin/env python3
"""Tunnel throughput benchmark: iperf3 TCP through xpart vs through the reference peers, side by
side in one run (alternating, medians, ratio). Root only; uses the namespace topology of
tests/netns/tunnel_netns.py (two namespaces joined by veth, 192.0.2.0/24 underlay, 100.64.0.0/30
tunnel; nothing leaves the namespaces).

    cargo build --release -p xpart-tunnel --examples
    XPART_BIN_DIR=target/release python3 tests/bench/tunnel.py [--rounds 3] [--seconds 5] [--write]

Cases (each with 1 and 4 parallel streams):
  kernel:    xpart kernel mode <-> xpart kernel mode  vs  wireguard-go <-> wireguard-go
  userspace: xpart userspace mode (TCP forward) -> wireguard-go  vs  onetun -> wireguard-go
             (iperf3 connects to a forwarded port on the left; the server sits behind wireguard-go)
--write replaces the tunnel section of docs/BENCHMARKS.md with the table.

With --tls it measures instead what TLS inside the tunnel costs in bulk (the inner TLS's
price for large bodies): one TCP stream through a wireguard-go pair, plain against TLS 1.3
(AES-GCM, P-256), the same Python sender and sink at both ends (1 MiB writes and reads, so
OpenSSL does the per-byte work; --seconds × 40 MiB per transfer), alternating; --write then replaces the "Tunnel + TLS" section.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "netns"))
import tunnel_netns as tn  # noqa: E402
from tunnel_netns import LEFT_TUNNEL, LEFT_UNDERLAY, RIGHT_TUNNEL, RIGHT_UNDERLAY, WG_PORT  # noqa: E402

IPERF_PORT = 5201
FORWARD_PORT = 7000
SECTION_START = "<!-- tunnel-benchmark:start -->"
SECTION_END = "<!-- tunnel-benchmark:end -->"
TLS_SECTION_START = "<!-- tunnel-tls-benchmark:start -->"
TLS_SECTION_END = "<!-- tunnel-tls-benchmark:end -->"
BULK_PORT = 7443
# Bytes per transfer: about --seconds at 0.3 Gbit/s (wireguard-go on a small machine).
BULK_MIB_PER_SECOND = 40
# One bulk transfer of a given number of MiB: `send` writes them, `sink` times their arrival,
# answers one byte and prints bits/s. TLS 1.3 only when the mode is "tls".
BULK = r'''
import socket, ssl, sys, time
role, mode, host, port, mib, cert, key = sys.argv[1:8]
port, mib = int(port), int(mib)
def tls_context(server):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ecdh_curve("prime256v1")
    if server:
        ctx.load_cert_chain(cert, key)
    else:
        ctx.load_verify_locations(cert)
        ctx.check_hostname = False
    return ctx
if role == "sink":
    listener = socket.create_server((host, port))
    print("listening", flush=True)
    conn, _ = listener.accept()
    if mode == "tls":
        conn = tls_context(True).wrap_socket(conn, server_side=True)
    buf = bytearray(1 << 20)
    expected = mib << 20
    total, start = 0, None
    while total < expected:
        n = conn.recv_into(buf)
        if not n:
            break
        if start is None:
            start = time.monotonic()
        total += n
    elapsed = time.monotonic() - start
    conn.sendall(b"k")
    cipher = conn.cipher()[0] if mode == "tls" else "-"
    print(f"{total * 8 / elapsed} {cipher}", flush=True)
    conn.recv(1)
else:
    conn = socket.create_connection((host, port))
    if mode == "tls":
        conn = tls_context(False).wrap_socket(conn)
    chunk = bytes(1 << 20)
    for _ in range(mib):
        conn.sendall(chunk)
    conn.recv(1)
    conn.close()
'''


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--skip-userspace", action="store_true")
    parser.add_argument("--tls", action="store_true", help="bulk through WireGuard + TLS 1.3 vs WireGuard alone")
    args = parser.parse_args()
    args.load_at_start = os.getloadavg()[0]
    if args.tls:
        return tls_main(args)

    problem = tn.missing_prerequisite()
    if problem is None and shutil.which("iperf3") is None:
        problem = "needs iperf3"
    if problem:
        sys.exit(f"tunnel benchmark: {problem}")

    cases = [
        ("kernel", "wireguard-go <-> wireguard-go", setup_wg_pair),
        ("kernel", "xpart kernel <-> xpart kernel", setup_xpart_kernel_pair),
    ]
    onetun = shutil.which("onetun") or str(Path.home() / ".cargo/bin/onetun")
    onetun_note = None
    if not args.skip_userspace:
        cases.append(("userspace", "xpart userspace -> wireguard-go", setup_xpart_userspace))
        if os.path.exists(onetun):
            cases.append(("userspace", "onetun -> wireguard-go", lambda topo: setup_onetun(topo, onetun)))
        else:
            onetun_note = "onetun not installed (`cargo install onetun`); not measured"

    results = {(case[1], streams): [] for case in cases for streams in (1, 4)}
    for round_no in range(1, args.rounds + 1):
        for _group, name, setup in cases:
            for streams in (1, 4):
                with tn.Topology() as topo:
                    target = setup(topo)
                    bps = iperf(topo, target, streams, args.seconds)
                results[(name, streams)].append(bps)
                shown = "failed" if bps is None else f"{bps / 1e9:6.3f} Gbit/s"
                print(f"round {round_no}  {name:36s} P{streams}  {shown}", flush=True)

    table = render(cases, results, args, onetun_note)
    print()
    print(table)
    if args.write:
        write_section(table, SECTION_START, SECTION_END, "Tunnel throughput")


def tls_main(args):
    problem = tn.missing_prerequisite()
    if problem:
        sys.exit(f"tunnel benchmark: {problem}")
    results = {"plain": [], "tls": []}
    cipher = "-"
    for round_no in range(1, args.rounds + 1):
        for mode in ("plain", "tls"):
            with tn.Topology() as topo:
                setup_wg_pair(topo)
                cert, key = bulk_certificate(topo.tmp)
                mib = str(args.seconds * BULK_MIB_PER_SECOND)
                sink = topo.spawn(topo.right, sys.executable, "-c", BULK, "sink", mode, RIGHT_TUNNEL,
                                  str(BULK_PORT), mib, cert, key, name="bulk-sink")
                tn.wait_for(lambda: sink.stdout.readline().startswith("listening"), "bulk sink", sink)
                topo.exec(topo.left, sys.executable, "-c", BULK, "send", mode, RIGHT_TUNNEL, str(BULK_PORT),
                          mib, cert, key, timeout=args.seconds * 20 + 60)
                bps, shown_cipher = sink.stdout.readline().split()
                sink.wait(timeout=30)
            results[mode].append(float(bps))
            if mode == "tls":
                cipher = shown_cipher
            print(f"round {round_no}  wireguard-go pair, {mode:5s}  {float(bps) / 1e9:6.3f} Gbit/s", flush=True)
    plain, tls = statistics.median(results["plain"]) / 1e9, statistics.median(results["tls"]) / 1e9
    runs = {m: ", ".join(f"{v / 1e9:.3f}" for v in values) for m, values in results.items()}
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    table = "\n".join([
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
        f"`nproc` = {os.cpu_count()}, {cpu}; wireguard-go {wg_go_version()}; "
        f"1-minute load average {args.load_at_start:.2f} at the start.",
        "",
        f"Command: `python3 tests/bench/tunnel.py --tls --rounds {args.rounds} --seconds {args.seconds}` (root; "
        "two namespaces joined by veth, a wireguard-go pair, one TCP stream, the same Python sender and "
        f"sink with 1 MiB writes and reads, {args.seconds * BULK_MIB_PER_SECOND} MiB per transfer; "
        f"TLS 1.3 negotiated {cipher} over P-256).",
        "",
        "| one TCP stream through WireGuard | median Gbit/s | runs |",
        "| --- | ---: | --- |",
        f"| WireGuard alone | {plain:.3f} | {runs['plain']} |",
        f"| WireGuard + TLS 1.3 | {tls:.3f} | {runs['tls']} |",
        "",
        f"- WireGuard + TLS / WireGuard alone: **{tls / plain:.2f}x**",
    ])
    print()
    print(table)
    if args.write:
        write_section(table, TLS_SECTION_START, TLS_SECTION_END, "Tunnel + TLS (bulk)")


def bulk_certificate(directory):
    """A self-signed P-256 certificate for the bulk sink (the client trusts exactly it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bulk")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_file, key_file = Path(directory) / "bulk.pem", Path(directory) / "bulk.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def setup_wg_pair(topo):
    left_priv, left_pub = tn.genkey()
    right_priv, right_pub = tn.genkey()
    topo.start_wireguard_go(topo.right, "xptwgr", right_priv, left_pub, f"{RIGHT_TUNNEL}/30",
                            f"{LEFT_UNDERLAY}:{WG_PORT}", f"{LEFT_TUNNEL}/32")
    topo.start_wireguard_go(topo.left, "xptwgl", left_priv, right_pub, f"{LEFT_TUNNEL}/30",
                            f"{RIGHT_UNDERLAY}:{WG_PORT}", f"{RIGHT_TUNNEL}/32")
    return ("left", RIGHT_TUNNEL, IPERF_PORT)


def setup_xpart_kernel_pair(topo):
    left_priv, left_pub = tn.genkey()
    right_priv, right_pub = tn.genkey()
    topo.start_xpart(topo.right, "kernel", right_priv, left_pub, f"{RIGHT_TUNNEL}/30",
                     f"{LEFT_UNDERLAY}:{WG_PORT}", f"{LEFT_TUNNEL}/32", interface="xptkr")
    topo.start_xpart(topo.left, "kernel", left_priv, right_pub, f"{LEFT_TUNNEL}/30",
                     f"{RIGHT_UNDERLAY}:{WG_PORT}", f"{RIGHT_TUNNEL}/32", interface="xptkl")
    return ("left", RIGHT_TUNNEL, IPERF_PORT)


def setup_xpart_userspace(topo):
    left_priv, left_pub = tn.genkey()
    right_priv, right_pub = tn.genkey()
    topo.start_wireguard_go(topo.right, "xptwgr", right_priv, left_pub, f"{RIGHT_TUNNEL}/30",
                            f"{LEFT_UNDERLAY}:{WG_PORT}", f"{LEFT_TUNNEL}/32")
    topo.start_xpart(topo.left, "userspace", left_priv, right_pub, f"{LEFT_TUNNEL}/30",
                     f"{RIGHT_UNDERLAY}:{WG_PORT}", f"{RIGHT_TUNNEL}/32",
                     extra=("--forward", f"127.0.0.1:{FORWARD_PORT}={RIGHT_TUNNEL}:{IPERF_PORT}"))
    return ("left", "127.0.0.1", FORWARD_PORT)


def setup_onetun(topo, onetun):
    left_priv, left_pub = tn.genkey()
    right_priv, right_pub = tn.genkey()
    topo.start_wireguard_go(topo.right, "xptwgr", right_priv, left_pub, f"{RIGHT_TUNNEL}/30",
                            f"{LEFT_UNDERLAY}:{WG_PORT}", f"{LEFT_TUNNEL}/32")
    proc = topo.spawn(topo.left, onetun, "--endpoint-addr", f"{RIGHT_UNDERLAY}:{WG_PORT}",
                      "--endpoint-public-key", right_pub, "--private-key", left_priv,
                      "--source-peer-ip", LEFT_TUNNEL, "--keep-alive", "10",
                      f"127.0.0.1:{FORWARD_PORT}:{RIGHT_TUNNEL}:{IPERF_PORT}", name="onetun")
    tn.wait_for(lambda: port_open(topo, topo.left, "127.0.0.1", FORWARD_PORT), "onetun listening", proc)
    return ("left", "127.0.0.1", FORWARD_PORT)


def port_open(topo, ns, host, port):
    code = f"import socket; socket.create_connection(({host!r}, {port}), timeout=1).close()"
    return topo.exec(ns, "python3", "-c", code, check=False).returncode == 0


def iperf(topo, target, streams, seconds):
    _side, host, port = target
    server = topo.spawn(topo.right, "iperf3", "-s", "-1", "-B", RIGHT_TUNNEL, "-p", str(IPERF_PORT),
                        name="iperf3-server")
    tn.wait_for(lambda: port_open_right(topo), "iperf3 server", server)
    try:
        result = topo.exec(topo.left, "iperf3", "-c", host, "-p", str(port), "-t", str(seconds),
                           "-P", str(streams), "-J", check=False, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        print(f"iperf3 -P {streams} through {host}:{port} did not finish", file=sys.stderr)
        return None
    try:
        report = json.loads(result.stdout)
        return report["end"]["sum_received"]["bits_per_second"]
    except (ValueError, KeyError):
        print(f"iperf3 failed: {result.stdout[-500:]} {result.stderr[-500:]}", file=sys.stderr)
        return None


def port_open_right(topo):
    out = topo.exec(topo.right, "ss", "-ltn", check=False).stdout
    return f"{RIGHT_TUNNEL}:{IPERF_PORT}" in out


def render(cases, results, args, onetun_note):
    def median(name, streams):
        """Median of the runs that finished (Gbit/s), or None when none did."""
        values = [v for v in results[(name, streams)] if v is not None]
        return statistics.median(values) / 1e9 if values else None

    def show(value):
        return "failed" if value is None else f"{value:.3f}"

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    lines = [
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
        f"`nproc` = {os.cpu_count()}, {cpu}; wireguard-go {wg_go_version()}; "
        f"1-minute load average {args.load_at_start:.2f} at the start.",
        "",
        f"Command: `cargo build --release -p xpart-tunnel --examples && "
        f"XPART_BIN_DIR=target/release python3 tests/bench/tunnel.py --rounds {args.rounds} "
        f"--seconds {args.seconds}{' --write' if args.write else ''}`",
        "",
        f"iperf3 TCP, {args.seconds} s per run, {args.rounds} alternating rounds, median Gbit/s "
        "(each run in a fresh pair of namespaces).",
        "",
        "| case | 1 stream | 4 streams | runs (1 stream) | runs (4 streams) |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for _group, name, _setup in cases:
        runs1 = ", ".join(show(None if v is None else v / 1e9) for v in results[(name, 1)])
        runs4 = ", ".join(show(None if v is None else v / 1e9) for v in results[(name, 4)])
        lines.append(f"| {name} | {show(median(name, 1))} | {show(median(name, 4))} | {runs1} | {runs4} |")
    lines.append("")
    names = [c[1] for c in cases]
    pairs = [("xpart kernel <-> xpart kernel", "wireguard-go <-> wireguard-go"),
             ("xpart userspace -> wireguard-go", "onetun -> wireguard-go")]
    for ours, theirs in pairs:
        if ours in names and theirs in names:
            for streams in (1, 4):
                base, value = median(theirs, streams), median(ours, streams)
                if base and value is not None:
                    lines.append(f"- {ours} / {theirs}, {streams} stream(s): **{value / base:.2f}x**")
                else:
                    lines.append(f"- {ours} / {theirs}, {streams} stream(s): no ratio "
                                 f"({theirs if not base else ours} did not finish)")
    if onetun_note:
        lines.append(f"- onetun: {onetun_note}")
    lines += ["", "Against issue 2's targets, by the medians above:"]
    lines += [target_line(check, median) for check in TARGETS]
    return "\n".join(lines)


# (what, case, streams, compared with: a case name for a ratio, or a figure in Gbit/s)
TARGETS = [
    ("kernel mode at least 2x wireguard-go", "xpart kernel <-> xpart kernel", 1, "wireguard-go <-> wireguard-go"),
    ("kernel mode at least 2x wireguard-go", "xpart kernel <-> xpart kernel", 4, "wireguard-go <-> wireguard-go"),
    ("kernel mode above 1.25 Gbit/s", "xpart kernel <-> xpart kernel", 1, 1.25),
    ("kernel mode above 1.25 Gbit/s", "xpart kernel <-> xpart kernel", 4, 1.25),
    ("userspace mode at least 0.35 Gbit/s", "xpart userspace -> wireguard-go", 1, 0.35),
    ("userspace mode at least 0.35 Gbit/s", "xpart userspace -> wireguard-go", 4, 0.35),
]


def target_line(check, median):
    what, case, streams, against = check
    try:
        value = median(case, streams)
        base = median(against, streams) if isinstance(against, str) else against
    except KeyError:
        return f"- {what}, {streams} stream(s): not measured in this run"
    if value is None or base is None:
        return f"- {what}, {streams} stream(s): no figure (a run did not finish)"
    if isinstance(against, str):
        ratio = value / base
        verdict = "met" if ratio >= 2 else "missed"
        return f"- {what}, {streams} stream(s): {verdict} ({ratio:.2f}x)"
    verdict = "met" if value >= base else "missed"
    return f"- {what}, {streams} stream(s): {verdict} ({value:.3f} Gbit/s)"


def wg_go_version():
    out = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"v[\d.]+", out)
    return match.group(0) if match else "unknown"


def write_section(table, start, end, heading):
    path = tn.REPO / "docs" / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        before = text.split(start)[0]
        after = text.split(end, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + section + "\n"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
