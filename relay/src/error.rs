//! The relay's one error type, and the single place it becomes a Bedrock-shaped error.

use std::net::SocketAddr;

use xpart_daemon::bedrock::{BedrockError, ErrorType};

/// Everything that can go wrong in the relay, in the terms an operator or a caller would use.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },

    #[error("tunnel: {0}")]
    Tunnel(String),

    #[error("admin server on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },

    #[error("audit log {path}: {source}")]
    Audit {
        path: std::path::PathBuf,
        source: std::io::Error,
    },

    #[error("upstream setup: {0}")]
    UpstreamSetup(String),

    #[error("metrics registry: {0}")]
    Metrics(String),

    #[error(
        "requests are accepted only from configured agents' tunnel addresses; {peer} is not one"
    )]
    NotAnAgent { peer: SocketAddr },

    #[error("{0}")]
    Route(BedrockError),

    #[error("operation {operation} is not allowed by this relay's [policy] operations")]
    OperationNotAllowed { operation: String },

    #[error("model {model} is not allowed by this relay's [policy] models")]
    ModelNotAllowed { model: String },

    #[error("model {model} needs the inference profile {profile}, which this relay's [policy] models does not allow")]
    ProfileNotAllowed { model: String, profile: String },

    #[error(
        "guardrail {guardrail} (id:version) is not allowed by this relay's [policy] guardrails"
    )]
    GuardrailNotAllowed { guardrail: String },

    #[error("header {header}: {value} is not allowed by this relay's [policy] {field}")]
    HeaderNotAllowed {
        header: &'static str,
        value: String,
        field: &'static str,
    },

    #[error("header {header}: {reason}")]
    InvalidHeader { header: String, reason: String },

    #[error(
        "model {model} is rewritten by [rewrite] to {rewritten}, which is not a Bedrock model id"
    )]
    BadRewrite { model: String, rewritten: String },

    #[error("the relay is already buffering its limit of {budget} request-body bytes ([limits] max_buffered_body_bytes); retry shortly")]
    BodyBudgetExhausted { budget: u64 },

    #[error("model {model} is a GovCloud identifier and no [rewrite] rule maps it to the Commercial partition")]
    NoRewriteRule { model: String },

    #[error("request body is larger than Bedrock's limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },

    #[error("request body could not be read: {0}")]
    BodyRead(String),

    #[error("header {name} is not valid text and cannot be signed")]
    UnsignableHeader { name: String },

    #[error("request {0} cannot be parsed as JSON for the echo model")]
    EchoInput(String),

    #[error("relay has no AWS credentials ({reason}); only the echo model can be answered")]
    NoCredentials { reason: String },

    #[error("signing failed: {0}")]
    Signing(String),

    #[error("upstream {endpoint} is unavailable: {reason}")]
    UpstreamUnavailable { endpoint: String, reason: String },

    #[error("upstream {endpoint} did not start answering within {seconds} s")]
    UpstreamTimeout { endpoint: String, seconds: u64 },
}

impl Error {
    /// The Bedrock error a caller sees for this failure; status and error type for every variant
    /// are decided here and nowhere else.
    pub fn to_bedrock(&self) -> BedrockError {
        let kind = match self {
            Error::Listen { .. } => ErrorType::InternalServer,
            Error::Tunnel(_) => ErrorType::InternalServer,
            Error::Admin { .. } => ErrorType::InternalServer,
            Error::Audit { .. } => ErrorType::InternalServer,
            Error::UpstreamSetup(_) => ErrorType::InternalServer,
            Error::Metrics(_) => ErrorType::InternalServer,
            Error::NotAnAgent { .. } => ErrorType::AccessDenied,
            Error::Route(route) => return route.clone(),
            Error::OperationNotAllowed { .. } => ErrorType::AccessDenied,
            Error::ModelNotAllowed { .. } => ErrorType::AccessDenied,
            Error::ProfileNotAllowed { .. } => ErrorType::AccessDenied,
            Error::GuardrailNotAllowed { .. } => ErrorType::AccessDenied,
            Error::HeaderNotAllowed { .. } => ErrorType::AccessDenied,
            Error::InvalidHeader { .. } => ErrorType::Validation,
            Error::BadRewrite { .. } => ErrorType::Validation,
            Error::BodyBudgetExhausted { .. } => ErrorType::ServiceUnavailable,
            Error::NoRewriteRule { .. } => ErrorType::Validation,
            Error::BodyTooLarge { .. } => ErrorType::Validation,
            Error::BodyRead(_) => ErrorType::Validation,
            Error::UnsignableHeader { .. } => ErrorType::Validation,
            Error::EchoInput(_) => ErrorType::Validation,
            Error::NoCredentials { .. } => ErrorType::ServiceUnavailable,
            Error::Signing(_) => ErrorType::InternalServer,
            Error::UpstreamUnavailable { .. } => ErrorType::ServiceUnavailable,
            Error::UpstreamTimeout { .. } => ErrorType::ServiceUnavailable,
        };
        BedrockError {
            kind,
            message: self.to_string(),
        }
    }
}
