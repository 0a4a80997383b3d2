//! Private DNS: the configured Bedrock names resolve to the agent; names under them do not
//! exist; everything else goes to the upstream resolvers, for allowed clients only (others,
//! and everyone when there are no upstreams, are refused).
//!
//! Names under a configured name are answered here because the upstream is normally the VPC
//! resolver, whose forwarding rule for the Bedrock name covers its subdomains too and would
//! send the query straight back: a loop. Forwarding is limited to `allow_cidrs` so the agent
//! is no open resolver; its own names are answered for everyone, since they are what the
//! Route 53 Resolver forwards and they reveal only the agent's address.
//!
//! UDP answers fit what the client can take: 512 bytes without EDNS (RFC 1035 §4.2.1),
//! the advertised size with it (RFC 6891 §6.2.5). A larger answer goes out without records
//! and with TC set, so the client asks again over TCP.
//!
//! hickory-server parses the wire format and answers malformed messages it can still read a
//! header from with FORMERR; [`Answerer`] decides each well-formed query.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecodable;
use hickory_proto::xfer::Protocol;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use hickory_server::authority::{MessageRequest, MessageResponseBuilder};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::ServerFuture;
use ipnet::IpNet;
use tokio::net::{TcpListener, UdpSocket};

use xpart_daemon::reload::Live;

use crate::error::StartError;
use crate::metrics::Metrics;

/// What the DNS server answers, from `[dns]`.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    pub listen: SocketAddr,
    /// Names answered with the agent's own addresses (case-insensitive, exact).
    pub names: Vec<String>,
    /// Every address goes in each answer (one per zone behind a load balancer, say); the
    /// caller's resolver picks among them.
    pub answer_v4: Vec<Ipv4Addr>,
    pub answer_v6: Vec<Ipv6Addr>,
    pub ttl: u32,
    /// Resolvers for every other name; empty refuses them.
    pub upstream: Vec<SocketAddr>,
    /// Clients whose queries for other names are forwarded; others get REFUSED.
    pub allow_cidrs: Vec<IpNet>,
}

/// A running DNS server (UDP and TCP on the same address).
pub struct DnsServer {
    local_addr: SocketAddr,
    answerer: Arc<Live<Answerer>>,
    server: ServerFuture<LiveAnswerer>,
}

impl DnsServer {
    pub async fn start(settings: DnsSettings, metrics: Metrics) -> Result<DnsServer, StartError> {
        let (udp, tcp, local_addr) = bind_pair(settings.listen).await?;
        let answerer = Arc::new(Live::new(Answerer::new(&settings, metrics)?));
        let mut server = ServerFuture::new(LiveAnswerer(answerer.clone()));
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5));
        Ok(DnsServer {
            local_addr,
            answerer,
            server,
        })
    }

    /// Answers every query from now on with `answerer` (reload: names, addresses, TTL,
    /// upstream resolvers, allowed clients); the sockets stay.
    pub fn replace_answerer(&self, answerer: Answerer) {
        self.answerer.store(answerer);
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub async fn shutdown(mut self) {
        if let Err(error) = self.server.shutdown_gracefully().await {
            tracing::warn!(%error, "dns server did not shut down cleanly");
        }
    }
}

/// Binds UDP and TCP on the same address. With port 0 the UDP socket picks the port and TCP
/// follows it; another process may already hold that TCP port, so a few ports are tried.
async fn bind_pair(listen: SocketAddr) -> Result<(UdpSocket, TcpListener, SocketAddr), StartError> {
    let bind = |source| StartError::Bind {
        field: "[dns].listen",
        addr: listen,
        source,
    };
    let attempts = if listen.port() == 0 { 20 } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(listen).await.map_err(bind)?;
        let local_addr = udp.local_addr().map_err(bind)?;
        match TcpListener::bind(local_addr).await {
            Ok(tcp) => return Ok((udp, tcp, local_addr)),
            Err(error) => last_error = Some(error),
        }
    }
    Err(bind(
        last_error.unwrap_or_else(|| std::io::Error::other("no port found")),
    ))
}

/// Decides the answer to each query.
pub struct Answerer {
    names: HashSet<LowerName>,
    allow_cidrs: Vec<IpNet>,
    answer_v4: Vec<Ipv4Addr>,
    answer_v6: Vec<Ipv6Addr>,
    ttl: u32,
    upstream: Option<TokioResolver>,
    metrics: Metrics,
}

