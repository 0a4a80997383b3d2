//! The Bedrock Runtime wire vocabulary, and nothing else: which operation a request is (parsed
//! from method and path into a [`Route`]), the model it names ([`ModelId`], held to Bedrock's
//! grammar), the error shape clients parse ([`BedrockError`], [`ErrorType`], and
//! [`error_code`] for reading one back), and the headers that must never travel further than
//! the hop that received them ([`strip_hop_by_hop`], [`strip_caller_credentials`]); and the
//! token usage an answer reports ([`usage`], read as the answer passes). The names the agent and the relay agree on inside the tunnel are in [`protocol`]. Pure functions over
//! `http` types: no IO, no runtime, no configuration, so both daemons, the CLI and the fuzz
//! targets speak Bedrock the same way.
//!
//! Besides the runtime, the [`Service::Bedrock`] control plane's model-discovery reads
//! (ListFoundationModels, GetFoundationModel, ListInferenceProfiles, GetInferenceProfile,
//! GetFoundationModelAvailability) are operations of the same vocabulary: their paths do not
//! overlap the runtime's, and [`Operation::service`] says which endpoint serves each.
//! [`DialledName`] reads the service, region and FIPS choice out of the name a caller dialled.
//!
//! Beyond what Bedrock itself defines: [`ErrorType::UnknownOperation`] (404
//! `UnknownOperationException`, what AWS rest-json front ends answer for a path no operation
//! uses); [`Route`] carries `guardrail` and `invocation_arn` as its path parameters;
//! [`BedrockError::into_response`] also sets `x-xpart-request-id`.

pub mod discovery;
pub mod protocol;
pub mod usage;

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::Full;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};

use crate::protocol::REQUEST_ID_HEADER;

/// Largest request body Bedrock Runtime accepts (botocore model: `body` of InvokeModel,
/// max 25,000,000 bytes).
pub const MAX_BODY_BYTES: usize = 25_000_000;

/// Longest model identifier Bedrock accepts (botocore model: `InvokeModelIdentifier`, 2048).
pub const MAX_MODEL_ID_LEN: usize = 2048;

/// The namespace Bedrock appends to the error code in `x-amzn-ErrorType`; clients keep only
/// the part before the first `:`.
pub const ERROR_TYPE_NAMESPACE: &str = "http://internal.amazon.com/coral/com.amazon.bedrock/";

/// `x-amzn-ErrorType`, the header rest-json clients read the error code from.
pub const ERROR_TYPE_HEADER: &str = "x-amzn-errortype";

/// `x-amzn-RequestId`, the request id AWS clients report in errors.
pub const AMZN_REQUEST_ID_HEADER: &str = "x-amzn-requestid";

/// The Bedrock API endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    /// `bedrock-runtime.<region>.amazonaws.com`: inference.
    BedrockRuntime,
    /// `bedrock.<region>.amazonaws.com`: the control plane, of which xpart carries only the
    /// model-discovery reads.
    Bedrock,
}

impl Service {
    pub const ALL: [Service; 2] = [Service::BedrockRuntime, Service::Bedrock];

    /// The endpoint prefix (botocore `endpointPrefix`): the first label of the service's DNS
    /// name, and how configuration and the `x-xpart-service` header name it.
    pub fn name(self) -> &'static str {
        match self {
            Service::BedrockRuntime => "bedrock-runtime",
            Service::Bedrock => "bedrock",
        }
    }
}

/// A vocabulary enum whose every value has one wire name (`name()`, listed in `ALL`): it
/// displays, parses and deserializes as that name, and `$unknown` names any other text.
macro_rules! wire_name {
    ($ty:ident, $unknown:ident) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $ty {
            type Err = $unknown;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $ty::ALL
                    .into_iter()
                    .find(|value| value.name() == s)
                    .ok_or_else(|| $unknown(s.to_string()))
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let name = String::deserialize(deserializer)?;
                name.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

wire_name!(Service, UnknownService);
wire_name!(Operation, UnknownOperation);

/// The text given to [`Service::from_str`] names neither Bedrock endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown service \"{0}\" — fix: use \"bedrock-runtime\" or \"bedrock\"")]
pub struct UnknownService(pub String);

/// What a caller's `Host` (or `:authority`) says about where it meant to go:
/// `<service>[-fips].<region>.amazonaws.com`, the names the AWS SDKs build for Bedrock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialledName {
    pub service: Service,
    pub region: String,
    pub fips: bool,
}

/// What [`DialledName::parse`] made of a host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dialled {
    /// One of the Bedrock names.
    Bedrock(DialledName),
    /// An `amazonaws.com` name of another service (`bedrock-agent-runtime…`, `s3…`): the
    /// caller's SDK was pointed here for something xpart does not carry.
    OtherAwsService(String),
    /// Not an AWS name at all (an IP address, `localhost`, a private name given as
    /// `endpoint_url`): it says nothing about service or region.
    Other,
}

impl DialledName {
    /// Read `host` (`Host` header or `:authority`, an optional port and trailing dot allowed,
    /// any case).
    pub fn parse(host: &str) -> Dialled {
        let host = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
        let Some(rest) = host.strip_suffix(".amazonaws.com") else {
            return Dialled::Other;
        };
        let labels: Vec<&str> = rest.split('.').collect();
        let [first, region] = labels.as_slice() else {
            return Dialled::OtherAwsService(host.clone());
        };
        let (service, fips) = match first.strip_suffix("-fips") {
            Some(service) => (service, true),
            None => (*first, false),
        };
        let Ok(service) = service.parse::<Service>() else {
            return Dialled::OtherAwsService(host.clone());
        };
        if !is_region_name(region) {
            return Dialled::OtherAwsService(host.clone());
        }
        Dialled::Bedrock(DialledName {
            service,
            region: region.to_string(),
            fips,
        })
    }

    /// The DNS name this stands for.
    pub fn host(&self) -> String {
        let fips = if self.fips { "-fips" } else { "" };
        format!(
            "{}{fips}.{}.amazonaws.com",
            self.service.name(),
            self.region
        )
    }

    /// The four names an SDK may dial for `region`: each service, plain and FIPS.
    pub fn all_for_region(region: &str) -> Vec<String> {
        let mut names = Vec::new();
        for service in Service::ALL {
            for fips in [false, true] {
                let name = DialledName {
                    service,
                    region: region.to_string(),
                    fips,
                };
                names.push(name.host());
            }
        }
        names
    }
}

/// Whether `region` has the shape of an AWS region name (`us-east-1`, `us-gov-west-1`,
/// `ap-southeast-2`): lower-case letter groups joined by `-`, ending in a number.
pub fn is_region_name(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    let Some((number, words)) = parts.split_last() else {
        return false;
    };
    words.len() >= 2
        && region.len() <= 20
        && !number.is_empty()
        && number.chars().all(|c| c.is_ascii_digit())
        && words
            .iter()
            .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase()))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host;
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

/// One Bedrock API operation xpart knows: the whole of Bedrock Runtime (botocore
/// `bedrock-runtime` 2023-09-30) and the model-discovery reads of the control plane (botocore
/// `bedrock` 2023-04-20).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    InvokeModel,
    InvokeModelWithResponseStream,
    Converse,
    ConverseStream,
    CountTokens,
    InvokeModelWithBidirectionalStream,
    ApplyGuardrail,
    StartAsyncInvoke,
    ListAsyncInvokes,
    GetAsyncInvoke,
    ListFoundationModels,
    GetFoundationModel,
    ListInferenceProfiles,
    GetInferenceProfile,
    GetFoundationModelAvailability,
}

impl Operation {
    pub const ALL: [Operation; 15] = [
        Operation::InvokeModel,
        Operation::InvokeModelWithResponseStream,
        Operation::Converse,
        Operation::ConverseStream,
        Operation::CountTokens,
        Operation::InvokeModelWithBidirectionalStream,
        Operation::ApplyGuardrail,
        Operation::StartAsyncInvoke,
        Operation::ListAsyncInvokes,
        Operation::GetAsyncInvoke,
        Operation::ListFoundationModels,
        Operation::GetFoundationModel,
        Operation::ListInferenceProfiles,
        Operation::GetInferenceProfile,
        Operation::GetFoundationModelAvailability,
    ];

