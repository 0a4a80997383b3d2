"""`xpart drill` against a loopback agent with two relays: the report is checked against
what the daemons recorded (the agent's audit log and the relays' own audit logs)."""

import json
import os
import signal
import subprocess
import threading
import time

import boto3
import pytest

import daemons
from conftest import XPART, aws_env, free_port, reset_moto, run_json, run_xpart

pytestmark = pytest.mark.skipif(
    not daemons.binaries_present(),
    reason="xpart-agent/xpart-relay not built (cargo build --workspace --bins)",
)

TIMING = ["--interval", "100ms", "--before", "1s", "--after", "3s", "--timeout", "2s"]


@pytest.fixture
def stack(tmp_path):
    stack = daemons.Stack(tmp_path)
    yield stack
    stack.stop()


def drill(stack, *cut):
    return run_json("drill", *stack.probe_args(), *TIMING, *cut, timeout=60)


def check_counts_against_the_agent_audit(stack, report):
    """Every probe reached the agent's front, so its audit log holds one line per probe."""
    audit = [a for a in stack.audit("agent") if a["principal"] == "drill"]
    assert len(audit) == report["probes_sent"]
    assert sum(1 for a in audit if a["status"] != 200) == report["probes_failed"]
    assert report["probes_failed"] == report["failed_before_cut"] + report["failed_after_cut"]
    assert len(report["failures"]) == report["probes_failed"]


def test_draining_the_active_relay_moves_traffic_to_the_other(stack):
    admin = stack.relays["relay-a"].admin_url()
    result, report = drill(stack, "drain-relay", "--admin", admin, "--restore")
    assert result.returncode == 0, result.stderr

    assert report["cut"].startswith("drain relay")
    assert report["cut_detail"] == [f"POST {admin}/drain"]
    # 100 ms apart over ~4 s of probing.
    assert 15 <= report["probes_sent"] <= 45, report["probes_sent"]
    assert 0.9 <= report["cut_at_s"] <= 1.5
    assert report["failed_before_cut"] == 0
    assert report["recovered"] is True
    assert report["recovery_s"] is not None and report["recovery_s"] < 3
    assert report["first_success_after_cut_s"] is not None
    check_counts_against_the_agent_audit(stack, report)

    # The probes after the cut were answered by relay-b, which had seen none before.
    served_by_b = [a for a in stack.audit("relay-b") if a["status"] == 200]
    assert len(served_by_b) >= 5
    # --restore undrained relay-a.
    status, body = daemons.http_json(admin + "/status")
    assert status == 200 and body["draining"] is False


def test_drain_drill_over_userspace_wireguard(tmp_path):
    stack = daemons.Stack(tmp_path, wireguard=True)
    try:
        admin = stack.relays["relay-a"].admin_url()
        result, report = drill(stack, "drain-relay", "--admin", admin, "--restore")
        check_counts_against_the_agent_audit(stack, report)
        served_by_b = [a for a in stack.audit("relay-b") if a["status"] == 200]
    finally:
        stack.stop()
    assert result.returncode == 0, result.stderr
    assert report["recovered"] is True
    assert report["failed_before_cut"] == 0
    assert len(served_by_b) >= 5


def test_killing_the_active_relay_process(stack):
    pid = stack.relays["relay-a"].pid
    result, report = drill(stack, "stop", "--pid", str(pid), "--signal", "kill")
    assert result.returncode == 0, result.stderr
    assert report["cut_detail"] == [f"kill -KILL {pid}"]
    assert stack.relays["relay-a"].proc.wait(timeout=5) == -9
    assert report["recovered"] is True
    assert report["recovery_s"] < 3
    check_counts_against_the_agent_audit(stack, report)
    assert any(a["status"] == 200 for a in stack.audit("relay-b"))


