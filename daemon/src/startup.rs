//! A daemon's life, the same for both: load and validate the file named by `--config`, answer
//! `--check`, set up logging, start, print the `listening` line, answer signals (SIGHUP
//! reloads, SIGINT/SIGTERM stop) and shut down. A daemon describes itself with [`Daemon`];
//! its `main` calls [`main`] with the one line `--help` says about it.

use std::future::Future;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use crate::reload::Reloadable;

use crate::config::{Diagnostics, Warned, WARNING_PREFIX};

/// Exit code for a config with problems, distinct from a daemon that failed while running.
const CONFIG_PROBLEMS: u8 = 2;

/// Loads `config_file` with `load`. Stops with every problem on stderr (exit code 2) when it
/// has any, or with its warnings on stderr and `FILE: ok` on stdout when `check` is set;
/// otherwise sets up logging for `service`, logs the warnings and hands back the config to run.
pub fn load_config<'a, C: Warned>(
    service: &str,
    config_file: &'a Path,
    check: bool,
    load: impl FnOnce(&'a Path) -> Result<C, Diagnostics>,
) -> ControlFlow<ExitCode, C> {
    let config = match load(config_file) {
        Ok(config) => config,
        Err(diagnostics) => {
            eprintln!("{diagnostics}");
            return ControlFlow::Break(ExitCode::from(CONFIG_PROBLEMS));
        }
    };
    if check {
        for warning in config.warnings() {
            eprintln!("{WARNING_PREFIX}{warning}");
        }
        println!("{}: ok", config_file.display());
        return ControlFlow::Break(ExitCode::SUCCESS);
    }
    crate::logging::init(service);
    crate::config::log_warnings(config.warnings());
    ControlFlow::Continue(config)
}

/// What [`run`] needs to know about a daemon; the running daemon is also [`Reloadable`].
pub trait Daemon: Reloadable + Sized {
    /// The service name in logs (`"agent"`, `"relay"`).
    const SERVICE: &'static str;
    /// The program name that prefixes messages on stderr (`"xpart-agent"`).
    const PROGRAM: &'static str;

    type StartError: std::fmt::Display;

    /// Bring the daemon up: bind its listeners, start its tasks.
    fn start(config: Self::Config) -> impl Future<Output = Result<Self, Self::StartError>>;

    /// The addresses for the `listening` line, by name; `None` for one not in use.
    fn listening(&self) -> Vec<(&'static str, Option<SocketAddr>)>;

    /// Stop accepting, end connections, flush what must be flushed.
    fn shutdown(self) -> impl Future<Output = ()>;
}

/// `--version`: in a FIPS build, `(fips)` after the version and then the module that runs with
/// its certificate (or `no certificate`), read from the module itself. The AMI build checks it
/// (images/packer/check-fips.sh) and first boot compares it with the stack's FipsMode.
fn version() -> String {
    let version = env!("CARGO_PKG_VERSION");
    match crate::crypto::fips_module() {
        Some(module) => format!("{version} (fips) {module}"),
        None => version.to_owned(),
    }
}

/// The command line both daemons take.
#[derive(clap::Parser)]
struct Args {
    /// The TOML configuration; config/agent.example.toml and config/relay.example.toml
    /// describe every field.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Validate the configuration, print every problem found, and exit.
    #[arg(long)]
    check: bool,
}

/// Parses the command line of daemon `D` (`about` is what `--help` says it is) and [`run`]s it.
pub fn main<D: Daemon>(about: &'static str) -> ExitCode {
    let matches = Args::command()
        .name(D::PROGRAM)
        .about(about)
        // Built once per process; clap wants a `'static` text here.
        .version(&*Box::leak(version().into_boxed_str()))
        .get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    run::<D>(&args.config, args.check)
}

/// Runs daemon `D` from `config_file` (or only checks the file, with `check`) and returns the
/// process's exit code: 0 after a stop signal or a passing check, 2 for a file with problems,
/// 1 when the daemon cannot start.
pub fn run<D: Daemon>(config_file: &Path, check: bool) -> ExitCode {
    let config = match load_config(D::SERVICE, config_file, check, D::load) {
        ControlFlow::Continue(config) => config,
        ControlFlow::Break(exit) => return exit,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{}: cannot start the async runtime: {error}", D::PROGRAM);
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve::<D>(config, config_file))
}

async fn serve<D: Daemon>(config: D::Config, config_file: &Path) -> ExitCode {
    // Installed before anything else, so a SIGHUP during startup (logrotate) cannot kill us.
    let mut signals = match crate::shutdown::signals() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot install signal handlers");
            eprintln!("{}: cannot install signal handlers: {error}", D::PROGRAM);
            return ExitCode::FAILURE;
        }
    };
    let daemon = match D::start(config).await {
        Ok(daemon) => daemon,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            eprintln!("{}: {error}", D::PROGRAM);
            return ExitCode::FAILURE;
        }
    };
    // One line for whoever started the process (tests, the demo) to learn the bound ports.
    println!("{}", listening_line(&daemon.listening()));
    let stop = crate::reload::run(&mut signals, &daemon, config_file).await;
    tracing::info!(signal = %stop, "stopping");
    daemon.shutdown().await;
    ExitCode::SUCCESS
}

/// `{"event":"listening","front":"127.0.0.1:8443","dns":null,…}`.
fn listening_line(addresses: &[(&'static str, Option<SocketAddr>)]) -> serde_json::Value {
    let mut line = serde_json::Map::new();
    line.insert("event".to_owned(), "listening".into());
    for (name, addr) in addresses {
        let value = match addr {
            Some(addr) => serde_json::Value::String(addr.to_string()),
            None => serde_json::Value::Null,
        };
        line.insert((*name).to_owned(), value);
    }
    serde_json::Value::Object(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_names_each_address_and_nulls_the_unused() {
        let line = listening_line(&[
            ("service", Some(SocketAddr::from(([127, 0, 0, 1], 8080)))),
            ("udp", None),
        ]);
        assert_eq!(
            line.to_string(),
            r#"{"event":"listening","service":"127.0.0.1:8080","udp":null}"#
        );
    }
}
