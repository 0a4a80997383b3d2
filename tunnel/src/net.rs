//! The small interface the agent and the relay use to open and accept TCP connections on
//! tunnel addresses, whichever backend carries them.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::userspace;

/// Open/accept TCP connections on tunnel addresses. `Network::host()` uses the host's own
/// TCP stack: that is what kernel mode uses (the TUN routes it) and what loopback
/// development uses; userspace mode uses the embedded stack.
#[derive(Clone)]
pub struct Network {
    inner: NetworkInner,
}

#[derive(Clone)]
enum NetworkInner {
    Host,
    Userspace(userspace::Stack),
}

impl Network {
    pub fn host() -> Network {
        Network {
            inner: NetworkInner::Host,
        }
    }

    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpConn> {
        let conn = match &self.inner {
            NetworkInner::Host => {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                ConnInner::Host(stream)
            }
            NetworkInner::Userspace(stack) => ConnInner::Userspace(stack.connect(addr).await?),
        };
        Ok(TcpConn { inner: conn })
    }

    pub async fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let listener = match &self.inner {
            NetworkInner::Host => ListenerInner::Host(tokio::net::TcpListener::bind(addr).await?),
            NetworkInner::Userspace(stack) => ListenerInner::Userspace(stack.listen(addr)?),
        };
        Ok(TcpListener { inner: listener })
    }

    pub(crate) fn userspace(stack: userspace::Stack) -> Network {
        Network {
            inner: NetworkInner::Userspace(stack),
        }
    }
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            NetworkInner::Host => f.write_str("Network::Host"),
            NetworkInner::Userspace(_) => f.write_str("Network::Userspace"),
        }
    }
}

/// A TCP connection on a tunnel address (or on the host, for [`Network::host`]).
pub struct TcpConn {
    inner: ConnInner,
}

enum ConnInner {
    Host(tokio::net::TcpStream),
    Userspace(userspace::Conn),
}

/// Both kinds of connection, for the read and write calls that do not care which it is.
trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}

impl TcpConn {
    pub fn peer_addr(&self) -> SocketAddr {
        match &self.inner {
            ConnInner::Host(stream) => or_unspecified(stream.peer_addr()),
            ConnInner::Userspace(conn) => conn.peer_addr(),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        match &self.inner {
            ConnInner::Host(stream) => or_unspecified(stream.local_addr()),
            ConnInner::Userspace(conn) => conn.local_addr(),
        }
    }

    fn io(self: Pin<&mut Self>) -> Pin<&mut dyn Io> {
        match &mut self.get_mut().inner {
            ConnInner::Host(stream) => Pin::new(stream),
            ConnInner::Userspace(conn) => Pin::new(conn),
        }
    }
}

/// A host socket that lost its address (closed under us) reports 0.0.0.0:0.
fn or_unspecified(addr: io::Result<SocketAddr>) -> SocketAddr {
    addr.unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

impl std::fmt::Debug for TcpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConn")
            .field("local", &self.local_addr())
            .field("peer", &self.peer_addr())
            .finish()
    }
}

impl AsyncRead for TcpConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for TcpConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

/// Accepts TCP connections on a tunnel address.
pub struct TcpListener {
    inner: ListenerInner,
}

enum ListenerInner {
    Host(tokio::net::TcpListener),
    Userspace(userspace::Listener),
}

impl TcpListener {
    pub async fn accept(&self) -> io::Result<(TcpConn, SocketAddr)> {
        match &self.inner {
            ListenerInner::Host(listener) => {
                let (stream, peer) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let conn = TcpConn {
                    inner: ConnInner::Host(stream),
                };
                Ok((conn, peer))
            }
            ListenerInner::Userspace(listener) => {
                let conn = listener.accept().await?;
                let peer = conn.peer_addr();
                let conn = TcpConn {
                    inner: ConnInner::Userspace(conn),
                };
                Ok((conn, peer))
            }
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        match &self.inner {
            ListenerInner::Host(listener) => or_unspecified(listener.local_addr()),
            ListenerInner::Userspace(listener) => listener.local_addr(),
        }
    }
}

impl std::fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListener")
            .field("local", &self.local_addr())
            .finish()
    }
}
