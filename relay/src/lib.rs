//! `xpart-relay` is the Commercial-side appliance. It accepts Bedrock Runtime requests that
//! agents send through the WireGuard tunnel (HTTP/2 or HTTP/1.1 to its service address on the
//! tunnel IP) and forwards them to the Bedrock endpoint signed with its own AWS credentials.
//!
//! Each request runs one pipeline ([`service`]): **check** the source is a configured agent and
//! the operation and model are allowlisted ([`policy`]); **rewrite** GovCloud model IDs and
//! choose the headers that go upstream ([`rewrite`]); read the body (refusing more than
//! Bedrock's 25,000,000 bytes before reading it whole; the body is held in memory because
//! SigV4 hashes it and the inference-profile retry resends it); **sign** with SigV4 ([`signer`], with
//! [`credentials`] from the standard AWS chain); **send** to the one configured endpoint over
//! TLS ([`upstream`], names resolved by [`resolver`]), retrying once through an inference
//! profile when Bedrock refuses on-demand throughput; **stream** the response back frame by
//! frame as it arrives ([`stream`]); and **audit** one JSON line per request ([`audit`]).
//! The relay answers the synthetic echo model itself ([`echo`]). Around the pipeline:
//! [`config`] (`relay.toml`), [`metrics`] and the admin routes ([`admin`], with the HTML
//! status page of [`status_page`]). On SIGHUP
//! ([`RelayHandle`] is `xpart_daemon::reload::Reloadable`) the policy, the rewrite rules and
//! the allowed agents are swapped for the file's new ones without closing a connection.

mod admin;
pub mod admission;
mod audit;
pub mod config;
mod credentials;
mod echo;
mod echo_discovery;
mod error;
mod inner_tls;
mod metrics;
mod policy;
mod resolver;
mod rewrite;
mod service;
mod signer;
mod status_page;
mod stream;
mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use xpart_daemon::audit::AuditLog;
use xpart_daemon::config::Diagnostics;
use xpart_daemon::reload::{Applied, Live, Reloadable};
use xpart_daemon::tunnel_config::Side;
use xpart_tunnel::{Network, PeerStats, Tunnel};

pub use crate::config::RelayConfig;
pub use crate::error::{RequestError, StartError};

use crate::config::CredentialsFrom;
use crate::credentials::CredentialSource;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::rewrite::Rewriter;
use crate::upstream::Upstreams;

