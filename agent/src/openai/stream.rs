//! ConverseStream events → `chat.completion.chunk` server-sent events, one event at a time,
//! in the order OpenAI streams them: a role chunk first, then content, reasoning and tool-call
//! deltas (a tool call's index, id and name first, then its argument fragments), a chunk with
//! the `finish_reason`, a usage chunk when `stream_options.include_usage` asked for it, and
//! `data: [DONE]`.

use bytes::Bytes;
use serde_json::{json, Value};

use super::chat::{finish_reason, usage};

/// One decoded event-stream message, as the translator needs it.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// `:message-type`: `event` or `exception`.
    pub message_type: &'a str,
    /// `:event-type` of an event, `:exception-type` of an exception.
    pub kind: &'a str,
    pub payload: &'a [u8],
}

/// The state of one streamed answer.
#[derive(Debug)]
pub struct StreamTranslator {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    single_tool_call: bool,
    /// Converse content block index → OpenAI tool call index, for tool-use blocks; `None`
    /// for a tool call dropped by `parallel_tool_calls: false`.
    tool_blocks: Vec<(u64, Option<usize>)>,
    tool_calls: usize,
    role_sent: bool,
    finished: bool,
}

/// The server-sent event that ends a stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

impl StreamTranslator {
    pub fn new(
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
        include_usage: bool,
        single_tool_call: bool,
    ) -> StreamTranslator {
        StreamTranslator {
            id: id.into(),
            created,
            model: model.into(),
            include_usage,
            single_tool_call,
            tool_blocks: Vec::new(),
            tool_calls: 0,
            role_sent: false,
            finished: false,
        }
    }

    /// The chunks one ConverseStream event becomes (often one, sometimes none).
    pub fn event(&mut self, event: Event<'_>) -> Vec<Bytes> {
        if self.finished {
            return Vec::new();
        }
        let payload: Value = serde_json::from_slice(event.payload).unwrap_or(Value::Null);
        if event.message_type != "event" {
            self.finished = true;
            return vec![stream_error(event.kind, &payload)];
        }
        let mut out = Vec::new();
        if !self.role_sent {
            self.role_sent = true;
            out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
        }
        match event.kind {
            "messageStart" => {}
            "contentBlockStart" => out.extend(self.block_start(&payload)),
            "contentBlockDelta" => out.extend(self.block_delta(&payload)),
            "contentBlockStop" => {}
            "messageStop" => {
                let reason = finish_reason(payload["stopReason"].as_str().unwrap_or_default());
                out.push(self.chunk(json!({}), Some(reason)));
            }
            "metadata" if self.include_usage => out.push(self.usage_chunk(&payload["usage"])),
            "metadata" => {}
            _ => {}
        }
        out
    }

    /// What follows the last event of a stream that ended normally.
    pub fn end(&mut self) -> Vec<Bytes> {
        match std::mem::replace(&mut self.finished, true) {
            true => Vec::new(),
            false => vec![Bytes::from_static(DONE)],
        }
    }

    fn block_start(&mut self, payload: &Value) -> Option<Bytes> {
        let tool = payload["start"].get("toolUse")?;
        let block = payload["contentBlockIndex"].as_u64().unwrap_or(0);
        let index = match self.single_tool_call && self.tool_calls > 0 {
            true => None,
            false => Some(self.tool_calls),
        };
        self.tool_calls += 1;
        self.tool_blocks.push((block, index));
        let index = index?;
        let call = json!({"index": index, "id": tool["toolUseId"], "type": "function",
            "function": {"name": tool["name"], "arguments": ""}});
        Some(self.chunk(json!({"tool_calls": [call]}), None))
    }

