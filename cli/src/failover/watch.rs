//! `xpart failover watch`: run on each agent of a pair. While this agent is the standby, every
//! interval it checks the active agent (`/readyz` on its admin port, and optionally a probe
//! request through its front); after N consecutive failures it moves traffic here, tags this
//! agent `xpart:role=active` and the other `standby`, and idles until it is tagged standby again.
//! Failures count only once the active agent has been seen healthy, or once a start-up grace
//! period has passed without that: at first boot the active agent is not ready yet, which is
//! no reason to move anything. It never moves traffic back on its own.
//!
//! The decision logic is [`Watchdog`], a plain state machine fed check results, this agent's
//! role and the current `Instant`; the loop below only performs checks, EC2 calls and logging.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::ec2::Ec2;
use super::{plan_moves, EipSpec, MoveTarget, Moves, RouteSpec, VipSpec, ROLE_TAG};
use crate::admin::{AdminError, AdminUrl};
use crate::probe::{Prober, TargetArgs};
use crate::{duration, Error};

/// A failing active agent during hold-down is logged this often, not on every check.
const HELD_DOWN_LOG_EVERY: Duration = Duration::from_secs(30);
/// So is an active agent that has not been healthy yet.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(30);

/// What the loop should do after one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Healthy {
        recovered: bool,
    },
    /// The active agent has never answered healthy and the start-up grace has not run out:
    /// failures are not counted yet.
    WaitingForHealth {
        grace_left: Duration,
    },
    Failing {
        consecutive: u32,
    },
    FailOver,
    /// Failing, but a move happened recently; wait.
    HeldDown {
        remaining: Duration,
    },
    /// This agent is not the standby: nothing to watch.
    Idle,
}

/// Counts consecutive failed checks and decides when to fail over.
#[derive(Debug, Clone)]
pub struct Watchdog {
    threshold: u32,
    hold_down: Duration,
    retry_after_error: Duration,
    startup_grace: Duration,
    standby: bool,
    seen_healthy: bool,
    /// Without a healthy sighting, failures count from this moment on.
    counting_from: Instant,
    consecutive: u32,
    quiet_until: Option<Instant>,
}

impl Watchdog {
    /// A watchdog for a standby that starts watching at `now`.
    pub fn new(
        threshold: u32,
        hold_down: Duration,
        retry_after_error: Duration,
        startup_grace: Duration,
        now: Instant,
    ) -> Watchdog {
        Watchdog {
            threshold: threshold.max(1),
            hold_down,
            retry_after_error,
            startup_grace,
            standby: true,
            seen_healthy: false,
            counting_from: now + startup_grace,
            consecutive: 0,
            quiet_until: None,
        }
    }

    /// This agent's role as its tags say. Becoming the standby starts afresh: the (new) active
    /// agent must be seen healthy, or the grace must pass, before a failure counts.
    pub fn set_standby(&mut self, standby: bool, now: Instant) {
        if standby && !self.standby {
            self.seen_healthy = false;
            self.counting_from = now + self.startup_grace;
            self.consecutive = 0;
        }
        self.standby = standby;
    }

    pub fn is_standby(&self) -> bool {
        self.standby
    }

    pub fn observe(&mut self, healthy: bool, now: Instant) -> Verdict {
        if !self.standby {
            return Verdict::Idle;
        }
        if healthy {
            let recovered = self.consecutive > 0;
            self.consecutive = 0;
            self.seen_healthy = true;
            return Verdict::Healthy { recovered };
        }
        if !self.seen_healthy && now < self.counting_from {
            return Verdict::WaitingForHealth {
                grace_left: self.counting_from - now,
            };
        }
        self.consecutive = self.consecutive.saturating_add(1);
        if let Some(until) = self.quiet_until {
            if now < until {
                return Verdict::HeldDown {
                    remaining: until - now,
                };
            }
        }
        if self.consecutive >= self.threshold {
            return Verdict::FailOver;
        }
        Verdict::Failing {
            consecutive: self.consecutive,
        }
    }

