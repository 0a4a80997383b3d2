"""`xpart demo`, the README's first command, as a user meets it: `--once` proves the path and
exits 0; a running demo prints an environment and AWS CLI / boto3 lines that work when pasted
into a shell with exactly that environment, and stops cleanly on Ctrl-C (SIGINT).

Every demo here uses free ports (`0`) and a directory under pytest's tmp_path."""

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FREE_PORTS = ["--front-port", "0", "--wg-port", "0", "--admin-port", "0"]
EXPORT = re.compile(r"^export ([A-Z_]+)=(.*)$")
START_TIMEOUT_S = 60
# A TLS request to the front from Node.js with only the environment's trust settings (the
# front listens on 127.0.0.1, so the name `localhost` is given as SNI and checked against the
# certificate). Any HTTP answer means the certificate chain was trusted.
NODE_TLS_CHECK = """
const url = new URL(process.env.AWS_ENDPOINT_URL_BEDROCK_RUNTIME);
require("https").get({host: "127.0.0.1", servername: url.hostname, port: url.port, path: "/"}, (r) => {
  console.log("trusted"); process.exit(0);
}).on("error", (e) => { console.error(e.message); process.exit(1); });
"""
COMMAND_TIMEOUT_S = 60
# Model discovery with nothing but caller.env: the AWS CLI's and boto3's control-plane reads,
# each printing what the test checks.
DISCOVERY = {
    "aws list-foundation-models": "aws bedrock list-foundation-models",
    "aws list-inference-profiles": "aws bedrock list-inference-profiles",
    "boto3 list_foundation_models": "python3 -c " + shlex.quote(
        'import boto3, json; print(json.dumps(boto3.client("bedrock").list_foundation_models()["modelSummaries"]))'),
    "boto3 list_inference_profiles": "python3 -c " + shlex.quote(
        'import boto3, json; print(json.dumps(boto3.client("bedrock").list_inference_profiles()["inferenceProfileSummaries"]))'),
    "boto3 get_foundation_model": "python3 -c " + shlex.quote(
        'import boto3, json; print(json.dumps(boto3.client("bedrock").get_foundation_model('
        'modelIdentifier="xpart.echo")["modelDetails"]))'),
}


@pytest.fixture(scope="module")
def xpart_bin():
    bin_dir = os.environ.get("XPART_BIN_DIR", os.path.join(REPO, "target", "debug"))
    path = os.path.join(bin_dir, "xpart")
    if not os.access(path, os.X_OK):
        pytest.skip(f"xpart is not built at {path} (cargo build -p xpart, or set XPART_BIN_DIR)")
    return path


def test_once_probes_through_the_whole_path_and_exits_zero(xpart_bin, tmp_path):
    demo_dir = tmp_path / "demo"

    done = subprocess.run(
        [xpart_bin, "demo", "--once", "--dir", str(demo_dir), *FREE_PORTS],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        env=demo_env(tmp_path),
    )

    assert done.returncode == 0, done
    assert 'Self-probe: ok, xpart.echo replied "hello from xpart demo"' in done.stdout, done
    audit = [json.loads(line) for line in (demo_dir / "agent-audit.jsonl").read_text().splitlines()]
    assert [(a["principal"], a["operation"], a["status"]) for a in audit] == [("demo-caller", "Converse", 200)]


