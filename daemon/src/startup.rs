//! What a daemon's `main` does before it starts serving: load and validate the file named by
//! `--config`, answer `--check`, and set up logging. Each daemon keeps its own command-line
//! definition so that `--help` describes that daemon.

use std::ops::ControlFlow;
use std::path::Path;
use std::process::ExitCode;

use crate::config::Diagnostics;

/// Exit code for a config with problems, distinct from a daemon that failed while running.
const CONFIG_PROBLEMS: u8 = 2;

/// Loads `config_file` with `load`. Stops with every problem on stderr (exit code 2) when it
/// has any, or with `FILE: ok` on stdout when `check` is set; otherwise sets up logging for
/// `service` and hands back the config to run.
pub fn load_config<'a, C>(
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
        println!("{}: ok", config_file.display());
        return ControlFlow::Break(ExitCode::SUCCESS);
    }
    crate::logging::init(service);
    ControlFlow::Continue(config)
}
