"""Checks on images/: the AMI templates, the systemd units and their companions, and the two
CloudFormation stacks, as CI can run them without an AWS account.

Tools: cfn-lint (PyPI), Debian's packer 1.6.6, systemd-analyze (Debian's systemd), logrotate,
binutils and rustc (the debug-info split of the release binaries).
A test whose tool is missing skips and says which package provides it; CI installs them all.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

decode = pytest.importorskip("cfnlint.decode", reason="cfn-lint not installed (pip install -r tests/requirements.txt)").decode

from stack_model import evaluate_conditions, parameter_values, resolve, rule_failures, stack_for  # noqa: E402 (needs cfn-lint)

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
PACKER_DIR = IMAGES / "packer"
UNITS = IMAGES / "systemd"
GOVCLOUD = IMAGES / "cloudformation" / "govcloud.yaml"
COMMERCIAL = IMAGES / "cloudformation" / "commercial.yaml"
GUIDE = IMAGES / "README.md"
SPLIT_DEBUG = PACKER_DIR / "split-debug.sh"

DAEMON_UNITS = ["xpart-agent.service", "xpart-relay.service"]
ALLOWED_CAPS = {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}


def run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


def need(tool, package):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (apt-get install -y --no-install-recommends {package})")


def load_stack(path):
    template, problems = decode(str(path))
    assert not problems, f"{path.name} does not parse: {problems}"
    return template


def govcloud_in_mode(mode, **parameters):
    """The GovCloud stack as CloudFormation sees it with DeploymentMode `mode` (and AgentCount
    and the other `parameters` given): the branches they decide chosen, the resources and
    outputs they rule out gone."""
    return stack_for(GOVCLOUD, **dict(parameters, DeploymentMode=mode))[0]


def resources(template, kind):
    return {
        name: res.get("Properties", {})
        for name, res in template["Resources"].items()
        if res["Type"] == kind
    }


def strings_in(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings_in(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


# ---------------------------------------------------------------------------------------------
# CloudFormation


@pytest.mark.parametrize(
    "template, regions",
    [(GOVCLOUD, ["us-gov-west-1", "us-gov-east-1"]), (COMMERCIAL, ["us-east-1"])],
    ids=["govcloud", "commercial"],
)
def test_stack_passes_cfn_lint_for_its_partition(template, regions):
    need("cfn-lint", "python3-cfnlint or pip install cfn-lint")
    result = run(["cfn-lint", "--regions", *regions, "--", str(template)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_run_rejects_a_resource_govcloud_does_not_have(tmp_path):
    """The lint above really checks the GovCloud region schemas, not only YAML syntax."""
    need("cfn-lint", "pip install cfn-lint")
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        GOVCLOUD.read_text().replace(
            "Type: AWS::EC2::LaunchTemplate", "Type: AWS::EC2::LaunchTemplateTypo"
        )
    )
    result = run(["cfn-lint", "--regions", "us-gov-west-1", "--", str(broken)])
    assert result.returncode != 0
    assert "LaunchTemplateTypo" in result.stdout


@pytest.mark.parametrize(
    "path", sorted(p for p in IMAGES.rglob("*") if p.is_file()), ids=lambda p: str(p.relative_to(IMAGES))
)
def test_no_file_hard_codes_the_commercial_partition(path):
    assert "arn:aws:" not in path.read_text(errors="replace"), (
        f"{path}: use arn:${{AWS::Partition}}: so the same text works in aws-us-gov"
    )


@pytest.mark.parametrize("stack", [GOVCLOUD, COMMERCIAL], ids=["govcloud", "commercial"])
def test_every_arn_in_the_stacks_takes_the_partition_from_the_stack(stack):
    template = load_stack(stack)
    arns = [s for s in strings_in(template["Resources"]) if s.startswith("arn:")]
    assert arns, "the stack should build ARNs for its IAM policies"
    for arn in arns:
        assert arn.startswith("arn:${AWS::Partition}:"), arn


MEMBERS = {GOVCLOUD: ("Agent", "agent"), COMMERCIAL: ("Relay", "relay")}


def every_member(stack):
    """The stack with every member it can have, and their letters: the GovCloud stack's agents
    c to f exist in multi-az with AgentCount 3 to 6."""
    if stack == GOVCLOUD:
        return govcloud_in_mode("multi-az", AgentCount="6"), "ABCDEF"
    return load_stack(stack), "AB"


@pytest.mark.parametrize("stack", [GOVCLOUD, COMMERCIAL], ids=["govcloud", "commercial"])
def test_each_member_launches_from_its_own_template_with_imdsv2_only_and_encrypted_volumes(stack):
    template, members = every_member(stack)
    prefix, kind = MEMBERS[stack]
    templates = resources(template, "AWS::EC2::LaunchTemplate")
    assert sorted(templates) == [f"{prefix}{member}LaunchTemplate" for member in members]
    for member in members:
        data = templates[f"{prefix}{member}LaunchTemplate"]["LaunchTemplateData"]
        assert data["MetadataOptions"]["HttpTokens"] == "required"
        assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
        assert data["MetadataOptions"]["InstanceMetadataTags"] == "enabled"
        mappings = data["BlockDeviceMappings"]
        assert mappings and all(m["Ebs"]["Encrypted"] is True for m in mappings)
        # One role per member: the instance profile is what differs between the templates.
        assert data["IamInstanceProfile"] == {"Arn": {"Fn::GetAtt": [f"{prefix}{member}InstanceProfile", "Arn"]}}
        profile = template["Resources"][f"{prefix}{member}InstanceProfile"]["Properties"]
        assert profile["Roles"] == [{"Ref": f"{prefix}{member}Role"}]
    assert not resources(template, "AWS::EC2::Instance"), "members are Auto Scaling groups, not fixed instances"


@pytest.mark.parametrize("stack", [GOVCLOUD, COMMERCIAL], ids=["govcloud", "commercial"])
def test_an_update_replaces_one_member_at_a_time_and_waits_until_it_serves(stack):
    """The order of operations of a rolling upgrade, as CloudFormation derives it from the
    template: member a's group first (terminate, launch, boot takes the member's interface or
    Elastic IP, signal when /readyz answers), member b's only after a's signal (DependsOn)."""
    template, members = every_member(stack)
    prefix, kind = MEMBERS[stack]
    groups = {name: res for name, res in template["Resources"].items()
              if res["Type"] == "AWS::AutoScaling::AutoScalingGroup"}
    assert sorted(groups) == [f"{prefix}{member}Group" for member in members]
    for member in members:
        group = groups[f"{prefix}{member}Group"]
        props = group["Properties"]
        assert (props["MinSize"], props["MaxSize"], props["DesiredCapacity"]) == ("1", "1", "1")
        assert props["LaunchTemplate"] == {
            "LaunchTemplateId": {"Ref": f"{prefix}{member}LaunchTemplate"},
            # A new template version (AMI, user data, instance type) is what triggers the update.
            "Version": {"Fn::GetAtt": [f"{prefix}{member}LaunchTemplate", "LatestVersionNumber"]},
        }
        rolling = group["UpdatePolicy"]["AutoScalingRollingUpdate"]
        # The old instance goes first: the member's interface attaches to one instance only.
        assert rolling["MinInstancesInService"] == 0
        assert rolling["MaxBatchSize"] == 1
        assert rolling["WaitOnResourceSignals"] is True
        assert "ReplaceUnhealthy" in rolling["SuspendProcesses"]
        assert group["CreationPolicy"]["ResourceSignal"]["Count"] == 1
        tags = {t["Key"]: (t["Value"], t["PropagateAtLaunch"]) for t in props["Tags"]}
        assert tags["xpart:name"] == (f"{kind}-{member.lower()}", True)
        assert tags["xpart:pair"] == ({"Ref": "DeploymentName"}, True)
        assert "xpart:role" not in tags, "the role lives on the member interface, not in the group"
    # Each member after the first waits for the one before it: one member at a time.
    for before, member in zip(members, members[1:]):
        depends = groups[f"{prefix}{member}Group"]["DependsOn"]
        assert f"{prefix}{before}Group" in ([depends] if isinstance(depends, str) else depends)
    assert not [d for d in groups[f"{prefix}AGroup"].get("DependsOn", []) if d.endswith("Group")]

    # The member signals the logical ID the user data names for it.
    user_data = (IMAGES / "cloud-init" / f"{kind}-user-data.yaml").read_text()
    for member in "ab":
        assert re.search(rf"XPART_PAIR_\d={kind}-{member},.*,{prefix}{member.upper()}Group\n", user_data)
    # Agents c to f: their rows are Fn::Sub variables of the same user data.
    (launch, *_) = resources(template, "AWS::EC2::LaunchTemplate").values()
    sub = launch["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]
    for member in members[2:]:
        row = sub[1][f"Agent{member}PairRow"]["Fn::Sub"]
        assert re.fullmatch(rf"XPART_PAIR_\d={kind}-{member.lower()},.*,{prefix}{member}Group", row)
    signal = (UNITS / "xpart-signal.service").read_text()
    assert "ExecStart=/usr/local/libexec/xpart/xpart-boot --signal-when-ready" in signal
    for member in members:
        role = template["Resources"][f"{prefix}{member}Role"]["Properties"]
        signals = [s for s in _statements(role) if "cloudformation:SignalResource" in _actions(s)]
        assert [s["Resource"] for s in signals] == [{"Ref": "AWS::StackId"}]


def test_the_agents_member_interfaces_carry_the_role_and_the_floating_address():
    template = govcloud_in_mode("pair")
    roles = {}
    for name in ("AgentANetworkInterface", "AgentBNetworkInterface"):
        props = template["Resources"][name]["Properties"]
        tags = {t["Key"]: t["Value"] for t in props["Tags"]}
        assert tags["xpart:pair"] == {"Ref": "DeploymentName"}
        roles[tags["xpart:name"]] = tags["xpart:role"]
    assert roles == {"agent-a": "active", "agent-b": "standby"}
    eni = template["Resources"]["AgentANetworkInterface"]["Properties"]
    assert {"PrivateIpAddress": {"Ref": "FloatingAddress"}, "Primary": False} in eni["PrivateIpAddresses"]
    for member in "AB":
        association = template["Resources"][f"Agent{member}ElasticIp"]["Properties"]
        assert association["NetworkInterfaceId"] == {"Ref": f"Agent{member}NetworkInterface"}
    user_data = (IMAGES / "cloud-init" / "agent-user-data.yaml").read_text()
    assert "${AgentANetworkInterface},AgentAGroup" in user_data
    assert "${AgentBNetworkInterface},AgentBGroup" in user_data


@pytest.mark.parametrize(
    "stack, user_data",
    [
        (GOVCLOUD, IMAGES / "cloud-init" / "agent-user-data.yaml"),
        (COMMERCIAL, IMAGES / "cloud-init" / "relay-user-data.yaml"),
    ],
    ids=["govcloud", "commercial"],
)
def test_stack_user_data_is_the_cloud_init_file_verbatim(stack, user_data):
    template = load_stack(stack)
    launch_templates = resources(template, "AWS::EC2::LaunchTemplate").values()
    assert len(launch_templates) == len(every_member(stack)[1])
    variables = set()
    for lt in launch_templates:
        # [text, variables]: the rows of the members that exist only with a larger AgentCount.
        embedded, local = lt["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]
        assert embedded == user_data.read_text(), (
            f"{stack.name} and {user_data.name} drifted apart; copy the file into every launch template"
        )
        variables.add(str(local))
    assert len(variables) == 1, "every member's launch template fills the placeholders alike"
    known = (set(template["Parameters"]) | set(template["Resources"]) | set(local)
             | {"AWS::Region", "AWS::Partition", "AWS::AccountId", "AWS::StackName"})
    placeholders = set(re.findall(r"\$\{([^}!]+)\}", embedded))
    assert placeholders <= known, f"unknown placeholders {placeholders - known}"


def _ingress(template, group):
    rules = list(template["Resources"][group]["Properties"].get("SecurityGroupIngress", []))
    for props in resources(template, "AWS::EC2::SecurityGroupIngress").values():
        if props["GroupId"] == {"Ref": group}:
            rules.append(props)
    return rules


def test_no_security_group_admits_the_whole_internet():
    for stack in (GOVCLOUD, COMMERCIAL):
        template = load_stack(stack)
        for group in resources(template, "AWS::EC2::SecurityGroup"):
            for rule in _ingress(template, group):
                assert rule.get("CidrIp") != "0.0.0.0/0", (stack.name, group, rule)
                assert rule.get("CidrIpv6") != "::/0", (stack.name, group, rule)


def test_agents_admit_https_from_callers_and_dns_only_from_the_resolver_endpoint():
    template = govcloud_in_mode("pair")
    rules = _ingress(template, "AgentSecurityGroup")
    summary = sorted(
        (r["IpProtocol"], r["FromPort"], r["ToPort"], str(r.get("CidrIp") or r.get("SourceSecurityGroupId")))
        for r in rules
    )
    assert summary == [
        ("tcp", 53, 53, "{'Ref': 'ResolverEndpointSecurityGroup'}"),
        ("tcp", 443, 443, "{'Ref': 'CallerCidr'}"),
        ("tcp", 9100, 9100, "{'Ref': 'AgentSecurityGroup'}"),
        ("udp", 53, 53, "{'Ref': 'ResolverEndpointSecurityGroup'}"),
    ]
    egress = template["Resources"]["AgentSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    egress += [p for p in resources(template, "AWS::EC2::SecurityGroupEgress").values()
               if p["GroupId"] == {"Ref": "AgentSecurityGroup"}]
    # The failover watch on the standby must reach the active agent's admin port.
    assert {"IpProtocol": "tcp", "FromPort": 9100, "ToPort": 9100,
            "DestinationSecurityGroupId": {"Ref": "AgentSecurityGroup"}} in [
        {k: v for k, v in r.items() if k not in ("Description", "GroupId")} for r in egress]
    udp = [r for r in egress if r["IpProtocol"] == "udp"]
    assert [r["CidrIp"] for r in udp] == [{"Fn::Sub": "${RelayAPublicIp}/32"}, {"Fn::Sub": "${RelayBPublicIp}/32"}]
    assert all(r["FromPort"] == r["ToPort"] == {"Ref": "WireGuardPort"} for r in udp)


def test_relays_admit_wireguard_only_from_the_two_agent_addresses():
    template = stack_for(COMMERCIAL, AgentCount="2")[0]
    rules = _ingress(template, "RelaySecurityGroup")
    assert sorted(str(r["CidrIp"]) for r in rules) == [
        "{'Fn::Sub': '${AgentAPublicIp}/32'}",
        "{'Fn::Sub': '${AgentBPublicIp}/32'}",
    ]
    for rule in rules:
        assert rule["IpProtocol"] == "udp"
        assert rule["FromPort"] == rule["ToPort"] == {"Ref": "WireGuardPort"}
    endpoint_rules = _ingress(template, "EndpointSecurityGroup")
    assert [(r["IpProtocol"], r["FromPort"], r["SourceSecurityGroupId"]) for r in endpoint_rules] == [
        ("tcp", 443, {"Ref": "RelaySecurityGroup"})
    ]


def _statements(role):
    for policy in role["Policies"]:
        for statement in policy["PolicyDocument"]["Statement"]:
            if "Fn::If" in statement:
                yield from (s for s in statement["Fn::If"][1:] if "Ref" not in s)
            else:
                yield statement


def _actions(statement):
    actions = statement["Action"]
    return [actions] if isinstance(actions, str) else actions


def _policy_statements(template, policy):
    for statement in template["Resources"][policy]["Properties"]["PolicyDocument"]["Statement"]:
        if "Fn::If" in statement:
            yield from (s for s in statement["Fn::If"][1:] if "Ref" not in s)
        else:
            yield statement


def _plain_actions(statement):
    """Actions, a conditional one (Fn::If) as the action it adds."""
    return [a["Fn::If"][1] if isinstance(a, dict) else a for a in _actions(statement)]


def _plain_resources(statement):
    """Resources as their Fn::Sub strings, a conditional one (Fn::If) as the one it adds."""
    found = statement["Resource"]
    found = [found] if not isinstance(found, list) else found
    plain = [r["Fn::If"][1] if isinstance(r, dict) and "Fn::If" in r else r for r in found]
    return [r["Fn::Sub"] if isinstance(r, dict) else r for r in plain]


MODEL_ARNS = [
    "arn:${AWS::Partition}:bedrock:*::foundation-model/${AllowedFoundationModels}",
    "arn:${AWS::Partition}:bedrock:${AWS::Region}:${AWS::AccountId}:inference-profile/${AllowedInferenceProfiles}",
    "arn:${AWS::Partition}:bedrock:${AWS::Region}:${AWS::AccountId}:application-inference-profile/"
    "${AllowedApplicationInferenceProfiles}",
]
CATALOGUE_READS = ["bedrock:GetFoundationModel", "bedrock:GetInferenceProfile",
                   "bedrock:ListFoundationModels", "bedrock:ListInferenceProfiles"]


def test_relay_roles_may_only_invoke_the_allowed_models():
    template = load_stack(COMMERCIAL)
    invoke = template["Resources"]["RelayInvokePolicy"]["Properties"]
    assert invoke["Roles"] == [{"Ref": "RelayARole"}, {"Ref": "RelayBRole"}]
    statements = list(_policy_statements(template, "RelayInvokePolicy"))
    (models,) = [s for s in statements if s["Sid"] == "InvokeAllowedModels"]
    assert sorted(_plain_actions(models)) == [
        "bedrock:CountTokens", "bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream"]
    assert _plain_resources(models) == MODEL_ARNS
    # Application profiles only when the parameter names some.
    assert models["Resource"][2]["Fn::If"][0] == "UsesApplicationProfiles"
    assert models["Resource"][2]["Fn::If"][2] == {"Ref": "AWS::NoValue"}
    assert template["Conditions"]["UsesApplicationProfiles"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "AllowedApplicationInferenceProfiles"}, ""]}]}
    assert template["Parameters"]["AllowedApplicationInferenceProfiles"]["Default"] == ""
    for member in "AB":
        role = template["Resources"][f"Relay{member}Role"]["Properties"]
        assert "ManagedPolicyArns" not in role
        for s in _statements(role):
            assert not any(a.startswith("bedrock:") for a in _actions(s)), "Bedrock only through the shared policy"
            assert "*" not in _actions(s) and s["Resource"] != "*", s


def test_the_operations_parameter_drives_the_role_and_the_endpoint_policy_together():
    template = load_stack(COMMERCIAL)
    choices = template["Parameters"]["RelayOperations"]["AllowedValues"]
    conditions = template["Conditions"]

    def holds(name, value):
        return any(option["Fn::Equals"][1] == value for option in conditions[name]["Fn::Or"])

    assert len(choices) == 4
    for value in choices:
        words = value.split()
        assert holds("SignsCountTokens", value) == ("CountTokens" in words), value
        assert holds("SignsApplyGuardrail", value) == ("ApplyGuardrail" in words), value
    assert template["Parameters"]["RelayOperations"]["Default"] == (
        "InvokeModel InvokeModelWithResponseStream Converse ConverseStream")

    role = template["Resources"]["RelayInvokePolicy"]["Properties"]["PolicyDocument"]["Statement"]
    endpoint = template["Resources"]["BedrockRuntimeEndpoint"]["Properties"]["PolicyDocument"]["Statement"]
    for document in (role, endpoint):
        (models,) = [s for s in document if "Fn::If" not in s and "bedrock:InvokeModel" in s["Action"]]
        assert {"Fn::If": ["SignsCountTokens", "bedrock:CountTokens", {"Ref": "AWS::NoValue"}]} in models["Action"]
        (guardrails,) = [s for s in document if "Fn::If" in s]
        condition, statement, otherwise = guardrails["Fn::If"]
        assert condition == "SignsApplyGuardrail" and otherwise == {"Ref": "AWS::NoValue"}
        assert statement["Action"] == ["bedrock:ApplyGuardrail"]
        assert statement["Resource"] == {
            "Fn::Sub": "arn:${AWS::Partition}:bedrock:${AWS::Region}:${AWS::AccountId}:guardrail/*"}
    user_data = (IMAGES / "cloud-init" / "relay-user-data.yaml").read_text()
    assert 'XPART_OPERATIONS="${RelayOperations}"' in user_data


def test_bedrock_endpoint_is_private_dns_and_admits_only_the_relay_roles():
    template = stack_for(COMMERCIAL, FipsMode="false")[0]
    endpoint = template["Resources"]["BedrockRuntimeEndpoint"]["Properties"]
    assert endpoint["ServiceName"] == {"Fn::Sub": "com.amazonaws.${AWS::Region}.bedrock-runtime"}
    assert endpoint["VpcEndpointType"] == "Interface"
    assert endpoint["PrivateDnsEnabled"] is True
    document = endpoint["PolicyDocument"]["Statement"]
    statements = [s for s in document if "Fn::If" not in s] + [s["Fn::If"][1] for s in document if "Fn::If" in s]
    relays = [{"Fn::GetAtt": ["RelayARole", "Arn"]}, {"Fn::GetAtt": ["RelayBRole", "Arn"]}]
    for statement in statements:
        assert statement["Condition"]["ArnEquals"]["aws:PrincipalArn"] == relays
    assert sorted(a for a in statements[0]["Action"] if isinstance(a, str)) == [
        "bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream"]


def test_control_plane_endpoint_is_private_dns_and_admits_only_the_relays_catalogue_reads():
    template = stack_for(COMMERCIAL, FipsMode="false")[0]
    endpoints = resources(template, "AWS::EC2::VPCEndpoint")
    assert sorted(endpoints) == ["BedrockEndpoint", "BedrockRuntimeEndpoint"]
    control = endpoints["BedrockEndpoint"]
    assert control["ServiceName"] == {"Fn::Sub": "com.amazonaws.${AWS::Region}.bedrock"}
    assert control["VpcEndpointType"] == "Interface" and control["PrivateDnsEnabled"] is True
    runtime = endpoints["BedrockRuntimeEndpoint"]
    for key in ("VpcId", "SubnetIds", "SecurityGroupIds"):
        assert control[key] == runtime[key], key
    relays = [{"Fn::GetAtt": ["RelayARole", "Arn"]}, {"Fn::GetAtt": ["RelayBRole", "Arn"]}]
    statements = control["PolicyDocument"]["Statement"]
    granted = sorted(a for s in statements for a in _actions(s))
    assert granted == CATALOGUE_READS, "the control-plane endpoint admits the four reads and nothing else"
    for statement in statements:
        assert statement["Effect"] == "Allow"
        assert statement["Condition"]["ArnEquals"]["aws:PrincipalArn"] == relays
        if statement["Resource"] == "*":
            # Only the List calls, which take no resource-level permissions.
            assert sorted(_actions(statement)) == ["bedrock:ListFoundationModels", "bedrock:ListInferenceProfiles"]
        else:
            assert _plain_resources(statement) == MODEL_ARNS
    # The relays start only once both endpoints (and their private DNS) exist.
    assert template["Resources"]["RelayAGroup"]["DependsOn"] == ["BedrockRuntimeEndpoint", "BedrockEndpoint"]
    assert template["Outputs"]["BedrockEndpointId"]["Value"] == {"Ref": "BedrockEndpoint"}


def test_the_fips_endpoints_exist_exactly_when_fips_mode_is_on():
    """FipsMode true: the interface endpoints are the FIPS services' (whose private DNS answers
    bedrock-runtime-fips and bedrock-fips .<region>.amazonaws.com, the relays' upstreams then),
    with the policies, subnets and group of the plain ones; false: the plain services only."""
    plain = stack_for(COMMERCIAL, FipsMode="false")[0]
    for fips_mode in ("true", "false"):
        _check_endpoints(stack_for(COMMERCIAL, FipsMode=fips_mode)[0], plain, fips_mode)


def _check_endpoints(template, plain, fips_mode):
    endpoints = resources(template, "AWS::EC2::VPCEndpoint")
    suffix = "-fips" if fips_mode == "true" else ""
    assert {name: e["ServiceName"] for name, e in endpoints.items()} == {
        "BedrockRuntimeEndpoint": {"Fn::Sub": f"com.amazonaws.${{AWS::Region}}.bedrock-runtime{suffix}"},
        "BedrockEndpoint": {"Fn::Sub": f"com.amazonaws.${{AWS::Region}}.bedrock{suffix}"},
    }
    services = [s for s in strings_in(template["Resources"]) if ".bedrock" in s and "com.amazonaws" in s]
    assert all(s.endswith("-fips") == (fips_mode == "true") for s in services), services
    for name, endpoint in endpoints.items():
        assert endpoint["PrivateDnsEnabled"] is True and endpoint["VpcEndpointType"] == "Interface"
        same = {k: v for k, v in endpoint.items() if k != "ServiceName"}
        assert same == {k: v for k, v in plain["Resources"][name]["Properties"].items() if k != "ServiceName"}
    assert template["Resources"]["RelayAGroup"]["DependsOn"] == ["BedrockRuntimeEndpoint", "BedrockEndpoint"]
    assert template["Outputs"]["UpstreamEndpoint"]["Value"] == {
        "Fn::Sub": f"https://bedrock-runtime{suffix}.${{AWS::Region}}.amazonaws.com"}


@pytest.mark.parametrize("fips_mode", ["true", "false"])
def test_commercial_stack_passes_cfn_lint_with_fips_mode_on_and_off(tmp_path, fips_mode):
    need("cfn-lint", "pip install cfn-lint")
    variant = tmp_path / f"commercial-fips-{fips_mode}.yaml"
    variant.write_text(with_defaults(COMMERCIAL, {"FipsMode": fips_mode}))
    result = run(["cfn-lint", "--regions", "us-east-1", "us-west-2", "--", str(variant)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_stacks_default_to_fips_mode_and_pass_it_to_first_boot():
    """The AMIs are FIPS builds, so the stacks are in FIPS mode unless told otherwise; the
    agents and the relays must agree (inner TLS on both sides or neither)."""
    for stack, user_data in ((GOVCLOUD, "agent-user-data.yaml"), (COMMERCIAL, "relay-user-data.yaml")):
        parameter = load_stack(stack)["Parameters"]["FipsMode"]
        assert parameter["Default"] == "true" and parameter["AllowedValues"] == ["true", "false"], stack.name
        for name in ("inner-tls-certificate", "inner-tls-private-key", "inner-tls-ca-certificate"):
            assert name in load_stack(stack)["Parameters"]["ParameterPrefix"]["Description"], (stack.name, name)
        assert "XPART_FIPS_MODE=${FipsMode}\n" in (IMAGES / "cloud-init" / user_data).read_text()


def test_relay_roles_read_the_catalogue_the_control_plane_endpoint_admits():
    template = load_stack(COMMERCIAL)
    statements = list(_policy_statements(template, "RelayInvokePolicy"))
    reads = [s for s in statements if any(a in CATALOGUE_READS for a in _actions(s))]
    assert sorted(a for s in reads for a in _actions(s)) == CATALOGUE_READS
    for statement in reads:
        if statement["Resource"] == "*":
            assert sorted(_actions(statement)) == ["bedrock:ListFoundationModels", "bedrock:ListInferenceProfiles"]
        else:
            assert _plain_resources(statement) == MODEL_ARNS
    # No other control-plane action anywhere in the stack: every bedrock: action is a read above,
    # an invocation, or a conditional CountTokens / ApplyGuardrail.
    invocations = {"bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream", "bedrock:CountTokens",
                   "bedrock:ApplyGuardrail"}
    every = {a for a in strings_in(template["Resources"]) if a.startswith("bedrock:")}
    assert every == invocations | set(CATALOGUE_READS)


def test_the_relays_region_is_the_stacks_so_the_default_profile_prefix_applies():
    """The relay derives inference_profile_prefix from its upstream region (us-* → us.); the
    stack hands both members its own region and nothing sets a prefix."""
    template = load_stack(COMMERCIAL)
    for member in "AB":
        data = template["Resources"][f"Relay{member}LaunchTemplate"]["Properties"]["LaunchTemplateData"]
        text = "\n".join(strings_in(data["UserData"]))
        assert "XPART_BEDROCK_REGION=${AWS::Region}" in text, member
        assert "inference_profile_prefix" not in text and "PROFILE_PREFIX" not in text, member
    assert "inference_profile_prefix" not in (IMAGES / "cloud-init" / "relay-user-data.yaml").read_text()


def _all_statements(template, role_name):
    """A role's own statements and those of every managed policy the stack attaches to it."""
    role = template["Resources"][role_name]["Properties"]
    found = list(_statements(role))
    for name, props in resources(template, "AWS::IAM::ManagedPolicy").items():
        if {"Ref": role_name} in props["Roles"]:
            found += list(_policy_statements(template, name))
    return found


