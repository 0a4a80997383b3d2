//! Userspace backend: a smoltcp TCP/IP stack inside the process, fed with the IP packets the
//! engine decrypts and producing the IP packets the engine encrypts. No privileges needed.
//!
//! The stack is shared (`Arc<Mutex<..>>`) between three kinds of callers, none of which
//! holds the lock across an await: the driver's receive loop ([`Stack::receive`]: packets
//! in, replies such as ACKs out, in one pass), the driver's stack loop ([`Stack::poll`]:
//! whatever sockets have to send, woken by applications and at smoltcp's own deadline), and
//! the applications' [`Conn`]/[`Listener`] futures, which move bytes in and out of socket
//! buffers and register wakers. There is no fixed-interval polling.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Receive buffer per connection. It sets the advertised window (smoltcp picks the window
/// scale from it); 1 MiB keeps a gigabit path full at several ms RTT.
const RX_BUFFER_BYTES: usize = 1024 * 1024;
/// Send buffer per connection, which bounds the bytes in flight. smoltcp has neither pacing
/// nor SACK, and its congestion controllers (0.12) react late or stall on small windows, so
/// none is enabled: the buffer is the limit. With a large send buffer it fires bursts
/// that overflow a peer's default-sized UDP receive buffer (wireguard-go's, ~200 KiB), then
/// recovers go-back-N under exponential backoff and stalls for seconds. 64 KiB in flight stays
/// below that buffer and still fills a gigabit at sub-millisecond RTT, at the price of about
/// 64 KiB per RTT on long paths (kernel mode has no such limit).
const TX_BUFFER_BYTES: usize = 64 * 1024;
/// Sockets in Listen state per listener, replenished after every SYN.
const BACKLOG: usize = 4;
/// Connections not accepted yet, per listener; beyond this new ones are refused (RST).
const ACCEPT_QUEUE: usize = 128;
/// A closed connection whose peer never finishes the close handshake is aborted after this
/// long (Linux's default `tcp_fin_timeout`).
const CLOSE_LINGER: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(60);
/// Data or keepalives unacknowledged this long abort the connection: the peer is gone.
const ACK_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(120);
/// A connection attempt that gets no answer fails after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound of packets taken out of smoltcp per pass, so encryption starts early.
const MAX_PACKETS_PER_PASS: usize = 256;
const EPHEMERAL_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

/// Handle to the embedded stack; cheap to clone.
#[derive(Clone)]
pub(crate) struct Stack {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the driver's stack loop: a socket has something to send.
    wake: Notify,
    address: IpAddr,
}

struct State {
    iface: Interface,
    sockets: SocketSet<'static>,
    device: PacketQueues,
    listeners: HashMap<u16, ListenerState>,
    /// Sockets whose owner is gone, and since when; removed once their close handshake
    /// ends, or aborted after [`CLOSE_LINGER`].
    closing: Vec<(SocketHandle, SmolInstant)>,
    next_port: u16,
    started: std::time::Instant,
}

struct ListenerState {
    endpoint: SocketAddr,
    /// Sockets in Listen state, waiting for a SYN.
    listening: Vec<SocketHandle>,
    /// Sockets that got a SYN and have not completed the handshake.
    handshaking: Vec<SocketHandle>,
    accepted: VecDeque<SocketHandle>,
    waker: Option<Waker>,
}

