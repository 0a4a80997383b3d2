"""Debian's headless Chromium driven over the DevTools protocol, with nothing but the standard
library: a minimal WebSocket client (RFC 6455, client side: masked text frames out, whole
messages in) and a `Browser` that loads a page and records every request, response, failed
load, console error and uncaught exception on the way, so a test can say "no failed request"
and read the DOM the page's script built.

Chromium runs with a fresh profile under the test's temp dir, background networking, sync,
component updates and QUIC off, so the only traffic it makes is the page's own."""

import base64
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import time
import urllib.request

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
WINDOW_SIZE = (1280, 1600)


def chromium_path():
    """The Chromium binary, or None when it is not installed."""
    for candidate in CHROMIUM_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    return None


class WebSocket:
    """One client WebSocket connection: send text, receive whole text messages."""

    def __init__(self, url, timeout=30.0):
        assert url.startswith("ws://"), url
        host_port, _, path = url[len("ws://"):].partition("/")
        host, _, port = host_port.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        request = (
            f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the WebSocket handshake")
            head += chunk
        head, _, self.buffer = head.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise ConnectionError(f"DevTools refused the WebSocket upgrade: {status!r}")

    def send(self, text):
        payload = text.encode()
        header = bytearray([0x81])  # FIN, text
        length = len(payload)
        if length < 126:
            header.append(0x80 | length)
        elif length < 1 << 16:
            header.append(0x80 | 126)
            header += struct.pack("!H", length)
        else:
            header.append(0x80 | 127)
            header += struct.pack("!Q", length)
        mask = secrets.token_bytes(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(header) + mask + masked)

    def receive(self):
        """The next whole text message (continuation frames joined; pings answered)."""
        message = b""
        while True:
            first, second = self._read(2)
            fin, opcode = first & 0x80, first & 0x0F
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read(8))
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode == 0x9:
                self._pong(payload)
                continue
            if opcode == 0xA:
                continue
            message += payload
            if fin:
                return message.decode()

    def _pong(self, payload):
        mask = secrets.token_bytes(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)

    def _read(self, count):
        while len(self.buffer) < count:
            chunk = self.sock.recv(max(65536, count - len(self.buffer)))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return bytes(data)

    def close(self):
        self.sock.close()


class Browser:
    """A headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, directory):
        binary = chromium_path()
        assert binary, "chromium is not installed"
        self.directory = str(directory)
        profile = os.path.join(self.directory, "chromium-profile")
        os.makedirs(profile, exist_ok=True)
        self.log_path = os.path.join(self.directory, "chromium.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", "--disable-extensions", "--disable-default-apps",
                "--no-default-browser-check", "--metrics-recording-only", "--mute-audio",
                f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0", f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL, stderr=self.log,
        )
        port = self._devtools_port(os.path.join(profile, "DevToolsActivePort"))
        self.ws = WebSocket(self._page_target(port))
        self.next_id = 0
        self.events = []
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _devtools_port(self, path, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited ({self.proc.returncode}):\n{self.logs()}")
            try:
                with open(path) as f:
                    first = f.readline().strip()
                if first:
                    return int(first)
            except FileNotFoundError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"chromium did not open its DevTools port:\n{self.logs()}")

    def _page_target(self, port, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                targets = json.load(response)
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.1)
        raise RuntimeError("chromium has no page target")

    def call(self, method, params=None, timeout=30.0):
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.receive())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)
        raise TimeoutError(f"{method}: no answer in {timeout} s")

    def wait_for(self, predicate, timeout=30.0):
        """Reads events until `predicate(event)` holds for one (already seen ones included)."""
        for event in self.events:
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout
        self.ws.sock.settimeout(1.0)
        try:
            while time.monotonic() < deadline:
                try:
                    message = json.loads(self.ws.receive())
                except socket.timeout:
                    continue
                self.events.append(message)
                if predicate(message):
                    return message
        finally:
            self.ws.sock.settimeout(30.0)
        raise TimeoutError("the awaited DevTools event never came")

    def load(self, url, timeout=30.0):
        """Navigates to `url` and waits for its load event. The previous page is left for
        about:blank first, so nothing it still had in flight is counted against this one."""
        for target in ("about:blank", url):
            self.events.clear()
            self.call("Page.navigate", {"url": target})
            self.wait_for(lambda e: e.get("method") == "Page.loadEventFired", timeout)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def requests(self):
        """{requestId: url} of every request the page made."""
        return {
            e["params"]["requestId"]: e["params"]["request"]["url"]
            for e in self.events if e.get("method") == "Network.requestWillBeSent"
        }

    def problems(self):
        """Everything that went wrong while loading: failed loads, error statuses, console
        errors (CSP violations among them) and uncaught exceptions, as readable lines."""
        urls = self.requests()
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Network.loadingFailed":
                found.append(f"failed: {urls.get(params['requestId'])}: {params.get('errorText')} "
                             f"{params.get('blockedReason') or ''}")
            elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
                found.append(f"HTTP {params['response']['status']}: {params['response']['url']}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"console ({params['entry'].get('source')}): {params['entry'].get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(f"console.error: {params.get('args')}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
        return found

    def logs(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def close(self):
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001  (the browser may already be gone)
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
