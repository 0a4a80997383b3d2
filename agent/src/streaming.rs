//! Bodies that stream through the agent frame by frame, never buffered whole: each is an
//! `xpart_daemon::body::Watched` body under one of the watches here.
//!
//! [`BodyLimit`] watches the caller's body on its way to the relay, counting bytes and cutting
//! the request off at the principal's body limit. [`RelayWatch`] watches the relay's answer on
//! its way back, counting bytes, ending with an error if the relay is declared dead mid-stream,
//! and calling its `on_end` hook exactly once with the [`Ending`] when the body finishes, fails
//! or is dropped (the caller went away): that is where the audit line is written and the
//! concurrency slot freed. A body declared `Content-Length` long is complete once that many
//! bytes have gone out.
//! For event streams it tracks frame boundaries, so that a relay lost between frames ends the
//! stream with a `serviceUnavailableException` event the SDK raises as such, rather than with a
//! bare transport error.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Context;

use bytes::Bytes;
use http_body::Frame;
use xpart_bedrock::usage::{UsageReader, UsageSlot};
pub use xpart_daemon::body::BoxError;
use xpart_daemon::body::{StreamEnd, Watch, Watched};
use xpart_daemon::record::{Ending, OnEnd};

/// Counters a request body fills while it streams.
#[derive(Debug, Default)]
pub struct RequestMeter {
    pub bytes: AtomicU64,
    /// Set when the body went over the limit (the forward then failed because of it).
    pub over_limit: AtomicBool,
    /// Set when the caller's side of the body failed (it broke off the upload).
    pub caller_failed: AtomicBool,
}

/// The caller's body on its way to the relay.
pub type RequestBody<B> = Watched<B, BodyLimit>;

/// Counts a request body into its [`RequestMeter`] and fails it past `limit` bytes.
pub struct BodyLimit {
    limit: u64,
    meter: Arc<RequestMeter>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

impl BodyLimit {
    pub fn new(limit: u64, meter: Arc<RequestMeter>) -> BodyLimit {
        BodyLimit { limit, meter }
    }
}

impl<E: Into<BoxError>> Watch<E> for BodyLimit {
    fn frame(&mut self, frame: &Frame<Bytes>, _inner_ended: bool) -> Result<(), BoxError> {
        let Some(data) = frame.data_ref() else {
            return Ok(());
        };
        let len = data.len() as u64;
        let total = self.meter.bytes.fetch_add(len, Ordering::Relaxed) + len;
        if total > self.limit {
            self.meter.over_limit.store(true, Ordering::Relaxed);
            return Err(Box::new(BodyTooLarge { limit: self.limit }));
        }
        Ok(())
    }

    fn failed(&mut self, error: E, _cx: &mut Context<'_>) -> Result<Frame<Bytes>, BoxError> {
        self.meter.caller_failed.store(true, Ordering::Relaxed);
        Err(error.into())
    }
}

/// The relay's response body on its way to the caller.
pub type ResponseBody<B> = Watched<B, RelayWatch>;

type AbortSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Watches the relay's answer: its end, its usage, and the relay carrying it.
pub struct RelayWatch {
    end: StreamEnd,
    /// The response's `Content-Length`, when it has one.
    length: Option<u64>,
    abort: Option<AbortSignal>,
    frames: Option<FrameBoundary>,
}

#[derive(Debug, thiserror::Error)]
#[error("the relay stopped answering while the response was streaming")]
pub struct RelayLostMidStream;

impl RelayWatch {
    /// `abort` resolves when the relay carrying this response is declared dead.
    pub fn new(
        abort: impl Future<Output = ()> + Send + 'static,
        on_end: impl FnOnce(Ending, u64) + Send + 'static,
    ) -> RelayWatch {
        RelayWatch {
            end: StreamEnd::new(OnEnd::new(on_end)),
            length: None,
            abort: Some(Box::pin(abort)),
            frames: None,
        }
    }

    /// Reads the answer's token usage as it passes, into `slot`.
    pub fn with_usage(mut self, reader: UsageReader, slot: UsageSlot) -> RelayWatch {
        self.end = self.end.with_usage(reader, slot);
        self
    }

