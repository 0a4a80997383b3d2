//! GovCloud model IDs mapped to the Commercial partition by configured rules, and the
//! remembered inference profile for models that refuse on-demand throughput. Every id this
//! module produces is held to Bedrock's model-id grammar again.

use std::collections::{BTreeMap, HashMap};
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
    /// The retry's prefix in each configured region (`None`: no retry there).
    region_prefixes: BTreeMap<String, Option<String>>,
    /// The prefix for a region not in `region_prefixes`.
    inference_profile_prefix: Option<String>,
    /// Keyed by region and model: a profile learnt in one region means nothing in another.
    remembered: Mutex<HashMap<(String, String), ModelId>>,
}

impl Rewriter {
    /// The rules, and each Bedrock Runtime upstream's prefix (configured, or its region's
    /// geography's: [`crate::config::default_profile_prefix`]).
    pub fn from_config(config: &RelayConfig) -> Rewriter {
        let mut rewriter = Rewriter::new(config.rewrite.rules.clone(), None);
        rewriter.region_prefixes = config.profile_prefixes();
        rewriter
    }

    /// `inference_profile_prefix` applies in every region.
    pub fn new(rules: Vec<RewriteRule>, inference_profile_prefix: Option<String>) -> Rewriter {
        Rewriter {
            rules,
            region_prefixes: BTreeMap::new(),
            inference_profile_prefix,
            remembered: Mutex::new(HashMap::new()),
        }
    }

    /// The prefix the retry uses in `region`.
    pub fn prefix_in(&self, region: &str) -> Option<&str> {
        match self.region_prefixes.get(region) {
            Some(prefix) => prefix.as_deref(),
            None => self.inference_profile_prefix.as_deref(),
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

    /// The model actually invoked in `region`: the inference profile remembered for `model`
    /// there, or `model`.
    pub fn invoked(&self, model: &ModelId, region: &str) -> ModelId {
        let Ok(map) = self.remembered.lock() else {
            return model.clone();
        };
        map.get(&(region.to_string(), model.as_str().to_string()))
            .cloned()
            .unwrap_or_else(|| model.clone())
    }

    /// The inference profile to retry with in `region` after an on-demand refusal, if one
    /// applies.
    pub fn profile_for(&self, model: &ModelId, region: &str) -> Option<ModelId> {
        let prefix = self.prefix_in(region)?;
        let id = model.as_str();
        if id.starts_with("arn:") || PROFILE_PREFIXES.iter().any(|p| id.starts_with(p)) {
            return None;
        }
        ModelId::parse(&format!("{prefix}{id}")).ok()
    }

    /// After a retry with `profile` succeeds, later requests for `model` in `region` go to it
    /// directly.
    pub fn remember(&self, model: &ModelId, profile: &ModelId, region: &str) {
        let key = (region.to_string(), model.as_str().to_string());
        if let Ok(mut map) = self.remembered.lock() {
            if map.len() >= MAX_REMEMBERED && !map.contains_key(&key) {
                return;
            }
            map.insert(key, profile.clone());
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
        let profile = r.profile_for(&model, "us-east-1").unwrap();
        assert_eq!(profile.as_str(), "us.anthropic.claude-3-7-sonnet");
        assert!(
            r.profile_for(&profile, "us-east-1").is_none(),
            "a profile is never prefixed twice"
        );
        assert!(r
            .profile_for(
                &id("arn:aws:bedrock:us-east-1:1:foundation-model/x"),
                "us-east-1"
            )
            .is_none());
        assert_eq!(
            r.invoked(&model, "us-east-1").as_str(),
            "anthropic.claude-3-7-sonnet"
        );
        r.remember(&model, &profile, "us-east-1");
        assert_eq!(
            r.model(&model).unwrap().as_str(),
            "anthropic.claude-3-7-sonnet"
        );
        assert_eq!(
            r.invoked(&model, "us-east-1").as_str(),
            "us.anthropic.claude-3-7-sonnet"
        );
        assert_eq!(
            r.invoked(&model, "us-west-2").as_str(),
            "anthropic.claude-3-7-sonnet",
            "a profile is remembered for the region it was learnt in"
        );
    }

    #[test]
    fn no_profile_without_configured_prefix() {
        assert!(Rewriter::new(vec![], None)
            .profile_for(&id("anthropic.x"), "us-east-1")
            .is_none());
    }

    #[test]
    fn each_region_retries_with_its_own_geography_by_default() {
        let text = |extra: &str| {
            format!(
                "[tunnel]\nmode = \"host\"\n[[agent]]\nname = \"a\"\ntunnel_address = \"127.0.0.1\"\n\
                 [service]\nlisten = \"127.0.0.1:0\"\n\
                 [[upstream]]\nregion = \"us-east-1\"\nendpoint = \"https://a.example\"\n{extra}\
                 [[upstream]]\nregion = \"eu-west-1\"\nendpoint = \"https://b.example\"\n\
                 [[upstream]]\nregion = \"ap-northeast-1\"\nendpoint = \"https://c.example\"\n\
                 inference_profile_prefix = \"none\"\n\
                 [[upstream]]\nregion = \"me-central-1\"\nendpoint = \"https://d.example\"\n\
                 [policy]\noperations = [\"Converse\"]\nmodels = [\"*\"]\n"
            )
        };
        let config = RelayConfig::from_toml_str(&text(""), "relay.toml").unwrap();
        let r = Rewriter::from_config(&config);
        let model = id("anthropic.x");
        let in_region = |region| r.profile_for(&model, region).map(|p| p.to_string());
        assert_eq!(in_region("us-east-1").as_deref(), Some("us.anthropic.x"));
        assert_eq!(in_region("eu-west-1").as_deref(), Some("eu.anthropic.x"));
        assert_eq!(in_region("ap-northeast-1"), None, "\"none\" turns it off");
        assert_eq!(
            in_region("me-central-1"),
            None,
            "no geography profile known"
        );
        let configured = text("inference_profile_prefix = \"global.\"\n");
        let config = RelayConfig::from_toml_str(&configured, "relay.toml").unwrap();
        let r = Rewriter::from_config(&config);
        assert_eq!(
            r.profile_for(&model, "us-east-1")
                .map(|p| p.to_string())
                .as_deref(),
            Some("global.anthropic.x")
        );
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
            r.remember(&model, &id(&format!("us.anthropic.m{i}")), "us-east-1");
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