    /// The control-plane reads, the only `bedrock` operations xpart carries.
    pub const DISCOVERY: [Operation; 5] = [
        Operation::ListFoundationModels,
        Operation::GetFoundationModel,
        Operation::ListInferenceProfiles,
        Operation::GetInferenceProfile,
        Operation::GetFoundationModelAvailability,
    ];

    /// The API name, as in the botocore model and IAM actions (`bedrock:Converse`).
    pub fn name(self) -> &'static str {
        match self {
            Operation::InvokeModel => "InvokeModel",
            Operation::InvokeModelWithResponseStream => "InvokeModelWithResponseStream",
            Operation::Converse => "Converse",
            Operation::ConverseStream => "ConverseStream",
            Operation::CountTokens => "CountTokens",
            Operation::InvokeModelWithBidirectionalStream => "InvokeModelWithBidirectionalStream",
            Operation::ApplyGuardrail => "ApplyGuardrail",
            Operation::StartAsyncInvoke => "StartAsyncInvoke",
            Operation::ListAsyncInvokes => "ListAsyncInvokes",
            Operation::GetAsyncInvoke => "GetAsyncInvoke",
            Operation::ListFoundationModels => "ListFoundationModels",
            Operation::GetFoundationModel => "GetFoundationModel",
            Operation::ListInferenceProfiles => "ListInferenceProfiles",
            Operation::GetInferenceProfile => "GetInferenceProfile",
            Operation::GetFoundationModelAvailability => "GetFoundationModelAvailability",
        }
    }

    /// The endpoint that serves the operation.
    pub fn service(self) -> Service {
        match self {
            Operation::InvokeModel => Service::BedrockRuntime,
            Operation::InvokeModelWithResponseStream => Service::BedrockRuntime,
            Operation::Converse => Service::BedrockRuntime,
            Operation::ConverseStream => Service::BedrockRuntime,
            Operation::CountTokens => Service::BedrockRuntime,
            Operation::InvokeModelWithBidirectionalStream => Service::BedrockRuntime,
            Operation::ApplyGuardrail => Service::BedrockRuntime,
            Operation::StartAsyncInvoke => Service::BedrockRuntime,
            Operation::ListAsyncInvokes => Service::BedrockRuntime,
            Operation::GetAsyncInvoke => Service::BedrockRuntime,
            Operation::ListFoundationModels => Service::Bedrock,
            Operation::GetFoundationModel => Service::Bedrock,
            Operation::ListInferenceProfiles => Service::Bedrock,
            Operation::GetInferenceProfile => Service::Bedrock,
            Operation::GetFoundationModelAvailability => Service::Bedrock,
        }
    }

    /// For a list operation, the member of its JSON answer that holds the list and the
    /// member of each entry that names the model or profile; what is filtered by allowlists.
    pub fn listed(self) -> Option<(&'static str, &'static str)> {
        match self {
            Operation::ListFoundationModels => Some(("modelSummaries", "modelId")),
            Operation::ListInferenceProfiles => {
                Some(("inferenceProfileSummaries", "inferenceProfileId"))
            }
            Operation::InvokeModel => None,
            Operation::InvokeModelWithResponseStream => None,
            Operation::Converse => None,
            Operation::ConverseStream => None,
            Operation::CountTokens => None,
            Operation::InvokeModelWithBidirectionalStream => None,
            Operation::ApplyGuardrail => None,
            Operation::StartAsyncInvoke => None,
            Operation::ListAsyncInvokes => None,
            Operation::GetAsyncInvoke => None,
            Operation::GetFoundationModel => None,
            Operation::GetInferenceProfile => None,
            Operation::GetFoundationModelAvailability => None,
        }
    }

    /// Whether the response is an `application/vnd.amazon.eventstream` that must be passed
    /// through frame by frame rather than buffered.
    pub fn streams_response(self) -> bool {
        match self {
            Operation::InvokeModelWithResponseStream => true,
            Operation::ConverseStream => true,
            Operation::InvokeModelWithBidirectionalStream => true,
            Operation::InvokeModel => false,
            Operation::Converse => false,
            Operation::CountTokens => false,
            Operation::ApplyGuardrail => false,
            Operation::StartAsyncInvoke => false,
            Operation::ListAsyncInvokes => false,
            Operation::GetAsyncInvoke => false,
            Operation::ListFoundationModels => false,
            Operation::GetFoundationModel => false,
            Operation::ListInferenceProfiles => false,
            Operation::GetInferenceProfile => false,
            Operation::GetFoundationModelAvailability => false,
        }
    }

    /// The last path segment of a `/model/{modelId}/…` operation; `None` for the others.
    pub fn model_action(self) -> Option<&'static str> {
        match self {
            Operation::InvokeModel => Some("invoke"),
            Operation::InvokeModelWithResponseStream => Some("invoke-with-response-stream"),
            Operation::Converse => Some("converse"),
            Operation::ConverseStream => Some("converse-stream"),
            Operation::CountTokens => Some("count-tokens"),
            Operation::InvokeModelWithBidirectionalStream => {
                Some("invoke-with-bidirectional-stream")
            }
            Operation::ApplyGuardrail => None,
            Operation::StartAsyncInvoke => None,
            Operation::ListAsyncInvokes => None,
            Operation::GetAsyncInvoke => None,
            Operation::ListFoundationModels => None,
            Operation::GetFoundationModel => None,
            Operation::ListInferenceProfiles => None,
            Operation::GetInferenceProfile => None,
            Operation::GetFoundationModelAvailability => None,
        }
    }

    /// The query parameters the operation defines (botocore `location: querystring`); a
    /// proxy passes on these and no others.
    pub fn query_parameters(self) -> &'static [&'static str] {
        match self {
            Operation::ListAsyncInvokes => &[
                "submitTimeAfter",
                "submitTimeBefore",
                "statusEquals",
                "maxResults",
                "nextToken",
                "sortBy",
                "sortOrder",
            ],
            // ListInferenceProfiles' `typeEquals` travels as `type` (botocore locationName).
            Operation::ListFoundationModels => &[
                "byProvider",
                "byCustomizationType",
                "byOutputModality",
                "byInferenceType",
            ],
            Operation::ListInferenceProfiles => &["maxResults", "nextToken", "type"],
            Operation::GetFoundationModel => &[],
            Operation::GetInferenceProfile => &[],
            Operation::GetFoundationModelAvailability => &[],
            Operation::InvokeModel => &[],
            Operation::InvokeModelWithResponseStream => &[],
            Operation::Converse => &[],
            Operation::ConverseStream => &[],
            Operation::CountTokens => &[],
            Operation::InvokeModelWithBidirectionalStream => &[],
            Operation::ApplyGuardrail => &[],
            Operation::StartAsyncInvoke => &[],
            Operation::GetAsyncInvoke => &[],
        }
    }

    /// The comma-separated list of every name, for "use one of …" fixes.
    pub fn all_names() -> String {
        Operation::ALL
            .iter()
            .map(|op| op.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The text given to [`Operation::from_str`] names no Bedrock Runtime operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown operation \"{0}\" — fix: use one of {names}", names = Operation::all_names())]
pub struct UnknownOperation(pub String);

impl Serialize for Operation {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// A model identifier that satisfies Bedrock's grammar (see [`ModelId::parse`]): a plain
/// model or inference-profile id (`us.anthropic.claude-…:0`), or a Bedrock ARN such as
/// `arn:aws:bedrock:us-east-1:…:inference-profile/…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ModelId(String);

/// ARN resource types Bedrock Runtime accepts in place of a model id (botocore
/// `InvokeModelIdentifier` and `ConversationalModelId`).
pub const MODEL_ARN_RESOURCE_TYPES: [&str; 10] = [
    "foundation-model",
    "inference-profile",
    "application-inference-profile",
    "provisioned-model",
    "custom-model",
    "custom-model-deployment",
    "imported-model",
    "prompt",
    "prompt-router",
    "default-prompt-router",
];

impl ModelId {
    /// An id the caller did not supply (configuration, tests); ids from a request or built
    /// from one go through [`ModelId::parse`].
    pub fn new(id: impl Into<String>) -> ModelId {
        ModelId(id.into())
    }

