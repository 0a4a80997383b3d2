"""Inner TLS and FIPS mode, end to end on loopback: caller (boto3) → xpart-agent → userspace
WireGuard → mutual TLS 1.3 inside the tunnel → xpart-relay → Bedrock stand-in.

The inner-TLS tests run on the default build (XPART_BIN_DIR). The FIPS tests run the binaries
of the `fips` build (tests/fips/build writes them to target/fips/debug; point XPART_FIPS_BIN_DIR
there) and are skipped, with the reason, when that build is absent. The inner-TLS certificates
are issued by `xpart ca issue --relay NAME` / `--agent NAME` from the default build's CLI."""

import json
import os
import re
import shutil
import subprocess
import time
import tomllib

import pytest

import agent_harness as ah
import relay_harness as h

STANDIN_MODEL = "standin.echo-v1"
FIPS_HOST = "bedrock-runtime-fips.us-east-1.amazonaws.com"
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# aws-lc-fips-sys releases whose AWS-LC FIPS module is a version with a FIPS 140-3 certificate
# (docs/FIPS.md): the module version the crate's sources carry (AWSLC_VERSION_NUMBER_STRING)
# and the certificate that names it. 0.13.12 and later 0.13.x carry 3.2.0 to 3.6.0, which
# #5314 does not name; 0.14.x carries the 4.x line, which has no certificate yet.
CERTIFIED_FIPS_SYS = {"0.13.11": ("AWS-LC FIPS 3.1.0", "#5314")}


def cli():
    return os.path.join(h.bin_dir(), "xpart")


def fips_bin_dir():
    return os.environ.get("XPART_FIPS_BIN_DIR", "")


@pytest.fixture
def fips_bins(monkeypatch):
    """Points the harness at the FIPS build's binaries, or skips."""
    directory = fips_bin_dir()
    if not directory:
        pytest.skip("XPART_FIPS_BIN_DIR is not set: build the FIPS binaries with tests/fips/build "
                    "(needs Go and CMake) and set XPART_FIPS_BIN_DIR=target/fips/debug")
    relay, agent = os.path.join(directory, "xpart-relay"), os.path.join(directory, "xpart-agent")
    for path in (relay, agent):
        if not os.access(path, os.X_OK):
            pytest.skip(f"the FIPS build is absent: {path} is not an executable (run tests/fips/build)")
    monkeypatch.setattr(h, "relay_binary", lambda: relay)
    monkeypatch.setattr(ah, "agent_binary", lambda: agent)
    return directory


@pytest.fixture
def pki_dir(tmp_path):
    """A deployment CA made with `xpart ca init`, and a function issuing inner-TLS pairs."""
    if not os.access(cli(), os.X_OK):
        pytest.skip(f"xpart is not built at {cli()} (cargo build -p xpart)")
    ca = tmp_path / "ca"
    run_cli("ca", "init", "--dir", str(ca), "--days", "2")
    return ca