    /// Traffic moved (or was already here): stay put for the hold-down period.
    pub fn moved(&mut self, now: Instant) {
        self.quiet_until = Some(now + self.hold_down);
    }

    /// The move failed (e.g. an AWS error): try again after a short pause, not every tick.
    pub fn move_failed(&mut self, now: Instant) {
        self.quiet_until = Some(now + self.retry_after_error);
    }
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples (on the standby agent):
  xpart failover watch --readyz http://10.0.1.10:9100/readyz --pair bedrock \\
      --cidr 100.64.0.0/30 --ip 10.0.1.100 --failures 3 --hold-down 10m
  xpart failover watch --readyz 10.0.1.10:9100 --probe --connect 10.0.1.10:443 --ca-bundle ca.pem \\
      --to-instance i-0standby --cidr 100.64.0.0/30 --once --json

With --pair the watch follows its own instance's xpart:role tag: it watches only while tagged
standby, and after a failover tags itself active and the other member standby (on the agents
both members run it; the one tagged standby watches). Failures count only after the active
agent answered healthy once, or after --startup-grace without that.

It never moves traffic back: after a failover the operator decides when the old active
returns (`xpart failover vip --to-eni ENI --pair NAME --set-roles` towards it).")]
pub struct WatchArgs {
    /// The active agent's admin address or readiness URL (a bare HOST:PORT gets /readyz).
    #[arg(long, value_name = "URL")]
    pub readyz: Option<String>,
    /// Also send a probe request through the active agent's front each check.
    #[arg(long)]
    pub probe: bool,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Consecutive failed checks before failing over.
    #[arg(long, default_value_t = 3)]
    pub failures: u32,
    /// Time between checks.
    #[arg(long, default_value = "1s", value_parser = duration::parse, value_name = "DURATION")]
    pub interval: Duration,
    /// After a move, make no other move for this long.
    #[arg(long, default_value = "5m", value_parser = duration::parse, value_name = "DURATION")]
    pub hold_down: Duration,
    /// Until the active agent has answered healthy once, count no failure for this long after
    /// the watch starts (or after this agent becomes the standby): at first boot the active
    /// agent is not ready yet.
    #[arg(long, default_value = "10m", value_parser = duration::parse, value_name = "DURATION")]
    pub startup_grace: Duration,
    /// With --pair: how often to re-read this instance's xpart:role tag.
    #[arg(long, default_value = "30s", value_parser = duration::parse, value_name = "DURATION")]
    pub role_every: Duration,
    /// After a failed move, wait this long before trying again.
    #[arg(long, default_value = "10s", value_parser = duration::parse, value_name = "DURATION")]
    pub retry_after: Duration,
    /// Exit after the first failover.
    #[arg(long)]
    pub once: bool,
    /// Exit (status 0) after running this long.
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    pub max_runtime: Option<Duration>,
    #[command(flatten)]
    pub routes: RouteSpec,
    #[command(flatten)]
    pub vip: VipSpec,
    #[command(flatten)]
    pub eip: EipSpec,
    #[command(flatten)]
    pub to: MoveTarget,
}

/// One line of the watch log.
#[derive(Debug, Serialize)]
struct Event<'a> {
    elapsed_s: f64,
    event: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    actions: Vec<String>,
}

struct Checks {
    readyz: Option<AdminUrl>,
    readyz_path: String,
    prober: Option<Prober>,
    timeout: Duration,
}

