//! `xpart wg-config`: one side's tunnel from agent.toml or relay.toml as a wg-quick file,
//! so `wg-quick up` (kernel WireGuard or wireguard-go) can stand in for that side while
//! debugging. Only the tunnel sections are read; the rest of the file is not validated here
//! (`xpart config check` does that).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use ipnet::IpNet;
use serde::Deserialize;
use xpart_daemon::tunnel_config::{PeerSection, Side, TunnelSection};
use xpart_tunnel::PublicKey;

use crate::{files, Error};

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  xpart wg-config /etc/xpart/agent.toml > xpart0.conf && wg-quick up ./xpart0.conf
  xpart wg-config relay.toml --include-private-key > /etc/wireguard/xpart0.conf

By default the private key stays in its file: the output loads it with
`PostUp = wg set %i private-key FILE`, so the printed config holds no secret.")]
pub struct WgConfigArgs {
    /// agent.toml or relay.toml.
    #[arg(value_name = "FILE")]
    config: PathBuf,
    /// Put the private key itself in [Interface] PrivateKey (the output becomes a secret).
    #[arg(long)]
    include_private_key: bool,
}

/// The tunnel-related parts of either daemon's file, in the daemons' own schema; other
/// sections are ignored.
#[derive(Debug, Deserialize)]
struct TunnelFile {
    tunnel: TunnelSection,
    #[serde(default)]
    relay: Vec<PeerSection>,
    #[serde(default)]
    agent: Vec<PeerSection>,
}

pub fn run(args: WgConfigArgs) -> Result<ExitCode, Error> {
    let text = files::read_text(&args.config, "an agent.toml or relay.toml")?;
    let file: TunnelFile = toml::from_str(&text).map_err(|err| {
        Error::file(
            &args.config,
            format!("cannot read the tunnel sections: {err}"),
        )
    })?;
    let rendered = render(&file, &args.config, args.include_private_key)?;
    print!("{rendered}");
    Ok(ExitCode::SUCCESS)
}

fn render(file: &TunnelFile, path: &Path, include_private_key: bool) -> Result<String, Error> {
    let side = match (file.relay.is_empty(), file.agent.is_empty()) {
        (false, true) => Side::Agent,
        (true, false) => Side::Relay,
        _ => {
            return Err(Error::file(
                path,
                "needs [[relay]] peers (an agent.toml) or [[agent]] peers (a relay.toml), not both or neither",
            ))
        }
    };
    let tunnel = &file.tunnel;
    if tunnel.mode.wireguard().is_none() {
        return Err(Error::file(
            path,
            "[tunnel].mode = \"host\" runs without WireGuard; there is no tunnel to render",
        ));
    }
    let Some(address) = tunnel.address else {
        return Err(Error::file(
            path,
            "[tunnel].address is missing (e.g. \"100.64.0.2/30\")",
        ));
    };
    let Some(key_file) = &tunnel.private_key_file else {
        return Err(Error::file(path, "[tunnel].private_key_file is missing"));
    };
    let key_file = resolve(path, key_file);

    let mut out = String::new();
    let label = match side {
        Side::Agent => "agent",
        Side::Relay => "relay",
    };
    // Writing to a String cannot fail; the results below are ignored for that reason.
    let _ = writeln!(
        out,
        "# wg-quick config for the {label} side of {}",
        path.display()
    );
    let _ = writeln!(out, "[Interface]");
    let _ = writeln!(out, "Address = {address}");
    let listen_port = tunnel.udp_listen(side).map(|listen| listen.port());
    if let Some(port) = listen_port.filter(|port| *port != 0) {
        let _ = writeln!(out, "ListenPort = {port}");
    }
    let _ = writeln!(out, "MTU = {}", tunnel.mtu);
    if include_private_key {
        let key = xpart_tunnel::keys::read_private_key_file(&key_file)?;
        let _ = writeln!(out, "PrivateKey = {}", key.to_base64());
    } else {
        let _ = writeln!(out, "PostUp = wg set %i private-key {}", key_file.display());
    }

    // wg-quick accepts PostUp only in [Interface], so peers' preshared keys load from there.
    let mut peer_blocks = String::new();
    let peers = match side {
        Side::Agent => &file.relay,
        Side::Relay => &file.agent,
    };
    for (index, peer) in peers.iter().enumerate() {
        let section = format!("{}[{index}]", side.peer_table());
        let Some(public_key) = &peer.public_key else {
            return Err(Error::file(
                path,
                format!("{section}.public_key is missing for peer {:?}", peer.name),
            ));
        };
        PublicKey::from_base64(public_key).map_err(|err| {
            Error::file(
                path,
                format!("{section}.public_key of {:?}: {err}", peer.name),
            )
        })?;
        let _ = writeln!(peer_blocks);
        let _ = writeln!(peer_blocks, "# {}", peer.name);
        let _ = writeln!(peer_blocks, "[Peer]");
        let _ = writeln!(peer_blocks, "PublicKey = {public_key}");
        let _ = writeln!(
            peer_blocks,
            "AllowedIPs = {}",
            IpNet::from(peer.tunnel_address)
        );
        if let Some(endpoint) = peer.endpoint {
            let _ = writeln!(peer_blocks, "Endpoint = {endpoint}");
        }
        if let Some(keepalive) = peer.keepalive(side) {
            let _ = writeln!(peer_blocks, "PersistentKeepalive = {keepalive}");
        }
        if let Some(psk) = &peer.preshared_key_file {
            let _ = writeln!(
                out,
                "PostUp = wg set %i peer {public_key} preshared-key {}",
                resolve(path, psk).display()
            );
        }
    }
    out.push_str(&peer_blocks);
    Ok(out)
}

/// The daemons resolve relative paths against the config file's directory; so does this.
fn resolve(config: &Path, path: &Path) -> PathBuf {
    match config.parent() {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    }
}