def run_cli(*args):
    proc = subprocess.run([cli(), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"xpart {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def issue(ca, role, name):
    """`xpart ca issue --relay NAME` or `--agent NAME`: (cert, key) paths."""
    out = ca / f"{role}-{name}"
    report = json.loads(run_cli("--json", "ca", "issue", "--ca-dir", str(ca), f"--{role}", name, "--out", str(out)))
    assert report["dns_names"] == [f"{name}.{role}.xpart"]
    return report["cert"], report["key"]


def inner_tls_lines(ca, cert, key):
    return (f'inner_tls = true\ninner_tls_cert_file = "{cert}"\ninner_tls_key_file = "{key}"\n'
            f'inner_tls_ca_file = "{ca / "ca.pem"}"\n')


def add_to_tunnel(path, lines):
    with open(path) as f:
        text = f.read()
    assert "[tunnel]\n" in text
    with open(path, "w") as f:
        f.write(text.replace("[tunnel]\n", "[tunnel]\n" + lines, 1))


class InnerTlsStack:
    def __init__(self, agent, relay, directory):
        self.agent = agent
        self.relay = relay
        self.directory = directory


@pytest.fixture
def start_inner_tls(tmp_path, test_pki, upstream_dns, standin, pki_dir):
    """start(agent_cert_name="agent-test", relay_inner_tls=True, extra_agents="", relay_options=None,
    wait=True) → InnerTlsStack: one relay ("relay-a") and the agent, both with inner TLS."""
    started = []

    def start(agent_cert_name="agent-test", extra_agents="", relay_options=None, wait=True):
        directory = tmp_path / f"stack{len(started)}"
        directory.mkdir()
        agent_private, agent_public = ah.wg_keypair()
        relay_private, relay_public = ah.wg_keypair()
        relay_dir = directory / "relay-a"
        relay_dir.mkdir()
        config = ah.relay_userspace_config(
            str(relay_dir), standin.port, upstream_dns.address[1], test_pki["ca"],
            private_key_file=ah.write_key(str(relay_dir / "relay.key"), relay_private),
            tunnel_address=ah.RELAY_TUNNELS[0], agent_public_key=agent_public,
            models=("standin.*",), **(relay_options or {}),
        )
        relay_cert, relay_key = issue(pki_dir, "relay", "relay-a")
        add_to_tunnel(config, inner_tls_lines(pki_dir, relay_cert, relay_key))
        if extra_agents:
            with open(config, "a") as f:
                f.write(extra_agents)
        process = ah.RelayProcess(config, h.relay_env(str(relay_dir), static_key=h.RELAY_KEY),
                                  str(relay_dir / "relay.log"))
        relay = ah.Relay("relay-a", str(relay_dir), process, ah.RELAY_TUNNELS[0], relay_public)
        started.append(relay)

        agent_cert, agent_key = issue(pki_dir, "agent", agent_cert_name)
        token = ah.new_token()
        agent_config = ah.agent_config(
            str(directory), relays=[relay], private_key_file=ah.write_key(str(directory / "agent.key"), agent_private),
            cert=test_pki["cert"], key=test_pki["key"],
            principals=ah.principal("lambda", token=token, models=("standin.*",)),
        )
        add_to_tunnel(agent_config, inner_tls_lines(pki_dir, agent_cert, agent_key))
        agent = ah.AgentProcess(agent_config, str(directory / "agent.log"))
        started.append(agent)
        agent.token = token
        if wait:
            agent.wait_ready()
        return InnerTlsStack(agent, relay, directory)

    yield start
    for process in reversed(started):
        process.stop()


def caller_env(stack, test_pki):
    return ah.caller_env(stack.agent.endpoint, test_pki["ca"], stack.agent.token)


def converse_and_stream(stack, test_pki):
    env = caller_env(stack, test_pki)
    answer = ah.boto3_call(env, op="converse", model=STANDIN_MODEL, text="through the inner TLS")
    assert "error" not in answer, answer
    assert "through the inner TLS" in answer["text"], answer
    streamed = ah.boto3_call(env, op="converse_stream", model=STANDIN_MODEL, text="streamed inside")
    assert "error" not in streamed and "stream_error" not in streamed, streamed
    kinds = [event["kind"] for event in streamed["events"]]
    assert kinds[0] == "messageStart" and "messageStop" in kinds, kinds
    text = "".join(e["event"]["contentBlockDelta"]["delta"].get("text", "")
                   for e in streamed["events"] if e["kind"] == "contentBlockDelta")
    assert "streamed inside" in text, streamed


def metric(text, name):
    match = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


# --- inner TLS, default build -------------------------------------------------------------------

def test_inner_tls_carries_converse_and_converse_stream_through_the_tunnel(start_inner_tls, test_pki):
    stack = start_inner_tls()
    converse_and_stream(stack, test_pki)
    _, status = stack.agent.admin_json("/status")
    assert status["tunnel"]["inner_tls"] is True
    assert status["fips_mode"] is False
    assert status["fips_module"] is None
    _, _, body = h.get(stack.relay.process.admin, "/status")
    relay_status = json.loads(body)
    assert relay_status["tunnel"]["inner_tls"] is True
    _, _, metrics = h.get(stack.relay.process.admin, "/metrics")
    assert metric(metrics.decode(), "xpart_fips_mode") == 0
    assert metric(metrics.decode(), "xpart_relay_inner_tls_refused_total") == 0


def test_a_tls_peer_that_is_not_the_wireguard_peer_carrying_it_is_refused(start_inner_tls, test_pki):
    # agent-b is a configured agent with a certificate from the same CA, but the connection
    # arrives through agent-test's tunnel (its key, its address): the relay must refuse it.
    _, other_public = ah.wg_keypair()
    extra = f'\n[[agent]]\nname = "agent-b"\npublic_key = "{other_public}"\ntunnel_address = "100.64.0.9"\n'
    stack = start_inner_tls(agent_cert_name="agent-b", extra_agents=extra, wait=False)
    deadline = time.monotonic() + 10
    refused = 0
    while time.monotonic() < deadline and not refused:
        _, _, metrics = h.get(stack.relay.process.admin, "/metrics")
        refused = metric(metrics.decode(), "xpart_relay_inner_tls_refused_total") or 0
        time.sleep(0.1)
    assert refused >= 1, stack.relay.process.logs()
    assert "agent-test.agent.xpart" in stack.relay.process.logs()
    status, _ = stack.agent.admin_json("/readyz")
    assert status == 503
    answer = ah.boto3_call(caller_env(stack, test_pki), op="converse", model=STANDIN_MODEL, text="x")
    assert answer.get("status") == 503, answer
    assert stack.relay.process.proc.poll() is None
    # Nothing reached the stand-in: the relay answered no request from that connection.
    assert not os.path.exists(os.path.join(stack.relay.directory, "audit.jsonl")) or \
        os.path.getsize(os.path.join(stack.relay.directory, "audit.jsonl")) == 0


def test_inner_tls_without_its_files_is_refused_with_the_fields_named(tmp_path, relay_bin):
    config = tmp_path / "relay.toml"
    path = h.relay_config(str(tmp_path), 1, 1, "/nonexistent/ca.pem")
    with open(path) as f:
        text = f.read()
    config.write_text(text.replace("[tunnel]\n", "[tunnel]\ninner_tls = true\n", 1))
    proc = subprocess.run([relay_bin, "--config", str(config), "--check"], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    for field in ("inner_tls_cert_file", "inner_tls_key_file", "inner_tls_ca_file"):
        assert f"[tunnel].{field}" in out, out
    assert "xpart ca issue --relay NAME" in out, out


# --- FIPS build -----------------------------------------------------------------------------------

FIPS_UPSTREAM = [{"service": "bedrock-runtime", "region": h.REGION, "fips": True, "host_header": FIPS_HOST}]


# What fips/build pins in the FIPS build's lock, and which releases those pins leave behind:
# the default lock must stay past them (docs/FIPS.md, "Two lock files").
HELD_BACK = {"rustls": "0.23.43", "rustls-webpki": "0.103.13", "aws-lc-rs": "1.17.0"}
# The first releases with the fixes for RUSTSEC-2026-0285/-0349 (rustls) and -0382 (rustls-webpki).
FIXED = {"rustls": (0, 23, 46), "rustls-webpki": (0, 103, 16)}


def locked_packages(name, lock="fips/Cargo.lock"):
    with open(os.path.join(ROOT, lock), "rb") as f:
        return [p for p in tomllib.load(f)["package"] if p["name"] == name]


def version_tuple(version):
    return tuple(int(n) for n in version.split("."))


def certified_module():
    """(module version, certificate) of the one aws-lc-fips-sys in fips/Cargo.lock."""
    (fips_sys,) = locked_packages("aws-lc-fips-sys")
    return CERTIFIED_FIPS_SYS[fips_sys["version"]]


def test_the_lock_holds_the_fips_build_on_a_module_with_a_certificate():
    # fips/Cargo.lock is what fips/build builds with --locked. A regeneration that lets aws-lc-rs
    # reach 1.18+ brings aws-lc-fips-sys 0.14 (the 4.x module, no certificate) in beside or
    # instead of 0.13.11; one that moves 0.13.x brings a 3.x version the certificate does not
    # name. Either fails here, on every build.
    fips_sys = locked_packages("aws-lc-fips-sys")
    assert [p["version"] for p in fips_sys] == list(CERTIFIED_FIPS_SYS), \
        f"fips/Cargo.lock has aws-lc-fips-sys {[p['version'] for p in fips_sys]}; the FIPS build must link " \
        f"exactly one, from {sorted(CERTIFIED_FIPS_SYS)} (docs/FIPS.md, 'The module and its certificate')"
    (aws_lc_rs,) = locked_packages("aws-lc-rs")
    assert "aws-lc-fips-sys" in aws_lc_rs["dependencies"], aws_lc_rs
    assert version_tuple(aws_lc_rs["version"])[:2] < (1, 18), aws_lc_rs["version"]
    rustls = [p for p in locked_packages("rustls") if p["version"].startswith("0.23.")]
    assert len(rustls) == 1 and "aws-lc-rs" in rustls[0]["dependencies"], rustls
    # The daemons name the certificate from their own table; it must say the same.
    version, certificate = certified_module()
    with open(os.path.join(ROOT, "daemon", "src", "crypto.rs")) as f:
        assert f'("{version}", "{certificate}")' in f.read()


def test_the_default_lock_is_past_the_releases_the_fips_lock_holds_back():
    # Only the FIPS build is held on the certified module: a pin in a Cargo.toml, or the FIPS
    # lock copied over Cargo.lock, would put the default build back on releases with open
    # advisories, and would fail here.
    for name, fixed in FIXED.items():
        locked = [p["version"] for p in locked_packages(name, "Cargo.lock")
                  if version_tuple(p["version"])[:2] == fixed[:2]]
        assert locked and all(version_tuple(v) >= fixed for v in locked), \
            f"Cargo.lock has {name} {locked}: the default build must be on {'.'.join(map(str, fixed))} or later " \
            f"(docs/FIPS.md, 'Two lock files'); only fips/Cargo.lock holds {HELD_BACK[name]}"
    for name, held in HELD_BACK.items():
        assert held not in [p["version"] for p in locked_packages(name, "Cargo.lock")], name


def test_the_fips_lock_is_the_default_lock_with_only_the_pins_applied():
    # fips/build --update-lock makes fips/Cargo.lock from Cargo.lock; a dependency moved in
    # Cargo.lock and not in the FIPS lock (cargo update without --update-lock) fails here. Only
    # the pinned crates and what they depend on may differ.
    def versions(lock):
        with open(os.path.join(ROOT, lock), "rb") as f:
            packages = tomllib.load(f)["package"]
        return packages, {(p["name"], p["version"]) for p in packages}

    fips_packages, fips = versions("fips/Cargo.lock")
    default_packages, default = versions("Cargo.lock")
    # The pins' dependency closure, in either lock (entries name "crate" or "crate version").
    reachable = set(HELD_BACK) | {"aws-lc-fips-sys", "aws-lc-sys", "bindgen"}
    for packages in (fips_packages, default_packages):
        changed = True
        while changed:
            changed = False
            for p in packages:
                if p["name"] in reachable:
                    for dep in p.get("dependencies", []):
                        name = dep.split(" ")[0]
                        if name not in reachable:
                            reachable.add(name)
                            changed = True
    differing = {name for name, _ in fips ^ default}
    assert differing <= reachable, \
        f"fips/Cargo.lock and Cargo.lock differ in {sorted(differing - reachable)}, which fips/build does not pin: " \
        "regenerate the FIPS lock with `fips/build --update-lock` and commit it"


def test_the_fips_binaries_link_one_aws_lc_fips_module_the_certified_one(fips_bins):
    # Each aws-lc-fips-sys release prefixes the module's symbols with its own version
    # (aws_lc_fips_0_13_11_...), so the symbol table says which modules a binary links.
    (certified,) = CERTIFIED_FIPS_SYS
    for name in ("xpart-agent", "xpart-relay"):
        with open(os.path.join(fips_bins, name), "rb") as f:
            linked = {m.decode().replace("_", ".") for m in re.findall(rb"aws_lc_fips_(\d+_\d+_\d+)_", f.read())}
        assert linked == {certified}, f"{name} links aws-lc-fips-sys {sorted(linked)}"


def test_fips_mode_carries_converse_and_converse_stream_end_to_end(fips_bins, start_inner_tls, test_pki):
    stack = start_inner_tls(relay_options={"upstreams": FIPS_UPSTREAM})
    converse_and_stream(stack, test_pki)
    version, certificate = certified_module()
    _, status = stack.agent.admin_json("/status")
    assert status["fips_mode"] is True and status["tunnel"]["inner_tls"] is True
    # What the module reports about itself at run time, not the crate it was built from.
    assert status["fips_module"] == {"version": version, "certificate": certificate}, status["fips_module"]
    _, _, body = h.get(stack.relay.process.admin, "/status")
    assert json.loads(body)["fips_module"] == {"version": version, "certificate": certificate}
    assert metric(stack.agent.metrics(), "xpart_fips_mode") == 1
    _, _, metrics = h.get(stack.relay.process.admin, "/metrics")
    assert metric(metrics.decode(), "xpart_fips_mode") == 1
    admin = f"{stack.agent.admin[0]}:{stack.agent.admin[1]}"
    shown = subprocess.run([cli(), "status", "--agent", admin, "--window", "0s"],
                           capture_output=True, text=True, timeout=30)
    assert f"crypto: FIPS mode ({version}, FIPS 140-3 certificate {certificate}, on every TLS hop)" \
        in shown.stdout and "inner TLS on" in shown.stdout, shown.stdout


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_fips_front_refuses_a_caller_offering_only_a_non_fips_suite(fips_bins, start_inner_tls):
    stack = start_inner_tls(relay_options={"upstreams": FIPS_UPSTREAM})
    target = f"127.0.0.1:{stack.agent.front[1]}"

    def s_client(*args):
        return subprocess.run(["openssl", "s_client", "-connect", target, "-servername", "localhost", *args],
                              input="", capture_output=True, text=True, timeout=30)

    chacha = s_client("-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256")
    assert chacha.returncode != 0, chacha.stdout
    assert "TLS_CHACHA20_POLY1305_SHA256" not in chacha.stdout.replace("-ciphersuites", "")
    chacha12 = s_client("-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
    assert chacha12.returncode != 0, chacha12.stdout
    # The same caller with an approved suite gets through: the refusal is the suite's.
    aes = s_client("-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256")
    assert aes.returncode == 0, aes.stdout + aes.stderr
    assert "TLS_AES_128_GCM_SHA256" in aes.stdout


def test_fips_mode_refuses_to_start_without_inner_tls(fips_bins, tmp_path, test_pki, upstream_dns, standin):
    relay_dir = tmp_path / "relay"
    relay_dir.mkdir()
    config = h.relay_config(str(relay_dir), standin.port, upstream_dns.address[1], test_pki["ca"],
                            upstreams=FIPS_UPSTREAM)
    proc = subprocess.run([h.relay_binary(), "--config", config], capture_output=True, text=True, timeout=30,
                          env=h.relay_env(str(relay_dir)))
    assert proc.returncode != 0
    assert "[tunnel].inner_tls" in proc.stderr and "FIPS" in proc.stderr, proc.stderr
    agent_config = ah.host_mode_config(str(tmp_path), test_pki, "[]")
    proc = subprocess.run([ah.agent_binary(), "--config", agent_config], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "[tunnel].inner_tls" in proc.stderr and "FIPS" in proc.stderr, proc.stderr


def test_fips_mode_refuses_a_non_fips_upstream(fips_bins, tmp_path, test_pki, upstream_dns, standin, pki_dir):
    relay_dir = tmp_path / "relay"
    relay_dir.mkdir()
    config = h.relay_config(str(relay_dir), standin.port, upstream_dns.address[1], test_pki["ca"])
    cert, key = issue(pki_dir, "relay", "relay-a")
    add_to_tunnel(config, inner_tls_lines(pki_dir, cert, key))
    proc = subprocess.run([h.relay_binary(), "--config", config, "--check"], capture_output=True, text=True,
                          timeout=30, env=h.relay_env(str(relay_dir)))
    assert proc.returncode != 0
    assert "[upstream].fips" in proc.stderr + proc.stdout, proc.stderr + proc.stdout
