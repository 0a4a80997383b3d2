//! Two tunnels in userspace mode on 127.0.0.1 carrying TCP both ways through WireGuard.

// Helpers outside #[test] functions unwrap too: a panic there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xpart_tunnel::{Mode, PeerConfig, PeerStats, PrivateKey, TcpListener, Tunnel, TunnelConfig};

const TRANSFER_BYTES: usize = 4 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_crosses_the_tunnel_both_ways_and_counts_bytes() {
    let (a, b) = tunnel_pair().await;
    let a_ip: IpAddr = "100.64.0.1".parse().unwrap();
    let b_ip: IpAddr = "100.64.0.2".parse().unwrap();

    // A listens, B connects: B's payload must arrive at A intact, and A's reply back at B.
    let listener = listen(&a, SocketAddr::new(a_ip, 8080)).await;
    let server = tokio::spawn(async move {
        let (mut conn, peer) = listener.accept().await.unwrap();
        let mut received = vec![0u8; TRANSFER_BYTES];
        conn.read_exact(&mut received).await.unwrap();
        conn.write_all(&pattern(TRANSFER_BYTES, 7)).await.unwrap();
        conn.shutdown().await.unwrap();
        (peer, received)
    });
    let mut conn = within(b.network().connect(SocketAddr::new(a_ip, 8080)))
        .await
        .expect("connect through the tunnel");
    assert_eq!(conn.peer_addr(), SocketAddr::new(a_ip, 8080));
    assert_eq!(conn.local_addr().ip(), b_ip);
    conn.write_all(&pattern(TRANSFER_BYTES, 3)).await.unwrap();
    let mut reply = Vec::new();
    within(conn.read_to_end(&mut reply)).await.unwrap();
    let (peer_seen_by_a, received) = within(server).await.unwrap();

    assert_eq!(peer_seen_by_a.ip(), b_ip, "A sees B's tunnel address");
    assert!(
        received == pattern(TRANSFER_BYTES, 3),
        "payload B->A corrupted"
    );
    assert!(
        reply == pattern(TRANSFER_BYTES, 7),
        "payload A->B corrupted"
    );

    // The other direction of connection setup: B listens, A connects.
    let listener = listen(&b, SocketAddr::new(b_ip, 9090)).await;
    let echo = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            conn.write_all(&buf[..n]).await.unwrap();
        }
        conn.shutdown().await.unwrap();
    });
    let conn = within(a.network().connect(SocketAddr::new(b_ip, 9090)))
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(conn);
    let sent = pattern(TRANSFER_BYTES / 4, 11);
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            wr.write_all(&sent).await.unwrap();
            wr.shutdown().await.unwrap();
        })
    };
    let mut echoed = Vec::new();
    within(rd.read_to_end(&mut echoed)).await.unwrap();
    within(writer).await.unwrap();
    within(echo).await.unwrap();
    assert!(echoed == sent, "echo through A->B connection corrupted");

    let a_stats = single(a.peer_stats());
    let b_stats = single(b.peer_stats());
    assert_eq!(a_stats.name, "b");
    assert_eq!(b_stats.name, "a");
    let min_bytes = (TRANSFER_BYTES + TRANSFER_BYTES / 4) as u64;
    for stats in [&a_stats, &b_stats] {
        for (name, bytes) in [("rx_bytes", stats.rx_bytes), ("tx_bytes", stats.tx_bytes)] {
            assert!(
                bytes >= min_bytes,
                "{name} {bytes} < {min_bytes}: {stats:?}"
            );
        }
        assert!(
            stats.rx_packets > 100 && stats.tx_packets > 100,
            "{stats:?}"
        );
        assert!(stats.last_handshake.is_some(), "{stats:?}");
    }
    assert_eq!(
        a_stats.endpoint,
        Some(b.local_udp_addr()),
        "A learned B's endpoint from its datagrams"
    );

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_listener_accepts_more_connections_than_its_backlog_at_once() {
    let (a, b) = tunnel_pair().await;
    let listener = listen(&a, "100.64.0.1:7000".parse().unwrap()).await;
    let server = tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4];
                conn.read_exact(&mut buf).await.unwrap();
                conn.write_all(&buf).await.unwrap();
            });
        }
    });
    let clients: Vec<_> = (0..20u32)
        .map(|i| {
            let network = b.network();
            tokio::spawn(async move {
                let mut conn = network
                    .connect("100.64.0.1:7000".parse().unwrap())
                    .await
                    .unwrap();
                conn.write_all(&i.to_be_bytes()).await.unwrap();
                let mut buf = [0u8; 4];
                conn.read_exact(&mut buf).await.unwrap();
                u32::from_be_bytes(buf)
            })
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        assert_eq!(within(client).await.unwrap(), i as u32);
    }
    server.abort();
}

