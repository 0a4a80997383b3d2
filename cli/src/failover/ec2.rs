//! The EC2 side of failover: read the state a [`Plan`] is computed from, and apply a plan.
//! Every SDK error leaves this module as an [`Error::Aws`] naming the operation and what to
//! do about it; throttling is retried by the SDK's standard retry strategy with backoff.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::describe_instances::builders::DescribeInstancesFluentBuilder;
use aws_sdk_ec2::operation::describe_network_interfaces::builders::DescribeNetworkInterfacesFluentBuilder;
use aws_sdk_ec2::types::{AttributeBooleanValue, Filter, Instance, NetworkInterface, Tag};
use aws_sdk_ec2::Client;
use xpart_daemon::error_chain;

use super::plan::{
    Action, AddressState, InstanceState, InterfaceIp, InterfaceState, Plan, RouteState,
    RouteTableState,
};
use super::{AwsArgs, StandbyArgs, PAIR_TAG, ROLE_TAG};
use crate::Error;

/// Attempts per call; throttling (RequestLimitExceeded) backs off exponentially between them.
const MAX_ATTEMPTS: u32 = 6;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Ec2 {
    client: Client,
}

/// The interface that traffic moves to, and where it lives.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Standby {
    pub instance_id: Option<String>,
    pub network_interface_id: String,
    pub vpc_id: Option<String>,
}

/// What one applied action did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    pub action: Action,
    /// `false` when the executor found the change already made (e.g. EC2 had released the IP).
    pub changed: bool,
}

