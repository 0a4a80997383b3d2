"""Network-namespace topology for the tunnel interop tests and the tunnel benchmark.

Two namespaces, "left" and "right", joined by one veth pair on 192.0.2.0/24 (TEST-NET-1, only
inside the namespaces). Each side runs one WireGuard peer: xpart's example peer
(`xpart-tunnel-peer`, kernel or userspace mode) or Debian's wireguard-go configured with `wg`.
Tunnel addresses are 100.64.0.1 (left) and 100.64.0.2 (right) in 100.64.0.0/30.
Everything is torn down on exit, including on failure.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LEFT_UNDERLAY, RIGHT_UNDERLAY = "192.0.2.1", "192.0.2.2"
LEFT_TUNNEL, RIGHT_TUNNEL = "100.64.0.1", "100.64.0.2"
WG_PORT = 51820
TOOLS = ("ip", "wg", "wireguard-go", "ping")


def missing_prerequisite():
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"needs `{tool}` (Debian: apt-get install wireguard-go wireguard-tools iproute2 iputils-ping)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (modprobe tun)"
    if peer_binary() is None:
        return ("needs the xpart tunnel peer example: "
                "cargo build -p xpart-tunnel --examples (looked in $XPART_BIN_DIR/examples)")
    return None


def peer_binary():
    bin_dir = Path(os.environ.get("XPART_BIN_DIR", REPO / "target" / "debug"))
    path = bin_dir / "examples" / "xpart-tunnel-peer"
    return path if path.exists() else None


def run(*args, check=True, **kwargs):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kwargs)


def genkey():
    private = run("wg", "genkey").stdout.strip()
    public = run("wg", "pubkey", input=private).stdout.strip()
    return private, public


class Topology:
    """Two namespaces joined by veth; use as a context manager."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.left = f"xpt-l{tag}"
        self.right = f"xpt-r{tag}"
        self.veth_left = f"xptl{tag}"
        self.veth_right = f"xptr{tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix="xpt-"))
        self.procs = []

    def __enter__(self):
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _create(self):
        for ns in (self.left, self.right):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", self.veth_left, "netns", self.left,
            "type", "veth", "peer", "name", self.veth_right, "netns", self.right)
        run("ip", "-n", self.left, "addr", "add", f"{LEFT_UNDERLAY}/24", "dev", self.veth_left)
        run("ip", "-n", self.right, "addr", "add", f"{RIGHT_UNDERLAY}/24", "dev", self.veth_right)
        run("ip", "-n", self.left, "link", "set", self.veth_left, "up")
        run("ip", "-n", self.right, "link", "set", self.veth_right, "up")

    def close(self):
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()
        for ns in (self.left, self.right):
            run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def exec(self, ns, *args, **kwargs):
        return run("ip", "netns", "exec", ns, *args, **kwargs)

    def spawn(self, ns, *args, env=None, name="proc"):
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(("ip", "netns", "exec", ns, *args), stdout=subprocess.PIPE,
                                stderr=log, text=True, env=env)
        proc.log_path = self.tmp / f"{name}.log"
        self.procs.append(proc)
        return proc

    def key_file(self, name, private):
        path = self.tmp / f"{name}.key"
        path.write_text(private + "\n")
        path.chmod(0o600)
        return path

    def start_wireguard_go(self, ns, interface, private, peer_public, address, peer_endpoint,
                           allowed_ip):
        """wireguard-go on `ns`, listening on WG_PORT, configured with `wg` like any WireGuard box."""
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1",
                   LOG_LEVEL="error")
        proc = self.spawn(ns, "wireguard-go", "-f", interface, env=env, name=f"wg-go-{ns}")
        wait_for(lambda: self.exec(ns, "ip", "link", "show", interface, check=False).returncode == 0,
                 f"wireguard-go creating {interface}", proc)
        key = self.key_file(f"wg-{ns}", private)
        args = ["wg", "set", interface, "private-key", str(key), "listen-port", str(WG_PORT),
                "peer", peer_public, "allowed-ips", allowed_ip]
        if peer_endpoint:
            args += ["endpoint", peer_endpoint]
        self.exec(ns, *args)
        self.exec(ns, "ip", "addr", "add", address, "dev", interface)
        self.exec(ns, "ip", "link", "set", interface, "mtu", "1420", "up")
        return proc

    def start_xpart(self, ns, mode, private, peer_public, address, peer_endpoint, allowed_ip,
                    interface=None, extra=()):
        """xpart's example peer on `ns`; returns once it printed `ready`."""
        key = self.key_file(f"xpart-{ns}", private)
        args = [str(peer_binary()), "--mode", mode, "--private-key-file", str(key),
                "--address", address, "--listen", f"0.0.0.0:{WG_PORT}",
                "--peer-public-key", peer_public, "--allowed-ip", allowed_ip, *extra]
        if peer_endpoint:
            args += ["--peer-endpoint", peer_endpoint]
        if interface:
            args += ["--interface", interface]
        proc = self.spawn(ns, *args, name=f"xpart-{ns}")
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            proc.wait(timeout=5)
            raise AssertionError(f"xpart-tunnel-peer did not start: {proc.log_path.read_text()}")
        return proc


def stop(proc):
    """SIGTERM, then the stdout that the process printed on the way out."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read() if proc.stdout and not proc.stdout.closed else ""


def wait_for(predicate, what, proc=None, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited: {proc.log_path.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def tcp_script():
    return str(Path(__file__).with_name("tunnel_tcp.py"))