@pytest.mark.parametrize("member, other", [("a", "b"), ("b", "a")])
def test_each_agent_reads_only_its_own_key(member, other):
    template = load_stack(GOVCLOUD)
    reads = [s for s in _all_statements(template, f"Agent{member.upper()}Role")
             if {"ssm:GetParameter", "secretsmanager:GetSecretValue"} & set(_plain_actions(s))]
    assert len(reads) == 2, "one for SSM, one for Secrets Manager"
    for statement in reads:
        arns = [r["Fn::Sub"] for r in statement["Resource"]]
        assert any(arn.endswith(f"/agent-{member}/*") for arn in arns)
        assert any(arn.endswith("/agent/*") for arn in arns), "the shared TLS material and principals"
        assert not any(f"agent-{other}" in arn or arn.endswith("agent*") for arn in arns), arns


@pytest.mark.parametrize("member", ["a", "b"])
def test_each_relay_reads_only_its_own_key_and_takes_only_its_own_elastic_ip(member):
    template = load_stack(COMMERCIAL)
    statements = _all_statements(template, f"Relay{member.upper()}Role")
    reads = [s for s in statements if {"ssm:GetParameter", "secretsmanager:GetSecretValue"} & set(_plain_actions(s))]
    assert len(reads) == 2
    for statement in reads:
        assert statement["Resource"]["Fn::Sub"].endswith(f"/relay-{member}/*")
    associate = [s for s in statements if "ec2:AssociateAddress" in _actions(s)]
    eips = [s["Resource"]["Fn::Sub"] for s in associate if isinstance(s["Resource"], dict)]
    assert eips == [
        "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:elastic-ip/${Relay%sEipAllocationId}" % member.upper()]
    on_instances = [s for s in associate if isinstance(s["Resource"], list)]
    assert [s["Condition"] for s in on_instances] == [
        {"StringEquals": {"aws:ResourceTag/xpart:name": f"relay-{member}"}}]


