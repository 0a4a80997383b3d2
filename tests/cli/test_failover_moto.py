"""`xpart failover` against moto_server: every move is read back through the EC2 API.

Topology per test: one VPC and subnet; an active and a standby agent instance tagged
xpart:pair=bedrock / xpart:role=active|standby; a route table tagged for the pair whose
route 100.64.0.0/30 points at the active ENI, and a second tagged table without that route;
a secondary private IP (the floating IP callers dial) and an Elastic IP on the active ENI.
"""

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest

from conftest import XPART, aws_env, free_port, reset_moto, run_json, run_xpart

PAIR = "bedrock"
TUNNEL_CIDR = "100.64.0.0/30"
VIP = "10.0.1.100"


@pytest.fixture
def ec2(moto_endpoint):
    reset_moto(moto_endpoint)
    return boto3.client(
        "ec2",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def world(ec2, moto_endpoint):
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    image = ec2.describe_images()["Images"][0]["ImageId"]

    def agent(role):
        instance = ec2.run_instances(
            ImageId=image,
            MinCount=1,
            MaxCount=1,
            InstanceType="t3.micro",
            SubnetId=subnet,
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [
                        {"Key": "xpart:pair", "Value": PAIR},
                        {"Key": "xpart:role", "Value": role},
                    ],
                }
            ],
        )["Instances"][0]
        eni = instance["NetworkInterfaces"][0]["NetworkInterfaceId"]
        return instance["InstanceId"], eni

    active, active_eni = agent("active")
    standby, standby_eni = agent("standby")

    def tagged_table():
        table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
        ec2.create_tags(Resources=[table], Tags=[{"Key": "xpart:pair", "Value": PAIR}])
        return table

    with_route = tagged_table()
    ec2.create_route(
        RouteTableId=with_route, DestinationCidrBlock=TUNNEL_CIDR, NetworkInterfaceId=active_eni
    )
    without_route = tagged_table()
    untagged = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.create_route(
        RouteTableId=untagged, DestinationCidrBlock=TUNNEL_CIDR, NetworkInterfaceId=active_eni
    )

    ec2.assign_private_ip_addresses(NetworkInterfaceId=active_eni, PrivateIpAddresses=[VIP])
    eip = ec2.allocate_address(Domain="vpc")
    ec2.associate_address(AllocationId=eip["AllocationId"], NetworkInterfaceId=active_eni)

    return {
        "endpoint": moto_endpoint,
        "vpc": vpc,
        "active": active,
        "active_eni": active_eni,
        "standby": standby,
        "standby_eni": standby_eni,
        "with_route": with_route,
        "without_route": without_route,
        "untagged": untagged,
        "allocation_id": eip["AllocationId"],
        "public_ip": eip["PublicIp"],
    }


def route_target(ec2, table, cidr=TUNNEL_CIDR):
    routes = ec2.describe_route_tables(RouteTableIds=[table])["RouteTables"][0]["Routes"]
    for route in routes:
        if route.get("DestinationCidrBlock") == cidr:
            return route.get("NetworkInterfaceId")
    return None


def secondary_ips(ec2, eni):
    interface = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]
    return {ip["PrivateIpAddress"] for ip in interface["PrivateIpAddresses"] if not ip["Primary"]}


def eip_interface(ec2, allocation_id):
    return ec2.describe_addresses(AllocationIds=[allocation_id])["Addresses"][0].get(
        "NetworkInterfaceId"
    )


def failover(world, *args):
    return run_xpart("failover", *args, "--endpoint-url", world["endpoint"])


# --- route -----------------------------------------------------------------------------