    /// Accept `id` (already percent-decoded, exactly once) only when it is in Bedrock's
    /// model-id grammar: at most [`MAX_MODEL_ID_LEN`] bytes, and either a plain id of ASCII
    /// letters, digits, `.`, `_`, `:` and `-`, or `arn:<partition>:bedrock:<region>:<account>:
    /// <type>/<id>` for a type in [`MODEL_ARN_RESOURCE_TYPES`]. No `..` anywhere. The only
    /// `/` is the one after the type (and, in a `custom-model` ARN, the one before its
    /// 12-character suffix, as Bedrock names them).
    pub fn parse(id: &str) -> Result<ModelId, BedrockError> {
        if id.is_empty() {
            return Err(model_id_error(
                id,
                "Member must have length greater than or equal to 1",
            ));
        }
        if id.len() > MAX_MODEL_ID_LEN {
            return Err(BedrockError::validation(format!(
                "1 validation error detected: Value at 'modelId' failed to satisfy constraint: \
                 Member must have length less than or equal to {MAX_MODEL_ID_LEN}"
            )));
        }
        if let Some(reason) = model_id_violation(id) {
            return Err(model_id_error(id, reason));
        }
        Ok(ModelId(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this id matches an allowlist pattern (see [`glob_match`]).
    pub fn matches(&self, pattern: &str) -> bool {
        glob_match(pattern, &self.0)
    }

    /// Whether the id is an ARN (`arn:<partition>:bedrock:…`) rather than a bare model or
    /// inference-profile id.
    pub fn is_arn(&self) -> bool {
        self.0.starts_with("arn:")
    }

    /// The ARN partition (`aws`, `aws-us-gov`, …) when the id is an ARN.
    pub fn arn_partition(&self) -> Option<&str> {
        let rest = self.0.strip_prefix("arn:")?;
        rest.split(':').next()
    }

    /// The id as one percent-encoded path segment.
    pub fn path_segment(&self) -> String {
        encode_unreserved(&self.0)
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `c` may appear in a plain model id (or an ARN's resource id).
pub fn is_model_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

const PLAIN_ID_RULE: &str =
    "Member must contain only letters, digits, '.', '_', ':' and '-', and no '..'";

fn model_id_violation(id: &str) -> Option<&'static str> {
    match id.strip_prefix("arn:") {
        Some(arn) => arn_violation(arn),
        None => plain_id_violation(id).then_some(PLAIN_ID_RULE),
    }
}

fn plain_id_violation(id: &str) -> bool {
    id.is_empty() || !id.chars().all(is_model_id_char) || id.contains("..")
}

fn arn_violation(arn: &str) -> Option<&'static str> {
    const SHAPE: &str =
        "Member must be a Bedrock ARN arn:<partition>:bedrock:<region>:<account>:<type>/<id>";
    let mut fields = arn.splitn(5, ':');
    let (Some(partition), Some(service), Some(region), Some(account), Some(resource)) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Some(SHAPE);
    };
    let partition_ok = partition == "aws"
        || partition.strip_prefix("aws-").is_some_and(|rest| {
            !rest.is_empty()
                && rest.len() <= 12
                && rest
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        });
    let region_ok = region.len() <= 20
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let account_ok = account.len() <= 12 && account.chars().all(|c| c.is_ascii_digit());
    if !(partition_ok && service == "bedrock" && region_ok && account_ok) {
        return Some(SHAPE);
    }
    let Some((kind, id)) = resource.split_once('/') else {
        return Some(SHAPE);
    };
    if !MODEL_ARN_RESOURCE_TYPES.contains(&kind) {
        return Some(
            "Member must name a resource type Bedrock invokes (foundation-model, \
             inference-profile, application-inference-profile, provisioned-model, custom-model, \
             custom-model-deployment, imported-model, prompt, prompt-router, default-prompt-router)",
        );
    }
    // A custom model is named by its base model and a 12-character suffix:
    // custom-model/<base-model-id>/<suffix> (botocore InvokeModelIdentifier).
    let id = match (kind, id.split_once('/')) {
        ("custom-model", Some((base, suffix)))
            if suffix.len() == 12 && suffix.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            base
        }
        _ => id,
    };
    plain_id_violation(id).then_some(PLAIN_ID_RULE)
}

fn model_id_error(id: &str, rule: &str) -> BedrockError {
    BedrockError::validation(format!(
        "1 validation error detected: Value '{}' at 'modelId' failed to satisfy constraint: {rule}",
        shown(id)
    ))
}

/// The caller's text, escaped and cut short, for an error message.
fn shown(text: &str) -> String {
    let escaped: String = text.escape_debug().collect();
    match escaped.char_indices().nth(MAX_ECHOED_PATH_CHARS) {
        Some((cut, _)) => format!("{}…", &escaped[..cut]),
        None => escaped,
    }
}

/// RFC 3986 unreserved characters stay; everything else (`:` and `/` in ARNs) is
/// percent-encoded, as the AWS SDKs encode a path label.
const PATH_LABEL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `value` percent-encoded as the AWS SDKs encode a path label or a query value: every byte
/// but RFC 3986's unreserved characters.
pub fn encode_unreserved(value: &str) -> String {
    utf8_percent_encode(value, PATH_LABEL).to_string()
}

/// Whole-string, case-sensitive match where each `*` stands for any run of characters
/// (including none) and every other character stands for itself. `*` alone matches
/// everything; a pattern without `*` is an exact comparison.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    // split always yields at least one item, even for an empty pattern.
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let mut middle: Vec<&str> = parts.collect();
    let Some(last) = middle.pop() else {
        // No `*` at all: the prefix must have been the whole text.
        return rest.is_empty();
    };
    for part in middle {
        // Leftmost occurrence is always safe for greedy-free globbing: taking the earliest
        // match leaves the most text for the parts after it.
        let Some(at) = rest.find(part) else {
            return false;
        };
        rest = &rest[at + part.len()..];
    }
    rest.ends_with(last)
}

/// A guardrail named by ApplyGuardrail's path (or by the `X-Amzn-Bedrock-Guardrail*`
/// headers), validated with [`Guardrail::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guardrail {
    /// Guardrail id (`gr-abc123`) or ARN (`arn:aws:bedrock:…:guardrail/abc123`).
    pub identifier: String,
    /// `DRAFT` or a version number.
    pub version: String,
}

impl Guardrail {
    /// Accept an identifier and version (already percent-decoded) only in Bedrock's grammar
    /// (botocore `GuardrailIdentifier`, `GuardrailVersion`): an id of ASCII letters, digits,
    /// `_` and `-`, or `arn:<partition>:bedrock:<region>:<account>:guardrail/<id>`; a version
    /// `DRAFT` or 1 to 8 digits without a leading zero.
    pub fn parse(identifier: &str, version: &str) -> Result<Guardrail, BedrockError> {
        if !is_guardrail_identifier(identifier) {
            return Err(BedrockError::validation(format!(
                "1 validation error detected: Value '{}' at 'guardrailIdentifier' failed to \
                 satisfy constraint: Member must be a guardrail id (letters, digits, '_', '-') \
                 or a guardrail ARN",
                shown(identifier)
            )));
        }
        if !is_guardrail_version(version) {
            return Err(BedrockError::validation(format!(
                "1 validation error detected: Value '{}' at 'guardrailVersion' failed to \
                 satisfy constraint: Member must be DRAFT or a version number",
                shown(version)
            )));
        }
        Ok(Guardrail {
            identifier: identifier.to_string(),
            version: version.to_string(),
        })
    }

