"""Steady Converse load for the failover and balancing tests: `workers` threads, each calling
Converse in a loop until stopped, every call recorded as (started, ended, outcome), where the
outcome is ("ok", request id), (error code, message) or ("exception", repr) for a
connection-level failure that is neither an answer nor an error response."""

import threading
import time

import botocore.config
import botocore.exceptions

import agent_harness as a


class Load:
    def __init__(self, session, workers, text):
        self.results = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.messages = [{"role": "user", "content": [{"text": text}]}]
        # The default 60 s read timeout stays: a hang shows up as a slow call. Retries are the
        # caller environment's (AWS_MAX_ATTEMPTS=1 in these tests: each call is one request).
        config = botocore.config.Config(max_pool_connections=workers)
        self.clients = [session.client("bedrock-runtime", config=config) for _ in range(workers)]
        self.threads = [threading.Thread(target=self.run, args=(c,)) for c in self.clients]

    def run(self, client):
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                out = client.converse(modelId=a.CLAUDE, messages=self.messages)
                outcome = ("ok", out["ResponseMetadata"]["RequestId"])
            except botocore.exceptions.ClientError as e:
                outcome = (e.response["Error"]["Code"], e.response["Error"].get("Message", ""))
            except Exception as e:  # a connection-level failure: neither an answer nor a 503
                outcome = ("exception", repr(e))
            with self.lock:
                self.results.append((started, time.monotonic(), outcome))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)
