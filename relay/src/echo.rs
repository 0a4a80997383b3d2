//! The synthetic echo model (`[echo] model`, default `xpart.echo`): the relay answers it itself,
//! with the shapes Bedrock uses, so a deployment or a drill can prove the whole path without
//! calling Bedrock or holding credentials. It repeats the last user text, describing images
//! and documents by format and size (`[image: png, 68 bytes]`) and tool results by their text;
//! when the request offers tools and the last user text is `call NAME {json}` for one of them,
//! it answers with that tool call instead (streamed as argument fragments by ConverseStream).
//!
//! Its embedding twin, the echo model's name with `-embed` (`xpart.echo-embed`), answers
//! InvokeModel in Titan Text Embeddings v2's shape: a unit vector of the requested
//! `dimensions` (default 1024) derived from a hash of `inputText`, so equal texts get equal
//! vectors, and a token count in the body and in `X-Amzn-Bedrock-Input-Token-Count`.

use base64::Engine;
use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use serde_json::{json, Value};
use xpart_bedrock::Operation;

use crate::error::RequestError;

const JSON: &str = "application/json";
const EVENT_STREAM: &str = "application/vnd.amazon.eventstream";

/// Which of the echo models a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoModel {
    Text,
    Embedding,
}

/// Appended to the echo model's name to name its embedding twin.
pub const EMBEDDING_SUFFIX: &str = "-embed";

/// The echo model `requested` names, given the configured echo model's name; `None` when it
/// names neither.
pub fn which(echo: &str, requested: &str) -> Option<EchoModel> {
    if requested == echo {
        return Some(EchoModel::Text);
    }
    match requested.strip_prefix(echo) {
        Some(EMBEDDING_SUFFIX) => Some(EchoModel::Embedding),
        _ => None,
    }
}

/// The echo embedding model's answer to `operation` (InvokeModel only), or `None`.
pub fn answer_embedding(
    operation: Operation,
    body: &[u8],
) -> Result<Option<http::Response<Full<Bytes>>>, RequestError> {
    let Operation::InvokeModel = operation else {
        return Ok(None);
    };
    let request = parse(body)?;
    let Some(text) = request.get("inputText").and_then(Value::as_str) else {
        return Err(RequestError::EchoInput(
            "body (no `inputText` string)".to_owned(),
        ));
    };
    let dimensions = match request.get("dimensions") {
        None | Some(Value::Null) => DEFAULT_DIMENSIONS,
        Some(value) => value
            .as_u64()
            .filter(|d| (1..=MAX_DIMENSIONS).contains(d))
            .ok_or_else(|| {
                RequestError::EchoInput(format!(
                    "body (`dimensions` must be an integer from 1 to {MAX_DIMENSIONS})"
                ))
            })?,
    };
    let vector = unit_vector(text, dimensions as usize);
    let tokens = estimate_tokens(text);
    let mut response = json_response(json!({
        "embedding": vector,
        "embeddingsByType": {"float": vector},
        "inputTextTokenCount": tokens,
    }));
    response.headers_mut().insert(
        "x-amzn-bedrock-input-token-count",
        http::HeaderValue::from(tokens),
    );
    Ok(Some(response))
}

/// Titan Text Embeddings v2's default size.
const DEFAULT_DIMENSIONS: u64 = 1024;
const MAX_DIMENSIONS: u64 = 8192;