    /// `identifier:version`, the form guardrail allowlists are written in.
    pub fn qualified(&self) -> String {
        format!("{}:{}", self.identifier, self.version)
    }
}

fn is_guardrail_identifier(identifier: &str) -> bool {
    let plain = |id: &str| {
        !id.is_empty()
            && id.len() <= MAX_MODEL_ID_LEN
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    let Some(arn) = identifier.strip_prefix("arn:") else {
        return plain(identifier);
    };
    let fields: Vec<&str> = arn.splitn(5, ':').collect();
    let [partition, "bedrock", region, account, resource] = fields.as_slice() else {
        return false;
    };
    let Some(id) = resource.strip_prefix("guardrail/") else {
        return false;
    };
    let lower_digits_dash = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    partition.starts_with("aws")
        && partition.len() <= 16
        && lower_digits_dash(partition)
        && region.len() <= 20
        && lower_digits_dash(region)
        && account.len() <= 12
        && account.chars().all(|c| c.is_ascii_digit())
        && plain(id)
}

fn is_guardrail_version(version: &str) -> bool {
    version == "DRAFT"
        || (!version.is_empty()
            && version.len() <= 8
            && !version.starts_with('0')
            && version.chars().all(|c| c.is_ascii_digit()))
}

/// What a request is, parsed from its method and path, every path parameter decoded once
/// and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub operation: Operation,
    /// The model, for the `/model/{modelId}/…` operations, and the model or inference profile
    /// a control-plane `Get…` names.
    pub model: Option<ModelId>,
    /// ApplyGuardrail's guardrail id and version.
    pub guardrail: Option<Guardrail>,
    /// GetAsyncInvoke's invocation ARN, percent-decoded.
    pub invocation_arn: Option<String>,
}

impl Route {
    /// Recognise a Bedrock Runtime request. `path` may carry a query string; it is ignored.
    ///
    /// A path no operation uses, or a known path with the wrong method, is refused as
    /// 404 `UnknownOperationException`, which is what AWS rest-json front ends answer for
    /// requests that map to no operation. A recognised path with a model id or guardrail
    /// outside Bedrock's grammar is a 400 `ValidationException`, as Bedrock answers.
    pub fn parse(method: &Method, path: &str) -> Result<Route, BedrockError> {
        let path = path.split_once('?').map_or(path, |(path, _query)| path);
        let Some(rest) = path.strip_prefix('/') else {
            return Err(unknown_operation(method, path));
        };
        let segments: Vec<&str> = rest.split('/').collect();
        let operation = match (method, segments.as_slice()) {
            (&Method::POST, ["model", _, "invoke"]) => Operation::InvokeModel,
            (&Method::POST, ["model", _, "invoke-with-response-stream"]) => {
                Operation::InvokeModelWithResponseStream
            }
            (&Method::POST, ["model", _, "converse"]) => Operation::Converse,
            (&Method::POST, ["model", _, "converse-stream"]) => Operation::ConverseStream,
            (&Method::POST, ["model", _, "count-tokens"]) => Operation::CountTokens,
            (&Method::POST, ["model", _, "invoke-with-bidirectional-stream"]) => {
                Operation::InvokeModelWithBidirectionalStream
            }
            (&Method::POST, ["guardrail", _, "version", _, "apply"]) => Operation::ApplyGuardrail,
            (&Method::POST, ["async-invoke"]) => Operation::StartAsyncInvoke,
            (&Method::GET, ["async-invoke"]) => Operation::ListAsyncInvokes,
            (&Method::GET, ["async-invoke", _]) => Operation::GetAsyncInvoke,
            (&Method::GET, ["foundation-models"]) => Operation::ListFoundationModels,
            (&Method::GET, ["foundation-models", _]) => Operation::GetFoundationModel,
            (&Method::GET, ["inference-profiles"]) => Operation::ListInferenceProfiles,
            (&Method::GET, ["inference-profiles", _]) => Operation::GetInferenceProfile,
            (&Method::GET, ["foundation-model-availability", _]) => {
                Operation::GetFoundationModelAvailability
            }
            _ => return Err(unknown_operation(method, path)),
        };
        let mut route = Route {
            operation,
            model: None,
            guardrail: None,
            invocation_arn: None,
        };
        match segments.as_slice() {
            ["model", raw, _] => {
                route.model = Some(ModelId::parse(&decode_param(raw, "modelId")?)?);
            }
            ["guardrail", identifier, "version", version, "apply"] => {
                route.guardrail = Some(Guardrail::parse(
                    &decode_param(identifier, "guardrailIdentifier")?,
                    &decode_param(version, "guardrailVersion")?,
                )?);
            }
            ["async-invoke", arn] => {
                route.invocation_arn = Some(decode_param(arn, "invocationArn")?);
            }
            ["foundation-models", raw] => {
                route.model = Some(ModelId::parse(&decode_param(raw, "modelIdentifier")?)?);
            }
            ["inference-profiles", raw] => {
                route.model = Some(ModelId::parse(&decode_param(
                    raw,
                    "inferenceProfileIdentifier",
                )?)?);
            }
            ["foundation-model-availability", raw] => {
                route.model = Some(ModelId::parse(&decode_param(raw, "modelId")?)?);
            }
            _ => {}
        }
        Ok(route)
    }

    /// The path of this request rebuilt from its validated parameters, each percent-encoded
    /// as the AWS SDKs encode a path label; `None` when a parameter the operation needs is
    /// missing.
    pub fn path(&self) -> Option<String> {
        let with_model = || self.path_with_model(self.model.as_ref()?);
        match self.operation {
            Operation::ApplyGuardrail => {
                let guardrail = self.guardrail.as_ref()?;
                Some(format!(
                    "/guardrail/{}/version/{}/apply",
                    encode_unreserved(&guardrail.identifier),
                    encode_unreserved(&guardrail.version)
                ))
            }
            Operation::StartAsyncInvoke => Some("/async-invoke".to_string()),
            Operation::ListAsyncInvokes => Some("/async-invoke".to_string()),
            Operation::GetAsyncInvoke => Some(format!(
                "/async-invoke/{}",
                encode_unreserved(self.invocation_arn.as_deref()?)
            )),
            Operation::ListFoundationModels => Some("/foundation-models".to_string()),
            Operation::ListInferenceProfiles => Some("/inference-profiles".to_string()),
            Operation::GetFoundationModel => with_model(),
            Operation::GetInferenceProfile => with_model(),
            Operation::GetFoundationModelAvailability => with_model(),
            Operation::InvokeModel => with_model(),
            Operation::InvokeModelWithResponseStream => with_model(),
            Operation::Converse => with_model(),
            Operation::ConverseStream => with_model(),
            Operation::CountTokens => with_model(),
            Operation::InvokeModelWithBidirectionalStream => with_model(),
        }
    }

    /// [`Route::path`] with `model` in the label that names the model (a rewritten id, or
    /// the inference profile used instead of the requested model). `None` for an operation
    /// that names no model.
    pub fn path_with_model(&self, model: &ModelId) -> Option<String> {
        let segment = model.path_segment();
        if let Some(action) = self.operation.model_action() {
            return Some(format!("/model/{segment}/{action}"));
        }
        match self.operation {
            Operation::GetFoundationModel => Some(format!("/foundation-models/{segment}")),
            Operation::GetInferenceProfile => Some(format!("/inference-profiles/{segment}")),
            Operation::GetFoundationModelAvailability => {
                Some(format!("/foundation-model-availability/{segment}"))
            }
            _ => None,
        }
    }
}

fn unknown_operation(method: &Method, path: &str) -> BedrockError {
    // The path is the caller's; echo enough of it to recognise, not all of it.
    let shown = match path.char_indices().nth(MAX_ECHOED_PATH_CHARS) {
        Some((cut, _)) => format!("{}…", &path[..cut]),
        None => path.to_string(),
    };
    BedrockError::new(
        ErrorType::UnknownOperation,
        format!("no Bedrock operation matches {method} {shown}"),
    )
}

const MAX_ECHOED_PATH_CHARS: usize = 200;

/// Percent-decode one path parameter, once; it must be non-empty UTF-8 without whitespace or
/// control characters, which no Bedrock identifier contains.
fn decode_param(raw: &str, name: &str) -> Result<String, BedrockError> {
    let Ok(decoded) = percent_decode_str(raw).decode_utf8() else {
        return Err(BedrockError::validation(format!(
            "1 validation error detected: Value at '{name}' failed to satisfy constraint: \
             Member must be valid percent-encoded UTF-8"
        )));
    };
    if decoded.is_empty() {
        return Err(BedrockError::validation(format!(
            "1 validation error detected: Value at '{name}' failed to satisfy constraint: \
             Member must have length greater than or equal to 1"
        )));
    }
    if decoded.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(BedrockError::validation(format!(
            "1 validation error detected: Value '{}' at '{name}' failed to satisfy constraint: \
             Member must not contain whitespace or control characters",
            shown(&decoded)
        )));
    }
    Ok(decoded.into_owned())
}

