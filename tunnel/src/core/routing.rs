//! Outbound routing: which peer's allowed IPs hold a destination (longest prefix wins).

use std::net::IpAddr;

use ipnet::IpNet;

use super::PeerId;

pub(super) struct RoutingTable {
    /// Sorted by prefix length, longest first, so the first match is the most specific. A
    /// linear scan beats a trie for the handful of prefixes a tunnel has.
    routes: Vec<(IpNet, PeerId)>,
}

impl RoutingTable {
    pub(super) fn new(routes: impl IntoIterator<Item = (IpNet, PeerId)>) -> RoutingTable {
        let mut routes: Vec<(IpNet, PeerId)> = routes
            .into_iter()
            .map(|(net, peer)| (net.trunc(), peer))
            .collect();
        // Stable: on equal prefixes the peer listed first wins.
        routes.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        RoutingTable { routes }
    }

    pub(super) fn lookup(&self, destination: IpAddr) -> Option<PeerId> {
        self.routes
            .iter()
            .find(|(net, _)| net.contains(&destination))
            .map(|(_, peer)| *peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_whatever_the_order() {
        let table = RoutingTable::new([
            (net("100.64.0.0/10"), PeerId(0)),
            (net("100.64.0.4/30"), PeerId(1)),
            (net("::/0"), PeerId(2)),
        ]);
        assert_eq!(table.lookup("100.64.0.5".parse().unwrap()), Some(PeerId(1)));
        assert_eq!(table.lookup("100.64.0.1".parse().unwrap()), Some(PeerId(0)));
        assert_eq!(table.lookup("fd00::1".parse().unwrap()), Some(PeerId(2)));
        assert_eq!(table.lookup("192.0.2.1".parse().unwrap()), None);
    }

    #[test]
    fn equal_prefixes_go_to_the_first_peer() {
        let table = RoutingTable::new([
            (net("100.64.0.1/32"), PeerId(3)),
            (net("100.64.0.1/32"), PeerId(4)),
        ]);
        assert_eq!(table.lookup("100.64.0.1".parse().unwrap()), Some(PeerId(3)));
    }
}
