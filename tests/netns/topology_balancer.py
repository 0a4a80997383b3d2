"""A TCP load balancer standing in for the internal Network Load Balancer of the multi-az
stack, run in its own namespace on the agents' subnet (this kernel has no IPVS, and a proxy
written here runs the same on every CI machine).

What it does is what the stack's NLB is configured to do (images/cloudformation/govcloud.yaml):
it listens on one address per "zone", sends each new connection to a healthy agent's TLS front
(fewest open connections first), checks every agent's admin /readyz over HTTP and takes an agent
out after UNHEALTHY_AFTER failed checks, and then ends the connections it was carrying (the NLB's
connection termination on unhealthy targets), so callers on them see the connection close
instead of waiting out their read timeout. It is a proxy, not a pass-through: the agents see the
balancer's address as the source.

    topology_balancer.py --listen 192.0.2.201 --listen 192.0.2.202 \
        --target 192.0.2.11:443:9100 --target 192.0.2.12:443:9100 ...

Prints {"event": "listening"} once serving; on stdin, "status" answers {"event": "status",
"targets": {"ip": {"healthy": bool, "open": n, "out_at": monotonic or null}}}.
"""

import argparse
import asyncio
import json
import sys
import time

CHECK_INTERVAL = 0.5
# Generous against a loaded CI machine: a slow /readyz must not take a serving agent out.
CHECK_TIMEOUT = 1.0
UNHEALTHY_AFTER = 2
HEALTHY_AFTER = 2
CONNECT_TIMEOUT = 1.0


class Target:
    def __init__(self, spec):
        host, port, admin = spec.split(":")
        self.host, self.port, self.admin = host, int(port), int(admin)
        self.healthy = False
        self.fails = 0
        self.passes = 0
        self.out_at = None
        self.connections = set()


class Balancer:
    def __init__(self, targets):
        self.targets = targets

    async def check(self, target):
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.admin), CHECK_TIMEOUT)
            try:
                writer.write(f"GET /readyz HTTP/1.1\r\nHost: {target.host}\r\nConnection: close\r\n\r\n".encode())
                line = await asyncio.wait_for(reader.readline(), CHECK_TIMEOUT)
                return line.split()[1:2] == [b"200"]
            finally:
                writer.close()
        except (OSError, asyncio.TimeoutError, IndexError):
            return False

    async def watch(self, target):
        while True:
            started = time.monotonic()
            if await self.check(target):
                target.fails, target.passes = 0, target.passes + 1
                if not target.healthy and target.passes >= HEALTHY_AFTER:
                    target.healthy, target.out_at = True, None
            else:
                target.passes, target.fails = 0, target.fails + 1
                if target.healthy and target.fails >= UNHEALTHY_AFTER:
                    target.healthy, target.out_at = False, time.monotonic()
                    for writer in list(target.connections):
                        writer.transport.abort()
            await asyncio.sleep(max(0.0, CHECK_INTERVAL - (time.monotonic() - started)))

    def pick(self):
        healthy = [t for t in self.targets if t.healthy]
        return min(healthy, key=lambda t: len(t.connections)) if healthy else None

    async def serve(self, client_reader, client_writer):
        target = self.pick()
        if target is None:
            client_writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            # As through an NLB, a target that does not answer is the caller's failed connection.
            client_writer.transport.abort()
            return
        target.connections.add(client_writer)
        try:
            await asyncio.gather(pipe(client_reader, up_writer), pipe(up_reader, client_writer))
        finally:
            target.connections.discard(client_writer)
            for writer in (client_writer, up_writer):
                writer.transport.abort()

    def status(self):
        return {t.host: {"healthy": t.healthy, "open": len(t.connections), "out_at": t.out_at}
                for t in self.targets}


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", action="append", required=True)
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--target", action="append", required=True, help="ip:port:admin-port")
    args = parser.parse_args()
    balancer = Balancer([Target(spec) for spec in args.target])
    for target in balancer.targets:
        asyncio.create_task(balancer.watch(target))
    for address in args.listen:
        await asyncio.start_server(balancer.serve, address, args.port)
    print(json.dumps({"event": "listening"}), flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while line := await stdin.readline():
        if line.strip() == b"status":
            print(json.dumps({"event": "status", "targets": balancer.status()}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
