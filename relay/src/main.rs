//! `xpart-relay --config relay.toml [--check]`: validate the configuration (and stop there with
//! `--check`), start the relay, print one JSON line with the bound addresses on stdout, and run
//! until SIGINT/SIGTERM. SIGHUP reopens the audit log and reloads the policy, rewrite rules and
//! allowed agents from the same file, without dropping connections
//! (`xpart_daemon::startup::run`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use xpart_relay::RelayHandle;

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
    xpart_daemon::startup::run::<RelayHandle>(&args.config, args.check)
}