/// How a query was answered, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Answered,
    Forwarded,
    NxDomain,
    NoData,
    Refused,
    ServFail,
    FormErr,
    NotImplemented,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Forwarded => "forwarded",
            Outcome::NxDomain => "nxdomain",
            Outcome::NoData => "nodata",
            Outcome::Refused => "refused",
            Outcome::ServFail => "servfail",
            Outcome::FormErr => "formerr",
            Outcome::NotImplemented => "notimp",
        }
    }
}

impl Answerer {
    pub fn new(settings: &DnsSettings, metrics: Metrics) -> Result<Answerer, StartError> {
        let mut names = HashSet::new();
        for name in &settings.names {
            let parsed = Name::from_utf8(name).map_err(|e| StartError::DnsName {
                name: name.clone(),
                reason: e.to_string(),
            })?;
            let mut fqdn = parsed;
            fqdn.set_fqdn(true);
            names.insert(LowerName::new(&fqdn));
        }
        let upstream =
            (!settings.upstream.is_empty()).then(|| upstream_resolver(&settings.upstream));
        Ok(Answerer {
            names,
            allow_cidrs: settings.allow_cidrs.clone(),
            answer_v4: settings.answer_v4.clone(),
            answer_v6: settings.answer_v6.clone(),
            ttl: settings.ttl,
            upstream,
            metrics,
        })
    }

    async fn answer<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> (Outcome, std::io::Result<ResponseInfo>) {
        let rewritten = question_rewritten(request);
        let builder =
            MessageResponseBuilder::from_message_request(rewritten.as_ref().unwrap_or(request));
        let mut header = Header::response_from_request(request.header());
        header.set_recursion_available(self.upstream.is_some());

        if request.message_type() != MessageType::Query {
            // Responses are never answered: that would let anyone reflect traffic off us.
            return (Outcome::FormErr, Ok(ResponseInfo::from(header)));
        }
        if request.op_code() != OpCode::Query {
            let reply = builder.error_msg(request.header(), ResponseCode::NotImp);
            return (Outcome::NotImplemented, response.send_response(reply).await);
        }
        let Ok(info) = request.request_info() else {
            // Exactly one question is required (RFC 9619).
            let reply = builder.error_msg(request.header(), ResponseCode::FormErr);
            return (Outcome::FormErr, response.send_response(reply).await);
        };
        let query = info.query;
        let name: Name = query.name().into();
        let size = ReplySize::of(request);

        if self.names.contains(query.name()) {
            header.set_authoritative(true);
            let records = self.own_records(&name, query.query_type());
            let outcome = match records.is_empty() {
                true => Outcome::NoData,
                false => Outcome::Answered,
            };
            let sent = send_records(request, builder, header, &records, &size, &mut response);
            return (outcome, sent.await);
        }
        if self.is_under_own_name(query.name()) {
            header.set_authoritative(true);
            header.set_response_code(ResponseCode::NXDomain);
            let sent = send_records(request, builder, header, &[], &size, &mut response);
            return (Outcome::NxDomain, sent.await);
        }
        if !crate::auth::source_in(&self.allow_cidrs, request.src().ip()) {
            let reply = builder.error_msg(request.header(), ResponseCode::Refused);
            return (Outcome::Refused, response.send_response(reply).await);
        }
        let Some(resolver) = &self.upstream else {
            let reply = builder.error_msg(request.header(), ResponseCode::Refused);
            return (Outcome::Refused, response.send_response(reply).await);
        };
        match resolver.lookup(name, query.query_type()).await {
            Ok(lookup) => {
                let records: Vec<Record> = lookup.records().to_vec();
                let sent = send_records(request, builder, header, &records, &size, &mut response);
                (Outcome::Forwarded, sent.await)
            }
            Err(error) if error.is_nx_domain() => {
                header.set_response_code(ResponseCode::NXDomain);
                let sent = send_records(request, builder, header, &[], &size, &mut response);
                (Outcome::NxDomain, sent.await)
            }
            Err(error) if error.is_no_records_found() => {
                let sent = send_records(request, builder, header, &[], &size, &mut response);
                (Outcome::NoData, sent.await)
            }
            Err(error) => {
                tracing::debug!(%error, "upstream resolver failed");
                let reply = builder.error_msg(request.header(), ResponseCode::ServFail);
                (Outcome::ServFail, response.send_response(reply).await)
            }
        }
    }

