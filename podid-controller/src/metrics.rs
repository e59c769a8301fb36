//! Prometheus metrics (prometheus-client), prefixed `podid_controller_`.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use std::sync::atomic::AtomicU64;

/// Labels of ARM call counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ArmCallLabels {
    /// `vm_get`, `vm_update`, `vmss_get`, `vmss_update`, `operation_poll`.
    pub operation: String,
    /// HTTP status, `0` when no answer arrived.
    pub status: String,
}

/// Labels carrying only an operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// The operation.
    pub operation: String,
}

/// Labels of cycle counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CycleLabels {
    /// `ok`, `partial` (some work left for a retry) or `error`.
    pub result: String,
    /// `event`, `sync`, `reconcile` or `retry`.
    pub trigger: String,
}

/// Labels of error counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Error kind (see `Error::metric_label`) or Kubernetes operation.
    pub kind: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

/// All metrics of the controller, registered in [`Metrics::registry`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    cycles: Family<CycleLabels, Counter>,
    cycle_duration: Histogram,
    arm_calls: Family<ArmCallLabels, Counter>,
    arm_duration: HistogramFamily<OperationLabels>,
    arm_throttled: Family<OperationLabels, Counter>,
    arm_throttle_wait: Counter<f64, AtomicU64>,
    assignment_latency: Histogram,
    kube_errors: Family<ErrorLabels, Counter>,
    failures: Family<ErrorLabels, Counter>,
    leader: Gauge,
    identity_writes: Family<OperationLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("podid_controller");
        let cycles = Family::<CycleLabels, Counter>::default();
        registry.register("cycles", "Assignment cycles run", cycles.clone());
        let cycle_duration = latency_histogram();
        registry.register(
            "cycle_duration_seconds",
            "Duration of assignment cycles",
            cycle_duration.clone(),
        );
        let arm_calls = Family::<ArmCallLabels, Counter>::default();
        registry.register(
            "arm_requests",
            "ARM requests on the wire, by operation and HTTP status",
            arm_calls.clone(),
        );
        let arm_duration: HistogramFamily<OperationLabels> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "arm_request_duration_seconds",
            "Duration of ARM requests",
            arm_duration.clone(),
        );
        let arm_throttled = Family::<OperationLabels, Counter>::default();
        registry.register(
            "arm_throttled",
            "ARM answers with 429 Too Many Requests",
            arm_throttled.clone(),
        );
        let arm_throttle_wait = Counter::<f64, AtomicU64>::default();
        registry.register(
            "arm_throttle_wait_seconds",
            "Time spent waiting for an ARM client's Retry-After",
            arm_throttle_wait.clone(),
        );
        let assignment_latency = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        registry.register(
            "assignment_latency_seconds",
            "From an AzureAssignedIdentity's creation to Assigned",
            assignment_latency.clone(),
        );
        let kube_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "kubernetes_errors",
            "Failed Kubernetes API writes, by operation",
            kube_errors.clone(),
        );
        let failures = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "failures",
            "Cycle failures, by error kind",
            failures.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the lease",
            leader.clone(),
        );
        let identity_writes = Family::<OperationLabels, Counter>::default();
        registry.register(
            "assignments",
            "AzureAssignedIdentity transitions (created, assigned, released, failed)",
            identity_writes.clone(),
        );
        Metrics {
            registry,
            cycles,
            cycle_duration,
            arm_calls,
            arm_duration,
            arm_throttled,
            arm_throttle_wait,
            assignment_latency,
            kube_errors,
            failures,
            leader,
            identity_writes,
        }
    }

    /// The registry, for `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of all metrics.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// One cycle ended.
    pub fn cycle(&self, trigger: &str, result: &str, duration: Duration) {
        self.cycles
            .get_or_create(&CycleLabels {
                result: result.to_string(),
                trigger: trigger.to_string(),
            })
            .inc();
        self.cycle_duration.observe(duration.as_secs_f64());
    }

    /// One ARM request on the wire.
    pub fn arm_call(&self, operation: &str, status: u16, duration: Duration) {
        self.arm_calls
            .get_or_create(&ArmCallLabels {
                operation: operation.to_string(),
                status: status.to_string(),
            })
            .inc();
        self.arm_duration
            .get_or_create(&OperationLabels {
                operation: operation.to_string(),
            })
            .observe(duration.as_secs_f64());
    }

    /// ARM answered 429.
    pub fn arm_throttled(&self, operation: &str) {
        self.arm_throttled
            .get_or_create(&OperationLabels {
                operation: operation.to_string(),
            })
            .inc();
    }

    /// Time waited for a Retry-After.
    pub fn arm_throttle_wait(&self, wait: Duration) {
        self.arm_throttle_wait.inc_by(wait.as_secs_f64());
    }

    /// An assignment reached `Assigned` after `latency`.
    pub fn assignment_latency(&self, latency: Duration) {
        self.assignment_latency.observe(latency.as_secs_f64());
    }

    /// A Kubernetes write failed.
    pub fn kube_error(&self, operation: &str) {
        self.kube_errors
            .get_or_create(&ErrorLabels {
                kind: operation.to_string(),
            })
            .inc();
    }

    /// A cycle failed with an error of `kind`.
    pub fn failure(&self, kind: &str) {
        self.failures
            .get_or_create(&ErrorLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Leadership changed.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Count an assignment transition.
    pub fn assignment(&self, transition: &str, count: usize) {
        self.identity_writes
            .get_or_create(&OperationLabels {
                operation: transition.to_string(),
            })
            .inc_by(count as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_with_their_labels() {
        let m = Metrics::new();
        m.arm_call("vmss_update", 200, Duration::from_millis(30));
        m.arm_throttled("vmss_update");
        m.cycle("event", "ok", Duration::from_millis(5));
        m.set_leader(true);
        let text = m.encode();
        assert!(
            text.contains(
                r#"podid_controller_arm_requests_total{operation="vmss_update",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"podid_controller_arm_throttled_total{operation="vmss_update"} 1"#)
        );
        assert!(text.contains(r#"podid_controller_cycles_total{result="ok",trigger="event"} 1"#));
        assert!(text.contains("podid_controller_leader 1"));
    }
}
