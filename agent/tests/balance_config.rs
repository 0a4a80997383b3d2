//! The config of balancing and fast relay loss: `[[relay]]` priority and weight, the
//! `[health]` PING settings, and `[dns] answer` as one address or a list (every address in
//! one answer).

mod fixture;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use fixture::*;
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::xfer::Protocol;
use xpart_agent::{AgentConfig, Answerer, Metrics};
use xpart_daemon::config::Diagnostics;

/// Three zones' addresses, and two IPv6 ones.
const MANY: &str =
    "[\"10.0.1.10\", \"10.0.2.10\", \"10.0.3.10\"]\nanswer_v6 = [\"fd00::10\", \"fd00::20\"]\n";

#[test]
fn relays_share_one_group_unless_priority_says_otherwise() {
    let scratch = Scratch::new("config-shares");
    let loaded = load(&scratch, &relay_fields("")).expect("loads");
    assert_eq!(loaded.relays[0].priority, None);
    assert_eq!(loaded.relays[0].weight, None);

    let loaded = load(&scratch, &relay_fields("priority = 2\nweight = 5\n")).expect("loads");
    assert_eq!(loaded.relays[0].priority, Some(2));
    assert_eq!(loaded.relays[0].weight, Some(5));
}

#[test]
fn a_relay_weight_outside_its_range_is_refused_with_its_field() {
    let scratch = Scratch::new("config-weight");
    for weight in ["0", "1001"] {
        let error =
            load(&scratch, &relay_fields(&format!("weight = {weight}\n"))).expect_err("refused");
        assert_eq!(fields(&error), ["[[relay]] #1 (relay-a).weight"], "{error}");
        assert!(error.to_string().contains("1..=1000"), "{error}");
    }
    let error = load(&scratch, &relay_fields("priority = -1\n")).expect_err("refused");
    assert!(error.to_string().contains("priority"), "{error}");
}

#[test]
fn health_settings_have_their_defaults_and_refuse_zero() {
    let scratch = Scratch::new("config-ping");
    let text = relay_fields("");
    let loaded = load(&scratch, &text).expect("loads");
    // Sub-second probes mark a silent relay suspect; the PING deadline, which ends requests in
    // flight, leaves room for retransmissions on a lossy link.
    assert_eq!(loaded.health.interval_ms, 250);
    assert_eq!(loaded.health.probe_timeout_ms, 500);
    assert_eq!(loaded.health.fail_after, 4);
    assert_eq!(loaded.health.ping_interval_ms, 1000);
    assert_eq!(loaded.health.ping_timeout_ms, 2000);
    assert_eq!(loaded.health.connect_timeout_ms, 1000);

    let error = load(
        &scratch,
        &format!("{text}\n[health]\nping_interval_ms = 0\nping_timeout_ms = 3600001\n"),
    )
    .expect_err("refused");
    assert_eq!(
        fields(&error),
        ["[health]", "[health].ping_timeout_ms"],
        "{error}"
    );
}

#[test]
fn a_dns_answer_is_one_address_or_a_list() {
    let scratch = Scratch::new("config-answers");
    let one = load(&scratch, &relay_fields("")).expect("a single address still loads");
    let settings = one.dns_settings().expect("a [dns] section");
    assert_eq!(settings.answer_v4, [Ipv4Addr::LOCALHOST]);
    assert!(settings.answer_v6.is_empty());

    let many = load_with_answer(&scratch, &relay_fields(""), MANY).expect("a list loads");
    let settings = many.dns_settings().expect("a [dns] section");
    assert_eq!(
        settings.answer_v4,
        ["10.0.1.10", "10.0.2.10", "10.0.3.10"].map(|a| a.parse::<Ipv4Addr>().expect("v4"))
    );
    assert_eq!(
        settings.answer_v6,
        ["fd00::10", "fd00::20"].map(|a| a.parse::<Ipv6Addr>().expect("v6"))
    );
}

