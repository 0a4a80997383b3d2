//! The tokio driver: owns the UDP socket, the clock, the network backend and the sans-IO
//! engine, and moves packets between them.
//!
//! Three loops run as tasks, each a straight line from an input to the outputs it causes:
//! - receive: UDP batch → engine (decrypt) → backend (TUN write, a flow's packets coalesced
//!   into one super-packet; or smoltcp ingress);
//! - send: backend (TUN read batch, super-packets split to the MTU; or everything smoltcp has
//!   queued, replies included, so it leaves in order) → engine (encrypt) → UDP batch;
//! - timers: sleep until the engine's next deadline (handshake retries, keepalives, rekeys).
//!
//! The engine sits behind one mutex taken once per batch, never across an await; the
//! userspace stack has its own lock, and no code path holds both.
//!
//! Each loop owns its buffers and reuses them from batch to batch: the engine decrypts into the
//! receive loop's packet buffers and encrypts into an [`Outgoing`]'s datagram buffers, with no
//! allocation per packet. What the engine queues on its own (handshakes, keepalives, packets
//! released when a session starts) is copied into the same [`Outgoing`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::core::{self, Engine};
use crate::kernel::{GroTable, TunDevice, TunReads, COALESCE_CAPACITY, HEADROOM};
use crate::udp::{self, RecvBatch, UdpSocket};
use crate::userspace::Stack;
use crate::{Error, Mode, Network, PeerStats, TunnelConfig};

/// Longest sleep of the timer loop when the engine has no deadline.
const IDLE_TIMER: Duration = Duration::from_secs(1);

/// A running WireGuard tunnel.
pub struct Tunnel {
    shared: Arc<Shared>,
    network: Network,
    local_udp: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Tunnel {
    /// Binds the UDP socket, creates the backend (the TUN interface in kernel mode) and
    /// starts the driver's tasks on the current tokio runtime.
    pub async fn start(config: TunnelConfig) -> Result<Tunnel, Error> {
        validate(&config)?;
        let listen = config
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let udp = UdpSocket::bind(listen).map_err(|source| Error::UdpBind {
            addr: listen,
            source,
        })?;
        let local_udp = udp.local_addr().map_err(|source| Error::UdpBind {
            addr: listen,
            source,
        })?;
        let backend = match config.mode {
            Mode::Kernel => Backend::Kernel(Arc::new(TunDevice::create(&config)?)),
            Mode::Userspace => Backend::Userspace(Stack::new(config.address, config.mtu)),
        };
        let engine = Engine::new(&config.private_key, config.peers.clone(), Instant::now());
        let shared = Arc::new(Shared {
            engine: Mutex::new(engine),
            udp,
            timer: Notify::new(),
            timer_deadline: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
        });
        let network = match &backend {
            Backend::Kernel(tun) => {
                tracing::info!(interface = tun.name(), udp = %local_udp, offloads = tun.offloads(), "tunnel up (kernel mode)");
                Network::host()
            }
            Backend::Userspace(stack) => {
                tracing::info!(address = %config.address, udp = %local_udp, "tunnel up (userspace mode)");
                Network::userspace(stack.clone())
            }
        };
        let mtu = usize::from(config.mtu);
        let tasks = vec![
            tokio::spawn(receive_loop(shared.clone(), backend.clone())),
            match &backend {
                Backend::Kernel(tun) => tokio::spawn(tun_loop(shared.clone(), tun.clone(), mtu)),
                Backend::Userspace(stack) => {
                    tokio::spawn(stack_loop(shared.clone(), stack.clone(), mtu))
                }
            },
            tokio::spawn(timer_loop(shared.clone(), backend)),
        ];
        Ok(Tunnel {
            shared,
            network,
            local_udp,
            tasks,
        })
    }

    /// Where applications open and accept TCP connections: the host's stack in kernel
    /// mode, the embedded stack in userspace mode.
    pub fn network(&self) -> Network {
        self.network.clone()
    }

    pub fn local_udp_addr(&self) -> SocketAddr {
        self.local_udp
    }

    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.shared.lock().stats()
    }