#[tokio::test]
async fn connecting_to_a_closed_port_is_refused_promptly() {
    let (a, b) = tunnel_pair().await;
    let started = std::time::Instant::now();
    let closed_port = "100.64.0.1:4444".parse().unwrap();
    let err = b.network().connect(closed_port).await.unwrap_err();
    let refused = std::io::ErrorKind::ConnectionRefused;
    assert_eq!(err.kind(), refused, "nothing listens on A:4444: {err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(a);
}

#[tokio::test]
async fn listening_on_an_address_that_is_not_the_tunnels_fails() {
    let (a, _b) = tunnel_pair().await;
    let theirs = "100.64.0.2:80".parse().unwrap();
    let err = a.network().listen(theirs).await.unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::AddrNotAvailable,
        "100.64.0.2 belongs to the other side: {err}"
    );
}

/// A (100.64.0.1, fixed endpoint known to B) and B (100.64.0.2, knows A's endpoint; A learns B's).
async fn tunnel_pair() -> (Tunnel, Tunnel) {
    let key_a = PrivateKey::generate();
    let key_b = PrivateKey::generate();
    let b_peer = peer("b", &key_b, None, "100.64.0.2/32", None);
    let a = start(key_a.clone(), "100.64.0.1/30", b_peer).await;
    let a_peer = peer(
        "a",
        &key_a,
        Some(a.local_udp_addr()),
        "100.64.0.1/32",
        Some(25),
    );
    let b = start(key_b, "100.64.0.2/30", a_peer).await;
    (a, b)
}

/// A userspace tunnel on 127.0.0.1 with one peer.
async fn start(private_key: PrivateKey, address: &str, peer: PeerConfig) -> Tunnel {
    Tunnel::start(TunnelConfig {
        private_key,
        address: address.parse().unwrap(),
        mode: Mode::Userspace,
        listen: Some("127.0.0.1:0".parse().unwrap()),
        mtu: xpart_tunnel::DEFAULT_MTU,
        interface_name: None,
        peers: vec![peer],
    })
    .await
    .unwrap_or_else(|err| panic!("start {address}: {err}"))
}

fn peer(
    name: &str,
    key: &PrivateKey,
    endpoint: Option<SocketAddr>,
    allowed_ip: &str,
    persistent_keepalive: Option<u16>,
) -> PeerConfig {
    PeerConfig {
        name: name.into(),
        public_key: key.public_key(),
        endpoint,
        allowed_ips: vec![allowed_ip.parse().unwrap()],
        persistent_keepalive,
        preshared_key: None,
    }
}

async fn listen(tunnel: &Tunnel, addr: SocketAddr) -> TcpListener {
    tunnel.network().listen(addr).await.unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

fn single(mut stats: Vec<PeerStats>) -> PeerStats {
    assert_eq!(stats.len(), 1, "{stats:?}");
    stats.remove(0)
}

async fn within<F: std::future::IntoFuture>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .expect("took longer than 30 s")
}
