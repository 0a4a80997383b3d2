//! `relay.toml`: typed sections, defaults, and one validation pass that reports every problem
//! at once, each naming the file, the field and the fix.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use xpart_bedrock::{is_model_id_char, is_region_name, Operation, Service, MAX_BODY_BYTES};
use xpart_daemon::config::Diagnostics;
use xpart_daemon::tunnel_config::{PeerSection, Side, TunnelMode, TunnelSection};

/// The relay's whole configuration, validated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    pub tunnel: TunnelSection,
    #[serde(rename = "agent", default)]
    pub agents: Vec<PeerSection>,
    pub service: ServiceSection,
    /// One `[upstream]` table (the Bedrock Runtime endpoint of one region) or several
    /// `[[upstream]]` tables, one per service, region and FIPS choice; the first entry's region
    /// is where requests that name no region go.
    #[serde(rename = "upstream", deserialize_with = "one_or_many")]
    pub upstreams: Vec<UpstreamSection>,
    pub policy: PolicySection,
    #[serde(default)]
    pub rewrite: RewriteSection,
    #[serde(default)]
    pub echo: EchoSection,
    #[serde(default)]
    pub credentials: CredentialsSection,
    #[serde(default)]
    pub limits: LimitsSection,
    pub admin: Option<AdminSection>,
    pub audit: Option<AuditSection>,
    /// Where the file was read from; error messages name it and relative paths resolve against it.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    pub listen: SocketAddr,
    /// On shutdown, how long requests in flight may run on before they are cut.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// `bedrock-runtime` (the default) or `bedrock` (the control plane's discovery reads).
    #[serde(default = "default_service")]
    pub service: Service,
    pub region: String,
    /// Whether this is the region's FIPS endpoint, the one callers dialling a `-fips` name go
    /// to (and the only one they go to).
    #[serde(default)]
    pub fips: bool,
    pub endpoint: String,
    /// Host name sent and signed as `Host`; defaults to the endpoint's host. Set it to the public
    /// `bedrock-runtime.<region>.amazonaws.com` when `endpoint` is a `vpce-…` name.
    pub host_header: Option<String>,
    #[serde(default)]
    pub resolver: Vec<SocketAddr>,
    pub extra_ca_file: Option<PathBuf>,
    /// Absent: the region's geography ([`default_profile_prefix`]); `"none"`: no retry.
    pub inference_profile_prefix: Option<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    #[serde(default = "default_first_byte_timeout")]
    pub first_byte_timeout_secs: u64,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    #[serde(default = "default_pool_idle_timeout")]
    pub pool_idle_timeout_secs: u64,
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    pub operations: Vec<String>,
    pub models: Vec<String>,
    /// `id:version` patterns of the guardrails the relay signs for, in ApplyGuardrail's path
    /// and in the `X-Amzn-Bedrock-Guardrail*` headers. Default: none.
    #[serde(default)]
    pub guardrails: Vec<String>,
    /// Values of `X-Amzn-Bedrock-Service-Tier` passed on. Default: `default`.
    #[serde(default = "default_service_tiers")]
    pub service_tiers: Vec<String>,
    /// Values of `X-Amzn-Bedrock-PerformanceConfig-Latency` passed on. Default: `standard`.
    #[serde(default = "default_performance_latency")]
    pub performance_latency: Vec<String>,
    /// Values of `X-Amzn-Bedrock-Trace` passed on. Default: all three.
    #[serde(default = "default_trace")]
    pub trace: Vec<String>,
}

/// Values Bedrock defines for the policy-gated headers (botocore `ServiceTierType`,
/// `PerformanceConfigLatency`, `Trace`).
pub const SERVICE_TIERS: [&str; 4] = ["priority", "default", "flex", "reserved"];
pub const PERFORMANCE_LATENCIES: [&str; 2] = ["standard", "optimized"];
pub const TRACE_VALUES: [&str; 3] = ["ENABLED", "DISABLED", "ENABLED_FULL"];

/// Bounds on what the relay holds in memory across all requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Request-body bytes buffered at once across every request in flight (bodies are held
    /// whole: SigV4 hashes them and the inference-profile retry resends them). Over it: 503.
    #[serde(default = "default_max_buffered_body_bytes")]
    pub max_buffered_body_bytes: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_buffered_body_bytes: default_max_buffered_body_bytes(),
        }
    }
}

/// The largest budget accepted: far above any real machine's memory, and small enough to
/// count in a semaphore.
pub const MAX_BUFFERED_BODY_BYTES_LIMIT: u64 = 1 << 40;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteSection {
    #[serde(default, rename = "rule")]
    pub rules: Vec<RewriteRule>,
}

/// Replace a leading `from` with `to`: on bare model IDs, on whole ARNs, and on the resource
/// ID after an ARN's last `/`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RewriteRule {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EchoSection {
    #[serde(default = "default_echo_enabled")]
    pub enabled: bool,
    #[serde(default = "default_echo_model")]
    pub model: String,
}

