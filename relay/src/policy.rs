//! What the relay agrees to sign: requests from configured agents, for allowlisted operations
//! and models. Plain data in, a verdict out; no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use xpart_daemon::bedrock::{ModelId, Operation};

use crate::config::RelayConfig;
use crate::error::Error;

pub struct Policy {
    agents: BTreeMap<IpAddr, String>,
    operations: BTreeSet<Operation>,
    models: Vec<String>,
}

impl Policy {
    pub fn from_config(config: &RelayConfig) -> Policy {
        Policy::new(
            config
                .agents
                .iter()
                .map(|a| (a.tunnel_address, a.name.clone())),
            config.allowed_operations(),
            config.model_patterns(),
        )
    }

    pub fn new(
        agents: impl IntoIterator<Item = (IpAddr, String)>,
        operations: BTreeSet<Operation>,
        models: Vec<String>,
    ) -> Policy {
        Policy {
            agents: agents
                .into_iter()
                .map(|(ip, name)| (canonical(ip), name))
                .collect(),
            operations,
            models,
        }
    }

    /// The configured agent the connection comes from.
    pub fn admit_source(&self, peer: SocketAddr) -> Result<&str, Error> {
        match self.agents.get(&canonical(peer.ip())) {
            Some(name) => Ok(name),
            None => Err(Error::NotAnAgent { peer }),
        }
    }

    pub fn check_operation(&self, operation: Operation) -> Result<(), Error> {
        if !self.operations.contains(&operation) {
            return Err(Error::OperationNotAllowed {
                operation: operation.name().to_string(),
            });
        }
        Ok(())
    }

    /// Checked after rewriting, so the allowlist speaks of the model actually invoked.
    pub fn check_model(&self, model: &ModelId) -> Result<(), Error> {
        if !self.models.iter().any(|pattern| model.matches(pattern)) {
            return Err(Error::ModelNotAllowed {
                model: model.as_str().to_string(),
            });
        }
        Ok(())
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

    fn policy() -> Policy {
        Policy::new(
            [("100.64.0.1".parse().unwrap(), "agent-a".to_string())],
            [Operation::Converse, Operation::InvokeModel]
                .into_iter()
                .collect(),
            vec![
                "anthropic.claude-*".to_string(),
                "us.anthropic.*".to_string(),
            ],
        )
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
        assert!(matches!(err, Error::NotAnAgent { .. }));
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
    fn model_allowlist_uses_globs() {
        let p = policy();
        assert!(p
            .check_model(&ModelId::new("anthropic.claude-3-haiku-20240307-v1:0"))
            .is_ok());
        assert!(p
            .check_model(&ModelId::new("us.anthropic.claude-3-5-sonnet"))
            .is_ok());
        let err = p.check_model(&ModelId::new("meta.llama3")).unwrap_err();
        assert!(err.to_string().contains("meta.llama3"));
        assert_eq!(err.to_bedrock().kind.status().as_u16(), 403);
    }
}
