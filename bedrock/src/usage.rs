//! Token usage as Bedrock reports it in an answer, read while the answer passes through.
//!
//! Each generating operation says it in its own place: Converse in the JSON body's `usage`,
//! ConverseStream in its `metadata` event, InvokeModel in `x-amzn-bedrock-*-token-count`
//! headers, and InvokeModelWithResponseStream in the last `chunk` event, whose base64 `bytes`
//! decode to JSON with `amazon-bedrock-invocationMetrics`. A [`UsageReader`] is made from the
//! answer's head and fed the body's bytes as they go by (a copy: the bytes themselves are
//! passed on untouched and never held back); [`UsageReader::finish`] says what it found and
//! whether that is the whole of it. Sans-IO: no clock, no runtime.

use std::sync::{Arc, Mutex};

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::Message;
use base64::Engine;
use bytes::BytesMut;
use http::{HeaderMap, StatusCode};
use serde_json::Value;

use crate::Operation;

/// `InvokeModel`'s usage headers.
pub const INPUT_TOKENS_HEADER: &str = "x-amzn-bedrock-input-token-count";
pub const OUTPUT_TOKENS_HEADER: &str = "x-amzn-bedrock-output-token-count";
pub const CACHE_READ_TOKENS_HEADER: &str = "x-amzn-bedrock-cache-read-input-token-count";
pub const CACHE_WRITE_TOKENS_HEADER: &str = "x-amzn-bedrock-cache-write-input-token-count";

/// The key of the usage object in InvokeModelWithResponseStream's last chunk.
pub const INVOCATION_METRICS: &str = "amazon-bedrock-invocationMetrics";

/// Largest Converse JSON answer inspected for its `usage`; a larger one (far beyond what a
/// model generates in one answer) passes through with its usage unread.
pub const MAX_JSON_BYTES: usize = 8 << 20;

/// Tokens one answer reported; `None` for a count the answer did not give.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cache_read_tokens: Option<u64>,
    pub cache_write_tokens: Option<u64>,
}

impl Usage {
    /// Converse's `usage` object (`inputTokens`, `outputTokens`, `cacheReadInputTokens`,
    /// `cacheWriteInputTokens`), from the answer or ConverseStream's `metadata` event.
    pub fn from_converse(usage: &Value) -> Usage {
        let count = |name: &str| usage.get(name).and_then(Value::as_u64);
        Usage {
            input_tokens: count("inputTokens"),
            output_tokens: count("outputTokens"),
            cache_read_tokens: count("cacheReadInputTokens"),
            cache_write_tokens: count("cacheWriteInputTokens"),
        }
    }

    /// The `amazon-bedrock-invocationMetrics` object of InvokeModelWithResponseStream.
    pub fn from_invocation_metrics(metrics: &Value) -> Usage {
        let count = |name: &str| metrics.get(name).and_then(Value::as_u64);
        Usage {
            input_tokens: count("inputTokenCount"),
            output_tokens: count("outputTokenCount"),
            cache_read_tokens: count("cacheReadInputTokenCount"),
            cache_write_tokens: count("cacheWriteInputTokenCount"),
        }
    }

    /// InvokeModel's usage headers.
    pub fn from_headers(headers: &HeaderMap) -> Usage {
        let count = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Usage {
            input_tokens: count(INPUT_TOKENS_HEADER),
            output_tokens: count(OUTPUT_TOKENS_HEADER),
            cache_read_tokens: count(CACHE_READ_TOKENS_HEADER),
            cache_write_tokens: count(CACHE_WRITE_TOKENS_HEADER),
        }
    }

    /// Whether input and output were both reported: what makes a usage report whole.
    pub fn has_input_and_output(&self) -> bool {
        self.input_tokens.is_some() && self.output_tokens.is_some()
    }

    pub fn is_empty(&self) -> bool {
        *self == Usage::default()
    }

    /// Input plus output tokens: what token budgets count.
    pub fn billable(&self) -> u64 {
        self.input_tokens
            .unwrap_or(0)
            .saturating_add(self.output_tokens.unwrap_or(0))
    }
}

