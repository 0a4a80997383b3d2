//! What the two xpart daemons (`xpart-agent` on the GovCloud side, `xpart-relay` on the
//! Commercial side) share, so that both speak Bedrock the same way and are operated the
//! same way.
//!
//! A request arriving at either daemon is first recognised with [`bedrock::Route::parse`]
//! (operation, percent-decoded [`bedrock::ModelId`], raw path segment for forwarding);
//! allowlists match model ids with [`bedrock::glob_match`]; headers are cleaned with
//! [`bedrock::strip_hop_by_hop`], [`bedrock::strip_caller_credentials`] and
//! [`protocol::strip_xpart_headers`] before forwarding; every refusal is a
//! [`bedrock::BedrockError`], turned into Bedrock's error response in one place
//! ([`bedrock::BedrockError::into_response`]). When the request is done, the daemon fills an
//! [`audit::AuditRecord`] and hands it to [`audit::AuditLog`], which writes JSON lines from a
//! background task. Around the request path: [`config`] reads TOML into the daemon's typed
//! config and collects every problem into [`config::Diagnostics`]; [`admin::serve`] runs
//! `/metrics`, `/healthz`, `/readyz`, `/status` and daemon-specific routes; [`logging::init`]
//! sets up tracing; [`shutdown`] turns SIGINT/SIGTERM and SIGHUP into futures.
//!
//! Beyond CONTRACTS.md §2: [`bedrock::ErrorType::UnknownOperation`] (404
//! `UnknownOperationException`, for paths no operation uses); [`bedrock::Route`] carries
//! `raw_model`, `guardrail` and `invocation_arn` as its path parameters; `into_response`
//! also sets `x-xpart-request-id`; [`protocol`] holds the tunnel header names;
//! [`config::Problem`] has a `location` (line, column) and [`config::parse_toml`] parses
//! text (for `from_toml_str`); [`audit::AuditLog`] has `flush`, `reopen`, `close` and
//! `register` (its metrics); the shutdown future is [`shutdown::signal`] (or
//! [`shutdown::stop_signals`] to listen from a known moment) and the SIGHUP
//! stream [`shutdown::reload`]. `admin::serve` and `AuditLog::open` are synchronous but
//! must run inside a Tokio runtime. Errors are per module (`BedrockError`, `Diagnostics`,
//! `io::Error`) because each goes to a different audience: Bedrock clients, operators
//! editing a file, and the daemon's startup.

pub mod admin;
pub mod audit;
pub mod bedrock;
pub mod config;
pub mod logging;
pub mod protocol;
pub mod shutdown;