def test_printed_lines_work_with_exactly_the_printed_environment(xpart_bin, tmp_path):
    demo_dir = tmp_path / "demo"
    stderr_path = tmp_path / "demo.stderr"
    demo = subprocess.Popen(
        [xpart_bin, "demo", "--dir", str(demo_dir), *FREE_PORTS],
        stdout=subprocess.PIPE,
        stderr=stderr_path.open("w"),
        text=True,
        env=demo_env(tmp_path),
    )
    lines = LineReader(demo.stdout)
    try:
        printed = lines.until("Running; press Ctrl-C to stop.", START_TIMEOUT_S)
        assert any(l.startswith("Self-probe: ok") for l in printed), printed
        caller_env = exported_environment(printed)
        assert set(caller_env) >= {
            "AWS_ENDPOINT_URL_BEDROCK_RUNTIME",
            "AWS_ENDPOINT_URL_BEDROCK",
            "AWS_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
            "AWS_BEARER_TOKEN_BEDROCK",
            "AWS_REGION",
        }, caller_env
        # The JavaScript SDK ignores AWS_CA_BUNDLE; Node.js reads the same CA from here.
        assert caller_env["NODE_EXTRA_CA_CERTS"] == caller_env["AWS_CA_BUNDLE"], caller_env
        node_checked = shutil.which("node") is not None
        if node_checked:
            done = run_in_shell(f"node -e {shlex.quote(NODE_TLS_CHECK)}", caller_env, tmp_path)
            assert done.returncode == 0 and done.stdout.strip() == "trusted", done
        commands = {
            "aws converse": one_line(printed, "aws bedrock-runtime converse "),
            "boto3 converse": one_line(printed, "python3 -c", ".converse("),
            "boto3 converse_stream": one_line(printed, "python3 -c", ".converse_stream("),
        }

        for name, command in commands.items():
            done = run_in_shell(command, caller_env, tmp_path)
            assert done.returncode == 0, (name, done)
            if name == "aws converse":
                answer = json.loads(done.stdout)
                assert answer["output"]["message"]["content"][0]["text"] == "hello", (name, done)
                assert answer["stopReason"] == "end_turn"
            else:
                assert done.stdout.strip() == "hello", (name, done)

        for name, command in DISCOVERY.items():
            done = run_in_shell(command, caller_env, tmp_path)
            assert done.returncode == 0, (name, done)
            answer = json.loads(done.stdout)
            if name.startswith("aws list-foundation-models"):
                answer = answer["modelSummaries"]
            elif name.startswith("aws list-inference-profiles"):
                answer = answer["inferenceProfileSummaries"]
            if "foundation_model" in name or "foundation-models" in name:
                models = answer if isinstance(answer, list) else [answer]
                # The demo admits only the echo model, so that is all a caller may list or get.
                assert [m["modelId"] for m in models] == ["xpart.echo"], (name, done)
            else:
                # No inference profile is admitted by the demo's policy.
                assert isinstance(answer, list), (name, done)
                assert all(p["inferenceProfileId"].endswith("xpart.echo") for p in answer), (name, done)

        demo.send_signal(signal.SIGINT)
        code = demo.wait(timeout=30)
        tail = lines.until_eof(10)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert code == 0, (code, stderr_path.read_text())
    assert any(l.startswith("Stopped.") for l in tail), tail
    # One line per request, the self-probe's first, all as the demo's principal but Node.js's
    # bare GET, which has no token.
    audit = [json.loads(line) for line in (demo_dir / "agent-audit.jsonl").read_text().splitlines()]
    tokenless = [a for a in audit if a["principal"] is None]
    assert len(tokenless) == (1 if node_checked else 0), audit
    assert all(a["status"] in (401, 403) for a in tokenless), audit
    audit = [a for a in audit if a["principal"] is not None]
    assert [(a["principal"], a["operation"], a["status"]) for a in audit] == [
        ("demo-caller", "Converse", 200),
        ("demo-caller", "Converse", 200),
        ("demo-caller", "Converse", 200),
        ("demo-caller", "ConverseStream", 200),
        ("demo-caller", "ListFoundationModels", 200),
        ("demo-caller", "ListInferenceProfiles", 200),
        ("demo-caller", "ListFoundationModels", 200),
        ("demo-caller", "ListInferenceProfiles", 200),
        ("demo-caller", "GetFoundationModel", 200),
    ], audit


