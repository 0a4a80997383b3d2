//! Pass an upstream response body to the agent frame by frame as it arrives (event-stream
//! responses included: nothing is gathered first), count its bytes, stop it when upstream goes
//! quiet for longer than the idle timeout, and report how it ended exactly once.
//!
//! The body is complete once its last frame is handed to the server. hyper does not poll a
//! body again after its frame that ends the stream (or fills the `Content-Length`): it drops
//! it. So the end is recorded as soon as the upstream stream says it has ended, after a frame
//! or on drop; a drop before that is an abandoned body.
//!
//! A body given a [`UsageReader`] shows it a copy of each frame as it passes (nothing is held
//! back) and leaves the reading in its [`UsageSlot`] just before reporting how it ended.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};
use xpart_bedrock::usage::{UsageReader, UsageSlot};
use xpart_daemon::error_chain;
use xpart_daemon::record::{Ending, OnEnd};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct Relayed {
    inner: Incoming,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    bytes: u64,
    on_end: OnEnd,
    usage: Option<(UsageReader, UsageSlot)>,
}

impl Relayed {
    pub fn new(inner: Incoming, idle: Duration, on_end: OnEnd) -> Relayed {
        Relayed {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            bytes: 0,
            on_end,
            usage: None,
        }
    }

    /// Reads the answer's token usage as it passes, into `slot`.
    pub fn with_usage(mut self, reader: UsageReader, slot: UsageSlot) -> Relayed {
        self.usage = Some((reader, slot));
        self
    }

    fn end(&mut self, ending: Ending) {
        if let Some((reader, slot)) = self.usage.take() {
            slot.put(reader.finish());
        }
        self.on_end.end(ending, self.bytes);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("upstream sent nothing for {0:?}; stream stopped")]
struct IdleTimeout(Duration);

impl Body for Relayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                    if let Some((reader, _)) = this.usage.as_mut() {
                        reader.feed(data);
                    }
                }
                // An idle limit past the clock's range never fires.
                let now = Instant::now();
                let deadline = now
                    .checked_add(this.idle)
                    .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
                this.timer.as_mut().reset(deadline);
                if this.inner.is_end_stream() {
                    this.end(Ending::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                this.end(Ending::Failed(error_chain::one_line(&err)));
                Poll::Ready(Some(Err(Box::new(err))))
            }
            Poll::Ready(None) => {
                this.end(Ending::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.timer.as_mut().poll(cx).is_ready() {
                    let idle = this.idle;
                    this.end(Ending::IdleTimeout(idle));
                    return Poll::Ready(Some(Err(Box::new(IdleTimeout(idle)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.on_end.has_ended() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.end(Ending::Complete);
        } else {
            self.end(Ending::Abandoned);
        }
    }
}
