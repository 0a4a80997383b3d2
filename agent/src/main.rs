//! `xpart-agent --config agent.toml [--check]`: loads and validates the configuration, starts
//! the agent, prints one JSON line with the bound addresses on stdout, and runs until
//! SIGINT/SIGTERM. SIGHUP reopens the audit log and reloads the front certificate, the
//! principals and the DNS answers from the same file, without dropping connections
//! (`xpart_daemon::reload`); a file with problems is refused whole and logged.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use xpart_agent::config::AgentConfig;
use xpart_daemon::startup::load_config;

#[derive(Parser)]
#[command(
    name = "xpart-agent",
    version,
    about = "GovCloud-side xpart appliance: private DNS, TLS front and relay failover for Amazon Bedrock callers"
)]
struct Args {
    /// The agent's TOML configuration (see config/agent.example.toml).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Validate the configuration, print every problem, and exit.
    #[arg(long)]
    check: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = match load_config("agent", &args.config, args.check, AgentConfig::load) {
        ControlFlow::Continue(config) => config,
        ControlFlow::Break(exit) => return exit,
    };
    match run(config, &args.config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "agent stopped");
            eprintln!("xpart-agent: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: AgentConfig, config_file: &Path) -> Result<(), Box<dyn std::error::Error>> {
    // Installed before anything else, so a SIGHUP during startup (logrotate) cannot kill us.
    let mut signals = xpart_daemon::shutdown::signals()?;
    let agent = xpart_agent::start(config).await?;
    // One line for whoever started the process (tests, the demo) to learn the bound ports.
    let listening = serde_json::json!({
        "event": "listening",
        "front": agent.front_addr().to_string(),
        "dns": agent.dns_addr().map(|a| a.to_string()),
        "admin": agent.admin_addr().to_string(),
    });
    println!("{listening}");
    let stop = xpart_daemon::reload::run(&mut signals, &agent, config_file).await;
    tracing::info!(signal = %stop, "stopping");
    agent.shutdown().await;
    Ok(())
}
