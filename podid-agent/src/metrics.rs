//! Prometheus metrics (`/metrics`), and the values read at scrape time: the
//! kernel's counters, the audit writer's, the token cache's size.
//!
//! Label sets stay bounded: namespaces, identities, outcomes and status codes,
//! never pod names or UIDs (those are in the audit records).

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::audit::Outcome;

/// Labels of `podid_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub namespace: String,
    pub identity: String,
    pub outcome: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamOnlyLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Values read when Prometheus scrapes.
pub trait ScrapeSource: Send + Sync + std::fmt::Debug + 'static {
    /// Kernel redirect counters as (event, value).
    fn kernel_counters(&self) -> Vec<(&'static str, u64)>;
    /// Audit records written to / lost from the file.
    fn audit_counts(&self) -> (u64, u64);
    /// Tokens in the cache.
    fn cached_tokens(&self) -> usize;
}

#[derive(Debug)]
struct ScrapeCollector {
    source: Arc<OnceLock<Arc<dyn ScrapeSource>>>,
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = self.source.get() else {
            return Ok(());
        };
        let mut kernel = encoder.encode_descriptor(
            "podid_kernel_events",
            "Events counted by the kernel redirect programs (summed over CPUs)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (event, value) in source.kernel_counters() {
            let labels = [("event", event)];
            ConstCounter::new(value).encode(kernel.encode_family(&labels)?)?;
        }
        let (written, lost) = source.audit_counts();
        let written_encoder = encoder.encode_descriptor(
            "podid_audit_records_written",
            "Audit records written to the audit file",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(written).encode(written_encoder)?;
        let lost_encoder = encoder.encode_descriptor(
            "podid_audit_records_lost",
            "Audit records that could not be written to the audit file (disk full, unwritable, queue full)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(lost).encode(lost_encoder)?;
        let cache_encoder = encoder.encode_descriptor(
            "podid_token_cache_entries",
            "Tokens currently cached",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(source.cached_tokens() as i64).encode(cache_encoder)?;
        Ok(())
    }
}

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<OutcomeLabels, Histogram>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_duration: Family<UpstreamOnlyLabels, Histogram>,
    cache: Family<ResultLabels, Counter>,
    unattributed: Family<ReasonLabels, Counter>,
    rejected_connections: Family<ReasonLabels, Counter>,
    active_connections: Gauge,
    pod_listeners: Gauge,
    scrape: Arc<OnceLock<Arc<dyn ScrapeSource>>>,
}

fn latency_histogram() -> Histogram {
    // 50 µs … ~13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "podid_requests",
            "Requests to the IMDS endpoint by workload namespace, identity, outcome and status",
            requests.clone(),
        );
        let request_duration = Family::<OutcomeLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "podid_request_duration_seconds",
            "Time from request to response",
            request_duration.clone(),
        );
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "podid_upstream_requests",
            "Calls to upstream IMDS and Entra ID by status (\"error\" for transport failures and timeouts)",
            upstream_requests.clone(),
        );
        let upstream_duration = Family::<UpstreamOnlyLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "podid_upstream_request_duration_seconds",
            "Duration of upstream calls",
            upstream_duration.clone(),
        );
        let cache = Family::<ResultLabels, Counter>::default();
        registry.register(
            "podid_token_cache_lookups",
            "Token cache lookups by result (hit or miss)",
            cache.clone(),
        );
        let unattributed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "podid_unattributed_requests",
            "Requests refused because the connection could not be tied to a workload",
            unattributed.clone(),
        );
        let rejected_connections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "podid_rejected_connections",
            "Connections refused by a resource limit (connection cap, header size, slow request)",
            rejected_connections.clone(),
        );
        let active_connections = Gauge::default();
        registry.register(
            "podid_active_connections",
            "Connections being served",
            active_connections.clone(),
        );
        let pod_listeners = Gauge::default();
        registry.register(
            "podid_pod_listeners",
            "Zero-policy mode: listeners open inside pods' network namespaces",
            pod_listeners.clone(),
        );
        let scrape = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(ScrapeCollector {
            source: scrape.clone(),
        }));
        Self {
            registry,
            requests,
            request_duration,
            upstream_requests,
            upstream_duration,
            cache,
            unattributed,
            rejected_connections,
            active_connections,
            pod_listeners,
            scrape,
        }
    }

    /// Sets what scrape-time values are read from (once).
    pub fn set_scrape_source(&self, source: Arc<dyn ScrapeSource>) {
        let _ = self.scrape.set(source);
    }

    /// Counts a finished request.
    pub fn request(
        &self,
        namespace: &str,
        identity: &str,
        outcome: Outcome,
        status: u16,
        took: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                namespace: namespace.to_string(),
                identity: identity.to_string(),
                outcome: outcome.as_str().to_string(),
                status: status.to_string(),
            })
            .inc();
        self.request_duration
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str().to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts an upstream call.
    pub fn upstream_call(&self, upstream: &str, status: Option<u16>, took: Duration) {
        self.upstream_requests
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
                status: status.map_or_else(|| "error".to_string(), |s| s.to_string()),
            })
            .inc();
        self.upstream_duration
            .get_or_create(&UpstreamOnlyLabels {
                upstream: upstream.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a cache lookup.
    pub fn cache_lookup(&self, hit: bool) {
        self.cache
            .get_or_create(&ResultLabels {
                result: if hit { "hit" } else { "miss" }.to_string(),
            })
            .inc();
    }

    /// Counts a request refused for lack of attribution.
    pub fn unattributed(&self, reason: &str) {
        self.unattributed
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts a connection refused by a limit.
    pub fn rejected_connection(&self, reason: &str) {
        self.rejected_connections
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The active-connections gauge.
    pub fn active_connections(&self) -> &Gauge {
        &self.active_connections
    }

    /// The pod-listeners gauge (zero-policy mode).
    pub fn pod_listeners(&self) -> &Gauge {
        &self.pod_listeners
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl ScrapeSource for Fixed {
        fn kernel_counters(&self) -> Vec<(&'static str, u64)> {
            vec![("redirected", 7), ("record_missing", 1)]
        }
        fn audit_counts(&self) -> (u64, u64) {
            (10, 2)
        }
        fn cached_tokens(&self) -> usize {
            3
        }
    }

    #[test]
    fn renders_requests_and_scrape_values() {
        let metrics = Metrics::new();
        metrics.request(
            "app",
            "app/sql",
            Outcome::Issued,
            200,
            Duration::from_micros(300),
        );
        metrics.upstream_call("imds", Some(429), Duration::from_millis(2));
        metrics.upstream_call("imds", None, Duration::from_millis(2));
        metrics.cache_lookup(true);
        metrics.set_scrape_source(Arc::new(Fixed));
        let text = metrics.render();
        for expected in [
            r#"podid_requests_total{namespace="app",identity="app/sql",outcome="issued",status="200"} 1"#,
            r#"podid_upstream_requests_total{upstream="imds",status="429"} 1"#,
            r#"podid_upstream_requests_total{upstream="imds",status="error"} 1"#,
            r#"podid_token_cache_lookups_total{result="hit"} 1"#,
            r#"podid_kernel_events_total{event="redirected"} 7"#,
            "podid_audit_records_lost_total 2",
            "podid_token_cache_entries 3",
            "podid_request_duration_seconds_bucket",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
    }
}
