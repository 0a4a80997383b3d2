//! The caller's request body as the pipeline holds it: on HTTP/1.1, a body dropped before its
//! end (the request refused at the door, cut off over its limit, or failed on the way to a
//! relay) is read on and thrown away by a task of its own, within [`DRAIN_BYTES`] and
//! [`DRAIN_TIME`].
//!
//! Why: an SDK (boto3/urllib3, http.client) writes the whole body before it reads the answer.
//! If the agent answers a refusal and closes the connection with megabytes still unread, the
//! kernel resets the connection and the caller sees a connection error (and boto3 uploads the
//! whole body again) instead of the error it was sent. hyper's HTTP/1 dispatcher keeps
//! reading a request body for as long as its [`Incoming`] is alive, after the answer has
//! been written too; so keeping it alive, and reading it to its end, lets the caller finish
//! sending and then read the answer. HTTP/2 needs none of this: a stream left unread is reset
//! on its own, and the connection carries on.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// How much of a left-over body is read and thrown away: the largest request Bedrock accepts,
/// so any caller that could have been answered by Bedrock is answered here too; a caller
/// sending more than that is not a Bedrock client, and its connection is closed.
pub const DRAIN_BYTES: u64 = xpart_bedrock::MAX_BODY_BYTES as u64;

/// How long a left-over body is read for: enough for [`DRAIN_BYTES`] at 20 Mbit/s, and a
/// bound on how long a caller trickling its upload can hold the task.
pub const DRAIN_TIME: Duration = Duration::from_secs(10);

/// A caller's request body: hyper's [`Incoming`], drained when dropped before its end if the
/// request came over HTTP/1.1.
pub struct Upload {
    /// Taken only in [`Drop`].
    body: Option<Incoming>,
    drain: bool,
}

impl Upload {
    /// `http1`: whether the request came over HTTP/1.x, where a body left unread costs the
    /// caller its connection.
    pub fn new(body: Incoming, http1: bool) -> Self {
        Upload {
            body: Some(body),
            drain: http1,
        }
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        if !self.drain || body.is_end_stream() {
            return;
        }
        // Outside a runtime (nothing in the agent drops one there) hyper sees the body
        // dropped and closes the connection, as it would without this.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body));
        }
    }
}

/// Reads `body` to its end and throws it away, within the bounds; dropping it early tells
/// hyper to close the connection.
async fn drain(mut body: Incoming) {
    let read = async {
        let mut left = DRAIN_BYTES;
        while let Some(Ok(frame)) = body.frame().await {
            let length = frame.data_ref().map_or(0, |data| data.len() as u64);
            let Some(rest) = left.checked_sub(length) else {
                return;
            };
            left = rest;
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    use http_body_util::Empty;
    use hyper::service::service_fn;
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn a_body_refused_unread_is_drained_so_the_caller_reads_the_answer() {
        let address = refusing_server().await;
        let (sent, answer) = upload(address, 8 << 20).await;
        assert!(sent.is_ok(), "upload cut off: {sent:?}");
        assert!(answer.starts_with("HTTP/1.1 403"), "answer: {answer:?}");
    }

    #[tokio::test]
    async fn a_body_over_the_drain_bound_loses_its_connection() {
        let address = refusing_server().await;
        let (sent, _) = upload(address, DRAIN_BYTES + (16 << 20)).await;
        assert!(sent.is_err(), "{} bytes drained", DRAIN_BYTES + (16 << 20));
    }

    /// An HTTP/1.1 server that refuses every request without reading its body, as the
    /// pipeline's door checks do.
    async fn refusing_server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let address = listener.local_addr().expect("bound address");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let service = service_fn(|request: Request<Incoming>| async move {
                let _upload = Upload::new(request.into_body(), true);
                let mut response = Response::new(Empty::<Bytes>::new());
                *response.status_mut() = StatusCode::FORBIDDEN;
                let close = http::HeaderValue::from_static("close");
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, close);
                Ok::<_, hyper::Error>(response)
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            let _ = connection.await;
        });
        address
    }

    /// Sends `length` bytes of body whole, as an SDK does, then reads the answer.
    async fn upload(address: std::net::SocketAddr, length: u64) -> (std::io::Result<()>, String) {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let head = format!(
            "POST /model/m/converse HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\n\r\n"
        );
        let chunk = vec![b'x'; 1 << 20];
        let sent = async {
            stream.write_all(head.as_bytes()).await?;
            let mut left = length;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                stream.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
            Ok(())
        }
        .await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        (sent, String::from_utf8_lossy(&answer).into_owned())
    }
}
