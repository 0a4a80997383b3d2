//! `xpart failover`: move traffic from the active agent to its standby with the EC2 API.
//! Each command reads the current state, computes a [`plan::Plan`] (the exact calls it will
//! make), prints it, and applies it unless `--dry-run`. `watch` does the same automatically
//! when the active agent stops answering.

pub mod ec2;
pub mod plan;
pub mod watch;

use std::net::IpAddr;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use ipnet::IpNet;
use serde::Serialize;

use self::ec2::{Applied, Ec2, Standby};
use self::plan::Plan;
use crate::Error;

/// Tag naming the agent pair an instance or route table belongs to.
pub const PAIR_TAG: &str = "xpart:pair";
/// Tag naming an instance's role in its pair: `active` or `standby`.
pub const ROLE_TAG: &str = "xpart:role";

// One value per run, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum FailoverCommand {
    /// Point routes for the given CIDRs at the standby's ENI (ReplaceRoute, or CreateRoute when missing).
    #[command(after_help = "\
Examples:
  xpart failover route --cidr 100.64.0.0/30 --route-table rtb-0a1b --to-instance i-0standby
  xpart failover route --cidr 100.64.0.0/30 --pair bedrock --dry-run
      # route tables tagged xpart:pair=bedrock, standby = instance tagged xpart:role=standby")]
    Route(RouteArgs),
    /// Move secondary private IPs (what callers dial) to the standby's ENI.
    #[command(after_help = "\
Examples:
  xpart failover vip --ip 10.0.1.100 --pair bedrock
  xpart failover vip --ip 10.0.1.100 --to-eni eni-0standby --dry-run")]
    Vip(VipArgs),
    /// Move an Elastic IP to the standby's ENI (AssociateAddress with AllowReassociation).
    #[command(after_help = "\
Examples:
  xpart failover eip --allocation-id eipalloc-0abc --pair relays --role standby
  xpart failover eip --public-ip 198.51.100.7 --to-instance i-0standby")]
    Eip(EipArgs),
    /// Turn source/destination checking off (or on) for routing appliances.
    #[command(after_help = "\
Examples:
  xpart failover source-dest-check --pair bedrock            # both agents of the pair, off
  xpart failover source-dest-check --instance i-0abc --enable")]
    SourceDestCheck(SourceDestCheckArgs),
    /// Run on the standby: watch the active agent and fail over after N failed checks.
    Watch(watch::WatchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AwsArgs {
    /// AWS region (default: AWS_REGION or the profile's region).
    #[arg(long)]
    pub region: Option<String>,
    /// Named profile from ~/.aws/config.
    #[arg(long)]
    pub profile: Option<String>,
    /// EC2 endpoint URL (a VPC endpoint, or a test server).
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Print the plan (as the equivalent aws CLI commands) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Where a move goes and how to reach EC2: what every move command shares.
#[derive(Debug, Clone, Args)]
pub struct MoveTarget {
    #[command(flatten)]
    pub standby: StandbyArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Debug, Clone, Args)]
pub struct StandbyArgs {
    /// The standby's network interface.
    /// With --pair, the pair's tags still name the route tables and the role tags to update.
    #[arg(long, value_name = "ENI", conflicts_with = "to_instance")]
    pub to_eni: Option<String>,
    /// The standby instance (its primary network interface is used).
    #[arg(long, value_name = "INSTANCE_ID", conflicts_with = "pair")]
    pub to_instance: Option<String>,
    /// Find the standby by tags: xpart:pair=NAME and xpart:role=ROLE.
    #[arg(long, value_name = "NAME")]
    pub pair: Option<String>,
    /// The role tag value of the instance to move to.
    #[arg(long, default_value = "standby")]
    pub role: String,
    /// After the move, tag the target instance and its interface xpart:role=active and the
    /// pair's other members standby (needs --pair; `watch --pair` always does this).
    #[arg(long, requires = "pair")]
    pub set_roles: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RouteSpec {
    /// Destination CIDR to move (repeatable).
    #[arg(long = "cidr", value_name = "CIDR")]
    pub cidrs: Vec<IpNet>,
    /// Route table to change (repeatable).
    #[arg(
        long = "route-table",
        value_name = "RTB_ID",
        conflicts_with = "route_table_tag"
    )]
    pub route_tables: Vec<String>,
    /// Change the route tables carrying this tag (default with --pair: xpart:pair=NAME).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub route_table_tag: Option<(String, String)>,
}

