//! Per-peer counters as the driver and the admin endpoints report them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::SystemTime;

/// A snapshot of one peer's counters. Bytes and packets count WireGuard datagrams on the wire
/// (handshakes and keepalives included), as `wg show` does; received ones only once they
/// authenticated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStats {
    pub name: String,
    /// Base64, as `wg` prints it.
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Every [`DropReason`] by its [`DropReason::as_str`] name, zeros included, so metric
    /// series stay stable.
    pub drops: BTreeMap<String, u64>,
}

/// Why the engine dropped a datagram or packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Decrypted, but the inner source address is outside the peer's allowed IPs.
    NotAllowedSource,
    /// Not a WireGuard message: an unknown type or the wrong length for its type.
    Garbage,
    /// A handshake message whose mac1 is wrong: not addressed to this key, or altered.
    BadMac,
    /// A message that failed to decrypt or authenticate with the keys it names (a data
    /// message with a wrong tag, a handshake that does not decrypt).
    DecryptFailed,
    /// A data counter already seen or behind the replay window, or a handshake initiation not
    /// newer than the last one.
    Replay,
    /// Data for a session that no longer exists.
    NoSession,
    /// A handshake response, cookie reply or data message whose receiver index belongs to no
    /// configured peer.
    UnknownIndex,
    /// A handshake initiation from a static key that belongs to no configured peer.
    UnknownPeer,
    /// A handshake response or cookie reply with no matching initiation in flight (duplicate
    /// or late).
    UnexpectedHandshake,
    /// A handshake message answered with a cookie reply because of the handshake rate limit.
    UnderLoad,
    /// Something to send to a peer whose endpoint is not known yet.
    NoEndpoint,
    /// An outbound packet whose destination is in no peer's allowed IPs.
    NoRoute,
    /// An outbound packet that is not IPv4 or IPv6.
    MalformedOutbound,
    /// An outbound packet too large for one UDP datagram.
    TooBig,
}

impl DropReason {
    pub const ALL: [DropReason; 14] = [
        DropReason::NotAllowedSource,
        DropReason::Garbage,
        DropReason::BadMac,
        DropReason::DecryptFailed,
        DropReason::Replay,
        DropReason::NoSession,
        DropReason::UnknownIndex,
        DropReason::UnknownPeer,
        DropReason::UnexpectedHandshake,
        DropReason::UnderLoad,
        DropReason::NoEndpoint,
        DropReason::NoRoute,
        DropReason::MalformedOutbound,
        DropReason::TooBig,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NotAllowedSource => "not_allowed_source",
            DropReason::Garbage => "garbage",
            DropReason::BadMac => "bad_mac",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::Replay => "replay",
            DropReason::NoSession => "no_session",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::UnexpectedHandshake => "unexpected_handshake",
            DropReason::UnderLoad => "under_load",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::NoRoute => "no_route",
            DropReason::MalformedOutbound => "malformed_outbound",
            DropReason::TooBig => "too_big",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// A counter per [`DropReason`]; an array so counting on the packet path is one increment.
#[derive(Debug, Clone, Default)]
pub(super) struct DropCounts([u64; DropReason::ALL.len()]);

impl DropCounts {
    pub(super) fn add(&mut self, reason: DropReason) {
        self.0[reason.slot()] += 1;
    }

    /// Adds `other`'s counts to these.
    pub(super) fn merge(&mut self, other: &DropCounts) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }

    pub(super) fn to_map(&self) -> BTreeMap<String, u64> {
        DropReason::ALL
            .iter()
            .map(|reason| (reason.as_str().to_string(), self.0[reason.slot()]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot_and_name() {
        let mut counts = DropCounts::default();
        for (n, reason) in DropReason::ALL.iter().enumerate() {
            for _ in 0..=n {
                counts.add(*reason);
            }
        }
        let map = counts.to_map();
        assert_eq!(map.len(), DropReason::ALL.len());
        for (n, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(map[reason.as_str()], n as u64 + 1, "{reason:?}");
        }
    }
}
