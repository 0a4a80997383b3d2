//! Bodies that stream through the agent frame by frame, never buffered whole.
//!
//! [`RequestBody`] carries the caller's body to the relay, counting bytes and cutting the
//! request off at the principal's body limit. [`ResponseBody`] carries the relay's answer
//! back, counting bytes, ending with an error if the relay is declared dead mid-stream, and
//! calling its `on_end` hook exactly once with the [`Ending`] when the body finishes, fails or
//! is dropped (the caller went away): that is where the audit line is written and the
//! concurrency slot freed.
//! A body is complete when its last byte has been handed to the server: hyper stops polling a
//! body once it has written `Content-Length` bytes or seen the end-of-stream flag, and drops it
//! without asking for the `None` that would otherwise mark the end, so both are checked after
//! every frame and again on drop.
//! A body given a [`UsageReader`] shows it a copy of each frame as it passes (nothing is held
//! back) and leaves the reading in its [`UsageSlot`] just before calling `on_end`.
//! For event streams it tracks frame boundaries, so that a relay lost between frames ends the
//! stream with a `serviceUnavailableException` event the SDK raises as such, rather than with a
//! bare transport error.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use xpart_bedrock::usage::{UsageReader, UsageSlot};
use xpart_daemon::record::{Ending, OnEnd};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
pub struct RequestBody<B> {
    inner: B,
    limit: u64,
    meter: Arc<RequestMeter>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

impl<B> RequestBody<B> {
    pub fn new(inner: B, limit: u64, meter: Arc<RequestMeter>) -> RequestBody<B> {
        RequestBody {
            inner,
            limit,
            meter,
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Err(error))) => {
                self.meter.caller_failed.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(error.into())));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            let total = self.meter.bytes.fetch_add(len, Ordering::Relaxed) + len;
            if total > self.limit {
                self.meter.over_limit.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit: self.limit }))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type AbortSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The relay's response body on its way to the caller.
pub struct ResponseBody<B> {
    inner: B,
    bytes: u64,
    /// The response's `Content-Length`, when it has one.
    length: Option<u64>,
    /// The relay's stream has said it has ended (noted by `is_end_stream`, which the server
    /// asks before deciding not to poll again).
    ended: AtomicBool,
    abort: Option<AbortSignal>,
    on_end: OnEnd,
    frames: Option<FrameBoundary>,
    usage: Option<(UsageReader, UsageSlot)>,
}

#[derive(Debug, thiserror::Error)]
#[error("the relay stopped answering while the response was streaming")]
pub struct RelayLostMidStream;

impl<B> ResponseBody<B> {
    /// `abort` resolves when the relay carrying this response is declared dead.
    pub fn new(
        inner: B,
        abort: impl Future<Output = ()> + Send + 'static,
        on_end: impl FnOnce(Ending, u64) + Send + 'static,
    ) -> ResponseBody<B> {
        ResponseBody {
            inner,
            bytes: 0,
            length: None,
            ended: AtomicBool::new(false),
            abort: Some(Box::pin(abort)),
            on_end: OnEnd::new(on_end),
            frames: None,
            usage: None,
        }
    }

    /// Reads the answer's token usage as it passes, into `slot`.
    pub fn with_usage(mut self, reader: UsageReader, slot: UsageSlot) -> ResponseBody<B> {
        self.usage = Some((reader, slot));
        self
    }

    /// Marks the body as an `application/vnd.amazon.eventstream`.
    pub fn with_event_stream(mut self) -> ResponseBody<B> {
        self.frames = Some(FrameBoundary::default());
        self
    }

    /// The `Content-Length` the response declares: the body is complete once that many bytes
    /// have gone out.
    pub fn with_length(mut self, length: Option<u64>) -> ResponseBody<B> {
        self.length = length;
        self
    }

    /// Whether the relay carrying this response has been declared dead.
    fn relay_lost(&mut self, cx: &mut Context<'_>) -> bool {
        self.abort
            .as_mut()
            .is_some_and(|abort| abort.as_mut().poll(cx).is_ready())
    }

