//! A daemon's Prometheus metrics, each defined and registered in one call: the name, the help
//! text and the labels are the definition, and a metric is never defined without being
//! registered (nor registered twice).

use prometheus::core::Collector;
use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// A counter.
pub fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    registered(registry, IntCounter::new(name, help)?)
}

/// A counter per combination of `labels`.
pub fn counters(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    registered(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
}

/// A whole-number gauge.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    registered(registry, IntGauge::new(name, help)?)
}

/// A gauge for values that are not whole numbers (a timestamp in seconds).
pub fn float_gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<Gauge> {
    registered(registry, Gauge::new(name, help)?)
}

/// A whole-number gauge per combination of `labels`.
pub fn gauges(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    registered(registry, IntGaugeVec::new(Opts::new(name, help), labels)?)
}

/// A histogram with `buckets` per combination of `labels`.
pub fn histograms(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    registered(registry, HistogramVec::new(opts, labels)?)
}

fn registered<C: Collector + Clone + 'static>(
    registry: &Registry,
    metric: C,
) -> prometheus::Result<C> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_registered_once_under_its_name() {
        let registry = Registry::new();
        let requests =
            counters(&registry, "x_requests_total", "Requests", &["status"]).expect("a new name");
        requests.with_label_values(&["200"]).inc();
        let families = registry.gather();
        assert_eq!(families.len(), 1);
        assert_eq!(families[0].name(), "x_requests_total");
        assert!(counter(&registry, "x_requests_total", "Again").is_err());
    }
}