pub async fn run(args: WatchArgs, json: bool) -> Result<ExitCode, Error> {
    let moves = Moves {
        routes: (!args.routes.cidrs.is_empty()).then(|| args.routes.clone()),
        vip: (!args.vip.ips.is_empty()).then(|| args.vip.clone()),
        eip: (!args.eip.allocation_ids.is_empty() || !args.eip.public_ips.is_empty())
            .then(|| args.eip.clone()),
    };
    moves.validate()?;
    let checks = Checks::new(&args)?;
    let ec2 = Ec2::connect(&args.to.aws).await?;
    // Resolved once up front so a typo fails at start, not in the middle of an outage.
    let standby = ec2.resolve_standby(&args.to.standby).await?;
    let pair = args.to.standby.pair.as_deref();
    let log = Log {
        started: Instant::now(),
        json,
    };
    log.event(
        "start",
        format!(
            "watching {}; failing over to {} after {} failed checks",
            checks.describe(),
            standby.network_interface_id,
            args.failures
        ),
        Vec::new(),
    );

    // With --pair the member follows its role tag; that needs the instance behind the ENI.
    let own_instance = match (pair, standby.instance_id.as_deref()) {
        (Some(_), Some(instance)) => Some(instance.to_string()),
        (Some(_), None) => {
            return Err(Error::Usage(format!(
                "--pair: the watch follows its instance's {ROLE_TAG} tag, but {} is attached to no instance",
                standby.network_interface_id
            )))
        }
        (None, _) => None,
    };
    let mut watchdog = Watchdog::new(
        args.failures,
        args.hold_down,
        args.retry_after,
        args.startup_grace,
        Instant::now(),
    );
    // Until the role tag has been read, a member that follows it does not act.
    if own_instance.is_some() {
        watchdog.set_standby(false, Instant::now());
    }
    let mut role_seen: Option<String> = None;
    let mut next_role_read = Instant::now();
    let mut held_down_log = Throttle::new(HELD_DOWN_LOG_EVERY);
    let mut waiting_log = Throttle::new(WAITING_LOG_EVERY);
    let mut next_tick = Instant::now();
    loop {
        if let Some(limit) = args.max_runtime {
            if log.started.elapsed() >= limit {
                log.event("stop", "max runtime reached".into(), Vec::new());
                return Ok(ExitCode::SUCCESS);
            }
        }
        if let Some(instance) = own_instance.as_deref() {
            if Instant::now() >= next_role_read {
                next_role_read = Instant::now() + args.role_every;
                read_role(
                    &ec2,
                    instance,
                    &args.to.standby.role,
                    &mut role_seen,
                    &mut watchdog,
                    &log,
                )
                .await;
            }
        }
        if watchdog.is_standby() {
            let result = checks.run().await;
            let now = Instant::now();
            match (watchdog.observe(result.is_ok(), now), result) {
                (Verdict::Healthy { recovered: true }, _) => {
                    log.event("recovered", "active agent answers again".into(), Vec::new());
                }
                (Verdict::Healthy { recovered: false }, _) => {}
                (Verdict::WaitingForHealth { grace_left }, Err(reason)) => {
                    if waiting_log.due(now) {
                        let message = format!(
                            "{reason}; the active agent has not been healthy yet, failures count in {:.0}s",
                            grace_left.as_secs_f64()
                        );
                        log.event("waiting", message, Vec::new());
                    }
                }
                (Verdict::Failing { consecutive }, Err(reason)) => {
                    log.event(
                        "check_failed",
                        format!("{consecutive}/{}: {reason}", args.failures),
                        Vec::new(),
                    );
                }
                (Verdict::HeldDown { remaining }, Err(reason)) => {
                    if held_down_log.due(now) {
                        let secs = remaining.as_secs_f64();
                        let message = format!("{reason}; holding down for {secs:.0}s more");
                        log.event("held_down", message, Vec::new());
                    }
                }
                (Verdict::FailOver, Err(reason)) => {
                    log.event("failing_over", reason.to_string(), Vec::new());
                    let moved =
                        fail_over(&ec2, &moves, &standby, pair, args.to.aws.dry_run, &log).await;
                    match moved {
                        Ok(()) => {
                            watchdog.moved(Instant::now());
                            if let (Some(pair), Some(instance), false) =
                                (pair, own_instance.as_deref(), args.to.aws.dry_run)
                            {
                                take_the_active_role(&ec2, pair, instance, &mut watchdog, &log)
                                    .await;
                                role_seen = Some("active".into());
                                next_role_read = Instant::now() + args.role_every;
                            }
                            if args.once {
                                return Ok(ExitCode::SUCCESS);
                            }
                        }
                        Err(err) => {
                            log.event("failover_error", err.to_string(), Vec::new());
                            watchdog.move_failed(Instant::now());
                            if args.once {
                                return Err(err);
                            }
                        }
                    }
                }
                // Checked only while the standby, so idle cannot come back from a check.
                (Verdict::Idle, _) => {}
                (_, Ok(())) => {}
            }
        }
        next_tick += args.interval;
        let now = Instant::now();
        if next_tick < now {
            next_tick = now;
        }
        tokio::time::sleep_until(next_tick.into()).await;
    }
}

