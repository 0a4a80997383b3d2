//! `POST /v1/chat/completions` ↔ Converse.
//!
//! The request rule for parameters: those in [`IGNORED`] are accepted and dropped because
//! they cannot change the answer (bookkeeping for OpenAI's own platform); those in
//! [`REFUSED_UNLESS_DEFAULT`] are accepted only at their no-op value, since Converse has no
//! equivalent and honouring them silently would give a different answer than asked; every
//! other name that is not translated below is refused (400, `param` names it), because the
//! agent cannot know that an unknown parameter is harmless.
//!
//! `response_format` is honoured by instruction: a `json_object` or `json_schema` request adds
//! a system prompt asking for exactly that JSON (Converse has no JSON mode of its own).
//! `reasoning_effort` becomes the model family's reasoning setting in
//! `additionalModelRequestFields` (see [`reasoning_fields`]).

use base64::Engine;
use serde_json::{json, Map, Value};

use super::{model_request, optional_bool, optional_user, shown, Invalid};

/// Parameters accepted and dropped: they do not change the answer.
pub const IGNORED: [&str; 6] = [
    "store",
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "seed",
];

/// Parameters accepted only at the value that makes them a no-op (`null`, `false`, `0`, `{}`
/// or `1` for `n`).
pub const REFUSED_UNLESS_DEFAULT: [&str; 6] = [
    "n",
    "logprobs",
    "top_logprobs",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
];

/// Parameters translated into the Converse request.
const TRANSLATED: [&str; 15] = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
    "user",
];

/// A chat completion request, translated.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatCall {
    /// The model id as the caller named it (a Bedrock model or inference-profile id).
    pub model: String,
    /// `stream: true`: ConverseStream, answered as server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    /// `parallel_tool_calls: false`: only the first tool call of an answer is passed on.
    pub single_tool_call: bool,
    /// OpenAI's `user`, for the audit line.
    pub user: Option<String>,
    /// The Converse (or ConverseStream) request body.
    pub converse: Value,
}

/// What a request's `model` must name.
const MODEL_RULE: &str =
    "`model` must be a non-empty string naming a Bedrock model or inference profile id.";

/// Translates a chat completion request body.
pub fn translate_request(body: &[u8]) -> Result<ChatCall, Invalid> {
    let (request, model) = model_request(body, check_parameters, MODEL_RULE)?;
    let request = &request;
    let stream = optional_bool(request, "stream")?.unwrap_or(false);
    let include_usage = match request.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(options)) => optional_bool(options, "include_usage")
            .map_err(|e| Invalid::new("stream_options.include_usage", e.message))?
            .unwrap_or(false),
        Some(_) => {
            return Err(Invalid::new(
                "stream_options",
                "`stream_options` must be an object.",
            ))
        }
    };
    let single_tool_call = optional_bool(request, "parallel_tool_calls")? == Some(false);
    let user = optional_user(request)?;

    let (mut system, messages) = messages(request.get("messages"))?;
    if let Some(instruction) = response_format_instruction(request.get("response_format"))? {
        system.push(json!({"text": instruction}));
    }
    let mut converse = Map::new();
    converse.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        converse.insert("system".into(), Value::Array(system));
    }
    let inference = inference_config(request)?;
    if !inference.is_empty() {
        converse.insert("inferenceConfig".into(), Value::Object(inference));
    }
    let uses_tools = converse["messages"]
        .as_array()
        .is_some_and(|list| list.iter().any(has_tool_blocks));
    if let Some(tool_config) = tool_config(request, uses_tools)? {
        converse.insert("toolConfig".into(), tool_config);
    }
    if let Some(effort) = request.get("reasoning_effort").filter(|v| !v.is_null()) {
        converse.insert(
            "additionalModelRequestFields".into(),
            reasoning_fields(&model, effort)?,
        );
    }
    Ok(ChatCall {
        model,
        stream,
        include_usage,
        single_tool_call,
        user,
        converse: Value::Object(converse),
    })
}

