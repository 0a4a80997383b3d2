//! The agent's Prometheus metrics, served on the admin port's `/metrics`. The tunnel's
//! metrics are the relay's too, registered by `xpart_daemon::admin`.

use std::sync::Arc;

use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec, Registry};
use xpart_daemon::metrics;
use xpart_daemon::status_page::Activity;

/// Latency buckets (seconds) from sub-millisecond proxy overhead to long generations.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Requests by principal, operation, model and HTTP status (refusals included). Every
    /// label comes from the config or the code, never from the caller: `model` is the
    /// principal's allowlist entry that matched, `denied` for requests refused before or at
    /// authorization, `other` for operations that name no model.
    pub requests: IntCounterVec,
    /// Whole-request latency at the agent, until the response body ended.
    pub request_seconds: HistogramVec,
    /// Time from forwarding to the relay's response headers.
    pub upstream_seconds: HistogramVec,
    /// DNS answers by outcome: answered, forwarded, nxdomain, nodata, refused, servfail, formerr.
    pub dns_answers: IntCounterVec,
    /// 1 while a relay takes traffic.
    pub relay_healthy: IntGaugeVec,
    /// Model tokens the answers reported, by principal, model family (`anthropic.claude`;
    /// a bounded set, see `usage::model_family`) and kind: input, output, cache_read,
    /// cache_write.
    pub tokens: IntCounterVec,
    /// Requests counted against each relay by the balancer, until their answer ends.
    pub relay_outstanding: IntGaugeVec,
    /// Relays taken out at once by a passive failure, by reason: connect_failed,
    /// connection_lost, stream_reset.
    pub relay_ejections: IntCounterVec,
    /// Request and error totals and the last failed requests, for the status page.
    pub activity: Arc<Activity>,
}

impl Metrics {
    pub fn new() -> Metrics {
        // Names are distinct constants, so definition and registration cannot fail.
        Metrics::registered(Registry::new()).expect("static, distinct metric definitions")
    }

    fn registered(registry: Registry) -> prometheus::Result<Metrics> {
        let r = &registry;
        Ok(Metrics {
            requests: metrics::counters(
                r,
                "xpart_agent_requests_total",
                "Bedrock requests handled",
                &["principal", "operation", "model", "status"],
            )?,
            request_seconds: metrics::histograms(
                r,
                "xpart_agent_request_duration_seconds",
                "Time from request to end of response body",
                LATENCY_BUCKETS,
                &["operation"],
            )?,
            upstream_seconds: metrics::histograms(
                r,
                "xpart_agent_upstream_duration_seconds",
                "Time from forwarding to the relay's response headers",
                LATENCY_BUCKETS,
                &["relay"],
            )?,
            dns_answers: metrics::counters(
                r,
                "xpart_agent_dns_answers_total",
                "DNS answers by outcome",
                &["outcome"],
            )?,
            relay_healthy: metrics::gauges(
                r,
                "xpart_agent_relay_healthy",
                "1 while the relay takes traffic",
                &["relay"],
            )?,
            tokens: metrics::counters(
                r,
                "xpart_agent_tokens_total",
                "Model tokens the answers reported, by principal, model family and kind",
                &["principal", "model_family", "kind"],
            )?,
            relay_outstanding: metrics::gauges(
                r,
                "xpart_agent_relay_outstanding",
                "Requests sent or being sent to the relay whose answer has not ended",
                &["relay"],
            )?,
            relay_ejections: metrics::counters(
                r,
                "xpart_agent_relay_ejections_total",
                "Relays taken out of the rotation at once by a failed connect, a lost connection or a reset stream",
                &["relay", "reason"],
            )?,
            registry,
            activity: Arc::new(Activity::new()),
        })
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
