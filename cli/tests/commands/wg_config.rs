use std::process::Command;

use crate::configs::relay_toml;
use crate::support::{run, tool_available, xpart, Scratch};

fn agent_toml(relay_a: &str, relay_b: &str) -> String {
    format!(
        r#"
[tunnel]
private_key_file = "keys/agent.key"
address = "100.64.0.1/30"
mode = "kernel"
listen = "0.0.0.0:51821"
mtu = 1380

[[relay]]
name = "relay-a"
public_key = "{relay_a}"
endpoint = "203.0.113.10:51820"
tunnel_address = "100.64.0.2"

[[relay]]
name = "relay-b"
public_key = "{relay_b}"
endpoint = "198.51.100.20:51820"
tunnel_address = "100.64.0.6"
persistent_keepalive = 10

[front]
listen = "10.0.1.10:443"
cert_file = "front.pem"
key_file = "front.key"
"#
    )
}

fn public_key(dir: &Scratch, name: &str) -> String {
    xpart(&["keygen", "--out", &dir.arg(name)])
        .ok()
        .stdout
        .trim()
        .to_string()
}

#[test]
fn agent_side_renders_interface_and_every_relay_peer() {
    let dir = Scratch::new();
    std::fs::create_dir(dir.path("keys")).unwrap();
    public_key(&dir, "keys/agent.key");
    let relay_a = public_key(&dir, "a.key");
    let relay_b = public_key(&dir, "b.key");
    dir.write("agent.toml", &agent_toml(&relay_a, &relay_b));
    let out = xpart(&["wg-config", &dir.arg("agent.toml")]).ok().stdout;
    let key_path = dir.path("keys/agent.key").display().to_string();
    let expected = format!(
        "[Interface]\nAddress = 100.64.0.1/30\nListenPort = 51821\nMTU = 1380\nPostUp = wg set %i private-key {key_path}\n\n\
         # relay-a\n[Peer]\nPublicKey = {relay_a}\nAllowedIPs = 100.64.0.2/32\nEndpoint = 203.0.113.10:51820\nPersistentKeepalive = 25\n\n\
         # relay-b\n[Peer]\nPublicKey = {relay_b}\nAllowedIPs = 100.64.0.6/32\nEndpoint = 198.51.100.20:51820\nPersistentKeepalive = 10\n"
    );
    assert!(
        out.ends_with(&expected),
        "got:\n{out}\nexpected to end with:\n{expected}"
    );
    let key = std::fs::read_to_string(dir.path("keys/agent.key")).unwrap();
    assert!(
        !out.contains(key.trim()),
        "the private key stays out of the output by default"
    );
}

/// Writes keys and a kernel-mode relay.toml with `tunnel` added to its [tunnel] section into
/// `dir`; returns the agent's public key.
fn write_relay(dir: &Scratch, tunnel: &str) -> String {
    let agent = public_key(dir, "agent.key");
    public_key(dir, "relay.key");
    let address = "address = \"100.64.0.2/30\"\n";
    let toml = relay_toml("kernel", "relay.key", &agent).replacen(
        address,
        &format!("{address}{tunnel}"),
        1,
    );
    dir.write("relay.toml", &toml);
    agent
}

/// A relay.toml in `dir` rendered with `--include-private-key`: the agent's public key and
/// the output.
fn relay_with_key_inlined(dir: &Scratch) -> (String, String) {
    let agent = write_relay(dir, "");
    let out = xpart(&["wg-config", &dir.arg("relay.toml"), "--include-private-key"])
        .ok()
        .stdout;
    (agent, out)
}

#[test]
fn relay_side_with_the_private_key_inlined() {
    let dir = Scratch::new();
    let (agent, out) = relay_with_key_inlined(&dir);
    let key = std::fs::read_to_string(dir.path("relay.key")).unwrap();
    assert!(
        out.contains(&format!("PrivateKey = {}\n", key.trim())),
        "{out}"
    );
    assert!(out.contains("ListenPort = 51820\n"), "{out}");
    assert!(
        out.contains(&format!(
            "PublicKey = {agent}\nAllowedIPs = 100.64.0.1/32\n"
        )),
        "{out}"
    );
    assert!(
        !out.contains("Endpoint"),
        "the relay learns the agent's endpoint: {out}"
    );
}

#[test]
fn output_is_accepted_by_wg_quick() {
    if !tool_available("wg-quick") || !tool_available("wg") {
        eprintln!("skipped: wg-quick/wg (wireguard-tools) not installed");
        return;
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: wg-quick strip re-executes itself as root");
        return;
    }
    let dir = Scratch::new();
    let (agent, out) = relay_with_key_inlined(&dir);
    let conf = dir.write("xpt0.conf", &out);
    let conf = conf.display().to_string();
    let stripped = run(Command::new("wg-quick"), &["strip", &conf], "")
        .ok()
        .stdout;
    assert!(
        stripped.contains(&format!("PublicKey = {agent}")),
        "{stripped}"
    );
    assert!(
        !stripped.contains("Address"),
        "wg-quick-only keys are stripped: {stripped}"
    );
}

#[test]
fn bad_files_are_refused_with_the_reason() {
    let dir = Scratch::new();
    let missing = xpart(&["wg-config", &dir.arg("none.toml")]).fails_with(2);
    missing.complains("no such file");

    dir.write("neither.toml", "[tunnel]\naddress = \"100.64.0.1/30\"\n");
    let neither = xpart(&["wg-config", &dir.arg("neither.toml")]).fails_with(2);
    neither.complains("[[relay]]");

    dir.write(
        "badkey.toml",
        &relay_toml("kernel", "/etc/xpart/relay.key", "not-a-key"),
    );
    let bad_key = xpart(&["wg-config", &dir.arg("badkey.toml")]).fails_with(2);
    bad_key.complains("[[agent]][0].public_key");

    dir.write(
        "host.toml",
        "[tunnel]\nmode = \"host\"\n[[agent]]\nname = \"a\"\ntunnel_address = \"127.0.0.1\"\n",
    );
    let host = xpart(&["wg-config", &dir.arg("host.toml")]).fails_with(2);
    host.complains("without WireGuard");

    dir.write("syntax.toml", "[tunnel\n");
    xpart(&["wg-config", &dir.arg("syntax.toml")]).fails_with(2);
}

#[test]
fn the_listen_port_and_mtu_are_the_ones_the_daemon_uses() {
    let dir = Scratch::new();
    write_relay(&dir, "bind_address = \"0.0.0.0\"\nlisten_port = 51999\n");
    let out = xpart(&["wg-config", &dir.arg("relay.toml")]).ok().stdout;
    assert!(out.contains("ListenPort = 51999\n"), "{out}");
    // No `mtu` in the file: the daemon's default, which wg-quick would not guess.
    assert!(out.contains("MTU = 1420\n"), "{out}");
}