    /// Whether `name` is strictly below one of the configured names.
    fn is_under_own_name(&self, name: &LowerName) -> bool {
        self.names
            .iter()
            .any(|own| own != name && own.zone_of(name))
    }

    fn own_records(&self, name: &Name, query_type: RecordType) -> Vec<Record> {
        let record = |rdata| Record::from_rdata(name.clone(), self.ttl, rdata);
        let v4 = || self.answer_v4.iter().map(|ip| record(RData::A(A(*ip))));
        let v6 = || {
            self.answer_v6
                .iter()
                .map(|ip| record(RData::AAAA(AAAA(*ip))))
        };
        match query_type {
            RecordType::A => v4().collect(),
            RecordType::AAAA => v6().collect(),
            RecordType::ANY => v4().chain(v6()).collect(),
            _ => Vec::new(),
        }
    }
}

/// The server's handler: whichever [`Answerer`] the last reload stored.
struct LiveAnswerer(Arc<Live<Answerer>>);

#[async_trait::async_trait]
impl RequestHandler for LiveAnswerer {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        let answerer = self.0.load();
        answerer.handle_request(request, response).await
    }
}

#[async_trait::async_trait]
impl RequestHandler for Answerer {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        let (outcome, sent) = self.answer(request, response).await;
        self.metrics
            .dns_answers
            .with_label_values(&[outcome.label()])
            .inc();
        match sent {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, peer = %request.src(), "could not send dns answer");
                let mut header = Header::response_from_request(request.header());
                header.set_response_code(ResponseCode::ServFail);
                header.into()
            }
        }
    }
}

/// How large a reply may be, from the request's transport and EDNS.
#[derive(Debug, Clone)]
struct ReplySize {
    /// `None` over TCP: a DNS message there may use the full 16-bit length.
    limit: Option<u16>,
    /// The OPT record to answer with, when the query had one.
    edns: Option<Edns>,
}

impl ReplySize {
    fn of(request: &Request) -> ReplySize {
        let edns = request.edns().map(|_| {
            let mut ours = Edns::new();
            ours.set_max_payload(MAX_UDP_PAYLOAD);
            ours
        });
        let limit = match request.protocol() {
            Protocol::Udp => Some(udp_limit(request.edns())),
            _ => None,
        };
        ReplySize { limit, edns }
    }
}

/// The UDP payload a client can take: its EDNS size (at least 512, at most what we ever
/// send), or 512 without EDNS.
fn udp_limit(edns: Option<&Edns>) -> u16 {
    match edns {
        Some(edns) => edns
            .max_payload()
            .clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD),
        None => CLASSIC_UDP_PAYLOAD,
    }
}

/// The DNS UDP message limit without EDNS (RFC 1035 §4.2.1).
const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// The request with its question section written out again from the parsed questions.
///
/// hickory-server copies a request's question section into the reply byte for byte. A
/// question name may end in a compression pointer, and one that points into the query's
/// 12-byte header then names bytes of the reply's header instead (other flags, other
/// counts): a reply that does not decode, or names another name. Writing the question again
/// from what was parsed keeps the name, case included, and never compresses it. `None` when
/// it cannot be written again, which a name that parsed cannot cause.
fn question_rewritten(request: &MessageRequest) -> Option<MessageRequest> {
    let mut message = Message::new();
    message.set_id(request.id());
    // Only a single question is answered (RFC 9619); the FORMERR to several carries none, so
    // it can never be larger than the query that caused it.
    if let [query] = request.queries() {
        message.add_query(query.original().clone());
    }
    let bytes = message.to_vec().ok()?;
    MessageRequest::from_bytes(&bytes).ok()
}

/// The largest UDP answer the agent sends, whatever a client advertises; hickory-server's
/// own ceiling for UDP.
const MAX_UDP_PAYLOAD: u16 = 4096;

