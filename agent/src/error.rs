//! The agent's errors, by audience: [`StartError`] tells the operator why the agent did not
//! start (which setting, what to fix); [`RequestError`] is why one request was refused or
//! failed, and [`RequestError::to_bedrock`] is the single place it becomes the Bedrock error
//! the caller sees.

use std::net::SocketAddr;
use std::path::PathBuf;

use xpart_bedrock::{BedrockError, ErrorType};
use xpart_daemon::tunnel_config::TunnelConfigError;

use crate::auth::Denial;
use crate::budget::OverBudget;
use crate::forward::ForwardError;
use crate::limits::Refusal;

/// Why the agent could not start (or could not load a new certificate), for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{field} {addr}: cannot bind: {source} — fix: free the address or choose another")]
    Bind {
        /// The setting that names the address, e.g. `[front].listen`.
        field: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{}: {reason}", file.display())]
    Certificate { file: PathBuf, reason: String },
    #[error("TLS setup for the front: {0}")]
    Tls(rustls::Error),
    #[error("[dns].names: {name:?} is not a DNS name: {reason} — fix: write each name as a DNS name, e.g. bedrock-runtime.us-east-1.amazonaws.com")]
    DnsName { name: String, reason: String },
    #[error("[tunnel].mode = \"host\" has no WireGuard tunnel — fix: use mode = \"userspace\" or \"kernel\", or start the agent on a network set up elsewhere")]
    HostMode,
    #[error(transparent)]
    TunnelConfig(#[from] TunnelConfigError),
    #[error(transparent)]
    InnerTls(#[from] xpart_daemon::inner_tls::InnerTlsError),
    #[error(transparent)]
    NotFips(#[from] xpart_daemon::crypto::NotFips),
    #[error(transparent)]
    Tunnel(#[from] xpart_tunnel::Error),
    #[error("[audit].path {}: cannot open the audit log: {source} — fix: make its directory writable by the agent's user", path.display())]
    Audit {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why one request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("caller refused: {0:?}")]
    Denied(Denial),
    #[error("{0}")]
    Route(BedrockError),
    /// An OpenAI API request the translation to Bedrock refuses.
    #[error("{0}")]
    OpenAi(crate::openai::Invalid),
    #[error("principal {principal} throttled: {refusal:?}")]
    Throttled { principal: String, refusal: Refusal },
    #[error("principal {principal} over its {} budget", over.window.setting())]
    OverBudget { principal: String, over: OverBudget },
    #[error("principal {principal}: body over {limit} bytes")]
    BodyTooLarge {
        principal: String,
        limit: u64,
        length: Option<u64>,
    },
    #[error("no relay is healthy")]
    NoHealthyRelay,
    #[error(transparent)]
    Forward(ForwardError),
}

/// How a caller sets itself up, quoted in authentication errors.
const CALLER_SETUP: &str = "Configure the caller with AWS_ENDPOINT_URL_BEDROCK_RUNTIME=https://<this agent's Bedrock name>, \
     AWS_CA_BUNDLE=<the xpart CA certificate file> and AWS_BEARER_TOKEN_BEDROCK=<the token issued for it by `xpart token new --principal NAME`>";

impl RequestError {
    /// The Bedrock error a caller receives: status and `x-amzn-ErrorType` for every case.
    pub fn to_bedrock(&self) -> BedrockError {
        match self {
            RequestError::Denied(Denial::MissingCredentials) => BedrockError::new(
                ErrorType::UnrecognizedClient,
                format!("No credentials: this endpoint is an xpart agent in front of Amazon Bedrock and needs a bearer token (or a call from an address a principal allows). {CALLER_SETUP}."),
            ),
            RequestError::Denied(Denial::SigV4NotAccepted) => BedrockError::new(
                ErrorType::UnrecognizedClient,
                format!("This endpoint is an xpart agent: AWS SigV4 signatures are not accepted here (the caller's AWS credentials are not valid for the partition Bedrock runs in). {CALLER_SETUP}; with AWS_BEARER_TOKEN_BEDROCK set, the SDK sends the token instead of signing."),
            ),
            RequestError::Denied(Denial::UnknownToken) => BedrockError::new(
                ErrorType::UnrecognizedClient,
                format!("The bearer token is not one this xpart agent knows. Check AWS_BEARER_TOKEN_BEDROCK against the token issued for this caller. {CALLER_SETUP}."),
            ),
            RequestError::Denied(Denial::SourceNotAllowed { principal, source }) => BedrockError::access_denied(format!(
                "Principal {principal} may not call from {source}; its source_cidrs do not include this address."
            )),
            RequestError::Denied(Denial::ModelNotAllowed { principal, model }) => BedrockError::access_denied(format!(
                "Principal {principal} is not allowed to use model {model}."
            )),
            RequestError::Denied(Denial::OperationNotAllowed { principal, operation }) => BedrockError::access_denied(format!(
                "Principal {principal} is not allowed to call {operation}; its operations list does not include it."
            )),
            RequestError::Route(error) => error.clone(),
            RequestError::OpenAi(invalid) if invalid.not_found => {
                BedrockError::new(ErrorType::UnknownOperation, invalid.message.clone())
            }
            RequestError::OpenAi(invalid) => BedrockError::validation(invalid.message.clone()),
            RequestError::Throttled { principal, refusal: Refusal::Rate { limit, retry_after } } => BedrockError::throttling(format!(
                "Too many requests: principal {principal} is limited to {limit} requests per second; retry after {} ms.",
                retry_after.as_millis().max(1)
            )),
            RequestError::Throttled { principal, refusal: Refusal::Concurrency { limit } } => BedrockError::throttling(format!(
                "Too many concurrent requests: principal {principal} may have {limit} in flight."
            )),
            RequestError::OverBudget { principal, over } => BedrockError::throttling(format!(
                "Token budget exhausted: principal {principal} has used {} of its {} of {} input + output tokens; the budget resets at {} (in {} s).",
                over.used,
                over.window.setting(),
                over.limit,
                xpart_daemon::audit::format_time(over.resets_at),
                over.retry_after.as_secs() + u64::from(over.retry_after.subsec_nanos() > 0),
            )),
            RequestError::BodyTooLarge { principal, limit, length: Some(length) } => BedrockError::validation(format!(
                "Request body of {length} bytes exceeds the {limit}-byte limit for principal {principal}."
            )),
            RequestError::BodyTooLarge { principal, limit, length: None } => BedrockError::validation(format!(
                "Request body exceeds the {limit}-byte limit for principal {principal}."
            )),
            RequestError::NoHealthyRelay => BedrockError::unavailable(
                "No relay is reachable through the tunnel; the request was not sent. Retry shortly.",
            ),
            RequestError::Forward(ForwardError::Unreachable { relay, reason }) => BedrockError::unavailable(format!(
                "Relay {relay} is unreachable ({reason}); the request was not sent. Retry shortly."
            )),
            RequestError::Forward(ForwardError::Lost { relay }) => BedrockError::unavailable(format!(
                "Relay {relay} stopped answering while the request was in flight; Bedrock may or may not have processed it."
            )),
            RequestError::Forward(ForwardError::Failed { relay, reason }) => BedrockError::unavailable(format!(
                "Relay {relay} failed while the request was in flight ({reason}); Bedrock may or may not have processed it."
            )),
        }
    }

    /// A short reason for the audit line (no secrets, no caller-controlled bulk).
    pub fn audit_reason(&self) -> String {
        match self {
            RequestError::Denied(Denial::MissingCredentials) => "no credentials".into(),
            RequestError::Denied(Denial::SigV4NotAccepted) => "SigV4 signature, no token".into(),
            RequestError::Denied(Denial::UnknownToken) => "unknown bearer token".into(),
            RequestError::Denied(Denial::SourceNotAllowed { .. }) => {
                "source address not allowed".into()
            }
            RequestError::Denied(Denial::ModelNotAllowed { .. }) => "model not allowed".into(),
            RequestError::Denied(Denial::OperationNotAllowed { .. }) => {
                "operation not allowed".into()
            }
            RequestError::Route(error) => error.kind.code().into(),
            RequestError::OpenAi(invalid) => match &invalid.param {
                Some(param) => format!("invalid OpenAI request: {param}"),
                None => "invalid OpenAI request".into(),
            },
            RequestError::Throttled {
                refusal: Refusal::Rate { .. },
                ..
            } => "over rate limit".into(),
            RequestError::Throttled {
                refusal: Refusal::Concurrency { .. },
                ..
            } => "over concurrency limit".into(),
            RequestError::BodyTooLarge { .. } => "body too large".into(),
            RequestError::OverBudget { over, .. } => {
                format!("over {} budget", over.window.setting())
            }
            other => other.to_string(),
        }
    }

    /// How long the caller should wait before trying again, when the refusal says
    /// (`Retry-After`).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            RequestError::OverBudget { over, .. } => Some(over.retry_after),
            _ => None,
        }
    }
}
