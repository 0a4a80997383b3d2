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

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use xpart_agent::AgentConfig;
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
    run_with(args, json, &mut |_| None)
}

/// `occupy` runs before each attempt to start the daemons and may hold a socket through it,
/// so a test can take a chosen port the way another program would.
fn run_with(
    args: DemoArgs,
    json: bool,
    occupy: &mut dyn FnMut(&Ports) -> Option<TcpListener>,
) -> Result<ExitCode, Error> {
    let ports = material::choose_ports(args.front_port, args.wg_port, args.admin_port)?;
    let dir = material::prepare_dir(args.dir.as_deref())?;
    let material = material::generate(&dir)?;

    let runtime = crate::runtime(tokio::runtime::Builder::new_multi_thread().worker_threads(2))?;
    runtime.block_on(async {
        let (daemons, ports) = start_daemons(&args, &material, ports, occupy).await?;
        let guide = Guide::new(&material, &ports);
        if let Err(err) = files::write_secret(&material.caller_env, &guide.env_file(), false) {
            daemons.stop().await;
            return Err(err);
        }
        serve(args.once, json, daemons, &material, &ports, &guide).await
    })
}

/// How many sets of free ports the demo tries before giving up.
const START_ATTEMPTS: u32 = 4;

struct Daemons {
    relay: xpart_relay::RelayHandle,
    agent: xpart_agent::AgentHandle,
}

/// Free ports are picked by binding port 0 and releasing it, so another program can take one
/// before a daemon binds it. Then the ports given as 0 are picked again and the configs
/// rewritten, so the files, the printed commands and the daemons still agree; a port the user
/// named stays as it is (and `choose_ports` refuses it if it is now taken).
async fn start_daemons(
    args: &DemoArgs,
    material: &Material,
    mut ports: Ports,
    occupy: &mut dyn FnMut(&Ports) -> Option<TcpListener>,
) -> Result<(Daemons, Ports), Error> {
    let some_free = args.front_port == 0 || args.wg_port == 0 || args.admin_port == 0;
    let mut attempt = 1;
    loop {
        material::write_configs(material, &ports)?;
        let held = occupy(&ports);
        let started = start_both(material).await;
        drop(held);
        match started {
            Ok(daemons) => return Ok((daemons, ports)),
            Err(failure) if failure.address_in_use && some_free && attempt < START_ATTEMPTS => {
                tracing::info!("{}; trying other free ports", failure.error);
                ports = material::choose_ports(args.front_port, args.wg_port, args.admin_port)?;
                attempt += 1;
            }
            Err(failure) => return Err(failure.error),
        }
    }
}

struct StartFailure {
    error: Error,
    address_in_use: bool,
}

async fn start_both(material: &Material) -> Result<Daemons, StartFailure> {
    let relay = start_relay(material).await?;
    match start_agent(material).await {
        Ok(agent) => Ok(Daemons { relay, agent }),
        Err(failure) => {
            relay.shutdown().await;
            Err(failure)
        }
    }
}