/// Sends `records` as the answer, or, when they would not fit the client's UDP limit, an
/// empty answer with TC set (RFC 2181 §9: a partial RRset is worse than none; the client
/// retries over TCP).
async fn send_records<R: ResponseHandler>(
    request: &Request,
    mut builder: MessageResponseBuilder<'_>,
    mut header: Header,
    records: &[Record],
    size: &ReplySize,
    response: &mut R,
) -> std::io::Result<ResponseInfo> {
    if let Some(edns) = &size.edns {
        builder.edns(edns.clone());
    }
    let fits = match size.limit {
        None => true,
        Some(limit) => encoded_len(request, header, records, size.edns.as_ref())
            .is_some_and(|len| len <= usize::from(limit)),
    };
    if fits {
        let reply = builder.build(header, records.iter(), &[], &[], &[]);
        return response.send_response(reply).await;
    }
    header.set_truncated(true);
    let reply = builder.build_no_records(header);
    response.send_response(reply).await
}

/// The wire length of a reply with `records`, encoded as hickory-server will (same
/// compression); `None` if it cannot be encoded at all.
fn encoded_len(
    request: &Request,
    header: Header,
    records: &[Record],
    edns: Option<&Edns>,
) -> Option<usize> {
    let mut message = Message::new();
    message.set_header(header);
    message.add_queries(request.queries().iter().map(|q| q.original().clone()));
    message.add_answers(records.iter().cloned());
    if let Some(edns) = edns {
        message.set_edns(edns.clone());
    }
    message.to_vec().ok().map(|bytes| bytes.len())
}

fn upstream_resolver(upstream: &[SocketAddr]) -> TokioResolver {
    let mut config = ResolverConfig::new();
    for addr in upstream {
        config.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
        config.add_name_server(NameServerConfig::new(*addr, Protocol::Tcp));
    }
    let mut opts = ResolverOpts::default();
    // Callers do their own search-list expansion; forward names exactly as asked.
    opts.ndots = 0;
    // Ask with EDNS so answers over 512 bytes come back over UDP, as callers asked for them.
    opts.edns0 = true;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        .with_options(opts)
        .build()
}

/// Addresses the answer may use, for validation messages.
pub fn is_usable_answer(ip: IpAddr) -> bool {
    !ip.is_unspecified() && !ip.is_multicast()
}

impl Answerer {
    /// One query packet in, the encoded reply out, through the decoding, the decision and the
    /// encoding (size limit included) the server applies, without sockets: the entry point for
    /// fuzzing and packet-level tests. `None` when the server would send nothing from this
    /// handler: a packet that does not decode as a message, or a response.
    pub async fn answer_packet(
        &self,
        packet: &[u8],
        src: SocketAddr,
        protocol: Protocol,
    ) -> Option<Vec<u8>> {
        let message = MessageRequest::from_bytes(packet).ok()?;
        if message.message_type() == MessageType::Response {
            return None;
        }
        let request = Request::new(message, src, protocol);
        let reply = CapturedReply {
            protocol,
            bytes: Default::default(),
        };
        self.handle_request(&request, reply.clone()).await;
        let mut bytes = reply.bytes.lock().unwrap_or_else(|e| e.into_inner());
        bytes.take()
    }
}

/// Keeps the reply instead of sending it, encoded as hickory-server's socket handle encodes
/// it: UDP replies fit the requester's EDNS payload size (4096 bytes without EDNS), TCP ones
/// 65535 bytes; a reply that cannot be encoded becomes a bare SERVFAIL.
#[derive(Clone)]
struct CapturedReply {
    protocol: Protocol,
    bytes: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for CapturedReply {
    async fn send_response<'a>(
        &mut self,
        response: hickory_server::authority::MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> std::io::Result<ResponseInfo> {
        use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
        let id = response.header().id();
        let max_size = match self.protocol {
            Protocol::Udp => response
                .get_edns()
                .as_ref()
                .map_or(hickory_proto::udp::MAX_RECEIVE_BUFFER_SIZE as u16, |edns| {
                    edns.max_payload()
                }),
            _ => u16::MAX,
        };
        let mut buffer = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut buffer);
        encoder.set_max_size(max_size);
        let info = match response.destructive_emit(&mut encoder) {
            Ok(info) => info,
            Err(_) => {
                buffer.clear();
                let mut encoder = BinEncoder::new(&mut buffer);
                let mut header = Header::new();
                header.set_id(id);
                header.set_response_code(ResponseCode::ServFail);
                header.emit(&mut encoder).map_err(std::io::Error::other)?;
                ResponseInfo::from(header)
            }
        };
        *self.bytes.lock().unwrap_or_else(|e| e.into_inner()) = Some(buffer);
        Ok(info)
    }
}
