//! One peer's state around its `Tunn`: where it is, what it may send, and its counters.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::Tunn;
use ipnet::IpNet;

use super::clock::Clock;
use super::stats::{DropCounts, DropReason, PeerStats};
use super::{Event, PeerConfig, PeerId, Transmit};
use crate::keys::PublicKey;

pub(super) struct Peer {
    pub(super) name: String,
    public_key: PublicKey,
    pub(super) tunn: Tunn,
    pub(super) endpoint: Option<SocketAddr>,
    allowed_ips: Vec<IpNet>,
    pub(super) keepalive: Option<u16>,
    last_handshake: Option<Instant>,
    /// Set by `ConnectionExpired`, cleared by the next handshake: one event per outage.
    expired: bool,
    /// When an expired keepalive peer next re-initiates.
    pub(super) next_recovery: Option<Instant>,
    /// When we last answered an initiation whose session the peer has not yet confirmed
    /// with data; packets queued meanwhile wait for that confirmation.
    pub(super) answered_at: Option<Instant>,
    rx_bytes: u64,
    rx_packets: u64,
    tx_bytes: u64,
    tx_packets: u64,
    pub(super) drops: DropCounts,
}

impl Peer {
    pub(super) fn new(spec: PeerConfig, tunn: Tunn) -> Peer {
        Peer {
            name: spec.name,
            public_key: spec.public_key,
            tunn,
            endpoint: spec.endpoint,
            allowed_ips: spec.allowed_ips,
            keepalive: spec.persistent_keepalive.filter(|seconds| *seconds > 0),
            last_handshake: None,
            expired: false,
            next_recovery: None,
            answered_at: None,
            rx_bytes: 0,
            rx_packets: 0,
            tx_bytes: 0,
            tx_packets: 0,
            drops: DropCounts::default(),
        }
    }

    /// Counts a datagram that decrypted or verified as this peer's, and follows the peer to
    /// its source address (roaming).
    pub(super) fn authenticated(
        &mut self,
        id: PeerId,
        from: SocketAddr,
        len: usize,
        events: &mut std::collections::VecDeque<Event>,
    ) {
        self.rx_packets += 1;
        self.rx_bytes += len as u64;
        if self.endpoint != Some(from) {
            tracing::debug!(peer = %self.name, endpoint = %from, "peer endpoint changed");
            self.endpoint = Some(from);
            events.push_back(Event::EndpointChanged {
                peer: id,
                endpoint: from,
            });
        }
    }

    /// Cryptokey routing: a decrypted packet is passed on only if this peer may use its source
    /// address. Returns the packet length to deliver.
    pub(super) fn admit(&mut self, source: IpAddr, len: usize) -> Option<usize> {
        if !self.allowed_ips.iter().any(|net| net.contains(&source)) {
            self.drops.add(DropReason::NotAllowedSource);
            return None;
        }
        Some(len)
    }

    /// Where a datagram of `len` bytes for this peer goes, counted as sent; `None`, counted as
    /// a drop, while the endpoint is unknown.
    pub(super) fn send_to(&mut self, len: usize) -> Option<SocketAddr> {
        let Some(endpoint) = self.endpoint else {
            self.drops.add(DropReason::NoEndpoint);
            return None;
        };
        self.tx_packets += 1;
        self.tx_bytes += len as u64;
        Some(endpoint)
    }

    /// A datagram boringtun wrote into scratch space, copied out for the queue.
    pub(super) fn transmit(&mut self, datagram: &[u8]) -> Option<Transmit> {
        let dst = self.send_to(datagram.len())?;
        Some(Transmit::new(dst, datagram))
    }

    pub(super) fn handshake_completed(
        &mut self,
        id: PeerId,
        now: Instant,
        events: &mut std::collections::VecDeque<Event>,
    ) {
        tracing::debug!(peer = %self.name, "wireguard handshake completed");
        self.last_handshake = Some(now);
        self.expired = false;
        self.next_recovery = None;
        events.push_back(Event::HandshakeCompleted { peer: id });
    }

    pub(super) fn connection_expired(
        &mut self,
        id: PeerId,
        now: Instant,
        events: &mut std::collections::VecDeque<Event>,
    ) {
        if self.expired {
            return;
        }
        self.expired = true;
        if self.keepalive.is_some() && self.next_recovery.is_none() {
            self.next_recovery = Some(now + self.keepalive_interval());
        }
        if self.last_handshake.is_some() {
            tracing::info!(peer = %self.name, "wireguard connection expired");
            events.push_back(Event::ConnectionExpired { peer: id });
        }
    }

    /// boringtun stays silent after `ConnectionExpired` until a packet is sent or an
    /// initiation arrives; a peer configured to stay connected keeps knocking instead.
    pub(super) fn wants_recovery(&self, now: Instant) -> bool {
        self.keepalive.is_some()
            && self.endpoint.is_some()
            && self.next_recovery.is_some_and(|at| now >= at)
    }

    pub(super) fn keepalive_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.keepalive.unwrap_or(0)))
    }

    pub(super) fn stats(&self, clock: &Clock) -> PeerStats {
        PeerStats {
            name: self.name.clone(),
            public_key: self.public_key.to_base64(),
            endpoint: self.endpoint,
            last_handshake: self.last_handshake.map(|at| clock.wall_time(at)),
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_bytes,
            rx_packets: self.rx_packets,
            tx_packets: self.tx_packets,
            drops: self.drops.to_map(),
        }
    }
}

/// Why boringtun refused a datagram, in the terms the statistics use.
pub(super) fn error_reason(error: &WireGuardError) -> DropReason {
    match error {
        WireGuardError::DuplicateCounter => DropReason::Replay,
        WireGuardError::InvalidCounter => DropReason::Replay,
        WireGuardError::WrongTai64nTimestamp => DropReason::Replay,
        WireGuardError::NoCurrentSession => DropReason::NoSession,
        WireGuardError::WrongIndex => DropReason::NoSession,
        WireGuardError::UnexpectedPacket => DropReason::UnexpectedHandshake,
        WireGuardError::UnderLoad => DropReason::UnderLoad,
        WireGuardError::DestinationBufferTooSmall => DropReason::Garbage,
        WireGuardError::IncorrectPacketLength => DropReason::Garbage,
        WireGuardError::WrongPacketType => DropReason::Garbage,
        WireGuardError::WrongKey => DropReason::DecryptFailed,
        WireGuardError::InvalidTai64nTimestamp => DropReason::DecryptFailed,
        WireGuardError::InvalidMac => DropReason::BadMac,
        WireGuardError::InvalidAeadTag => DropReason::DecryptFailed,
        WireGuardError::InvalidPacket => DropReason::Garbage,
        WireGuardError::LockFailed => DropReason::Garbage,
        WireGuardError::ConnectionExpired => DropReason::NoSession,
    }
}