fn check_parameters(request: &Map<String, Value>) -> Result<(), Invalid> {
    for (name, value) in request {
        let name = name.as_str();
        if TRANSLATED.contains(&name) || IGNORED.contains(&name) {
            continue;
        }
        if REFUSED_UNLESS_DEFAULT.contains(&name) {
            if is_no_op(name, value) {
                continue;
            }
            return Err(Invalid::new(
                name,
                format!("`{name}` = {} is not supported: Bedrock's Converse API has no equivalent, and ignoring it would change the answer. Leave it out.", shown(&value.to_string())),
            ));
        }
        return Err(Invalid::new(
            name,
            format!("Unrecognized request argument supplied: {name}. This xpart agent translates chat completions to Bedrock's Converse API and refuses parameters it cannot honour."),
        ).with_code("unsupported_parameter"));
    }
    Ok(())
}

fn is_no_op(name: &str, value: &Value) -> bool {
    match (name, value) {
        (_, Value::Null) => true,
        ("n", Value::Number(n)) => n.as_u64() == Some(1),
        ("logprobs", Value::Bool(false)) => true,
        (_, Value::Number(n)) => n.as_f64() == Some(0.0),
        ("logit_bias", Value::Object(map)) => map.is_empty(),
        _ => false,
    }
}

/// The Converse `system` blocks and `messages`. Consecutive messages of one Converse role are
/// merged, since Converse requires user and assistant to alternate (an OpenAI `tool` message
/// is a user turn there).
fn messages(messages: Option<&Value>) -> Result<(Vec<Value>, Vec<Value>), Invalid> {
    let Some(list) = messages.and_then(Value::as_array) else {
        return Err(Invalid::new(
            "messages",
            "`messages` must be an array of messages.",
        ));
    };
    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (index, message) in list.iter().enumerate() {
        let at = format!("messages[{index}]");
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let (converse_role, blocks) = match role {
            "system" | "developer" => {
                system.extend(text_blocks(message.get("content"), &at)?);
                continue;
            }
            "user" => ("user", user_content(message.get("content"), &at)?),
            "assistant" => ("assistant", assistant_content(message, &at)?),
            "tool" => ("user", vec![tool_result(message, &at)?]),
            other => {
                return Err(Invalid::new(
                    format!("{at}.role"),
                    format!(
                    "Role {:?} is not supported; use system, developer, user, assistant or tool.",
                    shown(other)
                ),
                ))
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, content)) if *last == converse_role => content.extend(blocks),
            _ => turns.push((converse_role, blocks)),
        }
    }
    if turns.is_empty() {
        return Err(Invalid::new(
            "messages",
            "`messages` must hold at least one user message with content.",
        ));
    }
    let messages = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    Ok((system, messages))
}

/// Text-only content (system, developer, tool): a string or `text` parts.
fn text_blocks(content: Option<&Value>, at: &str) -> Result<Vec<Value>, Invalid> {
    match content {
        Some(Value::String(text)) if text.is_empty() => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(vec![json!({"text": text})]),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(i, part)| match part_text(part) {
                Some(text) => Ok(json!({"text": text})),
                None => Err(Invalid::new(
                    format!("{at}.content[{i}]"),
                    "Only text parts are allowed in this message.",
                )),
            })
            .collect(),
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(_) => Err(Invalid::new(
            format!("{at}.content"),
            "`content` must be a string or an array of parts.",
        )),
    }
}

fn part_text(part: &Value) -> Option<&str> {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => part.get("text").and_then(Value::as_str),
        _ => None,
    }
}

fn user_content(content: Option<&Value>, at: &str) -> Result<Vec<Value>, Invalid> {
    let Some(Value::Array(parts)) = content else {
        return text_blocks(content, at);
    };
    let mut blocks = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let at = format!("{at}.content[{i}]");
        let kind = part.get("type").and_then(Value::as_str).unwrap_or_default();
        let block = match kind {
            "text" => json!({"text": part.get("text").and_then(Value::as_str).unwrap_or_default()}),
            "image_url" => image_block(part.get("image_url"), &at)?,
            "file" => document_block(part.get("file"), &at)?,
            other => {
                return Err(Invalid::new(
                    format!("{at}.type"),
                    format!("Content part type {:?} is not supported; use text, image_url (a data: URL) or file (file_data as a data: URL).", shown(other)),
                ))
            }
        };
        blocks.push(block);
    }
    Ok(blocks)
}

