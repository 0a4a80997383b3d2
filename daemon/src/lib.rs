//! Runs an xpart daemon (`xpart-agent` on the GovCloud side, `xpart-relay` on the Commercial
//! side), and nothing else: the plumbing both daemons share so that they are started, operated
//! and observed the same way. What a request means on the wire (routes, model ids, Bedrock's
//! error shape, header rules) is `xpart-bedrock`'s job; each daemon's own request path is its
//! own crate's.
//!
//! At startup, [`startup::load_config`] loads the file named by `--config` and answers
//! `--check`; [`config`] reads TOML into the daemon's typed config and collects every problem
//! into [`config::Diagnostics`]; [`tunnel_config::tunnel_config`] turns the `[tunnel]` section
//! and the peer tables into the WireGuard configuration; [`logging::init`] sets up tracing.
//! [`startup::run`] is a daemon's whole life given its [`startup::Daemon`] description: load,
//! `--check`, logging, start, the `listening` line, signals, shutdown. Every HTTP listener (the
//! agent's TLS front, the relay's service address, both admin ports) is [`serve::serve`]: one
//! accept loop with connection caps, handshake, first-request and idle deadlines, and graceful
//! shutdown. While running, [`admin::serve`] runs `/metrics`, `/healthz`, `/readyz`, `/status` and
//! daemon-specific routes; [`shutdown`] turns SIGINT/SIGTERM and SIGHUP into futures, and
//! [`reload::run`] is both daemons' signal loop (SIGHUP reopens the audit log and applies the
//! parts of a new configuration that change live, held in [`reload::Live`]). Per request: the
//! id from [`request_id`]; an [`audit::AuditRecord`] filled in a [`record::Recorder`], which
//! writes one audit line (JSON lines from [`audit::AuditLog`]'s background task) and counts the
//! request once it is finished, a streamed response reporting its [`record::Ending`]; causes
//! of a failure on one line with [`error_chain::one_line`].
//!
//! Details a caller needs:
//! - [`config::Problem`] has a `location` (line, column); [`config::parse_toml`] parses
//!   text (for `from_toml_str`); [`config::Diagnostics::locate_in`] adds line numbers to
//!   validation problems;
//! - [`admin::json`] and [`admin::text`] build responses for `AdminHandler::extra`; a daemon's
//!   [`status_page::StatusPage`] (from `AdminHandler::status_page`) is the admin port's `GET /`
//!   page of its `/status`, and [`status_page::Activity`] counts finished requests and keeps
//!   the last failures;
//! - [`pem`] reads a TLS certificate chain and an owner-only private key;
//! - [`metrics`] defines and registers a Prometheus metric in one call;
//! - [`audit::AuditLog`] has `flush`, `reopen` (call it on SIGHUP), `close` (call it on
//!   shutdown) and `register` (its written/dropped counters);
//! - the shutdown future is [`shutdown::signal`] ([`shutdown::stop_signals`] listens from a
//!   known moment); the SIGHUP stream is [`shutdown::reload`].
//!
//! `admin::serve` and `AuditLog::open` are synchronous but must be called inside a Tokio
//! runtime. Errors are per audience rather than one enum: [`config::Diagnostics`] for operators
//! editing a file, `io::Error` and [`tunnel_config::TunnelConfigError`] for the daemon's
//! startup; errors for Bedrock clients are `xpart_bedrock::BedrockError`.

pub mod admin;
pub mod audit;
pub mod body;
pub mod config;
pub mod crypto;
pub mod error_chain;
pub mod inner_tls;
pub mod logging;
pub mod metrics;
pub mod pem;
pub mod record;
pub mod reload;
pub mod request_id;
pub mod serve;
pub mod shutdown;
pub mod startup;
pub mod status_page;
pub mod tunnel_config;
