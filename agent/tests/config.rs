//! Configuration checks: the example file is valid apart from the files it names, and bad
//! values are all reported at once, each with its field and a fix.

mod fixture;

use fixture::fields;
use xpart_agent::AgentConfig;
use xpart_daemon::config::Diagnostics;

fn example() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/agent.example.toml");
    std::fs::read_to_string(path).expect("config/agent.example.toml")
}

#[test]
fn example_config_is_complete_apart_from_its_files() {
    let error = AgentConfig::from_toml_str(&example(), "agent.example.toml")
        .expect_err("the example names files that do not exist here");
    // Every field name and value parses; only the key and certificate files are missing.
    assert_eq!(
        fields(&error),
        ["[tunnel].private_key_file", "[front].cert_file"],
        "{error}"
    );
    let text = error.to_string();
    assert!(
        text.contains("agent.example.toml: [tunnel].private_key_file"),
        "{text}"
    );
    assert!(text.contains("xpart keygen"), "{text}");
    assert!(text.contains("xpart ca issue"), "{text}");
}

#[test]
fn every_bad_value_is_reported_together() {
    let text = format!(
        r#"{FRONT_AND_RELAY}
[[relay]]
name = "a"
public_key = "not base64!"
tunnel_address = "127.0.0.2"

[dns]
listen = "127.0.0.1:0"
answer = "0.0.0.0"
names = []

[[principal]]
name = "p"
token_sha256 = "the-token-itself"
models = []
requests_per_second = -1
max_concurrent = 0
max_body_bytes = 30000000

[[principal]]
name = "nobody"
models = ["*"]
"#
    );
    let error = AgentConfig::from_toml_str(&text, "agent.toml").expect_err("invalid");
    assert_reported(
        &error,
        &[
            "[[relay]] #2 (a).name",
            "[[relay]] #2 (a).public_key",
            "[dns].names",
            "[dns].answer",
            "[front].cert_file",
            "[[principal]] #1 (p).token_sha256",
            "[[principal]] #1 (p).models",
            "[[principal]] #1 (p).requests_per_second",
            "[[principal]] #1 (p).max_concurrent",
            "[[principal]] #1 (p).max_body_bytes",
            "[[principal]] #2 (nobody).token_sha256",
        ],
    );
    assert!(error.to_string().contains("never the token itself"));
}

#[test]
fn unknown_fields_and_wrong_types_name_the_line() {
    let text = example().replace("mtu = 1420", "mtu = \"big\"");
    let error = AgentConfig::from_toml_str(&text, "agent.toml").expect_err("invalid");
    let text = error.to_string();
    assert!(text.contains("agent.toml:"), "{text}");
    assert!(text.contains("[tunnel].mtu: wrong type"), "{text}");

    let text = example().replace("mtu = 1420", "colour = 3");
    let error = AgentConfig::from_toml_str(&text, "agent.toml").expect_err("invalid");
    let text = error.to_string();
    assert!(text.contains("colour"), "{text}");
}

