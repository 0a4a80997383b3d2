//! `agent.toml`: parsed with serde, then validated in one pass that reports every problem at
//! once, each naming the file, the field and the fix. `config/agent.example.toml` documents
//! every field.
//!
//! Relative paths in the file are taken relative to the file's directory, so a config and
//! its keys and certificates can move together.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use xpart_bedrock::Operation;
use xpart_daemon::config::{Diagnostics, Problem, Renamed, Warned};
use xpart_daemon::tunnel_config::{PeerSection, Side, TunnelMode, TunnelSection};
use xpart_tunnel::keys::KeyError;
use xpart_tunnel::{PrivateKey, PublicKey};

use crate::auth::{Principal, DEFAULT_OPERATIONS};
use crate::balance::{Share, DEFAULT_PRIORITY, DEFAULT_WEIGHT};
use crate::budget::Budget;
use crate::dns::DnsSettings;
use crate::forward::ConnectionSettings;
use crate::front::FrontSettings;
use crate::health::HealthSettings;
use crate::limits::LimitSettings;

/// The agent's configuration as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub tunnel: TunnelSection,
    #[serde(rename = "relay", default)]
    pub relays: Vec<PeerSection>,
    pub dns: Option<DnsSection>,
    pub front: FrontSection,
    #[serde(rename = "principal", default)]
    pub principals: Vec<PrincipalSection>,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub health: HealthSection,
    /// Where the file was read from (for messages and relative paths).
    #[serde(skip)]
    pub file: PathBuf,
    /// What loads but should change (old field names), for the log and `--check`.
    #[serde(skip)]
    pub warnings: Vec<Problem>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    pub listen: SocketAddr,
    /// One address or several, all given in every answer.
    pub answer: OneOrMany<Ipv4Addr>,
    pub answer_v6: Option<OneOrMany<Ipv6Addr>>,
    #[serde(default)]
    pub names: Vec<String>,
    /// Regions whose Bedrock names are answered besides `names`: for each,
    /// `bedrock-runtime`, `bedrock` and their `-fips` forms (`<name>.<region>.amazonaws.com`).
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub upstream: Vec<SocketAddr>,
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// Clients whose other names are forwarded; absent: see [`AgentConfig::dns_allow_cidrs`].
    pub allow_cidrs: Option<Vec<IpNet>>,
}

/// A field that takes one value or a list of them: `answer = "10.0.1.10"` or
/// `answer = ["10.0.1.10", "10.0.2.10"]`.
#[derive(Debug, Clone, PartialEq)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{value::SeqAccessDeserializer, IntoDeserializer, SeqAccess, Visitor};

        struct OneOrList<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for OneOrList<T> {
            type Value = OneOrMany<T>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an address, or a list of addresses")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
                T::deserialize(value.into_deserializer()).map(OneOrMany::One)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::<T>::deserialize(SeqAccessDeserializer::new(seq)).map(OneOrMany::Many)
            }
        }

        deserializer.deserialize_any(OneOrList(std::marker::PhantomData))
    }
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(value) => vec![value.clone()],
            OneOrMany::Many(values) => values.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontSection {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(default = "default_handshake_timeout_secs")]
    pub handshake_timeout_secs: u64,
    #[serde(default = "default_first_request_timeout_secs")]
    pub first_request_timeout_secs: u64,
    #[serde(default = "default_front_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSection {
    pub name: String,
    pub token_sha256: Option<String>,
    #[serde(default)]
    pub source_cidrs: Vec<IpNet>,
    #[serde(default)]
    pub models: Vec<String>,
    /// Operation names; absent means [`crate::auth::DEFAULT_OPERATIONS`].
    pub operations: Option<Vec<String>>,
    pub requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub max_body_bytes: Option<u64>,
    /// Input + output tokens per UTC minute; absent is unlimited.
    pub tokens_per_minute: Option<u64>,
    /// Input + output tokens per UTC day; absent is unlimited.
    pub tokens_per_day: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// JSON lines file; absent disables the audit log.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_probe_timeout_ms")]
    pub probe_timeout_ms: u64,
    #[serde(default = "default_fail_after")]
    pub fail_after: u32,
    #[serde(default = "default_rise_after")]
    pub rise_after: u32,
    #[serde(
        default = "default_handshake_max_age_secs",
        alias = "handshake_max_age_s"
    )]
    pub handshake_max_age_secs: u64,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_ping_interval_ms")]
    pub ping_interval_ms: u64,
    #[serde(default = "default_ping_timeout_ms")]
    pub ping_timeout_ms: u64,
}

