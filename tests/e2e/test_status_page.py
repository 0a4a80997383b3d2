"""The admin ports' status pages in a real browser: Debian's headless Chromium loads the
agent's and the relay's `GET /` after a few calls through agent → tunnel → relay (one
answered, the others refused by the agent and by the relay), with no failed request, no
console error (a Content-Security-Policy violation is one) and no script exception; the DOM
the page's script built shows the relays by name and state, a principal's token count and
the refusals, with caller-chosen text shown as text, not markup; a screenshot of each page is
written under the test's temp dir. `xpart demo` prints both page URLs.

Chromium is driven over the DevTools protocol by chromium_harness (standard library only)."""

import http.client
import json
import os
import re
import ssl
import subprocess
import time

import pytest

import agent_harness as a
import chromium_harness as browser
import relay_harness as h
from agent_harness import start_stack  # noqa: F401  (pytest fixture)

ECHO = "xpart.echo"
# A header value the relay refuses and quotes in its error message: caller-chosen markup.
INJECTED = '<img src=x id=injected onerror="document.title=1">'
REFRESH_WAIT_S = 20
BUDGET_PER_DAY = 1_000_000


@pytest.fixture
def chromium(tmp_path):
    if browser.chromium_path() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    started = browser.Browser(tmp_path / "browser")
    yield started
    started.close()


