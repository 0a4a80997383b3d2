//! `POST /v1/embeddings` ↔ InvokeModel, for the two embedding families Bedrock serves:
//!
//! - **Titan Text Embeddings** (`amazon.titan-embed-text-v2:0`, and v1): one input per call,
//!   so an array `input` fans out to one InvokeModel per string. `dimensions` is Titan v2's
//!   (256, 512 or 1024); vectors are normalized, as OpenAI's are, unless the caller sends the
//!   xpart extension `normalize: false`. The relay's echo embedding model (a model id ending
//!   in `echo-embed`, `xpart.echo-embed` by default) speaks Titan's shape.
//! - **Cohere Embed** (`cohere.embed-english-v3`, `cohere.embed-multilingual-v3`, and
//!   `cohere.embed-v4:0`): batched, up to [`COHERE_BATCH`] texts a call. `input_type` (an
//!   xpart extension, Cohere's own parameter) defaults to `search_document`; v4 takes
//!   `dimensions` as its `output_dimension`, v3 only its native 1024.
//!
//! The parameter rule is chat's: the names below are translated, `user` is recorded in the
//! audit line, anything else is refused (400, `param` names it). Token arrays as `input`
//! (OpenAI's pre-tokenized form) are refused: Bedrock's embedding models take text.
//! `encoding_format: "base64"` returns each vector as the base64 of its little-endian
//! `f32`s, as OpenAI does (the official SDKs ask for it by default and decode it).

use base64::Engine;
use serde_json::{json, Map, Value};

use super::{model_request, optional_bool, optional_user, shown, Invalid};

/// Parameters translated into the InvokeModel bodies (`input_type` and `normalize` are
/// xpart extensions, sent by OpenAI SDKs through `extra_body`).
const TRANSLATED: [&str; 7] = [
    "model",
    "input",
    "encoding_format",
    "dimensions",
    "user",
    "input_type",
    "normalize",
];

/// OpenAI's own limit on the number of inputs in one request.
pub const MAX_INPUTS: usize = 2048;

/// Cohere Embed's limit on texts in one InvokeModel call.
pub const COHERE_BATCH: usize = 96;

/// Titan Text Embeddings v2's output sizes.
const TITAN_V2_DIMENSIONS: [u64; 3] = [256, 512, 1024];

/// Cohere Embed v4's output sizes.
const COHERE_V4_DIMENSIONS: [u64; 4] = [256, 512, 1024, 1536];

/// Cohere's `input_type` values.
const COHERE_INPUT_TYPES: [&str; 4] = [
    "search_document",
    "search_query",
    "classification",
    "clustering",
];

/// Which request and answer shape a model speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    TitanV1,
    TitanV2,
    CohereV3,
    CohereV4,
}

impl Family {
    /// The family of a model id (a foundation-model id, an inference-profile id with a
    /// region prefix, or an ARN ending in either); `None` for a model that is not one of
    /// Bedrock's text embedding models.
    pub fn of(model: &str) -> Option<Family> {
        let name = model.rsplit('/').next().unwrap_or(model);
        if name.ends_with("echo-embed") || name.contains("amazon.titan-embed-text-v2") {
            return Some(Family::TitanV2);
        }
        if name.contains("amazon.titan-embed-text-v1") {
            return Some(Family::TitanV1);
        }
        if name.contains("cohere.embed-v4") {
            return Some(Family::CohereV4);
        }
        if name.contains("cohere.embed-english-v3") || name.contains("cohere.embed-multilingual-v3")
        {
            return Some(Family::CohereV3);
        }
        None
    }

    fn is_cohere(self) -> bool {
        match self {
            Family::TitanV1 => false,
            Family::TitanV2 => false,
            Family::CohereV3 => true,
            Family::CohereV4 => true,
        }
    }
}

/// How vectors go back to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Float,
    /// Base64 of the little-endian `f32`s.
    Base64,
}

/// An embeddings request, translated.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsCall {
    /// The model id as the caller named it.
    pub model: String,
    /// The model's family, which decides the shape of its bodies and answers.
    pub family: Family,
    /// `encoding_format`.
    pub encoding: Encoding,
    /// OpenAI's `user`, for the audit line.
    pub user: Option<String>,
    /// The InvokeModel bodies, in input order: one per input (Titan) or per batch (Cohere).
    pub invocations: Vec<Value>,
    /// How many inputs the request has (the number of vectors to answer with).
    pub inputs: usize,
}

/// What a request's `model` must name.
const MODEL_RULE: &str = "`model` must be a non-empty string naming a Bedrock embedding model id.";

