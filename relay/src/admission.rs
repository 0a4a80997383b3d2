//! Admission: everything the relay decides about a request before it reads the body, as one
//! pure function ([`admit`]) of the method, the path and query, the headers and the rules in
//! force. It recognises the operation, holds the model id (or guardrail) to Bedrock's grammar,
//! applies the `[policy]` allowlists and the GovCloud `[rewrite]` rules, and builds the path,
//! query and headers that may be signed: the path from the validated ids (never the caller's
//! bytes), no query parameter the operation does not define, and only the headers listed in
//! [`FORWARDED_HEADERS`] plus the policy-gated Bedrock headers at allowed values.
//!
//! The agent says which Bedrock service the caller dialled (`x-xpart-service`, with region and
//! FIPS: [`Destination`]); an operation of the other service is no operation here (404). On
//! the `bedrock` control plane only the discovery reads exist ([`Operation::DISCOVERY`]): a
//! write, whatever its path, method or query, never gets past [`Route::parse`].
//!
//! The service pipeline calls [`admit`] for every request (after checking the source address),
//! and the fuzz targets call it directly.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use xpart_bedrock::protocol::Destination;
use xpart_bedrock::{BedrockError, ErrorType, Guardrail, ModelId, Operation, Route, Service};

pub use crate::error::RequestError;
pub use crate::policy::{GatedHeader, Policy};
pub use crate::rewrite::Rewriter;

/// Request headers passed upstream at any value: what the Bedrock Runtime operations define
/// that does not change cost or policy (`Content-Type`, `Accept`, `X-Amzn-Bedrock-Accept`),
/// and `User-Agent`, which SigV4 leaves unsigned. The cost- and policy-changing Bedrock
/// headers ([`GatedHeader`], and the guardrail pair) pass only at values `[policy]` allows;
/// every other header, `x-amzn-bedrock-*` included, stays behind.
pub const FORWARDED_HEADERS: [&str; 4] = [
    "content-type",
    "accept",
    "x-amzn-bedrock-accept",
    "user-agent",
];

pub const GUARDRAIL_ID_HEADER: &str = "x-amzn-bedrock-guardrailidentifier";
pub const GUARDRAIL_VERSION_HEADER: &str = "x-amzn-bedrock-guardrailversion";

/// The rules a request is admitted by; the relay's live configuration, borrowed.
pub struct Rules<'a> {
    pub policy: &'a Policy,
    pub rewriter: &'a Rewriter,
    /// The synthetic model the relay answers itself (`[echo] model`), when enabled.
    pub echo_model: Option<&'a str>,
}

/// A request the relay may sign, and what to sign.
#[derive(Debug)]
pub struct Admitted {
    pub route: Route,
    /// Which upstream the caller meant: service, region, FIPS.
    pub destination: Destination,
    pub target: Target,
    /// The path and query to send, built from validated values.
    pub path_and_query: String,
    /// The headers to send (before signing adds its own).
    pub headers: HeaderMap,
}

/// What the request invokes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The echo model: answered by the relay, nothing signed.
    Echo,
    /// A model, as requested and as rewritten for the Commercial partition (what the policy
    /// allowed); `pattern` is the `[policy] models` entry that matched.
    Model {
        requested: ModelId,
        commercial: ModelId,
        pattern: String,
    },
    /// An operation that names no model (ApplyGuardrail).
    NoModel,
}

/// A refused request, with as much as was learnt about it for the audit line.
#[derive(Debug)]
pub struct Rejected {
    pub error: RequestError,
    pub operation: Option<Operation>,
    pub model: Option<ModelId>,
}

