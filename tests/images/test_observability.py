"""The operator's alerting and dashboards against the daemons as they run: the Prometheus rules
pass `promtool check rules`, both daemons' live /metrics pass `promtool check metrics`, and
every metric the rules, the Grafana dashboard and the CloudWatch agent configuration name is
one that a running agent or relay exports.

The daemons come from `xpart demo` (an agent and a relay joined by a userspace tunnel on
127.0.0.1, any free ports), which has already sent one Converse through the whole path when it
prints that it runs, so request counters and histograms have samples.

Tools: promtool (Debian's `prometheus` package; CI installs it), the built `xpart` binary.
"""

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "images" / "prometheus" / "xpart-rules.yml"
DASHBOARD = REPO / "images" / "grafana" / "xpart-dashboard.json"
CLOUDWATCH = REPO / "images" / "cloudwatch" / "amazon-cloudwatch-agent.json"
START_TIMEOUT_S = 60
ADMIN_LINE = re.compile(r"^\s+(agent|relay)\s+(http://\S+)/metrics\s")
METRIC_NAME = re.compile(r"\bxpart_[a-z0-9_]+")


def need_promtool():
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (apt-get install -y --no-install-recommends prometheus)")


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory):
    """The /metrics text of a running agent and relay, keyed by daemon."""
    bin_dir = os.environ.get("XPART_BIN_DIR", str(REPO / "target" / "debug"))
    xpart = os.path.join(bin_dir, "xpart")
    if not os.access(xpart, os.X_OK):
        pytest.skip(f"xpart is not built at {xpart} (cargo build -p xpart, or set XPART_BIN_DIR)")
    scratch = tmp_path_factory.mktemp("observability")
    stderr = (scratch / "demo.stderr").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "NODE_EXTRA_CA"))}
    env["HOME"] = str(scratch)
    demo = subprocess.Popen(
        [xpart, "demo", "--dir", str(scratch / "demo"), "--front-port", "0", "--wg-port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    try:
        admin = admin_urls(demo, scratch / "demo.stderr")
        metrics = {}
        for daemon, url in admin.items():
            with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
                assert response.status == 200
                metrics[daemon] = response.read().decode()
        yield metrics
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=15)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
        stderr.close()


def test_rules_pass_promtool():
    need_promtool()
    checked = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout, checked.stdout


def test_rules_cover_the_failures_an_operator_must_hear_about():
    alerts = {rule["alert"]: rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    for wanted in [
        "XpartNoHealthyRelay",
        "XpartRelayDown",
        "XpartTunnelHandshakeStale",
        "XpartTunnelPeerDown",
        "XpartAgentErrorRatioHigh",
        "XpartAgentThrottling",
        "XpartAuditRecordsDropped",
        "XpartRelayCredentialsMissing",
        "XpartRelayCredentialsExpiringSoon",
    ]:
        assert wanted in alerts, f"{wanted} missing from {RULES}"
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


@pytest.mark.parametrize("daemon", ["agent", "relay"])
def test_live_metrics_pass_promtool(live_metrics, daemon):
    need_promtool()
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=live_metrics[daemon], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, f"{daemon} /metrics:\n{checked.stdout}{checked.stderr}"


def test_every_metric_the_rules_and_dashboard_name_is_exported(live_metrics):
    exported = set()
    for text in live_metrics.values():
        exported |= exported_names(text)
    referenced = {
        "images/prometheus/xpart-rules.yml": rule_metric_names(),
        "images/grafana/xpart-dashboard.json": dashboard_metric_names(),
        "images/cloudwatch/amazon-cloudwatch-agent.json": cloudwatch_metric_names(),
    }
    for source, names in referenced.items():
        assert names, f"no metric found in {source}"
        missing = sorted(names - exported)
        assert not missing, f"{source} names metrics no daemon exports: {missing}"


def test_the_dashboard_is_grafana_json_on_a_chosen_prometheus():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.mark.parametrize("stack", ["govcloud", "commercial"])
def test_stack_alarms_read_metrics_the_cloudwatch_agent_sends(stack):
    decode = pytest.importorskip("cfnlint.decode", reason="cfn-lint not installed").decode
    template, problems = decode(str(REPO / "images" / "cloudformation" / f"{stack}.yaml"))
    assert not problems, problems
    declared = cloudwatch_metric_names()
    alarms = {n: r["Properties"] for n, r in template["Resources"].items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    assert alarms, f"{stack}.yaml has no alarm"
    job = "xpart-agent" if stack == "govcloud" else "xpart-relay"
    for name, alarm in alarms.items():
        stats = [alarm] if "MetricName" in alarm else [m["MetricStat"]["Metric"] for m in alarm["Metrics"] if "MetricStat" in m]
        for stat in stats:
            assert stat["Namespace"] == "xpart", name
            assert stat["MetricName"] in declared, f"{name}: {stat['MetricName']} is not sent by {CLOUDWATCH.name}"
            assert {"Name": "job", "Value": job} in stat["Dimensions"], name


def exported_names(text):
    """Sample names (histogram series included) and the families named by # TYPE."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def rule_metric_names():
    names = set()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            names |= set(METRIC_NAME.findall(rule["expr"]))
    return names


def dashboard_metric_names():
    names = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            names |= set(METRIC_NAME.findall(target["expr"]))
    return names


def cloudwatch_metric_names():
    """The metric selectors of the agent's Prometheus EMF declarations (anchored regexes)."""
    config = json.loads(CLOUDWATCH.read_text())
    declarations = config["logs"]["metrics_collected"]["prometheus"]["emf_processor"]["metric_declaration"]
    names = set()
    for declaration in declarations:
        for selector in declaration["metric_selectors"]:
            assert selector.startswith("^") and selector.endswith("$"), selector
            names.add(selector[1:-1])
    return names


def admin_urls(demo, stderr_path):
    """Reads the demo's stdout up to its running line; returns the admin base URL of each daemon."""
    lines = queue.Queue()

    def pump():
        for line in demo.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    admin = {}
    printed = []
    while True:
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            pytest.fail(f"the demo printed no running line in {START_TIMEOUT_S} s: {printed}")
        if line is None:
            pytest.fail(f"the demo exited: {printed}\n{Path(stderr_path).read_text()}")
        printed.append(line)
        match = ADMIN_LINE.match(line)
        if match:
            admin[match.group(1)] = match.group(2)
        if line.startswith("Running;"):
            break
    assert set(admin) == {"agent", "relay"}, printed
    return admin