/// Image formats Converse accepts, by media type.
const IMAGE_FORMATS: [(&str, &str); 4] = [
    ("image/png", "png"),
    ("image/jpeg", "jpeg"),
    ("image/gif", "gif"),
    ("image/webp", "webp"),
];

fn image_block(image_url: Option<&Value>, at: &str) -> Result<Value, Invalid> {
    let at = format!("{at}.image_url");
    let url = image_url
        .and_then(|v| v.get("url").or(Some(v)))
        .and_then(Value::as_str)
        .ok_or_else(|| Invalid::new(&at, "`image_url.url` must be a string."))?;
    let (media_type, data) = data_url(url, &at)?;
    let Some((_, format)) = IMAGE_FORMATS.iter().find(|(mt, _)| *mt == media_type) else {
        return Err(Invalid::new(
            at,
            format!("Image media type {:?} is not supported; Bedrock takes image/png, image/jpeg, image/gif and image/webp.", shown(&media_type)),
        ));
    };
    Ok(json!({"image": {"format": format, "source": {"bytes": data}}}))
}

/// Document formats Converse accepts, by media type.
const DOCUMENT_FORMATS: [(&str, &str); 9] = [
    ("application/pdf", "pdf"),
    ("text/csv", "csv"),
    ("application/msword", "doc"),
    (
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "docx",
    ),
    ("application/vnd.ms-excel", "xls"),
    (
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "xlsx",
    ),
    ("text/html", "html"),
    ("text/plain", "txt"),
    ("text/markdown", "md"),
];

fn document_block(file: Option<&Value>, at: &str) -> Result<Value, Invalid> {
    let at = format!("{at}.file");
    let Some(data_url_text) = file
        .and_then(|f| f.get("file_data"))
        .and_then(Value::as_str)
    else {
        return Err(Invalid::new(
            format!("{at}.file_data"),
            "A file part needs `file_data` as a data: URL; uploaded file ids are not available through this agent.",
        ));
    };
    let (media_type, data) = data_url(data_url_text, &format!("{at}.file_data"))?;
    let Some((_, format)) = DOCUMENT_FORMATS.iter().find(|(mt, _)| *mt == media_type) else {
        return Err(Invalid::new(
            format!("{at}.file_data"),
            format!(
                "Document media type {:?} is not supported by Bedrock's Converse API.",
                shown(&media_type)
            ),
        ));
    };
    let filename = file
        .and_then(|f| f.get("filename"))
        .and_then(Value::as_str)
        .unwrap_or("document");
    Ok(
        json!({"document": {"format": format, "name": document_name(filename), "source": {"bytes": data}}}),
    )
}

/// Converse document names allow letters, digits, single spaces, hyphens, parentheses and
/// square brackets; anything else becomes a space.
fn document_name(filename: &str) -> String {
    let stem = filename.rsplit_once('.').map_or(filename, |(stem, _)| stem);
    let mut name = String::new();
    for c in stem.chars() {
        let c = match c.is_ascii_alphanumeric() || "-()[]".contains(c) {
            true => c,
            false => ' ',
        };
        if !(c == ' ' && (name.is_empty() || name.ends_with(' '))) {
            name.push(c);
        }
    }
    match name.trim_end() {
        "" => "document".to_owned(),
        trimmed => trimmed.to_owned(),
    }
}

/// `data:<media type>;base64,<data>` → the media type and the base64 text, checked.
fn data_url(url: &str, at: &str) -> Result<(String, String), Invalid> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https:/") {
        return Err(Invalid::new(
            at,
            "The agent never fetches URLs: send the image or file inline as a data: URL (data:image/png;base64,…).",
        )
        .with_code("invalid_image_url"));
    }
    let Some((header, data)) = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(','))
    else {
        return Err(Invalid::new(
            at,
            "Expected a data: URL (data:<media type>;base64,<data>).",
        ));
    };
    let Some(media_type) = header.strip_suffix(";base64") else {
        return Err(Invalid::new(
            at,
            "The data: URL must be base64-encoded (data:<media type>;base64,<data>).",
        ));
    };
    if base64::engine::general_purpose::STANDARD
        .decode(data)
        .is_err()
    {
        return Err(Invalid::new(
            at,
            "The data: URL's payload is not valid base64.",
        ));
    }
    Ok((media_type.to_ascii_lowercase(), data.to_owned()))
}

