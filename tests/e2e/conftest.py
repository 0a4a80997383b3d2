"""Fixtures for the loopback end-to-end suites: the test PKI, the upstream name's DNS, the
Bedrock stand-in, and a factory that starts xpart-relay in front of them."""

import os
import shutil

import pytest

import relay_harness as h


@pytest.fixture(scope="session")
def relay_bin():
    path = h.relay_binary()
    if not os.access(path, os.X_OK):
        pytest.skip(f"xpart-relay is not built at {path} (cargo build -p xpart-relay, or set XPART_BIN_DIR)")
    return path


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory):
    return h.certs.make_test_pki(str(tmp_path_factory.mktemp("pki")), [h.UPSTREAM_NAME, h.MULTI_ADDRESS_NAME, "localhost"])


@pytest.fixture(scope="session")
def upstream_dns():
    server = h.dns_server.TestDnsServer(
        {h.UPSTREAM_NAME: "127.0.0.1", h.MULTI_ADDRESS_NAME: ["127.0.0.2", "127.0.0.1"]}
    ).start()
    yield server
    server.stop()


@pytest.fixture
def credential_store():
    store = h.bedrock_standin.CredentialStore()
    store.add(*h.RELAY_KEY)
    return store


@pytest.fixture
def standin(test_pki, credential_store):
    server = h.bedrock_standin.BedrockStandin(test_pki["cert"], test_pki["key"], credential_store, h.REGION).start()
    yield server
    server.stop()


class RelayStack:
    def __init__(self, directory, relay, standin, dns):
        self.directory = directory
        self.relay = relay
        self.standin = standin
        self.dns = dns
        self.audit_path = os.path.join(directory, "audit.jsonl")

    def client(self, **kw):
        return h.bedrock_client(self.relay.endpoint, **kw)

    def audit(self, count, timeout=5.0):
        return h.read_audit(self.audit_path, count, timeout)


@pytest.fixture
def start_relay(relay_bin, tmp_path, test_pki, upstream_dns, standin):
    """start_relay(credentials="static"|"none"|ContainerCredentials, upstream_port=None, **config)."""
    started = []

    def start(credentials="static", upstream_port=None, **config):
        directory = tmp_path / f"relay{len(started)}"
        directory.mkdir()
        port = upstream_port if upstream_port is not None else standin.port
        path = h.relay_config(str(directory), port, upstream_dns.address[1], test_pki["ca"], **config)
        if credentials == "static":
            env = h.relay_env(str(directory), static_key=h.RELAY_KEY)
        elif credentials == "none":
            env = h.relay_env(str(directory))
        else:
            env = h.relay_env(str(directory), container_uri=credentials.uri)
        relay = h.RelayProcess(path, env, str(directory / "relay.log"))
        started.append(relay)
        return RelayStack(str(directory), relay, standin, upstream_dns)

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture
def relay(start_relay):
    return start_relay()


def pytest_report_header(config):
    return f"xpart binaries: {h.bin_dir()} (curl: {shutil.which('curl') or 'missing'})"