@pytest.mark.parametrize("stack, members", [(GOVCLOUD, "Agent"), (COMMERCIAL, "Relay")], ids=["govcloud", "commercial"])
def test_session_manager_grants_only_what_the_ssm_agent_needs(stack, members):
    template = stack_for(stack, AgentCount="2")[0]
    policy = template["Resources"]["SessionManagerPolicy"]
    assert policy["Condition"] == "UseSessionManager"
    assert policy["Properties"]["Roles"] == [{"Ref": f"{members}ARole"}, {"Ref": f"{members}BRole"}]
    actions = {a for s in _policy_statements(template, "SessionManagerPolicy") for a in _actions(s)}
    assert actions == {
        "ssm:UpdateInstanceInformation",
        "ssmmessages:CreateControlChannel", "ssmmessages:CreateDataChannel",
        "ssmmessages:OpenControlChannel", "ssmmessages:OpenDataChannel",
        "ec2messages:AcknowledgeMessage", "ec2messages:DeleteMessage", "ec2messages:FailMessage",
        "ec2messages:GetEndpoint", "ec2messages:GetMessages", "ec2messages:SendReply",
    }
    for member in "AB":
        assert "ManagedPolicyArns" not in template["Resources"][f"{members}{member}Role"]["Properties"]


@pytest.mark.parametrize("member", ["A", "B"])
def test_agent_roles_grant_the_failover_calls_on_the_pairs_resources_only(member):
    template = load_stack(GOVCLOUD)
    granted = {}
    for s in _all_statements(template, f"Agent{member}Role"):
        for action in _actions(s):
            granted.setdefault(action, []).append(s)
    for action in [
        "ec2:ReplaceRoute",
        "ec2:CreateRoute",
        "ec2:AssignPrivateIpAddresses",
        "ec2:UnassignPrivateIpAddresses",
        "ec2:AssociateAddress",
        "ec2:DescribeRouteTables",
        "ec2:DescribeNetworkInterfaces",
        "ec2:DescribeInstances",
        "ec2:DescribeAddresses",
        "ec2:CreateTags",
        "ec2:AttachNetworkInterface",
        "ssm:GetParameter",
    ]:
        assert action in granted, f"{action} missing from agent-{member.lower()}'s role"
    for action, statements in granted.items():
        # Describe calls, the SSM agent's messaging and PutMetricData (limited by its
        # cloudwatch:namespace condition instead) take no resource-level permissions.
        if action.startswith(("ec2:Describe", "ssm:UpdateInstanceInformation", "ssmmessages:", "ec2messages:")):
            continue
        if action == "cloudwatch:PutMetricData":
            assert all(s["Condition"]["StringEquals"]["cloudwatch:namespace"] == "xpart" for s in statements)
            continue
        for statement in statements:
            assert statement["Resource"] != "*", f"{action} must not apply to every resource"
    (routes,) = granted["ec2:ReplaceRoute"]
    # `xpart failover --pair NAME` selects route tables and instances by these tags.
    assert routes["Condition"]["StringEquals"]["aws:ResourceTag/xpart:pair"] == {"Ref": "DeploymentName"}
    (tags,) = granted["ec2:CreateTags"]
    assert tags["Condition"]["StringEquals"]["aws:ResourceTag/xpart:pair"] == {"Ref": "DeploymentName"}
    assert tags["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"] == ["xpart:role"]
    (attach,) = granted["ec2:AttachNetworkInterface"]
    assert attach["Resource"][0] == {
        "Fn::Sub": "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:network-interface/${Agent%sNetworkInterface}" % member}
    assert attach["Condition"] == {"StringEquals": {"aws:ResourceTag/xpart:name": f"agent-{member.lower()}"}}


BEDROCK_PREFIXES = ["bedrock-runtime", "bedrock", "bedrock-runtime-fips", "bedrock-fips"]


