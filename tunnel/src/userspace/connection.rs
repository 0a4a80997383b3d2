//! One TCP connection on the embedded stack: tokio's `AsyncRead`/`AsyncWrite` over a smoltcp
//! socket, waking the driver whenever the socket has something new to send or announce.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::IpEndpoint;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::stack::{new_socket, Stack, State};

/// A connection attempt that gets no answer fails after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP connection on the embedded stack.
pub(crate) struct Conn {
    stack: Stack,
    handle: SocketHandle,
    local: SocketAddr,
    peer: SocketAddr,
}

impl Conn {
    /// Opens a connection from an ephemeral port of the stack's address and waits until it
    /// is established, refused, or [`CONNECT_TIMEOUT`] passed.
    pub(super) async fn connect(stack: Stack, remote: SocketAddr) -> io::Result<Conn> {
        let handle = {
            let mut state = stack.lock();
            let port = state.free_port()?;
            let local = SocketAddr::new(stack.address(), port);
            let mut socket = new_socket();
            let State { iface, sockets, .. } = &mut *state;
            socket
                .connect(
                    iface.context(),
                    IpEndpoint::from(remote),
                    IpEndpoint::from(local),
                )
                .map_err(|err| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("connect {remote}: {err}"),
                    )
                })?;
            sockets.add(socket)
        };
        stack.wake_driver();
        let local = SocketAddr::new(stack.address(), 0);
        let mut conn = Conn::new(stack, handle, local, remote);
        let established = tokio::time::timeout(
            CONNECT_TIMEOUT,
            std::future::poll_fn(|cx| conn.poll_established(cx)),
        );
        match established.await {
            Ok(Ok(local)) => {
                conn.local = local;
                Ok(conn)
            }
            Ok(Err(err)) => Err(err),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect {remote} through the tunnel: no answer in {CONNECT_TIMEOUT:?}"),
            )),
        }
    }

    /// Wraps a socket the stack already holds (an accepted connection).
    pub(super) fn new(
        stack: Stack,
        handle: SocketHandle,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Conn {
        Conn {
            stack,
            handle,
            local,
            peer,
        }
    }

    pub(crate) fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn poll_established(&self, cx: &mut Context<'_>) -> Poll<io::Result<SocketAddr>> {
        let mut state = self.stack.lock();
        let socket = state.sockets.get_mut::<tcp::Socket>(self.handle);
        match socket.state() {
            tcp::State::SynSent | tcp::State::SynReceived => {
                socket.register_send_waker(cx.waker());
                Poll::Pending
            }
            tcp::State::Closed | tcp::State::TimeWait | tcp::State::Listen => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("connect {} through the tunnel: refused", self.peer),
                )))
            }
            _ => Poll::Ready(Ok(socket
                .local_endpoint()
                .map_or(self.local, to_socket_addr))),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut state = this.stack.lock();
        let socket = state.sockets.get_mut::<tcp::Socket>(this.handle);
        match socket.recv_slice(buf.initialize_unfilled()) {
            Ok(0) => {
                if !socket.may_recv()
                    && !matches!(
                        socket.state(),
                        tcp::State::SynSent | tcp::State::SynReceived
                    )
                {
                    return Poll::Ready(Ok(()));
                }
                socket.register_recv_waker(cx.waker());
                Poll::Pending
            }
            Ok(n) => {
                buf.advance(n);
                drop(state);
                // Reading frees window. smoltcp announces it only when polled, and a sender
                // that sees a closed window has no probe timer, so always let the stack look.
                this.stack.wake_driver();
                Poll::Ready(Ok(()))
            }
            Err(tcp::RecvError::Finished) => Poll::Ready(Ok(())),
            Err(tcp::RecvError::InvalidState) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("tunnel connection to {} reset", this.peer),
            ))),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut state = this.stack.lock();
        let socket = state.sockets.get_mut::<tcp::Socket>(this.handle);
        if !socket.may_send() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("tunnel connection to {} is closed for sending", this.peer),
            )));
        }
        match socket.send_slice(buf) {
            Ok(0) => {
                socket.register_send_waker(cx.waker());
                Poll::Pending
            }
            Ok(n) => {
                drop(state);
                this.stack.wake_driver();
                Poll::Ready(Ok(n))
            }
            Err(tcp::SendError::InvalidState) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("tunnel connection to {} is closed for sending", this.peer),
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already in the socket's send buffer and the stack loop is awake.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.stack
            .lock()
            .sockets
            .get_mut::<tcp::Socket>(this.handle)
            .close();
        this.stack.wake_driver();
        Poll::Ready(Ok(()))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut state = self.stack.lock();
        let socket = state.sockets.get_mut::<tcp::Socket>(self.handle);
        // Unread data means the application gave up on the exchange: reset, as a kernel does.
        if socket.recv_queue() > 0 {
            socket.abort();
        } else {
            socket.close();
        }
        state.close_later(self.handle);
        drop(state);
        self.stack.wake_driver();
    }
}

pub(super) fn to_socket_addr(endpoint: IpEndpoint) -> SocketAddr {
    SocketAddr::new(IpAddr::from(endpoint.addr), endpoint.port)
}
