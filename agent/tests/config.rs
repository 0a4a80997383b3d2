//! Configuration checks: the example file is valid apart from the files it names, and bad
//! values are all reported at once, each with its field and a fix.

use xpart_agent::config::AgentConfig;
use xpart_daemon::config::Diagnostics;

fn example() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/agent.example.toml");
    std::fs::read_to_string(path).expect("config/agent.example.toml")
}

fn fields(diagnostics: &Diagnostics) -> Vec<String> {
    diagnostics
        .problems()
        .iter()
        .map(|p| p.field.clone())
        .collect()
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
    let text = r#"
[tunnel]
mode = "host"

[[relay]]
name = "a"
tunnel_address = "127.0.0.1"

[[relay]]
name = "a"
public_key = "not base64!"
tunnel_address = "127.0.0.2"

[dns]
listen = "127.0.0.1:0"
answer = "0.0.0.0"
names = []

[front]
listen = "127.0.0.1:0"
cert_file = "/nonexistent/cert.pem"
key_file = "/nonexistent/key.pem"

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
"#;
    let error = AgentConfig::from_toml_str(text, "agent.toml").expect_err("invalid");
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
    let text = r#"
[tunnel]
mode = "userspace"

[[relay]]
name = "a"
tunnel_address = "100.64.0.2"

[front]
listen = "127.0.0.1:0"
cert_file = "/nonexistent/cert.pem"
key_file = "/nonexistent/key.pem"

[[principal]]
name = "p"
source_cidrs = ["10.0.0.0/8"]
models = ["*"]
"#;
    let error = AgentConfig::from_toml_str(text, "agent.toml").expect_err("invalid");
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
