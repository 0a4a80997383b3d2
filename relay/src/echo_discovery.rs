//! The echo model in the control plane's discovery reads: listed by ListFoundationModels (when
//! the query's filters would list it), described by GetFoundationModel and
//! GetFoundationModelAvailability, in Bedrock's shapes. It is no inference profile, so
//! GetInferenceProfile of it is 404 and profile lists never hold it.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response};
use http_body_util::Full;
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};
use xpart_bedrock::discovery::FilterError;
use xpart_bedrock::{BedrockError, ErrorType, Operation};

/// The provider name the echo model is listed under.
pub const PROVIDER: &str = "xpart";

/// The echo model as a `FoundationModelSummary`.
pub fn summary(model: &str) -> Value {
    json!({
        "modelArn": format!("arn:aws:bedrock:::foundation-model/{model}"),
        "modelId": model,
        "modelName": "xpart echo",
        "providerName": PROVIDER,
        "inputModalities": ["TEXT"],
        "outputModalities": ["TEXT"],
        "responseStreamingSupported": true,
        "customizationsSupported": [],
        "inferenceTypesSupported": ["ON_DEMAND"],
        "modelLifecycle": {"status": "ACTIVE"},
    })
}

/// A `Get…` read of the echo model `requested`.
pub fn answer(
    operation: Operation,
    requested: &str,
) -> Result<Response<Full<Bytes>>, BedrockError> {
    match operation {
        Operation::GetFoundationModel => {
            Ok(json_response(json!({ "modelDetails": summary(requested) })))
        }
        Operation::GetFoundationModelAvailability => Ok(json_response(json!({
            "modelId": requested,
            "agreementAvailability": {"status": "AVAILABLE"},
            "authorizationStatus": "AUTHORIZED",
            "entitlementAvailability": "AVAILABLE",
            "regionAvailability": "AVAILABLE",
        }))),
        _ => Err(BedrockError::new(
            ErrorType::ResourceNotFound,
            format!(
                "{requested} is the relay's echo model, not a {}",
                noun(operation)
            ),
        )),
    }
}

fn noun(operation: Operation) -> &'static str {
    match operation {
        Operation::GetInferenceProfile => "inference profile",
        _ => "resource this operation reads",
    }
}

/// Add the echo model to a ListFoundationModels answer when `query`'s filters would list it.
/// Other operations' answers are returned unchanged.
pub fn add_to_list(
    operation: Operation,
    body: &[u8],
    model: &str,
    query: &str,
) -> Result<Vec<u8>, FilterError> {
    if operation != Operation::ListFoundationModels || !listed_by(query) {
        return Ok(body.to_vec());
    }
    let mut answer: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(|err| FilterError::NotJson(err.to_string()))?;
    let entries = answer
        .entry("modelSummaries")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(entries) = entries else {
        return Err(FilterError::NotAList("modelSummaries"));
    };
    entries.push(summary(model));
    serde_json::to_vec(&answer).map_err(|err| FilterError::NotJson(err.to_string()))
}

/// A list answer of the echo model alone: for a relay with no `bedrock` upstream, or no
/// credentials, that answers the echo model.
pub fn list_alone(operation: Operation, model: &str, query: &str) -> Response<Full<Bytes>> {
    match operation {
        Operation::ListInferenceProfiles => json_response(json!({"inferenceProfileSummaries": []})),
        _ => {
            let entries = if listed_by(query) {
                vec![summary(model)]
            } else {
                vec![]
            };
            json_response(json!({ "modelSummaries": entries }))
        }
    }
}

/// Whether ListFoundationModels' filters (`byProvider`, `byOutputModality`,
/// `byInferenceType`, `byCustomizationType`) let the echo model through.
fn listed_by(query: &str) -> bool {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .all(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode_str(value).decode_utf8_lossy();
            match name {
                "byProvider" => value.eq_ignore_ascii_case(PROVIDER),
                "byOutputModality" => value == "TEXT",
                "byInferenceType" => value == "ON_DEMAND",
                "byCustomizationType" => false,
                _ => true,
            }
        })
}

fn json_response(value: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn json_of(response: Response<Full<Bytes>>) -> Value {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn the_echo_model_is_described_in_bedrocks_shapes() {
        let got = json_of(answer(Operation::GetFoundationModel, "xpart.echo").unwrap()).await;
        assert_eq!(got["modelDetails"]["modelId"], "xpart.echo");
        assert_eq!(got["modelDetails"]["providerName"], "xpart");
        let available =
            json_of(answer(Operation::GetFoundationModelAvailability, "xpart.echo").unwrap()).await;
        assert_eq!(available["authorizationStatus"], "AUTHORIZED");
        let not_profile = answer(Operation::GetInferenceProfile, "xpart.echo").unwrap_err();
        assert_eq!(not_profile.kind, ErrorType::ResourceNotFound);
    }

    #[tokio::test]
    async fn the_echo_model_is_listed_when_the_filters_allow() {
        let upstream = br#"{"modelSummaries":[{"modelId":"anthropic.x"}]}"#;
        let out = add_to_list(Operation::ListFoundationModels, upstream, "xpart.echo", "").unwrap();
        let value: Value = serde_json::from_slice(&out).unwrap();
        let ids: Vec<&str> = value["modelSummaries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["modelId"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["anthropic.x", "xpart.echo"]);
        for (query, listed) in [
            ("byProvider=XPART", true),
            ("byProvider=Anthropic", false),
            ("byOutputModality=TEXT&byInferenceType=ON_DEMAND", true),
            ("byOutputModality=IMAGE", false),
            ("byCustomizationType=FINE_TUNING", false),
        ] {
            let alone = json_of(list_alone(
                Operation::ListFoundationModels,
                "xpart.echo",
                query,
            ))
            .await;
            assert_eq!(
                alone["modelSummaries"].as_array().unwrap().len(),
                usize::from(listed),
                "{query}"
            );
        }
        let profiles = json_of(list_alone(
            Operation::ListInferenceProfiles,
            "xpart.echo",
            "",
        ))
        .await;
        assert_eq!(profiles["inferenceProfileSummaries"], json!([]));
        let unchanged = add_to_list(
            Operation::ListInferenceProfiles,
            b"{\"x\":1}",
            "xpart.echo",
            "",
        )
        .unwrap();
        assert_eq!(unchanged, b"{\"x\":1}");
    }
}
