//! `xpart config check`: runs the agent's or relay's own configuration loader on each file
//! and prints every problem it finds, each naming the file, the field and the fix.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use serde::Serialize;
use xpart_daemon::config::{Problem, Warned, WARNING_PREFIX};

use crate::Error;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate agent.toml / relay.toml files; report every problem at once.
    #[command(after_help = "\
Examples:
  xpart config check /etc/xpart/agent.toml
  xpart config check agent.toml relay.toml --json
  xpart config check --kind relay /etc/xpart/commercial.toml

The kind of each file is recognised from its sections ([[relay]]/[front] for an agent,
[[agent]]/[upstream] for a relay) unless --kind says. Exit 0 when every file is valid,
1 when any has problems.")]
    Check {
        /// Configuration files to check.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Treat every file as this kind instead of recognising it.
        #[arg(long, value_enum)]
        kind: Option<Kind>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Agent,
    Relay,
}

#[derive(Debug, Serialize)]
struct FileReport {
    file: String,
    kind: Option<Kind>,
    ok: bool,
    problems: Vec<ProblemReport>,
    /// What loads but should change (an old field name); a file with only warnings is ok.
    warnings: Vec<ProblemReport>,
}

#[derive(Debug, Serialize)]
struct ProblemReport {
    field: String,
    message: String,
    fix: String,
    line: Option<usize>,
    column: Option<usize>,
    text: String,
}

pub fn run(command: ConfigCommand, json: bool) -> Result<ExitCode, Error> {
    let ConfigCommand::Check { files, kind } = command;
    let reports: Vec<FileReport> = files.iter().map(|file| check_file(file, kind)).collect();
    let problems: usize = reports.iter().map(|report| report.problems.len()).sum();
    if json {
        let report = serde_json::json!({ "files": reports, "problems": problems });
        println!("{report}");
    } else {
        print_reports(&reports);
    }
    if problems > 0 {
        let failed = reports.iter().filter(|report| !report.ok).count();
        return Err(Error::CheckFailed(format!(
            "{problems} problem(s) in {failed} of {} file(s)",
            reports.len()
        )));
    }
    Ok(ExitCode::SUCCESS)
}

fn check_file(path: &Path, kind: Option<Kind>) -> FileReport {
    let file = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) => {
            let (message, fix) = match err.kind() {
                std::io::ErrorKind::NotFound => (
                    "no such file".to_string(),
                    "check the path (the daemons default to /etc/xpart/agent.toml and /etc/xpart/relay.toml)".to_string(),
                ),
                std::io::ErrorKind::PermissionDenied => (
                    "permission denied".to_string(),
                    "run as the daemon's user or root".to_string(),
                ),
                _ => (format!("cannot read: {err}"), "check the path".to_string()),
            };
            return file_problem(file, kind, message, fix);
        }
    };
    let Some(kind) = kind.or_else(|| recognise(&text, path)) else {
        return file_problem(
            file,
            None,
            "cannot tell whether this is an agent or a relay configuration".into(),
            "pass --kind agent or --kind relay".into(),
        );
    };
    let result = match kind {
        Kind::Agent => xpart_agent::AgentConfig::load(path).map(|c| c.warnings().to_vec()),
        Kind::Relay => xpart_relay::config::RelayConfig::load(path).map(|c| c.warnings().to_vec()),
    };
    let (problems, warnings) = match result {
        Ok(warnings) => (Vec::new(), reports(&warnings)),
        Err(diagnostics) => (
            reports(diagnostics.problems()),
            reports(diagnostics.warnings()),
        ),
    };
    FileReport {
        file,
        kind: Some(kind),
        ok: problems.is_empty(),
        problems,
        warnings,
    }
}

/// Sections only one side has; a file that does not parse falls back to its name.
fn recognise(text: &str, path: &Path) -> Option<Kind> {
    if let Ok(table) = text.parse::<toml::Table>() {
        let has = |key: &str| table.contains_key(key);
        if has("relay") || has("front") || has("dns") || has("principal") {
            return Some(Kind::Agent);
        }
        if has("agent") || has("upstream") || has("service") || has("policy") {
            return Some(Kind::Relay);
        }
    }
    let name = path.file_name()?.to_string_lossy().to_lowercase();
    match (name.contains("agent"), name.contains("relay")) {
        (true, false) => Some(Kind::Agent),
        (false, true) => Some(Kind::Relay),
        _ => None,
    }
}

fn reports(problems: &[Problem]) -> Vec<ProblemReport> {
    problems
        .iter()
        .map(|problem| ProblemReport {
            field: problem.field.clone(),
            message: problem.message.clone(),
            fix: problem.fix.clone(),
            line: problem.location.map(|location| location.line),
            column: problem.location.map(|location| location.column),
            text: problem.to_string(),
        })
        .collect()
}

fn file_problem(file: String, kind: Option<Kind>, message: String, fix: String) -> FileReport {
    let text = format!(
        "{file}: {message}{}{fix}",
        xpart_daemon::config::FIX_SEPARATOR
    );
    FileReport {
        file,
        kind,
        ok: false,
        problems: vec![ProblemReport {
            field: String::new(),
            message,
            fix,
            line: None,
            column: None,
            text,
        }],
        warnings: Vec::new(),
    }
}

fn print_reports(reports: &[FileReport]) {
    for report in reports {
        let kind = match report.kind {
            Some(Kind::Agent) => "agent",
            Some(Kind::Relay) => "relay",
            None => "unknown kind",
        };
        if report.ok {
            println!("{}: ok ({kind} configuration)", report.file);
        } else {
            println!(
                "{}: {} problem(s) ({kind} configuration)",
                report.file,
                report.problems.len()
            );
        }
        for problem in &report.problems {
            println!("  {}", problem.text);
        }
        for warning in &report.warnings {
            println!("  {WARNING_PREFIX}{}", warning.text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_each_side_by_its_sections() {
        let agent = "[tunnel]\naddress = \"100.64.0.1/30\"\n[[relay]]\nname = \"a\"\n";
        let relay = "[tunnel]\nmode = \"userspace\"\n[[agent]]\nname = \"a\"\n";
        assert_eq!(recognise(agent, Path::new("x.toml")), Some(Kind::Agent));
        assert_eq!(recognise(relay, Path::new("x.toml")), Some(Kind::Relay));
        assert_eq!(recognise("[tunnel]\n", Path::new("x.toml")), None);
        assert_eq!(
            recognise("not toml [", Path::new("relay-b.toml")),
            Some(Kind::Relay)
        );
    }
}