impl Stack {
    pub(crate) fn new(address: ipnet::IpNet, mtu: u16) -> Stack {
        let mut device = PacketQueues {
            rx: VecDeque::new(),
            tx: Vec::new(),
            mtu: usize::from(mtu),
        };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let started = std::time::Instant::now();
        let mut iface = Interface::new(config, &mut device, SmolInstant::from_micros(0));
        iface.update_ip_addrs(|addrs| {
            // The address list holds a handful of entries; one never overflows it.
            let _ = addrs.push(IpCidr::new(
                IpAddress::from(address.addr()),
                address.prefix_len(),
            ));
        });
        // Everything off the tunnel subnet goes to the peers too (allowed IPs decide which);
        // with an IP-medium device the gateway is only a label, so the own address serves.
        let _ = match address.addr() {
            IpAddr::V4(own) => iface.routes_mut().add_default_ipv4_route(own).map(|_| ()),
            IpAddr::V6(own) => iface.routes_mut().add_default_ipv6_route(own).map(|_| ()),
        };
        let state = State {
            iface,
            sockets: SocketSet::new(Vec::new()),
            device,
            listeners: HashMap::new(),
            closing: Vec::new(),
            next_port: *EPHEMERAL_PORTS.start() + rand::random::<u16>() % 8192,
            started,
        };
        Stack {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                wake: Notify::new(),
                address: address.addr(),
            }),
        }
    }

    /// Feeds decrypted packets to the stack. What it answers with (ACKs, data the ACKs let
    /// go) stays queued for [`Stack::poll`]: one task takes every outgoing packet, so they
    /// reach the wire in the order smoltcp produced them. smoltcp takes the window of every
    /// segment it receives as current, so a reordered stale ACK could close the window for good.
    pub(crate) fn receive<'p>(&self, packets: impl Iterator<Item = &'p [u8]>) {
        let mut state = self.lock();
        state.device.rx.extend(packets.map(<[u8]>::to_vec));
        state.run();
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Takes what the sockets have to send and says when to call again at the latest.
    pub(crate) fn poll(&self, out: &mut Vec<Vec<u8>>) -> Option<Duration> {
        let mut state = self.lock();
        state.run();
        out.append(&mut state.device.tx);
        let now = state.now();
        let State { iface, sockets, .. } = &mut *state;
        iface.poll_delay(now, sockets).map(Duration::from)
    }

    /// Resolves when an application queued data, read data (opening the window) or closed.
    pub(crate) async fn wait(&self) {
        self.shared.wake.notified().await
    }

    pub(crate) async fn connect(&self, remote: SocketAddr) -> io::Result<Conn> {
        let handle = {
            let mut state = self.lock();
            let port = state.free_port()?;
            let local = SocketAddr::new(self.shared.address, port);
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
        self.shared.wake.notify_one();
        let mut conn = Conn {
            stack: self.clone(),
            handle,
            local: SocketAddr::new(self.shared.address, 0),
            peer: remote,
        };
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

    pub(crate) fn listen(&self, addr: SocketAddr) -> io::Result<Listener> {
        if !addr.ip().is_unspecified() && addr.ip() != self.shared.address {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!(
                    "{} is not this tunnel's address ({})",
                    addr.ip(),
                    self.shared.address
                ),
            ));
        }
        let mut state = self.lock();
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
        let endpoint = SocketAddr::new(self.shared.address, port);
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
        Ok(Listener {
            stack: self.clone(),
            port,
            endpoint,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves smoltcp's state as consistent as smoltcp
        // leaves it between calls; keep serving rather than poisoning every connection.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.started.elapsed().as_micros() as i64)
    }

    /// Runs smoltcp until it has nothing more to send (or a pass is full), leaving the
    /// packets in the device queue, then settles listeners and closed sockets.
    fn run(&mut self) {
        let now = self.now();
        // One packet at a time, so a listener gets a fresh listening socket after each SYN:
        // a burst of connection attempts must not find the backlog used up and get RSTs.
        loop {
            let State {
                iface,
                sockets,
                device,
                ..
            } = &mut *self;
            match iface.poll_ingress_single(now, device, sockets) {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                PollIngressSingleResult::SocketStateChanged => self.settle_listeners(),
            }
        }
        let State {
            iface,
            sockets,
            device,
            ..
        } = self;
        // smoltcp emits at most one segment per socket per egress pass.
        while device.tx.len() < MAX_PACKETS_PER_PASS {
            if iface.poll_egress(now, device, sockets) == PollResult::None {
                break;
            }
        }
        self.settle_listeners();
        self.reap_closed();
    }

    /// Moves listening sockets that got a connection into the accept queue and replaces them.
    fn settle_listeners(&mut self) {
        let State {
            listeners, sockets, ..
        } = self;
        for listener in listeners.values_mut() {
            let mut changed = false;
            for index in (0..listener.listening.len()).rev() {
                let handle = listener.listening[index];
                if sockets.get::<tcp::Socket>(handle).state() != tcp::State::Listen {
                    listener.listening.swap_remove(index);
                    listener.handshaking.push(handle);
                    changed = true;
                }
            }
            for index in (0..listener.handshaking.len()).rev() {
                let handle = listener.handshaking[index];
                match sockets.get::<tcp::Socket>(handle).state() {
                    tcp::State::SynReceived => {}
                    tcp::State::Established | tcp::State::CloseWait => {
                        listener.handshaking.swap_remove(index);
                        listener.accepted.push_back(handle);
                        changed = true;
                    }
                    // Reset or timed out during the handshake.
                    _ => {
                        listener.handshaking.swap_remove(index);
                        sockets.remove(handle);
                    }
                }
            }
            let pending = listener.handshaking.len() + listener.accepted.len();
            if listener.listening.len() < BACKLOG && pending < ACCEPT_QUEUE {
                if let Ok(handle) = add_listening(sockets, listener.endpoint) {
                    listener.listening.push(handle);
                }
            }
            if changed {
                if let Some(waker) = listener.waker.take() {
                    waker.wake();
                }
            }
        }
    }

    fn reap_closed(&mut self) {
        let sockets = &mut self.sockets;
        let now = self.started.elapsed();
        let now = SmolInstant::from_micros(now.as_micros() as i64);
        self.closing.retain(|(handle, since)| {
            let socket = sockets.get_mut::<tcp::Socket>(*handle);
            let lingered = now - *since > CLOSE_LINGER;
            if lingered {
                socket.abort();
            }
            if lingered || matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                sockets.remove(*handle);
                false
            } else {
                true
            }
        });
    }

    fn free_port(&mut self) -> io::Result<u16> {
        let span = EPHEMERAL_PORTS.end() - EPHEMERAL_PORTS.start() + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port == *EPHEMERAL_PORTS.end() {
                *EPHEMERAL_PORTS.start()
            } else {
                port + 1
            };
            let in_use = self.listeners.contains_key(&port)
                || self.sockets.iter().any(|(_, socket)| match socket {
                    smoltcp::socket::Socket::Tcp(tcp) => {
                        tcp.local_endpoint().is_some_and(|e| e.port == port)
                    }
                    #[allow(unreachable_patterns)]
                    _ => false,
                });
            if !in_use {
                return Ok(port);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free tunnel port",
        ))
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

fn new_socket() -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; RX_BUFFER_BYTES]),
        tcp::SocketBuffer::new(vec![0u8; TX_BUFFER_BYTES]),
    );
    // Request/response traffic (HTTP/2 frames) must not wait for a full segment.
    socket.set_nagle_enabled(false);
    socket.set_keep_alive(Some(smoltcp::time::Duration::from_secs(25)));
    socket.set_timeout(Some(ACK_TIMEOUT));
    socket
}

