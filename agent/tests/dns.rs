//! The agent's DNS server over real UDP and TCP sockets on 127.0.0.1: who gets forwarded
//! answers, names under the Bedrock names never leave the agent, and UDP answers fit the
//! client's size (512 bytes without EDNS).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use xpart_agent::Metrics;
use xpart_agent::{DnsServer, DnsSettings};

const BEDROCK: &str = "bedrock-runtime.us-east-1.amazonaws.com";
const FIPS: &str = "bedrock-runtime-fips.us-east-1.amazonaws.com";
const CONTROL: &str = "bedrock.us-east-1.amazonaws.com";
const ELSEWHERE: &str = "vpce-0abc.example.internal";
/// A name the stand-in upstream answers with [`MANY`] A records.
const BIG: &str = "many.example.internal";
const MANY: u8 = 40;

#[tokio::test]
async fn names_under_the_bedrock_names_are_answered_here_and_never_forwarded() {
    let (upstream, dns) = serving(&["127.0.0.0/8"]).await;
    for name in [
        format!("x.{BEDROCK}"),
        format!("a.b.{BEDROCK}"),
        format!("X.{}", BEDROCK.to_uppercase()),
        format!("vpce.{FIPS}"),
        format!("runtime.{CONTROL}"),
    ] {
        for tcp in [false, true] {
            let reply = ask(&dns, &name, RecordType::A, None, tcp).await;
            assert_eq!(reply.response_code(), ResponseCode::NXDomain, "{name}");
            assert!(reply.authoritative(), "{name}");
            assert!(reply.answers().is_empty());
        }
    }
    // The Bedrock names themselves, -fips and the control plane's included.
    for name in [BEDROCK, FIPS, CONTROL] {
        let reply = ask(&dns, name, RecordType::A, None, false).await;
        assert_eq!(reply.response_code(), ResponseCode::NoError);
        assert_eq!(addresses(&reply), [Ipv4Addr::new(127, 0, 0, 1)], "{name}");
    }
    assert_eq!(upstream.queries(), 0, "nothing went upstream");
    // A name that merely ends like a Bedrock name is not under it.
    let lookalike = format!("x{BEDROCK}");
    let reply = ask(&dns, &lookalike, RecordType::A, None, false).await;
    assert_eq!(reply.response_code(), ResponseCode::NoError);
    assert_eq!(upstream.queries(), 1);
    dns.shutdown().await;
}

#[tokio::test]
async fn clients_outside_allow_cidrs_get_refused_but_still_the_bedrock_names() {
    let (upstream, dns) = serving(&["10.0.16.0/20"]).await;
    for tcp in [false, true] {
        let reply = ask(&dns, ELSEWHERE, RecordType::A, None, tcp).await;
        assert_eq!(reply.response_code(), ResponseCode::Refused);
        assert!(reply.answers().is_empty());
        let own = ask(&dns, BEDROCK, RecordType::A, None, tcp).await;
        assert_eq!(addresses(&own), [Ipv4Addr::new(127, 0, 0, 1)]);
        let under = ask(&dns, &format!("x.{BEDROCK}"), RecordType::A, None, tcp).await;
        assert_eq!(under.response_code(), ResponseCode::NXDomain);
    }
    assert_eq!(upstream.queries(), 0, "nothing was forwarded");
    dns.shutdown().await;

    let allowed = start(&upstream, &["127.0.0.1/32"]).await;
    let reply = ask(&allowed, ELSEWHERE, RecordType::A, None, false).await;
    assert_eq!(reply.response_code(), ResponseCode::NoError);
    assert_eq!(addresses(&reply), [Ipv4Addr::new(192, 0, 2, 1)]);
    assert_eq!(upstream.queries(), 1);
    allowed.shutdown().await;
}

#[tokio::test]
async fn udp_answers_fit_512_bytes_without_edns_and_the_advertised_size_with_it() {
    let (_upstream, dns) = serving(&["127.0.0.0/8"]).await;

    let (reply, wire) = ask_raw(&dns, BIG, None).await;
    assert!(wire <= 512, "{wire} bytes over UDP without EDNS");
    assert!(reply.truncated(), "TC tells the client to retry over TCP");
    assert!(reply.answers().is_empty(), "no partial RRset");
    assert_eq!(reply.response_code(), ResponseCode::NoError);

    let (reply, wire) = ask_raw(&dns, BIG, Some(1232)).await;
    assert!(!reply.truncated());
    assert_eq!(reply.answers().len(), usize::from(MANY));
    assert!(wire > 512 && wire <= 1232, "{wire} bytes");
    let edns = reply.extensions().as_ref().expect("OPT answered with OPT");
    assert!(edns.max_payload() >= 512);

    // A client that advertises 512 through EDNS gets no more than that either.
    let (reply, wire) = ask_raw(&dns, BIG, Some(512)).await;
    assert!(wire <= 512 && reply.truncated(), "{wire} bytes");

    let over_tcp = ask(&dns, BIG, RecordType::A, None, true).await;
    assert!(!over_tcp.truncated());
    assert_eq!(over_tcp.answers().len(), usize::from(MANY));

    // Small answers are unaffected.
    let (reply, _) = ask_raw(&dns, BEDROCK, None).await;
    assert!(!reply.truncated());
    assert_eq!(addresses(&reply), [Ipv4Addr::new(127, 0, 0, 1)]);
    dns.shutdown().await;
}

