//! The relay's errors, by audience: [`StartError`] tells the operator why the relay did not
//! start (which setting, what to fix); [`RequestError`] is what went wrong with one request,
//! and [`RequestError::to_bedrock`] is the single place it becomes a Bedrock-shaped error.

use std::net::SocketAddr;
use std::path::PathBuf;

use xpart_bedrock::{BedrockError, ErrorType};
use xpart_daemon::tunnel_config::TunnelConfigError;

/// Why the relay could not start, for the operator reading its log or `systemctl status`.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("[service].listen {addr}: cannot listen: {source} — fix: free the address or choose another")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },

    #[error(transparent)]
    TunnelConfig(#[from] TunnelConfigError),

    #[error(transparent)]
    Tunnel(#[from] xpart_tunnel::Error),

    #[error("[admin].listen {addr}: cannot serve the admin routes: {source} — fix: free the address or choose another")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },

    #[error("[audit].path {}: cannot open the audit log: {source} — fix: make its directory writable by the relay's user", path.display())]
    Audit {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("[upstream].endpoint: {0}")]
    Endpoint(#[from] EndpointError),

    #[error("[upstream].host_header {host:?} is not a valid host name — fix: give a host name such as bedrock-runtime.us-east-1.amazonaws.com, or remove the field")]
    HostHeader { host: String },

    #[error("[upstream].extra_ca_file {}: cannot read it: {source} — fix: name a PEM file of CA certificates", path.display())]
    ExtraCaRead {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },

    #[error("[upstream].extra_ca_file {}: a certificate in it is not usable as a CA: {source} — fix: keep only CA certificates in the file", path.display())]
    ExtraCaCertificate {
        path: PathBuf,
        source: rustls::Error,
    },

    #[error("upstream TLS setup: {0}")]
    Tls(rustls::Error),

    #[error("[upstream].resolver is empty and the system resolver configuration (/etc/resolv.conf) cannot be read: {0} — fix: list the VPC resolver in [upstream].resolver")]
    SystemResolver(String),

    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),

    #[error(transparent)]
    InnerTls(#[from] xpart_daemon::inner_tls::InnerTlsError),

    #[error(transparent)]
    NotFips(#[from] xpart_daemon::crypto::NotFips),
}

/// Why `[upstream].endpoint` is not an `https://host[:port]` URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("{0:?} must start with https://")]
    NotHttps(String),
    #[error("{0:?} must be a scheme and host only, without a path or user")]
    NotHostOnly(String),
    #[error("{text:?} has an invalid port {port:?}")]
    Port { text: String, port: String },
}

/// What went wrong with one request, in the terms a caller or an operator would use.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
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
        "request field {field}: {value} is not allowed by this relay's [policy] {policy_field}"
    )]
    BodyFieldNotAllowed {
        field: &'static str,
        value: String,
        policy_field: &'static str,
    },

    #[error("request body: {0}")]
    InvalidBody(String),

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

    #[error("the request path {path:?} does not form a valid upstream URL: {reason}")]
    UpstreamUrl { path: String, reason: String },

    #[error("upstream {endpoint} is unavailable: {reason}")]
    UpstreamUnavailable { endpoint: String, reason: String },

    #[error("upstream {endpoint} did not start answering within {seconds} s")]
    UpstreamTimeout { endpoint: String, seconds: u64 },

    #[error("region {region} is not served by this relay; it serves {configured}")]
    RegionNotServed { region: String, configured: String },

    #[error("no FIPS endpoint is configured for {service} in {region} on this relay; the request was not sent to the non-FIPS endpoint")]
    NoFipsUpstream { service: String, region: String },

    #[error("this relay has no {service} upstream for {region}")]
    ServiceNotServed { service: String, region: String },

    #[error("the {operation} answer from {endpoint} could not be filtered: {reason}")]
    UnfilterableAnswer {
        operation: String,
        endpoint: String,
        reason: String,
    },
}

impl RequestError {
    /// The Bedrock error a caller sees for this failure; status and error type for every variant
    /// are decided here and nowhere else.
    pub fn to_bedrock(&self) -> BedrockError {
        let kind = match self {
            RequestError::NotAnAgent { .. } => ErrorType::AccessDenied,
            RequestError::Route(route) => return route.clone(),
            RequestError::OperationNotAllowed { .. } => ErrorType::AccessDenied,
            RequestError::ModelNotAllowed { .. } => ErrorType::AccessDenied,
            RequestError::ProfileNotAllowed { .. } => ErrorType::AccessDenied,
            RequestError::GuardrailNotAllowed { .. } => ErrorType::AccessDenied,
            RequestError::HeaderNotAllowed { .. } => ErrorType::AccessDenied,
            RequestError::BodyFieldNotAllowed { .. } => ErrorType::AccessDenied,
            RequestError::InvalidBody(_) => ErrorType::Validation,
            RequestError::InvalidHeader { .. } => ErrorType::Validation,
            RequestError::BadRewrite { .. } => ErrorType::Validation,
            RequestError::BodyBudgetExhausted { .. } => ErrorType::ServiceUnavailable,
            RequestError::NoRewriteRule { .. } => ErrorType::Validation,
            RequestError::BodyTooLarge { .. } => ErrorType::Validation,
            RequestError::BodyRead(_) => ErrorType::Validation,
            RequestError::UnsignableHeader { .. } => ErrorType::Validation,
            RequestError::EchoInput(_) => ErrorType::Validation,
            RequestError::NoCredentials { .. } => ErrorType::ServiceUnavailable,
            RequestError::Signing(_) => ErrorType::InternalServer,
            RequestError::UpstreamUrl { .. } => ErrorType::Validation,
            RequestError::UpstreamUnavailable { .. } => ErrorType::ServiceUnavailable,
            RequestError::UpstreamTimeout { .. } => ErrorType::ServiceUnavailable,
            RequestError::RegionNotServed { .. } => ErrorType::Validation,
            RequestError::NoFipsUpstream { .. } => ErrorType::AccessDenied,
            RequestError::ServiceNotServed { .. } => ErrorType::AccessDenied,
            RequestError::UnfilterableAnswer { .. } => ErrorType::InternalServer,
        };
        BedrockError {
            kind,
            message: self.to_string(),
        }
    }
}