fn to_socket_addr(endpoint: IpEndpoint) -> SocketAddr {
    SocketAddr::new(IpAddr::from(endpoint.addr), endpoint.port)
}

/// A TCP connection on the embedded stack.
pub(crate) struct Conn {
    stack: Stack,
    handle: SocketHandle,
    local: SocketAddr,
    peer: SocketAddr,
}

impl Conn {
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
                this.stack.shared.wake.notify_one();
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
                this.stack.shared.wake.notify_one();
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
        this.stack.shared.wake.notify_one();
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
        let since = state.now();
        state.closing.push((self.handle, since));
        drop(state);
        self.stack.shared.wake.notify_one();
    }
}

/// Accepts connections on one tunnel port of the embedded stack.
pub(crate) struct Listener {
    stack: Stack,
    port: u16,
    endpoint: SocketAddr,
}

impl Listener {
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
        Poll::Ready(Ok(Conn {
            stack: self.stack.clone(),
            handle,
            local: self.endpoint,
            peer,
        }))
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
            let since = state.now();
            state.closing.push((handle, since));
        }
        drop(state);
        self.stack.shared.wake.notify_one();
    }
}

/// The smoltcp device: queues of whole IP packets between the stack and the engine.
struct PacketQueues {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
    mtu: usize,
}

struct RxToken(Vec<u8>);

struct TxToken<'a>(&'a mut Vec<Vec<u8>>);

impl Device for PacketQueues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: SmolInstant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _timestamp: SmolInstant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Packets arrive through WireGuard, whose AEAD already rejected any corruption;
        // verifying checksums again only costs time. Outgoing checksums are still computed.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        checksum.icmpv6 = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

impl smoltcp::phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0u8; len];
        let result = f(&mut packet);
        self.0.push(packet);
        result
    }
}