/// Translates an embeddings request body.
pub fn translate_request(body: &[u8]) -> Result<EmbeddingsCall, Invalid> {
    let (request, model) = model_request(body, check_parameters, MODEL_RULE)?;
    let request = &request;
    let Some(family) = Family::of(&model) else {
        return Err(Invalid::new(
            "model",
            format!("{} is not an embedding model this xpart agent translates: use amazon.titan-embed-text-v2:0, cohere.embed-english-v3, cohere.embed-multilingual-v3 or cohere.embed-v4:0.", shown(&model)),
        ).with_code("model_not_supported"));
    };
    let texts = inputs(request.get("input"))?;
    let encoding = match request.get("encoding_format") {
        None | Some(Value::Null) => Encoding::Float,
        Some(Value::String(format)) if format == "float" => Encoding::Float,
        Some(Value::String(format)) if format == "base64" => Encoding::Base64,
        Some(other) => {
            return Err(not_one_of(
                "encoding_format",
                r#""float" or "base64""#,
                other,
            ))
        }
    };
    let user = optional_user(request)?;
    let dimensions = dimensions(request.get("dimensions"), family)?;
    let invocations = match family.is_cohere() {
        true => cohere_bodies(request, &texts, dimensions)?,
        false => titan_bodies(request, family, &texts, dimensions)?,
    };
    Ok(EmbeddingsCall {
        model,
        family,
        encoding,
        user,
        inputs: texts.len(),
        invocations,
    })
}

fn check_parameters(request: &Map<String, Value>) -> Result<(), Invalid> {
    match request.keys().find(|name| !TRANSLATED.contains(&name.as_str())) {
        None => Ok(()),
        Some(name) => Err(Invalid::new(
            name.as_str(),
            format!("Unrecognized request argument supplied: {name}. This xpart agent translates embeddings to Bedrock's InvokeModel and refuses parameters it cannot honour."),
        ).with_code("unsupported_parameter")),
    }
}

/// A parameter whose value is not one the model takes; `allowed` says which are.
fn not_one_of(param: &str, allowed: &str, value: &Value) -> Invalid {
    let value = shown(&value.to_string());
    Invalid::new(param, format!("`{param}` must be {allowed}, not {value}."))
}

fn inputs(input: Option<&Value>) -> Result<Vec<&str>, Invalid> {
    let tokens = || {
        Invalid::new(
            "input",
            "Token arrays are not supported as `input`: Bedrock's embedding models take text. Send the text (a string or an array of strings).",
        )
    };
    let texts: Vec<&str> = match input {
        Some(Value::String(text)) => vec![text],
        Some(Value::Array(list)) if list.is_empty() => {
            return Err(Invalid::new("input", "`input` must not be an empty array."))
        }
        Some(Value::Array(list)) => {
            let mut texts = Vec::with_capacity(list.len());
            for item in list {
                match item {
                    Value::String(text) => texts.push(text.as_str()),
                    Value::Number(_) => return Err(tokens()),
                    Value::Array(_) => return Err(tokens()),
                    _ => {
                        return Err(Invalid::new(
                            "input",
                            "`input` must be a string or an array of strings.",
                        ))
                    }
                }
            }
            texts
        }
        _ => {
            return Err(Invalid::new(
                "input",
                "`input` must be a string or an array of strings.",
            ))
        }
    };
    if texts.len() > MAX_INPUTS {
        return Err(Invalid::new(
            "input",
            format!(
                "`input` has {} items; at most {MAX_INPUTS} are accepted in one request.",
                texts.len()
            ),
        ));
    }
    if let Some(at) = texts.iter().position(|text| text.is_empty()) {
        return Err(Invalid::new(
            "input",
            format!("`input` item {at} is empty; every input must have text."),
        ));
    }
    Ok(texts)
}

fn dimensions(value: Option<&Value>, family: Family) -> Result<Option<u64>, Invalid> {
    let requested = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_u64(),
        Some(_) => None,
    };
    let Some(requested) = requested else {
        return Err(Invalid::new(
            "dimensions",
            "`dimensions` must be a positive integer.",
        ));
    };
    let (allowed, native): (&[u64], bool) = match family {
        Family::TitanV2 => (&TITAN_V2_DIMENSIONS, false),
        Family::TitanV1 => (&[1536], true),
        Family::CohereV3 => (&[1024], true),
        Family::CohereV4 => (&COHERE_V4_DIMENSIONS, false),
    };
    if !allowed.contains(&requested) {
        return Err(Invalid::new(
            "dimensions",
            format!(
                "`dimensions` = {requested} is not supported by this model; it takes {allowed:?}."
            ),
        ));
    }
    // A model with one fixed size is not told the size it always answers with.
    Ok((!native).then_some(requested))
}

