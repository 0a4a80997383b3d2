//! The OpenAI API on the agent's front, as pure translations to and from Bedrock's native
//! operations: the relay only ever sees (and checks, and signs) Converse and ConverseStream.
//!
//! [`chat`] turns a `POST /v1/chat/completions` body into a Converse request and a Converse
//! answer into a `chat.completion`; [`stream`] turns ConverseStream events into
//! `chat.completion.chunk` server-sent events, one event in, zero or more chunks out;
//! [`errors`] gives every refusal the OpenAI error shape and status, in one match; [`body`]
//! applies [`stream`] to a response body frame by frame as it arrives. [`embeddings`] turns a
//! `POST /v1/embeddings` body into InvokeModel bodies for Titan or Cohere Embed and their
//! answers into OpenAI's embedding list; [`models`] joins the discovery reads' lists into
//! OpenAI's model list. None of them does IO.

pub mod body;
pub mod chat;
pub mod embeddings;
pub mod errors;
pub mod models;
pub mod stream;

use http::Method;
use serde_json::{Map, Value};

/// `POST /v1/chat/completions`.
pub const CHAT_COMPLETIONS_PATH: &str = "/v1/chat/completions";

/// `POST /v1/embeddings`.
pub const EMBEDDINGS_PATH: &str = "/v1/embeddings";

/// An OpenAI endpoint the agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
    /// `GET /v1/models` and `GET /v1/models/{id}`.
    Models,
}

impl Endpoint {
    /// The endpoint a request is for; `None` for every path outside `/v1/`, which are
    /// Bedrock's. A `/v1/` path the agent does not serve is `Some(Err(..))`, so that it is
    /// refused in OpenAI's shape rather than Bedrock's.
    pub fn of(method: &Method, path: &str) -> Option<Result<Endpoint, Invalid>> {
        let path = path.split_once('?').map_or(path, |(path, _query)| path);
        if !path.starts_with("/v1/") {
            return None;
        }
        let endpoint = match (method, path) {
            (&Method::POST, CHAT_COMPLETIONS_PATH) => Ok(Endpoint::ChatCompletions),
            (&Method::POST, EMBEDDINGS_PATH) => Ok(Endpoint::Embeddings),
            (&Method::GET, models::MODELS_PATH) => Ok(Endpoint::Models),
            (&Method::GET, _) if models::id_in_path(path).is_some() => Ok(Endpoint::Models),
            _ => Err(Invalid::not_found(format!(
                "This xpart agent serves POST {CHAT_COMPLETIONS_PATH}, POST {EMBEDDINGS_PATH}, GET {} and GET {}/{{id}} of the OpenAI API; {method} {} is not served.",
                models::MODELS_PATH,
                models::MODELS_PATH,
                shown(path)
            ))),
        };
        Some(endpoint)
    }

    /// How the audit line names the endpoint.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "openai /v1/chat/completions",
            Endpoint::Embeddings => "openai /v1/embeddings",
            Endpoint::Models => "openai /v1/models",
        }
    }
}

/// A request body as the JSON object every OpenAI request is, with only the parameters its
/// endpoint's `check` lets through, and its `model`: a non-empty string, or refused with
/// `model_rule`, which says what it must name.
fn model_request(
    body: &[u8],
    check: fn(&Map<String, Value>) -> Result<(), Invalid>,
    model_rule: &str,
) -> Result<(Map<String, Value>, String), Invalid> {
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| Invalid::body(format!("The request body is not valid JSON ({e}).")))?;
    let Value::Object(request) = request else {
        return Err(Invalid::body("The request body must be a JSON object."));
    };
    check(&request)?;
    let model = match request.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        _ => return Err(Invalid::new("model", model_rule)),
    };
    Ok((request, model))
}

/// OpenAI's optional `user`, kept for the audit line.
fn optional_user(request: &Map<String, Value>) -> Result<Option<String>, Invalid> {
    match request.get("user") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(user)) => Ok(Some(user.clone())),
        Some(_) => Err(Invalid::new("user", "`user` must be a string.")),
    }
}

/// An optional boolean parameter.
fn optional_bool(map: &Map<String, Value>, name: &str) -> Result<Option<bool>, Invalid> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(_) => Err(Invalid::new(
            name,
            format!("`{name}` must be true or false."),
        )),
    }
}

/// A request the OpenAI translation refuses: 400 `invalid_request_error` (or 404 for a path
/// not served), naming the parameter at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub message: String,
    /// The parameter at fault, as OpenAI names it (`messages[1].content[0].image_url`).
    pub param: Option<String>,
    /// OpenAI's machine-readable code, where it has one.
    pub code: Option<&'static str>,
    pub not_found: bool,
}

impl Invalid {
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            message: message.into(),
            param: Some(param.into()),
            code: None,
            not_found: false,
        }
    }

    /// A request refused as a whole (its body), no one parameter at fault.
    pub fn body(message: impl Into<String>) -> Invalid {
        Invalid {
            message: message.into(),
            param: None,
            code: None,
            not_found: false,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Invalid {
        self.code = Some(code);
        self
    }

    /// A model id that is not in the principal's model list: 404 `model_not_found`.
    pub fn model_not_found(id: &str) -> Invalid {
        Invalid {
            message: format!(
                "The model `{}` does not exist or you do not have access to it.",
                shown(id)
            ),
            param: Some("model".to_owned()),
            code: Some("model_not_found"),
            not_found: true,
        }
    }

    fn not_found(message: String) -> Invalid {
        Invalid {
            message,
            param: None,
            code: Some("unknown_url"),
            not_found: true,
        }
    }
}

/// At most this much of a caller's text is quoted back in an error.
const MAX_QUOTED_CHARS: usize = 100;

fn shown(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}