#[derive(Debug, Clone, Args)]
pub struct VipSpec {
    /// Secondary private IP to move (repeatable).
    #[arg(long = "ip", value_name = "ADDRESS")]
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Args)]
pub struct EipSpec {
    /// Elastic IP allocation to move (repeatable).
    #[arg(long = "allocation-id", value_name = "EIPALLOC_ID")]
    pub allocation_ids: Vec<String>,
    /// Elastic IP to move, by address (repeatable).
    #[arg(long = "public-ip", value_name = "ADDRESS")]
    pub public_ips: Vec<IpAddr>,
    /// Private IP on the standby's ENI to map the Elastic IP to (default: its primary).
    #[arg(long, value_name = "ADDRESS")]
    pub private_ip: Option<IpAddr>,
}

/// One kind of move's own arguments (`--cidr`, `--ip`, `--allocation-id`).
pub trait MoveSpec: Args + Clone {
    fn into_moves(self) -> Moves;
}

/// A single-kind move command: what to move, then where to.
#[derive(Debug, Clone, Args)]
pub struct MoveArgs<S: MoveSpec> {
    #[command(flatten)]
    pub spec: S,
    #[command(flatten)]
    pub to: MoveTarget,
}

impl<S: MoveSpec> MoveArgs<S> {
    pub fn moves(&self) -> Moves {
        self.spec.clone().into_moves()
    }
}

/// Each spec fills its own field of [`Moves`].
macro_rules! move_spec {
    ($spec:ty => $field:ident) => {
        impl MoveSpec for $spec {
            fn into_moves(self) -> Moves {
                Moves {
                    $field: Some(self),
                    ..Moves::default()
                }
            }
        }
    };
}
move_spec!(RouteSpec => routes);
move_spec!(VipSpec => vip);
move_spec!(EipSpec => eip);

pub type RouteArgs = MoveArgs<RouteSpec>;
pub type VipArgs = MoveArgs<VipSpec>;
pub type EipArgs = MoveArgs<EipSpec>;

#[derive(Debug, Args)]
pub struct SourceDestCheckArgs {
    /// Instance to change (repeatable).
    #[arg(long = "instance", value_name = "INSTANCE_ID", conflicts_with = "pair")]
    pub instances: Vec<String>,
    /// Every instance tagged xpart:pair=NAME.
    #[arg(long, value_name = "NAME")]
    pub pair: Option<String>,
    /// Turn the check on (default: off, as a routing appliance needs).
    #[arg(long)]
    pub enable: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// Which failover moves to make; `watch` and `drill` combine several.
#[derive(Debug, Clone, Default)]
pub struct Moves {
    pub routes: Option<RouteSpec>,
    pub vip: Option<VipSpec>,
    pub eip: Option<EipSpec>,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    dry_run: bool,
    standby: Option<&'a Standby>,
    plan: &'a Plan,
    applied: &'a [Applied],
}

pub async fn run(command: FailoverCommand, json: bool) -> Result<ExitCode, Error> {
    match command {
        FailoverCommand::Route(args) => move_to_standby(&args.moves(), &args.to, json).await,
        FailoverCommand::Vip(args) => move_to_standby(&args.moves(), &args.to, json).await,
        FailoverCommand::Eip(args) => move_to_standby(&args.moves(), &args.to, json).await,
        FailoverCommand::SourceDestCheck(args) => source_dest_check(args, json).await,
        FailoverCommand::Watch(args) => watch::run(args, json).await,
    }
}

async fn move_to_standby(
    moves: &Moves,
    target: &MoveTarget,
    json: bool,
) -> Result<ExitCode, Error> {
    let aws = &target.aws;
    let planned = plan_for_standby(moves, target).await?;
    let (ec2, standby) = (&planned.ec2, &planned.standby);
    let code = execute(ec2, Some(standby), &planned.plan, aws.dry_run, json).await?;
    if let (true, false, Some(pair)) = (planned.set_roles, aws.dry_run, planned.pair) {
        let Some(instance) = standby.instance_id.as_deref() else {
            return Err(Error::Usage(format!(
                "--set-roles: {} is not attached to an instance, so no instance can be tagged active",
                standby.network_interface_id
            )));
        };
        for change in ec2.set_roles(pair, instance).await? {
            if !json {
                println!("done: {change}");
            }
        }
    }
    Ok(code)
}

/// Plans and applies a move without printing, returning the actions taken; drills report
/// them in their own output.
pub async fn move_quietly(moves: &Moves, target: &MoveTarget) -> Result<Vec<String>, Error> {
    let planned = plan_for_standby(moves, target).await?;
    let mut actions: Vec<String> = planned
        .plan
        .actions
        .iter()
        .map(ToString::to_string)
        .collect();
    if target.aws.dry_run {
        return Ok(actions);
    }
    planned
        .ec2
        .apply(&planned.plan)
        .await
        .map_err(|(_, err)| err)?;
    let instance = planned.standby.instance_id.as_deref();
    if let (true, Some(pair), Some(instance)) = (planned.set_roles, planned.pair, instance) {
        actions.extend(planned.ec2.set_roles(pair, instance).await?);
    }
    Ok(actions)
}

/// A move planned against the resolved standby, with what the caller still needs to apply it.
struct Planned<'a> {
    ec2: Ec2,
    standby: Standby,
    plan: Plan,
    pair: Option<&'a str>,
    set_roles: bool,
}

