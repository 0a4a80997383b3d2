//! `GET /v1/models` and `GET /v1/models/{id}` from Bedrock's discovery answers: the
//! ListFoundationModels and ListInferenceProfiles lists (already filtered to what the relay's
//! policy and the principal's `models` allow) become one OpenAI `list` of `model` objects,
//! foundation models first, then inference profiles, each id once.
//!
//! `created` is a profile's `createdAt` (Unix seconds); foundation models carry no date, so
//! theirs is 0. `owned_by` is the model's provider (`Anthropic`, `Amazon`, …) or, for an
//! inference profile, `aws` (system-defined) or `account` (an application profile).

use serde_json::{json, Value};

/// `GET /v1/models`.
pub const MODELS_PATH: &str = "/v1/models";

/// The `list` of every model in the answers, in their order.
pub fn list(foundation: &Value, profiles: &[Value]) -> Value {
    let mut data: Vec<Value> = Vec::new();
    let models = foundation["modelSummaries"]
        .as_array()
        .into_iter()
        .flatten();
    let profiles = profiles.iter().flat_map(|page| {
        page["inferenceProfileSummaries"]
            .as_array()
            .into_iter()
            .flatten()
    });
    let objects = models
        .filter_map(foundation_model)
        .chain(profiles.filter_map(inference_profile));
    for object in objects {
        if !data.iter().any(|seen| seen["id"] == object["id"]) {
            data.push(object);
        }
    }
    json!({"object": "list", "data": data})
}

/// The model named `id` in a [`list`], if it is there.
pub fn find(list: &Value, id: &str) -> Option<Value> {
    list["data"]
        .as_array()?
        .iter()
        .find(|model| model["id"].as_str() == Some(id))
        .cloned()
}

/// The id in a `/v1/models/{id}` path, percent-decoded (an ARN's `/` and `:` may come
/// encoded); `None` for `/v1/models` itself or an id that is not UTF-8.
pub fn id_in_path(path: &str) -> Option<String> {
    let encoded = path.strip_prefix(MODELS_PATH)?.strip_prefix('/')?;
    if encoded.is_empty() {
        return None;
    }
    let bytes = encoded.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).ok()
}

fn foundation_model(summary: &Value) -> Option<Value> {
    let id = summary["modelId"].as_str()?;
    let owner = summary["providerName"].as_str().unwrap_or("aws");
    Some(json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
}

fn inference_profile(summary: &Value) -> Option<Value> {
    let id = summary["inferenceProfileId"].as_str()?;
    let owner = match summary["type"].as_str() {
        Some("APPLICATION") => "account",
        _ => "aws",
    };
    let created = summary["createdAt"]
        .as_str()
        .and_then(unix_seconds)
        .unwrap_or(0);
    Some(json!({"id": id, "object": "model", "created": created, "owned_by": owner}))
}

/// Seconds since 1970 of an RFC 3339 UTC time (`2024-08-23T00:00:00Z`, fractions and a zero
/// offset allowed), as Bedrock writes `createdAt`.
fn unix_seconds(time: &str) -> Option<u64> {
    let number = |range: std::ops::Range<usize>| time.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), March-based years.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foundation_models_then_profiles_become_one_openai_list() {
        let foundation = json!({"modelSummaries": [
            {"modelId": "anthropic.claude-3-haiku-20240307-v1:0", "providerName": "Anthropic"},
            {"modelId": "amazon.titan-embed-text-v2:0", "providerName": "Amazon"},
        ]});
        let pages = [
            json!({"inferenceProfileSummaries": [{"inferenceProfileId": "us.anthropic.claude-3-haiku-20240307-v1:0",
                "type": "SYSTEM_DEFINED", "createdAt": "2024-08-23T00:00:00Z"}], "nextToken": "t"}),
            json!({"inferenceProfileSummaries": [{"inferenceProfileId": "my-app", "type": "APPLICATION",
                "createdAt": "2025-01-02T03:04:05.678Z"}]}),
        ];
        let listed = list(&foundation, &pages);
        assert_eq!(listed["object"], "list");
        let ids: Vec<&str> = listed["data"]
            .as_array()
            .expect("data")
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        assert_eq!(
            ids,
            [
                "anthropic.claude-3-haiku-20240307-v1:0",
                "amazon.titan-embed-text-v2:0",
                "us.anthropic.claude-3-haiku-20240307-v1:0",
                "my-app"
            ]
        );
        assert_eq!(
            listed["data"][0],
            json!({"id": "anthropic.claude-3-haiku-20240307-v1:0", "object": "model", "created": 0, "owned_by": "Anthropic"})
        );
        assert_eq!(listed["data"][2]["created"], 1_724_371_200);
        assert_eq!(listed["data"][2]["owned_by"], "aws");
        assert_eq!(listed["data"][3]["created"], 1_735_787_045);
        assert_eq!(listed["data"][3]["owned_by"], "account");
        assert_eq!(
            find(&listed, "my-app").map(|m| m["owned_by"].clone()),
            Some(json!("account"))
        );
        assert_eq!(find(&listed, "nope"), None);
        assert_eq!(list(&json!({}), &[])["data"], json!([]));
    }

    #[test]
    fn ids_in_paths_are_percent_decoded() {
        assert_eq!(
            id_in_path("/v1/models/anthropic.claude-3-haiku-20240307-v1:0").as_deref(),
            Some("anthropic.claude-3-haiku-20240307-v1:0")
        );
        assert_eq!(
            id_in_path("/v1/models/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fx")
                .as_deref(),
            Some("arn:aws:bedrock:us-east-1:1:inference-profile/x")
        );
        assert_eq!(id_in_path("/v1/models"), None);
        assert_eq!(id_in_path("/v1/models/"), None);
        assert_eq!(id_in_path("/v1/models/a%2"), Some("a%2".to_owned()));
    }
}