/// Start the relay: tunnel, service listener, admin server, credential refresher.
pub async fn start(config: RelayConfig) -> Result<RelayHandle, StartError> {
    let tunnel = start_tunnel(&config).await?;
    let network = match &tunnel {
        Some(tunnel) => tunnel.network(),
        None => Network::host(),
    };
    let udp_addr = tunnel.as_ref().map(Tunnel::local_udp_addr);

    let audit = match &config.audit {
        Some(section) => {
            let path = config.resolve_path(&section.path);
            AuditLog::open(&path).map_err(|source| StartError::Audit { path, source })?
        }
        None => AuditLog::disabled(),
    };
    let metrics = Arc::new(Metrics::new().map_err(StartError::Metrics)?);
    let _ = audit.register(&metrics.registry);
    let inner_tls = inner_tls::InnerTls::from_config(&config)?;
    xpart_daemon::crypto::require_fips(&[(
        "[tunnel] inner TLS (agent→relay)",
        inner_tls.as_ref().is_some_and(inner_tls::InnerTls::fips),
    )])?;
    xpart_daemon::crypto::register_metrics(&metrics.registry).map_err(StartError::Metrics)?;
    if let Some(tls) = &inner_tls {
        tls.register(&metrics.registry)
            .map_err(StartError::Metrics)?;
    }

    let margin = Duration::from_secs(config.credentials.refresh_before_expiry_secs);
    let fetch_timeout = Duration::from_secs(config.credentials.fetch_timeout_secs);
    let credentials = Arc::new(match config.credentials.source {
        CredentialsFrom::Chain => {
            CredentialSource::default_chain(&config.region(), margin, fetch_timeout).await
        }
        CredentialsFrom::None => CredentialSource::new(None, margin, fetch_timeout),
    });
    let refresher = credentials.clone().spawn_refresher();

    let listener = network
        .listen(config.service.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.service.listen,
            source,
        })?;
    let service_addr = listener.local_addr();

    let relay = Arc::new(Relay {
        policy: Live::new(Policy::from_config(&config)),
        rewriter: Live::new(rewriter(&config)),
        credentials,
        upstreams: Upstreams::from_config(&config)?,
        echo_model: config.echo.enabled.then(|| config.echo.model.clone()),
        region: config.region(),
        audit: audit.clone(),
        metrics,
        draining: AtomicBool::new(false),
        idle_timeout: config.idle_timeout(),
        service_addr,
        tunnel: Mutex::new(tunnel),
        body_budget: service::BodyBudget::new(config.limits.max_buffered_body_bytes),
        inner_tls: inner_tls.is_some(),
    });

    // Weak: the registry lives inside the relay it reads.
    let dropped_of = Arc::downgrade(&relay);
    xpart_daemon::admin::register_tunnel_drops(
        &relay.metrics.registry,
        Arc::new(move || dropped_of.upgrade().and_then(|r| r.tunnel_dropped())),
    )
    .map_err(StartError::Metrics)?;
    let peers_of = Arc::downgrade(&relay);
    xpart_daemon::admin::register_tunnel_peers(
        &relay.metrics.registry,
        Arc::new(move || {
            peers_of
                .upgrade()
                .map(|relay| relay.peer_stats())
                .unwrap_or_default()
        }),
    )
    .map_err(StartError::Metrics)?;

    let admin = match &config.admin {
        Some(section) => {
            let api = Arc::new(admin::AdminApi {
                relay: relay.clone(),
                started: std::time::Instant::now(),
            });
            let server = xpart_daemon::admin::serve(section.listen, api).map_err(|source| {
                StartError::Admin {
                    addr: section.listen,
                    source,
                }
            })?;
            Some(server)
        }
        None => None,
    };

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let grace = Duration::from_secs(config.service.shutdown_grace_secs);
    let serving = match &inner_tls {
        Some(tls) => tokio::spawn(service::serve(
            tls.listener(listener),
            relay.clone(),
            grace,
            stopped,
        )),
        None => tokio::spawn(service::serve(listener, relay.clone(), grace, stopped)),
    };
    tracing::info!(
        service = %service_addr,
        admin = %admin
            .as_ref()
            .map(|a| a.local_addr().to_string())
            .unwrap_or_else(|| "disabled".into()),
        upstreams = %relay.upstreams.describe(),
        region = %relay.region,
        echo_model = relay.echo_model.as_deref().unwrap_or("disabled"),
        "relay started"
    );
    Ok(RelayHandle {
        relay,
        running: config,
        service_addr,
        udp_addr,
        admin,
        audit,
        stop,
        serving,
        refresher,
    })
}

/// A running relay.
pub struct RelayHandle {
    relay: Arc<Relay>,
    /// The configuration the relay started with: what a reload compares startup-bound
    /// settings against.
    running: RelayConfig,
    service_addr: SocketAddr,
    udp_addr: Option<SocketAddr>,
    admin: Option<xpart_daemon::admin::AdminServer>,
    audit: AuditLog,
    stop: tokio::sync::watch::Sender<bool>,
    serving: tokio::task::JoinHandle<()>,
    refresher: tokio::task::JoinHandle<()>,
}

impl RelayHandle {
    /// The service address (on the tunnel IP, or loopback in host mode).
    pub fn service_addr(&self) -> SocketAddr {
        self.service_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr())
    }

    /// The WireGuard UDP socket; `None` in host mode.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp_addr
    }

    /// Stop accepting, end open connections, flush the audit log and bring the tunnel down.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.serving.await;
        self.refresher.abort();
        if let Some(admin) = self.admin {
            admin.shutdown().await;
        }
        self.audit.close().await;
        let tunnel = match self.relay.tunnel.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(tunnel) = tunnel {
            tunnel.shutdown().await;
        }
    }
}

impl Reloadable for RelayHandle {
    type Config = RelayConfig;

    fn load(file: &std::path::Path) -> Result<RelayConfig, Diagnostics> {
        RelayConfig::load(file)
    }

