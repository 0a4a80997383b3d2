//! The event-stream frame readers: the agent's `FrameBoundary` (which decides whether a relay
//! lost mid-stream can still be reported with a clean exception frame) and the
//! aws-smithy-eventstream decoder the SDKs and the tests use, fed the same bytes in
//! fuzzer-chosen chunks.
//!
//! Beyond "no panic": whenever the smithy decoder has consumed every byte as whole, valid
//! frames, `FrameBoundary` agrees that the stream sits on a frame boundary.
#![no_main]

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use bytes::{Buf, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use xpart_agent::FrameBoundary;

/// Input: the number of chunk lengths N, N chunk lengths (cycled; 0 is read as 1), then the
/// stream's bytes.
struct Input<'a> {
    cuts: &'a [u8],
    bytes: &'a [u8],
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let (cuts, bytes) = rest.split_at(usize::from(count).min(rest.len()));
    check(Input { cuts, bytes });
});

fn check(input: Input<'_>) {
    let mut boundary = FrameBoundary::default();
    let mut decoder = MessageFrameDecoder::new();
    let mut pending = BytesMut::new();
    let mut decoded = Decoded::default();
    let mut decoder_ok = true;
    let mut rest: &[u8] = input.bytes;
    let mut cut = input.cuts.iter().cycle();
    while !rest.is_empty() {
        let len = cut
            .next()
            .map_or(rest.len(), |&n| usize::from(n.max(1)))
            .min(rest.len());
        let (chunk, tail) = rest.split_at(len);
        rest = tail;
        boundary.feed(chunk);
        if decoder_ok {
            pending.extend_from_slice(chunk);
            decoder_ok = drain(&mut decoder, &mut pending, &mut decoded);
        }
    }
    if decoder_ok && decoded.frames > 0 && decoded.through_last_frame == input.bytes.len() {
        assert!(
            boundary.at_boundary(),
            "whole valid frames, yet FrameBoundary is mid-frame"
        );
    }
}

#[derive(Default)]
struct Decoded {
    frames: usize,
    /// Bytes the decoder has taken from the input (a prelude it holds included).
    consumed: usize,
    /// `consumed` when the last whole frame came out.
    through_last_frame: usize,
}

/// Decode every complete frame; false once the decoder reports corrupt input.
fn drain(decoder: &mut MessageFrameDecoder, pending: &mut BytesMut, decoded: &mut Decoded) -> bool {
    loop {
        let mut buf = Bytes::copy_from_slice(pending);
        let before = buf.remaining();
        let result = decoder.decode_frame(&mut buf);
        let used = before - buf.remaining();
        pending.advance(used);
        decoded.consumed += used;
        match result {
            Ok(DecodedFrame::Complete(message)) => {
                let _ = message.headers().len();
                decoded.frames += 1;
                decoded.through_last_frame = decoded.consumed;
            }
            Ok(DecodedFrame::Incomplete) => return true,
            Err(_) => return false,
        }
    }
}
