//! `xpart-agent --config agent.toml [--check]`: loads and validates the configuration, starts
//! the agent, prints one JSON line with the bound addresses on stdout, and runs until
//! SIGINT/SIGTERM. SIGHUP reopens the audit log and reloads the front certificate, the
//! principals and the DNS answers from the same file, without dropping connections; a file
//! with problems is refused whole and logged (`xpart_daemon::startup::run`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use xpart_agent::AgentHandle;

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

fn main() -> ExitCode {
    let args = Args::parse();
    xpart_daemon::startup::run::<AgentHandle>(&args.config, args.check)
}
