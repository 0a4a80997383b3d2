//! The relay's Prometheus metrics. No label carries a caller-chosen string: the model label
//! is the `[policy] models` pattern that matched (or the echo model's configured name),
//! `denied` or `other`, so made-up IDs cannot grow the label set. The tunnel's metrics are the
//! agent's too, registered by `xpart_daemon::admin`.

use std::time::{Duration, SystemTime};

use prometheus::{Gauge, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};

use xpart_daemon::metrics;
use xpart_daemon::status_page::Activity;

use crate::credentials::Status;

/// Buckets up to 15 minutes: whole generations are measured, not just first bytes.
const LATENCY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
];

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    upstream_latency: HistogramVec,
    upstream_errors: IntCounterVec,
    in_flight: IntGauge,
    body_budget_refused: IntCounter,
    buffered_body_bytes: IntGauge,
    /// Request and error totals and the last failed requests, for the status page.
    pub activity: Activity,
    credentials_available: IntGauge,
    credentials_expiry: Gauge,
    tokens: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let r = &registry;
        let tokens = metrics::counters(
            r,
            "xpart_relay_tokens_total",
            "Model tokens Bedrock's answers reported, by model and kind (input, output, cache_read, cache_write)",
            &["model", "kind"],
        )?;
        let requests = metrics::counters(
            r,
            "xpart_relay_requests_total",
            "Requests by operation, model and status",
            &["operation", "model", "status"],
        )?;
        let latency = metrics::histograms(
            r,
            "xpart_relay_request_duration_seconds",
            "Time from request arrival to the last response byte",
            &LATENCY_BUCKETS,
            &["operation"],
        )?;
        let upstream_latency = metrics::histograms(
            r,
            "xpart_relay_upstream_first_byte_seconds",
            "Time from sending upstream to the response head",
            &LATENCY_BUCKETS,
            &["operation"],
        )?;
        let upstream_errors = metrics::counters(
            r,
            "xpart_relay_upstream_errors_total",
            "Upstream failures: unavailable, timeout, stream_error, idle_timeout",
            &["kind"],
        )?;
        let in_flight = metrics::gauge(r, "xpart_relay_in_flight", "Requests being handled")?;
        let body_budget_refused = metrics::counter(
            r,
            "xpart_relay_body_budget_refused_total",
            "Requests refused (503) because [limits] max_buffered_body_bytes was in use",
        )?;
        let buffered_body_bytes = metrics::gauge(
            r,
            "xpart_relay_buffered_body_bytes",
            "Request-body bytes reserved or buffered right now",
        )?;
        let credentials_available = metrics::gauge(
            r,
            "xpart_relay_credentials_available",
            "1 when the relay holds AWS credentials",
        )?;
        let credentials_expiry = metrics::float_gauge(
            r,
            "xpart_relay_credentials_expiry_timestamp_seconds",
            "Unix time the current AWS credentials expire (0: none or no expiry)",
        )?;
        Ok(Metrics {
            registry,
            requests,
            latency,
            upstream_latency,
            upstream_errors,
            in_flight,
            body_budget_refused,
            buffered_body_bytes,
            activity: Activity::new(),
            credentials_available,
            credentials_expiry,
            tokens,
        })
    }

    pub fn started(&self) {
        self.in_flight.inc();
    }

    pub fn finished(&self, operation: &str, model: &str, status: u16, latency: Duration) {
        self.in_flight.dec();
        self.requests
            .with_label_values(&[operation, model, &status.to_string()])
            .inc();
        self.latency
            .with_label_values(&[operation])
            .observe(latency.as_secs_f64());
    }

    /// Tokens of one answer; `model` is the metrics label of [`Metrics::finished`].
    pub fn tokens(&self, model: &str, kind: &str, count: u64) {
        self.tokens.with_label_values(&[model, kind]).inc_by(count);
    }

    pub fn upstream_answered(&self, operation: &str, latency: Duration) {
        self.upstream_latency
            .with_label_values(&[operation])
            .observe(latency.as_secs_f64());
    }

    pub fn body_budget_refused(&self) {
        self.body_budget_refused.inc();
    }

    pub fn buffered_body_bytes(&self, bytes: u64) {
        self.buffered_body_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn upstream_error(&self, kind: &str) {
        self.upstream_errors.with_label_values(&[kind]).inc();
    }

    /// Refresh the gauges read from elsewhere just before a scrape.
    pub fn observe(&self, credentials: &Status) {
        match credentials {
            Status::Available { expiry } => {
                self.credentials_available.set(1);
                self.credentials_expiry
                    .set(expiry.map(unix_seconds).unwrap_or(0.0));
            }
            Status::Missing { .. } => {
                self.credentials_available.set(0);
                self.credentials_expiry.set(0.0);
            }
        }
    }
}

pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
