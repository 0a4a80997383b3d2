//! The agent's config loader (`AgentConfig::from_toml_str`: TOML, then validation) on
//! arbitrary text, and what a running agent builds from an accepted config.
//!
//! Beyond "no panic": a config that passes validation (what `--check` runs) must also start
//! the parts built from it: its principals' limiters admit requests over time, its DNS names
//! load into the answerer.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use xpart_agent::AgentConfig;
use xpart_agent::Answerer;
use xpart_agent::Limits;
use xpart_agent::Metrics;

fuzz_target!(|text: &str| {
    let label = xpart_fuzz::config_label("agent.toml");
    let Ok(config) = AgentConfig::from_toml_str(text, &label) else {
        return;
    };
    let start = Instant::now();
    let mut limits = Limits::new();
    let principals = config.principals();
    for principal in &principals {
        limits.add_principal(&principal.name, principal.limits, start);
    }
    for principal in &principals {
        for step in 0..3u64 {
            let now = start + Duration::from_millis(step * 700);
            if limits.admit(&principal.name, now).is_ok() {
                limits.release(&principal.name);
            }
        }
    }
    if let Some(mut dns) = config.dns_settings() {
        // No upstream: the answerer must not reach out of the process.
        dns.upstream.clear();
        if let Err(error) = Answerer::new(&dns, Metrics::new()) {
            panic!("validated [dns] does not load: {error}");
        }
    }
    let _ = config.health_settings();
});
