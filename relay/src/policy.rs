//! What the relay agrees to sign: requests from configured agents, for allowlisted operations,
//! models and guardrails, with cost- and policy-changing headers only at allowed values. Plain
//! data in, a verdict out; no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use xpart_bedrock::{glob_match, Guardrail, ModelId, Operation};

use crate::config::{PolicySection, RelayConfig};
use crate::error::RequestError;

pub struct Policy {
    agents: BTreeMap<IpAddr, String>,
    operations: BTreeSet<Operation>,
    models: Vec<String>,
    guardrails: Vec<String>,
    service_tiers: Vec<String>,
    performance_latency: Vec<String>,
    trace: Vec<String>,
}

/// A request header whose value changes what Bedrock charges or enforces, passed on only at
/// the values `[policy]` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatedHeader {
    ServiceTier,
    PerformanceLatency,
    Trace,
}

impl GatedHeader {
    pub const ALL: [GatedHeader; 3] = [
        GatedHeader::ServiceTier,
        GatedHeader::PerformanceLatency,
        GatedHeader::Trace,
    ];

    /// The header's name, lower-case as HTTP/2 carries it.
    pub fn header(self) -> &'static str {
        match self {
            GatedHeader::ServiceTier => "x-amzn-bedrock-service-tier",
            GatedHeader::PerformanceLatency => "x-amzn-bedrock-performanceconfig-latency",
            GatedHeader::Trace => "x-amzn-bedrock-trace",
        }
    }

    /// The `[policy]` field that lists its allowed values.
    pub fn field(self) -> &'static str {
        match self {
            GatedHeader::ServiceTier => "service_tiers",
            GatedHeader::PerformanceLatency => "performance_latency",
            GatedHeader::Trace => "trace",
        }
    }
}

impl Policy {
    pub fn from_config(config: &RelayConfig) -> Policy {
        Policy::new(
            config
                .agents
                .iter()
                .map(|a| (a.tunnel_address, a.name.clone())),
            &config.policy,
        )
    }

    /// `section` is expected to be validated; operation names that do not parse are left out.
    pub fn new(
        agents: impl IntoIterator<Item = (IpAddr, String)>,
        section: &PolicySection,
    ) -> Policy {
        Policy {
            agents: agents
                .into_iter()
                .map(|(ip, name)| (canonical(ip), name))
                .collect(),
            operations: section
                .operations
                .iter()
                .filter_map(|name| name.parse().ok())
                .collect(),
            models: section.models.clone(),
            guardrails: section.guardrails.clone(),
            service_tiers: section.service_tiers.clone(),
            performance_latency: section.performance_latency.clone(),
            trace: section.trace.clone(),
        }
    }

    /// The configured agent the connection comes from.
    pub fn admit_source(&self, peer: SocketAddr) -> Result<&str, RequestError> {
        match self.agents.get(&canonical(peer.ip())) {
            Some(name) => Ok(name),
            None => Err(RequestError::NotAnAgent { peer }),
        }
    }

    pub fn check_operation(&self, operation: Operation) -> Result<(), RequestError> {
        if !self.operations.contains(&operation) {
            return Err(RequestError::OperationNotAllowed {
                operation: operation.name().to_string(),
            });
        }
        Ok(())
    }

    /// Checked after rewriting, so the allowlist speaks of the model actually invoked. The
    /// answer is the pattern that matched: configuration text, fit for a metric label.
    pub fn check_model(&self, model: &ModelId) -> Result<&str, RequestError> {
        match self.models.iter().find(|pattern| model.matches(pattern)) {
            Some(pattern) => Ok(pattern),
            None => Err(RequestError::ModelNotAllowed {
                model: model.as_str().to_string(),
            }),
        }
    }

    /// A guardrail, named by ApplyGuardrail's path or by the guardrail headers, must match a
    /// `[policy] guardrails` pattern as `id:version`.
    pub fn check_guardrail(&self, guardrail: &Guardrail) -> Result<(), RequestError> {
        let qualified = guardrail.qualified();
        if !self
            .guardrails
            .iter()
            .any(|pattern| glob_match(pattern, &qualified))
        {
            return Err(RequestError::GuardrailNotAllowed {
                guardrail: qualified,
            });
        }
        Ok(())
    }

    pub fn check_header(&self, header: GatedHeader, value: &str) -> Result<(), RequestError> {
        if !self.allows(header, value) {
            return Err(RequestError::HeaderNotAllowed {
                header: header.header(),
                value: value.to_string(),
                field: header.field(),
            });
        }
        Ok(())
    }

    /// Whether `[policy]` lists `value` for what `setting` controls, whether the caller set
    /// it by header or in a Converse request's body.
    pub fn allows(&self, setting: GatedHeader, value: &str) -> bool {
        let allowed = match setting {
            GatedHeader::ServiceTier => &self.service_tiers,
            GatedHeader::PerformanceLatency => &self.performance_latency,
            GatedHeader::Trace => &self.trace,
        };
        allowed.iter().any(|v| v == value)
    }

    /// What `[policy]` allows and who may ask, for `/status` and the status page.
    pub fn summary(&self) -> serde_json::Value {
        let agents: Vec<serde_json::Value> = self
            .agents
            .iter()
            .map(|(address, name)| {
                serde_json::json!({ "name": name, "tunnel_address": address.to_string() })
            })
            .collect();
        let operations: Vec<&str> = self.operations.iter().map(|op| op.name()).collect();
        serde_json::json!({
            "agents": agents,
            "operations": operations,
            "models": self.models,
            "guardrails": self.guardrails,
            "service_tiers": self.service_tiers,
            "performance_latency": self.performance_latency,
            "trace": self.trace,
        })
    }
}

