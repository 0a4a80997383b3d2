//! `xpart-agent --config agent.toml [--check]`: loads and validates the configuration, starts
//! the agent, prints one JSON line with the bound addresses on stdout, and runs until
//! SIGINT/SIGTERM. SIGHUP reloads the TLS certificate and reopens the
//! audit log, without dropping connections.

use std::ops::ControlFlow;
use std::path::PathBuf;
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
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "agent stopped");
            eprintln!("xpart-agent: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: AgentConfig) -> Result<(), Box<dyn std::error::Error>> {
    let stop = xpart_daemon::shutdown::signal();
    tokio::pin!(stop);
    let mut reload = xpart_daemon::shutdown::reload()?;
    let agent = xpart_agent::start(config).await?;
    // One line for whoever started the process (tests, the demo) to learn the bound ports.
    let listening = serde_json::json!({
        "event": "listening",
        "front": agent.front_addr().to_string(),
        "dns": agent.dns_addr().map(|a| a.to_string()),
        "admin": agent.admin_addr().to_string(),
    });
    println!("{listening}");
    loop {
        tokio::select! {
            signal = &mut stop => {
                tracing::info!(signal = %signal?, "stopping");
                break;
            }
            Some(()) = reload.recv() => {
                match agent.reload_certificate() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(error) => tracing::error!(%error, "TLS certificate reload failed; keeping the previous one"),
                }
                if let Err(error) = agent.reopen_audit().await {
                    tracing::error!(%error, "reopening the audit log failed");
                }
            }
        }
    }
    agent.shutdown().await;
    Ok(())
}
