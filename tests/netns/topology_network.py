"""The namespaces, links and addresses of the whole-topology test, and the means to act in them.

    caller ─┐                        ┌─ wan0 relay-a ─ vpc0 ─┐
    agent-a ├─ br-lan ── inet ───────┤                       ├─ br-vpc ── vpc (DNS, Bedrock stand-in)
    agent-b ┘  192.0.2.0/24 (router) └─ wan0 relay-b ─ vpc0 ─┘  198.51.100.0/24
               "GovCloud subnet"      203.0.113.0/30, .4/30      "Commercial VPC"
                                      "the internet"

Every address is a documentation range (RFC 5737) or the tunnel's 100.64.0.0/24, and lives only
inside namespaces this module creates; nothing routes out of them (the namespaces have no link to
the host). The caller has no route beyond its subnet: it reaches Bedrock only through an agent.
The floating service address moves between the agents' LAN interfaces as an EC2 secondary
private IP would; the agents bind it before they hold it (`ip_nonlocal_bind`).

`Topology(zones=True)` builds the multi-az variant: agent-c and relay-c besides, no floating
address, and a namespace "lb" on the agents' subnet holding the balancer's two addresses
(BALANCER), where test_topology_zones.py runs topology_balancer.py.

`Topology` is a context manager that removes every namespace, its `/etc/netns/<ns>` directory
and every process it started, on success and on failure.
"""

import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

LAN = "192.0.2.0/24"
ROUTER_LAN = "192.0.2.1"
CALLER = "192.0.2.10"
AGENT_LAN = {"agent-a": "192.0.2.11", "agent-b": "192.0.2.12", "agent-c": "192.0.2.13"}
FLOATING = "192.0.2.100"
# The zones topology's load balancer: one address per "zone", as the NLB has (NlbAddresses).
BALANCER = ("192.0.2.201", "192.0.2.202")
RELAY_WAN = {"relay-a": ("203.0.113.1", "203.0.113.2"), "relay-b": ("203.0.113.5", "203.0.113.6"),
             "relay-c": ("203.0.113.9", "203.0.113.10")}
VPC_HOST = "198.51.100.10"
RELAY_VPC = {"relay-a": "198.51.100.11", "relay-b": "198.51.100.12", "relay-c": "198.51.100.13"}
TUNNEL_PREFIX = 24
AGENT_TUNNEL = {"agent-a": "100.64.0.1", "agent-b": "100.64.0.2", "agent-c": "100.64.0.3"}
RELAY_TUNNEL = {"relay-a": "100.64.0.11", "relay-b": "100.64.0.12", "relay-c": "100.64.0.13"}
WG_PORT = 51820

# The pair: two agents sharing the floating address, two relays. The zones: three agents all
# serving behind the balancer ("lb"), three relays; a zone is one agent and one relay.
PAIR = {"agents": ("agent-a", "agent-b"), "relays": ("relay-a", "relay-b")}
ZONES = {"agents": ("agent-a", "agent-b", "agent-c"), "relays": ("relay-a", "relay-b", "relay-c")}
TOOLS = ("ip", "tc")
CLONE_NEWNET = 0x40000000


