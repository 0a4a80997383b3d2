//! `xpart drill`: a failover drill. Probes run through the agent in a loop; after a quiet
//! period the drill causes a failure (drains a relay through its admin port, signals a
//! process, runs a command, or performs an EC2 failover), keeps probing, and reports how
//! many probes failed and how long after the cut service came back.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use crate::admin::{AdminError, AdminUrl, AdminUrlError};
use crate::failover::{self, EipArgs, MoveArgs, MoveSpec, MoveTarget, Moves, RouteArgs, VipArgs};
use crate::probe::{Prober, TargetArgs, Verdict};
use crate::{duration, Error};

/// Failures listed in the report; the counts cover all of them.
const MAX_LISTED_FAILURES: usize = 50;

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  xpart drill --connect 127.0.0.1:8443 --ca-bundle ca.pem --token \"$T\" \\
      drain-relay --admin 127.0.0.1:9101 --restore
  xpart drill --after 30s stop --pid \"$(pidof xpart-relay)\"
  xpart drill run -- systemctl stop xpart-relay
  xpart drill --json failover route --cidr 100.64.0.0/30 --pair bedrock

Times are measured from the moment the cut starts; a probe still in flight then counts
as after the cut. Exit 0 when the last probes succeed
(and the outage stayed under --max-outage), 1 otherwise.")]
pub struct DrillArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Time between probe starts.
    #[arg(long, default_value = "200ms", value_parser = duration::parse, value_name = "DURATION")]
    interval: Duration,
    /// Probe this long before the cut (a baseline).
    #[arg(long, default_value = "2s", value_parser = duration::parse, value_name = "DURATION")]
    before: Duration,
    /// Keep probing this long after the cut.
    #[arg(long, default_value = "10s", value_parser = duration::parse, value_name = "DURATION")]
    after: Duration,
    /// Fail the drill when recovery takes longer than this.
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    max_outage: Option<Duration>,
    #[command(subcommand)]
    cut: Cut,
}

// One value per run, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cut {
    /// Mark a relay down through its admin port (POST /drain).
    DrainRelay {
        /// The relay's admin address.
        #[arg(long, value_name = "URL")]
        admin: String,
        /// POST /undrain when the drill ends.
        #[arg(long)]
        restore: bool,
    },
    /// Send a signal to a process (a relay, an agent, wireguard-go).
    Stop {
        #[arg(long)]
        pid: i32,
        #[arg(long, value_enum, default_value_t = Signal::Term)]
        signal: Signal,
    },
    /// Run a command as the cut (e.g. `systemctl stop xpart-relay`, `tc qdisc add …`).
    Run {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required = true,
            value_name = "COMMAND"
        )]
        command: Vec<String>,
    },
    /// Perform an EC2 failover move as the cut.
    #[command(subcommand)]
    Failover(FailoverCut),
}