/// Reads this instance's role tag; only the standby role watches. A tag that cannot be read
/// keeps the last known role; a missing one means "not the standby", never a reason to act.
async fn read_role(
    ec2: &Ec2,
    instance: &str,
    standby_role: &str,
    role_seen: &mut Option<String>,
    watchdog: &mut Watchdog,
    log: &Log,
) {
    let role = match ec2.instance_role(instance).await {
        Ok(role) => role.unwrap_or_default(),
        Err(err) => {
            log.event(
                "role_error",
                format!("cannot read {instance}'s {ROLE_TAG} tag: {err}"),
                Vec::new(),
            );
            return;
        }
    };
    if role_seen.as_deref() == Some(role.as_str()) {
        return;
    }
    let standby = role == standby_role;
    watchdog.set_standby(standby, Instant::now());
    let message = match (standby, role.is_empty()) {
        (true, _) => format!("{instance} is tagged {ROLE_TAG}={role}: watching the active agent"),
        (false, true) => format!(
            "{instance} has no {ROLE_TAG} tag: not watching until it is tagged {standby_role}"
        ),
        (false, false) => format!(
            "{instance} is tagged {ROLE_TAG}={role}: idle until it is tagged {standby_role}"
        ),
    };
    log.event("role", message, Vec::new());
    *role_seen = Some(role);
}

/// Traffic is here now: the tags say so, and this member stops watching (the other member's
/// watch takes over once it reads its new standby tag).
async fn take_the_active_role(
    ec2: &Ec2,
    pair: &str,
    instance: &str,
    watchdog: &mut Watchdog,
    log: &Log,
) {
    match ec2.set_roles(pair, instance).await {
        Ok(changes) => {
            watchdog.set_standby(false, Instant::now());
            log.event(
                "role",
                format!(
                    "{instance} is the active agent of {pair} now; idle until it is tagged standby"
                ),
                changes,
            );
        }
        Err(err) => {
            // The move stands; the hold-down keeps this member from moving it again.
            log.event(
                "role_error",
                format!("traffic moved but the {ROLE_TAG} tags were not updated: {err}"),
                Vec::new(),
            );
        }
    }
}

async fn fail_over(
    ec2: &Ec2,
    moves: &Moves,
    standby: &super::ec2::Standby,
    pair: Option<&str>,
    dry_run: bool,
    log: &Log,
) -> Result<(), Error> {
    let plan = plan_moves(ec2, moves, standby, pair).await?;
    if plan.is_empty() {
        log.event(
            "in_place",
            format!("traffic already on {}", standby.network_interface_id),
            plan.in_place.clone(),
        );
        return Ok(());
    }
    let actions: Vec<String> = plan.actions.iter().map(ToString::to_string).collect();
    if dry_run {
        log.event("dry_run", "would run".into(), actions);
        return Ok(());
    }
    match ec2.apply(&plan).await {
        Ok(_) => {
            log.event(
                "failover",
                format!("moved traffic to {}", standby.network_interface_id),
                actions,
            );
            Ok(())
        }
        Err((applied, err)) => {
            let done = applied.iter().map(|a| a.action.to_string()).collect();
            log.event("failover_partial", err.to_string(), done);
            Err(err)
        }
    }
}