impl AgentConfig {
    /// Reads and validates `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<AgentConfig, Diagnostics> {
        let path = path.as_ref();
        let text = xpart_daemon::config::read_text(path)?;
        AgentConfig::parse(&text, path.to_owned())
    }

    /// Parses and validates `text`; relative paths resolve against the current directory
    /// and messages name `file_label`.
    pub fn from_toml_str(text: &str, file_label: &str) -> Result<AgentConfig, Diagnostics> {
        AgentConfig::parse(text, PathBuf::from(file_label))
    }

    fn parse(text: &str, file: PathBuf) -> Result<AgentConfig, Diagnostics> {
        let label = file.display().to_string();
        let renamed = xpart_daemon::config::renamed_fields(text, &label, RENAMED);
        if !renamed.is_empty() {
            return Err(renamed);
        }
        let with_renamed = |mut diagnostics: Diagnostics| {
            diagnostics.extend(renamed.clone());
            diagnostics
        };
        let mut config: AgentConfig =
            xpart_daemon::config::parse_toml(text, &label).map_err(with_renamed)?;
        config.file = file;
        config.validate().map_err(with_renamed)?;
        config.warnings = renamed.warnings().to_vec();
        Ok(config)
    }

    /// Checks everything that can be checked without binding sockets: values, key and
    /// certificate files, principals.
    pub fn validate(&self) -> Result<(), Diagnostics> {
        let sections = [
            AgentConfig::check_tunnel,
            AgentConfig::check_relays,
            AgentConfig::check_dns,
            AgentConfig::check_front,
            AgentConfig::check_principals,
            AgentConfig::check_health,
        ];
        let mut check = Checker::new(&self.file);
        for check_section in sections {
            check_section(self, &mut check);
        }
        check.finish()
    }

    /// A path from the file, relative to the file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        xpart_daemon::config::resolve_path(&self.file, path)
    }

    /// This side's WireGuard key; `None` when the file names none.
    pub fn private_key(&self) -> Option<Result<PrivateKey, KeyError>> {
        let path = self.tunnel.private_key_file.as_ref()?;
        Some(xpart_tunnel::keys::read_private_key_file(
            self.resolve(path),
        ))
    }

    pub fn principals(&self) -> Vec<Principal> {
        self.principals
            .iter()
            .map(|p| Principal {
                name: p.name.clone(),
                token_sha256: p.token_sha256.as_deref().and_then(decode_sha256),
                source_cidrs: p.source_cidrs.clone(),
                models: p.models.clone(),
                operations: p.operations(),
                limits: LimitSettings {
                    requests_per_second: p.requests_per_second,
                    burst: p
                        .burst
                        .unwrap_or_else(|| default_burst(p.requests_per_second)),
                    max_concurrent: p.max_concurrent,
                },
                max_body_bytes: p.max_body_bytes.unwrap_or(MAX_BODY_BYTES),
                budget: Budget {
                    tokens_per_minute: p.tokens_per_minute,
                    tokens_per_day: p.tokens_per_day,
                },
            })
            .collect()
    }

    pub fn dns_settings(&self) -> Option<DnsSettings> {
        let dns = self.dns.as_ref()?;
        let mut names = dns.names.clone();
        for region in &dns.regions {
            for name in xpart_bedrock::DialledName::all_for_region(region) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        Some(DnsSettings {
            listen: dns.listen,
            names,
            answer_v4: dns.answer.to_vec(),
            answer_v6: dns
                .answer_v6
                .as_ref()
                .map(OneOrMany::to_vec)
                .unwrap_or_default(),
            ttl: dns.ttl,
            upstream: dns.upstream.clone(),
            allow_cidrs: self.dns_allow_cidrs(),
        })
    }

    /// Who may have names other than the Bedrock names forwarded: `[dns] allow_cidrs` when
    /// set, else every principal's `source_cidrs`, else (no principal names a network) the
    /// loopback addresses only.
    pub fn dns_allow_cidrs(&self) -> Vec<IpNet> {
        if let Some(explicit) = self.dns.as_ref().and_then(|d| d.allow_cidrs.as_ref()) {
            return explicit.clone();
        }
        let mut union: Vec<IpNet> = Vec::new();
        for cidr in self.principals.iter().flat_map(|p| &p.source_cidrs) {
            if !union.contains(cidr) {
                union.push(*cidr);
            }
        }
        if union.is_empty() {
            union = LOOPBACK_CIDRS
                .iter()
                .map(|c| c.parse().expect("constant CIDR"))
                .collect();
        }
        union
    }

    pub fn health_settings(&self) -> HealthSettings {
        let h = &self.health;
        HealthSettings {
            interval: Duration::from_millis(h.interval_ms),
            probe_timeout: Duration::from_millis(h.probe_timeout_ms),
            fail_after: h.fail_after,
            rise_after: h.rise_after,
            handshake_max_age: Duration::from_secs(h.handshake_max_age_secs),
        }
    }

    pub fn front_settings(&self) -> FrontSettings {
        let f = &self.front;
        FrontSettings {
            handshake_timeout: Duration::from_secs(f.handshake_timeout_secs),
            first_request_timeout: Duration::from_secs(f.first_request_timeout_secs),
            idle_timeout: Duration::from_secs(f.idle_timeout_secs),
            max_connections: f.max_connections,
            max_connections_per_source: f.max_connections_per_source,
        }
    }

    /// How the relays' connections are opened and watched, from `[health]`.
    pub fn connection_settings(&self) -> ConnectionSettings {
        let h = &self.health;
        ConnectionSettings {
            connect_timeout: Duration::from_millis(h.connect_timeout_ms),
            ping_interval: Duration::from_millis(h.ping_interval_ms),
            ping_timeout: Duration::from_millis(h.ping_timeout_ms),
        }
    }

    /// Each relay's group and weight, in `[[relay]]` order.
    pub fn relay_shares(&self) -> Vec<Share> {
        self.relays
            .iter()
            .map(|relay| Share {
                priority: relay.priority.unwrap_or(DEFAULT_PRIORITY),
                weight: relay.weight.unwrap_or(DEFAULT_WEIGHT),
            })
            .collect()
    }

    fn check_tunnel(&self, check: &mut Checker) {
        if self.tunnel.mode == TunnelMode::Host {
            return;
        }
        let problem = match self.private_key() {
            None => Some("no private_key_file".to_owned()),
            Some(Err(error)) => Some(error.to_string()),
            Some(Ok(_)) => None,
        };
        if let Some(message) = problem {
            check.problem(
                "[tunnel].private_key_file",
                message,
                "write one with `xpart keygen` (the file must be mode 0600)",
            );
        }
        if self.tunnel.address.is_none() {
            check.problem(
                "[tunnel].address",
                "missing",
                "set this side's tunnel address with its prefix, e.g. \"100.64.0.1/30\"",
            );
        }
    }

    fn check_relays(&self, check: &mut Checker) {
        let mut list = check.list(
            "relay",
            self.relays.len(),
            "no relay configured",
            "add a [[relay]] with the relay's name, public_key, endpoint and tunnel_address",
        );
        for (i, relay) in self.relays.iter().enumerate() {
            let field = check.entry(&mut list, i, &relay.name);
            let wireguard = self.tunnel.mode != TunnelMode::Host;
            match &relay.public_key {
                Some(key) if PublicKey::from_base64(key).is_err() => check.problem(
                    field("public_key"),
                    format!("{key:?} is not a base64 WireGuard public key"),
                    "paste the relay's key as `xpart pubkey` (or `wg pubkey`) prints it",
                ),
                None if wireguard => check.problem(
                    field("public_key"),
                    "missing",
                    "paste the relay's key as `xpart pubkey` (or `wg pubkey`) prints it",
                ),
                _ => {}
            }
            if wireguard && relay.endpoint.is_none() {
                check.problem(
                    field("endpoint"),
                    "missing",
                    "set the relay's public UDP address, e.g. \"203.0.113.10:51820\"",
                );
            }
            if let Some(weight) = relay.weight {
                if !(1..=MAX_RELAY_WEIGHT).contains(&weight) {
                    check.problem(
                        field("weight"),
                        format!("{weight} is outside 1..={MAX_RELAY_WEIGHT}"),
                        "give each relay of a group a weight in proportion to what it can carry, or leave it out for 1",
                    );
                }
            }
            if Some(relay.tunnel_address) == self.tunnel.address.map(|a| a.addr()) {
                check.problem(
                    field("tunnel_address"),
                    "is the agent's own tunnel address",
                    "use the relay's address from its [tunnel].address",
                );
            }
        }
        xpart_daemon::tunnel_config::check(
            Side::Agent,
            &self.tunnel,
            &self.relays,
            |i, relay, f| format!("[[relay]] #{} ({}).{f}", i + 1, relay.name),
            |path| self.resolve(path),
            &mut check.diagnostics,
        );
    }

    fn check_dns(&self, check: &mut Checker) {
        let Some(dns) = &self.dns else {
            return;
        };
        if dns.names.is_empty() && dns.regions.is_empty() {
            check.problem(
                "[dns].names",
                "no names to answer",
                "list the regions callers use, e.g. regions = [\"us-east-1\"], or the Bedrock names, e.g. [\"bedrock-runtime.us-east-1.amazonaws.com\"]",
            );
        }
        for region in &dns.regions {
            if !xpart_bedrock::is_region_name(region) {
                check.problem(
                    "[dns].regions",
                    format!("{region:?} is not an AWS region name"),
                    "write region names such as \"us-east-1\" or \"us-gov-west-1\"",
                );
            }
        }
        for name in &dns.names {
            if hickory_proto::rr::Name::from_utf8(name).is_err() {
                check.problem(
                    "[dns].names",
                    format!("{name:?} is not a DNS name"),
                    "remove or correct it",
                );
            }
        }
        let v4 = dns.answer.to_vec().into_iter().map(IpAddr::V4);
        let v6 = dns
            .answer_v6
            .iter()
            .flat_map(OneOrMany::to_vec)
            .map(IpAddr::V6);
        for (field, address) in v4
            .map(|a| ("[dns].answer", a))
            .chain(v6.map(|a| ("[dns].answer_v6", a)))
        {
            if !crate::dns::is_usable_answer(address) {
                check.problem(
                    field,
                    format!("{address} cannot be an answer"),
                    "use the address callers reach the TLS front on",
                );
            }
        }
        if dns.answer.to_vec().is_empty() {
            check.problem(
                "[dns].answer",
                "an empty list",
                "list the addresses callers reach the TLS front on (every one is in each answer), e.g. [\"10.0.1.10\", \"10.0.2.10\"]",
            );
        }
        for (field, count) in [
            ("[dns].answer", dns.answer.to_vec().len()),
            (
                "[dns].answer_v6",
                dns.answer_v6.as_ref().map_or(0, |a| a.to_vec().len()),
            ),
        ] {
            if count > MAX_DNS_ANSWERS {
                check.problem(
                    field,
                    format!("{count} addresses; at most {MAX_DNS_ANSWERS} fit a classic 512-byte answer"),
                    "list one address per zone",
                );
            }
        }
    }

    fn check_front(&self, check: &mut Checker) {
        let cert = self.resolve(&self.front.cert_file);
        let key = self.resolve(&self.front.key_file);
        if let Err(error) = crate::tls::CertStore::load(&cert, &key) {
            let field = match &error {
                crate::error::StartError::Certificate { file, .. } if file == &key => {
                    "[front].key_file"
                }
                _ => "[front].cert_file",
            };
            check.problem(
                field,
                error.to_string(),
                "issue a certificate for the Bedrock names with `xpart ca issue` (the key file must be mode 0600)",
            );
        }
        let f = &self.front;
        for (name, value, max, fix) in [
            (
                "handshake_timeout_secs",
                f.handshake_timeout_secs,
                MAX_HANDSHAKE_TIMEOUT_SECS,
                "leave it out to use 10",
            ),
            (
                "first_request_timeout_secs",
                f.first_request_timeout_secs,
                MAX_FIRST_REQUEST_TIMEOUT_SECS,
                "leave it out to use 30",
            ),
            (
                "idle_timeout_secs",
                f.idle_timeout_secs,
                MAX_FRONT_IDLE_TIMEOUT_SECS,
                "leave it out to use 120",
            ),
        ] {
            if !(1..=max).contains(&value) {
                check.problem(
                    format!("[front].{name}"),
                    format!("{value} is outside 1..={max} seconds"),
                    fix,
                );
            }
        }
        if !(1..=MAX_CONNECTIONS).contains(&f.max_connections) {
            check.problem(
                "[front].max_connections",
                format!("{} is outside 1..={MAX_CONNECTIONS}", f.max_connections),
                "leave it out to use 10000 (and keep it below the process's open-file limit)",
            );
        }
        if f.max_connections_per_source == 0 || f.max_connections_per_source > f.max_connections {
            check.problem(
                "[front].max_connections_per_source",
                format!(
                    "{} is outside 1..={} ([front].max_connections)",
                    f.max_connections_per_source, f.max_connections
                ),
                "leave it out to use 1000, or set at most max_connections",
            );
        }
    }

    fn check_principals(&self, check: &mut Checker) {
        let mut list = check.list(
            "principal",
            self.principals.len(),
            "no principal configured, so every request would be refused",
            "add a [[principal]] with a token_sha256 from `xpart token new --principal NAME`, source_cidrs, or both",
        );
        let mut hashes = HashSet::new();
        for (i, p) in self.principals.iter().enumerate() {
            let field = check.entry(&mut list, i, &p.name);
            match p.token_sha256.as_deref() {
                Some(hex) if decode_sha256(hex).is_none() => check.problem(
                    field("token_sha256"),
                    "is not 64 hexadecimal characters (a SHA-256)",
                    "store the hash `xpart token new --principal NAME` prints, never the token itself",
                ),
                Some(hex) if !hashes.insert(hex.to_ascii_lowercase()) => check.problem(
                    field("token_sha256"),
                    "the same token hash is already used by another principal",
                    "issue each principal its own token",
                ),
                Some(_) => {}
                None if p.source_cidrs.is_empty() => check.problem(
                    field("token_sha256"),
                    "neither token_sha256 nor source_cidrs is set, so nobody can be this principal",
                    "set token_sha256, source_cidrs, or both",
                ),
                None => {}
            }
            check_operations(p, &field, check);
            let names_models = p.operations().into_iter().any(crate::auth::names_model);
            if p.models.is_empty() && names_models {
                check.problem(
                    field("models"),
                    "no models allowed",
                    "list model-id patterns, e.g. [\"anthropic.claude-*\"], or [\"*\"] for all",
                );
            }
            if let Some(rate) = p.requests_per_second {
                if !(MIN_REQUESTS_PER_SECOND..=MAX_REQUESTS_PER_SECOND).contains(&rate) {
                    check.problem(
                        field("requests_per_second"),
                        format!("{rate} is outside {MIN_REQUESTS_PER_SECOND}..={MAX_REQUESTS_PER_SECOND}"),
                        "use a number of requests per second in that range (0.001 is one request every 1000 s), or leave it out for no rate limit",
                    );
                }
            }
            for (name, budget) in [
                ("tokens_per_minute", p.tokens_per_minute),
                ("tokens_per_day", p.tokens_per_day),
            ] {
                if budget == Some(0) {
                    check.problem(
                        field(name),
                        "0 refuses every request",
                        "set the most input + output tokens the principal may use, or leave it out for no budget",
                    );
                }
            }
            if p.max_concurrent == Some(0) {
                check.problem(
                    field("max_concurrent"),
                    "0 refuses every request",
                    "leave it out for no limit",
                );
            }
            if let Some(bytes) = p.max_body_bytes {
                if bytes == 0 || bytes > MAX_BODY_BYTES {
                    check.problem(
                        field("max_body_bytes"),
                        format!("{bytes} is outside 1..={MAX_BODY_BYTES} (Bedrock's own limit)"),
                        "leave it out to use Bedrock's limit",
                    );
                }
            }
        }
    }

    fn check_health(&self, check: &mut Checker) {
        let h = &self.health;
        if h.interval_ms == 0
            || h.probe_timeout_ms == 0
            || h.connect_timeout_ms == 0
            || h.ping_interval_ms == 0
            || h.ping_timeout_ms == 0
        {
            check.problem(
                "[health]",
                "intervals and timeouts must be above 0 ms",
                "leave the section out to use the defaults",
            );
        }
        for (name, value, max) in [
            ("interval_ms", h.interval_ms, MAX_HEALTH_MS),
            ("probe_timeout_ms", h.probe_timeout_ms, MAX_HEALTH_MS),
            ("connect_timeout_ms", h.connect_timeout_ms, MAX_HEALTH_MS),
            ("ping_interval_ms", h.ping_interval_ms, MAX_HEALTH_MS),
            ("ping_timeout_ms", h.ping_timeout_ms, MAX_HEALTH_MS),
            (
                "handshake_max_age_secs",
                h.handshake_max_age_secs,
                MAX_HANDSHAKE_AGE_SECS,
            ),
        ] {
            if value > max {
                check.problem(
                    format!("[health].{name}"),
                    format!("{value} is above {max}"),
                    "leave it out to use the default",
                );
            }
        }
        if h.fail_after == 0 || h.rise_after == 0 {
            check.problem(
                "[health]",
                "fail_after and rise_after must be at least 1",
                "use 2 (the default)",
            );
        }
    }
}

