//! `xpart` is the operator's command line for an xpart deployment. It makes the material the
//! daemons need (WireGuard keys, a private CA and the agent's TLS certificate, caller tokens),
//! checks configuration with the daemons' own validation, renders a side's tunnel as a
//! wg-quick file, reads the daemons' admin ports, sends probe requests through an agent as a
//! caller would, moves a route, a floating private IP or an Elastic IP to the standby agent
//! with the EC2 API, and runs failover drills that measure recovery.
//!
//! Data flow: clap parses the command line into [`Cli`]; `run` hands the arguments to the
//! module named for the command; each module returns `Result<ExitCode, Error>` after printing
//! its report (text, or JSON with `--json`); `main` maps an [`Error`] to its message on stderr
//! and the documented exit code.

mod admin;
mod ca;
mod config_check;
mod demo;
mod drill;
mod duration;
mod error;
mod failover;
mod files;
mod keys;
mod probe;
mod status;
mod token;
mod usage;
mod wg_config;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

pub use error::Error;

/// The exit-code table, shared by the short and long help.
macro_rules! exit_codes {
    () => {
        "\
Exit codes:
  0  success
  1  a check failed: config problems, a probe or status found a failure, a drill did not recover
  2  usage or input error: bad arguments, missing/unreadable/insecure files, malformed keys
  3  AWS error: credentials, permissions, unknown IDs, throttled after retries"
    };
}

/// Operate an xpart deployment: keys, certificates, tokens, config checks, status, probes,
/// EC2 failover and drills.
#[derive(Debug, Parser)]
#[command(
    name = "xpart",
    version,
    after_help = exit_codes!(),
    after_long_help = concat!("\
Typical setup:
  xpart keygen --out agent.key > agent.pub         # on each side; exchange the .pub files
  xpart ca init --dir ca                             # a private CA for the agent's TLS front
  xpart ca issue --ca-dir ca --region us-east-1 --ip 10.0.1.10 --out front
  xpart token new --principal summarizer-lambda      # paste the snippet into agent.toml
  xpart config check agent.toml relay.toml
  xpart probe --connect 10.0.1.10:443 --ca-bundle ca/ca.pem --token \"$TOKEN\"
  xpart failover route --cidr 100.64.0.0/30 --pair bedrock --dry-run

", exit_codes!())
)]
pub struct Cli {
    /// Print the report as JSON on stdout (one object; `failover watch` prints one per line).
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an agent and a relay on loopback with the relay's echo model, and print how to call it.
    Demo(demo::DemoArgs),
    /// Generate a WireGuard private key (same format as `wg genkey`).
    Keygen(keys::KeygenArgs),
    /// Derive the public key from a private key (same as `wg pubkey`).
    Pubkey(keys::PubkeyArgs),
    /// The private CA and the agent's TLS certificate.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Caller tokens for agent.toml `[[principal]]` entries.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Validate agent.toml / relay.toml with the daemons' own checks.
    #[command(subcommand)]
    Config(config_check::ConfigCommand),
    /// Print one side's tunnel as a wg-quick file, so `wg-quick`/wireguard-go can stand in for it.
    WgConfig(wg_config::WgConfigArgs),
    /// Read the agent's and relay's admin ports: tunnel peers, relay health, request counts.
    Status(status::StatusArgs),
    /// Send a Converse through an agent as a caller would and time each phase.
    Probe(probe::ProbeArgs),
    /// Move traffic to the standby agent with the EC2 API (route, floating IP, Elastic IP).
    #[command(subcommand)]
    Failover(failover::FailoverCommand),
    /// Probe through the agent while causing a failure; report failed probes and recovery time.
    Drill(drill::DrillArgs),
    /// Requests, errors, refusals, tokens and estimated cost per principal, model and day, from
    /// the audit files.
    Usage(usage::UsageArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let json = cli.json;
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            // A failed check has already printed its report; anything else prints an error
            // object in its place so stdout stays one JSON document.
            if json && !matches!(err, Error::CheckFailed(_)) {
                let body =
                    serde_json::json!({ "error": err.to_string(), "exit_code": err.exit_code() });
                println!("{body}");
            }
            eprintln!("error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Error> {
    let json = cli.json;
    match cli.command {
        Command::Demo(args) => demo::run(args, json),
        Command::Keygen(args) => keys::keygen(args),
        Command::Pubkey(args) => keys::pubkey(args),
        Command::Ca(command) => ca::run(command, json),
        Command::Token(command) => token::run(command, json),
        Command::Config(command) => config_check::run(command, json),
        Command::WgConfig(args) => wg_config::run(args),
        Command::Status(args) => block_on(status::run(args, json)),
        Command::Probe(args) => block_on(probe::run(args, json)),
        Command::Failover(command) => block_on(failover::run(command, json)),
        Command::Drill(args) => block_on(drill::run(args, json)),
        Command::Usage(args) => usage::run(args, json),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "xpart", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn block_on<F: std::future::Future<Output = Result<ExitCode, Error>>>(
    future: F,
) -> Result<ExitCode, Error> {
    runtime(&mut tokio::runtime::Builder::new_current_thread())?.block_on(future)
}

/// The runtime `builder` describes, with IO and timers on.
fn runtime(builder: &mut tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, Error> {
    builder.enable_all().build().map_err(|err| Error::Io {
        context: "starting the async runtime".into(),
        source: err,
    })
}

/// Logs go to stderr so stdout stays the report; `RUST_LOG` overrides the default `warn`.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
