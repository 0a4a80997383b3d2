//! One listening port on the embedded stack. smoltcp has no listen backlog: a socket in
//! Listen state takes one SYN and becomes that connection. A listener therefore keeps a few
//! listening sockets, moves each that got a SYN aside until its handshake completes, and
//! replaces it at once, so a burst of connection attempts does not meet an empty backlog.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll, Waker};

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::IpListenEndpoint;

use super::connection::{to_socket_addr, Conn};
use super::stack::{new_socket, Stack};

/// Sockets in Listen state per listener, replenished after every SYN.
const BACKLOG: usize = 4;
/// Connections not accepted yet, per listener; beyond this new ones are refused (RST).
const ACCEPT_QUEUE: usize = 128;

/// Accepts connections on one tunnel port of the embedded stack.
pub(crate) struct Listener {
    stack: Stack,
    port: u16,
    endpoint: SocketAddr,
}

/// A listener's sockets, kept in the stack's state by port.
pub(super) struct ListenerState {
    endpoint: SocketAddr,
    /// Sockets in Listen state, waiting for a SYN.
    listening: Vec<SocketHandle>,
    /// Sockets that got a SYN and have not completed the handshake.
    handshaking: Vec<SocketHandle>,
    accepted: VecDeque<SocketHandle>,
    waker: Option<Waker>,
}

impl Listener {
    /// Listens on `addr`: the stack's address or the unspecified one, port 0 for an
    /// ephemeral port.
    pub(super) fn bind(stack: Stack, addr: SocketAddr) -> io::Result<Listener> {
        let address = stack.address();
        if !addr.ip().is_unspecified() && addr.ip() != address {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("{} is not this tunnel's address ({address})", addr.ip()),
            ));
        }
        let mut state = stack.lock();
        let port = match addr.port() {
            0 => state.free_port()?,
            port => port,
        };
        if state.listeners.contains_key(&port) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("tunnel port {port} already has a listener"),
            ));
        }
        let endpoint = SocketAddr::new(address, port);
        let mut listener = ListenerState {
            endpoint,
            listening: Vec::new(),
            handshaking: Vec::new(),
            accepted: VecDeque::new(),
            waker: None,
        };
        for _ in 0..BACKLOG {
            listener
                .listening
                .push(add_listening(&mut state.sockets, endpoint)?);
        }
        state.listeners.insert(port, listener);
        drop(state);
        Ok(Listener {
            stack,
            port,
            endpoint,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.endpoint
    }

    pub(crate) async fn accept(&self) -> io::Result<Conn> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Conn>> {
        let mut state = self.stack.lock();
        let Some(listener) = state.listeners.get_mut(&self.port) else {
            return Poll::Ready(Err(io::Error::other("listener closed")));
        };
        let Some(handle) = listener.accepted.pop_front() else {
            listener.waker = Some(cx.waker().clone());
            return Poll::Pending;
        };
        let socket = state.sockets.get::<tcp::Socket>(handle);
        let peer = socket
            .remote_endpoint()
            .map_or(SocketAddr::new(self.endpoint.ip(), 0), to_socket_addr);
        Poll::Ready(Ok(Conn::new(
            self.stack.clone(),
            handle,
            self.endpoint,
            peer,
        )))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut state = self.stack.lock();
        let Some(listener) = state.listeners.remove(&self.port) else {
            return;
        };
        for handle in listener.listening.into_iter().chain(listener.handshaking) {
            state.sockets.remove(handle);
        }
        for handle in listener.accepted {
            state.sockets.get_mut::<tcp::Socket>(handle).abort();
            state.close_later(handle);
        }
        drop(state);
        self.stack.wake_driver();
    }
}

impl ListenerState {
    /// Moves listening sockets that got a connection into the accept queue and replaces them.
    pub(super) fn settle(&mut self, sockets: &mut SocketSet<'static>) {
        let mut changed = false;
        for index in (0..self.listening.len()).rev() {
            let handle = self.listening[index];
            if sockets.get::<tcp::Socket>(handle).state() != tcp::State::Listen {
                self.listening.swap_remove(index);
                self.handshaking.push(handle);
                changed = true;
            }
        }
        for index in (0..self.handshaking.len()).rev() {
            let handle = self.handshaking[index];
            match sockets.get::<tcp::Socket>(handle).state() {
                tcp::State::SynReceived => {}
                tcp::State::Established | tcp::State::CloseWait => {
                    self.handshaking.swap_remove(index);
                    self.accepted.push_back(handle);
                    changed = true;
                }
                // Reset or timed out during the handshake.
                _ => {
                    self.handshaking.swap_remove(index);
                    sockets.remove(handle);
                }
            }
        }
        let pending = self.handshaking.len() + self.accepted.len();
        if self.listening.len() < BACKLOG && pending < ACCEPT_QUEUE {
            if let Ok(handle) = add_listening(sockets, self.endpoint) {
                self.listening.push(handle);
            }
        }
        if changed {
            if let Some(waker) = self.waker.take() {
                waker.wake();
            }
        }
    }
}

fn add_listening(
    sockets: &mut SocketSet<'static>,
    endpoint: SocketAddr,
) -> io::Result<SocketHandle> {
    let mut socket = new_socket();
    socket
        .listen(IpListenEndpoint::from(endpoint))
        .map_err(|err| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("listen {endpoint}: {err}"),
            )
        })?;
    Ok(sockets.add(socket))
}
