//! Who is calling, and may they call this model.
//!
//! A caller proves who it is with a bearer token (`Authorization: Bearer …`, which the AWS
//! SDKs send from `AWS_BEARER_TOKEN_BEDROCK`), with its source address, or with both,
//! depending on how its `[[principal]]` is configured. Tokens are never stored: the config
//! holds their SHA-256, and the presented token's hash is compared against every principal's
//! in constant time.
//!
//! A principal may then call the operations on its `operations` list (by default the invoke,
//! converse and token-counting operations and the model-discovery reads, see
//! [`DEFAULT_OPERATIONS`]) with the models on its `models` list. Operations without a model in
//! the path (ApplyGuardrail, the async-invoke family) are refused at the agent unless the
//! principal lists them; the list reads are granted as such, and their answers are filtered
//! to the principal's `models` ([`crate::discovery`]).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use xpart_bedrock::{glob_match, Operation};

use crate::limits::LimitSettings;

/// A configured caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    /// SHA-256 of the caller's token; `None` when the source address alone identifies it.
    pub token_sha256: Option<[u8; 32]>,
    /// Addresses the caller may come from; empty means any (only with a token).
    pub source_cidrs: Vec<IpNet>,
    /// Model-id globs (`anthropic.claude-*`, `*`).
    pub models: Vec<String>,
    /// Operations the caller may call.
    pub operations: BTreeSet<Operation>,
    pub limits: LimitSettings,
    pub max_body_bytes: u64,
    /// Token budgets (`tokens_per_minute`, `tokens_per_day`).
    pub budget: crate::budget::Budget,
}

/// Why a caller was turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    MissingCredentials,
    /// The caller signed with SigV4: its AWS credentials mean nothing here.
    SigV4NotAccepted,
    UnknownToken,
    SourceNotAllowed {
        principal: String,
        source: IpAddr,
    },
    ModelNotAllowed {
        principal: String,
        model: String,
    },
    OperationNotAllowed {
        principal: String,
        operation: Operation,
    },
}

/// What a principal may call when its `operations` is not set: generating text and counting
/// tokens, each with a model the `models` list allows, and discovering those models. Counting
/// tokens costs nothing at Bedrock and names its model like the others, so the model
/// allowlist governs it too; the discovery reads cost nothing, `Get…` names its model, and
/// list answers are filtered to the allowlist.
pub const DEFAULT_OPERATIONS: [Operation; 10] = [
    Operation::InvokeModel,
    Operation::InvokeModelWithResponseStream,
    Operation::Converse,
    Operation::ConverseStream,
    Operation::CountTokens,
    Operation::ListFoundationModels,
    Operation::GetFoundationModel,
    Operation::ListInferenceProfiles,
    Operation::GetInferenceProfile,
    Operation::GetFoundationModelAvailability,
];

/// Every configured principal, searched on each request.
#[derive(Debug, Default)]
pub struct Principals {
    list: Vec<Arc<Principal>>,
}

