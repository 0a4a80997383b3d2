//! Bodies that stream through a daemon frame by frame, never gathered whole: the agent's
//! request and response bodies and the relay's response body are each a [`Watched`] body, the
//! inner body's frames passed on one at a time while a [`Watch`] looks at each and decides how
//! the stream ends. The polling, the end-of-stream rules and the drop hook are written here
//! once; a watch is a plain struct that takes what the inner body yields and returns what to
//! pass on.
//!
//! A body is complete when its last frame has been handed to the server: hyper stops polling a
//! body once it has written `Content-Length` bytes or seen the end-of-stream flag, and drops it
//! without asking for the `None` that would otherwise mark the end. So a watch is told with
//! each frame whether the inner body has said it has ended, and on drop whether it had.
//!
//! [`StreamEnd`] is the bookkeeping both daemons' response watches share: the bytes that went
//! out, the usage read as they passed, and the [`OnEnd`] hook called once with the [`Ending`].

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use xpart_bedrock::usage::{UsageReader, UsageSlot};

use crate::record::{Ending, OnEnd};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a [`Watched`] body does with what its inner body yields. `E` is the inner body's error.
pub trait Watch<E> {
    /// A frame on its way out; `inner_ended` says whether it was the inner body's last. An
    /// error goes out in the frame's place.
    fn frame(&mut self, frame: &Frame<Bytes>, inner_ended: bool) -> Result<(), BoxError>;

    /// The inner body failed: what goes out in place of `error`.
    fn failed(&mut self, error: E, cx: &mut Context<'_>) -> Result<Frame<Bytes>, BoxError>;

    /// The inner body has ended.
    fn ended(&mut self) {}

    /// The inner body has nothing yet: `Some` ends the wait with that instead.
    fn waiting(&mut self, _cx: &mut Context<'_>) -> Option<Result<Frame<Bytes>, BoxError>> {
        None
    }

    /// The stream has ended on the watch's account: nothing more goes out.
    fn has_ended(&self) -> bool {
        false
    }

    /// The body is dropped; `inner_ended` says whether the inner body had said it ended.
    fn dropped(&mut self, _inner_ended: bool) {}
}

/// `inner`'s frames passed on one at a time under `watch`.
pub struct Watched<B: Body, W: Watch<B::Error>> {
    inner: B,
    watch: W,
}

impl<B: Body, W: Watch<B::Error>> Watched<B, W> {
    pub fn new(inner: B, watch: W) -> Watched<B, W> {
        Watched { inner, watch }
    }
}

impl<B, W> Body for Watched<B, W>
where
    B: Body<Data = Bytes> + Unpin,
    W: Watch<B::Error> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.watch.has_ended() {
            return Poll::Ready(None);
        }
        let out = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let inner_ended = this.inner.is_end_stream();
                this.watch.frame(&frame, inner_ended).map(|()| frame)
            }
            Poll::Ready(Some(Err(error))) => this.watch.failed(error, cx),
            Poll::Ready(None) => {
                this.watch.ended();
                return Poll::Ready(None);
            }
            Poll::Pending => match this.watch.waiting(cx) {
                Some(out) => out,
                None => return Poll::Pending,
            },
        };
        Poll::Ready(Some(out))
    }

    fn is_end_stream(&self) -> bool {
        self.watch.has_ended() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body, W: Watch<B::Error>> Drop for Watched<B, W> {
    fn drop(&mut self) {
        self.watch.dropped(self.inner.is_end_stream());
    }
}

/// A streamed response's bytes out, its usage as read in passing, and the hook that reports
/// how it ended.
pub struct StreamEnd {
    bytes: u64,
    on_end: OnEnd,
    usage: Option<(UsageReader, UsageSlot)>,
}

impl StreamEnd {
    pub fn new(on_end: OnEnd) -> StreamEnd {
        StreamEnd {
            bytes: 0,
            on_end,
            usage: None,
        }
    }

    /// Reads the answer's token usage as it passes, into `slot`: a copy of each frame is
    /// shown to `reader` (nothing is held back) and the reading is in `slot` just before the
    /// hook is called.
    pub fn with_usage(mut self, reader: UsageReader, slot: UsageSlot) -> StreamEnd {
        self.usage = Some((reader, slot));
        self
    }

    /// Counts `data` as gone out.
    pub fn pass(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        if let Some((reader, _)) = self.usage.as_mut() {
            reader.feed(data);
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reports `ending` (the first call only).
    pub fn end(&mut self, ending: Ending) {
        if let Some((reader, slot)) = self.usage.take() {
            slot.put(reader.finish());
        }
        self.on_end.end(ending, self.bytes);
    }

    /// How a body ends when it is dropped: complete if everything was sent, else abandoned
    /// (the reader went away).
    pub fn dropped(&mut self, all_sent: bool) {
        match all_sent {
            true => self.end(Ending::Complete),
            false => self.end(Ending::Abandoned),
        }
    }

    pub fn has_ended(&self) -> bool {
        self.on_end.has_ended()
    }
}