/// Fields whose names changed; the old names load with a warning. Durations end in `_secs`
/// or `_ms`.
const RENAMED: &[Renamed] = &[Renamed {
    table: "health",
    old: "handshake_max_age_s",
    new: "handshake_max_age_secs",
}];

impl Warned for AgentConfig {
    fn warnings(&self) -> &[Problem] {
        &self.warnings
    }
}

/// Who gets forwarded DNS answers when no principal names a network.
const LOOPBACK_CIDRS: [&str; 2] = ["127.0.0.0/8", "::1/128"];

impl PrincipalSection {
    /// The operations this principal may call; names that are not operations are left out
    /// here and reported by validation.
    pub fn operations(&self) -> BTreeSet<Operation> {
        match &self.operations {
            None => DEFAULT_OPERATIONS.into_iter().collect(),
            Some(names) => names.iter().filter_map(|n| n.parse().ok()).collect(),
        }
    }
}

fn check_operations(p: &PrincipalSection, field: &dyn Fn(&str) -> String, check: &mut Checker) {
    let Some(names) = &p.operations else {
        return;
    };
    if names.is_empty() {
        check.problem(
            field("operations"),
            "empty, so every request would be refused",
            "leave it out for the invoke, converse and CountTokens operations, or list the operations this caller may call",
        );
    }
    for (j, name) in names.iter().enumerate() {
        if name.parse::<Operation>().is_err() {
            check.problem(
                field(&format!("operations[{j}]")),
                format!("{name:?} is not a Bedrock Runtime operation"),
                format!("use one of {}", Operation::all_names()),
            );
        }
    }
}

