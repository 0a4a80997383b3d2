"""A tiny UDP DNS server for tests: answers A queries for the configured names (as a VPC
endpoint's private DNS would), empty answers for their other types, NXDOMAIN for the rest.
Counts queries per name so tests can see the relay resolved through it."""

import socket
import struct
import threading

TYPE_A = 1


class TestDnsServer:
    def __init__(self, records, ttl=30, host="127.0.0.1"):
        # name -> one address or a list of addresses (answered in that order)
        self.records = {
            name.lower().rstrip("."): [ips] if isinstance(ips, str) else list(ips) for name, ips in records.items()
        }
        self.ttl = ttl
        self.queries = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                packet, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                reply = self._answer(packet)
            except (ValueError, IndexError, struct.error):
                continue
            self.sock.sendto(reply, peer)

    def _answer(self, packet):
        (query_id, _flags, qdcount) = struct.unpack(">HHH", packet[:6])
        if qdcount != 1:
            raise ValueError("one question expected")
        labels, i = [], 12
        while packet[i] != 0:
            length = packet[i]
            labels.append(packet[i + 1 : i + 1 + length].decode("ascii"))
            i += 1 + length
        i += 1
        qtype, _qclass = struct.unpack(">HH", packet[i : i + 4])
        question = packet[12 : i + 4]
        name = ".".join(labels).lower()
        self.queries[name] = self.queries.get(name, 0) + 1
        ips = self.records.get(name)
        if ips is None:
            header = struct.pack(">HHHHHH", query_id, 0x8183, 1, 0, 0, 0)
            return header + question
        answers = []
        if qtype == TYPE_A:
            answers = [struct.pack(">HHHIH", 0xC00C, TYPE_A, 1, self.ttl, 4) + socket.inet_aton(ip) for ip in ips]
        header = struct.pack(">HHHHHH", query_id, 0x8180, 1, len(answers), 0, 0)
        return header + question + b"".join(answers)
