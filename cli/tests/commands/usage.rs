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
    xpart(&["probe", "--connect", "127.0.0.1:9"])
        .fails_with(2)
        .complains("--ca-bundle");
    xpart(&[
        "probe",
        "--endpoint",
        "http://x",
        "--ca-bundle",
        "/dev/null",
    ])
    .fails_with(2)
    .complains("https://");
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
    let watch = ["failover", "watch"];
    let cidr = ["--cidr", "100.64.0.0/30"];
    refused(
        &[&watch, &["--readyz", "127.0.0.1:9100"]],
        "nothing to move",
    );
    refused(&[&watch, &cidr], "nothing to watch");
    refused(&[&watch, &cidr, &["--readyz", "https://x:1"]], "http://");
    let often = ["--readyz", "127.0.0.1:1", "--interval", "often"];
    refused(&[&watch, &cidr, &often], "--interval");
}

#[test]
fn failover_arguments_that_conflict_are_refused() {
    let route = ["failover", "route", "--cidr", "10.0.0.0/8"];
    let pair = ["--pair", "p"];
    refused(
        &[&route, &["--to-eni", "eni-1", "--to-instance", "i-1"]],
        "cannot be used with",
    );
    let both = ["--route-table", "rtb-1", "--route-table-tag", "a=b"];
    refused(&[&route, &both, &pair], "cannot be used with");
    refused(
        &[&route, &["--route-table-tag", "novalue"], &pair],
        "KEY=VALUE",
    );
    refused(&[&["failover", "eip"], &pair], "--allocation-id");
}

/// Runs `xpart` with the argument groups joined; it must exit 2 and say `complaint`.
#[track_caller]
fn refused(args: &[&[&str]], complaint: &str) {
    xpart(&args.concat()).fails_with(2).complains(complaint);
}