def test_the_printed_environment_without_its_token_is_refused(xpart_bin, tmp_path):
    """The demo's agent authenticates callers: the same printed line fails without the token."""
    demo = subprocess.Popen(
        [xpart_bin, "demo", "--dir", str(tmp_path / "demo"), *FREE_PORTS],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=demo_env(tmp_path),
    )
    lines = LineReader(demo.stdout)
    try:
        printed = lines.until("Running; press Ctrl-C to stop.", START_TIMEOUT_S)
        caller_env = exported_environment(printed)
        caller_env["AWS_BEARER_TOKEN_BEDROCK"] = "xpt_not-the-demo-token"
        done = run_in_shell(one_line(printed, "aws bedrock-runtime converse "), caller_env, tmp_path)
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
    assert done.returncode != 0, done
    assert "UnrecognizedClientException" in done.stderr, done


def test_the_printed_openai_line_works_after_sourcing_caller_env(xpart_bin, tmp_path):
    """The OpenAI Python SDK with nothing but caller.env: base URL, API key (the demo's token)
    and the demo CA through SSL_CERT_FILE, which is what makes the SDK trust the front."""
    demo_dir = tmp_path / "demo"
    demo = subprocess.Popen(
        [xpart_bin, "demo", "--dir", str(demo_dir), *FREE_PORTS],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=demo_env(tmp_path),
    )
    lines = LineReader(demo.stdout)
    try:
        printed = lines.until("Running; press Ctrl-C to stop.", START_TIMEOUT_S)
        line = one_line(printed, "python3 -c", "OpenAI()")
        source = f"source {shlex.quote(str(demo_dir / 'caller.env'))}"
        done = run_in_shell(f"{source} && {line}", {}, tmp_path)
        untrusted = run_in_shell(f"{source} && unset SSL_CERT_FILE && {line}", {}, tmp_path)
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
    assert done.returncode == 0 and done.stdout.strip() == "hello", done
    assert untrusted.returncode != 0 and "APIConnectionError" in untrusted.stderr, untrusted
    audit = [json.loads(l) for l in (demo_dir / "agent-audit.jsonl").read_text().splitlines()]
    openai_lines = [a for a in audit if a.get("endpoint") == "openai /v1/chat/completions"]
    assert [(a["principal"], a["operation"], a["status"]) for a in openai_lines] == [
        ("demo-caller", "Converse", 200)
    ], audit


def demo_env(tmp_path):
    """The demo's own environment: no caller settings inherited from whoever runs the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(tmp_path)
    return env


def exported_environment(printed):
    env = {}
    for line in printed:
        match = EXPORT.match(line)
        if match:
            (value,) = shlex.split(match.group(2))
            env[match.group(1)] = value
    return env


def one_line(printed, prefix, containing=""):
    found = [l for l in printed if l.startswith(prefix) and containing in l]
    assert len(found) == 1, (prefix, containing, printed)
    return found[0]


def run_in_shell(command, caller_env, tmp_path):
    """Runs a printed line as a user's shell would, with the printed environment and nothing
    else of AWS's: an empty HOME (no ~/.aws), and instance metadata off so that a client that
    looked for credentials could never send anything off this machine."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path / "caller-home"),
        "AWS_EC2_METADATA_DISABLED": "true",
        **caller_env,
    }
    os.makedirs(env["HOME"], exist_ok=True)
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, env=env, timeout=COMMAND_TIMEOUT_S
    )


class LineReader:
    """Reads a child's stdout on a thread so waiting for a line can time out."""

    def __init__(self, stream):
        self._lines = queue.Queue()
        thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        thread.start()

    def _pump(self, stream):
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def until(self, wanted, timeout_s):
        deadline = time.monotonic() + timeout_s
        seen = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {wanted!r} within {timeout_s} s; got {seen}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"output ended before {wanted!r}; got {seen}")
            seen.append(line)
            if line == wanted:
                return seen

    def until_eof(self, timeout_s):
        deadline = time.monotonic() + timeout_s
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                continue
            if line is None:
                return seen
            seen.append(line)
        return seen