#[derive(Debug, Subcommand)]
enum FailoverCut {
    Route(RouteArgs),
    Vip(VipArgs),
    Eip(EipArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Signal {
    Term,
    Kill,
    Int,
    Stop,
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    /// Seconds since the drill started, when the probe was sent.
    sent_s: f64,
    /// Seconds since the drill started, when it finished.
    done_s: f64,
    #[serde(flatten)]
    verdict: Verdict,
}

#[derive(Debug, Serialize)]
struct Report {
    cut: String,
    cut_detail: Vec<String>,
    cut_at_s: f64,
    cut_took_ms: f64,
    probes_sent: usize,
    probes_failed: usize,
    failed_before_cut: usize,
    failed_after_cut: usize,
    /// From the cut to the sending of the first failed probe it affected (0 when in flight).
    first_failure_after_cut_s: Option<f64>,
    /// From the cut to the end of the first successful probe that ended after it.
    first_success_after_cut_s: Option<f64>,
    /// From the cut to the end of the first success after the first post-cut failure;
    /// 0 when no probe failed.
    recovery_s: Option<f64>,
    longest_failure_streak: usize,
    recovered: bool,
    failures: Vec<Sample>,
}

pub async fn run(args: DrillArgs, json: bool) -> Result<ExitCode, Error> {
    let prober = Prober::new(&args.target)?;
    let cut = prepare_cut(&args.cut)?;
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let probes = tokio::spawn(probe_loop(prober, args.interval, started, stop.clone()));

    tokio::time::sleep(args.before).await;
    let cut_started = Instant::now();
    let cut_result = perform_cut(&cut).await;
    let cut_done = Instant::now();
    if cut_result.is_ok() {
        tokio::time::sleep(args.after).await;
    }
    stop.store(true, Ordering::Relaxed);
    let samples = probes.await.unwrap_or_default();
    let restore_error = restore(&args.cut).await.err();

    let cut_detail = match cut_result {
        Ok(detail) => detail,
        Err(err) => {
            return Err(Error::CheckFailed(format!(
                "the cut ({}) failed, so the drill measured nothing: {err}",
                cut.describe()
            )))
        }
    };
    let report = analyse(
        cut.describe(),
        cut_detail,
        seconds(cut_started - started),
        millis(cut_done - cut_started),
        samples,
    );
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        print_report(&report);
    }
    if let Some(err) = restore_error {
        return Err(Error::CheckFailed(format!(
            "restoring after the drill failed: {err}"
        )));
    }
    if !report.recovered {
        return Err(Error::CheckFailed(
            "service had not recovered when the drill ended (the last probe failed)".into(),
        ));
    }
    if let (Some(limit), Some(recovery)) = (args.max_outage, report.recovery_s) {
        if recovery > limit.as_secs_f64() {
            return Err(Error::CheckFailed(format!(
                "recovery took {recovery:.3}s, over --max-outage {:.3}s",
                limit.as_secs_f64()
            )));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A cut checked before the drill starts, so a typo does not waste the baseline.
// One value per run, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum PreparedCut {
    Drain(AdminUrl),
    Signal { pid: i32, signal: Signal },
    Command(Vec<String>),
    Failover { moves: Moves, target: MoveTarget },
}

impl PreparedCut {
    fn describe(&self) -> String {
        match self {
            PreparedCut::Drain(admin) => format!("drain relay via {}", admin.url("/drain")),
            PreparedCut::Signal { pid, signal } => {
                format!("send SIG{} to pid {pid}", signal_name(*signal))
            }
            PreparedCut::Command(command) => format!("run {:?}", command.join(" ")),
            PreparedCut::Failover { .. } => "EC2 failover".to_string(),
        }
    }
}

fn prepare_cut(cut: &Cut) -> Result<PreparedCut, Error> {
    match cut {
        Cut::DrainRelay { admin, .. } => Ok(PreparedCut::Drain(AdminUrl::parse(admin)?)),
        Cut::Stop { pid, signal } => {
            if *pid <= 1 {
                return Err(Error::Usage(format!(
                    "--pid {pid} is not a process to stop"
                )));
            }
            // Signal 0 checks that the process exists and may be signalled, sending nothing.
            // SAFETY: kill(2) with signal 0 has no effect beyond the permission check.
            if unsafe { libc::kill(*pid, 0) } != 0 {
                let err = std::io::Error::last_os_error();
                return Err(Error::Usage(format!("cannot signal pid {pid}: {err}")));
            }
            Ok(PreparedCut::Signal {
                pid: *pid,
                signal: *signal,
            })
        }
        Cut::Run { command } => Ok(PreparedCut::Command(command.clone())),
        Cut::Failover(FailoverCut::Route(args)) => Ok(failover_cut(args)),
        Cut::Failover(FailoverCut::Vip(args)) => Ok(failover_cut(args)),
        Cut::Failover(FailoverCut::Eip(args)) => Ok(failover_cut(args)),
    }
}

fn failover_cut<S: MoveSpec>(args: &MoveArgs<S>) -> PreparedCut {
    PreparedCut::Failover {
        moves: args.moves(),
        target: args.to.clone(),
    }
}

async fn probe_loop(
    prober: Prober,
    interval: Duration,
    started: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let verdict = prober.probe().await.verdict;
        samples.push(Sample {
            sent_s: seconds(sent - started),
            done_s: seconds(started.elapsed()),
            verdict,
        });
        next += interval;
        let now = Instant::now();
        if next < now {
            next = now;
        }
        tokio::time::sleep_until(next.into()).await;
    }
    samples
}

/// Why the cut, or the restore after it, did not happen.
#[derive(Debug, thiserror::Error)]
enum CutError {
    #[error(transparent)]
    AdminUrl(#[from] AdminUrlError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("POST {path} answered HTTP {status}")]
    Refused { path: &'static str, status: u16 },
    #[error("{0}")]
    Signal(std::io::Error),
    #[error("empty command")]
    EmptyCommand,
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} exited with {status}: {stderr}")]
    Exited {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error(transparent)]
    Failover(#[from] Error),
}

/// POSTs `path` to `admin`, which must answer 200.
async fn post_admin(admin: &AdminUrl, path: &'static str) -> Result<(), CutError> {
    let response = admin.post(path, Duration::from_secs(5)).await?;
    if response.status != 200 {
        return Err(CutError::Refused {
            path,
            status: response.status,
        });
    }
    Ok(())
}

async fn perform_cut(cut: &PreparedCut) -> Result<Vec<String>, CutError> {
    match cut {
        PreparedCut::Drain(admin) => {
            post_admin(admin, "/drain").await?;
            Ok(vec![format!("POST {}", admin.url("/drain"))])
        }
        PreparedCut::Signal { pid, signal } => {
            // SAFETY: kill(2) on a pid the operator named; no memory is involved.
            if unsafe { libc::kill(*pid, signal_number(*signal)) } != 0 {
                return Err(CutError::Signal(std::io::Error::last_os_error()));
            }
            Ok(vec![format!("kill -{} {pid}", signal_name(*signal))])
        }
        PreparedCut::Command(command) => {
            let Some((program, arguments)) = command.split_first() else {
                return Err(CutError::EmptyCommand);
            };
            let output = tokio::process::Command::new(program)
                .args(arguments)
                .output()
                .await
                .map_err(|source| CutError::Spawn {
                    program: program.clone(),
                    source,
                })?;
            if !output.status.success() {
                return Err(CutError::Exited {
                    program: program.clone(),
                    status: output.status,
                    stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
                });
            }
            Ok(vec![command.join(" ")])
        }
        PreparedCut::Failover { moves, target } => Ok(failover::move_quietly(moves, target).await?),
    }
}

async fn restore(cut: &Cut) -> Result<(), CutError> {
    let Cut::DrainRelay {
        admin,
        restore: true,
    } = cut
    else {
        return Ok(());
    };
    post_admin(&AdminUrl::parse(admin)?, "/undrain").await
}

fn analyse(
    cut: String,
    cut_detail: Vec<String>,
    cut_at_s: f64,
    cut_took_ms: f64,
    samples: Vec<Sample>,
) -> Report {
    // A probe in flight when the cut starts may be hit by it, so it counts as after.
    let after_cut: Vec<&Sample> = samples.iter().filter(|s| s.done_s > cut_at_s).collect();
    let failed_before_cut = samples
        .iter()
        .filter(|s| s.done_s <= cut_at_s && !s.verdict.ok)
        .count();
    let failed_after_cut = after_cut.iter().filter(|s| !s.verdict.ok).count();
    let first_failure = after_cut.iter().find(|s| !s.verdict.ok);
    let first_success = after_cut.iter().find(|s| s.verdict.ok);
    let recovery_s = match first_failure {
        None => first_success.map(|_| 0.0),
        Some(failure) => after_cut
            .iter()
            .find(|s| s.verdict.ok && s.sent_s > failure.sent_s)
            .map(|s| round3(s.done_s - cut_at_s)),
    };
    let mut longest_failure_streak = 0;
    let mut streak = 0;
    for sample in &samples {
        streak = if sample.verdict.ok { 0 } else { streak + 1 };
        longest_failure_streak = longest_failure_streak.max(streak);
    }
    let recovered = samples.last().is_some_and(|s| s.verdict.ok);
    Report {
        cut,
        cut_detail,
        cut_at_s: round3(cut_at_s),
        cut_took_ms,
        probes_sent: samples.len(),
        probes_failed: samples.iter().filter(|s| !s.verdict.ok).count(),
        failed_before_cut,
        failed_after_cut,
        first_failure_after_cut_s: first_failure.map(|s| round3((s.sent_s - cut_at_s).max(0.0))),
        first_success_after_cut_s: first_success.map(|s| round3(s.done_s - cut_at_s)),
        recovery_s,
        longest_failure_streak,
        recovered,
        failures: samples
            .iter()
            .filter(|s| !s.verdict.ok)
            .take(MAX_LISTED_FAILURES)
            .cloned()
            .collect(),
    }
}

fn print_report(report: &Report) {
    let or_none =
        |value: Option<f64>| value.map_or_else(|| "none".to_string(), |v| format!("+{v:.3}s"));
    println!(
        "cut:      {} (took {:.1} ms, at +{:.3}s)",
        report.cut, report.cut_took_ms, report.cut_at_s
    );
    for line in &report.cut_detail {
        println!("          {line}");
    }
    println!(
        "probes:   {} sent, {} failed ({} before the cut, {} after)",
        report.probes_sent, report.probes_failed, report.failed_before_cut, report.failed_after_cut
    );
    println!(
        "first failure after the cut: {}",
        or_none(report.first_failure_after_cut_s)
    );
    println!(
        "first success after the cut: {}",
        or_none(report.first_success_after_cut_s)
    );
    match (report.recovered, report.recovery_s) {
        (true, Some(recovery)) => println!(
            "recovered {recovery:.3}s after the cut (longest failure streak: {} probes)",
            report.longest_failure_streak
        ),
        _ => println!("NOT RECOVERED when the drill ended"),
    }
    for failure in report.failures.iter().take(10) {
        let verdict = &failure.verdict;
        println!(
            "  +{:.3}s {}: {}",
            failure.sent_s,
            verdict.failure(),
            verdict.message.as_deref().unwrap_or("")
        );
    }
}

fn signal_number(signal: Signal) -> i32 {
    match signal {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
        Signal::Int => libc::SIGINT,
        Signal::Stop => libc::SIGSTOP,
    }
}

fn signal_name(signal: Signal) -> &'static str {
    match signal {
        Signal::Term => "TERM",
        Signal::Kill => "KILL",
        Signal::Int => "INT",
        Signal::Stop => "STOP",
    }
}

fn seconds(duration: Duration) -> f64 {
    round3(duration.as_secs_f64())
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e4).round() / 10.0
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(sent_s: f64, ok: bool) -> Sample {
        Sample {
            sent_s,
            done_s: sent_s + 0.05,
            verdict: Verdict {
                ok,
                failed_phase: (!ok).then_some("response"),
                status: Some(if ok { 200 } else { 503 }),
                error_type: None,
                message: None,
            },
        }
    }

    #[test]
    fn recovery_is_measured_from_the_cut_to_the_first_success_after_the_outage() {
        let samples = vec![
            probe(0.0, true),
            probe(0.5, true),
            probe(1.0, true),
            probe(1.5, false),
            probe(2.0, false),
            probe(2.5, true),
            probe(3.0, true),
        ];
        let report = analyse("cut".into(), vec![], 1.2, 1.0, samples);
        assert_eq!(report.probes_sent, 7);
        assert_eq!(report.probes_failed, 2);
        assert_eq!(report.failed_before_cut, 0);
        assert_eq!(report.failed_after_cut, 2);
        assert_eq!(report.first_failure_after_cut_s, Some(0.3));
        assert_eq!(report.first_success_after_cut_s, Some(1.35));
        assert_eq!(report.recovery_s, Some(1.35));
        assert_eq!(report.longest_failure_streak, 2);
        assert!(report.recovered);
    }

    #[test]
    fn a_probe_in_flight_at_the_cut_counts_as_after_it() {
        let in_flight = Sample {
            done_s: 1.4,
            ..probe(1.1, false)
        };
        let samples = vec![probe(0.0, true), in_flight, probe(1.5, true)];
        let report = analyse("cut".into(), vec![], 1.2, 1.0, samples);
        assert_eq!(report.failed_before_cut, 0);
        assert_eq!(report.failed_after_cut, 1);
        assert_eq!(report.first_failure_after_cut_s, Some(0.0));
        assert_eq!(report.recovery_s, Some(0.35));
    }

    #[test]
    fn no_failure_after_the_cut_means_zero_recovery_time() {
        let samples = vec![probe(0.0, true), probe(1.0, true), probe(2.0, true)];
        let report = analyse("cut".into(), vec![], 0.5, 1.0, samples);
        assert_eq!(report.recovery_s, Some(0.0));
        assert_eq!(report.first_failure_after_cut_s, None);
        assert!(report.recovered);
    }

    #[test]
    fn an_outage_lasting_to_the_end_is_not_recovered() {
        let samples = vec![probe(0.0, true), probe(1.0, false), probe(2.0, false)];
        let report = analyse("cut".into(), vec![], 0.5, 1.0, samples);
        assert_eq!(report.recovery_s, None);
        assert!(!report.recovered);
        assert_eq!(report.failures.len(), 2);
    }
}