fn assistant_content(message: &Value, at: &str) -> Result<Vec<Value>, Invalid> {
    let mut blocks = match message.get("content") {
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| match part.get("type").and_then(Value::as_str) {
                Some("text") => part.get("text").and_then(Value::as_str),
                Some("refusal") => part.get("refusal").and_then(Value::as_str),
                _ => None,
            })
            .filter(|text| !text.is_empty())
            .map(|text| json!({"text": text}))
            .collect(),
        other => text_blocks(other, at)?,
    };
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => return Ok(blocks),
        Some(Value::Array(calls)) => calls,
        Some(_) => {
            return Err(Invalid::new(
                format!("{at}.tool_calls"),
                "`tool_calls` must be an array.",
            ))
        }
    };
    for (i, call) in calls.iter().enumerate() {
        let at = format!("{at}.tool_calls[{i}]");
        let id = call.get("id").and_then(Value::as_str);
        let function = call.get("function");
        let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
        let (Some(id), Some(name)) = (id, name) else {
            return Err(Invalid::new(
                at,
                "A tool call needs `id` and `function.name`.",
            ));
        };
        let arguments = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .unwrap_or("{}");
        let input: Value = match arguments.trim() {
            "" => json!({}),
            text => serde_json::from_str(text).map_err(|e| {
                Invalid::new(
                    format!("{at}.function.arguments"),
                    format!("Tool call arguments must be a JSON object ({e})."),
                )
            })?,
        };
        blocks.push(json!({"toolUse": {"toolUseId": id, "name": name, "input": input}}));
    }
    Ok(blocks)
}

fn tool_result(message: &Value, at: &str) -> Result<Value, Invalid> {
    let Some(id) = message.get("tool_call_id").and_then(Value::as_str) else {
        return Err(Invalid::new(
            format!("{at}.tool_call_id"),
            "A tool message needs `tool_call_id`.",
        ));
    };
    let mut content = text_blocks(message.get("content"), at)?;
    if content.is_empty() {
        content.push(json!({"text": ""}));
    }
    Ok(json!({"toolResult": {"toolUseId": id, "content": content}}))
}

fn has_tool_blocks(message: &Value) -> bool {
    message["content"].as_array().is_some_and(|blocks| {
        blocks
            .iter()
            .any(|b| b.get("toolUse").is_some() || b.get("toolResult").is_some())
    })
}

fn response_format_instruction(format: Option<&Value>) -> Result<Option<String>, Invalid> {
    let Some(format) = format.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(
            "Respond with one valid JSON object and nothing else: no prose, no code fences."
                .to_owned(),
        )),
        Some("json_schema") => {
            let Some(schema) = format.get("json_schema").and_then(|s| s.get("schema")) else {
                return Err(Invalid::new(
                    "response_format.json_schema.schema",
                    "A json_schema response format needs `json_schema.schema`.",
                ));
            };
            Ok(Some(format!(
                "Respond with one valid JSON value that conforms to this JSON Schema, and nothing else: no prose, no code fences.\nSchema: {schema}"
            )))
        }
        _ => Err(Invalid::new(
            "response_format.type",
            "`response_format.type` must be text, json_object or json_schema.",
        )),
    }
}

fn inference_config(request: &Map<String, Value>) -> Result<Map<String, Value>, Invalid> {
    let mut config = Map::new();
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .into_iter()
        .find_map(|name| {
            request
                .get(name)
                .filter(|v| !v.is_null())
                .map(|v| (name, v))
        });
    if let Some((name, value)) = max_tokens {
        let Some(n) = value.as_u64().filter(|n| *n >= 1) else {
            return Err(Invalid::new(
                name,
                format!("`{name}` must be a positive integer."),
            ));
        };
        config.insert("maxTokens".into(), n.into());
    }
    for (name, field) in [("temperature", "temperature"), ("top_p", "topP")] {
        match request.get(name) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => {
                config.insert(field.into(), Value::Number(n.clone()));
            }
            Some(_) => return Err(Invalid::new(name, format!("`{name}` must be a number."))),
        }
    }
    let stop = match request.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(stop)) => vec![Value::String(stop.clone())],
        Some(Value::Array(list)) if list.iter().all(Value::is_string) => list.clone(),
        Some(_) => {
            return Err(Invalid::new(
                "stop",
                "`stop` must be a string or an array of strings.",
            ))
        }
    };
    if !stop.is_empty() {
        config.insert("stopSequences".into(), Value::Array(stop));
    }
    Ok(config)
}

