//! The sans-IO WireGuard engine: a table of peers, each a `boringtun::noise::Tunn`, with no
//! sockets, devices, clocks or threads of its own.
//!
//! Bytes and the current `Instant` go in; UDP datagrams, decrypted IP packets, events and the
//! next timer deadline come out. A driver loop looks like:
//!
//! ```text
//! loop {
//!     select {
//!         udp datagram (from, bytes)  => engine.handle_datagram(from, bytes, now),
//!         IP packet from the stack    => engine.handle_outbound(packet, now),
//!         engine.poll_timeout()       => engine.handle_timeout(now),
//!     }
//!     while let Some(t) = engine.poll_transmit() { udp.send_to(&t.payload, t.dst) }
//!     while let Some(p) = engine.poll_inbound()  { stack.write(&p) }
//!     while let Some(e) = engine.poll_event()    { log / metrics }
//! }
//! ```
//!
//! On the fast paths, [`Engine::handle_datagram_into`] and [`Engine::handle_outbound_into`]
//! write the common result (the decrypted packet, the encrypted datagram) straight into the
//! caller's buffer, so a steady flow allocates nothing. The queues carry the rest, each item
//! in a buffer of its own: handshakes, keepalives, cookie replies, the packets released when
//! a session starts, and results that did not fit a caller's short buffer.
//!
//! What the engine adds to `Tunn`:
//! - routing: datagrams reach their peer by the receiver index boringtun put in the upper 24
//!   bits of every session index; handshake initiations, which carry no index of ours, by the
//!   static key they decrypt to (after the shared rate limiter has checked mac1 and load);
//!   outbound packets by longest-prefix match of their destination over all allowed IPs;
//! - cryptokey routing: a decrypted packet whose source lies outside its peer's allowed IPs is
//!   dropped;
//! - roaming: a peer's endpoint follows the source of its last authenticated datagram;
//! - timers: `update_timers` on every tick, the shared handshake [`RateLimiter`] reset each
//!   second, and recovery after `ConnectionExpired` (peers with a persistent keepalive and a
//!   known endpoint keep initiating; others recover on the next packet either way);
//! - boringtun's queue of packets waiting for a session is released once a session is
//!   usable: after the keepalive that completes our own handshake, and after data from the
//!   peer, never right after answering an initiation (see `flush_queued`);
//! - per-peer counters and drops by reason ([`DropReason`]); drops no peer can be blamed for
//!   (garbage, unknown indices and keys, bad mac1, cookie replies under load) are counted by
//!   the engine itself, and [`Engine::dropped`] sums both for the daemons' metrics.
//!
//! Time: every entry point takes `now`, and the engine never reads a clock. boringtun reads its
//! own clock internally; with the crate feature `sim-clock` (on for this crate's tests) that
//! clock is `mock_instant`'s, and the engine sets it from `now` before every call into
//! boringtun (see `clock.rs`), so a test that passes simulated instants moves both clocks.

mod clock;
mod peer;
mod routing;
mod stats;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{HandshakeInit, Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;

use crate::keys::{PrivateKey, PublicKey};
use clock::Clock;
use peer::{error_reason, Peer};
use routing::RoutingTable;
use stats::DropCounts;

pub use stats::{DropReason, PeerStats};

/// How often [`Engine::handle_timeout`] wants to run. boringtun checks its timers only when
/// asked, and stamps events with the time of the last check; its own device ticks at this rate.
pub const TIMER_TICK: Duration = Duration::from_millis(250);

/// Handshake messages the shared rate limiter lets through per second before it answers with
/// cookie replies instead (the figure boringtun's own device uses). Initiations are checked
/// twice (before the Diffie-Hellman that identifies the sender, and inside `Tunn`), so about
/// half this many initiations per second are processed under a flood.
pub const HANDSHAKE_CHECKS_PER_SECOND: u64 = 100;

/// WireGuard data message overhead: 16-byte header + 16-byte Poly1305 tag.
pub const DATA_OVERHEAD: usize = 32;

/// Largest inner IP packet the engine encrypts: the UDP payload limit over IPv4 (65,507)
/// minus [`DATA_OVERHEAD`].
pub const MAX_IP_PACKET: usize = 65_507 - DATA_OVERHEAD;

/// boringtun panics if a destination buffer is shorter than a handshake initiation.
pub const MIN_WIRE_BUFFER: usize = 148;

/// Scratch space for timers and queued-packet flushes: any IP packet plus overhead.
const SCRATCH_LEN: usize = MAX_IP_PACKET + DATA_OVERHEAD;

const RATE_LIMITER_RESET: Duration = Duration::from_secs(1);

/// boringtun retries an unanswered initiation after this long (WireGuard's REKEY_TIMEOUT).
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);

