"""The "Lambda" caller of the whole-topology test, run inside the caller namespace.

A plain boto3 `bedrock-runtime` client with no endpoint override: the SDK resolves
bedrock-runtime.<region>.amazonaws.com through /etc/resolv.conf (the agent's DNS), trusts
AWS_CA_BUNDLE and sends AWS_BEARER_TOKEN_BEDROCK. Retries are off, so every failure the caller
would see is counted once.

Commands, one JSON object per stdin line; answers, one JSON object per stdout line:
  {"cmd": "resolve"}                      -> {"event": "resolved", "addresses": [...]}
  {"cmd": "stream"}                       -> {"event": "streamed", "text": ...} (one ConverseStream)
  {"cmd": "start", "phase": P, "rate": R} -> R Converse calls per second until "stop", each
                                             answered by {"event": "result", "phase", "seq", "ok",
                                             "error", "message", "sent", "done"} (monotonic clock)
  {"cmd": "stop"}                         -> waits for the calls in flight (each bounded by its
                                             timeouts), then {"event": "stopped", "phase", "seqs": [every
                                             call sent], "unanswered": [no outcome in time]}
"""

import json
import os
import secrets
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
CONNECT_TIMEOUT = 2
READ_TIMEOUT = 10
# Resolution (2 tries of 1 s, resolv.conf) + connect + read, with room to spare: a call that has
# no outcome after this long never will, and counts as a silent loss.
CALL_BOUND = 2 + CONNECT_TIMEOUT + READ_TIMEOUT + 6


class Caller:
    def __init__(self):
        region = os.environ["AWS_REGION"]
        self.host = f"bedrock-runtime.{region}.amazonaws.com"
        self.client = boto3.session.Session(region_name=region).client(
            "bedrock-runtime",
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=CONNECT_TIMEOUT,
                          read_timeout=READ_TIMEOUT, max_pool_connections=64),
        )
        self.pool = ThreadPoolExecutor(max_workers=64)
        self.out_lock = threading.Lock()
        self.seq = 0
        self.phase = None
        self.stopping = threading.Event()
        self.pacer = None
        self.calls = {}

    def emit(self, value):
        with self.out_lock:
            print(json.dumps(value), flush=True)

    def resolve(self):
        infos = socket.getaddrinfo(self.host, 443, socket.AF_INET, socket.SOCK_STREAM)
        self.emit({"event": "resolved", "addresses": sorted({info[4][0] for info in infos})})

    def stream(self):
        word = secrets.token_hex(4)
        response = self.client.converse_stream(
            modelId=MODEL, messages=[{"role": "user", "content": [{"text": word}]}])
        text = "".join(event["contentBlockDelta"]["delta"]["text"]
                       for event in response["stream"] if "contentBlockDelta" in event)
        self.emit({"event": "streamed", "text": text, "expected": f"standin:{word}"})

    def start(self, phase, rate):
        self.phase = phase
        self.calls = {}
        self.stopping.clear()
        self.pacer = threading.Thread(target=self._pace, args=(phase, rate), daemon=True)
        self.pacer.start()

    def stop(self):
        self.stopping.set()
        self.pacer.join()
        calls = dict(self.calls)
        wait(list(calls.values()), timeout=CALL_BOUND)
        unanswered = sorted(seq for seq, future in calls.items() if not future.done())
        self.emit({"event": "stopped", "phase": self.phase, "seqs": sorted(calls), "unanswered": unanswered})

    def _pace(self, phase, rate):
        next_at = time.monotonic()
        while not self.stopping.is_set():
            self.seq += 1
            self.calls[self.seq] = self.pool.submit(self._call, phase, self.seq)
            next_at += 1.0 / rate
            self.stopping.wait(max(0.0, next_at - time.monotonic()))

    def _call(self, phase, seq):
        word = f"{phase}-{seq}-{secrets.token_hex(4)}"
        result = {"event": "result", "phase": phase, "seq": seq, "ok": False, "error": None,
                  "message": None, "sent": time.monotonic()}
        try:
            response = self.client.converse(
                modelId=MODEL, messages=[{"role": "user", "content": [{"text": word}]}])
            text = response["output"]["message"]["content"][0]["text"]
            if text == f"standin:{word}":
                result["ok"] = True
            else:
                result["error"], result["message"] = "WrongAnswer", f"expected standin:{word}, got {text!r}"
        except ClientError as error:
            result["error"] = error.response.get("Error", {}).get("Code") or "ClientError"
            result["message"] = error.response.get("Error", {}).get("Message") or str(error)
        except Exception as error:  # every other way a call can fail is an outcome to count
            result["error"], result["message"] = type(error).__name__, str(error)
        result["done"] = time.monotonic()
        self.emit(result)


def main():
    caller = Caller()
    caller.emit({"event": "ready"})
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "resolve":
                caller.resolve()
            elif command["cmd"] == "stream":
                caller.stream()
            elif command["cmd"] == "start":
                caller.start(command["phase"], command["rate"])
            elif command["cmd"] == "stop":
                caller.stop()
        except Exception as error:  # report it to the test rather than die silently
            caller.emit({"event": "failed", "cmd": command["cmd"], "error": type(error).__name__,
                         "message": str(error)})
    caller.pool.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    sys.exit(main())