/// What a [`UsageReader`] learnt from one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    pub usage: Usage,
    /// The answer's usage report was read whole. `false` when the answer ended (or was cut)
    /// before it, or it could not be read: `usage` then holds what was known, maybe nothing.
    pub complete: bool,
}

/// Where a body that read an answer's usage leaves the [`Reading`] for the hook that records
/// the request when the body ends.
#[derive(Debug, Clone, Default)]
pub struct UsageSlot(Arc<Mutex<Option<Reading>>>);

impl UsageSlot {
    pub fn put(&self, reading: Reading) {
        *self.lock() = Some(reading);
    }

    /// The reading, once the body has ended and put it here.
    pub fn take(&self) -> Option<Reading> {
        self.lock().take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Reading>> {
        // A plain value: whatever a panicking holder left is still usable.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Reads one answer's usage from its head and, as they pass, its body's bytes.
#[derive(Debug)]
pub struct UsageReader {
    source: Source,
    usage: Usage,
    complete: bool,
}

#[derive(Debug)]
enum Source {
    /// Converse: the JSON answer, gathered up to [`MAX_JSON_BYTES`]; `None` once over it.
    Json(Option<BytesMut>),
    /// InvokeModel: everything was in the headers.
    Headers,
    /// An event stream (ConverseStream or InvokeModelWithResponseStream): frames decoded as
    /// their bytes arrive; `None` after a frame that could not be decoded.
    Events {
        invoke: bool,
        decoder: Option<(MessageFrameDecoder, BytesMut)>,
    },
}

impl UsageReader {
    /// A reader for an answer to `operation`, or `None` when such an answer carries no
    /// usage: an operation that generates nothing, or an error status.
    pub fn for_answer(
        operation: Operation,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<UsageReader> {
        if !status.is_success() {
            return None;
        }
        let (source, usage) = match operation {
            Operation::Converse => (Source::Json(Some(BytesMut::new())), Usage::default()),
            Operation::InvokeModel => (Source::Headers, Usage::from_headers(headers)),
            Operation::ConverseStream | Operation::InvokeModelWithResponseStream => (
                Source::Events {
                    invoke: operation == Operation::InvokeModelWithResponseStream,
                    decoder: Some((MessageFrameDecoder::new(), BytesMut::new())),
                },
                Usage::default(),
            ),
            // CountTokens, ApplyGuardrail, the async-invoke family and the rest generate
            // nothing here (a bidirectional stream's usage is not read).
            _ => return None,
        };
        let complete = matches!(source, Source::Headers) && usage.has_input_and_output();
        Some(UsageReader {
            source,
            usage,
            complete,
        })
    }

    /// The next bytes of the body, as they went on to the reader.
    pub fn feed(&mut self, data: &[u8]) {
        match &mut self.source {
            Source::Headers => {}
            Source::Json(buffer) => {
                let over = buffer
                    .as_ref()
                    .is_some_and(|b| b.len() + data.len() > MAX_JSON_BYTES);
                match (buffer.as_mut(), over) {
                    (Some(_), true) => *buffer = None,
                    (Some(b), false) => b.extend_from_slice(data),
                    (None, _) => {}
                }
            }
            Source::Events { invoke, decoder } => {
                let Some((frames, pending)) = decoder.as_mut() else {
                    return;
                };
                pending.extend_from_slice(data);
                loop {
                    match frames.decode_frame(&mut *pending) {
                        Ok(DecodedFrame::Incomplete) => break,
                        Ok(DecodedFrame::Complete(message)) => {
                            if let Some(usage) = event_usage(&message, *invoke) {
                                self.usage = usage;
                                self.complete = usage.has_input_and_output();
                            }
                        }
                        // The caller's SDK reports a broken stream; the reader stops reading
                        // and keeps what it has.
                        Err(_) => {
                            *decoder = None;
                            break;
                        }
                    }
                }
            }
        }
    }

    /// What the answer said about its usage, once its body has ended (or been cut).
    pub fn finish(self) -> Reading {
        match self.source {
            Source::Json(Some(buffer)) => {
                let usage = serde_json::from_slice::<Value>(&buffer)
                    .ok()
                    .and_then(|answer| answer.get("usage").map(Usage::from_converse))
                    .unwrap_or_default();
                Reading {
                    usage,
                    complete: usage.has_input_and_output(),
                }
            }
            Source::Json(None) => Reading::default(),
            Source::Headers | Source::Events { .. } => Reading {
                usage: self.usage,
                complete: self.complete,
            },
        }
    }
}

/// The usage an event carries: ConverseStream's `metadata`, or an InvokeModelWithResponseStream
/// `chunk` whose decoded bytes hold the invocation metrics.
fn event_usage(message: &Message, invoke: bool) -> Option<Usage> {
    let header = |name: &str| crate::event_stream_header(message, name);
    if header(":message-type") != Some("event") {
        return None;
    }
    let payload = serde_json::from_slice::<Value>(message.payload()).ok()?;
    match (invoke, header(":event-type")?) {
        (false, "metadata") => payload.get("usage").map(Usage::from_converse),
        (true, "chunk") => {
            let encoded = payload.get("bytes")?.as_str()?;
            let chunk = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()?;
            let chunk = serde_json::from_slice::<Value>(&chunk).ok()?;
            chunk
                .get(INVOCATION_METRICS)
                .map(Usage::from_invocation_metrics)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::header_map;
    use serde_json::json;

    fn event(kind: &str, payload: &Value) -> Vec<u8> {
        crate::event_stream_frame(
            &[(":message-type", "event"), (":event-type", kind)],
            payload.to_string(),
        )
        .expect("encode")
    }

    fn full(input: u64, output: u64, read: u64, write: u64) -> Usage {
        Usage {
            input_tokens: Some(input),
            output_tokens: Some(output),
            cache_read_tokens: Some(read),
            cache_write_tokens: Some(write),
        }
    }

    fn reader(operation: Operation, headers: &HeaderMap) -> UsageReader {
        UsageReader::for_answer(operation, StatusCode::OK, headers).expect("a generating answer")
    }

    #[test]
    fn converse_usage_is_read_from_the_json_answer_in_pieces() {
        let answer = json!({
            "output": {"message": {"role": "assistant", "content": [{"text": "hi"}]}},
            "stopReason": "end_turn",
            "usage": {"inputTokens": 11, "outputTokens": 7, "totalTokens": 18,
                      "cacheReadInputTokens": 3, "cacheWriteInputTokens": 2},
        })
        .to_string();
        let mut usage = reader(Operation::Converse, &HeaderMap::new());
        for piece in answer.as_bytes().chunks(5) {
            usage.feed(piece);
        }
        assert_eq!(
            usage.finish(),
            Reading {
                usage: full(11, 7, 3, 2),
                complete: true
            }
        );
    }

    #[test]
    fn converse_answer_cut_short_is_incomplete() {
        let mut usage = reader(Operation::Converse, &HeaderMap::new());
        usage.feed(br#"{"output": {"message": {"#);
        assert_eq!(usage.finish(), Reading::default());
    }

    #[test]
    fn converse_answer_over_the_inspection_limit_is_passed_unread() {
        let mut usage = reader(Operation::Converse, &HeaderMap::new());
        usage.feed(&vec![b' '; MAX_JSON_BYTES]);
        usage.feed(br#"{"usage": {"inputTokens": 1, "outputTokens": 1}}"#);
        assert_eq!(usage.finish(), Reading::default());
    }

    #[test]
    fn invoke_model_usage_comes_from_its_headers() {
        let headers = header_map(&[
            (INPUT_TOKENS_HEADER, "120"),
            (OUTPUT_TOKENS_HEADER, "45"),
            (CACHE_READ_TOKENS_HEADER, "6"),
        ]);
        let mut usage = reader(Operation::InvokeModel, &headers);
        usage.feed(br#"{"completion": "x"}"#);
        let reading = usage.finish();
        assert!(reading.complete);
        assert_eq!(
            reading.usage,
            Usage {
                input_tokens: Some(120),
                output_tokens: Some(45),
                cache_read_tokens: Some(6),
                cache_write_tokens: None,
            }
        );
        let without = reader(Operation::InvokeModel, &HeaderMap::new()).finish();
        assert_eq!(without, Reading::default());
    }

    #[test]
    fn converse_stream_usage_comes_from_the_metadata_event_across_any_split() {
        let mut stream = event("messageStart", &json!({"role": "assistant"}));
        stream.extend(event(
            "contentBlockDelta",
            &json!({"contentBlockIndex": 0, "delta": {"text": "hello"}}),
        ));
        stream.extend(event("messageStop", &json!({"stopReason": "end_turn"})));
        let before_metadata = stream.len();
        stream.extend(event(
            "metadata",
            &json!({"usage": {"inputTokens": 25, "outputTokens": 9, "totalTokens": 34,
                              "cacheReadInputTokens": 4, "cacheWriteInputTokens": 1},
                    "metrics": {"latencyMs": 100}}),
        ));
        for split in [1, 7, 13, before_metadata, stream.len() - 1] {
            let mut usage = reader(Operation::ConverseStream, &HeaderMap::new());
            usage.feed(&stream[..split]);
            usage.feed(&stream[split..]);
            let reading = usage.finish();
            assert_eq!(reading.usage, full(25, 9, 4, 1), "split at {split}");
            assert!(reading.complete);
        }
    }

    #[test]
    fn converse_stream_cut_before_its_metadata_is_incomplete() {
        let mut stream = event("messageStart", &json!({"role": "assistant"}));
        stream.extend(event(
            "metadata",
            &json!({"usage": {"inputTokens": 25, "outputTokens": 9}}),
        ));
        let mut usage = reader(Operation::ConverseStream, &HeaderMap::new());
        usage.feed(&stream[..stream.len() - 3]);
        let reading = usage.finish();
        assert!(!reading.complete);
        assert!(reading.usage.is_empty());
    }

    fn chunk(inner: &Value) -> Vec<u8> {
        let bytes = base64::engine::general_purpose::STANDARD.encode(inner.to_string());
        event("chunk", &json!({ "bytes": bytes }))
    }

    #[test]
    fn invoke_stream_usage_comes_from_the_last_chunks_invocation_metrics() {
        let mut stream = chunk(&json!({"type": "content_block_delta", "delta": {"text": "a"}}));
        stream.extend(chunk(&json!({
            "type": "message_stop",
            "amazon-bedrock-invocationMetrics": {"inputTokenCount": 30, "outputTokenCount": 12,
                "invocationLatency": 500, "firstByteLatency": 100,
                "cacheReadInputTokenCount": 5, "cacheWriteInputTokenCount": 8}
        })));
        let mut usage = reader(Operation::InvokeModelWithResponseStream, &HeaderMap::new());
        for piece in stream.chunks(10) {
            usage.feed(piece);
        }
        assert_eq!(
            usage.finish(),
            Reading {
                usage: full(30, 12, 5, 8),
                complete: true
            }
        );
    }

    #[test]
    fn garbage_in_a_stream_stops_the_reading_without_failing() {
        let mut usage = reader(Operation::InvokeModelWithResponseStream, &HeaderMap::new());
        usage.feed(&[0, 0, 0, 5, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        usage.feed(&chunk(&json!({INVOCATION_METRICS: {"inputTokenCount": 1}})));
        assert_eq!(usage.finish(), Reading::default());
    }

    #[test]
    fn errors_and_operations_without_usage_get_no_reader() {
        let headers = HeaderMap::new();
        assert!(UsageReader::for_answer(
            Operation::Converse,
            StatusCode::TOO_MANY_REQUESTS,
            &headers
        )
        .is_none());
        assert!(
            UsageReader::for_answer(Operation::CountTokens, StatusCode::OK, &headers).is_none()
        );
        assert!(
            UsageReader::for_answer(Operation::ApplyGuardrail, StatusCode::OK, &headers).is_none()
        );
    }

    #[test]
    fn billable_tokens_are_input_plus_output() {
        assert_eq!(full(10, 5, 100, 100).billable(), 15);
        assert_eq!(Usage::default().billable(), 0);
    }
}