impl Default for AdminSection {
    fn default() -> AdminSection {
        AdminSection {
            listen: default_admin_listen(),
        }
    }
}

impl Default for HealthSection {
    fn default() -> HealthSection {
        HealthSection {
            interval_ms: default_interval_ms(),
            probe_timeout_ms: default_probe_timeout_ms(),
            fail_after: default_fail_after(),
            rise_after: default_rise_after(),
            handshake_max_age_secs: default_handshake_max_age_secs(),
            connect_timeout_ms: default_connect_timeout_ms(),
            ping_interval_ms: default_ping_interval_ms(),
            ping_timeout_ms: default_ping_timeout_ms(),
        }
    }
}

/// `requests_per_second` bounds: below one request in 1000 s a limit is a typo for a
/// refusal (use `models` for that); above a million it never applies.
const MIN_REQUESTS_PER_SECOND: f64 = 0.001;
const MAX_REQUESTS_PER_SECOND: f64 = 1_000_000.0;

/// `[health]` bounds: a relay probed less than hourly, or a tunnel handshake a day old, is
/// no health check at all.
const MAX_HEALTH_MS: u64 = 3_600_000;

/// A relay's weight beyond this is a typo: weights are proportions within a group.
const MAX_RELAY_WEIGHT: u32 = 1000;

