//! A ConverseStream answer body as a `text/event-stream` of chat completion chunks, translated
//! frame by frame as the relay's frames arrive: each event-stream message is handed to the
//! [`StreamTranslator`] as soon as its last byte is in, and its chunks go out at once.

use std::pin::Pin;
use std::task::{Context, Poll};

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::Message;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use super::stream::{Event, StreamTranslator};
use crate::streaming::BoxError;

/// The relay's event stream on the way in, server-sent events on the way out.
pub struct SseBody<B> {
    inner: B,
    translator: StreamTranslator,
    decoder: MessageFrameDecoder,
    pending: BytesMut,
    done: bool,
}

impl<B> SseBody<B> {
    pub fn new(inner: B, translator: StreamTranslator) -> SseBody<B> {
        SseBody {
            inner,
            translator,
            decoder: MessageFrameDecoder::new(),
            pending: BytesMut::new(),
            done: false,
        }
    }

    /// Chunks for every complete message now buffered.
    fn translate_buffered(&mut self) -> Result<Vec<Bytes>, BoxError> {
        let mut out = Vec::new();
        loop {
            match self.decoder.decode_frame(&mut self.pending)? {
                DecodedFrame::Incomplete => return Ok(out),
                DecodedFrame::Complete(message) => {
                    out.extend(translate(&mut self.translator, &message))
                }
            }
        }
    }
}

fn translate(translator: &mut StreamTranslator, message: &Message) -> Vec<Bytes> {
    let header = |name: &str| {
        xpart_bedrock::event_stream_header(message, name)
            .unwrap_or_default()
            .to_owned()
    };
    let message_type = header(":message-type");
    let kind = match message_type.as_str() {
        "event" => header(":event-type"),
        _ => header(":exception-type"),
    };
    translator.event(Event {
        message_type: &message_type,
        kind: &kind,
        payload: message.payload(),
    })
}

impl<B> Body for SseBody<B>
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
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let chunks = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(error))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(error.into())));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    self.pending.extend_from_slice(&data);
                    match self.translate_buffered() {
                        Ok(chunks) => chunks,
                        Err(error) => {
                            self.done = true;
                            return Poll::Ready(Some(Err(error)));
                        }
                    }
                }
                Poll::Ready(None) => {
                    self.done = true;
                    self.translator.end()
                }
            };
            if chunks.is_empty() {
                continue;
            }
            return Poll::Ready(Some(Ok(Frame::data(chunks.concat().into()))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn frame(event_type: &str, payload: &str) -> Vec<u8> {
        xpart_bedrock::event_stream_frame(
            &[(":event-type", event_type), (":message-type", "event")],
            payload.to_owned(),
        )
        .expect("encodes")
    }

    #[tokio::test]
    async fn frames_split_anywhere_become_one_sse_frame_per_complete_event() {
        let mut wire = frame("messageStart", r#"{"role":"assistant"}"#);
        wire.extend(frame(
            "contentBlockDelta",
            r#"{"contentBlockIndex":0,"delta":{"text":"hi"}}"#,
        ));
        wire.extend(frame("messageStop", r#"{"stopReason":"end_turn"}"#));
        // Split mid-frame: the first piece ends inside the second event.
        let cut = wire.len() / 2;
        let pieces = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::copy_from_slice(&wire[..cut]))),
            Ok(Frame::data(Bytes::copy_from_slice(&wire[cut..]))),
        ];
        let translator = StreamTranslator::new("c", 1, "m", false, false);
        let mut body = SseBody::new(
            StreamBody::new(futures_util::stream::iter(pieces)),
            translator,
        );
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(
                String::from_utf8(frame.expect("ok").into_data().expect("data").to_vec())
                    .expect("utf-8"),
            );
        }
        let all = frames.concat();
        assert_eq!(all.matches("data: ").count(), 4, "{all}");
        assert!(all.contains(r#""delta":{"content":"hi"}"#), "{all}");
        assert!(all.ends_with("data: [DONE]\n\n"));
        assert_eq!(frames.len(), 3, "role | delta+stop | done: {frames:?}");
    }
}
