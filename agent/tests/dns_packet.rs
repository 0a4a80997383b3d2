//! `Answerer::answer_packet`, the socket-free entry the DNS fuzz target drives: one query
//! packet in, the encoded reply the server would send out.

use std::net::{Ipv4Addr, SocketAddr};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::xfer::Protocol;
use xpart_agent::Metrics;
use xpart_agent::{Answerer, DnsSettings};

const NAME: &str = "bedrock-runtime.us-east-1.amazonaws.com.";
const ANSWER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);

#[tokio::test]
async fn own_name_is_answered_with_the_agent_address_and_the_query_id() {
    let query = query(0x1234, &[NAME], RecordType::A);

    let reply = decoded(&answer(&answerer(), &query, Protocol::Udp).await);

    assert_eq!(reply.id(), 0x1234);
    assert_eq!(reply.message_type(), MessageType::Response);
    assert_eq!(reply.response_code(), ResponseCode::NoError);
    let answers: Vec<&RData> = reply.answers().iter().map(|r| r.data()).collect();
    assert_eq!(answers, vec![&RData::A(A(ANSWER))]);
}

#[tokio::test]
async fn undecodable_packets_and_responses_get_no_reply() {
    let answerer = answerer();
    assert_eq!(
        answerer
            .answer_packet(b"\x12\x34garbage", caller(), Protocol::Udp)
            .await,
        None
    );
    let mut response = Message::new();
    response
        .set_id(7)
        .set_message_type(MessageType::Response)
        .add_query(Query::query(Name::from_ascii(NAME).unwrap(), RecordType::A));
    let response = response.to_vec().unwrap();
    assert_eq!(
        answerer
            .answer_packet(&response, caller(), Protocol::Udp)
            .await,
        None
    );
}

#[tokio::test]
async fn tcp_reply_to_several_questions_is_a_whole_formerr() {
    let query = oversize_query(0x4322);

    let reply = decoded(&answer(&answerer(), &query, Protocol::Tcp).await);

    assert_eq!(reply.id(), 0x4322);
    assert_eq!(reply.response_code(), ResponseCode::FormErr);
}

/// An answerer for [`NAME`] alone, with [`ANSWER`], over IPv4 only.
fn answerer() -> Answerer {
    Answerer::new(&settings(), Metrics::new()).expect("settings load")
}

fn settings() -> DnsSettings {
    DnsSettings {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        names: vec![NAME.trim_end_matches('.').to_string()],
        answer_v4: vec![ANSWER],
        answer_v6: Vec::new(),
        ttl: 60,
        upstream: Vec::new(),
        allow_cidrs: Vec::new(),
    }
}

/// The reply `answerer` sends to `packet` from [`caller`].
async fn answer(answerer: &Answerer, packet: &[u8], protocol: Protocol) -> Vec<u8> {
    answerer
        .answer_packet(packet, caller(), protocol)
        .await
        .expect("a reply")
}

fn decoded(reply: &[u8]) -> Message {
    Message::from_vec(reply).expect("the reply decodes")
}

fn caller() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, 16, 5), 40000))
}

fn query(id: u16, names: &[&str], record_type: RecordType) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    for name in names {
        message.add_query(Query::query(
            Name::from_ascii(name).expect("test names are ASCII"),
            record_type,
        ));
    }
    message.to_vec().expect("encode the query")
}

/// A query with three questions of 240-odd bytes each: more than 512 bytes.
fn oversize_query(id: u16) -> Vec<u8> {
    let names: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|label| format!("{}.", [label.repeat(60).as_str(); 4].join(".")))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    query(id, &names, RecordType::A)
}

/// Found by the `dns` fuzz target: a question for the root name with an unknown type and
/// class, over TCP, with bytes after the message.
#[tokio::test]
async fn a_question_of_unknown_type_and_class_gets_a_reply_that_decodes() {
    let packet = [
        0x01, 0x00, 0x05, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x00,
        0x10, 0xea, 0xcb, 0xdc, 0x0a, 0x20, 0x00, 0x00, 0x00,
    ];
    let mut settings = settings();
    settings
        .names
        .push("bedrock-runtime-fips.us-east-1.amazonaws.com".to_string());
    settings.answer_v6 = vec!["fd00::10".parse().expect("an IPv6 address")];
    let answerer = Answerer::new(&settings, Metrics::new()).expect("settings load");
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let reply = answer(&answerer, &packet, protocol).await;
        let reply =
            Message::from_vec(&reply).unwrap_or_else(|e| panic!("{protocol:?}: {e}: {reply:02x?}"));
        assert_eq!(reply.id(), 0x0100);
    }
}

/// Answers are held to 512 bytes without EDNS; a FORMERR for several questions echoes the
/// question section as received, so it is never larger than the query (no amplification).
#[tokio::test]
async fn udp_formerr_for_an_oversize_query_is_no_larger_than_the_query() {
    let query = oversize_query(0x4321);
    assert!(query.len() > 512);

    let reply = answer(&answerer(), &query, Protocol::Udp).await;

    assert!(
        reply.len() <= query.len(),
        "{} bytes for a {}-byte query",
        reply.len(),
        query.len()
    );
    let reply = decoded(&reply);
    assert_eq!(reply.id(), 0x4321);
    assert_eq!(reply.response_code(), ResponseCode::FormErr);
}

/// A question name may legally be a compression pointer, but one that points into the
/// query's 12-byte header names bytes that the reply's header replaces: echoing the question
/// verbatim (as hickory-server does) made a reply that does not decode, or decodes to another
/// name. Found by the `dns` fuzz target.
#[tokio::test]
async fn a_question_name_pointing_into_the_header_is_echoed_as_the_name_it_named() {
    // Byte 3 of the query header is 0 (no flags, RCODE 0), so the pointer 0xC003 names the
    // root. In a REFUSED reply that byte is 5, which would read as a five-byte label.
    let mut query = vec![
        0x43, 0x21, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    query.extend_from_slice(&[0xC0, 0x03, 0x00, 0x01, 0x00, 0x01]);
    let parsed = Message::from_vec(&query).expect("the query itself decodes");
    assert_eq!(parsed.queries()[0].name(), &Name::root());

    for protocol in [Protocol::Udp, Protocol::Tcp] {
        let reply = decoded(&answer(&answerer(), &query, protocol).await);

        assert_eq!(reply.id(), 0x4321);
        assert_eq!(reply.response_code(), ResponseCode::Refused);
        let names: Vec<&Name> = reply.queries().iter().map(|q| q.name()).collect();
        assert_eq!(names, vec![&Name::root()], "{protocol:?}");
        assert_eq!(reply.queries()[0].query_type(), RecordType::A);
    }
}