/// A-records that fit a classic 512-byte UDP answer alongside a long Bedrock name; an
/// Availability Zone each is far fewer.
const MAX_DNS_ANSWERS: usize = 16;
const MAX_HANDSHAKE_AGE_SECS: u64 = 86_400;

/// Upper bounds of the `[front]` knobs: beyond them a value is a typo, not a choice.
const MAX_HANDSHAKE_TIMEOUT_SECS: u64 = 300;
const MAX_FIRST_REQUEST_TIMEOUT_SECS: u64 = 3_600;
const MAX_FRONT_IDLE_TIMEOUT_SECS: u64 = 86_400;
const MAX_CONNECTIONS: usize = 1_000_000;

/// Bedrock's own request body limit.
const MAX_BODY_BYTES: u64 = xpart_bedrock::MAX_BODY_BYTES as u64;

fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A bucket of one second's worth of requests (at least one) when no burst is given.
fn default_burst(rate: Option<f64>) -> u32 {
    rate.map_or(1, |r| r.ceil().clamp(1.0, f64::from(u32::MAX)) as u32)
}

fn default_handshake_timeout_secs() -> u64 {
    FrontSettings::default().handshake_timeout.as_secs()
}
fn default_first_request_timeout_secs() -> u64 {
    FrontSettings::default().first_request_timeout.as_secs()
}
fn default_front_idle_timeout_secs() -> u64 {
    FrontSettings::default().idle_timeout.as_secs()
}
fn default_max_connections() -> usize {
    FrontSettings::default().max_connections
}
fn default_max_connections_per_source() -> usize {
    FrontSettings::default().max_connections_per_source
}
fn default_ttl() -> u32 {
    60
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9100))
}
fn default_interval_ms() -> u64 {
    millis(HealthSettings::default().interval)
}
fn default_probe_timeout_ms() -> u64 {
    millis(HealthSettings::default().probe_timeout)
}
fn default_fail_after() -> u32 {
    HealthSettings::default().fail_after
}
fn default_rise_after() -> u32 {
    2
}
fn default_handshake_max_age_secs() -> u64 {
    180
}
fn default_connect_timeout_ms() -> u64 {
    millis(ConnectionSettings::default().connect_timeout)
}
fn default_ping_interval_ms() -> u64 {
    millis(ConnectionSettings::default().ping_interval)
}
fn default_ping_timeout_ms() -> u64 {
    millis(ConnectionSettings::default().ping_timeout)
}
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Collects problems against one file.
struct Checker {
    diagnostics: Diagnostics,
}

