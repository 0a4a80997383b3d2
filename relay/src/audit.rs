//! What the relay records about each request: an [`Exchange`] follows a request through the
//! pipeline and, when the response is finished (or abandoned), writes exactly one audit line
//! and the request metrics. Never bodies, tokens or credentials.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use xpart_daemon::audit::{AuditLog, AuditRecord, Service};
use xpart_bedrock::{ModelId, Operation, ERROR_TYPE_HEADER};
use xpart_bedrock::protocol::{PRINCIPAL_HEADER, REQUEST_ID_HEADER};

use crate::metrics::Metrics;

/// Status recorded when the agent went away before the response was complete (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

pub struct Exchange {
    record: Option<AuditRecord>,
    started: Instant,
    /// The metric label for the model: configuration text, never the caller's.
    model_label: Option<String>,
    log: AuditLog,
    metrics: Arc<Metrics>,
}

impl Exchange {
    pub fn begin(headers: &HeaderMap, log: AuditLog, metrics: Arc<Metrics>) -> Exchange {
        let mut record = AuditRecord::new(Service::Relay, request_id(headers));
        record.principal = header_text(headers, PRINCIPAL_HEADER);
        metrics.started();
        Exchange {
            record: Some(record),
            started: Instant::now(),
            model_label: None,
            log,
            metrics,
        }
    }

    pub fn request_id(&self) -> String {
        self.record
            .as_ref()
            .map(|r| r.request_id.clone())
            .unwrap_or_default()
    }

    pub fn set_operation(&mut self, operation: Operation) {
        if let Some(r) = self.record.as_mut() {
            r.operation = Some(operation);
        }
    }

    pub fn set_model(&mut self, model: &ModelId) {
        if let Some(r) = self.record.as_mut() {
            r.model = Some(model.clone());
        }
    }

    /// The model passed the policy: label metrics with the `[policy] models` pattern that
    /// matched (or the echo model's configured name), never with the id the caller sent.
    pub fn label_model(&mut self, label: &str) {
        self.model_label = Some(label.to_string());
    }

    pub fn set_bytes_in(&mut self, bytes: u64) {
        if let Some(r) = self.record.as_mut() {
            r.bytes_in = bytes;
        }
    }

    /// Time to the upstream response head; with a retry, the two attempts add up.
    pub fn add_upstream_latency(&mut self, latency: Duration) {
        let ms = latency.as_secs_f64() * 1000.0;
        if let Some(r) = self.record.as_mut() {
            r.upstream_latency_ms = Some(r.upstream_latency_ms.unwrap_or(0.0) + ms);
            let operation = r.operation.map(Operation::name).unwrap_or("-");
            self.metrics.upstream_answered(operation, latency);
        }
    }

    /// Write the audit line and metrics. `error_type` is the error code (`ThrottlingException`)
    /// for failures, whoever produced them; `message` is the relay's own reason when it refused.
    pub fn finish(
        mut self,
        status: u16,
        error_type: Option<String>,
        message: Option<String>,
        bytes_out: u64,
    ) {
        self.complete(status, error_type, message, bytes_out);
    }

    fn complete(
        &mut self,
        status: u16,
        error_type: Option<String>,
        message: Option<String>,
        bytes_out: u64,
    ) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        let latency = self.started.elapsed();
        record.status = status;
        record.error_type = error_type;
        record.message = message.map(|m| shorten(&m));
        record.bytes_out = bytes_out;
        record.latency_ms = latency.as_secs_f64() * 1000.0;
        let operation = record.operation.map(Operation::name).unwrap_or("-");
        let model = match (&self.model_label, &record.model) {
            (Some(label), _) => label.as_str(),
            (None, Some(_)) => "denied",
            (None, None) => "other",
        };
        self.metrics.finished(operation, model, status, latency);
        self.log.record(record);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.complete(
            CLIENT_CLOSED,
            None,
            Some("the agent closed the request before the response was complete".into()),
            0,
        );
    }
}

/// The error code in an upstream `x-amzn-ErrorType` header (`Code:namespace`).
pub fn upstream_error_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(ERROR_TYPE_HEADER)?.to_str().ok()?;
    let code = value.split(':').next().unwrap_or(value);
    Some(code.to_string())
}

/// The agent's request id when it sent a sensible one, else a fresh one.
fn request_id(headers: &HeaderMap) -> String {
    if let Some(id) = header_text(headers, REQUEST_ID_HEADER) {
        let sensible = id.len() <= 128
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if sensible && !id.is_empty() {
            return id;
        }
    }
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    let value = headers.get(name)?.to_str().ok()?;
    Some(value.chars().take(256).collect())
}

fn shorten(message: &str) -> String {
    message
        .chars()
        .take(xpart_daemon::audit::MAX_MESSAGE_CHARS)
        .collect()
}
