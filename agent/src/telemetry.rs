//! What the service proxy tells the outside: Prometheus metrics on
//! `/metrics` and a kube-proxy-style `/healthz` for external load
//! balancers, on kube-proxy's default ports (10249 and 10256).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use k8s_openapi::chrono::{DateTime, SecondsFormat, Utc};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// How long a change may wait to be programmed before `/healthz` says the
/// proxy is unhealthy: twice kube-proxy's default 30 s sync period, as
/// kube-proxy's own health server allows.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// kube-proxy's network-programming buckets, in seconds: 0.25 s steps to
/// 0.5 s, 1 s steps to a minute, then coarser up to five minutes.
fn programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.25, 0.5];
    buckets.extend((1..60).map(f64::from));
    buckets.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    buckets.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    buckets
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot listen on {address} for {what}: {source}")]
    Listen {
        address: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The proxy's metrics and health, shared by the sync loop (writer) and
/// the HTTP endpoints (readers).
pub struct Telemetry {
    registry: Registry,
    sync_duration: Histogram,
    programming: Histogram,
    failures: Counter,
    last_sync: Gauge<f64, AtomicU64>,
    frontends: Gauge,
    health: Mutex<Health>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Health {
    /// When the dataplane last matched the source.
    last_programmed: Option<SystemTime>,
    /// The oldest change not yet programmed; start-up counts as one.
    pending_since: Option<Instant>,
    /// False while the Node is being deleted or drained by the cluster
    /// autoscaler: load balancers should stop sending traffic here.
    node_eligible: bool,
    /// Pods can be given a network: the CNI plugin is configured.
    network_ready: bool,
}

impl Health {
    /// No change has waited past the health timeout.
    fn keeping_up(&self) -> bool {
        self.pending_since
            .is_none_or(|since| since.elapsed() < HEALTH_TIMEOUT)
    }
}

impl Telemetry {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sync_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
        );
        let programming = Histogram::new(programming_buckets());
        let failures = Counter::default();
        let last_sync = Gauge::<f64, AtomicU64>::default();
        let frontends = Gauge::default();
        registry.register(
            "wharf_sync_proxy_rules_duration_seconds",
            "How long one sync of the dataplane took",
            sync_duration.clone(),
        );
        registry.register(
            "wharf_network_programming_duration_seconds",
            "From an EndpointSlice change (its last-change-trigger-time) to the dataplane forwarding by it",
            programming.clone(),
        );
        registry.register(
            "wharf_sync_proxy_rules_failures",
            "Syncs and full resyncs that failed (each is retried)",
            failures.clone(),
        );
        registry.register(
            "wharf_sync_proxy_rules_last_timestamp_seconds",
            "When the last successful sync ended, in seconds since the epoch",
            last_sync.clone(),
        );
        registry.register(
            "wharf_proxy_frontends",
            "Frontends (service address, port, protocol) programmed",
            frontends.clone(),
        );
        Self {
            registry,
            sync_duration,
            programming,
            failures,
            last_sync,
            frontends,
            health: Mutex::new(Health {
                last_programmed: None,
                pending_since: Some(Instant::now()),
                node_eligible: true,
                network_ready: false,
            }),
        }
    }

    /// A change arrived that is not programmed yet.
    pub fn change_queued(&self) {
        let mut health = self.health();
        health.pending_since.get_or_insert_with(Instant::now);
    }

    /// A sync worked.
    pub fn synced(&self, took: Duration, frontends: usize) {
        self.sync_duration.observe(took.as_secs_f64());
        self.frontends.set(frontends.try_into().unwrap_or(i64::MAX));
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.health().node_eligible = eligible;
    }

    pub fn set_network_ready(&self, ready: bool) {
        self.health().network_ready = ready;
    }

    pub fn sync_failed(&self) {
        self.failures.inc();
    }

    /// The dataplane now holds every change the source reported; these
    /// are the trigger times of the endpoint changes among them.
    pub fn programmed(&self, triggers: &[SystemTime]) {
        let now = SystemTime::now();
        for trigger in triggers {
            // A trigger time from a skewed clock in the future counts as 0.
            let latency = now.duration_since(*trigger).unwrap_or_default();
            self.programming.observe(latency.as_secs_f64());
        }
        self.last_sync.set(seconds_since_epoch(now));
        let mut health = self.health();
        health.last_programmed = Some(now);
        health.pending_since = None;
    }

    /// Whether no change has waited past the health timeout (and, for
    /// `/healthz` but not `/livez`, whether the node should take traffic),
    /// with the body kube-proxy answers: `lastUpdated` is now while the
    /// proxy keeps up, else when it last did.
    pub fn healthz(&self, check_node: bool) -> (bool, String) {
        let health = self.health();
        let keeping_up = health.keeping_up();
        let now = SystemTime::now();
        let time =
            |t: SystemTime| DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Millis, true);
        let updated = if keeping_up {
            Some(now)
        } else {
            health.last_programmed
        };
        let mut body = serde_json::json!({
            "lastUpdated": updated.map(time).unwrap_or_default(),
            "currentTime": time(now),
        });
        let mut healthy = keeping_up;
        if check_node {
            body["nodeEligible"] = health.node_eligible.into();
            healthy &= health.node_eligible;
        }
        (healthy, body.to_string())
    }

    /// Whether the dataplane has been programmed and is keeping up, and
    /// pods can be networked: what the node's Ready condition reports.
    pub fn ready(&self) -> bool {
        let health = self.health();
        health.last_programmed.is_some() && health.keeping_up() && health.network_ready
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        // The lock guards plain values; a panic elsewhere cannot leave
        // them half-written.
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

fn seconds_since_epoch(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Binds `/metrics` and `/healthz` (also `/livez`), and returns the
/// future that serves them.
pub async fn serve(
    telemetry: Arc<Telemetry>,
    metrics: SocketAddr,
    healthz: SocketAddr,
) -> Result<impl Future<Output = ()>, TelemetryError> {
    let listen = |address, what| async move {
        tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| TelemetryError::Listen {
                address,
                what,
                source,
            })
    };
    let metrics_listener = listen(metrics, "metrics").await?;
    let healthz_listener = listen(healthz, "healthz").await?;
    let metrics_router = Router::new()
        .route("/metrics", get(metrics_page))
        .with_state(Arc::clone(&telemetry));
    let healthz_router = Router::new()
        .route("/healthz", get(|state| health_page(state, true)))
        .route("/livez", get(|state| health_page(state, false)))
        .with_state(telemetry);
    Ok(async move {
        let (metrics, healthz) = tokio::join!(
            axum::serve(metrics_listener, metrics_router),
            axum::serve(healthz_listener, healthz_router)
        );
        for result in [metrics, healthz] {
            if let Err(e) = result {
                tracing::error!(error = %e, "telemetry endpoint stopped");
            }
        }
    })
}

async fn metrics_page(State(telemetry): State<Arc<Telemetry>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        telemetry.encode(),
    )
}

