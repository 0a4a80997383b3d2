//! `Tunnel::start` refuses bad configuration with errors that say what to fix.

// Helpers outside #[test] functions unwrap too: a panic there is a failed test.
#![allow(clippy::unwrap_used)]

use xpart_tunnel::{Error, Mode, PeerConfig, PrivateKey, Tunnel, TunnelConfig};

fn config() -> TunnelConfig {
    TunnelConfig {
        private_key: PrivateKey::generate(),
        address: "100.64.0.1/30".parse().unwrap(),
        mode: Mode::Userspace,
        listen: Some("127.0.0.1:0".parse().unwrap()),
        mtu: xpart_tunnel::DEFAULT_MTU,
        interface_name: None,
        peers: vec![peer("relay-a")],
    }
}

fn peer(name: &str) -> PeerConfig {
    PeerConfig {
        name: name.into(),
        public_key: PrivateKey::generate().public_key(),
        endpoint: None,
        allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
        persistent_keepalive: None,
        preshared_key: None,
    }
}

#[tokio::test]
async fn an_mtu_below_the_ip_minimum_is_refused() {
    let err = Tunnel::start(TunnelConfig {
        mtu: 500,
        ..config()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("mtu 500"), "{err}");
}

#[tokio::test]
async fn duplicate_peer_names_are_refused() {
    let mut config = config();
    config.peers.push(peer("relay-a"));
    let err = Tunnel::start(config).await.unwrap_err();
    assert!(err.to_string().contains("\"relay-a\""), "{err}");
}

#[tokio::test]
async fn a_udp_port_in_use_names_the_address() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = Tunnel::start(TunnelConfig {
        listen: Some(addr),
        ..config()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, Error::UdpBind { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[tokio::test]
async fn a_bad_kernel_interface_name_is_refused_before_touching_the_host() {
    let config = TunnelConfig {
        mode: Mode::Kernel,
        interface_name: Some("this-name-is-too-long".into()),
        ..config()
    };
    let err = Tunnel::start(config).await.unwrap_err();
    assert!(err.to_string().contains("interface_name"), "{err}");
}