    /// The policy (operations, models), the rewrite rules with the inference-profile prefix,
    /// and which tunnel addresses are agents. Both are built before either is stored, and
    /// neither can fail once the file has validated.
    fn apply(&self, config: RelayConfig) -> Result<Applied, Diagnostics> {
        let policy = Policy::from_config(&config);
        let rewriter = rewriter(&config);
        self.relay.policy.store(policy);
        self.relay.rewriter.store(rewriter);
        let mut applied = Applied {
            live: vec!["policy", "rewrite rules", "allowed agents"],
            restart_needed: Vec::new(),
        };
        let running = &self.running;
        let debug = |value: &dyn std::fmt::Debug| format!("{value:?}");
        applied.compare("[tunnel]", &debug(&running.tunnel), &debug(&config.tunnel));
        applied.compare(
            "[[agent]] tunnel peers (public_key, endpoint, tunnel_address, persistent_keepalive, preshared_key_file)",
            &tunnel_peers(running),
            &tunnel_peers(&config),
        );
        applied.compare(
            "[service]",
            &debug(&running.service),
            &debug(&config.service),
        );
        applied.compare(
            "[upstream] (other than inference_profile_prefix)",
            &upstream_bound_at_start(running),
            &upstream_bound_at_start(&config),
        );
        applied.compare("[echo]", &debug(&running.echo), &debug(&config.echo));
        applied.compare(
            "[credentials]",
            &debug(&running.credentials),
            &debug(&config.credentials),
        );
        applied.compare("[admin]", &debug(&running.admin), &debug(&config.admin));
        applied.compare("[audit]", &debug(&running.audit), &debug(&config.audit));
        Ok(applied)
    }

    fn audit(&self) -> &AuditLog {
        &self.audit
    }
}

impl xpart_daemon::startup::Daemon for RelayHandle {
    const SERVICE: &'static str = "relay";
    const PROGRAM: &'static str = "xpart-relay";

    type StartError = StartError;

    async fn start(config: RelayConfig) -> Result<RelayHandle, StartError> {
        start(config).await
    }

    fn listening(&self) -> Vec<(&'static str, Option<SocketAddr>)> {
        vec![
            ("service", Some(self.service_addr())),
            ("admin", self.admin_addr()),
            ("udp", self.udp_addr()),
        ]
    }

    async fn shutdown(self) {
        RelayHandle::shutdown(self).await;
    }
}

fn rewriter(config: &RelayConfig) -> Rewriter {
    Rewriter::from_config(config)
}

/// What WireGuard was started with for each agent; the policy's view of agents (address and
/// name) changes live, the peers do not.
fn tunnel_peers(config: &RelayConfig) -> Vec<String> {
    config
        .agents
        .iter()
        .map(|a| {
            format!(
                "{:?} {:?} {} {:?} {:?}",
                a.public_key,
                a.endpoint,
                a.tunnel_address,
                a.persistent_keepalive,
                a.preshared_key_file
            )
        })
        .collect()
}

fn upstream_bound_at_start(config: &RelayConfig) -> String {
    let mut upstreams = config.upstreams.clone();
    for upstream in &mut upstreams {
        upstream.inference_profile_prefix = None;
    }
    format!("{upstreams:?}")
}

/// What every request handler shares. `policy` and `rewriter` change on reload: a request
/// loads each once where it uses it.
pub(crate) struct Relay {
    policy: Live<Policy>,
    rewriter: Live<Rewriter>,
    credentials: Arc<CredentialSource>,
    upstreams: Upstreams,
    echo_model: Option<String>,
    /// The default region: the first upstream's.
    region: String,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    idle_timeout: Duration,
    service_addr: SocketAddr,
    tunnel: Mutex<Option<Tunnel>>,
    body_budget: service::BodyBudget,
    /// Whether the service listener runs the inner TLS (`[tunnel] inner_tls`).
    inner_tls: bool,
}

impl Relay {
    /// The tunnel's drops by reason; `None` in host mode.
    fn tunnel_dropped(&self) -> Option<std::collections::BTreeMap<String, u64>> {
        let slot = self.tunnel.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(Tunnel::dropped)
    }

    fn peer_stats(&self) -> Vec<PeerStats> {
        match self.tunnel.lock() {
            Ok(slot) => slot.as_ref().map(Tunnel::peer_stats).unwrap_or_default(),
            Err(poisoned) => poisoned
                .into_inner()
                .as_ref()
                .map(Tunnel::peer_stats)
                .unwrap_or_default(),
        }
    }
}

/// Bring up WireGuard with one peer per configured agent; `None` in host mode.
async fn start_tunnel(config: &RelayConfig) -> Result<Option<Tunnel>, StartError> {
    let tunnel_config = xpart_daemon::tunnel_config::tunnel_config(
        Side::Relay,
        &config.tunnel,
        &config.agents,
        |path| config.resolve_path(path),
    )?;
    let Some(tunnel_config) = tunnel_config else {
        return Ok(None);
    };
    let tunnel = Tunnel::start(tunnel_config).await?;
    Ok(Some(tunnel))
}