impl Default for EchoSection {
    fn default() -> Self {
        EchoSection {
            enabled: default_echo_enabled(),
            model: default_echo_model(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsSection {
    #[serde(default)]
    pub source: CredentialsFrom,
    #[serde(default = "default_refresh_margin")]
    pub refresh_before_expiry_secs: u64,
    #[serde(default = "default_credentials_timeout")]
    pub fetch_timeout_secs: u64,
}

impl Default for CredentialsSection {
    fn default() -> Self {
        CredentialsSection {
            source: CredentialsFrom::default(),
            refresh_before_expiry_secs: default_refresh_margin(),
            fetch_timeout_secs: default_credentials_timeout(),
        }
    }
}

/// Where the relay's AWS credentials come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialsFrom {
    /// The standard chain: environment, profile, web identity, container endpoint, IMDSv2.
    #[default]
    Chain,
    /// No credentials at all: only the echo model is answered, and nothing (IMDS included) is
    /// asked. For demos and tests off EC2.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    pub path: PathBuf,
}

/// Operations the relay can sign with a plain SigV4 header signature over a buffered body.
/// `InvokeModelWithBidirectionalStream` needs per-event signing and the async-invoke family
/// carries the model in the body, so neither is offered.
pub const SUPPORTED_OPERATIONS: [Operation; 11] = [
    Operation::InvokeModel,
    Operation::InvokeModelWithResponseStream,
    Operation::Converse,
    Operation::ConverseStream,
    Operation::CountTokens,
    Operation::ApplyGuardrail,
    Operation::ListFoundationModels,
    Operation::GetFoundationModel,
    Operation::ListInferenceProfiles,
    Operation::GetInferenceProfile,
    Operation::GetFoundationModelAvailability,
];

impl RelayConfig {
    /// Read and validate `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<RelayConfig, Diagnostics> {
        let path = path.as_ref();
        let label = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| {
            problems(
                &label,
                vec![Problem::new(
                    "",
                    format!("cannot read the file: {err}"),
                    "check the path given to --config",
                )],
            )
        })?;
        let mut config = RelayConfig::from_toml_str(&text, &label)?;
        config.source = path.to_path_buf();
        Ok(config)
    }

    /// Parse and validate TOML text; `file_label` names it in error messages.
    pub fn from_toml_str(text: &str, file_label: &str) -> Result<RelayConfig, Diagnostics> {
        let mut config: RelayConfig = xpart_daemon::config::parse_toml(text, file_label)?;
        config.source = PathBuf::from(file_label);
        let mut diagnostics = problems(file_label, config.validate());
        xpart_daemon::tunnel_config::check(
            Side::Relay,
            &config.tunnel,
            &config.agents,
            |i, _, field| format!("[[agent]][{i}].{field}"),
            |path| config.resolve_path(path),
            &mut diagnostics,
        );
        diagnostics.into_result(config)
    }

    /// The operations named in `[policy] operations` (validated).
    pub fn allowed_operations(&self) -> BTreeSet<Operation> {
        self.policy
            .operations
            .iter()
            .filter_map(|name| name.parse().ok())
            .collect()
    }

    pub fn model_patterns(&self) -> Vec<String> {
        self.policy.models.clone()
    }

    /// The first upstream: its region is the relay's default region and the one credentials
    /// are fetched in. Validation guarantees there is one; an empty list (never validated)
    /// falls back to the defaults.
    pub fn primary(&self) -> UpstreamSection {
        self.upstreams
            .first()
            .cloned()
            .unwrap_or_else(|| UpstreamSection {
                service: Service::BedrockRuntime,
                region: String::new(),
                fips: false,
                endpoint: String::new(),
                host_header: None,
                resolver: Vec::new(),
                extra_ca_file: None,
                inference_profile_prefix: None,
                connect_timeout_secs: default_connect_timeout(),
                first_byte_timeout_secs: default_first_byte_timeout(),
                idle_timeout_secs: default_idle_timeout(),
                pool_idle_timeout_secs: default_pool_idle_timeout(),
                pool_max_idle: default_pool_max_idle(),
            })
    }

    /// The default region: the first upstream's.
    pub fn region(&self) -> String {
        self.primary().region
    }

    /// Every region some upstream serves, in the order first configured.
    pub fn regions(&self) -> Vec<String> {
        let mut regions: Vec<String> = Vec::new();
        for up in &self.upstreams {
            if !regions.contains(&up.region) {
                regions.push(up.region.clone());
            }
        }
        regions
    }

    /// The inference-profile prefix each region's retry uses (`None`: no retry there).
    pub fn profile_prefixes(&self) -> std::collections::BTreeMap<String, Option<String>> {
        let mut prefixes = std::collections::BTreeMap::new();
        for up in &self.upstreams {
            if up.service != Service::BedrockRuntime {
                continue;
            }
            let prefix = match up.inference_profile_prefix.as_deref() {
                Some(PROFILE_PREFIX_NONE) => None,
                Some(prefix) => Some(prefix.to_string()),
                None => default_profile_prefix(&up.region).map(str::to_string),
            };
            prefixes.entry(up.region.clone()).or_insert(prefix);
        }
        prefixes
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.primary().connect_timeout_secs)
    }

    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_secs(self.primary().first_byte_timeout_secs)
    }

    /// One idle timeout for every stream, whichever upstream it comes from; validation
    /// refuses upstreams that set different ones.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.primary().idle_timeout_secs)
    }

    /// Resolve a configured path against the config file's directory.
    pub fn resolve_path(&self, path: &Path) -> PathBuf {
        xpart_daemon::config::resolve_path(&self.source, path)
    }

    fn validate(&self) -> Vec<Problem> {
        let mut found = Vec::new();
        self.validate_tunnel(&mut found);
        self.validate_agents(&mut found);
        self.validate_upstream(&mut found);
        self.validate_policy(&mut found);
        self.validate_rewrite(&mut found);
        self.validate_limits(&mut found);
        self.validate_durations(&mut found);
        found
    }

    fn validate_tunnel(&self, found: &mut Vec<Problem>) {
        match self.tunnel.mode {
            TunnelMode::Host => {
                if !self.service.listen.ip().is_loopback() {
                    found.push(Problem::new(
                        "[tunnel].mode",
                        "mode \"host\" has no WireGuard authentication and is only for loopback tests".into(),
                        "use mode = \"kernel\" or \"userspace\", or set [service].listen to a 127.0.0.0/8 address",
                    ));
                }
            }
            TunnelMode::Kernel | TunnelMode::Userspace => {
                if self.tunnel.private_key_file.is_none() {
                    found.push(Problem::new(
                        "[tunnel].private_key_file",
                        "missing".into(),
                        "write a key with `xpart keygen` and name its file here",
                    ));
                }
                match self.tunnel.address {
                    None => found.push(Problem::new(
                        "[tunnel].address",
                        "missing".into(),
                        "set this side's tunnel address with its prefix, e.g. \"100.64.0.2/30\"",
                    )),
                    Some(net) if net.addr() != self.service.listen.ip() => {
                        found.push(Problem::new(
                            "[service].listen",
                            format!(
                                "{} is not this relay's tunnel address {}",
                                self.service.listen,
                                net.addr()
                            ),
                            "listen on the tunnel address, e.g. \"100.64.0.2:8080\"",
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
    }

    fn validate_agents(&self, found: &mut Vec<Problem>) {
        let needs_key = self.tunnel.mode != TunnelMode::Host;
        if self.agents.is_empty() {
            found.push(Problem::new(
                "[[agent]]",
                "no agent is configured, so every request would be refused".into(),
                "add an [[agent]] table with name, public_key and tunnel_address",
            ));
        }
        for (i, agent) in self.agents.iter().enumerate() {
            if needs_key && agent.public_key.is_none() {
                found.push(Problem::new(
                    &format!("[[agent]][{i}].public_key"),
                    format!("agent {:?} has no public key", agent.name),
                    "paste the agent's WireGuard public key (`xpart keygen` prints it)",
                ));
            }
            if let Some(key) = &agent.public_key {
                if let Err(err) = xpart_tunnel::PublicKey::from_base64(key) {
                    found.push(Problem::new(
                        &format!("[[agent]][{i}].public_key"),
                        format!("agent {:?}: {err}", agent.name),
                        "paste the agent's WireGuard public key (44 base64 characters, as `xpart keygen` prints it)",
                    ));
                }
            }
            if let Some(net) = self.tunnel.address {
                if needs_key && !net.contains(&agent.tunnel_address) {
                    found.push(Problem::new(
                        &format!("[[agent]][{i}].tunnel_address"),
                        format!(
                            "{} is outside this relay's tunnel network {}",
                            agent.tunnel_address,
                            net.trunc()
                        ),
                        "use the agent's [tunnel].address without the prefix",
                    ));
                }
            }
        }
    }

    fn validate_upstream(&self, found: &mut Vec<Problem>) {
        if self.upstreams.is_empty() {
            found.push(Problem::new(
                "[[upstream]]",
                "no upstream is configured".into(),
                "add an [upstream] table with region and endpoint",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, up) in self.upstreams.iter().enumerate() {
            let table = self.upstream_table(i);
            self.validate_one_upstream(&table, up, found);
            if xpart_daemon::crypto::FIPS_MODE && !up.fips {
                found.push(Problem::new(
                    &format!("{table}.fips"),
                    "is false, and this is a FIPS build: every request goes to a FIPS endpoint".into(),
                    "point the table at the region's FIPS endpoint (bedrock-runtime-fips.REGION.amazonaws.com or bedrock-fips.REGION.amazonaws.com, or an interface endpoint for it) and set fips = true",
                ));
            }
            if !seen.insert((up.service, up.region.clone(), up.fips)) {
                found.push(Problem::new(
                    &format!("{table}.region"),
                    format!(
                        "a second {}{} upstream for {}",
                        up.service,
                        if up.fips { " FIPS" } else { "" },
                        up.region
                    ),
                    "keep one [[upstream]] per service, region and fips",
                ));
            }
            if up.idle_timeout_secs != self.primary().idle_timeout_secs {
                found.push(Problem::new(
                    &format!("{table}.idle_timeout_secs"),
                    format!(
                        "{} differs from the first upstream's {}; one idle timeout applies to every stream",
                        up.idle_timeout_secs,
                        self.primary().idle_timeout_secs
                    ),
                    "set the same idle_timeout_secs on every [[upstream]], or leave it out",
                ));
            }
        }
    }

    /// How messages name upstream entry `i`: `[upstream]` when the file has one.
    fn upstream_table(&self, i: usize) -> String {
        match self.upstreams.len() {
            1 => "[upstream]".to_string(),
            _ => format!("[[upstream]][{i}]"),
        }
    }

    fn validate_one_upstream(&self, table: &str, up: &UpstreamSection, found: &mut Vec<Problem>) {
        if up.region.is_empty() {
            found.push(Problem::new(
                &format!("{table}.region"),
                "empty".into(),
                "set the Commercial region Bedrock runs in, e.g. \"us-east-1\"",
            ));
        } else if !is_region_name(&up.region) {
            found.push(Problem::new(
                &format!("{table}.region"),
                format!("{:?} is not an AWS region name", up.region),
                "use a region name such as \"us-east-1\"",
            ));
        }
        if let Err(message) = crate::upstream::Endpoint::parse(&up.endpoint) {
            found.push(Problem::new(
                &format!("{table}.endpoint"),
                message.to_string(),
                "use \"https://bedrock-runtime.<region>.amazonaws.com\" or the VPC endpoint's DNS name",
            ));
        }
        if let Some(host) = &up.host_header {
            if crate::upstream::host_header_value(host).is_err() {
                found.push(Problem::new(
                    &format!("{table}.host_header"),
                    format!("{host:?} is not a host name (with an optional port)"),
                    "give the public name, e.g. \"bedrock-runtime.us-east-1.amazonaws.com\", or remove the field",
                ));
            }
        }
        if let Some(file) = &up.extra_ca_file {
            let resolved = self.resolve_path(file);
            if !resolved.is_file() {
                found.push(Problem::new(
                    &format!("{table}.extra_ca_file"),
                    format!("no such file {:?}", resolved.display().to_string()),
                    "name a PEM file of CA certificates, or remove the field",
                ));
            }
        }
        if let Some(prefix) = &up.inference_profile_prefix {
            if prefix != PROFILE_PREFIX_NONE && !prefix.ends_with('.')
                || prefix.len() < 2
                || !prefix.chars().all(is_model_id_char)
                || prefix.contains("..")
            {
                found.push(Problem::new(
                    &format!("{table}.inference_profile_prefix"),
                    format!("{prefix:?} is not an inference-profile prefix"),
                    "use a prefix ending in a dot, e.g. \"us.\", or \"none\" for no retry",
                ));
            }
        }
        for (field, value) in [
            ("connect_timeout_secs", up.connect_timeout_secs),
            ("first_byte_timeout_secs", up.first_byte_timeout_secs),
            ("idle_timeout_secs", up.idle_timeout_secs),
        ] {
            if value == 0 {
                found.push(Problem::new(
                    &format!("{table}.{field}"),
                    "0 would time every request out".into(),
                    "use a number of seconds above zero",
                ));
            }
        }
    }

    /// Durations past these bounds are typos, and some overflow the clock arithmetic they
    /// feed (`Instant + Duration` panics), so they are refused here rather than found live.
    fn validate_durations(&self, found: &mut Vec<Problem>) {
        for (i, up) in self.upstreams.iter().enumerate() {
            let table = self.upstream_table(i);
            for (field, value, max) in [
                ("connect_timeout_secs", up.connect_timeout_secs, 300),
                (
                    "first_byte_timeout_secs",
                    up.first_byte_timeout_secs,
                    86_400,
                ),
                ("idle_timeout_secs", up.idle_timeout_secs, 86_400),
                ("pool_idle_timeout_secs", up.pool_idle_timeout_secs, 86_400),
            ] {
                if value > max {
                    found.push(Problem::new(
                        &format!("{table}.{field}"),
                        format!("{value} is above {max} seconds"),
                        "use a number of seconds in range, or leave it out for the default",
                    ));
                }
            }
        }
        let credentials = &self.credentials;
        for (field, value, max) in [
            (
                "[credentials].fetch_timeout_secs",
                credentials.fetch_timeout_secs,
                300,
            ),
            (
                "[credentials].refresh_before_expiry_secs",
                credentials.refresh_before_expiry_secs,
                43_200,
            ),
            (
                "[service].shutdown_grace_secs",
                self.service.shutdown_grace_secs,
                3_600,
            ),
        ] {
            if value > max {
                found.push(Problem::new(
                    field,
                    format!("{value} is above {max} seconds"),
                    "use a number of seconds in range, or leave it out for the default",
                ));
            }
        }
        if credentials.fetch_timeout_secs == 0 {
            found.push(Problem::new(
                "[credentials].fetch_timeout_secs",
                "0 would time every credential fetch out".into(),
                "use a number of seconds above zero, or leave it out for 10",
            ));
        }
    }

    fn validate_policy(&self, found: &mut Vec<Problem>) {
        for (i, name) in self.policy.operations.iter().enumerate() {
            let field = format!("[policy].operations[{i}]");
            match name.parse::<Operation>() {
                Err(_) => found.push(Problem::new(
                    &field,
                    format!("{name:?} is not a Bedrock operation"),
                    "use names like \"Converse\", \"ConverseStream\", \"InvokeModel\"",
                )),
                Ok(op) if !SUPPORTED_OPERATIONS.contains(&op) => found.push(Problem::new(
                    &field,
                    format!("{name} cannot be relayed (it needs per-event signing or carries its model in the body)"),
                    "remove it; supported: InvokeModel, InvokeModelWithResponseStream, Converse, ConverseStream, CountTokens, ApplyGuardrail, ListFoundationModels, GetFoundationModel, ListInferenceProfiles, GetInferenceProfile, GetFoundationModelAvailability",
                )),
                Ok(_) => {}
            }
        }
        if self.policy.models.is_empty() {
            found.push(Problem::new(
                "[policy].models",
                "empty, so every model would be refused".into(),
                "list model ID patterns, e.g. [\"anthropic.claude-*\", \"us.anthropic.*\"]",
            ));
        }
        for (i, pattern) in self.policy.models.iter().enumerate() {
            let usable = !pattern.is_empty()
                && pattern
                    .chars()
                    .all(|c| is_model_id_char(c) || c == '*' || c == '/');
            if !usable {
                found.push(Problem::new(
                    &format!("[policy].models[{i}]"),
                    format!("{pattern:?} can never match a Bedrock model id"),
                    "use letters, digits, '.', '_', ':', '-', '/' (in ARNs) and '*'",
                ));
            }
        }
        for (i, pattern) in self.policy.guardrails.iter().enumerate() {
            let usable = pattern
                .rsplit_once(':')
                .is_some_and(|(id, version)| !id.is_empty() && !version.is_empty())
                && pattern
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.:/*".contains(c));
            if !usable {
                found.push(Problem::new(
                    &format!("[policy].guardrails[{i}]"),
                    format!("{pattern:?} is not an id:version guardrail pattern"),
                    "write the guardrail id (or ARN) and version, e.g. \"gr-abc123:1\" or \"gr-abc123:*\"",
                ));
            }
        }
        for (field, values, known) in [
            (
                "service_tiers",
                &self.policy.service_tiers,
                &SERVICE_TIERS[..],
            ),
            (
                "performance_latency",
                &self.policy.performance_latency,
                &PERFORMANCE_LATENCIES[..],
            ),
            ("trace", &self.policy.trace, &TRACE_VALUES[..]),
        ] {
            for (i, value) in values.iter().enumerate() {
                if !known.contains(&value.as_str()) {
                    found.push(Problem::new(
                        &format!("[policy].{field}[{i}]"),
                        format!("{value:?} is not a value Bedrock defines"),
                        &format!("use some of {}", known.join(", ")),
                    ));
                }
            }
        }
    }

    fn validate_rewrite(&self, found: &mut Vec<Problem>) {
        for (i, rule) in self.rewrite.rules.iter().enumerate() {
            if rule.from.is_empty() {
                found.push(Problem::new(
                    &format!("[[rewrite.rule]][{i}].from"),
                    "empty".into(),
                    "give the GovCloud prefix to replace, e.g. \"us-gov.\"",
                ));
            }
            if !rule.to.chars().all(|c| is_model_id_char(c) || c == '/') {
                found.push(Problem::new(
                    &format!("[[rewrite.rule]][{i}].to"),
                    format!("{:?} would make ids Bedrock refuses", rule.to),
                    "use letters, digits, '.', '_', ':', '-' and '/' (in ARNs)",
                ));
            }
        }
    }

    fn validate_limits(&self, found: &mut Vec<Problem>) {
        let budget = self.limits.max_buffered_body_bytes;
        if budget < MAX_BODY_BYTES as u64 || budget > MAX_BUFFERED_BODY_BYTES_LIMIT {
            found.push(Problem::new(
                "[limits].max_buffered_body_bytes",
                format!("{budget} is outside {MAX_BODY_BYTES}..={MAX_BUFFERED_BODY_BYTES_LIMIT}; below Bedrock's body limit a single legal request could never be served"),
                "use a byte count of at least 25000000, e.g. 268435456 (256 MiB)",
            ));
        }
    }
}

/// One problem before it is attached to the file name.
struct Problem {
    field: String,
    message: String,
    fix: String,
}

impl Problem {
    fn new(field: &str, message: String, fix: &str) -> Problem {
        Problem {
            field: field.to_string(),
            message,
            fix: fix.to_string(),
        }
    }
}

/// The relay has renamed no fields, so its files load without warnings.
impl xpart_daemon::config::Warned for RelayConfig {
    fn warnings(&self) -> &[xpart_daemon::config::Problem] {
        &[]
    }
}

fn problems(file: &str, found: Vec<Problem>) -> Diagnostics {
    let mut diagnostics = Diagnostics::new(file);
    for p in found {
        diagnostics.push(p.field, p.message, p.fix);
    }
    diagnostics
}

/// `inference_profile_prefix = "none"`: no inference-profile retry in that region.
pub const PROFILE_PREFIX_NONE: &str = "none";

/// The system inference-profile prefix of a region's geography, as Bedrock names its
/// cross-Region profiles (`us.`, `eu.`, `apac.`, `us-gov.`); `None` where Bedrock defines no
/// geography profile for the region's area, so there is no retry unless one is configured.
/// Canada and São Paulo are source Regions of the US profiles.
pub fn default_profile_prefix(region: &str) -> Option<&'static str> {
    let area = region.split('-').next().unwrap_or("");
    if region.starts_with("us-gov-") {
        return Some("us-gov.");
    }
    match area {
        "us" => Some("us."),
        "ca" => Some("us."),
        "sa" => Some("us."),
        "eu" => Some("eu."),
        "ap" => Some("apac."),
        _ => None,
    }
}

fn default_service() -> Service {
    Service::BedrockRuntime
}

/// `upstream` as one table (`[upstream]`) or an array of tables (`[[upstream]]`); the inner
/// errors (unknown field, missing region) come through unchanged.
fn one_or_many<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<UpstreamSection>, D::Error> {
    struct OneOrMany;
    impl<'de> serde::de::Visitor<'de> for OneOrMany {
        type Value = Vec<UpstreamSection>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an [upstream] table or [[upstream]] tables")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            let one =
                UpstreamSection::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
            Ok(vec![one])
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::<UpstreamSection>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
        }
    }
    deserializer.deserialize_any(OneOrMany)
}

fn default_shutdown_grace() -> u64 {
    30
}
fn default_connect_timeout() -> u64 {
    5
}
fn default_first_byte_timeout() -> u64 {
    // Bedrock answers a non-streaming call only when the whole generation is done, which for
    // long outputs takes minutes.
    900
}
fn default_idle_timeout() -> u64 {
    300
}
fn default_pool_idle_timeout() -> u64 {
    60
}
fn default_pool_max_idle() -> usize {
    32
}
fn default_echo_enabled() -> bool {
    true
}
fn default_echo_model() -> String {
    "xpart.echo".to_string()
}
fn default_service_tiers() -> Vec<String> {
    vec!["default".to_string()]
}
fn default_performance_latency() -> Vec<String> {
    vec!["standard".to_string()]
}
fn default_trace() -> Vec<String> {
    TRACE_VALUES.iter().map(|v| v.to_string()).collect()
}
fn default_max_buffered_body_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_refresh_margin() -> u64 {
    300
}
fn default_credentials_timeout() -> u64 {
    10
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn minimal() -> String {
        format!(
            r#"
[tunnel]
mode = "userspace"
private_key_file = "relay.key"
address = "100.64.0.2/30"
[[agent]]
name = "agent-a"
public_key = "{AGENT_KEY}"
tunnel_address = "100.64.0.1"
[service]
listen = "100.64.0.2:8080"
[upstream]
region = "us-east-1"
endpoint = "https://bedrock-runtime.us-east-1.amazonaws.com"
[policy]
operations = ["Converse", "ConverseStream"]
models = ["anthropic.*"]
"#
        )
    }

    fn problems_of(text: &str) -> String {
        RelayConfig::from_toml_str(text, "relay.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn minimal_config_gets_long_generation_friendly_defaults() {
        let config = RelayConfig::from_toml_str(&minimal(), "relay.toml").unwrap();
        assert_eq!(
            config.tunnel.udp_listen(Side::Relay),
            Some(SocketAddr::from(([0, 0, 0, 0], 51820)))
        );
        assert_eq!(config.first_byte_timeout(), Duration::from_secs(900));
        assert_eq!(config.idle_timeout(), Duration::from_secs(300));
        assert_eq!(config.echo.model, "xpart.echo");
        assert!(config.echo.enabled);
        assert_eq!(
            config.allowed_operations(),
            [Operation::Converse, Operation::ConverseStream]
                .into_iter()
                .collect()
        );
    }

    #[test]
    fn durations_that_overflow_the_clock_are_refused() {
        let text = minimal()
            .replace(
                "region = \"us-east-1\"",
                "region = \"us-east-1\"\nidle_timeout_secs = 9223372036854775807\nconnect_timeout_secs = 301",
            )
            .replace(
                "[policy]",
                "[credentials]\nrefresh_before_expiry_secs = 9223372036854775807\nfetch_timeout_secs = 0\n[policy]",
            );
        let out = problems_of(&text);
        for fragment in [
            "[upstream].idle_timeout_secs: 9223372036854775807 is above 86400 seconds",
            "[upstream].connect_timeout_secs: 301 is above 300 seconds",
            "[credentials].refresh_before_expiry_secs",
            "[credentials].fetch_timeout_secs: 0 would time every credential fetch out",
        ] {
            assert!(out.contains(fragment), "{fragment} missing from:\n{out}");
        }
    }

    #[test]
    fn reports_every_problem_with_field_and_fix() {
        let text = minimal()
            .replace("\"100.64.0.2:8080\"", "\"100.64.0.9:8080\"")
            .replace("https://bedrock", "http://bedrock")
            .replace(
                "[\"Converse\", \"ConverseStream\"]",
                "[\"Converse\", \"Chat\", \"InvokeModelWithBidirectionalStream\"]",
            )
            .replace(AGENT_KEY, "not-a-key");
        let out = problems_of(&text);
        for fragment in [
            "relay.toml",
            "[service].listen",
            "[upstream].endpoint",
            "[policy].operations[1]",
            "[policy].operations[2]",
            "[[agent]][0].public_key",
            "fix:",
        ] {
            assert!(out.contains(fragment), "{fragment} missing from:\n{out}");
        }
    }

    #[test]
    fn policy_header_gates_and_body_budget_have_safe_defaults() {
        let config = RelayConfig::from_toml_str(&minimal(), "relay.toml").unwrap();
        assert!(config.policy.guardrails.is_empty());
        assert_eq!(config.policy.service_tiers, ["default"]);
        assert_eq!(config.policy.performance_latency, ["standard"]);
        assert_eq!(config.policy.trace, TRACE_VALUES);
        assert_eq!(config.limits.max_buffered_body_bytes, 256 * 1024 * 1024);
    }

    #[test]
    fn policy_values_outside_bedrocks_vocabulary_are_refused() {
        let text = minimal().replace(
            "models = [\"anthropic.*\"]",
            "models = [\"anthropic.*\", \"a;b*\", \"\"]\nguardrails = [\"gr-1:1\", \"nover\", \"g r:1\"]\n\
             service_tiers = [\"premium\"]\nperformance_latency = [\"fast\"]\ntrace = [\"on\"]",
        ) + "[limits]\nmax_buffered_body_bytes = 1000\n";
        let out = problems_of(&text);
        for fragment in [
            "[policy].models[1]",
            "[policy].models[2]",
            "[policy].guardrails[1]",
            "[policy].guardrails[2]",
            "[policy].service_tiers[0]",
            "[policy].performance_latency[0]",
            "[policy].trace[0]",
            "[limits].max_buffered_body_bytes",
        ] {
            assert!(out.contains(fragment), "{fragment} missing from:\n{out}");
        }
        assert!(!out.contains("[policy].guardrails[0]"), "{out}");
        assert!(!out.contains("[policy].models[0]"), "{out}");
    }

    #[test]
    fn host_mode_only_on_loopback() {
        let text = minimal()
            .replace("mode = \"userspace\"", "mode = \"host\"")
            .replace("\"100.64.0.2:8080\"", "\"0.0.0.0:8080\"");
        let out = problems_of(&text);
        assert!(out.contains("[tunnel].mode"), "{out}");
        let text = minimal()
            .replace("mode = \"userspace\"", "mode = \"host\"")
            .replace("\"100.64.0.2:8080\"", "\"127.0.0.1:8080\"")
            .replace("address = \"100.64.0.2/30\"\n", "")
            .replace(
                "tunnel_address = \"100.64.0.1\"",
                "tunnel_address = \"127.0.0.1\"",
            );
        assert!(RelayConfig::from_toml_str(&text, "relay.toml").is_ok());
    }

    #[test]
    fn unknown_fields_and_zero_timeouts_are_refused() {
        let out = problems_of(&minimal().replace("[policy]", "[upstream.extra]\nx = 1\n[policy]"));
        assert!(out.contains("relay.toml"), "{out}");
        let out = problems_of(&minimal().replace(
            "region = \"us-east-1\"",
            "region = \"us-east-1\"\nfirst_byte_timeout_secs = 0",
        ));
        assert!(out.contains("[upstream].first_byte_timeout_secs"), "{out}");
    }

    fn several(upstreams: &str) -> String {
        let single = "[upstream]\nregion = \"us-east-1\"\nendpoint = \"https://bedrock-runtime.us-east-1.amazonaws.com\"\n";
        assert!(minimal().contains(single));
        minimal().replace(single, upstreams)
    }

    #[test]
    fn a_single_upstream_table_is_the_runtime_of_its_region() {
        let config = RelayConfig::from_toml_str(&minimal(), "relay.toml").unwrap();
        assert_eq!(config.upstreams.len(), 1);
        let up = &config.upstreams[0];
        assert_eq!(
            (up.service, up.region.as_str(), up.fips),
            (Service::BedrockRuntime, "us-east-1", false)
        );
        assert_eq!(config.region(), "us-east-1");
        assert_eq!(
            config.profile_prefixes().get("us-east-1"),
            Some(&Some("us.".to_string())),
            "the geography's prefix by default"
        );
    }

    #[test]
    fn upstream_tables_name_service_region_and_fips() {
        let text = several(
            r#"
[[upstream]]
region = "us-east-1"
endpoint = "https://bedrock-runtime.us-east-1.amazonaws.com"
[[upstream]]
service = "bedrock"
region = "us-east-1"
endpoint = "https://bedrock.us-east-1.amazonaws.com"
[[upstream]]
region = "us-east-1"
fips = true
endpoint = "https://bedrock-runtime-fips.us-east-1.amazonaws.com"
[[upstream]]
region = "eu-west-1"
endpoint = "https://bedrock-runtime.eu-west-1.amazonaws.com"
inference_profile_prefix = "none"
"#,
        );
        let config = RelayConfig::from_toml_str(&text, "relay.toml").unwrap();
        let keys: Vec<_> = config
            .upstreams
            .iter()
            .map(|u| (u.service, u.region.as_str(), u.fips))
            .collect();
        assert_eq!(
            keys,
            [
                (Service::BedrockRuntime, "us-east-1", false),
                (Service::Bedrock, "us-east-1", false),
                (Service::BedrockRuntime, "us-east-1", true),
                (Service::BedrockRuntime, "eu-west-1", false),
            ]
        );
        assert_eq!(config.regions(), ["us-east-1", "eu-west-1"]);
        assert_eq!(config.profile_prefixes().get("eu-west-1"), Some(&None));
    }

    #[test]
    fn upstream_tables_are_checked_each_by_its_index() {
        let first = "[[upstream]]\nregion = \"us-east-1\"\nendpoint = \"https://a.example\"\n";
        let cases: [(&str, &[&str]); 3] = [
            (
                r#"
[[upstream]]
service = "s3"
region = "us-east-1"
endpoint = "https://b.example"
"#,
                &["unknown service \"s3\""],
            ),
            (
                r#"
[[upstream]]
region = "us-east-1"
endpoint = "https://b.example"
[[upstream]]
region = "US East"
endpoint = "http://c.example"
idle_timeout_secs = 10
inference_profile_prefix = "us"
"#,
                &[
                    "[[upstream]][1].region: a second bedrock-runtime upstream for us-east-1",
                    "[[upstream]][2].region: \"US East\" is not an AWS region name",
                    "[[upstream]][2].endpoint",
                    "[[upstream]][2].idle_timeout_secs",
                    "[[upstream]][2].inference_profile_prefix",
                ],
            ),
            // An unknown key in the first table.
            ("bogus = 1\n", &["bogus"]),
        ];
        for (rest, expected) in cases {
            let out = problems_of(&several(&format!("{first}{rest}")));
            for expected in expected {
                assert!(out.contains(expected), "{expected}: {out}");
            }
        }
    }

    #[test]
    fn profile_prefix_defaults_follow_the_regions_geography() {
        let cases = [
            ("us-east-1", Some("us.")),
            ("us-west-2", Some("us.")),
            ("us-gov-west-1", Some("us-gov.")),
            ("ca-central-1", Some("us.")),
            ("sa-east-1", Some("us.")),
            ("eu-central-1", Some("eu.")),
            ("eu-west-3", Some("eu.")),
            ("ap-northeast-1", Some("apac.")),
            ("ap-southeast-2", Some("apac.")),
            ("me-central-1", None),
            ("il-central-1", None),
            ("af-south-1", None),
        ];
        for (region, prefix) in cases {
            assert_eq!(default_profile_prefix(region), prefix, "{region}");
        }
    }

    #[test]
    fn discovery_reads_are_operations_the_policy_can_allow() {
        let text = minimal().replace(
            "operations = [\"Converse\", \"ConverseStream\"]",
            "operations = [\"Converse\", \"ListFoundationModels\", \"GetFoundationModel\", \"ListInferenceProfiles\", \"GetInferenceProfile\", \"GetFoundationModelAvailability\"]",
        );
        let config = RelayConfig::from_toml_str(&text, "relay.toml").unwrap();
        for op in Operation::DISCOVERY {
            assert!(config.allowed_operations().contains(&op), "{op}");
        }
    }
}
