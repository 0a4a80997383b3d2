"""Driving the caller (topology_caller.py in the caller namespace) from the test, and accounting
for every request it sent: succeeded, failed with which error, or lost silently (no outcome
within its timeouts, or no outcome line at all)."""

import json
import queue
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import topology_network as net

RATE = 5  # Converse calls per second


class Load:
    def __init__(self, topo, env):
        self.proc = topo.spawn("caller", [sys.executable, str(Path(__file__).with_name("topology_caller.py"))],
                               name="caller", env=env, stdin=True)
        self.events = queue.Queue()
        self.results = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("ready", 30)

    def _read(self):
        for line in self.proc.stdout:
            event = json.loads(line)
            if event.get("event") == "result":
                with self.lock:
                    self.results.setdefault(event["phase"], []).append(event)
            else:
                self.events.put(event)
        self.events.put({"event": "exited"})

    def command(self, **command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def expect(self, name, timeout):
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"caller: no {name!r} within {timeout}s; log:\n{net.log_tail(self.proc)}")
        if event.get("event") != name:
            raise AssertionError(f"caller: expected {name!r}, got {event}; log:\n{net.log_tail(self.proc)}")
        return event

    def ask(self, cmd, answer, timeout=30):
        self.command(cmd=cmd)
        return self.expect(answer, timeout)

    def phase_results(self, phase):
        with self.lock:
            return list(self.results.get(phase, []))

    def run_phase(self, phase, until, timeout, fault=None):
        """Calls at RATE per second until `until(results, report)` holds (or `timeout`); `fault()` runs
        once the phase has three successes and returns its own description. Returns a Phase."""
        self.command(cmd="start", phase=phase, rate=RATE)
        report = Phase(phase)
        deadline = time.monotonic() + timeout
        try:
            if fault is not None:
                net.wait_for(lambda: sum(r["ok"] for r in self.phase_results(phase)) >= 3,
                             f"{phase}: three successes before the fault", timeout=10, procs=[self.proc])
                report.fault_at = time.monotonic()
                report.fault = fault()
            while time.monotonic() < deadline and not until(self.phase_results(phase), report):
                time.sleep(0.1)
        finally:
            self.command(cmd="stop")
            stopped = self.expect("stopped", 60)
        report.finish(stopped, self.phase_results(phase))
        return report

    def close(self):
        net.stop(self.proc)


class Phase:
    """The outcome of one phase, for the assertions and the table."""

    def __init__(self, name):
        self.name = name
        self.fault = "none"
        self.fault_at = None
        self.sent = 0
        self.results = []
        self.silent = []

    def finish(self, stopped, results):
        self.sent = len(stopped["seqs"])
        self.results = sorted(results, key=lambda r: r["seq"])
        answered = {r["seq"] for r in results}
        # A call the caller gave up waiting for, or one whose outcome never reached the test.
        self.silent = sorted(set(stopped["unanswered"]) | (set(stopped["seqs"]) - answered))

    @property
    def succeeded(self):
        return sum(r["ok"] for r in self.results)

    @property
    def failures(self):
        return [r for r in self.results if not r["ok"]]

    def errors(self):
        return Counter(r["error"] for r in self.failures)

    def successes_after_last_failure(self):
        return successes_after_last_failure(self.results, self.fault_at)

    def recovery_seconds(self):
        """From the fault to the sending of the first call after which every call succeeded
        (0 when nothing failed): how long new calls kept failing."""
        if self.fault_at is None or not self.failures:
            return 0.0
        resumed = self.successes_after_last_failure()
        if not resumed:
            return float("inf")
        return max(0.0, resumed[0]["sent"] - self.fault_at)

    def one_second_rule(self):
        """Calls sent from 1 s after the fault: (how many, how many failed, the slowest success
        in seconds). The rule: none fails and none waits on what was lost."""
        if self.fault_at is None:
            return None
        late = [r for r in self.results if r["sent"] >= self.fault_at + 1.0]
        slowest = max((r["done"] - r["sent"] for r in late if r["ok"]), default=0.0)
        return len(late), sum(not r["ok"] for r in late), slowest

    def longest_failure_seconds(self):
        """How long the slowest failed call took to fail: a hang shows here."""
        return max((r["done"] - r["sent"] for r in self.failures), default=0.0)


def successes_after_last_failure(results, fault_at):
    """Successes sent after the fault and after the last failed call, in sending order."""
    last_failure = max((r["seq"] for r in results if not r["ok"]), default=0)
    start = fault_at if fault_at is not None else 0
    return sorted((r for r in results if r["ok"] and r["seq"] > last_failure and r["sent"] > start),
                  key=lambda r: r["seq"])


def stable_after_fault(count):
    """`until` for run_phase: `count` successes since the fault and the last failure."""
    def until(results, report):
        return report.fault_at is not None and \
            len(successes_after_last_failure(results, report.fault_at)) >= count
    return until


def at_least(count):
    return lambda results, report: len(results) >= count


def table(phases):
    header = ("phase", "fault", "sent", "succeeded", "failed (error: count)", "silent", "recovery s",
              "slowest failure s", "from +1 s: sent / failed / slowest ok s")
    rows = [header]
    for p in phases:
        errors = ", ".join(f"{name}: {n}" for name, n in sorted(p.errors().items())) or "-"
        rule = p.one_second_rule()
        rows.append((p.name, p.fault, str(p.sent), str(p.succeeded), f"{len(p.failures)} ({errors})"
                     if p.failures else "0", str(len(p.silent)), f"{p.recovery_seconds():.1f}",
                     f"{p.longest_failure_seconds():.1f}",
                     f"{rule[0]} / {rule[1]} / {rule[2]:.2f}" if rule else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    seen = {}
    for p in phases:
        for failure in p.failures:
            seen.setdefault((p.name, failure["error"]), failure["message"])
    if seen:
        lines.append("errors the caller saw (first message of each kind):")
        lines += [f"  {phase}: {error}: {message}" for (phase, error), message in seen.items()]
    return "\n".join(lines)
