use crate::configs::relay_toml;
use crate::support::{xpart, Run, Scratch};

/// Keys, certificate and a token hash made with xpart itself, next to the config files.
fn material(dir: &Scratch) -> (String, String) {
    xpart(&["keygen", "--out", &dir.arg("agent.key")]).ok();
    let relay_public = xpart(&["keygen", "--out", &dir.arg("relay.key")])
        .ok()
        .stdout;
    let agent_public = xpart(&["pubkey", "--key-file", &dir.arg("agent.key")])
        .ok()
        .stdout;
    xpart(&["ca", "init", "--dir", &dir.arg("ca")]).ok();
    let (ca, front) = (dir.arg("ca"), dir.arg("front"));
    let names = ["--region", "us-east-1", "--ip", "127.0.0.1"];
    xpart(
        &[
            &["ca", "issue", "--ca-dir", &ca, "--out", &front],
            &names[..],
        ]
        .concat(),
    )
    .ok();
    (
        agent_public.trim().to_string(),
        relay_public.trim().to_string(),
    )
}

fn valid_agent(relay_public: &str) -> String {
    format!(
        r#"
[tunnel]
private_key_file = "agent.key"
address = "100.64.0.1/30"
mode = "userspace"

[[relay]]
name = "relay-a"
public_key = "{relay_public}"
endpoint = "127.0.0.1:51820"
tunnel_address = "100.64.0.2"

[front]
listen = "127.0.0.1:8443"
cert_file = "front.pem"
key_file = "front.key"

[[principal]]
name = "tests"
token_sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
models = ["*"]
"#
    )
}

fn valid_relay(agent_public: &str) -> String {
    relay_toml("userspace", "relay.key", agent_public)
        + r#"
[policy]
operations = ["Converse", "ConverseStream"]
models = ["*"]

[upstream]
region = "us-east-1"
endpoint = "https://bedrock-runtime.us-east-1.amazonaws.com"
"#
}

/// `xpart config check` with `args`.
fn check(args: &[&str]) -> Run {
    xpart(&[&["config", "check"], args].concat())
}

/// `xpart --json config check` with `args`.
/// Writes a valid agent.toml with `extra` appended into `dir` and checks it; it must pass.
fn check_agent_with(dir: &Scratch, extra: &str) -> Run {
    let (_, relay_public) = material(dir);
    dir.write("agent.toml", &(valid_agent(&relay_public) + extra));
    check(&[&dir.arg("agent.toml")]).ok()
}

fn check_json(args: &[&str]) -> Run {
    xpart(&[&["--json", "config", "check"], args].concat())
}

#[test]
fn valid_agent_and_relay_files_pass() {
    let dir = Scratch::new();
    let (agent_public, relay_public) = material(&dir);
    dir.write("agent.toml", &valid_agent(&relay_public));
    dir.write("relay.toml", &valid_relay(&agent_public));
    let run = check(&[&dir.arg("agent.toml"), &dir.arg("relay.toml")]).ok();
    run.says("agent.toml: ok (agent configuration)");
    run.says("relay.toml: ok (relay configuration)");
}

#[test]
fn every_problem_in_a_broken_agent_file_is_reported_at_once() {
    let dir = Scratch::new();
    let (_, relay_public) = material(&dir);
    let broken = valid_agent(&relay_public)
        .replace(&relay_public, "not-a-key")
        .replace("cert_file = \"front.pem\"", "cert_file = \"missing.pem\"")
        .replace("mode = \"userspace\"", "mode = \"userspace\"\nmtu = 500");
    dir.write("agent.toml", &broken);
    let run = check(&[&dir.arg("agent.toml")]).fails_with(1);
    let out = &run.stdout;
    assert!(out.contains("[tunnel].mtu"), "{out}");
    assert!(out.contains("public_key"), "{out}");
    assert!(out.contains("[front].cert_file"), "{out}");
    assert!(out.contains("3 problem(s)"), "{out}");
    for line in out.lines().skip(1) {
        assert!(
            line.contains("agent.toml"),
            "each problem names the file: {line}"
        );
        assert!(
            line.contains("fix:"),
            "each problem says how to fix it: {line}"
        );
    }
}

#[test]
fn json_report_lists_problems_per_file_with_fields_and_fixes() {
    let dir = Scratch::new();
    let (agent_public, relay_public) = material(&dir);
    dir.write("agent.toml", &valid_agent(&relay_public));
    let broken_relay = valid_relay(&agent_public)
        .replace(
            "\"Converse\", \"ConverseStream\"",
            "\"Converse\", \"DeleteEverything\"",
        )
        .replace(
            "listen = \"100.64.0.2:8080\"",
            "listen = \"100.64.0.9:8080\"",
        );
    dir.write("relay.toml", &broken_relay);
    let run = check_json(&[&dir.arg("agent.toml"), &dir.arg("relay.toml")]).fails_with(1);
    let report = run.json();
    let files = report["files"].as_array().unwrap();
    assert_eq!(files[0]["ok"], true);
    assert_eq!(files[0]["kind"], "agent");
    assert_eq!(files[1]["ok"], false);
    assert_eq!(files[1]["kind"], "relay");
    let problems = files[1]["problems"].as_array().unwrap();
    assert!(problems.len() >= 2, "{problems:?}");
    let fields: Vec<&str> = problems
        .iter()
        .map(|p| p["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.iter().any(|f| f.starts_with("[policy].operations")),
        "{fields:?}"
    );
    assert!(fields.contains(&"[service].listen"), "{fields:?}");
    assert!(problems
        .iter()
        .all(|p| !p["fix"].as_str().unwrap().is_empty()));
    assert_eq!(report["problems"].as_u64(), Some(problems.len() as u64));
}

#[test]
fn syntax_errors_point_at_the_line() {
    let dir = Scratch::new();
    dir.write(
        "agent.toml",
        "[tunnel]\naddress = \"100.64.0.1/30\"\n[front\nlisten = 1\n",
    );
    let run = check_json(&["--kind", "agent", &dir.arg("agent.toml")]).fails_with(1);
    let problem = &run.json()["files"][0]["problems"][0];
    assert_eq!(problem["line"], 3, "{problem}");
}

#[test]
fn missing_and_unrecognisable_files_are_problems_too() {
    let dir = Scratch::new();
    dir.write("mystery.toml", "[tunnel]\nmode = \"userspace\"\n");
    let run = check(&[&dir.arg("absent.toml"), &dir.arg("mystery.toml")]).fails_with(1);
    run.says("absent.toml: no such file");
    run.says("--kind agent or --kind relay");
    check(&[]).fails_with(2);
}

#[test]
fn an_old_duration_name_passes_with_a_warning_naming_old_and_new() {
    let dir = Scratch::new();
    let run = check_agent_with(&dir, "\n[health]\nhandshake_max_age_s = 90\n");
    run.says("agent.toml: ok (agent configuration)");
    run.says("warning: ");
    run.says("[health].handshake_max_age_s");
    run.says("rename handshake_max_age_s to handshake_max_age_secs");

    let report = check_json(&[&dir.arg("agent.toml")]).ok().json();
    let file = &report["files"][0];
    assert_eq!(file["ok"], true);
    assert_eq!(
        file["warnings"][0]["field"], "[health].handshake_max_age_s",
        "{file}"
    );
    assert_eq!(report["problems"].as_u64(), Some(0));
}

#[test]
fn the_new_duration_name_passes_without_a_warning() {
    let dir = Scratch::new();
    let run = check_agent_with(&dir, "\n[health]\nhandshake_max_age_secs = 90\n");

    assert!(!run.stdout.contains("warning"), "{}", run.stdout);
}
