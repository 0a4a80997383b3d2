//! A ConverseStream answer body as a `text/event-stream` of chat completion chunks, translated
//! frame by frame as the relay's frames arrive: each event-stream message is handed to the
//! [`StreamTranslator`] as soon as its last byte is in, and its chunks go out at once.

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::Message;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody};

use super::stream::{Event, StreamTranslator};
use crate::streaming::BoxError;

/// The relay's event stream `inner` on the way in, server-sent events on the way out. The
/// body ends after the translator's last chunks, or with the first error.
pub fn sse_body<B>(
    inner: B,
    translator: StreamTranslator,
) -> impl Body<Data = Bytes, Error = BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let sse = Sse {
        inner,
        translator,
        decoder: MessageFrameDecoder::new(),
        pending: BytesMut::new(),
    };
    let chunks = futures_util::stream::unfold(Some(sse), |sse| async move {
        let mut sse = sse?;
        match sse.next_chunks().await {
            Ok(Some(chunks)) => Some((Ok(Frame::data(chunks)), Some(sse))),
            Ok(None) => {
                let last = sse.translator.end();
                (!last.is_empty()).then(|| (Ok(Frame::data(last.concat().into())), None))
            }
            Err(error) => Some((Err(error), None)),
        }
    });
    StreamBody::new(chunks)
}

struct Sse<B> {
    inner: B,
    translator: StreamTranslator,
    decoder: MessageFrameDecoder,
    pending: BytesMut,
}

impl<B> Sse<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// The chunks for the next complete messages the relay sends; `None` once it has ended.
    async fn next_chunks(&mut self) -> Result<Option<Bytes>, BoxError> {
        while let Some(frame) = self.inner.frame().await {
            let Ok(data) = frame.map_err(Into::into)?.into_data() else {
                continue;
            };
            self.pending.extend_from_slice(&data);
            let chunks = self.translate_buffered()?;
            if !chunks.is_empty() {
                return Ok(Some(chunks.concat().into()));
            }
        }
        Ok(None)
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut body = std::pin::pin!(sse_body(
            StreamBody::new(futures_util::stream::iter(pieces)),
            translator,
        ));
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