def missing_prerequisite():
    """Why the topology cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices, tc)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"needs `{tool}` (Debian: apt-get install iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun for kernel-mode WireGuard (modprobe tun)"
    return None


def run(*args, check=True, timeout=20, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


class Topology:
    """The namespaces wired as in the module docstring (`zones`: three agents behind the balancer
    and three relays instead of the pair); use as a context manager."""

    def __init__(self, zones=False):
        self.zones = zones
        plan = ZONES if zones else PAIR
        self.agents, self.relays = plan["agents"], plan["relays"]
        roles = ("caller", *self.agents, *(("lb",) if zones else ()), "inet", *self.relays, "vpc")
        self.tag = f"{os.getpid() % 100000}{'z' if zones else ''}"
        self.ns = {role: f"xtp{self.tag}-{role}" for role in roles}
        self.tmp = Path(tempfile.mkdtemp(prefix="xtp-"))
        self.procs = []
        self.floating_holder = None

    def __enter__(self):
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()
        for name in self.ns.values():
            run("ip", "netns", "del", name, check=False)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def ip(self, role, *args, check=True):
        return run("ip", "-n", self.ns[role], *args, check=check)

    def sysctl(self, role, key, value):
        """Set a per-namespace sysctl (/proc/sys/net follows the writer's namespace); no procps needed."""
        path = "/proc/sys/" + key.replace(".", "/")
        run("ip", "netns", "exec", self.ns[role], "sh", "-c", f"echo {value} > {path}")

    def _create(self):
        for role, name in self.ns.items():
            run("ip", "netns", "add", name)
            self.ip(role, "link", "set", "lo", "up")
        self._bridge("inet", "br-lan", f"{ROUTER_LAN}/24")
        self._port("caller", "inet", "br-lan", f"{CALLER}/24")
        for agent in self.agents:
            address = AGENT_LAN[agent]
            self._port(agent, "inet", "br-lan", f"{address}/24")
            self.ip(agent, "route", "add", "default", "via", ROUTER_LAN)
            # Lets the standby's agent bind the floating address before it holds it.
            self.sysctl(agent, "net.ipv4.ip_nonlocal_bind", 1)
        self._bridge("vpc", "br-vpc", f"{VPC_HOST}/24")
        for relay in self.relays:
            router_side, relay_side = RELAY_WAN[relay]
            router_dev = f"wan-{relay[-1]}"
            self._veth("inet", router_dev, relay, "wan0")
            self.ip("inet", "addr", "add", f"{router_side}/30", "dev", router_dev)
            self.ip(relay, "addr", "add", f"{relay_side}/30", "dev", "wan0")
            self.ip(relay, "route", "add", LAN, "via", router_side)
            self._port(relay, "vpc", "br-vpc", f"{RELAY_VPC[relay]}/24", dev="vpc0")
        self.sysctl("inet", "net.ipv4.ip_forward", 1)
        if self.zones:
            self._port("lb", "inet", "br-lan", f"{BALANCER[0]}/24")
            for address in BALANCER[1:]:
                self.ip("lb", "addr", "add", f"{address}/24", "dev", "lan0")
        else:
            self.move_floating("agent-a")
        self._write_caller_resolver()

    def _bridge(self, role, name, address):
        self.ip(role, "link", "add", name, "type", "bridge")
        self.ip(role, "addr", "add", address, "dev", name)
        self.ip(role, "link", "set", name, "up")

    def _port(self, role, bridge_role, bridge, address, dev="lan0"):
        """A host `role` on `bridge` (in `bridge_role`'s namespace) through a veth named `dev`."""
        port = f"p-{role}"
        self._veth(role, dev, bridge_role, port)
        self.ip(bridge_role, "link", "set", port, "master", bridge)
        self.ip(role, "addr", "add", address, "dev", dev)

    def _veth(self, role_a, dev_a, role_b, dev_b):
        run("ip", "link", "add", dev_a, "netns", self.ns[role_a], "type", "veth",
            "peer", "name", dev_b, "netns", self.ns[role_b])
        self.ip(role_a, "link", "set", dev_a, "up")
        self.ip(role_b, "link", "set", dev_b, "up")

    def _write_caller_resolver(self):
        """`ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf, so the
        caller's SDK resolves through the agent's DNS on the floating address, like a Lambda
        function behind a Route 53 Resolver rule (zones: every agent's DNS, as the multi-az
        stack's rules target every agent)."""
        directory = Path(f"/etc/netns/{self.ns['caller']}")
        directory.mkdir(parents=True, exist_ok=True)
        servers = [AGENT_LAN[a] for a in self.agents] if self.zones else [FLOATING]
        (directory / "resolv.conf").write_text(
            "".join(f"nameserver {s}\n" for s in servers) + "options timeout:1 attempts:2\n")
        (directory / "hosts").write_text("127.0.0.1 localhost\n")

    def move_floating(self, agent):
        """Move the floating address to `agent`'s LAN interface and announce it with a
        gratuitous ARP, as an EC2 secondary-IP move followed by the instance's own ARP would."""
        if self.floating_holder is not None:
            self.ip(self.floating_holder, "addr", "del", f"{FLOATING}/24", "dev", "lan0")
        self.ip(agent, "addr", "add", f"{FLOATING}/24", "dev", "lan0")
        self.floating_holder = agent
        for _ in range(3):
            send_gratuitous_arp(self.ns[agent], "lan0", FLOATING)

    def cut(self, role, *devs):
        """`role` vanishes without a word: its links go down, so nothing it sent ends a
        connection (no FIN, no RST, no ICMP) and nothing reaches it; its processes live on."""
        for dev in devs:
            self.ip(role, "link", "set", dev, "down")

    def mac(self, role, dev):
        return json.loads(self.ip(role, "-j", "link", "show", "dev", dev).stdout)[0]["address"]

    def neighbour_mac(self, role, address):
        """The hardware address `role` has cached for `address`, or None."""
        entries = json.loads(self.ip(role, "-j", "neigh", "show", address).stdout or "[]")
        return next((e.get("lladdr") for e in entries if e.get("lladdr")), None)

    def spawn(self, role, args, name, env=None, stdin=False):
        """Start `args` in `role`'s namespace; stdout is a pipe, stderr goes to TMP/NAME.log."""
        log_path = self.tmp / f"{name}.log"
        log = open(log_path, "w")
        proc = subprocess.Popen(("ip", "netns", "exec", self.ns[role], *args),
                                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                start_new_session=True)
        log.close()
        proc.log_path = log_path
        proc.name = name
        self.procs.append(proc)
        return proc

    def http(self, role, host, port, path, method="GET", timeout=2.0):
        """(status, body) of an HTTP request made from inside `role`'s namespace."""
        conn = _NamespacedHTTPConnection(self.ns[role], host, port, timeout=timeout)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def http_json(self, role, host, port, path):
        status, body = self.http(role, host, port, path)
        return status, json.loads(body) if body else None


def read_line(proc, timeout, what):
    """The next stdout line of `proc`, or an AssertionError naming `what` and the process log."""
    result = {}

    def read():
        result["line"] = proc.stdout.readline()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    line = result.get("line")
    if not line:
        raise AssertionError(f"{what}: no output within {timeout}s; "
                             f"{proc.name} log:\n{log_tail(proc)}")
    return line


def log_tail(proc, lines=40):
    try:
        return "\n".join(Path(proc.log_path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(proc, sig=signal.SIGTERM):
    """Signal the process group `spawn` created, then make sure it is gone."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def kill(proc):
    """SIGKILL, as a crashed instance: no graceful shutdown."""
    stop(proc, signal.SIGKILL)


def wait_for(predicate, what, timeout, interval=0.1, procs=()):
    """Poll `predicate` until it returns a true value (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: {proc.name} exited ({proc.returncode}):\n{log_tail(proc)}")
        try:
            value = predicate()
            if value:
                return value
        except (OSError, http.client.HTTPException, ValueError) as error:
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


def netns_socket(ns, family=socket.AF_INET, kind=socket.SOCK_STREAM, proto=0):
    """A socket that belongs to namespace `ns`; the calling thread's namespace is restored.
    (A socket keeps the namespace it was created in; `setns` moves only the calling thread.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            return socket.socket(family, kind, proto)
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the test's own namespace")
    finally:
        os.close(own)
        os.close(target)


class _NamespacedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, ns, host, port, timeout):
        super().__init__(host, port, timeout=timeout)
        self._ns = ns

    def connect(self):
        sock = netns_socket(self._ns)
        sock.settimeout(self.timeout)
        try:
            sock.connect((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def send_gratuitous_arp(ns, dev, address):
    """Broadcast an ARP request for `address` from `address` on `dev` (RFC 5227's announcement),
    so neighbours update their cached hardware address at once."""
    info = json.loads(run("ip", "-n", ns, "-j", "link", "show", "dev", dev).stdout)
    mac = bytes.fromhex(info[0]["address"].replace(":", ""))
    ip = socket.inet_aton(address)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\x00" * 6, ip)
    frame = b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp
    sock = netns_socket(ns, socket.AF_PACKET, socket.SOCK_RAW)
    try:
        sock.bind((dev, 0))
        sock.send(frame)
    finally:
        sock.close()