/// Session indices are 32 bits: boringtun puts the index we give each `Tunn` in the upper 24
/// and counts sessions in the lower 8.
const PEER_INDEX_MASK: u32 = 0x00ff_ffff;

/// The buffer [`Engine::handle_outbound_into`] needs for an IP packet of this length.
pub fn outbound_buffer_len(ip_packet_len: usize) -> usize {
    (ip_packet_len + DATA_OVERHEAD).max(MIN_WIRE_BUFFER)
}

/// The buffer [`Engine::handle_datagram_into`] needs for a datagram of this length.
pub fn inbound_buffer_len(datagram_len: usize) -> usize {
    datagram_len.max(MIN_WIRE_BUFFER)
}

/// One WireGuard peer: what the daemons' `[[tunnel.peers]]` tables parse into, and what the
/// engine builds each peer from.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Label for logs and statistics; unique within a tunnel.
    pub name: String,
    pub public_key: PublicKey,
    /// `None`: learned from the peer's first authenticated datagram.
    pub endpoint: Option<SocketAddr>,
    /// Inner source addresses accepted from this peer, and destinations routed to it.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives when idle; also makes the engine initiate at start and keep
    /// re-initiating after `ConnectionExpired`.
    pub persistent_keepalive: Option<u16>,
    /// Mixed into every handshake; both sides must configure the same key.
    pub preshared_key: Option<[u8; 32]>,
}

/// A peer's position in the table given to [`Engine::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(usize);

impl PeerId {
    pub fn index(self) -> usize {
        self.0
    }
}

/// A UDP datagram to send: what [`Engine::poll_transmit`] hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

impl Transmit {
    fn new(dst: SocketAddr, datagram: &[u8]) -> Transmit {
        Transmit {
            dst,
            payload: datagram.to_vec(),
        }
    }
}

/// Something the driver may want to log or count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new session exists with this peer (first handshake or rekey).
    HandshakeCompleted { peer: PeerId },
    /// The peer's endpoint was learned or moved (roaming).
    EndpointChanged { peer: PeerId, endpoint: SocketAddr },
    /// boringtun gave up: no session and no handshake for too long. Emitted once per outage,
    /// and only for a peer that had a session.
    ConnectionExpired { peer: PeerId },
}

/// The peer table. See the module documentation.
pub struct Engine {
    peers: Vec<Peer>,
    peers_by_key: HashMap<[u8; 32], PeerId>,
    /// Peer `i`'s `Tunn` index is `index_base + i` (24 bits), so a receiver index maps back to
    /// its peer without a lookup; the random base keeps indices unpredictable to outsiders.
    index_base: u32,
    routes: RoutingTable,
    static_private: x25519::StaticSecret,
    static_public: x25519::PublicKey,
    rate_limiter: Arc<RateLimiter>,
    clock: Clock,
    next_tick: Instant,
    next_rate_limiter_reset: Instant,
    transmits: VecDeque<Transmit>,
    inbound: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    /// Drops that no peer can be blamed for (unparseable datagrams, unknown senders, no route).
    drops: DropCounts,
    scratch: Box<[u8]>,
}

