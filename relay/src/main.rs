//! `xpart-relay --config relay.toml [--check]`: validate the configuration (and stop there with
//! `--check`), start the relay, print one JSON line with the bound addresses on stdout, and run
//! until SIGINT/SIGTERM. SIGHUP reopens the audit log and reloads the policy, rewrite rules and
//! allowed agents from the same file, without dropping connections (`xpart_daemon::reload`).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use xpart_daemon::startup::load_config;
use xpart_relay::config::RelayConfig;

#[derive(Parser)]
#[command(
    name = "xpart-relay",
    version,
    about = "Commercial-side xpart appliance: policy-checked SigV4 signer for Bedrock"
)]
struct Args {
    /// The relay configuration (see config/relay.example.toml).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Validate the configuration, print every problem found, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match load_config("relay", &args.config, args.check, RelayConfig::load) {
        ControlFlow::Continue(config) => config,
        ControlFlow::Break(exit) => return exit,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("xpart-relay: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config, &args.config))
}

async fn run(config: RelayConfig, config_file: &Path) -> ExitCode {
    // Installed before anything else, so a SIGHUP during startup (logrotate) cannot kill us.
    let mut signals = match xpart_daemon::shutdown::signals() {
        Ok(signals) => signals,
        Err(err) => {
            eprintln!("xpart-relay: cannot install signal handlers: {err}");
            return ExitCode::FAILURE;
        }
    };
    let handle = match xpart_relay::start(config).await {
        Ok(handle) => handle,
        Err(err) => {
            tracing::error!("cannot start: {err}");
            eprintln!("xpart-relay: {err}");
            return ExitCode::FAILURE;
        }
    };
    let listening = serde_json::json!({
        "event": "listening",
        "service": handle.service_addr().to_string(),
        "admin": handle.admin_addr().map(|a| a.to_string()),
        "udp": handle.udp_addr().map(|a| a.to_string()),
    });
    println!("{listening}");
    let stop = xpart_daemon::reload::run(&mut signals, &handle, config_file).await;
    tracing::info!(signal = %stop, "stopping");
    handle.shutdown().await;
    ExitCode::SUCCESS
}