impl Ec2 {
    pub async fn connect(args: &AwsArgs) -> Result<Ec2, Error> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(MAX_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(200)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            );
        if let Some(region) = &args.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(profile) = &args.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(endpoint) = &args.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        if config.region().is_none() {
            return Err(Error::Usage(
                "no AWS region: pass --region, or set AWS_REGION or a region in the profile".into(),
            ));
        }
        Ok(Ec2 {
            client: Client::new(&config),
        })
    }

    pub async fn resolve_standby(&self, args: &StandbyArgs) -> Result<Standby, Error> {
        if let Some(eni) = &args.to_eni {
            return self.standby_from_interface(eni).await;
        }
        let instance_id = match (&args.to_instance, &args.pair) {
            (Some(instance), _) => instance.clone(),
            (None, Some(pair)) => self.instance_by_tags(pair, &args.role).await?,
            (None, None) => {
                return Err(Error::Usage(
                    "name the standby: --to-eni ENI, --to-instance ID, or --pair NAME (finds the instance tagged xpart:pair=NAME, xpart:role=standby)".into(),
                ))
            }
        };
        self.standby_from_instance(&instance_id).await
    }

    async fn standby_from_interface(&self, eni: &str) -> Result<Standby, Error> {
        let Some(interface) = self.interface(eni).await? else {
            return Err(not_found("network interface", eni));
        };
        Ok(Standby {
            instance_id: attached_instance(&interface).map(str::to_string),
            network_interface_id: eni.to_string(),
            vpc_id: interface.vpc_id().map(str::to_string),
        })
    }

    async fn standby_from_instance(&self, instance_id: &str) -> Result<Standby, Error> {
        let instance = self.describe_instance(instance_id).await?;
        // A member interface (tagged with the pair, attached at boot by xpart-boot) carries the
        // member's fixed address and the floating one; without one, the primary interface
        // (device index 0) carries the instance's routes and IPs.
        if let Some(member) = self.member_interface(instance_id).await? {
            return Ok(Standby {
                instance_id: Some(instance_id.to_string()),
                network_interface_id: member,
                vpc_id: instance.vpc_id().map(str::to_string),
            });
        }
        let primary = instance
            .network_interfaces()
            .iter()
            .find(|interface| {
                interface
                    .attachment()
                    .and_then(|attachment| attachment.device_index())
                    == Some(0)
            })
            .or_else(|| instance.network_interfaces().first());
        let Some(eni) = primary.and_then(|interface| interface.network_interface_id()) else {
            return Err(Error::Aws {
                operation: "DescribeInstances".into(),
                message: format!("instance {instance_id} has no network interface; is it running?"),
            });
        };
        Ok(Standby {
            instance_id: Some(instance_id.to_string()),
            network_interface_id: eni.to_string(),
            vpc_id: instance.vpc_id().map(str::to_string),
        })
    }

    /// One instance by id; `not_found` when EC2 knows none.
    async fn describe_instance(&self, instance_id: &str) -> Result<Instance, Error> {
        let request = self.client.describe_instances().instance_ids(instance_id);
        let instances = instances_of(request).await?;
        instances
            .into_iter()
            .next()
            .ok_or_else(|| not_found("instance", instance_id))
    }

    async fn member_interface(&self, instance_id: &str) -> Result<Option<String>, Error> {
        let filters = vec![
            filter("attachment.instance-id", instance_id),
            filter("tag-key", PAIR_TAG),
        ];
        let interfaces = self.interfaces_matching(filters).await?;
        let mut members: Vec<&str> = interfaces
            .iter()
            .filter(|interface| attached_instance(interface) == Some(instance_id))
            .filter_map(|interface| interface.network_interface_id())
            .collect();
        members.sort_unstable();
        Ok(members.first().map(|eni| eni.to_string()))
    }

    /// The `xpart:role` tag of one instance, `None` when it carries none.
    pub async fn instance_role(&self, instance_id: &str) -> Result<Option<String>, Error> {
        let instance = self.describe_instance(instance_id).await?;
        Ok(role_tag(instance.tags()))
    }

    /// After traffic moved to `active_instance`: tags it and its member interface
    /// `xpart:role=active`, and every other member of the pair (instances, and interfaces that
    /// carry a role tag) `standby`, so the watch and the next first boot of each member know
    /// which part it plays. Returns the tag changes made.
    pub async fn set_roles(&self, pair: &str, active_instance: &str) -> Result<Vec<String>, Error> {
        let mut wanted: Vec<(String, Option<String>, &'static str)> = Vec::new();
        let instances = self.instances_in_pair(pair, None).await?;
        for instance in &instances {
            let Some(id) = instance.instance_id() else {
                continue;
            };
            let role = role_name(id == active_instance);
            wanted.push((id.to_string(), role_tag(instance.tags()), role));
        }
        let in_pair = filter(&format!("tag:{PAIR_TAG}"), pair);
        let interfaces = self
            .interfaces_matching(vec![in_pair, filter("tag-key", ROLE_TAG)])
            .await?;
        for interface in &interfaces {
            let Some(id) = interface.network_interface_id() else {
                continue;
            };
            let role = role_name(attached_instance(interface) == Some(active_instance));
            wanted.push((id.to_string(), role_tag(interface.tag_set()), role));
        }
        let mut changes = Vec::new();
        for (resource, current, role) in wanted {
            if current.as_deref() == Some(role) {
                continue;
            }
            self.client
                .create_tags()
                .resources(&resource)
                .tags(Tag::builder().key(ROLE_TAG).value(role).build())
                .send()
                .await
                .for_operation("CreateTags")?;
            changes.push(format!(
                "aws ec2 create-tags --resources {resource} --tags Key={ROLE_TAG},Value={role}"
            ));
        }
        Ok(changes)
    }

    /// Exactly one instance may carry a pair's role tag: two would make the target ambiguous.
    async fn instance_by_tags(&self, pair: &str, role: &str) -> Result<String, Error> {
        let ids = self.instances_tagged(pair, Some(role)).await?;
        match ids.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(Error::Aws {
                operation: "DescribeInstances".into(),
                message: format!(
                    "no running instance tagged {PAIR_TAG}={pair} and {ROLE_TAG}={role}; tag the standby agent, or pass --to-instance"
                ),
            }),
            many => Err(Error::Aws {
                operation: "DescribeInstances".into(),
                message: format!(
                    "{} instances are tagged {PAIR_TAG}={pair}, {ROLE_TAG}={role} ({}); tag exactly one, or pass --to-instance",
                    many.len(),
                    many.join(", ")
                ),
            }),
        }
    }

    pub async fn instances_tagged(
        &self,
        pair: &str,
        role: Option<&str>,
    ) -> Result<Vec<String>, Error> {
        let instances = self.instances_in_pair(pair, role).await?;
        let mut ids: Vec<String> = instances
            .iter()
            .filter_map(|instance| instance.instance_id().map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub async fn route_tables(
        &self,
        ids: &[String],
        tag: Option<(&str, &str)>,
    ) -> Result<Vec<RouteTableState>, Error> {
        let mut request = self.client.describe_route_tables();
        for id in ids {
            request = request.route_table_ids(id);
        }
        if let Some((key, value)) = tag {
            request = request.filters(filter(&format!("tag:{key}"), value));
        }
        let output = request.send().await.for_operation("DescribeRouteTables")?;
        let tables = output
            .route_tables()
            .iter()
            .map(|table| RouteTableState {
                id: table.route_table_id().unwrap_or_default().to_string(),
                routes: table
                    .routes()
                    .iter()
                    .filter_map(|route| {
                        Some(RouteState {
                            destination_cidr: route.destination_cidr_block()?.to_string(),
                            target: route_target(route),
                            network_interface_id: route.network_interface_id().map(str::to_string),
                        })
                    })
                    .collect(),
            })
            .collect();
        Ok(tables)
    }

    pub async fn interfaces_in_vpc(
        &self,
        vpc_id: Option<&str>,
    ) -> Result<Vec<InterfaceState>, Error> {
        let filters = vpc_id
            .map(|vpc_id| filter("vpc-id", vpc_id))
            .into_iter()
            .collect();
        // Scanned here rather than filtered by `addresses.private-ip-address`: the filter
        // is not applied to secondary addresses by every EC2 implementation.
        let interfaces = self.interfaces_matching(filters).await?;
        let interfaces = interfaces
            .iter()
            .map(|interface| InterfaceState {
                id: interface
                    .network_interface_id()
                    .unwrap_or_default()
                    .to_string(),
                private_ips: interface
                    .private_ip_addresses()
                    .iter()
                    .filter_map(|ip| {
                        Some(InterfaceIp {
                            address: ip.private_ip_address()?.to_string(),
                            primary: ip.primary().unwrap_or(false),
                        })
                    })
                    .collect(),
            })
            .collect();
        Ok(interfaces)
    }

    pub async fn addresses(
        &self,
        allocation_ids: &[String],
        public_ips: &[String],
    ) -> Result<Vec<AddressState>, Error> {
        let mut request = self.client.describe_addresses();
        for id in allocation_ids {
            request = request.allocation_ids(id);
        }
        for ip in public_ips {
            request = request.public_ips(ip);
        }
        let output = request.send().await.for_operation("DescribeAddresses")?;
        let addresses: Vec<AddressState> = output
            .addresses()
            .iter()
            .map(|address| AddressState {
                allocation_id: address.allocation_id().unwrap_or_default().to_string(),
                public_ip: address.public_ip().unwrap_or_default().to_string(),
                network_interface_id: address.network_interface_id().map(str::to_string),
                private_ip: address.private_ip_address().map(str::to_string),
            })
            .collect();
        for wanted in allocation_ids {
            if !addresses.iter().any(|a| &a.allocation_id == wanted) {
                return Err(not_found("Elastic IP allocation", wanted));
            }
        }
        for wanted in public_ips {
            if !addresses.iter().any(|a| &a.public_ip == wanted) {
                return Err(not_found("Elastic IP", wanted));
            }
        }
        Ok(addresses)
    }

    pub async fn instances(&self, ids: &[String]) -> Result<Vec<InstanceState>, Error> {
        let request = self.client.describe_instances();
        let instances = instances_of(request.set_instance_ids(Some(ids.to_vec()))).await?;
        let instances: Vec<InstanceState> = instances
            .iter()
            .map(|instance| InstanceState {
                id: instance.instance_id().unwrap_or_default().to_string(),
                source_dest_check: instance.source_dest_check(),
            })
            .collect();
        for wanted in ids {
            if !instances.iter().any(|i| &i.id == wanted) {
                return Err(not_found("instance", wanted));
            }
        }
        Ok(instances)
    }

    /// Applies actions in order and stops at the first failure, reporting what was done
    /// before it so a partial failover is visible.
    pub async fn apply(&self, plan: &Plan) -> Result<Vec<Applied>, (Vec<Applied>, Error)> {
        let mut applied = Vec::new();
        for action in &plan.actions {
            match self.apply_one(action).await {
                Ok(changed) => applied.push(Applied {
                    action: action.clone(),
                    changed,
                }),
                Err(err) => return Err((applied, err)),
            }
        }
        Ok(applied)
    }

    async fn apply_one(&self, action: &Action) -> Result<bool, Error> {
        match action {
            Action::ReplaceRoute {
                route_table_id,
                destination_cidr,
                network_interface_id,
                ..
            } => {
                self.client
                    .replace_route()
                    .route_table_id(route_table_id)
                    .destination_cidr_block(destination_cidr)
                    .network_interface_id(network_interface_id)
                    .send()
                    .await
                    .for_operation("ReplaceRoute")?;
            }
            Action::CreateRoute {
                route_table_id,
                destination_cidr,
                network_interface_id,
            } => {
                self.client
                    .create_route()
                    .route_table_id(route_table_id)
                    .destination_cidr_block(destination_cidr)
                    .network_interface_id(network_interface_id)
                    .send()
                    .await
                    .for_operation("CreateRoute")?;
            }
            Action::AssignPrivateIp {
                network_interface_id,
                private_ip,
                ..
            } => {
                self.client
                    .assign_private_ip_addresses()
                    .network_interface_id(network_interface_id)
                    .private_ip_addresses(private_ip)
                    .allow_reassignment(true)
                    .send()
                    .await
                    .for_operation("AssignPrivateIpAddresses")?;
            }
            Action::UnassignPrivateIp {
                network_interface_id,
                private_ip,
            } => {
                if !self
                    .interface_holds(network_interface_id, private_ip)
                    .await?
                {
                    return Ok(false);
                }
                self.client
                    .unassign_private_ip_addresses()
                    .network_interface_id(network_interface_id)
                    .private_ip_addresses(private_ip)
                    .send()
                    .await
                    .for_operation("UnassignPrivateIpAddresses")?;
            }
            Action::AssociateAddress {
                allocation_id,
                network_interface_id,
                private_ip,
                ..
            } => {
                self.client
                    .associate_address()
                    .allocation_id(allocation_id)
                    .network_interface_id(network_interface_id)
                    .set_private_ip_address(private_ip.clone())
                    .allow_reassociation(true)
                    .send()
                    .await
                    .for_operation("AssociateAddress")?;
            }
            Action::SetSourceDestCheck {
                instance_id,
                enabled,
            } => {
                self.client
                    .modify_instance_attribute()
                    .instance_id(instance_id)
                    .source_dest_check(AttributeBooleanValue::builder().value(*enabled).build())
                    .send()
                    .await
                    .for_operation("ModifyInstanceAttribute")?;
            }
        }
        Ok(true)
    }

    async fn interface_holds(&self, eni: &str, ip: &str) -> Result<bool, Error> {
        let Some(interface) = self.interface(eni).await? else {
            return Ok(false);
        };
        Ok(interface
            .private_ip_addresses()
            .iter()
            .any(|held| held.private_ip_address() == Some(ip)))
    }

    /// The members of `pair` that still exist, those with `role` only when one is given.
    async fn instances_in_pair(
        &self,
        pair: &str,
        role: Option<&str>,
    ) -> Result<Vec<Instance>, Error> {
        let mut filters = vec![filter(&format!("tag:{PAIR_TAG}"), pair), not_terminated()];
        if let Some(role) = role {
            filters.push(filter(&format!("tag:{ROLE_TAG}"), role));
        }
        instances_of(self.client.describe_instances().set_filters(Some(filters))).await
    }

    /// One network interface by id; an id EC2 does not know fails the call.
    async fn interface(&self, eni: &str) -> Result<Option<NetworkInterface>, Error> {
        let request = self.client.describe_network_interfaces();
        let interfaces = interfaces_of(request.network_interface_ids(eni)).await?;
        Ok(interfaces.into_iter().next())
    }

    async fn interfaces_matching(
        &self,
        filters: Vec<Filter>,
    ) -> Result<Vec<NetworkInterface>, Error> {
        let request = self.client.describe_network_interfaces();
        interfaces_of(request.set_filters(Some(filters))).await
    }
}

/// Instances that still exist (a terminated one lingers in answers for a while).
fn not_terminated() -> Filter {
    Filter::builder()
        .name("instance-state-name")
        .values("pending")
        .values("running")
        .values("stopping")
        .values("stopped")
        .build()
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

/// Sends a DescribeInstances request; the instances it answers with, out of their
/// reservations.
async fn instances_of(request: DescribeInstancesFluentBuilder) -> Result<Vec<Instance>, Error> {
    let output = request.send().await.for_operation("DescribeInstances")?;
    let reservations = output.reservations.unwrap_or_default();
    Ok(reservations
        .into_iter()
        .flat_map(|reservation| reservation.instances.unwrap_or_default())
        .collect())
}

async fn interfaces_of(
    request: DescribeNetworkInterfacesFluentBuilder,
) -> Result<Vec<NetworkInterface>, Error> {
    let output = request
        .send()
        .await
        .for_operation("DescribeNetworkInterfaces")?;
    Ok(output.network_interfaces.unwrap_or_default())
}

fn attached_instance(interface: &NetworkInterface) -> Option<&str> {
    interface
        .attachment()
        .and_then(|attachment| attachment.instance_id())
}

/// The value of the `xpart:role` tag among `tags`.
fn role_tag(tags: &[Tag]) -> Option<String> {
    tags.iter()
        .find(|tag| tag.key() == Some(ROLE_TAG))
        .and_then(|tag| tag.value())
        .map(str::to_string)
}

fn role_name(active: bool) -> &'static str {
    if active {
        "active"
    } else {
        "standby"
    }
}

fn route_target(route: &aws_sdk_ec2::types::Route) -> String {
    let target = route
        .network_interface_id()
        .or(route.instance_id())
        .or(route.nat_gateway_id())
        .or(route.transit_gateway_id())
        .or(route.vpc_peering_connection_id())
        .or(route.gateway_id());
    match (target, route.state()) {
        (_, Some(aws_sdk_ec2::types::RouteState::Blackhole)) => {
            format!("blackhole ({})", target.unwrap_or("deleted target"))
        }
        (Some(target), _) => target.to_string(),
        (None, _) => "unknown target".into(),
    }
}

fn not_found(what: &str, id: &str) -> Error {
    Error::Aws {
        operation: "lookup".into(),
        message: format!("{what} {id} not found; check the ID and the --region"),
    }
}

/// Puts a failed EC2 call in the operator's terms, naming its operation (see [`aws_error`]).
trait ForOperation<T> {
    fn for_operation(self, operation: &str) -> Result<T, Error>;
}

impl<T, E, R> ForOperation<T> for Result<T, SdkError<E, R>>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    fn for_operation(self, operation: &str) -> Result<T, Error> {
        self.map_err(|err| aws_error(operation, err))
    }
}