impl Checker {
    fn new(file: &Path) -> Checker {
        Checker {
            diagnostics: Diagnostics::new(file.display().to_string()),
        }
    }

    fn problem(
        &mut self,
        field: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.diagnostics.push(field, message, fix);
    }

    /// Starts checking a `[[table]]` list of `len` entries: a problem when it has none
    /// (`none`, fixed by `fix`).
    fn list<'a>(&mut self, table: &'static str, len: usize, none: &str, fix: &str) -> List<'a> {
        if len == 0 {
            self.problem(format!("[[{table}]]"), none, fix);
        }
        List {
            table,
            names: HashSet::new(),
        }
    }

    /// Starts checking entry `index` of `list`, called `name`: a problem when an earlier
    /// entry has that name. Returns how the entry's fields are named in problems,
    /// `[[relay]] #2 (relay-b).public_key`.
    fn entry<'a>(
        &mut self,
        list: &mut List<'a>,
        index: usize,
        name: &'a str,
    ) -> impl Fn(&str) -> String + 'a {
        let table = list.table;
        let field = move |f: &str| format!("[[{table}]] #{} ({name}).{f}", index + 1);
        if !list.names.insert(name) {
            self.problem(
                field("name"),
                format!("duplicate {table} name"),
                format!("give each {table} its own name"),
            );
        }
        field
    }

    fn finish(self) -> Result<(), Diagnostics> {
        self.diagnostics.into_result(())
    }
}

/// A `[[table]]` list being checked: the names its entries have taken so far.
struct List<'a> {
    table: &'static str,
    names: HashSet<&'a str>,
}