async fn plan_for_standby<'a>(moves: &Moves, target: &'a MoveTarget) -> Result<Planned<'a>, Error> {
    moves.validate()?;
    let standby = &target.standby;
    let ec2 = Ec2::connect(&target.aws).await?;
    let pair = standby.pair.as_deref();
    let resolved = ec2.resolve_standby(standby).await?;
    let plan = plan_moves(&ec2, moves, &resolved, pair).await?;
    Ok(Planned {
        ec2,
        standby: resolved,
        plan,
        pair,
        set_roles: standby.set_roles,
    })
}

impl Moves {
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(routes) = &self.routes {
            if routes.cidrs.is_empty() {
                return Err(Error::Usage(
                    "give the destination(s) to move with --cidr CIDR".into(),
                ));
            }
        }
        if let Some(vip) = &self.vip {
            if vip.ips.is_empty() {
                return Err(Error::Usage(
                    "give the address(es) to move with --ip ADDRESS".into(),
                ));
            }
        }
        if let Some(eip) = &self.eip {
            if eip.allocation_ids.is_empty() && eip.public_ips.is_empty() {
                return Err(Error::Usage(
                    "name the Elastic IP with --allocation-id or --public-ip".into(),
                ));
            }
        }
        if self.routes.is_none() && self.vip.is_none() && self.eip.is_none() {
            return Err(Error::Usage(
                "nothing to move: give --cidr (routes), --ip (floating IP) or --allocation-id/--public-ip (Elastic IP)".into(),
            ));
        }
        Ok(())
    }
}

/// Reads the state each requested move depends on and plans all of them.
pub async fn plan_moves(
    ec2: &Ec2,
    moves: &Moves,
    standby: &Standby,
    pair: Option<&str>,
) -> Result<Plan, Error> {
    let eni = standby.network_interface_id.as_str();
    let mut plan = Plan::default();
    if let Some(routes) = &moves.routes {
        let tables = route_tables_for(ec2, routes, pair).await?;
        plan.extend(plan::plan_routes(&tables, &routes.cidrs, eni));
    }
    if let Some(vip) = &moves.vip {
        let interfaces = ec2.interfaces_in_vpc(standby.vpc_id.as_deref()).await?;
        let vip_plan = plan::plan_vip(&interfaces, &vip.ips, eni)
            .map_err(|err| Error::Usage(err.to_string()))?;
        plan.extend(vip_plan);
    }
    if let Some(eip) = &moves.eip {
        let public_ips: Vec<String> = eip.public_ips.iter().map(ToString::to_string).collect();
        let addresses = ec2.addresses(&eip.allocation_ids, &public_ips).await?;
        let private_ip = eip.private_ip.map(|ip| ip.to_string());
        plan.extend(plan::plan_eip(&addresses, eni, private_ip.as_deref()));
    }
    Ok(plan)
}