impl Checks {
    fn new(args: &WatchArgs) -> Result<Checks, Error> {
        let (readyz, readyz_path) = match &args.readyz {
            Some(text) => {
                let url = AdminUrl::parse(text)?;
                let path = if url.url("").ends_with("/readyz") {
                    String::new()
                } else {
                    "/readyz".to_string()
                };
                (Some(url), path)
            }
            None => (None, String::new()),
        };
        let prober = if args.probe {
            Some(Prober::new(&args.target)?)
        } else {
            None
        };
        if readyz.is_none() && prober.is_none() {
            return Err(Error::Usage(
                "nothing to watch: give --readyz URL and/or --probe".into(),
            ));
        }
        Ok(Checks {
            readyz,
            readyz_path,
            prober,
            timeout: args.target.timeout,
        })
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(readyz) = &self.readyz {
            parts.push(readyz.url(&self.readyz_path));
        }
        if self.prober.is_some() {
            parts.push("a probe request".to_string());
        }
        parts.join(" and ")
    }

    async fn run(&self) -> Result<(), CheckFailure> {
        if let Some(readyz) = &self.readyz {
            let response = readyz.get(&self.readyz_path, self.timeout).await?;
            if response.status != 200 {
                let body = String::from_utf8_lossy(&response.body);
                return Err(CheckFailure::NotReady {
                    status: response.status,
                    body: body.chars().take(200).collect(),
                });
            }
        }
        if let Some(prober) = &self.prober {
            let verdict = prober.probe().await.verdict;
            if !verdict.ok {
                return Err(CheckFailure::Probe {
                    phase: verdict.failed_phase.unwrap_or("request"),
                    message: verdict.message.unwrap_or_default(),
                });
            }
        }
        Ok(())
    }
}

/// Why one check of the active agent failed; the watch log's reason.
#[derive(Debug, thiserror::Error)]
enum CheckFailure {
    #[error(transparent)]
    Unreachable(#[from] AdminError),
    #[error("readyz answered {status}: {body}")]
    NotReady { status: u16, body: String },
    #[error("probe failed in {phase}: {message}")]
    Probe {
        phase: &'static str,
        message: String,
    },
}

/// A condition that repeats on every check, logged at most once per `every`.
struct Throttle {
    every: Duration,
    last: Option<Instant>,
}

impl Throttle {
    fn new(every: Duration) -> Throttle {
        Throttle { every, last: None }
    }

