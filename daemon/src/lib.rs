//! What the two xpart daemons (`xpart-agent` on the GovCloud side, `xpart-relay` on the
//! Commercial side) share, so that both speak Bedrock the same way and are operated the
//! same way.
//!
//! A request arriving at either daemon is first recognised with [`bedrock::Route::parse`]
//! (operation, [`bedrock::ModelId`] decoded once and held to Bedrock's grammar, path rebuilt from it);
//! allowlists match model ids with [`bedrock::glob_match`]; headers are cleaned with
//! [`bedrock::strip_hop_by_hop`], [`bedrock::strip_caller_credentials`] and
//! [`protocol::strip_xpart_headers`] before forwarding; every refusal is a
//! [`bedrock::BedrockError`], turned into Bedrock's error response in one place
//! ([`bedrock::BedrockError::into_response`]). When the request is done, the daemon fills an
//! [`audit::AuditRecord`] and hands it to [`audit::AuditLog`], which writes JSON lines from a
//! background task. Around the request path: [`config`] reads TOML into the daemon's typed
//! config and collects every problem into [`config::Diagnostics`]; [`admin::serve`] runs
//! `/metrics`, `/healthz`, `/readyz`, `/status` and daemon-specific routes; [`logging::init`]
//! sets up tracing; [`shutdown`] turns SIGINT/SIGTERM and SIGHUP into futures, and
//! [`reload::run`] is both daemons' signal loop (SIGHUP reopens the audit log and applies
//! the parts of a new configuration that change live, held in [`reload::Live`]). At startup,
//! [`startup::load_config`] loads the file named by `--config` and answers `--check`, and
//! [`tunnel_config::tunnel_config`] turns the `[tunnel]` section and the peer tables into
//! the WireGuard configuration.
//!
//! Beyond the wire contracts in docs/CONTRACTS.md:
//! - [`bedrock::ErrorType::UnknownOperation`] (404 `UnknownOperationException`, what AWS
//!   rest-json front ends answer for a path no operation uses);
//! - [`bedrock::Route`] carries `guardrail` and
//!   `invocation_arn` as its path parameters; `into_response` also sets
//!   `x-xpart-request-id`;
//! - [`protocol`] holds the tunnel header names and [`protocol::strip_xpart_headers`];
//! - [`config::Problem`] has a `location` (line, column); [`config::parse_toml`] parses
//!   text (for `from_toml_str`); [`config::Diagnostics::locate_in`] adds line numbers to
//!   validation problems;
//! - [`admin::json`] and [`admin::text`] build responses for `AdminHandler::extra`;
//! - [`audit::AuditLog`] has `flush`, `reopen` (call it on SIGHUP), `close` (call it on
//!   shutdown) and `register` (its written/dropped counters);
//! - the shutdown future is [`shutdown::signal`] ([`shutdown::stop_signals`] listens from a
//!   known moment); the SIGHUP stream is [`shutdown::reload`].
//!
//! `admin::serve` and `AuditLog::open` are synchronous but must be called inside a Tokio
//! runtime. Errors are per audience rather than one enum: [`bedrock::BedrockError`] for
//! Bedrock clients, [`config::Diagnostics`] for operators editing a file, `io::Error` and
//! [`tunnel_config::TunnelConfigError`] for the daemon's startup.

pub mod admin;
pub mod audit;
pub mod bedrock;
pub mod config;
pub mod logging;
pub mod protocol;
pub mod reload;
pub mod shutdown;
pub mod startup;
pub mod tunnel_config;
