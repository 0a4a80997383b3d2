//! Turn the agent's request into the one sent upstream: GovCloud model IDs mapped to the
//! Commercial partition by configured rules, the remembered inference profile for models that
//! refuse on-demand throughput, and only the headers Bedrock needs.

use std::collections::HashMap;
use std::sync::Mutex;

use http::{HeaderMap, HeaderName, StatusCode};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use xpart_daemon::bedrock::ModelId;

use crate::config::RewriteRule;
use crate::error::Error;

/// RFC 3986 unreserved characters stay; everything else in a model ID (`:` and `/` in ARNs)
/// is percent-encoded, as the AWS SDKs encode a path label.
const PATH_LABEL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Request headers passed upstream. Everything else, including the caller's `Authorization`,
/// every `X-Amz-*`, cookies, hop-by-hop headers and the agent's `x-xpart-*`, stays behind.
const FORWARDED_HEADERS: [&str; 4] = ["content-type", "accept", "content-encoding", "user-agent"];
const BEDROCK_HEADER_PREFIX: &str = "x-amzn-bedrock-";

/// Inference-profile prefixes AWS uses (shared/notes/bedrock-wire.md); a model that already
/// carries one is a profile and gets no second prefix.
const PROFILE_PREFIXES: [&str; 7] = ["us.", "eu.", "apac.", "global.", "us-gov.", "jp.", "au."];

pub struct Rewriter {
    rules: Vec<RewriteRule>,
    inference_profile_prefix: Option<String>,
    remembered: Mutex<HashMap<String, ModelId>>,
}

impl Rewriter {
    pub fn new(rules: Vec<RewriteRule>, inference_profile_prefix: Option<String>) -> Rewriter {
        Rewriter {
            rules,
            inference_profile_prefix,
            remembered: Mutex::new(HashMap::new()),
        }
    }

    /// The Commercial model ID for `model`, rewritten by the first matching rule.
    pub fn model(&self, model: &ModelId) -> Result<ModelId, Error> {
        let id = model.as_str();
        let rewritten = self.apply_rules(id);
        if looks_govcloud(&rewritten) {
            return Err(Error::NoRewriteRule {
                model: id.to_string(),
            });
        }
        Ok(ModelId::new(rewritten))
    }

    /// The model actually invoked: the inference profile remembered for `model`, or `model`.
    pub fn invoked(&self, model: &ModelId) -> ModelId {
        let Ok(map) = self.remembered.lock() else {
            return model.clone();
        };
        map.get(model.as_str())
            .cloned()
            .unwrap_or_else(|| model.clone())
    }

    /// The inference profile to retry with after an on-demand refusal, if one applies.
    pub fn profile_for(&self, model: &ModelId) -> Option<ModelId> {
        let prefix = self.inference_profile_prefix.as_deref()?;
        let id = model.as_str();
        if id.starts_with("arn:") || PROFILE_PREFIXES.iter().any(|p| id.starts_with(p)) {
            return None;
        }
        Some(ModelId::new(format!("{prefix}{id}")))
    }

    /// After a retry with `profile` succeeds, later requests for `model` go to it directly.
    pub fn remember(&self, model: &ModelId, profile: &ModelId) {
        if let Ok(mut map) = self.remembered.lock() {
            map.insert(model.as_str().to_string(), profile.clone());
        }
    }

    fn apply_rules(&self, id: &str) -> String {
        let mut out = id.to_string();
        for rule in &self.rules {
            if let Some(rest) = out.strip_prefix(&rule.from) {
                out = format!("{}{rest}", rule.to);
                break;
            }
        }
        if out.starts_with("arn:") {
            if let Some((head, resource)) = out.rsplit_once('/') {
                for rule in &self.rules {
                    if let Some(rest) = resource.strip_prefix(&rule.from) {
                        out = format!("{head}/{}{rest}", rule.to);
                        break;
                    }
                }
            }
        }
        out
    }
}

fn looks_govcloud(id: &str) -> bool {
    let resource = id.rsplit_once('/').map(|(_, r)| r).unwrap_or(id);
    id.starts_with("us-gov.")
        || id.starts_with("arn:aws-us-gov:")
        || resource.starts_with("us-gov.")
}

/// The path sent upstream. Unchanged models keep the path exactly as the caller's SDK encoded
/// it; a rewritten model replaces the `/model/{modelId}/` label.
pub fn upstream_path(original_path: &str, original: &ModelId, model: &ModelId) -> String {
    if original.as_str() == model.as_str() {
        return original_path.to_string();
    }
    let Some(rest) = original_path.strip_prefix("/model/") else {
        return original_path.to_string();
    };
    let suffix = rest.split_once('/').map(|(_, s)| s).unwrap_or("");
    format!(
        "/model/{}/{suffix}",
        utf8_percent_encode(model.as_str(), PATH_LABEL)
    )
}