    fn due(&mut self, now: Instant) -> bool {
        if self.last.is_some_and(|at| now - at < self.every) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

struct Log {
    started: Instant,
    json: bool,
}

impl Log {
    fn event(&self, event: &str, message: String, actions: Vec<String>) {
        let elapsed_s = (self.started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        if self.json {
            let line = Event {
                elapsed_s,
                event,
                message,
                actions,
            };
            println!("{}", serde_json::to_string(&line).unwrap_or_default());
            return;
        }
        println!("[{elapsed_s:8.3}s] {event}: {message}");
        for action in actions {
            println!("             {action}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(300);
    const RETRY: Duration = Duration::from_secs(10);
    const GRACE: Duration = Duration::from_secs(600);

    /// A watchdog whose active agent has been seen healthy once, and when.
    fn armed(threshold: u32) -> (Watchdog, Instant) {
        let start = Instant::now();
        let mut dog = Watchdog::new(threshold, HOLD, RETRY, GRACE, start);
        assert_eq!(
            dog.observe(true, start),
            Verdict::Healthy { recovered: false }
        );
        (dog, start)
    }

    /// The verdicts for a run of checks at `at` (true: healthy).
    fn observe(dog: &mut Watchdog, at: Instant, checks: &[bool]) -> Vec<Verdict> {
        checks.iter().map(|&ok| dog.observe(ok, at)).collect()
    }

    const FAILING_ONCE: Verdict = Verdict::Failing { consecutive: 1 };
    const FAILING_TWICE: Verdict = Verdict::Failing { consecutive: 2 };

    #[test]
    fn fails_over_after_n_consecutive_failures_only() {
        let (mut dog, start) = armed(3);
        let checks = [false, false, true, false, false, false];
        assert_eq!(
            observe(&mut dog, start, &checks),
            [
                FAILING_ONCE,
                FAILING_TWICE,
                Verdict::Healthy { recovered: true },
                FAILING_ONCE,
                FAILING_TWICE,
                Verdict::FailOver
            ]
        );
    }

    #[test]
    fn an_active_agent_that_was_never_healthy_is_given_the_grace_period() {
        let start = Instant::now();
        let mut dog = Watchdog::new(1, HOLD, RETRY, GRACE, start);
        for second in [0, 2, 60, 599] {
            assert_eq!(
                dog.observe(false, start + Duration::from_secs(second)),
                Verdict::WaitingForHealth {
                    grace_left: GRACE - Duration::from_secs(second)
                },
                "second {second}"
            );
        }
        assert_eq!(dog.observe(false, start + GRACE), Verdict::FailOver);
    }

    #[test]
    fn failures_count_from_the_first_healthy_check_however_early() {
        let start = Instant::now();
        let mut dog = Watchdog::new(2, HOLD, RETRY, GRACE, start);
        assert!(matches!(
            dog.observe(false, start),
            Verdict::WaitingForHealth { .. }
        ));
        let up = start + Duration::from_secs(40);
        assert_eq!(dog.observe(true, up), Verdict::Healthy { recovered: false });
        assert_eq!(
            dog.observe(false, up + Duration::from_secs(1)),
            FAILING_ONCE
        );
        assert_eq!(
            dog.observe(false, up + Duration::from_secs(2)),
            Verdict::FailOver
        );
    }

    #[test]
    fn the_active_member_idles_and_a_new_standby_waits_for_health_again() {
        let (mut dog, start) = armed(1);
        dog.set_standby(false, start);
        assert_eq!(observe(&mut dog, start, &[false, true]), [Verdict::Idle; 2]);

        // Tagged standby again (the operator failed back): the other member must be seen
        // healthy before its failures count, even though this one saw it healthy long ago.
        let later = start + Duration::from_secs(3600);
        dog.set_standby(true, later);
        assert!(matches!(
            dog.observe(false, later),
            Verdict::WaitingForHealth { .. }
        ));
        assert_eq!(
            dog.observe(true, later),
            Verdict::Healthy { recovered: false }
        );
        assert_eq!(dog.observe(false, later), Verdict::FailOver);
    }

    #[test]
    fn staying_the_standby_keeps_the_count() {
        let (mut dog, start) = armed(2);
        assert_eq!(dog.observe(false, start), FAILING_ONCE);
        dog.set_standby(true, start);
        assert_eq!(dog.observe(false, start), Verdict::FailOver);
    }

    #[test]
    fn holds_down_after_a_move_then_may_move_again() {
        let (mut dog, start) = armed(2);
        assert_eq!(
            observe(&mut dog, start, &[false, false]),
            [FAILING_ONCE, Verdict::FailOver]
        );
        dog.moved(start);
        let later = start + Duration::from_secs(100);
        assert_eq!(
            dog.observe(false, later),
            Verdict::HeldDown {
                remaining: Duration::from_secs(200)
            }
        );
        assert_eq!(dog.observe(false, start + HOLD), Verdict::FailOver);
    }

    #[test]
    fn a_failed_move_is_retried_after_the_short_pause() {
        let (mut dog, start) = armed(1);
        assert_eq!(dog.observe(false, start), Verdict::FailOver);
        dog.move_failed(start);
        assert!(matches!(
            dog.observe(false, start + Duration::from_secs(5)),
            Verdict::HeldDown { .. }
        ));
        assert_eq!(dog.observe(false, start + RETRY), Verdict::FailOver);
    }

    #[test]
    fn healthy_checks_never_trigger_a_move() {
        let (mut dog, start) = armed(1);
        for second in 0..100 {
            assert_eq!(
                dog.observe(true, start + Duration::from_secs(second)),
                Verdict::Healthy { recovered: false }
            );
        }
    }
}