async fn health_page(
    State(telemetry): State<Arc<Telemetry>>,
    check_node: bool,
) -> impl IntoResponse {
    let (healthy, body) = telemetry.healthz(check_node);
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_pending_changes() {
        let telemetry = Telemetry::new();
        // Fresh: start-up is pending, but not for long yet.
        assert!(telemetry.healthz(true).0);
        telemetry.health().pending_since = Some(Instant::now() - 2 * HEALTH_TIMEOUT);
        let (healthy, body) = telemetry.healthz(true);
        assert!(!healthy, "nothing programmed for two minutes");
        assert!(body.contains("\"lastUpdated\":\"\""), "{body}");
        assert!(body.contains("\"nodeEligible\":true"), "{body}");
        telemetry.programmed(&[SystemTime::now() - Duration::from_millis(700)]);
        let (healthy, body) = telemetry.healthz(true);
        assert!(healthy);
        assert!(!body.contains("\"lastUpdated\":\"\""), "{body}");
        // A node on its way out fails /healthz, not /livez.
        telemetry.set_node_eligible(false);
        assert!(!telemetry.healthz(true).0);
        assert!(telemetry.healthz(false).0);
        let metrics = telemetry.encode();
        assert!(
            metrics.contains("wharf_network_programming_duration_seconds_bucket{le=\"1.0\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("wharf_network_programming_duration_seconds_bucket{le=\"0.5\"} 0"),
            "{metrics}"
        );
    }
}
