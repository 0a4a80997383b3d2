//! The agent's answers on the admin port (`xpart_daemon::admin` serves them).
//!
//! `/readyz` is ready while at least one relay is healthy. `/status` is the JSON that
//! `xpart status` prints; its shape is documented in `agent/README.md`. `GET /` is the status
//! page ([`crate::status_page`]), which renders `/status`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus::Registry;
use serde_json::{json, Value};
use xpart_daemon::admin::{tunnel_dropped_json, tunnel_peers_json, AdminHandler, DropSource};
use xpart_daemon::status_page::StatusPage;

use crate::monitor::PeerSource;
use crate::pipeline::Agent;

/// What `/status` reports besides live state.
pub struct AdminView {
    pub agent: Arc<Agent>,
    pub peers: Option<PeerSource>,
    /// The tunnel's drops by reason; absent without a tunnel of the agent's own.
    pub dropped: Option<DropSource>,
    pub started: Instant,
    pub front_addr: SocketAddr,
    pub dns_addr: Option<SocketAddr>,
    /// `kernel`, `userspace`, or `host` when no tunnel of the agent's own carries traffic.
    pub tunnel_mode: &'static str,
    pub tunnel_address: Option<String>,
}

#[async_trait]
impl AdminHandler for AdminView {
    fn registry(&self) -> &Registry {
        &self.agent.metrics.registry
    }

    async fn ready(&self) -> (bool, Value) {
        let relays = &self.agent.relays;
        let healthy: Vec<&str> = {
            let health = relays.health();
            health
                .ids()
                .filter(|relay| health.is_healthy(*relay))
                .map(|relay| relays.name(relay))
                .collect()
        };
        let ready = !healthy.is_empty();
        let detail = match ready {
            true => json!({ "ready": true, "healthy_relays": healthy }),
            false => {
                json!({ "ready": false, "reason": "no relay is healthy", "relays": relays.report() })
            }
        };
        (ready, detail)
    }

    async fn status(&self) -> Value {
        let relays = &self.agent.relays;
        // The healthy relays of the best group share new requests; `active_relay` is the
        // first of them, the one an idle agent sends the next request to.
        let active = relays.active();
        let active_names: Vec<&str> = active.iter().map(|relay| relays.name(*relay)).collect();
        let ids: Vec<_> = relays.health().ids().collect();
        let relay_list: Vec<Value> = relays
            .report()
            .into_iter()
            .zip(relays.targets())
            .zip(ids)
            .map(|((report, target), id)| {
                let share = relays.share(id);
                json!({
                    "name": report.name,
                    "service_addr": target.service_addr.to_string(),
                    "state": report.state,
                    "suspect": report.suspect,
                    "active": active.contains(&id),
                    "priority": share.priority,
                    "weight": share.weight,
                    "outstanding": relays.outstanding(id),
                    "consecutive_failures": report.consecutive_failures,
                    "last_error": report.last_error,
                    "state_age_seconds": report.state_age_seconds,
                    "last_success_age_seconds": report.last_success_age_seconds,
                })
            })
            .collect();
        let peers = self.peers.as_ref().map(|peers| peers()).unwrap_or_default();
        let peers = tunnel_peers_json(&peers, std::time::SystemTime::now());
        let principals: Vec<Value> = self
            .agent
            .principals
            .load()
            .iter()
            .map(|p| json!({ "name": p.name, "in_flight": self.agent.limits.in_flight(&p.name) }))
            .collect();
        json!({
            "service": "agent",
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "fips_mode": xpart_daemon::crypto::FIPS_MODE,
            "fips_module": xpart_daemon::crypto::fips_module_json(),
            "ready": !active.is_empty(),
            "active_relay": active_names.first(),
            "active_relays": active_names,
            "front": self.front_addr.to_string(),
            "dns": self.dns_addr.map(|a| a.to_string()),
            "relays": relay_list,
            "tunnel": {
                "mode": self.tunnel_mode,
                "address": self.tunnel_address,
                "inner_tls": relays.inner_tls(),
                "peers": peers,
                "dropped": self.dropped.as_ref().map_or(Value::Null, tunnel_dropped_json),
            },
            "principals": principals,
            "usage": self.agent.usage.status_json(&self.agent.principals.load()),
            "audit": {
                "written": self.agent.audit.written(),
                "dropped": self.agent.audit.dropped(),
            },
            "activity": self.agent.metrics.activity.json(),
        })
    }

    fn status_page(&self) -> Option<&StatusPage> {
        Some(&crate::status_page::PAGE)
    }
}
