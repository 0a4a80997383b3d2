//! A minimal xpart tunnel peer for tests and benchmarks: brings up one side of a tunnel with
//! one WireGuard peer, in kernel or userspace mode, and optionally forwards TCP between the
//! host and the tunnel (onetun-style), which is how the namespace tests and the benchmark
//! reach the userspace stack from ordinary tools (iperf3, Python sockets).
//!
//! ```text
//! xpart-tunnel-peer --mode userspace --private-key-file a.key --address 100.64.0.2/30 \
//!     --listen 0.0.0.0:51820 --peer-public-key <base64> --peer-endpoint 192.0.2.1:51820 \
//!     --allowed-ip 100.64.0.1/32 \
//!     --forward 127.0.0.1:7000=100.64.0.1:5201     # host 127.0.0.1:7000 -> tunnel 100.64.0.1:5201
//!     --reverse 5201=127.0.0.1:5201                # tunnel port 5201 -> host 127.0.0.1:5201
//! ```
//! Prints `ready udp=<addr>` on stdout once up; on SIGTERM/SIGINT prints the peer statistics
//! as one JSON line and exits.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use xpart_tunnel::{keys, Mode, Network, PeerConfig, PublicKey, Tunnel, TunnelConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, value_parser = parse_mode)]
    mode: Mode,
    /// WireGuard private key file (base64, mode 0600), as `wg genkey` writes it.
    #[arg(long)]
    private_key_file: PathBuf,
    /// This side's tunnel address with prefix.
    #[arg(long)]
    address: ipnet::IpNet,
    /// UDP listen address.
    #[arg(long, default_value = "0.0.0.0:0")]
    listen: SocketAddr,
    #[arg(long, default_value_t = xpart_tunnel::DEFAULT_MTU)]
    mtu: u16,
    /// Kernel mode: TUN interface name.
    #[arg(long)]
    interface: Option<String>,
    #[arg(long)]
    peer_public_key: String,
    #[arg(long)]
    peer_endpoint: Option<SocketAddr>,
    #[arg(long = "allowed-ip", required = true)]
    allowed_ips: Vec<ipnet::IpNet>,
    #[arg(long)]
    keepalive: Option<u16>,
    /// `HOST_LISTEN=TUNNEL_TARGET`: accept on the host, connect through the tunnel.
    #[arg(long = "forward", value_parser = parse_pair::<SocketAddr, SocketAddr>)]
    forwards: Vec<(SocketAddr, SocketAddr)>,
    /// `TUNNEL_PORT=HOST_TARGET`: accept on the tunnel address, connect on the host.
    #[arg(long = "reverse", value_parser = parse_pair::<u16, SocketAddr>)]
    reverses: Vec<(u16, SocketAddr)>,
}

/// A command-line value this example cannot use.
#[derive(Debug, thiserror::Error)]
enum ArgError {
    #[error("{0:?}: expected kernel or userspace")]
    Mode(String),
    #[error("{0:?}: expected LEFT=RIGHT")]
    NotAPair(String),
    #[error("{0:?}: not valid here")]
    Invalid(String),
}

fn parse_mode(text: &str) -> Result<Mode, ArgError> {
    match text {
        "kernel" => Ok(Mode::Kernel),
        "userspace" => Ok(Mode::Userspace),
        other => Err(ArgError::Mode(other.to_string())),
    }
}

fn parse_pair<A: std::str::FromStr, B: std::str::FromStr>(text: &str) -> Result<(A, B), ArgError> {
    let (a, b) = text
        .split_once('=')
        .ok_or_else(|| ArgError::NotAPair(text.to_string()))?;
    let a = a.parse().map_err(|_| ArgError::Invalid(a.to_string()))?;
    let b = b.parse().map_err(|_| ArgError::Invalid(b.to_string()))?;
    Ok((a, b))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xpart-tunnel-peer: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let private_key = keys::read_private_key_file(&args.private_key_file)?;
    let config = TunnelConfig {
        private_key,
        address: args.address,
        mode: args.mode,
        listen: Some(args.listen),
        mtu: args.mtu,
        interface_name: args.interface,
        peers: vec![PeerConfig {
            name: "peer".into(),
            public_key: PublicKey::from_base64(&args.peer_public_key)?,
            endpoint: args.peer_endpoint,
            allowed_ips: args.allowed_ips,
            persistent_keepalive: args.keepalive,
            preshared_key: None,
        }],
    };
    let tunnel = Tunnel::start(config).await?;
    let tunnel_ip = args.address.addr();
    for (listen, target) in args.forwards {
        let listener = Network::host().listen(listen).await?;
        tokio::spawn(relay_connections(listener, tunnel.network(), target));
    }
    for (port, target) in args.reverses {
        let listener = tunnel
            .network()
            .listen(SocketAddr::new(tunnel_ip, port))
            .await?;
        tokio::spawn(relay_connections(listener, Network::host(), target));
    }
    println!("ready udp={}", tunnel.local_udp_addr());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    println!("{}", serde_json::to_string(&tunnel.peer_stats())?);
    tunnel.shutdown().await;
    Ok(())
}

/// Accepts connections and pipes each to `target` on `network`, both ways, until either
/// side closes.
async fn relay_connections(
    listener: xpart_tunnel::TcpListener,
    network: Network,
    target: SocketAddr,
) {
    loop {
        let (mut inbound, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                eprintln!("accept on {}: {err}", listener.local_addr());
                return;
            }
        };
        let network = network.clone();
        tokio::spawn(async move {
            match network.connect(target).await {
                Ok(mut outbound) => {
                    if let Err(err) =
                        tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await
                    {
                        eprintln!("{from} <-> {target}: {err}");
                    }
                }
                Err(err) => eprintln!("connect {target} for {from}: {err}"),
            }
        });
    }
}
