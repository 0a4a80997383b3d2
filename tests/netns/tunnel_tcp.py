"""TCP endpoints run inside a namespace by the tunnel interop tests.

    python3 tunnel_tcp.py echo HOST PORT            accept connections and echo them (prints "listening")
    python3 tunnel_tcp.py check HOST PORT NBYTES    send a pattern, read the echo, exit 0 if identical
"""

import socket
import sys
import threading


def pattern(n):
    return bytes((i * 31 + (i >> 11)) & 0xFF for i in range(n))


def echo(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.create_server((host, port), family=family, reuse_port=False)
    print("listening", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def serve(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)


def check(host, port, nbytes):
    payload = pattern(nbytes)
    with socket.create_connection((host, port), timeout=20) as conn:
        sender = threading.Thread(target=conn.sendall, args=(payload,))
        sender.start()
        received = bytearray()
        while len(received) < nbytes:
            data = conn.recv(65536)
            if not data:
                break
            received += data
        sender.join()
    if bytes(received) != payload:
        print(f"echo mismatch: sent {nbytes} bytes, got {len(received)} back", file=sys.stderr)
        return 1
    print(f"ok {nbytes}")
    return 0


if __name__ == "__main__":
    command, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if command == "echo":
        echo(host, port)
    elif command == "check":
        sys.exit(check(host, port, int(sys.argv[4])))
    else:
        sys.exit(f"unknown command {command!r}")