    fn finish(&mut self, end: Ending) {
        if let Some((reader, slot)) = self.usage.take() {
            slot.put(reader.finish());
        }
        self.on_end.end(end, self.bytes);
        self.abort = None;
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.on_end.has_ended() {
            return Poll::Ready(None);
        }
        let lost = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                    if let Some(frames) = self.frames.as_mut() {
                        frames.feed(data);
                    }
                    if let Some((reader, _)) = self.usage.as_mut() {
                        reader.feed(data);
                    }
                }
                if self.all_sent() {
                    self.finish(Ending::Complete);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            // A relay connection that breaks fails its streams as the relay is declared
            // lost: such a failure ends like the loss, farewell event included.
            Poll::Ready(Some(Err(error))) => {
                if !self.relay_lost(cx) {
                    self.finish(Ending::Failed(error.to_string()));
                    return Poll::Ready(Some(Err(error.to_string().into())));
                }
                true
            }
            Poll::Ready(None) => {
                self.finish(Ending::Complete);
                return Poll::Ready(None);
            }
            Poll::Pending => self.relay_lost(cx),
        };
        if lost {
            let farewell = self
                .frames
                .as_ref()
                .filter(|frames| frames.at_boundary())
                .and_then(|_| relay_lost_event());
            self.finish(Ending::Lost);
            return match farewell {
                Some(event) => Poll::Ready(Some(Ok(Frame::data(event)))),
                None => Poll::Ready(Some(Err(Box::new(RelayLostMidStream)))),
            };
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.on_end.has_ended() || self.all_sent()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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

impl<B: Body> ResponseBody<B> {
    /// Everything the relay sent has been handed on: its stream says it has ended, or the
    /// declared length has gone out.
    fn all_sent(&self) -> bool {
        if self.inner.is_end_stream() {
            self.ended.store(true, Ordering::Relaxed);
        }
        self.sent_to_the_end()
    }
}

impl<B> ResponseBody<B> {
    fn sent_to_the_end(&self) -> bool {
        self.ended.load(Ordering::Relaxed) || self.length.is_some_and(|length| self.bytes >= length)
    }
}

impl<B> Drop for ResponseBody<B> {
    fn drop(&mut self) {
        match self.sent_to_the_end() {
            true => self.finish(Ending::Complete),
            false => self.finish(Ending::Abandoned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::Mutex;

    #[tokio::test]
    async fn request_body_passes_frames_and_counts_bytes() {
        let meter = Arc::new(RequestMeter::default());
        let body = RequestBody::new(Full::new(Bytes::from_static(b"hello")), 5, meter.clone());
        let collected = body.collect().await.expect("within limit").to_bytes();
        assert_eq!(collected, Bytes::from_static(b"hello"));
        assert_eq!(meter.bytes.load(Ordering::Relaxed), 5);
        assert!(!meter.over_limit.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn request_body_over_limit_fails_and_flags() {
        let meter = Arc::new(RequestMeter::default());
        let chunks = futures_util::stream::iter(vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"1234"))),
            Ok(Frame::data(Bytes::from_static(b"5678"))),
        ]);
        let body = RequestBody::new(StreamBody::new(chunks), 6, meter.clone());
        let error = body.collect().await.expect_err("over the limit");
        assert!(error.to_string().contains("exceeds 6 bytes"));
        assert!(meter.over_limit.load(Ordering::Relaxed));
    }

    /// How each test body ended: bytes sent and the kind of end.
    type Ends = Arc<Mutex<Vec<(u64, Ending)>>>;

    fn recorder() -> (Ends, impl FnOnce(Ending, u64) + Send) {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let sink = ends.clone();
        (ends, move |end, bytes| {
            sink.lock().expect("test lock").push((bytes, end))
        })
    }

    /// `abc` in one frame, with nothing to abort it.
    fn abc(hook: impl FnOnce(Ending, u64) + Send + 'static) -> ResponseBody<Full<Bytes>> {
        ResponseBody::new(
            Full::new(Bytes::from_static(b"abc")),
            std::future::pending(),
            hook,
        )
    }

    /// `abc` then `def` in two frames, declared six bytes long.
    fn abc_def(
        hook: impl FnOnce(Ending, u64) + Send + 'static,
    ) -> ResponseBody<impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin> {
        let chunks = futures_util::stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"def"))),
        ]);
        ResponseBody::new(StreamBody::new(chunks), std::future::pending(), hook)
            .with_length(Some(6))
    }

    #[tokio::test]
    async fn response_body_reports_completion_once() {
        let (ends, hook) = recorder();
        let body = abc(hook);
        let collected = body.collect().await.expect("complete").to_bytes();
        assert_eq!(collected, Bytes::from_static(b"abc"));
        assert_eq!(*ends.lock().expect("test lock"), [(3, Ending::Complete)]);
    }

    #[tokio::test]
    async fn response_body_dropped_early_reports_caller_gone() {
        let (ends, hook) = recorder();
        let body = abc(hook);
        drop(body);
        assert_eq!(*ends.lock().expect("test lock"), [(0, Ending::Abandoned)]);
    }

    /// hyper writes the frame that fills `Content-Length` (or ends the stream) and drops the
    /// body without polling it again: that is a complete response.
    #[tokio::test]
    async fn response_body_dropped_after_its_last_frame_is_complete() {
        let (ends, hook) = recorder();
        let mut body = abc_def(hook);
        body.frame().await.expect("first").expect("ok");
        assert!(!body.is_end_stream());
        body.frame().await.expect("second").expect("ok");
        assert!(body.is_end_stream());
        drop(body);
        assert_eq!(*ends.lock().expect("test lock"), [(6, Ending::Complete)]);

        let (ends, hook) = recorder();
        let mut body = abc(hook);
        body.frame().await.expect("the only frame").expect("ok");
        assert!(body.is_end_stream(), "the inner stream has ended");
        drop(body);
        assert_eq!(*ends.lock().expect("test lock"), [(3, Ending::Complete)]);
    }

    #[tokio::test]
    async fn response_body_dropped_before_its_length_is_caller_gone() {
        let (ends, hook) = recorder();
        let mut body = abc_def(hook);
        body.frame().await.expect("first").expect("ok");
        drop(body);
        assert_eq!(*ends.lock().expect("test lock"), [(3, Ending::Abandoned)]);
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

    #[tokio::test]
    async fn event_stream_lost_between_frames_ends_with_an_exception_event() {
        let (ends, hook) = recorder();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let first = Bytes::from(event("messageStart"));
        let chunks = futures_util::stream::once({
            let first = first.clone();
            async move { Ok::<_, std::convert::Infallible>(Frame::data(first)) }
        })
        .chain(futures_util::stream::pending());
        let mut body = ResponseBody::new(
            StreamBody::new(Box::pin(chunks)),
            async move {
                let _ = rx.await;
            },
            hook,
        )
        .with_event_stream();
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
        let tx = std::sync::Mutex::new(Some(tx));
        let first = Bytes::from(event("messageStart"));
        let chunks = futures_util::stream::iter([Ok(Frame::data(first.clone()))]).chain(
            futures_util::stream::once(async move {
                if let Some(tx) = tx.lock().expect("test lock").take() {
                    let _ = tx.send(());
                }
                Err::<Frame<Bytes>, _>("connection closed".to_owned())
            }),
        );
        let mut body = ResponseBody::new(
            StreamBody::new(Box::pin(chunks)),
            async move {
                let _ = rx.await;
            },
            hook,
        )
        .with_event_stream();
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

    /// The usage is in the slot when the hook runs, and every byte went through unchanged.
    #[tokio::test]
    async fn response_body_reads_usage_as_it_passes_and_hands_it_to_the_hook() {
        let mut stream = event("messageStart");
        stream.extend(metadata(12, 5));
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = stream
            .chunks(7)
            .map(|piece| Ok(Frame::data(Bytes::copy_from_slice(piece))))
            .collect();
        let slot = UsageSlot::default();
        let seen = Arc::new(Mutex::new(None));
        let (hook_slot, hook_seen) = (slot.clone(), seen.clone());
        let reader = UsageReader::for_answer(
            xpart_bedrock::Operation::ConverseStream,
            http::StatusCode::OK,
            &http::HeaderMap::new(),
        )
        .expect("a reader");
        let body = ResponseBody::new(
            StreamBody::new(futures_util::stream::iter(chunks)),
            std::future::pending(),
            move |_, _| *hook_seen.lock().expect("test lock") = hook_slot.take(),
        )
        .with_event_stream()
        .with_usage(reader, slot);
        let collected = body.collect().await.expect("complete").to_bytes();
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
        let chunks = futures_util::stream::once(async move {
            Ok::<_, std::convert::Infallible>(Frame::data(first))
        })
        .chain(futures_util::stream::pending());
        let slot = UsageSlot::default();
        let seen = Arc::new(Mutex::new(None));
        let (hook_slot, hook_seen) = (slot.clone(), seen.clone());
        let reader = UsageReader::for_answer(
            xpart_bedrock::Operation::ConverseStream,
            http::StatusCode::OK,
            &http::HeaderMap::new(),
        )
        .expect("a reader");
        let mut body = ResponseBody::new(
            StreamBody::new(Box::pin(chunks)),
            std::future::pending(),
            move |end, _| *hook_seen.lock().expect("test lock") = Some((end, hook_slot.take())),
        )
        .with_usage(reader, slot);
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
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
        chunks_tx
            .try_send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .expect("room in channel");
        let chunks_rx = futures_util::stream::unfold(chunks_rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut body = ResponseBody::new(
            StreamBody::new(Box::pin(chunks_rx)),
            async move {
                let _ = rx.await;
            },
            hook,
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
