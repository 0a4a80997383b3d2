//! Numbers in `agent.toml` that would stall, panic or never apply are refused by validation
//! (and so by `--check`), each naming the field and the fix.

mod fixture;

use fixture::*;
use xpart_agent::AgentConfig;
use xpart_daemon::config::Diagnostics;

fn check(
    scratch: &Scratch,
    front: &str,
    principal: &str,
    tail: &str,
) -> Result<AgentConfig, Diagnostics> {
    let extra = format!("{}{}{tail}", token_principal(principal), idle_relay());
    let toml =
        agent_toml(scratch, &[], &extra).replacen("[front]\n", &format!("[front]\n{front}"), 1);
    AgentConfig::from_toml_str(&toml, &scratch.path("agent.toml"))
}

/// `check` with only `[front]` lines added.
fn check_front(scratch: &Scratch, front: &str) -> Result<AgentConfig, Diagnostics> {
    check(scratch, front, "", "")
}

#[test]
fn a_rate_too_small_for_a_duration_is_refused() {
    let scratch = Scratch::new("rate-tiny");
    for rate in ["1e-25", "0.0", "-1.0", "nan", "inf", "1e7"] {
        let error =
            check(&scratch, "", &format!("requests_per_second = {rate}"), "").expect_err(rate);
        let p = problem(&error, "[[principal]] #1 (lambda).requests_per_second");
        assert!(
            p.message.contains("0.001..=1000000"),
            "{rate}: {}",
            p.message
        );
        assert!(p.fix.contains("leave it out"), "{}", p.fix);
    }
    for rate in ["0.001", "1", "1000000"] {
        check(&scratch, "", &format!("requests_per_second = {rate}"), "")
            .unwrap_or_else(|e| panic!("{rate} is a usable rate: {e}"));
    }
}

#[test]
fn front_timeouts_and_caps_outside_their_range_are_refused() {
    let scratch = Scratch::new("front-bounds");
    let knobs = "handshake_timeout_secs = 0\nfirst_request_timeout_secs = 9223372036854775807\nidle_timeout_secs = 0\nmax_connections = 0\nmax_connections_per_source = 5\n";
    let error = check_front(&scratch, knobs).expect_err("every knob is out of range");
    for field in [
        "[front].handshake_timeout_secs",
        "[front].first_request_timeout_secs",
        "[front].idle_timeout_secs",
        "[front].max_connections",
        "[front].max_connections_per_source",
    ] {
        let p = problem(&error, field);
        assert!(
            p.message.contains("is outside 1..="),
            "{field}: {}",
            p.message
        );
        assert!(!p.fix.is_empty());
    }

    let caps = "max_connections = 10\nmax_connections_per_source = 11\n";
    let error = check_front(&scratch, caps).expect_err("more per source than in total");
    assert!(problem(&error, "[front].max_connections_per_source")
        .message
        .contains("[front].max_connections"));
}

#[test]
fn front_defaults_are_documented_values() {
    let scratch = Scratch::new("front-defaults");
    let config = check_front(&scratch, "").expect("valid");
    let settings = config.front_settings();
    assert_eq!(settings, xpart_agent::FrontSettings::default());
    assert_eq!(settings.handshake_timeout.as_secs(), 10);
    assert_eq!(settings.first_request_timeout.as_secs(), 30);
    assert_eq!(settings.idle_timeout.as_secs(), 120);
    assert_eq!(settings.max_connections, 10_000);
    assert_eq!(settings.max_connections_per_source, 1_000);
}

#[test]
fn health_durations_beyond_any_use_are_refused() {
    let scratch = Scratch::new("health-bounds");
    let health = "\n[health]\ninterval_ms = 9223372036854775807\nhandshake_max_age_secs = 9223372036854775807\n";
    let error = check(&scratch, "", "", health).expect_err("absurd health durations");
    problem(&error, "[health].interval_ms");
    problem(&error, "[health].handshake_max_age_secs");
}

#[test]
fn token_budgets_of_zero_are_refused_and_others_apply_to_their_principal() {
    let scratch = Scratch::new("token-budgets");
    let zero = "tokens_per_minute = 0\ntokens_per_day = 0";
    let error = check(&scratch, "", zero, "").expect_err("a budget of 0 refuses everything");
    for field in ["tokens_per_minute", "tokens_per_day"] {
        let p = problem(&error, &format!("[[principal]] #1 (lambda).{field}"));
        assert!(
            p.message.contains("0 refuses every request"),
            "{}",
            p.message
        );
        assert!(p.fix.contains("leave it out"), "{}", p.fix);
    }
    let config = check(
        &scratch,
        "",
        "tokens_per_minute = 500\ntokens_per_day = 90000",
        "",
    )
    .unwrap_or_else(|e| panic!("usable budgets: {e}"));
    let lambda = config
        .principals()
        .into_iter()
        .find(|p| p.name == "lambda")
        .expect("the principal");
    assert_eq!(lambda.budget.tokens_per_minute, Some(500));
    assert_eq!(lambda.budget.tokens_per_day, Some(90000));
    let error = check(&scratch, "", "tokens_per_day = -1", "").expect_err("not a count");
    assert!(error.to_string().contains("tokens_per_day"), "{error}");
}
