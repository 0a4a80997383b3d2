//! The agent's Prometheus metrics, served on the admin port's `/metrics`. The tunnel's
//! metrics are the relay's too, registered by `xpart_daemon::admin`.

use std::sync::Arc;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
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
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("xpart_agent_requests_total", "Bedrock requests handled"),
            &["principal", "operation", "model", "status"],
        )
        .expect("static metric definition");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "xpart_agent_request_duration_seconds",
                "Time from request to end of response body",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["operation"],
        )
        .expect("static metric definition");
        let upstream_seconds = HistogramVec::new(
            HistogramOpts::new(
                "xpart_agent_upstream_duration_seconds",
                "Time from forwarding to the relay's response headers",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["relay"],
        )
        .expect("static metric definition");
        let dns_answers = IntCounterVec::new(
            Opts::new("xpart_agent_dns_answers_total", "DNS answers by outcome"),
            &["outcome"],
        )
        .expect("static metric definition");
        let relay_healthy = IntGaugeVec::new(
            Opts::new(
                "xpart_agent_relay_healthy",
                "1 while the relay takes traffic",
            ),
            &["relay"],
        )
        .expect("static metric definition");
        let relay_outstanding = IntGaugeVec::new(
            Opts::new(
                "xpart_agent_relay_outstanding",
                "Requests sent or being sent to the relay whose answer has not ended",
            ),
            &["relay"],
        )
        .expect("static metric definition");
        let relay_ejections = IntCounterVec::new(
            Opts::new(
                "xpart_agent_relay_ejections_total",
                "Relays taken out of the rotation at once by a failed connect, a lost connection or a reset stream",
            ),
            &["relay", "reason"],
        )
        .expect("static metric definition");
        let tokens = IntCounterVec::new(
            Opts::new(
                "xpart_agent_tokens_total",
                "Model tokens the answers reported, by principal, model family and kind",
            ),
            &["principal", "model_family", "kind"],
        )
        .expect("static metric definition");

        let metrics = Metrics {
            registry,
            requests,
            request_seconds,
            upstream_seconds,
            dns_answers,
            relay_healthy,
            tokens,
            relay_outstanding,
            relay_ejections,
            activity: Arc::new(Activity::new()),
        };
        metrics.register_all();
        metrics
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.requests.clone()),
            Box::new(self.request_seconds.clone()),
            Box::new(self.upstream_seconds.clone()),
            Box::new(self.dns_answers.clone()),
            Box::new(self.relay_healthy.clone()),
            Box::new(self.tokens.clone()),
            Box::new(self.relay_outstanding.clone()),
            Box::new(self.relay_ejections.clone()),
        ];
        for collector in collectors {
            // Names are distinct constants above, so registration cannot collide.
            self.registry
                .register(collector)
                .expect("distinct metric names");
        }
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