#[test]
fn bad_dns_answers_are_refused_with_their_field() {
    let scratch = Scratch::new("config-bad-answers");
    let refuse = |answer: &str| {
        load_with_answer(&scratch, &relay_fields(""), &format!("{answer}\n")).expect_err("refused")
    };
    let error = refuse("[]");
    assert_eq!(fields(&error), ["[dns].answer"], "{error}");

    let error = refuse("[\"10.0.1.10\", \"0.0.0.0\"]");
    assert_eq!(fields(&error), ["[dns].answer"], "{error}");
    assert!(
        error.to_string().contains("0.0.0.0 cannot be an answer"),
        "{error}"
    );

    let error = refuse("[\"10.0.1.10\", \"not-an-ip\"]");
    assert!(error.to_string().contains("answer"), "{error}");

    let seventeen: Vec<String> = (1..=17).map(|i| format!("\"10.0.{i}.10\"")).collect();
    let error = refuse(&format!("[{}]", seventeen.join(", ")));
    assert_eq!(fields(&error), ["[dns].answer"], "{error}");
}

/// One answer carries every address, for A, AAAA and ANY, in the configured order.
#[tokio::test]
async fn every_answer_address_is_in_one_answer() {
    let scratch = Scratch::new("config-answer-records");
    let settings = load_with_answer(&scratch, &relay_fields(""), MANY)
        .expect("loads")
        .dns_settings()
        .expect("a [dns] section");
    let answerer = Answerer::new(&settings, Metrics::new()).expect("answerer");
    let caller = SocketAddr::from((Ipv4Addr::new(10, 0, 16, 5), 40000));

    let a = ask(&answerer, RecordType::A, caller).await;
    let expected_v4: Vec<RData> = ["10.0.1.10", "10.0.2.10", "10.0.3.10"]
        .iter()
        .map(|ip| RData::A(A(ip.parse().expect("v4"))))
        .collect();
    assert_eq!(a, expected_v4);

    let aaaa = ask(&answerer, RecordType::AAAA, caller).await;
    let expected_v6: Vec<RData> = ["fd00::10", "fd00::20"]
        .iter()
        .map(|ip| RData::AAAA(AAAA(ip.parse().expect("v6"))))
        .collect();
    assert_eq!(aaaa, expected_v6);

    let any = ask(&answerer, RecordType::ANY, caller).await;
    assert_eq!(any, [expected_v4, expected_v6].concat());
}

async fn ask(answerer: &Answerer, record_type: RecordType, caller: SocketAddr) -> Vec<RData> {
    let mut message = Message::new();
    message
        .set_id(7)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .add_query(Query::query(
            Name::from_ascii(format!("{BEDROCK_NAME}.")).expect("ascii"),
            record_type,
        ));
    let query = message.to_vec().expect("encode");
    let reply = answerer
        .answer_packet(&query, caller, Protocol::Tcp)
        .await
        .expect("a reply");
    let reply = Message::from_vec(&reply).expect("the reply decodes");
    reply.answers().iter().map(|r| r.data().clone()).collect()
}

/// A valid agent config whose one relay has `fields` added.
fn relay_fields(fields: &str) -> String {
    format!("{}{fields}{}", idle_relay(), token_principal(""))
}

fn load(scratch: &Scratch, extra: &str) -> Result<AgentConfig, Diagnostics> {
    load_with_answer(scratch, extra, "\"127.0.0.1\"\n")
}

/// Like [`load`], with `answer` (and what follows on its line) for `[dns] answer`.
fn load_with_answer(
    scratch: &Scratch,
    extra: &str,
    answer: &str,
) -> Result<AgentConfig, Diagnostics> {
    let text = agent_toml(scratch, &[], extra);
    let line = "answer = \"127.0.0.1\"\n";
    assert!(text.contains(line), "the fixture's [dns] answer changed");
    AgentConfig::from_toml_str(
        &text.replace(line, &format!("answer = {answer}")),
        &scratch.path("agent.toml"),
    )
}