/// Decide whether the relay signs this request, and what exactly it signs.
pub fn admit(
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    rules: &Rules<'_>,
) -> Result<Admitted, Rejected> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let route = Route::parse(method, path).map_err(|err| Rejected {
        error: RequestError::Route(match err.kind {
            ErrorType::UnknownOperation if on_control_plane(headers) => {
                not_a_discovery_read(method, path)
            }
            _ => err,
        }),
        operation: None,
        model: None,
    })?;
    let reject = |error: RequestError| Rejected {
        error,
        operation: Some(route.operation),
        model: route.model.clone(),
    };
    let destination = Destination::from_headers(headers)
        .map_err(RequestError::Route)
        .map_err(reject)?;
    if route.operation.service() != destination.service {
        let refusal = match destination.service {
            Service::Bedrock => not_a_discovery_read(method, path),
            Service::BedrockRuntime => other_service(method, path, destination.service),
        };
        return Err(reject(RequestError::Route(refusal)));
    }
    rules
        .policy
        .check_operation(route.operation)
        .map_err(reject)?;
    let target = target(&route, rules).map_err(reject)?;
    if target == Target::Echo {
        return Ok(Admitted {
            route,
            destination,
            target,
            path_and_query: String::new(),
            headers: HeaderMap::new(),
        });
    }
    if let Some(guardrail) = &route.guardrail {
        rules.policy.check_guardrail(guardrail).map_err(reject)?;
    }
    let forwarded = match destination.service {
        Service::BedrockRuntime => forwarded_headers(headers, rules.policy).map_err(reject)?,
        Service::Bedrock => plain_headers(headers),
    };
    let path = match &target {
        Target::Model { commercial, .. } => route.path_with_model(commercial),
        Target::Echo => route.path(),
        Target::NoModel => route.path(),
    };
    let Some(path) = path else {
        return Err(reject(RequestError::OperationNotAllowed {
            operation: route.operation.name().to_string(),
        }));
    };
    let query = defined_query(route.operation, query);
    let path_and_query = if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    };
    Ok(Admitted {
        route,
        destination,
        target,
        path_and_query,
        headers: forwarded,
    })
}

/// Whether the agent says the caller dialled the `bedrock` control plane.
fn on_control_plane(headers: &HeaderMap) -> bool {
    Destination::from_headers(headers).is_ok_and(|to| to.service == Service::Bedrock)
}

/// Anything on the control plane but the discovery reads: 403, naming what is carried.
fn not_a_discovery_read(method: &Method, path: &str) -> BedrockError {
    let shown: String = path.chars().take(200).collect();
    let reads: Vec<&str> = Operation::DISCOVERY.iter().map(|op| op.name()).collect();
    BedrockError::access_denied(format!(
        "{method} {shown} is not signed: on the bedrock control plane this relay signs only the \
         discovery reads ({})",
        reads.join(", ")
    ))
}

/// An operation that exists, asked of the other service's endpoint: as unknown there as any
/// other path (404 UnknownOperationException).
fn other_service(method: &Method, path: &str, service: Service) -> BedrockError {
    let shown: String = path.chars().take(200).collect();
    BedrockError::new(
        ErrorType::UnknownOperation,
        format!("no {service} operation matches {method} {shown}"),
    )
}

/// The headers a control-plane read sends: [`FORWARDED_HEADERS`] as sent, and nothing gated
/// (the runtime's cost and guardrail headers mean nothing to a read).
fn plain_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in FORWARDED_HEADERS {
        for value in incoming.get_all(name) {
            out.append(HeaderName::from_static(name), value.clone());
        }
    }
    out
}

/// The echo model, or the requested model rewritten and checked against `[policy] models`.
fn target(route: &Route, rules: &Rules<'_>) -> Result<Target, RequestError> {
    let Some(requested) = &route.model else {
        return Ok(Target::NoModel);
    };
    let echo = rules
        .echo_model
        .and_then(|echo| crate::echo::which(echo, requested.as_str()));
    if echo.is_some() {
        return Ok(Target::Echo);
    }
    let commercial = rules.rewriter.model(requested)?;
    let pattern = rules.policy.check_model(&commercial)?.to_string();
    Ok(Target::Model {
        requested: requested.clone(),
        commercial,
        pattern,
    })
}