/// The error codes Bedrock Runtime returns, plus the generic ones AWS front ends use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorType {
    AccessDenied,
    Validation,
    ServiceQuotaExceeded,
    Conflict,
    ResourceNotFound,
    ModelTimeout,
    ModelError,
    ModelStreamError,
    Throttling,
    ModelNotReady,
    InternalServer,
    ServiceUnavailable,
    UnrecognizedClient,
    InvalidSignature,
    /// No operation matches the method and path.
    UnknownOperation,
}

impl ErrorType {
    pub const ALL: [ErrorType; 15] = [
        ErrorType::AccessDenied,
        ErrorType::Validation,
        ErrorType::ServiceQuotaExceeded,
        ErrorType::Conflict,
        ErrorType::ResourceNotFound,
        ErrorType::ModelTimeout,
        ErrorType::ModelError,
        ErrorType::ModelStreamError,
        ErrorType::Throttling,
        ErrorType::ModelNotReady,
        ErrorType::InternalServer,
        ErrorType::ServiceUnavailable,
        ErrorType::UnrecognizedClient,
        ErrorType::InvalidSignature,
        ErrorType::UnknownOperation,
    ];

    /// The HTTP status and error code of each kind, as Bedrock sends them.
    pub fn wire(self) -> (StatusCode, &'static str) {
        match self {
            ErrorType::AccessDenied => (StatusCode::FORBIDDEN, "AccessDeniedException"),
            ErrorType::Validation => (StatusCode::BAD_REQUEST, "ValidationException"),
            ErrorType::ServiceQuotaExceeded => {
                (StatusCode::BAD_REQUEST, "ServiceQuotaExceededException")
            }
            ErrorType::Conflict => (StatusCode::BAD_REQUEST, "ConflictException"),
            ErrorType::ResourceNotFound => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
            ErrorType::ModelTimeout => (StatusCode::REQUEST_TIMEOUT, "ModelTimeoutException"),
            ErrorType::ModelError => (StatusCode::FAILED_DEPENDENCY, "ModelErrorException"),
            ErrorType::ModelStreamError => {
                (StatusCode::FAILED_DEPENDENCY, "ModelStreamErrorException")
            }
            ErrorType::Throttling => (StatusCode::TOO_MANY_REQUESTS, "ThrottlingException"),
            ErrorType::ModelNotReady => (StatusCode::TOO_MANY_REQUESTS, "ModelNotReadyException"),
            ErrorType::InternalServer => {
                (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerException")
            }
            ErrorType::ServiceUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableException",
            ),
            ErrorType::UnrecognizedClient => (StatusCode::FORBIDDEN, "UnrecognizedClientException"),
            ErrorType::InvalidSignature => (StatusCode::FORBIDDEN, "InvalidSignatureException"),
            ErrorType::UnknownOperation => (StatusCode::NOT_FOUND, "UnknownOperationException"),
        }
    }

    pub fn status(self) -> StatusCode {
        self.wire().0
    }

    /// The error code clients see, e.g. `ThrottlingException`.
    pub fn code(self) -> &'static str {
        self.wire().1
    }

    /// The kind for an error code, accepting the full `x-amzn-ErrorType` value
    /// (`Code:namespace`) as clients do.
    pub fn from_code(code: &str) -> Option<ErrorType> {
        let code = code_of(code).trim();
        ErrorType::ALL.into_iter().find(|kind| kind.code() == code)
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refusal or failure to report to a Bedrock client in Bedrock's own error shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct BedrockError {
    pub kind: ErrorType,
    pub message: String,
}

impl BedrockError {
    pub fn new(kind: ErrorType, message: impl Into<String>) -> BedrockError {
        BedrockError {
            kind,
            message: message.into(),
        }
    }

    pub fn access_denied(message: impl Into<String>) -> BedrockError {
        BedrockError::new(ErrorType::AccessDenied, message)
    }

    pub fn validation(message: impl Into<String>) -> BedrockError {
        BedrockError::new(ErrorType::Validation, message)
    }

    pub fn throttling(message: impl Into<String>) -> BedrockError {
        BedrockError::new(ErrorType::Throttling, message)
    }

    pub fn internal(message: impl Into<String>) -> BedrockError {
        BedrockError::new(ErrorType::InternalServer, message)
    }

    pub fn unavailable(message: impl Into<String>) -> BedrockError {
        BedrockError::new(ErrorType::ServiceUnavailable, message)
    }

    /// The response a Bedrock client parses into this error: the kind's status,
    /// `x-amzn-ErrorType: <Code>:<namespace>`, `x-amzn-RequestId` and `x-xpart-request-id`
    /// set to `request_id`, and the JSON body `{"message": …}`.
    pub fn into_response(self, request_id: &str) -> Response<Full<Bytes>> {
        let (status, code) = self.kind.wire();
        let body = serde_json::json!({ "message": self.message }).to_string();
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(error_type) = HeaderValue::from_str(&format!("{code}:{ERROR_TYPE_NAMESPACE}")) {
            headers.insert(HeaderName::from_static(ERROR_TYPE_HEADER), error_type);
        }
        // A request id that is not a valid header value (it is generated by xpart, so this
        // does not happen in practice) is left out rather than failing the error response.
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert(HeaderName::from_static(AMZN_REQUEST_ID_HEADER), id.clone());
            headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), id);
        }
        response
    }
}

/// The error code a Bedrock-shaped response carries in `x-amzn-ErrorType`
/// (`ThrottlingException` from `ThrottlingException:http://internal.amazon.com/...`), as
/// clients read it: the part before the first `:`. `None` without the header or when it is
/// not visible ASCII.
pub fn error_code(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(ERROR_TYPE_HEADER)?.to_str().ok()?;
    Some(code_of(value))
}

/// The code in an `x-amzn-ErrorType` value: what precedes the namespace.
fn code_of(value: &str) -> &str {
    value.split(':').next().unwrap_or(value)
}

/// Headers that describe one connection rather than the message (RFC 9110 §7.6.1), plus the
/// legacy `proxy-connection` and `keep-alive`.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Remove hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Headers that carry or bind the caller's own credentials (SigV4, bearer tokens, session
/// tokens, cookies). They must never leave the agent: GovCloud credentials mean nothing in
/// the Commercial partition, and forwarding them would leak them.
const CALLER_CREDENTIALS: [&str; 9] = [
    "authorization",
    "x-amz-security-token",
    "x-amz-date",
    "x-amz-content-sha256",
    "x-amz-credential",
    "x-amz-algorithm",
    "x-amz-signedheaders",
    "cookie",
    "proxy-authorization",
];

/// Remove the caller's credentials and signature headers (any `x-amz-signature…` header
/// included), leaving the Bedrock request headers.
pub fn strip_caller_credentials(headers: &mut HeaderMap) {
    for name in CALLER_CREDENTIALS {
        headers.remove(name);
    }
    remove_headers_starting_with(headers, "x-amz-signature");
}

/// Remove every header whose name begins with `prefix` (lower case, as `http` keeps names).
pub(crate) fn remove_headers_starting_with(headers: &mut HeaderMap, prefix: &str) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(prefix))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// One event-stream frame, the binary framing of Bedrock's streaming answers: `payload` under
/// the string-valued `headers`, written in the order given.
pub fn event_stream_frame(
    headers: &[(&str, &str)],
    payload: impl Into<Bytes>,
) -> Result<Vec<u8>, aws_smithy_eventstream::error::Error> {
    use aws_smithy_types::event_stream::{Header, HeaderValue as FrameValue, Message};
    let message = headers
        .iter()
        .fold(Message::new(payload), |message, (name, value)| {
            message.add_header(Header::new(
                (*name).to_owned(),
                FrameValue::String((*value).to_owned().into()),
            ))
        });
    let mut out = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&message, &mut out)?;
    Ok(out)
}