def https_post(stack, path, token, headers=None, body=b"{}"):
    context = ssl.create_default_context(cafile=stack.pki["ca"])
    conn = http.client.HTTPSConnection("localhost", stack.agent.front[1], context=context, timeout=30)
    try:
        all_headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
        all_headers.update(headers or {})
        conn.request("POST", path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def converse_body(text):
    return json.dumps({"messages": [{"role": "user", "content": [{"text": text}]}]}).encode()


def admin_status(address):
    status, _, body = h.get(address, "/status")
    assert status == 200, body
    return json.loads(body)


def wait_for_status(address, predicate, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        status = admin_status(address)
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never showed in /status: {json.dumps(status, indent=1)}")
        time.sleep(0.1)


def open_page(chromium, address, name, directory, refresh=True):
    """Loads the page, waits until it has fetched /status again by itself (the refresh) unless
    told not to, and returns (text of the page, outer HTML); writes <name>.png and <name>.html
    to `directory`."""
    base = f"http://{address[0]}:{address[1]}/"
    chromium.load(base)
    if refresh:
        chromium.wait_for(
            lambda e: e.get("method") == "Network.loadingFinished"
            and chromium.requests().get(e["params"]["requestId"]) == base + "status",
            timeout=REFRESH_WAIT_S,
        )
        # The refreshed status is rendered in the same task that read it; let it paint.
        time.sleep(0.3)
    text = chromium.evaluate("document.body.innerText")
    dom = chromium.evaluate("document.documentElement.outerHTML")
    with open(os.path.join(directory, f"{name}.html"), "w") as f:
        f.write(dom)
    screenshot = chromium.screenshot(os.path.join(directory, f"{name}.png"))
    with open(screenshot, "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n"), "not a PNG"
    width = int.from_bytes(png[16:20], "big")
    assert width == browser.WINDOW_SIZE[0], f"screenshot is {width} px wide"
    assert os.path.getsize(screenshot) > 10_000, "the screenshot looks blank"
    leaked = re.findall(r"\b(?:null|undefined|NaN|\[object \w+\])", text)
    assert leaked == [], f"the page shows {leaked}:\n{text}"
    assert "/min" in text, "request and error rates"
    problems = chromium.problems()
    assert problems == [], "\n".join(problems)
    outside = [url for url in chromium.requests().values() if not url.startswith(base)]
    assert outside == [], f"the page loaded something from elsewhere: {outside}"
    return text, dom


def relay_row(text, name):
    """The relay table's line for `name` (innerText puts a row's cells on one line, tab-separated)."""
    rows = [line for line in text.splitlines() if line.startswith(name + "\t") or line.startswith(name + " ")]
    assert rows, f"no row for {name} in:\n{text}"
    return rows[0]


def test_both_status_pages_render_live_state_in_headless_chromium(start_stack, chromium, tmp_path):  # noqa: F811
    token = a.new_token()
    stack = start_stack(
        relays=2,
        tokens={"lambda": token},
        principals=a.principal("lambda", token=token, models=("*",), tokens_per_day=BUDGET_PER_DAY),
    )
    relay_a, relay_b = stack.relays
    agent_admin = stack.agent.admin

    # Before any call: the page renders the embedded status at once.
    text, _ = open_page(chromium, agent_admin, "agent-first", tmp_path, refresh=False)
    assert "no usage yet" in text and "none since start" in text, text
    assert "relay-a" in text and "relay-b" in text, text

    for text in ("hello status page", "and again"):
        answer = a.boto3_call(stack.env(), op="converse", model=ECHO, text=text)
        assert answer.get("text"), answer
    # Refused by the agent: a token it does not know.
    status, headers, _ = https_post(stack, f"/model/{ECHO}/converse", "xpart-not-a-token", body=converse_body("x"))
    assert (status, h.error_type(headers)) == (403, "UnrecognizedClientException")
    # Refused by the relay: a service tier its [policy] does not list, quoted in its message.
    status, headers, body = https_post(
        stack, f"/model/{a.CLAUDE}/converse", token,
        headers={"x-amzn-bedrock-service-tier": INJECTED}, body=converse_body("x"),
    )
    assert (status, h.error_type(headers)) == (403, "AccessDeniedException"), body
    relay_b.kill()
    agent = wait_for_status(
        agent_admin,
        lambda s: {r["name"]: r["state"] for r in s["relays"]} == {"relay-a": "healthy", "relay-b": "down"},
        "relay-b down",
    )
    usage = {p["principal"]: p for p in agent["usage"]["principals"]}["lambda"]
    tokens = usage["input_tokens"] + usage["output_tokens"]
    assert usage["requests"] == 3 and tokens > 0, usage
    assert agent["activity"]["errors"] == 2, agent["activity"]

    text, dom = open_page(chromium, agent_admin, "agent", tmp_path)
    assert "ready" in text
    row_a, row_b = relay_row(text, "relay-a"), relay_row(text, "relay-b")
    assert "healthy" in row_a and "down" in row_b, (row_a, row_b)
    assert re.search(r"\d+ s ago", row_a), f"relay-a's last good probe: {row_a}"
    assert "Top principals today" in text
    principal_rows = [line for line in text.splitlines() if line.startswith("lambda\t")]
    assert principal_rows, text
    assert f"{tokens:,}" in principal_rows[0].split("\t"), (tokens, principal_rows)
    assert "Budgets nearest their limit" in text and "tokens per day" in text
    assert f"{BUDGET_PER_DAY:,}" in text
    assert "UnrecognizedClientException" in text and "AccessDeniedException" in text
    assert "unknown bearer token" in text
    assert "relay-a" in [peer.strip() for line in text.splitlines() for peer in line.split("\t")[:1]]
    assert chromium.evaluate("document.querySelectorAll('#injected').length") == 0
    assert chromium.evaluate("document.title") == "xpart agent"

    relay = admin_status(relay_a.process.admin)
    assert any(INJECTED in (f["message"] or "") for f in relay["activity"]["recent_failures"]), relay["activity"]
    text, dom = open_page(chromium, relay_a.process.admin, "relay", tmp_path)
    assert "ready" in text and "available" in text
    assert "agent-test" in text, "the agent, as the relay's tunnel peer"
    assert "Converse" in text and "standin.*" in text, "the policy summary"
    assert "AccessDeniedException" in text
    assert INJECTED in text, "the caller's header value, as text"
    assert chromium.evaluate("document.querySelectorAll('#injected').length") == 0
    assert chromium.evaluate("document.title") == "xpart relay"
    assert "&lt;img" in dom and "<img src=x" not in dom
    for name in ("agent.png", "relay.png"):
        assert (tmp_path / name).is_file()


def test_the_demo_prints_both_status_page_urls(tmp_path):
    xpart = os.path.join(h.bin_dir(), "xpart")
    if not os.access(xpart, os.X_OK):
        pytest.skip(f"xpart is not built at {xpart} (cargo build -p xpart, or set XPART_BIN_DIR)")
    done = subprocess.run(
        [xpart, "demo", "--once", "--dir", str(tmp_path / "demo"),
         "--front-port", "0", "--wg-port", "0", "--admin-port", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    admin = re.search(r"^  agent  (http://127\.0\.0\.1:\d+)/metrics", done.stdout, re.M)
    relay = re.search(r"^  relay  (http://127\.0\.0\.1:\d+)/metrics", done.stdout, re.M)
    assert admin and relay, done.stdout
    pages = done.stdout.split("Status pages", 1)[1]
    assert f"  agent  {admin.group(1)}/\n" in pages, done.stdout
    assert f"  relay  {relay.group(1)}/\n" in pages, done.stdout
