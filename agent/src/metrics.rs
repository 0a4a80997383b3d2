//! The agent's Prometheus metrics, served on the admin port's `/metrics`.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

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
    pub tunnel_rx_bytes: IntGaugeVec,
    pub tunnel_tx_bytes: IntGaugeVec,
    pub tunnel_rx_packets: IntGaugeVec,
    pub tunnel_tx_packets: IntGaugeVec,
    /// Seconds since the last WireGuard handshake with each peer (-1: none yet).
    pub tunnel_handshake_age_seconds: GaugeVec,
    pub tunnel_drops: IntGaugeVec,
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
        let peer_gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["peer"]).expect("static metric definition")
        };
        let tunnel_rx_bytes = peer_gauge("xpart_tunnel_rx_bytes", "Bytes received from the peer");
        let tunnel_tx_bytes = peer_gauge("xpart_tunnel_tx_bytes", "Bytes sent to the peer");
        let tunnel_rx_packets =
            peer_gauge("xpart_tunnel_rx_packets", "Packets received from the peer");
        let tunnel_tx_packets = peer_gauge("xpart_tunnel_tx_packets", "Packets sent to the peer");
        let tunnel_handshake_age_seconds = GaugeVec::new(
            Opts::new(
                "xpart_tunnel_handshake_age_seconds",
                "Seconds since the last WireGuard handshake (-1: none yet)",
            ),
            &["peer"],
        )
        .expect("static metric definition");
        let tunnel_drops = IntGaugeVec::new(
            Opts::new("xpart_tunnel_drops", "Packets dropped, by reason"),
            &["peer", "reason"],
        )
        .expect("static metric definition");

        let metrics = Metrics {
            registry,
            requests,
            request_seconds,
            upstream_seconds,
            dns_answers,
            relay_healthy,
            tunnel_rx_bytes,
            tunnel_tx_bytes,
            tunnel_rx_packets,
            tunnel_tx_packets,
            tunnel_handshake_age_seconds,
            tunnel_drops,
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
            Box::new(self.tunnel_rx_bytes.clone()),
            Box::new(self.tunnel_tx_bytes.clone()),
            Box::new(self.tunnel_rx_packets.clone()),
            Box::new(self.tunnel_tx_packets.clone()),
            Box::new(self.tunnel_handshake_age_seconds.clone()),
            Box::new(self.tunnel_drops.clone()),
        ];
        for collector in collectors {
            // Names are distinct constants above, so registration cannot collide.
            self.registry
                .register(collector)
                .expect("distinct metric names");
        }
    }

    /// Copies a tunnel snapshot into the peer gauges.
    pub fn observe_peers(&self, peers: &[xpart_tunnel::PeerStats], now: std::time::SystemTime) {
        for peer in peers {
            let name = peer.name.as_str();
            self.tunnel_rx_bytes
                .with_label_values(&[name])
                .set(clamp(peer.rx_bytes));
            self.tunnel_tx_bytes
                .with_label_values(&[name])
                .set(clamp(peer.tx_bytes));
            self.tunnel_rx_packets
                .with_label_values(&[name])
                .set(clamp(peer.rx_packets));
            self.tunnel_tx_packets
                .with_label_values(&[name])
                .set(clamp(peer.tx_packets));
            let age = peer
                .last_handshake
                .and_then(|t| now.duration_since(t).ok())
                .map_or(-1.0, |d| d.as_secs_f64());
            self.tunnel_handshake_age_seconds
                .with_label_values(&[name])
                .set(age);
            for (reason, count) in &peer.drops {
                self.tunnel_drops
                    .with_label_values(&[name, reason.as_str()])
                    .set(clamp(*count));
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
