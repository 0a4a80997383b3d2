//! The agent's DNS handler (`Answerer::answer_packet`: decode, decide, encode) on arbitrary
//! packets over UDP and TCP, with the names of a typical `[dns]` and no upstream.
//!
//! Beyond "no panic": every reply decodes, is a response, carries the query's id, and a UDP
//! reply fits the size the query allows (512 bytes without EDNS, else its payload size,
//! capped at 4096), or, for a refusal that echoes the question section, the query's own size
//! (no amplification).
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;

use hickory_proto::op::{Message, MessageType};
use hickory_proto::serialize::binary::BinDecodable;
use hickory_proto::xfer::Protocol;
use libfuzzer_sys::fuzz_target;
use xpart_agent::{Answerer, DnsSettings};
use xpart_agent::Metrics;

fn answerer() -> &'static Answerer {
    static ANSWERER: OnceLock<Answerer> = OnceLock::new();
    ANSWERER.get_or_init(|| {
        let settings = DnsSettings {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            names: vec![
                "bedrock-runtime.us-east-1.amazonaws.com".to_string(),
                "bedrock-runtime-fips.us-east-1.amazonaws.com".to_string(),
            ],
            answer_v4: vec![Ipv4Addr::new(10, 0, 1, 10)],
            answer_v6: vec!["fd00::10".parse().expect("literal")],
            ttl: 60,
            upstream: Vec::new(),
            allow_cidrs: Vec::new(),
        };
        Answerer::new(&settings, Metrics::new()).expect("fixed settings load")
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, packet)) = data.split_first() else {
        return;
    };
    let protocol = match selector & 1 {
        0 => Protocol::Udp,
        _ => Protocol::Tcp,
    };
    let src = SocketAddr::from((Ipv4Addr::new(10, 0, 16, 5), 40000));
    let Some(reply) = runtime().block_on(answerer().answer_packet(packet, src, protocol)) else {
        return;
    };
    let query = Message::from_bytes(packet).ok();
    let decoded = match Message::from_bytes(&reply) {
        Ok(decoded) => decoded,
        Err(error) => panic!("the reply decodes: {error:?}"),
    };
    assert_eq!(decoded.message_type(), MessageType::Response);
    if let Some(query) = &query {
        assert_eq!(
            decoded.id(),
            query.id(),
            "reply id differs from the query's"
        );
        if protocol == Protocol::Udp {
            let limit = query
                .extensions()
                .as_ref()
                .map_or(512, |edns| usize::from(edns.max_payload().clamp(512, 4096)));
            // Answers fit the limit; a refusal (FORMERR for several questions) echoes the
            // question section as received, so it is never larger than the query itself.
            assert!(
                reply.len() <= limit.max(512) || reply.len() <= packet.len(),
                "UDP reply of {} bytes over the {limit} the query allows",
                reply.len()
            );
        }
    }
});