impl RouteSpec {
    /// The tag that selects route tables: explicit, or the pair's own tag.
    fn discovery_tag(&self, pair: Option<&str>) -> Option<(String, String)> {
        self.route_table_tag
            .clone()
            .or_else(|| pair.map(|pair| (PAIR_TAG.to_string(), pair.to_string())))
    }
}

async fn route_tables_for(
    ec2: &Ec2,
    routes: &RouteSpec,
    pair: Option<&str>,
) -> Result<Vec<plan::RouteTableState>, Error> {
    if !routes.route_tables.is_empty() {
        return ec2.route_tables(&routes.route_tables, None).await;
    }
    let Some((key, value)) = routes.discovery_tag(pair) else {
        return Err(Error::Usage(
            "name the route tables: --route-table RTB_ID, --route-table-tag KEY=VALUE, or --pair NAME (tables tagged xpart:pair=NAME)".into(),
        ));
    };
    let tables = ec2.route_tables(&[], Some((&key, &value))).await?;
    if tables.is_empty() {
        return Err(Error::Aws {
            operation: "DescribeRouteTables".into(),
            message: format!("no route table is tagged {key}={value}; tag the tables to change, or pass --route-table"),
        });
    }
    Ok(tables)
}

async fn source_dest_check(args: SourceDestCheckArgs, json: bool) -> Result<ExitCode, Error> {
    let ec2 = Ec2::connect(&args.aws).await?;
    let ids = match (&args.pair, args.instances.is_empty()) {
        (Some(pair), _) => {
            let ids = ec2.instances_tagged(pair, None).await?;
            if ids.is_empty() {
                return Err(Error::Aws {
                    operation: "DescribeInstances".into(),
                    message: format!("no instance is tagged {PAIR_TAG}={pair}"),
                });
            }
            ids
        }
        (None, false) => args.instances.clone(),
        (None, true) => {
            return Err(Error::Usage(
                "name the instances: --instance ID (repeatable) or --pair NAME".into(),
            ))
        }
    };
    let instances = ec2.instances(&ids).await?;
    let plan = plan::plan_source_dest_check(&instances, args.enable);
    execute(&ec2, None, &plan, args.aws.dry_run, json).await
}

/// Prints the plan, applies it unless dry-run, and prints what was done.
pub async fn execute(
    ec2: &Ec2,
    standby: Option<&Standby>,
    plan: &Plan,
    dry_run: bool,
    json: bool,
) -> Result<ExitCode, Error> {
    if !json {
        print_plan(standby, plan, dry_run);
    }
    let (applied, failure) = if dry_run {
        (Vec::new(), None)
    } else {
        match ec2.apply(plan).await {
            Ok(applied) => (applied, None),
            Err((applied, err)) => (applied, Some(err)),
        }
    };
    if json {
        let report = Report {
            dry_run,
            standby,
            plan,
            applied: &applied,
        };
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else if !dry_run {
        print_applied(plan, &applied, failure.is_some());
    }
    match failure {
        Some(err) => Err(err),
        None => Ok(ExitCode::SUCCESS),
    }
}

fn print_plan(standby: Option<&Standby>, plan: &Plan, dry_run: bool) {
    if let Some(standby) = standby {
        match &standby.instance_id {
            Some(instance) => println!(
                "standby: {} (instance {instance})",
                standby.network_interface_id
            ),
            None => println!("standby: {}", standby.network_interface_id),
        }
    }
    for line in &plan.in_place {
        println!("in place: {line}");
    }
    if plan.is_empty() {
        println!("nothing to change");
        return;
    }
    let heading = if dry_run {
        "dry run, would run:"
    } else {
        "plan:"
    };
    println!("{heading}");
    for action in &plan.actions {
        println!("  {action}");
    }
}

fn print_applied(plan: &Plan, applied: &[Applied], failed: bool) {
    if plan.is_empty() {
        return;
    }
    for done in applied {
        let note = if done.changed {
            "done"
        } else {
            "skipped (already done by EC2)"
        };
        println!("{note}: {}", done.action);
    }
    if failed {
        println!(
            "stopped after {} of {} changes",
            applied.len(),
            plan.actions.len()
        );
    }
}

/// A `--route-table-tag` without a key.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not KEY=VALUE")]
pub struct TagError(String);

fn parse_tag(text: &str) -> Result<(String, String), TagError> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(TagError(text.to_string())),
    }
}