def test_resolver_rules_forward_every_bedrock_name_to_the_floating_address():
    template = govcloud_in_mode("pair")
    (endpoint,) = resources(template, "AWS::Route53Resolver::ResolverEndpoint").values()
    assert endpoint["Direction"] == "OUTBOUND"
    rules = {name: res for name, res in template["Resources"].items()
             if res["Type"] == "AWS::Route53Resolver::ResolverRule"}
    domains = sorted(r["Properties"]["DomainName"]["Fn::Sub"] for r in rules.values())
    assert domains == sorted(f"{p}.${{BedrockRegion}}.amazonaws.com" for p in BEDROCK_PREFIXES)
    for rule in rules.values():
        assert rule["Condition"] == "UseResolverRule"
        assert rule["Properties"]["RuleType"] == "FORWARD"
        assert rule["Properties"]["TargetIps"] == [{"Ip": {"Ref": "FloatingAddress"}, "Port": "53"}]
    associations = resources(template, "AWS::Route53Resolver::ResolverRuleAssociation").values()
    assert sorted(a["ResolverRuleId"]["Ref"] for a in associations) == sorted(rules)
    assert all(a["VPCId"] == {"Ref": "VpcId"} for a in associations)


def test_hosted_zone_mode_points_every_bedrock_name_at_the_floating_address_instead():
    template = govcloud_in_mode("pair")
    assert template["Parameters"]["DnsMode"]["AllowedValues"] == ["resolver-rule", "hosted-zone"]
    zones = {name: res for name, res in template["Resources"].items() if res["Type"] == "AWS::Route53::HostedZone"}
    records = [res for res in template["Resources"].values() if res["Type"] == "AWS::Route53::RecordSet"]
    assert sorted(z["Properties"]["Name"]["Fn::Sub"] for z in zones.values()) == sorted(
        f"{p}.${{BedrockRegion}}.amazonaws.com" for p in BEDROCK_PREFIXES)
    for zone in zones.values():
        assert zone["Condition"] == "UseHostedZone"
        assert zone["Properties"]["VPCs"] == [{"VPCId": {"Ref": "VpcId"}, "VPCRegion": {"Ref": "AWS::Region"}}]
    assert len(records) == 4
    for record in records:
        props = record["Properties"]
        assert record["Condition"] == "UseHostedZone"
        assert props["Type"] == "A" and props["ResourceRecords"] == [{"Ref": "FloatingAddress"}]
        zone = template["Resources"][props["HostedZoneId"]["Ref"]]["Properties"]
        assert props["Name"] == zone["Name"], "the record is the zone's apex"
    # The endpoint and its security group exist only in resolver-rule mode.
    for name in ("ResolverOutboundEndpoint", "ResolverEndpointSecurityGroup", "AgentDnsFromResolverUdp"):
        assert template["Resources"][name]["Condition"] == "UseResolverRule"


def test_the_agents_answer_and_the_certificate_covers_every_name_the_rules_forward():
    user_data = (IMAGES / "cloud-init" / "agent-user-data.yaml").read_text()
    (names,) = re.findall(r'XPART_DNS_NAMES="([^"]+)"', user_data)
    assert names.split() == [f"{p}.${{BedrockRegion}}.amazonaws.com" for p in BEDROCK_PREFIXES]
    ca = (REPO / "cli" / "src" / "ca.rs").read_text()
    for prefix in BEDROCK_PREFIXES:
        assert f'"{prefix}",' in ca, f"xpart ca issue --region does not name {prefix}"


def multi_az_parameters(count, zones=3):
    """What an operator passes for `count` multi-az agents spread over `zones` zones (each
    GovCloud region has three): agent k in zone k mod `zones`, the balancer's address in the
    subnet of each agent that opens a zone. Only parameters that have a default, so the lint
    below can pass them as defaults."""
    values = {"DeploymentMode": "multi-az", "AgentCount": str(count),
              "AgentBSubnetId": "subnet-01000000000000000", "NlbAddresses": "10.0.1.20,10.0.2.20"}
    for k, member in enumerate("CDEF", start=2):
        if k >= count:
            break
        zone = k % zones
        values[f"Agent{member}SubnetId"] = f"subnet-0{zone}{k}00000000000000"
        values[f"Agent{member}PrivateAddress"] = f"10.0.{zone + 1}.{11 + k}"
        values[f"Agent{member}EipAllocationId"] = f"eipalloc-0{k}00000000000000"
        if k < zones:
            values[f"Agent{member}NlbAddress"] = f"10.0.{zone + 1}.20"
    return values


# What each DeploymentMode (and AgentCount) needs besides the defaults, as an operator passes it.
MODE_PARAMETERS = {
    "pair": {"FloatingAddress": "10.0.1.10", "AgentCount": "2"},
    "multi-az": multi_az_parameters(2),
    "multi-az-3": multi_az_parameters(3),
    "multi-az-6": multi_az_parameters(6),
}


def with_defaults(path, values):
    """The stack's text with `values` as the defaults of those parameters: cfn-lint resolves
    parameters to their defaults."""
    text = path.read_text()
    for name, value in values.items():
        block = re.search(rf"\n  {name}:\n    Type: String\n    Default: (\S+)\n", text)
        assert block, f"{name} has no default to replace"
        text = text.replace(block.group(0), block.group(0).replace(f"Default: {block.group(1)}", f'Default: "{value}"'))
    return text


@pytest.mark.parametrize("mode", list(MODE_PARAMETERS))
def test_govcloud_stack_passes_cfn_lint_in_each_deployment_mode(tmp_path, mode):
    """Each mode, and multi-az with AgentCount 2, 3 and 6, is linted with its own values as
    defaults, in both GovCloud regions."""
    need("cfn-lint", "pip install cfn-lint")
    variant = tmp_path / f"govcloud-{mode}.yaml"
    variant.write_text(with_defaults(GOVCLOUD, MODE_PARAMETERS[mode]))
    result = run(["cfn-lint", "--regions", "us-gov-west-1", "us-gov-east-1", "--", str(variant)])
    assert result.returncode == 0, result.stdout + result.stderr


def commercial_parameters(count):
    """The Commercial stack's agents c to f as an operator passes them for AgentCount `count`."""
    values = {"AgentCount": str(count)}
    for k, member in enumerate("CDEF", start=2):
        if k < count:
            values[f"Agent{member}PublicIp"] = f"192.0.2.{20 + k}"
            values[f"Agent{member}PublicKey"] = f"{member * 42}A="
    return values


