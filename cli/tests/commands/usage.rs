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
