//! `xpart demo`: the whole path on one machine, with nothing to install and no AWS account.
//! It generates everything a deployment would hold (WireGuard keys, a private CA and the
//! front's certificate, a caller token and its principal, `agent.toml` and `relay.toml`) into a
//! directory, starts a relay and an agent from those files in this process, joined by a
//! userspace WireGuard tunnel on 127.0.0.1, prints what a caller pastes to use it, proves it
//! with one Converse through the front, and runs until Ctrl-C.
//!
//! The relay answers only its echo model, so nothing leaves the machine.

mod guide;
mod material;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use xpart_agent::config::AgentConfig;
use xpart_relay::config::RelayConfig;

use crate::admin::AdminUrl;
use crate::probe::{ProbeOutcome, Prober, TargetArgs};
use crate::{files, Error};

use self::guide::Guide;
use self::material::{Material, Ports};

/// The message the self-probe sends; the echo model must send it back unchanged.
const PROBE_MESSAGE: &str = "hello from xpart demo";
/// The agent reports ready once a relay has answered its health checks through the tunnel.
const READY_WITHIN: Duration = Duration::from_secs(20);
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
const SHUTDOWN_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  xpart demo                                   # temp dir, default ports, runs until Ctrl-C
  xpart demo --dir ./demo --front-port 9443    # keep the files somewhere you choose
  xpart demo --once --front-port 0 --wg-port 0 --admin-port 0   # any free ports; probe and exit

Exit 0 when the self-probe got the echo back (with --once) or after Ctrl-C; 1 when the
self-probe failed; 2 when the directory or a port cannot be used.")]
pub struct DemoArgs {
    /// Directory for the generated keys, certificates and configs (created if missing; must
    /// be empty or an earlier demo's). Default: a new directory under the system temp dir.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The agent's TLS front on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 8443, value_name = "PORT")]
    front_port: u16,
    /// The relay's WireGuard UDP port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 51821, value_name = "PORT")]
    wg_port: u16,
    /// The agent's admin port on 127.0.0.1; the relay's is the next one (0: any free ports).
    #[arg(long, default_value_t = 9180, value_name = "PORT")]
    admin_port: u16,
    /// Run the self-probe, stop, and exit with its result.
    #[arg(long)]
    once: bool,
}

/// Builds its own multi-threaded runtime: the agent, the relay and both ends of the tunnel
/// share this process.
pub fn run(args: DemoArgs, json: bool) -> Result<ExitCode, Error> {
    let ports = material::choose_ports(args.front_port, args.wg_port, args.admin_port)?;
    let dir = material::prepare_dir(args.dir.as_deref())?;
    let material = material::generate(&dir, &ports)?;
    let guide = Guide::new(&material, &ports);
    files::write_secret(&material.caller_env, &guide.env_file(), false)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| Error::Io {
            context: "starting the async runtime".into(),
            source: err,
        })?;
    runtime.block_on(serve(args.once, json, &material, &ports, &guide))
}

async fn serve(
    once: bool,
    json: bool,
    material: &Material,
    ports: &Ports,
    guide: &Guide,
) -> Result<ExitCode, Error> {
    let relay = start_relay(material).await?;
    let agent = match start_agent(material).await {
        Ok(agent) => agent,
        Err(err) => {
            relay.shutdown().await;
            return Err(err);
        }
    };
    if !json {
        guide.print();
    }

    let outcome = self_probe(material, ports).await;
    let echoed = outcome.ok && outcome.reply.as_deref() == Some(PROBE_MESSAGE);
    if json {
        println!("{}", guide.to_json(&outcome, echoed));
    } else {
        guide::print_probe(&outcome, echoed);
    }

    if once {
        stop(agent, relay).await;
        if !echoed {
            return Err(Error::CheckFailed(
                "the self-probe did not get its message back through the agent, tunnel and relay"
                    .into(),
            ));
        }
        return Ok(ExitCode::SUCCESS);
    }

    if !json {
        println!("Running; press Ctrl-C to stop.");
    }
    let signal = xpart_daemon::shutdown::signal().await;
    if let Err(err) = signal {
        tracing::error!("cannot wait for signals ({err}); stopping");
    }
    stop(agent, relay).await;
    if !json {
        println!(
            "Stopped. The files stay in {} (audit lines in agent-audit.jsonl and relay-audit.jsonl).",
            material.dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads the file it wrote with the daemon's own loader, so the demo runs exactly what
/// `xpart-relay --config` would.
async fn start_relay(material: &Material) -> Result<xpart_relay::RelayHandle, Error> {
    let config = RelayConfig::load(&material.relay_config).map_err(|diagnostics| {
        Error::file(
            &material.relay_config,
            format!("the generated relay config does not validate: {diagnostics}"),
        )
    })?;
    xpart_relay::start(config)
        .await
        .map_err(|err| start_error("relay", &err.to_string()))
}

async fn start_agent(material: &Material) -> Result<xpart_agent::AgentHandle, Error> {
    let config = AgentConfig::load(&material.agent_config).map_err(|diagnostics| {
        Error::file(
            &material.agent_config,
            format!("the generated agent config does not validate: {diagnostics}"),
        )
    })?;
    xpart_agent::start(config)
        .await
        .map_err(|err| start_error("agent", &err.to_string()))
}

fn start_error(daemon: &str, reason: &str) -> Error {
    Error::Usage(format!(
        "cannot start the demo {daemon}: {reason} (if a port is taken, choose others with \
         --front-port, --wg-port and --admin-port, or 0 for any free port)"
    ))
}

/// Waits until the agent sees the relay through the tunnel, then sends one Converse through
/// the front exactly as `xpart probe` does.
async fn self_probe(material: &Material, ports: &Ports) -> ProbeOutcome {
    let admin = AdminUrl::parse(&format!("127.0.0.1:{}", ports.agent_admin));
    if let Ok(admin) = admin {
        wait_until_ready(&admin).await;
    }
    let target = TargetArgs {
        endpoint: guide::endpoint(ports),
        connect: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, ports.front)).to_string()),
        ca_bundle: Some(material.ca_bundle.clone()),
        token: Some(material.token.clone()),
        model: material::ECHO_MODEL.into(),
        message: PROBE_MESSAGE.into(),
        timeout: PROBE_TIMEOUT,
    };
    match Prober::new(&target) {
        Ok(prober) => prober.probe().await,
        Err(err) => ProbeOutcome {
            ok: false,
            failed_phase: Some("setup"),
            status: None,
            error_type: None,
            message: Some(err.to_string()),
            reply: None,
            request_id: None,
            timings: Default::default(),
        },
    }
}

/// Not ready in time is not an error here: the probe that follows reports what fails.
async fn wait_until_ready(admin: &AdminUrl) {
    let deadline = Instant::now() + READY_WITHIN;
    while Instant::now() < deadline {
        if let Ok(response) = admin.get("/readyz", Duration::from_secs(1)).await {
            if response.status == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!("the agent did not report a healthy relay within {READY_WITHIN:?}");
}

/// The agent first, so no request is in flight to a relay that is already gone.
async fn stop(agent: xpart_agent::AgentHandle, relay: xpart_relay::RelayHandle) {
    if tokio::time::timeout(SHUTDOWN_WITHIN, agent.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("the agent did not stop within {SHUTDOWN_WITHIN:?}");
    }
    if tokio::time::timeout(SHUTDOWN_WITHIN, relay.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("the relay did not stop within {SHUTDOWN_WITHIN:?}");
    }
}