@pytest.mark.parametrize("count", [2, 3, 6])
def test_commercial_stack_passes_cfn_lint_with_each_agent_count(tmp_path, count):
    need("cfn-lint", "pip install cfn-lint")
    variant = tmp_path / f"commercial-{count}.yaml"
    variant.write_text(with_defaults(COMMERCIAL, commercial_parameters(count)))
    result = run(["cfn-lint", "--regions", "us-east-1", "--", str(variant)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_pair_mode_has_no_load_balancer_and_multi_az_has_no_floating_address():
    pair, multi = govcloud_in_mode("pair"), govcloud_in_mode("multi-az")
    assert not [n for n, r in pair["Resources"].items() if r["Type"].startswith("AWS::ElasticLoadBalancingV2::")]
    assert "FloatingAddress" in pair["Outputs"] and "LoadBalancerAddresses" not in pair["Outputs"]
    eni = multi["Resources"]["AgentANetworkInterface"]["Properties"]["PrivateIpAddresses"]
    assert eni == [{"PrivateIpAddress": {"Ref": "AgentAPrivateAddress"}, "Primary": True}]
    assert "FloatingAddress" not in multi["Outputs"]
    assert resolve(multi["Outputs"]["LoadBalancerAddresses"]["Value"], {"NlbAddresses": "10.0.1.20,10.0.2.20"}, {}) == \
        "10.0.1.20,10.0.2.20"
    # Each mode refuses to start without what it needs (CloudFormation Rules).
    rules = load_stack(GOVCLOUD)["Rules"]
    assert rules["PairHasAFloatingAddress"]["RuleCondition"] == {"Fn::Equals": [{"Ref": "DeploymentMode"}, "pair"]}
    asserted = str(rules["MultiAzHasTwoZonesAndTheBalancersAddresses"]["Assertions"])
    assert "AgentBSubnetId" in asserted and "NlbAddresses" in asserted and "FloatingAddress" in asserted


def test_multi_az_agents_are_both_active_in_two_zones():
    template = govcloud_in_mode("multi-az")
    res = template["Resources"]
    roles = {}
    for member, subnet in (("A", "AgentSubnetId"), ("B", "AgentBSubnetId")):
        props = res[f"Agent{member}NetworkInterface"]["Properties"]
        assert props["SubnetId"] == {"Ref": subnet}
        tags = {t["Key"]: t["Value"] for t in props["Tags"]}
        roles[tags["xpart:name"]] = tags["xpart:role"]
        assert res[f"Agent{member}Group"]["Properties"]["VPCZoneIdentifier"] == [{"Ref": subnet}]
    assert roles == {"agent-a": "active", "agent-b": "active"}


def test_multi_az_puts_the_agents_behind_an_internal_network_load_balancer():
    template = govcloud_in_mode("multi-az")
    (lb,) = resources(template, "AWS::ElasticLoadBalancingV2::LoadBalancer").values()
    assert lb["Type"] == "network" and lb["Scheme"] == "internal"
    # One fixed address per agent's zone: what the agents' DNS answers.
    assert lb["SubnetMappings"] == [
        {"SubnetId": {"Ref": "AgentSubnetId"},
         "PrivateIPv4Address": {"Fn::Select": [0, {"Fn::Split": [",", {"Ref": "NlbAddresses"}]}]}},
        {"SubnetId": {"Ref": "AgentBSubnetId"},
         "PrivateIPv4Address": {"Fn::Select": [1, {"Fn::Split": [",", {"Ref": "NlbAddresses"}]}]}},
    ]
    assert {"Key": "load_balancing.cross_zone.enabled", "Value": "true"} in lb["LoadBalancerAttributes"]
    (listener,) = resources(template, "AWS::ElasticLoadBalancingV2::Listener").values()
    assert listener["Protocol"] == "TCP" and listener["Port"] == 443
    assert listener["LoadBalancerArn"] == {"Ref": "AgentLoadBalancer"}
    assert listener["DefaultActions"] == [{"Type": "forward", "TargetGroupArn": {"Ref": "AgentTargetGroup"}}]
    (group,) = resources(template, "AWS::ElasticLoadBalancingV2::TargetGroup").values()
    assert (group["Protocol"], group["Port"], group["TargetType"]) == ("TCP", 443, "ip")
    assert group["Targets"] == [{"Id": {"Ref": "AgentAPrivateAddress"}, "Port": 443},
                                {"Id": {"Ref": "AgentBPrivateAddress"}, "Port": 443}]
    assert (group["HealthCheckProtocol"], group["HealthCheckPort"], group["HealthCheckPath"]) == ("HTTP", "9100", "/readyz")
    assert {"Key": "preserve_client_ip.enabled", "Value": "true"} in group["TargetGroupAttributes"]
    # The balancer reaches the front and the admin port; the agents admit its health checks.
    lb_egress = {(r["FromPort"], str(r["DestinationSecurityGroupId"]))
                 for r in template["Resources"]["LoadBalancerSecurityGroup"]["Properties"]["SecurityGroupEgress"]}
    assert lb_egress == {(443, "{'Ref': 'AgentSecurityGroup'}"), (9100, "{'Ref': 'AgentSecurityGroup'}")}
    admitted = {(r["FromPort"], str(r.get("SourceSecurityGroupId") or r.get("CidrIp")))
                for r in _ingress(template, "AgentSecurityGroup")}
    assert (9100, "{'Ref': 'LoadBalancerSecurityGroup'}") in admitted
    assert (443, "{'Ref': 'CallerCidr'}") in admitted, "client addresses are preserved, so callers are admitted"


def test_multi_az_resolver_rules_target_every_agents_dns_and_zones_answer_the_balancer():
    template = govcloud_in_mode("multi-az")
    rules = resources(template, "AWS::Route53Resolver::ResolverRule")
    assert len(rules) == 4
    for rule in rules.values():
        assert rule["TargetIps"] == [{"Ip": {"Ref": "AgentAPrivateAddress"}, "Port": "53"},
                                     {"Ip": {"Ref": "AgentBPrivateAddress"}, "Port": "53"}]
    egress = template["Resources"]["ResolverEndpointSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    assert sorted((r["IpProtocol"], r["CidrIp"]["Fn::Sub"]) for r in egress) == [
        ("tcp", "${AgentAPrivateAddress}/32"), ("tcp", "${AgentBPrivateAddress}/32"),
        ("udp", "${AgentAPrivateAddress}/32"), ("udp", "${AgentBPrivateAddress}/32")]
    records = resources(template, "AWS::Route53::RecordSet").values()
    assert len(records) == 4
    for record in records:
        answers = resolve(record["ResourceRecords"], {"NlbAddresses": "10.0.1.20,10.0.2.20"}, {})
        assert answers == ["10.0.1.20", "10.0.2.20"]


AGENTS = "ABCDEF"


def test_agent_count_is_two_to_six_on_both_stacks():
    for stack in (GOVCLOUD, COMMERCIAL):
        count = load_stack(stack)["Parameters"]["AgentCount"]
        assert (count["AllowedValues"], count["Default"]) == (["2", "3", "4", "5", "6"], "2"), stack.name


@pytest.mark.parametrize("count", [2, 3, 4, 5, 6])
def test_multi_az_with_agent_count_n_has_n_agents_each_a_target_of_the_balancer_and_the_rules(count):
    """After CloudFormation resolves the conditions for AgentCount N: N agents (interface,
    Elastic IP, role, launch template, group, each in its own subnet), N balancer targets, N
    target IPs in every Resolver rule, and the balancer's address in each zone's first agent."""
    values = multi_az_parameters(count)
    template = govcloud_in_mode("multi-az", **values)
    members = AGENTS[:count]
    res = template["Resources"]
    for kind, suffix in [("AWS::EC2::NetworkInterface", "NetworkInterface"), ("AWS::EC2::EIPAssociation", "ElasticIp"),
                         ("AWS::IAM::Role", "Role"), ("AWS::IAM::InstanceProfile", "InstanceProfile"),
                         ("AWS::EC2::LaunchTemplate", "LaunchTemplate"),
                         ("AWS::AutoScaling::AutoScalingGroup", "Group")]:
        assert sorted(resources(template, kind)) == [f"Agent{m}{suffix}" for m in members], kind
    subnets = ["AgentSubnetId", "AgentBSubnetId"] + [f"Agent{m}SubnetId" for m in members[2:]]
    for member, subnet in zip(members, subnets):
        interface = res[f"Agent{member}NetworkInterface"]["Properties"]
        assert interface["SubnetId"] == {"Ref": subnet}
        assert interface["PrivateIpAddresses"] == [{"PrivateIpAddress": {"Ref": f"Agent{member}PrivateAddress"}, "Primary": True}]
        tags = {t["Key"]: t["Value"] for t in interface["Tags"]}
        assert (tags["xpart:name"], tags["xpart:role"]) == (f"agent-{member.lower()}", "active")
        assert res[f"Agent{member}Group"]["Properties"]["VPCZoneIdentifier"] == [{"Ref": subnet}]
        association = res[f"Agent{member}ElasticIp"]["Properties"]
        assert association["NetworkInterfaceId"] == {"Ref": f"Agent{member}NetworkInterface"}
        assert association["AllocationId"] == {"Ref": f"Agent{member}EipAllocationId"}
    addresses = [{"Ref": f"Agent{m}PrivateAddress"} for m in members]

    (group,) = resources(template, "AWS::ElasticLoadBalancingV2::TargetGroup").values()
    assert group["Targets"] == [{"Id": a, "Port": 443} for a in addresses]
    rules = resources(template, "AWS::Route53Resolver::ResolverRule")
    assert len(rules) == 4
    for rule in rules.values():
        assert rule["TargetIps"] == [{"Ip": a, "Port": "53"} for a in addresses]
    egress = template["Resources"]["ResolverEndpointSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    assert sorted((r["IpProtocol"], r["CidrIp"]["Fn::Sub"]) for r in egress) == sorted(
        (protocol, f"${{Agent{m}PrivateAddress}}/32") for m in members for protocol in ("tcp", "udp"))

    # One balancer address per zone: agents a, b and c open the three zones, d to f share them.
    (lb,) = resources(template, "AWS::ElasticLoadBalancingV2::LoadBalancer").values()
    zones = min(count, 3)
    assert [m["SubnetId"] for m in lb["SubnetMappings"]] == [{"Ref": s} for s in subnets[:zones]]
    every = parameter_values(template, dict(values, AgentSubnetId="subnet-00000000000000000"))
    conditions = evaluate_conditions(load_stack(GOVCLOUD), every)
    balancer = resolve(lb["SubnetMappings"], every, conditions)
    assert [m["PrivateIPv4Address"] for m in balancer] == ["10.0.1.20", "10.0.2.20", "10.0.3.20"][:zones]
    answered = ",".join(m["PrivateIPv4Address"] for m in balancer)
    assert resolve(template["Outputs"]["LoadBalancerAddresses"]["Value"], every, conditions) == answered
    hosted = govcloud_in_mode("multi-az", DnsMode="hosted-zone", **values)
    for record in resources(hosted, "AWS::Route53::RecordSet").values():
        assert resolve(record["ResourceRecords"], every, conditions) == answered.split(",")

    # Every agent's role is in the shared policies (tags, CloudWatch, Session Manager).
    roles = [{"Ref": f"Agent{m}Role"} for m in members]
    for policy in ("AgentFailoverPolicy", "CloudWatchAgentPolicy", "SessionManagerPolicy"):
        assert template["Resources"][policy]["Properties"]["Roles"] == roles, policy
    for member in members[2:]:
        reads = [s for s in _all_statements(template, f"Agent{member}Role")
                 if "ssm:GetParameter" in _plain_actions(s)]
        arns = [r["Fn::Sub"] for s in reads for r in s["Resource"]]
        assert any(a.endswith(f"/agent-{member.lower()}/*") for a in arns)
        assert not any(f"/agent-{other.lower()}/" in a for a in arns for other in AGENTS if other != member)

    # The outputs give the Commercial stack its AgentCount and every agent's tunnel address.
    assert resolve(template["Outputs"]["AgentCount"]["Value"], every, conditions) == str(count)
    tunnels = resolve(template["Outputs"]["AgentTunnelAddresses"]["Value"], every, conditions).split(",")
    commercial = load_stack(COMMERCIAL)["Parameters"]
    assert tunnels == [commercial[f"Agent{m}TunnelAddress"]["Default"] for m in members]
    assert sorted(n for n in template["Outputs"] if re.fullmatch(r"Agent[A-F]GroupName", n)) == [
        f"Agent{m}GroupName" for m in members]


def test_pair_mode_stays_two_agents_whatever_the_count_says():
    template = govcloud_in_mode("pair", AgentCount="6")
    assert sorted(resources(template, "AWS::AutoScaling::AutoScalingGroup")) == ["AgentAGroup", "AgentBGroup"]
    values = parameter_values(template, {"FloatingAddress": "10.0.1.10", "AgentCount": "3"})
    assert rule_failures(load_stack(GOVCLOUD), values) == [
        "DeploymentMode pair is agent-a and agent-b; AgentCount 3 to 6 needs DeploymentMode multi-az."]
    assert rule_failures(load_stack(GOVCLOUD), dict(values, AgentCount="2")) == []


@pytest.mark.parametrize("count", [2, 3, 4, 5, 6])
def test_the_rules_take_exactly_the_agents_the_count_asks_for(count):
    template = load_stack(GOVCLOUD)
    values = parameter_values(template, multi_az_parameters(count))
    assert rule_failures(template, values) == []
    if count < 6:
        # An agent's values beyond the count: the stack refuses rather than leave it out.
        extra = AGENTS[count]
        more = dict(values, **{f"Agent{extra}SubnetId": "subnet-09000000000000000"})
        assert rule_failures(template, more) == [
            f"agent-{extra.lower()} exists only in multi-az with AgentCount {count + 1}"
            + ("" if count + 1 == 6 else " or more")
            + f"; raise AgentCount or leave Agent{extra}SubnetId, Agent{extra}PrivateAddress, "
            f"Agent{extra}NlbAddress and Agent{extra}EipAllocationId empty."]
    if count > 2:
        last = AGENTS[count - 1]
        fewer = dict(values, **{f"Agent{last}PrivateAddress": ""})
        failures = rule_failures(template, fewer)
        assert len(failures) == 1 and f"needs Agent{last}PrivateAddress" in failures[0]
    commercial = load_stack(COMMERCIAL)
    peers = parameter_values(commercial, commercial_parameters(count))
    assert rule_failures(commercial, peers) == []
    if count > 2:
        last = AGENTS[count - 1]
        assert [f for f in rule_failures(commercial, dict(peers, **{f"Agent{last}PublicKey": ""}))] == [
            f"AgentCount {count}{'' if count == 6 else ' or more'} needs Agent{last}PublicKey, "
            f"agent-{last.lower()}'s WireGuard public key."]


@pytest.mark.parametrize("count", [2, 3, 4, 5, 6])
def test_the_relays_peer_with_every_agent_the_count_asks_for(count):
    values = commercial_parameters(count)
    template = stack_for(COMMERCIAL, **values)[0]
    assert str(count) in template["Parameters"]["AgentCount"]["AllowedValues"]
    members = AGENTS[:count]
    group = template["Resources"]["RelaySecurityGroup"]["Properties"]
    sources = [{"Fn::Sub": f"${{Agent{m}PublicIp}}/32"} for m in members]
    assert [r["CidrIp"] for r in group["SecurityGroupIngress"]] == sources
    assert all(r["IpProtocol"] == "udp" and r["FromPort"] == {"Ref": "WireGuardPort"} for r in group["SecurityGroupIngress"])
    assert [r["CidrIp"] for r in group["SecurityGroupEgress"] if r["IpProtocol"] == "udp"] == sources
    # The relays' user data lists XPART_AGENT_1 to XPART_AGENT_N and no more.
    every = parameter_values(template, dict(values, AgentAPublicKey="A" * 43 + "=", AgentBPublicKey="B" * 43 + "="))
    every.update({"AWS::Region": "us-east-1", "AWS::StackName": "xpart-commercial"})
    every.update({k: "x" for k in ("VpcId", "RelayAmiId", "RelayASubnetId", "RelayBSubnetId",
                                   "RelayAEipAllocationId", "RelayBEipAllocationId",
                                   "AgentAPublicIp", "AgentBPublicIp")})
    conditions = evaluate_conditions(load_stack(COMMERCIAL), every)
    for launch in resources(template, "AWS::EC2::LaunchTemplate").values():
        user_data = resolve(launch["LaunchTemplateData"]["UserData"]["Fn::Base64"], every, conditions)
        rows = re.findall(r"XPART_AGENT_(\d)=([^,\n]+),([^,\n]+),", user_data)
        assert rows == [(str(i), f"agent-{m.lower()}", every[f"Agent{m}TunnelAddress"])
                        for i, m in enumerate(members, start=1)]


def test_both_stacks_agree_on_the_tunnel_plan():
    gov = load_stack(GOVCLOUD)["Parameters"]
    com = load_stack(COMMERCIAL)["Parameters"]
    shared = [
        "TunnelPrefixLength",
        "AgentATunnelAddress",
        "AgentBTunnelAddress",
        "AgentCTunnelAddress",
        "AgentDTunnelAddress",
        "AgentETunnelAddress",
        "AgentFTunnelAddress",
        "AgentCount",
        "RelayATunnelAddress",
        "RelayBTunnelAddress",
        "WireGuardPort",
        "RelayServicePort",
        "ParameterPrefix",
    ]
    for name in shared:
        assert gov[name]["Default"] == com[name]["Default"], name


@pytest.mark.parametrize("stack", [GOVCLOUD, COMMERCIAL], ids=["govcloud", "commercial"])
def test_every_parameter_and_output_is_described(stack):
    template = load_stack(stack)
    for section in ("Parameters", "Outputs"):
        for name, spec in template[section].items():
            assert len(spec.get("Description", "")) > 10, f"{section}.{name} needs a description"


def _guide_commands(stack_file):
    """Parameter and output names the deployment guide uses with one stack's file."""
    text = GUIDE.read_text()
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.S)
    params, outputs = set(), set()
    for block in blocks:
        for command in re.split(r"\n(?=\S)", block):
            if stack_file.name in command and "create-stack" in command:
                params |= set(re.findall(r"ParameterKey=(\w+)", command))
    # The guide reads outputs with its helper: out PROFILE STACK-NAME OUTPUT-KEY
    stack_name = "xpart-govcloud" if stack_file == GOVCLOUD else "xpart-commercial"
    outputs = set(re.findall(rf"\bout \w+ {stack_name} (\w+)", text))
    return params, outputs


@pytest.mark.parametrize("stack", [GOVCLOUD, COMMERCIAL], ids=["govcloud", "commercial"])
def test_deployment_guide_passes_every_required_parameter_and_reads_real_outputs(stack):
    template = load_stack(stack)
    params, outputs = _guide_commands(stack)
    assert params, f"the guide has no create-stack command for {stack.name}"
    assert outputs, f"the guide reads no output of {stack.name}"
    declared = set(template["Parameters"])
    assert params <= declared, f"the guide passes unknown parameters {params - declared}"
    required = {n for n, p in template["Parameters"].items() if "Default" not in p}
    assert required <= params, f"the guide leaves out required parameters {required - params}"
    assert outputs <= set(template["Outputs"]), f"the guide reads unknown outputs {outputs - set(template['Outputs'])}"


# ---------------------------------------------------------------------------------------------
# Packer (Debian's 1.6.6: validates offline, but predates required_plugins, imds_support and
# metadata_options, see shared notes)

PACKER_TEMPLATES = sorted(p for p in PACKER_DIR.glob("*.pkr.hcl") if p.name != "versions.pkr.hcl")
# Arguments the Amazon plugin gained after Packer 1.6.6; removed only for the offline full
# validation, and checked to be present in the real files below.
NEWER_THAN_DEBIAN_PACKER = [
    (r'\n  imds_support += "v2.0"\n', "\n"),
    (r"\n  metadata_options \{\n.*?\n  \}\n", "\n"),
]


def test_packer_templates_are_formatted():
    need("packer", "packer")
    result = run(["packer", "fmt", "-check", "-diff", str(PACKER_DIR)])
    assert result.returncode == 0, f"run `packer fmt images/packer`:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("template", PACKER_TEMPLATES, ids=lambda p: p.name)
def test_each_packer_file_passes_syntax_validation(template):
    need("packer", "packer")
    result = run(["packer", "validate", "-syntax-only", str(template)])
    assert result.returncode == 0, result.stdout + result.stderr


def _packer_mirror(tmp_path):
    """images/ as Debian's packer can fully validate it: the real units, configs and scripts
    (symlinked, so a missing one fails validation), the templates minus versions.pkr.hcl and
    the post-1.6.6 arguments."""
    repo = tmp_path / "repo"
    (repo / "images" / "packer").mkdir(parents=True)
    for entry in IMAGES.iterdir():
        if entry.name != "packer":
            (repo / "images" / entry.name).symlink_to(entry)
    (repo / "config").symlink_to(REPO / "config")
    for source in PACKER_DIR.iterdir():
        if source.name == "versions.pkr.hcl":
            continue
        text = source.read_text()
        if source.suffix == ".hcl":
            for pattern, replacement in NEWER_THAN_DEBIAN_PACKER:
                text = re.sub(pattern, replacement, text, flags=re.S)
        (repo / "images" / "packer" / source.name).write_text(text)
    return repo / "images" / "packer"


def _need_example_configs():
    missing = [p for p in (REPO / "config" / "agent.example.toml", REPO / "config" / "relay.example.toml")
               if not p.is_file()]
    if missing:
        pytest.skip(f"the AMIs ship {', '.join(str(p.relative_to(REPO)) for p in missing)}, not written yet")


def _release_binaries(tmp_path, names=("xpart-agent", "xpart-relay", "xpart")):
    bin_dir = tmp_path / "release"
    bin_dir.mkdir()
    for name in names:
        (bin_dir / name).write_text("#!/bin/sh\n")
    return bin_dir


@pytest.mark.parametrize(
    "partition, arch", [("aws-us-gov", "x86_64"), ("aws", "arm64")], ids=["govcloud-x86_64", "commercial-arm64"]
)
def test_packer_builds_validate_with_their_files(tmp_path, partition, arch):
    need("packer", "packer")
    _need_example_configs()
    mirror = _packer_mirror(tmp_path)
    bin_dir = _release_binaries(tmp_path)
    result = run(
        ["packer", "validate", "-var", f"partition={partition}", "-var", f"arch={arch}",
         "-var", f"binary_dir={bin_dir}", str(mirror)],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_split_step_names_a_missing_release_binary(tmp_path):
    need("objcopy", "binutils")
    bin_dir = _release_binaries(tmp_path, names=("xpart-relay", "xpart"))
    result = run(["sh", str(SPLIT_DEBUG), str(tmp_path / "image"), str(bin_dir / "xpart-agent"),
                  str(bin_dir / "xpart")])
    assert result.returncode != 0
    assert f"no release binary {bin_dir / 'xpart-agent'}" in result.stderr
    assert "fips/build --release --bins" in result.stderr
    assert not (tmp_path / "image" / "xpart").exists(), "nothing is split before every binary is there"


def test_packer_refuses_an_unknown_architecture_or_partition(tmp_path):
    need("packer", "packer")
    mirror = _packer_mirror(tmp_path)
    bin_dir = _release_binaries(tmp_path)
    for var, message in [("arch=sparc", "x86_64"), ("partition=aws-cn", "aws-us-gov")]:
        result = run(
            ["packer", "validate", "-var", f"binary_dir={bin_dir}", "-var", "partition=aws",
             "-var", var, str(mirror)],
            cwd=tmp_path,
        )
        assert result.returncode != 0, var
        assert message in result.stdout + result.stderr, var


@pytest.mark.parametrize("role", ["agent", "relay"])
def test_packer_template_requires_imdsv2_encryption_and_clears_keys(role):
    text = (PACKER_DIR / f"{role}.pkr.hcl").read_text()
    for pattern in [
        r'\n  imds_support += "v2.0"\n',
        r'metadata_options \{[^}]*http_tokens += "required"',
        r"launch_block_device_mappings \{[^}]*encrypted += true",
        r"ssh_clear_authorized_keys += true",
        r'owners += \["amazon"\]',
        r"name += local.base_ami_name",
        rf'environment_vars += \["XPART_ROLE={role}", "XPART_FIPS=\$\{{var.fips\}}"\]',
    ]:
        assert re.search(pattern, text, flags=re.S), f"{role}.pkr.hcl lacks {pattern}"
    variables = (PACKER_DIR / "variables.pkr.hcl").read_text()
    assert 'base_ami_name = "al2023-ami-2023.*-kernel-${var.al2023_kernel}-${var.arch}"' in variables


@pytest.mark.parametrize("role", ["agent", "relay"])
def test_the_image_ships_only_binaries_split_from_their_debug_info(role):
    text = (PACKER_DIR / f"{role}.pkr.hcl").read_text()
    split = re.search(r'provisioner "shell-local" \{\n    inline += \["(?P<command>[^"]*)"\]', text)
    assert split, f"{role}.pkr.hcl has no shell-local step that runs split-debug.sh"
    assert split["command"] == (
        f"sh '${{path.root}}/split-debug.sh' '${{local.stripped_dir}}/{role}' "
        f"'${{local.binary_dir}}/xpart-{role}' '${{local.binary_dir}}/xpart'"
    )
    uploads = re.findall(r'provisioner "file" \{\n(.*?)\n  \}', text, flags=re.S)
    binaries = [u for u in uploads if "/tmp/xpart-staging/bin/" in u]
    assert len(binaries) == 1, uploads
    assert f'["${{local.stripped_dir}}/{role}/xpart-{role}", "${{local.stripped_dir}}/{role}/xpart"]' in binaries[0]
    assert re.search(r"generated += true", binaries[0])
    assert "binary_dir" not in binaries[0], "the unstripped binaries must not be uploaded"
    assert text.index('provisioner "shell-local"') < text.index("/tmp/xpart-staging/bin/\"\n"), \
        "the split runs before the upload"
    variables = (PACKER_DIR / "variables.pkr.hcl").read_text()
    assert 'stripped_dir = "${local.binary_dir}/image"' in variables
    assert 'environment_vars = ["OBJCOPY=${var.objcopy}"]' in text


def test_split_binaries_keep_symbols_and_find_their_line_tables_in_debug(tmp_path):
    """What the image build does to a release binary, on a small Rust program built like one
    (line tables only): the shipped file has no debug sections but still names functions in a
    backtrace, and with its .debug file installed beside it the backtrace has file and line."""
    need("objcopy", "binutils")
    need("readelf", "binutils")
    need("rustc", "rustc")
    source = tmp_path / "panics.rs"
    source.write_text(
        "fn main() { deep(std::env::args().count()); }\n"
        "#[inline(never)]\nfn deep(n: usize) { if n < 100 { panic!(\"deep\"); } }\n"
    )
    built = tmp_path / "release" / "xpart-agent"
    built.parent.mkdir()
    compiled = run(["rustc", "-C", "debuginfo=line-tables-only", "-C", "opt-level=1", "-C", "strip=none",
                    str(source), "-o", str(built)])
    assert compiled.returncode == 0, compiled.stderr
    image = tmp_path / "image" / "agent"

    split = run(["sh", str(SPLIT_DEBUG), str(image), str(built)])

    assert split.returncode == 0, split.stderr
    shipped, debug = image / "xpart-agent", image / ".debug" / "xpart-agent.debug"
    sections = run(["readelf", "-S", "-W", str(shipped)]).stdout
    assert ".debug_line" not in sections and ".debug_info" not in sections
    assert ".symtab" in sections and ".gnu_debuglink" in sections
    assert ".debug_line" in run(["readelf", "-S", "-W", str(debug)]).stdout
    assert shipped.stat().st_size < built.stat().st_size / 2
    assert os.access(shipped, os.X_OK)

    def backtrace():
        result = run([str(shipped)], env={**os.environ, "RUST_BACKTRACE": "1"})
        assert result.returncode != 0
        return result.stderr

    frame_with_line = r"panics::deep\n\s+at .*panics\.rs:3:"
    assert re.search(frame_with_line, backtrace())
    debug.rename(tmp_path / "elsewhere.debug")
    without = backtrace()
    assert re.search(r"\d+: panics::deep\n", without) and not re.search(frame_with_line, without)


def test_the_split_step_refuses_an_unknown_objcopy(tmp_path):
    bin_dir = _release_binaries(tmp_path, names=("xpart",))
    result = run(["sh", str(SPLIT_DEBUG), str(tmp_path / "image"), str(bin_dir / "xpart")],
                 env={**os.environ, "OBJCOPY": "no-such-objcopy"})
    assert result.returncode != 0
    assert "no-such-objcopy not found" in result.stderr and "-var objcopy=" in result.stderr


CHECK_FIPS = PACKER_DIR / "check-fips.sh"


CERTIFIED = "module AWS-LC FIPS 3.1.0, certificate #5314"


def _daemon_saying(tmp_path, version):
    """A program that answers --version as a daemon does (the real ones are tested below)."""
    program = tmp_path / "xpart-relay"
    program.write_text(f"#!/bin/sh\n[ \"$1\" = --version ] && echo '{version}'\n")
    program.chmod(0o755)
    return program


@pytest.mark.parametrize(
    "want, version, refused",
    [
        ("true", "xpart-relay 0.1.0", "is not a FIPS build (its --version says \"xpart-relay 0.1.0\")"),
        ("true", f"xpart-relay 0.1.0 (fips) {CERTIFIED}", None),
        ("true", "xpart-relay 0.1.0 (fips) module AWS-LC FIPS 4.2.0, no certificate",
         "is a FIPS build on a module without a FIPS 140-3 certificate"),
        ("false", f"xpart-relay 0.1.0 (fips) {CERTIFIED}",
         f"is a FIPS build (\"xpart-relay 0.1.0 (fips) {CERTIFIED}\") but the image is built with -var fips=false"),
        ("false", "xpart-relay 0.1.0", None),
    ],
    ids=["fips-image-plain-binary", "fips-image-fips-binary", "fips-image-uncertified-module",
         "plain-image-fips-binary", "plain-image-plain-binary"],
)
def test_the_image_build_refuses_a_daemon_that_is_not_the_build_it_asks_for(tmp_path, want, version, refused):
    need("sh", "dash")
    daemon = _daemon_saying(tmp_path, version)
    result = run(["sh", str(CHECK_FIPS), want, str(daemon)])
    if refused:
        assert result.returncode != 0
        assert refused in result.stderr, result.stderr
        if want == "true":
            assert "fips/build --release" in result.stderr, result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert version in result.stdout


def test_the_image_build_refuses_a_binary_that_does_not_run_here(tmp_path):
    need("sh", "dash")
    foreign = tmp_path / "xpart-agent"
    foreign.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(57))
    foreign.chmod(0o755)
    result = run(["sh", str(CHECK_FIPS), "true", str(foreign)])
    assert result.returncode != 0
    assert f"{foreign} --version failed" in result.stderr and "architecture" in result.stderr


def _built(directory, name):
    binary = Path(directory) / name
    if not binary.is_file():
        pytest.skip(f"{binary} not built")
    return binary


@pytest.mark.parametrize("role", ["agent", "relay"])
def test_the_real_daemons_say_which_build_they_are_and_the_check_believes_them(role):
    """The default build (cargo build --bins) is refused for a FIPS image; the FIPS build
    (tests/fips/build, XPART_FIPS_BIN_DIR) passes, and is refused for a non-FIPS image."""
    need("sh", "dash")
    default = _built(os.environ.get("XPART_BIN_DIR", REPO / "target" / "debug"), f"xpart-{role}")
    result = run(["sh", str(CHECK_FIPS), "true", str(default)])
    assert result.returncode != 0 and f"{default} is not a FIPS build" in result.stderr, result.stderr
    assert run(["sh", str(CHECK_FIPS), "false", str(default)]).returncode == 0
    fips = _built(os.environ.get("XPART_FIPS_BIN_DIR") or REPO / "target" / "fips" / "debug", f"xpart-{role}")
    result = run(["sh", str(CHECK_FIPS), "true", str(fips)])
    assert result.returncode == 0, result.stderr
    assert re.search(rf": xpart-{role} \S+ \(fips\) module AWS-LC FIPS \S+, certificate #\d+$",
                     result.stdout.strip()), result.stdout
    assert run(["sh", str(CHECK_FIPS), "false", str(fips)]).returncode != 0


def test_the_image_is_checked_before_anything_is_installed_and_named_for_its_build():
    script = (PACKER_DIR / "install.sh").read_text()
    check = 'sh "$images/packer/check-fips.sh" "${XPART_FIPS:-}" "$staging/bin/xpart-$role"'
    assert check in script
    assert script.index(check) < script.index("dnf install"), "checked before the image is changed"
    variables = (PACKER_DIR / "variables.pkr.hcl").read_text()
    assert re.search(r'variable "fips" \{\n  type        = bool\n  default     = true\n', variables)
    assert 'fips_suffix   = var.fips ? "-fips" : ""' in variables
    assert '"xpart:fips"      = var.fips ? "true" : "false"' in variables
    for role in ("agent", "relay"):
        text = (PACKER_DIR / f"{role}.pkr.hcl").read_text()
        assert f'ami_name        = "xpart-{role}-${{var.xpart_version}}${{local.fips_suffix}}-' in text


def test_the_documented_image_build_builds_the_daemons_with_fips():
    guide = GUIDE.read_text()
    section = guide[guide.index("## 3. Build the AMIs"):guide.index("## 4.")]
    # The FIPS build goes through fips/build, on fips/Cargo.lock and so the certified module; a
    # plain `cargo build` of the daemons would link whatever module Cargo.lock has.
    assert re.search(r"^fips/build --release --bins\b", section, flags=re.M), section
    assert not re.findall(r"^cargo build .*$", section, flags=re.M)
    packer = re.findall(r"^AWS_PROFILE=\S+ packer build .*$", section, flags=re.M)
    assert len(packer) == 2 and all('-var binary_dir="$PWD/target/fips/release"' in c for c in packer), packer
    variables = (PACKER_DIR / "variables.pkr.hcl").read_text()
    assert "built with --features fips (fips/build --release --bins: target/fips/release) unless fips = false" in variables


@pytest.mark.parametrize("fips", ["true", "false"])
def test_packer_validates_a_fips_and_a_plain_image(tmp_path, fips):
    need("packer", "packer")
    _need_example_configs()
    mirror = _packer_mirror(tmp_path)
    bin_dir = _release_binaries(tmp_path)
    result = run(["packer", "validate", "-var", "partition=aws", "-var", f"fips={fips}",
                  "-var", f"binary_dir={bin_dir}", str(mirror)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_plugins_block_lives_alone_in_versions_file():
    versions = (PACKER_DIR / "versions.pkr.hcl").read_text()
    assert "required_plugins" in versions and 'source  = "github.com/hashicorp/amazon"' in versions
    assert "source \"" not in versions and "variable" not in versions
    for template in PACKER_TEMPLATES:
        assert "required_plugins" not in template.read_text(), template.name


def test_install_script_enables_but_does_not_start_units():
    script = (PACKER_DIR / "install.sh").read_text()
    need("sh", "dash")
    assert run(["sh", "-n", str(PACKER_DIR / "install.sh")]).returncode == 0
    assert "systemctl enable $units logrotate.timer" in script
    assert not re.search(r"systemctl (start|restart|enable --now)", script)
    assert "/usr/local/libexec/xpart/xpart-boot" in script
    for unit in ["xpart-agent.service", "xpart-relay.service", "xpart-floating-address.service",
                 "xpart-failover-watch.service"]:
        assert (UNITS / unit).is_file()


# ---------------------------------------------------------------------------------------------
# systemd units, sysusers, sysctl


def _unit_copies(tmp_path):
    """The units with ExecStart binaries pointed at stand-ins, since verify requires every
    executable to exist and the release binaries are not installed here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "units"
    out.mkdir()
    for name in ("xpart-agent", "xpart-relay", "xpart"):
        stand_in = bin_dir / name
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
    boot = bin_dir / "xpart-boot"
    boot.write_text("#!/bin/sh\n")
    boot.chmod(0o755)
    for unit in UNITS.glob("*.service"):
        text = unit.read_text().replace("/usr/local/bin/", f"{bin_dir}/")
        text = text.replace("/usr/local/libexec/xpart/", f"{bin_dir}/")
        (out / unit.name).write_text(text)
    return out


def test_units_pass_systemd_analyze_verify(tmp_path):
    need("systemd-analyze", "systemd")
    copies = _unit_copies(tmp_path)
    for unit in sorted(copies.iterdir()):
        result = run(["systemd-analyze", "verify", str(unit)])
        # verify exits 0 on unknown keys and only warns, so any output is a failure too.
        assert result.returncode == 0 and not result.stderr.strip(), f"{unit.name}:\n{result.stderr}"


def test_verify_output_check_catches_a_misspelt_directive(tmp_path):
    need("systemd-analyze", "systemd")
    copies = _unit_copies(tmp_path)
    unit = copies / "xpart-agent.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytsem=strict"))
    result = run(["systemd-analyze", "verify", str(unit)])
    assert "ProtectSytsem" in result.stderr


@pytest.mark.parametrize("unit", DAEMON_UNITS + ["xpart-failover-watch.service"])
def test_unit_exposure_is_low_by_systemds_own_measure(tmp_path, unit):
    need("systemd-analyze", "systemd")
    copy = _unit_copies(tmp_path) / unit
    # systemd scores 0 (locked down) to 10 (unprotected); 2.5 leaves margin below its "OK" band.
    result = run(["systemd-analyze", "security", "--offline=true", "--threshold=25", str(copy)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def parse_unit(path):
    """systemd's format allows repeated keys, which configparser refuses."""
    entries = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        entries.setdefault(key, []).append(value)
    return entries


@pytest.mark.parametrize("unit", DAEMON_UNITS)
def test_daemon_units_are_hardened_as_the_appliance_needs(unit):
    entries = parse_unit(UNITS / unit)
    daemon = unit.removesuffix(".service")
    role = daemon.removeprefix("xpart-")
    config = f"/etc/xpart/{role}.toml"

    assert entries["User"] == ["xpart"] and entries["Group"] == ["xpart"]
    assert entries["ExecStart"] == [f"/usr/local/bin/{daemon} --config {config}"]
    assert entries["ExecStartPre"] == [f"/usr/local/bin/{daemon} --config {config} --check"]
    assert entries["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert entries["Restart"] == ["on-failure"]
    assert entries["ConditionPathExists"] == [config]
    assert entries["NoNewPrivileges"] == ["yes"]
    assert entries["ProtectSystem"] == ["strict"]
    assert entries["ReadWritePaths"] == ["/var/log/xpart /run/xpart"]
    assert entries["DeviceAllow"] == ["/dev/net/tun rw"]
    ambient = set(" ".join(entries["AmbientCapabilities"]).split())
    bounding = set(" ".join(entries["CapabilityBoundingSet"]).split())
    assert ambient == bounding and "CAP_NET_ADMIN" in ambient and ambient <= ALLOWED_CAPS
    if role == "agent":
        assert "CAP_NET_BIND_SERVICE" in ambient, "the agent listens on 53 and 443"
    assert entries["WantedBy"] == ["multi-user.target"]


def test_sysusers_creates_the_service_account_without_a_shell(tmp_path):
    need("systemd-sysusers", "systemd")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    conf = IMAGES / "sysusers.d" / "xpart.conf"
    result = run(["systemd-sysusers", f"--root={root}", str(conf)])
    assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()}
    assert "xpart" in passwd
    uid, shell = int(passwd["xpart"][2]), passwd["xpart"][6]
    assert uid < 1000, "a system account"
    assert shell.endswith("nologin")
    assert "xpart:" in (root / "etc" / "group").read_text()


def test_sysctl_settings_exist_in_the_kernel_and_each_is_explained():
    lines = (IMAGES / "sysctl.d" / "60-xpart.conf").read_text().splitlines()
    settings = {}
    for i, line in enumerate(lines):
        if not line or line.startswith("#"):
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        settings[key.lstrip("-")] = value
        above = i - 1
        while above >= 0 and lines[above] and not lines[above].startswith("#"):
            above -= 1
        assert above >= 0 and lines[above].startswith("#"), f"{key} has no comment explaining it"
        if "xpart0" in key:
            assert key.startswith("-"), "xpart0 does not exist at boot; a leading '-' keeps systemd-sysctl quiet"
        else:
            assert Path("/proc/sys", *key.split(".")).exists(), f"no kernel setting {key}"
    assert settings == {
        "net.ipv4.ip_forward": "0",
        "net.ipv6.conf.all.forwarding": "0",
        "net.ipv6.conf.default.forwarding": "0",
        "net.ipv4.conf.all.rp_filter": "2",
        "net.ipv4.conf.xpart0.rp_filter": "2",
    }


# ---------------------------------------------------------------------------------------------
# logrotate


def test_logrotate_rotates_the_audit_file_and_reloads_only_running_daemons(tmp_path):
    need("logrotate", "logrotate")
    logs = tmp_path / "log"
    logs.mkdir()
    audit = logs / "audit.jsonl"
    audit.write_text('{"request_id":"a"}\n{"request_id":"b"}\n')

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "systemctl.calls"
    systemctl = fake_bin / "systemctl"
    systemctl.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        # Only the agent runs on this "appliance".
        'case "$*" in *is-active*xpart-agent.service) exit 0 ;; *is-active*) exit 3 ;; esac\n'
    )
    systemctl.chmod(0o755)

    user = run(["id", "-un"]).stdout.strip()
    group = run(["id", "-gn"]).stdout.strip()
    conf_text = (IMAGES / "logrotate.d" / "xpart").read_text()
    conf_text = conf_text.replace("/var/log/xpart/audit.jsonl", str(audit))
    conf_text = conf_text.replace("su xpart xpart", f"su {user} {group}")
    conf_text = conf_text.replace("create 0640 xpart xpart", f"create 0640 {user} {group}")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(conf_text)

    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    result = run(["logrotate", "--force", "--state", str(tmp_path / "state"), str(conf)], env=env)
    assert result.returncode == 0, result.stderr

    rotated = [p for p in logs.iterdir() if p.name != "audit.jsonl"]
    assert len(rotated) == 1 and rotated[0].name.startswith("audit.jsonl-"), rotated
    assert rotated[0].read_text() == '{"request_id":"a"}\n{"request_id":"b"}\n', "delaycompress keeps it readable"
    assert audit.read_text() == ""
    assert audit.stat().st_mode & 0o777 == 0o640
    assert calls.read_text().splitlines() == [
        "--quiet is-active xpart-agent.service",
        "reload xpart-agent.service",
        "--quiet is-active xpart-relay.service",
    ]


# ---------------------------------------------------------------------------------------------
# The xpart commands the guide and the failover-watch unit run, against the built CLI

XPART = Path(os.environ.get("XPART_BIN_DIR", REPO / "target" / "debug")) / "xpart"
SUBCOMMAND_WORDS = {"keygen", "pubkey", "ca", "init", "issue", "token", "new", "hash", "status",
                    "probe", "failover", "vip", "route", "eip", "watch", "drill", "run", "stop",
                    "drain-relay", "source-dest-check"}


def _xpart_invocations():
    """Each `xpart …` command line in the guide's shell blocks and in the watch unit, as
    (subcommand path, flags); flags after a `--` belong to another program."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), flags=re.S):
        lines += [line.strip() for line in block.splitlines()]
    watch = parse_unit(UNITS / "xpart-failover-watch.service")["ExecStart"][0]
    lines.append(watch.replace("/usr/local/bin/xpart", "xpart", 1))
    found = []
    for line in lines:
        for command in re.findall(r"(?:^|[;&|(]\s*|\$\(\s*|\bdo\s+|\bsudo\s+)(xpart\s[^;|)]*)", line):
            words = command.split()[1:]
            if "--" in words:
                words = words[: words.index("--")]
            path = [w for w in words if w in SUBCOMMAND_WORDS]
            flags = {w.split("=")[0] for w in words if w.startswith("--")}
            found.append((tuple(path), flags, command))
    return found


def test_the_guide_and_the_watch_unit_use_only_flags_the_cli_has():
    if not XPART.is_file():
        pytest.skip(f"{XPART} not built (cargo build --bins)")
    invocations = _xpart_invocations()
    assert len(invocations) > 10, "the guide should show the xpart commands it relies on"
    helps = {}
    for path, flags, command in invocations:
        text = ""
        for depth in range(len(path) + 1):
            prefix = path[:depth]
            if prefix not in helps:
                result = run([str(XPART), *prefix, "--help"])
                assert result.returncode == 0, f"`xpart {' '.join(prefix)}` is not a command: {result.stderr}"
                helps[prefix] = result.stdout
            text += helps[prefix]
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}\b", text), f"`{command}`: xpart has no {flag}"


# ---------------------------------------------------------------------------------------------
# The guide works as written


def _guide_lines():
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), flags=re.S):
        lines += [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    return lines


def test_every_aws_and_ec2_moving_command_in_the_guide_names_its_profile():
    aws_commands = []
    for line in _guide_lines():
        aws_commands += re.findall(r"(?:^|[;&|(]\s*|\$\(\s*|--\s+)(aws\s[^;|)]*)", line)
        for command in re.findall(r"(xpart\s[^;|)]*\bfailover\s[^;|)]*)", line):
            assert "--profile " in command, f"`{command}` names no profile"
    assert len(aws_commands) > 15
    for command in aws_commands:
        assert re.search(r"--profile (govcloud|commercial|\"\$1\")", command), f"`{command}` names no profile"


def test_the_guide_exports_no_ca_bundle_and_drills_pass_theirs_as_flags():
    text = GUIDE.read_text()
    assert not re.search(r"^\s*export [^\n]*AWS_CA_BUNDLE", text, flags=re.M), (
        "an exported AWS_CA_BUNDLE replaces the trust store of the guide's own aws commands")
    drills = [line for line in _guide_lines() if line.startswith("xpart drill")]
    assert len(drills) == 3
    assert 'P=(--endpoint "$E" --ca-bundle "$S/ca/ca.pem" --token "$PROBE_TOKEN")' in _guide_lines()
    assert all(line.startswith('xpart drill "${P[@]}"') for line in drills)


def test_the_guide_fails_back_after_each_drill():
    lines = _guide_lines()
    drills = [i for i, line in enumerate(lines) if line.startswith("xpart drill")]
    fail_back = '--to-eni "$AGENT_A_ENI" --pair xpart --set-roles'
    # After the two agent drills the address goes back to agent-a; after each drill that stops
    # a daemon the daemon is started again.
    for index in drills[:2]:
        following = lines[index + 1: index + 3]
        assert any(fail_back in line for line in following), lines[index]
    for index in drills[1:]:
        stopped = re.search(r"systemctl stop (xpart-\w+)", lines[index]).group(1)
        assert any(f"systemctl start {stopped}" in line for line in lines[index + 1: index + 3]), lines[index]


def test_relative_file_paths_in_the_guide_resolve_from_the_repository_root():
    paths = re.findall(r"file://([A-Za-z0-9_$/.][^\s\"')`]*)", GUIDE.read_text())
    assert paths
    for path in paths:
        if path.startswith(("$", "/")):
            continue
        assert (REPO / path).is_file(), f"file://{path} does not exist relative to the repository root"


def test_the_guide_pairs_the_regions_by_metro_and_shows_how_to_measure():
    text = GUIDE.read_text()
    assert "us-gov-west-1 and us-west-2 are in the same metro" in text
    assert "BEDROCK_REGION=us-west-2" in text
    assert any(line.startswith("xpart --json probe") and "--count" in line for line in _guide_lines())
    assert "first_byte_ms" in text


def test_stop_comments_match_what_the_daemons_do_on_sigterm():
    agent = parse_unit(UNITS / "xpart-agent.service")
    agent_text = (UNITS / "xpart-agent.service").read_text().replace("\n# ", " ")
    front = (REPO / "agent" / "src" / "front.rs").read_text()
    if "connections.shutdown().await" in front:
        # JoinSet::shutdown aborts every connection task: nothing in flight gets to finish.
        assert "streams in flight are cut" in agent_text
        assert "get time to finish" not in agent_text
    relay_text = (UNITS / "xpart-relay.service").read_text()
    (grace,) = re.findall(r"fn default_shutdown_grace\(\) -> u64 \{\s*(\d+)", (REPO / "relay" / "src" / "config.rs").read_text())
    assert f"shutdown_grace_secs ({grace} s by default)" in relay_text.replace("\n# ", " ")
    timeout = int(parse_unit(UNITS / "xpart-relay.service")["TimeoutStopSec"][0].rstrip("s"))
    assert timeout > int(grace), "SIGKILL must come after the relay's own grace"
    assert agent["TimeoutStopSec"] == ["30s"]


def test_first_boot_is_a_retried_oneshot_that_the_daemons_require():
    boot = parse_unit(UNITS / "xpart-boot.service")
    assert boot["Type"] == ["oneshot"] and boot["RemainAfterExit"] == ["yes"]
    assert boot["ExecStart"] == ["/usr/local/libexec/xpart/xpart-boot --at-boot"]
    assert boot["Restart"] == ["on-failure"] and boot["RestartSec"] == ["15s"]
    assert boot["StartLimitIntervalSec"] == ["0"], "retried until it succeeds"
    assert boot["ConditionPathExists"] == ["/etc/xpart/deployment.env"]
    for unit in DAEMON_UNITS:
        entries = parse_unit(UNITS / unit)
        assert entries["Requires"] == ["xpart-boot.service"], unit
        assert "xpart-boot.service" in entries["After"][0].split(), unit
    for unit in ("xpart-floating-address.service", "xpart-failover-watch.service"):
        assert "xpart-boot.service" in parse_unit(UNITS / unit)["After"][0].split(), unit
    install = (PACKER_DIR / "install.sh").read_text()
    assert 'units="xpart-boot.service xpart-signal.service xpart-$role.service"' in install
    for user_data in ("agent-user-data.yaml", "relay-user-data.yaml"):
        text = (IMAGES / "cloud-init" / user_data).read_text()
        assert "- [systemctl, start, --no-block, xpart-boot.service, xpart-signal.service]" in text
    assert "journalctl -u xpart-boot" in GUIDE.read_text()


def test_cost_sheet_prices_every_mode_with_its_date_and_adds_up():
    text = (REPO / "docs" / "COST.md").read_text()
    assert "as published in 2026" in text
    assert "must\nbe checked" in text or "must be checked" in text
    for mode in load_stack(GOVCLOUD)["Parameters"]["DnsMode"]["AllowedValues"]:
        assert f"DnsMode={mode}" in text, mode
    assert "Site-to-Site VPN connection | $0.05/h" in text
    assert "$0.125/h per ENI" in text and "$0.005/h" in text and "$0.01/h per AZ" in text
    rows = re.findall(r"^\| (?:GovCloud|Commercial) \| (.*?) \| \*\*\$([\d.]+)\*\* \|$", text, flags=re.M)
    assert len(rows) >= 3
    for items, total in rows:
        if items == "as in mode 1":
            continue
        amounts = [float(a) for a in re.findall(r"\$([\d.]+)", items)]
        assert abs(sum(amounts) - float(total)) < 0.01, (items, total)
