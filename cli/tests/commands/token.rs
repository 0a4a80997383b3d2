use sha2::{Digest, Sha256};

use crate::support::{xpart, xpart_with_stdin};

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn new_token_prints_the_token_once_and_a_snippet_with_its_hash() {
    let run = xpart(&[
        "token",
        "new",
        "--principal",
        "summarizer-lambda",
        "--model",
        "anthropic.claude-*",
        "--source-cidr",
        "10.0.16.0/20",
        "--rps",
        "20",
        "--max-concurrent",
        "4",
    ])
    .ok();
    let token = run
        .stdout
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("xpt_"))
        .expect("token line")
        .to_string();
    assert_eq!(
        run.stdout.matches(&token).count(),
        1,
        "the token appears once"
    );

    let snippet_start = run.stdout.find("[[principal]]").expect("snippet");
    let snippet: toml::Table = run.stdout[snippet_start..]
        .parse()
        .expect("snippet is TOML");
    let principal = &snippet["principal"].as_array().unwrap()[0];
    assert_eq!(principal["name"].as_str(), Some("summarizer-lambda"));
    assert_eq!(
        principal["token_sha256"].as_str(),
        Some(sha256_hex(&token).as_str())
    );
    assert_eq!(
        principal["models"].as_array().unwrap()[0].as_str(),
        Some("anthropic.claude-*")
    );
    assert_eq!(
        principal["source_cidrs"].as_array().unwrap()[0].as_str(),
        Some("10.0.16.0/20")
    );
    assert_eq!(principal["requests_per_second"].as_float(), Some(20.0));
    assert_eq!(principal["max_concurrent"].as_integer(), Some(4));
}

#[test]
fn new_token_json_and_hash_agree() {
    let run = xpart(&["--json", "token", "new", "--principal", "batch"]).ok();
    let report = run.json();
    let token = report["token"].as_str().unwrap();
    let hash = report["token_sha256"].as_str().unwrap();
    assert_eq!(hash, sha256_hex(token));
    assert!(report["snippet"].as_str().unwrap().contains(hash));

    let from_arg = xpart(&["token", "hash", token]).ok().stdout;
    assert_eq!(from_arg.trim(), hash);
    let from_stdin = xpart_with_stdin(&["token", "hash"], &format!("{token}\n"))
        .ok()
        .stdout;
    assert_eq!(from_stdin.trim(), hash);
}

#[test]
fn tokens_differ_between_runs() {
    let first = xpart(&["--json", "token", "new", "--principal", "a"])
        .ok()
        .json();
    let second = xpart(&["--json", "token", "new", "--principal", "a"])
        .ok()
        .json();
    assert_ne!(first["token"], second["token"]);
}

#[test]
fn bad_principal_names_and_empty_tokens_are_refused() {
    let quote = xpart(&["token", "new", "--principal", "a\"b"]).fails_with(2);
    quote.complains("principal name");
    assert!(quote.stdout.is_empty(), "no token is printed on error");
    xpart(&["token", "new", "--principal", ""]).fails_with(2);
    xpart(&["token", "new"]).fails_with(2);
    xpart(&[
        "token",
        "new",
        "--principal",
        "x",
        "--source-cidr",
        "not-a-cidr",
    ])
    .fails_with(2);
    let empty = xpart_with_stdin(&["token", "hash"], "\n").fails_with(2);
    empty.complains("empty token");
}