    /// Marks the body as an `application/vnd.amazon.eventstream`.
    pub fn with_event_stream(mut self) -> RelayWatch {
        self.frames = Some(FrameBoundary::default());
        self
    }

    /// The `Content-Length` the response declares: the body is complete once that many bytes
    /// have gone out.
    pub fn with_length(mut self, length: Option<u64>) -> RelayWatch {
        self.length = length;
        self
    }

    /// Whether the relay carrying this response has been declared dead.
    fn relay_lost(&mut self, cx: &mut Context<'_>) -> bool {
        self.abort
            .as_mut()
            .is_some_and(|abort| abort.as_mut().poll(cx).is_ready())
    }

    /// Ends the stream as lost: with the farewell event if the stream is between events.
    fn lost(&mut self) -> Result<Frame<Bytes>, BoxError> {
        let farewell = self
            .frames
            .as_ref()
            .filter(|frames| frames.at_boundary())
            .and_then(|_| relay_lost_event());
        self.finish(Ending::Lost);
        match farewell {
            Some(event) => Ok(Frame::data(event)),
            None => Err(Box::new(RelayLostMidStream)),
        }
    }

    fn finish(&mut self, ending: Ending) {
        self.end.end(ending);
        self.abort = None;
    }

    fn length_sent(&self) -> bool {
        self.length.is_some_and(|length| self.end.bytes() >= length)
    }
}

impl<E: std::fmt::Display> Watch<E> for RelayWatch {
    fn frame(&mut self, frame: &Frame<Bytes>, inner_ended: bool) -> Result<(), BoxError> {
        if let Some(data) = frame.data_ref() {
            self.end.pass(data);
            if let Some(frames) = self.frames.as_mut() {
                frames.feed(data);
            }
        }
        if inner_ended || self.length_sent() {
            self.finish(Ending::Complete);
        }
        Ok(())
    }

    /// A relay connection that breaks fails its streams as the relay is declared lost: such a
    /// failure ends like the loss, farewell event included.
    fn failed(&mut self, error: E, cx: &mut Context<'_>) -> Result<Frame<Bytes>, BoxError> {
        if self.relay_lost(cx) {
            return self.lost();
        }
        let reason = error.to_string();
        self.finish(Ending::Failed(reason.clone()));
        Err(reason.into())
    }

    fn ended(&mut self) {
        self.finish(Ending::Complete);
    }

    fn waiting(&mut self, cx: &mut Context<'_>) -> Option<Result<Frame<Bytes>, BoxError>> {
        self.relay_lost(cx).then(|| self.lost())
    }

    fn has_ended(&self) -> bool {
        self.end.has_ended()
    }

    fn dropped(&mut self, inner_ended: bool) {
        let all_sent = inner_ended || self.length_sent();
        self.end.dropped(all_sent);
    }
}

/// Follows an event stream's frames by their length prelude (total length, u32 big-endian) to
/// know whether the bytes sent so far end on a frame boundary.
#[derive(Debug, Default)]
pub struct FrameBoundary {
    prelude: [u8; 4],
    prelude_len: usize,
    /// Bytes of the current frame still to come after its length field.
    remaining: u64,
}

impl FrameBoundary {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len() as u64);
                self.remaining -= take;
                data = &data[take as usize..];
                continue;
            }
            let take = (4 - self.prelude_len).min(data.len());
            self.prelude[self.prelude_len..self.prelude_len + take].copy_from_slice(&data[..take]);
            self.prelude_len += take;
            data = &data[take..];
            if self.prelude_len == 4 {
                let total = u32::from_be_bytes(self.prelude);
                // A frame is at least its 16 bytes of framing; a smaller length is garbage,
                // after which no boundary can be trusted.
                self.remaining = u64::from(total.max(16)) - 4;
                self.prelude_len = 0;
            }
        }
    }

    pub fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.prelude_len == 0
    }
}