    /// Every datagram and packet the tunnel dropped, by [`core::DropReason`] name, whether or
    /// not a peer could be named (see [`Engine::dropped`]); zeros included.
    pub fn dropped(&self) -> std::collections::BTreeMap<String, u64> {
        self.shared.lock().dropped()
    }

    /// Stops the tasks; in kernel mode the TUN interface and its routes go away with them.
    pub async fn shutdown(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("local_udp", &self.local_udp)
            .field("network", &self.network)
            .finish()
    }
}

fn validate(config: &TunnelConfig) -> Result<(), Error> {
    let min_mtu = match config.address {
        ipnet::IpNet::V4(_) => 576,
        ipnet::IpNet::V6(_) => 1280,
    };
    if config.mtu < min_mtu {
        return Err(Error::Config(format!(
            "mtu {} is below the minimum of {min_mtu} for a tunnel address like {}",
            config.mtu, config.address
        )));
    }
    let mut names = std::collections::BTreeSet::new();
    for peer in &config.peers {
        if !names.insert(peer.name.as_str()) {
            return Err(Error::Config(format!(
                "two peers are named {:?}; peer names must be unique",
                peer.name
            )));
        }
    }
    Ok(())
}

#[derive(Clone)]
enum Backend {
    Kernel(Arc<TunDevice>),
    Userspace(Stack),
}

/// Where one task hands decrypted packets: the TUN device with the task's own coalescing
/// state, or the embedded stack.
enum Sink {
    Kernel {
        tun: Arc<TunDevice>,
        gro: Box<GroTable>,
    },
    Userspace(Stack),
}

impl Sink {
    fn new(backend: &Backend) -> Sink {
        match backend {
            Backend::Kernel(tun) => Sink::Kernel {
                tun: tun.clone(),
                gro: Box::new(GroTable::new()),
            },
            Backend::Userspace(stack) => Sink::Userspace(stack.clone()),
        }
    }

    /// Each buffer holds [`HEADROOM`] spare bytes, then exactly one IP packet.
    async fn write(&mut self, packets: &mut [Vec<u8>]) {
        match self {
            Sink::Kernel { tun, gro } => {
                if let Err(err) = tun.write_batch(gro, packets).await {
                    tracing::warn!(interface = tun.name(), error = %err, "writing to TUN failed");
                }
            }
            // Its replies go out through the stack loop, in order.
            Sink::Userspace(stack) => stack.receive(packets.iter().map(|p| &p[HEADROOM..])),
        }
    }
}

struct Shared {
    engine: Mutex<Engine>,
    udp: UdpSocket,
    /// Wakes the timer loop when the engine's next deadline moved earlier.
    timer: Notify,
    /// The deadline the timer loop sleeps until, in nanoseconds since `epoch`.
    timer_deadline: AtomicU64,
    epoch: Instant,
}

/// What one pass of a loop sends on, gathered while the engine's lock is held and acted on
/// after: datagrams for the UDP socket, then packets for the backend. The datagram buffers
/// are kept from pass to pass; the engine encrypts straight into them.
struct Outgoing {
    buffers: Vec<Vec<u8>>,
    /// Destination and length of the datagram in each of the first `datagrams.len()` buffers.
    datagrams: Vec<(SocketAddr, usize)>,
    /// Decrypted packets from the engine's queue, each with [`HEADROOM`] spare bytes in front,
    /// as [`Sink::write`] takes them.
    packets: Vec<Vec<u8>>,
}

impl Outgoing {
    /// Starts with `buffers` datagram buffers of `len` bytes; more are added as a pass needs.
    fn new(buffers: usize, len: usize) -> Outgoing {
        Outgoing {
            buffers: (0..buffers).map(|_| vec![0u8; len]).collect(),
            datagrams: Vec::with_capacity(buffers),
            packets: Vec::new(),
        }
    }

    /// The next free datagram buffer, at least `len` bytes long.
    fn next_buffer(&mut self, len: usize) -> &mut [u8] {
        let next = self.datagrams.len();
        if next == self.buffers.len() {
            self.buffers.push(Vec::new());
        }
        let buffer = &mut self.buffers[next];
        if buffer.len() < len {
            buffer.resize(len, 0);
        }
        buffer
    }