    fn block_delta(&mut self, payload: &Value) -> Option<Bytes> {
        let delta = &payload["delta"];
        if let Some(text) = delta.get("text").and_then(Value::as_str) {
            return Some(self.chunk(json!({"content": text}), None));
        }
        if let Some(text) = delta["reasoningContent"]
            .get("text")
            .and_then(Value::as_str)
        {
            return Some(self.chunk(json!({"reasoning_content": text}), None));
        }
        let fragment = delta["toolUse"].get("input").and_then(Value::as_str)?;
        let block = payload["contentBlockIndex"].as_u64().unwrap_or(0);
        let (_, index) = self.tool_blocks.iter().rev().find(|(b, _)| *b == block)?;
        let call = json!({"index": (*index)?, "function": {"arguments": fragment}});
        Some(self.chunk(json!({"tool_calls": [call]}), None))
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Bytes {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        sse(&chunk)
    }

    fn usage_chunk(&self, converse_usage: &Value) -> Bytes {
        sse(&json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [],
            "usage": usage(converse_usage),
        }))
    }
}

/// An exception in the stream as the event the OpenAI SDKs raise: `data: {"error": …}`.
fn stream_error(kind: &str, payload: &Value) -> Bytes {
    let message = payload["message"]
        .as_str()
        .unwrap_or("The model's response stream failed.");
    let error_type = match kind {
        "throttlingException" => "rate_limit_error",
        "validationException" => "invalid_request_error",
        "serviceUnavailableException" => "service_unavailable",
        _ => "api_error",
    };
    sse(&json!({"error": {"message": message, "type": error_type, "param": null, "code": kind}}))
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(kind: &'a str, payload: &'a str) -> Event<'a> {
        Event {
            message_type: "event",
            kind,
            payload: payload.as_bytes(),
        }
    }

    /// The JSON of each `data:` chunk (`[DONE]` as a string).
    fn parse(chunks: &[Bytes]) -> Vec<Value> {
        chunks
            .iter()
            .map(|chunk| {
                let text = std::str::from_utf8(chunk).expect("utf-8");
                let data = text
                    .strip_prefix("data: ")
                    .and_then(|t| t.strip_suffix("\n\n"))
                    .expect("one SSE event");
                serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.to_owned()))
            })
            .collect()
    }

    /// ConverseStream events as `(kind, payload)`.
    type Events = [(&'static str, String)];

    /// A translator for a plain stream: no usage chunk asked for, parallel tool calls.
    fn translator() -> StreamTranslator {
        StreamTranslator::new("c", 7, "m", false, false)
    }

    fn run(mut translator: StreamTranslator, events: &Events) -> Vec<Value> {
        let mut chunks = Vec::new();
        for (kind, payload) in events {
            chunks.extend(translator.event(event(kind, payload)));
        }
        chunks.extend(translator.end());
        parse(&chunks)
    }

    fn message_start() -> (&'static str, String) {
        ("messageStart", r#"{"role":"assistant"}"#.to_owned())
    }

    fn delta(block: u64, delta: Value) -> (&'static str, String) {
        let payload = json!({"contentBlockIndex": block, "delta": delta});
        ("contentBlockDelta", payload.to_string())
    }

    fn text(block: u64, text: &str) -> (&'static str, String) {
        delta(block, json!({"text": text}))
    }

    fn tool_start(block: u64, id: &str, name: &str) -> (&'static str, String) {
        let start = json!({"toolUse": {"toolUseId": id, "name": name}});
        let payload = json!({"contentBlockIndex": block, "start": start});
        ("contentBlockStart", payload.to_string())
    }

    fn tool_input(block: u64, input: &str) -> (&'static str, String) {
        delta(block, json!({"toolUse": {"input": input}}))
    }

    fn block_stop(block: u64) -> (&'static str, String) {
        let payload = json!({"contentBlockIndex": block});
        ("contentBlockStop", payload.to_string())
    }

    fn message_stop(reason: &str) -> (&'static str, String) {
        ("messageStop", json!({"stopReason": reason}).to_string())
    }

    fn metadata(payload: Value) -> (&'static str, String) {
        ("metadata", payload.to_string())
    }

    #[test]
    fn text_stream_has_role_deltas_finish_usage_and_done() {
        let with_usage = StreamTranslator::new("chatcmpl-1", 7, "m", true, false);
        let chunks = run(
            with_usage,
            &[
                message_start(),
                text(0, "Hel"),
                text(0, "lo"),
                block_stop(0),
                message_stop("max_tokens"),
                metadata(json!({
                    "usage": {"inputTokens": 3, "outputTokens": 2, "totalTokens": 5},
                    "metrics": {"latencyMs": 1},
                })),
            ],
        );
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c.get("choices")?.get(0).map(|c| &c["delta"]))
            .collect();
        assert_eq!(
            deltas,
            [
                &json!({"role": "assistant", "content": ""}),
                &json!({"content": "Hel"}),
                &json!({"content": "lo"}),
                &json!({})
            ]
        );
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        assert_eq!(chunks[0]["id"], "chatcmpl-1");
        assert_eq!(chunks[0]["usage"], Value::Null);
        assert_eq!(chunks[4]["choices"], json!([]));
        assert_eq!(chunks[4]["usage"]["total_tokens"], 5);
        assert_eq!(chunks[5], "[DONE]");
        assert_eq!(chunks.len(), 6);
    }

    #[test]
    fn without_include_usage_no_usage_chunk_and_no_usage_field() {
        let chunks = run(
            translator(),
            &[
                message_start(),
                message_stop("end_turn"),
                metadata(json!({"usage": {"inputTokens": 3, "outputTokens": 2}})),
            ],
        );
        assert_eq!(chunks.len(), 3);
        assert!(chunks[0].get("usage").is_none());
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn tool_use_streams_as_openai_tool_call_deltas() {
        let chunks = run(
            translator(),
            &[
                message_start(),
                text(0, "Let me check."),
                tool_start(1, "t1", "get_weather"),
                tool_input(1, r#"{"city":"#),
                tool_input(1, r#""Paris"}"#),
                block_stop(1),
                tool_start(2, "t2", "get_time"),
                tool_input(2, "{}"),
                message_stop("tool_use"),
            ],
        );
        let calls: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
            .collect();
        assert_eq!(
            calls,
            [
                &json!([{"index": 0, "id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]),
                &json!([{"index": 0, "function": {"arguments": "{\"city\":"}}]),
                &json!([{"index": 0, "function": {"arguments": "\"Paris\"}"}}]),
                &json!([{"index": 1, "id": "t2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]),
                &json!([{"index": 1, "function": {"arguments": "{}"}}]),
            ]
        );
        assert_eq!(
            chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
            "tool_calls"
        );

        let single = StreamTranslator::new("c", 7, "m", false, true);
        let chunks = run(
            single,
            &[
                tool_start(0, "t1", "a"),
                tool_start(1, "t2", "b"),
                tool_input(1, "{}"),
            ],
        );
        let calls = chunks
            .iter()
            .filter(|c| c["choices"][0]["delta"].get("tool_calls").is_some())
            .count();
        assert_eq!(
            calls, 1,
            "parallel_tool_calls=false passes only the first call"
        );
    }

    #[test]
    fn reasoning_deltas_become_reasoning_content() {
        let chunks = run(
            translator(),
            &[
                delta(0, json!({"reasoningContent": {"text": "hmm"}})),
                delta(0, json!({"reasoningContent": {"signature": "sig"}})),
            ],
        );
        assert_eq!(
            chunks[1]["choices"][0]["delta"],
            json!({"reasoning_content": "hmm"})
        );
        assert_eq!(
            chunks.len(),
            3,
            "role, reasoning, done; the signature is not passed on"
        );
    }

    #[test]
    fn an_exception_ends_the_stream_with_an_error_event_and_no_done() {
        let mut translator = translator();
        let mut chunks = translator.event(event("messageStart", r#"{"role":"assistant"}"#));
        chunks.extend(translator.event(Event {
            message_type: "exception",
            kind: "throttlingException",
            payload: br#"{"message":"slow down"}"#,
        }));
        chunks.extend(translator.event(event("contentBlockDelta", r#"{"delta":{"text":"late"}}"#)));
        chunks.extend(translator.end());
        let chunks = parse(&chunks);
        assert_eq!(chunks.len(), 2);
        assert_eq!(
            chunks[1],
            json!({"error": {"message": "slow down", "type": "rate_limit_error", "param": null, "code": "throttlingException"}})
        );
    }
}