async fn serve(
    once: bool,
    json: bool,
    daemons: Daemons,
    material: &Material,
    ports: &Ports,
    guide: &Guide,
) -> Result<ExitCode, Error> {
    if !json {
        guide.print();
    }

    let outcome = self_probe(material, ports).await;
    let echoed = outcome.verdict.ok && outcome.reply.as_deref() == Some(PROBE_MESSAGE);
    if json {
        println!("{}", guide.to_json(&outcome, echoed));
    } else {
        guide::print_probe(&outcome, echoed);
    }

    if once {
        daemons.stop().await;
        if !echoed {
            return Err(Error::CheckFailed(
                "the self-probe did not get its message back through the agent, tunnel and relay"
                    .into(),
            ));
        }
        return Ok(ExitCode::SUCCESS);
    }

    // Listening before saying so: a Ctrl-C right after the line must stop the demo cleanly,
    // not end the process with the signal's default action.
    match xpart_daemon::shutdown::stop_signals() {
        Ok(mut signals) => {
            if !json {
                println!("Running; press Ctrl-C to stop.");
            }
            signals.recv().await;
        }
        Err(err) => tracing::error!("cannot wait for signals ({err}); stopping"),
    }
    daemons.stop().await;
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
async fn start_relay(material: &Material) -> Result<xpart_relay::RelayHandle, StartFailure> {
    let path = &material.relay_config;
    let config =
        RelayConfig::load(path).map_err(|problems| StartFailure::invalid(path, problems))?;
    let started = xpart_relay::start(config).await;
    started.map_err(|err| StartFailure::daemon("relay", &err))
}

async fn start_agent(material: &Material) -> Result<xpart_agent::AgentHandle, StartFailure> {
    let path = &material.agent_config;
    let config =
        AgentConfig::load(path).map_err(|problems| StartFailure::invalid(path, problems))?;
    xpart_agent::start(config)
        .await
        .map_err(|err| StartFailure::daemon("agent", &err))
}

impl StartFailure {
    /// A file the demo generated that its daemon's loader refuses: a bug in the demo.
    fn invalid(path: &Path, problems: impl std::fmt::Display) -> StartFailure {
        StartFailure::other(Error::file(
            path,
            format!("the generated config does not validate: {problems}"),
        ))
    }

    fn other(error: Error) -> StartFailure {
        StartFailure {
            error,
            address_in_use: false,
        }
    }

    fn daemon(daemon: &str, err: &(dyn std::error::Error + 'static)) -> StartFailure {
        let error = Error::Usage(format!(
            "cannot start the demo {daemon}: {err} (if a port is taken, choose others with \
             --front-port, --wg-port and --admin-port, or 0 for any free port)"
        ));
        StartFailure {
            error,
            address_in_use: address_in_use(err),
        }
    }
}

/// The relay keeps its tunnel errors as text only, so the message is checked as well as the
/// chain of sources ("Address already in use" is the Linux text for EADDRINUSE).
fn address_in_use(err: &(dyn std::error::Error + 'static)) -> bool {
    let in_use = |cause: &(dyn std::error::Error + 'static)| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
    };
    xpart_daemon::error_chain::chain(err).any(in_use)
        || err.to_string().contains("Address already in use")
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
        Err(err) => ProbeOutcome::failed("setup", err.to_string(), Default::default()),
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

impl Daemons {
    /// The agent first, so no request is in flight to a relay that is already gone.
    async fn stop(self) {
        if tokio::time::timeout(SHUTDOWN_WITHIN, self.agent.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the agent did not stop within {SHUTDOWN_WITHIN:?}");
        }
        if tokio::time::timeout(SHUTDOWN_WITHIN, self.relay.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the relay did not stop within {SHUTDOWN_WITHIN:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_free_port_taken_before_the_daemons_bind_it_is_replaced_in_the_configs() {
        let scratch = Scratch::new("retry");
        let mut taken = None;
        let mut seen = Vec::new();

        let result = run_with(demo_args(scratch.path(), 0), true, &mut |ports| {
            seen.push(*ports);
            if taken.is_some() {
                return None;
            }
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, ports.relay_admin)).ok()?;
            taken = Some(ports.relay_admin);
            Some(listener)
        });

        assert!(matches!(result, Ok(code) if code == ExitCode::SUCCESS));
        let taken = taken.expect("the test took the relay's admin port");
        assert_eq!(seen.len(), 2, "{seen:?}");
        let relay = std::fs::read_to_string(scratch.path().join("demo/relay.toml")).unwrap();
        let admin = format!("listen = \"127.0.0.1:{}\"", seen[1].relay_admin);
        assert!(relay.contains(&admin), "{relay}");
        assert!(!relay.contains(&format!("127.0.0.1:{taken}\"")), "{relay}");
        let agent = std::fs::read_to_string(scratch.path().join("demo/agent.toml")).unwrap();
        assert!(
            agent.contains(&format!("127.0.0.1:{}", seen[1].front)),
            "{agent}"
        );
        let caller_env = std::fs::read_to_string(scratch.path().join("demo/caller.env")).unwrap();
        assert!(
            caller_env.contains(&format!("https://localhost:{}", seen[1].front)),
            "{caller_env}"
        );
    }

    #[test]
    fn a_port_named_by_the_user_is_never_changed_and_the_demo_gives_up() {
        let scratch = Scratch::new("named");
        let admin = free_admin_pair();
        let mut seen = Vec::new();

        let result = run_with(demo_args(scratch.path(), admin), true, &mut |ports| {
            seen.push(*ports);
            TcpListener::bind((Ipv4Addr::LOCALHOST, ports.agent_admin)).ok()
        });

        let err = result.expect_err("the agent's admin port is always taken");
        let text = err.to_string();
        assert!(text.contains("cannot start the demo agent"), "{text}");
        assert!(text.contains("--admin-port"), "{text}");
        assert_eq!(seen.len(), START_ATTEMPTS as usize, "{seen:?}");
        assert!(
            seen.iter().all(|ports| ports.agent_admin == admin),
            "{seen:?}"
        );
    }

    fn demo_args(dir: &Path, admin_port: u16) -> DemoArgs {
        DemoArgs {
            dir: Some(dir.join("demo")),
            front_port: 0,
            wg_port: 0,
            admin_port,
            once: true,
        }
    }

    /// `--admin-port N` needs N and N + 1.
    fn free_admin_pair() -> u16 {
        for _ in 0..50 {
            let first = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = first.local_addr().unwrap().port();
            if port < u16::MAX && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok() {
                return port;
            }
        }
        panic!("no two consecutive free ports on 127.0.0.1");
    }

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("xpart-demo-unit-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