    /// Keeps the `len` bytes just written into [`Outgoing::next_buffer`] as a datagram.
    fn push_written(&mut self, dst: SocketAddr, len: usize) {
        self.datagrams.push((dst, len));
    }

    fn push_datagram(&mut self, dst: SocketAddr, datagram: &[u8]) {
        self.next_buffer(datagram.len())[..datagram.len()].copy_from_slice(datagram);
        self.push_written(dst, datagram.len());
    }

    fn push_packet(&mut self, packet: &[u8]) {
        let mut buffer = Vec::with_capacity(HEADROOM + packet.len());
        buffer.resize(HEADROOM, 0);
        buffer.extend_from_slice(packet);
        self.packets.push(buffer);
    }

    fn datagrams(&self) -> Vec<(SocketAddr, &[u8])> {
        self.datagrams
            .iter()
            .zip(&self.buffers)
            .map(|((dst, len), buffer)| (*dst, &buffer[..*len]))
            .collect()
    }

    fn clear(&mut self) {
        self.datagrams.clear();
        self.packets.clear();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Engine> {
        // The engine's methods keep it consistent between calls; a panic elsewhere while the
        // lock was held must not stop the tunnel.
        self.engine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Encrypts IP packets from the backend into `out`, in order, followed by whatever the
    /// engine queued meanwhile (a handshake initiation while packets wait for a session).
    fn encrypt<'p>(&self, packets: impl Iterator<Item = &'p [u8]>, out: &mut Outgoing) {
        let mut engine = self.lock();
        let now = Instant::now();
        for packet in packets {
            let buffer = out.next_buffer(core::outbound_buffer_len(packet.len()));
            if let Some((dst, len)) = engine.handle_outbound_into(packet, now, buffer) {
                out.push_written(dst, len);
            }
        }
        self.drain(&mut engine, out);
    }

    /// Moves what the engine queued into `out`, logs its events and wakes the timer loop
    /// if the engine's next deadline moved earlier.
    fn drain(&self, engine: &mut Engine, out: &mut Outgoing) {
        while let Some(transmit) = engine.poll_transmit() {
            out.push_datagram(transmit.dst, &transmit.payload);
        }
        while let Some(packet) = engine.poll_inbound() {
            out.push_packet(&packet);
        }
        while let Some(event) = engine.poll_event() {
            tracing::info!(?event, "tunnel event");
        }
        if let Some(deadline) = engine.poll_timeout() {
            let nanos = self.nanos_since_epoch(deadline);
            if nanos < self.timer_deadline.load(Ordering::Relaxed) {
                self.timer.notify_one();
            }
        }
    }

    fn nanos_since_epoch(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    async fn send(&self, datagrams: &[(SocketAddr, &[u8])]) {
        if datagrams.is_empty() {
            return;
        }
        if let Err(err) = self.udp.send_all(datagrams).await {
            tracing::warn!(error = %err, "sending WireGuard datagrams failed");
        }
    }
}

/// UDP → engine (decrypt) → backend, and the backend's immediate replies back out.
async fn receive_loop(shared: Arc<Shared>, backend: Backend) {
    let mut batch = RecvBatch::new();
    // One buffer per decrypted packet: HEADROOM spare bytes, then the packet, trimmed to its
    // length, as the TUN write takes them; a datagram without a packet (a handshake, a
    // keepalive, a drop) leaves its buffer to the next one. In kernel
    // mode each has room for the packets after it to be coalesced into it; pages are touched
    // only as coalescing uses them.
    let capacity = match backend {
        Backend::Kernel(_) => COALESCE_CAPACITY,
        Backend::Userspace(_) => HEADROOM + udp::MAX_DATAGRAM,
    };
    let mut plain: Vec<Vec<u8>> = (0..udp::BATCH)
        .map(|_| Vec::with_capacity(capacity))
        .collect();
    let mut sink = Sink::new(&backend);
    let mut out = Outgoing::new(0, 0);
    loop {
        if let Err(err) = shared.udp.recv_batch(&mut batch).await {
            tracing::error!(error = %err, "WireGuard UDP socket failed; tunnel stopped receiving");
            return;
        }
        // A GRO batch can hold hundreds of datagrams: they are decrypted and written in
        // chunks of `plain.len()`, which bounds the coalescing buffers' memory.
        let mut datagrams = batch.iter().peekable();
        while datagrams.peek().is_some() {
            let mut filled = 0;
            {
                let mut engine = shared.lock();
                let now = Instant::now();
                while filled < plain.len() {
                    let Some((from, datagram)) = datagrams.next() else {
                        break;
                    };
                    let buf = &mut plain[filled];
                    // Zeroes only the bytes past the last packet's end (a coalesced write
                    // leaves a longer buffer behind, which this shortens).
                    buf.resize(HEADROOM + core::inbound_buffer_len(datagram.len()), 0);
                    if let Some(len @ 1..) =
                        engine.handle_datagram_into(from, datagram, now, &mut buf[HEADROOM..])
                    {
                        buf.truncate(HEADROOM + len);
                        filled += 1;
                    }
                }
                shared.drain(&mut engine, &mut out);
            }
            sink.write(&mut plain[..filled]).await;
            deliver(&shared, &mut sink, &mut out).await;
        }
    }
}

/// Sends the datagrams and hands the packets to the backend, leaving `out` empty.
async fn deliver(shared: &Shared, sink: &mut Sink, out: &mut Outgoing) {
    shared.send(&out.datagrams()).await;
    sink.write(&mut out.packets).await;
    out.clear();
}

/// TUN → engine (encrypt) → UDP (kernel mode).
async fn tun_loop(shared: Arc<Shared>, tun: Arc<TunDevice>, mtu: usize) {
    let mut reads = TunReads::new(mtu);
    let mut out = Outgoing::new(udp::BATCH, core::outbound_buffer_len(mtu + 64));
    let mut sink = Sink::new(&Backend::Kernel(tun.clone()));
    loop {
        if let Err(err) = tun.read_batch(&mut reads).await {
            tracing::error!(interface = tun.name(), error = %err, "reading from TUN failed; tunnel stopped sending");
            return;
        }
        shared.encrypt(reads.packets(), &mut out);
        deliver(&shared, &mut sink, &mut out).await;
    }
}

/// smoltcp → engine (encrypt) → UDP (userspace mode). Runs when an application wrote, read
/// or closed, and at smoltcp's own deadline (retransmits, delayed ACKs); never on a fixed tick.
async fn stack_loop(shared: Arc<Shared>, stack: Stack, mtu: usize) {
    let mut sink = Sink::Userspace(stack.clone());
    let mut packets = Vec::new();
    let mut out = Outgoing::new(udp::BATCH, core::outbound_buffer_len(mtu));
    loop {
        let delay = stack.poll(&mut packets);
        if !packets.is_empty() {
            shared.encrypt(packets.iter().map(Vec::as_slice), &mut out);
            packets.clear();
            deliver(&shared, &mut sink, &mut out).await;
            // More may be queued behind a full pass; look again before sleeping.
            continue;
        }
        match delay {
            Some(delay) if delay.is_zero() => tokio::task::yield_now().await,
            Some(delay) => {
                tokio::select! {
                    _ = stack.wait() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            None => stack.wait().await,
        }
    }
}

/// Handshake retries, keepalives, rekeys and session expiry, at the engine's deadlines.
async fn timer_loop(shared: Arc<Shared>, backend: Backend) {
    let mut sink = Sink::new(&backend);
    let mut out = Outgoing::new(0, 0);
    loop {
        let now = Instant::now();
        let deadline = shared
            .lock()
            .poll_timeout()
            .unwrap_or(now + IDLE_TIMER)
            .min(now + IDLE_TIMER);
        shared
            .timer_deadline
            .store(shared.nanos_since_epoch(deadline), Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = shared.timer.notified() => continue,
        }
        shared.timer_deadline.store(u64::MAX, Ordering::Relaxed);
        {
            let mut engine = shared.lock();
            engine.handle_timeout(Instant::now());
            shared.drain(&mut engine, &mut out);
        }
        deliver(&shared, &mut sink, &mut out).await;
    }
}
