//! What the relay records about each request: an [`Exchange`] follows a request through the
//! pipeline and, when the response is finished (or abandoned), writes exactly one audit line
//! and the request metrics through the daemons' shared [`Recorder`]. Never bodies, bearer
//! tokens or credentials; model token counts, when the answer reported them.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use xpart_bedrock::protocol::{PRINCIPAL_HEADER, REQUEST_ID_HEADER};
use xpart_bedrock::usage::Reading;
use xpart_bedrock::{ModelId, Operation};
use xpart_daemon::audit::{AuditLog, AuditRecord, Service};
use xpart_daemon::record::{Recorder, RequestMetrics};
use xpart_daemon::request_id;

use crate::metrics::Metrics;

/// Status recorded when the agent went away before the response was complete (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

pub struct Exchange {
    recorder: Recorder,
    metrics: Arc<Metrics>,
}

impl Exchange {
    pub fn begin(headers: &HeaderMap, log: AuditLog, metrics: Arc<Metrics>) -> Exchange {
        let given = header_text(headers, REQUEST_ID_HEADER);
        let mut record =
            AuditRecord::new(Service::Relay, request_id::given_or_new(given.as_deref()));
        record.principal = header_text(headers, PRINCIPAL_HEADER);
        metrics.started();
        let recorder = Recorder::new(record, log, metrics.clone()).if_dropped(
            CLIENT_CLOSED,
            "the agent closed the request before the response was complete",
        );
        Exchange { recorder, metrics }
    }

    pub fn request_id(&self) -> String {
        self.recorder.request_id().to_owned()
    }

    pub fn operation(&self) -> Option<Operation> {
        self.recorder.record.operation
    }

    /// The token usage the answer reported, and whether all of it was read.
    pub fn set_usage(&mut self, reading: Reading) {
        let record = &mut self.recorder.record;
        record.input_tokens = reading.usage.input_tokens;
        record.output_tokens = reading.usage.output_tokens;
        record.cache_read_tokens = reading.usage.cache_read_tokens;
        record.cache_write_tokens = reading.usage.cache_write_tokens;
        record.usage_complete = Some(reading.complete);
    }

    pub fn set_operation(&mut self, operation: Operation) {
        self.recorder.record.operation = Some(operation);
    }

    pub fn set_model(&mut self, model: &ModelId) {
        self.recorder.record.model = Some(model.clone());
    }

    /// The model passed the policy: label metrics with the `[policy] models` pattern that
    /// matched (or the echo model's configured name), never with the id the caller sent.
    pub fn label_model(&mut self, label: &str) {
        self.recorder.label_model(label);
    }

    pub fn set_bytes_in(&mut self, bytes: u64) {
        self.recorder.record.bytes_in = bytes;
    }

    /// Time to the upstream response head; with a retry, the two attempts add up.
    pub fn add_upstream_latency(&mut self, latency: Duration) {
        let ms = latency.as_secs_f64() * 1000.0;
        let record = &mut self.recorder.record;
        record.upstream_latency_ms = Some(record.upstream_latency_ms.unwrap_or(0.0) + ms);
        let operation = record.operation.map(Operation::name).unwrap_or("-");
        self.metrics.upstream_answered(operation, latency);
    }

    /// Write the audit line and metrics. `error_type` is the error code (`ThrottlingException`)
    /// for failures, whoever produced them; `message` is the relay's own reason when it refused.
    pub fn finish(
        self,
        status: u16,
        error_type: Option<String>,
        message: Option<String>,
        bytes_out: u64,
    ) {
        self.recorder.finish(status, error_type, message, bytes_out);
    }
}

impl RequestMetrics for Metrics {
    fn finished(&self, record: &AuditRecord, model_label: Option<&str>, latency: Duration) {
        let operation = record.operation.map(Operation::name).unwrap_or("-");
        let model = match (model_label, &record.model) {
            (Some(label), _) => label,
            (None, Some(_)) => "denied",
            (None, None) => "other",
        };
        self.activity.record(record);
        Metrics::finished(self, operation, model, record.status, latency);
        let kinds = [
            ("input", record.input_tokens),
            ("output", record.output_tokens),
            ("cache_read", record.cache_read_tokens),
            ("cache_write", record.cache_write_tokens),
        ];
        for (kind, count) in kinds {
            if let Some(count) = count {
                self.tokens(model, kind, count);
            }
        }
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    let value = headers.get(name)?.to_str().ok()?;
    Some(value.chars().take(256).collect())
}
