//! GovCloud model IDs mapped to the Commercial partition by configured rules, and the
//! remembered inference profile for models that refuse on-demand throughput. Every id this
//! module produces is held to Bedrock's model-id grammar again.

use std::collections::HashMap;
use std::sync::Mutex;

use http::{HeaderMap, HeaderName, StatusCode};
use xpart_bedrock::ModelId;

use crate::config::{RelayConfig, RewriteRule};
use crate::error::RequestError;

/// Inference-profile prefixes AWS uses; a model that already carries one is a profile and gets
/// no second prefix.
const PROFILE_PREFIXES: [&str; 7] = ["us.", "eu.", "apac.", "global.", "us-gov.", "jp.", "au."];

/// Models remembered as needing a profile, at most. Only ids that passed the policy and that
/// Bedrock then served through a profile get here, so real deployments stay far below it.
const MAX_REMEMBERED: usize = 4096;

pub struct Rewriter {
    rules: Vec<RewriteRule>,
    inference_profile_prefix: Option<String>,
    remembered: Mutex<HashMap<String, ModelId>>,
}

impl Rewriter {
    pub fn from_config(config: &RelayConfig) -> Rewriter {
        Rewriter::new(
            config.rewrite.rules.clone(),
            config.upstream.inference_profile_prefix.clone(),
        )
    }

    pub fn new(rules: Vec<RewriteRule>, inference_profile_prefix: Option<String>) -> Rewriter {
        Rewriter {
            rules,
            inference_profile_prefix,
            remembered: Mutex::new(HashMap::new()),
        }
    }

    /// The Commercial model ID for `model`, rewritten by the first matching rule.
    pub fn model(&self, model: &ModelId) -> Result<ModelId, RequestError> {
        let id = model.as_str();
        let rewritten = self.apply_rules(id);
        if looks_govcloud(&rewritten) {
            return Err(RequestError::NoRewriteRule {
                model: id.to_string(),
            });
        }
        ModelId::parse(&rewritten).map_err(|_| RequestError::BadRewrite {
            model: id.to_string(),
            rewritten,
        })
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
        ModelId::parse(&format!("{prefix}{id}")).ok()
    }

    /// After a retry with `profile` succeeds, later requests for `model` go to it directly.
    pub fn remember(&self, model: &ModelId, profile: &ModelId) {
        if let Ok(mut map) = self.remembered.lock() {
            if map.len() >= MAX_REMEMBERED && !map.contains_key(model.as_str()) {
                return;
            }
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
        ModelId::parse(s).unwrap()
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
        assert!(matches!(err, RequestError::NoRewriteRule { .. }));
        let bedrock = err.to_bedrock();
        assert_eq!(bedrock.kind.code(), "ValidationException");
        assert!(bedrock.message.contains("us-gov.anthropic.claude-3-haiku"));
        let err = r
            .model(&id(
                "arn:aws-us-gov:bedrock:us-gov-west-1:1:inference-profile/x",
            ))
            .unwrap_err();
        assert!(matches!(err, RequestError::NoRewriteRule { .. }));
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
    fn rewrites_that_leave_bedrocks_grammar_are_refused() {
        let r = Rewriter::new(
            vec![RewriteRule {
                from: "gov.".into(),
                to: "x/../".into(),
            }],
            None,
        );
        let err = r.model(&id("gov.anthropic.x")).unwrap_err();
        assert!(matches!(err, RequestError::BadRewrite { .. }));
        assert_eq!(err.to_bedrock().kind.code(), "ValidationException");
    }

    #[test]
    fn remembered_profiles_are_bounded() {
        let r = rewriter();
        for i in 0..MAX_REMEMBERED + 10 {
            let model = id(&format!("anthropic.m{i}"));
            r.remember(&model, &id(&format!("us.anthropic.m{i}")));
        }
        assert_eq!(r.remembered.lock().unwrap().len(), MAX_REMEMBERED);
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