/// The headers that go upstream: [`FORWARDED_HEADERS`] as sent, each [`GatedHeader`] when
/// its value is allowed, the guardrail pair when `id:version` is allowed. A gated header at
/// a value `[policy]` does not list refuses the request (403) rather than being dropped: the
/// caller asked for a tier, latency or guardrail and would otherwise silently not get it.
fn forwarded_headers(incoming: &HeaderMap, policy: &Policy) -> Result<HeaderMap, RequestError> {
    let mut out = HeaderMap::new();
    for name in FORWARDED_HEADERS {
        for value in incoming.get_all(name) {
            out.append(HeaderName::from_static(name), value.clone());
        }
    }
    for gated in GatedHeader::ALL {
        let Some(value) = single_value(incoming, gated.header())? else {
            continue;
        };
        policy.check_header(gated, value)?;
        out.insert(HeaderName::from_static(gated.header()), header_value(value));
    }
    let identifier = single_value(incoming, GUARDRAIL_ID_HEADER)?;
    let version = single_value(incoming, GUARDRAIL_VERSION_HEADER)?;
    match (identifier, version) {
        (None, None) => {}
        (Some(identifier), Some(version)) => {
            let guardrail = Guardrail::parse(identifier, version).map_err(RequestError::Route)?;
            policy.check_guardrail(&guardrail)?;
            out.insert(
                HeaderName::from_static(GUARDRAIL_ID_HEADER),
                header_value(identifier),
            );
            out.insert(
                HeaderName::from_static(GUARDRAIL_VERSION_HEADER),
                header_value(version),
            );
        }
        (Some(_), None) => {
            return Err(RequestError::InvalidHeader {
                header: GUARDRAIL_ID_HEADER.to_string(),
                reason: format!("needs {GUARDRAIL_VERSION_HEADER} as well"),
            })
        }
        (None, Some(_)) => {
            return Err(RequestError::InvalidHeader {
                header: GUARDRAIL_VERSION_HEADER.to_string(),
                reason: format!("needs {GUARDRAIL_ID_HEADER} as well"),
            })
        }
    }
    Ok(out)
}

/// The one value of a header that must not repeat, as text.
fn single_value<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, RequestError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(RequestError::InvalidHeader {
            header: name.to_string(),
            reason: "sent more than once".to_string(),
        });
    }
    match value.to_str() {
        Ok(text) => Ok(Some(text)),
        Err(_) => Err(RequestError::InvalidHeader {
            header: name.to_string(),
            reason: "not visible ASCII text".to_string(),
        }),
    }
}

fn header_value(checked: &str) -> HeaderValue {
    // `checked` came from a HeaderValue's to_str(), so it is a valid header value; the
    // fallback is never taken.
    HeaderValue::from_str(checked).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Characters kept as they are in a re-encoded query name or value (RFC 3986 unreserved).
const QUERY_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The query parameters `operation` defines, each decoded once and re-encoded; the rest are
/// dropped. The operations the relay signs define none, so their query is always empty.
fn defined_query(operation: Operation, query: Option<&str>) -> String {
    let defined = operation.query_parameters();
    let Some(query) = query else {
        return String::new();
    };
    if defined.is_empty() {
        return String::new();
    }
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (Ok(name), Ok(value)) = (
            percent_decode_str(name).decode_utf8(),
            percent_decode_str(value).decode_utf8(),
        ) else {
            continue;
        };
        if defined.contains(&name.as_ref()) {
            kept.push(format!(
                "{}={}",
                utf8_percent_encode(&name, QUERY_COMPONENT),
                utf8_percent_encode(&value, QUERY_COMPONENT)
            ));
        }
    }
    kept.join("&")
}

/// The second half of admission, once the body is read: Converse and ConverseStream carry
/// the same cost- and policy-changing settings as the gated headers in their JSON body
/// (`guardrailConfig`, `performanceConfig`, `serviceTier`); they pass only at values
/// `[policy]` allows. Duplicate keys are refused, so Bedrock cannot read a different value
/// from the one checked here. Other operations' bodies are the model's own format and carry
/// none of these.
pub fn check_body(operation: Operation, body: &[u8], policy: &Policy) -> Result<(), RequestError> {
    match operation {
        Operation::Converse | Operation::ConverseStream => {}
        _ => return Ok(()),
    }
    let controls: ConverseControls = serde_json::from_slice(body)
        .map_err(|err| RequestError::InvalidBody(format!("not a valid Converse request: {err}")))?;
    if let Some(guardrail) = controls.guardrail_config {
        let (Some(identifier), Some(version)) =
            (guardrail.guardrail_identifier, guardrail.guardrail_version)
        else {
            return Err(RequestError::InvalidBody(
                "guardrailConfig needs guardrailIdentifier and guardrailVersion".into(),
            ));
        };
        let guardrail_id = Guardrail::parse(&identifier, &version).map_err(RequestError::Route)?;
        policy.check_guardrail(&guardrail_id)?;
        if let Some(trace) = guardrail.trace {
            // The body spells the trace setting in lower case, the header in upper case;
            // `[policy] trace` lists the header's spelling.
            let as_header = trace.to_ascii_uppercase();
            gate_body_field(
                policy,
                GatedHeader::Trace,
                "guardrailConfig.trace",
                &trace,
                &as_header,
            )?;
        }
    }
    let spelled_as_the_header = [
        (
            GatedHeader::PerformanceLatency,
            "performanceConfig.latency",
            controls.performance_config.and_then(|p| p.latency),
        ),
        (
            GatedHeader::ServiceTier,
            "serviceTier.type",
            controls.service_tier.and_then(|t| t.tier),
        ),
    ];
    for (setting, field, value) in spelled_as_the_header {
        if let Some(value) = value {
            gate_body_field(policy, setting, field, &value, &value)?;
        }
    }
    Ok(())
}

