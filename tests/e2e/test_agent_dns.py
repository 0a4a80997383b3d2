"""The agent's private DNS, over UDP and TCP on 127.0.0.1: the Bedrock names resolve to the
agent, names under them get NXDOMAIN from the agent itself, other names are forwarded to the
configured resolver (a tiny test server on 127.0.0.1) for allowed clients only, UDP answers
fit 512 bytes without EDNS, and malformed queries get FORMERR or nothing, never a crash."""

import json
import os
import socket
import struct

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

import agent_harness as a
import relay_harness as h

FORWARDED = "vpce-0abc.bedrock-runtime.us-east-1.vpce.amazonaws.com"


@pytest.fixture
def start_agent(tmp_path, test_pki):
    if not os.access(a.agent_binary(), os.X_OK):
        pytest.skip(f"xpart-agent is not built at {a.agent_binary()}")
    started = []

    def start(upstream=(), dns_extra="", principal_cidrs=None):
        """`dns_extra` is appended to [dns]; `principal_cidrs` gives the principal networks."""
        upstream_list = "[" + ", ".join(f'"{host}:{port}"' for host, port in upstream) + "]"
        directory = tmp_path / f"agent{len(started)}"
        directory.mkdir()
        path = a.host_mode_config(str(directory), test_pki, upstream_list)
        with open(path) as f:
            text = f.read()
        text = text.replace("ttl = 30\n", f"ttl = 30\n{dns_extra}\n", 1)
        if principal_cidrs is not None:
            text = text.replace('name = "lambda"\n', f'name = "lambda"\nsource_cidrs = {json.dumps(principal_cidrs)}\n', 1)
        with open(path, "w") as f:
            f.write(text)
        agent = a.AgentProcess(path, str(directory / "agent.log"))
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def ask(agent, name, rdtype="A", tcp=False):
    query = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, agent.dns[0], port=agent.dns[1], timeout=3)


def test_bedrock_names_resolve_to_the_agent_over_udp_and_tcp(start_agent):
    agent = start_agent()
    for tcp in (False, True):
        reply = ask(agent, h.UPSTREAM_NAME, "A", tcp=tcp)
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.flags & dns.flags.AA
        [rrset] = reply.answer
        assert [r.address for r in rrset] == ["127.0.0.1"]
        assert rrset.ttl == 30
    reply = ask(agent, "BEDROCK-Runtime.US-East-1.amazonaws.com.", "AAAA")
    [rrset] = reply.answer
    assert [r.address for r in rrset] == ["::1"]
    reply = ask(agent, "bedrock-runtime-fips.us-east-1.amazonaws.com", "A")
    assert reply.answer[0][0].address == "127.0.0.1"
    reply = ask(agent, h.UPSTREAM_NAME, "MX")
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer == [], "other types: no data"


def test_other_names_are_refused_without_an_upstream(start_agent):
    agent = start_agent()
    reply = ask(agent, "example.internal", "A")
    assert reply.rcode() == dns.rcode.REFUSED
    assert reply.answer == []
    metrics = agent.metrics()
    assert 'xpart_agent_dns_answers_total{outcome="refused"} 1' in metrics


def test_other_names_are_forwarded_to_the_upstream_and_cached(start_agent):
    upstream = h.dns_server.TestDnsServer({FORWARDED: "127.0.0.7"}).start()
    try:
        agent = start_agent(upstream=[upstream.address])
        first = ask(agent, FORWARDED, "A")
        assert first.rcode() == dns.rcode.NOERROR
        assert first.answer[0][0].address == "127.0.0.7"
        second = ask(agent, FORWARDED, "A", tcp=True)
        assert second.answer[0][0].address == "127.0.0.7"
        assert upstream.queries[FORWARDED] == 1, "the second answer came from the cache"
        missing = ask(agent, "nothing-here.example.internal", "A")
        assert missing.rcode() == dns.rcode.NXDOMAIN
        # The agent's own names never go upstream.
        ask(agent, h.UPSTREAM_NAME, "A")
        assert h.UPSTREAM_NAME not in upstream.queries
        metrics = agent.metrics()
        assert 'xpart_agent_dns_answers_total{outcome="forwarded"} 2' in metrics
        assert 'xpart_agent_dns_answers_total{outcome="nxdomain"} 1' in metrics
    finally:
        upstream.stop()


def test_dead_upstream_gives_servfail_not_a_hang(start_agent):
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    try:
        agent = start_agent(upstream=[dead.getsockname()])
        query = dns.message.make_query("example.internal", "A")
        reply = dns.query.udp(query, agent.dns[0], port=agent.dns[1], timeout=15)
        assert reply.rcode() == dns.rcode.SERVFAIL
    finally:
        dead.close()


def raw_udp(agent, payload, timeout=1.0):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        sock.sendto(payload, agent.dns)
        try:
            return sock.recv(4096)
        except socket.timeout:
            return None
    finally:
        sock.close()