/// Headers from the agent's request that go upstream (before signing adds its own).
pub fn forwarded_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in incoming {
        let keep = FORWARDED_HEADERS.contains(&name.as_str())
            || name.as_str().starts_with(BEDROCK_HEADER_PREFIX);
        if keep {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Bedrock's answer for a model that must be invoked through an inference profile:
/// 400 ValidationException "Invocation of model ID X with on-demand throughput isn’t supported…".
pub fn is_on_demand_refusal(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> bool {
    if status != StatusCode::BAD_REQUEST {
        return false;
    }
    let error_type = headers
        .get(HeaderName::from_static("x-amzn-errortype"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !error_type.starts_with("ValidationException") {
        return false;
    }
    let text = String::from_utf8_lossy(body);
    text.contains("on-demand throughput") && text.contains("inference profile")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn rewriter() -> Rewriter {
        Rewriter::new(
            vec![
                RewriteRule {
                    from: "arn:aws-us-gov:bedrock:us-gov-west-1:111122223333:".into(),
                    to: "arn:aws:bedrock:us-east-1:444455556666:".into(),
                },
                RewriteRule {
                    from: "us-gov.".into(),
                    to: "us.".into(),
                },
            ],
            Some("us.".into()),
        )
    }

    fn id(s: &str) -> ModelId {
        ModelId::new(s.to_string())
    }

    #[test]
    fn commercial_ids_pass_unchanged() {
        let r = rewriter();
        assert_eq!(
            r.model(&id("anthropic.claude-v2")).unwrap().as_str(),
            "anthropic.claude-v2"
        );
    }

    #[test]
    fn govcloud_profile_prefix_is_rewritten() {
        let m = rewriter()
            .model(&id("us-gov.anthropic.claude-3-5-sonnet-20240620-v1:0"))
            .unwrap();
        assert_eq!(m.as_str(), "us.anthropic.claude-3-5-sonnet-20240620-v1:0");
    }

    #[test]
    fn govcloud_arn_partition_and_resource_are_rewritten() {
        let m = rewriter()
            .model(&id(
                "arn:aws-us-gov:bedrock:us-gov-west-1:111122223333:inference-profile/us-gov.anthropic.claude-3-haiku",
            ))
            .unwrap();
        assert_eq!(
            m.as_str(),
            "arn:aws:bedrock:us-east-1:444455556666:inference-profile/us.anthropic.claude-3-haiku"
        );
    }

    #[test]
    fn govcloud_id_without_rule_is_refused_with_validation_error() {
        let r = Rewriter::new(vec![], None);
        let err = r.model(&id("us-gov.anthropic.claude-3-haiku")).unwrap_err();
        assert!(matches!(err, Error::NoRewriteRule { .. }));
        let bedrock = err.to_bedrock();
        assert_eq!(bedrock.kind.code(), "ValidationException");
        assert!(bedrock.message.contains("us-gov.anthropic.claude-3-haiku"));
        let err = r
            .model(&id(
                "arn:aws-us-gov:bedrock:us-gov-west-1:1:inference-profile/x",
            ))
            .unwrap_err();
        assert!(matches!(err, Error::NoRewriteRule { .. }));
    }

    #[test]
    fn profile_retry_is_offered_once_and_remembered() {
        let r = rewriter();
        let model = id("anthropic.claude-3-7-sonnet");
        let profile = r.profile_for(&model).unwrap();
        assert_eq!(profile.as_str(), "us.anthropic.claude-3-7-sonnet");
        assert!(
            r.profile_for(&profile).is_none(),
            "a profile is never prefixed twice"
        );
        assert!(r
            .profile_for(&id("arn:aws:bedrock:us-east-1:1:foundation-model/x"))
            .is_none());
        assert_eq!(r.invoked(&model).as_str(), "anthropic.claude-3-7-sonnet");
        r.remember(&model, &profile);
        assert_eq!(
            r.model(&model).unwrap().as_str(),
            "anthropic.claude-3-7-sonnet"
        );
        assert_eq!(r.invoked(&model).as_str(), "us.anthropic.claude-3-7-sonnet");
    }

    #[test]
    fn no_profile_without_configured_prefix() {
        assert!(Rewriter::new(vec![], None)
            .profile_for(&id("anthropic.x"))
            .is_none());
    }

    #[test]
    fn path_keeps_caller_encoding_unless_rewritten() {
        let original = id("anthropic.claude-v2:1");
        let path = "/model/anthropic.claude-v2%3A1/converse";
        assert_eq!(upstream_path(path, &original, &original), path);
        let path2 = upstream_path(path, &original, &id("us.anthropic.claude-v2:1"));
        assert_eq!(path2, "/model/us.anthropic.claude-v2%3A1/converse");
        let arn = id("arn:aws:bedrock:us-east-1:1:inference-profile/us.x");
        assert_eq!(
            upstream_path(path, &original, &arn),
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.x/converse"
        );
    }

    #[test]
    fn only_bedrock_headers_are_forwarded() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer secret"),
            ("x-amz-security-token", "tok"),
            ("x-amz-date", "20240101T000000Z"),
            ("x-amz-content-sha256", "abc"),
            ("cookie", "a=b"),
            ("connection", "keep-alive"),
            ("x-xpart-principal", "p"),
            ("content-type", "application/json"),
            ("accept", "application/json"),
            ("x-amzn-bedrock-trace", "ENABLED"),
            ("x-amzn-bedrock-guardrailidentifier", "g"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = forwarded_headers(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(out.len(), 4, "{names:?}");
        assert!(out.contains_key("content-type"));
        assert!(out.contains_key("x-amzn-bedrock-trace"));
        assert!(out.contains_key("x-amzn-bedrock-guardrailidentifier"));
        assert!(!out.contains_key("authorization"));
    }

    #[test]
    fn recognises_on_demand_refusal() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-amzn-errortype",
            HeaderValue::from_static(
                "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/",
            ),
        );
        let body = "{\"message\":\"Invocation of model ID anthropic.x with on-demand throughput isn\u{2019}t supported. Retry your request with the ID or ARN of an inference profile that contains this model.\"}";
        assert!(is_on_demand_refusal(
            StatusCode::BAD_REQUEST,
            &h,
            body.as_bytes()
        ));
        assert!(!is_on_demand_refusal(
            StatusCode::BAD_REQUEST,
            &h,
            b"{\"message\":\"bad input\"}"
        ));
        assert!(!is_on_demand_refusal(
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            body.as_bytes()
        ));
    }
}