/// A unit vector that depends only on `text`: FNV-1a of the text seeds a SplitMix64 sequence
/// of components in [-1, 1), normalized.
fn unit_vector(text: &str, dimensions: usize) -> Vec<f32> {
    let mut state = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let raw: Vec<f64> = (0..dimensions)
        .map(|_| (next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0)
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    raw.iter().map(|x| (x / norm) as f32).collect()
}

/// The echo model's answer to `operation`, or `None` for an operation it does not implement.
pub fn answer(
    operation: Operation,
    model: &str,
    body: &[u8],
) -> Result<Option<http::Response<Full<Bytes>>>, RequestError> {
    let response = match operation {
        Operation::Converse => json_response(converse(&parse(body)?)),
        Operation::ConverseStream => stream_response(converse_stream(&parse(body)?)?),
        Operation::InvokeModel => json_response(invoke(&parse(body)?, model)),
        Operation::InvokeModelWithResponseStream => {
            stream_response(invoke_stream(&parse(body)?, model)?)
        }
        Operation::CountTokens => json_response(count_tokens(&parse(body)?)),
        _ => return Ok(None),
    };
    Ok(Some(response))
}

fn parse(body: &[u8]) -> Result<Value, RequestError> {
    serde_json::from_slice(body).map_err(|e| RequestError::EchoInput(format!("body ({e})")))
}

fn converse(request: &Value) -> Value {
    let text = last_user_text(request.get("messages"));
    if let Some(call) = tool_call(request, &text) {
        let usage = usage(request, &call.arguments);
        return json!({
            "output": {"message": {"role": "assistant", "content": [
                {"toolUse": {"toolUseId": call.id, "name": call.name, "input": call.input}}
            ]}},
            "stopReason": "tool_use",
            "usage": usage,
            "metrics": {"latencyMs": 0}
        });
    }
    let usage = usage(request, &text);
    json!({
        "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
        "stopReason": "end_turn",
        "usage": usage,
        "metrics": {"latencyMs": 0}
    })
}

fn converse_stream(request: &Value) -> Result<Bytes, RequestError> {
    let text = last_user_text(request.get("messages"));
    if let Some(call) = tool_call(request, &text) {
        return converse_stream_tool_call(request, call);
    }
    // Bedrock sends contentBlockStart only for tool-use blocks; a text block starts with its
    // first delta.
    let deltas = pieces(&text)
        .into_iter()
        .map(|piece| json!({"text": piece}));
    one_block_stream(None, deltas, "end_turn", usage(request, &text))
}

fn converse_stream_tool_call(request: &Value, call: ToolCall) -> Result<Bytes, RequestError> {
    let start = json!({"toolUse": {"toolUseId": call.id, "name": call.name}});
    let deltas = fragments(&call.arguments)
        .into_iter()
        .map(|fragment| json!({"toolUse": {"input": fragment}}));
    one_block_stream(
        Some(start),
        deltas,
        "tool_use",
        usage(request, &call.arguments),
    )
}

/// The ConverseStream events of an answer with one content block: its `start` (if the block
/// kind has one), its `deltas`, then the message's stop and metadata.
fn one_block_stream(
    start: Option<Value>,
    deltas: impl Iterator<Item = Value>,
    stop_reason: &str,
    usage: Value,
) -> Result<Bytes, RequestError> {
    let mut events = vec![("messageStart", json!({"role": "assistant"}))];
    if let Some(start) = start {
        events.push((
            "contentBlockStart",
            json!({"contentBlockIndex": 0, "start": start}),
        ));
    }
    for delta in deltas {
        events.push((
            "contentBlockDelta",
            json!({"contentBlockIndex": 0, "delta": delta}),
        ));
    }
    events.push(("contentBlockStop", json!({"contentBlockIndex": 0})));
    events.push(("messageStop", json!({"stopReason": stop_reason})));
    events.push((
        "metadata",
        json!({"usage": usage, "metrics": {"latencyMs": 0}}),
    ));
    frames(events)
}

/// A tool call the echo model makes: asked for by `call NAME {json}` as the last user text,
/// with NAME one of the request's `toolConfig.tools`.
struct ToolCall {
    id: String,
    name: String,
    input: Value,
    /// `input` as JSON text, the way a stream sends it.
    arguments: String,
}

fn tool_call(request: &Value, text: &str) -> Option<ToolCall> {
    let rest = text.trim().strip_prefix("call ")?;
    let (name, arguments) = rest.trim_start().split_once(char::is_whitespace)?;
    let offered = request["toolConfig"]["tools"]
        .as_array()?
        .iter()
        .any(|tool| tool["toolSpec"]["name"].as_str() == Some(name));
    if !offered {
        return None;
    }
    let input: Value = serde_json::from_str(arguments.trim()).ok()?;
    if !input.is_object() {
        return None;
    }
    Some(ToolCall {
        id: format!("tooluse_echo_{name}"),
        name: name.to_owned(),
        arguments: input.to_string(),
        input,
    })
}

/// A tool call's JSON text in a few pieces, cut at character boundaries, as a model streams it.
fn fragments(json: &str) -> Vec<String> {
    let chars: Vec<char> = json.chars().collect();
    let size = chars.len().div_ceil(3).max(1);
    chars
        .chunks(size)
        .map(|piece| piece.iter().collect())
        .collect()
}

/// Anthropic Messages shape, the most common InvokeModel body; `prompt`/`inputText` bodies are
/// echoed too.
fn invoke(request: &Value, model: &str) -> Value {
    let text = invoke_input_text(request);
    let tokens = estimate_tokens(&text);
    json!({
        "id": "msg_xpart_echo",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": tokens, "output_tokens": tokens}
    })
}

fn invoke_stream(request: &Value, model: &str) -> Result<Bytes, RequestError> {
    let text = invoke_input_text(request);
    let tokens = estimate_tokens(&text);
    let mut chunks = vec![
        json!({"type": "message_start", "message": {"id": "msg_xpart_echo", "type": "message",
            "role": "assistant", "model": model, "content": [],
            "usage": {"input_tokens": tokens, "output_tokens": 0}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ];
    for piece in pieces(&text) {
        chunks.push(json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": piece}}));
    }
    chunks.push(json!({"type": "content_block_stop", "index": 0}));
    chunks.push(
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": tokens}}),
    );
    chunks.push(json!({"type": "message_stop"}));
    let engine = base64::engine::general_purpose::STANDARD;
    let events = chunks
        .into_iter()
        .map(|chunk| ("chunk", json!({"bytes": engine.encode(chunk.to_string())})))
        .collect();
    frames(events)
}

/// CountTokens input is either `{"converse": {"messages": …}}` or `{"invokeModel": {"body": <base64>}}`.
fn count_tokens(request: &Value) -> Value {
    let input = request.get("input");
    let text = match input.and_then(|i| i.get("converse")) {
        Some(converse) => all_text(converse.get("messages")),
        None => input
            .and_then(|i| i.get("invokeModel"))
            .and_then(|i| i.get("body"))
            .and_then(Value::as_str)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .map(|body| invoke_input_text(&body))
            .unwrap_or_default(),
    };
    json!({"inputTokens": estimate_tokens(&text)})
}

fn last_user_text(messages: Option<&Value>) -> String {
    let Some(list) = messages.and_then(Value::as_array) else {
        return String::new();
    };
    list.iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content")))
        .unwrap_or_default()
}

fn all_text(messages: Option<&Value>) -> String {
    let Some(list) = messages.and_then(Value::as_array) else {
        return String::new();
    };
    list.iter()
        .map(|m| content_text(m.get("content")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Content is a string or a list of blocks: text as it is, images and documents by format and
/// decoded size, tool results by their text.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(blocks)) => blocks.iter().map(block_text).collect::<Vec<_>>().join(""),
        _ => String::new(),
    }
}

fn block_text(block: &Value) -> String {
    if let Some(text) = block.get("text").and_then(Value::as_str) {
        return text.to_owned();
    }
    for kind in ["image", "document"] {
        if let Some(media) = block.get(kind) {
            let format = media["format"].as_str().unwrap_or("unknown");
            let bytes = media["source"]["bytes"]
                .as_str()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .map_or(0, |b| b.len());
            return format!("[{kind}: {format}, {bytes} bytes]");
        }
    }
    if let Some(result) = block.get("toolResult") {
        let text = content_text(result.get("content"));
        return format!(
            "[tool result {}: {text}]",
            result["toolUseId"].as_str().unwrap_or("")
        );
    }
    String::new()
}

fn invoke_input_text(request: &Value) -> String {
    if request.get("messages").is_some() {
        return last_user_text(request.get("messages"));
    }
    for key in ["prompt", "inputText"] {
        if let Some(text) = request.get(key).and_then(Value::as_str) {
            return text.to_string();
        }
    }
    String::new()
}

fn usage(request: &Value, output: &str) -> Value {
    let input = estimate_tokens(&all_text(request.get("messages")));
    let output = estimate_tokens(output);
    json!({"inputTokens": input, "outputTokens": output, "totalTokens": input + output})
}

/// A rough count (about four characters a token, as AWS documents for English text).
fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// Word-sized pieces, so the stream has several deltas as a real one does.
fn pieces(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for ch in text.chars() {
        current.push(ch);
        if ch == ' ' {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() || out.is_empty() {
        out.push(current);
    }
    out
}

fn frames(events: Vec<(&'static str, Value)>) -> Result<Bytes, RequestError> {
    let mut buf = BytesMut::new();
    for (event_type, payload) in events {
        let frame = xpart_bedrock::event_stream_frame(
            &[
                (":event-type", event_type),
                (":content-type", JSON),
                (":message-type", "event"),
            ],
            payload.to_string(),
        )
        .map_err(|e| RequestError::EchoInput(format!("event frame ({e})")))?;
        buf.extend_from_slice(&frame);
    }
    Ok(buf.freeze())
}

fn json_response(value: Value) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(Bytes::from(value.to_string())));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(JSON),
    );
    response
}

fn stream_response(frames: Bytes) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(frames));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(EVENT_STREAM),
    );
    response.headers_mut().insert(
        "x-amzn-bedrock-content-type",
        http::HeaderValue::from_static(JSON),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
    use aws_smithy_types::event_stream::Message;
    use http_body_util::BodyExt;

    async fn body(r: http::Response<Full<Bytes>>) -> Bytes {
        r.into_body().collect().await.unwrap().to_bytes()
    }

    /// The echo model's answer to `request`, which it must answer.
    fn echo(operation: Operation, request: &str) -> http::Response<Full<Bytes>> {
        answer(operation, "xpart.echo", request.as_bytes())
            .unwrap()
            .unwrap()
    }

    /// The JSON body of the echo model's answer to `request`.
    async fn echo_json(operation: Operation, request: &str) -> Value {
        serde_json::from_slice(&body(echo(operation, request)).await).unwrap()
    }

    fn decode_all(mut bytes: Bytes) -> Vec<Message> {
        let mut decoder = MessageFrameDecoder::new();
        let mut out = Vec::new();
        while let DecodedFrame::Complete(m) = decoder.decode_frame(&mut bytes).unwrap() {
            out.push(m);
        }
        out
    }

    fn header(m: &Message, name: &str) -> String {
        xpart_bedrock::event_stream_header(m, name)
            .unwrap()
            .to_string()
    }

    const CONVERSE: &str = r#"{"messages":[{"role":"user","content":[{"text":"first"}]},
        {"role":"assistant","content":[{"text":"ok"}]},{"role":"user","content":[{"text":"hello echo"}]}]}"#;

    #[tokio::test]
    async fn converse_echoes_last_user_text() {
        let v = echo_json(Operation::Converse, CONVERSE).await;
        assert_eq!(v["output"]["message"]["content"][0]["text"], "hello echo");
        assert_eq!(v["stopReason"], "end_turn");
    }

    #[tokio::test]
    async fn converse_stream_is_real_event_stream_frames() {
        let r = echo(Operation::ConverseStream, CONVERSE);
        assert_eq!(r.headers()["content-type"], EVENT_STREAM);
        let messages = decode_all(body(r).await);
        let types: Vec<String> = messages.iter().map(|m| header(m, ":event-type")).collect();
        assert_eq!(types.first().unwrap(), "messageStart");
        assert_eq!(types.last().unwrap(), "metadata");
        let text: String = messages
            .iter()
            .filter(|m| header(m, ":event-type") == "contentBlockDelta")
            .map(|m| {
                let v: Value = serde_json::from_slice(m.payload()).unwrap();
                v["delta"]["text"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(text, "hello echo");
    }

    #[tokio::test]
    async fn invoke_stream_chunks_carry_base64_json() {
        let req = r#"{"anthropic_version":"bedrock-2023-05-31","max_tokens":10,"messages":[{"role":"user","content":"hi there"}]}"#;
        let r = echo(Operation::InvokeModelWithResponseStream, req);
        let messages = decode_all(body(r).await);
        let mut text = String::new();
        for m in &messages {
            assert_eq!(header(m, ":event-type"), "chunk");
            let v: Value = serde_json::from_slice(m.payload()).unwrap();
            let inner = base64::engine::general_purpose::STANDARD
                .decode(v["bytes"].as_str().unwrap())
                .unwrap();
            let inner: Value = serde_json::from_slice(&inner).unwrap();
            if inner["type"] == "content_block_delta" {
                text.push_str(inner["delta"]["text"].as_str().unwrap());
            }
        }
        assert_eq!(text, "hi there");
    }

    const TOOLS: &str = r#"{"toolConfig":{"tools":[{"toolSpec":{"name":"get_weather","inputSchema":{"json":{}}}}]},
        "messages":[{"role":"user","content":[{"text":"call get_weather {\"city\": \"Paris\"}"}]}]}"#;

    #[tokio::test]
    async fn call_name_json_with_tools_answers_with_that_tool_call() {
        let v = echo_json(Operation::Converse, TOOLS).await;
        assert_eq!(v["stopReason"], "tool_use");
        let tool = &v["output"]["message"]["content"][0]["toolUse"];
        assert_eq!(tool["name"], "get_weather");
        assert_eq!(tool["input"], json!({"city": "Paris"}));
        assert!(v["usage"]["outputTokens"].as_u64().unwrap() > 0);

        let untooled = TOOLS.replace("get_weather\",\"inputSchema", "other\",\"inputSchema");
        let v = echo_json(Operation::Converse, &untooled).await;
        assert_eq!(
            v["stopReason"], "end_turn",
            "a tool the request does not offer is echoed"
        );
    }

    #[tokio::test]
    async fn streamed_tool_call_arrives_as_argument_fragments() {
        let r = echo(Operation::ConverseStream, TOOLS);
        let messages = decode_all(body(r).await);
        let payloads: Vec<(String, Value)> = messages
            .iter()
            .map(|m| {
                (
                    header(m, ":event-type"),
                    serde_json::from_slice(m.payload()).unwrap(),
                )
            })
            .collect();
        assert_eq!(payloads[1].0, "contentBlockStart");
        assert_eq!(payloads[1].1["start"]["toolUse"]["name"], "get_weather");
        let fragments: Vec<&str> = payloads
            .iter()
            .filter_map(|(_, p)| p["delta"]["toolUse"]["input"].as_str())
            .collect();
        assert!(fragments.len() > 1, "{fragments:?}");
        let input: Value = serde_json::from_str(&fragments.concat()).unwrap();
        assert_eq!(input, json!({"city": "Paris"}));
        let stop = payloads.iter().find(|(t, _)| t == "messageStop").unwrap();
        assert_eq!(stop.1["stopReason"], "tool_use");
    }

    #[tokio::test]
    async fn images_documents_and_tool_results_are_described() {
        let req = r#"{"messages":[{"role":"user","content":[
            {"toolResult":{"toolUseId":"t1","content":[{"text":"18C"}]}},
            {"text":"see "},
            {"image":{"format":"png","source":{"bytes":"AAECAw=="}}},
            {"document":{"format":"pdf","name":"d","source":{"bytes":"AAE="}}}]}]}"#;
        let v = echo_json(Operation::Converse, req).await;
        assert_eq!(
            v["output"]["message"]["content"][0]["text"],
            "[tool result t1: 18C]see [image: png, 4 bytes][document: pdf, 2 bytes]"
        );
    }

    #[tokio::test]
    async fn echo_embed_answers_titan_shaped_unit_vectors() {
        assert_eq!(which("xpart.echo", "xpart.echo"), Some(EchoModel::Text));
        assert_eq!(
            which("xpart.echo", "xpart.echo-embed"),
            Some(EchoModel::Embedding)
        );
        assert_eq!(which("xpart.echo", "xpart.echo-embedx"), None);
        assert_eq!(which("xpart.echo", "anthropic.x"), None);

        let embed = |request: &'static str| async move {
            let r = answer_embedding(Operation::InvokeModel, request.as_bytes())
                .unwrap()
                .unwrap();
            let tokens = r.headers()["x-amzn-bedrock-input-token-count"].clone();
            let v: Value = serde_json::from_slice(&body(r).await).unwrap();
            (v, tokens)
        };
        let (v, tokens) = embed(r#"{"inputText":"hello world"}"#).await;
        let vector: Vec<f64> = v["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(vector.len(), 1024);
        let norm: f64 = vector.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        assert_eq!(v["embeddingsByType"]["float"], v["embedding"]);
        assert_eq!(v["inputTextTokenCount"], 3);
        assert_eq!(tokens, "3");

        let (again, _) = embed(r#"{"inputText":"hello world","dimensions":256}"#).await;
        assert_eq!(again["embedding"].as_array().unwrap().len(), 256);
        let (same, _) = embed(r#"{"inputText":"hello world","dimensions":256}"#).await;
        assert_eq!(same, again, "deterministic");
        let (other, _) = embed(r#"{"inputText":"hello there","dimensions":256}"#).await;
        assert_ne!(other["embedding"], again["embedding"]);

        let err = answer_embedding(
            Operation::InvokeModel,
            br#"{"inputText":"x","dimensions":0}"#,
        )
        .unwrap_err();
        assert_eq!(err.to_bedrock().kind.status().as_u16(), 400);
        assert!(answer_embedding(Operation::InvokeModel, br#"{"texts":["x"]}"#).is_err());
        assert!(answer_embedding(Operation::Converse, b"{}")
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn count_tokens_and_bad_json() {
        let req = r#"{"input":{"converse":{"messages":[{"role":"user","content":[{"text":"12345678"}]}]}}}"#;
        let v = echo_json(Operation::CountTokens, req).await;
        assert_eq!(v["inputTokens"], 2);
        let err = answer(Operation::Converse, "xpart.echo", b"not json").unwrap_err();
        assert_eq!(err.to_bedrock().kind.status().as_u16(), 400);
        assert!(answer(Operation::ApplyGuardrail, "xpart.echo", b"{}")
            .unwrap()
            .is_none());
    }
}