/// Turns an SDK error into the operator's terms: what failed and what to check.
fn aws_error<E, R>(operation: &str, err: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    let message = match &err {
        SdkError::DispatchFailure(failure) if failure.is_io() || failure.is_timeout() => format!(
            "cannot reach the EC2 endpoint: {} — check the network path, security groups and --endpoint-url",
            error_chain::root_cause(&err)
        ),
        SdkError::DispatchFailure(_) if DisplayErrorContext(&err).to_string().contains("no credentials") => {
            "no AWS credentials found (tried the environment, profiles, web identity, container and instance metadata) — set AWS_PROFILE or AWS_ACCESS_KEY_ID, or attach an instance role".to_string()
        }
        SdkError::DispatchFailure(_) => format!(
            "cannot reach the EC2 endpoint or resolve credentials: {} — check --endpoint-url and the credential chain (AWS_PROFILE, instance role)",
            error_chain::root_cause(&err)
        ),
        SdkError::TimeoutError(_) => "the EC2 endpoint did not answer in time; check the network path and --endpoint-url".to_string(),
        _ => service_error_message(&err),
    };
    Error::Aws {
        operation: operation.to_string(),
        message,
    }
}

fn service_error_message<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    let code = err.code();
    let detail = err
        .message()
        .map(str::to_string)
        .unwrap_or_else(|| error_chain::root_cause(err));
    let hint = match code {
        Some("AuthFailure" | "UnrecognizedClientException" | "InvalidClientTokenId" | "SignatureDoesNotMatch") => {
            "the credentials were rejected; check AWS_PROFILE / the instance role, and that the region is in the credentials' partition (GovCloud keys work only in us-gov-* regions)"
        }
        Some("UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException") => {
            "IAM denies this call; grant it to the role running xpart"
        }
        Some(code) if code.contains("NotFound") || code.contains("Malformed") => {
            "an ID does not exist in this account and region; check it and --region"
        }
        Some("RequestLimitExceeded" | "Throttling" | "ThrottlingException") => {
            "EC2 kept throttling after retries with backoff; try again shortly"
        }
        _ => "",
    };
    match (code, hint) {
        (Some(code), "") => format!("{code}: {detail}"),
        (Some(code), hint) => format!("{code}: {detail} — {hint}"),
        (None, _) => detail,
    }
}
