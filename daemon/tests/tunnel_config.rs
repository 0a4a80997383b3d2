//! From a daemon's `[tunnel]` settings and peer tables to the WireGuard configuration: the
//! key is read from its file, each peer routes exactly its tunnel address, and a missing or
//! malformed key stops startup with a message naming the field.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use std::os::unix::fs::PermissionsExt;

use xpart_daemon::tunnel_config::{
    read_preshared_key_file, tunnel_config, LocalSide, PeerTable, TunnelMode,
};
use xpart_tunnel::{keys, Mode, PrivateKey};

#[test]
fn modes_map_onto_wireguard_backends_and_host_has_none() {
    assert_eq!(TunnelMode::Kernel.wireguard(), Some(Mode::Kernel));
    assert_eq!(TunnelMode::Userspace.wireguard(), Some(Mode::Userspace));
    assert_eq!(TunnelMode::Host.wireguard(), None);
}

#[test]
fn builds_one_peer_per_table_routing_its_tunnel_address() {
    let dir = scratch_dir("peers");
    let key = PrivateKey::generate();
    let key_file = dir.join("self.key");
    keys::write_private_key_file(&key_file, &key).unwrap();
    let peer_key = PrivateKey::generate().public_key().to_base64();
    let endpoint = SocketAddr::from(([127, 0, 0, 1], 51820));

    let config = tunnel_config(
        local_side(Some(key_file)),
        [PeerTable {
            name: "relay-a",
            public_key: Some(&peer_key),
            endpoint: Some(endpoint),
            tunnel_address: IpAddr::from([100, 64, 0, 2]),
            persistent_keepalive: Some(25),
            preshared_key: Some([7; 32]),
        }],
    )
    .unwrap();

    assert_eq!(
        config.private_key.public_key().to_base64(),
        key.public_key().to_base64()
    );
    assert_eq!(config.address, "100.64.0.1/30".parse().unwrap());
    assert_eq!(config.mode, Mode::Userspace);
    assert_eq!(config.mtu, 1420);
    assert_eq!(config.peers.len(), 1);
    let peer = &config.peers[0];
    assert_eq!(peer.name, "relay-a");
    assert_eq!(peer.public_key.to_base64(), peer_key);
    assert_eq!(peer.endpoint, Some(endpoint));
    assert_eq!(peer.allowed_ips, ["100.64.0.2/32".parse().unwrap()]);
    assert_eq!(peer.persistent_keepalive, Some(25));
    assert_eq!(peer.preshared_key, Some([7; 32]));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_key_file_and_bad_peer_keys_name_the_field() {
    let dir = scratch_dir("errors");
    let key_file = dir.join("self.key");
    keys::write_private_key_file(&key_file, &PrivateKey::generate()).unwrap();

    let error = tunnel_config(local_side(None), []).unwrap_err();
    assert_eq!(error.to_string(), "[tunnel].private_key_file is missing");

    let error = tunnel_config(local_side(Some(dir.join("absent.key"))), []).unwrap_err();
    assert!(
        error.to_string().starts_with("[tunnel].private_key_file: "),
        "{error}"
    );

    let error =
        tunnel_config(local_side(Some(key_file.clone())), [peer("agent-a", None)]).unwrap_err();
    assert_eq!(error.to_string(), "peer agent-a: public_key is missing");

    let error =
        tunnel_config(local_side(Some(key_file)), [peer("agent-b", Some("nope"))]).unwrap_err();
    assert!(
        error.to_string().starts_with("peer agent-b: public_key: "),
        "{error}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn preshared_key_open_to_group_or_others_is_refused_like_a_private_key() {
    let dir = scratch_dir("psk-mode");
    let psk = dir.join("relay-a.psk");
    std::fs::write(&psk, "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n").unwrap();
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let key = dir.join("self.key");
    std::fs::write(&key, format!("{}\n", PrivateKey::generate().to_base64())).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();

    let psk_error = read_preshared_key_file(&psk).unwrap_err().to_string();
    let key_error = keys::read_private_key_file(&key).unwrap_err().to_string();
    assert_eq!(
        psk_error,
        format!(
            "{}: private key file is accessible by group or others (mode 0644) — fix: chmod 600 {}",
            psk.display(),
            psk.display()
        )
    );
    assert_eq!(
        psk_error.replace(&psk.display().to_string(), "FILE"),
        key_error.replace(&key.display().to_string(), "FILE"),
        "the same message as a WireGuard private key"
    );

    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(read_preshared_key_file(&psk).unwrap(), [7; 32]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn malformed_preshared_key_names_the_file_and_the_fix() {
    let dir = scratch_dir("psk-bad");
    let psk = dir.join("short.psk");
    for (contents, reason) in [("AAAA\n", "32 bytes"), ("not base64!\n", "not base64")] {
        std::fs::write(&psk, contents).unwrap();
        std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
        let error = read_preshared_key_file(&psk).unwrap_err().to_string();
        assert!(error.starts_with(&psk.display().to_string()), "{error}");
        assert!(error.contains(reason), "{error}");
        assert!(error.contains("wg genpsk"), "{error}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

fn local_side(private_key_file: Option<PathBuf>) -> LocalSide {
    LocalSide {
        mode: Mode::Userspace,
        private_key_file,
        address: Some("100.64.0.1/30".parse().expect("a CIDR")),
        listen: None,
        mtu: xpart_daemon::tunnel_config::default_mtu(),
        interface_name: None,
    }
}

fn peer<'a>(name: &'a str, public_key: Option<&'a str>) -> PeerTable<'a> {
    PeerTable {
        name,
        public_key,
        endpoint: None,
        tunnel_address: IpAddr::from([100, 64, 0, 2]),
        persistent_keepalive: None,
        preshared_key: None,
    }
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "xpart-daemon-tunnel-config-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}
