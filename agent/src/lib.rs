//! `xpart-agent` is the GovCloud-side appliance: what a Lambda function or instance in a
//! private subnet talks to when it believes it is calling Amazon Bedrock.
//!
//! Data flow: a caller resolves `bedrock-runtime.<region>.amazonaws.com` through the agent's
//! private DNS ([`dns`]), which answers with the agent's own address and forwards every other
//! name upstream. The caller's SDK then connects to the TLS front ([`front`], certificate from
//! [`tls`], HTTP/1.1 or HTTP/2), where each request (its body an [`upload`], drained when a
//! refusal leaves it unread) runs through [`pipeline`]:
//! [`auth`] finds the principal (bearer token and/or source address) and checks its model
//! allowlist, [`limits`] applies its rate and concurrency limits, and [`forward`] sends the
//! request over HTTP/2 through the WireGuard tunnel (`xpart-tunnel`) to a healthy relay
//! chosen by [`balance`] (fewest requests outstanding in the preferred group), without the
//! caller's credentials and with `x-xpart-*` headers naming the principal, request id and
//! source. The response streams back frame by frame ([`streaming`]); when it ends, the audit
//! line is written (`xpart_daemon::audit`). Relay health comes from the sans-IO [`health`]
//! core, driven by [`monitor`], which probes each relay through the tunnel every 250 ms, and
//! from what the connections show (a failed connect, an unanswered PING, a reset). The admin
//! port ([`admin`]) serves `/metrics` ([`metrics`]), `/healthz`,
//! `/readyz`, `/status`, and `/`, the HTML status page ([`status_page`]).
//!
//! Entry points: [`AgentConfig::load`] and [`start`] (which brings up the tunnel),
//! or [`start_with_network`] to use a [`xpart_tunnel::Network`] set up elsewhere.

mod admin;
mod auth;
mod balance;
mod budget;
mod config;
mod destination;
mod discovery;
mod dns;
mod error;
mod forward;
mod front;
mod health;
mod inner_tls;
mod limits;
mod metrics;
mod monitor;
mod openai;
mod pipeline;
mod status_page;
mod streaming;
mod tls;
mod upload;
mod usage;

pub use crate::auth::token_sha256_hex;
pub use crate::config::AgentConfig;
pub use crate::dns::{Answerer, DnsServer, DnsSettings};
pub use crate::error::{RequestError, StartError};
pub use crate::front::FrontSettings;
pub use crate::limits::Limits;
pub use crate::metrics::Metrics;
pub use crate::streaming::FrameBoundary;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use xpart_daemon::admin::AdminServer;
use xpart_daemon::audit::AuditLog;
use xpart_daemon::config::Diagnostics;
use xpart_daemon::reload::{Applied, Live, Reloadable};
use xpart_daemon::tunnel_config::Side;
use xpart_tunnel::{Network, Tunnel, TunnelConfig};

use crate::auth::Principals;
use crate::forward::{RelayTarget, Relays};
use crate::limits::SharedLimits;
use crate::monitor::PeerSource;
use crate::pipeline::Agent;
use crate::tls::CertStore;

/// A running agent.
pub struct AgentHandle {
    agent: Arc<Agent>,
    /// The configuration the agent started with: what a reload compares startup-bound
    /// settings against.
    running: AgentConfig,
    front_addr: SocketAddr,
    dns: Option<DnsServer>,
    dns_addr: Option<SocketAddr>,
    admin: AdminServer,
    certs: Arc<CertStore>,
    audit: AuditLog,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    tunnel: Option<Arc<Tunnel>>,
}

impl AgentHandle {
    pub fn front_addr(&self) -> SocketAddr {
        self.front_addr
    }

    /// `None` when the config has no `[dns]` section.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    /// Re-reads the TLS certificate and key (SIGHUP); open connections are unaffected.
    pub fn reload_certificate(&self) -> Result<(), StartError> {
        self.certs.reload()
    }

    /// Reopens the audit log (after logrotate moved it).
    pub async fn reopen_audit(&self) -> std::io::Result<()> {
        self.audit.reopen().await
    }

