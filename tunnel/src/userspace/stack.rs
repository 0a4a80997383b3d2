//! The embedded stack: smoltcp's interface and socket set behind one lock, the packet queues
//! it reads and writes as its device, and the bookkeeping around sockets (ephemeral ports,
//! closed sockets lingering until their close handshake ends).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use tokio::sync::Notify;

use super::connection::Conn;
use super::listener::{Listener, ListenerState};

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
/// A closed connection whose peer never finishes the close handshake is aborted after this
/// long (Linux's default `tcp_fin_timeout`).
const CLOSE_LINGER: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(60);
/// Data or keepalives unacknowledged this long abort the connection: the peer is gone.
const ACK_TIMEOUT: smoltcp::time::Duration = smoltcp::time::Duration::from_secs(120);
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

pub(super) struct State {
    pub(super) iface: Interface,
    pub(super) sockets: SocketSet<'static>,
    device: PacketQueues,
    pub(super) listeners: HashMap<u16, ListenerState>,
    /// Sockets whose owner is gone, and since when; removed once their close handshake
    /// ends, or aborted after [`CLOSE_LINGER`].
    closing: Vec<(SocketHandle, SmolInstant)>,
    next_port: u16,
    started: std::time::Instant,
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
        self.wake_driver();
    }

    /// Takes what the sockets have to send and says when to call again at the latest.
    #[must_use = "the stack must be polled again by the returned delay"]
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
        Conn::connect(self.clone(), remote).await
    }

    pub(crate) fn listen(&self, addr: SocketAddr) -> io::Result<Listener> {
        Listener::bind(self.clone(), addr)
    }

    /// This side's tunnel address.
    pub(super) fn address(&self) -> IpAddr {
        self.shared.address
    }

    /// Lets the driver's stack loop look at the sockets: there is something to send, or
    /// window to announce.
    pub(super) fn wake_driver(&self) {
        self.shared.wake.notify_one();
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves smoltcp's state as consistent as smoltcp
        // leaves it between calls; keep serving rather than poisoning every connection.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    pub(super) fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.started.elapsed().as_micros() as i64)
    }

    /// Hands a socket whose owner is gone to the reaper, which removes it once its close
    /// handshake ends.
    pub(super) fn close_later(&mut self, handle: SocketHandle) {
        let since = self.now();
        self.closing.push((handle, since));
    }

    /// A local port no listener or socket uses.
    pub(super) fn free_port(&mut self) -> io::Result<u16> {
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

    fn settle_listeners(&mut self) {
        let State {
            listeners, sockets, ..
        } = self;
        for listener in listeners.values_mut() {
            listener.settle(sockets);
        }
    }

    fn reap_closed(&mut self) {
        let now = self.now();
        let sockets = &mut self.sockets;
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
}

/// A TCP socket with this stack's buffers and options.
pub(super) fn new_socket() -> tcp::Socket<'static> {
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