impl Engine {
    pub fn new(private_key: &PrivateKey, peers: Vec<PeerConfig>, now: Instant) -> Engine {
        let clock = Clock::new(now);
        let static_private = private_key.as_static_secret().clone();
        let static_public = private_key.public_key();
        let rate_limiter = Arc::new(RateLimiter::new(
            static_public.as_x25519(),
            HANDSHAKE_CHECKS_PER_SECOND,
        ));
        let index_base = rand::random::<u32>() & PEER_INDEX_MASK;
        let routes = RoutingTable::new(
            peers
                .iter()
                .enumerate()
                .flat_map(|(i, spec)| spec.allowed_ips.iter().map(move |net| (*net, PeerId(i)))),
        );
        let mut peers_by_key = HashMap::new();
        let peers: Vec<Peer> = peers
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                // A duplicated key keeps its first peer: initiations can only name one.
                peers_by_key
                    .entry(*spec.public_key.as_bytes())
                    .or_insert(PeerId(i));
                let index = index_base.wrapping_add(i as u32) & PEER_INDEX_MASK;
                let tunn = Tunn::new(
                    static_private.clone(),
                    *spec.public_key.as_x25519(),
                    spec.preshared_key,
                    spec.persistent_keepalive,
                    index,
                    Some(rate_limiter.clone()),
                );
                Peer::new(spec, tunn)
            })
            .collect();
        let mut engine = Engine {
            peers,
            peers_by_key,
            index_base,
            routes,
            static_private,
            static_public: *static_public.as_x25519(),
            rate_limiter,
            clock,
            next_tick: now + TIMER_TICK,
            next_rate_limiter_reset: now + RATE_LIMITER_RESET,
            transmits: VecDeque::new(),
            inbound: VecDeque::new(),
            events: VecDeque::new(),
            drops: DropCounts::default(),
            scratch: vec![0u8; SCRATCH_LEN].into_boxed_slice(),
        };
        engine.initiate_keepalive_peers(now);
        engine
    }

    /// Any UDP datagram received on the socket, from `from`.
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        self.clock.advance_to(now);
        let mut buffer = vec![0u8; inbound_buffer_len(datagram.len())];
        if let Some(len) = self.receive(from, datagram, &mut buffer) {
            buffer.truncate(len);
            self.inbound.push_back(buffer);
        }
    }

    /// [`Engine::handle_datagram`] that writes a decrypted IP packet into `out` and returns its
    /// length. `out` must hold [`inbound_buffer_len`] bytes; a shorter one sends the packet
    /// through [`Engine::poll_inbound`] instead.
    #[must_use = "a returned length is a decrypted packet in `out` to deliver"]
    pub fn handle_datagram_into(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &mut [u8],
    ) -> Option<usize> {
        if out.len() < inbound_buffer_len(datagram.len()) {
            self.handle_datagram(from, datagram, now);
            return None;
        }
        self.clock.advance_to(now);
        self.receive(from, datagram, out)
    }

    /// An IP packet from the local stack: encrypted for the peer whose allowed IPs hold its
    /// destination, or queued while that peer's handshake runs.
    pub fn handle_outbound(&mut self, ip_packet: &[u8], now: Instant) {
        self.clock.advance_to(now);
        let Some(peer) = self.route(ip_packet) else {
            return;
        };
        let mut payload = vec![0u8; outbound_buffer_len(ip_packet.len())];
        if let Some((dst, len)) = self.encapsulate(peer, ip_packet, &mut payload) {
            payload.truncate(len);
            self.transmits.push_back(Transmit { dst, payload });
        }
    }

    /// [`Engine::handle_outbound`] that writes the datagram to send into `out` and returns its
    /// destination and length: the encrypted packet, or a handshake initiation while the packet
    /// waits for a session. `out` must hold [`outbound_buffer_len`] bytes; a shorter one sends
    /// the datagram through [`Engine::poll_transmit`] instead.
    #[must_use = "a returned destination and length is a datagram in `out` to send"]
    pub fn handle_outbound_into(
        &mut self,
        ip_packet: &[u8],
        now: Instant,
        out: &mut [u8],
    ) -> Option<(SocketAddr, usize)> {
        if out.len() < outbound_buffer_len(ip_packet.len()) {
            self.handle_outbound(ip_packet, now);
            return None;
        }
        self.clock.advance_to(now);
        let peer = self.route(ip_packet)?;
        self.encapsulate(peer, ip_packet, out)
    }

    /// Runs every peer's timers (handshake retries, rekeys, keepalives, expiry), resets the
    /// handshake rate limiter each second and restarts expired keepalive peers.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.clock.advance_to(now);
        if now >= self.next_rate_limiter_reset {
            self.rate_limiter.reset_count();
            self.next_rate_limiter_reset = now + RATE_LIMITER_RESET;
        }
        for index in 0..self.peers.len() {
            self.update_peer_timers(PeerId(index), now);
        }
        self.next_tick = now + TIMER_TICK;
    }

    /// The next UDP datagram to send.
    #[must_use = "a polled datagram is gone from the queue; send it"]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next decrypted IP packet for the local stack.
    #[must_use = "a polled packet is gone from the queue; deliver it"]
    pub fn poll_inbound(&mut self) -> Option<Vec<u8>> {
        self.inbound.pop_front()
    }

    #[must_use = "a polled event is gone from the queue"]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Engine::handle_timeout`] must next run; `None` when there are no peers.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.peers.is_empty() {
            return None;
        }
        Some(self.next_tick)
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        self.peers
            .iter()
            .map(|peer| peer.stats(&self.clock))
            .collect()
    }

    /// Drops not attributable to a peer (garbage from unknown senders, initiations from
    /// unknown keys, packets with no route), by reason.
    pub fn unattributed_drops(&self) -> std::collections::BTreeMap<String, u64> {
        self.drops.to_map()
    }

    /// Every drop by reason, attributed to a peer or not: each datagram or packet the engine
    /// refused is counted once, in [`Engine::unattributed_drops`] or in one peer's
    /// [`PeerStats::drops`], and this is their sum. Every [`DropReason`] is present, zeros
    /// included.
    pub fn dropped(&self) -> std::collections::BTreeMap<String, u64> {
        let mut total = self.drops.clone();
        for peer in &self.peers {
            total.merge(&peer.drops);
        }
        total.to_map()
    }

    pub fn peer_name(&self, peer: PeerId) -> Option<&str> {
        self.peers.get(peer.0).map(|p| p.name.as_str())
    }

    pub fn peer_id(&self, name: &str) -> Option<PeerId> {
        self.peers.iter().position(|p| p.name == name).map(PeerId)
    }

    pub fn endpoint(&self, peer: PeerId) -> Option<SocketAddr> {
        self.peers.get(peer.0).and_then(|p| p.endpoint)
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_bytes(self.static_public.to_bytes())
    }

    /// One peer borrowed beside what the engine hands out (datagrams, events) and the scratch
    /// buffer, so one step can update all of them.
    fn peer_and_outputs(
        &mut self,
        peer_id: PeerId,
    ) -> (
        &mut Peer,
        &mut VecDeque<Transmit>,
        &mut VecDeque<Event>,
        &mut [u8],
    ) {
        let Engine {
            peers,
            transmits,
            events,
            scratch,
            ..
        } = self;
        (&mut peers[peer_id.0], transmits, events, scratch)
    }

    /// Peers that keep a connection open (persistent keepalive) and know where to find their
    /// peer start the handshake at once, as `wg` does when such a peer is configured.
    fn initiate_keepalive_peers(&mut self, now: Instant) {
        let Engine {
            peers,
            transmits,
            scratch,
            ..
        } = self;
        for peer in peers.iter_mut() {
            if peer.keepalive.is_none() || peer.endpoint.is_none() {
                continue;
            }
            if let TunnResult::WriteToNetwork(init) =
                peer.tunn.format_handshake_initiation(scratch, false)
            {
                transmits.extend(peer.transmit(init));
            }
            peer.next_recovery = Some(now + peer.keepalive_interval());
        }
    }

    /// Routes a datagram to its peer by kind, lets boringtun open it (decrypting a packet into
    /// `out`) and acts on what came out. Returns the length of a packet to deliver.
    fn receive(&mut self, from: SocketAddr, datagram: &[u8], out: &mut [u8]) -> Option<usize> {
        let (peer_id, is_data) = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(init)) => {
                (self.identify_initiator(from, datagram, &init)?, false)
            }
            Ok(Packet::HandshakeResponse(p)) => (self.peer_by_index(p.receiver_idx)?, false),
            Ok(Packet::PacketCookieReply(p)) => (self.peer_by_index(p.receiver_idx)?, false),
            Ok(Packet::PacketData(p)) => (self.peer_by_index(p.receiver_idx)?, true),
            Err(_) => {
                self.drops.add(DropReason::Garbage);
                return None;
            }
        };
        let now = self.clock.now();
        let (peer, transmits, events, scratch) = self.peer_and_outputs(peer_id);
        let opened = peer.tunn.decapsulate(Some(from.ip()), datagram, out);
        match Opened::from_result(opened, is_data) {
            Opened::Keepalive => {
                peer.authenticated(peer_id, from, datagram.len(), events);
                peer.answered_at = None;
                flush_queued(peer, transmits, scratch);
                None
            }
            // A cookie reply only proves that the sender saw our initiation, which is not
            // enough to move the endpoint.
            Opened::Consumed => None,
            Opened::Refused(err) => {
                peer.drops.add(error_reason(&err));
                None
            }
            Opened::UnderLoad(cookie_reply) => {
                // The sender must prove its address before we spend a Diffie-Hellman on it.
                peer.drops.add(DropReason::UnderLoad);
                transmits.push_back(Transmit::new(from, cookie_reply));
                None
            }
            Opened::Answered(response) => {
                // Packets queued here wait for the initiator's first data message, which
                // confirms the session: flushing now would make boringtun start an initiation
                // of its own that discards the state of one already in flight, so crossing
                // handshakes would keep cancelling each other.
                peer.authenticated(peer_id, from, datagram.len(), events);
                peer.handshake_completed(peer_id, now, events);
                peer.answered_at = Some(now);
                transmits.extend(peer.transmit(response));
                None
            }
            Opened::Confirmed(keepalive) => {
                peer.authenticated(peer_id, from, datagram.len(), events);
                peer.handshake_completed(peer_id, now, events);
                transmits.extend(peer.transmit(keepalive));
                flush_queued(peer, transmits, scratch);
                None
            }
            Opened::Packet { len, source } => {
                peer.authenticated(peer_id, from, datagram.len(), events);
                peer.answered_at = None;
                flush_queued(peer, transmits, scratch);
                peer.admit(source, len)
            }
        }
    }

    /// Finds the peer an initiation comes from. mac1 and the load check run first, on the
    /// shared rate limiter, so a flood costs a keyed hash per datagram, not a Diffie-Hellman.
    fn identify_initiator(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        init: &HandshakeInit,
    ) -> Option<PeerId> {
        let mut cookie = [0u8; MIN_WIRE_BUFFER];
        match self
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, &mut cookie)
        {
            Ok(_) => {}
            Err(TunnResult::WriteToNetwork(cookie_reply)) => {
                self.drops.add(DropReason::UnderLoad);
                self.transmits.push_back(Transmit::new(from, cookie_reply));
                return None;
            }
            Err(TunnResult::Err(WireGuardError::InvalidMac)) => {
                self.drops.add(DropReason::BadMac);
                return None;
            }
            Err(_) => {
                self.drops.add(DropReason::Garbage);
                return None;
            }
        }
        let Ok(half) = parse_handshake_anon(&self.static_private, &self.static_public, init) else {
            self.drops.add(DropReason::DecryptFailed);
            return None;
        };
        let Some(peer) = self.peers_by_key.get(&half.peer_static_public) else {
            self.drops.add(DropReason::UnknownPeer);
            return None;
        };
        Some(*peer)
    }

    fn peer_by_index(&mut self, receiver_index: u32) -> Option<PeerId> {
        let slot = (receiver_index >> 8).wrapping_sub(self.index_base) & PEER_INDEX_MASK;
        let slot = slot as usize;
        if slot >= self.peers.len() {
            self.drops.add(DropReason::UnknownIndex);
            return None;
        }
        Some(PeerId(slot))
    }

    fn route(&mut self, ip_packet: &[u8]) -> Option<PeerId> {
        if ip_packet.len() > MAX_IP_PACKET {
            self.drops.add(DropReason::TooBig);
            return None;
        }
        let Some(destination) = Tunn::dst_address(ip_packet) else {
            self.drops.add(DropReason::MalformedOutbound);
            return None;
        };
        let Some(peer) = self.routes.lookup(destination) else {
            self.drops.add(DropReason::NoRoute);
            return None;
        };
        Some(peer)
    }

    /// Encrypts into `out` (sized by the caller) and returns where to send it.
    fn encapsulate(
        &mut self,
        peer_id: PeerId,
        ip_packet: &[u8],
        out: &mut [u8],
    ) -> Option<(SocketAddr, usize)> {
        let peer = &mut self.peers[peer_id.0];
        match peer.tunn.encapsulate(ip_packet, out) {
            TunnResult::WriteToNetwork(datagram) => {
                let endpoint = peer.send_to(datagram.len())?;
                Some((endpoint, datagram.len()))
            }
            TunnResult::Err(err) => {
                peer.drops.add(error_reason(&err));
                None
            }
            // Queued until the handshake in flight completes.
            TunnResult::Done => None,
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => None,
        }
    }

    fn update_peer_timers(&mut self, peer_id: PeerId, now: Instant) {
        let (peer, transmits, events, scratch) = self.peer_and_outputs(peer_id);
        if peer.answered_at.is_some_and(|at| now >= at + REKEY_TIMEOUT) {
            // We answered an initiation but the initiator's confirming data never came (lost,
            // and it has nothing else to send): release what is queued here, which starts a
            // handshake of our own if need be. Waiting REKEY_TIMEOUT first lets a handshake
            // of ours that crossed theirs finish undisturbed.
            peer.answered_at = None;
            flush_queued(peer, transmits, scratch);
        }
        match peer.tunn.update_timers(scratch) {
            TunnResult::WriteToNetwork(datagram) => transmits.extend(peer.transmit(datagram)),
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                peer.connection_expired(peer_id, now, events);
                if peer.wants_recovery(now) {
                    if let TunnResult::WriteToNetwork(init) =
                        peer.tunn.format_handshake_initiation(scratch, false)
                    {
                        transmits.extend(peer.transmit(init));
                    }
                    peer.next_recovery = Some(now + peer.keepalive_interval().max(REKEY_TIMEOUT));
                }
            }
            TunnResult::Err(err) => {
                tracing::debug!(peer = %peer.name, ?err, "wireguard timer error");
            }
            TunnResult::Done => {}
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
        }
    }
}