#[test]
fn wireguard_modes_need_keys_and_endpoints() {
    let text = FRONT_AND_RELAY.replace(r#"mode = "host""#, r#"mode = "userspace""#)
        + r#"
[[principal]]
name = "p"
source_cidrs = ["10.0.0.0/8"]
models = ["*"]
"#;
    let error = AgentConfig::from_toml_str(&text, "agent.toml").expect_err("invalid");
    assert_reported(
        &error,
        &[
            "[tunnel].private_key_file",
            "[tunnel].address",
            "[[relay]] #1 (a).public_key",
            "[[relay]] #1 (a).endpoint",
        ],
    );
}

/// Each of `expected` is among the fields `error` reports, whatever else it reports.
fn assert_reported(error: &Diagnostics, expected: &[&str]) {
    let fields = fields(error);
    for field in expected {
        assert!(
            fields.contains(&field.to_string()),
            "missing {field} in {error}"
        );
    }
}

const FRONT_AND_RELAY: &str = r#"
[tunnel]
mode = "host"

[[relay]]
name = "a"
tunnel_address = "127.0.0.1"

[front]
listen = "127.0.0.1:0"
cert_file = "/nonexistent/cert.pem"
key_file = "/nonexistent/key.pem"
"#;

#[test]
fn operations_are_names_of_bedrock_operations() {
    let text = [
        FRONT_AND_RELAY.to_string(),
        principal(
            "typo",
            "10.0.0.0/8",
            r#"models = ["*"]
operations = ["Converse", "converse-stream", "DeleteModel"]"#,
        ),
        principal("none", "10.1.0.0/16", "models = [\"*\"]\noperations = []"),
        principal(
            "guardrails-only",
            "10.2.0.0/16",
            r#"operations = ["ApplyGuardrail"]"#,
        ),
        principal(
            "converse-without-models",
            "10.3.0.0/16",
            r#"operations = ["ApplyGuardrail", "Converse"]"#,
        ),
    ]
    .concat();
    let error = AgentConfig::from_toml_str(&text, "agent.toml").expect_err("invalid");
    assert_reported(
        &error,
        &[
            "[[principal]] #1 (typo).operations[1]",
            "[[principal]] #1 (typo).operations[2]",
            "[[principal]] #2 (none).operations",
            "[[principal]] #4 (converse-without-models).models",
        ],
    );
    let fields = fields(&error);
    assert!(
        !fields.iter().any(|f| f.contains("typo).operations[0]")),
        "{error}"
    );
    assert!(
        !fields.iter().any(|f| f.contains("guardrails-only")),
        "an operation without a model needs no models: {error}"
    );
    let text = error.to_string();
    assert!(text.contains("\"DeleteModel\" is not a Bedrock Runtime operation"));
    assert!(
        text.contains("ApplyGuardrail"),
        "the fix lists the names: {text}"
    );
}

#[test]
fn principals_default_to_the_invoke_converse_count_and_discovery_operations() {
    use xpart_bedrock::Operation;
    let listed = r#"models = ["*"]
operations = ["ConverseStream", "ApplyGuardrail"]"#;
    let config = parse(
        &[
            FRONT_AND_RELAY.to_string(),
            principal("default", "10.0.0.0/8", r#"models = ["*"]"#),
            principal("listed", "10.1.0.0/16", listed),
        ]
        .concat(),
    );
    let principals = config.principals();
    let generation = [
        Operation::InvokeModel,
        Operation::InvokeModelWithResponseStream,
        Operation::Converse,
        Operation::ConverseStream,
        Operation::CountTokens,
    ];
    assert_eq!(
        principals[0].operations.iter().copied().collect::<Vec<_>>(),
        [generation.as_slice(), &Operation::DISCOVERY].concat()
    );
    assert_eq!(
        principals[1].operations.iter().copied().collect::<Vec<_>>(),
        [Operation::ConverseStream, Operation::ApplyGuardrail]
    );
}

#[test]
fn dns_regions_answer_every_bedrock_name_of_each_region() {
    let text = |dns: &str| {
        format!(
            "{FRONT_AND_RELAY}\n[dns]\nlisten = \"127.0.0.1:0\"\nanswer = \"127.0.0.1\"\n{dns}\n"
        )
    };
    let config = parse(&text(
        "regions = [\"us-east-1\", \"us-west-2\"]\nnames = [\"bedrock.us-east-1.amazonaws.com\", \"extra.example\"]",
    ));
    let names = config.dns_settings().expect("dns").names;
    assert_eq!(
        names,
        [
            "bedrock.us-east-1.amazonaws.com",
            "extra.example",
            "bedrock-runtime.us-east-1.amazonaws.com",
            "bedrock-runtime-fips.us-east-1.amazonaws.com",
            "bedrock-fips.us-east-1.amazonaws.com",
            "bedrock-runtime.us-west-2.amazonaws.com",
            "bedrock-runtime-fips.us-west-2.amazonaws.com",
            "bedrock.us-west-2.amazonaws.com",
            "bedrock-fips.us-west-2.amazonaws.com",
        ]
    );
    let problems = AgentConfig::from_toml_str(&text("regions = [\"US East\"]"), "agent.toml")
        .expect_err("a bad region is refused")
        .to_string();
    assert!(problems.contains("[dns].regions"), "{problems}");
    let problems = AgentConfig::from_toml_str(&text(""), "agent.toml")
        .expect_err("nothing to answer is refused")
        .to_string();
    assert!(problems.contains("[dns].names"), "{problems}");
}

#[test]
fn dns_forwards_for_the_principals_networks_unless_told_otherwise() {
    let dns = |extra: &str| {
        format!(
            r#"
[dns]
listen = "127.0.0.1:0"
answer = "127.0.0.1"
names = ["bedrock-runtime.us-east-1.amazonaws.com"]
{extra}
"#
        )
    };
    let principals = r#"
[[principal]]
name = "lambdas"
source_cidrs = ["10.0.16.0/20", "10.0.32.0/24"]
models = ["*"]

[[principal]]
name = "token-anywhere"
token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
models = ["*"]

[[principal]]
name = "batch"
source_cidrs = ["10.0.32.0/24", "fd00:ec2::/64"]
models = ["*"]
"#;
    let cidrs = |config: &AgentConfig| {
        let settings = config.dns_settings().expect("a [dns] section");
        settings
            .allow_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
    };
    let union = parse(&format!("{FRONT_AND_RELAY}{}{principals}", dns("")));
    assert_eq!(
        cidrs(&union),
        ["10.0.16.0/20", "10.0.32.0/24", "fd00:ec2::/64"]
    );

    let token_only = r#"
[[principal]]
name = "token-anywhere"
token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
models = ["*"]
"#;
    let loopback = parse(&format!("{FRONT_AND_RELAY}{}{token_only}", dns("")));
    assert_eq!(cidrs(&loopback), ["127.0.0.0/8", "::1/128"]);

    let explicit = parse(&format!(
        "{FRONT_AND_RELAY}{}{principals}",
        dns(r#"allow_cidrs = ["10.9.0.0/16"]"#)
    ));
    assert_eq!(cidrs(&explicit), ["10.9.0.0/16"]);

    let nobody = parse(&format!(
        "{FRONT_AND_RELAY}{}{principals}",
        dns("allow_cidrs = []")
    ));
    assert!(cidrs(&nobody).is_empty());
}

#[test]
fn the_example_names_every_bedrock_endpoint_of_its_region() {
    let example = example();
    for name in [
        "bedrock-runtime.us-east-1.amazonaws.com",
        "bedrock-runtime-fips.us-east-1.amazonaws.com",
        "bedrock.us-east-1.amazonaws.com",
        "bedrock-fips.us-east-1.amazonaws.com",
    ] {
        assert!(example.contains(&format!("\"{name}\"")), "{name}");
    }
}

/// A `[[principal]]` table for callers from `cidr`, with `rest` (TOML lines) added.
fn principal(name: &str, cidr: &str, rest: &str) -> String {
    format!("\n[[principal]]\nname = \"{name}\"\nsource_cidrs = [\"{cidr}\"]\n{rest}\n")
}

/// Parses without the checks that need files (the certificate here does not exist).
fn parse(text: &str) -> AgentConfig {
    xpart_daemon::config::parse_toml(text, "agent.toml").unwrap_or_else(|d| panic!("{d}"))
}
