//! One schema for both daemons' `[tunnel]` section and peer tables, and from it the WireGuard
//! configuration: the keys (private and preshared) are read from their files, each peer
//! routes exactly its tunnel address, the sides differ only in their defaults, and a missing
//! or malformed key stops startup with a message naming the field.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use xpart_daemon::config::Diagnostics;
use xpart_daemon::tunnel_config::{
    check, read_preshared_key_file, tunnel_config, PeerSection, Side, TunnelMode, TunnelSection,
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
    keys::write_private_key_file(dir.join("self.key"), &key).unwrap();
    write_file(&dir, "relay-a.psk", PSK, 0o600);
    let peer_key = PrivateKey::generate().public_key().to_base64();
    let file = parse(&format!(
        r#"
[tunnel]
mode = "userspace"
private_key_file = "self.key"
address = "100.64.0.1/30"

[[peer]]
name = "relay-a"
public_key = "{peer_key}"
endpoint = "127.0.0.1:51820"
tunnel_address = "100.64.0.2"
persistent_keepalive = 10
preshared_key_file = "relay-a.psk"
"#
    ));

    let config = tunnel_config(Side::Agent, &file.tunnel, &file.peer, |p| dir.join(p))
        .unwrap()
        .unwrap();

    assert_eq!(
        config.private_key.public_key().to_base64(),
        key.public_key().to_base64()
    );
    assert_eq!(config.address, "100.64.0.1/30".parse().unwrap());
    assert_eq!(config.mode, Mode::Userspace);
    assert_eq!(config.mtu, 1420);
    assert_eq!(config.listen, None, "the agent binds an ephemeral port");
    assert_eq!(config.peers.len(), 1);
    let peer = &config.peers[0];
    assert_eq!(peer.name, "relay-a");
    assert_eq!(peer.public_key.to_base64(), peer_key);
    assert_eq!(
        peer.endpoint,
        Some(SocketAddr::from(([127, 0, 0, 1], 51820)))
    );
    assert_eq!(peer.allowed_ips, ["100.64.0.2/32".parse().unwrap()]);
    assert_eq!(peer.persistent_keepalive, Some(10));
    assert_eq!(peer.preshared_key, Some([7; 32]));

    // The relay reads the same tables, preshared key included.
    let config = tunnel_config(Side::Relay, &file.tunnel, &file.peer, |p| dir.join(p))
        .unwrap()
        .unwrap();
    assert_eq!(config.peers[0].preshared_key, Some([7; 32]));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn each_side_has_its_own_defaults_for_the_udp_port_and_keepalive() {
    let file = parse(
        r#"
[tunnel]
address = "100.64.0.1/30"

[[peer]]
name = "a"
tunnel_address = "100.64.0.2"
"#,
    );
    assert_eq!(file.tunnel.mode, TunnelMode::Kernel);
    assert_eq!(file.tunnel.udp_listen(Side::Agent), None);
    assert_eq!(
        file.tunnel.udp_listen(Side::Relay),
        Some(SocketAddr::from(([0, 0, 0, 0], 51820)))
    );
    assert_eq!(file.peer[0].keepalive(Side::Agent), Some(25));
    assert_eq!(file.peer[0].keepalive(Side::Relay), None);
    assert_eq!(file.peer[0].service_port(), 8080);

    let file = parse(
        r#"
[tunnel]
listen_port = 51000
bind_address = "127.0.0.1"

[[peer]]
name = "a"
tunnel_address = "100.64.0.2"
persistent_keepalive = 0
"#,
    );
    for side in [Side::Agent, Side::Relay] {
        assert_eq!(
            file.tunnel.udp_listen(side),
            Some(SocketAddr::from(([127, 0, 0, 1], 51000)))
        );
        assert_eq!(file.peer[0].keepalive(side), None, "0 turns keepalives off");
    }
    let file = parse("[tunnel]\nlisten = \"127.0.0.1:7\"\n");
    assert_eq!(
        file.tunnel.udp_listen(Side::Relay),
        Some(SocketAddr::from(([127, 0, 0, 1], 7)))
    );
}

#[test]
fn shared_checks_name_the_field_in_the_daemons_style() {
    let dir = scratch_dir("checks");
    write_file(&dir, "open.psk", PSK, 0o644);
    let file = parse(
        r#"
[tunnel]
listen = "0.0.0.0:51820"
listen_port = 51820
mtu = 1000

[[peer]]
name = "a"
tunnel_address = "100.64.0.2"
preshared_key_file = "open.psk"
service_port = 8080
priority = 1
weight = 2
"#,
    );
    let problems = |side| check_problems(side, &file, |p| dir.join(p));
    assert_eq!(
        problems(Side::Relay),
        [
            "[tunnel].listen",
            "[tunnel].mtu",
            "[[peer]][0] (a).preshared_key_file",
            "[[peer]][0] (a).service_port",
            "[[peer]][0] (a).priority",
            "[[peer]][0] (a).weight"
        ]
    );
    assert_eq!(
        problems(Side::Agent),
        [
            "[tunnel].listen",
            "[tunnel].mtu",
            "[[peer]][0] (a).preshared_key_file"
        ],
        "service_port, priority and weight belong in the agent's [[relay]]"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_key_file_and_bad_peer_keys_name_the_field() {
    let dir = scratch_dir("errors");
    keys::write_private_key_file(dir.join("self.key"), &PrivateKey::generate()).unwrap();
    let build = |text: &str| {
        let file = parse(text);
        tunnel_config(Side::Relay, &file.tunnel, &file.peer, |p| dir.join(p))
            .unwrap_err()
            .to_string()
    };
    let tunnel = "[tunnel]\nmode = \"userspace\"\naddress = \"100.64.0.1/30\"\n";

    assert_eq!(build(tunnel), "[tunnel].private_key_file is missing");
    let error = build(&format!("{tunnel}private_key_file = \"absent.key\"\n"));
    assert!(error.starts_with("[tunnel].private_key_file: "), "{error}");

    let with_key = format!("{tunnel}private_key_file = \"self.key\"\n");
    let error = build(&format!(
        "{with_key}[[peer]]\nname = \"agent-a\"\ntunnel_address = \"100.64.0.2\"\n"
    ));
    assert_eq!(error, "peer agent-a: public_key is missing");
    let error = build(&format!(
        "{with_key}[[peer]]\nname = \"agent-b\"\npublic_key = \"nope\"\ntunnel_address = \"100.64.0.2\"\n"
    ));
    assert!(error.starts_with("peer agent-b: public_key: "), "{error}");
    let peer_key = PrivateKey::generate().public_key().to_base64();
    let error = build(&format!(
        "{with_key}[[peer]]\nname = \"agent-c\"\npublic_key = \"{peer_key}\"\ntunnel_address = \"100.64.0.2\"\npreshared_key_file = \"absent.psk\"\n"
    ));
    assert!(
        error.starts_with("peer agent-c: preshared_key_file: "),
        "{error}"
    );

    let host = parse("[tunnel]\nmode = \"host\"\n");
    assert!(
        tunnel_config(Side::Agent, &host.tunnel, &host.peer, |p| dir.join(p))
            .unwrap()
            .is_none(),
        "host mode has no WireGuard of its own"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn preshared_key_open_to_group_or_others_is_refused_like_a_private_key() {
    let dir = scratch_dir("psk-mode");
    let psk = write_file(&dir, "relay-a.psk", PSK, 0o644);
    let private = format!("{}\n", PrivateKey::generate().to_base64());
    let key = write_file(&dir, "self.key", &private, 0o644);

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

#[test]
fn inner_tls_needs_its_three_files_and_peer_names_that_fit_a_certificate() {
    let problems = problems_in(
        Side::Agent,
        r#"
[tunnel]
inner_tls = true

[[peer]]
name = "Relay.A"
tunnel_address = "100.64.0.2"
"#,
    );
    assert_eq!(
        problems,
        [
            "[tunnel].inner_tls_cert_file",
            "[tunnel].inner_tls_key_file",
            "[tunnel].inner_tls_ca_file",
            "[[peer]][0] (Relay.A).name",
        ]
    );
}

#[test]
fn inner_tls_files_without_inner_tls_are_refused_rather_than_ignored() {
    let problems = problems_in(
        Side::Relay,
        r#"
[tunnel]
inner_tls_cert_file = "relay.pem"
"#,
    );
    assert!(
        problems.contains(&"[tunnel].inner_tls".to_string()),
        "{problems:?}"
    );
}

#[test]
fn inner_tls_is_required_exactly_in_a_fips_build() {
    let problems = problems_in(Side::Relay, "[tunnel]\n");
    let required = problems.contains(&"[tunnel].inner_tls".to_string());
    assert_eq!(required, xpart_daemon::crypto::FIPS_MODE, "{problems:?}");
}

/// The fields `check` reports for `file` on `side`, its files resolved with `resolve`.
fn check_problems(side: Side, file: &File, resolve: impl Fn(&Path) -> PathBuf) -> Vec<String> {
    let mut diagnostics = Diagnostics::new("x.toml");
    check(
        side,
        &file.tunnel,
        &file.peer,
        |i, peer, field| format!("[[peer]][{i}] ({}).{field}", peer.name),
        resolve,
        &mut diagnostics,
    );
    diagnostics
        .problems()
        .iter()
        .map(|p| p.field.clone())
        .collect()
}

/// The fields `check` reports for the tables in `text`, its files taken as named.
fn problems_in(side: Side, text: &str) -> Vec<String> {
    check_problems(side, &parse(text), |path| path.to_path_buf())
}

/// A daemon's tunnel tables; `[[peer]]` stands for `[[relay]]` or `[[agent]]`.
#[derive(Deserialize)]
struct File {
    tunnel: TunnelSection,
    #[serde(default)]
    peer: Vec<PeerSection>,
}

fn parse(text: &str) -> File {
    toml::from_str(text).unwrap_or_else(|err| panic!("{err}\n{text}"))
}

/// A preshared key file's contents: 32 bytes of 7s.
const PSK: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n";

/// Writes `contents` to `dir/name` with permissions `mode`.
fn write_file(dir: &Path, name: &str, contents: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write the file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
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