/// What boringtun made of a received datagram, one case per thing the engine does about it.
enum Opened<'a> {
    /// An authenticated data message without a packet.
    Keepalive,
    /// Taken in with nothing to pass on or answer: a cookie reply to our initiation, which
    /// boringtun keeps for its retry.
    Consumed,
    Refused(WireGuardError),
    /// A cookie reply for the sender of a handshake message: we are under load.
    UnderLoad(&'a [u8]),
    /// Our response to the sender's initiation.
    Answered(&'a [u8]),
    /// The keepalive that confirms the sender's response to our initiation.
    Confirmed(&'a [u8]),
    /// A decrypted IP packet of `len` bytes, written into the caller's buffer.
    Packet {
        len: usize,
        source: IpAddr,
    },
}

impl<'a> Opened<'a> {
    fn from_result(result: TunnResult<'a>, is_data: bool) -> Opened<'a> {
        match result {
            TunnResult::Done if is_data => Opened::Keepalive,
            TunnResult::Done => Opened::Consumed,
            TunnResult::Err(err) => Opened::Refused(err),
            TunnResult::WriteToNetwork(reply) if is_cookie_reply(reply) => Opened::UnderLoad(reply),
            TunnResult::WriteToNetwork(reply) if is_handshake_response(reply) => {
                Opened::Answered(reply)
            }
            TunnResult::WriteToNetwork(reply) => Opened::Confirmed(reply),
            TunnResult::WriteToTunnelV4(packet, source) => Opened::Packet {
                len: packet.len(),
                source: source.into(),
            },
            TunnResult::WriteToTunnelV6(packet, source) => Opened::Packet {
                len: packet.len(),
                source: source.into(),
            },
        }
    }
}

/// Sends what boringtun queued while waiting for a session, one packet per call with an empty
/// datagram. Called once a session is usable: after the keepalive that completes our own
/// handshake, and after any data from the peer (which is what confirms a session we
/// answered). With nothing queued it is a single empty-queue check.
fn flush_queued(peer: &mut Peer, transmits: &mut VecDeque<Transmit>, scratch: &mut [u8]) {
    while let TunnResult::WriteToNetwork(datagram) = peer.tunn.decapsulate(None, &[], scratch) {
        transmits.extend(peer.transmit(datagram));
    }
}

fn is_handshake_response(datagram: &[u8]) -> bool {
    const HANDSHAKE_RESPONSE: u8 = 2;
    datagram.first() == Some(&HANDSHAKE_RESPONSE)
}

fn is_cookie_reply(datagram: &[u8]) -> bool {
    const COOKIE_REPLY: u8 = 3;
    datagram.first() == Some(&COOKIE_REPLY)
}
