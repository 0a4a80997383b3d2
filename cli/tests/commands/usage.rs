use crate::support::xpart;

#[test]
fn help_teaches_with_examples_and_documents_exit_codes() {
    let help = xpart(&["--help"]).ok().stdout;
    assert!(help.contains("Exit codes:"), "{help}");
    assert!(help.contains("3  AWS error"), "{help}");
    for command in [
        "keygen",
        "pubkey",
        "ca",
        "token",
        "config",
        "wg-config",
        "status",
        "probe",
        "failover",
        "drill",
        "usage",
        "completions",
    ] {
        assert!(help.contains(command), "{command} missing from --help");
    }
    let failover = xpart(&["failover", "route", "--help"]).ok().stdout;
    assert!(failover.contains("Examples:"), "{failover}");
    assert!(failover.contains("--dry-run"), "{failover}");
    assert!(failover.contains("--endpoint-url"), "{failover}");
}

#[test]
fn completions_are_generated_for_each_shell() {
    let bash = xpart(&["completions", "bash"]).ok().stdout;
    assert!(bash.contains("_xpart()"), "{bash}");
    assert!(bash.contains("source-dest-check"));
    let zsh = xpart(&["completions", "zsh"]).ok().stdout;
    assert!(zsh.starts_with("#compdef xpart"), "{zsh}");
    xpart(&["completions", "fish"]).ok();
    xpart(&["completions", "tcsh"]).fails_with(2);
}

#[test]
fn usage_errors_exit_2() {
    xpart(&[]).fails_with(2);
    xpart(&["no-such-command"]).fails_with(2);
    xpart(&["probe", "--timeout", "soon"]).fails_with(2);
    let no_bundle = xpart(&["probe", "--connect", "127.0.0.1:9"]).fails_with(2);
    assert!(
        no_bundle.stderr.contains("--ca-bundle"),
        "{}",
        no_bundle.stderr
    );
    let http = xpart(&[
        "probe",
        "--endpoint",
        "http://x",
        "--ca-bundle",
        "/dev/null",
    ])
    .fails_with(2);
    assert!(http.stderr.contains("https://"), "{}", http.stderr);
}

#[test]
fn json_errors_are_json_too() {
    let run = xpart(&["--json", "token", "new", "--principal", "bad name"]).fails_with(2);
    let report = run.json();
    assert_eq!(report["exit_code"], 2);
    assert!(report["error"].as_str().unwrap().contains("principal name"));
}

#[test]
fn watch_needs_something_to_watch_and_something_to_move() {
    let nothing_to_move = xpart(&["failover", "watch", "--readyz", "127.0.0.1:9100"]).fails_with(2);
    assert!(
        nothing_to_move.stderr.contains("nothing to move"),
        "{}",
        nothing_to_move.stderr
    );
    let nothing_to_watch = xpart(&["failover", "watch", "--cidr", "100.64.0.0/30"]).fails_with(2);
    assert!(
        nothing_to_watch.stderr.contains("nothing to watch"),
        "{}",
        nothing_to_watch.stderr
    );
    let bad_url = xpart(&[
        "failover",
        "watch",
        "--cidr",
        "100.64.0.0/30",
        "--readyz",
        "https://x:1",
    ])
    .fails_with(2);
    assert!(bad_url.stderr.contains("http://"), "{}", bad_url.stderr);
    xpart(&[
        "failover",
        "watch",
        "--cidr",
        "100.64.0.0/30",
        "--readyz",
        "127.0.0.1:1",
        "--interval",
        "often",
    ])
    .fails_with(2);
}

#[test]
fn failover_arguments_that_conflict_are_refused() {
    xpart(&[
        "failover",
        "route",
        "--cidr",
        "10.0.0.0/8",
        "--to-eni",
        "eni-1",
        "--to-instance",
        "i-1",
    ])
    .fails_with(2);
    xpart(&[
        "failover",
        "route",
        "--cidr",
        "10.0.0.0/8",
        "--route-table",
        "rtb-1",
        "--route-table-tag",
        "a=b",
        "--pair",
        "p",
    ])
    .fails_with(2);
    let tag = xpart(&[
        "failover",
        "route",
        "--cidr",
        "10.0.0.0/8",
        "--route-table-tag",
        "novalue",
        "--pair",
        "p",
    ])
    .fails_with(2);
    assert!(tag.stderr.contains("KEY=VALUE"), "{}", tag.stderr);
    let eip = xpart(&["failover", "eip", "--pair", "p"]).fails_with(2);
    assert!(eip.stderr.contains("--allocation-id"), "{}", eip.stderr);
}