def test_route_by_tags_replaces_the_route_and_creates_the_missing_one(ec2, world):
    result = failover(world, "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR)
    assert result.returncode == 0, result.stderr
    assert route_target(ec2, world["with_route"]) == world["standby_eni"]
    assert route_target(ec2, world["without_route"]) == world["standby_eni"]
    # Only tables tagged for the pair are touched.
    assert route_target(ec2, world["untagged"]) == world["active_eni"]
    assert f"replace-route --route-table-id {world['with_route']}" in result.stdout
    assert f"create-route --route-table-id {world['without_route']}" in result.stdout


def test_route_is_idempotent(ec2, world):
    first = failover(world, "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR)
    assert first.returncode == 0, first.stderr
    second, report = run_json(
        "failover", "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR,
        "--endpoint-url", world["endpoint"],
    )
    assert second.returncode == 0, second.stderr
    assert report["plan"]["actions"] == []
    assert len(report["plan"]["in_place"]) == 2
    assert report["applied"] == []


def test_route_dry_run_prints_the_exact_plan_and_changes_nothing(ec2, world):
    result, report = run_json(
        "failover", "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR, "--dry-run",
        "--endpoint-url", world["endpoint"],
    )
    assert result.returncode == 0, result.stderr
    assert report["dry_run"] is True
    actions = {a["action"]: a for a in report["plan"]["actions"]}
    assert actions["ReplaceRoute"] == {
        "action": "ReplaceRoute",
        "route_table_id": world["with_route"],
        "destination_cidr": TUNNEL_CIDR,
        "network_interface_id": world["standby_eni"],
        "previous_target": world["active_eni"],
    }
    assert actions["CreateRoute"]["route_table_id"] == world["without_route"]
    assert report["applied"] == []
    assert route_target(ec2, world["with_route"]) == world["active_eni"]
    assert route_target(ec2, world["without_route"]) is None

    text = failover(world, "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR, "--dry-run")
    assert text.returncode == 0
    assert "dry run, would run:" in text.stdout
    assert (
        f"aws ec2 replace-route --route-table-id {world['with_route']} "
        f"--destination-cidr-block {TUNNEL_CIDR} --network-interface-id {world['standby_eni']}"
    ) in text.stdout
    assert route_target(ec2, world["with_route"]) == world["active_eni"]


def test_route_with_explicit_table_and_instance(ec2, world):
    result = failover(
        world, "route", "--cidr", TUNNEL_CIDR,
        "--route-table", world["untagged"], "--to-instance", world["standby"],
    )
    assert result.returncode == 0, result.stderr
    assert route_target(ec2, world["untagged"]) == world["standby_eni"]
    assert route_target(ec2, world["with_route"]) == world["active_eni"]


def test_route_back_to_the_active_by_role(ec2, world):
    assert failover(world, "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR).returncode == 0
    back = failover(world, "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR, "--role", "active")
    assert back.returncode == 0, back.stderr
    assert route_target(ec2, world["with_route"]) == world["active_eni"]


def test_route_table_tag_selects_tables(ec2, world):
    ec2.create_tags(Resources=[world["untagged"]], Tags=[{"Key": "team", "Value": "ml"}])
    result = failover(
        world, "route", "--cidr", TUNNEL_CIDR, "--route-table-tag", "team=ml",
        "--to-eni", world["standby_eni"],
    )
    assert result.returncode == 0, result.stderr
    assert route_target(ec2, world["untagged"]) == world["standby_eni"]
    assert route_target(ec2, world["with_route"]) == world["active_eni"]


# --- vip / eip / source-dest-check ---------------------------------------------------------


def test_vip_moves_to_the_standby_and_leaves_the_active(ec2, world):
    result = failover(world, "vip", "--ip", VIP, "--pair", PAIR)
    assert result.returncode == 0, result.stderr
    assert VIP in secondary_ips(ec2, world["standby_eni"])
    # moto keeps the address on the old ENI after a reassignment; xpart releases it.
    assert VIP not in secondary_ips(ec2, world["active_eni"])
    again, report = run_json(
        "failover", "vip", "--ip", VIP, "--pair", PAIR, "--endpoint-url", world["endpoint"]
    )
    assert again.returncode == 0
    assert report["plan"]["actions"] == []


def test_vip_dry_run_changes_nothing(ec2, world):
    result = failover(world, "vip", "--ip", VIP, "--to-eni", world["standby_eni"], "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "assign-private-ip-addresses" in result.stdout
    assert "--allow-reassignment" in result.stdout
    assert VIP in secondary_ips(ec2, world["active_eni"])
    assert VIP not in secondary_ips(ec2, world["standby_eni"])


def test_vip_refuses_to_move_a_primary_address(ec2, world):
    interface = ec2.describe_network_interfaces(NetworkInterfaceIds=[world["active_eni"]])
    primary = interface["NetworkInterfaces"][0]["PrivateIpAddress"]
    result = failover(world, "vip", "--ip", primary, "--pair", PAIR)
    assert result.returncode == 2
    assert "primary private IP" in result.stderr
    assert primary not in secondary_ips(ec2, world["standby_eni"])


def test_eip_moves_with_reassociation(ec2, world):
    result = failover(world, "eip", "--allocation-id", world["allocation_id"], "--pair", PAIR)
    assert result.returncode == 0, result.stderr
    assert eip_interface(ec2, world["allocation_id"]) == world["standby_eni"]
    assert "--allow-reassociation" in result.stdout


def test_eip_by_public_ip_and_dry_run(ec2, world):
    dry = failover(world, "eip", "--public-ip", world["public_ip"], "--pair", PAIR, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert eip_interface(ec2, world["allocation_id"]) == world["active_eni"]
    real = failover(world, "eip", "--public-ip", world["public_ip"], "--pair", PAIR)
    assert real.returncode == 0, real.stderr
    assert eip_interface(ec2, world["allocation_id"]) == world["standby_eni"]


def test_source_dest_check_turns_off_for_the_whole_pair(ec2, world):
    def check(instance):
        return ec2.describe_instance_attribute(InstanceId=instance, Attribute="sourceDestCheck")[
            "SourceDestCheck"
        ]["Value"]

    assert check(world["active"]) is True
    result = failover(world, "source-dest-check", "--pair", PAIR)
    assert result.returncode == 0, result.stderr
    assert check(world["active"]) is False
    assert check(world["standby"]) is False
    enable = failover(world, "source-dest-check", "--instance", world["active"], "--enable")
    assert enable.returncode == 0, enable.stderr
    assert check(world["active"]) is True
    assert check(world["standby"]) is False


# --- bad input ---------------------------------------------------------------------------


def test_unknown_instance_is_an_aws_error_with_a_hint(ec2, world):
    result = failover(
        world, "route", "--cidr", TUNNEL_CIDR, "--route-table", world["with_route"],
        "--to-instance", "i-0123456789abcdef0",
    )
    assert result.returncode == 3
    assert "i-0123456789abcdef0" in result.stderr
    assert "region" in result.stderr
    assert route_target(ec2, world["with_route"]) == world["active_eni"]


def test_unknown_route_table_and_allocation(ec2, world):
    table = failover(
        world, "route", "--cidr", TUNNEL_CIDR, "--route-table", "rtb-0000000000000000a",
        "--pair", PAIR,
    )
    assert table.returncode == 3
    assert "DescribeRouteTables" in table.stderr
    eip = failover(world, "eip", "--allocation-id", "eipalloc-00000000000000000", "--pair", PAIR)
    assert eip.returncode == 3
    assert "eipalloc-00000000000000000" in eip.stderr
    assert eip_interface(ec2, world["allocation_id"]) == world["active_eni"]


def test_standby_tags_must_match_exactly_one_instance(ec2, world):
    missing = failover(world, "route", "--cidr", TUNNEL_CIDR, "--pair", "nonexistent-pair")
    assert missing.returncode == 3
    assert "xpart:pair=nonexistent-pair" in missing.stderr
    ec2.create_tags(Resources=[world["active"]], Tags=[{"Key": "xpart:role", "Value": "standby"}])
    ambiguous = failover(world, "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR)
    assert ambiguous.returncode == 3
    assert "2 instances" in ambiguous.stderr
    assert route_target(ec2, world["with_route"]) == world["active_eni"]


def test_usage_errors_exit_2(world):
    no_cidr = failover(world, "route", "--pair", PAIR)
    assert no_cidr.returncode == 2
    assert "--cidr" in no_cidr.stderr
    no_standby = failover(world, "route", "--cidr", TUNNEL_CIDR, "--route-table", "rtb-1")
    assert no_standby.returncode == 2
    assert "--to-eni" in no_standby.stderr
    bad_cidr = failover(world, "route", "--cidr", "300.1.0.0/16", "--pair", PAIR)
    assert bad_cidr.returncode == 2


def test_missing_region_is_a_usage_error(world):
    env = aws_env()
    del env["AWS_REGION"]
    result = run_xpart(
        "failover", "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR,
        "--endpoint-url", world["endpoint"], env=env,
    )
    assert result.returncode == 2
    assert "--region" in result.stderr


def test_missing_credentials_are_explained(world):
    env = aws_env()
    del env["AWS_ACCESS_KEY_ID"]
    del env["AWS_SECRET_ACCESS_KEY"]
    result = run_xpart(
        "failover", "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR,
        "--endpoint-url", world["endpoint"], env=env,
    )
    assert result.returncode == 3
    assert "no AWS credentials found" in result.stderr
    assert "AWS_PROFILE" in result.stderr


def test_unreachable_endpoint_is_explained(world):
    port = free_port()
    started = time.monotonic()
    result = run_xpart(
        "failover", "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR,
        "--endpoint-url", f"http://127.0.0.1:{port}",
    )
    assert result.returncode == 3
    assert "cannot reach the EC2 endpoint: " in result.stderr
    assert "Connection refused" in result.stderr
    assert time.monotonic() - started < 45


# --- watch -------------------------------------------------------------------------------


class FakeAgent:
    """An agent admin port whose /readyz answers 200 until `fail()` is called."""

    def __init__(self):
        self.healthy = True
        self.checks = 0
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                agent.checks += 1
                if self.path != "/readyz":
                    self.send_error(404)
                    return
                status = 200 if agent.healthy else 503
                body = json.dumps({"ready": agent.healthy}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail(self):
        self.healthy = False

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_agent():
    agent = FakeAgent()
    yield agent
    agent.close()


def start_watch(world, fake_agent, *extra):
    return subprocess.Popen(
        [
            str(XPART), "--json", "failover", "watch",
            "--readyz", f"http://127.0.0.1:{fake_agent.port}/readyz",
            "--interval", "200ms", "--failures", "3", "--timeout", "1s",
            "--pair", PAIR, "--cidr", TUNNEL_CIDR, "--ip", VIP,
            "--endpoint-url", world["endpoint"], *extra,
        ],
        env=aws_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def events(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def instance_role(ec2, instance):
    reservation = ec2.describe_instances(InstanceIds=[instance])["Reservations"][0]
    tags = {t["Key"]: t["Value"] for t in reservation["Instances"][0].get("Tags", [])}
    return tags.get("xpart:role")


def test_watch_fails_over_after_n_failures_then_hands_the_watch_over(ec2, world, fake_agent):
    watch = start_watch(world, fake_agent, "--hold-down", "60s", "--max-runtime", "7s")
    try:
        # Healthy for a while: nothing moves.
        time.sleep(1.5)
        assert fake_agent.checks >= 3
        assert route_target(ec2, world["with_route"]) == world["active_eni"]

        fake_agent.fail()

        def moved():
            return (
                route_target(ec2, world["with_route"]) == world["standby_eni"]
                and route_target(ec2, world["without_route"]) == world["standby_eni"]
                and VIP in secondary_ips(ec2, world["standby_eni"])
                and VIP not in secondary_ips(ec2, world["active_eni"])
            )

        assert wait_until(moved, 10), "watch did not move the routes and the VIP"
        # The tags say who is active now: the next first boot of either member, the other
        # member's watch and `xpart failover --pair` all read them.
        assert wait_until(lambda: instance_role(ec2, world["standby"]) == "active", 5)
        assert instance_role(ec2, world["active"]) == "standby"

        # Someone moves the route back while the old active is still failing: this member is
        # the active one now and watches nothing, so it does not move it again.
        checks_after_move = fake_agent.checks
        ec2.replace_route(
            RouteTableId=world["with_route"],
            DestinationCidrBlock=TUNNEL_CIDR,
            NetworkInterfaceId=world["active_eni"],
        )
        stdout, stderr = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, stderr
    assert route_target(ec2, world["with_route"]) == world["active_eni"]
    assert fake_agent.checks <= checks_after_move + 1, "the active member checks nobody"

    log = events(stdout)
    kinds = [event["event"] for event in log]
    assert kinds[:2] == ["start", "role"], kinds
    assert kinds.count("failover") == 1, kinds
    first_failure = kinds.index("check_failed")
    failing_over = kinds.index("failing_over")
    assert kinds[first_failure:failing_over] == ["check_failed", "check_failed"]
    assert kinds[failing_over:] == ["failing_over", "failover", "role", "stop"], kinds
    moved = next(event for event in log if event["event"] == "failover")
    assert any("replace-route" in action for action in moved["actions"])
    assert any("assign-private-ip-addresses" in action for action in moved["actions"])
    handed = log[kinds.index("role", failing_over)]
    assert f"--resources {world['standby']} --tags Key=xpart:role,Value=active" in " ".join(handed["actions"])
    assert f"--resources {world['active']} --tags Key=xpart:role,Value=standby" in " ".join(handed["actions"])


def test_watch_without_a_pair_holds_down_after_a_move(ec2, world, fake_agent):
    watch = subprocess.Popen(
        [
            str(XPART), "--json", "failover", "watch",
            "--readyz", f"http://127.0.0.1:{fake_agent.port}/readyz",
            "--interval", "200ms", "--failures", "2", "--timeout", "1s",
            "--to-instance", world["standby"], "--route-table", world["with_route"],
            "--cidr", TUNNEL_CIDR, "--endpoint-url", world["endpoint"],
            "--hold-down", "60s", "--max-runtime", "5s",
        ],
        env=aws_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1)
        fake_agent.fail()
        assert wait_until(lambda: route_target(ec2, world["with_route"]) == world["standby_eni"], 10)
        ec2.replace_route(
            RouteTableId=world["with_route"],
            DestinationCidrBlock=TUNNEL_CIDR,
            NetworkInterfaceId=world["active_eni"],
        )
        stdout, stderr = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, stderr
    # In hold-down: no flapping, and no tag was touched without --pair.
    assert route_target(ec2, world["with_route"]) == world["active_eni"]
    kinds = [event["event"] for event in events(stdout)]
    assert kinds.count("failover") == 1 and "held_down" in kinds, kinds
    assert "role" not in kinds
    assert instance_role(ec2, world["standby"]) == "standby"


def test_watch_waits_until_the_active_agent_has_been_healthy_once(ec2, world, fake_agent):
    """At first boot the active agent is not ready yet: that is no failure."""
    fake_agent.fail()
    watch = start_watch(world, fake_agent, "--startup-grace", "10m", "--max-runtime", "12s")
    try:
        time.sleep(2.5)
        assert fake_agent.checks >= 8
        assert route_target(ec2, world["with_route"]) == world["active_eni"], "moved during start-up"
        assert VIP in secondary_ips(ec2, world["active_eni"])

        fake_agent.healthy = True
        time.sleep(1)
        fake_agent.fail()
        assert wait_until(lambda: route_target(ec2, world["with_route"]) == world["standby_eni"], 8)
        assert wait_until(lambda: instance_role(ec2, world["standby"]) == "active", 5)
        time.sleep(0.3)
    finally:
        if watch.poll() is None:
            watch.kill()
        stdout, _ = watch.communicate()
    kinds = [event["event"] for event in events(stdout)]
    assert "waiting" in kinds
    assert kinds.index("waiting") < kinds.index("check_failed") < kinds.index("failover")


def test_watch_fails_over_an_agent_never_seen_healthy_after_the_grace(ec2, world, fake_agent):
    fake_agent.fail()
    started = time.monotonic()
    watch = start_watch(world, fake_agent, "--startup-grace", "2s", "--once", "--max-runtime", "20s")
    stdout, stderr = watch.communicate(timeout=30)
    assert watch.returncode == 0, stderr
    assert time.monotonic() - started >= 2
    kinds = [event["event"] for event in events(stdout)]
    assert kinds[-2:] == ["failover", "role"], kinds
    assert kinds.index("waiting") < kinds.index("check_failed")
    assert route_target(ec2, world["with_route"]) == world["standby_eni"]


def test_the_watch_on_the_active_member_idles_until_it_is_tagged_standby(ec2, world, fake_agent):
    """Both agents run the watch; only the one tagged standby acts."""
    fake_agent.fail()
    watch = subprocess.Popen(
        [
            str(XPART), "--json", "failover", "watch",
            "--readyz", f"http://127.0.0.1:{fake_agent.port}/readyz",
            "--interval", "200ms", "--failures", "2", "--timeout", "1s", "--startup-grace", "10m",
            "--role-every", "200ms", "--pair", PAIR, "--to-eni", world["active_eni"],
            "--ip", VIP, "--endpoint-url", world["endpoint"], "--max-runtime", "10s",
        ],
        env=aws_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.5)
        assert fake_agent.checks == 0, "the active member checks nobody"

        # The operator failed over to the other member by hand and swapped the tags.
        ec2.create_tags(Resources=[world["active"]], Tags=[{"Key": "xpart:role", "Value": "standby"}])
        ec2.create_tags(Resources=[world["standby"]], Tags=[{"Key": "xpart:role", "Value": "active"}])
        ec2.assign_private_ip_addresses(
            NetworkInterfaceId=world["standby_eni"], PrivateIpAddresses=[VIP], AllowReassignment=True
        )
        ec2.unassign_private_ip_addresses(NetworkInterfaceId=world["active_eni"], PrivateIpAddresses=[VIP])
        assert wait_until(lambda: fake_agent.checks >= 3, 5), "the new standby does not watch"
        time.sleep(0.5)
        assert VIP not in secondary_ips(ec2, world["active_eni"]), "failing checks before any healthy one"

        fake_agent.healthy = True
        time.sleep(0.6)
        fake_agent.fail()
        assert wait_until(lambda: VIP in secondary_ips(ec2, world["active_eni"]), 8)
        assert wait_until(lambda: instance_role(ec2, world["active"]) == "active", 5)
        assert instance_role(ec2, world["standby"]) == "standby"
    finally:
        if watch.poll() is None:
            watch.kill()
        stdout, _ = watch.communicate()
    roles = [e["message"] for e in events(stdout) if e["event"] == "role"]
    assert "idle until it is tagged standby" in roles[0], roles
    assert "watching the active agent" in roles[1], roles


def test_manual_moves_rewrite_the_role_tags_only_when_asked(ec2, world):
    plain = failover(world, "vip", "--ip", VIP, "--pair", PAIR)
    assert plain.returncode == 0, plain.stderr
    assert instance_role(ec2, world["standby"]) == "standby"

    back = failover(world, "vip", "--ip", VIP, "--to-eni", world["active_eni"], "--pair", PAIR, "--set-roles")
    assert back.returncode == 0, back.stderr
    assert VIP in secondary_ips(ec2, world["active_eni"])
    assert instance_role(ec2, world["active"]) == "active"
    assert instance_role(ec2, world["standby"]) == "standby"

    over = failover(world, "vip", "--ip", VIP, "--pair", PAIR, "--set-roles")
    assert over.returncode == 0, over.stderr
    assert instance_role(ec2, world["standby"]) == "active"
    assert instance_role(ec2, world["active"]) == "standby"
    assert f"create-tags --resources {world['standby']}" in over.stdout


def test_a_member_interface_tagged_with_the_pair_receives_the_floating_address(ec2, world):
    """In the stacks each member's service interface is attached at boot as device 1."""
    subnet = ec2.describe_network_interfaces(NetworkInterfaceIds=[world["standby_eni"]])[
        "NetworkInterfaces"][0]["SubnetId"]
    member = ec2.create_network_interface(
        SubnetId=subnet,
        TagSpecifications=[{"ResourceType": "network-interface", "Tags": [
            {"Key": "xpart:pair", "Value": PAIR}, {"Key": "xpart:role", "Value": "standby"}]}],
    )["NetworkInterface"]["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=member, InstanceId=world["standby"], DeviceIndex=1)
    result = failover(world, "vip", "--ip", VIP, "--pair", PAIR, "--set-roles")
    assert result.returncode == 0, result.stderr
    assert VIP in secondary_ips(ec2, member)
    assert VIP not in secondary_ips(ec2, world["standby_eni"])
    tags = ec2.describe_network_interfaces(NetworkInterfaceIds=[member])["NetworkInterfaces"][0]["TagSet"]
    assert {"Key": "xpart:role", "Value": "active"} in tags


def test_watch_once_exits_after_the_failover(ec2, world, fake_agent):
    fake_agent.fail()
    watch = start_watch(world, fake_agent, "--once", "--startup-grace", "0s", "--max-runtime", "20s")
    stdout, stderr = watch.communicate(timeout=30)
    assert watch.returncode == 0, stderr
    kinds = [event["event"] for event in events(stdout)]
    assert kinds[-2:] == ["failover", "role"], kinds
    assert route_target(ec2, world["with_route"]) == world["standby_eni"]


def test_watch_that_stays_healthy_changes_nothing(ec2, world, fake_agent):
    watch = start_watch(world, fake_agent, "--max-runtime", "1500ms")
    stdout, stderr = watch.communicate(timeout=30)
    assert watch.returncode == 0, stderr
    kinds = [event["event"] for event in events(stdout)]
    assert kinds == ["start", "role", "stop"]
    assert route_target(ec2, world["with_route"]) == world["active_eni"]
    assert fake_agent.checks >= 5


def test_watch_dry_run_logs_the_plan_without_moving(ec2, world, fake_agent):
    fake_agent.fail()
    watch = start_watch(world, fake_agent, "--once", "--dry-run", "--startup-grace", "0s", "--max-runtime", "20s")
    stdout, stderr = watch.communicate(timeout=30)
    assert watch.returncode == 0, stderr
    last = events(stdout)[-1]
    assert last["event"] == "dry_run"
    assert any("replace-route" in action for action in last["actions"])
    assert route_target(ec2, world["with_route"]) == world["active_eni"]


def test_watch_refuses_a_standby_that_does_not_exist(world, fake_agent):
    result = run_xpart(
        "failover", "watch", "--readyz", f"127.0.0.1:{fake_agent.port}",
        "--to-instance", "i-0123456789abcdef0", "--cidr", TUNNEL_CIDR,
        "--route-table", world["with_route"], "--endpoint-url", world["endpoint"],
        "--max-runtime", "5s",
    )
    assert result.returncode == 3
    assert "i-0123456789abcdef0" in result.stderr


# --- throttling --------------------------------------------------------------------------


class ThrottlingProxy:
    """An EC2 endpoint that answers the first `throttle` calls with RequestLimitExceeded (as
    EC2 does under API rate limits) and forwards the rest to moto."""

    ERROR = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        b"<Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>"
        b"</Error></Errors><RequestID>throttled</RequestID></Response>"
    )

    def __init__(self, upstream, throttle):
        self.throttle = throttle
        self.throttled = 0
        self.forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if proxy.throttled < proxy.throttle:
                    proxy.throttled += 1
                    self.reply(503, proxy.ERROR)
                    return
                proxy.forwarded += 1
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                request = urllib.request.Request(upstream + self.path, data=body, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        self.reply(response.status, response.read())
                except urllib.error.HTTPError as err:
                    self.reply(err.code, err.read())

            def reply(self, status, payload):
                self.send_response(status)
                self.send_header("content-type", "text/xml")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_throttling_is_retried_with_backoff(ec2, world):
    proxy = ThrottlingProxy(world["endpoint"], throttle=3)
    try:
        result = run_xpart(
            "failover", "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR, "--endpoint-url", proxy.url
        )
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    assert proxy.throttled == 3
    assert proxy.forwarded >= 3
    assert route_target(ec2, world["with_route"]) == world["standby_eni"]


def test_endless_throttling_gives_up_with_an_explanation(ec2, world):
    proxy = ThrottlingProxy(world["endpoint"], throttle=10_000)
    started = time.monotonic()
    try:
        result = run_xpart(
            "failover", "route", "--cidr", TUNNEL_CIDR, "--pair", PAIR, "--endpoint-url", proxy.url
        )
    finally:
        proxy.close()
    assert result.returncode == 3
    assert "RequestLimitExceeded" in result.stderr
    assert "throttling" in result.stderr
    assert proxy.throttled == 6, "one call and five retries"
    assert proxy.forwarded == 0
    assert time.monotonic() - started < 40
    assert route_target(ec2, world["with_route"]) == world["active_eni"]


def test_a_member_without_a_role_tag_never_acts(ec2, world, fake_agent):
    ec2.delete_tags(Resources=[world["standby"]], Tags=[{"Key": "xpart:role"}])
    fake_agent.fail()
    watch = subprocess.Popen(
        [
            str(XPART), "--json", "failover", "watch",
            "--readyz", f"http://127.0.0.1:{fake_agent.port}/readyz",
            "--interval", "200ms", "--failures", "1", "--startup-grace", "0s",
            "--pair", PAIR, "--to-eni", world["standby_eni"], "--ip", VIP,
            "--endpoint-url", world["endpoint"], "--max-runtime", "2s",
        ],
        env=aws_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stdout, stderr = watch.communicate(timeout=30)
    assert watch.returncode == 0, stderr
    assert fake_agent.checks == 0
    assert VIP in secondary_ips(ec2, world["active_eni"])
    roles = [e["message"] for e in events(stdout) if e["event"] == "role"]
    assert len(roles) == 1 and "has no xpart:role tag" in roles[0], roles