/// `tools` and `tool_choice` as a Converse `toolConfig`. With `tool_choice: "none"` the tools
/// are left out, unless the conversation already holds tool calls or results, which Converse
/// only accepts with a `toolConfig`.
fn tool_config(request: &Map<String, Value>, uses_tools: bool) -> Result<Option<Value>, Invalid> {
    let tools = match request.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(tools)) if tools.is_empty() => return Ok(None),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(Invalid::new("tools", "`tools` must be an array.")),
    };
    let mut specs = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        let at = format!("tools[{i}]");
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(Invalid::new(
                format!("{at}.type"),
                "Only tools of type function are supported.",
            ));
        }
        let function = &tool["function"];
        let Some(name) = function.get("name").and_then(Value::as_str) else {
            return Err(Invalid::new(
                format!("{at}.function.name"),
                "A function tool needs `function.name`.",
            ));
        };
        let schema = match function.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(schema) => schema.clone(),
        };
        let mut spec = json!({"name": name, "inputSchema": {"json": schema}});
        if let Some(description) = function.get("description").and_then(Value::as_str) {
            spec["description"] = description.into();
        }
        specs.push(json!({"toolSpec": spec}));
    }
    let choice = match request.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(choice)) => match choice.as_str() {
            "auto" => Some(json!({"auto": {}})),
            "required" => Some(json!({"any": {}})),
            "none" if uses_tools => None,
            "none" => return Ok(None),
            _ => {
                return Err(Invalid::new(
                    "tool_choice",
                    "`tool_choice` must be auto, none, required or a named function.",
                ))
            }
        },
        Some(named) => match named["function"]["name"].as_str() {
            Some(name) => Some(json!({"tool": {"name": name}})),
            None => {
                return Err(Invalid::new(
                    "tool_choice.function.name",
                    "A named tool choice needs `function.name`.",
                ))
            }
        },
    };
    let mut config = json!({"tools": specs});
    if let Some(choice) = choice {
        config["toolChoice"] = choice;
    }
    Ok(Some(config))
}

/// `reasoning_effort` as the model family's reasoning setting:
/// Anthropic Claude takes `thinking` with a token budget (low 1,024, medium 4,096, high 16,384);
/// Amazon Nova takes `reasoningConfig.maxReasoningEffort`; other models (OpenAI's gpt-oss,
/// the echo model) take `reasoning_effort` as given.
pub fn reasoning_fields(model: &str, effort: &Value) -> Result<Value, Invalid> {
    let Some(effort) = effort.as_str() else {
        return Err(Invalid::new(
            "reasoning_effort",
            "`reasoning_effort` must be minimal, low, medium or high.",
        ));
    };
    let budget = match effort {
        "minimal" => 1024,
        "low" => 1024,
        "medium" => 4096,
        "high" => 16384,
        _ => {
            return Err(Invalid::new(
                "reasoning_effort",
                "`reasoning_effort` must be minimal, low, medium or high.",
            ))
        }
    };
    let fields = if model.contains("anthropic.") {
        json!({"thinking": {"type": "enabled", "budget_tokens": budget}})
    } else if model.contains("amazon.nova") {
        let effort = if effort == "minimal" { "low" } else { effort };
        json!({"reasoningConfig": {"type": "enabled", "maxReasoningEffort": effort}})
    } else {
        json!({"reasoning_effort": effort})
    };
    Ok(fields)
}

/// What the answer is labelled with.
#[derive(Debug, Clone)]
pub struct AnswerLabels<'a> {
    /// `chatcmpl-<request id>`.
    pub id: &'a str,
    /// Unix seconds.
    pub created: u64,
    /// The model as the caller named it.
    pub model: &'a str,
    pub single_tool_call: bool,
}

