//! The cryptography behind every TLS configuration the daemons build, and FIPS mode.
//!
//! A build with the `fips` cargo feature is in FIPS mode: every TLS configuration (the agent's
//! front, the inner TLS between agent and relay, the relay's client to Bedrock) uses rustls
//! with aws-lc-rs's FIPS provider, whose cryptography runs inside the AWS-LC FIPS module, and
//! a daemon refuses to start when rustls does not report a configuration as FIPS
//! ([`require_fips`]). The default build uses `ring` and needs no Go or CMake to compile.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// Whether this binary was built with the `fips` feature: FIPS mode is a property of the
/// build, so a FIPS binary cannot be configured out of it.
pub const FIPS_MODE: bool = cfg!(feature = "fips");

/// The provider every TLS configuration of this build uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(build_provider())
}

#[cfg(feature = "fips")]
fn build_provider() -> CryptoProvider {
    rustls::crypto::default_fips_provider()
}

#[cfg(not(feature = "fips"))]
fn build_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A TLS configuration that rustls does not report as FIPS, in a FIPS build.
#[derive(Debug, thiserror::Error)]
#[error("FIPS mode: the TLS configuration of {config} is not FIPS (rustls reports fips() = false: the provider is not AWS-LC's FIPS module, the module failed its power-on self-test, or a setting such as extended master secret is off) — fix: run a binary built with `--features fips` (tests/fips/build) on a supported platform, and read the log above for the module's own error")]
pub struct NotFips {
    /// The configuration, named as the operator knows it, e.g. `[front]`.
    pub config: &'static str,
}

/// In FIPS mode, every configuration in `configs` (name, what its `fips()` returned) must be
/// FIPS; outside FIPS mode there is nothing to require.
pub fn require_fips(configs: &[(&'static str, bool)]) -> Result<(), NotFips> {
    require(FIPS_MODE, configs)
}

fn require(fips_mode: bool, configs: &[(&'static str, bool)]) -> Result<(), NotFips> {
    if !fips_mode {
        return Ok(());
    }
    match configs.iter().find(|(_, fips)| !fips) {
        Some((config, _)) => Err(NotFips { config }),
        None => Ok(()),
    }
}

/// What `/metrics` and `/status` report: `xpart_fips_mode` is 1 in FIPS mode.
pub fn register_metrics(registry: &prometheus::Registry) -> prometheus::Result<()> {
    let gauge = prometheus::IntGauge::new(
        "xpart_fips_mode",
        "1 when this binary is a FIPS build: every TLS configuration uses AWS-LC's FIPS module and was checked at start",
    )?;
    gauge.set(i64::from(FIPS_MODE));
    registry.register(Box::new(gauge))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fips_mode_refuses_the_first_configuration_that_is_not_fips_and_names_it() {
        let err = require(true, &[("[front]", true), ("inner TLS client", false)]).unwrap_err();
        assert_eq!(err.config, "inner TLS client");
        assert!(err.to_string().contains("--features fips"), "{err}");
        assert!(require(true, &[("[front]", true)]).is_ok());
    }

    #[test]
    fn outside_fips_mode_nothing_is_required() {
        assert!(require(false, &[("[front]", false)]).is_ok());
    }

    #[test]
    fn the_provider_of_this_build_reports_fips_exactly_in_fips_mode() {
        assert_eq!(provider().fips(), FIPS_MODE);
    }

    #[test]
    fn the_metric_says_whether_this_is_a_fips_build() {
        let registry = prometheus::Registry::new();
        register_metrics(&registry).unwrap();
        let families = registry.gather();
        let value = families[0].get_metric()[0].get_gauge().get_value();
        assert_eq!(value, f64::from(u8::from(FIPS_MODE)));
    }
}
