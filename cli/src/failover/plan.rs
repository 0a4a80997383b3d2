//! What a failover will change, computed from a snapshot of EC2 state without calling EC2.
//! A [`Plan`] prints as the equivalent `aws ec2` commands (the `--dry-run` output) and as
//! JSON, and is what the executor applies; planning from observed state is what makes every
//! failover command idempotent: a second run finds everything in place and does nothing.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action")]
pub enum Action {
    /// Point an existing route at the standby's ENI.
    ReplaceRoute {
        route_table_id: String,
        destination_cidr: String,
        network_interface_id: String,
        previous_target: String,
    },
    /// Add the route: the table has none for this destination.
    CreateRoute {
        route_table_id: String,
        destination_cidr: String,
        network_interface_id: String,
    },
    /// Move a secondary private IP onto the standby's ENI (AllowReassignment takes it from
    /// whichever ENI holds it).
    AssignPrivateIp {
        network_interface_id: String,
        private_ip: String,
        previous_owner: Option<String>,
    },
    /// Release the IP from the old ENI. Real EC2 already removed it during the reassignment;
    /// the executor skips this when the IP is gone, so it only acts where EC2 left a copy.
    UnassignPrivateIp {
        network_interface_id: String,
        private_ip: String,
    },
    /// Move an Elastic IP to the standby's ENI.
    AssociateAddress {
        allocation_id: String,
        public_ip: String,
        network_interface_id: String,
        private_ip: Option<String>,
        previous_network_interface: Option<String>,
    },
    SetSourceDestCheck {
        instance_id: String,
        enabled: bool,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Targets that already match, in words, so a no-op run says why it did nothing.
    pub in_place: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    pub fn extend(&mut self, other: Plan) {
        self.actions.extend(other.actions);
        self.in_place.extend(other.in_place);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTableState {
    pub id: String,
    pub routes: Vec<RouteState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteState {
    pub destination_cidr: String,
    /// Where the route points, e.g. `eni-…`, `igw-…`, `nat-…`, or `blackhole`.
    pub target: String,
    pub network_interface_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceState {
    pub id: String,
    pub private_ips: Vec<InterfaceIp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceIp {
    pub address: String,
    pub primary: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressState {
    pub allocation_id: String,
    pub public_ip: String,
    pub network_interface_id: Option<String>,
    pub private_ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceState {
    pub id: String,
    pub source_dest_check: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{ip} is the primary private IP of {eni}; only secondary IPs can move (assign a secondary IP to both agents' DNS answer instead)")]
    PrimaryIp { ip: String, eni: String },
}

/// For each table and destination: replace a route that points elsewhere, create a missing
/// one, leave one that already points at `eni`.
pub fn plan_routes(tables: &[RouteTableState], cidrs: &[IpNet], eni: &str) -> Plan {
    let mut plan = Plan::default();
    for table in tables {
        for cidr in cidrs {
            let destination = cidr.trunc().to_string();
            let existing = table
                .routes
                .iter()
                .find(|route| same_cidr(&route.destination_cidr, cidr));
            match existing {
                Some(route) if route.network_interface_id.as_deref() == Some(eni) => {
                    plan.in_place
                        .push(format!("{}: {destination} already via {eni}", table.id));
                }
                Some(route) => plan.actions.push(Action::ReplaceRoute {
                    route_table_id: table.id.clone(),
                    destination_cidr: destination,
                    network_interface_id: eni.to_string(),
                    previous_target: route.target.clone(),
                }),
                None => plan.actions.push(Action::CreateRoute {
                    route_table_id: table.id.clone(),
                    destination_cidr: destination,
                    network_interface_id: eni.to_string(),
                }),
            }
        }
    }
    plan
}

/// Assign each IP to `eni` unless it is there alone already, and release it from every
/// other ENI holding it as a secondary address.
pub fn plan_vip(
    interfaces: &[InterfaceState],
    ips: &[IpAddr],
    eni: &str,
) -> Result<Plan, PlanError> {
    let mut plan = Plan::default();
    for ip in ips {
        let address = ip.to_string();
        let mut holders = Vec::new();
        for interface in interfaces {
            let Some(held) = interface.private_ips.iter().find(|p| p.address == address) else {
                continue;
            };
            if held.primary {
                return Err(PlanError::PrimaryIp {
                    ip: address,
                    eni: interface.id.clone(),
                });
            }
            holders.push(interface.id.as_str());
        }
        let others: Vec<&str> = holders.iter().copied().filter(|id| *id != eni).collect();
        if holders.contains(&eni) && others.is_empty() {
            plan.in_place.push(format!("{address} already on {eni}"));
            continue;
        }
        if !holders.contains(&eni) {
            plan.actions.push(Action::AssignPrivateIp {
                network_interface_id: eni.to_string(),
                private_ip: address.clone(),
                previous_owner: others.first().map(|id| id.to_string()),
            });
        }
        for other in others {
            plan.actions.push(Action::UnassignPrivateIp {
                network_interface_id: other.to_string(),
                private_ip: address.clone(),
            });
        }
    }
    Ok(plan)
}

pub fn plan_eip(addresses: &[AddressState], eni: &str, private_ip: Option<&str>) -> Plan {
    let mut plan = Plan::default();
    for address in addresses {
        let on_target = address.network_interface_id.as_deref() == Some(eni)
            && private_ip.is_none_or(|ip| address.private_ip.as_deref() == Some(ip));
        if on_target {
            plan.in_place.push(format!(
                "{} ({}) already on {eni}",
                address.public_ip, address.allocation_id
            ));
            continue;
        }
        plan.actions.push(Action::AssociateAddress {
            allocation_id: address.allocation_id.clone(),
            public_ip: address.public_ip.clone(),
            network_interface_id: eni.to_string(),
            private_ip: private_ip.map(str::to_string),
            previous_network_interface: address.network_interface_id.clone(),
        });
    }
    plan
}

pub fn plan_source_dest_check(instances: &[InstanceState], enabled: bool) -> Plan {
    let mut plan = Plan::default();
    for instance in instances {
        if instance.source_dest_check == Some(enabled) {
            plan.in_place.push(format!(
                "{}: source/destination check already {}",
                instance.id,
                on_off(enabled)
            ));
            continue;
        }
        plan.actions.push(Action::SetSourceDestCheck {
            instance_id: instance.id.clone(),
            enabled,
        });
    }
    plan
}

fn same_cidr(text: &str, cidr: &IpNet) -> bool {
    text.parse::<IpNet>()
        .map(|parsed| parsed.trunc() == cidr.trunc())
        .unwrap_or(false)
}

fn on_off(enabled: bool) -> &'static str {
    if enabled {
        "on"
    } else {
        "off"
    }
}

/// The equivalent AWS CLI command, so an operator can read (or replay) the exact change.
impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::ReplaceRoute {
                route_table_id,
                destination_cidr,
                network_interface_id,
                previous_target,
            } => write!(
                f,
                "aws ec2 replace-route --route-table-id {route_table_id} --destination-cidr-block {destination_cidr} --network-interface-id {network_interface_id}   # was {previous_target}"
            ),
            Action::CreateRoute {
                route_table_id,
                destination_cidr,
                network_interface_id,
            } => write!(
                f,
                "aws ec2 create-route --route-table-id {route_table_id} --destination-cidr-block {destination_cidr} --network-interface-id {network_interface_id}   # route was missing"
            ),
            Action::AssignPrivateIp {
                network_interface_id,
                private_ip,
                previous_owner,
            } => write!(
                f,
                "aws ec2 assign-private-ip-addresses --network-interface-id {network_interface_id} --private-ip-addresses {private_ip} --allow-reassignment   # was on {}",
                previous_owner.as_deref().unwrap_or("no interface")
            ),
            Action::UnassignPrivateIp {
                network_interface_id,
                private_ip,
            } => write!(
                f,
                "aws ec2 unassign-private-ip-addresses --network-interface-id {network_interface_id} --private-ip-addresses {private_ip}   # only if still there after the reassignment"
            ),
            Action::AssociateAddress {
                allocation_id,
                public_ip,
                network_interface_id,
                private_ip,
                previous_network_interface,
            } => {
                write!(
                    f,
                    "aws ec2 associate-address --allocation-id {allocation_id} --network-interface-id {network_interface_id} --allow-reassociation"
                )?;
                if let Some(private_ip) = private_ip {
                    write!(f, " --private-ip-address {private_ip}")?;
                }
                write!(
                    f,
                    "   # {public_ip}, was on {}",
                    previous_network_interface.as_deref().unwrap_or("nothing")
                )
            }
            Action::SetSourceDestCheck {
                instance_id,
                enabled,
            } => {
                let flag = if *enabled {
                    "--source-dest-check"
                } else {
                    "--no-source-dest-check"
                };
                write!(f, "aws ec2 modify-instance-attribute --instance-id {instance_id} {flag}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(id: &str, routes: &[(&str, &str)]) -> RouteTableState {
        RouteTableState {
            id: id.into(),
            routes: routes
                .iter()
                .map(|(cidr, target)| RouteState {
                    destination_cidr: cidr.to_string(),
                    target: target.to_string(),
                    network_interface_id: target.starts_with("eni-").then(|| target.to_string()),
                })
                .collect(),
        }
    }

    fn cidr(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn routes_are_replaced_created_or_left_alone() {
        let tables = [
            table(
                "rtb-a",
                &[("10.9.0.0/16", "eni-active"), ("0.0.0.0/0", "igw-1")],
            ),
            table("rtb-b", &[("10.9.0.0/16", "eni-standby")]),
            table("rtb-c", &[]),
        ];
        let plan = plan_routes(&tables, &[cidr("10.9.0.0/16")], "eni-standby");
        assert_eq!(
            plan.actions,
            vec![
                Action::ReplaceRoute {
                    route_table_id: "rtb-a".into(),
                    destination_cidr: "10.9.0.0/16".into(),
                    network_interface_id: "eni-standby".into(),
                    previous_target: "eni-active".into(),
                },
                Action::CreateRoute {
                    route_table_id: "rtb-c".into(),
                    destination_cidr: "10.9.0.0/16".into(),
                    network_interface_id: "eni-standby".into(),
                },
            ]
        );
        assert_eq!(
            plan.in_place,
            vec!["rtb-b: 10.9.0.0/16 already via eni-standby"]
        );
    }

    #[test]
    fn route_destinations_compare_as_networks_not_strings() {
        let tables = [table("rtb-a", &[("10.9.0.0/16", "eni-standby")])];
        let plan = plan_routes(&tables, &[cidr("10.9.1.2/16")], "eni-standby");
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn a_blackholed_route_is_replaced() {
        let tables = [table("rtb-a", &[("10.9.0.0/16", "blackhole")])];
        let plan = plan_routes(&tables, &[cidr("10.9.0.0/16")], "eni-standby");
        assert!(
            matches!(&plan.actions[..], [Action::ReplaceRoute { previous_target, .. }] if previous_target == "blackhole")
        );
    }

    fn interface(id: &str, ips: &[(&str, bool)]) -> InterfaceState {
        InterfaceState {
            id: id.into(),
            private_ips: ips
                .iter()
                .map(|(address, primary)| InterfaceIp {
                    address: address.to_string(),
                    primary: *primary,
                })
                .collect(),
        }
    }

    #[test]
    fn vip_moves_from_the_active_and_is_released_there() {
        let interfaces = [
            interface("eni-active", &[("10.0.1.5", true), ("10.0.1.100", false)]),
            interface("eni-standby", &[("10.0.1.6", true)]),
        ];
        let plan = plan_vip(&interfaces, &["10.0.1.100".parse().unwrap()], "eni-standby").unwrap();
        assert_eq!(
            plan.actions,
            vec![
                Action::AssignPrivateIp {
                    network_interface_id: "eni-standby".into(),
                    private_ip: "10.0.1.100".into(),
                    previous_owner: Some("eni-active".into()),
                },
                Action::UnassignPrivateIp {
                    network_interface_id: "eni-active".into(),
                    private_ip: "10.0.1.100".into(),
                },
            ]
        );
    }

    #[test]
    fn vip_left_on_both_enis_is_only_released_from_the_old_one() {
        let interfaces = [
            interface("eni-active", &[("10.0.1.100", false)]),
            interface("eni-standby", &[("10.0.1.100", false)]),
        ];
        let plan = plan_vip(&interfaces, &["10.0.1.100".parse().unwrap()], "eni-standby").unwrap();
        assert_eq!(
            plan.actions,
            vec![Action::UnassignPrivateIp {
                network_interface_id: "eni-active".into(),
                private_ip: "10.0.1.100".into(),
            }]
        );
    }

    #[test]
    fn vip_already_in_place_is_a_no_op_and_unowned_vip_is_assigned() {
        let interfaces = [interface("eni-standby", &[("10.0.1.100", false)])];
        let plan = plan_vip(
            &interfaces,
            &["10.0.1.100".parse().unwrap(), "10.0.1.101".parse().unwrap()],
            "eni-standby",
        )
        .unwrap();
        assert_eq!(plan.in_place, vec!["10.0.1.100 already on eni-standby"]);
        assert_eq!(
            plan.actions,
            vec![Action::AssignPrivateIp {
                network_interface_id: "eni-standby".into(),
                private_ip: "10.0.1.101".into(),
                previous_owner: None,
            }]
        );
    }

    #[test]
    fn a_primary_ip_cannot_be_moved() {
        let interfaces = [interface("eni-active", &[("10.0.1.5", true)])];
        let err = plan_vip(&interfaces, &["10.0.1.5".parse().unwrap()], "eni-standby").unwrap_err();
        assert_eq!(
            err,
            PlanError::PrimaryIp {
                ip: "10.0.1.5".into(),
                eni: "eni-active".into()
            }
        );
    }

    #[test]
    fn eip_moves_unless_already_on_the_standby() {
        let addresses = [
            AddressState {
                allocation_id: "eipalloc-1".into(),
                public_ip: "198.51.100.1".into(),
                network_interface_id: Some("eni-active".into()),
                private_ip: Some("10.0.1.5".into()),
            },
            AddressState {
                allocation_id: "eipalloc-2".into(),
                public_ip: "198.51.100.2".into(),
                network_interface_id: Some("eni-standby".into()),
                private_ip: Some("10.0.1.6".into()),
            },
        ];
        let plan = plan_eip(&addresses, "eni-standby", None);
        assert_eq!(
            plan.actions,
            vec![Action::AssociateAddress {
                allocation_id: "eipalloc-1".into(),
                public_ip: "198.51.100.1".into(),
                network_interface_id: "eni-standby".into(),
                private_ip: None,
                previous_network_interface: Some("eni-active".into()),
            }]
        );
        assert_eq!(plan.in_place.len(), 1);
    }

    #[test]
    fn source_dest_check_changes_only_instances_that_differ() {
        let instances = [
            InstanceState {
                id: "i-1".into(),
                source_dest_check: Some(true),
            },
            InstanceState {
                id: "i-2".into(),
                source_dest_check: Some(false),
            },
        ];
        let plan = plan_source_dest_check(&instances, false);
        assert_eq!(
            plan.actions,
            vec![Action::SetSourceDestCheck {
                instance_id: "i-1".into(),
                enabled: false
            }]
        );
        assert_eq!(
            plan.actions[0].to_string(),
            "aws ec2 modify-instance-attribute --instance-id i-1 --no-source-dest-check"
        );
    }

    #[test]
    fn actions_print_as_the_equivalent_cli_command() {
        let action = Action::ReplaceRoute {
            route_table_id: "rtb-a".into(),
            destination_cidr: "10.9.0.0/16".into(),
            network_interface_id: "eni-standby".into(),
            previous_target: "eni-active".into(),
        };
        assert_eq!(
            action.to_string(),
            "aws ec2 replace-route --route-table-id rtb-a --destination-cidr-block 10.9.0.0/16 --network-interface-id eni-standby   # was eni-active"
        );
    }
}