/// A Converse answer as a `chat.completion`.
pub fn translate_response(converse: &Value, labels: &AnswerLabels<'_>) -> Value {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    let blocks = converse["output"]["message"]["content"].as_array();
    for block in blocks.into_iter().flatten() {
        if let Some(piece) = block.get("text").and_then(Value::as_str) {
            text.push_str(piece);
        } else if let Some(tool) = block.get("toolUse") {
            if labels.single_tool_call && !tool_calls.is_empty() {
                continue;
            }
            tool_calls.push(json!({
                "id": tool["toolUseId"],
                "type": "function",
                "function": {"name": tool["name"], "arguments": tool_arguments(&tool["input"])},
            }));
        } else if let Some(piece) = block["reasoningContent"]["reasoningText"]["text"].as_str() {
            reasoning.push_str(piece);
        }
    }
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { Value::String(text) },
        "refusal": null,
    });
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    if !reasoning.is_empty() {
        message["reasoning_content"] = Value::String(reasoning);
    }
    let stop = converse["stopReason"].as_str().unwrap_or_default();
    json!({
        "id": labels.id,
        "object": "chat.completion",
        "created": labels.created,
        "model": labels.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(stop),
        }],
        "usage": usage(&converse["usage"]),
        "system_fingerprint": null,
    })
}

/// Converse's `input` object as OpenAI's `arguments` string.
fn tool_arguments(input: &Value) -> String {
    match input {
        Value::Null => "{}".to_owned(),
        input => input.to_string(),
    }
}

/// Converse `stopReason` → OpenAI `finish_reason`.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "end_turn" => "stop",
        "stop_sequence" => "stop",
        "max_tokens" => "length",
        "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "guardrail_intervened" => "content_filter",
        "content_filtered" => "content_filter",
        _ => "stop",
    }
}