/// A fresh upstream and a server forwarding to it for clients in `allow`.
async fn serving(allow: &[&str]) -> (Upstream, DnsServer) {
    let upstream = Upstream::start().await;
    let dns = start(&upstream, allow).await;
    (upstream, dns)
}

async fn start(upstream: &Upstream, allow: &[&str]) -> DnsServer {
    let settings = DnsSettings {
        listen: "127.0.0.1:0".parse().expect("address"),
        names: [BEDROCK, FIPS, CONTROL].map(String::from).to_vec(),
        answer_v4: vec![Ipv4Addr::LOCALHOST],
        answer_v6: Vec::new(),
        ttl: 30,
        upstream: vec![upstream.addr],
        allow_cidrs: allow
            .iter()
            .map(|c| c.parse::<IpNet>().expect("cidr"))
            .collect(),
    };
    DnsServer::start(settings, Metrics::new())
        .await
        .expect("dns starts")
}

fn query(name: &str, rdtype: RecordType, edns_payload: Option<u16>) -> Message {
    let mut message = Message::new();
    message
        .set_id(rand::random())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_utf8(name).expect("name"), rdtype));
    if let Some(payload) = edns_payload {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        message.set_edns(edns);
    }
    message
}

async fn ask(
    dns: &DnsServer,
    name: &str,
    rdtype: RecordType,
    edns_payload: Option<u16>,
    tcp: bool,
) -> Message {
    let message = query(name, rdtype, edns_payload);
    let bytes = message.to_vec().expect("encode");
    let reply = match tcp {
        true => exchange_tcp(dns.local_addr(), &bytes).await,
        false => exchange_udp(dns.local_addr(), &bytes).await,
    };
    let reply = Message::from_vec(&reply).expect("a DNS message");
    assert_eq!(reply.id(), message.id());
    reply
}

/// An A query over UDP: the decoded reply and its size on the wire.
async fn ask_raw(dns: &DnsServer, name: &str, edns_payload: Option<u16>) -> (Message, usize) {
    let bytes = query(name, RecordType::A, edns_payload)
        .to_vec()
        .expect("encode");
    let reply = exchange_udp(dns.local_addr(), &bytes).await;
    let len = reply.len();
    (Message::from_vec(&reply).expect("a DNS message"), len)
}

async fn exchange_udp(server: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 65535];
    let len = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
        .await
        .expect("an answer in time")
        .expect("recv");
    buf.truncate(len);
    buf
}

async fn exchange_tcp(server: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(server).await.expect("connect");
    let len = u16::try_from(bytes.len()).expect("small query");
    stream.write_all(&len.to_be_bytes()).await.expect("write");
    stream.write_all(bytes).await.expect("write");
    let read = async {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.expect("length");
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await.expect("reply");
        reply
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer in time")
}

fn addresses(reply: &Message) -> Vec<Ipv4Addr> {
    reply
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// A resolver standing in for the VPC's: [`BIG`] has [`MANY`] A records, every other name
/// one (192.0.2.1). Counts the queries it gets.
struct Upstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start() -> Upstream {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let queries = Arc::new(AtomicUsize::new(0));
        let counted = queries.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let Ok(request) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let reply = upstream_reply(&request);
                let _ = socket.send_to(&reply, from).await;
            }
        });
        Upstream { addr, queries }
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

fn upstream_reply(request: &Message) -> Vec<u8> {
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .set_recursion_available(true);
    let Some(question) = request.queries().first() else {
        return reply.to_vec().expect("encode");
    };
    reply.add_query(question.clone());
    let name = question.name().clone();
    let count = match name.to_ascii().trim_end_matches('.') == BIG {
        true => MANY,
        false => 1,
    };
    if question.query_type() == RecordType::A {
        for i in 0..count {
            let ip = Ipv4Addr::new(192, 0, 2, i + 1);
            reply.add_answer(Record::from_rdata(name.clone(), 300, RData::A(A(ip))));
        }
    }
    let limit = match request.extensions() {
        Some(edns) => {
            let mut ours = Edns::new();
            ours.set_max_payload(4096);
            reply.set_edns(ours);
            usize::from(edns.max_payload().max(512))
        }
        None => 512,
    };
    let wire = reply.to_vec().expect("encode");
    if wire.len() <= limit {
        return wire;
    }
    reply.take_answers();
    reply.set_truncated(true);
    reply.to_vec().expect("encode")
}