def test_garbage_gets_formerr_or_silence_and_the_server_survives(start_agent):
    agent = start_agent()
    # Shorter than a header: no id to answer to.
    assert raw_udp(agent, b"\x00\x01\x02") is None
    # A header promising one question, then a label running off the end.
    truncated = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x3fabc"
    reply = raw_udp(agent, truncated)
    assert reply is not None
    query_id, flags = struct.unpack(">HH", reply[:4])
    assert query_id == 0x1234
    assert flags & 0x8000, "a response"
    assert flags & 0x000F == dns.rcode.FORMERR
    # Two questions in one query.
    two = dns.message.make_query(h.UPSTREAM_NAME, "A")
    two.question.append(dns.message.make_query("example.internal", "A").question[0])
    reply = dns.message.from_wire(raw_udp(agent, two.to_wire()))
    assert reply.rcode() == dns.rcode.FORMERR
    # Random bytes of every length, over UDP and TCP.
    for length in range(0, 64, 7):
        raw_udp(agent, os.urandom(length), timeout=0.05)
    with socket.create_connection(agent.dns, timeout=2) as tcp:
        tcp.sendall(struct.pack(">H", 40) + os.urandom(40))
    # Still answering.
    assert ask(agent, h.UPSTREAM_NAME, "A").answer[0][0].address == "127.0.0.1"
    assert agent.proc.poll() is None
    assert 'xpart_agent_dns_answers_total{outcome="formerr"}' in agent.metrics()


def test_names_under_the_bedrock_names_never_go_upstream(start_agent):
    """The Resolver rule that sends the Bedrock name here covers its subdomains too; forwarding
    one to the VPC resolver would send it straight back (a loop)."""
    upstream = h.dns_server.TestDnsServer({f"x.{h.UPSTREAM_NAME}": "127.0.0.9"}).start()
    try:
        agent = start_agent(upstream=[upstream.address])
        for name in (f"x.{h.UPSTREAM_NAME}", f"a.b.{h.UPSTREAM_NAME}", "vpce.bedrock-runtime-fips.us-east-1.amazonaws.com"):
            for tcp in (False, True):
                reply = ask(agent, name, "A", tcp=tcp)
                assert reply.rcode() == dns.rcode.NXDOMAIN, name
                assert reply.flags & dns.flags.AA
                assert reply.answer == []
        assert upstream.queries == {}, "nothing was forwarded"
    finally:
        upstream.stop()


def test_forwarding_is_only_for_allowed_clients(start_agent):
    upstream = h.dns_server.TestDnsServer({FORWARDED: "127.0.0.7"}).start()
    try:
        outsider = start_agent(upstream=[upstream.address], dns_extra='allow_cidrs = ["10.0.0.0/8"]')
        for tcp in (False, True):
            reply = ask(outsider, FORWARDED, "A", tcp=tcp)
            assert reply.rcode() == dns.rcode.REFUSED
            assert reply.answer == []
            # The Bedrock names are answered for everyone.
            assert ask(outsider, h.UPSTREAM_NAME, "A", tcp=tcp).answer[0][0].address == "127.0.0.1"
        assert upstream.queries == {}
        assert 'xpart_agent_dns_answers_total{outcome="refused"} 2' in outsider.metrics()

        # Without allow_cidrs, the principals' networks are the allowed clients: 127.0.0.1 is
        # not among them here.
        by_default = start_agent(upstream=[upstream.address], principal_cidrs=["10.0.16.0/20"])
        assert ask(by_default, FORWARDED, "A").rcode() == dns.rcode.REFUSED
        assert upstream.queries == {}

        allowed = start_agent(upstream=[upstream.address], principal_cidrs=["127.0.0.0/8"])
        assert ask(allowed, FORWARDED, "A").answer[0][0].address == "127.0.0.7"
        assert upstream.queries[FORWARDED] == 1
    finally:
        upstream.stop()


def test_udp_answers_without_edns_are_truncated_at_512_bytes(start_agent):
    many = [f"127.0.1.{i}" for i in range(1, 41)]
    upstream = h.dns_server.TestDnsServer({"many.example.internal": many}).start()
    try:
        agent = start_agent(upstream=[upstream.address])
        query = dns.message.make_query("many.example.internal", "A", use_edns=False)
        wire = raw_udp(agent, query.to_wire(), timeout=10)
        assert wire is not None and len(wire) <= 512
        reply = dns.message.from_wire(wire)
        assert reply.flags & dns.flags.TC
        assert reply.answer == []
        # dnspython's resolver-style fallback: the same query over TCP gets everything.
        full, used_tcp = dns.query.udp_with_fallback(query, agent.dns[0], port=agent.dns[1], timeout=10)
        assert used_tcp
        assert sorted(r.address for r in full.answer[0]) == sorted(many)
        # With EDNS the advertised size is honoured.
        edns = dns.message.make_query("many.example.internal", "A", use_edns=0, payload=1232)
        wire = raw_udp(agent, edns.to_wire(), timeout=10)
        assert 512 < len(wire) <= 1232
        reply = dns.message.from_wire(wire)
        assert not reply.flags & dns.flags.TC
        assert len(reply.answer[0]) == 40
        assert reply.edns == 0
    finally:
        upstream.stop()