/// Converse usage as OpenAI's. Bedrock counts cache reads and writes apart from
/// `inputTokens`; OpenAI's `prompt_tokens` includes cached tokens, so they are added in.
pub fn usage(usage: &Value) -> Value {
    let count = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
    let cached = count("cacheReadInputTokens");
    let prompt = count("inputTokens") + cached + count("cacheWriteInputTokens");
    let completion = count("outputTokens");
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(request: Value) -> Result<ChatCall, Invalid> {
        translate_request(request.to_string().as_bytes())
    }

    fn converse_of(request: Value) -> Value {
        translate(request).expect("valid request").converse
    }

    #[test]
    fn system_developer_user_and_parameters_become_a_converse_request() {
        let call = translate(json!({
            "model": "us.anthropic.claude-3-5-haiku-20241022-v1:0",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "No jokes."}]},
                {"role": "user", "content": "hello"},
            ],
            "max_tokens": 50,
            "max_completion_tokens": 100,
            "temperature": 0.2,
            "top_p": 0.9,
            "stop": "END",
            "n": 1,
            "user": "alice@example.com",
            "store": false,
        }))
        .expect("valid");
        assert_eq!(call.model, "us.anthropic.claude-3-5-haiku-20241022-v1:0");
        assert!(!call.stream);
        assert_eq!(call.user.as_deref(), Some("alice@example.com"));
        assert_eq!(
            call.converse,
            json!({
                "system": [{"text": "Be brief."}, {"text": "No jokes."}],
                "messages": [{"role": "user", "content": [{"text": "hello"}]}],
                "inferenceConfig": {"maxTokens": 100, "temperature": 0.2, "topP": 0.9, "stopSequences": ["END"]},
            })
        );
    }

    #[test]
    fn stream_and_usage_options_are_read() {
        let call = translate(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "stream": true, "stream_options": {"include_usage": true}, "parallel_tool_calls": false,
        }))
        .expect("valid");
        assert!(call.stream && call.include_usage && call.single_tool_call);
    }

    #[test]
    fn data_url_image_becomes_an_image_block() {
        let converse = converse_of(
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/PNG;base64,iVBORw0K"}},
            ]}]}),
        );
        assert_eq!(
            converse["messages"][0]["content"],
            json!([{"text": "what is this?"}, {"image": {"format": "png", "source": {"bytes": "iVBORw0K"}}}])
        );
    }

    #[test]
    fn http_image_url_is_refused_because_the_agent_never_fetches() {
        let error = translate(
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ]}]}),
        )
        .expect_err("refused");
        assert_eq!(
            error.param.as_deref(),
            Some("messages[0].content[0].image_url")
        );
        assert!(error.message.contains("never fetches URLs"), "{error}");
    }

    #[test]
    fn unsupported_image_type_and_bad_base64_are_refused() {
        for url in [
            "data:image/tiff;base64,AAAA",
            "data:image/png;base64,@@@",
            "data:image/png,raw",
        ] {
            let error = translate(
                json!({"model": "m", "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                ]}]}),
            )
            .expect_err(url);
            assert_eq!(
                error.param.as_deref(),
                Some("messages[0].content[0].image_url"),
                "{url}"
            );
        }
    }

    #[test]
    fn pdf_file_part_becomes_a_document_block() {
        let converse = converse_of(
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "file", "file": {"filename": "Q3 report_v2.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}},
            ]}]}),
        );
        assert_eq!(
            converse["messages"][0]["content"][0],
            json!({"document": {"format": "pdf", "name": "Q3 report v2", "source": {"bytes": "JVBERi0="}}})
        );
    }

    #[test]
    fn tools_tool_calls_and_tool_results_round_trip_into_converse() {
        let converse = converse_of(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "user", "content": "thanks"},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "required",
        }));
        assert_eq!(
            converse["messages"],
            json!([
                {"role": "user", "content": [{"text": "weather in Paris?"}]},
                {"role": "assistant", "content": [{"toolUse": {"toolUseId": "call_1", "name": "get_weather", "input": {"city": "Paris"}}}]},
                {"role": "user", "content": [
                    {"toolResult": {"toolUseId": "call_1", "content": [{"text": "18C"}]}},
                    {"text": "thanks"},
                ]},
            ])
        );
        assert_eq!(
            converse["toolConfig"],
            json!({"tools": [{"toolSpec": {"name": "get_weather", "description": "Weather now",
                "inputSchema": {"json": {"type": "object", "properties": {"city": {"type": "string"}}}}}}],
                "toolChoice": {"any": {}}})
        );
    }

    #[test]
    fn tool_choice_auto_named_and_none() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let with = |choice: Value| {
            converse_of(
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                "tools": tools, "tool_choice": choice}),
            )
        };
        assert_eq!(
            with(json!("auto"))["toolConfig"]["toolChoice"],
            json!({"auto": {}})
        );
        assert_eq!(
            with(json!({"type": "function", "function": {"name": "f"}}))["toolConfig"]
                ["toolChoice"],
            json!({"tool": {"name": "f"}})
        );
        assert!(with(json!("none")).get("toolConfig").is_none());
        assert_eq!(
            with(Value::Null)["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"],
            json!({"json": {"type": "object", "properties": {}}})
        );
    }

    #[test]
    fn malformed_tool_call_arguments_are_refused() {
        let error = translate(json!({"model": "m", "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]},
        ]}))
        .expect_err("refused");
        assert_eq!(
            error.param.as_deref(),
            Some("messages[1].tool_calls[0].function.arguments")
        );
    }

    #[test]
    fn json_modes_are_asked_for_by_instruction() {
        let object = converse_of(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"}}),
        );
        assert!(object["system"][0]["text"]
            .as_str()
            .expect("instruction")
            .contains("JSON object"));
        let schema = converse_of(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object", "required": ["a"]}}}}),
        );
        assert!(schema["system"][0]["text"]
            .as_str()
            .expect("instruction")
            .contains(r#""required":["a"]"#));
    }

    #[test]
    fn reasoning_effort_follows_the_model_family() {
        let fields = |model: &str| {
            converse_of(json!({"model": model, "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "medium"}))
                ["additionalModelRequestFields"]
                .clone()
        };
        assert_eq!(
            fields("us.anthropic.claude-sonnet-4-20250514-v1:0"),
            json!({"thinking": {"type": "enabled", "budget_tokens": 4096}})
        );
        assert_eq!(
            fields("us.amazon.nova-2-lite-v1:0"),
            json!({"reasoningConfig": {"type": "enabled", "maxReasoningEffort": "medium"}})
        );
        assert_eq!(
            fields("openai.gpt-oss-120b-1:0"),
            json!({"reasoning_effort": "medium"})
        );
    }

    #[test]
    fn the_parameter_rule_ignores_harmless_and_refuses_answer_changing() {
        let base = || json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        for (name, value) in [
            ("seed", json!(7)),
            ("metadata", json!({"k": "v"})),
            ("n", json!(1)),
            ("logprobs", json!(false)),
            ("frequency_penalty", json!(0)),
            ("logit_bias", json!({})),
        ] {
            let mut request = base();
            request[name] = value;
            translate(request).unwrap_or_else(|e| panic!("{name} refused: {e}"));
        }
        for (name, value) in [
            ("n", json!(2)),
            ("logprobs", json!(true)),
            ("presence_penalty", json!(0.5)),
            ("logit_bias", json!({"50256": -100})),
            ("audio", json!({"voice": "alloy"})),
            ("functions", json!([])),
        ] {
            let mut request = base();
            request[name] = value;
            let error = translate(request).expect_err(name);
            assert_eq!(error.param.as_deref(), Some(name));
        }
    }

    #[test]
    fn missing_model_or_messages_and_bad_json_are_refused() {
        assert_eq!(
            translate(json!({"messages": []}))
                .expect_err("no model")
                .param
                .as_deref(),
            Some("model")
        );
        assert_eq!(
            translate(json!({"model": "m"}))
                .expect_err("no messages")
                .param
                .as_deref(),
            Some("messages")
        );
        assert_eq!(
            translate(json!({"model": "m", "messages": [{"role": "system", "content": "only"}]}))
                .expect_err("no turn")
                .param
                .as_deref(),
            Some("messages")
        );
        assert!(translate_request(b"{not json")
            .expect_err("bad json")
            .param
            .is_none());
        assert_eq!(
            translate(json!({"model": "m", "messages": [{"role": "function", "content": "x"}]}))
                .expect_err("role")
                .param
                .as_deref(),
            Some("messages[0].role")
        );
    }

    fn labels() -> AnswerLabels<'static> {
        AnswerLabels {
            id: "chatcmpl-1",
            created: 1_700_000_000,
            model: "m",
            single_tool_call: false,
        }
    }

    #[test]
    fn converse_answer_becomes_a_chat_completion() {
        let answer = translate_response(
            &json!({
                "output": {"message": {"role": "assistant", "content": [
                    {"reasoningContent": {"reasoningText": {"text": "thinking", "signature": "s"}}},
                    {"text": "Hello"}, {"text": " there"},
                ]}},
                "stopReason": "end_turn",
                "usage": {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15, "cacheReadInputTokens": 4},
            }),
            &labels(),
        );
        assert_eq!(
            answer,
            json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000u64, "model": "m",
                "choices": [{"index": 0, "logprobs": null, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": "Hello there", "refusal": null, "reasoning_content": "thinking"}}],
                "usage": {"prompt_tokens": 14, "completion_tokens": 5, "total_tokens": 19,
                    "prompt_tokens_details": {"cached_tokens": 4}},
                "system_fingerprint": null,
            })
        );
    }

    #[test]
    fn tool_use_answer_becomes_tool_calls_and_parallel_false_keeps_the_first() {
        let converse = json!({
            "output": {"message": {"role": "assistant", "content": [
                {"toolUse": {"toolUseId": "t1", "name": "a", "input": {"x": 1}}},
                {"toolUse": {"toolUseId": "t2", "name": "b", "input": {}}},
            ]}},
            "stopReason": "tool_use",
            "usage": {"inputTokens": 1, "outputTokens": 1},
        });
        let answer = translate_response(&converse, &labels());
        let choice = &answer["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], Value::Null);
        assert_eq!(
            choice["message"]["tool_calls"][0],
            json!({"id": "t1", "type": "function", "function": {"name": "a", "arguments": "{\"x\":1}"}})
        );
        assert_eq!(
            choice["message"]["tool_calls"].as_array().map(Vec::len),
            Some(2)
        );
        let single = translate_response(
            &converse,
            &AnswerLabels {
                single_tool_call: true,
                ..labels()
            },
        );
        assert_eq!(
            single["choices"][0]["message"]["tool_calls"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
    }

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("guardrail_intervened", "content_filter"),
            ("content_filtered", "content_filter"),
        ] {
            assert_eq!(finish_reason(stop), finish, "{stop}");
        }
    }
}