impl Principals {
    pub fn new(list: Vec<Principal>) -> Principals {
        Principals {
            list: list.into_iter().map(Arc::new).collect(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Principal>> {
        self.list.iter()
    }

    /// Finds the principal a request comes from.
    ///
    /// With a bearer token, the token decides and the source address must also be allowed
    /// when the principal lists CIDRs. Without one, only token-less principals whose CIDRs
    /// contain the source match; such callers may well sign with SigV4 (an SDK does so
    /// whenever it finds AWS credentials), and the signature is stripped before forwarding.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        source: IpAddr,
    ) -> Result<Arc<Principal>, Denial> {
        if let Some(token) = bearer_token(headers) {
            let principal = self.by_token(token).ok_or(Denial::UnknownToken)?;
            if !principal.source_cidrs.is_empty() && !source_in(&principal.source_cidrs, source) {
                return Err(Denial::SourceNotAllowed {
                    principal: principal.name.clone(),
                    source,
                });
            }
            return Ok(principal);
        }
        if let Some(principal) = self.by_source(source) {
            return Ok(principal);
        }
        if is_sigv4_signed(headers, query) {
            return Err(Denial::SigV4NotAccepted);
        }
        Err(Denial::MissingCredentials)
    }

    fn by_token(&self, token: &str) -> Option<Arc<Principal>> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare against every principal without stopping early, so timing does not
        // reveal which (or whether any) hash matched.
        let mut found = None;
        for principal in &self.list {
            if let Some(hash) = &principal.token_sha256 {
                if bool::from(hash.ct_eq(&presented)) {
                    found = Some(principal.clone());
                }
            }
        }
        found
    }

    fn by_source(&self, source: IpAddr) -> Option<Arc<Principal>> {
        self.list
            .iter()
            .find(|p| {
                p.token_sha256.is_none()
                    && !p.source_cidrs.is_empty()
                    && source_in(&p.source_cidrs, source)
            })
            .cloned()
    }
}

/// Whether `operation`'s path names a model (`/model/{modelId}/…`, or the model or profile a
/// discovery `Get…` reads), which `models` then governs.
pub fn names_model(operation: Operation) -> bool {
    match operation {
        Operation::InvokeModel => true,
        Operation::InvokeModelWithResponseStream => true,
        Operation::Converse => true,
        Operation::ConverseStream => true,
        Operation::CountTokens => true,
        Operation::InvokeModelWithBidirectionalStream => true,
        Operation::ApplyGuardrail => false,
        Operation::StartAsyncInvoke => false,
        Operation::ListAsyncInvokes => false,
        Operation::GetAsyncInvoke => false,
        Operation::ListFoundationModels => false,
        Operation::GetFoundationModel => true,
        Operation::ListInferenceProfiles => false,
        Operation::GetInferenceProfile => true,
        Operation::GetFoundationModelAvailability => true,
    }
}

/// What an authorized request was allowed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant<'a> {
    /// The first entry of the principal's `models` that matched the request's model.
    Model(&'a str),
    /// The operation names no model.
    NoModel,
}

impl Principal {
    /// Whether this principal may call `operation` on `model` (`None` for operations whose
    /// path names no model). On success, says which allowlist entry let the model through.
    pub fn authorize(
        &self,
        operation: Operation,
        model: Option<&str>,
    ) -> Result<Grant<'_>, Denial> {
        if !self.operations.contains(&operation) {
            return Err(Denial::OperationNotAllowed {
                principal: self.name.clone(),
                operation,
            });
        }
        let Some(model) = model else {
            return Ok(Grant::NoModel);
        };
        if let Some(glob) = self.models.iter().find(|glob| glob_match(glob, model)) {
            return Ok(Grant::Model(glob));
        }
        Err(Denial::ModelNotAllowed {
            principal: self.name.clone(),
            model: model.to_owned(),
        })
    }
}

/// SHA-256 of a token, as `[[principal]] token_sha256` holds it (lowercase hex).
pub fn token_sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

fn is_sigv4_signed(headers: &HeaderMap, query: Option<&str>) -> bool {
    let header_signed = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("AWS4-"));
    let query_signed = query.is_some_and(|q| {
        q.split('&').any(|pair| {
            pair.starts_with("X-Amz-Signature=") || pair.starts_with("X-Amz-Credential=")
        })
    });
    header_signed || query_signed
}