/// An IPv4 agent may arrive as an IPv4-mapped IPv6 address on a dual-stack listener.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        IpAddr::V4(v4) => IpAddr::V4(v4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn section(models: &[&str]) -> PolicySection {
        PolicySection {
            operations: vec!["Converse".into(), "InvokeModel".into()],
            models: models.iter().map(|m| m.to_string()).collect(),
            guardrails: vec!["gr-abc123:1".into(), "gr-any:*".into()],
            service_tiers: vec!["default".into(), "flex".into()],
            performance_latency: vec!["standard".into()],
            trace: vec!["DISABLED".into()],
        }
    }

    fn policy() -> Policy {
        Policy::new(
            [("100.64.0.1".parse().unwrap(), "agent-a".to_string())],
            &section(&["anthropic.claude-*", "us.anthropic.*"]),
        )
    }

    #[test]
    fn the_summary_lists_what_the_policy_allows() {
        use serde_json::json;
        let summary = policy().summary();
        let expected = [
            (
                "agents",
                json!([{"name": "agent-a", "tunnel_address": "100.64.0.1"}]),
            ),
            ("operations", json!(["InvokeModel", "Converse"])),
            ("models", json!(["anthropic.claude-*", "us.anthropic.*"])),
            ("guardrails", json!(["gr-abc123:1", "gr-any:*"])),
            ("service_tiers", json!(["default", "flex"])),
        ];
        for (field, value) in expected {
            assert_eq!(summary[field], value, "{field}");
        }
    }

    #[test]
    fn admits_configured_agent_including_ipv4_mapped_form() {
        let p = policy();
        assert_eq!(
            p.admit_source("100.64.0.1:4000".parse().unwrap()).unwrap(),
            "agent-a"
        );
        assert_eq!(
            p.admit_source("[::ffff:100.64.0.1]:4000".parse().unwrap())
                .unwrap(),
            "agent-a"
        );
    }

    #[test]
    fn refuses_other_sources() {
        let err = policy()
            .admit_source("100.64.0.3:4000".parse().unwrap())
            .unwrap_err();
        assert!(matches!(err, RequestError::NotAnAgent { .. }));
        assert_eq!(err.to_bedrock().kind.status().as_u16(), 403);
    }

    #[test]
    fn operation_allowlist() {
        let p = policy();
        assert!(p.check_operation(Operation::Converse).is_ok());
        let err = p.check_operation(Operation::ConverseStream).unwrap_err();
        assert!(err.to_string().contains("ConverseStream"));
        assert_eq!(err.to_bedrock().kind.code(), "AccessDeniedException");
    }

    #[test]
    fn model_allowlist_uses_globs_and_names_the_matching_pattern() {
        let p = policy();
        assert_eq!(
            p.check_model(&ModelId::new("anthropic.claude-3-haiku-20240307-v1:0"))
                .unwrap(),
            "anthropic.claude-*"
        );
        assert_eq!(
            p.check_model(&ModelId::new("us.anthropic.claude-3-5-sonnet"))
                .unwrap(),
            "us.anthropic.*"
        );
        let err = p.check_model(&ModelId::new("meta.llama3")).unwrap_err();
        assert!(err.to_string().contains("meta.llama3"));
        assert_eq!(err.to_bedrock().kind.status().as_u16(), 403);
    }

    #[test]
    fn guardrails_are_refused_unless_listed_as_id_and_version() {
        let p = policy();
        let guardrail = |id: &str, version: &str| Guardrail::parse(id, version).unwrap();
        assert!(p.check_guardrail(&guardrail("gr-abc123", "1")).is_ok());
        assert!(p.check_guardrail(&guardrail("gr-any", "DRAFT")).is_ok());
        for (id, version) in [
            ("gr-abc123", "2"),
            ("gr-abc123", "DRAFT"),
            ("gr-other", "1"),
        ] {
            let err = p.check_guardrail(&guardrail(id, version)).unwrap_err();
            let bedrock = err.to_bedrock();
            assert_eq!(bedrock.kind.code(), "AccessDeniedException");
            assert!(
                bedrock.message.contains(&format!("{id}:{version}")),
                "{}",
                bedrock.message
            );
        }
        let none = Policy::new(
            [],
            &PolicySection {
                guardrails: vec![],
                ..section(&["*"])
            },
        );
        assert!(none.check_guardrail(&guardrail("gr-abc123", "1")).is_err());
    }

    #[test]
    fn gated_headers_pass_only_listed_values() {
        let p = policy();
        assert!(p.check_header(GatedHeader::ServiceTier, "flex").is_ok());
        assert!(p.check_header(GatedHeader::Trace, "DISABLED").is_ok());
        for (header, value) in [
            (GatedHeader::ServiceTier, "priority"),
            (GatedHeader::PerformanceLatency, "optimized"),
            (GatedHeader::Trace, "ENABLED_FULL"),
        ] {
            let err = p.check_header(header, value).unwrap_err();
            let bedrock = err.to_bedrock();
            assert_eq!(bedrock.kind.code(), "AccessDeniedException");
            assert!(bedrock.message.contains(header.header()));
            assert!(bedrock.message.contains(header.field()));
        }
    }
}