def test_a_command_as_the_cut_and_the_text_report(stack):
    pid = stack.relays["relay-a"].pid
    result = run_xpart(
        "drill", *stack.probe_args(), *TIMING, "run", "--", "kill", "-TERM", str(pid), timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert f"run \"kill -TERM {pid}\"" in result.stdout
    assert "probes:" in result.stdout
    assert "recovered" in result.stdout and "NOT RECOVERED" not in result.stdout


def test_losing_every_relay_is_reported_as_not_recovered(stack):
    pids = [str(relay.pid) for relay in stack.relays.values()]
    result, report = drill(stack, "run", "--", "kill", "-KILL", *pids)
    assert result.returncode == 1
    assert report["recovered"] is False
    assert report["recovery_s"] is None
    assert report["failed_after_cut"] >= 10
    assert report["failed_before_cut"] == 0
    check_counts_against_the_agent_audit(stack, report)
    assert "not recovered" in result.stderr


def test_max_outage_fails_a_recovery_that_is_too_slow(stack):
    # Freeze both relays as the cut and thaw them 1.5 s later: probes (300 ms timeout) fail
    # until then, so the drill recovers, but later than --max-outage allows.
    pids = [relay.pid for relay in stack.relays.values()]
    thaw = threading.Timer(2.5, lambda: [os.kill(pid, signal.SIGCONT) for pid in pids])
    thaw.start()
    try:
        result, report = run_json(
            "drill", *stack.probe_args(), "--interval", "100ms", "--before", "1s",
            "--after", "4s", "--timeout", "300ms", "--max-outage", "500ms",
            "run", "--", "kill", "-STOP", *map(str, pids), timeout=60,
        )
    finally:
        thaw.cancel()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert result.returncode == 1, result.stderr
    assert report["recovered"] is True
    assert report["failed_after_cut"] >= 3
    assert 1.0 <= report["recovery_s"] <= 4.5, report["recovery_s"]
    assert "--max-outage" in result.stderr


def test_bad_cuts_are_refused_before_probing(stack):
    gone = run_xpart("drill", *stack.probe_args(), "stop", "--pid", "99999999")
    assert gone.returncode == 2
    assert "pid 99999999" in gone.stderr
    assert stack.audit("agent") == []

    dead_admin = f"127.0.0.1:{free_port()}"
    failed = run_xpart(
        "drill", *stack.probe_args(), "--before", "200ms", "drain-relay", "--admin", dead_admin
    )
    assert failed.returncode == 1
    assert "the cut" in failed.stderr and "failed" in failed.stderr


def route_world(moto_endpoint):
    """Two instances tagged as the pair "drill" and a route table pointing at the active."""
    reset_moto(moto_endpoint)
    ec2 = boto3.client(
        "ec2", endpoint_url=moto_endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    image = ec2.describe_images()["Images"][0]["ImageId"]
    enis = {}
    for role in ("active", "standby"):
        instance = ec2.run_instances(
            ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [
                {"Key": "xpart:pair", "Value": "drill"}, {"Key": "xpart:role", "Value": role}]}],
        )["Instances"][0]
        enis[role] = instance["NetworkInterfaces"][0]["NetworkInterfaceId"]
    table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="100.64.0.0/30", NetworkInterfaceId=enis["active"]
    )
    return ec2, table, enis


def route_target(ec2, table):
    routes = ec2.describe_route_tables(RouteTableIds=[table])["RouteTables"][0]["Routes"]
    moved = [r for r in routes if r.get("DestinationCidrBlock") == "100.64.0.0/30"]
    return moved[0].get("NetworkInterfaceId")


def test_an_ec2_route_failover_as_the_cut(stack, moto_endpoint):
    ec2, table, enis = route_world(moto_endpoint)
    result, report = run_json(
        "drill", *stack.probe_args(), *TIMING,
        "failover", "route", "--cidr", "100.64.0.0/30", "--route-table", table,
        "--pair", "drill", "--endpoint-url", moto_endpoint,
        env=aws_env(), timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert report["cut"] == "EC2 failover"
    assert any("replace-route" in line and enis["standby"] in line for line in report["cut_detail"])
    assert route_target(ec2, table) == enis["standby"]
    assert report["probes_failed"] == 0
    assert report["recovery_s"] == 0


def test_watch_probes_a_real_agent_and_fails_over_when_it_dies(stack, moto_endpoint):
    ec2, table, enis = route_world(moto_endpoint)
    watch = subprocess.Popen(
        [
            str(XPART), "--json", "failover", "watch",
            "--readyz", stack.agent.admin_url() + "/readyz", "--probe", *map(str, stack.probe_args()),
            "--timeout", "1s", "--interval", "200ms", "--failures", "3", "--once",
            "--max-runtime", "30s", "--pair", "drill", "--cidr", "100.64.0.0/30",
            "--route-table", table, "--endpoint-url", moto_endpoint,
        ],
        env=aws_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.5)
        assert route_target(ec2, table) == enis["active"]
        probes_while_healthy = len(stack.audit("agent"))
        stack.agent.stop()
        stdout, stderr = watch.communicate(timeout=40)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, stderr
    # Each healthy check sent a probe request through the agent's front.
    assert probes_while_healthy >= 2
    assert all(a["principal"] == "drill" and a["status"] == 200 for a in stack.audit("agent"))
    events = [json.loads(line) for line in stdout.splitlines()]
    kinds = [event["event"] for event in events]
    assert kinds[0] == "start", kinds
    # With --pair the watch then tags its instance active and the old one standby.
    assert kinds[-5:] == ["check_failed", "check_failed", "failing_over", "failover", "role"], kinds
    assert route_target(ec2, table) == enis["standby"]
