//! Durations end in `_secs` or `_ms`. A field's old name (`[health] handshake_max_age_s`)
//! still loads, with a warning that names the old and the new field; the new name loads
//! silently; both at once is a problem.

mod fixture;

use std::time::Duration;

use fixture::*;
use xpart_agent::AgentConfig;
use xpart_daemon::config::{Diagnostics, Warned};

fn load(scratch: &Scratch, health: &str) -> Result<AgentConfig, Diagnostics> {
    let extra = format!("{}{}[health]\n{health}", token_principal(""), idle_relay());
    let path = scratch.path("agent.toml");
    if let Err(error) = std::fs::write(&path, agent_toml(scratch, &[], &extra)) {
        panic!("cannot write {path}: {error}");
    }
    AgentConfig::load(&path)
}

/// Loads `health` (which sets the handshake age to 90 s under some name) and checks it applied.
fn load_age_90(test: &str, health: &str) -> AgentConfig {
    let scratch = Scratch::new(test);
    let config = load(&scratch, health).unwrap_or_else(|error| panic!("{health}: {error}"));
    assert_eq!(
        config.health_settings().handshake_max_age,
        Duration::from_secs(90)
    );
    config
}

#[test]
fn the_old_name_loads_with_a_warning_naming_old_and_new() {
    let config = load_age_90("renamed-old", "handshake_max_age_s = 90\n");

    let [warning] = config.warnings() else {
        panic!("one warning expected: {:?}", config.warnings());
    };
    assert_eq!(warning.field, "[health].handshake_max_age_s");
    assert!(
        warning.message.contains("handshake_max_age_secs"),
        "{warning}"
    );
    assert_eq!(
        warning.fix,
        "rename handshake_max_age_s to handshake_max_age_secs"
    );
    assert!(warning.location.is_some(), "{warning}");
}

#[test]
fn the_new_name_loads_without_a_warning() {
    let config = load_age_90("renamed-new", "handshake_max_age_secs = 90\n");

    assert!(config.warnings().is_empty(), "{:?}", config.warnings());
}

#[test]
fn both_names_at_once_are_refused() {
    let scratch = Scratch::new("renamed-both");

    let error = load(
        &scratch,
        "handshake_max_age_s = 90\nhandshake_max_age_secs = 120\n",
    )
    .expect_err("both names set");

    let problems: Vec<_> = error
        .problems()
        .iter()
        .map(|p| (p.field.as_str(), p.fix.as_str()))
        .collect();
    assert_eq!(
        problems,
        [(
            "[health].handshake_max_age_s",
            "keep only handshake_max_age_secs"
        )]
    );
}

#[test]
fn an_old_name_in_a_file_with_problems_is_reported_beside_them() {
    let scratch = Scratch::new("renamed-with-problem");

    let error = load(&scratch, "handshake_max_age_s = 90\ninterval_ms = 0\n")
        .expect_err("interval_ms = 0 is refused");

    assert!(
        error.problems().iter().any(|p| p.field == "[health]"),
        "{error}"
    );
    assert_eq!(error.warnings().len(), 1, "{error}");
    assert!(error.to_string().contains("warning: "), "{error}");
}