/// Refuses the body's `field`, set to `value`, unless `[policy]` allows `as_header` (the value
/// in the header's spelling) for `setting`.
fn gate_body_field(
    policy: &Policy,
    setting: GatedHeader,
    field: &'static str,
    value: &str,
    as_header: &str,
) -> Result<(), RequestError> {
    if policy.allows(setting, as_header) {
        return Ok(());
    }
    Err(RequestError::BodyFieldNotAllowed {
        field,
        value: value.to_owned(),
        policy_field: setting.field(),
    })
}

/// The members of a Converse request that the policy governs; the rest is Bedrock's to
/// validate. Derived structs refuse a duplicated member, which is the point.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConverseControls {
    guardrail_config: Option<GuardrailControls>,
    performance_config: Option<PerformanceControls>,
    service_tier: Option<ServiceTierControls>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct GuardrailControls {
    guardrail_identifier: Option<String>,
    guardrail_version: Option<String>,
    trace: Option<String>,
}

#[derive(serde::Deserialize)]
struct PerformanceControls {
    latency: Option<String>,
}

#[derive(serde::Deserialize)]
struct ServiceTierControls {
    #[serde(rename = "type")]
    tier: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PolicySection, RewriteRule};

    fn policy(models: &[&str]) -> Policy {
        Policy::new(
            [],
            &section(&["Converse", "InvokeModel", "ApplyGuardrail"], models),
        )
    }

    fn section(operations: &[&str], models: &[&str]) -> PolicySection {
        let owned = |names: &[&str]| names.iter().map(|name| name.to_string()).collect();
        PolicySection {
            operations: owned(operations),
            models: owned(models),
            guardrails: vec!["gr-abc123:1".into()],
            service_tiers: vec!["default".into()],
            performance_latency: vec!["standard".into()],
            trace: vec!["DISABLED".into(), "ENABLED".into()],
        }
    }

    fn rewriter() -> Rewriter {
        Rewriter::new(
            vec![RewriteRule {
                from: "us-gov.".into(),
                to: "us.".into(),
            }],
            Some("us.".into()),
        )
    }

    fn admit_with(
        models: &[&str],
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Admitted, Rejected> {
        let map = appended(HeaderMap::new(), headers);
        admit_under(&policy(models), &Method::POST, path, &map)
    }

    fn code(result: Result<Admitted, Rejected>) -> (&'static str, String) {
        let bedrock = result.unwrap_err().error.to_bedrock();
        (bedrock.kind.code(), bedrock.message)
    }

    fn body_verdict(body: &str) -> Result<(), (&'static str, String)> {
        check_body(Operation::Converse, body.as_bytes(), &policy(&["*"])).map_err(|err| {
            let bedrock = err.to_bedrock();
            (bedrock.kind.code(), bedrock.message)
        })
    }

    /// A request as the agent forwards it for a caller that dialled `service`.
    fn admit_on(
        service: &str,
        method: Method,
        path: &str,
        extra: &[(&str, &str)],
    ) -> Result<Admitted, Rejected> {
        let mut operations = vec!["Converse"];
        operations.extend(Operation::DISCOVERY.iter().map(|op| op.name()));
        let policy = Policy::new(
            [],
            &PolicySection {
                trace: vec![],
                ..section(&operations, &["anthropic.*", "us.anthropic.*"])
            },
        );
        let mut map = HeaderMap::new();
        map.insert(
            xpart_bedrock::protocol::SERVICE_HEADER,
            HeaderValue::from_str(service).unwrap(),
        );
        admit_under(&policy, &method, path, &appended(map, extra))
    }

    fn admit_under(
        policy: &Policy,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Admitted, Rejected> {
        let rewriter = rewriter();
        let rules = Rules {
            policy,
            rewriter: &rewriter,
            echo_model: Some("xpart.echo"),
        };
        admit(method, path, headers, &rules)
    }

    fn appended(mut map: HeaderMap, headers: &[(&str, &str)]) -> HeaderMap {
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn control_plane_reads_are_admitted_with_only_their_own_query() {
        let cases = [
            (
                "/foundation-models?byProvider=Anthropic&byOutputModality=TEXT&evil=1&X-Amz-Credential=x",
                Operation::ListFoundationModels,
                "/foundation-models?byProvider=Anthropic&byOutputModality=TEXT",
            ),
            (
                "/foundation-models?byCustomizationType=FINE_TUNING&byInferenceType=ON_DEMAND",
                Operation::ListFoundationModels,
                "/foundation-models?byCustomizationType=FINE_TUNING&byInferenceType=ON_DEMAND",
            ),
            (
                "/inference-profiles?maxResults=5&nextToken=abc%2B%2F%3D&type=SYSTEM_DEFINED&typeEquals=x",
                Operation::ListInferenceProfiles,
                "/inference-profiles?maxResults=5&nextToken=abc%2B%2F%3D&type=SYSTEM_DEFINED",
            ),
            (
                "/foundation-models/anthropic.claude-v2%3A1?x=1",
                Operation::GetFoundationModel,
                "/foundation-models/anthropic.claude-v2%3A1",
            ),
            (
                "/inference-profiles/us.anthropic.claude-v2%3A1",
                Operation::GetInferenceProfile,
                "/inference-profiles/us.anthropic.claude-v2%3A1",
            ),
            (
                "/inference-profiles/us-gov.anthropic.claude-v2%3A1",
                Operation::GetInferenceProfile,
                "/inference-profiles/us.anthropic.claude-v2%3A1",
            ),
            (
                "/foundation-model-availability/anthropic.x",
                Operation::GetFoundationModelAvailability,
                "/foundation-model-availability/anthropic.x",
            ),
        ];
        for (path, operation, signed) in cases {
            let admitted = admit_on(
                "bedrock",
                Method::GET,
                path,
                &[
                    ("accept", "application/json"),
                    ("x-amzn-bedrock-service-tier", "priority"),
                    ("x-amz-security-token", "t"),
                ],
            )
            .unwrap_or_else(|r| panic!("{path}: {}", r.error));
            assert_eq!(admitted.route.operation, operation, "{path}");
            assert_eq!(admitted.path_and_query, signed, "{path}");
            assert_eq!(admitted.destination.service, Service::Bedrock);
            let names: Vec<&str> = admitted.headers.keys().map(|n| n.as_str()).collect();
            assert_eq!(names, ["accept"], "{path}");
        }
    }

    #[test]
    fn nothing_but_the_reads_is_admitted_on_the_control_plane() {
        let denied = [
            (Method::POST, "/inference-profiles"),
            (Method::DELETE, "/inference-profiles/us.anthropic.x"),
            (Method::DELETE, "/guardrails/gr1"),
            (Method::POST, "/guardrails"),
            (Method::PUT, "/foundation-models/anthropic.x"),
            (Method::PATCH, "/foundation-models"),
            (Method::POST, "/model-customization-jobs"),
            (Method::GET, "/custom-models"),
            (Method::GET, "/foundation-models/a/b"),
            (Method::GET, "/foundation-models%2Fanthropic.x"),
            (Method::GET, "/FOUNDATION-MODELS"),
            (Method::HEAD, "/foundation-models"),
            (
                Method::POST,
                "/foundation-models?Action=CreateInferenceProfile",
            ),
            // A runtime operation is no read of the control plane's; the reads are unknown on
            // the runtime's endpoint (below).
            (Method::POST, "/model/anthropic.x/converse"),
            (Method::GET, "/async-invoke"),
        ];
        for (method, path) in denied {
            let (got, _) = code(admit_on("bedrock", method.clone(), path, &[]));
            assert_eq!(got, "AccessDeniedException", "{method} {path}");
        }
        // An encoded `..` is refused as an invalid path rather than as a denied one.
        let traversal = "/foundation-models/%2e%2e%2fguardrails";
        let (got, _) = code(admit_on("bedrock", Method::GET, traversal, &[]));
        assert_eq!(got, "ValidationException");
        for path in ["/foundation-models", "/inference-profiles/us.anthropic.x"] {
            let (got, message) = code(admit_on("bedrock-runtime", Method::GET, path, &[]));
            assert_eq!(got, "UnknownOperationException", "{path}");
            assert!(message.contains("bedrock-runtime"), "{message}");
        }
        // Without the header an agent meant the runtime.
        let (code_absent, _) = code(admit_with(&["*"], "/foundation-models", &[]));
        assert_eq!(code_absent, "UnknownOperationException");
    }

    #[test]
    fn a_get_of_a_model_the_policy_refuses_is_403_and_the_echo_model_is_answered() {
        for path in [
            "/foundation-models/meta.llama3",
            "/inference-profiles/eu.anthropic.x",
            "/foundation-model-availability/amazon.titan",
        ] {
            let (got, message) = code(admit_on("bedrock", Method::GET, path, &[]));
            assert_eq!(got, "AccessDeniedException", "{path}");
            assert!(message.contains("[policy] models"), "{message}");
        }
        let echo = admit_on("bedrock", Method::GET, "/foundation-models/xpart.echo", &[]).unwrap();
        assert_eq!(echo.target, Target::Echo);
    }

    #[test]
    fn destination_headers_are_read_and_checked() {
        let admitted = admit_on(
            "bedrock-runtime",
            Method::POST,
            "/model/anthropic.x/converse",
            &[("x-xpart-region", "eu-west-1"), ("x-xpart-fips", "1")],
        )
        .unwrap();
        assert_eq!(admitted.destination.region.as_deref(), Some("eu-west-1"));
        assert!(admitted.destination.fips);
        let (bad_region, _) = code(admit_on(
            "bedrock-runtime",
            Method::POST,
            "/model/anthropic.x/converse",
            &[("x-xpart-region", "eu-west-1/x")],
        ));
        assert_eq!(bad_region, "ValidationException");
        let (bad_service, _) = code(admit_on("s3", Method::GET, "/foundation-models", &[]));
        assert_eq!(bad_service, "ValidationException");
    }

    #[test]
    fn converse_body_settings_pass_only_at_allowed_values() {
        let messages = r#""messages":[{"role":"user","content":[{"text":"hi"}]}]"#;
        for allowed in [
            format!("{{{messages}}}"),
            format!(r#"{{{messages},"serviceTier":{{"type":"default"}}}}"#),
            format!(r#"{{{messages},"performanceConfig":{{"latency":"standard"}}}}"#),
            format!(
                r#"{{{messages},"guardrailConfig":{{"guardrailIdentifier":"gr-abc123","guardrailVersion":"1","trace":"enabled"}}}}"#
            ),
        ] {
            assert_eq!(body_verdict(&allowed), Ok(()), "{allowed}");
        }
        for (refused, names) in [
            (r#"{"serviceTier":{"type":"priority"}}"#, "serviceTier.type"),
            (
                r#"{"performanceConfig":{"latency":"optimized"}}"#,
                "performanceConfig.latency",
            ),
            (
                r#"{"guardrailConfig":{"guardrailIdentifier":"gr-other","guardrailVersion":"1"}}"#,
                "gr-other:1",
            ),
            (
                r#"{"guardrailConfig":{"guardrailIdentifier":"gr-abc123","guardrailVersion":"1","trace":"enabled_full"}}"#,
                "guardrailConfig.trace",
            ),
        ] {
            let (code, message) = body_verdict(refused).unwrap_err();
            assert_eq!(code, "AccessDeniedException", "{refused}");
            assert!(message.contains(names), "{refused}: {message}");
        }
    }

    #[test]
    fn converse_body_that_could_be_read_two_ways_is_refused() {
        for ambiguous in [
            r#"{"serviceTier":{"type":"default"},"serviceTier":{"type":"priority"}}"#,
            r#"{"serviceTier":{"type":"default","type":"priority"}}"#,
            r#"{"guardrailConfig":{"guardrailIdentifier":"gr-abc123"}}"#,
            r#"{"serviceTier":{"type":7}}"#,
            "not json",
        ] {
            let (code, _) = body_verdict(ambiguous).unwrap_err();
            assert_eq!(code, "ValidationException", "{ambiguous}");
        }
    }

    #[test]
    fn model_native_bodies_are_not_read() {
        let policy = policy(&["*"]);
        let body = br#"{"serviceTier":{"type":"priority"}}"#;
        assert!(check_body(Operation::InvokeModel, body, &policy).is_ok());
    }

    #[test]
    fn encoded_traversal_and_separators_never_pass_a_glob() {
        for path in [
            "/model/anthropic.claude-x%2F..%2F..%2Fmodel%2Fmeta.llama3-70b/converse",
            "/model/anthropic.claude-x;meta.llama3/converse",
            "/model/anthropic.claude-x%3Bmeta.llama3/converse",
            "/model/anthropic.claude-x%252F..%252Fmeta/converse",
        ] {
            for models in [&["anthropic.claude-*"][..], &["*"][..]] {
                let (kind, message) = code(admit_with(models, path, &[]));
                assert_eq!(kind, "ValidationException", "{path}: {message}");
            }
        }
    }

    #[test]
    fn the_upstream_path_is_built_from_the_validated_id() {
        let cases = [
            (
                "anthropic.claude-*",
                "/model/%61nthropic.claude-v2%3a1/converse",
                "/model/anthropic.claude-v2%3A1/converse",
            ),
            (
                "us.anthropic.*",
                "/model/us-gov.anthropic.x/converse",
                "/model/us.anthropic.x/converse",
            ),
        ];
        for (models, path, upstream) in cases {
            let admitted = admit_with(&[models], path, &[]).unwrap();
            assert_eq!(admitted.path_and_query, upstream, "{path}");
        }
        let rewritten = admit_with(
            &["us.anthropic.*"],
            "/model/us-gov.anthropic.x/converse",
            &[],
        );
        assert_eq!(
            rewritten.unwrap().target,
            Target::Model {
                requested: ModelId::parse("us-gov.anthropic.x").unwrap(),
                commercial: ModelId::parse("us.anthropic.x").unwrap(),
                pattern: "us.anthropic.*".into(),
            }
        );
    }

    #[test]
    fn query_parameters_are_never_passed_on_for_runtime_operations() {
        let admitted = admit_with(
            &["anthropic.*"],
            "/model/anthropic.x/converse?X%2DAmz%2DSecurity%2DToken=abc&X-Amz-Signature=1&x=1",
            &[],
        )
        .unwrap();
        assert_eq!(admitted.path_and_query, "/model/anthropic.x/converse");
    }

    #[test]
    fn list_async_invokes_keeps_only_its_own_parameters_reencoded() {
        let query = "maxResults=5&X-Amz-Security-Token=t&status%45quals=Completed&sortBy=a%20b";
        assert_eq!(
            defined_query(Operation::ListAsyncInvokes, Some(query)),
            "maxResults=5&statusEquals=Completed&sortBy=a%20b"
        );
        assert_eq!(defined_query(Operation::Converse, Some(query)), "");
    }

    #[test]
    fn only_listed_headers_and_allowed_bedrock_headers_are_forwarded() {
        let admitted = admit_with(
            &["anthropic.*"],
            "/model/anthropic.x/invoke",
            &[
                ("content-type", "application/json"),
                ("accept", "application/json"),
                ("x-amzn-bedrock-accept", "*/*"),
                ("user-agent", "boto3"),
                ("authorization", "Bearer secret"),
                ("x-amz-security-token", "tok"),
                ("x-amz-date", "20240101T000000Z"),
                ("cookie", "a=b"),
                ("content-encoding", "gzip"),
                ("x-xpart-principal", "p"),
                ("x-amzn-bedrock-trace", "ENABLED"),
                ("x-amzn-bedrock-service-tier", "default"),
                ("x-amzn-bedrock-performanceconfig-latency", "standard"),
                ("x-amzn-bedrock-guardrailidentifier", "gr-abc123"),
                ("x-amzn-bedrock-guardrailversion", "1"),
                ("x-amzn-bedrock-something-new", "1"),
                ("x-amzn-bedrock-customer-request-id", "1"),
            ],
        )
        .unwrap();
        let mut names: Vec<&str> = admitted.headers.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "accept",
                "content-type",
                "user-agent",
                "x-amzn-bedrock-accept",
                "x-amzn-bedrock-guardrailidentifier",
                "x-amzn-bedrock-guardrailversion",
                "x-amzn-bedrock-performanceconfig-latency",
                "x-amzn-bedrock-service-tier",
                "x-amzn-bedrock-trace",
            ]
        );
    }

    #[test]
    fn gated_headers_at_values_policy_does_not_list_are_refused() {
        let cases = [
            ("x-amzn-bedrock-service-tier", "priority", "service_tiers"),
            (
                "x-amzn-bedrock-performanceconfig-latency",
                "optimized",
                "performance_latency",
            ),
            ("x-amzn-bedrock-trace", "ENABLED_FULL", "trace"),
        ];
        for (header, value, field) in cases {
            let (kind, message) = code(admit_with(
                &["anthropic.*"],
                "/model/anthropic.x/invoke",
                &[(header, value)],
            ));
            assert_eq!(kind, "AccessDeniedException", "{message}");
            assert!(
                message.contains(header) && message.contains(field),
                "{message}"
            );
        }
        let (kind, message) = code(admit_with(
            &["anthropic.*"],
            "/model/anthropic.x/invoke",
            &[
                ("x-amzn-bedrock-guardrailidentifier", "gr-other"),
                ("x-amzn-bedrock-guardrailversion", "1"),
            ],
        ));
        assert_eq!(kind, "AccessDeniedException");
        assert!(message.contains("gr-other:1"), "{message}");
        for headers in [
            &[("x-amzn-bedrock-guardrailidentifier", "gr-abc123")][..],
            &[
                ("x-amzn-bedrock-guardrailidentifier", "gr-abc123"),
                ("x-amzn-bedrock-guardrailversion", "1;2"),
            ][..],
            &[
                ("x-amzn-bedrock-service-tier", "default"),
                ("x-amzn-bedrock-service-tier", "default"),
            ][..],
        ] {
            let (kind, message) = code(admit_with(
                &["anthropic.*"],
                "/model/anthropic.x/invoke",
                headers,
            ));
            assert_eq!(kind, "ValidationException", "{message}");
        }
    }

    #[test]
    fn apply_guardrail_needs_the_guardrail_allowlisted() {
        let admitted = admit_with(&["*"], "/guardrail/gr-abc123/version/1/apply", &[]).unwrap();
        assert_eq!(admitted.target, Target::NoModel);
        assert_eq!(
            admitted.path_and_query,
            "/guardrail/gr-abc123/version/1/apply"
        );
        let rejected =
            admit_with(&["*"], "/guardrail/gr-abc123/version/DRAFT/apply", &[]).unwrap_err();
        assert_eq!(rejected.operation, Some(Operation::ApplyGuardrail));
        let bedrock = rejected.error.to_bedrock();
        assert_eq!(bedrock.kind.code(), "AccessDeniedException");
        assert!(bedrock.message.contains("gr-abc123:DRAFT"));
    }

    #[test]
    fn echo_embedding_model_is_admitted_where_the_echo_model_is() {
        let admitted = admit_with(&["anthropic.*"], "/model/xpart.echo-embed/invoke", &[]).unwrap();
        assert_eq!(admitted.target, Target::Echo);
        let refused = admit_with(&["anthropic.*"], "/model/xpart.echo-embedding/invoke", &[]);
        assert!(refused.is_err(), "only the -embed twin is the echo's");
    }

    #[test]
    fn echo_model_is_admitted_without_the_model_allowlist() {
        let admitted = admit_with(&["anthropic.*"], "/model/xpart.echo/converse", &[]).unwrap();
        assert_eq!(admitted.target, Target::Echo);
    }

    #[test]
    fn refusals_carry_what_the_audit_line_needs() {
        let rejected =
            admit_with(&["anthropic.*"], "/model/meta.llama3/converse", &[]).unwrap_err();
        assert_eq!(rejected.operation, Some(Operation::Converse));
        assert_eq!(
            rejected.model.as_ref().map(ModelId::as_str),
            Some("meta.llama3")
        );
        assert!(matches!(
            rejected.error,
            RequestError::ModelNotAllowed { .. }
        ));
        let rejected =
            admit_with(&["anthropic.*"], "/model/anthropic.x/converse-stream", &[]).unwrap_err();
        assert!(matches!(
            rejected.error,
            RequestError::OperationNotAllowed { .. }
        ));
        let rejected = admit_with(&["*"], "/model/a;b/converse", &[]).unwrap_err();
        assert_eq!((rejected.operation, rejected.model), (None, None));
    }
}
