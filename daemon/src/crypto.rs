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

/// AWS-LC FIPS module versions, as the module names itself, whose static library holds a
/// FIPS 140-3 certificate from NIST's CMVP: the version and the certificate number. A version
/// goes here only once its certificate is issued (AWS-LC's `crypto/fipsmodule/FIPS.md` lists
/// them); one that is only submitted ("Modules In Process") has no certificate to name.
pub const CERTIFIED_MODULES: &[(&str, &str)] = &[("AWS-LC FIPS 3.1.0", "#5314")];

/// The FIPS module linked into this binary, as `/status` and `xpart status` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FipsModule {
    /// The version the module reports at run time, e.g. `AWS-LC FIPS 3.1.0`.
    pub version: String,
    /// The FIPS 140-3 certificate that names this version, from [`CERTIFIED_MODULES`].
    pub certificate: Option<&'static str>,
}

impl FipsModule {
    /// The module of this version, with the certificate from [`CERTIFIED_MODULES`] that names
    /// it, if any.
    pub fn of(version: String) -> Self {
        let certificate = CERTIFIED_MODULES
            .iter()
            .find(|(certified, _)| *certified == version)
            .map(|(_, certificate)| *certificate);
        Self {
            version,
            certificate,
        }
    }

    /// `/status`'s `fips_module`: `{"version", "certificate"}`, the certificate null when
    /// this version has none.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({ "version": self.version, "certificate": self.certificate })
    }
}

/// `module AWS-LC FIPS 3.1.0, certificate #5314`, or `…, no certificate`: what `--version`
/// says after `(fips)`, and what the AMI build's check reads.
impl std::fmt::Display for FipsModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.certificate {
            Some(certificate) => write!(f, "module {}, certificate {certificate}", self.version),
            None => write!(f, "module {}, no certificate", self.version),
        }
    }
}

/// The FIPS module of a FIPS build, read from the module itself rather than from the crate
/// version this was compiled against, so that what `/status` shows is what runs; `None`
/// outside FIPS mode. Read once per process: `--version`, every `/status` and the tests share it.
pub fn fips_module() -> Option<&'static FipsModule> {
    static MODULE: std::sync::OnceLock<Option<FipsModule>> = std::sync::OnceLock::new();
    MODULE.get_or_init(linked_module).as_ref()
}

#[cfg(feature = "fips")]
fn linked_module() -> Option<FipsModule> {
    // SAFETY: `awslc_version_string` takes no arguments and returns a pointer to a static,
    // NUL-terminated string inside the module (`AWSLC_VERSION_STRING`), valid for the life of
    // the process.
    let version = unsafe { std::ffi::CStr::from_ptr(aws_lc_fips_sys::awslc_version_string()) };
    Some(FipsModule::of(version.to_string_lossy().into_owned()))
}

#[cfg(not(feature = "fips"))]
fn linked_module() -> Option<FipsModule> {
    None
}

/// `/status`'s `fips_module`: the module's version and certificate, null outside FIPS mode.
pub fn fips_module_json() -> serde_json::Value {
    fips_module().map_or(serde_json::Value::Null, |module| module.json())
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
    fn a_module_version_names_its_certificate_only_when_it_has_one() {
        let certified = FipsModule::of("AWS-LC FIPS 3.1.0".to_string());
        assert_eq!(certified.certificate, Some("#5314"));
        assert_eq!(
            certified.json(),
            serde_json::json!({ "version": "AWS-LC FIPS 3.1.0", "certificate": "#5314" })
        );
        assert_eq!(
            certified.to_string(),
            "module AWS-LC FIPS 3.1.0, certificate #5314"
        );
        // Later releases of the same line and the submitted 4.x line are not what #5314 names.
        for version in ["AWS-LC FIPS 3.6.0", "AWS-LC FIPS 4.2.0"] {
            let module = FipsModule::of(version.to_string());
            assert_eq!(module.certificate, None, "{version}");
            assert_eq!(module.json()["certificate"], serde_json::Value::Null);
            assert_eq!(
                module.to_string(),
                format!("module {version}, no certificate")
            );
        }
    }

    #[test]
    fn the_module_is_reported_exactly_in_fips_mode() {
        assert_eq!(fips_module().is_some(), FIPS_MODE);
        assert_eq!(fips_module_json().is_null(), !FIPS_MODE);
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