fn titan_bodies(
    request: &Map<String, Value>,
    family: Family,
    texts: &[&str],
    dimensions: Option<u64>,
) -> Result<Vec<Value>, Invalid> {
    let normalize = optional_bool(request, "normalize")?.unwrap_or(true);
    if request.get("input_type").is_some_and(|v| !v.is_null()) {
        return Err(Invalid::new(
            "input_type",
            "`input_type` is Cohere Embed's; Titan Text Embeddings has no such setting.",
        ));
    }
    let bodies = texts
        .iter()
        .map(|text| {
            let mut body = Map::new();
            body.insert("inputText".into(), json!(text));
            if family == Family::TitanV2 {
                if let Some(dimensions) = dimensions {
                    body.insert("dimensions".into(), json!(dimensions));
                }
                body.insert("normalize".into(), json!(normalize));
                body.insert("embeddingTypes".into(), json!(["float"]));
            }
            Value::Object(body)
        })
        .collect();
    match (family, normalize) {
        (Family::TitanV1, false) => Err(Invalid::new(
            "normalize",
            "Titan Text Embeddings v1 always normalizes; `normalize: false` needs v2.",
        )),
        _ => Ok(bodies),
    }
}

/// `dimensions` is only ever set for Cohere Embed v4: v3 has one fixed size.
fn cohere_bodies(
    request: &Map<String, Value>,
    texts: &[&str],
    dimensions: Option<u64>,
) -> Result<Vec<Value>, Invalid> {
    let input_type = match request.get("input_type") {
        None | Some(Value::Null) => "search_document",
        Some(Value::String(kind)) if COHERE_INPUT_TYPES.contains(&kind.as_str()) => kind,
        Some(other) => {
            let allowed = format!("one of {COHERE_INPUT_TYPES:?}");
            return Err(not_one_of("input_type", &allowed, other));
        }
    };
    match request.get("normalize") {
        None | Some(Value::Null) | Some(Value::Bool(true)) => {}
        Some(_) => {
            return Err(Invalid::new(
                "normalize",
                "Cohere Embed always normalizes; `normalize` may only be true.",
            ))
        }
    }
    let bodies = texts
        .chunks(COHERE_BATCH)
        .map(|batch| {
            let mut body = Map::new();
            body.insert("texts".into(), json!(batch));
            body.insert("input_type".into(), json!(input_type));
            body.insert("embedding_types".into(), json!(["float"]));
            if let Some(dimensions) = dimensions {
                body.insert("output_dimension".into(), json!(dimensions));
            }
            Value::Object(body)
        })
        .collect();
    Ok(bodies)
}

/// One InvokeModel answer: its body and the input-token count Bedrock reports in the
/// `X-Amzn-Bedrock-Input-Token-Count` header, if it did.
#[derive(Debug, Clone)]
pub struct Invoked {
    pub body: Value,
    pub input_tokens: Option<u64>,
}

/// Bedrock's header with an InvokeModel call's input-token count.
pub const INPUT_TOKEN_COUNT_HEADER: &str = "x-amzn-bedrock-input-token-count";

/// An answer that is not the shape its model family answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unexpected(pub String);