/// The value of an event-stream frame's string header `name`: `None` when the frame has no
/// such header or its value is not a string.
pub fn event_stream_header<'m>(
    message: &'m aws_smithy_types::event_stream::Message,
    name: &str,
) -> Option<&'m str> {
    message
        .headers()
        .iter()
        .find(|h| h.name().as_str() == name)
        .and_then(|h| h.value().as_string().ok())
        .map(|s| s.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn post(path: &str) -> Result<Route, BedrockError> {
        Route::parse(&Method::POST, path)
    }

    #[test]
    fn model_operations_parse_with_decoded_model_and_rebuilt_path() {
        let cases = [
            ("invoke", Operation::InvokeModel),
            (
                "invoke-with-response-stream",
                Operation::InvokeModelWithResponseStream,
            ),
            ("converse", Operation::Converse),
            ("converse-stream", Operation::ConverseStream),
            ("count-tokens", Operation::CountTokens),
            (
                "invoke-with-bidirectional-stream",
                Operation::InvokeModelWithBidirectionalStream,
            ),
        ];
        for (action, operation) in cases {
            let path = format!("/model/anthropic.claude-3-haiku-20240307-v1%3A0/{action}");
            let route = post(&path).unwrap();
            assert_eq!(route.operation, operation, "{path}");
            assert_eq!(
                route.model.as_ref().map(ModelId::as_str),
                Some("anthropic.claude-3-haiku-20240307-v1:0")
            );
            assert_eq!(route.path().as_deref(), Some(path.as_str()));
            assert_eq!(route.guardrail, None);
        }
    }

    #[test]
    fn arns_stand_in_for_model_ids_in_any_partition() {
        let raw = "arn%3Aaws-us-gov%3Abedrock%3Aus-gov-west-1%3A123456789012%3Ainference-profile%2Fus-gov.anthropic.claude-3-5-sonnet-20240620-v1%3A0";
        let route = post(&format!("/model/{raw}/converse")).unwrap();
        let model = route.model.clone().unwrap();
        assert_eq!(
            model.as_str(),
            "arn:aws-us-gov:bedrock:us-gov-west-1:123456789012:inference-profile/us-gov.anthropic.claude-3-5-sonnet-20240620-v1:0"
        );
        assert!(model.is_arn());
        assert_eq!(model.arn_partition(), Some("aws-us-gov"));
        assert_eq!(route.path(), Some(format!("/model/{raw}/converse")));

        let commercial = post("/model/arn:aws:bedrock:us-east-1::foundation-model%2Fx.y/invoke")
            .unwrap()
            .model
            .unwrap();
        assert_eq!(commercial.arn_partition(), Some("aws"));
        assert!(!ModelId::new("us.anthropic.x").is_arn());
        assert_eq!(ModelId::new("us.anthropic.x").arn_partition(), None);
    }

    #[test]
    fn guardrail_and_async_invoke_routes() {
        let route = post("/guardrail/gr-abc123/version/DRAFT/apply").unwrap();
        assert_eq!(route.operation, Operation::ApplyGuardrail);
        assert_eq!(
            route.guardrail,
            Some(Guardrail {
                identifier: "gr-abc123".into(),
                version: "DRAFT".into()
            })
        );
        assert_eq!(route.model, None);

        assert_eq!(
            post("/async-invoke").unwrap().operation,
            Operation::StartAsyncInvoke
        );
        let list = Route::parse(
            &Method::GET,
            "/async-invoke?maxResults=5&statusEquals=Completed",
        )
        .unwrap();
        assert_eq!(list.operation, Operation::ListAsyncInvokes);
        let get = Route::parse(
            &Method::GET,
            "/async-invoke/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aasync-invoke%2Fabc",
        )
        .unwrap();
        assert_eq!(get.operation, Operation::GetAsyncInvoke);
        assert_eq!(
            get.invocation_arn.as_deref(),
            Some("arn:aws:bedrock:us-east-1:123456789012:async-invoke/abc")
        );
    }

    #[test]
    fn query_string_is_ignored() {
        let route = post("/model/m/converse?x=1").unwrap();
        assert_eq!(route.operation, Operation::Converse);
        assert_eq!(route.path().as_deref(), Some("/model/m/converse"));
    }

    #[test]
    fn unknown_paths_wrong_methods_and_control_plane_calls_are_unknown_operation_404() {
        let cases = [
            (Method::POST, "/"),
            (Method::POST, ""),
            (Method::POST, "model/m/invoke"),
            (Method::POST, "/model/m/generate"),
            (Method::POST, "/model/m/invoke/"),
            (Method::POST, "/model/m"),
            (Method::POST, "/models/m/invoke"),
            (Method::POST, "/Model/m/invoke"),
            (Method::GET, "/model/m/invoke"),
            (Method::PUT, "/model/m/converse"),
            (Method::DELETE, "/async-invoke/x"),
            (Method::POST, "/async-invoke/x"),
            (Method::POST, "/guardrail/g/version/1"),
            (Method::POST, "/foundation-models"),
            // Control-plane writes and shapes the discovery reads do not have.
            (Method::POST, "/inference-profiles"),
            (Method::DELETE, "/inference-profiles/us.x"),
            (Method::PATCH, "/inference-profiles/us.x"),
            (Method::PUT, "/foundation-models/m"),
            (Method::DELETE, "/guardrails/gr1"),
            (Method::GET, "/guardrails"),
            (Method::POST, "/guardrails"),
            (Method::GET, "/foundation-models/a/b"),
            (Method::GET, "/inference-profiles/x/tags"),
            (Method::GET, "/foundation-models%2Fx"),
            (Method::HEAD, "/foundation-models"),
            (Method::OPTIONS, "/foundation-models"),
            (Method::GET, "/custom-models"),
            (Method::GET, "/model-customization-jobs"),
            (Method::POST, "/model-invocation-job"),
            (Method::GET, "//foundation-models"),
            (Method::GET, "/Foundation-Models"),
        ];
        for (method, path) in cases {
            let err = Route::parse(&method, path).unwrap_err();
            assert_eq!(err.kind, ErrorType::UnknownOperation, "{method} {path}");
            assert_eq!(err.kind.status(), StatusCode::NOT_FOUND);
            assert!(err.message.contains(path), "{}", err.message);
        }
        let long = format!("/{}", "x".repeat(10_000));
        let err = post(&long).unwrap_err();
        assert_eq!(err.kind, ErrorType::UnknownOperation);
        assert!(err.message.len() < 300, "{}", err.message);
    }

    #[test]
    fn unusable_model_ids_are_validation_errors() {
        let too_long = format!("/model/{}/invoke", "a".repeat(MAX_MODEL_ID_LEN + 1));
        let cases = [
            "/model//invoke".to_string(),
            "/model/%FF%FE/invoke".to_string(),
            "/model/a%20b/invoke".to_string(),
            "/model/a%0Ab/invoke".to_string(),
            too_long,
            "/guardrail//version/1/apply".to_string(),
            "/guardrail/g/version//apply".to_string(),
        ];
        for path in cases {
            let err = post(&path).unwrap_err();
            assert_eq!(err.kind, ErrorType::Validation, "{path}");
        }
        let longest = format!("/model/{}/invoke", "a".repeat(MAX_MODEL_ID_LEN));
        assert!(post(&longest).is_ok());
    }

    #[test]
    fn model_ids_outside_bedrocks_grammar_are_refused_after_one_decode() {
        let refused = [
            // Path traversal hidden in an encoded segment.
            "anthropic.claude-x%2F..%2F..%2Fmodel%2Fmeta.llama3-70b",
            "anthropic.claude-x%2Fmeta.llama3",
            "anthropic.claude-x;meta.llama3",
            "anthropic.claude-x%3Bmeta.llama3",
            // Double encoding: `%` survives the one decode.
            "anthropic.claude-x%252F..",
            "anthropic.claude-x%25",
            "anthropic..claude",
            "..",
            "a%09b",
            "a%00b",
            "a%7Fb",
            "anthropic.claude%C3%A9",
            "anthropic.claude-*",
            "a%2Cb",
            "a%40b",
            "a~b",
            // ARNs: wrong service, unknown type, missing or extra `/`, bad fields.
            "arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fx",
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aguardrail%2Fabc",
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile",
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.x%2Fy",
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F..%2Fx",
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F",
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A12345678901x%3Afoundation-model%2Fa.b",
            "arn%3Aaws%3Abedrock%3AUS-EAST-1%3A%3Afoundation-model%2Fa.b",
            "arn%3Aazure%3Abedrock%3Aus-east-1%3A%3Afoundation-model%2Fa.b",
            "arn%3Aaws%3Abedrock%3Aus-east-1",
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Acustom-model%2Fa.b%2Fshort",
        ];
        for raw in refused {
            let path = format!("/model/{raw}/converse");
            let err = post(&path).unwrap_err();
            assert_eq!(err.kind, ErrorType::Validation, "{path}");
            assert!(err.message.contains("modelId"), "{}", err.message);
        }
        let long_arn = format!(
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/{}",
            "a".repeat(MAX_MODEL_ID_LEN)
        );
        assert_eq!(
            ModelId::parse(&long_arn).unwrap_err().kind,
            ErrorType::Validation
        );
    }

    #[test]
    fn values_are_encoded_like_the_sdks_do() {
        assert_eq!(encode_unreserved("xpart.echo"), "xpart.echo");
        assert_eq!(
            encode_unreserved("anthropic.claude-3-haiku-20240307-v1:0"),
            "anthropic.claude-3-haiku-20240307-v1%3A0"
        );
        assert_eq!(encode_unreserved("a/b c"), "a%2Fb%20c");
        assert_eq!(encode_unreserved("a+b/c=="), "a%2Bb%2Fc%3D%3D");
        assert_eq!(encode_unreserved("é~"), "%C3%A9~");
    }

    #[test]
    fn model_ids_in_bedrocks_grammar_are_accepted_and_reencoded() {
        let accepted = [
            "anthropic.claude-3-haiku-20240307-v1:0",
            "us.anthropic.claude-3-5-sonnet-20240620-v1:0",
            "Meta_Llama-3",
            "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-v2:1",
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-haiku",
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123def456",
            "arn:aws:bedrock:us-east-1:123456789012:provisioned-model/abc123def456",
            "arn:aws:bedrock:us-east-1:123456789012:custom-model/amazon.titan-text-express-v1:0:8k/abcdefghijkl",
            "arn:aws:bedrock:us-east-1:123456789012:custom-model-deployment/abc123def456",
            "arn:aws:bedrock:us-east-1:123456789012:imported-model/abc123def456",
            "arn:aws:bedrock:us-east-1:123456789012:prompt/PROMPT12345:1",
            "arn:aws:bedrock:us-east-1:123456789012:prompt-router/router-1",
            "arn:aws:bedrock:us-east-1:123456789012:default-prompt-router/anthropic.claude:1",
            "arn:aws-us-gov:bedrock:us-gov-west-1:123456789012:inference-profile/us-gov.x:0",
        ];
        for id in accepted {
            let model = ModelId::parse(id).unwrap_or_else(|e| panic!("{id}: {e}"));
            let route = post(&format!("/model/{}/invoke", model.path_segment())).unwrap();
            assert_eq!(route.model.as_ref(), Some(&model), "{id}");
            let path = route.path().unwrap();
            assert!(!path["/model/".len()..path.len() - "/invoke".len()].contains('/'));
        }
        // Whatever encoding the caller chose, the rebuilt path is the canonical one.
        let route = post("/model/%61nthropic.claude-v2%3a1/converse").unwrap();
        assert_eq!(
            route.path().as_deref(),
            Some("/model/anthropic.claude-v2%3A1/converse")
        );
        let profile = ModelId::parse("us.anthropic.claude-v2:1").unwrap();
        assert_eq!(
            route.path_with_model(&profile).as_deref(),
            Some("/model/us.anthropic.claude-v2%3A1/converse")
        );
    }

    #[test]
    fn guardrails_outside_bedrocks_grammar_are_refused() {
        let refused = [
            "/guardrail/gr%2F..%2Fx/version/1/apply",
            "/guardrail/gr;x/version/1/apply",
            "/guardrail/gr.x/version/1/apply",
            "/guardrail/gr/version/01/apply",
            "/guardrail/gr/version/123456789/apply",
            "/guardrail/gr/version/draft/apply",
            "/guardrail/gr/version/1%3B2/apply",
            "/guardrail/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aguardrail%2Fa%2Fb/version/1/apply",
            "/guardrail/arn%3Aaws%3Aiam%3Aus-east-1%3A123456789012%3Aguardrail%2Fa/version/1/apply",
        ];
        for path in refused {
            assert_eq!(
                post(path).unwrap_err().kind,
                ErrorType::Validation,
                "{path}"
            );
        }
        let arn = "/guardrail/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aguardrail%2Fabc123/version/12/apply";
        let route = post(arn).unwrap();
        assert_eq!(route.path().as_deref(), Some(arn));
        assert_eq!(
            route.guardrail.unwrap().qualified(),
            "arn:aws:bedrock:us-east-1:123456789012:guardrail/abc123:12"
        );
    }

    #[test]
    fn only_list_operations_define_query_parameters() {
        for op in Operation::ALL {
            let expected = matches!(
                op,
                Operation::ListAsyncInvokes
                    | Operation::ListFoundationModels
                    | Operation::ListInferenceProfiles
            );
            assert_eq!(!op.query_parameters().is_empty(), expected, "{op}");
        }
        assert_eq!(
            Operation::ListInferenceProfiles.query_parameters(),
            ["maxResults", "nextToken", "type"]
        );
    }

    #[test]
    fn discovery_reads_parse_on_the_bedrock_service_and_rebuild_their_paths() {
        let get = |path: &str| Route::parse(&Method::GET, path);
        let list = get("/foundation-models?byProvider=Anthropic").unwrap();
        assert_eq!(list.operation, Operation::ListFoundationModels);
        assert_eq!(list.path().as_deref(), Some("/foundation-models"));
        let profiles = get("/inference-profiles").unwrap();
        assert_eq!(profiles.operation, Operation::ListInferenceProfiles);
        assert_eq!(profiles.path().as_deref(), Some("/inference-profiles"));
        let model = get("/foundation-models/anthropic.claude-v2%3a1").unwrap();
        assert_eq!(model.operation, Operation::GetFoundationModel);
        assert_eq!(model.model, Some(ModelId::new("anthropic.claude-v2:1")));
        assert_eq!(
            model.path().as_deref(),
            Some("/foundation-models/anthropic.claude-v2%3A1")
        );
        let arn = "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.x";
        let profile = get(&format!("/inference-profiles/{arn}")).unwrap();
        assert_eq!(profile.operation, Operation::GetInferenceProfile);
        assert_eq!(
            profile.path(),
            Some(format!("/inference-profiles/{}", arn.replace("%3a", "%3A")))
        );
        let availability = get("/foundation-model-availability/amazon.titan").unwrap();
        assert_eq!(
            availability.operation,
            Operation::GetFoundationModelAvailability
        );
        assert_eq!(
            availability.path().as_deref(),
            Some("/foundation-model-availability/amazon.titan")
        );
        for op in Operation::DISCOVERY {
            assert_eq!(op.service(), Service::Bedrock, "{op}");
        }
        let runtime = Operation::ALL
            .into_iter()
            .filter(|op| op.service() == Service::BedrockRuntime)
            .count();
        assert_eq!(runtime + Operation::DISCOVERY.len(), Operation::ALL.len());
    }

    #[test]
    fn discovery_parameters_hiding_a_path_or_empty_are_validation_errors() {
        for path in [
            "/foundation-models/..%2Fguardrails",
            "/inference-profiles/a%2F..%2Fb",
            "/foundation-models/",
        ] {
            let err = Route::parse(&Method::GET, path).unwrap_err();
            assert_eq!(err.kind, ErrorType::Validation, "{path}");
        }
    }

    #[test]
    fn dialled_names_give_service_region_and_fips() {
        let bedrock = |service, region: &str, fips| {
            Dialled::Bedrock(DialledName {
                service,
                region: region.to_string(),
                fips,
            })
        };
        let cases = [
            (
                "bedrock-runtime.us-east-1.amazonaws.com",
                bedrock(Service::BedrockRuntime, "us-east-1", false),
            ),
            (
                "Bedrock-Runtime-FIPS.us-west-2.amazonaws.com.:443",
                bedrock(Service::BedrockRuntime, "us-west-2", true),
            ),
            (
                "bedrock.eu-central-1.amazonaws.com",
                bedrock(Service::Bedrock, "eu-central-1", false),
            ),
            (
                "bedrock-fips.us-gov-west-1.amazonaws.com:8443",
                bedrock(Service::Bedrock, "us-gov-west-1", true),
            ),
            ("127.0.0.1:8443", Dialled::Other),
            ("[::1]:8443", Dialled::Other),
            ("localhost", Dialled::Other),
            ("bedrock.internal.example", Dialled::Other),
            (
                "bedrock-agent-runtime.us-east-1.amazonaws.com",
                Dialled::OtherAwsService("bedrock-agent-runtime.us-east-1.amazonaws.com".into()),
            ),
            (
                "x.bedrock-runtime.us-east-1.amazonaws.com",
                Dialled::OtherAwsService("x.bedrock-runtime.us-east-1.amazonaws.com".into()),
            ),
            (
                "bedrock-runtime.amazonaws.com",
                Dialled::OtherAwsService("bedrock-runtime.amazonaws.com".into()),
            ),
            (
                "bedrock-runtime.US_EAST.amazonaws.com",
                Dialled::OtherAwsService("bedrock-runtime.us_east.amazonaws.com".into()),
            ),
            (
                "bedrock-runtime-fips-fips.us-east-1.amazonaws.com",
                Dialled::OtherAwsService(
                    "bedrock-runtime-fips-fips.us-east-1.amazonaws.com".into(),
                ),
            ),
        ];
        for (host, expected) in cases {
            assert_eq!(DialledName::parse(host), expected, "{host}");
        }
        assert_eq!(
            DialledName::all_for_region("us-west-2"),
            [
                "bedrock-runtime.us-west-2.amazonaws.com",
                "bedrock-runtime-fips.us-west-2.amazonaws.com",
                "bedrock.us-west-2.amazonaws.com",
                "bedrock-fips.us-west-2.amazonaws.com",
            ]
        );
        assert!(is_region_name("ap-southeast-2"));
        assert!(!is_region_name("us-east"));
        assert!(!is_region_name("us--1"));
        assert_eq!("bedrock".parse::<Service>(), Ok(Service::Bedrock));
        assert!("s3".parse::<Service>().is_err());
    }

    #[test]
    fn operation_names_round_trip() {
        for op in Operation::ALL {
            assert_eq!(op.name().parse::<Operation>(), Ok(op));
            assert_eq!(op.to_string(), op.name());
            let json = serde_json::to_string(&op).unwrap();
            assert_eq!(json, format!("\"{}\"", op.name()));
            assert_eq!(serde_json::from_str::<Operation>(&json).unwrap(), op);
        }
        let err = "Invoke".parse::<Operation>().unwrap_err();
        assert!(err.to_string().contains("\"Invoke\""));
        assert!(err
            .to_string()
            .contains("InvokeModel, InvokeModelWithResponseStream"));
        assert!("converse".parse::<Operation>().is_err());
    }

    #[test]
    fn glob_matching() {
        let cases = [
            ("*", "", true),
            ("*", "anything:at/all", true),
            (
                "anthropic.claude-*",
                "anthropic.claude-3-haiku-20240307-v1:0",
                true,
            ),
            ("anthropic.claude-*", "anthropic.claude-", true),
            ("*.anthropic.*", "us.anthropic.claude", true),
            ("*-v1:0", "anthropic.claude-v1:0", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYbZc", true),
            ("a**c", "ac", true),
            ("a*a", "aa", true),
            ("a*a*a", "aaa", true),
            ("exact", "exact", true),
            ("", "", true),
            ("anthropic.claude-*", "Anthropic.claude-3", false),
            ("anthropic.claude-*", "us.anthropic.claude-3", false),
            ("anthropic.claude-*", "anthropic.claude", false),
            ("exact", "exactly", false),
            ("exact", "inexact", false),
            ("a*b*c", "acb", false),
            ("a*a", "a", false),
            ("a*a*a", "aa", false),
            ("*-v1:0", "x-v1:0:extra", false),
            ("", "x", false),
            ("?", "x", false),
        ];
        for (pattern, text, matches) in cases {
            assert_eq!(
                glob_match(pattern, text),
                matches,
                "{pattern:?} against {text:?}"
            );
        }
        assert!(ModelId::new("us.anthropic.claude-3").matches("us.anthropic.*"));
    }

    #[test]
    fn error_status_and_codes_follow_bedrock() {
        // One row per kind, in the order of `ErrorType::ALL`.
        let expected = [
            (403, "AccessDeniedException"),
            (400, "ValidationException"),
            (400, "ServiceQuotaExceededException"),
            (400, "ConflictException"),
            (404, "ResourceNotFoundException"),
            (408, "ModelTimeoutException"),
            (424, "ModelErrorException"),
            (424, "ModelStreamErrorException"),
            (429, "ThrottlingException"),
            (429, "ModelNotReadyException"),
            (500, "InternalServerException"),
            (503, "ServiceUnavailableException"),
            (403, "UnrecognizedClientException"),
            (403, "InvalidSignatureException"),
            (404, "UnknownOperationException"),
        ];
        assert_eq!(expected.len(), ErrorType::ALL.len());
        for (kind, (status, code)) in ErrorType::ALL.into_iter().zip(expected) {
            assert_eq!(kind.status().as_u16(), status, "{code}");
            assert_eq!(kind.code(), code);
            assert_eq!(ErrorType::from_code(code), Some(kind));
            assert_eq!(
                ErrorType::from_code(&format!("{code}:{ERROR_TYPE_NAMESPACE}")),
                Some(kind)
            );
        }
        assert_eq!(ErrorType::from_code("NoSuchException"), None);
    }

    #[tokio::test]
    async fn error_response_has_bedrock_shape() {
        let err = BedrockError::throttling("Too many requests, please wait \"now\".");
        let response = err.into_response("req-123");
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let headers = response.headers();
        assert_eq!(
            headers["x-amzn-ErrorType"],
            "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"
        );
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["x-amzn-RequestId"], "req-123");
        assert_eq!(headers["x-xpart-request-id"], "req-123");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"message": "Too many requests, please wait \"now\"."})
        );
    }

    #[test]
    fn hop_by_hop_headers_and_connection_listed_ones_are_removed() {
        let mut headers = header_map(&[
            ("connection", "keep-alive, x-custom-hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic abc"),
            ("x-custom-hop", "1"),
            ("content-type", "application/json"),
            ("x-amzn-bedrock-trace", "ENABLED"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(names(&headers), ["content-type", "x-amzn-bedrock-trace"]);
    }

    #[test]
    fn caller_credentials_are_removed_and_bedrock_headers_kept() {
        let mut headers = header_map(&[
            ("authorization", "Bearer bedrock-api-key-secret"),
            ("x-amz-security-token", "token"),
            ("x-amz-date", "20250101T000000Z"),
            ("x-amz-content-sha256", "abc"),
            ("x-amz-signature", "sig"),
            ("x-amz-signature-extra", "sig"),
            ("cookie", "a=b"),
            ("content-type", "application/json"),
            ("accept", "application/json"),
            ("x-amzn-bedrock-guardrailidentifier", "gr"),
            ("x-amz-user-agent", "boto3"),
        ]);
        strip_caller_credentials(&mut headers);
        assert_eq!(
            names(&headers),
            [
                "accept",
                "content-type",
                "x-amz-user-agent",
                "x-amzn-bedrock-guardrailidentifier"
            ]
        );
    }

    /// A header map of `pairs`, for the tests of this crate's modules too.
    pub(crate) fn header_map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|&(name, value)| {
                (
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    /// The names in `headers`, sorted.
    pub(crate) fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn error_code_is_the_part_before_the_namespace() {
        let mut headers = HeaderMap::new();
        assert_eq!(error_code(&headers), None);
        let cases = [
            (
                "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/",
                "ThrottlingException",
            ),
            ("AccessDeniedException", "AccessDeniedException"),
            ("", ""),
        ];
        for (value, code) in cases {
            headers.insert(ERROR_TYPE_HEADER, HeaderValue::from_static(value));
            assert_eq!(error_code(&headers), Some(code), "{value}");
        }
        let response = BedrockError::new(ErrorType::ModelTimeout, "slow").into_response("id");
        assert_eq!(
            error_code(response.headers()),
            Some(ErrorType::ModelTimeout.code())
        );
        headers.insert(
            ERROR_TYPE_HEADER,
            HeaderValue::from_bytes(b"Bad\xffCode").expect("opaque value"),
        );
        assert_eq!(error_code(&headers), None);
    }
}