/// Whether `source` is inside one of `cidrs`.
pub(crate) fn source_in(cidrs: &[IpNet], source: IpAddr) -> bool {
    // A v4 caller reaching a dual-stack socket shows up as ::ffff:a.b.c.d.
    let source = match source {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(source, IpAddr::V4),
        IpAddr::V4(_) => source,
    };
    cidrs.iter().any(|net| net.contains(&source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn principal(name: &str, token: Option<&str>, cidrs: &[&str], models: &[&str]) -> Principal {
        Principal {
            name: name.into(),
            token_sha256: token.map(|t| Sha256::digest(t.as_bytes()).into()),
            source_cidrs: cidrs
                .iter()
                .map(|c| c.parse().expect("test cidr"))
                .collect(),
            models: models.iter().map(|m| m.to_string()).collect(),
            operations: DEFAULT_OPERATIONS.into_iter().collect(),
            limits: LimitSettings {
                requests_per_second: None,
                burst: 1,
                max_concurrent: None,
            },
            max_body_bytes: 1000,
            budget: crate::budget::Budget::default(),
        }
    }

    fn table() -> Principals {
        Principals::new(vec![
            principal("token-only", Some("tok-a"), &[], &["anthropic.claude-*"]),
            principal("token-and-cidr", Some("tok-b"), &["10.0.16.0/20"], &["*"]),
            principal("cidr-only", None, &["192.0.2.0/24"], &["amazon.nova-*"]),
        ])
    }

    fn bearer(token: &str) -> HeaderMap {
        authorization(&format!("Bearer {token}"))
    }

    /// Headers carrying only `Authorization: {value}`.
    fn authorization(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(value).expect("ascii"),
        );
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn token_identifies_principal_from_any_address() {
        let p = table()
            .authenticate(&bearer("tok-a"), None, ip("203.0.113.9"))
            .expect("known token");
        assert_eq!(p.name, "token-only");
    }

    #[test]
    fn token_with_cidrs_needs_both() {
        let t = table();
        let ok = t
            .authenticate(&bearer("tok-b"), None, ip("10.0.17.3"))
            .expect("inside the CIDR");
        assert_eq!(ok.name, "token-and-cidr");
        assert_eq!(
            t.authenticate(&bearer("tok-b"), None, ip("10.0.32.1"))
                .expect_err("outside the CIDR"),
            Denial::SourceNotAllowed {
                principal: "token-and-cidr".into(),
                source: ip("10.0.32.1")
            }
        );
    }

    #[test]
    fn wrong_token_is_refused_even_from_a_trusted_cidr() {
        assert_eq!(
            table()
                .authenticate(&bearer("nope"), None, ip("192.0.2.7"))
                .expect_err("unknown token"),
            Denial::UnknownToken
        );
    }

    #[test]
    fn source_address_alone_identifies_token_less_principal() {
        let p = table()
            .authenticate(&HeaderMap::new(), None, ip("192.0.2.7"))
            .expect("inside the CIDR");
        assert_eq!(p.name, "cidr-only");
        // v4-mapped v6 addresses count as their v4 address.
        let p = table()
            .authenticate(&HeaderMap::new(), None, ip("::ffff:192.0.2.7"))
            .expect("mapped address");
        assert_eq!(p.name, "cidr-only");
    }

    #[test]
    fn missing_credentials_and_sigv4_are_told_apart() {
        let t = table();
        assert_eq!(
            t.authenticate(&HeaderMap::new(), None, ip("198.51.100.1"))
                .expect_err("nothing presented"),
            Denial::MissingCredentials
        );
        let signed = authorization(
            "AWS4-HMAC-SHA256 Credential=AKIA/20260101/us-gov-west-1/bedrock/aws4_request, SignedHeaders=host, Signature=00",
        );
        assert_eq!(
            t.authenticate(&signed, None, ip("198.51.100.1"))
                .expect_err("sigv4"),
            Denial::SigV4NotAccepted
        );
        assert_eq!(
            t.authenticate(
                &HeaderMap::new(),
                Some("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=ab"),
                ip("198.51.100.1")
            )
            .expect_err("presigned"),
            Denial::SigV4NotAccepted
        );
    }

    #[test]
    fn sigv4_from_a_trusted_cidr_is_accepted_by_address() {
        let signed = authorization("AWS4-HMAC-SHA256 Credential=x");
        let p = table()
            .authenticate(&signed, None, ip("192.0.2.9"))
            .expect("address identifies");
        assert_eq!(p.name, "cidr-only");
    }

    #[test]
    fn empty_bearer_is_missing_credentials() {
        assert_eq!(
            table()
                .authenticate(&bearer(""), None, ip("198.51.100.1"))
                .expect_err("empty token"),
            Denial::MissingCredentials
        );
    }

    #[test]
    fn model_allowlist_globs_and_names_the_entry_that_matched() {
        let p = principal(
            "p",
            Some("t"),
            &[],
            &["anthropic.claude-*", "us.*-v1:0", "exact"],
        );
        let converse = |model| p.authorize(Operation::Converse, Some(model));
        assert_eq!(
            converse("anthropic.claude-3-haiku-20240307-v1:0"),
            Ok(Grant::Model("anthropic.claude-*"))
        );
        assert_eq!(
            converse("us.meta.llama3-v1:0"),
            Ok(Grant::Model("us.*-v1:0"))
        );
        assert_eq!(converse("exact"), Ok(Grant::Model("exact")));
        assert_eq!(
            converse("amazon.nova-pro-v1:0"),
            Err(Denial::ModelNotAllowed {
                principal: "p".into(),
                model: "amazon.nova-pro-v1:0".into()
            })
        );
        assert!(converse("exactly").is_err());
        assert!(converse("us.x-v1:0.extra").is_err());
    }

    #[test]
    fn operations_outside_the_default_list_are_refused_even_without_a_model() {
        let p = principal("echo-only", Some("t"), &[], &["xpart.echo"]);
        for operation in DEFAULT_OPERATIONS {
            assert!(
                p.authorize(operation, Some("xpart.echo")).is_ok(),
                "{operation}"
            );
        }
        for operation in [
            Operation::ApplyGuardrail,
            Operation::ListAsyncInvokes,
            Operation::GetAsyncInvoke,
            Operation::StartAsyncInvoke,
            Operation::InvokeModelWithBidirectionalStream,
        ] {
            assert_eq!(
                p.authorize(operation, None),
                Err(Denial::OperationNotAllowed {
                    principal: "echo-only".into(),
                    operation
                })
            );
        }
    }

    #[test]
    fn a_listed_operation_without_a_model_is_granted_as_such() {
        let mut p = principal("guard", Some("t"), &[], &[]);
        p.operations = [Operation::ApplyGuardrail].into_iter().collect();
        assert_eq!(
            p.authorize(Operation::ApplyGuardrail, None),
            Ok(Grant::NoModel)
        );
        assert!(p.authorize(Operation::Converse, Some("x")).is_err());
    }

    #[test]
    fn token_hash_is_lowercase_hex() {
        assert_eq!(
            token_sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