/// The `list` of embeddings for the answers to [`EmbeddingsCall::invocations`], in order.
pub fn translate_response(call: &EmbeddingsCall, answers: &[Invoked]) -> Result<Value, Unexpected> {
    let mut vectors: Vec<&Vec<Value>> = Vec::with_capacity(call.inputs);
    let mut tokens = 0;
    for answer in answers {
        match call.family.is_cohere() {
            true => {
                vectors.extend(cohere_vectors(&answer.body)?);
                tokens += answer
                    .input_tokens
                    .or_else(|| answer.body["meta"]["billed_units"]["input_tokens"].as_u64())
                    .unwrap_or(0);
            }
            false => {
                vectors.push(titan_vector(&answer.body)?);
                tokens += answer.body["inputTextTokenCount"]
                    .as_u64()
                    .or(answer.input_tokens)
                    .unwrap_or(0);
            }
        }
    }
    if vectors.len() != call.inputs {
        return Err(Unexpected(format!(
            "{} vectors came back for {} inputs",
            vectors.len(),
            call.inputs
        )));
    }
    let mut data = Vec::with_capacity(vectors.len());
    for (index, vector) in vectors.into_iter().enumerate() {
        let embedding = match call.encoding {
            Encoding::Float => Value::Array(vector.clone()),
            Encoding::Base64 => Value::String(base64_f32(vector)?),
        };
        data.push(json!({"object": "embedding", "index": index, "embedding": embedding}));
    }
    Ok(json!({
        "object": "list",
        "data": data,
        "model": call.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
}

fn titan_vector(body: &Value) -> Result<&Vec<Value>, Unexpected> {
    body["embeddingsByType"]["float"]
        .as_array()
        .or_else(|| body["embedding"].as_array())
        .ok_or_else(|| Unexpected("a Titan answer has no `embedding`".to_owned()))
}

fn cohere_vectors(body: &Value) -> Result<Vec<&Vec<Value>>, Unexpected> {
    let list = body["embeddings"]["float"]
        .as_array()
        .or_else(|| body["embeddings"].as_array())
        .ok_or_else(|| Unexpected("a Cohere answer has no float `embeddings`".to_owned()))?;
    list.iter()
        .map(|vector| {
            vector
                .as_array()
                .ok_or_else(|| Unexpected("a Cohere embedding is not an array".to_owned()))
        })
        .collect()
}

/// OpenAI's base64 encoding: the vector's `f32`s, little-endian, back to back.
fn base64_f32(vector: &[Value]) -> Result<String, Unexpected> {
    let mut bytes = Vec::with_capacity(vector.len() * 4);
    for value in vector {
        let Some(number) = value.as_f64() else {
            return Err(Unexpected("an embedding holds a non-number".to_owned()));
        };
        bytes.extend_from_slice(&(number as f32).to_le_bytes());
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(body: Value) -> Result<EmbeddingsCall, Invalid> {
        translate_request(body.to_string().as_bytes())
    }

    fn param(body: Value) -> Option<String> {
        call(body).expect_err("refused").param
    }

    #[test]
    fn titan_fans_out_one_call_per_input_with_dimensions_and_normalize() {
        let c = call(
            json!({"model": "amazon.titan-embed-text-v2:0", "input": ["a", "b", "c"],
            "dimensions": 256, "user": "u1"}),
        )
        .expect("valid");
        assert_eq!(c.family, Family::TitanV2);
        assert_eq!(c.inputs, 3);
        assert_eq!(c.user.as_deref(), Some("u1"));
        assert_eq!(
            c.invocations,
            vec![
                json!({"inputText": "a", "dimensions": 256, "normalize": true, "embeddingTypes": ["float"]}),
                json!({"inputText": "b", "dimensions": 256, "normalize": true, "embeddingTypes": ["float"]}),
                json!({"inputText": "c", "dimensions": 256, "normalize": true, "embeddingTypes": ["float"]}),
            ]
        );
        let single = call(json!({"model": "xpart.echo-embed", "input": "x", "normalize": false}))
            .expect("valid");
        assert_eq!(
            single.invocations,
            vec![json!({"inputText": "x", "normalize": false, "embeddingTypes": ["float"]})]
        );
        let v1 = call(json!({"model": "amazon.titan-embed-text-v1", "input": "x"})).expect("valid");
        assert_eq!(v1.invocations, vec![json!({"inputText": "x"})]);
    }

    #[test]
    fn cohere_batches_with_input_type() {
        let texts: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
        let c = call(json!({"model": "cohere.embed-english-v3", "input": texts})).expect("valid");
        assert_eq!(c.invocations.len(), 2);
        assert_eq!(c.invocations[0]["texts"].as_array().map(Vec::len), Some(96));
        assert_eq!(
            c.invocations[1]["texts"],
            json!(["t96", "t97", "t98", "t99"])
        );
        assert_eq!(c.invocations[0]["input_type"], "search_document");
        assert_eq!(c.invocations[0]["embedding_types"], json!(["float"]));
        let q = call(
            json!({"model": "cohere.embed-multilingual-v3", "input": "q",
            "input_type": "search_query", "dimensions": 1024}),
        )
        .expect("valid");
        assert_eq!(
            q.invocations,
            vec![
                json!({"texts": ["q"], "input_type": "search_query", "embedding_types": ["float"]})
            ]
        );
        let v4 = call(json!({"model": "us.cohere.embed-v4:0", "input": "q", "dimensions": 512}))
            .expect("valid");
        assert_eq!(v4.invocations[0]["output_dimension"], 512);
    }

    #[test]
    fn refusals_name_the_parameter() {
        let titan = "amazon.titan-embed-text-v2:0";
        assert_eq!(
            param(json!({"model": titan, "input": [[1, 2]]})).as_deref(),
            Some("input")
        );
        assert_eq!(
            param(json!({"model": titan, "input": [1, 2]})).as_deref(),
            Some("input")
        );
        assert_eq!(
            param(json!({"model": titan, "input": []})).as_deref(),
            Some("input")
        );
        assert_eq!(
            param(json!({"model": titan, "input": ""})).as_deref(),
            Some("input")
        );
        assert_eq!(param(json!({"model": titan})).as_deref(), Some("input"));
        assert_eq!(
            param(json!({"model": titan, "input": "x", "dimensions": 300})).as_deref(),
            Some("dimensions")
        );
        assert_eq!(
            param(json!({"model": "cohere.embed-english-v3", "input": "x", "dimensions": 256}))
                .as_deref(),
            Some("dimensions")
        );
        assert_eq!(
            param(json!({"model": titan, "input": "x", "encoding_format": "int8"})).as_deref(),
            Some("encoding_format")
        );
        assert_eq!(
            param(json!({"model": "anthropic.claude-3-haiku", "input": "x"})).as_deref(),
            Some("model")
        );
        assert_eq!(
            param(json!({"model": titan, "input": "x", "input_type": "search_query"})).as_deref(),
            Some("input_type")
        );
        let unknown =
            call(json!({"model": titan, "input": "x", "truncate": "END"})).expect_err("refused");
        assert_eq!(unknown.param.as_deref(), Some("truncate"));
        assert_eq!(unknown.code, Some("unsupported_parameter"));
        let too_many: Vec<&str> = vec!["x"; MAX_INPUTS + 1];
        assert_eq!(
            param(json!({"model": titan, "input": too_many})).as_deref(),
            Some("input")
        );
    }

    #[test]
    fn answers_become_a_list_in_input_order_with_usage() {
        let c = call(json!({"model": "amazon.titan-embed-text-v2:0", "input": ["a", "b"]}))
            .expect("valid");
        let answers = [
            Invoked {
                body: json!({"embedding": [0.5, -0.25], "inputTextTokenCount": 3}),
                input_tokens: None,
            },
            Invoked {
                body: json!({"embeddingsByType": {"float": [1.0, 0.0]}, "inputTextTokenCount": 4}),
                input_tokens: None,
            },
        ];
        let list = translate_response(&c, &answers).expect("translates");
        assert_eq!(list["object"], "list");
        assert_eq!(
            list["data"][0],
            json!({"object": "embedding", "index": 0, "embedding": [0.5, -0.25]})
        );
        assert_eq!(list["data"][1]["index"], 1);
        assert_eq!(
            list["usage"],
            json!({"prompt_tokens": 7, "total_tokens": 7})
        );
        assert_eq!(list["model"], "amazon.titan-embed-text-v2:0");
    }

    #[test]
    fn base64_is_little_endian_f32() {
        let c = call(
            json!({"model": "cohere.embed-english-v3", "input": ["a", "b"],
            "encoding_format": "base64"}),
        )
        .expect("valid");
        let answers = [Invoked {
            body: json!({"embeddings": {"float": [[1.0, -2.0], [0.5, 0.0]]}}),
            input_tokens: Some(5),
        }];
        let list = translate_response(&c, &answers).expect("translates");
        let engine = base64::engine::general_purpose::STANDARD;
        let bytes = engine
            .decode(list["data"][0]["embedding"].as_str().expect("a string"))
            .expect("base64");
        assert_eq!(
            bytes,
            [1.0f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat()
        );
        assert_eq!(list["usage"]["prompt_tokens"], 5);
        let meta = [Invoked {
            body: json!({"embeddings": [[1.0], [2.0]], "meta": {"billed_units": {"input_tokens": 9}}}),
            input_tokens: None,
        }];
        let c =
            call(json!({"model": "cohere.embed-english-v3", "input": ["a", "b"]})).expect("valid");
        assert_eq!(
            translate_response(&c, &meta).expect("translates")["usage"]["prompt_tokens"],
            9
        );
    }

    #[test]
    fn a_wrong_number_of_vectors_is_an_error() {
        let c =
            call(json!({"model": "cohere.embed-english-v3", "input": ["a", "b"]})).expect("valid");
        let one = [Invoked {
            body: json!({"embeddings": [[1.0]]}),
            input_tokens: None,
        }];
        assert!(translate_response(&c, &one).is_err());
        let c = call(json!({"model": "xpart.echo-embed", "input": "a"})).expect("valid");
        let shapeless = [Invoked {
            body: json!({"text": "?"}),
            input_tokens: None,
        }];
        assert!(translate_response(&c, &shapeless).is_err());
    }
}
