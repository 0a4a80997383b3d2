//! Filtering the control plane's list answers: ListFoundationModels' `modelSummaries[]` by
//! `modelId`, ListInferenceProfiles' `inferenceProfileSummaries[]` by `inferenceProfileId`
//! ([`Operation::listed`]). The relay filters by its `[policy]`, the agent by the principal's
//! `models`, with the same function, so what a caller lists is what both let it call.
//!
//! Every other member (`nextToken` included) passes unchanged: pagination works, and a page
//! may hold fewer entries than `maxResults` asked for (even none) while `nextToken` says more
//! follow.

use serde_json::{Map, Value};

use crate::Operation;

/// The most a list answer may be before it is filtered. Bedrock's lists are tens of
/// kilobytes; the bound only keeps memory in check.
pub const MAX_LIST_BYTES: usize = 16 * 1024 * 1024;

/// Why a list answer could not be filtered. Never passed through unfiltered instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("the answer is not a JSON object: {0}")]
    NotJson(String),
    #[error("the answer's {0} is not a list")]
    NotAList(&'static str),
}

/// Keep the entries of `operation`'s list whose id `allowed` accepts; an entry without a
/// string id is dropped. `body` unchanged for an operation that lists nothing.
pub fn filter_list(
    operation: Operation,
    body: &[u8],
    allowed: impl Fn(&str) -> bool,
) -> Result<Vec<u8>, FilterError> {
    let Some((list, id)) = operation.listed() else {
        return Ok(body.to_vec());
    };
    let mut answer: Map<String, Value> =
        serde_json::from_slice(body).map_err(|err| FilterError::NotJson(err.to_string()))?;
    match answer.get_mut(list) {
        None => {}
        Some(Value::Null) => {}
        Some(Value::Array(entries)) => {
            entries.retain(|entry| entry.get(id).and_then(Value::as_str).is_some_and(&allowed))
        }
        Some(_) => return Err(FilterError::NotAList(list)),
    }
    serde_json::to_vec(&answer).map_err(|err| FilterError::NotJson(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ids(value: &Value, list: &str, id: &str) -> Vec<String> {
        value[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e[id].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn model_summaries_are_kept_only_when_allowed() {
        let body = json!({
            "modelSummaries": [
                {"modelId": "anthropic.claude-v2:1", "providerName": "Anthropic"},
                {"modelId": "meta.llama3", "providerName": "Meta"},
                {"providerName": "no id"},
                {"modelId": 7},
                {"modelId": "anthropic.claude-3-haiku", "providerName": "Anthropic"}
            ]
        });
        let out = kept_by_prefix(Operation::ListFoundationModels, &body, "anthropic.");
        assert_eq!(
            ids(&out, "modelSummaries", "modelId"),
            ["anthropic.claude-v2:1", "anthropic.claude-3-haiku"]
        );
    }

    #[test]
    fn profile_pages_keep_their_next_token() {
        let body = json!({
            "inferenceProfileSummaries": [
                {"inferenceProfileId": "us.anthropic.x", "models": []},
                {"inferenceProfileId": "eu.anthropic.x", "models": []}
            ],
            "nextToken": "page-2"
        });
        let out = kept_by_prefix(Operation::ListInferenceProfiles, &body, "us.");
        assert_eq!(
            ids(&out, "inferenceProfileSummaries", "inferenceProfileId"),
            ["us.anthropic.x"]
        );
        assert_eq!(out["nextToken"], "page-2");
        let none = filter_list(
            Operation::ListInferenceProfiles,
            body.to_string().as_bytes(),
            |_| false,
        )
        .unwrap();
        let none: Value = serde_json::from_slice(&none).unwrap();
        assert_eq!(none["inferenceProfileSummaries"], json!([]));
        assert_eq!(none["nextToken"], "page-2");
    }

    /// `body` filtered as the answer of `op`, keeping the entries whose id starts with
    /// `prefix`.
    fn kept_by_prefix(op: Operation, body: &Value, prefix: &str) -> Value {
        let out =
            filter_list(op, body.to_string().as_bytes(), |id| id.starts_with(prefix)).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn answers_that_cannot_be_filtered_are_errors_not_passed_through() {
        let op = Operation::ListFoundationModels;
        assert!(matches!(
            filter_list(op, b"not json", |_| true),
            Err(FilterError::NotJson(_))
        ));
        assert!(matches!(
            filter_list(op, b"[1,2]", |_| true),
            Err(FilterError::NotJson(_))
        ));
        assert_eq!(
            filter_list(op, br#"{"modelSummaries":{"modelId":"x"}}"#, |_| true),
            Err(FilterError::NotAList("modelSummaries"))
        );
        let empty = filter_list(op, b"{}", |_| false).unwrap();
        assert_eq!(empty, b"{}");
        let get = br#"{"modelDetails":{"modelId":"meta.x"}}"#;
        assert_eq!(
            filter_list(Operation::GetFoundationModel, get, |_| false).unwrap(),
            get
        );
    }
}
