//! Pass an upstream response body to the agent frame by frame as it arrives (event-stream
//! responses included: nothing is gathered first), count its bytes, stop it when upstream goes
//! quiet for longer than the idle timeout, and report how it ended exactly once: a
//! [`Relayed`] body is an `xpart_daemon::body::Watched` body under an [`UpstreamWatch`].
//!
//! The body is complete once its last frame is handed to the server. hyper does not poll a
//! body again after its frame that ends the stream (or fills the `Content-Length`): it drops
//! it. So the end is recorded as soon as the upstream stream says it has ended, after a frame
//! or on drop; a drop before that is an abandoned body.
//!
//! A watch given a [`UsageReader`] shows it a copy of each frame as it passes (nothing is held
//! back) and leaves the reading in its [`UsageSlot`] just before reporting how it ended.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};
use xpart_bedrock::usage::{UsageReader, UsageSlot};
pub use xpart_daemon::body::BoxError;
use xpart_daemon::body::{StreamEnd, Watch, Watched};
use xpart_daemon::error_chain;
use xpart_daemon::record::{Ending, OnEnd};

/// The upstream body (hyper's `Incoming` in the service; any body in tests) on its way out.
pub type Relayed<B = Incoming> = Watched<B, UpstreamWatch>;

/// Watches upstream's answer: its end, its usage, and how long upstream has been quiet.
pub struct UpstreamWatch {
    end: StreamEnd,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl UpstreamWatch {
    pub fn new(idle: Duration, on_end: OnEnd) -> UpstreamWatch {
        UpstreamWatch {
            end: StreamEnd::new(on_end),
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// Reads the answer's token usage as it passes, into `slot`.
    pub fn with_usage(mut self, reader: UsageReader, slot: UsageSlot) -> UpstreamWatch {
        self.end = self.end.with_usage(reader, slot);
        self
    }
}

#[derive(Debug, thiserror::Error)]
#[error("upstream sent nothing for {0:?}; stream stopped")]
struct IdleTimeout(Duration);

impl<E> Watch<E> for UpstreamWatch
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn frame(&mut self, frame: &Frame<Bytes>, inner_ended: bool) -> Result<(), BoxError> {
        if let Some(data) = frame.data_ref() {
            self.end.pass(data);
        }
        // An idle limit past the clock's range never fires.
        let now = Instant::now();
        let deadline = now
            .checked_add(self.idle)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
        self.timer.as_mut().reset(deadline);
        if inner_ended {
            self.end.end(Ending::Complete);
        }
        Ok(())
    }

    fn failed(&mut self, error: E, _cx: &mut Context<'_>) -> Result<Frame<Bytes>, BoxError> {
        self.end.end(Ending::Failed(error_chain::one_line(&error)));
        Err(Box::new(error))
    }

    fn ended(&mut self) {
        self.end.end(Ending::Complete);
    }

    fn waiting(&mut self, cx: &mut Context<'_>) -> Option<Result<Frame<Bytes>, BoxError>> {
        if self.timer.as_mut().poll(cx).is_pending() {
            return None;
        }
        self.end.end(Ending::IdleTimeout(self.idle));
        Some(Err(Box::new(IdleTimeout(self.idle))))
    }

    fn has_ended(&self) -> bool {
        self.end.has_ended()
    }

    fn dropped(&mut self, inner_ended: bool) {
        self.end.dropped(inner_ended);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::{Arc, Mutex};
    use xpart_bedrock::usage::Reading;
    use xpart_bedrock::Operation;

    #[derive(Debug, thiserror::Error)]
    #[error("connection reset")]
    struct Reset;

    fn event(kind: &str, payload: &str) -> Bytes {
        xpart_bedrock::event_stream_frame(
            &[(":message-type", "event"), (":event-type", kind)],
            payload.to_owned(),
        )
        .expect("encode")
        .into()
    }

    type Seen = Arc<Mutex<Option<(Ending, Option<Reading>)>>>;

    /// A ConverseStream body from `frames`, reading its usage, and what its hook saw.
    type Frames =
        StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Reset>>>>;

    fn relayed(frames: Vec<Result<Frame<Bytes>, Reset>>) -> (Relayed<Frames>, Seen) {
        let seen: Seen = Arc::new(Mutex::new(None));
        let slot = UsageSlot::default();
        let (hook_seen, hook_slot) = (seen.clone(), slot.clone());
        let on_end = OnEnd::new(move |ending, _| {
            *hook_seen.lock().expect("test lock") = Some((ending, hook_slot.take()));
        });
        let reader = UsageReader::for_answer(
            Operation::ConverseStream,
            http::StatusCode::OK,
            &http::HeaderMap::new(),
        )
        .expect("a reader");
        let watch = UpstreamWatch::new(Duration::from_secs(30), on_end).with_usage(reader, slot);
        let body = Relayed::new(StreamBody::new(futures_util::stream::iter(frames)), watch);
        (body, seen)
    }

    #[tokio::test]
    async fn the_usage_of_a_stream_is_read_as_it_passes_unchanged() {
        let start = event("messageStart", r#"{"role":"assistant"}"#);
        let metadata = event(
            "metadata",
            r#"{"usage":{"inputTokens":13,"outputTokens":14,"cacheReadInputTokens":15,"cacheWriteInputTokens":16}}"#,
        );
        let mut whole = start.to_vec();
        whole.extend_from_slice(&metadata);
        let (head, tail) = whole.split_at(20);
        let (body, seen) = relayed(vec![
            Ok(Frame::data(Bytes::copy_from_slice(head))),
            Ok(Frame::data(Bytes::copy_from_slice(tail))),
        ]);
        let passed = body.collect().await.expect("complete").to_bytes();
        assert_eq!(passed.as_ref(), whole.as_slice());
        let (ending, reading) = seen.lock().expect("test lock").take().expect("ended");
        assert_eq!(ending, Ending::Complete);
        let reading = reading.expect("a reading");
        assert!(reading.complete);
        assert_eq!(
            (
                reading.usage.input_tokens,
                reading.usage.output_tokens,
                reading.usage.cache_read_tokens,
                reading.usage.cache_write_tokens
            ),
            (Some(13), Some(14), Some(15), Some(16))
        );
    }

    #[tokio::test]
    async fn a_stream_that_breaks_before_its_metadata_reports_incomplete_usage() {
        let (body, seen) = relayed(vec![
            Ok(Frame::data(event(
                "messageStart",
                r#"{"role":"assistant"}"#,
            ))),
            Err(Reset),
        ]);
        let error = body.collect().await.expect_err("broken");
        assert!(error.to_string().contains("connection reset"), "{error}");
        let (ending, reading) = seen.lock().expect("test lock").take().expect("ended");
        assert!(matches!(ending, Ending::Failed(_)), "{ending:?}");
        let reading = reading.expect("a reading");
        assert!(!reading.complete);
        assert!(reading.usage.is_empty());
    }
}
