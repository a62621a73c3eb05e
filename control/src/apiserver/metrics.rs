//! `/metrics`: request counts and latencies by verb, resource and code,
//! and open watches by resource, under upstream's metric names.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verb: String,
    resource: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    verb: String,
    resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    resource: String,
}

/// kube-apiserver's request-duration buckets, in seconds (5 ms to 60 s).
const LATENCY_BUCKETS: [f64; 23] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];

#[derive(Clone, Copy, Debug)]
struct Buckets;

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(LATENCY_BUCKETS)
    }
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, Buckets>,
    watches: Family<WatchLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(..)")
    }
}

/// Counts one open watch for as long as it lives.
#[derive(Debug)]
pub struct WatchGuard(Gauge);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::new_with_constructor(Buckets);
        let watches = Family::<WatchLabels, Gauge>::default();
        registry.register(
            "apiserver_request",
            "Requests by verb, resource and HTTP code",
            requests.clone(),
        );
        registry.register(
            "apiserver_request_duration_seconds",
            "Request latency by verb and resource (watches: until the response starts)",
            latency.clone(),
        );
        registry.register(
            "apiserver_longrunning_requests",
            "Open watches by resource",
            watches.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            watches,
        }
    }

    pub fn observe(&self, verb: &str, resource: &str, code: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                verb: verb.to_owned(),
                resource: resource.to_owned(),
                code: code.to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                verb: verb.to_owned(),
                resource: resource.to_owned(),
            })
            .observe(seconds);
    }

    pub fn watch_started(&self, resource: &str) -> WatchGuard {
        let gauge = self
            .watches
            .get_or_create(&WatchLabels {
                resource: resource.to_owned(),
            })
            .clone();
        gauge.inc();
        WatchGuard(gauge)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_watches_are_exposed() {
        let metrics = Metrics::new();
        metrics.observe("LIST", "pods", 200, 0.003);
        metrics.observe("LIST", "pods", 200, 0.2);
        let guard = metrics.watch_started("configmaps");
        let text = metrics.render();
        assert!(
            text.contains(
                "apiserver_request_total{verb=\"LIST\",resource=\"pods\",code=\"200\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("apiserver_request_duration_seconds_bucket{le=\"0.005\",verb=\"LIST\",resource=\"pods\"} 1"), "{text}");
        assert!(
            text.contains("apiserver_longrunning_requests{resource=\"configmaps\"} 1"),
            "{text}"
        );
        drop(guard);
        assert!(
            metrics
                .render()
                .contains("apiserver_longrunning_requests{resource=\"configmaps\"} 0")
        );
    }
}