/// The event that ends a stream whose relay stopped answering: an exception both
/// ConverseStream and InvokeModelWithResponseStream model, so the SDK raises it by name.
fn relay_lost_event() -> Option<Bytes> {
    let payload = serde_json::json!({
        "message": "The relay stopped answering while the response was streaming; the rest of the response is lost."
    })
    .to_string();
    let frame = xpart_bedrock::event_stream_frame(
        &[
            (":message-type", "exception"),
            (":exception-type", "serviceUnavailableException"),
            (":content-type", "application/json"),
        ],
        payload,
    )
    .ok()?;
    Some(Bytes::from(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body::Body;
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::convert::Infallible;
    use std::sync::Mutex;

    #[tokio::test]
    async fn request_body_passes_frames_and_counts_bytes() {
        let meter = Arc::new(RequestMeter::default());
        let body = RequestBody::new(
            Full::new(Bytes::from_static(b"hello")),
            BodyLimit::new(5, meter.clone()),
        );
        let collected = body.collect().await.expect("within limit").to_bytes();
        assert_eq!(collected, Bytes::from_static(b"hello"));
        assert_eq!(meter.bytes.load(Ordering::Relaxed), 5);
        assert!(!meter.over_limit.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn request_body_over_limit_fails_and_flags() {
        let meter = Arc::new(RequestMeter::default());
        let chunks = futures_util::stream::iter(vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"1234"))),
            Ok(Frame::data(Bytes::from_static(b"5678"))),
        ]);
        let body = RequestBody::new(StreamBody::new(chunks), BodyLimit::new(6, meter.clone()));
        let error = body.collect().await.expect_err("over the limit");
        assert!(error.to_string().contains("exceeds 6 bytes"));
        assert!(meter.over_limit.load(Ordering::Relaxed));
    }

    /// How each test body ended: bytes sent and the kind of end.
    type Ends = Arc<Mutex<Vec<(u64, Ending)>>>;

    type Hook = Box<dyn FnOnce(Ending, u64) + Send>;

    fn recorder() -> (Ends, Hook) {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let sink = ends.clone();
        let hook = move |end, bytes| sink.lock().expect("test lock").push((bytes, end));
        (ends, Box::new(hook))
    }

    type TestBody = ResponseBody<UnsyncBoxBody<Bytes, Infallible>>;

    /// `abc` in one frame, with nothing to abort it.
    fn abc(hook: Hook) -> TestBody {
        let inner = Full::new(Bytes::from_static(b"abc")).boxed_unsync();
        ResponseBody::new(inner, RelayWatch::new(std::future::pending(), hook))
    }

    /// `abc` then `def` in two frames, declared six bytes long.
    fn abc_def(hook: Hook) -> TestBody {
        let chunks = futures_util::stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"def"))),
        ]);
        let watch = RelayWatch::new(std::future::pending(), hook).with_length(Some(6));
        ResponseBody::new(StreamBody::new(chunks).boxed_unsync(), watch)
    }

    /// What the body is, how many frames are read from it before it is dropped, whether it
    /// then says it has ended, and how it ends.
    type Case = (
        &'static str,
        fn(Hook) -> TestBody,
        usize,
        bool,
        (u64, Ending),
    );

    /// A body is complete once the frame that fills `Content-Length` (or ends the stream) is
    /// out: hyper writes that frame and drops the body without polling it again. Dropped before
    /// that, the caller went away. Either way the hook is called once.
    #[tokio::test]
    async fn response_body_ends_by_how_far_it_was_read_before_it_was_dropped() {
        let cases: [Case; 5] = [
            ("abc, read to its end", abc, 2, true, (3, Ending::Complete)),
            ("abc, never read", abc, 0, false, (0, Ending::Abandoned)),
            (
                "abc, its only frame read",
                abc,
                1,
                true,
                (3, Ending::Complete),
            ),
            (
                "abc|def, first frame read",
                abc_def,
                1,
                false,
                (3, Ending::Abandoned),
            ),
            (
                "abc|def, both frames read",
                abc_def,
                2,
                true,
                (6, Ending::Complete),
            ),
        ];
        for (case, body, reads, end_stream, end) in cases {
            let (ends, hook) = recorder();
            let mut body = body(hook);
            let mut read = Vec::new();
            for _ in 0..reads {
                if let Some(frame) = body.frame().await {
                    read.extend(frame.expect("ok").into_data().expect("data"));
                }
            }
            assert_eq!(read, b"abcdef"[..end.0 as usize], "{case}");
            assert_eq!(body.is_end_stream(), end_stream, "{case}");
            drop(body);
            assert_eq!(*ends.lock().expect("test lock"), [end], "{case}");
        }
    }

    /// The body's next frame is the exception event that says the relay was lost, and its last.
    async fn ends_with_the_relay_lost_event<B>(body: &mut ResponseBody<B>)
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let last = body
            .frame()
            .await
            .expect("farewell")
            .expect("an event, not an error");
        let message =
            aws_smithy_eventstream::frame::read_message_from(last.into_data().expect("data"))
                .expect("a valid frame");
        let header = |name: &str| xpart_bedrock::event_stream_header(&message, name);
        assert_eq!(header(":message-type"), Some("exception"));
        assert_eq!(
            header(":exception-type"),
            Some("serviceUnavailableException")
        );
        assert!(body.frame().await.is_none(), "the stream ends after it");
    }

    /// An event of `kind` with `payload`, as a relay streams it.
    fn event_with(kind: &str, payload: impl Into<Bytes>) -> Vec<u8> {
        xpart_bedrock::event_stream_frame(
            &[(":message-type", "event"), (":event-type", kind)],
            payload,
        )
        .expect("encode")
    }

    fn event(kind: &str) -> Vec<u8> {
        event_with(kind, Bytes::from_static(b"{}"))
    }

    #[test]
    fn frame_boundaries_are_followed_across_any_split() {
        let mut stream = event("messageStart");
        stream.extend(event("contentBlockDelta"));
        let first_len = event("messageStart").len();
        for split in 0..=stream.len() {
            let mut frames = FrameBoundary::default();
            frames.feed(&stream[..split]);
            let expected = split == 0 || split == first_len || split == stream.len();
            assert_eq!(frames.at_boundary(), expected, "split at {split}");
            frames.feed(&stream[split..]);
            assert!(frames.at_boundary());
        }
    }

    /// A relay that is declared dead when `death` fires (or its sender is dropped).
    async fn dies_on(death: tokio::sync::oneshot::Receiver<()>) {
        let _ = death.await;
    }

    /// An event stream whose first frame is one `messageStart` event (returned too), then
    /// whatever `rest` yields, carried by a relay that dies on `death`.
    fn event_stream<S>(
        rest: S,
        death: tokio::sync::oneshot::Receiver<()>,
        hook: Hook,
    ) -> (
        ResponseBody<impl Body<Data = Bytes, Error = String> + Unpin>,
        Bytes,
    )
    where
        S: futures_util::Stream<Item = Result<Frame<Bytes>, String>> + Send + 'static,
    {
        let first = Bytes::from(event("messageStart"));
        let chunks = futures_util::stream::iter([Ok(Frame::data(first.clone()))]).chain(rest);
        let watch = RelayWatch::new(dies_on(death), hook).with_event_stream();
        let body = ResponseBody::new(StreamBody::new(Box::pin(chunks)), watch);
        (body, first)
    }

    #[tokio::test]
    async fn event_stream_lost_between_frames_ends_with_an_exception_event() {
        let (ends, hook) = recorder();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (mut body, first) = event_stream(futures_util::stream::pending(), rx, hook);
        let got = body.frame().await.expect("frame").expect("ok");
        assert_eq!(got.into_data().expect("data"), first);
        tx.send(()).expect("receiver alive");
        ends_with_the_relay_lost_event(&mut body).await;
        drop(body);
        assert_eq!(ends.lock().expect("test lock")[0].1, Ending::Lost);
    }

    /// The relay's connection breaks: the body's error and the relay's death come together
    /// (the death filed just before the error surfaces), and the stream ends as a loss.
    #[tokio::test]
    async fn event_stream_whose_connection_breaks_ends_with_an_exception_event() {
        let (ends, hook) = recorder();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let tx = Mutex::new(Some(tx));
        let breaks = futures_util::stream::once(async move {
            if let Some(tx) = tx.lock().expect("test lock").take() {
                let _ = tx.send(());
            }
            Err("connection closed".to_owned())
        });
        let (mut body, first) = event_stream(breaks, rx, hook);
        let got = body.frame().await.expect("frame").expect("ok");
        assert_eq!(got.into_data().expect("data"), first);
        ends_with_the_relay_lost_event(&mut body).await;
        drop(body);
        assert_eq!(ends.lock().expect("test lock")[0].1, Ending::Lost);
    }

    fn metadata(input: u64, output: u64) -> Vec<u8> {
        let payload = format!(r#"{{"usage":{{"inputTokens":{input},"outputTokens":{output}}}}}"#);
        event_with("metadata", payload)
    }

    /// A ConverseStream answer's usage reader.
    fn converse_stream_usage() -> UsageReader {
        UsageReader::for_answer(
            xpart_bedrock::Operation::ConverseStream,
            http::StatusCode::OK,
            &http::HeaderMap::new(),
        )
        .expect("a reader")
    }

    /// The usage is in the slot when the hook runs, and every byte went through unchanged.
    #[tokio::test]
    async fn response_body_reads_usage_as_it_passes_and_hands_it_to_the_hook() {
        let mut stream = event("messageStart");
        stream.extend(metadata(12, 5));
        let chunks: Vec<Result<Frame<Bytes>, Infallible>> = stream
            .chunks(7)
            .map(|piece| Ok(Frame::data(Bytes::copy_from_slice(piece))))
            .collect();
        let slot = UsageSlot::default();
        let seen = Arc::new(Mutex::new(None));
        let (hook_slot, hook_seen) = (slot.clone(), seen.clone());
        let hook = move |_, _| *hook_seen.lock().expect("test lock") = hook_slot.take();
        let watch = RelayWatch::new(std::future::pending(), hook)
            .with_event_stream()
            .with_usage(converse_stream_usage(), slot);
        let inner = StreamBody::new(futures_util::stream::iter(chunks));
        let collected = ResponseBody::new(inner, watch)
            .collect()
            .await
            .expect("complete")
            .to_bytes();
        assert_eq!(collected.as_ref(), stream.as_slice());
        let reading = seen.lock().expect("test lock").expect("a reading");
        assert!(reading.complete);
        assert_eq!(
            (reading.usage.input_tokens, reading.usage.output_tokens),
            (Some(12), Some(5))
        );
    }

    /// A caller that goes away before the metadata event: the reading says it is incomplete.
    #[tokio::test]
    async fn response_body_dropped_before_the_metadata_reports_incomplete_usage() {
        let first = Bytes::from(event("messageStart"));
        let chunks =
            futures_util::stream::once(async move { Ok::<_, Infallible>(Frame::data(first)) })
                .chain(futures_util::stream::pending());
        let slot = UsageSlot::default();
        let seen = Arc::new(Mutex::new(None));
        let (hook_slot, hook_seen) = (slot.clone(), seen.clone());
        let hook =
            move |end, _| *hook_seen.lock().expect("test lock") = Some((end, hook_slot.take()));
        let watch =
            RelayWatch::new(std::future::pending(), hook).with_usage(converse_stream_usage(), slot);
        let mut body = ResponseBody::new(StreamBody::new(Box::pin(chunks)), watch);
        body.frame().await.expect("first").expect("ok");
        drop(body);
        let (end, reading) = seen.lock().expect("test lock").take().expect("ended");
        assert_eq!(end, Ending::Abandoned);
        let reading = reading.expect("a reading");
        assert!(!reading.complete);
        assert!(reading.usage.is_empty());
    }

    #[tokio::test]
    async fn response_body_ends_with_error_when_relay_is_lost() {
        let (ends, hook) = recorder();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (chunks_tx, chunks_rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        chunks_tx
            .try_send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .expect("room in channel");
        let chunks_rx = futures_util::stream::unfold(chunks_rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut body = ResponseBody::new(
            StreamBody::new(Box::pin(chunks_rx)),
            RelayWatch::new(dies_on(rx), hook),
        );
        let first = body.frame().await.expect("a frame").expect("ok frame");
        assert_eq!(
            first.into_data().expect("data"),
            Bytes::from_static(b"first")
        );
        tx.send(()).expect("receiver alive");
        let error = body
            .frame()
            .await
            .expect("an error frame")
            .expect_err("relay lost");
        assert!(error.to_string().contains("stopped answering"));
        assert!(body.frame().await.is_none(), "nothing after the error");
        drop(body);
        assert_eq!(*ends.lock().expect("test lock"), vec![(5, Ending::Lost)]);
        drop(chunks_tx);
    }
}