    /// Stops accepting, ends connections, flushes the audit log, shuts the tunnel down.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some(dns) = self.dns {
            dns.shutdown().await;
        }
        self.admin.shutdown().await;
        self.audit.close().await;
        if let Some(tunnel) = self.tunnel {
            match Arc::try_unwrap(tunnel) {
                Ok(tunnel) => tunnel.shutdown().await,
                Err(_) => tracing::warn!("tunnel still in use at shutdown; dropping it"),
            }
        }
    }
}

impl Reloadable for AgentHandle {
    type Config = AgentConfig;

    fn load(file: &std::path::Path) -> Result<AgentConfig, Diagnostics> {
        AgentConfig::load(file)
    }

    /// The front certificate, the principals (tokens, source CIDRs, models, operations,
    /// limits) and what DNS answers. The certificate and the DNS answerer are built first;
    /// nothing is stored unless both are usable.
    fn apply(&self, config: AgentConfig) -> Result<Applied, Diagnostics> {
        let mut problems = Diagnostics::new(config.file.display().to_string());
        let certs = CertStore::load(
            &config.resolve(&config.front.cert_file),
            &config.resolve(&config.front.key_file),
        );
        let certs = match certs {
            Ok(certs) => Some(certs),
            Err(error) => {
                problems.push(
                    "[front].cert_file",
                    error.to_string(),
                    "point cert_file and key_file at a readable PEM certificate and its key (mode 0600); the previous certificate is still served",
                );
                None
            }
        };
        let answerer = match (&self.dns, config.dns_settings()) {
            (Some(_), Some(settings)) => {
                match dns::Answerer::new(&settings, self.agent.metrics.clone()) {
                    Ok(answerer) => Some(answerer),
                    Err(error) => {
                        problems.push(
                            "[dns].names",
                            error.to_string(),
                            "write each name as a DNS name, e.g. bedrock-runtime.us-east-1.amazonaws.com",
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        let (Some(certs), true) = (certs, problems.is_empty()) else {
            return Err(problems);
        };

        self.certs.replace_with(certs);
        let principals = config.principals();
        self.agent.limits.reconfigure(
            principals
                .iter()
                .map(|principal| (principal.name.as_str(), principal.limits)),
        );
        self.agent.principals.store(Principals::new(principals));
        let mut applied = Applied {
            live: vec!["front certificate", "principals"],
            restart_needed: Vec::new(),
        };
        if let (Some(dns), Some(answerer)) = (&self.dns, answerer) {
            dns.replace_answerer(answerer);
            applied.live.push("dns");
        }
        let running = &self.running;
        let debug = |value: &dyn std::fmt::Debug| format!("{value:?}");
        applied.compare("[tunnel]", &debug(&running.tunnel), &debug(&config.tunnel));
        applied.compare("[[relay]]", &debug(&running.relays), &debug(&config.relays));
        applied.compare(
            "[front].listen",
            &running.front.listen,
            &config.front.listen,
        );
        applied.compare(
            "[front] timeouts and connection caps",
            &running.front_settings(),
            &config.front_settings(),
        );
        applied.compare(
            "[dns] (added, removed or its listen address)",
            &running.dns.as_ref().map(|dns| dns.listen),
            &config.dns.as_ref().map(|dns| dns.listen),
        );
        applied.compare("[admin]", &debug(&running.admin), &debug(&config.admin));
        applied.compare("[audit]", &debug(&running.audit), &debug(&config.audit));
        applied.compare("[health]", &debug(&running.health), &debug(&config.health));
        Ok(applied)
    }

    fn audit(&self) -> &AuditLog {
        &self.audit
    }
}

impl xpart_daemon::startup::Daemon for AgentHandle {
    const SERVICE: &'static str = "agent";
    const PROGRAM: &'static str = "xpart-agent";

    type StartError = StartError;

    async fn start(config: AgentConfig) -> Result<AgentHandle, StartError> {
        start(config).await
    }

    fn listening(&self) -> Vec<(&'static str, Option<SocketAddr>)> {
        vec![
            ("front", Some(self.front_addr())),
            ("dns", self.dns_addr()),
            ("admin", Some(self.admin_addr())),
        ]
    }

    async fn shutdown(self) {
        AgentHandle::shutdown(self).await;
    }
}

/// Brings up the tunnel to the relays, then the agent on it (in `mode = "host"`, the agent
/// alone, on the host network).
pub async fn start(config: AgentConfig) -> Result<AgentHandle, StartError> {
    let mode = match config.tunnel.mode.wireguard() {
        Some(xpart_tunnel::Mode::Kernel) => "kernel",
        Some(xpart_tunnel::Mode::Userspace) => "userspace",
        None => return start_with_network(config, Network::host()).await,
    };
    let tunnel = Arc::new(Tunnel::start(tunnel_config(&config)?).await?);
    let network = tunnel.network();
    // Weak: shutdown takes the tunnel back out of its Arc.
    let peers_of = Arc::downgrade(&tunnel);
    let peers: PeerSource = Arc::new(move || {
        peers_of
            .upgrade()
            .map(|tunnel| tunnel.peer_stats())
            .unwrap_or_default()
    });
    start_inner(config, network, Some((tunnel, peers, mode))).await
}

/// Runs the agent over `network` without a tunnel of its own: for hosts where WireGuard is
/// managed outside xpart (the relay addresses are routed by the host) and for tests. The
/// `[tunnel]` section is not used.
pub async fn start_with_network(
    config: AgentConfig,
    network: Network,
) -> Result<AgentHandle, StartError> {
    start_inner(config, network, None).await
}

async fn start_inner(
    config: AgentConfig,
    network: Network,
    tunnel: Option<(Arc<Tunnel>, PeerSource, &'static str)>,
) -> Result<AgentHandle, StartError> {
    let certs = Arc::new(CertStore::load(
        &config.resolve(&config.front.cert_file),
        &config.resolve(&config.front.key_file),
    )?);
    let front_tls = tls::server_config(certs.clone())?;
    let inner_tls = match config.tunnel.inner_tls_files(|path| config.resolve(path)) {
        Some(files) => Some(inner_tls::InnerTls::new(&files)?),
        None => None,
    };
    xpart_daemon::crypto::require_fips(&[
        ("[front] (the callers' TLS)", front_tls.fips()),
        (
            "[tunnel] inner TLS (agent→relay)",
            inner_tls.as_ref().is_some_and(inner_tls::InnerTls::fips),
        ),
    ])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(front_tls);
    let listener = tokio::net::TcpListener::bind(config.front.listen)
        .await
        .map_err(|source| StartError::Bind {
            field: "[front].listen",
            addr: config.front.listen,
            source,
        })?;
    let front_addr = listener.local_addr().map_err(|source| StartError::Bind {
        field: "[front].listen",
        addr: config.front.listen,
        source,
    })?;

    let metrics = Metrics::new();
    let audit = match &config.audit.path {
        Some(path) => {
            let path = config.resolve(path);
            AuditLog::open(&path).map_err(|source| StartError::Audit { path, source })?
        }
        None => AuditLog::disabled(),
    };
    if let Err(error) = audit.register(&metrics.registry) {
        tracing::warn!(%error, "audit metrics not registered");
    }
    if let Err(error) = xpart_daemon::crypto::register_metrics(&metrics.registry) {
        tracing::warn!(%error, "FIPS mode metric not registered");
    }
    let dropped = tunnel.as_ref().map(|(tunnel, _, _)| {
        // Weak: shutdown takes the tunnel back out of its Arc.
        let tunnel = Arc::downgrade(tunnel);
        let source: xpart_daemon::admin::DropSource =
            Arc::new(move || tunnel.upgrade().map(|t| t.dropped()));
        source
    });
    if let Some(source) = &dropped {
        if let Err(error) =
            xpart_daemon::admin::register_tunnel_drops(&metrics.registry, source.clone())
        {
            tracing::warn!(%error, "tunnel drop metrics not registered");
        }
    }
    if let Some((_, peers, _)) = &tunnel {
        if let Err(error) =
            xpart_daemon::admin::register_tunnel_peers(&metrics.registry, peers.clone())
        {
            tracing::warn!(%error, "tunnel peer metrics not registered");
        }
    }
    let dns = match config.dns_settings() {
        Some(settings) => Some(DnsServer::start(settings, metrics.clone()).await?),
        None => None,
    };
    let dns_addr = dns.as_ref().map(DnsServer::local_addr);

    let principals = config.principals();
    let mut limits = Limits::new();
    let now = Instant::now();
    for principal in &principals {
        limits.add_principal(&principal.name, principal.limits, now);
    }
    let targets = config
        .relays
        .iter()
        .zip(config.relay_shares())
        .map(|(r, share)| RelayTarget {
            name: r.name.clone(),
            service_addr: SocketAddr::new(r.tunnel_address, r.service_port()),
            public_key: r
                .public_key
                .as_deref()
                .and_then(|key| xpart_tunnel::PublicKey::from_base64(key).ok()),
            share,
        })
        .collect();
    let relays = Relays::new(
        targets,
        config.health_settings(),
        config.connection_settings(),
        network,
        metrics.clone(),
    );
    let usage = match &config.audit.path {
        Some(path) => {
            let path = config.resolve(path);
            let (ledger, replayed) = usage::replay(&path, std::time::SystemTime::now());
            tracing::info!(files = ?replayed.files, lines = replayed.lines, unreadable = replayed.unreadable, "today's token usage rebuilt from the audit log");
            ledger
        }
        None => budget::Ledger::new(),
    };
    if let Some(tls) = inner_tls {
        relays.use_inner_tls(tls);
    }
    let agent = Arc::new(Agent {
        usage: usage::UsageBook::new(usage),
        principals: Live::new(Principals::new(principals)),
        limits: SharedLimits::new(limits),
        relays: relays.clone(),
        audit: audit.clone(),
        metrics: metrics.clone(),
    });

    let agent_for_reload = agent.clone();
    let (stop, stopped) = watch::channel(false);
    let peers = tunnel.as_ref().map(|(_, peers, _)| peers.clone());
    let tasks = vec![
        tokio::spawn(monitor::run(
            relays,
            peers.clone(),
            metrics,
            stopped.clone(),
        )),
        tokio::spawn(front::serve(
            listener,
            acceptor,
            agent.clone(),
            config.front_settings(),
            stopped,
        )),
    ];
    let view = admin::AdminView {
        agent: agent.clone(),
        peers,
        dropped,
        started: Instant::now(),
        front_addr,
        dns_addr,
        tunnel_mode: tunnel.as_ref().map_or("host", |(_, _, mode)| *mode),
        tunnel_address: config.tunnel.address.map(|a| a.to_string()),
    };
    let admin =
        xpart_daemon::admin::serve(config.admin.listen, Arc::new(view)).map_err(|source| {
            StartError::Bind {
                field: "[admin].listen",
                addr: config.admin.listen,
                source,
            }
        })?;
    tracing::info!(front = %front_addr, dns = ?dns_addr, admin = %admin.local_addr(), "agent started");
    Ok(AgentHandle {
        agent: agent_for_reload,
        running: config,
        front_addr,
        dns,
        dns_addr,
        admin,
        certs,
        audit,
        stop,
        tasks,
        tunnel: tunnel.map(|(tunnel, _, _)| tunnel),
    })
}

/// The WireGuard side of the config: one peer per relay, routing its tunnel address.
pub fn tunnel_config(config: &AgentConfig) -> Result<TunnelConfig, StartError> {
    let tunnel = xpart_daemon::tunnel_config::tunnel_config(
        Side::Agent,
        &config.tunnel,
        &config.relays,
        |path| config.resolve(path),
    )?;
    tunnel.ok_or(StartError::HostMode)
}
