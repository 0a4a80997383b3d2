"""Loss and delay on the "internet" link of the whole-topology test (router <-> relays).

`Impairment(topo, loss_percent, delay_ms)` is a context manager. It uses `tc netem` on both ends
of both internet links (so each direction sees the loss and the delay). When the kernel has no
netem qdisc (CONFIG_NET_SCH_NETEM off, as in some CI sandboxes), it falls back to an equivalent
impairment in user space: the router's forwarded traffic is policy-routed through a TUN device
served by this file run as a program, which drops and delays packets the same way.
`.method` says which one ran.

    python3 topology_impair.py DEVICE LOSS_FRACTION DELAY_SECONDS   (inside the router namespace)
"""

import fcntl
import heapq
import json
import os
import random
import re
import select
import signal
import struct
import sys
import time
from pathlib import Path

import topology_network as net

INTERNET_LINK = (("inet", "wan-a"), ("inet", "wan-b"), ("relay-a", "wan0"), ("relay-b", "wan0"))
ROUTER_INPUTS = ("br-lan", "wan-a", "wan-b")
TUN_DEVICE = "imp0"
TABLE = "100"


class Impairment:
    def __init__(self, topo, loss_percent, delay_ms):
        self.topo = topo
        self.loss_percent = loss_percent
        self.delay_ms = delay_ms
        self.method = None
        # Packets the impairment dropped (read when it is removed): proof the link was lossy.
        self.dropped = 0
        self._netem_on = []
        self._proc = None

    def __enter__(self):
        try:
            if self._netem_available():
                self._start_netem()
                self.method = f"tc netem loss {self.loss_percent}% delay {self.delay_ms}ms"
            else:
                self._start_userspace()
                self.method = f"user-space loss {self.loss_percent}% delay {self.delay_ms}ms (kernel lacks netem)"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for role, dev in self._netem_on:
            stats = net.run("tc", "-s", "-n", self.topo.ns[role], "qdisc", "show", "dev", dev, check=False).stdout
            self.dropped += sum(int(n) for n in re.findall(r"dropped (\d+)", stats))
            net.run("tc", "-n", self.topo.ns[role], "qdisc", "del", "dev", dev, "root", check=False)
        self._netem_on.clear()
        if self._proc is not None:
            for dev in ROUTER_INPUTS:
                self.topo.ip("inet", "rule", "del", "iif", dev, "lookup", TABLE, check=False)
            self._proc.send_signal(signal.SIGTERM)
            try:
                self.dropped += json.loads(self._proc.stdout.readline() or "{}").get("dropped", 0)
            finally:
                net.stop(self._proc)
            self._proc = None

    def _netem(self, role, dev, action="add"):
        return net.run("tc", "-n", self.topo.ns[role], "qdisc", action, "dev", dev, "root", "netem",
                       "loss", f"{self.loss_percent}%", "delay", f"{self.delay_ms}ms", check=False)

    def _netem_available(self):
        role, dev = INTERNET_LINK[0]
        result = self._netem(role, dev)
        if result.returncode == 0:
            self._netem_on.append((role, dev))
            return True
        # "Specified qdisc kind is unknown" (extack) or ENOENT from older tools: no netem module.
        if "unknown" in result.stderr.lower() or "no such file" in result.stderr.lower():
            return False
        raise AssertionError(f"tc netem on {dev}: {result.stderr.strip()}")

    def _start_netem(self):
        for role, dev in INTERNET_LINK[1:]:
            result = self._netem(role, dev)
            if result.returncode != 0:
                raise AssertionError(f"tc netem on {role}/{dev}: {result.stderr.strip()}")
            self._netem_on.append((role, dev))

    def _start_userspace(self):
        self._proc = self.topo.spawn("inet", [sys.executable, str(Path(__file__).resolve()), TUN_DEVICE,
                                              str(self.loss_percent / 100), str(self.delay_ms / 1000)],
                                     name="impairment")
        line = net.read_line(self._proc, 10, "the user-space impairment starting")
        if line.strip() != "ready":
            raise AssertionError(f"impairment printed {line!r}")
        self.topo.ip("inet", "link", "set", TUN_DEVICE, "up")
        self.topo.sysctl("inet", f"net.ipv4.conf.{TUN_DEVICE}.rp_filter", 0)
        self.topo.sysctl("inet", "net.ipv4.conf.all.rp_filter", 0)
        self.topo.ip("inet", "route", "add", "default", "dev", TUN_DEVICE, "table", TABLE)
        for dev in ROUTER_INPUTS:
            self.topo.ip("inet", "rule", "add", "iif", dev, "lookup", TABLE)


# The user-space impairment: packets the router forwards arrive here through the TUN device
# and go back into the router's stack (iif imp0, main table) after the delay, unless dropped.

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def serve(device, loss, delay):
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", device.encode(), IFF_TUN | IFF_NO_PI))
    print("ready", flush=True)
    pending = []
    order = 0
    counts = {"forwarded": 0, "dropped": 0}
    try:
        while True:
            timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
            readable, _, _ = select.select([tun], [], [], timeout)
            if readable:
                packet = os.read(tun, 65536)
                if random.random() < loss:
                    counts["dropped"] += 1
                else:
                    order += 1
                    heapq.heappush(pending, (time.monotonic() + delay, order, packet))
            now = time.monotonic()
            while pending and pending[0][0] <= now:
                try:
                    os.write(tun, heapq.heappop(pending)[2])
                    counts["forwarded"] += 1
                except OSError:
                    counts["dropped"] += 1
    finally:
        print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
